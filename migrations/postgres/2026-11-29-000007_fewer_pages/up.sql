-- Less written per webhook delivery: every index is one more entry (and page) per row.
-- Each statement waits at most 10 s for its table's lock: a long transaction makes
-- `migrate` fail (run it again later) rather than queue a running app's queries.
SET LOCAL lock_timeout = '10s';
-- Indexes no query of the mirror reads: the event type (replay matches types in Rust)
-- and a delivery's event id. Create your own if your admin pages look them up.
DROP INDEX idx_events_type;
DROP INDEX idx_deliveries_event_id;

-- Events are looked up by status only to replay the failed ones: index those alone,
-- so the processed events (nearly all) are not written to it.
DROP INDEX idx_events_status;
CREATE INDEX idx_events_failed ON stripe_events (created, id) WHERE status = 'failed';
