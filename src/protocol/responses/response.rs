//! Chat completion → Response object.

use serde_json::{json, Map, Value};

use super::new_id;
use super::request::{RequestFacts, ToolKind};
use crate::usage::Usage;

/// Translates a (non-streamed) chat completion into a Response object.
pub fn chat_to_response(chat: &Value, facts: &RequestFacts) -> Value {
    let choice = chat.pointer("/choices/0");
    let message = choice.and_then(|c| c.get("message"));
    let mut output = Vec::new();

    let text = message
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty());
    let refusal = message
        .and_then(|m| m.get("refusal"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty());
    let finish = choice
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str);
    let (status, incomplete) = status_for(finish);
    if text.is_some() || refusal.is_some() {
        let mut content = Vec::new();
        if let Some(t) = text {
            content.push(output_text_part(t));
        }
        if let Some(r) = refusal {
            content.push(json!({"type": "refusal", "refusal": r}));
        }
        output.push(json!({
            "id": new_id("msg"),
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }));
    }
    for call in message
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let call_id = call.get("id").and_then(Value::as_str).unwrap_or_default();
        let name = call
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        output.push(tool_call_item(
            facts,
            &new_id("fc"),
            call_id,
            name,
            args,
            "completed",
        ));
    }

    let mut resp = response_object(facts, chat.get("model").and_then(Value::as_str));
    resp["status"] = json!(status);
    resp["incomplete_details"] = incomplete;
    resp["output"] = Value::Array(output);
    resp["usage"] = chat.get("usage").map(usage_json).unwrap_or(Value::Null);
    resp
}

pub(super) fn output_text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// A chat tool call as the Responses item the client offered it as: a `function_call`, or a
/// `custom_tool_call` whose free-form input is the `input` string of the translated function.
pub(super) fn tool_call_item(
    facts: &RequestFacts,
    item_id: &str,
    call_id: &str,
    chat_name: &str,
    arguments: &str,
    status: &str,
) -> Value {
    let origin = facts.origin(chat_name);
    let name = origin.map_or(chat_name, |o| o.name.as_str());
    let mut item = Map::new();
    item.insert("id".into(), json!(item_id));
    match origin.map(|o| o.kind) {
        Some(ToolKind::Custom) => {
            item.insert("type".into(), json!("custom_tool_call"));
            item.insert("status".into(), json!(status));
            item.insert("call_id".into(), json!(call_id));
            item.insert("name".into(), json!(name));
            item.insert("input".into(), json!(custom_input(arguments)));
        }
        _ => {
            item.insert("type".into(), json!("function_call"));
            item.insert("status".into(), json!(status));
            item.insert("call_id".into(), json!(call_id));
            item.insert("name".into(), json!(name));
            item.insert("arguments".into(), json!(arguments));
        }
    }
    if let Some(ns) = origin.and_then(|o| o.namespace.as_deref()) {
        item.insert("namespace".into(), json!(ns));
    }
    Value::Object(item)
}

/// The free-form input of a custom tool from the `{"input": "…"}` arguments the model wrote;
/// arguments that are not that shape are passed on as they are rather than lost.
pub(super) fn custom_input(arguments: &str) -> String {
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(m)) => match m.get("input") {
            Some(Value::String(s)) => s.clone(),
            _ => arguments.to_owned(),
        },
        _ => arguments.to_owned(),
    }
}

/// Response status for a chat `finish_reason`.
pub(super) fn status_for(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// A Response object without output: the echoed request fields, in the real API's order.
pub(super) fn response_object(facts: &RequestFacts, upstream_model: Option<&str>) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(facts.response_id));
    m.insert("object".into(), json!("response"));
    m.insert("created_at".into(), json!(facts.created_at));
    m.insert("status".into(), json!("in_progress"));
    m.insert("error".into(), Value::Null);
    m.insert("incomplete_details".into(), Value::Null);
    m.insert(
        "model".into(),
        json!(upstream_model
            .filter(|m| !m.is_empty())
            .unwrap_or(&facts.model)),
    );
    m.insert("output".into(), json!([]));
    for (k, v) in facts.echo() {
        m.insert(k.clone(), v.clone());
    }
    m.insert("usage".into(), Value::Null);
    Value::Object(m)
}

/// Chat `usage` → Responses `usage` (input/output tokens with cached and reasoning details).
pub fn usage_json(chat_usage: &Value) -> Value {
    let u = Usage::from_json(chat_usage).unwrap_or_default();
    let reasoning = chat_usage
        .pointer("/completion_tokens_details/reasoning_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    // Chat usage has no cache writes unless a translating upstream adds them; the field is
    // required by the Responses schema.
    let cache_write = chat_usage
        .pointer("/prompt_tokens_details/cache_write_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": cache_write},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning.min(u.completion_tokens)},
        "total_tokens": u.total(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::protocol::responses::responses_to_chat;

    fn facts(body: Value) -> RequestFacts {
        let mut f = RequestFacts::from_request(&body);
        f.response_id = "resp_test".into();
        f.created_at = 1_700_000_000;
        f
    }

    #[test]
    fn text_completion_becomes_message_item_with_usage() {
        let f = facts(json!({"model": "auto", "input": "hi", "instructions": "be brief"}));
        let chat = json!({
            "id": "chatcmpl-1", "model": "gpt-4o-mini-2024",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hello!", "refusal": null}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                "prompt_tokens_details": {"cached_tokens": 8},
                "completion_tokens_details": {"reasoning_tokens": 2}}
        });
        let r = chat_to_response(&chat, &f);
        assert_eq!(r["id"], "resp_test");
        assert_eq!(r["object"], "response");
        assert_eq!(r["status"], "completed");
        assert_eq!(r["created_at"], 1_700_000_000);
        assert_eq!(r["model"], "gpt-4o-mini-2024");
        assert_eq!(r["instructions"], "be brief");
        assert_eq!(r["tools"], json!([]));
        assert_eq!(r["tool_choice"], "auto");
        assert_eq!(r["store"], true);
        assert_eq!(r["parallel_tool_calls"], true);
        let out = r["output"].as_array().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["type"], "message");
        assert_eq!(out[0]["role"], "assistant");
        assert_eq!(out[0]["status"], "completed");
        assert!(out[0]["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(out[0]["content"][0]["type"], "output_text");
        assert_eq!(out[0]["content"][0]["text"], "Hello!");
        assert_eq!(out[0]["content"][0]["annotations"], json!([]));
        assert_eq!(
            r["usage"],
            json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0},
                   "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 2},
                   "total_tokens": 17})
        );
    }

    #[test]
    fn tool_calls_become_function_call_items_with_call_ids_and_namespaces() {
        let body = json!({"model": "m", "input": [
            {"type": "additional_tools", "tools": [{"type": "namespace", "name": "crm", "description": "",
                "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}]},
            {"role": "user", "content": "x"}],
            "tools": [{"type": "custom", "name": "exec", "description": "run code"}]});
        responses_to_chat(&body, None).unwrap();
        let f = facts(body);
        let chat = json!({"model": "m", "choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":1}"}},
            {"id": "call_2", "type": "function", "function": {"name": "exec", "arguments": "{\"input\":\"ls -la\"}"}},
            {"id": "call_3", "type": "function", "function": {"name": "unknown_fn", "arguments": "{}"}}
        ]}}]});
        let r = chat_to_response(&chat, &f);
        let out = r["output"].as_array().unwrap();
        assert_eq!(out.len(), 3, "{r:#}");
        assert_eq!(out[0]["type"], "function_call");
        assert_eq!(out[0]["call_id"], "call_1");
        assert_eq!(out[0]["name"], "lookup");
        assert_eq!(out[0]["namespace"], "crm");
        assert_eq!(out[0]["arguments"], "{\"q\":1}");
        assert!(out[0]["id"].as_str().unwrap().starts_with("fc_"));
        assert_eq!(out[1]["type"], "custom_tool_call");
        assert_eq!(out[1]["call_id"], "call_2");
        assert_eq!(out[1]["name"], "exec");
        assert_eq!(out[1]["input"], "ls -la");
        assert!(out[1].get("namespace").is_none());
        assert_eq!(out[2]["type"], "function_call");
        assert_eq!(out[2]["name"], "unknown_fn");
        assert_eq!(r["usage"], Value::Null);
    }

    #[test]
    fn length_and_content_filter_are_incomplete() {
        let f = facts(json!({"model": "m", "input": "x", "max_output_tokens": 5}));
        let chat = json!({"choices": [{"finish_reason": "length",
            "message": {"role": "assistant", "content": "trunc"}}]});
        let r = chat_to_response(&chat, &f);
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(r["output"][0]["status"], "incomplete");
        assert_eq!(r["max_output_tokens"], 5);
        assert_eq!(r["model"], "m", "no upstream model: the requested one");
        let chat = json!({"choices": [{"finish_reason": "content_filter",
            "message": {"role": "assistant", "content": null, "refusal": "no"}}]});
        let r = chat_to_response(&chat, &f);
        assert_eq!(r["incomplete_details"]["reason"], "content_filter");
        assert_eq!(
            r["output"][0]["content"][0],
            json!({"type": "refusal", "refusal": "no"})
        );
    }

    #[test]
    fn custom_input_keeps_unexpected_arguments() {
        assert_eq!(custom_input("{\"input\":\"a\\nb\"}"), "a\nb");
        assert_eq!(custom_input("not json"), "not json");
        assert_eq!(custom_input("{\"other\":1}"), "{\"other\":1}");
    }

    #[test]
    fn usage_reasoning_never_exceeds_output() {
        let u = usage_json(&json!({"prompt_tokens": 3, "completion_tokens": 1,
            "completion_tokens_details": {"reasoning_tokens": 9}}));
        assert_eq!(u["output_tokens_details"]["reasoning_tokens"], 1);
        assert_eq!(u["total_tokens"], 4);
        assert_eq!(u["input_tokens_details"]["cached_tokens"], 0);
    }
}
