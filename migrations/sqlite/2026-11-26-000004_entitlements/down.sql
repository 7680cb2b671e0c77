DROP INDEX idx_prices_lookup_key;
DROP TABLE stripe_product_features;
DROP TABLE stripe_entitlement_summaries;
