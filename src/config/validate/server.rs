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

pub(super) fn validate_metrics(v: &mut Collector, m: &RawMetrics) -> MetricsConfig {
    if let Some(l) = &m.listen {
        if l.parse::<std::net::SocketAddr>().is_err() {
            v.err("metrics.listen", format!("not a socket address: {l:?}"));
        }
    }
    MetricsConfig {
        enabled: m.enabled.unwrap_or(true),
        listen: m.listen.clone(),
    }
}
