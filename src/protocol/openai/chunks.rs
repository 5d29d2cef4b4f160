//! Conversions between `chat.completion` and `chat.completion.chunk` JSON.
//!
//! Used to store streamed answers as a complete response, to replay a cached
//! non-streamed answer as a stream, and by the voting feature to compare answers.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// Default number of characters per synthesized content delta (about 4 tokens).
pub const DEFAULT_CHUNK_CHARS: usize = 16;

/// Top-level chunk fields copied into the assembled completion (first non-null wins).
const HEADER_FIELDS: &[&str] = &[
    "id",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
];

#[derive(Default)]
struct ToolAcc {
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
}

#[derive(Default)]
struct ChoiceAcc {
    role: Option<Value>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: BTreeMap<u64, ToolAcc>,
    last_tool: Option<u64>,
    function_call: Option<(String, String)>,
    /// Provider extensions (`reasoning_content`, `annotations`, ...): strings are
    /// concatenated, arrays extended, anything else last-wins.
    extra: Map<String, Value>,
    finish_reason: Option<Value>,
    logprobs: Option<Map<String, Value>>,
    /// Unknown choice-level fields, last non-null wins.
    choice_extra: Map<String, Value>,
}

fn append_str(slot: &mut Option<String>, v: &Value) {
    if let Some(s) = v.as_str() {
        slot.get_or_insert_with(String::new).push_str(s);
    }
}

impl ChoiceAcc {
    fn apply(&mut self, choice: &Map<String, Value>) {
        if let Some(Value::Object(delta)) = choice.get("delta") {
            self.apply_delta(delta);
        }
        for (k, v) in choice {
            match k.as_str() {
                "index" | "delta" => {}
                "finish_reason" => {
                    if !v.is_null() {
                        self.finish_reason = Some(v.clone());
                    }
                }
                "logprobs" => {
                    if let Value::Object(lp) = v {
                        let acc = self.logprobs.get_or_insert_with(Map::new);
                        for (lk, lv) in lp {
                            merge_extra(acc, lk, lv);
                        }
                    }
                }
                _ => {
                    if !v.is_null() {
                        self.choice_extra.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }

    fn apply_delta(&mut self, delta: &Map<String, Value>) {
        for (k, v) in delta {
            match k.as_str() {
                "role" => {
                    if !v.is_null() {
                        self.role = Some(v.clone());
                    }
                }
                "content" => append_str(&mut self.content, v),
                "refusal" => append_str(&mut self.refusal, v),
                "tool_calls" => {
                    if let Value::Array(calls) = v {
                        for call in calls.iter().filter_map(Value::as_object) {
                            self.apply_tool_call(call);
                        }
                    }
                }
                "function_call" => {
                    if let Value::Object(fc) = v {
                        let (name, args) = self.function_call.get_or_insert_with(Default::default);
                        if let Some(n) = fc.get("name").and_then(Value::as_str) {
                            name.push_str(n);
                        }
                        if let Some(a) = fc.get("arguments").and_then(Value::as_str) {
                            args.push_str(a);
                        }
                    }
                }
                _ => merge_extra(&mut self.extra, k, v),
            }
        }
    }

    fn apply_tool_call(&mut self, call: &Map<String, Value>) {
        let id = call.get("id").filter(|v| !v.is_null());
        let index = match call.get("index").and_then(Value::as_u64) {
            Some(i) => i,
            // Some OpenAI-compatible servers omit `index`: a new id starts a new call,
            // otherwise the delta continues the previous one.
            None => match (self.last_tool, id) {
                (Some(last), Some(id))
                    if self.tool_calls.get(&last).and_then(|t| t.id.as_ref()) != Some(id) =>
                {
                    self.tool_calls.keys().next_back().map_or(0, |k| k + 1)
                }
                (Some(last), _) => last,
                (None, _) => 0,
            },
        };
        self.last_tool = Some(index);
        let acc = self.tool_calls.entry(index).or_default();
        if let Some(id) = id {
            acc.id = Some(id.clone());
        }
        if let Some(t) = call.get("type").filter(|v| !v.is_null()) {
            acc.kind = Some(t.clone());
        }
        if let Some(Value::Object(f)) = call.get("function") {
            if let Some(n) = f.get("name").and_then(Value::as_str) {
                acc.name.push_str(n);
            }
            if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                acc.arguments.push_str(a);
            }
        }
    }

    fn finish(self, index: u64) -> Value {
        let mut message = Map::new();
        message.insert(
            "role".into(),
            self.role.unwrap_or_else(|| Value::from("assistant")),
        );
        message.insert(
            "content".into(),
            self.content.map_or(Value::Null, Value::from),
        );
        if let Some(r) = self.refusal {
            message.insert("refusal".into(), Value::from(r));
        }
        if !self.tool_calls.is_empty() {
            let calls: Vec<Value> = self
                .tool_calls
                .into_values()
                .map(|t| {
                    json!({
                        "id": t.id.unwrap_or(Value::Null),
                        "type": t.kind.unwrap_or_else(|| Value::from("function")),
                        "function": {"name": t.name, "arguments": t.arguments},
                    })
                })
                .collect();
            message.insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some((name, arguments)) = self.function_call {
            message.insert(
                "function_call".into(),
                json!({"name": name, "arguments": arguments}),
            );
        }
        for (k, v) in self.extra {
            message.entry(k).or_insert(v);
        }
        let mut choice = Map::new();
        choice.insert("index".into(), Value::from(index));
        choice.insert("message".into(), Value::Object(message));
        choice.insert(
            "logprobs".into(),
            self.logprobs.map_or(Value::Null, Value::Object),
        );
        choice.insert(
            "finish_reason".into(),
            self.finish_reason.unwrap_or(Value::Null),
        );
        for (k, v) in self.choice_extra {
            choice.entry(k).or_insert(v);
        }
        Value::Object(choice)
    }
}

fn merge_extra(acc: &mut Map<String, Value>, k: &str, v: &Value) {
    match (acc.get_mut(k), v) {
        (_, Value::Null) => {}
        (Some(Value::String(prev)), Value::String(s)) => prev.push_str(s),
        (Some(Value::Array(prev)), Value::Array(items)) => prev.extend(items.iter().cloned()),
        _ => {
            acc.insert(k.to_owned(), v.clone());
        }
    }
}

/// Rebuilds a `chat.completion` from `chat.completion.chunk` objects in stream order.
///
/// Content/refusal/tool-call arguments are concatenated per choice `index`; tool calls
/// are grouped by their own `index`; the last non-null `usage` wins. Non-object chunks
/// are skipped, so malformed input yields a (possibly empty) completion, never a panic.
pub fn assemble_completion(chunks: &[Value]) -> Value {
    let mut header = Map::new();
    let mut usage = Value::Null;
    let mut choices: BTreeMap<u64, ChoiceAcc> = BTreeMap::new();
    for chunk in chunks.iter().filter_map(Value::as_object) {
        for &f in HEADER_FIELDS {
            if let Some(v) = chunk.get(f).filter(|v| !v.is_null()) {
                header.entry(f).or_insert_with(|| v.clone());
            }
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = u.clone();
        }
        if let Some(Value::Array(cs)) = chunk.get("choices") {
            for c in cs.iter().filter_map(Value::as_object) {
                let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
                choices.entry(index).or_default().apply(c);
            }
        }
    }
    let mut out = Map::new();
    out.insert(
        "id".into(),
        header.remove("id").unwrap_or_else(|| Value::from("")),
    );
    out.insert("object".into(), Value::from("chat.completion"));
    out.insert(
        "created".into(),
        header.remove("created").unwrap_or_else(|| Value::from(0)),
    );
    out.insert(
        "model".into(),
        header.remove("model").unwrap_or_else(|| Value::from("")),
    );
    out.insert(
        "choices".into(),
        Value::Array(choices.into_iter().map(|(i, c)| c.finish(i)).collect()),
    );
    if !usage.is_null() {
        out.insert("usage".into(), usage);
    }
    for (k, v) in header {
        out.insert(k, v);
    }
    Value::Object(out)
}

/// Splits `s` into pieces of at most `n` chars (on char boundaries).
fn split_chars(s: &str, n: usize) -> Vec<&str> {
    let n = n.max(1);
    let mut out = Vec::with_capacity(s.len() / n + 1);
    let mut start = 0;
    let mut count = 0;
    for (i, _) in s.char_indices() {
        if count == n {
            out.push(&s[start..i]);
            start = i;
            count = 0;
        }
        count += 1;
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

struct ChunkWriter {
    base: Map<String, Value>,
    out: Vec<Value>,
}

impl ChunkWriter {
    fn push_choice(&mut self, index: &Value, delta: Value, logprobs: Value, finish: Value) {
        let mut c = self.base.clone();
        c.insert(
            "choices".into(),
            json!([{
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }]),
        );
        self.out.push(Value::Object(c));
    }

    fn push_delta(&mut self, index: &Value, delta: Value) {
        self.push_choice(index, delta, Value::Null, Value::Null);
    }
}

/// Synthesizes a realistic `chat.completion.chunk` sequence from a `chat.completion`,
/// so a cached non-streamed answer can be replayed as a stream.
///
/// Per choice: a role chunk, string extensions such as `reasoning_content` and then
/// content/refusal in deltas of `chunk_chars` characters (one per logprob token when
/// the logprob tokens spell the content), tool calls (header then argument pieces),
/// a final chunk with `finish_reason`; then a usage chunk with empty `choices` if the
/// completion has `usage`. A non-object input yields no chunks.
pub fn completion_to_chunks(completion: &Value, chunk_chars: usize) -> Vec<Value> {
    let Some(obj) = completion.as_object() else {
        return Vec::new();
    };
    let mut base = Map::new();
    for &f in HEADER_FIELDS {
        if let Some(v) = obj.get(f).filter(|v| !v.is_null()) {
            base.insert(f.into(), v.clone());
        }
    }
    base.insert("object".into(), Value::from("chat.completion.chunk"));
    let mut w = ChunkWriter {
        base,
        out: Vec::new(),
    };
    let choices = obj.get("choices").and_then(Value::as_array);
    for (pos, choice) in choices
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .enumerate()
    {
        let index = choice
            .get("index")
            .cloned()
            .unwrap_or_else(|| Value::from(pos));
        let empty = Map::new();
        let msg = choice
            .get("message")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        write_choice(&mut w, &index, choice, msg, chunk_chars);
    }
    if let Some(u) = obj.get("usage").filter(|u| !u.is_null()) {
        let mut c = w.base.clone();
        c.insert("choices".into(), Value::Array(Vec::new()));
        c.insert("usage".into(), u.clone());
        w.out.push(Value::Object(c));
    }
    w.out
}

fn write_choice(
    w: &mut ChunkWriter,
    index: &Value,
    choice: &Map<String, Value>,
    msg: &Map<String, Value>,
    chunk_chars: usize,
) {
    let role = msg
        .get("role")
        .cloned()
        .unwrap_or_else(|| Value::from("assistant"));
    let content = msg.get("content").and_then(Value::as_str);
    // Like OpenAI: the role chunk carries `content: ""` only when there is content.
    let mut first = json!({ "role": role });
    if content.is_some() {
        first["content"] = Value::from("");
    }
    w.push_delta(index, first);

    const HANDLED: &[&str] = &["role", "content", "refusal", "tool_calls", "function_call"];
    // Reasoning-style string extensions stream before the answer.
    for (k, v) in msg.iter().filter(|(k, _)| !HANDLED.contains(&k.as_str())) {
        if let Some(s) = v.as_str() {
            for piece in split_chars(s, chunk_chars) {
                w.push_delta(index, json!({ k: piece }));
            }
        }
    }

    let logprobs = choice.get("logprobs").and_then(Value::as_object);
    if let Some(text) = content {
        write_content(w, index, text, logprobs, chunk_chars);
    }
    if let Some(text) = msg.get("refusal").and_then(Value::as_str) {
        for piece in split_chars(text, chunk_chars) {
            w.push_delta(index, json!({ "refusal": piece }));
        }
    }
    // Non-string extensions (annotations, audio, ...) go in one delta.
    for (k, v) in msg.iter().filter(|(k, _)| !HANDLED.contains(&k.as_str())) {
        if !v.is_string() && !v.is_null() {
            w.push_delta(index, json!({ k: v }));
        }
    }
    if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
        for (i, call) in calls.iter().enumerate() {
            let f = call.get("function");
            let name = f
                .and_then(|f| f.get("name"))
                .cloned()
                .unwrap_or(Value::Null);
            let args = f
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let kind = call
                .get("type")
                .cloned()
                .unwrap_or_else(|| Value::from("function"));
            let id = call.get("id").cloned().unwrap_or(Value::Null);
            w.push_delta(
                index,
                json!({"tool_calls": [{"index": i, "id": id, "type": kind,
                    "function": {"name": name, "arguments": ""}}]}),
            );
            for piece in split_chars(args, chunk_chars) {
                w.push_delta(
                    index,
                    json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}),
                );
            }
        }
    }
    if let Some(fc) = msg.get("function_call").and_then(Value::as_object) {
        let name = fc.get("name").cloned().unwrap_or(Value::Null);
        w.push_delta(
            index,
            json!({"function_call": {"name": name, "arguments": ""}}),
        );
        let args = fc.get("arguments").and_then(Value::as_str).unwrap_or("");
        for piece in split_chars(args, chunk_chars) {
            w.push_delta(index, json!({"function_call": {"arguments": piece}}));
        }
    }
    let mut last = w.base.clone();
    let mut final_choice = json!({
        "index": index,
        "delta": {},
        "logprobs": Value::Null,
        "finish_reason": choice.get("finish_reason").cloned().unwrap_or(Value::Null),
    });
    // Keep provider-specific choice fields (e.g. `native_finish_reason`).
    if let Value::Object(fc) = &mut final_choice {
        for (k, v) in choice {
            if !matches!(
                k.as_str(),
                "index" | "message" | "logprobs" | "finish_reason"
            ) {
                fc.insert(k.clone(), v.clone());
            }
        }
    }
    last.insert("choices".into(), json!([final_choice]));
    w.out.push(Value::Object(last));
}

fn write_content(
    w: &mut ChunkWriter,
    index: &Value,
    text: &str,
    logprobs: Option<&Map<String, Value>>,
    chunk_chars: usize,
) {
    let tokens = logprobs
        .and_then(|lp| lp.get("content"))
        .and_then(Value::as_array);
    if let Some(tokens) = tokens {
        let spelled: Option<String> = tokens
            .iter()
            .map(|t| t.get("token").and_then(Value::as_str))
            .collect();
        if spelled.as_deref() == Some(text) && !tokens.is_empty() {
            // One delta per token, each with its own logprob entry: exactly what a
            // real stream looks like.
            for t in tokens {
                let tok = t.get("token").cloned().unwrap_or(Value::Null);
                w.push_choice(
                    index,
                    json!({ "content": tok }),
                    json!({"content": [t], "refusal": Value::Null}),
                    Value::Null,
                );
            }
            return;
        }
    }
    // Tokens do not line up with the text: attach all logprobs to the first piece.
    let mut lp = logprobs.map_or(Value::Null, |m| Value::Object(m.clone()));
    for piece in split_chars(text, chunk_chars) {
        w.push_choice(
            index,
            json!({ "content": piece }),
            std::mem::take(&mut lp),
            Value::Null,
        );
    }
    if !lp.is_null() {
        // Empty text but logprobs present.
        w.push_choice(index, json!({}), lp, Value::Null);
    }
}

/// Gives a stored chunk or completion a fresh `id` and `created` (no-op on non-objects).
pub fn refresh_ids(value: &mut Value, new_id: &str, created: u64) {
    if let Value::Object(m) = value {
        m.insert("id".into(), Value::from(new_id));
        m.insert("created".into(), Value::from(created));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn completion() -> Value {
        json!({
            "id": "chatcmpl-abc",
            "object": "chat.completion",
            "created": 1_700_000_000u64,
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_123",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Héllo wörld — this is a longer answer with ünïcode ✓ and more text.",
                    },
                    "logprobs": null,
                    "finish_reason": "stop"
                },
                {
                    "index": 1,
                    "message": {
                        "role": "assistant",
                        "content": null,
                        "tool_calls": [
                            {"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"c\"}"}},
                            {"id": "call_2", "type": "function",
                             "function": {"name": "get_time", "arguments": "{}"}}
                        ]
                    },
                    "logprobs": null,
                    "finish_reason": "tool_calls"
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42,
                      "prompt_tokens_details": {"cached_tokens": 4}}
        })
    }

    #[test]
    fn round_trip_completion_chunks_completion() {
        let c = completion();
        for size in [1, 3, 16, 1000] {
            let chunks = completion_to_chunks(&c, size);
            assert!(chunks
                .iter()
                .all(|ch| ch["object"] == "chat.completion.chunk" && ch["id"] == "chatcmpl-abc"));
            // Last chunk is the usage chunk with empty choices.
            let last = chunks.last().unwrap();
            assert_eq!(last["choices"], json!([]));
            assert_eq!(last["usage"]["total_tokens"], 42);
            let back = assemble_completion(&chunks);
            assert_eq!(back, c, "chunk size {size}");
        }
        // Content really is split into several deltas.
        let chunks = completion_to_chunks(&c, 8);
        let content_deltas = chunks
            .iter()
            .filter(|ch| {
                ch["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
            })
            .count();
        assert!(content_deltas > 5);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    }

    #[test]
    fn assembles_openai_style_stream() {
        let chunks: Vec<Value> = [
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"lookup","arguments":""}}]},"logprobs":null,"finish_reason":null}],"obfuscation":"xx"}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":"fp","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"q\":"}}]},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"x\"}"}}]},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"other","arguments":"{}"}}]},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let c = assemble_completion(&chunks);
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["id"], "c1");
        assert_eq!(c["created"], 5);
        assert_eq!(c["system_fingerprint"], "fp");
        assert!(c.get("obfuscation").is_none());
        let msg = &c["choices"][0]["message"];
        assert_eq!(msg["content"], Value::Null);
        assert_eq!(msg["tool_calls"][0]["id"], "call_a");
        assert_eq!(msg["tool_calls"][0]["function"]["name"], "lookup");
        assert_eq!(
            msg["tool_calls"][0]["function"]["arguments"],
            r#"{"q":"x"}"#
        );
        assert_eq!(msg["tool_calls"][1]["function"]["name"], "other");
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(c["usage"]["total_tokens"], 7);
    }

    #[test]
    fn interleaved_choices_and_missing_tool_index() {
        let chunks = vec![
            json!({"id":"x","created":1,"model":"m","choices":[{"index":1,"delta":{"role":"assistant","content":"B1"}}]}),
            json!({"id":"x","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"A1"}}]}),
            json!({"id":"x","created":1,"model":"m","choices":[{"index":1,"delta":{"content":"B2"},"finish_reason":"stop"}]}),
            json!({"id":"x","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"A2","reasoning_content":"r"},"finish_reason":"length"}]}),
            // Gemini-style tool calls without `index`.
            json!({"choices":[{"index":2,"delta":{"tool_calls":[{"id":"t1","function":{"name":"f","arguments":"{\"a\""}}]}}]}),
            json!({"choices":[{"index":2,"delta":{"tool_calls":[{"function":{"arguments":":1}"}}]}}]}),
            json!({"choices":[{"index":2,"delta":{"tool_calls":[{"id":"t2","function":{"name":"g","arguments":"{}"}}]}}]}),
            json!("garbage"),
            json!({"choices": "nope"}),
        ];
        let c = assemble_completion(&chunks);
        let choices = c["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        assert_eq!(choices[0]["message"]["content"], "A1A2");
        assert_eq!(choices[0]["message"]["reasoning_content"], "r");
        assert_eq!(choices[0]["finish_reason"], "length");
        assert_eq!(choices[1]["message"]["content"], "B1B2");
        let tc = choices[2]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(tc.len(), 2);
        assert_eq!(tc[0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(tc[1]["id"], "t2");
        // Empty input never panics.
        assert_eq!(assemble_completion(&[])["choices"], json!([]));
        assert!(completion_to_chunks(&json!(3), 4).is_empty());
    }

    #[test]
    fn logprob_tokens_become_deltas() {
        let c = json!({
            "id": "l", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "Hi there"},
                "logprobs": {"content": [
                    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []},
                    {"token": " there", "logprob": -0.2, "bytes": null, "top_logprobs": []}
                ], "refusal": null},
                "finish_reason": "stop"}]
        });
        let chunks = completion_to_chunks(&c, 3);
        let texts: Vec<&str> = chunks
            .iter()
            .filter_map(|ch| ch["choices"][0]["delta"]["content"].as_str())
            .filter(|s| !s.is_empty())
            .collect();
        assert_eq!(texts, ["Hi", " there"]);
        let back = assemble_completion(&chunks);
        assert_eq!(back["choices"][0]["message"], c["choices"][0]["message"]);
        assert_eq!(
            back["choices"][0]["logprobs"]["content"],
            c["choices"][0]["logprobs"]["content"]
        );
    }

    #[test]
    fn refresh_ids_sets_id_and_created() {
        let mut v = completion();
        refresh_ids(&mut v, "chatcmpl-new", 42);
        assert_eq!(v["id"], "chatcmpl-new");
        assert_eq!(v["created"], 42);
        let mut s = json!("x");
        refresh_ids(&mut s, "a", 1);
        assert_eq!(s, json!("x"));
    }

    #[test]
    fn split_chars_respects_boundaries() {
        assert_eq!(split_chars("héllo", 2), ["hé", "ll", "o"]);
        assert_eq!(split_chars("", 4), Vec::<&str>::new());
        assert_eq!(split_chars("abc", 0), ["a", "b", "c"]);
    }
}
