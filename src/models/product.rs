//! Product: what a customer subscribes to (Basic, Starter, Pro).

use diesel::prelude::*;

use crate::Mirror;
use crate::db::schema::{stripe_prices, stripe_products};
use crate::db::{Conn, on_conn};
use crate::error::{Error, Result};
use crate::models::price::Price;
use crate::sync::upsert::{SqlValue, Stamp, mirror_table};
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
    id_from: None,
    accepts: &["product"],
    columns: &["name", "active"],
    keep_when_null: &[],
    extract: |f| Ok(vec![
        SqlValue::Text(f.str("name")?),
        SqlValue::Bool(f.bool("active")?)
    ]),
    final_tombstones: true,
    access: crate::access::changes::AccessLink::ProductRoles,
    children: None,
    partial: None,
});

impl Model for Product {
    const TABLE: &'static crate::sync::MirrorTable = &PRODUCTS;
    fn find(conn: &mut Conn<'_>, id: &str) -> Result<Option<Self>> {
        Ok(on_conn!(conn, c => stripe_products::table
            .find(id)
            .select(Product::as_select())
            .get_result(c)
            .optional())?)
    }
    fn from_row(row: &crate::sync::upsert::Row) -> Self {
        Product {
            id: row.id.clone(),
            livemode: row.livemode,
            name: row.text("name"),
            active: row.flag("active"),
            created: row.created(),
            deleted: row.deleted,
            stamp: row.stamp.at,
            synced_at: crate::sync::now(),
            data: row.data().to_owned(),
        }
    }
}

sync_methods!(Product, "product");

/// What [`Product::get_or_create`] creates when the product does not exist yet.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct NewProduct {
    /// The product id to use (`prod_...` or your own, e.g. `pro`): the natural key.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: Option<String>,
    /// Metadata (e.g. `roles` for [`has_role`](crate::access::has_role)).
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl NewProduct {
    /// A product with this id and name.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        NewProduct {
            id: id.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: &str, value: &str) -> Self {
        self.metadata.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets the description.
    pub fn description(mut self, text: &str) -> Self {
        self.description = Some(text.to_owned());
        self
    }
}

impl Product {
    /// The product with `new.id` in the current mode: the mirror's row when it has one, else
    /// Stripe's, else created in Stripe (idempotency key derived from the id and mode,
    /// so racing processes create one), mirrored at once. After the product was
    /// deleted (a tombstone in the mirror) the key changes, so it is made again rather
    /// than Stripe replaying the deleted one's creation, and the old product's late
    /// `product.deleted` does not take the new one.
    ///
    /// ```no_run
    /// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
    /// use stripe_mirror::{Product, models::product::NewProduct};
    /// let pro = Product::get_or_create(&mirror, &NewProduct::new("pro", "Pro").metadata("roles", "pro")).await?;
    /// assert_eq!(pro.id, "pro");
    /// # Ok(()) }
    /// ```
    pub async fn get_or_create(mirror: &Mirror, new: &NewProduct) -> Result<Product> {
        let live = mirror.live_mode();
        let held = Self::get(mirror, &new.id).await?;
        if let Some(found) = held.as_ref().filter(|p| !p.deleted && p.livemode == live) {
            return Ok(found.clone());
        }
        // The row as it was before asking: an answer that settles it may revive a
        // tombstone (a product made again under its id).
        let id = new.id.clone();
        let seen = mirror
            .db()
            .run(move |conn| <Product as Model>::TABLE.seen(conn, &id))
            .await?;
        // After a deletion, another key: Stripe would replay the deleted one's creation
        // for 24 hours instead of making it again.
        let material = match held.as_ref().filter(|p| p.deleted) {
            Some(gone) => format!("{}/after deletion at {}", new.id, gone.stamp),
            None => new.id.clone(),
        };
        let client = mirror.stripe().await?;
        let object = format!("product {}", new.id);
        let retrieve = stripe_product::product::RetrieveProduct::new(new.id.as_str());
        // Whether the answer is the creation itself (stamped as a `product.created`
        // would be: the old product's late deletion must not take the new one).
        let mut made = false;
        let answer = match client.request(&retrieve, None, Some(&object)).await {
            Ok(found) => found,
            Err(err) if crate::stripe::is_missing(&err) => {
                let metadata: std::collections::HashMap<String, String> =
                    new.metadata.clone().into_iter().collect();
                let mut create = stripe_product::product::CreateProduct::new(new.name.as_str())
                    .id(new.id.as_str())
                    .metadata(metadata);
                if let Some(d) = &new.description {
                    create = create.description(d.as_str());
                }
                let key = crate::sync::remote::creation_key("product", live, &material);
                match client.request(&create, Some(key), Some(&object)).await {
                    Ok(created) => {
                        made = true;
                        created
                    }
                    // Created by another process since we looked (a peer that does
                    // not replay idempotent requests answers 400): read it.
                    // A read that misses says the create failed for another reason
                    // (a 409 of a key still in use): its own error is the answer.
                    Err(err) if crate::stripe::already_exists(&err) => {
                        match client.request(&retrieve, None, Some(&object)).await {
                            Ok(found) => found,
                            Err(_) => return Err(err),
                        }
                    }
                    Err(err) => return Err(err),
                }
            }
            Err(err) => return Err(err),
        };
        if answer.value.get("deleted") == Some(&serde_json::Value::Bool(true)) {
            return Err(Error::Refused(format!(
                "product {} is deleted in Stripe and was not made again: choose another id \
                 for it",
                new.id
            )));
        }
        let stamp = match made {
            true => Stamp::created_over(answer.at, seen),
            false => Stamp::fetched_over(answer.at, seen),
        };
        // As the mirror holds it: deleted only if a newer deletion came meanwhile.
        crate::sync::sync_stamped::<Product>(mirror, answer.value, stamp).await
    }

    /// The product's active, not deleted prices in the current mode, cheapest first. A
    /// product id used in both modes (one you chose, as `pro`) lists only the prices
    /// Checkout can sell in this one.
    pub async fn active_prices(&self, mirror: &Mirror) -> Result<Vec<Price>> {
        let (id, live) = (self.id.clone(), mirror.live_mode());
        mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => stripe_prices::table
                    .filter(stripe_prices::product_id.eq(&id))
                    .filter(stripe_prices::livemode.eq(live))
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
