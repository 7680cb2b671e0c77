//! Subscription and its items. Items are mirrored with their subscription: written
//! when it is, and tombstoned when they leave its `items` list.

use diesel::prelude::*;
use serde_json::{Value, json};

use crate::Mirror;
use crate::db::schema::{stripe_subscription_items, stripe_subscriptions};
use crate::db::{Conn, by_ids, on_conn};
use crate::error::{Error, Result};
use crate::sync::fields::Fields;
use crate::sync::upsert::{Children, SqlValue, mirror_table};
use crate::sync::{Model, sync_methods};

/// Statuses that grant access ([`Subscription::is_status_current`]).
pub const CURRENT_STATUSES: [&str; 2] = ["active", "trialing"];

/// A mirrored Stripe subscription.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = stripe_subscriptions)]
pub struct Subscription {
    /// Stripe id (`sub_...`).
    pub id: String,
    /// Whether it lives in live mode.
    pub livemode: bool,
    /// The customer's Stripe id.
    pub customer_id: Option<String>,
    /// `active`, `trialing`, `past_due`, `canceled`, `unpaid`, `incomplete`, ...
    pub status: Option<SubscriptionStatus>,
    /// Start of the current period (unix); read from the items on API 2025-03-31 and later.
    pub current_period_start: Option<i64>,
    /// End of the current period (unix); read from the items on API 2025-03-31 and later.
    pub current_period_end: Option<i64>,
    /// Cancels when the current period ends.
    pub cancel_at_period_end: Option<bool>,
    /// When a scheduled cancellation takes effect (unix).
    pub cancel_at: Option<i64>,
    /// When it was canceled (unix).
    pub canceled_at: Option<i64>,
    /// When it ended (unix).
    pub ended_at: Option<i64>,
    /// Trial start (unix).
    pub trial_start: Option<i64>,
    /// Trial end (unix).
    pub trial_end: Option<i64>,
    /// Unix time Stripe created it.
    pub created: Option<i64>,
    /// Deleted in Stripe: a tombstone.
    pub deleted: bool,
    /// Unix time of the data held (event `created` or fetch time).
    pub stamp: i64,
    /// Unix time this row was last written.
    pub synced_at: i64,
    pub(crate) data: String,
}

/// One item of a subscription: a price (or legacy plan) and a quantity.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = stripe_subscription_items)]
pub struct SubscriptionItem {
    /// Stripe id (`si_...`).
    pub id: String,
    /// Whether it lives in live mode.
    pub livemode: bool,
    /// The subscription's Stripe id.
    pub subscription_id: Option<String>,
    /// The price's Stripe id (a legacy plan's id when the item has a plan).
    pub price_id: Option<String>,
    /// The product's Stripe id.
    pub product_id: Option<String>,
    /// Quantity.
    pub quantity: Option<i64>,
    /// Start of the item's current period (unix).
    pub current_period_start: Option<i64>,
    /// End of the item's current period (unix).
    pub current_period_end: Option<i64>,
    /// Unix time Stripe created it.
    pub created: Option<i64>,
    /// No longer part of its subscription, or deleted.
    pub deleted: bool,
    /// Unix time of the data held.
    pub stamp: i64,
    /// Unix time this row was last written.
    pub synced_at: i64,
    pub(crate) data: String,
}

/// The item list of a subscription (`items.data`), empty when absent.
fn item_list<'a>(f: &Fields<'a>) -> Result<Vec<&'a Value>> {
    match f.get("items.data") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.iter().collect()),
        Some(_) => Err(Error::mapping(
            f.kind,
            f.id,
            "items.data",
            "is not an array",
        )),
    }
}

/// The period bounds: top level before API 2025-03-31, per item after.
fn period(f: &Fields<'_>) -> Result<(Option<i64>, Option<i64>)> {
    let (mut starts, mut ends) = (
        vec![f.i64("current_period_start")?],
        vec![f.i64("current_period_end")?],
    );
    for i in 0..item_list(f)?.len() {
        starts.push(f.i64(&format!("items.data.{i}.current_period_start"))?);
        ends.push(f.i64(&format!("items.data.{i}.current_period_end"))?);
    }
    Ok((
        starts.into_iter().flatten().min(),
        ends.into_iter().flatten().max(),
    ))
}

mirror_table!(SUBSCRIPTION_ITEMS {
    kind: "subscription_item",
    table: "stripe_subscription_items",
    api_path: None,
    id_from: None,
    accepts: &["subscription_item"],
    columns: &[
        "subscription_id",
        "price_id",
        "product_id",
        "quantity",
        "current_period_start",
        "current_period_end"
    ],
    keep_when_null: &[],
    extract: |f| {
        // A legacy item carries a `plan`; a current one a `price` (and a `plan` copy).
        let price_id = f.required("price", f.first(&["price", "plan"], Fields::id_ref)?)?;
        Ok(vec![
            SqlValue::Text(f.id_ref("subscription")?),
            SqlValue::Text(price_id),
            SqlValue::Text(f.first(&["price.product", "plan.product"], Fields::id_ref)?),
            SqlValue::Int(f.i64("quantity")?),
            SqlValue::Int(f.i64("current_period_start")?),
            SqlValue::Int(f.i64("current_period_end")?),
        ])
    },
    final_tombstones: false,
    access: crate::access::changes::AccessLink::None,
    children: None,
    partial: None,
});

static ITEMS: Children = Children {
    table: &SUBSCRIPTION_ITEMS,
    parent_column: "subscription_id",
    list: item_list,
    complete: |f| {
        f.get("items.data").is_some() && f.get("items.has_more") != Some(&Value::Bool(true))
    },
};

mirror_table!(SUBSCRIPTIONS {
    kind: "subscription",
    table: "stripe_subscriptions",
    api_path: Some("/subscriptions"),
    id_from: None,
    accepts: &["subscription"],
    columns: &[
        "customer_id",
        "status",
        "current_period_start",
        "current_period_end",
        "cancel_at_period_end",
        "cancel_at",
        "canceled_at",
        "ended_at",
        "trial_start",
        "trial_end",
    ],
    keep_when_null: &[],
    extract: |f| {
        let (start, end) = period(f)?;
        Ok(vec![
            SqlValue::Text(f.required("customer", f.id_ref("customer")?)?),
            SqlValue::Text(f.required("status", f.str("status")?)?),
            SqlValue::Int(start),
            SqlValue::Int(end),
            SqlValue::Bool(f.bool("cancel_at_period_end")?),
            SqlValue::Int(f.i64("cancel_at")?),
            SqlValue::Int(f.i64("canceled_at")?),
            SqlValue::Int(f.i64("ended_at")?),
            SqlValue::Int(f.i64("trial_start")?),
            SqlValue::Int(f.i64("trial_end")?),
        ])
    },
    final_tombstones: true,
    access: crate::access::changes::AccessLink::Customer("customer_id"),
    children: Some(&ITEMS),
    // Stripe embeds the first 10 items (of up to 20); the rest are fetched.
    partial: Some(
        |subscription| subscription.pointer("/items/has_more") == Some(&Value::Bool(true))
    ),
});

/// Completes a subscription whose embedded `items` list says `has_more` with every
/// page of `GET /v1/subscription_items?subscription=...`: a product on its 11th item
/// grants access like the first.
pub(crate) async fn complete_items(
    client: &crate::stripe::StripeClient,
    subscription: &mut Value,
) -> Result<()> {
    let Some(id) = subscription
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Ok(());
    };
    let query =
        serde_json::Map::from_iter([("subscription".to_owned(), Value::String(id.clone()))]);
    let (items, _) = client
        .list_all(
            "/subscription_items",
            query,
            &format!("items of subscription {id}"),
            "subscription_item",
        )
        .await?;
    if let Some(fields) = subscription.as_object_mut() {
        let url = format!("/v1/subscription_items?subscription={id}");
        fields.insert(
            "items".to_owned(),
            serde_json::json!({ "object": "list", "data": items, "has_more": false, "url": url }),
        );
    }
    Ok(())
}

impl Model for Subscription {
    const TABLE: &'static crate::sync::MirrorTable = &SUBSCRIPTIONS;
    fn find(conn: &mut Conn<'_>, id: &str) -> Result<Option<Self>> {
        Ok(on_conn!(conn, c => stripe_subscriptions::table
            .find(id)
            .select(Subscription::as_select())
            .get_result(c)
            .optional())?)
    }
    fn from_row(row: &crate::sync::upsert::Row) -> Self {
        Subscription {
            id: row.id.clone(),
            livemode: row.livemode,
            customer_id: row.text("customer_id"),
            status: row.text("status").as_deref().map(SubscriptionStatus::from),
            current_period_start: row.int("current_period_start"),
            current_period_end: row.int("current_period_end"),
            cancel_at_period_end: row.flag("cancel_at_period_end"),
            cancel_at: row.int("cancel_at"),
            canceled_at: row.int("canceled_at"),
            ended_at: row.int("ended_at"),
            trial_start: row.int("trial_start"),
            trial_end: row.int("trial_end"),
            created: row.created(),
            deleted: row.deleted,
            stamp: row.stamp.at,
            synced_at: crate::sync::now(),
            data: row.data().to_owned(),
        }
    }
}

impl Model for SubscriptionItem {
    const TABLE: &'static crate::sync::MirrorTable = &SUBSCRIPTION_ITEMS;
    fn find(conn: &mut Conn<'_>, id: &str) -> Result<Option<Self>> {
        Ok(on_conn!(conn, c => stripe_subscription_items::table
            .find(id)
            .select(SubscriptionItem::as_select())
            .get_result(c)
            .optional())?)
    }
    fn from_row(row: &crate::sync::upsert::Row) -> Self {
        SubscriptionItem {
            id: row.id.clone(),
            livemode: row.livemode,
            subscription_id: row.text("subscription_id"),
            price_id: row.text("price_id"),
            product_id: row.text("product_id"),
            quantity: row.int("quantity"),
            current_period_start: row.int("current_period_start"),
            current_period_end: row.int("current_period_end"),
            created: row.created(),
            deleted: row.deleted,
            stamp: row.stamp.at,
            synced_at: crate::sync::now(),
            data: row.data().to_owned(),
        }
    }
}

sync_methods!(Subscription, "subscription");

impl SubscriptionItem {
    /// The raw Stripe object as last mirrored.
    pub fn data(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }

    /// The mirrored item with this Stripe id, tombstones included.
    pub async fn get(mirror: &Mirror, id: &str) -> Result<Option<Self>> {
        let id = id.to_owned();
        mirror.db().run(move |conn| Self::find(conn, &id)).await
    }
}

super::string_enum! {
    /// A subscription's status, as Stripe means it
    /// (<https://docs.stripe.com/billing/subscriptions/overview#subscription-statuses>).
    SubscriptionStatus {
        /// Created, first payment pending (up to 23 hours).
        Incomplete = "incomplete",
        /// The first payment never came: the subscription is over.
        IncompleteExpired = "incomplete_expired",
        /// In a free trial: grants access.
        Trialing = "trialing",
        /// Paid: grants access.
        Active = "active",
        /// A renewal payment failed; Stripe is retrying.
        PastDue = "past_due",
        /// Ended.
        Canceled = "canceled",
        /// Retries exhausted, left open unpaid.
        Unpaid = "unpaid",
        /// A trial ended without a payment method, paused.
        Paused = "paused",
    }
}

impl SubscriptionStatus {
    /// The statuses Stripe still bills (`active`, `trialing`, `past_due`, `unpaid`,
    /// `paused`): a subscription in one of them is not over, whatever access it grants.
    pub fn is_billed(&self) -> bool {
        use SubscriptionStatus as S;
        matches!(
            self,
            S::Active | S::Trialing | S::PastDue | S::Unpaid | S::Paused
        )
    }

    /// `active` or `trialing`: the statuses that grant access.
    pub fn is_current(&self) -> bool {
        matches!(
            self,
            SubscriptionStatus::Active | SubscriptionStatus::Trialing
        )
    }

    /// `canceled` or `incomplete_expired`: never grants anything again.
    pub fn has_ended(&self) -> bool {
        matches!(
            self,
            SubscriptionStatus::Canceled | SubscriptionStatus::IncompleteExpired
        )
    }
}

/// The typed create request for `customer` and `prices` (one item each).
fn new_subscription(
    customer: &str,
    prices: &[&str],
) -> stripe_billing::subscription::CreateSubscription {
    let items: Vec<_> = prices
        .iter()
        .map(
            |price| stripe_billing::subscription::CreateSubscriptionItems {
                price: Some((*price).to_owned()),
                ..Default::default()
            },
        )
        .collect();
    stripe_billing::subscription::CreateSubscription::new()
        .customer(customer)
        .items(items)
}

/// The sorted price ids of a subscription object's items (`price`, or a legacy `plan`).
fn prices_of(subscription: &Value) -> Vec<String> {
    let items = subscription
        .pointer("/items/data")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut prices: Vec<String> = items
        .iter()
        .filter_map(|i| i.get("price").or_else(|| i.get("plan")))
        .filter_map(|p| p.as_str().or_else(|| p.get("id").and_then(Value::as_str)))
        .map(str::to_owned)
        .collect();
    prices.sort();
    prices.dedup();
    prices
}

/// The client secret the browser confirms a subscription's first payment with:
/// `latest_invoice.confirmation_secret.client_secret` (API 2025-03-31 and later), else
/// `latest_invoice.payment_intent.client_secret` (before).
pub fn client_secret_of(subscription: &Value) -> Option<String> {
    [
        "/latest_invoice/confirmation_secret/client_secret",
        "/latest_invoice/payment_intent/client_secret",
    ]
    .iter()
    .find_map(|path| subscription.pointer(path).and_then(Value::as_str))
    .map(str::to_owned)
}

/// A subscription waiting for its first payment ([`Subscription::create_incomplete`]).
#[derive(Clone, Debug)]
pub struct IncompleteSubscription {
    /// The mirrored subscription (status `incomplete` until the payment succeeds).
    pub subscription: Subscription,
    /// What Stripe.js's Payment Element confirms (`.expose()` it into the page only);
    /// `None` when nothing is due now (a trial, a zero amount).
    pub client_secret: Option<crate::Secret>,
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Subscription {
    /// Subscribes `customer_id` to `price_ids` in Stripe (the customer needs a default
    /// payment method, or a trial) and mirrors the new subscription at once.
    pub async fn create(
        mirror: &Mirror,
        customer_id: &str,
        price_ids: &[&str],
    ) -> Result<Subscription> {
        let create = new_subscription(customer_id, price_ids);
        let object = format!("subscription of customer {customer_id}");
        let created = mirror
            .stripe()
            .await?
            .request(&create, None, Some(&object))
            .await?;
        crate::sync::sync_from_stripe_data::<Subscription>(mirror, created.value, created.at).await
    }

    /// The customer's subscription to exactly `price_ids`: the mirror's when it has
    /// one that has not ended, else Stripe's, else created (idempotency key derived
    /// from mode, customer, the set of prices and how many subscriptions the customer
    /// already has, so racing processes create one and a later resubscription is new),
    /// mirrored at once. The customer needs a default payment method or a trial;
    /// for a first payment in the browser use [`Subscription::create_incomplete`].
    pub async fn get_or_create(
        mirror: &Mirror,
        customer_id: &str,
        price_ids: &[&str],
    ) -> Result<Subscription> {
        let mut wanted: Vec<String> = price_ids.iter().map(|p| p.to_string()).collect();
        wanted.sort();
        wanted.dedup();
        for sub in Self::for_customer(mirror, customer_id).await? {
            if sub.has_not_ended() && sub.price_set(mirror).await? == wanted {
                return Ok(sub);
            }
        }
        let client = mirror.stripe().await?;
        let object = format!("subscription of customer {customer_id}");
        let list = stripe_billing::subscription::ListSubscription::new()
            .customer(customer_id)
            .status(stripe_billing::subscription::ListSubscriptionStatus::All)
            .limit(100);
        let listed = client.request(&list, None, Some(&object)).await?;
        let existing = listed
            .value
            .get("data")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let found = existing.iter().find(|s| {
            let status = s.get("status").and_then(Value::as_str).unwrap_or_default();
            !SubscriptionStatus::from(status).has_ended() && prices_of(s) == wanted
        });
        let answer = match found {
            Some(value) => crate::stripe::Answer {
                value: value.clone(),
                at: listed.at,
                nul_free: listed.nul_free,
            },
            None => {
                let prices: Vec<&str> = wanted.iter().map(String::as_str).collect();
                let create = new_subscription(customer_id, &prices);
                let natural = format!("{customer_id}/{}/{}", wanted.join(","), existing.len());
                let key =
                    crate::sync::remote::creation_key("subscription", mirror.live_mode(), &natural);
                client.request(&create, Some(key), Some(&object)).await?
            }
        };
        crate::sync::sync_from_stripe_data::<Subscription>(mirror, answer.value, answer.at).await
    }

    /// Starts a subscription whose first payment the browser confirms with Stripe's
    /// Payment Element: created `payment_behavior = default_incomplete`, mirrored at
    /// once (status `incomplete`), with the client secret of its first invoice's
    /// payment, read from the current shape (`latest_invoice.confirmation_secret`) or
    /// the older one (`latest_invoice.payment_intent`). The webhooks make it `active`.
    pub async fn create_incomplete(
        mirror: &Mirror,
        customer_id: &str,
        price_ids: &[&str],
    ) -> Result<IncompleteSubscription> {
        use stripe_billing::subscription::{
            CreateSubscriptionPaymentBehavior, CreateSubscriptionPaymentSettings,
            CreateSubscriptionPaymentSettingsSaveDefaultPaymentMethod as SaveMethod,
        };
        let mut settings = CreateSubscriptionPaymentSettings::new();
        settings.save_default_payment_method = Some(SaveMethod::OnSubscription);
        let create = new_subscription(customer_id, price_ids)
            .payment_behavior(CreateSubscriptionPaymentBehavior::DefaultIncomplete)
            .payment_settings(settings)
            .expand(vec!["latest_invoice.confirmation_secret".to_owned()]);
        let object = format!("subscription of customer {customer_id}");
        let client = mirror.stripe().await?;
        let created = client.request(&create, None, Some(&object)).await?;
        let mut client_secret = client_secret_of(&created.value);
        // The older shape names its payment intent without expanding it: ask for it.
        if client_secret.is_none()
            && let Some(intent) = created
                .value
                .pointer("/latest_invoice/payment_intent")
                .and_then(Value::as_str)
        {
            let path = format!("/payment_intents/{intent}");
            let found = client
                .get(
                    &path,
                    &serde_json::json!({}),
                    Some(&format!("payment intent {intent}")),
                )
                .await?;
            client_secret = found
                .get("client_secret")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        let client_secret = client_secret.map(crate::Secret::new);
        // Mirror the subscription as webhooks carry it: the invoice by id, so the
        // payment's secret is not stored (nor shown by `Debug`).
        let mut value = created.value;
        if let Some(id) = value.pointer("/latest_invoice/id").cloned() {
            value["latest_invoice"] = id;
        }
        let subscription =
            crate::sync::sync_from_stripe_data::<Subscription>(mirror, value, created.at).await?;
        Ok(IncompleteSubscription {
            subscription,
            client_secret,
        })
    }

    /// Not ended: any status but `canceled` and `incomplete_expired`, not deleted.
    fn has_not_ended(&self) -> bool {
        !self.deleted
            && !self
                .status
                .as_ref()
                .is_some_and(SubscriptionStatus::has_ended)
    }

    /// The sorted price ids of the current items.
    async fn price_set(&self, mirror: &Mirror) -> Result<Vec<String>> {
        let mut prices: Vec<String> = self
            .items(mirror)
            .await?
            .into_iter()
            .filter_map(|i| i.price_id)
            .collect();
        prices.sort();
        prices.dedup();
        Ok(prices)
    }

    /// The live subscriptions of these customers, newest first (rows without
    /// `created` last, on both backends): what every access check reads.
    pub(crate) fn of_customers(
        conn: &mut crate::db::Conn<'_>,
        customer_ids: &[String],
    ) -> Result<Vec<Subscription>> {
        Ok(by_ids!(
            customer_ids,
            stripe_subscriptions::customer_id,
            |of| on_conn!(conn, c => stripe_subscriptions::table
                .filter(of)
                .filter(stripe_subscriptions::deleted.eq(false))
                .order((
                    stripe_subscriptions::created.is_null().asc(),
                    stripe_subscriptions::created.desc(),
                    stripe_subscriptions::id.desc(),
                ))
                .select(Subscription::as_select())
                .load(c))
        )?)
    }

    /// A customer's subscriptions (any status, not deleted), newest first.
    pub async fn for_customer(mirror: &Mirror, customer_id: &str) -> Result<Vec<Subscription>> {
        let customer_id = customer_id.to_owned();
        mirror
            .db()
            .read(move |conn| Self::of_customers(conn, std::slice::from_ref(&customer_id)))
            .await
    }

    /// Whom the subscription belongs to in the host app: its customer's subscriber id
    /// (Cashier's `owner`), from the mirror; kept after the customer is deleted. `None`
    /// when the customer is not mirrored or is linked to no subscriber.
    ///
    /// ```no_run
    /// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
    /// if let Some(subscription) = stripe_mirror::Subscription::get(&mirror, "sub_123").await? {
    ///     let user = subscription.subscriber_id(&mirror).await?; // to email them, say
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscriber_id(&self, mirror: &Mirror) -> Result<Option<String>> {
        let Some(customer) = &self.customer_id else {
            return Ok(None);
        };
        Ok(crate::Customer::get(mirror, customer)
            .await?
            .and_then(|c| c.subscriber_id))
    }

    /// The subscription's current items (not removed), by id.
    pub async fn items(&self, mirror: &Mirror) -> Result<Vec<SubscriptionItem>> {
        let id = self.id.clone();
        mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => stripe_subscription_items::table
                    .filter(stripe_subscription_items::subscription_id.eq(&id))
                    .filter(stripe_subscription_items::deleted.eq(false))
                    .order(stripe_subscription_items::id)
                    .select(SubscriptionItem::as_select())
                    .load(c))?)
            })
            .await
    }

    /// Status is `active` or `trialing`.
    pub fn is_status_current(&self) -> bool {
        !self.deleted
            && self
                .status
                .as_ref()
                .is_some_and(SubscriptionStatus::is_current)
    }

    /// The paid period (or the trial) has not ended.
    pub fn is_period_current(&self) -> bool {
        self.is_period_current_at(unix_now())
    }

    /// [`Subscription::is_period_current`] at a given unix time.
    pub fn is_period_current_at(&self, now: i64) -> bool {
        self.current_period_end.is_some_and(|end| end > now)
            || self.trial_end.is_some_and(|end| end > now)
    }

    /// Grants access now: status current, and a subscription set to cancel at period
    /// end only while its period lasts (dj-stripe's `is_valid`). "Now" is this host's
    /// system clock; the gate and [`Customer::valid_subscriptions`](crate::Customer::valid_subscriptions)
    /// read the mirror's ([`Config::clock`](crate::Config::clock)): for the same
    /// answer, call `is_valid_at(mirror.now())`.
    pub fn is_valid(&self) -> bool {
        self.is_valid_at(unix_now())
    }

    /// [`Subscription::is_valid`] at a given unix time.
    pub fn is_valid_at(&self, now: i64) -> bool {
        self.is_status_current() && !self.has_ended_at(now)
    }

    /// Its scheduled end has passed, whatever its status says: the cancellation date
    /// (even if its event is late), or the period's end when set to cancel with it. A
    /// cancellation set for a later date ends access at that date, not at each
    /// renewal. Shared by [`is_valid_at`](Self::is_valid_at) and the gate's past-due
    /// grace.
    pub(crate) fn has_ended_at(&self, now: i64) -> bool {
        self.cancel_at.is_some_and(|at| at <= now)
            || (self.cancel_at_period_end == Some(true) && !self.is_period_current_at(now))
    }

    /// In a trial that has not ended.
    pub fn on_trial(&self) -> bool {
        self.on_trial_at(unix_now())
    }

    /// [`Subscription::on_trial`] at a given unix time.
    pub fn on_trial_at(&self, now: i64) -> bool {
        self.status == Some(SubscriptionStatus::Trialing)
            && self.trial_end.is_none_or(|end| end > now)
    }

    /// Stripe's `pause_collection`, when payment collection is paused (from the
    /// Dashboard, the API or the Billing Portal): the status stays `active` and
    /// invoices are not collected until `resumes_at`. Stripe means the service to go
    /// on meanwhile, so a pause alone does not end access; a gate can refuse it
    /// ([`Gate::deny_paused_collection`](crate::access::Gate::deny_paused_collection)).
    pub fn pause_collection(&self) -> Option<PauseCollection> {
        #[derive(serde::Deserialize)]
        struct Held {
            pause_collection: Option<PauseCollection>,
        }
        serde_json::from_str::<Held>(&self.data)
            .ok()?
            .pause_collection
    }

    /// Whether payment collection is paused now ([`Subscription::pause_collection`]).
    pub fn is_collection_paused(&self) -> bool {
        self.is_collection_paused_at(unix_now())
    }

    /// [`Subscription::is_collection_paused`] at a given unix time: paused, and not
    /// past its `resumes_at`.
    pub fn is_collection_paused_at(&self, now: i64) -> bool {
        self.pause_collection()
            .is_some_and(|pause| pause.resumes_at.is_none_or(|at| at > now))
    }

    /// Canceled (at period end or at a set time) but still within the paid period.
    pub fn on_grace_period(&self) -> bool {
        self.on_grace_period_at(unix_now())
    }

    /// [`Subscription::on_grace_period`] at a given unix time.
    pub fn on_grace_period_at(&self, now: i64) -> bool {
        // Stripe sets `cancel_at` for a cancellation at period end too; of items with
        // periods of their own (a monthly and a yearly one) that is the earliest
        // item's end, where `current_period_end` holds the latest.
        let at_period_end = self.cancel_at_period_end == Some(true);
        let ends = self
            .cancel_at
            .or(self.current_period_end.filter(|_| at_period_end));
        self.is_status_current() && ends.is_some_and(|end| end > now)
    }
}

/// How Stripe bills a change of price or quantity within a period
/// ([`Subscription::swap`], [`Subscription::update_quantity`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Proration {
    /// The unused time is credited and the new price's charged, on the next invoice
    /// (Stripe's default).
    #[default]
    CreateProrations,
    /// As `CreateProrations`, invoiced (and charged) now.
    AlwaysInvoice,
    /// No proration: the new price or quantity is billed from the next renewal. A swap
    /// to a price of another interval starts a new period (and invoice) now whatever
    /// this says, as Stripe does.
    None,
}

impl Proration {
    fn as_str(self) -> &'static str {
        match self {
            Proration::CreateProrations => "create_prorations",
            Proration::AlwaysInvoice => "always_invoice",
            Proration::None => "none",
        }
    }
}

/// Changes made in Stripe, as Laravel Cashier's and Pay's subscriptions make them. Each
/// sends one request and mirrors the subscription Stripe answers with at once (the
/// webhooks that follow find it current). Stripe stamps events in whole seconds, so an
/// earlier change of the same second (a cancel, then its resume) could read as newer
/// when its event lands late: the subscription is fetched again once that second is
/// over, in the background, or before returning (about a second) when the mirror
/// already holds a change of that second. With an access hook, call
/// [`Webhooks::deliver_access_change`](crate::Webhooks::deliver_access_change) for the
/// subscriber afterwards, as after [`sync_session`](crate::sync_session).
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
/// use stripe_mirror::{Customer, Proration};
/// let customer = Customer::by_subscriber(&mirror, "user-42").await?.expect("a customer");
/// if let Some(sub) = customer.subscription(&mirror).await? {
///     let sub = sub.swap(&mirror, "price_pro_yearly", Proration::AlwaysInvoice).await?;
///     let sub = sub.cancel_at_period_end(&mirror).await?; // access until the period ends
///     assert!(sub.on_grace_period());
///     sub.resume(&mirror).await?; // changed their mind
/// }
/// # Ok(()) }
/// ```
impl Subscription {
    /// Cancels at the end of the paid period (Cashier's and Pay's `cancel`): access goes
    /// on until then ([`on_grace_period`](Self::on_grace_period)), and
    /// [`resume`](Self::resume) undoes it meanwhile.
    pub async fn cancel_at_period_end(&self, mirror: &Mirror) -> Result<Subscription> {
        self.update(mirror, json!({"cancel_at_period_end": true}), "cancel")
            .await
    }

    /// Cancels now (Cashier's `cancelNow`, Pay's `cancel_now!`): access ends at once.
    /// Stripe credits nothing unless its settings say so.
    pub async fn cancel_now(&self, mirror: &Mirror) -> Result<Subscription> {
        let client = mirror.stripe().await?;
        let object = format!("subscription {}", self.id);
        let path = format!("/subscriptions/{}", self.id);
        let seen = crate::sync::remote::seen_before(mirror, &SUBSCRIPTIONS, &self.id).await?;
        let answer = match client.delete_at(&path, Some(&object)).await {
            Ok(answer) => answer,
            // A retry after a cancel whose answer was lost: Stripe answers 404 for a
            // canceled subscription. What it holds now says whether it went through.
            Err(err) if crate::stripe::is_missing(&err) => {
                return match crate::sync::remote::sync_one::<Subscription>(mirror, &self.id).await {
                    Ok(now) if now.status == Some(SubscriptionStatus::Canceled) => Ok(now),
                    _ => Err(err),
                };
            }
            Err(err) => return Err(err),
        };
        self.mirror_answer(mirror, &client, answer, seen).await
    }

    /// Undoes a scheduled cancellation that has not taken effect (Cashier's and Pay's
    /// `resume`), at period end or at a set time. Stripe refuses it for a subscription
    /// that has ended ([`Error::Stripe`]): that subscriber goes through Checkout again.
    pub async fn resume(&self, mirror: &Mirror) -> Result<Subscription> {
        let at_set_time =
            |s: &Subscription| s.cancel_at_period_end != Some(true) && s.cancel_at.is_some();
        // A set time (not the period's end): an empty value unsets it.
        let unset_time = || json!({"cancel_at": ""});
        if at_set_time(self) {
            return self.update(mirror, unset_time(), "resume").await;
        }
        let resumed = self
            .update(mirror, json!({"cancel_at_period_end": false}), "resume")
            .await?;
        // The mirror said "at period end" while Stripe had a set time: unset that too.
        if at_set_time(&resumed) {
            return resumed.update(mirror, unset_time(), "resume").await;
        }
        Ok(resumed)
    }

    /// Moves a subscription of one item to another price (Cashier's and Pay's `swap`),
    /// prorated as `proration` says. A subscription of several items is
    /// [`Error::Refused`]: change those in the Billing Portal or with the Stripe API.
    pub async fn swap(
        &self,
        mirror: &Mirror,
        price_id: &str,
        proration: Proration,
    ) -> Result<Subscription> {
        let item = self.only_item(mirror, "swap").await?;
        let form = json!({
            "items": [{"id": item, "price": price_id}],
            "proration_behavior": proration.as_str(),
        });
        self.update(mirror, form, "swap").await
    }

    /// Sets the quantity (seats) of a subscription of one item, prorated as `proration`
    /// says (Cashier's `updateQuantity`). A subscription of several items is
    /// [`Error::Refused`], as for [`swap`](Self::swap).
    pub async fn update_quantity(
        &self,
        mirror: &Mirror,
        quantity: u64,
        proration: Proration,
    ) -> Result<Subscription> {
        if quantity == 0 {
            return Err(Error::Refused(format!(
                "subscription {}: a quantity of 0 (cancel it instead)",
                self.id
            )));
        }
        let item = self.only_item(mirror, "update_quantity").await?;
        let form = json!({
            "items": [{"id": item, "quantity": quantity}],
            "proration_behavior": proration.as_str(),
        });
        self.update(mirror, form, "quantity").await
    }

    /// The id of the subscription's one item, from the mirror.
    async fn only_item(&self, mirror: &Mirror, what: &str) -> Result<String> {
        let items = self.items(mirror).await?;
        match items.as_slice() {
            [one] => Ok(one.id.clone()),
            _ => Err(Error::Refused(format!(
                "subscription {} has {} items: {what} changes a subscription of one; \
                 change several in the Billing Portal or with the Stripe API",
                self.id,
                items.len()
            ))),
        }
    }

    /// `POST /v1/subscriptions/{id}` with `form`, the answer mirrored.
    async fn update(&self, mirror: &Mirror, form: Value, what: &str) -> Result<Subscription> {
        let client = mirror.stripe().await?;
        let object = format!("subscription {} ({what})", self.id);
        let path = format!("/subscriptions/{}", self.id);
        let seen = crate::sync::remote::seen_before(mirror, &SUBSCRIPTIONS, &self.id).await?;
        // One random idempotency key, shared by the retries of this call.
        let answer = client.post_at(&path, &form, None, Some(&object)).await?;
        self.mirror_answer(mirror, &client, answer, seen).await
    }

    /// Stripe's answer, whole (items past the first 10 fetched) and mirrored as newer
    /// than the row was before the request (`seen`), even within its second.
    async fn mirror_answer(
        &self,
        mirror: &Mirror,
        client: &crate::stripe::StripeClient,
        mut answer: crate::stripe::Answer,
        seen: Option<crate::sync::upsert::Seen>,
    ) -> Result<Subscription> {
        crate::sync::remote::complete(client, &SUBSCRIPTIONS, &mut answer.value)
            .await
            .map_err(crate::stripe::changed_while_read)?;
        // A change of the same second as the row it changed (a cancel and its resume):
        // the events of that second, arriving later, could order themselves after this
        // answer (one whose old values it shows reads as newer). Fetched again once the
        // second is over, the row is stamped past all of them.
        // A change the mirror has not seen yet (made in the Portal, its event still on
        // the way) can be of that second too: then the fetch runs in the background.
        let same_second = seen.as_ref().is_some_and(|s| s.stamp() >= answer.at);
        crate::sync::remote::write_answer(mirror, &SUBSCRIPTIONS, answer.value, answer.at, seen)
            .await?;
        let past_the_second = {
            let (mirror, id) = (mirror.clone(), self.id.clone());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
                crate::sync::remote::refetch(&mirror, &SUBSCRIPTIONS, &id).await
            }
        };
        // Stripe made the change and the mirror holds its answer: a failed fetch after
        // it is no failure of the change (the next event or `reconcile` fetches it).
        let id = self.id.clone();
        let fetched_again = async move {
            if let Err(error) = past_the_second.await {
                tracing::warn!(%error, subscription = %id, "the subscription could not be fetched again after its change; its next event or `reconcile` will");
            }
        };
        if same_second {
            fetched_again.await;
        } else {
            tokio::spawn(fetched_again);
        }
        Subscription::get(mirror, &self.id)
            .await?
            .ok_or_else(|| Error::NotFound {
                object: SUBSCRIPTIONS.kind,
                id: self.id.clone(),
            })
    }
}

/// A subscription's paused payment collection ([`Subscription::pause_collection`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[non_exhaustive]
pub struct PauseCollection {
    /// What happens to invoices meanwhile: `void`, `keep_as_draft` or
    /// `mark_uncollectible`.
    pub behavior: String,
    /// When collection resumes (unix time); `None` until resumed by hand.
    pub resumes_at: Option<i64>,
}
