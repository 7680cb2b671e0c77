//! Handlers run at least once and, once they succeed, never again: recorded per
//! handler and event, replayed exactly where they failed (never by the CLI, which has
//! no host handlers), bounded by a timeout, and finished only by the claim holder.
//! Every test runs on SQLite and Postgres.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::backends;
use serde_json::{Value, json};
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{EventFilter, HandlerError, Outcome};
use stripe_mirror::{Config, Event, Mirror, Secret, WebhookRequest, Webhooks};

const SECRET: &str = "whsec_test_handlers";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn config(b: &common::Backend) -> Config {
    let mut config = b.config.clone();
    config.webhook_secrets = vec![Secret::new(SECRET)];
    config
}

fn product_event(id: &str) -> Value {
    json!({"id": id, "object": "event", "type": "product.created", "created": now(), "livemode": false,
           "data": {"object": {"id": format!("prod_{id}"), "object": "product", "name": "P"}}})
}

fn post(v: &Value) -> WebhookRequest {
    post_at(v, now())
}

/// Signed at `t`: what a host whose clock reads `t` sees as fresh.
fn post_at(v: &Value, t: i64) -> WebhookRequest {
    let body = v.to_string().into_bytes();
    let header = sign(&body, &Secret::new(SECRET), t);
    WebhookRequest::new(body).header("Stripe-Signature", header)
}

/// An event's stored status and handler log.
fn stored(config: &Config, id: &str) -> (String, Value) {
    let read = |col: &str| {
        common::query_text(
            &config.database_url,
            &format!("SELECT {col} AS t FROM stripe_events WHERE id = '{id}'"),
        )
    };
    (
        read("status"),
        serde_json::from_str(&read("handlers")).unwrap(),
    )
}

/// A handler counting its runs, failing while `failing` is set.
fn counting(
    runs: &Arc<AtomicUsize>,
    failing: &Arc<AtomicUsize>,
) -> impl Fn(
    Event,
    Mirror,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), HandlerError>> + Send>>
+ Send
+ Sync
+ 'static {
    let (runs, failing) = (runs.clone(), failing.clone());
    move |_e, _m| {
        let (runs, failing) = (runs.clone(), failing.clone());
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if failing.load(Ordering::SeqCst) > 0 {
                return Err("mailer down".into());
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_handler_that_succeeded_never_runs_again_for_the_event() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let (first, second) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (never, broken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(1)));
        let webhooks = Webhooks::new()
            .on("product.created", counting(&first, &never))
            .on("product.*", counting(&second, &broken));
        let ev = product_event("evt_once");
        let r = webhooks.receive(&m, post(&ev)).await;
        assert_eq!(
            (r.status, r.outcome),
            (500, Outcome::HandlerFailed),
            "{}",
            b.name
        );
        let (status, log) = stored(m.config(), "evt_once");
        assert_eq!(status, "failed", "{}", b.name);
        assert_eq!(log["product.created#1"], "ok", "{}: {log}", b.name);
        assert!(
            log["product.*#1"].as_str().unwrap().contains("mailer down"),
            "{}: {log}",
            b.name
        );

        // Stripe redelivers: only the failed handler runs again.
        assert_eq!(webhooks.receive(&m, post(&ev)).await.status, 500);
        assert_eq!(
            (first.load(Ordering::SeqCst), second.load(Ordering::SeqCst)),
            (1, 2),
            "{}",
            b.name
        );

        // Fixed, then replayed: again only the failed one.
        broken.store(0, Ordering::SeqCst);
        let filter = EventFilter {
            failed: true,
            ..Default::default()
        };
        let report = webhooks.process_events(&m, &filter).await.unwrap();
        assert_eq!(
            (report.processed, report.failed.len()),
            (1, 0),
            "{}: {report:?}",
            b.name
        );
        assert_eq!(
            (first.load(Ordering::SeqCst), second.load(Ordering::SeqCst)),
            (1, 3),
            "{}",
            b.name
        );
        assert_eq!(stored(m.config(), "evt_once").0, "processed", "{}", b.name);
        // A redelivery and a forced replay by id run nothing.
        assert_eq!(
            webhooks.receive(&m, post(&ev)).await.outcome,
            Outcome::Duplicate
        );
        let by_id = EventFilter {
            ids: vec!["evt_once".into()],
            ..Default::default()
        };
        webhooks.process_events(&m, &by_id).await.unwrap();
        assert_eq!(
            (first.load(Ordering::SeqCst), second.load(Ordering::SeqCst)),
            (1, 3),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn a_replay_without_the_hosts_handlers_leaves_their_work_pending() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let (runs, broken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(1)));
        let host = Webhooks::new().on("product.created", counting(&runs, &broken));
        let ev = product_event("evt_cli");
        assert_eq!(host.receive(&m, post(&ev)).await.status, 500);

        // The CLI (`stripe-mirror process-events`) replays with no handlers at all.
        let cli = Webhooks::new();
        let filter = EventFilter {
            failed: true,
            ..Default::default()
        };
        let report = cli.process_events(&m, &filter).await.unwrap();
        assert_eq!(
            (report.processed, report.handlers_pending),
            (0, 1),
            "{}: {report:?}",
            b.name
        );
        let (status, log) = stored(m.config(), "evt_cli");
        assert_eq!(
            status, "failed",
            "{}: handler work is not marked done",
            b.name
        );
        assert_ne!(log["product.created#1"], "ok", "{}", b.name);

        // Stripe's redelivery is not a "duplicate": the host's handler runs, once.
        broken.store(0, Ordering::SeqCst);
        let r = host.receive(&m, post(&ev)).await;
        assert_eq!(
            (r.status, r.outcome),
            (200, Outcome::Processed),
            "{}",
            b.name
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{}", b.name);
        assert_eq!(stored(m.config(), "evt_cli").0, "processed", "{}", b.name);
    }
}

/// Two versions of the app on one database (a rolling deploy: the old one lacks the
/// new handler; or `stripe-mirror serve` beside the host app): the handler fails on
/// the app that has it, and Stripe's redelivery lands on the one without it. That
/// answer must not be a 200, or Stripe stops redelivering and the handler never runs
/// again by itself. Once the app that has it succeeds, every copy answers 200.
#[tokio::test]
async fn a_redelivery_to_an_app_without_the_failed_handler_is_not_a_200() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let (runs, broken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(1)));
        let (other_runs, never) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let new_version = Webhooks::new().on("product.created", counting(&runs, &broken));
        let ev = product_event("evt_roll");
        assert_eq!(new_version.receive(&m, post(&ev)).await.status, 500);

        // No handler at all (the CLI's `serve`), and another handler of its own.
        let bare = Webhooks::new();
        let old_version = Webhooks::new().on("product.*", counting(&other_runs, &never));
        for (name, app) in [("no handler", &bare), ("another handler", &old_version)] {
            let r = app.receive(&m, post(&ev)).await;
            assert_eq!(
                (r.status, r.outcome),
                (500, Outcome::HandlerFailed),
                "{}: {name}: {:?}",
                b.name,
                r.error
            );
            assert!(
                r.error
                    .as_deref()
                    .unwrap_or("")
                    .contains("product.created#1"),
                "{}: {name}: {:?}",
                b.name,
                r.error
            );
            assert_eq!(stored(m.config(), "evt_roll").0, "failed", "{}", b.name);
        }
        assert_eq!(other_runs.load(Ordering::SeqCst), 1, "{}", b.name);
        let outcome = common::query_text(
            &m.config().database_url,
            "SELECT outcome AS t FROM stripe_webhook_deliveries WHERE event_id = 'evt_roll' \
             ORDER BY id DESC LIMIT 1",
        );
        assert_eq!(outcome, "handler_failed", "{}: the delivery log", b.name);

        // The app that has the handler succeeds: done everywhere.
        broken.store(0, Ordering::SeqCst);
        assert_eq!(new_version.receive(&m, post(&ev)).await.status, 200);
        let r = bare.receive(&m, post(&ev)).await;
        assert_eq!(
            (r.status, r.outcome),
            (200, Outcome::Duplicate),
            "{}",
            b.name
        );
        assert_eq!(stored(m.config(), "evt_roll").0, "processed", "{}", b.name);

        // Past an hour after the event (a handler removed for good, renumbered): the
        // redelivery is a 200, the event stays failed for a replay.
        let mut old = product_event("evt_old");
        old["created"] = json!(now() - 7_200);
        let (old_runs, old_broken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(1)));
        let had_it = Webhooks::new().on("product.created", counting(&old_runs, &old_broken));
        assert_eq!(had_it.receive(&m, post(&old)).await.status, 500);
        let r = bare.receive(&m, post(&old)).await;
        assert_eq!(
            (r.status, r.outcome),
            (200, Outcome::Processed),
            "{}",
            b.name
        );
        assert_eq!(stored(m.config(), "evt_old").0, "failed", "{}", b.name);

        // The same when this app still has a fetch to make for the event (a Checkout's
        // subscription, its sync not applied yet, as after a version whose mapping
        // failed): the fetch is made, and the answer is still not a 200.
        let session = json!({"id": "evt_cs", "object": "event", "type": "checkout.session.completed",
            "created": now(), "livemode": false, "data": {"object": {"id": "cs_roll",
            "object": "checkout.session", "mode": "subscription", "customer": "cus_roll",
            "subscription": "sub_roll", "client_reference_id": "user-roll"}}});
        let (cs_runs, cs_broken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(1)));
        let with_handler =
            Webhooks::new().on("checkout.session.completed", counting(&cs_runs, &cs_broken));
        assert_eq!(with_handler.receive(&m, post(&session)).await.status, 500);
        common::execute_sql(
            &m.config().database_url,
            "UPDATE stripe_events SET synced = FALSE WHERE id = 'evt_cs'",
        );
        let r = bare.receive(&m, post(&session)).await;
        assert_eq!(
            (r.status, r.outcome),
            (500, Outcome::HandlerFailed),
            "{}: {:?}",
            b.name,
            r.error
        );
        let outcome = common::query_text(
            &m.config().database_url,
            "SELECT outcome AS t FROM stripe_webhook_deliveries WHERE event_id = 'evt_cs' \
             ORDER BY id DESC LIMIT 1",
        );
        assert_eq!(outcome, "handler_failed", "{}: the delivery log", b.name);
    }
}

/// A handler cut off by its timeout may still be at work (on a thread it handed work
/// to): the event fails, but stays claimed until its lease ends, so a redelivery meanwhile
/// is answered 409 and does not run the handler a second time beside the first.
#[tokio::test]
async fn a_handler_past_its_timeout_fails_the_event_and_keeps_it_claimed_until_the_lease_ends() {
    for b in backends() {
        let config = config(&b)
            .webhook_handler_timeout(Duration::from_millis(300))
            .webhook_claim_lease(Duration::from_secs(3));
        let m = Mirror::connect(config).await.unwrap();
        let (runs, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, f) = (runs.clone(), finished.clone());
        let webhooks = Webhooks::new().on("product.created", move |_e: Event, _m: Mirror| {
            let (r, f) = (r.clone(), f.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                f.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
        let ev = post(&product_event("evt_slow"));
        let r = webhooks.receive(&m, ev.clone()).await;
        assert_eq!(
            (r.status, r.outcome),
            (500, Outcome::HandlerFailed),
            "{}",
            b.name
        );
        assert!(
            r.error.as_deref().unwrap().contains("timed out"),
            "{}: {:?}",
            b.name,
            r.error
        );
        assert_eq!(
            finished.load(Ordering::SeqCst),
            0,
            "{}: the handler was stopped",
            b.name
        );
        assert_eq!(
            stored(m.config(), "evt_slow").0,
            "processing",
            "{}: still claimed",
            b.name
        );
        let again = webhooks.receive(&m, post(&product_event("evt_slow"))).await;
        assert_eq!(
            (again.status, again.outcome),
            (409, Outcome::InProgress),
            "{}",
            b.name
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "{}: not run beside the first",
            b.name
        );
        // Once the lease has ended (kept in whole seconds on the database's clock), the
        // event is Stripe's to redeliver (and a replay's).
        let started = std::time::Instant::now();
        let later = loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let later = webhooks.receive(&m, post(&product_event("evt_slow"))).await;
            if later.status != 409 || started.elapsed() > Duration::from_secs(10) {
                break later;
            }
        };
        assert!(
            started.elapsed() > Duration::from_millis(2000),
            "{}: held for the lease",
            b.name
        );
        assert_eq!(
            (later.status, later.outcome),
            (200, Outcome::Processed),
            "{}: {:?}",
            b.name,
            later.error
        );
        assert_eq!(finished.load(Ordering::SeqCst), 1, "{}", b.name);
        assert_eq!(stored(m.config(), "evt_slow").0, "processed", "{}", b.name);
    }
}

#[tokio::test]
async fn a_worker_whose_claim_was_taken_over_cannot_finish_the_event() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let url = m.config().database_url.clone();
        let release = Arc::new(tokio::sync::Notify::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let (r, n) = (runs.clone(), release.clone());
        let webhooks = Webhooks::new().on("product.created", move |_e: Event, _m: Mirror| {
            let (r, n) = (r.clone(), n.clone());
            async move {
                // The first run stalls (a paused process, a slow mail server) until the
                // event has been taken over.
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    n.notified().await;
                }
                Ok(())
            }
        });
        let ev = product_event("evt_lease");
        let slow = {
            let (w, m, ev) = (webhooks.clone(), m.clone(), ev.clone());
            tokio::spawn(async move { w.receive(&m, post(&ev)).await })
        };
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // While it runs, a claim the redelivery may take: not before its lease ends...
        let early = webhooks.receive(&m, post(&ev)).await;
        assert_eq!(
            (early.status, early.outcome),
            (409, Outcome::InProgress),
            "{}",
            b.name
        );
        // ...and once it has ended (made so by hand, on the database's clock).
        common::execute_sql(
            &url,
            "UPDATE stripe_events SET claimed_at = claimed_at - 1000 WHERE id = 'evt_lease'",
        );
        let took_over = webhooks.receive(&m, post(&ev)).await;
        assert_eq!(
            (took_over.status, took_over.outcome),
            (200, Outcome::Processed),
            "{}",
            b.name
        );
        release.notify_one();
        let lost = slow.await.unwrap();
        assert_eq!(
            (lost.status, lost.outcome),
            (409, Outcome::InProgress),
            "{}: {:?}",
            b.name,
            lost.error
        );
        assert!(
            lost.error.as_deref().unwrap().contains("claim"),
            "{}",
            b.name
        );
        let (status, log) = stored(m.config(), "evt_lease");
        assert_eq!(
            (status.as_str(), &log["product.created#1"]),
            ("processed", &json!("ok")),
            "{}",
            b.name
        );
        let attempts = common::query_count(
            &url,
            "SELECT CAST(attempts AS BIGINT) AS n FROM stripe_events WHERE id = 'evt_lease'",
        );
        assert_eq!(
            attempts, 2,
            "{}: the token moved on with the takeover",
            b.name
        );
    }
}

#[tokio::test]
async fn handlers_never_run_past_the_claim_lease() {
    for b in backends() {
        let config = config(&b)
            .webhook_handler_timeout(Duration::from_secs(30))
            .webhook_claim_lease(Duration::from_secs(1));
        let m = Mirror::connect(config).await.unwrap();
        let webhooks = Webhooks::new().on("product.created", |_e: Event, _m: Mirror| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        });
        let started = std::time::Instant::now();
        let r = webhooks
            .receive(&m, post(&product_event("evt_short_lease")))
            .await;
        assert_eq!(
            (r.status, r.outcome),
            (500, Outcome::HandlerFailed),
            "{}",
            b.name
        );
        assert!(
            r.error.as_deref().unwrap().contains("timed out"),
            "{}: {:?}",
            b.name,
            r.error
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{}: cut at the lease, not the timeout",
            b.name
        );
    }
}

#[tokio::test]
async fn an_event_that_failed_to_mirror_keeps_its_handlers_due_through_a_cli_replay() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let (runs, never) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let host = Webhooks::new().on("customer.updated", counting(&runs, &never));
        let bad = json!({"id": "evt_shape", "object": "event", "type": "customer.updated", "created": now(),
                         "livemode": false, "data": {"object": {"id": "cus_shape", "object": "customer", "email": 42}}});
        assert_eq!(host.receive(&m, post(&bad)).await.status, 400);
        // After a fix, the CLI replays it: its sync may run, the host's handler is still due.
        let report = Webhooks::new()
            .process_events(
                &m,
                &EventFilter {
                    failed: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(report.processed, 0, "{}: {report:?}", b.name);
        let (status, log) = stored(m.config(), "evt_shape");
        assert_eq!(
            (status.as_str(), &log["customer.updated#1"]),
            ("failed", &json!("pending")),
            "{}",
            b.name
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }
}

/// A handler sees how many times processing of its event started
/// ([`Event::attempts`]): 1 on the first delivery, one more on each redelivery and
/// replay, so it can give up or escalate after a few.
#[tokio::test]
async fn a_handler_sees_the_attempt_it_runs_in() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let webhooks = Webhooks::new().on("product.created", {
            let seen = seen.clone();
            move |e: Event, _m: Mirror| {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().unwrap();
                    seen.push(e.attempts);
                    match seen.len() {
                        1 | 2 => Err(HandlerError::from("not yet")),
                        _ => Ok(()),
                    }
                }
            }
        });
        let ev = product_event("evt_attempts");
        assert_eq!(webhooks.receive(&m, post(&ev)).await.status, 500);
        assert_eq!(webhooks.receive(&m, post(&ev)).await.status, 500);
        let failed = EventFilter {
            failed: true,
            ..Default::default()
        };
        let report = webhooks.process_events(&m, &failed).await.unwrap();
        assert_eq!(report.processed, 1, "{}: {report:?}", b.name);
        assert_eq!(*seen.lock().unwrap(), [1, 2, 3], "{}", b.name);
    }
}

/// A claim is stamped on the database's clock in whole seconds, truncated on both
/// backends (Postgres rounded, half a second ahead of the host's clock): read from
/// inside the handler, the claim's start is never after the second it was read in.
#[tokio::test]
async fn a_claim_starts_at_the_database_clocks_whole_second() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let url = m.config().database_url.clone();
        let webhooks = Webhooks::new().on("product.created", {
            let seen = seen.clone();
            move |e: Event, _m: Mirror| {
                let (seen, url) = (seen.clone(), url.clone());
                async move {
                    let started = common::query_count(
                        &url,
                        &format!(
                            "SELECT CAST(claimed_at - 300 AS BIGINT) AS n FROM stripe_events WHERE id = '{}'",
                            e.id
                        ),
                    );
                    seen.lock().unwrap().push((started, now()));
                    Ok(())
                }
            }
        });
        for i in 0..12 {
            let before = now();
            let ev = product_event(&format!("evt_clock_{i}"));
            assert_eq!(webhooks.receive(&m, post(&ev)).await.status, 200);
            let (started, read) = seen.lock().unwrap().pop().unwrap();
            assert!(
                before <= started && started <= read,
                "{}: a claim made between {before} and {read} starts at {started}",
                b.name
            );
            // Spread over the second, so half of them fall in its second half.
            tokio::time::sleep(Duration::from_millis(90)).await;
        }
    }
}

/// A replay of failed events also takes those a killed worker left `processing` once
/// their lease has ended, and pages through any number of events (here more than one
/// page of them), each once, in the order they were created.
#[tokio::test]
async fn a_replay_takes_stuck_events_and_pages_through_many() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicUsize::new(1));
        let webhooks = Webhooks::new().on("product.created", {
            let (order, failing) = (order.clone(), failing.clone());
            move |e: Event, _m: Mirror| {
                let (order, failing) = (order.clone(), failing.clone());
                async move {
                    if failing.load(Ordering::SeqCst) > 0 {
                        return Err(HandlerError::from("not yet"));
                    }
                    order.lock().unwrap().push(e.id);
                    Ok(())
                }
            }
        });
        let t = now();
        let ids: Vec<String> = (0..130).map(|i| format!("evt_page_{i:03}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let mut ev = product_event(id);
            ev["created"] = json!(t - 1000 + i as i64);
            assert_eq!(webhooks.receive(&m, post(&ev)).await.status, 500);
        }
        // A worker killed while it ran the last one: `processing`, its lease over.
        common::execute_sql(
            &m.config().database_url,
            "UPDATE stripe_events SET status = 'processing', claimed_at = 1 WHERE id = 'evt_page_129'",
        );
        failing.store(0, Ordering::SeqCst);
        let failed = EventFilter {
            failed: true,
            ..Default::default()
        };
        let report = webhooks.process_events(&m, &failed).await.unwrap();
        assert_eq!(
            (report.processed, report.failed.len(), report.busy),
            (130, 0, 0),
            "{}: {report:?}",
            b.name
        );
        assert_eq!(*order.lock().unwrap(), ids, "{}", b.name);
        assert_eq!(
            stored(m.config(), "evt_page_129").0,
            "processed",
            "{}",
            b.name
        );
    }
}

/// A test-mode app given the live endpoint's secret too (one URL registered in both
/// modes): a live event is verified, stored and mirrored as a live row, but the host's
/// handlers do not run for it unless the host asks (`handle_other_mode`), nor does a
/// replay run them.
#[tokio::test]
async fn handlers_run_for_the_mirrors_mode_only_unless_asked() {
    for b in backends() {
        let m = Mirror::connect(config(&b)).await.unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let counting = |runs: Arc<AtomicUsize>| {
            move |_e: Event, _m: Mirror| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        };
        let webhooks = Webhooks::new().on("product.*", counting(runs.clone()));
        let mut live = product_event("evt_live_mode");
        live["livemode"] = json!(true);
        let r = webhooks.receive(&m, post(&live)).await;
        assert_eq!(
            (r.status, r.outcome),
            (200, Outcome::Processed),
            "{}: {:?}",
            b.name,
            r.error
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "{}: not run for the other mode",
            b.name
        );
        assert_eq!(
            stored(m.config(), "evt_live_mode").0,
            "processed",
            "{}",
            b.name
        );
        let mirrored = common::query_count(
            &m.config().database_url,
            "SELECT COUNT(*) AS n FROM stripe_products WHERE id = 'prod_evt_live_mode' AND livemode = TRUE",
        );
        assert_eq!(mirrored, 1, "{}: mirrored as a live row", b.name);
        let replay = stripe_mirror::webhooks::EventFilter {
            ids: vec!["evt_live_mode".into()],
            ..Default::default()
        };
        webhooks.process_events(&m, &replay).await.unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "{}: nor by a replay",
            b.name
        );

        // Asked for: the handlers run for both modes.
        let both = Webhooks::new()
            .on("product.*", counting(runs.clone()))
            .handle_other_mode(true);
        let mut live = product_event("evt_live_mode_2");
        live["livemode"] = json!(true);
        assert_eq!(
            both.receive(&m, post(&live)).await.status,
            200,
            "{}",
            b.name
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{}", b.name);
        // And the mirror's own mode, of course.
        assert_eq!(
            webhooks
                .receive(&m, post(&product_event("evt_test_mode")))
                .await
                .status,
            200
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{}", b.name);

        // The same switch on a registry with the app's state.
        let with_state: Webhooks = Webhooks::new()
            .with_state(runs.clone())
            .on(
                "product.*",
                |_e: Event, _m: Mirror, runs: Arc<AtomicUsize>| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .handle_other_mode(true)
            .into();
        let mut live = product_event("evt_live_mode_3");
        live["livemode"] = json!(true);
        assert_eq!(with_state.receive(&m, post(&live)).await.status, 200);
        assert_eq!(runs.load(Ordering::SeqCst), 3, "{}", b.name);
    }
}

/// The handlers ran, then the record of their outcome could not be written (here a
/// lock on the events table past the writers' lock wait, every try): the answer is a
/// 5xx so that Stripe retries, and the delivery's row says what was answered, not
/// "received" with no status (what a crash leaves).
#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_delivery_whose_outcome_cannot_be_recorded_is_logged_with_its_answer() {
    use stripe_mirror::diesel::{self, Connection, RunQueryDsl};
    let mut config = Config::new(common::postgres_url());
    config.webhook_secrets = vec![Secret::new(SECRET)];
    let m = Mirror::connect(config.clone()).await.unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let started_tx = std::sync::Mutex::new(started_tx);
    let go = Arc::new(tokio::sync::Notify::new());
    let handler_go = go.clone();
    let webhooks = Webhooks::new().on("product.created", move |_e: Event, _m: Mirror| {
        started_tx.lock().unwrap().send(()).unwrap();
        let go = handler_go.clone();
        async move {
            go.notified().await;
            Ok(())
        }
    });
    let ev = product_event("evt_unrecorded");
    let receiving = tokio::spawn({
        let (m, webhooks) = (m.clone(), webhooks.clone());
        async move { webhooks.receive(&m, post(&ev)).await }
    });
    tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
        .await
        .unwrap();
    // Another session locks the events table against updates until told.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let url = config.database_url.clone();
    let locker = std::thread::spawn(move || {
        let mut c = diesel::PgConnection::establish(&url).unwrap();
        diesel::sql_query("BEGIN").execute(&mut c).unwrap();
        diesel::sql_query("LOCK TABLE stripe_events IN SHARE MODE")
            .execute(&mut c)
            .unwrap();
        locked_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        diesel::sql_query("ROLLBACK").execute(&mut c).unwrap();
    });
    tokio::task::spawn_blocking(move || locked_rx.recv().unwrap())
        .await
        .unwrap();
    go.notify_one();
    let answer = receiving.await.unwrap();
    release_tx.send(()).unwrap();
    locker.join().unwrap();
    assert!(answer.status >= 500, "{answer:?}");
    let logged = || {
        common::query_text(
            &config.database_url,
            "SELECT COALESCE(CAST(status_code AS TEXT), 'none') || ' ' || outcome AS t \
             FROM stripe_webhook_deliveries WHERE event_id = 'evt_unrecorded'",
        )
    };
    // Recorded in the background for a 503 (the database may be down for a while).
    let want = format!("{} {}", answer.status, answer.outcome.as_str());
    let mut row = logged();
    for _ in 0..100 {
        if row == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        row = logged();
    }
    assert_eq!(row, want, "the delivery's row");
}
