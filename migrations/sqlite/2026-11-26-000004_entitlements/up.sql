-- Stripe Entitlements, mirrored like every other object (id, livemode, raw data,
-- stamp and tombstone, the ordering columns) with the typed columns access checks read.

-- A customer's active entitlement summary (`entitlements.active_entitlement_summary`,
-- pushed by its `.updated` event): one row per customer, keyed by the customer id.
-- lookup_keys holds the active features' lookup keys as ",key1,key2," for LIKE.
CREATE TABLE stripe_entitlement_summaries (
    id TEXT PRIMARY KEY NOT NULL,
    livemode BOOLEAN NOT NULL,
    data TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    stamp BIGINT NOT NULL,
    synced_at BIGINT NOT NULL,
    created BIGINT,
    stamp_rank INTEGER NOT NULL DEFAULT 0,
    stamp_event TEXT,
    reconcile BOOLEAN NOT NULL DEFAULT FALSE,
    customer_id TEXT,
    lookup_keys TEXT
);

-- Features attached to products (`product_feature`), from `ProductFeature::sync_for_product`.
CREATE TABLE stripe_product_features (
    id TEXT PRIMARY KEY NOT NULL,
    livemode BOOLEAN NOT NULL,
    data TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    stamp BIGINT NOT NULL,
    synced_at BIGINT NOT NULL,
    created BIGINT,
    stamp_rank INTEGER NOT NULL DEFAULT 0,
    stamp_event TEXT,
    reconcile BOOLEAN NOT NULL DEFAULT FALSE,
    product_id TEXT,
    lookup_key TEXT
);
CREATE INDEX idx_product_features_product_id ON stripe_product_features (product_id);
CREATE INDEX idx_prices_lookup_key ON stripe_prices (lookup_key);
