//! The mirror ends in Stripe's newest state whatever Stripe does: same-second events in
//! every delivery order (settled by event type and `previous_attributes`, else flagged
//! and re-fetched when an API key is at hand), API data stamped on Stripe's clock with
//! the host's clock skewed, a re-fetch answered 404, Checkout linking through the
//! guard, and a deterministic `by_subscriber`. Every test runs on SQLite and Postgres.

mod common;

use common::{backends, stripe_stub};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use stripe_mirror::webhooks::Outcome;
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::{
    Clock, Config, Customer, Event, Mirror, Price, Product, Secret, Subscription, WebhookRequest,
    Webhooks,
};

const SECRET: &str = "whsec_test_ordering";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn config(b: &common::Backend, api_base: Option<&str>) -> Config {
    let mut config = b.config.clone();
    config.webhook_secrets = vec![Secret::new(SECRET)];
    if let Some(base) = api_base {
        config.api_base = Some(base.to_owned());
        config.secret_key = Some(Secret::new("sk_test_ordering_0000"));
        config.stripe_retries = 0;
    }
    config
}

fn event(
    id: &str,
    event_type: &str,
    created: i64,
    object: Value,
    previous: Option<Value>,
) -> Value {
    let mut data = json!({ "object": object });
    if let Some(previous) = previous {
        data["previous_attributes"] = previous;
    }
    json!({"id": id, "object": "event", "type": event_type, "created": created, "livemode": false,
           "api_version": "2026-09-30.clover", "data": data})
}

fn post(v: &Value) -> WebhookRequest {
    let body = v.to_string().into_bytes();
    let header = sign(&body, &Secret::new(SECRET), now());
    WebhookRequest::new(body).header("Stripe-Signature", header)
}

async fn deliver(webhooks: &Webhooks, m: &Mirror, ev: &Value) {
    let r = webhooks.receive(m, post(ev)).await;
    assert_eq!(
        (r.status, r.outcome),
        (200, Outcome::Processed),
        "{}: {:?}",
        ev["id"],
        r.error
    );
}

fn subscription(id: &str, status: &str) -> Value {
    json!({"id": id, "object": "subscription", "customer": "cus_tie", "status": status,
           "items": {"object": "list", "data": [{"id": format!("si_{id}"), "object": "subscription_item",
               "price": {"id": "price_tie", "object": "price", "product": "prod_tie"},
               "current_period_end": 4102444800_i64}]}})
}

/// Every order of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut p = rest.clone();
            p.insert(at, n - 1);
            out.push(p);
        }
    }
    out
}

fn sql_number(config: &Config, sql: &str) -> i64 {
    common::query_count(&config.database_url, sql)
}

fn flagged(config: &Config, table: &str, id: &str) -> bool {
    sql_number(
        config,
        &format!(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {table} WHERE id = '{id}' AND reconcile = TRUE"
        ),
    ) == 1
}

#[tokio::test]
async fn created_and_updated_in_one_second_end_updated_in_either_order() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        let t = now();
        for (k, order) in permutations(2).into_iter().enumerate() {
            let id = format!("sub_cu{k}");
            let events = [
                event(
                    &format!("evt_cu{k}_c"),
                    "customer.subscription.created",
                    t,
                    subscription(&id, "incomplete"),
                    None,
                ),
                event(
                    &format!("evt_cu{k}_u"),
                    "customer.subscription.updated",
                    t,
                    subscription(&id, "active"),
                    Some(json!({"status": "incomplete"})),
                ),
            ];
            for i in &order {
                deliver(&webhooks, &m, &events[*i]).await;
            }
            let s = Subscription::get(&m, &id).await.unwrap().unwrap();
            assert_eq!(
                s.status.as_ref().map(|s| s.as_str()),
                Some("active"),
                "{} order {order:?}",
                b.name
            );
            assert!(
                !flagged(m.config(), "stripe_subscriptions", &id),
                "{}",
                b.name
            );
        }
    }
}

#[tokio::test]
async fn created_and_deleted_in_one_second_end_deleted_in_either_order() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        let t = now();
        for (k, order) in permutations(2).into_iter().enumerate() {
            // A customer: deletion is a tombstone.
            let cus = format!("cus_cd{k}");
            let object = json!({"id": cus, "object": "customer", "email": "gone@example.com"});
            let events = [
                event(
                    &format!("evt_cd{k}_c"),
                    "customer.created",
                    t,
                    object.clone(),
                    None,
                ),
                event(&format!("evt_cd{k}_d"), "customer.deleted", t, object, None),
            ];
            for i in &order {
                deliver(&webhooks, &m, &events[*i]).await;
            }
            let c = Customer::get(&m, &cus).await.unwrap().unwrap();
            assert!(c.deleted, "{} order {order:?}", b.name);

            // A subscription: deletion is its canceled state.
            let sub = format!("sub_cd{k}");
            let events = [
                event(
                    &format!("evt_sd{k}_c"),
                    "customer.subscription.created",
                    t,
                    subscription(&sub, "active"),
                    None,
                ),
                event(
                    &format!("evt_sd{k}_d"),
                    "customer.subscription.deleted",
                    t,
                    subscription(&sub, "canceled"),
                    None,
                ),
            ];
            for i in &order {
                deliver(&webhooks, &m, &events[*i]).await;
            }
            let s = Subscription::get(&m, &sub).await.unwrap().unwrap();
            assert_eq!(
                s.status.as_ref().map(|s| s.as_str()),
                Some("canceled"),
                "{} order {order:?}",
                b.name
            );
        }
    }
}

#[tokio::test]
async fn two_updates_in_one_second_end_in_the_newest_in_every_order() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        let t = now();
        // Created incomplete, paid (active), then the renewal fails (past_due): one second.
        for (k, order) in permutations(3).into_iter().enumerate() {
            let id = format!("sub_uu{k}");
            let events = [
                event(
                    &format!("evt_uu{k}_c"),
                    "customer.subscription.created",
                    t,
                    subscription(&id, "incomplete"),
                    None,
                ),
                event(
                    &format!("evt_uu{k}_1"),
                    "customer.subscription.updated",
                    t,
                    subscription(&id, "active"),
                    Some(json!({"status": "incomplete"})),
                ),
                event(
                    &format!("evt_uu{k}_2"),
                    "customer.subscription.updated",
                    t,
                    subscription(&id, "past_due"),
                    Some(json!({"status": "active"})),
                ),
            ];
            for i in &order {
                deliver(&webhooks, &m, &events[*i]).await;
            }
            let s = Subscription::get(&m, &id).await.unwrap().unwrap();
            assert_eq!(
                s.status.as_ref().map(|s| s.as_str()),
                Some("past_due"),
                "{} order {order:?}",
                b.name
            );
            assert!(
                !flagged(m.config(), "stripe_subscriptions", &id),
                "{} order {order:?}",
                b.name
            );
        }
        // Two updates of different fields (a name, then a metadata key added).
        for (k, order) in permutations(2).into_iter().enumerate() {
            let id = format!("prod_uu{k}");
            let events = [
                event(
                    &format!("evt_pu{k}_1"),
                    "product.updated",
                    t,
                    json!({"id": id, "object": "product", "name": "New", "metadata": {}}),
                    Some(json!({"name": "Old"})),
                ),
                event(
                    &format!("evt_pu{k}_2"),
                    "product.updated",
                    t,
                    json!({"id": id, "object": "product", "name": "New", "metadata": {"tier": "gold"}}),
                    Some(json!({"metadata": {"tier": null}})),
                ),
            ];
            for i in &order {
                deliver(&webhooks, &m, &events[*i]).await;
            }
            let p = Product::get(&m, &id).await.unwrap().unwrap();
            assert_eq!(
                p.data()["metadata"]["tier"],
                "gold",
                "{} order {order:?}",
                b.name
            );
            assert_eq!(p.name.as_deref(), Some("New"), "{} order {order:?}", b.name);
        }
    }
}

#[tokio::test]
async fn a_fetch_and_an_update_in_one_second_are_ordered_by_what_the_update_changed() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        let t = now();
        let update = |id: &str| {
            event(
                &format!("evt_fu_{id}"),
                "customer.subscription.updated",
                t,
                subscription(id, "active"),
                Some(json!({"status": "incomplete"})),
            )
        };
        // Fetched before the update (shows its old values), the update arriving second or first.
        Subscription::sync_from_stripe_data_at(&m, &subscription("sub_fu1", "incomplete"), t)
            .await
            .unwrap();
        deliver(&webhooks, &m, &update("sub_fu1")).await;
        deliver(&webhooks, &m, &update("sub_fu2")).await;
        Subscription::sync_from_stripe_data_at(&m, &subscription("sub_fu2", "incomplete"), t)
            .await
            .unwrap();
        // Fetched after the update (shows its new values), either order.
        deliver(&webhooks, &m, &update("sub_fu3")).await;
        Subscription::sync_from_stripe_data_at(&m, &subscription("sub_fu3", "active"), t)
            .await
            .unwrap();
        for id in ["sub_fu1", "sub_fu2", "sub_fu3"] {
            let s = Subscription::get(&m, id).await.unwrap().unwrap();
            assert_eq!(
                s.status.as_ref().map(|s| s.as_str()),
                Some("active"),
                "{} {id}",
                b.name
            );
            assert!(
                !flagged(m.config(), "stripe_subscriptions", id),
                "{} {id}",
                b.name
            );
        }
        // A fetch showing neither (an update between them is missing): kept and flagged.
        deliver(&webhooks, &m, &update("sub_fu4")).await;
        Subscription::sync_from_stripe_data_at(&m, &subscription("sub_fu4", "past_due"), t)
            .await
            .unwrap();
        assert!(
            flagged(m.config(), "stripe_subscriptions", "sub_fu4"),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn an_undecidable_tie_is_flagged_without_api_access_and_refetched_with_it() {
    for b in backends() {
        let t = now();
        // Two same-second updates carrying no previous_attributes: nothing settles them.
        let pair = |k: &str, id: &str| {
            [
                event(
                    &format!("evt_nd{k}_1"),
                    "customer.subscription.updated",
                    t,
                    subscription(id, "active"),
                    None,
                ),
                event(
                    &format!("evt_nd{k}_2"),
                    "customer.subscription.updated",
                    t,
                    subscription(id, "past_due"),
                    None,
                ),
            ]
        };
        // Without an API key: the first delivery stays, and the row is flagged.
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        for (k, order) in permutations(2).into_iter().enumerate() {
            let id = format!("sub_nd{k}");
            let events = pair(&k.to_string(), &id);
            for i in &order {
                deliver(&webhooks, &m, &events[*i]).await;
            }
            let s = Subscription::get(&m, &id).await.unwrap().unwrap();
            let first = events[order[0]]["data"]["object"]["status"]
                .as_str()
                .unwrap();
            assert_eq!(
                s.status.as_ref().map(|s| s.as_str()),
                Some(first),
                "{}: never 'the later delivery wins'",
                b.name
            );
            assert!(
                flagged(m.config(), "stripe_subscriptions", &id),
                "{} order {order:?}",
                b.name
            );
        }

        // With an API key: the object is re-fetched, and Stripe's answer wins.
        let (base, hits) = stripe_stub(vec![
            (
                "/v1/subscriptions/sub_api0",
                200,
                subscription("sub_api0", "past_due"),
            ),
            (
                "/v1/subscriptions/sub_api1",
                200,
                subscription("sub_api1", "past_due"),
            ),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        for (k, order) in permutations(2).into_iter().enumerate() {
            let id = format!("sub_api{k}");
            let events = pair(&format!("a{k}"), &id);
            for i in &order {
                deliver(&webhooks, &m, &events[*i]).await;
            }
            let s = Subscription::get(&m, &id).await.unwrap().unwrap();
            assert_eq!(
                s.status.as_ref().map(|s| s.as_str()),
                Some("past_due"),
                "{} order {order:?}",
                b.name
            );
            assert!(
                !flagged(m.config(), "stripe_subscriptions", &id),
                "{}: a fetch clears the flag",
                b.name
            );
        }
        assert_eq!(
            *hits.lock().unwrap(),
            2,
            "{}: one fetch per undecided tie",
            b.name
        );
    }
}

/// A Stripe stand-in for one subscription that answers `down` until `up` is set, then
/// the object; counts requests.
async fn flaky_subscription(
    id: &'static str,
    down: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use axum::{Router, routing::get};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        &format!("/v1/subscriptions/{id}"),
        get(move || {
            let (up, h) = (up.clone(), h.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                if up.load(Ordering::SeqCst) {
                    (axum::http::StatusCode::OK, subscription(id, "past_due").to_string())
                } else {
                    (
                        axum::http::StatusCode::from_u16(down).unwrap(),
                        json!({"error": {"type": "api_error", "message": "Stripe is having a moment"}}).to_string(),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/"), hits)
}

#[tokio::test]
async fn a_tie_whose_refetch_fails_is_not_finished_and_is_fetched_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for b in backends() {
        for (id, by_replay) in [("sub_rf_redelivery", false), ("sub_rf_replay", true)] {
            let up = std::sync::Arc::new(AtomicBool::new(false));
            let (base, hits) = flaky_subscription(id, 500, up.clone()).await;
            let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
            let webhooks = Webhooks::new();
            let t = now();
            let first = event(
                &format!("evt_{id}_1"),
                "customer.subscription.updated",
                t,
                subscription(id, "active"),
                None,
            );
            let second = event(
                &format!("evt_{id}_2"),
                "customer.subscription.updated",
                t,
                subscription(id, "past_due"),
                None,
            );
            deliver(&webhooks, &m, &first).await;
            // The tie cannot be settled and Stripe cannot be asked: a 503, so Stripe
            // redelivers; the row keeps the first version, flagged.
            let r = webhooks.receive(&m, post(&second)).await;
            assert_eq!(
                (r.status, r.outcome),
                (503, Outcome::Unavailable),
                "{}: {:?}",
                b.name,
                r.error
            );
            assert!(
                r.error
                    .unwrap()
                    .contains(&format!("re-fetching subscription {id} failed"))
            );
            let status = |m: Mirror| async move {
                Subscription::get(&m, id)
                    .await
                    .unwrap()
                    .unwrap()
                    .status
                    .map(|s| s.as_str().to_owned())
            };
            assert_eq!(
                status(m.clone()).await.as_deref(),
                Some("active"),
                "{}",
                b.name
            );
            assert!(
                flagged(m.config(), "stripe_subscriptions", id),
                "{}",
                b.name
            );
            let failed = sql_number(
                m.config(),
                &format!(
                    "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM stripe_events WHERE id = 'evt_{id}_2' AND status = 'failed'"
                ),
            );
            assert_eq!(failed, 1, "{}: the event is not finished", b.name);
            // Stripe is back: the redelivery (or a replay) fetches again, though the
            // event's sync already applied.
            up.store(true, Ordering::SeqCst);
            if by_replay {
                let report = webhooks
                    .process_events(
                        &m,
                        &stripe_mirror::webhooks::EventFilter {
                            failed: true,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                assert_eq!(
                    (report.processed, report.failed.len()),
                    (1, 0),
                    "{}: {report:?}",
                    b.name
                );
            } else {
                deliver(&webhooks, &m, &second).await;
            }
            assert_eq!(
                status(m.clone()).await.as_deref(),
                Some("past_due"),
                "{}",
                b.name
            );
            assert!(
                !flagged(m.config(), "stripe_subscriptions", id),
                "{}",
                b.name
            );
            assert_eq!(
                hits.load(Ordering::SeqCst),
                2,
                "{}: one failed fetch, one good",
                b.name
            );
            // Done now: another redelivery fetches nothing.
            let r = webhooks.receive(&m, post(&second)).await;
            assert_eq!(r.outcome, Outcome::Duplicate, "{}", b.name);
            assert_eq!(hits.load(Ordering::SeqCst), 2, "{}", b.name);
        }
    }
}

#[tokio::test]
async fn a_tie_whose_refetch_is_refused_for_good_is_left_to_reconcile() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for b in backends() {
        // A revoked key (401) would fail every redelivery: the event is finished, the
        // row stays at what it had, flagged for `reconcile`.
        let id = "sub_rf_refused";
        let up = std::sync::Arc::new(AtomicBool::new(false));
        let (base, hits) = flaky_subscription(id, 401, up).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let webhooks = Webhooks::new();
        let t = now();
        deliver(
            &webhooks,
            &m,
            &event(
                "evt_rr_1",
                "customer.subscription.updated",
                t,
                subscription(id, "active"),
                None,
            ),
        )
        .await;
        deliver(
            &webhooks,
            &m,
            &event(
                "evt_rr_2",
                "customer.subscription.updated",
                t,
                subscription(id, "past_due"),
                None,
            ),
        )
        .await;
        assert_eq!(hits.load(Ordering::SeqCst), 1, "{}", b.name);
        assert!(
            flagged(m.config(), "stripe_subscriptions", id),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn api_data_is_stamped_on_stripes_clock_whatever_the_hosts() {
    for b in backends() {
        let customer = |id: &str, email: &str| json!({"id": id, "object": "customer", "email": email, "created": now() - 10_000});
        let (base, _) = stripe_stub(vec![
            (
                "/v1/customers/cus_ahead",
                200,
                customer("cus_ahead", "api@example.com"),
            ),
            (
                "/v1/customers/cus_behind",
                200,
                customer("cus_behind", "api@example.com"),
            ),
        ])
        .await;

        // Host clock two minutes ahead: an event created just after the fetch still applies.
        let mut ahead = config(&b, Some(&base));
        ahead.clock = Clock::skewed(120);
        let m = Mirror::connect(ahead).await.unwrap();
        let webhooks = Webhooks::new();
        Customer::sync(&m, "cus_ahead").await.unwrap();
        let t = now();
        deliver(
            &webhooks,
            &m,
            &event(
                "evt_clk_ahead",
                "customer.updated",
                t + 1,
                customer("cus_ahead", "event@example.com"),
                None,
            ),
        )
        .await;
        let c = Customer::get(&m, "cus_ahead").await.unwrap().unwrap();
        assert_eq!(
            c.email.as_deref(),
            Some("event@example.com"),
            "{}: host ahead",
            b.name
        );

        // Host clock two minutes behind: an event older than the fetch stays refused.
        let mut behind = config(&b, Some(&base));
        behind.clock = Clock::skewed(-120);
        let m = Mirror::connect(behind).await.unwrap();
        let fetched = Customer::sync(&m, "cus_behind").await.unwrap();
        assert_eq!(fetched.email.as_deref(), Some("api@example.com"));
        assert!(
            (fetched.stamp - now()).abs() <= 2,
            "{}: stamp {} is Stripe's time, not the host's",
            b.name,
            fetched.stamp
        );
        deliver(
            &webhooks,
            &m,
            &event(
                "evt_clk_behind",
                "customer.updated",
                now() - 30,
                customer("cus_behind", "stale@example.com"),
                None,
            ),
        )
        .await;
        let c = Customer::get(&m, "cus_behind").await.unwrap().unwrap();
        assert_eq!(
            c.email.as_deref(),
            Some("api@example.com"),
            "{}: host behind",
            b.name
        );
    }
}

#[tokio::test]
async fn a_refetch_answered_404_tombstones_the_object_and_finishes_the_event() {
    for b in backends() {
        let (base, hits) = stripe_stub(vec![]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let webhooks = Webhooks::new().refetch(&["customer"]);
        let ev = event(
            "evt_gone",
            "customer.updated",
            now(),
            json!({"id": "cus_gone", "object": "customer", "email": "x@example.com"}),
            None,
        );
        deliver(&webhooks, &m, &ev).await;
        assert_eq!(*hits.lock().unwrap(), 1);
        let c = Customer::get(&m, "cus_gone").await.unwrap().unwrap();
        assert!(c.deleted, "{}: {c:?}", b.name);
        let status = sql_number(
            m.config(),
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM stripe_events WHERE id = 'evt_gone' AND status = 'processed'",
        );
        assert_eq!(status, 1, "{}", b.name);
        let finished = sql_number(
            m.config(),
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM stripe_webhook_deliveries WHERE event_id = 'evt_gone' AND outcome = 'processed' AND status_code = 200",
        );
        assert_eq!(finished, 1, "{}", b.name);
        // A redelivery is a duplicate: nothing fails forever, and Stripe is not asked
        // again (a failing API would have made it a 5xx).
        assert_eq!(
            webhooks.receive(&m, post(&ev)).await.outcome,
            Outcome::Duplicate
        );
        assert_eq!(*hits.lock().unwrap(), 1, "{}: asked again", b.name);
    }
}

/// A row of the other mode (a database shared by a live and a test instance): a
/// test key's fetch is answered 404, which says only that the key cannot see it. The
/// sync fails and the row stays as it was, never tombstoned for good.
#[tokio::test]
async fn a_404_for_a_row_of_the_other_mode_does_not_tombstone_it() {
    for b in backends() {
        let (base, hits) = stripe_stub(vec![]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let live = json!({"id": "cus_live", "object": "customer", "livemode": true,
                          "email": "live@example.com", "created": now()});
        Customer::sync_from_stripe_data(&m, &live).await.unwrap();
        let synced = Customer::sync(&m, "cus_live").await;
        assert_eq!(*hits.lock().unwrap(), 1, "{}", b.name);
        assert!(synced.is_err(), "{}: {synced:?}", b.name);
        let c = Customer::get(&m, "cus_live").await.unwrap().unwrap();
        assert!(!c.deleted, "{}: {c:?}", b.name);
        assert_eq!(c.email.as_deref(), Some("live@example.com"), "{}", b.name);
    }
}

/// Products (and legacy plans) take ids of the caller's choosing, so a deleted one can
/// be made again under its id. It comes back from its `product.created` event of a
/// later second, or from a fetch asked for once the deletion was stored; a late update
/// of the deleted one still cannot bring it back.
#[tokio::test]
async fn a_product_made_again_under_a_deleted_ones_id_comes_back() {
    for b in backends() {
        let product = |id: &str, name: &str| json!({"id": id, "object": "product", "name": name, "active": true, "livemode": false});
        let (base, hits) = stripe_stub(vec![(
            "/v1/products/prod_again_f",
            200,
            product("prod_again_f", "Fetched again"),
        )])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let webhooks = Webhooks::new();
        let t = now();
        for id in ["prod_again", "prod_again_f"] {
            let (made, gone) = (format!("evt_{id}_made"), format!("evt_{id}_gone"));
            deliver(
                &webhooks,
                &m,
                &event(
                    &made,
                    "product.created",
                    t - 100,
                    product(id, "First"),
                    None,
                ),
            )
            .await;
            deliver(
                &webhooks,
                &m,
                &event(&gone, "product.deleted", t - 50, product(id, "First"), None),
            )
            .await;
        }
        let late = event(
            "evt_late",
            "product.updated",
            t - 40,
            product("prod_again", "Late"),
            None,
        );
        deliver(&webhooks, &m, &late).await;
        let p = Product::get(&m, "prod_again").await.unwrap().unwrap();
        assert!(p.deleted, "{}: a late update: {p:?}", b.name);
        let again = event(
            "evt_again",
            "product.created",
            t - 10,
            product("prod_again", "Second"),
            None,
        );
        deliver(&webhooks, &m, &again).await;
        let p = Product::get(&m, "prod_again").await.unwrap().unwrap();
        assert!(!p.deleted, "{}: made again: {p:?}", b.name);
        assert_eq!(p.name.as_deref(), Some("Second"), "{}", b.name);
        // The old product's deletion, delivered late (its first delivery was refused),
        // does not delete the new one.
        let late_gone = event(
            "evt_prod_again_gone_late",
            "product.deleted",
            t - 30,
            product("prod_again", "First"),
            None,
        );
        deliver(&webhooks, &m, &late_gone).await;
        let p = Product::get(&m, "prod_again").await.unwrap().unwrap();
        assert!(
            !p.deleted,
            "{}: a late deletion of the old one: {p:?}",
            b.name
        );
        let fetched = Product::sync(&m, "prod_again_f").await.unwrap();
        assert_eq!(*hits.lock().unwrap(), 1, "{}", b.name);
        assert!(!fetched.deleted, "{}: fetched again: {fetched:?}", b.name);
        assert_eq!(fetched.name.as_deref(), Some("Fetched again"), "{}", b.name);
        // The old product's deletion, retried late, does not delete the one made again
        // that a fetch (`sync`, a backfill) brought in either.
        let late_gone = event(
            "evt_prod_again_f_gone_late",
            "product.deleted",
            t - 50,
            product("prod_again_f", "First"),
            None,
        );
        deliver(&webhooks, &m, &late_gone).await;
        let p = Product::get(&m, "prod_again_f").await.unwrap().unwrap();
        assert!(
            !p.deleted,
            "{}: a late deletion over a fetched row: {p:?}",
            b.name
        );
        // Not dropped either: Stripe was asked, and its live object settled it.
        assert_eq!(*hits.lock().unwrap(), 2, "{}: not fetched again", b.name);
        assert!(
            !flagged(m.config(), "stripe_products", "prod_again_f"),
            "{}",
            b.name
        );
        // But a deletion in the second before a fetch's stamp may be after Stripe read
        // the object: it wins.
        Product::sync_from_stripe_data_at(&m, &product("prod_race", "Fetched"), t)
            .await
            .unwrap();
        let racing = event(
            "evt_prod_race_gone",
            "product.deleted",
            t - 1,
            product("prod_race", "Fetched"),
            None,
        );
        deliver(&webhooks, &m, &racing).await;
        let p = Product::get(&m, "prod_race").await.unwrap().unwrap();
        assert!(p.deleted, "{}: a deletion racing a fetch: {p:?}", b.name);
    }
}

/// An event of a Connect account (it names the `account`) is not the platform's: its
/// objects are not mirrored (a connected account's customer, whose metadata the account
/// sets, must not pass the platform's gate; its products must not take the platform's
/// ids), never re-fetched with the platform's key, and a completed Checkout of it links
/// nobody. The event is stored and its handlers run.
#[tokio::test]
async fn a_connect_accounts_event_is_stored_and_handled_but_not_mirrored() {
    for b in backends() {
        let (base, hits) = stripe_stub(vec![]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let s = seen.clone();
        let webhooks =
            Webhooks::new()
                .refetch(&["customer"])
                .on_any(move |e: Event, _m: Mirror| {
                    let s = s.clone();
                    async move {
                        s.lock().unwrap().push(e.id);
                        Ok(())
                    }
                });
        let mut ev = event(
            "evt_connect",
            "customer.updated",
            now(),
            json!({"id": "cus_connect", "object": "customer", "email": "c@example.com",
                   "metadata": {"stripe_mirror_subscriber": "user-1"}}),
            None,
        );
        ev["account"] = json!("acct_1Connected");
        deliver(&webhooks, &m, &ev).await;
        let mut product = event(
            "evt_connect_product",
            "product.created",
            now(),
            json!({"id": "pro", "object": "product", "name": "Theirs", "metadata": {"roles": "admin"}}),
            None,
        );
        product["account"] = json!("acct_1Connected");
        deliver(&webhooks, &m, &product).await;
        assert_eq!(*hits.lock().unwrap(), 0, "{}: asked Stripe", b.name);
        assert!(
            Customer::get(&m, "cus_connect").await.unwrap().is_none(),
            "{}",
            b.name
        );
        assert!(
            Customer::by_subscriber(&m, "user-1")
                .await
                .unwrap()
                .is_none(),
            "{}",
            b.name
        );
        assert!(
            Product::get(&m, "pro").await.unwrap().is_none(),
            "{}",
            b.name
        );
        assert_eq!(
            *seen.lock().unwrap(),
            ["evt_connect", "evt_connect_product"],
            "{}: handled",
            b.name
        );
    }
}

/// With re-fetches on (`Webhooks::refetch`), a product made again under a deleted
/// one's id comes back from the fetch of its next event: the fetch was asked for once
/// the tombstone was stored, so the live object it answers is the new one.
#[tokio::test]
async fn a_refetch_brings_back_a_product_made_again_under_its_id() {
    for b in backends() {
        let live = json!({"id": "prod_rf", "object": "product", "name": "Again", "active": true,
                          "livemode": false});
        let (base, hits) = stripe_stub(vec![("/v1/products/prod_rf", 200, live.clone())]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let webhooks = Webhooks::new().refetch(&["product"]);
        Product::sync_from_stripe_data_at(&m, &live, now() - 100)
            .await
            .unwrap();
        Product::mark_deleted(&m, "prod_rf").await.unwrap();
        let updated = event("evt_rf", "product.updated", now(), live, None);
        deliver(&webhooks, &m, &updated).await;
        assert_eq!(*hits.lock().unwrap(), 1, "{}", b.name);
        let p = Product::get(&m, "prod_rf").await.unwrap().unwrap();
        assert!(!p.deleted, "{}: {p:?}", b.name);
    }
}

/// A re-fetch of a deleted object answered with something that is not an object (a
/// fake Stripe's odd answer): a clear 400 for that delivery, stored failed, no panic.
#[tokio::test]
async fn a_refetch_answered_with_no_object_is_refused_without_a_panic() {
    for b in backends() {
        let (base, hits) = stripe_stub(vec![(
            "/v1/customers/cus_odd",
            200,
            json!(["not", "an", "object"]),
        )])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let webhooks = Webhooks::new().refetch(&["customer"]);
        let ev = event(
            "evt_odd",
            "customer.deleted",
            now(),
            json!({"id": "cus_odd", "object": "customer", "email": "x@example.com"}),
            None,
        );
        let answer = webhooks.receive(&m, post(&ev)).await;
        assert_eq!(*hits.lock().unwrap(), 1);
        assert_eq!(
            (answer.status, answer.outcome),
            (400, Outcome::InvalidObject),
            "{}: {:?}",
            b.name,
            answer.error
        );
        let failed = sql_number(
            m.config(),
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM stripe_events WHERE id = 'evt_odd' AND status = 'failed'",
        );
        assert_eq!(failed, 1, "{}", b.name);
    }
}

/// A mirror on the Postgres backend, and a connection of the test's own: another
/// writer, driven by hand, that holds rows while a delivery runs.
#[cfg(feature = "postgres")]
async fn postgres_and_another_writer() -> (Mirror, diesel::PgConnection) {
    use diesel::Connection;
    let b = backends()
        .into_iter()
        .find(|b| b.name == "postgres")
        .expect("a Postgres backend");
    let m = Mirror::connect(config(&b, None)).await.unwrap();
    let other = diesel::PgConnection::establish(&b.config.database_url).unwrap();
    (m, other)
}

/// Starts delivering `ev` and gives it 300 ms to reach the rows the other writer holds.
#[cfg(feature = "postgres")]
async fn deliver_while_held(
    webhooks: &Webhooks,
    m: &Mirror,
    ev: Value,
) -> tokio::task::JoinHandle<stripe_mirror::WebhookResponse> {
    let (w, m) = (webhooks.clone(), m.clone());
    let delivered = tokio::spawn(async move { w.receive(&m, post(&ev)).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    delivered
}

/// Two Checkout sessions naming one subscriber for two customers, committed side by
/// side on Postgres (two groups, two app instances): the second waits on the
/// subscriber's access row the first holds, then sees its link, and links nothing.
/// The first is written by hand here (its access mark, its link), held open while the
/// second is delivered.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn concurrent_checkouts_link_one_customer_to_a_subscriber() {
    use diesel::connection::SimpleConnection;
    let (m, mut other) = postgres_and_another_writer().await;
    let webhooks = Webhooks::new();
    let t = now();
    for id in ["cus_first", "cus_second"] {
        let customer = json!({"id": id, "object": "customer", "created": t - 100});
        deliver(
            &webhooks,
            &m,
            &event(
                &format!("evt_{id}"),
                "customer.created",
                t - 100,
                customer,
                None,
            ),
        )
        .await;
    }
    other
        .batch_execute(
            "BEGIN; \
             INSERT INTO stripe_access (subscriber_id, livemode, dirty, version) VALUES ('user-9', FALSE, TRUE, 1) \
             ON CONFLICT (subscriber_id, livemode) DO UPDATE SET dirty = TRUE, version = stripe_access.version + 1; \
             UPDATE stripe_customers SET subscriber_id = 'user-9' WHERE id = 'cus_first';",
        )
        .unwrap();
    let session = json!({"id": "cs_second", "object": "checkout.session", "customer": "cus_second",
                         "client_reference_id": "user-9", "mode": "subscription"});
    let second = event(
        "evt_cs_second",
        "checkout.session.completed",
        t,
        session,
        None,
    );
    let delivered = deliver_while_held(&webhooks, &m, second).await;
    other.batch_execute("COMMIT").unwrap();
    let answer = delivered.await.unwrap();
    assert_eq!(answer.outcome, Outcome::Processed, "{:?}", answer.error);
    let holder = Customer::by_subscriber(&m, "user-9")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(holder.id, "cus_first");
    let second = Customer::get(&m, "cus_second").await.unwrap().unwrap();
    assert_eq!(
        second.subscriber_id, None,
        "a second customer linked to user-9"
    );
}

/// A Checkout link locks the customer's row before its subscriber's access row, the
/// order a customer event locks them in: with the customer held by another writer
/// (here by hand, as a `customer.updated` in another group would), the delivery waits
/// holding no access row, so that writer can mark the subscriber and commit; the
/// reverse order would deadlock.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_checkout_link_locks_in_the_order_customer_events_do() {
    use diesel::connection::SimpleConnection;
    let (m, mut other) = postgres_and_another_writer().await;
    let webhooks = Webhooks::new();
    let t = now();
    let customer = json!({"id": "cus_k", "object": "customer", "created": t - 100});
    deliver(
        &webhooks,
        &m,
        &event("evt_cus_k", "customer.created", t - 100, customer, None),
    )
    .await;
    other
        .batch_execute(
            "BEGIN; UPDATE stripe_customers SET email = 'k@example.com' WHERE id = 'cus_k';",
        )
        .unwrap();
    let session = json!({"id": "cs_k", "object": "checkout.session", "customer": "cus_k",
                         "client_reference_id": "user-7", "mode": "subscription"});
    let linking = event("evt_cs_k", "checkout.session.completed", t, session, None);
    let delivered = deliver_while_held(&webhooks, &m, linking).await;
    // The other writer marks the subscriber next, as a customer event does after its row.
    // Waiting for it would be a deadlock, which the mirror's writer breaks after its own
    // lock wait (250 ms) and Postgres after a second (`deadlock_timeout`): the other
    // writer gives up sooner than both, and says so.
    let marked = other.batch_execute(
        "SET LOCAL lock_timeout = '100ms'; \
         INSERT INTO stripe_access (subscriber_id, livemode, dirty, version) VALUES ('user-7', FALSE, TRUE, 1) \
         ON CONFLICT (subscriber_id, livemode) DO UPDATE SET dirty = TRUE, version = stripe_access.version + 1;",
    );
    assert!(
        marked.is_ok(),
        "the delivery held the access row: {marked:?}"
    );
    other.batch_execute("COMMIT").unwrap();
    let answer = delivered.await.unwrap();
    assert_eq!(answer.outcome, Outcome::Processed, "{:?}", answer.error);
    let linked = Customer::get(&m, "cus_k").await.unwrap().unwrap();
    assert_eq!(linked.subscriber_id.as_deref(), Some("user-7"));
}

/// Two writes move one customer to two subscribers at once on Postgres: the one that
/// commits second reads the subscriber the first one left it with (it waits for the
/// row), so that subscriber is marked too and its hook is told it lost access. Read
/// before the wait, the mark went to the subscriber both writes moved it from.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_customer_moved_twice_at_once_marks_every_subscriber_it_left() {
    use diesel::connection::SimpleConnection;
    let (m, mut other) = postgres_and_another_writer().await;
    let webhooks = Webhooks::new();
    let t = now();
    let customer = |subscriber: &str| {
        json!({"id": "cus_moved", "object": "customer", "created": t - 100,
               "metadata": {"stripe_mirror_subscriber": subscriber}})
    };
    let created = event(
        "evt_moved_0",
        "customer.created",
        t - 100,
        customer("user-0"),
        None,
    );
    deliver(&webhooks, &m, &created).await;
    // The other writer moves it to user-b and has not committed yet.
    other
        .batch_execute(
            "BEGIN; UPDATE stripe_customers SET subscriber_id = 'user-b' WHERE id = 'cus_moved';",
        )
        .unwrap();
    let moved = event(
        "evt_moved_a",
        "customer.updated",
        t,
        customer("user-a"),
        None,
    );
    let delivered = deliver_while_held(&webhooks, &m, moved).await;
    other.batch_execute("COMMIT").unwrap();
    let answer = delivered.await.unwrap();
    assert_eq!(answer.outcome, Outcome::Processed, "{:?}", answer.error);
    let marked = |subscriber: &str| {
        sql_number(
            m.config(),
            &format!(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM stripe_access WHERE subscriber_id = '{subscriber}' AND dirty"
            ),
        )
    };
    assert_eq!(marked("user-a"), 1, "the subscriber it moved to");
    assert_eq!(
        marked("user-b"),
        1,
        "the subscriber the other write left it with"
    );
}

#[tokio::test]
async fn checkout_never_moves_a_customer_to_another_subscriber() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        let t = now();
        let session = |id: &str, customer: &str, reference: &str| {
            json!({"id": id, "object": "checkout.session", "customer": customer,
                   "client_reference_id": reference, "mode": "subscription"})
        };
        // A customer created by get_or_create carries its subscriber in metadata.
        let owned = json!({"id": "cus_owned", "object": "customer", "created": t - 100,
                           "metadata": {"stripe_mirror_subscriber": "user-1"}});
        deliver(
            &webhooks,
            &m,
            &event("evt_own", "customer.created", t - 100, owned, None),
        )
        .await;
        // A buyer sets client_reference_id to someone else on a Payment Link.
        deliver(
            &webhooks,
            &m,
            &event(
                "evt_cs_hijack",
                "checkout.session.completed",
                t,
                session("cs_h", "cus_owned", "user-2"),
                None,
            ),
        )
        .await;
        let c = Customer::get(&m, "cus_owned").await.unwrap().unwrap();
        assert_eq!(c.subscriber_id.as_deref(), Some("user-1"), "{}", b.name);
        assert!(
            Customer::by_subscriber(&m, "user-2")
                .await
                .unwrap()
                .is_none(),
            "{}",
            b.name
        );

        // An unlinked customer is linked once; a later session cannot move it.
        deliver(
            &webhooks,
            &m,
            &event(
                "evt_cs_a",
                "checkout.session.completed",
                t,
                session("cs_a", "cus_new", "user-3"),
                None,
            ),
        )
        .await;
        deliver(
            &webhooks,
            &m,
            &event(
                "evt_cs_b",
                "checkout.session.completed",
                t + 1,
                session("cs_b", "cus_new", "user-4"),
                None,
            ),
        )
        .await;
        let c = Customer::get(&m, "cus_new").await.unwrap().unwrap();
        assert_eq!(c.subscriber_id.as_deref(), Some("user-3"), "{}", b.name);
        // The placeholder never beats the real customer data arriving later, even older.
        deliver(&webhooks, &m, &event("evt_new_c", "customer.created", t - 50,
            json!({"id": "cus_new", "object": "customer", "email": "n@example.com", "created": t - 50, "metadata": {}}), None)).await;
        let c = Customer::get(&m, "cus_new").await.unwrap().unwrap();
        assert_eq!(
            (c.email.as_deref(), c.subscriber_id.as_deref()),
            (Some("n@example.com"), Some("user-3")),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn by_subscriber_is_deterministic_with_null_created() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        let t = now();
        // A placeholder from Checkout (no `created`) and a real customer, same subscriber.
        deliver(&webhooks, &m, &event("evt_bs_1", "checkout.session.completed", t,
            json!({"id": "cs_bs", "object": "checkout.session", "customer": "cus_a_placeholder", "client_reference_id": "user-9"}), None)).await;
        Customer::sync_from_stripe_data(
            &m,
            &json!({"id": "cus_z_real", "object": "customer", "created": t - 1000,
            "metadata": {"stripe_mirror_subscriber": "user-9"}}),
        )
        .await
        .unwrap();
        let found = Customer::by_subscriber(&m, "user-9")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            found.id, "cus_z_real",
            "{}: rows with a `created` first",
            b.name
        );
        // Only rows without `created`: the smallest id, on both backends.
        for id in ["cus_q", "cus_p"] {
            Customer::sync_from_stripe_data(
                &m,
                &json!({"id": id, "object": "customer",
                "metadata": {"stripe_mirror_subscriber": "user-10"}}),
            )
            .await
            .unwrap();
        }
        let found = Customer::by_subscriber(&m, "user-10")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.id, "cus_p", "{}", b.name);
    }
}

#[tokio::test]
async fn reconcile_refetches_flagged_rows_failed_syncs_and_missed_events() {
    for b in backends() {
        let t = now();
        // A tie nothing settles, met with no API key: the row is flagged.
        let offline = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        for (n, status) in [(1, "active"), (2, "past_due")] {
            deliver(
                &webhooks,
                &offline,
                &event(
                    &format!("evt_rc{n}"),
                    "customer.subscription.updated",
                    t,
                    subscription("sub_rc", status),
                    None,
                ),
            )
            .await;
        }
        assert!(flagged(offline.config(), "stripe_subscriptions", "sub_rc"));
        // An event whose object the mirror cannot map: stored, its sync not applied.
        let bad = event(
            "evt_rc_bad",
            "customer.updated",
            t,
            json!({"id": "cus_rc_bad", "object": "customer", "email": 42}),
            None,
        );
        assert_eq!(webhooks.receive(&offline, post(&bad)).await.status, 400);

        // Stripe's side: the objects as they are, and an event the mirror never received.
        let missed = event(
            "evt_rc_missed",
            "product.updated",
            t,
            json!({"id": "prod_rc", "object": "product", "name": "Old"}),
            None,
        );
        let gone = event(
            "evt_rc_gone",
            "price.updated",
            t,
            json!({"id": "price_rc_gone", "object": "price", "product": "prod_rc"}),
            None,
        );
        let (base, hits) = stripe_stub(vec![
            (
                "/v1/subscriptions/sub_rc",
                200,
                subscription("sub_rc", "canceled"),
            ),
            (
                "/v1/customers/cus_rc_bad",
                200,
                json!({"id": "cus_rc_bad", "object": "customer", "email": "fixed@example.com"}),
            ),
            (
                "/v1/products/prod_rc",
                200,
                json!({"id": "prod_rc", "object": "product", "name": "Current"}),
            ),
            (
                "/v1/events",
                200,
                json!({"object": "list", "data": [missed, gone], "has_more": false}),
            ),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        Customer::sync_from_stripe_data(
            &m,
            &json!({"id": "cus_rc_live", "object": "customer", "livemode": true}),
        )
        .await
        .unwrap();
        common::execute_sql(
            &m.config().database_url,
            "UPDATE stripe_customers SET reconcile = TRUE WHERE id = 'cus_rc_live'",
        );
        let report = stripe_mirror::reconcile(&m, std::time::Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            (report.refetched, report.tombstoned, report.failed.len()),
            (3, 1, 0),
            "{}: {report:?}",
            b.name
        );
        assert_eq!(
            *hits.lock().unwrap(),
            5,
            "{}: one list, one fetch per object",
            b.name
        );

        let s = Subscription::get(&m, "sub_rc").await.unwrap().unwrap();
        assert_eq!(
            s.status.as_ref().map(|s| s.as_str()),
            Some("canceled"),
            "{}",
            b.name
        );
        assert!(
            !flagged(m.config(), "stripe_subscriptions", "sub_rc"),
            "{}",
            b.name
        );
        let c = Customer::get(&m, "cus_rc_bad").await.unwrap().unwrap();
        assert_eq!(c.email.as_deref(), Some("fixed@example.com"), "{}", b.name);
        let p = Product::get(&m, "prod_rc").await.unwrap().unwrap();
        assert_eq!(
            p.name.as_deref(),
            Some("Current"),
            "{}: Stripe's object, not the event's",
            b.name
        );
        assert!(
            stripe_mirror::Price::get(&m, "price_rc_gone")
                .await
                .unwrap()
                .unwrap()
                .deleted,
            "{}",
            b.name
        );
        // The other mode's rows wait for the other mode's key.
        let live = Customer::get(&m, "cus_rc_live").await.unwrap().unwrap();
        assert!(
            !live.deleted && flagged(m.config(), "stripe_customers", "cus_rc_live"),
            "{}",
            b.name
        );
        // The missed event itself is left for Stripe's redelivery (handlers still run then).
        let stored = sql_number(
            m.config(),
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM stripe_events WHERE id = 'evt_rc_missed'",
        );
        assert_eq!(stored, 0, "{}", b.name);
    }
}

/// An id that makes no URI (a space in it) is refused at once, never sent, never
/// retried as if the network had failed.
#[tokio::test]
async fn an_id_that_makes_no_uri_is_refused_without_retries() {
    let b = backends().remove(0);
    let (base, hits) = stripe_stub(vec![]).await;
    let mut config = config(&b, Some(&base));
    config.stripe_retries = 3;
    config.stripe_retry_backoff = std::time::Duration::from_millis(1);
    let m = Mirror::connect(config).await.unwrap();
    let err = Customer::sync(&m, "cus with spaces")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad request"), "{err}");
    assert!(!err.contains("attempts"), "retried: {err}");
    assert_eq!(*hits.lock().unwrap(), 0);
}

/// An answer larger than any Stripe sends (a proxy's, a fake's) is refused once it
/// passes 32 MiB, not read whole into memory.
#[tokio::test]
async fn an_answer_too_large_is_refused() {
    let b = backends().remove(0);
    let huge = json!({"id": "cus_huge", "object": "customer", "name": "x".repeat(33 << 20)});
    let (base, hits) = stripe_stub(vec![("/v1/customers/cus_huge", 200, huge)]).await;
    let mut config = config(&b, Some(&base));
    config.stripe_retries = 2;
    config.stripe_retry_backoff = std::time::Duration::from_millis(1);
    let m = Mirror::connect(config).await.unwrap();
    let err = Customer::sync(&m, "cus_huge")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("larger than 32 MiB"), "{err}");
    // Not downloaded again: another attempt would be as large.
    assert_eq!(*hits.lock().unwrap(), 1, "{err}");
    assert!(Customer::get(&m, "cus_huge").await.unwrap().is_none());
}

/// `StripeClient::post` with a form nested deeper than Stripe's encoding allows (a
/// caller's mistake) answers an error instead of panicking, and sends nothing.
#[tokio::test]
async fn a_form_too_deep_for_stripe_is_an_error_not_a_panic() {
    let b = backends().remove(0);
    let (base, hits) = stripe_stub(vec![]).await;
    let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
    let deep = json!({"metadata": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}});
    let client = m.stripe().await.unwrap();
    let err = client
        .post("/customers", &deep, None, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("form encoding"), "{err}");
    assert_eq!(*hits.lock().unwrap(), 0);
}

/// Stripe sends a legacy `plan.*` event beside each `price.*` one of a recurring price.
/// A plan holds part of the price (no `lookup_key`, the amount under another name): it
/// must not clear what only the price carries, so it is fetched whole as a price.
#[tokio::test]
async fn a_plan_event_is_fetched_as_its_price_and_keeps_the_lookup_key() {
    for b in backends() {
        let t = now();
        let price = |amount: i64| {
            json!({"id": "price_plan", "object": "price", "product": "prod_plan", "active": true,
                   "currency": "usd", "unit_amount": amount, "lookup_key": "pro_monthly", "created": t - 100,
                   "recurring": {"interval": "month", "interval_count": 1}})
        };
        let plan = json!({"id": "price_plan", "object": "plan", "product": "prod_plan", "active": true,
                          "currency": "usd", "amount": 1500, "interval": "month", "interval_count": 1,
                          "created": t - 100});
        let (base, hits) = stripe_stub(vec![("/v1/prices/price_plan", 200, price(1500))]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let webhooks = Webhooks::new();
        deliver(
            &webhooks,
            &m,
            &event("evt_price", "price.created", t - 100, price(1000), None),
        )
        .await;
        deliver(
            &webhooks,
            &m,
            &event("evt_plan", "plan.updated", t, plan, None),
        )
        .await;
        let p = Price::by_lookup_key(&m, "pro_monthly")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{}: the lookup key was cleared", b.name));
        assert_eq!(p.unit_amount, Some(1500), "{}", b.name);
        assert_eq!(p.data()["object"], "price", "{}", b.name);
        assert_eq!(*hits.lock().unwrap(), 1, "{}", b.name);
        assert!(
            !flagged(m.config(), "stripe_prices", "price_plan"),
            "{}",
            b.name
        );
    }
}

/// A fetch that Stripe answers slowly (a list page of expanded objects can take
/// seconds) read the object when it was asked for, not when the answer came: an update
/// made while it was on its way is newer, and the late answer must not undo it.
#[tokio::test]
async fn a_slow_fetch_does_not_undo_an_update_made_while_it_was_answered() {
    use axum::{Router, routing::get};
    for b in backends() {
        let read = json!({"id": "cus_slow", "object": "customer", "email": "old@example.com", "created": now() - 1000});
        let app = Router::new().route(
            "/v1/customers/cus_slow",
            get(move || {
                let read = read.clone();
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(2300)).await;
                    axum::Json(read)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let webhooks = Webhooks::new();

        let fetch = {
            let m = m.clone();
            tokio::spawn(async move { Customer::sync(&m, "cus_slow").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let update = event(
            "evt_while_read",
            "customer.updated",
            now(),
            json!({"id": "cus_slow", "object": "customer", "email": "new@example.com"}),
            Some(json!({"email": "old@example.com"})),
        );
        deliver(&webhooks, &m, &update).await;
        fetch.await.unwrap().unwrap();
        let c = Customer::get(&m, "cus_slow").await.unwrap().unwrap();
        assert_eq!(c.email.as_deref(), Some("new@example.com"), "{}", b.name);
    }
}

/// A Payment Link buyer is linked to the app's user only by `checkout.session.completed`
/// (its `client_reference_id`): when that webhook was missed, `reconcile` finds the
/// session in Stripe's event list and links it by the same rule, for the platform's
/// sessions of the mirror's mode only.
#[tokio::test]
async fn reconcile_links_the_buyer_of_a_missed_checkout() {
    for b in backends() {
        let t = now();
        let session = |id: &str, customer: &str, user: &str| {
            json!({"id": id, "object": "checkout.session", "status": "complete", "mode": "subscription",
                   "customer": customer, "client_reference_id": user, "subscription": format!("sub_{customer}")})
        };
        let completed = |id: &str, s: Value| event(id, "checkout.session.completed", t, s, None);
        let mut connected = completed("evt_rl_acct", session("cs_acct", "cus_acct", "acct-user"));
        connected["account"] = json!("acct_1");
        let mut live = completed("evt_rl_live", session("cs_live", "cus_live", "live-user"));
        live["livemode"] = json!(true);
        let events = json!({"object": "list", "has_more": false, "data": [
            completed("evt_rl", session("cs_rl", "cus_buyer", "buyer-1")), connected, live]});
        let customer = json!({"id": "cus_buyer", "object": "customer", "email": "buyer@example.com", "created": t - 10});
        let (base, _) = stripe_stub(vec![
            ("/v1/events", 200, events),
            ("/v1/customers/cus_buyer", 200, customer),
            (
                "/v1/subscriptions/sub_cus_buyer",
                200,
                json!({"id": "sub_cus_buyer", "object": "subscription", "customer": "cus_buyer",
                       "status": "active", "created": t - 10,
                       "items": {"object": "list", "data": [{"id": "si_buyer", "object": "subscription_item",
                           "price": {"id": "price_rl", "object": "price", "product": "prod_rl"},
                           "current_period_end": 4102444800_i64}]}}),
            ),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        assert!(
            Customer::by_subscriber(&m, "buyer-1")
                .await
                .unwrap()
                .is_none()
        );

        let report = stripe_mirror::reconcile(&m, std::time::Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(report.checkout_sessions, 1, "{}: {report:?}", b.name);
        let c = Customer::by_subscriber(&m, "buyer-1")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{}: the buyer is not linked", b.name));
        assert_eq!(
            (c.id.as_str(), c.email.as_deref()),
            ("cus_buyer", Some("buyer@example.com")),
            "{}",
            b.name
        );
        assert!(
            stripe_mirror::access::require_subscription("buyer-1")
                .check(&m)
                .await
                .unwrap()
                .is_ok(),
            "{}",
            b.name
        );
        for user in ["acct-user", "live-user"] {
            assert!(
                Customer::by_subscriber(&m, user).await.unwrap().is_none(),
                "{}: {user}",
                b.name
            );
        }
    }
}

/// A plan's event and its price's, of one change in one second, with no API key to
/// fetch the price: whichever comes first, the price's whole payload is what stays.
#[tokio::test]
async fn a_plan_and_its_price_in_one_second_keep_the_price_without_an_api_key() {
    for b in backends() {
        let t = now();
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        for (k, order) in [["plan", "price"], ["price", "plan"]].iter().enumerate() {
            let id = format!("price_pair{k}");
            let key = format!("pair_{k}");
            for kind in order {
                let object = if *kind == "plan" {
                    json!({"id": id, "object": "plan", "product": "prod_pair", "active": true,
                           "currency": "usd", "amount": 700, "interval": "month", "created": t})
                } else {
                    json!({"id": id, "object": "price", "product": "prod_pair", "active": true,
                           "currency": "usd", "unit_amount": 700, "lookup_key": key, "created": t,
                           "recurring": {"interval": "month", "interval_count": 1}})
                };
                let ev = event(
                    &format!("evt_pair{k}_{kind}"),
                    &format!("{kind}.created"),
                    t,
                    object,
                    None,
                );
                deliver(&webhooks, &m, &ev).await;
            }
            let p = Price::get(&m, &id).await.unwrap().unwrap();
            assert_eq!(
                (p.lookup_key.as_deref(), p.data()["object"].as_str()),
                (Some(key.as_str()), Some("price")),
                "{} order {order:?}",
                b.name
            );
        }
    }
}

/// Two versions of one subscription in one second, the held one partial (its items
/// past the first page to come): not a plan and its price, so the whole one does not
/// win for being whole; nothing settles them, so the row is kept and flagged.
#[tokio::test]
async fn a_whole_subscription_does_not_beat_a_partial_one_of_its_second_for_being_whole() {
    for b in backends() {
        let t = now();
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        let item = |i: usize| {
            json!({"id": format!("si_pw{i}"), "object": "subscription_item",
                   "price": {"id": format!("price_pw{i}"), "object": "price", "product": format!("prod_pw{i}")},
                   "current_period_end": 4102444800_i64})
        };
        let sub = |items: Vec<Value>, more: bool| {
            json!({"id": "sub_pw", "object": "subscription", "customer": "cus_pw", "status": "active",
                   "items": {"object": "list", "has_more": more, "data": items}})
        };
        let newer = event(
            "evt_pw_partial",
            "customer.subscription.updated",
            t,
            sub(vec![item(1), item(2)], true),
            None,
        );
        let older = event(
            "evt_pw_whole",
            "customer.subscription.updated",
            t,
            sub(vec![item(1)], false),
            None,
        );
        deliver(&webhooks, &m, &newer).await;
        deliver(&webhooks, &m, &older).await;
        let s = Subscription::get(&m, "sub_pw").await.unwrap().unwrap();
        let items: Vec<String> = s
            .items(&m)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert!(
            items.contains(&"si_pw2".to_owned()),
            "{}: {items:?}",
            b.name
        );
        assert!(
            flagged(m.config(), "stripe_subscriptions", "sub_pw"),
            "{}",
            b.name
        );
    }
}
