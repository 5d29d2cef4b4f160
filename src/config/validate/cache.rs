//! `[cache]`.

use super::super::diag::Collector;
use super::super::raw::*;
use super::super::types::*;
use super::positive_duration;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn validate_cache(
    v: &mut Collector,
    raw: Option<&RawCache>,
    models: &BTreeMap<String, Arc<ModelConfig>>,
) -> CacheConfig {
    let Some(c) = raw else {
        return CacheConfig {
            enabled: false,
            max_bytes: 0,
            ttl: Duration::from_secs(300),
            scope: CacheScope::PerKey,
            cache_sampled: false,
            shared: false,
            models: BTreeMap::new(),
        };
    };
    let scope = c.scope.unwrap_or(CacheScope::PerKey);
    for m in c.models.keys() {
        if !models.contains_key(m) {
            v.err(format!("cache.models.{m}"), format!("unknown model {m:?}"));
        }
    }
    CacheConfig {
        enabled: c.enabled,
        max_bytes: c.max_bytes.unwrap_or(64 * 1024 * 1024),
        ttl: positive_duration(v, "cache.ttl", c.ttl, Duration::from_secs(300)),
        scope,
        cache_sampled: c.cache_sampled,
        shared: c.shared,
        models: c
            .models
            .iter()
            .map(|(k, o)| {
                (
                    k.clone(),
                    CacheOverride {
                        enabled: o.enabled,
                        ttl: o.ttl,
                    },
                )
            })
            .collect(),
    }
}
