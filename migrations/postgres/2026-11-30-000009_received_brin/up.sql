-- Less written per webhook delivery, as SQLite's "received by rowid" migration: a
-- B-tree on `received_at` costs every delivery one more entry (and page) in each log.
-- The logs are appended as deliveries arrive, so `received_at` follows the heap's
-- order: a BRIN index (one summary per 128 pages, kept by autovacuum) lets the daily
-- prune skip the recent pages at almost no cost per insert. `reconcile` reads the
-- events whose sync did not apply from a partial index, which an event stored
-- processed at once (no handler listens) never enters.
SET LOCAL lock_timeout = '10s';
DROP INDEX IF EXISTS idx_events_received_at;
DROP INDEX IF EXISTS idx_deliveries_received_at;
CREATE INDEX idx_events_received_brin ON stripe_events USING brin (received_at);
CREATE INDEX idx_deliveries_received_brin ON stripe_webhook_deliveries USING brin (received_at);
CREATE INDEX idx_events_unsynced ON stripe_events (received_at) WHERE synced = FALSE;
