//! Lenient readers over a Stripe JSON object: the JSON-to-row mapping's vocabulary.
//!
//! A missing or `null` field reads as `None` (fields come and go between API
//! versions); a field present with the wrong type is an [`Error::Mapping`] naming
//! the object, its id and the field. Nothing here panics on any input.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One Stripe object being mapped to a row.
pub(crate) struct Fields<'a> {
    /// The kind of object, for messages (`customer`).
    pub kind: &'static str,
    /// Its Stripe id.
    pub id: &'a str,
    /// Its fields.
    pub obj: &'a Map<String, Value>,
    /// A deleted object carries few fields; required ones may then be absent.
    pub deleted: bool,
}

/// Whether JSON text is known to hold no U+0000 without parsing it: JSON writes that
/// character only as `\u0000` (a raw NUL byte is no valid JSON), so text without that
/// sequence holds none (text with it may still hold none: `\\u0000` is a backslash).
pub(crate) fn text_nul_free(text: &[u8]) -> bool {
    memchr::memmem::find(text, b"\\u0000").is_none()
}

/// Whether any string or key in `v` holds U+0000: Postgres cannot store it, so it is
/// refused on every backend alike (an event's whole body, an object's JSON).
pub(crate) fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

impl<'a> Fields<'a> {
    /// Reads `value` as an object of `kind` with a string id.
    pub fn new(kind: &'static str, value: &'a Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| {
            Error::mapping(
                kind,
                "<no id>",
                "<root>",
                format!("is {}, expected a JSON object", type_name(value)),
            )
        })?;
        let id = match obj.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.as_str(),
            Some(Value::String(_)) => {
                return Err(Error::mapping(kind, "<no id>", "id", "is empty"));
            }
            Some(other) if !other.is_null() => {
                return Err(Error::mapping(
                    kind,
                    "<no id>",
                    "id",
                    format!("is {}, expected a string", type_name(other)),
                ));
            }
            _ => return Err(Error::mapping(kind, "<no id>", "id", "is missing")),
        };
        let mut fields = Fields {
            kind,
            id,
            obj,
            deleted: false,
        };
        fields.deleted = fields.bool("deleted")?.unwrap_or(false);
        Ok(fields)
    }

    /// The value at a dotted path (`recurring.interval`), `None` when absent or null.
    pub fn get(&self, path: &str) -> Option<&'a Value> {
        let mut parts = path.split('.');
        let mut current = self.obj.get(parts.next()?)?;
        for part in parts {
            current = match current {
                Value::Object(map) => map.get(part)?,
                Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        (!current.is_null()).then_some(current)
    }

    fn wrong(&self, path: &str, value: &Value, expected: &str) -> Error {
        Error::mapping(
            self.kind,
            self.id,
            path,
            format!("is {}, expected {expected}", type_name(value)),
        )
    }

    /// A string field.
    pub fn str(&self, path: &str) -> Result<Option<String>> {
        match self.get(path) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong(path, other, "a string")),
        }
    }

    /// A reference to another object: its id as a string, or the object expanded.
    pub fn id_ref(&self, path: &str) -> Result<Option<String>> {
        match self.get(path) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Object(map)) => match map.get("id") {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(Error::mapping(
                    self.kind,
                    self.id,
                    format!("{path}.id"),
                    "is missing from the expanded object",
                )),
            },
            Some(other) => Err(self.wrong(path, other, "an id or an expanded object")),
        }
    }

    /// An integer field (amounts, unix timestamps).
    pub fn i64(&self, path: &str) -> Result<Option<i64>> {
        match self.get(path) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
                Error::mapping(
                    self.kind,
                    self.id,
                    path,
                    format!("is {n}, expected a 64-bit integer"),
                )
            }),
            Some(other) => Err(self.wrong(path, other, "an integer")),
        }
    }

    /// A boolean field.
    pub fn bool(&self, path: &str) -> Result<Option<bool>> {
        match self.get(path) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong(path, other, "a boolean")),
        }
    }

    /// `value`, or a mapping error when it is absent on a live (not deleted) object.
    pub fn required<T>(&self, path: &str, value: Option<T>) -> Result<Option<T>> {
        if value.is_none() && !self.deleted {
            return Err(Error::mapping(self.kind, self.id, path, "is missing"));
        }
        Ok(value)
    }

    /// The first of several paths that is present (a field that moved between API versions).
    pub fn first<T>(
        &self,
        paths: &[&str],
        read: impl Fn(&Self, &str) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        for path in paths {
            if let Some(v) = read(self, path)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_leniently_and_names_bad_fields() {
        let v = json!({"id": "cus_1", "email": null, "n": 5, "nested": {"a": [1, {"b": "x"}]},
                       "product": {"id": "prod_1"}, "bad": 1.5});
        let f = Fields::new("customer", &v).unwrap();
        assert_eq!(f.str("email").unwrap(), None);
        assert_eq!(f.str("missing").unwrap(), None);
        assert_eq!(f.i64("n").unwrap(), Some(5));
        assert_eq!(f.str("nested.a.1.b").unwrap().as_deref(), Some("x"));
        assert_eq!(f.id_ref("product").unwrap().as_deref(), Some("prod_1"));
        let err = f.str("n").unwrap_err().to_string();
        assert!(
            err.contains("customer cus_1") && err.contains("`n`"),
            "{err}"
        );
        assert!(f.i64("bad").is_err());
        assert!(f.required("nope", None::<String>).is_err());
    }

    /// The text scan answers "none" only when the parsed value holds none: JSON has
    /// no other way to write U+0000 (serde_json refuses a raw NUL byte).
    #[test]
    fn text_without_an_escaped_nul_holds_none() {
        let with = br#"{"id":"cus_1","name":"a\u0000b"}"#;
        assert!(!text_nul_free(with));
        assert!(holds_nul(&serde_json::from_slice(with).unwrap()));
        let key = br#"{"id":"cus_1","a\u0000":1}"#;
        assert!(!text_nul_free(key) && holds_nul(&serde_json::from_slice(key).unwrap()));
        let plain = br#"{"id":"cus_1","name":"ab"}"#;
        assert!(text_nul_free(plain));
        // An escaped backslash before `u0000` reads as a NUL to the scan; the walk decides.
        let backslash = br#"{"name":"a\\u0000"}"#;
        assert!(!text_nul_free(backslash));
        assert!(!holds_nul(&serde_json::from_slice(backslash).unwrap()));
        for raw in [&b"{\"name\":\"a\0b\"}"[..], b"{\"id\":1}\0"] {
            assert!(serde_json::from_slice::<Value>(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn objects_without_an_id_are_refused() {
        for bad in [
            json!([]),
            json!({}),
            json!({"id": 3}),
            json!("cus_1"),
            json!({"id": ""}),
        ] {
            let err = Fields::new("customer", &bad).err().expect("refused");
            assert!(matches!(err, Error::Mapping { .. }), "{err}");
        }
        let err = Fields::new("customer", &json!({"id": ""})).err().unwrap();
        assert!(err.to_string().contains("`id` is empty"), "{err}");
    }
}
