-- The event log and the delivery log are appended in the order they are received, so
-- on SQLite a row's rowid grows with its `received_at`: the daily prune finds its rows
-- by a binary search over the rowid (src/db/received.rs). `reconcile` reads the events
-- whose sync did not apply from a partial index, which an event stored processed at
-- once (no handler listens) never enters. The two indexes cost every delivery two
-- pages in its commit (about a sixth of what it writes), and a commit's time on disk
-- grows with each page it writes.
DROP INDEX IF EXISTS idx_events_received_at;
DROP INDEX IF EXISTS idx_deliveries_received_at;
CREATE INDEX idx_events_unsynced ON stripe_events (received_at) WHERE synced = FALSE;
