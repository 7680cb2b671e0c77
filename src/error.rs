//! One error type for the crate, with a variant per failure domain.
//!
//! Every message says what failed and, where there is one, how to fix it.
//! Secrets never appear in a message: keys are shown masked (`sk_test_...abcd`).

/// The result type used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in stripe-mirror.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or malformed (environment or [`Config`](crate::Config)).
    #[error("configuration: {0}")]
    Config(String),

    /// The database could not be reached, or a pooled connection could not be had in
    /// time. Transient: retry later.
    #[error(
        "database {target} unavailable: {source}; check its URL (DATABASE_URL, or your pool's with `Mirror::from_pool`) and that the server is up, or give the pool more connections or time (Config::pool_size / connection_timeout, or your own pool's settings)"
    )]
    Unavailable {
        /// The database URL, password masked.
        target: String,
        /// What the pool reported.
        #[source]
        source: diesel::r2d2::PoolError,
    },

    /// A query failed. When a `stripe_*` table or column is missing (a database never
    /// migrated, or one older than this version of the crate), the message says to
    /// migrate.
    #[error("database error: {}{}", .0, schema_advice(.0))]
    Database(#[from] diesel::result::Error),

    /// Running the embedded migrations failed.
    #[error(
        "migrating the database failed: {source}; check that the database user may create tables, and that no other tool changed the stripe_* tables"
    )]
    Migration {
        /// What diesel_migrations reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A Stripe object did not have the shape the mirror needs.
    #[error("cannot mirror {object} {id}: field `{field}` {problem}")]
    Mapping {
        /// The kind of object being mirrored (`customer`, `subscription`, ...).
        object: &'static str,
        /// The Stripe id, or `<no id>` when the object had none.
        id: String,
        /// The JSON field at fault, dotted (`items.data.0.price`).
        field: String,
        /// What was wrong with it.
        problem: String,
    },

    /// An object asked for by id is not in the local mirror (for a model's `sync`:
    /// nor in Stripe). The message says what to do, which depends on what is missing.
    #[error("{object} {id} is not in the mirror; {}", not_found_advice(.object))]
    NotFound {
        /// The kind of object.
        object: &'static str,
        /// The id asked for.
        id: String,
    },

    /// The call cannot be done as asked: its input names something it cannot (a
    /// Checkout Session id from a URL that is not one, a customer of another
    /// subscriber, a price unlike the one asked for), or the object is not in a state
    /// for it (a subscription of several items). The message says what to change. The
    /// caller's input, not the setup and not an outage: answer a user 4xx, not 500.
    #[error("refused: {0}")]
    Refused(String),

    /// `Customer::subscription()` found more than one valid subscription.
    #[error(
        "customer {customer} has {count} valid subscriptions; use `valid_subscriptions()` to handle several"
    )]
    MultipleSubscriptions {
        /// The customer's Stripe id.
        customer: String,
        /// How many valid subscriptions it has.
        count: usize,
    },

    /// [`Checkout::unless_subscribed`](crate::checkout::Checkout::unless_subscribed): the
    /// subscriber already holds a subscription Stripe still bills.
    #[error(
        "subscriber {subscriber} already has subscription {subscription} ({status}): open the Billing Portal to change plans instead of a second Checkout"
    )]
    AlreadySubscribed {
        /// The subscriber (the host's user id).
        subscriber: String,
        /// The subscription held.
        subscription: String,
        /// Its status.
        status: String,
    },

    /// An API key was not recognisably a Stripe key.
    #[error(
        "invalid Stripe API key {key}: {reason} (expected pk_/sk_/rk_ followed by test_ or live_)"
    )]
    InvalidApiKey {
        /// The key, masked.
        key: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// No secret key is configured for the current mode.
    #[error(
        "no Stripe secret key for {mode} mode: add one with `ApiKey::get_or_create` (or `stripe-mirror api-keys add`), set `Config::secret_key`, or set STRIPE_SECRET_KEY or STRIPE_{env}_SECRET_KEY"
    )]
    NoApiKey {
        /// `test` or `live`.
        mode: &'static str,
        /// `TEST` or `LIVE`, for the variable name.
        env: &'static str,
    },

    /// A call to the Stripe API failed.
    #[error("{0}")]
    Stripe(Box<crate::stripe::StripeApiError>),

    /// A group of writes shared one transaction and it could not be committed (or no
    /// connection could be had for it): nothing of the group is stored.
    #[error(
        "the database did not commit the write ({message}); nothing of it is stored, retry it (a webhook answers 503 and Stripe retries)"
    )]
    Commit {
        /// What the database (or the pool) reported.
        message: String,
    },

    /// A database task on the blocking pool panicked or was cancelled (the runtime is
    /// shutting down): a bug or a shutdown, not bad input.
    #[error(
        "internal task failed: {source}; this is a bug in stripe-mirror or the runtime is shutting down"
    )]
    Task {
        /// What tokio reported.
        #[source]
        source: tokio::task::JoinError,
    },

    /// A row the crate wrote earlier cannot be read back (edited by hand, or written
    /// by an incompatible version).
    #[error("stored {what} is unreadable: {problem}; replay it from Stripe or delete the row")]
    Corrupt {
        /// Which row (`event evt_...`).
        what: String,
        /// What is wrong with it.
        problem: String,
    },

    /// A stored API key is encrypted and cannot be opened with the configured keys
    /// (see [`EncryptionKey`](crate::EncryptionKey)).
    #[error("stored API key {id} cannot be decrypted: {problem}")]
    Decrypt {
        /// The key's row id (`key_...`), safe to show.
        id: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
}

impl Error {
    pub(crate) fn mapping(
        object: &'static str,
        id: &str,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Error::Mapping {
            object,
            id: id.to_owned(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A write lost to a concurrent one (a deadlock, a serialization failure, a Postgres
    /// writer's wait for a row lock past its limit) and rolled back: running it again
    /// is the fix, and the webhook pipeline does so.
    pub(crate) fn is_conflict(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error as D};
        const SIGNS: [&str; 3] = [
            "deadlock detected",
            "could not serialize",
            // A Postgres writer's bounded wait for a row lock (`lock_timeout`).
            "canceling statement due to lock timeout",
        ];
        match self {
            Error::Commit { message } => SIGNS.iter().any(|s| message.contains(s)),
            Error::Database(D::DatabaseError(K::SerializationFailure, _)) => true,
            Error::Database(D::DatabaseError(_, info)) => {
                SIGNS.iter().any(|s| info.message().contains(s))
            }
            _ => false,
        }
    }

    /// True when retrying the same call later may succeed: the database unreachable
    /// or busy (a lock, a serialization failure, a dropped connection), Stripe rate
    /// limiting (429), a lock conflict (409), a Stripe server error (5xx) or a network
    /// failure. Never for bad input (4xx, an object the mirror cannot map, a setting).
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error as D};
        match self {
            Error::Unavailable { .. } | Error::Commit { .. } => true,
            Error::Database(D::DatabaseError(kind, _)) => matches!(
                kind,
                K::SerializationFailure | K::ClosedConnection | K::UnableToSendCommand | K::Unknown
            ),
            Error::Database(D::BrokenTransactionManager) => true,
            Error::Stripe(e) => e.status.is_none_or(|s| matches!(s, 409 | 429 | 500..=599)),
            _ => false,
        }
    }
}

/// Advice for a query that failed on a missing table or column of the mirror's own.
fn schema_advice(error: &diesel::result::Error) -> &'static str {
    let message = error.to_string();
    // SQLite: `no such table: stripe_x`, `no such column: stripe_x.y`, `table stripe_x
    // has no column named y`; Postgres: `relation "stripe_x" does not exist`, `column
    // stripe_x.y does not exist`, `column "y" of relation "stripe_x" does not exist`. A
    // column's message names its table when diesel built the query (it qualifies
    // columns) or an INSERT named it: a host's own column is not ours to advise on.
    let ours = message.contains("stripe_");
    let missing = message.starts_with("no such table: stripe_")
        || (message.starts_with("no such column") && ours)
        || (message.starts_with("table stripe_") && message.contains("has no column"))
        || (message.starts_with("relation \"stripe_") && message.ends_with("does not exist"))
        || (message.starts_with("column ") && message.ends_with("does not exist") && ours);
    if missing {
        "; the mirror's tables are missing or older than this version of stripe-mirror: \
         run `Mirror::migrate()` (or `stripe-mirror migrate`) against this database"
    } else {
        ""
    }
}

/// What to do about a [`Error::NotFound`], by what is missing.
fn not_found_advice(object: &str) -> &'static str {
    match object {
        // The Billing Portal: nobody to manage.
        "customer of subscriber" => {
            "they have never bought anything: send them to Checkout (or to your pricing page)"
        }
        "subscription of subscriber" => {
            "they have no subscription to manage: send them to Checkout (or to your pricing page)"
        }
        "api key" => "store it first (`ApiKey::get_or_create`, or `stripe-mirror api-keys add`)",
        // A model's `sync`: Stripe was asked and has none.
        _ => {
            "Stripe has none either: check the id, and that the key is of the same account \
             and mode (test or live)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::StripeApiError;

    fn stripe(status: Option<u16>) -> Error {
        Error::Stripe(Box::new(StripeApiError {
            request: "POST /v1/customers".into(),
            status,
            message: "x".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn transient_means_retryable() {
        for status in [409, 429, 500, 502, 503] {
            assert!(stripe(Some(status)).is_transient(), "{status}");
        }
        assert!(stripe(None).is_transient(), "a network failure");
        for status in [400, 401, 402, 403, 404] {
            assert!(!stripe(Some(status)).is_transient(), "{status}");
        }
        assert!(!Error::mapping("customer", "cus_1", "email", "is a number").is_transient());
        assert!(!Error::Config("x".into()).is_transient());
        use diesel::result::{DatabaseErrorKind as K, Error as D};
        let db = |kind| Error::Database(D::DatabaseError(kind, Box::new("x".to_owned())));
        assert!(db(K::SerializationFailure).is_transient());
        assert!(!db(K::UniqueViolation).is_transient());
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn a_missing_table_or_column_says_to_migrate() {
        use diesel::{Connection, RunQueryDsl, SqliteConnection, sql_query};
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        let fails = |conn: &mut SqliteConnection, sql: &str| {
            Error::from(sql_query(sql).execute(conn).unwrap_err()).to_string()
        };
        let advice = "run `Mirror::migrate()`";
        let missing = fails(&mut conn, "SELECT id FROM stripe_customers");
        assert!(missing.contains(advice), "{missing}");
        sql_query("CREATE TABLE stripe_customers (id TEXT PRIMARY KEY)")
            .execute(&mut conn)
            .unwrap();
        for sql in [
            // As diesel writes a column: qualified.
            "SELECT stripe_customers.email FROM stripe_customers",
            "INSERT INTO stripe_customers (id, email) VALUES ('a', 'b')",
        ] {
            let older = fails(&mut conn, sql);
            assert!(older.contains(advice), "{sql}: {older}");
        }
        // Other failures are not the schema's.
        sql_query("INSERT INTO stripe_customers (id) VALUES ('a')")
            .execute(&mut conn)
            .unwrap();
        let duplicate = fails(&mut conn, "INSERT INTO stripe_customers (id) VALUES ('a')");
        assert!(!duplicate.contains(advice), "{duplicate}");
        let host = fails(&mut conn, "SELECT id FROM users");
        assert!(!host.contains(advice), "{host}");
        sql_query("CREATE TABLE users (id TEXT PRIMARY KEY)")
            .execute(&mut conn)
            .unwrap();
        let host_column = fails(&mut conn, "SELECT users.plan FROM users");
        assert!(!host_column.contains(advice), "{host_column}");
    }
}
