use super::*;

/// Splits SSE text into (event, data) pairs, checking the frame shape on the way.
fn frames(sse: &str) -> Vec<(String, Value)> {
    sse.split_terminator("\n\n")
        .map(|f| {
            let (ev, data) = f.split_once('\n').unwrap();
            let ev = ev.strip_prefix("event: ").unwrap().to_owned();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], ev.as_str(), "data.type names the event");
            (ev, data)
        })
        .collect()
}

fn facts(body: Value) -> RequestFacts {
    let mut f = RequestFacts::from_request(&body);
    f.response_id = "resp_s".into();
    f
}

fn run(s: &mut ChatToResponsesStream, chunks: &[Value]) -> Vec<(String, Value)> {
    let mut sse = s.start();
    for c in chunks {
        sse.push_str(&s.push(c));
    }
    sse.push_str(&s.finish());
    frames(&sse)
}

fn names(f: &[(String, Value)]) -> Vec<&str> {
    f.iter().map(|(e, _)| e.as_str()).collect()
}

fn assert_sequence_numbers(f: &[(String, Value)]) {
    for (i, (_, d)) in f.iter().enumerate() {
        assert_eq!(d["sequence_number"], i as u64);
    }
}

fn text_chunk(t: &str) -> Value {
    json!({"model": "up-model", "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
}

#[test]
fn text_stream_emits_the_full_event_sequence_with_usage() {
    let mut s = ChatToResponsesStream::new(facts(
        json!({"model": "auto", "input": "hi", "stream": true}),
    ));
    let f = run(
        &mut s,
        &[
            json!({"model": "up-model", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            text_chunk("Hel"),
            text_chunk("lo"),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 4}}}),
        ],
    );
    assert_eq!(
        names(&f),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_sequence_numbers(&f);
    assert_eq!(f[0].1["response"]["status"], "in_progress");
    assert_eq!(f[0].1["response"]["id"], "resp_s");
    assert_eq!(f[0].1["response"]["output"], json!([]));
    let item_id = f[2].1["item"]["id"].as_str().unwrap();
    assert!(item_id.starts_with("msg_"));
    assert_eq!(f[2].1["item"]["status"], "in_progress");
    assert_eq!(
        f[3].1["part"],
        json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
    );
    assert_eq!(f[4].1["delta"], "Hel");
    assert_eq!(f[4].1["item_id"], item_id);
    assert_eq!(f[4].1["output_index"], 0);
    assert_eq!(f[4].1["content_index"], 0);
    assert_eq!(f[6].1["text"], "Hello");
    assert_eq!(f[7].1["part"]["text"], "Hello");
    assert_eq!(f[8].1["item"]["status"], "completed");
    let done = &f[9].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["model"], "up-model");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["usage"]["input_tokens"], 7);
    assert_eq!(done["usage"]["output_tokens"], 2);
    assert_eq!(done["usage"]["input_tokens_details"]["cached_tokens"], 4);
    assert_eq!(done["usage"]["total_tokens"], 9);
    assert_eq!(
        &s.response(),
        done,
        "the stored object is the completed one"
    );
    assert!(s.is_done());
    assert_eq!(s.push(&text_chunk("late")), "", "nothing after the end");
    assert_eq!(s.finish(), "");
}

#[test]
fn several_tool_calls_stream_arguments_by_index() {
    let body = json!({"model": "m", "input": "x", "tools": [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]});
    let mut s = ChatToResponsesStream::new(facts(body));
    let tc = |i: u64, id: Option<&str>, name: Option<&str>, args: &str| {
        let mut call = json!({"index": i, "function": {"arguments": args}});
        if let Some(id) = id {
            call["id"] = json!(id);
            call["type"] = json!("function");
        }
        if let Some(n) = name {
            call["function"]["name"] = json!(n);
        }
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    };
    let f = run(
        &mut s,
        &[
            text_chunk("Let me check."),
            tc(0, Some("call_a"), Some("get_weather"), ""),
            tc(0, None, None, "{\"city\":"),
            tc(0, None, None, "\"Paris\"}"),
            tc(
                1,
                Some("call_b"),
                Some("get_weather"),
                "{\"city\":\"Rome\"}",
            ),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ],
    );
    assert_sequence_numbers(&f);
    assert_eq!(
        names(&f),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let added = &f[8].1;
    assert_eq!(added["output_index"], 1);
    assert_eq!(added["item"]["type"], "function_call");
    assert_eq!(added["item"]["call_id"], "call_a");
    assert_eq!(added["item"]["name"], "get_weather");
    assert_eq!(added["item"]["arguments"], "");
    let fc_a = added["item"]["id"].as_str().unwrap();
    assert_eq!(f[9].1["item_id"], fc_a);
    assert_eq!(f[12].1["output_index"], 2);
    assert_eq!(f[13].1["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(f[13].1["name"], "get_weather");
    assert_eq!(f[15].1["arguments"], "{\"city\":\"Rome\"}");
    let out = &f[17].1["response"]["output"];
    assert_eq!(out.as_array().unwrap().len(), 3);
    assert_eq!(out[1]["call_id"], "call_a");
    assert_eq!(out[1]["status"], "completed");
    assert_eq!(out[2]["call_id"], "call_b");
    assert_eq!(out[2]["arguments"], "{\"city\":\"Rome\"}");
}

#[test]
fn custom_tool_input_is_unwrapped_when_complete() {
    let body = json!({"model": "m", "input": "x", "tools": [{"type": "custom", "name": "exec"}]});
    let mut s = ChatToResponsesStream::new(facts(body));
    let f = run(
        &mut s,
        &[
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "exec", "arguments": "{\"inp"}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ut\":\"echo hi\"}"}}]}}]}),
        ],
    );
    assert_eq!(
        names(&f)[2..],
        [
            "response.output_item.added",
            "response.custom_tool_call_input.delta",
            "response.custom_tool_call_input.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(f[2].1["item"]["type"], "custom_tool_call");
    assert_eq!(f[3].1["delta"], "echo hi");
    assert_eq!(f[4].1["input"], "echo hi");
    assert_eq!(f[5].1["item"]["input"], "echo hi");
    assert_eq!(f[5].1["item"]["call_id"], "c1");
}

#[test]
fn tool_call_waits_for_its_name_before_announcing() {
    let mut s = ChatToResponsesStream::new(facts(json!({"model": "m", "input": "x"})));
    let f = run(
        &mut s,
        &[
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"arguments": "{\"a\""}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ":1}"}}]}}]}),
        ],
    );
    assert_eq!(f[2].0, "response.output_item.added");
    assert_eq!(f[2].1["item"]["name"], "f");
    assert_eq!(
        f[3].1["delta"], "{\"a\":1}",
        "arguments so far, in one delta"
    );
    assert_eq!(f[4].0, "response.function_call_arguments.done");
    assert_eq!(f[4].1["arguments"], "{\"a\":1}");
}

#[test]
fn upstream_failure_mid_stream_is_response_failed() {
    let mut s = ChatToResponsesStream::new(facts(json!({"model": "m", "input": "x"})));
    let mut sse = s.push(&text_chunk("partial"));
    sse.push_str(&s.finish_error("upstream connection reset"));
    let f = frames(&sse);
    assert_sequence_numbers(&f);
    let (ev, last) = f.last().unwrap();
    assert_eq!(ev, "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["code"], "server_error");
    assert_eq!(
        last["response"]["error"]["message"],
        "upstream connection reset"
    );
    assert_eq!(last["response"]["output"][0]["status"], "incomplete");
    assert_eq!(
        last["response"]["output"][0]["content"][0]["text"],
        "partial"
    );
    assert!(
        !sse.contains("\ndata: {\"error\""),
        "no bare error envelope"
    );
    assert_eq!(s.finish(), "", "failed is final");
    assert_eq!(s.response()["status"], "failed");
}

#[test]
fn error_chunk_from_upstream_fails_the_response() {
    let mut s = ChatToResponsesStream::new(facts(json!({"model": "m", "input": "x"})));
    let f = frames(&s.push(&json!({"error": {"message": "overloaded", "type": "server_error"}})));
    assert_eq!(
        names(&f),
        [
            "response.created",
            "response.in_progress",
            "response.failed"
        ]
    );
    assert_eq!(f[2].1["response"]["error"]["message"], "overloaded");
}

#[test]
fn length_stop_ends_with_response_incomplete() {
    let mut s = ChatToResponsesStream::new(facts(json!({"model": "m", "input": "x"})));
    let f = run(
        &mut s,
        &[
            text_chunk("cut"),
            json!({"choices": [{"delta": {}, "finish_reason": "length"}]}),
        ],
    );
    let (ev, last) = f.last().unwrap();
    assert_eq!(ev, "response.incomplete");
    assert_eq!(last["response"]["output"][0]["status"], "incomplete");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

#[test]
fn refusal_streams_as_its_own_part() {
    let mut s = ChatToResponsesStream::new(facts(json!({"model": "m", "input": "x"})));
    let f = run(
        &mut s,
        &[json!({"choices": [{"delta": {"refusal": "I can't"}}]})],
    );
    assert_eq!(
        names(&f)[3..7],
        [
            "response.content_part.added",
            "response.refusal.delta",
            "response.refusal.done",
            "response.content_part.done",
        ]
    );
    assert_eq!(f[5].1["refusal"], "I can't");
    assert_eq!(
        f.last().unwrap().1["response"]["output"][0]["content"][0],
        json!({"type": "refusal", "refusal": "I can't"})
    );
}

#[test]
fn empty_stream_still_completes() {
    let mut s = ChatToResponsesStream::new(facts(json!({"model": "m", "input": "x"})));
    let f = frames(&s.finish());
    assert_eq!(
        names(&f),
        [
            "response.created",
            "response.in_progress",
            "response.completed"
        ]
    );
    assert_eq!(f[2].1["response"]["output"], json!([]));
    assert_eq!(f[2].1["response"]["model"], "m");
}
