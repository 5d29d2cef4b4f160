//! Size limits checked on every request, whatever the endpoint, the
//! connection's history or the protocol.
//!
//! hyper's own limits are not enough: its HTTP/1 read-buffer cap is only
//! approximate (a kept-alive connection whose buffer has grown lets a larger
//! head through) and it answers with an empty 431. So the transport caps are a
//! loose backstop (`transport_header_cap`) and the exact limits live here, as
//! OpenAI error envelopes.

use super::error::ApiError;
use crate::gateway::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header;
use http_body::Body as _;
use std::sync::Arc;

/// hyper's per-connection cap (HTTP/1 read buffer, HTTP/2 header list): big
/// enough that every head over `max_header_bytes` but not absurdly so reaches
/// `enforce` and gets an envelope; past it hyper refuses on its own.
pub fn transport_header_cap(max_header_bytes: usize) -> usize {
    max_header_bytes
        .saturating_mul(4)
        .max(max_header_bytes + 256 * 1024)
}

/// The size of a request head as it came over HTTP/1.1: request line,
/// `name: value\r\n` per header, the blank line. (HTTP/2 heads are counted
/// the same way, so one limit means the same on both.)
pub fn head_bytes(req: &Request) -> usize {
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + headers + 2
}

pub fn header_too_large(limit: usize) -> ApiError {
    ApiError::new(
        431,
        "invalid_request_error",
        Some("request_header_fields_too_large"),
        format!("Request headers are larger than the {limit}-byte limit."),
    )
}

/// Head size, then body size (413, chunked bodies too) for every request.
/// The body is read here, once, so no handler can forget the limit.
pub async fn enforce(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (max_header, max_body) = {
        let rt = app.runtime.load();
        let s = &rt.config.server;
        (s.max_header_bytes, s.max_body_bytes)
    };
    if head_bytes(&req) > max_header {
        return header_too_large(max_header).into_response();
    }
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return ApiError::too_large(max_body).into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, max_body).await {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return ApiError::too_large(max_body).into_response(),
        Err(_) => {
            return ApiError::invalid_request("The request body could not be read.").into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        src = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_bytes_counts_the_wire_form() {
        let req = http::Request::builder()
            .method("GET")
            .uri("/v1/models?x=1")
            .header("host", "a")
            .body(Body::empty())
            .unwrap_or_default();
        // "GET /v1/models?x=1 HTTP/1.1\r\n" + "host: a\r\n" + "\r\n"
        assert_eq!(head_bytes(&req), 29 + 9 + 2);
    }

    #[test]
    fn the_transport_cap_leaves_room_for_the_envelope() {
        assert!(transport_header_cap(64 * 1024) >= 256 * 1024);
        assert!(transport_header_cap(8 * 1024) > 8 * 1024 + 100 * 1024);
    }
}
