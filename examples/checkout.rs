//! Selling with Stripe Checkout: gets or creates the demo catalogue and the Stripe
//! customer of a demo user, then creates a Checkout Session for a Pro monthly
//! subscription (and one for a one-time payment) and prints the URLs to open.
//!
//! Run with `STRIPE_API_BASE=$(scripts/localstripe.sh start 8420) STRIPE_SECRET_KEY=sk_test_local cargo run --example checkout`
//! (the URLs open the launcher's test-only Checkout page), or with
//! `STRIPE_TEST_SECRET_KEY=sk_test_...` for Stripe's own Checkout in test mode. Paying
//! sends the buyer back to `APP_URL` (default `http://127.0.0.1:8000`, where the
//! `subscription_gate` example listens). Database: `DATABASE_URL`.
//! Against localstripe, use a database of its own and remove it whenever localstripe
//! restarts (it forgets everything; the mirror would keep ids it no longer has):
//! `rm -f .run/examples.db*; export DATABASE_URL=sqlite://.run/examples.db`.

use stripe_mirror::checkout::Checkout;
use stripe_mirror::models::price::NewPrice;
use stripe_mirror::{Customer, Mirror, Price, Subscriber, bootstrap_demo_products};

/// Your app's user; the mirror only needs an id (and optionally email and name).
struct DemoUser;

impl Subscriber for DemoUser {
    fn subscriber_id(&self) -> String {
        "demo-user-1".into()
    }
    fn email(&self) -> Option<String> {
        Some("ada@example.com".into())
    }
    fn name(&self) -> Option<String> {
        Some("Ada Lovelace".into())
    }
}

#[tokio::main]
async fn main() -> Result<(), stripe_mirror::Error> {
    let mirror = Mirror::from_env().await?;
    let app = std::env::var("APP_URL").unwrap_or_else(|_| "http://127.0.0.1:8000".into());

    let catalogue = bootstrap_demo_products(&mirror).await?;
    let pro = catalogue.iter().find(|p| p.key == "pro").expect("Pro");
    let customer = Customer::get_or_create(&mirror, &DemoUser).await?;
    println!("customer {} for subscriber demo-user-1", customer.id);

    // A subscription: Stripe fills in {CHECKOUT_SESSION_ID} on the way back.
    let session = Checkout::subscription(&pro.monthly.id)
        .success_url(&format!("{app}/account?checkout={{CHECKOUT_SESSION_ID}}"))
        .cancel_url(&format!("{app}/pricing"))
        .allow_promotion_codes(true)
        .create(&mirror, &DemoUser)
        .await?;
    println!("Pro monthly:         {}", session.url);

    // A one-time payment needs a one-time price (here: an onboarding call for Pro).
    let onboarding = NewPrice::one_time(
        "stripe_mirror_demo_pro_onboarding",
        &pro.product.id,
        "usd",
        4900,
    );
    let onboarding = Price::get_or_create(&mirror, &onboarding).await?;
    let session = Checkout::payment(&onboarding.id, 1)
        .success_url(&format!("{app}/account?checkout={{CHECKOUT_SESSION_ID}}"))
        .cancel_url(&format!("{app}/pricing"))
        .create(&mirror, &DemoUser)
        .await?;
    println!("Pro onboarding call: {}", session.url);
    Ok(())
}
