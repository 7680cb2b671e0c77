//! The `stripe-mirror` command: migrate, sync, demo products, replay events, prune the
//! webhook log, API keys, a webhook server, and `doctor`. It parses arguments, calls the
//! library and prints: plain lines by default, one JSON document on stdout with `--json`
//! (`sync`, `process-events`, `api-keys list`, `doctor`), progress on stderr.
//!
//! Settings come from the environment (`DATABASE_URL`, `STRIPE_*`; see the crate docs).
//!
//! Exit status: 0 done; 1 the command failed (nothing or part of it done, the error on
//! stderr); 2 it ran to its end but some objects or events failed (`sync`,
//! `process-events`, `reconcile`: listed in its output), so cron and CI notice.

use std::error::Error as StdError;
use std::io::{self, BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use stripe_mirror::models::api_key::parse_key;
use stripe_mirror::webhooks::EventFilter;
use stripe_mirror::{
    ApiKey, ApiKeyKind, Config, Mirror, Secret, SyncOptions, SyncProgress, SyncReport, Webhooks,
};

type BoxError = Box<dyn StdError>;

/// Keeps a local SQL mirror of a Stripe account.
#[derive(Parser)]
#[command(
    name = "stripe-mirror",
    version,
    about,
    after_help = "Exit status: 0 done; 1 failed; 2 ran to its end but some objects or events failed (listed)."
)]
struct Cli {
    /// Database URL (overrides DATABASE_URL).
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations.
    Migrate,
    /// Mirror every object of these kinds from Stripe (default: all). Progress goes to
    /// stderr: a bar per kind on a terminal, a `kind: count` line per page otherwise.
    Sync {
        /// customer, product, price, subscription
        objects: Vec<String>,
        /// Stop at the first object that cannot be mirrored.
        #[arg(long)]
        fail_fast: bool,
        /// Also tombstone mirrored objects Stripe no longer has (deleted while their
        /// webhooks were missed): those each list leaves out are re-fetched.
        #[arg(long)]
        remove_missing: bool,
        /// Print the counts per kind and the failures as one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Create (once) the Basic, Starter and Pro demo products in test mode.
    BootstrapDemoProducts,
    /// Re-run stored webhook events (with no option: the failed ones).
    ProcessEvents {
        /// Events whose processing failed.
        #[arg(long)]
        failed: bool,
        /// These event ids (repeatable).
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Events whose type matches, e.g. `customer.*`.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Print the report as one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Delete deliveries and processed events older than a duration; failed and
    /// pending events, and their deliveries, are kept.
    Prune {
        /// Age to keep: a number and a unit, e.g. 30d, 72h; at least 3 days (Stripe
        /// retries an event that long).
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
    },
    /// Re-fetch what the mirror cannot vouch for: rows flagged by same-second ties,
    /// objects of events whose sync failed, and objects of the events Stripe sent in
    /// the window (webhooks missed). Schedule it hourly with `--since 2h`.
    Reconcile {
        /// Window of events to check: a number and a unit, e.g. 1h, 2h, 3d.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        since: Duration,
    },
    /// Manage Stripe API keys stored in the database.
    #[command(subcommand)]
    ApiKeys(ApiKeys),
    /// Serve the webhook endpoint at /stripe/webhook.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
    },
    /// Check the setup: the database opens, migrations are applied, keys for the mode
    /// and the webhook secret are set, and Stripe accepts the secret key. One line per
    /// check, `ok ...` or `FAIL ... -> fix: ...`; exit code 1 when any check fails.
    Doctor {
        /// Do not call Stripe (the secret key is not tried).
        #[arg(long)]
        offline: bool,
        /// Print the checks as one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ApiKeys {
    /// Store a key (its kind and mode come from its prefix). Without KEY or
    /// --from-env, one line is read from stdin (hidden at a terminal), so the key
    /// stays out of the shell history.
    Add {
        /// The key: pk_, sk_ or rk_, then test_ or live_. Prefer stdin or --from-env.
        key: Option<String>,
        /// Read the key from this environment variable.
        #[arg(long, value_name = "VAR", conflicts_with = "key")]
        from_env: Option<String>,
    },
    /// List stored keys, masked.
    List {
        /// Print the keys (masked) as one JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove a stored key by its id.
    Remove {
        /// The id shown by `list`.
        id: String,
    },
    /// Encrypt every stored key with STRIPE_MIRROR_ENCRYPTION_KEY: plaintext keys and
    /// keys sealed with one of STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS (rotation). Every
    /// command that connects does this too; this one says how many it changed.
    Encrypt,
    /// Print a new random encryption key (64 hex characters) for
    /// STRIPE_MIRROR_ENCRYPTION_KEY. Touches no database.
    NewEncryptionKey,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // r2d2 logs each failed connection attempt; the command's own error says it once.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,r2d2=off".into()),
        )
        .with_writer(|| LogWriter)
        .init();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of a command that ran to its end with `failed` items left over.
fn finished(failed: usize) -> ExitCode {
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

async fn run(cli: Cli) -> Result<ExitCode, BoxError> {
    // doctor opens the database without migrating and reports a bad environment as a
    // failed check; key input is read before connecting.
    let key_input = match cli.command {
        Command::Doctor { offline, json } => {
            return Ok(doctor(cli.database_url, offline, json).await);
        }
        Command::ApiKeys(ApiKeys::Add {
            ref key,
            ref from_env,
        }) => Some(read_key(key.clone(), from_env.as_deref())?),
        Command::ApiKeys(ApiKeys::NewEncryptionKey) => {
            println!("{}", stripe_mirror::EncryptionKey::generate_hex());
            return Ok(ExitCode::SUCCESS);
        }
        _ => None,
    };
    let mut config = Config::from_env()?;
    if let Some(url) = cli.database_url {
        config.database_url = url;
    }
    // Which database, on every command: with no DATABASE_URL the embedded default
    // (./stripe-mirror.db) is used, which a deploy job meant for Postgres must notice.
    eprintln!("database: {}", config.database_url_redacted());
    if let Command::ApiKeys(ApiKeys::Encrypt) = cli.command {
        // Opened without `connect`'s own sealing, to count what this run changes.
        let current = config.encryption_key.as_ref().map(|k| k.id().to_owned());
        let mirror = Mirror::open(config).await?;
        mirror.migrate().await?;
        let changed = ApiKey::encrypt_stored(&mirror).await?;
        let current = current.unwrap_or_default();
        // What changed is said even when a row no configured key opens remains.
        return Ok(match ApiKey::list(&mirror).await {
            Ok(keys) => {
                println!(
                    "sealed {changed} of {} stored keys with encryption key {current}",
                    keys.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                println!("sealed {changed} stored keys with encryption key {current}");
                eprintln!("error: {err}; remove that row with `stripe-mirror api-keys remove`");
                ExitCode::FAILURE
            }
        });
    }
    let mirror = Mirror::connect(config).await?;
    match cli.command {
        Command::Migrate => println!("database is up to date"),
        Command::Sync {
            objects,
            fail_fast,
            remove_missing,
            json,
        } => {
            let mut options = SyncOptions::default()
                .fail_fast(fail_fast)
                .remove_missing(remove_missing);
            if !objects.is_empty() {
                options = options.objects(&objects.iter().map(String::as_str).collect::<Vec<_>>());
            }
            let mut view = SyncView::new(&options.objects);
            // Bars on the screen stdout goes to already show the counts.
            let counts_shown = view.bars.is_some() && io::stdout().is_terminal();
            let result = stripe_mirror::sync_all(&mirror, &options, |p| view.progress(p)).await;
            view.finish(result.as_ref().ok());
            let report = result?;
            if json {
                print_json(&sync_json(&report))?;
                return Ok(finished(report.failures.len()));
            } else {
                for (kind, count) in report.counts.iter().filter(|_| !counts_shown) {
                    println!("{kind}: {count}");
                }
                for (kind, count) in report.removed.iter().filter(|(_, n)| **n > 0) {
                    println!("{kind}: {count} gone from Stripe, now tombstones");
                }
                for failure in &report.failures {
                    println!("failed {failure}");
                }
                return Ok(finished(report.failures.len()));
            }
        }
        Command::BootstrapDemoProducts => {
            for plan in stripe_mirror::bootstrap_demo_products(&mirror).await? {
                println!(
                    "{} {} monthly={} yearly={}",
                    plan.key, plan.product.id, plan.monthly.id, plan.yearly.id
                );
            }
        }
        Command::ProcessEvents {
            failed,
            ids,
            event_type,
            json,
        } => {
            let filter = EventFilter {
                failed: failed || (ids.is_empty() && event_type.is_none()),
                ids,
                event_type,
            };
            // No host handlers here: the built-in sync is re-run, handler work stays pending.
            let report = Webhooks::new().process_events(&mirror, &filter).await?;
            if json {
                print_json(&json!({
                    "processed": report.processed,
                    "handlers_pending": report.handlers_pending,
                    "busy": report.busy,
                    "failed": report
                        .failed
                        .iter()
                        .map(|(id, error)| json!({ "id": id, "error": error }))
                        .collect::<Vec<_>>(),
                    "not_found": report.not_found,
                }))?;
                return Ok(finished(report.failed.len() + report.not_found.len()));
            }
            println!(
                "processed {}, failed {}, busy {}, handler work pending {}",
                report.processed,
                report.failed.len(),
                report.busy,
                report.handlers_pending
            );
            if report.handlers_pending > 0 {
                println!(
                    "events with handler work pending stay failed: the host app's handlers run them on Stripe's next delivery or its own Webhooks::process_events"
                );
            }
            for (id, error) in &report.failed {
                println!("failed {id}: {error}");
            }
            for id in &report.not_found {
                println!("not found {id}: no stored event has this id");
            }
            return Ok(finished(report.failed.len() + report.not_found.len()));
        }
        Command::Prune { older_than } => {
            let report = stripe_mirror::webhooks::prune(&mirror, older_than).await?;
            println!(
                "removed {} deliveries and {} processed events",
                report.deliveries, report.events
            );
        }
        Command::Reconcile { since } => {
            let report = stripe_mirror::reconcile(&mirror, since).await?;
            println!(
                "re-fetched {}, tombstoned {}, failed {}, checkout sessions linked {}",
                report.refetched,
                report.tombstoned,
                report.failed.len(),
                report.checkout_sessions
            );
            for (kind, id, error) in &report.failed {
                println!("failed {kind} {id}: {error}");
            }
            return Ok(finished(report.failed.len()));
        }
        Command::ApiKeys(ApiKeys::Add { .. }) => {
            let secret = key_input.expect("read above");
            let key = ApiKey::get_or_create(&mirror, secret.expose()).await?;
            println!("{}", key_line(&key));
        }
        Command::ApiKeys(ApiKeys::List { json }) => {
            let keys = ApiKey::list(&mirror).await?;
            if json {
                print_json(&Value::Array(keys.iter().map(key_json).collect()))?;
            } else {
                for key in keys {
                    println!("{}", key_line(&key));
                }
            }
        }
        Command::ApiKeys(ApiKeys::Remove { id }) => {
            if !ApiKey::remove(&mirror, &id).await? {
                return Err(format!("no stored key with id {id}").into());
            }
            println!("removed {id}");
        }
        Command::Serve { listen } => {
            // Up and refusing every delivery would look healthy while Stripe gives up.
            if mirror.config().webhook_secrets.is_empty() {
                return Err(
                    "STRIPE_WEBHOOK_SECRET is not set: every delivery would be refused; \
                     set it to the endpoint's signing secret (whsec_...)"
                        .into(),
                );
            }
            let listener = tokio::net::TcpListener::bind(listen).await?;
            let path = stripe_mirror::axum::WEBHOOK_PATH;
            println!("listening on http://{}{path}", listener.local_addr()?);
            let stop = async {
                stripe_mirror::axum::shutdown_signal().await;
                eprintln!("stopping: answering the deliveries in flight");
            };
            stripe_mirror::axum::serve_with_shutdown(mirror, Webhooks::new(), listener, stop)
                .await?;
        }
        Command::Doctor { .. } | Command::ApiKeys(ApiKeys::Encrypt | ApiKeys::NewEncryptionKey) => {
            unreachable!("handled before connecting")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One JSON document on stdout, pretty-printed, with a final newline.
fn print_json(value: &Value) -> io::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)
}

/// `sync --json`: `{"counts": {kind: n}, "removed": {kind: n}, "failures": [{"object",
/// "id", "error"}]}`.
fn sync_json(report: &SyncReport) -> Value {
    json!({
        "counts": report.counts,
        "removed": report.removed,
        "failures": report
            .failures
            .iter()
            .map(|f| json!({ "object": f.object, "id": f.id, "error": f.error }))
            .collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------------
// API keys

/// The key for `api-keys add`: the argument, the named environment variable, or one
/// line of stdin (read without echo when stdin and stderr are a terminal).
fn read_key(arg: Option<String>, from_env: Option<&str>) -> Result<Secret, BoxError> {
    if let Some(key) = arg {
        if io::stdin().is_terminal() {
            eprintln!(
                "note: a key given as an argument stays in your shell history; next time pipe it on stdin or use --from-env VAR"
            );
        }
        return Ok(Secret::new(key));
    }
    if let Some(var) = from_env {
        return match std::env::var(var) {
            Ok(value) if !value.trim().is_empty() => Ok(Secret::new(value.trim())),
            Ok(_) => Err(format!("environment variable {var} is empty").into()),
            Err(std::env::VarError::NotPresent) => {
                Err(format!("environment variable {var} is not set").into())
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("environment variable {var} is not valid UTF-8").into())
            }
        };
    }
    let line = if io::stdin().is_terminal() && io::stderr().is_terminal() {
        let term = console::Term::stderr();
        term.write_str("Stripe API key (input hidden): ")?;
        term.read_secure_line()?
    } else {
        let mut line = String::new();
        io::stdin().lock().read_line(&mut line)?;
        line
    };
    let key = line.trim();
    if key.is_empty() {
        return Err("no key on stdin: pipe one line (`stripe-mirror api-keys add < key.txt`), use --from-env VAR, or give it as an argument".into());
    }
    Ok(Secret::new(key))
}

/// One stored key as `list` and `add` print it: id, kind, mode, the key masked.
fn key_line(key: &ApiKey) -> String {
    let mode = if key.livemode { "live" } else { "test" };
    format!("{} {} {mode} {key}", key.id, key.kind.as_str())
}

/// One stored key as `list --json` prints it; `key` is masked, the secret never shown.
fn key_json(key: &ApiKey) -> Value {
    json!({
        "id": key.id,
        "kind": key.kind.as_str(),
        "livemode": key.livemode,
        "name": key.name,
        "created_at": key.created_at,
        "key": key.to_string(),
    })
}

// ---------------------------------------------------------------------------------
// Progress of `sync`

/// The progress bars while they are on screen, so log lines print above them.
static BARS: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// stderr for tracing: suspends the progress bars around each log line.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bars = BARS.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match bars {
            Some(bars) => bars.suspend(|| io::stderr().write(buf)),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

fn stderr_is_terminal() -> bool {
    io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// How `sync` shows progress: a spinner per kind on a terminal (`bars`), else a
/// `product: 100` line on stderr after each page.
struct SyncView {
    bars: Option<Bars>,
}

/// One bar per kind, in sync order; `current` is the kind being fetched.
struct Bars {
    multi: MultiProgress,
    bars: Vec<KindBar>,
    current: usize,
}

struct KindBar {
    bar: ProgressBar,
    /// A page of this kind was reported.
    reported: bool,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

impl SyncView {
    fn new(kinds: &[String]) -> Self {
        if !stderr_is_terminal() {
            return SyncView { bars: None };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let mut bars = Bars {
            bars: Vec::new(),
            multi: multi.clone(),
            current: 0,
        };
        for kind in kinds {
            bars.push(kind);
        }
        *BARS.lock().unwrap_or_else(PoisonError::into_inner) = Some(multi);
        bars.start();
        SyncView { bars: Some(bars) }
    }

    /// After each page: the count of the kind being synced.
    fn progress(&mut self, p: &SyncProgress) {
        match &mut self.bars {
            None => eprintln!("{}: {}", p.object, p.done),
            Some(bars) => bars.progress(p),
        }
    }

    /// After `sync_all`: every bar done with the report's numbers, or on an error the
    /// current one marked failed and the waiting ones cleared.
    fn finish(self, report: Option<&SyncReport>) {
        if let Some(mut bars) = self.bars {
            match report {
                Some(report) => {
                    while bars.current < bars.bars.len() {
                        bars.finish_current(Some(report));
                        bars.current += 1;
                    }
                }
                None => {
                    for (i, b) in bars.bars.iter().enumerate() {
                        if i == bars.current {
                            b.bar.set_style(style(
                                "{prefix:.bold.red}: {human_pos} mirrored, then failed",
                            ));
                            b.bar.abandon();
                        } else if i > bars.current {
                            b.bar.finish_and_clear();
                        }
                    }
                }
            }
            *BARS.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

impl Bars {
    /// A waiting bar for `kind`, below the others.
    fn push(&mut self, kind: &str) {
        let bar = self.multi.add(
            ProgressBar::new_spinner()
                .with_style(style("  {prefix:.dim}: waiting"))
                .with_prefix(kind.to_owned()),
        );
        bar.tick();
        self.bars.push(KindBar {
            bar,
            reported: false,
        });
    }

    /// Marks the current bar as the one being fetched.
    fn start(&self) {
        if let Some(b) = self.bars.get(self.current) {
            b.bar.reset_elapsed();
            b.bar.set_style(style(
                "{spinner:.cyan} {prefix:.bold}: {human_pos} mirrored ({elapsed})",
            ));
            b.bar.enable_steady_tick(Duration::from_millis(100));
        }
    }

    fn progress(&mut self, p: &SyncProgress) {
        // sync_all goes kind by kind: a page of another kind means the current is done.
        if self
            .bars
            .get(self.current)
            .is_some_and(|b| b.reported && *b.bar.prefix() != p.object)
        {
            self.finish_current(None);
            self.current += 1;
            self.start();
        }
        if self.current == self.bars.len() {
            // A kind not named up front: a bar of its own.
            self.push(&p.object);
            self.start();
        }
        let b = &mut self.bars[self.current];
        if *b.bar.prefix() != p.object {
            // The kind as sync_all names it (`prices` asked, `price` synced).
            b.bar.set_prefix(p.object.clone());
        }
        b.reported = true;
        b.bar.set_position(p.done as u64);
    }

    /// Leaves the current bar on screen as done, with the report's numbers if any.
    fn finish_current(&self, report: Option<&SyncReport>) {
        let Some(b) = self.bars.get(self.current) else {
            return;
        };
        let kind = b.bar.prefix();
        let mut message = String::new();
        if let Some(report) = report {
            if let Some(count) = report.counts.get(&kind) {
                b.bar.set_position(*count as u64);
            }
            let failed = report.failures.iter().filter(|f| f.object == kind).count();
            if failed > 0 {
                message = format!(", {failed} failed");
            }
        }
        b.bar.set_style(style(
            "{prefix:.bold.green}: {human_pos} mirrored{msg} in {elapsed}",
        ));
        b.bar.finish_with_message(message);
    }
}

// ---------------------------------------------------------------------------------
// doctor

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Fail,
    Skip,
}

struct Check {
    name: String,
    status: Status,
    detail: String,
    fix: Option<String>,
}

/// The checks of `doctor`, printed as they are made (or kept for `--json`), with any
/// password or secret scrubbed from what is shown.
struct Doctor {
    json: bool,
    scrub: Vec<String>,
    checks: Vec<Check>,
}

impl Doctor {
    fn clean(&self, text: impl std::fmt::Display) -> String {
        // One line: newlines and tabs of nested errors become single spaces.
        let mut text = text
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for secret in &self.scrub {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }

    fn add(&mut self, name: &str, status: Status, detail: String, fix: Option<String>) {
        let check = Check {
            name: name.to_owned(),
            status,
            detail: self.clean(detail),
            fix: fix.map(|f| self.clean(f)),
        };
        if !self.json {
            let word = match status {
                Status::Ok => "ok",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            let mut line = format!("{word} {}: {}", check.name, check.detail);
            if let Some(fix) = &check.fix {
                line.push_str(&format!(" -> fix: {fix}"));
            }
            println!("{line}");
        }
        self.checks.push(check);
    }

    fn ok(&mut self, name: &str, detail: impl Into<String>) {
        self.add(name, Status::Ok, detail.into(), None);
    }

    fn fail(&mut self, name: &str, detail: impl std::fmt::Display, fix: impl Into<String>) {
        self.add(name, Status::Fail, detail.to_string(), Some(fix.into()));
    }

    fn skip(&mut self, name: &str, why: impl Into<String>) {
        self.add(name, Status::Skip, why.into(), None);
    }

    fn finish(self) -> ExitCode {
        let ok = self.checks.iter().all(|c| c.status != Status::Fail);
        if self.json {
            let checks: Vec<Value> = self
                .checks
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "status": match c.status {
                            Status::Ok => "ok",
                            Status::Fail => "fail",
                            Status::Skip => "skip",
                        },
                        "detail": c.detail,
                        "fix": c.fix,
                    })
                })
                .collect();
            if let Err(err) = print_json(&json!({ "ok": ok, "checks": checks })) {
                eprintln!("error: {err}");
                return ExitCode::FAILURE;
            }
        }
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// Where the secret key in use comes from, for the online check.
enum KeySource {
    Stored(String),
    Env,
}

const CHECK_API: &str = "Stripe accepts the secret key";

async fn doctor(database_url: Option<String>, offline: bool, json: bool) -> ExitCode {
    let mut d = Doctor {
        json,
        scrub: Vec::new(),
        checks: Vec::new(),
    };
    let mut config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            d.fail(
                "environment",
                err,
                "correct the variable named above (README, Environment)",
            );
            return d.finish();
        }
    };
    if let Some(url) = database_url {
        config.database_url = url;
    }
    // Anything secret that an error message might repeat is never shown.
    d.scrub.extend(
        stripe_mirror::db::url_passwords(&config.database_url)
            .into_iter()
            .filter(|p| p.len() >= 3),
    );
    for secret in [
        &config.secret_key,
        &config.test_secret_key,
        &config.live_secret_key,
    ]
    .into_iter()
    .flatten()
    .chain(&config.webhook_secrets)
    {
        if secret.expose().len() >= 8 {
            d.scrub.push(secret.expose().to_owned());
        }
    }
    // One quick try per Stripe call: doctor answers now, it does not wait out an outage.
    config.stripe_retries = 0;
    config.stripe_timeout = Duration::from_secs(15);

    let live = config.live_mode;
    let (mode, env_mode) = if live {
        ("live", "LIVE")
    } else {
        ("test", "TEST")
    };
    d.ok(
        "mode",
        if live {
            "live (STRIPE_LIVE_MODE is true)"
        } else {
            "test (STRIPE_LIVE_MODE is not true)"
        },
    );

    let shown_url = config.database_url_redacted();
    let mirror = match Mirror::open(config.clone()).await {
        Ok(mirror) => {
            d.ok(
                "database",
                format!(
                    "{shown_url} opens ({})",
                    format!("{:?}", mirror.backend()).to_lowercase()
                ),
            );
            Some(mirror)
        }
        Err(err) => {
            d.fail(
                "database",
                // The library's error names the URL (password masked) when it can.
                if err.to_string().contains(&shown_url) {
                    err.to_string()
                } else {
                    format!("{shown_url}: {err}")
                },
                "set DATABASE_URL (or --database-url) to sqlite://PATH or postgres://USER:PASSWORD@HOST/DB, and check that the server is up and the credentials are right",
            );
            None
        }
    };

    let mut schema_ok = false;
    if mirror.is_some() {
        let url = config.database_url.clone();
        match tokio::task::spawn_blocking(move || migrations::status(&url)).await {
            Ok(Ok(status)) if status.pending.is_empty() => {
                schema_ok = true;
                d.ok(
                    "migrations",
                    format!("{} applied, none pending", status.applied),
                );
            }
            Ok(Ok(status)) => d.fail(
                "migrations",
                format!(
                    "{} pending ({}), {} applied",
                    status.pending.len(),
                    status.pending.join(", "),
                    status.applied
                ),
                if status.applied == 0 {
                    "run `stripe-mirror migrate`; nothing is applied yet, so if your app already uses a database, check that DATABASE_URL points at it"
                } else {
                    "run `stripe-mirror migrate` (or `Mirror::migrate` when your app starts)"
                },
            ),
            Ok(Err(err)) => d.fail(
                "migrations",
                format!("cannot read the applied migrations: {err}"),
                "check that the database user may read __diesel_schema_migrations, then run `stripe-mirror migrate`",
            ),
            Err(err) => d.fail(
                "migrations",
                err,
                "run `stripe-mirror doctor` again; report a bug if this repeats",
            ),
        }
    } else {
        d.skip("migrations", "the database does not open");
    }

    // The secret key, as the library picks it: a stored secret key, the environment,
    // then a stored restricted key.
    let secret_name = format!("secret key ({mode} mode)");
    let env_secret = if config.secret_key.is_some() {
        "STRIPE_SECRET_KEY".to_owned()
    } else {
        format!("STRIPE_{env_mode}_SECRET_KEY")
    };
    let add_secret_fix = format!(
        "store one with `stripe-mirror api-keys add` (paste the sk_{mode}_ key on stdin), or set STRIPE_{env_mode}_SECRET_KEY"
    );
    let mut usable_secret: Option<(Secret, KeySource)> = None;
    match &mirror {
        None => d.skip(&secret_name, "the database does not open"),
        Some(mirror) => match ApiKey::default_secret_key(mirror).await {
            Ok(secret) => {
                d.scrub.push(secret.expose().to_owned());
                // Where `default_secret_key` found it, in its order: a stored secret
                // key, the environment, a stored restricted key.
                let secret_ref = &secret;
                let stored_of = |kind| async move {
                    ApiKey::latest(mirror, kind, live)
                        .await
                        .ok()
                        .flatten()
                        .filter(|k| k.secret() == secret_ref)
                };
                let mut stored = stored_of(ApiKeyKind::Secret).await;
                if stored.is_none() && config.env_secret_key() != Some(&secret) {
                    stored = stored_of(ApiKeyKind::Restricted).await;
                }
                let (source, from) = match &stored {
                    Some(key) => (
                        format!("stored key {}", key.id),
                        KeySource::Stored(key.id.clone()),
                    ),
                    None => (env_secret.clone(), KeySource::Env),
                };
                let fix = match &stored {
                    Some(key) => format!(
                        "remove it (`stripe-mirror api-keys remove {}`) and add your sk_{mode}_ key",
                        key.id
                    ),
                    None => format!(
                        "set {env_secret} to your sk_{mode}_ key (Dashboard > Developers > API keys)"
                    ),
                };
                match parse_key(secret.expose()) {
                    Err(err) => d.fail(&secret_name, format!("{source}: {err}"), fix),
                    Ok((ApiKeyKind::Publishable, _)) => d.fail(
                        &secret_name,
                        format!("{source} holds a publishable key ({secret}), not a secret one"),
                        fix,
                    ),
                    Ok((_, key_live)) if key_live != live => d.fail(
                        &secret_name,
                        format!(
                            "{source} holds a {} key ({secret}) but the mirror is in {mode} mode",
                            if key_live { "live" } else { "test" }
                        ),
                        fix,
                    ),
                    Ok(_) => {
                        d.ok(&secret_name, format!("{secret} from {source}"));
                        usable_secret = Some((secret, from));
                    }
                }
            }
            Err(err) => {
                let fix = if !schema_ok {
                    "run `stripe-mirror migrate`, then run doctor again".to_owned()
                } else {
                    add_secret_fix.clone()
                };
                d.fail(&secret_name, err, fix);
            }
        },
    }

    let publishable_name = format!("publishable key ({mode} mode)");
    let env_publishable = format!("STRIPE_{env_mode}_PUBLISHABLE_KEY");
    let add_publishable_fix = format!(
        "store one with `stripe-mirror api-keys add pk_{mode}_...` (publishable keys are not secret), or set {env_publishable}"
    );
    match &mirror {
        None => d.skip(&publishable_name, "the database does not open"),
        Some(mirror) => match mirror.publishable_key().await {
            Ok(Some(key)) => {
                let stored = ApiKey::latest(mirror, ApiKeyKind::Publishable, live)
                    .await
                    .ok()
                    .flatten()
                    .filter(|k| k.secret().expose() == key);
                let source = match &stored {
                    Some(k) => format!("stored key {}", k.id),
                    None => env_publishable.clone(),
                };
                let shown = Secret::new(key.clone());
                match parse_key(&key) {
                    Ok((kind, key_live)) if kind == ApiKeyKind::Publishable && key_live == live => {
                        d.ok(&publishable_name, format!("{shown} from {source}"));
                    }
                    Ok(_) => d.fail(
                        &publishable_name,
                        format!("{source} holds {shown}, not a pk_{mode}_ key"),
                        add_publishable_fix,
                    ),
                    Err(err) => d.fail(
                        &publishable_name,
                        format!("{source}: {err}"),
                        add_publishable_fix,
                    ),
                }
            }
            Ok(None) => d.fail(
                &publishable_name,
                format!("none stored and {env_publishable} is not set (Stripe.js needs one)"),
                add_publishable_fix,
            ),
            Err(err) => {
                let fix = if !schema_ok {
                    "run `stripe-mirror migrate`, then run doctor again".to_owned()
                } else {
                    add_publishable_fix
                };
                d.fail(&publishable_name, err, fix);
            }
        },
    }

    let secrets = &config.webhook_secrets;
    let webhook_fix = "set STRIPE_WEBHOOK_SECRET to the endpoint's signing secret (whsec_..., from the Dashboard's webhook endpoint or `stripe listen`); comma separated while rotating";
    if secrets.is_empty() {
        d.fail(
            "webhook secret",
            "STRIPE_WEBHOOK_SECRET is not set: every webhook delivery would be refused",
            webhook_fix,
        );
    } else if let Some(bad) = secrets.iter().find(|s| !s.expose().starts_with("whsec_")) {
        d.fail(
            "webhook secret",
            format!("{bad} in STRIPE_WEBHOOK_SECRET is not a signing secret (whsec_...)"),
            webhook_fix,
        );
    } else {
        let shown: Vec<String> = secrets.iter().map(Secret::masked).collect();
        d.ok(
            "webhook secret",
            format!("{} set ({})", secrets.len(), shown.join(", ")),
        );
    }

    match (offline, &mirror, usable_secret) {
        (true, _, _) => d.skip(CHECK_API, "--offline"),
        (false, Some(mirror), Some((secret, from))) => {
            let result = match from {
                KeySource::Stored(id) => ApiKey::sync(mirror, &id).await.map(|_| None),
                KeySource::Env => match mirror.stripe().await {
                    Ok(client) => client
                        .get("/balance", &json!({}), None)
                        .await
                        .map(|balance| balance.get("livemode").and_then(Value::as_bool)),
                    Err(err) => Err(err),
                },
            };
            match result {
                Ok(Some(key_live)) if key_live != live => d.fail(
                    CHECK_API,
                    format!(
                        "Stripe says {secret} is a {} key, the mirror is in {mode} mode",
                        if key_live { "live" } else { "test" }
                    ),
                    format!("set {env_secret} to your sk_{mode}_ key"),
                ),
                Ok(_) => d.ok(
                    CHECK_API,
                    format!("GET /v1/balance answered for {secret} ({mode} mode)"),
                ),
                Err(err) => {
                    let fix = match stripe_status(&err) {
                        Some(401 | 403) => format!(
                            "the key is refused or lacks access: roll or create an sk_{mode}_ key (Dashboard > Developers > API keys) and store it"
                        ),
                        Some(_) => "retry later; if it persists, check Stripe's status page and STRIPE_API_BASE".to_owned(),
                        None => "check network access to Stripe (or STRIPE_API_BASE), or run with --offline".to_owned(),
                    };
                    d.fail(CHECK_API, err, fix);
                }
            }
        }
        (false, _, _) => d.skip(CHECK_API, "no usable secret key to try"),
    }
    d.finish()
}

/// The HTTP status of a failed Stripe call, if one came back.
fn stripe_status(err: &stripe_mirror::Error) -> Option<u16> {
    match err {
        stripe_mirror::Error::Stripe(e) => e.status,
        _ => None,
    }
}

/// Which of the crate's migrations a database has applied, read from diesel's
/// `__diesel_schema_migrations` without writing anything (the library has no public
/// call for pending migrations, and `migrate` would apply them).
mod migrations {
    use diesel::migration::MigrationSource;
    use diesel::{Connection, QueryableByName, RunQueryDsl};

    pub struct Status {
        /// The crate's migrations the database has.
        pub applied: usize,
        /// Names of the crate's migrations it lacks.
        pub pending: Vec<String>,
    }

    #[derive(QueryableByName)]
    struct Version {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }

    #[cfg(feature = "sqlite")]
    const SQLITE: diesel_migrations::EmbeddedMigrations =
        diesel_migrations::embed_migrations!("migrations/sqlite");
    #[cfg(feature = "postgres")]
    const POSTGRES: diesel_migrations::EmbeddedMigrations =
        diesel_migrations::embed_migrations!("migrations/postgres");

    const APPLIED: &str = "SELECT version FROM __diesel_schema_migrations";

    fn compare<DB: diesel::backend::Backend>(
        source: &impl MigrationSource<DB>,
        applied: &[Version],
    ) -> Result<Status, String> {
        let mut status = Status {
            applied: 0,
            pending: Vec::new(),
        };
        for migration in source.migrations().map_err(|e| e.to_string())? {
            let version = migration.name().version().to_string();
            if applied.iter().any(|a| a.version == version) {
                status.applied += 1;
            } else {
                status.pending.push(migration.name().to_string());
            }
        }
        Ok(status)
    }

    /// The migration status of the database at `url` (as `Mirror::open` reads it).
    pub fn status(url: &str) -> Result<Status, String> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            {
                let mut conn = diesel::PgConnection::establish(url).map_err(|e| e.to_string())?;
                let table: Vec<Version> = diesel::sql_query(
                    "SELECT CAST(to_regclass('__diesel_schema_migrations') AS TEXT) AS version \
                     WHERE to_regclass('__diesel_schema_migrations') IS NOT NULL",
                )
                .load(&mut conn)
                .map_err(|e| e.to_string())?;
                let applied: Vec<Version> = if table.is_empty() {
                    Vec::new()
                } else {
                    diesel::sql_query(APPLIED)
                        .load(&mut conn)
                        .map_err(|e| e.to_string())?
                };
                return compare::<diesel::pg::Pg>(&POSTGRES, &applied);
            }
            #[allow(unreachable_code)]
            return Err("this stripe-mirror was built without the postgres feature".into());
        }
        #[cfg(feature = "sqlite")]
        {
            let path = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .unwrap_or(url);
            let mut conn = diesel::SqliteConnection::establish(path).map_err(|e| e.to_string())?;
            let table: Vec<Version> = diesel::sql_query(
                "SELECT name AS version FROM sqlite_master \
                 WHERE type = 'table' AND name = '__diesel_schema_migrations'",
            )
            .load(&mut conn)
            .map_err(|e| e.to_string())?;
            let applied: Vec<Version> = if table.is_empty() {
                Vec::new()
            } else {
                diesel::sql_query(APPLIED)
                    .load(&mut conn)
                    .map_err(|e| e.to_string())?
            };
            compare::<diesel::sqlite::Sqlite>(&SQLITE, &applied)
        }
        #[cfg(not(feature = "sqlite"))]
        Err("this stripe-mirror was built without the sqlite feature".into())
    }
}

/// A duration as `prune` takes it: a whole number and a unit, `s`, `m`, `h` or `d`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: use e.g. 30d, 12h, 90m or 3600s"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number: use e.g. 30d"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}: use s, m, h or d"
            ));
        }
    };
    number
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_duration("3600s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "30",
            "d",
            "",
            "30w",
            "-1d",
            "1.5h",
            "30 d",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
