//! `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`: the OpenAI Responses API,
//! translated to chat completions around `gateway::chat` and back (JSON, or the Responses event
//! stream translated chunk by chunk). Stored responses live in `AppState::responses`.

use super::error::ApiError;
use super::handlers::{encode, header_facts, read_body, refused, request_id, Caller};
use crate::gateway::state::AppState;
use crate::gateway::{Api, Body as GatewayBody, Reply};
use crate::protocol::openai::chat;
use crate::protocol::responses::{self as wire, ChatToResponsesStream, RequestFacts};
use crate::protocol::sse::SseParser;
use crate::store::responses::{ResponseStore, StoredResponse};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

/// Codex sends its conversation id in this header.
const SESSION_HEADER: &str = "session-id";

/// The owner recorded on stored responses; with `auth = "none"` every caller shares one.
fn owner(caller: &Caller) -> String {
    caller.name().unwrap_or("").to_owned()
}

fn not_found(id: &str, param: Option<&str>) -> ApiError {
    let e = ApiError::new(
        404,
        "invalid_request_error",
        None,
        format!("Response with id '{id}' not found."),
    );
    match param {
        Some(p) => e.with_param(p),
        None => e,
    }
}

fn store_failed(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "response store failed");
    ApiError::internal("The stored-response store failed; it has been logged.")
}

/// What a stored response needs once the answer is complete.
struct Keep {
    store: ResponseStore,
    owner: String,
    input_items: Vec<Value>,
}

impl Keep {
    async fn put(self, response: Value, facts: &RequestFacts) {
        let rec = StoredResponse {
            id: facts.response_id.clone(),
            owner: self.owner,
            created_unix_ms: i64::try_from(facts.created_at)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000),
            response,
            input_items: self.input_items,
        };
        // The answer itself succeeded: a store failure is logged, not turned into an error.
        if let Err(e) = self.store.put(rec).await {
            tracing::error!(error = %e, "storing a response failed");
        }
    }
}

pub async fn create(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    let started = Instant::now();
    let request_id = request_id(&req);
    let (headers, bytes, _) = match read_body(&app, req).await {
        Ok(b) => b,
        Err(e) => return refused(Api::Responses, &app, &caller, started, e),
    };
    let body = match chat::parse_object(&bytes) {
        Ok(m) => Value::Object(m),
        Err(e) => return refused(Api::Responses, &app, &caller, started, e.into()),
    };
    let facts = RequestFacts::from_request(&body);
    let owner = owner(&caller);
    let previous = match &facts.previous_response_id {
        None => None,
        Some(id) => match app.responses.get(id, &owner).await {
            Ok(Some(r)) => Some(r.conversation()),
            Ok(None) => {
                let e = not_found(id, Some("previous_response_id"));
                return refused(Api::Responses, &app, &caller, started, e);
            }
            Err(e) => return refused(Api::Responses, &app, &caller, started, store_failed(e)),
        },
    };
    let chat_body = match wire::responses_to_chat(&body, previous.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            let mut err = ApiError::new(e.status, "invalid_request_error", None, e.message);
            err.param = e.param;
            return refused(Api::Responses, &app, &caller, started, err);
        }
    };
    let raw = Bytes::from(chat_body.to_string());
    let chat = match chat::parse_chat(&raw) {
        Ok(c) => c,
        Err(e) => return refused(Api::Responses, &app, &caller, started, e.into()),
    };
    let session = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .or_else(|| wire::session_id(&body))
        .map(str::to_owned);
    let keep = facts.store.then(|| {
        let mut input_items = previous.unwrap_or_default();
        input_items.extend(wire::input_items(&body));
        Keep {
            store: app.responses.clone(),
            owner,
            input_items,
        }
    });
    let req = crate::gateway::Request {
        api: Api::Responses,
        chat,
        raw,
        caller,
        headers: header_facts(&headers),
        session_hint: session,
        request_id,
        started,
    };
    let Reply { result, facts: log } = crate::gateway::chat(&app, req).await;
    let result = match result {
        Ok(mut o) => {
            o.body = match o.body {
                GatewayBody::Json(b) => match json_response(&b, &facts, keep).await {
                    Ok(b) => GatewayBody::Json(b),
                    Err(e) => {
                        return encode(Reply {
                            result: Err(e),
                            facts: log,
                        })
                    }
                },
                GatewayBody::Stream(s) => GatewayBody::Stream(translate_stream(s, facts, keep)),
            };
            Ok(o)
        }
        Err(e) => Err(e),
    };
    encode(Reply { result, facts: log })
}

async fn json_response(
    chat_json: &[u8],
    facts: &RequestFacts,
    keep: Option<Keep>,
) -> Result<Bytes, ApiError> {
    let chat: Value = serde_json::from_slice(chat_json)
        .map_err(|e| ApiError::bad_gateway(format!("The upstream answer is not JSON: {e}")))?;
    let resp = wire::chat_to_response(&chat, facts);
    if let Some(k) = keep {
        k.put(resp.clone(), facts).await;
    }
    Ok(Bytes::from(resp.to_string()))
}

struct Translate {
    inner: BoxStream<'static, Result<Bytes, Infallible>>,
    parser: SseParser,
    conv: ChatToResponsesStream,
    keep: Option<Keep>,
    facts: RequestFacts,
    /// The upstream stream has ended (nothing more to read or send).
    ended: bool,
}

impl Translate {
    /// Translates one batch of chat SSE bytes; a `[DONE]` closes the response (storing it first,
    /// so a `GET` right after `response.completed` finds it).
    async fn feed(&mut self, bytes: &[u8]) -> String {
        let mut events = Vec::new();
        if self.parser.push(bytes, &mut events).is_err() {
            return self
                .conv
                .finish_error("The upstream sent an oversized event.");
        }
        let mut out = String::new();
        for ev in events {
            out.push_str(&self.event(&ev.data, ev.is_done()).await);
        }
        out
    }

    async fn event(&mut self, data: &[u8], done: bool) -> String {
        if self.conv.is_done() {
            return String::new();
        }
        if done {
            let out = self.conv.finish();
            if let Some(k) = self.keep.take() {
                k.put(self.conv.response(), &self.facts).await;
            }
            return out;
        }
        match serde_json::from_slice::<Value>(data) {
            Ok(v) => self.conv.push(&v),
            Err(_) => String::new(),
        }
    }
}

/// The chat SSE stream as the Responses event stream. An upstream that stops without `[DONE]`
/// ends in `response.failed`.
fn translate_stream(
    inner: BoxStream<'static, Result<Bytes, Infallible>>,
    facts: RequestFacts,
    keep: Option<Keep>,
) -> BoxStream<'static, Result<Bytes, Infallible>> {
    let st = Translate {
        inner,
        parser: SseParser::new(),
        conv: ChatToResponsesStream::new(facts.clone()),
        keep,
        facts,
        ended: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.ended {
                return None;
            }
            let out = match st.inner.next().await {
                Some(Ok(bytes)) => st.feed(&bytes).await,
                None => {
                    st.ended = true;
                    let mut out = String::new();
                    if let Some(ev) = st.parser.finish() {
                        out.push_str(&st.event(&ev.data, ev.is_done()).await);
                    }
                    if !st.conv.is_done() {
                        out.push_str(
                            &st.conv
                                .finish_error("The upstream stream ended before completing."),
                        );
                    }
                    out
                }
            };
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), st));
            }
        }
    })
    .boxed()
}

pub async fn retrieve(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match app.responses.get(&id, &owner(&caller)).await {
        Ok(Some(r)) => Json(r.response).into_response(),
        Ok(None) => not_found(&id, None).into_response(),
        Err(e) => store_failed(e).into_response(),
    }
}

pub async fn delete(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match app.responses.delete(&id, &owner(&caller)).await {
        Ok(true) => Json(json!({"id": id, "object": "response", "deleted": true})).into_response(),
        Ok(false) => not_found(&id, None).into_response(),
        Err(e) => store_failed(e).into_response(),
    }
}
