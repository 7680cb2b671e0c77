//! The mirrored objects, one file each: the row struct, how its Stripe JSON maps to
//! typed columns, and the reads a host app needs (all from the local database).

pub mod api_key;
pub mod customer;
pub mod entitlement;
pub mod price;
pub mod product;
pub mod subscription;

/// Every top-level mirrored object, for code that picks a table by kind (webhooks, `sync_all`).
pub(crate) static MIRRORED: [&crate::sync::MirrorTable; 6] = [
    &customer::CUSTOMERS,
    &product::PRODUCTS,
    &price::PRICES,
    &subscription::SUBSCRIPTIONS,
    &entitlement::ENTITLEMENT_SUMMARIES,
    &entitlement::PRODUCT_FEATURES,
];

/// The mirrored table for an object kind (`customer`) or its plural, or a `plan`.
pub(crate) fn table_for_kind(kind: &str) -> Option<&'static crate::sync::MirrorTable> {
    let singular = kind.strip_suffix('s').unwrap_or(kind);
    MIRRORED
        .iter()
        .copied()
        .find(|t| t.accepts.contains(&kind) || t.accepts.contains(&singular))
}

/// Declares an enum for a set of strings Stripe keeps closed today, with an `Other`
/// arm so a value added later is kept, not an error (like async-stripe's `Unknown`):
/// `as_str`, `From<&str>`, `Display`, and diesel's `Text` both ways.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, diesel::deserialize::FromSqlRow, diesel::expression::AsExpression)]
        #[diesel(sql_type = diesel::sql_types::Text)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this version of the crate does not know yet, kept as sent.
            Other(String),
        }

        impl $name {
            /// The value as Stripe writes it.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Other(other) => other,
                }
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                match text {
                    $($text => $name::$variant,)*
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl<DB> diesel::deserialize::FromSql<diesel::sql_types::Text, DB> for $name
        where
            DB: diesel::backend::Backend,
            String: diesel::deserialize::FromSql<diesel::sql_types::Text, DB>,
        {
            fn from_sql(bytes: DB::RawValue<'_>) -> diesel::deserialize::Result<Self> {
                Ok(Self::from(String::from_sql(bytes)?.as_str()))
            }
        }

        impl<DB> diesel::serialize::ToSql<diesel::sql_types::Text, DB> for $name
        where
            DB: diesel::backend::Backend,
            str: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
        {
            fn to_sql<'b>(&'b self, out: &mut diesel::serialize::Output<'b, '_, DB>) -> diesel::serialize::Result {
                self.as_str().to_sql(out)
            }
        }
    };
}
pub(crate) use string_enum;
