DROP INDEX idx_events_failed;
CREATE INDEX idx_events_status ON stripe_events (status);
CREATE INDEX idx_deliveries_event_id ON stripe_webhook_deliveries (event_id);
CREATE INDEX idx_events_type ON stripe_events (type);
