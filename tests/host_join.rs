//! A host app's own diesel table joined with the mirror's public schema, on the
//! crate's pool shared with the app (`Mirror::from_pool`), on both backends: the
//! README's "Your tables and the mirror's" example, compiled and run.

mod common;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use serde_json::json;
use stripe_mirror::{Customer, DbPool, Mirror, Subscription};

/// The host app's schema: its own `users`, and the mirror's tables declared here so
/// diesel lets them join.
mod schema {
    diesel::table! {
        users (id) {
            id -> Text,
            email -> Text,
        }
    }
    stripe_mirror::mirror_schema!();
    diesel::allow_tables_to_appear_in_same_query!(users, stripe_customers, stripe_subscriptions);
}
use schema::{stripe_customers, stripe_subscriptions, users};

/// The emails of users with an active (or trialing) test-mode subscription, and the
/// subscription: the README's query.
macro_rules! active_users {
    ($conn:expr) => {
        users::table
            .inner_join(
                stripe_customers::table
                    .on(stripe_customers::subscriber_id.eq(users::id.nullable())),
            )
            .inner_join(
                stripe_subscriptions::table
                    .on(stripe_subscriptions::customer_id.eq(stripe_customers::id.nullable())),
            )
            .filter(stripe_customers::livemode.eq(false))
            .filter(stripe_customers::deleted.eq(false))
            .filter(stripe_subscriptions::deleted.eq(false))
            .filter(stripe_subscriptions::status.eq_any(["active", "trialing"]))
            .select((users::email, stripe_subscriptions::id))
            .load::<(String, String)>($conn)
            .unwrap()
    };
}

async fn fill(mirror: &Mirror) {
    // A host pool's database is not migrated for it: the error says what to run.
    let unmigrated = Customer::by_subscriber(mirror, "user-42")
        .await
        .unwrap_err();
    assert!(
        unmigrated.to_string().contains("run `Mirror::migrate()`"),
        "{unmigrated}"
    );
    mirror.migrate().await.unwrap();
    Customer::sync_from_stripe_data(
        mirror,
        &json!({"id": "cus_1", "object": "customer", "created": 1,
        "metadata": {"stripe_mirror_subscriber": "user-42"}}),
    )
    .await
    .unwrap();
    Subscription::sync_from_stripe_data(
        mirror,
        &json!({"id": "sub_1", "object": "subscription",
        "customer": "cus_1", "status": "active", "items": {"data": []}}),
    )
    .await
    .unwrap();
    // What the query must leave out: an ended subscription, another mode's customer
    // and subscription. And one it must keep: a trial.
    let customers = [
        json!({"id": "cus_7", "object": "customer", "created": 1,
            "metadata": {"stripe_mirror_subscriber": "user-7"}}),
        json!({"id": "cus_7_live", "object": "customer", "created": 1, "livemode": true,
            "metadata": {"stripe_mirror_subscriber": "user-7"}}),
    ];
    for customer in customers {
        Customer::sync_from_stripe_data(mirror, &customer)
            .await
            .unwrap();
    }
    let subscriptions = [
        ("sub_2", "cus_1", "canceled", false),
        ("sub_7", "cus_7", "trialing", false),
        ("sub_7_live", "cus_7_live", "active", true),
    ];
    for (id, customer, status, livemode) in subscriptions {
        let subscription = json!({"id": id, "object": "subscription", "customer": customer,
            "status": status, "livemode": livemode, "items": {"data": []}});
        Subscription::sync_from_stripe_data(mirror, &subscription)
            .await
            .unwrap();
    }
    // Whom each belongs to, from the mirror; nobody for a customer it does not hold.
    let orphan = json!({"id": "sub_orphan", "object": "subscription", "customer": "cus_unknown",
        "status": "active", "items": {"data": []}});
    Subscription::sync_from_stripe_data(mirror, &orphan)
        .await
        .unwrap();
    for (id, owner) in [
        ("sub_1", Some("user-42")),
        ("sub_7", Some("user-7")),
        ("sub_orphan", None),
    ] {
        let subscription = Subscription::get(mirror, id).await.unwrap().unwrap();
        let found = subscription.subscriber_id(mirror).await.unwrap();
        assert_eq!(found.as_deref(), owner, "{id}");
    }
}

#[tokio::test]
async fn a_host_table_joins_the_mirror_on_a_shared_pool() {
    for b in common::backends() {
        let url = b.config.database_url.clone();
        let rows = match url.strip_prefix("sqlite://") {
            Some(path) => {
                let pool = Pool::builder()
                    .connection_customizer(Box::new(stripe_mirror::db::SqlitePragmas))
                    .build(ConnectionManager::<SqliteConnection>::new(path))
                    .unwrap();
                let mirror = Mirror::from_pool(pool.clone().into(), b.config.clone());
                assert!(matches!(mirror.pool(), DbPool::Sqlite(_)));
                fill(&mirror).await;
                let mut conn = pool.get().unwrap();
                diesel::sql_query(
                    "CREATE TABLE users (id TEXT PRIMARY KEY NOT NULL, email TEXT NOT NULL)",
                )
                .execute(&mut conn)
                .unwrap();
                diesel::insert_into(users::table)
                    .values(&vec![
                        (users::id.eq("user-42"), users::email.eq("ada@example.com")),
                        (users::id.eq("user-7"), users::email.eq("bob@example.com")),
                    ])
                    .execute(&mut conn)
                    .unwrap();
                active_users!(&mut *conn)
            }
            #[cfg(feature = "postgres")]
            None => {
                let pool = Pool::builder()
                    .build(ConnectionManager::<PgConnection>::new(&url))
                    .unwrap();
                let mirror = Mirror::from_pool(pool.clone().into(), b.config.clone());
                fill(&mirror).await;
                let mut conn = pool.get().unwrap();
                diesel::sql_query(
                    "CREATE TABLE users (id TEXT PRIMARY KEY NOT NULL, email TEXT NOT NULL)",
                )
                .execute(&mut conn)
                .unwrap();
                diesel::insert_into(users::table)
                    .values(&vec![
                        (users::id.eq("user-42"), users::email.eq("ada@example.com")),
                        (users::id.eq("user-7"), users::email.eq("bob@example.com")),
                    ])
                    .execute(&mut conn)
                    .unwrap();
                active_users!(&mut *conn)
            }
            #[cfg(not(feature = "postgres"))]
            None => unreachable!(),
        };
        let mut rows = rows;
        rows.sort();
        assert_eq!(
            rows,
            [
                ("ada@example.com".to_owned(), "sub_1".to_owned()),
                ("bob@example.com".to_owned(), "sub_7".to_owned())
            ],
            "{}",
            b.name
        );
    }
}
