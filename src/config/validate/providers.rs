//! `[providers.NAME]`.

use super::super::diag::Collector;
use super::super::load::Secrets;
use super::super::raw::*;
use super::super::types::*;
use super::{positive_duration, secret};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn validate_providers(
    v: &mut Collector,
    raw: &BTreeMap<String, RawProvider>,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> BTreeMap<String, Arc<ProviderConfig>> {
    let mut out = BTreeMap::new();
    for (name, p) in raw {
        let path = format!("providers.{name}");
        let kind = match p.kind {
            RawProviderKind::OpenAi => ProviderKind::OpenAi {
                base_url: base_url(v, &path, p, None),
                responses: p.responses.unwrap_or(false),
            },
            RawProviderKind::Anthropic => ProviderKind::Anthropic {
                base_url: base_url(v, &path, p, Some("https://api.anthropic.com/v1")),
                version: p
                    .anthropic_version
                    .clone()
                    .unwrap_or_else(|| "2023-06-01".to_string()),
                beta_allow: p.beta_allow.clone(),
            },
            RawProviderKind::Azure => {
                if let Some(ver) = &p.api_version {
                    if ver.is_empty() || !ver.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    {
                        v.err(format!("{path}.api_version"), "must look like 2024-10-21");
                    }
                }
                ProviderKind::Azure {
                    base_url: base_url(v, &path, p, None),
                    api_version: p.api_version.clone(),
                }
            }
            RawProviderKind::Mock => ProviderKind::Mock(MockSettings {
                latency: p.latency.unwrap_or_default(),
                tokens_per_second: p.tokens_per_second.unwrap_or(0),
                reply_words: p.reply_words.unwrap_or(24).clamp(1, 4096),
                api: p.api.unwrap_or_default(),
            }),
        };
        // Settings that only one kind reads are errors elsewhere, not silently ignored.
        let only = |field: &str, set: bool, kind: RawProviderKind, what: &str| {
            (set && p.kind != kind).then(|| {
                (
                    format!("{path}.{field}"),
                    format!("only valid with kind = \"{what}\""),
                )
            })
        };
        for (f, msg) in [
            only(
                "responses",
                p.responses.is_some(),
                RawProviderKind::OpenAi,
                "openai",
            ),
            only(
                "api_version",
                p.api_version.is_some(),
                RawProviderKind::Azure,
                "azure",
            ),
            only(
                "anthropic_version",
                p.anthropic_version.is_some(),
                RawProviderKind::Anthropic,
                "anthropic",
            ),
            only(
                "beta_allow",
                !p.beta_allow.is_empty(),
                RawProviderKind::Anthropic,
                "anthropic",
            ),
            only("api", p.api.is_some(), RawProviderKind::Mock, "mock"),
        ]
        .into_iter()
        .flatten()
        {
            v.err(f, msg);
        }
        let api_key = p
            .api_key_env
            .as_ref()
            .and_then(|var| secret(v, &format!("{path}.api_key_env"), var, env, secrets));
        let mut headers = Vec::new();
        for (h, val) in &p.headers {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err()
                || http::HeaderValue::from_str(val).is_err()
            {
                v.err(format!("{path}.headers.{h}"), "not a valid HTTP header");
            } else {
                headers.push((h.clone(), val.clone()));
            }
        }
        out.insert(
            name.clone(),
            Arc::new(ProviderConfig {
                name: name.clone(),
                kind,
                api_key,
                headers,
                connect_timeout: positive_duration(
                    v,
                    &format!("{path}.connect_timeout"),
                    p.connect_timeout,
                    Duration::from_secs(5),
                ),
                first_byte_timeout: positive_duration(
                    v,
                    &format!("{path}.first_byte_timeout"),
                    p.first_byte_timeout,
                    Duration::from_secs(60),
                ),
                total_timeout: positive_duration(
                    v,
                    &format!("{path}.total_timeout"),
                    p.total_timeout,
                    Duration::from_secs(600),
                ),
                retries: p.retries.unwrap_or(0).min(5),
            }),
        );
    }
    out
}

/// `base_url` without its trailing slash; required unless the kind has a default.
fn base_url(v: &mut Collector, path: &str, p: &RawProvider, default: Option<&str>) -> String {
    let base = p
        .base_url
        .clone()
        .or_else(|| default.map(str::to_string))
        .unwrap_or_default();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        v.err(
            format!("{path}.base_url"),
            "required, must start with http:// or https://",
        );
    }
    base.trim_end_matches('/').to_string()
}
