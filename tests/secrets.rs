//! No secret is ever shown: with known API keys, a webhook secret and a database
//! password, webhook deliveries (good, badly signed, failing), syncs that fail against
//! the API, and CLI verbs run while every tracing event (all levels) is captured, with
//! stdout and stderr of the CLI and every error's Display and Debug; none of them holds
//! a secret. On both backends (Postgres with a password in its URL).
#![cfg(feature = "cli")]

mod common;

use serde_json::json;
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{Event, HandlerError};
use stripe_mirror::{
    ApiKey, Config, Customer, Mirror, Secret, SyncOptions, WebhookRequest, Webhooks, sync_all,
};

const API_KEY: &str = "sk_test_51SecretApiKeyNeverShown0000wxyz";
const STORED_KEY: &str = "sk_test_51StoredKeyNeverShown00000abcd";
const WEBHOOK_SECRET: &str = "whsec_WebhookSecretNeverShown0000";
const DB_PASSWORD: &str = "DbPasswordNeverShown";
const ENCRYPTION_KEY: &str = "0e0c0ffee0e0c0ffee0e0c0ffee0e0c0ffee0e0c0ffee0e0c0ffee0e0c0ffee0";
const SECRETS: [&str; 5] = [
    API_KEY,
    STORED_KEY,
    WEBHOOK_SECRET,
    DB_PASSWORD,
    ENCRYPTION_KEY,
];

fn assert_clean(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} shows a secret ({secret}):\n{text}"
        );
    }
}

#[tokio::test]
async fn no_secret_reaches_logs_output_or_errors() {
    // Everything the process logs, at every level.
    let captured = common::Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();
    let mut shown: Vec<(String, String)> = Vec::new();
    // A Stripe that refuses every key, and fails a list with a 500.
    let (api, _) = common::stripe_stub(vec![
        ("/v1/customers", 401, json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****wxyz"}})),
        ("/v1/subscriptions", 500, json!({"error": {"type": "api_error", "message": "boom"}})),
    ])
    .await;
    for b in common::backends() {
        let url = match b.config.database_url.strip_prefix("postgres://postgres@") {
            Some(rest) => format!("postgres://postgres:{DB_PASSWORD}@{rest}"),
            None => b.config.database_url.clone(),
        };
        let mut config = Config::new(url.clone());
        config.webhook_secrets = vec![Secret::new(WEBHOOK_SECRET)];
        config.secret_key = Some(Secret::new(API_KEY));
        config.encryption_key =
            Some(stripe_mirror::EncryptionKey::from_hex(ENCRYPTION_KEY).unwrap());
        config.api_base = Some(api.clone());
        config.stripe_retries = 0;
        shown.push(("Config Debug".into(), format!("{config:?}")));
        let mirror = Mirror::connect(config).await.unwrap();
        shown.push(("Mirror Debug".into(), format!("{mirror:?}")));
        let stored = ApiKey::get_or_create(&mirror, STORED_KEY).await.unwrap();
        shown.push((
            "ApiKey Debug and Display".into(),
            format!("{stored:?} {stored}"),
        ));

        // Deliveries: good, badly signed, a failing handler.
        let webhooks = Webhooks::new().on("customer.*", |_e: Event, _m: Mirror| async {
            Err::<(), HandlerError>("mailer down".into())
        });
        let body = json!({"id": "evt_s", "object": "event", "type": "customer.created",
            "created": chrono::Utc::now().timestamp(), "livemode": false,
            "data": {"object": {"id": "cus_s", "object": "customer"}}})
        .to_string();
        let good = sign(
            body.as_bytes(),
            &Secret::new(WEBHOOK_SECRET),
            chrono::Utc::now().timestamp(),
        );
        for request in [
            WebhookRequest::new(body.clone()).header("Stripe-Signature", good),
            WebhookRequest::new(body.clone()).header("Stripe-Signature", "t=1,v1=00"),
            WebhookRequest::new(body.clone()).header("Authorization", format!("Bearer {API_KEY}")),
        ] {
            let answer = webhooks.receive(&mirror, request).await;
            shown.push((
                "webhook answer".into(),
                format!("{answer:?} {}", answer.body()),
            ));
        }

        // Syncs that fail against the API: every error shown both ways.
        let errors = [
            sync_all(
                &mirror,
                &SyncOptions::default().objects(&["customer"]),
                |_| {},
            )
            .await
            .err(),
            sync_all(
                &mirror,
                &SyncOptions::default().objects(&["subscription"]),
                |_| {},
            )
            .await
            .err(),
            Customer::sync(&mirror, "cus_s").await.err(),
        ];
        for err in errors.into_iter().flatten() {
            shown.push(("error".into(), format!("{err} / {err:?}")));
        }

        // CLI verbs with the same secrets in their environment.
        for args in [
            vec!["doctor", "--offline"],
            vec!["api-keys", "list"],
            vec!["sync", "--objects", "customer"],
            vec!["migrate"],
            vec!["api-keys", "encrypt"],
        ] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_stripe-mirror"))
                .args(&args)
                .env("DATABASE_URL", &url)
                .env("STRIPE_SECRET_KEY", API_KEY)
                .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
                .env("STRIPE_MIRROR_ENCRYPTION_KEY", ENCRYPTION_KEY)
                .env("STRIPE_API_BASE", &api)
                .env("RUST_LOG", "trace")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            shown.push((format!("stripe-mirror {}", args.join(" ")), text));
        }
    }
    for (what, text) in &shown {
        assert_clean(what, text);
    }
    let logs = captured.text();
    assert!(
        logs.contains("webhook"),
        "the capture saw the crate's events: {logs}"
    );
    assert_clean("the tracing log", &logs);
    // The masked forms are what is shown.
    assert!(
        shown.iter().any(|(_, t)| t.contains("sk_test_...abcd")),
        "{shown:?}"
    );
}
