//! Where the rows received before a time end, on SQLite, without an index on
//! `received_at` (each cost every delivery one more page in its commit, and a commit's
//! flush grows with each page). The event and delivery logs are appended as deliveries
//! arrive and SQLite gives each new row the next rowid, so `received_at` grows with the
//! rowid: `prune` finds its range by a binary search over the rowid, and still tests
//! `received_at` itself, so a row out of order (the host's clock stepped back) is only
//! left for a later prune. A rebuild of either table must keep its rows' rowid order.
//! Postgres keeps its indexes.

use diesel::prelude::*;
use diesel::sql_types::BigInt;

/// The tables whose rows are looked up by when they were received.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Log {
    /// `stripe_events` (its rowid is implicit).
    Events,
    /// `stripe_webhook_deliveries` (its `id` is the rowid).
    Deliveries,
}

impl Log {
    fn table(self) -> &'static str {
        match self {
            Log::Events => "stripe_events",
            Log::Deliveries => "stripe_webhook_deliveries",
        }
    }
}

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = BigInt)]
    at_rowid: i64,
    #[diesel(sql_type = BigInt)]
    received_at: i64,
}

#[derive(QueryableByName)]
struct Bounds {
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    low: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    high: Option<i64>,
}

/// The rowid from which `log`'s rows were received at or after `at`: rows below it
/// were received before (as far as the search saw), rows from it on at or after.
/// One past the last row when none was received since `at`; 0 for an empty log.
pub(crate) fn first_received_since(
    conn: &mut SqliteConnection,
    log: Log,
    at: i64,
) -> QueryResult<i64> {
    let table = log.table();
    let bounds: Bounds = diesel::sql_query(format!(
        "SELECT MIN(rowid) AS low, MAX(rowid) AS high FROM {table}"
    ))
    .get_result(conn)?;
    let (Some(low), Some(high)) = (bounds.low, bounds.high) else {
        return Ok(0);
    };
    // The first row at or after a rowid (rowids have gaps where rows were deleted).
    let probe = diesel::sql_query(format!(
        "SELECT rowid AS at_rowid, received_at FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT 1"
    ));
    // Rows below `lo` were received before `at`; the row at `hi`, if any, at or after.
    let (mut lo, mut hi) = (low, high.saturating_add(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let found: Option<Found> = probe
            .clone()
            .bind::<BigInt, _>(mid)
            .get_result(conn)
            .optional()?;
        match found {
            // No row from `mid` to `hi`: the answer is at or below `mid`.
            Some(f) if f.at_rowid >= hi => hi = mid,
            None => hi = mid,
            Some(f) if f.received_at < at => lo = f.at_rowid + 1,
            Some(f) => hi = f.at_rowid,
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;

    fn log_of(received: &[i64]) -> SqliteConnection {
        let mut c = SqliteConnection::establish(":memory:").unwrap();
        c.batch_execute(
            "CREATE TABLE stripe_webhook_deliveries (id INTEGER PRIMARY KEY, received_at BIGINT NOT NULL)",
        )
        .unwrap();
        for at in received {
            c.batch_execute(&format!(
                "INSERT INTO stripe_webhook_deliveries (received_at) VALUES ({at})"
            ))
            .unwrap();
        }
        c
    }

    /// The search finds where a time range begins among rows in order, with gaps in
    /// the rowids, at either end and past both ends, as a scan would.
    #[test]
    fn the_search_finds_where_a_time_begins() {
        let received = [10, 10, 20, 30, 30, 30, 40, 50];
        let mut c = log_of(&received);
        // Gaps: rows 2 and 6 deleted (received at 10 and 30).
        c.batch_execute("DELETE FROM stripe_webhook_deliveries WHERE id IN (2, 6)")
            .unwrap();
        let ids = |c: &mut SqliteConnection, filter: String| -> String {
            #[derive(QueryableByName)]
            struct T {
                #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
                t: Option<String>,
            }
            let t: T = diesel::sql_query(format!(
                "SELECT group_concat(id, ',') AS t FROM \
                 (SELECT id FROM stripe_webhook_deliveries WHERE {filter} ORDER BY id)"
            ))
            .get_result(c)
            .unwrap();
            t.t.unwrap_or_default()
        };
        for at in [0, 10, 11, 20, 25, 30, 31, 40, 50, 51, 1000] {
            let from = first_received_since(&mut c, Log::Deliveries, at).unwrap();
            assert_eq!(
                ids(&mut c, format!("id >= {from}")),
                ids(&mut c, format!("received_at >= {at}")),
                "received since {at}"
            );
        }
        let mut empty = log_of(&[]);
        assert_eq!(
            first_received_since(&mut empty, Log::Deliveries, 5).unwrap(),
            0
        );
    }
}
