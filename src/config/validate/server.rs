//! `[server]` and `[metrics]`.

use super::super::diag::Collector;
use super::super::raw::*;
use super::super::types::*;
use super::positive_duration;
use std::time::Duration;

pub(super) fn validate_server(v: &mut Collector, s: &RawServer) -> ServerConfig {
    if s.listen.parse::<std::net::SocketAddr>().is_err() {
        v.err(
            "server.listen",
            format!("not a socket address: {:?}", s.listen),
        );
    }
    if s.max_body_bytes == 0 {
        v.err("server.max_body_bytes", "must be greater than zero");
    }
    let log_json = s.log_format == LogFormat::Json;
    ServerConfig {
        listen: s.listen.clone(),
        max_body_bytes: s.max_body_bytes,
        shutdown_grace: s.shutdown_grace,
        header_read_timeout: positive_duration(
            v,
            "server.header_read_timeout",
            Some(s.header_read_timeout),
            Duration::from_secs(10),
        ),
        max_header_bytes: s.max_header_bytes.max(8 * 1024),
        log_json,
        log_level: s.log_level.clone(),
    }
}

/// /metrics names every key and team with their spend: by default it is served
/// only on a loopback listener; the API listener serves it only behind a
/// token (`token_env`) or when `public = true` says so explicitly.
pub(super) fn validate_metrics(
    v: &mut Collector,
    raw: &RawMetrics,
    env: &dyn Fn(&str) -> Option<String>,
) -> MetricsConfig {
    let listen = match raw.listen.as_deref() {
        None => Some(DEFAULT_METRICS_LISTEN.to_string()),
        Some("off") | Some("") => None,
        Some(l) => {
            if l.parse::<std::net::SocketAddr>().is_err() {
                v.err(
                    "metrics.listen",
                    format!("not a socket address: {l:?} (or \"off\")"),
                );
            }
            Some(l.to_string())
        }
    };
    let token_sha256 = raw.token_env.as_ref().and_then(|var| match env(var) {
        Some(t) if !t.trim().is_empty() => {
            use sha2::Digest;
            Some(sha2::Sha256::digest(t.trim().as_bytes()).into())
        }
        Some(_) => {
            v.err(
                "metrics.token_env",
                format!("environment variable {var} is empty"),
            );
            None
        }
        None => {
            v.err(
                "metrics.token_env",
                format!("environment variable {var} is not set"),
            );
            None
        }
    });
    let public = raw.public.unwrap_or(false);
    if public && raw.token_env.is_some() {
        v.err(
            "metrics.public",
            "choose one: public = true serves /metrics to anyone, token_env only to token holders",
        );
    }
    MetricsConfig {
        enabled: raw.enabled.unwrap_or(true),
        listen,
        listen_explicit: raw.listen.is_some(),
        token_sha256,
        public,
    }
}
