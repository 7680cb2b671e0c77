-- Each subscriber's access as last told to the host's `on_access_change` hook.
-- A write to the mirror that may change a subscriber's access (their customer, its
-- subscriptions and entitlements, a product's roles or features) marks the row
-- dirty and bumps `version` in the same transaction, so no change is lost; delivery
-- computes the access from the mirror, calls the hook when it differs from
-- `delivered`, and clears `dirty` only if no write came in meanwhile.
CREATE TABLE stripe_access (
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
CREATE INDEX idx_access_dirty ON stripe_access (dirty);
