//! Test harness: a scriptable mock upstream (a real axum server on an
//! ephemeral port) and an in-process gateway in front of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use triage::server::Gateway;

pub mod redis_server;
#[allow(unused_imports)]
pub use redis_server::Redis;

/// A key's limits and usage in a gateway with the in-memory limit store (whose reads are
/// synchronous; a Redis-backed gateway is read through `/v1/triage/keys/self`).
pub fn key_limits(gw: &Gateway, key: &str) -> triage::limits::KeyStatus {
    match &gw.state.limiter {
        triage::limits::LimitBackend::Memory(l) => l.status(key).expect("a configured key"),
        triage::limits::LimitBackend::Redis(_) => panic!("key_limits reads the in-memory store"),
    }
}

/// Settled spend of `key` this period, nano-dollars (in-memory store).
pub fn spent(gw: &Gateway, key: &str) -> u64 {
    key_limits(gw, key).key.spent_nanos
}

/// Requests of `key` in flight (in-memory store).
pub fn in_flight(gw: &Gateway, key: &str) -> u32 {
    key_limits(gw, key).key.in_flight
}

/// What the mock does with one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answer like OpenAI with this content (JSON or SSE per the request).
    Content(String),
    /// Echo the last user message as `echo: <text>`.
    Echo,
    /// A status with a JSON body.
    Status(u16, Value),
    /// Raw SSE bytes, sent piece by piece with `gap` between them; `then_drop`
    /// closes the connection abruptly after the last piece.
    RawSse { pieces: Vec<String>, gap: Duration },
    /// Raw body bytes with a status and content type.
    Raw(u16, &'static str, String),
    /// Wait before doing the inner reply.
    Delay(Duration, Box<Reply>),
    /// Stream this content slowly: one word per `gap`.
    SlowStream(String, Duration),
    /// A status with a Retry-After header.
    RetryAfter(u16, u64),
}

type Script = Box<dyn Fn(&Value, usize) -> Reply + Send + Sync>;

pub struct MockState {
    pub calls: AtomicUsize,
    pub requests: Mutex<Vec<Value>>,
    /// Streams that were dropped before they finished (client or gateway cancelled).
    pub cancelled: AtomicUsize,
    pub completed: AtomicUsize,
    /// Calls per `model` field value.
    pub per_model: Mutex<std::collections::HashMap<String, usize>>,
    /// Path (with query) and headers of every request, in order.
    pub seen: Mutex<Vec<Seen>>,
    script: Mutex<Script>,
}

/// What the mock saw of one request besides its body.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path_and_query: String,
    pub headers: axum::http::HeaderMap,
}

pub struct MockUpstream {
    pub url: String,
    pub state: Arc<MockState>,
}

impl MockUpstream {
    pub async fn start(
        script: impl Fn(&Value, usize) -> Reply + Send + Sync + 'static,
    ) -> MockUpstream {
        let state = Arc::new(MockState {
            calls: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            cancelled: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            per_model: Mutex::new(Default::default()),
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/completions", post(handle))
            .route("/v1/embeddings", post(handle))
            // Anthropic's Messages API: `Content`/`Echo` answer Anthropic-shaped.
            .route("/v1/messages", post(handle_messages))
            // Azure OpenAI, both URL styles (chat-shaped answers).
            .route(
                "/openai/deployments/{deployment}/chat/completions",
                post(handle),
            )
            .route("/openai/v1/chat/completions", post(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        MockUpstream {
            url: format!("http://{addr}/v1"),
            state,
        }
    }

    pub async fn echo() -> MockUpstream {
        Self::start(|_, _| Reply::Echo).await
    }

    pub fn set_script(&self, script: impl Fn(&Value, usize) -> Reply + Send + Sync + 'static) {
        *self.state.script.lock().unwrap() = Box::new(script);
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    pub fn calls_for(&self, model: &str) -> usize {
        self.state
            .per_model
            .lock()
            .unwrap()
            .get(model)
            .copied()
            .unwrap_or(0)
    }

    /// Path, query and headers of the last request.
    pub fn last_seen(&self) -> Seen {
        self.state.seen.lock().unwrap().last().cloned().unwrap()
    }

    pub fn last_request(&self) -> Value {
        self.state
            .requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or(Value::Null)
    }
}

fn last_user(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string()
}

pub fn tokens(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

async fn handle(
    State(st): State<Arc<MockState>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    record(&st, &uri, headers);
    handle_as(st, body, false).await
}

async fn handle_messages(
    State(st): State<Arc<MockState>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    record(&st, &uri, headers);
    handle_as(st, body, true).await
}

fn record(st: &MockState, uri: &axum::http::Uri, headers: axum::http::HeaderMap) {
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    st.seen.lock().unwrap().push(Seen {
        path_and_query,
        headers,
    });
}

async fn handle_as(st: Arc<MockState>, body: Bytes, anthropic: bool) -> Response {
    let n = st.calls.fetch_add(1, Ordering::SeqCst);
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    st.requests.lock().unwrap().push(v.clone());
    let model = v["model"].as_str().unwrap_or("").to_string();
    *st.per_model.lock().unwrap().entry(model).or_default() += 1;
    let reply = (st.script.lock().unwrap())(&v, n);
    respond(st, v, reply, anthropic).await
}

fn respond(
    st: Arc<MockState>,
    v: Value,
    reply: Reply,
    anthropic: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
    Box::pin(async move {
        match reply {
            Reply::Delay(d, inner) => {
                tokio::time::sleep(d).await;
                respond(st, v, *inner, anthropic).await
            }
            Reply::Echo if anthropic => {
                let text = format!("echo: {}", last_user_text(&v));
                anthropic_answer(st, &v, text)
            }
            Reply::Content(text) if anthropic => anthropic_answer(st, &v, text),
            Reply::Echo => {
                let text = format!("echo: {}", last_user(&v));
                answer(st, &v, text, Duration::ZERO)
            }
            Reply::Content(text) => answer(st, &v, text, Duration::ZERO),
            Reply::SlowStream(text, gap) => answer(st, &v, text, gap),
            Reply::Status(code, body) => (axum::http::StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response(),
            Reply::RetryAfter(code, secs) => (
                axum::http::StatusCode::from_u16(code).unwrap(),
                [("retry-after", secs.to_string())],
                axum::Json(json!({"error": {"message": "slow down", "type": "rate_limit_error", "param": null, "code": null}})),
            )
                .into_response(),
            Reply::Raw(code, ctype, body) => (axum::http::StatusCode::from_u16(code).unwrap(), [("content-type", ctype)], body).into_response(),
            Reply::RawSse { pieces, gap } => {
                let guard = DropGuard(st.clone(), false);
                let s = futures::stream::unfold((pieces.into_iter(), guard, true), move |(mut it, mut g, first)| async move {
                    let p = it.next()?;
                    if !first {
                        tokio::time::sleep(gap).await;
                    }
                    g.1 = it.len() == 0;
                    Some((Ok::<_, std::io::Error>(Bytes::from(p)), (it, g, false)))
                });
                Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(s)).unwrap()
            }
        }
    })
}

/// Counts a stream as cancelled when dropped before its last piece went out.
struct DropGuard(Arc<MockState>, bool);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if self.1 {
            self.0.completed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// An OpenAI-shaped answer; streams word by word when the request asks.
fn answer(st: Arc<MockState>, req: &Value, text: String, gap: Duration) -> Response {
    let model = req["model"].as_str().unwrap_or("m").to_string();
    let prompt_tokens: u64 = req["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| tokens(m["content"].as_str().unwrap_or("")))
                .sum()
        })
        .unwrap_or(0)
        + 1;
    let completion_tokens = tokens(&text).max(1);
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    if req["stream"] != json!(true) {
        st.completed.fetch_add(1, Ordering::SeqCst);
        return axum::Json(json!({
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let with_usage = req["stream_options"]["include_usage"] == json!(true);
    let mut pieces = vec![chunk(
        &model,
        json!({"role": "assistant", "content": ""}),
        Value::Null,
        with_usage,
    )];
    for (i, w) in text.split(' ').enumerate() {
        let w = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        pieces.push(chunk(
            &model,
            json!({"content": w}),
            Value::Null,
            with_usage,
        ));
    }
    pieces.push(chunk(&model, json!({}), json!("stop"), with_usage));
    if with_usage {
        pieces.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], "usage": usage})
        ));
    }
    pieces.push("data: [DONE]\n\n".to_string());
    let guard = DropGuard(st, false);
    let s = futures::stream::unfold(
        (pieces.into_iter(), guard, true),
        move |(mut it, mut g, first)| async move {
            let p = it.next()?;
            if !first && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            g.1 = it.len() == 0;
            Some((Ok::<_, std::io::Error>(Bytes::from(p)), (it, g, false)))
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(s))
        .unwrap()
}

/// The last user message's text, whether `content` is a string or blocks.
fn last_user_text(body: &Value) -> String {
    let Some(m) = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
    else {
        return String::new();
    };
    match &m["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// An Anthropic Messages answer (JSON, or SSE events when `stream` is set);
/// tokens are words, as in `answer`.
fn anthropic_answer(st: Arc<MockState>, req: &Value, text: String) -> Response {
    st.completed.fetch_add(1, Ordering::SeqCst);
    let model = req["model"].as_str().unwrap_or("m").to_string();
    let input = tokens(&last_user_text(req)) + 1;
    let output = tokens(&text).max(1);
    if req["stream"] != json!(true) {
        return axum::Json(json!({
            "id": "msg_test", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output},
        }))
        .into_response();
    }
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut out = ev(
        "message_start",
        json!({"type": "message_start", "message": {
        "id": "msg_test", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input, "output_tokens": 1}}}),
    );
    out += &ev(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    );
    for (i, w) in text.split(' ').enumerate() {
        let w = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        out += &ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
        );
    }
    out += &ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    out += &ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}}),
    );
    out += &ev("message_stop", json!({"type": "message_stop"}));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(out))
        .unwrap()
}

fn chunk(model: &str, delta: Value, finish: Value, with_usage: bool) -> String {
    let mut c = json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    if with_usage {
        c["usage"] = Value::Null;
    }
    format!("data: {c}\n\n")
}

/// The demo key used by test configs.
pub const KEY: &str = "sk-test-key";
pub const KEY2: &str = "sk-test-key-2";

pub fn sha(k: &str) -> String {
    triage::auth::sha256_hex(k)
}

/// A config with one OpenAI-kind provider at `url`, models `fast` / `smart`
/// (and `fast2`), tiers `small` / `large`, key `app` (= KEY); `extra` is appended.
pub fn config(url: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
[store]
kind = "memory"
[providers.up]
kind = "openai"
base_url = "{url}"
first_byte_timeout = "2s"
total_timeout = "10s"
[models.fast]
provider = "up"
upstream_model = "fast-upstream"
price = {{ input = 1.0, output = 2.0 }}
max_output_tokens = 100
[models.fast2]
provider = "up"
upstream_model = "fast2-upstream"
price = {{ input = 1.0, output = 2.0 }}
max_output_tokens = 100
[models.smart]
provider = "up"
upstream_model = "smart-upstream"
price = {{ input = 10.0, output = 20.0 }}
max_output_tokens = 100
[tiers.small]
models = ["fast", "fast2"]
fallback_tier = "large"
[tiers.large]
models = ["smart"]
[keys.app]
key_sha256 = "{}"
{extra}
"#,
        sha(KEY)
    )
}

pub async fn start_gateway(toml: &str) -> Gateway {
    let cfg = match triage::config::Config::parse(toml, std::path::Path::new(".")) {
        Ok(c) => c,
        Err(e) => panic!("config invalid:\n{e}"),
    };
    let state = triage::build_state(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::start(state, listener).unwrap()
}

pub fn openai(gw: &Gateway) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    openai_with_key(gw, KEY)
}

pub fn openai_with_key(
    gw: &Gateway,
    key: &str,
) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let cfg = async_openai::config::OpenAIConfig::new()
        .with_api_base(gw.base_url())
        .with_api_key(key);
    async_openai::Client::with_config(cfg)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// POST a chat body with the test key; returns status, headers, body text.
pub async fn post_chat(gw: &Gateway, body: Value) -> (u16, reqwest::header::HeaderMap, String) {
    post_chat_as(gw, KEY, body).await
}

pub async fn post_chat_as(
    gw: &Gateway,
    key: &str,
    body: Value,
) -> (u16, reqwest::header::HeaderMap, String) {
    let r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

/// GET `url` with the test key and parse the JSON answer.
pub async fn get_json(client: &reqwest::Client, url: impl AsRef<str>) -> Value {
    client
        .get(url.as_ref())
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// SSE `data:` payloads of a body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: ").map(str::to_string))
        })
        .collect()
}

/// Content deltas concatenated from SSE chunk payloads.
pub fn sse_content(body: &str) -> String {
    sse_data(body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}
