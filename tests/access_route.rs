//! The axum extractor `Access<R>` protecting a route with a gate: the subscriber comes
//! from the host's request (here a header), denials answer 402/403 or redirect as the
//! rule says, a granted request reaches the handler with its subscription. Both backends.
#![cfg(feature = "axum")]

mod common;

use axum::extract::FromRef;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Router, routing::get};
use serde_json::json;
use stripe_mirror::access::{Denial, Gate, require_subscription};
use stripe_mirror::axum::{Access, AccessRule};
use stripe_mirror::{Customer, Mirror, Subscription};

/// Pro members; the user id comes from `x-user`; denied requests are answered with a
/// status, or redirected to the pricing page when `redirect` is set. `broken` builds
/// the gate wrong (an empty feature name), as an app's bug would.
#[derive(Clone)]
struct Members {
    redirect: bool,
    broken: bool,
}

impl<S: Send + Sync> AccessRule<S> for Members {
    async fn subscriber(&self, parts: &mut Parts, _state: &S) -> Option<String> {
        parts
            .headers
            .get("x-user")?
            .to_str()
            .ok()
            .map(str::to_owned)
    }
    fn gate(&self, subscriber: &str) -> Gate {
        let gate = require_subscription(subscriber).to_products(&["prod_pro"]);
        if self.broken {
            gate.with_feature("")
        } else {
            gate
        }
    }
    fn denied(&self, denial: &Denial) -> Response {
        if self.redirect {
            Redirect::to("/pricing").into_response()
        } else {
            stripe_mirror::axum::deny(denial)
        }
    }
    // Back where they were going once signed in (the denial keeps `denied`).
    fn anonymous_to(&self, parts: &Parts) -> Response {
        if self.redirect {
            Redirect::to(&format!("/login?next={}", parts.uri.path())).into_response()
        } else {
            <Self as AccessRule<S>>::anonymous(self)
        }
    }
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

async fn members(access: Access<Members>) -> String {
    format!("welcome {} ({})", access.subscriber, access.subscription.id)
}

async fn serve(state: AppState) -> String {
    let app = Router::new()
        .route("/members", get(members))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/members")
}

/// (status, Location header, body) of a GET as `user`.
async fn get_as(url: &str, user: Option<&str>) -> (u16, Option<String>, String) {
    let (url, user) = (url.to_owned(), user.map(str::to_owned));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        let mut request = agent.get(&url);
        if let Some(user) = &user {
            request = request.header("x-user", user);
        }
        let mut response = request.call().unwrap();
        let location = response
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        (
            response.status().as_u16(),
            location,
            response.body_mut().read_to_string().unwrap(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_protected_route_lets_subscribers_in_and_answers_the_rest_as_configured() {
    for b in common::backends() {
        let mirror = b.mirror().await;
        for (user, cus, status, product) in [
            ("pro", "cus_pro", "active", "prod_pro"),
            ("late", "cus_late", "past_due", "prod_pro"),
            ("basic", "cus_basic", "active", "prod_basic"),
        ] {
            Customer::sync_from_stripe_data(
                &mirror,
                &json!({"id": cus, "object": "customer", "created": 1,
                "metadata": {"stripe_mirror_subscriber": user}}),
            )
            .await
            .unwrap();
            Subscription::sync_from_stripe_data(&mirror, &json!({"id": format!("sub_{user}"), "object": "subscription",
                "customer": cus, "status": status, "items": {"data": [{"id": format!("si_{user}"), "object": "subscription_item",
                "price": {"id": "price_1", "product": product}, "current_period_end": 4102444800_i64}]}})).await.unwrap();
        }
        let url = serve(AppState {
            mirror: mirror.clone(),
            members: Members {
                redirect: false,
                broken: false,
            },
        })
        .await;
        let (status, _, body) = get_as(&url, Some("pro")).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "welcome pro (sub_pro)"),
            "{}",
            b.name
        );
        let (status, _, body) = get_as(&url, Some("late")).await;
        assert_eq!(status, 402, "{}: past due: pay", b.name);
        assert!(
            body.contains("\"denied\":\"past_due\""),
            "{}: {body}",
            b.name
        );
        let (status, _, body) = get_as(&url, Some("basic")).await;
        assert_eq!(status, 403, "{}: another plan", b.name);
        assert!(body.contains("wrong_product"), "{body}");
        assert_eq!(get_as(&url, Some("nobody")).await.0, 402, "{}", b.name);
        assert_eq!(
            get_as(&url, None).await.0,
            401,
            "{}: nobody signed in",
            b.name
        );

        let url = serve(AppState {
            mirror: mirror.clone(),
            members: Members {
                redirect: true,
                broken: false,
            },
        })
        .await;
        let (status, location, _) = get_as(&url, Some("basic")).await;
        assert_eq!(
            (status, location.as_deref()),
            (303, Some("/pricing")),
            "{}",
            b.name
        );
        assert_eq!(get_as(&url, Some("pro")).await.0, 200, "{}", b.name);
        let (status, location, _) = get_as(&url, None).await;
        assert_eq!(
            (status, location.as_deref()),
            (303, Some("/login?next=/members")),
            "{}: the request seen",
            b.name
        );

        // A gate built wrong is the app's bug: 500, not 503's "try again".
        let url = serve(AppState {
            mirror,
            members: Members {
                redirect: false,
                broken: true,
            },
        })
        .await;
        let (status, _, body) = get_as(&url, Some("pro")).await;
        assert_eq!(status, 500, "{}: {body}", b.name);
    }
}
