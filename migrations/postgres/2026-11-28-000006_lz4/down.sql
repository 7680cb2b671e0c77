-- Back to the server's default for values written from now on.
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
            EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET COMPRESSION DEFAULT', c.tbl, c.col);
        END LOOP;
    END IF;
END
$$;
