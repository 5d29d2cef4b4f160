//! Endpoint handlers. The chat path follows the numbered steps in `server/mod.rs`.

use super::error::ApiError;
use super::request::{self, ChatRequest};
use super::state::{AppState, Runtime};
use super::stream::{SseForwarder, StreamEnd};
use super::{LogFacts, RequestId};
use crate::auth::{presented_key, KeyIdentity};
use crate::config::{AuthMode, ModelConfig};
use crate::route::{self, Admit, Candidate, RouteDecision};
use crate::upstream::{UpstreamError, UpstreamResponse};
use crate::usage::Usage;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest non-streaming upstream answer we accept.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// The caller of a `/v1` request (absent only with `auth = "none"`).
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Arc<KeyIdentity>>);

impl Caller {
    pub fn name(&self) -> Option<&str> {
        self.0.as_ref().map(|k| k.name.as_str())
    }
}

pub async fn authenticate(State(app): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let rt = app.runtime.load();
    let caller = match rt.config.auth {
        AuthMode::None => Caller(None),
        AuthMode::Keys => {
            let Some(secret) = presented_key(req.headers()) else {
                return ApiError::invalid_key(
                    "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`.",
                )
                .into_response();
            };
            match rt.keys.authenticate(secret) {
                Some(id) => Caller(Some(Arc::new(id.clone()))),
                None => return ApiError::invalid_key("Incorrect API key provided.").into_response(),
            }
        }
    };
    drop(rt);
    req.extensions_mut().insert(caller);
    next.run(req).await
}

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.ready.load(Ordering::SeqCst) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready"}))).into_response()
    }
}

pub async fn metrics(State(_app): State<Arc<AppState>>) -> Response {
    ApiError::not_found().into_response()
}

pub async fn key_self(Extension(caller): Extension<Caller>) -> Response {
    match caller.0 {
        Some(k) => Json(json!({"name": k.name, "team": k.team, "allow": k.allow})).into_response(),
        None => ApiError::invalid_key("No key: the gateway runs with auth = \"none\".").into_response(),
    }
}

pub async fn list_models(State(app): State<Arc<AppState>>, Extension(caller): Extension<Caller>) -> Response {
    let rt = app.runtime.load();
    let data: Vec<Value> = rt
        .config
        .routers
        .keys()
        .map(|r| (r, "triage-router"))
        .chain(rt.config.models.keys().map(|m| (m, "triage")))
        .filter(|(name, _)| caller.0.as_ref().is_none_or(|k| k.may_use(name)))
        .map(|(name, owner)| json!({"id": name, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Step 1: the body, bounded; over the limit is a 413 envelope.
async fn read_body(app: &AppState, req: Request) -> Result<(HeaderMap, Bytes, Option<RequestId>), ApiError> {
    let limit = app.runtime.load().config.server.max_body_bytes;
    let (parts, body) = req.into_parts();
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))?;
    let id = parts.extensions.get::<RequestId>().cloned();
    Ok((parts.headers, bytes, id))
}

/// What `model` named.
enum Target {
    Router(Arc<crate::config::RouterConfig>),
    Model(Arc<ModelConfig>),
}

/// Step 3: router or model, and may this key use it.
fn resolve(rt: &Runtime, caller: &Caller, model: &str) -> Result<Target, ApiError> {
    let target = if let Some(r) = rt.config.routers.get(model) {
        Target::Router(r.clone())
    } else if let Some(m) = rt.config.models.get(model) {
        Target::Model(m.clone())
    } else {
        return Err(ApiError::model_not_found(model));
    };
    if let Some(k) = &caller.0 {
        if !k.may_use(model) {
            return Err(ApiError::forbidden(format!("Key `{}` may not use `{model}`.", k.name)));
        }
    }
    Ok(target)
}

pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    let mut facts = LogFacts {
        key: caller.name().map(str::to_string),
        ..LogFacts::default()
    };
    let mut resp = match chat_inner(&app, &caller, req, &mut facts).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    resp.extensions_mut().insert(facts);
    resp
}

async fn chat_inner(app: &Arc<AppState>, caller: &Caller, req: Request, facts: &mut LogFacts) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (headers, bytes, _rid) = read_body(app, req).await?;
    let chat = request::parse_chat(&bytes)?;
    let rt = app.runtime.load_full();
    let target = resolve(&rt, caller, &chat.model)?;

    let (mut decision, candidates) = match &target {
        Target::Model(m) => (RouteDecision::direct(&m.name), route::direct_candidates(&rt.config, m)),
        Target::Router(r) => {
            let c = crate::route::classify::classify(app, &rt, r, &chat).await;
            let input = route::RuleInput {
                features: &chat.features,
                key: caller.name(),
                headers: &headers,
            };
            let (tier, reason) = route::choose_tier(r, &c, &input);
            let candidates = route::tier_candidates(&rt.config, &tier, &app.health);
            let d = RouteDecision {
                router: Some(r.name.clone()),
                label: Some(c.label.clone()),
                confidence: Some(c.confidence),
                tier: Some(tier),
                model: String::new(),
                reason,
                fell_back_from: Vec::new(),
            };
            (d, candidates)
        }
    };

    let dispatched = dispatch(app, &rt, &candidates, "/chat/completions", |m| upstream_chat_body(&chat, m), decision.tier.as_deref()).await;
    let dispatched = match dispatched {
        Ok(d) => d,
        Err(e) => {
            facts.route = Some(decision.header_value());
            return Err(e);
        }
    };
    decision.model = dispatched.candidate.model.name.clone();
    if let Some(t) = &dispatched.candidate.tier {
        decision.tier = Some(t.name.clone());
    }
    decision.fell_back_from = dispatched.fell_back_from.clone();
    let route_header = decision.header_value();
    tracing::debug!(route = %route_header, "routed");
    facts.route = Some(route_header.clone());

    let mut resp = if chat.stream {
        let prompt_est = chat.features.prompt_tokens;
        let on_end = Box::new(move |_end: StreamEnd| {});
        let fwd = SseForwarder::new(dispatched.response.body, !chat.client_wants_usage, prompt_est, false, started, on_end);
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .header("x-accel-buffering", "no")
            .body(Body::from_stream(fwd))
            .map_err(|e| ApiError::internal(e.to_string()))?
    } else {
        let body = dispatched.response.collect(MAX_UPSTREAM_BODY).await.map_err(|e| ApiError::bad_gateway(e.to_string()))?;
        let _usage = completion_usage(&body).ok_or_else(|| {
            ApiError::bad_gateway(format!("Provider for `{}` returned a body that is not a chat completion.", decision.model))
        })?;
        json_response(body)
    };
    if let Ok(v) = HeaderValue::from_str(&route_header) {
        resp.headers_mut().insert("x-triage-route", v);
    }
    Ok(resp)
}

fn json_response(body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Usage of a non-streamed chat completion; `None` if the body is not one.
fn completion_usage(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Peek {
        choices: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        usage: Option<Value>,
    }
    let p: Peek = serde_json::from_slice(body).ok()?;
    let _ = p.choices;
    Some(p.usage.as_ref().and_then(Usage::from_json).unwrap_or_default())
}

/// The body sent upstream: the client's fields, with the deployment's model
/// name, and usage always requested on streams (we need it for accounting).
fn upstream_chat_body(chat: &ChatRequest, m: &ModelConfig) -> Bytes {
    let mut body = chat.body.clone();
    body.insert("model".into(), Value::String(m.upstream_model.clone()));
    if chat.stream {
        let opts = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(o) = opts {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// A response whose head came from a deployment that accepted the request.
pub struct Dispatched {
    pub candidate: Candidate,
    pub response: UpstreamResponse,
    pub fell_back_from: Vec<String>,
    pub upstream_wait: Duration,
}

/// Step 9: tries deployments in order. A connect error, timeout, 429 or 5xx
/// moves on to the next attempt; nothing has reached the client yet, so a
/// retry can never duplicate output. Other 4xx answers pass straight through.
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
    let mut skipped = 0usize;
    let wait_start = Instant::now();
    for cand in candidates {
        let m = &cand.model;
        let admit = app.health.admit(&m.name);
        if admit == Admit::CoolingDown {
            skipped += 1;
            continue;
        }
        let Some(provider) = rt.provider(&m.provider) else {
            continue;
        };
        let body = body_for(m);
        let attempts = 1 + provider.config.retries;
        for attempt in 0..attempts {
            let t0 = Instant::now();
            let deadline = tokio::time::Instant::now() + provider.config.total_timeout;
            let result = provider.send(path, body.clone(), deadline).await;
            let err = match result {
                Ok(resp) if resp.status.is_success() => {
                    app.health.success(&m.name, t0.elapsed());
                    return Ok(Dispatched {
                        candidate: cand.clone(),
                        response: resp,
                        fell_back_from,
                        upstream_wait: wait_start.elapsed(),
                    });
                }
                Ok(resp) if resp.status == StatusCode::TOO_MANY_REQUESTS || resp.status.is_server_error() => {
                    let status = resp.status;
                    let retry_after = resp.retry_after();
                    let body = resp.collect(1024 * 1024).await.unwrap_or_default();
                    app.health.failure(&m.name, cand.tier.as_deref(), retry_after);
                    tracing::warn!(model = %m.name, status = status.as_u16(), attempt, "upstream refused; trying the next deployment");
                    let mut e = if status == StatusCode::TOO_MANY_REQUESTS {
                        let mut e = ApiError::new(status, "rate_limit_error", Some("rate_limit_exceeded"), format!("Provider for `{}` is rate limiting.", m.name));
                        e.raw = Some(body);
                        e
                    } else {
                        ApiError::bad_gateway(format!("Provider for `{}` answered {}.", m.name, status.as_u16()))
                    };
                    if let Some(ra) = retry_after {
                        if let Ok(v) = HeaderValue::from_str(&ra.as_secs().to_string()) {
                            e = e.with_header(header::RETRY_AFTER, v);
                        }
                    }
                    e
                }
                Ok(resp) => {
                    // The request itself is wrong for this provider: retrying elsewhere won't help.
                    let status = resp.status;
                    app.health.success(&m.name, t0.elapsed());
                    let body = resp.collect(1024 * 1024).await.unwrap_or_default();
                    let mut e = ApiError::new(status, "invalid_request_error", None, "upstream error");
                    e.raw = Some(body);
                    return Err(e);
                }
                Err(e) => {
                    app.health.failure(&m.name, cand.tier.as_deref(), None);
                    tracing::warn!(model = %m.name, error = %e, attempt, "upstream attempt failed");
                    upstream_error(&m.name, &e)
                }
            };
            last_error = Some(err);
        }
        fell_back_from.push(m.name.clone());
    }
    Err(last_error.unwrap_or_else(|| {
        let what = tier_name.map_or_else(|| "the requested model".to_string(), |t| format!("tier `{t}`"));
        if skipped > 0 {
            ApiError::unavailable(format!("Every deployment of {what} is cooling down after failures; try again shortly."))
        } else {
            ApiError::unavailable(format!("No deployment of {what} is available."))
        }
    }))
}

fn upstream_error(model: &str, e: &UpstreamError) -> ApiError {
    match e {
        UpstreamError::Timeout { phase, .. } => {
            ApiError::gateway_timeout(format!("Provider for `{model}` timed out ({phase})."))
        }
        _ => ApiError::bad_gateway(format!("Provider for `{model}` failed: {e}")),
    }
}

/// `/v1/completions` and `/v1/embeddings`: same model resolution, body passed through.
async fn passthrough(app: &Arc<AppState>, caller: &Caller, req: Request, path: &str, allow_routers: bool) -> Result<Response, ApiError> {
    let (_headers, bytes, _rid) = read_body(app, req).await?;
    let body = request::parse_object(&bytes)?;
    let model = request::model_field(&body)?;
    let rt = app.runtime.load_full();
    let (candidates, tier, decision) = match resolve(&rt, caller, &model)? {
        Target::Model(m) => (route::direct_candidates(&rt.config, &m), None, RouteDecision::direct(&m.name)),
        Target::Router(r) if allow_routers => {
            let tier = r.unknown_tier.clone();
            let mut d = RouteDecision::direct(&model);
            d.router = Some(r.name.clone());
            d.tier = Some(tier.clone());
            d.reason = route::RouteReason::Unknown("not_chat");
            (route::tier_candidates(&rt.config, &tier, &app.health), Some(tier), d)
        }
        Target::Router(_) => {
            return Err(ApiError::invalid_param("model", format!("`{model}` is a router; routers serve chat and text completions, name a model here.")))
        }
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let d = dispatch(app, &rt, &candidates, path, |m| {
        let mut b = body.clone();
        b.insert("model".into(), Value::String(m.upstream_model.clone()));
        Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
    }, tier.as_deref())
    .await?;
    let mut decision = decision;
    decision.model = d.candidate.model.name.clone();
    decision.fell_back_from = d.fell_back_from;
    let mut resp = if stream {
        let fwd = SseForwarder::new(d.response.body, false, 0, false, Instant::now(), Box::new(|_| {}));
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from_stream(fwd))
            .map_err(|e| ApiError::internal(e.to_string()))?
    } else {
        let body = d.response.collect(MAX_UPSTREAM_BODY).await.map_err(|e| ApiError::bad_gateway(e.to_string()))?;
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return Err(ApiError::bad_gateway(format!("Provider for `{}` returned invalid JSON.", decision.model)));
        }
        json_response(body)
    };
    if let Ok(v) = HeaderValue::from_str(&decision.header_value()) {
        resp.headers_mut().insert("x-triage-route", v);
    }
    Ok(resp)
}

pub async fn completions(State(app): State<Arc<AppState>>, Extension(caller): Extension<Caller>, req: Request) -> Response {
    passthrough(&app, &caller, req, "/completions", true).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn embeddings(State(app): State<Arc<AppState>>, Extension(caller): Extension<Caller>, req: Request) -> Response {
    passthrough(&app, &caller, req, "/embeddings", false).await.unwrap_or_else(IntoResponse::into_response)
}
