//! Hostile input (issue #11, item 4): property tests over the signature header parser,
//! the event parser and the JSON-to-row mapping with arbitrary bytes and arbitrary JSON
//! (deep nesting, huge numbers, wrong types, non-UTF-8). Never a panic, always a clear
//! error; through the pipeline, every request answered and logged. The pipeline cases
//! run on SQLite and, under scripts/test.sh, on Postgres too.
//!
//! cargo-fuzz needs a nightly toolchain (`-Z sanitizer`), so these properties are the
//! fuzzing this crate runs; proptest shrinks any failure to a small case.

mod common;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, TestRng, TestRunner};
use serde_json::{Map, Value, json};
use stripe_mirror::webhooks::Delivery;
use stripe_mirror::webhooks::signature::{sign, verify};
use stripe_mirror::{
    Customer, Event, Mirror, Price, Product, Secret, Subscription, WebhookRequest, Webhooks,
};

const SECRET: &str = "whsec_hostile_0123456789abcdef";

/// Any JSON: scalars at their extremes, strings with any characters, and nesting.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e308)),
        ".*".prop_map(Value::String),
        "(cus|sub|price|prod|si|evt)_[A-Za-z0-9]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::hash_map(
                "[a-z_]{1,12}|id|object|data|items|price|product|customer|status|created|metadata",
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One of Stripe's example objects with one field, at any depth, replaced by any JSON:
/// wrong types and wrong shapes where the mapping reads.
fn mangled(kind: &'static str) -> impl Strategy<Value = Value> {
    let base = common::fixture(kind);
    let paths = leaf_paths(&base);
    (0..paths.len(), any_json()).prop_map(move |(i, replacement)| {
        let mut v = base.clone();
        if let Some(slot) = v.pointer_mut(&paths[i]) {
            *slot = replacement;
        }
        v
    })
}

fn leaf_paths(v: &Value) -> Vec<String> {
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            Value::Object(m) => m
                .iter()
                .for_each(|(k, c)| walk(c, format!("{at}/{k}"), out)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, c)| walk(c, format!("{at}/{i}"), out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, String::new(), &mut out);
    out.retain(|p| !p.is_empty());
    out
}

/// Headers shaped like `Stripe-Signature` and not: any element, any count, any bytes.
fn any_header() -> impl Strategy<Value = String> {
    let element = prop_oneof![
        "t=-?[0-9]{0,25}",
        "v1=[0-9a-f]{0,70}",
        "v1=[0-9A-Za-z]{0,64}",
        "v0=[0-9a-f]{0,64}",
        "[a-z0-9]{0,4}=[^,]{0,20}",
        "[^,]{0,20}",
    ];
    prop::collection::vec(element, 0..6).prop_map(|parts| parts.join(","))
}

/// A runner with a fixed seed: every run tries the same cases, so a failure in CI is
/// the same failure on a laptop (proptest then shrinks it to a small one).
fn runner(cases: u32) -> TestRunner {
    let config = RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    TestRunner::new_with_rng(config, rng)
}

#[test]
fn the_signature_parser_refuses_every_header_it_did_not_sign_and_never_panics() {
    let secret = Secret::new(SECRET);
    runner(2_000)
        .run(
            &(
                any_header(),
                prop::collection::vec(any::<u8>(), 0..256),
                any::<i64>(),
            ),
            |(header, payload, now)| {
                // Made-up headers never verify; each error says what is wrong.
                let err = verify(&header, &payload, std::slice::from_ref(&secret), 300, now)
                    .expect_err("a header not made with the secret cannot verify");
                prop_assert!(!err.to_string().is_empty());
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn signed_headers_verify_at_any_timestamp_and_any_change_is_refused() {
    let secret = Secret::new(SECRET);
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..512),
        any::<i64>(),
        any::<i64>(),
        0..300i64,
        any::<prop::sample::Index>(),
    );
    runner(2_000)
        .run(&strategy, |(payload, t, now, tolerance, flip)| {
            let header = sign(&payload, &secret, t);
            // Any timestamp, even i64::MIN against i64::MAX: an answer, not an overflow.
            match verify(
                &header,
                &payload,
                std::slice::from_ref(&secret),
                tolerance,
                now,
            ) {
                Ok(at) => prop_assert_eq!(at, t),
                Err(e) => prop_assert!(e.to_string().contains("tolerance"), "{e}"),
            }
            // Without a tolerance it verifies; a changed byte never does.
            prop_assert_eq!(
                verify(&header, &payload, std::slice::from_ref(&secret), 0, now),
                Ok(t)
            );
            if !payload.is_empty() {
                let mut changed = payload.clone();
                changed[flip.index(payload.len())] ^= 0x01;
                prop_assert!(
                    verify(&header, &changed, std::slice::from_ref(&secret), 0, now).is_err()
                );
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_event_parser_gives_an_event_or_a_clear_error_for_any_json() {
    let envelope = any_json().prop_map(|object| {
        json!({"id": "evt_x", "object": "event", "type": "customer.updated",
               "created": 1, "livemode": false, "data": {"object": object}})
    });
    runner(1_000)
        .run(&prop_oneof![any_json(), envelope], |raw| {
            match Event::from_stripe_json(raw) {
                Ok(event) => prop_assert!(!event.id.is_empty()),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_mapping_gives_a_row_or_a_clear_error_for_mangled_objects() {
    fn check<T>(kind: &'static str, map: fn(&Value) -> stripe_mirror::Result<T>) {
        let (ok, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        runner(1_000)
            .run(&prop_oneof![mangled(kind), any_json()], |object| {
                match map(&object) {
                    Ok(_) => ok.set(ok.get() + 1),
                    Err(e) => {
                        refused.set(refused.get() + 1);
                        prop_assert!(!e.to_string().is_empty());
                    }
                }
                Ok(())
            })
            .unwrap();
        // Both roads were taken: the cases reach the mapping, not only its first check.
        let (ok, refused) = (ok.get(), refused.get());
        assert!(
            ok > 0 && refused > 0,
            "{kind}: {ok} mapped, {refused} refused"
        );
    }
    check("customer", Customer::from_stripe_json);
    check("product", Product::from_stripe_json);
    check("price", Price::from_stripe_json);
    check("subscription", Subscription::from_stripe_json);
}

/// Bodies a sender might post: any bytes (non-UTF-8 included), any JSON, events with
/// mangled objects, nesting past the parser's limit, huge numbers.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    let event = |kind: &'static str, event_type: &'static str| {
        (mangled(kind), "[a-zA-Z0-9]{1,10}").prop_map(move |(object, id)| {
            json!({"id": format!("evt_h{id}"), "object": "event", "type": event_type,
                   "created": 1_700_000_000, "livemode": false, "data": {"object": object}})
            .to_string()
            .into_bytes()
        })
    };
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        any_json().prop_map(|v| v.to_string().into_bytes()),
        event("customer", "customer.updated"),
        event("subscription", "customer.subscription.updated"),
        event("price", "price.updated"),
        event("product", "product.updated"),
        (1usize..5_000).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()),
        Just(br#"{"id":"evt_big","object":"event","created":1e999999,"type":"customer.updated","data":{"object":{}}}"#.to_vec()),
        Just(b"{\"id\":\"evt_\xff\xfe\",\"object\":\"event\"}".to_vec()),
    ]
}

#[tokio::test]
async fn every_hostile_delivery_is_answered_with_a_clear_error_and_logged() {
    for b in common::backends() {
        let mut config = b.config.clone();
        config.webhook_secrets = vec![Secret::new(SECRET)];
        let m = Mirror::connect(config).await.unwrap();
        let webhooks = Webhooks::new();
        let cases: Vec<(Vec<u8>, bool)> = {
            // Generate first (the runner is synchronous), then post each body signed
            // (it reaches the parsers) or under a made-up header (the signature check).
            let mut runner = runner(1);
            let strategy = (any_body(), any::<bool>());
            (0..150)
                .map(|_| strategy.new_tree(&mut runner).unwrap().current())
                .collect()
        };
        for (body, signed) in cases {
            let before = Delivery::recent(&m, 1).await.unwrap().first().map(|d| d.id);
            let header = if signed {
                sign(&body, &Secret::new(SECRET), chrono::Utc::now().timestamp())
            } else {
                format!(
                    "t={},v1={}",
                    chrono::Utc::now().timestamp(),
                    "ab".repeat(32)
                )
            };
            let response = webhooks
                .receive(
                    &m,
                    WebhookRequest::new(body.clone()).header("Stripe-Signature", header),
                )
                .await;
            let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            // Bad input is the sender's fault (4xx), not ours; a mapped event is a 200.
            assert!(
                matches!(response.status, 200 | 400),
                "{}: {} for {shown:?}: {:?}",
                b.name,
                response.status,
                response.error
            );
            if !signed {
                assert_eq!(
                    response.status, 400,
                    "{}: unsigned accepted: {shown:?}",
                    b.name
                );
            }
            if response.status != 200 {
                let error = response.error.clone().unwrap_or_default();
                assert!(!error.is_empty(), "{}: no error for {shown:?}", b.name);
            }
            // Logged: one new delivery row, with that outcome.
            let last = Delivery::recent(&m, 1).await.unwrap().remove(0);
            assert!(Some(last.id) != before, "{}: not logged: {shown:?}", b.name);
            assert_eq!(
                last.status_code,
                Some(i32::from(response.status)),
                "{}",
                b.name
            );
            assert_eq!(last.outcome, response.outcome.as_str(), "{}", b.name);
            if response.status != 200 {
                assert!(
                    last.error.is_some_and(|e| !e.is_empty()),
                    "{}: logged error",
                    b.name
                );
            }
        }
    }
}

#[tokio::test]
async fn nul_characters_are_refused_with_a_400_not_a_database_error() {
    // Postgres TEXT cannot hold U+0000; Stripe never sends it. Wherever it appears, the
    // delivery is the sender's fault (400), logged, never our 5xx.
    for b in common::backends() {
        let mut config = b.config.clone();
        config.webhook_secrets = vec![Secret::new(SECRET)];
        let m = Mirror::connect(config).await.unwrap();
        let webhooks = Webhooks::new();
        let event = |id: &str, event_type: &str, object: Value| {
            json!({"id": id, "object": "event", "type": event_type, "created": 1_700_000_000,
                   "livemode": false, "data": {"object": object}})
        };
        let cases = [
            event(
                "evt_nul1",
                "customer.updated",
                json!({"id": "cus_nul", "object": "customer", "email": "a\u{0}@example.com"}),
            ),
            event(
                "evt_nul2",
                "product.updated",
                json!({"id": "prod_nul", "object": "product", "name": "Pro\u{0}"}),
            ),
            event(
                "evt_\u{0}3",
                "customer.updated",
                json!({"id": "cus_nul3", "object": "customer"}),
            ),
            event(
                "evt_nul4",
                "customer.\u{0}updated",
                json!({"id": "cus_nul4", "object": "customer"}),
            ),
            event(
                "evt_nul5",
                "customer.updated",
                json!({"id": "cus_\u{0}5", "object": "customer"}),
            ),
        ];
        for case in cases {
            refused_and_logged(&m, &webhooks, &case, "NUL", b.name).await;
        }
    }
}

/// An event without Stripe's time as an integer `created` is refused (400) and
/// logged: the host's clock must never order the mirror's writes.
#[tokio::test]
async fn an_event_without_stripes_integer_time_is_refused_and_logged() {
    for b in common::backends() {
        let mut config = b.config.clone();
        config.webhook_secrets = vec![Secret::new(SECRET)];
        let m = Mirror::connect(config).await.unwrap();
        let webhooks = Webhooks::new();
        for (n, created) in [
            None,
            Some(json!(1_700_000_000.5)),
            Some(json!("1700000000")),
        ]
        .into_iter()
        .enumerate()
        {
            let mut event = json!({"id": format!("evt_notime{n}"), "object": "event",
                "type": "product.updated", "livemode": false,
                "data": {"object": {"id": format!("prod_notime{n}"), "object": "product", "name": "P"}}});
            if let Some(created) = created {
                event["created"] = created;
            }
            refused_and_logged(&m, &webhooks, &event, "created", b.name).await;
            let id = format!("prod_notime{n}");
            assert!(Product::get(&m, &id).await.unwrap().is_none(), "{}", b.name);
        }
    }
}

/// Settings r2d2 would assert on are `Error::Config` saying which.
#[tokio::test]
async fn impossible_settings_are_config_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let mut config = stripe_mirror::Config::new(url.clone());
    config.pool_size = 0;
    match Mirror::connect(config).await {
        Err(stripe_mirror::Error::Config(message)) => {
            assert!(message.contains("pool_size"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let mut config = stripe_mirror::Config::new(url);
    config.connection_timeout = std::time::Duration::ZERO;
    match Mirror::connect(config).await {
        Err(stripe_mirror::Error::Config(message)) => {
            assert!(message.contains("connection_timeout"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

/// A route pattern whose last character takes several bytes is taken as it is (the
/// check for a misplaced `*` once sliced it mid-character).
#[test]
fn a_pattern_ending_in_a_wide_character_is_taken() {
    let h = |_e: Event, _m: Mirror| async { Ok(()) };
    let _ = Webhooks::new().on("client.créé", h).on("é*", h);
}

/// Delivers `event`, signed, and checks it is refused with a 400 whose error names
/// `reason`, and logged.
async fn refused_and_logged(
    m: &Mirror,
    webhooks: &Webhooks,
    event: &Value,
    reason: &str,
    name: &str,
) {
    let body = event.to_string().into_bytes();
    let header = sign(&body, &Secret::new(SECRET), chrono::Utc::now().timestamp());
    let r = webhooks
        .receive(
            m,
            WebhookRequest::new(body).header("Stripe-Signature", header),
        )
        .await;
    assert_eq!(r.status, 400, "{name}: {event}: {:?}", r.error);
    assert!(
        r.error.as_deref().is_some_and(|e| e.contains(reason)),
        "{name}: {:?}",
        r.error
    );
    let last = Delivery::recent(m, 1).await.unwrap().remove(0);
    assert_eq!(last.status_code, Some(400), "{name}: logged");
}
