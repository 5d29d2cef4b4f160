//! Endpoint handlers, each thin: decode the body → `gateway::…` → encode
//! the outcome. The request path is documented in `gateway/mod.rs`.

use super::error::ApiError;
use super::RequestId;
use crate::auth::presented_key;
use crate::config::AuthMode;
use crate::gateway::passthrough::PassRequest;
use crate::gateway::state::AppState;
pub use crate::gateway::Caller;
use crate::gateway::{Api, Body as GatewayBody, Outcome, Reply};
use crate::limits::LimitStore;
use crate::protocol::openai::chat;
use crate::protocol::Headers;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub async fn authenticate(
    State(app): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let rt = app.runtime.load();
    let caller = match rt.config.auth {
        AuthMode::None => Caller(None),
        AuthMode::Keys => {
            if let Some(refused) = super::conn::refuse_if_blocked(&app, &req) {
                return refused;
            }
            let Some(secret) = presented_key(req.headers()) else {
                super::conn::auth_failed(&app, &req, super::conn::AuthFailure::Missing);
                return ApiError::invalid_key(
                    "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`.",
                )
                .into_response();
            };
            match rt.keys.authenticate(secret) {
                Some(id) => Caller(Some(Arc::new(id.clone()))),
                None => {
                    super::conn::auth_failed(&app, &req, super::conn::AuthFailure::Invalid);
                    return ApiError::invalid_key("Incorrect API key provided.").into_response();
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

/// `/metrics` on the API listener: only as the config opens it (see
/// `super::conn::metrics_access`).
pub async fn metrics(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = super::conn::metrics_access(&app.runtime.load().config.metrics, &headers) {
        return e.into_response();
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
            let mut status =
                serde_json::to_value(app.limiter.status(&k.name).await).unwrap_or_default();
            readable_resets(&mut status, std::time::SystemTime::now());
            Json(json!({"name": k.name, "team": k.team, "allow": k.allow, "limits": status}))
                .into_response()
        }
        None => {
            ApiError::invalid_key("No key: the gateway runs with auth = \"none\".").into_response()
        }
    }
}

/// Serde writes a `Duration` as `{"secs","nanos"}`; clients want the wait in
/// seconds (rounded up) and the moment as RFC 3339: `reset_seconds`, `reset_at`.
fn readable_resets(v: &mut Value, now: std::time::SystemTime) {
    match v {
        Value::Object(map) => {
            let dur = map.get("reset").and_then(|r| {
                Some(std::time::Duration::new(
                    r.get("secs")?.as_u64()?,
                    u32::try_from(r.get("nanos")?.as_u64()?).ok()?,
                ))
            });
            if let Some(d) = dur {
                map.remove("reset");
                let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                map.insert("reset_seconds".into(), json!(secs));
                let at =
                    humantime::format_rfc3339_seconds(now + std::time::Duration::from_secs(secs));
                map.insert("reset_at".into(), json!(at.to_string()));
            }
            map.values_mut().for_each(|x| readable_resets(x, now));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| readable_resets(x, now)),
        _ => {}
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

/// `GET /v1/models/{id}`: a router, model or alias the key may use, as
/// OpenAI's `model` object (SDKs' `models.retrieve`); 404 envelope otherwise.
pub async fn get_model(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let rt = app.runtime.load();
    let found = crate::gateway::target::lookup(&rt.config, &id)
        .filter(|(_, name)| caller.0.as_ref().is_none_or(|k| k.may_use(name)));
    match found {
        Some((target, _)) => {
            let owner = match target {
                crate::gateway::target::Target::Router(_) => "triage-router",
                crate::gateway::target::Target::Model(_) => "triage",
            };
            Json(json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
                .into_response()
        }
        None => ApiError::model_not_found(&id).into_response(),
    }
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

pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    let started = std::time::Instant::now();
    let request_id = request_id(&req);
    let (headers, bytes, _) = match read_body(&app, req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let chat = match chat::parse_chat(&bytes) {
        Ok(c) => c,
        Err(e) => return refused(Api::Chat, &app, &caller, started, e.into()),
    };
    let req = crate::gateway::Request {
        api: Api::Chat,
        chat,
        raw: bytes,
        caller,
        headers: header_facts(&headers),
        session_hint: None,
        request_id,
        started,
    };
    encode(crate::gateway::chat(&app, req).await)
}

pub async fn completions(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    passthrough(app, caller, req, Api::Completions).await
}

pub async fn embeddings(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    passthrough(app, caller, req, Api::Embeddings).await
}

async fn passthrough(app: Arc<AppState>, caller: Caller, req: Request, api: Api) -> Response {
    let started = std::time::Instant::now();
    let request_id = request_id(&req);
    let decoded = async {
        let (_, bytes, _) = read_body(&app, req).await?;
        let body = chat::parse_object(&bytes)?;
        let model = chat::model_field(&body)?;
        Ok::<_, ApiError>((body, model))
    };
    let (body, model) = match decoded.await {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    let req = PassRequest {
        api,
        body,
        model,
        caller,
        request_id,
        started,
    };
    encode(crate::gateway::passthrough(&app, req).await)
}

/// A request refused before it reached the gateway still counts, under its API.
pub(super) fn refused(
    api: Api,
    app: &Arc<AppState>,
    caller: &Caller,
    started: std::time::Instant,
    e: ApiError,
) -> Response {
    let facts = crate::gateway::Facts {
        key: caller.name().map(str::to_string),
        ..Default::default()
    };
    encode(crate::gateway::finish(app, api, started, Err(e), facts))
}

/// The header facts the pipeline reads, as plain data.
pub(super) fn header_facts(h: &HeaderMap) -> Headers {
    let mut out = Headers::new();
    for (k, v) in h {
        if let Ok(v) = v.to_str() {
            out.push(k.as_str(), v);
        }
    }
    out
}

/// The gateway's reply as an HTTP response, with its log facts attached.
pub(super) fn encode(reply: Reply) -> Response {
    let Reply { result, facts } = reply;
    let mut resp = match result {
        Ok(o) => outcome_response(o),
        Err(e) => e.into_response(),
    };
    resp.extensions_mut().insert(facts);
    resp
}

fn outcome_response(o: Outcome) -> Response {
    let mut r = match o.body {
        GatewayBody::Json(b) => {
            let mut r = Response::new(Body::from(b));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        GatewayBody::Stream(s) => {
            let mut r = Response::new(Body::from_stream(s));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            r
        }
    };
    for (k, v) in o.headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().append(HeaderName::from_static(k), v);
        }
    }
    r
}

pub(super) fn request_id(req: &Request) -> Arc<str> {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_become_seconds_and_a_timestamp() {
        let mut v = json!({"key": {"requests": {"limit": 5, "reset": {"secs": 12, "nanos": 1}}}});
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        readable_resets(&mut v, now);
        let w = &v["key"]["requests"];
        assert_eq!(w.get("reset"), None);
        assert_eq!(w["reset_seconds"], 13);
        assert_eq!(w["reset_at"], "2023-11-14T22:13:33Z");
    }
}
