//! Per-request cacheability decision.

use std::time::Duration;

use serde_json::{Map, Value};

/// What the response cache may do for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Look up; on a miss fetch and store.
    Use,
    /// Skip the lookup but store the fresh answer (`Cache-Control: no-cache`).
    Refresh,
    /// Neither look up nor store.
    Bypass,
}

/// Parsed request `Cache-Control` directives the cache honours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-store`: no lookup, no store.
    pub no_store: bool,
    /// `no-cache` (or `max-age=0`): revalidate, i.e. fetch fresh and store.
    pub no_cache: bool,
}

impl CacheControl {
    /// Parses a header value (several headers may be joined with `,`); unknown
    /// directives are ignored, matching is case-insensitive.
    pub fn parse(header: &str) -> Self {
        let mut cc = Self::default();
        for directive in header.split(',') {
            let d = directive.trim();
            let (name, arg) = match d.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (d, None),
            };
            if name.eq_ignore_ascii_case("no-store") {
                cc.no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache")
                || (name.eq_ignore_ascii_case("max-age") && arg == Some("0"))
            {
                cc.no_cache = true;
            }
        }
        cc
    }
}

/// Decides the cache mode for a chat-completion `body`.
///
/// - `cache_control`: the request's `Cache-Control` header value, if any.
/// - `allow_sampled_n`: cache even when `n > 1` with temperature > 0 (normally the
///   caller wants `n` *different* samples, so serving a stored set is wrong).
/// - `request_ttl`: per-request TTL override; `Some(0)` means "do not cache".
pub fn cache_mode(
    body: &Map<String, Value>,
    cache_control: Option<&str>,
    allow_sampled_n: bool,
    request_ttl: Option<Duration>,
) -> CacheMode {
    let cc = cache_control.map(CacheControl::parse).unwrap_or_default();
    if cc.no_store || request_ttl == Some(Duration::ZERO) {
        return CacheMode::Bypass;
    }
    if !allow_sampled_n && is_sampled_multi(body) {
        return CacheMode::Bypass;
    }
    if cc.no_cache {
        CacheMode::Refresh
    } else {
        CacheMode::Use
    }
}

/// True when the request asks for several samples at a non-zero temperature.
fn is_sampled_multi(body: &Map<String, Value>) -> bool {
    let n = match body.get("n") {
        None | Some(Value::Null) => 1.0,
        // A malformed `n` fails upstream anyway; be conservative meanwhile.
        Some(v) => v.as_f64().unwrap_or(f64::INFINITY),
    };
    if n <= 1.0 {
        return false;
    }
    // OpenAI's default temperature is 1.
    let temperature = match body.get("temperature") {
        None | Some(Value::Null) => 1.0,
        Some(v) => v.as_f64().unwrap_or(1.0),
    };
    temperature > 0.0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn cache_control_directives() {
        let b = body(json!({"messages": []}));
        assert_eq!(cache_mode(&b, None, false, None), CacheMode::Use);
        assert_eq!(
            cache_mode(&b, Some("no-store"), false, None),
            CacheMode::Bypass
        );
        assert_eq!(
            cache_mode(&b, Some("No-Cache"), false, None),
            CacheMode::Refresh
        );
        assert_eq!(
            cache_mode(&b, Some("max-age=0"), false, None),
            CacheMode::Refresh
        );
        assert_eq!(
            cache_mode(&b, Some("max-age=60"), false, None),
            CacheMode::Use
        );
        // no-store wins over no-cache.
        assert_eq!(
            cache_mode(&b, Some("no-cache, no-store"), false, None),
            CacheMode::Bypass
        );
        assert_eq!(
            cache_mode(&b, Some("private, foo=\"bar\""), false, None),
            CacheMode::Use
        );
    }

    #[test]
    fn sampled_n_bypasses_unless_allowed() {
        let multi = body(json!({"n": 3, "temperature": 0.7}));
        assert_eq!(cache_mode(&multi, None, false, None), CacheMode::Bypass);
        assert_eq!(cache_mode(&multi, None, true, None), CacheMode::Use);
        // Default temperature is 1.
        let multi_default = body(json!({"n": 2}));
        assert_eq!(
            cache_mode(&multi_default, None, false, None),
            CacheMode::Bypass
        );
        // Greedy decoding: n copies of the same answer are fine to cache.
        let greedy = body(json!({"n": 3, "temperature": 0}));
        assert_eq!(cache_mode(&greedy, None, false, None), CacheMode::Use);
        let single = body(json!({"n": 1, "temperature": 1.5}));
        assert_eq!(cache_mode(&single, None, false, None), CacheMode::Use);
        let bad = body(json!({"n": "lots", "temperature": 0.5}));
        assert_eq!(cache_mode(&bad, None, false, None), CacheMode::Bypass);
    }

    #[test]
    fn per_request_ttl_zero_bypasses() {
        let b = body(json!({}));
        assert_eq!(
            cache_mode(&b, None, false, Some(Duration::ZERO)),
            CacheMode::Bypass
        );
        assert_eq!(
            cache_mode(&b, None, false, Some(Duration::from_secs(5))),
            CacheMode::Use
        );
    }
}
