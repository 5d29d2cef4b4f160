//! The built-in mock provider: an OpenAI-compatible server that answers with
//! deterministic, plausible text and realistic token counts. The gateway
//! calls it in-process (no network); `triage mock-upstream` serves it on a
//! socket for benchmarks.

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
}

/// The mock's HTTP surface under `/v1`.
pub fn router(settings: MockSettings) -> Router {
    let state = Arc::new(MockState {
        settings,
        calls: AtomicU64::new(0),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat))
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
}

fn plan(settings: &MockSettings, body: &Value) -> Result<Plan, Response> {
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
    for m in messages {
        let t = crate::protocol::openai::chat::content_text(m).unwrap_or_default();
        prompt_tokens += estimate_tokens(&t) + 4;
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user = t.into_owned();
        }
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
        let answer = json!({ "answer": words.join(" ") }).to_string();
        words = answer.split(' ').map(str::to_string).collect();
    }
    Ok(Plan {
        model,
        words,
        finish,
        prompt_tokens: prompt_tokens + 3,
    })
}

async fn chat(State(st): State<Arc<MockState>>, body: Bytes) -> Response {
    let n = st.calls.fetch_add(1, Ordering::Relaxed);
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    let p = match plan(&st.settings, &body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !st.settings.latency.is_zero() {
        tokio::time::sleep(st.settings.latency).await;
    }
    let id = format!("chatcmpl-mock{n:012}");
    let created = now();
    let completion_tokens = p.words.len() as u64;
    let usage = json!({
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": p.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    });
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        return Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": p.model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": p.words.join(" ")},
                         "logprobs": null, "finish_reason": p.finish}],
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
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": p.model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if let (Some(u), Some(obj)) = (&usage_field, c.as_object_mut()) {
            obj.insert("usage".into(), u.clone());
        }
        crate::protocol::sse::frame(c.to_string().as_bytes())
    };
    let mut frames: Vec<Bytes> = Vec::with_capacity(p.words.len() + 4);
    frames.push(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ));
    for (i, w) in p.words.iter().enumerate() {
        let piece = if i == 0 { w.clone() } else { format!(" {w}") };
        frames.push(chunk(json!({"content": piece}), Value::Null));
    }
    frames.push(chunk(json!({}), json!(p.finish)));
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
