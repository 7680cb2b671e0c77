//! The handler registry: which handlers run for an event type, in which order, and
//! how they are run (a failure or a panic stops the run and fails the event).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use super::event::{HANDLER_OK, HandlerLog};
use super::{Event, Failure, Outcome};
use crate::Mirror;

/// What a handler returns on failure: any error.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

type BoxFuture = Pin<Box<dyn Future<Output = std::result::Result<(), HandlerError>> + Send>>;
type BoxHandler = Arc<dyn Fn(Event, Mirror) -> BoxFuture + Send + Sync>;

/// Default claim lease: see [`Config::webhook_claim_lease`](crate::Config::webhook_claim_lease).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);
/// Default handler timeout: see [`Config::webhook_handler_timeout`](crate::Config::webhook_handler_timeout).
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

/// Default cap on a delivery's body (bytes): larger requests are answered 413.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Default time the HTTP integration waits for a whole body: slower requests are
/// answered 408 ([`Outcome::Timeout`]).
pub const DEFAULT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The handler registry: which handlers run for which events. Cheap to clone. How
/// deliveries are handled (signing secrets, tolerance, body cap, read timeout, claim
/// lease, handler timeout) is set in one place, the [`Config`](crate::Config).
///
/// ```
/// use stripe_mirror::webhooks::{Event, HandlerError, Webhooks};
/// use stripe_mirror::Mirror;
///
/// async fn welcome(event: Event, _mirror: Mirror) -> Result<(), HandlerError> {
///     println!("new subscription {}", event.object()["id"]);
///     Ok(())
/// }
///
/// let webhooks = Webhooks::new()
///     .on("customer.subscription.created", welcome)
///     .on("customer.*", |event: Event, _m: Mirror| async move {
///         println!("{}", event.event_type);
///         Ok(())
///     })
///     .on_any(|_e: Event, _m: Mirror| async { Ok(()) });
/// assert_eq!(webhooks.handler_count("customer.subscription.created"), 3);
/// assert_eq!(webhooks.handler_count("invoice.paid"), 1);
/// ```
#[derive(Clone)]
#[must_use]
pub struct Webhooks {
    pub(crate) inner: Arc<Registry>,
}

#[derive(Clone)]
pub(crate) struct Registry {
    /// Handlers by exact type, each with its key (see [`Webhooks::on`]).
    pub(crate) exact: HashMap<String, Vec<(String, BoxHandler)>>,
    /// `(prefix, handler)`: `customer.*` is stored as `customer.`, `*` as ``.
    pub(crate) wildcard: Vec<(String, String, BoxHandler)>,
    /// Object kinds re-fetched from the API instead of trusting the payload.
    pub(crate) refetch: Vec<String>,
}

impl Default for Webhooks {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("exact", &self.inner.exact.keys().collect::<Vec<_>>())
            .field(
                "wildcard",
                &self
                    .inner
                    .wildcard
                    .iter()
                    .map(|(p, _, _)| format!("{p}*"))
                    .collect::<Vec<_>>(),
            )
            .field("refetch", &self.inner.refetch)
            .finish()
    }
}

pub(crate) fn matches_pattern(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

impl Webhooks {
    /// An empty registry: built-in sync only. Tolerance 300 s, body cap 1 MiB.
    pub fn new() -> Self {
        Webhooks {
            inner: Arc::new(Registry {
                exact: HashMap::new(),
                wildcard: Vec::new(),
                refetch: Vec::new(),
            }),
        }
    }

    fn registry(&mut self) -> &mut Registry {
        Arc::make_mut(&mut self.inner)
    }

    /// Runs `handler` for events of type `pattern`: exact (`invoice.paid`), a family
    /// (`customer.*`, which includes `customer.subscription.updated`), or `*` for all.
    ///
    /// The guarantee: each handler runs **at least once** per event, and **once it
    /// succeeds, never again** for that event. Which handlers succeeded is recorded per
    /// event under a key made of the pattern and the handler's rank among those
    /// registered with the same pattern (`customer.*#1`), so keep the registration
    /// order stable across deploys. A handler that fails, panics or outlives
    /// [`Config::webhook_handler_timeout`](crate::Config::webhook_handler_timeout) fails the event: the answer is 500,
    /// Stripe redelivers, and the redelivery (or [`process_events`](Self::process_events))
    /// runs only the handlers not yet succeeded. Handlers of one event run in order and
    /// stop at the first failure; the built-in sync has already applied when they run.
    #[track_caller]
    pub fn on<H, F>(mut self, pattern: &str, handler: H) -> Self
    where
        H: Fn(Event, Mirror) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        assert!(
            !pattern.is_empty() && !pattern[..pattern.len().saturating_sub(1)].contains('*'),
            "webhook pattern {pattern:?}: use an event type, a prefix ending in `*`, or `*`"
        );
        let boxed: BoxHandler = Arc::new(move |e, m| Box::pin(handler(e, m)));
        let registry = self.registry();
        match pattern.strip_suffix('*') {
            Some(prefix) => {
                let rank = 1 + registry
                    .wildcard
                    .iter()
                    .filter(|(p, _, _)| p == prefix)
                    .count();
                let key = format!("{pattern}#{rank}");
                registry.wildcard.push((prefix.to_owned(), key, boxed))
            }
            None => {
                let list = registry.exact.entry(pattern.to_owned()).or_default();
                let key = format!("{pattern}#{}", list.len() + 1);
                list.push((key, boxed))
            }
        }
        self
    }

    /// Handlers that also receive your app's state (a pool, a mailer, a channel), in
    /// the axum style, instead of capturing a clone in every closure.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use stripe_mirror::webhooks::{Event, Webhooks};
    /// use stripe_mirror::Mirror;
    ///
    /// #[derive(Clone, Default)]
    /// struct AppState { sent: Arc<Mutex<Vec<String>>> }
    ///
    /// let webhooks: Webhooks = Webhooks::new()
    ///     .with_state(AppState::default())
    ///     .on("customer.subscription.created", |e: Event, _m: Mirror, app: AppState| async move {
    ///         app.sent.lock().unwrap().push(format!("welcome mail for {}", e.object()["customer"]));
    ///         Ok(())
    ///     })
    ///     .into();
    /// assert_eq!(webhooks.handler_count("customer.subscription.created"), 1);
    /// ```
    pub fn with_state<S: Clone + Send + Sync + 'static>(self, state: S) -> WithState<S> {
        WithState {
            webhooks: self,
            state,
        }
    }

    /// Runs `handler` for every event.
    pub fn on_any<H, F>(self, handler: H) -> Self
    where
        H: Fn(Event, Mirror) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        self.on("*", handler)
    }

    /// For these object kinds (`customer`, `product`, `price`, `subscription`), the
    /// built-in sync re-fetches the object from the Stripe API and mirrors that (stamped
    /// with the fetch time) instead of trusting the event payload, as dj-stripe does.
    /// A failed fetch answers 500, so Stripe retries the delivery.
    pub fn refetch(mut self, kinds: &[&str]) -> Self {
        self.registry()
            .refetch
            .extend(kinds.iter().map(|k| k.to_string()));
        self
    }

    /// How many handlers would run for `event_type`.
    pub fn handler_count(&self, event_type: &str) -> usize {
        self.handlers_for(event_type).len()
    }

    /// The handlers for `event_type` with their keys, in the order they run.
    fn handlers_for(&self, event_type: &str) -> Vec<(String, BoxHandler)> {
        let exact = self
            .inner
            .exact
            .get(event_type)
            .into_iter()
            .flatten()
            .cloned();
        let wild = self
            .inner
            .wildcard
            .iter()
            .filter(|(p, _, _)| event_type.starts_with(p.as_str()))
            .map(|(_, k, h)| (k.clone(), h.clone()));
        exact.chain(wild).collect()
    }

    /// The keys of the handlers for `event_type`, in the order they run.
    pub(crate) fn handler_keys(&self, event_type: &str) -> Vec<String> {
        self.handlers_for(event_type)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// Runs the handlers for `event` whose entry in `log` is not `ok`, in order, and
    /// records each outcome in `log`; stops at the first failure, panic or timeout.
    /// All of them must end by `deadline` (the claim's lease, less a margin).
    pub(crate) async fn run_handlers(
        &self,
        mirror: &Mirror,
        event: &Event,
        log: &mut HandlerLog,
        deadline: tokio::time::Instant,
    ) -> std::result::Result<Outcome, Failure> {
        for (key, handler) in self.handlers_for(&event.event_type) {
            if log.get(&key).map(String::as_str) == Some(HANDLER_OK) {
                continue;
            }
            let (e, m) = (event.clone(), mirror.clone());
            let limit = mirror
                .config()
                .webhook_handler_timeout
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let run = tokio::time::timeout(
                limit,
                AssertUnwindSafe(async move { handler(e, m).await }).catch_unwind(),
            )
            .await;
            let error = match run {
                Ok(Ok(Ok(()))) => {
                    log.insert(key, HANDLER_OK.to_owned());
                    continue;
                }
                Ok(Ok(Err(err))) => format!("handler {key} failed: {err}"),
                Ok(Err(panic)) => {
                    format!("handler {key} panicked: {}", panic_message(panic.as_ref()))
                }
                Err(_) => format!("handler {key} timed out after {limit:?}"),
            };
            tracing::warn!(event = %event.id, event_type = %event.event_type, %error, "webhook handler failed");
            log.insert(key, error.clone());
            return Err(Failure::new(Outcome::HandlerFailed, error));
        }
        Ok(Outcome::Processed)
    }
}

/// A registry whose handlers receive the app's state `S` ([`Webhooks::with_state`]).
/// Turn it back into [`Webhooks`] with `.into()`; handlers registered before and after
/// keep their order and their keys.
#[derive(Clone)]
#[must_use]
pub struct WithState<S> {
    webhooks: Webhooks,
    state: S,
}

impl<S: Clone + Send + Sync + 'static> WithState<S> {
    /// [`Webhooks::on`], with the state as third argument.
    #[track_caller]
    pub fn on<H, F>(mut self, pattern: &str, handler: H) -> Self
    where
        H: Fn(Event, Mirror, S) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let state = self.state.clone();
        self.webhooks = self
            .webhooks
            .on(pattern, move |e, m| handler(e, m, state.clone()));
        self
    }

    /// [`Webhooks::on_any`], with the state as third argument.
    #[track_caller]
    pub fn on_any<H, F>(self, handler: H) -> Self
    where
        H: Fn(Event, Mirror, S) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        self.on("*", handler)
    }
}

impl<S> From<WithState<S>> for Webhooks {
    fn from(with: WithState<S>) -> Webhooks {
        with.webhooks
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}
