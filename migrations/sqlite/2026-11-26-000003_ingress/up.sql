-- Retention (`stripe_mirror::webhooks::prune`, `stripe-mirror prune --older-than`)
-- deletes by age: index the receive times it filters on.
CREATE INDEX idx_deliveries_received_at ON stripe_webhook_deliveries (received_at);
CREATE INDEX idx_events_received_at ON stripe_events (received_at);
