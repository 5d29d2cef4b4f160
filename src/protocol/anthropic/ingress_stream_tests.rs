#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use serde_json::json;

/// Frames → (event name, data), checking each is `event: X\ndata: {..}\n\n`
/// with `data.type == X`.
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let s = std::str::from_utf8(bytes).unwrap();
    let mut out = Vec::new();
    for f in s.split_terminator("\n\n") {
        let (ev, data) = f.split_once('\n').unwrap();
        let name = ev.strip_prefix("event: ").unwrap().to_string();
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], name.as_str(), "{f}");
        out.push((name, data));
    }
    out
}

fn run(chunks: &[Value]) -> Vec<(String, Value)> {
    let mut s = ChatToMessagesStream::new("claude-opus-5-5", Some(12));
    let mut bytes = Vec::new();
    for c in chunks {
        bytes.extend_from_slice(&s.push(c));
    }
    bytes.extend_from_slice(&s.finish());
    assert!(s.is_ended());
    events(&bytes)
}

fn names(ev: &[(String, Value)]) -> Vec<&str> {
    ev.iter().map(|(n, _)| n.as_str()).collect()
}

fn chunk(delta: Value, finish: Value) -> Value {
    json!({"id": "chatcmpl-x1", "object": "chat.completion.chunk", "created": 1, "model": "up",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn usage_chunk(prompt: u64, cached: u64, completion: u64) -> Value {
    json!({"id": "chatcmpl-x1", "object": "chat.completion.chunk", "created": 1, "model": "up", "choices": [],
           "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                     "prompt_tokens_details": {"cached_tokens": cached}}})
}

#[test]
fn text_stream_has_the_anthropic_event_sequence() {
    let ev = run(&[
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Hel"}), Value::Null),
        chunk(json!({"content": "lo"}), Value::Null),
        chunk(json!({}), json!("stop")),
        usage_chunk(30, 10, 2),
    ]);
    assert_eq!(
        names(&ev),
        vec![
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let start = &ev[0].1["message"];
    assert_eq!(start["id"], "msg_x1");
    assert_eq!(start["model"], "claude-opus-5-5");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["usage"]["input_tokens"], 12);
    assert_eq!(
        ev[1].1,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    assert_eq!(
        ev[2].1["delta"],
        json!({"type": "text_delta", "text": "Hel"})
    );
    assert_eq!(ev[4].1, json!({"type": "content_block_stop", "index": 0}));
    assert_eq!(
        ev[5].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"input_tokens": 20, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10}})
    );
}

#[test]
fn several_tool_calls_stream_as_tool_use_blocks() {
    let ev = run(&[
        chunk(
            json!({"role": "assistant", "content": "Let me check."}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}),
            Value::Null,
        ),
        chunk(json!({}), json!("tool_calls")),
        usage_chunk(50, 0, 20),
    ]);
    assert_eq!(
        names(&ev),
        vec![
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        ev[4].1,
        json!({"type": "content_block_start", "index": 1,
               "content_block": {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}}})
    );
    let args: String = ev
        .iter()
        .filter(|(n, d)| n == "content_block_delta" && d["index"] == 1)
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(args, "{\"city\":\"Paris\"}");
    assert_eq!(ev[8].1["content_block"]["name"], "time");
    assert_eq!(ev[8].1["index"], 2);
    assert_eq!(ev[9].1["delta"]["partial_json"], "{}");
    assert_eq!(ev[11].1["delta"]["stop_reason"], "tool_use");
}

#[test]
fn stop_reasons_and_missing_usage() {
    let reason = |finish: &str, extra: Value| {
        let mut c = chunk(json!({"content": "x"}), json!(finish));
        if let Some(o) = extra.as_object() {
            for (k, v) in o {
                c["choices"][0][k] = v.clone();
            }
        }
        let ev = run(&[c]);
        let d = ev
            .iter()
            .find(|(n, _)| n == "message_delta")
            .unwrap()
            .1
            .clone();
        (
            d["delta"]["stop_reason"].clone(),
            d["delta"]["stop_sequence"].clone(),
            d["usage"].clone(),
        )
    };
    assert_eq!(reason("length", json!({})).0, "max_tokens");
    let (r, s, u) = reason("stop", json!({"stop_reason": "###"}));
    assert_eq!((r, s), (json!("stop_sequence"), json!("###")));
    // No usage chunk from the upstream: estimate, never zero output.
    assert_eq!(u["input_tokens"], 12);
    assert_eq!(u["output_tokens"], 1);
}

#[test]
fn empty_stream_still_is_a_valid_message() {
    let ev = run(&[]);
    assert_eq!(
        names(&ev),
        vec!["message_start", "message_delta", "message_stop"]
    );
}

#[test]
fn broken_upstream_ends_with_an_error_event() {
    let mut s = ChatToMessagesStream::new("m", None);
    let first = events(&s.push(&chunk(json!({"content": "partial"}), Value::Null)));
    assert_eq!(first[0].0, "message_start");
    let err = events(&s.finish_error("upstream connection reset"));
    assert_eq!(
        err,
        vec![(
            "error".to_string(),
            json!({"type": "error", "error": {"type": "api_error", "message": "upstream connection reset"}})
        )]
    );
    assert!(s.finish().is_empty());
    assert!(s
        .push(&chunk(json!({"content": "late"}), Value::Null))
        .is_empty());
}

#[test]
fn upstream_error_chunk_becomes_an_error_event() {
    let mut s = ChatToMessagesStream::new("m", None);
    let ev = events(&s.push(&json!({"error": {"message": "Rate limited", "type": "rate_limit_error", "code": "rate_limit_exceeded"}})));
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].1["error"]["type"], "rate_limit_error");
    assert!(s.is_ended());
}

#[test]
fn ping_frame_is_well_formed() {
    assert_eq!(
        events(PING_FRAME),
        vec![("ping".to_string(), json!({"type": "ping"}))]
    );
}

#[test]
fn usage_before_finish_reason_is_held_until_the_end() {
    let ev = run(&[
        chunk(json!({"content": "a"}), Value::Null),
        // Some upstreams put usage on every chunk.
        {
            let mut c = chunk(json!({"content": "b"}), Value::Null);
            c["usage"] = json!({"prompt_tokens": 5, "completion_tokens": 1});
            c
        },
        {
            let mut c = chunk(json!({}), json!("stop"));
            c["usage"] = json!({"prompt_tokens": 5, "completion_tokens": 2});
            c
        },
    ]);
    let deltas: Vec<_> = ev.iter().filter(|(n, _)| n == "message_delta").collect();
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0].1["usage"]["output_tokens"], 2);
    assert_eq!(ev.last().unwrap().0, "message_stop");
}
