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
use crate::access::changes::{self, AccessChange, AccessHook};

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
    /// The host's [`Webhooks::on_access_change`] hook.
    pub(crate) access_hook: Option<AccessHook>,
    /// [`Webhooks::handle_other_mode`].
    pub(crate) other_mode: bool,
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
            .field("access_hook", &self.inner.access_hook.is_some())
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
    /// An empty registry: built-in sync only (the delivery settings, such as the
    /// signature's tolerance and the body cap, are in [`Config`](crate::Config)).
    pub fn new() -> Self {
        Webhooks {
            inner: Arc::new(Registry {
                exact: HashMap::new(),
                wildcard: Vec::new(),
                refetch: Vec::new(),
                access_hook: None,
                other_mode: false,
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
            !pattern.is_empty() && !pattern.strip_suffix('*').unwrap_or(pattern).contains('*'),
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

    /// Calls `hook` once for every subscriber whose access changed, with what it was
    /// last told and what holds now ([`AccessChange`]): valid or not, the subscription
    /// and its status, products, roles and Entitlements features. The access is
    /// computed from the mirror after each change is committed, so it is right
    /// whatever order the events came in: a subscription that arrived before its
    /// customer, or before Checkout linked the customer to your user, is told when
    /// the link is made. A change that does not touch access (an email update) calls
    /// nothing, and neither does a change of the other mode (a test-mode event reaching
    /// a live mirror): the gate reads the mirror's mode alone. Such a change stays
    /// marked for an app of that mode on the same database, whose
    /// [`deliver_access_changes`](Self::deliver_access_changes) tells it.
    ///
    /// Delivered at least once, and recorded like handlers: an event that changed a
    /// subscriber's access keeps an entry for it (`access:test:user-42`) in its handler
    /// log; a hook that fails, panics or times out fails the event (500), Stripe
    /// redelivers, and the redelivery (or [`process_events`](Self::process_events))
    /// tells it again. Changes made outside a webhook delivery (`sync_all`, the CLI,
    /// a product's roles) are told by [`deliver_access_changes`](Self::deliver_access_changes).
    /// One hook per registry: keep your table's update idempotent (set the plan, do not
    /// add to it).
    ///
    /// ```
    /// use stripe_mirror::{AccessChange, Mirror, Webhooks};
    ///
    /// let webhooks = Webhooks::new().on_access_change(|change: AccessChange, _m: Mirror| async move {
    ///     let plan = change.after.products.first().cloned().filter(|_| change.after.valid);
    ///     println!("{}: plan {plan:?}", change.subscriber); // UPDATE users SET plan = ... WHERE id = ...
    ///     Ok(())
    /// });
    /// # let _ = webhooks;
    /// ```
    #[track_caller]
    pub fn on_access_change<H, F>(mut self, hook: H) -> Self
    where
        H: Fn(AccessChange, Mirror) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let registry = self.registry();
        assert!(
            registry.access_hook.is_none(),
            "on_access_change: a registry has one access hook"
        );
        registry.access_hook = Some(changes::boxed(hook));
        self
    }

    /// Tells the access hook every change of the mirror's mode not told yet: those made
    /// outside webhook deliveries (`sync_all`, `Subscription::sync`, a Checkout success
    /// page, the CLI, a product's roles), and those whose telling failed. Call it after such syncs,
    /// at start-up, or on a timer; it is cheap when nothing is due. Each subscriber is
    /// told under its own claim, so several app instances may run it at once.
    pub async fn deliver_access_changes(&self, mirror: &Mirror) -> crate::Result<AccessReport> {
        let hook = self.inner.access_hook.clone().ok_or_else(|| {
            crate::Error::Config(
                "deliver_access_changes: no on_access_change hook is registered".into(),
            )
        })?;
        let mut report = AccessReport::default();
        // In subscriber order, each once per call (one that failed stays dirty).
        let mut after: Option<changes::Touched> = None;
        let live = mirror.live_mode();
        loop {
            let from = after.clone();
            let batch = mirror
                .db()
                .run(move |conn| changes::dirty(conn, live, from.as_ref(), 1000))
                .await?;
            let Some(last) = batch.last().cloned() else {
                return Ok(report);
            };
            after = Some(last);
            for touched in batch {
                match changes::tell(mirror, &hook, &touched, None).await {
                    Ok(true) => report.told += 1,
                    Ok(false) => report.unchanged += 1,
                    Err(error) => report.failed.push((touched.0, error)),
                }
            }
        }
    }

    /// Tells the access hook one subscriber's change not told yet, in the mirror's
    /// mode: for a page that has just synced that user (the Checkout success page,
    /// after [`sync_session`](crate::checkout::sync_session)), without waiting for
    /// [`deliver_access_changes`](Self::deliver_access_changes) to reach everyone.
    /// Nothing is told when nothing changed (`told` 0).
    ///
    /// ```no_run
    /// # async fn f(mirror: stripe_mirror::Mirror, webhooks: stripe_mirror::Webhooks) -> stripe_mirror::Result<()> {
    /// stripe_mirror::checkout::sync_session(&mirror, "cs_test_123").await?;
    /// webhooks.deliver_access_change(&mirror, "user-42").await?;
    /// # Ok(()) }
    /// ```
    pub async fn deliver_access_change(
        &self,
        mirror: &Mirror,
        subscriber_id: &str,
    ) -> crate::Result<AccessReport> {
        let hook = self.inner.access_hook.clone().ok_or_else(|| {
            crate::Error::Config(
                "deliver_access_change: no on_access_change hook is registered".into(),
            )
        })?;
        let mut report = AccessReport::default();
        let touched = (subscriber_id.to_owned(), mirror.live_mode());
        match changes::tell(mirror, &hook, &touched, None).await {
            Ok(true) => report.told += 1,
            Ok(false) => report.unchanged += 1,
            Err(error) => report.failed.push((touched.0, error)),
        }
        Ok(report)
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
    ///
    /// # Panics
    ///
    /// On a kind the mirror cannot fetch (a typo would otherwise re-fetch nothing,
    /// silently), as [`Webhooks::on`] does on a malformed pattern.
    #[track_caller]
    pub fn refetch(mut self, kinds: &[&str]) -> Self {
        for kind in kinds {
            let table = crate::models::table_for_kind(kind).filter(|t| t.api_path.is_some());
            let Some(table) = table else {
                panic!(
                    "refetch {kind:?}: not a kind the mirror fetches; use customer, product, \
                     price (or plan) or subscription"
                );
            };
            self.registry().refetch.push(table.kind.to_owned());
        }
        self
    }

    /// Whether the handlers also run for events of the other mode than the mirror's (a
    /// test-mode event reaching a live app). Off by default: an app given both
    /// endpoints' signing secrets (one URL registered in test and live mode) would
    /// otherwise fulfil test purchases in production. Such events are still verified,
    /// logged, stored and mirrored (as rows of their own mode); the access hook tells
    /// only the mirror's mode either way.
    pub fn handle_other_mode(mut self, yes: bool) -> Self {
        self.registry().other_mode = yes;
        self
    }

    /// The handlers that run for `event` in a mirror of mode `live`, with their keys.
    fn handlers_of(&self, event: &Event, live: bool) -> Vec<(String, BoxHandler)> {
        if event.livemode != live && !self.inner.other_mode {
            return Vec::new();
        }
        self.handlers_for(&event.event_type)
    }

    /// How many handlers would run for `event_type` (for an event of the mirror's mode,
    /// or of either with [`handle_other_mode`](Self::handle_other_mode)).
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

    /// The keys of the handlers that run for `event` in a mirror of mode `live`, in
    /// the order they run.
    pub(crate) fn handler_keys(&self, event: &Event, live: bool) -> Vec<String> {
        self.handlers_of(event, live)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// Runs the handlers for `event` whose entry in `log` is not `ok`, in order, and
    /// records each outcome in `log`; stops at the first failure, panic or timeout.
    /// Then tells the access changes due, whether or not a handler failed: the sync
    /// they follow is committed, and a user's access must not wait for a mail server.
    /// All of it must end by `deadline` (the claim's lease, less a margin).
    pub(crate) async fn run_handlers(
        &self,
        mirror: &Mirror,
        event: &Event,
        log: &mut HandlerLog,
        deadline: tokio::time::Instant,
    ) -> std::result::Result<Outcome, Failure> {
        let mut failed = None;
        for (key, handler) in self.handlers_of(event, mirror.live_mode()) {
            if log.get(&key).map(String::as_str) == Some(HANDLER_OK) {
                continue;
            }
            let (e, m) = (event.clone(), mirror.clone());
            let limit = mirror
                .config()
                .webhook_handler_timeout
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            // Called inside the guard: a handler that panics before it returns its
            // future is caught like one that panics while it runs.
            let handler = handler.clone();
            let (error, timed_out) = match guarded(async move { handler(e, m).await }, limit).await
            {
                Ok(()) => {
                    log.insert(key, HANDLER_OK.to_owned());
                    continue;
                }
                Err(stopped) => (format!("handler {key} {stopped}"), stopped.timed_out),
            };
            tracing::warn!(event = %event.id, event_type = %event.event_type, %error, "webhook handler failed");
            log.insert(key, error.clone());
            failed = Some(Failure {
                keep_claim: timed_out,
                ..Failure::new(Outcome::HandlerFailed, error)
            });
            break;
        }
        // The first failure is the answer, a handler's before the hook's.
        let answer = |failed: Option<Failure>, more: Option<String>| match (failed, more) {
            (Some(first), _) => Err(first),
            (None, Some(error)) => Err(Failure::new(Outcome::HandlerFailed, error)),
            (None, None) => Ok(Outcome::Processed),
        };
        // Then the subscribers whose access the event changed. Without the hook (the
        // CLI's registry) their entries stay pending for the host's.
        let Some(hook) = &self.inner.access_hook else {
            return answer(failed, None);
        };
        // This mode's subscribers only: another mode's (pending in the log since its app
        // failed to tell them) are that app's to tell, with its hook (`claim_and_sync`).
        let live = mirror.live_mode();
        let due: Vec<String> = log
            .iter()
            .filter(|(k, v)| {
                v.as_str() != HANDLER_OK && changes::from_log_key(k).is_some_and(|t| t.1 == live)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let touched = changes::from_log_key(&key).expect("an access key");
            if tokio::time::Instant::now() >= deadline {
                let error = format!("{key}: the event's claim ends before it could be told");
                log.insert(key, error.clone());
                return answer(failed, Some(error));
            }
            match changes::tell(mirror, hook, &touched, Some(deadline)).await {
                Ok(_) => {
                    log.insert(key, HANDLER_OK.to_owned());
                }
                Err(error) => {
                    log.insert(key, error.clone());
                    return answer(failed, Some(error));
                }
            }
        }
        answer(failed, None)
    }

    /// Whether an access hook is registered.
    pub(crate) fn has_access_hook(&self) -> bool {
        self.inner.access_hook.is_some()
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

    /// [`Webhooks::on_access_change`], with the state as third argument.
    #[track_caller]
    pub fn on_access_change<H, F>(mut self, hook: H) -> Self
    where
        H: Fn(AccessChange, Mirror, S) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let state = self.state.clone();
        self.webhooks = self
            .webhooks
            .on_access_change(move |c, m| hook(c, m, state.clone()));
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

    /// [`Webhooks::refetch`].
    #[track_caller]
    pub fn refetch(mut self, kinds: &[&str]) -> Self {
        self.webhooks = self.webhooks.refetch(kinds);
        self
    }

    /// [`Webhooks::handle_other_mode`].
    pub fn handle_other_mode(mut self, yes: bool) -> Self {
        self.webhooks = self.webhooks.handle_other_mode(yes);
        self
    }
}

impl<S> From<WithState<S>> for Webhooks {
    fn from(with: WithState<S>) -> Webhooks {
        with.webhooks
    }
}

/// What [`Webhooks::deliver_access_changes`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccessReport {
    /// Subscribers whose change was told to the hook.
    pub told: usize,
    /// Subscribers marked whose access had not changed after all (nothing told).
    pub unchanged: usize,
    /// Subscribers whose hook failed, with the error: they stay due.
    pub failed: Vec<(String, String)>,
}

/// Runs a handler or hook within `limit`, turning an error, a panic or the timeout
/// into a message ("failed: ...", "panicked: ...", "timed out after ...").
pub(crate) async fn guarded<F>(run: F, limit: Duration) -> std::result::Result<(), Stopped>
where
    F: Future<Output = std::result::Result<(), HandlerError>> + Send,
{
    let (message, timed_out) =
        match tokio::time::timeout(limit, AssertUnwindSafe(run).catch_unwind()).await {
            Ok(Ok(Ok(()))) => return Ok(()),
            Ok(Ok(Err(err))) => (format!("failed: {err}"), false),
            Ok(Err(panic)) => (
                format!("panicked: {}", panic_message(panic.as_ref())),
                false,
            ),
            Err(_) => (format!("timed out after {limit:?}"), true),
        };
    Err(Stopped { message, timed_out })
}

/// How a [`guarded`] run ended without success.
pub(crate) struct Stopped {
    /// What happened, for the handler log.
    pub message: String,
    /// Cut off at its time limit (it may still be at work on another thread), as
    /// opposed to failed or panicked: told by the type, never by the message's text.
    pub timed_out: bool,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refetch_takes_only_the_kinds_the_mirror_fetches() {
        let webhooks = Webhooks::new().refetch(&["customers", "plan", "subscription"]);
        assert_eq!(
            webhooks.inner.refetch,
            ["customer", "price", "subscription"]
        );
        // A typo would otherwise re-fetch nothing, silently.
        for typo in ["Subscription", "invoice", "subscription_item", ""] {
            let refused = std::panic::catch_unwind(|| Webhooks::new().refetch(&[typo]));
            let message = panic_message(refused.expect_err(typo).as_ref());
            assert!(
                message.contains("not a kind the mirror fetches"),
                "{message}"
            );
        }
    }
}
