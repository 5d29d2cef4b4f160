//! Step 6, several calls: a vote (n answers, one winner) or a cascade
//! (cheapest tier first, escalating when a gate fails).

use super::cache::replay;
use super::meter::{Bill, Meter};
use super::plan::Plan;
use super::single::dispatch;
use super::state::{AppState, Runtime};
use super::{Body, Exec, Facts, GatewayError, Outcome, MAX_UPSTREAM_BODY};
use crate::cache::{self, Entry, FillGuard};
use crate::config::ModelConfig;
use crate::protocol::openai::chat::{ChatRequest, StreamMode, UpstreamBody};
use crate::protocol::sse::frame;
use crate::route::{self, Candidate, RouteDecision};
use crate::usage::Usage;
use crate::vote::{self, CallResult, CallSpec, CompiledCascade, CompiledVote};
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// A request answered by several upstream calls (a vote or a cascade): once
/// decided it is billed per call, answered, and maybe cached, like any other.
pub struct MultiCall {
    meter: Meter,
    bill: Bill,
    headers: Vec<(&'static str, String)>,
    fill: Option<FillGuard>,
    /// (deployment that answered, its usage) per finished call.
    served: Mutex<Vec<(Arc<ModelConfig>, Usage)>>,
    started: Instant,
}

impl MultiCall {
    pub fn new(x: Exec<'_>) -> (Self, Plan) {
        let run = MultiCall {
            meter: x.meter,
            bill: x.bill,
            headers: x.headers,
            fill: x.fill,
            served: Mutex::new(Vec::new()),
            started: Instant::now(),
        };
        (run, x.plan)
    }

    /// Moves the finished calls into the bill; returns the models that answered, in order.
    fn collect(&mut self, facts: &mut Facts) -> Vec<String> {
        facts.upstream_wait = self.started.elapsed();
        self.meter.waited(facts.upstream_wait);
        let served: Vec<_> = self.served.lock().drain(..).collect();
        served
            .into_iter()
            .map(|(m, u)| {
                self.bill.add(&m, u);
                m.name.clone()
            })
            .collect()
    }

    /// Settles and answers with the decided completion.
    async fn answer(
        mut self,
        chat: &ChatRequest,
        completion: &Value,
        decision: RouteDecision,
        outcome: (&'static str, String),
        cacheable: bool,
    ) -> Outcome {
        let wait = self.started.elapsed();
        self.meter.routed(&decision, wait);
        self.headers.push(outcome);
        let body = respond_with_completion(chat, completion, self.bill.usage());
        self.meter.finish(200, &self.bill, None);
        if let (Some(g), true) = (self.fill, cacheable) {
            if let Ok(entry) = Entry::from_completion(completion) {
                g.complete(entry, None).await;
            }
        }
        Outcome {
            body,
            decision,
            headers: self.headers,
        }
    }

    fn fail(self, err: GatewayError) -> GatewayError {
        self.meter.finish(err.status, &self.bill, None);
        err
    }
}

pub async fn run_vote(
    app: &AppState,
    rt: &Runtime,
    chat: &ChatRequest,
    plan: Plan,
    v: Arc<CompiledVote>,
    mut run: MultiCall,
    facts: &mut Facts,
) -> Result<Outcome, GatewayError> {
    let question =
        route::classify::input_text(crate::config::InputMode::LastUser, chat).into_owned();
    let tier = plan.decision.tier.clone();
    let served = &run.served;
    let outcome = vote::run_vote(&v, &question, |spec: CallSpec| {
        let candidates: Vec<Candidate> =
            match spec.model.as_ref().and_then(|m| rt.config.models.get(m)) {
                Some(m) => route::direct_candidates(&rt.config, m),
                None => plan.candidates.clone(),
            };
        let tier = tier.clone();
        async move {
            let call = Call {
                candidates: &candidates,
                temperature: spec.temperature,
                messages: spec.messages,
                tier: tier.as_deref(),
            };
            call_once(app, rt, chat, call, served).await
        }
    })
    .instrument(tracing::info_span!("vote", n = v.cfg.n))
    .await;
    run.collect(facts);
    let o = match outcome {
        Ok(o) => o,
        Err(e) => {
            let (valid, needed) = match &e {
                vote::VoteError::InsufficientValid { valid, needed, .. } => (*valid, *needed),
                vote::VoteError::FallbackFailed { valid, needed, .. } => (*valid, *needed),
            };
            return Err(run.fail(GatewayError::bad_gateway(format!(
                "Vote failed: only {valid} valid answers, {needed} needed."
            ))));
        }
    };
    let router = plan.router.as_ref().map(|r| r.name.as_str()).unwrap_or("");
    app.metrics.record_vote(
        router,
        o.strategy.as_str(),
        f64::from(o.agree) / f64::from(o.of.max(1)),
        u64::from(o.cancelled),
    );
    let mut decision = plan.decision;
    let winner_model = o
        .calls
        .iter()
        .find(|c| c.index == o.winner)
        .and_then(|c| c.model.clone());
    decision.model = winner_model
        .or_else(|| plan.candidates.first().map(|c| c.model.name.clone()))
        .unwrap_or_default();
    Ok(run
        .answer(
            chat,
            &o.completion,
            decision,
            ("x-triage-vote", o.header()),
            true,
        )
        .await)
}

pub async fn run_cascade(
    app: &AppState,
    rt: &Runtime,
    chat: &ChatRequest,
    plan: Plan,
    c: Arc<CompiledCascade>,
    mut run: MultiCall,
    facts: &mut Facts,
) -> Result<Outcome, GatewayError> {
    let request = Value::Object(chat.body.clone());
    let served = &run.served;
    let outcome = vote::run_cascade(&c, &request, |i: usize| {
        let tier_name = c.tiers.get(i).cloned().unwrap_or_default();
        // Only this tier's deployments: escalation is the cascade's job.
        let candidates: Vec<Candidate> = rt
            .config
            .tiers
            .get(&tier_name)
            .map(|t| {
                t.models
                    .iter()
                    .filter_map(|m| rt.config.models.get(m))
                    .map(|m| Candidate {
                        model: m.clone(),
                        tier: Some(t.clone()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        async move {
            let call = Call {
                candidates: &candidates,
                temperature: None,
                messages: None,
                tier: Some(&tier_name),
            };
            call_once(app, rt, chat, call, served).await
        }
    })
    .instrument(tracing::info_span!("cascade"))
    .await;
    let served_models = run.collect(facts);
    let o = match outcome {
        Ok(o) => o,
        Err(_) => {
            return Err(run.fail(GatewayError::bad_gateway(
                "Cascade failed: every tier's call failed.",
            )))
        }
    };
    let router = plan.router.as_ref().map(|r| r.name.as_str()).unwrap_or("");
    for a in &o.attempts {
        if let vote::TierResult::GateFailed(g) = &a.result {
            app.metrics.record_cascade_escalation(router, g.name());
        }
    }
    let mut decision = plan.decision;
    decision.tier = c.tiers.get(o.tier).cloned();
    decision.model = served_models.last().cloned().unwrap_or_default();
    Ok(run
        .answer(
            chat,
            &o.completion,
            decision,
            ("x-triage-cascade", o.header()),
            o.passed,
        )
        .await)
}

/// One call of a vote or cascade.
struct Call<'a> {
    candidates: &'a [Candidate],
    /// Overrides the request's temperature.
    temperature: Option<f64>,
    /// Replaces the conversation (the judge's prompt).
    messages: Option<Vec<Value>>,
    tier: Option<&'a str>,
}

/// One non-streamed upstream call for a vote, judge or cascade step.
async fn call_once(
    app: &AppState,
    rt: &Runtime,
    chat: &ChatRequest,
    call: Call<'_>,
    served: &Mutex<Vec<(Arc<ModelConfig>, Usage)>>,
) -> Result<CallResult, GatewayError> {
    let body_for = |m: &ModelConfig| {
        let mut b = UpstreamBody::new(&chat.body, &m.upstream_model, StreamMode::Strip)
            .max_output(m.max_output_tokens);
        b.temperature = call.temperature;
        b.messages = call.messages.as_deref();
        b.to_bytes()
    };
    let d = dispatch(
        app,
        rt,
        call.candidates,
        "/chat/completions",
        body_for,
        call.tier,
    )
    .await?;
    let model = d.candidate.model.clone();
    let body = d.response.collect(MAX_UPSTREAM_BODY).await.map_err(|e| {
        tracing::warn!(model = %model.name, error = %e, "provider broke the response");
        GatewayError::upstream_invalid_response(&model.name)
    })?;
    let completion: Value = serde_json::from_slice(&body)
        .map_err(|_| GatewayError::upstream_invalid_response(&model.name))?;
    let usage = completion
        .get("usage")
        .and_then(Usage::from_json)
        .unwrap_or_default();
    served.lock().push((model, usage));
    Ok(CallResult { completion, usage })
}

/// Turns a decided completion into the client's response (SSE replay when streaming).
fn respond_with_completion(chat: &ChatRequest, completion: &Value, usage: Usage) -> Body {
    let mut completion = completion.clone();
    if let Value::Object(o) = &mut completion {
        o.insert("usage".into(), usage.to_json());
    }
    if chat.stream {
        let mut chunks = cache::completion_to_chunks(&completion, cache::DEFAULT_CHUNK_CHARS);
        if !chat.client_wants_usage {
            chunks.retain(|c| {
                !(c.get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty))
            });
            for c in &mut chunks {
                if let Value::Object(o) = c {
                    o.remove("usage");
                }
            }
        }
        replay(chunks.iter().map(|c| frame(c.to_string().as_bytes())))
    } else {
        Body::Json(Bytes::from(completion.to_string()))
    }
}
