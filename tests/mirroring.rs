//! JSON to row: Stripe's current fixtures and old (localstripe-era) shapes mirror
//! with the right typed columns; bad shapes are clear errors; stale writes and
//! resurrections change nothing. Every test runs on SQLite and Postgres.

mod common;

use common::{backends, fixture, local_fixture};
use serde_json::json;
use stripe_mirror::{Customer, Error, Price, Product, Subscription, SubscriptionItem};

#[tokio::test]
async fn current_fixtures_mirror_with_typed_columns() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;

        let c = Customer::sync_from_stripe_data(&m, &fixture("customer"))
            .await
            .unwrap();
        assert_eq!(c.id, "cus_QXg1o8vcGmoR32", "{n}");
        assert_eq!(
            (c.livemode, c.created, c.deleted),
            (false, Some(1234567890), false),
            "{n}"
        );
        assert_eq!(
            c.data()["invoice_prefix"],
            "7FE1103",
            "{n}: raw object kept"
        );

        let p = Product::sync_from_stripe_data(&m, &fixture("product"))
            .await
            .unwrap();
        let expected_name = fixture("product")["name"].as_str().map(str::to_owned);
        assert_eq!((p.name, p.active), (expected_name, Some(true)), "{n}");

        let price = Price::sync_from_stripe_data(&m, &fixture("price"))
            .await
            .unwrap();
        assert_eq!(
            price.product_id.as_deref(),
            Some("prod_QXg1hqf4jFNsqG"),
            "{n}"
        );
        assert_eq!(price.unit_amount, Some(2000), "{n}");
        assert_eq!(price.currency.as_deref(), Some("usd"), "{n}");
        assert_eq!(
            price.recurring_interval.as_ref().map(|i| i.as_str()),
            Some("month"),
            "{n}"
        );
        assert_eq!(price.recurring_interval_count, Some(1), "{n}");
        assert_eq!(price.active, Some(true), "{n}");

        // A plan is accepted where a price is expected.
        let mut plan = fixture("plan");
        plan["id"] = json!("plan_fixture");
        let plan = Price::sync_from_stripe_data(&m, &plan).await.unwrap();
        assert_eq!(
            (
                plan.unit_amount,
                plan.recurring_interval.as_ref().map(|i| i.as_str())
            ),
            (Some(2000), Some("month")),
            "{n}"
        );
        assert_eq!(
            plan.product_id.as_deref(),
            Some("prod_QXg1hqf4jFNsqG"),
            "{n}"
        );

        let sub_json = fixture("subscription");
        let sub = Subscription::sync_from_stripe_data(&m, &sub_json)
            .await
            .unwrap();
        assert_eq!(
            sub.customer_id.as_deref(),
            Some("cus_QXg1o8vcGmoR32"),
            "{n}"
        );
        assert_eq!(
            sub.status.as_ref().map(|s| s.as_str()),
            Some("active"),
            "{n}"
        );
        // On current API versions the period lives on the items.
        let item_end = sub_json["items"]["data"][0]["current_period_end"].as_i64();
        assert!(sub_json.get("current_period_end").is_none());
        assert_eq!(sub.current_period_end, item_end, "{n}");
        assert_eq!(sub.cancel_at, Some(1234567890), "{n}");
        let items = sub.items(&m).await.unwrap();
        assert_eq!(items.len(), 1, "{n}");
        assert_eq!(items[0].id, "si_QXhVnC2h0Jczwc", "{n}");
        assert_eq!(
            items[0].subscription_id.as_deref(),
            Some(sub.id.as_str()),
            "{n}"
        );
        assert_eq!(
            items[0].price_id.as_deref(),
            Some("price_1PgafmB7WZ01zgkW6dKueIc5"),
            "{n}"
        );
        assert_eq!(
            items[0].product_id.as_deref(),
            Some("prod_QXg1hqf4jFNsqG"),
            "{n}"
        );

        // Stripe's standalone subscription_item fixture, as an item of a subscription.
        let item = fixture("subscription_item");
        let mut with_item = sub_json.clone();
        with_item["id"] = json!("sub_with_fixture_item");
        with_item["items"]["data"] = json!([item.clone()]);
        let s2 = Subscription::sync_from_stripe_data(&m, &with_item)
            .await
            .unwrap();
        let items = s2.items(&m).await.unwrap();
        assert_eq!(items.len(), 1, "{n}");
        assert_eq!(items[0].id, item["id"].as_str().unwrap(), "{n}");
        assert_eq!(
            items[0].subscription_id.as_deref(),
            Some("sub_with_fixture_item"),
            "{n}: the parent id wins"
        );
        assert_eq!(
            items[0].price_id.as_deref(),
            item["price"]["id"].as_str(),
            "{n}"
        );
        assert_eq!(
            items[0].product_id.as_deref(),
            item["price"]["product"].as_str(),
            "{n}"
        );
        assert_eq!(
            items[0].current_period_end,
            item["current_period_end"].as_i64(),
            "{n}"
        );
        assert_eq!(
            s2.current_period_end,
            item["current_period_end"].as_i64(),
            "{n}"
        );
    }
}

#[tokio::test]
async fn deleted_fixtures_become_tombstones() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        Customer::sync_from_stripe_data(&m, &fixture("customer"))
            .await
            .unwrap();
        let c = Customer::sync_from_stripe_data(&m, &fixture("deleted_customer"))
            .await
            .unwrap();
        assert!(c.deleted, "{n}");
        assert_eq!(
            c.data()["invoice_prefix"],
            "7FE1103",
            "{n}: last full data kept"
        );

        let p = Product::sync_from_stripe_data(&m, &fixture("deleted_product"))
            .await
            .unwrap();
        assert!(
            p.deleted,
            "{n}: an unseen deleted object is stored as a tombstone"
        );
        for name in ["deleted_price", "deleted_plan"] {
            let price = Price::sync_from_stripe_data(&m, &fixture(name))
                .await
                .unwrap();
            assert!(price.deleted, "{n}: {name}");
        }
    }
}

#[tokio::test]
async fn legacy_shapes_mirror() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let c = Customer::sync_from_stripe_data(&m, &local_fixture("legacy_customer.json"))
            .await
            .unwrap();
        assert_eq!(c.email.as_deref(), Some("legacy@example.com"), "{n}");
        assert_eq!(c.subscriber_id.as_deref(), Some("user-legacy"), "{n}");

        let plan = Price::sync_from_stripe_data(&m, &local_fixture("legacy_plan.json"))
            .await
            .unwrap();
        assert_eq!(plan.unit_amount, Some(900), "{n}");
        assert_eq!(plan.currency.as_deref(), Some("eur"), "{n}");
        assert_eq!(
            plan.recurring_interval.as_ref().map(|i| i.as_str()),
            Some("month"),
            "{n}"
        );
        assert_eq!(plan.product_id.as_deref(), Some("prod_legacy01"), "{n}");

        let sub =
            Subscription::sync_from_stripe_data(&m, &local_fixture("legacy_subscription.json"))
                .await
                .unwrap();
        assert_eq!(sub.current_period_start, Some(1546300800), "{n}");
        assert_eq!(
            sub.current_period_end,
            Some(4102444800),
            "{n}: top-level period"
        );
        assert_eq!(sub.cancel_at_period_end, Some(false), "{n}");
        let items = sub.items(&m).await.unwrap();
        assert_eq!(items.len(), 1, "{n}");
        assert_eq!(
            items[0].price_id.as_deref(),
            Some("basic-monthly"),
            "{n}: plan as price"
        );
        assert_eq!(items[0].product_id.as_deref(), Some("prod_legacy01"), "{n}");
        assert_eq!(items[0].quantity, Some(2), "{n}");
        assert!(
            c.subscription(&m)
                .await
                .unwrap()
                .is_some_and(|s| s.id == "sub_legacy01"),
            "{n}"
        );
        assert!(
            c.is_subscribed_to(&m, &["prod_legacy01"]).await.unwrap(),
            "{n}"
        );
    }
}

#[tokio::test]
async fn bad_shapes_are_clear_errors_and_store_nothing() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let cases = [
            (json!({"id": "prod_1", "object": "customer"}), "object"),
            (json!({"object": "product"}), "id"),
            (
                json!({"id": "prod_2", "object": "product", "name": 42}),
                "name",
            ),
            (
                json!({"id": "prod_3", "object": "product", "active": "yes"}),
                "active",
            ),
            (
                json!({"id": "prod_4", "object": "product", "created": 1.5}),
                "created",
            ),
        ];
        for (value, field) in cases {
            let err = Product::sync_from_stripe_data(&m, &value)
                .await
                .unwrap_err();
            match &err {
                Error::Mapping { field: f, .. } => assert_eq!(f, field, "{n}: {err}"),
                other => panic!("{n}: expected a mapping error, got {other}"),
            }
            assert!(
                err.to_string().contains(&format!("`{field}`")),
                "{n}: {err}"
            );
        }
        let err = Subscription::sync_from_stripe_data(
            &m,
            &json!({"id": "sub_x", "object": "subscription", "status": "active"}),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("sub_x") && err.to_string().contains("customer"),
            "{n}: {err}"
        );
        let err = Subscription::sync_from_stripe_data(
            &m,
            &json!({"id": "sub_y", "object": "subscription", "customer": "cus_1", "status": "active", "items": {"data": [{"id": "si_1", "object": "subscription_item", "price": 7}]}}),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("si_1") && err.to_string().contains("price"),
            "{n}: {err}"
        );
        // Nothing half-written: the subscription row is not there either.
        assert!(
            Subscription::get(&m, "sub_y").await.unwrap().is_none(),
            "{n}"
        );
        // Building the subscription's own row without a database reads no items.
        let alone = Subscription::from_stripe_json(
            &json!({"id": "sub_y", "object": "subscription", "customer": "cus_1", "status": "active", "items": {"data": [{"id": "si_1", "object": "subscription_item", "price": 7}]}}),
        )
        .unwrap();
        assert_eq!(alone.id, "sub_y", "{n}");
        assert!(Product::get(&m, "prod_2").await.unwrap().is_none(), "{n}");
    }
}

fn sub_version(status: &str, items: &[(&str, &str)]) -> serde_json::Value {
    json!({
        "id": "sub_v", "object": "subscription", "customer": "cus_v", "status": status, "livemode": false,
        "items": {"data": items.iter().map(|(id, price)| json!({
            "id": id, "object": "subscription_item", "price": {"id": price, "product": "prod_v"},
            "current_period_end": 4102444800_i64,
        })).collect::<Vec<_>>()},
    })
}

#[tokio::test]
async fn stale_writes_change_nothing() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let s = Subscription::sync_from_stripe_data_at(
            &m,
            &sub_version("past_due", &[("si_a", "price_a")]),
            200,
        )
        .await
        .unwrap();
        assert_eq!(s.stamp, 200);
        // Older data: refused, row and items untouched.
        let s = Subscription::sync_from_stripe_data_at(
            &m,
            &sub_version("active", &[("si_b", "price_b")]),
            100,
        )
        .await
        .unwrap();
        assert_eq!(
            (s.status.as_ref().map(|s| s.as_str()), s.stamp),
            (Some("past_due"), 200),
            "{n}"
        );
        let items = s.items(&m).await.unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["si_a"],
            "{n}"
        );
        // Newer data applies, and the item that left the list becomes a tombstone.
        let s = Subscription::sync_from_stripe_data_at(
            &m,
            &sub_version("active", &[("si_b", "price_b")]),
            300,
        )
        .await
        .unwrap();
        assert_eq!(
            (s.status.as_ref().map(|s| s.as_str()), s.stamp),
            (Some("active"), 300),
            "{n}"
        );
        let items = s.items(&m).await.unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["si_b"],
            "{n}"
        );
        assert!(
            SubscriptionItem::get(&m, "si_a")
                .await
                .unwrap()
                .unwrap()
                .deleted,
            "{n}"
        );
    }
}

/// Items are tombstoned only when the subscription lists them all: a list that is one
/// page of more (`has_more`), or no list at all, says nothing of the items it leaves out.
#[tokio::test]
async fn items_left_out_of_a_partial_list_stay() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let both = sub_version("active", &[("si_a", "price_a"), ("si_b", "price_b")]);
        Subscription::sync_from_stripe_data_at(&m, &both, 100)
            .await
            .unwrap();
        let mut page = sub_version("active", &[("si_a", "price_a")]);
        page["items"]["has_more"] = json!(true);
        Subscription::sync_from_stripe_data_at(&m, &page, 200)
            .await
            .unwrap();
        let mut bare = sub_version("past_due", &[]);
        bare.as_object_mut().unwrap().remove("items");
        let s = Subscription::sync_from_stripe_data_at(&m, &bare, 300)
            .await
            .unwrap();
        assert_eq!(
            s.status.as_ref().map(|s| s.as_str()),
            Some("past_due"),
            "{n}"
        );
        let items = s.items(&m).await.unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["si_a", "si_b"],
            "{n}"
        );
        // The whole list again: the item it leaves out is gone.
        Subscription::sync_from_stripe_data_at(&m, &page_all(&["si_b"]), 400)
            .await
            .unwrap();
        assert!(
            SubscriptionItem::get(&m, "si_a")
                .await
                .unwrap()
                .unwrap()
                .deleted,
            "{n}"
        );
    }
}

/// A whole list written over several items: the ones it names are written with their
/// new data, the ones it leaves out become tombstones, and an item of another
/// subscription is untouched. (On Postgres the tombstones ride with the last item's
/// upsert, in one statement: this checks that statement's binds line up.)
#[tokio::test]
async fn a_whole_list_writes_what_it_names_and_tombstones_the_rest() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let three = sub_version(
            "active",
            &[
                ("si_a", "price_a"),
                ("si_b", "price_b"),
                ("si_c", "price_c"),
            ],
        );
        Subscription::sync_from_stripe_data_at(&m, &three, 100)
            .await
            .unwrap();
        let mut other = sub_version("active", &[("si_x", "price_x")]);
        other["id"] = json!("sub_other");
        Subscription::sync_from_stripe_data_at(&m, &other, 100)
            .await
            .unwrap();
        let mut next = sub_version("active", &[("si_b", "price_b2"), ("si_d", "price_d")]);
        next["items"]["has_more"] = json!(false);
        let s = Subscription::sync_from_stripe_data_at(&m, &next, 200)
            .await
            .unwrap();
        let items = s.items(&m).await.unwrap();
        let listed: Vec<_> = items
            .iter()
            .map(|i| (i.id.as_str(), i.price_id.as_deref()))
            .collect();
        assert_eq!(
            listed,
            [("si_b", Some("price_b2")), ("si_d", Some("price_d"))],
            "{n}"
        );
        for (id, gone) in [("si_a", true), ("si_c", true), ("si_x", false)] {
            let item = SubscriptionItem::get(&m, id).await.unwrap().unwrap();
            assert_eq!(item.deleted, gone, "{n}: {id}");
        }
        // The last item listed is one stored already: its new data applies.
        let mut again = sub_version("active", &[("si_b", "price_b3"), ("si_d", "price_d2")]);
        again["items"]["has_more"] = json!(false);
        let s = Subscription::sync_from_stripe_data_at(&m, &again, 250)
            .await
            .unwrap();
        let prices: Vec<_> = s
            .items(&m)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.price_id)
            .collect();
        assert_eq!(
            prices,
            [Some("price_b3".to_owned()), Some("price_d2".to_owned())],
            "{n}"
        );
        // The list emptied: every item left is gone.
        let mut none = sub_version("canceled", &[]);
        none["items"]["has_more"] = json!(false);
        let s = Subscription::sync_from_stripe_data_at(&m, &none, 300)
            .await
            .unwrap();
        assert!(s.items(&m).await.unwrap().is_empty(), "{n}");
        let item = SubscriptionItem::get(&m, "si_d").await.unwrap().unwrap();
        assert!(item.deleted, "{n}");
    }
}

fn page_all(ids: &[&str]) -> serde_json::Value {
    let mut v = sub_version(
        "active",
        &ids.iter().map(|id| (*id, "price_b")).collect::<Vec<_>>(),
    );
    v["items"]["has_more"] = json!(false);
    v
}

/// A trialing subscription's `billing_cycle_anchor` is its trial's end, days ahead: it
/// says nothing about when the object was read, so it must not stamp the row, or
/// every event until then (the trial converting, a cancel) would look older and be
/// refused.
#[tokio::test]
async fn a_future_billing_anchor_does_not_stamp_the_row_ahead() {
    let now = chrono::Utc::now().timestamp();
    let trial_end = now + 14 * 24 * 3600;
    for b in backends() {
        let m = b.mirror().await;
        let trialing = json!({"id": "sub_trial", "object": "subscription", "customer": "cus_trial",
            "status": "trialing", "created": now - 60, "start_date": now - 60,
            "current_period_start": now - 60, "trial_start": now - 60, "trial_end": trial_end,
            "billing_cycle_anchor": trial_end, "items": {"object": "list", "has_more": false, "data": []}});
        Subscription::sync_from_stripe_data(&m, &trialing)
            .await
            .unwrap();
        // The `customer.subscription.updated` of a cancel, a second later.
        let mut canceled = trialing.clone();
        canceled["status"] = json!("canceled");
        canceled["canceled_at"] = json!(now);
        let row = Subscription::sync_from_stripe_data_at(&m, &canceled, now)
            .await
            .unwrap();
        assert_eq!(
            row.status.as_ref().map(|s| s.as_str()),
            Some("canceled"),
            "{}: the newer event applies",
            b.name
        );
    }
}

#[tokio::test]
async fn tombstones_cannot_be_resurrected() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let live = json!({"id": "prod_t", "object": "product", "name": "Pro", "active": true});
        Product::sync_from_stripe_data_at(&m, &live, 100)
            .await
            .unwrap();
        let dead = Product::mark_deleted(&m, "prod_t").await.unwrap();
        assert!(dead.deleted, "{n}");
        // A late update, even stamped newer than the delete, cannot bring it back.
        let mut later = live.clone();
        later["name"] = json!("Pro 2");
        let p = Product::sync_from_stripe_data_at(&m, &later, dead.stamp + 1000)
            .await
            .unwrap();
        assert!(p.deleted, "{n}");
        assert_eq!(p.name.as_deref(), Some("Pro"), "{n}");
        // A late delete with an old stamp still deletes a row a fetch (or the host)
        // wrote, and keeps the newer stamp: a customer's id never comes back, and the
        // host's clock may have stamped it ahead.
        Customer::sync_from_stripe_data_at(&m, &json!({"id": "cus_u", "object": "customer"}), 500)
            .await
            .unwrap();
        let u = Customer::sync_from_stripe_data_at(
            &m,
            &json!({"id": "cus_u", "object": "customer", "deleted": true}),
            10,
        )
        .await
        .unwrap();
        assert!(u.deleted && u.stamp == 500, "{n}");
        // A product's id can be used again: a deletion seconds older than a fetch of
        // it is the old product's (tests/ordering.rs), one within its second wins.
        Product::sync_from_stripe_data_at(
            &m,
            &json!({"id": "prod_u", "object": "product", "name": "U"}),
            500,
        )
        .await
        .unwrap();
        let u = Product::sync_from_stripe_data_at(
            &m,
            &json!({"id": "prod_u", "object": "product", "deleted": true}),
            499,
        )
        .await
        .unwrap();
        assert!(u.deleted && u.stamp == 500, "{n}");
        assert!(
            !Product::list_active(&m)
                .await
                .unwrap()
                .iter()
                .any(|p| p.id == "prod_u"),
            "{n}"
        );
    }
}

#[tokio::test]
async fn concurrent_writers_end_with_the_freshest_version() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let mut tasks = Vec::new();
        for round in 0..5 {
            for writer in 0..8_i64 {
                let m = m.clone();
                tasks.push(tokio::spawn(async move {
                    let stamp = 1000 + writer * 10 + round;
                    let item = format!("si_w{writer}");
                    let value =
                        sub_version(&format!("status_{stamp}"), &[(item.as_str(), "price_w")]);
                    Subscription::sync_from_stripe_data_at(&m, &value, stamp).await
                }));
            }
        }
        for t in tasks {
            t.await.unwrap().unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        let s = Subscription::get(&m, "sub_v").await.unwrap().unwrap();
        assert_eq!(
            (s.status.as_ref().map(|s| s.as_str()), s.stamp),
            (Some("status_1074"), 1074),
            "{n}"
        );
        let items = s.items(&m).await.unwrap();
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["si_w7"],
            "{n}"
        );
    }
}

#[test]
#[cfg(feature = "postgres")]
fn eight_threads_on_postgres_without_errors() {
    // Real OS threads, each with its own runtime, as separate app workers would be.
    let url = common::postgres_url();
    let config = stripe_mirror::Config::new(url);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(stripe_mirror::Mirror::connect(config)).unwrap();
    let handles: Vec<_> = (0..8_i64)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                for i in 0..25_i64 {
                    let stamp = 10_000 + i * 8 + t;
                    let value = sub_version(
                        &format!("s{stamp}"),
                        &[("si_same", "price_x"), (&format!("si_t{t}"), "price_y")],
                    );
                    rt.block_on(Subscription::sync_from_stripe_data_at(&m, &value, stamp))
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread");
    }
    let s = rt
        .block_on(Subscription::get(&m, "sub_v"))
        .unwrap()
        .unwrap();
    let freshest = 10_000 + 24 * 8 + 7;
    assert_eq!(
        (s.status.clone().unwrap().to_string(), s.stamp),
        (format!("s{freshest}"), freshest)
    );
    let items = rt.block_on(s.items(&m)).unwrap();
    assert_eq!(
        items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["si_same", "si_t7"]
    );
}

/// The row types built from Stripe JSON without a database (for handlers and host
/// tests) hold what the mirror stores for the same object.
#[tokio::test]
async fn row_types_built_without_a_database_match_the_stored_rows() {
    use stripe_mirror::{Price, Product, Subscription};
    let strip = |debug: String| {
        // synced_at is bookkeeping, the stamp depends on how the data came.
        debug
            .split(", ")
            .filter(|f| !f.starts_with("synced_at") && !f.starts_with("stamp"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for b in backends() {
        let m = b.mirror().await;
        let (c, p, pr, s) = (
            fixture("customer"),
            fixture("product"),
            fixture("price"),
            fixture("subscription"),
        );
        assert_eq!(
            strip(format!("{:?}", Customer::from_stripe_json(&c).unwrap())),
            strip(format!(
                "{:?}",
                Customer::sync_from_stripe_data(&m, &c).await.unwrap()
            )),
            "{}",
            b.name
        );
        assert_eq!(
            strip(format!("{:?}", Product::from_stripe_json(&p).unwrap())),
            strip(format!(
                "{:?}",
                Product::sync_from_stripe_data(&m, &p).await.unwrap()
            ))
        );
        assert_eq!(
            strip(format!("{:?}", Price::from_stripe_json(&pr).unwrap())),
            strip(format!(
                "{:?}",
                Price::sync_from_stripe_data(&m, &pr).await.unwrap()
            ))
        );
        let built = Subscription::from_stripe_json(&s).unwrap();
        assert_eq!(built.status.as_ref().map(|s| s.as_str()), Some("active"));
        assert_eq!(
            strip(format!("{built:?}")),
            strip(format!(
                "{:?}",
                Subscription::sync_from_stripe_data(&m, &s).await.unwrap()
            ))
        );
        assert!(
            Subscription::from_stripe_json(
                &serde_json::json!({"id": "sub_x", "object": "customer"})
            )
            .is_err()
        );
    }
}

/// Statuses and intervals are enums that keep a value Stripe adds later.
#[tokio::test]
async fn closed_sets_are_enums_that_keep_unknown_values() {
    use stripe_mirror::{Price, RecurringInterval, Subscription, SubscriptionStatus};
    for b in backends() {
        let m = b.mirror().await;
        let sub = |id: &str, status: &str| {
            serde_json::json!({"id": id, "object": "subscription",
            "customer": "cus_e", "status": status, "items": {"data": []}})
        };
        let known = Subscription::sync_from_stripe_data(&m, &sub("sub_known", "past_due"))
            .await
            .unwrap();
        assert_eq!(
            known.status,
            Some(SubscriptionStatus::PastDue),
            "{}",
            b.name
        );
        let future = Subscription::sync_from_stripe_data(&m, &sub("sub_future", "on_hold_2030"))
            .await
            .unwrap();
        assert_eq!(
            future.status,
            Some(SubscriptionStatus::Other("on_hold_2030".into())),
            "{}",
            b.name
        );
        assert!(!future.is_status_current());
        let reread = Subscription::get(&m, "sub_future").await.unwrap().unwrap();
        assert_eq!(reread.status.unwrap().as_str(), "on_hold_2030");
        let price = Price::sync_from_stripe_data(&m, &serde_json::json!({"id": "price_e", "object": "price",
            "product": "prod_e", "currency": "usd", "unit_amount": 100, "recurring": {"interval": "year"}})).await.unwrap();
        assert_eq!(
            price.recurring_interval,
            Some(RecurringInterval::Year),
            "{}",
            b.name
        );
        // A price id where a product id goes is a clear error.
        let c = Customer::sync_from_stripe_data(
            &m,
            &serde_json::json!({"id": "cus_e", "object": "customer"}),
        )
        .await
        .unwrap();
        let err = c.is_subscribed_to(&m, &["price_e"]).await.unwrap_err();
        assert!(err.to_string().contains("product ids"), "{err}");
    }
}

#[test]
#[cfg(feature = "postgres")]
fn large_objects_are_stored_lz4_compressed_on_postgres() {
    // Stripe's example subscription is about 4 KiB of JSON: Postgres compresses it, with
    // lz4 since the migration (pglz took a tenth of the server's CPU in the benchmark).
    let url = common::postgres_url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let m = stripe_mirror::Mirror::connect(stripe_mirror::Config::new(url.clone()))
            .await
            .unwrap();
        Subscription::sync_from_stripe_data(&m, &fixture("subscription"))
            .await
            .unwrap();
    });
    let method = common::query_text(
        &url,
        "SELECT COALESCE(pg_column_compression(data), 'none') AS t FROM stripe_subscriptions",
    );
    // A server built without lz4 keeps its default (the migration leaves it alone).
    let has_lz4 = common::query_count(
        &url,
        "SELECT COUNT(*) AS n FROM pg_settings \
         WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)",
    ) == 1;
    assert_eq!(method, if has_lz4 { "lz4" } else { "pglz" });
}

/// A NUL character (U+0000) in an object from the API or the host is refused alike on
/// both backends, as a mapping error naming the object (Postgres cannot store it;
/// SQLite would have).
#[tokio::test]
async fn an_object_holding_a_nul_is_refused_on_both_backends() {
    for b in backends() {
        let m = b.mirror().await;
        let n = b.name;
        let nul = json!({"id": "cus_nul", "object": "customer", "name": "a\u{0}b"});
        let refused = Customer::sync_from_stripe_data(&m, &nul).await;
        assert!(
            matches!(&refused, Err(Error::Mapping { id, .. }) if id == "cus_nul"),
            "{n}: {refused:?}"
        );
        assert!(Customer::get(&m, "cus_nul").await.unwrap().is_none(), "{n}");
    }
}
