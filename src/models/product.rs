//! Product: what a customer subscribes to (Basic, Starter, Pro).

use diesel::prelude::*;

use crate::Mirror;
use crate::db::schema::{stripe_prices, stripe_products};
use crate::db::{Conn, on_conn};
use crate::error::Result;
use crate::models::price::Price;
use crate::sync::upsert::{SqlValue, mirror_table};
use crate::sync::{Model, sync_methods};

/// A mirrored Stripe product.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = stripe_products)]
pub struct Product {
    /// Stripe id (`prod_...`).
    pub id: String,
    /// Whether it lives in live mode.
    pub livemode: bool,
    /// Display name.
    pub name: Option<String>,
    /// Available for new purchases.
    pub active: Option<bool>,
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

mirror_table!(PRODUCTS {
    kind: "product",
    table: "stripe_products",
    api_path: Some("/products"),
    accepts: &["product"],
    columns: &["name", "active"],
    keep_when_null: &[],
    extract: |f| Ok(vec![
        SqlValue::Text(f.str("name")?),
        SqlValue::Bool(f.bool("active")?)
    ]),
    final_tombstones: true,
    children: None,
});

impl Model for Product {
    const TABLE: &'static crate::sync::MirrorTable = &PRODUCTS;
    fn find(conn: &mut Conn<'_>, id: &str) -> Result<Option<Self>> {
        Ok(on_conn!(conn, c => stripe_products::table
            .find(id)
            .select(Product::as_select())
            .first(c)
            .optional())?)
    }
}

sync_methods!(Product, "product");

impl Product {
    /// The product's active, not deleted prices, cheapest first.
    pub async fn active_prices(&self, mirror: &Mirror) -> Result<Vec<Price>> {
        let id = self.id.clone();
        mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => stripe_prices::table
                    .filter(stripe_prices::product_id.eq(&id))
                    .filter(stripe_prices::active.eq(true))
                    .filter(stripe_prices::deleted.eq(false))
                    .order((stripe_prices::unit_amount.asc(), stripe_prices::id.asc()))
                    .select(Price::as_select())
                    .load(c))?)
            })
            .await
    }

    /// Active products in the current mode, by name.
    pub async fn list_active(mirror: &Mirror) -> Result<Vec<Product>> {
        let live = mirror.live_mode();
        mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => stripe_products::table
                    .filter(stripe_products::livemode.eq(live))
                    .filter(stripe_products::active.eq(true))
                    .filter(stripe_products::deleted.eq(false))
                    .order((stripe_products::name.asc(), stripe_products::id.asc()))
                    .select(Product::as_select())
                    .load(c))?)
            })
            .await
    }
}
