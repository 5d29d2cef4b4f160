//! The OpenAI-compatible surface end to end: a real client against the
//! gateway in front of a scripted mock upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_openai::types::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

fn req(model: &str, text: &str, stream: bool) -> async_openai::types::CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .stream(stream)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

#[tokio::test]
async fn sdk_non_streaming_and_streaming() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let client = openai(&gw);

    let r = client
        .chat()
        .create(req("fast", "hello there", false))
        .await
        .unwrap();
    assert_eq!(
        r.choices[0].message.content.as_deref(),
        Some("echo: hello there")
    );
    assert_eq!(r.usage.unwrap().completion_tokens, 3);
    // The alias is resolved to the deployment's upstream name.
    assert_eq!(up.last_request()["model"], "fast-upstream");

    let mut s = client
        .chat()
        .create_stream(req("fast", "stream me please", true))
        .await
        .unwrap();
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        chunks += 1;
        assert!(
            c.usage.is_none(),
            "usage chunk must be stripped when not asked for"
        );
        if let Some(t) = c.choices.first().and_then(|ch| ch.delta.content.clone()) {
            text.push_str(&t);
        }
    }
    assert_eq!(text, "echo: stream me please");
    assert!(chunks >= 5, "forwarded chunk by chunk, got {chunks}");
    // We always ask upstream for usage, for accounting.
    assert_eq!(up.last_request()["stream_options"]["include_usage"], true);
    gw.shutdown().await;
}

#[tokio::test]
async fn usage_chunk_kept_when_client_asks_and_unknown_fields_pass_through() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let (status, headers, body) = post_chat(&gw, json!({
        "model": "fast", "messages": user("hi"), "stream": true,
        "stream_options": {"include_usage": true},
        "seed": 42, "logprobs": false, "vendor_extension": {"x": [1, 2]},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "response_format": {"type": "text"}
    })).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 2);
    let sent = up.last_request();
    assert_eq!(sent["seed"], 42);
    assert_eq!(sent["vendor_extension"], json!({"x": [1, 2]}));
    assert_eq!(sent["tools"][0]["function"]["name"], "lookup");
    assert_eq!(sent["response_format"]["type"], "text");
    gw.shutdown().await;
}

#[tokio::test]
async fn error_envelopes_for_bad_input() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(
        &config(&up.url, "[server]\nmax_body_bytes = 1000\n")
            .replace("[server]\nlisten", "[serverx]\nlisten")
            .replace(
                "[serverx]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n",
                "",
            ),
    )
    .await;
    let url = format!("{}/chat/completions", gw.base_url());
    let c = http();

    let cases: Vec<(reqwest::RequestBuilder, u16, Option<&str>, Option<&str>)> = vec![
        (
            c.post(&url).bearer_auth(KEY).body("{not json"),
            400,
            None,
            None,
        ),
        (
            c.post(&url)
                .bearer_auth(KEY)
                .json(&json!({"messages": user("x")})),
            400,
            Some("model"),
            None,
        ),
        (
            c.post(&url)
                .bearer_auth(KEY)
                .json(&json!({"model": "fast"})),
            400,
            Some("messages"),
            None,
        ),
        (
            c.post(&url)
                .bearer_auth(KEY)
                .json(&json!({"model": "nope", "messages": user("x")})),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            c.post(&url).bearer_auth(KEY).body("x".repeat(5000)),
            413,
            None,
            Some("request_too_large"),
        ),
        (
            c.get(&url).bearer_auth(KEY),
            405,
            None,
            Some("method_not_allowed"),
        ),
        (
            c.post(format!("{}/nothing", gw.base_url()))
                .bearer_auth(KEY),
            404,
            None,
            Some("not_found"),
        ),
        (
            c.post(&url)
                .json(&json!({"model": "fast", "messages": user("x")})),
            401,
            None,
            Some("invalid_api_key"),
        ),
        (
            c.post(&url)
                .bearer_auth("sk-wrong")
                .json(&json!({"model": "fast", "messages": user("x")})),
            401,
            None,
            Some("invalid_api_key"),
        ),
    ];
    for (i, (rb, status, param, code)) in cases.into_iter().enumerate() {
        let r = rb.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "case {i}");
        let v: Value = r.json().await.unwrap();
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "case {i}: {v}"
        );
        assert!(
            e.get("type").is_some() && e.get("param").is_some() && e.get("code").is_some(),
            "case {i}: {v}"
        );
        if let Some(p) = param {
            assert_eq!(e["param"], p, "case {i}");
        }
        if let Some(code) = code {
            assert_eq!(e["code"], code, "case {i}");
        }
    }
    assert_eq!(up.calls(), 0, "bad requests never reach the provider");
    gw.shutdown().await;
}

#[tokio::test]
async fn fallback_before_first_byte_and_upstream_errors() {
    let up = MockUpstream::start(|req, _| match req["model"].as_str() {
        Some("fast-upstream") => Reply::Status(503, json!({"error": {"message": "overloaded"}})),
        _ => Reply::Echo,
    })
    .await;
    let extra = "[models.primary]\nprovider = \"up\"\nupstream_model = \"fast-upstream\"\nfallbacks = [\"smart\"]\n";
    let gw = start_gateway(&config(&up.url, extra)).await;
    let (status, headers, body) =
        post_chat(&gw, json!({"model": "primary", "messages": user("hi")})).await;
    assert_eq!(status, 200, "{body}");
    let route = headers["x-triage-route"].to_str().unwrap();
    assert!(
        route.contains("model=smart") && route.contains("fallback_from=primary"),
        "{route}"
    );
    assert!(route.starts_with("api=chat; "), "{route}");
    assert_eq!(up.calls_for("fast-upstream"), 1);

    // 4xx from the provider passes through untouched, no fallback.
    up.set_script(|_, _| Reply::Status(400, json!({"error": {"message": "bad tool schema", "type": "invalid_request_error", "param": "tools", "code": null}})));
    let (status, _, body) =
        post_chat(&gw, json!({"model": "primary", "messages": user("hi")})).await;
    assert_eq!(status, 400);
    assert!(body.contains("bad tool schema"));

    // Every deployment failing gives a 502 envelope.
    up.set_script(|_, _| Reply::Status(500, json!({})));
    let (status, _, body) = post_chat(&gw, json!({"model": "smart", "messages": user("hi")})).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream_error"));

    // Garbage instead of JSON is a 502 too.
    up.set_script(|_, _| Reply::Raw(200, "application/json", "<html>oops".into()));
    let (status, _, _) = post_chat(&gw, json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(status, 502);
    gw.shutdown().await;
}

#[tokio::test]
async fn first_byte_timeout_is_504_and_refused_connection_is_502() {
    let up =
        MockUpstream::start(|_, _| Reply::Delay(Duration::from_secs(5), Box::new(Reply::Echo)))
            .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let (status, _, body) = post_chat(&gw, json!({"model": "smart", "messages": user("hi")})).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("upstream_timeout"));
    gw.shutdown().await;

    // Nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", dead.local_addr().unwrap());
    drop(dead);
    let gw = start_gateway(&config(&url, "")).await;
    let (status, _, body) = post_chat(&gw, json!({"model": "smart", "messages": user("hi")})).await;
    assert_eq!(status, 502, "{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn broken_stream_ends_with_an_sse_error_event() {
    let up = MockUpstream::start(|_, _| Reply::RawSse {
        pieces: vec![
            "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"partial\"},\"finish_reason\":null}]}\n\n".into(),
        ],
        gap: Duration::ZERO,
    })
    .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let (status, _, body) = post_chat(
        &gw,
        json!({"model": "fast", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let data = sse_data(&body);
    assert_eq!(data.len(), 2, "{body}");
    assert!(data[0].contains("partial"));
    let err: Value = serde_json::from_str(&data[1]).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("[DONE]"));
    assert!(body.ends_with("\n\n"));
    gw.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let up = MockUpstream::start(|_, _| {
        Reply::SlowStream(
            "one two three four five six seven eight nine ten".into(),
            Duration::from_millis(200),
        )
    })
    .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .json(&json!({"model": "fast", "messages": user("hi"), "stream": true}))
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    let first = s.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(s);
    assert!(
        eventually(|| up.state.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 1).await,
        "upstream stream was not cancelled"
    );
    assert_eq!(
        up.state.completed.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn request_ids_models_health_and_passthrough_endpoints() {
    let up = MockUpstream::start(|req, _| {
        if req.get("input").is_some() {
            Reply::Raw(200, "application/json", json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}], "model": req["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}}).to_string())
        } else if req.get("prompt").is_some() {
            Reply::Raw(200, "application/json", json!({"id": "c", "object": "text_completion", "created": 1, "model": req["model"], "choices": [{"index": 0, "text": "done", "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).to_string())
        } else {
            Reply::Echo
        }
    })
    .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let c = http();
    let r = c
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .header("x-request-id", "my-trace-1")
        .json(&json!({"model": "fast", "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "my-trace-1");
    let r = c
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .json(&json!({"model": "fast", "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req-"));

    let models: Value = get_json(&c, format!("{}/models", gw.base_url())).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(models["object"], "list");
    assert!(ids.contains(&"fast") && ids.contains(&"smart"));

    let e: Value = c
        .post(format!("{}/embeddings", gw.base_url()))
        .bearer_auth(KEY)
        .json(&json!({"model": "fast", "input": "hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(e["model"], "fast-upstream");
    let r = c
        .post(format!("{}/completions", gw.base_url()))
        .bearer_auth(KEY)
        .json(&json!({"model": "smart", "prompt": "hello"}))
        .send()
        .await
        .unwrap();
    // Every API names itself in the route header.
    let route = r.headers()["x-triage-route"].to_str().unwrap().to_string();
    assert!(
        route.starts_with("api=completions; ") && route.contains("model=smart"),
        "{route}"
    );
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["choices"][0]["text"], "done");

    let base = format!("http://{}", gw.addr);
    assert_eq!(
        c.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_open_streams_finish() {
    let up = MockUpstream::start(|_, _| {
        Reply::SlowStream("a b c d e".into(), Duration::from_millis(100))
    })
    .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let url = format!("{}/chat/completions", gw.base_url());
    let r = http()
        .post(&url)
        .bearer_auth(KEY)
        .json(&json!({"model": "fast", "messages": user("hi"), "stream": true}))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(async move { r.text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let addr = gw.addr;
    gw.shutdown().await;
    let body = reader.await.unwrap();
    assert_eq!(
        sse_content(&body),
        "echo: hi".replace("echo: hi", "a b c d e")
    );
    assert!(body.ends_with("data: [DONE]\n\n"));
    // The listener is closed.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn builtin_mock_provider_answers_without_network() {
    let toml = "auth = \"none\"\n[store]\nkind = \"memory\"\n[providers.mock]\nkind = \"mock\"\n[models.m]\nprovider = \"mock\"\nupstream_model = \"mock-1\"\n";
    let gw = start_gateway(toml).await;
    let client = openai_with_key(&gw, "anything");
    let r = client
        .chat()
        .create(req("m", "What is a monad?", false))
        .await
        .unwrap();
    let text = r.choices[0].message.content.clone().unwrap();
    assert!(
        text.starts_with("[mock-1] You asked: \"What is a monad?\""),
        "{text}"
    );
    let u = r.usage.unwrap();
    assert!(u.prompt_tokens > 0 && u.completion_tokens == 24);
    let mut s = client
        .chat()
        .create_stream(req("m", "What is a monad?", true))
        .await
        .unwrap();
    let mut streamed = String::new();
    while let Some(c) = s.next().await {
        if let Some(t) = c
            .unwrap()
            .choices
            .first()
            .and_then(|c| c.delta.content.clone())
        {
            streamed.push_str(&t);
        }
    }
    assert_eq!(streamed, text);
    gw.shutdown().await;
}

#[test]
fn shipped_configs_are_valid() {
    std::env::set_var("OPENAI_API_KEY", "test");
    std::env::set_var("GROQ_API_KEY", "test");
    std::env::set_var("TRIAGE_BACKEND_KEY", "test");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files = vec![root.join("triage.toml")];
    for e in std::fs::read_dir(root.join("examples")).unwrap() {
        files.push(e.unwrap().path());
    }
    assert!(files.len() >= 3);
    for f in files {
        if let Err(e) = triage::config::Config::load(&f) {
            panic!("{}: {e}", f.display());
        }
    }
}

#[test]
fn check_command_reports_key_paths_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "auth = \"none\"\n[providers.p]\nkind = \"mock\"\n[models.fast]\nprovider = \"opnai\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["check", "-c", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("models.fast.provider: unknown provider \"opnai\""),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triage"))
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/triage.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn provider_key_and_extra_headers_reach_the_upstream() {
    use axum::http::HeaderMap;
    let seen: std::sync::Arc<std::sync::Mutex<Option<HeaderMap>>> = Default::default();
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |headers: HeaderMap| {
            let s2 = s2.clone();
            async move {
                *s2.lock().unwrap() = Some(headers);
                axum::Json(json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    std::env::set_var("TRIAGE_FOUNDATION_PROVIDER_KEY", "sk-upstream-secret");
    let toml = config(&url, "").replace(
        "first_byte_timeout = \"2s\"",
        "first_byte_timeout = \"2s\"\napi_key_env = \"TRIAGE_FOUNDATION_PROVIDER_KEY\"\nheaders = { \"x-org\" = \"acme\" }",
    );
    let gw = start_gateway(&toml).await;
    let (status, _, body) = post_chat(&gw, json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(status, 200, "{body}");
    let h = seen.lock().unwrap().clone().unwrap();
    assert_eq!(h["authorization"], "Bearer sk-upstream-secret");
    assert_eq!(h["x-org"], "acme");
    assert_eq!(h["content-type"], "application/json");
    // The client's own key never travels upstream.
    assert!(!h["authorization"].to_str().unwrap().contains(KEY));
    gw.shutdown().await;
}
