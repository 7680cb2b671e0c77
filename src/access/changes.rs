//! Access changes: "did this user's access change?", answered from the mirror and
//! told to the host's [`Webhooks::on_access_change`](crate::Webhooks::on_access_change) hook.
//!
//! Two halves, so that no change is lost and none is told from stale data:
//! - **Marking**, inside every write transaction of the mirror: a write that may change
//!   a subscriber's access (their customer, its subscriptions and entitlements, a
//!   product's roles or features) marks the subscriber's row in `stripe_access` dirty
//!   and bumps its version. A subscription arriving before its customer marks nobody;
//!   the customer's own write (or Checkout linking it) marks its subscriber later.
//! - **Telling**, after the commit: under a per-subscriber claim, the access is computed
//!   from the mirror as it now is ([`AccessState`]) and compared with what the hook
//!   was last told; the hook runs only when they differ, and the row stays dirty (to be
//!   told again) when the hook fails or a write came in meanwhile.
//!
//! So the hook sees each subscriber's access as the mirror holds it, whatever order the
//! events came in, at least once per change, and never for a change that does not
//! touch access (an email update).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use serde_json::{Value, json};

use crate::Mirror;
use crate::db::schema::{stripe_access, stripe_customers, stripe_products};
use crate::db::statement::Bound;
use crate::db::{Conn, on_conn};
use crate::error::Result;
use crate::models::subscription::{Subscription, SubscriptionStatus};
use crate::sync::upsert::{MirrorTable, Row, SqlValue, execute};
use crate::webhooks::HandlerError;
use crate::webhooks::registry::Stopped;

/// A subscriber's access, as the mirror holds it: what a host copies into its own
/// `users` table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccessState {
    /// Holds a valid subscription ([`Subscription::is_valid`]).
    pub valid: bool,
    /// The newest valid subscription, else the newest one.
    pub subscription: Option<String>,
    /// That subscription's status.
    pub status: Option<SubscriptionStatus>,
    /// The products of the valid subscriptions, sorted.
    pub products: Vec<String>,
    /// The roles those products grant (product metadata `roles`), sorted.
    pub roles: Vec<String>,
    /// The Entitlements features' lookup keys (the customer's active entitlement
    /// summary when Stripe has sent one, else the valid products' features), sorted.
    pub features: Vec<String>,
    /// That subscription's payment collection is paused
    /// ([`Subscription::pause_collection`]): still `valid` (Stripe means the service to
    /// go on), for a host that stops serving what it does not bill.
    pub collection_paused: bool,
}

impl AccessState {
    /// Whether a product is among the valid subscriptions' products.
    pub fn has_product(&self, product_id: &str) -> bool {
        self.products.iter().any(|p| p == product_id)
    }

    /// Whether a valid subscription grants the role.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether the feature (lookup key) is included.
    pub fn has_feature(&self, lookup_key: &str) -> bool {
        self.features.iter().any(|f| f == lookup_key)
    }

    fn to_json(&self) -> String {
        let mut state = json!({
            "valid": self.valid,
            "subscription": self.subscription,
            "status": self.status.as_ref().map(|s| s.to_string()),
            "products": self.products,
            "roles": self.roles,
            "features": self.features,
        });
        // Only when paused: a state told before this field existed reads the same.
        if self.collection_paused {
            state["collection_paused"] = json!(true);
        }
        state.to_string()
    }

    fn from_json(text: &str) -> AccessState {
        let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let list = |k: &str| -> Vec<String> {
            v[k].as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        AccessState {
            valid: v["valid"].as_bool().unwrap_or(false),
            subscription: v["subscription"].as_str().map(str::to_owned),
            status: v["status"].as_str().map(SubscriptionStatus::from),
            products: list("products"),
            roles: list("roles"),
            features: list("features"),
            collection_paused: v["collection_paused"].as_bool().unwrap_or(false),
        }
    }
}

/// One subscriber's access changed: what the hook was last told, and what holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccessChange {
    /// The host's user id ([`Subscriber::subscriber_id`](crate::Subscriber::subscriber_id)).
    pub subscriber: String,
    /// Live or test mode.
    pub livemode: bool,
    /// The access last told to the hook (no access before the first time).
    pub before: AccessState,
    /// The access the mirror holds now.
    pub after: AccessState,
}

impl AccessChange {
    /// Access was granted: no valid subscription before, one now.
    pub fn granted(&self) -> bool {
        !self.before.valid && self.after.valid
    }

    /// Access ended: a valid subscription before, none now.
    pub fn revoked(&self) -> bool {
        self.before.valid && !self.after.valid
    }
}

type BoxFuture =
    std::pin::Pin<Box<dyn Future<Output = std::result::Result<(), HandlerError>> + Send>>;
/// The host's hook, boxed.
pub(crate) type AccessHook = Arc<dyn Fn(AccessChange, Mirror) -> BoxFuture + Send + Sync>;

/// Boxes a hook.
pub(crate) fn boxed<H, F>(hook: H) -> AccessHook
where
    H: Fn(AccessChange, Mirror) -> F + Send + Sync + 'static,
    F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
{
    Arc::new(move |change, mirror| Box::pin(hook(change, mirror)))
}

// ---------------------------------------------------------------------------------
// Marking

/// How a mirrored table's writes reach subscribers' access.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AccessLink {
    /// Never (prices, and subscription items, which follow their subscription).
    None,
    /// Through the customer whose id is in this column (`id` for customers).
    Customer(&'static str),
    /// Through the product whose id is in this column: every subscriber of the product.
    Product(&'static str),
    /// A product's own write: its subscribers when the roles it grants changed.
    ProductRoles,
}

/// What a write must know of the row as it was (read before the write).
pub(crate) struct Before {
    subscriber: Option<(String, bool)>,
    /// The product's row before the write: its roles, mode and whether deleted.
    product: Option<ProductGrant>,
}

/// What a product row grants, and in which mode: its roles unless it is deleted.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ProductGrant {
    roles: Vec<String>,
    live: bool,
    deleted: bool,
}

impl ProductGrant {
    /// The roles it grants to subscribers of `live`'s mode.
    fn in_mode(grant: Option<&Self>, live: bool) -> &[String] {
        match grant {
            Some(g) if g.live == live && !g.deleted => &g.roles,
            _ => &[],
        }
    }
}

/// A subscriber, in a mode.
pub(crate) type Touched = (String, bool);

/// How every mark ends: a subscriber already marked is marked again, one version on.
macro_rules! marked {
    () => {
        " ON CONFLICT (subscriber_id, livemode) DO UPDATE SET dirty = TRUE, version = stripe_access.version + 1"
    };
}

/// [`marked!`] for a subscriber still marked: one version on, and no `dirty` in the
/// `SET`, which SQLite would otherwise rewrite in `idx_access_dirty` (one more page
/// in the commit) though it stays true. Marks nobody not marked: [`mark_customer`]
/// runs [`marked!`] then.
macro_rules! marked_again {
    () => {
        " ON CONFLICT (subscriber_id, livemode) DO UPDATE SET version = stripe_access.version + 1 \
         WHERE stripe_access.dirty = TRUE"
    };
}

/// Marks the subscribers of the customers whose `id` the caller's condition follows
/// with (` = ?`, ` IN (...)`).
macro_rules! mark_customers {
    () => {
        "INSERT INTO stripe_access (subscriber_id, livemode, dirty, version) \
         SELECT DISTINCT subscriber_id, livemode, TRUE, 1 FROM stripe_customers \
         WHERE subscriber_id IS NOT NULL AND id"
    };
}

thread_local! {
    /// The subscribers marked on this thread since [`collect`] began: the database
    /// closures of one pipeline step run on one blocking thread, start to end.
    static MARKED: RefCell<Option<BTreeSet<Touched>>> = const { RefCell::new(None) };
    /// The customers whose subscribers [`in_bulk`] marks at its end.
    static DEFERRED: RefCell<Option<BTreeSet<String>>> = const { RefCell::new(None) };
    /// The subscribers of a page's customers as the rows held them before the page,
    /// read by [`in_bulk`] in one statement; each is taken once (a second write of one
    /// customer in the page reads its row again).
    static BEFORE_PAGE: RefCell<Option<HashMap<String, Option<Touched>>>> =
        const { RefCell::new(None) };
    /// An access hook tells this thread's marks as they are made ([`told_by_hook`]):
    /// its subscribers' rows are then most often clean, and a mark goes straight to
    /// the statement that sets `dirty`.
    static TOLD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a webhook's sync) knowing whether an access hook will tell the marks it
/// makes: on SQLite [`mark_customer`] then skips `marked_again!`, which would find
/// the row clean (told since its last mark) and write nothing.
pub(crate) fn told_by_hook<R>(hook: bool, f: impl FnOnce() -> R) -> R {
    /// Puts the outer value back even if `f` panics (blocking threads are reused).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            TOLD.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(TOLD.with(|t| t.replace(hook)));
    f()
}

/// Runs a backfill page's writes (`f`, in the caller's transaction) and marks the
/// subscribers of the customers they touched at the end, in one statement instead of
/// one per object: a subscriber's mark then reads the customer as the page left it.
/// For a page of customers (`ids`, of `table`), the subscribers the writes compare
/// against are read first, in one statement instead of one per customer.
pub(crate) fn in_bulk<R>(
    conn: &mut Conn<'_>,
    table: &MirrorTable,
    ids: &[&str],
    f: impl FnOnce(&mut Conn<'_>) -> Result<R>,
) -> Result<R> {
    /// Puts the outer deferral and page back even if `f` fails or panics (writer
    /// threads are reused).
    type Page = Option<HashMap<String, Option<Touched>>>;
    struct Restore(Option<(Option<BTreeSet<String>>, Page)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some((deferred, page)) = self.0.take() {
                DEFERRED.with(|d| *d.borrow_mut() = deferred);
                BEFORE_PAGE.with(|b| *b.borrow_mut() = page);
            }
        }
    }
    // Lists of one length, padded with a repeated id: one statement the connection
    // keeps prepared, not one per page size.
    const LIST: usize = 100;
    let padded = |chunk: &[&str]| -> Vec<SqlValue> {
        (0..LIST)
            .map(|i| SqlValue::Text(Some(chunk[i.min(chunk.len() - 1)].to_owned())))
            .collect()
    };
    let restore = Restore(Some((
        DEFERRED.with(|d| d.borrow_mut().replace(BTreeSet::new())),
        BEFORE_PAGE.with(|b| b.borrow_mut().take()),
    )));
    if matches!(table.access, AccessLink::Customer("id")) && !ids.is_empty() {
        let before = subscribers_before(conn, ids, LIST, &padded)?;
        BEFORE_PAGE.with(|b| *b.borrow_mut() = Some(before));
    }
    let result = f(conn)?;
    let customers = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
    drop(restore);
    let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
    for chunk in customers.chunks(LIST) {
        let sql = format!(
            "{} IN ({}){}",
            mark_customers!(),
            vec!["?"; LIST].join(", "),
            marked!()
        );
        execute(conn, &sql, &padded(chunk))?;
    }
    Ok(result)
}

/// The subscriber of each customer of `ids` (`None` for a new customer or one without
/// a subscriber), as [`subscriber_of`] reads it, in statements of `list` ids.
fn subscribers_before(
    conn: &mut Conn<'_>,
    ids: &[&str],
    list: usize,
    padded: &dyn Fn(&[&str]) -> Vec<SqlValue>,
) -> Result<HashMap<String, Option<Touched>>> {
    use diesel::sql_types::{Bool, Nullable, Text};
    #[derive(QueryableByName)]
    struct Held {
        #[diesel(sql_type = Text)]
        id: String,
        #[diesel(sql_type = Nullable<Text>)]
        subscriber_id: Option<String>,
        #[diesel(sql_type = Bool)]
        livemode: bool,
    }
    // Locked until the commit on Postgres, as in `subscriber_of`, in id order (every
    // page and instance the same). A customer with no row yet is not locked there:
    // another writer may store it before the page's upsert, so it is left out and
    // read when written. SQLite's one writer holds the database: no row is no row.
    let (lock, absent_known) = match conn {
        #[cfg(feature = "postgres")]
        Conn::Postgres(_) => (" ORDER BY id FOR UPDATE", false),
        #[allow(unreachable_patterns)]
        _ => ("", true),
    };
    let sql = format!(
        "SELECT id, subscriber_id, livemode FROM stripe_customers WHERE id IN ({}){lock}",
        vec!["?"; list].join(", ")
    );
    let mut before = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(list) {
        let values = padded(chunk);
        let held: Vec<Held> = on_conn!(conn, c => Bound::new(&sql, &values).load(c))?;
        if absent_known {
            before.extend(chunk.iter().map(|id| ((*id).to_owned(), None)));
        }
        before.extend(
            held.into_iter()
                .map(|h| (h.id, h.subscriber_id.map(|s| (s, h.livemode)))),
        );
    }
    Ok(before)
}

/// Runs `f` and returns the subscribers it marked, with its result.
pub(crate) fn collect<R>(f: impl FnOnce() -> R) -> (R, BTreeSet<Touched>) {
    /// Puts the outer collector back even if `f` panics (blocking threads are reused).
    struct Restore(Option<Option<BTreeSet<Touched>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                MARKED.with(|m| *m.borrow_mut() = outer);
            }
        }
    }
    let mut restore = Restore(Some(
        MARKED.with(|m| m.borrow_mut().replace(BTreeSet::new())),
    ));
    let result = f();
    let outer = restore.0.take().expect("restored once");
    let marked = MARKED
        .with(|m| std::mem::replace(&mut *m.borrow_mut(), outer))
        .unwrap_or_default();
    // A caller collecting around us also sees what we marked.
    MARKED.with(|m| {
        if let Some(outer) = m.borrow_mut().as_mut() {
            outer.extend(marked.iter().cloned());
        }
    });
    (result, marked)
}

/// Reads what the write needs to compare (a customer's subscriber, a product's roles).
pub(crate) fn before_write(
    conn: &mut Conn<'_>,
    table: &MirrorTable,
    row: &Row,
) -> Result<Option<Before>> {
    Ok(match table.access {
        AccessLink::Customer("id") => Some(Before {
            subscriber: subscriber_of(conn, &row.id)?,
            product: None,
        }),
        AccessLink::ProductRoles => {
            let query = stripe_products::table.find(&row.id).select((
                stripe_products::data,
                stripe_products::livemode,
                stripe_products::deleted,
            ));
            let found: Option<(String, bool, bool)> = match conn {
                #[cfg(feature = "sqlite")]
                Conn::Sqlite(c) => query.get_result(&mut **c).optional()?,
                // Locked, as in `subscriber_of`.
                #[cfg(feature = "postgres")]
                Conn::Postgres(c) => query.for_update().get_result(&mut **c).optional()?,
            };
            Some(Before {
                subscriber: None,
                product: found.map(|(data, live, deleted)| ProductGrant {
                    roles: super::roles_in(&data),
                    live,
                    deleted,
                }),
            })
        }
        _ => None,
    })
}

/// Marks the subscribers whose access an applied write may have changed.
pub(crate) fn after_write(
    conn: &mut Conn<'_>,
    table: &MirrorTable,
    row: &Row,
    before: Option<Before>,
) -> Result<()> {
    match table.access {
        AccessLink::None => {}
        AccessLink::Customer(column) => {
            let customer = match column {
                "id" => Some(row.id.clone()),
                column => row.text(column),
            };
            if let Some(customer) = customer {
                mark_customer(conn, &customer)?;
            }
            // A customer moved to another subscriber: the one it left changes too. (One
            // that stays is marked above: not again, a statement and on SQLite a page.)
            if let Some((old, live)) = before.and_then(|b| b.subscriber) {
                let stays = live == row.livemode
                    && row.text("subscriber_id").as_deref() == Some(old.as_str());
                if !stays {
                    mark(conn, &old, live)?;
                }
            }
        }
        AccessLink::Product(column) => {
            if let Some(product) = row.text(column) {
                mark_product(conn, &product, row.livemode)?;
            }
        }
        AccessLink::ProductRoles => {
            // What the row grants in each mode, before and after: a deleted product
            // grants nothing, whatever its data says, and one id holds one row, so a
            // write of the other mode (an id such as `pro` made in both) moves the
            // roles from one mode's subscribers to the other's.
            let was = before.and_then(|b| b.product);
            let now = ProductGrant {
                roles: super::roles_in(row.data()),
                live: row.livemode,
                deleted: row.deleted,
            };
            for live in [false, true] {
                let changed = ProductGrant::in_mode(was.as_ref(), live)
                    != ProductGrant::in_mode(Some(&now), live);
                // A deletion marks its mode as it always did (a mark whose state comes
                // out unchanged tells no one).
                if changed || (row.deleted && live == row.livemode) {
                    mark_product(conn, &row.id, live)?;
                }
            }
        }
    }
    Ok(())
}

/// The customer's subscriber as the write about to change the row sees it.
fn subscriber_of(conn: &mut Conn<'_>, customer: &str) -> Result<Option<Touched>> {
    // Read with the page's other customers before the page ([`in_bulk`]).
    let known = BEFORE_PAGE.with(|b| b.borrow_mut().as_mut().and_then(|m| m.remove(customer)));
    if let Some(known) = known {
        return Ok(known);
    }
    let query = stripe_customers::table
        .find(customer)
        .select((stripe_customers::subscriber_id, stripe_customers::livemode));
    let found: Option<(Option<String>, bool)> = match conn {
        // SQLite's writers run one at a time: the row cannot change until the commit.
        #[cfg(feature = "sqlite")]
        Conn::Sqlite(c) => query.get_result(&mut **c).optional()?,
        // Locked until the commit: a concurrent write of the row commits first and is
        // read here (the subscriber it moved the customer to is the one left), or waits.
        #[cfg(feature = "postgres")]
        Conn::Postgres(c) => query.for_update().get_result(&mut **c).optional()?,
    };
    Ok(found.and_then(|(s, live)| s.map(|s| (s, live))))
}

/// Marks the subscriber of this customer, if it has one yet: one statement. On SQLite
/// without a hook `marked_again!` is tried first, so two when the subscriber is not
/// marked (told since) or the customer has none.
pub(crate) fn mark_customer(conn: &mut Conn<'_>, customer: &str) -> Result<()> {
    use diesel::sql_types::{Bool, Text};
    #[derive(QueryableByName)]
    struct Marked {
        #[diesel(sql_type = Text)]
        subscriber_id: String,
        #[diesel(sql_type = Bool)]
        livemode: bool,
    }
    // On SQLite a subscriber still marked (no hook tells it) is marked first without
    // touching its `dirty` entry; Postgres keeps an unchanged entry by itself, and with
    // a hook the row is most often clean. Each statement is written with and without
    // `RETURNING` (for whether one collects).
    macro_rules! with_and_without_returning {
        ($ending:ident) => {
            [
                concat!(mark_customers!(), " = ?", $ending!()),
                concat!(
                    mark_customers!(),
                    " = ?",
                    $ending!(),
                    " RETURNING subscriber_id, livemode"
                ),
            ]
        };
    }
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    const AGAIN: [&str; 2] = with_and_without_returning!(marked_again);
    const MARK: [&str; 2] = with_and_without_returning!(marked);
    let tries: &[[&str; 2]] = match conn {
        #[cfg(feature = "sqlite")]
        Conn::Sqlite(_) if !TOLD.with(Cell::get) => &[AGAIN, MARK],
        #[allow(unreachable_patterns)]
        _ => &[MARK],
    };
    let values = [SqlValue::Text(Some(customer.to_owned()))];
    // Nobody collects: marked with the others at the end of the page ([`in_bulk`]),
    // or now, with a prepared statement the connection keeps.
    if MARKED.with(|m| m.borrow().is_none()) {
        let deferred = DEFERRED.with(|d| {
            d.borrow_mut()
                .as_mut()
                .map(|set| set.insert(customer.to_owned()))
                .is_some()
        });
        if !deferred {
            for [sql, _] in tries {
                if execute(conn, sql, &values)? > 0 {
                    break;
                }
            }
        }
        return Ok(());
    }
    let mut marked: Vec<Marked> = Vec::new();
    for [_, sql] in tries {
        marked = on_conn!(conn, c => Bound::new(sql, &values).load(c))?;
        if !marked.is_empty() {
            break;
        }
    }
    for m in marked {
        collected(m.subscriber_id, m.livemode);
    }
    Ok(())
}

fn collected(subscriber: String, live: bool) {
    MARKED.with(|m| {
        if let Some(set) = m.borrow_mut().as_mut() {
            set.insert((subscriber, live));
        }
    });
}

const MARK: &str = concat!(
    "INSERT INTO stripe_access (subscriber_id, livemode, dirty, version) VALUES (?, ?, TRUE, 1)",
    marked!()
);

/// Marks one subscriber dirty (a change may be untold).
pub(crate) fn mark(conn: &mut Conn<'_>, subscriber: &str, live: bool) -> Result<()> {
    execute(
        conn,
        MARK,
        &[
            SqlValue::Text(Some(subscriber.to_owned())),
            SqlValue::Bool(Some(live)),
        ],
    )?;
    collected(subscriber.to_owned(), live);
    Ok(())
}

/// Marks every subscriber of a product in one mode (an id such as `pro` may name a
/// product in each mode, and a test-mode change must not touch live users). Not collected for the event at hand (there
/// may be many): [`Webhooks::deliver_access_changes`](crate::Webhooks::deliver_access_changes) tells them.
pub(crate) fn mark_product(conn: &mut Conn<'_>, product: &str, live: bool) -> Result<()> {
    execute(
        conn,
        concat!(
            "INSERT INTO stripe_access (subscriber_id, livemode, dirty, version) \
         SELECT DISTINCT c.subscriber_id, c.livemode, TRUE, 1 FROM stripe_subscription_items i \
         JOIN stripe_subscriptions s ON s.id = i.subscription_id \
         JOIN stripe_customers c ON c.id = s.customer_id \
         WHERE i.product_id = ? AND c.livemode = ? AND i.deleted = FALSE AND s.deleted = FALSE \
         AND c.subscriber_id IS NOT NULL",
            marked!()
        ),
        &[
            SqlValue::Text(Some(product.to_owned())),
            SqlValue::Bool(Some(live)),
        ],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// Computing

/// The subscriber's access as the mirror holds it at `now`.
pub(crate) fn compute(
    conn: &mut Conn<'_>,
    subscriber: &str,
    live: bool,
    now: i64,
) -> Result<AccessState> {
    let customers = crate::Customer::ids_by_subscriber(conn, subscriber, live)?;
    if customers.is_empty() {
        return Ok(AccessState::default());
    }
    let subscriptions = Subscription::of_customers(conn, &customers)?;
    let valid: Vec<&Subscription> = subscriptions
        .iter()
        .filter(|s| s.is_valid_at(now))
        .collect();
    let shown = valid.first().copied().or(subscriptions.first());
    // Each valid subscription with its products: the roles and features it grants.
    let with_products = super::with_products(conn, valid.iter().map(|s| (*s).clone()).collect())?;
    let mut products: Vec<String> = with_products
        .iter()
        .flat_map(|(_, p)| p.iter().cloned())
        .collect();
    products.sort();
    products.dedup();
    let product_data: Vec<String> = on_conn!(conn, c => stripe_products::table
        .filter(stripe_products::id.eq_any(&products))
        .filter(stripe_products::livemode.eq(live))
        .filter(stripe_products::deleted.eq(false))
        .select(stripe_products::data)
        .load(c))?;
    let mut roles: Vec<String> = product_data
        .iter()
        .flat_map(|d| super::roles_in(d))
        .collect();
    roles.sort();
    roles.dedup();
    // As the gate decides: features only with a valid subscription (Stripe's summary
    // may not have caught up with a cancellation), each customer's summary or else
    // its subscriptions' product features.
    let mut features: Vec<String> = super::features_by_subscription(conn, &with_products, live)?
        .into_iter()
        .flatten()
        .collect();
    features.sort();
    features.dedup();
    Ok(AccessState {
        valid: !valid.is_empty(),
        subscription: shown.map(|s| s.id.clone()),
        status: shown.and_then(|s| s.status.clone()),
        products,
        roles,
        features,
        collection_paused: shown.is_some_and(|s| s.is_collection_paused_at(now)),
    })
}

// ---------------------------------------------------------------------------------
// Telling

/// How long a deliverer waits for another one telling the same subscriber.
const BUSY_WAIT: Duration = Duration::from_secs(3);
/// At most this many rounds when writes keep arriving while the hook runs.
const MAX_ROUNDS: usize = 5;
/// Less time than this left in the event's claim: no wait for another worker, no
/// hook started (it would be cut off at once).
const TOO_LATE: Duration = Duration::from_millis(100);

/// The handler-log key under which an event records that it must tell a subscriber.
pub(crate) fn log_key((subscriber, live): &Touched) -> String {
    let mode = if *live { "live" } else { "test" };
    format!("access:{mode}:{subscriber}")
}

/// The subscriber a handler-log key names, if it is an access key.
pub(crate) fn from_log_key(key: &str) -> Option<Touched> {
    let rest = key.strip_prefix("access:")?;
    let (mode, subscriber) = rest.split_once(':')?;
    Some((subscriber.to_owned(), mode == "live"))
}

enum Claimed {
    /// Nothing untold.
    Clean,
    /// Another worker is telling it.
    Busy,
    /// Ours: the claim's token, the version claimed, what was told, what holds now.
    Mine(Box<Mine>),
}

struct Mine {
    token: i32,
    version: i64,
    before: AccessState,
    after: AccessState,
}

/// Tells the hook the subscriber's access if it changed since it was last told.
/// `Ok(true)` when the hook ran, `Ok(false)` when nothing had changed; `Err` (the
/// message) when the hook failed, panicked or timed out, or the row stayed claimed by
/// another worker: the row stays dirty and a later delivery tells it.
pub(crate) async fn tell(
    mirror: &Mirror,
    hook: &AccessHook,
    (subscriber, live): &Touched,
    deadline: Option<tokio::time::Instant>,
) -> std::result::Result<bool, String> {
    let timeout = mirror.config().webhook_handler_timeout;
    let lease = crate::webhooks::pipeline::whole_secs(timeout) + 10;
    let waited = tokio::time::Instant::now();
    let mut told = false;
    // Rounds that told (or found nothing to tell); a wait for another worker is no round.
    let mut rounds = 0;
    while rounds < MAX_ROUNDS {
        let (s, l, now) = (subscriber.clone(), *live, mirror.now());
        let claimed = mirror
            .db()
            .run(move |conn| conn.write(|c| claim(c, &s, l, now, lease)))
            .await
            .map_err(|e| format!("access of {subscriber} could not be read: {e}"))?;
        let (token, version, before, after) = match claimed {
            Claimed::Clean => return Ok(told),
            // Never past the event's claim: its answer must be recorded within it.
            Claimed::Busy
                if waited.elapsed() < BUSY_WAIT
                    && deadline.is_none_or(|d| tokio::time::Instant::now() + TOO_LATE < d) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Claimed::Busy => {
                return Err(format!(
                    "access of {subscriber} is being told by another worker"
                ));
            }
            Claimed::Mine(mine) => (mine.token, mine.version, mine.before, mine.after),
        };
        rounds += 1;
        // Within the event's claim when telling for an event.
        let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        let limit = left.map_or(timeout, |left| timeout.min(left));
        let result = if before == after {
            Ok(())
        } else if left.is_some_and(|left| left < TOO_LATE) {
            // A hook started now would be cut off at once, perhaps half done: not
            // started, the row stays dirty for the next delivery or sweep.
            Err(Stopped {
                message: format!(
                    "access hook for {subscriber} not started: the event's claim ends first"
                ),
                timed_out: false,
            })
        } else {
            let change = AccessChange {
                subscriber: subscriber.clone(),
                livemode: *live,
                before,
                after: after.clone(),
            };
            told = true;
            // Called inside the guard, so a panic before the future exists is caught too.
            let (hook, m) = (hook.clone(), mirror.clone());
            crate::webhooks::registry::guarded(async move { hook(change, m).await }, limit)
                .await
                .map_err(|e| Stopped {
                    message: format!("access hook for {subscriber} {e}"),
                    ..e
                })
        };
        let (s, l, now) = (subscriber.clone(), *live, mirror.now());
        let error = result.as_ref().err().map(|e| e.message.clone());
        // A hook cut off by its timeout may still be writing (work it handed to a
        // thread): its claim is kept until the lease ends, so no newer state is told
        // before that write lands.
        let keep_claim = result.as_ref().is_err_and(|e| e.timed_out);
        let still_dirty = mirror
            .db()
            .run(move |conn| release(conn, &s, l, token, version, &after, error, keep_claim, now))
            .await
            .map_err(|e| format!("access of {subscriber} could not be recorded: {e}"))?;
        if let Err(error) = result {
            tracing::warn!(subscriber = %subscriber, %error, "access hook failed");
            return Err(error.message);
        }
        if !still_dirty {
            return Ok(told);
        }
    }
    Err(format!(
        "access of {subscriber} kept changing while it was told; it stays due"
    ))
}

/// Claims a dirty subscriber row and computes the access it now has.
fn claim(
    conn: &mut Conn<'_>,
    subscriber: &str,
    live: bool,
    now: i64,
    lease: i64,
) -> Result<Claimed> {
    use diesel::dsl::sql;
    use diesel::sql_types::{BigInt, Nullable};
    let db_now = crate::webhooks::event::database_now(conn);
    let until = sql::<Nullable<BigInt>>(&format!("({db_now}) + {lease}"));
    let expired = sql::<Nullable<BigInt>>(db_now);
    let key = stripe_access::table
        .filter(stripe_access::subscriber_id.eq(subscriber))
        .filter(stripe_access::livemode.eq(live));
    let claimed: Option<(i32, i64, Option<String>)> = on_conn!(conn, c => diesel::update(
            key.filter(stripe_access::dirty.eq(true)).filter(
                stripe_access::claimed_until.is_null().or(stripe_access::claimed_until.lt(expired)),
            ),
        )
        .set((
            stripe_access::claimed_until.eq(until),
            stripe_access::token.eq(stripe_access::token + 1),
        ))
        .returning((stripe_access::token, stripe_access::version, stripe_access::delivered))
        .get_result(c)
        .optional())?;
    let Some((token, version, delivered)) = claimed else {
        let dirty: Option<bool> =
            on_conn!(conn, c => key.select(stripe_access::dirty).get_result(c).optional())?;
        return Ok(if dirty == Some(true) {
            Claimed::Busy
        } else {
            Claimed::Clean
        });
    };
    let before = delivered
        .as_deref()
        .map(AccessState::from_json)
        .unwrap_or_default();
    let after = compute(conn, subscriber, live, now)?;
    Ok(Claimed::Mine(Box::new(Mine {
        token,
        version,
        before,
        after,
    })))
}

/// Ends a claim: on success records what was told and stays dirty only if a write
/// came in meanwhile; on failure records the error. True when still dirty.
#[allow(clippy::too_many_arguments)]
fn release(
    conn: &mut Conn<'_>,
    subscriber: &str,
    live: bool,
    token: i32,
    version: i64,
    told: &AccessState,
    error: Option<String>,
    keep_claim: bool,
    now: i64,
) -> Result<bool> {
    let key = stripe_access::table
        .filter(stripe_access::subscriber_id.eq(subscriber))
        .filter(stripe_access::livemode.eq(live))
        .filter(stripe_access::token.eq(token));
    let dirty: Option<bool> = match error {
        None => on_conn!(conn, c => diesel::update(key)
            .set((
                stripe_access::delivered.eq(told.to_json()),
                stripe_access::delivered_at.eq(now),
                stripe_access::dirty.eq(stripe_access::version.ne(version)),
                stripe_access::claimed_until.eq(None::<i64>),
                stripe_access::error.eq(None::<String>),
            ))
            .returning(stripe_access::dirty)
            .get_result(c)
            .optional())?,
        Some(error) => on_conn!(conn, c => diesel::update(key)
            .set((
                stripe_access::attempts.eq(stripe_access::attempts + 1),
                stripe_access::claimed_until.eq(diesel::dsl::sql::<diesel::sql_types::Nullable<diesel::sql_types::BigInt>>(
                    if keep_claim { "claimed_until" } else { "NULL" },
                )),
                stripe_access::error.eq(error),
            ))
            .returning(stripe_access::dirty)
            .get_result(c)
            .optional())?,
    };
    // No row: the claim expired and another worker took over; it tells what is left.
    Ok(dirty.unwrap_or(false))
}

/// The subscribers of mode `live` with a change not yet told, in order, after `after`,
/// at most `limit`.
pub(crate) fn dirty(
    conn: &mut Conn<'_>,
    live: bool,
    after: Option<&Touched>,
    limit: i64,
) -> Result<Vec<Touched>> {
    let (s, l) = after.cloned().unwrap_or_default();
    let first = after.is_none();
    Ok(on_conn!(conn, c => stripe_access::table
        .filter(stripe_access::dirty.eq(true))
        .filter(stripe_access::livemode.eq(live))
        .filter(
            diesel::dsl::sql::<diesel::sql_types::Bool>(if first { "TRUE" } else { "FALSE" })
                .or(stripe_access::subscriber_id.gt(&s))
                .or(stripe_access::subscriber_id.eq(&s).and(stripe_access::livemode.gt(l))),
        )
        .order((stripe_access::subscriber_id.asc(), stripe_access::livemode.asc()))
        .select((stripe_access::subscriber_id, stripe_access::livemode))
        .limit(limit)
        .load(c))?)
}

/// The access the mirror holds for a subscriber in the mirror's mode, computed now.
pub async fn access_of(mirror: &Mirror, subscriber_id: &str) -> Result<AccessState> {
    let (s, live, now) = (subscriber_id.to_owned(), mirror.live_mode(), mirror.now());
    mirror
        .db()
        .run(move |conn| compute(conn, &s, live, now))
        .await
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use crate::db::Database;

    /// On SQLite a customer's mark tries `marked_again!` first unless a hook tells the
    /// marks: a marked subscriber is marked in one statement, a clean one in two
    /// without a hook and in one with. Each leaves the row marked, one version on.
    #[test]
    fn a_mark_takes_one_statement_where_the_row_is_as_expected() {
        use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(Arc<AtomicUsize>);
        impl Instrumentation for Count {
            fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
                if let InstrumentationEvent::StartQuery { .. } = event {
                    self.0.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("marks.db").display());
        let db = crate::db::Database::open(&url, 1, Duration::from_secs(5)).unwrap();
        db.migrate().unwrap();
        drop(db);
        let path = dir.path().join("marks.db");
        let mut c = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        c.batch_execute(
            "INSERT INTO stripe_customers (id, livemode, data, stamp, synced_at, subscriber_id) \
             VALUES ('cus_m', FALSE, '{}', 1, 1, 'u1')",
        )
        .unwrap();
        let statements = Arc::new(AtomicUsize::new(0));
        c.set_instrumentation(Count(statements.clone()));
        // Statements of one mark of `cus_m` with its row as `dirty` says, and the row after.
        let mut mark_once = |dirty: bool, hook: bool| {
            c.batch_execute(&format!(
                "INSERT OR REPLACE INTO stripe_access (subscriber_id, livemode, dirty, version) \
                 VALUES ('u1', FALSE, {dirty}, 5)"
            ))
            .unwrap();
            statements.store(0, Ordering::Relaxed);
            told_by_hook(hook, || mark_customer(&mut Conn::Sqlite(&mut c), "cus_m")).unwrap();
            let count = statements.load(Ordering::Relaxed);
            let row: (bool, i64) = stripe_access::table
                .select((stripe_access::dirty, stripe_access::version))
                .get_result(&mut c)
                .unwrap();
            (count, row)
        };
        assert_eq!(mark_once(true, false), (1, (true, 6)), "marked, no hook");
        assert_eq!(mark_once(false, false), (2, (true, 6)), "clean, no hook");
        assert_eq!(mark_once(false, true), (1, (true, 6)), "clean, a hook");
        assert_eq!(mark_once(true, true), (1, (true, 6)), "marked, a hook");
    }

    /// A page whose writes fail, or panic, leaves nothing of it on the thread (writer
    /// threads are reused): no subscribers read for it, no customers deferred, so the
    /// next write outside a page marks its subscriber at once.
    #[test]
    fn a_failed_page_leaves_nothing_on_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bulk.db").display());
        let db = Database::open(&url, 1, std::time::Duration::from_secs(5)).unwrap();
        db.migrate().unwrap();
        let customers = crate::models::table_for_kind("customer").unwrap();
        let left = || {
            let page = BEFORE_PAGE.with(|b| b.borrow().is_some());
            let deferred = DEFERRED.with(|d| d.borrow().is_some());
            (page, deferred)
        };
        db.run_blocking(|conn| {
            let failed = in_bulk(conn, customers, &["cus_1"], |_| -> Result<()> {
                assert_eq!(left(), (true, true), "the page's state is in place");
                Err(crate::Error::Config("this page fails".into()))
            });
            assert!(failed.is_err());
            assert_eq!(left(), (false, false), "after a failed page");
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                in_bulk(conn, customers, &["cus_2"], |_| -> Result<()> {
                    panic!("this page panics")
                })
            }));
            assert!(panicked.is_err());
            assert_eq!(left(), (false, false), "after a page that panicked");
            Ok(())
        })
        .unwrap();
    }
}
