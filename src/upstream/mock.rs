//! The built-in mock provider: an OpenAI-compatible server that answers with
//! deterministic, plausible text and realistic token counts. The gateway
//! calls it in-process (no network); `triage mock-upstream` serves it on a
//! socket for benchmarks. `/v1/messages` answers like Anthropic's Messages
//! API: the request is translated to chat, answered, and the answer
//! translated back with the gateway's own translators.

use crate::config::MockSettings;
use crate::usage::estimate_tokens;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const FILLER: &[&str] = &[
    "In short, the key point is to start from what you already know.",
    "A good first step is to break the problem into smaller parts.",
    "This depends on the details, but the usual approach works well here.",
    "Most people find that a simple, direct answer is the most useful.",
    "Consider the trade-offs before committing to one option.",
    "Here is a concise summary of the main idea.",
    "The example below shows the general pattern.",
    "That covers the essentials; ask if you want more depth.",
];

struct MockState {
    settings: MockSettings,
    calls: AtomicU64,
    /// Hashes of conversation prefixes seen before: a repeat is reported as
    /// cached tokens, like a provider's prompt cache.
    prefixes: parking_lot::Mutex<std::collections::HashSet<u64>>,
}

/// Forgets the prompt cache past this many prefixes (bounded memory).
const MAX_PREFIXES: usize = 10_000;

/// The mock's HTTP surface under `/v1`.
pub fn router(settings: MockSettings) -> Router {
    let state = Arc::new(MockState {
        settings,
        calls: AtomicU64::new(0),
        prefixes: Default::default(),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}})),
    )
        .into_response()
}

/// Deterministic reply words for a prompt.
fn reply_words(model: &str, prompt: &str, n_words: u32) -> Vec<String> {
    let snippet: String = prompt
        .split_whitespace()
        .take(8)
        .collect::<Vec<_>>()
        .join(" ");
    let mut text = format!("[{model}] You asked: \"{snippet}\".");
    // Only the tag names the model: the same prompt gets the same body from
    // every mock deployment, so votes across deployments can agree.
    let mut h = fnv(prompt);
    let mut words: Vec<String> = Vec::new();
    loop {
        for w in text.split_whitespace() {
            if words.len() as u32 >= n_words {
                return words;
            }
            words.push(w.to_string());
        }
        text = FILLER[(h % FILLER.len() as u64) as usize].to_string();
        h = h.rotate_left(7).wrapping_mul(0x9E3779B97F4A7C15);
    }
}

struct Plan {
    model: String,
    words: Vec<String>,
    finish: &'static str,
    prompt_tokens: u64,
    /// Tokens of the conversation prefix already seen (prompt cache hit).
    cached_tokens: u64,
    /// `(name, arguments JSON)` when the mock answers with a tool call.
    tool_call: Option<(String, String)>,
}

/// A value that validates against a (simple) JSON schema: every property,
/// the first enum value, minimums for numbers, one item for arrays.
fn sample(schema: &Value) -> Value {
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(e) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return e.clone();
    }
    for k in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema
            .get(k)
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        {
            return sample(first);
        }
    }
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        // `["string", "null"]`: the first non-null type.
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match ty {
        "object" => {
            let mut o = serde_json::Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    o.insert(k.clone(), sample(v));
                }
            }
            Value::Object(o)
        }
        "array" => {
            let n = schema
                .get("minItems")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1);
            let item = sample(schema.get("items").unwrap_or(&Value::Null));
            Value::Array((0..n.min(16)).map(|_| item.clone()).collect())
        }
        "integer" => json!(schema.get("minimum").and_then(Value::as_i64).unwrap_or(1)),
        "number" => json!(schema.get("minimum").and_then(Value::as_f64).unwrap_or(1.5)),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => {
            let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
            let mut t = "example".to_string();
            while t.len() < min {
                t.push('x');
            }
            json!(t)
        }
    }
}

/// The tool the last user message names (or `tool_choice` forces), when the
/// request offers tools and the last turn is the user's.
fn wanted_tool(body: &Value, last_user: &str, last_role: &str) -> Option<(String, String)> {
    let tools = body.get("tools")?.as_array()?;
    if last_role != "user" || tools.is_empty() {
        return None;
    }
    let name_of = |t: &Value| {
        t.pointer("/function/name")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let forced = body
        .pointer("/tool_choice/function/name")
        .and_then(Value::as_str);
    let required = body.get("tool_choice").and_then(Value::as_str) == Some("required");
    let lower = last_user.to_lowercase();
    let tool = tools.iter().find(|t| {
        name_of(t)
            .is_some_and(|n| forced.map_or_else(|| lower.contains(&n.to_lowercase()), |f| f == n))
    });
    let tool = tool.or_else(|| required.then(|| tools.first()).flatten())?;
    let args = sample(
        tool.pointer("/function/parameters")
            .unwrap_or(&json!({"type": "object"})),
    );
    Some((name_of(tool)?, args.to_string()))
}

/// Tokens of the longest conversation prefix (all but the last message)
/// seen before; records every prefix of this one.
fn cached_prefix(st: &MockState, messages: &[Value]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut tokens = 0;
    let mut cached = 0;
    let mut seen = st.prefixes.lock();
    if seen.len() > MAX_PREFIXES {
        seen.clear();
    }
    for m in messages.iter().take(messages.len().saturating_sub(1)) {
        h = fnv(&format!("{h}{m}"));
        let t = crate::protocol::openai::chat::content_text(m).unwrap_or_default();
        tokens += estimate_tokens(&t) + 4;
        if !seen.insert(h) {
            cached = tokens;
        }
    }
    cached
}

fn plan(st: &MockState, body: &Value) -> Result<Plan, Response> {
    let settings = &st.settings;
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "missing field `model`"))?
        .to_string();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "missing field `messages`"))?;
    let mut prompt_tokens = 0;
    let mut last_user = String::new();
    let mut last_role = "";
    let mut tool_result = None;
    for m in messages {
        let t = crate::protocol::openai::chat::content_text(m).unwrap_or_default();
        prompt_tokens += estimate_tokens(&t) + 4;
        last_role = m.get("role").and_then(Value::as_str).unwrap_or("");
        match last_role {
            "user" => last_user = t.into_owned(),
            "tool" => tool_result = Some(t.into_owned()),
            _ => {}
        }
    }
    let cached_tokens = cached_prefix(st, messages);
    if let Some((name, args)) = wanted_tool(body, &last_user, last_role) {
        return Ok(Plan {
            model,
            words: Vec::new(),
            finish: "tool_calls",
            prompt_tokens: prompt_tokens + 3,
            cached_tokens,
            tool_call: Some((name, args)),
        });
    }
    if last_role == "tool" {
        // After a tool result: answer from it in text.
        last_user = format!("the tool said {}", tool_result.unwrap_or_default());
    }
    let cap = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let mut words = reply_words(&model, &last_user, settings.reply_words);
    let mut finish = "stop";
    if (words.len() as u64) > cap {
        words.truncate(cap as usize);
        finish = "length";
    }
    // JSON mode is honoured by the larger mocks; like many small local models,
    // the `small` ones ignore it (which lets a cascade's json gate escalate).
    let wants_json = matches!(
        body.pointer("/response_format/type")
            .and_then(Value::as_str),
        Some("json_object") | Some("json_schema")
    );
    if wants_json && !model.contains("small") && finish == "stop" {
        let answer = match body.pointer("/response_format/json_schema/schema") {
            Some(schema) => sample(schema).to_string(),
            None => json!({ "answer": words.join(" ") }).to_string(),
        };
        words = answer.split(' ').map(str::to_string).collect();
    }
    Ok(Plan {
        model,
        words,
        finish,
        prompt_tokens: prompt_tokens + 3,
        cached_tokens: cached_tokens.min(prompt_tokens + 3),
        tool_call: None,
    })
}

async fn chat(State(st): State<Arc<MockState>>, body: Bytes) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    answer_chat(&st, body).await
}

fn anthropic_error(status: StatusCode, kind: &str, msg: &str) -> Response {
    (
        status,
        Json(crate::protocol::anthropic::error_body(kind, msg)),
    )
        .into_response()
}

/// The Messages API, answered through chat and the shared translators.
async fn messages(State(st): State<Arc<MockState>>, body: Bytes) -> Response {
    use crate::protocol::anthropic::{
        chat_to_messages_response, messages_to_chat, ChatToMessagesStream,
    };
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return anthropic_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("invalid JSON: {e}"),
            )
        }
    };
    if req.get("max_tokens").and_then(Value::as_u64).is_none() {
        // Required by the real API; the gateway must always fill it in.
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
        );
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let mut chat = match messages_to_chat(&req) {
        Ok(c) => c,
        Err(e) => {
            return anthropic_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &e.to_string(),
            )
        }
    };
    let stream = chat.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if stream {
        chat["stream_options"] = json!({"include_usage": true});
    }
    let resp = answer_chat(&st, chat).await;
    if !resp.status().is_success() {
        return anthropic_error(
            resp.status(),
            "invalid_request_error",
            "mock refused the request",
        );
    }
    let body = resp.into_body();
    if !stream {
        let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024 * 1024).await else {
            return anthropic_error(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "mock body");
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        return Json(chat_to_messages_response(&v, &model)).into_response();
    }
    let mut parser = crate::protocol::sse::SseParser::new();
    let mut tr = ChatToMessagesStream::new(&model, None);
    let frames = body
        .into_data_stream()
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .map(move |chunk| {
            let mut out = bytes::BytesMut::new();
            match chunk {
                Some(Ok(c)) => {
                    let mut evs = Vec::new();
                    if parser.push(&c, &mut evs).is_err() {
                        out.extend_from_slice(&tr.finish_error("event too large"));
                    }
                    for ev in evs.iter().filter(|e| !e.is_done()) {
                        if let Ok(v) = serde_json::from_slice::<Value>(&ev.data) {
                            out.extend_from_slice(&tr.push(&v));
                        }
                    }
                }
                Some(Err(e)) => out.extend_from_slice(&tr.finish_error(&e.to_string())),
                None => out.extend_from_slice(&tr.finish()),
            }
            Ok::<_, std::convert::Infallible>(out.freeze())
        })
        .filter(|b| futures::future::ready(!matches!(b, Ok(b) if b.is_empty())));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(frames))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "mock response"))
}

async fn answer_chat(st: &MockState, body: Value) -> Response {
    let n = st.calls.fetch_add(1, Ordering::Relaxed);
    let p = match plan(st, &body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !st.settings.latency.is_zero() {
        tokio::time::sleep(st.settings.latency).await;
    }
    let id = format!("chatcmpl-mock{n:012}");
    let created = now();
    let n_choices = body
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 16);
    let call_id = format!("call_mock{n:012}");
    let tool_calls = p.tool_call.as_ref().map(|(name, args)| {
        json!([{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}])
    });
    let per_choice = match &p.tool_call {
        Some((_, args)) => estimate_tokens(args).max(1),
        None => p.words.len() as u64,
    };
    let completion_tokens = per_choice * n_choices;
    let usage = json!({
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": p.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": p.cached_tokens},
    });
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let message = match &tool_calls {
            Some(calls) => {
                json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": calls})
            }
            None => json!({"role": "assistant", "content": p.words.join(" "), "refusal": null}),
        };
        let choices: Vec<Value> = (0..n_choices)
            .map(|i| json!({"index": i, "message": message, "logprobs": null, "finish_reason": p.finish}))
            .collect();
        return Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": p.model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
            "usage": usage,
        }))
        .into_response();
    }
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let usage_field = if include_usage {
        Some(Value::Null)
    } else {
        None
    };
    let chunk = |i: u64, delta: Value, finish: Value| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": p.model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": i, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if let (Some(u), Some(obj)) = (&usage_field, c.as_object_mut()) {
            obj.insert("usage".into(), u.clone());
        }
        crate::protocol::sse::frame(c.to_string().as_bytes())
    };
    let mut frames: Vec<Bytes> = Vec::with_capacity((p.words.len() + 4) * n_choices as usize);
    for c in 0..n_choices {
        frames.push(chunk(
            c,
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ));
        if let Some((name, args)) = &p.tool_call {
            frames.push(chunk(
                c,
                json!({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                       "function": {"name": name, "arguments": args}}]}),
                Value::Null,
            ));
        }
        for (i, w) in p.words.iter().enumerate() {
            let piece = if i == 0 { w.clone() } else { format!(" {w}") };
            frames.push(chunk(c, json!({"content": piece}), Value::Null));
        }
        frames.push(chunk(c, json!({}), json!(p.finish)));
    }
    if include_usage {
        let u = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": p.model,
            "system_fingerprint": "fp_mock", "choices": [], "usage": usage,
        });
        frames.push(crate::protocol::sse::frame(u.to_string().as_bytes()));
    }
    frames.push(Bytes::from_static(crate::protocol::sse::DONE_FRAME));
    let tps = st.settings.tokens_per_second;
    let gap = if tps == 0 {
        Duration::ZERO
    } else {
        Duration::from_micros(1_000_000 / tps as u64)
    };
    let stream =
        futures::stream::iter(frames.into_iter().enumerate()).then(move |(i, f)| async move {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            Ok::<_, std::convert::Infallible>(f)
        });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "mock response"))
}

async fn completions(State(st): State<Arc<MockState>>, Json(body): Json<Value>) -> Response {
    st.calls.fetch_add(1, Ordering::Relaxed);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let prompt = match body.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    if !st.settings.latency.is_zero() {
        tokio::time::sleep(st.settings.latency).await;
    }
    let words = reply_words(&model, &prompt, st.settings.reply_words);
    let pt = estimate_tokens(&prompt);
    let ct = words.len() as u64;
    Json(json!({
        "id": "cmpl-mock", "object": "text_completion", "created": now(), "model": model,
        "choices": [{"index": 0, "text": words.join(" "), "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
    }))
    .into_response()
}

async fn embeddings(State(st): State<Arc<MockState>>, Json(body): Json<Value>) -> Response {
    st.calls.fetch_add(1, Ordering::Relaxed);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        _ => return error(StatusCode::BAD_REQUEST, "missing field `input`"),
    };
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .clamp(1, 4096) as usize;
    let mut tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            tokens += estimate_tokens(t);
            let mut h = fnv(t);
            let v: Vec<f64> = (0..dims)
                .map(|_| {
                    h = h.rotate_left(13).wrapping_mul(0x9E3779B97F4A7C15);
                    ((h >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
                })
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    Json(json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
    .into_response()
}

async fn models() -> Response {
    Json(json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "triage"}]}))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_deterministic_and_sized() {
        let a = reply_words("m", "What is Rust?", 30);
        let b = reply_words("m", "What is Rust?", 30);
        assert_eq!(a, b);
        assert_eq!(a.len(), 30);
        assert_ne!(a, reply_words("m", "What is Go?", 30));
    }
}
