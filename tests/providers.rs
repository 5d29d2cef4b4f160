//! Native providers end to end: Anthropic (Messages API, translated from
//! chat), Azure OpenAI (both URL styles), billing per provider shape and
//! fallback across kinds — against the scriptable mock upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use triage::server::Gateway;

const KEY_ENV: &str = "TRIAGE_PROVIDERS_TEST_KEY";
const SECRET: &str = "sk-ant-test-secret";

/// Providers of every kind on one mock: `anth` (Anthropic), `oa` (OpenAI),
/// `az` (Azure deployment URLs), `azv1` (Azure v1 API).
fn providers_config(up: &MockUpstream) -> String {
    std::env::set_var(KEY_ENV, SECRET);
    let root = up.url.trim_end_matches("/v1");
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
[store]
kind = "memory"
[providers.anth]
kind = "anthropic"
base_url = "{url}"
api_key_env = "{KEY_ENV}"
first_byte_timeout = "2s"
[providers.oa]
kind = "openai"
base_url = "{url}"
responses = true
first_byte_timeout = "2s"
[providers.az]
kind = "azure"
base_url = "{root}"
api_version = "2024-10-21"
api_key_env = "{KEY_ENV}"
[providers.azv1]
kind = "azure"
base_url = "{root}"
api_key_env = "{KEY_ENV}"
[models.claude]
provider = "anth"
upstream_model = "claude-x"
price = {{ input = 3.0, cached_input = 0.30, cache_write = 3.75, output = 15.0 }}
max_output_tokens = 321
[models.gpt]
provider = "oa"
upstream_model = "gpt-x"
price = {{ input = 2.5, cached_input = 1.25, output = 10.0 }}
max_output_tokens = 100
[models.azure-dep]
provider = "az"
upstream_model = "my-deploy"
[models.azure-v1]
provider = "azv1"
upstream_model = "gpt-4o"
[tiers.mixed]
models = ["claude", "gpt"]
[tiers.mixed_back]
models = ["gpt", "claude"]
[routers.to-mixed]
classifier = "none"
unknown_tier = "mixed"
[[routers.to-mixed.rules]]
tier = "mixed"
[routers.to-mixed-back]
classifier = "none"
unknown_tier = "mixed_back"
[[routers.to-mixed-back.rules]]
tier = "mixed_back"
[keys.app]
key_sha256 = "{sha}"
budget = 100.0
"#,
        url = up.url,
        sha = sha(KEY)
    )
}

async fn setup(
    script: impl Fn(&Value, usize) -> Reply + Send + Sync + 'static,
) -> (MockUpstream, Gateway) {
    let up = MockUpstream::start(script).await;
    let gw = start_gateway(&providers_config(&up)).await;
    (up, gw)
}

fn spent(gw: &Gateway) -> u64 {
    common::spent(gw, "app")
}

fn route(h: &reqwest::header::HeaderMap) -> String {
    h["x-triage-route"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn anthropic_provider_json_and_stream() {
    let (up, gw) = setup(|_, _| Reply::Echo).await;
    let (status, _, text) = post_chat(
        &gw,
        json!({"model": "claude", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there"}]}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello there");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // What Anthropic received: the Messages shape, its headers and path.
    let seen = up.last_seen();
    assert_eq!(seen.path_and_query, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], SECRET);
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert!(seen.headers.get("authorization").is_none());
    let sent = up.last_request();
    assert_eq!(sent["model"], "claude-x");
    assert_eq!(
        sent["max_tokens"], 321,
        "the deployment's cap fills max_tokens"
    );
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["messages"][0]["role"], "user");

    // Streaming: chat chunks out, [DONE] last, usage billed.
    let before = spent(&gw);
    let (status, headers, body) = post_chat(
        &gw,
        json!({"model": "claude", "stream": true, "max_tokens": 50,
               "messages": user("stream me please")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(route(&headers).contains("model=claude"));
    assert_eq!(sse_content(&body), "echo: stream me please");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(up.last_request()["stream"], true);
    assert_eq!(up.last_request()["max_tokens"], 50);
    // 4 input tokens at $3, 4 output at $15 per Mtok.
    assert!(
        eventually(|| spent(&gw) - before == 4 * 3_000 + 4 * 15_000).await,
        "{}",
        spent(&gw) - before
    );
}

#[tokio::test]
async fn anthropic_tool_round_trip_is_translated_both_ways() {
    let (up, gw) = setup(|req, _| {
        let last = req["messages"].as_array().and_then(|m| m.last()).cloned();
        let has_result = last
            .and_then(|m| m["content"].as_array().cloned())
            .is_some_and(|b| b.iter().any(|b| b["type"] == "tool_result"));
        if has_result {
            return Reply::Content("It is sunny in Paris.".into());
        }
        Reply::Raw(
            200,
            "application/json",
            json!({"id": "msg_tool", "type": "message", "role": "assistant", "model": "claude-x",
                   "content": [{"type": "text", "text": "Checking."},
                               {"type": "tool_use", "id": "toolu_01", "name": "weather",
                                "input": {"city": "Paris"}}],
                   "stop_reason": "tool_use", "stop_sequence": null,
                   "usage": {"input_tokens": 20, "output_tokens": 10}})
            .to_string(),
        )
    })
    .await;
    let tools = json!([{"type": "function", "function": {"name": "weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let (status, _, text) = post_chat(
        &gw,
        json!({"model": "claude", "tools": tools, "messages": user("weather in Paris?")}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let msg = &v["choices"][0]["message"];
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(msg["tool_calls"][0]["id"], "toolu_01");
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "weather");
    let args: Value = serde_json::from_str(
        msg["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    let sent = up.last_request();
    assert_eq!(sent["tools"][0]["name"], "weather");
    assert_eq!(
        sent["tools"][0]["input_schema"]["required"],
        json!(["city"])
    );

    // Second turn: the tool result goes back as a `tool_result` block.
    let (status, _, text) = post_chat(
        &gw,
        json!({"model": "claude", "tools": tools, "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": msg["tool_calls"].clone()},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "sunny"}]}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "It is sunny in Paris."
    );
    let sent = up.last_request();
    let turns = sent["messages"].as_array().unwrap();
    assert_eq!(turns.len(), 3, "{sent}");
    assert_eq!(turns[1]["role"], "assistant");
    let uses: Vec<&Value> = turns[1]["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .collect();
    assert_eq!(uses[0]["id"], "toolu_01");
    assert_eq!(uses[0]["input"], json!({"city": "Paris"}));
    let result = &turns[2]["content"][0];
    assert_eq!(result["type"], "tool_result");
    assert_eq!(result["tool_use_id"], "toolu_01");
}

#[tokio::test]
async fn azure_urls_in_both_styles() {
    let (up, gw) = setup(|_, _| Reply::Echo).await;
    // Deployment style: the deployment in the path, api-version in the query.
    let (status, _, text) = post_chat(
        &gw,
        json!({"model": "azure-dep", "messages": user("hi azure")}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hi azure");
    let seen = up.last_seen();
    assert_eq!(
        seen.path_and_query,
        "/openai/deployments/my-deploy/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(seen.headers["api-key"], SECRET);
    assert!(seen.headers.get("authorization").is_none());

    // v1 API: the model in the body, no api-version; streaming works the same.
    let (status, _, body) = post_chat(
        &gw,
        json!({"model": "azure-v1", "stream": true, "messages": user("hi v1")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sse_content(&body), "echo: hi v1");
    let seen = up.last_seen();
    assert_eq!(seen.path_and_query, "/openai/v1/chat/completions");
    assert_eq!(seen.headers["api-key"], SECRET);
    assert_eq!(up.last_request()["model"], "gpt-4o");
}

#[tokio::test]
async fn usage_is_billed_once_per_token_class_for_each_shape() {
    let (_up, gw) = setup(|req, _| {
        if req["model"] == "claude-x" {
            Reply::Raw(
                200,
                "application/json",
                json!({"id": "msg_c", "type": "message", "role": "assistant", "model": "claude-x",
                       "content": [{"type": "text", "text": "cached answer"}],
                       "stop_reason": "end_turn", "stop_sequence": null,
                       "usage": {"input_tokens": 100, "cache_read_input_tokens": 2000,
                                 "cache_creation_input_tokens": 1000, "output_tokens": 200}})
                .to_string(),
            )
        } else {
            Reply::Raw(
                200,
                "application/json",
                json!({"id": "chatcmpl-c", "object": "chat.completion", "created": 1, "model": "gpt-x",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
                                 "prompt_tokens_details": {"cached_tokens": 400}}})
                .to_string(),
            )
        }
    })
    .await;
    // Anthropic: 100 plain input at $3, 2000 cache reads at $0.30, 1000 cache
    // writes at $3.75, 200 output at $15 per Mtok = $0.00765.
    let (status, _, text) = post_chat(
        &gw,
        json!({"model": "claude", "messages": user("long prompt")}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 3100);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2000);
    assert!(
        eventually(|| spent(&gw) == 7_650_000).await,
        "{}",
        spent(&gw)
    );
    let me = get_json(&http(), format!("{}/triage/keys/self", gw.base_url())).await;
    assert_eq!(me["limits"]["key"]["spent_nanos"], 7_650_000, "{me}");
    assert_eq!(me["limits"]["key"]["spent_usd"], "0.00765", "{me}");

    // OpenAI: prompt_tokens 1000 include 400 cached: 600 at $2.50, 400 at
    // $1.25, 500 output at $10 = $0.007.
    let (status, _, text) =
        post_chat(&gw, json!({"model": "gpt", "messages": user("again")})).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        eventually(|| spent(&gw) == 7_650_000 + 7_000_000).await,
        "{}",
        spent(&gw)
    );
}

fn overloaded() -> Reply {
    Reply::Status(
        529,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
}

#[tokio::test]
async fn overloaded_anthropic_falls_back_to_openai() {
    let (up, gw) = setup(|req, _| {
        if req["model"] == "claude-x" {
            overloaded()
        } else {
            Reply::Echo
        }
    })
    .await;
    let (status, headers, text) = post_chat(
        &gw,
        json!({"model": "to-mixed", "messages": user("fall over")}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let r = route(&headers);
    assert!(
        r.contains("model=gpt") && r.contains("fallback_from=claude"),
        "{r}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: fall over");
    assert_eq!(up.calls_for("claude-x"), 1);
    assert_eq!(up.calls_for("gpt-x"), 1);

    // Streaming falls back the same way, before the first byte.
    let (status, _, body) = post_chat(
        &gw,
        json!({"model": "to-mixed", "stream": true, "messages": user("stream over")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sse_content(&body), "echo: stream over");
}

#[tokio::test]
async fn rate_limited_openai_falls_back_to_anthropic() {
    let (up, gw) = setup(|req, _| {
        if req["model"] == "gpt-x" {
            Reply::RetryAfter(429, 1)
        } else {
            Reply::Echo
        }
    })
    .await;
    let (status, headers, body) = post_chat(
        &gw,
        json!({"model": "to-mixed-back", "stream": true, "messages": user("back again")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = route(&headers);
    assert!(
        r.contains("model=claude") && r.contains("fallback_from=gpt"),
        "{r}"
    );
    assert_eq!(sse_content(&body), "echo: back again");
    assert_eq!(up.last_seen().path_and_query, "/v1/messages");
}

#[tokio::test]
async fn overloaded_everywhere_reaches_the_client_as_an_error() {
    let (_up, gw) = setup(|_, _| overloaded()).await;
    let (status, _, text) = post_chat(&gw, json!({"model": "claude", "messages": user("x")})).await;
    assert_eq!(status, 502, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("claude"),
        "{text}"
    );
}

#[test]
fn provider_settings_are_validated_per_kind() {
    let toml = r#"
[providers.a]
kind = "anthropic"
responses = true
beta_allow = ["x"]
[providers.z]
kind = "azure"
api_version = "2024-10-21?x=1"
[providers.m]
kind = "mock"
api = "anthropic"
anthropic_version = "2023-06-01"
[models.m]
provider = "m"
"#;
    let err = match triage::config::Config::parse(toml, std::path::Path::new(".")) {
        Ok(_) => panic!("should not validate"),
        Err(e) => e.to_string(),
    };
    for want in [
        "providers.a.responses: only valid with kind = \"openai\"",
        "providers.z.base_url: required",
        "providers.z.api_version: must look like",
        "providers.m.anthropic_version: only valid with kind = \"anthropic\"",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(
        !err.contains("providers.a.base_url"),
        "anthropic has a default base_url:\n{err}"
    );
    assert!(!err.contains("providers.a.beta_allow"), "{err}");
}
