//! Step 3: classify (routers only) and choose a tier by rule, and the
//! worst-case cost of the chosen route (what step 5 reserves).

use super::meter::cost_of;
use super::single::dispatch;
use super::state::{AppState, Runtime};
use super::target::Target;
use super::Request;
use crate::config::{ModelConfig, RouterConfig};
use crate::protocol::openai::chat::ChatRequest;
use crate::route::classify::{ClassifyEnv, LlmCall};
use crate::route::{self, Candidate, Classification, RouteDecision, RouteReason};
use crate::usage::Usage;
use crate::vote::{self, CompiledCascade, CompiledVote};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// What routing produced for this request.
pub struct Plan {
    pub decision: RouteDecision,
    pub candidates: Vec<Candidate>,
    pub vote: Option<Arc<CompiledVote>>,
    pub cascade: Option<Arc<CompiledCascade>>,
    pub router: Option<Arc<RouterConfig>>,
    /// An LLM classifier's own call, billed to the request.
    pub classification_bill: Option<(Arc<ModelConfig>, Usage)>,
}

/// The LLM classifier's call, through the same dispatch as every other call.
struct GatewayLlm<'a> {
    app: &'a AppState,
    rt: &'a Runtime,
}

#[async_trait::async_trait]
impl LlmCall for GatewayLlm<'_> {
    async fn call(
        &self,
        model: &Arc<ModelConfig>,
        body: Bytes,
    ) -> Option<(Arc<ModelConfig>, Bytes)> {
        let candidates = route::direct_candidates(&self.rt.config, model);
        let d = dispatch(
            self.app,
            self.rt,
            &candidates[..1],
            "/chat/completions",
            |_| body.clone(),
            None,
        )
        .await
        .ok()?;
        let served = d.candidate.model.clone();
        let body = d.response.collect(1024 * 1024).await.ok()?;
        Some((served, body))
    }
}

/// Step 3: classification and the rule table (routers), or the model itself.
pub async fn plan(
    app: &AppState,
    rt: &Runtime,
    req: &Request,
    target: &Target,
    escalate: bool,
) -> Plan {
    match target {
        Target::Model(m) => Plan {
            decision: RouteDecision::direct(&m.name),
            candidates: route::direct_candidates(&rt.config, m),
            vote: None,
            cascade: None,
            router: None,
            classification_bill: None,
        },
        Target::Router(r) => {
            let c = classify(app, rt, r, &req.chat).await;
            let input = route::RuleInput {
                features: &req.chat.features,
                key: req.caller.name(),
                headers: &req.headers,
            };
            let (mut tier, mut reason) = route::choose_tier(r, &c, &input);
            let (vote, mut cascade) = multi_call_for(r, &reason);
            if escalate && tier != r.unknown_tier {
                // A looping agent gets the most capable tier for this turn.
                tier = r.unknown_tier.clone();
                reason = RouteReason::Unknown("loop_escalated");
                cascade = None;
            }
            let candidates = route::tier_candidates(&rt.config, &tier, &app.health);
            // Below `min_confidence` the label is `unknown`; the raw one stays visible as `top`.
            let (label, top) = if low_confidence(r, &c) {
                (
                    crate::config::UNKNOWN_LABEL.to_string(),
                    Some(c.label.clone()),
                )
            } else {
                (c.label.clone(), None)
            };
            Plan {
                decision: RouteDecision {
                    router: Some(r.name.clone()),
                    label: Some(label),
                    top,
                    confidence: Some(c.confidence),
                    tier: Some(tier),
                    model: String::new(),
                    reason,
                    fell_back_from: Vec::new(),
                    skipped: Vec::new(),
                    upstream_api: None,
                },
                candidates,
                vote,
                cascade,
                router: Some(r.clone()),
                classification_bill: c.bill,
            }
        }
    }
}

/// Runs the router's classifier and records its verdict.
async fn classify(
    app: &AppState,
    rt: &Runtime,
    r: &RouterConfig,
    chat: &ChatRequest,
) -> Classification {
    let t0 = Instant::now();
    let llm = GatewayLlm { app, rt };
    let env = ClassifyEnv {
        verdicts: &app.verdicts,
        embedded: &rt.classifiers,
        models: &rt.config.models,
        llm: &llm,
    };
    let c = route::classify::classify(&env, r, chat)
        .instrument(tracing::info_span!("classify", router = %r.name))
        .await;
    let (unknown, label) = if c.failed {
        (
            Some(crate::metrics::UnknownReason::Failure),
            c.label.as_str(),
        )
    } else if low_confidence(r, &c) {
        (
            Some(crate::metrics::UnknownReason::LowConfidence),
            crate::config::UNKNOWN_LABEL,
        )
    } else {
        (None, c.label.as_str())
    };
    app.metrics
        .record_classification(&r.name, classifier_kind(r), label, t0.elapsed(), unknown);
    c
}

/// A real label whose confidence is below the router's threshold (`route::choose_tier`
/// sends it to `unknown_tier`).
fn low_confidence(r: &RouterConfig, c: &Classification) -> bool {
    !c.failed && c.label != crate::config::UNKNOWN_LABEL && c.confidence < r.min_confidence
}

/// The matched rule's vote or cascade, else the router's.
fn multi_call_for(
    r: &RouterConfig,
    reason: &RouteReason,
) -> (Option<Arc<CompiledVote>>, Option<Arc<CompiledCascade>>) {
    let (vote, cascade) = match reason {
        RouteReason::Rule(i) => {
            let rule = &r.rules[*i];
            (rule.vote.clone(), rule.cascade.clone())
        }
        _ => (None, None),
    };
    if vote.is_none() && cascade.is_none() {
        return (r.vote.clone(), r.cascade.clone());
    }
    (vote, cascade)
}

fn classifier_kind(r: &RouterConfig) -> &'static str {
    match r.classifier {
        crate::config::ClassifierKind::Embedded(_) => "embedded",
        crate::config::ClassifierKind::Llm { .. } => "llm",
        crate::config::ClassifierKind::Rules => "rules",
        crate::config::ClassifierKind::None => "none",
    }
}

/// Our estimate is ~4 bytes a token; code and digits tokenize denser. The
/// reservation takes half again on top so that a budget holds even when the
/// provider counts more prompt tokens than we guessed.
pub fn reserved_prompt_tokens(estimate: u64) -> u64 {
    estimate.saturating_add(estimate.div_ceil(2))
}

/// Step 5's worst case: every call this request may make, at the most
/// expensive candidate's prices, with the full output cap.
pub fn reservation(rt: &Runtime, chat: &ChatRequest, plan: &Plan) -> u64 {
    let reserved_prompt = reserved_prompt_tokens(chat.features.prompt_tokens);
    let worst = |models: &mut dyn Iterator<Item = &Arc<ModelConfig>>| -> u64 {
        models
            .map(|m| {
                // The upstream body's cap is clamped to the same (see
                // `UpstreamBody::max_output`): an agent asking for 128k output
                // tokens is reserved for what the deployment can produce.
                let out = chat
                    .max_tokens
                    .map_or(m.max_output_tokens, |t| t.min(m.max_output_tokens));
                let u = Usage {
                    prompt_tokens: reserved_prompt,
                    completion_tokens: out.saturating_mul(u64::from(chat.n)),
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                    estimated: true,
                };
                cost_of(m, &u)
            })
            .max()
            .unwrap_or(0)
    };
    let single = worst(&mut plan.candidates.iter().map(|c| &c.model));
    let mut total = if let Some(v) = &plan.vote {
        let voters: Vec<&Arc<ModelConfig>> = v
            .cfg
            .models
            .iter()
            .filter_map(|m| rt.config.models.get(m))
            .collect();
        let per_call = if voters.is_empty() {
            single
        } else {
            worst(&mut voters.into_iter())
        };
        let mut t = per_call.saturating_mul(u64::from(v.cfg.n));
        if let Some(j) = v.cfg.judge.as_ref().and_then(|j| rt.config.models.get(j)) {
            // The judge reads every candidate: budget for n answers as its prompt.
            let u = Usage {
                prompt_tokens: reserved_prompt + u64::from(v.cfg.n) * j.max_output_tokens,
                completion_tokens: 64,
                cached_tokens: 0,
                cache_write_tokens: 0,
                estimated: true,
            };
            t = t.saturating_add(cost_of(j, &u));
        }
        if matches!(v.cfg.on_insufficient, vote::OnInsufficient::SingleCall) {
            t = t.saturating_add(single);
        }
        t
    } else if let Some(c) = &plan.cascade {
        c.tiers
            .iter()
            .map(|t| {
                worst(
                    &mut route::tier_candidates(&rt.config, t, &route::Health::default())
                        .iter()
                        .map(|c| &c.model),
                )
            })
            .sum()
    } else {
        single
    };
    if let Some((m, u)) = &plan.classification_bill {
        total = total.saturating_add(cost_of(m, u));
    }
    total
}

/// The reservation for a router before its classifier has run: the dearest
/// route it can take, plus the classifier's own call.
pub fn router_worst_case(
    app: &AppState,
    rt: &Runtime,
    chat: &ChatRequest,
    r: &Arc<RouterConfig>,
) -> u64 {
    let reserved_prompt = reserved_prompt_tokens(chat.features.prompt_tokens);
    // (tier, vote, cascade) for every rule and for unknown requests.
    type RouteShape<'a> = (
        &'a str,
        Option<Arc<CompiledVote>>,
        Option<Arc<CompiledCascade>>,
    );
    let mut routes: Vec<RouteShape<'_>> = r
        .rules
        .iter()
        .map(|rule| {
            let vote = rule.vote.clone().or_else(|| r.vote.clone());
            let cascade = rule.cascade.clone().or_else(|| r.cascade.clone());
            (rule.tier.as_str(), vote, cascade)
        })
        .collect();
    routes.push((r.unknown_tier.as_str(), r.vote.clone(), r.cascade.clone()));
    let worst = routes
        .into_iter()
        .map(|(tier, vote, cascade)| {
            let plan = Plan {
                decision: RouteDecision::direct(""),
                candidates: route::tier_candidates(&rt.config, tier, &app.health),
                vote,
                cascade,
                router: None,
                classification_bill: None,
            };
            reservation(rt, chat, &plan)
        })
        .max()
        .unwrap_or(0);
    let classifier = match &r.classifier {
        crate::config::ClassifierKind::Llm { model, .. } => rt.config.models.get(model).map(|m| {
            let u = Usage {
                prompt_tokens: reserved_prompt + 300,
                completion_tokens: 20,
                cached_tokens: 0,
                cache_write_tokens: 0,
                estimated: true,
            };
            cost_of(m, &u)
        }),
        _ => None,
    };
    worst.saturating_add(classifier.unwrap_or(0))
}
