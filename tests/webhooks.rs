//! The webhook pipeline end to end through `Webhooks::receive`: signatures (ours,
//! async-stripe-webhook's and the official Python SDK's), the delivery log,
//! idempotency, ordering, handler order and failures, and the bad-input table.
//! Every test runs on SQLite and Postgres.

mod common;

use std::sync::{Arc, Mutex};

use common::{backends, fixture};
use serde_json::{Value, json};
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{Delivery, EventFilter, Outcome};
use stripe_mirror::{
    Customer, Event, Mirror, Product, Secret, Subscription, WebhookRequest, Webhooks,
};

const SECRET: &str = "whsec_test_0123456789abcdef";

async fn mirror(b: &common::Backend) -> Mirror {
    let mut config = b.config.clone();
    config.webhook_secrets = vec![Secret::new("whsec_rotated_out_old"), Secret::new(SECRET)];
    Mirror::connect(config).await.unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn event(id: &str, event_type: &str, created: i64, object: Value) -> Value {
    json!({"id": id, "object": "event", "type": event_type, "created": created, "livemode": false,
           "api_version": "2026-09-30.clover", "data": {"object": object}})
}

fn signed(body: &[u8]) -> WebhookRequest {
    WebhookRequest::new(body.to_vec())
        .header("Stripe-Signature", sign(body, &Secret::new(SECRET), now()))
        .remote_addr("127.0.0.1:5555")
}

fn post(v: &Value) -> WebhookRequest {
    signed(v.to_string().as_bytes())
}

type Log = Arc<Mutex<Vec<String>>>;

fn recorder(
    log: &Log,
    name: &'static str,
) -> impl Fn(
    Event,
    Mirror,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), stripe_mirror::webhooks::HandlerError>> + Send>,
> + Send
+ Sync
+ 'static {
    let log = log.clone();
    move |e: Event, _m: Mirror| {
        let log = log.clone();
        Box::pin(async move {
            log.lock().unwrap().push(format!("{name}:{}", e.id));
            Ok(())
        })
    }
}

#[tokio::test]
async fn handlers_run_after_sync_exact_before_wildcard() {
    for b in backends() {
        let m = mirror(&b).await;
        let log: Log = Default::default();
        let seen_row = Arc::new(Mutex::new(None));
        let seen = seen_row.clone();
        let webhooks = Webhooks::new()
            .on_any(recorder(&log, "any"))
            .on("customer.*", recorder(&log, "family"))
            .on("customer.subscription.created", recorder(&log, "exact1"))
            .on(
                "customer.subscription.created",
                move |e: Event, m: Mirror| {
                    let seen = seen.clone();
                    async move {
                        // The built-in sync already ran: the row is there.
                        let sub = Subscription::get(&m, e.object()["id"].as_str().unwrap()).await?;
                        *seen.lock().unwrap() = sub.and_then(|s| s.status);
                        let typed: stripe_mirror::types::Subscription = e.object_as()?;
                        assert_eq!(typed.id.as_str(), "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw");
                        Ok(())
                    }
                },
            )
            .on("invoice.paid", recorder(&log, "other"));
        let ev = event(
            "evt_order",
            "customer.subscription.created",
            now(),
            fixture("subscription"),
        );
        let r = webhooks.receive(&m, post(&ev)).await;
        assert_eq!(
            (r.status, r.outcome),
            (200, Outcome::Processed),
            "{}: {:?}",
            b.name,
            r.error
        );
        assert_eq!(
            *log.lock().unwrap(),
            ["exact1:evt_order", "any:evt_order", "family:evt_order"],
            "{}",
            b.name
        );
        assert_eq!(
            seen_row.lock().unwrap().as_ref().map(|s| s.as_str()),
            Some("active"),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn redelivery_runs_nothing_twice() {
    for b in backends() {
        let m = mirror(&b).await;
        let log: Log = Default::default();
        let webhooks = Webhooks::new().on("customer.created", recorder(&log, "h"));
        let ev = event("evt_dup", "customer.created", now(), fixture("customer"));
        assert_eq!(
            webhooks.receive(&m, post(&ev)).await.outcome,
            Outcome::Processed
        );
        let again = webhooks.receive(&m, post(&ev)).await;
        assert_eq!(
            (again.status, again.outcome),
            (200, Outcome::Duplicate),
            "{}",
            b.name
        );
        assert_eq!(log.lock().unwrap().len(), 1, "{}", b.name);
        let deliveries = Delivery::recent(&m, 10).await.unwrap();
        assert_eq!(deliveries.len(), 2, "{}: every delivery is logged", b.name);
        assert_eq!(deliveries[0].outcome, "duplicate");
        assert_eq!(deliveries[1].outcome, "processed");
        assert!(
            deliveries
                .iter()
                .all(|d| d.valid && d.event_id.as_deref() == Some("evt_dup"))
        );
        assert_eq!(deliveries[0].remote_addr.as_deref(), Some("127.0.0.1:5555"));
    }
}

/// Each verified delivery's row says what was answered, whichever way its claim
/// ended: processed, a duplicate, a bad shape, with handlers that succeed or fail. (On
/// Postgres the row is written by the claim's own statement, with the outcome the
/// claim was expected to end in, and corrected after: this checks every correction.)
#[tokio::test]
async fn each_delivery_row_says_what_was_answered() {
    for b in backends() {
        let m = mirror(&b).await;
        let n = b.name;
        let none = Webhooks::new();
        let failing = Webhooks::new().on("product.created", |_e: Event, _m: Mirror| async {
            Err("mail server down".into())
        });
        let log: Log = Default::default();
        let listening = Webhooks::new().on("product.created", recorder(&log, "h"));
        let customer = event("evt_row1", "customer.created", now(), fixture("customer"));
        let bad = event(
            "evt_row2",
            "customer.subscription.updated",
            now(),
            json!({"id": "sub_bad", "object": "subscription", "status": 5, "customer": "cus_1"}),
        );
        let product = |id: &str| {
            event(
                id,
                "product.created",
                now(),
                json!({"id": format!("prod_{id}"), "object": "product", "name": "P"}),
            )
        };
        // On Postgres `none` presumes `Processed` (nothing of it listens); `listening`
        // and `failing` presume `Received` for a product (their handler will run).
        let cases: [(&Webhooks, Value, Outcome); 8] = [
            (&none, customer.clone(), Outcome::Processed),
            (&none, customer.clone(), Outcome::Duplicate),
            (&listening, customer, Outcome::Duplicate),
            (&none, bad, Outcome::InvalidObject),
            (&listening, product("evt_row3"), Outcome::Processed),
            (&listening, product("evt_row3"), Outcome::Duplicate),
            (&failing, product("evt_row4"), Outcome::HandlerFailed),
            // Its handler, registered elsewhere, has not succeeded yet: not a 200.
            (&none, product("evt_row4"), Outcome::HandlerFailed),
        ];
        for (i, (webhooks, ev, outcome)) in cases.into_iter().enumerate() {
            let r = webhooks.receive(&m, post(&ev)).await;
            assert_eq!(r.outcome, outcome, "{n}: case {i}: {:?}", r.error);
            // One row per delivery, not a presumed one and a corrected one.
            let rows = Delivery::recent(&m, 100).await.unwrap();
            assert_eq!(rows.len(), i + 1, "{n}: case {i}");
            let d = &rows[0];
            let row = (
                d.outcome.as_str(),
                d.status_code,
                d.error.is_some(),
                d.body.is_empty(),
                d.valid,
                d.event_id.as_deref(),
                d.remote_addr.as_deref(),
                d.body_truncated,
            );
            let answered = (
                outcome.as_str(),
                Some(r.status as i32),
                r.error.is_some(),
                true,
                true,
                ev["id"].as_str(),
                Some("127.0.0.1:5555"),
                false,
            );
            assert_eq!(row, answered, "{n}: case {i}");
            assert_eq!(d.body_size as usize, ev.to_string().len(), "{n}: case {i}");
            assert!(d.headers.contains("stripe-signature"), "{n}: case {i}");
            assert!((now() - d.received_at).abs() < 60, "{n}: case {i}");
        }
        assert_eq!(log.lock().unwrap().len(), 1, "{n}");
    }
}

#[tokio::test]
async fn concurrent_deliveries_of_one_event_run_each_handler_once() {
    for b in backends() {
        let m = mirror(&b).await;
        let log: Log = Default::default();
        let slow_log = log.clone();
        let webhooks = Webhooks::new().on("product.created", move |e: Event, _m: Mirror| {
            let log = slow_log.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                log.lock().unwrap().push(e.id);
                Ok(())
            }
        });
        let ev = event(
            "evt_race",
            "product.created",
            now(),
            json!({"id": "prod_race", "object": "product", "name": "Race"}),
        );
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (w, m, req) = (webhooks.clone(), m.clone(), post(&ev));
                tokio::spawn(async move { w.receive(&m, req).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap().outcome);
        }
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == Outcome::Processed)
                .count(),
            1,
            "{}: {outcomes:?}",
            b.name
        );
        assert!(
            outcomes.iter().all(|o| matches!(
                o,
                Outcome::Processed | Outcome::Duplicate | Outcome::InProgress
            )),
            "{outcomes:?}"
        );
        assert_eq!(log.lock().unwrap().len(), 1, "{}", b.name);
        assert_eq!(
            Product::get(&m, "prod_race")
                .await
                .unwrap()
                .unwrap()
                .name
                .as_deref(),
            Some("Race")
        );
    }
}

#[tokio::test]
async fn older_events_never_overwrite_newer_data_in_any_order() {
    for b in backends() {
        let m = mirror(&b).await;
        let webhooks = Webhooks::new();
        let t = now();
        let versions: Vec<Value> = (0..4)
            .map(|i| {
                event(&format!("evt_o{i}"), "customer.updated", t - 100 + i * 10,
                      json!({"id": "cus_order", "object": "customer", "email": format!("v{i}@example.com")}))
            })
            .collect();
        for i in [2, 0, 3, 1] {
            assert_eq!(webhooks.receive(&m, post(&versions[i])).await.status, 200);
        }
        let c = Customer::get(&m, "cus_order").await.unwrap().unwrap();
        assert_eq!(c.email.as_deref(), Some("v3@example.com"), "{}", b.name);
        // A delete, then a late update: the tombstone stays.
        let del = event(
            "evt_del",
            "customer.deleted",
            t,
            json!({"id": "cus_order", "object": "customer", "email": "v3@example.com"}),
        );
        assert_eq!(webhooks.receive(&m, post(&del)).await.status, 200);
        let late = event(
            "evt_late",
            "customer.updated",
            t + 50,
            json!({"id": "cus_order", "object": "customer", "email": "zombie@example.com"}),
        );
        assert_eq!(webhooks.receive(&m, post(&late)).await.status, 200);
        let c = Customer::get(&m, "cus_order").await.unwrap().unwrap();
        assert!(
            c.deleted && c.email.as_deref() == Some("v3@example.com"),
            "{}: {c:?}",
            b.name
        );
    }
}

#[tokio::test]
async fn subscription_deleted_cancels_and_checkout_links_the_subscriber() {
    for b in backends() {
        let m = mirror(&b).await;
        let webhooks = Webhooks::new();
        let t = now();
        // Checkout completes before the customer arrives.
        let session = json!({"id": "cs_1", "object": "checkout.session", "customer": "cus_ck", "client_reference_id": "user-7",
                             "subscription": "sub_ck", "mode": "subscription"});
        assert_eq!(
            webhooks
                .receive(
                    &m,
                    post(&event("evt_ck", "checkout.session.completed", t, session))
                )
                .await
                .status,
            200
        );
        // A session with an empty customer links nothing and is processed (it once
        // failed mapping a placeholder after the sync had written).
        let empty = json!({"id": "cs_0", "object": "checkout.session", "customer": "", "client_reference_id": "user-0",
                           "mode": "payment"});
        let r = webhooks
            .receive(
                &m,
                post(&event("evt_ck0", "checkout.session.completed", t, empty)),
            )
            .await;
        assert_eq!(
            (r.status, r.outcome),
            (200, Outcome::Processed),
            "{}: {r:?}",
            b.name
        );
        assert!(
            Customer::by_subscriber(&m, "user-0")
                .await
                .unwrap()
                .is_none()
        );
        let cust = json!({"id": "cus_ck", "object": "customer", "email": "u7@example.com", "metadata": {}});
        assert_eq!(
            webhooks
                .receive(&m, post(&event("evt_ckc", "customer.created", t - 5, cust)))
                .await
                .status,
            200
        );
        let c = Customer::by_subscriber(&m, "user-7")
            .await
            .unwrap()
            .expect("linked");
        assert_eq!(
            c.email.as_deref(),
            Some("u7@example.com"),
            "{}: real data replaced the placeholder",
            b.name
        );

        let mut sub = fixture("subscription");
        sub["id"] = json!("sub_ck");
        sub["customer"] = json!("cus_ck");
        assert_eq!(
            webhooks
                .receive(
                    &m,
                    post(&event(
                        "evt_s1",
                        "customer.subscription.created",
                        t,
                        sub.clone()
                    ))
                )
                .await
                .status,
            200
        );
        sub["status"] = json!("canceled");
        assert_eq!(
            webhooks
                .receive(
                    &m,
                    post(&event(
                        "evt_s2",
                        "customer.subscription.deleted",
                        t + 1,
                        sub
                    ))
                )
                .await
                .status,
            200
        );
        let s = Subscription::get(&m, "sub_ck").await.unwrap().unwrap();
        assert_eq!(
            s.status.as_ref().map(|s| s.as_str()),
            Some("canceled"),
            "{}",
            b.name
        );
        assert!(c.subscription(&m).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn failing_and_panicking_handlers_leave_the_event_failed_until_replayed() {
    for b in backends() {
        let m = mirror(&b).await;
        let fail = Arc::new(Mutex::new(true));
        let runs: Log = Default::default();
        let (f, r) = (fail.clone(), runs.clone());
        let webhooks = Webhooks::new()
            .on("product.created", move |e: Event, _m: Mirror| {
                let (f, r) = (f.clone(), r.clone());
                async move {
                    r.lock().unwrap().push(e.id.clone());
                    if *f.lock().unwrap() {
                        return Err("mail server down".into());
                    }
                    Ok(())
                }
            })
            .on("product.updated", |_e: Event, _m: Mirror| async {
                panic!("bug in handler")
            });
        let created = event(
            "evt_f1",
            "product.created",
            now(),
            json!({"id": "prod_f", "object": "product", "name": "F"}),
        );
        let r = webhooks.receive(&m, post(&created)).await;
        assert_eq!(
            (r.status, r.outcome),
            (500, Outcome::HandlerFailed),
            "{}",
            b.name
        );
        assert!(r.error.unwrap().contains("mail server down"));
        // The built-in sync committed regardless: the mirror is true.
        assert!(Product::get(&m, "prod_f").await.unwrap().is_some());

        let updated = event(
            "evt_f2",
            "product.updated",
            now(),
            json!({"id": "prod_f", "object": "product", "name": "G"}),
        );
        let r = webhooks.receive(&m, post(&updated)).await;
        assert_eq!(
            (r.status, r.outcome),
            (500, Outcome::HandlerFailed),
            "{}",
            b.name
        );
        assert!(r.error.unwrap().contains("bug in handler"));

        // Stripe redelivers: the handler runs again (at least once), still failing.
        assert_eq!(webhooks.receive(&m, post(&created)).await.status, 500);
        assert_eq!(runs.lock().unwrap().len(), 2);

        *fail.lock().unwrap() = false;
        let report = webhooks
            .process_events(
                &m,
                &EventFilter {
                    failed: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(report.processed, 1, "{}: {report:?}", b.name);
        assert_eq!(
            report.failed.len(),
            1,
            "{}: the panicking one fails again",
            b.name
        );
        assert_eq!(report.failed[0].0, "evt_f2");
        assert_eq!(runs.lock().unwrap().len(), 3);
        // Now processed: a redelivery runs nothing.
        assert_eq!(
            webhooks.receive(&m, post(&created)).await.outcome,
            Outcome::Duplicate
        );
        // Replay by id or type claims even a processed event, but a handler that
        // succeeded never runs again for it.
        let by_id = webhooks
            .process_events(
                &m,
                &EventFilter {
                    ids: vec!["evt_f1".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(by_id.processed, 1);
        let by_type = webhooks
            .process_events(
                &m,
                &EventFilter {
                    event_type: Some("product.cr*".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!((by_type.processed, by_type.failed.len()), (1, 0));
        assert_eq!(runs.lock().unwrap().len(), 3);
    }
}

#[tokio::test]
async fn bad_input_table() {
    for b in backends() {
        let mut config = b.config.clone().webhook_body_limit(64 * 1024);
        config.webhook_secrets = vec![Secret::new("whsec_rotated_out_old"), Secret::new(SECRET)];
        let m = Mirror::connect(config).await.unwrap();
        let n = b.name;
        let log: Log = Default::default();
        let webhooks = Webhooks::new().on_any(recorder(&log, "any"));
        let good = event(
            "evt_good",
            "customer.created",
            now(),
            json!({"id": "cus_bad", "object": "customer"}),
        )
        .to_string();
        let key = Secret::new(SECRET);
        let huge_metadata: serde_json::Map<String, Value> = (0..50)
            .map(|i| (format!("key{i}"), json!("x".repeat(500))))
            .collect();
        let cases: Vec<(&str, WebhookRequest, u16, Outcome)> = vec![
            (
                "no signature header",
                WebhookRequest::new(good.clone()),
                400,
                Outcome::InvalidSignature,
            ),
            (
                "malformed header",
                WebhookRequest::new(good.clone()).header("stripe-signature", "garbage"),
                400,
                Outcome::InvalidSignature,
            ),
            (
                "wrong secret",
                WebhookRequest::new(good.clone()).header(
                    "Stripe-Signature",
                    sign(good.as_bytes(), &Secret::new("whsec_wrong"), now()),
                ),
                400,
                Outcome::InvalidSignature,
            ),
            (
                "timestamp outside tolerance",
                WebhookRequest::new(good.clone())
                    .header("Stripe-Signature", sign(good.as_bytes(), &key, now() - 301)),
                400,
                Outcome::InvalidSignature,
            ),
            (
                "body altered after signing",
                WebhookRequest::new(good.replace("cus_bad", "cus_evil"))
                    .header("Stripe-Signature", sign(good.as_bytes(), &key, now())),
                400,
                Outcome::InvalidSignature,
            ),
            (
                "unsigned body of 20 KiB",
                WebhookRequest::new(vec![b'x'; 20 * 1024]),
                400,
                Outcome::InvalidSignature,
            ),
            ("not JSON", signed(b"hello"), 400, Outcome::Malformed),
            (
                "JSON without id or type",
                signed(br#"{"object":"event"}"#),
                400,
                Outcome::Malformed,
            ),
            ("JSON array", signed(b"[1,2]"), 400, Outcome::Malformed),
            (
                "non-UTF-8 bytes",
                signed(&[0xff, 0xfe, b'{', 0x80]),
                400,
                Outcome::Malformed,
            ),
            (
                "body over the cap",
                signed(&vec![b' '; 64 * 1024 + 1]),
                413,
                Outcome::TooLarge,
            ),
            (
                "unknown event type",
                post(&event(
                    "evt_unknown",
                    "brand_new.thing_happened",
                    now(),
                    json!({"id": "x_1", "object": "thing"}),
                )),
                200,
                Outcome::Processed,
            ),
            (
                "known type, unexpected object shape",
                post(&event(
                    "evt_shape",
                    "customer.subscription.updated",
                    now(),
                    json!({"id": "sub_bad", "object": "subscription", "status": 5, "customer": "cus_1"}),
                )),
                400,
                Outcome::InvalidObject,
            ),
            (
                "old API version payload",
                post(&event(
                    "evt_old",
                    "customer.subscription.created",
                    now(),
                    common::local_fixture("legacy_subscription.json"),
                )),
                200,
                Outcome::Processed,
            ),
            (
                "huge metadata",
                post(&event(
                    "evt_huge",
                    "customer.updated",
                    now(),
                    json!({"id": "cus_huge", "object": "customer", "metadata": huge_metadata}),
                )),
                200,
                Outcome::Processed,
            ),
        ];
        let count = cases.len();
        for (name, request, status, outcome) in cases {
            let body = request.body.clone();
            let r = webhooks.receive(&m, request).await;
            assert_eq!(
                (r.status, r.outcome),
                (status, outcome),
                "{n}: {name}: {:?}",
                r.error
            );
            let d = &Delivery::recent(&m, 1).await.unwrap()[0];
            assert_eq!(d.outcome, outcome.as_str(), "{n}: {name}");
            assert_eq!(d.status_code, Some(status as i32), "{n}: {name}");
            assert_eq!(d.body_size as usize, body.len(), "{n}: {name}");
            // Refused deliveries keep 4 KiB of their body; a verified event's body is
            // stored once, as the event's data.
            let refused = matches!(
                outcome,
                Outcome::InvalidSignature | Outcome::Malformed | Outcome::TooLarge
            );
            let kept = if refused {
                stripe_mirror::webhooks::delivery::REFUSED_BODY_LOG_LIMIT
            } else {
                0
            };
            assert_eq!(
                d.body,
                body[..body.len().min(kept)],
                "{n}: {name}: body kept up to {kept} bytes"
            );
            assert_eq!(
                d.body_truncated,
                refused && body.len() > kept,
                "{n}: {name}"
            );
            if status != 200 {
                assert!(
                    d.error.as_deref().is_some_and(|e| !e.is_empty()),
                    "{n}: {name}: error recorded"
                );
            }
        }
        assert_eq!(
            Delivery::recent(&m, 100).await.unwrap().len(),
            count,
            "{n}: nothing dropped"
        );
        assert!(
            Customer::get(&m, "cus_bad").await.unwrap().is_none(),
            "{n}: nothing applied from bad requests"
        );
        assert!(Customer::get(&m, "cus_huge").await.unwrap().is_some());
        assert!(
            Subscription::get(&m, "sub_legacy01")
                .await
                .unwrap()
                .is_some_and(|s| s.current_period_end == Some(4102444800))
        );
        // Handlers saw only the valid, mapped events.
        assert_eq!(
            log.lock().unwrap().len(),
            3,
            "{n}: {:?}",
            log.lock().unwrap()
        );
        // The bad-shape event is stored as failed, so a replay can retry it after a fix.
        let report = webhooks
            .process_events(
                &m,
                &EventFilter {
                    failed: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(report.failed.len(), 1, "{n}: {report:?}");
        assert!(report.failed[0].1.contains("status"), "{n}: {report:?}");
    }
}

#[tokio::test]
async fn async_stripe_webhook_headers_verify() {
    let b = &backends()[0];
    let m = mirror(b).await;
    let body = event(
        "evt_as",
        "product.created",
        now(),
        json!({"id": "prod_as", "object": "product"}),
    )
    .to_string();
    let header = stripe_webhook::Webhook::generate_test_header(&body, SECRET, None);
    let r = Webhooks::new()
        .receive(
            &m,
            WebhookRequest::new(body.clone()).header("Stripe-Signature", header),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Processed, "{:?}", r.error);
    // And async-stripe accepts ours (on Stripe's own example event, which it can parse).
    let body = fixture("event").to_string();
    let ours = sign(body.as_bytes(), &Secret::new(SECRET), now());
    let parsed = stripe_webhook::Webhook::construct_event(&body, &ours, SECRET);
    assert!(parsed.is_ok(), "{:?}", parsed.err());
    let forged = sign(body.as_bytes(), &Secret::new("whsec_other"), now());
    assert!(stripe_webhook::Webhook::construct_event(&body, &forged, SECRET).is_err());
}

/// The official Stripe Python SDK (pinned in scripts/test.sh) signs and verifies
/// like we do.
#[tokio::test]
#[ignore = "needs the Stripe Python SDK: run scripts/test.sh"]
async fn official_stripe_sdk_agrees() {
    let python = common::peer("STRIPE_MIRROR_TEST_PYTHON");
    let body = event(
        "evt_py",
        "product.created",
        now(),
        json!({"id": "prod_py", "object": "product"}),
    )
    .to_string();
    let t = now();
    let script = r#"
import sys, stripe
body, secret, t, ours = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
stripe.Webhook.construct_event(body, ours, secret, tolerance=300)
print("t=%d,v1=%s" % (t, stripe.WebhookSignature._compute_signature("%d.%s" % (t, body), secret)))
"#;
    let ours = sign(body.as_bytes(), &Secret::new(SECRET), t);
    let out = std::process::Command::new(python)
        .args(["-c", script, &body, SECRET, &t.to_string(), &ours])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the SDK refused our signature: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(theirs, ours, "same scheme, same signature");
    let b = &backends()[0];
    let m = mirror(b).await;
    let r = Webhooks::new()
        .receive(
            &m,
            WebhookRequest::new(body).header("Stripe-Signature", theirs),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Processed, "{:?}", r.error);
}

#[tokio::test]
#[cfg(feature = "postgres")]
async fn database_outage_is_503_and_recovers() {
    use diesel::{Connection, RunQueryDsl};
    let url = common::postgres_url();
    let db = common::database_name(&url).to_owned();
    let mut config = stripe_mirror::Config::new(url);
    config.webhook_secrets = vec![Secret::new(SECRET)];
    config.connection_timeout = std::time::Duration::from_millis(500);
    let m = Mirror::connect(config).await.unwrap();
    let admin = std::env::var("STRIPE_MIRROR_TEST_POSTGRES").unwrap();
    let mut conn = diesel::PgConnection::establish(&admin).unwrap();
    let mut sql = |q: String| diesel::sql_query(q).execute(&mut conn).unwrap();
    sql(format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"));
    sql(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
    ));

    let log: Log = Default::default();
    let webhooks = Webhooks::new().on_any(recorder(&log, "h"));
    let ev = event(
        "evt_outage",
        "product.created",
        now(),
        json!({"id": "prod_outage", "object": "product"}),
    );
    let r = webhooks.receive(&m, post(&ev)).await;
    assert_eq!((r.status, r.outcome), (503, Outcome::Unavailable), "{r:?}");
    assert!(
        log.lock().unwrap().is_empty(),
        "no handler ran without the database"
    );

    sql(format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"));
    let r = webhooks.receive(&m, post(&ev)).await;
    assert_eq!((r.status, r.outcome), (200, Outcome::Processed), "{r:?}");
    assert!(Product::get(&m, "prod_outage").await.unwrap().is_some());
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn events_no_handler_listens_to_are_finished_with_their_sync() {
    for b in backends() {
        let m = mirror(&b).await;
        // A handler for another type only: product events take the one-round-trip path.
        let log: Log = Default::default();
        let webhooks = Webhooks::new().on("invoice.paid", recorder(&log, "invoice"));
        let ev = event(
            "evt_fast",
            "product.created",
            now(),
            json!({"id": "prod_fast", "object": "product", "name": "Fast"}),
        );
        let r = webhooks.receive(&m, post(&ev)).await;
        assert_eq!(
            (r.status, r.outcome),
            (200, Outcome::Processed),
            "{}: {:?}",
            b.name,
            r.error
        );
        let d = &Delivery::recent(&m, 1).await.unwrap()[0];
        assert_eq!(
            (d.outcome.as_str(), d.status_code, d.valid),
            ("processed", Some(200), true),
            "{}",
            b.name
        );
        assert_eq!(d.event_id.as_deref(), Some("evt_fast"));
        assert_eq!(
            Product::get(&m, "prod_fast")
                .await
                .unwrap()
                .unwrap()
                .name
                .as_deref(),
            Some("Fast")
        );
        // Stored as processed: a redelivery runs nothing, and nothing is left to replay.
        assert_eq!(
            webhooks.receive(&m, post(&ev)).await.outcome,
            Outcome::Duplicate,
            "{}",
            b.name
        );
        let report = webhooks
            .process_events(
                &m,
                &EventFilter {
                    failed: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(report, Default::default(), "{}", b.name);
        assert!(log.lock().unwrap().is_empty());
        // The row as a finished claim leaves it: processed, synced, one attempt, no
        // claim, a processing time, an empty handler log.
        let finished = common::query_count(
            &m.config().database_url,
            "SELECT COUNT(*) AS n FROM stripe_events WHERE id = 'evt_fast' AND status = 'processed' \
             AND synced AND attempts = 1 AND claimed_at IS NULL AND processed_at IS NOT NULL \
             AND error IS NULL AND handlers = '{}'",
        );
        assert_eq!(finished, 1, "{}", b.name);
    }
}

/// A handler that panics before it returns its future (a closure that reads the event
/// first) is caught like one that panics inside it: the event is failed, the answer
/// 500, the delivery logged; nothing unwinds into the host's request.
#[tokio::test]
async fn a_handler_panicking_before_its_future_fails_the_event_alone() {
    for b in backends() {
        let m = mirror(&b).await;
        let webhooks = Webhooks::new().on("product.created", |e: Event, _m: Mirror| {
            let customer = e.object()["customer"].as_str().unwrap().to_owned();
            async move {
                drop(customer);
                Ok(())
            }
        });
        let ev = event(
            "evt_early_panic",
            "product.created",
            now(),
            json!({"id": "prod_early", "object": "product", "name": "E"}),
        );
        let r = webhooks.receive(&m, post(&ev)).await;
        assert_eq!(
            (r.status, r.outcome),
            (500, Outcome::HandlerFailed),
            "{}: {:?}",
            b.name,
            r.error
        );
        assert!(r.error.unwrap().contains("panicked"), "{}", b.name);
        let d = &Delivery::recent(&m, 1).await.unwrap()[0];
        assert_eq!(
            (d.outcome.as_str(), d.status_code),
            ("handler_failed", Some(500)),
            "{}",
            b.name
        );
        // The sync is kept; a redelivery is not held off by a stuck claim.
        assert!(Product::get(&m, "prod_early").await.unwrap().is_some());
        assert_eq!(
            webhooks.receive(&m, post(&ev)).await.status,
            500,
            "{}",
            b.name
        );
    }
}

/// A stored event that cannot be read (its data, or its handler log, damaged by hand or
/// by an older version) is reported among the failed ones; the replay goes on with the
/// others, and a handler that had succeeded is never run again for a damaged log.
#[tokio::test]
async fn a_replay_reports_an_unreadable_event_and_goes_on() {
    for b in backends() {
        let m = mirror(&b).await;
        let fail = Arc::new(Mutex::new(true));
        let runs: Log = Default::default();
        let (f, r) = (fail.clone(), runs.clone());
        let webhooks = Webhooks::new().on("product.created", move |e: Event, _m: Mirror| {
            let (f, r) = (f.clone(), r.clone());
            async move {
                r.lock().unwrap().push(e.id.clone());
                if *f.lock().unwrap() {
                    return Err("mail server down".into());
                }
                Ok(())
            }
        });
        for n in 1..=3 {
            let ev = event(
                &format!("evt_rd{n}"),
                "product.created",
                now(),
                json!({"id": format!("prod_rd{n}"), "object": "product", "name": "R"}),
            );
            assert_eq!(
                webhooks.receive(&m, post(&ev)).await.status,
                500,
                "{}",
                b.name
            );
        }
        let url = &b.config.database_url;
        common::execute_sql(
            url,
            "UPDATE stripe_events SET data = 'not json' WHERE id = 'evt_rd1'",
        );
        common::execute_sql(
            url,
            "UPDATE stripe_events SET handlers = 'not json' WHERE id = 'evt_rd2'",
        );
        *fail.lock().unwrap() = false;
        let before = runs.lock().unwrap().len();
        let report = webhooks
            .process_events(
                &m,
                &EventFilter {
                    failed: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(report.processed, 1, "{}: {report:?}", b.name);
        let mut failed: Vec<&str> = report.failed.iter().map(|(id, _)| id.as_str()).collect();
        failed.sort();
        assert_eq!(failed, ["evt_rd1", "evt_rd2"], "{}: {report:?}", b.name);
        assert!(
            report
                .failed
                .iter()
                .all(|(_, e)| e.contains("not JSON") || e.contains("not a JSON")),
            "{}: {report:?}",
            b.name
        );
        assert_eq!(
            runs.lock().unwrap()[before..],
            ["evt_rd3".to_owned()],
            "{}: only the readable one ran",
            b.name
        );
    }
}

/// A redelivered event whose stored handler log is damaged fails alone (500, marked
/// failed, its log kept): deliveries sharing its group are answered as if it were not
/// there, not 503.
#[tokio::test]
async fn a_damaged_handler_log_fails_its_event_alone() {
    for b in backends() {
        let m = mirror(&b).await;
        let webhooks = Webhooks::new().on("product.created", |_e: Event, _m: Mirror| async {
            Err("mail server down".into())
        });
        let damaged = event(
            "evt_dmg",
            "product.created",
            now(),
            json!({"id": "prod_dmg", "object": "product", "name": "D"}),
        );
        assert_eq!(webhooks.receive(&m, post(&damaged)).await.status, 500);
        common::execute_sql(
            &b.config.database_url,
            "UPDATE stripe_events SET handlers = 'not json' WHERE id = 'evt_dmg'",
        );
        // Queued at once (one poll of `join_all`), around the damaged one: groups
        // hold several of them.
        let others: Vec<_> = (0..16)
            .map(|i| {
                event(
                    &format!("evt_dmg_other{i}"),
                    "price.created",
                    now(),
                    json!({"id": format!("price_dmg{i}"), "object": "price", "product": "prod_dmg",
                        "currency": "usd", "unit_amount": 100}),
                )
            })
            .collect();
        let mut requests: Vec<_> = others.iter().map(post).collect();
        requests.insert(4, post(&damaged));
        let answers =
            futures_util::future::join_all(requests.into_iter().map(|r| webhooks.receive(&m, r)))
                .await;
        let a = &answers[4];
        assert_eq!(
            (a.status, a.outcome),
            (500, Outcome::Error),
            "{}: {a:?}",
            b.name
        );
        for (i, o) in answers.iter().enumerate().filter(|(i, _)| *i != 4) {
            assert_eq!(o.status, 200, "{}: {i}: {o:?}", b.name);
        }
        let (status, log) = (
            common::query_text(
                &b.config.database_url,
                "SELECT status AS t FROM stripe_events WHERE id = 'evt_dmg'",
            ),
            common::query_text(
                &b.config.database_url,
                "SELECT handlers AS t FROM stripe_events WHERE id = 'evt_dmg'",
            ),
        );
        assert_eq!(
            (status.as_str(), log.as_str()),
            ("failed", "not json"),
            "{}",
            b.name
        );
        // Each delivery of the group has one row, saying what it was answered; the
        // damaged event's keeps its body (no event row stores it as taken).
        let rows = Delivery::recent(&m, 100).await.unwrap();
        assert_eq!(rows.len(), 18, "{}", b.name);
        let mut logged: Vec<_> = rows
            .iter()
            .take(17)
            .map(|d| {
                (
                    d.event_id.clone().unwrap(),
                    d.outcome.clone(),
                    d.status_code,
                )
            })
            .collect();
        logged.sort();
        let mut ids: Vec<String> = others
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        ids.insert(4, "evt_dmg".to_owned());
        let mut expected: Vec<_> = ids
            .into_iter()
            .zip(&answers)
            .map(|(id, a)| (id, a.outcome.as_str().to_owned(), Some(a.status as i32)))
            .collect();
        expected.sort();
        assert_eq!(logged, expected, "{}", b.name);
        let kept = rows
            .iter()
            .find(|d| d.event_id.as_deref() == Some("evt_dmg") && d.outcome == "error")
            .expect("the damaged event's delivery");
        assert_eq!(kept.body, damaged.to_string().into_bytes(), "{}", b.name);
    }
}

/// A replay orders its writes by the event's `created` as stored, even when the stored
/// body lacks it (stored by a version that took such bodies): never the host's clock.
#[tokio::test]
async fn a_replay_stamps_with_the_stored_created_not_the_host_clock() {
    for b in backends() {
        let m = mirror(&b).await;
        let webhooks = Webhooks::new();
        let created = 1_700_000_000;
        let ev = event(
            "evt_oldbody",
            "product.updated",
            created,
            json!({"id": "prod_oldbody", "object": "product", "name": "Old"}),
        );
        assert_eq!(
            webhooks.receive(&m, post(&ev)).await.status,
            200,
            "{}",
            b.name
        );
        let url = &b.config.database_url;
        let mut body = ev.clone();
        body.as_object_mut().unwrap().remove("created");
        common::execute_sql(
            url,
            &format!(
                "UPDATE stripe_events SET data = '{body}', synced = FALSE, status = 'failed' \
                 WHERE id = 'evt_oldbody'"
            ),
        );
        common::execute_sql(url, "DELETE FROM stripe_products WHERE id = 'prod_oldbody'");
        let report = webhooks
            .process_events(
                &m,
                &EventFilter {
                    ids: vec!["evt_oldbody".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(report.processed, 1, "{}: {report:?}", b.name);
        let stamp = common::query_count(
            url,
            "SELECT stamp AS n FROM stripe_products WHERE id = 'prod_oldbody'",
        );
        assert_eq!(stamp, created, "{}: the stored created, not now", b.name);
    }
}
