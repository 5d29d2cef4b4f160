//! OpenAI's error envelope, as pure JSON.

use serde_json::{json, Value};

/// `{"error":{"message","type","param","code"}}`.
pub fn envelope(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

/// The envelope as one SSE event, for errors after a stream has started.
pub fn sse_event(message: &str, kind: &str, code: Option<&str>) -> bytes::Bytes {
    crate::protocol::sse::frame(envelope(message, kind, None, code).to_string().as_bytes())
}
