DROP INDEX IF EXISTS idx_events_unsynced;
CREATE INDEX IF NOT EXISTS idx_events_received_at ON stripe_events (received_at);
CREATE INDEX IF NOT EXISTS idx_deliveries_received_at ON stripe_webhook_deliveries (received_at);
