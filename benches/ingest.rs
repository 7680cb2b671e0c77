//! Webhook ingest and subscription checks.
//!
//! - SQLite file, one delivery at a time, with no handler listening (the built-in sync
//!   only) and with one no-op handler (`on_any`), which costs a second round trip;
//! - Postgres, 8 concurrent deliveries, when `STRIPE_MIRROR_BENCH_POSTGRES` holds an
//!   admin URL (`scripts/postgres.sh start` prints one);
//! - `customer.subscription()` on SQLite.
//!
//! Run with `cargo bench --all-features --bench ingest` (Postgres needs the feature). Figures are recorded in benches/README.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::{
    Config, Customer, Event, Mirror, Secret, Subscription, WebhookRequest, Webhooks,
};

static N: AtomicU64 = AtomicU64::new(0);

/// A signed `customer.updated` delivery with a fresh event id.
fn delivery(secret: &Secret) -> WebhookRequest {
    let n = N.fetch_add(1, Ordering::Relaxed);
    let now = chrono::Utc::now().timestamp();
    let body = json!({"id": format!("evt_bench_{n}"), "object": "event", "type": "customer.updated", "created": now,
        "livemode": false, "data": {"object": {"id": format!("cus_bench_{}", n % 1000), "object": "customer",
        "email": "bench@example.com", "metadata": {"stripe_mirror_subscriber": format!("u{}", n % 1000)}}}})
    .to_string();
    WebhookRequest::new(body.clone()).header("Stripe-Signature", sign(body.as_bytes(), secret, now))
}

fn config(url: String) -> Config {
    let mut config = Config::new(url);
    config.webhook_secrets = vec![Secret::new("whsec_bench")];
    config.pool_size = 10;
    config
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let secret = Secret::new("whsec_bench");
    let dir = tempfile::tempdir().unwrap();
    let sqlite = rt
        .block_on(Mirror::connect(config(format!(
            "sqlite://{}",
            dir.path().join("bench.db").display()
        ))))
        .unwrap();

    let mut group = c.benchmark_group("webhook_ingest_sqlite");
    group.throughput(Throughput::Elements(1));
    for (name, webhooks) in [
        ("no handler", Webhooks::new()),
        (
            "one handler",
            Webhooks::new().on_any(|_e: Event, _m: Mirror| async { Ok(()) }),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                assert_eq!(
                    rt.block_on(webhooks.receive(&sqlite, delivery(&secret)))
                        .status,
                    200
                )
            })
        });
    }
    group.finish();

    #[cfg(feature = "postgres")]
    if let Ok(admin) = std::env::var("STRIPE_MIRROR_BENCH_POSTGRES") {
        use diesel::{Connection, RunQueryDsl};
        let name = format!("bench_{}", std::process::id());
        let mut conn = diesel::PgConnection::establish(&admin).unwrap();
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap();
        let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        let pg = rt.block_on(Mirror::connect(config(url))).unwrap();
        let webhooks = Webhooks::new();
        let mut group = c.benchmark_group("webhook_ingest_postgres");
        group.throughput(Throughput::Elements(1));
        group.bench_function("8 concurrent deliveries", |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..8)
                        .map(|w| {
                            let (pg, webhooks, secret) =
                                (pg.clone(), webhooks.clone(), secret.clone());
                            let share = iters / 8 + u64::from(w < iters % 8);
                            tokio::spawn(async move {
                                for _ in 0..share {
                                    assert_eq!(
                                        webhooks.receive(&pg, delivery(&secret)).await.status,
                                        200
                                    );
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
                started.elapsed()
            })
        });
        group.finish();
    }

    rt.block_on(async {
        Subscription::sync_from_stripe_data(&sqlite, &json!({"id": "sub_bench", "object": "subscription", "customer": "cus_bench_1",
            "status": "active", "items": {"data": [{"id": "si_bench", "object": "subscription_item",
            "price": {"id": "price_b", "product": "prod_b"}, "current_period_end": 4102444800_i64}]}}))
        .await
        .unwrap();
    });
    let customer = rt
        .block_on(Customer::get(&sqlite, "cus_bench_1"))
        .unwrap()
        .unwrap();
    c.bench_function("subscription_check_sqlite: customer.subscription()", |b| {
        b.iter(|| {
            assert!(
                rt.block_on(customer.subscription(&sqlite))
                    .unwrap()
                    .is_some()
            )
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
