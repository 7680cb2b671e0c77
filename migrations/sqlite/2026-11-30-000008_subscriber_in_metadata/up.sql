-- Whether a customer's subscriber_id is its Stripe metadata's to say: true once the
-- metadata held the key (else a Checkout linked it, which no later customer event
-- may undo). A metadata link goes when the key is removed in Stripe. NULL: not known
-- (no metadata in the payload).
ALTER TABLE stripe_customers ADD COLUMN subscriber_in_metadata BOOLEAN;
UPDATE stripe_customers
SET subscriber_in_metadata = COALESCE(json_extract(data, '$.metadata.stripe_mirror_subscriber'), '') <> ''
WHERE json_type(data, '$.metadata') = 'object';
-- An empty value was never a link (no subscriber id is empty).
UPDATE stripe_customers SET subscriber_id = NULL WHERE subscriber_id = '';
