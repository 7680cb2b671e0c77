//! # stripe-mirror
//!
//! A local SQL mirror of a Stripe account for Rust applications: customers,
//! products, prices and subscriptions kept in your own database (SQLite embedded,
//! or Postgres), so that "is this user subscribed?" is a local query, not an API call.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use stripe_mirror::{Config, Customer, Mirror, Subscription};
//! use serde_json::json;
//!
//! let mirror = Mirror::connect(Config::new("sqlite::memory:")).await?;
//! Customer::sync_from_stripe_data(&mirror, &json!({
//!     "id": "cus_1", "object": "customer", "livemode": false, "email": "ada@example.com",
//!     "metadata": { "stripe_mirror_subscriber": "user-42" },
//! })).await?;
//! Subscription::sync_from_stripe_data(&mirror, &json!({
//!     "id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
//!     "items": { "data": [{ "id": "si_1", "object": "subscription_item",
//!         "price": { "id": "price_1", "product": "prod_pro" },
//!         "current_period_end": 4102444800_i64 }] },
//! })).await?;
//!
//! let customer = Customer::by_subscriber(&mirror, "user-42").await?.unwrap();
//! let subscription = customer.subscription(&mirror).await?.unwrap();
//! assert!(subscription.is_valid());
//! assert!(customer.is_subscribed_to(&mirror, &["prod_pro"]).await?);
//! # Ok::<_, stripe_mirror::Error>(()) }).unwrap();
//! ```
//!
//! ## Layout
//!
//! - [`config`]: settings, from code or the environment; [`Clock`], the host's clock.
//! - [`Mirror`]: the entry point, holding the config and the database pool.
//! - [`db`]: the pool over SQLite or Postgres (yours or the crate's), the embedded
//!   migrations, and [`schema`]: the diesel tables, to join with your own.
//! - [`models`]: one file per mirrored object, with its reads.
//! - `sync`: the one JSON-to-row mapping, stale-write guard and upsert all models share.
//! - [`stripe`]: talking to the Stripe API.
//! - [`webhooks`]: the handler registry and the webhook pipeline.
//! - [`access`]: subscription gates, roles and features, from the local database.
//! - [`checkout`]: Checkout and Billing Portal sessions for a subscriber.
//! - [`demo`]: the demo catalogue (Basic, Starter, Pro) for test mode.
//! - [`error`]: the one [`Error`] enum.
//!
//! ## Environment
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DATABASE_URL` | `sqlite://path`, a path, or `postgres://...` | `sqlite://stripe-mirror.db` |
//! | `STRIPE_LIVE_MODE` | use live keys and rows | `false` |
//! | `STRIPE_SECRET_KEY` | secret key, overrides the per-mode ones | |
//! | `STRIPE_TEST_SECRET_KEY`, `STRIPE_LIVE_SECRET_KEY` | per-mode secret keys | |
//! | `STRIPE_TEST_PUBLISHABLE_KEY`, `STRIPE_LIVE_PUBLISHABLE_KEY` | per-mode publishable keys | |
//! | `STRIPE_WEBHOOK_SECRET` | signing secrets, comma separated | |
//! | `STRIPE_API_BASE` | API base URL (a local fake Stripe) | Stripe's |
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `sqlite` (default) | SQLite storage, bundled libsqlite3 |
//! | `postgres` | Postgres storage (libpq) |
//! | `axum` | [`axum::webhook_router`] (`POST /stripe/webhook`) and the [`axum::Access`] route gate |
//! | `cli` | the `stripe-mirror` command: migrate, sync, bootstrap-demo-products, process-events, reconcile, prune, api-keys, doctor, serve |
//!
//! ## Postgres and the raw object
//!
//! `data` holds the raw Stripe JSON as text on both backends, so one schema serves
//! both. On Postgres, query it with a cast: `SELECT data::jsonb -> 'metadata' FROM stripe_customers`.
#![warn(missing_docs)]

pub mod access;
#[cfg(feature = "axum")]
pub mod axum;
pub mod checkout;
mod clock;
pub mod config;
pub mod db;
pub mod demo;
pub mod error;
mod mirror;
pub mod models;
mod secret;
pub mod stripe;
pub mod sync;
pub mod webhooks;

pub use access::{Denial, Gate, has_feature, has_role, require_subscription};
pub use checkout::{Checkout, CheckoutSession, PortalSession, billing_portal, sync_session};
pub use clock::Clock;
pub use config::Config;
pub use db::{Backend, DbPool, schema};
pub use demo::bootstrap_demo_products;
pub use error::{Error, Result};
pub use mirror::Mirror;
pub use models::api_key::{ApiKey, ApiKeyKind};
pub use models::customer::{Customer, SUBSCRIBER_METADATA_KEY, Subscriber};
pub use models::entitlement::{EntitlementSummary, ProductFeature};
pub use models::price::Price;
pub use models::product::Product;
pub use models::subscription::{IncompleteSubscription, Subscription, SubscriptionItem};
pub use secret::Secret;
pub use sync::reconcile::{ReconcileReport, reconcile};
pub use sync::remote::{SyncOptions, SyncProgress, SyncReport, sync_all};
pub use webhooks::{Event, WebhookRequest, WebhookResponse, Webhooks};

/// diesel, as the crate uses it (for [`mirror_schema!`]).
#[doc(hidden)]
pub use diesel;

/// async-stripe's generated object types, for typed access to event payloads
/// ([`Event::object_as`]).
pub use stripe_shared as types;
