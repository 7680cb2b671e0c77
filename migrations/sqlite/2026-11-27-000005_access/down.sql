DROP INDEX idx_access_dirty;
DROP TABLE stripe_access;
