//! Reads from the local database: customers by subscriber, subscription checks,
//! prices and products, API keys, migrations. Every test runs on SQLite and Postgres.

mod common;

use common::backends;
use serde_json::{Value, json};
use stripe_mirror::{ApiKey, ApiKeyKind, Customer, Error, Mirror, Price, Product, Subscription};

const FUTURE: i64 = 4102444800; // 2100-01-01
const PAST: i64 = 946684800; // 2000-01-01

fn customer(id: &str, subscriber: &str) -> Value {
    json!({"id": id, "object": "customer", "livemode": false, "email": format!("{subscriber}@example.com"),
           "created": 1700000000, "metadata": {"stripe_mirror_subscriber": subscriber}})
}

fn subscription(id: &str, customer: &str, status: &str, product: &str, extra: Value) -> Value {
    let mut v = json!({"id": id, "object": "subscription", "customer": customer, "status": status,
        "livemode": false, "created": 1700000000,
        "items": {"data": [{"id": format!("si_{id}"), "object": "subscription_item",
            "price": {"id": format!("price_{product}"), "object": "price", "product": product},
            "current_period_start": PAST, "current_period_end": FUTURE}]}});
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    v
}

#[tokio::test]
async fn customer_subscription_checks() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        Customer::sync_from_stripe_data(&m, &customer("cus_a", "user-a"))
            .await
            .unwrap();
        // A live-mode customer of the same subscriber is not returned in test mode.
        let mut live = customer("cus_live", "user-a");
        live["livemode"] = json!(true);
        Customer::sync_from_stripe_data(&m, &live).await.unwrap();
        let c = Customer::by_subscriber(&m, "user-a")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.id, "cus_a", "{n}");
        assert!(
            Customer::by_subscriber(&m, "nobody")
                .await
                .unwrap()
                .is_none(),
            "{n}"
        );

        assert!(c.subscription(&m).await.unwrap().is_none(), "{n}");
        Subscription::sync_from_stripe_data(
            &m,
            &subscription("sub_old", "cus_a", "canceled", "prod_basic", json!({})),
        )
        .await
        .unwrap();
        assert!(
            c.subscription(&m).await.unwrap().is_none(),
            "{n}: canceled is not valid"
        );
        assert!(!c.has_valid_subscription(&m).await.unwrap(), "{n}");

        Subscription::sync_from_stripe_data(
            &m,
            &subscription("sub_pro", "cus_a", "active", "prod_pro", json!({})),
        )
        .await
        .unwrap();
        let s = c.subscription(&m).await.unwrap().expect("one valid");
        assert_eq!(s.id, "sub_pro", "{n}");
        assert!(
            s.is_valid() && s.is_status_current() && s.is_period_current(),
            "{n}"
        );
        assert!(!s.on_trial() && !s.on_grace_period(), "{n}");
        assert!(
            c.is_subscribed_to(&m, &["prod_pro", "prod_x"])
                .await
                .unwrap(),
            "{n}"
        );
        assert!(
            !c.is_subscribed_to(&m, &["prod_basic"]).await.unwrap(),
            "{n}: only via a canceled one"
        );
        assert_eq!(c.subscriptions(&m).await.unwrap().len(), 2, "{n}");
        assert_eq!(c.active_subscriptions(&m).await.unwrap().len(), 1, "{n}");

        Subscription::sync_from_stripe_data(
            &m,
            &subscription(
                "sub_two",
                "cus_a",
                "trialing",
                "prod_basic",
                json!({"trial_end": FUTURE}),
            ),
        )
        .await
        .unwrap();
        match c.subscription(&m).await {
            Err(Error::MultipleSubscriptions { count: 2, .. }) => {}
            other => panic!("{n}: expected MultipleSubscriptions, got {other:?}"),
        }
        assert_eq!(c.valid_subscriptions(&m).await.unwrap().len(), 2, "{n}");
        let trial = Subscription::get(&m, "sub_two").await.unwrap().unwrap();
        assert!(trial.on_trial() && trial.is_valid(), "{n}");
    }
}

#[tokio::test]
async fn subscription_validity_over_time() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let grace = Subscription::sync_from_stripe_data(
            &m,
            &subscription(
                "sub_g",
                "cus_g",
                "active",
                "prod_pro",
                json!({"cancel_at_period_end": true}),
            ),
        )
        .await
        .unwrap();
        assert!(grace.on_grace_period(), "{n}");
        assert!(grace.is_valid(), "{n}: valid until the period ends");
        assert!(!grace.is_valid_at(FUTURE + 1), "{n}: not after");
        assert!(!grace.on_grace_period_at(FUTURE + 1), "{n}");
        assert!(!grace.is_period_current_at(FUTURE + 1), "{n}");
        // Items of two intervals (a monthly and a yearly one): cancelling at period end
        // ends at the earliest item's, which Stripe sets as `cancel_at`; the latest
        // item's end is no grace.
        let mixed = Subscription::sync_from_stripe_data(
            &m,
            &subscription(
                "sub_mixed",
                "cus_g",
                "active",
                "prod_pro",
                json!({"cancel_at_period_end": true, "cancel_at": FUTURE - 1000}),
            ),
        )
        .await
        .unwrap();
        assert!(mixed.on_grace_period_at(FUTURE - 1001), "{n}");
        assert!(
            !mixed.on_grace_period_at(FUTURE - 999),
            "{n}: past cancel_at"
        );
        assert!(!mixed.is_valid_at(FUTURE - 999), "{n}");

        // A plain active subscription stays valid past its period end (renewal pending).
        let plain = Subscription::sync_from_stripe_data(
            &m,
            &subscription("sub_p", "cus_g", "active", "prod_pro", json!({})),
        )
        .await
        .unwrap();
        assert!(plain.is_valid_at(FUTURE + 1), "{n}");

        let trial = Subscription::sync_from_stripe_data(
            &m,
            &subscription(
                "sub_t",
                "cus_g",
                "trialing",
                "prod_pro",
                json!({"trial_end": PAST + 10}),
            ),
        )
        .await
        .unwrap();
        assert!(!trial.on_trial(), "{n}: trial over");
        assert!(trial.on_trial_at(PAST), "{n}");

        for status in [
            "past_due",
            "unpaid",
            "incomplete",
            "incomplete_expired",
            "canceled",
            "paused",
        ] {
            let s = Subscription::sync_from_stripe_data(
                &m,
                &subscription("sub_s", "cus_g", status, "prod_pro", json!({})),
            )
            .await
            .unwrap();
            assert!(!s.is_valid() && !s.is_status_current(), "{n}: {status}");
        }
    }
}

#[tokio::test]
async fn prices_and_products() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let pro = Product::sync_from_stripe_data(
            &m,
            &json!({"id": "prod_pro", "object": "product", "name": "Pro", "active": true}),
        )
        .await
        .unwrap();
        // The live mode's price of the same product id is not sold in test mode.
        for (id, amount, active, interval, live) in [
            ("price_y", 20000, true, "year", false),
            ("price_m", 2000, true, "month", false),
            ("price_old", 1500, false, "month", false),
            ("price_live", 900, true, "month", true),
        ] {
            Price::sync_from_stripe_data(&m, &json!({"id": id, "object": "price", "product": "prod_pro", "active": active,
                "livemode": live, "currency": "usd", "unit_amount": amount, "recurring": {"interval": interval, "interval_count": 1}}))
                .await
                .unwrap();
        }
        let prices = pro.active_prices(&m).await.unwrap();
        assert_eq!(
            prices.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["price_m", "price_y"],
            "{n}"
        );
        assert_eq!(
            prices[0]
                .product(&m)
                .await
                .unwrap()
                .unwrap()
                .name
                .as_deref(),
            Some("Pro"),
            "{n}"
        );
        assert_eq!(Product::list_active(&m).await.unwrap().len(), 1, "{n}");
    }
}

#[tokio::test]
async fn api_keys_are_stored_once_and_never_shown() {
    for b in backends() {
        let mut config = b.config.clone();
        config.test_secret_key = Some(stripe_mirror::Secret::new(
            "sk_test_fromenvironment0000env1",
        ));
        let m = Mirror::connect(config).await.unwrap();
        let n = b.name;
        // The environment key serves until one is stored.
        assert_eq!(
            ApiKey::default_secret_key(&m).await.unwrap().expose(),
            "sk_test_fromenvironment0000env1",
            "{n}"
        );

        let key = ApiKey::get_or_create(&m, "sk_test_51Habcdefghijklmnop1234")
            .await
            .unwrap();
        assert_eq!((key.kind, key.livemode), (ApiKeyKind::Secret, false), "{n}");
        let again = ApiKey::get_or_create(&m, "sk_test_51Habcdefghijklmnop1234")
            .await
            .unwrap();
        assert_eq!(key.id, again.id, "{n}");
        ApiKey::get_or_create(&m, "pk_live_51Habcdefghijklmnop9999")
            .await
            .unwrap();
        assert_eq!(ApiKey::list(&m).await.unwrap().len(), 2, "{n}");
        assert_eq!(
            ApiKey::default_secret_key(&m).await.unwrap().expose(),
            "sk_test_51Habcdefghijklmnop1234",
            "{n}: database first"
        );

        let shown = format!("{key} {key:?} {:?}", ApiKey::list(&m).await.unwrap());
        assert!(!shown.contains("51Habcdefghijklmnop"), "{n}: {shown}");
        assert!(shown.contains("sk_test_...1234"), "{n}: {shown}");

        assert!(
            matches!(
                ApiKey::get_or_create(&m, "hello").await,
                Err(Error::InvalidApiKey { .. })
            ),
            "{n}"
        );
        assert!(ApiKey::remove(&m, &key.id).await.unwrap(), "{n}");
        assert_eq!(
            ApiKey::default_secret_key(&m).await.unwrap().expose(),
            "sk_test_fromenvironment0000env1",
            "{n}"
        );
    }
}

/// A restricted key (`rk_`, which the environment variables also take) stored in the
/// database serves when no secret key is stored or set.
#[tokio::test]
async fn a_stored_restricted_key_serves_without_a_secret_key() {
    for b in backends() {
        let m = Mirror::connect(b.config.clone()).await.unwrap();
        let key = ApiKey::get_or_create(&m, "rk_test_51Hrestrictedkey00000rk01")
            .await
            .unwrap();
        assert_eq!(key.kind, ApiKeyKind::Restricted, "{}", b.name);
        assert_eq!(
            ApiKey::default_secret_key(&m).await.unwrap().expose(),
            "rk_test_51Hrestrictedkey00000rk01",
            "{}",
            b.name
        );
        // A stored secret key comes first.
        ApiKey::get_or_create(&m, "sk_test_51Hsecretkey0000000000sk01")
            .await
            .unwrap();
        assert_eq!(
            ApiKey::default_secret_key(&m).await.unwrap().expose(),
            "sk_test_51Hsecretkey0000000000sk01",
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn no_key_at_all_says_how_to_add_one() {
    for b in backends() {
        let mut config = b.config.clone();
        config.live_mode = true;
        config.test_secret_key = Some(stripe_mirror::Secret::new("sk_test_notforlivemode0000abcd"));
        let m = Mirror::connect(config).await.unwrap();
        ApiKey::get_or_create(&m, "sk_test_storedbutwrongmode000000")
            .await
            .unwrap();
        let err = ApiKey::default_secret_key(&m)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("live mode")
                && err.contains("STRIPE_LIVE_SECRET_KEY")
                && err.contains("api-keys add"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_in_parallel() {
    for b in backends() {
        let m = b.mirror().await;
        m.migrate().await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let config = b.config.clone();
            tasks.push(tokio::spawn(async move {
                Mirror::connect(config).await.map(|_| ())
            }));
        }
        for t in tasks {
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("{}: {e}", b.name));
        }
        Customer::sync_from_stripe_data(&m, &customer("cus_m", "u"))
            .await
            .unwrap();
    }
}

#[tokio::test]
#[cfg(feature = "postgres")]
async fn an_unreachable_database_is_a_clear_error() {
    let mut config = stripe_mirror::Config::new("postgres://nobody@127.0.0.1:1/none");
    config.connection_timeout = std::time::Duration::from_millis(300);
    match Mirror::connect(config).await {
        Err(err @ Error::Unavailable { .. }) => {
            let msg = err.to_string();
            assert!(
                msg.contains("127.0.0.1:1") && msg.contains("DATABASE_URL"),
                "{msg}"
            );
            assert!(
                std::error::Error::source(&err).is_some(),
                "the pool's error is kept"
            );
            assert!(err.is_transient());
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}
