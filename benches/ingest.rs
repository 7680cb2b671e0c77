//! Durable webhook ingest, measured against the database's own floor.
//!
//! For each backend (a SQLite file with the mirror's settings, `synchronous = FULL`;
//! Postgres at its default durability when `STRIPE_MIRROR_BENCH_POSTGRES` holds an
//! admin URL):
//! - the floor: one bare `INSERT` of an event-sized body per transaction, 1 and 8 clients;
//! - ingest through the real HTTP route (`axum::webhook_router` on 127.0.0.1, clients
//!   on keep-alive connections), one delivery at a time and 8 at once, with no handler
//!   and with one no-op handler, over a corpus of distinct signed events built from
//!   Stripe's example objects (customers, products, prices, subscriptions, invoices);
//!   events/s, p50 and p99 latency, and the ratio to the one-client floor;
//! - statements and commits per event, counted by diesel's instrumentation;
//! - the disk's own flush: `fdatasync` after 1, 12 and 32 pages written.
//!
//! Prints one JSON object per measurement (`scripts/bench.sh` turns them into
//! benches/README.md). Run: `cargo bench --all-features --bench ingest [-- EVENTS]`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::prelude::*;
use serde_json::{Value, json};
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::{Config, Event, Mirror, Secret, Webhooks};

const SECRET: &str = "whsec_bench";

// ---------------------------------------------------------------------------------
// Counting statements and commits

static STATEMENTS: AtomicU64 = AtomicU64::new(0);
static COMMITS: AtomicU64 = AtomicU64::new(0);
static AUTOCOMMITS: AtomicU64 = AtomicU64::new(0);

/// Counts every statement, every outer commit, and every statement run outside a
/// transaction (each its own commit; reads outside a transaction count too, so this
/// is an upper bound). diesel announces BEGIN, SAVEPOINT, COMMIT, RELEASE and ROLLBACK
/// with a transaction event just before their query: those are not statements.
#[derive(Default)]
struct Counter {
    depth: u32,
    control_next: bool,
    /// `STRIPE_MIRROR_BENCH_TIMING=1`: time per statement kind (for a profile).
    started: Option<(String, Instant)>,
}

static TIMING: std::sync::Mutex<Vec<(String, Duration)>> = std::sync::Mutex::new(Vec::new());

impl Instrumentation for Counter {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        // Read once: the counter runs on every statement of the measured path.
        static TIMED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *TIMED.get_or_init(|| std::env::var_os("STRIPE_MIRROR_BENCH_TIMING").is_some()) {
            match &event {
                InstrumentationEvent::StartQuery { query, .. } => {
                    let mut h = String::new();
                    let _ = std::fmt::write(&mut h, format_args!("{query}"));
                    let key: String = h.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
                    self.started = Some((key, Instant::now()));
                }
                InstrumentationEvent::FinishQuery { .. } => {
                    if let Some((k, t)) = self.started.take() {
                        TIMING.lock().unwrap().push((k, t.elapsed()));
                    }
                }
                _ => {}
            }
        }
        match event {
            InstrumentationEvent::StartQuery { .. } if self.control_next => {
                self.control_next = false
            }
            InstrumentationEvent::StartQuery { query, .. } => {
                STATEMENTS.fetch_add(1, Ordering::Relaxed);
                // Outside a transaction a write commits by itself (a read does not, nor
                // a PRAGMA: the checkpointer's copy of the WAL commits no transaction).
                // Only then is the text formatted: diesel builds a statement's whole SQL
                // to print even its first word, which on the writer's thread cost a
                // tenth of its time.
                if self.depth == 0 {
                    let head = head(query);
                    if !head.starts_with("SELECT") && !head.starts_with("PRAGMA") {
                        AUTOCOMMITS.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            InstrumentationEvent::BeginTransaction { depth, .. } => {
                self.control_next = true;
                self.depth = depth.get();
            }
            InstrumentationEvent::CommitTransaction { depth, .. } => {
                self.control_next = true;
                if depth.get() == 1 {
                    COMMITS.fetch_add(1, Ordering::Relaxed);
                }
                self.depth = depth.get() - 1;
            }
            InstrumentationEvent::RollbackTransaction { depth, .. } => {
                self.control_next = true;
                self.depth = depth.get() - 1;
            }
            _ => {}
        }
    }
}

/// The first word of a statement, without printing the values bound into it (diesel
/// still builds the statement's whole SQL text first).
fn head(query: &dyn std::fmt::Display) -> String {
    struct Head(String);
    impl std::fmt::Write for Head {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.push_str(s);
            if self.0.trim_start().len() >= 8 {
                Err(std::fmt::Error)
            } else {
                Ok(())
            }
        }
    }
    let mut h = Head(String::new());
    let _ = std::fmt::write(&mut h, format_args!("{query}"));
    h.0.trim_start().to_ascii_uppercase()
}

fn counts() -> (u64, u64) {
    (
        STATEMENTS.load(Ordering::Relaxed),
        COMMITS.load(Ordering::Relaxed) + AUTOCOMMITS.load(Ordering::Relaxed),
    )
}

// ---------------------------------------------------------------------------------
// The corpus

fn fixtures() -> Value {
    let all: Value =
        serde_json::from_str(include_str!("../tests/fixtures/stripe_fixtures3.json")).unwrap();
    all["resources"].clone()
}

/// `n` distinct events of mixed kinds, Stripe's example objects with their own ids.
fn corpus(n: usize) -> Vec<String> {
    let fx = fixtures();
    let t0 = chrono::Utc::now().timestamp() - 60;
    (0..n)
        .map(|i| {
            let k = i / 7; // each group of 7 events is about one customer
            let (kind, mut object) = match i % 7 {
                0 => ("customer.created", fx["customer"].clone()),
                1 => ("product.created", fx["product"].clone()),
                2 => ("price.created", fx["price"].clone()),
                3 => ("customer.subscription.created", fx["subscription"].clone()),
                4 => ("customer.subscription.updated", fx["subscription"].clone()),
                5 => ("customer.updated", fx["customer"].clone()),
                _ => ("invoice.paid", fx["invoice"].clone()),
            };
            object["livemode"] = json!(false);
            match kind {
                "customer.created" | "customer.updated" => {
                    object["id"] = json!(format!("cus_b{k}"));
                    object["email"] = json!(format!("user{k}-{i}@example.com"));
                    object["metadata"] = json!({"stripe_mirror_subscriber": format!("user-{k}")});
                }
                "product.created" => object["id"] = json!(format!("prod_b{k}")),
                "price.created" => {
                    object["id"] = json!(format!("price_b{k}"));
                    object["product"] = json!(format!("prod_b{k}"));
                }
                "invoice.paid" => {
                    object["id"] = json!(format!("in_b{k}"));
                    object["customer"] = json!(format!("cus_b{k}"));
                }
                _ => {
                    object["id"] = json!(format!("sub_b{k}"));
                    object["customer"] = json!(format!("cus_b{k}"));
                    if kind.ends_with("updated") {
                        object["status"] = json!("past_due");
                    }
                    if let Some(items) = object
                        .pointer_mut("/items/data")
                        .and_then(Value::as_array_mut)
                    {
                        for (j, item) in items.iter_mut().enumerate() {
                            item["id"] = json!(format!("si_b{k}_{j}"));
                            item["subscription"] = json!(format!("sub_b{k}"));
                        }
                    }
                }
            }
            json!({"id": format!("evt_b{i}"), "object": "event", "api_version": "2025-09-30.clover",
                   "type": kind, "created": t0 + i as i64, "livemode": false, "pending_webhooks": 1,
                   "request": {"id": null, "idempotency_key": null},
                   "data": {"object": object}})
            .to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Databases

enum Db {
    Sqlite(tempfile::TempDir),
    /// The database's URL, the server's admin URL and the database's name.
    Postgres(String, String, String),
}

/// A run's Postgres database is dropped when the run ends: left behind, its tables'
/// autovacuum would run during the next run, writing pages and WAL beside it.
impl Drop for Db {
    fn drop(&mut self) {
        if let Db::Postgres(_, admin, name) = self {
            run_sql(
                admin,
                &[&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")],
            );
        }
    }
}

impl Db {
    fn url(&self) -> String {
        match self {
            Db::Sqlite(dir) => format!("sqlite://{}", dir.path().join("bench.db").display()),
            Db::Postgres(url, ..) => url.clone(),
        }
    }
}

/// A fresh, empty database of the backend.
fn fresh(backend: &str, admin: Option<&str>) -> Db {
    static N: AtomicU64 = AtomicU64::new(0);
    match backend {
        "sqlite" => Db::Sqlite(tempfile::tempdir().unwrap()),
        _ => {
            let admin = admin.expect("a Postgres admin url");
            let name = format!(
                "bench_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let mut conn = PgConnection::establish(admin).unwrap();
            diesel::sql_query(format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .unwrap();
            // Keeps the options after `?` (scripts/postgres.sh's gssencmode=disable).
            let (server, options) = admin.split_once('?').unwrap_or((admin, ""));
            let base = server.rsplit_once('/').unwrap().0;
            Db::Postgres(format!("{base}/{name}?{options}"), admin.to_owned(), name)
        }
    }
}

// ---------------------------------------------------------------------------------
// The floor

/// One `INSERT` of `body` per transaction, `clients` connections, `n` rows in all.
fn floor(backend: &str, admin: Option<&str>, body: &str, clients: usize, n: usize) -> f64 {
    let db = fresh(backend, admin);
    let url = db.url();
    let setup = match backend {
        "sqlite" => "CREATE TABLE floor (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
        _ => "CREATE TABLE floor (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)",
    };
    run_sql(&url, &[setup]);
    if let Some(path) = url.strip_prefix("sqlite://") {
        // Once, before the clients: WAL is kept in the file, and 8 connections switching
        // the journal mode at once can find the database locked.
        let mut c = SqliteConnection::establish(path).unwrap();
        diesel::connection::SimpleConnection::batch_execute(&mut c, "PRAGMA journal_mode = WAL")
            .unwrap();
    }
    settle(&url);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..clients {
            let url = url.clone();
            s.spawn(move || {
                let per = n / clients;
                match url.strip_prefix("sqlite://") {
                    Some(path) => {
                        let mut c = SqliteConnection::establish(path).unwrap();
                        // The mirror's own settings (db::SqlitePragmas).
                        diesel::connection::SimpleConnection::batch_execute(
                            &mut c,
                            "PRAGMA busy_timeout = 10000; PRAGMA synchronous = FULL;",
                        )
                        .unwrap();
                        for _ in 0..per {
                            diesel::sql_query("INSERT INTO floor (body) VALUES (?)")
                                .bind::<diesel::sql_types::Text, _>(body)
                                .execute(&mut c)
                                .unwrap();
                        }
                    }
                    None => {
                        let mut c = PgConnection::establish(&url).unwrap();
                        for _ in 0..per {
                            diesel::sql_query("INSERT INTO floor (body) VALUES ($1)")
                                .bind::<diesel::sql_types::Text, _>(body)
                                .execute(&mut c)
                                .unwrap();
                        }
                    }
                }
            });
        }
    });
    n as f64 / start.elapsed().as_secs_f64()
}

/// The disk's own cost of a durable write of `pages` 4 KiB pages: written over a file
/// where SQLite's files go (overwriting, as a WAL reused after a checkpoint does), then
/// `fdatasync`; the median of `n` rounds, in µs. A delivery writes about 10 pages to the
/// floor's one or two (the event, its delivery, the object, their indexes), and on this
/// kind of disk the flush grows with every page.
fn flush_us(pages: usize, n: usize) -> f64 {
    use std::io::{Seek, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut file = std::fs::File::create(dir.path().join("flush")).unwrap();
    let page = vec![0x5a_u8; 4096];
    let write = |file: &mut std::fs::File| {
        file.rewind().unwrap();
        for _ in 0..pages {
            file.write_all(&page).unwrap();
        }
    };
    // Allocated and on disk first: the rounds overwrite, as a reused WAL does.
    write(&mut file);
    file.sync_all().unwrap();
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            write(&mut file);
            file.sync_data().unwrap();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[n / 2]
}

/// Before a timed run on Postgres: a `CHECKPOINT`, so that no run pays for the pages
/// the one before it left dirty (the server's own checkpoint would write them during
/// the next run, whichever it is). The floors and the ingest runs all start so.
fn settle(url: &str) {
    if !url.starts_with("sqlite://") {
        run_sql(url, &["CHECKPOINT"]);
    }
}

fn run_sql(url: &str, sql: &[&str]) {
    match url.strip_prefix("sqlite://") {
        Some(path) => {
            let mut c = SqliteConnection::establish(path).unwrap();
            for s in sql {
                diesel::sql_query(*s).execute(&mut c).unwrap();
            }
        }
        None => {
            let mut c = PgConnection::establish(url).unwrap();
            for s in sql {
                diesel::sql_query(*s).execute(&mut c).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Ingest over HTTP

struct Ingest {
    events_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    statements: f64,
    commits: f64,
    non_200: usize,
}

fn ingest(
    rt: &tokio::runtime::Runtime,
    url: &str,
    handler: bool,
    clients: usize,
    corpus: &[String],
) -> Ingest {
    let mut config = Config::new(url.to_owned()).webhook_secret(SECRET);
    config.pool_size = 16;
    let mirror = rt.block_on(Mirror::connect(config)).unwrap();
    let mut webhooks = Webhooks::new();
    if handler {
        webhooks = webhooks.on_any(|_e: Event, _m: Mirror| async { Ok(()) });
    }
    let app = stripe_mirror::axum::webhook_router(mirror, webhooks);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = rt.spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap()
    });
    let endpoint = format!("http://{addr}/stripe/webhook");
    let secret = Secret::new(SECRET);
    // Signed now: the run ends well within the 5-minute tolerance.
    let signed: Vec<(String, &String)> = corpus
        .iter()
        .map(|b| {
            (
                sign(b.as_bytes(), &secret, chrono::Utc::now().timestamp()),
                b,
            )
        })
        .collect();
    settle(url);
    let before = counts();
    let (elapsed, results) = post_all(&endpoint, &signed, clients);
    let after = counts();
    server.abort();
    let mut latencies: Vec<Duration> = results.iter().flat_map(|(l, _)| l.clone()).collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let n = corpus.len() as f64;
    Ingest {
        events_per_s: n / elapsed.as_secs_f64(),
        p50_ms: pct(0.50).as_secs_f64() * 1e3,
        p99_ms: pct(0.99).as_secs_f64() * 1e3,
        statements: (after.0 - before.0) as f64 / n,
        commits: (after.1 - before.1) as f64 / n,
        non_200: results.iter().map(|(_, b)| b).sum(),
    }
}

/// Posts every signed body once, from `clients` keep-alive `ureq` agents; the run's
/// time and, per client, the latencies and the answers that were not 200.
type Signed<'a> = [(String, &'a String)];
fn post_all(
    endpoint: &str,
    signed: &Signed<'_>,
    clients: usize,
) -> (Duration, Vec<(Vec<Duration>, usize)>) {
    let start = Instant::now();
    let results: Vec<(Vec<Duration>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (endpoint, signed) = (&endpoint, &signed);
                s.spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .into();
                    let mut latencies = Vec::new();
                    let mut bad = 0;
                    for (sig, body) in signed.iter().skip(c).step_by(clients) {
                        let t = Instant::now();
                        let status = agent
                            .post(*endpoint)
                            .header("Stripe-Signature", sig)
                            .header("Content-Type", "application/json")
                            .send(body.as_str())
                            .map(|mut r| {
                                // Read to the end, or the connection is not reused.
                                let _ = r.body_mut().read_to_string();
                                r.status().as_u16()
                            })
                            .unwrap_or(0);
                        latencies.push(t.elapsed());
                        if status != 200 {
                            bad += 1;
                        }
                    }
                    (latencies, bad)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (start.elapsed(), results)
}

/// The HTTP floor: the same clients posting the same bodies to an axum route that
/// reads each body and answers 200 without touching a database. What a delivery costs
/// before the mirror does anything (requests/s, p50 ms).
fn http_floor(rt: &tokio::runtime::Runtime, corpus: &[String], clients: usize) -> (f64, f64) {
    let app = axum::Router::new().route(
        "/stripe/webhook",
        axum::routing::post(|body: axum::body::Bytes| async move {
            std::hint::black_box(body.len());
            "{}"
        }),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let endpoint = format!("http://{addr}/stripe/webhook");
    let signed: Vec<(String, &String)> =
        corpus.iter().map(|b| ("t=0,v1=0".to_owned(), b)).collect();
    let (elapsed, results) = post_all(&endpoint, &signed, clients);
    server.abort();
    let mut latencies: Vec<Duration> = results.iter().flat_map(|(l, _)| l.clone()).collect();
    latencies.sort();
    let p50 = latencies[latencies.len() / 2].as_secs_f64() * 1e3;
    (corpus.len() as f64 / elapsed.as_secs_f64(), p50)
}

fn main() {
    diesel::connection::set_default_instrumentation(|| Some(Box::new(Counter::default())))
        .expect("instrumentation");
    let events: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3_500);
    let corpus = corpus(events);
    let mean_body = corpus.iter().map(String::len).sum::<usize>() / corpus.len();
    let body = &corpus[3]; // a subscription event, the commonest large one
    let admin = std::env::var("STRIPE_MIRROR_BENCH_POSTGRES").ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut backends = vec!["sqlite"];
    if admin.is_some() {
        backends.push("postgres");
    }
    println!(
        "{}",
        json!({"corpus": {"events": events, "mean_body_bytes": mean_body}})
    );
    // `STRIPE_MIRROR_BENCH_ONLY=sqlite:8:false`: one ingest run (for a profiler), or several
    // comma separated; `=http`: the HTTP floor.
    if let Ok(only) = std::env::var("STRIPE_MIRROR_BENCH_ONLY") {
        if only == "http" {
            for clients in [1, 8] {
                let (rate, p50) = http_floor(&rt, &corpus, clients);
                println!(
                    "{}",
                    json!({"http_floor": clients, "requests_per_s": rate, "p50_ms": p50})
                );
            }
            return;
        }
        // Several, comma separated, run in order in this one process.
        for one in only.split(',') {
            let parts: Vec<&str> = one.split(':').collect();
            let db = fresh(parts[0], admin.as_deref());
            let r = ingest(
                &rt,
                &db.url(),
                parts[2] == "true",
                parts[1].parse().unwrap(),
                &corpus,
            );
            println!(
                "{}",
                json!({"only": one, "events_per_s": r.events_per_s, "p50_ms": r.p50_ms,
                "statements_per_event": r.statements, "commits_per_event": r.commits, "non_200": r.non_200})
            );
        }
        let mut by: std::collections::BTreeMap<String, (usize, Duration)> = Default::default();
        for (k, d) in TIMING.lock().unwrap().iter() {
            let e = by.entry(k.clone()).or_default();
            e.0 += 1;
            e.1 += *d;
        }
        for (k, (n, d)) in by {
            eprintln!("{n:>6} {:>8.1} us  {k}", d.as_secs_f64() * 1e6 / n as f64);
        }
        return;
    }
    // The disk under both floors: a flush of 1, 12 and 32 pages.
    let flush: Vec<(usize, f64)> = [1, 12, 32].iter().map(|&p| (p, flush_us(p, 300))).collect();
    println!(
        "{}",
        json!({"disk_flush_us": flush.iter().map(|(p, us)| (p.to_string(), json!(us))).collect::<serde_json::Map<_, _>>()})
    );
    let (http1, http1_p50) = http_floor(&rt, &corpus, 1);
    let (http8, http8_p50) = http_floor(&rt, &corpus, 8);
    println!(
        "{}",
        json!({"http_floor": {"clients_1": http1, "p50_ms_1": http1_p50, "clients_8": http8, "p50_ms_8": http8_p50}})
    );
    for backend in backends {
        let admin = admin.as_deref();
        let floor1 = floor(backend, admin, body, 1, events);
        let floor8 = floor(backend, admin, body, 8, events);
        println!(
            "{}",
            json!({"backend": backend, "floor": {"clients_1": floor1, "clients_8": floor8, "body_bytes": body.len()}})
        );
        for clients in [1, 8] {
            for handler in [false, true] {
                let db = fresh(backend, admin);
                let r = ingest(&rt, &db.url(), handler, clients, &corpus);
                println!(
                    "{}",
                    json!({"backend": backend, "ingest": {"clients": clients, "handler": handler,
                        "events_per_s": r.events_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                        "ratio_to_floor_1": r.events_per_s / floor1,
                        "statements_per_event": r.statements, "commits_per_event": r.commits,
                        "non_200": r.non_200}})
                );
            }
        }
    }
}
