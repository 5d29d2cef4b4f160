//! Anthropic's error envelope `{"type":"error","error":{"type","message"}}`
//! and the mapping from HTTP statuses and OpenAI error bodies onto it.

use bytes::Bytes;
use serde_json::{json, Value};

/// Anthropic's error type for an HTTP status (their documented table; other
/// 4xx are `invalid_request_error`, other 5xx `api_error`).
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Anthropic's error type for an OpenAI-style error (status plus the
/// envelope's `code` / `type`). The code wins where it is more precise than
/// the status, e.g. an `invalid_api_key` sent with a 400 by some providers.
pub fn error_type_for_openai(status: u16, code: Option<&str>, kind: Option<&str>) -> &'static str {
    match code {
        Some("invalid_api_key") => return "authentication_error",
        Some("model_not_found") | Some("not_found") => return "not_found_error",
        Some("request_too_large") => return "request_too_large",
        Some("no_healthy_deployment") => return "overloaded_error",
        Some("rate_limit_exceeded") | Some("insufficient_quota") => return "rate_limit_error",
        _ => {}
    }
    match kind {
        Some("authentication_error") => "authentication_error",
        Some("permission_error") => "permission_error",
        Some("rate_limit_error") | Some("insufficient_quota") => "rate_limit_error",
        _ => error_type_for_status(status),
    }
}

/// The error envelope body.
pub fn error_body(error_type: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type, "message": message}})
}

/// An OpenAI error response (status and body, as the gateway or a chat
/// upstream produced it) in Anthropic's shape: `(status, body)`. A 503 for
/// "no healthy deployment" becomes Anthropic's 529 `overloaded_error`, which
/// its SDKs and Claude Code retry.
pub fn error_from_openai(status: u16, openai_body: &Value) -> (u16, Value) {
    let err = openai_body.get("error");
    let code = err.and_then(|e| e.get("code")).and_then(Value::as_str);
    let kind = err.and_then(|e| e.get("type")).and_then(Value::as_str);
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .or_else(|| openai_body.get("message").and_then(Value::as_str))
        .unwrap_or("The upstream returned an error.");
    let error_type = error_type_for_openai(status, code, kind);
    let status = if error_type == "overloaded_error" {
        529
    } else {
        status
    };
    (status, error_body(error_type, message))
}

/// An `event: error` SSE frame, for failures after the stream started (the
/// status line is gone by then, so the error travels as an event).
pub fn error_frame(error_type: &str, message: &str) -> Bytes {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(error_body(error_type, message).to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_documented_types() {
        let cases = [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "api_error"),
            (529, "overloaded_error"),
        ];
        for (status, kind) in cases {
            assert_eq!(error_type_for_status(status), kind, "{status}");
        }
    }

    #[test]
    fn openai_codes_refine_the_status() {
        assert_eq!(
            error_type_for_openai(400, Some("invalid_api_key"), None),
            "authentication_error"
        );
        assert_eq!(
            error_type_for_openai(401, Some("invalid_api_key"), Some("invalid_request_error")),
            "authentication_error"
        );
        assert_eq!(
            error_type_for_openai(404, Some("model_not_found"), Some("invalid_request_error")),
            "not_found_error"
        );
        assert_eq!(
            error_type_for_openai(429, Some("budget_exceeded"), Some("invalid_request_error")),
            "rate_limit_error"
        );
        assert_eq!(
            error_type_for_openai(400, None, Some("invalid_request_error")),
            "invalid_request_error"
        );
    }

    #[test]
    fn gateway_errors_become_anthropic_envelopes() {
        let (s, b) = error_from_openai(
            503,
            &json!({"error": {"message": "No healthy deployment", "type": "api_error", "code": "no_healthy_deployment"}}),
        );
        assert_eq!(s, 529);
        assert_eq!(
            b,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "No healthy deployment"}})
        );
        let (s, b) = error_from_openai(
            429,
            &json!({"error": {"message": "Budget of key k exhausted", "type": "invalid_request_error", "code": "budget_exceeded"}}),
        );
        assert_eq!(s, 429);
        assert_eq!(b["error"]["type"], "rate_limit_error");
        assert_eq!(b["error"]["message"], "Budget of key k exhausted");
        let (s, b) = error_from_openai(502, &json!("garbage"));
        assert_eq!(s, 502);
        assert_eq!(b["error"]["type"], "api_error");
    }

    #[test]
    fn error_frame_is_a_named_sse_event() {
        let f = error_frame("overloaded_error", "Overloaded");
        let s = std::str::from_utf8(&f).unwrap_or("");
        assert!(s.starts_with("event: error\ndata: {"));
        assert!(s.ends_with("}\n\n"));
        let data: Value = serde_json::from_str(
            s.trim_start_matches("event: error\ndata: ")
                .trim_end_matches('\n'),
        )
        .unwrap_or(Value::Null);
        assert_eq!(data["type"], "error");
        assert_eq!(data["error"]["type"], "overloaded_error");
    }
}
