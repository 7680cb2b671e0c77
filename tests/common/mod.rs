//! Test support: a fresh mirror on every backend the test run has.
//!
//! SQLite is always a real file in a temporary directory. Postgres is a real server
//! started by `scripts/postgres.sh` (the test script sets `STRIPE_MIRROR_TEST_POSTGRES`
//! to its admin URL); each call gets a new database. The other peers (localstripe,
//! stripe-stateful-mock, the Stripe Python SDK) come the same way, through [`peer`].
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use diesel::{Connection, PgConnection, RunQueryDsl};
use serde_json::Value;
use stripe_mirror::{Config, Mirror};

pub struct Backend {
    pub name: &'static str,
    pub config: Config,
    _dir: Option<tempfile::TempDir>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A test peer's address from the environment (`STRIPE_MIRROR_TEST_*`, set by
/// scripts/test.sh). Outside the script the tests needing it are skipped; under it
/// (`STRIPE_MIRROR_REQUIRE_PEERS=1`) a missing peer fails the test.
pub fn peer(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            assert!(
                std::env::var("STRIPE_MIRROR_REQUIRE_PEERS").as_deref() != Ok("1"),
                "{var} is not set: run scripts/test.sh"
            );
            eprintln!("note: tests needing {var} skipped (run scripts/test.sh for the full suite)");
            None
        }
    }
}

/// A new, empty Postgres database on the test server, if there is one.
pub fn postgres_url() -> Option<String> {
    let admin = peer("STRIPE_MIRROR_TEST_POSTGRES")?;
    let name = format!(
        "sm_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let mut conn = PgConnection::establish(&admin).expect("connect to the test Postgres server");
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .expect("create test database");
    let base = admin.rsplit_once('/').expect("admin url has a database").0;
    Some(format!("{base}/{name}"))
}

/// One configuration per backend: a SQLite file, and Postgres when available.
pub fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.db");
    let mut out = vec![Backend {
        name: "sqlite",
        config: Config::new(format!("sqlite://{}", path.display())),
        _dir: Some(dir),
    }];
    if let Some(url) = postgres_url() {
        out.push(Backend {
            name: "postgres",
            config: Config::new(url),
            _dir: None,
        });
    }
    out
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
