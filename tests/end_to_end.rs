//! End to end: the `webhook_server` example registered as a webhook target in a real
//! localstripe (started by scripts/test.sh on 127.0.0.1). Creating a customer and a
//! subscription in localstripe makes signed events arrive and rows appear, on
//! SQLite and Postgres.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stripe_mirror::webhooks::Delivery;
use stripe_mirror::{Customer, Mirror, Secret, Subscription};

const SECRET: &str = "whsec_end_to_end_0123456789";
const KEY: &str = "sk_test_endtoend000000000000";

fn localstripe() -> String {
    common::peer("STRIPE_MIRROR_TEST_LOCALSTRIPE")
        .trim_end_matches('/')
        .to_owned()
}

fn post(url: &str, form: &[(&str, &str)]) -> serde_json::Value {
    let mut response = ureq::post(url)
        .header("Authorization", &format!("Bearer {KEY}"))
        .send_form(form.iter().copied())
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let text = response.body_mut().read_to_string().unwrap();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn example_binary() -> std::path::PathBuf {
    // Tests live in target/<profile>/deps; cargo builds examples into target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("webhook_server")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn localstripe_events_reach_the_mirror_through_the_example_server() {
    let base = localstripe();
    let binary = example_binary();
    assert!(
        binary.exists(),
        "{} not built (cargo test builds examples)",
        binary.display()
    );
    for b in common::backends() {
        let port = free_port();
        let server = Server(
            Command::new(&binary)
                .env("DATABASE_URL", &b.config.database_url)
                .env("STRIPE_WEBHOOK_SECRET", SECRET)
                .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut config = b.config.clone();
        config.webhook_secrets = vec![Secret::new(SECRET)];
        let mirror = Mirror::connect(config).await.unwrap();
        wait_for("the webhook server", || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .await;

        let hook = format!("{base}/_config/webhooks/e2e_{}_{port}", b.name);
        post(
            &hook,
            &[
                ("url", &format!("http://127.0.0.1:{port}/stripe/webhook")),
                ("secret", SECRET),
            ],
        );

        let subscriber = format!("user-e2e-{port}");
        let customer = post(
            &format!("{base}/v1/customers"),
            &[
                ("email", "e2e@example.com"),
                ("metadata[stripe_mirror_subscriber]", &subscriber),
                ("payment_method", "pm_card_visa"),
                ("invoice_settings[default_payment_method]", "pm_card_visa"),
            ],
        );
        let customer_id = customer["id"]
            .as_str()
            .expect("customer created")
            .to_owned();
        let product = post(
            &format!("{base}/v1/products"),
            &[("name", "Pro"), ("type", "service")],
        );
        let plan = post(
            &format!("{base}/v1/plans"),
            &[
                ("product", product["id"].as_str().unwrap()),
                ("amount", "2000"),
                ("currency", "usd"),
                ("interval", "month"),
            ],
        );
        let sub = post(
            &format!("{base}/v1/subscriptions"),
            &[
                ("customer", &customer_id),
                ("items[0][plan]", plan["id"].as_str().expect("plan created")),
            ],
        );
        let sub_id = sub["id"]
            .as_str()
            .unwrap_or_else(|| panic!("subscription created: {sub}"))
            .to_owned();

        let c = wait_for("the customer row", || async {
            Customer::by_subscriber(&mirror, &subscriber).await.unwrap()
        })
        .await;
        assert_eq!(
            (c.id.as_str(), c.email.as_deref()),
            (customer_id.as_str(), Some("e2e@example.com")),
            "{}",
            b.name
        );
        let s = wait_for("the subscription row", || async {
            Subscription::get(&mirror, &sub_id).await.unwrap()
        })
        .await;
        assert_eq!(
            s.customer_id.as_deref(),
            Some(customer_id.as_str()),
            "{}",
            b.name
        );
        assert!(s.is_valid(), "{}: {s:?}", b.name);
        assert!(
            c.is_subscribed_to(&mirror, &[product["id"].as_str().unwrap()])
                .await
                .unwrap(),
            "{}",
            b.name
        );
        let deliveries = Delivery::recent(&mirror, 50).await.unwrap();
        assert!(
            deliveries
                .iter()
                .any(|d| d.valid && d.outcome == "processed"),
            "{}: {deliveries:?}",
            b.name
        );
        let invalid: Vec<_> = deliveries
            .iter()
            .filter(|d| !d.valid)
            .map(|d| (&d.outcome, &d.error))
            .collect();
        assert!(
            invalid.is_empty(),
            "{}: localstripe signatures verify: {invalid:?}",
            b.name
        );
        drop(server);
    }
}

/// The README's main job (`scripts/demo.sh` runs this example) against localstripe:
/// bootstrap, get_or_create, subscribe to Pro, sync, print; on both backends.
#[tokio::test]
#[ignore = "needs localstripe: run scripts/test.sh"]
async fn the_quickstart_runs_the_whole_loop() {
    let base = localstripe();
    let binary = example_binary().with_file_name("quickstart");
    assert!(binary.exists(), "{} not built", binary.display());
    for b in common::backends() {
        // A password in the URL (the test server trusts every login) is never printed.
        let url = b
            .config
            .database_url
            .replacen("postgres@", "postgres:quickstart-pw-0000@", 1);
        assert!(b.name != "postgres" || url != b.config.database_url);
        let out = Command::new(&binary)
            .env("DATABASE_URL", &url)
            .env("STRIPE_API_BASE", format!("{base}/"))
            .env("STRIPE_SECRET_KEY", KEY)
            .env_remove("STRIPE_TEST_SECRET_KEY")
            .env_remove("STRIPE_LIVE_MODE")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout}\n{}",
            b.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !stdout.contains("quickstart-pw-0000"),
            "{}: the database password printed:\n{stdout}",
            b.name
        );
        for line in [
            "stripe_mirror_demo_pro",
            "30 usd/month, 300 usd/year",
            "subscriber=demo-user-1 active to Pro (valid: true)",
            "subscribed to Pro: true",
        ] {
            assert!(
                stdout.contains(line),
                "{}: {line:?} missing from\n{stdout}",
                b.name
            );
        }
        // What it printed is what the database holds.
        let mirror = Mirror::connect(b.config.clone()).await.unwrap();
        let customer = Customer::by_subscriber(&mirror, "demo-user-1")
            .await
            .unwrap()
            .expect("customer mirrored");
        let sub = customer
            .subscription(&mirror)
            .await
            .unwrap()
            .expect("one valid subscription");
        assert_eq!(
            sub.items(&mirror).await.unwrap()[0].product_id.as_deref(),
            Some("stripe_mirror_demo_pro")
        );
    }
}
