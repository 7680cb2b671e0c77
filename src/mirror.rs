//! The entry point: a [`Mirror`] holds the configuration and the database pool.
//! Everything else (models, sync, webhooks) takes a `&Mirror`.

use std::sync::Arc;

use crate::config::Config;
use crate::db::{Backend, Database};
use crate::error::Result;
use crate::models::api_key::ApiKey;
use crate::stripe::StripeClient;

/// A handle on the local mirror of a Stripe account. Cheap to clone and share.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use stripe_mirror::{Config, Mirror};
/// let mirror = Mirror::connect(Config::new("sqlite::memory:")).await?;
/// assert!(!mirror.live_mode());
/// # Ok::<_, stripe_mirror::Error>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    db: Database,
    /// The client for the current key, rebuilt when the key changes.
    stripe: std::sync::Mutex<Option<(String, StripeClient)>>,
    /// Serialises `Customer::get_or_create` per subscriber within this process.
    pub(crate) creating: crate::sync::KeyedLocks,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("backend", &self.backend())
            .field("live_mode", &self.live_mode())
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// Opens the database named in `config` and applies pending migrations. With an
    /// [`encryption_key`](Config::encryption_key) set, it also seals the stored API
    /// keys not yet sealed with it ([`ApiKey::encrypt_stored`](crate::ApiKey::encrypt_stored)).
    pub async fn connect(config: Config) -> Result<Mirror> {
        let mirror = Self::open(config).await?;
        mirror.migrate().await?;
        if mirror.config().encryption_key.is_some() {
            // Plaintext keys, or keys sealed with a previous key, sealed with the
            // current one (a few rows; see `crate::encryption`).
            crate::ApiKey::encrypt_stored(&mirror).await?;
        }
        Ok(mirror)
    }

    /// [`Mirror::connect`] with [`Config::from_env`].
    pub async fn from_env() -> Result<Mirror> {
        Self::connect(Config::from_env()?).await
    }

    /// Opens the database without migrating (when migrations run as a separate step).
    pub async fn open(config: Config) -> Result<Mirror> {
        let (url, size, timeout) = (
            config.database_url.clone(),
            config.pool_size,
            config.connection_timeout,
        );
        let db = tokio::task::spawn_blocking(move || Database::open(&url, size, timeout))
            .await
            .map_err(|source| crate::Error::Task { source })??
            .with_lock_wait(config.postgres_lock_wait);
        Ok(Self::new(config, db))
    }

    fn new(config: Config, db: Database) -> Mirror {
        // A key of the other mode is never used (it would act on the other mode's data
        // while the mirror reads this one's): said once here, not first at the first
        // Stripe call, nor by a gate that finds no live customer in a test-mode mirror.
        if let Some(why) = config.env_secret_key_refused() {
            tracing::warn!("{why}; it is not used");
        }
        // Step 1 of a key roll-out, or a key put in the wrong variable: rows sealed with
        // a previous key still open, but nothing is sealed with one.
        if config.encryption_key.is_none() && !config.previous_encryption_keys.is_empty() {
            tracing::warn!(
                "STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS is set without STRIPE_MIRROR_ENCRYPTION_KEY: \
                 stored API keys it seals still open, but keys added now are stored unencrypted; \
                 set STRIPE_MIRROR_ENCRYPTION_KEY to encrypt them"
            );
        }
        Mirror {
            inner: Arc::new(Inner {
                config,
                db,
                stripe: Default::default(),
                creating: Default::default(),
            }),
        }
    }

    /// A mirror on a connection pool the host app already has (diesel r2d2, SQLite or
    /// Postgres), so the app and the mirror share connections and the app can join its
    /// tables with the mirror's ([`schema`](crate::schema)). `config.database_url` is not
    /// used; run [`Mirror::migrate`] (or your own migration step) before use.
    ///
    /// A diesel-async app keeps its async pool for itself and gives the mirror a small
    /// r2d2 pool on the same database: the mirror runs its queries on a blocking pool.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use diesel::r2d2::{ConnectionManager, Pool};
    /// use diesel::SqliteConnection;
    /// use stripe_mirror::{Config, Mirror};
    /// let path = std::env::temp_dir().join(format!("app-{}.db", std::process::id()));
    /// let app_pool = Pool::builder()
    ///     .connection_customizer(Box::new(stripe_mirror::db::SqlitePragmas))
    ///     .build(ConnectionManager::<SqliteConnection>::new(path.to_str().unwrap()))
    ///     .unwrap();
    /// let mirror = Mirror::from_pool(app_pool.clone().into(), Config::default());
    /// mirror.migrate().await?;
    /// # drop((mirror, app_pool));
    /// # for end in ["", "-wal", "-shm"] {
    /// #     std::fs::remove_file(format!("{}{end}", path.display())).ok();
    /// # }
    /// # Ok::<_, stripe_mirror::Error>(()) }).unwrap();
    /// ```
    pub fn from_pool(pool: crate::DbPool, config: Config) -> Mirror {
        let db = Database::from_pool(pool).with_lock_wait(config.postgres_lock_wait);
        Self::new(config, db)
    }

    /// The connection pool the mirror uses, for the app's own queries.
    pub fn pool(&self) -> &crate::DbPool {
        self.inner.db.pool()
    }

    /// Applies the embedded migrations for this backend. Idempotent; several
    /// processes may call it at once.
    pub async fn migrate(&self) -> Result<()> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || db.migrate())
            .await
            .map_err(|source| crate::Error::Task { source })?
    }

    /// The configuration this mirror was opened with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Live mode: reads and keys are for live data.
    pub fn live_mode(&self) -> bool {
        self.inner.config.live_mode
    }

    /// Unix seconds now on the host's clock ([`Config::clock`]).
    pub fn now(&self) -> i64 {
        self.inner.config.clock.now()
    }

    /// Test or live ([`Config::live_mode`]).
    pub fn mode(&self) -> crate::config::Mode {
        crate::config::Mode::from_livemode(self.live_mode())
    }

    /// SQLite or Postgres.
    pub fn backend(&self) -> Backend {
        self.inner.db.backend()
    }

    /// A Stripe client with the current mode's secret key ([`ApiKey::default_secret_key`])
    /// at the configured API base.
    pub async fn stripe(&self) -> Result<StripeClient> {
        let key = ApiKey::default_secret_key(self).await?;
        // The cache holds no invariant a panic could break: a poisoned lock is used as is.
        let cache = &self.inner.stripe;
        let lock = || {
            cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((k, client)) = lock().as_ref()
            && k == key.expose()
        {
            return Ok(client.clone());
        }
        // Built outside the lock.
        let c = &self.inner.config;
        let client = StripeClient::new(&key, c.api_base.as_deref(), c.stripe_timeout)?
            .with_retries(c.stripe_retries, c.stripe_retry_backoff)
            .with_clock(c.clock.clone());
        *lock() = Some((key.expose().to_owned(), client.clone()));
        Ok(client)
    }

    /// async-stripe's own client, configured like the mirror's (the current mode's key,
    /// `STRIPE_API_BASE`, the timeout), for your typed calls with async-stripe's request
    /// builders; re-exported as [`async_stripe`](crate::async_stripe) so the versions match.
    ///
    /// ```no_run
    /// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
    /// let client: stripe_mirror::async_stripe::Client = mirror.stripe_client().await?;
    /// // e.g. with async-stripe-core: RetrieveCustomer::new("cus_123").send(&client).await
    /// # let _ = client; Ok(()) }
    /// ```
    pub async fn stripe_client(&self) -> Result<stripe::Client> {
        let key = ApiKey::default_secret_key(self).await?;
        let c = &self.inner.config;
        let mut builder = stripe::ClientBuilder::new(key.expose()).timeout(c.stripe_timeout);
        if let Some(base) = &c.api_base {
            builder = builder.url(base.as_str());
        }
        builder
            .build()
            .map_err(|e| crate::Error::Config(format!("async-stripe client for key {key}: {e}")))
    }

    /// The publishable key for the current mode, for Stripe.js on your pages: a stored
    /// key first, then `STRIPE_TEST_PUBLISHABLE_KEY` / `STRIPE_LIVE_PUBLISHABLE_KEY`,
    /// so `STRIPE_LIVE_MODE` alone moves an app between test and live.
    pub async fn publishable_key(&self) -> Result<Option<String>> {
        ApiKey::default_publishable_key(self).await
    }

    pub(crate) fn creating(&self) -> &crate::sync::KeyedLocks {
        &self.inner.creating
    }

    pub(crate) fn db(&self) -> &Database {
        &self.inner.db
    }
}
