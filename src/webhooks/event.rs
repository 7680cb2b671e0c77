//! The stored event: what handlers receive, and the `stripe_events` bookkeeping that
//! makes processing idempotent (insert once, claim, mark processed or failed).

use diesel::prelude::*;
use serde_json::Value;

use crate::db::schema::stripe_events;
use crate::db::statement::{Bound, SqlValue, execute};
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
    /// How many times processing was started, this time included: 1 in the handlers
    /// of a first delivery, one more on each redelivery or replay that runs them.
    pub attempts: i32,
    /// The whole event JSON.
    pub raw: Value,
    /// The object as re-fetched from the API, if the registry asked for that.
    pub(crate) refetched: Option<Refetched>,
    /// The body exactly as received, stored as the event's `data` (no re-serializing).
    pub(crate) text: Option<std::sync::Arc<str>>,
}

/// What a re-fetch of an event's object found.
#[derive(Clone, Debug)]
pub(crate) enum Refetched {
    /// The object, stamped when Stripe answered (Stripe's clock), over the row as it
    /// was before the request ([`Stamp::fetched_over`](crate::sync::Stamp)).
    Object(Value, crate::sync::Stamp),
    /// Stripe answered 404: deleted since.
    Missing,
}

impl Event {
    /// Reads an event from its JSON; `None` for the field that is missing or mistyped.
    /// `nul_free`: its text is known to hold no U+0000 ([`text_nul_free`]), so the
    /// parsed value need not be walked for one.
    ///
    /// [`text_nul_free`]: crate::sync::fields::text_nul_free
    pub(crate) fn from_json(
        raw: Value,
        nul_free: bool,
    ) -> std::result::Result<Event, &'static str> {
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
        if !nul_free && crate::sync::fields::holds_nul(&raw) {
            return Err(
                "event holds a NUL character (U+0000): Stripe never sends one, and Postgres cannot store it",
            );
        }
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
            text: None,
        })
    }

    /// An event from its JSON as Stripe sends it, e.g. to unit-test a handler:
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use serde_json::json;
    /// use stripe_mirror::webhooks::HandlerError;
    /// use stripe_mirror::{Config, Event, Mirror, Subscription, SubscriptionStatus};
    ///
    /// /// The handler under test: remembers which plan a subscription is on.
    /// async fn on_subscription(event: Event, _mirror: Mirror) -> Result<(), HandlerError> {
    ///     let sub = Subscription::from_stripe_json(event.object())?;
    ///     match sub.status {
    ///         Some(SubscriptionStatus::Active) => {}
    ///         other => return Err(format!("{} is {}", sub.id, other.map(|s| s.to_string()).unwrap_or_default()).into()),
    ///     }
    ///     Ok(())
    /// }
    ///
    /// let event = Event::from_stripe_json(json!({
    ///     "id": "evt_1", "object": "event", "type": "customer.subscription.updated", "created": 1,
    ///     "data": { "object": { "id": "sub_1", "object": "subscription", "customer": "cus_1",
    ///                           "status": "past_due", "items": { "data": [] } } },
    /// }))?;
    /// let mirror = Mirror::connect(Config::new("sqlite::memory:")).await?;
    /// let failed = on_subscription(event, mirror).await.unwrap_err();
    /// assert_eq!(failed.to_string(), "sub_1 is past_due");
    /// # Ok::<_, stripe_mirror::Error>(()) }).unwrap();
    /// ```
    pub fn from_stripe_json(raw: Value) -> Result<Event> {
        let id = raw
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("<no id>")
            .to_owned();
        Event::from_json(raw, false)
            .map_err(|problem| Error::mapping("event", &id, "<root>", problem))
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
    ///
    /// Prefer the crate's own row types, built without a database, for the mirrored
    /// objects: `Subscription::from_stripe_json(event.object())` (and `Customer`,
    /// `Price`, `Product`). A generated type is large: measured with
    /// `scripts/measure-object-as.sh` (debug build, the project's 2-core machine), a
    /// small app whose handler reads a subscription with `object_as::<types::Subscription>()`
    /// links a **292 MiB** binary instead of **162 MiB** with
    /// `Subscription::from_stripe_json` (+130 MiB of deserialization code for every
    /// nested type); rebuilding the app after an edit took 6.6 s against 8.5 s, the same
    /// within this machine's noise, because the crate already compiles async-stripe's
    /// deserializers.
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
    /// Stripe's time of the event as stored: a replay orders its writes by it, even
    /// for an event whose body lacks it (stored before such bodies were refused).
    pub created: i64,
}

impl EventRow {
    pub(crate) fn into_event(self) -> Result<Event> {
        let raw: Value = serde_json::from_str(&self.data).map_err(|e| Error::Corrupt {
            what: format!("event {}", self.id),
            problem: format!("not JSON: {e}"),
        })?;
        let nul_free = crate::sync::fields::text_nul_free(self.data.as_bytes());
        let mut event = Event::from_json(raw, nul_free).map_err(|e| Error::Corrupt {
            what: format!("event {}", self.id),
            problem: e.to_owned(),
        })?;
        event.attempts = self.attempts;
        event.created = self.created;
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

/// Which handlers ran for an event: handler key to `"ok"`, `"pending"` or the error.
/// Stored as a JSON object in `stripe_events.handlers`; a replay runs the handlers
/// whose entry is not `"ok"`.
pub(crate) type HandlerLog = std::collections::BTreeMap<String, String>;

/// A handler's entry once it succeeded.
pub(crate) const HANDLER_OK: &str = "ok";
/// A handler's entry while it is due.
pub(crate) const HANDLER_PENDING: &str = "pending";
/// The handler-log entry of the follow-up re-fetch of a same-second tie nothing in the
/// events settled: pending until the fetched object is written, so a redelivery or a
/// replay after a crash (or a failed fetch) fetches again instead of leaving the row
/// at the older version.
pub(crate) const REFETCH_KEY: &str = "refetch";

/// A claim taken by one worker: the event is processing and only this worker runs it.
pub(crate) enum Claim {
    /// Ours to process until the lease ends. `token` (the attempt number) must still
    /// match when finishing; `synced` says whether the built-in sync already applied.
    Claimed {
        token: i32,
        synced: bool,
        handlers: HandlerLog,
        /// Stored new and already `processed` ([`insert_and_claim`]'s `settled`): nothing
        /// to finish unless the sync leaves work due, which [`reopen`] claims.
        settled: bool,
    },
    /// Already processed: answer 200, run nothing.
    Done,
    /// Another worker holds it right now.
    Busy,
    /// Claimed, but its handler log cannot be read (damaged by hand, or by an older
    /// version): it has been marked failed, its log left as it is; the problem.
    Unreadable(String),
}

/// Stores the event if new (received at `t`, the host's clock), then claims it for
/// `lease_secs`. The lease is kept on the database's clock, the one clock every worker
/// shares, so hosts whose clocks disagree still agree on when a claim ends. Run inside
/// the write transaction.
///
/// `settled`: no handler of this registry listens and no access hook is registered,
/// so a new event is stored `processed` at once (saving the statement that would
/// finish it). Its sync runs next in the same transaction; an object that cannot be
/// mapped is known before this runs (`settled` is then false), and work the sync
/// leaves due (a re-fetch) claims it with [`reopen`].
///
/// `ride` (Postgres): the delivery's log row, inserted by the same statement, claimed
/// or not; its id is kept in it.
pub(crate) fn insert_and_claim(
    conn: &mut Conn<'_>,
    event: &Event,
    force: bool,
    settled: bool,
    t: i64,
    lease_secs: i64,
    ride: Option<&mut crate::webhooks::delivery::Ride>,
) -> Result<Claim> {
    use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Integer)]
        attempts: i32,
        #[diesel(sql_type = Bool)]
        synced: bool,
        #[diesel(sql_type = Text)]
        handlers: String,
        #[diesel(sql_type = Text)]
        status: String,
    }
    let now = database_now(conn);
    // A forced replay (given ids) also re-claims processed events.
    use status::{FAILED, PENDING, PROCESSED, PROCESSING};
    let claimable = if force {
        format!("'{PENDING}', '{FAILED}', '{PROCESSED}'")
    } else {
        format!("'{PENDING}', '{FAILED}'")
    };
    // One statement stores a new event already claimed, or claims a stored one that is
    // pending, failed, or processing under an expired lease (`claimed_at` holds when
    // the lease ends). No row back: processed, or another worker holds it.
    let fresh = if settled {
        format!("'{PROCESSED}', ?, 1, NULL, TRUE, ?")
    } else {
        format!("'{PROCESSING}', ?, 1, ({now}) + {lease_secs}, FALSE, ?")
    };
    let claim = format!(
        "INSERT INTO stripe_events (id, \"type\", livemode, api_version, created, data, status, received_at, attempts, claimed_at, synced, processed_at) \
         VALUES (?, ?, ?, ?, ?, ?, {fresh}) \
         ON CONFLICT (id) DO UPDATE SET status = 'processing', attempts = stripe_events.attempts + 1, \
         claimed_at = ({now}) + {lease_secs} \
         WHERE stripe_events.status IN ({claimable}) \
         OR (stripe_events.status = '{PROCESSING}' AND stripe_events.claimed_at < ({now})) \
         RETURNING attempts, synced, handlers, status"
    );
    let data = event
        .text
        .as_deref()
        .map_or_else(|| event.raw.to_string(), str::to_owned);
    let values = [
        SqlValue::Text(Some(event.id.clone())),
        SqlValue::Text(Some(event.event_type.clone())),
        SqlValue::Bool(Some(event.livemode)),
        SqlValue::Text(event.api_version.clone()),
        SqlValue::Int(Some(event.created)),
        SqlValue::Text(Some(data)),
        SqlValue::Int(Some(t)),
        SqlValue::Int(settled.then_some(t)),
    ];
    let claimed: Option<Claimed> = match ride {
        // The delivery's row rides along: one round trip. Its id comes back whether the
        // event was claimed or not (`LEFT JOIN`).
        Some(ride) => {
            #[derive(QueryableByName)]
            struct Logged {
                #[diesel(sql_type = BigInt)]
                delivery: i64,
                #[diesel(sql_type = Nullable<Integer>)]
                attempts: Option<i32>,
                #[diesel(sql_type = Nullable<Bool>)]
                synced: Option<bool>,
                #[diesel(sql_type = Nullable<Text>)]
                handlers: Option<String>,
                #[diesel(sql_type = Nullable<Text>)]
                status: Option<String>,
            }
            let sql = format!(
                "WITH logged AS ({}), claimed AS ({claim}) \
                 SELECT logged.id AS delivery, claimed.attempts, claimed.synced, \
                 claimed.handlers, claimed.status FROM logged LEFT JOIN claimed ON TRUE",
                crate::webhooks::delivery::Ride::INSERT
            );
            let mut binds = ride.binds();
            binds.extend(values);
            let logged: Logged = on_conn!(conn, c => Bound::new(&sql, &binds).get_result(c))?;
            ride.written(logged.delivery);
            match logged {
                Logged {
                    attempts: Some(attempts),
                    synced: Some(synced),
                    handlers: Some(handlers),
                    status: Some(status),
                    ..
                } => Some(Claimed {
                    attempts,
                    synced,
                    handlers,
                    status,
                }),
                Logged { attempts: None, .. } => None,
                // The claim's columns are NOT NULL: claimed, all four are there.
                _ => {
                    return Err(Error::Corrupt {
                        what: format!("event {}", event.id),
                        problem: "its claim came back with a NULL column".to_owned(),
                    });
                }
            }
        }
        None => on_conn!(conn, c => Bound::new(&claim, &values).get_result(c).optional())?,
    };
    if let Some(Claimed {
        attempts,
        synced,
        handlers,
        status,
    }) = claimed
    {
        // Read as empty, a damaged log would run again handlers that succeeded. The
        // event alone fails: its claim is let go and its log kept for the operator.
        let handlers = match serde_json::from_str(&handlers) {
            Ok(handlers) => handlers,
            Err(e) => {
                let problem = format!("its handler log (`handlers`) is not a JSON object: {e}");
                on_conn!(conn, c => diesel::update(stripe_events::table.find(&event.id))
                    .set((
                        stripe_events::status.eq(status::FAILED),
                        stripe_events::error.eq(&problem),
                        stripe_events::claimed_at.eq(None::<i64>),
                    ))
                    .execute(c))?;
                return Ok(Claim::Unreadable(problem));
            }
        };
        // A claim sets `processing`: `processed` here is the new, settled row, whose
        // sync is still to run.
        let settled = status == PROCESSED;
        return Ok(Claim::Claimed {
            token: attempts,
            synced: synced && !settled,
            handlers,
            settled,
        });
    }
    Ok(match is_processed(conn, &event.id)? {
        true => Claim::Done,
        false => Claim::Busy,
    })
}

/// Whether event `id` is stored and processed: a redelivery of it has nothing to do.
pub(crate) fn is_processed(conn: &mut Conn<'_>, id: &str) -> Result<bool> {
    let current: Option<String> = on_conn!(conn, c => stripe_events::table
        .find(id)
        .select(stripe_events::status)
        .get_result(c)
        .optional())?;
    Ok(current.as_deref() == Some(status::PROCESSED))
}

/// Claims a row [`insert_and_claim`] stored settled (in the same transaction) once its
/// sync left work due: `processing` under a lease, like any claim.
pub(crate) fn reopen(conn: &mut Conn<'_>, id: &str, lease_secs: i64) -> Result<()> {
    let now = database_now(conn);
    let sql = format!(
        "UPDATE stripe_events SET status = '{}', claimed_at = ({now}) + {lease_secs}, processed_at = NULL WHERE id = ?",
        status::PROCESSING
    );
    execute(conn, &sql, &[SqlValue::Text(Some(id.to_owned()))])?;
    Ok(())
}

/// The stored `previous_attributes` of an event, if it has any.
pub(crate) fn previous_attributes(conn: &mut Conn<'_>, id: &str) -> Result<Option<Value>> {
    let data: Option<String> = on_conn!(conn, c => stripe_events::table
        .find(id)
        .select(stripe_events::data)
        .get_result(c)
        .optional())?;
    Ok(data
        .and_then(|d| serde_json::from_str::<Value>(&d).ok())
        .and_then(|v| v.pointer("/data/previous_attributes").cloned())
        .filter(|v| !v.is_null()))
}

/// Unix seconds now on the database server, as SQL.
pub(crate) fn database_now(conn: &Conn<'_>) -> &'static str {
    match conn {
        #[cfg(feature = "sqlite")]
        Conn::Sqlite(_) => "unixepoch()",
        #[cfg(feature = "postgres")]
        // Truncated, as SQLite's `unixepoch()` (a cast alone rounds: half a second on).
        Conn::Postgres(_) => "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp())) AS BIGINT)",
    }
}

/// Records the handlers due, before they run, so a crash leaves them pending, and
/// (`synced`) that the built-in sync applied.
pub(crate) fn record_handlers(
    conn: &mut Conn<'_>,
    id: &str,
    handlers: &HandlerLog,
    synced: bool,
) -> Result<()> {
    let log = serde_json::to_string(handlers).expect("a map of strings");
    on_conn!(conn, c => diesel::update(stripe_events::table.find(id))
        .set((stripe_events::handlers.eq(log), stripe_events::synced.eq(stripe_events::synced.or(diesel::dsl::sql::<diesel::sql_types::Bool>(if synced { "TRUE" } else { "FALSE" })))))
        .execute(c))?;
    Ok(())
}

/// The entries of a handler log not yet succeeded, as the event's error says them.
pub(crate) fn unfinished(handlers: &HandlerLog) -> Option<String> {
    let unfinished: Vec<&str> = handlers
        .iter()
        .filter(|(_, v)| v.as_str() != HANDLER_OK)
        .map(|(k, _)| k.as_str())
        .collect();
    (!unfinished.is_empty())
        .then(|| format!("handlers not yet succeeded: {}", unfinished.join(", ")))
}

/// Ends the claim `token`: processed when `error` is `None` and every handler in the
/// log succeeded, else failed. False when the claim was lost (its lease ended and
/// another worker took the event): nothing is written then. `keep_claim` (a handler
/// cut off by its timeout, maybe still at work): failed, but still claimed until the
/// lease ends, so neither a redelivery nor a replay runs it again before then.
pub(crate) fn finish(
    conn: &mut Conn<'_>,
    id: &str,
    token: i32,
    handlers: &HandlerLog,
    error: Option<&str>,
    synced: bool,
    keep_claim: bool,
) -> Result<bool> {
    let error = error.map(str::to_owned).or_else(|| unfinished(handlers));
    let status = match (&error, keep_claim) {
        // Still `processing` under the lease it holds: claimable again once it ends.
        (Some(_), true) => status::PROCESSING,
        (Some(_), false) => status::FAILED,
        (None, _) => status::PROCESSED,
    };
    let claimed_until = if status == status::PROCESSING {
        "claimed_at"
    } else {
        "NULL"
    };
    let log = serde_json::to_string(handlers).expect("a map of strings");
    let updated = on_conn!(conn, c => diesel::update(
            stripe_events::table
                .find(id)
                .filter(stripe_events::status.eq(status::PROCESSING))
                .filter(stripe_events::attempts.eq(token)),
        )
        .set((
            stripe_events::status.eq(status),
            stripe_events::error.eq(error),
            stripe_events::handlers.eq(log),
            stripe_events::processed_at.eq(now()),
            stripe_events::claimed_at.eq(diesel::dsl::sql::<diesel::sql_types::Nullable<diesel::sql_types::BigInt>>(claimed_until)),
            stripe_events::synced.eq(stripe_events::synced.or(diesel::dsl::sql::<diesel::sql_types::Bool>(if synced { "TRUE" } else { "FALSE" }))),
        ))
        .execute(c))?;
    Ok(updated == 1)
}
