//! Price: an amount and billing interval for a product. A legacy `plan` object is
//! mirrored here too (Stripe accepts a plan id wherever a price id goes).

use diesel::prelude::*;

use crate::Mirror;
use crate::db::schema::stripe_prices;
use crate::db::{Conn, on_conn};
use crate::error::Result;
use crate::models::product::Product;
use crate::sync::fields::Fields;
use crate::sync::upsert::{SqlValue, mirror_table};
use crate::sync::{Model, sync_methods};

/// A mirrored Stripe price (or legacy plan).
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = stripe_prices)]
pub struct Price {
    /// Stripe id (`price_...`, or a plan id).
    pub id: String,
    /// Whether it lives in live mode.
    pub livemode: bool,
    /// The product's Stripe id.
    pub product_id: Option<String>,
    /// Available for new purchases.
    pub active: Option<bool>,
    /// Three-letter ISO currency code, lowercase.
    pub currency: Option<String>,
    /// Amount in the currency's smallest unit (a plan's `amount`).
    pub unit_amount: Option<i64>,
    /// `day`, `week`, `month` or `year` for a recurring price; `None` for one-time.
    pub recurring_interval: Option<String>,
    /// Number of intervals between bills.
    pub recurring_interval_count: Option<i64>,
    /// The lookup key, if set.
    pub lookup_key: Option<String>,
    /// Unix time Stripe created it.
    pub created: Option<i64>,
    /// Deleted in Stripe: a tombstone.
    pub deleted: bool,
    /// Unix time of the data held.
    pub stamp: i64,
    /// Unix time this row was last written.
    pub synced_at: i64,
    pub(crate) data: String,
}

mirror_table!(PRICES {
    kind: "price",
    table: "stripe_prices",
    api_path: Some("/prices"),
    accepts: &["price", "plan"],
    columns: &[
        "product_id",
        "active",
        "currency",
        "unit_amount",
        "recurring_interval",
        "recurring_interval_count",
        "lookup_key"
    ],
    keep_when_null: &[],
    extract: |f| {
        let product = f.id_ref("product")?;
        let product = if f.str("object")?.as_deref() == Some("price") {
            f.required("product", product)?
        } else {
            product
        };
        Ok(vec![
            SqlValue::Text(product),
            SqlValue::Bool(f.bool("active")?),
            SqlValue::Text(f.str("currency")?),
            SqlValue::Int(f.first(&["unit_amount", "amount"], Fields::i64)?),
            SqlValue::Text(f.first(&["recurring.interval", "interval"], Fields::str)?),
            SqlValue::Int(f.first(&["recurring.interval_count", "interval_count"], Fields::i64)?),
            SqlValue::Text(f.str("lookup_key")?),
        ])
    },
    final_tombstones: true,
    children: None,
});

impl Model for Price {
    const TABLE: &'static crate::sync::MirrorTable = &PRICES;
    fn find(conn: &mut Conn<'_>, id: &str) -> Result<Option<Self>> {
        Ok(on_conn!(conn, c => stripe_prices::table
            .find(id)
            .select(Price::as_select())
            .first(c)
            .optional())?)
    }
}

sync_methods!(Price, "price");

impl Price {
    /// The mirrored product this price belongs to.
    pub async fn product(&self, mirror: &Mirror) -> Result<Option<Product>> {
        match &self.product_id {
            Some(id) => Product::get(mirror, id).await,
            None => Ok(None),
        }
    }
}
