DROP INDEX idx_events_received_at;
DROP INDEX idx_deliveries_received_at;
