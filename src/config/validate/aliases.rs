//! `[aliases]`.

use super::super::diag::Collector;
use super::super::types::*;
use std::collections::BTreeMap;
use std::sync::Arc;

pub(super) fn validate_aliases(
    v: &mut Collector,
    raw: &indexmap::IndexMap<String, String>,
    routers: &BTreeMap<String, Arc<RouterConfig>>,
    models: &BTreeMap<String, Arc<ModelConfig>>,
) -> Aliases {
    let mut out = Aliases::default();
    for (name, target) in raw {
        let path = format!("aliases.{name:?}");
        if name.trim().is_empty() {
            v.err(&path, "an alias name must not be empty");
            continue;
        }
        if !routers.contains_key(target) && !models.contains_key(target) {
            v.err(
                &path,
                format!("target {target:?} is neither a router nor a model"),
            );
            continue;
        }
        if routers.contains_key(name) || models.contains_key(name) {
            v.err(
                &path,
                format!("{name:?} is already a router or model name; an alias cannot shadow it"),
            );
            continue;
        }
        if !name.contains(['*', '?']) {
            out.exact.insert(name.clone(), target.clone());
            continue;
        }
        match glob_regex(name) {
            Ok(matcher) => out.globs.push(AliasGlob {
                pattern: name.clone(),
                matcher,
                target: target.clone(),
            }),
            Err(e) => v.err(&path, format!("not a usable pattern: {e}")),
        }
    }
    out
}
