//! The one write path for every mirrored object: JSON to row, stale-write guard,
//! tombstones, upsert. Each model describes its table with a [`MirrorTable`]; this
//! file turns that description into SQL, once per table and backend.
//!
//! The guard lives in the SQL itself (`ON CONFLICT ... DO UPDATE ... WHERE`), so it
//! holds under concurrent writers without a read-then-write race:
//! - a live write applies only if the row is not a tombstone and its `stamp` is not newer;
//! - a deleting write marks the row deleted whatever its stamp (deletion is final in
//!   Stripe) and keeps the last full data seen.

use std::sync::OnceLock;

use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, Bool, HasSqlType, Nullable, Text};
use serde_json::Value;

use crate::db::{Conn, on_conn};
use crate::error::{Error, Result};
use crate::sync::fields::Fields;

/// A typed column value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SqlValue {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(Option<bool>),
}

/// How one kind of Stripe object maps to its table.
pub(crate) struct MirrorTable {
    /// The object kind, for messages: `customer`.
    pub kind: &'static str,
    /// The table: `stripe_customers`.
    pub table: &'static str,
    /// Where the object lives in the Stripe API (`/customers`); `None` for objects only
    /// mirrored inside their parent.
    pub api_path: Option<&'static str>,
    /// The `object` values accepted (`price` also takes the legacy `plan`).
    pub accepts: &'static [&'static str],
    /// The typed columns, in the order `extract` returns them.
    pub columns: &'static [&'static str],
    /// Typed columns a later write with no value must not clear (set by other paths).
    pub keep_when_null: &'static [&'static str],
    /// Reads the typed column values from the object.
    pub extract: fn(&Fields<'_>) -> Result<Vec<SqlValue>>,
    /// Whether a tombstone is final. True for objects Stripe deletes for good; false
    /// for children tombstoned only because they left their parent's list, which fresher
    /// parent data may list again.
    pub final_tombstones: bool,
    /// Nested objects mirrored with the parent (a subscription's items).
    pub children: Option<&'static Children>,
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
}

pub(crate) struct Statements {
    live: String,
    delete: String,
}

/// A row ready to write.
#[derive(Debug)]
pub(crate) struct Row {
    pub id: String,
    pub deleted: bool,
    values: Vec<SqlValue>,
}

/// Unix seconds now: the stamp of data fetched from the API.
pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

const COMMON: [&str; 7] = [
    "id",
    "livemode",
    "data",
    "deleted",
    "stamp",
    "synced_at",
    "created",
];

impl MirrorTable {
    /// Maps a Stripe object to a row of this table.
    pub(crate) fn row(
        &self,
        value: &Value,
        stamp: i64,
        livemode_hint: Option<bool>,
    ) -> Result<Row> {
        let fields = Fields::new(self.kind, value)?;
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
        let livemode = fields.bool("livemode")?.or(livemode_hint).unwrap_or(false);
        let mut values = vec![
            SqlValue::Text(Some(fields.id.to_owned())),
            SqlValue::Bool(Some(livemode)),
            SqlValue::Text(Some(value.to_string())),
            SqlValue::Bool(Some(fields.deleted)),
            SqlValue::Int(Some(stamp)),
            SqlValue::Int(Some(now())),
            SqlValue::Int(fields.i64("created")?),
        ];
        let typed = (self.extract)(&fields)?;
        debug_assert_eq!(
            typed.len(),
            self.columns.len(),
            "{} extract/columns mismatch",
            self.kind
        );
        values.extend(typed);
        Ok(Row {
            id: fields.id.to_owned(),
            deleted: fields.deleted,
            values,
        })
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
            let sets: Vec<String> = cols[1..]
                .iter()
                .map(|c| {
                    if *c == "created" || self.keep_when_null.contains(c) {
                        format!("{c} = COALESCE(excluded.{c}, {t}.{c})")
                    } else {
                        format!("{c} = excluded.{c}")
                    }
                })
                .collect();
            Statements {
                live: format!(
                    "{insert}{} WHERE {}{t}.stamp <= excluded.stamp",
                    sets.join(", "),
                    if self.final_tombstones { format!("{t}.deleted = FALSE AND ") } else { String::new() }
                ),
                delete: format!(
                    "{insert}deleted = TRUE, synced_at = excluded.synced_at, \
                     stamp = CASE WHEN excluded.stamp > {t}.stamp THEN excluded.stamp ELSE {t}.stamp END"
                ),
            }
        })
    }

    /// Writes `row` through the guard; true when the row changed. Children are
    /// written only when the parent write applied. Call inside a transaction.
    pub(crate) fn write(&self, conn: &mut Conn<'_>, row: &Row, value: &Value) -> Result<bool> {
        let stmts = self.statements();
        let sql = if row.deleted {
            &stmts.delete
        } else {
            &stmts.live
        };
        let changed = execute(conn, sql, &row.values)? > 0;
        if let Some(children) = self.children
            && changed
            && !row.deleted
        {
            self.write_children(conn, children, row, value)?;
        }
        Ok(changed)
    }

    fn write_children(
        &self,
        conn: &mut Conn<'_>,
        children: &Children,
        parent: &Row,
        value: &Value,
    ) -> Result<()> {
        let fields = Fields::new(self.kind, value)?;
        let livemode = match &parent.values[1] {
            SqlValue::Bool(b) => *b,
            _ => None,
        };
        let stamp = match &parent.values[4] {
            SqlValue::Int(Some(s)) => *s,
            _ => now(),
        };
        let mut rows = Vec::new();
        for child in (children.list)(&fields)? {
            let mut row = children.table.row(child, stamp, livemode)?;
            // The parent id is authoritative even when the child omits it.
            let at = COMMON.len()
                + children
                    .table
                    .columns
                    .iter()
                    .position(|c| *c == children.parent_column)
                    .expect("parent column");
            row.values[at] = SqlValue::Text(Some(parent.id.clone()));
            rows.push((row, child));
        }
        // A fixed order keeps concurrent writers of overlapping rows from deadlocking.
        rows.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        for (row, child) in &rows {
            children.table.write(conn, row, child)?;
        }
        // Children no longer listed are gone from the parent: tombstone them.
        let (t, pc) = (children.table.table, children.parent_column);
        let mut sql = format!(
            "UPDATE {t} SET deleted = TRUE, stamp = ? WHERE {pc} = ? AND deleted = FALSE AND stamp <= ?"
        );
        let mut binds = vec![
            SqlValue::Int(Some(stamp)),
            SqlValue::Text(Some(parent.id.clone())),
            SqlValue::Int(Some(stamp)),
        ];
        if !rows.is_empty() {
            sql.push_str(&format!(
                " AND id NOT IN ({})",
                vec!["?"; rows.len()].join(", ")
            ));
            binds.extend(rows.iter().map(|(r, _)| SqlValue::Text(Some(r.id.clone()))));
        }
        execute(conn, &sql, &binds)?;
        Ok(())
    }
}

/// A statement whose `?` marks are bound to `values` in order. Unlike `sql_query`,
/// diesel may cache its prepared form: the text is fixed per table, so each upsert
/// is parsed and planned once per connection.
struct Bound<'a> {
    sql: &'a str,
    values: &'a [SqlValue],
}

impl QueryId for Bound<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<DB> QueryFragment<DB> for Bound<'_>
where
    DB: diesel::backend::Backend + HasSqlType<Text> + HasSqlType<BigInt> + HasSqlType<Bool>,
    Option<String>: ToSql<Nullable<Text>, DB>,
    Option<i64>: ToSql<Nullable<BigInt>, DB>,
    Option<bool>: ToSql<Nullable<Bool>, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        let mut values = self.values.iter();
        for (i, piece) in self.sql.split('?').enumerate() {
            if i > 0 {
                match values.next() {
                    Some(SqlValue::Text(v)) => out.push_bind_param::<Nullable<Text>, _>(v)?,
                    Some(SqlValue::Int(v)) => out.push_bind_param::<Nullable<BigInt>, _>(v)?,
                    Some(SqlValue::Bool(v)) => out.push_bind_param::<Nullable<Bool>, _>(v)?,
                    None => {
                        return Err(diesel::result::Error::QueryBuilderError(
                            "fewer values than `?` marks".into(),
                        ));
                    }
                }
            }
            out.push_sql(piece);
        }
        Ok(())
    }
}

impl<C> RunQueryDsl<C> for Bound<'_> {}

/// Runs a statement with `?`-marked binds on either backend.
pub(crate) fn execute(conn: &mut Conn<'_>, sql: &str, values: &[SqlValue]) -> Result<usize> {
    Ok(on_conn!(conn, c => Bound { sql, values }.execute(c))?)
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
