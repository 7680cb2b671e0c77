//! The statements of a webhook's write path stay prepared on SQLite.
//!
//! SQLite (3.50, as the crate bundles it) builds a bound `LIMIT ?` into the statement
//! as a constant and marks it to be parsed and planned again whenever that value is
//! bound anew, which diesel's `.first()` does on every run. Lookups by key use
//! `.get_result()` (a key finds one row, no `LIMIT`): this test fails if one that the
//! webhook path (new events of each kind, a redelivery) or a read by id runs goes back
//! to `.first()`.
//!
//! It installs diesel's process-wide instrumentation, so this file holds one test.
#![cfg(feature = "sqlite")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use serde_json::{Value, json};
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{Outcome, Webhooks};
use stripe_mirror::{
    Config, Customer, Mirror, Price, Product, Secret, Subscription, WebhookRequest,
};

const SECRET: &str = "whsec_prepared";

/// Every statement diesel ran whose text binds its `LIMIT`.
static LIMITED: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Every statement diesel ran: the recorder is attached.
static SEEN: AtomicUsize = AtomicUsize::new(0);

struct Recorder;

impl Instrumentation for Recorder {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            SEEN.fetch_add(1, Ordering::Relaxed);
            let text = query.to_string();
            if text.contains("LIMIT ?") {
                LIMITED
                    .lock()
                    .unwrap()
                    .push(text.chars().take(300).collect());
            }
        }
    }
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> WebhookRequest {
    let body = json!({"id": id, "object": "event", "type": kind, "created": created,
        "livemode": false, "data": {"object": object}})
    .to_string()
    .into_bytes();
    let header = sign(&body, &Secret::new(SECRET), chrono::Utc::now().timestamp());
    WebhookRequest::new(body).header("Stripe-Signature", header)
}

#[tokio::test]
async fn webhook_writes_and_key_lookups_bind_no_limit() {
    diesel::connection::set_default_instrumentation(|| Some(Box::new(Recorder)))
        .expect("instrumentation");
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(format!("sqlite://{}", dir.path().join("m.db").display()));
    config.webhook_secrets = vec![Secret::new(SECRET)];
    let mirror = Mirror::connect(config).await.unwrap();
    // A handler and an access hook: the claim, the finish and the access marking run.
    let seen = Arc::new(Mutex::new(0usize));
    let hook_seen = seen.clone();
    let webhooks = Webhooks::new()
        .on("*", |_event, _mirror| async { Ok(()) })
        .on_access_change(move |_change, _mirror| {
            let seen = hook_seen.clone();
            async move {
                *seen.lock().unwrap() += 1;
                Ok(())
            }
        });

    let now = chrono::Utc::now().timestamp();
    let mut customer = common::fixture("customer");
    customer["id"] = json!("cus_prep");
    customer["metadata"] = json!({"stripe_mirror_subscriber": "user-prep"});
    let mut product = common::fixture("product");
    product["id"] = json!("prod_prep");
    let mut price = common::fixture("price");
    price["id"] = json!("price_prep");
    price["product"] = json!("prod_prep");
    let mut subscription = common::fixture("subscription");
    subscription["id"] = json!("sub_prep");
    subscription["customer"] = json!("cus_prep");
    subscription["status"] = json!("active");
    subscription["items"]["data"][0]["price"] = price.clone();
    subscription["items"]["data"][0]["current_period_end"] = json!(now + 86_400);
    let mut renamed = customer.clone();
    renamed["name"] = json!("Renamed");
    let mut canceled = subscription.clone();
    canceled["status"] = json!("canceled");

    let deliveries = [
        event("evt_p1", "customer.created", now - 10, customer),
        event("evt_p2", "product.created", now - 9, product.clone()),
        event("evt_p3", "price.created", now - 8, price),
        event(
            "evt_p4",
            "customer.subscription.created",
            now - 7,
            subscription,
        ),
        event("evt_p5", "customer.updated", now - 6, renamed),
        event("evt_p6", "product.updated", now - 5, product),
        event("evt_p7", "customer.subscription.deleted", now - 4, canceled),
    ];
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let answer = webhooks.receive(&mirror, delivery).await;
        assert_eq!(answer.outcome, Outcome::Processed, "delivery {i}");
    }
    // A redelivery: the event is known and done.
    let again = webhooks
        .receive(
            &mirror,
            event(
                "evt_p1",
                "customer.created",
                now - 10,
                json!({"id": "cus_prep", "object": "customer"}),
            ),
        )
        .await;
    assert_eq!(again.outcome, Outcome::Duplicate);
    // Key lookups of the models a host reads most.
    let customer = Customer::by_subscriber(&mirror, "user-prep")
        .await
        .unwrap()
        .expect("the customer is mirrored");
    assert_eq!(customer.id, "cus_prep");
    assert!(customer.subscription(&mirror).await.unwrap().is_none());
    let sub = Subscription::get(&mirror, "sub_prep")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sub.customer_id.as_deref(), Some("cus_prep"));
    assert!(Customer::get(&mirror, "cus_prep").await.unwrap().is_some());
    let price = Price::get(&mirror, "price_prep").await.unwrap().unwrap();
    assert!(price.product(&mirror).await.unwrap().is_some());
    assert!(Product::get(&mirror, "prod_prep").await.unwrap().is_some());

    // The path ran (the access hook heard the subscription come and go), and bound no
    // `LIMIT` on the way.
    assert!(*seen.lock().unwrap() > 0, "the access hook ran");
    assert!(
        SEEN.load(Ordering::Relaxed) > 0,
        "the recorder saw the statements"
    );
    let limited = LIMITED.lock().unwrap().clone();
    assert!(
        limited.is_empty(),
        "statements that SQLite prepares again on every run:\n{}",
        limited.join("\n")
    );
}
