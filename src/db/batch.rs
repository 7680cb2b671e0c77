//! Group commit: writes that arrive together share one transaction and one commit.
//!
//! A durable commit costs a disk flush (SQLite `synchronous = FULL`, Postgres with
//! `fsync` on), far more than the statements before it. Webhook deliveries arriving at
//! once queue here; one writer task takes everything queued, runs each piece of work
//! in one transaction, commits once, and only then hands each caller its result. So:
//! - bad input fails alone: the work keeps its risky part (an event's sync) in a
//!   savepoint of its own and records the failure;
//! - a database error (which on Postgres aborts the transaction) rolls the whole
//!   group back: every caller gets an error, nothing of the group is stored, and
//!   Stripe redelivers each one;
//! - no caller learns its work is done before the commit that holds it returned: a
//!   crash or a failed commit answers nobody with success;
//! - one delivery at a time pays one commit, as before; eight at once share one.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::{Conn, Database};
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
}

type Handover = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

struct Pending<R, F> {
    f: F,
    tx: oneshot::Sender<Result<R>>,
}

impl<R, F> Work for Pending<R, F>
where
    R: Send + 'static,
    F: FnOnce(&mut Conn<'_>) -> Result<R> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &mut Conn<'_>) -> (Handover, Option<String>) {
        let Pending { f, tx } = *self;
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

/// The writer task's queue, started on first use (on the runtime of that use) and
/// restarted if that runtime went away.
#[derive(Clone, Default)]
pub(crate) struct Batcher {
    queue: Arc<Mutex<Option<mpsc::UnboundedSender<Box<dyn Work>>>>>,
}

impl Database {
    /// Runs `f` in a transaction shared with other writes queued at the same moment
    /// (group commit). Returns `f`'s result once the shared transaction has committed.
    /// If `f` fails, or the commit does (or no connection can be had), the group is
    /// rolled back: `f` gets its error, the others [`Error::Commit`]. Keep what bad
    /// input can break in a savepoint of `f`'s own (`conn.write`), and record it.
    pub(crate) async fn write_batched<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn<'_>) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R>>();
        self.batcher.send(self.clone(), Box::new(Pending { f, tx }));
        rx.await.map_err(|_| Error::Commit {
            message: "the writer stopped before committing (is the runtime shutting down?)".into(),
        })?
    }
}

impl Batcher {
    fn send(&self, db: Database, work: Box<dyn Work>) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let work = match queue.as_ref() {
            Some(q) => match q.send(work) {
                Ok(()) => return,
                Err(mpsc::error::SendError(work)) => work,
            },
            None => work,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(db, rx));
        let _ = tx.send(work);
        *queue = Some(tx);
    }
}

/// The writer: takes what is queued, runs it in one transaction, commits, hands over.
/// SQLite has one writer at a time, so one group runs at a time (the next one gathers
/// meanwhile). A Postgres server commits several transactions at once and every
/// statement is a network round trip, so up to [`POSTGRES_GROUPS`] groups run side
/// by side, each on its own connection.
async fn writer(db: Database, mut rx: mpsc::UnboundedReceiver<Box<dyn Work>>) {
    let runners = match db.backend() {
        super::Backend::Sqlite => 1,
        super::Backend::Postgres => POSTGRES_GROUPS,
    };
    let free = std::sync::Arc::new(tokio::sync::Semaphore::new(runners));
    while let Some(first) = rx.recv().await {
        // Wait for a free runner before gathering: what arrives meanwhile joins the group.
        let Ok(runner) = free.clone().acquire_owned().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(work) => group.push(work),
                Err(_) => break,
            }
        }
        let db = db.clone();
        // A panic drops the group's senders: each caller gets `Error::Commit`.
        tokio::task::spawn_blocking(move || {
            run_group(&db, group);
            drop(runner);
        });
    }
}

/// Groups a Postgres mirror commits side by side (each holds a pooled connection).
const POSTGRES_GROUPS: usize = 4;

fn run_group(db: &Database, group: Vec<Box<dyn Work>>) {
    let mut waiting = Some(group);
    let mut handovers: Vec<Handover> = Vec::new();
    let committed = db.run_blocking(|conn| {
        conn.write(|conn| {
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
    for handover in handovers {
        handover(committed.clone());
    }
}
