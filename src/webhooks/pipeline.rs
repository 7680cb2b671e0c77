//! One webhook request from bytes to answer: checks, the delivery log, the claim with
//! the built-in sync, the handlers, the outcome.

use super::event::{self, Claim};
use super::{Event, Outcome, SignatureError, Webhooks, builtin, delivery, signature};
use crate::Mirror;
use crate::error::{Error, Result};
use crate::sync::now;

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

/// How a pipeline step failed, and what to answer.
pub(crate) struct Failure {
    pub(crate) outcome: Outcome,
    pub(crate) error: String,
}

impl Failure {
    pub(crate) fn new(outcome: Outcome, error: impl ToString) -> Self {
        Failure {
            outcome,
            error: error.to_string(),
        }
    }

    /// A crate error: bad object shapes are 400; the database being unreachable is 503.
    pub(crate) fn from_error(err: Error) -> Self {
        match &err {
            Error::Mapping { .. } => Failure::new(Outcome::InvalidObject, err),
            _ if is_unavailable(&err) => Failure::new(Outcome::Unavailable, err),
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

/// Where a request stands after a database round trip.
enum Step {
    /// Decided, and the delivery's outcome recorded: answer this.
    Answer(std::result::Result<Outcome, Failure>),
    /// Stored, claimed and synced: the handlers run next, then the outcome is recorded.
    Handlers(Event),
    /// Verified and logged; its object is re-fetched from the API before claiming.
    Refetch(Event, String),
}

impl Webhooks {
    /// Handles one webhook request from start to answer. Never panics on any input.
    ///
    /// One database round trip (on the blocking pool) logs the delivery and, for a
    /// valid event, stores, claims and syncs it in one transaction; when no handler
    /// listens, or the request is refused, its outcome is recorded in the same trip.
    /// Handlers add a second trip to record their outcome; `refetch` adds the API call
    /// and a trip to claim after it.
    pub async fn receive(&self, mirror: &Mirror, request: WebhookRequest) -> WebhookResponse {
        let body_size = request.body_size.unwrap_or(0).max(request.body.len());
        let mut body = request.body;
        body.truncate(self.inner.body_limit);
        let checked = self.check(mirror, &request.headers, &body, body_size);
        let event_id = checked.as_ref().ok().map(|e| e.id.clone());
        let refetch = checked.as_ref().ok().and_then(|e| self.refetch_target(e));
        let this = self.clone();
        let (headers, remote) = (request.headers, request.remote_addr);
        let first = mirror
            .db()
            .run(move |conn| {
                let valid = checked.is_ok();
                let id = delivery::log(conn, remote.as_deref(), &headers, &body, body_size, valid)?;
                let step = match (checked, refetch) {
                    (Err(failure), _) => {
                        delivery::finish(
                            conn,
                            id,
                            false,
                            None,
                            failure.outcome,
                            Some(&failure.error),
                        )?;
                        Step::Answer(Err(failure))
                    }
                    // The API call must not sit inside a transaction: claim after it.
                    (Ok(event), Some(path)) => Step::Refetch(event, path),
                    (Ok(event), None) => this.claim(conn, id, event)?,
                };
                Ok((id, step))
            })
            .await;
        let (delivery_id, mut step) = match first {
            Ok(first) => first,
            Err(err) => {
                tracing::error!(error = %err, "webhook delivery could not be logged");
                return respond(event_id, Err(Failure::from_error(err)));
            }
        };
        if let Step::Refetch(mut event, path) = step {
            step = match self.fetch(mirror, &path).await {
                Ok(fetched) => {
                    event.refetched = Some(fetched);
                    let this = self.clone();
                    mirror
                        .db()
                        .run(move |conn| this.claim(conn, delivery_id, event))
                        .await
                }
                Err(err) => Err(err),
            }
            .unwrap_or_else(|err| Step::Answer(Err(Failure::from_error(err))));
        }
        let event = match step {
            Step::Handlers(event) => event,
            Step::Answer(result) => return respond(event_id, result),
            Step::Refetch(..) => unreachable!("re-fetched above"),
        };

        let result = self.run_handlers(mirror, event).await;
        let (id, outcome, error) = match &result {
            Ok(outcome) => (event_id.clone(), *outcome, None),
            Err(f) => (event_id.clone(), f.outcome, Some(f.error.clone())),
        };
        let recorded = mirror
            .db()
            .run(move |conn| {
                // One transaction for both records: one commit instead of two.
                conn.write(|conn| {
                    let id = id.as_deref().expect("a claimed event has an id");
                    event::finish(conn, id, error.as_deref())?;
                    delivery::finish(conn, delivery_id, true, Some(id), outcome, error.as_deref())
                })
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

    /// Stores, claims and syncs a verified event, and records the delivery's outcome
    /// unless handlers still have to run. A database failure is returned as an error.
    fn claim(
        &self,
        conn: &mut crate::db::Conn<'_>,
        delivery_id: i64,
        event: Event,
    ) -> Result<Step> {
        let unhandled = !self.has_handlers(&event.event_type);
        // One transaction for the claim and the delivery's outcome: one commit per
        // event when no handler runs (the claim itself nests as a savepoint).
        conn.write(|conn| {
            let answer = match claim_and_sync(conn, &event, false, unhandled) {
                Ok(Claim::Claimed { .. }) if !unhandled => return Ok(Step::Handlers(event)),
                Ok(Claim::Claimed { .. }) => Ok(Outcome::Processed),
                Ok(Claim::Done) => Ok(Outcome::Duplicate),
                Ok(Claim::Busy) => Err(Failure::new(
                    Outcome::InProgress,
                    "another worker is processing this event",
                )),
                // A bad object shape (400) or our failure (5xx); recorded if the database lets us.
                Err(err) => Err(Failure::from_error(err)),
            };
            let (outcome, error) = match &answer {
                Ok(outcome) => (*outcome, None),
                Err(f) => (f.outcome, Some(f.error.as_str())),
            };
            delivery::finish(conn, delivery_id, true, Some(&event.id), outcome, error)?;
            Ok(Step::Answer(answer))
        })
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
}

/// Stores and claims the event and, when it is ours and not yet synced, applies the
/// built-in sync, all in one transaction (which also marks it processed when `finish`). A bad object shape rolls the sync back and
/// stores the event as failed, so a later replay can retry it.
pub(crate) fn claim_and_sync(
    conn: &mut crate::db::Conn<'_>,
    event: &Event,
    force: bool,
    finish: bool,
) -> Result<Claim> {
    let attempt = conn.write(|c| {
        let claim = event::insert_and_claim(c, event, force)?;
        if let Claim::Claimed { synced } = claim {
            if !synced {
                builtin::apply(c, event)?;
                event::mark_synced(c, &event.id)?;
            }
            // No handler will run: the event is processed with its sync.
            if finish {
                event::finish(c, &event.id, None)?;
            }
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
            status: f.outcome.status(),
            outcome: f.outcome,
            event_id,
            error: Some(f.error),
        },
    }
}
