//! Group commit: deliveries arriving together share one transaction, each in its own
//! savepoint. A bad event in the group fails alone; a group whose commit fails answers
//! none of its deliveries with 200, and Stripe's redeliveries are then processed.

mod common;

use futures_util::future::join_all;
use serde_json::{Value, json};
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{Outcome, Webhooks};
use stripe_mirror::{Config, Mirror, Secret, WebhookRequest};

const SECRET: &str = "whsec_group";

fn config(b: &common::Backend) -> Config {
    let mut config = b.config.clone();
    config.webhook_secrets = vec![Secret::new(SECRET)];
    config
}

fn customer_event(i: usize) -> Value {
    json!({"id": format!("evt_g{i}"), "object": "event", "type": "customer.created",
           "created": chrono::Utc::now().timestamp(), "livemode": false,
           "data": {"object": {"id": format!("cus_g{i}"), "object": "customer", "email": format!("g{i}@example.com")}}})
}

fn signed(v: &Value) -> WebhookRequest {
    let body = v.to_string().into_bytes();
    let header = sign(&body, &Secret::new(SECRET), chrono::Utc::now().timestamp());
    WebhookRequest::new(body).header("Stripe-Signature", header)
}

fn count(config: &Config, sql: &str) -> i64 {
    common::query_count(&config.database_url, sql)
}

/// The deliveries are checked and queued at once (one poll of `join_all`): on SQLite
/// they share groups; whatever the grouping, the bad one fails alone.
#[tokio::test]
async fn a_bad_event_in_a_group_fails_alone() {
    for b in common::backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let webhooks = Webhooks::new();
        let mut requests: Vec<WebhookRequest> =
            (0..6).map(|i| signed(&customer_event(i))).collect();
        // A subscription whose items are not a list: its sync fails, in its savepoint only.
        let bad_object = json!({"id": "evt_gbad", "object": "event", "type": "customer.subscription.created",
            "created": chrono::Utc::now().timestamp(), "livemode": false,
            "data": {"object": {"id": "sub_gbad", "object": "subscription", "customer": "cus_g0",
                "status": "active", "items": {"data": "not a list"}}}});
        requests.insert(3, signed(&bad_object));
        // A bad signature: refused before the database, logged in the same group.
        requests.push(
            WebhookRequest::new(customer_event(99).to_string())
                .header("Stripe-Signature", "t=1,v1=00"),
        );
        let answers = join_all(requests.into_iter().map(|r| webhooks.receive(&mirror, r))).await;
        let outcomes: Vec<Outcome> = answers.iter().map(|a| a.outcome).collect();
        let mut expected = vec![Outcome::Processed; 6];
        expected.insert(3, Outcome::InvalidObject);
        expected.push(Outcome::InvalidSignature);
        assert_eq!(outcomes, expected, "{}", b.name);
        assert_eq!(
            count(&config, "SELECT COUNT(*) AS n FROM stripe_customers"),
            6,
            "{}",
            b.name
        );
        assert_eq!(
            count(&config, "SELECT COUNT(*) AS n FROM stripe_subscriptions"),
            0
        );
        assert_eq!(
            count(
                &config,
                "SELECT COUNT(*) AS n FROM stripe_webhook_deliveries"
            ),
            8
        );
        // The bad event is stored failed, for a replay once the code is fixed.
        assert_eq!(
            common::query_text(
                &config.database_url,
                "SELECT status AS t FROM stripe_events WHERE id = 'evt_gbad'"
            ),
            "failed"
        );
    }
}

/// A group whose commit fails (a deferred constraint raising at COMMIT) answers none of
/// its deliveries 200 and stores none of them; a delivery answered 200 is stored. The
/// redeliveries are processed.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_group_whose_commit_fails_answers_none_with_200() {
    let b = common::backends()
        .into_iter()
        .find(|b| b.name == "postgres")
        .unwrap();
    let config = config(&b);
    let mirror = Mirror::connect(config.clone()).await.unwrap();
    common::execute_sql(
        &config.database_url,
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.id = 'evt_g2' THEN RAISE EXCEPTION 'the disk is full'; END IF; RETURN NULL; END $$",
    );
    common::execute_sql(
        &config.database_url,
        "CREATE CONSTRAINT TRIGGER poison AFTER INSERT ON stripe_events \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION poison()",
    );
    let webhooks = Webhooks::new();
    let events: Vec<Value> = (0..8).map(customer_event).collect();
    let answers = join_all(events.iter().map(|e| webhooks.receive(&mirror, signed(e)))).await;
    let poisoned = &answers[2];
    assert_eq!(
        (poisoned.status, poisoned.outcome),
        (503, Outcome::Unavailable),
        "{poisoned:?}"
    );
    assert!(
        poisoned
            .error
            .as_deref()
            .unwrap_or("")
            .contains("the disk is full"),
        "{poisoned:?}"
    );
    let mut failed = 0;
    for (i, a) in answers.iter().enumerate() {
        let stored = count(
            &config,
            &format!("SELECT COUNT(*) AS n FROM stripe_events WHERE id = 'evt_g{i}'"),
        );
        match a.status {
            200 => assert_eq!(stored, 1, "evt_g{i} answered 200 must be stored: {a:?}"),
            _ => {
                assert_eq!((a.status, stored), (503, 0), "evt_g{i}: {a:?}");
                failed += 1;
            }
        }
    }
    assert!(failed >= 1);
    assert_eq!(
        count(
            &config,
            "SELECT COUNT(*) AS n FROM stripe_events WHERE id = 'evt_g2'"
        ),
        0
    );
    // Stripe redelivers once the database is healthy again: every event is processed.
    common::execute_sql(&config.database_url, "DROP TRIGGER poison ON stripe_events");
    let answers = join_all(events.iter().map(|e| webhooks.receive(&mirror, signed(e)))).await;
    assert!(
        answers
            .iter()
            .all(|a| matches!(a.outcome, Outcome::Processed | Outcome::Duplicate)),
        "{answers:?}"
    );
    assert_eq!(
        count(&config, "SELECT COUNT(*) AS n FROM stripe_customers"),
        8
    );
}

/// Deliveries from many tasks at once (a multi-thread runtime, as a server runs):
/// every one answered, every event stored once, whatever the grouping.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_are_each_answered_after_their_commit() {
    for b in common::backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let webhooks = Webhooks::new();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let (w, m) = (webhooks.clone(), mirror.clone());
                // Every event twice: the duplicate is answered 200 and stored once.
                tokio::spawn(async move { w.receive(&m, signed(&customer_event(i % 32))).await })
            })
            .collect();
        let answers: Vec<Outcome> = join_all(tasks)
            .await
            .into_iter()
            .map(|a| a.unwrap().outcome)
            .collect();
        let processed = answers.iter().filter(|o| **o == Outcome::Processed).count();
        let duplicate = answers.iter().filter(|o| **o == Outcome::Duplicate).count();
        assert_eq!((processed, duplicate), (32, 32), "{}: {answers:?}", b.name);
        assert_eq!(
            count(&config, "SELECT COUNT(*) AS n FROM stripe_events"),
            32,
            "{}",
            b.name
        );
        assert_eq!(
            count(&config, "SELECT COUNT(*) AS n FROM stripe_customers"),
            32
        );
        assert_eq!(
            count(
                &config,
                "SELECT COUNT(*) AS n FROM stripe_webhook_deliveries"
            ),
            64
        );
    }
}

/// The writers belong to the mirror, not to the runtime that first used it: a mirror
/// first used on one runtime, which then sits idle, keeps committing for another.
#[test]
fn a_mirror_shared_between_runtimes_keeps_committing() {
    let current = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    for b in common::backends() {
        let config = config(&b);
        let (first, second) = (current(), current());
        let mirror = first.block_on(Mirror::connect(config.clone())).unwrap();
        let webhooks = Webhooks::new();
        let r = first.block_on(webhooks.receive(&mirror, signed(&customer_event(1))));
        assert_eq!(r.outcome, Outcome::Processed, "{}", b.name);
        // `first` stays alive, and nothing drives it any more.
        let r = second.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(20),
                webhooks.receive(&mirror, signed(&customer_event(2))),
            )
            .await
        });
        assert_eq!(
            r.map(|r| r.outcome).ok(),
            Some(Outcome::Processed),
            "{}",
            b.name
        );
        drop(first);
        assert_eq!(
            count(&config, "SELECT COUNT(*) AS n FROM stripe_customers"),
            2
        );
    }
}

/// Writers keep their connection while deliveries keep coming, but at most half the
/// pool writes side by side: handlers that query the app's tables on the same pool
/// still get a connection, with the smallest pool that has room for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_on_the_mirrors_pool_get_a_connection_while_writers_hold_theirs() {
    use stripe_mirror::{DbPool, Event};
    for b in common::backends() {
        let mut config = config(&b);
        config.pool_size = 2;
        config.connection_timeout = std::time::Duration::from_secs(2);
        config.webhook_handler_timeout = std::time::Duration::from_secs(10);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        // A handler that reads on the mirror's pool, as a host's would.
        let webhooks = Webhooks::new().on("customer.*", |_e: Event, m: Mirror| async move {
            let pool = m.pool().clone();
            tokio::task::spawn_blocking(
                move || -> Result<(), stripe_mirror::webhooks::HandlerError> {
                    use diesel::RunQueryDsl;
                    match pool {
                        DbPool::Sqlite(p) => {
                            diesel::sql_query("SELECT 1").execute(&mut p.get()?)?;
                        }
                        #[cfg(feature = "postgres")]
                        DbPool::Postgres(p) => {
                            diesel::sql_query("SELECT 1").execute(&mut p.get()?)?;
                        }
                        #[allow(unreachable_patterns)]
                        _ => unreachable!(),
                    }
                    Ok(())
                },
            )
            .await??;
            Ok(())
        });
        let tasks: Vec<_> = (0..48)
            .map(|i| {
                let (w, m) = (webhooks.clone(), mirror.clone());
                tokio::spawn(async move { w.receive(&m, signed(&customer_event(1000 + i))).await })
            })
            .collect();
        for answer in join_all(tasks).await {
            let answer = answer.unwrap();
            assert_eq!(
                (answer.status, answer.outcome),
                (200, Outcome::Processed),
                "{}: {:?}",
                b.name,
                answer.error
            );
        }
    }
}

/// A Postgres writer waits a bounded time for a row another transaction holds: its
/// group is rolled back and tried again, and while the row stays locked the delivery
/// is answered 5xx (Stripe retries) instead of waiting for the lock. A deadlock between
/// two writers' groups breaks the same way, long before Postgres' `deadlock_timeout`.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_writer_waits_a_bounded_time_for_a_locked_row() {
    let url = common::postgres_url();
    let mut config = Config::new(url.clone());
    config.webhook_secrets = vec![Secret::new(SECRET)];
    let mirror = Mirror::connect(config.clone()).await.unwrap();
    let webhooks = Webhooks::new();
    let created = webhooks.receive(&mirror, signed(&customer_event(1))).await;
    assert_eq!(created.status, 200, "{created:?}");
    let (holder, release_tx) = hold_customer_row(&url, "cus_g1");
    let updated = email_changed(1);
    let answer = webhooks.receive(&mirror, signed(&updated)).await;
    assert!(
        !holder.is_finished(),
        "answered only once the row was released"
    );
    // The database is busy, not broken: 503, and Stripe retries.
    assert_eq!(answer.status, 503, "{answer:?}");
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    // Stripe's redelivery then goes through.
    let again = webhooks.receive(&mirror, signed(&updated)).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        count(
            &config,
            "SELECT COUNT(*) AS n FROM stripe_customers WHERE id = 'cus_g1' AND email = 'new@example.com'"
        ),
        1
    );
}

/// Another transaction holding customer `id`'s row (`SELECT ... FOR UPDATE`) until
/// told to release it (or 15 s pass); returns once the row is locked.
#[cfg(feature = "postgres")]
fn hold_customer_row(
    url: &str,
    id: &str,
) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Sender<()>) {
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (url, id) = (url.to_owned(), id.to_owned());
    let holder = std::thread::spawn(move || {
        use diesel::{Connection, PgConnection, RunQueryDsl};
        let mut c = PgConnection::establish(&url).unwrap();
        c.transaction(|c| {
            diesel::sql_query(format!(
                "SELECT id FROM stripe_customers WHERE id = '{id}' FOR UPDATE"
            ))
            .execute(c)?;
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv_timeout(std::time::Duration::from_secs(15));
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    });
    locked_rx.recv().unwrap();
    (holder, release_tx)
}

/// A later `customer.updated` of customer `n` (from [`customer_event`]) changing its
/// email to `new@example.com`.
#[cfg(feature = "postgres")]
fn email_changed(n: usize) -> Value {
    let mut updated = customer_event(n);
    updated["id"] = json!(format!("evt_g{n}_updated"));
    updated["type"] = json!("customer.updated");
    updated["created"] = json!(chrono::Utc::now().timestamp() + 1);
    updated["data"]["object"]["email"] = json!("new@example.com");
    updated
}

/// `Config::postgres_lock_wait` longer than a lock is held: the delivery waits for
/// the row instead of being answered 503, and is stored once the row is released. The
/// row is held 2 s, longer than the default wait's four tries (about 1 s in all).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_postgres_lock_wait_waits_for_the_row() {
    let url = common::postgres_url();
    let mut config =
        Config::new(url.clone()).postgres_lock_wait(std::time::Duration::from_secs(10));
    config.webhook_secrets = vec![Secret::new(SECRET)];
    let mirror = Mirror::connect(config.clone()).await.unwrap();
    let webhooks = Webhooks::new();
    let created = webhooks.receive(&mirror, signed(&customer_event(2))).await;
    assert_eq!(created.status, 200, "{created:?}");
    let (holder, release_tx) = hold_customer_row(&url, "cus_g2");
    let updated = email_changed(2);
    let answer = tokio::spawn({
        let (mirror, webhooks) = (mirror.clone(), webhooks.clone());
        async move { webhooks.receive(&mirror, signed(&updated)).await }
    });
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    release_tx.send(()).unwrap();
    let answer = answer.await.unwrap();
    holder.join().unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        count(
            &config,
            "SELECT COUNT(*) AS n FROM stripe_customers WHERE id = 'cus_g2' AND email = 'new@example.com'"
        ),
        1
    );
}
