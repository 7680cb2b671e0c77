//! Customer: a Stripe customer, linked to the host app's user (the subscriber).

use diesel::prelude::*;

use crate::Mirror;
use crate::db::schema::{stripe_customers, stripe_subscription_items};
use crate::db::{Conn, on_conn};
use crate::error::{Error, Result};
use crate::models::subscription::Subscription;
use crate::sync::upsert::{SqlValue, mirror_table};
use crate::sync::{Model, sync_methods};

/// The metadata key holding the host app's subscriber id on a Stripe customer.
pub const SUBSCRIBER_METADATA_KEY: &str = "stripe_mirror_subscriber";

/// The host app's user behind a Stripe customer (dj-stripe's "subscriber").
///
/// ```
/// use stripe_mirror::Subscriber;
///
/// struct User { id: u64, email: String }
/// impl Subscriber for User {
///     fn subscriber_id(&self) -> String { self.id.to_string() }
///     fn email(&self) -> Option<String> { Some(self.email.clone()) }
/// }
///
/// // Only the id is required: neither email nor name is sent to Stripe.
/// struct Team(String);
/// impl Subscriber for Team {
///     fn subscriber_id(&self) -> String { format!("team-{}", self.0) }
/// }
/// assert_eq!(Team("7".into()).email(), None);
///
/// // A bare id is a subscriber too (no email, no name): `Checkout::create(&mirror, "42")`.
/// assert_eq!("42".subscriber_id(), "42");
/// ```
pub trait Subscriber {
    /// A stable id for this user, unique in the host app, not empty (Stripe drops an
    /// empty metadata value, so the customer could never be found by it again).
    fn subscriber_id(&self) -> String;
    /// The email to put on the Stripe customer (none by default).
    fn email(&self) -> Option<String> {
        None
    }
    /// The name to put on the Stripe customer.
    fn name(&self) -> Option<String> {
        None
    }
}

/// A bare user id: no email or name goes to Stripe.
impl Subscriber for str {
    fn subscriber_id(&self) -> String {
        self.to_owned()
    }
}

/// A bare user id: no email or name goes to Stripe.
impl Subscriber for String {
    fn subscriber_id(&self) -> String {
        self.clone()
    }
}

/// The subscriber's id, refused when empty: Stripe drops an empty metadata value, so
/// the customer could never be found by it again (every call would make another).
fn subscriber_id_of(subscriber: &(impl Subscriber + ?Sized)) -> Result<String> {
    let id = subscriber.subscriber_id();
    if id.trim().is_empty() {
        return Err(Error::Config(
            "the subscriber id is empty: Subscriber::subscriber_id must return your user's \
             id, which finds their Stripe customer again"
                .into(),
        ));
    }
    Ok(id)
}

/// A mirrored Stripe customer.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = stripe_customers)]
pub struct Customer {
    /// Stripe id (`cus_...`).
    pub id: String,
    /// Whether it lives in live mode.
    pub livemode: bool,
    /// Email address, if Stripe has one.
    pub email: Option<String>,
    /// Name, if Stripe has one.
    pub name: Option<String>,
    /// The host app's user this customer belongs to (from metadata or Checkout).
    pub subscriber_id: Option<String>,
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

mirror_table!(CUSTOMERS {
    kind: "customer",
    table: "stripe_customers",
    api_path: Some("/customers"),
    id_from: None,
    accepts: &["customer"],
    columns: &["email", "name", "subscriber_id", "subscriber_in_metadata"],
    // Checkout links a subscriber without touching Stripe metadata: that link is kept.
    // Once the metadata held the key, the metadata alone links the customer: the link
    // goes when the key is removed there (to move the customer to another user, or to
    // take their access away), and no Checkout links it again.
    keep_when_null: &[
        ("subscriber_id", Some("subscriber_in_metadata")),
        ("subscriber_in_metadata", None),
    ],
    extract: |f| {
        // An empty value is no link (the API's way to remove a key; some fakes keep it).
        let subscriber = f
            .str(&format!("metadata.{SUBSCRIBER_METADATA_KEY}"))?
            .filter(|s| !s.is_empty());
        // Unknown when the payload has no metadata (a placeholder, part of an object).
        let in_metadata = f
            .get("metadata")
            .filter(|m| m.is_object())
            .map(|_| subscriber.is_some());
        Ok(vec![
            SqlValue::Text(f.str("email")?),
            SqlValue::Text(f.str("name")?),
            SqlValue::Text(subscriber),
            SqlValue::Bool(in_metadata),
        ])
    },
    final_tombstones: true,
    access: crate::access::changes::AccessLink::Customer("id"),
    children: None,
    partial: None,
});

impl Model for Customer {
    const TABLE: &'static crate::sync::MirrorTable = &CUSTOMERS;
    fn find(conn: &mut Conn<'_>, id: &str) -> Result<Option<Self>> {
        Ok(on_conn!(conn, c => stripe_customers::table
            .find(id)
            .select(Customer::as_select())
            .get_result(c)
            .optional())?)
    }
    fn from_row(row: &crate::sync::upsert::Row) -> Self {
        Customer {
            id: row.id.clone(),
            livemode: row.livemode,
            email: row.text("email"),
            name: row.text("name"),
            subscriber_id: row.text("subscriber_id"),
            created: row.created(),
            deleted: row.deleted,
            stamp: row.stamp.at,
            synced_at: crate::sync::now(),
            data: row.data().to_owned(),
        }
    }
}

sync_methods!(Customer, "customer");

/// The subscriber's customers in a mode, live or tombstones.
#[diesel::dsl::auto_type(no_type_alias)]
fn of_subscriber<'a>(subscriber_id: &'a str, live: bool, deleted: bool) -> _ {
    stripe_customers::subscriber_id
        .eq(subscriber_id)
        .and(stripe_customers::livemode.eq(live))
        .and(stripe_customers::deleted.eq(deleted))
}

impl Customer {
    /// The customer of a host-app subscriber in the current mode (not deleted). Of
    /// several (a Payment Link or a backfill can add one), the one that pays: the one
    /// holding their newest subscription that grants access (else their newest
    /// subscription's, else the newest customer), as the Billing Portal opens: a page
    /// showing "your plan" shows the plan the access gate let in.
    pub async fn by_subscriber(mirror: &Mirror, subscriber_id: &str) -> Result<Option<Customer>> {
        Self::billing_customer(mirror, subscriber_id).await
    }

    /// The ids of every customer the subscriber has had in a mode, deleted ones too.
    pub(crate) fn ids_ever_by_subscriber(
        conn: &mut crate::db::Conn<'_>,
        subscriber_id: &str,
        live: bool,
    ) -> Result<Vec<String>> {
        Ok(on_conn!(conn, c => stripe_customers::table
            .filter(stripe_customers::subscriber_id.eq(subscriber_id))
            .filter(stripe_customers::livemode.eq(live))
            .select(stripe_customers::id)
            .load(c))?)
    }

    /// The ids of the subscriber's live customers in a mode.
    pub(crate) fn ids_by_subscriber(
        conn: &mut crate::db::Conn<'_>,
        subscriber_id: &str,
        live: bool,
    ) -> Result<Vec<String>> {
        Ok(on_conn!(conn, c => stripe_customers::table
            .filter(of_subscriber(subscriber_id, live, false))
            .select(stripe_customers::id)
            .load(c))?)
    }

    /// How many of the subscriber's customers in the current mode are tombstones.
    async fn deleted_of(mirror: &Mirror, subscriber_id: &str) -> Result<i64> {
        let (subscriber_id, live) = (subscriber_id.to_owned(), mirror.live_mode());
        mirror
            .db()
            .read(move |conn| {
                Ok(on_conn!(conn, c => stripe_customers::table
                    .filter(of_subscriber(&subscriber_id, live, true))
                    .count()
                    .get_result(c))?)
            })
            .await
    }

    /// Every customer of the subscriber in the current mode, newest first (usually one;
    /// a Checkout for a customer-less subscriber can add another).
    pub async fn all_by_subscriber(mirror: &Mirror, subscriber_id: &str) -> Result<Vec<Customer>> {
        let (subscriber_id, live) = (subscriber_id.to_owned(), mirror.live_mode());
        mirror
            .db()
            .read(move |conn| {
                Ok(on_conn!(conn, c => stripe_customers::table
                    .filter(of_subscriber(&subscriber_id, live, false))
                    .order((
                        stripe_customers::created.is_null().asc(),
                        stripe_customers::created.desc(),
                        stripe_customers::id.asc(),
                    ))
                    .select(Customer::as_select())
                    .load(c))?)
            })
            .await
    }

    /// The customer whose billing the subscriber manages (the Billing Portal's): of
    /// their customers in the current mode, the one holding their newest subscription
    /// that grants access, else their newest subscription of any status, else their
    /// newest customer. A second customer (a Payment Link, a backfill) is not shown
    /// in place of the one that pays.
    pub(crate) async fn billing_customer(
        mirror: &Mirror,
        subscriber_id: &str,
    ) -> Result<Option<Customer>> {
        let customers = Self::all_by_subscriber(mirror, subscriber_id).await?;
        if customers.len() < 2 {
            return Ok(customers.into_iter().next());
        }
        let ids: Vec<String> = customers.iter().map(|c| c.id.clone()).collect();
        let subscriptions = mirror
            .db()
            .read(move |conn| Subscription::of_customers(conn, &ids))
            .await?;
        let now = mirror.now();
        let paying = subscriptions
            .iter()
            .find(|s| s.is_valid_at(now))
            .or(subscriptions.first())
            .and_then(|s| s.customer_id.clone());
        let position = paying
            .and_then(|id| customers.iter().position(|c| c.id == id))
            .unwrap_or(0);
        Ok(customers.into_iter().nth(position))
    }

    /// The subscriber's customer in the current mode: from the mirror when there is
    /// one, else created in Stripe (subscriber id in its metadata, an idempotency key
    /// derived from subscriber, mode and the details sent, so a repeat or a concurrent
    /// call within Stripe's 24 hours of idempotency creates one) and stored at once.
    /// The mirror is the memory past that: on a new database, run
    /// [`sync_all`](crate::sync_all) first, or the subscriber gets a second customer. Once the subscriber's customer is deleted (a
    /// tombstone in the mirror), the key changes, so the next call creates a new
    /// customer instead of Stripe replaying the deleted one's creation for 24 hours.
    ///
    /// ```no_run
    /// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
    /// use stripe_mirror::{Customer, Subscriber};
    /// struct User { id: u64, email: String }
    /// impl Subscriber for User {
    ///     fn subscriber_id(&self) -> String { self.id.to_string() }
    ///     fn email(&self) -> Option<String> { Some(self.email.clone()) }
    /// }
    /// let user = User { id: 42, email: "ada@example.com".into() };
    /// let customer = Customer::get_or_create(&mirror, &user).await?;
    /// assert_eq!(customer.subscriber_id.as_deref(), Some("42"));
    /// # Ok(()) }
    /// ```
    pub async fn get_or_create(
        mirror: &Mirror,
        subscriber: &(impl Subscriber + ?Sized),
    ) -> Result<Customer> {
        let id = subscriber_id_of(subscriber)?;
        if let Some(found) = Self::by_subscriber(mirror, &id).await? {
            return Ok(found);
        }
        // Concurrent callers in this process wait here; the first one creates.
        let _guard = mirror.creating().lock(&id).await;
        if let Some(found) = Self::by_subscriber(mirror, &id).await? {
            return Ok(found);
        }

        let metadata = [(SUBSCRIBER_METADATA_KEY.to_owned(), id.clone())];
        let mut create = stripe_core::customer::CreateCustomer::new()
            .metadata(std::collections::HashMap::from(metadata));
        if let Some(email) = subscriber.email() {
            create = create.email(email);
        }
        if let Some(name) = subscriber.name() {
            create = create.name(name);
        }
        // The subscriber and the whole form: racing processes send the same key; the
        // same subscriber with other details is another request, never a 400.
        let form = stripe_client_core::StripeRequest::build(&create)
            .body
            .unwrap_or_default();
        // After a deleted customer, another key: Stripe would replay the deleted one.
        let deleted = Self::deleted_of(mirror, &id).await?;
        let mut material = match deleted {
            0 => format!("{id}/{form}"),
            n => format!("{id}/{form}/after {n} deleted"),
        };
        let object = format!("customer of subscriber {id}");
        let client = mirror.stripe().await?;
        let mut replayed = None;
        for _ in 0..2 {
            let key = crate::sync::remote::creation_key("customer", mirror.live_mode(), &material);
            let created = client.request(&create, Some(key), Some(&object)).await?;
            let customer =
                crate::sync::sync_from_stripe_data::<Customer>(mirror, created.value, created.at)
                    .await?;
            if customer.subscriber_id.as_deref() == Some(id.as_str()) {
                return Ok(customer);
            }
            // Stripe replayed (within its 24 hours) the creation of a customer that has
            // left this subscriber since (its key removed, or moved by `link`): another
            // key, which racing callers derive alike.
            material = format!("{material}/after {}", customer.id);
            replayed = Some(customer.id);
        }
        Err(Error::Config(format!(
            "Stripe answered the creation of subscriber {id:?}'s customer with {}, which \
             belongs to another subscriber or none in the mirror; run `sync_all` for \
             customers, then try again",
            replayed.unwrap_or_default()
        )))
    }

    /// Links a customer made before the mirror (Cashier's `users.stripe_id`, one made in
    /// the Dashboard) to `subscriber`: the subscriber's key is set in its Stripe
    /// metadata, which every later event and backfill carries, and the answer mirrored.
    /// One linked to another subscriber is [`Error::Refused`] (remove the key in Stripe
    /// first, should it really move); a deleted one is [`Error::NotFound`]. With an
    /// access hook, call [`Webhooks::deliver_access_change`](crate::Webhooks::deliver_access_change)
    /// for the subscriber afterwards. Two processes linking one customer to two users
    /// at the same moment are not told apart: run it from one place (a migration).
    ///
    /// ```no_run
    /// # async fn f(mirror: stripe_mirror::Mirror, user: impl stripe_mirror::Subscriber) -> stripe_mirror::Result<()> {
    /// // Once per user whose customer was made elsewhere, then `sync_all` for the rest.
    /// let customer = stripe_mirror::Customer::link(&mirror, "cus_from_before", &user).await?;
    /// assert_eq!(customer.subscriber_id, Some(user.subscriber_id()));
    /// # Ok(()) }
    /// ```
    pub async fn link(
        mirror: &Mirror,
        customer_id: &str,
        subscriber: &(impl Subscriber + ?Sized),
    ) -> Result<Customer> {
        let id = subscriber_id_of(subscriber)?;
        // Linked in the mirror alone (a Payment Link's buyer, linked by its Checkout):
        // that link counts as much as Stripe's metadata. One read from the metadata is
        // Stripe's to say (the key may have been removed there since).
        let key = customer_id.to_owned();
        let mirrored: Option<(Option<String>, Option<bool>)> = mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => stripe_customers::table
                    .find(&key)
                    .select((stripe_customers::subscriber_id, stripe_customers::subscriber_in_metadata))
                    .get_result(c)
                    .optional())?)
            })
            .await?;
        if let Some((Some(held), in_metadata)) = mirrored
            && held != id
            && in_metadata != Some(true)
        {
            return Err(Error::Refused(format!(
                "customer {customer_id} belongs to subscriber {held:?}, not {id:?} (linked \
                 by a Checkout): it does not move"
            )));
        }
        let client = mirror.stripe().await?;
        let object = format!("customer {customer_id}");
        let path = format!("/customers/{customer_id}");
        let seen = crate::sync::remote::seen_before(mirror, &CUSTOMERS, customer_id).await?;
        let current = client
            .get_at(&path, &serde_json::json!({}), Some(&object))
            .await?;
        let not_found = || Error::NotFound {
            object: CUSTOMERS.kind,
            id: customer_id.to_owned(),
        };
        if current.value.get("deleted") == Some(&serde_json::Value::Bool(true)) {
            return Err(not_found());
        }
        let held = current
            .value
            .pointer(&format!("/metadata/{SUBSCRIBER_METADATA_KEY}"))
            .and_then(serde_json::Value::as_str)
            .filter(|held| !held.is_empty());
        let answer = match held {
            Some(held) if held == id => current,
            Some(held) => {
                return Err(Error::Refused(format!(
                    "customer {customer_id} belongs to subscriber {held:?}, not {id:?}: \
                     remove its metadata key {SUBSCRIBER_METADATA_KEY:?} in Stripe first if \
                     it should move"
                )));
            }
            None => {
                let form = serde_json::json!({"metadata": {SUBSCRIBER_METADATA_KEY: id}});
                client.post_at(&path, &form, None, Some(&object)).await?
            }
        };
        crate::sync::remote::write_answer(mirror, &CUSTOMERS, answer.value, answer.at, seen)
            .await?;
        Self::get(mirror, customer_id).await?.ok_or_else(not_found)
    }

    /// All of this customer's mirrored subscriptions (any status), newest first.
    pub async fn subscriptions(&self, mirror: &Mirror) -> Result<Vec<Subscription>> {
        Subscription::for_customer(mirror, &self.id).await
    }

    /// The subscriptions that grant access now ([`Subscription::is_valid_at`] the
    /// mirror's clock, as the gate reads it).
    pub async fn valid_subscriptions(&self, mirror: &Mirror) -> Result<Vec<Subscription>> {
        let mut subs = self.subscriptions(mirror).await?;
        let now = mirror.now();
        subs.retain(|s| s.is_valid_at(now));
        Ok(subs)
    }

    /// The subscriptions whose status is `active` or `trialing`.
    pub async fn active_subscriptions(&self, mirror: &Mirror) -> Result<Vec<Subscription>> {
        let mut subs = self.subscriptions(mirror).await?;
        subs.retain(Subscription::is_status_current);
        Ok(subs)
    }

    /// The customer's one valid subscription, `None` without one.
    ///
    /// Several valid subscriptions is [`Error::MultipleSubscriptions`]: use
    /// [`Customer::valid_subscriptions`] when a customer may hold several.
    pub async fn subscription(&self, mirror: &Mirror) -> Result<Option<Subscription>> {
        let mut valid = self.valid_subscriptions(mirror).await?;
        match valid.len() {
            0 => Ok(None),
            1 => Ok(valid.pop()),
            count => Err(Error::MultipleSubscriptions {
                customer: self.id.clone(),
                count,
            }),
        }
    }

    /// Whether the customer has at least one valid subscription.
    pub async fn has_valid_subscription(&self, mirror: &Mirror) -> Result<bool> {
        Ok(!self.valid_subscriptions(mirror).await?.is_empty())
    }

    /// Whether a valid subscription of this customer includes any of `product_ids`.
    pub async fn is_subscribed_to(&self, mirror: &Mirror, product_ids: &[&str]) -> Result<bool> {
        if let Some(price) = product_ids.iter().find(|p| p.starts_with("price_")) {
            return Err(Error::Config(format!(
                "is_subscribed_to takes product ids (prod_...), not the price {price}: use the price's product_id"
            )));
        }
        let valid: Vec<String> = self
            .valid_subscriptions(mirror)
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect();
        if valid.is_empty() || product_ids.is_empty() {
            return Ok(false);
        }
        let products: Vec<String> = product_ids.iter().map(|p| p.to_string()).collect();
        // One query over all valid subscriptions' current items.
        mirror
            .db()
            .run(move |conn| {
                let found: i64 = on_conn!(conn, c => stripe_subscription_items::table
                    .filter(stripe_subscription_items::subscription_id.eq_any(&valid))
                    .filter(stripe_subscription_items::product_id.eq_any(&products))
                    .filter(stripe_subscription_items::deleted.eq(false))
                    .count()
                    .get_result(c))?;
                Ok(found > 0)
            })
            .await
    }
}
