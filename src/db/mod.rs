//! Storage: one pool over SQLite or Postgres ([`DbPool`], the crate's own or the host
//! app's), the embedded migrations, the diesel [`schema`] of the mirror's tables, and
//! the `Conn` handle the rest of the crate queries through.
//!
//! Diesel is synchronous, so every piece of database work runs on tokio's blocking
//! pool (`Database::run`); the async executor never waits on a query. Code that
//! queries is written once and compiled for each backend by the `on_conn!` macro,
//! which keeps this a thin enum rather than a generic maze of trait bounds.

pub(crate) mod batch;
#[cfg(feature = "sqlite")]
pub(crate) mod received;
pub mod schema;
pub(crate) mod statement;

use std::time::Duration;

#[cfg(feature = "postgres")]
use diesel::PgConnection;
#[cfg(feature = "sqlite")]
use diesel::SqliteConnection;
#[cfg(feature = "sqlite")]
use diesel::connection::SimpleConnection;
#[cfg(feature = "postgres")]
use diesel::prelude::*;
#[cfg(feature = "sqlite")]
use diesel::r2d2::CustomizeConnection;
use diesel::r2d2::{self, ConnectionManager};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::error::{Error, Result};

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("stripe-mirror needs at least one database feature: `sqlite` or `postgres`");

#[cfg(feature = "sqlite")]
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
#[cfg(feature = "postgres")]
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Which database a [`Mirror`](crate::Mirror) stores into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// An embedded SQLite file (WAL mode): the default, for one machine.
    Sqlite,
    /// A PostgreSQL server: for production and several app instances.
    Postgres,
}

/// How long a Postgres writer's statement waits for a row lock by default: two
/// writers' groups can lock the same customer and access rows in opposite orders (a
/// group orders its work by event id only), and Postgres would break that deadlock
/// only after its `deadlock_timeout` (1 s), both groups stalled meanwhile. A wait
/// between groups lasts a commit (milliseconds); one this long is a deadlock, or
/// another transaction holding the mirror's rows (or a table, as DDL does) for long.
pub(crate) const DEFAULT_LOCK_WAIT: Duration = Duration::from_millis(250);

/// A borrowed connection of either backend.
pub(crate) enum Conn<'a> {
    #[cfg(feature = "sqlite")]
    Sqlite(&'a mut SqliteConnection),
    #[cfg(feature = "postgres")]
    Postgres(&'a mut PgConnection),
}

/// A pooled connection kept out of the pool ([`Database::hold`]); back in it when dropped.
pub(crate) enum Held {
    #[cfg(feature = "sqlite")]
    Sqlite(r2d2::PooledConnection<ConnectionManager<SqliteConnection>>),
    #[cfg(feature = "postgres")]
    Postgres(r2d2::PooledConnection<ConnectionManager<PgConnection>>),
}

impl Held {
    /// The connection, to run statements on.
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            #[cfg(feature = "sqlite")]
            Held::Sqlite(c) => Conn::Sqlite(&mut *c),
            #[cfg(feature = "postgres")]
            Held::Postgres(c) => Conn::Postgres(&mut *c),
        }
    }
}

/// Runs `$body` with `$c` bound to the concrete diesel connection of `$conn`.
/// The body is compiled once per enabled backend.
macro_rules! on_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            #[cfg(feature = "sqlite")]
            $crate::db::Conn::Sqlite(inner) => {
                let $c: &mut ::diesel::SqliteConnection = &mut **inner;
                $body
            }
            #[cfg(feature = "postgres")]
            $crate::db::Conn::Postgres(inner) => {
                let $c: &mut ::diesel::PgConnection = &mut **inner;
                $body
            }
        }
    };
}
pub(crate) use on_conn;

/// Runs `$query` with `$filter` bound to "`$column` is one of `$ids`" (a slice). One
/// id (what access checks ask, nearly always) is `=`, a statement the connection keeps
/// prepared; several are `IN (...)`, which diesel prepares anew on each run on SQLite
/// (a tenth of a gate's time; on Postgres it is `= ANY($1)`, kept prepared too). The
/// query is written once and compiled for both.
macro_rules! by_ids {
    ($ids:expr, $column:expr, |$filter:ident| $query:expr) => {
        match $ids {
            [one] => {
                let $filter = $column.eq(one);
                $query
            }
            many => {
                let $filter = $column.eq_any(many);
                $query
            }
        }
    };
}
pub(crate) use by_ids;

impl Conn<'_> {
    /// Runs `f` in a write transaction. On SQLite it is `BEGIN IMMEDIATE`, so two
    /// writers queue on the busy timeout instead of failing on lock upgrade. Nested
    /// calls become savepoints on both backends.
    pub(crate) fn write<R>(&mut self, f: impl FnOnce(&mut Conn<'_>) -> Result<R>) -> Result<R> {
        match self {
            #[cfg(feature = "sqlite")]
            Conn::Sqlite(c) => {
                use diesel::connection::{AnsiTransactionManager, TransactionManager};
                // `BEGIN IMMEDIATE` cannot nest: inside a transaction, use a savepoint.
                let depth =
                    AnsiTransactionManager::transaction_manager_status_mut(*c).transaction_depth();
                if matches!(depth, Ok(Some(_))) {
                    diesel::Connection::transaction(*c, |c| f(&mut Conn::Sqlite(c)))
                } else {
                    c.immediate_transaction(|c| f(&mut Conn::Sqlite(c)))
                }
            }
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => c.transaction(|c| f(&mut Conn::Postgres(c))),
        }
    }

    /// Runs `f` atomically: inside the transaction already open, as it is (no
    /// savepoint: an error of `f` must fail that transaction), else in a new one. For
    /// work that maps its input before it writes, so nothing of it needs a partial
    /// rollback; on Postgres a savepoint and its release are two round trips.
    pub(crate) fn atomic<R>(&mut self, f: impl FnOnce(&mut Conn<'_>) -> Result<R>) -> Result<R> {
        use diesel::connection::{AnsiTransactionManager, TransactionManager};
        let open = match self {
            #[cfg(feature = "sqlite")]
            Conn::Sqlite(c) => AnsiTransactionManager::transaction_manager_status_mut(*c)
                .transaction_depth()
                .is_ok_and(|d| d.is_some()),
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => AnsiTransactionManager::transaction_manager_status_mut(*c)
                .transaction_depth()
                .is_ok_and(|d| d.is_some()),
        };
        if open { f(self) } else { self.write(f) }
    }
}

/// A diesel r2d2 connection pool of either backend: the one the crate opens from
/// `DATABASE_URL`, or yours, handed to [`Mirror::from_pool`](crate::Mirror::from_pool)
/// (`pool.into()`), so the app and the mirror share connections.
///
/// A SQLite pool of yours should apply [`SqlitePragmas`] as its connection
/// customizer (WAL, a busy timeout, `synchronous = FULL`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum DbPool {
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(r2d2::Pool<ConnectionManager<SqliteConnection>>),
    /// Postgres.
    #[cfg(feature = "postgres")]
    Postgres(r2d2::Pool<ConnectionManager<PgConnection>>),
}

#[cfg(feature = "sqlite")]
impl From<r2d2::Pool<ConnectionManager<SqliteConnection>>> for DbPool {
    fn from(pool: r2d2::Pool<ConnectionManager<SqliteConnection>>) -> Self {
        DbPool::Sqlite(pool)
    }
}

#[cfg(feature = "postgres")]
impl From<r2d2::Pool<ConnectionManager<PgConnection>>> for DbPool {
    fn from(pool: r2d2::Pool<ConnectionManager<PgConnection>>) -> Self {
        DbPool::Postgres(pool)
    }
}

use DbPool as Pool;

/// The connection pool; cheap to clone.
#[derive(Clone)]
pub(crate) struct Database {
    pool: Pool,
    /// The group-commit writer ([`batch`]).
    batcher: batch::Batcher,
    /// How long a Postgres writer's statement waits for a row lock
    /// ([`Config::postgres_lock_wait`](crate::Config::postgres_lock_wait)).
    lock_wait: Duration,
}

/// The SQLite settings the mirror relies on, as an r2d2 connection customizer: WAL
/// (readers beside the writer), `busy_timeout` (writers queue instead of failing) and
/// `synchronous = FULL` (a commit is on disk before a webhook is answered 200).
///
/// ```
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel::SqliteConnection;
/// let pool = Pool::builder()
///     .connection_customizer(Box::new(stripe_mirror::db::SqlitePragmas))
///     .build(ConnectionManager::<SqliteConnection>::new(":memory:"))
///     .unwrap();
/// # drop(pool);
/// ```
#[cfg(feature = "sqlite")]
#[derive(Debug, Clone, Copy, Default)]
pub struct SqlitePragmas;

#[cfg(feature = "sqlite")]
impl CustomizeConnection<SqliteConnection, r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> std::result::Result<(), r2d2::Error> {
        // WAL lets readers run beside the writer; busy_timeout makes writers queue.
        // synchronous = FULL syncs the WAL at every commit: a write is on disk when it
        // returns (NORMAL could lose the last commits on power failure). The mirror's
        // own writer commits with NORMAL and syncs the WAL itself before it answers
        // (`db::batch`), so its next group runs during the sync. Savepoints (a nested
        // `write`) journal in memory, not a temp file.
        conn.batch_execute(
            "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = FULL; PRAGMA temp_store = MEMORY;",
        )
        .map_err(r2d2::Error::QueryError)
    }
}

/// Where a database URL points.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Sqlite(String),
    Postgres(String),
    /// Neither: why (an unknown scheme, a libpq key-value string), said to the user
    /// rather than opened as the path of a new SQLite file.
    Refused(String),
}

pub(crate) fn parse_url(url: &str) -> Target {
    let url = url.trim();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Target::Postgres(url.to_owned())
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Target::Sqlite(path.to_owned())
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        Target::Sqlite(path.to_owned())
    } else if let Some((scheme, _)) = url.split_once("://").filter(|(s, _)| *s != "file") {
        // The scheme alone: the rest may hold a token `redact_url` does not know.
        Target::Refused(format!(
            "DATABASE_URL `{scheme}://...` is not a database stripe-mirror opens; use \
             postgres://user:password@host/db, or sqlite://path/to/file.db"
        ))
    } else if libpq_keywords(url) {
        // Not echoed: it may hold a password in a form `redact_url` does not read.
        Target::Refused(
            "DATABASE_URL looks like a libpq key-value string (host=... dbname=...): give \
             a URL instead, postgres://user:password@host:port/db"
                .to_owned(),
        )
    } else {
        // A path (`app.db`, `/var/lib/app.db`, `:memory:`, a `file:` URI).
        Target::Sqlite(url.to_owned())
    }
}

/// Whether `text` reads as a libpq key-value string (`host=db dbname=app ...`, its
/// keys in any order) rather than a path: its first word is `key=` with a key of
/// letters and `_`, or one of its words sets a libpq connection key.
fn libpq_keywords(text: &str) -> bool {
    let mut words = text.split_whitespace();
    let first_is_key = words
        .next()
        .and_then(|w| w.split_once('='))
        .is_some_and(|(key, _)| {
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        });
    first_is_key
        || words.any(|w| {
            ["host=", "hostaddr=", "dbname=", "user=", "password="]
                .iter()
                .any(|key| w.starts_with(key))
        })
}

/// Whether a Postgres URL's user or password holds a raw `@`: libpq takes its user
/// info up to the first `@` before any `/`, and what follows for the host; more than
/// one `@` there means part of the password would be read, and printed, as the host.
#[cfg(feature = "postgres")]
fn raw_at_in_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.matches('@').count() > 1
}

/// The URL with any password replaced, for error messages.
pub(crate) fn redact_url(url: &str) -> String {
    let mut shown = redact_parsed(url);
    // Whatever the URL's shape (a raw `/` in a password ends the authority above),
    // every reading of a password is masked where it stands.
    let (mut userinfo, params) = password_readings(url);
    // Longest first: a shorter reading is part of a longer one.
    userinfo.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for password in userinfo {
        shown = shown.replace(&format!(":{password}@"), ":***@");
    }
    for password in params {
        shown = shown.replace(&format!("password={password}"), "password=***");
    }
    shown
}

/// Every string of a database URL that may be a password, longest first: what lies
/// between the user name's `:` and each `@` after it (a raw `/`, `?` or `@` may be
/// part of a password), and each `password=` or `sslpassword=` parameter. For masking
/// it in text that may repeat the URL (an error message of the database's driver):
/// reading more of the URL as a password than its parser did only hides more.
pub fn url_passwords(url: &str) -> Vec<String> {
    let (mut found, params) = password_readings(url);
    found.extend(params);
    found.sort_by_key(|p| std::cmp::Reverse(p.len()));
    found.dedup();
    found
}

/// The readings of [`url_passwords`]: of the user's password, of the parameters'.
fn password_readings(url: &str) -> (Vec<String>, Vec<String>) {
    let (mut userinfo, mut params) = (Vec::new(), Vec::new());
    if let Some(scheme) = url.find("://") {
        let after = &url[scheme + 3..];
        // The user name's `:` comes before every `@` (a port's after the first).
        let first_at = after.find('@').unwrap_or(0);
        if let Some(colon) = after.find(':').filter(|colon| *colon < first_at) {
            for (at, _) in after.match_indices('@') {
                userinfo.push(after[colon + 1..at].to_owned());
            }
        }
    }
    for query in url.split('?').skip(1) {
        for param in query.split('&') {
            if let Some(("password" | "sslpassword", value)) = param.split_once('=') {
                params.push(value.to_owned());
            }
        }
    }
    userinfo.retain(|p| !p.is_empty());
    params.retain(|p| !p.is_empty());
    (userinfo, params)
}

/// [`redact_url`] by the URL's shape.
fn redact_parsed(url: &str) -> String {
    // The userinfo ends at the last `@` before the path's `/` (a raw `?` or `@` in a
    // password is the password's); with no path, at the last `@` before the query.
    let (mut shown, rest) = match url.find("://") {
        Some(scheme) => {
            let after = &url[scheme + 3..];
            let authority = match after.find('/') {
                Some(path) => &after[..path],
                None => after.split_once('?').map_or(after, |(a, _)| a),
            };
            match authority.rfind('@') {
                Some(end) => {
                    let creds = &after[..end];
                    let user = match creds.find(':') {
                        Some(colon) => format!("{}:***", &creds[..colon]),
                        None => creds.to_owned(),
                    };
                    (format!("{}://{user}", &url[..scheme]), &after[end..])
                }
                None => (url[..scheme + 3].to_owned(), after),
            }
        }
        None => (String::new(), url),
    };
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (rest, None),
    };
    shown.push_str(base);
    if let Some(query) = query {
        // libpq also takes the password as a parameter: `?password=...`.
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name == "password" || name == "sslpassword" => {
                    format!("{name}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&params.join("&"));
    }
    shown
}

impl Database {
    /// Wraps a pool the host app already has.
    pub(crate) fn from_pool(pool: DbPool) -> Self {
        Database {
            pool,
            batcher: Default::default(),
            lock_wait: DEFAULT_LOCK_WAIT,
        }
    }

    /// The same pool with Postgres writers waiting at most `wait` for a row lock
    /// (zero: as long as Postgres lets them). Set before the first write. Taken in
    /// whole milliseconds, at least 1 (a shorter wait is not "no limit") and at most
    /// what Postgres' `lock_timeout` holds (about 24 days).
    pub(crate) fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = match wait.is_zero() {
            true => Duration::ZERO,
            false => wait.clamp(
                Duration::from_millis(1),
                Duration::from_millis(i32::MAX as u64),
            ),
        };
        self
    }

    /// How long a Postgres writer's statement waits for a lock.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// Which database, for messages: the backend (the pool does not keep its URL).
    fn target(&self) -> String {
        format!("({:?})", self.backend()).to_lowercase()
    }

    /// The pool, for the host app's own queries.
    pub(crate) fn pool(&self) -> &DbPool {
        &self.pool
    }

    /// Opens a pool for `url`. Fails fast when the database cannot be reached.
    pub(crate) fn open(url: &str, size: u32, timeout: Duration) -> Result<Self> {
        // r2d2 asserts both (a panic); said here as what to change.
        if size == 0 {
            return Err(Error::Config(
                "Config::pool_size is 0: the pool needs at least one connection".into(),
            ));
        }
        if timeout.is_zero() {
            return Err(Error::Config(
                "Config::connection_timeout is zero: give the pool time to connect (the default is 5 s)"
                    .into(),
            ));
        }
        let unavailable = |source: r2d2::PoolError| Error::Unavailable {
            target: redact_url(url),
            source,
        };
        let pool = match parse_url(url) {
            Target::Refused(why) => return Err(Error::Config(why)),
            #[cfg(feature = "sqlite")]
            Target::Sqlite(path) => {
                // An in-memory database exists once per connection: keep a single one,
                // for good (r2d2 would replace it after 10 idle minutes, or 30 in all,
                // with a new, empty database).
                let memory = path.contains(":memory:");
                let (size, idle, lifetime) = if memory {
                    (1, None, None)
                } else {
                    (
                        size,
                        Some(Duration::from_secs(600)),
                        Some(Duration::from_secs(1800)),
                    )
                };
                Pool::Sqlite(
                    r2d2::Pool::builder()
                        .max_size(size)
                        .idle_timeout(idle)
                        .max_lifetime(lifetime)
                        // A file's connections do not break: no test query per checkout
                        // (Postgres keeps r2d2's, which finds connections a restart broke).
                        .test_on_check_out(false)
                        .connection_timeout(timeout)
                        .connection_customizer(Box::new(SqlitePragmas))
                        .build(ConnectionManager::new(path))
                        .map_err(unavailable)?,
                )
            }
            // libpq splits user and host at the first `@`, the redaction at the last: a
            // raw `@` in the password would put the rest of it in libpq's errors.
            #[cfg(feature = "postgres")]
            Target::Postgres(url) if raw_at_in_userinfo(&url) => {
                return Err(Error::Config(format!(
                    "DATABASE_URL {} holds more than one `@`: percent-encode an `@` in the user \
                     or password as `%40`",
                    redact_url(&url)
                )));
            }
            #[cfg(feature = "postgres")]
            Target::Postgres(url) => Pool::Postgres(
                r2d2::Pool::builder()
                    .max_size(size)
                    .connection_timeout(timeout)
                    .build(ConnectionManager::new(url.clone()))
                    .map_err(unavailable)?,
            ),
            #[allow(unreachable_patterns)]
            other => {
                return Err(Error::Config(format!(
                    "DATABASE_URL {} needs the `{}` feature of stripe-mirror",
                    redact_url(url),
                    if matches!(other, Target::Postgres(_)) {
                        "postgres"
                    } else {
                        "sqlite"
                    }
                )));
            }
        };
        Ok(Database {
            pool,
            batcher: Default::default(),
            lock_wait: DEFAULT_LOCK_WAIT,
        })
    }

    pub(crate) fn backend(&self) -> Backend {
        match self.pool {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(_) => Backend::Sqlite,
            #[cfg(feature = "postgres")]
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Takes a connection out of the pool for a while (a writer thread between groups).
    pub(crate) fn hold(&self) -> Result<Held> {
        let unavailable = |source: r2d2::PoolError| Error::Unavailable {
            target: self.target(),
            source,
        };
        Ok(match &self.pool {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(p) => Held::Sqlite(p.get().map_err(unavailable)?),
            #[cfg(feature = "postgres")]
            Pool::Postgres(p) => Held::Postgres(p.get().map_err(unavailable)?),
        })
    }

    /// Whether the pool could hand a connection to someone else right now (one idle,
    /// or room to open one).
    pub(crate) fn spare_connection(&self) -> bool {
        fn spare(state: r2d2::State, max: u32) -> bool {
            state.idle_connections > 0 || state.connections < max
        }
        match &self.pool {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(p) => spare(p.state(), p.max_size()),
            #[cfg(feature = "postgres")]
            Pool::Postgres(p) => spare(p.state(), p.max_size()),
        }
    }

    /// Runs `f` with a pooled connection, on the calling thread (blocking).
    pub(crate) fn run_blocking<R>(&self, f: impl FnOnce(&mut Conn<'_>) -> Result<R>) -> Result<R> {
        let unavailable = |source: r2d2::PoolError| Error::Unavailable {
            target: self.target(),
            source,
        };
        match &self.pool {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(p) => f(&mut Conn::Sqlite(&mut *p.get().map_err(unavailable)?)),
            #[cfg(feature = "postgres")]
            Pool::Postgres(p) => f(&mut Conn::Postgres(&mut *p.get().map_err(unavailable)?)),
        }
    }

    /// Runs `f` with a pooled connection on tokio's blocking pool.
    pub(crate) async fn run<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn<'_>) -> Result<R> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.run_blocking(f))
            .await
            .map_err(|source| Error::Task { source })?
    }

    /// Runs a short read (an indexed lookup). On SQLite, when a connection is idle, it
    /// runs right here: the query takes a few microseconds, less than the hop to the
    /// blocking pool, and WAL readers never wait for writers. Otherwise (Postgres, whose
    /// answer comes over the network, or no idle connection) it runs like [`run`](Self::run).
    pub(crate) async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn<'_>) -> Result<R> + Send + 'static,
    {
        #[cfg(feature = "sqlite")]
        if let DbPool::Sqlite(pool) = &self.pool
            && let Some(mut conn) = pool.try_get()
        {
            return f(&mut Conn::Sqlite(&mut conn));
        }
        self.run(f).await
    }

    /// Applies pending migrations; safe to call from several processes at once.
    pub(crate) fn migrate(&self) -> Result<()> {
        self.run_blocking(|conn| match conn {
            #[cfg(feature = "sqlite")]
            Conn::Sqlite(c) => c.immediate_transaction(|c| {
                c.run_pending_migrations(SQLITE_MIGRATIONS)
                    .map(|_| ())
                    .map_err(|source| Error::Migration { source })
            }),
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => {
                // Instances starting together queue on an advisory lock instead of racing.
                diesel::sql_query("SELECT pg_advisory_lock(724514159)").execute(*c)?;
                let result = c
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|_| ())
                    .map_err(|source| Error::Migration { source });
                diesel::sql_query("SELECT pg_advisory_unlock(724514159)").execute(*c)?;
                result
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw `@` in a Postgres password is refused before libpq sees it: libpq would
    /// take what follows it for the host and print it in its error.
    #[cfg(feature = "postgres")]
    #[test]
    fn a_raw_at_in_a_postgres_password_is_refused_without_showing_it() {
        let url = "postgres://app:p@ss-word@127.0.0.1:1/app";
        let err = Database::open(url, 1, Duration::from_millis(100))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("%40"), "{err}");
        assert!(!err.contains("ss-word") && !err.contains("p@"), "{err}");
        // Encoded, it goes on to connect (and fails there: nothing listens on port 1).
        let encoded = "postgres://app:p%40ss-word@127.0.0.1:1/app";
        let err = Database::open(encoded, 1, Duration::from_millis(100))
            .err()
            .expect("nothing listens")
            .to_string();
        assert!(!err.contains("%40") && !err.contains("ss-word"), "{err}");
        // Wherever the second `@` hides (after a raw `?` in the password), refused; an
        // `@` in the database name is libpq's to take.
        assert!(raw_at_in_userinfo("postgres://u:a?b@c@127.0.0.1:1/db"));
        assert!(!raw_at_in_userinfo("postgres://u@127.0.0.1:1/my@db"));
        assert!(!raw_at_in_userinfo(
            "postgres://u:p%40w@127.0.0.1:1/db?sslmode=disable"
        ));
    }

    /// An in-memory database lives in its one connection: the pool keeps it for good
    /// (r2d2 replaces an idle or old connection, which would empty the database); a
    /// file's connections are recycled as r2d2 does.
    #[cfg(feature = "sqlite")]
    #[test]
    #[allow(irrefutable_let_patterns)] // without the postgres feature
    fn an_in_memory_database_is_never_recycled() {
        let db = Database::open("sqlite::memory:", 4, Duration::from_secs(5)).unwrap();
        let DbPool::Sqlite(pool) = db.pool() else {
            panic!("sqlite")
        };
        assert_eq!(
            (pool.max_size(), pool.idle_timeout(), pool.max_lifetime()),
            (1, None, None)
        );
        let dir = tempfile::tempdir().unwrap();
        let file = format!("sqlite://{}", dir.path().join("m.db").display());
        let db = Database::open(&file, 4, Duration::from_secs(5)).unwrap();
        let DbPool::Sqlite(pool) = db.pool() else {
            panic!("sqlite")
        };
        assert!(pool.idle_timeout().is_some() && pool.max_lifetime().is_some());
    }

    /// Every pooled SQLite connection syncs each commit (2 = FULL): a 200 is durable.
    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_commits_are_durable() {
        #[derive(diesel::QueryableByName)]
        struct Synchronous {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            synchronous: i32,
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("durable.db").display());
        let db = Database::open(&url, 2, Duration::from_secs(5)).unwrap();
        for _ in 0..2 {
            let value = db
                .run_blocking(|conn| {
                    Ok(
                        on_conn!(conn, c => diesel::RunQueryDsl::get_result::<Synchronous>(
                            diesel::sql_query("PRAGMA synchronous"),
                            c
                        ))?,
                    )
                })
                .unwrap();
            assert_eq!(value.synchronous, 2, "PRAGMA synchronous is FULL");
        }
    }

    /// Any lock wait a host sets is one Postgres' `lock_timeout` takes: below 1 ms is
    /// 1 ms (`0ms` would mean no limit), above its maximum is its maximum.
    #[cfg(feature = "sqlite")]
    #[test]
    fn a_lock_wait_is_one_postgres_takes() {
        let db = || Database::open(":memory:", 1, Duration::from_secs(1)).unwrap();
        let wait = |d| db().with_lock_wait(d).lock_wait();
        assert_eq!(wait(Duration::ZERO), Duration::ZERO);
        assert_eq!(wait(Duration::from_micros(10)), Duration::from_millis(1));
        assert_eq!(wait(Duration::from_millis(250)), Duration::from_millis(250));
        assert_eq!(wait(Duration::MAX), Duration::from_millis(i32::MAX as u64));
    }

    /// A SQLite database migrated up to the embedded migration named `*{name}`, and
    /// that migration, to run next.
    #[cfg(feature = "sqlite")]
    fn sqlite_before(
        dir: &tempfile::TempDir,
        name: &str,
    ) -> (
        SqliteConnection,
        Box<dyn diesel::migration::Migration<diesel::sqlite::Sqlite>>,
    ) {
        use diesel::Connection;
        let path = dir.path().join("upgrade.db");
        let mut c = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        let mut pending = c.pending_migrations(SQLITE_MIGRATIONS).unwrap();
        let at = pending
            .iter()
            .position(|m| m.name().to_string().ends_with(name))
            .expect("the migration is embedded");
        for m in &pending[..at] {
            c.run_migration(m.as_ref()).unwrap();
        }
        (c, pending.remove(at))
    }

    /// The "fewer pages" migration rebuilds two tables on SQLite: every row survives
    /// it and its revert, delivery ids keep increasing, and the replay of failed
    /// events can use the partial index that replaced the status index.
    #[cfg(feature = "sqlite")]
    #[test]
    fn the_fewer_pages_migration_keeps_every_row_and_reverts() {
        use diesel::RunQueryDsl;
        use diesel::connection::SimpleConnection;
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        #[derive(diesel::QueryableByName)]
        struct T {
            #[diesel(sql_type = diesel::sql_types::Text)]
            t: String,
        }
        let n = |c: &mut SqliteConnection, sql: &str| {
            diesel::sql_query(sql).get_result::<N>(c).unwrap().n
        };
        let t = |c: &mut SqliteConnection, sql: &str| {
            diesel::sql_query(sql)
                .load::<T>(c)
                .unwrap()
                .into_iter()
                .map(|r| r.t)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut c, next) = sqlite_before(&dir, "_fewer_pages");
        let delivery = "INSERT INTO stripe_webhook_deliveries (received_at, headers, body, body_size, \
                        body_truncated, outcome) VALUES (1, '{}', x'', 0, FALSE, 'processed')";
        for _ in 0..3 {
            c.batch_execute(delivery).unwrap();
        }
        c.batch_execute(
            "DELETE FROM stripe_webhook_deliveries WHERE id = 1; \
             INSERT INTO stripe_access (subscriber_id, livemode, dirty, version, delivered) \
             VALUES ('u1', FALSE, FALSE, 3, '{\"roles\":[]}'), ('u2', TRUE, TRUE, 1, NULL)",
        )
        .unwrap();
        let rows = "SELECT group_concat(id, ',') AS t FROM (SELECT id FROM stripe_webhook_deliveries ORDER BY id)";
        let access = "SELECT group_concat(subscriber_id || livemode || dirty || version || COALESCE(delivered, '-'), ',') AS t \
                      FROM (SELECT * FROM stripe_access ORDER BY subscriber_id)";
        let (ids, marks) = (t(&mut c, rows), t(&mut c, access));
        assert_eq!(ids, "2,3");
        c.run_migration(next.as_ref()).unwrap();
        assert_eq!(t(&mut c, rows), ids, "delivery rows and ids kept");
        assert_eq!(t(&mut c, access), marks, "access rows kept");
        c.batch_execute(delivery).unwrap();
        assert_eq!(
            n(&mut c, "SELECT MAX(id) AS n FROM stripe_webhook_deliveries"),
            4
        );
        assert_eq!(
            n(
                &mut c,
                "SELECT COUNT(*) AS n FROM sqlite_sequence WHERE name = 'stripe_webhook_deliveries'"
            ),
            0,
            "no AUTOINCREMENT counter to write on every delivery"
        );
        assert!(
            diesel::sql_query("SELECT rowid AS n FROM stripe_access")
                .load::<N>(&mut c)
                .is_err(),
            "stripe_access is stored in its key's B-tree"
        );
        #[derive(diesel::QueryableByName)]
        struct Plan {
            #[diesel(sql_type = diesel::sql_types::Text)]
            detail: String,
        }
        let plan: Vec<Plan> = diesel::sql_query(
            "EXPLAIN QUERY PLAN SELECT id FROM stripe_events WHERE status = 'failed' ORDER BY created, id",
        )
        .load(&mut c)
        .unwrap();
        assert!(
            plan.iter().any(|p| p.detail.contains("idx_events_failed")),
            "replay's query reads the failed events' index"
        );
        c.revert_last_migration(SQLITE_MIGRATIONS).unwrap();
        assert_eq!(t(&mut c, rows), "2,3,4", "rows survive the revert");
        assert_eq!(t(&mut c, access), marks);
        assert!(
            t(
                &mut c,
                "SELECT sql AS t FROM sqlite_master WHERE name = 'stripe_webhook_deliveries'"
            )
            .contains("AUTOINCREMENT")
        );
        c.run_pending_migrations(SQLITE_MIGRATIONS).unwrap();
        assert_eq!(t(&mut c, rows), "2,3,4");
    }

    /// The columns the upserts take for indexed ([`crate::sync::upsert::INDEXED`]:
    /// on SQLite an update first leaves them out of its `SET`) are those the
    /// migrations index, table by mirrored table.
    #[cfg(feature = "sqlite")]
    #[test]
    fn the_indexed_columns_are_the_schemas() {
        use diesel::{Connection, RunQueryDsl};
        #[derive(diesel::QueryableByName)]
        struct Index {
            #[diesel(sql_type = diesel::sql_types::Text)]
            tbl_name: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            sql: String,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("indexed.db");
        let mut c = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        c.run_pending_migrations(SQLITE_MIGRATIONS).unwrap();
        let indexes: Vec<Index> = diesel::sql_query(
            "SELECT tbl_name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL",
        )
        .load(&mut c)
        .unwrap();
        let mut tables: Vec<&str> = crate::models::MIRRORED.iter().map(|t| t.table).collect();
        tables.push(crate::models::subscription::SUBSCRIPTION_ITEMS.table);
        for table in tables {
            let mut found: Vec<String> = Vec::new();
            for index in indexes.iter().filter(|i| i.tbl_name == table) {
                assert!(
                    !index.sql.contains(" WHERE "),
                    "a partial index: {}",
                    index.sql
                );
                let (_, columns) = index.sql.split_once('(').unwrap();
                let (columns, _) = columns.rsplit_once(')').unwrap();
                found.extend(columns.split(',').map(|c| c.trim().to_owned()));
            }
            found.sort();
            found.dedup();
            let mut listed: Vec<String> = crate::sync::upsert::INDEXED
                .iter()
                .find(|(t, _)| *t == table)
                .map_or(&[][..], |(_, columns)| *columns)
                .iter()
                .map(|c| c.to_string())
                .collect();
            listed.sort();
            assert_eq!(found, listed, "{table}");
        }
    }

    /// The "received by rowid" migration drops SQLite's two indexes on `received_at`
    /// (the prune finds its rows by rowid, `db::received`) for a partial index of the
    /// events not synced, which `reconcile` reads; its revert puts them back.
    #[cfg(feature = "sqlite")]
    #[test]
    fn the_received_by_rowid_migration_drops_two_indexes_and_reverts() {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct T {
            #[diesel(sql_type = diesel::sql_types::Text)]
            t: String,
        }
        let indexes = |c: &mut SqliteConnection| -> Vec<String> {
            diesel::sql_query(
                "SELECT name AS t FROM sqlite_master WHERE type = 'index' AND sql LIKE '%received_at%' ORDER BY name",
            )
            .load::<T>(c)
            .unwrap()
            .into_iter()
            .map(|r| r.t)
            .collect()
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut c, next) = sqlite_before(&dir, "_received_by_rowid");
        let both = ["idx_deliveries_received_at", "idx_events_received_at"];
        assert_eq!(indexes(&mut c), both);
        c.run_migration(next.as_ref()).unwrap();
        assert_eq!(indexes(&mut c), ["idx_events_unsynced"]);
        // `reconcile`'s query reads the partial index of the events not synced.
        #[derive(diesel::QueryableByName)]
        struct Plan {
            #[diesel(sql_type = diesel::sql_types::Text)]
            detail: String,
        }
        let plan: Vec<Plan> = diesel::sql_query(format!(
            "EXPLAIN QUERY PLAN {}",
            crate::sync::reconcile::UNSYNCED_SINCE
        ))
        .load(&mut c)
        .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.detail.contains("idx_events_unsynced")),
            "{:?}",
            plan.iter().map(|p| &p.detail).collect::<Vec<_>>()
        );
        c.revert_last_migration(SQLITE_MIGRATIONS).unwrap();
        assert_eq!(indexes(&mut c), both);
    }

    /// The "unindexed email" migration drops the customers' email index, which no
    /// query of the mirror reads; its revert puts it back.
    #[cfg(feature = "sqlite")]
    #[test]
    fn the_unindexed_email_migration_drops_the_index_and_reverts() {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let count = |c: &mut SqliteConnection| {
            diesel::sql_query(
                "SELECT COUNT(*) AS n FROM sqlite_master WHERE name = 'idx_customers_email'",
            )
            .get_result::<N>(c)
            .unwrap()
            .n
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut c, next) = sqlite_before(&dir, "_unindexed_email");
        assert_eq!(count(&mut c), 1);
        c.run_migration(next.as_ref()).unwrap();
        assert_eq!(count(&mut c), 0);
        c.revert_last_migration(SQLITE_MIGRATIONS).unwrap();
        assert_eq!(count(&mut c), 1);
    }

    /// The "subscriber in metadata" migration fills its column from each customer's
    /// data: true where Stripe's metadata holds the key, false where it does not (a
    /// Checkout's link), unknown where the row has no metadata (a placeholder).
    #[cfg(feature = "sqlite")]
    #[test]
    fn the_subscriber_in_metadata_migration_reads_each_customers_data() {
        use diesel::RunQueryDsl;
        use diesel::connection::SimpleConnection;
        #[derive(diesel::QueryableByName)]
        struct T {
            #[diesel(sql_type = diesel::sql_types::Text)]
            t: String,
        }
        let dir = tempfile::tempdir().unwrap();
        let (mut c, next) = sqlite_before(&dir, "_subscriber_in_metadata");
        c.batch_execute(
            r#"INSERT INTO stripe_customers (id, livemode, data, stamp, synced_at, subscriber_id) VALUES
             ('cus_meta', FALSE, '{"id":"cus_meta","metadata":{"stripe_mirror_subscriber":"u1"}}', 1, 1, 'u1'),
             ('cus_checkout', FALSE, '{"id":"cus_checkout","metadata":{}}', 1, 1, 'u2'),
             ('cus_empty', FALSE, '{"id":"cus_empty","metadata":{"stripe_mirror_subscriber":""}}', 1, 1, ''),
             ('cus_placeholder', FALSE, '{"id":"cus_placeholder"}', 0, 1, 'u3')"#,
        )
        .unwrap();
        c.run_migration(next.as_ref()).unwrap();
        let rows = diesel::sql_query(
            "SELECT group_concat(id || '=' || COALESCE(subscriber_in_metadata, '-') || '/' || COALESCE(subscriber_id, '-'), ',') AS t \
             FROM (SELECT * FROM stripe_customers ORDER BY id)",
        )
        .get_result::<T>(&mut c)
        .unwrap()
        .t;
        assert_eq!(
            rows,
            "cus_checkout=0/u2,cus_empty=0/-,cus_meta=1/u1,cus_placeholder=-/u3"
        );
        c.revert_migration(next.as_ref()).unwrap();
        c.run_migration(next.as_ref()).unwrap();
    }

    #[test]
    fn urls_pick_the_backend() {
        assert_eq!(parse_url("sqlite://a.db"), Target::Sqlite("a.db".into()));
        assert_eq!(parse_url("a.db"), Target::Sqlite("a.db".into()));
        assert_eq!(
            parse_url("sqlite::memory:"),
            Target::Sqlite(":memory:".into())
        );
        assert!(matches!(
            parse_url("postgres://u@h/db"),
            Target::Postgres(_)
        ));
        assert!(matches!(
            parse_url("postgresql://u@h/db"),
            Target::Postgres(_)
        ));
        assert_eq!(
            parse_url("file:app.db?mode=rwc"),
            Target::Sqlite("file:app.db?mode=rwc".into())
        );
        assert_eq!(
            parse_url("file:///var/app.db"),
            Target::Sqlite("file:///var/app.db".into())
        );
        // Not opened as a new SQLite file of that name: said.
        for url in [
            "mysql://app:hunter2@db/app",
            "redis://hunter2@db/0?token=hunter2",
        ] {
            let Target::Refused(why) = parse_url(url) else {
                panic!("an unknown scheme opened: {url}");
            };
            assert!(why.contains("://...`") && !why.contains("hunter2"), "{why}");
        }
        for libpq in [
            "host=db dbname=app password=hunter2",
            "sslmode=require host=db password=hunter2",
            "application_name=x dbname=app",
            "/tmp/app.db password=hunter2",
        ] {
            let Target::Refused(why) = parse_url(libpq) else {
                panic!("a libpq string opened: {libpq}");
            };
            assert!(
                why.contains("postgres://") && !why.contains("hunter2"),
                "{why}"
            );
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=hunter2&x=a@b"),
            "postgres://u@h/db?sslmode=require&password=***&x=a@b"
        );
        assert_eq!(
            redact_url("postgres://u:pw@h/db?sslpassword=hunter2"),
            "postgres://u:***@h/db?sslpassword=***"
        );
        // A raw `?` in the password (libpq takes it as the password's): still hidden.
        assert_eq!(
            redact_url("postgres://app:s3cr?t@db/prod"),
            "postgres://app:***@db/prod"
        );
        assert_eq!(
            redact_url("postgres://u@h?password=p@ss"),
            "postgres://u@h?password=***"
        );
        assert_eq!(
            redact_url("postgres://app:p@ss-word@127.0.0.1:1/app"),
            "postgres://app:***@127.0.0.1:1/app"
        );
        // A raw `/` (base64 passwords have them) ends the authority early: the
        // password is still hidden.
        let shown = redact_url("postgres://app:se/cret@db/app");
        assert!(!shown.contains("cret"), "{shown}");
        assert_eq!(shown, "postgres://app:***@db/app");
        let shown = redact_url("postgres://app:a/b?c@db/app?password=x/y@z&sslmode=require");
        assert!(!shown.contains("a/b") && !shown.contains("x/y"), "{shown}");
        let shown = redact_url("postgres://app:a/b@c@db/x");
        assert!(!shown.contains("a/b") && !shown.contains("@c@"), "{shown}");
        // Nothing else is taken for a password.
        assert_eq!(
            redact_url("postgres://u@h/db?application_name=a@b"),
            "postgres://u@h/db?application_name=a@b"
        );
    }

    #[test]
    fn every_reading_of_a_password_is_found() {
        assert_eq!(url_passwords("postgres://app:hunter2@db/app"), ["hunter2"]);
        assert_eq!(url_passwords("postgres://app:se/cret@db/app"), ["se/cret"]);
        assert_eq!(url_passwords("postgres://app:s3cr?t@db/prod"), ["s3cr?t"]);
        assert_eq!(
            url_passwords("postgres://app@db/app?sslmode=require&password=hunter3"),
            ["hunter3"]
        );
        assert!(url_passwords("postgres://app@db/app").is_empty());
        assert!(url_passwords("sqlite://a:b.db").is_empty());
        assert!(url_passwords("postgres://u@h:5/db?application_name=a@b").is_empty());
    }
}
