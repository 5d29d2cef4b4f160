//! Step 8 of the request path: send a request to the first deployment that
//! takes it. Retries and fallbacks happen only here, before anything has
//! been sent to the client, so they can never duplicate output.

use super::error::ApiError;
use super::state::{AppState, Runtime};
use crate::config::ModelConfig;
use crate::metrics::{UpstreamErrorKind, UpstreamOutcome};
use crate::route::{Admit, Candidate};
use crate::upstream::{UpstreamError, UpstreamResponse};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use std::time::{Duration, Instant};

/// A response whose head came from a deployment that accepted the request.
pub struct Dispatched {
    pub candidate: Candidate,
    pub response: UpstreamResponse,
    pub fell_back_from: Vec<String>,
    /// Deployments passed over because they were cooling down.
    pub skipped: Vec<String>,
    /// Time spent waiting on providers up to the response head.
    pub upstream_wait: Duration,
}

/// Tries deployments in order. A connect error, timeout, 429 or 5xx moves on
/// to the next attempt; other 4xx answers pass straight through.
pub async fn dispatch(
    app: &AppState,
    rt: &Runtime,
    candidates: &[Candidate],
    path: &str,
    body_for: impl Fn(&ModelConfig) -> Bytes,
    tier_name: Option<&str>,
) -> Result<Dispatched, ApiError> {
    let mut fell_back_from: Vec<String> = Vec::new();
    let mut last_error: Option<ApiError> = None;
    let mut skipped: Vec<String> = Vec::new();
    let wait_start = Instant::now();
    let metrics = &app.metrics;
    for cand in candidates {
        let m = &cand.model;
        let admit = app.health.admit(&m.name);
        if admit == Admit::CoolingDown {
            skipped.push(m.name.clone());
            continue;
        }
        // A probe abandoned before its verdict (client gone) gives its slot back.
        let _probe = (admit == Admit::Probe).then(|| ProbeSlot(&app.health, &m.name));
        let Some(provider) = rt.provider(&m.provider) else {
            continue;
        };
        if let Some(prev) = fell_back_from.last() {
            metrics.record_fallback(prev, &m.name);
        }
        let body = body_for(m);
        let attempts = 1 + provider.config.retries;
        for attempt in 0..attempts {
            if attempt > 0 {
                metrics.record_retry(&m.name);
            }
            let t0 = Instant::now();
            let deadline = tokio::time::Instant::now() + provider.config.total_timeout;
            let result = provider.send(path, body.clone(), deadline).await;
            let (err, kind, retry_after) = match result {
                Ok(resp) if resp.status.is_success() => {
                    app.health.success(&m.name, t0.elapsed());
                    metrics.set_deployment_healthy(&m.name, true);
                    metrics.record_upstream(&m.name, t0.elapsed(), UpstreamOutcome::Ok);
                    return Ok(Dispatched {
                        candidate: cand.clone(),
                        response: resp,
                        fell_back_from,
                        skipped,
                        upstream_wait: wait_start.elapsed(),
                    });
                }
                Ok(resp)
                    if resp.status == StatusCode::TOO_MANY_REQUESTS
                        || resp.status.is_server_error() =>
                {
                    let status = resp.status;
                    let retry_after = resp.retry_after();
                    let body = resp.collect(1024 * 1024).await.unwrap_or_default();
                    tracing::warn!(model = %m.name, status = status.as_u16(), attempt, "provider refused; trying the next deployment");
                    let (e, kind) = if status == StatusCode::TOO_MANY_REQUESTS {
                        let mut e = ApiError::new(
                            status,
                            "rate_limit_error",
                            Some("rate_limit_exceeded"),
                            format!("Provider for `{}` is rate limiting.", m.name),
                        );
                        e.raw = Some(body);
                        (e, UpstreamErrorKind::RateLimited)
                    } else {
                        (
                            ApiError::bad_gateway(format!(
                                "Provider for `{}` answered {}.",
                                m.name,
                                status.as_u16()
                            )),
                            UpstreamErrorKind::Server,
                        )
                    };
                    (e, kind, retry_after)
                }
                Ok(resp) => {
                    // The request itself is wrong for this provider: another
                    // deployment would say the same, so pass it through.
                    let status = resp.status;
                    app.health.success(&m.name, t0.elapsed());
                    metrics.record_upstream(
                        &m.name,
                        t0.elapsed(),
                        UpstreamOutcome::Error(UpstreamErrorKind::Client),
                    );
                    let body = resp.collect(1024 * 1024).await.unwrap_or_default();
                    let mut e =
                        ApiError::new(status, "invalid_request_error", None, "upstream error");
                    e.raw = Some(body);
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(model = %m.name, error = %e, attempt, "provider attempt failed");
                    let kind = match e {
                        UpstreamError::Timeout { .. } => UpstreamErrorKind::Timeout,
                        UpstreamError::Connect { .. } => UpstreamErrorKind::Connect,
                        UpstreamError::Body { .. } => UpstreamErrorKind::Protocol,
                    };
                    (upstream_error(&m.name, &e), kind, None)
                }
            };
            metrics.record_upstream(&m.name, t0.elapsed(), UpstreamOutcome::Error(kind));
            if app
                .health
                .failure(&m.name, cand.tier.as_deref(), retry_after)
            {
                metrics.record_cooldown(&m.name);
            }
            let mut err = err;
            if let Some(ra) = retry_after {
                if let Ok(v) = HeaderValue::from_str(&ra.as_secs().to_string()) {
                    err = err.with_header(header::RETRY_AFTER, v);
                }
            }
            last_error = Some(err);
            if app.health.admit_peek_cooling(&m.name) {
                break; // no point retrying a deployment we just ejected
            }
        }
        fell_back_from.push(m.name.clone());
    }
    Err(last_error.unwrap_or_else(|| {
        let what = tier_name.map_or_else(
            || "the requested model".to_string(),
            |t| format!("tier `{t}`"),
        );
        if !skipped.is_empty() {
            ApiError::unavailable(format!(
                "Every deployment of {what} is cooling down after failures; try again shortly."
            ))
        } else {
            ApiError::unavailable(format!("No deployment of {what} is available."))
        }
    }))
}

/// Releases a half-open probe slot on drop; harmless after success/failure.
struct ProbeSlot<'a>(&'a crate::route::Health, &'a str);

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.release_probe(self.1);
    }
}

fn upstream_error(model: &str, e: &UpstreamError) -> ApiError {
    match e {
        UpstreamError::Timeout { phase, .. } => {
            ApiError::gateway_timeout(format!("Provider for `{model}` timed out ({phase})."))
        }
        _ => ApiError::bad_gateway(format!("Provider for `{model}` failed: {e}")),
    }
}
