-- Back to the server's default for values written from now on.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE stripe_customers ALTER COLUMN data SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_products ALTER COLUMN data SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_prices ALTER COLUMN data SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_subscriptions ALTER COLUMN data SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_subscription_items ALTER COLUMN data SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_entitlement_summaries ALTER COLUMN data SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_product_features ALTER COLUMN data SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_events ALTER COLUMN data SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_webhook_deliveries ALTER COLUMN headers SET COMPRESSION DEFAULT;
        ALTER TABLE stripe_webhook_deliveries ALTER COLUMN body SET COMPRESSION DEFAULT;
    END IF;
END
$$;
