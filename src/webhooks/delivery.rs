//! The delivery log: every webhook request, valid or not, is written to
//! `stripe_webhook_deliveries` with its outcome (dj-stripe's WebhookEventTrigger). A
//! verified event's row is written in the transaction that stores the event, so one
//! commit serves both; when that transaction fails, the row is written on its own
//! afterwards (for a 503, after the answer, best effort). On Postgres that row is
//! written by the very statement that stores the event (`Ride`), a round trip fewer.

use diesel::prelude::*;

use crate::db::schema::stripe_webhook_deliveries as deliveries;
use crate::db::statement::SqlValue;
use crate::db::{Conn, on_conn};
use crate::error::Result;
use crate::sync::now;

/// What happened to one delivery, as stored in `outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Logged, not yet finished (a crash leaves this).
    Received,
    /// Verified, stored, synced and every handler succeeded.
    Processed,
    /// The event was already processed: nothing ran again.
    Duplicate,
    /// Another worker is processing the event now; Stripe will retry.
    InProgress,
    /// The signature header was missing, malformed, stale or did not match.
    InvalidSignature,
    /// The body was not an event (not JSON, no id or type, not UTF-8).
    Malformed,
    /// The event's object had a shape the mirror cannot map.
    InvalidObject,
    /// The body was over the configured cap.
    TooLarge,
    /// The body did not arrive within the read timeout (`Config::webhook_read_timeout`).
    Timeout,
    /// A handler failed or panicked; the event is stored as failed.
    HandlerFailed,
    /// Our side failed (a query, our configuration); Stripe will retry.
    Error,
    /// The database could not be reached; Stripe will retry.
    Unavailable,
}

impl Outcome {
    /// The name stored in the `outcome` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Received => "received",
            Outcome::Processed => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::InProgress => "in_progress",
            Outcome::InvalidSignature => "invalid_signature",
            Outcome::Malformed => "malformed",
            Outcome::InvalidObject => "invalid_object",
            Outcome::TooLarge => "too_large",
            Outcome::Timeout => "timeout",
            Outcome::HandlerFailed => "handler_failed",
            Outcome::Error => "error",
            Outcome::Unavailable => "unavailable",
        }
    }

    /// The HTTP status answered for this outcome.
    pub fn status(self) -> u16 {
        match self {
            Outcome::Received | Outcome::Processed | Outcome::Duplicate => 200,
            Outcome::InProgress => 409,
            Outcome::InvalidSignature | Outcome::Malformed | Outcome::InvalidObject => 400,
            Outcome::Timeout => 408,
            Outcome::TooLarge => 413,
            Outcome::HandlerFailed | Outcome::Error => 500,
            Outcome::Unavailable => 503,
        }
    }
}

/// How much of a refused request's body is kept in the log (bytes), and of its headers:
/// enough to see what was sent, not enough for an unauthenticated client to fill the
/// database. A verified
/// delivery's body is stored once, as its event's `data` (`stripe_events`).
pub const REFUSED_BODY_LOG_LIMIT: usize = 4096;

/// Headers worth nothing to an attacker only; these are never stored.
const REDACTED_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// A delivery as logged: the request, and what became of it when already known.
pub(crate) struct Entry<'a> {
    pub remote_addr: Option<&'a str>,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
    pub body_size: usize,
    pub valid: bool,
    pub event_id: Option<&'a str>,
    /// `Received` while the outcome is still to come ([`finish`] writes it).
    pub outcome: Outcome,
    pub error: Option<&'a str>,
}

/// The request's headers as logged: a JSON object, credentials redacted, a refused
/// request's within the budget of its body (anyone can send them).
fn logged_headers(headers: &[(String, String)], valid: bool) -> String {
    let mut budget = if valid {
        usize::MAX
    } else {
        REFUSED_BODY_LOG_LIMIT
    };
    let (mut kept, mut left_out) = (serde_json::Map::new(), 0);
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        let v = if REDACTED_HEADERS.contains(&k.as_str()) {
            "[redacted]".to_owned()
        } else {
            v.clone()
        };
        if k.len() + v.len() > budget {
            left_out += 1;
            continue;
        }
        budget -= k.len() + v.len();
        kept.insert(k, serde_json::Value::String(v));
    }
    if left_out > 0 {
        let note = format!("{left_out} headers left out: past the log's limit");
        kept.insert("[left out]".into(), note.into());
    }
    // Written straight into a buffer (`Value::to_string` goes through `fmt`); a map of
    // strings always serializes.
    serde_json::to_string(&kept).unwrap_or_default()
}

/// The status code stored with an outcome: none while it is still to come.
fn status_code(outcome: Outcome) -> Option<i32> {
    (outcome != Outcome::Received).then(|| outcome.status() as i32)
}

/// Inserts the delivery row; returns its id.
pub(crate) fn log(conn: &mut Conn<'_>, entry: &Entry<'_>) -> Result<i64> {
    let Entry {
        remote_addr,
        headers,
        body,
        body_size,
        valid,
        event_id,
        outcome,
        error,
    } = *entry;
    let values = (
        deliveries::received_at.eq(now()),
        deliveries::remote_addr.eq(remote_addr),
        deliveries::headers.eq(logged_headers(headers, valid)),
        deliveries::body.eq(body),
        deliveries::body_size.eq(body_size as i64),
        deliveries::body_truncated.eq(!valid && body.len() < body_size),
        deliveries::valid.eq(valid),
        deliveries::event_id.eq(event_id),
        deliveries::outcome.eq(outcome.as_str()),
        deliveries::status_code.eq(status_code(outcome)),
        deliveries::error.eq(error),
    );
    Ok(on_conn!(conn, c => diesel::insert_into(deliveries::table)
        .values(values)
        .returning(deliveries::id)
        .get_result(c))?)
}

/// A verified delivery's row, inserted by the statement that stores and claims its
/// event, on Postgres: one round trip fewer per delivery (SQLite's statements cost
/// none, and it has no `INSERT` inside a `WITH`). The row is written with the outcome
/// the claim is expected to end in ([`Ride::presume`]); [`Ride::logged`] corrects it
/// when the claim ends otherwise, so it ends as [`log`] would have written it.
pub(crate) struct Ride {
    received_at: i64,
    remote_addr: Option<String>,
    headers: String,
    body_size: usize,
    event_id: String,
    presumed: Outcome,
    /// The row's id, once the claim's statement wrote it.
    id: Option<i64>,
}

impl Ride {
    /// [`Ride`]'s insert, for the claim's `WITH`: no body (a verified delivery's body is
    /// its event's `data`), no error.
    pub(crate) const INSERT: &'static str = "INSERT INTO stripe_webhook_deliveries \
        (received_at, remote_addr, headers, body, body_size, body_truncated, valid, event_id, \
        outcome, status_code, error) VALUES (?, ?, ?, ''::bytea, ?, FALSE, TRUE, ?, ?, ?, NULL) \
        RETURNING id";

    /// A ride for a verified delivery of `event_id`, on Postgres; `None` on SQLite.
    pub(crate) fn on(
        conn: &Conn<'_>,
        remote_addr: Option<&str>,
        headers: &[(String, String)],
        body_size: usize,
        event_id: &str,
    ) -> Option<Ride> {
        match conn {
            #[cfg(feature = "postgres")]
            Conn::Postgres(_) => Some(Ride {
                received_at: now(),
                remote_addr: remote_addr.map(str::to_owned),
                headers: logged_headers(headers, true),
                body_size,
                event_id: event_id.to_owned(),
                presumed: Outcome::Received,
                id: None,
            }),
            #[allow(unreachable_patterns)]
            _ => {
                let _ = (remote_addr, headers, body_size, event_id);
                None
            }
        }
    }

    /// The outcome the row is written with: the claim's when it ends as expected.
    pub(crate) fn presume(&mut self, outcome: Outcome) {
        self.presumed = outcome;
    }

    /// The binds of [`Ride::INSERT`].
    pub(crate) fn binds(&self) -> Vec<SqlValue> {
        vec![
            SqlValue::Int(Some(self.received_at)),
            SqlValue::Text(self.remote_addr.clone()),
            SqlValue::Text(Some(self.headers.clone())),
            SqlValue::Int(Some(self.body_size as i64)),
            SqlValue::Text(Some(self.event_id.clone())),
            SqlValue::Text(Some(self.presumed.as_str().to_owned())),
            SqlValue::Int(status_code(self.presumed).map(i64::from)),
        ]
    }

    /// The claim's statement wrote the row.
    pub(crate) fn written(&mut self, id: i64) {
        self.id = Some(id);
    }

    /// Once the claim has ended: the id of the row written with it, corrected to
    /// `entry` where the claim ended otherwise than presumed; `None` when no row was
    /// written (the claim never ran), for [`log`] to write it.
    pub(crate) fn logged(
        ride: Option<&Ride>,
        conn: &mut Conn<'_>,
        entry: &Entry<'_>,
    ) -> Result<Option<i64>> {
        let Some((ride, id)) = ride.and_then(|r| Some((r, r.id?))) else {
            return Ok(None);
        };
        debug_assert!(entry.valid && entry.event_id == Some(ride.event_id.as_str()));
        if (entry.outcome, entry.error, entry.body) != (ride.presumed, None::<&str>, &[][..]) {
            on_conn!(conn, c => diesel::update(deliveries::table.find(id))
                .set((
                    deliveries::body.eq(entry.body),
                    deliveries::outcome.eq(entry.outcome.as_str()),
                    deliveries::status_code.eq(status_code(entry.outcome)),
                    deliveries::error.eq(entry.error),
                ))
                .execute(c))?;
        }
        Ok(Some(id))
    }
}

/// Writes a delivery's outcome.
pub(crate) fn finish(
    conn: &mut Conn<'_>,
    id: i64,
    valid: bool,
    event_id: Option<&str>,
    outcome: Outcome,
    error: Option<&str>,
) -> Result<()> {
    on_conn!(conn, c => diesel::update(deliveries::table.find(id))
        .set((
            deliveries::valid.eq(valid),
            deliveries::event_id.eq(event_id),
            deliveries::outcome.eq(outcome.as_str()),
            deliveries::status_code.eq(outcome.status() as i32),
            deliveries::error.eq(error),
        ))
        .execute(c))?;
    Ok(())
}

/// One logged delivery, for inspection.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = deliveries)]
pub struct Delivery {
    /// Row id.
    pub id: i64,
    /// Unix time received.
    pub received_at: i64,
    /// The peer's address, when known.
    pub remote_addr: Option<String>,
    /// Request headers as a JSON object (credentials redacted).
    pub headers: String,
    /// For a refused request (bad signature, not an event, too large, too slow), the
    /// body as received, at most [`REFUSED_BODY_LOG_LIMIT`] bytes. Empty for a verified
    /// event: its body is stored once, exactly as received, as the event's `data` in
    /// `stripe_events` (`event_id` joins them), which halves what each delivery writes.
    pub body: Vec<u8>,
    /// The body size in bytes as received (for a body over the cap that the transport
    /// stopped reading: at least the cap plus one).
    pub body_size: i64,
    /// `body` holds less than `body_size` bytes.
    pub body_truncated: bool,
    /// The signature verified.
    pub valid: bool,
    /// The event id, once read.
    pub event_id: Option<String>,
    /// What happened ([`Outcome::as_str`]).
    pub outcome: String,
    /// The HTTP status answered.
    pub status_code: Option<i32>,
    /// The error, when there was one.
    pub error: Option<String>,
}

impl Delivery {
    /// The most recent deliveries, newest first.
    pub async fn recent(mirror: &crate::Mirror, limit: i64) -> Result<Vec<Delivery>> {
        mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => deliveries::table
                    .order(deliveries::id.desc())
                    .limit(limit)
                    .select(Delivery::as_select())
                    .load(c))?)
            })
            .await
    }
}
