//! The `stripe-mirror` command, run as a process: migrate, API keys (never printed
//! whole), sync and demo products against localstripe, event replay, and `serve`
//! answering a signed webhook. On SQLite and Postgres.
#![cfg(feature = "cli")]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use stripe_mirror::Secret;
use stripe_mirror::webhooks::signature::sign;

const BIN: &str = env!("CARGO_BIN_EXE_stripe-mirror");
const KEY: &str = "sk_test_clitests000000000000abcd";

fn run(database_url: &str, api: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("STRIPE_LIVE_MODE")
        .env_remove("STRIPE_TEST_SECRET_KEY");
    if let Some(api) = api {
        cmd.env("STRIPE_API_BASE", api)
            .env("STRIPE_SECRET_KEY", KEY);
    }
    cmd.output().unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn migrate_and_api_keys() {
    for b in common::backends() {
        let url = &b.config.database_url;
        assert!(
            ok(&run(url, None, &["migrate"])).contains("up to date"),
            "{}",
            b.name
        );
        let added = ok(&run(url, None, &["api-keys", "add", KEY]));
        assert!(
            added.contains("secret test sk_test_...abcd"),
            "{}: {added}",
            b.name
        );
        let listed = ok(&run(url, None, &["api-keys", "list"]));
        assert!(
            listed.contains("sk_test_...abcd") && !listed.contains(KEY),
            "{}: {listed}",
            b.name
        );
        let bad = run(url, None, &["api-keys", "add", "sk_nope_123"]);
        assert!(!bad.status.success());
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("invalid Stripe API key"),
            "{bad:?}"
        );
        let id = listed.split_whitespace().next().unwrap();
        assert!(ok(&run(url, None, &["api-keys", "remove", id])).contains("removed"));
        assert!(
            ok(&run(url, None, &["api-keys", "list"])).trim().is_empty(),
            "{}",
            b.name
        );
        assert!(
            !run(url, None, &["api-keys", "remove", id]).status.success(),
            "{}: removing twice fails",
            b.name
        );
        assert!(
            ok(&run(url, None, &["process-events"])).contains("processed 0, failed 0"),
            "{}",
            b.name
        );
    }
}

#[test]
#[ignore = "needs localstripe: run scripts/test.sh"]
fn sync_and_demo_products_against_localstripe() {
    let base = common::peer("STRIPE_MIRROR_TEST_LOCALSTRIPE");
    for b in common::backends() {
        let url = &b.config.database_url;
        let demo = ok(&run(url, Some(&base), &["bootstrap-demo-products"]));
        assert!(
            demo.contains("pro stripe_mirror_demo_pro monthly=price_"),
            "{}: {demo}",
            b.name
        );
        let synced = ok(&run(url, Some(&base), &["sync", "product", "price"]));
        assert!(
            synced.lines().any(|l| l.starts_with("product: ")),
            "{}: {synced}",
            b.name
        );
        assert!(
            synced.lines().any(|l| l.starts_with("price: ")),
            "{}: {synced}",
            b.name
        );
        let bad = run(url, Some(&base), &["sync", "invoice"]);
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("cannot sync \"invoice\""),
            "{bad:?}"
        );
    }
}

/// `prune --older-than 30d` removes old processed events and deliveries, keeps the
/// failed event and its delivery, and says what it removed.
#[test]
fn prune_removes_old_processed_events_and_keeps_failed_ones() {
    use stripe_mirror::{Event, Mirror, WebhookRequest, Webhooks};
    for b in common::backends() {
        let url = &b.config.database_url;
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut config = b.config.clone();
            config.webhook_secrets = vec![Secret::new("whsec_cli")];
            let m = Mirror::connect(config).await.unwrap();
            let webhooks = Webhooks::new().on("invoice.paid", |_e: Event, _m: Mirror| async {
                Err("down".into())
            });
            let now = chrono::Utc::now().timestamp();
            for (id, kind, object) in [
                ("evt_p_ok", "product.created", "product"),
                ("evt_p_failed", "invoice.paid", "invoice"),
            ] {
                let body =
                    serde_json::json!({"id": id, "object": "event", "type": kind, "created": now,
                    "data": {"object": {"id": format!("x_{id}"), "object": object}}})
                    .to_string();
                let signature = sign(body.as_bytes(), &Secret::new("whsec_cli"), now);
                let request = WebhookRequest::new(body).header("Stripe-Signature", signature);
                webhooks.receive(&m, request).await;
            }
            webhooks.receive(&m, WebhookRequest::new("junk")).await;
        });
        for table in ["stripe_events", "stripe_webhook_deliveries"] {
            common::execute_sql(
                url,
                &format!("UPDATE {table} SET received_at = received_at - 3456000"),
            );
        }
        let out = ok(&run(url, None, &["prune", "--older-than", "30d"]));
        assert!(
            out.contains("removed 2 deliveries and 1 processed events"),
            "{}: {out}",
            b.name
        );
        let count = |sql: &str| common::query_count(url, sql);
        assert_eq!(
            count("SELECT COUNT(*) AS n FROM stripe_events WHERE id = 'evt_p_failed'"),
            1,
            "{}",
            b.name
        );
        assert_eq!(
            count("SELECT COUNT(*) AS n FROM stripe_webhook_deliveries"),
            1,
            "{}",
            b.name
        );
        let again = ok(&run(url, None, &["prune", "--older-than", "30d"]));
        assert!(
            again.contains("removed 0 deliveries and 0 processed events"),
            "{again}"
        );
        let bad = run(url, None, &["prune", "--older-than", "30x"]);
        assert!(!bad.status.success());
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("unknown unit"),
            "{bad:?}"
        );
    }
}

#[test]
fn serve_answers_signed_webhooks() {
    for b in common::backends() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", &b.config.database_url)
            .env("STRIPE_WEBHOOK_SECRET", "whsec_cli")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "serve did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let now = chrono::Utc::now().timestamp();
        let body = serde_json::json!({"id": "evt_cli", "object": "event", "type": "product.created", "created": now,
            "data": {"object": {"id": "prod_cli", "object": "product", "name": "CLI"}}})
        .to_string();
        let url = format!("http://127.0.0.1:{port}/stripe/webhook");
        let answer = ureq::post(&url)
            .header(
                "Stripe-Signature",
                &sign(body.as_bytes(), &Secret::new("whsec_cli"), now),
            )
            .send(&body);
        let unsigned = ureq::post(&url).send(&body);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(answer.unwrap().status(), 200, "{}", b.name);
        assert!(
            matches!(unsigned, Err(ureq::Error::StatusCode(400))),
            "{}: {unsigned:?}",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_refetches_flagged_rows() {
    let sub = |status: &str| {
        serde_json::json!({"id": "sub_cli_rc", "object": "subscription", "customer": "cus_cli", "status": status,
                           "items": {"data": []}})
    };
    let (base, _) = common::stripe_stub(vec![
        ("/v1/subscriptions/sub_cli_rc", 200, sub("canceled")),
        (
            "/v1/events",
            200,
            serde_json::json!({"object": "list", "data": [], "has_more": false}),
        ),
    ])
    .await;
    for b in common::backends() {
        let url = b.config.database_url.clone();
        let m = b.mirror().await;
        stripe_mirror::Subscription::sync_from_stripe_data(&m, &sub("active"))
            .await
            .unwrap();
        common::execute_sql(
            &url,
            "UPDATE stripe_subscriptions SET reconcile = TRUE WHERE id = 'sub_cli_rc'",
        );
        let base = base.clone();
        let out = tokio::task::spawn_blocking(move || {
            ok(&run(&url, Some(&base), &["reconcile", "--since", "2h"]))
        })
        .await
        .unwrap();
        assert!(
            out.contains("re-fetched 1, tombstoned 0, failed 0"),
            "{}: {out}",
            b.name
        );
        let s = stripe_mirror::Subscription::get(&m, "sub_cli_rc")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.status.as_deref(), Some("canceled"), "{}", b.name);
    }
}
