//! The mirrored objects, one file each: the row struct, how its Stripe JSON maps to
//! typed columns, and the reads a host app needs (all from the local database).

pub mod api_key;
pub mod customer;
pub mod price;
pub mod product;
pub mod subscription;
