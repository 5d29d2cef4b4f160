//! The OpenAI Responses API (`POST /v1/responses`) translated to and from chat completions.
//!
//! * [`responses_to_chat`] turns a Responses request (plus the stored conversation of
//!   `previous_response_id`) into a chat-completions body.
//! * [`chat_to_response`] turns a chat completion into a Response object.
//! * [`ChatToResponsesStream`] turns chat SSE chunks into Responses SSE frames, event by event.
//!
//! What cannot be carried over is refused with a [`ProtocolError`] (400) or dropped as listed in
//! `docs/translation-responses.md`.

mod request;
mod response;
mod stream;

pub use request::{
    continuation_items, input_items, newest_human_text, responses_to_chat, session_id,
    RequestFacts, ToolOrigin,
};
pub use response::{chat_to_response, usage_json};
pub use stream::ChatToResponsesStream;

/// A Responses request that cannot be translated; the client gets it as a 400
/// `invalid_request_error` naming `param`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProtocolError {
    /// HTTP status to answer with.
    pub status: u16,
    /// Human-readable reason, naming the offending field or tool.
    pub message: String,
    /// The request field at fault (`tools`, `input`, …), as the OpenAI error envelope's `param`.
    pub param: Option<String>,
}

impl ProtocolError {
    pub(crate) fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }

    /// The OpenAI error envelope for this error.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": null,
            }
        })
    }
}

/// A fresh object id such as `resp_5f0c…` (random, 128 bits).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod fixture_tests;
