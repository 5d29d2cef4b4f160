#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use serde_json::json;

fn ok(body: Value) -> Translated {
    messages_to_chat_with_drops(&body).unwrap_or_else(|e| panic!("{e}"))
}

fn err(body: Value) -> ProtocolError {
    match messages_to_chat(&body) {
        Ok(v) => panic!("accepted, translated to {v}"),
        Err(e) => e,
    }
}

#[test]
fn minimal_request_translates() {
    let t = ok(json!({
        "model": "claude-x", "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello"}],
    }));
    assert_eq!(
        t.body,
        json!({
            "model": "claude-x",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_completion_tokens": 100,
        })
    );
    assert!(t.dropped.is_empty());
}

#[test]
fn system_as_string_or_blocks() {
    let t = ok(json!({
        "model": "m", "max_tokens": 1, "system": "Be brief.",
        "messages": [{"role": "user", "content": "hi"}],
    }));
    assert_eq!(
        t.body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    let t = ok(json!({
        "model": "m", "max_tokens": 1,
        "system": [
            {"type": "text", "text": "One."},
            {"type": "text", "text": "Two.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [{"role": "user", "content": "hi"}],
    }));
    assert_eq!(
        t.body["messages"][0],
        json!({"role": "system", "content": "One.\n\nTwo."})
    );
    assert_eq!(t.dropped, vec!["system.*.cache_control"]);
    let e = err(
        json!({"model": "m", "max_tokens": 1, "system": [{"type": "image"}],
        "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(e.param, "system.0");
}

#[test]
fn user_blocks_text_and_images() {
    let t = ok(json!({
        "model": "m", "max_tokens": 1,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        ]}],
    }));
    assert_eq!(
        t.body["messages"][0],
        json!({"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
        ]})
    );
    let e = err(
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}),
    );
    assert_eq!(e.param, "messages.0.content.0.source.type");
}

#[test]
fn tool_round_trip_becomes_tool_calls_and_tool_messages() {
    let t = ok(json!({
        "model": "m", "max_tokens": 1,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
                 "content": [{"type": "text", "text": "clock"}, {"type": "text", "text": "broken"}]},
                {"type": "text", "text": "Thanks"},
            ]},
        ],
    }));
    let m = t.body["messages"].as_array().unwrap();
    assert_eq!(
        m[1],
        json!({"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "toolu_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
        ]})
    );
    assert_eq!(
        m[2],
        json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C"})
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "toolu_2", "content": "[tool error] clock\nbroken"})
    );
    assert_eq!(m[4], json!({"role": "user", "content": "Thanks"}));
    assert_eq!(m.len(), 5);
    assert_eq!(t.dropped, vec!["messages.*.content.*"]);
}

#[test]
fn assistant_with_only_tool_calls_has_null_content() {
    let t = ok(json!({"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
    ]}));
    assert_eq!(t.body["messages"][1]["content"], Value::Null);
    assert_eq!(
        t.body["messages"][2],
        json!({"role": "tool", "tool_call_id": "t", "content": ""})
    );
}

#[test]
fn images_inside_tool_results_follow_as_user_content() {
    let t = ok(json!({"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "text", "text": "screenshot:"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAA"}},
        ]}]},
    ]}));
    assert_eq!(
        t.body["messages"][0],
        json!({"role": "tool", "tool_call_id": "t", "content": "screenshot:"})
    );
    assert_eq!(
        t.body["messages"][1],
        json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAA"}}]})
    );
}

#[test]
fn documents_text_is_kept_pdf_is_refused() {
    let t = ok(
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "abc"}},
        ]}]}),
    );
    assert_eq!(t.body["messages"][0]["content"], "Notes\n\nabc");
    let e = err(
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "summarise"},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}},
        ]}]}),
    );
    assert_eq!(e.param, "messages.0.content.1");
    assert!(e.message.contains("plain-text documents"));
}

#[test]
fn unknown_block_types_are_refused_by_name() {
    let e = err(
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "search_result", "source": "x"}]}]}),
    );
    assert_eq!(e.param, "messages.0.content.0.type");
    assert!(e.message.contains("search_result"));
}

#[test]
fn tools_and_tool_choice() {
    let base = json!({"model": "m", "max_tokens": 1,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"name": "get_weather", "description": "Weather", "cache_control": {"type": "ephemeral"},
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]});
    let with_choice = |c: Value| {
        let mut b = base.clone();
        b["tool_choice"] = c;
        ok(b)
    };
    let t = with_choice(json!({"type": "auto"}));
    assert_eq!(
        t.body["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    );
    assert_eq!(t.body["tool_choice"], "auto");
    assert_eq!(t.dropped, vec!["tools.*.cache_control"]);
    assert_eq!(
        with_choice(json!({"type": "any"})).body["tool_choice"],
        "required"
    );
    assert_eq!(
        with_choice(json!({"type": "none"})).body["tool_choice"],
        "none"
    );
    let t = with_choice(
        json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}),
    );
    assert_eq!(
        t.body["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(t.body["parallel_tool_calls"], false);

    let mut server_tool = base.clone();
    server_tool["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
    let e = err(server_tool);
    assert_eq!(e.param, "tools.0.type");
    assert!(e.message.contains("web_search"));
    let mut no_schema = base.clone();
    no_schema["tools"] = json!([{"name": "f"}]);
    assert_eq!(err(no_schema).param, "tools.0.input_schema");
}

#[test]
fn sampling_stop_metadata_and_stream() {
    let t = ok(json!({
        "model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}],
        "stop_sequences": ["END"], "temperature": 0.3, "top_p": 0.9, "top_k": 40,
        "metadata": {"user_id": "u-1"}, "stream": true, "service_tier": "auto", "vendor_x": 1,
    }));
    let b = &t.body;
    assert_eq!(b["stop"], json!(["END"]));
    assert_eq!(b["temperature"], 0.3);
    assert_eq!(b["top_p"], 0.9);
    assert!(b.get("top_k").is_none());
    assert_eq!(b["user"], "u-1");
    assert_eq!(b["stream"], true);
    assert_eq!(b["stream_options"], json!({"include_usage": true}));
    let mut d = t.dropped.clone();
    d.sort();
    assert_eq!(d, vec!["service_tier", "top_k", "vendor_x"]);
}

#[test]
fn thinking_maps_to_reasoning_effort() {
    let with = |extra: Value| {
        let mut b = json!({"model": "m", "max_tokens": 64000, "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        ok(b)
    };
    let effort = |t: &Translated| t.body.get("reasoning_effort").cloned();
    assert_eq!(
        effort(&with(
            json!({"thinking": {"type": "enabled", "budget_tokens": 1024}})
        )),
        Some(json!("low"))
    );
    assert_eq!(
        effort(&with(
            json!({"thinking": {"type": "enabled", "budget_tokens": 8000}})
        )),
        Some(json!("medium"))
    );
    assert_eq!(
        effort(&with(
            json!({"thinking": {"type": "enabled", "budget_tokens": 32000}})
        )),
        Some(json!("high"))
    );
    assert_eq!(
        effort(&with(json!({"thinking": {"type": "disabled"}}))),
        None
    );
    let t = with(json!({"thinking": {"type": "adaptive"}}));
    assert_eq!(effort(&t), None);
    let t = with(json!({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}));
    assert_eq!(effort(&t), Some(json!("high")));
    let t = with(json!({"output_config": {"effort": "low"}}));
    assert_eq!(effort(&t), None);
    assert_eq!(t.dropped, vec!["output_config.effort"]);
    let e = messages_to_chat(
        &json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
        "thinking": {"type": "enabled"}}),
    )
    .unwrap_err();
    assert_eq!(e.param, "thinking.budget_tokens");
}

#[test]
fn structured_output_becomes_a_json_schema_response_format() {
    let schema =
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    for field in ["output_config", "output_format"] {
        let format = json!({"type": "json_schema", "schema": schema});
        let mut body =
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]});
        body[field] = if field == "output_config" {
            json!({"format": format})
        } else {
            format
        };
        let t = ok(body);
        assert_eq!(
            t.body["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}}),
            "{field}"
        );
        assert!(t.dropped.is_empty(), "{field}: {:?}", t.dropped);
    }
    let e = err(
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
        "output_config": {"format": {"type": "json_schema"}}}),
    );
    assert_eq!(e.param, "output_config.format.schema");
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (json!([]), "body"),
        (
            json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens",
        ),
        (
            json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens",
        ),
        (json!({"model": "m", "max_tokens": 1}), "messages"),
        (
            json!({"model": "m", "max_tokens": 1, "messages": []}),
            "messages",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "tool", "content": "x"}]}),
            "messages.0.role",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user"}]}),
            "messages.0.content",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
            "stream",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "stop_sequences": "END"}),
            "stop_sequences",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "maybe"}}),
            "tool_choice.type",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}),
            "messages.0.content.0.tool_use_id",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]}),
            "messages.0.content.0.id",
        ),
        (
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "mcp_servers": [{"url": "u"}]}),
            "mcp_servers",
        ),
    ];
    for (body, param) in cases {
        let e = messages_to_chat(&body).err();
        assert_eq!(e.map(|e| e.param), Some(param.to_string()), "{body}");
    }
}

#[test]
fn response_text_and_usage() {
    let chat = json!({
        "id": "chatcmpl-abc123", "object": "chat.completion", "model": "gpt-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": null}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107, "prompt_tokens_details": {"cached_tokens": 60}},
    });
    assert_eq!(
        chat_to_messages_response(&chat, "claude-opus-5-5"),
        json!({
            "id": "msg_abc123", "type": "message", "role": "assistant", "model": "claude-opus-5-5",
            "content": [{"type": "text", "text": "Hello!"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 40, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 60},
        })
    );
}

#[test]
fn response_tool_calls_and_stop_reasons() {
    let chat = json!({
        "id": "chatcmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ]}, "finish_reason": "tool_calls"}],
    });
    let r = chat_to_messages_response(&chat, "m");
    assert_eq!(
        r["content"],
        json!([
            {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
            {"type": "tool_use", "id": "call_2", "name": "g", "input": {"_raw_arguments": "not json"}},
        ])
    );
    assert_eq!(r["stop_reason"], "tool_use");
    assert_eq!(r["usage"]["input_tokens"], 0);

    let reason = |finish: Value, extra: Value| {
        let mut c = json!({"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": finish});
        if let Some(o) = extra.as_object() {
            for (k, v) in o {
                c[k] = v.clone();
            }
        }
        let r = chat_to_messages_response(&json!({"choices": [c]}), "m");
        (r["stop_reason"].clone(), r["stop_sequence"].clone())
    };
    assert_eq!(
        reason(json!("length"), json!({})),
        (json!("max_tokens"), Value::Null)
    );
    assert_eq!(
        reason(json!("content_filter"), json!({})),
        (json!("refusal"), Value::Null)
    );
    assert_eq!(
        reason(json!("stop"), json!({})),
        (json!("end_turn"), Value::Null)
    );
    assert_eq!(
        reason(json!("stop"), json!({"stop_reason": "END"})),
        (json!("stop_sequence"), json!("END"))
    );
    let r = chat_to_messages_response(&json!({}), "m");
    assert!(r["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(r["content"], json!([]));
}

#[test]
fn count_tokens_estimates_like_the_chat_path() {
    let n = count_tokens(&json!({"model": "m", "system": "Be brief.",
        "messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog"}]}))
    .unwrap();
    // 3 priming + (4 + 3) system + (4 + 11) message
    assert_eq!(n, 25);
    let with_image = count_tokens(&json!({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "u"}}]}]}))
    .unwrap();
    assert_eq!(with_image, 3 + 4 + 765);
    assert_eq!(count_tokens(&json!({})).unwrap_err().param, "messages");
}

#[test]
fn session_id_from_metadata() {
    let json_uid = json!({"metadata": {"user_id": "{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"8732cf09\"}"}});
    assert_eq!(session_id(&json_uid).as_deref(), Some("8732cf09"));
    let legacy = json!({"metadata": {"user_id": "user_abc_account_123_session_9f1e"}});
    assert_eq!(session_id(&legacy).as_deref(), Some("9f1e"));
    assert_eq!(session_id(&json!({"metadata": {"user_id": "alice"}})), None);
    assert_eq!(
        session_id(&json!({"metadata": {"user_id": "{bad json"}})),
        None
    );
    assert_eq!(session_id(&json!({})), None);
}

#[test]
fn newest_human_text_skips_tool_results_and_reminders() {
    let body = json!({"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
            {"type": "text", "text": "Fix the bug"},
        ]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "file text"}]},
    ]});
    assert_eq!(newest_human_text(&body).as_deref(), Some("Fix the bug"));
    let body = json!({"messages": [{"role": "user", "content": "plain"}]});
    assert_eq!(newest_human_text(&body).as_deref(), Some("plain"));
    assert_eq!(newest_human_text(&json!({"messages": []})), None);
}

fn fixture() -> Value {
    let raw =
        include_str!("../../../tests/fixtures/agent-requests/claude-code-2.1.328-messages.json");
    let v: Value = serde_json::from_str(raw).unwrap();
    v["body"].clone()
}

#[test]
fn claude_code_request_translates() {
    let body = fixture();
    let t = ok(body.clone());
    let b = &t.body;
    assert_eq!(b["model"], "claude-opus-5-5");
    assert_eq!(b["max_completion_tokens"], 128000);
    assert_eq!(b["stream"], true);
    assert_eq!(b["stream_options"]["include_usage"], true);
    // adaptive thinking with output_config.effort "medium"
    assert_eq!(b["reasoning_effort"], "medium");

    let msgs = b["messages"].as_array().unwrap();
    // Top-level system (three blocks, two with cache_control) becomes one message.
    assert_eq!(msgs[0]["role"], "system");
    let sys = msgs[0]["content"].as_str().unwrap();
    assert!(sys.starts_with("<74 characters of client text>\n\n<62 characters"));
    assert!(sys.ends_with("<7030 characters of client text>"));
    assert_eq!(msgs[1]["role"], "user");
    assert_eq!(
        msgs[1]["content"][1],
        json!({"type": "text", "text": "Reply with the word hello"})
    );
    // The mid-conversation system turn is kept as a system message.
    assert_eq!(msgs[2]["role"], "system");
    assert_eq!(msgs[2]["content"], "<9200 characters of client text>");
    assert_eq!(msgs.len(), 3);

    let tools = b["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 12);
    assert!(tools.iter().all(|t| t["type"] == "function"));
    assert_eq!(tools[1]["function"]["name"], "Bash");
    assert_eq!(
        tools[1]["function"]["parameters"]["required"],
        json!(["command"])
    );
    assert_eq!(
        tools[1]["function"]["parameters"],
        body["tools"][1]["input_schema"]
    );

    // The client's session id is in metadata.user_id (a JSON string).
    assert_eq!(
        session_id(&body).as_deref(),
        Some("8732cf09-d7c2-406f-96dd-007b45605e87")
    );
    assert_eq!(b["user"], body["metadata"]["user_id"]);
    assert!(newest_human_text(&body)
        .unwrap()
        .ends_with("Reply with the word hello"));

    let mut dropped = t.dropped.clone();
    dropped.sort();
    assert_eq!(
        dropped,
        vec![
            "context_management",
            "messages.*.content.*.cache_control",
            "messages.*.output_config",
            "system.*.cache_control",
            "thinking.display",
            "tools.*.defer_loading",
        ]
    );
    // The captured text is redacted to placeholders, so only the structure
    // (12 tool schemas) weighs: about a quarter of the JSON's bytes.
    let n = count_tokens(&body).unwrap();
    let bytes = body.to_string().len() as u64;
    assert!(
        n > bytes / 8 && n < bytes / 2,
        "{n} tokens for {bytes} bytes"
    );
}
