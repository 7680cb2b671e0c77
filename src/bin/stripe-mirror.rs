//! The `stripe-mirror` command: migrate, sync, demo products, replay events, prune the
//! webhook log, API keys, and a webhook server. It only parses arguments and calls the library.
//!
//! Settings come from the environment (`DATABASE_URL`, `STRIPE_*`; see the crate docs).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use stripe_mirror::webhooks::EventFilter;
use stripe_mirror::{ApiKey, Config, Mirror, SyncOptions, Webhooks};

/// Keeps a local SQL mirror of a Stripe account.
#[derive(Parser)]
#[command(name = "stripe-mirror", version, about)]
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
    /// Mirror every object of these kinds from Stripe (default: all).
    Sync {
        /// customer, product, price, subscription
        objects: Vec<String>,
        /// Stop at the first object that cannot be mirrored.
        #[arg(long)]
        fail_fast: bool,
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
    },
    /// Delete deliveries and processed events older than a duration; failed and
    /// pending events, and their deliveries, are kept.
    Prune {
        /// Age to keep: a number and a unit, e.g. 30d, 12h, 90m, 3600s.
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
}

#[derive(Subcommand)]
enum ApiKeys {
    /// Store a key (its kind and mode come from its prefix).
    Add {
        /// The key: pk_, sk_ or rk_, then test_ or live_.
        key: String,
    },
    /// List stored keys, masked.
    List,
    /// Remove a stored key by its id.
    Remove {
        /// The id shown by `list`.
        id: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::from_env()?;
    if let Some(url) = cli.database_url {
        config.database_url = url;
    }
    let mirror = Mirror::connect(config).await?;
    match cli.command {
        Command::Migrate => println!("database is up to date"),
        Command::Sync { objects, fail_fast } => {
            let mut options = SyncOptions::default().fail_fast(fail_fast);
            if !objects.is_empty() {
                options = options.objects(&objects.iter().map(String::as_str).collect::<Vec<_>>());
            }
            let report = stripe_mirror::sync_all(&mirror, &options, |p| {
                eprint!("\r{}: {} mirrored", p.object, p.done)
            })
            .await?;
            eprintln!();
            for (kind, count) in &report.counts {
                println!("{kind}: {count}");
            }
            for (kind, id, error) in &report.failures {
                println!("failed {kind} {id}: {error}");
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
        } => {
            let filter = EventFilter {
                failed: failed || (ids.is_empty() && event_type.is_none()),
                ids,
                event_type,
            };
            // No host handlers here: the built-in sync is re-run, handler work stays pending.
            let report = Webhooks::new().process_events(&mirror, &filter).await?;
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
                "re-fetched {}, tombstoned {}, failed {}",
                report.refetched,
                report.tombstoned,
                report.failed.len()
            );
            for (kind, id, error) in &report.failed {
                println!("failed {kind} {id}: {error}");
            }
        }
        Command::ApiKeys(ApiKeys::Add { key }) => {
            let key = ApiKey::get_or_create(&mirror, &key).await?;
            println!("{}", key_line(&key));
        }
        Command::ApiKeys(ApiKeys::List) => {
            for key in ApiKey::list(&mirror).await? {
                println!("{}", key_line(&key));
            }
        }
        Command::ApiKeys(ApiKeys::Remove { id }) => {
            if !ApiKey::remove(&mirror, &id).await? {
                return Err(format!("no stored key with id {id}").into());
            }
            println!("removed {id}");
        }
        Command::Serve { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            stripe_mirror::axum::serve(mirror, Webhooks::new(), listener).await?;
        }
    }
    Ok(())
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

/// One stored key as `list` and `add` print it: id, kind, mode, the key masked.
fn key_line(key: &ApiKey) -> String {
    let mode = if key.livemode { "live" } else { "test" };
    format!("{} {} {mode} {key}", key.id, key.kind.as_str())
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
