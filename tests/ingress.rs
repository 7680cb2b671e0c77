//! Ingress (issue #7, item 7): what unauthenticated requests may leave in the database,
//! what error bodies tell the client, the retention call, and the axum route's cap and
//! read timeout. On SQLite and Postgres.

mod common;

use std::time::Duration;

use common::backends;
use serde_json::{Value, json};
use stripe_mirror::webhooks::delivery::REFUSED_BODY_LOG_LIMIT;
use stripe_mirror::webhooks::signature::sign;
use stripe_mirror::webhooks::{Delivery, Outcome, PruneReport, prune};
use stripe_mirror::{Event, Mirror, Product, Secret, WebhookRequest, Webhooks};

const SECRET: &str = "whsec_ingress_0123456789abcdef";

async fn mirror(b: &common::Backend) -> Mirror {
    let mut config = b.config.clone();
    config.webhook_secrets = vec![Secret::new(SECRET)];
    Mirror::connect(config).await.unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn event(id: &str, event_type: &str, object: Value) -> Value {
    json!({"id": id, "object": "event", "type": event_type, "created": now(), "livemode": false,
           "data": {"object": object}})
}

fn signed(body: &[u8]) -> WebhookRequest {
    WebhookRequest::new(body.to_vec())
        .header("Stripe-Signature", sign(body, &Secret::new(SECRET), now()))
        .header("Authorization", "Bearer sk_test_must_not_be_stored")
}

fn post(v: &Value) -> WebhookRequest {
    signed(v.to_string().as_bytes())
}

async fn last_delivery(m: &Mirror) -> Delivery {
    Delivery::recent(m, 1).await.unwrap().remove(0)
}

#[tokio::test]
async fn refused_requests_keep_their_headers_and_at_most_4_kib_of_body() {
    for b in backends() {
        let (m, n) = (mirror(&b).await, b.name);
        let webhooks = Webhooks::new();
        let big = vec![b'x'; 100 * 1024];
        let valid_big = event(
            "evt_big",
            "customer.updated",
            json!({"id": "cus_big", "object": "customer", "metadata": {"note": "y".repeat(100 * 1024)}}),
        )
        .to_string();
        let cases = [
            ("unsigned", WebhookRequest::new(big.clone()), 400),
            (
                "bad signature",
                WebhookRequest::new(big.clone())
                    .header("Stripe-Signature", "t=1,v1=00")
                    .header("Authorization", "Bearer sk_test_must_not_be_stored"),
                400,
            ),
            ("signed, not JSON", signed(&big), 400),
            ("over the cap", signed(&vec![b' '; 2 * 1024 * 1024]), 413),
        ];
        for (name, request, status) in cases {
            let size = request.body.len();
            let r = webhooks.receive(&m, request).await;
            assert_eq!(r.status, status, "{n}: {name}: {:?}", r.error);
            let d = last_delivery(&m).await;
            assert_eq!(d.body.len(), REFUSED_BODY_LOG_LIMIT, "{n}: {name}");
            assert_eq!(d.body_size as usize, size, "{n}: {name}");
            assert!(d.body_truncated, "{n}: {name}");
            assert!(!d.valid, "{n}: {name}");
            assert!(d.error.is_some(), "{n}: {name}");
            assert!(
                !d.headers.contains("sk_test_must_not_be_stored"),
                "{n}: {name}: credentials redacted: {}",
                d.headers
            );
        }
        let d = last_delivery(&m).await;
        assert!(d.headers.contains("stripe-signature"), "{n}: {}", d.headers);

        // A verified delivery's body is stored once, exactly as received, as its event's data.
        let r = webhooks.receive(&m, signed(valid_big.as_bytes())).await;
        assert_eq!(r.outcome, Outcome::Processed, "{n}: {:?}", r.error);
        let d = last_delivery(&m).await;
        assert!(
            d.body.is_empty() && d.body_size as usize == valid_big.len(),
            "{n}"
        );
        assert!(!d.body_truncated && d.valid, "{n}");
        let event_id = d.event_id.clone().unwrap();
        let stored = common::query_text(
            &b.config.database_url,
            &format!("SELECT data AS t FROM stripe_events WHERE id = '{event_id}'"),
        );
        assert_eq!(stored, valid_big, "{n}: the body as received");
        assert!(
            d.headers.contains("[redacted]") && !d.headers.contains("sk_test_must_not_be_stored"),
            "{n}: {}",
            d.headers
        );
    }
}

#[tokio::test]
async fn our_failures_answer_a_public_message_and_log_the_detail() {
    for b in backends() {
        let (m, n) = (mirror(&b).await, b.name);
        // A handler's error is the host's internal text: logged, not sent.
        let webhooks = Webhooks::new().on("invoice.paid", |_e: Event, _m: Mirror| async {
            Err("smtp://mail.internal:25 refused".into())
        });
        let r = webhooks
            .receive(
                &m,
                post(&event(
                    "evt_h",
                    "invoice.paid",
                    json!({"id": "in_1", "object": "invoice"}),
                )),
            )
            .await;
        assert_eq!((r.status, r.outcome), (500, Outcome::HandlerFailed), "{n}");
        assert!(!r.body().contains("mail.internal"), "{n}: {}", r.body());
        assert!(r.body().contains("handler failed"), "{n}: {}", r.body());
        assert!(r.error.as_deref().unwrap().contains("mail.internal"), "{n}");
        let d = last_delivery(&m).await;
        assert!(
            d.error.as_deref().unwrap().contains("mail.internal"),
            "{n}: {d:?}"
        );

        // A request's own fault is said as it is.
        let r = webhooks.receive(&m, WebhookRequest::new("{}")).await;
        assert_eq!(r.status, 400, "{n}");
        assert!(r.body().contains("Stripe-Signature"), "{n}: {}", r.body());

        // The database failing under the pipeline: 5xx, no SQL in the answer.
        common::execute_sql(&b.config.database_url, "DROP TABLE stripe_events");
        let r = webhooks
            .receive(
                &m,
                post(&event(
                    "evt_db",
                    "product.created",
                    json!({"id": "prod_db", "object": "product"}),
                )),
            )
            .await;
        assert!(r.status >= 500, "{n}: {r:?}");
        let body = r.body();
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert!(answer["error"].as_str().is_some(), "{n}: {body}");
        for internal in [
            "stripe_events",
            "table",
            "relation",
            "database error",
            "diesel",
            "SQL",
        ] {
            assert!(!body.contains(internal), "{n}: {internal:?} in {body}");
        }
        assert!(r.error.as_deref().unwrap().contains("stripe_events"), "{n}");
        let d = last_delivery(&m).await;
        assert_eq!(d.status_code, Some(r.status as i32), "{n}");
        assert!(
            d.error.as_deref().unwrap().contains("stripe_events"),
            "{n}: the delivery row holds the detail: {d:?}"
        );
    }
}

#[tokio::test]
async fn prune_removes_old_processed_events_and_keeps_failed_ones() {
    const DAY: i64 = 86_400;
    for b in backends() {
        let (m, n) = (mirror(&b).await, b.name);
        let url = &b.config.database_url;
        let webhooks = Webhooks::new().on("invoice.paid", |_e: Event, _m: Mirror| async {
            Err("not yet".into())
        });
        let ok = event(
            "evt_old_ok",
            "product.created",
            json!({"id": "prod_old", "object": "product"}),
        );
        assert_eq!(webhooks.receive(&m, post(&ok)).await.status, 200, "{n}");
        assert_eq!(
            webhooks.receive(&m, post(&ok)).await.outcome,
            Outcome::Duplicate,
            "{n}"
        );
        let failed = event(
            "evt_old_failed",
            "invoice.paid",
            json!({"id": "in_old", "object": "invoice"}),
        );
        assert_eq!(webhooks.receive(&m, post(&failed)).await.status, 500, "{n}");
        assert_eq!(
            webhooks
                .receive(&m, WebhookRequest::new("old junk"))
                .await
                .status,
            400
        );
        // Forty days pass.
        for table in ["stripe_events", "stripe_webhook_deliveries"] {
            common::execute_sql(
                url,
                &format!(
                    "UPDATE {table} SET received_at = received_at - {}",
                    40 * DAY
                ),
            );
        }
        let new = event(
            "evt_new",
            "product.created",
            json!({"id": "prod_new", "object": "product"}),
        );
        assert_eq!(webhooks.receive(&m, post(&new)).await.status, 200, "{n}");
        assert_eq!(
            webhooks
                .receive(&m, WebhookRequest::new("new junk"))
                .await
                .status,
            400
        );

        let month = Duration::from_secs(30 * DAY as u64);
        let report = prune(&m, month).await.unwrap();
        assert_eq!(
            report,
            PruneReport {
                deliveries: 3,
                events: 1
            },
            "{n}: the old event's two deliveries and the old refused request"
        );
        let mut kept: Vec<_> = Delivery::recent(&m, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.event_id)
            .collect();
        kept.sort();
        assert_eq!(
            kept,
            [
                None,
                Some("evt_new".to_owned()),
                Some("evt_old_failed".to_owned())
            ],
            "{n}"
        );
        let count = |sql: &str| common::query_count(url, sql);
        assert_eq!(
            count(
                "SELECT COUNT(*) AS n FROM stripe_events WHERE id = 'evt_old_failed' AND status = 'failed'"
            ),
            1,
            "{n}: the failed event is kept for a replay"
        );
        assert_eq!(count("SELECT COUNT(*) AS n FROM stripe_events"), 2, "{n}");
        assert!(
            Product::get(&m, "prod_old").await.unwrap().is_some(),
            "{n}: the mirror itself is never pruned"
        );
        assert_eq!(
            prune(&m, month).await.unwrap(),
            PruneReport::default(),
            "{n}: nothing more to remove"
        );
        // Younger than Stripe's retry window is refused, and removes nothing.
        let refused = prune(&m, Duration::ZERO).await.unwrap_err();
        assert!(
            matches!(&refused, stripe_mirror::Error::Config(msg) if msg.contains("3 days")),
            "{n}: {refused}"
        );
        assert_eq!(count("SELECT COUNT(*) AS n FROM stripe_events"), 2, "{n}");
        // Four more days: everything processed goes at the shortest age; the failed
        // event and its delivery stay.
        for table in ["stripe_events", "stripe_webhook_deliveries"] {
            common::execute_sql(
                url,
                &format!("UPDATE {table} SET received_at = received_at - {}", 4 * DAY),
            );
        }
        let all = prune(&m, stripe_mirror::webhooks::MIN_AGE).await.unwrap();
        assert_eq!(all.events, 1, "{n}: evt_new: {all:?}");
        assert_eq!(
            count("SELECT COUNT(*) AS n FROM stripe_events WHERE status = 'failed'"),
            1,
            "{n}"
        );
    }
}

/// The axum route, over a real socket: the request is written by hand so that the
/// body can be longer than what is sent, or slower than the timeout.
#[cfg(feature = "axum")]
mod axum_route {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn serve(m: Mirror, webhooks: Webhooks) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = stripe_mirror::axum::webhook_router(m, webhooks);
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap()
        });
        addr
    }

    /// Sends the head (declaring `declared` bytes of body) and `sent` bytes of body,
    /// then reads the answer without sending more: (status line, JSON body).
    async fn exchange(addr: SocketAddr, declared: usize, sent: usize) -> (String, Value) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /stripe/webhook HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Stripe-Signature: t=1,v1=00\r\nContent-Length: {declared}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b' '; sent]).await.unwrap();
        let mut answer = Vec::new();
        let read = async {
            let mut buf = [0u8; 4096];
            loop {
                let got = stream.read(&mut buf).await.unwrap();
                answer.extend_from_slice(&buf[..got]);
                if got == 0 || answer.ends_with(b"}") {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the server answered without waiting for the rest of the body");
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (
            head.lines().next().unwrap().to_owned(),
            serde_json::from_str(body).unwrap(),
        )
    }

    #[tokio::test]
    async fn the_route_stops_reading_at_the_cap() {
        let b = &backends()[0];
        let cap = 64 * 1024;
        let config = b
            .config
            .clone()
            .webhook_secret(SECRET)
            .webhook_body_limit(cap);
        let m = Mirror::connect(config).await.unwrap();
        let addr = serve(m.clone(), Webhooks::new()).await;
        // Ten megabytes announced, the cap plus one byte sent: the answer comes now.
        let (status, body) = exchange(addr, 10 * 1024 * 1024, cap + 1).await;
        assert!(status.contains(" 413 "), "{status}");
        assert_eq!(body["outcome"], "too_large", "{body}");
        let d = last_delivery(&m).await;
        assert_eq!(d.outcome, "too_large");
        assert_eq!(d.body_size as usize, cap + 1, "at least the cap plus one");
        assert_eq!(d.body.len(), REFUSED_BODY_LOG_LIMIT);
        assert!(d.remote_addr.is_some());
    }

    /// `usize::MAX` means no limit: the whole body is read and checked (it was an
    /// overflow: a panic in debug builds, an empty body in release).
    #[tokio::test]
    async fn a_body_limit_of_usize_max_reads_the_whole_body() {
        let b = &backends()[0];
        let config = b
            .config
            .clone()
            .webhook_secret(SECRET)
            .webhook_body_limit(usize::MAX);
        let m = Mirror::connect(config).await.unwrap();
        let addr = serve(m.clone(), Webhooks::new()).await;
        let (status, body) = exchange(addr, 100, 100).await;
        assert!(
            status.contains(" 400 "),
            "{status}: the signature is refused"
        );
        assert_eq!(body["outcome"], "invalid_signature", "{body}");
        assert_eq!(last_delivery(&m).await.body_size, 100);
    }

    #[tokio::test]
    async fn a_body_slower_than_the_read_timeout_is_answered_408_and_logged() {
        let b = &backends()[0];
        assert_eq!(
            stripe_mirror::Config::default().webhook_read_timeout,
            stripe_mirror::webhooks::DEFAULT_READ_TIMEOUT
        );
        let config = b
            .config
            .clone()
            .webhook_secret(SECRET)
            .webhook_read_timeout(Duration::from_millis(300));
        let m = Mirror::connect(config).await.unwrap();
        let addr = serve(m.clone(), Webhooks::new()).await;
        let started = std::time::Instant::now();
        let (status, body) = exchange(addr, 100, 10).await;
        assert!(status.contains(" 408 "), "{status}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(body["outcome"], "timeout", "{body}");
        let d = last_delivery(&m).await;
        assert_eq!(
            (d.outcome.as_str(), d.status_code),
            (Outcome::Timeout.as_str(), Some(408))
        );
        assert_eq!(d.body_size, 10);
        assert!(!d.valid && d.error.is_some());
    }
    /// `serve` closes a connection whose request head does not arrive within the read
    /// timeout (`axum::serve` waits for it forever: axum#2741), still answers a whole
    /// request with the peer's address logged, and returns once told to stop.
    #[tokio::test]
    async fn serve_closes_a_connection_whose_head_never_ends() {
        let b = &backends()[0];
        let config = b
            .config
            .clone()
            .webhook_secret(SECRET)
            .webhook_read_timeout(Duration::from_millis(300));
        let m = Mirror::connect(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(stripe_mirror::axum::serve_with_shutdown(
            m.clone(),
            Webhooks::new(),
            listener,
            async {
                let _ = stopped.await;
            },
        ));

        // Half a head, then nothing: the server hangs up once the timeout is past.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"POST /stripe/webhook HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 1024];
            loop {
                match slow.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the connection was still open 5 s after half a request head"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );

        // A whole, signed delivery on another connection is answered and logged with
        // its peer.
        let body = event(
            "evt_served",
            "customer.created",
            json!({"id": "cus_served", "object": "customer", "created": now()}),
        )
        .to_string();
        let signature = sign(body.as_bytes(), &Secret::new(SECRET), now());
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /stripe/webhook HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Stripe-Signature: {signature}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
            .await
            .expect("no answer to a whole delivery")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let d = last_delivery(&m).await;
        assert_eq!(d.event_id.as_deref(), Some("evt_served"));
        assert!(
            d.remote_addr
                .as_deref()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{:?}",
            d.remote_addr
        );

        // A delivery in flight when told to stop is still read and answered.
        let mut late = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /stripe/webhook HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Stripe-Signature: t=1,v1=00\r\nContent-Length: 100\r\n\r\n"
        );
        late.write_all(head.as_bytes()).await.unwrap();
        late.write_all(&[b' '; 40]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !server.is_finished(),
            "serve returned with a delivery in flight"
        );
        late.write_all(&[b' '; 60]).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), late.read_to_string(&mut answer))
            .await
            .expect("the delivery in flight was not answered")
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "the bad signature's answer: {answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve did not return once told to stop")
            .unwrap()
            .unwrap();
    }
}

/// An unsigned request's headers get the same budget as its body: 100 headers of 2 KiB
/// leave about 4 KiB in the log, with a note of how many were left out, and the small
/// ones (which say what was sent) are kept.
#[tokio::test]
async fn refused_requests_keep_at_most_4_kib_of_headers() {
    for b in backends() {
        let (m, n) = (mirror(&b).await, b.name);
        let mut request =
            WebhookRequest::new(b"{}".to_vec()).header("Content-Type", "application/json");
        for i in 0..100 {
            request = request.header(format!("X-Filler-{i}"), "h".repeat(2048));
        }
        let r = Webhooks::new().receive(&m, request).await;
        assert_eq!(r.status, 400, "{n}");
        let d = last_delivery(&m).await;
        assert!(!d.valid, "{n}");
        assert!(
            d.headers.len() <= REFUSED_BODY_LOG_LIMIT + 256,
            "{n}: {} bytes of headers kept",
            d.headers.len()
        );
        let headers: Value = serde_json::from_str(&d.headers).unwrap();
        assert_eq!(headers["content-type"], "application/json", "{n}");
        assert!(
            headers["[left out]"]
                .as_str()
                .is_some_and(|s| s.starts_with("99 headers")),
            "{n}: {headers}"
        );
    }
}
