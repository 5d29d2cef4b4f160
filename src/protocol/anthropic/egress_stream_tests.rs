#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use serde_json::json;

/// The event sequence of Anthropic's documented streaming tool-use example,
/// with a thinking block and cache usage added.
fn anthropic_events() -> Vec<Value> {
    vec![
        json!({"type": "message_start", "message": {"id": "msg_014p7", "type": "message", "role": "assistant",
            "model": "claude-up", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 472, "output_tokens": 2, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Need weather."}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQB"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
        json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Okay"}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_01T1", "name": "get_weather", "input": {}}}),
        json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"location\":"}}),
        json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": " \"SF\"}"}}),
        json!({"type": "content_block_stop", "index": 2}),
        json!({"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}}}),
        json!({"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        json!({"type": "content_block_stop", "index": 3}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 89}}),
        json!({"type": "message_stop"}),
    ]
}

fn run(reasoning: bool) -> (Vec<Value>, MessagesToChatStream) {
    let mut s = MessagesToChatStream::new(reasoning);
    let mut out = Vec::new();
    for e in anthropic_events() {
        out.extend(s.push(&e).unwrap());
    }
    (out, s)
}

fn deltas(chunks: &[Value]) -> Vec<Value> {
    chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|ch| ch["delta"].clone()))
        .collect()
}

#[test]
fn events_become_chat_chunks() {
    let (chunks, s) = run(true);
    assert!(s.is_done());
    for c in &chunks {
        assert_eq!(c["id"], "chatcmpl-014p7");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "claude-up");
    }
    let d = deltas(&chunks);
    assert_eq!(d[0], json!({"role": "assistant", "content": ""}));
    assert_eq!(d[1], json!({"reasoning_content": "Need weather."}));
    assert_eq!(d[2], json!({"content": "Okay"}));
    assert_eq!(
        d[3],
        json!({"tool_calls": [{"index": 0, "id": "toolu_01T1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]})
    );
    assert_eq!(
        d[4],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\":"}}]})
    );
    assert_eq!(
        d[5],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": " \"SF\"}"}}]})
    );
    assert_eq!(d[6]["tool_calls"][0]["index"], 1);
    assert_eq!(d[6]["tool_calls"][0]["id"], "toolu_02");
    assert_eq!(d[7]["tool_calls"][0]["function"]["arguments"], "{}");
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "tool_calls");
    assert_eq!(finish["delta"], json!({}));
    // Last: the usage chunk, prompt = input + cache read + cache write.
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 1672, "completion_tokens": 89, "total_tokens": 1761,
               "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 200}})
    );
    let u = s.usage().unwrap();
    assert_eq!(
        (
            u.prompt_tokens,
            u.cached_tokens,
            u.cache_write_tokens,
            u.completion_tokens
        ),
        (1672, 1000, 200, 89)
    );
}

#[test]
fn thinking_can_be_dropped() {
    let (chunks, _) = run(false);
    assert!(deltas(&chunks)
        .iter()
        .all(|d| d.get("reasoning_content").is_none()));
}

#[test]
fn stream_error_event_is_reported_with_its_type() {
    let mut s = MessagesToChatStream::new(true);
    let e = s
        .push(&json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
        .unwrap_err();
    assert_eq!(
        e,
        StreamError {
            error_type: "overloaded_error".into(),
            message: "Overloaded".into()
        }
    );
}

#[test]
fn unknown_events_and_blocks_are_ignored() {
    let mut s = MessagesToChatStream::new(true);
    assert!(s.push(&json!({"type": "future_event"})).unwrap().is_empty());
    assert!(s
        .push(&json!({"type": "content_block_start", "index": 0, "content_block": {"type": "redacted_thinking", "data": "x"}}))
        .unwrap()
        .is_empty());
    assert!(s
        .push(&json!({"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta"}}))
        .unwrap()
        .is_empty());
}
