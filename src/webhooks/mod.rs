//! Webhooks: Stripe pushes events, the mirror stays true, and the host app reacts.
//!
//! [`Webhooks`] is a handler registry that reads like a route table, and
//! [`Webhooks::receive`] is the whole pipeline for one request:
//!
//! 1. log the delivery ([`delivery`]), whatever it holds;
//! 2. verify `Stripe-Signature` ([`signature`]);
//! 3. store the event once and claim it ([`event`]), and in the same transaction
//!    apply the built-in sync ([`builtin`](self)) through the stale-write guard;
//! 4. run the handlers: exact matches, then wildcards, each in registration order;
//! 5. answer: 2xx done or duplicate, 4xx bad input, 5xx so that Stripe retries.

mod builtin;
pub mod delivery;
pub mod event;
pub mod signature;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;

pub use delivery::{Delivery, Outcome};
pub use event::Event;
pub use signature::SignatureError;

use crate::Mirror;
use crate::error::{Error, Result};
use crate::sync::now;
use event::Claim;

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
    inner: Arc<Registry>,
}

#[derive(Clone)]
struct Registry {
    exact: HashMap<String, Vec<BoxHandler>>,
    /// `(prefix, handler)`: `customer.*` is stored as `customer.`, `*` as ``.
    wildcard: Vec<(String, BoxHandler)>,
    tolerance_secs: i64,
    body_limit: usize,
    /// Object kinds re-fetched from the API instead of trusting the payload.
    refetch: Vec<String>,
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

/// A webhook request, framework-agnostic: headers, the raw body, the peer address.
#[derive(Clone, Debug, Default)]
pub struct WebhookRequest {
    /// Header names and values (names in any case).
    pub headers: Vec<(String, String)>,
    /// The raw body, exactly as received.
    pub body: Vec<u8>,
    /// The full body size when `body` was cut short by the transport (else `body.len()`).
    pub body_size: Option<usize>,
    /// The peer's address, for the log.
    pub remote_addr: Option<String>,
}

impl WebhookRequest {
    /// A request with this body and no headers.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        WebhookRequest {
            body: body.into(),
            ..Default::default()
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the peer address.
    pub fn remote_addr(mut self, addr: impl Into<String>) -> Self {
        self.remote_addr = Some(addr.into());
        self
    }
}

/// The answer to a webhook request.
#[derive(Clone, Debug)]
pub struct WebhookResponse {
    /// HTTP status: 200, 400, 409, 413, 500 or 503.
    pub status: u16,
    /// What happened.
    pub outcome: Outcome,
    /// The event id, once read.
    pub event_id: Option<String>,
    /// The error, for the body and the log.
    pub error: Option<String>,
}

impl WebhookResponse {
    /// A small JSON body for the HTTP response.
    pub fn body(&self) -> String {
        serde_json::json!({ "outcome": self.outcome.as_str(), "event": self.event_id, "error": self.error }).to_string()
    }
}

/// Which stored events [`Webhooks::process_events`] re-runs.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Events whose processing failed.
    pub failed: bool,
    /// These event ids, whatever their status.
    pub ids: Vec<String>,
    /// Events whose type matches (`customer.*`, `invoice.paid`), among failed or pending ones.
    pub event_type: Option<String>,
}

/// What [`Webhooks::process_events`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessReport {
    /// Events that ran through without error.
    pub processed: usize,
    /// Events that failed again, with their errors.
    pub failed: Vec<(String, String)>,
    /// Events skipped because another worker held them.
    pub busy: usize,
}

/// How a pipeline step failed, and what to answer.
struct Failure {
    outcome: Outcome,
    status: u16,
    error: String,
}

impl Failure {
    fn new(outcome: Outcome, error: impl ToString) -> Self {
        Failure {
            outcome,
            status: outcome.status(),
            error: error.to_string(),
        }
    }

    /// A crate error: bad object shapes are 400; the database being unreachable is 503.
    fn from_error(err: Error) -> Self {
        match &err {
            Error::Mapping { .. } => Failure::new(Outcome::InvalidObject, err),
            _ if is_unavailable(&err) => Failure {
                outcome: Outcome::Error,
                status: 503,
                error: err.to_string(),
            },
            _ => Failure::new(Outcome::Error, err),
        }
    }
}

fn is_unavailable(err: &Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as D};
    matches!(
        err,
        Error::Unavailable(_)
            | Error::Database(D::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _
            ))
    )
}

fn matches_pattern(pattern: &str, event_type: &str) -> bool {
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

    /// Handles one webhook request from start to answer. Never panics on any input.
    ///
    /// Two database round trips on the blocking pool: one logs the delivery and, for a
    /// valid event, stores, claims and syncs it in one transaction; the other records
    /// the outcome after the handlers ran.
    pub async fn receive(&self, mirror: &Mirror, request: WebhookRequest) -> WebhookResponse {
        let body_size = request.body_size.unwrap_or(0).max(request.body.len());
        let mut body = request.body;
        body.truncate(self.inner.body_limit);
        let checked = self.check(mirror, &request.headers, &body, body_size);
        let valid = checked.is_ok();
        let event_id = checked.as_ref().ok().map(|e| e.id.clone());
        let (headers, remote) = (request.headers, request.remote_addr);
        // With re-fetching, the API call sits between logging and claiming (never
        // inside a transaction), so those become two round trips.
        let refetch = checked.as_ref().ok().and_then(|e| self.refetch_target(e));
        let (checked, deferred) = match (checked, refetch.is_some()) {
            (Ok(event), true) => (Err(None), Some(event)),
            (checked, _) => (checked.map_err(Some), None),
        };

        let first = mirror
            .db()
            .run(move |conn| {
                let delivery_id =
                    delivery::log(conn, remote.as_deref(), &headers, &body, body_size, valid)?;
                let claim = match checked {
                    Err(failure) => Err(failure),
                    Ok(event) => claim_and_sync(conn, &event, false)
                        .map(|claim| (event, claim))
                        .map_err(|e| Some(Failure::from_error(e))),
                };
                Ok((delivery_id, claim))
            })
            .await;
        let (delivery_id, claim) = match first {
            Ok(step) => step,
            Err(err) => {
                tracing::error!(error = %err, "webhook delivery could not be logged");
                return respond(event_id, Err(Failure::from_error(err)));
            }
        };
        let claim = match (claim, deferred, refetch) {
            (Err(None), Some(mut event), Some(path)) => match self.fetch(mirror, &path).await {
                Ok(fetched) => {
                    event.refetched = Some(fetched);
                    mirror
                        .db()
                        .run(move |conn| {
                            claim_and_sync(conn, &event, false).map(|claim| (event, claim))
                        })
                        .await
                        .map_err(Failure::from_error)
                }
                Err(err) => Err(Failure::from_error(err)),
            },
            (Err(Some(failure)), _, _) => Err(failure),
            (Ok(claimed), _, _) => Ok(claimed),
            (Err(None), _, _) => Err(Failure::new(
                Outcome::Error,
                "internal: deferred event lost",
            )),
        };

        let (claimed, result) = match claim {
            Ok((event, Claim::Claimed { .. })) => (true, self.run_handlers(mirror, event).await),
            Ok((_, Claim::Done)) => (false, Ok(Outcome::Duplicate)),
            Ok((_, Claim::Busy)) => (
                false,
                Err(Failure::new(
                    Outcome::InProgress,
                    "another worker is processing this event",
                )),
            ),
            Err(failure) => (false, Err(failure)),
        };
        let id = event_id.clone();
        let (outcome, error) = match &result {
            Ok(outcome) => (*outcome, None),
            Err(f) => (f.outcome, Some(f.error.clone())),
        };
        let recorded = mirror
            .db()
            .run(move |conn| {
                if claimed && let Some(id) = &id {
                    event::finish(conn, id, error.as_deref())?;
                }
                delivery::finish(
                    conn,
                    delivery_id,
                    valid,
                    id.as_deref(),
                    outcome,
                    error.as_deref(),
                )
            })
            .await;
        match recorded {
            Ok(()) => respond(event_id, result),
            Err(err) => {
                // The handlers ran but their outcome is not recorded: let Stripe retry.
                tracing::error!(error = %err, delivery = delivery_id, "webhook outcome could not be recorded");
                respond(event_id, Err(Failure::from_error(err)))
            }
        }
    }

    /// The API path of the event's object, when its kind is re-fetched.
    fn refetch_target(&self, event: &Event) -> Option<String> {
        let table = builtin::table_for(event)?;
        let id = event.object().get("id")?.as_str()?;
        let wanted = self
            .inner
            .refetch
            .iter()
            .any(|k| k == table.kind || (table.kind == "price" && k == "plan"));
        wanted.then(|| format!("{}/{id}", crate::sync::remote::api_path(table)))
    }

    async fn fetch(&self, mirror: &Mirror, path: &str) -> Result<(serde_json::Value, i64)> {
        let stamp = now();
        let value = mirror
            .stripe()
            .await?
            .get(path, &serde_json::json!({}), Some(path))
            .await?;
        Ok((value, stamp))
    }

    /// Size, signature and shape: everything decided without the database.
    fn check(
        &self,
        mirror: &Mirror,
        headers: &[(String, String)],
        body: &[u8],
        body_size: usize,
    ) -> std::result::Result<Event, Failure> {
        if body_size > self.inner.body_limit {
            return Err(Failure::new(
                Outcome::TooLarge,
                format!(
                    "body of {body_size} bytes is over the {} byte limit",
                    self.inner.body_limit
                ),
            ));
        }
        let header = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("stripe-signature"))
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| {
                Failure::new(Outcome::InvalidSignature, SignatureError::MissingHeader)
            })?;
        signature::verify(
            header,
            body,
            &mirror.config().webhook_secrets,
            self.inner.tolerance_secs,
            now(),
        )
        .map_err(|e| match e {
            // Our configuration, not the request, is wrong: 500 so Stripe keeps retrying.
            SignatureError::NoSecret => Failure::new(Outcome::Error, e),
            _ => Failure::new(Outcome::InvalidSignature, e),
        })?;
        let text = std::str::from_utf8(body)
            .map_err(|e| Failure::new(Outcome::Malformed, format!("body is not UTF-8: {e}")))?;
        let raw = serde_json::from_str(text)
            .map_err(|e| Failure::new(Outcome::Malformed, format!("body is not JSON: {e}")))?;
        Event::from_json(raw).map_err(|e| Failure::new(Outcome::Malformed, e))
    }

    /// Runs the handlers for `event` in order; stops at the first failure or panic.
    async fn run_handlers(
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

    /// Re-runs stored events: the failed ones, given ids (whatever their status), or
    /// those of a type (`customer.*`). The built-in sync never runs twice for an event;
    /// handlers run again.
    pub async fn process_events(
        &self,
        mirror: &Mirror,
        filter: &EventFilter,
    ) -> Result<ProcessReport> {
        let f = filter.clone();
        let events: Vec<Event> = mirror
            .db()
            .run(move |conn| {
                use crate::db::schema::stripe_events as ev;
                use diesel::prelude::*;
                let rows: Vec<event::EventRow> = crate::db::on_conn!(conn, c => {
                    let mut q = ev::table.select(event::EventRow::as_select()).order((ev::created.asc(), ev::id.asc())).into_boxed();
                    if !f.ids.is_empty() {
                        q = q.filter(ev::id.eq_any(f.ids.clone()));
                    }
                    if f.failed {
                        q = q.filter(ev::status.eq(event::status::FAILED));
                    }
                    q.load(c)
                })?;
                rows.into_iter()
                    .map(event::EventRow::into_event)
                    .filter(|e| e.as_ref().map_or(true, |e| f.event_type.as_deref().is_none_or(|p| matches_pattern(p, &e.event_type))))
                    .collect()
            })
            .await?;
        // Only an explicit choice of events replays processed ones.
        let force = !filter.ids.is_empty() || (filter.event_type.is_some() && !filter.failed);
        if filter.ids.is_empty() && filter.event_type.is_none() && !filter.failed {
            return Ok(ProcessReport::default());
        }
        let mut report = ProcessReport::default();
        for event in events {
            let e = event.clone();
            let claim = match mirror
                .db()
                .run(move |conn| claim_and_sync(conn, &e, force))
                .await
            {
                Ok(claim) => claim,
                // The object cannot be mirrored: the event stays failed, the replay goes on.
                Err(err @ Error::Mapping { .. }) => {
                    report.failed.push((event.id, err.to_string()));
                    continue;
                }
                Err(err) => return Err(err),
            };
            if !matches!(claim, Claim::Claimed { .. }) {
                report.busy += usize::from(matches!(claim, Claim::Busy));
                continue;
            }
            let result = self.run_handlers(mirror, event.clone()).await;
            let error = result.as_ref().err().map(|f| f.error.clone());
            let id = event.id.clone();
            let err = error.clone();
            mirror
                .db()
                .run(move |conn| event::finish(conn, &id, err.as_deref()))
                .await?;
            match error {
                None => report.processed += 1,
                Some(error) => report.failed.push((event.id, error)),
            }
        }
        Ok(report)
    }
}

/// Stores and claims the event and, when it is ours and not yet synced, applies the
/// built-in sync, all in one transaction. A bad object shape rolls the sync back and
/// stores the event as failed, so a later replay can retry it.
fn claim_and_sync(conn: &mut crate::db::Conn<'_>, event: &Event, force: bool) -> Result<Claim> {
    let attempt = conn.write(|c| {
        let claim = event::insert_and_claim(c, event, force)?;
        if let Claim::Claimed { synced: false, .. } = claim {
            builtin::apply(c, event)?;
            event::mark_synced(c, &event.id)?;
        }
        Ok(claim)
    });
    match attempt {
        Ok(claim) => Ok(claim),
        Err(err @ Error::Mapping { .. }) => {
            let message = err.to_string();
            conn.write(|c| {
                event::insert_and_claim(c, event, true)?;
                event::finish(c, &event.id, Some(&message))
            })?;
            Err(err)
        }
        Err(err) => Err(err),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}

fn respond(
    event_id: Option<String>,
    result: std::result::Result<Outcome, Failure>,
) -> WebhookResponse {
    match result {
        Ok(outcome) => WebhookResponse {
            status: outcome.status(),
            outcome,
            event_id,
            error: None,
        },
        Err(f) => WebhookResponse {
            status: f.status,
            outcome: f.outcome,
            event_id,
            error: Some(f.error),
        },
    }
}
