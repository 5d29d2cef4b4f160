//! Anthropic Messages on ingress: `POST /v1/messages` and
//! `/v1/messages/count_tokens`. The body is translated to a chat request
//! (`protocol::anthropic`), runs through `gateway::chat` like any other, and
//! the answer is translated back: JSON whole, streams event by event. Every
//! error on these routes leaves in Anthropic's envelope (`anthropic_errors`).

use super::handlers::{encode, header_facts, read_body, refused, request_id, Caller};
use crate::gateway::state::AppState;
use crate::gateway::{Api, Body as GatewayBody, Reply};
use crate::protocol::anthropic::{self, ChatToMessagesStream};
use crate::protocol::openai::chat;
use crate::protocol::sse::SseParser;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use futures::StreamExt;
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

use super::error::ApiError;

/// `POST /v1/messages` (Claude Code adds `?beta=true`; the query is ignored).
pub async fn messages(
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
    let decoded = decode(&bytes);
    let (body, chat) = match decoded {
        Ok(d) => d,
        Err(e) => return refused(Api::Messages, &app, &caller, started, e),
    };
    let requested_model = chat.model.clone();
    let input_estimate = chat.features.prompt_tokens;
    let req = crate::gateway::Request {
        api: Api::Messages,
        session_hint: anthropic::session_id(&body),
        chat,
        raw: bytes,
        caller,
        headers: header_facts(&headers),
        request_id,
        started,
    };
    let reply = crate::gateway::chat(&app, req).await;
    encode(translate_reply(reply, &requested_model, input_estimate))
}

/// `POST /v1/messages/count_tokens`: the gateway's own estimate (the same
/// one limits and reservations use); no upstream call.
pub async fn count_tokens(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let (_, bytes, _) = match read_body(&app, req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => return ApiError::invalid_request("The body is not a JSON object.").into_response(),
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    let rt = app.runtime.load();
    if crate::gateway::target::lookup(&rt.config, model).is_none() {
        return ApiError::model_not_found(model).into_response();
    }
    match anthropic::count_tokens(&body) {
        Ok(n) => Json(json!({"input_tokens": n})).into_response(),
        Err(e) => protocol_error(e).into_response(),
    }
}

/// The Messages body → (the body as JSON, the chat request it translates to).
fn decode(bytes: &[u8]) -> Result<(Value, chat::ChatRequest), ApiError> {
    let body: Value = match serde_json::from_slice(bytes) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return Err(ApiError::invalid_request("The body is not a JSON object.")),
        Err(e) => {
            return Err(ApiError::invalid_request(format!(
                "The body is not valid JSON: {e}"
            )))
        }
    };
    let translated = anthropic::messages_to_chat_with_drops(&body).map_err(protocol_error)?;
    if !translated.dropped.is_empty() {
        tracing::debug!(dropped = ?translated.dropped, "messages fields not carried to chat");
    }
    let chat_bytes = serde_json::to_vec(&translated.body)
        .map_err(|e| ApiError::internal(format!("translated request unwritable: {e}")))?;
    let chat = chat::parse_chat(&chat_bytes)?;
    Ok((body, chat))
}

fn protocol_error(e: anthropic::ProtocolError) -> ApiError {
    ApiError::invalid_request(e.message).with_param(e.param)
}

/// The chat answer (live or replayed from the cache) in Messages format.
fn translate_reply(reply: Reply, model: &str, input_estimate: u64) -> Reply {
    let Reply { result, facts } = reply;
    let result = result.and_then(|mut o| {
        o.body = match o.body {
            GatewayBody::Json(b) => {
                let chat: Value = serde_json::from_slice(&b).map_err(|e| {
                    ApiError::internal(format!("The upstream answer is not JSON: {e}"))
                })?;
                let msg = anthropic::chat_to_messages_response(&chat, model);
                GatewayBody::Json(Bytes::from(msg.to_string()))
            }
            GatewayBody::Stream(s) => GatewayBody::Stream(translate_stream(
                s,
                ChatToMessagesStream::new(model, Some(input_estimate)),
            )),
        };
        Ok(o)
    });
    Reply { result, facts }
}

type FrameStream = futures::stream::BoxStream<'static, Result<Bytes, std::convert::Infallible>>;

/// Chat SSE frames → Anthropic events, as each frame arrives. A stream that
/// ends without `[DONE]` (the upstream broke) ends with `event: error`.
fn translate_stream(chat: FrameStream, tr: ChatToMessagesStream) -> FrameStream {
    struct St {
        chat: FrameStream,
        tr: ChatToMessagesStream,
        sse: SseParser,
        done: bool,
    }
    let st = St {
        chat,
        tr,
        sse: SseParser::new(),
        done: false,
    };
    Box::pin(futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let Some(Ok(chunk)) = st.chat.next().await else {
                st.done = true;
                let mut out = Vec::new();
                if let Some(ev) = st.sse.finish() {
                    out.extend_from_slice(&on_event(&mut st.tr, &ev));
                }
                if !st.tr.is_ended() {
                    out.extend_from_slice(
                        &st.tr.finish_error(
                            "The upstream stream ended before the answer was complete.",
                        ),
                    );
                }
                return (!out.is_empty()).then(|| (Ok(Bytes::from(out)), st));
            };
            let mut events = Vec::new();
            if st.sse.push(&chunk, &mut events).is_err() {
                st.done = true;
                let b = st
                    .tr
                    .finish_error("The upstream sent an oversized stream event.");
                return Some((Ok(b), st));
            }
            let mut out = Vec::new();
            for ev in &events {
                out.extend_from_slice(&on_event(&mut st.tr, ev));
            }
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), st));
            }
        }
    }))
}

fn on_event(tr: &mut ChatToMessagesStream, ev: &crate::protocol::sse::SseEvent) -> Bytes {
    if ev.is_done() {
        return tr.finish();
    }
    match serde_json::from_slice::<Value>(&ev.data) {
        Ok(v) => tr.push(&v),
        Err(_) => Bytes::new(),
    }
}

/// Error responses on the Messages routes (authentication, body size, the
/// gateway's refusals) in Anthropic's envelope and statuses: the rest of the
/// stack writes OpenAI's, so this rewrites it at the edge of these routes.
pub async fn anthropic_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let openai: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let (status, body) = anthropic::error_from_openai(parts.status.as_u16(), &openai);
    parts.status = StatusCode::from_u16(status).unwrap_or(parts.status);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body.to_string()))
}
