//! The README's guide "Keeping your users in step", compiled and run on both backends:
//! the host's own diesel `users` table, on the pool it shares with the mirror, kept in
//! step by an `on_access_change` hook (`users.plan`, `users.role`), whatever order
//! Stripe's events come in; the host's table joined with the mirror's public schema
//! agrees with it.

mod common;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use serde_json::{Value, json};
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{HandlerError, Outcome};
use stripe_mirror::{AccessChange, Mirror, Secret, WebhookRequest, Webhooks};

mod schema {
    diesel::table! {
        users (id) {
            id -> Text,
            email -> Text,
            plan -> Nullable<Text>,
            role -> Nullable<Text>,
        }
    }
    stripe_mirror::mirror_schema!();
    diesel::allow_tables_to_appear_in_same_query!(users, stripe_customers, stripe_subscriptions);
}
use schema::{stripe_customers, stripe_subscriptions, users};

const SECRET: &str = "whsec_users_in_step";

/// The plans' products and their roles, best first (the README's ranking).
const PLANS: [&str; 3] = ["prod_pro", "prod_starter", "prod_basic"];
const ROLES: [&str; 2] = ["pro", "member"];

/// What the user's row should say: the best product paid for, and the best role granted.
fn plan_and_role(change: &AccessChange) -> (Option<String>, Option<String>) {
    let best = |ranked: &[&str], held: &dyn Fn(&str) -> bool| {
        ranked.iter().find(|x| held(x)).map(|x| x.to_string())
    };
    match change.after.valid {
        true => (
            best(&PLANS, &|p| change.after.has_product(p)),
            best(&ROLES, &|r| change.after.has_role(r)),
        ),
        false => (None, None),
    }
}

/// The guide's hook and report, for one connection type.
macro_rules! host_app {
    ($name:ident, $conn:ty) => {
        mod $name {
            use super::*;
            pub type AppPool = Pool<ConnectionManager<$conn>>;

            /// The hook: keeps `users.plan` and `users.role` in step with the mirror.
            pub async fn keep_user_in_step(
                change: AccessChange,
                _mirror: Mirror,
                pool: AppPool,
            ) -> Result<(), HandlerError> {
                let (plan, role) = plan_and_role(&change);
                tokio::task::spawn_blocking(move || {
                    diesel::update(users::table.find(&change.subscriber))
                        .set((users::plan.eq(plan), users::role.eq(role)))
                        .execute(&mut pool.get()?)?;
                    Ok::<_, HandlerError>(())
                })
                .await?
            }

            /// Each user's plan, and the active (or trialing) test-mode subscription the
            /// mirror holds for them: the README's query.
            pub fn report(pool: &AppPool) -> Vec<(String, Option<String>, Option<String>)> {
                let mut conn = pool.get().unwrap();
                users::table
                    .left_join(
                        stripe_customers::table.on(stripe_customers::subscriber_id
                            .eq(users::id.nullable())
                            .and(stripe_customers::livemode.eq(false))
                            .and(stripe_customers::deleted.eq(false))),
                    )
                    .left_join(
                        stripe_subscriptions::table.on(stripe_subscriptions::customer_id
                            .eq(stripe_customers::id.nullable())
                            .and(stripe_subscriptions::deleted.eq(false))
                            .and(stripe_subscriptions::status.eq_any(["active", "trialing"]))),
                    )
                    .select((users::id, users::plan, stripe_subscriptions::id.nullable()))
                    .order(users::id)
                    .load(&mut conn)
                    .unwrap()
            }

            pub fn create_users(pool: &AppPool) {
                let mut conn = pool.get().unwrap();
                diesel::sql_query(
                    "CREATE TABLE users (id TEXT PRIMARY KEY NOT NULL, email TEXT NOT NULL, plan TEXT, role TEXT)",
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
            }

            pub fn roles(pool: &AppPool) -> Vec<(String, Option<String>)> {
                users::table
                    .select((users::id, users::role))
                    .order(users::id)
                    .load(&mut pool.get().unwrap())
                    .unwrap()
            }
        }
    };
}
host_app!(sqlite_app, SqliteConnection);
#[cfg(feature = "postgres")]
host_app!(pg_app, PgConnection);

fn signed(v: &Value) -> WebhookRequest {
    let body = v.to_string().into_bytes();
    let header = sign(&body, &Secret::new(SECRET), chrono::Utc::now().timestamp());
    WebhookRequest::new(body).header("Stripe-Signature", header)
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> Value {
    json!({"id": id, "object": "event", "type": kind, "created": created, "livemode": false,
           "data": {"object": object}})
}

fn subscription(id: &str, customer: &str, status: &str) -> Value {
    json!({"id": id, "object": "subscription", "livemode": false, "customer": customer, "status": status,
           "created": 1_700_000_100,
           "items": {"object": "list", "data": [{"id": format!("si_{id}"), "object": "subscription_item",
               "subscription": id, "price": {"id": "price_pro", "object": "price", "product": "prod_pro"},
               "current_period_end": 4_102_444_800_i64}]}})
}

/// Stripe's events, out of order: the subscription before its customer, then Checkout
/// linking a second customer to user-7 after its subscription arrived, then a
/// cancellation. Returns the answers.
async fn deliver_all(webhooks: &Webhooks, mirror: &Mirror) -> Vec<Outcome> {
    let t = 1_700_000_100;
    let events = [
        event(
            "evt_prod",
            "product.created",
            t,
            json!({"id": "prod_pro", "object": "product",
            "livemode": false, "name": "Pro", "metadata": {"roles": "pro"}}),
        ),
        event(
            "evt_sub42",
            "customer.subscription.created",
            t,
            subscription("sub_42", "cus_42", "active"),
        ),
        event(
            "evt_cus42",
            "customer.created",
            t + 1,
            json!({"id": "cus_42", "object": "customer",
            "livemode": false, "email": "ada@example.com", "metadata": {"stripe_mirror_subscriber": "user-42"}}),
        ),
        event(
            "evt_cus7",
            "customer.created",
            t,
            json!({"id": "cus_7", "object": "customer",
            "livemode": false, "email": "bob@example.com", "metadata": {}}),
        ),
        event(
            "evt_sub7",
            "customer.subscription.created",
            t,
            subscription("sub_7", "cus_7", "active"),
        ),
        event(
            "evt_cs7",
            "checkout.session.completed",
            t + 2,
            json!({"id": "cs_7", "object": "checkout.session",
            "livemode": false, "mode": "subscription", "status": "complete", "customer": "cus_7",
            "subscription": "sub_7", "client_reference_id": "user-7"}),
        ),
        event(
            "evt_del42",
            "customer.subscription.deleted",
            t + 30,
            subscription("sub_42", "cus_42", "canceled"),
        ),
    ];
    let mut out = Vec::new();
    for e in &events {
        out.push(webhooks.receive(mirror, signed(e)).await.outcome);
    }
    out
}

#[tokio::test]
async fn the_hook_keeps_the_hosts_users_in_step_whatever_the_order() {
    for b in common::backends() {
        let mut config = b.config.clone();
        config.webhook_secrets = vec![Secret::new(SECRET)];
        let url = config.database_url.clone();
        let (outcomes, report, roles) = match url.strip_prefix("sqlite://") {
            Some(path) => {
                let pool = Pool::builder()
                    .connection_customizer(Box::new(stripe_mirror::db::SqlitePragmas))
                    .build(ConnectionManager::<SqliteConnection>::new(path))
                    .unwrap();
                let mirror = Mirror::from_pool(pool.clone().into(), config);
                mirror.migrate().await.unwrap();
                sqlite_app::create_users(&pool);
                let webhooks: Webhooks = Webhooks::new()
                    .with_state(pool.clone())
                    .on_access_change(sqlite_app::keep_user_in_step)
                    .into();
                let outcomes = deliver_all(&webhooks, &mirror).await;
                (
                    outcomes,
                    sqlite_app::report(&pool),
                    sqlite_app::roles(&pool),
                )
            }
            #[cfg(feature = "postgres")]
            None => {
                let pool = Pool::builder()
                    .build(ConnectionManager::<PgConnection>::new(&url))
                    .unwrap();
                let mirror = Mirror::from_pool(pool.clone().into(), config);
                mirror.migrate().await.unwrap();
                pg_app::create_users(&pool);
                let webhooks: Webhooks = Webhooks::new()
                    .with_state(pool.clone())
                    .on_access_change(pg_app::keep_user_in_step)
                    .into();
                let outcomes = deliver_all(&webhooks, &mirror).await;
                (outcomes, pg_app::report(&pool), pg_app::roles(&pool))
            }
            #[cfg(not(feature = "postgres"))]
            None => unreachable!(),
        };
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Processed),
            "{}: {outcomes:?}",
            b.name
        );
        // user-42 subscribed then canceled: no plan; user-7 was linked by Checkout
        // after its subscription arrived: Pro, role pro. The join agrees.
        assert_eq!(
            report,
            [
                ("user-42".to_owned(), None, None),
                (
                    "user-7".to_owned(),
                    Some("prod_pro".to_owned()),
                    Some("sub_7".to_owned())
                ),
            ],
            "{}",
            b.name
        );
        assert_eq!(
            roles,
            [
                ("user-42".to_owned(), None),
                ("user-7".to_owned(), Some("pro".to_owned()))
            ]
        );
    }
}
