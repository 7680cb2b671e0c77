//! The Stripe client: async-stripe's HTTP client underneath, with the crate's own
//! retry loop (one idempotency key across every attempt of a POST, exponential
//! backoff on 409, 429 and 5xx) and lenient parsing of the raw response body.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use stripe_client_core::{IdempotencyKey, RequestBuilder, RequestStrategy, StripeMethod};

use super::StripeApiError;
use crate::error::{Error, Result};
use crate::secret::Secret;

/// Talks to the Stripe API (or a fake of it at `STRIPE_API_BASE`).
#[derive(Clone)]
pub struct StripeClient {
    inner: stripe::Client,
    retries: u32,
    backoff: Duration,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// Captures the raw body of a response, so nothing the typed structs do not know is lost.
struct Raw<'a> {
    client: &'a stripe::Client,
    body: Mutex<Option<Bytes>>,
}

impl stripe_client_core::StripeClient for Raw<'_> {
    type Err = stripe::StripeError;

    async fn execute(
        &self,
        req: stripe_client_core::CustomizedStripeRequest,
    ) -> std::result::Result<Bytes, Self::Err> {
        let body = self.client.execute(req).await?;
        *self.body.lock().expect("not poisoned") = Some(body);
        // The typed layer parses this placeholder; the real body is kept above.
        Ok(Bytes::from_static(b"null"))
    }
}

fn retryable(err: &stripe::StripeError) -> bool {
    match err {
        stripe::StripeError::Stripe(_, status) => matches!(status, 409 | 429 | 500..=599),
        stripe::StripeError::ClientError(_) | stripe::StripeError::Timeout => true,
        // An error status whose body was not Stripe's error JSON (a proxy's 502 page).
        stripe::StripeError::JSONDeserialize(_) => true,
        stripe::StripeError::ConfigError(_) => false,
    }
}

impl StripeClient {
    /// A client for `key` at `api_base` (Stripe's own API when `None`).
    pub fn new(key: &Secret, api_base: Option<&str>, timeout: Duration) -> Result<Self> {
        let mut builder = stripe::ClientBuilder::new(key.expose())
            .request_strategy(RequestStrategy::Once)
            .timeout(timeout);
        if let Some(base) = api_base {
            builder = builder.url(base);
        }
        let inner = builder
            .build()
            .map_err(|e| Error::Config(format!("Stripe client for key {key}: {e}")))?;
        Ok(StripeClient {
            inner,
            retries: 4,
            backoff: Duration::from_millis(500),
        })
    }

    /// Sets how many times a failed request is retried and the first backoff (doubling).
    pub fn with_retries(mut self, retries: u32, first_backoff: Duration) -> Self {
        self.retries = retries;
        self.backoff = first_backoff;
        self
    }

    /// `GET /v1{path}` with query parameters (a JSON object, Stripe's bracket encoding).
    pub async fn get(&self, path: &str, query: &Value, object: Option<&str>) -> Result<Value> {
        let req = || RequestBuilder::new(StripeMethod::Get, path).query(query);
        self.send("GET", path, object, req, None).await
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
        let key = match idempotency_key {
            Some(k) => IdempotencyKey::new(k)
                .map_err(|e| Error::Config(format!("idempotency key: {e}")))?,
            None => IdempotencyKey::new_uuid_v4(),
        };
        let req = || RequestBuilder::new(StripeMethod::Post, path).form(form);
        self.send("POST", path, object, req, Some(key)).await
    }

    /// `DELETE /v1{path}`.
    pub async fn delete(&self, path: &str, object: Option<&str>) -> Result<Value> {
        let req = || RequestBuilder::new(StripeMethod::Delete, path);
        self.send("DELETE", path, object, req, None).await
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        object: Option<&str>,
        build: impl Fn() -> RequestBuilder,
        key: Option<IdempotencyKey>,
    ) -> Result<Value> {
        let request = format!("{method} /v1{path}");
        let mut attempt = 0;
        loop {
            let raw = Raw {
                client: &self.inner,
                body: Mutex::new(None),
            };
            let strategy = key
                .clone()
                .map_or(RequestStrategy::Once, RequestStrategy::Idempotent);
            let result = build()
                .customize::<Option<bool>>()
                .request_strategy(strategy)
                .send(&raw)
                .await;
            match result {
                Ok(_) => {
                    let body = raw
                        .body
                        .into_inner()
                        .expect("not poisoned")
                        .unwrap_or_default();
                    return serde_json::from_slice(&body).map_err(|e| {
                        api_error(
                            &request,
                            object,
                            None,
                            format!("response is not JSON ({e}): {}", preview(&body)),
                        )
                    });
                }
                Err(err) if attempt < self.retries && retryable(&err) => {
                    let wait = self.backoff * 2u32.saturating_pow(attempt);
                    tracing::warn!(%request, attempt, error = %short(&err), "Stripe request failed; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(err) => return Err(convert(&request, object, err, attempt + 1)),
            }
        }
    }
}

fn preview(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

fn short(err: &stripe::StripeError) -> String {
    match err {
        stripe::StripeError::Stripe(e, status) => {
            format!("HTTP {status}: {}", e.message.as_deref().unwrap_or(""))
        }
        other => other.to_string(),
    }
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

fn convert(request: &str, object: Option<&str>, err: stripe::StripeError, attempts: u32) -> Error {
    match err {
        stripe::StripeError::Stripe(e, status) => {
            let request_id = e
                .request_log_url
                .as_deref()
                .and_then(|u| u.rsplit('/').next())
                .and_then(|s| s.split('?').next())
                .filter(|s| s.starts_with("req_"))
                .map(str::to_owned);
            Error::Stripe(Box::new(StripeApiError {
                request: request.to_owned(),
                object: object.map(str::to_owned),
                status: Some(status),
                error_type: Some(e.type_.as_str().to_owned()),
                code: e.code.as_ref().map(|c| c.as_str().to_owned()),
                message: e.message.clone().unwrap_or_else(|| "no message".to_owned())
                    + &if attempts > 1 {
                        format!(" (after {attempts} attempts)")
                    } else {
                        String::new()
                    },
                request_id,
            }))
        }
        other => api_error(
            request,
            object,
            None,
            format!("{other} (after {attempts} attempts)"),
        ),
    }
}

/// True when Stripe said the object does not exist.
pub(crate) fn is_missing(err: &Error) -> bool {
    matches!(err, Error::Stripe(e) if e.status == Some(404) || e.code.as_deref() == Some("resource_missing"))
}
