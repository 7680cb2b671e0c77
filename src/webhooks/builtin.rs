//! The crate's own handling of an event, before any user handler: upsert the
//! mirrored object from the payload, through the stale-write guard, stamped with the
//! event's `created`. Runs in the same transaction that claims the event.

use std::borrow::Cow;

use diesel::prelude::*;
use serde_json::{Value, json};

use crate::db::schema::stripe_customers;
use crate::db::{Conn, on_conn};
use crate::error::Result;
use crate::models::customer::SUBSCRIBER_METADATA_KEY;
use crate::sync::MirrorTable;
use crate::sync::upsert::{Row, Source, Stamp, Written};
use crate::webhooks::event::{Event, Refetched};

/// The table an event's object is mirrored into, if the crate mirrors it: chosen by
/// the object itself, so `customer.discount.*` (a discount) and `invoice.*` are left
/// alone while `customer.subscription.*` lands in subscriptions.
pub(crate) fn table_for(event: &Event) -> Option<&'static MirrorTable> {
    let kind = event.object().get("object").and_then(Value::as_str)?;
    crate::models::table_for_kind(kind)
}

/// An event's built-in sync, mapped from its payload (or the re-fetched object) before
/// anything is written: a bad object shape is an [`Error::Mapping`](crate::Error::Mapping)
/// here, so the write that follows has no savepoint to roll back.
pub(crate) enum Plan<'a> {
    /// Nothing the crate mirrors.
    Nothing,
    /// Link a Checkout Session's customer to its subscriber.
    Checkout,
    /// Write this row (and its children) through the guard.
    Object {
        table: &'static MirrorTable,
        row: Box<Row>,
        /// The event's own object, copied only to mark a tombstone (the copy and its
        /// drop were a twentieth of the SQLite writer's time).
        object: Cow<'a, Value>,
    },
}

/// Maps the event's object to the row its sync writes.
pub(crate) fn plan(event: &Event) -> Result<Plan<'_>> {
    // A Connect account's objects are not the platform's: mirrored beside them, its
    // customers (whose metadata the account sets) would pass the platform's gate and
    // its products could take the platform's ids. Stored, and handed to handlers only.
    if connected(event) {
        return Ok(Plan::Nothing);
    }
    if event.event_type == "checkout.session.completed" {
        return Ok(Plan::Checkout);
    }
    let Some(table) = table_for(event) else {
        return Ok(Plan::Nothing);
    };
    // A re-fetched object is stamped with Stripe's time of the fetch; the payload with
    // the event's, ordered within its second by the event's type.
    let (object, stamp) = match &event.refetched {
        Some(Refetched::Object(object, stamp)) => (object, stamp.clone()),
        // Stripe no longer has it: a tombstone (a subscription's is its canceled state,
        // which Stripe keeps, so this only happens to the other kinds).
        Some(Refetched::Missing) => (event.object(), event_stamp(event, Source::Deleted)),
        None => (
            event.object(),
            event_stamp(event, Source::of_event(&event.event_type)),
        ),
    };
    // `customer.deleted`, `product.deleted`, ... carry the object as it was; a deleted
    // subscription is a canceled one, which its payload already says. A re-fetched
    // object says itself whether it is deleted: a live one after a deletion was made
    // again under the id.
    let deleted = match &event.refetched {
        Some(Refetched::Missing) => true,
        Some(Refetched::Object(..)) => false,
        None => event.event_type.ends_with(".deleted") && table.kind != "subscription",
    };
    let mut object = Cow::Borrowed(object);
    // Not an object (a fake's odd answer to a re-fetch): the mapping below refuses it.
    if deleted
        && table.final_tombstones
        && object.is_object()
        && let Some(fields) = object.to_mut().as_object_mut()
    {
        fields.insert("deleted".to_owned(), json!(true));
    }
    let row = table.row(&object, stamp, Some(event.livemode))?;
    Ok(Plan::Object {
        table,
        row: Box::new(row),
        object,
    })
}

/// Applies the event's built-in sync, as [`plan`] mapped it. [`Written::Undecided`]
/// asks the caller to re-fetch the object when it can (a same-second tie nothing in
/// the events settles, or a payload holding only part of the object).
pub(crate) fn apply(conn: &mut Conn<'_>, event: &Event, plan: Plan<'_>) -> Result<Written> {
    match plan {
        Plan::Nothing => Ok(Written::Applied),
        Plan::Checkout => {
            link_checkout_customer(conn, event)?;
            Ok(Written::Applied)
        }
        Plan::Object { table, row, object } => {
            let written = table.write(conn, &row, &object)?;
            // Part of the object (the first page of a list), written and flagged: the
            // follow-up fetches the whole.
            if written == Written::Applied && table.is_partial(&object) {
                return Ok(Written::Undecided);
            }
            Ok(written)
        }
    }
}

/// The mirrored object an event is about, when it can be fetched by id.
pub(crate) fn object_of(event: &Event) -> Option<(&'static MirrorTable, String)> {
    if connected(event) {
        return None;
    }
    let table = table_for(event).filter(|t| crate::sync::remote::fetchable(t))?;
    Some((table, table.id_in(event.object())?))
}

/// An event of a Connect account (it names the `account`): its objects are not the
/// platform's. Never mirrored ([`plan`]) nor fetched (the platform's key cannot, and
/// Stripe's 404 would make a final tombstone); the event is stored and its handlers
/// run.
fn connected(event: &Event) -> bool {
    event.raw.get("account").is_some_and(|a| !a.is_null())
}

/// The subscription a completed Checkout created.
pub(crate) fn checkout_subscription(event: &Event) -> Option<(&'static MirrorTable, String)> {
    if event.event_type != "checkout.session.completed" || connected(event) {
        return None;
    }
    let id = crate::sync::upsert::id_named(event.object(), "subscription")?;
    Some((&crate::models::subscription::SUBSCRIPTIONS, id.to_owned()))
}

/// The stamp of an event's own payload.
fn event_stamp(event: &Event, source: Source) -> Stamp {
    Stamp {
        at: event.created,
        source,
        event: Some(event.id.clone()),
        previous: event.previous_attributes().cloned(),
        settles: None,
    }
}

/// Checkout tells which subscriber a customer belongs to (`client_reference_id`, or
/// the subscriber metadata key). Buyers can set `client_reference_id` themselves (on
/// Payment Links), so the link only joins a customer without a subscriber to a
/// subscriber without a customer: a customer already linked (by its metadata, set by
/// `Customer::get_or_create`, or an earlier Checkout) is never moved to another, and a
/// subscriber's customer is never shadowed by a second one. A placeholder row is created, through the
/// guard at stamp 0, when the customer itself has not arrived yet.
fn link_checkout_customer(conn: &mut Conn<'_>, event: &Event) -> Result<()> {
    link_session(conn, event.object(), event.livemode, &event.id)
}

/// The subscriber a Checkout Session names: its subscriber metadata (set by the server
/// that created it, `Checkout::create`), else its `client_reference_id` (which a buyer
/// can set on a Payment Link). Both there and different: `Err` with both (metadata,
/// reference), and no subscriber.
pub(crate) fn session_subscriber(
    session: &Value,
) -> std::result::Result<Option<&str>, (&str, &str)> {
    fn text(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str).filter(|s| !s.is_empty())
    }
    let metadata = text(session.pointer(&format!("/metadata/{SUBSCRIBER_METADATA_KEY}")))
        .or_else(|| text(session.pointer("/metadata/subscriber_id")));
    match (metadata, text(session.get("client_reference_id"))) {
        (Some(m), Some(r)) if m != r => Err((m, r)),
        (m, r) => Ok(m.or(r)),
    }
}

/// Links a Checkout Session's customer and subscriber (see `link_checkout_customer`);
/// `source` names where the session came from, for the log.
pub(crate) fn link_session(
    conn: &mut Conn<'_>,
    session: &Value,
    livemode: bool,
    source: &str,
) -> Result<()> {
    // No customer (or an empty id): nothing to link, and no placeholder to map.
    let Some(customer) = crate::sync::upsert::id_named(session, "customer").map(str::to_owned)
    else {
        return Ok(());
    };
    let subscriber = match session_subscriber(session) {
        Ok(subscriber) => subscriber,
        Err((metadata, reference)) => {
            tracing::warn!(%source, %metadata, client_reference_id = %reference,
                "checkout session's subscriber metadata and client_reference_id disagree; not linked");
            None
        }
    };
    let Some(subscriber) = subscriber else {
        return Ok(());
    };
    // The customer's row first (a placeholder until its own event lands), then the
    // subscriber's access row: the order every customer event locks them in, so two
    // groups cannot wait on each other. The access row's lock (until commit, on
    // Postgres) makes a concurrent link of the same subscriber wait, and then see
    // this one's below.
    let placeholder = json!({ "id": customer, "object": "customer", "livemode": livemode });
    let table = &crate::models::customer::CUSTOMERS;
    let stamp = Stamp {
        source: Source::Created,
        ..Stamp::fetched(0)
    };
    let row = table.row(&placeholder, stamp, Some(livemode))?;
    table.write(conn, &row, &placeholder)?;
    crate::access::changes::mark(conn, subscriber, livemode)?;
    // Another customer already holds this subscriber: a second one would shadow it
    // (a buyer may name someone else's id on a Payment Link).
    let taken: i64 = on_conn!(conn, c => stripe_customers::table
        .filter(stripe_customers::subscriber_id.eq(subscriber))
        .filter(stripe_customers::livemode.eq(livemode))
        .filter(stripe_customers::deleted.eq(false))
        .filter(stripe_customers::id.ne(&customer))
        .count()
        .get_result(c))?;
    if taken > 0 {
        tracing::warn!(source = %source, %customer, claimed = %subscriber,
            "checkout session names a subscriber that already has a customer; not linked");
        return Ok(());
    }
    // Not one whose Stripe metadata held the key: that metadata alone links it (a
    // link removed there stays removed, whatever an old session says).
    let linked = on_conn!(conn, c => diesel::update(
            stripe_customers::table
                .find(&customer)
                .filter(stripe_customers::subscriber_id.is_null())
                .filter(
                    stripe_customers::subscriber_in_metadata
                        .is_null()
                        .or(stripe_customers::subscriber_in_metadata.eq(false)),
                ),
        )
        .set(stripe_customers::subscriber_id.eq(subscriber))
        .execute(c))?;
    if linked == 1 {
        crate::access::changes::mark_customer(conn, &customer)?;
    }
    if linked == 0 {
        let held: Option<Option<String>> = on_conn!(conn, c => stripe_customers::table
            .find(&customer)
            .select(stripe_customers::subscriber_id)
            .get_result(c)
            .optional())?;
        if let Some(Some(held)) = held.filter(|h| h.as_deref() != Some(subscriber)) {
            tracing::warn!(source = %source, %customer, held = %held, claimed = %subscriber,
                "checkout session names another subscriber for a linked customer; the link is kept");
        }
    }
    Ok(())
}
