//! Provider clients. The gateway speaks the OpenAI HTTP API to every
//! provider: remote ones through a pooled `reqwest` client, the built-in mock
//! in-process through the same request/response shape, so the gateway has one
//! code path. Providers that speak another API (`kind = "anthropic"`, a mock
//! with `api = "anthropic"`) are translated here, at the edge; Azure differs
//! only in URLs and the key header.

mod anthropic;
pub use anthropic::with_default_max_tokens;
pub mod mock;

use crate::config::raw::MockApi;
use crate::config::{ProviderConfig, ProviderKind};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderMap, StatusCode};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::ServiceExt;

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// Why an upstream attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to provider {provider}: {detail}")]
    Connect { provider: String, detail: String },
    #[error("provider {provider} timed out ({phase})")]
    Timeout {
        provider: String,
        phase: &'static str,
    },
    #[error("provider {provider} broke the response: {detail}")]
    Body { provider: String, detail: String },
}

impl UpstreamError {
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Body { .. } => "body",
        }
    }
}

/// An upstream response whose headers have arrived; the body streams.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: BodyStream,
}

impl UpstreamResponse {
    /// Reads the whole body, bounded in size.
    pub async fn collect(self, limit: usize) -> Result<Bytes, UpstreamError> {
        let mut body = self.body;
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if buf.len() + chunk.len() > limit {
                return Err(UpstreamError::Body {
                    provider: String::new(),
                    detail: format!("response larger than {limit} bytes"),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// `Retry-After` in seconds, when the provider sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
    }
}

/// Endpoints with their URL parsed once, not on every request.
const PATHS: [&str; 4] = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/messages",
];

/// What a provider speaks on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wire {
    Chat,
    /// Messages API: chat requests are translated both ways.
    Anthropic,
    /// Azure OpenAI: deployment URLs when `api_version` is set, v1 otherwise.
    Azure {
        api_version: Option<String>,
    },
}

/// The URL of an Azure OpenAI call. With an `api_version`, the deployment
/// (the model's upstream name) is in the path; the v1 API takes the model
/// in the body like OpenAI.
pub fn azure_url(
    base_url: &str,
    api_version: Option<&str>,
    path: &str,
    deployment: &str,
) -> String {
    match api_version {
        Some(v) => {
            // Azure deployment names are [A-Za-z0-9._-]; escape anything else.
            let mut dep = String::with_capacity(deployment.len());
            for b in deployment.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                    dep.push(char::from(b));
                } else {
                    dep.push_str(&format!("%{b:02X}"));
                }
            }
            format!("{base_url}/openai/deployments/{dep}{path}?api-version={v}")
        }
        None => format!("{base_url}/openai/v1{path}"),
    }
}

enum Transport {
    Http {
        client: reqwest::Client,
        base_url: String,
        urls: Vec<(&'static str, reqwest::Url)>,
        /// `Authorization` and configured headers, parsed once.
        headers: http::HeaderMap,
    },
    Mock(axum::Router),
}

/// One configured provider.
pub struct Provider {
    pub config: Arc<ProviderConfig>,
    transport: Transport,
    wire: Wire,
}

impl Provider {
    pub fn new(config: Arc<ProviderConfig>) -> Result<Provider, reqwest::Error> {
        let http = |base_url: &str| -> Result<Transport, reqwest::Error> {
            Ok(Transport::Http {
                client: reqwest::Client::builder()
                    .connect_timeout(config.connect_timeout)
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(1024)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build()?,
                base_url: base_url.to_string(),
                headers: fixed_headers(&config),
                urls: PATHS
                    .iter()
                    .filter_map(|p| {
                        reqwest::Url::parse(&format!("{base_url}{p}"))
                            .ok()
                            .map(|u| (*p, u))
                    })
                    .collect(),
            })
        };
        let (transport, wire) = match &config.kind {
            ProviderKind::OpenAi { base_url, .. } => (http(base_url)?, Wire::Chat),
            ProviderKind::Anthropic { base_url, .. } => (http(base_url)?, Wire::Anthropic),
            ProviderKind::Azure {
                base_url,
                api_version,
            } => (
                http(base_url)?,
                Wire::Azure {
                    api_version: api_version.clone(),
                },
            ),
            ProviderKind::Mock(settings) => (
                Transport::Mock(mock::router(settings.clone())),
                match settings.api {
                    MockApi::Chat => Wire::Chat,
                    MockApi::Anthropic => Wire::Anthropic,
                },
            ),
        };
        Ok(Provider {
            config,
            transport,
            wire,
        })
    }

    /// The provider speaks Anthropic's Messages API (chat is translated).
    pub fn speaks_anthropic(&self) -> bool {
        self.wire == Wire::Anthropic
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Sends an OpenAI-shaped `body` to `path` (e.g. `/chat/completions`)
    /// and waits for the response head and the first body bytes within the
    /// first-byte timeout; the body stream ends with a timeout error at
    /// `deadline`. For an Anthropic provider the chat request and its answer
    /// are translated, so the caller always sees chat completions.
    pub async fn send(
        &self,
        path: &str,
        body: Bytes,
        deadline: Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        if self.wire == Wire::Anthropic && path == "/chat/completions" {
            let out = match anthropic::translate_request(&body) {
                Ok(o) => o,
                Err(e) => return Ok(anthropic::refusal(&e)),
            };
            let resp = self.send_native("/messages", out.body, deadline).await?;
            return Ok(anthropic::translate_response(resp, out.stream, self.name()));
        }
        self.send_native(path, body, deadline).await
    }

    /// [`send`](Provider::send) without translation: `body` goes out as is,
    /// in the provider's own API.
    pub async fn send_native(
        &self,
        path: &str,
        body: Bytes,
        deadline: Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let first_byte = Instant::now() + self.config.first_byte_timeout;
        let head_deadline = first_byte.min(deadline);
        let fut = self.send_inner(path, body);
        let resp = match tokio::time::timeout_at(head_deadline, fut).await {
            Ok(r) => r?,
            Err(_) => return Err(self.timeout("first byte")),
        };
        // Wait for the first body chunk too: headers alone say little about
        // whether a streaming provider is actually producing tokens.
        let mut body = resp.body;
        let first = match tokio::time::timeout_at(head_deadline, body.next()).await {
            Ok(first) => first,
            Err(_) => return Err(self.timeout("first byte")),
        };
        let first = match first {
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => return Err(e),
            None => None,
        };
        let rest = DeadlineStream {
            inner: body,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            provider: self.config.name.clone(),
            done: false,
        };
        let body: BodyStream = match first {
            Some(b) => Box::pin(futures::stream::once(async move { Ok(b) }).chain(rest)),
            None => Box::pin(rest),
        };
        Ok(UpstreamResponse {
            status: resp.status,
            headers: resp.headers,
            body,
        })
    }

    fn timeout(&self, phase: &'static str) -> UpstreamError {
        UpstreamError::Timeout {
            provider: self.config.name.clone(),
            phase,
        }
    }

    async fn send_inner(&self, path: &str, body: Bytes) -> Result<UpstreamResponse, UpstreamError> {
        match &self.transport {
            Transport::Http {
                client,
                base_url,
                urls,
                headers,
            } => {
                let mut req = if let Wire::Azure { api_version } = &self.wire {
                    let deployment = deployment_of(&body);
                    client.post(azure_url(
                        base_url,
                        api_version.as_deref(),
                        path,
                        &deployment,
                    ))
                } else {
                    match urls.iter().find(|(p, _)| *p == path) {
                        Some((_, url)) => client.post(url.clone()),
                        None => client.post(format!("{base_url}{path}")),
                    }
                };
                req = req.headers(headers.clone()).body(body);
                let resp = req.send().await.map_err(|e| UpstreamError::Connect {
                    provider: self.config.name.clone(),
                    detail: error_chain(&e),
                })?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let provider = self.config.name.clone();
                let body = resp.bytes_stream().map(move |r| {
                    r.map_err(|e| UpstreamError::Body {
                        provider: provider.clone(),
                        detail: error_chain(&e),
                    })
                });
                Ok(UpstreamResponse {
                    status,
                    headers,
                    body: Box::pin(body),
                })
            }
            Transport::Mock(router) => {
                let req = http::Request::builder()
                    .method(http::Method::POST)
                    .uri(format!("/v1{path}"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(axum::body::Body::from(body))
                    .map_err(|e| UpstreamError::Connect {
                        provider: self.config.name.clone(),
                        detail: e.to_string(),
                    })?;
                let resp = match router.clone().oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                let (parts, body) = resp.into_parts();
                let provider = self.config.name.clone();
                let body = body.into_data_stream().map(move |r| {
                    r.map_err(|e| UpstreamError::Body {
                        provider: provider.clone(),
                        detail: e.to_string(),
                    })
                });
                Ok(UpstreamResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body: Box::pin(body),
                })
            }
        }
    }
}

/// The `model` of an OpenAI-shaped body: an Azure deployment name.
fn deployment_of(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(default)]
        model: String,
    }
    serde_json::from_slice::<M>(body)
        .map(|m| m.model)
        .unwrap_or_default()
}

fn fixed_headers(config: &ProviderConfig) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let ProviderKind::Anthropic { version, .. } = &config.kind {
        if let Ok(v) = http::HeaderValue::from_str(version) {
            h.insert("anthropic-version", v);
        }
    }
    if let Some(k) = &config.api_key {
        // Each API names its key header differently.
        let (name, value) = match &config.kind {
            ProviderKind::Anthropic { .. } => {
                (http::HeaderName::from_static("x-api-key"), k.clone())
            }
            ProviderKind::Azure { .. } => (http::HeaderName::from_static("api-key"), k.clone()),
            _ => (http::header::AUTHORIZATION, format!("Bearer {k}")),
        };
        if let Ok(mut v) = http::HeaderValue::from_str(&value) {
            v.set_sensitive(true);
            h.insert(name, v);
        }
    }
    // Validated at config load; anything unparsable was already reported.
    for (name, value) in &config.headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            h.insert(n, v);
        }
    }
    h
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Ends a body with a timeout error once the total deadline passes.
struct DeadlineStream {
    inner: BodyStream,
    sleep: Pin<Box<tokio::time::Sleep>>,
    provider: String,
    done: bool,
}

impl Stream for DeadlineStream {
    type Item = Result<Bytes, UpstreamError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = self.inner.as_mut().poll_next(cx) {
            return Poll::Ready(item);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(UpstreamError::Timeout {
                provider: self.provider.clone(),
                phase: "total",
            })));
        }
        Poll::Pending
    }
}

use std::future::Future;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_urls_in_both_styles() {
        assert_eq!(
            azure_url("https://r.openai.azure.com", Some("2024-10-21"), "/chat/completions", "gpt-4o prod"),
            "https://r.openai.azure.com/openai/deployments/gpt-4o%20prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            azure_url(
                "https://r.openai.azure.com",
                None,
                "/chat/completions",
                "gpt-4o"
            ),
            "https://r.openai.azure.com/openai/v1/chat/completions"
        );
    }
}
