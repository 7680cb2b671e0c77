CREATE INDEX idx_customers_email ON stripe_customers (email);
