//! The validated runtime types the gateway reads. Nothing here is TOML-shaped:
//! closed sets are enums, money is nano-dollars, references are checked.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The labels of the shipped embedded classifier.
pub const DEFAULT_LABELS: &[&str] = &[
    "chat",
    "code",
    "extraction",
    "knowledge",
    "math",
    "reasoning",
    "writing",
];
/// The label given to anything the classifier is unsure about.
pub const UNKNOWN_LABEL: &str = "unknown";

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthMode,
    /// Failed authentications per client address per minute before refusing (0 = off).
    pub max_auth_failures_per_minute: u32,
    pub providers: BTreeMap<String, Arc<ProviderConfig>>,
    pub models: BTreeMap<String, Arc<ModelConfig>>,
    pub tiers: BTreeMap<String, Arc<TierConfig>>,
    pub routers: BTreeMap<String, Arc<RouterConfig>>,
    pub classifiers: BTreeMap<String, ClassifierConfig>,
    pub keys: Vec<KeyConfig>,
    /// Client model names resolved to a router or model (`[aliases]`).
    pub aliases: Aliases,
    pub teams: BTreeMap<String, LimitsConfig>,
    pub cache: CacheConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
    /// `[store] responses_retention`: how long stored Responses are kept.
    pub responses_retention: Duration,
    /// Non-fatal findings (unreachable rules...), logged at startup and printed by `check`.
    pub warnings: Vec<String>,
    /// Where relative paths in the file are resolved from.
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub log_json: bool,
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Keys,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi {
        base_url: String,
        /// The upstream speaks the Responses API too (recorded for native
        /// Responses passthrough; chat requests use its chat endpoint).
        responses: bool,
    },
    Anthropic {
        base_url: String,
        version: String,
        /// `anthropic-beta` flags a client may pass through.
        beta_allow: Vec<String>,
    },
    Azure {
        /// `https://NAME.openai.azure.com`, no trailing slash.
        base_url: String,
        /// Deployment URLs with `?api-version=` when set; the v1 API otherwise.
        api_version: Option<String>,
    },
    Mock(MockSettings),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MockSettings {
    pub latency: Duration,
    pub tokens_per_second: u32,
    pub reply_words: u32,
    /// `api = "anthropic"`: the provider speaks the Messages API to the mock.
    pub api: super::raw::MockApi,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub api_key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub total_timeout: Duration,
    pub retries: u32,
}

/// Nano-dollars per million tokens: the limits module's price, so cost is computed one way.
pub use crate::limits::Price;

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub provider: String,
    pub upstream_model: String,
    pub price: Price,
    pub max_output_tokens: u64,
    pub fallbacks: Vec<String>,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierStrategy {
    Ordered,
    Weighted,
    LeastLatency,
}

#[derive(Debug, Clone)]
pub struct TierConfig {
    pub name: String,
    pub models: Vec<String>,
    pub strategy: TierStrategy,
    pub fallback_tier: Option<String>,
    pub cooldown_after: u32,
    pub cooldown: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassifierKind {
    /// The shipped model (`None`) or a `[classifiers.X]` label set.
    Embedded(Option<String>),
    Llm {
        model: String,
        timeout: Duration,
    },
    Rules,
    /// No classification: rules see the label `none` with full confidence.
    None,
}

/// The label of routers with `classifier = "none"`.
pub const NONE_LABEL: &str = "none";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputMode {
    LastUser,
    AllUser,
    SystemAndLastUser,
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub name: String,
    pub classifier: ClassifierKind,
    /// In thousandths, so comparisons stay exact.
    pub min_confidence: f32,
    pub unknown_tier: String,
    pub input: InputMode,
    pub rules: Vec<RuleConfig>,
    pub labels: Vec<String>,
    pub keywords: Vec<(String, Vec<regex::Regex>)>,
    pub cache: Option<CacheOverride>,
    pub vote: Option<Arc<crate::vote::CompiledVote>>,
    pub cascade: Option<Arc<crate::vote::CompiledCascade>>,
    pub guard: Option<crate::guard::GuardConfig>,
}

#[derive(Debug, Clone)]
pub struct RuleConfig {
    pub when: Condition,
    pub tier: String,
    pub vote: Option<Arc<crate::vote::CompiledVote>>,
    pub cascade: Option<Arc<crate::vote::CompiledCascade>>,
}

#[derive(Debug, Clone, Default)]
pub struct Condition {
    pub labels: Option<Vec<String>>,
    pub min_confidence: Option<f32>,
    pub min_prompt_tokens: Option<u64>,
    pub max_prompt_tokens: Option<u64>,
    pub has_tools: Option<bool>,
    pub has_images: Option<bool>,
    pub json_response: Option<bool>,
    pub min_turns: Option<u32>,
    pub max_turns: Option<u32>,
    pub keys: Option<Vec<String>>,
    pub header: Option<(http::HeaderName, Option<String>)>,
}

impl Condition {
    pub fn is_catch_all(&self) -> bool {
        self.labels.is_none()
            && self.min_confidence.is_none()
            && self.min_prompt_tokens.is_none()
            && self.max_prompt_tokens.is_none()
            && self.has_tools.is_none()
            && self.has_images.is_none()
            && self.json_response.is_none()
            && self.min_turns.is_none()
            && self.max_turns.is_none()
            && self.keys.is_none()
            && self.header.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriodKind {
    Daily,
    Weekly,
    Monthly,
    Total,
}

#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_parallel: Option<u32>,
    pub budget_nanos: Option<u64>,
    pub period: Option<BudgetPeriodKind>,
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub name: String,
    pub sha256: [u8; 32],
    pub team: Option<String>,
    pub allow: Vec<String>,
    pub limits: LimitsConfig,
    pub guard: Option<crate::guard::GuardConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    PerKey,
    Shared,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub max_bytes: u64,
    pub ttl: Duration,
    pub scope: CacheScope,
    pub cache_sampled: bool,
    /// A Redis tier shared by every replica (`[store] kind = "redis"` only).
    pub shared: bool,
    pub models: BTreeMap<String, CacheOverride>,
}

/// Where /metrics is served; see `validate_metrics` for the defaults.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub listen: Option<String>,
    /// `metrics.listen` was written in the config (then failing to bind is fatal).
    pub listen_explicit: bool,
    /// SHA-256 of the bearer token that opens /metrics on the API listener.
    pub token_sha256: Option<[u8; 32]>,
    /// Serve /metrics on the API listener to anyone (explicit opt-in).
    pub public: bool,
}
/// Default for `[auth] max_failures_per_minute`: far above what a mistyped key produces, far below what guessing needs.
pub const DEFAULT_MAX_AUTH_FAILURES_PER_MINUTE: u32 = 30;
/// Default for `metrics.listen`: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Memory,
    Sqlite {
        state_dir: PathBuf,
    },
    /// Limits shared by every replica through Redis; each replica still appends its settlements
    /// to its own SQLite ledger under `state_dir`.
    Redis {
        url: String,
        on_unavailable: OnUnavailable,
        key_prefix: String,
        reservation_ttl: Duration,
        timeout: Duration,
        state_dir: PathBuf,
    },
}

impl StoreConfig {
    /// Where the durable spend ledger lives, if this store keeps one.
    pub fn state_dir(&self) -> Option<&Path> {
        match self {
            StoreConfig::Memory => None,
            StoreConfig::Sqlite { state_dir } | StoreConfig::Redis { state_dir, .. } => {
                Some(state_dir)
            }
        }
    }
}

/// What admission does while the shared store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Refuse with 503 `store_unavailable`.
    FailClosed,
    /// Enforce the same limits per replica, in memory.
    FailOpen,
}

/// A custom label set: a trained model file, or example utterances per label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifierConfig {
    /// Relative to `Config::base_dir`.
    pub model_file: Option<String>,
    pub examples: BTreeMap<String, Vec<String>>,
}

/// Per-router or per-model cache settings; `None` keeps the global one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheOverride {
    pub enabled: Option<bool>,
    pub ttl: Option<Duration>,
}

/// `[aliases]`: exact names first, then globs in file order.
#[derive(Debug, Clone, Default)]
pub struct Aliases {
    pub exact: BTreeMap<String, String>,
    pub globs: Vec<AliasGlob>,
}

#[derive(Debug, Clone)]
pub struct AliasGlob {
    pub pattern: String,
    pub matcher: regex::Regex,
    pub target: String,
}

impl Aliases {
    /// The router or model `name` is an alias of, if any.
    pub fn resolve(&self, name: &str) -> Option<&str> {
        if let Some(t) = self.exact.get(name) {
            return Some(t);
        }
        self.globs
            .iter()
            .find(|g| g.matcher.is_match(name))
            .map(|g| g.target.as_str())
    }

    /// Every alias name or pattern with its target, exact names first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.exact
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(
                self.globs
                    .iter()
                    .map(|g| (g.pattern.as_str(), g.target.as_str())),
            )
    }
}

/// A glob (`*` any run, `?` one character, the rest literal) as an anchored regex.
pub fn glob_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    let mut re = String::with_capacity(pattern.len() + 8);
    re.push('^');
    let mut lit = [0u8; 4];
    for ch in pattern.chars() {
        match ch {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex::escape(c.encode_utf8(&mut lit))),
        }
    }
    re.push('$');
    regex::Regex::new(&re)
}
