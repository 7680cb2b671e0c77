//! Retention: bounds the delivery log and the stored events ([`prune`], and
//! `stripe-mirror prune --older-than 30d`). Schedule it daily, or as often as the log
//! grows too fast for you.

use std::time::Duration;

use diesel::RunQueryDsl;

use super::event::status;
use crate::Mirror;
use crate::db::on_conn;
use crate::error::{Error, Result};
use crate::sync::now;

/// The youngest age [`prune`] accepts: three days, the longest Stripe retries an event
/// for. An event pruned younger could arrive again and be processed as new.
pub const MIN_AGE: Duration = Duration::from_secs(3 * 24 * 3600);

/// What [`prune`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Rows removed from `stripe_webhook_deliveries`: deliveries received before the
    /// cut-off whose event is not kept (refused requests, duplicates and the deliveries
    /// of pruned events).
    pub deliveries: usize,
    /// Rows removed from `stripe_events`: events received before the cut-off and
    /// processed.
    pub events: usize,
}

/// Deletes what is older than `older_than` (received before now minus it), in one
/// transaction:
///
/// - events that were processed; failed events, and events still pending or being
///   processed, are kept whatever their age, so `process_events` can still re-run them;
/// - deliveries, except those of an event that is kept, so a failed event keeps the
///   requests that brought it.
///
/// On SQLite the rows are found by their rowid, which grows with the time they were
/// received (it keeps an index off every delivery's commit, `db::received`): a row
/// received out of order, after a step back of the host's clock, may wait for a later
/// prune. Nothing received after the cut-off is ever removed.
///
/// The mirrored objects are never touched. Idempotency holds for as long as an event
/// is kept: Stripe retries an event for up to three days, so an age below
/// [`MIN_AGE`] is refused with [`Error::Config`](crate::Error::Config) (a redelivery
/// of a pruned event would run its handlers again). `stripe-mirror prune
/// --older-than 30d` is a good default: Stripe keeps events 30 days, and one resent
/// by hand (Dashboard, `stripe events resend`) after it was pruned is stored as new
/// and runs its handlers again.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
/// let month = std::time::Duration::from_secs(30 * 24 * 3600);
/// let report = stripe_mirror::webhooks::prune(&mirror, month).await?;
/// println!("removed {} deliveries, {} events", report.deliveries, report.events);
/// # Ok(()) }
/// ```
pub async fn prune(mirror: &Mirror, older_than: Duration) -> Result<PruneReport> {
    if older_than < MIN_AGE {
        return Err(Error::Config(format!(
            "prune keeps at least 3 days ({} s), Stripe's retry window: a redelivery of an \
             event pruned sooner would run its handlers again; asked for {} s",
            MIN_AGE.as_secs(),
            older_than.as_secs()
        )));
    }
    let age = i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX);
    let cutoff = now().saturating_sub(age);
    mirror
        .db()
        .run(move |conn| {
            conn.write(|conn| {
                // On SQLite, where the rows received before the cut-off end: found by
                // rowid, with no index on `received_at` there (`db::received`). A row
                // received out of order past that point waits for the next prune.
                let (events_end, deliveries_end) = match conn {
                    #[cfg(feature = "sqlite")]
                    crate::db::Conn::Sqlite(c) => {
                        use crate::db::received::{Log, first_received_since};
                        let events = first_received_since(c, Log::Events, cutoff)?;
                        let deliveries = first_received_since(c, Log::Deliveries, cutoff)?;
                        (
                            format!(" AND rowid < {events}"),
                            format!(" AND id < {deliveries}"),
                        )
                    }
                    #[allow(unreachable_patterns)]
                    _ => (String::new(), String::new()),
                };
                // `cutoff` and the ends are numbers and the status a constant: nothing
                // to bind.
                let events = format!(
                    "DELETE FROM stripe_events WHERE status = '{}' AND received_at < {cutoff}{events_end}",
                    status::PROCESSED
                );
                // `NOT EXISTS`, not `NOT IN`: Postgres cannot turn `NOT IN` into an
                // anti-join, and past its hash memory it scans the events once per
                // delivery.
                let deliveries = format!(
                    "DELETE FROM stripe_webhook_deliveries WHERE received_at < {cutoff}{deliveries_end} \
                     AND (event_id IS NULL OR NOT EXISTS \
                     (SELECT 1 FROM stripe_events e WHERE e.id = stripe_webhook_deliveries.event_id))"
                );
                on_conn!(conn, c => {
                    let events = diesel::sql_query(events).execute(c)?;
                    let deliveries = diesel::sql_query(deliveries).execute(c)?;
                    Ok(PruneReport { deliveries, events })
                })
            })
        })
        .await
}
