//! A mirror's resources end with it: when the last clone of a `Mirror` is dropped, its
//! writer threads (and SQLite's syncer) end and its pool's connections close. A host
//! that opens a mirror per test, per tenant or per reload must not pile up threads
//! and database sessions.
//! (r2d2's own three worker threads per pool end up to 30 s later, with its reaper.)

mod common;

use std::time::Duration;

use serde_json::json;
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{Outcome, Webhooks};
use stripe_mirror::{Config, Mirror, Secret, WebhookRequest};

const SECRET: &str = "whsec_lifetime";

/// This process's threads whose name starts with `prefix` (Linux: /proc).
fn threads(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    // Up to 20 s: a loaded CI machine may be slow to schedule an ending thread.
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}");
}

/// Sessions open on the Postgres database `url` names.
fn sessions(url: &str) -> i64 {
    let admin = common::peer("STRIPE_MIRROR_TEST_POSTGRES");
    common::query_count(
        &admin,
        &format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{}'",
            common::database_name(url)
        ),
    )
}

async fn use_once(config: &Config, n: usize) {
    let mut config = config.clone();
    config.webhook_secrets = vec![Secret::new(SECRET)];
    let mirror = Mirror::connect(config).await.unwrap();
    let event = json!({"id": format!("evt_life{n}"), "object": "event", "type": "customer.created",
        "created": chrono::Utc::now().timestamp(), "livemode": false,
        "data": {"object": {"id": format!("cus_life{n}"), "object": "customer"}}});
    let body = event.to_string().into_bytes();
    let header = sign(&body, &Secret::new(SECRET), chrono::Utc::now().timestamp());
    let webhooks = Webhooks::new().on_any(|_e, _m| async { Ok(()) });
    let r = webhooks
        .receive(
            &mirror,
            WebhookRequest::new(body).header("Stripe-Signature", header),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Processed, "{r:?}");
    assert!(
        threads("stripe-mirror-w") > 0,
        "the writes went through writer threads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_mirror_ends_its_threads() {
    for b in common::backends() {
        for n in 0..3 {
            use_once(&b.config, n).await;
            wait_for(
                &format!(
                    "{}: the threads of a dropped mirror are still running",
                    b.name
                ),
                // Writers ("stripe-mirror-writer-N") and SQLite's syncer.
                || threads("stripe-mirror") == 0,
            )
            .await;
            if b.name == "postgres" {
                let url = &b.config.database_url;
                wait_for(
                    "postgres: the sessions of a dropped mirror are still open",
                    || sessions(url) == 0,
                )
                .await;
            }
        }
    }
}
