//! The OpenAI Responses API on ingress, end to end: `POST /v1/responses` translated to chat
//! completions against the mock upstream and back (JSON and streamed), stored responses and
//! `previous_response_id`, `GET`/`DELETE`, and the errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn post(gw: &triage::server::Gateway, key: &str, body: Value) -> (u16, String, String) {
    let r = http()
        .post(format!("{}/responses", gw.base_url()))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let route = r
        .headers()
        .get("x-triage-route")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, route, r.text().await.unwrap())
}

async fn post_ok(gw: &triage::server::Gateway, body: Value) -> Value {
    let (status, _, text) = post(gw, KEY, body).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
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
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

fn output_text(resp: &Value) -> String {
    resp["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().unwrap().iter())
        .filter_map(|p| p["text"].as_str())
        .collect()
}

fn chat_json(message: Value) -> Reply {
    let body = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fast-upstream",
        "choices": [{"index": 0, "message": message, "finish_reason":
            if message.get("tool_calls").is_some() { "tool_calls" } else { "stop" }}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    });
    Reply::Raw(200, "application/json", body.to_string())
}

#[tokio::test]
async fn string_input_answers_a_response_object() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let (status, route, text) = post(&gw, KEY, json!({"model": "fast", "input": "hello"})).await;
    assert_eq!(status, 200, "{text}");
    assert!(route.starts_with("api=responses"), "{route}");
    let resp: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(resp["object"], "response");
    assert_eq!(resp["status"], "completed");
    assert!(resp["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(output_text(&resp), "echo: hello");
    assert!(resp["usage"]["input_tokens"].is_number(), "{resp}");
    let sent = up.last_request();
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "hello"}])
    );
}

#[tokio::test]
async fn item_input_with_developer_and_system_roles() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let resp = post_ok(
        &gw,
        json!({"model": "fast", "instructions": "Be brief.", "input": [
            {"role": "system", "content": "sys rule"},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev rule"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi there"}]},
        ]}),
    )
    .await;
    assert_eq!(output_text(&resp), "echo: hi there");
    let msgs = up.last_request()["messages"].clone();
    let roles: Vec<&str> = msgs
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles.last(), Some(&"user"));
    assert!(roles[..roles.len() - 1]
        .iter()
        .all(|r| *r == "system" || *r == "developer"));
    let text = msgs.to_string();
    assert!(text.contains("Be brief.") && text.contains("sys rule") && text.contains("dev rule"));
}

#[tokio::test]
async fn streaming_emits_the_responses_event_sequence() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let (status, route, text) = post(
        &gw,
        KEY,
        json!({"model": "fast", "input": "stream me", "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(route.starts_with("api=responses"));
    let evs = events(&text);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "response.created");
    assert_eq!(names[1], "response.in_progress");
    assert_eq!(*names.last().unwrap(), "response.completed");
    for want in [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ] {
        assert!(names.contains(&want), "{want} missing: {names:?}");
    }
    for (i, (name, data)) in evs.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i as u64, "{name}");
    }
    let deltas: String = evs
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "echo: stream me");
    let done = &evs.last().unwrap().1["response"];
    assert_eq!(output_text(done), "echo: stream me");
    assert!(done["usage"]["output_tokens"].is_number(), "{done}");
    // Stored before `response.completed` was sent: retrievable at once.
    let got = get_json(
        &http(),
        format!(
            "{}/responses/{}",
            gw.base_url(),
            done["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(got["id"], done["id"]);
}

#[tokio::test]
async fn function_tool_round_trip() {
    let up = MockUpstream::start(|body, _| {
        let has_tool_result = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["role"] == "tool");
        if has_tool_result {
            chat_json(json!({"role": "assistant", "content": "It is sunny."}))
        } else {
            chat_json(
                json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}),
            )
        }
    })
    .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let tools = json!([{"type": "function", "name": "get_weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let first = post_ok(
        &gw,
        json!({"model": "fast", "input": "weather in Paris?", "tools": tools, "store": false}),
    )
    .await;
    let call = first["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .cloned()
        .expect("a function_call item");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["call_id"], "call_1");
    assert_eq!(call["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(
        up.last_request()["tools"][0]["function"]["name"],
        "get_weather"
    );

    let second = post_ok(
        &gw,
        json!({"model": "fast", "tools": tools, "store": false, "input": [
            {"role": "user", "content": "weather in Paris?"},
            call,
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 22C"},
        ]}),
    )
    .await;
    assert_eq!(output_text(&second), "It is sunny.");
    let msgs = up.last_request()["messages"].clone();
    let tool_msg = msgs
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap()
        .clone();
    assert_eq!(tool_msg["tool_call_id"], "call_1");
    assert_eq!(tool_msg["content"], "sunny, 22C");
    assert!(msgs.to_string().contains("\"tool_calls\""));
}

fn two_keys(url: &str) -> String {
    config(
        url,
        &format!("[keys.other]\nkey_sha256 = \"{}\"\n", sha(KEY2)),
    )
}

#[tokio::test]
async fn previous_response_id_continues_for_its_key_only() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&two_keys(&up.url)).await;
    let first = post_ok(&gw, json!({"model": "fast", "input": "my name is Ada"})).await;
    let id = first["id"].as_str().unwrap();
    let second = post_ok(
        &gw,
        json!({"model": "fast", "input": "what is my name?", "previous_response_id": id}),
    )
    .await;
    assert_eq!(second["previous_response_id"], id);
    let msgs = up.last_request()["messages"].clone();
    assert_eq!(
        msgs,
        json!([
            {"role": "user", "content": "my name is Ada"},
            {"role": "assistant", "content": "echo: my name is Ada"},
            {"role": "user", "content": "what is my name?"},
        ])
    );
    // A chain: the third turn sees both earlier ones.
    post_ok(
        &gw,
        json!({"model": "fast", "input": "again", "previous_response_id": second["id"]}),
    )
    .await;
    assert_eq!(up.last_request()["messages"].as_array().unwrap().len(), 5);

    let calls = up.calls();
    let (status, _, text) = post(
        &gw,
        KEY2,
        json!({"model": "fast", "input": "steal", "previous_response_id": id}),
    )
    .await;
    assert_eq!(status, 404, "{text}");
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["error"]["param"], "previous_response_id");
    assert_eq!(up.calls(), calls, "refused before the upstream");
}

#[tokio::test]
async fn get_and_delete_stored_responses() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&two_keys(&up.url)).await;
    let resp = post_ok(&gw, json!({"model": "fast", "input": "keep me"})).await;
    let url = format!(
        "{}/responses/{}",
        gw.base_url(),
        resp["id"].as_str().unwrap()
    );
    let got = get_json(&http(), &url).await;
    assert_eq!(got, resp);

    let other = http().get(&url).bearer_auth(KEY2).send().await.unwrap();
    assert_eq!(other.status(), 404);
    let other = http().delete(&url).bearer_auth(KEY2).send().await.unwrap();
    assert_eq!(other.status(), 404);

    let del = http().delete(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(del.status(), 200);
    let del: Value = del.json().await.unwrap();
    assert_eq!(del["deleted"], true);
    assert_eq!(del["id"], resp["id"]);
    let gone = http().get(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    let gone: Value = gone.json().await.unwrap();
    assert_eq!(gone["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn store_false_keeps_nothing() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    for stream in [false, true] {
        let (status, _, text) = post(
            &gw,
            KEY,
            json!({"model": "fast", "input": "forget me", "store": false, "stream": stream}),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        let id = if stream {
            events(&text).last().unwrap().1["response"]["id"].clone()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["id"].clone()
        };
        let id = id.as_str().unwrap().to_string();
        let r = http()
            .get(format!("{}/responses/{id}", gw.base_url()))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let (status, _, _) = post(
            &gw,
            KEY,
            json!({"model": "fast", "input": "x", "previous_response_id": id}),
        )
        .await;
        assert_eq!(status, 404);
    }
}

#[tokio::test]
async fn a_built_in_tool_is_a_400_naming_it() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let (status, _, text) = post(
        &gw,
        KEY,
        json!({"model": "fast", "input": "search", "tools": [{"type": "web_search"}]}),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("web_search"),
        "{err}"
    );
    assert_eq!(up.calls(), 0);
}

#[tokio::test]
async fn errors_use_the_openai_envelope() {
    let up = MockUpstream::echo().await;
    // A budget below one request's reservation (100 output tokens at $2/M = 200 nano-dollars).
    let extra = "budget = 0.0000001\nperiod = \"total\"\n";
    let gw = start_gateway(&config(&up.url, extra)).await;
    let url = format!("{}/responses", gw.base_url());

    let r = http()
        .post(&url)
        .json(&json!({"model": "fast", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");

    let (status, _, text) = post(&gw, KEY, json!({"model": "nope", "input": "hi"})).await;
    assert_eq!(status, 404, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");

    for stream in [false, true] {
        let (status, _, text) = post(
            &gw,
            KEY,
            json!({"model": "fast", "input": "hi", "stream": stream}),
        )
        .await;
        assert_eq!(status, 429, "{text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert!(
            e["error"]["message"].as_str().unwrap().contains("budget"),
            "{e}"
        );
    }
    assert_eq!(up.calls(), 0);

    let (status, _, text) = post(&gw, KEY, json!({"model": "fast", "input": 5})).await;
    assert_eq!(status, 400, "{text}");
}

#[tokio::test]
async fn a_broken_upstream_stream_ends_with_response_failed() {
    let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fast-upstream",
        "choices": [{"index": 0, "delta": {"content": "partial "}, "finish_reason": null}]});
    let up = MockUpstream::start(move |_, _| Reply::RawSse {
        pieces: vec![format!("data: {chunk}\n\n"), format!("data: {chunk}\n\n")],
        gap: Duration::from_millis(5),
    })
    .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let (status, _, text) = post(
        &gw,
        KEY,
        json!({"model": "fast", "input": "hi", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let evs = events(&text);
    let (name, data) = evs.last().unwrap();
    assert_eq!(name, "response.failed", "{text}");
    assert_eq!(data["response"]["status"], "failed");
    assert!(
        !text.contains("data: {\"error\""),
        "no bare envelope: {text}"
    );
    for (i, (_, d)) in evs.iter().enumerate() {
        assert_eq!(d["sequence_number"], i as u64);
    }
    // A failed response is not kept.
    let id = data["response"]["id"].as_str().unwrap();
    let r = http()
        .get(format!("{}/responses/{id}", gw.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn the_captured_codex_request_is_served() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/agent-requests/codex-cli-0.169.0-responses.json")
            .unwrap(),
    )
    .unwrap();
    let mut body = fixture["body"].clone();
    // Codex asks for its own model name; aliases (another branch) map it, here we name ours.
    body["model"] = json!("fast");
    let r = http()
        .post(format!("{}/responses", gw.base_url()))
        .bearer_auth(KEY)
        .header("session-id", "01a2303a-6d9f-7961-9959-ba0fa8e9ef2f")
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let evs = events(&text);
    assert_eq!(evs.last().unwrap().0, "response.completed", "{text}");
    assert!(!output_text(&evs.last().unwrap().1["response"]).is_empty());
    // `store: false`: nothing kept.
    let id = evs.last().unwrap().1["response"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = http()
        .get(format!("{}/responses/{id}", gw.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn the_session_id_header_feeds_the_key_guard() {
    let up = MockUpstream::echo().await;
    let extra = "[keys.app.guard]\nmax_turns = 1\n";
    let gw = start_gateway(&config(&up.url, extra)).await;
    let send = |sid: &'static str| {
        let url = format!("{}/responses", gw.base_url());
        async move {
            http()
                .post(url)
                .bearer_auth(KEY)
                .header("session-id", sid)
                .json(&json!({"model": "fast", "input": "hi", "store": false}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(send("s-1").await, 200);
    assert_eq!(send("s-1").await, 429, "second turn of a one-turn session");
    assert_eq!(send("s-2").await, 200, "another session");
}
