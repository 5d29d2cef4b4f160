use super::*;

fn chat(body: Value) -> Value {
    responses_to_chat(&body, None).unwrap()
}

fn refused(body: Value) -> ProtocolError {
    responses_to_chat(&body, None).unwrap_err()
}

#[test]
fn string_input_with_instructions_and_sampling() {
    let c = chat(json!({
        "model": "auto", "input": "Tell me a joke", "instructions": "Be funny",
        "temperature": 0.2, "top_p": 0.9, "max_output_tokens": 300, "user": "u-1",
        "reasoning": {"effort": "low", "summary": "auto"},
        "metadata": {"k": "v"}, "prompt_cache_key": "abc", "store": true,
        "include": ["reasoning.encrypted_content"], "truncation": "auto",
    }));
    assert_eq!(
        c,
        json!({
            "model": "auto",
            "messages": [
                {"role": "system", "content": "Be funny"},
                {"role": "user", "content": "Tell me a joke"},
            ],
            "temperature": 0.2, "top_p": 0.9, "max_completion_tokens": 300, "user": "u-1",
            "reasoning_effort": "low",
        })
    );
}

#[test]
fn stream_asks_for_usage() {
    let c = chat(json!({"model": "m", "input": "x", "stream": true}));
    assert_eq!(c["stream"], true);
    assert_eq!(c["stream_options"], json!({"include_usage": true}));
    let c = chat(json!({"model": "m", "input": "x", "stream": false}));
    assert!(c.get("stream").is_none());
}

#[test]
fn message_items_map_roles_and_parts() {
    let c = chat(json!({"model": "m", "input": [
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "rule one"}, {"type": "input_text", "text": "rule two"}]},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAA", "detail": "low"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "A cat.", "annotations": []}]},
        {"role": "user", "content": "thanks"},
    ]}));
    assert_eq!(
        c["messages"],
        json!([
            {"role": "system", "content": "rule one\n\nrule two"},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA", "detail": "low"}}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "thanks"},
        ])
    );
}

#[test]
fn function_call_round_trip_groups_calls_into_one_assistant_message() {
    let c = chat(json!({"model": "m",
    "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}],
    "input": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call", "id": "fc_2", "call_id": "call_b", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "21C"}]},
    ]}));
    assert_eq!(
        c["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_b", "content": "21C"},
        ])
    );
    assert_eq!(
        c["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}}])
    );
}

#[test]
fn custom_tools_become_one_string_functions() {
    let c = chat(json!({"model": "m",
    "tools": [{"type": "custom", "name": "exec", "description": "Run code",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}],
    "input": [
        {"role": "user", "content": "list files"},
        {"type": "custom_tool_call", "call_id": "c1", "name": "exec", "input": "ls\n-la"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "a.txt"},
    ]}));
    let f = &c["tools"][0]["function"];
    assert_eq!(f["name"], "exec");
    assert_eq!(f["description"], "Run code");
    assert_eq!(f["parameters"]["required"], json!(["input"]));
    assert_eq!(f["parameters"]["properties"]["input"]["type"], "string");
    let desc = f["parameters"]["properties"]["input"]["description"]
        .as_str()
        .unwrap();
    assert!(
        desc.contains("lark grammar") && desc.contains("start: /.+/"),
        "{desc}"
    );
    assert_eq!(
        c["messages"][1]["tool_calls"][0]["function"],
        json!({"name": "exec", "arguments": "{\"input\":\"ls\\n-la\"}"})
    );
    assert_eq!(
        c["messages"][2],
        json!({"role": "tool", "tool_call_id": "c1", "content": "a.txt"})
    );
}

#[test]
fn namespaced_tools_keep_plain_names_unless_they_clash() {
    let body = json!({"model": "m", "input": [
        {"type": "additional_tools", "role": "developer", "tools": [
            {"type": "namespace", "name": "a", "description": "", "tools": [
                {"type": "function", "name": "wait", "parameters": {"type": "object"}},
                {"type": "function", "name": "only_a", "parameters": {"type": "object"}}]},
            {"type": "namespace", "name": "b", "description": "", "tools": [
                {"type": "function", "name": "wait", "parameters": {"type": "object"}}]}]},
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "namespace": "b", "name": "wait", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
    ]});
    let c = chat(body.clone());
    let names: Vec<&str> = c["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a__wait", "only_a", "b__wait"]);
    assert_eq!(
        c["messages"][1]["tool_calls"][0]["function"]["name"],
        "b__wait"
    );
    let facts = RequestFacts::from_request(&body);
    assert_eq!(
        facts.origin("b__wait"),
        Some(&ToolOrigin {
            kind: ToolKind::Function,
            namespace: Some("b".into()),
            name: "wait".into()
        })
    );
    assert_eq!(
        facts.origin("only_a").unwrap().namespace.as_deref(),
        Some("a")
    );
}

#[test]
fn builtin_tools_are_refused_by_name() {
    for ty in [
        "web_search",
        "file_search",
        "computer_use_preview",
        "code_interpreter",
        "mcp",
    ] {
        let e = refused(json!({"model": "m", "input": "x", "tools": [{"type": ty}]}));
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("tools"));
        assert!(e.message.contains(&format!("`{ty}`")), "{}", e.message);
    }
    let e =
        refused(json!({"model": "m", "input": "x", "tool_choice": {"type": "web_search_preview"}}));
    assert!(e.message.contains("web_search_preview") && e.message.contains("built-in"));
    assert_eq!(e.to_json()["error"]["type"], "invalid_request_error");
    assert_eq!(e.to_json()["error"]["param"], "tool_choice");
}

#[test]
fn tool_choice_and_parallel_calls() {
    let tools = json!([{"type": "function", "name": "f", "parameters": {"type": "object"}},
        {"type": "function", "name": "g", "parameters": {"type": "object"}}]);
    let c = chat(
        json!({"model": "m", "input": "x", "tools": tools, "tool_choice": "required",
        "parallel_tool_calls": false}),
    );
    assert_eq!(c["tool_choice"], "required");
    assert_eq!(c["parallel_tool_calls"], false);
    let c = chat(json!({"model": "m", "input": "x", "tools": tools,
        "tool_choice": {"type": "function", "name": "g"}}));
    assert_eq!(
        c["tool_choice"],
        json!({"type": "function", "function": {"name": "g"}})
    );
    let c = chat(json!({"model": "m", "input": "x", "tools": tools,
        "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "g"}]}}));
    assert_eq!(c["tool_choice"], "required");
    assert_eq!(c["tools"].as_array().unwrap().len(), 1);
    assert_eq!(c["tools"][0]["function"]["name"], "g");
    // Chat upstreams reject tool settings without tools.
    let c = chat(
        json!({"model": "m", "input": "x", "tool_choice": "auto", "parallel_tool_calls": true}),
    );
    assert!(c.get("tool_choice").is_none() && c.get("parallel_tool_calls").is_none());
}

#[test]
fn text_format_becomes_response_format() {
    let c = chat(
        json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema",
        "name": "person", "strict": true, "schema": {"type": "object", "properties": {"n": {"type": "string"}}}}}}),
    );
    assert_eq!(
        c["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "person", "strict": true,
            "schema": {"type": "object", "properties": {"n": {"type": "string"}}}}})
    );
    let c = chat(json!({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}));
    assert_eq!(c["response_format"], json!({"type": "json_object"}));
    let c = chat(
        json!({"model": "m", "input": "x", "text": {"format": {"type": "text"}, "verbosity": "low"}}),
    );
    assert!(c.get("response_format").is_none());
    let e = refused(
        json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}),
    );
    assert_eq!(e.param.as_deref(), Some("text.format.schema"));
}

#[test]
fn previous_items_go_between_instructions_and_input() {
    let prev = vec![
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "first"}]}),
        json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "answer", "annotations": []}]}),
    ];
    let body = json!({"model": "m", "instructions": "now", "input": "second",
        "previous_response_id": "resp_1"});
    let c = responses_to_chat(&body, Some(&prev)).unwrap();
    assert_eq!(
        c["messages"],
        json!([
            {"role": "system", "content": "now"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": "second"},
        ])
    );
    assert!(c.get("previous_response_id").is_none());
}

#[test]
fn tool_output_images_follow_the_tool_results_as_a_user_message() {
    let c = chat(json!({"model": "m", "input": [
        {"role": "user", "content": "look"},
        {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "took it"},
            {"type": "input_image", "image_url": "https://x/y.png"}]},
    ]}));
    assert_eq!(
        c["messages"][2],
        json!({"role": "tool", "tool_call_id": "c1", "content": "took it"})
    );
    assert_eq!(
        c["messages"][3],
        json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]})
    );
}

#[test]
fn unsupported_inputs_are_refused_not_dropped() {
    let e = refused(json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}));
    assert!(e.message.contains("`item_reference`"));
    let e = refused(json!({"model": "m", "input": [{"type": "web_search_call", "id": "ws"}]}));
    assert!(e.message.contains("`web_search_call`"));
    let e = refused(json!({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}]}));
    assert!(e.message.contains("image_url"));
    let e = refused(json!({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-1"}]}]}));
    assert!(e.message.contains("file_data"));
    let e = refused(
        json!({"model": "m", "input": [{"role": "system", "content": [
        {"type": "input_image", "image_url": "https://x"}]}]}),
    );
    assert!(e.message.contains("input_image"));
    let e = refused(json!({"model": "m", "input": "x", "background": true}));
    assert_eq!(e.param.as_deref(), Some("background"));
    let e = refused(json!({"model": "m", "input": "x", "conversation": "conv_1"}));
    assert_eq!(e.param.as_deref(), Some("conversation"));
    let e = refused(json!({"model": "m"}));
    assert_eq!(e.param.as_deref(), Some("input"));
    let e = refused(json!({"model": "m", "input": 5}));
    assert_eq!(e.param.as_deref(), Some("input"));
    let e = refused(json!("not an object"));
    assert_eq!(e.status, 400);
}

#[test]
fn inline_file_input_is_carried() {
    let c = chat(json!({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,AA"}]}]}));
    assert_eq!(
        c["messages"][0]["content"][0],
        json!({"type": "file", "file": {"file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"}})
    );
}

#[test]
fn facts_echo_defaults_like_the_real_api() {
    let f = RequestFacts::from_request(&json!({"model": "m", "input": "x"}));
    assert!(f.response_id.starts_with("resp_"));
    assert!(f.store && !f.stream);
    let e = f.echo();
    assert_eq!(e["tools"], json!([]));
    assert_eq!(e["tool_choice"], "auto");
    assert_eq!(e["parallel_tool_calls"], true);
    assert_eq!(e["text"], json!({"format": {"type": "text"}}));
    assert_eq!(e["metadata"], json!({}));
    let f = RequestFacts::from_request(
        &json!({"model": "m", "input": "x", "store": false, "stream": true, "previous_response_id": "resp_p"}),
    );
    assert!(!f.store && f.stream);
    assert_eq!(f.previous_response_id.as_deref(), Some("resp_p"));
}

#[test]
fn newest_human_text_skips_tool_output_and_assistant() {
    let body = json!({"input": [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": [{"type": "input_text", "text": "second"}, {"type": "input_text", "text": "question"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "tool text"},
    ]});
    assert_eq!(
        newest_human_text(&body).as_deref(),
        Some("second\nquestion")
    );
    assert_eq!(
        newest_human_text(&json!({"input": "plain"})).as_deref(),
        Some("plain")
    );
    assert_eq!(
        newest_human_text(&json!({"input": [{"role": "developer", "content": "d"}]})),
        None
    );
}

#[test]
fn session_id_from_prompt_cache_key_or_client_metadata() {
    assert_eq!(session_id(&json!({"prompt_cache_key": "s1"})), Some("s1"));
    assert_eq!(
        session_id(&json!({"client_metadata": {"session_id": "s2"}})),
        Some("s2")
    );
    assert_eq!(session_id(&json!({"prompt_cache_key": ""})), None);
    assert_eq!(session_id(&json!({})), None);
}

#[test]
fn stored_items_continue_a_conversation() {
    let items = input_items(&json!({"input": "hi"}));
    assert_eq!(
        items,
        vec![
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})
        ]
    );
    let resp = json!({"output": [{"type": "message", "role": "assistant",
        "content": [{"type": "output_text", "text": "hello"}]}]});
    let conv = continuation_items(&items, &resp);
    assert_eq!(conv.len(), 2);
    let c = responses_to_chat(&json!({"model": "m", "input": "again"}), Some(&conv)).unwrap();
    assert_eq!(c["messages"].as_array().unwrap().len(), 3);
    assert_eq!(
        c["messages"][1],
        json!({"role": "assistant", "content": "hello"})
    );
}

#[test]
fn consecutive_assistant_messages_stay_apart() {
    let c = chat(json!({"model": "m", "input": [
        {"role": "user", "content": "q"},
        {"type": "message", "role": "assistant", "phase": "commentary",
            "content": [{"type": "output_text", "text": "Looking."}]},
        {"type": "message", "role": "assistant", "phase": "final_answer",
            "content": [{"type": "output_text", "text": "Done."}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "r"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "After."}]},
    ]}));
    let m = c["messages"].as_array().unwrap();
    assert_eq!(m[1]["content"], "Looking.\n\nDone.");
    assert_eq!(m[1]["tool_calls"][0]["id"], "c");
    assert_eq!(m[2]["role"], "tool");
    assert_eq!(m[3], json!({"role": "assistant", "content": "After."}));
}
