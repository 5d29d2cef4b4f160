//! The built-in mock speaks chat and Anthropic like the real APIs: `n`, tool
//! calls, JSON schemas, `refusal: null`, cached tokens on a repeated prefix
//! — through the gateway, in both protocols.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use triage::server::Gateway;

fn mock_config() -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
kind = "memory"
[providers.chat]
kind = "mock"
reply_words = 12
[providers.claude]
kind = "mock"
api = "anthropic"
reply_words = 12
[models.m-chat]
provider = "chat"
upstream_model = "mock-large-chat"
[models.m-claude]
provider = "claude"
upstream_model = "mock-large-claude"
[keys.app]
key_sha256 = "{}"
"#,
        sha(KEY)
    )
}

async fn gateway() -> Gateway {
    start_gateway(&mock_config()).await
}

async fn chat(gw: &Gateway, body: Value) -> (Value, reqwest::header::HeaderMap) {
    let (status, headers, text) = post_chat(gw, body).await;
    assert_eq!(status, 200, "{text}");
    (serde_json::from_str(&text).unwrap(), headers)
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}}])
}

#[tokio::test]
async fn both_protocols_answer_text_and_the_route_shows_the_translation() {
    let gw = gateway().await;
    for model in ["m-chat", "m-claude"] {
        let (v, h) = chat(
            &gw,
            json!({"model": model, "messages": user("What is Rust?")}),
        )
        .await;
        let msg = &v["choices"][0]["message"];
        assert!(
            msg["content"].as_str().unwrap().contains("You asked"),
            "{v}"
        );
        assert_eq!(msg["refusal"], Value::Null, "{v}");
        assert!(msg.as_object().unwrap().contains_key("refusal"));
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let route = h["x-triage-route"].to_str().unwrap();
        assert_eq!(
            route.contains("upstream_api=anthropic"),
            model == "m-claude",
            "{route}"
        );
        // Streaming too.
        let (status, _, body) = post_chat(
            &gw,
            json!({"model": model, "stream": true, "messages": user("What is Rust?")}),
        )
        .await;
        assert_eq!(status, 200);
        assert!(sse_content(&body).contains("You asked"), "{body}");
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    }
}

#[tokio::test]
async fn n_is_honoured_on_chat() {
    let gw = gateway().await;
    let (v, _) = chat(
        &gw,
        json!({"model": "m-chat", "n": 3, "messages": user("three please")}),
    )
    .await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert_eq!(choices[2]["index"], 2);
    assert_eq!(v["usage"]["completion_tokens"], 36);
}

#[tokio::test]
async fn tool_round_trip_in_both_protocols() {
    let gw = gateway().await;
    for model in ["m-chat", "m-claude"] {
        let (v, _) = chat(
            &gw,
            json!({"model": model, "tools": weather_tool(),
                   "messages": user("Please call get_weather for Paris")}),
        )
        .await;
        assert_eq!(
            v["choices"][0]["finish_reason"], "tool_calls",
            "{model}: {v}"
        );
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "example", "unit": "celsius"}));
        // Without naming the tool, the mock answers in text.
        let (v, _) = chat(
            &gw,
            json!({"model": model, "tools": weather_tool(), "messages": user("hello")}),
        )
        .await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        // After the tool result: text that uses it.
        let (v, _) = chat(
            &gw,
            json!({"model": model, "tools": weather_tool(), "max_tokens": 50, "messages": [
                {"role": "user", "content": "Please call get_weather for Paris"},
                {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
                {"role": "tool", "tool_call_id": call["id"].clone(), "content": "sunny"}]}),
        )
        .await;
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.contains("sunny"), "{model}: {v}");
    }
}

#[tokio::test]
async fn json_schema_answers_validate() {
    let gw = gateway().await;
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 18},
        "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "tags", "ok"], "additionalProperties": false});
    let (v, _) = chat(
        &gw,
        json!({"model": "m-chat", "messages": user("a person"),
               "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": true}}}),
    )
    .await;
    let answer: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        answer,
        json!({"name": "example", "age": 18, "tags": ["example"], "ok": true})
    );
}

#[tokio::test]
async fn a_repeated_prefix_reports_cached_tokens() {
    let gw = gateway().await;
    let long = "You are a careful assistant who answers questions about geography. ".repeat(20);
    for model in ["m-chat", "m-claude"] {
        let body = |q: &str| {
            json!({"model": model, "messages": [
                {"role": "system", "content": long}, {"role": "user", "content": q}]})
        };
        let (v, _) = chat(&gw, body("first question")).await;
        assert_eq!(
            v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
            "{model}: {v}"
        );
        let (v, _) = chat(&gw, body("second question")).await;
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached > 100, "{model}: {v}");
        assert!(cached < v["usage"]["prompt_tokens"].as_u64().unwrap());
    }
}

#[test]
fn the_demo_config_has_an_anthropic_speaking_deployment_in_the_large_tier() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/triage.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let cfg = match triage::config::Config::parse(
        &text,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
    ) {
        Ok(c) => c,
        Err(e) => panic!("demo config invalid:\n{e}"),
    };
    assert_eq!(cfg.tiers["large"].models, ["mock-large", "mock-claude"]);
    let provider = &cfg.providers[&cfg.models["mock-claude"].provider];
    match &provider.kind {
        triage::config::ProviderKind::Mock(m) => {
            assert_eq!(m.api, triage::config::raw::MockApi::Anthropic)
        }
        other => panic!("{other:?}"),
    }
}
