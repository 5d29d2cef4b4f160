//! Chat SSE chunks → Responses SSE events, one chunk at a time (nothing is held back except a
//! custom tool's input, which is JSON-wrapped upstream and only unwrapped once complete).

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use super::new_id;
use super::request::{RequestFacts, ToolKind};
use super::response::{
    custom_input, output_text_part, response_object, status_for, tool_call_item, usage_json,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Text,
    Refusal,
}

#[derive(Debug)]
struct MessageState {
    item_id: String,
    output_index: usize,
    parts: Vec<Value>,
    open: Option<(PartKind, String)>,
}

#[derive(Debug)]
struct ToolState {
    item_id: String,
    /// Set once the call is announced (`output_item.added`), which waits for its name.
    output_index: Option<usize>,
    call_id: String,
    name: String,
    arguments: String,
}

/// Turns a chat-completions stream into the Responses event stream.
///
/// Feed each parsed chat chunk to [`push`](Self::push) and write what it returns; end with
/// [`finish`](Self::finish) on `[DONE]` or [`finish_error`](Self::finish_error) when the upstream
/// breaks. [`response`](Self::response) is then the final Response object, for storing.
#[derive(Debug)]
pub struct ChatToResponsesStream {
    facts: RequestFacts,
    seq: u64,
    started: bool,
    done: bool,
    model: Option<String>,
    /// Output items by `output_index`; `Null` while the item is still open.
    output: Vec<Value>,
    message: Option<MessageState>,
    tools: Vec<ToolState>,
    tool_by_index: HashMap<u64, usize>,
    usage: Option<Value>,
    finish_reason: Option<String>,
    error: Option<String>,
}

impl ChatToResponsesStream {
    pub fn new(facts: RequestFacts) -> Self {
        Self {
            facts,
            seq: 0,
            started: false,
            done: false,
            model: None,
            output: Vec::new(),
            message: None,
            tools: Vec::new(),
            tool_by_index: HashMap::new(),
            usage: None,
            finish_reason: None,
            error: None,
        }
    }

    /// The id of the Response being streamed.
    pub fn response_id(&self) -> &str {
        &self.facts.response_id
    }

    /// True once `finish` or `finish_error` ran.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// `response.created` and `response.in_progress`; sent by the first `push` if not called.
    pub fn start(&mut self) -> String {
        let mut out = String::new();
        self.ensure_started(&mut out);
        out
    }

    /// Translates one chat chunk into zero or more Responses SSE frames.
    pub fn push(&mut self, chunk: &Value) -> String {
        let mut out = String::new();
        if self.done {
            return out;
        }
        self.ensure_started(&mut out);
        if let Some(err) = chunk.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error");
            let msg = msg.to_owned();
            out.push_str(&self.finish_error(&msg));
            return out;
        }
        if let Some(m) = chunk.get("model").and_then(Value::as_str) {
            if self.model.is_none() && !m.is_empty() {
                self.model = Some(m.to_owned());
            }
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage_json(u));
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return out;
        };
        if let Some(delta) = choice.get("delta") {
            if let Some(t) = delta
                .get("content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.part_delta(&mut out, PartKind::Text, t);
            }
            if let Some(r) = delta
                .get("refusal")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.part_delta(&mut out, PartKind::Refusal, r);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                self.tool_delta(&mut out, call);
            }
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(f.to_owned());
        }
        out
    }

    /// Closes every open item and sends `response.completed` (or `response.incomplete` when the
    /// upstream stopped at the token cap or a content filter), with usage.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if self.done {
            return out;
        }
        self.ensure_started(&mut out);
        self.close_message(&mut out);
        let mut open: Vec<usize> = (0..self.tools.len()).collect();
        open.sort_by_key(|&i| self.tools[i].output_index.unwrap_or(usize::MAX));
        for i in open {
            self.close_tool(&mut out, i);
        }
        self.done = true;
        let resp = self.response();
        let event = match resp["status"].as_str() {
            Some("incomplete") => "response.incomplete",
            _ => "response.completed",
        };
        self.emit(&mut out, event, json!({ "response": resp }));
        out
    }

    /// Ends the stream with `response.failed` carrying `message`: the client sees an event of
    /// its own API, never a bare error envelope mid-stream. Open items stay `incomplete`.
    pub fn finish_error(&mut self, message: &str) -> String {
        let mut out = String::new();
        if self.done {
            return out;
        }
        self.ensure_started(&mut out);
        self.done = true;
        self.error = Some(message.to_owned());
        let resp = self.response();
        self.emit(&mut out, "response.failed", json!({ "response": resp }));
        out
    }

    /// The Response as it stands: final after `finish`/`finish_error`, else in progress.
    pub fn response(&self) -> Value {
        let mut r = response_object(&self.facts, self.model.as_deref());
        let output: Vec<Value> = self
            .output
            .iter()
            .enumerate()
            .map(|(i, item)| {
                if item.is_null() {
                    self.open_item_snapshot(i)
                } else {
                    item.clone()
                }
            })
            .collect();
        r["output"] = Value::Array(output);
        if let Some(err) = &self.error {
            r["status"] = json!("failed");
            r["error"] = json!({"code": "server_error", "message": err});
        } else if self.done {
            let (status, incomplete) = status_for(self.finish_reason.as_deref());
            r["status"] = json!(status);
            r["incomplete_details"] = incomplete;
        }
        if let Some(u) = &self.usage {
            r["usage"] = u.clone();
        }
        r
    }

    fn ensure_started(&mut self, out: &mut String) {
        if self.started {
            return;
        }
        self.started = true;
        let resp = self.response();
        self.emit(out, "response.created", json!({ "response": resp }));
        self.emit(out, "response.in_progress", json!({ "response": resp }));
    }

    fn emit(&mut self, out: &mut String, event: &str, mut payload: Value) {
        payload["type"] = json!(event);
        payload["sequence_number"] = json!(self.seq);
        self.seq += 1;
        let _ = write!(out, "event: {event}\ndata: {payload}\n\n");
    }

    /// An item still open, as it would be reported if the stream stopped now.
    fn open_item_snapshot(&self, index: usize) -> Value {
        if let Some(m) = self.message.as_ref().filter(|m| m.output_index == index) {
            let mut parts = m.parts.clone();
            if let Some((kind, text)) = &m.open {
                parts.push(part_value(*kind, text));
            }
            return json!({"id": m.item_id, "type": "message", "status": "incomplete",
                "role": "assistant", "content": parts});
        }
        if let Some(t) = self.tools.iter().find(|t| t.output_index == Some(index)) {
            return tool_call_item(
                &self.facts,
                &t.item_id,
                &t.call_id,
                &t.name,
                &t.arguments,
                "incomplete",
            );
        }
        Value::Null
    }

    fn part_delta(&mut self, out: &mut String, kind: PartKind, delta: &str) {
        if self.message.is_none() {
            let item_id = new_id("msg");
            let output_index = self.output.len();
            self.output.push(Value::Null);
            self.emit(
                out,
                "response.output_item.added",
                json!({"output_index": output_index, "item": {"id": item_id, "type": "message",
                    "status": "in_progress", "role": "assistant", "content": []}}),
            );
            self.message = Some(MessageState {
                item_id,
                output_index,
                parts: Vec::new(),
                open: None,
            });
        }
        if self
            .message
            .as_ref()
            .and_then(|m| m.open.as_ref())
            .is_some_and(|(k, _)| *k != kind)
        {
            self.close_part(out);
        }
        let Some(m) = self.message.as_mut() else {
            return;
        };
        let (item_id, output_index, content_index) =
            (m.item_id.clone(), m.output_index, m.parts.len());
        let opened = m.open.is_none();
        m.open
            .get_or_insert_with(|| (kind, String::new()))
            .1
            .push_str(delta);
        if opened {
            self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": output_index,
                    "content_index": content_index, "part": part_value(kind, "")}),
            );
        }
        match kind {
            PartKind::Text => self.emit(
                out,
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": output_index,
                    "content_index": content_index, "delta": delta, "logprobs": []}),
            ),
            PartKind::Refusal => self.emit(
                out,
                "response.refusal.delta",
                json!({"item_id": item_id, "output_index": output_index,
                    "content_index": content_index, "delta": delta}),
            ),
        }
    }

    fn close_part(&mut self, out: &mut String) {
        let Some(m) = self.message.as_mut() else {
            return;
        };
        let Some((kind, text)) = m.open.take() else {
            return;
        };
        let (item_id, output_index, content_index) =
            (m.item_id.clone(), m.output_index, m.parts.len());
        let part = part_value(kind, &text);
        m.parts.push(part.clone());
        match kind {
            PartKind::Text => self.emit(
                out,
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": output_index,
                    "content_index": content_index, "text": text, "logprobs": []}),
            ),
            PartKind::Refusal => self.emit(
                out,
                "response.refusal.done",
                json!({"item_id": item_id, "output_index": output_index,
                    "content_index": content_index, "refusal": text}),
            ),
        }
        self.emit(
            out,
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": output_index,
                "content_index": content_index, "part": part}),
        );
    }

    fn close_message(&mut self, out: &mut String) {
        self.close_part(out);
        let Some(m) = self.message.take() else {
            return;
        };
        // Text cut off by the token cap is an incomplete message, as the real API reports it.
        let status = match status_for(self.finish_reason.as_deref()).0 {
            "incomplete" => "incomplete",
            _ => "completed",
        };
        let item = json!({"id": m.item_id, "type": "message", "status": status,
            "role": "assistant", "content": m.parts});
        self.output[m.output_index] = item.clone();
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": m.output_index, "item": item}),
        );
    }

    fn tool_delta(&mut self, out: &mut String, call: &Value) {
        // Output items are ordered: text that preceded the calls is complete now.
        self.close_message(out);
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let pos = *self.tool_by_index.entry(index).or_insert_with(|| {
            self.tools.push(ToolState {
                item_id: new_id("fc"),
                output_index: None,
                call_id: String::new(),
                name: String::new(),
                arguments: String::new(),
            });
            self.tools.len() - 1
        });
        let t = &mut self.tools[pos];
        if let Some(id) = call.get("id").and_then(Value::as_str) {
            if t.call_id.is_empty() {
                t.call_id = id.to_owned();
            }
        }
        if let Some(n) = call.pointer("/function/name").and_then(Value::as_str) {
            t.name.push_str(n);
        }
        let fragment = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        t.arguments.push_str(fragment);
        if t.output_index.is_none() && !t.name.is_empty() {
            self.announce_tool(out, pos);
        } else if t.output_index.is_some() && !fragment.is_empty() {
            let (item_id, oi) = (t.item_id.clone(), t.output_index);
            if self.kind_of(pos) == ToolKind::Function {
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": oi, "delta": fragment}),
                );
            }
        }
    }

    fn kind_of(&self, pos: usize) -> ToolKind {
        self.facts
            .origin(&self.tools[pos].name)
            .map_or(ToolKind::Function, |o| o.kind)
    }

    fn announce_tool(&mut self, out: &mut String, pos: usize) {
        let output_index = self.output.len();
        self.output.push(Value::Null);
        self.tools[pos].output_index = Some(output_index);
        let t = &self.tools[pos];
        let item = tool_call_item(
            &self.facts,
            &t.item_id,
            &t.call_id,
            &t.name,
            "",
            "in_progress",
        );
        let (item_id, buffered) = (t.item_id.clone(), t.arguments.clone());
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": output_index, "item": item}),
        );
        if !buffered.is_empty() && self.kind_of(pos) == ToolKind::Function {
            self.emit(
                out,
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": output_index, "delta": buffered}),
            );
        }
    }

    fn close_tool(&mut self, out: &mut String, pos: usize) {
        if self.tools[pos].output_index.is_none() {
            self.announce_tool(out, pos);
        }
        let kind = self.kind_of(pos);
        let t = &self.tools[pos];
        let Some(oi) = t.output_index else {
            return;
        };
        let item = tool_call_item(
            &self.facts,
            &t.item_id,
            &t.call_id,
            &t.name,
            &t.arguments,
            "completed",
        );
        let item_id = t.item_id.clone();
        match kind {
            ToolKind::Function => {
                let name = item["name"].clone();
                let args = t.arguments.clone();
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": oi, "name": name, "arguments": args}),
                );
            }
            ToolKind::Custom => {
                let input = custom_input(&t.arguments);
                if !input.is_empty() {
                    self.emit(
                        out,
                        "response.custom_tool_call_input.delta",
                        json!({"item_id": item_id, "output_index": oi, "delta": input}),
                    );
                }
                self.emit(
                    out,
                    "response.custom_tool_call_input.done",
                    json!({"item_id": item_id, "output_index": oi, "input": input}),
                );
            }
        }
        self.output[oi] = item.clone();
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": oi, "item": item}),
        );
    }
}

fn part_value(kind: PartKind, text: &str) -> Value {
    match kind {
        PartKind::Text => output_text_part(text),
        PartKind::Refusal => json!({"type": "refusal", "refusal": text}),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
