//! Group commit: writes that arrive together share one transaction and one commit.
//!
//! A durable commit costs a disk flush (SQLite's sync of its WAL, Postgres with
//! `fsync` on), far more than the statements before it. Webhook deliveries arriving at
//! once queue here; a writer thread takes everything queued, runs each piece of work
//! in one transaction, commits once, and only then hands each caller its result. So:
//! - bad input fails alone: the work checks it before it writes anything (an event's
//!   object is mapped to rows first) and records the failure;
//! - a database error (which on Postgres aborts the transaction) rolls the whole
//!   group back: every caller gets an error, nothing of the group is stored, and
//!   Stripe redelivers each one;
//! - no caller learns its work is done before the commit that holds it is on disk: a
//!   crash or a failed commit or sync answers nobody with success;
//! - one delivery at a time pays one commit; deliveries at once share them. On
//!   SQLite the one writer also runs the next group while the last one's sync is in
//!   flight ([`Writing`]); Postgres commits several groups side by side.

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
    /// deadlock on it. Work that joins a running group (SQLite, [`run_group`]) runs after
    /// it in arrival order: SQLite has one writer, which locks the whole database.
    fn key(&self) -> &str;
}

type Handover = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

/// How the writes of a group rolled back for another's failure are told.
const ANOTHER_FAILED: &str = "another write of the group failed";

/// Whether `error` is a write rolled back only because another write of its group
/// failed: nothing of it was stored, and it may be run again as it was.
pub(crate) fn rolled_back_for_another(error: &Error) -> bool {
    matches!(error, Error::Commit { message } if message.starts_with(ANOTHER_FAILED))
}

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
    /// Backfills under way ([`Database::bulk`]).
    bulk: Arc<std::sync::atomic::AtomicUsize>,
}

/// A backfill under way, until dropped ([`Database::bulk`]).
pub(crate) struct Bulk(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Bulk {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Database {
    /// Marks a backfill under way: while one is, a SQLite writer leaves the WAL's
    /// checkpoints to its [`Checkpointer`] (a backfill's writer spent a sixth of its
    /// time in them). Webhook deliveries alone keep SQLite's own checkpoints: one at a
    /// time they ran about a tenth slower beside the checkpointer's syncs.
    pub(crate) fn bulk(&self) -> Bulk {
        self.batcher
            .bulk
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Bulk(self.batcher.bulk.clone())
    }
}

impl Database {
    /// Runs `f` in a transaction shared with other writes queued at the same moment
    /// (group commit). Returns `f`'s result once the shared transaction has committed.
    /// If `f` fails (or panics), or the commit does (or no connection can be had), the
    /// group is rolled back: `f` gets its error, the others [`Error::Commit`]. If the
    /// WAL's flush after the commit fails (SQLite), the commit stands but is not known
    /// to be on disk: every caller gets [`Error::Commit`] saying so. Check
    /// what bad input can break before `f` writes, and record it (or keep it in a
    /// savepoint of `f`'s own, `conn.write`).
    pub(crate) async fn write_batched<R, F>(&self, key: &str, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn<'_>) -> Result<R> + Send + 'static,
    {
        self.queue_write(key, f).await
    }

    /// [`write_batched`](Self::write_batched), queued now rather than when the future is
    /// first polled: writes queued one after the other reach the writer in that order
    /// (a backfill's pages, in the order they were listed), whichever task awaits them.
    pub(crate) fn queue_write<R, F>(
        &self,
        key: &str,
        f: F,
    ) -> impl std::future::Future<Output = Result<R>> + Send + 'static
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
        async move {
            rx.await.map_err(|_| Error::Commit {
                message: "the write was dropped before its commit (a bug: a write panicked)".into(),
            })?
        }
    }
}

impl Database {
    /// [`write_batched`](Self::write_batched), run again (up to 4 times in all) when
    /// the group lost to a concurrent write: a deadlock, a serialization failure or a
    /// wait for a lock past [`Database::lock_wait`] rolls the whole group back, so
    /// nothing of it was stored. `make` builds the work anew for each try.
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
        // The pool and the backfills' count only: a writer must not keep the queue open.
        let db = Database {
            pool: db.pool.clone(),
            batcher: Batcher {
                queue: Default::default(),
                bulk: db.batcher.bulk.clone(),
            },
            lock_wait: db.lock_wait,
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

/// How often a lingering writer looks whether the pool has a connection left for
/// others; when it has had none for [`STARVED_CHECKS`] looks (a pool of one, or every
/// other connection busy), the writer gives its own back: a read must not wait out
/// the linger.
const LINGER_CHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// Checks in a row without a spare connection before a lingering writer gives its own
/// back (a read waits at most about this many [`LINGER_CHECK`]s).
const STARVED_CHECKS: u32 = 3;

/// A writer: takes what is queued, runs it in one transaction, commits, hands over.
/// What arrives while it runs a group gathers into the next one, or on SQLite joins
/// this one while the syncer still flushes the groups before ([`run_group`]). It keeps its
/// connection while work keeps coming, and gives it back after [`LINGER`] idle, within
/// [`STARVED_CHECKS`] looks when the pool has no other connection to give, or when a
/// group fails (a connection a server restart broke is not used again).
fn writer(db: &Database, rx: &Mutex<mpsc::Receiver<Box<dyn Work>>>) {
    let bulk = &db.batcher.bulk;
    let mut held: Option<Writing> = None;
    #[cfg(feature = "sqlite")]
    let checkpointer = match &db.pool {
        super::Pool::Sqlite(_) => start_checkpointer(),
        #[allow(unreachable_patterns)]
        _ => None,
    };
    #[cfg(not(feature = "sqlite"))]
    let checkpointer: Option<Checkpointer> = None;
    let syncer = match &db.pool {
        #[cfg(feature = "sqlite")]
        super::Pool::Sqlite(_) => start_syncer(checkpointer.clone().map(|c| (c, bulk.clone()))),
        #[cfg(feature = "postgres")]
        super::Pool::Postgres(_) => None,
    };
    // Without a syncer commits sync themselves, and checkpoint themselves too.
    let checkpointer = checkpointer.filter(|_| syncer.is_some());
    // Work taken from the queue after a group's commit (to know whether to sync
    // inline, [`Queued::waiting`]): it starts the next group ([`gather`]).
    let mut carried: Vec<Box<dyn Work>> = Vec::new();
    loop {
        let Some(group) = gather(|| db.spare_connection(), rx, &mut carried, &mut held) else {
            return; // the mirror is gone
        };
        let queued = Queued {
            rx,
            carried: &mut carried,
        };
        // A panic drops the group's senders: each caller gets `Error::Commit`.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // A backfill under way: checkpoints go to the checkpointer.
            let bulk = bulk.load(std::sync::atomic::Ordering::Acquire) > 0;
            let checkpointer = checkpointer.as_ref().filter(|c| bulk && c.working());
            run_group(db, &mut held, group, queued, syncer.as_ref(), checkpointer)
        }));
        if !matches!(ran, Ok(true)) {
            held = None;
        }
    }
}

/// The next group: the work carried from the last one, or else the next work to
/// arrive, topped up with what is queued (up to [`MAX_BATCH`]), in key order. `None`
/// when the mirror is gone. A writer holding a connection waits for work at most
/// [`LINGER`], and gives the connection back sooner when `spare` says the pool has
/// none left for others. A writer with work in hand never waits for the queue's
/// lock: another writer blocked on the queue holds it until new work comes, and the
/// callers of the carried work may be the only ones left.
fn gather(
    spare: impl Fn() -> bool,
    rx: &Mutex<mpsc::Receiver<Box<dyn Work>>>,
    carried: &mut Vec<Box<dyn Work>>,
    held: &mut Option<Writing>,
) -> Option<Vec<Box<dyn Work>>> {
    let mut group: Vec<Box<dyn Work>> = carried.drain(..carried.len().min(MAX_BATCH)).collect();
    let queue = if group.is_empty() {
        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
        let until = std::time::Instant::now() + LINGER;
        // Checks in a row that found the pool without a spare connection: a moment's
        // rush of reads is no reason to give the connection up, a reader left waiting
        // is.
        let mut starved = 0;
        let first = loop {
            let now = std::time::Instant::now();
            if held.is_none() {
                break rx.recv().ok();
            }
            starved = if spare() { 0 } else { starved + 1 };
            if now >= until || starved >= STARVED_CHECKS {
                *held = None;
                continue;
            }
            match rx.recv_timeout(LINGER_CHECK.min(until - now)) {
                Ok(work) => break Some(work),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            }
        };
        group.push(first?);
        Some(rx)
    } else {
        match rx.try_lock() {
            Ok(rx) => Some(rx),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    };
    if let Some(rx) = queue {
        while group.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(work) => group.push(work),
                Err(_) => break,
            }
        }
    }
    group.sort_by(|a, b| a.key().cmp(b.key()));
    Some(group)
}

/// The queue as a running group sees it: work that joins the group while the syncer is
/// busy, and once the group committed, whether more is waiting.
struct Queued<'a> {
    rx: &'a Mutex<mpsc::Receiver<Box<dyn Work>>>,
    /// Work taken from the queue: it starts the next group.
    carried: &'a mut Vec<Box<dyn Work>>,
}

impl<'a> Queued<'a> {
    /// Whether work is queued; what is found starts the next group.
    fn waiting(&mut self) -> bool {
        let found = self.queue().and_then(|rx| rx.try_recv().ok());
        let waiting = found.is_some();
        self.carried.extend(found);
        waiting
    }

    /// The queue, unless another writer waiting for work holds it: then nothing is
    /// queued, and waiting for that writer would wait for work this group's callers
    /// hold back.
    fn queue(&self) -> Option<std::sync::MutexGuard<'a, mpsc::Receiver<Box<dyn Work>>>> {
        match self.rx.try_lock() {
            Ok(rx) => Some(rx),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// Runs and commits a group on the held connection (taken from the pool when none is
/// held); true when it committed. On SQLite, work queued while the syncer still
/// flushes the groups before joins this one, up to [`MAX_BATCH`] in all: it shares the
/// group's commit, its flush and its fate (a database error in any of its work, or a
/// failed commit, fails them all).
fn run_group(
    db: &Database,
    held: &mut Option<Writing>,
    group: Vec<Box<dyn Work>>,
    mut queued: Queued<'_>,
    syncer: Option<&Syncer>,
    #[cfg_attr(not(feature = "sqlite"), allow(unused_variables))] checkpointer: Option<
        &Checkpointer,
    >,
) -> bool {
    let mut waiting = Some(group);
    let mut handovers: Vec<Handover> = Vec::new();
    let conn = match held {
        Some(conn) => Ok(conn),
        None => db
            .hold()
            .and_then(|conn| Writing::new(conn, syncer.is_some()))
            .map(|conn| held.insert(conn)),
    };
    // After a failed flush nothing more is written on that WAL: the group never runs.
    #[cfg(feature = "sqlite")]
    let conn = conn.and_then(|conn| match &conn.wal {
        Some(wal) => wal.sound().map(|()| conn),
        None => Ok(conn),
    });
    // The writer's own checkpoints: SQLite's while no backfill runs, rare while one does.
    #[cfg(feature = "sqlite")]
    let conn = conn.and_then(|conn| {
        conn.checkpoint_rarely(checkpointer.is_some())
            .map(|()| conn)
    });
    let committed = conn.and_then(|conn| {
        group_transaction(&mut conn.conn.conn(), db.lock_wait(), |conn| {
            let group = waiting.take().unwrap_or_default();
            let mut room = MAX_BATCH.saturating_sub(group.len());
            let mut group = group.into_iter();
            // While the syncer still flushes the groups before, what is queued joins this
            // one: its commit would wait for the next flush anyway, and one commit
            // writes the pages the deliveries share (the events' last leaf, the
            // indexes) once. SQLite only: Postgres commits sync themselves.
            let queued = &queued;
            let joining = std::iter::from_fn(move || {
                if room == 0 || !syncer.is_some_and(Syncer::busy) {
                    return None;
                }
                let work = queued.queue()?.try_recv().ok()?;
                room -= 1;
                Some(work)
            });
            for work in group.by_ref().chain(joining) {
                let (handover, failed) = work.run(conn);
                handovers.push(handover);
                if let Some(error) = failed {
                    // Rolled back; what did not run yet is failed below.
                    waiting = Some(group.collect());
                    return Err(Error::Commit {
                        message: format!("{ANOTHER_FAILED}: {error}"),
                    });
                }
            }
            Ok(())
        })
    });
    // Lost to a concurrent write: run again by its callers (`write_retrying`).
    let lost = committed.as_ref().err().is_some_and(Error::is_conflict);
    let committed = committed.map_err(|e: Error| match e {
        Error::Commit { message } => message,
        other => other.to_string(),
    });
    if let Err(error) = &committed {
        if lost {
            tracing::warn!(%error, writes = handovers.len(), "a group of writes lost to a concurrent one");
        } else {
            tracing::error!(%error, writes = handovers.len(), "a group of writes could not be committed");
        }
        // No connection, or rolled back before its turn: the work never ran.
        for work in waiting.into_iter().flatten() {
            work.fail(error.clone());
        }
    }
    let ok = committed.is_ok();
    let wal = held.as_ref().and_then(|w| w.wal.clone());
    match (ok, syncer, wal) {
        // Committed without a sync. Work is queued, or the syncer still holds a group
        // (its flush in flight would hold a flush here back, and this writer with it):
        // the syncer answers this group once the WAL is on disk, while this writer runs
        // the next one. Neither: sync here, without the hop to another thread.
        (true, Some(syncer), Some(wal)) if queued.waiting() || syncer.busy() => {
            // The syncer gone (it panicked): sync here, as with nothing queued.
            #[cfg(feature = "sqlite")]
            if let Err(lost) = syncer.hand_over(Synced { wal, handovers }) {
                let synced = lost.wal.sync();
                for handover in lost.handovers {
                    handover(synced.clone());
                }
            }
            #[cfg(not(feature = "sqlite"))]
            let _ = (syncer, wal, handovers);
        }
        #[cfg(feature = "sqlite")]
        (true, Some(_), Some(wal)) => {
            let synced = wal.sync();
            if let (Ok(()), Some(checkpointer)) = (&synced, checkpointer) {
                checkpointer.due(&wal.path);
            }
            for handover in handovers {
                handover(synced.clone());
            }
        }
        _ => {
            for handover in handovers {
                handover(committed.clone());
            }
        }
    }
    ok
}

/// A writer's connection. On SQLite (a file) it commits with `synchronous = NORMAL`:
/// the commit writes its pages to the WAL without waiting for the disk, and the WAL is
/// synced ([`Wal::sync`]) before any caller of the group is answered, so a 200 still
/// means the event is on disk, as with `FULL`. When more work is queued (or the syncer
/// still holds a group) the syncer thread syncs and answers while this writer runs the
/// next group: the disk's wait and the next group's statements overlap, and one sync
/// serves every group before it.
/// Checkpoints still sync (SQLite's `NORMAL` syncs the WAL before a checkpoint and the
/// database after it). The connection goes back to the pool with the `synchronous`
/// level it came with (`FULL` from [`SqlitePragmas`](super::SqlitePragmas), or the
/// host's own).
struct Writing {
    conn: Held,
    /// The WAL file to sync; `None` when commits sync themselves (Postgres, an
    /// in-memory database).
    wal: Option<Wal>,
    /// The connection's `synchronous` level before the writer relaxed it.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    synchronous: i32,
    /// The connection's `wal_autocheckpoint` as it came, when the writer may raise it
    /// (SQLite's kind of threshold: a host's 0 or a higher one is left as it is).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    autocheckpoint: Option<i32>,
    /// Whether it is raised now ([`Writing::checkpoint_rarely`]).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    raised: bool,
}

/// Runs a group in one transaction: [`Conn::write`], but on Postgres with its lock
/// wait bounded (`lock_wait`, [`super::DEFAULT_LOCK_WAIT`]) by a `SET LOCAL` sent with
/// the `BEGIN` (one round trip, and nothing left on the connection after the
/// transaction). A group that waited too long is rolled back and run again
/// ([`Database::write_retrying`]).
fn group_transaction<R>(
    conn: &mut Conn<'_>,
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))] lock_wait: std::time::Duration,
    f: impl FnOnce(&mut Conn<'_>) -> Result<R>,
) -> Result<R> {
    match conn {
        #[cfg(feature = "postgres")]
        Conn::Postgres(c) => {
            use diesel::connection::{AnsiTransactionManager, TransactionManager};
            let c: &mut diesel::PgConnection = c;
            let wait = lock_wait.as_millis();
            let begin = format!("BEGIN; SET LOCAL lock_timeout = '{wait}ms'");
            AnsiTransactionManager::begin_transaction_sql(c, &begin)?;
            match f(&mut Conn::Postgres(c)) {
                Ok(value) => {
                    AnsiTransactionManager::commit_transaction(c)?;
                    Ok(value)
                }
                // As diesel's own transactions: the work's error says most.
                Err(error) => match AnsiTransactionManager::rollback_transaction(c) {
                    Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(error),
                    Err(rollback) => Err(rollback.into()),
                },
            }
        }
        #[allow(unreachable_patterns)]
        other => other.write(f),
    }
}

impl Writing {
    fn new(mut conn: Held, relaxed: bool) -> Result<Writing> {
        let relaxed = match (relaxed, &mut conn) {
            #[cfg(feature = "sqlite")]
            (true, Held::Sqlite(c)) => relax(c)?,
            _ => None,
        };
        let (wal, synchronous, autocheckpoint) = match relaxed {
            Some((wal, synchronous, autocheckpoint)) => (Some(wal), synchronous, autocheckpoint),
            None => (None, 2, None),
        };
        Ok(Writing {
            conn,
            wal,
            synchronous,
            autocheckpoint,
            raised: false,
        })
    }

    /// Raises the connection's checkpoint threshold to [`WRITER_CHECKPOINT_PAGES`]
    /// (`rarely`: a [`Checkpointer`] copies the WAL), or sets it back.
    #[cfg(feature = "sqlite")]
    fn checkpoint_rarely(&mut self, rarely: bool) -> Result<()> {
        use diesel::connection::SimpleConnection;
        let (Some(before), Held::Sqlite(c)) = (self.autocheckpoint, &mut self.conn) else {
            return Ok(());
        };
        if rarely == self.raised {
            return Ok(());
        }
        let pages = if rarely {
            WRITER_CHECKPOINT_PAGES as i32
        } else {
            before
        };
        c.batch_execute(&format!("PRAGMA wal_autocheckpoint = {pages}"))?;
        self.raised = rarely;
        Ok(())
    }
}

/// Sets a SQLite writer's connection to commit without syncing; its WAL file, its
/// `synchronous` level before and its `wal_autocheckpoint` when the writer may raise it
/// ([`Writing::checkpoint_rarely`]), or `None` when its commits stay as they are (an
/// in-memory database, another journal mode, a WAL that cannot be opened).
#[cfg(feature = "sqlite")]
fn relax(c: &mut diesel::SqliteConnection) -> Result<Option<(Wal, i32, Option<i32>)>> {
    use diesel::RunQueryDsl;
    use diesel::connection::SimpleConnection;
    #[derive(diesel::QueryableByName)]
    struct File {
        #[diesel(sql_type = diesel::sql_types::Text)]
        file: String,
    }
    #[derive(diesel::QueryableByName)]
    struct Mode {
        #[diesel(sql_type = diesel::sql_types::Text)]
        journal_mode: String,
    }
    #[derive(diesel::QueryableByName)]
    struct Synchronous {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        synchronous: i32,
    }
    #[derive(diesel::QueryableByName)]
    struct Autocheckpoint {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        wal_autocheckpoint: i32,
    }
    // Only a WAL is synced here: in another journal mode the commit syncs itself.
    let mode: Vec<Mode> = diesel::sql_query("PRAGMA journal_mode").load(c)?;
    if !mode
        .iter()
        .any(|m| m.journal_mode.eq_ignore_ascii_case("wal"))
    {
        return Ok(None);
    }
    let file: Vec<File> =
        diesel::sql_query("SELECT file FROM pragma_database_list WHERE name = 'main'").load(c)?;
    let Some(file) = file.into_iter().map(|f| f.file).find(|f| !f.is_empty()) else {
        return Ok(None);
    };
    // A read opens the WAL file (SQLite makes it if need be); this connection keeps it
    // there until it closes.
    c.batch_execute("SELECT 1 FROM sqlite_master LIMIT 1")?;
    let Some(wal) = Wal::open(std::path::PathBuf::from(format!("{file}-wal")))? else {
        return Ok(None);
    };
    let before: Synchronous = diesel::sql_query("PRAGMA synchronous").get_result(c)?;
    // Raised only from SQLite's kind of threshold: a host's 0 (never) or a higher one
    // stays as it chose.
    let autocheckpoint: Autocheckpoint =
        diesel::sql_query("PRAGMA wal_autocheckpoint").get_result(c)?;
    let autocheckpoint = Some(autocheckpoint.wal_autocheckpoint)
        .filter(|pages| (1..i64::from(WRITER_CHECKPOINT_PAGES)).contains(&i64::from(*pages)));
    c.batch_execute("PRAGMA synchronous = NORMAL")?;
    Ok(Some((wal, before.synchronous, autocheckpoint)))
}

impl Drop for Writing {
    fn drop(&mut self) {
        #[cfg(feature = "sqlite")]
        if let (Some(_wal), Held::Sqlite(c)) = (&self.wal, &mut self.conn) {
            use diesel::connection::{
                AnsiTransactionManager, SimpleConnection, TransactionManager,
            };
            let level = self.synchronous;
            let mut sql = format!("PRAGMA synchronous = {level}");
            // Whether raised or not: nothing goes back to the pool at 20,000.
            if let Some(pages) = self.autocheckpoint {
                sql.push_str(&format!("; PRAGMA wal_autocheckpoint = {pages}"));
            }
            #[cfg(test)]
            let sql = match FAIL_RESTORE.lock().unwrap().as_deref() == Some(&*_wal.path) {
                true => "SELECT * FROM no_such_table".to_owned(),
                false => sql,
            };
            if let Err(error) = c.batch_execute(&sql) {
                tracing::error!(%error, level, "a writer's connection could not be set back to its synchronous level (or its checkpoint threshold); it is closed");
                // Not back into the pool at `NORMAL`, where the next user's commits
                // would not sync: r2d2 drops a connection diesel reports broken.
                AnsiTransactionManager::transaction_manager_status_mut(&mut **c).set_in_error();
            }
        }
    }
}

/// A WAL whose writer's connection cannot be set back to its level (for the tests).
#[cfg(all(test, feature = "sqlite"))]
static FAIL_RESTORE: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

/// Postgres commits sync themselves: there is no WAL of the writer's to sync.
#[cfg(not(feature = "sqlite"))]
#[derive(Clone)]
enum Wal {}

/// A group committed on SQLite without a sync, waiting for one.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
struct Synced {
    wal: Wal,
    handovers: Vec<Handover>,
}

/// The syncer thread's inbox, and how many groups it holds not yet answered.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
struct Syncer {
    tx: mpsc::Sender<Synced>,
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
impl Syncer {
    /// Whether it holds a group not yet answered (its flush in flight, or to come).
    fn busy(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// Hands a group over; gives it back when the syncer is gone.
    fn hand_over(&self, group: Synced) -> std::result::Result<(), Synced> {
        use std::sync::atomic::Ordering;
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.tx.send(group).map_err(|mpsc::SendError(lost)| {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            lost
        })
    }
}

/// Starts the thread that syncs a SQLite writer's commits and then answers their
/// callers; it ends with its writer. `None` if it cannot start: commits then sync
/// themselves (`synchronous = FULL`). `checkpointer` is told of each sync that
/// succeeded while a backfill runs (its counter of backfills).
#[cfg(feature = "sqlite")]
fn start_syncer(
    checkpointer: Option<(Checkpointer, Arc<std::sync::atomic::AtomicUsize>)>,
) -> Option<Syncer> {
    let (tx, rx) = mpsc::channel::<Synced>();
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answered = pending.clone();
    std::thread::Builder::new()
        .name("stripe-mirror-syncer".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                // Every group handed over so far, taken before the sync: each committed
                // before it began, so one sync of a WAL serves them all. A group that
                // arrives during the sync waits for a sync of its own.
                let groups: Vec<Synced> = std::iter::once(first).chain(rx.try_iter()).collect();
                let mut synced: Vec<(std::path::PathBuf, std::result::Result<(), String>)> =
                    Vec::new();
                for group in groups {
                    let result = match synced.iter().find(|(wal, _)| *wal == group.wal.path) {
                        Some((_, result)) => result.clone(),
                        None => {
                            let result = group.wal.sync();
                            if let (Ok(()), Some((checkpointer, bulk))) = (&result, &checkpointer)
                                && bulk.load(std::sync::atomic::Ordering::Acquire) > 0
                            {
                                checkpointer.due(&group.wal.path);
                            }
                            synced.push((group.wal.path.clone(), result.clone()));
                            result
                        }
                    };
                    for handover in group.handovers {
                        handover(result.clone());
                    }
                    answered.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                }
            }
        })
        .ok()
        .map(|_| Syncer { tx, pending })
}

/// WAL pages past which a writer whose WAL a [`Checkpointer`] copies still checkpoints
/// itself, as SQLite does past 1,000 (the default): only if the checkpointer falls
/// behind, say while a long read holds the WAL's pages.
#[cfg(feature = "sqlite")]
const WRITER_CHECKPOINT_PAGES: u32 = 20_000;

/// The pause after a checkpoint before the next: commits meanwhile share one.
#[cfg(feature = "sqlite")]
const CHECKPOINT_PAUSE: std::time::Duration = std::time::Duration::from_millis(1000);

/// Copies a SQLite writer's WAL into the database file on a thread of its own
/// (`PRAGMA wal_checkpoint(PASSIVE)`) while a backfill runs ([`Database::bulk`]), told
/// after each sync of the WAL that succeeded (never after a failed one: nothing more
/// of that WAL is copied, see [`FAILED_WALS`]). SQLite would do it inside a commit
/// once the WAL holds 1,000 pages: a copy of about 4 MiB and two syncs on the writer's
/// thread, which meanwhile writes nothing (a backfill's writer spent a sixth of its
/// time there). The copy
/// never waits for readers or the writer (`PASSIVE`). It runs on a connection of its
/// own, outside the pool (a host's pool keeps all its connections), at
/// `synchronous = FULL`: the WAL is synced before its pages are copied, and the
/// database after. It ends with its writer.
#[cfg(feature = "sqlite")]
#[derive(Clone)]
struct Checkpointer {
    tx: mpsc::SyncSender<std::path::PathBuf>,
    /// False once a checkpoint failed (or the thread ended), until one succeeds: the
    /// writer then keeps SQLite's own checkpoints.
    working: Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(not(feature = "sqlite"))]
enum Checkpointer {}

#[cfg(not(feature = "sqlite"))]
impl Checkpointer {
    fn working(&self) -> bool {
        match *self {}
    }
}

#[cfg(feature = "sqlite")]
impl Checkpointer {
    /// `wal` was synced: a checkpoint is due (one already due covers it).
    fn due(&self, wal: &std::path::Path) {
        let _ = self.tx.try_send(wal.to_owned());
    }

    /// Whether its checkpoints run: false after a failed one (or once its thread
    /// ended), until one succeeds.
    fn working(&self) -> bool {
        self.working.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(feature = "sqlite")]
fn start_checkpointer() -> Option<Checkpointer> {
    use std::sync::atomic::Ordering;
    let (tx, rx) = mpsc::sync_channel::<std::path::PathBuf>(1);
    let working = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = working.clone();
    std::thread::Builder::new()
        .name("stripe-mirror-checkpointer".into())
        .spawn(move || {
            // Ended (the writer is gone, or a panic): the writer checkpoints itself.
            struct Ended(Arc<std::sync::atomic::AtomicBool>);
            impl Drop for Ended {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _ended = Ended(flag.clone());
            // Opened at the first checkpoint and kept: its WAL handle predates any
            // later failed flush, so the kernel reports that failure to its sync too.
            let mut conn: Option<(std::path::PathBuf, diesel::SqliteConnection)> = None;
            let mut next = rx.recv().ok();
            while let Some(wal) = next.take() {
                // A checkpoint syncs the WAL: like every flush of it, under `FLUSHING`
                // with the check before and the record after, so none slips in between
                // a failed flush and its record (a later sync on a fresh handle could
                // succeed over pages the failed one lost).
                let flushing = FLUSHING.lock().unwrap_or_else(|p| p.into_inner());
                let failed = FAILED_WALS.lock().unwrap_or_else(|p| p.into_inner());
                let sound = !failed.contains(&wal);
                drop(failed);
                let outcome = sound.then(|| checkpoint(&wal, &mut conn));
                match outcome {
                    Some(Err(Checkpoint::Io(error))) => {
                        FAILED_WALS
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(wal.clone());
                        conn = None;
                        flag.store(false, Ordering::Release);
                        tracing::error!(%error, wal = %wal.display(), "a checkpoint could not sync the WAL or the database: commits since may not be on disk, and the mirror's writer writes nothing more to this database until the process restarts");
                    }
                    Some(Err(Checkpoint::Other(error))) => {
                        conn = None;
                        flag.store(false, Ordering::Release);
                        tracing::warn!(%error, "a checkpoint of the WAL failed; the writer's own checkpoints run instead");
                    }
                    Some(Ok(())) => {
                        flag.store(true, Ordering::Release);
                        #[cfg(test)]
                        CHECKPOINTS.lock().unwrap().push(wal);
                    }
                    None => {}
                }
                drop(flushing);
                // A pause: syncs meanwhile share the next checkpoint.
                let until = std::time::Instant::now() + CHECKPOINT_PAUSE;
                loop {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(wal) => next = Some(wal),
                        Err(mpsc::RecvTimeoutError::Timeout) => break,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                if next.is_none() {
                    next = rx.recv().ok();
                }
            }
        })
        .ok()
        .map(|_| Checkpointer { tx, working })
}

/// Why a checkpoint failed.
#[cfg(feature = "sqlite")]
enum Checkpoint {
    /// An I/O error (a sync of the WAL or of the database, a read): the WAL is
    /// treated as a failed flush's ([`FAILED_WALS`]).
    Io(String),
    /// Anything else (the database could not be opened): nothing was copied.
    Other(String),
}

/// One passive checkpoint of the database whose WAL is `wal`, on the checkpointer's
/// connection to it (opened if need be: only an existing file, by a UTF-8 path).
#[cfg(feature = "sqlite")]
fn checkpoint(
    wal: &std::path::Path,
    conn: &mut Option<(std::path::PathBuf, diesel::SqliteConnection)>,
) -> std::result::Result<(), Checkpoint> {
    use diesel::Connection;
    use diesel::connection::SimpleConnection;
    let other = |e: &dyn std::fmt::Display| Checkpoint::Other(e.to_string());
    let c = match conn {
        Some((open, c)) if open.as_path() == wal => c,
        _ => {
            let file = wal
                .to_str()
                .and_then(|w| w.strip_suffix("-wal"))
                .filter(|file| std::path::Path::new(file).is_file())
                .ok_or_else(|| other(&format!("no database file beside {}", wal.display())))?;
            let mut c = diesel::SqliteConnection::establish(file).map_err(|e| other(&e))?;
            c.batch_execute("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000")
                .map_err(|e| other(&e))?;
            &mut conn.insert((wal.to_owned(), c)).1
        }
    };
    let copied = c.batch_execute("PRAGMA wal_checkpoint(PASSIVE)");
    // SQLite's own words for `SQLITE_IOERR`, as a failing disk would give them.
    #[cfg(test)]
    let copied = match FAIL_CHECKPOINT.lock().unwrap().as_deref() == Some(wal) {
        true => Err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new("disk I/O error".to_owned()),
        )),
        false => copied,
    };
    copied.map_err(|e| match e.to_string() {
        io if io.contains("I/O error") => Checkpoint::Io(io),
        message => Checkpoint::Other(message),
    })
}

/// A WAL whose checkpoints fail as if the disk did (for the tests).
#[cfg(all(test, feature = "sqlite"))]
static FAIL_CHECKPOINT: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

/// The WAL files the checkpointer copied (for the tests).
#[cfg(all(test, feature = "sqlite"))]
static CHECKPOINTS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// The WAL files whose sync was asked for, and when (for the tests).
#[cfg(all(test, feature = "sqlite"))]
static SYNCED: Mutex<Vec<(std::path::PathBuf, std::time::Instant)>> = Mutex::new(Vec::new());

/// The WAL files flushed, with when the flush was asked for and when it was done (for
/// the tests).
#[cfg(all(test, feature = "sqlite"))]
static FLUSHED: Mutex<Vec<(std::path::PathBuf, std::time::Instant, std::time::Instant)>> =
    Mutex::new(Vec::new());

/// Held by a test to hold every sync back (and see that nobody is answered meanwhile).
#[cfg(all(test, feature = "sqlite"))]
static SYNC_GATE: Mutex<()> = Mutex::new(());

/// Held by a test to keep a flush in flight (taken where the flush would begin).
#[cfg(all(test, feature = "sqlite"))]
static FLUSH_IN_FLIGHT: Mutex<()> = Mutex::new(());

/// Told when a flush of this WAL begins (for a test).
#[cfg(all(test, feature = "sqlite"))]
type FlushStarted = Option<(std::path::PathBuf, mpsc::Sender<()>)>;
#[cfg(all(test, feature = "sqlite"))]
static FLUSH_STARTED: Mutex<FlushStarted> = Mutex::new(None);

/// The WALs whose flushes fail as if the disk did (for the tests; each test adds its
/// own and takes it out, as tests run side by side in one process under `cargo test`).
#[cfg(all(test, feature = "sqlite"))]
pub(crate) static FAIL_FLUSH: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// Makes the flushes of `wal` fail until the guard is dropped (for the tests).
#[cfg(all(test, feature = "sqlite"))]
pub(crate) fn fail_flush(wal: &std::path::Path) -> impl Drop {
    struct Failing(std::path::PathBuf);
    impl Drop for Failing {
        fn drop(&mut self) {
            let mut failing = FAIL_FLUSH.lock().unwrap_or_else(|p| p.into_inner());
            failing.retain(|p| *p != self.0);
        }
    }
    FAIL_FLUSH.lock().unwrap().push(wal.to_owned());
    Failing(wal.to_owned())
}

/// The WAL files a flush failed for. The failed writeback's pages may be dropped, so a
/// later flush could succeed over commits that never reached the disk (and SQLite's
/// recovery stops at the first missing one): nothing more is written on that WAL by
/// the mirror's writer, and every later sync of it fails, until the process restarts.
/// Postgres panics for the same reason. Held only to read or add to the list: a
/// writer checking it before its next group must not wait for a flush in flight.
#[cfg(feature = "sqlite")]
static FAILED_WALS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// Held across each flush, its check before and its record after, so no flush on
/// another thread can slip in between a failed flush and its record (and succeed
/// over pages the failed one lost). Not [`FAILED_WALS`]'s lock: the writer checks that
/// list before each group, and must not wait there for the syncer's flush: the next
/// group's statements are meant to overlap it.
#[cfg(feature = "sqlite")]
static FLUSHING: Mutex<()> = Mutex::new(());

/// The WAL files whose directory was synced, by inode: a WAL made anew (after every
/// connection closed) is another file, whose directory entry must reach the disk.
#[cfg(all(unix, feature = "sqlite"))]
static SYNCED_DIRECTORIES: Mutex<Vec<(std::path::PathBuf, u64)>> = Mutex::new(Vec::new());

/// A SQLite writer's WAL file, opened before its first commit.
#[cfg(feature = "sqlite")]
#[derive(Clone)]
struct Wal {
    path: std::path::PathBuf,
    /// Kept while the writer holds its connection, which keeps the file there (SQLite
    /// removes a WAL only when the database's last connection closes). Linux reports a
    /// failed writeback to every handle open when it happened, each once, even after
    /// another handle (SQLite's own, at a checkpoint) was told: opened before the
    /// writer's commits, this one hears of every failure of their pages.
    file: Arc<std::fs::File>,
}

#[cfg(feature = "sqlite")]
impl Wal {
    /// Opens the WAL and, the first time this file is seen, syncs its directory (a WAL
    /// made anew must be found after a power failure); `None` when there is no WAL
    /// file or it cannot be opened (the writer's commits then sync themselves).
    fn open(path: std::path::PathBuf) -> Result<Option<Wal>> {
        // For writing (never created nor truncated): some systems flush only files
        // opened so.
        let file = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                tracing::warn!(%error, wal = %path.display(), "the WAL cannot be opened to sync it: the writer's commits sync themselves");
                return Ok(None);
            }
        };
        let wal = Wal {
            file: Arc::new(file),
            path,
        };
        wal.sound()?;
        #[cfg(unix)]
        wal.sync_directory_once();
        Ok(Some(wal))
    }

    /// Syncs the WAL's directory the first time this file (by inode) is seen. Best
    /// effort, as SQLite's own directory syncs: some file systems cannot sync a
    /// directory (EINVAL), and a directory may be searchable but not readable.
    #[cfg(unix)]
    fn sync_directory_once(&self) {
        use std::os::unix::fs::MetadataExt;
        let Ok(inode) = self.file.metadata().map(|m| m.ino()) else {
            return;
        };
        let mut seen = SYNCED_DIRECTORIES.lock().unwrap_or_else(|p| p.into_inner());
        if seen.iter().any(|(p, i)| *p == self.path && *i == inode) {
            return;
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(error) = std::fs::File::open(dir).and_then(|d| d.sync_all())
        {
            tracing::warn!(%error, dir = %dir.display(), "the WAL's directory could not be synced");
        }
        seen.retain(|(p, _)| *p != self.path);
        seen.push((self.path.clone(), inode));
    }

    /// `Err` once a flush of this WAL failed.
    fn sound(&self) -> Result<()> {
        let failed = FAILED_WALS.lock().unwrap_or_else(|p| p.into_inner());
        self.check(&failed)
            .map_err(|message| Error::Commit { message })
    }

    fn check(&self, failed: &[std::path::PathBuf]) -> std::result::Result<(), String> {
        if failed.contains(&self.path) {
            return Err(format!(
                "an earlier sync of {} failed (an I/O error or a full disk), so commits \
                 since may not be on disk; the mirror's writer (webhook deliveries) \
                 writes nothing more to this database until the process restarts. Fix \
                 the disk, then reboot (the system may still hold pages that never \
                 reached it) or run `stripe-mirror sync` after the restart",
                self.path.display()
            ));
        }
        Ok(())
    }

    /// Flushes the WAL's pages and size to disk. Once a flush failed, every later one
    /// fails too ([`FAILED_WALS`]).
    fn sync(&self) -> std::result::Result<(), String> {
        #[cfg(test)]
        let asked = std::time::Instant::now();
        #[cfg(test)]
        SYNCED.lock().unwrap().push((self.path.clone(), asked));
        #[cfg(test)]
        let _gate = SYNC_GATE.lock().unwrap_or_else(|p| p.into_inner());
        let _flushing = FLUSHING.lock().unwrap_or_else(|p| p.into_inner());
        self.check(&FAILED_WALS.lock().unwrap_or_else(|p| p.into_inner()))?;
        // The test's WAL only: another test's flush must not wait for it.
        #[cfg(test)]
        let held = FLUSH_STARTED
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(wal, _)| *wal == self.path)
            .map(|(_, started)| started.send(()))
            .is_some();
        #[cfg(test)]
        let _in_flight = held.then(|| FLUSH_IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner()));
        #[cfg(test)]
        let flushed = match FAIL_FLUSH.lock().unwrap().contains(&self.path) {
            true => Err(std::io::Error::from_raw_os_error(5)),
            false => self.file.sync_data(),
        };
        #[cfg(not(test))]
        let flushed = self.file.sync_data();
        if let Err(e) = flushed {
            (FAILED_WALS.lock().unwrap_or_else(|p| p.into_inner())).push(self.path.clone());
            return Err(unsynced(&self.path, &e));
        }
        #[cfg(test)]
        FLUSHED
            .lock()
            .unwrap()
            .push((self.path.clone(), asked, std::time::Instant::now()));
        Ok(())
    }
}

#[cfg(feature = "sqlite")]
fn unsynced(wal: &std::path::Path, e: &std::io::Error) -> String {
    format!(
        "the commit could not be synced to disk ({}): {e}",
        wal.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued piece of work that only has a key.
    struct Keyed(&'static str);

    impl Work for Keyed {
        fn run(self: Box<Self>, _: &mut Conn<'_>) -> (Handover, Option<String>) {
            (Box::new(|_| ()), None)
        }
        fn fail(self: Box<Self>, _: String) {}
        fn key(&self) -> &str {
            self.0
        }
    }

    /// The rows committed in a test database's table `t` (read on a pooled connection).
    #[cfg(feature = "sqlite")]
    fn rows_in_t(db: &Database) -> i64 {
        db.run_blocking(|conn| {
            use diesel::RunQueryDsl;
            #[derive(diesel::QueryableByName)]
            struct Count {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let rows: Vec<Count> = crate::db::on_conn!(conn, c => {
                diesel::sql_query("SELECT COUNT(*) AS n FROM t").load(c)
            })?;
            Ok(rows[0].n)
        })
        .unwrap()
    }

    /// Runs `group` with `queue` waiting in the writer's queue and `syncer` beside it:
    /// whether it committed, and how much of the queue is left (queued or carried).
    #[cfg(feature = "sqlite")]
    fn run_with_queue(
        db: &Database,
        group: Vec<Box<dyn Work>>,
        queue: Vec<Box<dyn Work>>,
        syncer: &Syncer,
    ) -> (bool, usize) {
        let (queue_tx, queue_rx) = mpsc::channel::<Box<dyn Work>>();
        for work in queue {
            queue_tx.send(work).unwrap();
        }
        let queue_rx = Mutex::new(queue_rx);
        let mut carried = Vec::new();
        let queued = Queued {
            rx: &queue_rx,
            carried: &mut carried,
        };
        let committed = run_group(db, &mut None, group, queued, Some(syncer), None);
        let left = queue_rx.lock().unwrap().try_iter().count() + carried.len();
        (committed, left)
    }

    /// A new SQLite database in `dir` (a pool of `size`) with a table `t (x)`, and its
    /// WAL's path, named by the directory's real path as SQLite names its files.
    #[cfg(feature = "sqlite")]
    fn sqlite_db(dir: &tempfile::TempDir, name: &str, size: u32) -> (Database, std::path::PathBuf) {
        let path = dir.path().canonicalize().unwrap().join(name);
        let wal = std::path::PathBuf::from(format!("{}-wal", path.display()));
        let url = format!("sqlite://{}", path.display());
        let db = Database::open(&url, size, std::time::Duration::from_secs(5)).unwrap();
        db.run_blocking(|conn| {
            use diesel::connection::SimpleConnection;
            crate::db::on_conn!(conn, c => c.batch_execute("CREATE TABLE t (x INTEGER)"))?;
            Ok(())
        })
        .unwrap();
        (db, wal)
    }

    /// Whether a flush of `wal` was asked for after `ran` and done before `answered`.
    #[cfg(feature = "sqlite")]
    fn flushed_between(
        wal: &std::path::Path,
        ran: std::time::Instant,
        answered: std::time::Instant,
    ) -> bool {
        FLUSHED
            .lock()
            .unwrap()
            .iter()
            .any(|(w, asked, done)| w == wal && *asked > ran && *done < answered)
    }

    fn keys(work: &[Box<dyn Work>]) -> Vec<&str> {
        work.iter().map(|w| w.key()).collect()
    }

    /// Runs `f` on another thread; panics if it has not returned within 10 s (a
    /// writer waiting where it must not would hang the test, not fail it).
    fn returns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("returned without waiting for the queue's lock")
    }

    /// Another writer blocked on the queue holds its lock: a group does not wait for
    /// it (the work that would free it is held back by the group's own callers).
    #[test]
    fn a_group_does_not_wait_for_a_writer_waiting_for_work() {
        let (tx, rx) = mpsc::channel::<Box<dyn Work>>();
        tx.send(Box::new(Keyed("evt_z"))).unwrap();
        let rx = Arc::new(Mutex::new(rx));
        let (locked_tx, locked_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let other = std::thread::spawn({
            let rx = rx.clone();
            move || {
                let _waiting_for_work = rx.lock().unwrap();
                locked_tx.send(()).unwrap();
                let _ = release_rx.recv();
            }
        });
        locked_rx.recv().unwrap();
        // A group that committed looks for queued work without waiting for the lock.
        let waiting = returns({
            let rx = rx.clone();
            move || {
                let mut carried = Vec::new();
                let mut queued = Queued {
                    rx: &rx,
                    carried: &mut carried,
                };
                queued.waiting()
            }
        });
        assert!(!waiting);
        // Work carried from the last group starts the next one at once.
        let next = returns({
            let rx = rx.clone();
            move || {
                let mut carried: Vec<Box<dyn Work>> =
                    vec![Box::new(Keyed("evt_b")), Box::new(Keyed("evt_a"))];
                let group = gather(|| true, &rx, &mut carried, &mut None).unwrap();
                keys(&group)
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
            }
        });
        assert_eq!(next, ["evt_a", "evt_b"]);
        release_tx.send(()).unwrap();
        other.join().unwrap();
    }

    /// A group is at most [`MAX_BATCH`], carried work included: the rest waits for the
    /// group after.
    #[test]
    fn carried_work_is_bounded_like_the_rest() {
        let (_tx, rx) = mpsc::channel::<Box<dyn Work>>();
        let rx = Mutex::new(rx);
        let mut carried: Vec<Box<dyn Work>> = (0..MAX_BATCH + 6)
            .map(|_| Box::new(Keyed("evt_c")) as Box<dyn Work>)
            .collect();
        let group = gather(|| true, &rx, &mut carried, &mut None).unwrap();
        assert_eq!((group.len(), carried.len()), (MAX_BATCH, 6));
    }

    /// On SQLite every caller is answered only after a sync of the WAL that began
    /// after its work ran (its commit does not sync: `synchronous = NORMAL`), whether
    /// the writer synced itself or handed the group to the syncer while it ran the next.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    // The gate is held across awaits on purpose: the syncs must wait for the test.
    #[allow(clippy::await_holding_lock)]
    async fn sqlite_callers_are_answered_after_their_commit_is_synced() {
        use diesel::connection::SimpleConnection;
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "synced.db", 4);
        let insert = |conn: &mut Conn<'_>| -> Result<std::time::Instant> {
            crate::db::on_conn!(conn, c => c.batch_execute("INSERT INTO t VALUES (1)"))?;
            Ok(std::time::Instant::now())
        };
        let check = |ran: std::time::Instant, answered: std::time::Instant| {
            assert!(
                flushed_between(&wal, ran, answered),
                "answered without a flush of {} between the work and the answer",
                wal.display()
            );
        };
        // Alone: the writer syncs before it answers.
        // Held back, the sync holds the answer back too.
        let held_back = SYNC_GATE.lock().unwrap();
        let alone = tokio::spawn({
            let db = db.clone();
            async move { db.write_batched("evt_a", insert).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!alone.is_finished(), "answered before its sync");
        drop(held_back);
        let ran = alone.await.unwrap().unwrap();
        check(ran, std::time::Instant::now());
        // Work queued while a group runs: the syncer syncs and answers that group while
        // the writer runs the next one.
        let (running_tx, running_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let first = tokio::spawn({
            let db = db.clone();
            async move {
                let ran = db
                    .write_batched("evt_b", move |conn| {
                        let ran = insert(conn);
                        running_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        ran
                    })
                    .await
                    .unwrap();
                (ran, std::time::Instant::now())
            }
        });
        tokio::task::spawn_blocking(move || running_rx.recv().unwrap())
            .await
            .unwrap();
        // The second holds the writer until the first is answered: the first's sync
        // can only be the syncer's.
        let (go2_tx, go2_rx) = mpsc::channel::<()>();
        let second = db.write_batched("evt_c", move |conn| {
            let ran = insert(conn);
            go2_rx.recv().unwrap();
            ran
        });
        let mut second = std::pin::pin!(second);
        assert!(second.as_mut().now_or_never().is_none(), "queued, not run");
        let held_back = SYNC_GATE.lock().unwrap();
        go_tx.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!first.is_finished(), "answered before its sync");
        drop(held_back);
        let (ran, answered) = first.await.unwrap();
        check(ran, answered);
        go2_tx.send(()).unwrap();
        let ran = second.await.unwrap();
        check(ran, std::time::Instant::now());
    }

    /// While the syncer flushes one group, the writer runs the next: its check that no
    /// earlier flush failed does not wait for the flush in flight.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    // The flush is held across awaits on purpose: it must stay in flight.
    #[allow(clippy::await_holding_lock)]
    async fn the_next_group_runs_while_the_last_one_is_flushed() {
        use diesel::connection::SimpleConnection;
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "overlap.db", 4);
        // Work that inserts a row, says it ran, then waits for the test's word.
        let work = |ran: mpsc::Sender<()>, go: mpsc::Receiver<()>| {
            move |conn: &mut Conn<'_>| -> Result<()> {
                crate::db::on_conn!(conn, c => c.batch_execute("INSERT INTO t VALUES (1)"))?;
                ran.send(()).unwrap();
                go.recv().unwrap();
                Ok(())
            }
        };
        let (ran_tx, ran_rx) = mpsc::channel::<()>();
        let ran = Arc::new(Mutex::new(ran_rx));
        let wait_ran = || {
            let ran = ran.clone();
            tokio::task::spawn_blocking(move || {
                ran.lock()
                    .unwrap()
                    .recv_timeout(std::time::Duration::from_secs(10))
            })
        };
        let (started_tx, started_rx) = mpsc::channel::<()>();
        *FLUSH_STARTED.lock().unwrap() = Some((wal.clone(), started_tx));
        let in_flight = FLUSH_IN_FLIGHT.lock().unwrap();
        // The first group holds the writer until the second is queued: its flush goes
        // to the syncer, and is held there in flight.
        let (go_a, go_a_rx) = mpsc::channel::<()>();
        let first = db.write_batched("evt_a", work(ran_tx.clone(), go_a_rx));
        let mut first = std::pin::pin!(first);
        assert!(first.as_mut().now_or_never().is_none());
        wait_ran().await.unwrap().unwrap();
        let (go_b, go_b_rx) = mpsc::channel::<()>();
        let second = db.write_batched("evt_b", work(ran_tx.clone(), go_b_rx));
        let mut second = std::pin::pin!(second);
        assert!(second.as_mut().now_or_never().is_none());
        go_a.send(()).unwrap();
        tokio::task::spawn_blocking(move || {
            started_rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("the first group's flush began")
        })
        .await
        .unwrap();
        wait_ran().await.unwrap().unwrap();
        let committed = |n: i64| rows_in_t(&db) >= n;
        // The second commits (nothing queued to join it) and goes to the syncer too.
        go_b.send(()).unwrap();
        let mut looks = 0;
        while !committed(2) && looks < 1000 {
            looks += 1;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // A third group, queued once the first one's flush is in flight, starts while
        // it is (on the old code its check waited for that flush, which never ends
        // here).
        let (go_c, go_c_rx) = mpsc::channel::<()>();
        go_c.send(()).unwrap();
        let third = db.write_batched("evt_c", work(ran_tx.clone(), go_c_rx));
        let mut third = std::pin::pin!(third);
        assert!(third.as_mut().now_or_never().is_none());
        let started = wait_ran().await.unwrap();
        // The third commits with nothing queued, the syncer still holding the first
        // two: it goes to the syncer too, and the writer takes a fourth (a flush of
        // its own would wait for the one in flight, and hold the writer with it).
        let mut looks = 0;
        while started.is_ok() && !committed(3) && looks < 1000 {
            looks += 1;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (go_d, go_d_rx) = mpsc::channel::<()>();
        go_d.send(()).unwrap();
        let fourth = db.write_batched("evt_d", work(ran_tx, go_d_rx));
        let mut fourth = std::pin::pin!(fourth);
        assert!(fourth.as_mut().now_or_never().is_none());
        let then = wait_ran().await.unwrap();
        assert!(
            first.as_mut().now_or_never().is_none(),
            "answered before its flush"
        );
        drop(in_flight);
        *FLUSH_STARTED.lock().unwrap() = None;
        assert!(
            started.is_ok(),
            "the next group waited for the last one's flush"
        );
        assert!(
            then.is_ok(),
            "the writer synced a group itself behind the syncer's flush"
        );
        first.await.unwrap();
        second.await.unwrap();
        third.await.unwrap();
        fourth.await.unwrap();
    }

    /// A flush of the WAL that fails (EIO) fails its commit, and every later commit on
    /// that WAL too, even once flushes succeed again: the failed one may have dropped
    /// pages the later ones build on. Another database's WAL is not affected.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_fails_every_later_commit_on_that_wal() {
        use diesel::connection::SimpleConnection;
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "failing.db", 2);
        let (other, _) = sqlite_db(&dir, "sound.db", 2);
        let insert = |conn: &mut Conn<'_>| -> Result<()> {
            crate::db::on_conn!(conn, c => c.batch_execute("INSERT INTO t VALUES (1)"))?;
            Ok(())
        };
        db.write_batched("evt_a", insert).await.unwrap();
        let failing = fail_flush(&wal);
        let failed = db.write_batched("evt_b", insert).await.unwrap_err();
        drop(failing);
        assert!(
            failed.to_string().contains("could not be synced"),
            "{failed}"
        );
        let later = db
            .write_batched("evt_c", |_: &mut Conn<'_>| -> Result<()> {
                panic!("a write ran on a WAL whose flush failed")
            })
            .await
            .unwrap_err();
        assert!(later.to_string().contains("an earlier sync"), "{later}");
        other.write_batched("evt_d", insert).await.unwrap();
    }

    /// While a backfill runs, the writer leaves the WAL's checkpoints to a thread of its
    /// own (SQLite runs them inside a commit, on the writer's thread, once the WAL holds
    /// 1,000 pages): its connection's threshold is raised, and pages committed reach the
    /// database file far below SQLite's. Without a backfill, and once it ended, SQLite's
    /// own; the connection goes back to the pool with SQLite's threshold.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_copied_into_the_database_off_the_writer() {
        use diesel::RunQueryDsl;
        use diesel::connection::SimpleConnection;
        #[derive(diesel::QueryableByName)]
        struct Autocheckpoint {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            wal_autocheckpoint: i32,
        }
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "copied.db", 4);
        let file = std::path::PathBuf::from(wal.to_str().unwrap().trim_end_matches("-wal"));
        let before = std::fs::metadata(&file).unwrap().len();
        // 300 rows of a page each: about 300 pages of WAL.
        let rows = |conn: &mut Conn<'_>| -> Result<()> {
            crate::db::on_conn!(conn, c => c.batch_execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) \
                 INSERT INTO t SELECT zeroblob(3000) FROM n"
            ))?;
            Ok(())
        };
        let level = || {
            db.write_batched("evt_level", |conn| {
                let level: Autocheckpoint = crate::db::on_conn!(conn, c => diesel::sql_query("PRAGMA wal_autocheckpoint").get_result(c))?;
                Ok(level.wal_autocheckpoint)
            })
        };
        // Webhook deliveries alone: SQLite's own checkpoints, nothing copied yet.
        db.write_batched("evt_a", rows).await.unwrap();
        assert_eq!(level().await.unwrap(), 1000);
        tokio::time::sleep(CHECKPOINT_PAUSE / 2).await;
        assert!(
            !CHECKPOINTS.lock().unwrap().contains(&wal),
            "copied without a backfill"
        );
        assert!(std::fs::metadata(&file).unwrap().len() < before + 300 * 3000);
        // While a backfill runs: the checkpointer's.
        let bulk = db.bulk();
        db.write_batched("evt_b", rows).await.unwrap();
        assert_eq!(level().await.unwrap(), WRITER_CHECKPOINT_PAGES as i32);
        let copied = || {
            std::fs::metadata(&file).unwrap().len() > before + 300 * 3000
                && CHECKPOINTS.lock().unwrap().contains(&wal)
        };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !copied() && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            copied(),
            "the committed pages were not copied into {} ({} bytes, {before} before)",
            file.display(),
            std::fs::metadata(&file).unwrap().len()
        );
        // Once the backfill ended, the next group sets it back.
        drop(bulk);
        assert_eq!(level().await.unwrap(), 1000);
        // Once the writer gave its connection back (after LINGER without work), every
        // pooled connection checkpoints at SQLite's own threshold.
        tokio::time::sleep(LINGER + std::time::Duration::from_millis(500)).await;
        let mut held: Vec<Held> = (0..4).map(|_| db.hold().unwrap()).collect();
        for held in &mut held {
            let level: Autocheckpoint = crate::db::on_conn!(&mut held.conn(), c => diesel::sql_query("PRAGMA wal_autocheckpoint").get_result(c)).unwrap();
            assert_eq!(level.wal_autocheckpoint, 1000);
        }
    }

    /// A checkpoint asked for a WAL whose flush failed does not run (its pages may not
    /// be on disk); one asked for a sound WAL does.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wal_whose_flush_failed_is_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (_failed_db, failed) = sqlite_db(&dir, "failed.db", 2);
        let (_sound_db, sound) = sqlite_db(&dir, "sound.db", 2);
        FAILED_WALS.lock().unwrap().push(failed.clone());
        let checkpointer = start_checkpointer().unwrap();
        // Sent, not `due`: the second waits for the first's pause.
        checkpointer.tx.send(failed.clone()).unwrap();
        checkpointer.tx.send(sound.clone()).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !CHECKPOINTS.lock().unwrap().contains(&sound) && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let copied = CHECKPOINTS.lock().unwrap().clone();
        assert!(copied.contains(&sound), "the sound WAL was not copied");
        assert!(
            !copied.contains(&failed),
            "a WAL whose flush failed was copied into the database"
        );
    }

    /// A checkpoint that meets an I/O error is a failed flush: the WAL is recorded as
    /// failed (its copy is not trusted, nor a later sync on a new handle), the writer
    /// writes nothing more on it, and the checkpointer leaves the writer its own
    /// checkpoints.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_that_meets_an_io_error_fails_later_writes() {
        use diesel::connection::SimpleConnection;
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "eio.db", 2);
        let insert = |conn: &mut Conn<'_>| -> Result<()> {
            crate::db::on_conn!(conn, c => c.batch_execute("INSERT INTO t VALUES (1)"))?;
            Ok(())
        };
        db.write_batched("evt_a", insert).await.unwrap();
        *FAIL_CHECKPOINT.lock().unwrap() = Some(wal.clone());
        let checkpointer = start_checkpointer().unwrap();
        checkpointer.tx.send(wal.clone()).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while checkpointer.working() && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        *FAIL_CHECKPOINT.lock().unwrap() = None;
        assert!(!checkpointer.working(), "it kept checkpointing");
        assert!(!CHECKPOINTS.lock().unwrap().contains(&wal));
        assert!(
            FAILED_WALS.lock().unwrap().contains(&wal),
            "the WAL was not recorded as failed"
        );
        let refused = db.write_batched("evt_b", insert).await;
        assert!(
            matches!(&refused, Err(Error::Commit { .. })),
            "a write went on after the failed checkpoint: {refused:?}"
        );
    }

    /// A checkpoint that fails (here: no database beside the WAL, nothing created)
    /// says so, and the writer then keeps SQLite's own checkpoints.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_checkpointer_leaves_the_writer_its_own_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.db-wal");
        let checkpointer = start_checkpointer().unwrap();
        assert!(checkpointer.working());
        checkpointer.tx.send(gone.clone()).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while checkpointer.working() && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            !checkpointer.working(),
            "a failed checkpoint left it working"
        );
        assert!(!dir.path().join("gone.db").exists(), "a database was made");
        assert!(!CHECKPOINTS.lock().unwrap().contains(&gone));
    }

    /// Work queued while the syncer still flushes the groups before joins the group
    /// that runs: one commit, handed over whole. With the syncer idle it waits for the
    /// next group, which runs while this one is flushed.
    #[cfg(feature = "sqlite")]
    #[test]
    fn queued_work_joins_the_group_while_the_syncer_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _wal) = sqlite_db(&dir, "join.db", 2);
        for busy in [true, false] {
            let (syncer_tx, syncer_rx) = mpsc::channel::<Synced>();
            // A group handed over before and not yet answered: the syncer is busy.
            let syncer = Syncer {
                tx: syncer_tx,
                pending: Arc::new(std::sync::atomic::AtomicUsize::new(usize::from(busy))),
            };
            let keyed = |key| Box::new(Keyed(key)) as Box<dyn Work>;
            let queue = vec![keyed("evt_b"), keyed("evt_c")];
            let (committed, left) = run_with_queue(&db, vec![keyed("evt_a")], queue, &syncer);
            assert!(committed);
            let handed = syncer_rx.try_recv().expect("handed over to the syncer");
            match busy {
                true => assert_eq!((handed.handovers.len(), left), (3, 0), "joined"),
                false => assert_eq!((handed.handovers.len(), left), (1, 2), "left queued"),
            }
        }
    }

    /// A joined write shares its group's fate: when it fails, the group is rolled back
    /// and every caller hears it; the group takes at most [`MAX_BATCH`] writes in all.
    #[cfg(feature = "sqlite")]
    #[test]
    fn a_joined_write_fails_its_group_and_joining_stops_at_the_cap() {
        use diesel::connection::SimpleConnection;
        let dir = tempfile::tempdir().unwrap();
        let (db, _wal) = sqlite_db(&dir, "joined.db", 2);
        let busy = || {
            let (tx, rx) = mpsc::channel::<Synced>();
            let syncer = Syncer {
                tx,
                pending: Arc::new(std::sync::atomic::AtomicUsize::new(1)),
            };
            (syncer, rx)
        };
        let insert = |key: &str, fails: bool| {
            let (tx, rx) = oneshot::channel();
            let work: Box<dyn Work> = Box::new(Pending {
                f: move |conn: &mut Conn<'_>| -> Result<()> {
                    crate::db::on_conn!(conn, c => c.batch_execute("INSERT INTO t VALUES (1)"))?;
                    match fails {
                        true => Err(Error::Config("this write fails".into())),
                        false => Ok(()),
                    }
                },
                tx,
                key: key.into(),
            });
            (work, rx)
        };
        let rows = || rows_in_t(&db);
        // The joined write fails: nothing is stored, each caller gets an error.
        let (first, first_rx) = insert("evt_a", false);
        let (joined, joined_rx) = insert("evt_b", true);
        let (syncer, _handed) = busy();
        let (committed, _) = run_with_queue(&db, vec![first], vec![joined], &syncer);
        assert!(!committed);
        assert_eq!(rows(), 0, "rolled back");
        let first = first_rx.blocking_recv().unwrap();
        assert!(
            matches!(&first, Err(Error::Commit { message }) if message.contains(ANOTHER_FAILED)),
            "{first:?}"
        );
        let joined = joined_rx.blocking_recv().unwrap();
        assert!(matches!(joined, Err(Error::Config(_))), "{joined:?}");
        // A group one short of the cap takes one more; the rest stays queued.
        let group: Vec<Box<dyn Work>> = (0..MAX_BATCH - 1)
            .map(|_| Box::new(Keyed("evt_c")) as Box<dyn Work>)
            .collect();
        let queue = (0..3)
            .map(|_| Box::new(Keyed("evt_d")) as Box<dyn Work>)
            .collect();
        let (syncer, handed) = busy();
        let (committed, left) = run_with_queue(&db, group, queue, &syncer);
        assert!(committed);
        let handed = handed.try_recv().expect("handed over to the syncer");
        assert_eq!((handed.handovers.len(), left), (MAX_BATCH, 2));
    }

    /// A syncer that is gone (it panicked) leaves the writer syncing its groups itself:
    /// each caller is still answered, after a sync.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    // The gate is held across awaits on purpose: the sync must wait for the test.
    #[allow(clippy::await_holding_lock)]
    async fn a_dead_syncer_leaves_the_writer_syncing_itself() {
        use diesel::connection::SimpleConnection;
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "alone.db", 2);
        let (tx, rx) = oneshot::channel();
        let work: Box<dyn Work> = Box::new(Pending {
            f: |conn: &mut Conn<'_>| -> Result<std::time::Instant> {
                crate::db::on_conn!(conn, c => c.batch_execute("INSERT INTO t VALUES (1)"))?;
                Ok(std::time::Instant::now())
            },
            tx,
            key: "evt_a".into(),
        });
        // Work is queued, so the group goes to the syncer, whose thread is gone.
        let (syncer, gone) = mpsc::channel::<Synced>();
        drop(gone);
        let mut rx = std::pin::pin!(rx);
        // Held back, the sync holds the answer back too.
        let held_back = SYNC_GATE.lock().unwrap();
        let group = tokio::task::spawn_blocking(move || {
            let syncer = Syncer {
                tx: syncer,
                pending: Arc::default(),
            };
            let queue: Vec<Box<dyn Work>> = vec![Box::new(Keyed("evt_b"))];
            run_with_queue(&db, vec![work], queue, &syncer).0
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            futures_util::FutureExt::now_or_never(rx.as_mut()).is_none(),
            "answered before its sync"
        );
        drop(held_back);
        assert!(group.await.unwrap(), "committed");
        let ran = rx.await.unwrap().unwrap();
        let answered = std::time::Instant::now();
        assert!(
            flushed_between(&wal, ran, answered),
            "answered without a flush"
        );
    }

    /// The writer opens its WAL before its first commit (a failure reported before
    /// then would not reach a handle opened after), and the handle is the WAL's.
    #[cfg(all(unix, feature = "sqlite"))]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_opens_its_wal_before_it_commits() {
        use diesel::connection::SimpleConnection;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "first.db", 2);
        let writing = Writing::new(db.hold().unwrap(), true).unwrap();
        let kept = writing.wal.as_ref().expect("a WAL to sync");
        assert_eq!(kept.path, wal);
        assert_eq!(
            kept.file.metadata().unwrap().ino(),
            std::fs::metadata(&wal).unwrap().ino(),
            "the handle is the WAL's"
        );
        let mut writing = writing;
        crate::db::on_conn!(&mut writing.conn.conn(), c => c.batch_execute("INSERT INTO t VALUES (1)")).unwrap();
        assert!(
            writing.wal.as_ref().unwrap().sync().is_ok(),
            "flushed through the handle opened before the commit"
        );
    }

    /// A group handed to the syncer while it syncs an earlier one is answered after a
    /// sync asked for after that group's commit, not with the earlier sync's result
    /// (whose flush may have begun before the group's pages were written).
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    // The gate is held across awaits on purpose: the syncs must wait for the test.
    #[allow(clippy::await_holding_lock)]
    async fn a_group_handed_over_during_a_sync_gets_a_sync_of_its_own() {
        use diesel::connection::SimpleConnection;
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "handed.db", 2);
        let syncs = || {
            SYNCED
                .lock()
                .unwrap()
                .iter()
                .filter(|(w, _)| *w == wal)
                .count()
        };
        // Waits (off the runtime's threads) for a signal from a write.
        async fn signalled(rx: mpsc::Receiver<()>) {
            tokio::task::spawn_blocking(move || {
                rx.recv_timeout(std::time::Duration::from_secs(10))
                    .expect("the write did not get this far")
            })
            .await
            .unwrap();
        }
        // A write that waits for `start`, inserts, says so and waits for `go`.
        let gated = |key: &'static str| {
            let (start_tx, start_rx) = mpsc::channel::<()>();
            let (ran_tx, ran_rx) = mpsc::channel::<()>();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let write = db.write_batched(key, move |conn| {
                start_rx.recv().unwrap();
                crate::db::on_conn!(conn, c => c.batch_execute("INSERT INTO t VALUES (1)"))?;
                let ran = std::time::Instant::now();
                ran_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok(ran)
            });
            (write, start_tx, ran_rx, go_tx)
        };
        let (a, a_start, a_ran, a_go) = gated("evt_a");
        let (b, b_start, b_ran, b_go) = gated("evt_b");
        let (c, c_start, c_ran, c_go) = gated("evt_c");
        let (mut a, mut b, mut c) = (Box::pin(a), Box::pin(b), Box::pin(c));
        assert!(a.as_mut().now_or_never().is_none(), "queued");
        a_start.send(()).unwrap();
        signalled(a_ran).await;
        // B is queued while A runs, so A's group goes to the syncer, which is held
        // in A's sync.
        assert!(b.as_mut().now_or_never().is_none(), "queued");
        let held_back = SYNC_GATE.lock().unwrap();
        let before = syncs();
        a_go.send(()).unwrap();
        let asked = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while syncs() == before {
            assert!(
                std::time::Instant::now() < asked,
                "A's sync was never asked for"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Only now does B write: A's sync was asked for before B's pages existed.
        b_start.send(()).unwrap();
        signalled(b_ran).await;
        // C is queued while B runs and joins B's group (the syncer is busy): it runs in
        // B's transaction, before B commits.
        assert!(c.as_mut().now_or_never().is_none(), "queued");
        let rows = || rows_in_t(&db);
        b_go.send(()).unwrap();
        c_start.send(()).unwrap();
        signalled(c_ran).await;
        assert_eq!(
            rows(),
            1,
            "C runs inside B's transaction, not after its commit"
        );
        // B's group commits and goes to the syncer, still held in A's sync. D, queued
        // after that commit, runs only once the writer handed B's group over.
        c_go.send(()).unwrap();
        let committed = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while rows() < 3 {
            assert!(
                std::time::Instant::now() < committed,
                "B's group never committed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (d, d_start, d_ran, d_go) = gated("evt_d");
        let mut d = Box::pin(d);
        assert!(d.as_mut().now_or_never().is_none(), "queued");
        d_start.send(()).unwrap();
        signalled(d_ran).await;
        drop(held_back);
        let a_ran_at = a.await.unwrap();
        let b_ran_at = b.await.unwrap();
        let c_ran_at = c.await.unwrap();
        let answered = std::time::Instant::now();
        assert!(flushed_between(&wal, a_ran_at, answered));
        assert!(
            flushed_between(&wal, b_ran_at, answered),
            "B was answered with the flush asked for before it wrote"
        );
        assert!(
            flushed_between(&wal, c_ran_at, answered),
            "C, joined to B's group, was answered before a flush of its own"
        );
        d_go.send(()).unwrap();
        d.await.unwrap();
    }

    /// The writer's connection goes back to the pool with the `synchronous` level it
    /// came with: `FULL` from the mirror's pragmas (other writes on the pool stay
    /// durable on their own), or the host's choice.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_gives_its_connection_back_with_its_own_sync_level() {
        use diesel::RunQueryDsl;
        use diesel::connection::SimpleConnection;
        #[derive(diesel::QueryableByName)]
        struct Synchronous {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            synchronous: i32,
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("back.db").display());
        let db = Database::open(&url, 2, std::time::Duration::from_secs(5)).unwrap();
        db.write_batched("evt_a", |conn| {
            crate::db::on_conn!(conn, c => c.batch_execute("CREATE TABLE t (x INTEGER)"))?;
            Ok(())
        })
        .await
        .unwrap();
        // The levels of both pooled connections once the writer gave its own back
        // (after LINGER without work).
        async fn levels_after_linger(db: &Database) -> Vec<i32> {
            tokio::time::sleep(LINGER + std::time::Duration::from_millis(500)).await;
            let mut held = [db.hold().unwrap(), db.hold().unwrap()];
            held.iter_mut()
                .map(|held| {
                    let s: Synchronous = crate::db::on_conn!(&mut held.conn(), c => diesel::sql_query("PRAGMA synchronous")
                        .get_result(c))
                    .unwrap();
                    s.synchronous
                })
                .collect()
        }
        assert_eq!(levels_after_linger(&db).await, [2, 2], "FULL");
        // A host's pool that chose `EXTRA` gets `EXTRA` back, not `FULL`.
        #[derive(Debug)]
        struct Extra;
        impl diesel::r2d2::CustomizeConnection<diesel::SqliteConnection, diesel::r2d2::Error> for Extra {
            fn on_acquire(
                &self,
                c: &mut diesel::SqliteConnection,
            ) -> std::result::Result<(), diesel::r2d2::Error> {
                c.batch_execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = EXTRA; PRAGMA busy_timeout = 5000")
                    .map_err(diesel::r2d2::Error::QueryError)
            }
        }
        let path = dir.path().join("host.db");
        let pool = diesel::r2d2::Pool::builder()
            .max_size(2)
            .connection_customizer(Box::new(Extra))
            .build(
                diesel::r2d2::ConnectionManager::<diesel::SqliteConnection>::new(
                    path.to_str().unwrap(),
                ),
            )
            .unwrap();
        let db = Database::from_pool(pool.into());
        let relaxed = db
            .write_batched("evt_a", |conn| {
                crate::db::on_conn!(conn, c => c.batch_execute("CREATE TABLE t (x INTEGER)"))?;
                Ok(())
            })
            .await;
        relaxed.unwrap();
        assert_eq!(levels_after_linger(&db).await, [3, 3], "the host's EXTRA");
    }

    /// A pool of one: the writer gives its connection back once its work is done, so
    /// a read right after a write gets it. The pool's checkout timeout here is half
    /// the linger: a writer keeping the connection through it fails the read.
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_leaves_a_pool_of_one_free_for_reads() {
        use diesel::RunQueryDsl;
        use diesel::connection::SimpleConnection;
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("one.db").display());
        let db = Database::open(&url, 1, LINGER / 2).unwrap();
        for x in 1..=3_i64 {
            db.write_batched("evt_a", move |conn| {
                crate::db::on_conn!(conn, c => c.batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS t (x INTEGER); INSERT INTO t VALUES ({x})"
                )))?;
                Ok(())
            })
            .await
            .unwrap();
            let read = db
                .run(|conn| {
                    let count: Count = crate::db::on_conn!(conn, c => diesel::sql_query(
                        "SELECT COUNT(*) AS n FROM t"
                    )
                    .get_result(c))?;
                    Ok(count.n)
                })
                .await;
            assert_eq!(read.unwrap(), x, "the read after write {x}");
        }
    }

    /// A writer's connection that cannot be set back to its `synchronous` level is
    /// closed, not pooled at `NORMAL`: the next connection out of the pool syncs its
    /// commits (`FULL`).
    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_left_at_the_writers_level_is_not_pooled() {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Synchronous {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            synchronous: i32,
        }
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = sqlite_db(&dir, "restore.db", 1);
        *FAIL_RESTORE.lock().unwrap() = Some(wal.clone());
        let wrote = db
            .write_batched("evt_a", |conn| {
                use diesel::connection::SimpleConnection;
                crate::db::on_conn!(conn, c => c.batch_execute("INSERT INTO t VALUES (1)"))?;
                Ok(())
            })
            .await;
        // The pool of one gets the connection back as soon as the writer is idle.
        let level = db
            .run(|conn| {
                let s: Synchronous = crate::db::on_conn!(conn, c => diesel::sql_query(
                    "PRAGMA synchronous"
                )
                .get_result(c))?;
                Ok(s.synchronous)
            })
            .await;
        *FAIL_RESTORE.lock().unwrap() = None;
        wrote.unwrap();
        assert_eq!(level.unwrap(), 2, "a fresh connection at FULL");
    }
}
