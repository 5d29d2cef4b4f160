//! The one error of the request path, as plain data: each edge renders it
//! in its own protocol's envelope (`server/error.rs` for OpenAI).

use bytes::Bytes;

#[derive(Debug, Clone)]
pub struct GatewayError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, `rate_limit_error`, …).
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds the client should wait before retrying.
    pub retry_after: Option<u64>,
    /// Further response headers (rate-limit state, loop and session findings).
    pub headers: Vec<(&'static str, String)>,
    /// An upstream's own error body, passed through verbatim instead of our envelope.
    pub raw: Option<Bytes>,
    /// Deployments called and abandoned before giving up (for `x-triage-route`).
    pub tried: Vec<String>,
    /// Deployments passed over because they were cooling down.
    pub cooling: Vec<String>,
}

impl GatewayError {
    pub fn new(
        status: u16,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        GatewayError {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
            retry_after: None,
            headers: Vec::new(),
            raw: None,
            tried: Vec::new(),
            cooling: Vec::new(),
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", None, message)
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", Some("invalid_value"), message).with_param(param)
    }

    pub fn invalid_key(message: impl Into<String>) -> Self {
        Self::new(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            message,
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            403,
            "invalid_request_error",
            Some("model_not_allowed"),
            message,
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    pub fn not_found() -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("not_found"),
            "Unknown endpoint.",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "invalid_request_error",
            Some("method_not_allowed"),
            "Method not allowed for this endpoint.",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            format!("Request body is larger than the {limit}-byte limit."),
        )
    }

    /// 502 `upstream_error`: the provider answered with a 5xx.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "api_error", Some("upstream_error"), message)
    }

    /// 502 `upstream_unreachable`: no connection to the provider.
    pub fn upstream_unreachable(model: &str) -> Self {
        Self::new(
            502,
            "api_error",
            Some("upstream_unreachable"),
            format!("The provider for `{model}` could not be reached."),
        )
    }

    /// 502 `upstream_invalid_response`: the provider's answer broke off or is not what we asked for.
    pub fn upstream_invalid_response(model: &str) -> Self {
        Self::new(
            502,
            "api_error",
            Some("upstream_invalid_response"),
            format!("The provider for `{model}` returned an invalid response."),
        )
    }

    /// 504 `upstream_timeout`.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, "api_error", Some("upstream_timeout"), message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "api_error", Some("no_healthy_deployment"), message)
    }

    /// 503 `store_unavailable` (`fail_closed` while Redis is unreachable).
    pub fn store_unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "api_error", Some("store_unavailable"), message).with_retry_after(1)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "api_error", Some("internal_error"), message)
    }
}

impl From<crate::protocol::ProtocolError> for GatewayError {
    fn from(e: crate::protocol::ProtocolError) -> Self {
        match e.field {
            Some(f) => GatewayError::invalid_param(&f, e.message),
            None => GatewayError::invalid_request(e.message),
        }
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}
