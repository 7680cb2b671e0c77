-- Fewer pages written per webhook delivery. A commit writes every page it changed, and
-- each B-tree a delivery touches (a table, each of its indexes) is at least one page:
-- 15 pages per delivery before this migration, most of a commit's cost (benches/README.md).

-- Indexes no query of the mirror reads: the event type (replay matches types in Rust)
-- and a delivery's event id. Create your own if your admin pages look them up.
DROP INDEX idx_events_type;
DROP INDEX idx_deliveries_event_id;

-- Events are looked up by status only to replay the failed ones: index those alone,
-- so the processed events (nearly all) are not written to it.
DROP INDEX idx_events_status;
CREATE INDEX idx_events_failed ON stripe_events (created, id) WHERE status = 'failed';

-- Delivery ids without AUTOINCREMENT: still increasing (a new row takes the largest id
-- plus one), without a write to `sqlite_sequence` on every delivery.
CREATE TABLE stripe_webhook_deliveries_new (
    id INTEGER PRIMARY KEY NOT NULL,
    received_at BIGINT NOT NULL,
    remote_addr TEXT,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    body_size BIGINT NOT NULL,
    body_truncated BOOLEAN NOT NULL,
    valid BOOLEAN NOT NULL DEFAULT FALSE,
    event_id TEXT,
    outcome TEXT NOT NULL,
    status_code INTEGER,
    error TEXT
);
INSERT INTO stripe_webhook_deliveries_new
    (id, received_at, remote_addr, headers, body, body_size, body_truncated, valid, event_id, outcome, status_code, error)
    SELECT id, received_at, remote_addr, headers, body, body_size, body_truncated, valid, event_id, outcome, status_code, error
    FROM stripe_webhook_deliveries;
DROP TABLE stripe_webhook_deliveries;
ALTER TABLE stripe_webhook_deliveries_new RENAME TO stripe_webhook_deliveries;
CREATE INDEX idx_deliveries_received_at ON stripe_webhook_deliveries (received_at);

-- Access rows stored in their key's B-tree (WITHOUT ROWID): one B-tree instead of a
-- table and the index of its key.
CREATE TABLE stripe_access_new (
    subscriber_id TEXT NOT NULL,
    livemode BOOLEAN NOT NULL,
    dirty BOOLEAN NOT NULL DEFAULT TRUE,
    version BIGINT NOT NULL DEFAULT 1,
    delivered TEXT,
    delivered_at BIGINT,
    claimed_until BIGINT,
    token INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    PRIMARY KEY (subscriber_id, livemode)
) WITHOUT ROWID;
INSERT INTO stripe_access_new
    (subscriber_id, livemode, dirty, version, delivered, delivered_at, claimed_until, token, attempts, error)
    SELECT subscriber_id, livemode, dirty, version, delivered, delivered_at, claimed_until, token, attempts, error
    FROM stripe_access;
DROP TABLE stripe_access;
ALTER TABLE stripe_access_new RENAME TO stripe_access;
CREATE INDEX idx_access_dirty ON stripe_access (dirty);
