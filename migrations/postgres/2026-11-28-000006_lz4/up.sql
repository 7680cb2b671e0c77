-- Stripe objects and event bodies are JSON of 1-5 KiB: Postgres compresses the larger
-- ones on every write, and its default (pglz) took about a tenth of the server's CPU
-- in the webhook benchmark. lz4 compresses them several times faster. Applied only
-- where the server was built with lz4 (PostgreSQL 14 and later, most packages); it
-- concerns values written from now on, nothing is rewritten.
-- Each ALTER waits at most 10 s for its table's lock (the tables already altered stay
-- locked until the migration commits): a long transaction makes `migrate` fail rather
-- than queue a running app's queries indefinitely; run it again later.
-- The ALTERs run through EXECUTE: PL/pgSQL checks a block's statements before it runs
-- it, and before PostgreSQL 14 `SET COMPRESSION` is a syntax error even where the IF
-- would skip it.
SET LOCAL lock_timeout = '10s';
DO $$
DECLARE
    c record;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        FOR c IN SELECT * FROM (VALUES ('stripe_customers', 'data'),
                     ('stripe_products', 'data'),
                     ('stripe_prices', 'data'),
                     ('stripe_subscriptions', 'data'),
                     ('stripe_subscription_items', 'data'),
                     ('stripe_entitlement_summaries', 'data'),
                     ('stripe_product_features', 'data'),
                     ('stripe_events', 'data'),
                     ('stripe_webhook_deliveries', 'headers'),
                     ('stripe_webhook_deliveries', 'body')) AS t (tbl, col) LOOP
            EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET COMPRESSION lz4', c.tbl, c.col);
        END LOOP;
    END IF;
END
$$;
