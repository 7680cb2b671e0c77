//! Group commit: writes that arrive together share one transaction and one commit.
//!
//! A durable commit costs a disk flush (SQLite `synchronous = FULL`, Postgres with
//! `fsync` on), far more than the statements before it. Webhook deliveries arriving at
//! once queue here; one writer task takes everything queued, runs each piece of work
//! in one transaction, commits once, and only then hands each caller its result. So:
//! - bad input fails alone: the work checks it before it writes anything (an event's
//!   object is mapped to rows first) and records the failure;
//! - a database error (which on Postgres aborts the transaction) rolls the whole
//!   group back: every caller gets an error, nothing of the group is stored, and
//!   Stripe redelivers each one;
//! - no caller learns its work is done before the commit that holds it returned: a
//!   crash or a failed commit answers nobody with success;
//! - one delivery at a time pays one commit, as before; eight at once share one.

use std::sync::{Arc, Mutex, OnceLock, mpsc};

use tokio::sync::oneshot;

use super::{Conn, Database, Held};
use crate::error::{Error, Result};

/// At most this many pieces of work share a transaction (bounds its size and the
/// time the first caller waits behind the others).
const MAX_BATCH: usize = 64;

/// One caller's queued work.
trait Work: Send {
    /// Runs in the group's transaction; returns how to hand the result over once the
    /// commit's outcome is known, and the error that must roll the group back.
    fn run(self: Box<Self>, conn: &mut Conn<'_>) -> (Handover, Option<String>);
    /// The work never ran: no connection could be had.
    fn fail(self: Box<Self>, message: String);
    /// What it locks first (an event id): a group runs its work in this order, so two
    /// groups holding the same event (a redelivery) lock in the same order and cannot
    /// deadlock on it.
    fn key(&self) -> &str;
}

type Handover = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

struct Pending<R, F> {
    f: F,
    tx: oneshot::Sender<Result<R>>,
    key: String,
}

impl<R, F> Work for Pending<R, F>
where
    R: Send + 'static,
    F: FnOnce(&mut Conn<'_>) -> Result<R> + Send + 'static,
{
    fn key(&self) -> &str {
        &self.key
    }

    fn run(self: Box<Self>, conn: &mut Conn<'_>) -> (Handover, Option<String>) {
        let Pending { f, tx, .. } = *self;
        let result = f(conn);
        let failed = result.as_ref().err().map(ToString::to_string);
        let handover: Handover = Box::new(move |committed| {
            let _ = tx.send(match (committed, result) {
                (Ok(()), result) => result,
                // The work's own error says best what went wrong.
                (Err(_), Err(own)) => Err(own),
                (Err(message), Ok(_)) => Err(Error::Commit { message }),
            });
        });
        (handover, failed)
    }

    fn fail(self: Box<Self>, message: String) {
        let _ = self.tx.send(Err(Error::Commit { message }));
    }
}

/// The writers' queue. The writers are OS threads of their own (one for SQLite, which
/// has one writer at a time; one per core of this host, 2 to 4, for Postgres), started on first use:
/// they belong to no async runtime, so a mirror used from several runtimes, or one
/// that outlives the runtime it was first used on, keeps committing. They hold the
/// pool, not the queue: when the last clone of the mirror is dropped the queue closes
/// and they end.
#[derive(Clone, Default)]
pub(crate) struct Batcher {
    queue: Arc<OnceLock<mpsc::Sender<Box<dyn Work>>>>,
}

impl Database {
    /// Runs `f` in a transaction shared with other writes queued at the same moment
    /// (group commit). Returns `f`'s result once the shared transaction has committed.
    /// If `f` fails (or panics), or the commit does (or no connection can be had), the
    /// group is rolled back: `f` gets its error, the others [`Error::Commit`]. Check
    /// what bad input can break before `f` writes, and record it (or keep it in a
    /// savepoint of `f`'s own, `conn.write`).
    pub(crate) async fn write_batched<R, F>(&self, key: &str, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn<'_>) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R>>();
        let queue = self.batcher.queue.get_or_init(|| start_writers(self));
        let key = key.to_owned();
        if let Err(mpsc::SendError(work)) = queue.send(Box::new(Pending { f, tx, key })) {
            work.fail("the database writers stopped".into());
        }
        rx.await.map_err(|_| Error::Commit {
            message: "the write was dropped before its commit (a bug: a write panicked)".into(),
        })?
    }
}

impl Database {
    /// [`write_batched`](Self::write_batched), run again (up to 4 times in all) when
    /// the group lost to a concurrent write: a deadlock or a serialization failure
    /// rolls the whole group back, so nothing of it was stored. `make` builds the work
    /// anew for each try.
    pub(crate) async fn write_retrying<R, F>(&self, key: &str, make: impl Fn() -> F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn<'_>) -> Result<R> + Send + 'static,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.write_batched(key, make()).await {
                Err(err) if tries < 4 && err.is_conflict() => {
                    tracing::debug!(error = %err, tries, "write lost to a concurrent one; retrying");
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos() as u64);
                    // A little apart, so the two writers do not meet again.
                    let pause = 2 * tries + nanos % 8;
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                other => return other,
            }
        }
    }
}

/// Groups a Postgres mirror commits side by side (each holds a pooled connection): one
/// per core of this host, 2 to 4. More writers make smaller groups (more commits and
/// statements per event) for the CPU to run: on 2 cores shared with the database, 4
/// writers ingested 2,100-2,500 events/s at 8 deliveries at once, 2 writers 2,300-2,900.
#[cfg(feature = "postgres")]
fn postgres_groups() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

fn start_writers(db: &Database) -> mpsc::Sender<Box<dyn Work>> {
    let (tx, rx) = mpsc::channel::<Box<dyn Work>>();
    let rx = Arc::new(Mutex::new(rx));
    // Writers hold a connection while work keeps coming: at most half the pool, so
    // handlers and reads always find one.
    let writers = match &db.pool {
        #[cfg(feature = "sqlite")]
        super::Pool::Sqlite(_) => 1,
        #[cfg(feature = "postgres")]
        super::Pool::Postgres(p) => postgres_groups().min((p.max_size() as usize / 2).max(1)),
    };
    for n in 0..writers {
        // The pool only: a writer must not keep the queue open.
        let db = Database {
            pool: db.pool.clone(),
            batcher: Batcher::default(),
        };
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("stripe-mirror-writer-{n}"))
            .spawn(move || writer(&db, &rx));
        if let Err(error) = spawned {
            tracing::error!(%error, "a database writer thread could not start");
        }
    }
    tx
}

/// How long a writer keeps its connection without work: deliveries coming one after
/// another skip the pool's checkout (and Postgres's test query) each time.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// A writer: takes what is queued, runs it in one transaction, commits, hands over.
/// While it runs a group, what arrives gathers into the next one (taken by another
/// writer on Postgres, by this one after its commit on SQLite). It keeps its
/// connection while work keeps coming, and gives it back after [`LINGER`] idle or
/// when a group fails (a connection a server restart broke is not used again).
fn writer(db: &Database, rx: &Mutex<mpsc::Receiver<Box<dyn Work>>>) {
    let mut held: Option<Held> = None;
    loop {
        let group = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            let first = match held {
                Some(_) => match rx.recv_timeout(LINGER) {
                    Ok(work) => Some(work),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        held = None;
                        rx.recv().ok()
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => None,
                },
                None => rx.recv().ok(),
            };
            let Some(first) = first else {
                return; // the mirror is gone
            };
            let mut group = vec![first];
            while group.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(work) => group.push(work),
                    Err(_) => break,
                }
            }
            group.sort_by(|a, b| a.key().cmp(b.key()));
            group
        };
        // A panic drops the group's senders: each caller gets `Error::Commit`.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_group(db, &mut held, group)
        }));
        if !matches!(ran, Ok(true)) {
            held = None;
        }
    }
}

/// Runs and commits a group on the held connection (taken from the pool when none is
/// held); true when it committed.
fn run_group(db: &Database, held: &mut Option<Held>, group: Vec<Box<dyn Work>>) -> bool {
    let mut waiting = Some(group);
    let mut handovers: Vec<Handover> = Vec::new();
    let conn = match held {
        Some(conn) => Ok(conn),
        None => db.hold().map(|conn| held.insert(conn)),
    };
    let committed = conn.and_then(|conn| {
        conn.conn().write(|conn| {
            let mut group = waiting.take().into_iter().flatten();
            for work in group.by_ref() {
                let (handover, failed) = work.run(conn);
                handovers.push(handover);
                if let Some(error) = failed {
                    // Rolled back; what did not run yet is failed below.
                    waiting = Some(group.collect());
                    return Err(Error::Commit {
                        message: format!("another write of the group failed: {error}"),
                    });
                }
            }
            Ok(())
        })
    });
    let committed = committed.map_err(|e: Error| match e {
        Error::Commit { message } => message,
        other => other.to_string(),
    });
    if let Err(error) = &committed {
        tracing::error!(%error, writes = handovers.len(), "a group of writes could not be committed");
        // No connection, or rolled back before its turn: the work never ran.
        for work in waiting.into_iter().flatten() {
            work.fail(error.clone());
        }
    }
    let ok = committed.is_ok();
    for handover in handovers {
        handover(committed.clone());
    }
    ok
}
