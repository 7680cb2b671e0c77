//! The demo catalogue (Basic, Starter, Pro, each monthly and yearly) for trying the
//! crate in test mode, created in Stripe once and mirrored.
//!
//! Idempotent without any local state: products have fixed ids and prices fixed
//! lookup keys, so a second run (from any machine) finds them and creates nothing;
//! built on `Product::get_or_create` and `Price::get_or_create`.

use crate::Mirror;
use crate::error::{Error, Result};
use crate::models::price::{NewPrice, Price};
use crate::models::product::{NewProduct, Product};

/// The plans: key, name, monthly and yearly amounts in US cents.
pub const DEMO_PLANS: [(&str, &str, i64, i64); 3] = [
    ("basic", "Basic", 500, 5000),
    ("starter", "Starter", 1500, 15000),
    ("pro", "Pro", 3000, 30000),
];

/// One demo product with its two prices.
#[derive(Clone, Debug)]
pub struct DemoPlan {
    /// `basic`, `starter` or `pro`.
    pub key: &'static str,
    /// The mirrored product (id `stripe_mirror_demo_<key>`).
    pub product: Product,
    /// The monthly price (lookup key `stripe_mirror_demo_<key>_monthly`).
    pub monthly: Price,
    /// The yearly price (lookup key `stripe_mirror_demo_<key>_yearly`).
    pub yearly: Price,
}

/// Creates (once) and mirrors the demo catalogue. Refuses to run in live mode.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
/// for plan in stripe_mirror::bootstrap_demo_products(&mirror).await? {
///     println!("{}: {} monthly, {} yearly", plan.key, plan.monthly.id, plan.yearly.id);
/// }
/// # Ok(()) }
/// ```
pub async fn bootstrap_demo_products(mirror: &Mirror) -> Result<Vec<DemoPlan>> {
    if mirror.live_mode() {
        return Err(Error::Config(
            "bootstrap_demo_products refuses to create demo products in live mode; unset STRIPE_LIVE_MODE".into(),
        ));
    }
    let mut plans = Vec::new();
    for (key, name, monthly, yearly) in DEMO_PLANS {
        let id = format!("stripe_mirror_demo_{key}");
        let new = NewProduct::new(&id, name).metadata("stripe_mirror_demo", key);
        let product = Product::get_or_create(mirror, &new).await?;
        let price = |interval: &str, amount: i64| {
            let lookup_key = format!("stripe_mirror_demo_{key}_{interval}ly");
            NewPrice::recurring(&lookup_key, &id, "usd", amount, interval)
        };
        plans.push(DemoPlan {
            key,
            product,
            monthly: Price::get_or_create(mirror, &price("month", monthly)).await?,
            yearly: Price::get_or_create(mirror, &price("year", yearly)).await?,
        });
    }
    Ok(plans)
}
