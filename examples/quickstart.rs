//! Mirrors a few Stripe objects into a SQLite file and prints each customer with
//! its subscription status, all read back from the local database.
//!
//! Run with `cargo run --example quickstart` (uses `DATABASE_URL`, default
//! `sqlite://stripe-mirror.db`).

use serde_json::Value;
use stripe_mirror::{Config, Customer, Mirror, Price, Product, Subscription};

/// Sample Stripe objects: current-API shapes and an old (2019) shape side by side.
const SAMPLE: &str = include_str!("data/sample_objects.json");

#[tokio::main]
async fn main() -> Result<(), stripe_mirror::Error> {
    let config = Config::from_env()?;
    println!("mirroring sample objects into {}", config.database_url);
    let mirror = Mirror::connect(config).await?;

    let sample: Value = serde_json::from_str(SAMPLE).expect("bundled sample is JSON");
    for object in sample.as_array().expect("a list of objects") {
        match object["object"].as_str() {
            Some("customer") => drop(Customer::sync_from_stripe_data(&mirror, object).await?),
            Some("product") => drop(Product::sync_from_stripe_data(&mirror, object).await?),
            Some("price") | Some("plan") => {
                drop(Price::sync_from_stripe_data(&mirror, object).await?)
            }
            Some("subscription") => {
                drop(Subscription::sync_from_stripe_data(&mirror, object).await?)
            }
            other => eprintln!("skipping object of type {other:?}"),
        }
    }

    for id in sample
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["object"] == "customer")
        .filter_map(|o| o["id"].as_str())
    {
        let customer = Customer::get(&mirror, id).await?.expect("just mirrored");
        let status = match customer.subscription(&mirror).await? {
            Some(sub) => {
                let mut products = Vec::new();
                for item in sub.items(&mirror).await? {
                    let name = match &item.product_id {
                        Some(p) => Product::get(&mirror, p)
                            .await?
                            .and_then(|p| p.name)
                            .unwrap_or_else(|| p.clone()),
                        None => "?".into(),
                    };
                    products.push(name);
                }
                format!(
                    "{} ({}), valid until {}",
                    sub.status.as_deref().unwrap_or("?"),
                    products.join(", "),
                    sub.current_period_end
                        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                        .map_or("?".into(), |t| t.date_naive().to_string())
                )
            }
            None => "no valid subscription".to_owned(),
        };
        println!(
            "{:<20} {:<28} {}",
            customer.id,
            customer.email.as_deref().unwrap_or("-"),
            status
        );
    }
    Ok(())
}
