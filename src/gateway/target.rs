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
pub fn resolve(rt: &Runtime, caller: &Caller, model: &str) -> Result<Target, GatewayError> {
    let target = if let Some(r) = rt.config.routers.get(model) {
        Target::Router(r.clone())
    } else if let Some(m) = rt.config.models.get(model) {
        Target::Model(m.clone())
    } else {
        return Err(GatewayError::model_not_found(model));
    };
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
