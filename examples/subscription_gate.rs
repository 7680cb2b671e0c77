//! A small SaaS on axum: `/pricing` lists the mirrored plans with a monthly/yearly
//! toggle and Subscribe buttons going to Stripe Checkout, `/members` is only for
//! Starter or Pro subscribers (everyone else is sent to `/pricing`), `/account` has
//! the "Manage billing" button (Billing Portal), and `/stripe/webhook` keeps the
//! mirror true. Access is decided from the local database on every request.
//!
//! Run with
//! `STRIPE_API_BASE=$(scripts/localstripe.sh start 8420) STRIPE_SECRET_KEY=sk_test_local STRIPE_WEBHOOK_SECRET=whsec_local cargo run --features axum --example subscription_gate`
//! and open <http://127.0.0.1:8000/pricing?user=ada>. Against localstripe, register
//! the webhook once so payments reach the mirror:
//! `curl -d url=http://127.0.0.1:8000/stripe/webhook -d secret=whsec_local http://127.0.0.1:8420/_config/webhooks/gate`.
//! Against Stripe test mode: `STRIPE_TEST_SECRET_KEY=sk_test_...` and
//! `stripe listen --forward-to localhost:8000/stripe/webhook` (its `whsec_...` as
//! `STRIPE_WEBHOOK_SECRET`). `LISTEN_ADDR` overrides 127.0.0.1:8000.
//! Against localstripe, use a database of its own and remove it whenever localstripe
//! restarts (it forgets everything; the mirror would keep ids it no longer has):
//! `rm -f .run/examples.db*; export DATABASE_URL=sqlite://.run/examples.db`.
//!
//! There is no login: the user is whoever `?user=` names (remembered in a cookie).

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{FromRef, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use stripe_mirror::access::{Denial, Gate, require_subscription};
use stripe_mirror::axum::{Access, AccessRule, webhook_router};
use stripe_mirror::checkout::{Checkout, billing_portal};
use stripe_mirror::{
    Customer, Error, Event, Mirror, Price, Product, Subscriber, Webhooks, bootstrap_demo_products,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mirror = Mirror::from_env().await?;
    if mirror.config().webhook_secrets.is_empty() {
        eprintln!("warning: STRIPE_WEBHOOK_SECRET is not set; every webhook will be refused");
    }
    // The demo catalogue (Basic, Starter, Pro): created once in Stripe, mirrored.
    let catalogue = bootstrap_demo_products(&mirror).await?;
    let members = Members {
        products: catalogue
            .iter()
            .filter(|plan| plan.key != "basic")
            .map(|plan| plan.product.id.clone())
            .collect(),
    };
    let addr: SocketAddr = std::env::var("LISTEN_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8000".into())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("open http://{addr}/pricing?user=ada");
    let app = app(mirror, members).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).await?;
    Ok(())
}

/// The whole app: the pages (which also remember `?user=` in a cookie) and the
/// webhook route.
fn app(mirror: Mirror, members: Members) -> Router {
    let webhooks = Webhooks::new().on_any(|event: Event, _mirror: Mirror| async move {
        println!("webhook {} {}", event.event_type, event.id);
        Ok(())
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/pricing") }))
        .route("/pricing", get(pricing))
        .route("/checkout/{price}", post(checkout))
        .route("/members", get(members_only))
        .route("/account", get(account))
        .route("/account/billing", post(manage_billing))
        .layer(middleware::from_fn(remember_user))
        .merge(webhook_router(mirror.clone(), webhooks))
        .with_state(AppState { mirror, members })
}

#[derive(Clone)]
struct AppState {
    mirror: Mirror,
    members: Members,
}

impl FromRef<AppState> for Mirror {
    fn from_ref(state: &AppState) -> Mirror {
        state.mirror.clone()
    }
}

impl FromRef<AppState> for Members {
    fn from_ref(state: &AppState) -> Members {
        state.members.clone()
    }
}

/// Who may see `/members`: subscribers to Starter or Pro. Everyone else, signed in or
/// not, is sent to the pricing page.
#[derive(Clone)]
struct Members {
    products: Vec<String>,
}

impl AccessRule<AppState> for Members {
    async fn subscriber(&self, parts: &mut Parts, _state: &AppState) -> Option<String> {
        current_user(&parts.uri, &parts.headers)
    }
    fn gate(&self, subscriber: &str) -> Gate {
        let products: Vec<&str> = self.products.iter().map(String::as_str).collect();
        require_subscription(subscriber).to_products(&products)
    }
    fn denied(&self, _denial: &Denial) -> Response {
        Redirect::to("/pricing").into_response()
    }
    fn anonymous(&self) -> Response {
        Redirect::to("/pricing").into_response()
    }
}

/// A demo user: the id is all the mirror needs.
struct User(String);

impl Subscriber for User {
    fn subscriber_id(&self) -> String {
        self.0.clone()
    }
    fn email(&self) -> Option<String> {
        Some(format!("{}@example.com", self.0))
    }
}

/// The user named by `?user=`, else by the `user` cookie. Ids are letters, digits,
/// `-` and `_` (so they need no escaping anywhere).
fn current_user(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'));
    query_user(uri)
        .or_else(|| pair(cookies, "user"))
        .filter(|id| valid_user(id))
}

fn query_user(uri: &Uri) -> Option<String> {
    pair(uri.query().unwrap_or("").split('&'), "user").filter(|id| valid_user(id))
}

fn pair<'a>(mut pairs: impl Iterator<Item = &'a str>, name: &str) -> Option<String> {
    pairs.find_map(|p| match p.trim().split_once('=') {
        Some((k, v)) if k == name => Some(v.to_owned()),
        _ => None,
    })
}

fn valid_user(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `?user=` on any page also sets the `user` cookie.
async fn remember_user(request: Request, next: Next) -> Response {
    let chosen = query_user(request.uri());
    let mut response = next.run(request).await;
    if let Some(user) = chosen {
        let cookie = format!("user={user}; Path=/; SameSite=Lax; HttpOnly");
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

async fn pricing(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Html<String>, AppError> {
    let mut plans = Vec::new();
    for product in Product::list_active(&state.mirror).await? {
        let prices = product.active_prices(&state.mirror).await?;
        let every = |interval: &str| {
            prices
                .iter()
                .find(|p| p.recurring_interval.as_ref().map(|i| i.as_str()) == Some(interval))
                .cloned()
        };
        let (monthly, yearly) = (every("month"), every("year"));
        if monthly.is_some() || yearly.is_some() {
            plans.push((product, monthly, yearly));
        }
    }
    plans.sort_by_key(|(_, monthly, _)| monthly.as_ref().and_then(|p| p.unit_amount));

    let mut cards = String::new();
    for (product, monthly, yearly) in &plans {
        let name = escape(product.name.as_deref().unwrap_or(&product.id));
        let perk = if state.members.products.contains(&product.id) {
            "Opens the members area"
        } else {
            "Pricing page only"
        };
        let _ = write!(
            cards,
            r#"<section class="plan" id="plan-{}"><h2>{name}</h2><p class="perk">{perk}</p>"#,
            escape(&product.id)
        );
        for (price, interval) in [(monthly, "month"), (yearly, "year")] {
            let Some(price) = price else { continue };
            let cents = |p: &Price| p.unit_amount.unwrap_or(0);
            // Yearly: what it saves over twelve monthly payments.
            let saving = match monthly {
                Some(m) if interval == "year" => 12 * cents(m) - cents(price),
                _ => 0,
            };
            let note = if saving > 0 {
                format!("save {} a year", money(saving, price))
            } else {
                format!("billed every {interval}")
            };
            let _ = write!(
                cards,
                r#"<form class="{interval}" method="post" action="/checkout/{id}">
<p class="price"><span class="amount">{amount}</span> / {interval}</p><p class="note">{note}</p>
<button type="submit">Subscribe</button></form>"#,
                id = escape(&price.id),
                amount = money(cents(price), price),
            );
        }
        cards.push_str("</section>");
    }
    if plans.is_empty() {
        cards.push_str("<p>No plans mirrored yet.</p>");
    }
    let body = format!(
        r#"<h1>Pricing</h1>
<p class="toggle"><button type="button" id="interval-month" onclick="show('month')">Monthly</button><button type="button" id="interval-year" onclick="show('year')">Yearly</button></p>
<div class="plans">{cards}</div>
<p class="note">Prices come from the local mirror; Subscribe goes to Stripe Checkout, then <a href="/members">members</a> opens once Stripe's webhooks have arrived.</p>
<script>function show(interval) {{ document.body.dataset.interval = interval; }}</script>"#
    );
    Ok(page(
        "Pricing",
        current_user(&uri, &headers).as_deref(),
        &body,
    ))
}

/// Subscribe: a Checkout Session for the user and the price, then 303 to Stripe's page.
async fn checkout(
    State(state): State<AppState>,
    Path(price_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some(user) = current_user(&uri, &headers) else {
        return Ok(Redirect::to("/pricing").into_response());
    };
    let price = Price::get(&state.mirror, &price_id).await?;
    // The id is the URL's: a price of this mode, on sale, and a plan.
    let live = state.mirror.live_mode();
    let recurring = |p: &Price| {
        p.livemode == live && p.active == Some(true) && !p.deleted && p.recurring_interval.is_some()
    };
    let Some(price) = price.filter(recurring) else {
        return Ok((StatusCode::NOT_FOUND, "no such plan").into_response());
    };
    let app = app_url(&headers);
    let session = Checkout::subscription(&price.id)
        .success_url(&format!("{app}/account?checkout={{CHECKOUT_SESSION_ID}}"))
        .cancel_url(&format!("{app}/pricing"))
        .unless_subscribed()
        .create(&state.mirror, &User(user))
        .await;
    match session {
        Ok(session) => Ok(Redirect::to(&session.url).into_response()),
        // Already subscribed (even past due or unpaid), as Stripe says: changing plans
        // or paying what is owed is the Billing Portal's job, not a second subscription's.
        Err(Error::AlreadySubscribed { .. }) => Ok(Redirect::to("/account").into_response()),
        Err(err) => Err(err.into()),
    }
}

/// Only reached past the gate: `Access` carries the subscription that let the user in.
async fn members_only(
    State(state): State<AppState>,
    access: Access<Members>,
) -> Result<Html<String>, AppError> {
    let mut plans = Vec::new();
    for item in access.subscription.items(&state.mirror).await? {
        if let Some(id) = item.product_id {
            let product = Product::get(&state.mirror, &id).await?;
            plans.push(product.and_then(|p| p.name).unwrap_or(id));
        }
    }
    let body = format!(
        r#"<h1>Members</h1>
<p class="welcome">Welcome, {user}. Your <strong>{plans}</strong> subscription is {status}.</p>
<p>This page is behind <code>Access&lt;Members&gt;</code>: Starter or Pro, checked against the local mirror on every request.</p>"#,
        user = escape(&access.subscriber),
        plans = escape(&plans.join(", ")),
        status = escape(
            access
                .subscription
                .status
                .as_ref()
                .map(|s| s.as_str())
                .unwrap_or("?")
        ),
    );
    Ok(page("Members", Some(&access.subscriber), &body))
}

async fn account(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some(user) = current_user(&uri, &headers) else {
        return Ok(Redirect::to("/pricing").into_response());
    };
    let mirror = &state.mirror;
    let mut body = String::from("<h1>Account</h1>");
    if let Some(session) = pair(uri.query().unwrap_or("").split('&'), "checkout") {
        // Back from Checkout, likely before Stripe's webhooks: mirror the session's
        // subscription now, so the members page opens at once. The id comes from the
        // URL: it only decides what is fetched; access is the gate's, for this user.
        let confirmed = match stripe_mirror::sync_session(mirror, &session).await {
            Ok(status) => status.is_complete(),
            Err(error) => {
                eprintln!("Checkout session {session} not confirmed ({error}); the webhooks will");
                false
            }
        };
        let next = if confirmed {
            r#"your subscription is below; <a href="/members">go to the members page</a>."#
        } else {
            "your subscription shows here as soon as Stripe confirms it (reload in a moment)."
        };
        let _ = write!(
            body,
            r#"<p class="notice">Thank you! Checkout <code>{}</code>: {next}</p>"#,
            escape(&session)
        );
    }
    let customer = Customer::by_subscriber(mirror, &user).await?;
    // The newest valid one (a customer may hold several: two Checkout tabs).
    let subscription = match &customer {
        Some(customer) => customer
            .valid_subscriptions(mirror)
            .await?
            .into_iter()
            .next(),
        None => None,
    };
    let plan = match &subscription {
        Some(sub) => {
            let status = sub.status.as_ref().map(|s| s.as_str()).unwrap_or("?");
            let until = sub
                .current_period_end
                .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                .map(|t| format!(", current period ends {}", t.format("%Y-%m-%d")))
                .unwrap_or_default();
            format!("{}{until}", escape(status))
        }
        None => r#"none: see <a href="/pricing">pricing</a>"#.into(),
    };
    let key = match mirror.publishable_key().await? {
        Some(key) => format!("<code>{}</code>", escape(&key)),
        None => "not set (<code>STRIPE_TEST_PUBLISHABLE_KEY</code>)".into(),
    };
    let _ = write!(
        body,
        r#"<dl><dt>User</dt><dd>{user}</dd><dt>Stripe customer</dt><dd>{customer}</dd>
<dt>Subscription</dt><dd>{plan}</dd><dt>Publishable key (for Stripe.js)</dt><dd>{key}</dd></dl>"#,
        user = escape(&user),
        customer = customer
            .as_ref()
            .map_or_else(|| "none yet".to_owned(), |c| escape(&c.id)),
    );
    if customer.is_some() {
        body.push_str(r#"<form method="post" action="/account/billing"><button type="submit">Manage billing</button></form>"#);
    }
    Ok(page("Account", Some(&user), &body).into_response())
}

/// The Billing Portal for the user's customer; it sends them back to `/account`.
async fn manage_billing(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some(user) = current_user(&uri, &headers) else {
        return Ok(Redirect::to("/pricing").into_response());
    };
    let back = format!("{}/account", app_url(&headers));
    match billing_portal(&state.mirror, &user, &back).await {
        Ok(portal) => Ok(Redirect::to(&portal.url).into_response()),
        // No customer yet: nothing to manage.
        Err(Error::NotFound { .. }) => Ok(Redirect::to("/pricing").into_response()),
        Err(err) => Err(err.into()),
    }
}

/// Where Stripe sends the browser back: this app, as the browser reached it.
fn app_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1:8000");
    format!("http://{host}")
}

/// `cents` in the price's currency: `$15` for whole US dollars, else `15.50 EUR`.
fn money(cents: i64, price: &Price) -> String {
    let currency = price.currency.as_deref().unwrap_or("").to_uppercase();
    match (currency.as_str(), cents % 100) {
        ("USD", 0) => format!("${}", cents / 100),
        ("USD", c) => format!("${}.{c:02}", cents / 100),
        (other, c) => format!("{}.{c:02} {}", cents / 100, escape(other)),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const STYLE: &str = r#"
body { font: 17px/1.5 system-ui, sans-serif; margin: 0; color: #1f2937; background: #f8fafc; }
nav { display: flex; gap: 1.5rem; align-items: center; padding: .9rem 2rem; background: #fff; border-bottom: 1px solid #e5e7eb; }
nav a { color: #374151; text-decoration: none; } nav .brand { font-weight: 700; color: #635bff; }
nav .user { margin-left: auto; color: #6b7280; } nav input { font: inherit; width: 9rem; }
main { max-width: 60rem; margin: 2rem auto; padding: 0 2rem; }
.toggle { display: inline-flex; border: 1px solid #c7d2fe; border-radius: 999px; padding: 3px; background: #fff; }
.toggle button { font: inherit; border: 0; background: none; padding: .3rem 1.2rem; border-radius: 999px; cursor: pointer; }
body:not([data-interval=year]) #interval-month, body[data-interval=year] #interval-year { background: #635bff; color: #fff; }
body:not([data-interval=year]) .year, body[data-interval=year] .month { display: none; }
.plans { display: grid; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr)); gap: 1.5rem; margin: 1.5rem 0; }
.plan { background: #fff; border: 1px solid #e5e7eb; border-radius: 12px; padding: 1.5rem; }
.plan h2 { margin: 0; font-size: 1.3rem; } .perk { margin: 0; color: #4f46e5; font-size: .9rem; }
.price { margin: 1rem 0 0; } .amount { font-size: 2.2rem; font-weight: 700; } .plan .note { margin: 0 0 1rem; font-size: .9rem; }
button[type=submit] { font: inherit; background: #635bff; color: #fff; border: 0; border-radius: 8px; padding: .55rem 1.4rem; cursor: pointer; }
.plan button { width: 100%; } .note, dt { color: #6b7280; } dd { margin: 0 0 .8rem; }
.notice { background: #ecfdf5; border: 1px solid #a7f3d0; padding: .7rem 1rem; border-radius: 8px; }
"#;

/// The layout: a navigation bar with the current user (or a field to pick one).
fn page(title: &str, user: Option<&str>, body: &str) -> Html<String> {
    let who = match user {
        Some(user) => format!("Signed in as <strong>{}</strong>", escape(user)),
        None => r#"<form action="/pricing">Demo user <input name="user" placeholder="ada" pattern="[A-Za-z0-9_\-]{1,64}" required> <button>Use</button></form>"#.into(),
    };
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · stripe-mirror demo</title><style>{STYLE}</style></head>
<body><nav><a class="brand" href="/pricing">stripe-mirror demo</a><a href="/pricing">Pricing</a><a href="/members">Members</a><a href="/account">Account</a><span class="user">{who}</span></nav>
<main>{body}</main></body></html>"#
    ))
}

/// A failure talking to the database or Stripe: a plain 500 page (and the log).
struct AppError(Error);

impl From<Error> for AppError {
    fn from(err: Error) -> Self {
        AppError(err)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        eprintln!("error: {}", self.0);
        let body = format!(
            "<h1>Something went wrong</h1><p>{}</p>",
            escape(&self.0.to_string())
        );
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            page("Error", None, &body),
        )
            .into_response()
    }
}
