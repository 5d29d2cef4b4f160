//! Renders the gateway's errors as OpenAI's error envelope
//! `{"error":{"message","type","param","code"}}` with their status.

pub use crate::gateway::GatewayError as ApiError;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderName, HeaderValue, StatusCode};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = match &self.raw {
            Some(raw) => (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                raw.clone(),
            )
                .into_response(),
            None => {
                let body = crate::protocol::openai::error::envelope(
                    &self.message,
                    self.kind,
                    self.param.as_deref(),
                    self.code,
                );
                (status, axum::Json(body)).into_response()
            }
        };
        resp.extensions_mut()
            .insert(ErrorCode(self.code.unwrap_or(self.kind)));
        let h = resp.headers_mut();
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        for (k, v) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.append(HeaderName::from_static(k), v);
            }
        }
        resp
    }
}

/// Marks a response as an error for the access log.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);
