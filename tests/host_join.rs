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

/// The emails of users with an active subscription, and the subscription.
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
            .filter(stripe_subscriptions::status.eq("active"))
            .select((users::email, stripe_subscriptions::id))
            .load::<(String, String)>($conn)
            .unwrap()
    };
}

async fn fill(mirror: &Mirror) {
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
        assert_eq!(
            rows,
            [("ada@example.com".to_owned(), "sub_1".to_owned())],
            "{}",
            b.name
        );
    }
}
