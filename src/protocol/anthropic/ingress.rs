//! Ingress: a client speaks Messages, the pipeline speaks chat completions.

use super::{derived_id, type_of, Drops, ProtocolError, Translated};
use crate::usage::estimate_tokens;
use serde_json::{json, Map, Value};

/// Top-level request fields that have no chat equivalent and are dropped
/// without changing the answer's meaning (anything not handled and not listed
/// here is dropped too, and reported the same way).
const KNOWN_DROPS: &[&str] = &[
    "top_k",
    "context_management",
    "service_tier",
    "container",
    "inference_geo",
];

/// Budgets at which an Anthropic `thinking.budget_tokens` maps to the next
/// OpenAI `reasoning_effort` step.
const BUDGET_MEDIUM: u64 = 4_096;
const BUDGET_HIGH: u64 = 16_384;

/// Anthropic Messages request → chat completions request body.
pub fn messages_to_chat(body: &Value) -> Result<Value, ProtocolError> {
    messages_to_chat_with_drops(body).map(|t| t.body)
}

/// [`messages_to_chat`] that also reports what was dropped.
pub fn messages_to_chat_with_drops(body: &Value) -> Result<Translated, ProtocolError> {
    let req = body
        .as_object()
        .ok_or_else(|| ProtocolError::new("body", "the request body must be a JSON object"))?;
    let mut drops = Drops::default();
    let mut out = Map::new();

    let model = match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(ProtocolError::new("model", "Field required: a model name")),
    };
    out.insert("model".into(), Value::String(model));

    let mut messages = Vec::new();
    if let Some(system) = req.get("system") {
        if let Some(text) = system_text(system, "system", &mut drops)? {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let turns = match req.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ProtocolError::new(
                "messages",
                "at least one message is required",
            ))
        }
        Some(_) => return Err(ProtocolError::new("messages", "must be an array")),
        None => return Err(ProtocolError::new("messages", "Field required")),
    };
    for (i, m) in turns.iter().enumerate() {
        message_to_chat(m, &format!("messages.{i}"), &mut messages, &mut drops)?;
    }
    out.insert("messages".into(), Value::Array(messages));

    match req.get("max_tokens") {
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => {
                // The current chat field; `max_tokens` is rejected by OpenAI's
                // reasoning models, which `thinking` requests are routed to.
                out.insert("max_completion_tokens".into(), json!(n));
            }
            _ => {
                return Err(ProtocolError::new(
                    "max_tokens",
                    "must be an integer greater than or equal to 1",
                ))
            }
        },
        None => return Err(ProtocolError::new("max_tokens", "Field required")),
    }

    if let Some(v) = req.get("stop_sequences") {
        let Some(arr) = v.as_array() else {
            return Err(ProtocolError::new(
                "stop_sequences",
                "must be an array of strings",
            ));
        };
        if arr.iter().any(|s| !s.is_string()) {
            return Err(ProtocolError::new(
                "stop_sequences",
                "must be an array of strings",
            ));
        }
        if !arr.is_empty() {
            out.insert("stop".into(), v.clone());
        }
    }
    for f in ["temperature", "top_p"] {
        match req.get(f) {
            None | Some(Value::Null) => {}
            Some(v) if v.is_number() => {
                out.insert(f.into(), v.clone());
            }
            Some(_) => return Err(ProtocolError::new(f, "must be a number")),
        }
    }

    match req.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            out.insert("stream".into(), Value::Bool(true));
            // Anthropic streams always end with usage; ask the chat upstream for it.
            out.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Some(_) => return Err(ProtocolError::new("stream", "must be a boolean")),
    }

    if let Some(meta) = req.get("metadata") {
        match meta {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("user_id", Value::String(u)) if !u.is_empty() => {
                            out.insert("user".into(), Value::String(u.clone()));
                        }
                        ("user_id", Value::Null | Value::String(_)) => {}
                        ("user_id", _) => {
                            return Err(ProtocolError::new("metadata.user_id", "must be a string"))
                        }
                        (other, _) => drops.add(format!("metadata.{other}")),
                    }
                }
            }
            Value::Null => {}
            _ => return Err(ProtocolError::new("metadata", "must be an object")),
        }
    }

    let has_tools = tools_to_chat(req, &mut out, &mut drops)?;
    tool_choice_to_chat(req, has_tools, &mut out, &mut drops)?;
    thinking_to_chat(req, &mut out, &mut drops)?;
    format_to_chat(req, &mut out)?;

    if let Some(servers) = req.get("mcp_servers").and_then(Value::as_array) {
        if !servers.is_empty() {
            return Err(ProtocolError::new(
                "mcp_servers",
                "MCP servers are run by Anthropic's API and cannot be used with this model's upstream",
            ));
        }
    }

    const HANDLED: &[&str] = &[
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "temperature",
        "top_p",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "output_format",
        "mcp_servers",
    ];
    Ok(drops.finish(req, HANDLED, KNOWN_DROPS, out))
}

/// `system` as a string or text blocks → one system string (None when empty).
fn system_text(v: &Value, path: &str, drops: &mut Drops) -> Result<Option<String>, ProtocolError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok((!s.is_empty()).then(|| s.clone())),
        Value::Array(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                let p = format!("{path}.{j}");
                if type_of(b) != Some("text") {
                    return Err(ProtocolError::new(
                        p,
                        "system blocks must be of type `text`",
                    ));
                }
                note_block_drops(b, &p, drops);
                match b.get("text").and_then(Value::as_str) {
                    Some(t) => parts.push(t),
                    None => return Err(ProtocolError::new(format!("{p}.text"), "Field required")),
                }
            }
            let joined = parts.join("\n\n");
            Ok((!joined.is_empty()).then_some(joined))
        }
        _ => Err(ProtocolError::new(
            path,
            "must be a string or an array of text blocks",
        )),
    }
}

/// Block-level fields with no chat counterpart.
fn note_block_drops(b: &Value, path: &str, drops: &mut Drops) {
    if let Some(o) = b.as_object() {
        for k in ["cache_control", "citations"] {
            if o.get(k).is_some_and(|v| !v.is_null()) {
                drops.add(format!("{}.{k}", generic_path(path)));
            }
        }
    }
}

/// `messages.3.content.1` → `messages.*.content.*`, so a drop is listed once
/// per kind rather than once per block.
fn generic_path(path: &str) -> String {
    path.split('.')
        .map(|s| {
            if s.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn message_to_chat(
    m: &Value,
    path: &str,
    out: &mut Vec<Value>,
    drops: &mut Drops,
) -> Result<(), ProtocolError> {
    let Some(obj) = m.as_object() else {
        return Err(ProtocolError::new(path, "each message must be an object"));
    };
    let role = obj.get("role").and_then(Value::as_str).unwrap_or("");
    for k in obj.keys() {
        if !matches!(k.as_str(), "role" | "content") {
            drops.add(format!("{}.{k}", generic_path(path)));
        }
    }
    let content = obj
        .get("content")
        .ok_or_else(|| ProtocolError::new(format!("{path}.content"), "Field required"))?;
    let cpath = format!("{path}.content");
    match role {
        "user" => user_to_chat(content, &cpath, out, drops),
        "assistant" => assistant_to_chat(content, &cpath, out, drops),
        // Claude Code sends mid-conversation system turns (a beta); chat
        // completions accepts system messages anywhere.
        "system" => {
            if let Some(t) = system_text(content, &cpath, drops)? {
                out.push(json!({"role": "system", "content": t}));
            }
            Ok(())
        }
        _ => Err(ProtocolError::new(
            format!("{path}.role"),
            "must be `user` or `assistant`",
        )),
    }
}

fn user_to_chat(
    content: &Value,
    path: &str,
    out: &mut Vec<Value>,
    drops: &mut Drops,
) -> Result<(), ProtocolError> {
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(b) => b,
        _ => {
            return Err(ProtocolError::new(
                path,
                "must be a string or an array of content blocks",
            ))
        }
    };
    // Tool results must directly follow the assistant's tool calls in chat,
    // so they go first, each as its own `tool` message; the rest of the turn
    // follows as one user message.
    let mut parts: Vec<Value> = Vec::new();
    let mut trailing_images: Vec<Value> = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let p = format!("{path}.{j}");
        note_block_drops(b, &p, drops);
        match type_of(b) {
            Some("text") => parts.push(text_part(b, &p)?),
            Some("image") => parts.push(image_part(b, &p)?),
            Some("document") => parts.push(document_part(b, &p)?),
            Some("tool_result") => {
                let (msg, images) = tool_result_to_chat(b, &p, drops)?;
                out.push(msg);
                trailing_images.extend(images);
            }
            Some("thinking") | Some("redacted_thinking") => drops.add(generic_path(&p)),
            Some(t) => {
                return Err(ProtocolError::new(
                    format!("{p}.type"),
                    format!("content blocks of type `{t}` cannot be sent to this model's upstream"),
                ))
            }
            None => return Err(ProtocolError::new(format!("{p}.type"), "Field required")),
        }
    }
    // Images returned by tools have no place in a chat `tool` message; they
    // follow as user content so the model still sees them.
    trailing_images.extend(parts);
    if !trailing_images.is_empty() {
        out.push(json!({"role": "user", "content": collapse_parts(trailing_images)}));
    }
    Ok(())
}

/// A lone text part becomes a plain string (what every chat upstream accepts).
fn collapse_parts(parts: Vec<Value>) -> Value {
    if parts.len() == 1 && type_of(&parts[0]) == Some("text") {
        if let Some(t) = parts[0].get("text") {
            return t.clone();
        }
    }
    Value::Array(parts)
}

fn text_part(b: &Value, path: &str) -> Result<Value, ProtocolError> {
    match b.get("text").and_then(Value::as_str) {
        Some(t) => Ok(json!({"type": "text", "text": t})),
        None => Err(ProtocolError::new(
            format!("{path}.text"),
            "Field required: a string",
        )),
    }
}

fn image_part(b: &Value, path: &str) -> Result<Value, ProtocolError> {
    let src = b
        .get("source")
        .ok_or_else(|| ProtocolError::new(format!("{path}.source"), "Field required"))?;
    let url = match type_of(src) {
        Some("base64") => {
            let media = src
                .get("media_type")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ProtocolError::new(format!("{path}.source.media_type"), "Field required")
                })?;
            let data = src.get("data").and_then(Value::as_str).ok_or_else(|| {
                ProtocolError::new(format!("{path}.source.data"), "Field required")
            })?;
            format!("data:{media};base64,{data}")
        }
        Some("url") => src
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| ProtocolError::new(format!("{path}.source.url"), "Field required"))?
            .to_string(),
        _ => {
            return Err(ProtocolError::new(
                format!("{path}.source.type"),
                "only `base64` and `url` image sources can be sent to this model's upstream",
            ))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// Plain-text documents become text; PDFs and file references cannot be
/// carried by chat completions, and dropping them would answer a different
/// question, so they are refused.
fn document_part(b: &Value, path: &str) -> Result<Value, ProtocolError> {
    let src = b.get("source");
    match src.and_then(type_of) {
        Some("text") => {
            let data = src
                .and_then(|s| s.get("data"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ProtocolError::new(format!("{path}.source.data"), "Field required")
                })?;
            let text = match b.get("title").and_then(Value::as_str) {
                Some(t) if !t.is_empty() => format!("{t}\n\n{data}"),
                _ => data.to_string(),
            };
            Ok(json!({"type": "text", "text": text}))
        }
        _ => Err(ProtocolError::new(
            path,
            "only plain-text documents (`source.type: \"text\"`) can be sent to this model's upstream",
        )),
    }
}

/// A `tool_result` block → a chat `tool` message, plus any images it held.
fn tool_result_to_chat(
    b: &Value,
    path: &str,
    drops: &mut Drops,
) -> Result<(Value, Vec<Value>), ProtocolError> {
    let id = b
        .get("tool_use_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ProtocolError::new(format!("{path}.tool_use_id"), "Field required"))?;
    let mut images = Vec::new();
    let mut text = String::new();
    match b.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(blocks)) => {
            for (k, c) in blocks.iter().enumerate() {
                let p = format!("{path}.content.{k}");
                note_block_drops(c, &p, drops);
                let piece = match type_of(c) {
                    Some("text") => c.get("text").and_then(Value::as_str).map(str::to_string),
                    Some("image") => {
                        images.push(image_part(c, &p)?);
                        None
                    }
                    Some("document") => document_part(c, &p)?
                        .get("text")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    // Other blocks (e.g. `tool_reference`, search results)
                    // reach the model as their JSON rather than vanish.
                    _ => Some(c.to_string()),
                };
                if let Some(piece) = piece {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&piece);
                }
            }
        }
        Some(_) => {
            return Err(ProtocolError::new(
                format!("{path}.content"),
                "must be a string or an array of content blocks",
            ))
        }
    }
    // Chat has no error flag on tool results; the model is told in the text.
    if b.get("is_error").and_then(Value::as_bool) == Some(true) {
        text.insert_str(0, "[tool error] ");
    }
    Ok((
        json!({"role": "tool", "tool_call_id": id, "content": text}),
        images,
    ))
}

fn assistant_to_chat(
    content: &Value,
    path: &str,
    out: &mut Vec<Value>,
    drops: &mut Drops,
) -> Result<(), ProtocolError> {
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": "assistant", "content": s}));
            return Ok(());
        }
        Value::Array(b) => b,
        _ => {
            return Err(ProtocolError::new(
                path,
                "must be a string or an array of content blocks",
            ))
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let p = format!("{path}.{j}");
        note_block_drops(b, &p, drops);
        match type_of(b) {
            Some("text") => {
                if let Some(t) = b.get("text").and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
            Some("tool_use") => {
                let id = b
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ProtocolError::new(format!("{p}.id"), "Field required"))?;
                let name = b
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ProtocolError::new(format!("{p}.name"), "Field required"))?;
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": input.to_string()},
                }));
            }
            // Thinking is signed by Anthropic and meaningless to another model.
            Some("thinking") | Some("redacted_thinking") => drops.add(generic_path(&p)),
            Some(t) => {
                return Err(ProtocolError::new(
                    format!("{p}.type"),
                    format!("content blocks of type `{t}` cannot be sent to this model's upstream"),
                ))
            }
            None => return Err(ProtocolError::new(format!("{p}.type"), "Field required")),
        }
    }
    let mut msg = Map::new();
    msg.insert("role".into(), json!("assistant"));
    msg.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        },
    );
    if !calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(calls));
    }
    out.push(Value::Object(msg));
    Ok(())
}

/// Anthropic tools → chat function tools. Server tools (web search, code
/// execution, computer use, …) run inside Anthropic's API; a chat upstream
/// would only see a function it cannot call, so they are refused by name.
fn tools_to_chat(
    req: &Map<String, Value>,
    out: &mut Map<String, Value>,
    drops: &mut Drops,
) -> Result<bool, ProtocolError> {
    let tools = match req.get("tools") {
        None | Some(Value::Null) => return Ok(false),
        Some(Value::Array(t)) => t,
        Some(_) => return Err(ProtocolError::new("tools", "must be an array")),
    };
    let mut chat_tools = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools.{i}");
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ProtocolError::new(format!("{p}.name"), "Field required"))?;
        match type_of(t) {
            None | Some("custom") => {}
            Some(kind) => {
                return Err(ProtocolError::new(
                    format!("{p}.type"),
                    format!(
                        "tool `{name}` is an Anthropic server tool (`{kind}`) and cannot run on this model's upstream"
                    ),
                ))
            }
        }
        let schema = match t.get("input_schema") {
            Some(s @ Value::Object(_)) => s.clone(),
            _ => {
                return Err(ProtocolError::new(
                    format!("{p}.input_schema"),
                    "Field required: a JSON schema object",
                ))
            }
        };
        if let Some(o) = t.as_object() {
            for k in o.keys() {
                if !matches!(k.as_str(), "name" | "description" | "input_schema" | "type") {
                    drops.add(format!("tools.*.{k}"));
                }
            }
        }
        let mut f = Map::new();
        f.insert("name".into(), json!(name));
        if let Some(d) = t.get("description").and_then(Value::as_str) {
            f.insert("description".into(), json!(d));
        }
        f.insert("parameters".into(), schema);
        chat_tools.push(json!({"type": "function", "function": f}));
    }
    let any = !chat_tools.is_empty();
    if any {
        out.insert("tools".into(), Value::Array(chat_tools));
    }
    Ok(any)
}

fn tool_choice_to_chat(
    req: &Map<String, Value>,
    has_tools: bool,
    out: &mut Map<String, Value>,
    drops: &mut Drops,
) -> Result<(), ProtocolError> {
    let Some(tc) = req.get("tool_choice").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let choice = match type_of(tc) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = tc.get("name").and_then(Value::as_str).ok_or_else(|| {
                ProtocolError::new("tool_choice.name", "Field required for `type: tool`")
            })?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(ProtocolError::new(
                "tool_choice.type",
                "must be one of `auto`, `any`, `tool`, `none`",
            ))
        }
    };
    // Chat upstreams reject tool_choice without tools.
    if !has_tools {
        drops.add("tool_choice");
        return Ok(());
    }
    out.insert("tool_choice".into(), choice);
    if tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
        out.insert("parallel_tool_calls".into(), Value::Bool(false));
    }
    Ok(())
}

/// `thinking` (+ `output_config.effort`) → `reasoning_effort`.
fn thinking_to_chat(
    req: &Map<String, Value>,
    out: &mut Map<String, Value>,
    drops: &mut Drops,
) -> Result<(), ProtocolError> {
    let effort = req.get("output_config").and_then(|o| o.get("effort"));
    if let Some(oc) = req.get("output_config").and_then(Value::as_object) {
        for k in oc.keys() {
            if k != "effort" && k != "format" {
                drops.add(format!("output_config.{k}"));
            }
        }
    }
    let thinking = req.get("thinking").filter(|v| !v.is_null());
    let level = match thinking.map(|t| (type_of(t), t)) {
        None => {
            if effort.is_some() {
                drops.add("output_config.effort");
            }
            None
        }
        Some((Some("disabled"), _)) => None,
        Some((Some("enabled"), t)) => {
            let budget = t
                .get("budget_tokens")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    ProtocolError::new("thinking.budget_tokens", "Field required: an integer")
                })?;
            Some(if budget < BUDGET_MEDIUM {
                "low"
            } else if budget < BUDGET_HIGH {
                "medium"
            } else {
                "high"
            })
        }
        // Adaptive thinking lets the model decide; only an explicit effort
        // says how much, otherwise the upstream's default applies.
        Some((Some("adaptive"), _)) => match effort.and_then(Value::as_str) {
            None => None,
            Some("low") => Some("low"),
            Some("medium") => Some("medium"),
            Some("high") => Some("high"),
            // Chat's scale tops out at `high` on most upstreams.
            Some("max") | Some("xhigh") => Some("high"),
            Some(_) => {
                return Err(ProtocolError::new(
                    "output_config.effort",
                    "must be one of `low`, `medium`, `high`, `max`",
                ))
            }
        },
        Some(_) => {
            return Err(ProtocolError::new(
                "thinking.type",
                "must be one of `enabled`, `adaptive`, `disabled`",
            ))
        }
    };
    if let Some(t) = thinking.and_then(Value::as_object) {
        for k in t.keys() {
            if !matches!(k.as_str(), "type" | "budget_tokens") {
                drops.add(format!("thinking.{k}"));
            }
        }
    }
    if let Some(l) = level {
        out.insert("reasoning_effort".into(), json!(l));
    }
    Ok(())
}

/// Structured output (`output_config.format`, or the older beta's top-level
/// `output_format`) → `response_format: json_schema`. Dropping it would
/// return prose to a client that parses JSON.
fn format_to_chat(
    req: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<(), ProtocolError> {
    let (path, format) = match (
        req.get("output_config").and_then(|o| o.get("format")),
        req.get("output_format"),
    ) {
        (Some(f), _) if !f.is_null() => ("output_config.format", f),
        (_, Some(f)) if !f.is_null() => ("output_format", f),
        _ => return Ok(()),
    };
    match type_of(format) {
        Some("json_schema") => {
            let schema = format
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    ProtocolError::new(
                        format!("{path}.schema"),
                        "Field required: a JSON schema object",
                    )
                })?;
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}}),
            );
            Ok(())
        }
        _ => Err(ProtocolError::new(
            format!("{path}.type"),
            "must be `json_schema`",
        )),
    }
}

/// Chat completion → Anthropic Message, named with the model the client asked for.
pub fn chat_to_messages_response(chat: &Value, requested_model: &str) -> Value {
    let choice = chat
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first());
    let msg = choice.and_then(|c| c.get("message"));
    let mut content = Vec::new();
    let mut refused = false;
    if let Some(t) = msg.and_then(|m| m.get("content")).and_then(Value::as_str) {
        if !t.is_empty() {
            content.push(json!({"type": "text", "text": t}));
        }
    }
    if let Some(r) = msg.and_then(|m| m.get("refusal")).and_then(Value::as_str) {
        if !r.is_empty() {
            refused = true;
            content.push(json!({"type": "text", "text": r}));
        }
    }
    let calls = msg
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for c in calls {
        let id = c.get("id").and_then(Value::as_str).unwrap_or("");
        let id = if id.is_empty() {
            super::new_id("toolu_")
        } else {
            id.to_string()
        };
        let f = c.get("function");
        let name = f
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let args = f
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("");
        content.push(
            json!({"type": "tool_use", "id": id, "name": name, "input": parse_arguments(args)}),
        );
    }
    let finish = choice
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str);
    let matched_stop = choice
        .and_then(|c| c.get("stop_reason"))
        .and_then(Value::as_str);
    let (stop_reason, stop_sequence) =
        stop_reason(finish, matched_stop, !calls.is_empty(), refused);
    let usage = chat.get("usage").map(messages_usage).unwrap_or_else(|| {
        json!({"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    });
    json!({
        "id": derived_id("msg_", chat.get("id").and_then(Value::as_str), &["chatcmpl-", "chatcmpl_"]),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    })
}

/// Tool-call arguments as the `input` object Anthropic requires. Arguments
/// that are not a JSON object (a truncated answer, a model's mistake) are
/// kept verbatim under `_raw_arguments` rather than replaced by `{}`.
pub(super) fn parse_arguments(args: &str) -> Value {
    if args.trim().is_empty() {
        return json!({});
    }
    match serde_json::from_str::<Value>(args) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"_raw_arguments": args}),
    }
}

/// Chat `finish_reason` → Anthropic `(stop_reason, stop_sequence)`. Chat
/// does not say which stop sequence matched; vLLM-style upstreams do, in
/// `choices[].stop_reason`, and then it is reported.
pub(super) fn stop_reason(
    finish: Option<&str>,
    matched_stop: Option<&str>,
    has_tool_calls: bool,
    refused: bool,
) -> (Value, Value) {
    if refused {
        return (json!("refusal"), Value::Null);
    }
    match finish {
        Some("length") => (json!("max_tokens"), Value::Null),
        Some("tool_calls") | Some("function_call") => (json!("tool_use"), Value::Null),
        Some("content_filter") => (json!("refusal"), Value::Null),
        _ if has_tool_calls => (json!("tool_use"), Value::Null),
        Some("stop") if matched_stop.is_some() => (json!("stop_sequence"), json!(matched_stop)),
        _ => (json!("end_turn"), Value::Null),
    }
}

/// OpenAI usage → Anthropic usage. OpenAI's `prompt_tokens` includes cached
/// tokens; Anthropic's `input_tokens` does not, so the cached part moves to
/// `cache_read_input_tokens` and is counted once.
pub(super) fn messages_usage(u: &Value) -> Value {
    let prompt = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let cached = u
        .pointer("/prompt_tokens_details/cached_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(prompt);
    let output = u
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    json!({
        "input_tokens": prompt - cached,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    })
}

/// Input-token estimate for `/v1/messages/count_tokens`, on the same basis
/// as the chat path's prompt estimate (four tokens of framing per message, a
/// high-detail tile budget per image, the byte estimate for text and JSON).
pub fn count_tokens(body: &Value) -> Result<u64, ProtocolError> {
    let req = body
        .as_object()
        .ok_or_else(|| ProtocolError::new("body", "the request body must be a JSON object"))?;
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ProtocolError::new("messages", "Field required"))?;
    let mut n: u64 = 3;
    if let Some(s) = req.get("system") {
        n += 4 + content_tokens(s);
    }
    for m in messages {
        n += 4 + m.get("content").map(content_tokens).unwrap_or(0);
    }
    if let Some(Value::Array(tools)) = req.get("tools") {
        n += tools
            .iter()
            .map(|t| estimate_tokens(&t.to_string()))
            .sum::<u64>();
    }
    Ok(n)
}

fn content_tokens(c: &Value) -> u64 {
    match c {
        Value::String(s) => estimate_tokens(s),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match type_of(b) {
                Some("text") => b
                    .get("text")
                    .and_then(Value::as_str)
                    .map(estimate_tokens)
                    .unwrap_or(0),
                Some("image") => 765,
                Some("tool_result") => b.get("content").map(content_tokens).unwrap_or(0),
                Some("tool_use") => {
                    estimate_tokens(&b.get("input").map(Value::to_string).unwrap_or_default())
                }
                _ => estimate_tokens(&b.to_string()),
            })
            .sum(),
        _ => 0,
    }
}

/// The session a request belongs to, from the body. Claude Code puts a JSON
/// string `{"device_id","account_uuid","session_id"}` in `metadata.user_id`;
/// older versions used `user_<hash>_account_<uuid>_session_<uuid>`. (The
/// `X-Claude-Code-Session-Id` header, when present, is the server's to read.)
pub fn session_id(body: &Value) -> Option<String> {
    let uid = body.pointer("/metadata/user_id")?.as_str()?;
    if uid.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(uid).ok()?;
        return v
            .get("session_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
    }
    uid.rsplit_once("_session_")
        .map(|(_, s)| s)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The newest text a human wrote: the latest user turn that has any, its
/// text blocks joined, without tool results or the client's
/// `<system-reminder>` blocks (Claude Code injects those into user turns).
pub fn newest_human_text(body: &Value) -> Option<String> {
    let messages = body.get("messages")?.as_array()?;
    for m in messages.iter().rev() {
        if m.get("role").and_then(Value::as_str) != Some("user") {
            continue;
        }
        let text = match m.get("content") {
            Some(Value::String(s)) if !is_reminder(s) => s.clone(),
            Some(Value::Array(blocks)) => blocks
                .iter()
                .filter(|b| type_of(b) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .filter(|t| !is_reminder(t))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        if !text.trim().is_empty() {
            return Some(text);
        }
    }
    None
}

fn is_reminder(t: &str) -> bool {
    t.trim_start().starts_with("<system-reminder>")
}

#[cfg(test)]
#[path = "ingress_tests.rs"]
mod tests;
