//! The request Codex CLI 0.169.0 really sends translates, and its answer comes back in the
//! shape Codex dispatches on (namespaced function calls, custom tool calls).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};

use super::*;

fn codex_body() -> Value {
    let raw =
        include_str!("../../../tests/fixtures/agent-requests/codex-cli-0.169.0-responses.json");
    let captured: Value = serde_json::from_str(raw).unwrap();
    captured["body"].clone()
}

#[test]
fn codex_request_translates_to_chat() {
    let body = codex_body();
    let chat = responses_to_chat(&body, None).unwrap();

    assert_eq!(chat["model"], "gpt-6.1-sol");
    assert_eq!(chat["stream"], true);
    assert_eq!(chat["stream_options"], json!({"include_usage": true}));
    assert_eq!(chat["reasoning_effort"], "low");
    assert_eq!(chat["tool_choice"], "auto");
    assert_eq!(chat["parallel_tool_calls"], false);
    // Gateway-only or OpenAI-only fields do not reach a chat upstream.
    for dropped in [
        "store",
        "include",
        "prompt_cache_key",
        "client_metadata",
        "text",
        "reasoning",
        "input",
        "verbosity",
    ] {
        assert!(
            chat.get(dropped).is_none(),
            "{dropped} leaked into {chat:#}"
        );
    }

    // Four developer messages become system messages, then the two user messages, in order.
    let messages = chat["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["system", "system", "system", "system", "user", "user"]
    );
    assert!(messages.iter().all(|m| m["content"].is_string()));
    assert_eq!(messages[5]["content"], "Reply with the word hello");
    // The three text parts of the second developer message stay in one message.
    assert_eq!(
        messages[1]["content"]
            .as_str()
            .unwrap()
            .matches("characters of client text")
            .count(),
        3
    );

    // The tools of the additional_tools item, flattened out of their namespaces.
    let tools = chat["tools"].as_array().unwrap();
    let names: Vec<&str> = tools
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(tools.len(), 11, "{names:?}");
    for expected in [
        "exec",
        "wait",
        "request_user_input",
        "sleep",
        "spawn_agent",
        "wait_agent",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(tools.iter().all(|t| t["type"] == "function"));
    let exec = tools
        .iter()
        .find(|t| t["function"]["name"] == "exec")
        .unwrap();
    assert_eq!(exec["function"]["parameters"]["required"], json!(["input"]));
    assert!(
        exec["function"]["parameters"]["properties"]["input"]["description"]
            .as_str()
            .unwrap()
            .contains("PRAGMA_LINE")
    );
    let wait = tools
        .iter()
        .find(|t| t["function"]["name"] == "wait")
        .unwrap();
    assert_eq!(
        wait["function"]["parameters"]["required"],
        json!(["cell_id"])
    );
    assert_eq!(wait["function"]["strict"], false);
}

#[test]
fn codex_facts_session_and_classifier_text() {
    let body = codex_body();
    let facts = RequestFacts::from_request(&body);
    assert!(!facts.store, "Codex sends store: false");
    assert!(facts.stream);
    let exec = facts.origin("exec").unwrap();
    assert_eq!(exec.namespace.as_deref(), Some("functions"));
    assert_eq!(
        facts.origin("sleep").unwrap().namespace.as_deref(),
        Some("clock")
    );
    assert_eq!(
        session_id(&body),
        Some("01a2303a-6d9f-7961-9959-ba0fa8e9ef2f")
    );
    assert_eq!(
        newest_human_text(&body).as_deref(),
        Some("Reply with the word hello")
    );
}

#[test]
fn codex_tool_calls_come_back_namespaced() {
    let body = codex_body();
    let mut stream = ChatToResponsesStream::new(RequestFacts::from_request(&body));
    let mut sse = stream.start();
    sse.push_str(
        &stream.push(&json!({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_x", "type": "function",
         "function": {"name": "exec", "arguments": "{\"input\":\"console.log(1)\"}"}},
        {"index": 1, "id": "call_y", "type": "function",
         "function": {"name": "sleep", "arguments": "{\"duration_ms\":10}"}}]}}]})),
    );
    sse.push_str(&stream.finish());
    assert!(sse.contains("event: response.custom_tool_call_input.done"));
    let out = &stream.response()["output"];
    assert_eq!(out[0]["type"], "custom_tool_call");
    assert_eq!(out[0]["namespace"], "functions");
    assert_eq!(out[0]["name"], "exec");
    assert_eq!(out[0]["input"], "console.log(1)");
    assert_eq!(out[1]["type"], "function_call");
    assert_eq!(out[1]["namespace"], "clock");
    assert_eq!(out[1]["name"], "sleep");

    // The next turn sends the calls and their outputs back; they translate to chat history.
    let mut next = body.clone();
    let input = next["input"].as_array_mut().unwrap();
    input.push(out[0].clone());
    input.push(out[1].clone());
    input.push(json!({"type": "custom_tool_call_output", "call_id": "call_x", "output": "1"}));
    input.push(json!({"type": "function_call_output", "call_id": "call_y", "output": "slept"}));
    let chat = responses_to_chat(&next, None).unwrap();
    let msgs = chat["messages"].as_array().unwrap();
    let assistant = &msgs[msgs.len() - 3];
    assert_eq!(assistant["tool_calls"][0]["function"]["name"], "exec");
    assert_eq!(
        assistant["tool_calls"][0]["function"]["arguments"],
        "{\"input\":\"console.log(1)\"}"
    );
    assert_eq!(assistant["tool_calls"][1]["function"]["name"], "sleep");
    assert_eq!(msgs[msgs.len() - 1]["tool_call_id"], "call_y");
}
