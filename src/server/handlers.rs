//! Endpoint handlers. The chat path follows the numbered steps in `server/mod.rs`.

use super::error::ApiError;
use super::state::{AppState, Runtime};
use super::RequestId;
use crate::auth::{presented_key, KeyIdentity};
use crate::config::{AuthMode, ModelConfig};
use crate::limits::LimitStore;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

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
    let key = caller.name().map(str::to_string);
    req.extensions_mut().insert(caller);
    let mut resp = next.run(req).await;
    // Endpoints that leave no facts of their own still log who called.
    if resp.extensions().get::<super::LogFacts>().is_none() {
        resp.extensions_mut().insert(super::LogFacts {
            key,
            ..Default::default()
        });
    }
    resp
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
    render_metrics(&app).await
}

/// The Prometheus page; also served on `metrics.listen` when set.
pub async fn render_metrics(app: &AppState) -> Response {
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
        if let Some(st) = app.limiter.status(&k.name).await {
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
            let status = app.limiter.status(&k.name).await;
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

pub async fn completions(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    let rid = request_id(&req);
    super::chat::passthrough(&app, &caller, req, "/completions", true, &rid)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn embeddings(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    let rid = request_id(&req);
    super::chat::passthrough(&app, &caller, req, "/embeddings", false, &rid)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn request_id(req: &Request) -> Arc<str> {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from("-"))
}
