//! Raw → runtime, one file per section. Every check writes into the shared
//! `Collector` with the key path of what it checked, so all problems come out
//! together and each can be located in the file.

mod aliases;
mod cache;
mod keys;
mod models;
mod providers;
mod routers;
mod server;
mod store;
mod tiers;

use super::diag::{Collector, ConfigErrors, Problem, Source};
use super::load::Secrets;
use super::raw::RawConfig;
use super::types::*;
use std::path::Path;
use std::time::Duration;

/// Validates a raw config; `env` looks up environment variables (injectable for tests).
pub fn validate(
    raw: RawConfig,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut c = Collector::default();
    let cfg = validate_into(raw, base_dir, env, Secrets::Required, &mut c);
    let src = Source {
        origin: None,
        text: "",
        tree: None,
    };
    match cfg {
        Some(mut cfg) if !c.has_errors() => {
            cfg.warnings = c.warnings.iter().map(Problem::line).collect();
            Ok(cfg)
        }
        _ => Err(ConfigErrors::from_problems(&c.problems, &src)),
    }
}

/// Validates into `v`; the `Config` is only meaningful when `v` has no errors.
pub(super) fn validate_into(
    raw: RawConfig,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
    v: &mut Collector,
) -> Option<Config> {
    let server = server::validate_server(v, &raw.server);
    // Keys are the default; turning authentication off has to be written out.
    let auth = raw
        .auth
        .as_ref()
        .and_then(|a| a.mode)
        .unwrap_or(AuthMode::Keys);
    let providers = providers::validate_providers(v, &raw.providers, env, secrets);
    let models = models::validate_models(v, &raw.models, &providers);
    let tiers = tiers::validate_tiers(v, &raw.tiers, &models);
    let routers = routers::validate_routers(v, &raw, &models, &tiers);
    for name in raw.routers.keys() {
        if raw.models.contains_key(name) {
            v.err(
                format!("routers.{name}"),
                format!("name {name:?} is also a model; router and model names must differ"),
            );
        }
    }
    let aliases = aliases::validate_aliases(v, &raw.aliases, &routers, &models);
    let classifiers = routers::validate_classifiers(v, &raw, base_dir);
    let teams = keys::validate_teams(v, &raw);
    let keys = keys::validate_keys(v, &raw, &teams, env, secrets);
    if auth == AuthMode::Keys && raw.keys.is_empty() {
        v.err(
            "keys",
            "no keys configured; add a [keys.NAME] (see `triage keys new`) or set auth = \"none\" explicitly",
        );
    }
    let cache = cache::validate_cache(v, raw.cache.as_ref(), &models);
    let metrics = server::validate_metrics(v, &raw.metrics, env);
    let store = store::validate_store(v, &raw.store, &providers);
    let responses_retention = store::responses_retention(v, &raw.store);
    if cache.shared {
        if !matches!(store, StoreConfig::Redis { .. }) {
            v.err(
                "cache.shared",
                "needs [store] kind = \"redis\" (the shared tier lives in Redis)",
            );
        } else if !cache.enabled {
            v.warn("cache.shared", "has no effect while cache.enabled = false");
        }
    }
    Some(Config {
        server,
        auth,
        providers,
        models,
        tiers,
        routers,
        classifiers,
        keys,
        aliases,
        teams,
        cache,
        metrics,
        max_auth_failures_per_minute: raw
            .auth
            .as_ref()
            .and_then(|a| a.max_failures_per_minute)
            .unwrap_or(DEFAULT_MAX_AUTH_FAILURES_PER_MINUTE),
        store,
        responses_retention,
        warnings: Vec::new(),
        base_dir: base_dir.to_path_buf(),
    })
}

/// An environment variable that must hold a secret: its value, or why not.
fn secret(
    v: &mut Collector,
    path: &str,
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Option<String> {
    let why = match env(var) {
        Some(s) if !s.is_empty() => return Some(s),
        Some(_) => format!("environment variable {var} is empty"),
        None => format!("environment variable {var} is not set"),
    };
    match secrets {
        Secrets::Required => v.err(path, why),
        Secrets::Optional => v.warn(path, format!("{why} (needed to serve)")),
    }
    None
}

fn positive_duration(
    v: &mut Collector,
    path: &str,
    d: Option<Duration>,
    default: Duration,
) -> Duration {
    match d {
        Some(d) if d.is_zero() => {
            v.err(path, "must be greater than zero");
            default
        }
        Some(d) => d,
        None => default,
    }
}

fn price_nanos(v: &mut Collector, path: &str, usd: f64) -> u64 {
    crate::limits::usd_f64_to_nanos(usd).unwrap_or_else(|_| {
        v.err(
            path,
            format!("must be a non-negative USD amount, got {usd}"),
        );
        0
    })
}

fn confidence(v: &mut Collector, path: &str, c: Option<f64>, default: f32) -> f32 {
    match c {
        Some(c) if !(0.0..=1.0).contains(&c) => {
            v.err(path, format!("must be between 0 and 1, got {c}"));
            default
        }
        Some(c) => c as f32,
        None => default,
    }
}

/// `"a", "b", "c"` for "known: ..." hints.
fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none defined".to_string()
    } else {
        names.join(", ")
    }
}
