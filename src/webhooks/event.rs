//! The stored event: what handlers receive, and the `stripe_events` bookkeeping that
//! makes processing idempotent (insert once, claim, mark processed or failed).

use diesel::prelude::*;
use serde_json::Value;

use crate::db::schema::stripe_events;
use crate::db::{Conn, on_conn};
use crate::error::{Error, Result};
use crate::sync::now;

/// A Stripe event as stored, handed to handlers.
#[derive(Clone, Debug)]
pub struct Event {
    /// Stripe id (`evt_...`).
    pub id: String,
    /// Event type (`customer.subscription.updated`).
    pub event_type: String,
    /// Live or test mode.
    pub livemode: bool,
    /// The API version the payload was rendered with.
    pub api_version: Option<String>,
    /// Unix time Stripe created the event: the freshness stamp of its data.
    pub created: i64,
    /// How many times processing was started.
    pub attempts: i32,
    /// The whole event JSON.
    pub raw: Value,
    /// The object as re-fetched from the API and when, if the registry asked for that.
    pub(crate) refetched: Option<(Value, i64)>,
}

impl Event {
    /// Reads an event from its JSON; `None` for the field that is missing or mistyped.
    pub(crate) fn from_json(raw: Value) -> std::result::Result<Event, &'static str> {
        let id = raw
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("event has no string `id`")?;
        let event_type = raw
            .get("type")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("event has no string `type`")?;
        Ok(Event {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            livemode: raw
                .get("livemode")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            api_version: raw
                .get("api_version")
                .and_then(Value::as_str)
                .map(str::to_owned),
            created: raw
                .get("created")
                .and_then(Value::as_i64)
                .unwrap_or_else(now),
            attempts: 0,
            raw,
            refetched: None,
        })
    }

    /// The object the event is about (`data.object`), `Null` when absent.
    pub fn object(&self) -> &Value {
        self.raw.pointer("/data/object").unwrap_or(&Value::Null)
    }

    /// The fields that changed and their old values (`data.previous_attributes`), on `*.updated`.
    pub fn previous_attributes(&self) -> Option<&Value> {
        self.raw
            .pointer("/data/previous_attributes")
            .filter(|v| !v.is_null())
    }

    /// The object as a typed value, e.g. async-stripe's generated types:
    /// `event.object_as::<stripe_mirror::types::Subscription>()`.
    pub fn object_as<T: serde::de::DeserializeOwned>(
        &self,
    ) -> std::result::Result<T, serde_json::Error> {
        T::deserialize(self.object())
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = stripe_events)]
pub(crate) struct EventRow {
    pub id: String,
    pub attempts: i32,
    pub data: String,
}

impl EventRow {
    pub(crate) fn into_event(self) -> Result<Event> {
        let raw: Value = serde_json::from_str(&self.data)
            .map_err(|e| Error::Task(format!("stored event {} is not JSON: {e}", self.id)))?;
        let mut event = Event::from_json(raw)
            .map_err(|e| Error::Task(format!("stored event {}: {e}", self.id)))?;
        event.attempts = self.attempts;
        Ok(event)
    }
}

/// Processing states in `stripe_events.status`.
pub(crate) mod status {
    pub const PENDING: &str = "pending";
    pub const PROCESSING: &str = "processing";
    pub const PROCESSED: &str = "processed";
    pub const FAILED: &str = "failed";
}

/// A claim taken by one worker: the event is processing and only this worker runs it.
pub(crate) enum Claim {
    /// Ours to process; `synced` says whether the built-in sync already applied.
    Claimed { synced: bool },
    /// Already processed: answer 200, run nothing.
    Done,
    /// Another worker holds it right now.
    Busy,
}

/// A claim older than this is from a worker that died; it may be taken over.
const STALE_CLAIM_SECS: i64 = 300;

/// Stores the event if new, then claims it. Run inside the write transaction.
pub(crate) fn insert_and_claim(conn: &mut Conn<'_>, event: &Event, force: bool) -> Result<Claim> {
    let t = now();
    on_conn!(conn, c => {
        diesel::insert_into(stripe_events::table)
            .values((
                stripe_events::id.eq(&event.id),
                stripe_events::event_type.eq(&event.event_type),
                stripe_events::livemode.eq(event.livemode),
                stripe_events::api_version.eq(&event.api_version),
                stripe_events::created.eq(event.created),
                stripe_events::data.eq(event.raw.to_string()),
                stripe_events::status.eq(status::PENDING),
                stripe_events::received_at.eq(t),
            ))
            .on_conflict(stripe_events::id)
            .do_nothing()
            .execute(c)?;
        // A forced replay (given ids) also re-runs processed events.
        let statuses: &[&str] = if force {
            &[status::PENDING, status::FAILED, status::PROCESSED]
        } else {
            &[status::PENDING, status::FAILED]
        };
        let claimable = stripe_events::status
            .eq_any(statuses)
            .or(stripe_events::status.eq(status::PROCESSING).and(stripe_events::claimed_at.lt(t - STALE_CLAIM_SECS)));
        let claimed: Option<bool> = diesel::update(stripe_events::table.find(&event.id).filter(claimable))
            .set((
                stripe_events::status.eq(status::PROCESSING),
                stripe_events::attempts.eq(stripe_events::attempts + 1),
                stripe_events::claimed_at.eq(t),
            ))
            .returning(stripe_events::synced)
            .get_result(c)
            .optional()?;
        if let Some(synced) = claimed {
            return Ok(Claim::Claimed { synced });
        }
        let current: String = stripe_events::table.find(&event.id).select(stripe_events::status).first(c)?;
        Ok(if current == status::PROCESSED { Claim::Done } else { Claim::Busy })
    })
}

/// Records that the built-in sync applied.
pub(crate) fn mark_synced(conn: &mut Conn<'_>, id: &str) -> Result<()> {
    on_conn!(conn, c => diesel::update(stripe_events::table.find(id)).set(stripe_events::synced.eq(true)).execute(c))?;
    Ok(())
}

/// Ends processing: processed (error `None`) or failed with the error.
pub(crate) fn finish(conn: &mut Conn<'_>, id: &str, error: Option<&str>) -> Result<()> {
    let status = if error.is_some() {
        status::FAILED
    } else {
        status::PROCESSED
    };
    on_conn!(conn, c => diesel::update(stripe_events::table.find(id))
        .set((
            stripe_events::status.eq(status),
            stripe_events::error.eq(error),
            stripe_events::processed_at.eq(now()),
            stripe_events::claimed_at.eq(None::<i64>),
        ))
        .execute(c))?;
    Ok(())
}
