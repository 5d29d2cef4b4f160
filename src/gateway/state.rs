//! Gateway state. `Runtime` is everything derived from the config file and is
//! swapped atomically on reload; the rest (deployment health, limits, spend,
//! cache, sessions, metrics) outlives reloads.

use crate::auth::KeyTable;
use crate::cache::ResponseCache;
use crate::classify::embedded::EmbeddedClassifier;
use crate::config::{BudgetPeriodKind, ClassifierKind, Config, OnUnavailable, StoreConfig};
use crate::guard::{Guard, MemoryStore, RedisSessionStore, SessionStore};
use crate::limits::{
    KeySpec, LimitBackend, LimitSpec, LimitSpecs, LimitStore, Limiter, Period, RedisLimiter,
    RedisSettings, StoreEvent, StoreEvents,
};
use crate::metrics::{KnownNames, Metrics};
use crate::route::Health;
use crate::store::responses::ResponseStore;
use crate::store::{SharedRedis, SpendLedger, SqliteLedger};
use crate::upstream::Provider;
use crate::StartupError;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct Runtime {
    pub config: Arc<Config>,
    pub providers: HashMap<String, Arc<Provider>>,
    pub keys: KeyTable,
    /// Embedded classifiers by name; `""` is the shipped default.
    pub classifiers: HashMap<String, Arc<EmbeddedClassifier>>,
    /// Agent guards by scope: `router:NAME` and `key:NAME`.
    pub guards: HashMap<String, Arc<Guard>>,
}

impl Runtime {
    pub fn build(
        config: Config,
        sessions: &Arc<dyn SessionStore>,
    ) -> Result<Runtime, StartupError> {
        let mut providers = HashMap::new();
        for (name, p) in &config.providers {
            let provider = Provider::new(p.clone())
                .map_err(|e| StartupError::Provider(name.clone(), e.to_string()))?;
            providers.insert(name.clone(), Arc::new(provider));
        }
        let classifiers = load_classifiers(&config)?;
        let store: Arc<dyn SessionStore> = sessions.clone();
        let mut guards = HashMap::new();
        for (name, r) in &config.routers {
            if let Some(g) = &r.guard {
                guards.insert(
                    format!("router:{name}"),
                    Arc::new(Guard::new(g.clone(), store.clone())),
                );
            }
        }
        for k in &config.keys {
            if let Some(g) = &k.guard {
                guards.insert(
                    format!("key:{}", k.name),
                    Arc::new(Guard::new(g.clone(), store.clone())),
                );
            }
        }
        Ok(Runtime {
            keys: KeyTable::new(&config.keys),
            config: Arc::new(config),
            providers,
            classifiers,
            guards,
        })
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.get(name)
    }
}

fn load_classifiers(
    config: &Config,
) -> Result<HashMap<String, Arc<EmbeddedClassifier>>, StartupError> {
    use crate::classify::embedded::{Example, TrainOptions};
    let mut out = HashMap::new();
    let needs_default = config
        .routers
        .values()
        .any(|r| matches!(r.classifier, ClassifierKind::Embedded(None)));
    if needs_default {
        let c = EmbeddedClassifier::default_model()
            .map_err(|e| StartupError::Other(format!("loading the shipped classifier: {e}")))?;
        out.insert(String::new(), Arc::new(c));
    }
    for (name, c) in &config.classifiers {
        let path = format!("classifiers.{name}");
        let model = if let Some(f) = &c.model_file {
            EmbeddedClassifier::load(&config.base_dir.join(f))
                .map_err(|e| StartupError::Other(format!("{path}.model_file: {e}")))?
        } else {
            let examples: Vec<Example> = c
                .examples
                .iter()
                .flat_map(|(label, texts)| {
                    texts.iter().map(move |t| Example {
                        text: t.clone(),
                        label: label.clone(),
                        source: None,
                    })
                })
                .collect();
            EmbeddedClassifier::train(&examples, &TrainOptions::default())
                .map_err(|e| StartupError::Other(format!("{path}.examples: {e}")))?
        };
        // Rules may only name labels this classifier can produce.
        for (rname, r) in &config.routers {
            if r.classifier != ClassifierKind::Embedded(Some(name.clone())) {
                continue;
            }
            for (i, rule) in r.rules.iter().enumerate() {
                for l in rule.when.labels.iter().flatten() {
                    if l != crate::config::UNKNOWN_LABEL && model.label_index(l).is_none() {
                        return Err(StartupError::Other(format!(
                            "routers.{rname}.rules[{i}].when.label: unknown label {l:?} (known: {})",
                            model.labels().join(", ")
                        )));
                    }
                }
            }
        }
        out.insert(name.clone(), Arc::new(model));
    }
    Ok(out)
}

/// Limits per key and team, from the config.
pub fn limit_specs(config: &Config) -> LimitSpecs {
    fn spec(l: &crate::config::LimitsConfig) -> LimitSpec {
        LimitSpec {
            rpm: l.rpm,
            tpm: l.tpm,
            max_parallel: l.max_parallel,
            budget_nanos: l.budget_nanos,
            period: match l.period {
                Some(BudgetPeriodKind::Daily) => Period::Daily,
                Some(BudgetPeriodKind::Weekly) => Period::Weekly,
                Some(BudgetPeriodKind::Monthly) => Period::Monthly,
                Some(BudgetPeriodKind::Total) | None => Period::Total,
            },
        }
    }
    LimitSpecs {
        keys: config
            .keys
            .iter()
            .map(|k| {
                (
                    k.name.clone(),
                    KeySpec {
                        team: k.team.clone(),
                        limits: spec(&k.limits),
                    },
                )
            })
            .collect(),
        teams: config
            .teams
            .iter()
            .map(|(n, l)| (n.clone(), spec(l)))
            .collect(),
    }
}

/// Names metrics may use as label values.
pub fn known_names(config: &Config) -> KnownNames {
    let mut labels: Vec<String> = crate::config::DEFAULT_LABELS
        .iter()
        .map(|s| s.to_string())
        .collect();
    for r in config.routers.values() {
        labels.extend(r.labels.iter().cloned());
        labels.extend(r.keywords.iter().map(|(l, _)| l.clone()));
    }
    labels.sort();
    labels.dedup();
    KnownNames {
        keys: config.keys.iter().map(|k| k.name.clone()).collect(),
        models: config.models.keys().cloned().collect(),
        routers: config.routers.keys().cloned().collect(),
        tiers: config.tiers.keys().cloned().collect(),
        labels,
    }
}

pub use crate::route::classify::VerdictCache;

pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub health: Health,
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Rate limits and budgets: in memory (single node) or a shared store.
    pub limiter: LimitBackend,
    pub ledger: Option<Arc<SqliteLedger>>,
    pub cache: ArcSwap<Option<ResponseCache>>,
    /// Agent sessions: in memory, or in Redis for `[store] kind = "redis"`.
    pub sessions: Arc<dyn SessionStore>,
    pub verdicts: VerdictCache,
    /// Async Redis client of the sessions and the shared cache tier (`kind = "redis"` only).
    pub shared_redis: Option<Arc<SharedRedis>>,
    /// Cache evictions already exported to metrics.
    pub evictions_exported: std::sync::atomic::AtomicU64,
    /// Stored Responses (`store: true`): SQLite under `state_dir`, or memory.
    pub responses: crate::store::responses::ResponseStore,
}

impl AppState {
    pub fn new(config: Config) -> Result<AppState, StartupError> {
        let metrics = Metrics::with_known(&known_names(&config))
            .map_err(|e| StartupError::Other(e.to_string()))?;
        for m in config.models.keys() {
            metrics.set_deployment_healthy(m, true);
        }
        let metrics = Arc::new(metrics);
        metrics.set_store_up(true);
        let ledger = match config.store.state_dir() {
            Some(state_dir) => {
                Some(Arc::new(SqliteLedger::open(state_dir).map_err(|e| {
                    StartupError::Other(format!("store.state_dir: {e}"))
                })?))
            }
            None => None,
        };
        let dyn_ledger: Option<Arc<dyn SpendLedger>> =
            ledger.clone().map(|l| l as Arc<dyn SpendLedger>);
        let limiter = build_limiter(&config, dyn_ledger, &metrics)?;
        let shared_redis = build_shared_redis(&config, &metrics)?;
        let sessions: Arc<dyn SessionStore> = match (&shared_redis, &config.store) {
            (Some(r), StoreConfig::Redis { on_unavailable, .. }) => Arc::new(
                RedisSessionStore::new(r.clone(), *on_unavailable == OnUnavailable::FailOpen),
            ),
            _ => Arc::new(MemoryStore::default()),
        };
        let cache = build_cache(&config, shared_redis.as_ref());
        let responses = build_responses(&config)?;
        let runtime = Runtime::build(config, &sessions)?;
        Ok(AppState {
            runtime: ArcSwap::from_pointee(runtime),
            health: Health::default(),
            ready: AtomicBool::new(false),
            metrics,
            limiter,
            ledger,
            cache: ArcSwap::from_pointee(cache),
            sessions,
            verdicts: moka::sync::Cache::builder().max_capacity(10_000).build(),
            evictions_exported: std::sync::atomic::AtomicU64::new(0),
            shared_redis,
            responses,
        })
    }

    /// Swaps in a new config; limits, spend, health, sessions and the cache
    /// contents survive. An invalid config changes nothing.
    pub fn reload(&self, config: Config) -> Result<(), StartupError> {
        let runtime = Runtime::build(config, &self.sessions)?;
        self.limiter
            .reconfigure(&limit_specs(&runtime.config))
            .map_err(|e| StartupError::Other(format!("keys: {e}")))?;
        self.metrics.set_known(&known_names(&runtime.config));
        let old = self.runtime.load();
        if old.config.store != runtime.config.store {
            tracing::warn!("[store] changed: the limit store and ledger are chosen at startup; restart to apply");
        }
        let cache_changed = {
            let (a, b) = (&old.config.cache, &runtime.config.cache);
            a.enabled != b.enabled
                || a.max_bytes != b.max_bytes
                || a.ttl != b.ttl
                || a.shared != b.shared
        };
        if cache_changed {
            if runtime.config.cache.shared && self.shared_redis.is_none() {
                tracing::warn!("cache.shared: the running store is not Redis (restart to apply [store]); the cache stays per replica");
            }
            self.cache.store(Arc::new(build_cache(
                &runtime.config,
                self.shared_redis.as_ref(),
            )));
        }
        self.runtime.store(Arc::new(runtime));
        // Cached verdicts may name labels or routers the new config lacks.
        self.verdicts.invalidate_all();
        Ok(())
    }

    /// Sends queued Redis settlements (clean shutdown), waiting at most `within`.
    pub async fn flush_limits(&self, within: std::time::Duration) {
        let left = self.limiter.flush(within).await;
        if left > 0 {
            tracing::warn!(
                left,
                "redis settlements not sent at shutdown (their spend is in the ledger)"
            );
        }
    }

    /// Writes pending spend records (clean shutdown).
    pub fn flush(&self) {
        if let Some(l) = &self.ledger {
            if let Err(e) = l.flush() {
                tracing::error!(error = %e, "flushing the spend ledger failed");
            }
        }
    }
}

/// The stored-response store for `[store]`: beside the ledger under `state_dir`, or in memory.
fn build_responses(config: &Config) -> Result<ResponseStore, StartupError> {
    let retention = config.responses_retention;
    match config.store.state_dir() {
        Some(dir) => ResponseStore::open_sqlite(dir, retention)
            .map_err(|e| StartupError::Other(format!("store.state_dir: {e}"))),
        None => Ok(ResponseStore::memory(retention)),
    }
}

/// The limiter for `[store]`: in memory, or shared through Redis.
fn build_limiter(
    config: &Config,
    ledger: Option<Arc<dyn SpendLedger>>,
    metrics: &Arc<Metrics>,
) -> Result<LimitBackend, StartupError> {
    let specs = limit_specs(config);
    if let StoreConfig::Redis {
        url,
        on_unavailable,
        key_prefix,
        reservation_ttl,
        timeout,
        ..
    } = &config.store
    {
        let settings = RedisSettings {
            url: url.clone(),
            key_prefix: key_prefix.clone(),
            reservation_ttl: *reservation_ttl,
            timeout: *timeout,
            fail_open: *on_unavailable == OnUnavailable::FailOpen,
            per_subject_calls: false,
        };
        let m = metrics.clone();
        let events: StoreEvents = Arc::new(move |e| match e {
            StoreEvent::Unavailable { op, outcome } => m.record_store_unavailable(op, outcome),
            StoreEvent::Up(up) => m.set_store_up(up),
        });
        let limiter = RedisLimiter::new(&specs, settings, ledger, Some(events))
            .map_err(|e| StartupError::Other(format!("store: {e}")))?;
        limiter
            .load_fallback_spend()
            .map_err(|e| StartupError::Other(format!("loading spend from the ledger: {e}")))?;
        // Redis may come up after the gateway; until then the unavailability policy applies.
        let (probe, url) = (limiter.clone(), url.clone());
        tokio::spawn(async move {
            match probe.ping().await {
                Ok(()) => tracing::info!(url = %url, "redis limit store connected"),
                Err(e) => {
                    tracing::warn!(url = %url, error = %e, "redis limit store not reachable yet")
                }
            }
        });
        return Ok(LimitBackend::Redis(limiter));
    }
    let limiter = Limiter::new(&specs, crate::limits::Clock::system(), ledger)
        .map_err(|e| StartupError::Other(format!("keys: {e}")))?;
    limiter
        .load_spend_from_ledger()
        .map_err(|e| StartupError::Other(format!("loading spend from the ledger: {e}")))?;
    Ok(LimitBackend::Memory(limiter))
}

/// The async Redis client of the sessions and the shared cache, for `[store] kind = "redis"`.
fn build_shared_redis(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<SharedRedis>>, StartupError> {
    let StoreConfig::Redis {
        url,
        key_prefix,
        timeout,
        ..
    } = &config.store
    else {
        return Ok(None);
    };
    let m = metrics.clone();
    let events: StoreEvents = Arc::new(move |e| {
        if let StoreEvent::Unavailable { op, outcome } = e {
            m.record_store_unavailable(op, outcome);
        }
    });
    SharedRedis::new(url, key_prefix, *timeout, Some(events))
        .map(Some)
        .map_err(|e| StartupError::Other(format!("store.url: {e}")))
}

fn build_cache(config: &Config, redis: Option<&Arc<SharedRedis>>) -> Option<ResponseCache> {
    let c = &config.cache;
    c.enabled.then(|| {
        let cfg = crate::cache::CacheConfig::new(c.max_bytes, c.ttl);
        match redis {
            Some(r) if c.shared => {
                ResponseCache::with_shared(cfg, crate::cache::SharedTier::new(r.clone()))
            }
            _ => ResponseCache::new(cfg),
        }
    })
}
