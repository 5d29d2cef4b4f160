//! Step 6, one call: send the request to the first deployment that takes
//! it. Retries and fallbacks happen only here, before anything has been sent
//! to the client, so they can never duplicate output. Then step 7: answer
//! with the JSON body, or forward the stream as it arrives.

use super::cache::label;
use super::meter::Bill;
use super::state::{AppState, Runtime};
use super::stream::{SseForwarder, StreamEnd};
use super::{Body, Exec, Facts, GatewayError as ApiError, Outcome, MAX_UPSTREAM_BODY};
use crate::cache::Entry;
use crate::config::ModelConfig;
use crate::metrics::{CacheOutcome, UpstreamErrorKind, UpstreamOutcome};
use crate::protocol::openai::chat::{completion_usage, ChatRequest, StreamMode, UpstreamBody};
use crate::route::{Admit, Candidate};
use crate::upstream::{UpstreamError, UpstreamResponse};
use crate::usage::Usage;
use bytes::Bytes;
use http::StatusCode;
use parking_lot::Mutex;
use serde_json::Value;
use std::time::{Duration, Instant};
use tracing::Instrument;

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

/// Tries deployments in order. A connect error, timeout, 429 or 5xx (an
/// Anthropic 529 `overloaded_error` included) moves on to the next attempt,
/// whatever API the next deployment speaks; other 4xx answers pass straight
/// through.
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
        let mut body = body_for(m);
        if provider.speaks_anthropic() && path == "/chat/completions" {
            body = crate::upstream::with_default_max_tokens(body, m.max_output_tokens);
        }
        let attempts = 1 + provider.config.retries;
        for attempt in 0..attempts {
            if attempt > 0 {
                metrics.record_retry(&m.name);
            }
            let t0 = Instant::now();
            let deadline = tokio::time::Instant::now() + provider.config.total_timeout;
            let result = provider.send(path, body.clone(), deadline).await;
            let (err, kind, retry_after) = match judge(app, m, result, t0, attempt).await {
                Attempt::Answered(resp) => {
                    return Ok(Dispatched {
                        candidate: cand.clone(),
                        response: resp,
                        fell_back_from,
                        skipped,
                        upstream_wait: wait_start.elapsed(),
                    })
                }
                Attempt::Final(mut e) => {
                    e.tried = fell_back_from;
                    e.cooling = skipped;
                    return Err(e);
                }
                Attempt::Failed(e, kind, retry_after) => (e, kind, retry_after),
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
                err = err.with_retry_after(ra.as_secs());
            }
            last_error = Some(err);
            if app.health.admit_peek_cooling(&m.name) {
                break; // no point retrying a deployment we just ejected
            }
        }
        fell_back_from.push(m.name.clone());
    }
    let mut err = last_error.unwrap_or_else(|| {
        let e = no_deployment(tier_name, !skipped.is_empty());
        // Come back when the first cooldown ends (at least a second).
        match skipped
            .iter()
            .filter_map(|m| app.health.cooldown_left(m))
            .min()
        {
            Some(left) => e.with_retry_after(whole_secs(left)),
            None => e,
        }
    });
    err.tried = fell_back_from;
    err.cooling = skipped;
    Err(err)
}

/// Whole seconds, rounded up, at least 1 (for `Retry-After`).
fn whole_secs(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Nothing answered and nothing failed: every deployment was skipped.
fn no_deployment(tier_name: Option<&str>, cooling: bool) -> ApiError {
    let what = tier_name.map_or_else(
        || "the requested model".to_string(),
        |t| format!("tier `{t}`"),
    );
    if cooling {
        ApiError::unavailable(format!(
            "Every deployment of {what} is cooling down after failures; try again shortly."
        ))
    } else {
        ApiError::unavailable(format!("No deployment of {what} is available."))
    }
}

/// What one attempt at a deployment came to.
enum Attempt {
    Answered(UpstreamResponse),
    /// The request itself is wrong: no other deployment would do better.
    Final(ApiError),
    /// Worth trying again or elsewhere (`retry_after` as the provider asked).
    Failed(ApiError, UpstreamErrorKind, Option<Duration>),
}

async fn judge(
    app: &AppState,
    m: &ModelConfig,
    result: Result<UpstreamResponse, UpstreamError>,
    t0: Instant,
    attempt: u32,
) -> Attempt {
    let metrics = &app.metrics;
    match result {
        Ok(resp) if resp.status.is_success() => {
            app.health.success(&m.name, t0.elapsed());
            metrics.set_deployment_healthy(&m.name, true);
            metrics.record_upstream(&m.name, t0.elapsed(), UpstreamOutcome::Ok);
            Attempt::Answered(resp)
        }
        Ok(resp)
            if resp.status == StatusCode::TOO_MANY_REQUESTS || resp.status.is_server_error() =>
        {
            let status = resp.status;
            let retry_after = resp.retry_after();
            let body = resp.collect(1024 * 1024).await.unwrap_or_default();
            tracing::warn!(model = %m.name, status = status.as_u16(), attempt, "provider refused; trying the next deployment");
            let (e, kind) = if status == StatusCode::TOO_MANY_REQUESTS {
                let mut e = ApiError::new(
                    status.as_u16(),
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
            Attempt::Failed(e, kind, retry_after)
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
            let mut e = ApiError::new(
                status.as_u16(),
                "invalid_request_error",
                None,
                "upstream error",
            );
            e.raw = Some(body);
            Attempt::Final(e)
        }
        Err(e) => {
            tracing::warn!(model = %m.name, error = %e, attempt, "provider attempt failed");
            let kind = match e {
                UpstreamError::Timeout { .. } => UpstreamErrorKind::Timeout,
                UpstreamError::Connect { .. } => UpstreamErrorKind::Connect,
                UpstreamError::Body { .. } => UpstreamErrorKind::Protocol,
            };
            Attempt::Failed(upstream_error(&m.name, &e), kind, None)
        }
    }
}

/// Releases a half-open probe slot on drop; harmless after success/failure.
struct ProbeSlot<'a>(&'a crate::route::Health, &'a str);

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.release_probe(self.1);
    }
}

/// What the client is told about a failed call: the model and a stable
/// reason code. The provider's URL and the OS error stay in the log (logged
/// by `judge`, under the request's span and its request id).
fn upstream_error(model: &str, e: &UpstreamError) -> ApiError {
    match e {
        UpstreamError::Timeout { phase, .. } => {
            ApiError::gateway_timeout(format!("The provider for `{model}` timed out ({phase})."))
        }
        UpstreamError::Connect { .. } => ApiError::upstream_unreachable(model),
        UpstreamError::Body { .. } => ApiError::upstream_invalid_response(model),
    }
}

/// Step 6 for a single call (with fallback), and step 7.
pub async fn call(x: Exec<'_>, facts: &mut Facts) -> Result<Outcome, ApiError> {
    let Exec {
        app,
        rt,
        req,
        plan,
        mut meter,
        bill,
        mut headers,
        fill,
        cache,
        ttl,
    } = x;
    let chat = &req.chat;
    let mode = if chat.stream {
        StreamMode::ForceUsage
    } else {
        StreamMode::Keep
    };
    let mut decision = plan.decision;
    let dispatched = dispatch(
        app,
        rt,
        &plan.candidates,
        "/chat/completions",
        |m| {
            UpstreamBody::new(&chat.body, &m.upstream_model, mode)
                .max_output(m.max_output_tokens)
                .to_bytes()
        },
        decision.tier.as_deref(),
    )
    .instrument(tracing::info_span!(
        "upstream",
        tier = decision.tier.as_deref().unwrap_or("-")
    ))
    .await;
    let d = match dispatched {
        Ok(d) => d,
        Err(e) => {
            meter.finish(e.status, &bill, None);
            return Err(e);
        }
    };
    facts.upstream_wait = d.upstream_wait;
    decision.model = d.candidate.model.name.clone();
    if let Some(t) = &d.candidate.tier {
        decision.tier = Some(t.name.clone());
    }
    decision.fell_back_from = d.fell_back_from;
    decision.skipped = d.skipped;
    if rt
        .provider(&d.candidate.model.provider)
        .is_some_and(|p| p.speaks_anthropic())
    {
        decision.upstream_api = Some("anthropic");
    }
    meter.routed(&decision, d.upstream_wait);
    tracing::debug!(request_id = %req.request_id, model = %decision.model, "routed");
    if cache != CacheOutcome::None {
        headers.push(("x-triage-cache", label(cache).into()));
    }
    let answer = Answer {
        app,
        chat,
        model: d.candidate.model.clone(),
        meter,
        bill,
        fill,
        ttl,
        started: req.started,
    };
    let body = if chat.stream {
        answer.stream(d.response)
    } else {
        answer.json(d.response).await?
    };
    Ok(Outcome {
        body,
        decision,
        headers,
    })
}

/// A dispatched call's answer, settled when it ends.
struct Answer<'a> {
    app: &'a AppState,
    chat: &'a ChatRequest,
    model: std::sync::Arc<ModelConfig>,
    meter: super::meter::Meter,
    bill: Bill,
    fill: Option<crate::cache::FillGuard>,
    ttl: Option<Duration>,
    started: Instant,
}

impl Answer<'_> {
    fn stream(self, response: UpstreamResponse) -> Body {
        let Answer {
            app,
            chat,
            model,
            meter,
            bill,
            fill,
            ttl,
            started,
        } = self;
        let record = fill.as_ref().and_then(|_| {
            let cache = app.cache.load();
            cache
                .as_ref()
                .as_ref()
                .map(|c| c.config().max_entry_bytes as usize)
        });
        let fill_cell = Mutex::new(fill);
        let on_end = Box::new(move |end: StreamEnd| {
            let mut bill = bill;
            bill.add(&model, end.usage);
            meter.finish(200, &bill, end.first_byte);
            if let (Some(g), Some(chunks)) = (fill_cell.lock().take(), end.chunks) {
                match Entry::from_chunk_bytes(chunks) {
                    Ok(entry) => {
                        tokio::spawn(async move {
                            g.complete(entry, ttl).await;
                        });
                    }
                    Err(e) => tracing::debug!(error = %e, "stream not cacheable"),
                }
            }
        });
        let fwd = SseForwarder::new(
            response.body,
            !chat.client_wants_usage,
            chat.features.prompt_tokens,
            record,
            started,
            on_end,
        );
        Body::Stream(Box::pin(fwd))
    }

    async fn json(self, response: UpstreamResponse) -> Result<Body, ApiError> {
        let Answer {
            chat,
            model,
            meter,
            mut bill,
            fill,
            ttl,
            ..
        } = self;
        let body = match response.collect(MAX_UPSTREAM_BODY).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(model = %model.name, error = %e, "provider broke the response");
                meter.finish(502, &bill, None);
                return Err(ApiError::upstream_invalid_response(&model.name));
            }
        };
        let Some(usage) = completion_usage(&body) else {
            tracing::warn!(model = %model.name, "provider's body is not a chat completion");
            meter.finish(502, &bill, None);
            return Err(ApiError::upstream_invalid_response(&model.name));
        };
        let usage = if usage == Usage::default() {
            // The provider reported nothing: estimate, and say so in the ledger.
            estimate_usage(chat, &body)
        } else {
            usage
        };
        bill.add(&model, usage);
        meter.finish(200, &bill, None);
        if let Some(g) = fill {
            g.complete(Entry::from_parts(body.clone(), None, usage), ttl)
                .await;
        }
        Ok(Body::Json(body))
    }
}

fn estimate_usage(chat: &ChatRequest, body: &[u8]) -> Usage {
    let completion = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| crate::vote::completion_text(&v))
        .map(|t| crate::usage::estimate_tokens(&t))
        .unwrap_or(0);
    Usage {
        prompt_tokens: chat.features.prompt_tokens,
        completion_tokens: completion,
        cached_tokens: 0,
        cache_write_tokens: 0,
        estimated: true,
    }
}
