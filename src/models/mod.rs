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
