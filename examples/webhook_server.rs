//! A webhook endpoint at `/stripe/webhook`: verifies, logs, stores and mirrors every
//! Stripe event into `DATABASE_URL`, and prints the ones it handles.
//!
//! Run with `STRIPE_WEBHOOK_SECRET=whsec_... cargo run --features axum --example webhook_server`,
//! then `stripe listen --forward-to localhost:8000/stripe/webhook`. `LISTEN_ADDR`
//! overrides the default address, 127.0.0.1:8000.

use std::net::SocketAddr;

use stripe_mirror::webhooks::HandlerError;
use stripe_mirror::{Event, Mirror, Webhooks};

async fn subscription_changed(event: Event, mirror: Mirror) -> Result<(), HandlerError> {
    let id = event.object()["id"].as_str().unwrap_or_default();
    // The built-in sync has already run: the mirror holds the new state.
    if let Some(sub) = stripe_mirror::Subscription::get(&mirror, id).await? {
        println!(
            "{}: {} is now {}",
            event.event_type,
            sub.id,
            sub.status.map(|s| s.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mirror = Mirror::from_env().await?;
    let webhooks = Webhooks::new()
        .on("customer.subscription.*", subscription_changed)
        .on_any(|event: Event, _mirror: Mirror| async move {
            println!("received {} {}", event.event_type, event.id);
            Ok(())
        });

    let addr: SocketAddr = std::env::var("LISTEN_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8000".into())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let path = stripe_mirror::axum::WEBHOOK_PATH;
    println!("listening on http://{}{path}", listener.local_addr()?);
    stripe_mirror::axum::serve(mirror, webhooks, listener).await?;
    Ok(())
}
