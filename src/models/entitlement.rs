//! Entitlements: which features a customer may use, as Stripe computes them from its
//! subscriptions (`entitlements.active_entitlement_summary`, pushed by its `.updated`
//! event), and which features each product grants (`product_feature`). Access checks
//! read the summary first and fall back to the features of subscribed products.

use diesel::prelude::*;
use serde_json::{Value, json};

use crate::Mirror;
use crate::db::schema::{stripe_entitlement_summaries, stripe_product_features};
use crate::db::{by_ids, on_conn};
use crate::error::{Error, Result};
use crate::sync::fields::Fields;
use crate::sync::upsert::{SqlValue, Stamp, execute, mirror_table};

/// A customer's active entitlements as last mirrored: keyed by the customer id.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = stripe_entitlement_summaries)]
pub struct EntitlementSummary {
    /// The customer's Stripe id (the summary has no id of its own).
    pub id: String,
    /// Whether it lives in live mode.
    pub livemode: bool,
    /// Unix time (Stripe's clock) of the data held.
    pub stamp: i64,
    /// The active features' lookup keys, as `,key1,key2,`.
    lookup_keys: Option<String>,
    data: String,
}

impl EntitlementSummary {
    /// The lookup keys of the customer's active features.
    pub fn features(&self) -> Vec<&str> {
        self.lookup_keys
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .filter(|k| !k.is_empty())
            .collect()
    }

    /// Whether the customer has the feature with this lookup key.
    pub fn has(&self, lookup_key: &str) -> bool {
        self.features().contains(&lookup_key)
    }

    /// The raw summary as last mirrored.
    pub fn data(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    /// The mirrored summary of `customer_id`, if Stripe sent or `sync` fetched one.
    pub async fn for_customer(mirror: &Mirror, customer_id: &str) -> Result<Option<Self>> {
        let id = customer_id.to_owned();
        mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => stripe_entitlement_summaries::table
                    .find(&id)
                    .filter(stripe_entitlement_summaries::deleted.eq(false))
                    .select(EntitlementSummary::as_select())
                    .get_result(c)
                    .optional())?)
            })
            .await
    }

    /// Fetches the customer's active entitlements (`GET /v1/entitlements/active_entitlements`,
    /// every page) and mirrors them as its summary. When Stripe answers 404 (the
    /// customer is gone), the summary is removed, so features fall back to the
    /// subscribed products' own, and this is [`Error::NotFound`].
    pub async fn sync(mirror: &Mirror, customer_id: &str) -> Result<Self> {
        use crate::sync::remote::{Refetch, refetch};
        let found = match refetch(mirror, &ENTITLEMENT_SUMMARIES, customer_id).await? {
            Refetch::Gone => None,
            Refetch::Current => Self::for_customer(mirror, customer_id).await?,
        };
        found.ok_or_else(|| Error::NotFound {
            object: ENTITLEMENT_SUMMARIES.kind,
            id: customer_id.to_owned(),
        })
    }
}

/// A customer's whole summary as Stripe has it now, built from every page of its
/// active entitlements (an event's summary lists only the first 10), stamped with
/// Stripe's time of the first page. The one fetch behind [`EntitlementSummary::sync`]
/// and the re-fetch of a partial summary.
pub(crate) async fn fetch_summary(
    client: &crate::stripe::StripeClient,
    customer_id: &str,
    livemode: bool,
) -> Result<crate::stripe::Answer> {
    let query = serde_json::Map::from_iter([("customer".to_owned(), json!(customer_id))]);
    let (entitlements, at) = client
        .list_all(
            "/entitlements/active_entitlements",
            query,
            &format!("active entitlements of customer {customer_id}"),
            "entitlement",
        )
        .await?;
    let value = json!({
        "object": "entitlements.active_entitlement_summary", "customer": customer_id,
        "livemode": livemode, "entitlements": { "object": "list", "data": entitlements, "has_more": false },
    });
    Ok(crate::stripe::Answer {
        value,
        at,
        nul_free: false,
    })
}

mirror_table!(ENTITLEMENT_SUMMARIES {
    kind: "entitlements.active_entitlement_summary",
    table: "stripe_entitlement_summaries",
    api_path: None,
    id_from: Some("customer"),
    accepts: &["entitlements.active_entitlement_summary"],
    columns: &["customer_id", "lookup_keys"],
    keep_when_null: &[],
    extract: |f| {
        let keys: Vec<String> = match f.get("entitlements.data") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|e| {
                    e.get("lookup_key")
                        .or_else(|| e.pointer("/feature/lookup_key"))
                })
                .filter_map(Value::as_str)
                .map(|k| k.replace(',', ""))
                .collect(),
            Some(_) => {
                return Err(Error::mapping(
                    f.kind,
                    f.id,
                    "entitlements.data",
                    "is not an array",
                ));
            }
        };
        Ok(vec![
            SqlValue::Text(f.id_ref("customer")?),
            SqlValue::Text(Some(format!(",{},", keys.join(",")))),
        ])
    },
    final_tombstones: false,
    access: crate::access::changes::AccessLink::Customer("customer_id"),
    children: None,
    // An event's summary lists at most 10 entitlements; more are fetched.
    partial: Some(|summary| summary.pointer("/entitlements/has_more") == Some(&Value::Bool(true))),
});

/// A feature a product grants (`product_feature`).
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = stripe_product_features)]
pub struct ProductFeature {
    /// Stripe id (`prodft_...`).
    pub id: String,
    /// Whether it lives in live mode.
    pub livemode: bool,
    /// The product granting it.
    pub product_id: Option<String>,
    /// The feature's lookup key (what `has_feature` asks for).
    pub lookup_key: Option<String>,
    /// Detached from the product in Stripe.
    pub deleted: bool,
    data: String,
}

impl ProductFeature {
    /// The raw object as last mirrored.
    pub fn data(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    /// Fetches a product's features (`GET /v1/products/{id}/features`) and mirrors
    /// them; features no longer attached become tombstones. Returns the live ones. The
    /// product's subscribers are marked when its features change: with an access hook,
    /// call [`Webhooks::deliver_access_changes`](crate::Webhooks::deliver_access_changes)
    /// afterwards.
    /// Only the mirror's mode is touched: a product id of your choosing can exist in
    /// both modes, each with its own features.
    pub async fn sync_for_product(mirror: &Mirror, product_id: &str) -> Result<Vec<Self>> {
        let client = mirror.stripe().await?;
        let live = mirror.live_mode();
        let (features, at) = client
            .list_all(
                &format!("/products/{product_id}/features"),
                serde_json::Map::new(),
                &format!("features of product {product_id}"),
                "product_feature",
            )
            .await?;
        let mut rows = Vec::new();
        for mut feature in features {
            // The object does not name its product: the listing does.
            let Some(fields) = feature.as_object_mut() else {
                return Err(Error::mapping(
                    "product_feature",
                    "<no id>",
                    "data",
                    format!("an item of product {product_id}'s features is not an object"),
                ));
            };
            fields.insert("product".into(), json!(product_id));
            rows.push((
                PRODUCT_FEATURES.row(&feature, Stamp::fetched(at), Some(live))?,
                feature,
            ));
        }
        let product = product_id.to_owned();
        mirror
            .db()
            .run(move |conn| {
                conn.write(|c| {
                    for (row, feature) in &rows {
                        PRODUCT_FEATURES.write(c, row, feature)?;
                    }
                    let mut sql = "UPDATE stripe_product_features SET deleted = TRUE WHERE product_id = ? AND livemode = ? AND deleted = FALSE".to_owned();
                    let mut binds = vec![SqlValue::Text(Some(product.clone())), SqlValue::Bool(Some(live))];
                    if !rows.is_empty() {
                        sql.push_str(&format!(" AND id NOT IN ({})", vec!["?"; rows.len()].join(", ")));
                        binds.extend(rows.iter().map(|(r, _)| SqlValue::Text(Some(r.id.clone()))));
                    }
                    // A feature detached changes what the product's subscribers may do,
                    // as one written does (marked by its write): they are told too.
                    if execute(c, &sql, &binds)? > 0 {
                        crate::access::changes::mark_product(c, &product, live)?;
                    }
                    Self::for_products(c, std::slice::from_ref(&product), live)
                })
            })
            .await
    }

    /// The features (not detached) of these products in a mode.
    pub(crate) fn for_products(
        conn: &mut crate::db::Conn<'_>,
        products: &[String],
        live: bool,
    ) -> Result<Vec<Self>> {
        Ok(by_ids!(
            products,
            stripe_product_features::product_id,
            |of| on_conn!(conn, c => stripe_product_features::table
                .filter(of)
                .filter(stripe_product_features::livemode.eq(live))
                .filter(stripe_product_features::deleted.eq(false))
                .order(stripe_product_features::id.asc())
                .select(ProductFeature::as_select())
                .load(c))
        )?)
    }
}

mirror_table!(PRODUCT_FEATURES {
    kind: "product_feature",
    table: "stripe_product_features",
    api_path: None,
    id_from: None,
    accepts: &["product_feature"],
    columns: &["product_id", "lookup_key"],
    keep_when_null: &[("product_id", None)],
    extract: |f: &Fields<'_>| {
        Ok(vec![
            SqlValue::Text(f.id_ref("product")?),
            SqlValue::Text(f.first(
                &["entitlement_feature.lookup_key", "lookup_key"],
                Fields::str,
            )?),
        ])
    },
    final_tombstones: false,
    access: crate::access::changes::AccessLink::Product("product_id"),
    children: None,
    partial: None,
});
