//! Talking to Stripe: get_or_create, sync and sync_all against a real localstripe
//! (started by scripts/test.sh on 127.0.0.1), and retries, idempotency keys and bad
//! bodies against an in-process stub for what localstripe cannot do (injected 429,
//! 500 storms, malformed bodies). Every test runs on SQLite and Postgres.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use stripe_mirror::models::product::NewProduct;
use stripe_mirror::{
    Config, Customer, Error, Mirror, Product, Secret, Subscriber, Subscription, SyncOptions,
    WebhookRequest, sync_all,
};

const KEY: &str = "sk_test_apitests0000000000000";

fn localstripe() -> String {
    common::peer("STRIPE_MIRROR_TEST_LOCALSTRIPE")
}

fn with_api(config: &Config, base: &str) -> Config {
    let mut c = config.clone();
    c.api_base = Some(base.to_owned());
    c.secret_key = Some(Secret::new(KEY));
    c.stripe_retry_backoff = Duration::from_millis(20);
    c
}

fn call(method: &str, url: &str, form: &[(&str, &str)]) -> Value {
    let auth = format!("Bearer {KEY}");
    let mut response = match method {
        "POST" => ureq::post(url)
            .header("Authorization", &auth)
            .send_form(form.iter().copied()),
        "DELETE" => ureq::delete(url).header("Authorization", &auth).call(),
        _ => ureq::get(url).header("Authorization", &auth).call(),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
}

/// Every object of a list endpoint, following pagination (the fakes live across tests).
fn list_all(base: &str, path: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let page = call("GET", &format!("{base}v1/{path}?limit=100{after}"), &[]);
        let data = page["data"].as_array().cloned().unwrap_or_default();
        all.extend(data.iter().cloned());
        match data.last().and_then(|o| o["id"].as_str()) {
            Some(last) if page["has_more"] == json!(true) => {
                after = format!("&starting_after={last}")
            }
            _ => return all,
        }
    }
}

struct User(String);
impl Subscriber for User {
    fn subscriber_id(&self) -> String {
        self.0.clone()
    }
    fn email(&self) -> Option<String> {
        Some(format!("{}@example.com", self.0))
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap()
    )
}

#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn get_or_create_makes_one_customer_even_when_called_concurrently() {
    let base = localstripe();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let user = unique("user");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (m, user) = (m.clone(), User(user.clone()));
                tokio::spawn(async move { Customer::get_or_create(&m, &user).await })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(
                t.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{}: {e}", b.name))
                    .id,
            );
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "{}: {ids:?}", b.name);
        let in_stripe = list_all(&base, "customers")
            .iter()
            .filter(|c| c["metadata"]["stripe_mirror_subscriber"] == json!(user))
            .count();
        assert_eq!(in_stripe, 1, "{}: one Stripe customer", b.name);
        let c = Customer::by_subscriber(&m, &user).await.unwrap().unwrap();
        assert_eq!(
            (c.id.as_str(), c.email.clone()),
            (ids[0].as_str(), Some(format!("{user}@example.com"))),
            "{}",
            b.name
        );
    }
}

/// A customer made before the mirror (Cashier's `users.stripe_id`) is linked to its
/// user in Stripe's metadata and in the mirror; one of another user is refused.
#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn a_customer_made_elsewhere_is_linked_to_its_user() {
    let base = localstripe();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let made = call(
            "POST",
            &format!("{base}v1/customers"),
            &[("email", "before@example.com")],
        );
        let id = made["id"].as_str().unwrap();
        let user = unique("linked");
        let linked = Customer::link(&m, id, &User(user.clone())).await.unwrap();
        assert_eq!(
            linked.subscriber_id.as_deref(),
            Some(user.as_str()),
            "{}",
            b.name
        );
        let in_stripe = call("GET", &format!("{base}v1/customers/{id}"), &[]);
        assert_eq!(
            in_stripe["metadata"]["stripe_mirror_subscriber"],
            json!(user)
        );
        let found = Customer::by_subscriber(&m, &user).await.unwrap().unwrap();
        assert_eq!(found.id, id, "{}", b.name);
        // Again for the same user: nothing changes.
        let again = Customer::link(&m, id, &User(user.clone())).await.unwrap();
        assert_eq!(again.subscriber_id.as_deref(), Some(user.as_str()));
        // Another user: refused, and Stripe keeps the first.
        let err = Customer::link(&m, id, &User(unique("thief")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Refused(_)), "{}: {err}", b.name);
        let in_stripe = call("GET", &format!("{base}v1/customers/{id}"), &[]);
        assert_eq!(
            in_stripe["metadata"]["stripe_mirror_subscriber"],
            json!(user)
        );
        // The key removed in Stripe (the Dashboard), the mirror not told yet: Stripe
        // says it is free, and it moves.
        call(
            "POST",
            &format!("{base}v1/customers/{id}"),
            &[("metadata[stripe_mirror_subscriber]", "")],
        );
        let moved = unique("moved");
        let relinked = Customer::link(&m, id, &User(moved.clone())).await.unwrap();
        assert_eq!(
            relinked.subscriber_id.as_deref(),
            Some(moved.as_str()),
            "{}",
            b.name
        );
        let in_stripe = call("GET", &format!("{base}v1/customers/{id}"), &[]);
        assert_eq!(
            in_stripe["metadata"]["stripe_mirror_subscriber"],
            json!(moved)
        );
        // Linked in the mirror only (as a Payment Link's Checkout links its buyer: no
        // key in Stripe): refused too, and Stripe's metadata stays unset.
        let other = call("POST", &format!("{base}v1/customers"), &[]);
        let other = other["id"].as_str().unwrap();
        Customer::sync_from_stripe_data(
            &m,
            &json!({"id": other, "object": "customer", "metadata": {}}),
        )
        .await
        .unwrap();
        common::execute_sql(
            &b.config.database_url,
            &format!(
                "UPDATE stripe_customers SET subscriber_id = 'paid-by-link' WHERE id = '{other}'"
            ),
        );
        let err = Customer::link(&m, other, &User(unique("thief")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Refused(_)), "{}: {err}", b.name);
        let in_stripe = call("GET", &format!("{base}v1/customers/{other}"), &[]);
        assert_eq!(
            in_stripe["metadata"]["stripe_mirror_subscriber"],
            Value::Null
        );
    }
}

/// Cashier's and Pay's subscription changes against localstripe: cancel at period end,
/// resume, swap, seats, cancel now; each sent to Stripe and mirrored at once.
#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn subscriptions_are_cancelled_resumed_and_swapped_in_stripe_and_mirrored() {
    let base = localstripe();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base).webhook_secret("whsec_actions"))
            .await
            .unwrap();
        let c = Customer::get_or_create(&m, &User(unique("actions")))
            .await
            .unwrap();
        call(
            "POST",
            &format!("{base}v1/customers/{}", c.id),
            &[("invoice_settings[default_payment_method]", "pm_card_visa")],
        );
        let product = call(
            "POST",
            &format!("{base}v1/products"),
            &[("name", "Actions"), ("type", "service")],
        );
        let pid = product["id"].as_str().unwrap();
        let plan = |amount: &str, interval: &str| {
            call(
                "POST",
                &format!("{base}v1/plans"),
                &[
                    ("product", pid),
                    ("amount", amount),
                    ("currency", "usd"),
                    ("interval", interval),
                ],
            )["id"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let (monthly, yearly) = (plan("900", "month"), plan("9000", "year"));
        let sub = Subscription::create(&m, &c.id, &[monthly.as_str()])
            .await
            .unwrap();
        let in_stripe = |sid: &str| call("GET", &format!("{base}v1/subscriptions/{sid}"), &[]);

        // At the start of a second: the cancel and its resume fall in the same one.
        let wait = 1_050 - chrono::Utc::now().timestamp_subsec_millis().min(1_000);
        tokio::time::sleep(Duration::from_millis(u64::from(wait))).await;
        let cancelling = sub.cancel_at_period_end(&m).await.unwrap();
        let resumed_in = chrono::Utc::now().timestamp();
        assert_eq!(cancelling.cancel_at_period_end, Some(true), "{}", b.name);
        assert!(cancelling.on_grace_period() && cancelling.is_valid());
        assert_eq!(in_stripe(&sub.id)["cancel_at_period_end"], json!(true));
        let mirrored = Subscription::get(&m, &sub.id).await.unwrap().unwrap();
        assert_eq!(mirrored.cancel_at_period_end, Some(true), "{}", b.name);

        let resumed = cancelling.resume(&m).await.unwrap();
        assert_eq!(
            (cancelling.stamp, resumed_in),
            (resumed_in, resumed_in),
            "{}: the cancel and the resume were not in one second",
            b.name
        );
        assert_eq!(resumed.cancel_at_period_end, Some(false), "{}", b.name);
        assert!(!resumed.on_grace_period() && resumed.is_valid());
        assert_eq!(in_stripe(&sub.id)["cancel_at_period_end"], json!(false));
        // The cancel's own event, arriving after the resume: its old values are what
        // the resume left, yet it is older. When both fell in one second, only a
        // fetch stamped past that second tells them apart.
        let mut was = in_stripe(&sub.id);
        was["cancel_at_period_end"] = json!(true);
        let now = chrono::Utc::now().timestamp();
        let event = json!({"id": unique("evt_cancel"), "object": "event",
            "type": "customer.subscription.updated", "created": cancelling.stamp,
            "livemode": false, "data": {"object": was,
            "previous_attributes": {"cancel_at_period_end": false}}});
        let body = event.to_string();
        let request = WebhookRequest::new(body.clone()).header(
            "Stripe-Signature",
            stripe_mirror::webhooks::signature::sign(
                body.as_bytes(),
                &Secret::new("whsec_actions"),
                now,
            ),
        );
        let r = stripe_mirror::Webhooks::new().receive(&m, request).await;
        assert_eq!(r.status, 200, "{}: {:?}", b.name, r.error);
        let after = Subscription::get(&m, &sub.id).await.unwrap().unwrap();
        assert_eq!(
            after.cancel_at_period_end,
            Some(false),
            "{}: the cancel's late event undid the resume (stamps {} and {})",
            b.name,
            cancelling.stamp,
            resumed.stamp
        );

        let swapped = resumed
            .swap(&m, &yearly, stripe_mirror::Proration::None)
            .await
            .unwrap();
        let items = swapped.items(&m).await.unwrap();
        assert_eq!(items.len(), 1, "{}: {items:?}", b.name);
        assert_eq!(items[0].price_id.as_deref(), Some(yearly.as_str()));
        assert_eq!(
            in_stripe(&sub.id)["items"]["data"][0]["plan"]["id"],
            json!(yearly),
            "{}",
            b.name
        );

        let seats = swapped
            .update_quantity(&m, 3, stripe_mirror::Proration::CreateProrations)
            .await
            .unwrap();
        assert_eq!(seats.items(&m).await.unwrap()[0].quantity, Some(3));
        assert_eq!(in_stripe(&sub.id)["items"]["data"][0]["quantity"], json!(3));
        let zero = seats
            .update_quantity(&m, 0, stripe_mirror::Proration::None)
            .await
            .unwrap_err();
        assert!(matches!(zero, stripe_mirror::Error::Refused(_)), "{zero}");

        let ended = seats.cancel_now(&m).await.unwrap();
        assert_eq!(
            ended.status.as_ref().map(|s| s.as_str()),
            Some("canceled"),
            "{}",
            b.name
        );
        assert!(!ended.is_valid(), "{}", b.name);
        assert!(
            c.subscription(&m).await.unwrap().is_none(),
            "{}: no access left",
            b.name
        );
        assert_eq!(in_stripe(&sub.id)["status"], json!("canceled"));

        // Two items: swap does not guess which one; nothing is sent.
        let two = Subscription::sync_from_stripe_data(
            &m,
            &json!({"id": format!("sub_two_{}", b.name), "object": "subscription",
                "customer": c.id, "status": "active", "livemode": false,
                "items": {"object": "list", "has_more": false, "data": [
                    {"id": format!("si_two_a_{}", b.name), "object": "subscription_item",
                     "price": {"id": monthly, "object": "price", "product": pid}},
                    {"id": format!("si_two_b_{}", b.name), "object": "subscription_item",
                     "price": {"id": yearly, "object": "price", "product": pid}}]}}),
        )
        .await
        .unwrap();
        let err = two
            .swap(&m, &yearly, stripe_mirror::Proration::None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, stripe_mirror::Error::Refused(m) if m.contains("2 items")),
            "{err}"
        );
    }
}

#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn sync_follows_stripe_and_tombstones_what_it_lost() {
    let base = localstripe();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let c = Customer::get_or_create(&m, &User(unique("sync")))
            .await
            .unwrap();
        call(
            "POST",
            &format!("{base}v1/customers/{}", c.id),
            &[
                ("email", "changed@example.com"),
                ("invoice_settings[default_payment_method]", "pm_card_visa"),
            ],
        );
        let synced = Customer::sync(&m, &c.id).await.unwrap();
        assert_eq!(
            synced.email.as_deref(),
            Some("changed@example.com"),
            "{}",
            b.name
        );

        let product = call(
            "POST",
            &format!("{base}v1/products"),
            &[("name", "Sync Pro"), ("type", "service")],
        );
        let pid = product["id"].as_str().unwrap();
        assert_eq!(
            Product::sync(&m, pid).await.unwrap().name.as_deref(),
            Some("Sync Pro")
        );
        let plan = call(
            "POST",
            &format!("{base}v1/plans"),
            &[
                ("product", pid),
                ("amount", "900"),
                ("currency", "usd"),
                ("interval", "month"),
            ],
        );
        let sub = call(
            "POST",
            &format!("{base}v1/subscriptions"),
            &[
                ("customer", &c.id),
                ("items[0][plan]", plan["id"].as_str().unwrap()),
            ],
        );
        let sid = sub["id"].as_str().unwrap();
        let s = Subscription::sync(&m, sid).await.unwrap();
        assert!(s.is_valid(), "{}: {s:?}", b.name);
        assert_eq!(
            s.items(&m).await.unwrap()[0].product_id.as_deref(),
            Some(pid)
        );
        call(
            "POST",
            &format!("{base}v1/subscriptions/{sid}"),
            &[("cancel_at_period_end", "true")],
        );
        let s = Subscription::sync(&m, sid).await.unwrap();
        assert_eq!(
            s.cancel_at_period_end,
            Some(true),
            "{}: update mirrored",
            b.name
        );
        assert!(s.on_grace_period() && s.is_valid(), "{}: {s:?}", b.name);
        call("DELETE", &format!("{base}v1/subscriptions/{sid}"), &[]);
        let s = Subscription::sync(&m, sid).await.unwrap();
        assert_eq!(
            s.status.as_ref().map(|s| s.as_str()),
            Some("canceled"),
            "{}",
            b.name
        );

        // A product handed in by a host whose clock runs ahead, then missing in
        // Stripe: Stripe's 404 still makes it a tombstone.
        let ahead = unique("prod_ahead");
        Product::sync_from_stripe_data_at(
            &m,
            &json!({"id": ahead, "object": "product", "name": "Ahead", "active": true}),
            chrono::Utc::now().timestamp() + 1_000,
        )
        .await
        .unwrap();
        let gone = Product::sync(&m, &ahead).await.unwrap();
        assert!(gone.deleted, "{}: {gone:?}", b.name);

        call("DELETE", &format!("{base}v1/customers/{}", c.id), &[]);
        let gone = Customer::sync(&m, &c.id).await.unwrap();
        assert!(
            gone.deleted,
            "{}: missing in Stripe becomes a tombstone",
            b.name
        );
        assert!(
            Customer::by_subscriber(&m, gone.subscriber_id.as_deref().unwrap())
                .await
                .unwrap()
                .is_none()
        );
    }
}

#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn sync_all_pages_through_everything_without_overwriting_fresher_data() {
    let base = localstripe();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let tag = unique("all");
        let mut ids = Vec::new();
        for i in 0..7 {
            let c = call(
                "POST",
                &format!("{base}v1/customers"),
                &[("email", &format!("{tag}-{i}@example.com"))],
            );
            ids.push(c["id"].as_str().unwrap().to_owned());
        }
        // A webhook already wrote fresher data for one of them.
        let fresher = json!({"id": ids[0], "object": "customer", "email": "fresher@example.com"});
        Customer::sync_from_stripe_data_at(&m, &fresher, chrono::Utc::now().timestamp() + 3600)
            .await
            .unwrap();
        let mut pages = Vec::new();
        let report = sync_all(
            &m,
            &SyncOptions::default()
                .page_size(3)
                .objects(&["customer", "product", "subscription"]),
            |p| pages.push(p.clone()),
        )
        .await
        .unwrap();
        assert!(
            report.failures.is_empty(),
            "{}: {:?}",
            b.name,
            report.failures
        );
        assert!(
            report.counts["customer"] >= 7,
            "{}: {:?}",
            b.name,
            report.counts
        );
        assert!(
            pages.iter().filter(|p| p.object == "customer").count() >= 3,
            "{}: paged by 3",
            b.name
        );
        for (i, id) in ids.iter().enumerate().skip(1) {
            let c = Customer::get(&m, id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{}: {id} mirrored", b.name));
            assert_eq!(c.email, Some(format!("{tag}-{i}@example.com")));
        }
        assert_eq!(
            Customer::get(&m, &ids[0])
                .await
                .unwrap()
                .unwrap()
                .email
                .as_deref(),
            Some("fresher@example.com"),
            "{}",
            b.name
        );
    }
}

/// Objects deleted in Stripe while their webhooks were missed: the next backfill
/// asked to remove them finds them gone from the list, re-fetches them, and leaves
/// tombstones; what Stripe still has, and rows of the other mode, stay as they are.
#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn sync_all_tombstones_what_stripe_deleted_while_webhooks_were_missed() {
    let base = localstripe();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let tag = unique("gone");
        let customer = |i: usize| {
            call(
                "POST",
                &format!("{base}v1/customers"),
                &[("email", &format!("{tag}-{i}@example.com"))],
            )["id"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let (kept, deleted) = (customer(0), customer(1));
        let product = call(
            "POST",
            &format!("{base}v1/products"),
            &[("name", &format!("{tag} product"))],
        )["id"]
            .as_str()
            .unwrap()
            .to_owned();
        // A live-mode row this test key cannot see: not its business.
        let other_mode = json!({"id": format!("cus_live_{}", std::process::id()), "object": "customer", "livemode": true});
        Customer::sync_from_stripe_data_at(&m, &other_mode, 1)
            .await
            .unwrap();
        let options = SyncOptions::default()
            .objects(&["customer", "product"])
            .remove_missing(true);
        let first = sync_all(&m, &options, |_| {}).await.unwrap();
        // Every kind looked at is said, with 0 when nothing was gone.
        let zeros: std::collections::BTreeMap<String, usize> =
            [("customer".to_owned(), 0), ("product".to_owned(), 0)].into();
        assert_eq!(first.removed, zeros, "{}: {first:?}", b.name);
        for id in [&kept, &deleted] {
            assert!(!Customer::get(&m, id).await.unwrap().unwrap().deleted);
        }

        // Deleted in Stripe; the webhooks never arrive.
        call("DELETE", &format!("{base}v1/customers/{deleted}"), &[]);
        call("DELETE", &format!("{base}v1/products/{product}"), &[]);
        // The stamps of the first pass must be older than the second's first page.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = sync_all(&m, &options, |_| {}).await.unwrap();
        assert!(second.failures.is_empty(), "{}: {second:?}", b.name);
        // At least ours: other tests delete objects of the shared localstripe too.
        for kind in ["customer", "product"] {
            assert!(
                second.removed.get(kind).is_some_and(|n| *n >= 1),
                "{}: {second:?}",
                b.name
            );
        }
        assert!(
            Customer::get(&m, &deleted).await.unwrap().unwrap().deleted,
            "{}: a tombstone",
            b.name
        );
        assert!(Product::get(&m, &product).await.unwrap().unwrap().deleted);
        assert!(!Customer::get(&m, &kept).await.unwrap().unwrap().deleted);
        let other = Customer::get(&m, other_mode["id"].as_str().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert!(!other.deleted, "{}: the other mode's row is left", b.name);
    }
}

/// Stripe answers a deleted customer with the object marked `deleted` (not a 404):
/// that is gone too. And a key that does not serve the mirror (the other mode, or
/// another account, whose list leaves out most of what the mirror holds) removes
/// nothing and says why; without `remove_missing` nothing is re-fetched at all.
#[tokio::test]
async fn sync_all_removes_only_what_stripe_says_is_gone_and_refuses_a_foreign_key() {
    let (base, hits) = common::stripe_stub(vec![
        (
            "/v1/customers",
            200,
            json!({"object": "list", "has_more": false, "data": [
                {"id": "cus_a", "object": "customer", "livemode": false},
                {"id": "cus_b", "object": "customer", "livemode": false}]}),
        ),
        (
            "/v1/customers/cus_gone",
            200,
            json!({"id": "cus_gone", "object": "customer", "deleted": true}),
        ),
        (
            "/v1/products",
            200,
            json!({"object": "list", "has_more": false, "data": [
                {"id": "prod_other_account", "object": "product", "livemode": false}]}),
        ),
        (
            "/v1/prices",
            200,
            json!({"object": "list", "has_more": false, "data": [
                {"id": "price_live", "object": "price", "livemode": true, "product": "prod_1"}]}),
        ),
    ])
    .await;
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        for id in ["cus_a", "cus_b", "cus_gone"] {
            let c = json!({"id": id, "object": "customer", "livemode": false});
            Customer::sync_from_stripe_data_at(&m, &c, 1).await.unwrap();
        }
        for id in ["prod_1", "prod_2"] {
            let p = json!({"id": id, "object": "product", "livemode": false});
            Product::sync_from_stripe_data_at(&m, &p, 1).await.unwrap();
        }
        let price =
            json!({"id": "price_1", "object": "price", "livemode": false, "product": "prod_1"});
        stripe_mirror::Price::sync_from_stripe_data_at(&m, &price, 1)
            .await
            .unwrap();
        let removing = |kind| SyncOptions::default().objects(&[kind]).remove_missing(true);

        // Not asked: two requests (the test clocks, none here; the list), nothing removed.
        let before = *hits.lock().unwrap();
        let report = sync_all(&m, &SyncOptions::default().objects(&["customer"]), |_| {})
            .await
            .unwrap();
        assert_eq!(*hits.lock().unwrap() - before, 2, "{}", b.name);
        assert!(report.removed.is_empty(), "{}: {report:?}", b.name);
        assert!(
            !Customer::get(&m, "cus_gone")
                .await
                .unwrap()
                .unwrap()
                .deleted
        );

        let report = sync_all(&m, &removing("customer"), |_| {}).await.unwrap();
        assert_eq!(
            report.removed.get("customer"),
            Some(&1),
            "{}: {report:?}",
            b.name
        );
        assert!(
            Customer::get(&m, "cus_gone")
                .await
                .unwrap()
                .unwrap()
                .deleted
        );
        assert!(!Customer::get(&m, "cus_a").await.unwrap().unwrap().deleted);

        // Both products the mirror held are missing from the list: refused.
        let refused = sync_all(&m, &removing("product"), |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, Error::Config(msg) if msg.contains("2 of the 2 products")),
            "{}: {refused}",
            b.name
        );
        // A live-mode price listed for a test-mode mirror: refused.
        let refused = sync_all(&m, &removing("price"), |_| {}).await.unwrap_err();
        assert!(
            matches!(&refused, Error::Config(msg) if msg.contains("other mode")),
            "{}: {refused}",
            b.name
        );
        for id in ["prod_1", "prod_2"] {
            assert!(
                !Product::get(&m, id).await.unwrap().unwrap().deleted,
                "{}",
                b.name
            );
        }
        let price = stripe_mirror::Price::get(&m, "price_1")
            .await
            .unwrap()
            .unwrap();
        assert!(!price.deleted, "{}", b.name);
    }
}

/// A stub for what no fake Stripe serves: scripted statuses, recorded idempotency keys.
async fn stub(script: Vec<(u16, &'static str)>) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    scripted(
        script
            .into_iter()
            .map(|(s, body)| (s, vec![], body))
            .collect(),
    )
    .await
}

/// One scripted answer: status, headers, body.
type Scripted = (u16, Vec<(&'static str, &'static str)>, &'static str);

/// [`stub`] with headers on the answers.
async fn scripted(script: Vec<Scripted>) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    use axum::{Router, extract::Request, response::Response, routing::any};
    let keys: Arc<Mutex<Vec<Option<String>>>> = Default::default();
    let script = Arc::new(Mutex::new(script.into_iter()));
    let k = keys.clone();
    let app = Router::new().fallback(any(move |req: Request| {
        let (k, script) = (k.clone(), script.clone());
        async move {
            let key = req
                .headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned());
            k.lock().unwrap().push(key);
            let (status, headers, body) = script.lock().unwrap().next().unwrap_or((
                500,
                vec![],
                r#"{"error":{"type":"api_error","message":"script ran out"}}"#,
            ));
            let mut r = Response::builder().status(status);
            for (n, v) in headers {
                r = r.header(n, v);
            }
            r.body(axum::body::Body::from(body)).unwrap()
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/"), keys)
}

const RATE_LIMITED: &str = r#"{"error":{"type":"invalid_request_error","code":"rate_limit","message":"Too many requests","request_log_url":"https://dashboard.stripe.com/test/logs/req_abc123?t=1"}}"#;
const LOCK_TIMEOUT: &str = r#"{"error":{"type":"invalid_request_error","code":"lock_timeout","message":"This object cannot be accessed right now"}}"#;
const CUSTOMER: &str = r#"{"id":"cus_stub","object":"customer","email":"stub@example.com","livemode":false,"metadata":{"stripe_mirror_subscriber":"stub-user"},"brand_new_field":{"x":1}}"#;

#[tokio::test]
async fn a_429_and_a_409_are_retried_with_one_idempotency_key() {
    for b in common::backends() {
        let (base, keys) = stub(vec![
            (429, RATE_LIMITED),
            (409, LOCK_TIMEOUT),
            (200, CUSTOMER),
        ])
        .await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let c = Customer::get_or_create(&m, &User("stub-user".into()))
            .await
            .unwrap();
        assert_eq!(c.id, "cus_stub", "{}", b.name);
        assert_eq!(
            c.data()["brand_new_field"]["x"],
            1,
            "{}: unknown fields kept",
            b.name
        );
        let keys = keys.lock().unwrap().clone();
        assert_eq!(keys.len(), 3, "{}", b.name);
        assert!(
            keys[0]
                .as_deref()
                .is_some_and(|k| k.starts_with("stripe-mirror-customer-test-")),
            "{keys:?}"
        );
        assert!(
            keys.iter().all(|k| *k == keys[0]),
            "{}: one key across retries: {keys:?}",
            b.name
        );
    }
}

#[tokio::test]
async fn a_500_storm_gives_up_with_a_clear_error() {
    for b in &common::backends() {
        let (base, keys) = stub(vec![]).await;
        let mut config = with_api(&b.config, &base);
        config.stripe_retries = 3;
        let m = Mirror::connect(config).await.unwrap();
        let err = Customer::sync(&m, "cus_storm").await.unwrap_err();
        assert_eq!(keys.lock().unwrap().len(), 4, "first try and 3 retries");
        let text = err.to_string();
        for part in [
            "GET /v1/customers/cus_storm",
            "customer cus_storm",
            "HTTP 500",
            "api_error",
            "script ran out",
            "after 4 attempts",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
        assert!(!text.contains(KEY), "no key in errors");
        assert!(
            Customer::get(&m, "cus_storm").await.unwrap().is_none(),
            "nothing stored"
        );
    }
}

#[tokio::test]
async fn errors_name_stripes_code_and_request_id_and_bad_bodies_are_refused() {
    for b in &common::backends() {
        let (base, _) = stub(vec![
        (400, r#"{"error":{"type":"invalid_request_error","code":"parameter_invalid_empty","message":"You passed an empty string","request_log_url":"https://dashboard.stripe.com/test/logs/req_xyz789?t=1"}}"#),
        (200, "this is not json"),
        (200, r#"{"id":"cus_wrong","object":"invoice"}"#),
    ])
    .await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let err = Customer::sync(&m, "cus_1").await.unwrap_err().to_string();
        for part in [
            "HTTP 400",
            "invalid_request_error",
            "parameter_invalid_empty",
            "empty string",
            "req_xyz789",
        ] {
            assert!(err.contains(part), "{part:?} missing from {err}");
        }
        let err = Customer::sync(&m, "cus_2").await.unwrap_err();
        assert!(
            matches!(&err, Error::Stripe(e) if e.message.contains("not JSON")),
            "{err}"
        );
        let err = Customer::sync(&m, "cus_3").await.unwrap_err();
        assert!(matches!(&err, Error::Mapping { .. }), "{err}");
    }
}

#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn webhooks_can_refetch_the_object_instead_of_trusting_the_payload() {
    use stripe_mirror::webhooks::{Outcome, signature::sign};
    use stripe_mirror::{WebhookRequest, Webhooks};
    let base = localstripe();
    for b in common::backends() {
        let mut config = with_api(&b.config, &base);
        config.webhook_secrets = vec![Secret::new("whsec_refetch")];
        let m = Mirror::connect(config).await.unwrap();
        let c = call(
            "POST",
            &format!("{base}v1/customers"),
            &[("email", "api-truth@example.com")],
        );
        let id = c["id"].as_str().unwrap();
        let now = chrono::Utc::now().timestamp();
        let event = json!({"id": unique("evt_rf"), "object": "event", "type": "customer.updated", "created": now - 60,
                           "data": {"object": {"id": id, "object": "customer", "email": "stale-payload@example.com"}}});
        let body = event.to_string();
        let request = WebhookRequest::new(body.clone()).header(
            "Stripe-Signature",
            sign(body.as_bytes(), &Secret::new("whsec_refetch"), now),
        );
        let r = Webhooks::new()
            .refetch(&["customer"])
            .receive(&m, request)
            .await;
        assert_eq!(r.outcome, Outcome::Processed, "{}: {:?}", b.name, r.error);
        let row = Customer::get(&m, id).await.unwrap().unwrap();
        assert_eq!(
            row.email.as_deref(),
            Some("api-truth@example.com"),
            "{}",
            b.name
        );
        assert!(row.stamp >= now, "{}: stamped with the fetch time", b.name);
    }
}

fn stripe_mock() -> String {
    common::peer("STRIPE_MIRROR_TEST_STRIPE_MOCK")
}

fn price_count(base: &str) -> usize {
    list_all(base, "prices")
        .iter()
        .filter(|p| {
            p["lookup_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("stripe_mirror_demo_"))
        })
        .count()
}

#[tokio::test]
#[ignore = "needs localstripe and stripe-stateful-mock: run scripts/test.sh"]
async fn bootstrap_demo_products_is_idempotent_on_both_fakes() {
    use stripe_mirror::bootstrap_demo_products;
    // stripe-stateful-mock implements prices itself; localstripe through the launcher's layer.
    for base in [stripe_mock(), localstripe()] {
        for b in common::backends() {
            let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
            let first = bootstrap_demo_products(&m)
                .await
                .unwrap_or_else(|e| panic!("{base} {}: {e}", b.name));
            let prices_after_first = price_count(&base);
            let second = bootstrap_demo_products(&m).await.unwrap();
            assert_eq!(
                price_count(&base),
                prices_after_first,
                "{base} {}: second run created nothing",
                b.name
            );
            assert_eq!(
                prices_after_first, 6,
                "{base}: three products, two prices each"
            );
            let ids = |plans: &[stripe_mirror::demo::DemoPlan]| {
                plans
                    .iter()
                    .map(|p| {
                        (
                            p.product.id.clone(),
                            p.monthly.id.clone(),
                            p.yearly.id.clone(),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(&first), ids(&second), "{base} {}", b.name);
            let names: Vec<_> = first
                .iter()
                .map(|p| p.product.name.clone().unwrap())
                .collect();
            assert_eq!(names, ["Basic", "Starter", "Pro"]);
            let pro = &first[2];
            assert_eq!(
                (
                    pro.monthly.unit_amount,
                    pro.monthly.recurring_interval.as_ref().map(|i| i.as_str())
                ),
                (Some(3000), Some("month"))
            );
            assert_eq!(
                (
                    pro.yearly.unit_amount,
                    pro.yearly.recurring_interval.as_ref().map(|i| i.as_str())
                ),
                (Some(30000), Some("year"))
            );
            // Mirrored: the product's active prices come from the local database.
            let prices = Product::get(&m, &pro.product.id)
                .await
                .unwrap()
                .unwrap()
                .active_prices(&m)
                .await
                .unwrap();
            assert_eq!(prices.len(), 2, "{base} {}", b.name);
        }
    }
}

/// A live key left in `STRIPE_SECRET_KEY` of a test-mode mirror is never used: the
/// demo catalogue would land in the live account, and customers made with it would be
/// stored as test rows. The call fails naming the variable; nothing reaches Stripe.
#[tokio::test]
async fn a_key_of_the_other_mode_is_never_used() {
    let (base, hits) = common::stripe_stub(vec![]).await;
    for b in &common::backends() {
        let mut config = with_api(&b.config, &base);
        config.secret_key = Some(Secret::new("sk_live_realmoney00000abcd"));
        let m = Mirror::connect(config).await.unwrap();
        let err = Customer::get_or_create(&m, &User("u-1".into()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Config(msg) if msg.contains("STRIPE_SECRET_KEY") && msg.contains("STRIPE_LIVE_MODE=true")),
            "{}: {err}",
            b.name
        );
        assert!(!err.to_string().contains("realmoney"), "{err}");
        let demo = stripe_mirror::bootstrap_demo_products(&m)
            .await
            .unwrap_err();
        assert!(matches!(demo, Error::Config(_)), "{}: {demo}", b.name);
    }
    assert_eq!(*hits.lock().unwrap(), 0, "nothing reached Stripe");
}

#[tokio::test]
async fn bootstrap_refuses_live_mode() {
    for b in &common::backends() {
        let mut config = with_api(&b.config, "http://127.0.0.1:9/");
        config.live_mode = true;
        config.secret_key = Some(Secret::new("sk_live_shouldneverbeused000"));
        let m = Mirror::connect(config).await.unwrap();
        let err = stripe_mirror::bootstrap_demo_products(&m)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("live mode"), "{err}");
    }
}

#[tokio::test]
#[ignore = "needs stripe-stateful-mock: run scripts/test.sh"]
async fn prices_sync_and_backfill_against_stripe_stateful_mock() {
    let base = stripe_mock();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let product = call("POST", &format!("{base}v1/products"), &[("name", "Mocked")]);
        let pid = product["id"].as_str().unwrap();
        let price = call(
            "POST",
            &format!("{base}v1/prices"),
            &[
                ("product", pid),
                ("currency", "eur"),
                ("unit_amount", "1234"),
                ("recurring[interval]", "year"),
            ],
        );
        let synced = stripe_mirror::Price::sync(&m, price["id"].as_str().unwrap())
            .await
            .unwrap();
        assert_eq!(
            (
                synced.unit_amount,
                synced.currency.as_deref(),
                synced.recurring_interval.as_ref().map(|i| i.as_str())
            ),
            (Some(1234), Some("eur"), Some("year")),
            "{}",
            b.name
        );
        assert_eq!(
            synced.product(&m).await.unwrap().map(|p| p.id),
            None,
            "{}: product not fetched implicitly",
            b.name
        );
        // An archived price (it still bills the subscriptions made on it), which Stripe
        // lists only when asked for inactive prices.
        let archived = call(
            "POST",
            &format!("{base}v1/prices"),
            &[
                ("product", pid),
                ("currency", "eur"),
                ("unit_amount", "999"),
            ],
        );
        let archived = archived["id"].as_str().unwrap();
        call(
            "POST",
            &format!("{base}v1/prices/{archived}"),
            &[("active", "false")],
        );
        let report = sync_all(
            &m,
            &SyncOptions::default()
                .objects(&["product", "price"])
                .page_size(2),
            |_| {},
        )
        .await
        .unwrap();
        assert!(
            report.counts["price"] >= 2 && report.counts["product"] >= 1,
            "{}: {report:?}",
            b.name
        );
        let archived = stripe_mirror::Price::get(&m, archived).await.unwrap();
        assert_eq!(
            archived.map(|p| (p.active, p.unit_amount)),
            Some((Some(false), Some(999))),
            "{}: the archived price is mirrored",
            b.name
        );
        assert_eq!(
            synced.product(&m).await.unwrap().unwrap().name.as_deref(),
            Some("Mocked"),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
#[ignore = "needs stripe-stateful-mock: run scripts/test.sh"]
async fn get_or_create_idempotency_key_holds_across_processes() {
    // Two mirrors with their own databases stand for two app instances: no shared
    // lock, no shared row. Only Stripe's Idempotency-Key replay can make them agree.
    let base = stripe_mock();
    let (a, b) = (common::backends().remove(0), common::backends().remove(0));
    let ma = Mirror::connect(with_api(&a.config, &base)).await.unwrap();
    let mb = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
    let user = User(unique("cross"));
    let (ca, cb) = tokio::join!(
        Customer::get_or_create(&ma, &user),
        Customer::get_or_create(&mb, &user)
    );
    assert_eq!(ca.unwrap().id, cb.unwrap().id);
}

/// A subscriber whose customer was deleted gets a new one: the creation's idempotency
/// key changes with the tombstone, or Stripe (here stripe-stateful-mock, which replays
/// keys as Stripe does for 24 hours) would hand back the deleted customer.
#[tokio::test]
#[ignore = "needs stripe-stateful-mock: run scripts/test.sh"]
async fn get_or_create_after_the_customer_was_deleted_creates_a_new_one() {
    let base = stripe_mock();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let user = User(unique("again"));
        let first = Customer::get_or_create(&m, &user).await.unwrap();
        // Deleted in Stripe (stripe-stateful-mock has no DELETE for customers; what
        // get_or_create sees is the mirror's tombstone, which the `customer.deleted`
        // webhook writes).
        Customer::mark_deleted(&m, &first.id).await.unwrap();
        let second = Customer::get_or_create(&m, &user).await.unwrap();
        assert_ne!(
            second.id, first.id,
            "{}: the deleted customer again",
            b.name
        );
        assert!(!second.deleted, "{}", b.name);
        assert_eq!(
            Customer::by_subscriber(&m, &user.0)
                .await
                .unwrap()
                .map(|c| c.id),
            Some(second.id.clone()),
            "{}",
            b.name
        );
        // Another app instance with its own database that also saw the deletion sends
        // the same new key: Stripe replays the second customer, not a third.
        let other = Mirror::connect(with_api(&common::backends()[0].config, &base))
            .await
            .unwrap();
        Customer::sync_from_stripe_data_at(&other, &first.data(), 1)
            .await
            .unwrap();
        Customer::mark_deleted(&other, &first.id).await.unwrap();
        let again = Customer::get_or_create(&other, &user).await.unwrap();
        assert_eq!(again.id, second.id, "{}", b.name);
    }
}

/// A subscriber whose customer was unlinked since (its key removed in Stripe) gets a
/// new one, not the old one Stripe replays for the creation's idempotency key within
/// its 24 hours (stripe-stateful-mock replays keys as Stripe does).
#[tokio::test]
#[ignore = "needs stripe-stateful-mock: run scripts/test.sh"]
async fn get_or_create_after_the_customer_was_unlinked_creates_a_new_one() {
    let base = stripe_mock();
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let user = User(unique("unlinked"));
        let first = Customer::get_or_create(&m, &user).await.unwrap();
        // Its `customer.updated` without the key, as the Dashboard's removal sends it.
        let mut unlinked = first.data();
        unlinked["metadata"] = json!({});
        let later = chrono::Utc::now().timestamp() + 5;
        let row = Customer::sync_from_stripe_data_at(&m, &unlinked, later)
            .await
            .unwrap();
        assert_eq!(row.subscriber_id, None, "{}", b.name);
        let second = Customer::get_or_create(&m, &user).await.unwrap();
        assert_ne!(
            second.id, first.id,
            "{}: the unlinked customer again",
            b.name
        );
        assert_eq!(
            second.subscriber_id.as_deref(),
            Some(user.0.as_str()),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn sync_all_collects_bad_objects_or_stops_at_the_first_when_asked() {
    const PAGE: &str = r#"{"object":"list","has_more":false,"data":[
        {"id":"prod_ok","object":"product","name":"Fine"},
        {"id":"prod_bad","object":"product","name":17},
        {"id":"prod_ok2","object":"product","name":"Also fine"}]}"#;
    for b in common::backends() {
        let (base, _) = stub(vec![(200, PAGE), (200, PAGE)]).await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let report = sync_all(&m, &SyncOptions::default().objects(&["product"]), |_| {})
            .await
            .unwrap();
        assert_eq!(report.counts["product"], 2, "{}", b.name);
        assert_eq!(report.failures.len(), 1, "{}", b.name);
        assert_eq!(report.failures[0].id, "prod_bad");
        assert!(
            report.failures[0].error.contains("`name`"),
            "{:?}",
            report.failures
        );
        assert!(Product::get(&m, "prod_ok2").await.unwrap().is_some());

        let fresh = Mirror::connect(with_api(&common::backends()[0].config, &base))
            .await
            .unwrap();
        let err = sync_all(
            &fresh,
            &SyncOptions::default().objects(&["product"]).fail_fast(true),
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Mapping { .. }), "{err}");
        assert!(
            Product::get(&fresh, "prod_ok").await.unwrap().is_none(),
            "{}: the page's transaction rolled back",
            b.name
        );
    }
}

#[tokio::test]
async fn a_request_that_hangs_times_out_with_a_clear_error() {
    use axum::{Router, routing::any};
    let app = Router::new().fallback(any(|| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        "late"
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    for b in &common::backends() {
        let mut config = with_api(&b.config, &format!("http://{addr}/"));
        config.stripe_timeout = Duration::from_millis(200);
        config.stripe_retries = 1;
        let m = Mirror::connect(config).await.unwrap();
        let started = std::time::Instant::now();
        let err = Customer::sync(&m, "cus_slow")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("timeout") && err.contains("GET /v1/customers/cus_slow"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gave up instead of waiting 30 s"
        );
    }
}

#[tokio::test]
#[ignore = "needs stripe-stateful-mock: run scripts/test.sh"]
async fn two_processes_racing_get_or_create_create_one_product_and_one_price() {
    use stripe_mirror::Price;
    use stripe_mirror::models::price::NewPrice;
    use stripe_mirror::models::product::NewProduct;
    let base = stripe_mock();
    let lookup = unique("race_lk");
    let product_id = unique("race_prod");
    // Two mirrors with their own databases: two app processes.
    let (a, b) = (common::backends().remove(0), common::backends().remove(0));
    let ma = Mirror::connect(with_api(&a.config, &base)).await.unwrap();
    let mb = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
    let new_product = NewProduct::new(&product_id, "Race");
    let (pa, pb) = tokio::join!(
        Product::get_or_create(&ma, &new_product),
        Product::get_or_create(&mb, &new_product)
    );
    assert_eq!(pa.unwrap().id, pb.unwrap().id);
    let new_price = NewPrice::recurring(&lookup, &product_id, "usd", 700, "month");
    let (xa, xb) = tokio::join!(
        Price::get_or_create(&ma, &new_price),
        Price::get_or_create(&mb, &new_price)
    );
    let (xa, xb) = (xa.unwrap(), xb.unwrap());
    assert_eq!(xa.id, xb.id, "one price for one lookup key");
    let in_stripe = list_all(&base, "prices")
        .iter()
        .filter(|p| p["lookup_key"].as_str() == Some(lookup.as_str()))
        .count();
    assert_eq!(in_stripe, 1);
    let products = list_all(&base, "products")
        .iter()
        .filter(|p| p["id"].as_str() == Some(product_id.as_str()))
        .count();
    assert_eq!(products, 1);
}

/// What the flaky proxy did, for the test to check.
#[derive(Default)]
struct Flaky {
    /// Requests seen, in order: (method, path, idempotency key, when).
    seen: Vec<(String, String, Option<String>, std::time::Instant)>,
    /// Answers kept per idempotency key, replayed as Stripe does.
    kept: std::collections::HashMap<String, (u16, String)>,
    /// POSTs forwarded to localstripe (each creates an object there).
    forwarded_posts: usize,
    /// Requests refused once already (method, path, key): each is refused once only,
    /// so no request meets more 429s than the client's retries.
    refused: std::collections::HashSet<(String, String, Option<String>)>,
}

/// A proxy in front of localstripe that behaves like Stripe under load: the first
/// attempt of every request is refused with a 429 (the very first asking `Retry-After:
/// 1`), every third
/// POST is carried out and then answered 500 with `Stripe-Should-Retry: true` (the
/// answer lost on the way), and a POST whose idempotency key was seen gets the kept
/// answer back (`Idempotent-Replayed`), which localstripe itself does not do.
async fn flaky_proxy(upstream: String) -> (String, Arc<Mutex<Flaky>>) {
    use axum::{Router, body::Bytes, extract::Request, response::Response, routing::any};
    fn answer(status: u16, headers: &[(&str, &str)], body: String) -> Response {
        let mut r = Response::builder()
            .status(status)
            .header("content-type", "application/json");
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        r.body(body.into()).unwrap()
    }
    let state: Arc<Mutex<Flaky>> = Default::default();
    let st = state.clone();
    let app = Router::new().fallback(any(move |req: Request| {
        let (st, upstream) = (st.clone(), upstream.clone());
        async move {
            let method = req.method().to_string();
            let path = req.uri().path_and_query().unwrap().to_string();
            let (auth, key) = {
                let header = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                (header("authorization"), header("idempotency-key"))
            };
            let body: Bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap();
            let n = {
                let mut s = st.lock().unwrap();
                s.seen.push((
                    method.clone(),
                    path.clone(),
                    key.clone(),
                    std::time::Instant::now(),
                ));
                if let Some((status, text)) = key.as_ref().and_then(|k| s.kept.get(k)) {
                    return answer(*status, &[("idempotent-replayed", "true")], text.clone());
                }
                let first = s
                    .refused
                    .insert((method.clone(), path.clone(), key.clone()));
                (s.seen.len(), first)
            };
            let (n, first_attempt) = n;
            if first_attempt {
                let wait = if n == 1 { "1" } else { "0" };
                return answer(429, &[("retry-after", wait)], RATE_LIMITED.to_owned());
            }
            let url = format!("{}{}", upstream.trim_end_matches('/'), path);
            let is_post = method == "POST";
            let (status, text) = tokio::task::spawn_blocking(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let auth = auth.unwrap_or_default();
                let mut r = match method.as_str() {
                    "POST" => agent
                        .post(&url)
                        .header("Authorization", &auth)
                        .header("Content-Type", "application/x-www-form-urlencoded")
                        .send(&body[..]),
                    "DELETE" => agent.delete(&url).header("Authorization", &auth).call(),
                    _ => agent.get(&url).header("Authorization", &auth).call(),
                }
                .unwrap();
                (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
            })
            .await
            .unwrap();
            let mut s = st.lock().unwrap();
            if is_post {
                s.forwarded_posts += 1;
                if let Some(k) = &key {
                    s.kept.insert(k.clone(), (status, text.clone()));
                }
                if s.forwarded_posts % 3 == 1 {
                    let lost =
                        r#"{"error":{"type":"api_error","message":"An unknown error occurred"}}"#;
                    return answer(500, &[("stripe-should-retry", "true")], lost.to_owned());
                }
            }
            answer(status, &[], text)
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/"), state)
}

#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn a_burst_of_429s_and_500s_is_ridden_out_with_one_object_per_idempotency_key() {
    let upstream = localstripe();
    for b in common::backends() {
        let (base, flaky) = flaky_proxy(upstream.clone()).await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let tag = unique("burst");
        // A product first (its first request meets the Retry-After: 1).
        let product = Product::get_or_create(
            &m,
            &NewProduct::new(format!("{tag}-product"), format!("{tag} Pro")),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", b.name));
        // get_or_create for 6 users at once, through the storm.
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let (m, user) = (m.clone(), User(format!("{tag}-{i}")));
                tokio::spawn(async move { Customer::get_or_create(&m, &user).await })
            })
            .collect();
        for t in tasks {
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("{}: get_or_create through 429/500: {e}", b.name));
        }
        // Then the whole backfill.
        let report = sync_all(
            &m,
            &SyncOptions::default()
                .page_size(5)
                .objects(&["customer", "product"]),
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("{}: sync_all through 429/500: {e}", b.name));
        assert!(
            report.failures.is_empty(),
            "{}: {:?}",
            b.name,
            report.failures
        );

        // One Stripe object per user and per product, though POSTs were answered 500
        // after they had been carried out: the retries carried the same key.
        let customers = list_all(&upstream, "customers");
        for i in 0..6 {
            let user = format!("{tag}-{i}");
            let n = customers
                .iter()
                .filter(|c| c["metadata"]["stripe_mirror_subscriber"] == json!(user))
                .count();
            assert_eq!(n, 1, "{}: {user} has one Stripe customer", b.name);
            let mirrored = Customer::by_subscriber(&m, &user).await.unwrap();
            assert!(mirrored.is_some(), "{}: {user} mirrored", b.name);
        }
        let products = list_all(&upstream, "products")
            .into_iter()
            .filter(|p| p["id"] == json!(product.id))
            .count();
        assert_eq!(products, 1, "{}: one product", b.name);
        assert!(
            Product::get(&m, &product.id).await.unwrap().is_some(),
            "{}",
            b.name
        );

        let f = flaky.lock().unwrap();
        // The storm really happened: 429s, lost answers, replays by key.
        let posts: Vec<_> = f.seen.iter().filter(|s| s.0 == "POST").collect();
        assert!(
            f.forwarded_posts >= 3,
            "{}: {} POSTs forwarded",
            b.name,
            f.forwarded_posts
        );
        let keys: std::collections::HashSet<_> = posts.iter().filter_map(|s| s.2.clone()).collect();
        assert!(
            posts.len() > keys.len(),
            "{}: some POST was retried with its key ({} POSTs, {} keys)",
            b.name,
            posts.len(),
            keys.len()
        );
        assert!(
            posts.iter().all(|s| s.2.is_some()),
            "{}: every POST carries a key",
            b.name
        );
        // The first request was refused with Retry-After: 1 and its retry waited for it,
        // though our own backoff is 20 ms.
        let (first, second) = (&f.seen[0], &f.seen[1]);
        assert_eq!(
            (&first.1, &first.2),
            (&second.1, &second.2),
            "{}: the retry of the first request",
            b.name
        );
        let waited = second.3 - first.3;
        assert!(
            waited >= Duration::from_millis(950),
            "{}: waited {waited:?} after Retry-After: 1",
            b.name
        );
    }
}

#[tokio::test]
async fn stripe_should_retry_false_stops_at_once_and_true_retries_a_400() {
    for b in &common::backends() {
        // Stripe says no: a 500 it will not be retried; one request, a clear error.
        let (base, seen) = scripted(vec![(
            500,
            vec![("stripe-should-retry", "false")],
            r#"{"error":{"type":"api_error","message":"do not retry this"}}"#,
        )])
        .await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let err = Customer::sync(&m, "cus_noretry").await.unwrap_err();
        assert_eq!(seen.lock().unwrap().len(), 1, "{}: no retry", b.name);
        assert!(err.to_string().contains("do not retry this"), "{err}");
        // Stripe says yes on a status we would not retry by ourselves.
        let (base, seen) = scripted(vec![
            (
                400,
                vec![("stripe-should-retry", "true")],
                r#"{"error":{"type":"invalid_request_error","message":"try again"}}"#,
            ),
            (200, vec![], CUSTOMER),
        ])
        .await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        Customer::sync(&m, "cus_stub").await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2, "{}: retried once", b.name);
    }
}

/// A list page that is not one (no `data` array), or that says there is more without a
/// last id to ask after, fails the backfill with the kind named: it is never reported
/// as a whole backfill that stopped early.
#[tokio::test]
async fn a_malformed_list_page_fails_the_backfill() {
    let (base, _) = common::stripe_stub(vec![
        ("/v1/products", 200, json!({"object": "list", "url": "/v1/products"})),
        (
            "/v1/customers",
            200,
            json!({"object": "list", "has_more": true, "data": [{"object": "customer", "email": "a@example.com"}]}),
        ),
    ])
    .await;
    for b in common::backends() {
        let mut config = with_api(&b.config, &base);
        config.stripe_retries = 0;
        let m = Mirror::connect(config).await.unwrap();
        for (kind, problem) in [
            ("product", "is not an array"),
            ("customer", "has more after it"),
        ] {
            let failed = sync_all(&m, &SyncOptions::default().objects(&[kind]), |_| {})
                .await
                .expect_err(kind);
            let message = failed.to_string();
            assert!(
                message.contains(kind) && message.contains(problem),
                "{}: {message}",
                b.name
            );
        }
    }
}

const MISSING: &str = r#"{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such product: 'prod_race'"}}"#;
const EXISTS: &str = r#"{"error":{"type":"invalid_request_error","code":"resource_already_exists","message":"Product already exists."}}"#;
const RACED: &str = r#"{"id":"prod_race","object":"product","name":"Made by another process","active":true,"livemode":false,"metadata":{}}"#;

/// A product created by another process between the look and the create: the create's
/// "already exists" is answered by reading that product. When the read finds nothing
/// either, the create's own error is the answer, not the read's 404.
#[tokio::test]
async fn a_product_made_meanwhile_is_read_back_and_a_failed_read_keeps_the_create_error() {
    for b in common::backends() {
        let (base, keys) = stub(vec![(404, MISSING), (400, EXISTS), (200, RACED)]).await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let p = Product::get_or_create(&m, &NewProduct::new("prod_race", "Race"))
            .await
            .unwrap();
        assert_eq!(
            p.name.as_deref(),
            Some("Made by another process"),
            "{}",
            b.name
        );
        assert_eq!(
            keys.lock().unwrap().len(),
            3,
            "{}: look, create, read",
            b.name
        );
        assert!(
            Product::get(&m, "prod_race").await.unwrap().is_some(),
            "{}",
            b.name
        );

        let (base, keys) = stub(vec![(404, MISSING), (400, EXISTS), (404, MISSING)]).await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let err = Product::get_or_create(&m, &NewProduct::new("prod_gone", "Gone"))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            keys.lock().unwrap().len(),
            3,
            "{}: look, create, read",
            b.name
        );
        assert!(err.contains("resource_already_exists"), "{}: {err}", b.name);
        assert!(
            Product::get(&m, "prod_gone").await.unwrap().is_none(),
            "{}",
            b.name
        );
    }
}

const FEATURE_PAGE: &str = r#"{"object":"list","has_more":true,"data":[{"id":"prodft_1","object":"product_feature","livemode":false,"entitlement_feature":{"id":"feat_1","object":"entitlements.feature","lookup_key":"exports","livemode":false}}]}"#;

/// A features list from a server that ignores `starting_after` (the same page, "has
/// more", again) ends in an error instead of a loop; an item that is not an object
/// is an error, not a panic. Nothing is written either way.
#[tokio::test]
async fn a_features_list_that_does_not_move_or_holds_no_object_is_an_error() {
    for b in common::backends() {
        let (base, keys) = stub(vec![(200, FEATURE_PAGE), (200, FEATURE_PAGE)]).await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let err = stripe_mirror::ProductFeature::sync_for_product(&m, "prod_loop")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("starting_after"), "{}: {err}", b.name);
        assert_eq!(
            keys.lock().unwrap().len(),
            2,
            "{}: two pages, no more",
            b.name
        );

        let (base, _) = stub(vec![(
            200,
            r#"{"object":"list","has_more":false,"data":["prodft_1"]}"#,
        )])
        .await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let err = stripe_mirror::ProductFeature::sync_for_product(&m, "prod_bad")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an object"), "{}: {err}", b.name);
        assert_eq!(
            common::query_count(
                &b.config.database_url,
                "SELECT count(*) AS n FROM stripe_product_features"
            ),
            0,
            "{}",
            b.name
        );
    }
}

/// A reconcile asked to look back further than the epoch looks back to its start
/// instead of overflowing.
#[tokio::test]
async fn a_reconcile_since_forever_asks_from_the_epoch() {
    for b in common::backends() {
        let (base, keys) = stub(vec![(
            200,
            r#"{"object":"list","has_more":false,"data":[]}"#,
        )])
        .await;
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        // 2^63 s: as an i64 it would be negative, and `now - since` would overflow.
        let since = Duration::from_secs(1 << 63);
        let report = stripe_mirror::reconcile(&m, since).await.unwrap();
        assert_eq!(report.refetched, 0, "{}", b.name);
        assert_eq!(keys.lock().unwrap().len(), 1, "{}: one events page", b.name);
    }
}

/// A 404 turned into a tombstone is stamped with Stripe's time of the answer (its
/// `Date`), not the host's clock: with the host an hour ahead, a product made again
/// under the same id a few seconds after the 404 still comes back with its event.
#[tokio::test]
async fn a_tombstone_from_a_404_is_stamped_with_stripes_time() {
    const DATE: &str = "Wed, 25 Nov 2026 23:11:27 GMT";
    const AT: i64 = 1_795_648_287;
    for b in common::backends() {
        let (base, _) = scripted(vec![(404, vec![("Date", DATE)], MISSING)]).await;
        let config = with_api(&b.config, &base)
            .clock(stripe_mirror::Clock::skewed(3600))
            .webhook_secret("whsec_ahead");
        let m = Mirror::connect(config).await.unwrap();
        assert!(
            Product::sync(&m, "prod_again").await.unwrap().deleted,
            "{}",
            b.name
        );
        let stamp = common::query_count(
            &b.config.database_url,
            "SELECT stamp AS n FROM stripe_products WHERE id = 'prod_again'",
        );
        assert_eq!(stamp, AT, "{}: Stripe's time, not the host's", b.name);

        let event = json!({"id": "evt_again", "object": "event", "type": "product.created",
            "created": AT + 5, "livemode": false,
            "data": {"object": {"id": "prod_again", "object": "product", "name": "Again", "active": true}}});
        let r = deliver(&m, "whsec_ahead", &event).await;
        assert_eq!(r.status, 200, "{}: {r:?}", b.name);
        let p = Product::get(&m, "prod_again").await.unwrap().unwrap();
        assert!(!p.deleted, "{}: made again, mirrored again", b.name);
    }
}

const MADE: &str = r#"{"id":"prod_again2","object":"product","name":"Again","active":true,"livemode":false,"created":1700000000,"metadata":{}}"#;
const MISSING2: &str = r#"{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such product: 'prod_again2'"}}"#;

/// A product deleted (a tombstone in the mirror) and asked for again is made again
/// under another idempotency key (Stripe would replay the deleted one's creation for
/// 24 hours), and the answer brings the row back instead of leaving it deleted. The
/// old product's deletion, delivered late, does not take the new one.
#[tokio::test]
async fn a_deleted_product_asked_for_again_is_made_again_and_mirrored_live() {
    // Stripe's clock on the answers: now, as the host's.
    let date: &'static str = Box::leak(chrono::Utc::now().to_rfc2822().into_boxed_str());
    for b in common::backends() {
        let made = || vec![(404, vec![], MISSING2), (200, vec![("Date", date)], MADE)];
        let (base, first) = scripted(made()).await;
        let config = with_api(&b.config, &base).webhook_secret("whsec_again");
        let m = Mirror::connect(config).await.unwrap();
        let new = NewProduct::new("prod_again2", "Again");
        assert!(
            !Product::get_or_create(&m, &new).await.unwrap().deleted,
            "{}",
            b.name
        );
        assert!(
            Product::mark_deleted(&m, "prod_again2")
                .await
                .unwrap()
                .deleted
        );

        let (base, again) = scripted(made()).await;
        let config = with_api(&b.config, &base).webhook_secret("whsec_again");
        let m = Mirror::connect(config).await.unwrap();
        let p = Product::get_or_create(&m, &new).await.unwrap();
        assert!(!p.deleted, "{}: made again, mirrored live", b.name);
        let (first, again) = (first.lock().unwrap().clone(), again.lock().unwrap().clone());
        assert!(
            first[1].is_some() && again[1].is_some(),
            "{first:?} {again:?}"
        );
        assert_ne!(
            first[1], again[1],
            "{}: another key after the deletion",
            b.name
        );

        // The old product's deletion, from before the new one was made, comes late.
        let event = json!({"id": "evt_old_deleted", "object": "event", "type": "product.deleted",
            "created": m.now() - 30, "livemode": false,
            "data": {"object": {"id": "prod_again2", "object": "product", "deleted": true}}});
        let r = deliver(&m, "whsec_again", &event).await;
        assert_eq!(r.status, 200, "{}: {r:?}", b.name);
        let p = Product::get(&m, "prod_again2").await.unwrap().unwrap();
        assert!(
            !p.deleted,
            "{}: the old deletion leaves the new product",
            b.name
        );
    }
}

/// Delivers `event` signed with `secret` now (the mirror's clock), with no handler.
async fn deliver(m: &Mirror, secret: &str, event: &Value) -> stripe_mirror::WebhookResponse {
    let body = event.to_string().into_bytes();
    let header = stripe_mirror::webhooks::signature::sign(&body, &Secret::new(secret), m.now());
    stripe_mirror::Webhooks::new()
        .receive(
            m,
            WebhookRequest::new(body).header("Stripe-Signature", header),
        )
        .await
}

/// Stripe lists only active prices unless asked for the others; an archived price still
/// bills the subscriptions made on it, so the backfill asks for both, and counts each once.
#[tokio::test]
async fn sync_all_mirrors_archived_prices_too() {
    let price = |id: &str, active: bool| json!({"id": id, "object": "price", "livemode": false, "product": "prod_1", "active": active});
    let (base, _) = common::stripe_stub(vec![
        (
            "/v1/prices?active=false",
            200,
            json!({"object": "list", "has_more": false, "data": [price("price_archived", false)]}),
        ),
        // Stripe's default, and the answer to `active=true`.
        (
            "/v1/prices",
            200,
            json!({"object": "list", "has_more": false, "data": [price("price_on_sale", true)]}),
        ),
    ])
    .await;
    let (ignoring, _) = common::stripe_stub(vec![(
        "/v1/prices",
        200,
        json!({"object": "list", "has_more": false, "data": [price("price_on_sale", true)]}),
    )])
    .await;
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let report = sync_all(&m, &SyncOptions::default().objects(&["price"]), |_| {})
            .await
            .unwrap();
        assert_eq!(report.counts["price"], 2, "{}: {report:?}", b.name);
        let archived = stripe_mirror::Price::get(&m, "price_archived")
            .await
            .unwrap();
        assert_eq!(archived.map(|p| p.active), Some(Some(false)), "{}", b.name);

        // A server that ignores `active` lists every price twice: counted once.
        let m = Mirror::connect(with_api(&b.config, &ignoring))
            .await
            .unwrap();
        let report = sync_all(&m, &SyncOptions::default().objects(&["price"]), |_| {})
            .await
            .unwrap();
        assert_eq!(report.counts["price"], 1, "{}: {report:?}", b.name);
    }
}

/// In test mode Stripe leaves customers and subscriptions of a test clock out of its
/// lists unless asked for by clock: the backfill asks for each clock's too.
#[tokio::test]
async fn sync_all_mirrors_what_test_clocks_hold() {
    let list = |data: Value| json!({"object": "list", "has_more": false, "data": data});
    let (base, _) = common::stripe_stub(vec![
        (
            "/v1/test_helpers/test_clocks",
            200,
            list(json!([{"id": "clock_1", "object": "test_helpers.test_clock"}])),
        ),
        (
            "/v1/customers?test_clock=clock_1",
            200,
            list(json!([{"id": "cus_on_clock", "object": "customer", "livemode": false}])),
        ),
        (
            "/v1/customers",
            200,
            list(json!([{"id": "cus_plain", "object": "customer", "livemode": false}])),
        ),
    ])
    .await;
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &base)).await.unwrap();
        let report = sync_all(&m, &SyncOptions::default().objects(&["customer"]), |_| {})
            .await
            .unwrap();
        assert_eq!(report.counts["customer"], 2, "{}: {report:?}", b.name);
        for id in ["cus_plain", "cus_on_clock"] {
            assert!(
                Customer::get(&m, id).await.unwrap().is_some(),
                "{}: {id}",
                b.name
            );
        }
    }
    // A restricted key not allowed to read test clocks: the backfill goes on without.
    let refused = json!({"error": {"type": "invalid_request_error",
        "message": "The provided key does not have the required permissions"}});
    let (restricted, _) = common::stripe_stub(vec![
        ("/v1/test_helpers/test_clocks", 403, refused),
        (
            "/v1/customers",
            200,
            list(json!([{"id": "cus_plain", "object": "customer", "livemode": false}])),
        ),
    ])
    .await;
    for b in common::backends() {
        let m = Mirror::connect(with_api(&b.config, &restricted))
            .await
            .unwrap();
        let report = sync_all(&m, &SyncOptions::default().objects(&["customer"]), |_| {})
            .await
            .unwrap();
        assert_eq!(report.counts["customer"], 1, "{}: {report:?}", b.name);
    }
}
