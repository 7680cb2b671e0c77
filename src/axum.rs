//! axum integration (feature `axum`): mounts the webhook pipeline at
//! `/stripe/webhook`, handing it the raw body untouched.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;

use crate::Mirror;
use crate::webhooks::{WebhookRequest, Webhooks};

/// The path Stripe (and `stripe listen --forward-to`) posts to.
pub const WEBHOOK_PATH: &str = "/stripe/webhook";

#[derive(Clone)]
struct WebhookState {
    mirror: Mirror,
    webhooks: Webhooks,
}

/// A router serving `POST /stripe/webhook`; merge it into your app's router.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) {
/// use stripe_mirror::Webhooks;
/// let app = axum::Router::new().merge(stripe_mirror::axum::webhook_router(mirror, Webhooks::new()));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await.unwrap();
/// axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await.unwrap();
/// # }
/// ```
pub fn webhook_router(mirror: Mirror, webhooks: Webhooks) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .with_state(WebhookState { mirror, webhooks })
}

/// Serves [`webhook_router`] on `listener` until the server stops, with peer addresses
/// for the delivery log; warns when no webhook secret is configured.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
/// stripe_mirror::axum::serve(mirror, stripe_mirror::Webhooks::new(), listener).await
/// # }
/// ```
pub async fn serve(
    mirror: Mirror,
    webhooks: Webhooks,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    if mirror.config().webhook_secrets.is_empty() {
        tracing::warn!("STRIPE_WEBHOOK_SECRET is not set: every delivery will be refused");
        eprintln!("warning: STRIPE_WEBHOOK_SECRET is not set; every delivery will be refused");
    }
    println!(
        "listening on http://{}{WEBHOOK_PATH}",
        listener.local_addr()?
    );
    let app = webhook_router(mirror, webhooks);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

/// Reads the body up to the cap plus one byte (enough to know it is over) and stops
/// there, within the read timeout ([`Webhooks::read_timeout`]), then hands the request
/// to [`Webhooks::receive`]. axum's own body limit does not apply here: the pipeline
/// logs oversized (413) and too slow (408) deliveries and answers them itself.
async fn receive(State(state): State<WebhookState>, request: Request) -> Response {
    let remote = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let headers = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let cap = state.webhooks.max_body();
    let mut body = Vec::new();
    let mut stream = request.into_body().into_data_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            // A broken stream ends the body: the signature check refuses what arrived.
            let Ok(chunk) = chunk else { break };
            body.extend_from_slice(&chunk[..chunk.len().min(cap + 1 - body.len())]);
            if body.len() > cap {
                // Over the cap: the rest is never read (the connection is then closed).
                break;
            }
        }
    };
    let timed_out = tokio::time::timeout(state.webhooks.max_read_time(), read)
        .await
        .is_err();
    let request = WebhookRequest {
        headers,
        body,
        body_size: None,
        remote_addr: remote,
        timed_out,
    };
    // In a task of its own: when Stripe hangs up (its timeout) the request future is
    // dropped, but the handlers and the records of what they did run to the end.
    let WebhookState { mirror, webhooks } = state;
    let work = tokio::spawn(async move { webhooks.receive(&mirror, request).await });
    let (status, body) = match work.await {
        Ok(answer) => (
            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            answer.body(),
        ),
        Err(err) => {
            tracing::error!(error = %err, "webhook task failed");
            let body = serde_json::json!({ "outcome": "error", "error": "internal error" });
            (StatusCode::INTERNAL_SERVER_ERROR, body.to_string())
        }
    };
    let mut response = (status, Body::from(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
