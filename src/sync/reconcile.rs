//! Reconcile: re-fetch what the mirror cannot vouch for, so it converges on Stripe
//! even when webhooks were missed, refused or could not be ordered.
//!
//! Three sources, each object fetched once per run (`sync`'s one re-fetch, through
//! the guard):
//! 1. rows flagged `reconcile`: a same-second tie nothing in the events settled and no
//!    API key was at hand to settle it then;
//! 2. objects of stored events whose built-in sync did not apply (a shape the mirror
//!    could not map, a failure), received in the window;
//! 3. objects named by Stripe's own event list (`GET /v1/events`) for the window:
//!    events Stripe sent that never reached the mirror (an outage, a wrong secret, a
//!    deleted endpoint). Only the objects are fetched: the events themselves are left
//!    for Stripe's redelivery, so the host's handlers still run for them. A completed
//!    Checkout Session among them also links its customer to its subscriber, by the
//!    rule its `checkout.session.completed` webhook follows: a Payment Link buyer is
//!    known to the app only through it.
//!
//! Schedule it: hourly with a window a little longer than the interval
//! (`stripe-mirror reconcile --since 2h` from cron or a systemd timer), after an
//! outage with a window covering it, and after deploying a fix for events that failed.
//! Stripe keeps events for 30 days.

use std::collections::BTreeSet;
use std::time::Duration;

use diesel::prelude::*;
use serde_json::{Value, json};

use super::remote::{Refetch, refetch};
use crate::Mirror;
use crate::db::statement::{Bound, SqlValue};
use crate::db::{Conn, on_conn};
use crate::error::Result;

/// What [`reconcile`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Objects re-fetched and written (or left, when the mirror held fresher data).
    pub refetched: usize,
    /// Objects Stripe no longer has: now tombstones.
    pub tombstoned: usize,
    /// Objects that could not be fetched: kind, id, error. Run again later.
    pub failed: Vec<(String, String, String)>,
    /// Completed Checkout Sessions in Stripe's event list put through the webhook's
    /// linking rule (which links a customer to the session's subscriber when it may,
    /// and does nothing when it is linked already or must not be).
    pub checkout_sessions: usize,
}

/// Re-fetches flagged rows, the objects of events whose sync failed, and the objects
/// of every event Stripe lists since `since` ago; see the [module docs](self) for when
/// to schedule it.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
/// use std::time::Duration;
/// let report = stripe_mirror::reconcile(&mirror, Duration::from_secs(2 * 3600)).await?;
/// println!("{} re-fetched, {} gone, {} failed", report.refetched, report.tombstoned, report.failed.len());
/// # Ok(()) }
/// ```
pub async fn reconcile(mirror: &Mirror, since: Duration) -> Result<ReconcileReport> {
    // Saturating: a `since` longer than the epoch looks back to its start.
    let back = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let (from, live) = (mirror.now().saturating_sub(back).max(0), mirror.live_mode());
    let mut wanted: BTreeSet<(&'static str, String)> = mirror
        .db()
        .run(move |conn| local_suspects(conn, from, live))
        .await?;
    let (missed, sessions) = missed_events(mirror, from, live).await?;
    wanted.extend(missed);

    let mut report = ReconcileReport::default();
    // Linked before the fetches, which then find the customer's subscriber (a missed
    // webhook left a Payment Link buyer's customer without one).
    for session in sessions {
        let id = session
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("<no id>");
        let source = format!("reconcile: checkout session {id}");
        let linked = session.clone();
        let done = mirror
            .db()
            .run(move |conn| {
                conn.write(|c| crate::webhooks::link_session(c, &linked, live, &source))
            })
            .await;
        if let Err(err) = done {
            report
                .failed
                .push(("checkout.session".into(), id.to_owned(), err.to_string()));
            continue;
        }
        for kind in ["customer", "subscription"] {
            if let Some(id) = crate::sync::upsert::id_named(&session, kind) {
                wanted.insert((kind, id.to_owned()));
            }
        }
        report.checkout_sessions += 1;
    }
    for (kind, id) in wanted {
        let table = crate::models::table_for_kind(kind).expect("a mirrored kind");
        match refetch(mirror, table, &id).await {
            Ok(Refetch::Current) => report.refetched += 1,
            Ok(Refetch::Gone) => report.tombstoned += 1,
            Err(err) => report.failed.push((kind.to_owned(), id, err.to_string())),
        }
    }
    Ok(report)
}

/// The mirrored object an event is about, if the mirror keeps that kind.
fn object_of(event: &Value) -> Option<(&'static str, String)> {
    let object = event.pointer("/data/object")?;
    let table = crate::models::table_for_kind(object.get("object")?.as_str()?)?;
    if !super::remote::fetchable(table) {
        return None;
    }
    Some((table.kind, table.id_in(object)?))
}

/// The events of a mode received since a time whose sync did not apply. `synced =
/// FALSE` is written as is (not bound): on SQLite these events have a partial index of
/// their own (`idx_events_unsynced`), which only a constant lets the planner use.
pub(crate) const UNSYNCED_SINCE: &str =
    "SELECT data FROM stripe_events WHERE synced = FALSE AND livemode = ? AND received_at >= ?";

/// Flagged rows, and objects of events received since `from` whose sync did not apply,
/// in the current mode (the other mode's objects need the other mode's key).
fn local_suspects(
    conn: &mut Conn<'_>,
    from: i64,
    live: bool,
) -> Result<BTreeSet<(&'static str, String)>> {
    let mut wanted = BTreeSet::new();
    for table in crate::models::MIRRORED
        .iter()
        .filter(|t| super::remote::fetchable(t))
    {
        let ids: Vec<String> = on_conn!(conn, c => diesel::sql_query(format!(
                "SELECT id FROM {} WHERE reconcile = TRUE AND livemode = {}",
                table.table,
                if live { "TRUE" } else { "FALSE" }
            ))
            .load::<Id>(c))?
        .into_iter()
        .map(|row| row.id)
        .collect();
        wanted.extend(ids.into_iter().map(|id| (table.kind, id)));
    }
    #[derive(QueryableByName)]
    struct Data {
        #[diesel(sql_type = diesel::sql_types::Text)]
        data: String,
    }
    let values = [SqlValue::Bool(Some(live)), SqlValue::Int(Some(from))];
    let unsynced: Vec<Data> = on_conn!(conn, c => Bound::new(UNSYNCED_SINCE, &values).load(c))?;
    wanted.extend(
        unsynced
            .iter()
            .filter_map(|row| serde_json::from_str::<Value>(&row.data).ok())
            .filter_map(|event| object_of(&event)),
    );
    Ok(wanted)
}

/// A row's id, loaded by a query written as text.
#[derive(QueryableByName)]
pub(super) struct Id {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(super) id: String,
}

/// Objects named by the events Stripe lists as created since `from`, and the sessions
/// of its `checkout.session.completed` events (the platform's, of the mirror's mode).
async fn missed_events(
    mirror: &Mirror,
    from: i64,
    live: bool,
) -> Result<(BTreeSet<(&'static str, String)>, Vec<Value>)> {
    let client = mirror.stripe().await?;
    let mut wanted = BTreeSet::new();
    let mut sessions = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut query = json!({ "limit": 100, "created": { "gte": from } });
        if let Some(a) = &after {
            query["starting_after"] = json!(a);
        }
        let page = client.get("/events", &query, Some("event list")).await?;
        let events = page
            .get("data")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let in_window = events.iter().filter(|e| {
            e.get("created")
                .and_then(Value::as_i64)
                .is_none_or(|c| c >= from)
        });
        for event in in_window {
            wanted.extend(object_of(event));
            let platform = event.get("account").is_none_or(Value::is_null);
            let of_mode = event.get("livemode").and_then(Value::as_bool) == Some(live);
            if event.get("type").and_then(Value::as_str) == Some("checkout.session.completed")
                && platform
                && of_mode
                && let Some(session) = event.pointer("/data/object")
            {
                sessions.push(session.clone());
            }
        }
        let has_more = page.get("has_more").and_then(Value::as_bool) == Some(true);
        after = crate::stripe::next_after(&events, has_more, after.as_deref(), "event")?;
        if after.is_none() {
            return Ok((wanted, sessions));
        }
    }
}
