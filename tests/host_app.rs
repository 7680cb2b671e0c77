//! The crate inside a host axum app: the app's own `Router<AppState>` routes and the
//! webhook route merged into it (at a path of the app's choosing), handlers receiving
//! the app's state. Compiled and served for real on both backends.
#![cfg(feature = "axum")]

mod common;

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::{Router, routing::get};
use serde_json::json;
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{Event, Webhooks};
use stripe_mirror::{Mirror, Secret};

const SECRET: &str = "whsec_host_app";

#[derive(Clone, Default)]
struct AppState {
    plans: Arc<Mutex<Vec<String>>>,
}

async fn plans(State(state): State<AppState>) -> String {
    state.plans.lock().unwrap().join(",")
}

#[tokio::test]
async fn the_webhook_route_merges_into_an_app_with_state() {
    for b in common::backends() {
        let mut config = b.config.clone();
        config.webhook_secrets = vec![Secret::new(SECRET)];
        let mirror = Mirror::connect(config).await.unwrap();
        let state = AppState::default();
        // Handlers with the app's state, handed to the router as they are.
        let webhooks = Webhooks::new().with_state(state.clone()).on(
            "customer.subscription.*",
            |e: Event, _m: Mirror, app: AppState| async move {
                let status = e.object()["status"].as_str().unwrap_or_default().to_owned();
                app.plans.lock().unwrap().push(status);
                Ok(())
            },
        );
        let app: Router = Router::new()
            .route("/me/plan", get(plans))
            .merge(stripe_mirror::axum::webhook_router_at(
                "/billing/events",
                mirror,
                webhooks,
            ))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let event = json!({"id": "evt_host", "object": "event", "type": "customer.subscription.created",
            "created": chrono::Utc::now().timestamp(), "livemode": false, "data": {"object": {
            "id": "sub_host", "object": "subscription", "customer": "cus_host", "status": "active",
            "items": {"data": []}}}});
        let body = event.to_string();
        let header = sign(
            body.as_bytes(),
            &Secret::new(SECRET),
            chrono::Utc::now().timestamp(),
        );
        let (posted, read) = tokio::task::spawn_blocking(move || {
            let posted = ureq::post(&format!("http://{addr}/billing/events"))
                .header("Stripe-Signature", &header)
                .send(&body)
                .unwrap()
                .status()
                .as_u16();
            let read = ureq::get(&format!("http://{addr}/me/plan"))
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap();
            (posted, read)
        })
        .await
        .unwrap();
        assert_eq!((posted, read.as_str()), (200, "active"), "{}", b.name);
    }
}

/// A secret key of the other mode is never used: a live key in a mirror left in test
/// mode (`STRIPE_LIVE_MODE` unset) is said when the mirror opens, key masked, not
/// first by a gate that finds no live customer.
#[cfg(feature = "cli")]
#[tokio::test]
async fn a_secret_key_of_the_other_mode_is_said_at_start() {
    async fn logged(config: stripe_mirror::Config) -> String {
        let captured = common::Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        Mirror::open(config).await.unwrap();
        captured.text()
    }
    let bare = stripe_mirror::Config::new("sqlite::memory:");
    let live_key = "sk_live_51RealMoneyKey00000wxyz";
    let text = logged(bare.clone().secret_key(live_key)).await;
    assert!(
        text.contains("WARN")
            && text.contains("sk_live_...wxyz")
            && text.contains("STRIPE_LIVE_MODE=true"),
        "{text}"
    );
    assert!(!text.contains(live_key), "{text}");
    // In live mode it serves: nothing to say.
    let text = logged(bare.clone().live_mode(true).secret_key(live_key)).await;
    assert!(!text.contains("STRIPE_LIVE_MODE"), "{text}");
    // Encryption keys only among the previous ones: they open rows but seal none,
    // which the app hears at start (the key itself never).
    let mut previous_only = bare.clone();
    let key = stripe_mirror::EncryptionKey::from_bytes([7; 32]);
    previous_only.previous_encryption_keys = vec![key];
    let text = logged(previous_only).await;
    assert!(
        text.contains("WARN")
            && text.contains("stored unencrypted")
            && text.contains("set STRIPE_MIRROR_ENCRYPTION_KEY"),
        "{text}"
    );
    assert!(!text.contains(&"07".repeat(32)), "{text}");
    let mut both = bare;
    both.encryption_key = Some(stripe_mirror::EncryptionKey::from_bytes([8; 32]));
    both.previous_encryption_keys = vec![stripe_mirror::EncryptionKey::from_bytes([7; 32])];
    assert!(!logged(both).await.contains("unencrypted"));
}

/// A webhook route mounted without a signing secret refuses every delivery: the app
/// hears it once, where the route is built, not first from Stripe's failed deliveries.
#[cfg(feature = "cli")]
#[tokio::test]
async fn mounting_the_webhook_route_without_a_secret_warns() {
    async fn warned(config: stripe_mirror::Config) -> bool {
        let mirror = Mirror::connect(config).await.unwrap();
        let captured = common::Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let _: Router<AppState> = stripe_mirror::axum::webhook_router(mirror, Webhooks::new());
        });
        captured.text().contains("STRIPE_WEBHOOK_SECRET is not set")
    }
    let bare = stripe_mirror::Config::new("sqlite::memory:");
    assert!(warned(bare.clone()).await, "no warning without a secret");
    assert!(
        !warned(bare.webhook_secret(SECRET)).await,
        "a warning with a secret set"
    );
}
