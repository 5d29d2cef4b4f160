//! triage: an OpenAI-compatible LLM gateway that classifies each request with
//! a small in-process model, routes it to a tier of models by rule, and
//! enforces per-key rate and spend ceilings. The request path is documented
//! once, in `server/mod.rs`.

// Request errors are built on the cold path; boxing them would add an
// allocation to every error for nothing.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod cache;
pub mod classify;
pub mod config;
pub mod guard;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod route;
pub mod server;
pub mod store;
pub mod upstream;
pub mod usage;
pub mod vote;

use std::sync::Arc;

/// Errors that stop the gateway from starting (never seen by clients).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("provider {0}: {1}")]
    Provider(String, String),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Builds the gateway state from a validated config.
pub fn build_state(config: config::Config) -> Result<Arc<server::state::AppState>, StartupError> {
    Ok(Arc::new(server::state::AppState::new(config)?))
}

/// Re-reads a config file and swaps it in; on any error the running config stays.
pub fn reload_from_file(
    state: &server::state::AppState,
    path: &std::path::Path,
) -> Result<Vec<String>, StartupError> {
    let cfg = config::Config::load(path)?;
    let warnings = cfg.warnings.clone();
    state.reload(cfg)?;
    Ok(warnings)
}
