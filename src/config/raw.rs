//! The TOML schema exactly as users write it. Everything here is parsed with
//! `deny_unknown_fields`; closed sets of words are enums, so a typo is a parse
//! error with its key path. `validate/` turns this into the runtime types.

use super::types::{
    AuthMode, BudgetPeriodKind, CacheScope, InputMode, OnUnavailable, TierStrategy,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    /// `auth = "keys"` (default) or `"none"` (no authentication, must be
    /// explicit); or a table `[auth] mode = "keys", max_failures_per_minute = 30`.
    pub auth: Option<RawAuth>,
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub models: BTreeMap<String, RawModel>,
    #[serde(default)]
    pub tiers: BTreeMap<String, RawTier>,
    #[serde(default)]
    pub routers: BTreeMap<String, RawRouter>,
    #[serde(default)]
    pub classifiers: BTreeMap<String, RawClassifier>,
    #[serde(default)]
    pub keys: BTreeMap<String, RawKey>,
    /// Client model names → a router or model: exact names or globs (`*`,
    /// `?`), e.g. `"claude-*" = "auto"`. In file order: the first glob that
    /// matches wins; exact names win over globs.
    #[serde(default)]
    pub aliases: indexmap::IndexMap<String, String>,
    #[serde(default)]
    pub teams: BTreeMap<String, RawTeam>,
    pub cache: Option<RawCache>,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub store: RawStore,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line + headers) accepted.
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// `pretty` (default; plain text when stdout is not a terminal) or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    pub log_level: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            shutdown_grace: default_grace(),
            header_read_timeout: default_header_timeout(),
            max_header_bytes: default_max_header(),
            log_format: LogFormat::default(),
            log_level: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_body() -> usize {
    4 * 1024 * 1024
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header() -> usize {
    64 * 1024
}
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawProviderKind {
    /// Any OpenAI-compatible HTTP API.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages API (`/v1/messages`).
    Anthropic,
    /// Azure OpenAI: deployment URLs with `api_version`, the v1 API without.
    Azure,
    /// Built in, no network.
    Mock,
}

/// Which API the built-in mock speaks at its provider's chat endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MockApi {
    #[default]
    Chat,
    Anthropic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Memory,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: RawProviderKind,
    pub base_url: Option<String>,
    /// Name of the env var holding the API key; the key itself never lives in the file.
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Time until the first byte of the upstream body.
    #[serde(default, with = "humantime_serde")]
    pub first_byte_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub total_timeout: Option<Duration>,
    /// Extra attempts on the same deployment before moving on (before the first byte only).
    pub retries: Option<u32>,
    /// `kind = "openai"`: the upstream also speaks the Responses API.
    pub responses: Option<bool>,
    /// `kind = "azure"`: `api-version` query; without it the v1 API is used.
    pub api_version: Option<String>,
    /// `kind = "anthropic"`: the `anthropic-version` header.
    pub anthropic_version: Option<String>,
    /// `kind = "anthropic"`: client `anthropic-beta` flags passed on; others are dropped.
    #[serde(default)]
    pub beta_allow: Vec<String>,
    /// `kind = "mock"`: `chat` (default) or `anthropic`.
    pub api: Option<MockApi>,
    // Mock-only knobs.
    #[serde(default, with = "humantime_serde")]
    pub latency: Option<Duration>,
    pub tokens_per_second: Option<u32>,
    pub reply_words: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub provider: String,
    pub upstream_model: Option<String>,
    #[serde(default)]
    pub price: RawPrice,
    /// Output cap assumed for budget reservations when a request sets no max tokens.
    pub max_output_tokens: Option<u64>,
    /// Tried in order when this model is requested directly and fails before the first byte.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Relative weight under the `weighted` tier strategy.
    pub weight: Option<u32>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    #[serde(default)]
    pub input: f64,
    pub cached_input: Option<f64>,
    /// Prompt-cache writes (Anthropic); defaults to `input`.
    pub cache_write: Option<f64>,
    #[serde(default)]
    pub output: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub models: Vec<String>,
    /// `ordered` (default), `weighted`, `least_latency`.
    pub strategy: Option<TierStrategy>,
    pub fallback_tier: Option<String>,
    /// Consecutive failures before a deployment is put in cooldown.
    pub cooldown_after: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouter {
    /// `embedded` (default), `llm`, `rules`, `none`, or the name of a `[classifiers.X]`.
    pub classifier: Option<String>,
    pub min_confidence: Option<f64>,
    pub unknown_tier: String,
    pub input: Option<InputMode>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    /// `llm` classifier: the model that picks the label.
    pub classifier_model: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub classifier_timeout: Option<Duration>,
    /// `rules` classifier: label -> regexes, tried in the order written.
    #[serde(default)]
    pub keywords: indexmap::IndexMap<String, Vec<String>>,
    pub cache: Option<RawCacheOverride>,
    pub vote: Option<crate::vote::VoteConfig>,
    pub cascade: Option<crate::vote::CascadeConfig>,
    pub guard: Option<crate::guard::GuardConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub when: Option<RawWhen>,
    pub tier: String,
    pub vote: Option<crate::vote::VoteConfig>,
    pub cascade: Option<crate::vote::CascadeConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawWhen {
    pub label: Option<OneOrMany>,
    pub min_confidence: Option<f64>,
    pub min_prompt_tokens: Option<u64>,
    pub max_prompt_tokens: Option<u64>,
    pub has_tools: Option<bool>,
    pub has_images: Option<bool>,
    pub json_response: Option<bool>,
    pub min_turns: Option<u32>,
    pub max_turns: Option<u32>,
    pub key: Option<OneOrMany>,
    /// `{ name = "x-tenant", value = "gold" }`; value omitted = header present.
    pub header: Option<RawHeaderMatch>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    pub name: String,
    pub value: Option<String>,
}

/// A custom label set: from a trained model file, or example utterances per label.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClassifier {
    pub model_file: Option<String>,
    #[serde(default)]
    pub examples: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub key_sha256: Option<String>,
    pub key_env: Option<String>,
    pub team: Option<String>,
    /// Routers and models this key may use; empty = all.
    #[serde(default)]
    pub allow: Vec<String>,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_parallel: Option<u32>,
    /// USD per `period`.
    pub budget: Option<f64>,
    /// `daily`, `weekly`, `monthly` or `total` (default).
    pub period: Option<BudgetPeriodKind>,
    pub guard: Option<crate::guard::GuardConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTeam {
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_parallel: Option<u32>,
    /// USD per `period`.
    pub budget: Option<f64>,
    pub period: Option<BudgetPeriodKind>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub max_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// `per_key` (default) or `shared`.
    pub scope: Option<CacheScope>,
    /// Allow caching `n > 1` with temperature > 0.
    #[serde(default)]
    pub cache_sampled: bool,
    /// Also keep entries in Redis, shared by every replica (needs `[store] kind = "redis"`).
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub models: BTreeMap<String, RawCacheOverride>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheOverride {
    pub enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Separate /metrics listener (default `127.0.0.1:9464`; `"off"` for none).
    pub listen: Option<String>,
    /// Set false to hide /metrics entirely.
    pub enabled: Option<bool>,
    /// Also serve /metrics on the API listener to callers presenting
    /// `Authorization: Bearer <value of this variable>`.
    pub token_env: Option<String>,
    /// Also serve /metrics on the API listener to anyone (explicit opt-in).
    pub public: Option<bool>,
}

/// `auth` as a bare mode string or as a table.
#[derive(Debug, Clone, Default)]
pub struct RawAuth {
    pub mode: Option<AuthMode>,
    pub max_failures_per_minute: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthTable {
    mode: Option<AuthMode>,
    max_failures_per_minute: Option<u32>,
}

impl<'de> Deserialize<'de> for RawAuth {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawAuth;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"keys\", \"none\" or a table with mode / max_failures_per_minute")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawAuth, E> {
                use serde::de::IntoDeserializer;
                Ok(RawAuth {
                    mode: Some(AuthMode::deserialize(v.into_deserializer())?),
                    max_failures_per_minute: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawAuth, A::Error> {
                let t =
                    RawAuthTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawAuth {
                    mode: t.mode,
                    max_failures_per_minute: t.max_failures_per_minute,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `sqlite` (default), `memory` (nothing durable; tests and demos) or `redis` (limits shared
    /// by every replica; the spend ledger stays local under `state_dir`).
    #[serde(default)]
    pub kind: StoreKind,
    pub state_dir: Option<String>,
    /// `redis`: server address, e.g. `redis://127.0.0.1:6379/`.
    pub url: Option<String>,
    /// `redis`: `fail_closed` (default: refuse with 503) or `fail_open` (local limits) while
    /// Redis is unreachable.
    pub on_unavailable: Option<OnUnavailable>,
    /// `redis`: prefix of every key the gateway writes (default `triage`).
    pub key_prefix: Option<String>,
    /// `redis`: a reservation (and parallel slot) whose replica never settled it is released
    /// after this long (default `10m`).
    #[serde(default, with = "humantime_serde")]
    pub reservation_ttl: Option<Duration>,
    /// `redis`: connect, read and write timeout of one call (default `250ms`).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// How long stored Responses (`store: true`) are kept (default `30d`, as OpenAI).
    #[serde(default, with = "humantime_serde")]
    pub responses_retention: Option<Duration>,
}
