//! Routing: the rule table that maps a classified request to a tier, the
//! deployment order inside a tier, and deployment health (cooldown after
//! repeated failures, half-open probing, latency EWMA).

use crate::config::{
    Condition, Config, ModelConfig, RouterConfig, TierConfig, TierStrategy, UNKNOWN_LABEL,
};
use crate::protocol::openai::chat::RequestFeatures;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a request went where it went.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteReason {
    /// The client named a model.
    Direct,
    /// Rule `n` of the router matched.
    Rule(usize),
    /// The label was unknown, below `min_confidence`, or the classifier failed.
    Unknown(&'static str),
}

/// A routing decision: logged, exported as metrics, echoed in `x-triage-route`.
#[derive(Debug, Clone)]
pub struct RouteDecision {
    pub router: Option<String>,
    /// `unknown` when the classifier's best label fell below `min_confidence`.
    pub label: Option<String>,
    /// The classifier's best label, when `label` became `unknown` in its place.
    pub top: Option<String>,
    pub confidence: Option<f32>,
    pub tier: Option<String>,
    /// The deployment that served (set after dispatch; empty when none did).
    pub model: String,
    pub reason: RouteReason,
    /// Deployments tried and abandoned before `model` answered.
    pub fell_back_from: Vec<String>,
    /// Deployments passed over without a call because they were cooling down.
    pub skipped: Vec<String>,
    /// The serving deployment's API when it is not chat completions (the
    /// request was translated), e.g. `anthropic`.
    pub upstream_api: Option<&'static str>,
}

impl RouteDecision {
    pub fn direct(model: &str) -> Self {
        RouteDecision {
            router: None,
            label: None,
            top: None,
            confidence: None,
            tier: None,
            model: model.to_string(),
            reason: RouteReason::Direct,
            fell_back_from: Vec::new(),
            skipped: Vec::new(),
            upstream_api: None,
        }
    }

    pub fn reason_str(&self) -> String {
        let mut s = match &self.reason {
            RouteReason::Direct => "direct".to_string(),
            RouteReason::Rule(i) => format!("rule[{i}]"),
            RouteReason::Unknown(why) => format!("unknown:{why}"),
        };
        if !self.fell_back_from.is_empty() || !self.skipped.is_empty() {
            s.push_str("+fallback");
        }
        s
    }

    /// Header value: `router=auto; label=code; confidence=0.93; tier=large; model=smart; reason=rule[1]`,
    /// on errors too (then `model` is absent and `fallback_from` lists every deployment tried).
    pub fn header_value(&self) -> String {
        let mut s = String::with_capacity(96);
        if let Some(r) = &self.router {
            let _ = write!(s, "router={r}; ");
        }
        if let Some(l) = &self.label {
            let _ = write!(s, "label={l}; ");
        }
        if let Some(t) = &self.top {
            let _ = write!(s, "top={t}; ");
        }
        if let Some(c) = self.confidence {
            let _ = write!(s, "confidence={c:.2}; ");
        }
        if let Some(t) = &self.tier {
            let _ = write!(s, "tier={t}; ");
        }
        if !self.model.is_empty() {
            let _ = write!(s, "model={}; ", self.model);
        }
        let _ = write!(s, "reason={}", self.reason_str());
        if !self.fell_back_from.is_empty() {
            let _ = write!(s, "; fallback_from={}", self.fell_back_from.join(","));
        }
        if !self.skipped.is_empty() {
            let _ = write!(s, "; cooling={}", self.skipped.join(","));
        }
        if let Some(a) = self.upstream_api {
            let _ = write!(s, "; upstream_api={a}");
        }
        s
    }
}

/// The classifier's verdict for one request.
#[derive(Debug, Clone)]
pub struct Classification {
    pub label: String,
    pub confidence: f32,
    /// Set when the classifier could not answer (timeout, error, bad output).
    pub failed: bool,
    /// An LLM classifier's own call, billed to the request.
    pub bill: Option<(Arc<ModelConfig>, crate::usage::Usage)>,
}

/// What a rule can look at besides the classification.
pub struct RuleInput<'a> {
    pub features: &'a RequestFeatures,
    pub key: Option<&'a str>,
    pub headers: &'a crate::protocol::Headers,
}

/// First matching rule wins; unknown or low-confidence labels go to `unknown_tier`.
pub fn choose_tier(
    router: &RouterConfig,
    c: &Classification,
    input: &RuleInput<'_>,
) -> (String, RouteReason) {
    if c.failed {
        return (
            router.unknown_tier.clone(),
            RouteReason::Unknown("classifier_failed"),
        );
    }
    if c.label == UNKNOWN_LABEL {
        return (router.unknown_tier.clone(), RouteReason::Unknown("label"));
    }
    if c.confidence < router.min_confidence {
        return (
            router.unknown_tier.clone(),
            RouteReason::Unknown("low_confidence"),
        );
    }
    for (i, rule) in router.rules.iter().enumerate() {
        if matches(&rule.when, c, input) {
            return (rule.tier.clone(), RouteReason::Rule(i));
        }
    }
    (router.unknown_tier.clone(), RouteReason::Unknown("no_rule"))
}

fn matches(w: &Condition, c: &Classification, input: &RuleInput<'_>) -> bool {
    let f = input.features;
    if let Some(ls) = &w.labels {
        if !ls.contains(&c.label) {
            return false;
        }
    }
    if let Some(m) = w.min_confidence {
        if c.confidence < m {
            return false;
        }
    }
    if w.min_prompt_tokens.is_some_and(|m| f.prompt_tokens < m) {
        return false;
    }
    if w.max_prompt_tokens.is_some_and(|m| f.prompt_tokens > m) {
        return false;
    }
    if w.has_tools.is_some_and(|b| b != f.has_tools)
        || w.has_images.is_some_and(|b| b != f.has_images)
        || w.json_response.is_some_and(|b| b != f.json_response)
    {
        return false;
    }
    if w.min_turns.is_some_and(|m| f.turns < m) || w.max_turns.is_some_and(|m| f.turns > m) {
        return false;
    }
    if let Some(keys) = &w.keys {
        match input.key {
            Some(k) if keys.iter().any(|x| x == k) => {}
            _ => return false,
        }
    }
    if let Some((name, want)) = &w.header {
        match (input.headers.get(name.as_str()), want) {
            (None, _) => return false,
            (Some(_), None) => {}
            (Some(v), Some(want)) => {
                if v.as_bytes() != want.as_bytes() {
                    return false;
                }
            }
        }
    }
    true
}

#[derive(Debug, Default)]
struct DeploymentState {
    consecutive_failures: u32,
    cooldown_until: Option<Instant>,
    /// A probe is in flight after a cooldown (half-open): others keep away.
    probing: bool,
    ewma_ms: Option<f64>,
}

/// Health of every deployment; survives config reloads.
#[derive(Default)]
pub struct Health {
    states: Mutex<HashMap<String, DeploymentState>>,
}

/// What `Health::admit` says about a deployment right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Healthy,
    /// First request after a cooldown.
    Probe,
    CoolingDown,
}

impl Health {
    pub fn admit(&self, model: &str) -> Admit {
        let mut states = self.states.lock();
        let Some(s) = states.get_mut(model) else {
            return Admit::Healthy;
        };
        match s.cooldown_until {
            None => Admit::Healthy,
            Some(t) if Instant::now() < t => Admit::CoolingDown,
            Some(_) if s.probing => Admit::CoolingDown,
            Some(_) => {
                s.probing = true;
                Admit::Probe
            }
        }
    }

    /// True while `model` is in cooldown (does not take a probe slot).
    pub fn admit_peek_cooling(&self, model: &str) -> bool {
        let states = self.states.lock();
        states
            .get(model)
            .and_then(|s| s.cooldown_until)
            .is_some_and(|t| Instant::now() < t)
    }

    /// Time until `model`'s cooldown ends, while it is cooling down.
    pub fn cooldown_left(&self, model: &str) -> Option<Duration> {
        let states = self.states.lock();
        let until = states.get(model)?.cooldown_until?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    pub fn success(&self, model: &str, latency: Duration) {
        let mut states = self.states.lock();
        let s = states.entry(model.to_string()).or_default();
        s.consecutive_failures = 0;
        s.cooldown_until = None;
        s.probing = false;
        let ms = latency.as_secs_f64() * 1000.0;
        s.ewma_ms = Some(match s.ewma_ms {
            Some(e) => e * 0.8 + ms * 0.2,
            None => ms,
        });
    }

    /// Records a failure; returns true when it put the deployment in cooldown.
    pub fn failure(
        &self,
        model: &str,
        tier: Option<&TierConfig>,
        retry_after: Option<Duration>,
    ) -> bool {
        let (after, cooldown) = tier
            .map(|t| (t.cooldown_after, t.cooldown))
            .unwrap_or((3, Duration::from_secs(30)));
        let mut states = self.states.lock();
        let s = states.entry(model.to_string()).or_default();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        let was_probe = s.probing;
        s.probing = false;
        if s.consecutive_failures >= after || was_probe {
            let wait = retry_after.map_or(cooldown, |r| r.max(cooldown));
            s.cooldown_until = Some(Instant::now() + wait);
            return true;
        }
        // The provider said when to come back (Retry-After): stay away that long.
        if let Some(r) = retry_after.filter(|r| !r.is_zero()) {
            s.cooldown_until = Some(Instant::now() + r);
            return true;
        }
        false
    }

    /// Gives up a probe slot without a verdict (request cancelled).
    pub fn release_probe(&self, model: &str) {
        if let Some(s) = self.states.lock().get_mut(model) {
            s.probing = false;
        }
    }

    fn ewma(&self, model: &str) -> Option<f64> {
        self.states.lock().get(model).and_then(|s| s.ewma_ms)
    }
}

/// One deployment to try, with the tier it came from.
#[derive(Clone)]
pub struct Candidate {
    pub model: Arc<ModelConfig>,
    pub tier: Option<Arc<TierConfig>>,
}

/// Deployment order for a tier, then its fallback tiers.
pub fn tier_candidates(cfg: &Config, tier: &str, health: &Health) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut cur = cfg.tiers.get(tier);
    let mut guard = 0;
    while let Some(t) = cur {
        guard += 1;
        if guard > cfg.tiers.len() {
            break; // validation forbids cycles; stay safe anyway
        }
        for name in order_in_tier(cfg, t, health) {
            if let Some(m) = cfg.models.get(&name) {
                out.push(Candidate {
                    model: m.clone(),
                    tier: Some(t.clone()),
                });
            }
        }
        cur = t.fallback_tier.as_ref().and_then(|f| cfg.tiers.get(f));
    }
    out
}

/// A directly requested model, then its configured fallbacks.
pub fn direct_candidates(cfg: &Config, model: &Arc<ModelConfig>) -> Vec<Candidate> {
    let mut out = vec![Candidate {
        model: model.clone(),
        tier: None,
    }];
    for f in &model.fallbacks {
        if let Some(m) = cfg.models.get(f) {
            out.push(Candidate {
                model: m.clone(),
                tier: None,
            });
        }
    }
    out
}

fn order_in_tier(cfg: &Config, t: &TierConfig, health: &Health) -> Vec<String> {
    let mut names = t.models.clone();
    match t.strategy {
        TierStrategy::Ordered => {}
        // Weighted random first pick; the rest keep config order as fallbacks.
        TierStrategy::Weighted => apply_weights(cfg, t, &mut names),
        TierStrategy::LeastLatency => {
            // Power of two choices over the latency EWMA.
            if names.len() > 1 {
                let a = rand::random_range(0..names.len());
                let mut b = rand::random_range(0..names.len() - 1);
                if b >= a {
                    b += 1;
                }
                let la = health.ewma(&names[a]).unwrap_or(0.0);
                let lb = health.ewma(&names[b]).unwrap_or(0.0);
                let best = if lb < la { b } else { a };
                names.swap(0, best);
            }
        }
    }
    names
}

fn apply_weights(cfg: &Config, t: &TierConfig, names: &mut [String]) {
    if t.strategy != TierStrategy::Weighted || names.len() < 2 {
        return;
    }
    let weights: Vec<u32> = names
        .iter()
        .map(|n| cfg.models.get(n).map_or(1, |m| m.weight))
        .collect();
    let total: u32 = weights.iter().sum();
    if total == 0 {
        return;
    }
    let r = rand::random_range(0..total);
    let mut acc = 0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if r < acc {
            names.swap(0, i);
            return;
        }
    }
}

pub mod classify;
