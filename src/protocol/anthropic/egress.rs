//! Egress: the pipeline speaks chat completions, the upstream speaks Messages.

use super::{derived_id, now_secs, type_of, Drops, ProtocolError, Translated};
use crate::usage::Usage;
use serde_json::{json, Map, Value};

/// `max_tokens` is required by Messages and optional in chat; this is used
/// when the chat request has no cap. The gateway should set the deployment's
/// `max_output_tokens` on the chat body first so this rarely applies.
pub const DEFAULT_MAX_TOKENS: u64 = 4_096;

/// Anthropic's smallest thinking budget.
const MIN_THINKING_BUDGET: u64 = 1_024;

/// Chat fields with no Messages counterpart (dropped and reported).
const KNOWN_DROPS: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "service_tier",
    "store",
    "metadata",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
    "stream_options",
];

const JSON_OBJECT_INSTRUCTION: &str =
    "Respond with a single valid JSON object and nothing else: no prose, no code fences.";

/// Chat completions request → Anthropic Messages request for `upstream_model`.
pub fn chat_to_messages_request(
    chat: &Value,
    upstream_model: &str,
) -> Result<Value, ProtocolError> {
    chat_to_messages_request_with_drops(chat, upstream_model).map(|t| t.body)
}

/// [`chat_to_messages_request`] that also reports what was dropped.
pub fn chat_to_messages_request_with_drops(
    chat: &Value,
    upstream_model: &str,
) -> Result<Translated, ProtocolError> {
    let req = chat
        .as_object()
        .ok_or_else(|| ProtocolError::new("body", "the request body must be a JSON object"))?;
    let mut drops = Drops::default();
    let mut out = Map::new();
    out.insert("model".into(), json!(upstream_model));

    if let Some(n) = req.get("n").and_then(Value::as_u64) {
        if n > 1 {
            return Err(ProtocolError::new(
                "n",
                "this model's upstream (Anthropic Messages) returns one choice; `n` must be 1",
            ));
        }
    }
    if req.get("functions").is_some() || req.get("function_call").is_some() {
        return Err(ProtocolError::new(
            "functions",
            "`functions` is deprecated and not supported for this model's upstream; use `tools`",
        ));
    }

    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ProtocolError::new("messages", "you must provide a messages array"))?;
    let (mut system, turns) = convert_messages(messages, &mut drops)?;

    match req.get("response_format").and_then(type_of) {
        None | Some("text") => {}
        Some("json_object") => system.push(JSON_OBJECT_INSTRUCTION.to_string()),
        Some("json_schema") => {
            let schema = req
                .get("response_format")
                .and_then(|r| r.pointer("/json_schema/schema"))
                .cloned()
                .unwrap_or_else(|| json!({}));
            system.push(format!(
                "{JSON_OBJECT_INSTRUCTION} The object must validate against this JSON schema:\n{schema}"
            ));
        }
        Some(_) => {
            return Err(ProtocolError::new(
                "response_format.type",
                "must be one of `text`, `json_object`, `json_schema`",
            ))
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    out.insert("messages".into(), Value::Array(turns));

    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|f| req.get(*f).and_then(Value::as_u64))
        .unwrap_or(DEFAULT_MAX_TOKENS)
        .max(1);
    out.insert("max_tokens".into(), json!(max_tokens));

    match req.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            if !a.is_empty() {
                out.insert("stop_sequences".into(), Value::Array(a.clone()));
            }
        }
        Some(_) => {
            return Err(ProtocolError::new(
                "stop",
                "must be a string or an array of strings",
            ))
        }
    }

    // Anthropic's range is 0–1, OpenAI's 0–2.
    if let Some(t) = req.get("temperature").and_then(Value::as_f64) {
        out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = req.get("top_p").and_then(Value::as_f64) {
        // Recent Claude models refuse both at once; temperature is the one
        // clients usually mean.
        if out.contains_key("temperature") {
            drops.add("top_p");
        } else {
            out.insert("top_p".into(), json!(p));
        }
    }
    if let Some(k) = req.get("top_k").and_then(Value::as_u64) {
        out.insert("top_k".into(), json!(k));
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
    }
    if let Some(u) = req.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": u}));
    }

    let has_tools = tools_to_messages(req, &mut out, &mut drops)?;
    tool_choice_to_messages(req, has_tools, &mut out)?;
    reasoning_to_thinking(req, max_tokens, &mut out, &mut drops)?;

    const HANDLED: &[&str] = &[
        "model",
        "messages",
        "n",
        "response_format",
        "max_completion_tokens",
        "max_tokens",
        "stop",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
    ];
    Ok(drops.finish(req, HANDLED, KNOWN_DROPS, out))
}

/// Chat messages → (system texts, Messages turns). System and developer
/// messages are hoisted into `system` wherever they appear; consecutive
/// turns of one role (tool results followed by user text, for instance) are
/// merged, since Messages alternates user and assistant.
fn convert_messages(
    messages: &[Value],
    drops: &mut Drops,
) -> Result<(Vec<String>, Vec<Value>), ProtocolError> {
    let mut system = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if m.get("name").is_some() {
            drops.add("messages[].name");
        }
        let (role, blocks) = match role {
            "system" | "developer" => {
                let t = chat_text(m.get("content"), &format!("{path}.content"))?;
                if !t.is_empty() {
                    system.push(t);
                }
                continue;
            }
            "user" => (
                "user",
                user_blocks(m.get("content"), &format!("{path}.content"), drops)?,
            ),
            "assistant" => ("assistant", assistant_blocks(m, &path, drops)?),
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ProtocolError::new(
                            format!("{path}.tool_call_id"),
                            "required for tool messages",
                        )
                    })?;
                let content = chat_text(m.get("content"), &format!("{path}.content"))?;
                (
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": content})],
                )
            }
            other => {
                return Err(ProtocolError::new(
                    format!("{path}.role"),
                    format!("role `{other}` is not supported for this model's upstream"),
                ))
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((r, b)) if r == role => {
                // Tool results must lead a user turn.
                if role == "user" && blocks.iter().any(|x| type_of(x) == Some("tool_result")) {
                    let rest = std::mem::take(b);
                    let (mut results, others): (Vec<_>, Vec<_>) = rest
                        .into_iter()
                        .partition(|x| type_of(x) == Some("tool_result"));
                    results.extend(blocks);
                    results.extend(others);
                    *b = results;
                } else {
                    b.extend(blocks);
                }
            }
            _ => turns.push((role.to_string(), blocks)),
        }
    }
    let turns = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, turns))
}

/// Text of a chat content (string or text parts).
fn chat_text(c: Option<&Value>, path: &str) -> Result<String, ProtocolError> {
    match c {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (type_of(p), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => {
                        if !s.is_empty() {
                            s.push('\n');
                        }
                        s.push_str(t);
                    }
                    _ => {
                        return Err(ProtocolError::new(
                            format!("{path}[{j}]"),
                            "only text parts are supported here",
                        ))
                    }
                }
            }
            Ok(s)
        }
        Some(_) => Err(ProtocolError::new(path, "must be a string or an array")),
    }
}

fn user_blocks(
    c: Option<&Value>,
    path: &str,
    drops: &mut Drops,
) -> Result<Vec<Value>, ProtocolError> {
    match c {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![json!({"type": "text", "text": s})]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let pp = format!("{path}[{j}]");
                match type_of(p) {
                    Some("text") => Ok(json!({"type": "text", "text": p.get("text").and_then(Value::as_str).unwrap_or("")})),
                    Some("image_url") => {
                        if p.pointer("/image_url/detail").is_some() {
                            drops.add("messages[].content[].image_url.detail");
                        }
                        image_block(p, &pp)
                    }
                    Some(t) => Err(ProtocolError::new(
                        format!("{pp}.type"),
                        format!("content parts of type `{t}` cannot be sent to this model's upstream"),
                    )),
                    None => Err(ProtocolError::new(format!("{pp}.type"), "required")),
                }
            })
            .collect(),
        Some(_) => Err(ProtocolError::new(path, "must be a string or an array")),
    }
}

/// `image_url` part → Anthropic image block (data URLs become base64 sources).
fn image_block(p: &Value, path: &str) -> Result<Value, ProtocolError> {
    let url = p
        .pointer("/image_url/url")
        .and_then(Value::as_str)
        .ok_or_else(|| ProtocolError::new(format!("{path}.image_url.url"), "required"))?;
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(ProtocolError::new(
                format!("{path}.image_url.url"),
                "malformed data URL",
            ));
        };
        let Some(media) = meta.strip_suffix(";base64") else {
            return Err(ProtocolError::new(
                format!("{path}.image_url.url"),
                "data URLs must be base64-encoded",
            ));
        };
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}),
        );
    }
    Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
}

fn assistant_blocks(m: &Value, path: &str, drops: &mut Drops) -> Result<Vec<Value>, ProtocolError> {
    let mut blocks = Vec::new();
    let text = chat_text(m.get("content"), &format!("{path}.content"))?;
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    if m.get("reasoning_content").is_some_and(|r| !r.is_null()) {
        // Unsigned reasoning cannot be replayed as an Anthropic thinking block.
        drops.add("messages[].reasoning_content");
    }
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        for (k, c) in calls.iter().enumerate() {
            let p = format!("{path}.tool_calls[{k}]");
            let id = c
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| ProtocolError::new(format!("{p}.id"), "required"))?;
            let name = c
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| ProtocolError::new(format!("{p}.function.name"), "required"))?;
            let args = c
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("");
            let input = if args.trim().is_empty() {
                json!({})
            } else {
                match serde_json::from_str::<Value>(args) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        return Err(ProtocolError::new(
                            format!("{p}.function.arguments"),
                            "must be a JSON object for this model's upstream",
                        ))
                    }
                }
            };
            blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
        }
    }
    Ok(blocks)
}

fn tools_to_messages(
    req: &Map<String, Value>,
    out: &mut Map<String, Value>,
    drops: &mut Drops,
) -> Result<bool, ProtocolError> {
    let Some(tools) = req.get("tools").and_then(Value::as_array) else {
        return Ok(false);
    };
    let mut list = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if type_of(t) != Some("function") {
            return Err(ProtocolError::new(
                format!("tools[{i}].type"),
                "only `function` tools can be sent to this model's upstream",
            ));
        }
        let f = t.get("function");
        let name = f
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| ProtocolError::new(format!("tools[{i}].function.name"), "required"))?;
        if f.and_then(|f| f.get("strict")).is_some() {
            drops.add("tools[].function.strict");
        }
        let mut tool = Map::new();
        tool.insert("name".into(), json!(name));
        if let Some(d) = f.and_then(|f| f.get("description")).and_then(Value::as_str) {
            tool.insert("description".into(), json!(d));
        }
        let schema = f
            .and_then(|f| f.get("parameters"))
            .filter(|p| p.is_object())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        tool.insert("input_schema".into(), schema);
        list.push(Value::Object(tool));
    }
    let any = !list.is_empty();
    if any {
        out.insert("tools".into(), Value::Array(list));
    }
    Ok(any)
}

fn tool_choice_to_messages(
    req: &Map<String, Value>,
    has_tools: bool,
    out: &mut Map<String, Value>,
) -> Result<(), ProtocolError> {
    if !has_tools {
        return Ok(());
    }
    let mut choice = match req.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            _ => {
                return Err(ProtocolError::new(
                    "tool_choice",
                    "must be `auto`, `required`, `none` or a named function",
                ))
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Some(json!({"type": "tool", "name": name})),
            None => return Err(ProtocolError::new("tool_choice.function.name", "required")),
        },
    };
    if req.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false) {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if let Some(o) = c.as_object_mut() {
            if o.get("type").and_then(Value::as_str) != Some("none") {
                o.insert("disable_parallel_tool_use".into(), Value::Bool(true));
            }
        }
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(())
}

/// `reasoning_effort` → an extended-thinking budget. Anthropic's rules for
/// thinking are applied here rather than left to fail upstream: the budget is
/// at least 1,024 and below `max_tokens`, temperature must be 1 (or unset),
/// top_p at least 0.95, and tool use cannot be forced.
fn reasoning_to_thinking(
    req: &Map<String, Value>,
    max_tokens: u64,
    out: &mut Map<String, Value>,
    drops: &mut Drops,
) -> Result<(), ProtocolError> {
    let budget = match req.get("reasoning_effort") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::String(e)) => match e.as_str() {
            "none" => return Ok(()),
            "minimal" | "low" => 1_024,
            "medium" => 4_096,
            "high" => 16_384,
            "xhigh" => 32_768,
            _ => {
                return Err(ProtocolError::new(
                    "reasoning_effort",
                    "must be one of `none`, `minimal`, `low`, `medium`, `high`, `xhigh`",
                ))
            }
        },
        Some(_) => return Err(ProtocolError::new("reasoning_effort", "must be a string")),
    };
    let budget = budget.min(max_tokens.saturating_sub(1));
    let forced = out
        .get("tool_choice")
        .and_then(type_of)
        .is_some_and(|t| t == "any" || t == "tool");
    if budget < MIN_THINKING_BUDGET || forced {
        drops.add("reasoning_effort");
        return Ok(());
    }
    out.insert(
        "thinking".into(),
        json!({"type": "enabled", "budget_tokens": budget}),
    );
    if out
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t != 1.0)
    {
        out.remove("temperature");
        drops.add("temperature");
    }
    if out
        .get("top_p")
        .and_then(Value::as_f64)
        .is_some_and(|p| p < 0.95)
    {
        out.remove("top_p");
        drops.add("top_p");
    }
    if out.remove("top_k").is_some() {
        drops.add("top_k");
    }
    Ok(())
}

/// Anthropic Message → chat completion.
pub fn messages_response_to_chat(resp: &Value) -> Value {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    if let Some(blocks) = resp.get("content").and_then(Value::as_array) {
        for b in blocks {
            match type_of(b) {
                Some("text") => {
                    if let Some(t) = b.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
                Some("thinking") => {
                    if let Some(t) = b.get("thinking").and_then(Value::as_str) {
                        reasoning.push_str(t);
                    }
                }
                Some("tool_use") => {
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(json!({
                        "id": b.get("id").and_then(Value::as_str).unwrap_or(""),
                        "type": "function",
                        "function": {
                            "name": b.get("name").and_then(Value::as_str).unwrap_or(""),
                            "arguments": input.to_string(),
                        },
                    }));
                }
                _ => {}
            }
        }
    }
    let stop = resp.get("stop_reason").and_then(Value::as_str);
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            json!(text)
        },
    );
    message.insert("refusal".into(), Value::Null);
    if !reasoning.is_empty() {
        message.insert("reasoning_content".into(), json!(reasoning));
    }
    if !calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    let usage = resp
        .get("usage")
        .and_then(usage_from_messages)
        .unwrap_or_default();
    json!({
        "id": derived_id("chatcmpl-", resp.get("id").and_then(Value::as_str), &["msg_"]),
        "object": "chat.completion",
        "created": now_secs(),
        "model": resp.get("model").and_then(Value::as_str).unwrap_or(""),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(stop),
        }],
        "usage": usage.to_json(),
    })
}

/// Anthropic `stop_reason` → chat `finish_reason`.
pub(super) fn finish_reason(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens") | Some("model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Anthropic usage → [`Usage`], each token class once. Anthropic's
/// `input_tokens` excludes cache reads and writes, while `prompt_tokens`
/// (like OpenAI's) includes them: prompt = input + cache read + cache write,
/// of which `cached_tokens` were read and `cache_write_tokens` written.
pub fn usage_from_messages(u: &Value) -> Option<Usage> {
    let field = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let input = u.get("input_tokens")?.as_u64()?;
    let read = field("cache_read_input_tokens");
    let write = field("cache_creation_input_tokens");
    Some(Usage {
        prompt_tokens: input + read + write,
        completion_tokens: field("output_tokens"),
        cached_tokens: read,
        cache_write_tokens: write,
        estimated: false,
    })
}

#[cfg(test)]
#[path = "egress_tests.rs"]
mod tests;
