//! The demo catalogue (Basic, Starter, Pro, each monthly and yearly) for trying the
//! crate in test mode, created in Stripe once and mirrored.
//!
//! Idempotent without any local state: products have fixed ids and prices fixed
//! lookup keys, so a second run (from any machine) finds them and creates nothing.

use serde_json::{Value, json};

use crate::Mirror;
use crate::error::{Error, Result};
use crate::models::{price::Price, product::Product};
use crate::stripe::{Answer, StripeClient, is_missing};
use crate::sync::sync_from_stripe_data;

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
    let client = mirror.stripe().await?;
    let mut plans = Vec::new();
    for (key, name, monthly, yearly) in DEMO_PLANS {
        let product = ensure_product(&client, key, name).await?;
        let product_id = product.value["id"].as_str().unwrap_or_default().to_owned();
        let listed = client
            .get_at(
                "/prices",
                &json!({ "product": product_id, "limit": 100 }),
                Some(&format!("prices of product {product_id}")),
            )
            .await?;
        let existing = listed
            .value
            .get("data")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let monthly = ensure_price(
            &client,
            (&existing, listed.at),
            &product_id,
            &format!("stripe_mirror_demo_{key}_monthly"),
            monthly,
            "month",
        )
        .await?;
        let yearly = ensure_price(
            &client,
            (&existing, listed.at),
            &product_id,
            &format!("stripe_mirror_demo_{key}_yearly"),
            yearly,
            "year",
        )
        .await?;
        plans.push(DemoPlan {
            key,
            product: sync_from_stripe_data::<Product>(mirror, product.value, product.at).await?,
            monthly: sync_from_stripe_data::<Price>(mirror, monthly.value, monthly.at).await?,
            yearly: sync_from_stripe_data::<Price>(mirror, yearly.value, yearly.at).await?,
        });
    }
    Ok(plans)
}

async fn ensure_product(client: &StripeClient, key: &str, name: &str) -> Result<Answer> {
    let id = format!("stripe_mirror_demo_{key}");
    let object = format!("product {id}");
    match client
        .get_at(&format!("/products/{id}"), &json!({}), Some(&object))
        .await
    {
        Ok(found) => return Ok(found),
        Err(err) if is_missing(&err) => {}
        Err(err) => return Err(err),
    }
    let form = json!({ "id": id, "name": name, "type": "service", "metadata": { "stripe_mirror_demo": key } });
    match client
        .post_at(
            "/products",
            &form,
            Some(format!("stripe-mirror-demo-product-{id}")),
            Some(&object),
        )
        .await
    {
        Ok(created) => Ok(created),
        // Another bootstrap created it meanwhile.
        Err(_) => {
            client
                .get_at(&format!("/products/{id}"), &json!({}), Some(&object))
                .await
        }
    }
}

async fn ensure_price(
    client: &StripeClient,
    (existing, listed_at): (&[Value], i64),
    product: &str,
    lookup_key: &str,
    amount: i64,
    interval: &str,
) -> Result<Answer> {
    let found = existing.iter().find(|p| {
        p["lookup_key"] == json!(lookup_key)
            && p["product"] == json!(product)
            && p["active"] != json!(false)
    });
    if let Some(price) = found {
        return Ok(Answer {
            value: price.clone(),
            at: listed_at,
        });
    }
    let form = json!({
        "product": product, "currency": "usd", "unit_amount": amount,
        "recurring": { "interval": interval }, "lookup_key": lookup_key,
    });
    client
        .post_at(
            "/prices",
            &form,
            Some(format!("stripe-mirror-demo-price-{lookup_key}")),
            Some(&format!("price {lookup_key}")),
        )
        .await
}
