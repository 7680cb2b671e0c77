//! Encryption at rest for the API keys stored in `stripe_api_keys`.
//!
//! A database dump or a read-only SQL account should not hand out the Stripe account.
//! With a key in `STRIPE_MIRROR_ENCRYPTION_KEY` (32 random bytes as 64 hex characters,
//! e.g. `openssl rand -hex 32`), each stored API key is sealed with XChaCha20-Poly1305
//! (an AEAD: secret and tamper-evident), under a fresh random nonce, bound to its row
//! (id, kind and mode) so a sealed value cannot be moved to another row nor its row
//! switched to the other mode. The column then holds
//! `enc:v1:<key id>:<hex of nonce and ciphertext>`, where the key id is the first 8 hex
//! characters of the key's SHA-256 (which key opens it, nothing about the key).
//!
//! Rotation works like Laravel's `APP_PREVIOUS_KEYS`: put the new key in
//! `STRIPE_MIRROR_ENCRYPTION_KEY` and the old ones in
//! `STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS` (comma separated). Keys sealed with a
//! previous key still open, and [`Mirror::connect`](crate::Mirror::connect) (or
//! `stripe-mirror api-keys encrypt`) re-seals every row under the current key, plaintext
//! rows from before encryption was turned on included: the upgrade is in place.
//!
//! With several app instances on one database, roll a key out in two deploys, since
//! the first instance to start with a new current key re-seals every row, and the
//! instances still running without that key can no longer read them:
//! 1. every instance gets the new key in `STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS` only
//!    (it opens rows sealed with it; nothing is re-sealed while no current key is set,
//!    or while the current one stays the old key);
//! 2. then the new key becomes `STRIPE_MIRROR_ENCRYPTION_KEY` (and the old one moves to
//!    the previous keys) on every instance.
//!
//! Drop an old key from the previous keys only once `stripe-mirror api-keys encrypt`
//! reports every stored key sealed with the current one.

use std::fmt;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The marker and format version at the front of a sealed value.
const PREFIX: &str = "enc:v1:";

/// A 256-bit key that seals stored API keys. `Debug` shows only its id.
#[derive(Clone)]
pub struct EncryptionKey {
    id: String,
    bytes: [u8; 32],
}

impl EncryptionKey {
    /// Reads a key written as 64 hex characters (`openssl rand -hex 32`).
    ///
    /// ```
    /// use stripe_mirror::EncryptionKey;
    /// let key = EncryptionKey::from_hex(&"ab".repeat(32)).unwrap();
    /// assert_eq!(format!("{key:?}"), format!("EncryptionKey({})", key.id()));
    /// assert!(EncryptionKey::from_hex("too short").is_err());
    /// ```
    pub fn from_hex(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Config(format!(
                "an encryption key must be 64 hex characters (32 bytes, e.g. `openssl rand -hex 32`): {why}"
            ))
        };
        let decoded = hex::decode(text.trim()).map_err(|_| bad("not hex"))?;
        let bytes: [u8; 32] = decoded
            .try_into()
            .map_err(|v: Vec<u8>| bad(&format!("{} bytes", v.len())))?;
        Ok(Self::from_bytes(bytes))
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let id = hex::encode(Sha256::digest(bytes))[..8].to_owned();
        EncryptionKey { id, bytes }
    }

    /// A new random key (for a first set-up or a rotation), as 64 hex characters.
    pub fn generate_hex() -> String {
        hex::encode(XChaCha20Poly1305::generate_key(&mut OsRng))
    }

    /// The key's id: the first 8 hex characters of its SHA-256, stored with each sealed
    /// value to say which key opens it.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.bytes).into())
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey({})", self.id)
    }
}

/// The key id a sealed value names (`None`: a plaintext key from before encryption
/// was turned on).
pub(crate) fn sealed_with(stored: &str) -> Option<&str> {
    stored.strip_prefix(PREFIX)?.split(':').next()
}

/// Seals `plaintext` with `key`, bound to `context` (the row's id, kind and mode: a
/// sealed value copied to another row, or a row whose mode was flipped, does not open).
pub(crate) fn seal(key: &EncryptionKey, context: &str, plaintext: &str) -> String {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let sealed = key
        .cipher()
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext.as_bytes(),
                aad: context.as_bytes(),
            },
        )
        .expect("XChaCha20-Poly1305 encrypts any message shorter than 256 GiB");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    format!("{PREFIX}{}:{}", key.id, hex::encode(out))
}

/// Opens a stored value of row `row_id`, sealed for `context`, with whichever of `keys`
/// sealed it; a plaintext value comes back as it is. The error says what to fix,
/// never the value.
pub(crate) fn open(
    keys: &[EncryptionKey],
    row_id: &str,
    context: &str,
    stored: &str,
) -> Result<String> {
    let Some(rest) = stored.strip_prefix(PREFIX) else {
        return Ok(stored.to_owned());
    };
    let unreadable = |problem: String| Error::Decrypt {
        id: row_id.to_owned(),
        problem: format!("{problem}; remove the row and add the key again"),
    };
    let (kid, body) = rest
        .split_once(':')
        .ok_or_else(|| unreadable("the sealed value has no key id".into()))?;
    if !keys.iter().any(|k| k.id == kid) {
        return Err(Error::Decrypt {
            id: row_id.to_owned(),
            problem: format!(
                "it is sealed with encryption key {kid}, which is neither STRIPE_MIRROR_ENCRYPTION_KEY nor in STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS (configured: {}); set the key it was sealed with",
                if keys.is_empty() {
                    "none".to_owned()
                } else {
                    keys.iter()
                        .map(|k| k.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        });
    }
    let bytes = hex::decode(body).map_err(|_| unreadable("the sealed value is not hex".into()))?;
    if bytes.len() < 24 + 16 {
        return Err(unreadable("the sealed value is too short".into()));
    }
    let (nonce, sealed) = bytes.split_at(24);
    // Every key with this id (a 32-bit id may collide, however unlikely).
    let plain = keys
        .iter()
        .filter(|k| k.id == kid)
        .find_map(|k| {
            k.cipher()
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: context.as_bytes(),
                    },
                )
                .ok()
        })
        .ok_or_else(|| {
            unreadable(format!(
                "it does not open with key {kid} (changed in the database, or moved from another row)"
            ))
        })?;
    String::from_utf8(plain).map_err(|_| unreadable("the opened value is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> EncryptionKey {
        EncryptionKey::from_bytes([b; 32])
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_row() {
        let (k1, k2) = (key(1), key(2));
        let sealed = seal(&k1, "key_a|secret|false", "sk_test_abcdefgh12345678");
        assert!(sealed.starts_with(PREFIX) && !sealed.contains("abcdefgh"));
        assert_eq!(sealed_with(&sealed), Some(k1.id()));
        // Two seals of the same value differ (random nonce).
        assert_ne!(
            sealed,
            seal(&k1, "key_a|secret|false", "sk_test_abcdefgh12345678")
        );
        let ctx = "key_a|secret|false";
        assert_eq!(
            open(&[k2.clone(), k1.clone()], "key_a", ctx, &sealed).unwrap(),
            "sk_test_abcdefgh12345678"
        );
        // The wrong key, another row or mode, a changed byte: refused, clearly.
        let err = open(std::slice::from_ref(&k2), "key_a", ctx, &sealed).unwrap_err();
        assert!(err.to_string().contains(k1.id()), "{err}");
        assert!(
            open(
                std::slice::from_ref(&k1),
                "key_b",
                "key_b|secret|false",
                &sealed
            )
            .is_err()
        );
        assert!(
            open(
                std::slice::from_ref(&k1),
                "key_a",
                "key_a|secret|true",
                &sealed
            )
            .is_err()
        );
        let mut changed = sealed.clone();
        let last = changed.pop().unwrap();
        changed.push(if last == '0' { '1' } else { '0' });
        let err = open(std::slice::from_ref(&k1), "key_a", ctx, &changed).unwrap_err();
        assert!(!err.to_string().contains("sk_test"), "{err}");
        // Plaintext from before encryption passes through.
        assert_eq!(open(&[], "key_a", ctx, "sk_test_x").unwrap(), "sk_test_x");
    }

    #[test]
    fn hex_keys_are_checked_and_ids_do_not_reveal_them() {
        let text = EncryptionKey::generate_hex();
        let k = EncryptionKey::from_hex(&text).unwrap();
        assert_eq!(k.id().len(), 8);
        assert!(!text.contains(k.id()));
        assert!(!format!("{k:?}").contains(&text));
        for bad in ["", "zz", &"ab".repeat(31), &"ab".repeat(33)] {
            assert!(EncryptionKey::from_hex(bad).is_err(), "{bad}");
        }
    }
}
