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

    /// The database could not be reached, or a pooled connection could not be had.
    /// Check `DATABASE_URL` and that the server is up.
    #[error("database unavailable: {0}")]
    Unavailable(String),

    /// A query failed.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),

    /// Running the embedded migrations failed.
    #[error("migrating the database failed: {0}")]
    Migration(String),

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

    /// An object asked for by id is not in the local mirror.
    #[error("{object} {id} is not in the mirror; sync it first")]
    NotFound {
        /// The kind of object.
        object: &'static str,
        /// The id asked for.
        id: String,
    },

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
        "no Stripe secret key for {mode} mode: add one with `ApiKey::get_or_create` (or `stripe-mirror api-keys add`), or set STRIPE_SECRET_KEY or STRIPE_{env}_SECRET_KEY"
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

    /// A background task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
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

    /// True when the failure is on our side or the database's (answer 5xx, retry later),
    /// false when the input itself was bad.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_) | Error::Database(_) | Error::Task(_) | Error::Stripe(_)
        )
    }
}
