//! Re-running stored events: after a fix, or to replay a type of event.

use super::event;
use super::pipeline::{CLAIM_LOST, Progress, claim_and_sync, follow_up, lease_secs};
use super::{Event, Webhooks, matches_pattern};
use crate::Mirror;
use crate::error::{Error, Result};

/// Which stored events [`Webhooks::process_events`] re-runs.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Events whose processing failed, or stopped: a worker killed while it held the
    /// event, or a handler cut off by its timeout, leaves it `processing` until its
    /// claim's lease ends, then it counts here.
    pub failed: bool,
    /// These event ids: whatever their status alone; with `failed`, those of them
    /// failed or stopped (the others are left, and not counted as `not_found`).
    pub ids: Vec<String>,
    /// Events whose type matches (`customer.*`, `invoice.paid`): with `failed`, the
    /// failed ones of that type; alone, every stored event of that type.
    pub event_type: Option<String>,
}

/// What [`Webhooks::process_events`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessReport {
    /// Events that ran through without error.
    pub processed: usize,
    /// Events synced whose handler work is left for handlers this registry does not
    /// have (a replay from the CLI): they stay failed until the host app replays them
    /// or Stripe redelivers them.
    pub handlers_pending: usize,
    /// Events that failed again, with their errors.
    pub failed: Vec<(String, String)>,
    /// Events skipped because another worker held them.
    pub busy: usize,
    /// Ids asked for ([`EventFilter::ids`]) that no stored event has (a typo, or
    /// pruned).
    pub not_found: Vec<String>,
}

impl Webhooks {
    /// Re-runs stored events: the failed ones, given ids (whatever their status), or
    /// those of a type (`customer.*`). The built-in sync never runs twice for an event,
    /// and a handler that succeeded for an event never runs again for it: a replay runs
    /// exactly the handlers of this registry not yet succeeded. A registry without the
    /// host's handlers (the CLI's) re-runs the built-in sync only and leaves recorded
    /// handler work pending.
    pub async fn process_events(
        &self,
        mirror: &Mirror,
        filter: &EventFilter,
    ) -> Result<ProcessReport> {
        if filter.ids.is_empty() && filter.event_type.is_none() && !filter.failed {
            return Ok(ProcessReport::default());
        }
        // The ids first (their types filtered here), the events a page at a time: a
        // month of stored events does not fit in memory.
        let f = filter.clone();
        let (ids, not_found): (Vec<String>, Vec<String>) = mirror
            .db()
            .run(move |conn| {
                use crate::db::schema::stripe_events as ev;
                use diesel::prelude::*;
                // A worker killed while it held an event leaves it `processing` under a
                // lease that ends: once it has, the event is as failed.
                let stuck = format!(
                    "(status = '{}' AND claimed_at < {})",
                    event::status::PROCESSING,
                    event::database_now(conn)
                );
                let asked = f.ids.clone();
                let stored: Vec<String> = match asked.is_empty() {
                    true => Vec::new(),
                    false => crate::db::on_conn!(conn, c => ev::table
                        .select(ev::id)
                        .filter(ev::id.eq_any(&asked))
                        .load(c))?,
                };
                let not_found = asked
                    .into_iter()
                    .filter(|id| !stored.contains(id))
                    .collect();
                let rows: Vec<(String, String)> = crate::db::on_conn!(conn, c => {
                    let mut q = ev::table
                        .select((ev::id, ev::event_type))
                        .order((ev::created.asc(), ev::id.asc()))
                        .into_boxed();
                    if !f.ids.is_empty() {
                        q = q.filter(ev::id.eq_any(f.ids.clone()));
                    }
                    if f.failed {
                        q = q.filter(
                            ev::status
                                .eq(event::status::FAILED)
                                .or(diesel::dsl::sql::<diesel::sql_types::Bool>(&stuck)),
                        );
                    }
                    q.load(c)
                })?;
                let ids = rows
                    .into_iter()
                    .filter(|(_, t)| {
                        f.event_type
                            .as_deref()
                            .is_none_or(|p| matches_pattern(p, t))
                    })
                    .map(|(id, _)| id)
                    .collect();
                Ok((ids, not_found))
            })
            .await?;
        // Only an explicit choice of events replays processed ones.
        let force = !filter.ids.is_empty() || (filter.event_type.is_some() && !filter.failed);
        let mut report = ProcessReport {
            not_found,
            ..ProcessReport::default()
        };
        for page in ids.chunks(REPLAY_PAGE) {
            let page = page.to_vec();
            let events: Vec<(String, Result<Event>)> = mirror
                .db()
                .run(move |conn| {
                    use crate::db::schema::stripe_events as ev;
                    use diesel::prelude::*;
                    let mut rows: Vec<event::EventRow> = crate::db::on_conn!(conn, c => ev::table
                        .select(event::EventRow::as_select())
                        .filter(ev::id.eq_any(&page))
                        .load(c))?;
                    // In the order the ids were listed (created, then id).
                    rows.sort_by_key(|r| page.iter().position(|id| *id == r.id));
                    Ok(rows
                        .into_iter()
                        .map(|r| (r.id.clone(), r.into_event()))
                        .collect())
                })
                .await?;
            // A row that cannot be read (stored by an older version, or edited by hand)
            // is reported with the others that failed; the replay goes on past it.
            let mut readable = Vec::with_capacity(events.len());
            for (id, event) in events {
                match event {
                    Ok(event) => readable.push(event),
                    Err(err) => report.failed.push((id, err.to_string())),
                }
            }
            self.replay_page(mirror, readable, force, &mut report)
                .await?;
        }
        Ok(report)
    }

    /// Re-runs one page of [`process_events`](Self::process_events)' events.
    async fn replay_page(
        &self,
        mirror: &Mirror,
        events: Vec<Event>,
        force: bool,
        report: &mut ProcessReport,
    ) -> Result<()> {
        let lease = lease_secs(mirror);
        let access = self.has_access_hook().then_some(mirror.live_mode());
        for event in events {
            let (e, keys, t) = (
                event.clone(),
                self.handler_keys(&event, mirror.live_mode()),
                mirror.now(),
            );
            let progress = mirror
                .db()
                .run(move |conn| claim_and_sync(conn, &e, force, t, lease, &keys, access, None))
                .await;
            let mut work = match progress {
                Ok(Progress::Claimed(work)) => work,
                Ok(Progress::Done) => continue,
                Ok(Progress::Busy) => {
                    report.busy += 1;
                    continue;
                }
                // The object cannot be mirrored, or the row cannot be read: the event
                // stays as it was, the replay goes on.
                Err(err @ (Error::Mapping { .. } | Error::Corrupt { .. })) => {
                    report.failed.push((event.id, err.to_string()));
                    continue;
                }
                Err(err) => return Err(err),
            };
            // The handlers see this claim's count.
            let event = Event {
                attempts: work.token,
                ..event
            };
            let mut fetched = Ok(());
            if let Some((table, id)) = work.follow_up.clone() {
                fetched = follow_up(mirror, &event, &mut work, table, &id).await;
            }
            // As a delivery: the handlers wait until the re-fetch has landed.
            let (error, keep_claim) = match fetched {
                Err(failed) => (Some(failed), false),
                Ok(()) if work.due => match self.run_due(mirror, &event, &mut work).await {
                    Ok(_) => (None, false),
                    Err(f) => (Some(f.error), f.keep_claim),
                },
                Ok(()) => (None, false),
            };
            let pending = work.handlers.values().any(|v| v != event::HANDLER_OK);
            if work.due {
                let (id, err) = (event.id.clone(), error.clone());
                let kept = mirror
                    .db()
                    .run(move |conn| {
                        let handlers = &work.handlers;
                        event::finish(
                            conn,
                            &id,
                            work.token,
                            handlers,
                            err.as_deref(),
                            false,
                            keep_claim,
                        )
                    })
                    .await?;
                if !kept {
                    report.failed.push((event.id, CLAIM_LOST.to_owned()));
                    continue;
                }
            }
            match error {
                Some(error) => report.failed.push((event.id, error)),
                None if pending => report.handlers_pending += 1,
                None => report.processed += 1,
            }
        }
        Ok(())
    }
}

/// Events [`Webhooks::process_events`] holds in memory at once.
const REPLAY_PAGE: usize = 100;
