//! Configuration: `raw` is the TOML schema, this module validates it into the
//! runtime types the gateway uses. Every problem is reported with its key path
//! (`routers.auto.rules[2].tier: unknown tier "lage"`), all at once.

pub mod raw;

use raw::*;
use std::collections::{BTreeMap, BTreeSet};
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

/// All problems found in a config file; displayed one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .errors.join("\n"))]
pub struct ConfigErrors {
    pub errors: Vec<String>,
}

impl ConfigErrors {
    fn one(msg: impl Into<String>) -> Self {
        Self {
            errors: vec![msg.into()],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthMode,
    pub providers: BTreeMap<String, Arc<ProviderConfig>>,
    pub models: BTreeMap<String, Arc<ModelConfig>>,
    pub tiers: BTreeMap<String, Arc<TierConfig>>,
    pub routers: BTreeMap<String, Arc<RouterConfig>>,
    pub classifiers: BTreeMap<String, RawClassifier>,
    pub keys: Vec<KeyConfig>,
    pub teams: BTreeMap<String, LimitsConfig>,
    pub cache: CacheConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Keys,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi { base_url: String },
    Mock(MockSettings),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MockSettings {
    pub latency: Duration,
    pub tokens_per_second: u32,
    pub reply_words: u32,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub cache: Option<RawCacheOverride>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub models: BTreeMap<String, RawCacheOverride>,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub listen: Option<String>,
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Refuse with 503 `store_unavailable`.
    FailClosed,
    /// Enforce the same limits per replica, in memory.
    FailOpen,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::one(format!("{}: {e}", path.display())))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, &base)
    }

    /// Parses and validates TOML text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors::one(toml_error(&e)))?;
        validate(raw, base_dir, &|k| std::env::var(k).ok())
    }

    /// Names users may put in `model`: routers first, then models.
    pub fn target_names(&self) -> impl Iterator<Item = &str> {
        self.routers
            .keys()
            .chain(self.models.keys())
            .map(String::as_str)
    }
}

fn toml_error(e: &toml::de::Error) -> String {
    // toml's message already carries the line and the offending key.
    let msg = e.message();
    match e.span() {
        Some(span) => format!("parse error at byte {}: {msg}", span.start),
        None => format!("parse error: {msg}"),
    }
}

struct V {
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl V {
    fn err(&mut self, path: impl AsRef<str>, msg: impl AsRef<str>) {
        self.errors
            .push(format!("{}: {}", path.as_ref(), msg.as_ref()));
    }
}

fn positive_duration(v: &mut V, path: &str, d: Option<Duration>, default: Duration) -> Duration {
    match d {
        Some(d) if d.is_zero() => {
            v.err(path, "must be greater than zero");
            default
        }
        Some(d) => d,
        None => default,
    }
}

/// Validates a raw config; `env` looks up environment variables (injectable for tests).
pub fn validate(
    raw: RawConfig,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut v = V {
        errors: Vec::new(),
        warnings: Vec::new(),
    };

    let server = validate_server(&mut v, &raw.server);
    let auth = match raw.auth.as_deref() {
        None | Some("keys") => AuthMode::Keys,
        Some("none") => AuthMode::None,
        Some(other) => {
            v.err(
                "auth",
                format!("unknown auth mode {other:?} (expected \"keys\" or \"none\")"),
            );
            AuthMode::Keys
        }
    };

    let providers = validate_providers(&mut v, &raw.providers, env);
    let models = validate_models(&mut v, &raw.models, &providers);
    let tiers = validate_tiers(&mut v, &raw.tiers, &models);
    let routers = validate_routers(&mut v, &raw, &models, &tiers);
    for (name, _) in raw.routers.iter() {
        if raw.models.contains_key(name) {
            v.err(
                format!("routers.{name}"),
                format!("name {name:?} is also a model; router and model names must differ"),
            );
        }
    }
    for (name, c) in &raw.classifiers {
        let path = format!("classifiers.{name}");
        if c.model_file.is_none() && c.examples.is_empty() {
            v.err(&path, "needs `model_file` or `examples`");
        }
        if let Some(f) = &c.model_file {
            if !base_dir.join(f).exists() {
                v.err(
                    format!("{path}.model_file"),
                    format!("file {f:?} not found"),
                );
            }
        }
        for (label, ex) in &c.examples {
            if ex.is_empty() {
                v.err(
                    format!("{path}.examples.{label}"),
                    "needs at least one example",
                );
            }
        }
    }

    let teams: BTreeMap<String, LimitsConfig> = raw
        .teams
        .iter()
        .map(|(name, t)| {
            let path = format!("teams.{name}");
            let l = validate_limits(
                &mut v,
                &path,
                t.rpm,
                t.tpm,
                t.max_parallel,
                t.budget,
                &t.period,
            );
            (name.clone(), l)
        })
        .collect();
    let keys = validate_keys(&mut v, &raw, &teams, env);
    if auth == AuthMode::Keys && keys.is_empty() {
        v.err(
            "keys",
            "no keys configured; add a [keys.NAME] (see `triage keys new`) or set auth = \"none\" explicitly",
        );
    }

    let cache = validate_cache(&mut v, raw.cache.as_ref(), &models);
    let metrics = MetricsConfig {
        enabled: raw.metrics.enabled.unwrap_or(true),
        listen: raw.metrics.listen.clone(),
    };
    if let Some(l) = &metrics.listen {
        if l.parse::<std::net::SocketAddr>().is_err() {
            v.err("metrics.listen", format!("not a socket address: {l:?}"));
        }
    }
    let store = validate_store(&mut v, &raw.store, &providers);
    if cache.shared {
        if !matches!(store, StoreConfig::Redis { .. }) {
            v.err(
                "cache.shared",
                "needs [store] kind = \"redis\" (the shared tier lives in Redis)",
            );
        } else if !cache.enabled {
            v.warnings
                .push("cache.shared: has no effect while cache.enabled = false".to_string());
        }
    }

    if !v.errors.is_empty() {
        return Err(ConfigErrors { errors: v.errors });
    }
    Ok(Config {
        server,
        auth,
        providers,
        models,
        tiers,
        routers,
        classifiers: raw.classifiers,
        keys,
        teams,
        cache,
        metrics,
        store,
        warnings: v.warnings,
        base_dir: base_dir.to_path_buf(),
    })
}

fn validate_store(
    v: &mut V,
    raw: &RawStore,
    providers: &BTreeMap<String, Arc<ProviderConfig>>,
) -> StoreConfig {
    // Relative to the working directory, like any server's data dir.
    let state_dir = PathBuf::from(raw.state_dir.as_deref().unwrap_or("state"));
    let kind = raw.kind.as_deref().unwrap_or("sqlite");
    if kind != "redis" {
        let redis_only = [
            ("url", raw.url.is_some()),
            ("on_unavailable", raw.on_unavailable.is_some()),
            ("key_prefix", raw.key_prefix.is_some()),
            ("reservation_ttl", raw.reservation_ttl.is_some()),
            ("timeout", raw.timeout.is_some()),
        ];
        for (field, set) in redis_only {
            if set {
                v.err(format!("store.{field}"), "only applies to kind = \"redis\"");
            }
        }
    }
    match kind {
        "sqlite" => StoreConfig::Sqlite { state_dir },
        "memory" => StoreConfig::Memory,
        "redis" => {
            let url = match raw.url.as_deref() {
                None => {
                    v.err(
                        "store.url",
                        "required for kind = \"redis\" (e.g. \"redis://127.0.0.1:6379/\")",
                    );
                    String::new()
                }
                Some(u)
                    if !(u.starts_with("redis://")
                        || u.starts_with("redis+unix://")
                        || u.starts_with("unix://")) =>
                {
                    v.err(
                        "store.url",
                        format!("{u:?} is not a redis:// or unix:// URL (TLS is not supported)"),
                    );
                    u.to_string()
                }
                Some(u) => {
                    if let Err(e) = redis::Client::open(u) {
                        v.err("store.url", format!("{u:?}: {e}"));
                    }
                    u.to_string()
                }
            };
            let on_unavailable = match raw.on_unavailable.as_deref() {
                None | Some("fail_closed") => OnUnavailable::FailClosed,
                Some("fail_open") => OnUnavailable::FailOpen,
                Some(other) => {
                    v.err(
                        "store.on_unavailable",
                        format!(
                            "unknown policy {other:?} (expected \"fail_closed\" or \"fail_open\")"
                        ),
                    );
                    OnUnavailable::FailClosed
                }
            };
            let key_prefix = raw
                .key_prefix
                .clone()
                .unwrap_or_else(|| "triage".to_string());
            if key_prefix.is_empty()
                || key_prefix.len() > 64
                || !key_prefix
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '{' && c != '}')
            {
                v.err(
                    "store.key_prefix",
                    format!("{key_prefix:?}: 1 to 64 visible ASCII characters, no braces"),
                );
            }
            let reservation_ttl = positive_duration(
                v,
                "store.reservation_ttl",
                raw.reservation_ttl,
                Duration::from_secs(600),
            );
            if reservation_ttl < Duration::from_secs(1) {
                v.err("store.reservation_ttl", "must be at least 1s");
            }
            let timeout =
                positive_duration(v, "store.timeout", raw.timeout, Duration::from_millis(250));
            // A reservation that expires while its request still runs frees budget too early.
            if let Some((name, longest)) = providers
                .iter()
                .map(|(n, p)| (n, p.total_timeout))
                .max_by_key(|(_, t)| *t)
            {
                if longest > reservation_ttl {
                    v.warnings.push(format!(
                        "store.reservation_ttl: {} is shorter than providers.{name}.total_timeout ({}); requests running longer lose their reservation",
                        humantime::format_duration(reservation_ttl),
                        humantime::format_duration(longest)
                    ));
                }
            }
            StoreConfig::Redis {
                url,
                on_unavailable,
                key_prefix,
                reservation_ttl,
                timeout,
                state_dir,
            }
        }
        other => {
            v.err(
                "store.kind",
                format!("unknown store {other:?} (expected \"sqlite\", \"memory\" or \"redis\")"),
            );
            StoreConfig::Memory
        }
    }
}

fn validate_server(v: &mut V, s: &RawServer) -> ServerConfig {
    if s.listen.parse::<std::net::SocketAddr>().is_err() {
        v.err(
            "server.listen",
            format!("not a socket address: {:?}", s.listen),
        );
    }
    if s.max_body_bytes == 0 {
        v.err("server.max_body_bytes", "must be greater than zero");
    }
    let log_json = match s.log_format.as_str() {
        "json" => true,
        "pretty" => false,
        other => {
            v.err(
                "server.log_format",
                format!("unknown format {other:?} (expected \"json\" or \"pretty\")"),
            );
            false
        }
    };
    ServerConfig {
        listen: s.listen.clone(),
        max_body_bytes: s.max_body_bytes,
        shutdown_grace: s.shutdown_grace,
        header_read_timeout: positive_duration(
            v,
            "server.header_read_timeout",
            Some(s.header_read_timeout),
            Duration::from_secs(10),
        ),
        max_header_bytes: s.max_header_bytes.max(8 * 1024),
        log_json,
        log_level: s.log_level.clone(),
    }
}

fn validate_providers(
    v: &mut V,
    raw: &BTreeMap<String, RawProvider>,
    env: &dyn Fn(&str) -> Option<String>,
) -> BTreeMap<String, Arc<ProviderConfig>> {
    let mut out = BTreeMap::new();
    for (name, p) in raw {
        let path = format!("providers.{name}");
        let kind = match p.kind.as_str() {
            "openai" => {
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
            "mock" => ProviderKind::Mock(MockSettings {
                latency: p.latency.unwrap_or_default(),
                tokens_per_second: p.tokens_per_second.unwrap_or(0),
                reply_words: p.reply_words.unwrap_or(24).clamp(1, 4096),
            }),
            other => {
                v.err(
                    format!("{path}.kind"),
                    format!("unknown provider kind {other:?} (expected \"openai\" or \"mock\")"),
                );
                continue;
            }
        };
        let api_key = match &p.api_key_env {
            Some(var) => match env(var) {
                Some(k) if !k.is_empty() => Some(k),
                _ => {
                    v.err(
                        format!("{path}.api_key_env"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            None => None,
        };
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

fn price_nanos(v: &mut V, path: &str, usd: f64) -> u64 {
    crate::limits::usd_f64_to_nanos(usd).unwrap_or_else(|_| {
        v.err(
            path,
            format!("must be a non-negative USD amount, got {usd}"),
        );
        0
    })
}

fn validate_models(
    v: &mut V,
    raw: &BTreeMap<String, RawModel>,
    providers: &BTreeMap<String, Arc<ProviderConfig>>,
) -> BTreeMap<String, Arc<ModelConfig>> {
    let mut out = BTreeMap::new();
    for (name, m) in raw {
        let path = format!("models.{name}");
        if !providers.contains_key(&m.provider) {
            v.err(
                format!("{path}.provider"),
                format!("unknown provider {:?}", m.provider),
            );
        }
        for (i, f) in m.fallbacks.iter().enumerate() {
            if !raw.contains_key(f) {
                v.err(
                    format!("{path}.fallbacks[{i}]"),
                    format!("unknown model {f:?}"),
                );
            } else if f == name {
                v.err(
                    format!("{path}.fallbacks[{i}]"),
                    "a model cannot fall back to itself",
                );
            }
        }
        let input = price_nanos(v, &format!("{path}.price.input"), m.price.input);
        let cached_input = match m.price.cached_input {
            Some(c) => price_nanos(v, &format!("{path}.price.cached_input"), c),
            None => input,
        };
        let output = price_nanos(v, &format!("{path}.price.output"), m.price.output);
        out.insert(
            name.clone(),
            Arc::new(ModelConfig {
                name: name.clone(),
                provider: m.provider.clone(),
                upstream_model: m.upstream_model.clone().unwrap_or_else(|| name.clone()),
                price: Price {
                    input,
                    cached_input,
                    output,
                },
                max_output_tokens: m.max_output_tokens.unwrap_or(4096),
                fallbacks: m.fallbacks.clone(),
                weight: m.weight.unwrap_or(1),
            }),
        );
    }
    out
}

fn validate_tiers(
    v: &mut V,
    raw: &BTreeMap<String, RawTier>,
    models: &BTreeMap<String, Arc<ModelConfig>>,
) -> BTreeMap<String, Arc<TierConfig>> {
    let mut out = BTreeMap::new();
    for (name, t) in raw {
        let path = format!("tiers.{name}");
        if t.models.is_empty() {
            v.err(format!("{path}.models"), "needs at least one model");
        }
        for (i, m) in t.models.iter().enumerate() {
            if !models.contains_key(m) {
                v.err(
                    format!("{path}.models[{i}]"),
                    format!("unknown model {m:?}"),
                );
            }
        }
        let strategy = match t.strategy.as_deref() {
            None | Some("ordered") => TierStrategy::Ordered,
            Some("weighted") => TierStrategy::Weighted,
            Some("least_latency") => TierStrategy::LeastLatency,
            Some(other) => {
                v.err(
                    format!("{path}.strategy"),
                    format!(
                        "unknown strategy {other:?} (expected ordered, weighted or least_latency)"
                    ),
                );
                TierStrategy::Ordered
            }
        };
        if let Some(f) = &t.fallback_tier {
            if !raw.contains_key(f) {
                v.err(
                    format!("{path}.fallback_tier"),
                    format!("unknown tier {f:?}"),
                );
            } else if f == name {
                v.err(
                    format!("{path}.fallback_tier"),
                    "a tier cannot fall back to itself",
                );
            }
        }
        out.insert(
            name.clone(),
            Arc::new(TierConfig {
                name: name.clone(),
                models: t.models.clone(),
                strategy,
                fallback_tier: t.fallback_tier.clone(),
                cooldown_after: t.cooldown_after.unwrap_or(3).max(1),
                cooldown: positive_duration(
                    v,
                    &format!("{path}.cooldown"),
                    t.cooldown,
                    Duration::from_secs(30),
                ),
            }),
        );
    }
    // Fallback chains must end: a cycle would bounce a request forever.
    for name in raw.keys() {
        let mut seen = BTreeSet::new();
        let mut cur = Some(name.clone());
        while let Some(c) = cur {
            if !seen.insert(c.clone()) {
                v.err(
                    format!("tiers.{name}.fallback_tier"),
                    "fallback chain forms a cycle",
                );
                break;
            }
            cur = raw.get(&c).and_then(|t| t.fallback_tier.clone());
        }
    }
    out
}

fn confidence(v: &mut V, path: &str, c: Option<f64>, default: f32) -> f32 {
    match c {
        Some(c) if !(0.0..=1.0).contains(&c) => {
            v.err(path, format!("must be between 0 and 1, got {c}"));
            default
        }
        Some(c) => c as f32,
        None => default,
    }
}

fn validate_routers(
    v: &mut V,
    raw: &RawConfig,
    models: &BTreeMap<String, Arc<ModelConfig>>,
    tiers: &BTreeMap<String, Arc<TierConfig>>,
) -> BTreeMap<String, Arc<RouterConfig>> {
    let mut out = BTreeMap::new();
    for (name, r) in &raw.routers {
        let path = format!("routers.{name}");
        let classifier = match r.classifier.as_deref() {
            None | Some("embedded") => ClassifierKind::Embedded(None),
            Some("rules") => ClassifierKind::Rules,
            Some("none") => ClassifierKind::None,
            Some("llm") => match &r.classifier_model {
                Some(m) if models.contains_key(m) => ClassifierKind::Llm {
                    model: m.clone(),
                    timeout: positive_duration(
                        v,
                        &format!("{path}.classifier_timeout"),
                        r.classifier_timeout,
                        Duration::from_secs(2),
                    ),
                },
                Some(m) => {
                    v.err(
                        format!("{path}.classifier_model"),
                        format!("unknown model {m:?}"),
                    );
                    ClassifierKind::Rules
                }
                None => {
                    v.err(
                        format!("{path}.classifier_model"),
                        "required when classifier = \"llm\"",
                    );
                    ClassifierKind::Rules
                }
            },
            Some(custom) if raw.classifiers.contains_key(custom) => {
                ClassifierKind::Embedded(Some(custom.to_string()))
            }
            Some(other) => {
                v.err(format!("{path}.classifier"), format!("unknown classifier {other:?} (expected embedded, llm, rules, none or a [classifiers.NAME])"));
                ClassifierKind::Rules
            }
        };
        // The label vocabulary decides which rule labels are valid.
        let labels: Vec<String> = match &classifier {
            ClassifierKind::Embedded(Some(c)) => {
                let set = &raw.classifiers[c];
                if set.examples.is_empty() {
                    Vec::new() // from a model file: checked when the file is loaded
                } else {
                    set.examples.keys().cloned().collect()
                }
            }
            ClassifierKind::Rules if !r.keywords.is_empty() => r.keywords.keys().cloned().collect(),
            ClassifierKind::None => vec![NONE_LABEL.to_string()],
            _ => DEFAULT_LABELS.iter().map(|s| s.to_string()).collect(),
        };
        let mut keywords = Vec::new();
        for (label, pats) in &r.keywords {
            let mut compiled = Vec::new();
            for (i, p) in pats.iter().enumerate() {
                match regex::RegexBuilder::new(p).case_insensitive(true).build() {
                    Ok(re) => compiled.push(re),
                    Err(e) => v.err(
                        format!("{path}.keywords.{label}[{i}]"),
                        format!("invalid regex: {e}"),
                    ),
                }
            }
            keywords.push((label.clone(), compiled));
        }
        if !tiers.contains_key(&r.unknown_tier) {
            v.err(
                format!("{path}.unknown_tier"),
                format!("unknown tier {:?}", r.unknown_tier),
            );
        }
        let input = match r.input.as_deref() {
            None | Some("last_user") => InputMode::LastUser,
            Some("all_user") => InputMode::AllUser,
            Some("system_and_last_user") => InputMode::SystemAndLastUser,
            Some(other) => {
                v.err(format!("{path}.input"), format!("unknown input {other:?} (expected last_user, all_user or system_and_last_user)"));
                InputMode::LastUser
            }
        };
        if r.rules.is_empty() {
            v.err(format!("{path}.rules"), "needs at least one rule");
        }
        let mut rules = Vec::new();
        let mut catch_all_at: Option<usize> = None;
        for (i, rule) in r.rules.iter().enumerate() {
            let rpath = format!("{path}.rules[{i}]");
            if !tiers.contains_key(&rule.tier) {
                v.err(
                    format!("{rpath}.tier"),
                    format!("unknown tier {:?}", rule.tier),
                );
            }
            let when = validate_when(
                v,
                &rpath,
                rule.when.clone().unwrap_or_default(),
                &labels,
                &raw.keys,
            );
            if let Some(c) = catch_all_at {
                v.warnings.push(format!(
                    "{rpath}: unreachable, rule [{c}] before it matches everything"
                ));
            }
            if when.is_catch_all() && catch_all_at.is_none() {
                catch_all_at = Some(i);
            }
            rules.push(RuleConfig {
                when,
                tier: rule.tier.clone(),
                vote: compile_vote(v, &rpath, rule.vote.as_ref(), models),
                cascade: compile_cascade(v, &rpath, rule.cascade.as_ref(), tiers),
            });
        }
        out.insert(
            name.clone(),
            Arc::new(RouterConfig {
                name: name.clone(),
                classifier,
                min_confidence: confidence(
                    v,
                    &format!("{path}.min_confidence"),
                    r.min_confidence,
                    0.5,
                ),
                unknown_tier: r.unknown_tier.clone(),
                input,
                rules,
                labels,
                keywords,
                cache: r.cache.clone(),
                vote: compile_vote(v, &path, r.vote.as_ref(), models),
                cascade: compile_cascade(v, &path, r.cascade.as_ref(), tiers),
                guard: r.guard.as_ref().map(|g| {
                    v.errors.extend(g.validate(&format!("{path}.guard")));
                    g.clone()
                }),
            }),
        );
    }
    out
}

fn compile_vote(
    v: &mut V,
    path: &str,
    vote: Option<&crate::vote::VoteConfig>,
    models: &BTreeMap<String, Arc<ModelConfig>>,
) -> Option<Arc<crate::vote::CompiledVote>> {
    let vote = vote?;
    let vpath = format!("{path}.vote");
    for (i, m) in vote.models.iter().enumerate() {
        if !models.contains_key(m) {
            v.err(
                format!("{vpath}.models[{i}]"),
                format!("unknown model {m:?}"),
            );
        }
    }
    if let Some(j) = &vote.judge {
        if !models.contains_key(j) {
            v.err(format!("{vpath}.judge"), format!("unknown model {j:?}"));
        }
    }
    match vote.compile(&vpath) {
        Ok(c) => Some(Arc::new(c)),
        Err(errs) => {
            v.errors.extend(errs);
            None
        }
    }
}

fn compile_cascade(
    v: &mut V,
    path: &str,
    cascade: Option<&crate::vote::CascadeConfig>,
    tiers: &BTreeMap<String, Arc<TierConfig>>,
) -> Option<Arc<crate::vote::CompiledCascade>> {
    let c = cascade?;
    let cpath = format!("{path}.cascade");
    for (i, t) in c.tiers.iter().enumerate() {
        if !tiers.contains_key(t) {
            v.err(format!("{cpath}.tiers[{i}]"), format!("unknown tier {t:?}"));
        }
    }
    match c.compile(&cpath) {
        Ok(c) => Some(Arc::new(c)),
        Err(errs) => {
            v.errors.extend(errs);
            None
        }
    }
}

fn validate_when(
    v: &mut V,
    rpath: &str,
    w: RawWhen,
    labels: &[String],
    keys: &BTreeMap<String, RawKey>,
) -> Condition {
    let label_list = w.label.map(OneOrMany::into_vec);
    if let Some(ls) = &label_list {
        for l in ls {
            if l != UNKNOWN_LABEL && !labels.is_empty() && !labels.contains(l) {
                v.err(
                    format!("{rpath}.when.label"),
                    format!("unknown label {l:?} (known: {})", labels.join(", ")),
                );
            }
        }
    }
    let key_list = w.key.map(OneOrMany::into_vec);
    if let Some(ks) = &key_list {
        for k in ks {
            if !keys.contains_key(k) {
                v.err(format!("{rpath}.when.key"), format!("unknown key {k:?}"));
            }
        }
    }
    if let (Some(a), Some(b)) = (w.min_prompt_tokens, w.max_prompt_tokens) {
        if a > b {
            v.err(
                format!("{rpath}.when"),
                "min_prompt_tokens is greater than max_prompt_tokens",
            );
        }
    }
    let header = match w.header {
        Some(h) => match http::HeaderName::from_bytes(h.name.as_bytes()) {
            Ok(n) => Some((n, h.value)),
            Err(_) => {
                v.err(
                    format!("{rpath}.when.header.name"),
                    format!("not a valid header name: {:?}", h.name),
                );
                None
            }
        },
        None => None,
    };
    let min_conf = w
        .min_confidence
        .map(|c| confidence(v, &format!("{rpath}.when.min_confidence"), Some(c), 0.0));
    Condition {
        labels: label_list,
        min_confidence: min_conf,
        min_prompt_tokens: w.min_prompt_tokens,
        max_prompt_tokens: w.max_prompt_tokens,
        has_tools: w.has_tools,
        has_images: w.has_images,
        json_response: w.json_response,
        min_turns: w.min_turns,
        max_turns: w.max_turns,
        keys: key_list,
        header,
    }
}

#[allow(clippy::too_many_arguments)]
fn validate_limits(
    v: &mut V,
    path: &str,
    rpm: Option<u32>,
    tpm: Option<u64>,
    max_parallel: Option<u32>,
    budget: Option<f64>,
    period: &Option<String>,
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
    let period = match period.as_deref() {
        None => budget.map(|_| BudgetPeriodKind::Total),
        Some("daily") => Some(BudgetPeriodKind::Daily),
        Some("weekly") => Some(BudgetPeriodKind::Weekly),
        Some("monthly") => Some(BudgetPeriodKind::Monthly),
        Some("total") => Some(BudgetPeriodKind::Total),
        Some(other) => {
            v.err(
                format!("{path}.period"),
                format!("unknown period {other:?} (expected daily, weekly, monthly or total)"),
            );
            None
        }
    };
    LimitsConfig {
        rpm,
        tpm,
        max_parallel,
        budget_nanos,
        period,
    }
}

fn validate_keys(
    v: &mut V,
    raw: &RawConfig,
    teams: &BTreeMap<String, LimitsConfig>,
    env: &dyn Fn(&str) -> Option<String>,
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
            (None, Some(var)) => match env(var) {
                Some(secret) if !secret.is_empty() => {
                    Some(sha2::Sha256::digest(secret.as_bytes()).into())
                }
                _ => {
                    v.err(
                        format!("{path}.key_env"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
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
        let limits = validate_limits(v, &path, k.rpm, k.tpm, k.max_parallel, k.budget, &k.period);
        if let Some(sha) = sha {
            if let Some(other) = seen_hashes.insert(sha, name.clone()) {
                v.err(&path, format!("same secret as keys.{other}"));
            }
            if let Some(g) = &k.guard {
                v.errors.extend(g.validate(&format!("{path}.guard")));
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

fn validate_cache(
    v: &mut V,
    raw: Option<&RawCache>,
    models: &BTreeMap<String, Arc<ModelConfig>>,
) -> CacheConfig {
    let Some(c) = raw else {
        return CacheConfig {
            enabled: false,
            max_bytes: 0,
            ttl: Duration::from_secs(300),
            scope: CacheScope::PerKey,
            cache_sampled: false,
            shared: false,
            models: BTreeMap::new(),
        };
    };
    let scope = match c.scope.as_deref() {
        None | Some("per_key") => CacheScope::PerKey,
        Some("shared") => CacheScope::Shared,
        Some(other) => {
            v.err(
                "cache.scope",
                format!("unknown scope {other:?} (expected per_key or shared)"),
            );
            CacheScope::PerKey
        }
    };
    for m in c.models.keys() {
        if !models.contains_key(m) {
            v.err(format!("cache.models.{m}"), format!("unknown model {m:?}"));
        }
    }
    CacheConfig {
        enabled: c.enabled,
        max_bytes: c.max_bytes.unwrap_or(64 * 1024 * 1024),
        ttl: positive_duration(v, "cache.ttl", c.ttl, Duration::from_secs(300)),
        scope,
        cache_sampled: c.cache_sampled,
        shared: c.shared,
        models: c.models.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors::one(e.to_string()))?;
        validate(raw, Path::new("."), &|k| {
            (k == "SET").then(|| "secret".to_string())
        })
    }

    const BASE: &str = r#"
auth = "none"
[providers.mock]
kind = "mock"
[models.fast]
provider = "mock"
[models.smart]
provider = "mock"
[tiers.small]
models = ["fast"]
[tiers.large]
models = ["smart"]
"#;

    #[test]
    fn reports_every_error_with_its_key_path() {
        let text = format!(
            "{BASE}
[models.bad]
provider = \"opnai\"
[routers.auto]
unknown_tier = \"huge\"
[[routers.auto.rules]]
when = {{ label = \"cod\" }}
tier = \"lage\"
"
        );
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert!(
            errs.contains(&"models.bad.provider: unknown provider \"opnai\"".to_string()),
            "{errs:?}"
        );
        assert!(errs
            .iter()
            .any(|e| e.starts_with("routers.auto.unknown_tier: unknown tier \"huge\"")));
        assert!(errs
            .iter()
            .any(|e| e == "routers.auto.rules[0].tier: unknown tier \"lage\""));
        assert!(errs
            .iter()
            .any(|e| e.starts_with("routers.auto.rules[0].when.label: unknown label \"cod\"")));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = parse(&format!(
            "{BASE}\n[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n"
        ))
        .err();
        assert!(err
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("listne"));
    }

    #[test]
    fn keys_required_unless_auth_none() {
        let text = BASE.replace("auth = \"none\"", "");
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert!(errs
            .iter()
            .any(|e| e.starts_with("keys: no keys configured")));
    }

    #[test]
    fn secrets_come_from_env() {
        let ok = parse(&format!("{BASE}\n[providers.real]\nkind = \"openai\"\nbase_url = \"https://x/v1\"\napi_key_env = \"SET\"\n"));
        assert_eq!(
            ok.ok()
                .and_then(|c| c.providers["real"].api_key.clone())
                .as_deref(),
            Some("secret")
        );
        let missing = parse(&format!("{BASE}\n[providers.real]\nkind = \"openai\"\nbase_url = \"https://x/v1\"\napi_key_env = \"UNSET\"\n"));
        assert!(missing
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("providers.real.api_key_env: environment variable UNSET is not set"));
    }

    #[test]
    fn warns_on_unreachable_rules_and_converts_prices() {
        let text = format!(
            "{BASE}
[models.priced]
provider = \"mock\"
price = {{ input = 0.15, output = 0.6 }}
[routers.auto]
unknown_tier = \"large\"
[[routers.auto.rules]]
tier = \"small\"
[[routers.auto.rules]]
when = {{ label = [\"code\", \"math\"] }}
tier = \"large\"
"
        );
        let cfg = parse(&text).map_err(|e| e.to_string());
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cfg.warnings.len(), 1);
        assert!(cfg.warnings[0].starts_with("routers.auto.rules[1]: unreachable"));
        assert_eq!(cfg.models["priced"].price.input, 150_000_000);
        assert_eq!(cfg.models["priced"].price.output, 600_000_000);
        assert_eq!(cfg.models["priced"].price.cached_input, 150_000_000);
    }

    #[test]
    fn tier_fallback_cycles_are_rejected() {
        let text = BASE
            .replace(
                "[tiers.small]\nmodels = [\"fast\"]",
                "[tiers.small]\nmodels = [\"fast\"]\nfallback_tier = \"large\"",
            )
            .replace(
                "[tiers.large]\nmodels = [\"smart\"]",
                "[tiers.large]\nmodels = [\"smart\"]\nfallback_tier = \"small\"",
            );
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert!(errs.iter().any(|e| e.contains("cycle")), "{errs:?}");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Lines that are each valid TOML on their own, assembled in any order
        /// and number: duplicate tables, wrong types, unknown keys, dangling
        /// references. Validation must report, never panic.
        fn line() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("[providers.p]\nkind = \"mock\"".to_string()),
                Just("[providers.o]\nkind = \"openai\"\nbase_url = \"http://x/v1\"".to_string()),
                Just("[models.m]\nprovider = \"p\"".to_string()),
                Just("[models.n]\nprovider = \"nope\"\nfallbacks = [\"m\", \"n\"]".to_string()),
                Just("[tiers.t]\nmodels = [\"m\"]\nfallback_tier = \"t\"".to_string()),
                Just("[tiers.u]\nmodels = []\nstrategy = \"weighted\"".to_string()),
                Just(
                    "[routers.r]\nunknown_tier = \"t\"\n[[routers.r.rules]]\ntier = \"u\""
                        .to_string()
                ),
                Just("[routers.m]\nunknown_tier = \"x\"\nclassifier = \"llm\"".to_string()),
                Just("[keys.k]\nkey_sha256 = \"zz\"\nrpm = 0\nbudget = -1.0".to_string()),
                Just("[cache]\nttl = \"0s\"\nscope = \"galaxy\"".to_string()),
                Just("[server]\nlisten = \"not an address\"".to_string()),
                Just("auth = \"none\"".to_string()),
                "[a-z_.\\[\\]= \"0-9]{0,40}",
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
                let _ = Config::parse(&text, Path::new("."));
            }

            #[test]
            fn shuffled_sections_never_panic(lines in proptest::collection::vec(line(), 0..12)) {
                let text = lines.join("\n");
                if let Err(e) = Config::parse(&text, Path::new(".")) {
                    // Every problem names where it is.
                    prop_assert!(e.errors.iter().all(|m| !m.is_empty()));
                }
            }
        }
    }
}
