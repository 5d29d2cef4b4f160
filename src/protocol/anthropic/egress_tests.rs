#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use serde_json::json;

fn ok(chat: Value) -> Translated {
    chat_to_messages_request_with_drops(&chat, "claude-up").unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn minimal_request_gets_model_and_max_tokens() {
    let t = ok(json!({"model": "auto", "messages": [{"role": "user", "content": "Hi"}]}));
    assert_eq!(
        t.body,
        json!({
            "model": "claude-up",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": DEFAULT_MAX_TOKENS,
        })
    );
    assert!(t.dropped.is_empty());
    let t = ok(
        json!({"model": "auto", "max_tokens": 10, "max_completion_tokens": 20,
        "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(t.body["max_tokens"], 20);
}

#[test]
fn system_and_developer_messages_are_hoisted() {
    let t = ok(json!({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
        {"role": "user", "content": "Hi"},
    ]}));
    assert_eq!(t.body["system"], "Be brief.\n\nUse French.");
    assert_eq!(t.body["messages"].as_array().unwrap().len(), 1);
}

#[test]
fn tool_round_trip_groups_results_into_one_user_turn() {
    let t = ok(json!({"model": "m", "messages": [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:00"}]},
        {"role": "user", "content": "And tomorrow?"},
    ]}));
    assert_eq!(
        t.body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather and time in Paris?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "time", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "14:00"},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ])
    );
}

#[test]
fn tools_and_tool_choice() {
    let base = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "d", "strict": true,
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
                  {"type": "function", "function": {"name": "g"}}]});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        ok(b).body
    };
    assert_eq!(ok(base.clone()).dropped, vec!["tools[].function.strict"]);
    let b = with(json!({}));
    assert_eq!(
        b["tools"],
        json!([
            {"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
            {"name": "g", "input_schema": {"type": "object", "properties": {}}},
        ])
    );
    assert!(b.get("tool_choice").is_none());
    assert_eq!(
        with(json!({"tool_choice": "auto"}))["tool_choice"],
        json!({"type": "auto"})
    );
    assert_eq!(
        with(json!({"tool_choice": "required"}))["tool_choice"],
        json!({"type": "any"})
    );
    assert_eq!(
        with(json!({"tool_choice": "none"}))["tool_choice"],
        json!({"type": "none"})
    );
    assert_eq!(
        with(
            json!({"tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": false})
        )["tool_choice"],
        json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        with(json!({"parallel_tool_calls": false}))["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    let mut builtin = base.clone();
    builtin["tools"] = json!([{"type": "custom", "custom": {"name": "x"}}]);
    assert_eq!(
        chat_to_messages_request(&builtin, "m").unwrap_err().param,
        "tools[0].type"
    );
}

#[test]
fn images_become_base64_or_url_sources() {
    let t = ok(
        json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg", "detail": "high"}},
        ]}]}),
    );
    assert_eq!(
        t.body["messages"][0]["content"],
        json!([
            {"type": "text", "text": "Compare"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/b.jpg"}},
        ])
    );
    assert_eq!(t.dropped, vec!["messages[].content[].image_url.detail"]);
    let e = chat_to_messages_request(
        &json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
        "m",
    )
    .unwrap_err();
    assert_eq!(e.param, "messages[0].content[0].type");
}

#[test]
fn sampling_stop_user_and_drops() {
    let t = ok(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "temperature": 1.7, "top_p": 0.5, "stop": "END", "user": "u1", "stream": true,
        "stream_options": {"include_usage": true}, "seed": 3, "presence_penalty": 0.1, "n": 1,
        "vendor_x": true}),
    );
    let b = &t.body;
    assert_eq!(b["temperature"], 1.0);
    assert!(b.get("top_p").is_none());
    assert_eq!(b["stop_sequences"], json!(["END"]));
    assert_eq!(b["metadata"], json!({"user_id": "u1"}));
    assert_eq!(b["stream"], true);
    let mut d = t.dropped.clone();
    d.sort();
    assert_eq!(
        d,
        vec![
            "presence_penalty",
            "seed",
            "stream_options",
            "top_p",
            "vendor_x"
        ]
    );
    let t = ok(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0.5, "stop": ["a", "b"]}),
    );
    assert_eq!(t.body["top_p"], 0.5);
    assert_eq!(t.body["stop_sequences"], json!(["a", "b"]));
}

#[test]
fn n_above_one_is_refused() {
    let e = chat_to_messages_request(
        &json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}),
        "m",
    )
    .unwrap_err();
    assert_eq!(e.param, "n");
}

#[test]
fn reasoning_effort_becomes_a_thinking_budget() {
    let t = ok(
        json!({"model": "m", "max_tokens": 32000, "reasoning_effort": "medium", "temperature": 0.2,
        "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(
        t.body["thinking"],
        json!({"type": "enabled", "budget_tokens": 4096})
    );
    assert!(t.body.get("temperature").is_none());
    assert_eq!(t.dropped, vec!["temperature"]);
    // The budget stays below max_tokens.
    let t = ok(
        json!({"model": "m", "max_tokens": 5000, "reasoning_effort": "high",
        "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(t.body["thinking"]["budget_tokens"], 4999);
    // Too small a cap for Anthropic's minimum budget: thinking is dropped.
    let t = ok(
        json!({"model": "m", "max_tokens": 500, "reasoning_effort": "low",
        "messages": [{"role": "user", "content": "x"}]}),
    );
    assert!(t.body.get("thinking").is_none());
    assert_eq!(t.dropped, vec!["reasoning_effort"]);
    let t = ok(
        json!({"model": "m", "reasoning_effort": "none", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert!(t.body.get("thinking").is_none());
    assert!(t.dropped.is_empty());
}

#[test]
fn json_modes_become_system_instructions() {
    let t = ok(
        json!({"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}],
        "response_format": {"type": "json_object"}}),
    );
    let sys = t.body["system"].as_str().unwrap();
    assert!(sys.starts_with("S\n\nRespond with a single valid JSON object"));
    let t = ok(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object", "required": ["a"]}}}}),
    );
    let sys = t.body["system"].as_str().unwrap();
    assert!(
        sys.contains("{\"required\":[\"a\"],\"type\":\"object\"}")
            || sys.contains("{\"type\":\"object\",\"required\":[\"a\"]}")
    );
}

#[test]
fn bad_tool_arguments_are_refused_by_field() {
    let e = chat_to_messages_request(
        &json!({"model": "m", "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        ]}),
        "m",
    )
    .unwrap_err();
    assert_eq!(e.param, "messages[1].tool_calls[0].function.arguments");
}

#[test]
fn response_to_chat_with_text_tools_and_thinking() {
    let resp = json!({
        "id": "msg_01ABC", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [
            {"type": "thinking", "thinking": "Let me think.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 30, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50},
    });
    let c = messages_response_to_chat(&resp);
    assert_eq!(c["id"], "chatcmpl-01ABC");
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["model"], "claude-up");
    let choice = &c["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        choice["message"],
        json!({"role": "assistant", "content": "Checking.", "refusal": null,
               "reasoning_content": "Let me think.",
               "tool_calls": [{"id": "toolu_1", "type": "function",
                               "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]})
    );
    assert_eq!(
        c["usage"],
        json!({"prompt_tokens": 160, "completion_tokens": 30, "total_tokens": 190,
               "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 50}})
    );
}

#[test]
fn stop_reasons_map_to_finish_reasons() {
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ] {
        let c = messages_response_to_chat(&json!({"content": [], "stop_reason": stop}));
        assert_eq!(c["choices"][0]["finish_reason"], finish, "{stop}");
    }
}

#[test]
fn anthropic_usage_bills_each_token_class_once() {
    let u = usage_from_messages(&json!({
        "input_tokens": 25, "output_tokens": 400,
        "cache_read_input_tokens": 10_000, "cache_creation_input_tokens": 2_000,
    }))
    .unwrap();
    assert_eq!(
        u,
        Usage {
            prompt_tokens: 12_025,
            completion_tokens: 400,
            cached_tokens: 10_000,
            cache_write_tokens: 2_000,
            estimated: false,
        }
    );
    // Uncached input is what remains: 25 tokens at the input price.
    assert_eq!(u.prompt_tokens - u.cached_tokens - u.cache_write_tokens, 25);
    let u = usage_from_messages(&json!({"input_tokens": 7, "output_tokens": 1})).unwrap();
    assert_eq!(
        (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens),
        (7, 0, 0)
    );
    assert_eq!(usage_from_messages(&json!({"output_tokens": 1})), None);
}

#[test]
fn messages_request_survives_a_round_trip_through_chat() {
    // Ingress then egress: what an Anthropic client sends reaches an
    // Anthropic upstream with the same conversation structure.
    let original = json!({"model": "claude-x", "max_tokens": 2048, "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "text", "text": "Thanks"},
            ]},
        ],
        "tools": [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "auto"}, "stop_sequences": ["END"], "temperature": 0.5});
    let chat = super::super::messages_to_chat(&original).unwrap();
    let back = chat_to_messages_request(&chat, "claude-x").unwrap();
    assert_eq!(back["system"], "Be brief.");
    assert_eq!(back["max_tokens"], 2048);
    assert_eq!(back["stop_sequences"], json!(["END"]));
    assert_eq!(back["temperature"], 0.5);
    assert_eq!(back["tool_choice"], json!({"type": "auto"}));
    assert_eq!(back["tools"], original["tools"]);
    assert_eq!(
        back["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "text", "text": "Thanks"},
            ]},
        ])
    );
}

mod props {
    use super::super::super::{messages_to_chat, ChatToMessagesStream, MessagesToChatStream};
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u32>().prop_map(|n| json!(n)),
            "(user|assistant|system|text|image|tool_use|tool_result|thinking|document|auto|any|tool|[a-z]{0,6})"
                .prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    "(model|messages|role|content|type|text|tools|tool_choice|system|max_tokens|input|id|name|source|choices|delta|tool_calls|index|function|arguments|usage|error|message)",
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn translations_never_panic(v in json_value()) {
            let _ = messages_to_chat(&v);
            let _ = chat_to_messages_request(&v, "m");
            let _ = messages_response_to_chat(&v);
            let _ = super::super::super::chat_to_messages_response(&v, "m");
            let _ = super::super::super::count_tokens(&v);
            let mut a = ChatToMessagesStream::new("m", None);
            let _ = a.push(&v);
            let _ = a.finish();
            let mut b = MessagesToChatStream::new(true);
            let _ = b.push(&v);
        }
    }
}
