//! The one write path for every mirrored object: JSON to row, stale-write guard,
//! tombstones, upsert. Each model describes its table with a [`MirrorTable`]; this
//! file turns that description into SQL, once per table and backend.
//!
//! The guard lives in the SQL itself (`ON CONFLICT ... DO UPDATE ... WHERE`), so it
//! holds under concurrent writers without a read-then-write race:
//! - a live write applies only if the row is not a tombstone and holds older data:
//!   an older `stamp` (Stripe's clock, whole seconds), or the same stamp from an
//!   earlier [`Source`] (created < updated < fetched < deleted);
//! - two updates in the same second (or an update and a fetch) are settled by the
//!   events' `previous_attributes` (`settle_tie`); what nothing settles is kept and
//!   flagged `reconcile`, never "the later delivery wins";
//! - a deleting write marks the row deleted whatever its stamp (deletion is final in
//!   Stripe) and keeps the last full data seen.

use std::sync::OnceLock;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use serde_json::Value;

use crate::db::statement::Bound;
pub(crate) use crate::db::statement::{SqlValue, execute};
use crate::db::{Conn, on_conn};
use crate::error::{Error, Result};
use crate::sync::fields::Fields;

/// How one kind of Stripe object maps to its table.
pub(crate) struct MirrorTable {
    /// The object kind, for messages: `customer`.
    pub kind: &'static str,
    /// The table: `stripe_customers`.
    pub table: &'static str,
    /// Where the object lives in the Stripe API (`/customers`); `None` for objects only
    /// mirrored inside their parent.
    pub api_path: Option<&'static str>,
    /// The field holding the row's id when the object has no `id` of its own (an
    /// entitlement summary is keyed by its `customer`).
    pub id_from: Option<&'static str>,
    /// The `object` values accepted (`price` also takes the legacy `plan`).
    pub accepts: &'static [&'static str],
    /// The typed columns, in the order `extract` returns them.
    pub columns: &'static [&'static str],
    /// Typed columns a later write with no value must not clear (set by other paths),
    /// each with the typed column, if any, that says whether the object held the value:
    /// once the stored row's says it did (it stays true from then on: the object alone
    /// decides) and the write's says the object holds none, the write clears it after
    /// all (a link removed in Stripe).
    pub keep_when_null: &'static [(&'static str, Option<&'static str>)],
    /// Reads the typed column values from the object.
    pub extract: fn(&Fields<'_>) -> Result<Vec<SqlValue>>,
    /// Whether a tombstone is final. True for objects Stripe deletes for good; false
    /// for children tombstoned only because they left their parent's list, which fresher
    /// parent data may list again.
    pub final_tombstones: bool,
    /// Whose access a write may change ([`crate::access::changes`]).
    pub access: crate::access::changes::AccessLink,
    /// Nested objects mirrored with the parent (a subscription's items).
    pub children: Option<&'static Children>,
    /// Whether a payload holds only part of the object (an entitlement summary's event
    /// lists 10 entitlements, then `has_more`; a legacy plan is part of its price): it is written and flagged `reconcile`;
    /// a webhook's follow-up re-fetches it whole like a same-second tie, and every
    /// fetch completes it first (`sync::remote::fetch_whole`).
    pub partial: Option<fn(&Value) -> bool>,
    /// The upsert statements, built on first use.
    pub sql: OnceLock<Statements>,
}

/// Child objects that live inside a parent object and are replaced with it.
pub(crate) struct Children {
    pub table: &'static MirrorTable,
    /// The child's column holding the parent id.
    pub parent_column: &'static str,
    /// Where the children are in the parent.
    pub list: for<'a> fn(&Fields<'a>) -> Result<Vec<&'a Value>>,
    /// The parent lists every child (not absent, not one page of more): only then are
    /// the children it does not list gone from it.
    pub complete: fn(&Fields<'_>) -> bool,
}

pub(crate) struct Statements {
    /// The guarded upsert.
    live: String,
    /// The upsert without the freshness guard (tombstones still final), for a tie
    /// settled in the new data's favour and for children following their parent.
    forced: String,
    /// Marks the row deleted whatever its stamp.
    delete: String,
    /// The upsert with no condition: an object made again under a deleted one's id.
    revive: String,
    /// `live` and `forced` that leave the indexed columns out of their `SET`, and
    /// apply only when those keep their values ([`MirrorTable::upsert`]); `None` for a
    /// table without secondary indexes. A miss (a new value for an indexed column, or
    /// the guard refusing) costs the whole form after it: a statement, no page.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    narrow: Option<(String, String)>,
}

/// Whether [`MirrorTable::map`] looks for U+0000, which Postgres cannot store (events
/// are checked whole when they arrive; objects from the API or the host here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Nul {
    /// Walk every string of the object.
    Check,
    /// Known to hold none (its text had no `\u0000`, or its parent was checked).
    Absent,
    /// The parent's own columns only, no children, no check (a model built from JSON).
    Alone,
}

/// Where written data comes from. Orders writes that share a stamp (Stripe stamps
/// events in whole seconds): an object is created before it is updated, a fetch from
/// the API sees it after it exists, and nothing follows a deletion. Stored as
/// `stamp_rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Source {
    /// A `*.created` event.
    Created = 1,
    /// Any other event about the object (`*.updated`, `*.paused`, ...).
    Updated = 2,
    /// Data fetched from the API, or handed in by the host.
    Fetched = 3,
    /// A `*.deleted` event.
    Deleted = 4,
}

impl Source {
    /// The source of an event's object, from the event type.
    pub(crate) fn of_event(event_type: &str) -> Source {
        if event_type.ends_with(".created") {
            Source::Created
        } else if event_type.ends_with(".deleted") {
            Source::Deleted
        } else {
            Source::Updated
        }
    }

    fn from_rank(rank: i32) -> Option<Source> {
        [
            Source::Created,
            Source::Updated,
            Source::Fetched,
            Source::Deleted,
        ]
        .into_iter()
        .find(|s| *s as i32 == rank)
    }
}

/// How fresh the data being written is: Stripe's time of it, its source, and for
/// event data the event (its id and `previous_attributes` settle same-second updates).
#[derive(Clone, Debug)]
pub(crate) struct Stamp {
    /// Unix seconds on Stripe's clock: the event's `created`, or when it was fetched.
    pub at: i64,
    pub source: Source,
    pub event: Option<String>,
    pub previous: Option<Value>,
    /// For a fetch: the row as it was read just before the request was sent. A fetch
    /// is newer than anything written before it was asked for, so it wins a
    /// same-second tie with the row when the row is still what was seen.
    pub settles: Option<Seen>,
}

/// A row's version as read before a fetch ([`Stamp::settles`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    stamp: i64,
    rank: i32,
    data: String,
}

impl Seen {
    /// The held version's stamp.
    pub(crate) fn stamp(&self) -> i64 {
        self.stamp
    }

    /// The held object's mode (`livemode` of its data).
    pub(crate) fn livemode(&self) -> Option<bool> {
        let data: Value = serde_json::from_str(&self.data).ok()?;
        data.get("livemode")?.as_bool()
    }
}

impl Stamp {
    /// Data fetched from the API (or handed in by the host) at `at`.
    pub(crate) fn fetched(at: i64) -> Stamp {
        Stamp {
            at,
            source: Source::Fetched,
            event: None,
            previous: None,
            settles: None,
        }
    }

    /// An object as its creation answered at `at` (ranked as its `*.created` event),
    /// asked for when the row was `seen`: a create made once a tombstone was stored
    /// brings the row back, and a deletion of an older second cannot take it.
    pub(crate) fn created_over(at: i64, seen: Option<Seen>) -> Stamp {
        Stamp {
            source: Source::Created,
            settles: seen,
            ..Stamp::fetched(at)
        }
    }

    /// Data fetched at `at`, asked for when the row was `seen` ([`Stamp::settles`]).
    pub(crate) fn fetched_over(at: i64, seen: Option<Seen>) -> Stamp {
        Stamp {
            settles: seen,
            ..Stamp::fetched(at)
        }
    }
}

/// What a guarded write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// The row now holds the data.
    Applied,
    /// The row holds fresher data (or a tombstone) and was left alone.
    Kept,
    /// Same stamp, and nothing the data carries says which is newer: the row is kept
    /// and flagged `reconcile` (re-fetch it when an API key is at hand).
    Undecided,
}

/// A row ready to write, its values named.
#[derive(Debug)]
pub(crate) struct Row {
    pub id: String,
    pub livemode: bool,
    pub deleted: bool,
    pub stamp: Stamp,
    data: String,
    created: Option<i64>,
    /// The table's typed columns, in [`MirrorTable::columns`] order.
    typed: Vec<SqlValue>,
    columns: &'static [&'static str],
    /// The children's rows (a subscription's items), mapped with the parent so that a
    /// bad child is an error before anything is written.
    children: Vec<Row>,
    /// `children` is the whole list ([`Children::complete`]).
    children_complete: bool,
}

impl Row {
    /// The raw object.
    pub(crate) fn data(&self) -> &str {
        &self.data
    }

    /// `created`, read from the object.
    pub(crate) fn created(&self) -> Option<i64> {
        self.created
    }

    fn typed(&self, column: &str) -> Option<&SqlValue> {
        let at = self.columns.iter().position(|c| *c == column);
        debug_assert!(at.is_some(), "no typed column {column}");
        self.typed.get(at?)
    }

    /// A typed text column's value, by name.
    pub(crate) fn text(&self, column: &str) -> Option<String> {
        match self.typed(column) {
            Some(SqlValue::Text(v)) => v.clone(),
            _ => None,
        }
    }

    /// A typed integer column's value, by name.
    pub(crate) fn int(&self, column: &str) -> Option<i64> {
        match self.typed(column) {
            Some(SqlValue::Int(v)) => *v,
            _ => None,
        }
    }

    /// A typed boolean column's value, by name.
    pub(crate) fn flag(&self, column: &str) -> Option<bool> {
        match self.typed(column) {
            Some(SqlValue::Bool(v)) => *v,
            _ => None,
        }
    }

    /// Every bind of the upsert, in [`COMMON`] then typed-column order.
    fn binds(&self) -> Vec<SqlValue> {
        let mut values = vec![
            SqlValue::Text(Some(self.id.clone())),
            SqlValue::Bool(Some(self.livemode)),
            SqlValue::Text(Some(self.data.clone())),
            SqlValue::Bool(Some(self.deleted)),
            SqlValue::Int(Some(self.stamp.at)),
            SqlValue::Int(Some(self.stamp.source as i64)),
            SqlValue::Text(self.stamp.event.clone()),
            SqlValue::Bool(Some(false)),
            SqlValue::Int(Some(now())),
            SqlValue::Int(self.created),
        ];
        values.extend(self.typed.iter().cloned());
        values
    }
}

/// Unix seconds now on the host's clock: bookkeeping (`synced_at`) and data the host
/// hands in; API data is stamped on Stripe's clock (see `stripe::StripeClient`).
pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The columns every mirrored table has, in bind order.
const COMMON: [&str; 10] = [
    "id",
    "livemode",
    "data",
    "deleted",
    "stamp",
    "stamp_rank",
    "stamp_event",
    "reconcile",
    "synced_at",
    "created",
];

/// The columns of each mirrored table that its secondary indexes hold (the
/// migrations'; `the_indexed_columns_are_the_schemas` checks them against SQLite's).
/// SQLite rewrites an index's entry whenever an `UPDATE` sets one of its columns, to
/// the same value too: a page more in the commit per index. So on SQLite an update
/// first runs without them in its `SET` ([`Statements::narrow`]). A column missing
/// here only costs pages; it cannot change what is written.
pub(crate) const INDEXED: &[(&str, &[&str])] = &[
    ("stripe_customers", &["subscriber_id", "livemode"]),
    ("stripe_prices", &["product_id", "lookup_key"]),
    ("stripe_product_features", &["product_id"]),
    (
        "stripe_subscription_items",
        &["subscription_id", "product_id"],
    ),
    ("stripe_subscriptions", &["customer_id"]),
];

/// A row's freshness as stored, read when a write ties with it.
#[derive(QueryableByName)]
struct Current {
    #[diesel(sql_type = BigInt)]
    stamp: i64,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    stamp_rank: i32,
    #[diesel(sql_type = Nullable<Text>)]
    stamp_event: Option<String>,
    #[diesel(sql_type = Text)]
    data: String,
    #[diesel(sql_type = Bool)]
    deleted: bool,
}

impl MirrorTable {
    /// Maps a Stripe object to a row of this table, its children's rows with it: a bad
    /// child is an error here, before anything is written.
    pub(crate) fn row(
        &self,
        value: &Value,
        stamp: Stamp,
        livemode_hint: Option<bool>,
    ) -> Result<Row> {
        self.map(value, stamp, livemode_hint, Nul::Check)
    }

    /// [`row`](Self::row) for an object of a list page, walked for U+0000 as `nul`
    /// says: JSON writes U+0000 only as `\u0000`, so a page whose text holds none
    /// needs no walk over every string ([`Nul::Absent`]).
    pub(crate) fn listed_row(&self, value: &Value, stamp: Stamp, nul: Nul) -> Result<Row> {
        self.map(value, stamp, None, nul)
    }

    /// [`row`](Self::row) without the children: the parent's own columns, for a model
    /// built from JSON without a database.
    pub(crate) fn row_alone(&self, value: &Value, stamp: Stamp) -> Result<Row> {
        self.map(value, stamp, None, Nul::Alone)
    }

    fn map(
        &self,
        value: &Value,
        stamp: Stamp,
        livemode_hint: Option<bool>,
        nul: Nul,
    ) -> Result<Row> {
        let with_children = nul != Nul::Alone;
        let keyed;
        let value = match self.id_from {
            Some(field) if value.get("id").is_none() => {
                keyed = with_id_from(value, field);
                &keyed
            }
            _ => value,
        };
        let fields = Fields::new(self.kind, value)?;
        // From the API or the host (events are checked whole when they arrive).
        if nul == Nul::Check && super::fields::holds_nul(value) {
            return Err(Error::mapping(
                self.kind,
                fields.id,
                "<a string>",
                "holds a NUL character (U+0000), which Postgres cannot store",
            ));
        }
        match fields.str("object")? {
            Some(object) if self.accepts.contains(&object.as_str()) => {}
            Some(object) => {
                return Err(Error::mapping(
                    self.kind,
                    fields.id,
                    "object",
                    format!("is {object:?}, expected {}", self.accepts.join(" or ")),
                ));
            }
            // Some minimal payloads omit `object`; the id prefix is not checked.
            None => {}
        }
        let typed = (self.extract)(&fields)?;
        debug_assert_eq!(
            typed.len(),
            self.columns.len(),
            "{} extract/columns mismatch",
            self.kind
        );
        let mut row = Row {
            id: fields.id.to_owned(),
            livemode: fields.bool("livemode")?.or(livemode_hint).unwrap_or(false),
            deleted: fields.deleted,
            stamp,
            // Straight into a buffer: `Value::to_string` goes through `fmt` (8 % of a
            // backfill's CPU in a profile).
            data: serde_json::to_string(value).map_err(|e| {
                Error::mapping(
                    self.kind,
                    fields.id,
                    "<root>",
                    format!("cannot be written: {e}"),
                )
            })?,
            created: fields.i64("created")?,
            typed,
            columns: self.columns,
            children: Vec::new(),
            children_complete: false,
        };
        if let Some(children) = self.children
            && with_children
            && !row.deleted
        {
            row.children = child_rows(children, &row, &fields)?;
            row.children_complete = (children.complete)(&fields);
        }
        Ok(row)
    }

    /// Whether an id of this kind can be used again once its object is deleted: a
    /// product's (the host may choose it), and a legacy plan's, kept as a price row. A
    /// customer's or a subscription's is Stripe's and never comes back.
    fn ids_come_back(&self) -> bool {
        matches!(self.kind, "product" | "price")
    }

    /// The upsert statements, built once. `?` marks each bind; [`Bound`] turns it into
    /// the backend's placeholder, so one text serves SQLite and Postgres.
    fn statements(&self) -> &Statements {
        self.sql.get_or_init(|| {
            let t = self.table;
            let cols: Vec<&str> = COMMON.iter().chain(self.columns).copied().collect();
            let insert = format!(
                "INSERT INTO {t} ({}) VALUES ({}) ON CONFLICT (id) DO UPDATE SET ",
                cols.join(", "),
                vec!["?"; cols.len()].join(", ")
            );
            // Each column and the value an update gives it.
            let sets: Vec<(&str, String)> = cols[1..]
                .iter()
                .map(|c| {
                    let kept = self.keep_when_null.iter().find(|(k, _)| k == c);
                    let value = match kept {
                        Some((_, Some(from))) => format!(
                            "CASE WHEN excluded.{c} IS NULL AND excluded.{from} = FALSE \
                             AND {t}.{from} = TRUE THEN NULL ELSE COALESCE(excluded.{c}, {t}.{c}) END"
                        ),
                        // The flag of another kept column: once true, the object alone
                        // decides that column from then on.
                        Some((_, None))
                            if self.keep_when_null.iter().any(|(_, f)| *f == Some(*c)) =>
                        {
                            format!(
                                "CASE WHEN {t}.{c} = TRUE THEN TRUE \
                                 ELSE COALESCE(excluded.{c}, {t}.{c}) END"
                            )
                        }
                        Some((_, None)) => format!("COALESCE(excluded.{c}, {t}.{c})"),
                        None if *c == "created" => format!("COALESCE(excluded.{c}, {t}.{c})"),
                        None => format!("excluded.{c}"),
                    };
                    (*c, value)
                })
                .collect();
            fn assign<'s>(sets: impl IntoIterator<Item = &'s (&'s str, String)>) -> String {
                let sets: Vec<String> = sets
                    .into_iter()
                    .map(|(c, value)| format!("{c} = {value}"))
                    .collect();
                sets.join(", ")
            }
            let live = if self.final_tombstones {
                format!("{t}.deleted = FALSE")
            } else {
                "TRUE".to_owned()
            };
            let revive = format!("{insert}{}", assign(&sets));
            let upsert = format!("{revive} WHERE {live}");
            // Newer stamp, or the same stamp from a later source; an update and a
            // fetch (or two of either) in one second are left to `settle_tie`.
            let fresher = format!(
                "({t}.stamp < excluded.stamp OR ({t}.stamp = excluded.stamp AND \
                 {t}.stamp_rank < excluded.stamp_rank AND NOT ({t}.stamp_rank = {u} AND excluded.stamp_rank = {f})))",
                u = Source::Updated as i32,
                f = Source::Fetched as i32
            );
            let indexed = INDEXED
                .iter()
                .find(|(table, _)| *table == t)
                .map_or(&[][..], |(_, columns)| *columns);
            let (held, other): (Vec<_>, Vec<_>) =
                sets.iter().partition(|(c, _)| indexed.contains(c));
            let narrow = (!held.is_empty()).then(|| {
                let same = held
                    .iter()
                    .map(|(c, value)| format!("{t}.{c} IS ({value})"))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let forced = format!("{insert}{} WHERE {live} AND {same}", assign(other));
                (format!("{forced} AND {fresher}"), forced)
            });
            Statements {
                live: format!("{upsert} AND {fresher}"),
                narrow,
                forced: upsert,
                // Whatever its stamp, but not over a live row an event of a later
                // second wrote: an object made again under the id (a product's, a
                // plan's), which the old one's late deletion (a retry Stripe kept
                // sending while the endpoint failed) must not delete. Of those ids,
                // not over a row a fetch of a later second wrote either; other rows
                // written by a fetch, or handed in by the host (stamped by its clock,
                // which may run ahead), are deleted: their ids never come back. A
                // fetch's stamp can be up to a second after Stripe read the object: a
                // deletion racing a fetch still wins over it.
                delete: format!(
                    "{insert}deleted = TRUE, synced_at = excluded.synced_at, reconcile = FALSE, \
                     stamp = CASE WHEN excluded.stamp > {t}.stamp THEN excluded.stamp ELSE {t}.stamp END \
                     WHERE {t}.deleted OR {t}.stamp <= excluded.stamp \
                     OR ({t}.stamp_rank NOT IN ({c}, {u}) AND {fetched})",
                    c = Source::Created as i32,
                    u = Source::Updated as i32,
                    fetched = if self.ids_come_back() {
                        format!("{t}.stamp <= excluded.stamp + 1")
                    } else {
                        "TRUE".to_owned()
                    }
                ),
                revive,
            }
        })
    }

    /// Writes `row` through the guard. Children are written only when the parent
    /// applied. Call inside a transaction: on a tie the row is read and maybe written
    /// again, under the lock the first statement took.
    pub(crate) fn write(&self, conn: &mut Conn<'_>, row: &Row, value: &Value) -> Result<Written> {
        let stmts = self.statements();
        let binds = row.binds();
        let before = crate::access::changes::before_write(conn, self, row)?;
        let written = if row.deleted {
            match execute(conn, &stmts.delete, &binds)? {
                0 => self.deletion_refused(conn, &row.id)?,
                _ => Written::Applied,
            }
        } else if self.upsert(conn, false, &binds)? > 0 {
            Written::Applied
        } else {
            self.settle_tie(conn, row, value, &binds)?
        };
        if let Some(children) = self.children
            && written == Written::Applied
            && !row.deleted
        {
            self.write_children(conn, children, row)?;
        }
        if written == Written::Applied {
            crate::access::changes::after_write(conn, self, row, before)?;
            // Part of the object: kept (the newest Stripe sent) and flagged, so the
            // webhook's follow-up or `reconcile` fetches it whole.
            if self.is_partial(value) {
                self.flag(conn, &row.id)?;
            }
        }
        Ok(written)
    }

    /// Runs the guarded upsert (`forced`: without the freshness guard), on SQLite first
    /// in its narrow form: an update that leaves every indexed column as it is writes
    /// no index page. When it applies nothing (a new value for an indexed column, or
    /// the guard refused), the whole form runs as on Postgres, whose updates keep
    /// unchanged index entries by themselves. Returns the rows written.
    fn upsert(&self, conn: &mut Conn<'_>, forced: bool, binds: &[SqlValue]) -> Result<usize> {
        let stmts = self.statements();
        #[cfg(feature = "sqlite")]
        if let (Conn::Sqlite(_), Some((live, unguarded))) = (&*conn, &stmts.narrow) {
            let written = execute(conn, if forced { unguarded } else { live }, binds)?;
            if written > 0 {
                return Ok(written);
            }
        }
        execute(
            conn,
            if forced { &stmts.forced } else { &stmts.live },
            binds,
        )
    }

    /// A deletion the guard refused. Over a live row of an id that can come back,
    /// written by a fetch of a later second, it is the old object's (the row holds one
    /// made again), unless that fetch's stamp ran late: undecided and flagged, so the
    /// webhook's follow-up (or `reconcile`) asks Stripe, whose 404 or live object
    /// settles it.
    fn deletion_refused(&self, conn: &mut Conn<'_>, id: &str) -> Result<Written> {
        if !self.ids_come_back() {
            return Ok(Written::Kept);
        }
        let fetched = self.current(conn, id)?.is_some_and(|c| {
            !c.deleted && Source::from_rank(c.stamp_rank) == Some(Source::Fetched)
        });
        if !fetched {
            return Ok(Written::Kept);
        }
        self.flag(conn, id)?;
        Ok(Written::Undecided)
    }

    /// Whether `value` holds only part of the object ([`MirrorTable::partial`]).
    pub(crate) fn is_partial(&self, value: &Value) -> bool {
        self.partial.is_some_and(|partial| partial(value))
    }

    /// The guard refused `row`: when it was a same-second tie between updates and
    /// fetches, decide by what the events carry ([`order_tie`]); what nothing decides
    /// is kept and flagged for reconcile.
    fn settle_tie(
        &self,
        conn: &mut Conn<'_>,
        row: &Row,
        value: &Value,
        binds: &[SqlValue],
    ) -> Result<Written> {
        let Some(current) = self.current(conn, &row.id)? else {
            return Ok(Written::Kept);
        };
        // The row as it is, the same as the row a fetch saw before it was asked for.
        let unchanged = |seen: &Seen| {
            (seen.stamp, seen.rank, seen.data.as_str())
                == (current.stamp, current.stamp_rank, current.data.as_str())
        };
        if current.deleted && self.final_tombstones {
            // Final against anything from before the deletion or of its second. Products
            // and plans take ids of the caller's choosing, so an object can be made
            // again under a deleted one's id: a `*.created` event of a later second, or
            // a fetch asked for once the tombstone was stored (Stripe had deleted the
            // object by then, so a live answer is the new one), bring the row back.
            let remade = !row.deleted
                && match row.stamp.source {
                    Source::Created => {
                        row.stamp.at > current.stamp
                            || row.stamp.settles.as_ref().is_some_and(unchanged)
                    }
                    Source::Fetched => row.stamp.settles.as_ref().is_some_and(unchanged),
                    Source::Updated | Source::Deleted => false,
                };
            if !remade {
                return Ok(Written::Kept);
            }
            execute(conn, &self.statements().revive, binds)?;
            return Ok(Written::Applied);
        }
        // One change sent twice in one second in two shapes, one of them partial (a
        // plan's event and its price's): the whole shape wins whichever came first, even
        // with no API key to fetch it. Two versions of one shape (a subscription's
        // events) are not this: their order is `order_tie`'s to find.
        let other_shape = |held: &Value| held.get("object") != value.get("object");
        if current.stamp == row.stamp.at
            && current.stamp_rank == row.stamp.source as i32
            && self.partial.is_some()
            && !self.is_partial(value)
            && serde_json::from_str::<Value>(&current.data)
                .is_ok_and(|held| self.is_partial(&held) && other_shape(&held))
        {
            execute(conn, &self.statements().forced, binds)?;
            return Ok(Written::Applied);
        }
        let in_play = |s: Option<Source>| matches!(s, Some(Source::Updated | Source::Fetched));
        let tie = current.stamp == row.stamp.at
            && in_play(Some(row.stamp.source))
            && in_play(Source::from_rank(current.stamp_rank));
        if !tie {
            return Ok(Written::Kept);
        }
        if row.stamp.settles.as_ref().is_some_and(unchanged) {
            execute(conn, &self.statements().forced, binds)?;
            return Ok(Written::Applied);
        }
        let held_data: Value = serde_json::from_str(&current.data).unwrap_or(Value::Null);
        let held_previous = match &current.stamp_event {
            Some(event) => crate::webhooks::event::previous_attributes(conn, event)?,
            None => None,
        };
        let held = (held_previous.as_ref(), &held_data);
        match order_tie((row.stamp.previous.as_ref(), value), held) {
            Some(true) => {
                execute(conn, &self.statements().forced, binds)?;
                Ok(Written::Applied)
            }
            Some(false) => Ok(Written::Kept),
            None => {
                self.flag(conn, &row.id)?;
                tracing::info!(object = self.kind, id = %row.id, stamp = row.stamp.at,
                    "same-second versions could not be ordered; flagged for reconcile");
                Ok(Written::Undecided)
            }
        }
    }

    /// Flags the row `reconcile`: what it holds cannot be vouched for until it is
    /// re-fetched (a same-second tie, a partial payload).
    pub(crate) fn flag(&self, conn: &mut Conn<'_>, id: &str) -> Result<()> {
        execute(
            conn,
            &format!("UPDATE {} SET reconcile = TRUE WHERE id = ?", self.table),
            &[SqlValue::Text(Some(id.to_owned()))],
        )?;
        Ok(())
    }

    /// The row id of a Stripe object of this table (its `id`, or the field named by
    /// `id_from`), when it has one.
    pub(crate) fn id_in(&self, object: &Value) -> Option<String> {
        let id = match self.id_from {
            Some(field) if object.get("id").is_none() => id_field(object, field)?,
            _ => object.get("id")?,
        };
        Some(id.as_str()?.to_owned())
    }

    /// The row's version, read before fetching it ([`Stamp::fetched_over`]).
    pub(crate) fn seen(&self, conn: &mut Conn<'_>, id: &str) -> Result<Option<Seen>> {
        Ok(self.current(conn, id)?.map(|c| Seen {
            stamp: c.stamp,
            rank: c.stamp_rank,
            data: c.data,
        }))
    }

    fn current(&self, conn: &mut Conn<'_>, id: &str) -> Result<Option<Current>> {
        let sql = format!(
            "SELECT stamp, stamp_rank, stamp_event, data, deleted FROM {} WHERE id = ?",
            self.table
        );
        let values = [SqlValue::Text(Some(id.to_owned()))];
        Ok(on_conn!(conn, c => Bound::new(&sql, &values).get_result(c).optional())?)
    }

    /// Writes a parent's children. The parent's write decided freshness (its row is
    /// locked in this transaction, and a child never changes parent), so children
    /// follow it without a guard of their own.
    fn write_children(&self, conn: &mut Conn<'_>, children: &Children, parent: &Row) -> Result<()> {
        let table = children.table;
        // Children no longer listed are gone from the parent: tombstone them, when the
        // parent lists them all.
        let mut gone = parent.children_complete.then(|| {
            let (t, pc) = (table.table, children.parent_column);
            let mut sql = format!(
                "UPDATE {t} SET deleted = TRUE, stamp = ? WHERE {pc} = ? AND deleted = FALSE"
            );
            let mut binds = vec![
                SqlValue::Int(Some(parent.stamp.at)),
                SqlValue::Text(Some(parent.id.clone())),
            ];
            if !parent.children.is_empty() {
                sql.push_str(&format!(
                    " AND id NOT IN ({})",
                    vec!["?"; parent.children.len()].join(", ")
                ));
                binds.extend(
                    parent
                        .children
                        .iter()
                        .map(|r| SqlValue::Text(Some(r.id.clone()))),
                );
            }
            (sql, binds)
        });
        // On Postgres the tombstones ride with the last child's upsert, one round trip
        // fewer. The two parts never meet on a row: the `NOT IN` list holds every child's
        // id, this one's too (a narrower list would have the statement write a row
        // twice). Their order within the statement is Postgres' to choose; nothing here
        // relies on it.
        let ride: Option<usize> = match conn {
            #[cfg(feature = "postgres")]
            Conn::Postgres(_) => parent.children.len().checked_sub(1),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        for (i, row) in parent.children.iter().enumerate() {
            if Some(i) == ride
                && let Some((sql, mut binds)) = gone.take()
            {
                let sql = format!("WITH gone AS ({sql}) {}", table.statements().forced);
                binds.extend(row.binds());
                execute(conn, &sql, &binds)?;
                continue;
            }
            table.upsert(conn, true, &row.binds())?;
        }
        if let Some((sql, binds)) = gone {
            execute(conn, &sql, &binds)?;
        }
        Ok(())
    }
}

/// A parent's children as rows, in id order (a fixed order keeps concurrent writers of
/// overlapping rows from deadlocking), each stamped like its parent.
fn child_rows(children: &Children, parent: &Row, fields: &Fields<'_>) -> Result<Vec<Row>> {
    let table = children.table;
    let parent_at = table
        .columns
        .iter()
        .position(|c| *c == children.parent_column)
        .expect("parent column");
    let mut rows = Vec::new();
    for child in (children.list)(fields)? {
        // Checked for U+0000 with its parent.
        let mut row = table.map(
            child,
            parent.stamp.clone(),
            Some(parent.livemode),
            Nul::Absent,
        )?;
        // The parent id is authoritative even when the child omits it.
        row.typed[parent_at] = SqlValue::Text(Some(parent.id.clone()));
        rows.push(row);
    }
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(rows)
}

/// `value` with `id` copied from `field` (a string, or an expanded object's id).
fn with_id_from(value: &Value, field: &str) -> Value {
    let mut keyed = value.clone();
    let id = id_field(value, field).cloned();
    if let (Some(map), Some(id)) = (keyed.as_object_mut(), id) {
        map.insert("id".to_owned(), id);
    }
    keyed
}

/// The id held by `field`: the field itself, or its `id` when it is expanded.
fn id_field<'a>(value: &'a Value, field: &str) -> Option<&'a Value> {
    match value.get(field)? {
        Value::Object(o) => o.get("id"),
        other => Some(other),
    }
}

/// The id `field` names, as text ([`id_field`]); an empty id is none.
pub(crate) fn id_named<'a>(value: &'a Value, field: &str) -> Option<&'a str> {
    id_field(value, field)?.as_str().filter(|id| !id.is_empty())
}

/// Orders two versions of an object stamped in the same second, each given as its
/// event's `previous_attributes` (`None` for fetched data) and its data: `Some(true)`
/// when the incoming one is newer, `Some(false)` when the held one is, `None` when
/// nothing they carry says.
///
/// - An update whose `previous_attributes` describe the other version comes right
///   after it. Two updates are ordered only when exactly one describes the other
///   (a change and its reversal in one second describe each other: undecided).
/// - A fetch that shows an update's new values (on the fields the update changed)
///   came after it; one that shows its old values, before it. Else undecided (an
///   update between them is missing).
/// - Two different fetches in one second: undecided (equal ones: nothing to do).
pub(crate) fn order_tie(
    incoming: (Option<&Value>, &Value),
    held: (Option<&Value>, &Value),
) -> Option<bool> {
    let ((in_prev, in_data), (held_prev, held_data)) = (incoming, held);
    // Does `prev` (the previous values of the version `data`) describe `other`?
    let follows = |prev: Option<&Value>, other: &Value| prev.map(|p| describes(p, other));
    // Does `other` show the new values of the change `prev` made to reach `data`?
    let includes = |prev: Option<&Value>, data: &Value, other: &Value| {
        prev.is_some_and(|p| non_empty(p) && same_on(p, data, other))
    };
    match (in_prev, held_prev) {
        (Some(_), Some(_)) => match (follows(in_prev, held_data), follows(held_prev, in_data)) {
            (Some(true), Some(false)) => Some(true),
            (Some(false), Some(true)) => Some(false),
            _ => None,
        },
        // Incoming update, held fetch.
        (Some(_), None) => {
            if follows(in_prev, held_data) == Some(true) && !includes(in_prev, in_data, held_data) {
                Some(true)
            } else if includes(in_prev, in_data, held_data) {
                Some(false)
            } else {
                None
            }
        }
        // Incoming fetch, held update.
        (None, Some(_)) => {
            if follows(held_prev, in_data) == Some(true) && !includes(held_prev, held_data, in_data)
            {
                Some(false)
            } else if includes(held_prev, held_data, in_data) {
                Some(true)
            } else {
                None
            }
        }
        (None, None) => (in_data == held_data).then_some(false),
    }
}

fn non_empty(previous: &Value) -> bool {
    previous.as_object().is_some_and(|o| !o.is_empty())
}

/// Whether `a` and `b` agree on every field `previous` names (nested objects field by
/// field, a missing field equal to `null`).
fn same_on(previous: &Value, a: &Value, b: &Value) -> bool {
    match previous {
        Value::Object(fields) if !fields.is_empty() => fields.iter().all(|(k, v)| {
            same_on(
                v,
                a.get(k).unwrap_or(&Value::Null),
                b.get(k).unwrap_or(&Value::Null),
            )
        }),
        _ => a == b,
    }
}

/// Whether `previous` (an event's `previous_attributes`) describes `current`: every
/// field it names holds that value (nested objects compared field by field, a missing
/// field equal to `null`, an empty object equal to an empty or missing one). An empty
/// `previous` describes nothing.
pub(crate) fn describes(previous: &Value, current: &Value) -> bool {
    fn matches(previous: &Value, current: &Value) -> bool {
        match previous {
            Value::Object(fields) if fields.is_empty() => {
                current.is_null() || current.as_object().is_some_and(|o| o.is_empty())
            }
            Value::Object(fields) => fields
                .iter()
                .all(|(k, v)| matches(v, current.get(k).unwrap_or(&Value::Null))),
            _ => previous == current,
        }
    }
    non_empty(previous) && matches(previous, current)
}

/// Declares a [`MirrorTable`] static.
macro_rules! mirror_table {
    ($name:ident { $($field:ident : $value:expr),* $(,)? }) => {
        pub(crate) static $name: $crate::sync::upsert::MirrorTable = $crate::sync::upsert::MirrorTable {
            $($field: $value,)*
            sql: std::sync::OnceLock::new(),
        };
    };
}
pub(crate) use mirror_table;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// On SQLite an update that keeps a customer's indexed columns (subscriber and
    /// mode), of a subscriber still marked, writes two pages: its row's and its
    /// subscriber's access row's. One moving it to another subscriber also writes the
    /// customers' subscriber index and `idx_access_dirty` (the new subscriber's entry).
    /// (Before the narrow statements the first wrote 5 pages: the customers' two
    /// indexes, email then one of them, and `idx_access_dirty` were rewritten with the
    /// same values.) Counted in WAL frames, one per page a commit writes.
    #[cfg(feature = "sqlite")]
    #[test]
    fn an_update_keeping_the_indexed_columns_writes_no_index_page() {
        use crate::models::customer::CUSTOMERS;
        use diesel::Connection;
        use diesel::connection::SimpleConnection;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages.db");
        let db = crate::db::Database::open(
            &format!("sqlite://{}", path.display()),
            1,
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        db.migrate().unwrap();
        drop(db);
        let mut c = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        c.batch_execute("PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0")
            .unwrap();
        let wal = path.with_extension("db-wal");
        let customer = |at: i64, subscriber: &str| {
            json!({"id": "cus_pages", "object": "customer", "livemode": false, "created": 1,
                "email": format!("v{at}@example.com"), "name": format!("v{at}"),
                "metadata": {"stripe_mirror_subscriber": subscriber}})
        };
        // Pages the write of the customer's version at `at` adds to the WAL.
        let mut pages = |at: i64, subscriber: &str| {
            c.batch_execute("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
            let value = customer(at, subscriber);
            let row = CUSTOMERS.row(&value, Stamp::fetched(at), None).unwrap();
            let written = Conn::Sqlite(&mut c)
                .write(|conn| CUSTOMERS.write(conn, &row, &value))
                .unwrap();
            assert_eq!(written, Written::Applied, "version {at}");
            let bytes = std::fs::metadata(&wal).unwrap().len();
            (bytes.saturating_sub(32)) / (4096 + 24)
        };
        pages(1, "u1");
        let same = pages(2, "u1");
        let moved = pages(3, "u2");
        assert_eq!((same, moved), (2, 4), "pages: same subscriber, another one");
        // What was written is the newest version, whichever statement wrote it.
        let stored: String = {
            use diesel::RunQueryDsl;
            #[derive(diesel::QueryableByName)]
            struct T {
                #[diesel(sql_type = Text)]
                t: String,
            }
            diesel::sql_query(
                "SELECT email || ' ' || name || ' ' || subscriber_id AS t FROM stripe_customers",
            )
            .get_result::<T>(&mut c)
            .unwrap()
            .t
        };
        assert_eq!(stored, "v3@example.com v3 u2");
    }

    #[test]
    fn previous_attributes_describe_a_row_field_by_field() {
        let row = json!({"status": "active", "metadata": {"a": "1"}, "quantity": 2});
        assert!(describes(&json!({"status": "active"}), &row));
        assert!(describes(&json!({"metadata": {"a": "1"}}), &row));
        // A key added since: its previous value is null, as is a missing field.
        assert!(describes(&json!({"metadata": {"b": null}}), &row));
        assert!(!describes(&json!({"status": "incomplete"}), &row));
        assert!(!describes(
            &json!({"status": "active", "quantity": 1}),
            &row
        ));
        // Nothing said describes nothing.
        assert!(!describes(&json!({}), &row));
        assert!(!describes(&json!(null), &row));
    }

    #[test]
    fn same_second_versions_are_ordered_by_what_they_changed() {
        let (inc, act, due) = (
            json!({"status": "incomplete"}),
            json!({"status": "active"}),
            json!({"status": "past_due"}),
        );
        // Two updates: the one whose old values are the other's data is newer.
        assert_eq!(
            order_tie((Some(&act), &due), (Some(&inc), &act)),
            Some(true)
        );
        assert_eq!(
            order_tie((Some(&inc), &act), (Some(&act), &due)),
            Some(false)
        );
        // A change and its reversal in one second describe each other: undecided.
        assert_eq!(order_tie((Some(&act), &due), (Some(&due), &act)), None);
        // Neither carries previous_attributes: undecided.
        assert_eq!(order_tie((None, &due), (None, &act)), None);
        assert_eq!(order_tie((None, &act), (None, &act)), Some(false));
        // An update against a fetch: before it, after it, or a missing step between.
        assert_eq!(order_tie((Some(&inc), &act), (None, &inc)), Some(true));
        assert_eq!(order_tie((Some(&inc), &act), (None, &act)), Some(false));
        assert_eq!(order_tie((Some(&inc), &act), (None, &due)), None);
        assert_eq!(order_tie((None, &inc), (Some(&inc), &act)), Some(false));
        assert_eq!(order_tie((None, &act), (Some(&inc), &act)), Some(true));
        assert_eq!(order_tie((None, &due), (Some(&inc), &act)), None);
    }

    #[test]
    fn sources_order_by_event_type() {
        assert_eq!(
            Source::of_event("customer.subscription.created"),
            Source::Created
        );
        assert_eq!(
            Source::of_event("customer.subscription.deleted"),
            Source::Deleted
        );
        assert_eq!(
            Source::of_event("customer.subscription.paused"),
            Source::Updated
        );
        assert!(
            Source::Created < Source::Updated
                && Source::Updated < Source::Fetched
                && Source::Fetched < Source::Deleted
        );
        assert_eq!(Source::from_rank(3), Some(Source::Fetched));
        assert_eq!(Source::from_rank(0), None);
    }
}
