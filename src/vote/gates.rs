//! Pure programmatic gates over a chat.completion response.
//!
//! Order: finish_length, refusal (`message.refusal` field), non_empty, refusal (phrases),
//! json, json_schema, regex; the first failure is reported. A tool-call answer (no text
//! content, non-empty `tool_calls`) passes `non_empty` and skips the content gates (refusal
//! phrases, json, regex): `response_format` does not apply to tool calls. A non-empty
//! `message.refusal` field always fails the refusal gate.

use serde_json::Value;

use super::config::{normalize_text, CompiledGates, JsonGate};

/// Which gate rejected an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateFailure {
    /// No content and no tool calls.
    #[error("non_empty: the answer is empty")]
    NonEmpty,
    /// Generation stopped at the token limit.
    #[error("finish_length: the answer was cut off (finish_reason=length)")]
    FinishLength,
    /// Content is not valid JSON although JSON was required.
    #[error("json: {0}")]
    Json(String),
    /// Content does not match the request's JSON schema.
    #[error("json_schema: {0}")]
    JsonSchema(String),
    /// Refusal detected (matched phrase, or the `refusal` field).
    #[error("refusal: {0}")]
    Refusal(String),
    /// Content does not match `must_match`.
    #[error("regex: the answer does not match must_match")]
    Regex,
}

impl GateFailure {
    /// Short gate name, as used in headers.
    pub fn name(&self) -> &'static str {
        match self {
            GateFailure::NonEmpty => "non_empty",
            GateFailure::FinishLength => "finish_length",
            GateFailure::Json(_) => "json",
            GateFailure::JsonSchema(_) => "json_schema",
            GateFailure::Refusal(_) => "refusal",
            GateFailure::Regex => "regex",
        }
    }
}

/// Text content of `choices[0].message` (string, or concatenated text parts).
pub fn completion_text(response: &Value) -> Option<String> {
    match response.pointer("/choices/0/message/content")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

/// Gates bound to one request: the response_format's schema is compiled once and reused
/// for every tier of a cascade.
pub struct RequestGates<'a> {
    gates: &'a CompiledGates,
    want_json: bool,
    schema: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for RequestGates<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestGates")
            .field("want_json", &self.want_json)
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

impl<'a> RequestGates<'a> {
    /// Bind `gates` to `request` (an OpenAI chat request body).
    pub fn new(request: &Value, gates: &'a CompiledGates) -> Self {
        let fmt_type = request
            .pointer("/response_format/type")
            .and_then(Value::as_str)
            .unwrap_or("text");
        let requested = matches!(fmt_type, "json_object" | "json_schema");
        let want_json = match gates.cfg.json {
            JsonGate::Off => false,
            JsonGate::Always => true,
            JsonGate::Auto => requested,
        };
        let schema = if want_json && fmt_type == "json_schema" {
            request
                .pointer("/response_format/json_schema/schema")
                .and_then(|s| match jsonschema::validator_for(s) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        // A schema we can't compile (e.g. remote $ref, resolving disabled)
                        // degrades to the plain JSON parse check rather than failing answers.
                        tracing::warn!(error = %e, "json_schema gate: schema does not compile; checking JSON syntax only");
                        None
                    }
                })
        } else {
            None
        };
        RequestGates {
            gates,
            want_json,
            schema,
        }
    }

    /// Check one chat.completion response.
    pub fn check(&self, response: &Value) -> Result<(), GateFailure> {
        let cfg = &self.gates.cfg;
        let choice = response.pointer("/choices/0");
        if cfg.no_length_finish
            && choice
                .and_then(|c| c.get("finish_reason"))
                .and_then(Value::as_str)
                == Some("length")
        {
            return Err(GateFailure::FinishLength);
        }
        let text = completion_text(response).unwrap_or_default();
        let has_text = !text.trim().is_empty();
        let has_tools = response
            .pointer("/choices/0/message/tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if let Some(r) = response
            .pointer("/choices/0/message/refusal")
            .and_then(Value::as_str)
            .filter(|r| !r.trim().is_empty())
        {
            return Err(GateFailure::Refusal(r.to_string()));
        }
        if !has_text {
            if cfg.non_empty && !has_tools {
                return Err(GateFailure::NonEmpty);
            }
            // Nothing textual to check further.
            if has_tools || !self.want_json {
                return Ok(());
            }
        }
        if !self.gates.refusal_phrases.is_empty() {
            let norm = normalize_text(&text);
            if let Some(p) = self
                .gates
                .refusal_phrases
                .iter()
                .find(|p| norm.contains(p.as_str()))
            {
                return Err(GateFailure::Refusal(p.clone()));
            }
        }
        if self.want_json {
            let v: Value =
                serde_json::from_str(&text).map_err(|e| GateFailure::Json(e.to_string()))?;
            if let Some(validator) = &self.schema {
                if let Some(err) = validator.iter_errors(&v).next() {
                    let at = err.instance_path.to_string();
                    let at = if at.is_empty() { "/".to_string() } else { at };
                    return Err(GateFailure::JsonSchema(format!("at {at}: {err}")));
                }
            }
        }
        if let Some(re) = &self.gates.must_match {
            if !re.is_match(&text) {
                return Err(GateFailure::Regex);
            }
        }
        Ok(())
    }
}

/// One-shot check of `response` against `gates` for `request`.
pub fn check(request: &Value, response: &Value, gates: &CompiledGates) -> Result<(), GateFailure> {
    RequestGates::new(request, gates).check(response)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::vote::config::GatesConfig;
    use serde_json::json;

    fn gates(src: &str) -> CompiledGates {
        let g: GatesConfig = toml::from_str(src).unwrap();
        g.compile("g").unwrap()
    }

    fn resp(content: Value, finish: &str) -> Value {
        json!({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": finish,
            "message": {"role": "assistant", "content": content}}]})
    }

    fn plain() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn passes_plain_answer() {
        let g = gates("");
        assert_eq!(check(&plain(), &resp(json!("hello"), "stop"), &g), Ok(()));
    }

    #[test]
    fn non_empty() {
        let g = gates("");
        for c in [json!(""), json!("  \n"), Value::Null] {
            assert_eq!(
                check(&plain(), &resp(c, "stop"), &g),
                Err(GateFailure::NonEmpty)
            );
        }
        assert_eq!(
            check(&plain(), &json!({"choices": []}), &g),
            Err(GateFailure::NonEmpty)
        );
        let tool = json!({"choices": [{"finish_reason": "tool_calls", "message": {"content": null,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]});
        assert_eq!(check(&plain(), &tool, &g), Ok(()));
        let off = gates("non_empty = false");
        assert_eq!(check(&plain(), &resp(json!(""), "stop"), &off), Ok(()));
    }

    #[test]
    fn finish_length() {
        let r = resp(json!("partial"), "length");
        assert_eq!(
            check(&plain(), &r, &gates("")),
            Err(GateFailure::FinishLength)
        );
        assert_eq!(
            check(&plain(), &r, &gates("no_length_finish = false")),
            Ok(())
        );
    }

    #[test]
    fn json_object() {
        let req = json!({"messages": [], "response_format": {"type": "json_object"}});
        let g = gates("");
        let err = check(&req, &resp(json!("{\"a\": "), "stop"), &g).unwrap_err();
        assert_eq!(err.name(), "json");
        assert_eq!(check(&req, &resp(json!("{\"a\": 1}"), "stop"), &g), Ok(()));
        // Auto: plain requests are not checked; always: they are; off: never.
        assert_eq!(
            check(&plain(), &resp(json!("not json"), "stop"), &g),
            Ok(())
        );
        assert_eq!(
            check(
                &plain(),
                &resp(json!("not json"), "stop"),
                &gates("json = \"always\"")
            )
            .unwrap_err()
            .name(),
            "json"
        );
        assert_eq!(
            check(&req, &resp(json!("nope"), "stop"), &gates("json = \"off\"")),
            Ok(())
        );
        // Empty answer with non_empty off still fails the JSON requirement.
        assert_eq!(
            check(&req, &resp(json!(""), "stop"), &gates("non_empty = false"))
                .unwrap_err()
                .name(),
            "json"
        );
    }

    #[test]
    fn json_schema() {
        let req = json!({"messages": [], "response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "strict": true, "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
            "required": ["name", "age"],
            "additionalProperties": false
        }}}});
        let g = gates("");
        let rg = RequestGates::new(&req, &g);
        assert_eq!(
            rg.check(&resp(json!(r#"{"name": "Ada", "age": 36}"#), "stop")),
            Ok(())
        );
        for bad in [
            r#"{"name": "Ada"}"#,
            r#"{"name": "Ada", "age": -1}"#,
            r#"{"name": "Ada", "age": 1, "x": 2}"#,
            r#"[1, 2]"#,
        ] {
            let e = rg.check(&resp(json!(bad), "stop")).unwrap_err();
            assert_eq!(e.name(), "json_schema", "{bad}: {e}");
        }
        let e = rg
            .check(&resp(json!(r#"{"name": 5, "age": 1}"#), "stop"))
            .unwrap_err();
        assert!(e.to_string().contains("/name"), "{e}");
        assert_eq!(
            rg.check(&resp(json!("{oops"), "stop")).unwrap_err().name(),
            "json"
        );
    }

    #[test]
    fn uncompilable_schema_degrades_to_json_check() {
        let req = json!({"response_format": {"type": "json_schema", "json_schema": {
            "schema": {"$ref": "https://example.com/remote.json"}}}});
        let g = gates("");
        assert_eq!(check(&req, &resp(json!("{}"), "stop"), &g), Ok(()));
        assert_eq!(
            check(&req, &resp(json!("x"), "stop"), &g)
                .unwrap_err()
                .name(),
            "json"
        );
    }

    #[test]
    fn refusal() {
        let g = gates("refusal_phrases = [\"I can't help with\", \"as an AI\"]");
        let e = check(
            &plain(),
            &resp(json!("Sorry, I  CAN'T help\nwith that."), "stop"),
            &g,
        )
        .unwrap_err();
        assert_eq!(e, GateFailure::Refusal("i can't help with".into()));
        assert_eq!(
            check(&plain(), &resp(json!("Sure: 42"), "stop"), &g),
            Ok(())
        );
        // The refusal field fires even without phrases.
        let r = json!({"choices": [{"finish_reason": "stop", "message": {"content": null, "refusal": "I won't."}}]});
        assert_eq!(
            check(&plain(), &r, &gates("")).unwrap_err().name(),
            "refusal"
        );
    }

    #[test]
    fn must_match() {
        let g = gates("must_match = '^\\d+$'");
        assert_eq!(check(&plain(), &resp(json!("42"), "stop"), &g), Ok(()));
        assert_eq!(
            check(&plain(), &resp(json!("about 42"), "stop"), &g),
            Err(GateFailure::Regex)
        );
    }

    #[test]
    fn text_parts_content() {
        let r = resp(
            json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
            "stop",
        );
        assert_eq!(completion_text(&r).as_deref(), Some("ab"));
    }
}
