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
    pub(crate) status: u16,
    pub(crate) error: String,
}

impl Failure {
    pub(crate) fn new(outcome: Outcome, error: impl ToString) -> Self {
        Failure {
            outcome,
            status: outcome.status(),
            error: error.to_string(),
        }
    }

    /// A crate error: bad object shapes are 400; the database being unreachable is 503.
    pub(crate) fn from_error(err: Error) -> Self {
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

impl Webhooks {
    /// Handles one webhook request from start to answer. Never panics on any input.
    ///
    /// Two database round trips on the blocking pool: one logs the delivery and, for a
    /// valid event, stores, claims and syncs it in one transaction; the other records
    /// the outcome after the handlers ran. An event no handler listens to is finished
    /// in the first round trip.
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
        let unhandled = checked
            .as_ref()
            .is_ok_and(|e| !self.has_handlers(&e.event_type));
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
                    Ok(event) => claim_and_sync(conn, &event, false, unhandled)
                        .map(|claim| (event, claim))
                        .map_err(|e| Some(Failure::from_error(e))),
                };
                // Nothing else will run for this event: record the outcome now.
                if unhandled && let Ok((event, Claim::Claimed { .. })) = &claim {
                    let id = Some(event.id.as_str());
                    delivery::finish(conn, delivery_id, valid, id, Outcome::Processed, None)?;
                    return Ok((delivery_id, Err(None), true));
                }
                Ok((delivery_id, claim, false))
            })
            .await;
        let (delivery_id, claim) = match first {
            Ok((_, _, true)) => return respond(event_id, Ok(Outcome::Processed)),
            Ok((delivery_id, claim, false)) => (delivery_id, claim),
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
                            claim_and_sync(conn, &event, false, false).map(|claim| (event, claim))
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
                // One transaction for both records: one commit instead of two.
                conn.write(|conn| {
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
            status: f.status,
            outcome: f.outcome,
            event_id,
            error: Some(f.error),
        },
    }
}
