//! The handler registry: which handlers run for an event type, in which order, and
//! how they are run (a failure or a panic stops the run and fails the event).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;

use super::{Event, Failure, Outcome, signature};
use crate::Mirror;

/// What a handler returns on failure: any error.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

type BoxFuture = Pin<Box<dyn Future<Output = std::result::Result<(), HandlerError>> + Send>>;
type BoxHandler = Arc<dyn Fn(Event, Mirror) -> BoxFuture + Send + Sync>;

/// Default cap on a delivery's body (bytes): larger requests are answered 413.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// The handler registry and webhook settings. Cheap to clone.
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
    pub(crate) exact: HashMap<String, Vec<BoxHandler>>,
    /// `(prefix, handler)`: `customer.*` is stored as `customer.`, `*` as ``.
    pub(crate) wildcard: Vec<(String, BoxHandler)>,
    pub(crate) tolerance_secs: i64,
    pub(crate) body_limit: usize,
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
                    .map(|(p, _)| format!("{p}*"))
                    .collect::<Vec<_>>(),
            )
            .field("tolerance_secs", &self.inner.tolerance_secs)
            .field("body_limit", &self.inner.body_limit)
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
                tolerance_secs: signature::DEFAULT_TOLERANCE_SECS,
                body_limit: DEFAULT_BODY_LIMIT,
                refetch: Vec::new(),
            }),
        }
    }

    fn registry(&mut self) -> &mut Registry {
        Arc::make_mut(&mut self.inner)
    }

    /// Runs `handler` for events of type `pattern`: exact (`invoice.paid`), a family
    /// (`customer.*`, which includes `customer.subscription.updated`), or `*` for all.
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
            Some(prefix) => registry.wildcard.push((prefix.to_owned(), boxed)),
            None => registry
                .exact
                .entry(pattern.to_owned())
                .or_default()
                .push(boxed),
        }
        self
    }

    /// Runs `handler` for every event.
    pub fn on_any<H, F>(self, handler: H) -> Self
    where
        H: Fn(Event, Mirror) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        self.on("*", handler)
    }

    /// Largest accepted gap between the signed timestamp and now (0 disables the check).
    pub fn tolerance(mut self, tolerance: std::time::Duration) -> Self {
        self.registry().tolerance_secs = tolerance.as_secs() as i64;
        self
    }

    /// Largest body accepted and stored, in bytes.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.registry().body_limit = bytes;
        self
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

    /// The configured body cap.
    pub fn max_body(&self) -> usize {
        self.inner.body_limit
    }

    /// How many handlers would run for `event_type`.
    pub fn handler_count(&self, event_type: &str) -> usize {
        self.handlers_for(event_type).len()
    }

    /// Whether any handler listens to `event_type` (without cloning them).
    pub(crate) fn has_handlers(&self, event_type: &str) -> bool {
        self.inner.exact.contains_key(event_type)
            || self
                .inner
                .wildcard
                .iter()
                .any(|(p, _)| event_type.starts_with(p.as_str()))
    }

    fn handlers_for(&self, event_type: &str) -> Vec<BoxHandler> {
        let exact = self.inner.exact.get(event_type).into_iter().flatten();
        let wild = self
            .inner
            .wildcard
            .iter()
            .filter(|(p, _)| event_type.starts_with(p.as_str()))
            .map(|(_, h)| h);
        exact.chain(wild).cloned().collect()
    }

    /// Runs the handlers for `event` in order; stops at the first failure or panic.
    pub(crate) async fn run_handlers(
        &self,
        mirror: &Mirror,
        event: Event,
    ) -> std::result::Result<Outcome, Failure> {
        for handler in self.handlers_for(&event.event_type) {
            let (e, m) = (event.clone(), mirror.clone());
            let run = AssertUnwindSafe(async move { handler(e, m).await })
                .catch_unwind()
                .await;
            let error = match run {
                Ok(Ok(())) => continue,
                Ok(Err(err)) => format!("handler failed: {err}"),
                Err(panic) => format!("handler panicked: {}", panic_message(panic.as_ref())),
            };
            tracing::warn!(event = %event.id, event_type = %event.event_type, %error, "webhook handler failed");
            return Err(Failure::new(Outcome::HandlerFailed, error));
        }
        Ok(Outcome::Processed)
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}
