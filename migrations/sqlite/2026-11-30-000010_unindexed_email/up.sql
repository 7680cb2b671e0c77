-- Less written per customer: no query of the mirror looks customers up by email, and
-- the index cost every customer written one more entry (and page). Create your own if
-- your admin pages search by email:
--   CREATE INDEX idx_customers_email ON stripe_customers (email);
DROP INDEX idx_customers_email;
