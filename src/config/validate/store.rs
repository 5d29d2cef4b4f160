//! `[store]`.

use super::super::diag::Collector;
use super::super::raw::*;
use super::super::types::*;
use super::positive_duration;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `store.responses_retention` (default 30 days, as OpenAI keeps stored responses).
pub(super) fn responses_retention(v: &mut Collector, raw: &RawStore) -> Duration {
    positive_duration(
        v,
        "store.responses_retention",
        raw.responses_retention,
        crate::store::responses::DEFAULT_RETENTION,
    )
}

pub(super) fn validate_store(
    v: &mut Collector,
    raw: &RawStore,
    providers: &BTreeMap<String, Arc<ProviderConfig>>,
) -> StoreConfig {
    // Relative to the working directory, like any server's data dir.
    let state_dir = PathBuf::from(raw.state_dir.as_deref().unwrap_or("state"));
    let kind = raw.kind;
    if kind != StoreKind::Redis {
        let redis_only = [
            ("url", raw.url.is_some()),
            ("on_unavailable", raw.on_unavailable.is_some()),
            ("key_prefix", raw.key_prefix.is_some()),
            ("reservation_ttl", raw.reservation_ttl.is_some()),
            ("timeout", raw.timeout.is_some()),
        ];
        for (field, set) in redis_only {
            if set {
                v.err(format!("store.{field}"), "only applies to kind = \"redis\"");
            }
        }
    }
    match kind {
        StoreKind::Sqlite => StoreConfig::Sqlite { state_dir },
        StoreKind::Memory => StoreConfig::Memory,
        StoreKind::Redis => {
            let url = match raw.url.as_deref() {
                None => {
                    v.err(
                        "store.url",
                        "required for kind = \"redis\" (e.g. \"redis://127.0.0.1:6379/\")",
                    );
                    String::new()
                }
                Some(u)
                    if !(u.starts_with("redis://")
                        || u.starts_with("redis+unix://")
                        || u.starts_with("unix://")) =>
                {
                    v.err(
                        "store.url",
                        format!("{u:?} is not a redis:// or unix:// URL (TLS is not supported)"),
                    );
                    u.to_string()
                }
                Some(u) => {
                    if let Err(e) = redis::Client::open(u) {
                        v.err("store.url", format!("{u:?}: {e}"));
                    }
                    u.to_string()
                }
            };
            let on_unavailable = raw.on_unavailable.unwrap_or(OnUnavailable::FailClosed);
            let key_prefix = raw
                .key_prefix
                .clone()
                .unwrap_or_else(|| "triage".to_string());
            if key_prefix.is_empty()
                || key_prefix.len() > 64
                || !key_prefix
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '{' && c != '}')
            {
                v.err(
                    "store.key_prefix",
                    format!("{key_prefix:?}: 1 to 64 visible ASCII characters, no braces"),
                );
            }
            let reservation_ttl = positive_duration(
                v,
                "store.reservation_ttl",
                raw.reservation_ttl,
                Duration::from_secs(600),
            );
            if reservation_ttl < Duration::from_secs(1) {
                v.err("store.reservation_ttl", "must be at least 1s");
            }
            let timeout =
                positive_duration(v, "store.timeout", raw.timeout, Duration::from_millis(250));
            // A reservation that expires while its request still runs frees budget too early.
            if let Some((name, longest)) = providers
                .iter()
                .map(|(n, p)| (n, p.total_timeout))
                .max_by_key(|(_, t)| *t)
            {
                if longest > reservation_ttl {
                    v.warn("store.reservation_ttl", format!(
                        "{} is shorter than providers.{name}.total_timeout ({}); requests running longer lose their reservation",
                        humantime::format_duration(reservation_ttl),
                        humantime::format_duration(longest)
                    ));
                }
            }
            StoreConfig::Redis {
                url,
                on_unavailable,
                key_prefix,
                reservation_ttl,
                timeout,
                state_dir,
            }
        }
    }
}
