//! Re-running stored events: after a fix, or to replay a type of event.

use super::event::{self, Claim};
use super::{Event, Webhooks, matches_pattern, pipeline::claim_and_sync};
use crate::Mirror;
use crate::error::{Error, Result};

/// Which stored events [`Webhooks::process_events`] re-runs.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Events whose processing failed.
    pub failed: bool,
    /// These event ids, whatever their status.
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
    /// Events that failed again, with their errors.
    pub failed: Vec<(String, String)>,
    /// Events skipped because another worker held them.
    pub busy: usize,
}

impl Webhooks {
    /// Re-runs stored events: the failed ones, given ids (whatever their status), or
    /// those of a type (`customer.*`). The built-in sync never runs twice for an event;
    /// handlers run again.
    pub async fn process_events(
        &self,
        mirror: &Mirror,
        filter: &EventFilter,
    ) -> Result<ProcessReport> {
        if filter.ids.is_empty() && filter.event_type.is_none() && !filter.failed {
            return Ok(ProcessReport::default());
        }
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
        let mut report = ProcessReport::default();
        for event in events {
            let e = event.clone();
            let claim = match mirror
                .db()
                .run(move |conn| claim_and_sync(conn, &e, force, false))
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
