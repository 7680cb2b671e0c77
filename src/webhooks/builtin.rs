//! The crate's own handling of an event, before any user handler: upsert the
//! mirrored object from the payload, through the stale-write guard, stamped with the
//! event's `created`. Runs in the same transaction that claims the event.

use diesel::prelude::*;
use serde_json::{Value, json};

use crate::db::schema::stripe_customers;
use crate::db::{Conn, on_conn};
use crate::error::Result;
use crate::models::customer::SUBSCRIBER_METADATA_KEY;
use crate::sync::MirrorTable;
use crate::webhooks::event::Event;

/// The table an event's object is mirrored into, if the crate mirrors it: chosen by
/// the object itself, so `customer.discount.*` (a discount) and `invoice.*` are left
/// alone while `customer.subscription.*` lands in subscriptions.
pub(crate) fn table_for(event: &Event) -> Option<&'static MirrorTable> {
    let kind = event.object().get("object").and_then(Value::as_str)?;
    crate::models::table_for_kind(kind)
}

/// Applies the event's built-in sync.
pub(crate) fn apply(conn: &mut Conn<'_>, event: &Event) -> Result<()> {
    if event.event_type == "checkout.session.completed" {
        return link_checkout_customer(conn, event);
    }
    let Some(table) = table_for(event) else {
        return Ok(());
    };
    // A re-fetched object is stamped with its fetch time; the payload with the event's.
    let (mut object, stamp) = match &event.refetched {
        Some((object, fetched_at)) => (object.clone(), *fetched_at),
        None => (event.object().clone(), event.created),
    };
    // `customer.deleted`, `product.deleted`, ... carry the object as it was; a deleted
    // subscription is a canceled one, which its payload already says.
    if event.event_type.ends_with(".deleted")
        && table.final_tombstones
        && table.kind != "subscription"
    {
        object["deleted"] = json!(true);
    }
    let row = table.row(&object, stamp, Some(event.livemode))?;
    table.write(conn, &row, &object)?;
    Ok(())
}

/// Checkout tells which subscriber a customer belongs to (`client_reference_id`, or
/// the subscriber metadata key): store that link, creating a placeholder row when the
/// customer itself has not arrived yet.
fn link_checkout_customer(conn: &mut Conn<'_>, event: &Event) -> Result<()> {
    let session = event.object();
    let customer = match session.get("customer") {
        Some(Value::String(id)) => id.clone(),
        Some(Value::Object(c)) => match c.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => return Ok(()),
        },
        _ => return Ok(()),
    };
    let subscriber = session
        .get("client_reference_id")
        .and_then(Value::as_str)
        .or_else(|| {
            session
                .pointer(&format!("/metadata/{SUBSCRIBER_METADATA_KEY}"))
                .and_then(Value::as_str)
        })
        .or_else(|| {
            session
                .pointer("/metadata/subscriber_id")
                .and_then(Value::as_str)
        });
    let Some(subscriber) = subscriber else {
        return Ok(());
    };
    // Stamp 0: any real data for this customer is fresher than the placeholder.
    let placeholder = json!({ "id": customer, "object": "customer", "livemode": event.livemode });
    let table = &crate::models::customer::CUSTOMERS;
    let row = table.row(&placeholder, 0, Some(event.livemode))?;
    table.write(conn, &row, &placeholder)?;
    on_conn!(conn, c => diesel::update(stripe_customers::table.find(&customer))
        .set(stripe_customers::subscriber_id.eq(subscriber))
        .execute(c))?;
    Ok(())
}
