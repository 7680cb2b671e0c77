-- The mirror. Each mirrored table: the Stripe id, the raw object (`data`, JSON text;
-- on Postgres query it with `data::jsonb`), a freshness `stamp` (unix seconds of the
-- data held: event `created` or fetch time) and a `deleted` tombstone, plus typed
-- columns for queries. No foreign keys: webhooks arrive in any order.

CREATE TABLE stripe_customers (
    id TEXT PRIMARY KEY NOT NULL,
    livemode BOOLEAN NOT NULL,
    data TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    stamp BIGINT NOT NULL,
    synced_at BIGINT NOT NULL,
    created BIGINT,
    email TEXT,
    name TEXT,
    subscriber_id TEXT
);
CREATE TABLE stripe_products (
    id TEXT PRIMARY KEY NOT NULL,
    livemode BOOLEAN NOT NULL,
    data TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    stamp BIGINT NOT NULL,
    synced_at BIGINT NOT NULL,
    created BIGINT,
    name TEXT,
    active BOOLEAN
);
CREATE TABLE stripe_prices (
    id TEXT PRIMARY KEY NOT NULL,
    livemode BOOLEAN NOT NULL,
    data TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    stamp BIGINT NOT NULL,
    synced_at BIGINT NOT NULL,
    created BIGINT,
    product_id TEXT,
    active BOOLEAN,
    currency TEXT,
    unit_amount BIGINT,
    recurring_interval TEXT,
    recurring_interval_count BIGINT,
    lookup_key TEXT
);
CREATE TABLE stripe_subscriptions (
    id TEXT PRIMARY KEY NOT NULL,
    livemode BOOLEAN NOT NULL,
    data TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    stamp BIGINT NOT NULL,
    synced_at BIGINT NOT NULL,
    created BIGINT,
    customer_id TEXT,
    status TEXT,
    current_period_start BIGINT,
    current_period_end BIGINT,
    cancel_at_period_end BOOLEAN,
    cancel_at BIGINT,
    canceled_at BIGINT,
    ended_at BIGINT,
    trial_start BIGINT,
    trial_end BIGINT
);
CREATE TABLE stripe_subscription_items (
    id TEXT PRIMARY KEY NOT NULL,
    livemode BOOLEAN NOT NULL,
    data TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    stamp BIGINT NOT NULL,
    synced_at BIGINT NOT NULL,
    created BIGINT,
    subscription_id TEXT,
    price_id TEXT,
    product_id TEXT,
    quantity BIGINT,
    current_period_start BIGINT,
    current_period_end BIGINT
);
CREATE INDEX idx_customers_subscriber_id_livemode ON stripe_customers (subscriber_id, livemode);
CREATE INDEX idx_customers_email ON stripe_customers (email);
CREATE INDEX idx_prices_product_id ON stripe_prices (product_id);
CREATE INDEX idx_subscriptions_customer_id ON stripe_subscriptions (customer_id);
CREATE INDEX idx_subscription_items_subscription_id ON stripe_subscription_items (subscription_id);
CREATE INDEX idx_subscription_items_product_id ON stripe_subscription_items (product_id);

-- API keys added by the host app (kind and mode come from the key's prefix).
CREATE TABLE stripe_api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    livemode BOOLEAN NOT NULL,
    secret TEXT NOT NULL UNIQUE,
    name TEXT,
    created_at BIGINT NOT NULL
);

-- Each Stripe event once, by id, with its processing status: pending, processing
-- (claimed by a worker at claimed_at), processed or failed; synced once the built-in
-- sync has applied it.
CREATE TABLE stripe_events (
    id TEXT PRIMARY KEY NOT NULL,
    type TEXT NOT NULL,
    livemode BOOLEAN NOT NULL,
    api_version TEXT,
    created BIGINT NOT NULL,
    data TEXT NOT NULL,
    status TEXT NOT NULL,
    synced BOOLEAN NOT NULL DEFAULT FALSE,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_at BIGINT,
    received_at BIGINT NOT NULL,
    processed_at BIGINT
);
CREATE INDEX idx_events_status ON stripe_events (status);
CREATE INDEX idx_events_type ON stripe_events (type);

-- Every webhook request received, valid or not (dj-stripe's WebhookEventTrigger).
CREATE TABLE stripe_webhook_deliveries (
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
CREATE INDEX idx_deliveries_event_id ON stripe_webhook_deliveries (event_id);
