//! `[keys.NAME]` and `[teams.NAME]`.

use super::super::diag::Collector;
use super::super::load::Secrets;
use super::super::raw::*;
use super::super::types::*;
use super::{price_nanos, secret};
use std::collections::BTreeMap;

/// The hash of a key whose secret is not in the environment (`Secrets::Optional` only).
const PLACEHOLDER: [u8; 32] = [0; 32];

pub(super) fn validate_limits(
    v: &mut Collector,
    path: &str,
    rpm: Option<u32>,
    tpm: Option<u64>,
    max_parallel: Option<u32>,
    budget: Option<f64>,
    period: Option<BudgetPeriodKind>,
) -> LimitsConfig {
    for (field, val) in [
        ("rpm", rpm.map(u64::from)),
        ("tpm", tpm),
        ("max_parallel", max_parallel.map(u64::from)),
    ] {
        if val == Some(0) {
            v.err(
                format!("{path}.{field}"),
                "must be greater than zero (omit it for no limit)",
            );
        }
    }
    let budget_nanos = budget.map(|b| price_nanos(v, &format!("{path}.budget"), b));
    let period = period.or(budget.map(|_| BudgetPeriodKind::Total));
    LimitsConfig {
        rpm,
        tpm,
        max_parallel,
        budget_nanos,
        period,
    }
}

pub(super) fn validate_keys(
    v: &mut Collector,
    raw: &RawConfig,
    teams: &BTreeMap<String, LimitsConfig>,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Vec<KeyConfig> {
    use sha2::Digest;
    let mut out = Vec::new();
    let mut seen_hashes = BTreeMap::new();
    for (name, k) in &raw.keys {
        let path = format!("keys.{name}");
        let sha = match (&k.key_sha256, &k.key_env) {
            (Some(h), None) => match hex::decode(h.trim()) {
                Ok(b) if b.len() == 32 => {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(&b);
                    Some(a)
                }
                _ => {
                    v.err(
                        format!("{path}.key_sha256"),
                        "must be 64 hex characters (see `triage keys new`)",
                    );
                    None
                }
            },
            (None, Some(var)) => match secret(v, &format!("{path}.key_env"), var, env, secrets) {
                Some(s) => Some(sha2::Sha256::digest(s.as_bytes()).into()),
                // `check`/`spend` still list the key; no client key hashes to zeros.
                None if secrets == Secrets::Optional => Some(PLACEHOLDER),
                None => None,
            },
            (Some(_), Some(_)) => {
                v.err(&path, "set either key_sha256 or key_env, not both");
                None
            }
            (None, None) => {
                v.err(&path, "needs key_sha256 or key_env");
                None
            }
        };
        if let Some(t) = &k.team {
            if !teams.contains_key(t) {
                v.err(format!("{path}.team"), format!("unknown team {t:?}"));
            }
        }
        for (i, a) in k.allow.iter().enumerate() {
            if !raw.routers.contains_key(a) && !raw.models.contains_key(a) {
                v.err(
                    format!("{path}.allow[{i}]"),
                    format!("unknown router or model {a:?}"),
                );
            }
        }
        let limits = validate_limits(v, &path, k.rpm, k.tpm, k.max_parallel, k.budget, k.period);
        if let Some(sha) = sha {
            if sha == PLACEHOLDER {
            } else if let Some(other) = seen_hashes.insert(sha, name.clone()) {
                v.err(&path, format!("same secret as keys.{other}"));
            }
            if let Some(g) = &k.guard {
                v.absorb(g.validate(&format!("{path}.guard")));
            }
            out.push(KeyConfig {
                name: name.clone(),
                sha256: sha,
                team: k.team.clone(),
                allow: k.allow.clone(),
                limits,
                guard: k.guard.clone(),
            });
        }
    }
    out
}

pub(super) fn validate_teams(v: &mut Collector, raw: &RawConfig) -> BTreeMap<String, LimitsConfig> {
    raw.teams
        .iter()
        .map(|(name, t)| {
            let path = format!("teams.{name}");
            let l = validate_limits(v, &path, t.rpm, t.tpm, t.max_parallel, t.budget, t.period);
            (name.clone(), l)
        })
        .collect()
}
