//! Creates the demo catalogue (Basic, Starter, Pro; monthly and yearly prices) in
//! Stripe test mode once, mirrors it, and prints it from the local database.
//!
//! Run with `cargo run --example bootstrap_demo_products` (needs `STRIPE_TEST_SECRET_KEY`,
//! or `STRIPE_API_BASE` and `STRIPE_SECRET_KEY` pointing at a fake Stripe). Running it
//! again creates nothing and prints the same ids.

use stripe_mirror::{Mirror, bootstrap_demo_products};

#[tokio::main]
async fn main() -> Result<(), stripe_mirror::Error> {
    let mirror = Mirror::from_env().await?;
    for plan in bootstrap_demo_products(&mirror).await? {
        let name = plan.product.name.as_deref().unwrap_or(plan.key);
        for price in [&plan.monthly, &plan.yearly] {
            let amount = price.unit_amount.unwrap_or(0) as f64 / 100.0;
            let interval = price
                .recurring_interval
                .as_ref()
                .map(|i| i.as_str())
                .unwrap_or("once");
            println!(
                "{name:<8} {:<32} {amount:>7.2} {}/{interval}",
                price.id,
                price.currency.as_deref().unwrap_or("?")
            );
        }
    }
    Ok(())
}
