//! Prometheus metrics for triage: a typed recording API over a per-instance registry.
//!
//! Label values for key, model, router, tier and label are bounded by [`KnownNames`]
//! (from config); anything else is recorded as `"other"`, an empty value as `"none"`.

mod known;
mod parse;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub use known::{KnownNames, NONE, OTHER, UNKNOWN};
pub use parse::{parse_text, sum_samples, Sample};

use known::KnownSets;

/// Content type of [`Metrics::render`] output, for the `/metrics` response header.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Buckets for end-to-end and upstream LLM latency (50 ms .. 120 s).
pub const LLM_LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    90.0, 120.0,
];
/// Buckets for the gateway's own overhead (10 µs .. 100 ms).
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,
];
/// Buckets for classifiers, which range from regex (µs) to LLM judges (s).
pub const CLASSIFIER_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Buckets for a 0..1 ratio.
pub const RATIO_BUCKETS: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Errors building the metrics registry.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The prometheus crate rejected a metric definition or encoding.
    #[error("prometheus: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// Kind of a registered metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic counter.
    Counter,
    /// Gauge.
    Gauge,
    /// Histogram (exposed as `_bucket`, `_sum`, `_count`).
    Histogram,
}

/// A registered metric family: name, kind and label names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyInfo {
    /// Family name, e.g. `triage_requests_total`.
    pub name: String,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Variable label names.
    pub labels: Vec<String>,
}

impl FamilyInfo {
    /// Series names this family exposes (histograms add `_bucket`, `_sum`, `_count`).
    pub fn series_names(&self) -> Vec<String> {
        match self.kind {
            MetricKind::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{}{s}", self.name))
                .collect(),
            _ => vec![self.name.clone()],
        }
    }
}

/// Whether and how the answer cache took part in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from cache.
    Hit,
    /// Looked up, not found.
    Miss,
    /// Cache skipped on purpose (e.g. `Cache-Control: no-cache`, non-deterministic request).
    Bypass,
    /// No cache configured for this route.
    None,
}

impl CacheOutcome {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
            Self::None => "none",
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per minute.
    Rpm,
    /// Tokens per minute.
    Tpm,
    /// Concurrent requests.
    Parallel,
    /// Spend budget.
    Budget,
    /// Session limit.
    Session,
}

impl LimitKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rpm => "rpm",
            Self::Tpm => "tpm",
            Self::Parallel => "parallel",
            Self::Budget => "budget",
            Self::Session => "session",
        }
    }
}

/// Why a classification ended as unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownReason {
    /// Best label was below the confidence threshold.
    LowConfidence,
    /// The classifier errored or timed out.
    Failure,
}

impl UnknownReason {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LowConfidence => "low_confidence",
            Self::Failure => "failure",
        }
    }
}

/// Class of an upstream error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// Request or first-byte timeout.
    Timeout,
    /// Connection or TLS failure.
    Connect,
    /// Upstream returned 429.
    RateLimited,
    /// Upstream returned 5xx.
    Server,
    /// Upstream returned another 4xx.
    Client,
    /// Malformed or truncated response body / stream.
    Protocol,
    /// Anything else.
    Other,
}

impl UpstreamErrorKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::RateLimited => "rate_limited",
            Self::Server => "server",
            Self::Client => "client",
            Self::Protocol => "protocol",
            Self::Other => "other",
        }
    }
}

/// How one upstream call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// Completed successfully.
    Ok,
    /// Failed with an error of this kind.
    Error(UpstreamErrorKind),
    /// Cancelled by the gateway (client went away, vote decided, cascade stopped).
    Cancelled,
}

impl UpstreamOutcome {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error(_) => "error",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One finished client request.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    /// Router name.
    pub router: &'a str,
    /// Classification label (`""` if none).
    pub label: &'a str,
    /// Tier served (`""` if none, e.g. a cache hit or early refusal).
    pub tier: &'a str,
    /// Model that produced the final answer (`""` if none).
    pub model: &'a str,
    /// Virtual key *name* (never the secret).
    pub key: &'a str,
    /// HTTP status returned to the client.
    pub status: u16,
    /// Cache participation.
    pub cache: CacheOutcome,
    /// Whether the response was streamed.
    pub stream: bool,
    /// Total wall time in the gateway.
    pub duration: Duration,
    /// Time spent waiting on upstreams (overlapping calls counted once).
    pub upstream_wait: Duration,
    /// Time to first token, for streams.
    pub ttft: Option<Duration>,
}

/// Token usage and cost of one upstream call or request.
#[derive(Debug, Clone, Copy)]
pub struct UsageRecord<'a> {
    /// Virtual key name.
    pub key: &'a str,
    /// Model billed.
    pub model: &'a str,
    /// Tier.
    pub tier: &'a str,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from a provider/prompt cache.
    pub cached_tokens: u64,
    /// Cost in nano-dollars.
    pub cost_nanos: u64,
}

/// Decrements `triage_inflight_requests` when dropped; owns its handle so it can live in a stream.
#[derive(Debug)]
pub struct InflightGuard(IntGauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// All of triage's metrics, on a registry owned by this instance.
pub struct Metrics {
    registry: Registry,
    families: Vec<FamilyInfo>,
    known: ArcSwap<KnownSets>,

    requests: IntCounterVec,
    request_duration: HistogramVec,
    ttft: HistogramVec,
    upstream_duration: HistogramVec,
    overhead: HistogramVec,
    inflight: IntGauge,

    tokens: IntCounterVec,
    cost_usd: CounterVec,
    cost_nanos: IntCounterVec,
    budget_remaining: GaugeVec,
    period_spend: GaugeVec,
    refusals: IntCounterVec,

    classifier_duration: HistogramVec,
    classifier_labels: IntCounterVec,
    classifier_unknown: IntCounterVec,

    fallbacks: IntCounterVec,
    retries: IntCounterVec,
    cooldowns: IntCounterVec,
    healthy: IntGaugeVec,
    upstream_errors: IntCounterVec,

    vote_agreement: HistogramVec,
    vote_cancelled: IntCounterVec,
    cascade_escalations: IntCounterVec,

    cache_hits: IntCounterVec,
    cache_misses: IntCounterVec,
    cache_bytes: IntGaugeVec,
    cache_evictions: IntCounterVec,

    sessions_active: IntGauge,
    session_limits: IntCounterVec,
    loops_detected: IntCounterVec,

    store_unavailable: IntCounterVec,
    store_up: IntGauge,

    auth_failures: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("families", &self.families.len())
            .finish_non_exhaustive()
    }
}

/// Registers collectors and remembers their names (gather() hides empty vecs).
struct Reg {
    registry: Registry,
    families: Vec<FamilyInfo>,
}

impl Reg {
    fn note(&mut self, name: &str, kind: MetricKind, labels: &[&str]) {
        self.families.push(FamilyInfo {
            name: name.to_string(),
            kind,
            labels: labels.iter().map(|l| l.to_string()).collect(),
        });
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        let v = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(v.clone()))?;
        self.note(name, MetricKind::Counter, labels);
        Ok(v)
    }

    fn float_counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<CounterVec, MetricsError> {
        let v = CounterVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(v.clone()))?;
        self.note(name, MetricKind::Counter, labels);
        Ok(v)
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec, MetricsError> {
        let v = GaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(v.clone()))?;
        self.note(name, MetricKind::Gauge, labels);
        Ok(v)
    }

    fn int_gauge_vec(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        let v = IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(v.clone()))?;
        self.note(name, MetricKind::Gauge, labels);
        Ok(v)
    }

    fn int_gauge(&mut self, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
        let v = IntGauge::new(name, help)?;
        self.registry.register(Box::new(v.clone()))?;
        self.note(name, MetricKind::Gauge, &[]);
        Ok(v)
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<HistogramVec, MetricsError> {
        let v = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )?;
        self.registry.register(Box::new(v.clone()))?;
        self.note(name, MetricKind::Histogram, labels);
        Ok(v)
    }
}

/// Child handle for `vals`; `None` only on a label-count bug, which we prefer to drop than panic on.
#[inline]
fn child<B: MetricVecBuilder>(v: &MetricVec<B>, vals: &[&str]) -> Option<B::M> {
    v.get_metric_with_label_values(vals).ok()
}

fn inc(v: &IntCounterVec, vals: &[&str]) {
    inc_by(v, vals, 1);
}

fn inc_by(v: &IntCounterVec, vals: &[&str], n: u64) {
    if let Some(c) = child(v, vals) {
        c.inc_by(n);
    }
}

fn observe(v: &HistogramVec, vals: &[&str], x: f64) {
    if let Some(h) = child(v, vals) {
        h.observe(x);
    }
}

/// `"2xx"`..`"5xx"` (or `"other"`) from an HTTP status.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => OTHER,
    }
}

/// Nano-dollars to dollars, only at the export edge.
fn nanos_to_usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

/// Unsigned variant of [`nanos_to_usd`].
fn unanos_to_usd(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

fn bool_str(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

impl Metrics {
    /// Builds every metric on a fresh registry; all label values map to "other" until [`Self::set_known`].
    pub fn new() -> Result<Self, MetricsError> {
        Self::with_known(&KnownNames::default())
    }

    /// Builds every metric with an initial set of known names.
    pub fn with_known(known: &KnownNames) -> Result<Self, MetricsError> {
        let mut r = Reg {
            registry: Registry::new(),
            families: Vec::new(),
        };
        let m = Self {
            requests: r.counter(
                "triage_requests_total",
                "Client requests finished, by routing decision and outcome.",
                &[
                    "router",
                    "label",
                    "tier",
                    "model",
                    "key",
                    "status_class",
                    "cache",
                ],
            )?,
            request_duration: r.histogram(
                "triage_request_duration_seconds",
                "End-to-end request duration in the gateway.",
                &["router", "tier", "model", "stream"],
                LLM_LATENCY_BUCKETS,
            )?,
            ttft: r.histogram(
                "triage_time_to_first_token_seconds",
                "Time to first streamed token.",
                &["model"],
                LLM_LATENCY_BUCKETS,
            )?,
            upstream_duration: r.histogram(
                "triage_upstream_duration_seconds",
                "Duration of single upstream calls.",
                &["model", "outcome"],
                LLM_LATENCY_BUCKETS,
            )?,
            overhead: r.histogram(
                "triage_gateway_overhead_seconds",
                "Request time not spent waiting on upstreams.",
                &["router"],
                OVERHEAD_BUCKETS,
            )?,
            inflight: r.int_gauge("triage_inflight_requests", "Requests being served now.")?,

            tokens: r.counter(
                "triage_tokens_total",
                "Tokens metered, by direction (prompt|completion|cached).",
                &["key", "model", "direction"],
            )?,
            cost_usd: r.float_counter(
                "triage_cost_usd_total",
                "Cost in US dollars (converted from integer nano-dollars).",
                &["key", "model", "tier"],
            )?,
            cost_nanos: r.counter(
                "triage_cost_nanodollars_total",
                "Cost in integer nano-dollars (exact).",
                &["key", "model", "tier"],
            )?,
            budget_remaining: r.gauge(
                "triage_budget_remaining_usd",
                "Budget left in the current period, US dollars.",
                &["key"],
            )?,
            period_spend: r.gauge(
                "triage_period_spend_usd",
                "Spend in the current budget period, US dollars.",
                &["key"],
            )?,
            refusals: r.counter(
                "triage_limit_refusals_total",
                "Requests refused by a limit (rpm|tpm|parallel|budget|session).",
                &["key", "kind"],
            )?,

            classifier_duration: r.histogram(
                "triage_classifier_duration_seconds",
                "Classifier latency.",
                &["classifier"],
                CLASSIFIER_BUCKETS,
            )?,
            classifier_labels: r.counter(
                "triage_classifier_labels_total",
                "Classifications, by resulting label.",
                &["router", "label"],
            )?,
            classifier_unknown: r.counter(
                "triage_classifier_unknown_total",
                "Classifications that ended unknown (low_confidence|failure).",
                &["router", "reason"],
            )?,

            fallbacks: r.counter(
                "triage_fallbacks_total",
                "Fallbacks from one model to another.",
                &["from_model", "to_model"],
            )?,
            retries: r.counter("triage_retries_total", "Upstream call retries.", &["model"])?,
            cooldowns: r.counter(
                "triage_deployment_cooldowns_total",
                "Deployments put into cooldown.",
                &["model"],
            )?,
            healthy: r.int_gauge_vec(
                "triage_deployment_healthy",
                "1 if the deployment is eligible for traffic, else 0.",
                &["model"],
            )?,
            upstream_errors: r.counter(
                "triage_upstream_errors_total",
                "Upstream call errors by kind.",
                &["model", "kind"],
            )?,

            vote_agreement: r.histogram(
                "triage_vote_agreement_ratio",
                "Share of voters agreeing with the winning answer.",
                &["router", "strategy"],
                RATIO_BUCKETS,
            )?,
            vote_cancelled: r.counter(
                "triage_vote_cancelled_total",
                "Voter calls cancelled once the vote was decided.",
                &["router"],
            )?,
            cascade_escalations: r.counter(
                "triage_cascade_escalations_total",
                "Cascade escalations to a higher tier, by gate.",
                &["router", "gate"],
            )?,

            cache_hits: r.counter("triage_cache_hits_total", "Cache hits.", &["cache"])?,
            cache_misses: r.counter("triage_cache_misses_total", "Cache misses.", &["cache"])?,
            cache_bytes: r.int_gauge_vec(
                "triage_cache_bytes",
                "Approximate cache size in bytes.",
                &["cache"],
            )?,
            cache_evictions: r.counter(
                "triage_cache_evictions_total",
                "Cache entries evicted.",
                &["cache"],
            )?,

            sessions_active: r.int_gauge("triage_sessions_active", "Sessions being tracked.")?,
            session_limits: r.counter(
                "triage_session_limits_total",
                "Session limits hit, by kind.",
                &["kind"],
            )?,
            loops_detected: r.counter(
                "triage_loops_detected_total",
                "Agent loops detected, by action taken.",
                &["action"],
            )?,

            store_unavailable: r.counter(
                "triage_store_unavailable_total",
                "Shared-store calls that failed, by operation (admit|settle|status) and what happened instead (refused|local|queued|skipped).",
                &["op", "outcome"],
            )?,
            store_up: r.int_gauge(
                "triage_store_up",
                "1 while the shared limit store (Redis) answers, 0 while it does not; 1 for local stores.",
            )?,

            auth_failures: r.counter(
                "triage_auth_failures_total",
                "Requests refused by authentication, by reason (missing|invalid|too_many_failures).",
                &["reason"],
            )?,

            known: ArcSwap::from_pointee(KnownSets::from_names(known)),
            registry: r.registry,
            families: r.families,
        };
        Ok(m)
    }

    /// Replaces the allowed label values (hot reload). Existing series are kept.
    pub fn set_known(&self, names: &KnownNames) {
        self.known.store(Arc::new(KnownSets::from_names(names)));
    }

    /// The underlying registry, e.g. to register process collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every family this instance registers (including ones with no samples yet).
    pub fn families(&self) -> &[FamilyInfo] {
        &self.families
    }

    /// Text exposition format, or an error if encoding fails.
    pub fn try_render(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)?;
        Ok(out)
    }

    /// Text exposition format for `GET /metrics` (serve with [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        self.try_render()
            .unwrap_or_else(|e| format!("# triage metrics encoding failed: {e}\n"))
    }

    /// Counts a request as in flight until the guard drops.
    pub fn inflight(&self) -> InflightGuard {
        self.inflight.inc();
        InflightGuard(self.inflight.clone())
    }

    /// Records one finished client request: count, duration, TTFT and gateway overhead.
    pub fn record_request(&self, r: &RequestRecord<'_>) {
        let k = self.known.load();
        let router = k.router(r.router);
        let tier = k.tier(r.tier);
        let model = k.model(r.model);
        inc(
            &self.requests,
            &[
                router,
                k.label(r.label),
                tier,
                model,
                k.key(r.key),
                status_class(r.status),
                r.cache.as_str(),
            ],
        );
        observe(
            &self.request_duration,
            &[router, tier, model, bool_str(r.stream)],
            r.duration.as_secs_f64(),
        );
        if let Some(t) = r.ttft {
            observe(&self.ttft, &[model], t.as_secs_f64());
        }
        let overhead = r.duration.saturating_sub(r.upstream_wait);
        observe(&self.overhead, &[router], overhead.as_secs_f64());
    }

    /// Records tokens and cost; cost goes to both the exact nano counter and the USD counter.
    pub fn record_usage(&self, u: &UsageRecord<'_>) {
        let k = self.known.load();
        let key = k.key(u.key);
        let model = k.model(u.model);
        let tier = k.tier(u.tier);
        inc_by(&self.tokens, &[key, model, "prompt"], u.prompt_tokens);
        inc_by(
            &self.tokens,
            &[key, model, "completion"],
            u.completion_tokens,
        );
        inc_by(&self.tokens, &[key, model, "cached"], u.cached_tokens);
        inc_by(&self.cost_nanos, &[key, model, tier], u.cost_nanos);
        if let Some(c) = child(&self.cost_usd, &[key, model, tier]) {
            c.inc_by(unanos_to_usd(u.cost_nanos));
        }
    }

    /// Sets a key's remaining budget (may be negative when overspent). Unknown keys are skipped.
    pub fn set_budget_remaining(&self, key: &str, remaining_nanos: i64) {
        if self.known.load().has_key(key) {
            if let Some(g) = child(&self.budget_remaining, &[key]) {
                g.set(nanos_to_usd(remaining_nanos));
            }
        }
    }

    /// Sets a key's spend in the current period. Unknown keys are skipped.
    pub fn set_period_spend(&self, key: &str, spend_nanos: u64) {
        if self.known.load().has_key(key) {
            if let Some(g) = child(&self.period_spend, &[key]) {
                g.set(unanos_to_usd(spend_nanos));
            }
        }
    }

    /// Counts a request refused by a limit.
    pub fn record_refusal(&self, key: &str, kind: LimitKind) {
        let k = self.known.load();
        inc(&self.refusals, &[k.key(key), kind.as_str()]);
    }

    /// Records one classification. `classifier` is the classifier kind (code-defined, bounded).
    pub fn record_classification(
        &self,
        router: &str,
        classifier: &'static str,
        label: &str,
        duration: Duration,
        unknown: Option<UnknownReason>,
    ) {
        let k = self.known.load();
        let router = k.router(router);
        observe(
            &self.classifier_duration,
            &[classifier],
            duration.as_secs_f64(),
        );
        inc(&self.classifier_labels, &[router, k.label(label)]);
        if let Some(reason) = unknown {
            inc(&self.classifier_unknown, &[router, reason.as_str()]);
        }
    }

    /// Records one upstream call; errors also count in `triage_upstream_errors_total`.
    pub fn record_upstream(&self, model: &str, duration: Duration, outcome: UpstreamOutcome) {
        let k = self.known.load();
        let model = k.model(model);
        observe(
            &self.upstream_duration,
            &[model, outcome.as_str()],
            duration.as_secs_f64(),
        );
        if let UpstreamOutcome::Error(kind) = outcome {
            inc(&self.upstream_errors, &[model, kind.as_str()]);
        }
    }

    /// Counts an upstream error without a timed call (e.g. a stream broken mid-way).
    pub fn record_upstream_error(&self, model: &str, kind: UpstreamErrorKind) {
        let k = self.known.load();
        inc(&self.upstream_errors, &[k.model(model), kind.as_str()]);
    }

    /// Counts a fallback from one model to another.
    pub fn record_fallback(&self, from_model: &str, to_model: &str) {
        let k = self.known.load();
        inc(&self.fallbacks, &[k.model(from_model), k.model(to_model)]);
    }

    /// Counts a retry against a model.
    pub fn record_retry(&self, model: &str) {
        let k = self.known.load();
        inc(&self.retries, &[k.model(model)]);
    }

    /// Counts a deployment entering cooldown and marks it unhealthy.
    pub fn record_cooldown(&self, model: &str) {
        let k = self.known.load();
        inc(&self.cooldowns, &[k.model(model)]);
        self.set_deployment_healthy(model, false);
    }

    /// Sets a deployment's health gauge. Unknown models are skipped.
    pub fn set_deployment_healthy(&self, model: &str, healthy: bool) {
        if self.known.load().has_model(model) {
            if let Some(g) = child(&self.healthy, &[model]) {
                g.set(i64::from(healthy));
            }
        }
    }

    /// Records a finished vote: agreement in 0..=1 (clamped, NaN ignored) and cancelled voter calls.
    pub fn record_vote(
        &self,
        router: &str,
        strategy: &'static str,
        agreement: f64,
        cancelled: u64,
    ) {
        let k = self.known.load();
        let router = k.router(router);
        if !agreement.is_nan() {
            observe(
                &self.vote_agreement,
                &[router, strategy],
                agreement.clamp(0.0, 1.0),
            );
        }
        if cancelled > 0 {
            inc_by(&self.vote_cancelled, &[router], cancelled);
        }
    }

    /// Counts a cascade escalation triggered by `gate` (code-defined gate kind).
    pub fn record_cascade_escalation(&self, router: &str, gate: &'static str) {
        let k = self.known.load();
        inc(&self.cascade_escalations, &[k.router(router), gate]);
    }

    /// Counts a cache lookup on the named cache (code-defined, e.g. "exact", "semantic").
    pub fn record_cache_lookup(&self, cache: &'static str, hit: bool) {
        if hit {
            inc(&self.cache_hits, &[cache]);
        } else {
            inc(&self.cache_misses, &[cache]);
        }
    }

    /// Counts evicted cache entries.
    pub fn record_cache_evictions(&self, cache: &'static str, n: u64) {
        inc_by(&self.cache_evictions, &[cache], n);
    }

    /// Sets the cache's size in bytes.
    pub fn set_cache_bytes(&self, cache: &'static str, bytes: u64) {
        if let Some(g) = child(&self.cache_bytes, &[cache]) {
            g.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// Sets the number of tracked sessions.
    pub fn set_sessions_active(&self, n: u64) {
        self.sessions_active
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a session limit hit (code-defined kind, e.g. "turns", "cost", "duration").
    pub fn record_session_limit(&self, kind: &'static str) {
        inc(&self.session_limits, &[kind]);
    }

    /// Counts a detected agent loop and the action taken (code-defined, e.g. "warn", "block").
    pub fn record_loop_detected(&self, action: &'static str) {
        inc(&self.loops_detected, &[action]);
    }

    /// Counts a shared-store call that failed: `op` is admit|settle|status, `outcome` what the
    /// gateway did instead (refused|local|queued|skipped).
    pub fn record_store_unavailable(&self, op: &'static str, outcome: &'static str) {
        inc(&self.store_unavailable, &[op, outcome]);
    }

    /// Counts a request refused by authentication; `reason` is code-defined
    /// (missing|invalid|too_many_failures), never anything the client sent.
    pub fn record_auth_failure(&self, reason: &'static str) {
        inc(&self.auth_failures, &[reason]);
    }

    /// Whether the shared limit store answers.
    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }
}

/// Names of every metric family registered on `m`.
pub fn metric_family_names(m: &Metrics) -> BTreeSet<String> {
    m.families.iter().map(|f| f.name.clone()).collect()
}

#[cfg(test)]
mod tests;
