//! Step 1: what `model` names, and whether the caller may use it.

use super::state::Runtime;
use super::{Caller, GatewayError};
use crate::config::{ModelConfig, RouterConfig};
use std::sync::Arc;

/// What `model` named.
pub enum Target {
    Router(Arc<RouterConfig>),
    Model(Arc<ModelConfig>),
}

/// Router or model, and may this key use it (404/403).
/// An `[aliases]` name is looked up last (router and model names win) and
/// the key's permission is checked on what it resolves to.
pub fn resolve(rt: &Runtime, caller: &Caller, requested: &str) -> Result<Target, GatewayError> {
    let (target, model) =
        lookup(&rt.config, requested).ok_or_else(|| GatewayError::model_not_found(requested))?;
    if let Some(k) = &caller.0 {
        if !k.may_use(model) {
            return Err(GatewayError::forbidden(format!(
                "Key `{}` may not use `{model}`.",
                k.name
            )));
        }
    }
    Ok(target)
}

/// A router, model or alias name → its target and the router or model name.
pub fn lookup<'a>(cfg: &'a crate::config::Config, name: &'a str) -> Option<(Target, &'a str)> {
    let direct = |n: &'a str| {
        if let Some(r) = cfg.routers.get(n) {
            Some((Target::Router(r.clone()), n))
        } else {
            cfg.models.get(n).map(|m| (Target::Model(m.clone()), n))
        }
    };
    direct(name).or_else(|| direct(cfg.aliases.resolve(name)?))
}
