//! Test support: a fresh mirror on every backend the test run has.
//!
//! SQLite is always a real file in a temporary directory. With the `postgres` feature,
//! Postgres is required too: a real server started by `scripts/postgres.sh` (the test
//! script sets `STRIPE_MIRROR_TEST_POSTGRES` to its admin URL); each call gets a new
//! database. The other peers (localstripe, stripe-stateful-mock, the Stripe Python SDK)
//! come the same way, through [`peer`], and the tests needing them are `#[ignore]`d so
//! that a plain `cargo test` runs what needs no server; `scripts/test.sh` runs them all.
//! A missing peer fails the test that needs it: nothing is skipped silently.
#![allow(dead_code)]

use std::sync::atomic::AtomicU32;

use diesel::{Connection, RunQueryDsl};
use serde_json::Value;
use stripe_mirror::{Config, Mirror};

pub struct Backend {
    pub name: &'static str,
    pub config: Config,
    _dir: Option<tempfile::TempDir>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A test peer's address from the environment (`STRIPE_MIRROR_TEST_*`, set by
/// scripts/test.sh). Panics when it is missing: a test that needs a peer fails
/// without it.
pub fn peer(var: &str) -> String {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{var} is not set: run scripts/test.sh"),
    }
}

/// A new, empty Postgres database on the test server (required with the `postgres`
/// feature).
#[cfg(feature = "postgres")]
pub fn postgres_url() -> String {
    use diesel::PgConnection;
    let admin = peer("STRIPE_MIRROR_TEST_POSTGRES");
    let name = format!(
        "sm_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let mut conn = PgConnection::establish(&admin).expect("connect to the test Postgres server");
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .expect("create test database");
    database_url(&admin, &name)
}

/// `admin` (a server's URL) with its database replaced by `name`, keeping the options
/// after `?` (scripts/postgres.sh's `gssencmode=disable`).
pub fn database_url(admin: &str, name: &str) -> String {
    let (rest, options) = match admin.split_once('?') {
        Some((rest, options)) => (rest, format!("?{options}")),
        None => (admin, String::new()),
    };
    let base = rest.rsplit_once('/').expect("admin url has a database").0;
    format!("{base}/{name}{options}")
}

/// The database name in a Postgres URL.
pub fn database_name(url: &str) -> &str {
    let rest = url.split_once('?').map_or(url, |(rest, _)| rest);
    rest.rsplit('/').next().expect("url has a database")
}

/// One configuration per backend: a SQLite file, and with the `postgres` feature a
/// new Postgres database.
pub fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.db");
    #[allow(unused_mut)]
    let mut out = vec![Backend {
        name: "sqlite",
        config: Config::new(format!("sqlite://{}", path.display())),
        _dir: Some(dir),
    }];
    #[cfg(feature = "postgres")]
    out.push(Backend {
        name: "postgres",
        config: Config::new(postgres_url()),
        _dir: None,
    });
    out
}

/// Runs SQL statements straight on a backend's database, behind the crate's back:
/// to age rows or break the schema in a test.
pub fn execute_sql(database_url: &str, sql: &str) {
    if database_url.starts_with("postgres") {
        #[cfg(feature = "postgres")]
        {
            let mut conn = diesel::PgConnection::establish(database_url).unwrap();
            diesel::sql_query(sql).execute(&mut conn).unwrap();
            return;
        }
        #[allow(unreachable_code)]
        {
            panic!("{database_url} needs the postgres feature");
        }
    }
    let path = database_url
        .strip_prefix("sqlite://")
        .unwrap_or(database_url);
    let mut conn = sqlite(path);
    diesel::sql_query(sql).execute(&mut conn).unwrap();
}

/// One number from SQL (`SELECT COUNT(*) AS n ...`: the column must be named `n`).
pub fn query_count(database_url: &str, sql: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    if database_url.starts_with("postgres") {
        #[cfg(feature = "postgres")]
        {
            let mut conn = diesel::PgConnection::establish(database_url).unwrap();
            return diesel::sql_query(sql).get_result::<N>(&mut conn).unwrap().n;
        }
        #[allow(unreachable_code)]
        {
            panic!("{database_url} needs the postgres feature");
        }
    }
    let path = database_url
        .strip_prefix("sqlite://")
        .unwrap_or(database_url);
    let mut conn = sqlite(path);
    diesel::sql_query(sql).get_result::<N>(&mut conn).unwrap().n
}

/// One text from SQL (the column must be named `t`).
pub fn query_text(database_url: &str, sql: &str) -> String {
    #[derive(diesel::QueryableByName)]
    struct T {
        #[diesel(sql_type = diesel::sql_types::Text)]
        t: String,
    }
    if database_url.starts_with("postgres") {
        #[cfg(feature = "postgres")]
        {
            let mut conn = diesel::PgConnection::establish(database_url).unwrap();
            return diesel::sql_query(sql).get_result::<T>(&mut conn).unwrap().t;
        }
        #[allow(unreachable_code)]
        {
            panic!("{database_url} needs the postgres feature");
        }
    }
    let path = database_url
        .strip_prefix("sqlite://")
        .unwrap_or(database_url);
    let mut conn = sqlite(path);
    diesel::sql_query(sql).get_result::<T>(&mut conn).unwrap().t
}

/// A Stripe API stand-in serving fixed objects by path (any query, or a route
/// `path?text` for requests whose query contains `text`; the first route that matches
/// answers; hyper adds the `Date` header), answering Stripe's 404 for the rest and
/// counting requests. Only for what no fake Stripe can be told to hold (a chosen
/// object state, a chosen event list, Entitlements).
pub async fn stripe_stub(
    routes: Vec<(&'static str, u16, Value)>,
) -> (String, std::sync::Arc<std::sync::Mutex<usize>>) {
    use axum::{Router, extract::Request, routing::any};
    use std::sync::{Arc, Mutex};
    let hits = Arc::new(Mutex::new(0));
    let h = hits.clone();
    let app = Router::new().fallback(any(move |req: Request| {
        let (routes, h) = (routes.clone(), h.clone());
        async move {
            *h.lock().unwrap() += 1;
            let query = req.uri().query().unwrap_or_default();
            let found = routes.iter().find(|(route, _, _)| match route.split_once('?') {
                Some((path, needle)) => path == req.uri().path() && query.contains(needle),
                None => *route == req.uri().path(),
            });
            let (status, body) = match found {
                Some((_, status, body)) => (*status, body.to_string()),
                None => (
                    404,
                    serde_json::json!({"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such object"}})
                        .to_string(),
                ),
            };
            (axum::http::StatusCode::from_u16(status).unwrap(), body)
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/"), hits)
}

impl Backend {
    pub async fn mirror(&self) -> Mirror {
        Mirror::connect(self.config.clone())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }
}

/// Stripe's example objects (tests/fixtures/stripe_fixtures3.json).
pub fn fixture(name: &str) -> Value {
    let all: Value =
        serde_json::from_str(include_str!("../fixtures/stripe_fixtures3.json")).unwrap();
    all["resources"][name].clone()
}

/// A hand-written fixture from tests/fixtures/.
pub fn local_fixture(file: &str) -> Value {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A SQLite connection that waits for the mirror's (a writer may still be closing its
/// own, checkpointing the log, just after the mirror was dropped).
fn sqlite(path: &str) -> diesel::SqliteConnection {
    use diesel::connection::SimpleConnection;
    let mut conn = diesel::SqliteConnection::establish(path).unwrap();
    conn.batch_execute("PRAGMA busy_timeout = 10000;").unwrap();
    conn
}

/// A `tracing` writer that keeps everything logged, for tests that read the log.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
