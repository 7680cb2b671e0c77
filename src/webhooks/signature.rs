//! Stripe-Signature verification: HMAC-SHA256 over `{t}.{payload}` with the endpoint
//! secret, compared in constant time, within a tolerance, against any `v1` signature
//! and any configured secret (so secrets can be rotated).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Default tolerance between the signed timestamp and now, as Stripe's SDKs use.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("no Stripe-Signature header")]
    MissingHeader,
    /// The header is not `t=...,v1=...`.
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(&'static str),
    /// The signed timestamp is too far from now (a replay, or a skewed clock).
    #[error(
        "signature timestamp {timestamp} is {age}s from now, outside the {tolerance}s tolerance"
    )]
    OutsideTolerance {
        /// The signed timestamp.
        timestamp: i64,
        /// Seconds between it and now.
        age: i64,
        /// The tolerance in seconds.
        tolerance: i64,
    },
    /// No `v1` signature matched any secret (wrong secret, or body altered).
    #[error("no signature matches the payload with any configured webhook secret")]
    NoMatch,
    /// No webhook secret is configured.
    #[error("no webhook secret configured: set STRIPE_WEBHOOK_SECRET")]
    NoSecret,
}

fn mac(secret: &str, timestamp: i64, payload: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// Verifies `header` for `payload`; returns the signed timestamp.
pub fn verify(
    header: &str,
    payload: &[u8],
    secrets: &[Secret],
    tolerance_secs: i64,
    now: i64,
) -> Result<i64, SignatureError> {
    if secrets.is_empty() {
        return Err(SignatureError::NoSecret);
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            return Err(SignatureError::Malformed("an element is not key=value"));
        };
        match key {
            "t" => {
                let t = value
                    .parse::<i64>()
                    .map_err(|_| SignatureError::Malformed("t is not an integer"))?;
                if timestamp.replace(t).is_some() {
                    return Err(SignatureError::Malformed("more than one t"));
                }
            }
            // Undecodable v1 values simply cannot match; they do not hide valid ones.
            "v1" => signatures.extend(hex::decode(value).ok()),
            _ => {} // v0 and future schemes are ignored, as Stripe's SDKs do.
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed("no t= timestamp"))?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed("no v1 signature"));
    }
    let matched = secrets.iter().any(|secret| {
        let expected = mac(secret.expose(), timestamp, payload);
        signatures
            .iter()
            .any(|sig| expected.clone().verify_slice(sig).is_ok())
    });
    if !matched {
        return Err(SignatureError::NoMatch);
    }
    // Saturating: a signed `t` may be any i64 (a sender holding the secret, a test).
    let age = now.saturating_sub(timestamp);
    if tolerance_secs > 0 && age.unsigned_abs() > tolerance_secs.unsigned_abs() {
        return Err(SignatureError::OutsideTolerance {
            timestamp,
            age,
            tolerance: tolerance_secs,
        });
    }
    Ok(timestamp)
}

/// Builds a `Stripe-Signature` header for `payload`, as Stripe does: for tests, local
/// tools and replaying stored events to your own endpoint.
///
/// ```
/// use stripe_mirror::{Secret, webhooks::signature::{sign, verify}};
/// let secret = Secret::new("whsec_test_secret");
/// let header = sign(b"{}", &secret, 1_700_000_000);
/// assert_eq!(verify(&header, b"{}", &[secret], 300, 1_700_000_010), Ok(1_700_000_000));
/// ```
pub fn sign(payload: &[u8], secret: &Secret, timestamp: i64) -> String {
    let sig = mac(secret.expose(), timestamp, payload)
        .finalize()
        .into_bytes();
    format!("t={timestamp},v1={}", hex::encode(sig))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Secret {
        Secret::new(v)
    }

    #[test]
    fn accepts_any_signature_and_any_secret() {
        let (old, new) = (s("whsec_old"), s("whsec_new"));
        let good = sign(b"body", &new, 1000);
        let bad = sign(b"body", &s("whsec_other"), 1000);
        let header = format!("{},{},v0=abc", bad, good.split_once(',').unwrap().1);
        assert_eq!(
            verify(&header, b"body", &[old.clone(), new.clone()], 300, 1000),
            Ok(1000)
        );
        assert_eq!(
            verify(&good, b"body", &[old], 300, 1000),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(&good, b"bodx", std::slice::from_ref(&new), 300, 1000),
            Err(SignatureError::NoMatch)
        );
        assert!(matches!(
            verify(&good, b"body", std::slice::from_ref(&new), 300, 1301),
            Err(SignatureError::OutsideTolerance { .. })
        ));
        assert_eq!(
            verify(&good, b"body", std::slice::from_ref(&new), 0, 99999),
            Ok(1000),
            "0 disables the tolerance"
        );
        assert_eq!(
            verify(&good, b"body", &[], 300, 1000),
            Err(SignatureError::NoSecret)
        );
    }

    #[test]
    fn malformed_headers() {
        let secrets = [s("whsec_x")];
        for header in [
            "",
            "garbage",
            "t=abc,v1=00",
            "v1=00",
            "t=1",
            "t=1,t=2,v1=00",
        ] {
            assert!(
                matches!(
                    verify(header, b"", &secrets, 300, 1),
                    Err(SignatureError::Malformed(_))
                ),
                "{header:?}"
            );
        }
    }
}
