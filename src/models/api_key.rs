//! ApiKey: Stripe keys stored in the database, so a host app can rotate keys
//! without a redeploy. The kind and mode come from the key's prefix.

use std::fmt;

use diesel::prelude::*;
use sha2::{Digest, Sha256};

use crate::Mirror;
use crate::db::on_conn;
use crate::db::schema::stripe_api_keys;
use crate::encryption::{self, EncryptionKey};
use crate::error::{Error, Result};
use crate::secret::{Secret, mask};

/// What a key may do, from its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiKeyKind {
    /// `pk_`: safe to give to browsers (Stripe.js).
    Publishable,
    /// `sk_`: full API access.
    Secret,
    /// `rk_`: API access limited to what the key was granted.
    Restricted,
}

impl ApiKeyKind {
    /// The name stored in the `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKeyKind::Publishable => "publishable",
            ApiKeyKind::Secret => "secret",
            ApiKeyKind::Restricted => "restricted",
        }
    }

    fn from_column(s: &str) -> Self {
        match s {
            "publishable" => ApiKeyKind::Publishable,
            "restricted" => ApiKeyKind::Restricted,
            _ => ApiKeyKind::Secret,
        }
    }
}

/// A Stripe API key kept in `stripe_api_keys`.
///
/// `Debug` and `Display` show the key masked (`sk_test_...abcd`).
#[derive(Clone)]
pub struct ApiKey {
    /// Stable id derived from the key (`key_` and a hash prefix), safe to show.
    pub id: String,
    /// Publishable, secret or restricted.
    pub kind: ApiKeyKind,
    /// Live or test mode.
    pub livemode: bool,
    /// An optional label.
    pub name: Option<String>,
    /// Unix time it was added.
    pub created_at: i64,
    secret: Secret,
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = stripe_api_keys)]
struct ApiKeyRow {
    id: String,
    kind: String,
    livemode: bool,
    secret: String,
    name: Option<String>,
    created_at: i64,
}

/// What a sealed key is bound to: its row id, kind and mode.
fn seal_context(id: &str, kind: &str, livemode: bool) -> String {
    format!("{id}|{kind}|{livemode}")
}

impl ApiKeyRow {
    /// The key, opened with `keys` when it is stored encrypted, and checked against
    /// its row: the id is derived from the key, the kind and mode from its prefix.
    fn open(self, keys: &[EncryptionKey]) -> Result<ApiKey> {
        let context = seal_context(&self.id, &self.kind, self.livemode);
        let secret = encryption::open(keys, &self.id, &context, &self.secret)?;
        let matches = key_id(&secret) == self.id
            && parse_key(&secret)
                .is_ok_and(|(kind, live)| kind.as_str() == self.kind && live == self.livemode);
        if !matches {
            return Err(Error::Decrypt {
                id: self.id,
                problem: "the stored key does not match its row (id, kind or mode changed in the database); remove the row and add the key again".into(),
            });
        }
        Ok(ApiKey {
            id: self.id,
            kind: ApiKeyKind::from_column(&self.kind),
            livemode: self.livemode,
            name: self.name,
            created_at: self.created_at,
            secret: Secret::new(secret),
        })
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("livemode", &self.livemode)
            .field("name", &self.name)
            .field("secret", &self.secret)
            .finish()
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.secret.masked())
    }
}

/// Reads kind and mode from a key's prefix; refuses anything not shaped like a Stripe key.
///
/// ```
/// use stripe_mirror::{ApiKeyKind, models::api_key::parse_key};
/// assert_eq!(parse_key("sk_test_4eC39HqLyjWDarjtT1zdp7dc").unwrap(), (ApiKeyKind::Secret, false));
/// assert!(parse_key("sk_prod_123").is_err());
/// ```
pub fn parse_key(key: &str) -> Result<(ApiKeyKind, bool)> {
    let invalid = |reason| Error::InvalidApiKey {
        key: mask(key),
        reason,
    };
    let kind = match key.get(..3) {
        Some("pk_") => ApiKeyKind::Publishable,
        Some("sk_") => ApiKeyKind::Secret,
        Some("rk_") => ApiKeyKind::Restricted,
        _ => return Err(invalid("unknown prefix")),
    };
    let livemode = match key.get(3..8) {
        Some("test_") => false,
        Some("live_") => true,
        _ => return Err(invalid("no test_ or live_ mode marker")),
    };
    let rest = &key[8..];
    if rest.is_empty() {
        return Err(invalid("nothing after the prefix"));
    }
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(invalid("contains characters a Stripe key never has"));
    }
    Ok((kind, livemode))
}

fn key_id(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    format!("key_{}", &hex::encode(digest)[..24])
}

impl ApiKey {
    /// Test or live, from the prefix.
    pub fn mode(&self) -> crate::Mode {
        crate::Mode::from_livemode(self.livemode)
    }

    /// The key itself. Never log it.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Stores `secret` (once; a second call returns the stored key).
    ///
    /// ```
    /// # tokio_test(async {
    /// # let mirror = stripe_mirror::Mirror::connect(stripe_mirror::Config::new("sqlite::memory:")).await?;
    /// use stripe_mirror::{ApiKey, ApiKeyKind};
    /// let key = ApiKey::get_or_create(&mirror, "sk_test_4eC39HqLyjWDarjtT1zdp7dc").await?;
    /// assert_eq!(key.kind, ApiKeyKind::Secret);
    /// assert_eq!(key.to_string(), "sk_test_...p7dc");
    /// # Ok::<_, stripe_mirror::Error>(()) });
    /// # fn tokio_test<F: std::future::Future<Output = Result<(), stripe_mirror::Error>>>(f: F) {
    /// #     tokio::runtime::Runtime::new().unwrap().block_on(f).unwrap() }
    /// ```
    pub async fn get_or_create(mirror: &Mirror, secret: &str) -> Result<ApiKey> {
        let secret = secret.trim().to_owned();
        let (kind, livemode) = parse_key(&secret)?;
        let id = key_id(&secret);
        let keys = mirror.config().encryption_keys();
        // Sealed with the current key only: a previous key opens rows, it never seals
        // one (step 1 of a roll-out sets the new key there, and instances without it
        // must still read every row).
        let row = ApiKeyRow {
            secret: match &mirror.config().encryption_key {
                Some(key) => {
                    encryption::seal(key, &seal_context(&id, kind.as_str(), livemode), &secret)
                }
                None => secret,
            },
            id,
            kind: kind.as_str().to_owned(),
            livemode,
            name: None,
            created_at: chrono::Utc::now().timestamp(),
        };
        let stored: ApiKeyRow = mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => {
                    diesel::insert_into(stripe_api_keys::table)
                        .values(&row)
                        .on_conflict(stripe_api_keys::id)
                        .do_nothing()
                        .execute(c)?;
                    stripe_api_keys::table
                        .find(&row.id)
                        .select(ApiKeyRow::as_select())
                        .get_result(c)?
                }))
            })
            .await?;
        stored.open(&keys)
    }

    /// All stored keys, oldest first.
    pub async fn list(mirror: &Mirror) -> Result<Vec<ApiKey>> {
        let keys = mirror.config().encryption_keys();
        mirror
            .db()
            .run(|conn| {
                let rows: Vec<ApiKeyRow> = on_conn!(conn, c => stripe_api_keys::table
                    .order((stripe_api_keys::created_at.asc(), stripe_api_keys::id.asc()))
                    .select(ApiKeyRow::as_select())
                    .load(c))?;
                Ok(rows)
            })
            .await?
            .into_iter()
            .map(|row| row.open(&keys))
            .collect()
    }

    /// Seals every stored key with the current `STRIPE_MIRROR_ENCRYPTION_KEY`: plaintext
    /// keys from before encryption was turned on, and keys sealed with a previous key
    /// (rotation). Returns how many rows changed. Each row is replaced only if it still
    /// holds what was read, so processes doing this at once do not clash. A row no
    /// configured key opens is left as it is (logged; reading it is
    /// [`Error::Decrypt`]), so that the app still starts and the row can be removed.
    /// [`Mirror::connect`] runs it when an encryption key is configured.
    pub async fn encrypt_stored(mirror: &Mirror) -> Result<usize> {
        let keys = mirror.config().encryption_keys();
        // Previous keys alone seal nothing (step 1 of a roll-out).
        let Some(current) = mirror.config().encryption_key.clone() else {
            return Err(Error::Config(
                "no current encryption key: set STRIPE_MIRROR_ENCRYPTION_KEY (64 hex characters, e.g. `openssl rand -hex 32`); keys in STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS only open rows".into(),
            ));
        };
        let rows: Vec<ApiKeyRow> = mirror
            .db()
            .run(|conn| {
                Ok(on_conn!(conn, c => stripe_api_keys::table
                    .select(ApiKeyRow::as_select())
                    .load(c))?)
            })
            .await?;
        let mut changes = Vec::new();
        for row in rows {
            if encryption::sealed_with(&row.secret) == Some(current.id()) {
                continue;
            }
            let context = seal_context(&row.id, &row.kind, row.livemode);
            let plain = match encryption::open(&keys, &row.id, &context, &row.secret) {
                Ok(plain) => plain,
                Err(err) => {
                    tracing::warn!(key = %row.id, error = %err, "stored API key left as it is");
                    continue;
                }
            };
            let sealed = encryption::seal(&current, &context, &plain);
            changes.push((row.id, row.secret, sealed));
        }
        mirror
            .db()
            .run(move |conn| {
                let mut changed = 0;
                for (id, old, new) in &changes {
                    changed += on_conn!(conn, c => diesel::update(
                        stripe_api_keys::table
                            .filter(stripe_api_keys::id.eq(id))
                            .filter(stripe_api_keys::secret.eq(old)),
                    )
                    .set(stripe_api_keys::secret.eq(new))
                    .execute(c))?;
                }
                Ok(changed)
            })
            .await
    }

    /// Checks the stored key `id` against Stripe and returns it: a secret or
    /// restricted key must be accepted by Stripe (`GET /v1/balance`, the cheapest
    /// authenticated call) in the mode its prefix says. Publishable keys cannot be
    /// checked from a server and come back as stored. A key Stripe refuses is the
    /// Stripe error (401), with the key masked.
    pub async fn sync(mirror: &Mirror, id: &str) -> Result<ApiKey> {
        let key = Self::list(mirror)
            .await?
            .into_iter()
            .find(|k| k.id == id)
            .ok_or_else(|| Error::NotFound {
                object: "api key",
                id: id.to_owned(),
            })?;
        if key.kind == ApiKeyKind::Publishable {
            return Ok(key);
        }
        let c = mirror.config();
        let client =
            crate::stripe::StripeClient::new(&key.secret, c.api_base.as_deref(), c.stripe_timeout)?
                .with_retries(c.stripe_retries, c.stripe_retry_backoff)
                .with_clock(c.clock.clone());
        let object = format!("api key {}", key.secret);
        let balance = client
            .get("/balance", &serde_json::json!({}), Some(&object))
            .await?;
        match balance.get("livemode").and_then(serde_json::Value::as_bool) {
            Some(live) if live != key.livemode => Err(Error::Config(format!(
                "Stripe says {} is a {} key: its prefix says otherwise",
                key.secret,
                if live { "live" } else { "test" }
            ))),
            _ => Ok(key),
        }
    }

    /// Removes a stored key by its id; true when one was removed.
    pub async fn remove(mirror: &Mirror, id: &str) -> Result<bool> {
        let id = id.to_owned();
        mirror
            .db()
            .run(move |conn| {
                Ok(on_conn!(conn, c => diesel::delete(stripe_api_keys::table.find(&id)).execute(c))? > 0)
            })
            .await
    }

    /// The most recently added stored key of `kind` in the given mode.
    pub async fn latest(
        mirror: &Mirror,
        kind: ApiKeyKind,
        livemode: bool,
    ) -> Result<Option<ApiKey>> {
        mirror
            .db()
            .run(move |conn| {
                let row: Option<ApiKeyRow> = on_conn!(conn, c => stripe_api_keys::table
                    .filter(stripe_api_keys::kind.eq(kind.as_str()))
                    .filter(stripe_api_keys::livemode.eq(livemode))
                    .order((stripe_api_keys::created_at.desc(), stripe_api_keys::id.desc()))
                    .select(ApiKeyRow::as_select())
                    .first(c)
                    .optional())?;
                Ok(row)
            })
            .await?
            .map(|row| row.open(&mirror.config().encryption_keys()))
            .transpose()
    }

    /// The secret key for the mirror's current mode: a stored secret key first, then
    /// `STRIPE_SECRET_KEY`, then `STRIPE_TEST_SECRET_KEY` / `STRIPE_LIVE_SECRET_KEY`,
    /// each only if it is a key of this mode, then a stored restricted key (`rk_`, as
    /// the environment variables also take). An environment key of the other mode
    /// (with none of this one) is [`Error::Config`], naming the variable: using it
    /// would act on the other mode's data.
    pub async fn default_secret_key(mirror: &Mirror) -> Result<Secret> {
        let live = mirror.live_mode();
        if let Some(key) = Self::latest(mirror, ApiKeyKind::Secret, live).await? {
            return Ok(key.secret);
        }
        let config = mirror.config();
        if let Some(key) = config.env_secret_key() {
            return Ok(key.clone());
        }
        if let Some(key) = Self::latest(mirror, ApiKeyKind::Restricted, live).await? {
            return Ok(key.secret);
        }
        if let Some(refused) = config.env_secret_key_refused() {
            return Err(Error::Config(refused));
        }
        Err(if live {
            Error::NoApiKey {
                mode: "live",
                env: "LIVE",
            }
        } else {
            Error::NoApiKey {
                mode: "test",
                env: "TEST",
            }
        })
    }

    /// The publishable key for the current mode: stored first, then the environment.
    /// An environment value that is not this mode's publishable key (a secret key in
    /// the wrong variable) is [`Error::Config`], so it never reaches a page.
    pub async fn default_publishable_key(mirror: &Mirror) -> Result<Option<String>> {
        let live = mirror.live_mode();
        if let Some(key) = Self::latest(mirror, ApiKeyKind::Publishable, live).await? {
            return Ok(Some(key.secret.expose().to_owned()));
        }
        Ok(mirror.config().env_publishable_key()?.map(str::to_owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_give_kind_and_mode() {
        assert_eq!(
            parse_key("pk_live_abc123").unwrap(),
            (ApiKeyKind::Publishable, true)
        );
        assert_eq!(
            parse_key("rk_test_abc").unwrap(),
            (ApiKeyKind::Restricted, false)
        );
        for bad in [
            "",
            "sk_",
            "sk_test_",
            "xk_test_abc",
            "sk_tst_abcdef",
            "sk_test_ab cd",
            "sk_test_\u{e9}\u{e9}",
        ] {
            let err = parse_key(bad).unwrap_err().to_string();
            assert!(err.contains("invalid Stripe API key"), "{bad}: {err}");
        }
        // The message never holds the whole key.
        let err = parse_key("sk_test_secretvalue!!xyz9")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secretvalue"), "{err}");
    }
}
