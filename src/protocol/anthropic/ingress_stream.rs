//! Chat completion chunks → Anthropic Messages stream events, one chunk at a
//! time (nothing is buffered beyond the current block's bookkeeping).

use super::errors::{error_frame, error_type_for_openai};
use super::ingress::{messages_usage, stop_reason};
use super::{derived_id, new_id};
use crate::usage::estimate_tokens;
use bytes::Bytes;
use serde_json::{json, Value};

/// A `ping` frame, for keeping an idle stream alive.
pub const PING_FRAME: &[u8] = b"event: ping\ndata: {\"type\":\"ping\"}\n\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text(usize),
    /// (chat tool-call index, Anthropic block index)
    Tool(u64, usize),
}

/// Stateful translator: feed it each parsed chat SSE chunk with [`push`],
/// then call [`finish`] at `[DONE]` or [`finish_error`] if the upstream
/// breaks. Each call returns the bytes to send (possibly empty).
///
/// Anthropic content blocks are strictly sequential, so a block is closed
/// when the next one starts. OpenAI streams parallel tool calls one after the
/// other; should an upstream interleave them, late argument deltas still go
/// to their block's index, which the SDKs accumulate by index.
///
/// [`push`]: ChatToMessagesStream::push
/// [`finish`]: ChatToMessagesStream::finish
/// [`finish_error`]: ChatToMessagesStream::finish_error
#[derive(Debug)]
pub struct ChatToMessagesStream {
    model: String,
    input_estimate: u64,
    /// Output tokens estimated from what was sent, for upstreams that never
    /// report usage.
    output_estimate: u64,
    started: bool,
    ended: bool,
    open: Open,
    next_block: usize,
    /// chat tool-call index → Anthropic block index
    tools: Vec<(u64, usize)>,
    finish_reason: Option<String>,
    matched_stop: Option<String>,
    refused: bool,
    usage: Option<Value>,
    delta_sent: bool,
}

impl ChatToMessagesStream {
    /// `requested_model` is echoed to the client; `input_estimate` goes in
    /// `message_start` (the real count arrives with the last chunk and is sent
    /// in `message_delta`).
    pub fn new(requested_model: &str, input_estimate: Option<u64>) -> Self {
        ChatToMessagesStream {
            model: requested_model.to_string(),
            input_estimate: input_estimate.unwrap_or(0),
            output_estimate: 0,
            started: false,
            ended: false,
            open: Open::None,
            next_block: 0,
            tools: Vec::new(),
            finish_reason: None,
            matched_stop: None,
            refused: false,
            usage: None,
            delta_sent: false,
        }
    }

    /// The Anthropic usage object of the answer, once the upstream reported it.
    pub fn usage(&self) -> Option<&Value> {
        self.usage.as_ref()
    }

    /// Whether `message_stop` or an error has been sent.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// One chat chunk (the parsed `data:` JSON) → Anthropic frames.
    pub fn push(&mut self, chunk: &Value) -> Bytes {
        let mut out = Vec::new();
        if self.ended {
            return Bytes::new();
        }
        if let Some(err) = chunk.get("error") {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("The upstream stream failed.");
            let kind = error_type_for_openai(
                500,
                err.get("code").and_then(Value::as_str),
                err.get("type").and_then(Value::as_str),
            );
            return self.error(kind, message);
        }
        self.start(chunk, &mut out);
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(messages_usage(u));
        }
        let choice = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| {
                c.iter()
                    .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
            });
        if let Some(c) = choice {
            if let Some(d) = c.get("delta") {
                self.delta(d, &mut out);
            }
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                self.close_open(&mut out);
                self.finish_reason = Some(f.to_string());
                self.matched_stop = c
                    .get("stop_reason")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
        }
        // message_delta waits for finish(): usage comes after finish_reason,
        // and some upstreams revise it on later chunks.
        Bytes::from(out)
    }

    /// The upstream finished (`[DONE]` or a clean end of body).
    pub fn finish(&mut self) -> Bytes {
        if self.ended {
            return Bytes::new();
        }
        let mut out = Vec::new();
        self.start(&Value::Null, &mut out);
        self.close_open(&mut out);
        self.message_delta(&mut out);
        frame(&mut out, "message_stop", &json!({"type": "message_stop"}));
        self.ended = true;
        Bytes::from(out)
    }

    /// The upstream broke mid-stream: an `event: error` frame (the client
    /// already has a 200, so the error cannot be a status and must not be a
    /// bare JSON envelope).
    pub fn finish_error(&mut self, message: &str) -> Bytes {
        self.error("api_error", message)
    }

    /// As [`finish_error`](Self::finish_error) with an explicit Anthropic
    /// error type (e.g. `overloaded_error`).
    pub fn finish_error_typed(&mut self, error_type: &str, message: &str) -> Bytes {
        self.error(error_type, message)
    }

    fn error(&mut self, kind: &str, message: &str) -> Bytes {
        if self.ended {
            return Bytes::new();
        }
        self.ended = true;
        error_frame(kind, message)
    }

    fn start(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let id = derived_id(
            "msg_",
            chunk.get("id").and_then(Value::as_str),
            &["chatcmpl-", "chatcmpl_"],
        );
        frame(
            out,
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": self.input_estimate,
                    "output_tokens": 0,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            }}),
        );
    }

    fn delta(&mut self, d: &Value, out: &mut Vec<u8>) {
        for key in ["content", "refusal"] {
            if let Some(t) = d.get(key).and_then(Value::as_str).filter(|t| !t.is_empty()) {
                if key == "refusal" {
                    self.refused = true;
                }
                self.output_estimate += estimate_tokens(t);
                let index = match self.open {
                    Open::Text(i) => i,
                    _ => {
                        self.close_open(out);
                        let i = self.new_block();
                        frame(
                            out,
                            "content_block_start",
                            &json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}),
                        );
                        self.open = Open::Text(i);
                        i
                    }
                };
                frame(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}}),
                );
            }
        }
        let Some(calls) = d.get("tool_calls").and_then(Value::as_array) else {
            return;
        };
        for (pos, tc) in calls.iter().enumerate() {
            let chat_index = tc
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(pos as u64);
            let block = match self.tools.iter().find(|(c, _)| *c == chat_index) {
                Some((_, b)) => *b,
                None => {
                    self.close_open(out);
                    let b = self.new_block();
                    let id = tc
                        .get("id")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .unwrap_or_else(|| new_id("toolu_"));
                    let name = tc
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    frame(
                        out,
                        "content_block_start",
                        &json!({"type": "content_block_start", "index": b, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
                    );
                    self.tools.push((chat_index, b));
                    self.open = Open::Tool(chat_index, b);
                    b
                }
            };
            if let Some(args) = tc
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
            {
                self.output_estimate += estimate_tokens(args);
                frame(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": block, "delta": {"type": "input_json_delta", "partial_json": args}}),
                );
            }
        }
    }

    fn new_block(&mut self) -> usize {
        let i = self.next_block;
        self.next_block += 1;
        i
    }

    fn close_open(&mut self, out: &mut Vec<u8>) {
        let index = match self.open {
            Open::None => return,
            Open::Text(i) | Open::Tool(_, i) => i,
        };
        frame(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
        self.open = Open::None;
    }

    fn message_delta(&mut self, out: &mut Vec<u8>) {
        if self.delta_sent {
            return;
        }
        self.delta_sent = true;
        let (reason, seq) = stop_reason(
            self.finish_reason.as_deref(),
            self.matched_stop.as_deref(),
            !self.tools.is_empty(),
            self.refused,
        );
        let usage = self.usage.clone().unwrap_or_else(|| {
            json!({"input_tokens": self.input_estimate, "output_tokens": self.output_estimate,
                   "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
        });
        frame(
            out,
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": usage}),
        );
    }
}

fn frame(out: &mut Vec<u8>, event: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
#[path = "ingress_stream_tests.rs"]
mod tests;
