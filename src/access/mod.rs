//! Access: who may use what, answered from the local database alone (no Stripe call
//! on a request). The analogue of dj-stripe's `subscriber_has_active_subscription` and
//! `ValidSubscriptionRequired`, with the reason when the answer is no.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use stripe_mirror::{Config, Customer, Mirror, Subscription};
//! use stripe_mirror::access::{Denial, require_subscription};
//! use serde_json::json;
//!
//! let mirror = Mirror::connect(Config::new("sqlite::memory:")).await?;
//! Customer::sync_from_stripe_data(&mirror, &json!({"id": "cus_1", "object": "customer",
//!     "metadata": {"stripe_mirror_subscriber": "user-1"}})).await?;
//! Subscription::sync_from_stripe_data(&mirror, &json!({"id": "sub_1", "object": "subscription",
//!     "customer": "cus_1", "status": "past_due", "items": {"data": [{"id": "si_1",
//!     "object": "subscription_item", "price": {"id": "price_1", "product": "prod_pro"},
//!     "current_period_end": 4102444800_i64}]}})).await?;
//!
//! let gate = require_subscription("user-1").to_products(&["prod_pro"]);
//! assert!(matches!(gate.check(&mirror).await?, Err(Denial::PastDue { .. })));
//! // Grace for failed renewals is the host's call:
//! assert!(gate.allow_past_due(true).check(&mirror).await?.is_ok());
//! # Ok::<_, stripe_mirror::Error>(()) }).unwrap();
//! ```
//!
//! Roles come from product metadata: a product with `roles: "pro,team"` grants the
//! roles `pro` and `team` to its valid subscribers ([`has_role`]), the group-based
//! alternative to product checks. Features come from Stripe Entitlements: the
//! customer's active entitlement summary when Stripe has sent one (the
//! `entitlements.active_entitlement_summary.updated` event, or
//! [`EntitlementSummary::sync`](crate::models::entitlement::EntitlementSummary::sync)),
//! else the mirrored features of the products subscribed to ([`has_feature`]).

pub mod changes;

use std::fmt;

use diesel::prelude::*;

use crate::Mirror;
use crate::db::schema::{stripe_products, stripe_subscription_items};
use crate::db::{by_ids, on_conn};
use crate::error::Result;
use crate::models::entitlement::ProductFeature;
use crate::models::subscription::{Subscription, SubscriptionStatus};

pub use changes::{AccessChange, AccessState, access_of};

/// The product metadata key naming the roles a product grants, comma separated.
pub const ROLES_METADATA_KEY: &str = "roles";

/// Why access was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denial {
    /// The subscriber has no Stripe customer in this mode.
    NoCustomer,
    /// The customer has never subscribed.
    NoSubscription,
    /// The newest subscription is `past_due` (a renewal failed) and the gate does not
    /// allow that ([`Gate::allow_past_due`]).
    PastDue {
        /// The subscription.
        subscription: String,
    },
    /// The newest subscription is canceled or its cancellation date has passed.
    Canceled {
        /// The subscription.
        subscription: String,
    },
    /// The newest subscription is in another state that grants nothing: `incomplete`
    /// (first payment pending), `incomplete_expired`, `unpaid`, `paused`.
    Inactive {
        /// The subscription.
        subscription: String,
        /// Its status.
        status: String,
    },
    /// The newest subscription that would grant access has its payment collection
    /// paused, and the gate refuses that ([`Gate::deny_paused_collection`]).
    CollectionPaused {
        /// The subscription.
        subscription: String,
    },
    /// Subscribed, but not to any of the products asked for.
    WrongProduct {
        /// The products asked for.
        wanted: Vec<String>,
    },
    /// Subscribed, but no subscribed product grants the role.
    MissingRole {
        /// The role asked for.
        role: String,
    },
    /// Subscribed, but the feature is not among the customer's entitlements.
    MissingFeature {
        /// The feature's lookup key.
        feature: String,
    },
}

impl Denial {
    /// Whether paying would fix it (402 Payment Required) rather than a different
    /// plan (403 Forbidden).
    pub fn needs_payment(&self) -> bool {
        matches!(
            self,
            Denial::NoCustomer
                | Denial::NoSubscription
                | Denial::PastDue { .. }
                | Denial::Canceled { .. }
                | Denial::Inactive { .. }
                | Denial::CollectionPaused { .. }
        )
    }

    /// A stable short name: `no_customer`, `past_due`, `wrong_product`, ...
    pub fn code(&self) -> &'static str {
        match self {
            Denial::NoCustomer => "no_customer",
            Denial::NoSubscription => "no_subscription",
            Denial::PastDue { .. } => "past_due",
            Denial::Canceled { .. } => "canceled",
            Denial::Inactive { .. } => "inactive",
            Denial::CollectionPaused { .. } => "collection_paused",
            Denial::WrongProduct { .. } => "wrong_product",
            Denial::MissingRole { .. } => "missing_role",
            Denial::MissingFeature { .. } => "missing_feature",
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::NoCustomer => f.write_str("no customer for this subscriber: subscribe first"),
            Denial::NoSubscription => f.write_str("no subscription: subscribe first"),
            Denial::PastDue { subscription } => {
                write!(
                    f,
                    "subscription {subscription} is past due: update the payment method"
                )
            }
            Denial::Canceled { subscription } => {
                write!(
                    f,
                    "subscription {subscription} is canceled: subscribe again"
                )
            }
            Denial::Inactive {
                subscription,
                status,
            } => {
                write!(f, "subscription {subscription} is {status}")
            }
            Denial::CollectionPaused { subscription } => {
                write!(
                    f,
                    "subscription {subscription} has its payment collection paused: resume it"
                )
            }
            Denial::WrongProduct { wanted } => {
                write!(f, "no valid subscription to {}", wanted.join(" or "))
            }
            Denial::MissingRole { role } => {
                write!(f, "no subscribed product grants the role {role:?}")
            }
            Denial::MissingFeature { feature } => {
                write!(f, "the feature {feature:?} is not included")
            }
        }
    }
}

impl std::error::Error for Denial {}

/// What a gate decides: the subscription granting access, or why not.
pub type Decision = std::result::Result<Subscription, Denial>;

/// A check of one subscriber's access: valid subscription, and optionally to some
/// products, with a role, with a feature. Build it with [`require_subscription`].
#[derive(Clone, Debug)]
#[must_use]
pub struct Gate {
    subscriber: String,
    /// `None`: any product; `Some`: one of these (an empty list lets nobody in).
    products: Option<Vec<String>>,
    role: Option<String>,
    feature: Option<String>,
    allow_past_due: bool,
    deny_paused_collection: bool,
}

/// A gate for `subscriber_id` (the host's user id, as in [`Customer::by_subscriber`](crate::Customer::by_subscriber)):
/// a valid subscription (`active` or `trialing`, within its period when set to cancel).
pub fn require_subscription(subscriber_id: impl Into<String>) -> Gate {
    Gate {
        subscriber: subscriber_id.into(),
        products: None,
        role: None,
        feature: None,
        allow_past_due: false,
        deny_paused_collection: false,
    }
}

impl Gate {
    /// Only subscriptions including one of these products (product ids, `prod_...`).
    /// An empty list lets nobody in (a list built from an empty query must not open
    /// the door); a price id (`price_...`) is an error at [`check`](Self::check).
    pub fn to_products<I>(mut self, product_ids: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.products = Some(
            product_ids
                .into_iter()
                .map(|p| p.as_ref().to_owned())
                .collect(),
        );
        self
    }

    /// Only subscriptions to a product granting `role` (product metadata `roles`).
    pub fn with_role(mut self, role: &str) -> Self {
        self.role = Some(role.to_owned());
        self
    }

    /// Only when the customer has the feature with this lookup key (Entitlements).
    pub fn with_feature(mut self, lookup_key: &str) -> Self {
        self.feature = Some(lookup_key.to_owned());
        self
    }

    /// Whether a `past_due` subscription still grants access (default: no). Stripe
    /// keeps retrying the payment for a while; many apps allow that grace.
    pub fn allow_past_due(mut self, yes: bool) -> Self {
        self.allow_past_due = yes;
        self
    }

    /// Whether a subscription whose payment collection is paused
    /// ([`Subscription::pause_collection`]) is refused (default: no, as Stripe means
    /// the service to go on for free meanwhile). For apps that stop serving what they
    /// do not bill, as Pay treats a `void` pause.
    pub fn deny_paused_collection(mut self, yes: bool) -> Self {
        self.deny_paused_collection = yes;
        self
    }

    /// Decides, from the local database: the newest subscription granting access, or
    /// why there is none. `Err` is a database failure, not a denial.
    pub async fn check(&self, mirror: &Mirror) -> Result<Decision> {
        if let Some(price) = self
            .products
            .iter()
            .flatten()
            .find(|p| p.starts_with("price_"))
        {
            return Err(crate::Error::Config(format!(
                "to_products takes product ids (prod_...), not the price {price}: use the price's product_id"
            )));
        }
        if self.feature.as_deref() == Some("") {
            return Err(crate::Error::Config(
                "with_feature needs a lookup key, not an empty string".into(),
            ));
        }
        let gate = self.clone();
        let (subscriber, live, now) = (self.subscriber.clone(), mirror.live_mode(), mirror.now());
        // One read: a gate guards a page, so it answers in one trip to the database.
        mirror
            .db()
            .read(move |conn| gate.decide(conn, &subscriber, live, now))
            .await
    }

    fn decide(
        &self,
        conn: &mut crate::db::Conn<'_>,
        subscriber: &str,
        live: bool,
        now: i64,
    ) -> Result<Decision> {
        // Every customer of the subscriber in this mode (a Checkout may have made a second one).
        let customer_ids = crate::Customer::ids_by_subscriber(conn, subscriber, live)?;
        if customer_ids.is_empty() {
            return Ok(Err(Denial::NoCustomer));
        }
        let subscriptions = Subscription::of_customers(conn, &customer_ids)?;
        let Some(newest) = subscriptions.first().cloned() else {
            return Ok(Err(Denial::NoSubscription));
        };
        let grants = |s: &Subscription| {
            s.is_valid_at(now)
                || (self.allow_past_due
                    && !s.deleted
                    && s.status == Some(SubscriptionStatus::PastDue)
                    && !s.has_ended_at(now))
        };
        let valid: Vec<Subscription> = subscriptions.into_iter().filter(|s| grants(s)).collect();
        if valid.is_empty() {
            return Ok(Err(status_denial(&newest, now)));
        }
        let gate = self;
        let mut candidates = with_products(conn, valid)?;
        if let Some(wanted) = &gate.products {
            candidates.retain(|(_, products)| products.iter().any(|p| wanted.contains(p)));
            if candidates.is_empty() {
                return Ok(Err(Denial::WrongProduct {
                    wanted: wanted.clone(),
                }));
            }
        }
        if let Some(role) = &gate.role {
            let all: Vec<String> = candidates.iter().flat_map(|(_, p)| p.clone()).collect();
            let metadata: Vec<(String, String)> = by_ids!(
                all.as_slice(),
                stripe_products::id,
                |of| on_conn!(conn, c => stripe_products::table
                    .filter(of)
                    .filter(stripe_products::deleted.eq(false))
                    .filter(stripe_products::livemode.eq(live))
                    .select((stripe_products::id, stripe_products::data))
                    .load(c))
            )?;
            let granting: Vec<String> = metadata
                .into_iter()
                .filter(|(_, data)| roles_in(data).iter().any(|r| r == role))
                .map(|(id, _)| id)
                .collect();
            candidates.retain(|(_, products)| products.iter().any(|p| granting.contains(p)));
            if candidates.is_empty() {
                return Ok(Err(Denial::MissingRole { role: role.clone() }));
            }
        }
        if let Some(feature) = &gate.feature {
            let granted = features_by_subscription(conn, &candidates, live)?;
            let mut grants = granted.iter().map(|f| f.iter().any(|k| k == feature));
            candidates.retain(|_| grants.next().unwrap_or(false));
            if candidates.is_empty() {
                return Ok(Err(Denial::MissingFeature {
                    feature: feature.clone(),
                }));
            }
        }
        // Last: a paused collection refuses only what would otherwise have let them in.
        if gate.deny_paused_collection {
            let held_by_pause = candidates
                .first()
                .map(|(s, _)| s.id.clone())
                .unwrap_or_default();
            candidates.retain(|(s, _)| !s.is_collection_paused_at(now));
            if candidates.is_empty() {
                return Ok(Err(Denial::CollectionPaused {
                    subscription: held_by_pause,
                }));
            }
        }
        Ok(Ok(candidates.swap_remove(0).0))
    }

    /// [`check`](Self::check) as a yes or no.
    pub async fn allows(&self, mirror: &Mirror) -> Result<bool> {
        Ok(self.check(mirror).await?.is_ok())
    }
}

/// Each subscription with the products of its live items (one query for all).
pub(crate) fn with_products(
    conn: &mut crate::db::Conn<'_>,
    subscriptions: Vec<Subscription>,
) -> Result<Vec<(Subscription, Vec<String>)>> {
    let ids: Vec<&str> = subscriptions.iter().map(|s| s.id.as_str()).collect();
    let items: Vec<(Option<String>, Option<String>)> = by_ids!(
        ids.as_slice(),
        stripe_subscription_items::subscription_id,
        |of| on_conn!(conn, c => stripe_subscription_items::table
            .filter(of)
            .filter(stripe_subscription_items::deleted.eq(false))
            .select((stripe_subscription_items::subscription_id, stripe_subscription_items::product_id))
            .load(c))
    )?;
    Ok(subscriptions
        .into_iter()
        .map(|s| {
            let products = items
                .iter()
                .filter(|(sub, _)| sub.as_deref() == Some(s.id.as_str()))
                .filter_map(|(_, p)| p.clone())
                .collect();
            (s, products)
        })
        .collect())
}

/// The features each subscription (with its products) grants: its customer's
/// Entitlements summary when Stripe has sent one (Stripe's own answer), else the
/// mirrored features of its products. Decided per customer: one customer's summary
/// says nothing of another's subscriptions. The one rule of the gate and of what the
/// access hook is told.
pub(crate) fn features_by_subscription(
    conn: &mut crate::db::Conn<'_>,
    subscriptions: &[(Subscription, Vec<String>)],
    live: bool,
) -> Result<Vec<Vec<String>>> {
    use crate::db::schema::stripe_entitlement_summaries as es;
    let customers: Vec<&str> = subscriptions
        .iter()
        .filter_map(|(s, _)| s.customer_id.as_deref())
        .collect();
    let summaries: Vec<(String, Option<String>)> = by_ids!(
        customers.as_slice(),
        es::id,
        |of| on_conn!(conn, c => es::table
            .filter(of)
            .filter(es::deleted.eq(false))
            .select((es::id, es::lookup_keys))
            .load(c))
    )?;
    let summary_of = |s: &Subscription| {
        summaries
            .iter()
            .find(|(id, _)| Some(id.as_str()) == s.customer_id.as_deref())
    };
    let products: Vec<String> = subscriptions
        .iter()
        .filter(|(s, _)| summary_of(s).is_none())
        .flat_map(|(_, p)| p.clone())
        .collect();
    let product_features = match products.is_empty() {
        true => Vec::new(),
        false => ProductFeature::for_products(conn, &products, live)?,
    };
    Ok(subscriptions
        .iter()
        .map(|(s, products)| match summary_of(s) {
            Some((_, keys)) => keys
                .as_deref()
                .unwrap_or("")
                .split(',')
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
            None => product_features
                .iter()
                .filter(|f| f.product_id.as_ref().is_some_and(|p| products.contains(p)))
                .filter_map(|f| f.lookup_key.clone())
                .collect(),
        })
        .collect())
}

/// Why the newest subscription grants nothing.
fn status_denial(newest: &Subscription, now: i64) -> Denial {
    let subscription = newest.id.clone();
    match &newest.status {
        // Past due with its cancellation date passed: no grace brings it back.
        Some(SubscriptionStatus::PastDue) if newest.has_ended_at(now) => {
            Denial::Canceled { subscription }
        }
        Some(SubscriptionStatus::PastDue) => Denial::PastDue { subscription },
        Some(SubscriptionStatus::Canceled) => Denial::Canceled { subscription },
        // Current status but its cancellation date has passed.
        Some(status) if status.is_current() && !newest.is_valid_at(now) => {
            Denial::Canceled { subscription }
        }
        Some(status) => Denial::Inactive {
            subscription,
            status: status.to_string(),
        },
        None => Denial::Inactive {
            subscription,
            status: "unknown".to_owned(),
        },
    }
}

/// The roles a product's metadata grants.
fn roles_in(data: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(data)
        .ok()
        .and_then(|v| {
            v.pointer(&format!("/metadata/{ROLES_METADATA_KEY}"))
                .and_then(|r| r.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_default()
        .split(',')
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect()
}

/// Whether the subscriber holds a valid subscription to a product granting `role`.
pub async fn has_role(mirror: &Mirror, subscriber_id: &str, role: &str) -> Result<bool> {
    require_subscription(subscriber_id)
        .with_role(role)
        .allows(mirror)
        .await
}

/// Whether the subscriber has the feature with this lookup key (Entitlements).
pub async fn has_feature(mirror: &Mirror, subscriber_id: &str, lookup_key: &str) -> Result<bool> {
    require_subscription(subscriber_id)
        .with_feature(lookup_key)
        .allows(mirror)
        .await
}
