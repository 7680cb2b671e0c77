//! The Stripe client: a small HTTP transport (hyper with rustls, the stack
//! async-stripe itself uses) driven by async-stripe's request builders, with the
//! crate's own retry loop (one idempotency key across every attempt of a POST,
//! exponential backoff on 409, 429 and 5xx, honouring `Stripe-Should-Retry` and
//! `Retry-After`) and lenient parsing of the raw response body.
//!
//! The transport is ours rather than async-stripe's `Client` because the response
//! headers matter: `Date` is Stripe's clock, which stamps the data (the host's clock
//! may be minutes off, and then the mirror would refuse or wrongly accept events), and
//! `Request-Id` is what Stripe support asks for.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use stripe_client_core::{RequestBuilder, StripeMethod};

use super::StripeApiError;
use crate::error::{Error, Result};
use crate::secret::Secret;

const DEFAULT_API_BASE: &str = "https://api.stripe.com/";
const USER_AGENT_VALUE: &str = concat!("stripe-mirror/", env!("CARGO_PKG_VERSION"));

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Talks to the Stripe API (or a fake of it at `STRIPE_API_BASE`).
#[derive(Clone)]
pub struct StripeClient {
    http: HyperClient<Connector, Full<Bytes>>,
    api_base: String,
    authorization: HeaderValue,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    clock: crate::Clock,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("api_base", &self.api_base)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// A successful response: the object, and when Stripe answered (unix seconds on
/// Stripe's clock, from the `Date` header; see [`stripe_time`]).
#[derive(Debug)]
pub(crate) struct Answer {
    pub value: Value,
    pub at: i64,
    /// The answer's text holds no `\u0000`, the only way JSON writes U+0000: no
    /// string of `value` holds one (found with one scan of the bytes, not a walk).
    pub nul_free: bool,
}

/// One attempt's raw outcome.
struct Reply {
    status: u16,
    /// Stripe's `Date`, less the whole seconds the answer took: no later than the
    /// second after Stripe read what it answers.
    date: Option<i64>,
    should_retry: Option<bool>,
    /// `Retry-After` (seconds or an HTTP date), how long the server asks us to wait.
    retry_after: Option<Duration>,
    request_id: Option<String>,
    /// `Idempotent-Replayed: true`: the stored answer to an earlier request.
    replayed: bool,
    body: Bytes,
}

impl StripeClient {
    /// A client for `key` at `api_base` (Stripe's own API when `None`).
    pub fn new(key: &Secret, api_base: Option<&str>, timeout: Duration) -> Result<Self> {
        let mut api_base = api_base.unwrap_or(DEFAULT_API_BASE).trim().to_owned();
        if !api_base.ends_with('/') {
            api_base.push('/');
        }
        api_base.parse::<hyper::Uri>().map_err(|e| {
            Error::Config(format!("STRIPE_API_BASE {api_base:?} is not a URL: {e}"))
        })?;
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(|_| {
                Error::Config(format!("Stripe key {key} holds characters a header cannot"))
            })?;
        authorization.set_sensitive(true);
        // ring named here, not rustls's process-wide default: a host that also links
        // aws-lc-rs (rustls's default backend) and installs neither would make
        // rustls panic when it has to choose.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| Error::Config(format!("TLS for Stripe could not be set up: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(StripeClient {
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
            api_base,
            authorization,
            timeout,
            retries: 4,
            backoff: Duration::from_millis(500),
            clock: crate::Clock::system(),
        })
    }

    /// Sets how many times a failed request is retried and the first backoff (doubling).
    pub fn with_retries(mut self, retries: u32, first_backoff: Duration) -> Self {
        self.retries = retries;
        self.backoff = first_backoff;
        self
    }

    /// The host clock, read only when an answer has no `Date` and its object carries
    /// no time of its own.
    pub fn with_clock(mut self, clock: crate::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// `GET /v1{path}` with query parameters (a JSON object, Stripe's bracket encoding).
    pub async fn get(&self, path: &str, query: &Value, object: Option<&str>) -> Result<Value> {
        Ok(self.get_at(path, query, object).await?.value)
    }

    /// `GET`, with when Stripe answered.
    pub(crate) async fn get_at(
        &self,
        path: &str,
        query: &Value,
        object: Option<&str>,
    ) -> Result<Answer> {
        let mut req = RequestBuilder::new(StripeMethod::Get, path);
        req.query = Some(form_encoded(query, "query")?);
        self.send(req, object, None).await
    }

    /// Every object of a Stripe list: `GET /v1{path}` page after page (`query` and
    /// `limit` 100, then `starting_after`), with Stripe's time of the first page, a
    /// lower bound of when each object was read. `kind` names the objects in errors.
    pub(crate) async fn list_all(
        &self,
        path: &str,
        mut query: serde_json::Map<String, Value>,
        object: &str,
        kind: &'static str,
    ) -> Result<(Vec<Value>, i64)> {
        query.insert("limit".into(), Value::from(100));
        let (mut all, mut first) = (Vec::new(), None);
        loop {
            let page = self
                .get_at(path, &Value::Object(query.clone()), Some(object))
                .await;
            // A later page's 404: what it starts after is gone, not the list's owner.
            let page = if first.is_some() {
                page.map_err(changed_while_read)?
            } else {
                page?
            };
            first.get_or_insert(page.at);
            let data = match page.value.get("data") {
                Some(Value::Array(data)) => data.clone(),
                _ => {
                    return Err(Error::mapping(
                        "list",
                        kind,
                        "data",
                        "is not an array (not a list page)",
                    ));
                }
            };
            let has_more = page.value.get("has_more") == Some(&Value::Bool(true));
            let asked = query.get("starting_after").and_then(Value::as_str);
            let next = next_after(&data, has_more, asked, kind)?;
            all.extend(data);
            match next {
                Some(last) => query.insert("starting_after".into(), Value::String(last)),
                None => return Ok((all, first.unwrap_or_default())),
            };
        }
    }

    /// `POST /v1{path}` with a form (a JSON object); `idempotency_key` makes the create
    /// safe to repeat, otherwise one random key is shared by all retries.
    pub async fn post(
        &self,
        path: &str,
        form: &Value,
        idempotency_key: Option<String>,
        object: Option<&str>,
    ) -> Result<Value> {
        Ok(self
            .post_at(path, form, idempotency_key, object)
            .await?
            .value)
    }

    /// `POST`, with when Stripe answered.
    pub(crate) async fn post_at(
        &self,
        path: &str,
        form: &Value,
        idempotency_key: Option<String>,
        object: Option<&str>,
    ) -> Result<Answer> {
        let key = match idempotency_key {
            Some(k) => stripe_client_core::IdempotencyKey::new(k)
                .map_err(|e| Error::Config(format!("idempotency key: {e}")))?,
            None => stripe_client_core::IdempotencyKey::new_uuid_v4(),
        };
        let mut req = RequestBuilder::new(StripeMethod::Post, path);
        req.body = Some(form_encoded(form, "form")?);
        self.send(req, object, Some(key.as_str().to_owned())).await
    }

    /// Sends one of async-stripe's typed requests (`CreateCustomer::new()...`) and
    /// returns the raw object, read leniently, with Stripe's time of the answer. A
    /// POST carries `idempotency_key` (derived from what it creates) or one random key
    /// shared by its retries.
    pub(crate) async fn request(
        &self,
        request: &impl stripe_client_core::StripeRequest,
        idempotency_key: Option<String>,
        object: Option<&str>,
    ) -> Result<Answer> {
        let req = request.build();
        let key = match (req.method, idempotency_key) {
            (StripeMethod::Post, Some(k)) => Some(
                stripe_client_core::IdempotencyKey::new(k)
                    .map_err(|e| Error::Config(format!("idempotency key: {e}")))?,
            ),
            (StripeMethod::Post, None) => Some(stripe_client_core::IdempotencyKey::new_uuid_v4()),
            _ => None,
        };
        self.send(req, object, key.map(|k| k.as_str().to_owned()))
            .await
    }

    /// Sends a GET built by async-stripe (`RetrieveCustomer::new(id).build()`).
    pub(crate) async fn get_built(
        &self,
        req: RequestBuilder,
        object: Option<&str>,
    ) -> Result<Answer> {
        self.send(req, object, None).await
    }

    /// `DELETE /v1{path}`.
    pub async fn delete(&self, path: &str, object: Option<&str>) -> Result<Value> {
        Ok(self.delete_at(path, object).await?.value)
    }

    /// `DELETE`, with when Stripe answered.
    pub(crate) async fn delete_at(&self, path: &str, object: Option<&str>) -> Result<Answer> {
        let req = RequestBuilder::new(StripeMethod::Delete, path);
        self.send(req, object, None).await
    }

    /// The HTTP request of `req`; an error is ours (an id that makes no URI, a key no
    /// header can carry): no retry mends it.
    fn build(
        &self,
        req: &RequestBuilder,
        idempotency_key: Option<&str>,
    ) -> std::result::Result<hyper::Request<Full<Bytes>>, String> {
        let mut uri = format!("{}v1{}", self.api_base, req.path);
        if let Some(query) = &req.query {
            uri.push('?');
            uri.push_str(query);
        }
        let mut builder = hyper::Request::builder()
            .method(match req.method {
                StripeMethod::Get => hyper::Method::GET,
                StripeMethod::Post => hyper::Method::POST,
                StripeMethod::Delete => hyper::Method::DELETE,
            })
            .uri(uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(USER_AGENT, USER_AGENT_VALUE)
            .header("stripe-version", stripe_shared::version::VERSION.as_str());
        if let Some(key) = idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        if req.body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        builder
            .body(Full::new(Bytes::from(req.body.clone().unwrap_or_default())))
            .map_err(|e| format!("bad request: {e}"))
    }

    async fn attempt(
        &self,
        req: &RequestBuilder,
        idempotency_key: Option<&str>,
    ) -> std::result::Result<Reply, (String, bool)> {
        // The error, and whether another attempt may go better (a network failure,
        // not an answer too large).
        let request = self.build(req, idempotency_key).map_err(|e| (e, false))?;
        let exchange = async {
            let sent = std::time::Instant::now();
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| (e.to_string(), true))?;
            let waited = sent.elapsed();
            let headers = response.headers();
            let text = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let (status, date) = (
                response.status().as_u16(),
                text("date").and_then(|d| stripe_time(&d)),
            );
            let should_retry = text("stripe-should-retry").and_then(|v| v.parse().ok());
            let retry_after = text("retry-after").and_then(|v| retry_after(&v, date));
            // `Date` is when Stripe answered; it read the object up to `waited` before.
            // A slow answer (a list page of expanded objects can take seconds) is stamped
            // back by its whole seconds, so an event of the seconds between the read and
            // the answer is not taken for older than what was read (a sub-second gap is
            // a same-second tie, which the guard settles by content).
            let date = date.map(|d| d - i64::try_from(waited.as_secs()).unwrap_or(i64::MAX / 2));
            let request_id = text("request-id");
            let replayed = text("idempotent-replayed").as_deref() == Some("true");
            // Bounded: a proxy or a fake answering gigabytes must not fill memory.
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| match e.is::<http_body_util::LengthLimitError>() {
                    true => (
                        format!("the answer is larger than {} MiB", MAX_ANSWER >> 20),
                        false,
                    ),
                    false => (e.to_string(), true),
                })?
                .to_bytes();
            Ok(Reply {
                status,
                date,
                should_retry,
                retry_after,
                request_id,
                replayed,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err((
                    format!("timeout: no answer within {:?}", self.timeout),
                    true,
                ))
            })
    }

    async fn send(
        &self,
        req: RequestBuilder,
        object: Option<&str>,
        idempotency_key: Option<String>,
    ) -> Result<Answer> {
        let method = match req.method {
            StripeMethod::Get => "GET",
            StripeMethod::Post => "POST",
            StripeMethod::Delete => "DELETE",
        };
        let request = format!("{method} /v1{}", req.path);
        if let Err(ours) = self.build(&req, idempotency_key.as_deref()) {
            return Err(api_error(&request, object, None, ours));
        }
        let mut attempt = 0;
        loop {
            let failure = match self.attempt(&req, idempotency_key.as_deref()).await {
                Ok(reply) if (200..300).contains(&reply.status) => {
                    let value: Value = serde_json::from_slice(&reply.body).map_err(|e| {
                        api_error(
                            &request,
                            object,
                            Some(reply.status),
                            format!("response is not JSON ({e}): {}", preview(&reply.body)),
                        )
                    })?;
                    // No `Date` (a proxy dropped it): the newest time the object carries,
                    // a lower bound of Stripe's clock; the host's clock only as a last resort.
                    // A replayed answer (same idempotency key) is as old as the first one.
                    let at = reply
                        .date
                        .filter(|_| !reply.replayed)
                        .or_else(|| newest_timestamp(&value))
                        .unwrap_or_else(|| self.clock.now());
                    let nul_free = crate::sync::fields::text_nul_free(&reply.body);
                    return Ok(Answer {
                        value,
                        at,
                        nul_free,
                    });
                }
                Ok(reply) => {
                    let retry = reply
                        .should_retry
                        .unwrap_or(matches!(reply.status, 409 | 429 | 500..=599));
                    let asked = reply.retry_after;
                    (retry, asked, stripe_error(&request, object, &reply))
                }
                Err((network, retry)) => (retry, None, api_error(&request, object, None, network)),
            };
            let (retry, asked, err) = failure;
            if retry && attempt < self.retries {
                // Our own doubling backoff, or longer when the server asks for it
                // (`Retry-After`), never more than 30 s: a retry past that is
                // better left to the caller (Stripe's redelivery, the next sync).
                let wait = retry_wait(self.backoff, attempt, asked);
                tracing::warn!(%request, attempt, error = %err, "Stripe request failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                attempt += 1;
                continue;
            }
            return Err(match err {
                Error::Stripe(mut e) if attempt > 0 => {
                    e.message
                        .push_str(&format!(" (after {} attempts)", attempt + 1));
                    Error::Stripe(e)
                }
                other => other,
            });
        }
    }
}

/// The largest answer read: a page of 100 expanded objects is a few MiB.
const MAX_ANSWER: usize = 32 << 20;

/// The longest `Retry-After` we honour within one call. Webhook deliveries bound their
/// fetches as a whole (10 s) on top of this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How long to wait before retry `attempt + 1`: our doubling backoff, or what the
/// server asked for when longer, and never more than [`MAX_RETRY_AFTER`].
fn retry_wait(backoff: Duration, attempt: u32, asked: Option<Duration>) -> Duration {
    let ours = backoff
        .saturating_mul(2u32.saturating_pow(attempt))
        .min(MAX_RETRY_AFTER);
    asked.map_or(ours, |a| a.min(MAX_RETRY_AFTER).max(ours))
}

/// Reads a `Retry-After` header: delay-seconds (`"2"`, `"0.5"` as some proxies send)
/// or an HTTP date, measured from the response's own `Date` when it has one (so the
/// host's clock skew does not matter) and from the host clock otherwise.
fn retry_after(value: &str, date: Option<i64>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())));
    }
    let at = stripe_time(value)?;
    let now = date.unwrap_or_else(|| chrono::Utc::now().timestamp());
    Some(Duration::from_secs(u64::try_from(at - now).unwrap_or(0)))
}

/// Parses an HTTP `Date` header (`Wed, 25 Nov 2026 23:11:27 GMT`) to unix seconds.
pub(crate) fn stripe_time(date: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc2822(date.trim())
        .ok()
        .map(|d| d.timestamp())
}

/// The newest unix time among the fields an object carries at its top level that say
/// something happened (so the object was read after it). Not `billing_cycle_anchor`:
/// a trial's end, or a date set ahead, would stamp the row in the future and make
/// every event until then look older.
pub(crate) fn newest_timestamp(value: &Value) -> Option<i64> {
    const FIELDS: [&str; 7] = [
        "created",
        "updated",
        "start_date",
        "current_period_start",
        "canceled_at",
        "ended_at",
        "trial_start",
    ];
    FIELDS.iter().filter_map(|f| value.get(f)?.as_i64()).max()
}

fn stripe_error(request: &str, object: Option<&str>, reply: &Reply) -> Error {
    let parsed: Option<Value> = serde_json::from_slice(&reply.body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |name: &str| {
        error
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let request_id = reply.request_id.clone().or_else(|| {
        field("request_log_url")
            .as_deref()
            .and_then(|u| u.rsplit('/').next())
            .and_then(|s| s.split('?').next())
            .filter(|s| s.starts_with("req_"))
            .map(str::to_owned)
    });
    Error::Stripe(Box::new(StripeApiError {
        request: request.to_owned(),
        object: object.map(str::to_owned),
        status: Some(reply.status),
        error_type: field("type"),
        code: field("code"),
        message: field("message").unwrap_or_else(|| {
            if error.is_some() {
                "no message".to_owned()
            } else {
                format!("not a Stripe error body: {}", preview(&reply.body))
            }
        }),
        request_id,
        at: reply.date,
    }))
}

fn preview(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// `value` in Stripe's form encoding (async-stripe's, which panics where this errs:
/// nesting deeper than 5 levels, a value that is not a map).
fn form_encoded(value: &Value, what: &str) -> Result<String> {
    serde_qs::to_string(value).map_err(|e| {
        Error::Config(format!(
            "the {what} cannot be sent in Stripe's form encoding: {e}"
        ))
    })
}

fn api_error(request: &str, object: Option<&str>, status: Option<u16>, message: String) -> Error {
    Error::Stripe(Box::new(StripeApiError {
        request: request.to_owned(),
        object: object.map(str::to_owned),
        status,
        message,
        ..Default::default()
    }))
}

/// True when Stripe said the object does not exist: a 404 for a resource, not for an
/// unknown URL (a misconfigured `STRIPE_API_BASE`) or a proxy's page. It turns rows
/// into final tombstones, so it is strict.
pub(crate) fn is_missing(err: &Error) -> bool {
    matches!(err, Error::Stripe(e) if e.status == Some(404)
    && match e.code.as_deref() {
        Some(code) => code == "resource_missing",
        // Fakes (localstripe) send no code; Stripe's unknown-URL error has none either.
        None => e.error_type.is_some() && !e.message.starts_with("Unrecognized request URL"),
    })
}

/// A 404 met while reading the rest of an object (a later page of a list, a
/// subscription's items) says the list changed while it was read, not that the object
/// is gone: reported as a conflict (409), which is worth trying again and never turns
/// into a tombstone. Other errors are returned as they are.
pub(crate) fn changed_while_read(err: Error) -> Error {
    match err {
        Error::Stripe(mut e) if e.status == Some(404) => {
            e.status = Some(409);
            e.message = format!(
                "{} (a 404 while reading the rest of the object: it changed meanwhile; try again)",
                e.message
            );
            Error::Stripe(e)
        }
        other => other,
    }
}

/// Where the next page of a Stripe list starts: after the last of `items` when the page
/// says it `has_more`, `None` at the end. A page that says it has more but whose last
/// object has no id, or is the one it was asked to start after (a server that ignores
/// `starting_after`), is an error: ending there would report a partial list as whole,
/// and asking again would loop for ever.
pub(crate) fn next_after(
    items: &[serde_json::Value],
    has_more: bool,
    asked_after: Option<&str>,
    kind: &'static str,
) -> Result<Option<String>> {
    if !has_more {
        return Ok(None);
    }
    let list = |problem: &str| Error::mapping("list", kind, "data", problem);
    match items
        .last()
        .and_then(|o| o.get("id"))
        .and_then(|id| id.as_str())
    {
        None => Err(list("has more after it but its last object has no id")),
        Some(last) if Some(last) == asked_after => Err(list(
            "has more, but ends with the object it was asked to start after: the server \
             ignores `starting_after`",
        )),
        Some(last) => Ok(Some(last.to_owned())),
    }
}

/// Whether a create failed because the object is there already: made by another
/// process between our look and our create. Stripe says so with a 400
/// (`resource_already_exists`); localstripe with a 409 (after the client's retries,
/// which Stripe's own 409, a request of the same key in flight, gets first).
pub(crate) fn already_exists(err: &Error) -> bool {
    matches!(err, Error::Stripe(e)
        if e.code.as_deref() == Some("resource_already_exists")
        || e.message.contains("already exists")
        || e.status == Some(409))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list goes on after its last id while it has more, and a page that cannot be
    /// gone past (no id, or the same cursor again) is an error, never an end or a loop.
    #[test]
    fn the_next_page_starts_after_the_last_id_and_must_move() {
        let page = [
            serde_json::json!({"id": "a"}),
            serde_json::json!({"id": "b"}),
        ];
        assert_eq!(next_after(&page, false, None, "customer").unwrap(), None);
        assert_eq!(
            next_after(&page, true, None, "customer")
                .unwrap()
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            next_after(&page, true, Some("a"), "customer")
                .unwrap()
                .as_deref(),
            Some("b")
        );
        let stuck = next_after(&page, true, Some("b"), "customer").unwrap_err();
        assert!(stuck.to_string().contains("starting_after"), "{stuck}");
        let no_id = [serde_json::json!({"name": "x"})];
        let err = next_after(&no_id, true, None, "customer").unwrap_err();
        assert!(err.to_string().contains("no id"), "{err}");
        assert!(next_after(&[], true, None, "customer").is_err());
    }

    /// A form async-stripe cannot encode (nested deeper than 5 levels) is an error,
    /// not a panic of `StripeClient::post`.
    #[test]
    fn a_form_too_deep_is_an_error() {
        let deep = serde_json::json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}});
        let err = form_encoded(&deep, "form").unwrap_err().to_string();
        assert!(err.contains("form encoding"), "{err}");
        let flat = serde_json::json!({"metadata": {"k": "v"}, "limit": 10});
        assert_eq!(
            form_encoded(&flat, "form").unwrap(),
            "limit=10&metadata[k]=v"
        );
    }

    #[test]
    fn an_object_made_meanwhile_already_exists() {
        let answer = |status: u16, code: Option<&str>, message: &str| {
            Error::Stripe(Box::new(StripeApiError {
                request: "POST /v1/products".into(),
                status: Some(status),
                error_type: Some("invalid_request_error".into()),
                code: code.map(str::to_owned),
                message: message.into(),
                ..Default::default()
            }))
        };
        let stripe = answer(
            400,
            Some("resource_already_exists"),
            "Product already exists.",
        );
        assert!(already_exists(&stripe));
        assert!(already_exists(&answer(409, None, "Conflict")));
        assert!(!already_exists(&answer(
            400,
            Some("parameter_missing"),
            "name"
        )));
        assert!(!already_exists(&answer(500, None, "oops")));
    }

    fn not_found(code: Option<&str>, message: &str) -> Error {
        Error::Stripe(Box::new(StripeApiError {
            request: "GET /v1/customers/cus_1".into(),
            status: Some(404),
            error_type: Some("invalid_request_error".into()),
            code: code.map(str::to_owned),
            message: message.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn only_a_missing_resource_is_missing() {
        assert!(is_missing(&not_found(
            Some("resource_missing"),
            "No such customer: 'cus_1'"
        )));
        assert!(is_missing(&not_found(None, "Not Found")));
        // A wrong STRIPE_API_BASE must not turn rows into tombstones.
        assert!(!is_missing(&not_found(
            None,
            "Unrecognized request URL (GET: /v1/v1/customers/cus_1)"
        )));
        assert!(!is_missing(&not_found(Some("url_invalid"), "nope")));
        let mut proxy = not_found(None, "not a Stripe error body: <html>");
        if let Error::Stripe(e) = &mut proxy {
            e.error_type = None;
        }
        assert!(!is_missing(&proxy));
    }

    #[test]
    fn http_dates_read_as_unix_seconds() {
        assert_eq!(
            stripe_time("Wed, 25 Nov 2026 23:11:27 GMT"),
            Some(1_795_648_287)
        );
        assert_eq!(stripe_time("yesterday"), None);
    }

    #[test]
    fn retry_waits_double_and_never_pass_the_cap() {
        let half = Duration::from_millis(500);
        assert_eq!(retry_wait(half, 0, None), half);
        assert_eq!(retry_wait(half, 3, None), Duration::from_secs(4));
        // Doubling alone would wait 256 s, then overflow: the cap holds for any count.
        assert_eq!(retry_wait(half, 9, None), MAX_RETRY_AFTER);
        assert_eq!(retry_wait(half, u32::MAX, None), MAX_RETRY_AFTER);
        // The server's `Retry-After` when longer than ours, capped alike.
        let asked = |s| Some(Duration::from_secs(s));
        assert_eq!(retry_wait(half, 0, asked(3)), Duration::from_secs(3));
        assert_eq!(retry_wait(half, 3, asked(1)), Duration::from_secs(4));
        assert_eq!(retry_wait(half, 0, asked(600)), MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_refuses_nonsense() {
        let secs = |v| retry_after(v, Some(1_795_648_287));
        assert_eq!(secs("2"), Some(Duration::from_secs(2)));
        assert_eq!(secs(" 0.25 "), Some(Duration::from_millis(250)));
        assert_eq!(secs("100000"), Some(MAX_RETRY_AFTER));
        // A date, measured from the response's own Date: 3 s later.
        assert_eq!(
            secs("Wed, 25 Nov 2026 23:11:30 GMT"),
            Some(Duration::from_secs(3))
        );
        // A date in the past: no wait beyond our own backoff.
        assert_eq!(secs("Wed, 25 Nov 2026 23:11:00 GMT"), Some(Duration::ZERO));
        for bad in ["-1", "NaN", "inf", "soon", ""] {
            assert_eq!(secs(bad), None, "{bad:?}");
        }
    }
}
