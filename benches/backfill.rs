//! Backfill and subscription checks at scale.
//!
//! - `backfill OBJECTS`: `sync_all` from a local stub that serves Stripe list pages of
//!   customers and subscriptions (half each, generated page by page so the stub holds
//!   nothing), into a SQLite file; objects/s and the process's peak RSS. Run once per
//!   size in its own process, so each peak is its own.
//! - `reads CUSTOMERS`: mirrors that many customers, each with a subscription, then
//!   times subscription checks for random subscribers: `Customer::by_subscriber` +
//!   `customer.subscription()`, and the gate `require_subscription(user).check()`;
//!   p50 and p99 in microseconds.
//!
//! Prints one JSON object per measurement. Run: `cargo bench --bench backfill -- backfill 100000`.

#![recursion_limit = "256"]

use std::time::{Duration, Instant};

use axum::extract::{Path, Query};
use axum::routing::get;
use serde_json::json;
use stripe_mirror::{
    Config, Customer, Mirror, Secret, SyncOptions, require_subscription, sync_all,
};

// The objects are written as text, not built as `serde_json::Value`s and serialized:
// the stub shares the process and its 2 cores with the mirror, and in a real backfill
// the pages cost the mirror nothing until they arrive.

fn customer(i: usize) -> String {
    let created = 1_700_000_000 + i;
    format!(
        r#"{{"id":"cus_{i:08}","object":"customer","livemode":false,"created":{created},"email":"user{i}@example.com","name":"User {i}","balance":0,"currency":"usd","metadata":{{"stripe_mirror_subscriber":"user-{i}","plan":"pro"}},"invoice_settings":{{"default_payment_method":null,"footer":null,"custom_fields":null}},"address":{{"city":"Paris","country":"FR","line1":"1 rue de Rivoli","postal_code":"75001"}},"delinquent":false,"description":null,"discount":null,"phone":null,"preferred_locales":[],"shipping":null,"tax_exempt":"none","test_clock":null,"invoice_prefix":"ABC123"}}"#
    )
}

fn subscription(i: usize) -> String {
    let created = 1_700_000_000 + i;
    let status = if i.is_multiple_of(10) {
        "canceled"
    } else {
        "active"
    };
    format!(
        r#"{{"id":"sub_{i:08}","object":"subscription","livemode":false,"customer":"cus_{i:08}","status":"{status}","created":{created},"cancel_at_period_end":false,"cancel_at":null,"canceled_at":null,"ended_at":null,"collection_method":"charge_automatically","currency":"usd","start_date":{created},"billing_cycle_anchor":{created},"trial_start":null,"trial_end":null,"metadata":{{}},"default_payment_method":null,"latest_invoice":"in_{i:08}","items":{{"object":"list","has_more":false,"total_count":1,"url":"/v1/subscription_items?subscription=sub_{i:08}","data":[{{"id":"si_{i:08}","object":"subscription_item","subscription":"sub_{i:08}","created":{created},"quantity":1,"metadata":{{}},"current_period_start":{created},"current_period_end":4102444800,"price":{{"id":"price_pro_monthly","object":"price","active":true,"currency":"usd","product":"prod_pro","type":"recurring","unit_amount":2000,"livemode":false,"recurring":{{"interval":"month","interval_count":1,"usage_type":"licensed"}}}}}}]}}}}"#
    )
}

#[derive(serde::Deserialize)]
struct Page {
    starting_after: Option<String>,
    limit: Option<usize>,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Serves `per_kind` customers and as many subscriptions, page by page.
async fn stub(per_kind: usize) -> String {
    let app = axum::Router::new().route(
        "/v1/{kind}",
        get(
            move |Path(kind): Path<String>, Query(p): Query<Page>| async move {
                let start = p
                    .starting_after
                    .and_then(|id| id.rsplit('_').next().and_then(|n| n.parse::<usize>().ok()))
                    .map_or(0, |i| i + 1);
                let (total, make): (usize, fn(usize) -> String) = match kind.as_str() {
                    "customers" => (per_kind, customer),
                    "subscriptions" => (per_kind, subscription),
                    _ => (0, customer),
                };
                let end = (start + p.limit.unwrap_or(10)).min(total);
                let data: Vec<String> = (start..end).map(make).collect();
                let page = format!(
                    r#"{{"object":"list","url":"/v1/{kind}","data":[{}],"has_more":{}}}"#,
                    data.join(","),
                    end < total
                );
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    page,
                )
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/")
}

async fn mirror_of(per_kind: usize, dir: &tempfile::TempDir) -> (Mirror, f64) {
    let base = stub(per_kind).await;
    let mut config = Config::new(format!(
        "sqlite://{}",
        dir.path().join("backfill.db").display()
    ));
    config.api_base = Some(base);
    config.secret_key = Some(Secret::new("sk_test_backfillbench0000"));
    let mirror = Mirror::connect(config).await.unwrap();
    let started = Instant::now();
    let report = sync_all(
        &mirror,
        &SyncOptions::default().objects(&["customer", "subscription"]),
        |_| {},
    )
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(report.counts["customer"], per_kind);
    assert_eq!(report.counts["subscription"], per_kind);
    assert!(report.failures.is_empty(), "{:?}", report.failures.first());
    (mirror, secs)
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    (at(0.50), at(0.99))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mode = args.first().map(String::as_str).unwrap_or("backfill");
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    match mode {
        "backfill" => {
            let (_mirror, secs) = mirror_of(n / 2, &dir).await;
            println!(
                "{}",
                json!({"backfill": {"objects": n, "seconds": secs, "objects_per_s": n as f64 / secs, "peak_rss_mib": peak_rss_mib()}})
            );
        }
        "reads" => {
            let (mirror, _) = mirror_of(n, &dir).await;
            let samples = 20_000;
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            let mut pick = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                format!("user-{}", seed as usize % n)
            };
            // Warm the pool and the page cache as a running app would be.
            for _ in 0..2_000 {
                let c = Customer::by_subscriber(&mirror, &pick())
                    .await
                    .unwrap()
                    .unwrap();
                c.subscription(&mirror).await.unwrap();
            }
            let mut lookup = Vec::with_capacity(samples);
            let mut gate = Vec::with_capacity(samples);
            for _ in 0..samples {
                let user = pick();
                let t = Instant::now();
                let c = Customer::by_subscriber(&mirror, &user)
                    .await
                    .unwrap()
                    .unwrap();
                let sub = c.subscription(&mirror).await.unwrap();
                lookup.push(t.elapsed());
                let t = Instant::now();
                let decision = require_subscription(&user).check(&mirror).await.unwrap();
                gate.push(t.elapsed());
                assert_eq!(sub.is_some(), decision.is_ok());
            }
            let (l50, l99) = percentiles(lookup);
            let (g50, g99) = percentiles(gate);
            println!(
                "{}",
                json!({"reads": {"customers": n, "subscriptions": n, "samples": samples,
                    "subscription_p50_us": l50, "subscription_p99_us": l99,
                    "gate_p50_us": g50, "gate_p99_us": g99}})
            );
        }
        other => panic!("unknown mode {other}: backfill N | reads N"),
    }
}
