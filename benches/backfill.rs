//! `sync_all` throughput and memory: a local stub serves N customers in pages of 100;
//! the bench mirrors them into a SQLite file and reports objects per second and the
//! process's peak resident memory after each size, to show memory stays flat as N grows.
//!
//! Run with `cargo bench --bench backfill`. Figures are recorded in benches/README.md.

use std::time::Instant;

use axum::extract::Query;
use axum::routing::get;
use stripe_mirror::{Config, Mirror, Secret, SyncOptions, sync_all};

fn customer(i: usize) -> serde_json::Value {
    serde_json::json!({
        "id": format!("cus_{i:08}"), "object": "customer", "livemode": false, "created": 1_700_000_000 + i,
        "email": format!("user{i}@example.com"), "name": format!("User {i}"), "balance": 0, "currency": "usd",
        "metadata": {"stripe_mirror_subscriber": format!("user-{i}"), "plan": "pro"},
        "invoice_settings": {"default_payment_method": null, "footer": null},
        "address": {"city": "Paris", "country": "FR", "line1": "1 rue de Rivoli", "postal_code": "75001"},
    })
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

#[derive(serde::Deserialize)]
struct Page {
    starting_after: Option<String>,
    limit: Option<usize>,
}

#[tokio::main]
async fn main() {
    // Sizes to run: `cargo bench --bench backfill -- 1000 10000`.
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![5_000, 50_000]
    } else {
        sizes
    };
    for total in sizes {
        let app = axum::Router::new().route(
            "/v1/customers",
            get(move |Query(p): Query<Page>| async move {
                let start = p
                    .starting_after
                    .and_then(|id| id[4..].parse::<usize>().ok())
                    .map_or(0, |i| i + 1);
                let end = (start + p.limit.unwrap_or(10)).min(total);
                let data: Vec<_> = (start..end).map(customer).collect();
                axum::Json(
                    serde_json::json!({"object": "list", "data": data, "has_more": end < total}),
                )
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(format!(
            "sqlite://{}",
            dir.path().join("backfill.db").display()
        ));
        config.api_base = Some(format!("http://{addr}/"));
        config.secret_key = Some(Secret::new("sk_test_backfillbench0000"));
        let mirror = Mirror::connect(config).await.unwrap();
        let started = Instant::now();
        let report = sync_all(
            &mirror,
            &SyncOptions::default().objects(&["customer"]),
            |_| {},
        )
        .await
        .unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(report.counts["customer"], total);
        println!(
            "sync_all {total:>7} customers: {secs:6.2} s, {:>7.0} objects/s, peak RSS {} MiB",
            total as f64 / secs,
            peak_rss_kib() / 1024
        );
        server.abort();
    }
}
