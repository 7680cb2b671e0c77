DROP INDEX idx_events_unsynced;
DROP INDEX idx_deliveries_received_brin;
DROP INDEX idx_events_received_brin;
CREATE INDEX idx_events_received_at ON stripe_events (received_at);
CREATE INDEX idx_deliveries_received_at ON stripe_webhook_deliveries (received_at);
