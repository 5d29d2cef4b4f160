//! Responses request → chat-completions request, and the facts the answer needs echoed back.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{new_id, ProtocolError};

/// Whether a chat tool stands for a Responses function tool or a custom (free-form) tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    Function,
    Custom,
}

/// The Responses tool a chat tool name stands for, so a chat tool call can be answered as the
/// item the client expects (`function_call` or `custom_tool_call`, with its `namespace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOrigin {
    pub kind: ToolKind,
    pub namespace: Option<String>,
    pub name: String,
}

/// One Responses tool definition flattened to a chat function.
#[derive(Debug, Clone)]
struct ToolDef {
    origin: ToolOrigin,
    chat_name: String,
    chat_tool: Value,
}

/// Built-in tools run by OpenAI itself; a chat upstream has nothing to run them with.
const HOSTED_TOOL_CHOICES: &[&str] = &[
    "web_search",
    "web_search_preview",
    "file_search",
    "computer_use_preview",
    "computer",
    "code_interpreter",
    "image_generation",
    "mcp",
    "local_shell",
    "shell",
    "apply_patch",
];

/// Builds the value the real API reports for a field the request left out.
type EchoDefault = fn() -> Value;

/// Request fields the Response object echoes, with the values the real API reports when absent.
const ECHOED: &[(&str, EchoDefault)] = &[
    ("instructions", || Value::Null),
    ("max_output_tokens", || Value::Null),
    ("metadata", || json!({})),
    ("parallel_tool_calls", || Value::Bool(true)),
    ("previous_response_id", || Value::Null),
    ("prompt_cache_key", || Value::Null),
    ("reasoning", || json!({"effort": null, "summary": null})),
    ("store", || Value::Bool(true)),
    ("temperature", || json!(1.0)),
    ("text", || json!({"format": {"type": "text"}})),
    ("tool_choice", || json!("auto")),
    ("tools", || json!([])),
    ("top_p", || json!(1.0)),
    ("truncation", || json!("disabled")),
    ("user", || Value::Null),
];

/// What answering a Responses request needs from the request itself: the ids, the fields the
/// Response object echoes, and which chat tool names stand for which Responses tools.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// `resp_…` id of the Response being produced.
    pub response_id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Model the client asked for (the Response reports the upstream's when it names one).
    pub model: String,
    /// `store` (default true): keep the response for `previous_response_id` and `GET`.
    pub store: bool,
    pub stream: bool,
    pub previous_response_id: Option<String>,
    echo: Map<String, Value>,
    tools: HashMap<String, ToolOrigin>,
}

impl RequestFacts {
    /// Facts of a request that [`responses_to_chat`] accepted, with a fresh response id.
    pub fn from_request(body: &Value) -> Self {
        let mut echo = Map::new();
        for (field, default) in ECHOED {
            let v = body.get(*field).filter(|v| !v.is_null()).cloned();
            echo.insert((*field).to_owned(), v.unwrap_or_else(default));
        }
        let tools = collect_tools(body)
            .unwrap_or_default()
            .into_iter()
            .map(|d| (d.chat_name, d.origin))
            .collect();
        Self {
            response_id: new_id("resp"),
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            model: str_field(body, "model").unwrap_or_default().to_owned(),
            store: body.get("store").and_then(Value::as_bool).unwrap_or(true),
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            previous_response_id: str_field(body, "previous_response_id").map(str::to_owned),
            echo,
            tools,
        }
    }

    /// The Responses tool behind a chat tool name; `None` for a name the request did not offer
    /// (answered as a plain `function_call`).
    pub fn origin(&self, chat_name: &str) -> Option<&ToolOrigin> {
        self.tools.get(chat_name)
    }

    /// The echoed request fields, in the order the Response object lists them.
    pub(crate) fn echo(&self) -> &Map<String, Value> {
        &self.echo
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Translates a Responses request into a chat-completions request.
///
/// `previous` is the stored conversation of `previous_response_id` (its input items followed by
/// its output items, see [`continuation_items`]); it goes after `instructions` and before
/// `input`, as the Responses API does (earlier `instructions` are not carried over).
pub fn responses_to_chat(body: &Value, previous: Option<&[Value]>) -> Result<Value, ProtocolError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ProtocolError::invalid("body", "the request body must be a JSON object"))?;
    refuse_unsupported_fields(obj)?;

    let defs = collect_tools(body)?;
    let names = ToolNames::new(&defs);
    let mut chat = Map::new();
    if let Some(model) = obj.get("model") {
        chat.insert("model".into(), model.clone());
    }

    let mut messages = Vec::new();
    match obj.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => {
            return Err(ProtocolError::invalid(
                "instructions",
                "instructions must be a string",
            ))
        }
    }
    let mut conv = Conversation::new(&names);
    if let Some(prev) = previous {
        conv.push_items(prev)?;
    }
    match obj.get("input") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => conv.push_user_text(s),
        Some(Value::Array(items)) => conv.push_items(items)?,
        Some(_) => {
            return Err(ProtocolError::invalid(
                "input",
                "input must be a string or an array of items",
            ))
        }
    }
    messages.extend(conv.finish());
    if messages.is_empty() {
        return Err(ProtocolError::invalid("input", "input is required"));
    }
    chat.insert("messages".into(), Value::Array(messages));

    let (tools, tool_choice) = translate_tool_choice(obj.get("tool_choice"), &defs, &names)?;
    if !tools.is_empty() {
        chat.insert("tools".into(), Value::Array(tools));
        if let Some(p) = obj.get("parallel_tool_calls").filter(|v| v.is_boolean()) {
            chat.insert("parallel_tool_calls".into(), p.clone());
        }
    }
    if let Some(tc) = tool_choice {
        chat.insert("tool_choice".into(), tc);
    }

    if let Some(format) = body.pointer("/text/format") {
        if let Some(rf) = response_format(format)? {
            chat.insert("response_format".into(), rf);
        }
    }
    if let Some(max) = obj.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat.insert("max_completion_tokens".into(), max.clone());
    }
    if let Some(effort) = body.pointer("/reasoning/effort").filter(|v| !v.is_null()) {
        chat.insert("reasoning_effort".into(), effort.clone());
    }
    for field in ["temperature", "top_p", "user"] {
        if let Some(v) = obj.get(field).filter(|v| !v.is_null()) {
            chat.insert(field.into(), v.clone());
        }
    }
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        chat.insert("stream".into(), Value::Bool(true));
        // Usage arrives in a last chunk only when asked for; response.completed must carry it.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Value::Object(chat))
}

/// Features that need OpenAI's servers rather than a chat model: refused instead of ignored.
fn refuse_unsupported_fields(obj: &Map<String, Value>) -> Result<(), ProtocolError> {
    if obj.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(ProtocolError::invalid(
            "background",
            "background responses are not supported by this gateway",
        ));
    }
    for field in ["conversation", "prompt"] {
        if obj.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ProtocolError::invalid(
                field,
                format!("`{field}` is not supported by this gateway (it refers to objects stored at OpenAI)"),
            ));
        }
    }
    Ok(())
}

/// All tool definitions of a request: `tools` plus those delivered in `additional_tools` input
/// items (Codex sends its tools that way), with namespaces flattened.
fn collect_tools(body: &Value) -> Result<Vec<ToolDef>, ProtocolError> {
    let mut raw: Vec<&Value> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|t| t.iter().collect())
        .unwrap_or_default();
    if let Some(items) = body.get("input").and_then(Value::as_array) {
        for item in items {
            if str_field(item, "type") == Some("additional_tools") {
                raw.extend(
                    item.get("tools")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten(),
                );
            }
        }
    }

    // Flatten namespaces into (namespace, tool) pairs.
    let mut flat: Vec<(Option<String>, &Value)> = Vec::new();
    for t in raw {
        if str_field(t, "type") == Some("namespace") {
            let ns_name = str_field(t, "name").unwrap_or_default().to_owned();
            for inner in t
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                flat.push((Some(ns_name.clone()), inner));
            }
        } else {
            flat.push((None, t));
        }
    }

    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (_, t) in &flat {
        *counts
            .entry(str_field(t, "name").unwrap_or_default())
            .or_default() += 1;
    }
    let mut defs = Vec::with_capacity(flat.len());
    for (ns, t) in &flat {
        let ty = str_field(t, "type").unwrap_or_default();
        let kind = match ty {
            "function" => ToolKind::Function,
            "custom" => ToolKind::Custom,
            other => {
                let other = if other.is_empty() { "(no type)" } else { other };
                return Err(ProtocolError::invalid(
                    "tools",
                    format!(
                        "tool type `{other}` is not supported: this gateway's upstream speaks chat \
                         completions, which can only call function and custom tools"
                    ),
                ));
            }
        };
        let name = str_field(t, "name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ProtocolError::invalid("tools", "every tool needs a `name`"))?;
        // Plain names read best to the model; the namespace only disambiguates a clash.
        let chat_name = match ns {
            Some(ns) if counts.get(name).copied().unwrap_or(0) > 1 => format!("{ns}__{name}"),
            _ => name.to_owned(),
        };
        let mut function = Map::new();
        function.insert("name".into(), json!(chat_name));
        if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
            function.insert("description".into(), d.clone());
        }
        match kind {
            ToolKind::Function => {
                let params = t
                    .get("parameters")
                    .filter(|p| !p.is_null())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                function.insert("parameters".into(), params);
                if let Some(s) = t.get("strict").filter(|s| s.is_boolean()) {
                    function.insert("strict".into(), s.clone());
                }
            }
            ToolKind::Custom => {
                function.insert("parameters".into(), custom_tool_parameters(t));
            }
        }
        defs.push(ToolDef {
            origin: ToolOrigin {
                kind,
                namespace: ns.clone(),
                name: name.to_owned(),
            },
            chat_name,
            chat_tool: json!({"type": "function", "function": function}),
        });
    }
    Ok(defs)
}

/// A custom tool takes free-form text; chat functions take JSON, so it becomes a function of one
/// string `input`. A grammar can't be enforced by a chat upstream; it is shown to the model.
fn custom_tool_parameters(tool: &Value) -> Value {
    let mut desc = String::from("The raw input for this tool.");
    if let Some(format) = tool.get("format") {
        if str_field(format, "type") == Some("grammar") {
            let syntax = str_field(format, "syntax").unwrap_or("formal");
            let def = str_field(format, "definition").unwrap_or_default();
            desc.push_str(&format!(" It must match this {syntax} grammar:\n{def}"));
        }
    }
    json!({
        "type": "object",
        "properties": {"input": {"type": "string", "description": desc}},
        "required": ["input"],
        "additionalProperties": false,
    })
}

/// Chat names of the request's tools, looked up by their Responses identity.
struct ToolNames {
    by_origin: HashMap<(Option<String>, String), String>,
}

impl ToolNames {
    fn new(defs: &[ToolDef]) -> Self {
        let by_origin = defs
            .iter()
            .map(|d| {
                (
                    (d.origin.namespace.clone(), d.origin.name.clone()),
                    d.chat_name.clone(),
                )
            })
            .collect();
        Self { by_origin }
    }

    /// The chat name for a call in the history; a tool no longer offered keeps its plain name.
    fn chat_name(&self, namespace: Option<&str>, name: &str) -> String {
        self.by_origin
            .get(&(namespace.map(str::to_owned), name.to_owned()))
            .cloned()
            .unwrap_or_else(|| name.to_owned())
    }
}

/// `tool_choice` → chat `tool_choice`, and the tools to offer (`allowed_tools` narrows them).
fn translate_tool_choice(
    choice: Option<&Value>,
    defs: &[ToolDef],
    names: &ToolNames,
) -> Result<(Vec<Value>, Option<Value>), ProtocolError> {
    let all = || defs.iter().map(|d| d.chat_tool.clone()).collect::<Vec<_>>();
    let choice = match choice {
        None | Some(Value::Null) => return Ok((all(), None)),
        Some(c) => c,
    };
    if let Some(mode) = choice.as_str() {
        return match mode {
            "auto" | "none" | "required" => {
                let tc = (!defs.is_empty()).then(|| json!(mode));
                Ok((all(), tc))
            }
            other => Err(ProtocolError::invalid(
                "tool_choice",
                format!("unknown tool_choice `{other}`"),
            )),
        };
    }
    let ty = str_field(choice, "type").unwrap_or_default();
    match ty {
        "function" | "custom" => {
            let name = str_field(choice, "name").ok_or_else(|| {
                ProtocolError::invalid("tool_choice", "tool_choice needs a `name`")
            })?;
            let chat_name = names.chat_name(str_field(choice, "namespace"), name);
            Ok((
                all(),
                Some(json!({"type": "function", "function": {"name": chat_name}})),
            ))
        }
        "allowed_tools" => {
            let allowed: Vec<(Option<&str>, &str)> = choice
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| Some((str_field(t, "namespace"), str_field(t, "name")?)))
                .collect();
            let tools = defs
                .iter()
                .filter(|d| {
                    allowed.iter().any(|(ns, n)| {
                        *n == d.origin.name
                            && ns.is_none_or(|ns| Some(ns) == d.origin.namespace.as_deref())
                    })
                })
                .map(|d| d.chat_tool.clone())
                .collect::<Vec<_>>();
            let mode = match str_field(choice, "mode") {
                Some("required") => "required",
                _ => "auto",
            };
            let tc = (!tools.is_empty()).then(|| json!(mode));
            Ok((tools, tc))
        }
        other => {
            let what = if HOSTED_TOOL_CHOICES.contains(&other) {
                format!("tool_choice `{other}` names a built-in tool, which this gateway's chat-completions upstream cannot run")
            } else {
                format!("unsupported tool_choice type `{other}`")
            };
            Err(ProtocolError::invalid("tool_choice", what))
        }
    }
}

/// `text.format` → chat `response_format`.
fn response_format(format: &Value) -> Result<Option<Value>, ProtocolError> {
    match str_field(format, "type") {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for field in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(field).filter(|v| !v.is_null()) {
                    schema.insert(field.into(), v.clone());
                }
            }
            if !schema.contains_key("schema") {
                return Err(ProtocolError::invalid(
                    "text.format.schema",
                    "a json_schema format needs a `schema`",
                ));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        Some(other) => Err(ProtocolError::invalid(
            "text.format",
            format!("unsupported text.format type `{other}`"),
        )),
    }
}

/// Builds chat messages from Responses items. Consecutive assistant text and tool calls become
/// one assistant message, as chat requires tool results to follow the message that called.
struct Conversation<'a> {
    names: &'a ToolNames,
    out: Vec<Value>,
    assistant: Option<Map<String, Value>>,
    /// Images returned by tools: chat tool messages hold text only, so they follow the tool
    /// results as a user message.
    tool_images: Vec<Value>,
}

impl<'a> Conversation<'a> {
    fn new(names: &'a ToolNames) -> Self {
        Self {
            names,
            out: Vec::new(),
            assistant: None,
            tool_images: Vec::new(),
        }
    }

    fn flush_assistant(&mut self) {
        if let Some(a) = self.assistant.take() {
            self.out.push(Value::Object(a));
        }
    }

    fn flush_tool_images(&mut self) {
        if !self.tool_images.is_empty() {
            let parts = std::mem::take(&mut self.tool_images);
            self.out.push(json!({"role": "user", "content": parts}));
        }
    }

    fn push_user_text(&mut self, text: &str) {
        self.flush_assistant();
        self.flush_tool_images();
        self.out.push(json!({"role": "user", "content": text}));
    }

    fn push_items(&mut self, items: &[Value]) -> Result<(), ProtocolError> {
        for item in items {
            self.push_item(item)?;
        }
        Ok(())
    }

    fn push_item(&mut self, item: &Value) -> Result<(), ProtocolError> {
        // An "easy" input message has a role and no type.
        let ty = str_field(item, "type").unwrap_or(if item.get("role").is_some() {
            "message"
        } else {
            ""
        });
        match ty {
            "message" => self.push_message(item),
            "function_call" => {
                let name = str_field(item, "name").unwrap_or_default();
                let chat_name = self.names.chat_name(str_field(item, "namespace"), name);
                let args = str_field(item, "arguments").unwrap_or("{}");
                self.push_tool_call(item, chat_name, args.to_owned())
            }
            "custom_tool_call" => {
                let name = str_field(item, "name").unwrap_or_default();
                let chat_name = self.names.chat_name(str_field(item, "namespace"), name);
                let input = str_field(item, "input").unwrap_or_default();
                self.push_tool_call(item, chat_name, json!({ "input": input }).to_string())
            }
            "function_call_output" | "custom_tool_call_output" => self.push_tool_output(item),
            // Reasoning is the upstream model's own and (encrypted or not) means nothing to
            // another model; tool definitions were already collected.
            "reasoning" | "additional_tools" => Ok(()),
            "" => Err(ProtocolError::invalid(
                "input",
                "an input item has no `type`",
            )),
            other => Err(ProtocolError::invalid(
                "input",
                format!(
                    "input item type `{other}` is not supported: this gateway's upstream speaks \
                     chat completions"
                ),
            )),
        }
    }

    fn push_message(&mut self, item: &Value) -> Result<(), ProtocolError> {
        let role = str_field(item, "role").unwrap_or("user");
        let content = item.get("content").unwrap_or(&Value::Null);
        match role {
            "assistant" => {
                self.flush_tool_images();
                let text = assistant_text(content)?;
                // Text after tool calls starts a new assistant turn.
                if self
                    .assistant
                    .as_ref()
                    .is_some_and(|a| a.contains_key("tool_calls"))
                {
                    self.flush_assistant();
                }
                let a = self.assistant.get_or_insert_with(new_assistant);
                match a.get_mut("content") {
                    // Two assistant messages in a row (e.g. commentary, then an answer).
                    Some(Value::String(s)) if !s.is_empty() && !text.is_empty() => {
                        s.push_str("\n\n");
                        s.push_str(&text);
                    }
                    Some(Value::String(s)) => s.push_str(&text),
                    _ => {
                        a.insert("content".into(), Value::String(text));
                    }
                }
                Ok(())
            }
            "user" | "system" | "developer" => {
                self.flush_assistant();
                self.flush_tool_images();
                // Chat upstreams other than OpenAI's rarely know `developer`; `system` means the
                // same to OpenAI's models.
                let chat_role = if role == "user" { "user" } else { "system" };
                let content = input_content(content, role == "user")?;
                self.out
                    .push(json!({"role": chat_role, "content": content}));
                Ok(())
            }
            other => Err(ProtocolError::invalid(
                "input",
                format!("unknown message role `{other}`"),
            )),
        }
    }

    fn push_tool_call(
        &mut self,
        item: &Value,
        chat_name: String,
        arguments: String,
    ) -> Result<(), ProtocolError> {
        self.flush_tool_images();
        let call_id = str_field(item, "call_id").ok_or_else(|| {
            ProtocolError::invalid("input", "a function_call item needs a `call_id`")
        })?;
        let a = self.assistant.get_or_insert_with(new_assistant);
        let calls = a
            .entry("tool_calls")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(calls) = calls {
            calls.push(json!({
                "id": call_id,
                "type": "function",
                "function": {"name": chat_name, "arguments": arguments},
            }));
        }
        Ok(())
    }

    fn push_tool_output(&mut self, item: &Value) -> Result<(), ProtocolError> {
        self.flush_assistant();
        let call_id = str_field(item, "call_id").ok_or_else(|| {
            ProtocolError::invalid("input", "a function_call_output item needs a `call_id`")
        })?;
        let text = match item.get("output") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::new();
                for p in parts {
                    match str_field(p, "type") {
                        Some("input_text" | "output_text") => {
                            texts.push(str_field(p, "text").unwrap_or_default())
                        }
                        Some("input_image") => self.tool_images.push(image_part(p)?),
                        other => {
                            return Err(ProtocolError::invalid(
                                "input",
                                format!(
                                    "tool output part `{}` cannot be sent to a chat-completions upstream",
                                    other.unwrap_or("(no type)")
                                ),
                            ))
                        }
                    }
                }
                texts.join("\n\n")
            }
            None | Some(Value::Null) => String::new(),
            Some(other) => other.to_string(),
        };
        self.out
            .push(json!({"role": "tool", "tool_call_id": call_id, "content": text}));
        Ok(())
    }

    fn finish(mut self) -> Vec<Value> {
        self.flush_assistant();
        self.flush_tool_images();
        self.out
    }
}

fn new_assistant() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("role".into(), json!("assistant"));
    m
}

/// Text of an assistant message in the history (`output_text` and `refusal` parts).
fn assistant_text(content: &Value) -> Result<String, ProtocolError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                let t = match str_field(p, "type") {
                    Some("output_text" | "input_text" | "text") => str_field(p, "text"),
                    Some("refusal") => str_field(p, "refusal"),
                    other => {
                        return Err(ProtocolError::invalid(
                            "input",
                            format!(
                                "assistant content part `{}` is not supported",
                                other.unwrap_or("(no type)")
                            ),
                        ))
                    }
                };
                out.push_str(t.unwrap_or_default());
            }
            Ok(out)
        }
        _ => Err(ProtocolError::invalid(
            "input",
            "message content must be a string or an array of parts",
        )),
    }
}

/// Content of a user/system message. Text-only content becomes one string, which every chat
/// upstream accepts; images (user messages only) keep the parts form.
fn input_content(content: &Value, allow_media: bool) -> Result<Value, ProtocolError> {
    let parts = match content {
        Value::String(_) => return Ok(content.clone()),
        Value::Array(parts) => parts,
        _ => {
            return Err(ProtocolError::invalid(
                "input",
                "message content must be a string or an array of parts",
            ))
        }
    };
    let mut chat_parts = Vec::with_capacity(parts.len());
    let mut text_only = true;
    for p in parts {
        let ty = str_field(p, "type").unwrap_or_default();
        match ty {
            "input_text" | "output_text" | "text" => chat_parts
                .push(json!({"type": "text", "text": str_field(p, "text").unwrap_or_default()})),
            "input_image" if allow_media => {
                text_only = false;
                chat_parts.push(image_part(p)?);
            }
            "input_file" if allow_media => {
                text_only = false;
                let data = str_field(p, "file_data").ok_or_else(|| {
                    ProtocolError::invalid(
                        "input",
                        "input_file needs inline `file_data`: file ids and URLs refer to files stored at OpenAI",
                    )
                })?;
                let mut file = json!({"file_data": data});
                if let Some(name) = str_field(p, "filename") {
                    file["filename"] = json!(name);
                }
                chat_parts.push(json!({"type": "file", "file": file}));
            }
            other => {
                let other = if other.is_empty() { "(no type)" } else { other };
                return Err(ProtocolError::invalid(
                    "input",
                    format!("content part `{other}` is not supported in this message"),
                ));
            }
        }
    }
    if text_only {
        let texts: Vec<&str> = chat_parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        return Ok(Value::String(texts.join("\n\n")));
    }
    Ok(Value::Array(chat_parts))
}

fn image_part(p: &Value) -> Result<Value, ProtocolError> {
    let url = str_field(p, "image_url").ok_or_else(|| {
        ProtocolError::invalid(
            "input",
            "input_image needs `image_url` (a URL or data URL): file ids refer to files stored at OpenAI",
        )
    })?;
    let mut image = json!({ "url": url });
    if let Some(d) = str_field(p, "detail") {
        image["detail"] = json!(d);
    }
    Ok(json!({"type": "image_url", "image_url": image}))
}

/// The request's `input` as items (a string becomes one user message), as stored for
/// `previous_response_id`.
pub fn input_items(body: &Value) -> Vec<Value> {
    match body.get("input") {
        Some(Value::String(s)) => vec![json!({
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": s}],
        })],
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    }
}

/// The conversation a later request continues with `previous_response_id`: everything the
/// stored response was given (its own `previous` included) followed by what it answered.
pub fn continuation_items(stored_input: &[Value], response: &Value) -> Vec<Value> {
    let mut items = stored_input.to_vec();
    if let Some(out) = response.get("output").and_then(Value::as_array) {
        items.extend(out.iter().cloned());
    }
    items
}

/// A session id the client put in the body: Codex sends its session as `prompt_cache_key` (and
/// in `client_metadata.session_id`). The `session-id` header is the server's to read.
pub fn session_id(body: &Value) -> Option<&str> {
    str_field(body, "prompt_cache_key")
        .or_else(|| {
            body.pointer("/client_metadata/session_id")
                .and_then(Value::as_str)
        })
        .filter(|s| !s.is_empty())
}

/// The newest text a human wrote: the last user message of `input` (tool outputs are not user
/// messages). What the classifier reads.
pub fn newest_human_text(body: &Value) -> Option<String> {
    match body.get("input")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items.iter().rev().find_map(|item| {
            let is_message = matches!(str_field(item, "type"), None | Some("message"));
            if !is_message || str_field(item, "role") != Some("user") {
                return None;
            }
            match item.get("content")? {
                Value::String(s) => Some(s.clone()),
                Value::Array(parts) => {
                    let texts: Vec<&str> = parts
                        .iter()
                        .filter(|p| str_field(p, "type") == Some("input_text"))
                        .filter_map(|p| str_field(p, "text"))
                        .collect();
                    (!texts.is_empty()).then(|| texts.join("\n"))
                }
                _ => None,
            }
        }),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
