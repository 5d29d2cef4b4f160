//! Anthropic Messages on ingress (`/v1/messages`), end to end against the
//! mock chat upstream: JSON and streams, tools, errors in Anthropic's
//! envelope, aliases, count_tokens, the cache, agent guards, and a captured
//! Claude Code request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use triage::server::Gateway;

/// A router `auto` (no classifier, tier `small`) and aliases: every
/// `claude-*` name into `auto`, one exact name onto the model `smart`.
const ROUTER: &str = r#"
[routers.auto]
classifier = "none"
unknown_tier = "small"
[[routers.auto.rules]]
tier = "small"
"#;

const ALIASES: &str = r#"
[aliases]
"claude-*" = "auto"
"claude-exact-name" = "smart"
"#;

/// `key_extra` goes into `[keys.app]`; `more` after the router and aliases.
fn cfg(url: &str, key_extra: &str, more: &str) -> String {
    config(url, &format!("{key_extra}\n{ROUTER}\n{ALIASES}\n{more}"))
}

async fn post_messages(
    gw: &Gateway,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, HeaderMap, String) {
    let mut r = http()
        .post(format!("{}/messages?beta=true", gw.base_url()))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.text().await.unwrap())
}

fn hello(model: &str) -> Value {
    json!({"model": model, "max_tokens": 128000, "system": "be brief",
           "messages": [{"role": "user", "content": "hi"}]})
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

fn hdr(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// `(event name, data)` of every SSE event.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_string();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(parse)
                .unwrap_or(Value::Null);
            (name, data)
        })
        .collect()
}

/// Event names with runs of the same name collapsed (`content_block_delta`
/// repeats once per chunk).
fn sequence(evs: &[(String, Value)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (n, _) in evs {
        if out.last() != Some(n) {
            out.push(n.clone());
        }
    }
    out
}

fn streamed_text(evs: &[(String, Value)]) -> String {
    evs.iter()
        .filter(|(n, _)| n == "content_block_delta")
        .filter_map(|(_, d)| d["delta"]["text"].as_str().map(str::to_string))
        .collect()
}

fn assert_anthropic_error(status: u16, body: &str, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{body}");
    let v = parse(body);
    assert_eq!(v["type"], "error", "{body}");
    assert_eq!(v["error"]["type"], want_type, "{body}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn json_answer_in_messages_format_with_the_cap_clamped() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    let (status, h, body) = post_messages(&gw, &[], &hello("claude-opus-5-5")).await;
    assert_eq!(status, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-opus-5-5");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["content"][0]["text"], "echo: hi");
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(v["usage"]["output_tokens"].as_u64().unwrap() > 0);
    let route = hdr(&h, "x-triage-route");
    assert!(route.starts_with("api=messages;"), "{route}");
    assert!(route.contains("router=auto"), "{route}");
    // The upstream got a chat request: system first, the cap clamped to the
    // deployment's max_output_tokens (100).
    let sent = up.last_request();
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["messages"][1]["content"], "hi");
    let cap = sent
        .get("max_completion_tokens")
        .or_else(|| sent.get("max_tokens"))
        .cloned();
    assert_eq!(cap, Some(json!(100)), "{sent}");
    gw.shutdown().await;
}

#[tokio::test]
async fn stream_emits_the_anthropic_event_sequence() {
    let up = MockUpstream::start(|_, _| Reply::Content("one two three".into())).await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    let mut body = hello("claude-opus-5-5");
    body["stream"] = json!(true);
    let (status, h, text) = post_messages(&gw, &[], &body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(hdr(&h, "content-type"), "text/event-stream");
    let evs = events(&text);
    assert_eq!(
        sequence(&evs),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{text}"
    );
    assert_eq!(streamed_text(&evs), "one two three");
    let start = &evs[0].1;
    assert_eq!(start["message"]["model"], "claude-opus-5-5");
    assert_eq!(evs[1].1["content_block"]["type"], "text");
    let delta = &evs.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 3);
    // Each data payload names its own event, as Anthropic's do.
    assert!(evs.iter().all(|(n, d)| d["type"] == n.as_str()), "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_broken_upstream_stream_ends_with_an_error_event() {
    let up = MockUpstream::start(|_, _| Reply::RawSse {
        pieces: vec![
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"par\"},\"finish_reason\":null}]}\n\n".into(),
        ],
        gap: std::time::Duration::ZERO,
    })
    .await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    let mut body = hello("claude-opus-5-5");
    body["stream"] = json!(true);
    let (status, _, text) = post_messages(&gw, &[], &body).await;
    assert_eq!(status, 200, "{text}");
    let evs = events(&text);
    let (last_name, last) = evs.last().unwrap();
    assert_eq!(last_name, "error", "{text}");
    assert_eq!(last["type"], "error");
    assert!(last["error"]["type"].is_string());
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"), "{text}");
    assert!(!text.contains("\"object\":\"chat.completion"), "{text}");
    gw.shutdown().await;
}

fn weather_call() -> Reply {
    Reply::Raw(
        200,
        "application/json",
        json!({
            "id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_abc", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
        })
        .to_string(),
    )
}

fn tools() -> Value {
    json!([{"name": "weather", "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
}

#[tokio::test]
async fn tool_round_trip() {
    let up = MockUpstream::start(|req, _| {
        let last = req["messages"].as_array().unwrap().last().unwrap().clone();
        if last["role"] == "tool" {
            Reply::Content("It is sunny in Paris.".into())
        } else {
            weather_call()
        }
    })
    .await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    let ask = json!({"role": "user", "content": "weather in Paris?"});
    let first = json!({"model": "claude-sonnet", "max_tokens": 500, "tools": tools(),
                       "messages": [ask]});
    let (status, _, body) = post_messages(&gw, &[], &first).await;
    assert_eq!(status, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["stop_reason"], "tool_use");
    let block = v["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(block["name"], "weather");
    assert_eq!(block["input"], json!({"city": "Paris"}));
    let id = block["id"].as_str().unwrap().to_string();
    // The upstream saw the tool as a chat function.
    assert_eq!(up.last_request()["tools"][0]["function"]["name"], "weather");

    let second = json!({"model": "claude-sonnet", "max_tokens": 500, "tools": tools(),
        "messages": [ask, {"role": "assistant", "content": [block]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "sunny, 24C"}]}]});
    let (status, _, body) = post_messages(&gw, &[], &second).await;
    assert_eq!(status, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["content"][0]["text"], "It is sunny in Paris.");
    assert_eq!(v["stop_reason"], "end_turn");
    let sent = up.last_request();
    let msgs = sent["messages"].as_array().unwrap();
    let call = msgs.iter().find(|m| m["role"] == "assistant").unwrap();
    assert_eq!(call["tool_calls"][0]["id"], id.as_str());
    let result = msgs.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(result["tool_call_id"], id.as_str());
    gw.shutdown().await;
}

#[tokio::test]
async fn errors_use_the_anthropic_envelope() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    // 401: a wrong x-api-key.
    let r = http()
        .post(format!("{}/messages", gw.base_url()))
        .header("x-api-key", "sk-wrong")
        .json(&hello("claude-opus-5-5"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_anthropic_error(
        status,
        &r.text().await.unwrap(),
        401,
        "authentication_error",
    );
    // 404: a name that is no router, model or alias.
    let (status, _, body) = post_messages(&gw, &[], &hello("gemini-9")).await;
    assert_anthropic_error(status, &body, 404, "not_found_error");
    // 400: translation errors name the field.
    let bad = json!({"model": "claude-opus-5-5", "max_tokens": 10});
    let (status, _, body) = post_messages(&gw, &[], &bad).await;
    assert_anthropic_error(status, &body, 400, "invalid_request_error");
    let (status, _, body) = post_messages(&gw, &[], &json!([1])).await;
    assert_anthropic_error(status, &body, 400, "invalid_request_error");
    assert_eq!(up.calls(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn budget_refusal_is_a_429_rate_limit_error() {
    let up = MockUpstream::echo().await;
    // A budget smaller than one request's reservation.
    let gw = start_gateway(&cfg(&up.url, "budget = 0.000001\nperiod = \"total\"", "")).await;
    let (status, h, body) = post_messages(&gw, &[], &hello("claude-opus-5-5")).await;
    assert_anthropic_error(status, &body, 429, "rate_limit_error");
    assert!(parse(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_lowercase()
        .contains("budget"));
    assert!(hdr(&h, "x-ratelimit-remaining-requests").is_empty() || status == 429);
    assert_eq!(up.calls(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn bearer_and_x_api_key_are_both_accepted_everywhere() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    let r = http()
        .post(format!("{}/messages", gw.base_url()))
        .bearer_auth(KEY)
        .json(&hello("claude-opus-5-5"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .header("x-api-key", KEY)
        .json(&json!({"model": "fast", "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn aliases_resolve_exact_names_before_globs() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    let (status, h, body) = post_messages(&gw, &[], &hello("claude-haiku-4-5")).await;
    assert_eq!(status, 200, "{body}");
    assert!(hdr(&h, "x-triage-route").contains("router=auto"));
    assert_eq!(up.last_request()["model"], "fast-upstream");
    let (status, _, body) = post_messages(&gw, &[], &hello("claude-exact-name")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.last_request()["model"], "smart-upstream");
    // Chat completions see the same aliases.
    let (status, _, body) =
        post_chat(&gw, json!({"model": "claude-x", "messages": user("hi")})).await;
    assert_eq!(status, 200, "{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_alias_to_nothing_is_a_config_error_naming_the_key() {
    let toml = config(
        "http://127.0.0.1:9/v1",
        "[aliases]\n\"claude-*\" = \"nowhere\"\n",
    );
    let err = match triage::config::Config::parse(&toml, std::path::Path::new(".")) {
        Ok(_) => panic!("an alias to nothing must not load"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("aliases"), "{err}");
    assert!(err.contains("nowhere"), "{err}");
}

#[tokio::test]
async fn count_tokens_answers_without_an_upstream_call() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    let r = http()
        .post(format!("{}/messages/count_tokens", gw.base_url()))
        .header("x-api-key", KEY)
        .json(&json!({"model": "claude-opus-5-5", "system": "be brief",
                      "messages": [{"role": "user", "content": "hello there, how are you today?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 0, "{v}");
    let r = http()
        .post(format!("{}/messages/count_tokens", gw.base_url()))
        .header("x-api-key", KEY)
        .json(&json!({"model": "gemini-9", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_anthropic_error(status, &r.text().await.unwrap(), 404, "not_found_error");
    assert_eq!(up.calls(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn models_by_id_for_routers_models_and_aliases() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&cfg(&up.url, "", "")).await;
    for (id, owner) in [
        ("auto", "triage-router"),
        ("fast", "triage"),
        ("claude-opus-5-5", "triage-router"),
        ("claude-exact-name", "triage"),
    ] {
        let v = get_json(&http(), format!("{}/models/{id}", gw.base_url())).await;
        assert_eq!(v["id"], id);
        assert_eq!(v["object"], "model");
        assert_eq!(v["owned_by"], owner, "{id}");
    }
    let r = http()
        .get(format!("{}/models/nope", gw.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    gw.shutdown().await;
}

#[tokio::test]
async fn cache_hits_replay_in_messages_format_and_stay_per_api() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&cfg(&up.url, "", "[cache]\nenabled = true\nttl = \"1m\"")).await;
    let body = json!({"model": "claude-opus-5-5", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "cache me"}]});
    let (status, _, first) = post_messages(&gw, &[], &body).await;
    assert_eq!(status, 200, "{first}");
    let (status, h, second) = post_messages(&gw, &[], &body).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(hdr(&h, "x-triage-cache"), "hit");
    let v = parse(&second);
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "echo: cache me");
    assert_eq!(up.calls(), 1);
    // Streamed, the hit replays as Anthropic events.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, h, text) = post_messages(&gw, &[], &streamed).await;
    assert_eq!(status, 200, "{text}");
    let evs = events(&text);
    assert_eq!(evs.first().unwrap().0, "message_start", "{text}");
    assert_eq!(evs.last().unwrap().0, "message_stop", "{text}");
    assert_eq!(streamed_text(&evs), "echo: cache me");
    if hdr(&h, "x-triage-cache") == "hit" {
        assert_eq!(up.calls(), 1);
    }
    // A chat request for the same conversation is not answered from the
    // Messages entry.
    let calls = up.calls();
    let (status, h, _) = post_chat(
        &gw,
        json!({"model": "claude-opus-5-5", "max_tokens": 50, "messages": user("cache me")}),
    )
    .await;
    assert_eq!(status, 200);
    assert_ne!(hdr(&h, "x-triage-cache"), "hit");
    assert_eq!(up.calls(), calls + 1);
    gw.shutdown().await;
}

const GUARD: &str = "[routers.auto.guard]\nmax_turns = 2\n";

#[tokio::test]
async fn claude_code_session_header_hits_max_turns() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &format!("{ROUTER}\n{GUARD}\n{ALIASES}"))).await;
    let s = [("x-claude-code-session-id", "sess-1")];
    for turn in 1..=2 {
        let (status, _, body) = post_messages(&gw, &s, &hello("claude-opus-5-5")).await;
        assert_eq!(status, 200, "turn {turn}: {body}");
    }
    let (status, h, body) = post_messages(&gw, &s, &hello("claude-opus-5-5")).await;
    assert_anthropic_error(status, &body, 429, "rate_limit_error");
    assert!(body.contains("turns=2/2"), "{body}");
    assert!(!hdr(&h, "x-triage-session-limit").is_empty());
    // Another session is untouched.
    let other = [("x-claude-code-session-id", "sess-2")];
    let (status, _, _) = post_messages(&gw, &other, &hello("claude-opus-5-5")).await;
    assert_eq!(status, 200);
    assert_eq!(up.calls(), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn claude_code_metadata_user_id_names_the_session() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &format!("{ROUTER}\n{GUARD}\n{ALIASES}"))).await;
    let mut body = hello("claude-opus-5-5");
    body["metadata"] =
        json!({"user_id": "{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"meta-1\"}"});
    for _ in 0..2 {
        let (status, _, b) = post_messages(&gw, &[], &body).await;
        assert_eq!(status, 200, "{b}");
    }
    let (status, _, b) = post_messages(&gw, &[], &body).await;
    assert_anthropic_error(status, &b, 429, "rate_limit_error");
    gw.shutdown().await;
}

#[tokio::test]
async fn repeated_tool_use_is_detected_as_a_loop() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &format!(
            "{ROUTER}\n[routers.auto.guard]\nloop = {{ k = 3, action = \"block\" }}\n{ALIASES}"
        ),
    ))
    .await;
    // The agent keeps calling the same tool with the same input (keys in
    // another order: arguments are compared canonically).
    let mut messages = vec![json!({"role": "user", "content": "find the weather"})];
    for i in 0..3 {
        let input = if i % 2 == 0 {
            json!({"city": "Paris", "units": "c"})
        } else {
            json!({"units": "c", "city": "Paris"})
        };
        messages.push(json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": format!("toolu_{i}"), "name": "weather", "input": input}]}));
        messages.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": format!("toolu_{i}"), "content": "no data"}]}));
    }
    let body = json!({"model": "claude-opus-5-5", "max_tokens": 100, "tools": tools(),
                      "messages": messages});
    let (status, h, text) = post_messages(&gw, &[], &body).await;
    assert_anthropic_error(status, &text, 422, "invalid_request_error");
    assert!(hdr(&h, "x-triage-loop").contains("weather"), "{h:?}");
    assert_eq!(up.calls(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn captured_claude_code_request_is_served_on_a_one_dollar_budget() {
    let capture: Value = serde_json::from_str(include_str!(
        "fixtures/agent-requests/claude-code-2.1.328-messages.json"
    ))
    .unwrap();
    let body = capture["body"].clone();
    assert_eq!(body["max_tokens"], 128000);
    let up = MockUpstream::start(|_, _| Reply::Content("hello".into())).await;
    // `smart` costs $20 per Mtok of output: 128000 tokens would reserve
    // $2.56, more than the budget; clamped to its 100, it fits.
    let gw = start_gateway(&config(
        &up.url,
        "budget = 1.0\nperiod = \"total\"\n[aliases]\n\"claude-*\" = \"smart\"\n",
    ))
    .await;
    let session = capture["headers"]["X-Claude-Code-Session-Id"]
        .as_str()
        .unwrap()
        .to_string();
    let beta = capture["headers"]["anthropic-beta"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _, text) = post_messages(
        &gw,
        &[
            ("x-claude-code-session-id", &session),
            ("anthropic-beta", &beta),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let evs = events(&text);
    assert_eq!(evs.first().unwrap().0, "message_start", "{text}");
    assert_eq!(evs.last().unwrap().0, "message_stop", "{text}");
    assert_eq!(streamed_text(&evs), "hello");
    let sent = up.last_request();
    assert_eq!(sent["model"], "smart-upstream");
    assert_eq!(sent["stream"], true);
    gw.shutdown().await;
}

#[tokio::test]
async fn no_healthy_deployment_is_529_overloaded() {
    let up = MockUpstream::start(|_, _| {
        Reply::Status(
            500,
            json!({"error": {"message": "down", "type": "api_error"}}),
        )
    })
    .await;
    let gw = start_gateway(&config(
        &up.url,
        r#"
[tiers.solo]
models = ["fast"]
cooldown_after = 1
cooldown = "30s"
[routers.auto]
classifier = "none"
unknown_tier = "solo"
[[routers.auto.rules]]
tier = "solo"
[aliases]
"claude-*" = "auto"
"#,
    ))
    .await;
    let (status, _, body) = post_messages(&gw, &[], &hello("claude-opus-5-5")).await;
    assert!(status >= 500, "{status} {body}");
    assert_eq!(parse(&body)["type"], "error", "{body}");
    // Now the only deployment is cooling: Anthropic's 529, which clients retry.
    let (status, _, body) = post_messages(&gw, &[], &hello("claude-opus-5-5")).await;
    assert_anthropic_error(status, &body, 529, "overloaded_error");
    assert_eq!(up.calls(), 1);
    gw.shutdown().await;
}
