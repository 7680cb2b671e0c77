//! Sync from the Stripe API: fetch one object (`sync`) or page through every object
//! of a kind (`sync_all`), and upsert through the same guard the webhooks use, stamped
//! with the fetch time so fresher webhook data is never overwritten.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::Mirror;
use crate::error::{Error, Result};
use crate::models::entitlement::ENTITLEMENT_SUMMARIES;
use crate::stripe::Answer;
use crate::sync::upsert::{Nul, Row, SqlValue, Written};
use crate::sync::{MirrorTable, Model, Stamp};

/// In-process locks by key (one per subscriber being created). A key is forgotten
/// once nobody holds or waits for its lock, so the map stays as small as the work in
/// flight, not as large as every subscriber ever created.
#[derive(Default)]
pub(crate) struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

/// [`KeyedLocks::lock`]'s guard: the key's lock, released (and the key forgotten when
/// nobody else wants it) on drop.
pub(crate) struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Waits for `key`'s lock.
    pub(crate) async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let lock = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_owned())
            .or_default()
            .clone();
        KeyedGuard {
            locks: self,
            key: key.to_owned(),
            held: Some(lock.lock_owned().await),
        }
    }

    /// How many keys are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        let mut map = self.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map's own handle left: nobody holds it or waits for it.
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// Fetches `id` and upserts it; an object Stripe reports missing becomes a tombstone.
pub(crate) async fn sync_one<M: Model>(mirror: &Mirror, id: &str) -> Result<M> {
    refetch(mirror, M::TABLE, id).await?;
    let id = id.to_owned();
    mirror
        .db()
        .run(move |conn| {
            M::find(conn, &id)?.ok_or_else(|| Error::NotFound {
                object: M::TABLE.kind,
                id: id.clone(),
            })
        })
        .await
}

/// One object of `table` as Stripe has it now, whole: retrieved by id (an entitlement
/// summary: its customer's active entitlements, every page) and [`complete`]d. Only
/// the object's own 404 is Stripe saying it is gone: a 404 of a later page or of its
/// items means the list changed while it was read, and comes back as a conflict
/// (409, worth trying again), never as a tombstone. The one fetch behind `refetch`,
/// `reconcile` and `Webhooks::refetch`.
pub(crate) async fn fetch_whole(
    client: &crate::stripe::StripeClient,
    table: &MirrorTable,
    id: &str,
    livemode: bool,
) -> Result<crate::stripe::Answer> {
    if table.kind == ENTITLEMENT_SUMMARIES.kind {
        return crate::models::entitlement::fetch_summary(client, id, livemode).await;
    }
    let object = format!("{} {id}", table.kind);
    let mut answer = client
        .get_built(retrieve_request(table, id)?, Some(&object))
        .await?;
    complete(client, table, &mut answer.value)
        .await
        .map_err(crate::stripe::changed_while_read)?;
    Ok(answer)
}

/// Completes an object Stripe sent in part ([`MirrorTable::partial`]): a
/// subscription's items past the first 10 are fetched.
pub(crate) async fn complete(
    client: &crate::stripe::StripeClient,
    table: &MirrorTable,
    object: &mut Value,
) -> Result<()> {
    if table.is_partial(object) && table.kind == "subscription" {
        crate::models::subscription::complete_items(client, object).await?;
    }
    Ok(())
}

/// What a 404 leaves of an object: its id (and the field it is keyed by, an
/// entitlement summary's customer, so the subscriber's access is marked changed).
fn tombstone_of(table: &MirrorTable, id: &str) -> Value {
    let mut tombstone = json!({ "id": id, "object": table.accepts[0], "deleted": true });
    if let (Some(field), Some(fields)) = (table.id_from, tombstone.as_object_mut()) {
        fields.insert(field.to_owned(), json!(id));
    }
    tombstone
}

/// Whether [`refetch`] can fetch an object of `table` by its row id: the kinds Stripe
/// retrieves by id, and an entitlement summary (by its customer).
pub(crate) fn fetchable(table: &MirrorTable) -> bool {
    table.api_path.is_some() || table.kind == ENTITLEMENT_SUMMARIES.kind
}

/// async-stripe's typed retrieve request for one object of `table`.
pub(crate) fn retrieve_request(
    table: &MirrorTable,
    id: &str,
) -> Result<stripe_client_core::RequestBuilder> {
    use stripe_client_core::StripeRequest;
    Ok(match table.kind {
        "customer" => stripe_core::customer::RetrieveCustomer::new(id).build(),
        "product" => stripe_product::product::RetrieveProduct::new(id).build(),
        "price" => stripe_product::price::RetrievePrice::new(id).build(),
        "subscription" => stripe_billing::subscription::RetrieveSubscription::new(id).build(),
        other => {
            return Err(Error::Config(format!(
                "{other} objects cannot be fetched by id"
            )));
        }
    })
}

/// One of the lists that together make the whole of a table.
#[derive(Clone, Debug)]
enum List {
    /// Stripe's list as it comes.
    Plain,
    /// Prices, active or not: Stripe lists only active prices unless asked for the
    /// others, and an archived price still bills the subscriptions made on it.
    Active(bool),
    /// Customers or subscriptions of a test clock, which Stripe leaves out of its list
    /// unless asked for by clock (test mode).
    TestClock(String),
}

/// The lists that make the whole of `table`: prices active then inactive; customers
/// and subscriptions of each test clock too (`clocks`, test mode).
fn lists(table: &MirrorTable, clocks: &[String]) -> Vec<List> {
    match table.kind {
        "price" => vec![List::Active(true), List::Active(false)],
        "customer" | "subscription" => std::iter::once(List::Plain)
            .chain(clocks.iter().map(|id| List::TestClock(id.clone())))
            .collect(),
        _ => vec![List::Plain],
    }
}

/// The account's test clocks (test mode). A server without them (a local fake: 404)
/// has none; a key not allowed to read them (a restricted key: 403) is warned about
/// and the backfill goes on without them, as it did before it asked.
async fn test_clocks(client: &crate::stripe::StripeClient) -> Result<Vec<String>> {
    let listed = client
        .list_all(
            "/test_helpers/test_clocks",
            serde_json::Map::new(),
            "test clock list",
            "test_clock",
        )
        .await;
    let clocks = match listed {
        Ok((clocks, _)) => clocks,
        Err(Error::Stripe(e)) if e.status == Some(404) => Vec::new(),
        Err(Error::Stripe(e)) if matches!(e.status, Some(400 | 403)) => {
            tracing::warn!(error = %e, "test clocks cannot be listed with this key: \
                customers and subscriptions on a test clock are left out of the backfill");
            Vec::new()
        }
        Err(err) => return Err(err),
    };
    Ok(clocks
        .iter()
        .filter_map(|clock| clock.get("id").and_then(Value::as_str))
        .map(str::to_owned)
        .collect())
}

/// async-stripe's typed list request for a page of `table` in `list` (subscriptions of
/// every status).
fn list_request(
    table: &MirrorTable,
    limit: i64,
    after: Option<&str>,
    list: &List,
) -> Result<stripe_client_core::RequestBuilder> {
    use stripe_client_core::StripeRequest;
    macro_rules! page {
        ($list:expr) => {{
            let list = $list.limit(limit);
            match after {
                Some(a) => list.starting_after(a).build(),
                None => list.build(),
            }
        }};
    }
    Ok(match table.kind {
        "customer" => match list {
            List::TestClock(clock) => {
                page!(stripe_core::customer::ListCustomer::new().test_clock(clock.as_str()))
            }
            _ => page!(stripe_core::customer::ListCustomer::new()),
        },
        "product" => page!(stripe_product::product::ListProduct::new()),
        "price" => match list {
            List::Active(active) => page!(stripe_product::price::ListPrice::new().active(*active)),
            _ => page!(stripe_product::price::ListPrice::new()),
        },
        "subscription" => {
            let all = stripe_billing::subscription::ListSubscription::new()
                .status(stripe_billing::subscription::ListSubscriptionStatus::All);
            match list {
                List::TestClock(clock) => page!(all.test_clock(clock.as_str())),
                _ => page!(all),
            }
        }
        other => return Err(Error::Config(format!("{other} objects cannot be listed"))),
    })
}

/// The idempotency key of a create, derived from what it creates (its natural key)
/// and the mode, so two processes creating the same object create one.
pub(crate) fn creation_key(kind: &str, live: bool, natural: &str) -> String {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(natural.as_bytes()));
    let mode = if live { "live" } else { "test" };
    format!("stripe-mirror-{kind}-{mode}-{}", &digest[..40])
}

/// What a re-fetch did to the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refetch {
    /// The row holds Stripe's object as of the fetch (or fresher event data).
    Current,
    /// Stripe answered 404, or with the object marked `deleted` (a deleted customer):
    /// the row is a tombstone.
    Gone,
}

/// Fetches one object of `table` and writes it through the guard (stamped with
/// Stripe's time of the answer), or a tombstone on a 404; unless the guard left it
/// undecided, the row's `reconcile` flag is cleared, as it now reflects Stripe. A
/// fetch wins a same-second tie with the row when the row is still what it was just
/// before the request (the fetch is newer). The one re-fetch behind `sync` and
/// reconcile.
pub(crate) async fn refetch(
    mirror: &Mirror,
    table: &'static MirrorTable,
    id: &str,
) -> Result<Refetch> {
    Ok(refetch_touching(mirror, table, id).await?.0)
}

/// [`refetch`], with the subscribers whose access the write marked.
pub(crate) async fn refetch_touching(
    mirror: &Mirror,
    table: &'static MirrorTable,
    id: &str,
) -> Result<(
    Refetch,
    std::collections::BTreeSet<crate::access::changes::Touched>,
)> {
    let client = mirror.stripe().await?;
    let seen = seen_before(mirror, table, id).await?;
    // A row of the other mode: Stripe answers this mode's key 404 for it. Read (its
    // data parsed) only when a 404 comes.
    let other_mode = || {
        seen.as_ref()
            .and_then(super::upsert::Seen::livemode)
            .is_some_and(|live| live != mirror.live_mode())
    };
    let fetched = fetch_whole(&client, table, id, mirror.live_mode()).await;
    let (value, at, outcome) = match fetched {
        Ok(answer) => {
            let gone = answer.value.get("deleted") == Some(&Value::Bool(true));
            let outcome = if gone {
                Refetch::Gone
            } else {
                Refetch::Current
            };
            (answer.value, answer.at, outcome)
        }
        // A tombstone is final whatever its stamp: never for a 404 that only says the
        // key cannot see the row (Stripe's message says so).
        // Stamped with Stripe's time of the 404: a host clock running ahead would
        // stamp it past the `*.created` of an object made again under the same id.
        // Nothing written since the row was read is newer than Stripe's "gone": a row
        // stamped past the 404 (by a host's clock running ahead) still takes it.
        Err(err) if crate::stripe::is_missing(&err) && !other_mode() => (
            tombstone_of(table, id),
            match &err {
                Error::Stripe(e) => e.at,
                _ => None,
            }
            .unwrap_or_else(|| mirror.now())
            .max(seen.as_ref().map_or(i64::MIN, super::upsert::Seen::stamp)),
            Refetch::Gone,
        ),
        Err(err) => return Err(err),
    };
    let touched = write_answer(mirror, table, value, at, seen).await?;
    Ok((outcome, touched))
}

/// What the row of `id` holds before a request whose answer [`write_answer`] writes.
pub(crate) async fn seen_before(
    mirror: &Mirror,
    table: &'static MirrorTable,
    id: &str,
) -> Result<Option<super::upsert::Seen>> {
    let key = id.to_owned();
    mirror.db().run(move |conn| table.seen(conn, &key)).await
}

/// Writes an object as Stripe answered it at `at` (a fetch, or its answer to a change
/// made here) through the guard. A same-second tie goes to it when the row is still
/// what it was before the request (`seen`): the answer is newer. Unless the guard left
/// it undecided, the row's `reconcile` flag is cleared, as it now reflects Stripe.
/// Returns the subscribers whose access the write marked.
pub(crate) async fn write_answer(
    mirror: &Mirror,
    table: &'static MirrorTable,
    value: Value,
    at: i64,
    seen: Option<super::upsert::Seen>,
) -> Result<std::collections::BTreeSet<crate::access::changes::Touched>> {
    mirror
        .db()
        .run(move |conn| {
            let row = table.row(&value, Stamp::fetched_over(at, seen), None)?;
            let (written, touched) = crate::access::changes::collect(|| conn.write(|c| {
                // A fetch the guard left undecided keeps its flag; else the row is as
                // fresh as the fetch (or fresher) and the flag goes.
                if table.write(c, &row, &value)? != Written::Undecided {
                    super::upsert::execute(
                        c,
                        &format!("UPDATE {} SET reconcile = FALSE WHERE id = ? AND (stamp <= ? OR deleted = TRUE)", table.table),
                        &[SqlValue::Text(Some(row.id.clone())), SqlValue::Int(Some(at))],
                    )?;
                }
                Ok(())
            }));
            written?;
            Ok(touched)
        })
        .await
}

/// What [`sync_all`] should do.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SyncOptions {
    /// Object kinds to sync, among `customer`, `product`, `price`, `subscription`.
    pub objects: Vec<String>,
    /// Objects per page (each page written atomically), at most 100.
    pub page_size: u32,
    /// Stop at the first object that cannot be mirrored.
    pub fail_fast: bool,
    /// After each kind's whole list, re-fetch the mirrored objects it did not have and
    /// tombstone what Stripe no longer has ([`SyncOptions::remove_missing`]).
    pub remove_missing: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            objects: ["product", "price", "customer", "subscription"]
                .map(String::from)
                .to_vec(),
            page_size: 100,
            fail_fast: false,
            remove_missing: false,
        }
    }
}

impl SyncOptions {
    /// Objects per page (each page written atomically), 1 to 100.
    pub fn page_size(mut self, size: u32) -> Self {
        self.page_size = size;
        self
    }

    /// Stop at the first object that cannot be mirrored.
    pub fn fail_fast(mut self, yes: bool) -> Self {
        self.fail_fast = yes;
        self
    }

    /// Only these kinds.
    pub fn objects(mut self, kinds: &[&str]) -> Self {
        self.objects = kinds.iter().map(|k| k.to_string()).collect();
        self
    }

    /// Also remove what Stripe deleted while its webhooks were missed. Once a kind's
    /// list is read to its end, the mirrored objects of that kind and mode it did not
    /// have, and nothing wrote since it began, are re-fetched one by one: what Stripe
    /// no longer has becomes a tombstone ([`SyncReport::removed`]); what it still has
    /// is refreshed.
    ///
    /// A key of the wrong mode or account would make every row look deleted, so the
    /// sync refuses ([`Error::Config`], nothing removed) when a listed object is of
    /// the other mode, or when more than half of the rows the mirror held are missing
    /// from the list; remove those one by one with `sync` (e.g.
    /// [`Customer::sync`](crate::Customer::sync)) once the key is checked.
    pub fn remove_missing(mut self, yes: bool) -> Self {
        self.remove_missing = yes;
        self
    }
}

/// Progress of a [`sync_all`], after each page.
#[derive(Clone, Debug)]
pub struct SyncProgress {
    /// The kind being synced.
    pub object: String,
    /// Objects of this kind mirrored so far.
    pub done: usize,
}

/// An object [`sync_all`] could not mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncFailure {
    /// Its kind (`customer`, `product`, ...).
    pub object: &'static str,
    /// Its Stripe id (`<no id>` when it had none).
    pub id: String,
    /// Why it could not be mirrored.
    pub error: String,
}

impl std::fmt::Display for SyncFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.object, self.id, self.error)
    }
}

/// How many pages of a SQLite backfill may be queued for the writer at once (written,
/// or waiting for the disk) while the next one is fetched and mapped.
const SQLITE_PAGES_IN_FLIGHT: usize = 3;

/// A prefetch that stops when `sync_all` stops (an error, or its caller gave up).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

/// A page queued for [`sync_all`]'s writer, and what it reports once written.
#[derive(Default)]
struct PageWrite {
    /// The write, answering how many objects it wrote once they are on disk.
    write: Option<AbortOnDrop<Result<usize>>>,
    /// Objects listed before (counted once).
    repeated: usize,
    /// Objects that map to no row (not written).
    failures: Vec<SyncFailure>,
    /// Objects written in part, flagged for `reconcile`.
    incomplete: Vec<SyncFailure>,
}

impl PageWrite {
    /// How many objects the page wrote, once they are on disk.
    async fn wait(&mut self) -> Result<usize> {
        match &mut self.write {
            Some(write) => (&mut write.0)
                .await
                .map_err(|source| Error::Task { source })?,
            None => Ok(0),
        }
    }
}

/// Writes a page of `sync_all` through the group-commit writer, in a savepoint of its
/// own: a page that fails rolls back only itself, not the webhook deliveries sharing
/// its group. A page rolled back with its group for another write's failure, or lost
/// to a concurrent write (Postgres), is written again; the stamp guard makes a second
/// write of the same objects a no-op. Answers once the page is on disk. `first` is
/// its first try, queued when the page was listed ([`Database::queue_write`]), so
/// first tries reach the writer in the order the pages were listed (a try again
/// queues behind the pages after it).
///
/// [`Database::queue_write`]: crate::db::Database::queue_write
async fn write_page(
    db: crate::db::Database,
    table: &'static MirrorTable,
    objects: Arc<(Vec<Value>, Vec<Result<Row>>)>,
    first: impl std::future::Future<Output = Result<Result<usize>>>,
) -> Result<usize> {
    let mut answer = first.await;
    let mut tries = 1;
    loop {
        match answer {
            Ok(Ok(written)) => return Ok(written),
            Ok(Err(own)) if tries < 4 && own.is_conflict() => {}
            Err(group) if tries < 4 && crate::db::batch::rolled_back_for_another(&group) => {}
            // The group lost to a concurrent write (Postgres): a little apart, as
            // `write_retrying` does, so the two writers do not meet again.
            Err(group) if tries < 4 && group.is_conflict() => {
                tokio::time::sleep(std::time::Duration::from_millis(2 * tries as u64)).await;
            }
            Ok(Err(err)) | Err(err) => return Err(err),
        }
        tracing::debug!(
            tries,
            "a backfill page rolled back, with its group or for a concurrent write; writing it again"
        );
        tries += 1;
        let objects = objects.clone();
        answer = db
            .write_retrying("", move || page_work(table, objects.clone()))
            .await;
    }
}

/// One try of a page's write ([`write_page`]).
fn page_work(
    table: &'static MirrorTable,
    objects: Arc<(Vec<Value>, Vec<Result<Row>>)>,
) -> impl FnOnce(&mut crate::db::Conn<'_>) -> Result<Result<usize>> + Send + 'static {
    move |conn: &mut crate::db::Conn<'_>| {
        let ids: Vec<&str> = objects.1.iter().flatten().map(|r| r.id.as_str()).collect();
        Ok(conn.write(|c| {
            crate::access::changes::in_bulk(c, table, &ids, |c| {
                let mut written = 0;
                for (item, row) in objects.0.iter().zip(&objects.1) {
                    if let Ok(row) = row {
                        table.write(c, row, item)?;
                        written += 1;
                    }
                }
                Ok(written)
            })
        }))
    }
}

/// A list page as Stripe answered it, taken apart.
struct ListPage {
    /// When Stripe answered (the rows' stamp).
    at: i64,
    /// The objects; `None` when the answer is not a list page.
    items: Option<Vec<Value>>,
    has_more: bool,
    /// Whether its strings are known to hold no U+0000 ([`Answer::nul_free`]).
    nul: Nul,
}

impl ListPage {
    fn of(answer: Answer) -> Self {
        let Answer {
            mut value,
            at,
            nul_free,
        } = answer;
        let has_more = value.get("has_more").and_then(Value::as_bool) == Some(true);
        let items = match value.get_mut("data").map(Value::take) {
            Some(Value::Array(items)) => Some(items),
            _ => None,
        };
        Self {
            at,
            items,
            has_more,
            nul: if nul_free { Nul::Absent } else { Nul::Check },
        }
    }

    /// Each object mapped to its row (or the mapping's error), so the page's write
    /// holds only statements: milliseconds of CPU for a page.
    fn rows(table: &MirrorTable, items: &[Value], stamp: &Stamp, nul: Nul) -> Vec<Result<Row>> {
        items
            .iter()
            .map(|item| table.listed_row(item, stamp.clone(), nul))
            .collect()
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What [`sync_all`] did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Objects mirrored per kind.
    pub counts: BTreeMap<String, usize>,
    /// Objects the mirror held that Stripe's list no longer had and Stripe no longer
    /// has (deleted while webhooks were missed), per kind: now tombstones. With
    /// [`SyncOptions::remove_missing`], every kind synced has an entry (0 when none).
    pub removed: BTreeMap<String, usize>,
    /// Objects that could not be mirrored: kind, id, error.
    pub failures: Vec<SyncFailure>,
}

fn table_named(kind: &str) -> Result<&'static MirrorTable> {
    crate::models::table_for_kind(kind)
        .filter(|t| t.api_path.is_some())
        .ok_or_else(|| {
            Error::Config(format!(
                "cannot sync {kind:?}: use customer, product, price or subscription"
            ))
        })
}

/// Mirrors every object of the chosen kinds (the `djstripe_sync_models` analogue):
/// follows pagination to the end one page at a time (memory stays flat), upserts each
/// page atomically (all of it or none), never overwrites fresher data, and reports
/// progress once each page is on disk. Pages go through the mirror's group-commit
/// writer, so they may share a transaction with webhook deliveries; on SQLite the next
/// pages are written while the last ones are synced to disk. An error is answered once
/// the pages already queued are on disk (or failed), so nothing is written after it.
/// If the future is dropped instead, pages already queued may still be written. The
/// backfill is idempotent: run it again.
///
/// With [`SyncOptions::remove_missing`] it also tombstones what Stripe deleted while
/// its webhooks were missed.
///
/// ```no_run
/// # async fn f(mirror: stripe_mirror::Mirror) -> stripe_mirror::Result<()> {
/// use stripe_mirror::{SyncOptions, sync_all};
/// let report = sync_all(&mirror, &SyncOptions::default(), |p| eprintln!("{}: {}", p.object, p.done)).await?;
/// for (kind, count) in &report.counts {
///     println!("{kind}: {count} mirrored");
/// }
/// for failure in &report.failures {
///     eprintln!("skipped {failure}");
/// }
/// # Ok(()) }
/// ```
pub async fn sync_all(
    mirror: &Mirror,
    options: &SyncOptions,
    mut progress: impl FnMut(&SyncProgress),
) -> Result<SyncReport> {
    let client = mirror.stripe().await?;
    let mut report = SyncReport::default();
    let live = mirror.live_mode();
    // While it runs, SQLite's WAL is copied into the database off the writer.
    let _bulk = mirror.db().bulk();
    // Asked once, in test mode, when customers or subscriptions are to be listed.
    let clocked = |k: &String| k == "customer" || k == "subscription";
    let clocks = match !live && options.objects.iter().any(clocked) {
        true => test_clocks(&client).await?,
        false => Vec::new(),
    };
    for kind in &options.objects {
        let table = table_named(kind)?;
        let limit = i64::from(options.page_size.clamp(1, 100));
        let lists = lists(table, &clocks);
        // Three stages at once: the next page is fetched while this one is mapped to
        // rows and the one before is written (the writer's thread only writes).
        let fetch = |after: Option<String>, pass: usize| {
            let (client, list) = (client.clone(), lists[pass].clone());
            tokio::spawn(async move {
                let request = list_request(table, limit, after.as_deref(), &list)?;
                client
                    .get_built(request, Some(&format!("{} list", table.kind)))
                    .await
            })
        };
        let mut next = Some(AbortOnDrop(fetch(None, 0)));
        let (mut asked_after, mut pass): (Option<String>, usize) = (None, 0);
        // Prices an earlier list gave (archived between the two lists; a server that
        // ignores `active` lists every price twice): counted once. A clock's list and
        // the plain one do not overlap, so nothing else is kept.
        let overlapping = table.kind == "price";
        let mut listed_before: BTreeSet<String> = BTreeSet::new();
        // The live rows the mirror holds before the list: what it could leave out.
        let held = if options.remove_missing {
            mirror
                .db()
                .run(move |conn| live_rows(conn, table, live))
                .await?
        } else {
            0
        };
        let mut done = 0;
        // Stripe's time of the first page: every row the pass writes, or finds fresher,
        // is stamped at or after it.
        let mut began = None;
        // Evidence the key does not serve this mirror's mode; ids the list could not map.
        let (mut other_mode, mut unmapped) = (false, BTreeSet::new());
        // Pages queued and not yet on disk, oldest first: their commits and syncs under
        // way while the next ones are fetched and mapped.
        let mut writing: VecDeque<PageWrite> = VecDeque::new();
        // Counts the page in once its write is on disk.
        let mut settle = |page: PageWrite, written: usize| {
            done += written.saturating_sub(page.repeated);
            unmapped.extend(page.failures.iter().map(|f: &SyncFailure| f.id.clone()));
            report.failures.extend(page.failures);
            report.failures.extend(page.incomplete);
            progress(&SyncProgress {
                object: table.kind.to_owned(),
                done,
            });
        };
        // A page's write that failed: its error comes before any later step's.
        let mut failed: Option<Error> = None;
        let looped = async {
            while let Some(mut fetching) = next.take() {
                let answer = (&mut fetching.0)
                    .await
                    .map_err(|source| Error::Task { source })??;
                let page = ListPage::of(answer);
                began.get_or_insert(page.at);
                let stamp = Stamp::fetched(page.at);
                // A page that is not a list, or says there is more without a last id to ask
                // after, is an error: ending there would report a partial backfill as whole.
                let list = |problem| Error::mapping("list", table.kind, "data", problem);
                let Some(items) = page.items else {
                    return Err(list("is not an array (not a list page)"));
                };
                if let Some(after) = crate::stripe::next_after(
                    &items,
                    page.has_more,
                    asked_after.as_deref(),
                    table.kind,
                )? {
                    asked_after = Some(after.clone());
                    next = Some(AbortOnDrop(fetch(Some(after), pass)));
                } else if pass + 1 < lists.len() {
                    (asked_after, pass) = (None, pass + 1);
                    next = Some(AbortOnDrop(fetch(None, pass)));
                }
                // Mapped while the next page is fetched and the pages before are written,
                // off the runtime's workers.
                let mapping = {
                    let (stamp, nul) = (stamp.clone(), page.nul);
                    tokio::task::spawn_blocking(move || {
                        let rows = ListPage::rows(table, &items, &stamp, nul);
                        (items, rows)
                    })
                };
                // Through the group-commit writer: on SQLite its commit does not wait for the
                // disk, which the writer syncs while it runs the next page, as it does for
                // webhook deliveries; a page's sync takes about as long as its statements,
                // so `SQLITE_PAGES_IN_FLIGHT` pages may be queued at once. On Postgres one
                // page at a time: its writers commit side by side, and two pages in flight
                // would hold each other's rows (a price listed by both passes, their
                // subscribers' access rows) past the writers' lock wait.
                let in_flight = match mirror.db().backend() {
                    crate::db::Backend::Sqlite => SQLITE_PAGES_IN_FLIGHT,
                    _ => 1,
                };
                while writing.len() >= in_flight
                    && let Some(mut oldest) = writing.pop_front()
                {
                    match oldest.wait().await {
                        Ok(written) => settle(oldest, written),
                        Err(err) => {
                            failed = Some(err);
                            return Ok(());
                        }
                    }
                }
                let (mut items, mut rows) =
                    mapping.await.map_err(|source| Error::Task { source })?;
                // Listed again (archived between the two lists, or by a server that ignores
                // `active`): written again, the guard keeping the fresher, but counted once.
                let repeated = items
                    .iter()
                    .filter_map(|item| item.get("id").and_then(Value::as_str))
                    .filter(|id| overlapping && !listed_before.insert((*id).to_owned()))
                    .count();
                // Objects listed in part (a subscription's items past the first 10) are
                // completed before the page is written; one that cannot be is written as
                // listed, flagged for `reconcile`, and reported.
                let mut page = PageWrite {
                    repeated,
                    ..PageWrite::default()
                };
                let mut stop = None;
                for (item, row) in items.iter_mut().zip(rows.iter_mut()) {
                    if !table.is_partial(item) {
                        continue;
                    }
                    let completed = complete(&client, table, item).await;
                    // Mapped again as it now is, completed or not.
                    *row = table.row(item, stamp.clone(), None);
                    if let Err(err) = completed.map_err(crate::stripe::changed_while_read) {
                        if options.fail_fast {
                            stop = Some(err);
                            break;
                        }
                        let id = item.get("id").and_then(Value::as_str).unwrap_or("<no id>");
                        page.incomplete.push(SyncFailure {
                            object: table.kind,
                            id: id.to_owned(),
                            error: format!("mirrored in part, flagged for reconcile: {err}"),
                        });
                    }
                }
                // Objects that map to no row: reported and left out, or with `fail_fast` the
                // end of the backfill (the page is not written).
                if stop.is_none() && options.fail_fast {
                    stop = rows
                        .iter()
                        .position(Result::is_err)
                        .and_then(|i| rows.swap_remove(i).err());
                }
                for (item, row) in items.iter().zip(&rows) {
                    if let Err(err) = row {
                        page.failures.push(SyncFailure {
                            object: table.kind,
                            id: item
                                .get("id")
                                .and_then(Value::as_str)
                                .unwrap_or("<no id>")
                                .to_owned(),
                            error: err.to_string(),
                        });
                    }
                }
                if let Some(err) = stop {
                    return Err(err);
                }
                other_mode |= items
                    .iter()
                    .any(|o| o.get("livemode").and_then(Value::as_bool) == Some(!live));
                let objects = Arc::new((items, rows));
                let db = mirror.db().clone();
                // Queued here, in the order the pages were listed; awaited by its task.
                let first = db.queue_write("", page_work(table, objects.clone()));
                page.write = Some(AbortOnDrop(tokio::spawn(write_page(
                    db, table, objects, first,
                ))));
                writing.push_back(page);
            }
            Ok::<(), Error>(())
        }
        .await;
        // Every page queued is on disk, or failed, before the backfill answers, even
        // with an error: nothing is written after it, and an earlier page's failure is
        // not hidden by a later step's. The next page is not fetched; progress stops at
        // the first failure.
        drop(next.take());
        while let Some(mut oldest) = writing.pop_front() {
            match oldest.wait().await {
                Ok(written) if failed.is_none() => settle(oldest, written),
                Ok(_) => {}
                Err(err) => {
                    failed.get_or_insert(err);
                }
            }
        }
        if let Some(err) = failed.or(looped.err()) {
            return Err(err);
        }
        *report.counts.entry(table.kind.to_owned()).or_default() += done;
        if options.remove_missing {
            // Said for every kind looked at, 0 included, as the counts are.
            report.removed.entry(table.kind.to_owned()).or_default();
        }
        if let Some(began) = began.filter(|_| held > 0) {
            if other_mode {
                return Err(Error::Config(format!(
                    "Stripe listed {}s of the other mode (the mirror's live mode is {live}); \
                     nothing was removed: check STRIPE_LIVE_MODE and the secret key",
                    table.kind
                )));
            }
            let unlisted = Unlisted {
                began,
                held,
                unmapped: &unmapped,
                fail_fast: options.fail_fast,
            };
            remove_unlisted(mirror, table, unlisted, &mut report).await?;
        }
    }
    Ok(report)
}

/// The ids of `table`'s live rows in a mode stamped before `before`.
fn live_ids(
    conn: &mut crate::db::Conn<'_>,
    table: &MirrorTable,
    live: bool,
    before: i64,
) -> Result<Vec<String>> {
    use diesel::RunQueryDsl;
    let sql = format!(
        "SELECT id FROM {} WHERE deleted = FALSE AND livemode = ? AND stamp < ?",
        table.table
    );
    let binds = [SqlValue::Bool(Some(live)), SqlValue::Int(Some(before))];
    let ids: Vec<super::reconcile::Id> =
        crate::db::on_conn!(conn, c => crate::db::statement::Bound::new(&sql, &binds).load(c))?;
    Ok(ids.into_iter().map(|row| row.id).collect())
}

/// How many live rows of `table` the mirror holds in a mode.
fn live_rows(conn: &mut crate::db::Conn<'_>, table: &MirrorTable, live: bool) -> Result<usize> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let sql = format!(
        "SELECT COUNT(*) AS n FROM {} WHERE deleted = FALSE AND livemode = ?",
        table.table
    );
    let binds = [SqlValue::Bool(Some(live))];
    let count: Count = crate::db::on_conn!(conn, c => crate::db::statement::Bound::new(&sql, &binds).get_result(c))?;
    Ok(usize::try_from(count.n).unwrap_or(0))
}

/// What [`remove_unlisted`] goes by.
struct Unlisted<'a> {
    /// Stripe's time of the list's first page.
    began: i64,
    /// The live rows the mirror held before the list.
    held: usize,
    /// Listed objects that could not be mapped (their rows were not rewritten).
    unmapped: &'a BTreeSet<String>,
    fail_fast: bool,
}

/// After a whole list: re-fetches the live rows of its kind and mode stamped before
/// the list began (not in it, not written since), tombstoning what Stripe no longer
/// has. Refuses when more than half of what the mirror held is missing (a key of
/// another account).
async fn remove_unlisted(
    mirror: &Mirror,
    table: &'static MirrorTable,
    by: Unlisted<'_>,
    report: &mut SyncReport,
) -> Result<()> {
    let (live, began) = (mirror.live_mode(), by.began);
    let mut ids = mirror
        .db()
        .run(move |conn| live_ids(conn, table, live, began))
        .await?;
    ids.retain(|id| !by.unmapped.contains(id));
    if ids.len() * 2 > by.held {
        return Err(Error::Config(format!(
            "{} of the {} {}s the mirror held are not in Stripe's list: is the secret key \
             for this account and mode? Nothing was removed; once the key is checked, \
             remove them one by one with sync",
            ids.len(),
            by.held,
            table.kind
        )));
    }
    for id in ids {
        match refetch(mirror, table, &id).await {
            Ok(Refetch::Gone) => *report.removed.entry(table.kind.to_owned()).or_default() += 1,
            Ok(Refetch::Current) => {}
            Err(err) if by.fail_fast => return Err(err),
            Err(err) => report.failures.push(SyncFailure {
                object: table.kind,
                id,
                error: err.to_string(),
            }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod keyed_locks {
    use super::KeyedLocks;

    #[tokio::test]
    async fn a_key_is_forgotten_once_nobody_holds_or_waits_for_it() {
        let locks = KeyedLocks::default();
        {
            let _held = locks.lock("user-1").await;
            assert_eq!(locks.len(), 1);
        }
        assert_eq!(locks.len(), 0, "a finished key stays in the map");
        // Two callers of one key: the second waits for the first, and the key is
        // kept until both are done.
        let first = locks.lock("user-2").await;
        let order = std::sync::Mutex::new(Vec::new());
        let second = async {
            let _held = locks.lock("user-2").await;
            order.lock().unwrap().push("second");
        };
        let release = async {
            tokio::task::yield_now().await;
            order.lock().unwrap().push("first");
            drop(first);
            assert_eq!(locks.len(), 1, "forgotten while the second waits");
        };
        tokio::join!(second, release);
        assert_eq!(*order.lock().unwrap(), ["first", "second"]);
        assert_eq!(locks.len(), 0);
    }
}

/// `sync_all`'s pages go through the group-commit writer.
#[cfg(all(test, feature = "sqlite"))]
mod backfill_pages {
    use std::sync::{Arc, Mutex};

    use axum::extract::Query;
    use axum::routing::get;

    use crate::{Config, Mirror, Secret, SyncOptions, sync_all};

    /// Serves `/v1/customers` as pages of one customer each (`cus_1` to `cus_{n}`),
    /// page `bad` (counted from 1) not a list, recording the `starting_after` of each
    /// request; anything else is a 404.
    async fn stub_failing(
        n: usize,
        bad: Option<usize>,
    ) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let app = axum::Router::new().route(
            "/v1/customers",
            get(
                move |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    let after = q.get("starting_after").cloned();
                    log.lock().unwrap().push(after.clone());
                    let i = after
                        .and_then(|a| a.trim_start_matches("cus_").parse::<usize>().ok())
                        .map_or(1, |i| i + 1);
                    let data = match Some(i) == bad {
                        true => serde_json::json!("not a list"),
                        false => serde_json::json!([{"id": format!("cus_{i}"),
                            "object": "customer", "livemode": false,
                            "created": 1_700_000_000, "metadata": {}}]),
                    };
                    axum::Json(serde_json::json!({
                        "object": "list", "url": "/v1/customers", "has_more": i < n,
                        "data": data,
                    }))
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/"), asked)
    }

    async fn mirror(dir: &tempfile::TempDir, api_base: String) -> (Mirror, std::path::PathBuf) {
        let path = dir.path().canonicalize().unwrap().join("backfill.db");
        let mut config = Config::new(format!("sqlite://{}", path.display()));
        config.api_base = Some(api_base);
        config.secret_key = Some(Secret::new("sk_test_backfillpages0000"));
        let mirror = Mirror::connect(config).await.unwrap();
        (mirror, format!("{}-wal", path.display()).into())
    }

    fn customers() -> SyncOptions {
        SyncOptions::default().objects(&["customer"]).page_size(1)
    }

    /// A list page whose text holds `\u0000` has each object walked for U+0000 (the
    /// scan of the page's bytes that lets a page without one skip the walk must find
    /// it): the object holding one, deep in its metadata, is reported and left out;
    /// the others are mirrored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listed_object_holding_a_nul_is_left_out() {
        let app = axum::Router::new().route(
            "/v1/customers",
            get(|| async {
                axum::Json(serde_json::json!({
                    "object": "list", "url": "/v1/customers", "has_more": false,
                    "data": [
                        {"id": "cus_1", "object": "customer", "livemode": false,
                         "metadata": {"note": "a\u{0}b"}},
                        {"id": "cus_2", "object": "customer", "livemode": false, "metadata": {}},
                    ],
                }))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let (mirror, _) = mirror(&dir, format!("http://{addr}/")).await;
        let options = SyncOptions::default().objects(&["customer"]);
        let report = sync_all(&mirror, &options, |_| {}).await.unwrap();
        assert_eq!(report.counts["customer"], 1);
        assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
        assert_eq!(report.failures[0].id, "cus_1");
        assert!(
            report.failures[0].error.contains("NUL"),
            "{:?}",
            report.failures
        );
        assert!(
            crate::Customer::get(&mirror, "cus_1")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            crate::Customer::get(&mirror, "cus_2")
                .await
                .unwrap()
                .is_some()
        );
    }

    /// A backfill started while other work holds the writer: the mirror, the backfill,
    /// the `starting_after` of each page asked for by the time it asked for the pages
    /// awaited (or 10 s passed), and the sender that lets the held work end.
    struct HeldBackfill {
        mirror: Mirror,
        backfill: tokio::task::JoinHandle<crate::Result<crate::SyncReport>>,
        pages: Vec<Option<String>>,
        /// Every page asked for so far.
        asked: Arc<Mutex<Vec<Option<String>>>>,
        go: std::sync::mpsc::Sender<()>,
        hold: tokio::task::JoinHandle<crate::Result<()>>,
        _dir: tempfile::TempDir,
    }

    /// A backfill of `n` pages of one customer each, begun while other work holds the
    /// writer; back once it asked for `asked_for` pages, or after 10 s.
    async fn backfill_behind_held_writer(n: usize, asked_for: usize) -> HeldBackfill {
        backfill_behind_held_writer_failing(n, None, asked_for).await
    }

    /// As [`backfill_behind_held_writer`], with page `bad` not a list.
    async fn backfill_behind_held_writer_failing(
        n: usize,
        bad: Option<usize>,
        asked_for: usize,
    ) -> HeldBackfill {
        let dir = tempfile::tempdir().unwrap();
        let (base, asked) = stub_failing(n, bad).await;
        let (mirror, _) = mirror(&dir, base).await;
        let (go, held) = std::sync::mpsc::channel::<()>();
        let (running, started) = std::sync::mpsc::channel::<()>();
        let db = mirror.db().clone();
        let hold = tokio::spawn(async move {
            db.write_batched("", move |_: &mut crate::db::Conn<'_>| {
                running.send(()).unwrap();
                held.recv().unwrap();
                Ok(())
            })
            .await
        });
        tokio::task::spawn_blocking(move || started.recv().unwrap())
            .await
            .unwrap();
        let backfill = {
            let mirror = mirror.clone();
            tokio::spawn(async move { sync_all(&mirror, &customers(), |_| {}).await })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while asked.lock().unwrap().len() < asked_for && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let pages = asked.lock().unwrap().clone();
        HeldBackfill {
            mirror,
            backfill,
            pages,
            asked,
            go,
            hold,
            _dir: dir,
        }
    }

    /// Every customer of the `n` pages is mirrored and counted once.
    async fn all_mirrored(n: usize, mirror: &Mirror, report: &crate::SyncReport) {
        assert_eq!(report.counts["customer"], n);
        for id in (1..=n).map(|i| format!("cus_{i}")) {
            assert!(
                crate::Customer::get(mirror, &id).await.unwrap().is_some(),
                "{id} is not mirrored"
            );
        }
    }

    /// The next pages are fetched and queued for the writer before the last one's
    /// write (and its sync) is done: with the writer held by other work, the first
    /// page's write cannot end, and still the backfill queues `SQLITE_PAGES_IN_FLIGHT`
    /// pages and asks for the two after them (one being mapped, one fetched), and no
    /// more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_page_is_queued_while_the_last_one_is_written() {
        let queued = crate::sync::remote::SQLITE_PAGES_IN_FLIGHT;
        let n = queued + 3;
        let mut held = backfill_behind_held_writer(n, queued + 2).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        held.pages = held.asked.lock().unwrap().clone();
        held.go.send(()).unwrap();
        held.hold.await.unwrap().unwrap();
        let report = held.backfill.await.unwrap().unwrap();
        let asked: Vec<Option<String>> = std::iter::once(None)
            .chain((1..queued + 2).map(|i| Some(format!("cus_{i}"))))
            .collect();
        assert_eq!(
            held.pages, asked,
            "with the writer held, the backfill did not queue {queued} pages, or queued more"
        );
        all_mirrored(n, &held.mirror, &report).await;
    }

    /// An error is answered only once the pages queued before it are on disk: none is
    /// written after `sync_all` returned. Here the third page is not a list while the
    /// first two wait behind the held writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_error_is_answered_once_the_queued_pages_are_written() {
        let held = backfill_behind_held_writer_failing(3, Some(3), 3).await;
        assert_eq!(held.pages.len(), 3, "the backfill stalled");
        // Time to read the bad page: an answer before its queued pages would come now.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !held.backfill.is_finished() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            !held.backfill.is_finished(),
            "the backfill answered while its pages were still queued"
        );
        held.go.send(()).unwrap();
        held.hold.await.unwrap().unwrap();
        let err = held.backfill.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("not an array"), "{err}");
        for id in ["cus_1", "cus_2"] {
            assert!(
                crate::Customer::get(&held.mirror, id)
                    .await
                    .unwrap()
                    .is_some(),
                "{id}, queued before the error, was not written when it was answered"
            );
        }
    }

    /// A page that shares its group with a write that fails (a webhook delivery's) is
    /// rolled back with it, and written again: the backfill does not fail for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_rolled_back_for_another_write_is_written_again() {
        let held = backfill_behind_held_writer(3, 3).await;
        // The third page asked for: the first is queued behind the held writer.
        assert_eq!(held.pages.len(), 3, "the backfill stalled");
        // Queued behind it (polled once), in the same group: a write that fails.
        let db = held.mirror.db().clone();
        let failing = db.write_batched(
            "evt_failing",
            |_: &mut crate::db::Conn<'_>| -> crate::Result<()> {
                Err(crate::Error::Config("this write fails".into()))
            },
        );
        let mut failing = std::pin::pin!(failing);
        assert!(futures_util::FutureExt::now_or_never(failing.as_mut()).is_none());
        held.go.send(()).unwrap();
        held.hold.await.unwrap().unwrap();
        assert!(failing.await.is_err());
        let report = held
            .backfill
            .await
            .unwrap()
            .expect("the backfill failed for another write's failure");
        all_mirrored(3, &held.mirror, &report).await;
    }

    /// The error of a backfill of `n` pages (page `bad` not a list) whose flushes fail.
    async fn backfill_failing_flush(n: usize, bad: Option<usize>) -> crate::Error {
        let dir = tempfile::tempdir().unwrap();
        let (base, _) = stub_failing(n, bad).await;
        let (mirror, wal) = mirror(&dir, base).await;
        let failing = crate::db::batch::fail_flush(&wal);
        let failed = sync_all(&mirror, &customers(), |_| {}).await;
        drop(failing);
        failed.expect_err("a backfill whose sync failed reported success")
    }

    /// The error of the first page to fail, its own sync's, not the refusal of the
    /// writes after it.
    const FIRST_FAILURE: &str = "the commit could not be synced to disk";

    /// A backfill answers only once its pages are on disk: a page whose sync fails is
    /// an error, not a count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backfill_whose_pages_cannot_be_synced_fails() {
        let err = backfill_failing_flush(2, None).await;
        assert!(err.to_string().contains("could not be synced"), "{err}");
    }

    /// The first page's failure is the error answered when it is found while the
    /// backfill waits for room in the writer's queue (more pages than it queues at
    /// once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_failure_found_while_queueing_is_answered() {
        let err =
            backfill_failing_flush(crate::sync::remote::SQLITE_PAGES_IN_FLIGHT + 2, None).await;
        assert!(err.to_string().contains(FIRST_FAILURE), "{err}");
    }

    /// A page that failed is the error answered, not a later page's: here the first
    /// page's sync fails while the third is not a list.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_earlier_page_failure_is_not_hidden_by_a_later_one() {
        let err = backfill_failing_flush(3, Some(3)).await;
        assert!(err.to_string().contains(FIRST_FAILURE), "{err}");
    }
}
