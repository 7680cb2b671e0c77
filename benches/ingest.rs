//! Webhook ingest and subscription checks on a SQLite file.
//!
//! Run with `cargo bench --bench ingest`. Figures are recorded in benches/README.md.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::{Config, Customer, Mirror, Secret, Subscription, WebhookRequest, Webhooks};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(format!(
        "sqlite://{}",
        dir.path().join("bench.db").display()
    ));
    config.webhook_secrets = vec![Secret::new("whsec_bench")];
    let mirror = rt.block_on(Mirror::connect(config)).unwrap();
    let webhooks = Webhooks::new();
    let secret = Secret::new("whsec_bench");

    let mut group = c.benchmark_group("webhook_ingest_sqlite");
    group.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    group.bench_function("customer.updated, one at a time", |b| {
        b.iter(|| {
            n += 1;
            let now = chrono::Utc::now().timestamp();
            let body = json!({"id": format!("evt_bench_{n}"), "object": "event", "type": "customer.updated", "created": now,
                "livemode": false, "data": {"object": {"id": format!("cus_bench_{}", n % 1000), "object": "customer",
                "email": "bench@example.com", "metadata": {"stripe_mirror_subscriber": format!("u{}", n % 1000)}}}})
            .to_string();
            let request = WebhookRequest::new(body.clone()).header("Stripe-Signature", sign(body.as_bytes(), &secret, now));
            let response = rt.block_on(webhooks.receive(&mirror, request));
            assert_eq!(response.status, 200);
        })
    });
    group.finish();

    rt.block_on(async {
        Subscription::sync_from_stripe_data(&mirror, &json!({"id": "sub_bench", "object": "subscription", "customer": "cus_bench_1",
            "status": "active", "items": {"data": [{"id": "si_bench", "object": "subscription_item",
            "price": {"id": "price_b", "product": "prod_b"}, "current_period_end": 4102444800_i64}]}}))
        .await
        .unwrap();
    });
    let customer = rt
        .block_on(Customer::get(&mirror, "cus_bench_1"))
        .unwrap()
        .unwrap();
    c.bench_function("subscription_check_sqlite: customer.subscription()", |b| {
        b.iter(|| {
            assert!(
                rt.block_on(customer.subscription(&mirror))
                    .unwrap()
                    .is_some()
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
