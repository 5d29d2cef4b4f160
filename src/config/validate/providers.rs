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
            RawProviderKind::OpenAi => {
                let base = p.base_url.clone().unwrap_or_default();
                if !(base.starts_with("http://") || base.starts_with("https://")) {
                    v.err(
                        format!("{path}.base_url"),
                        "required, must start with http:// or https://",
                    );
                }
                ProviderKind::OpenAi {
                    base_url: base.trim_end_matches('/').to_string(),
                }
            }
            RawProviderKind::Mock => ProviderKind::Mock(MockSettings {
                latency: p.latency.unwrap_or_default(),
                tokens_per_second: p.tokens_per_second.unwrap_or(0),
                reply_words: p.reply_words.unwrap_or(24).clamp(1, 4096),
            }),
        };
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
