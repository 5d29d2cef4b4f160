//! Anthropic Messages API (`/v1/messages`) ↔ OpenAI chat completions.
//!
//! The pipeline speaks chat completions, so:
//! - ingress (a client speaks Messages): [`messages_to_chat`] for the request,
//!   [`chat_to_messages_response`] and [`ChatToMessagesStream`] for the answer;
//! - egress (an upstream speaks Messages, `kind = "anthropic"`):
//!   [`chat_to_messages_request`], [`messages_response_to_chat`] and
//!   [`MessagesToChatStream`], with [`usage_from_messages`] for billing.
//!
//! What each direction cannot carry over is in `docs/translation.md`; every
//! such case is either a [`ProtocolError`] (a 400 naming the field) or a drop
//! reported in [`Translated::dropped`].

mod egress;
mod egress_stream;
mod errors;
mod ingress;
mod ingress_stream;

pub use egress::{
    chat_to_messages_request, chat_to_messages_request_with_drops, messages_response_to_chat,
    usage_from_messages, DEFAULT_MAX_TOKENS,
};
pub use egress_stream::{MessagesToChatStream, StreamError};
pub use errors::{
    error_body, error_frame, error_from_openai, error_type_for_openai, error_type_for_status,
};
pub use ingress::{
    chat_to_messages_response, count_tokens, messages_to_chat, messages_to_chat_with_drops,
    newest_human_text, session_id,
};
pub use ingress_stream::{ChatToMessagesStream, PING_FRAME};

use serde_json::{Map, Value};

/// A request that cannot be translated: always a 400 `invalid_request_error`
/// naming the field (Anthropic's dotted path style, e.g. `messages.2.content.0`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ProtocolError {
    pub param: String,
    pub message: String,
}

impl ProtocolError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        ProtocolError {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// A translated request body and the fields that could not be carried over
/// (deduplicated, in the order first met, e.g. `top_k`,
/// `system.1.cache_control`). The gateway may log them or return them in a
/// header; they are never an error.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub body: Value,
    pub dropped: Vec<String>,
}

/// Collects dropped field names once each.
#[derive(Debug, Default)]
struct Drops(Vec<String>);

impl Drops {
    fn add(&mut self, field: impl Into<String>) {
        let f = field.into();
        if !self.0.contains(&f) {
            self.0.push(f);
        }
    }

    /// Finishes a translation: every top-level field of `req` that is known to be
    /// dropped, or that the translation did not handle, is reported as dropped.
    fn finish(
        mut self,
        req: &Map<String, Value>,
        handled: &[&str],
        known_drops: &[&str],
        out: Map<String, Value>,
    ) -> Translated {
        for k in req.keys() {
            if known_drops.contains(&k.as_str()) || !handled.contains(&k.as_str()) {
                self.add(k.clone());
            }
        }
        Translated {
            body: Value::Object(out),
            dropped: self.0,
        }
    }
}

fn type_of(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh id with the given prefix (`msg_`, `chatcmpl-`, `toolu_`): 24
/// alphanumeric characters, like the real APIs'.
fn new_id(prefix: &str) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    let mut s = String::with_capacity(prefix.len() + 24);
    s.push_str(prefix);
    s.push_str(&Alphanumeric.sample_string(&mut rand::rng(), 24));
    s
}

/// An id derived from another API's id, so a replayed or logged answer keeps
/// one identity across the translation; falls back to a fresh one.
fn derived_id(prefix: &str, other: Option<&str>, other_prefixes: &[&str]) -> String {
    let Some(o) = other.filter(|o| !o.is_empty()) else {
        return new_id(prefix);
    };
    let mut rest = o;
    for p in other_prefixes {
        if let Some(r) = o.strip_prefix(p) {
            rest = r;
            break;
        }
    }
    let clean: String = rest
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    if clean.is_empty() {
        return new_id(prefix);
    }
    format!("{prefix}{clean}")
}
