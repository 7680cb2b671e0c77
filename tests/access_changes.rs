//! `on_access_change`: the host is told each subscriber's access as the mirror holds
//! it, whatever order the events came in, once per change, never for a change that
//! does not touch access, and again after its hook failed. The hook keeps a host table
//! (`users.plan`, `users.role`) in the same database, as the README's guide does.
//! Every test runs on SQLite and Postgres.

mod common;

use std::sync::{Arc, Mutex};

use common::backends;
use serde_json::{Value, json};
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{EventFilter, Outcome};
use stripe_mirror::{
    AccessChange, Config, Customer, Event, Mirror, Secret, Subscription, WebhookRequest, Webhooks,
    access_of,
};

const SECRET: &str = "whsec_test_access";
const PERIOD_END: i64 = 4_102_444_800;

fn config(b: &common::Backend) -> Config {
    let mut config = b.config.clone();
    config.webhook_secrets = vec![Secret::new(SECRET)];
    config
}

fn post(v: &Value) -> WebhookRequest {
    let body = v.to_string().into_bytes();
    let header = sign(&body, &Secret::new(SECRET), chrono::Utc::now().timestamp());
    WebhookRequest::new(body).header("Stripe-Signature", header)
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> Value {
    json!({"id": id, "object": "event", "type": kind, "created": created, "livemode": false,
           "data": {"object": object}})
}

fn customer(id: &str, subscriber: Option<&str>, email: &str) -> Value {
    let metadata = match subscriber {
        Some(s) => json!({"stripe_mirror_subscriber": s}),
        None => json!({}),
    };
    json!({"id": id, "object": "customer", "livemode": false, "email": email, "metadata": metadata, "created": 1_700_000_000})
}

fn subscription(id: &str, customer: &str, status: &str, product: &str) -> Value {
    json!({"id": id, "object": "subscription", "livemode": false, "customer": customer, "status": status,
           "created": 1_700_000_100,
           "items": {"object": "list", "data": [{"id": format!("si_{id}"), "object": "subscription_item",
               "subscription": id, "quantity": 1, "price": {"id": "price_pro", "object": "price", "product": product},
               "current_period_start": 1_700_000_100, "current_period_end": PERIOD_END}]}})
}

/// A subscriber signing up, as `tag` names it: the events of customer `cus_{tag}` of
/// `user-{tag}` and its active subscription `sub_{tag}` to `prod_{tag}`, at `t`.
fn signup(tag: &str, t: i64) -> [Value; 2] {
    [
        event(
            &format!("evt_{tag}1"),
            "customer.created",
            t,
            customer(
                &format!("cus_{tag}"),
                Some(&format!("user-{tag}")),
                &format!("{tag}@example.com"),
            ),
        ),
        event(
            &format!("evt_{tag}2"),
            "customer.subscription.created",
            t,
            subscription(
                &format!("sub_{tag}"),
                &format!("cus_{tag}"),
                "active",
                &format!("prod_{tag}"),
            ),
        ),
    ]
}

fn product(id: &str, roles: &str) -> Value {
    json!({"id": id, "object": "product", "livemode": false, "name": "Pro", "metadata": {"roles": roles}})
}

/// The host: its `users` table (in the mirror's database) kept by the hook, and every
/// change the hook was given.
#[derive(Clone)]
struct Host {
    url: String,
    calls: Arc<Mutex<Vec<AccessChange>>>,
    failing: Arc<Mutex<bool>>,
}

impl Host {
    /// The host's `users` table (created once per database) with these users in it.
    fn new(config: &Config, users: &[&str]) -> Host {
        common::execute_sql(
            &config.database_url,
            "CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, plan TEXT, role TEXT)",
        );
        for user in users {
            common::execute_sql(
                &config.database_url,
                &format!("INSERT INTO users (id) VALUES ('{user}')"),
            );
        }
        Host {
            url: config.database_url.clone(),
            calls: Arc::default(),
            failing: Arc::default(),
        }
    }

    fn webhooks(&self) -> Webhooks {
        Webhooks::new()
            .with_state(self.clone())
            .on_access_change(|change: AccessChange, _m: Mirror, host: Host| async move {
                host.calls.lock().unwrap().push(change.clone());
                if *host.failing.lock().unwrap() {
                    return Err("users table is locked".into());
                }
                // Keep `users` in step: the plan is the product, the role the first role.
                let after = &change.after;
                let quote = |v: Option<&String>| v.map_or("NULL".to_owned(), |v| format!("'{v}'"));
                let plan = quote(after.products.first().filter(|_| after.valid));
                let role = quote(after.roles.first().filter(|_| after.valid));
                let sql = format!(
                    "UPDATE users SET plan = {plan}, role = {role} WHERE id = '{}'",
                    change.subscriber
                );
                let url = host.url.clone();
                tokio::task::spawn_blocking(move || common::execute_sql(&url, &sql)).await?;
                Ok(())
            })
            .into()
    }

    fn calls(&self) -> Vec<AccessChange> {
        self.calls.lock().unwrap().clone()
    }

    fn row(&self, user: &str) -> String {
        common::query_text(
            &self.url,
            &format!(
                "SELECT COALESCE(plan, '-') || '/' || COALESCE(role, '-') AS t FROM users WHERE id = '{user}'"
            ),
        )
    }
}

async fn deliver(webhooks: &Webhooks, mirror: &Mirror, event: &Value) -> Outcome {
    webhooks.receive(mirror, post(event)).await.outcome
}

#[tokio::test]
async fn a_subscription_before_its_customer_is_told_when_the_customer_arrives() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-1"]);
        let webhooks = host.webhooks();
        let t = 1_700_000_100;
        assert_eq!(
            deliver(
                &webhooks,
                &mirror,
                &event("evt_p", "product.created", t, product("prod_pro", "pro"))
            )
            .await,
            Outcome::Processed
        );
        assert_eq!(
            deliver(
                &webhooks,
                &mirror,
                &event(
                    "evt_s",
                    "customer.subscription.created",
                    t + 1,
                    subscription("sub_1", "cus_1", "active", "prod_pro")
                )
            )
            .await,
            Outcome::Processed
        );
        // No customer yet: nobody to tell.
        assert!(host.calls().is_empty(), "{}", b.name);
        assert_eq!(
            deliver(
                &webhooks,
                &mirror,
                &event(
                    "evt_c",
                    "customer.created",
                    t + 2,
                    customer("cus_1", Some("user-1"), "a@example.com")
                )
            )
            .await,
            Outcome::Processed
        );
        let calls = host.calls();
        assert_eq!(calls.len(), 1, "{}: {calls:?}", b.name);
        let change = &calls[0];
        assert_eq!(change.subscriber, "user-1");
        assert!(change.granted());
        assert!(!change.before.valid && change.before.products.is_empty());
        assert_eq!(change.after.subscription.as_deref(), Some("sub_1"));
        assert_eq!(
            change
                .after
                .status
                .as_ref()
                .map(|s| s.to_string())
                .as_deref(),
            Some("active")
        );
        assert_eq!(change.after.products, vec!["prod_pro"]);
        assert_eq!(change.after.roles, vec!["pro"]);
        assert_eq!(host.row("user-1"), "prod_pro/pro", "{}", b.name);
        // The mirror agrees with what was told.
        assert_eq!(access_of(&mirror, "user-1").await.unwrap(), change.after);
    }
}

#[tokio::test]
async fn every_order_of_customer_and_subscription_events_ends_with_the_final_access_told() {
    let t = 1_700_000_100;
    let events = [
        event(
            "evt_c",
            "customer.created",
            t,
            customer("cus_1", Some("user-1"), "a@example.com"),
        ),
        event(
            "evt_s1",
            "customer.subscription.created",
            t,
            subscription("sub_1", "cus_1", "incomplete", "prod_pro"),
        ),
        event(
            "evt_s2",
            "customer.subscription.updated",
            t + 5,
            subscription("sub_1", "cus_1", "active", "prod_pro"),
        ),
    ];
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for b in backends() {
        for (n, order) in orders.iter().enumerate() {
            // A fresh database per order: a fresh mode-less prefix for ids instead.
            let config = config(&b);
            let mirror = Mirror::connect(config.clone()).await.unwrap();
            let user = format!("user-{n}");
            let host = Host::new(&config, &[user.as_str()]);
            let webhooks = host.webhooks();
            for i in order {
                let mut e = events[*i].clone();
                rename(&mut e, n);
                assert_eq!(
                    deliver(&webhooks, &mirror, &e).await,
                    Outcome::Processed,
                    "{} {order:?}",
                    b.name
                );
            }
            let calls: Vec<AccessChange> = host.calls();
            let last = calls
                .last()
                .unwrap_or_else(|| panic!("{} {order:?}: never told", b.name));
            assert!(last.after.valid, "{} {order:?}: {calls:?}", b.name);
            assert_eq!(last.after.products, vec!["prod_pro"]);
            assert_eq!(
                last.after.status.as_ref().map(|s| s.to_string()).as_deref(),
                Some("active")
            );
            // Each call tells a real change, and what one call ends with the next begins with.
            for pair in calls.windows(2) {
                assert_eq!(pair[0].after, pair[1].before, "{} {order:?}", b.name);
            }
            assert!(calls.iter().all(|c| c.before != c.after));
            assert_eq!(host.row(&user), "prod_pro/-", "{} {order:?}", b.name);
            assert_eq!(access_of(&mirror, &user).await.unwrap(), last.after);
        }
    }
}

/// Gives the events of order `n` their own ids (one database serves every order).
fn rename(event: &mut Value, n: usize) {
    let text = event
        .to_string()
        .replace("user-1", &format!("user-{n}"))
        .replace("cus_1", &format!("cus_{n}x"))
        .replace("sub_1", &format!("sub_{n}x"))
        .replace("evt_", &format!("evt_{n}x"));
    *event = serde_json::from_str(&text).unwrap();
}

#[tokio::test]
async fn a_customer_linked_later_by_checkout_is_told_and_a_deletion_revokes() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-2"]);
        let webhooks = host.webhooks();
        let t = 1_700_000_100;
        deliver(
            &webhooks,
            &mirror,
            &event(
                "evt_c",
                "customer.created",
                t,
                customer("cus_2", None, "b@example.com"),
            ),
        )
        .await;
        deliver(
            &webhooks,
            &mirror,
            &event(
                "evt_s",
                "customer.subscription.created",
                t,
                subscription("sub_2", "cus_2", "active", "prod_basic"),
            ),
        )
        .await;
        assert!(host.calls().is_empty(), "{}: no subscriber yet", b.name);
        let session = json!({"id": "cs_1", "object": "checkout.session", "livemode": false, "mode": "subscription",
            "status": "complete", "customer": "cus_2", "subscription": "sub_2", "client_reference_id": "user-2",
            "metadata": {"stripe_mirror_subscriber": "user-2"}});
        assert_eq!(
            deliver(
                &webhooks,
                &mirror,
                &event("evt_cs", "checkout.session.completed", t + 1, session)
            )
            .await,
            Outcome::Processed
        );
        let calls = host.calls();
        assert_eq!(calls.len(), 1, "{}: {calls:?}", b.name);
        assert!(calls[0].granted());
        assert_eq!(host.row("user-2"), "prod_basic/-");
        // Canceled: access revoked, the host's plan cleared.
        let mut canceled = subscription("sub_2", "cus_2", "canceled", "prod_basic");
        canceled["ended_at"] = json!(t + 10);
        assert_eq!(
            deliver(
                &webhooks,
                &mirror,
                &event("evt_d", "customer.subscription.deleted", t + 10, canceled)
            )
            .await,
            Outcome::Processed
        );
        let calls = host.calls();
        assert_eq!(calls.len(), 2, "{}: {calls:?}", b.name);
        assert!(calls[1].revoked());
        assert_eq!(
            calls[1]
                .after
                .status
                .as_ref()
                .map(|s| s.to_string())
                .as_deref(),
            Some("canceled")
        );
        assert!(calls[1].after.products.is_empty());
        assert_eq!(host.row("user-2"), "-/-", "{}", b.name);
    }
}

#[tokio::test]
async fn nothing_is_told_when_access_did_not_change() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-3"]);
        let webhooks = host.webhooks();
        let t = 1_700_000_100;
        let created = event(
            "evt_c",
            "customer.created",
            t,
            customer("cus_3", Some("user-3"), "c@example.com"),
        );
        deliver(&webhooks, &mirror, &created).await;
        deliver(
            &webhooks,
            &mirror,
            &event(
                "evt_s",
                "customer.subscription.created",
                t,
                subscription("sub_3", "cus_3", "active", "prod_pro"),
            ),
        )
        .await;
        assert_eq!(host.calls().len(), 1, "{}", b.name);
        // An email update, a redelivery, a forced replay, a product edit that keeps its roles.
        let mut updated = event(
            "evt_u",
            "customer.updated",
            t + 5,
            customer("cus_3", Some("user-3"), "new@example.com"),
        );
        updated["data"]["previous_attributes"] = json!({"email": "c@example.com"});
        assert_eq!(
            deliver(&webhooks, &mirror, &updated).await,
            Outcome::Processed
        );
        assert_eq!(
            deliver(&webhooks, &mirror, &created).await,
            Outcome::Duplicate
        );
        let replay = EventFilter {
            ids: vec!["evt_c".into(), "evt_s".into(), "evt_u".into()],
            ..Default::default()
        };
        let report = webhooks.process_events(&mirror, &replay).await.unwrap();
        assert_eq!(report.processed, 3, "{}: {report:?}", b.name);
        deliver(
            &webhooks,
            &mirror,
            &event("evt_p", "product.updated", t + 6, product("prod_pro", "")),
        )
        .await;
        let swept = webhooks.deliver_access_changes(&mirror).await.unwrap();
        assert_eq!(swept.told, 0, "{}: {swept:?}", b.name);
        assert_eq!(host.calls().len(), 1, "{}: {:?}", b.name, host.calls());
        assert_eq!(
            common::query_count(
                &config.database_url,
                "SELECT COUNT(*) AS n FROM stripe_access WHERE dirty = TRUE"
            ),
            0
        );
    }
}

/// Two deliveries for one subscriber at once, the hook slow (800 ms, as a call to a
/// mail or CRM API can be): the delivery that finds the subscriber being told by the
/// other waits for it (up to 3 s), and both succeed; the hook ends told the final state.
#[tokio::test]
async fn a_delivery_waits_while_another_tells_the_same_subscriber() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let told: Arc<Mutex<Vec<AccessChange>>> = Arc::default();
        let webhooks: Webhooks = Webhooks::new()
            .with_state(told.clone())
            .on_access_change(
                |change: AccessChange, _m: Mirror, told: Arc<Mutex<Vec<AccessChange>>>| async move {
                    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
                    told.lock().unwrap().push(change);
                    Ok(())
                },
            )
            .into();
        let t = 1_700_000_100;
        let created = event(
            "evt_w1",
            "customer.created",
            t,
            customer("cus_w", Some("user-w"), "w@example.com"),
        );
        let subscribed = event(
            "evt_w2",
            "customer.subscription.created",
            t + 1,
            subscription("sub_w", "cus_w", "active", "prod_pro"),
        );
        let (first, second) = tokio::join!(
            webhooks.receive(&mirror, post(&created)),
            webhooks.receive(&mirror, post(&subscribed)),
        );
        assert_eq!(
            (first.outcome, second.outcome),
            (Outcome::Processed, Outcome::Processed),
            "{}: {:?} / {:?}",
            b.name,
            first.error,
            second.error
        );
        let told = told.lock().unwrap().clone();
        let last = told.last().expect("the hook was told");
        assert!(
            last.after.valid && last.after.products == ["prod_pro"],
            "{}: {told:?}",
            b.name
        );
    }
}

#[tokio::test]
async fn a_failing_hook_fails_the_event_and_is_told_again_on_redelivery_and_replay() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-4", "user-5"]);
        let webhooks = host.webhooks();
        let t = 1_700_000_100;
        deliver(
            &webhooks,
            &mirror,
            &event(
                "evt_c",
                "customer.created",
                t,
                customer("cus_4", Some("user-4"), "d@example.com"),
            ),
        )
        .await;
        *host.failing.lock().unwrap() = true;
        let sub = event(
            "evt_s",
            "customer.subscription.created",
            t,
            subscription("sub_4", "cus_4", "active", "prod_pro"),
        );
        let answer = webhooks.receive(&mirror, post(&sub)).await;
        assert_eq!(
            (answer.status, answer.outcome),
            (500, Outcome::HandlerFailed),
            "{}",
            b.name
        );
        assert!(answer.error.unwrap().contains("users table is locked"));
        let log = common::query_text(
            &config.database_url,
            "SELECT handlers AS t FROM stripe_events WHERE id = 'evt_s'",
        );
        assert!(
            log.contains("access:test:user-4") && log.contains("users table is locked"),
            "{}: {log}",
            b.name
        );
        assert_eq!(host.row("user-4"), "-/-");
        // Stripe redelivers once the host's table is back: told again, and only once more.
        *host.failing.lock().unwrap() = false;
        assert_eq!(
            deliver(&webhooks, &mirror, &sub).await,
            Outcome::Processed,
            "{}",
            b.name
        );
        assert_eq!(host.calls().len(), 2);
        assert_eq!(host.row("user-4"), "prod_pro/-");
        assert_eq!(deliver(&webhooks, &mirror, &sub).await, Outcome::Duplicate);
        assert_eq!(host.calls().len(), 2);

        // The same through a replay of the failed events.
        deliver(
            &webhooks,
            &mirror,
            &event(
                "evt_c5",
                "customer.created",
                t,
                customer("cus_5", Some("user-5"), "e@example.com"),
            ),
        )
        .await;
        *host.failing.lock().unwrap() = true;
        let sub5 = event(
            "evt_s5",
            "customer.subscription.created",
            t,
            subscription("sub_5", "cus_5", "trialing", "prod_pro"),
        );
        assert_eq!(
            deliver(&webhooks, &mirror, &sub5).await,
            Outcome::HandlerFailed
        );
        *host.failing.lock().unwrap() = false;
        let report = webhooks
            .process_events(
                &mirror,
                &EventFilter {
                    failed: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(report.processed, 1, "{}: {report:?}", b.name);
        assert_eq!(host.row("user-5"), "prod_pro/-");
        let last = host.calls().pop().unwrap();
        assert_eq!((last.subscriber.as_str(), last.granted()), ("user-5", true));
    }
}

#[tokio::test]
async fn changes_made_by_syncs_and_the_cli_are_told_by_deliver_access_changes() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-6"]);
        let webhooks = host.webhooks();
        // A registry without the hook (the CLI's) applies an event: the change is kept.
        let cli = Webhooks::new();
        let t = 1_700_000_100;
        assert_eq!(
            deliver(
                &cli,
                &mirror,
                &event(
                    "evt_c",
                    "customer.created",
                    t,
                    customer("cus_6", Some("user-6"), "f@example.com")
                )
            )
            .await,
            Outcome::Processed
        );
        Subscription::sync_from_stripe_data(
            &mirror,
            &subscription("sub_6", "cus_6", "active", "prod_team"),
        )
        .await
        .unwrap();
        assert!(host.calls().is_empty());
        let report = webhooks.deliver_access_changes(&mirror).await.unwrap();
        assert_eq!(
            (report.told, report.failed.len()),
            (1, 0),
            "{}: {report:?}",
            b.name
        );
        assert_eq!(host.row("user-6"), "prod_team/-");
        let again = webhooks.deliver_access_changes(&mirror).await.unwrap();
        assert_eq!((again.told, again.unchanged), (0, 0), "{}", b.name);
        // A product's roles change: its subscribers are told.
        deliver(
            &webhooks,
            &mirror,
            &event(
                "evt_p",
                "product.updated",
                t + 1,
                product("prod_team", "admin,team"),
            ),
        )
        .await;
        let report = webhooks.deliver_access_changes(&mirror).await.unwrap();
        assert_eq!(report.told, 1, "{}: {report:?}", b.name);
        assert_eq!(
            host.calls().last().unwrap().after.roles,
            vec!["admin", "team"]
        );
        assert_eq!(host.row("user-6"), "prod_team/admin");
        // Without a hook there is nothing to deliver to: a clear error.
        let err = cli.deliver_access_changes(&mirror).await.unwrap_err();
        assert!(err.to_string().contains("on_access_change"), "{err}");
    }
}

#[tokio::test]
async fn deliver_access_changes_reaches_every_subscriber_when_many_keep_failing() {
    use stripe_mirror::Customer;
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        // 1,001 subscribers with a change untold: more than one page of 1,000.
        for i in 0..1001 {
            Customer::sync_from_stripe_data(
                &mirror,
                &customer(
                    &format!("cus_m{i:04}"),
                    Some(&format!("user-{i:04}")),
                    "m@example.com",
                ),
            )
            .await
            .unwrap();
            Subscription::sync_from_stripe_data(
                &mirror,
                &subscription(
                    &format!("sub_m{i:04}"),
                    &format!("cus_m{i:04}"),
                    "active",
                    "prod_pro",
                ),
            )
            .await
            .unwrap();
        }
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        // The host cannot take the first 1,000 (say, users it deleted): they keep failing.
        let webhooks = Webhooks::new().on_access_change(move |change: AccessChange, _m: Mirror| {
            let t = t.clone();
            async move {
                if change.subscriber.as_str() < "user-1000" {
                    return Err("no such user".into());
                }
                t.lock().unwrap().push(change.subscriber);
                Ok(())
            }
        });
        let report = webhooks.deliver_access_changes(&mirror).await.unwrap();
        assert_eq!((report.told, report.failed.len()), (1, 1000), "{}", b.name);
        assert_eq!(*told.lock().unwrap(), vec!["user-1000".to_owned()]);
        // The failing ones stay due for the next call.
        assert_eq!(
            common::query_count(
                &config.database_url,
                "SELECT COUNT(*) AS n FROM stripe_access WHERE dirty = TRUE"
            ),
            1000
        );
    }
}

/// A backfill (`sync_all`) marks the subscriber of every customer and subscription it
/// wrote (once per page, in one statement, not per object), so the hook is then told
/// of each: two customers of one page, a subscription on a later page, and a customer
/// without a subscriber (nobody to tell).
#[tokio::test]
async fn a_backfill_marks_each_subscriber_it_changed_for_the_hook() {
    let list = |data: Vec<Value>| json!({"object": "list", "has_more": false, "data": data});
    let (base, _) = common::stripe_stub(vec![
        (
            "/v1/customers",
            200,
            list(vec![
                customer("cus_b1", Some("user-b1"), "b1@example.com"),
                customer("cus_b2", Some("user-b2"), "b2@example.com"),
                customer("cus_b3", None, "b3@example.com"),
            ]),
        ),
        (
            "/v1/subscriptions",
            200,
            list(vec![subscription(
                "sub_b1",
                "cus_b1",
                "active",
                "prod_team",
            )]),
        ),
    ])
    .await;
    for b in backends() {
        let mut config = config(&b);
        config.api_base = Some(base.clone());
        config.secret_key = Some(Secret::new("sk_test_backfill0000000000abcd"));
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-b1", "user-b2"]);
        let dirty = || {
            common::query_count(
                &config.database_url,
                "SELECT COUNT(*) AS n FROM stripe_access WHERE dirty = TRUE",
            )
        };
        let backfill = |kind: &'static str| {
            let mirror = mirror.clone();
            async move {
                stripe_mirror::sync_all(
                    &mirror,
                    &stripe_mirror::SyncOptions::default().objects(&[kind]),
                    |_| {},
                )
                .await
                .unwrap()
                .counts[kind]
            }
        };
        assert_eq!(backfill("customer").await, 3, "{}", b.name);
        assert_eq!(dirty(), 2, "{}: user-b1 and user-b2 marked", b.name);
        let told = host
            .webhooks()
            .deliver_access_changes(&mirror)
            .await
            .unwrap();
        assert_eq!((told.told, told.unchanged), (0, 2), "{}: {told:?}", b.name);
        assert_eq!(dirty(), 0, "{}", b.name);
        // The subscriptions' page marks the subscriber of each one's customer.
        assert_eq!(backfill("subscription").await, 1, "{}", b.name);
        assert_eq!(dirty(), 1, "{}: user-b1 marked", b.name);
        let told = host
            .webhooks()
            .deliver_access_changes(&mirror)
            .await
            .unwrap();
        assert_eq!(
            (told.told, told.failed.len()),
            (1, 0),
            "{}: {told:?}",
            b.name
        );
        assert_eq!(host.row("user-b1"), "prod_team/-", "{}", b.name);
        assert_eq!(host.row("user-b2"), "-/-", "{}", b.name);
        // A later backfill finds cus_b1 moved to another subscriber: the one it left is
        // marked too (read with the page's other customers before the page), and told
        // its access is gone.
        let (moved, _) = common::stripe_stub(vec![(
            "/v1/customers",
            200,
            list(vec![
                customer("cus_b2", Some("user-b2"), "b2@example.com"),
                customer("cus_b1", Some("user-b9"), "b1@example.com"),
                customer("cus_b3", Some("user-b3"), "b3@example.com"),
                customer("cus_b4", Some("user-b4"), "b4@example.com"),
            ]),
        )])
        .await;
        let mut later = config.clone();
        later.api_base = Some(moved);
        let later = Mirror::connect(later).await.unwrap();
        // A fetch of a later second than the first backfill's.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let next_second = 1_000 - u64::from(now.subsec_millis());
        tokio::time::sleep(std::time::Duration::from_millis(next_second + 50)).await;
        let counted = stripe_mirror::sync_all(
            &later,
            &stripe_mirror::SyncOptions::default().objects(&["customer"]),
            |_| {},
        )
        .await
        .unwrap()
        .counts["customer"];
        assert_eq!(counted, 4, "{}", b.name);
        assert_eq!(
            dirty(),
            5,
            "{}: user-b1 (left), user-b9 (joined), user-b2 (rewritten), user-b3 (a \
             customer without a subscriber gained one) and user-b4 (new) marked",
            b.name
        );
        host.webhooks()
            .deliver_access_changes(&later)
            .await
            .unwrap();
        assert_eq!(
            host.row("user-b1"),
            "-/-",
            "{}: user-b1 still has access",
            b.name
        );
    }
}

/// A host handler that keeps failing (a mail server down) fails the event, but the
/// access change is told all the same, once: a user's access does not wait for
/// Stripe's redeliveries of an event whose other work fails.
#[tokio::test]
async fn a_failing_handler_does_not_hold_back_the_access_change() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-m"]);
        let webhooks = host.webhooks().on(
            "customer.subscription.created",
            |_e: Event, _m: Mirror| async { Err("mail server down".into()) },
        );
        let t = 1_700_000_100;
        let customer = customer("cus_m", Some("user-m"), "m@example.com");
        deliver(
            &webhooks,
            &mirror,
            &event("evt_cm", "customer.created", t, customer),
        )
        .await;
        let sub = event(
            "evt_sm",
            "customer.subscription.created",
            t,
            subscription("sub_m", "cus_m", "active", "prod_pro"),
        );
        for _ in 0..2 {
            let answer = webhooks.receive(&mirror, post(&sub)).await;
            assert_eq!(answer.status, 500, "{}", b.name);
            assert!(
                answer.error.unwrap().contains("mail server down"),
                "{}",
                b.name
            );
        }
        let granted: Vec<AccessChange> =
            host.calls().into_iter().filter(|c| c.after.valid).collect();
        assert_eq!(granted.len(), 1, "{}: {granted:?}", b.name);
        assert_eq!(host.row("user-m"), "prod_pro/-", "{}", b.name);
    }
}

/// A hook's own error that reads like a timeout ("query timed out after 5s") is a
/// failure like any other: the subscriber is not held as after a hook cut off at its
/// limit, so Stripe's redelivery tells it at once.
#[tokio::test]
async fn a_hook_error_that_mentions_a_timeout_does_not_hold_the_subscriber() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let calls = Arc::new(Mutex::new(0));
        let webhooks = Webhooks::new().on_access_change({
            let calls = calls.clone();
            move |_change: AccessChange, _m: Mirror| {
                let calls = calls.clone();
                async move {
                    let mut calls = calls.lock().unwrap();
                    *calls += 1;
                    match *calls {
                        1 => Err("query timed out after 5s".into()),
                        _ => Ok(()),
                    }
                }
            }
        });
        let t = 1_700_000_100;
        let customer = customer("cus_t", Some("user-t"), "t@example.com");
        deliver(
            &webhooks,
            &mirror,
            &event("evt_ct", "customer.created", t, customer),
        )
        .await;
        let sub = event(
            "evt_st",
            "customer.subscription.created",
            t,
            subscription("sub_t", "cus_t", "active", "prod_pro"),
        );
        assert_eq!(webhooks.receive(&mirror, post(&sub)).await.status, 500);
        let again = webhooks.receive(&mirror, post(&sub)).await;
        assert_eq!(again.status, 200, "{}: {:?}", b.name, again.error);
        assert_eq!(*calls.lock().unwrap(), 2, "{}", b.name);
    }
}

/// A handler timeout shorter than the margin kept for the end of an event's claim still
/// lets a quick hook run: only the claim's end stops a hook from starting.
#[tokio::test]
async fn a_short_handler_timeout_still_tells_a_quick_hook() {
    for b in backends() {
        let mut config = config(&b);
        config.webhook_handler_timeout = std::time::Duration::from_millis(50);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let calls: Arc<Mutex<Vec<AccessChange>>> = Arc::default();
        let seen = calls.clone();
        let webhooks = Webhooks::new().on_access_change(move |change: AccessChange, _m: Mirror| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(change);
                Ok(())
            }
        });
        let t = 1_700_000_100;
        for (id, kind, object) in [
            ("evt_sp", "product.created", product("prod_pro", "pro")),
            (
                "evt_sc",
                "customer.created",
                customer("cus_s", Some("user-s"), "s@example.com"),
            ),
            (
                "evt_ss",
                "customer.subscription.created",
                subscription("sub_s", "cus_s", "active", "prod_pro"),
            ),
        ] {
            let outcome = deliver(&webhooks, &mirror, &event(id, kind, t, object)).await;
            assert_eq!(outcome, Outcome::Processed, "{}: {id}", b.name);
        }
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 1, "{}: {calls:?}", b.name);
        assert!(calls[0].granted(), "{}", b.name);
    }
}

/// `deliver_access_change` tells one subscriber's change made outside a delivery (as
/// the success page's `sync_session` makes), and leaves the others due for
/// `deliver_access_changes`.
#[tokio::test]
async fn deliver_access_change_tells_one_subscriber_only() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-a", "user-b"]);
        let webhooks = host.webhooks();
        for (c, user, sub) in [("cus_a", "user-a", "sub_a"), ("cus_b", "user-b", "sub_b")] {
            Customer::sync_from_stripe_data(&mirror, &customer(c, Some(user), "x@example.com"))
                .await
                .unwrap();
            Subscription::sync_from_stripe_data(
                &mirror,
                &subscription(sub, c, "active", "prod_team"),
            )
            .await
            .unwrap();
        }
        assert!(host.calls().is_empty());
        let one = webhooks
            .deliver_access_change(&mirror, "user-a")
            .await
            .unwrap();
        assert_eq!((one.told, one.failed.len()), (1, 0), "{}: {one:?}", b.name);
        let calls = host.calls();
        assert_eq!(calls.len(), 1, "{}", b.name);
        assert_eq!(calls[0].subscriber, "user-a");
        assert_eq!(host.row("user-a"), "prod_team/-", "{}", b.name);
        assert_eq!(host.row("user-b"), "-/-", "{}: not told yet", b.name);
        let again = webhooks
            .deliver_access_change(&mirror, "user-a")
            .await
            .unwrap();
        assert_eq!(again.told, 0, "{}: nothing new", b.name);
        let rest = webhooks.deliver_access_changes(&mirror).await.unwrap();
        assert_eq!(rest.told, 1, "{}: {rest:?}", b.name);
        assert_eq!(host.row("user-b"), "prod_team/-", "{}", b.name);
    }
}

/// One database for both modes: a test-mode event reaching the live app (a test
/// endpoint's secret among its signing secrets) changes nothing the live gate reads, so
/// the live app's hook is not told, not by the delivery nor by
/// `deliver_access_changes`; the test-mode app on the same database tells it.
#[tokio::test]
async fn the_hook_is_told_changes_of_its_own_mode_only() {
    for b in backends() {
        let mut live = config(&b);
        live.live_mode = true;
        let live_mirror = Mirror::connect(live.clone()).await.unwrap();
        let host = Host::new(&live, &["user-m"]);
        let webhooks = host.webhooks();
        let t = 1_700_000_100;
        for event in signup("m", t) {
            let outcome = deliver(&webhooks, &live_mirror, &event).await;
            assert_eq!(outcome, Outcome::Processed, "{}", b.name);
        }
        let report = webhooks.deliver_access_changes(&live_mirror).await.unwrap();
        assert_eq!((report.told, report.unchanged), (0, 0), "{}", b.name);
        assert!(host.calls().is_empty(), "{}: {:?}", b.name, host.calls());
        assert_eq!(host.row("user-m"), "-/-", "{}", b.name);

        // The test-mode app on the same database tells its own change.
        let test_mirror = Mirror::connect(config(&b)).await.unwrap();
        let report = webhooks.deliver_access_changes(&test_mirror).await.unwrap();
        assert_eq!(report.told, 1, "{}", b.name);
        let calls = host.calls();
        assert_eq!(calls.len(), 1, "{}", b.name);
        assert!(
            !calls[0].livemode && calls[0].after.valid,
            "{}: {:?}",
            b.name,
            calls[0]
        );
        assert_eq!(host.row("user-m"), "prod_m/-", "{}", b.name);
    }
}

/// A subscriber of one mode left untold in an event's log (its app's hook failed) is
/// that app's to tell: the other mode's app, replaying the failed event from the same
/// database, does not tell its own hook of it (a live `users` table would get a test
/// plan) nor take it off the log; the test-mode app's replay tells it.
#[tokio::test]
async fn an_untold_subscriber_of_the_other_mode_is_left_to_its_app() {
    for b in backends() {
        let test_config = config(&b);
        let test_mirror = Mirror::connect(test_config.clone()).await.unwrap();
        let test_host = Host::new(&test_config, &["user-o"]);
        let test_webhooks = test_host.webhooks();
        let t = 1_700_000_100;
        *test_host.failing.lock().unwrap() = true;
        for event in signup("o", t) {
            deliver(&test_webhooks, &test_mirror, &event).await;
        }
        // The subscription's event left the subscriber untold.
        assert_eq!(
            common::query_count(
                &test_config.database_url,
                "SELECT COUNT(*) AS n FROM stripe_events WHERE id = 'evt_o2' AND status = 'failed'",
            ),
            1,
            "{}",
            b.name
        );

        // The live app on the same database replays what failed.
        let mut live = test_config.clone();
        live.live_mode = true;
        let live_mirror = Mirror::connect(live.clone()).await.unwrap();
        let live_host = Host {
            url: live.database_url.clone(),
            calls: Arc::default(),
            failing: Arc::default(),
        };
        let live_webhooks = live_host.webhooks();
        let failed = EventFilter {
            failed: true,
            ..EventFilter::default()
        };
        let report = live_webhooks
            .process_events(&live_mirror, &failed)
            .await
            .unwrap();
        assert!(
            live_host.calls().is_empty(),
            "{}: {:?}",
            b.name,
            live_host.calls()
        );
        assert_eq!(
            (report.processed, report.handlers_pending),
            (0, 1),
            "{}: left for the test-mode app: {report:?}",
            b.name
        );

        // The test-mode app, its hook mended, tells it.
        *test_host.failing.lock().unwrap() = false;
        let report = test_webhooks
            .process_events(&test_mirror, &failed)
            .await
            .unwrap();
        assert!(report.failed.is_empty(), "{}: {report:?}", b.name);
        assert_eq!(report.processed, 1, "{}: {report:?}", b.name);
        let last = test_host.calls().pop().expect("told");
        assert!(
            !last.livemode && last.subscriber == "user-o" && last.after.valid,
            "{}: {last:?}",
            b.name
        );
        assert_eq!(test_host.row("user-o"), "prod_o/-", "{}", b.name);
    }
}

/// The object in the other mode's form: `livemode` true.
fn live(mut object: Value) -> Value {
    object["livemode"] = json!(true);
    object
}

/// An event whose mode is its object's.
fn event_of_mode(id: &str, kind: &str, at: i64, object: Value) -> Value {
    let mut e = event(id, kind, at, object.clone());
    e["livemode"] = object["livemode"].clone();
    e
}

/// `user-test` and `user-live`, each subscribed to `product` in its own mode, with no
/// subscriber left marked.
async fn subscribers_in_both_modes(
    b: &common::Backend,
    webhooks: &Webhooks,
    mirror: &Mirror,
    product: &str,
) {
    let objects = [
        (
            "customer.created",
            customer("cus_bt", Some("user-test"), "t@example.com"),
        ),
        (
            "customer.subscription.created",
            subscription("sub_bt", "cus_bt", "active", product),
        ),
        (
            "customer.created",
            live(customer("cus_bl", Some("user-live"), "l@example.com")),
        ),
        (
            "customer.subscription.created",
            live(subscription("sub_bl", "cus_bl", "active", product)),
        ),
    ];
    for (n, (kind, object)) in objects.into_iter().enumerate() {
        let e = event_of_mode(&format!("evt_b{n}"), kind, 1_700_000_100, object);
        assert_eq!(
            deliver(webhooks, mirror, &e).await,
            Outcome::Processed,
            "{}",
            b.name
        );
    }
    common::execute_sql(
        &b.config.database_url,
        "UPDATE stripe_access SET dirty = FALSE",
    );
}

/// How many subscribers of each mode are marked: (test, live).
fn marked_by_mode(b: &common::Backend) -> (i64, i64) {
    let count = |live: &str| {
        common::query_count(
            &b.config.database_url,
            &format!(
                "SELECT COUNT(*) AS n FROM stripe_access WHERE dirty = TRUE AND livemode = {live}"
            ),
        )
    };
    (count("FALSE"), count("TRUE"))
}

/// A product id such as `pro` may name a product in each mode. A test-mode change to
/// its roles marks the test-mode subscribers only: the live ones' access did not
/// change, and the live app would otherwise recompute each of them for nothing.
#[tokio::test]
async fn a_product_change_marks_the_subscribers_of_its_own_mode_only() {
    for b in backends() {
        let mirror = Mirror::connect(config(&b)).await.unwrap();
        let webhooks = Webhooks::new();
        subscribers_in_both_modes(&b, &webhooks, &mirror, "prod_both").await;
        let roles = event(
            "evt_b4",
            "product.updated",
            1_700_000_101,
            product("prod_both", "admin"),
        );
        assert_eq!(
            deliver(&webhooks, &mirror, &roles).await,
            Outcome::Processed,
            "{}",
            b.name
        );
        assert_eq!(
            marked_by_mode(&b),
            (1, 0),
            "{}: the test-mode subscriber only",
            b.name
        );
    }
}

/// One product id holds one row: a write of the other mode under the same id moves
/// what it grants from one mode's subscribers to the other's, so both are marked, even
/// when its roles stay the same.
#[tokio::test]
async fn a_product_moving_to_the_other_mode_marks_both_modes() {
    for b in backends() {
        let mirror = Mirror::connect(config(&b)).await.unwrap();
        let webhooks = Webhooks::new();
        subscribers_in_both_modes(&b, &webhooks, &mirror, "prod_flip").await;
        // Live first; then the same roles written by the test mode (the live subscriber
        // loses them, the test one gains them); back to live, both again; the same
        // roles in the same mode, nobody.
        let steps = [
            (live(product("prod_flip", "admin")), (0, 1)),
            (product("prod_flip", "admin"), (1, 1)),
            (live(product("prod_flip", "admin")), (1, 1)),
            (live(product("prod_flip", "admin")), (0, 0)),
        ];
        for (n, (object, marked)) in steps.into_iter().enumerate() {
            common::execute_sql(
                &b.config.database_url,
                "UPDATE stripe_access SET dirty = FALSE",
            );
            let at = 1_700_000_101 + n as i64;
            let e = event_of_mode(&format!("evt_mf{n}"), "product.updated", at, object);
            assert_eq!(
                deliver(&webhooks, &mirror, &e).await,
                Outcome::Processed,
                "{}",
                b.name
            );
            assert_eq!(marked_by_mode(&b), marked, "{}: step {n}", b.name);
        }
    }
}

/// Pausing payment collection keeps the subscription `active` and valid, but the hook is
/// told (a host that stops serving what it does not bill copies it), and told again
/// when collection resumes.
#[tokio::test]
async fn a_paused_collection_is_told_to_the_hook() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-pause"]);
        let webhooks = host.webhooks();
        let t = 1_700_000_100;
        let c = customer("cus_pause", Some("user-pause"), "p@example.com");
        deliver(
            &webhooks,
            &mirror,
            &event("evt_pc", "customer.created", t, c),
        )
        .await;
        let mut sub = subscription("sub_pause", "cus_pause", "active", "prod_pro");
        deliver(
            &webhooks,
            &mirror,
            &event("evt_ps", "customer.subscription.created", t, sub.clone()),
        )
        .await;
        sub["pause_collection"] = json!({"behavior": "void", "resumes_at": null});
        let mut paused = event(
            "evt_pp",
            "customer.subscription.updated",
            t + 5,
            sub.clone(),
        );
        paused["data"]["previous_attributes"] = json!({"pause_collection": null});
        deliver(&webhooks, &mirror, &paused).await;
        sub["pause_collection"] = Value::Null;
        let mut resumed = event("evt_pr", "customer.subscription.updated", t + 9, sub);
        resumed["data"]["previous_attributes"] =
            json!({"pause_collection": {"behavior": "void", "resumes_at": null}});
        deliver(&webhooks, &mirror, &resumed).await;
        let told: Vec<(bool, bool)> = host
            .calls()
            .iter()
            .map(|c| (c.after.valid, c.after.collection_paused))
            .collect();
        assert_eq!(
            told,
            vec![(true, false), (true, true), (true, false)],
            "{}",
            b.name
        );
        assert!(
            !access_of(&mirror, "user-pause")
                .await
                .unwrap()
                .collection_paused
        );
    }
}

/// A customer linked to a user by the key in its Stripe metadata is unlinked when the
/// key is removed there (to move it to another user, or to end the user's access):
/// the user is told they lost access. One a Checkout linked (no key in Stripe) stays
/// linked through the same kind of update.
#[tokio::test]
async fn removing_the_metadata_key_in_stripe_unlinks_the_customer() {
    for b in backends() {
        let config = config(&b);
        let mirror = Mirror::connect(config.clone()).await.unwrap();
        let host = Host::new(&config, &["user-k"]);
        let webhooks = host.webhooks();
        let t = 1_700_000_100;
        for event in signup("k", t) {
            let outcome = deliver(&webhooks, &mirror, &event).await;
            assert_eq!(outcome, Outcome::Processed, "{}", b.name);
        }
        assert_eq!(host.row("user-k"), "prod_k/-", "{}", b.name);

        // The key removed in the Dashboard: Stripe's next customer.updated lacks it.
        let unlinked = event(
            "evt_k3",
            "customer.updated",
            t + 5,
            customer("cus_k", None, "k@example.com"),
        );
        assert_eq!(
            deliver(&webhooks, &mirror, &unlinked).await,
            Outcome::Processed,
            "{}",
            b.name
        );
        let row = Customer::get(&mirror, "cus_k").await.unwrap().unwrap();
        assert_eq!(row.subscriber_id, None, "{}: still linked", b.name);
        assert_eq!(
            host.row("user-k"),
            "-/-",
            "{}: the user kept access",
            b.name
        );
        let last = host.calls().last().cloned().unwrap();
        assert!(!last.after.valid, "{}: {last:?}", b.name);
        // The key set to "" (how the API removes one; some fakes keep it): no link to
        // an empty subscriber id either.
        let emptied = event(
            "evt_k4",
            "customer.updated",
            t + 6,
            customer("cus_k", Some(""), "k@example.com"),
        );
        assert_eq!(
            deliver(&webhooks, &mirror, &emptied).await,
            Outcome::Processed,
            "{}",
            b.name
        );
        let row = Customer::get(&mirror, "cus_k").await.unwrap().unwrap();
        assert_eq!(row.subscriber_id, None, "{}: linked to \"\"", b.name);
        // An old Checkout session naming the user (replayed by `reconcile`, a new
        // event): the metadata alone links this customer now, and it holds no key.
        let old_session = json!({"id": "cs_old", "object": "checkout.session", "customer": "cus_k",
            "client_reference_id": "user-k", "mode": "subscription", "livemode": false});
        let replayed = event("evt_k5", "checkout.session.completed", t + 7, old_session);
        assert_eq!(
            deliver(&webhooks, &mirror, &replayed).await,
            Outcome::Processed,
            "{}",
            b.name
        );
        let row = Customer::get(&mirror, "cus_k").await.unwrap().unwrap();
        assert_eq!(
            row.subscriber_id, None,
            "{}: linked again by an old session",
            b.name
        );

        // A Checkout's link (no key in Stripe) survives an update without the key.
        let session = json!({"id": "cs_k", "object": "checkout.session", "customer": "cus_c",
            "client_reference_id": "user-c", "mode": "subscription", "livemode": false});
        for (id, kind, created, object) in [
            (
                "evt_c1",
                "customer.created",
                t,
                customer("cus_c", None, "c@example.com"),
            ),
            ("evt_c2", "checkout.session.completed", t + 1, session),
            (
                "evt_c3",
                "customer.updated",
                t + 5,
                customer("cus_c", None, "c2@example.com"),
            ),
        ] {
            let outcome = deliver(&webhooks, &mirror, &event(id, kind, created, object)).await;
            assert_eq!(outcome, Outcome::Processed, "{}: {id}", b.name);
        }
        let row = Customer::get(&mirror, "cus_c").await.unwrap().unwrap();
        assert_eq!(row.subscriber_id.as_deref(), Some("user-c"), "{}", b.name);
        assert_eq!(row.email.as_deref(), Some("c2@example.com"), "{}", b.name);
    }
}
