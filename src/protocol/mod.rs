//! Wire formats: pure data and conversions, no HTTP server, no gateway state.
//! Each protocol parses its request bodies, says what the pipeline needs to
//! know about them (`openai::chat::ChatRequest`), and reads usage back out of
//! responses and streams. Errors here carry no status: the edge that speaks
//! the protocol decides how to render them.

pub mod anthropic;
pub mod openai;
pub mod responses;
pub mod sse;

/// A request body the protocol cannot accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProtocolError {
    /// The offending field as a path (`messages[0].role`), if one is to blame.
    pub field: Option<String>,
    pub message: String,
}

impl ProtocolError {
    /// The body as a whole is wrong (not JSON, not an object, empty).
    pub fn body(message: impl Into<String>) -> Self {
        ProtocolError {
            field: None,
            message: message.into(),
        }
    }

    /// One named field is wrong.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ProtocolError {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// Request headers as plain data: lower-case names, values that were valid
/// visible ASCII (others are dropped). Rules and guards read them by name.
#[derive(Debug, Clone, Default)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Adds one header; `name` is lower-cased.
    pub fn push(&mut self, name: &str, value: &str) {
        self.0.push((name.to_ascii_lowercase(), value.to_string()));
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_found_whatever_the_case() {
        let mut h = Headers::new();
        h.push("X-Session-Id", "abc");
        h.push("x-session-id", "second");
        assert_eq!(h.get("x-session-id"), Some("abc"));
        assert_eq!(h.get("X-SESSION-ID"), Some("abc"));
        assert_eq!(h.get("missing"), None);
    }
}
