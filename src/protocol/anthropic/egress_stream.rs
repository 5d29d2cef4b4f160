//! Anthropic Messages stream events → chat completion chunks, event by event.

use super::egress::{finish_reason, usage_from_messages};
use super::{derived_id, new_id, now_secs, type_of};
use crate::usage::Usage;
use serde_json::{json, Value};

/// An `event: error` from the upstream mid-stream, with Anthropic's error
/// type (e.g. `overloaded_error`) so the gateway can map it to the client's API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct StreamError {
    pub error_type: String,
    pub message: String,
}

/// Stateful translator: feed it each Anthropic SSE event's parsed `data`
/// with [`push`](MessagesToChatStream::push); it returns the chat chunks to
/// send (the caller frames them as `data: …` and writes `[DONE]` after
/// `message_stop`). The last chunk is the usage chunk (`choices: []`), which
/// the gateway strips when the client did not ask for usage.
#[derive(Debug)]
pub struct MessagesToChatStream {
    id: String,
    model: String,
    created: u64,
    /// Thinking deltas go out as `reasoning_content` (the convention of
    /// DeepSeek, vLLM and others) rather than being dropped.
    reasoning: bool,
    /// Anthropic block index → chat tool-call index, for tool_use blocks.
    tool_blocks: Vec<(u64, u64)>,
    /// The usage as last reported (`message_start`, then cumulative
    /// `message_delta`s).
    usage: Value,
    done: bool,
}

impl MessagesToChatStream {
    /// `reasoning_content`: pass thinking on as `reasoning_content` deltas
    /// (true) or drop it (false). Chunks carry the id and model of
    /// `message_start`.
    pub fn new(reasoning_content: bool) -> Self {
        MessagesToChatStream {
            id: new_id("chatcmpl-"),
            model: String::new(),
            created: now_secs(),
            reasoning: reasoning_content,
            tool_blocks: Vec::new(),
            usage: json!({}),
            done: false,
        }
    }

    /// Usage so far, each token class once (see [`usage_from_messages`]).
    pub fn usage(&self) -> Option<Usage> {
        usage_from_messages(&self.usage)
    }

    /// `message_stop` was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn push(&mut self, event: &Value) -> Result<Vec<Value>, StreamError> {
        let mut out = Vec::new();
        match type_of(event) {
            Some("message_start") => {
                let m = event.get("message");
                self.id = derived_id(
                    "chatcmpl-",
                    m.and_then(|m| m.get("id")).and_then(Value::as_str),
                    &["msg_"],
                );
                if let Some(model) = m.and_then(|m| m.get("model")).and_then(Value::as_str) {
                    self.model = model.to_string();
                }
                if let Some(u) = m.and_then(|m| m.get("usage")) {
                    self.merge_usage(u);
                }
                out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
            }
            Some("content_block_start") => {
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                let block = event.get("content_block");
                match block.and_then(type_of) {
                    Some("text") => {
                        if let Some(t) = block
                            .and_then(|b| b.get("text"))
                            .and_then(Value::as_str)
                            .filter(|t| !t.is_empty())
                        {
                            out.push(self.chunk(json!({"content": t}), None));
                        }
                    }
                    Some("tool_use") => {
                        let call = self.tool_blocks.len() as u64;
                        self.tool_blocks.push((index, call));
                        let b = block.unwrap_or(&Value::Null);
                        out.push(self.chunk(
                            json!({"tool_calls": [{
                                "index": call,
                                "id": b.get("id").and_then(Value::as_str).unwrap_or(""),
                                "type": "function",
                                "function": {
                                    "name": b.get("name").and_then(Value::as_str).unwrap_or(""),
                                    "arguments": "",
                                },
                            }]}),
                            None,
                        ));
                    }
                    // thinking text arrives as deltas; redacted thinking and
                    // server-tool blocks have nothing a chat client can use.
                    _ => {}
                }
            }
            Some("content_block_delta") => {
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                let d = event.get("delta");
                match d.and_then(type_of) {
                    Some("text_delta") => {
                        if let Some(t) = d.and_then(|d| d.get("text")).and_then(Value::as_str) {
                            out.push(self.chunk(json!({"content": t}), None));
                        }
                    }
                    Some("input_json_delta") => {
                        let partial = d
                            .and_then(|d| d.get("partial_json"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        let call = self
                            .tool_blocks
                            .iter()
                            .find(|(b, _)| *b == index)
                            .map(|(_, c)| *c);
                        if let (Some(call), false) = (call, partial.is_empty()) {
                            out.push(self.chunk(
                                json!({"tool_calls": [{"index": call, "function": {"arguments": partial}}]}),
                                None,
                            ));
                        }
                    }
                    Some("thinking_delta") if self.reasoning => {
                        if let Some(t) = d.and_then(|d| d.get("thinking")).and_then(Value::as_str) {
                            out.push(self.chunk(json!({"reasoning_content": t}), None));
                        }
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                if let Some(u) = event.get("usage") {
                    self.merge_usage(u);
                }
                if let Some(stop) = event.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    out.push(self.chunk(json!({}), Some(finish_reason(Some(stop)))));
                }
            }
            Some("message_stop") => {
                self.done = true;
                let usage = self.usage().unwrap_or_default();
                out.push(json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage.to_json(),
                }));
            }
            Some("error") => {
                let e = event.get("error");
                return Err(StreamError {
                    error_type: e.and_then(type_of).unwrap_or("api_error").to_string(),
                    message: e
                        .and_then(|e| e.get("message"))
                        .and_then(Value::as_str)
                        .unwrap_or("The upstream stream failed.")
                        .to_string(),
                });
            }
            // ping, content_block_stop, and event types added later
            _ => {}
        }
        Ok(out)
    }

    /// Later usage reports are cumulative: each field replaces the earlier one.
    fn merge_usage(&mut self, u: &Value) {
        let (Some(dst), Some(src)) = (self.usage.as_object_mut(), u.as_object()) else {
            return;
        };
        for (k, v) in src {
            if v.is_u64() {
                dst.insert(k.clone(), v.clone());
            }
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }
}

#[cfg(test)]
#[path = "egress_stream_tests.rs"]
mod tests;
