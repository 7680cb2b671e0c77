//! Selling with the mirror: access gates over every subscription status and product
//! mix, roles from product metadata, Entitlements features, get_or_create for every
//! model, and the Checkout, Billing Portal and Payment Element requests (checked form
//! parameter by form parameter against an in-process stub, as no fake Stripe serves
//! them). Every test runs on SQLite and Postgres.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::backends;
use serde_json::{Value, json};
use stripe_mirror::access::{Denial, require_subscription};
use stripe_mirror::checkout::{BillingPortal, Checkout, billing_portal};
use stripe_mirror::models::price::NewPrice;
use stripe_mirror::models::product::NewProduct;
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::{
    Config, Customer, EntitlementSummary, Error, Mirror, Price, Product, ProductFeature, Secret,
    Subscriber, Subscription, WebhookRequest, Webhooks, has_feature, has_role,
};

const SECRET: &str = "whsec_test_saas";
const FAR: i64 = 4_102_444_800; // 2100
const PAST: i64 = 1_600_000_000; // 2020

struct User(&'static str);

impl Subscriber for User {
    fn subscriber_id(&self) -> String {
        self.0.to_owned()
    }
    fn email(&self) -> Option<String> {
        Some(format!("{}@example.com", self.0))
    }
}

fn config(b: &common::Backend, api_base: Option<&str>) -> Config {
    let mut config = b.config.clone();
    config.webhook_secrets = vec![Secret::new(SECRET)];
    if let Some(base) = api_base {
        config.api_base = Some(base.to_owned());
        config.secret_key = Some(Secret::new("sk_test_saas_00000000"));
        config.stripe_retries = 0;
    }
    config
}

async fn customer(m: &Mirror, id: &str, subscriber: &str) {
    Customer::sync_from_stripe_data(
        m,
        &json!({"id": id, "object": "customer", "created": 1,
        "metadata": {"stripe_mirror_subscriber": subscriber}}),
    )
    .await
    .unwrap();
}

async fn subscription(
    m: &Mirror,
    id: &str,
    customer: &str,
    status: &str,
    products: &[&str],
    extra: Value,
) {
    let items: Vec<Value> = products
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"id": format!("si_{id}_{i}"), "object": "subscription_item",
                             "price": {"id": format!("price_{p}"), "product": p}, "current_period_end": FAR}))
        .collect();
    let mut sub = json!({"id": id, "object": "subscription", "customer": customer, "status": status,
                         "created": 100, "items": {"data": items}});
    for (k, v) in extra.as_object().unwrap() {
        sub[k] = v.clone();
    }
    Subscription::sync_from_stripe_data(m, &sub).await.unwrap();
}

#[tokio::test]
async fn the_gate_answers_every_status_and_product_mix_with_its_reason() {
    // (status, extra fields, granted without past_due grace, with it)
    let cases: [(&str, Value, Option<&str>, Option<&str>); 13] = [
        ("active", json!({}), None, None),
        ("trialing", json!({"trial_end": FAR}), None, None),
        ("past_due", json!({}), Some("past_due"), None),
        (
            "canceled",
            json!({"canceled_at": PAST, "ended_at": PAST}),
            Some("canceled"),
            Some("canceled"),
        ),
        ("incomplete", json!({}), Some("inactive"), Some("inactive")),
        (
            "incomplete_expired",
            json!({}),
            Some("inactive"),
            Some("inactive"),
        ),
        ("unpaid", json!({}), Some("inactive"), Some("inactive")),
        ("paused", json!({}), Some("inactive"), Some("inactive")),
        // Set to cancel: valid while the period lasts, canceled once its date passed.
        ("active", json!({"cancel_at_period_end": true}), None, None),
        (
            "active",
            // The cancellation date passed mid-period (its event late): no access.
            json!({"cancel_at": PAST}),
            Some("canceled"),
            Some("canceled"),
        ),
        // Set to cancel months ahead, between a period's end and its renewal's event:
        // still granted (the cancellation date, not each renewal, ends access).
        (
            "active",
            json!({"cancel_at": FAR, "current_period_end": PAST}),
            None,
            None,
        ),
        // Past due and its cancellation date passed: the past-due grace does not
        // reopen a subscription that has ended.
        (
            "past_due",
            json!({"cancel_at": PAST}),
            Some("canceled"),
            Some("canceled"),
        ),
        // Past due, set to cancel with its period, and the period is over.
        (
            "past_due",
            json!({"cancel_at_period_end": true, "current_period_end": PAST}),
            Some("canceled"),
            Some("canceled"),
        ),
    ];
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        for (k, (status, extra, strict, lenient)) in cases.iter().enumerate() {
            let (user, cus) = (format!("user-{k}"), format!("cus_{k}"));
            customer(&m, &cus, &user).await;
            let mut extra = extra.clone();
            if extra.get("current_period_end").is_some() {
                // Period ended: items too.
                extra["items"] = json!({"data": [{"id": format!("si_{k}"), "object": "subscription_item",
                    "price": {"id": "price_pro", "product": "prod_pro"}, "current_period_end": PAST}]});
            }
            subscription(&m, &format!("sub_{k}"), &cus, status, &["prod_pro"], extra).await;
            for (gate, expected) in [
                (
                    require_subscription(&user).to_products(&["prod_starter", "prod_pro"]),
                    strict,
                ),
                (
                    require_subscription(&user)
                        .to_products(&["prod_pro"])
                        .allow_past_due(true),
                    lenient,
                ),
            ] {
                let decision = gate.check(&m).await.unwrap();
                match (expected, &decision) {
                    (None, Ok(sub)) => {
                        assert_eq!(sub.id, format!("sub_{k}"), "{} case {k}", b.name)
                    }
                    (Some(code), Err(denial)) => assert_eq!(
                        denial.code(),
                        *code,
                        "{} case {k} {status}: {denial}",
                        b.name
                    ),
                    _ => panic!(
                        "{} case {k} {status}: expected {expected:?}, got {decision:?}",
                        b.name
                    ),
                }
            }
            // A valid Pro subscription does not open a Basic-only page.
            if strict.is_none() {
                let basic = require_subscription(&user)
                    .to_products(&["prod_basic"])
                    .check(&m)
                    .await
                    .unwrap();
                assert_eq!(
                    basic.unwrap_err(),
                    Denial::WrongProduct {
                        wanted: vec!["prod_basic".into()]
                    },
                    "{}",
                    b.name
                );
            }
        }
        // Nobody, and a customer who never subscribed.
        let none = require_subscription("stranger").check(&m).await.unwrap();
        assert_eq!(none.unwrap_err(), Denial::NoCustomer);
        customer(&m, "cus_new", "newcomer").await;
        let new = require_subscription("newcomer").check(&m).await.unwrap();
        assert_eq!(new.unwrap_err(), Denial::NoSubscription);
        assert!(
            Denial::NoSubscription.needs_payment()
                && !Denial::WrongProduct { wanted: vec![] }.needs_payment()
        );

        // Several subscriptions: the one matching the products grants, whatever came first.
        customer(&m, "cus_multi", "multi").await;
        subscription(
            &m,
            "sub_multi_basic",
            "cus_multi",
            "active",
            &["prod_basic"],
            json!({"created": 300}),
        )
        .await;
        subscription(
            &m,
            "sub_multi_pro",
            "cus_multi",
            "active",
            &["prod_pro"],
            json!({"created": 200}),
        )
        .await;
        subscription(
            &m,
            "sub_multi_old",
            "cus_multi",
            "canceled",
            &["prod_starter"],
            json!({"created": 100}),
        )
        .await;
        let pro = require_subscription("multi")
            .to_products(&["prod_pro"])
            .check(&m)
            .await
            .unwrap();
        assert_eq!(pro.unwrap().id, "sub_multi_pro", "{}", b.name);
        let any = require_subscription("multi").check(&m).await.unwrap();
        assert_eq!(
            any.unwrap().id,
            "sub_multi_basic",
            "{}: the newest valid one",
            b.name
        );
    }
}

#[tokio::test]
async fn roles_come_from_product_metadata() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        for (id, roles) in [("prod_pro", "pro, team"), ("prod_basic", "")] {
            Product::sync_from_stripe_data(
                &m,
                &json!({"id": id, "object": "product", "name": id,
                "active": true, "metadata": {"roles": roles}}),
            )
            .await
            .unwrap();
        }
        customer(&m, "cus_r1", "pro-user").await;
        subscription(&m, "sub_r1", "cus_r1", "active", &["prod_pro"], json!({})).await;
        customer(&m, "cus_r2", "basic-user").await;
        subscription(&m, "sub_r2", "cus_r2", "active", &["prod_basic"], json!({})).await;
        customer(&m, "cus_r3", "lapsed-user").await;
        subscription(&m, "sub_r3", "cus_r3", "canceled", &["prod_pro"], json!({})).await;
        assert!(has_role(&m, "pro-user", "pro").await.unwrap(), "{}", b.name);
        assert!(
            has_role(&m, "pro-user", "team").await.unwrap(),
            "{}: trimmed",
            b.name
        );
        assert!(
            !has_role(&m, "pro-user", "admin").await.unwrap(),
            "{}",
            b.name
        );
        assert!(
            !has_role(&m, "basic-user", "pro").await.unwrap(),
            "{}",
            b.name
        );
        assert!(
            !has_role(&m, "lapsed-user", "pro").await.unwrap(),
            "{}: only valid subscriptions",
            b.name
        );
        let why = require_subscription("basic-user")
            .with_role("pro")
            .check(&m)
            .await
            .unwrap();
        assert_eq!(why.unwrap_err(), Denial::MissingRole { role: "pro".into() });
    }
}

fn signed(v: &Value) -> WebhookRequest {
    let body = v.to_string().into_bytes();
    let header = sign(&body, &Secret::new(SECRET), chrono::Utc::now().timestamp());
    WebhookRequest::new(body).header("Stripe-Signature", header)
}

fn summary_event(id: &str, created: i64, customer: &str, keys: &[&str]) -> Value {
    let entitlements: Vec<Value> = keys
        .iter()
        .map(|k| json!({"id": format!("ent_{k}"), "object": "entitlements.active_entitlement", "lookup_key": k,
                        "feature": {"id": format!("feat_{k}"), "object": "entitlements.feature", "lookup_key": k}}))
        .collect();
    json!({"id": id, "object": "event", "type": "entitlements.active_entitlement_summary.updated", "created": created,
           "livemode": false, "data": {"object": {"object": "entitlements.active_entitlement_summary",
           "customer": customer, "livemode": false, "entitlements": {"object": "list", "data": entitlements, "has_more": false}}}})
}

/// A feature detached from a product in Stripe changes what its subscribers may do:
/// re-syncing the product's features marks them, and the access hook is told, as for
/// a feature attached.
#[tokio::test]
async fn a_feature_detached_in_stripe_is_told_to_the_access_hook() {
    for b in backends() {
        let attached = json!({"object": "list", "has_more": false, "data": [
            {"id": "prodft_d1", "object": "product_feature", "livemode": false,
             "entitlement_feature": {"id": "feat_d1", "object": "entitlements.feature", "lookup_key": "exports"}}]});
        let detached = json!({"object": "list", "has_more": false, "data": []});
        let (before, _) =
            common::stripe_stub(vec![("/v1/products/prod_det/features", 200, attached)]).await;
        let (after, _) =
            common::stripe_stub(vec![("/v1/products/prod_det/features", 200, detached)]).await;
        let m = Mirror::connect(config(&b, Some(&before))).await.unwrap();
        let told: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let seen = told.clone();
        let webhooks = Webhooks::new().on_access_change(move |change, _m| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(change.after.features);
                Ok(())
            }
        });
        customer(&m, "cus_det", "detach-user").await;
        subscription(&m, "sub_det", "cus_det", "active", &["prod_det"], json!({})).await;
        ProductFeature::sync_for_product(&m, "prod_det")
            .await
            .unwrap();
        let report = webhooks.deliver_access_changes(&m).await.unwrap();
        assert_eq!(report.told, 1, "{}: {report:?}", b.name);
        assert_eq!(told.lock().unwrap().last().unwrap(), &["exports"]);

        // The same database, Stripe now listing no feature for the product.
        let later = Mirror::connect(config(&b, Some(&after))).await.unwrap();
        let left = ProductFeature::sync_for_product(&later, "prod_det")
            .await
            .unwrap();
        assert!(left.is_empty(), "{}", b.name);
        assert!(
            !has_feature(&later, "detach-user", "exports").await.unwrap(),
            "{}",
            b.name
        );
        let report = webhooks.deliver_access_changes(&later).await.unwrap();
        assert_eq!(
            report.told, 1,
            "{}: the detached feature was not told: {report:?}",
            b.name
        );
        assert!(
            told.lock().unwrap().last().unwrap().is_empty(),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn features_follow_the_entitlement_summary_then_product_features() {
    for b in backends() {
        let features = json!({"object": "list", "has_more": false, "data": [
            {"id": "prodft_1", "object": "product_feature", "livemode": false,
             "entitlement_feature": {"id": "feat_1", "object": "entitlements.feature", "lookup_key": "exports"}}]});
        let (base, _) =
            common::stripe_stub(vec![("/v1/products/prod_feat/features", 200, features)]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let webhooks = Webhooks::new();
        customer(&m, "cus_f", "feature-user").await;
        subscription(&m, "sub_f", "cus_f", "active", &["prod_feat"], json!({})).await;

        // No summary yet: the subscribed product's mirrored features answer.
        assert!(
            !has_feature(&m, "feature-user", "exports").await.unwrap(),
            "{}: nothing mirrored",
            b.name
        );
        let synced = ProductFeature::sync_for_product(&m, "prod_feat")
            .await
            .unwrap();
        assert_eq!(synced[0].lookup_key.as_deref(), Some("exports"));
        assert!(
            has_feature(&m, "feature-user", "exports").await.unwrap(),
            "{}",
            b.name
        );

        // Stripe's summary, once it arrives, is the answer (newest event wins).
        let t = chrono::Utc::now().timestamp();
        let r = webhooks
            .receive(
                &m,
                signed(&summary_event("evt_sum1", t, "cus_f", &["sso", "audit"])),
            )
            .await;
        assert_eq!(r.status, 200, "{}: {:?}", b.name, r.error);
        assert!(
            has_feature(&m, "feature-user", "sso").await.unwrap(),
            "{}",
            b.name
        );
        assert!(
            !has_feature(&m, "feature-user", "exports").await.unwrap(),
            "{}: the summary decides",
            b.name
        );
        let stale = webhooks
            .receive(&m, signed(&summary_event("evt_sum0", t - 60, "cus_f", &[])))
            .await;
        assert_eq!(stale.status, 200);
        assert!(
            has_feature(&m, "feature-user", "audit").await.unwrap(),
            "{}: an older summary changes nothing",
            b.name
        );
        let emptied = webhooks
            .receive(&m, signed(&summary_event("evt_sum2", t + 1, "cus_f", &[])))
            .await;
        assert_eq!(emptied.status, 200);
        let why = require_subscription("feature-user")
            .with_feature("sso")
            .check(&m)
            .await
            .unwrap();
        assert_eq!(
            why.unwrap_err(),
            Denial::MissingFeature {
                feature: "sso".into()
            },
            "{}",
            b.name
        );
    }
}

/// An event's summary lists at most 10 entitlements and says `has_more`: the mirror
/// fetches the customer's whole list (every page) before it answers, so features past
/// the 10th are not lost; when that fetch fails, the delivery is a 503 for Stripe to
/// retry and the row stays flagged for `reconcile`.
#[tokio::test]
async fn a_partial_entitlement_summary_is_fetched_whole() {
    for b in backends() {
        let keys: Vec<String> = (1..=12).map(|i| format!("f{i:02}")).collect();
        let listed = |keys: &[String], more: bool| {
            let data: Vec<Value> = keys
                .iter()
                .map(|k| json!({"id": format!("ent_{k}"), "object": "entitlements.active_entitlement",
                    "livemode": false, "lookup_key": k,
                    "feature": {"id": format!("feat_{k}"), "object": "entitlements.feature", "lookup_key": k}}))
                .collect();
            json!({"object": "list", "has_more": more, "data": data})
        };
        let (base, hits) = common::stripe_stub(vec![
            (
                "/v1/entitlements/active_entitlements?starting_after=ent_f10",
                200,
                listed(&keys[10..], false),
            ),
            (
                "/v1/entitlements/active_entitlements?customer=cus_many",
                200,
                listed(&keys[..10], true),
            ),
            (
                "/v1/entitlements/active_entitlements?customer=cus_down",
                500,
                json!({"error": {"type": "api_error", "message": "down"}}),
            ),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        // A handler sees the whole summary: it runs only once the fetch has landed.
        let seen: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
        let log = seen.clone();
        let webhooks = Webhooks::new().on(
            "entitlements.*",
            move |event: stripe_mirror::Event, m: Mirror| {
                let log = log.clone();
                async move {
                    let customer = event.object()["customer"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let held = EntitlementSummary::for_customer(&m, &customer).await?;
                    let features = held.map(|s| s.features().len()).unwrap_or_default();
                    log.lock().unwrap().push((event.id.clone(), features));
                    Ok(())
                }
            },
        );
        for (cus, user) in [("cus_many", "many-user"), ("cus_down", "down-user")] {
            customer(&m, cus, user).await;
            subscription(
                &m,
                &format!("sub_{cus}"),
                cus,
                "active",
                &["prod_x"],
                json!({}),
            )
            .await;
        }
        let t = chrono::Utc::now().timestamp();
        let first_ten: Vec<&str> = keys[..10].iter().map(String::as_str).collect();
        let partial = |id: &str, customer: &str| {
            let mut event = summary_event(id, t, customer, &first_ten);
            event["data"]["object"]["entitlements"]["has_more"] = json!(true);
            event
        };

        let r = webhooks
            .receive(&m, signed(&partial("evt_many", "cus_many")))
            .await;
        assert_eq!(r.status, 200, "{}: {:?}", b.name, r.error);
        assert_eq!(*hits.lock().unwrap(), 2, "{}: both pages fetched", b.name);
        for key in ["f01", "f10", "f11", "f12"] {
            assert!(
                has_feature(&m, "many-user", key).await.unwrap(),
                "{}: {key} of 12",
                b.name
            );
        }
        let summary = EntitlementSummary::for_customer(&m, "cus_many")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(summary.features().len(), 12, "{}", b.name);

        // The fetch fails: answered 503 (Stripe redelivers), and what the event
        // listed is kept, flagged for `reconcile`.
        let r = webhooks
            .receive(&m, signed(&partial("evt_down", "cus_down")))
            .await;
        assert_eq!(r.status, 503, "{}: {:?}", b.name, r.error);
        assert!(
            has_feature(&m, "down-user", "f10").await.unwrap(),
            "{}",
            b.name
        );
        assert!(
            !has_feature(&m, "down-user", "f11").await.unwrap(),
            "{}",
            b.name
        );
        let flagged = common::query_count(
            &b.config.database_url,
            "SELECT COUNT(*) AS n FROM stripe_entitlement_summaries WHERE reconcile = TRUE",
        );
        assert_eq!(flagged, 1, "{}: only the one not fetched", b.name);
        assert_eq!(
            *seen.lock().unwrap(),
            [("evt_many".to_owned(), 12)],
            "{}: the handler waits for the whole summary",
            b.name
        );

        // Stripe's redelivery, once the API answers: fetched, then the handler runs.
        let (up, _) = common::stripe_stub(vec![(
            "/v1/entitlements/active_entitlements?customer=cus_down",
            200,
            listed(&keys, false),
        )])
        .await;
        let again = Mirror::connect(config(&b, Some(&up))).await.unwrap();
        let r = webhooks
            .receive(&again, signed(&partial("evt_down", "cus_down")))
            .await;
        assert_eq!(r.status, 200, "{}: {:?}", b.name, r.error);
        assert!(
            has_feature(&m, "down-user", "f11").await.unwrap(),
            "{}",
            b.name
        );
        assert_eq!(
            seen.lock().unwrap().last(),
            Some(&("evt_down".to_owned(), 12)),
            "{}",
            b.name
        );
        let flagged = common::query_count(
            &b.config.database_url,
            "SELECT COUNT(*) AS n FROM stripe_entitlement_summaries WHERE reconcile = TRUE",
        );
        assert_eq!(flagged, 0, "{}", b.name);

        // A customer Stripe answers 404 for: the summary is removed and its
        // subscriber's features fall back to the products' own (none here).
        let err = EntitlementSummary::sync(&again, "cus_many")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{}: {err}", b.name);
        assert!(err.to_string().contains("Stripe has none either"), "{err}");
        assert!(
            !has_feature(&m, "many-user", "f01").await.unwrap(),
            "{}",
            b.name
        );
    }
}

/// Stripe embeds a subscription's first 10 items (of up to 20) and says `has_more`:
/// the mirror fetches the rest (`/v1/subscription_items`, every page) wherever a
/// subscription is fetched (an event's follow-up, `Subscription::sync`, `sync_all`),
/// so a product on the 11th item grants access. Each path has a subscription of its
/// own, so none passes on another's items.
#[tokio::test]
async fn subscription_items_past_the_first_page_are_fetched() {
    for b in backends() {
        let item = |sub: &str, i: usize| {
            json!({"id": format!("si_{sub}_{i:02}"), "object": "subscription_item",
            "price": {"id": format!("price_{i:02}"), "object": "price", "product": format!("prod_{i:02}")},
            "quantity": 1, "current_period_start": 100, "current_period_end": FAR})
        };
        let items = |sub: &str, range: std::ops::Range<usize>, more: bool| {
            let data: Vec<Value> = range.map(|i| item(sub, i)).collect();
            json!({"object": "list", "has_more": more, "data": data})
        };
        let sub = |id: &str, customer: &str| {
            json!({"id": id, "object": "subscription", "customer": customer,
            "status": "active", "created": 100, "livemode": false, "items": items(id, 1..11, true)})
        };
        let mut routes = vec![
            (
                "/v1/subscriptions/sub_sync",
                200,
                sub("sub_sync", "cus_sync"),
            ),
            ("/v1/subscriptions/sub_evt", 200, sub("sub_evt", "cus_evt")),
            (
                "/v1/subscriptions/sub_gone_items",
                200,
                sub("sub_gone_items", "cus_gi"),
            ),
            (
                "/v1/subscriptions",
                200,
                json!({"object": "list", "has_more": false,
                "data": [sub("sub_list", "cus_list"), sub("sub_down", "cus_down_l")]}),
            ),
            (
                "/v1/subscription_items?subscription=sub_down",
                500,
                json!({"error": {"type": "api_error", "message": "down"}}),
            ),
        ];
        // Each subscription's two pages of items (11 and 12 on the second); the items of
        // `sub_gone_items` answer 404 (the unmatched route).
        let pages: Vec<(&'static str, Value)> = ["sub_evt", "sub_sync", "sub_list"]
            .into_iter()
            .flat_map(|s| {
                let later: &'static str =
                    format!("/v1/subscription_items?starting_after=si_{s}_10").leak();
                let first: &'static str = format!("/v1/subscription_items?subscription={s}").leak();
                [
                    (later, items(s, 11..13, false)),
                    (first, items(s, 1..11, true)),
                ]
            })
            .collect();
        routes.splice(0..0, pages.into_iter().map(|(r, v)| (r, 200, v)));
        let (base, _) = common::stripe_stub(routes).await;
        let mirror = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let m = &mirror;
        for (cus, user) in [
            ("cus_evt", "evt-user"),
            ("cus_sync", "sync-user"),
            ("cus_list", "list-user"),
            ("cus_down_l", "list-down-user"),
            ("cus_gi", "gi-user"),
        ] {
            customer(m, cus, user).await;
        }
        let whole = |user: &'static str| async move {
            require_subscription(user)
                .to_products(["prod_12"])
                .check(m)
                .await
                .unwrap()
                .is_ok()
        };
        let count = |id: &'static str| async move {
            Subscription::get(m, id)
                .await
                .unwrap()
                .unwrap()
                .items(m)
                .await
                .unwrap()
                .len()
        };

        // An event: answered once the rest is fetched, and no longer flagged.
        let t = chrono::Utc::now().timestamp();
        let event = json!({"id": "evt_items", "object": "event", "type": "customer.subscription.created",
            "created": t, "livemode": false, "data": {"object": sub("sub_evt", "cus_evt")}});
        let r = Webhooks::new().receive(m, signed(&event)).await;
        assert_eq!(r.status, 200, "{}: {:?}", b.name, r.error);
        assert_eq!(count("sub_evt").await, 12, "{}", b.name);
        assert!(
            whole("evt-user").await,
            "{}: the 12th item's product",
            b.name
        );

        // `Subscription::sync`.
        let synced = Subscription::sync(m, "sub_sync").await.unwrap();
        assert_eq!(
            synced.data()["items"]["has_more"],
            json!(false),
            "{}",
            b.name
        );
        assert_eq!(count("sub_sync").await, 12, "{}", b.name);
        assert!(whole("sync-user").await, "{}", b.name);

        // `sync_all`: one subscription completed; one whose items cannot be fetched is
        // written as listed, reported and flagged.
        let mut options = stripe_mirror::SyncOptions::default();
        options.objects = vec!["subscription".into()];
        let report = stripe_mirror::sync_all(m, &options, |_| {}).await.unwrap();
        assert_eq!(count("sub_list").await, 12, "{}", b.name);
        assert!(whole("list-user").await, "{}", b.name);
        assert_eq!(count("sub_down").await, 10, "{}", b.name);
        assert_eq!(report.failures.len(), 1, "{}: {report:?}", b.name);
        assert_eq!(report.failures[0].id, "sub_down", "{}", b.name);
        let flagged = |id: &str| {
            common::query_count(
                &b.config.database_url,
                &format!(
                    "SELECT COUNT(*) AS n FROM stripe_subscriptions WHERE reconcile = TRUE AND id = '{id}'"
                ),
            )
        };
        assert_eq!(flagged("sub_down"), 1, "{}", b.name);
        assert_eq!(
            flagged("sub_list") + flagged("sub_evt") + flagged("sub_sync"),
            0,
            "{}",
            b.name
        );

        // A 404 for the items of a subscription Stripe has just answered for: the list
        // changed meanwhile (a conflict, try again), never a deleted subscription.
        let err = Subscription::sync(m, "sub_gone_items").await.unwrap_err();
        assert!(err.is_transient(), "{}: {err}", b.name);
        assert!(
            Subscription::get(m, "sub_gone_items")
                .await
                .unwrap()
                .is_none(),
            "{}: nothing written, no tombstone",
            b.name
        );
    }
}

/// One database for both modes (`STRIPE_LIVE_MODE` moves an app between them): a
/// product id of your choosing exists in each, with its own features. A live
/// subscriber gets only what the live product's features grant, never the test ones.
#[tokio::test]
async fn product_features_of_the_other_mode_grant_nothing() {
    for b in backends() {
        let features = json!({"object": "list", "has_more": false, "data": [
            {"id": "prodft_both", "object": "product_feature", "livemode": false,
             "entitlement_feature": {"id": "feat_x", "object": "entitlements.feature", "lookup_key": "exports"}}]});
        let (base, _) =
            common::stripe_stub(vec![("/v1/products/prod_both/features", 200, features)]).await;
        let test = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        ProductFeature::sync_for_product(&test, "prod_both")
            .await
            .unwrap();
        customer(&test, "cus_both_test", "both-test").await;
        subscription(
            &test,
            "sub_both_test",
            "cus_both_test",
            "active",
            &["prod_both"],
            json!({}),
        )
        .await;
        assert!(
            has_feature(&test, "both-test", "exports").await.unwrap(),
            "{}: the test subscriber",
            b.name
        );
        let live = Mirror::connect(config(&b, None).live_mode(true))
            .await
            .unwrap();
        Customer::sync_from_stripe_data(
            &live,
            &json!({"id": "cus_both_live", "object": "customer", "created": 1, "livemode": true,
                    "metadata": {"stripe_mirror_subscriber": "both-live"}}),
        )
        .await
        .unwrap();
        let live_sub = json!({"livemode": true});
        subscription(
            &live,
            "sub_both_live",
            "cus_both_live",
            "active",
            &["prod_both"],
            live_sub,
        )
        .await;
        assert!(
            !has_feature(&live, "both-live", "exports").await.unwrap(),
            "{}: a test-mode feature granted a live subscriber",
            b.name
        );
    }
}

/// An empty subscriber id is refused before Stripe is asked: Stripe drops an empty
/// metadata value, so the customer could never be found again and every call would
/// make another one.
#[tokio::test]
async fn a_customer_is_never_made_for_an_empty_subscriber_id() {
    for b in backends() {
        let (base, hits) = common::stripe_stub(vec![]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        for empty in ["", "  "] {
            let refused = Customer::get_or_create(&m, &User(empty)).await;
            let err = refused.expect_err("an empty subscriber id");
            assert!(err.to_string().contains("subscriber id is empty"), "{err}");
        }
        assert_eq!(*hits.lock().unwrap(), 0, "{}: Stripe was asked", b.name);
    }
}

/// The customer's own checks and the gate read the same clock (`Config::clock`): at a
/// time past the subscription's cancellation date they both deny, before it they both
/// grant.
#[tokio::test]
async fn the_customer_checks_and_the_gate_read_the_mirrors_clock() {
    for b in backends() {
        for (at, valid) in [(FAR - 10, true), (FAR + 10, false)] {
            let mut config = config(&b, None);
            config.clock = stripe_mirror::Clock::from_fn(move || at);
            let m = Mirror::connect(config).await.unwrap();
            customer(&m, "cus_clock", "clock-user").await;
            subscription(
                &m,
                "sub_clock",
                "cus_clock",
                "active",
                &["prod_clock"],
                json!({"cancel_at": FAR}),
            )
            .await;
            let c = Customer::by_subscriber(&m, "clock-user")
                .await
                .unwrap()
                .unwrap();
            let gate = require_subscription("clock-user").check(&m).await.unwrap();
            assert_eq!(gate.is_ok(), valid, "{}: the gate at {at}", b.name);
            assert_eq!(
                c.has_valid_subscription(&m).await.unwrap(),
                valid,
                "{}: has_valid_subscription at {at}",
                b.name
            );
            assert_eq!(
                c.subscription(&m).await.unwrap().is_some(),
                valid,
                "{}",
                b.name
            );
        }
    }
}

/// One request the stub received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    form: BTreeMap<String, String>,
    idempotency_key: Option<String>,
}

/// A Stripe stand-in answering by method and path (or `path?text`: only a request
/// whose form contains `text`; the first route that matches answers), recording each
/// request's form. A body holding Stripe's `error` is answered 400; an unmatched
/// request Stripe's 404.
async fn recording_stub(
    routes: Vec<(&'static str, &'static str, Value)>,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    use axum::{Router, body::to_bytes, extract::Request, routing::any};
    let seen: Arc<Mutex<Vec<Seen>>> = Default::default();
    let s = seen.clone();
    let app = Router::new().fallback(any(move |req: Request| {
        let (routes, s) = (routes.clone(), s.clone());
        async move {
            let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
            let key = req
                .headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned());
            let query = req.uri().query().unwrap_or_default().to_owned();
            let body = to_bytes(req.into_body(), 1 << 20).await.unwrap();
            let raw = if method == "GET" {
                query.into_bytes()
            } else {
                body.to_vec()
            };
            let text = String::from_utf8_lossy(&raw).into_owned();
            let form = form_urlencoded::parse(&raw).into_owned().collect();
            s.lock().unwrap().push(Seen {
                method: method.clone(),
                path: path.clone(),
                form,
                idempotency_key: key,
            });
            let matches = |route: &str| match route.split_once('?') {
                Some((p, needle)) => p == path && text.contains(needle),
                None => route == path,
            };
            match routes.iter().find(|(m, p, _)| *m == method && matches(p)) {
                Some((_, _, body)) if body.get("error").is_some() => {
                    (axum::http::StatusCode::BAD_REQUEST, body.to_string())
                }
                Some((_, _, body)) => (axum::http::StatusCode::OK, body.to_string()),
                None => (
                    axum::http::StatusCode::NOT_FOUND,
                    json!({"error": {"type": "invalid_request_error",
                    "code": "resource_missing", "message": "No such object"}})
                    .to_string(),
                ),
            }
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/"), seen)
}

fn form(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Cashier's subscription changes send exactly Stripe's parameters (localstripe takes no
/// `proration_behavior` and no `cancel_at` to unset): a resume of a cancellation at a set
/// time unsets it, and one the mirror thought at period end unsets a set time Stripe
/// still had; a swap and a quantity carry the item and the proration; a cancel now
/// whose retry Stripe refuses is answered by what Stripe holds.
#[tokio::test]
async fn subscription_changes_send_exactly_stripes_parameters() {
    for b in backends() {
        let sub = |id: &str, extra: Value| {
            let mut v = json!({"id": id, "object": "subscription", "customer": "cus_ch",
                "status": "active", "livemode": false, "cancel_at_period_end": false, "cancel_at": null,
                "items": {"object": "list", "has_more": false, "data": [
                    {"id": format!("si_{id}"), "object": "subscription_item", "quantity": 1,
                     "price": {"id": "price_m", "object": "price", "product": "prod_ch"},
                     "current_period_start": 1, "current_period_end": 4102444800_i64}]}});
            for (k, val) in extra.as_object().unwrap() {
                v[k] = val.clone();
            }
            v
        };
        let set_time = json!({"cancel_at": 4102444000_i64});
        let (base, seen) = recording_stub(vec![
            // sub_y: Stripe had a set time the mirror did not know of.
            (
                "POST",
                "/v1/subscriptions/sub_y?cancel_at_period_end=false",
                sub("sub_y", set_time.clone()),
            ),
            ("POST", "/v1/subscriptions/sub_y", sub("sub_y", json!({}))),
            ("GET", "/v1/subscriptions/sub_y", sub("sub_y", json!({}))),
            ("POST", "/v1/subscriptions/sub_x", sub("sub_x", json!({}))),
            ("GET", "/v1/subscriptions/sub_x", sub("sub_x", json!({}))),
            // sub_gone: cancelled by a try whose answer was lost; Stripe answers the
            // retry 404 (unmatched). sub_act: a 404 while Stripe still bills it.
            (
                "GET",
                "/v1/subscriptions/sub_act",
                sub("sub_act", json!({})),
            ),
            (
                "GET",
                "/v1/subscriptions/sub_gone",
                sub("sub_gone", json!({"status": "canceled"})),
            ),
            // sub_z: changed, then its fetch past the second fails.
            (
                "POST",
                "/v1/subscriptions/sub_z",
                sub("sub_z", json!({"cancel_at_period_end": true})),
            ),
            (
                "GET",
                "/v1/subscriptions/sub_z",
                json!({"error": {"type": "api_error", "message": "try again later"}}),
            ),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        customer(&m, "cus_ch", "changer").await;
        let x = Subscription::sync_from_stripe_data_at(&m, &sub("sub_x", set_time.clone()), 1)
            .await
            .unwrap();
        let y = Subscription::sync_from_stripe_data_at(
            &m,
            &sub("sub_y", json!({"cancel_at_period_end": true})),
            1,
        )
        .await
        .unwrap();
        let gone = Subscription::sync_from_stripe_data_at(&m, &sub("sub_gone", json!({})), 1)
            .await
            .unwrap();
        let act = Subscription::sync_from_stripe_data_at(&m, &sub("sub_act", json!({})), 1)
            .await
            .unwrap();
        let posts = || -> Vec<(String, BTreeMap<String, String>)> {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|s| s.method == "POST")
                .map(|s| (s.path.clone(), s.form.clone()))
                .collect()
        };

        let resumed = x.resume(&m).await.unwrap();
        assert_eq!(resumed.cancel_at, None, "{}", b.name);
        resumed
            .swap(&m, "price_y", stripe_mirror::Proration::AlwaysInvoice)
            .await
            .unwrap();
        resumed
            .update_quantity(&m, 3, stripe_mirror::Proration::None)
            .await
            .unwrap();
        resumed.cancel_at_period_end(&m).await.unwrap();
        let y = y.resume(&m).await.unwrap();
        assert_eq!(y.cancel_at, None, "{}: the set time unset too", b.name);
        let x = "/v1/subscriptions/sub_x".to_owned();
        let y_path = "/v1/subscriptions/sub_y".to_owned();
        assert_eq!(
            posts(),
            vec![
                (x.clone(), form(&[("cancel_at", "")])),
                (
                    x.clone(),
                    form(&[
                        ("items[0][id]", "si_sub_x"),
                        ("items[0][price]", "price_y"),
                        ("proration_behavior", "always_invoice")
                    ])
                ),
                (
                    x.clone(),
                    form(&[
                        ("items[0][id]", "si_sub_x"),
                        ("items[0][quantity]", "3"),
                        ("proration_behavior", "none")
                    ])
                ),
                (x, form(&[("cancel_at_period_end", "true")])),
                (y_path.clone(), form(&[("cancel_at_period_end", "false")])),
                (y_path, form(&[("cancel_at", "")])),
            ],
            "{}",
            b.name
        );

        let ended = gone.cancel_now(&m).await.unwrap();
        assert_eq!(
            ended.status.as_ref().map(|s| s.as_str()),
            Some("canceled"),
            "{}",
            b.name
        );
        let refused = act.cancel_now(&m).await.unwrap_err();
        assert!(matches!(refused, Error::Stripe(_)), "{}: {refused}", b.name);

        // A row of the same second as Stripe's answer: the change is fetched again past
        // the second before returning. That fetch failing is no failure of the change
        // Stripe made and the mirror holds. (From the start of a second, so that the
        // row and the answer fall in one.)
        let into_second = chrono::Utc::now().timestamp_subsec_millis();
        tokio::time::sleep(std::time::Duration::from_millis(
            1_010 - u64::from(into_second),
        ))
        .await;
        let second = chrono::Utc::now().timestamp();
        let z = Subscription::sync_from_stripe_data_at(&m, &sub("sub_z", json!({})), second)
            .await
            .unwrap();
        let changed = z.cancel_at_period_end(&m).await;
        assert!(
            changed
                .as_ref()
                .is_ok_and(|s| s.cancel_at_period_end == Some(true)),
            "{}: {changed:?}",
            b.name
        );
        let fetched = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "GET" && s.path == "/v1/subscriptions/sub_z")
            .count();
        assert_eq!(
            fetched, 1,
            "{}: fetched again once, before returning",
            b.name
        );
    }
}

/// A customer deleted in Stripe while its webhook was missed still sits in the mirror:
/// Stripe refuses a session naming it. Checkout finds that out, keeps the customer as
/// a tombstone and sells to a new customer; the Billing Portal answers `NotFound`
/// (nothing to manage). And of two customers of one subscriber, the portal opens the
/// one that pays, not the newer empty one.
#[tokio::test]
async fn checkout_and_portal_get_past_a_customer_stripe_no_longer_has() {
    for b in backends() {
        let missing = |id: &str| {
            json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
            "param": "customer", "message": format!("No such customer: '{id}'")}})
        };
        let (base, seen) = recording_stub(vec![
            (
                "POST",
                "/v1/checkout/sessions?customer=cus_old",
                missing("cus_old"),
            ),
            // A customer Stripe still has (the key cannot use it, say): not stale.
            (
                "POST",
                "/v1/checkout/sessions?customer=cus_here",
                missing("cus_here"),
            ),
            (
                "POST",
                "/v1/checkout/sessions",
                json!({"id": "cs_test_2", "object": "checkout.session",
                "url": "https://checkout.stripe.com/c/pay/cs_test_2"}),
            ),
            (
                "POST",
                "/v1/customers",
                json!({"id": "cus_fresh", "object": "customer",
                "metadata": {"stripe_mirror_subscriber": "returning"}}),
            ),
            (
                "POST",
                "/v1/billing_portal/sessions?customer=cus_left",
                missing("cus_left"),
            ),
            (
                "POST",
                "/v1/billing_portal/sessions?customer=cus_dead",
                missing("cus_dead"),
            ),
            (
                "POST",
                "/v1/billing_portal/sessions",
                json!({"id": "bps_2", "object": "billing_portal.session",
                "url": "https://billing.stripe.com/p/session/bps_2"}),
            ),
            (
                "GET",
                "/v1/customers/cus_here",
                json!({"id": "cus_here", "object": "customer", "metadata": {}}),
            ),
            // GET /v1/customers/cus_old, cus_left, cus_dead: Stripe's 404 (unmatched).
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        customer(&m, "cus_old", "returning").await;
        customer(&m, "cus_left", "leaver").await;

        let session = Checkout::subscription("price_pro_monthly")
            .success_url("https://app.example/account?session={CHECKOUT_SESSION_ID}")
            .create(&m, &User("returning"))
            .await
            .unwrap();
        assert_eq!(session.customer, "cus_fresh", "{}", b.name);
        assert!(
            Customer::get(&m, "cus_old").await.unwrap().unwrap().deleted,
            "{}",
            b.name
        );
        let paths: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect();
        assert_eq!(
            paths,
            [
                "POST /v1/checkout/sessions",
                "GET /v1/customers/cus_old",
                "POST /v1/customers",
                "POST /v1/checkout/sessions"
            ],
            "{}",
            b.name
        );

        let err = billing_portal(&m, "leaver", "https://app.example/account")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{}: {err}", b.name);
        assert!(
            Customer::get(&m, "cus_left")
                .await
                .unwrap()
                .unwrap()
                .deleted,
            "{}",
            b.name
        );

        // Two customers: the older one pays, the newer one (a Payment Link, say) is empty.
        Customer::sync_from_stripe_data(
            &m,
            &json!({"id": "cus_pays", "object": "customer", "created": 10,
            "metadata": {"stripe_mirror_subscriber": "two"}}),
        )
        .await
        .unwrap();
        Customer::sync_from_stripe_data(
            &m,
            &json!({"id": "cus_empty", "object": "customer", "created": 20,
            "metadata": {"stripe_mirror_subscriber": "two"}}),
        )
        .await
        .unwrap();
        subscription(
            &m,
            "sub_pays",
            "cus_pays",
            "active",
            &["prod_pro"],
            json!({}),
        )
        .await;
        seen.lock().unwrap().clear();
        billing_portal(&m, "two", "https://app.example/account")
            .await
            .unwrap();
        let sent = seen.lock().unwrap()[0].form.get("customer").cloned();
        assert_eq!(sent.as_deref(), Some("cus_pays"), "{}", b.name);

        // The portal's customer is gone but another one is left: that one is opened.
        Customer::sync_from_stripe_data(
            &m,
            &json!({"id": "cus_dead", "object": "customer", "created": 30,
            "metadata": {"stripe_mirror_subscriber": "two"}}),
        )
        .await
        .unwrap();
        stripe_mirror::Subscription::mark_deleted(&m, "sub_pays")
            .await
            .unwrap();
        seen.lock().unwrap().clear();
        let missing_dead = billing_portal(&m, "two", "https://app.example/account").await;
        let asked: Vec<(String, Option<String>)> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.path.clone(), s.form.get("customer").cloned()))
            .collect();
        assert!(
            missing_dead.is_ok(),
            "{}: {missing_dead:?} {asked:?}",
            b.name
        );
        assert_eq!(
            asked.first().map(|a| a.0.as_str()),
            Some("/v1/billing_portal/sessions")
        );
        assert_eq!(
            asked.last().and_then(|a| a.1.as_deref()),
            Some("cus_empty"),
            "{}: {asked:?}",
            b.name
        );

        // A `resource_missing` about something else, or about a customer Stripe still
        // has: the error as Stripe gave it, no tombstone, no second try.
        customer(&m, "cus_here", "here").await;
        seen.lock().unwrap().clear();
        let err = Checkout::subscription("price_pro_monthly")
            .success_url("https://app.example/account")
            .create(&m, &User("here"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("No such customer: 'cus_here'"),
            "{}: {err}",
            b.name
        );
        assert!(
            !Customer::get(&m, "cus_here")
                .await
                .unwrap()
                .unwrap()
                .deleted,
            "{}",
            b.name
        );
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "{}: the session, the customer's fetch",
            b.name
        );
    }
}

/// Metadata of the host's own goes beside the subscriber's, on the session and its
/// subscription; `customize` sets what the builder has no method for; the subscriber's
/// key cannot be set as metadata.
#[tokio::test]
async fn checkout_takes_metadata_and_anything_else_stripe_takes() {
    for b in backends() {
        let (base, seen) = recording_stub(vec![(
            "POST",
            "/v1/checkout/sessions",
            json!({"id": "cs_test_m", "object": "checkout.session",
                   "url": "https://checkout.stripe.com/c/pay/cs_test_m"}),
        )])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        customer(&m, "cus_meta", "meta-buyer").await;
        use stripe_mirror::types::{
            CheckoutSessionBillingAddressCollection, CheckoutSessionLocale,
        };
        Checkout::subscription("price_pro_monthly")
            .success_url("https://app.example/welcome")
            .metadata("campaign", "fall")
            .customize(|request| {
                request
                    .locale(CheckoutSessionLocale::Fr)
                    .billing_address_collection(CheckoutSessionBillingAddressCollection::Required)
            })
            .create(&m, "meta-buyer") // a bare id is a subscriber too
            .await
            .unwrap();
        let sent = seen.lock().unwrap()[0].form.clone();
        for (key, value) in [
            ("metadata[campaign]", "fall"),
            ("metadata[stripe_mirror_subscriber]", "meta-buyer"),
            ("subscription_data[metadata][campaign]", "fall"),
            (
                "subscription_data[metadata][stripe_mirror_subscriber]",
                "meta-buyer",
            ),
            ("locale", "fr"),
            ("billing_address_collection", "required"),
            ("customer", "cus_meta"),
        ] {
            assert_eq!(
                sent.get(key).map(String::as_str),
                Some(value),
                "{}: {key} in {sent:?}",
                b.name
            );
        }
        let err = Checkout::subscription("price_pro_monthly")
            .success_url("https://app.example/welcome")
            .metadata("stripe_mirror_subscriber", "someone-else")
            .create(&m, &User("meta-buyer"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{}: {err}", b.name);
        // A setter of async-stripe replaces the whole map: the link would be lost.
        let err = Checkout::subscription("price_pro_monthly")
            .success_url("https://app.example/welcome")
            .trial_days(7)
            .customize(|request| {
                request.metadata(std::collections::HashMap::from([(
                    "campaign".to_owned(),
                    "winter".to_owned(),
                )]))
            })
            .create(&m, &User("meta-buyer"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("metadata.stripe_mirror_subscriber")),
            "{}: {err}",
            b.name
        );
        assert_eq!(seen.lock().unwrap().len(), 1, "{}: nothing sent", b.name);
    }
}

#[tokio::test]
async fn checkout_and_portal_send_exactly_stripes_parameters() {
    for b in backends() {
        let (base, seen) = recording_stub(vec![
            ("POST", "/v1/customers", json!({"id": "cus_buyer", "object": "customer", "email": "buyer@example.com",
                                             "metadata": {"stripe_mirror_subscriber": "buyer"}})),
            ("POST", "/v1/checkout/sessions", json!({"id": "cs_test_1", "object": "checkout.session",
                                                     "url": "https://checkout.stripe.com/c/pay/cs_test_1"})),
            ("POST", "/v1/billing_portal/sessions", json!({"id": "bps_1", "object": "billing_portal.session",
                                                           "url": "https://billing.stripe.com/p/session/bps_1"})),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let session = Checkout::subscription("price_pro_monthly")
            .success_url("https://app.example/members?session={CHECKOUT_SESSION_ID}")
            .cancel_url("https://app.example/pricing")
            .trial_days(14)
            .allow_promotion_codes(true)
            .create(&m, &User("buyer"))
            .await
            .unwrap();
        assert_eq!(
            (
                session.id.as_str(),
                session.url.as_str(),
                session.customer.as_str()
            ),
            (
                "cs_test_1",
                "https://checkout.stripe.com/c/pay/cs_test_1",
                "cus_buyer"
            )
        );
        {
            let seen = seen.lock().unwrap();
            let (created, checkout) = (&seen[0], &seen[1]);
            assert_eq!(
                (created.method.as_str(), created.path.as_str()),
                ("POST", "/v1/customers")
            );
            assert_eq!(
                created.form,
                form(&[
                    ("email", "buyer@example.com"),
                    ("metadata[stripe_mirror_subscriber]", "buyer")
                ])
            );
            assert!(
                created
                    .idempotency_key
                    .as_deref()
                    .unwrap()
                    .starts_with("stripe-mirror-customer-test-")
            );
            assert_eq!(checkout.path, "/v1/checkout/sessions");
            assert_eq!(
                checkout.form,
                form(&[
                    ("mode", "subscription"),
                    ("customer", "cus_buyer"),
                    ("client_reference_id", "buyer"),
                    ("line_items[0][price]", "price_pro_monthly"),
                    ("line_items[0][quantity]", "1"),
                    (
                        "success_url",
                        "https://app.example/members?session={CHECKOUT_SESSION_ID}"
                    ),
                    ("cancel_url", "https://app.example/pricing"),
                    ("allow_promotion_codes", "true"),
                    ("metadata[stripe_mirror_subscriber]", "buyer"),
                    (
                        "subscription_data[metadata][stripe_mirror_subscriber]",
                        "buyer"
                    ),
                    ("subscription_data[trial_period_days]", "14"),
                ]),
                "{}",
                b.name
            );
        }
        // A one-time payment: no subscription data; the customer is already mirrored.
        Checkout::payment("price_setup_fee", 2)
            .success_url("https://app.example/thanks")
            .create(&m, &User("buyer"))
            .await
            .unwrap();
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 3, "{}: no second customer", b.name);
            assert_eq!(
                seen[2].form,
                form(&[
                    ("mode", "payment"),
                    ("customer", "cus_buyer"),
                    ("client_reference_id", "buyer"),
                    ("line_items[0][price]", "price_setup_fee"),
                    ("line_items[0][quantity]", "2"),
                    ("success_url", "https://app.example/thanks"),
                    ("metadata[stripe_mirror_subscriber]", "buyer"),
                ]),
                "{}",
                b.name
            );
        }
        let err = Checkout::subscription("price_x")
            .create(&m, &User("buyer"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("success URL"), "{err}");

        let portal = billing_portal(&m, "buyer", "https://app.example/account")
            .await
            .unwrap();
        assert_eq!(portal.url, "https://billing.stripe.com/p/session/bps_1");
        assert_eq!(
            seen.lock().unwrap()[3].form,
            form(&[
                ("customer", "cus_buyer"),
                ("return_url", "https://app.example/account")
            ])
        );
        let nobody = billing_portal(&m, "nobody", "https://app.example/account")
            .await
            .unwrap_err();
        assert!(
            matches!(nobody, Error::NotFound { .. }),
            "{}: {nobody}",
            b.name
        );
        // The advice fits the case: nothing to sync, someone to send to Checkout.
        let said = nobody.to_string();
        assert!(
            said.contains("send them to Checkout") && !said.contains("sync it first"),
            "{said}"
        );

        // Seats: a quantity, and a range the buyer may choose from.
        Checkout::subscription("price_seat")
            .quantity(5)
            .adjustable_quantity(1, 50)
            .success_url("https://app.example/thanks")
            .create(&m, &User("buyer"))
            .await
            .unwrap();
        let last = || seen.lock().unwrap().last().unwrap().form.clone();
        let line: BTreeMap<String, String> = last()
            .into_iter()
            .filter(|(k, _)| k.starts_with("line_items"))
            .collect();
        assert_eq!(
            line,
            form(&[
                ("line_items[0][adjustable_quantity][enabled]", "true"),
                ("line_items[0][adjustable_quantity][maximum]", "50"),
                ("line_items[0][adjustable_quantity][minimum]", "1"),
                ("line_items[0][price]", "price_seat"),
                ("line_items[0][quantity]", "5"),
            ]),
            "{}",
            b.name
        );
        // A range alone starts at its minimum (Stripe wants the quantity within it); a
        // quantity outside it is refused before anything is sent.
        Checkout::subscription("price_seat")
            .adjustable_quantity(5, 50)
            .success_url("https://app.example/thanks")
            .create(&m, &User("buyer"))
            .await
            .unwrap();
        assert_eq!(
            last().get("line_items[0][quantity]").map(String::as_str),
            Some("5"),
            "{}",
            b.name
        );
        let sent = seen.lock().unwrap().len();
        for (quantity, min, max) in [(60, 1, 50), (1, 5, 2), (1, 1, 1_000_000)] {
            let refused = Checkout::subscription("price_seat")
                .quantity(quantity)
                .adjustable_quantity(min, max)
                .success_url("https://app.example/thanks")
                .create(&m, &User("buyer"))
                .await
                .unwrap_err();
            assert!(matches!(refused, Error::Config(_)), "{}: {refused}", b.name);
        }
        assert_eq!(seen.lock().unwrap().len(), sent, "{}: nothing sent", b.name);
        // Stripe Tax and tax ids: what the buyer enters is saved to the existing customer.
        Checkout::subscription("price_seat")
            .automatic_tax(true)
            .tax_id_collection(true)
            .success_url("https://app.example/thanks")
            .create(&m, &User("buyer"))
            .await
            .unwrap();
        let tax: BTreeMap<String, String> = last()
            .into_iter()
            .filter(|(k, _)| k.contains("tax") || k.starts_with("customer_update"))
            .collect();
        assert_eq!(
            tax,
            form(&[
                ("automatic_tax[enabled]", "true"),
                ("customer_update[address]", "auto"),
                ("customer_update[name]", "auto"),
                ("tax_id_collection[enabled]", "true"),
            ]),
            "{}",
            b.name
        );
        // A metered price takes no quantity: Stripe would refuse the session.
        stripe_mirror::Price::sync_from_stripe_data(
            &m,
            &json!({"id": "price_metered", "object": "price", "product": "prod_api", "active": true,
                    "currency": "usd", "recurring": {"interval": "month", "usage_type": "metered"}}),
        )
        .await
        .unwrap();
        Checkout::subscription("price_metered")
            .success_url("https://app.example/thanks")
            .create(&m, &User("buyer"))
            .await
            .unwrap();
        let line: BTreeMap<String, String> = last()
            .into_iter()
            .filter(|(k, _)| k.starts_with("line_items"))
            .collect();
        assert_eq!(
            line,
            form(&[("line_items[0][price]", "price_metered")]),
            "{}",
            b.name
        );
        let sent = seen.lock().unwrap().len();
        let refused = Checkout::subscription("price_metered")
            .quantity(3)
            .success_url("https://app.example/thanks")
            .create(&m, &User("buyer"))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, Error::Config(msg) if msg.contains("metered")),
            "{}: {refused}",
            b.name
        );
        assert_eq!(seen.lock().unwrap().len(), sent, "{}: nothing sent", b.name);
    }
}

#[tokio::test]
async fn the_payment_element_flow_reads_the_client_secret_in_both_shapes() {
    for b in backends() {
        let sub = |id: &str, invoice: Value| {
            json!({"id": id, "object": "subscription", "customer": "cus_pe",
            "status": "incomplete", "latest_invoice": invoice,
            "items": {"data": [{"id": format!("si_{id}"), "object": "subscription_item",
                "price": {"id": "price_pro", "product": "prod_pro"}, "current_period_end": FAR}]}})
        };
        // Current shape, then the older one whose payment intent must be fetched.
        let (base, seen) = recording_stub(vec![
            ("POST", "/v1/subscriptions", sub("sub_pe", json!({"id": "in_1", "confirmation_secret": {"client_secret": "pi_1_secret_abc", "type": "payment_intent"}}))),
        ]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let started = Subscription::create_incomplete(&m, "cus_pe", &["price_pro"])
            .await
            .unwrap();
        assert_eq!(
            started.client_secret.as_ref().map(|s| s.expose()),
            Some("pi_1_secret_abc")
        );
        assert!(
            !format!("{started:?}").contains("pi_1_secret_abc"),
            "{}: the secret stays out of Debug",
            b.name
        );
        assert_eq!(
            started.subscription.status.as_ref().map(|s| s.as_str()),
            Some("incomplete")
        );
        assert!(
            Subscription::get(&m, "sub_pe").await.unwrap().is_some(),
            "{}: mirrored at once",
            b.name
        );
        assert_eq!(
            seen.lock().unwrap()[0].form,
            form(&[
                ("customer", "cus_pe"),
                ("items[0][price]", "price_pro"),
                ("payment_behavior", "default_incomplete"),
                (
                    "payment_settings[save_default_payment_method]",
                    "on_subscription"
                ),
                ("expand[0]", "latest_invoice.confirmation_secret"),
            ]),
            "{}",
            b.name
        );

        let (base, seen) = recording_stub(vec![
            ("POST", "/v1/subscriptions", sub("sub_pe_old", json!({"id": "in_2", "payment_intent": "pi_2"}))),
            ("GET", "/v1/payment_intents/pi_2", json!({"id": "pi_2", "object": "payment_intent", "client_secret": "pi_2_secret_def"})),
        ]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let started = Subscription::create_incomplete(&m, "cus_pe", &["price_pro"])
            .await
            .unwrap();
        assert_eq!(
            started.client_secret.as_ref().map(|s| s.expose()),
            Some("pi_2_secret_def"),
            "{}",
            b.name
        );
        assert_eq!(seen.lock().unwrap().len(), 2);
    }
}

#[tokio::test]
async fn get_or_create_reads_the_mirror_then_stripe_then_creates_once() {
    for b in backends() {
        let product = json!({"id": "pro", "object": "product", "name": "Pro", "active": true, "metadata": {"roles": "pro"}});
        let price = json!({"id": "price_new", "object": "price", "product": "pro", "active": true, "currency": "usd",
                           "unit_amount": 2900, "lookup_key": "pro_monthly", "recurring": {"interval": "month"}});
        let sub = json!({"id": "sub_new", "object": "subscription", "customer": "cus_g", "status": "active",
                         "items": {"data": [{"id": "si_new", "object": "subscription_item",
                            "price": {"id": "price_new", "product": "pro"}, "current_period_end": FAR}]}});
        let (base, seen) = recording_stub(vec![
            ("POST", "/v1/products", product),
            (
                "GET",
                "/v1/prices",
                json!({"object": "list", "data": [], "has_more": false}),
            ),
            ("POST", "/v1/prices", price),
            (
                "GET",
                "/v1/subscriptions",
                json!({"object": "list", "data": [], "has_more": false}),
            ),
            ("POST", "/v1/subscriptions", sub),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let p = Product::get_or_create(&m, &NewProduct::new("pro", "Pro").metadata("roles", "pro"))
            .await
            .unwrap();
        let pr = Price::get_or_create(
            &m,
            &NewPrice::recurring("pro_monthly", "pro", "usd", 2900, "month"),
        )
        .await
        .unwrap();
        customer(&m, "cus_g", "g-user").await;
        let s = Subscription::get_or_create(&m, "cus_g", &["price_new"])
            .await
            .unwrap();
        assert_eq!(
            (p.id.as_str(), pr.id.as_str(), s.id.as_str()),
            ("pro", "price_new", "sub_new")
        );
        let first = seen.lock().unwrap().clone();
        let calls: Vec<(String, String)> = first
            .iter()
            .map(|s| (s.method.clone(), s.path.clone()))
            .collect();
        assert_eq!(
            calls,
            [
                ("GET", "/v1/products/pro"),
                ("POST", "/v1/products"),
                ("GET", "/v1/prices"),
                ("POST", "/v1/prices"),
                ("GET", "/v1/subscriptions"),
                ("POST", "/v1/subscriptions"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned())),
            "{}",
            b.name
        );
        assert_eq!(
            first[1].form,
            form(&[("id", "pro"), ("name", "Pro"), ("metadata[roles]", "pro")])
        );
        assert_eq!(
            first[2].form.get("lookup_keys[0]").map(String::as_str),
            Some("pro_monthly")
        );
        assert_eq!(
            first[3].form,
            form(&[
                ("product", "pro"),
                ("currency", "usd"),
                ("unit_amount", "2900"),
                ("lookup_key", "pro_monthly"),
                ("recurring[interval]", "month")
            ])
        );
        assert_eq!(
            first[5].form,
            form(&[("customer", "cus_g"), ("items[0][price]", "price_new")])
        );
        // Keys derived from the natural key: the same in any process, different per object.
        let keys: Vec<&str> = [1, 3, 5]
            .iter()
            .map(|i| first[*i].idempotency_key.as_deref().unwrap())
            .collect();
        assert!(
            keys[0].starts_with("stripe-mirror-product-test-")
                && keys[1].starts_with("stripe-mirror-price-test-")
                && keys[2].starts_with("stripe-mirror-subscription-test-"),
            "{keys:?}"
        );

        // Second time: the mirror answers, Stripe is not asked.
        Product::get_or_create(&m, &NewProduct::new("pro", "Pro"))
            .await
            .unwrap();
        Price::get_or_create(
            &m,
            &NewPrice::recurring("pro_monthly", "pro", "usd", 2900, "month"),
        )
        .await
        .unwrap();
        assert_eq!(
            Subscription::get_or_create(&m, "cus_g", &["price_new"])
                .await
                .unwrap()
                .id,
            "sub_new"
        );
        assert_eq!(seen.lock().unwrap().len(), 6, "{}", b.name);

        // Another process (its own database) creating the same objects sends the same keys.
        let other = Mirror::connect(config(&common::backends().remove(0), Some(&base)))
            .await
            .unwrap();
        Product::get_or_create(
            &other,
            &NewProduct::new("pro", "Pro").metadata("roles", "pro"),
        )
        .await
        .unwrap();
        let again = seen.lock().unwrap().last().unwrap().idempotency_key.clone();
        assert_eq!(again.as_deref(), Some(keys[0]), "{}", b.name);
    }
}

#[tokio::test]
async fn the_publishable_key_follows_the_mode() {
    for b in backends() {
        let mut test = config(&b, None);
        test.test_publishable_key = Some("pk_test_from_env".into());
        test.live_publishable_key = Some("pk_live_from_env".into());
        let m = Mirror::connect(test.clone()).await.unwrap();
        assert_eq!(
            m.publishable_key().await.unwrap().as_deref(),
            Some("pk_test_from_env")
        );
        let live = Mirror::connect(test.live_mode(true)).await.unwrap();
        assert_eq!(
            live.publishable_key().await.unwrap().as_deref(),
            Some("pk_live_from_env")
        );
        // A stored key of the mode comes first.
        stripe_mirror::ApiKey::get_or_create(&m, "pk_test_stored0000000000000000")
            .await
            .unwrap();
        assert_eq!(
            m.publishable_key().await.unwrap().as_deref(),
            Some("pk_test_stored0000000000000000"),
            "{}",
            b.name
        );
        assert_eq!(
            live.publishable_key().await.unwrap().as_deref(),
            Some("pk_live_from_env"),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn a_completed_checkout_links_the_subscriber_and_mirrors_the_subscription_at_once() {
    for b in backends() {
        let sub = json!({"id": "sub_ck", "object": "subscription", "customer": "cus_ck", "status": "active",
                         "items": {"data": [{"id": "si_ck", "object": "subscription_item",
                            "price": {"id": "price_pro", "product": "prod_pro"}, "current_period_end": FAR}]}});
        let (base, hits) = common::stripe_stub(vec![("/v1/subscriptions/sub_ck", 200, sub)]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let gate = require_subscription("ck-user").to_products(&["prod_pro"]);
        assert_eq!(
            gate.check(&m).await.unwrap().unwrap_err(),
            Denial::NoCustomer
        );
        let completed = json!({"id": "evt_ck", "object": "event", "type": "checkout.session.completed",
            "created": chrono::Utc::now().timestamp(), "livemode": false, "data": {"object": {
            "id": "cs_ck", "object": "checkout.session", "mode": "subscription", "customer": "cus_ck",
            "client_reference_id": "ck-user", "subscription": "sub_ck", "livemode": false}}});
        let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let t = told.clone();
        let webhooks = Webhooks::new().on_access_change(
            move |change: stripe_mirror::AccessChange, _m: Mirror| {
                t.lock().unwrap().push(change);
                async { Ok(()) }
            },
        );
        let r = webhooks.receive(&m, signed(&completed)).await;
        assert_eq!(r.status, 200, "{}: {:?}", b.name, r.error);
        // The buyer lands on the success page with access, before the subscription's own events.
        assert_eq!(
            gate.check(&m).await.unwrap().unwrap().id,
            "sub_ck",
            "{}",
            b.name
        );
        assert_eq!(*hits.lock().unwrap(), 1, "{}", b.name);
        // The host was told, with the subscription the follow-up fetched, in the same answer.
        let told = told.lock().unwrap().clone();
        assert_eq!(told.len(), 1, "{}: {told:?}", b.name);
        assert!(
            told[0].granted() && told[0].after.products == vec!["prod_pro"],
            "{told:?}"
        );
        assert_eq!(told[0].after.subscription.as_deref(), Some("sub_ck"));
    }
}

#[tokio::test]
async fn api_keys_sync_checks_the_key_with_stripe() {
    for b in backends() {
        let (ok_base, hits) = common::stripe_stub(vec![(
            "/v1/balance",
            200,
            json!({"object": "balance", "livemode": false}),
        )])
        .await;
        let m = Mirror::connect(config(&b, Some(&ok_base))).await.unwrap();
        let test_key = stripe_mirror::ApiKey::get_or_create(&m, "sk_test_synccheck000000000abcd")
            .await
            .unwrap();
        let live_key = stripe_mirror::ApiKey::get_or_create(&m, "sk_live_synccheck000000000wxyz")
            .await
            .unwrap();
        let pk = stripe_mirror::ApiKey::get_or_create(&m, "pk_test_synccheck000000000efgh")
            .await
            .unwrap();
        assert_eq!(
            stripe_mirror::ApiKey::sync(&m, &test_key.id)
                .await
                .unwrap()
                .id,
            test_key.id
        );
        let wrong = stripe_mirror::ApiKey::sync(&m, &live_key.id)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            wrong.contains("sk_live_...wxyz") && !wrong.contains("synccheck"),
            "{}: {wrong}",
            b.name
        );
        stripe_mirror::ApiKey::sync(&m, &pk.id).await.unwrap();
        assert_eq!(
            *hits.lock().unwrap(),
            2,
            "{}: publishable keys are not sent",
            b.name
        );

        let refused = json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_***abcd"}});
        let (bad_base, _) = common::stripe_stub(vec![("/v1/balance", 401, refused)]).await;
        let m = Mirror::connect(config(&b, Some(&bad_base))).await.unwrap();
        stripe_mirror::ApiKey::get_or_create(&m, "sk_test_synccheck000000000abcd")
            .await
            .unwrap();
        let err = stripe_mirror::ApiKey::sync(&m, &test_key.id)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("401") && !err.contains("synccheck"),
            "{}: {err}",
            b.name
        );
    }
}

#[tokio::test]
async fn the_success_page_confirms_a_checkout_without_waiting_for_webhooks() {
    for b in backends() {
        let session = json!({"id": "cs_ok", "object": "checkout.session", "status": "complete", "livemode": false,
                             "customer": "cus_s", "client_reference_id": "s-user", "subscription": "sub_s"});
        let sub = json!({"id": "sub_s", "object": "subscription", "customer": "cus_s", "status": "active",
                         "items": {"data": [{"id": "si_s", "object": "subscription_item",
                            "price": {"id": "price_pro", "product": "prod_pro"}, "current_period_end": FAR}]}});
        let (base, _) = common::stripe_stub(vec![
            ("/v1/checkout/sessions/cs_ok", 200, session),
            ("/v1/subscriptions/sub_s", 200, sub),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let status = stripe_mirror::sync_session(&m, "cs_ok").await.unwrap();
        assert!(status.is_complete(), "{}: {status:?}", b.name);
        let products = vec!["prod_pro".to_owned()];
        let granted = require_subscription("s-user")
            .to_products(&products)
            .check(&m)
            .await
            .unwrap();
        assert_eq!(granted.unwrap().id, "sub_s", "{}", b.name);
    }
}

#[tokio::test]
async fn gate_mistakes_are_refused_and_every_customer_of_a_subscriber_counts() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        customer(&m, "cus_m1", "multi-customer").await;
        subscription(&m, "sub_m1", "cus_m1", "active", &["prod_pro"], json!({})).await;
        // An empty product list (a query that found nothing) lets nobody in.
        let empty: Vec<String> = Vec::new();
        let none = require_subscription("multi-customer")
            .to_products(&empty)
            .check(&m)
            .await
            .unwrap();
        assert_eq!(
            none.unwrap_err(),
            Denial::WrongProduct { wanted: vec![] },
            "{}",
            b.name
        );
        // A price id where a product id goes is a clear error, not a silent "no".
        let err = require_subscription("multi-customer")
            .to_products(&["price_123"])
            .check(&m)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("product ids"), "{err}");
        assert!(
            require_subscription("multi-customer")
                .with_feature("")
                .check(&m)
                .await
                .is_err()
        );
        // A second customer of the same subscriber (newer, no subscription) hides nothing.
        Customer::sync_from_stripe_data(
            &m,
            &json!({"id": "cus_m2", "object": "customer", "created": 999,
            "metadata": {"stripe_mirror_subscriber": "multi-customer"}}),
        )
        .await
        .unwrap();
        let granted = require_subscription("multi-customer")
            .to_products(&["prod_pro"])
            .check(&m)
            .await
            .unwrap();
        assert_eq!(granted.unwrap().id, "sub_m1", "{}", b.name);
        // And the customer the app reads is the one the gate let in: the one that pays.
        let paying = Customer::by_subscriber(&m, "multi-customer")
            .await
            .unwrap()
            .unwrap();
        assert_ne!(paying.id, "cus_m2", "{}: the newer empty customer", b.name);
        let held = paying.subscription(&m).await.unwrap();
        assert_eq!(held.map(|s| s.id).as_deref(), Some("sub_m1"), "{}", b.name);
    }
}

#[tokio::test]
async fn a_price_under_a_lookup_key_must_be_what_was_asked_for() {
    for b in backends() {
        let (base, _) = common::stripe_stub(vec![]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        Price::sync_from_stripe_data(&m, &json!({"id": "price_old", "object": "price", "product": "pro", "active": true,
            "currency": "usd", "unit_amount": 2900, "lookup_key": "pro_monthly", "recurring": {"interval": "month"}})).await.unwrap();
        let same = Price::get_or_create(
            &m,
            &NewPrice::recurring("pro_monthly", "pro", "usd", 2900, "month"),
        )
        .await
        .unwrap();
        assert_eq!(same.id, "price_old");
        let raised = Price::get_or_create(
            &m,
            &NewPrice::recurring("pro_monthly", "pro", "usd", 3900, "month"),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(raised, Error::Refused(_))
                && raised.to_string().contains("unit_amount")
                && raised.to_string().contains("new lookup key"),
            "{}: {raised}",
            b.name
        );
    }
}

#[tokio::test]
async fn checkout_links_only_when_metadata_and_reference_agree_and_sessions_are_complete() {
    for b in backends() {
        let open = json!({"id": "cs_open", "object": "checkout.session", "status": "open", "customer": "cus_o",
                          "client_reference_id": "o-user"});
        let (base, _) =
            common::stripe_stub(vec![("/v1/checkout/sessions/cs_open", 200, open)]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        assert_eq!(
            stripe_mirror::sync_session(&m, "cs_open")
                .await
                .unwrap()
                .status
                .as_deref(),
            Some("open")
        );
        assert!(
            Customer::by_subscriber(&m, "o-user")
                .await
                .unwrap()
                .is_none(),
            "{}: an open session links nothing",
            b.name
        );
        assert!(
            matches!(
                stripe_mirror::sync_session(&m, "../customers/cus_1").await,
                Err(stripe_mirror::Error::Refused(_))
            ),
            "only a session id is sent"
        );

        // A buyer-set client_reference_id that disagrees with the server's metadata.
        let session = json!({"id": "cs_mix", "object": "checkout.session", "customer": "cus_mix",
            "client_reference_id": "victim", "metadata": {"stripe_mirror_subscriber": "buyer"}});
        let event = json!({"id": "evt_mix", "object": "event", "type": "checkout.session.completed",
            "created": chrono::Utc::now().timestamp(), "livemode": false, "data": {"object": session}});
        assert_eq!(
            Webhooks::new().receive(&m, signed(&event)).await.status,
            200
        );
        assert!(
            Customer::by_subscriber(&m, "victim")
                .await
                .unwrap()
                .is_none(),
            "{}",
            b.name
        );
        assert!(
            Customer::by_subscriber(&m, "buyer")
                .await
                .unwrap()
                .is_none(),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn the_host_gets_a_configured_async_stripe_client() {
    use stripe_client_core::StripeRequest;
    let customer = common::fixture("customer");
    let (base, hits) =
        common::stripe_stub(vec![("/v1/customers/cus_QXg1o8vcGmoR32", 200, customer)]).await;
    let b = backends().remove(0);
    let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
    let client = m.stripe_client().await.unwrap();
    let typed = stripe_core::customer::RetrieveCustomer::new("cus_QXg1o8vcGmoR32")
        .customize()
        .send(&client)
        .await
        .unwrap();
    let stripe_core::customer::RetrieveCustomerReturned::Customer(typed) = typed else {
        panic!("a live customer");
    };
    assert_eq!(typed.id.as_str(), "cus_QXg1o8vcGmoR32");
    assert_eq!(*hits.lock().unwrap(), 1);
}

/// `access_of` (what the access hook is told) agrees with the gate: no feature without
/// a valid subscription, even while Stripe's summary still lists it.
#[tokio::test]
async fn told_features_need_a_valid_subscription_as_the_gate_does() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let webhooks = Webhooks::new();
        customer(&m, "cus_fv", "feature-valid").await;
        subscription(&m, "sub_fv", "cus_fv", "active", &["prod_fv"], json!({})).await;
        let t = chrono::Utc::now().timestamp();
        let r = webhooks
            .receive(
                &m,
                signed(&summary_event("evt_fv", t, "cus_fv", &["exports"])),
            )
            .await;
        assert_eq!(r.status, 200, "{}: {:?}", b.name, r.error);
        let granted = stripe_mirror::access::access_of(&m, "feature-valid")
            .await
            .unwrap();
        assert_eq!(granted.features, ["exports"], "{}", b.name);

        // Canceled later (its `canceled_at` is newer than its creation).
        let canceled = json!({"canceled_at": 200, "ended_at": 200});
        subscription(&m, "sub_fv", "cus_fv", "canceled", &["prod_fv"], canceled).await;
        assert!(
            !has_feature(&m, "feature-valid", "exports").await.unwrap(),
            "{}",
            b.name
        );
        let told = stripe_mirror::access::access_of(&m, "feature-valid")
            .await
            .unwrap();
        assert!(
            !told.valid && told.features.is_empty(),
            "{}: {told:?}",
            b.name
        );
    }
}

/// Features are decided per customer: an (empty) Entitlements summary on a
/// subscriber's old customer says nothing of another customer's valid subscription,
/// whose products' features still grant; the gate and `access_of` agree.
#[tokio::test]
async fn one_customers_summary_does_not_hide_anothers_product_features() {
    for b in backends() {
        let features = json!({"object": "list", "has_more": false, "data": [
            {"id": "prodft_pc", "object": "product_feature", "livemode": false,
             "entitlement_feature": {"id": "feat_pc", "object": "entitlements.feature", "lookup_key": "exports"}}]});
        let (base, _) =
            common::stripe_stub(vec![("/v1/products/prod_pc/features", 200, features)]).await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        ProductFeature::sync_for_product(&m, "prod_pc")
            .await
            .unwrap();
        // The old customer: Stripe's summary says no features; no valid subscription.
        customer(&m, "cus_pc_old", "per-customer").await;
        let t = chrono::Utc::now().timestamp();
        let r = Webhooks::new()
            .receive(&m, signed(&summary_event("evt_pc", t, "cus_pc_old", &[])))
            .await;
        assert_eq!(r.status, 200, "{}: {:?}", b.name, r.error);
        // The new customer: a valid subscription to a product with the feature.
        customer(&m, "cus_pc_new", "per-customer").await;
        subscription(
            &m,
            "sub_pc",
            "cus_pc_new",
            "active",
            &["prod_pc"],
            json!({}),
        )
        .await;
        assert!(
            has_feature(&m, "per-customer", "exports").await.unwrap(),
            "{}",
            b.name
        );
        let told = stripe_mirror::access::access_of(&m, "per-customer")
            .await
            .unwrap();
        assert_eq!(told.features, ["exports"], "{}", b.name);
    }
}

/// A subscription whose payment collection is paused stays `active` in Stripe, which
/// means the service to go on for free meanwhile: the gate grants it by default, can
/// refuse it, and a pause past its `resumes_at` is over.
#[tokio::test]
async fn a_paused_collection_is_visible_and_refused_only_when_asked() {
    for b in backends() {
        let m = Mirror::connect(config(&b, None)).await.unwrap();
        let cases = [
            (
                "paused",
                json!({"behavior": "void", "resumes_at": null}),
                true,
            ),
            (
                "resuming",
                json!({"behavior": "keep_as_draft", "resumes_at": FAR}),
                true,
            ),
            (
                "resumed",
                json!({"behavior": "void", "resumes_at": PAST}),
                false,
            ),
            ("billing", Value::Null, false),
        ];
        for (user, pause, paused) in cases {
            let cus = format!("cus_{user}");
            customer(&m, &cus, user).await;
            let extra = json!({ "pause_collection": pause });
            subscription(
                &m,
                &format!("sub_{user}"),
                &cus,
                "active",
                &["prod_pro"],
                extra,
            )
            .await;
            let sub = Subscription::get(&m, &format!("sub_{user}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(sub.is_collection_paused(), paused, "{} {user}", b.name);
            assert_eq!(
                sub.pause_collection().map(|p| p.behavior),
                pause["behavior"].as_str().map(str::to_owned),
                "{} {user}",
                b.name
            );
            let default = require_subscription(user).check(&m).await.unwrap();
            assert!(default.is_ok(), "{} {user}: {default:?}", b.name);
            let strict = require_subscription(user)
                .deny_paused_collection(true)
                .check(&m)
                .await
                .unwrap();
            match strict {
                Err(Denial::CollectionPaused { subscription }) if paused => {
                    assert_eq!(subscription, format!("sub_{user}"), "{}", b.name)
                }
                Ok(_) if !paused => {}
                other => panic!("{} {user}: {other:?}", b.name),
            }
        }
        // Paused, but to another product than the page's: the page's denial is the
        // product, not the pause.
        let elsewhere = require_subscription("paused")
            .to_products(&["prod_basic"])
            .deny_paused_collection(true)
            .check(&m)
            .await
            .unwrap();
        assert_eq!(elsewhere.unwrap_err().code(), "wrong_product", "{}", b.name);
        // A second, unpaused subscription still opens the strict gate.
        subscription(
            &m,
            "sub_paused_2",
            "cus_paused",
            "active",
            &["prod_pro"],
            json!({}),
        )
        .await;
        let strict = require_subscription("paused")
            .deny_paused_collection(true)
            .check(&m)
            .await
            .unwrap();
        assert_eq!(
            strict.map(|s| s.id),
            Ok("sub_paused_2".to_owned()),
            "{}",
            b.name
        );
    }
}

/// A bank debit (SEPA, ACH, Bacs) completes the session days before the money
/// arrives: the success page learns both, so a one-time purchase waits for the payment.
#[tokio::test]
async fn the_success_page_tells_complete_from_paid() {
    for b in backends() {
        let session = |id: &str, payment: &str| {
            json!({"id": id, "object": "checkout.session", "status": "complete", "mode": "payment",
                   "payment_status": payment, "livemode": false, "customer": "cus_debit",
                   "client_reference_id": "debit-user"})
        };
        let (base, _) = common::stripe_stub(vec![
            (
                "/v1/checkout/sessions/cs_debit",
                200,
                session("cs_debit", "unpaid"),
            ),
            (
                "/v1/checkout/sessions/cs_card",
                200,
                session("cs_card", "paid"),
            ),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let debit = stripe_mirror::sync_session(&m, "cs_debit").await.unwrap();
        assert!(
            debit.is_complete() && !debit.is_paid(),
            "{}: {debit:?}",
            b.name
        );
        assert_eq!(debit.payment_status.as_deref(), Some("unpaid"));
        // The buyer is linked all the same: who bought is known, the payment is not.
        let linked = Customer::by_subscriber(&m, "debit-user").await.unwrap();
        assert_eq!(
            linked.map(|c| c.id),
            Some("cus_debit".to_owned()),
            "{}",
            b.name
        );
        let card = stripe_mirror::sync_session(&m, "cs_card").await.unwrap();
        assert!(card.is_paid(), "{}: {card:?}", b.name);
        // What a success page needs before it fulfils: whose session, which one.
        assert_eq!(card.id, "cs_card");
        assert_eq!(card.mode.as_deref(), Some("payment"));
        assert_eq!(card.customer.as_deref(), Some("cus_debit"));
        assert_eq!(card.subscriber.as_deref(), Some("debit-user"));
        assert!(card.belongs_to("debit-user") && !card.belongs_to("someone-else"));
        assert!(!card.belongs_to(""));
    }
}

/// The session id on the success page comes from a URL anyone can edit: the status
/// says whose session it is, and a session whose two subscriber fields disagree (a
/// Payment Link's `client_reference_id` is the buyer's to set) belongs to nobody.
#[tokio::test]
async fn a_session_status_names_its_buyer_and_ids() {
    for b in backends() {
        let (base, _) = common::stripe_stub(vec![
            (
                "/v1/checkout/sessions/cs_meta",
                200,
                json!({"id": "cs_meta", "object": "checkout.session", "status": "complete",
                       "mode": "payment", "payment_status": "paid", "livemode": false,
                       "customer": {"id": "cus_meta", "object": "customer"},
                       "payment_intent": "pi_meta",
                       "metadata": {"stripe_mirror_subscriber": "meta-user"}}),
            ),
            (
                "/v1/checkout/sessions/cs_clash",
                200,
                json!({"id": "cs_clash", "object": "checkout.session", "status": "complete",
                       "mode": "subscription", "payment_status": "paid", "livemode": false,
                       "customer": "cus_clash", "subscription": null,
                       "client_reference_id": "victim",
                       "metadata": {"stripe_mirror_subscriber": "buyer"}}),
            ),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        let meta = stripe_mirror::sync_session(&m, "cs_meta").await.unwrap();
        assert_eq!(meta.subscriber.as_deref(), Some("meta-user"), "{}", b.name);
        // An expanded customer is named by its id.
        assert_eq!(meta.customer.as_deref(), Some("cus_meta"));
        assert_eq!(meta.payment_intent.as_deref(), Some("pi_meta"));
        assert_eq!(meta.subscription, None);
        assert!(meta.is_paid() && meta.belongs_to("meta-user"));
        let clash = stripe_mirror::sync_session(&m, "cs_clash").await.unwrap();
        assert_eq!(clash.subscriber, None, "{}: {clash:?}", b.name);
        assert!(!clash.belongs_to("victim") && !clash.belongs_to("buyer"));
        // Nor is the customer linked to either.
        assert!(
            Customer::by_subscriber(&m, "victim")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            Customer::by_subscriber(&m, "buyer")
                .await
                .unwrap()
                .is_none()
        );
    }
}

/// Checkout asks Stripe what the subscriber holds: `unless_subscribed` refuses a second
/// subscription (one whose webhook has not landed counts too), and `trial_days_once`
/// gives a returning subscriber no second trial.
#[tokio::test]
async fn checkout_refuses_a_second_subscription_and_a_second_trial_when_asked() {
    for b in backends() {
        let sub = |id: &str, customer: &str, status: &str, trial_end: Value| {
            json!({"id": id, "object": "subscription", "customer": customer, "status": status,
                   "created": 100, "livemode": false, "trial_end": trial_end,
                   "items": {"object": "list", "has_more": false, "data": [{"id": format!("si_{id}"),
                       "object": "subscription_item", "price": {"id": "price_pro", "product": "prod_pro"},
                       "current_period_end": FAR}]}})
        };
        let list = |data: Vec<Value>| json!({"object": "list", "has_more": false, "data": data});
        let (base, seen) = recording_stub(vec![
            // The buyer whose first purchase's webhook is still on its way.
            ("GET", "/v1/subscriptions?customer=cus_paying", list(vec![sub("sub_new", "cus_paying", "active", Value::Null)])),
            // Came back after cancelling a trial, and a newcomer whose first try expired.
            ("GET", "/v1/subscriptions?customer=cus_back", list(vec![sub("sub_old", "cus_back", "canceled", json!(PAST))])),
            ("GET", "/v1/subscriptions?customer=cus_fresh", list(vec![sub("sub_x", "cus_fresh", "incomplete_expired", Value::Null)])),
            ("POST", "/v1/checkout/sessions", json!({"id": "cs_1", "object": "checkout.session",
                                                     "url": "https://checkout.stripe.com/c/pay/cs_1"})),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        for (cus, user) in [
            ("cus_paying", "paying"),
            ("cus_back", "back"),
            ("cus_fresh", "fresh"),
        ] {
            customer(&m, cus, user).await;
        }
        let checkout = |trial_once: bool| {
            let c = Checkout::subscription("price_pro")
                .success_url("https://app.example/welcome")
                .unless_subscribed();
            if trial_once {
                c.trial_days_once(14)
            } else {
                c.trial_days(14)
            }
        };

        let refused = checkout(true)
            .create(&m, &User("paying"))
            .await
            .unwrap_err();
        match &refused {
            Error::AlreadySubscribed {
                subscription,
                status,
                ..
            } => {
                assert_eq!(
                    (subscription.as_str(), status.as_str()),
                    ("sub_new", "active"),
                    "{}",
                    b.name
                )
            }
            other => panic!("{}: {other}", b.name),
        }
        assert!(refused.to_string().contains("Billing Portal"), "{refused}");
        assert!(
            Subscription::get(&m, "sub_new").await.unwrap().is_some(),
            "{}: what Stripe listed is mirrored",
            b.name
        );
        let posted = |seen: &Arc<Mutex<Vec<Seen>>>| {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|s| s.method == "POST")
                .count()
        };
        assert_eq!(posted(&seen), 0, "{}: no session made", b.name);
        // Canceled subscriptions are listed only when asked for: a trial had on one counts.
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .any(|s| s.path == "/v1/subscriptions"
                    && s.form.get("status").map(String::as_str) == Some("all")),
            "{}",
            b.name
        );

        let trial = |seen: &Arc<Mutex<Vec<Seen>>>| {
            let seen = seen.lock().unwrap();
            let last = seen.iter().rev().find(|s| s.method == "POST").unwrap();
            last.form
                .get("subscription_data[trial_period_days]")
                .cloned()
        };
        checkout(true).create(&m, &User("back")).await.unwrap();
        assert_eq!(trial(&seen), None, "{}: no second trial", b.name);
        checkout(false).create(&m, &User("back")).await.unwrap();
        assert_eq!(
            trial(&seen).as_deref(),
            Some("14"),
            "{}: trial_days always gives one",
            b.name
        );
        checkout(true).create(&m, &User("fresh")).await.unwrap();
        assert_eq!(
            trial(&seen).as_deref(),
            Some("14"),
            "{}: a first try that expired is no trial",
            b.name
        );
    }
}

/// The Billing Portal opens where the subscriber needs it: the card form for one past
/// due, the cancel or plan change of their subscription, with a configuration of the
/// host's; a subscription page for someone without one is NotFound, nothing sent.
#[tokio::test]
async fn the_billing_portal_deep_links_to_the_page_needed() {
    for b in backends() {
        let (base, seen) = recording_stub(vec![(
            "POST",
            "/v1/billing_portal/sessions",
            json!({"id": "bps_1", "object": "billing_portal.session", "url": "https://billing.stripe.com/p/session/bps_1"}),
        )])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        customer(&m, "cus_late", "late").await;
        subscription(
            &m,
            "sub_old",
            "cus_late",
            "canceled",
            &["prod_pro"],
            json!({}),
        )
        .await;
        subscription(
            &m,
            "sub_late",
            "cus_late",
            "past_due",
            &["prod_pro"],
            json!({"created": 200}),
        )
        .await;
        customer(&m, "cus_none", "none").await;
        let last = || seen.lock().unwrap().last().unwrap().form.clone();
        let portal = |user: &str| BillingPortal::new(user, "https://app.example/account");

        portal("late")
            .payment_method_update()
            .configuration("bpc_1")
            .open(&m)
            .await
            .unwrap();
        assert_eq!(
            last(),
            form(&[
                ("customer", "cus_late"),
                ("return_url", "https://app.example/account"),
                ("configuration", "bpc_1"),
                ("flow_data[type]", "payment_method_update"),
            ]),
            "{}",
            b.name
        );
        portal("late").subscription_cancel().open(&m).await.unwrap();
        assert_eq!(
            last().get("flow_data[type]").map(String::as_str),
            Some("subscription_cancel")
        );
        assert_eq!(
            last()
                .get("flow_data[subscription_cancel][subscription]")
                .map(String::as_str),
            Some("sub_late"),
            "{}: the one Stripe still bills, not the canceled one",
            b.name
        );
        portal("late").subscription_update().open(&m).await.unwrap();
        assert_eq!(
            last()
                .get("flow_data[subscription_update][subscription]")
                .map(String::as_str),
            Some("sub_late"),
            "{}",
            b.name
        );
        let sent = seen.lock().unwrap().len();
        let nothing = portal("none")
            .subscription_cancel()
            .open(&m)
            .await
            .unwrap_err();
        assert!(
            matches!(nothing, Error::NotFound { .. }),
            "{}: {nothing}",
            b.name
        );
        assert!(
            nothing.to_string().contains("no subscription to manage"),
            "{nothing}"
        );
        assert_eq!(seen.lock().unwrap().len(), sent, "{}", b.name);
    }
}

/// `unless_subscribed` asks Stripe about the customer first: a customer Stripe no longer
/// has is found out by that list too, and the session is made for a new one.
#[tokio::test]
async fn unless_subscribed_gets_past_a_customer_stripe_no_longer_has() {
    for b in backends() {
        let missing = json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
            "param": "customer", "message": "No such customer: 'cus_gone'"}});
        let (base, seen) = recording_stub(vec![
            ("GET", "/v1/subscriptions?customer=cus_gone", missing),
            (
                "GET",
                "/v1/subscriptions",
                json!({"object": "list", "has_more": false, "data": []}),
            ),
            (
                "POST",
                "/v1/customers",
                json!({"id": "cus_anew", "object": "customer",
                "metadata": {"stripe_mirror_subscriber": "gone-user"}}),
            ),
            (
                "POST",
                "/v1/checkout/sessions",
                json!({"id": "cs_3", "object": "checkout.session",
                "url": "https://checkout.stripe.com/c/pay/cs_3"}),
            ),
        ])
        .await;
        let m = Mirror::connect(config(&b, Some(&base))).await.unwrap();
        customer(&m, "cus_gone", "gone-user").await;
        let session = Checkout::subscription("price_pro")
            .success_url("https://app.example/welcome")
            .unless_subscribed()
            .create(&m, &User("gone-user"))
            .await
            .unwrap();
        assert_eq!(session.customer, "cus_anew", "{}", b.name);
        assert!(
            Customer::get(&m, "cus_gone")
                .await
                .unwrap()
                .unwrap()
                .deleted,
            "{}",
            b.name
        );
        let posted: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.path.clone())
            .collect();
        assert_eq!(
            posted,
            ["/v1/customers", "/v1/checkout/sessions"],
            "{}",
            b.name
        );
    }
}
