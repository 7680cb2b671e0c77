//! The whole loop: migrate, create the demo catalogue, get or create the Stripe
//! customer of a demo user, subscribe it to Pro, sync, and print what the mirror holds.
//!
//! Run with `scripts/demo.sh` (starts a local fake Stripe unless
//! `STRIPE_TEST_SECRET_KEY` is set), or with `cargo run --example quickstart` when
//! `STRIPE_API_BASE`/`STRIPE_SECRET_KEY` already point somewhere. Database:
//! `DATABASE_URL`, default `sqlite://stripe-mirror.db`.
//! Against localstripe, use a database of its own and remove it whenever localstripe
//! restarts (it forgets everything; the mirror would keep ids it no longer has):
//! `rm -f .run/examples.db*; export DATABASE_URL=sqlite://.run/examples.db`.

use serde_json::json;
use stripe_mirror::{Customer, Mirror, Product, Subscriber, Subscription, bootstrap_demo_products};

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
    let mirror = Mirror::from_env().await?; // opens DATABASE_URL and migrates
    let api = mirror
        .config()
        .api_base
        .clone()
        .unwrap_or_else(|| "https://api.stripe.com/".into());
    // Redacted: a Postgres URL may hold a password.
    println!(
        "database {}, Stripe API {api}",
        mirror.config().database_url_redacted()
    );

    let catalogue = bootstrap_demo_products(&mirror).await?;
    let pro = catalogue
        .iter()
        .find(|p| p.key == "pro")
        .expect("Pro is in the catalogue");

    let customer = Customer::get_or_create(&mirror, &DemoUser).await?;
    if !customer.has_valid_subscription(&mirror).await? {
        // Test mode: give the customer Stripe's test Visa card as default payment method.
        let stripe = mirror.stripe().await?;
        let card = stripe
            .post(
                "/payment_methods/pm_card_visa/attach",
                &json!({ "customer": customer.id }),
                None,
                None,
            )
            .await?;
        let card_id = card["id"].as_str().unwrap_or("pm_card_visa");
        let settings = json!({ "invoice_settings": { "default_payment_method": card_id } });
        stripe
            .post(
                &format!("/customers/{}", customer.id),
                &settings,
                None,
                None,
            )
            .await?;
        Subscription::create(&mirror, &customer.id, &[&pro.monthly.id]).await?;
    }

    // Sync from Stripe, then read everything back from the local database.
    let customer = Customer::sync(&mirror, &customer.id).await?;
    for sub in customer.subscriptions(&mirror).await? {
        Subscription::sync(&mirror, &sub.id).await?;
    }

    println!("\nproducts");
    for product in Product::list_active(&mirror).await? {
        let prices: Vec<String> = product
            .active_prices(&mirror)
            .await?
            .iter()
            .map(|p| {
                format!(
                    "{} {}/{}",
                    p.unit_amount.unwrap_or(0) as f64 / 100.0,
                    p.currency.as_deref().unwrap_or("?"),
                    p.recurring_interval
                        .as_ref()
                        .map(|i| i.as_str())
                        .unwrap_or("once")
                )
            })
            .collect();
        println!(
            "  {:<30} {:<8} {}",
            product.id,
            product.name.as_deref().unwrap_or("?"),
            prices.join(", ")
        );
    }
    println!("\ncustomers");
    let subscription = customer.subscription(&mirror).await?;
    let status = match &subscription {
        Some(sub) => {
            let items = sub.items(&mirror).await?;
            let mut names = Vec::new();
            for item in items {
                if let Some(p) = &item.product_id {
                    names.push(
                        Product::get(&mirror, p)
                            .await?
                            .and_then(|p| p.name)
                            .unwrap_or_else(|| p.clone()),
                    );
                }
            }
            format!(
                "{} to {} (valid: {})",
                sub.status.as_ref().map(|s| s.as_str()).unwrap_or("?"),
                names.join(", "),
                sub.is_valid()
            )
        }
        None => "no valid subscription".into(),
    };
    println!(
        "  {} {} subscriber={} {status}",
        customer.id,
        customer.email.as_deref().unwrap_or("-"),
        customer.subscriber_id.as_deref().unwrap_or("-")
    );
    println!(
        "  subscribed to Pro: {}",
        customer
            .is_subscribed_to(&mirror, &[&pro.product.id])
            .await?
    );
    Ok(())
}
