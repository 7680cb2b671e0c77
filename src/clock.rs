//! The host's clock, injectable. The mirror reads the host's clock only for its own
//! bookkeeping: signature tolerance and data the host hands in.
//! Claim leases run on the database's clock, which every instance sharing it agrees
//! on (a skewed host can neither steal a claim nor hold one too long). Freshness
//! of Stripe's data is never judged by it: events carry Stripe's `created`, and API
//! answers Stripe's `Date` (see [`StripeClient`](crate::stripe::StripeClient)), so a
//! host clock minutes off changes nothing. Tests inject a skewed clock to prove it.

use std::sync::Arc;

/// Unix seconds on the host: the system clock, or one a test supplies.
///
/// ```
/// use stripe_mirror::Clock;
/// let ahead = Clock::skewed(120);
/// assert!((ahead.now() - Clock::system().now() - 120).abs() <= 1);
/// ```
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(|| chrono::Utc::now().timestamp()))
    }

    /// The system clock off by `seconds` (ahead when positive): a host with clock skew.
    pub fn skewed(seconds: i64) -> Clock {
        Clock(Arc::new(move || chrono::Utc::now().timestamp() + seconds))
    }

    /// Any clock, e.g. a fixed instant for a test.
    pub fn from_fn(now: impl Fn() -> i64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    /// Unix seconds now.
    pub fn now(&self) -> i64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock(now = {})", self.now())
    }
}
