//! End to end in a real browser: the `subscription_gate` example, run as a process
//! against localstripe (whose launcher serves a test Checkout page), driven in headless
//! Chromium. The pricing page lists the three demo plans and its toggle shows the
//! yearly prices (screenshot: target/screenshots/pricing.png); a non-subscriber
//! opening /members lands on /pricing; Subscribe lands on the Checkout URL; after
//! paying there, the user is still refused until the signed events Stripe would send
//! (`checkout.session.completed`, `customer.subscription.created`) reach the app's
//! webhook route, and then sees the members page; "Manage billing" opens the Billing
//! Portal page, whose link leads back to /account. Screenshots of each page land in
//! target/screenshots/. The example is built by the test itself (with the test's
//! features, so a no-op when `cargo build --all-features --examples` ran before).

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use futures_util::FutureExt;
use serde_json::{Value, json};
use stripe_mirror::Secret;
use stripe_mirror::webhooks::signature::sign;

const KEY: &str = "sk_test_subscriptiongatebrowser00";
const WEBHOOK_SECRET: &str = "whsec_subscription_gate_browser_test";

#[tokio::test]
#[ignore = "needs chromedriver and localstripe: run scripts/test.sh"]
async fn subscribers_see_members_page_after_checkout_and_its_webhooks() {
    let localstripe = common::peer("STRIPE_MIRROR_TEST_LOCALSTRIPE")
        .trim_end_matches('/')
        .to_owned();
    let app = App::start(&localstripe);
    let user = format!(
        "e2e-user-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let client = browser::chromium().await;
    // Whatever happens in the steps, the browser is closed (and `app` killed on drop).
    let steps = AssertUnwindSafe(steps(&client, &app.url, &localstripe, &user))
        .catch_unwind()
        .await;
    let _ = client.close().await;
    if let Err(panic) = steps {
        std::panic::resume_unwind(panic);
    }
}

async fn steps(client: &Client, app: &str, localstripe: &str, user: &str) {
    // Pricing: the three mirrored plans, monthly prices first.
    client
        .goto(&format!("{app}/pricing?user={user}"))
        .await
        .unwrap();
    assert_eq!(texts(client, ".plan h2").await, ["Basic", "Starter", "Pro"]);
    assert_eq!(texts(client, ".month .amount").await, ["$5", "$15", "$30"]);
    assert_eq!(texts(client, ".year .amount").await, ["", "", ""], "hidden");

    // The toggle shows the yearly prices instead.
    click(client, "#interval-year").await;
    assert_eq!(
        texts(client, ".year .amount").await,
        ["$50", "$150", "$300"]
    );
    assert_eq!(
        texts(client, ".month .amount").await,
        ["", "", ""],
        "hidden"
    );
    browser::screenshot(client, browser::screenshot_path("pricing.png")).await;

    // Not a subscriber yet: the members page sends the user to pricing.
    client.goto(&format!("{app}/members")).await.unwrap();
    assert_eq!(path(client).await, "/pricing");

    // Subscribe to Pro (monthly: the page opens on monthly) lands on the Checkout URL.
    click(client, "#plan-stripe_mirror_demo_pro .month button").await;
    let checkout = wait_for_url(client, &format!("{localstripe}/_checkout/cs_")).await;
    let session_id = checkout.rsplit('/').next().unwrap().to_owned();
    let amount = client.find(Locator::Id("amount")).await.unwrap();
    assert_eq!(amount.text().await.unwrap(), "USD 30.00 / month");
    browser::screenshot(client, browser::screenshot_path("checkout.png")).await;

    // Paying creates the subscription in localstripe and returns to the app, whose
    // success page confirms the session with Stripe (`sync_session`) before any
    // webhook has arrived...
    click(client, "#pay").await;
    wait_for_url(client, &format!("{app}/account?checkout={session_id}")).await;
    let notice = client.find(Locator::Css(".notice")).await.unwrap();
    let notice = notice.text().await.unwrap();
    assert!(notice.contains(&session_id), "{notice}");
    assert!(notice.contains("go to the members page"), "{notice}");
    let plan = client.find(Locator::Css("body")).await.unwrap();
    assert!(
        plan.text()
            .await
            .unwrap()
            .contains("active, current period ends"),
        "the account page shows the subscription"
    );
    browser::screenshot(client, browser::screenshot_path("account.png")).await;
    // ...so the members page opens at once.
    client.goto(&format!("{app}/members")).await.unwrap();
    assert_eq!(
        path(client).await,
        "/members",
        "access before the events, from the success page"
    );

    // The events Stripe sends afterwards, with the objects as the API has them now,
    // change nothing.
    let session = stripe_get(localstripe, &format!("/v1/checkout/sessions/{session_id}"));
    assert_eq!(session["status"], "complete", "{session}");
    assert_eq!(session["client_reference_id"], user, "{session}");
    let subscription_id = session["subscription"].as_str().expect("a subscription");
    let subscription = stripe_get(localstripe, &format!("/v1/subscriptions/{subscription_id}"));
    assert_eq!(subscription["status"], "active", "{subscription}");
    deliver(app, "checkout.session.completed", &session);
    deliver(app, "customer.subscription.created", &subscription);

    // The same user now sees the members page.
    client.goto(&format!("{app}/members")).await.unwrap();
    assert_eq!(path(client).await, "/members");
    let welcome = client.find(Locator::Css(".welcome")).await.unwrap();
    assert_eq!(
        welcome.text().await.unwrap(),
        format!("Welcome, {user}. Your Pro subscription is active.")
    );
    browser::screenshot(client, browser::screenshot_path("members.png")).await;

    // The account page's "Manage billing" opens the Billing Portal, which leads back.
    client.goto(&format!("{app}/account")).await.unwrap();
    click(client, "form[action='/account/billing'] button").await;
    wait_for_url(client, &format!("{localstripe}/_portal/bps_")).await;
    let portal = client.find(Locator::Css("body")).await.unwrap();
    assert!(portal.text().await.unwrap().contains(subscription_id));
    click(client, "#return").await;
    wait_for_url(client, &format!("{app}/account")).await;
}

/// The example app as a process on a free port, with its own SQLite file; killed on drop.
struct App {
    url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl App {
    fn start(localstripe: &str) -> App {
        let binary = build_example();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new(&binary);
        for var in [
            "STRIPE_LIVE_MODE",
            "STRIPE_TEST_SECRET_KEY",
            "STRIPE_LIVE_SECRET_KEY",
            "STRIPE_LIVE_PUBLISHABLE_KEY",
        ] {
            command.env_remove(var);
        }
        let child = command
            .env(
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("gate.db").display()),
            )
            .env("STRIPE_API_BASE", format!("{localstripe}/"))
            .env("STRIPE_SECRET_KEY", KEY)
            .env(
                "STRIPE_TEST_PUBLISHABLE_KEY",
                "pk_test_subscriptiongatebrowser",
            )
            .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut app = App {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        // It listens once the demo catalogue is mirrored.
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = app.child.try_wait().unwrap() {
                panic!("subscription_gate exited before listening: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "subscription_gate did not listen on {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        app
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the example with this test's own features (so nothing else is rebuilt; a
/// no-op when it is up to date) and returns its path in the target folder.
fn build_example() -> PathBuf {
    let mut features = vec!["axum"];
    for (on, feature) in [
        (cfg!(feature = "default"), "default"),
        (cfg!(feature = "sqlite"), "sqlite"),
        (cfg!(feature = "postgres"), "postgres"),
        (cfg!(feature = "cli"), "cli"),
    ] {
        if on {
            features.push(feature);
        }
    }
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--example",
            "subscription_gate",
            "--no-default-features",
        ])
        .args(["--features", &features.join(",")])
        .args([
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "cargo build --example subscription_gate: {status}"
    );
    // Tests run from target/<profile>/deps; examples are built into target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("examples")
        .join("subscription_gate")
}

async fn texts(client: &Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for element in client.find_all(Locator::Css(css)).await.unwrap() {
        out.push(element.text().await.unwrap());
    }
    out
}

async fn click(client: &Client, css: &str) {
    let element = client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("find {css}: {e}"));
    element
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn path(client: &Client) -> String {
    client.current_url().await.unwrap().path().to_owned()
}

/// Waits until the browser's URL starts with `prefix` (a click's navigation) and
/// returns it.
async fn wait_for_url(client: &Client, prefix: &str) -> String {
    let start = Instant::now();
    loop {
        let url = client.current_url().await.unwrap().to_string();
        if url.starts_with(prefix) {
            return url;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the browser is at {url}, not {prefix}..."
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An object from localstripe's API, as the app's secret key sees it.
fn stripe_get(localstripe: &str, path: &str) -> Value {
    let mut response = ureq::get(&format!("{localstripe}{path}"))
        .header("Authorization", &format!("Bearer {KEY}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
}

/// Posts a Stripe event about `object` to the app's webhook route, signed with the
/// app's secret, as Stripe would; it must be accepted.
fn deliver(app: &str, event_type: &str, object: &Value) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let id = format!(
        "evt_gate_{}_{}",
        event_type.replace('.', "_"),
        object["id"].as_str().unwrap()
    );
    let body = json!({
        "id": id, "object": "event", "api_version": "2017-08-15", "created": now,
        "livemode": false, "pending_webhooks": 1, "request": { "id": null },
        "type": event_type, "data": { "object": object },
    })
    .to_string();
    let signature = sign(body.as_bytes(), &Secret::new(WEBHOOK_SECRET), now);
    let mut response = ureq::post(&format!("{app}/stripe/webhook"))
        .config()
        .http_status_as_error(false)
        .build()
        .header("Stripe-Signature", &signature)
        .header("Content-Type", "application/json")
        .send(&body)
        .unwrap_or_else(|e| panic!("deliver {event_type}: {e}"));
    let status = response.status();
    let answer = response.body_mut().read_to_string().unwrap();
    assert_eq!(status, 200, "{event_type}: {answer}");
}
