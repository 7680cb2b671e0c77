//! A string that must never be printed: Stripe keys and webhook secrets.

use std::fmt;

/// A secret value (API key, webhook signing secret).
///
/// `Debug` and `Display` show only its prefix and last four characters
/// (`sk_test_...abcd`), so a secret can sit in a struct that is logged.
/// Use [`Secret::expose`] where the real value is needed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The real value. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The masked form, e.g. `sk_test_...abcd`.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// Masks a secret: keeps the Stripe prefix (`sk_test_`, `whsec_`) and the last four characters.
pub(crate) fn mask(value: &str) -> String {
    let prefix_len = [
        "sk_test_", "sk_live_", "pk_test_", "pk_live_", "rk_test_", "rk_live_", "whsec_",
    ]
    .iter()
    .find(|p| value.starts_with(*p))
    .map_or(0, |p| p.len());
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < prefix_len + 8 {
        return format!("{}...", &value[..prefix_len]);
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{}...{}", &value[..prefix_len], tail)
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_prefix_and_last_four_only() {
        let s = Secret::new("sk_test_51HxxxxxxxxxxxxxxxxxxabcD");
        assert_eq!(s.to_string(), "sk_test_...abcD");
        assert_eq!(format!("{s:?}"), "Secret(sk_test_...abcD)");
        assert_eq!(mask("whsec_0123456789abcdef"), "whsec_...cdef");
        // Too short to show a tail without revealing most of it.
        assert_eq!(mask("sk_test_abc"), "sk_test_...");
        assert_eq!(mask("x"), "...");
    }
}
