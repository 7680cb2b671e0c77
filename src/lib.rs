//! # stripe-mirror
//!
//! A local SQL mirror of a Stripe account for Rust applications: customers,
//! products, prices and subscriptions kept in your own database (SQLite embedded,
//! or Postgres), so that "is this user subscribed?" is a local query, not an API call.
//! Webhooks keep the mirror true; a backfill fills it; your app reads it.
//!
//! In one screen, with the Stripe objects written by hand instead of arriving by
//! webhook (an in-memory SQLite database, no Stripe account needed):
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
//! ## Getting started
//!
//! From an empty app to its first subscription check, in test mode:
//!
//! 1. **Add the crate**, with the webhook route for axum (SQLite, the default storage,
//!    needs no feature; add `"postgres"` for Postgres, which links libpq):
//!
//!    ```toml
//!    [dependencies]
//!    stripe-mirror = { version = "0.1", features = ["axum"] }
//!    axum = "0.8" # your own routes; the same major version as the crate's
//!    tokio = { version = "1", features = ["full"] }
//!    serde_json = "1" # objects handed in (`sync_from_stripe_data`), test events
//!    tracing-subscriber = "0.3" # to see the crate's warnings: `tracing_subscriber::fmt::init()`
//!    ```
//!
//!    For operators, the `stripe-mirror` command: `cargo install stripe-mirror --features cli`
//!    (`--features cli,postgres` for a Postgres `DATABASE_URL`).
//!
//! 2. **Set the environment** ([below](#environment)): `DATABASE_URL`,
//!    `STRIPE_SECRET_KEY` (a test key, `sk_test_...`), `STRIPE_WEBHOOK_SECRET`
//!    (step 5 prints it) and, for Stripe.js on your pages, `STRIPE_TEST_PUBLISHABLE_KEY`
//!    (`pk_test_...`). `stripe-mirror doctor` checks them all, each with a one-line fix.
//!
//! 3. **Open the mirror.** [`Mirror::from_env`] reads the environment, opens the pool
//!    and applies the embedded migrations; [`Mirror::connect`] does the same from a
//!    [`Config`] built in code. To migrate as a separate deploy step instead, run
//!    `stripe-mirror migrate` (or [`Mirror::migrate`]) there and open with
//!    [`Mirror::open`]. An app with its own diesel pool hands it in with
//!    [`Mirror::from_pool`] and can join its tables with the mirror's ([`schema`]).
//!
//! 4. **Mount the webhook route**, [`axum::webhook_router`] (`POST /stripe/webhook`;
//!    or run [`axum::serve`], or `stripe-mirror serve`). Every event is verified,
//!    stored once and mirrored before your handlers run ([`webhooks`], [`Webhooks::on`]):
//!
//!    ```no_run
//!    # #[cfg(feature = "axum")]
//!    # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//!    use stripe_mirror::{Event, Mirror, Webhooks};
//!
//!    let mirror = Mirror::from_env().await?;
//!    let webhooks = Webhooks::new().on("customer.subscription.*", |event: Event, _: Mirror| async move {
//!        println!("{} {}", event.event_type, event.id); // the mirror already holds the change
//!        Ok(())
//!    });
//!    let app: axum::Router = axum::Router::new()
//!        // .route(...) your own routes
//!        .merge(stripe_mirror::axum::webhook_router(mirror, webhooks));
//!    let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//!    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//!    # Ok(()) }
//!    ```
//!
//! 5. **Forward Stripe's events** to it with the Stripe CLI:
//!    `stripe listen --forward-to localhost:8000/stripe/webhook`, and put the
//!    `whsec_...` it prints in `STRIPE_WEBHOOK_SECRET`. Objects that existed before
//!    are backfilled once with [`sync_all`] (`stripe-mirror sync`); Entitlements
//!    features are not among them: [`ProductFeature::sync_for_product`] fetches them.
//!
//! 6. **Sell**: a pricing page sends the user to Stripe Checkout with [`Checkout`]
//!    (and the account page to the Billing Portal: [`billing_portal`]); see
//!    [`checkout`]. Your user type implements [`Subscriber`], and the
//!    `checkout.session.completed` event links the new customer to it.
//!
//! 7. **Check access**, from the local database (no Stripe call), with
//!    [`require_subscription`]; roles and Entitlements features are in [`access`], and
//!    [`axum::Access`] guards a whole route:
//!
//!    ```no_run
//!    # async fn members_page(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
//!    use stripe_mirror::require_subscription;
//!
//!    let user_id = "user-42"; // your user's id, as in `Subscriber::subscriber_id`
//!    match require_subscription(user_id).to_products(["prod_pro"]).check(&mirror).await? {
//!        Ok(subscription) => println!("welcome ({})", subscription.id),
//!        Err(denial) => println!("no access: {denial}"), // no customer, canceled, past due...
//!    }
//!    # Ok(()) }
//!    ```
//!
//! 8. **Keep your users in step**: [`Webhooks::on_access_change`] tells you when a
//!    user's access changed (granted, revoked, another plan, a role), computed from the
//!    mirror so it is right whatever order Stripe's events came in; set `users.plan`
//!    there (the README's guide "Keeping your users in step").
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
//! - [`access`]: subscription gates, roles and features, from the local database; and
//!   [`access::changes`], telling the host when a user's access changed
//!   ([`Webhooks::on_access_change`]).
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
//! | `STRIPE_SECRET_KEY` | secret key of the current mode (its prefix must say so); before the per-mode ones, after a secret key stored in the database (`stripe-mirror api-keys add`; `api-keys remove` goes back to the environment) | |
//! | `STRIPE_TEST_SECRET_KEY`, `STRIPE_LIVE_SECRET_KEY` | per-mode secret keys | |
//! | `STRIPE_TEST_PUBLISHABLE_KEY`, `STRIPE_LIVE_PUBLISHABLE_KEY` | per-mode publishable keys | |
//! | `STRIPE_WEBHOOK_SECRET` | signing secrets, comma separated | |
//! | `STRIPE_API_BASE` | API base URL (a local fake Stripe) | Stripe's |
//! | `STRIPE_MIRROR_ENCRYPTION_KEY` | 64 hex characters: stored API keys are encrypted with it | off |
//! | `STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS` | older keys, comma separated, still read during a rotation | |
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
// docs.rs (`--cfg docsrs`, nightly) marks feature-gated items; inert on stable.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod access;
#[cfg(feature = "axum")]
pub mod axum;
pub mod checkout;
mod clock;
pub mod config;
pub mod db;
pub mod demo;
pub mod encryption;
pub mod error;
mod mirror;
pub mod models;
mod secret;
pub mod stripe;
pub mod sync;
pub mod webhooks;

pub use access::{
    AccessChange, AccessState, Denial, Gate, access_of, has_feature, has_role, require_subscription,
};
pub use checkout::{
    BillingPortal, Checkout, CheckoutSession, PortalSession, SessionStatus, billing_portal,
    sync_session,
};
pub use clock::Clock;
pub use config::{Config, Mode};
pub use db::{Backend, DbPool, schema};
pub use demo::bootstrap_demo_products;
pub use encryption::EncryptionKey;
pub use error::{Error, Result};
pub use mirror::Mirror;
pub use models::api_key::{ApiKey, ApiKeyKind};
pub use models::customer::{Customer, SUBSCRIBER_METADATA_KEY, Subscriber};
pub use models::entitlement::{EntitlementSummary, ProductFeature};
pub use models::price::{NewPrice, Price, RecurringInterval};
pub use models::product::{NewProduct, Product};
pub use models::subscription::{
    IncompleteSubscription, PauseCollection, Proration, Subscription, SubscriptionItem,
    SubscriptionStatus,
};
pub use secret::Secret;
pub use sync::reconcile::{ReconcileReport, reconcile};
pub use sync::remote::{SyncFailure, SyncOptions, SyncProgress, SyncReport, sync_all};
pub use webhooks::{Event, HandlerError, WebhookRequest, WebhookResponse, Webhooks};

/// diesel, as the crate uses it (for [`mirror_schema!`]).
#[doc(hidden)]
pub use diesel;

/// async-stripe, as the crate uses it ([`Mirror::stripe_client`] hands you its client).
pub use ::stripe as async_stripe;

/// async-stripe's generated object types, for typed access to event payloads
/// ([`Event::object_as`]).
pub use stripe_shared as types;

/// The README's Rust examples, compiled (and the runnable ones run) by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
