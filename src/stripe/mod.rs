//! Talking to Stripe: the async-stripe client wrapper and its errors.

mod client;

pub use client::StripeClient;
pub(crate) use client::{
    Answer, already_exists, changed_while_read, is_missing, newest_timestamp, next_after,
};

use std::fmt;

/// A failed call to the Stripe API: which request, which object, and what Stripe said.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StripeApiError {
    /// The request, e.g. `POST /v1/customers`.
    pub request: String,
    /// The object concerned, e.g. `customer cus_123`, when known.
    pub object: Option<String>,
    /// HTTP status, when a response came back.
    pub status: Option<u16>,
    /// Stripe's error type (`invalid_request_error`, `card_error`, ...).
    pub error_type: Option<String>,
    /// Stripe's error code (`resource_missing`, ...).
    pub code: Option<String>,
    /// Stripe's message, or what went wrong on the way.
    pub message: String,
    /// Stripe's request id (`req_...`), for Stripe support.
    pub request_id: Option<String>,
    /// Stripe's time of the answer (unix seconds, its `Date` header), when one came:
    /// a 404 turned into a tombstone is stamped with it, not with the host's clock.
    pub at: Option<i64>,
}

impl fmt::Display for StripeApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stripe request {} failed", self.request)?;
        if let Some(object) = &self.object {
            write!(f, " for {object}")?;
        }
        if let Some(status) = self.status {
            write!(f, " (HTTP {status}")?;
            if let Some(t) = &self.error_type {
                write!(f, ", {t}")?;
            }
            if let Some(c) = &self.code {
                write!(f, ", {c}")?;
            }
            f.write_str(")")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(id) = &self.request_id {
            write!(f, " [request {id}]")?;
        }
        Ok(())
    }
}
