//! What the server knows about a request's connection, and the guard on
//! failed authentication that needs it.

use super::error::ApiError;
use crate::auth::failures::{AuthFailures, ClientBucket};
use crate::gateway::state::AppState;
use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};

use std::net::SocketAddr;

/// The connection a request came over, put on every request by [`with_client`].
#[derive(Clone, Debug)]
pub struct Client {
    pub addr: SocketAddr,
    /// Shared by every connection of one server.
    pub failures: AuthFailures,
}

/// Wraps the per-connection service so each request carries its [`Client`]
/// (and axum's `ConnectInfo`, for handlers that want the standard extractor).
pub fn with_client(
    svc: axum::Router,
    client: Client,
) -> tower::util::MapRequest<axum::Router, impl Fn(IncomingRequest) -> IncomingRequest + Clone> {
    let tag = move |mut req: IncomingRequest| {
        req.extensions_mut().insert(ConnectInfo(client.addr));
        req.extensions_mut().insert(client.clone());
        req
    };
    tower::ServiceExt::map_request(svc, tag)
}

type IncomingRequest = http::Request<hyper::body::Incoming>;

/// Why authentication failed, as counted in `triage_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
}

impl AuthFailure {
    fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
        }
    }
}

/// Before a key is even looked at: a client address past
/// `auth.max_failures_per_minute` is refused, right key or not (else the
/// limit would not stop guessing, only slow the reporting of a hit).
pub fn refuse_if_blocked(app: &AppState, req: &Request) -> Option<Response> {
    let client = req.extensions().get::<Client>()?;
    let max = app.runtime.load().config.max_auth_failures_per_minute;
    let wait = client
        .failures
        .blocked(ClientBucket::of(client.addr.ip()), max)?;
    app.metrics.record_auth_failure("too_many_failures");
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let err = ApiError::new(
        429,
        "rate_limit_error",
        Some("too_many_auth_failures"),
        format!("Too many failed authentication attempts from this address; retry in {secs}s."),
    )
    .with_retry_after(secs.max(1));
    Some(err.into_response())
}

/// Counts a failed authentication (metric; invalid keys also count against
/// the client's address — a missing key guesses nothing).
pub fn auth_failed(app: &AppState, req: &Request, why: AuthFailure) {
    app.metrics.record_auth_failure(why.label());
    if why == AuthFailure::Invalid {
        if let Some(client) = req.extensions().get::<Client>() {
            client.failures.record(ClientBucket::of(client.addr.ip()));
        }
    }
}

/// Whether the API listener serves `/metrics` to this request: with
/// `metrics.public = true` to anyone; with `metrics.token_env` to a bearer of
/// that token (digests compared in constant time, 401 otherwise); else it does
/// not exist here (404).
pub fn metrics_access(
    cfg: &crate::config::MetricsConfig,
    headers: &http::HeaderMap,
) -> Result<(), ApiError> {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    if cfg.public {
        return Ok(());
    }
    let Some(want) = &cfg.token_sha256 else {
        return Err(ApiError::not_found());
    };
    let got = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| -> [u8; 32] { sha2::Sha256::digest(t.trim().as_bytes()).into() });
    match got {
        Some(got) if bool::from(got.ct_eq(want)) => Ok(()),
        _ => Err(ApiError::new(
            401,
            "invalid_request_error",
            Some("invalid_metrics_token"),
            "/metrics needs `Authorization: Bearer` with the token from metrics.token_env.",
        )),
    }
}
