DROP TABLE stripe_customers;
DROP TABLE stripe_products;
DROP TABLE stripe_prices;
DROP TABLE stripe_subscriptions;
DROP TABLE stripe_subscription_items;
DROP TABLE stripe_api_keys;
DROP TABLE stripe_events;
DROP TABLE stripe_webhook_deliveries;
