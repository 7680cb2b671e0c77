//! The Stripe Billing Portal (where customers change plan or card, see invoices and
//! cancel): opens a portal session for a demo user's customer and prints its URL.
//!
//! Run with `STRIPE_API_BASE=$(scripts/localstripe.sh start 8420) STRIPE_SECRET_KEY=sk_test_local cargo run --example customer_portal`
//! (the URL opens the launcher's test-only portal page), or with
//! `STRIPE_TEST_SECRET_KEY=sk_test_...` for Stripe's own portal in test mode (save the
//! portal settings once at <https://dashboard.stripe.com/test/settings/billing/portal>).
//! The portal's way back is `APP_URL/account` (default `http://127.0.0.1:8000`).
//! Against localstripe, use a database of its own and remove it whenever localstripe
//! restarts (it forgets everything; the mirror would keep ids it no longer has):
//! `rm -f .run/examples.db*; export DATABASE_URL=sqlite://.run/examples.db`.

use stripe_mirror::checkout::billing_portal;
use stripe_mirror::{Customer, Mirror, Subscriber};

struct DemoUser;

impl Subscriber for DemoUser {
    fn subscriber_id(&self) -> String {
        "demo-user-1".into()
    }
    fn email(&self) -> Option<String> {
        Some("ada@example.com".into())
    }
}

#[tokio::main]
async fn main() -> Result<(), stripe_mirror::Error> {
    let mirror = Mirror::from_env().await?;
    let app = std::env::var("APP_URL").unwrap_or_else(|_| "http://127.0.0.1:8000".into());

    // The portal is for an existing customer: `billing_portal` answers
    // `Error::NotFound` for a subscriber without one. Here the demo user gets one first.
    let customer = Customer::get_or_create(&mirror, &DemoUser).await?;
    let portal = billing_portal(&mirror, "demo-user-1", &format!("{app}/account")).await?;
    println!("customer {}: manage billing at {}", customer.id, portal.url);
    Ok(())
}
