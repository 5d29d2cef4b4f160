//! Parsing of OpenAI request bodies. The typed parts are read once; every
//! other field stays in the JSON map and is forwarded untouched.

use crate::protocol::ProtocolError;
use crate::usage::estimate_tokens;
use serde_json::{Map, Value};

/// What routing rules and limits need to know about a chat request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFeatures {
    pub prompt_tokens: u64,
    pub has_tools: bool,
    pub has_images: bool,
    pub json_response: bool,
    /// User messages in the conversation.
    pub turns: u32,
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// The client itself asked for the usage chunk.
    pub client_wants_usage: bool,
    pub max_tokens: Option<u64>,
    pub n: u32,
    pub features: RequestFeatures,
}

/// Most choices a request may ask for (OpenAI's own limit).
const MAX_N: u64 = 128;

pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ProtocolError> {
    if bytes.is_empty() {
        return Err(ProtocolError::body(
            "Request body is empty; expected a JSON object.",
        ));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ProtocolError::body("Request body must be a JSON object.")),
        Err(e) => Err(ProtocolError::body(format!(
            "We could not parse the JSON body of your request ({e})."
        ))),
    }
}

pub fn model_field(body: &Map<String, Value>) -> Result<String, ProtocolError> {
    match body.get("model") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None => Err(ProtocolError::field(
            "model",
            "you must provide a model parameter",
        )),
        Some(_) => Err(ProtocolError::field("model", "`model` must be a string")),
    }
}

fn opt_u64(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ProtocolError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ProtocolError::field(field, format!("`{field}` must be a non-negative integer"))
        }),
    }
}

fn opt_bool(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ProtocolError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ProtocolError::field(
            field,
            format!("`{field}` must be a boolean"),
        )),
    }
}

pub fn parse_chat(bytes: &[u8]) -> Result<ChatRequest, ProtocolError> {
    let body = parse_object(bytes)?;
    let model = model_field(&body)?;
    let stream = opt_bool(&body, "stream")?.unwrap_or(false);
    let client_wants_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ProtocolError::field(
                    "stream_options.include_usage",
                    "`stream_options.include_usage` must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(ProtocolError::field(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    let max_tokens = match opt_u64(&body, "max_completion_tokens")? {
        Some(m) => Some(m),
        None => opt_u64(&body, "max_tokens")?,
    };
    let n = opt_u64(&body, "n")?.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ProtocolError::field(
            "n",
            format!("`n` must be between 1 and {MAX_N}"),
        ));
    }
    let features = features(&body)?;
    Ok(ChatRequest {
        body,
        model,
        stream,
        client_wants_usage,
        max_tokens,
        n: n as u32,
        features,
    })
}

fn features(body: &Map<String, Value>) -> Result<RequestFeatures, ProtocolError> {
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ProtocolError::field(
                "messages",
                "`messages` must contain at least one message",
            ))
        }
        Some(_) => {
            return Err(ProtocolError::field(
                "messages",
                "`messages` must be an array",
            ))
        }
        None => {
            return Err(ProtocolError::field(
                "messages",
                "you must provide a messages parameter",
            ))
        }
    };
    let mut f = RequestFeatures::default();
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(ProtocolError::field(
                format!("messages[{i}]"),
                format!("`messages[{i}]` must be an object"),
            ));
        };
        let role = match obj.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(ProtocolError::field(
                    format!("messages[{i}].role"),
                    format!("`messages[{i}].role` is required and must be a string"),
                ))
            }
        };
        if role == "user" {
            f.turns += 1;
        }
        // Per-message framing overhead, as OpenAI counts it.
        f.prompt_tokens += 4;
        content_features(obj.get("content"), &mut f);
        if let Some(tc) = obj.get("tool_calls") {
            f.prompt_tokens += estimate_tokens(&tc.to_string());
        }
    }
    if let Some(Value::Array(tools)) = body.get("tools") {
        if !tools.is_empty() {
            f.has_tools = true;
            f.prompt_tokens += tools
                .iter()
                .map(|t| estimate_tokens(&t.to_string()))
                .sum::<u64>();
        }
    }
    if body.get("functions").is_some() {
        f.has_tools = true;
    }
    f.json_response = matches!(
        nested(body, "response_format", "type").and_then(Value::as_str),
        Some("json_object") | Some("json_schema")
    );
    f.prompt_tokens += 3;
    Ok(f)
}

/// Prompt tokens and images of one message's `content`.
fn content_features(content: Option<&Value>, f: &mut RequestFeatures) {
    match content {
        Some(Value::String(s)) => f.prompt_tokens += estimate_tokens(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        f.prompt_tokens += p
                            .get("text")
                            .and_then(Value::as_str)
                            .map(estimate_tokens)
                            .unwrap_or(0)
                    }
                    Some("image_url") | Some("input_image") => {
                        f.has_images = true;
                        // A typical high-detail image tile budget.
                        f.prompt_tokens += 765;
                    }
                    _ => f.prompt_tokens += estimate_tokens(&p.to_string()),
                }
            }
        }
        _ => {}
    }
}

/// `body[a][b]`, for the few nested fields the gateway reads.
pub fn nested<'a>(body: &'a Map<String, Value>, a: &str, b: &str) -> Option<&'a Value> {
    body.get(a)?.get(b)
}

/// Text of a message's content (string or text parts).
pub fn content_text(m: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match m.get("content")? {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    if !s.is_empty() {
                        s.push('\n');
                    }
                    s.push_str(t);
                }
            }
            Some(std::borrow::Cow::Owned(s))
        }
        _ => None,
    }
}

fn is_reminder(t: &str) -> bool {
    t.trim_start().starts_with("<system-reminder>")
}

/// A user message's text without reminder blocks; `None` when nothing is left.
fn human_text(m: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match m.get("content")? {
        Value::String(s) if !is_reminder(s) && !s.trim().is_empty() => {
            Some(std::borrow::Cow::Borrowed(s))
        }
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .filter(|t| !is_reminder(t) && !t.trim().is_empty())
                .collect();
            match texts.as_slice() {
                [] => None,
                [one] => Some(std::borrow::Cow::Borrowed(one)),
                many => Some(std::borrow::Cow::Owned(many.join("\n"))),
            }
        }
        _ => None,
    }
}

/// How the upstream body treats streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    /// As the client sent it.
    Keep,
    /// Streamed, and usage always requested (the gateway bills from it).
    ForceUsage,
    /// Not streamed: `stream` and `stream_options` are left out.
    Strip,
}

/// Fields that describe the conversation's tools and format; dropped when
/// the conversation is replaced (a judge's prompt).
const CONVERSATION_FIELDS: &[&str] = &[
    "tools",
    "tool_choice",
    "response_format",
    "functions",
    "function_call",
    "n",
];

/// The one builder of upstream bodies: the client's fields verbatim, with the
/// deployment's model name and the few changes a call asks for. Serialised
/// straight from the parsed request, without copying it.
pub struct UpstreamBody<'a> {
    pub body: &'a Map<String, Value>,
    pub model: &'a str,
    pub stream: StreamMode,
    /// Overrides the request's temperature (a voter's sampling).
    pub temperature: Option<f64>,
    /// Replaces the conversation.
    pub messages: Option<&'a [Value]>,
    /// The deployment's output cap: a larger `max_tokens` /
    /// `max_completion_tokens` is lowered to it (the reservation assumes so).
    pub max_output: Option<u64>,
}

impl<'a> UpstreamBody<'a> {
    pub fn new(body: &'a Map<String, Value>, model: &'a str, stream: StreamMode) -> Self {
        UpstreamBody {
            body,
            model,
            stream,
            temperature: None,
            messages: None,
            max_output: None,
        }
    }

    /// Clamps the output cap to the deployment's.
    pub fn max_output(mut self, cap: u64) -> Self {
        self.max_output = Some(cap);
        self
    }

    pub fn to_bytes(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    fn skips(&self, k: &str) -> bool {
        (self.stream == StreamMode::Strip && matches!(k, "stream" | "stream_options"))
            || (self.temperature.is_some() && k == "temperature")
            || (self.messages.is_some() && CONVERSATION_FIELDS.contains(&k))
    }
}

impl serde::Serialize for UpstreamBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let force_usage = self.stream == StreamMode::ForceUsage;
        let mut map = s.serialize_map(None)?;
        let mut saw_options = false;
        for (k, v) in self.body {
            match k.as_str() {
                k if self.skips(k) => {}
                "model" => map.serialize_entry(k, self.model)?,
                "messages" if self.messages.is_some() => map.serialize_entry(k, &self.messages)?,
                "max_tokens" | "max_completion_tokens" => match (v.as_u64(), self.max_output) {
                    (Some(t), Some(cap)) if t > cap => map.serialize_entry(k, &cap)?,
                    _ => map.serialize_entry(k, v)?,
                },
                "stream_options" if force_usage => {
                    saw_options = true;
                    let mut o = v.as_object().cloned().unwrap_or_default();
                    o.insert("include_usage".into(), Value::Bool(true));
                    map.serialize_entry(k, &o)?;
                }
                _ => map.serialize_entry(k, v)?,
            }
        }
        if !self.body.contains_key("model") {
            map.serialize_entry("model", self.model)?;
        }
        if force_usage && !saw_options {
            map.serialize_entry(
                "stream_options",
                &serde_json::json!({"include_usage": true}),
            )?;
        }
        if let Some(n) = self.temperature.and_then(serde_json::Number::from_f64) {
            map.serialize_entry("temperature", &n)?;
        }
        map.end()
    }
}

/// Usage of a non-streamed chat completion; `None` if the body is not one.
pub fn completion_usage(body: &[u8]) -> Option<crate::usage::Usage> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[allow(dead_code)]
        choices: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        usage: Option<Value>,
    }
    let p: Peek = serde_json::from_slice(body).ok()?;
    Some(
        p.usage
            .as_ref()
            .and_then(crate::usage::Usage::from_json)
            .unwrap_or_default(),
    )
}

/// Prompt-token estimate of a `/v1/completions` (`prompt`) or
/// `/v1/embeddings` (`input`) body.
pub fn passthrough_prompt_tokens(body: &Map<String, Value>) -> u64 {
    fn count(v: &Value) -> u64 {
        match v {
            Value::String(s) => estimate_tokens(s),
            Value::Array(items) => items.iter().map(count).sum(),
            // Token ids: one each.
            Value::Number(_) => 1,
            _ => 0,
        }
    }
    body.get("prompt")
        .or_else(|| body.get("input"))
        .map(count)
        .unwrap_or(0)
}

impl ChatRequest {
    /// The text of the messages whose role `pick` accepts, in order.
    pub fn texts<'a>(
        &'a self,
        pick: impl Fn(&str) -> bool + 'a,
    ) -> impl DoubleEndedIterator<Item = std::borrow::Cow<'a, str>> + 'a {
        let msgs: &'a [Value] = match self.body.get("messages") {
            Some(Value::Array(m)) => m,
            _ => &[],
        };
        msgs.iter()
            .filter(move |m| pick(m.get("role").and_then(Value::as_str).unwrap_or("")))
            .filter_map(content_text)
    }

    /// The text of the first (or, `last`, the last) message whose role
    /// `pick` accepts; `None` if that message has no text.
    pub fn text_of(
        &self,
        pick: impl Fn(&str) -> bool,
        last: bool,
    ) -> Option<std::borrow::Cow<'_, str>> {
        let Some(Value::Array(msgs)) = self.body.get("messages") else {
            return None;
        };
        let is = |m: &&Value| pick(m.get("role").and_then(Value::as_str).unwrap_or(""));
        let m = if last {
            msgs.iter().rev().find(is)
        } else {
            msgs.iter().find(is)
        };
        m.and_then(content_text)
    }

    /// The newest text a human wrote: what classifiers and voters read. Tool
    /// results (tool-role messages) are not human text, and neither are the
    /// `<system-reminder>` blocks agent clients inject into user turns; a
    /// user turn holding only those is passed over for an older one.
    pub fn last_user_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        let Some(Value::Array(msgs)) = self.body.get("messages") else {
            return None;
        };
        msgs.iter()
            .rev()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .find_map(human_text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_typed_parts_and_keeps_the_rest() {
        let r = parse_chat(br#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":true,
            "stream_options":{"include_usage":true},"max_tokens":5,"seed":7,"vendor_x":{"a":1},
            "tools":[{"type":"function","function":{"name":"f"}}],"response_format":{"type":"json_object"}}"#);
        let r = match r {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(r.model, "auto");
        assert!(r.stream && r.client_wants_usage);
        assert_eq!(r.max_tokens, Some(5));
        assert!(r.features.has_tools && r.features.json_response);
        assert_eq!(r.features.turns, 1);
        assert_eq!(r.body["vendor_x"]["a"], 1);
    }

    #[test]
    fn last_user_text_skips_tool_results_and_reminders() {
        let r = parse_chat(
            br#"{"model":"m","messages":[
            {"role":"user","content":[{"type":"text","text":"<system-reminder>ctx</system-reminder>"},{"type":"text","text":"fix the bug"}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"t","content":"file contents"},
            {"role":"user","content":"<system-reminder>todo list</system-reminder>"}]}"#,
        );
        let r = match r {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(r.last_user_text().as_deref(), Some("fix the bug"));
    }

    #[test]
    fn names_the_bad_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", ""),
            (b"[]", ""),
            (br#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (br#"{"model":"m"}"#, "messages"),
            (br#"{"model":"m","messages":[]}"#, "messages"),
            (
                br#"{"model":"m","messages":[{"content":"x"}]}"#,
                "messages[0].role",
            ),
            (br#"{"model":"m","messages":[{"role":"user"}],"n":0}"#, "n"),
            (
                br#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#,
                "stream",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user"}],"max_tokens":-1}"#,
                "max_tokens",
            ),
        ];
        for (body, param) in cases {
            let e = parse_chat(body).err();
            let e = match e {
                Some(e) => e,
                None => panic!("accepted {}", String::from_utf8_lossy(body)),
            };
            assert_eq!(e.field.as_deref().unwrap_or(""), *param);
        }
    }

    #[test]
    fn upstream_body_sets_the_model_and_forces_usage_on_streams() {
        let r = parse_chat(br#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":true,"temperature":1}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = UpstreamBody::new(&r.body, "gpt-x", StreamMode::ForceUsage).to_bytes();
        let v: Value = serde_json::from_slice(&b).unwrap_or_default();
        assert_eq!(v["model"], "gpt-x");
        assert_eq!(v["stream_options"]["include_usage"], true);
        let judge = [serde_json::json!({"role": "user", "content": "judge"})];
        let mut b = UpstreamBody::new(&r.body, "m", StreamMode::Strip);
        b.temperature = Some(0.5);
        b.messages = Some(&judge);
        let v: Value = serde_json::from_slice(&b.to_bytes()).unwrap_or_default();
        assert!(v.get("stream").is_none() && v.get("stream_options").is_none());
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["messages"][0]["content"], "judge");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_chat(&data);
        }

        #[test]
        fn arbitrary_json_never_panics(s in "\\{\"model\":\"m\",\"messages\":\\[(\\{\"role\":\"(user|assistant)\",\"content\":(\"[a-z ]{0,20}\"|\\[\\]|null|1)\\},?){0,3}\\]\\}") {
            let _ = parse_chat(s.as_bytes());
        }
    }
}
