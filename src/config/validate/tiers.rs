//! `[tiers.NAME]`.

use super::super::diag::Collector;
use super::super::raw::*;
use super::super::types::*;
use super::{known, positive_duration};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

pub(super) fn validate_tiers(
    v: &mut Collector,
    raw: &BTreeMap<String, RawTier>,
    models: &BTreeMap<String, Arc<ModelConfig>>,
) -> BTreeMap<String, Arc<TierConfig>> {
    let mut out = BTreeMap::new();
    for (name, t) in raw {
        let path = format!("tiers.{name}");
        if t.models.is_empty() {
            v.err(format!("{path}.models"), "needs at least one model");
        }
        for (i, m) in t.models.iter().enumerate() {
            if !models.contains_key(m) {
                v.err(
                    format!("{path}.models[{i}]"),
                    format!("unknown model {m:?}"),
                );
            }
        }
        let strategy = t.strategy.unwrap_or(TierStrategy::Ordered);
        if let Some(f) = &t.fallback_tier {
            if !raw.contains_key(f) {
                v.err(
                    format!("{path}.fallback_tier"),
                    format!("unknown tier {f:?} (known: {})", known(raw.keys())),
                );
            } else if f == name {
                v.err(
                    format!("{path}.fallback_tier"),
                    "a tier cannot fall back to itself",
                );
            }
        }
        out.insert(
            name.clone(),
            Arc::new(TierConfig {
                name: name.clone(),
                models: t.models.clone(),
                strategy,
                fallback_tier: t.fallback_tier.clone(),
                cooldown_after: t.cooldown_after.unwrap_or(3).max(1),
                cooldown: positive_duration(
                    v,
                    &format!("{path}.cooldown"),
                    t.cooldown,
                    Duration::from_secs(30),
                ),
            }),
        );
    }
    // Fallback chains must end: a cycle would bounce a request forever.
    for name in raw.keys() {
        let mut seen = BTreeSet::new();
        let mut cur = Some(name.clone());
        while let Some(c) = cur {
            if !seen.insert(c.clone()) {
                v.err(
                    format!("tiers.{name}.fallback_tier"),
                    "fallback chain forms a cycle",
                );
                break;
            }
            cur = raw.get(&c).and_then(|t| t.fallback_tier.clone());
        }
    }
    out
}
