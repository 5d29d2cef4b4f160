//! Endpoint handlers. The chat path follows the numbered steps in `server/mod.rs`.

use super::chat::{json_response, MAX_UPSTREAM_BODY};
use super::dispatch::dispatch;
use super::error::ApiError;
use super::request;
use super::state::{AppState, Runtime};
use super::stream::SseForwarder;
use super::RequestId;
use crate::auth::{presented_key, KeyIdentity};
use crate::config::{AuthMode, ModelConfig};
use crate::route::{self, RouteDecision};
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
use std::time::Instant;

/// The caller of a `/v1` request (absent only with `auth = "none"`).
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Arc<KeyIdentity>>);

impl Caller {
    pub fn name(&self) -> Option<&str> {
        self.0.as_ref().map(|k| k.name.as_str())
    }
}

pub async fn authenticate(
    State(app): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
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
                None => {
                    return ApiError::invalid_key("Incorrect API key provided.").into_response()
                }
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
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready"})),
        )
            .into_response()
    }
}

pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    // With `metrics.listen` set, the page lives only on that address.
    if app.runtime.load().config.metrics.listen.is_some() {
        return ApiError::not_found().into_response();
    }
    render_metrics(&app)
}

/// The Prometheus page; also served on `metrics.listen` when set.
pub fn render_metrics(app: &AppState) -> Response {
    if !app.runtime.load().config.metrics.enabled {
        return ApiError::not_found().into_response();
    }
    if let Some(c) = app.cache.load().as_ref() {
        let s = c.stats();
        app.metrics.set_cache_bytes("response", s.bytes);
        // The cache counts evictions itself; export what happened since the last scrape.
        let seen = app.evictions_exported.swap(s.evictions, Ordering::Relaxed);
        app.metrics
            .record_cache_evictions("response", s.evictions.saturating_sub(seen));
    }
    app.metrics.set_sessions_active(app.sessions.active_count());
    // Budget gauges are read at scrape time, not on every request: with a
    // shared store a status read is a network round trip.
    for k in &app.runtime.load().config.keys {
        if let Some(st) = app.limiter.status(&k.name) {
            app.metrics.set_period_spend(&k.name, st.key.spent_nanos);
            if let Some(rem) = st.key.remaining_nanos {
                app.metrics
                    .set_budget_remaining(&k.name, i64::try_from(rem).unwrap_or(i64::MAX));
            }
        }
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        app.metrics.render(),
    )
        .into_response()
}

pub async fn key_self(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    match caller.0 {
        Some(k) => {
            let status = app.limiter.status(&k.name);
            Json(json!({"name": k.name, "team": k.team, "allow": k.allow, "limits": status}))
                .into_response()
        }
        None => {
            ApiError::invalid_key("No key: the gateway runs with auth = \"none\".").into_response()
        }
    }
}

pub async fn list_models(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let rt = app.runtime.load();
    let data: Vec<Value> = rt
        .config
        .routers
        .keys()
        .map(|r| (r, "triage-router"))
        .chain(rt.config.models.keys().map(|m| (m, "triage")))
        .filter(|(name, _)| caller.0.as_ref().is_none_or(|k| k.may_use(name)))
        .map(
            |(name, owner)| json!({"id": name, "object": "model", "created": 0, "owned_by": owner}),
        )
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Step 1: the body, bounded; over the limit is a 413 envelope.
pub async fn read_body(
    app: &AppState,
    req: Request,
) -> Result<(HeaderMap, Bytes, Option<RequestId>), ApiError> {
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
pub enum Target {
    Router(Arc<crate::config::RouterConfig>),
    Model(Arc<ModelConfig>),
}

/// Step 3: router or model, and may this key use it.
pub fn resolve(rt: &Runtime, caller: &Caller, model: &str) -> Result<Target, ApiError> {
    let target = if let Some(r) = rt.config.routers.get(model) {
        Target::Router(r.clone())
    } else if let Some(m) = rt.config.models.get(model) {
        Target::Model(m.clone())
    } else {
        return Err(ApiError::model_not_found(model));
    };
    if let Some(k) = &caller.0 {
        if !k.may_use(model) {
            return Err(ApiError::forbidden(format!(
                "Key `{}` may not use `{model}`.",
                k.name
            )));
        }
    }
    Ok(target)
}

/// `/v1/completions` and `/v1/embeddings`: same model resolution, body passed through.
async fn passthrough(
    app: &Arc<AppState>,
    caller: &Caller,
    req: Request,
    path: &str,
    allow_routers: bool,
) -> Result<Response, ApiError> {
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
    let d = dispatch(
        app,
        &rt,
        &candidates,
        path,
        |m| {
            let mut b = body.clone();
            b.insert("model".into(), Value::String(m.upstream_model.clone()));
            Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
        },
        tier.as_deref(),
    )
    .await?;
    let mut decision = decision;
    decision.model = d.candidate.model.name.clone();
    decision.fell_back_from = d.fell_back_from;
    decision.skipped = d.skipped;
    let mut resp = if stream {
        let fwd = SseForwarder::new(
            d.response.body,
            false,
            0,
            false,
            Instant::now(),
            Box::new(|_| {}),
        );
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from_stream(fwd))
            .map_err(|e| ApiError::internal(e.to_string()))?
    } else {
        let body = d
            .response
            .collect(MAX_UPSTREAM_BODY)
            .await
            .map_err(|e| ApiError::bad_gateway(e.to_string()))?;
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return Err(ApiError::bad_gateway(format!(
                "Provider for `{}` returned invalid JSON.",
                decision.model
            )));
        }
        json_response(body)
    };
    if let Ok(v) = HeaderValue::from_str(&decision.header_value()) {
        resp.headers_mut().insert("x-triage-route", v);
    }
    Ok(resp)
}

pub async fn completions(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    passthrough(&app, &caller, req, "/completions", true)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn embeddings(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    passthrough(&app, &caller, req, "/embeddings", false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}
