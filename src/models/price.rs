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
    pub recurring_interval: Option<RecurringInterval>,
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
    id_from: None,
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
    access: crate::access::changes::AccessLink::None,
    children: None,
    // A legacy plan (the `plan.*` events Stripe sends beside a recurring price's) holds
    // only part of the price: no `lookup_key`, no tiers. Written, then fetched whole as a price.
    partial: Some(|price| price.get("object").and_then(serde_json::Value::as_str) == Some("plan")),
});

impl Model for Price {
    const TABLE: &'static crate::sync::MirrorTable = &PRICES;
    fn find(conn: &mut Conn<'_>, id: &str) -> Result<Option<Self>> {
        Ok(on_conn!(conn, c => stripe_prices::table
            .find(id)
            .select(Price::as_select())
            .get_result(c)
            .optional())?)
    }
    fn from_row(row: &crate::sync::upsert::Row) -> Self {
        Price {
            id: row.id.clone(),
            livemode: row.livemode,
            product_id: row.text("product_id"),
            active: row.flag("active"),
            currency: row.text("currency"),
            unit_amount: row.int("unit_amount"),
            recurring_interval: row
                .text("recurring_interval")
                .as_deref()
                .map(RecurringInterval::from),
            recurring_interval_count: row.int("recurring_interval_count"),
            lookup_key: row.text("lookup_key"),
            created: row.created(),
            deleted: row.deleted,
            stamp: row.stamp.at,
            synced_at: crate::sync::now(),
            data: row.data().to_owned(),
        }
    }
}

sync_methods!(Price, "price");

super::string_enum! {
    /// How often a recurring price bills.
    RecurringInterval {
        /// Daily.
        Day = "day",
        /// Weekly.
        Week = "week",
        /// Monthly.
        Month = "month",
        /// Yearly.
        Year = "year",
    }
}

/// What [`Price::get_or_create`] creates when no price has the lookup key yet.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NewPrice {
    /// The lookup key: the natural key (`pro_monthly`).
    pub lookup_key: String,
    /// The product it prices.
    pub product: String,
    /// Three-letter currency code (`usd`).
    pub currency: String,
    /// Amount in the currency's smallest unit (cents).
    pub unit_amount: i64,
    /// `month`, `year`, `week` or `day` for a recurring price; `None` for one-time.
    pub interval: Option<String>,
}

impl NewPrice {
    /// The currency and interval as Stripe's types, or an error saying what to write:
    /// async-stripe takes any string (as an `Unknown` value) and Stripe's own answer
    /// would come only after the lookup.
    fn checked(
        &self,
    ) -> Result<(
        stripe_types::Currency,
        Option<stripe_product::price::CreatePriceRecurringInterval>,
    )> {
        use stripe_product::price::CreatePriceRecurringInterval as Interval;
        let lower = |s: &str| match s.to_ascii_lowercase() {
            l if l != s => format!(": write it in lowercase, {l:?}"),
            _ => String::new(),
        };
        let Ok(currency) = self.currency.parse::<stripe_types::Currency>();
        // One async-stripe does not list yet is sent as it is, if it has the shape.
        let shaped =
            self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_lowercase());
        if matches!(currency, stripe_types::Currency::Unknown(_)) && !shaped {
            return Err(crate::Error::Refused(format!(
                "price {}: {:?} is not a currency code, three lowercase letters (usd, eur, ...){}",
                self.lookup_key,
                self.currency,
                lower(&self.currency)
            )));
        }
        let interval = match self.interval.as_deref() {
            None => None,
            Some(text) => match text.parse::<Interval>() {
                Ok(Interval::Unknown(_)) | Err(_) => {
                    return Err(crate::Error::Refused(format!(
                        "price {}: {text:?} is not an interval: day, week, month or year{}",
                        self.lookup_key,
                        lower(text)
                    )));
                }
                Ok(interval) => Some(interval),
            },
        };
        Ok((currency, interval))
    }

    /// `price` when it is what this describes, else an error naming the difference.
    fn matches(&self, price: Price) -> Result<Price> {
        let differs = [
            (
                "product",
                price.product_id.as_deref() != Some(self.product.as_str()),
            ),
            (
                "currency",
                price.currency.as_deref() != Some(self.currency.as_str()),
            ),
            ("unit_amount", price.unit_amount != Some(self.unit_amount)),
            (
                "interval",
                price.recurring_interval.as_ref().map(|i| i.as_str()) != self.interval.as_deref(),
            ),
        ]
        .into_iter()
        .filter(|(_, d)| *d)
        .map(|(field, _)| field)
        .collect::<Vec<_>>();
        if differs.is_empty() {
            return Ok(price);
        }
        Err(crate::Error::Refused(format!(
            "price {} under lookup key {} differs in {}: create the new price under a new lookup key (or archive the old one in Stripe first)",
            price.id,
            self.lookup_key,
            differs.join(", ")
        )))
    }

    /// A recurring price (`interval`: `month`, `year`, ...).
    pub fn recurring(
        lookup_key: &str,
        product: &str,
        currency: &str,
        unit_amount: i64,
        interval: &str,
    ) -> Self {
        NewPrice {
            lookup_key: lookup_key.to_owned(),
            product: product.to_owned(),
            currency: currency.to_owned(),
            unit_amount,
            interval: Some(interval.to_owned()),
        }
    }

    /// A one-time price.
    pub fn one_time(lookup_key: &str, product: &str, currency: &str, unit_amount: i64) -> Self {
        NewPrice {
            interval: None,
            ..Self::recurring(lookup_key, product, currency, unit_amount, "")
        }
    }
}

impl Price {
    /// The active price with this lookup key in the current mode, from the mirror only.
    pub async fn by_lookup_key(mirror: &Mirror, lookup_key: &str) -> Result<Option<Price>> {
        let (key, live) = (lookup_key.to_owned(), mirror.live_mode());
        mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => stripe_prices::table
                    .filter(stripe_prices::lookup_key.eq(&key))
                    .filter(stripe_prices::livemode.eq(live))
                    .filter(stripe_prices::active.eq(true))
                    .filter(stripe_prices::deleted.eq(false))
                    .order((stripe_prices::created.is_null().asc(), stripe_prices::created.desc(), stripe_prices::id.asc()))
                    .select(Price::as_select())
                    .first(c)
                    .optional())?)
            })
            .await
    }

    /// The active price with `new.lookup_key`: the mirror's row when it has one, else
    /// Stripe's (`lookup_keys[]`), else created in Stripe (idempotency key derived from
    /// the lookup key and mode), mirrored at once.
    ///
    /// ```no_run
    /// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
    /// use stripe_mirror::{Price, models::price::NewPrice};
    /// let monthly = Price::get_or_create(&mirror, &NewPrice::recurring("pro_monthly", "pro", "usd", 2900, "month")).await?;
    /// assert_eq!(monthly.lookup_key.as_deref(), Some("pro_monthly"));
    /// # Ok(()) }
    /// ```
    ///
    /// A price found under the lookup key with another product, currency, amount or
    /// interval is an error naming the difference (prices cannot change in Stripe: create
    /// the new one under a new lookup key, or archive the old one first).
    pub async fn get_or_create(mirror: &Mirror, new: &NewPrice) -> Result<Price> {
        // Before anything is asked: a typo would otherwise reach Stripe as it is, or,
        // in capitals, make a price whose currency never matches `new` again.
        let (currency, interval) = new.checked()?;
        if let Some(found) = Self::by_lookup_key(mirror, &new.lookup_key).await? {
            return new.matches(found);
        }
        let client = mirror.stripe().await?;
        let object = format!("price {}", new.lookup_key);
        let list = stripe_product::price::ListPrice::new()
            .lookup_keys(vec![new.lookup_key.clone()])
            .active(true)
            .limit(10);
        let listed = client.request(&list, None, Some(&object)).await?;
        let find = |page: &serde_json::Value| {
            page.get("data")
                .and_then(serde_json::Value::as_array)
                .and_then(|prices| {
                    prices
                        .iter()
                        .find(|p| {
                            p.get("lookup_key").and_then(serde_json::Value::as_str)
                                == Some(new.lookup_key.as_str())
                        })
                        .cloned()
                })
        };
        let found = find(&listed.value);
        let answer = match found {
            Some(value) => crate::stripe::Answer {
                value,
                at: listed.at,
                nul_free: listed.nul_free,
            },
            None => {
                let mut create = stripe_product::price::CreatePrice::new(currency)
                    .product(new.product.as_str())
                    .unit_amount(new.unit_amount)
                    .lookup_key(new.lookup_key.as_str());
                if let Some(interval) = interval {
                    create = create
                        .recurring(stripe_product::price::CreatePriceRecurring::new(interval));
                }
                // The whole form is in the key: the same lookup key with another amount is
                // another request, never a replay of the first.
                let form = stripe_client_core::StripeRequest::build(&create)
                    .body
                    .unwrap_or_default();
                let key = crate::sync::remote::creation_key("price", mirror.live_mode(), &form);
                match client.request(&create, Some(key), Some(&object)).await {
                    Ok(created) => created,
                    // Another process created it between our look and our create, and
                    // a peer that does not replay idempotent requests says so with a
                    // 400: take the price it made (checked against ours below).
                    Err(err) if crate::stripe::already_exists(&err) => {
                        let again = client.request(&list, None, Some(&object)).await?;
                        match find(&again.value) {
                            Some(value) => crate::stripe::Answer {
                                value,
                                at: again.at,
                                nul_free: again.nul_free,
                            },
                            None => return Err(err),
                        }
                    }
                    Err(err) => return Err(err),
                }
            }
        };
        let price =
            crate::sync::sync_from_stripe_data::<Price>(mirror, answer.value, answer.at).await?;
        new.matches(price)
    }

    /// The mirrored product this price belongs to.
    pub async fn product(&self, mirror: &Mirror) -> Result<Option<Product>> {
        match &self.product_id {
            Some(id) => Product::get(mirror, id).await,
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_price_to_create_is_checked_before_stripe_is_asked() {
        let ok = NewPrice::recurring("pro_monthly", "prod_pro", "usd", 2900, "month");
        let (currency, interval) = ok.checked().unwrap();
        assert_eq!(currency, stripe_types::Currency::USD);
        assert_eq!(interval.map(|i| i.to_string()).as_deref(), Some("month"));
        assert!(
            NewPrice::one_time("once", "prod_pro", "eur", 500)
                .checked()
                .unwrap()
                .1
                .is_none()
        );
        // A code of the right shape that async-stripe does not list: Stripe's to judge.
        let (newer, _) = NewPrice::one_time("once", "prod_pro", "zzz", 500)
            .checked()
            .unwrap();
        assert_eq!(newer.to_string(), "zzz");
        for (currency, interval, says) in [
            ("USD", "month", "write it in lowercase, \"usd\""),
            ("dollars", "month", "not a currency code"),
            ("", "month", "not a currency code"),
            ("us", "month", "not a currency code"),
            ("usd", "monthly", "not an interval"),
            ("usd", "Month", "write it in lowercase, \"month\""),
        ] {
            let new = NewPrice::recurring("pro_monthly", "prod_pro", currency, 2900, interval);
            let err = new.checked().unwrap_err().to_string();
            assert!(err.contains(says), "{currency} {interval}: {err}");
        }
    }
}
