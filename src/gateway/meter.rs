//! Step 8: when a response ends (or the client leaves), settle spend and
//! tokens, record metrics, and charge the agent sessions.

use super::plan::Plan;
use super::state::AppState;
use super::Caller;
use crate::config::ModelConfig;
use crate::guard::{Guard, SessionKey};
use crate::limits::{self, Admission, Settlement};
use crate::metrics::{CacheOutcome, RequestRecord, UsageRecord};
use crate::route::RouteDecision;
use crate::usage::Usage;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Spend and tokens of one finished request, per model actually billed.
#[derive(Default)]
pub struct Bill {
    /// (model, usage, cost) per upstream call that produced tokens.
    lines: Vec<(Arc<ModelConfig>, Usage, u64)>,
}

impl Bill {
    pub fn add(&mut self, model: &Arc<ModelConfig>, usage: Usage) {
        let cost = cost_of(model, &usage);
        self.lines.push((model.clone(), usage, cost));
    }

    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        for (_, l, _) in &self.lines {
            u.add(l);
        }
        u
    }

    pub fn cost(&self) -> u64 {
        self.lines.iter().map(|(_, _, c)| *c).sum()
    }
}

pub fn price_of(m: &ModelConfig) -> limits::Price {
    m.price
}

/// Cost in nano-dollars, each token class billed once. `Usage` follows
/// OpenAI's shape: `prompt_tokens` includes the cache reads (`cached_tokens`)
/// and cache writes (`cache_write_tokens`), which are priced apart from the
/// plain input (Anthropic's `input_tokens` was already widened on the way in).
pub fn cost_of(m: &ModelConfig, u: &Usage) -> u64 {
    crate::limits::cost_nanos(
        u.prompt_tokens,
        u.cached_tokens,
        u.cache_write_tokens,
        u.completion_tokens,
        &m.price,
    )
}

/// Everything a `Meter` is built from, once the request is admitted.
pub struct MeterInit<'a> {
    pub app: &'a Arc<AppState>,
    pub caller: &'a Caller,
    pub plan: &'a Plan,
    pub request_id: &'a Arc<str>,
    pub started: Instant,
    pub stream: bool,
    pub cache: CacheOutcome,
    pub admission: Option<Admission>,
    pub sessions: Vec<(Arc<Guard>, SessionKey)>,
    /// Prompt tokens that go upstream per call (`None`: nothing does, a cache hit).
    pub prompt_tokens: Option<u64>,
}

/// Settles one request exactly once: by `finish`, or on drop when the client
/// left before the response ended.
pub struct Meter {
    app: Arc<AppState>,
    key: Option<String>,
    router: String,
    label: String,
    tier: String,
    model: String,
    admission: Option<Admission>,
    sessions: Vec<(Arc<Guard>, SessionKey)>,
    started: Instant,
    upstream_wait: Duration,
    stream: bool,
    cache: CacheOutcome,
    request_id: Arc<str>,
    /// Charged when the client leaves before the response ends: the prompt
    /// already went upstream, and the provider bills it.
    abandoned: Option<(Arc<ModelConfig>, Usage)>,
    finished: bool,
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut bill = Bill::default();
        if let Some((m, u)) = self.abandoned.take() {
            bill.add(&m, u);
        }
        tracing::info!(request_id = %self.request_id, "client left before the response ended; settling the prompt");
        self.settle(499, &bill, None);
    }
}

impl Meter {
    pub fn new(i: MeterInit<'_>) -> Meter {
        let calls = i.plan.vote.as_ref().map_or(1, |v| v.cfg.n);
        let abandoned = i.prompt_tokens.and_then(|prompt| {
            let m = i.plan.candidates.first()?;
            let u = Usage {
                prompt_tokens: prompt.saturating_mul(u64::from(calls.max(1))),
                completion_tokens: 0,
                cached_tokens: 0,
                cache_write_tokens: 0,
                estimated: true,
            };
            Some((m.model.clone(), u))
        });
        let d = &i.plan.decision;
        Meter {
            app: i.app.clone(),
            key: i.caller.name().map(str::to_string),
            router: d.router.clone().unwrap_or_default(),
            label: d.label.clone().unwrap_or_default(),
            tier: d.tier.clone().unwrap_or_default(),
            model: String::new(),
            admission: i.admission,
            sessions: i.sessions,
            started: i.started,
            upstream_wait: Duration::ZERO,
            stream: i.stream,
            cache: i.cache,
            request_id: i.request_id.clone(),
            abandoned,
            finished: false,
        }
    }

    /// Where the request finally went (after fallback, vote or cascade).
    pub fn routed(&mut self, decision: &RouteDecision, upstream_wait: Duration) {
        self.model = decision.model.clone();
        if let Some(t) = &decision.tier {
            self.tier = t.clone();
        }
        self.upstream_wait = upstream_wait;
    }

    /// Time spent on providers when no single deployment answered (a failed vote).
    pub fn waited(&mut self, upstream_wait: Duration) {
        self.upstream_wait = upstream_wait;
    }

    /// Settles spend and tokens, records metrics, updates the sessions.
    pub fn finish(mut self, status: u16, bill: &Bill, first_byte: Option<Duration>) {
        self.settle(status, bill, first_byte);
    }

    fn settle(&mut self, status: u16, bill: &Bill, first_byte: Option<Duration>) {
        self.finished = true;
        let usage = bill.usage();
        let cost = bill.cost();
        if let Some(adm) = self.admission.take() {
            let out = adm.settle(&Settlement {
                model: &self.model,
                request_id: &self.request_id,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                cached_tokens: usage.cached_tokens,
                cost_nanos: cost,
                estimated: usage.estimated,
            });
            if out.overrun_nanos > 0 {
                tracing::warn!(request_id = %self.request_id, overrun_nanos = out.overrun_nanos, "request cost more than its reservation");
            }
        }
        self.record(status, bill, first_byte);
        if !self.sessions.is_empty() {
            let sessions = std::mem::take(&mut self.sessions);
            let tokens = usage.total();
            // A settled session may have crossed a ceiling: the next request
            // is refused by the guard's check.
            tokio::spawn(async move {
                for (g, sk) in sessions {
                    g.record(Some(&sk), tokens, cost, SystemTime::now()).await;
                }
            });
        }
    }

    fn record(&self, status: u16, bill: &Bill, first_byte: Option<Duration>) {
        let m = &self.app.metrics;
        let key = self.key.as_deref().unwrap_or("");
        m.record_request(&RequestRecord {
            router: &self.router,
            label: &self.label,
            tier: &self.tier,
            model: &self.model,
            key,
            status,
            cache: self.cache,
            stream: self.stream,
            duration: self.started.elapsed(),
            upstream_wait: self.upstream_wait,
            ttft: if self.stream { first_byte } else { None },
        });
        for (model, u, c) in &bill.lines {
            m.record_usage(&UsageRecord {
                key,
                model: &model.name,
                tier: &self.tier,
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                cached_tokens: u.cached_tokens,
                cost_nanos: *c,
            });
        }
    }
}

#[cfg(test)]
mod cost_tests {
    use super::*;
    use crate::config::Price;

    fn model(price: Price) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            provider: "p".into(),
            upstream_model: "m".into(),
            price,
            max_output_tokens: 1024,
            fallbacks: Vec::new(),
            weight: 1,
        }
    }

    #[test]
    fn openai_shape_bills_cached_tokens_once() {
        // gpt-4o-like: $2.50 in, $1.25 cached, $10 out per Mtok.
        let m = model(Price {
            input: 2_500_000_000,
            cached_input: 1_250_000_000,
            cache_write: 2_500_000_000,
            output: 10_000_000_000,
        });
        // prompt_tokens 1000 includes 400 cached: 600 * 2.5 + 400 * 1.25 + 500 * 10 (micro-$).
        let u = Usage::from_json(&serde_json::json!({
            "prompt_tokens": 1000, "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 400}
        }))
        .unwrap_or_default();
        assert_eq!(cost_of(&m, &u), 1_500_000 + 500_000 + 5_000_000);
    }

    #[test]
    fn anthropic_shape_bills_reads_and_writes_once() {
        // claude-sonnet-like: $3 in, $0.30 cache read, $3.75 cache write, $15 out.
        let m = model(Price {
            input: 3_000_000_000,
            cached_input: 300_000_000,
            cache_write: 3_750_000_000,
            output: 15_000_000_000,
        });
        let u = crate::protocol::anthropic::usage_from_messages(&serde_json::json!({
            "input_tokens": 100, "cache_read_input_tokens": 2000,
            "cache_creation_input_tokens": 1000, "output_tokens": 200
        }))
        .unwrap_or_default();
        assert_eq!(u.prompt_tokens, 3100);
        // 100 * 3 + 2000 * 0.30 + 1000 * 3.75 + 200 * 15 (micro-$).
        assert_eq!(cost_of(&m, &u), 300_000 + 600_000 + 3_750_000 + 3_000_000);
        // Through the chat-shaped usage the gateway reads back, nothing changes.
        let again = Usage::from_json(&u.to_json()).unwrap_or_default();
        assert_eq!(again, u);
        assert_eq!(cost_of(&m, &again), 7_650_000);
    }
}
