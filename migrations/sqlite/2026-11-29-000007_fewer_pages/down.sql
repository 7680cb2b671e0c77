CREATE TABLE stripe_access_old (
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
);
INSERT INTO stripe_access_old
    (subscriber_id, livemode, dirty, version, delivered, delivered_at, claimed_until, token, attempts, error)
    SELECT subscriber_id, livemode, dirty, version, delivered, delivered_at, claimed_until, token, attempts, error
    FROM stripe_access;
DROP TABLE stripe_access;
ALTER TABLE stripe_access_old RENAME TO stripe_access;
CREATE INDEX idx_access_dirty ON stripe_access (dirty);

CREATE TABLE stripe_webhook_deliveries_old (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
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
INSERT INTO stripe_webhook_deliveries_old
    (id, received_at, remote_addr, headers, body, body_size, body_truncated, valid, event_id, outcome, status_code, error)
    SELECT id, received_at, remote_addr, headers, body, body_size, body_truncated, valid, event_id, outcome, status_code, error
    FROM stripe_webhook_deliveries;
DROP TABLE stripe_webhook_deliveries;
ALTER TABLE stripe_webhook_deliveries_old RENAME TO stripe_webhook_deliveries;
CREATE INDEX idx_deliveries_received_at ON stripe_webhook_deliveries (received_at);

DROP INDEX idx_events_failed;
CREATE INDEX idx_events_status ON stripe_events (status);
CREATE INDEX idx_deliveries_event_id ON stripe_webhook_deliveries (event_id);
CREATE INDEX idx_events_type ON stripe_events (type);
