//! One webhook request from bytes to answer: checks, the delivery log, the claim with
//! the built-in sync, the handlers, the outcome.

use std::sync::Arc;

use super::event::{self, Claim, HandlerLog, Refetched};
use super::{Event, Outcome, SignatureError, Webhooks, builtin, delivery, signature};
use crate::Mirror;
use crate::error::{Error, Result};
use crate::sync::MirrorTable;
use crate::sync::upsert::Written;

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
    /// The transport gave up waiting for the body (its read timeout): `body` is what
    /// arrived; the request is logged and answered 408 ([`Outcome::Timeout`]).
    pub timed_out: bool,
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
    /// HTTP status: 200, 400, 408, 409, 413, 500 or 503.
    pub status: u16,
    /// What happened.
    pub outcome: Outcome,
    /// The event id, once read.
    pub event_id: Option<String>,
    /// The whole error, for the host's log (it may hold database or handler text; the
    /// same is stored in the delivery's `error` column). Never send it to the client:
    /// [`public_error`](Self::public_error) and [`body`](Self::body) are for that.
    pub error: Option<String>,
}

impl WebhookResponse {
    /// The error as told to the client. What was wrong with the request (signature,
    /// body, size, read timeout, object shape) is said as it is; our own failures
    /// (a query, the database, our configuration, a handler) are a short public
    /// message, their detail staying in the delivery log and the tracing log.
    pub fn public_error(&self) -> Option<String> {
        let error = self.error.as_ref()?;
        Some(match self.outcome {
            Outcome::Error => {
                "internal error; the delivery is logged and Stripe will retry".to_owned()
            }
            Outcome::Unavailable => "database unavailable; Stripe will retry".to_owned(),
            Outcome::HandlerFailed => {
                "a handler failed; the delivery is logged and Stripe will retry".to_owned()
            }
            _ => error.clone(),
        })
    }

    /// A small JSON body for the HTTP response, with [`public_error`](Self::public_error).
    pub fn body(&self) -> String {
        let body = serde_json::json!({ "outcome": self.outcome.as_str(), "event": self.event_id, "error": self.public_error() });
        // Straight into a buffer, not through `fmt`; a `Value` always serializes.
        serde_json::to_string(&body).unwrap_or_default()
    }
}

/// How a pipeline step failed, and what to answer.
#[derive(Clone)]
pub(crate) struct Failure {
    pub(crate) outcome: Outcome,
    pub(crate) error: String,
    /// A handler was cut off by its timeout and may still be at work on another
    /// thread: the event's claim is kept until its lease ends, so no redelivery or
    /// replay runs the handler again meanwhile.
    pub(crate) keep_claim: bool,
}

impl Failure {
    pub(crate) fn new(outcome: Outcome, error: impl ToString) -> Self {
        Failure {
            outcome,
            error: error.to_string(),
            keep_claim: false,
        }
    }

    /// A crate error: bad object shapes are 400; the database being unreachable, or a
    /// write that kept losing to concurrent ones (deadlocks, lock waits), is 503.
    pub(crate) fn from_error(err: Error) -> Self {
        match &err {
            Error::Mapping { .. } => Failure::new(Outcome::InvalidObject, err),
            _ if is_unavailable(&err) || err.is_conflict() => {
                Failure::new(Outcome::Unavailable, err)
            }
            _ => Failure::new(Outcome::Error, err),
        }
    }
}

fn is_unavailable(err: &Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as D};
    matches!(
        err,
        Error::Unavailable { .. }
            | Error::Commit { .. }
            | Error::Database(D::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _
            ))
    )
}

/// Where a request stands after a database round trip.
enum Step {
    /// Decided, and the delivery's outcome recorded: answer this.
    Answer(std::result::Result<Outcome, Failure>),
    /// Stored, claimed and synced: the due handlers run next, then the outcome is recorded.
    /// Shared with the write's retries until it is done ([`owned`]).
    Handlers(Arc<Event>, Work),
    /// Verified and logged; its object is re-fetched from the API before claiming.
    Refetch(Arc<Event>, (&'static MirrorTable, String)),
}

impl Step {
    /// What the delivery row says once this step is written: its outcome, or
    /// `Received` while handlers (or a re-fetch) are still to come.
    fn logged(&self) -> (Outcome, Option<std::borrow::Cow<'_, str>>) {
        match self {
            Step::Answer(Ok(outcome)) => (*outcome, None),
            Step::Answer(Err(f)) => (f.outcome, Some(f.error.as_str().into())),
            // Only a follow-up fetch is left: the event is done here (processed, or
            // failed for handlers registered elsewhere).
            Step::Handlers(_, work) if !work.due => match elsewhere(work) {
                Some(f) => (f.outcome, Some(f.error.into())),
                None => (Outcome::Processed, None),
            },
            Step::Handlers(..) | Step::Refetch(..) => (Outcome::Received, None),
        }
    }
}

/// A claimed event's remaining work.
pub(crate) struct Work {
    /// The claim's token, checked when finishing.
    pub(crate) token: i32,
    /// Which handlers succeeded so far; this registry's handlers are in it.
    pub(crate) handlers: HandlerLog,
    /// Some of this registry's handlers have not succeeded yet.
    pub(crate) due: bool,
    /// The event is recent enough that handlers registered elsewhere, not yet
    /// succeeded, fail this delivery ([`ELSEWHERE_WINDOW_SECS`]).
    pub(crate) recent: bool,
    /// An object to re-fetch once the claim is committed: the event's own when its
    /// sync met a same-second tie nothing settled, or the subscription a completed
    /// Checkout created.
    pub(crate) follow_up: Option<(&'static MirrorTable, String)>,
    /// When the claim's lease ends, measured from just before it was taken: every
    /// handler must be done before then, or another worker may take the event over.
    pub(crate) lease_ends: tokio::time::Instant,
    /// The registry has an access hook: the subscribers whose access the event (or
    /// its follow-up) changed are told before the event is finished.
    pub(crate) access: bool,
}

/// What storing and claiming an event came to.
pub(crate) enum Progress {
    /// Claimed and synced (and finished, when no handler was due).
    Claimed(Work),
    /// Already processed.
    Done,
    /// Another worker holds it.
    Busy,
}

impl Webhooks {
    /// Handles one webhook request from start to answer. Never panics on any input.
    ///
    /// One transaction logs the delivery and, for a valid event, stores, claims and
    /// syncs it; when no handler is due, or the request is refused, its outcome is
    /// recorded in it too: one commit per event. Deliveries arriving at the same time
    /// share that transaction (group commit) and each is answered only after it
    /// commits. Handlers add a second transaction to record their outcome; `refetch`
    /// (or a same-second tie the events cannot settle, with an API key at hand) adds
    /// an API call and a transaction.
    pub async fn receive(&self, mirror: &Mirror, mut request: WebhookRequest) -> WebhookResponse {
        let body_size = request.body_size.unwrap_or(0).max(request.body.len());
        let mut body = std::mem::take(&mut request.body);
        body.truncate(mirror.config().webhook_body_limit);
        // Shared by the write's tries, not copied for each (a copy and its drop were a
        // twentieth of a delivery's CPU).
        let checked = self.check(mirror, &request, &body, body_size).map(Arc::new);
        if checked.is_err() {
            // Unauthenticated bytes: keep enough to see what was sent, not to fill the log.
            body.truncate(delivery::REFUSED_BODY_LOG_LIMIT);
        }
        let event_id = checked.as_ref().ok().map(|e| e.id.clone());
        let refetch = checked
            .as_ref()
            .ok()
            .and_then(|e| self.refetch_target(mirror, e));
        let this = self.clone();
        let (t, lease, live) = (mirror.now(), lease_secs(mirror), mirror.live_mode());
        let (headers, remote) = (request.headers, request.remote_addr);
        // Group commit: deliveries arriving together share one transaction, and none is
        // answered before that transaction commits. The delivery is logged once, with its
        // outcome when it is already known (one row written, not a row and an update; on
        // Postgres the claim's statement writes it, updated only when the claim ends
        // otherwise than presumed: [`delivery::Ride`]).
        let valid = checked.is_ok();
        let (headers, body) = (Arc::new(headers), Arc::new(body));
        let first = mirror
            .db()
            .write_retrying(event_id.as_deref().unwrap_or(""), || {
                let (checked, refetch, this) = (checked.clone(), refetch.clone(), this.clone());
                let (headers, body, remote) = (headers.clone(), body.clone(), remote.clone());
                let logged_id = event_id.clone();
                move |conn: &mut crate::db::Conn<'_>| {
                    let mut ride = None;
                    let step = match (checked, refetch) {
                        (Err(failure), _) => Step::Answer(Err(failure)),
                        // A redelivery of a processed event is a duplicate, answered
                        // without asking Stripe (which may be down or rate limiting).
                        (Ok(event), Some(_)) if event::is_processed(conn, &event.id)? => {
                            Step::Answer(Ok(Outcome::Duplicate))
                        }
                        // The API call must not sit inside a transaction: claim after it.
                        (Ok(event), Some(target)) => Step::Refetch(event, target),
                        (Ok(event), None) => {
                            let (addr, id) = (remote.as_deref(), &event.id);
                            ride = delivery::Ride::on(conn, addr, &headers, body_size, id);
                            this.claim(conn, event, (t, lease, live), ride.as_mut())?
                        }
                    };
                    let (outcome, error) = step.logged();
                    // A verified event's body is stored once, as its event's `data`; kept
                    // here only while no event row holds it (a re-fetch to come, our failure).
                    let stored = valid
                        && match &step {
                            Step::Refetch(..) => false,
                            Step::Answer(Err(f)) => {
                                !matches!(f.outcome, Outcome::Error | Outcome::Unavailable)
                            }
                            _ => true,
                        };
                    let entry = delivery::Entry {
                        remote_addr: remote.as_deref(),
                        headers: &headers,
                        body: if stored { &[] } else { &body },
                        body_size,
                        valid,
                        event_id: logged_id.as_deref(),
                        outcome,
                        error: error.as_deref(),
                    };
                    // Written with the claim (Postgres), else now.
                    let id = match delivery::Ride::logged(ride.as_ref(), conn, &entry)? {
                        Some(id) => id,
                        None => delivery::log(conn, &entry)?,
                    };
                    Ok((id, step))
                }
            })
            .await;
        // The tries are over: the step's event is ours alone again.
        drop(checked);
        let (delivery_id, mut step) = match first {
            Ok(first) => first,
            Err(err) => {
                tracing::error!(error = %err, "webhook delivery failed; nothing of it is stored");
                let failure = Failure::from_error(err);
                // The group rolled back, the delivery's row with it: logged again on its
                // own, with what failed.
                let (outcome, error) = (failure.outcome, failure.error.clone());
                let logged_id = event_id.clone();
                record_failed(mirror, outcome, move |conn| {
                    let entry = delivery::Entry {
                        remote_addr: remote.as_deref(),
                        headers: &headers,
                        body: &body,
                        body_size,
                        valid,
                        event_id: logged_id.as_deref(),
                        outcome,
                        error: Some(&error),
                    };
                    delivery::log(conn, &entry).map(drop)
                })
                .await;
                return respond(event_id, Err(failure));
            }
        };
        if let Step::Refetch(event, target) = step {
            let fetched = self.fetch(mirror, &target).await;
            let (this, t) = (self.clone(), mirror.now());
            let fetched = fetched.map_err(Failure::from_error);
            let refetched = mirror
                .db()
                .write_retrying(&event.id, || {
                    let (event, fetched, this) = (event.clone(), fetched.clone(), this.clone());
                    move |conn: &mut crate::db::Conn<'_>| {
                        let id = event.id.clone();
                        let step = match fetched {
                            Ok(fetched) => {
                                let mut event = owned(event);
                                event.refetched = Some(fetched);
                                this.claim(conn, Arc::new(event), (t, lease, live), None)?
                            }
                            // Stripe could not be asked: 5xx so it redelivers.
                            Err(failure) => Step::Answer(Err(failure)),
                        };
                        let (outcome, error) = step.logged();
                        if outcome != Outcome::Received {
                            let error = error.as_deref();
                            delivery::finish(conn, delivery_id, true, Some(&id), outcome, error)?;
                        }
                        Ok(step)
                    }
                })
                .await;
            step = match refetched {
                Ok(step) => step,
                Err(err) => {
                    // Rolled back: the delivery row (logged before the fetch) gets the failure.
                    let failure = Failure::from_error(err);
                    let (outcome, error, id) =
                        (failure.outcome, failure.error.clone(), event.id.clone());
                    record_failed(mirror, outcome, move |conn| {
                        delivery::finish(conn, delivery_id, true, Some(&id), outcome, Some(&error))
                    })
                    .await;
                    Step::Answer(Err(failure))
                }
            };
        }
        let (event, mut work) = match step {
            // The handlers see this claim's count, the first one 1.
            Step::Handlers(event, work) => (
                Event {
                    attempts: work.token,
                    ..owned(event)
                },
                work,
            ),
            Step::Answer(result) => return respond(event_id, result),
            Step::Refetch(..) => unreachable!("re-fetched above"),
        };
        let mut fetched = Ok(());
        if let Some((table, id)) = work.follow_up.clone() {
            fetched = follow_up(mirror, &event, &mut work, table, &id).await;
        }
        if !work.due {
            let done = elsewhere(&work).map_or(Ok(Outcome::Processed), Err);
            return respond(event_id, done);
        }
        // A re-fetch that did not land fails the event (503: Stripe could not be asked)
        // so that Stripe redelivers it and the mirror gets the whole, newer version. The
        // handlers and the access hook wait for that redelivery: run now, they would
        // see an undecided tie or the first page of a list, and be recorded done.
        let result = match fetched {
            Ok(()) => self.run_due(mirror, &event, &mut work).await,
            Err(e) => Err(Failure::new(Outcome::Unavailable, e)),
        };
        // Ours all done, another registry's still due: as in `claim`.
        let result = match (result, elsewhere(&work)) {
            (Ok(_), Some(failure)) => Err(failure),
            (result, _) => result,
        };
        let (outcome, error, keep_claim) = match &result {
            Ok(outcome) => (*outcome, None, false),
            Err(f) => (f.outcome, Some(f.error.clone()), f.keep_claim),
        };
        let id = event.id.clone();
        // Both records in one transaction, shared with other deliveries finishing now.
        let handlers = work.handlers.clone();
        let token = work.token;
        let recorded = mirror
            .db()
            .write_retrying(&id, || {
                let (id, handlers, error) = (id.clone(), handlers.clone(), error.clone());
                move |conn: &mut crate::db::Conn<'_>| {
                    if !event::finish(
                        conn,
                        &id,
                        token,
                        &handlers,
                        error.as_deref(),
                        false,
                        keep_claim,
                    )? {
                        let lost = Failure::new(Outcome::InProgress, CLAIM_LOST);
                        delivery::finish(
                            conn,
                            delivery_id,
                            true,
                            Some(&id),
                            lost.outcome,
                            Some(&lost.error),
                        )?;
                        return Ok(Err(lost));
                    }
                    delivery::finish(
                        conn,
                        delivery_id,
                        true,
                        Some(&id),
                        outcome,
                        error.as_deref(),
                    )?;
                    Ok(Ok(()))
                }
            })
            .await;
        match recorded {
            Ok(Ok(())) => respond(event_id, result),
            Ok(Err(lost)) => respond(event_id, Err(lost)),
            Err(err) => {
                // The handlers ran but their outcome is not recorded: let Stripe retry.
                tracing::error!(error = %err, delivery = delivery_id, "webhook outcome could not be recorded");
                // Rolled back with the event's record: the delivery's row gets the answer
                // on its own (it would read "received", as after a crash).
                let failure = Failure::from_error(err);
                let (outcome, error) = (failure.outcome, failure.error.clone());
                record_failed(mirror, outcome, move |conn| {
                    delivery::finish(conn, delivery_id, true, Some(&id), outcome, Some(&error))
                })
                .await;
                respond(event_id, Err(failure))
            }
        }
    }

    /// Runs the due handlers within the claim's lease (less a margin for recording).
    pub(crate) async fn run_due(
        &self,
        mirror: &Mirror,
        event: &Event,
        work: &mut Work,
    ) -> std::result::Result<Outcome, Failure> {
        let margin =
            (mirror.config().webhook_claim_lease / 10).min(std::time::Duration::from_secs(10));
        let deadline = work
            .lease_ends
            .checked_sub(margin)
            .unwrap_or(work.lease_ends);
        self.run_handlers(mirror, event, &mut work.handlers, deadline)
            .await
    }

    /// Stores, claims and syncs a verified event: the step its delivery is answered
    /// with, or handlers to run. Bad input (an object that cannot be mapped, a damaged
    /// stored event) is a step that fails this delivery alone; `Err` is a database
    /// failure, which rolls the group back (a write lost to a concurrent one is tried
    /// again). `ride`: the delivery's row, written by the claim's statement with the
    /// outcome this registry should end in.
    fn claim(
        &self,
        conn: &mut crate::db::Conn<'_>,
        event: Arc<Event>,
        (t, lease, live): (i64, i64, bool),
        ride: Option<&mut delivery::Ride>,
    ) -> Result<Step> {
        let keys = self.handler_keys(&event, live);
        let access = self.has_access_hook().then_some(live);
        Ok(
            match claim_and_sync(conn, &event, false, t, lease, &keys, access, ride) {
                Ok(Progress::Claimed(work)) if work.due || work.follow_up.is_some() => {
                    Step::Handlers(event, work)
                }
                // Nothing of this registry is due, but the log may hold handlers of
                // another instance or version of the app on this database, not yet
                // succeeded (the event is stored failed): not a 200, or Stripe would
                // stop redelivering before one of them ran it.
                Ok(Progress::Claimed(work)) => match elsewhere(&work) {
                    Some(failure) => Step::Answer(Err(failure)),
                    None => Step::Answer(Ok(Outcome::Processed)),
                },
                Ok(Progress::Done) => Step::Answer(Ok(Outcome::Duplicate)),
                Ok(Progress::Busy) => Step::Answer(Err(Failure::new(
                    Outcome::InProgress,
                    "another worker is processing this event",
                ))),
                // A bad object shape (400), or a stored event that cannot be read (500),
                // marked failed: this delivery alone fails, the group goes on.
                Err(err @ (Error::Mapping { .. } | Error::Corrupt { .. })) => {
                    Step::Answer(Err(Failure::from_error(err)))
                }
                // A database error (or a lost race) fails the group: nothing of it is
                // stored, this delivery is answered 5xx and the others of the group 503,
                // and Stripe retries each.
                Err(err) => return Err(err),
            },
        )
    }

    /// The event's object, when its kind is re-fetched.
    fn refetch_target(
        &self,
        mirror: &Mirror,
        event: &Event,
    ) -> Option<(&'static MirrorTable, String)> {
        // Another mode's object cannot be fetched with this mode's key: trust the payload.
        if event.livemode != mirror.live_mode() {
            return None;
        }
        let (table, id) = builtin::object_of(event)?;
        let wanted = self.inner.refetch.iter().any(|k| k == table.kind);
        wanted.then_some((table, id))
    }

    /// Fetches the event's object; a 404 means Stripe deleted it since.
    async fn fetch(
        &self,
        mirror: &Mirror,
        (table, id): &(&'static MirrorTable, String),
    ) -> Result<Refetched> {
        let object = format!("{} {id}", table.kind);
        let client = mirror.stripe().await?;
        // The row before the request: a fetch newer than it settles a tie, and brings
        // back an object made again after its tombstone.
        let key = id.clone();
        let table_of: &'static MirrorTable = table;
        let seen = mirror
            .db()
            .read(move |conn| table_of.seen(conn, &key))
            .await?;
        // Bounded like a follow-up: retries and `Retry-After` waits must not hold the
        // delivery past Stripe's own patience; a redelivery tries again.
        let whole = crate::sync::remote::fetch_whole(&client, table, id, mirror.live_mode());
        let answer = tokio::time::timeout(FOLLOW_UP_TIMEOUT, whole)
            .await
            .map_err(|_| {
                Error::Stripe(Box::new(crate::stripe::StripeApiError {
                    request: format!("GET {object}"),
                    message: format!("no answer within {FOLLOW_UP_TIMEOUT:?} (retries included)"),
                    ..Default::default()
                }))
            })?;
        match answer {
            Ok(answer) => Ok(Refetched::Object(
                answer.value,
                crate::sync::Stamp::fetched_over(answer.at, seen),
            )),
            Err(err) if crate::stripe::is_missing(&err) => Ok(Refetched::Missing),
            Err(err) => Err(err),
        }
    }

    /// Read timeout, size, signature and shape: everything decided without the database.
    fn check(
        &self,
        mirror: &Mirror,
        request: &WebhookRequest,
        body: &[u8],
        body_size: usize,
    ) -> std::result::Result<Event, Failure> {
        let headers = &request.headers;
        if request.timed_out {
            return Err(Failure::new(
                Outcome::Timeout,
                format!("the body did not arrive in time ({body_size} bytes read)"),
            ));
        }
        let body_limit = mirror.config().webhook_body_limit;
        if body_size > body_limit {
            return Err(Failure::new(
                Outcome::TooLarge,
                format!(
                    "body of {body_size} bytes is over the {} byte limit",
                    body_limit
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
            tolerance_secs(mirror.config().webhook_tolerance),
            mirror.now(),
        )
        .map_err(|e| match e {
            // Our configuration, not the request, is wrong: 500 so Stripe keeps retrying.
            SignatureError::NoSecret => Failure::new(Outcome::Error, e),
            _ => Failure::new(Outcome::InvalidSignature, e),
        })?;
        let text = std::str::from_utf8(body)
            .map_err(|e| Failure::new(Outcome::Malformed, format!("body is not UTF-8: {e}")))?;
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Failure::new(Outcome::Malformed, format!("body is not JSON: {e}")))?;
        // Stripe's time of the event orders every write it makes: never the host's
        // clock, which `Event::from_json` falls back to for hand-made events.
        if raw
            .get("created")
            .and_then(serde_json::Value::as_i64)
            .is_none()
        {
            return Err(Failure::new(
                Outcome::Malformed,
                "the event has no integer `created` (Stripe's time of the event)",
            ));
        }
        let nul_free = crate::sync::fields::text_nul_free(body);
        let mut event =
            Event::from_json(raw, nul_free).map_err(|e| Failure::new(Outcome::Malformed, e))?;
        event.text = Some(text.into());
        Ok(event)
    }
}

/// The event itself once no try of its write holds it any more (copied only if one does).
fn owned(event: Arc<Event>) -> Event {
    Arc::try_unwrap(event).unwrap_or_else(|shared| (*shared).clone())
}

/// Writes, on its own, what a failed group rolled back of one delivery (its log row, or
/// its outcome): before the answer for our failure (500), after it for a 503 (the
/// database out of reach, or another delivery's write failed the group), so that answer
/// is not delayed by a second wait for the database. Best effort: a failure is traced.
async fn record_failed(
    mirror: &Mirror,
    outcome: Outcome,
    write: impl FnOnce(&mut crate::db::Conn<'_>) -> Result<()> + Send + 'static,
) {
    let db = mirror.db().clone();
    let record = async move {
        if let Err(error) = db.write_batched("", write).await {
            tracing::error!(%error, "a failed webhook delivery could not be recorded");
        }
    };
    if outcome == Outcome::Error {
        record.await;
    } else {
        tokio::spawn(record);
    }
}

/// The signature's tolerance in whole seconds, 0 when off: rounded up (half a second
/// is 1 s, not 0, which would turn the check off) and saturating (past i64 it would
/// wrap negative).
fn tolerance_secs(tolerance: std::time::Duration) -> i64 {
    let secs = tolerance
        .as_secs()
        .saturating_add(u64::from(tolerance.subsec_nanos() > 0));
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tolerance_tests {
    use std::time::Duration;

    /// Half a second checks (1 s), zero is off, and no tolerance wraps negative.
    #[test]
    fn the_tolerance_rounds_up_and_saturates() {
        assert_eq!(super::tolerance_secs(Duration::from_millis(500)), 1);
        assert_eq!(super::tolerance_secs(Duration::ZERO), 0);
        assert_eq!(super::tolerance_secs(Duration::from_secs(300)), 300);
        assert_eq!(super::tolerance_secs(Duration::MAX), i64::MAX);
        assert_eq!(
            super::tolerance_secs(Duration::from_secs(1 << 63)),
            i64::MAX
        );
    }
}

/// The claim lease in whole seconds ([`Config::webhook_claim_lease`](crate::Config::webhook_claim_lease)).
pub(crate) fn lease_secs(mirror: &Mirror) -> i64 {
    whole_secs(mirror.config().webhook_claim_lease)
}

/// The longest claim lease taken: Stripe keeps events 30 days. A longer one (say
/// `Duration::MAX`) would overflow the database's `now + lease`.
pub(crate) const MAX_LEASE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// A lease in whole seconds, 1 to [`MAX_LEASE`].
pub(crate) fn whole_secs(lease: std::time::Duration) -> i64 {
    let secs = lease
        .clamp(std::time::Duration::from_secs(1), MAX_LEASE)
        .as_secs();
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// The answer when a worker's claim ended before its handlers did.
pub(crate) const CLAIM_LOST: &str =
    "the claim on this event expired while its handlers ran; another worker has it";

/// Stores and claims the event and, when it is ours and not yet synced, applies the
/// built-in sync, all in one transaction. The handlers in `keys` not yet succeeded are
/// recorded as due; when none is due the event is finished in the same transaction
/// (processed, unless the handler log holds work of handlers this registry does not
/// have, as when the CLI replays). A bad object shape is found before anything is
/// written: the event is stored failed, so a later replay can retry it. Runs in the
/// caller's transaction when there is one (a group commit), else in its own; any other
/// error must fail that transaction.
#[allow(clippy::too_many_arguments)]
pub(crate) fn claim_and_sync(
    conn: &mut crate::db::Conn<'_>,
    event: &Event,
    force: bool,
    t: i64,
    lease: i64,
    keys: &[String],
    access: Option<bool>,
    mut ride: Option<&mut delivery::Ride>,
) -> Result<Progress> {
    // `access`: the mirror's mode when an access hook listens. Only subscribers of that
    // mode are told (the gate reads that mode alone); the others stay marked for an app
    // of their mode on the same database.
    let (hook, told) = (access.is_some(), |t: &&crate::access::changes::Touched| {
        access == Some(t.1)
    });
    // Measured from before the claim, so the handlers' deadline never outlives it.
    let lease_ends =
        tokio::time::Instant::now() + std::time::Duration::from_secs(lease.max(1) as u64);
    // The object is mapped before anything is written: a bad shape is known here, and
    // the transaction needs no savepoint to undo a half-written sync.
    let plan = builtin::plan(event);
    // Nothing of this registry listens: a new event can be stored processed at once.
    let settle = !force && keys.is_empty() && !hook && plan.is_ok();
    // The delivery's row (Postgres) is written with the claim: processed when nothing
    // of this registry is to run, else received, finished once it ran.
    if let Some(ride) = ride.as_deref_mut() {
        ride.presume(match keys.is_empty() && !hook {
            true => Outcome::Processed,
            false => Outcome::Received,
        });
    }
    let attempt = conn.atomic(|c| {
        let (token, synced, mut handlers, settled) =
            match event::insert_and_claim(c, event, force, settle, t, lease, ride)? {
                Claim::Claimed {
                    token,
                    synced,
                    handlers,
                    settled,
                } => (token, synced, handlers, settled),
                Claim::Done => return Ok(Ok(Progress::Done)),
                Claim::Busy => return Ok(Ok(Progress::Busy)),
                // This event alone fails (500); the group's other deliveries go on.
                Claim::Unreadable(problem) => {
                    return Ok(Err(Error::Corrupt {
                        what: format!("event {}", event.id),
                        problem,
                    }));
                }
            };
        let (mut follow_up, mut synced_now) = (None, false);
        if !synced {
            let plan = match plan {
                Ok(plan) => plan,
                Err(err) => {
                    // Stored failed, for a replay once the code is fixed. The handlers
                    // never ran: they stay due, so a replay without them (the CLI)
                    // cannot finish the event in their place.
                    for key in keys {
                        let pending = || event::HANDLER_PENDING.to_owned();
                        handlers.entry(key.clone()).or_insert_with(pending);
                    }
                    event::finish(
                        c,
                        &event.id,
                        token,
                        &handlers,
                        Some(&err.to_string()),
                        false,
                        false,
                    )?;
                    return Ok(Err(err));
                }
            };
            let (written, touched) = crate::access::changes::collect(|| {
                crate::access::changes::told_by_hook(hook, || builtin::apply(c, event, plan))
            });
            // Mapping is done above: a mapping error now would follow writes that no
            // savepoint can undo, so it must fail the whole transaction.
            let written = written.map_err(|err| match err {
                Error::Mapping { .. } => {
                    debug_assert!(false, "a mapping error after the plan: {err}");
                    Error::Commit {
                        message: format!("the sync failed after it wrote: {err}"),
                    }
                }
                other => other,
            })?;
            if written == Written::Undecided {
                follow_up = builtin::object_of(event);
                if follow_up.is_some() {
                    handlers.insert(
                        event::REFETCH_KEY.to_owned(),
                        event::HANDLER_PENDING.to_owned(),
                    );
                }
            }
            follow_up = follow_up.or_else(|| builtin::checkout_subscription(event));
            synced_now = true;
            // Each subscriber whose access may have changed is told like a handler
            // runs. Without a hook they are only marked, for `deliver_access_changes`.
            for touched in touched.iter().filter(told) {
                let pending = || event::HANDLER_PENDING.to_owned();
                handlers
                    .entry(crate::access::changes::log_key(touched))
                    .or_insert_with(pending);
            }
        }
        // A re-fetch an earlier attempt could not finish (a crash, Stripe down): again.
        let refetch_due = handlers
            .get(event::REFETCH_KEY)
            .is_some_and(|v| v != event::HANDLER_OK);
        if synced && refetch_due {
            follow_up = builtin::object_of(event);
        }
        // With an access hook, a follow-up fetch may change access: keep the claim open;
        // a tracked re-fetch keeps it open until the fetched object is written.
        let mut due = (hook && follow_up.is_some()) || refetch_due;
        // Subscribers left untold by an earlier attempt: ours to tell when of our mode;
        // another mode's stay in the log for an app of that mode (the event is stored
        // failed meanwhile, as for handlers registered elsewhere). Without a hook, any
        // keeps the event open for a host's registry.
        for (key, state) in &handlers {
            let ours = match crate::access::changes::from_log_key(key) {
                Some(touched) => access.is_none_or(|live| touched.1 == live),
                None => false,
            };
            due |= ours && state != event::HANDLER_OK;
        }
        for key in keys {
            let entry = handlers
                .entry(key.clone())
                .or_insert_with(|| event::HANDLER_PENDING.to_owned());
            due |= entry != event::HANDLER_OK;
        }
        // The same statement records that the sync applied.
        if due {
            if settled {
                event::reopen(c, &event.id, lease)?;
            }
            event::record_handlers(c, &event.id, &handlers, synced_now)?;
        } else if !settled {
            event::finish(c, &event.id, token, &handlers, None, synced_now, false)?;
        }
        Ok(Ok(Progress::Claimed(Work {
            token,
            handlers,
            due,
            follow_up,
            lease_ends,
            access: hook,
            recent: t.saturating_sub(event.created) <= ELSEWHERE_WINDOW_SECS,
        })))
    });
    attempt?
}

/// Re-fetches an object once an event's claim is committed, bounded in time: the
/// object of a tie nothing in the events settled (a fetch asked for now is newer than
/// both), or the subscription a completed Checkout created (so the buyer's access is
/// there when they land on the success page). Needs an API key for the event's mode;
/// without one, or when it fails, a flagged row waits for `reconcile` and a Checkout's
/// subscription for its own events.
///
/// A tie's re-fetch is tracked in the handler log ([`event::REFETCH_KEY`]): marked done
/// when the object is written (or cannot be fetched with this mirror's key at all: the
/// row stays flagged for `reconcile`), else `Err` with what failed, and the event is
/// not finished, so the redelivery or a replay fetches again.
pub(crate) async fn follow_up(
    mirror: &Mirror,
    event: &Event,
    work: &mut Work,
    table: &'static MirrorTable,
    id: &str,
) -> std::result::Result<(), String> {
    let tracked = work.handlers.contains_key(event::REFETCH_KEY);
    let settle = |work: &mut Work, entry: String| {
        if tracked {
            work.handlers.insert(event::REFETCH_KEY.to_owned(), entry);
        }
    };
    // Another mode's object cannot be fetched with this mode's key, nor any without a
    // key: the row waits for `reconcile`. A key that could not be read (the database
    // away) is a failure like any other.
    let no_key = match mirror.stripe().await {
        Ok(_) => false,
        Err(Error::NoApiKey { .. }) => true,
        Err(err) => {
            let failed = format!("re-fetching {} {id}: no Stripe client: {err}", table.kind);
            return settle_failed(work, tracked, event, table, id, failed, err.is_transient());
        }
    };
    if event.livemode != mirror.live_mode() || no_key {
        settle(work, event::HANDLER_OK.to_owned());
        return Ok(());
    }
    let fetch = crate::sync::remote::refetch_touching(mirror, table, id);
    let (failed, transient) = match tokio::time::timeout(FOLLOW_UP_TIMEOUT, fetch).await {
        // The subscribers whose access the fetch changed are told with the event's.
        Ok(Ok((_, touched))) => {
            if work.access {
                for touched in touched.into_iter().filter(|t| t.1 == mirror.live_mode()) {
                    let key = crate::access::changes::log_key(&touched);
                    work.handlers
                        .entry(key)
                        .or_insert_with(|| event::HANDLER_PENDING.to_owned());
                    work.due = true;
                }
            }
            settle(work, event::HANDLER_OK.to_owned());
            return Ok(());
        }
        Ok(Err(err)) => (
            format!("re-fetching {} {id} failed: {err}", table.kind),
            err.is_transient(),
        ),
        Err(_) => (
            format!(
                "re-fetching {} {id} took more than {FOLLOW_UP_TIMEOUT:?}",
                table.kind
            ),
            true,
        ),
    };
    settle_failed(work, tracked, event, table, id, failed, transient)
}

/// A follow-up that did not land. A transient failure (network, 409/429/5xx, a
/// timeout, our database) keeps a tracked re-fetch due and fails the event, so it is
/// fetched again; a lasting one (a refused key, an object that does not map) would
/// fail every redelivery, so the row is left flagged for `reconcile` instead.
fn settle_failed(
    work: &mut Work,
    tracked: bool,
    event: &Event,
    table: &'static MirrorTable,
    id: &str,
    failed: String,
    transient: bool,
) -> std::result::Result<(), String> {
    tracing::warn!(event = %event.id, object = table.kind, %id, error = %failed, transient, "follow-up re-fetch failed");
    if !tracked {
        // A Checkout's subscription: its own events will bring it.
        return Ok(());
    }
    if !transient {
        work.handlers
            .insert(event::REFETCH_KEY.to_owned(), event::HANDLER_OK.to_owned());
        return Ok(());
    }
    work.handlers
        .insert(event::REFETCH_KEY.to_owned(), failed.clone());
    Err(failed)
}

/// How long an answer waits for a follow-up re-fetch.
const FOLLOW_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long after an event Stripe's redeliveries of it are answered 500 while handlers
/// registered elsewhere have not succeeded ([`elsewhere`]): long enough for a rolling
/// deploy, or for Stripe's next tries to reach the app that has them (its retries come
/// minutes, then hours apart). Past it the event stays failed for a replay and the
/// delivery is a 200: a handler removed from the app for good (or renumbered) must not
/// fail each of its events for the 3 days Stripe keeps trying.
const ELSEWHERE_WINDOW_SECS: i64 = 3_600;

/// The failure to answer when a handler log holds entries not yet succeeded that this
/// registry did not run (its own are done): handlers of another instance or version of
/// the app sharing the database, or an access hook registered there. Only within
/// [`ELSEWHERE_WINDOW_SECS`] of the event.
fn elsewhere(work: &Work) -> Option<Failure> {
    if !work.recent {
        return None;
    }
    event::unfinished(&work.handlers).map(|pending| {
        Failure::new(
            Outcome::HandlerFailed,
            format!(
                "{pending} (registered by another instance or version of the app on this \
                 database, not here): answered 500 for an hour after the event, so that \
                 Stripe's next tries reach an app that has them; or replay it from one \
                 (`Webhooks::process_events`, `EventFilter::failed`)"
            ),
        )
    })
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
        Err(f) => {
            if matches!(f.outcome, Outcome::Error | Outcome::Unavailable) {
                // The client is told only that it failed; the detail is for the operator.
                tracing::error!(event = ?event_id, outcome = f.outcome.as_str(), error = %f.error, "webhook delivery failed");
            }
            WebhookResponse {
                status: f.outcome.status(),
                outcome: f.outcome,
                event_id,
                error: Some(f.error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Any lease a host sets gives a number the database can add to its clock: at
    /// least 1 s, at most [`MAX_LEASE`] (`Duration::MAX` was -1: every claim expired).
    #[test]
    fn a_lease_is_whole_seconds_from_one_to_thirty_days() {
        assert_eq!(whole_secs(Duration::from_secs(300)), 300);
        assert_eq!(whole_secs(Duration::ZERO), 1);
        assert_eq!(whole_secs(Duration::from_millis(1500)), 1);
        assert_eq!(whole_secs(Duration::MAX), 30 * 24 * 3600);
        assert_eq!(
            whole_secs(Duration::from_secs(u64::MAX / 2)),
            30 * 24 * 3600
        );
    }
}
