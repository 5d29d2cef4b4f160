//! `[models.NAME]`.

use super::super::diag::Collector;
use super::super::raw::*;
use super::super::types::*;
use super::price_nanos;
use std::collections::BTreeMap;
use std::sync::Arc;

pub(super) fn validate_models(
    v: &mut Collector,
    raw: &BTreeMap<String, RawModel>,
    providers: &BTreeMap<String, Arc<ProviderConfig>>,
) -> BTreeMap<String, Arc<ModelConfig>> {
    let mut out = BTreeMap::new();
    for (name, m) in raw {
        let path = format!("models.{name}");
        if !providers.contains_key(&m.provider) {
            v.err(
                format!("{path}.provider"),
                format!("unknown provider {:?}", m.provider),
            );
        }
        for (i, f) in m.fallbacks.iter().enumerate() {
            if !raw.contains_key(f) {
                v.err(
                    format!("{path}.fallbacks[{i}]"),
                    format!("unknown model {f:?}"),
                );
            } else if f == name {
                v.err(
                    format!("{path}.fallbacks[{i}]"),
                    "a model cannot fall back to itself",
                );
            }
        }
        let input = price_nanos(v, &format!("{path}.price.input"), m.price.input);
        let cached_input = match m.price.cached_input {
            Some(c) => price_nanos(v, &format!("{path}.price.cached_input"), c),
            None => input,
        };
        let cache_write = match m.price.cache_write {
            Some(c) => price_nanos(v, &format!("{path}.price.cache_write"), c),
            None => input,
        };
        let output = price_nanos(v, &format!("{path}.price.output"), m.price.output);
        out.insert(
            name.clone(),
            Arc::new(ModelConfig {
                name: name.clone(),
                provider: m.provider.clone(),
                upstream_model: m.upstream_model.clone().unwrap_or_else(|| name.clone()),
                price: Price {
                    input,
                    cached_input,
                    cache_write,
                    output,
                },
                max_output_tokens: m.max_output_tokens.unwrap_or(4096),
                fallbacks: m.fallbacks.clone(),
                weight: m.weight.unwrap_or(1),
            }),
        );
    }
    out
}
