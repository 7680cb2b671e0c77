//! Settings: where the database is, which mode (live or test), keys, webhook secrets,
//! and which Stripe API base to talk to.
//!
//! [`Config::from_env`] reads the variables named in the crate docs; every field can
//! also be set in code, so tests and host apps need no environment at all.

use std::time::Duration;

use crate::clock::Clock;
use crate::encryption::EncryptionKey;
use crate::error::{Error, Result};
use crate::secret::Secret;

/// Test or live: which keys and which rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Test mode (`sk_test_...`, `livemode: false`).
    Test,
    /// Live mode (`sk_live_...`, `livemode: true`).
    Live,
}

impl Mode {
    /// The mode of a `livemode` flag.
    pub fn from_livemode(livemode: bool) -> Mode {
        if livemode { Mode::Live } else { Mode::Test }
    }

    /// `test` or `live`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Test => "test",
            Mode::Live => "live",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default database when `DATABASE_URL` is not set: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://stripe-mirror.db";

/// Everything the mirror needs to know, in one place.
///
/// Build it from the environment ([`Config::from_env`]) or in code with the setters,
/// which keep working as settings are added (the struct is `#[non_exhaustive]`):
///
/// ```
/// use std::time::Duration;
/// use stripe_mirror::Config;
/// let config = Config::new("postgres://app@db/app")
///     .live_mode(true)
///     .secret_key("sk_live_51HxExampleKey0000wxyz")
///     .webhook_secret("whsec_...")
///     .pool_size(16)
///     .stripe_timeout(Duration::from_secs(20));
/// assert!(config.live_mode);
/// // Keys are masked wherever they are shown.
/// assert!(!format!("{config:?}").contains("ExampleKey"));
/// ```
///
/// `Debug` masks keys and secrets and hides a database password.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// `sqlite://path`, a bare SQLite path, or `postgres://...`.
    pub database_url: String,
    /// Live mode (`STRIPE_LIVE_MODE`): which keys are used and which rows reads return.
    pub live_mode: bool,
    /// `STRIPE_SECRET_KEY`: overrides the per-mode keys below when it is a key of the
    /// current mode (one of the other mode is never used).
    pub secret_key: Option<Secret>,
    /// `STRIPE_TEST_SECRET_KEY`.
    pub test_secret_key: Option<Secret>,
    /// `STRIPE_LIVE_SECRET_KEY`.
    pub live_secret_key: Option<Secret>,
    /// `STRIPE_TEST_PUBLISHABLE_KEY`.
    pub test_publishable_key: Option<String>,
    /// `STRIPE_LIVE_PUBLISHABLE_KEY`.
    pub live_publishable_key: Option<String>,
    /// `STRIPE_WEBHOOK_SECRET`, comma separated: any of them may sign a delivery (rotation).
    pub webhook_secrets: Vec<Secret>,
    /// `STRIPE_MIRROR_ENCRYPTION_KEY`: when set, API keys stored in the database are
    /// encrypted with it (see [`crate::encryption`]).
    pub encryption_key: Option<EncryptionKey>,
    /// `STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS`, comma separated: keys that still open
    /// stored API keys during a rotation; [`crate::Mirror::connect`] re-seals those
    /// rows with `encryption_key`.
    pub previous_encryption_keys: Vec<EncryptionKey>,
    /// `STRIPE_API_BASE`: e.g. `http://127.0.0.1:8420/` for a local fake Stripe.
    pub api_base: Option<String>,
    /// Largest number of pooled database connections.
    pub pool_size: u32,
    /// How long to wait for a pooled connection before answering "unavailable".
    pub connection_timeout: Duration,
    /// Timeout of one Stripe API attempt.
    pub stripe_timeout: Duration,
    /// Retries of a Stripe request that failed with 409, 429, 5xx or a network error.
    pub stripe_retries: u32,
    /// First wait before a retry; it doubles each time.
    pub stripe_retry_backoff: Duration,
    /// Largest accepted gap between a delivery's signed timestamp and now (0 disables
    /// the check; default 5 minutes, Stripe's own).
    pub webhook_tolerance: Duration,
    /// Largest webhook body accepted and stored, in bytes (larger: 413).
    pub webhook_body_limit: usize,
    /// How long the HTTP integration waits for a whole body (slower: 408, logged as
    /// `Outcome::Timeout`); a framework of your own sets `WebhookRequest::timed_out`.
    pub webhook_read_timeout: Duration,
    /// How long a worker's claim on an event lasts (default 5 minutes, on the
    /// database's clock). A worker that dies holding a claim delays the event's
    /// redelivery by at most this much; all handlers of an event must end within it
    /// (less a tenth, at most 10 s, to record them), so a handler never runs while
    /// another worker may have taken the event over. Taken as 1 s to 30 days.
    pub webhook_claim_lease: Duration,
    /// How long one handler may run (default 60 s, never past the claim lease): past
    /// it the handler is dropped and the event fails with a 500, so Stripe retries it.
    pub webhook_handler_timeout: Duration,
    /// How long a Postgres write waits for a row or table lock before its deliveries
    /// are rolled back and tried again (up to 4 tries in all, then answered 503 so Stripe
    /// redelivers). Default 250 ms: two app instances' writes locking a customer's rows
    /// in opposite orders deadlock, which Postgres breaks only after its
    /// `deadlock_timeout` (1 s), both stalled meanwhile. Longer if your migrations take
    /// table locks for a while during deploys and you prefer waiting to retrying; zero
    /// waits as long as Postgres lets it; taken in whole milliseconds, 1 ms to about
    /// 24 days. SQLite ignores it (its writers queue on `busy_timeout`).
    pub postgres_lock_wait: Duration,
    /// The host's clock (the system's unless a test injects one): used for signature
    /// tolerance and data the host hands in, never to judge Stripe data. Claim leases
    /// run on the database's clock.
    pub clock: Clock,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &crate::db::redact_url(&self.database_url))
            .field("live_mode", &self.live_mode)
            .field("secret_key", &self.secret_key)
            .field("test_secret_key", &self.test_secret_key)
            .field("live_secret_key", &self.live_secret_key)
            // Masked too: a secret key pasted into the wrong variable must not show.
            .field(
                "test_publishable_key",
                &self
                    .test_publishable_key
                    .as_deref()
                    .map(crate::secret::mask),
            )
            .field(
                "live_publishable_key",
                &self
                    .live_publishable_key
                    .as_deref()
                    .map(crate::secret::mask),
            )
            .field("webhook_secrets", &self.webhook_secrets)
            .field("encryption_key", &self.encryption_key)
            .field("previous_encryption_keys", &self.previous_encryption_keys)
            .field("api_base", &self.api_base)
            .field("pool_size", &self.pool_size)
            .field("connection_timeout", &self.connection_timeout)
            .field("stripe_timeout", &self.stripe_timeout)
            .field("stripe_retries", &self.stripe_retries)
            .field("stripe_retry_backoff", &self.stripe_retry_backoff)
            .field("webhook_tolerance", &self.webhook_tolerance)
            .field("webhook_body_limit", &self.webhook_body_limit)
            .field("webhook_read_timeout", &self.webhook_read_timeout)
            .field("webhook_claim_lease", &self.webhook_claim_lease)
            .field("postgres_lock_wait", &self.postgres_lock_wait)
            .field("webhook_handler_timeout", &self.webhook_handler_timeout)
            .field("clock", &self.clock)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            live_mode: false,
            secret_key: None,
            test_secret_key: None,
            live_secret_key: None,
            test_publishable_key: None,
            live_publishable_key: None,
            webhook_secrets: Vec::new(),
            encryption_key: None,
            previous_encryption_keys: Vec::new(),
            api_base: None,
            pool_size: 8,
            connection_timeout: Duration::from_secs(5),
            stripe_timeout: Duration::from_secs(30),
            stripe_retries: 4,
            stripe_retry_backoff: Duration::from_millis(500),
            webhook_tolerance: Duration::from_secs(
                crate::webhooks::signature::DEFAULT_TOLERANCE_SECS as u64,
            ),
            webhook_body_limit: crate::webhooks::DEFAULT_BODY_LIMIT,
            webhook_read_timeout: crate::webhooks::DEFAULT_READ_TIMEOUT,
            webhook_claim_lease: crate::webhooks::DEFAULT_LEASE,
            webhook_handler_timeout: crate::webhooks::DEFAULT_HANDLER_TIMEOUT,
            postgres_lock_wait: crate::db::DEFAULT_LOCK_WAIT,
            clock: Clock::system(),
        }
    }
}

impl Config {
    /// A configuration for the given database, everything else default.
    pub fn new(database_url: impl Into<String>) -> Self {
        Config {
            database_url: database_url.into(),
            ..Config::default()
        }
    }

    /// Another database, the rest kept (e.g. all else from the environment):
    ///
    /// ```
    /// let config = stripe_mirror::Config::from_env()?.database_url("sqlite://app.db");
    /// assert_eq!(config.database_url, "sqlite://app.db");
    /// # Ok::<_, stripe_mirror::Error>(())
    /// ```
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = url.into();
        self
    }

    /// Live mode: live keys and live rows ([`Config::live_mode`]).
    pub fn live_mode(mut self, live: bool) -> Self {
        self.live_mode = live;
        self
    }

    /// The secret key (`sk_test_`, `sk_live_`, or a restricted `rk_` key): before the
    /// per-mode keys, after a secret key stored in the database
    /// ([`ApiKey::default_secret_key`](crate::ApiKey::default_secret_key)). Used only
    /// when its prefix names the mirror's mode ([`Config::live_mode`], which a key does
    /// not set): a key of the other mode is left unused, with a warning when the mirror
    /// opens.
    pub fn secret_key(mut self, key: impl Into<String>) -> Self {
        self.secret_key = Some(Secret::new(key.into()));
        self
    }

    /// The test-mode secret key.
    pub fn test_secret_key(mut self, key: impl Into<String>) -> Self {
        self.test_secret_key = Some(Secret::new(key.into()));
        self
    }

    /// The live-mode secret key.
    pub fn live_secret_key(mut self, key: impl Into<String>) -> Self {
        self.live_secret_key = Some(Secret::new(key.into()));
        self
    }

    /// The test-mode publishable key.
    pub fn test_publishable_key(mut self, key: impl Into<String>) -> Self {
        self.test_publishable_key = Some(key.into());
        self
    }

    /// The live-mode publishable key.
    pub fn live_publishable_key(mut self, key: impl Into<String>) -> Self {
        self.live_publishable_key = Some(key.into());
        self
    }

    /// Adds a webhook signing secret (several may be active during a rotation).
    pub fn webhook_secret(mut self, secret: impl Into<String>) -> Self {
        self.webhook_secrets.push(Secret::new(secret.into()));
        self
    }

    /// The Stripe API base URL (a local fake Stripe).
    pub fn api_base(mut self, url: impl Into<String>) -> Self {
        self.api_base = Some(url.into());
        self
    }

    /// The largest number of pooled database connections.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// How long to wait for a pooled connection.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The timeout of one Stripe API attempt.
    pub fn stripe_timeout(mut self, timeout: Duration) -> Self {
        self.stripe_timeout = timeout;
        self
    }

    /// How often a failed Stripe request is retried, and the first wait (doubling).
    pub fn stripe_retries(mut self, retries: u32, first_backoff: Duration) -> Self {
        self.stripe_retries = retries;
        self.stripe_retry_backoff = first_backoff;
        self
    }

    /// [`Config::webhook_tolerance`].
    pub fn webhook_tolerance(mut self, tolerance: Duration) -> Self {
        self.webhook_tolerance = tolerance;
        self
    }

    /// [`Config::webhook_body_limit`].
    pub fn webhook_body_limit(mut self, bytes: usize) -> Self {
        self.webhook_body_limit = bytes;
        self
    }

    /// [`Config::webhook_read_timeout`].
    pub fn webhook_read_timeout(mut self, timeout: Duration) -> Self {
        self.webhook_read_timeout = timeout;
        self
    }

    /// [`Config::postgres_lock_wait`].
    pub fn postgres_lock_wait(mut self, wait: Duration) -> Self {
        self.postgres_lock_wait = wait;
        self
    }

    /// [`Config::webhook_claim_lease`] (at least 1 s).
    pub fn webhook_claim_lease(mut self, lease: Duration) -> Self {
        self.webhook_claim_lease = lease.max(Duration::from_secs(1));
        self
    }

    /// [`Config::webhook_handler_timeout`].
    pub fn webhook_handler_timeout(mut self, timeout: Duration) -> Self {
        self.webhook_handler_timeout = timeout;
        self
    }

    /// The host's clock ([`Clock`]; tests skew it).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Reads the environment (see the crate docs for the variable names).
    ///
    /// ```
    /// # unsafe { std::env::remove_var("DATABASE_URL") };
    /// let config = stripe_mirror::Config::from_env().unwrap();
    /// assert_eq!(config.database_url, "sqlite://stripe-mirror.db");
    /// ```
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`], reading variables through `get` (handy in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let named = |name: &str, e: Error| match e {
            Error::Config(m) => Error::Config(format!("{name}: {m}")),
            other => other,
        };
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let secret = |name: &str| get(name).map(|v| Secret::new(v.trim()));
        // A `.env` written on Windows ends each value with `\r`.
        let text = |name: &str| get(name).map(|v| v.trim().to_owned());
        let live_mode = match get("STRIPE_LIVE_MODE").as_deref().map(str::trim) {
            None => false,
            Some(v) if ["1", "true", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()) => {
                true
            }
            Some(v) if ["0", "false", "no", "off"].contains(&v.to_ascii_lowercase().as_str()) => {
                false
            }
            Some(v) => {
                return Err(Error::Config(format!(
                    "STRIPE_LIVE_MODE={v:?} is not a boolean; use true or false"
                )));
            }
        };
        Ok(Config {
            database_url: text("DATABASE_URL").unwrap_or_else(|| {
                tracing::info!(
                    "DATABASE_URL is not set: using the embedded default {DEFAULT_DATABASE_URL}"
                );
                DEFAULT_DATABASE_URL.to_owned()
            }),
            live_mode,
            secret_key: secret("STRIPE_SECRET_KEY"),
            test_secret_key: secret("STRIPE_TEST_SECRET_KEY"),
            live_secret_key: secret("STRIPE_LIVE_SECRET_KEY"),
            test_publishable_key: text("STRIPE_TEST_PUBLISHABLE_KEY"),
            live_publishable_key: text("STRIPE_LIVE_PUBLISHABLE_KEY"),
            webhook_secrets: get("STRIPE_WEBHOOK_SECRET")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(Secret::new)
                        .collect()
                })
                .unwrap_or_default(),
            encryption_key: get("STRIPE_MIRROR_ENCRYPTION_KEY")
                .map(|v| {
                    EncryptionKey::from_hex(&v)
                        .map_err(|e| named("STRIPE_MIRROR_ENCRYPTION_KEY", e))
                })
                .transpose()?,
            previous_encryption_keys: get("STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|k| {
                            EncryptionKey::from_hex(k)
                                .map_err(|e| named("STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS", e))
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .transpose()?
                .unwrap_or_default(),
            api_base: text("STRIPE_API_BASE"),
            ..Config::default()
        })
    }

    /// Every key that may open a stored API key: the current one first.
    pub fn encryption_keys(&self) -> Vec<EncryptionKey> {
        self.encryption_key
            .iter()
            .chain(&self.previous_encryption_keys)
            .cloned()
            .collect()
    }

    /// The database URL with its passwords masked (`postgres://app:***@db/app`, and a
    /// `password=` parameter), for logs and messages.
    pub fn database_url_redacted(&self) -> String {
        crate::db::redact_url(&self.database_url)
    }

    /// The secret key from the environment for the current mode, if any:
    /// `STRIPE_SECRET_KEY` first, then the per-mode variable. A key of the other mode
    /// (or not a secret or restricted key) is skipped: it would act on the other
    /// mode's data while the mirror stores and reads this one's.
    pub fn env_secret_key(&self) -> Option<&Secret> {
        self.env_secret_keys()
            .find(|(_, key)| self.key_problem(key.expose()).is_none())
            .map(|(_, key)| key)
    }

    /// Why no environment secret key serves the current mode, when one is set but
    /// none does: names the variable and the key, masked.
    pub(crate) fn env_secret_key_refused(&self) -> Option<String> {
        if self.env_secret_key().is_some() {
            return None;
        }
        let (name, key) = self.env_secret_keys().next()?;
        let problem = self.key_problem(key.expose())?;
        Some(format!("{name} holds {} {problem}", key.masked()))
    }

    /// The environment's secret keys for the current mode, with their variables.
    fn env_secret_keys(&self) -> impl Iterator<Item = (&'static str, &Secret)> {
        // Set from the environment or by `Config`'s setters: named both ways.
        let per_mode = if self.live_mode {
            (
                "STRIPE_LIVE_SECRET_KEY (Config::live_secret_key)",
                self.live_secret_key.as_ref(),
            )
        } else {
            (
                "STRIPE_TEST_SECRET_KEY (Config::test_secret_key)",
                self.test_secret_key.as_ref(),
            )
        };
        let secret_key = (
            "STRIPE_SECRET_KEY (Config::secret_key)",
            self.secret_key.as_ref(),
        );
        [secret_key, per_mode]
            .into_iter()
            .filter_map(|(name, key)| Some((name, key?)))
    }

    /// Why `key` cannot be this mode's secret key, if it cannot.
    fn key_problem(&self, key: &str) -> Option<String> {
        use crate::models::api_key::{ApiKeyKind, parse_key};
        let mode = |live| if live { "live" } else { "test" };
        match parse_key(key) {
            Err(_) => Some("which is not a Stripe API key".to_owned()),
            Ok((ApiKeyKind::Publishable, _)) => Some(
                "a publishable key, where a secret (sk_) or restricted (rk_) key goes".to_owned(),
            ),
            Ok((_, live)) if live != self.live_mode => Some(format!(
                "a {} key while the mirror is in {} mode: set STRIPE_LIVE_MODE={} \
                 (Config::live_mode) to use it, or give a {} key",
                mode(live),
                mode(self.live_mode),
                live,
                mode(self.live_mode)
            )),
            Ok(_) => None,
        }
    }

    /// The publishable key for the current mode from the environment, if it is one;
    /// anything else (a secret key pasted into the wrong variable, the other mode's)
    /// is refused, naming the variable, so it is never sent to a browser.
    pub(crate) fn env_publishable_key(&self) -> crate::Result<Option<&str>> {
        use crate::models::api_key::{ApiKeyKind, parse_key};
        let (name, key) = if self.live_mode {
            ("STRIPE_LIVE_PUBLISHABLE_KEY", &self.live_publishable_key)
        } else {
            ("STRIPE_TEST_PUBLISHABLE_KEY", &self.test_publishable_key)
        };
        let Some(key) = key.as_deref() else {
            return Ok(None);
        };
        match parse_key(key) {
            Ok((ApiKeyKind::Publishable, live)) if live == self.live_mode => Ok(Some(key)),
            _ => Err(crate::Error::Config(format!(
                "{name} holds {}, which is not a {} publishable key (pk_{}_...)",
                crate::secret::mask(key),
                if self.live_mode { "live" } else { "test" },
                if self.live_mode { "live" } else { "test" }
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            owned
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    /// A `.env` written on Windows ends each value with `\r`: the publishable key a
    /// page gets, the database URL and the API base are read without it.
    #[test]
    fn values_are_read_without_the_line_ends_of_a_windows_env_file() {
        let c = Config::from_lookup(lookup(&[
            ("STRIPE_TEST_PUBLISHABLE_KEY", "pk_test_fromwindows0000\r\n"),
            ("STRIPE_LIVE_PUBLISHABLE_KEY", " pk_live_fromwindows0000\r"),
            ("DATABASE_URL", "sqlite://app.db\r"),
            ("STRIPE_API_BASE", "http://127.0.0.1:8420/\r"),
        ]))
        .unwrap();
        assert_eq!(
            c.test_publishable_key.as_deref(),
            Some("pk_test_fromwindows0000")
        );
        assert_eq!(
            c.live_publishable_key.as_deref(),
            Some("pk_live_fromwindows0000")
        );
        assert_eq!(c.database_url, "sqlite://app.db");
        assert_eq!(c.api_base.as_deref(), Some("http://127.0.0.1:8420/"));
    }

    #[test]
    fn an_environment_key_of_the_other_mode_is_never_used() {
        // A live key while the mirror is in test mode: skipped, and the refusal names it.
        let c = Config::from_lookup(lookup(&[(
            "STRIPE_SECRET_KEY",
            "sk_live_realmoney0000abcd",
        )]))
        .unwrap();
        assert!(c.env_secret_key().is_none());
        let why = c.env_secret_key_refused().unwrap();
        assert!(
            why.contains("STRIPE_SECRET_KEY")
                && why.contains("sk_live_...abcd")
                && why.contains("STRIPE_LIVE_MODE=true"),
            "{why}"
        );
        assert!(!why.contains("realmoney"), "{why}");
        // The per-mode key that matches serves, even behind a mismatched override.
        let c = Config::from_lookup(lookup(&[
            ("STRIPE_SECRET_KEY", "sk_test_leftover00001111"),
            ("STRIPE_LIVE_SECRET_KEY", "sk_live_production0002222"),
            ("STRIPE_LIVE_MODE", "true"),
        ]))
        .unwrap();
        assert_eq!(
            c.env_secret_key().unwrap().expose(),
            "sk_live_production0002222"
        );
        // A publishable key where the secret goes.
        let c = Config::from_lookup(lookup(&[("STRIPE_SECRET_KEY", "pk_test_public00003333")]))
            .unwrap();
        assert!(c.env_secret_key_refused().unwrap().contains("publishable"));
        // A secret key in the publishable variable: refused, and masked in Debug.
        let c = Config::from_lookup(lookup(&[(
            "STRIPE_TEST_PUBLISHABLE_KEY",
            "sk_test_swappedsecret0004444",
        )]))
        .unwrap();
        let err = c.env_publishable_key().unwrap_err().to_string();
        assert!(err.contains("STRIPE_TEST_PUBLISHABLE_KEY"), "{err}");
        assert!(!err.contains("swappedsecret") && !format!("{c:?}").contains("swappedsecret"));
        let c = Config::from_lookup(lookup(&[(
            "STRIPE_TEST_PUBLISHABLE_KEY",
            "pk_test_fine0005555",
        )]))
        .unwrap();
        assert_eq!(
            c.env_publishable_key().unwrap(),
            Some("pk_test_fine0005555")
        );
    }

    #[test]
    fn defaults_without_environment() {
        let c = Config::from_lookup(lookup(&[])).unwrap();
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert!(!c.live_mode);
        assert!(c.env_secret_key().is_none());
    }

    #[test]
    fn secret_key_precedence_and_rotation_list() {
        let c = Config::from_lookup(lookup(&[
            ("STRIPE_TEST_SECRET_KEY", "sk_test_aaaaaaaaaaaa1111"),
            ("STRIPE_LIVE_SECRET_KEY", "sk_live_bbbbbbbbbbbb2222"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_one, whsec_two,"),
            ("STRIPE_LIVE_MODE", "true"),
        ]))
        .unwrap();
        assert_eq!(
            c.env_secret_key().unwrap().expose(),
            "sk_live_bbbbbbbbbbbb2222"
        );
        assert_eq!(c.webhook_secrets.len(), 2);
        let c = Config::from_lookup(lookup(&[
            ("STRIPE_TEST_SECRET_KEY", "sk_test_aaaaaaaaaaaa1111"),
            ("STRIPE_SECRET_KEY", "sk_test_override00003333"),
        ]))
        .unwrap();
        assert_eq!(
            c.env_secret_key().unwrap().expose(),
            "sk_test_override00003333"
        );
        // Debug output of the config never holds a key or a database password.
        assert!(!format!("{c:?}").contains("override0000"));
        let c = Config::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://app:hunter2@db:5432/app"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_abcdefghijklmnop"),
        ]))
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("abcdefghijkl"),
            "{shown}"
        );
    }

    #[test]
    fn bad_live_mode_is_a_clear_error() {
        let err = Config::from_lookup(lookup(&[("STRIPE_LIVE_MODE", "maybe")])).unwrap_err();
        assert!(err.to_string().contains("STRIPE_LIVE_MODE"), "{err}");
    }
}
