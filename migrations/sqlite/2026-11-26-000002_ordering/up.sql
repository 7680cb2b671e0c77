-- Ordering beyond whole seconds, and handler bookkeeping.
-- stamp_rank orders writes that share a stamp (Stripe stamps events in whole seconds):
-- 1 created < 2 updated < 3 fetched from the API < 4 deleted. stamp_event is the event
-- whose data the row holds (NULL for API data), read to settle same-second updates by
-- their previous_attributes. reconcile flags a row whose freshness could not be decided
-- for `stripe-mirror reconcile`. stripe_events.claimed_at now holds when a claim's lease
-- ends (a worker past it may be taken over, and cannot finish the event).
ALTER TABLE stripe_customers ADD COLUMN stamp_rank INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stripe_customers ADD COLUMN stamp_event TEXT;
ALTER TABLE stripe_customers ADD COLUMN reconcile BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE stripe_products ADD COLUMN stamp_rank INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stripe_products ADD COLUMN stamp_event TEXT;
ALTER TABLE stripe_products ADD COLUMN reconcile BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE stripe_prices ADD COLUMN stamp_rank INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stripe_prices ADD COLUMN stamp_event TEXT;
ALTER TABLE stripe_prices ADD COLUMN reconcile BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE stripe_subscriptions ADD COLUMN stamp_rank INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stripe_subscriptions ADD COLUMN stamp_event TEXT;
ALTER TABLE stripe_subscriptions ADD COLUMN reconcile BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE stripe_subscription_items ADD COLUMN stamp_rank INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stripe_subscription_items ADD COLUMN stamp_event TEXT;
ALTER TABLE stripe_subscription_items ADD COLUMN reconcile BOOLEAN NOT NULL DEFAULT FALSE;

-- Per-handler outcome of each event, as a JSON object {handler: "ok" | "pending" | error}:
-- a replay runs only the handlers that have not succeeded.
ALTER TABLE stripe_events ADD COLUMN handlers TEXT NOT NULL DEFAULT '{}';
