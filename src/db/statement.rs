//! SQL written as text with `?` binds, which diesel still keeps prepared.
//!
//! `diesel::sql_query` is parsed and planned anew on every run. The statements here are
//! cached by their text on each connection: the hot ones (an upsert per table, the
//! event's store-and-claim, access marking) are parsed once per connection, which on
//! Postgres also saves the server a parse and a plan per webhook.
//!
//! Lookups by key anywhere in the crate use diesel's `get_result`, not `first`. The
//! bundled SQLite (3.50; `sqlite3ExprIsInteger` in its source) builds a bound
//! `LIMIT ?` into the statement as a constant, and parses and plans it again whenever
//! that value is bound anew, which `first` does on every run (`tests/prepared.rs`).

use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, Bool, HasSqlType, Nullable, Text, Untyped};

use crate::db::{Conn, on_conn};
use crate::error::Result;

/// A typed bind value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SqlValue {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(Option<bool>),
}

/// A statement whose `?` marks are bound to `values` in order (`$1, $2, ...` on
/// Postgres). Its rows load into any `QueryableByName` type, like `sql_query`'s.
pub(crate) struct Bound<'a> {
    sql: &'a str,
    values: &'a [SqlValue],
}

impl<'a> Bound<'a> {
    /// `sql` must hold exactly one `?` per value, and no `?` of its own.
    pub(crate) fn new(sql: &'a str, values: &'a [SqlValue]) -> Self {
        Bound { sql, values }
    }
}

impl QueryId for Bound<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Bound<'_> {
    type SqlType = Untyped;
}

impl<DB> QueryFragment<DB> for Bound<'_>
where
    DB: diesel::backend::Backend + HasSqlType<Text> + HasSqlType<BigInt> + HasSqlType<Bool>,
    Option<String>: ToSql<Nullable<Text>, DB>,
    Option<i64>: ToSql<Nullable<BigInt>, DB>,
    Option<bool>: ToSql<Nullable<Bool>, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        // diesel walks a statement several times per run (its text for the cache key,
        // the cache check, the binds): the marks are found with `memchr`.
        let mut values = self.values.iter();
        let mut start = 0;
        for mark in memchr::memchr_iter(b'?', self.sql.as_bytes()) {
            out.push_sql(&self.sql[start..mark]);
            start = mark + 1;
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
        out.push_sql(&self.sql[start..]);
        if values.next().is_some() {
            return Err(diesel::result::Error::QueryBuilderError(
                "more values than `?` marks".into(),
            ));
        }
        Ok(())
    }
}

impl<C> RunQueryDsl<C> for Bound<'_> {}

/// Runs a statement with `?`-marked binds on either backend.
pub(crate) fn execute(conn: &mut Conn<'_>, sql: &str, values: &[SqlValue]) -> Result<usize> {
    Ok(on_conn!(conn, c => Bound::new(sql, values).execute(c))?)
}
