-- Stripe objects and event bodies are JSON of 1-5 KiB: Postgres compresses the larger
-- ones on every write, and its default (pglz) took about a tenth of the server's CPU
-- in the webhook benchmark. lz4 compresses them several times faster. Applied only
-- where the server was built with lz4 (PostgreSQL 14 and later, most packages); it
-- concerns values written from now on, nothing is rewritten.
-- Each ALTER waits at most 10 s for its table's lock (the tables already altered stay
-- locked until the migration commits): a long transaction makes `migrate` fail rather
-- than queue a running app's queries indefinitely; run it again later.
SET LOCAL lock_timeout = '10s';
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE stripe_customers ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE stripe_products ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE stripe_prices ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE stripe_subscriptions ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE stripe_subscription_items ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE stripe_entitlement_summaries ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE stripe_product_features ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE stripe_events ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE stripe_webhook_deliveries ALTER COLUMN headers SET COMPRESSION lz4;
        ALTER TABLE stripe_webhook_deliveries ALTER COLUMN body SET COMPRESSION lz4;
    END IF;
END
$$;
