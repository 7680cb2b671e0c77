ALTER TABLE stripe_customers DROP COLUMN subscriber_in_metadata;
