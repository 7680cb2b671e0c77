//! Keeping rows true to Stripe: the JSON-to-row mapping (`fields`), the one upsert
//! with its stale-write guard (`upsert`), the entry points every model shares, and
//! sync from the API ([`remote`]: `sync`, [`sync_all`](remote::sync_all)), and
//! [`reconcile`](reconcile::reconcile) for what webhooks missed or could not order.

pub(crate) mod fields;
pub mod reconcile;
pub mod remote;
pub(crate) mod upsert;

use serde_json::{Value, json};

use crate::db::Conn;
use crate::error::{Error, Result};
use crate::mirror::Mirror;
pub(crate) use remote::KeyedLocks;
pub(crate) use upsert::{MirrorTable, Stamp, now};

/// A mirrored model: its table description and how to load one row.
pub(crate) trait Model: Sized + Send + 'static {
    /// How Stripe objects map onto this model's table.
    const TABLE: &'static MirrorTable;
    /// Loads a row by Stripe id, tombstones included.
    fn find(conn: &mut Conn<'_>, id: &str) -> Result<Option<Self>>;
    /// The row as it would be stored, built without a database.
    fn from_row(row: &upsert::Row) -> Self;
}

/// Builds a model's row type from a Stripe object, without a database.
pub(crate) fn from_stripe_json<M: Model>(data: &Value) -> Result<M> {
    let at = crate::stripe::newest_timestamp(data).unwrap_or(0);
    Ok(M::from_row(&M::TABLE.row_alone(data, Stamp::fetched(at))?))
}

/// Upserts `data` (a Stripe object fetched at `at`, Stripe's clock), returns the row
/// as it now is.
pub(crate) async fn sync_from_stripe_data<M: Model>(
    mirror: &Mirror,
    data: Value,
    at: i64,
) -> Result<M> {
    sync_stamped::<M>(mirror, data, Stamp::fetched(at)).await
}

/// [`sync_from_stripe_data`] with the stamp given (a fetch that may settle the row).
pub(crate) async fn sync_stamped<M: Model>(
    mirror: &Mirror,
    data: Value,
    stamp: Stamp,
) -> Result<M> {
    mirror
        .db()
        .run(move |conn| {
            let row = M::TABLE.row(&data, stamp, None)?;
            conn.write(|c| {
                M::TABLE.write(c, &row, &data)?;
                M::find(c, &row.id)?.ok_or_else(|| Error::NotFound {
                    object: M::TABLE.kind,
                    id: row.id.clone(),
                })
            })
        })
        .await
}

/// Marks `id` deleted as of `stamp`, keeping the last data seen.
pub(crate) async fn tombstone<M: Model>(mirror: &Mirror, id: &str, stamp: i64) -> Result<M> {
    let data = json!({ "id": id, "object": M::TABLE.accepts[0], "deleted": true });
    sync_from_stripe_data::<M>(mirror, data, stamp).await
}

/// Adds the shared sync methods to a model.
macro_rules! sync_methods {
    ($model:ty, $object:literal) => {
        impl $model {
            #[doc = concat!("Upserts a Stripe ", $object, " object (raw JSON) into the mirror and returns the row.")]
            ///
            /// The data is stamped with the newest time it carries (`created`, a
            /// period start, ...: Stripe's clock, a lower bound of when it was read),
            /// or the host's clock when it carries none. Prefer `sync` (which reads
            /// Stripe's clock from the answer) or `sync_from_stripe_data_at`.
            ///
            /// Data older than what the row holds, or a live object for a deleted row,
            /// changes nothing: the row as it is comes back.
            pub async fn sync_from_stripe_data(
                mirror: &$crate::Mirror,
                data: &serde_json::Value,
            ) -> $crate::Result<Self> {
                let at = $crate::stripe::newest_timestamp(data).unwrap_or_else(|| mirror.now());
                $crate::sync::sync_from_stripe_data::<Self>(mirror, data.clone(), at).await
            }

            /// Like `sync_from_stripe_data`, with the freshness stamp given (unix seconds:
            /// an event's `created`, or when the data was fetched).
            pub async fn sync_from_stripe_data_at(
                mirror: &$crate::Mirror,
                data: &serde_json::Value,
                stamp: i64,
            ) -> $crate::Result<Self> {
                $crate::sync::sync_from_stripe_data::<Self>(mirror, data.clone(), stamp).await
            }

            #[doc = concat!("Marks the ", $object, " deleted in the mirror (a tombstone no older data can resurrect).")]
            pub async fn mark_deleted(mirror: &$crate::Mirror, id: &str) -> $crate::Result<Self> {
                $crate::sync::tombstone::<Self>(mirror, id, mirror.now()).await
            }

            #[doc = concat!("The mirrored ", $object, " with this Stripe id, tombstones included, of either")]
            /// mode (ids are Stripe's, unique across modes: check `livemode` against
            /// [`Mirror::live_mode`](crate::Mirror::live_mode) when the id comes from a
            /// user). No Stripe call.
            pub async fn get(mirror: &$crate::Mirror, id: &str) -> $crate::Result<Option<Self>> {
                let id = id.to_owned();
                mirror.db().run(move |conn| <Self as $crate::sync::Model>::find(conn, &id)).await
            }

            #[doc = concat!("Fetches the ", $object, " from Stripe and upserts it (stamped with the fetch time);")]
            /// an object Stripe reports missing becomes a tombstone.
            pub async fn sync(mirror: &$crate::Mirror, id: &str) -> $crate::Result<Self> {
                $crate::sync::remote::sync_one::<Self>(mirror, id).await
            }

            #[doc = concat!("The ", $object, " row built from a Stripe object, without a database: for an")]
            /// event's object in a handler, or a handler's unit test. Nothing is stored.
            pub fn from_stripe_json(data: &serde_json::Value) -> $crate::Result<Self> {
                $crate::sync::from_stripe_json::<Self>(data)
            }

            /// The raw Stripe object as last mirrored.
            pub fn data(&self) -> serde_json::Value {
                serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
            }
        }
    };
}
pub(crate) use sync_methods;
