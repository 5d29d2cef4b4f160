//! Loop-divergence detection over an OpenAI chat completion request body (pure, no state).

use std::collections::HashMap;

use serde_json::Value;

use super::config::{LoopAction, LoopConfig};

/// Maximum characters of a preview in findings and headers.
pub const PREVIEW_MAX: usize = 40;

/// What repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoopKind {
    /// The same tool call (name + canonical arguments).
    ToolCall,
    /// The same assistant text answer (normalised).
    Text,
}

impl LoopKind {
    /// Stable lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LoopKind::ToolCall => "tool_call",
            LoopKind::Text => "text",
        }
    }
}

/// A detected loop; `action` is the configured reaction for the caller to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopFinding {
    /// Tool call or text repetition.
    pub kind: LoopKind,
    /// Tool (function) name; empty for [`LoopKind::Text`].
    pub tool: String,
    /// Printable-ASCII preview, at most [`PREVIEW_MAX`] chars plus `...`:
    /// `search({"q":"x"})` for calls, the normalised answer for text.
    pub args_preview: String,
    /// Occurrences within the window.
    pub count: usize,
    /// Configured reaction.
    pub action: LoopAction,
}

impl LoopFinding {
    /// Header-safe (printable ASCII) summary: `repeated=search({"q":"weather"}) count=4`
    /// or `repeated_text=i cannot help with that count=3`.
    pub fn header_value(&self) -> String {
        let label = match self.kind {
            LoopKind::ToolCall => "repeated",
            LoopKind::Text => "repeated_text",
        };
        // The preview is already sanitised; re-sanitise in case a caller built the struct by hand.
        format!(
            "{label}={} count={}",
            preview(&self.args_preview, usize::MAX),
            self.count
        )
    }
}

/// Finds a tool call repeated `>= k` times among the last `window` assistant tool calls, else
/// (when `text_repeat`) an assistant text repeated `>= k` times among the last `window` texts.
pub fn detect_loop(body: &Value, cfg: &LoopConfig) -> Option<LoopFinding> {
    let messages = body.get("messages")?.as_array()?;
    // Degenerate configs would flag every request; validate() rejects them, this keeps us safe anyway.
    let k = cfg.k.max(2);
    let window = cfg.window.max(k);
    let assistant = || {
        messages
            .iter()
            .rev()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    };

    let calls = assistant()
        .flat_map(|m| {
            let list = m.get("tool_calls").and_then(Value::as_array);
            // Legacy `function_call` (functions API) counts as one call.
            let legacy = m.get("function_call").filter(|v| v.is_object());
            list.into_iter()
                .flat_map(|l| l.iter().rev())
                .map(|c| c.get("function").unwrap_or(c))
                .chain(legacy)
        })
        .filter_map(|f| {
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())?;
            Some((name, f))
        })
        .take(window)
        .map(|(name, f)| (name, canonical_args(f.get("arguments"))));
    if let Some((count, (name, args))) = most_repeated(calls, |(n, a)| {
        let mut h = blake3::Hasher::new();
        h.update(n.as_bytes());
        h.update(&[0]);
        h.update(a.as_bytes());
        short_hash(h)
    }) {
        if count >= k {
            return Some(LoopFinding {
                kind: LoopKind::ToolCall,
                tool: preview(name, PREVIEW_MAX),
                args_preview: preview(&format!("{name}({args})"), PREVIEW_MAX),
                count,
                action: cfg.action,
            });
        }
    }

    if cfg.text_repeat {
        // Only answers: a preamble beside tool calls ("Let me check.") repeats legitimately.
        let texts = assistant()
            .filter(|m| !has_calls(m))
            .filter_map(|m| m.get("content").map(normalised_text))
            .filter(|t| !t.is_empty())
            .take(window);
        if let Some((count, text)) = most_repeated(texts, |t| {
            let mut h = blake3::Hasher::new();
            h.update(t.as_bytes());
            short_hash(h)
        }) {
            if count >= k {
                return Some(LoopFinding {
                    kind: LoopKind::Text,
                    tool: String::new(),
                    args_preview: preview(&text, PREVIEW_MAX),
                    count,
                    action: cfg.action,
                });
            }
        }
    }
    None
}

fn has_calls(m: &Value) -> bool {
    m.get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
        || m.get("function_call").is_some_and(Value::is_object)
}

fn short_hash(h: blake3::Hasher) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Returns the item with the most occurrences (ties: the most recent, i.e. first seen in newest-first
/// order) and its count. Items arrive newest first.
fn most_repeated<T>(
    items: impl Iterator<Item = T>,
    sig: impl Fn(&T) -> [u8; 16],
) -> Option<(usize, T)> {
    let mut counts: HashMap<[u8; 16], (usize, usize)> = HashMap::new();
    let mut firsts: Vec<T> = Vec::new();
    for item in items {
        let s = sig(&item);
        let slot = counts.entry(s).or_insert_with(|| {
            firsts.push(item);
            (0, firsts.len() - 1)
        });
        slot.0 += 1;
    }
    let (count, idx) = counts
        .into_values()
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))?;
    firsts.into_iter().nth(idx).map(|t| (count, t))
}

/// Arguments as canonical JSON (sorted keys, no whitespace); unparseable strings are kept trimmed.
pub fn canonical_args(args: Option<&Value>) -> String {
    match args {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v) => canonical_json(&v),
            Err(_) => s.trim().to_string(),
        },
        // Some clients send arguments as an object rather than a JSON string.
        Some(v) => canonical_json(v),
    }
}

/// Serialises with object keys sorted regardless of serde_json's `preserve_order` feature.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_string(k, out);
                out.push(':');
                write_canonical(val, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, val) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(val, out);
            }
            out.push(']');
        }
        Value::String(s) => push_json_string(s, out),
        // Scalars have a single serde_json rendering.
        other => out.push_str(&other.to_string()),
    }
}

fn push_json_string(s: &str, out: &mut String) {
    out.push_str(&Value::String(s.to_string()).to_string());
}

/// Assistant content as normalised text: trimmed, lowercased, whitespace collapsed.
/// Accepts a string or an array of `{type: "text", text}` parts.
pub fn normalised_text(content: &Value) -> String {
    let mut raw = String::new();
    match content {
        Value::String(s) => raw.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    raw.push(' ');
                    raw.push_str(t);
                }
            }
        }
        _ => {}
    }
    raw.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Printable ASCII only (others become `?`), cut to `max` chars with a `...` marker.
pub fn preview(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 3);
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        out.push(if (' '..='~').contains(&c) { c } else { '?' });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(k: usize, window: usize) -> LoopConfig {
        LoopConfig {
            k,
            window,
            ..LoopConfig::default()
        }
    }

    fn call(id: usize, name: &str, args: &str) -> Value {
        json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{"id": format!("call_{id}"), "type": "function",
                            "function": {"name": name, "arguments": args}}]
        })
    }

    fn tool_result(id: usize) -> Value {
        json!({"role": "tool", "tool_call_id": format!("call_{id}"), "content": "no results"})
    }

    #[test]
    fn scripted_agent_found_exactly_at_k() {
        let c = cfg(3, 10);
        let mut messages = vec![
            json!({"role": "system", "content": "You are an agent."}),
            json!({"role": "user", "content": "What's the weather in Paris?"}),
        ];
        // Request n carries n-1 identical assistant calls in its history.
        for turn in 1..=6usize {
            let body = json!({"model": "auto", "messages": messages});
            let found = detect_loop(&body, &c);
            let prior_calls = turn - 1;
            if prior_calls < 3 {
                assert_eq!(found, None, "turn {turn}");
            } else {
                let f = found.unwrap();
                assert_eq!(f.kind, LoopKind::ToolCall);
                assert_eq!(f.tool, "search");
                assert_eq!(f.count, prior_calls);
                assert_eq!(f.args_preview, r#"search({"q":"weather paris"})"#);
                assert_eq!(f.action, LoopAction::Flag);
                assert_eq!(
                    f.header_value(),
                    format!(r#"repeated=search({{"q":"weather paris"}}) count={prior_calls}"#)
                );
            }
            messages.push(call(turn, "search", r#"{"q": "weather paris"}"#));
            messages.push(tool_result(turn));
        }
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let body = json!({"messages": [
            call(1, "search", r#"{"q":"x","n":5,"opts":{"b":1,"a":2}}"#),
            call(2, "search", r#"{ "n": 5, "opts": {"a": 2, "b": 1}, "q": "x" }"#),
            call(3, "search", r#"{"opts":{"a":2,"b":1},"q":"x","n":5}"#),
        ]});
        let f = detect_loop(&body, &cfg(3, 10)).unwrap();
        assert_eq!(f.count, 3);
        let full = r#"search({"n":5,"opts":{"a":2,"b":1},"q":"x"})"#;
        assert_eq!(f.args_preview, format!("{}...", &full[..PREVIEW_MAX]));
    }

    #[test]
    fn different_args_or_names_are_different_calls() {
        let body = json!({"messages": [
            call(1, "search", r#"{"q":"x"}"#),
            call(2, "search", r#"{"q":"y"}"#),
            call(3, "search", r#"{"q":"x","page":2}"#),
            call(4, "lookup", r#"{"q":"x"}"#),
            call(5, "search", r#"{"q":"X"}"#),
        ]});
        assert_eq!(detect_loop(&body, &cfg(2, 10)), None);
    }

    #[test]
    fn window_limits_what_is_counted() {
        // Three old identical calls, then four distinct ones: a window of 4 sees no loop.
        let mut messages: Vec<Value> = (0..3).map(|i| call(i, "search", r#"{"q":"x"}"#)).collect();
        for i in 0..4 {
            messages.push(call(10 + i, "fetch", &format!(r#"{{"url":"u{i}"}}"#)));
        }
        let body = json!({ "messages": messages });
        assert_eq!(detect_loop(&body, &cfg(3, 4)), None);
        assert_eq!(detect_loop(&body, &cfg(3, 7)).map(|f| f.count), Some(3));
    }

    #[test]
    fn parallel_calls_in_one_message_and_raw_args() {
        let body = json!({"messages": [{
            "role": "assistant",
            "tool_calls": [
                {"function": {"name": "ping", "arguments": "not json"}},
                {"function": {"name": "ping", "arguments": "  not json "}},
                {"function": {"name": "ping", "arguments": "not json"}}
            ]
        }]});
        let f = detect_loop(&body, &cfg(3, 10)).unwrap();
        assert_eq!((f.count, f.args_preview.as_str()), (3, "ping(not json)"));
    }

    #[test]
    fn object_arguments_and_legacy_function_call() {
        let body = json!({"messages": [
            {"role": "assistant", "function_call": {"name": "f", "arguments": "{\"b\":1,\"a\":2}"}},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 2, "b": 1}}}]},
        ]});
        assert_eq!(detect_loop(&body, &cfg(2, 10)).map(|f| f.count), Some(2));
    }

    #[test]
    fn text_repetition() {
        let msg = |t: &str| json!({"role": "assistant", "content": t});
        let user = json!({"role": "user", "content": "try again"});
        let body = json!({"messages": [
            msg("I cannot   find that file."),
            user.clone(),
            msg("  i cannot find\nthat FILE. "),
            user.clone(),
            {"role": "assistant", "content": [{"type": "text", "text": "I cannot find that file."}]},
            user.clone(),
        ]});
        let f = detect_loop(&body, &cfg(3, 10)).unwrap();
        assert_eq!(f.kind, LoopKind::Text);
        assert_eq!(f.count, 3);
        assert_eq!(f.tool, "");
        assert_eq!(
            f.header_value(),
            "repeated_text=i cannot find that file. count=3"
        );

        // Two repeats are not a loop; text_repeat=false disables it; user repeats never count.
        let body2 =
            json!({"messages": [msg("same"), msg("same"), user.clone(), user.clone(), user]});
        assert_eq!(detect_loop(&body2, &cfg(3, 10)), None);
        let off = LoopConfig {
            text_repeat: false,
            ..cfg(3, 10)
        };
        assert_eq!(detect_loop(&body, &off), None);
    }

    #[test]
    fn preambles_beside_tool_calls_are_not_text_loops() {
        let body = json!({"messages": (0..4).map(|i| json!({
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"function": {"name": "fetch", "arguments": format!("{{\"page\":{i}}}")}}]
        })).collect::<Vec<_>>()});
        assert_eq!(detect_loop(&body, &cfg(3, 10)), None);
    }

    #[test]
    fn header_value_is_ascii_safe() {
        let body = json!({"messages": [
            call(1, "s\u{e9}arch", "{\"q\":\"caf\u{e9}\\n\\r\\u0000 \u{1f600}\"}"),
            call(2, "s\u{e9}arch", "{\"q\":\"caf\u{e9}\\n\\r\\u0000 \u{1f600}\"}"),
        ]});
        let f = detect_loop(&body, &cfg(2, 10)).unwrap();
        let h = f.header_value();
        assert!(h.bytes().all(|b| (0x20..0x7f).contains(&b)), "{h}");
        assert_eq!(f.tool, "s?arch");
    }

    #[test]
    fn malformed_bodies_are_ignored() {
        let c = cfg(2, 10);
        for body in [
            json!(null),
            json!({}),
            json!({"messages": "x"}),
            json!({"messages": [1, null, {"role": 3}, {"role": "assistant", "tool_calls": "x"}]}),
            json!({"messages": [{"role": "assistant", "tool_calls": [1, {"function": 2}]}]}),
        ] {
            assert_eq!(detect_loop(&body, &c), None, "{body}");
        }
    }

    #[test]
    fn preview_truncates_on_char_boundary() {
        assert_eq!(preview("abc", 2), "ab...");
        assert_eq!(preview("\u{e9}\u{e9}\u{e9}", 2), "??...");
        assert_eq!(preview("ab", 2), "ab");
    }
}
