//! Subscription checks under criterion: `Customer::by_subscriber` +
//! `customer.subscription()`, and the gate `require_subscription(user).check()`, for
//! random subscribers among 10,000 mirrored customers with a subscription each (a
//! SQLite file, the mirror's settings). `benches/backfill.rs reads` gives the p50/p99
//! at 100,000; this is the criterion view of the same path.
//!
//! Run: `cargo bench --bench checks`.

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use stripe_mirror::{Config, Customer, Mirror, Subscription, require_subscription};

const USERS: usize = 10_000;

fn mirror(rt: &tokio::runtime::Runtime, dir: &tempfile::TempDir) -> Mirror {
    let url = format!("sqlite://{}", dir.path().join("checks.db").display());
    rt.block_on(async {
        let mirror = Mirror::connect(Config::new(url)).await.unwrap();
        for i in 0..USERS {
            Customer::sync_from_stripe_data(&mirror, &json!({"id": format!("cus_{i}"), "object": "customer",
                "created": 1_700_000_000 + i, "metadata": {"stripe_mirror_subscriber": format!("user-{i}")}}))
            .await
            .unwrap();
            Subscription::sync_from_stripe_data(&mirror, &json!({"id": format!("sub_{i}"), "object": "subscription",
                "customer": format!("cus_{i}"), "status": "active", "created": 1_700_000_000 + i,
                "items": {"data": [{"id": format!("si_{i}"), "object": "subscription_item",
                    "price": {"id": "price_pro", "product": "prod_pro"}, "current_period_end": 4_102_444_800_i64}]}}))
            .await
            .unwrap();
        }
        mirror
    })
}

fn checks(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mirror = mirror(&rt, &dir);
    let mut n = 0usize;
    let mut next_user = move || {
        n = (n + 7_919) % USERS;
        format!("user-{n}")
    };
    c.bench_function("customer.subscription() at 10k", |b| {
        b.iter(|| {
            rt.block_on(async {
                let customer = Customer::by_subscriber(&mirror, &next_user())
                    .await
                    .unwrap()
                    .unwrap();
                assert!(customer.subscription(&mirror).await.unwrap().is_some());
            })
        })
    });
    c.bench_function("require_subscription(user).check() at 10k", |b| {
        b.iter(|| {
            rt.block_on(async {
                let user = next_user();
                assert!(
                    require_subscription(user)
                        .check(&mirror)
                        .await
                        .unwrap()
                        .is_ok()
                );
            })
        })
    });
}

criterion_group!(benches, checks);
criterion_main!(benches);
