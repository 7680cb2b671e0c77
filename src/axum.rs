//! axum integration (feature `axum`): mounts the webhook pipeline at
//! `/stripe/webhook`, handing it the raw body untouched, and protects routes with an
//! access gate ([`Access`]).

use std::net::SocketAddr;

use std::marker::PhantomData;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRef, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;

use crate::Mirror;
use crate::access::{Denial, Gate};
use crate::models::subscription::Subscription;
use crate::webhooks::{WebhookRequest, Webhooks};

/// The path Stripe (and `stripe listen --forward-to`) posts to.
pub const WEBHOOK_PATH: &str = "/stripe/webhook";

#[derive(Clone)]
struct WebhookState {
    mirror: Mirror,
    webhooks: Webhooks,
}

/// A router serving `POST /stripe/webhook`, to merge into your app's router whatever
/// its state type (`Router<AppState>` included).
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) {
/// use axum::{Router, extract::State, routing::get};
/// use stripe_mirror::Webhooks;
///
/// #[derive(Clone)]
/// struct AppState { greeting: &'static str }
///
/// let app: Router = Router::new()
///     .route("/", get(|State(s): State<AppState>| async move { s.greeting }))
///     .merge(stripe_mirror::axum::webhook_router(mirror, Webhooks::new()))
///     .with_state(AppState { greeting: "hello" });
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await.unwrap();
/// axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await.unwrap();
/// # }
/// ```
pub fn webhook_router<S>(mirror: Mirror, webhooks: impl Into<Webhooks>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    webhook_router_at(WEBHOOK_PATH, mirror, webhooks)
}

/// [`webhook_router`] at another path (`/billing/stripe-events`). Both take
/// [`Webhooks`] or the handlers with your state ([`Webhooks::with_state`]) as they are.
///
/// Warns (a `tracing` warning) when no webhook secret is configured: every signed
/// delivery is then answered 500 (our configuration is wrong, so Stripe keeps
/// retrying until it is set) and logged.
pub fn webhook_router_at<S>(path: &str, mirror: Mirror, webhooks: impl Into<Webhooks>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let webhooks = webhooks.into();
    warn_without_secret(&mirror);
    Router::new()
        .route(path, post(receive))
        .with_state(WebhookState { mirror, webhooks })
}

/// A webhook route that can verify nothing refuses everything: said once, where it is
/// mounted.
fn warn_without_secret(mirror: &Mirror) {
    if mirror.config().webhook_secrets.is_empty() {
        tracing::warn!(
            "STRIPE_WEBHOOK_SECRET is not set: every signed delivery will fail (500, Stripe retries); \
             set it to the endpoint's signing secret (`stripe listen` prints one)"
        );
    }
}

/// Serves [`webhook_router`] on `listener` until the server stops, with peer addresses
/// for the delivery log; warns when no webhook secret is configured. A request's head,
/// like its body, must arrive within [`Config::webhook_read_timeout`](crate::Config::webhook_read_timeout),
/// or the connection is closed (an idle keep-alive connection too, once that long
/// has passed since its last answer). To stop it cleanly (a deploy),
/// [`serve_with_shutdown`].
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
/// stripe_mirror::axum::serve(mirror, stripe_mirror::Webhooks::new(), listener).await
/// # }
/// ```
pub async fn serve(
    mirror: Mirror,
    webhooks: impl Into<Webhooks>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    serve_with_shutdown(mirror, webhooks, listener, std::future::pending()).await
}

/// [`serve`] until `stop` completes, then no new request is taken and it returns once
/// the deliveries in flight are answered (a delivery cut off would hold its event's
/// claim until the lease ends, its redeliveries answered 409 meanwhile). Pass
/// [`shutdown_signal`] for Ctrl-C and SIGTERM, as `stripe-mirror serve` does.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> std::io::Result<()> {
/// use stripe_mirror::axum::{serve_with_shutdown, shutdown_signal};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
/// serve_with_shutdown(mirror, stripe_mirror::Webhooks::new(), listener, shutdown_signal()).await
/// # }
/// ```
pub async fn serve_with_shutdown(
    mirror: Mirror,
    webhooks: impl Into<Webhooks>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Through `tracing`, as the rest of the crate: a host's stdout may be its JSON log.
    // (`webhook_router` warns when no signing secret is set.)
    tracing::info!(
        "listening for Stripe webhooks on http://{}{WEBHOOK_PATH}",
        listener.local_addr()?
    );
    let read_timeout = mirror.config().webhook_read_timeout;
    let app: Router = webhook_router(mirror, webhooks);
    // hyper's own loop rather than `axum::serve`, which gives hyper no timer: a client
    // that opens connections and never ends a request's head would hold each open for
    // good (axum#2741). A head gets the body's read timeout, then the connection closes.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(read_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // As `axum::serve`: a connection reset before it was taken is nothing;
                // anything else (no file descriptor left) is said, then waited out.
                Err(error) if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                ) => continue,
                Err(error) => {
                    tracing::error!(%error, "a connection could not be accepted");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        // The peer's address for the delivery log, as `into_make_service_with_connect_info`:
        // put in each request, not layered onto a copy of the router per connection
        // (Stripe may open one per delivery).
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), request.map(axum::body::Body::new))
        });
        let connection =
            connections.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "a webhook connection ended in error");
            }
        });
    }
    // No new connection; those open finish the request in flight and close.
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM (a deploy, `docker stop`), for
/// [`serve_with_shutdown`]. Awaiting it takes those signals over for the process, so
/// a host with its own shutdown passes that instead.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("stopping: answering the deliveries in flight");
}

/// Reads the body up to the cap plus one byte (enough to know it is over) and stops
/// there, within the read timeout ([`Config::webhook_read_timeout`](crate::Config::webhook_read_timeout)), then hands the request
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
    let cap = state.mirror.config().webhook_body_limit;
    let mut body = Vec::new();
    let mut stream = request.into_body().into_data_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            // A broken stream ends the body: the signature check refuses what arrived.
            let Ok(chunk) = chunk else { break };
            // At most one byte over the cap is kept (a cap of `usize::MAX` included).
            let room = cap.saturating_add(1).saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() > cap {
                // Over the cap: the rest is never read (the connection is then closed).
                break;
            }
        }
    };
    let timed_out = tokio::time::timeout(state.mirror.config().webhook_read_timeout, read)
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

/// How a route's access is decided: which subscriber a request is for (your session,
/// cookie or auth: the crate does not know your users), and the [`Gate`] they must
/// pass. Keep the rule in your app's state; [`Access<R>`] takes it out with `FromRef`.
///
/// ```
/// use axum::http::request::Parts;
/// use stripe_mirror::access::{Gate, require_subscription};
/// use stripe_mirror::axum::AccessRule;
///
/// /// Starter or Pro subscribers; the user id comes from a header set by your auth.
/// #[derive(Clone)]
/// struct Members { products: Vec<String> }
///
/// impl<S: Send + Sync> AccessRule<S> for Members {
///     async fn subscriber(&self, parts: &mut Parts, _state: &S) -> Option<String> {
///         parts.headers.get("x-user-id")?.to_str().ok().map(str::to_owned)
///     }
///     fn gate(&self, subscriber: &str) -> Gate {
///         let products: Vec<&str> = self.products.iter().map(String::as_str).collect();
///         require_subscription(subscriber).to_products(&products)
///     }
/// }
/// ```
pub trait AccessRule<S>: Send + Sync {
    /// The subscriber this request is for, `None` when nobody is signed in.
    fn subscriber(
        &self,
        parts: &mut Parts,
        state: &S,
    ) -> impl std::future::Future<Output = Option<String>> + Send;

    /// The gate the subscriber must pass.
    fn gate(&self, subscriber: &str) -> Gate;

    /// The answer to a denied request. By default 402 Payment Required when paying
    /// would help (no subscription, past due, canceled) and 403 Forbidden otherwise,
    /// with the reason as JSON; return `Redirect::to("/pricing")` to send people to
    /// your pricing page instead.
    fn denied(&self, denial: &Denial) -> Response {
        deny(denial)
    }

    /// The answer when no subscriber is signed in: 401 by default.
    fn anonymous(&self) -> Response {
        (StatusCode::UNAUTHORIZED, "sign in first").into_response()
    }

    /// [`denied`](Self::denied), seeing the request: to send the user back where they
    /// were going once they have paid (`/pricing?next=/members`). Calls `denied` unless
    /// overridden.
    fn denied_to(&self, denial: &Denial, _parts: &Parts) -> Response {
        self.denied(denial)
    }

    /// [`anonymous`](Self::anonymous), seeing the request: to send the user back where
    /// they were going once signed in (`/login?next=/members`). Calls `anonymous`
    /// unless overridden.
    fn anonymous_to(&self, _parts: &Parts) -> Response {
        self.anonymous()
    }
}

/// The default answer to a denial: 402 Payment Required when paying would help (no
/// subscription, past due, canceled), else 403 Forbidden, with the reason as JSON
/// (`{"denied": "past_due", "reason": "..."}`).
pub fn deny(denial: &Denial) -> Response {
    let status = if denial.needs_payment() {
        StatusCode::PAYMENT_REQUIRED
    } else {
        StatusCode::FORBIDDEN
    };
    let body = serde_json::json!({ "denied": denial.code(), "reason": denial.to_string() });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Extractor protecting a route with the rule `R` from the app state: the handler runs
/// only for a subscriber who passes `R`'s gate, and receives the subscription that
/// granted access. Decided from the local database; a database failure is a 503.
///
/// ```no_run
/// use axum::{Router, extract::FromRef, routing::get};
/// use stripe_mirror::Mirror;
/// use stripe_mirror::axum::Access;
/// # use axum::http::request::Parts;
/// # use stripe_mirror::access::{Gate, require_subscription};
/// # #[derive(Clone)] struct Members;
/// # impl<S: Send + Sync> stripe_mirror::axum::AccessRule<S> for Members {
/// #     async fn subscriber(&self, _: &mut Parts, _: &S) -> Option<String> { None }
/// #     fn gate(&self, s: &str) -> Gate { require_subscription(s) }
/// # }
///
/// #[derive(Clone)]
/// struct AppState { mirror: Mirror, members: Members }
/// // Or `#[derive(FromRef)]` with axum's `macros` feature.
/// impl FromRef<AppState> for Mirror {
///     fn from_ref(state: &AppState) -> Mirror { state.mirror.clone() }
/// }
/// impl FromRef<AppState> for Members {
///     fn from_ref(state: &AppState) -> Members { state.members.clone() }
/// }
///
/// async fn members_only(access: Access<Members>) -> String {
///     format!("welcome, {} ({})", access.subscriber, access.subscription.id)
/// }
///
/// # fn app(state: AppState) -> Router {
/// Router::new().route("/members", get(members_only)).with_state(state)
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Access<R> {
    /// The subscriber who passed.
    pub subscriber: String,
    /// The subscription that granted access.
    pub subscription: Subscription,
    rule: PhantomData<fn() -> R>,
}

impl<S, R> FromRequestParts<S> for Access<R>
where
    S: Send + Sync,
    R: AccessRule<S> + FromRef<S>,
    Mirror: FromRef<S>,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let rule = R::from_ref(state);
        let Some(subscriber) = rule.subscriber(parts, state).await else {
            return Err(rule.anonymous_to(parts));
        };
        let mirror = Mirror::from_ref(state);
        match rule.gate(&subscriber).check(&mirror).await {
            Ok(Ok(subscription)) => Ok(Access {
                subscriber,
                subscription,
                rule: PhantomData,
            }),
            Ok(Err(denial)) => Err(rule.denied_to(&denial, parts)),
            // A gate built wrong (a price id for a product, an empty feature) is the
            // app's bug, not an outage: 500, not "try again".
            Err(err @ crate::Error::Config(_)) => {
                tracing::error!(error = %err, "the access gate is misconfigured");
                Err((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "access could not be checked",
                )
                    .into_response())
            }
            Err(err) => {
                tracing::error!(error = %err, "access check failed");
                Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "access could not be checked; try again",
                )
                    .into_response())
            }
        }
    }
}
