//! `/v1/completions` and `/v1/embeddings`: the same model resolution,
//! fallbacks, limits and spend as chat; the body is passed through.

use super::admit::admit;
use super::meter::{cost_of, Bill, Meter, MeterInit};
use super::plan::{reserved_prompt_tokens, Plan};
use super::single::{dispatch, Dispatched};
use super::state::{AppState, Runtime};
use super::stream::{SseForwarder, StreamEnd};
use super::target::{resolve, Target};
use super::{Api, Body, Caller, Facts, GatewayError, Outcome, Reply, MAX_UPSTREAM_BODY};
use crate::metrics::CacheOutcome;
use crate::protocol::openai::chat::{nested, passthrough_prompt_tokens, StreamMode, UpstreamBody};
use crate::route::{self, RouteDecision, RouteReason};
use crate::usage::Usage;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// A completions or embeddings request, decoded by its edge.
pub struct PassRequest {
    pub api: Api,
    pub body: Map<String, Value>,
    pub model: String,
    pub caller: Caller,
    pub request_id: Arc<str>,
    pub started: Instant,
}

pub async fn passthrough(app: &Arc<AppState>, req: PassRequest) -> Reply {
    let mut facts = Facts {
        key: req.caller.name().map(str::to_string),
        // These endpoints have never counted refused requests in metrics;
        // settled ones are counted by their meter.
        metered: true,
        ..Facts::default()
    };
    let result = run(app, &req, &mut facts).await;
    super::finish(app, req.api, req.started, result, facts)
}

/// The plan for a passthrough: a model, or a router's most capable tier
/// (raw text has no classifier); embeddings take no routers.
fn plan(app: &AppState, rt: &Runtime, req: &PassRequest) -> Result<Plan, GatewayError> {
    let model = &req.model;
    let (candidates, decision, router) = match resolve(rt, &req.caller, model)? {
        Target::Model(m) => (
            route::direct_candidates(&rt.config, &m),
            RouteDecision::direct(&m.name),
            None,
        ),
        Target::Router(r) if req.api == Api::Completions => {
            let tier = r.unknown_tier.clone();
            let mut d = RouteDecision::direct(model);
            d.router = Some(r.name.clone());
            d.tier = Some(tier.clone());
            d.reason = RouteReason::Unknown("not_chat");
            (route::tier_candidates(&rt.config, &tier, &app.health), d, Some(r))
        }
        Target::Router(_) => {
            return Err(GatewayError::invalid_param(
                "model",
                format!("`{model}` is a router; routers serve chat and text completions, name a model here."),
            ))
        }
    };
    Ok(Plan {
        decision,
        candidates,
        vote: None,
        cascade: None,
        router,
        classification_bill: None,
    })
}

/// Worst case over the candidates: the prompt with margin plus the output cap.
fn reservation(req: &PassRequest, plan: &Plan, prompt: u64) -> u64 {
    let max_out = req.body.get("max_tokens").and_then(Value::as_u64);
    plan.candidates
        .iter()
        .map(|c| {
            let out = match req.api {
                Api::Embeddings => 0,
                _ => max_out.unwrap_or(c.model.max_output_tokens),
            };
            let u = Usage {
                prompt_tokens: reserved_prompt_tokens(prompt),
                completion_tokens: out,
                cached_tokens: 0,
                cache_write_tokens: 0,
                estimated: true,
            };
            cost_of(&c.model, &u)
        })
        .max()
        .unwrap_or(0)
}

async fn run(
    app: &Arc<AppState>,
    req: &PassRequest,
    facts: &mut Facts,
) -> Result<Outcome, GatewayError> {
    let rt = app.runtime.load_full();
    let plan = plan(app, &rt, req)?;
    facts.decision = Some(plan.decision.clone());
    let stream = req
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let prompt = passthrough_prompt_tokens(&req.body);
    let mut headers = Vec::new();
    let admission = admit(
        app,
        &req.caller,
        prompt,
        reservation(req, &plan, prompt),
        &mut headers,
    )
    .await?;
    let mut meter = Meter::new(MeterInit {
        app,
        caller: &req.caller,
        plan: &plan,
        request_id: &req.request_id,
        started: req.started,
        stream,
        cache: CacheOutcome::None,
        admission,
        sessions: Vec::new(),
        prompt_tokens: Some(prompt),
    });
    // Usage on streams is needed for accounting, as on chat.
    let mode = if stream {
        StreamMode::ForceUsage
    } else {
        StreamMode::Keep
    };
    let dispatched = dispatch(
        app,
        &rt,
        &plan.candidates,
        req.api.upstream_path(),
        |m| UpstreamBody::new(&req.body, &m.upstream_model, mode).to_bytes(),
        plan.decision.tier.as_deref(),
    )
    .await;
    let d = match dispatched {
        Ok(d) => d,
        Err(e) => {
            meter.finish(e.status, &Bill::default(), None);
            return Err(e);
        }
    };
    let mut decision = plan.decision;
    decision.model = d.candidate.model.name.clone();
    decision.fell_back_from = d.fell_back_from.clone();
    decision.skipped = d.skipped.clone();
    meter.routed(&decision, d.upstream_wait);
    let body = if stream {
        let wants_usage = nested(&req.body, "stream_options", "include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        forward(d, meter, prompt, !wants_usage, req.started)
    } else {
        whole(d, meter, prompt).await?
    };
    Ok(Outcome {
        body,
        decision,
        headers,
    })
}

fn forward(d: Dispatched, meter: Meter, prompt: u64, strip_usage: bool, started: Instant) -> Body {
    let model = d.candidate.model.clone();
    let on_end = Box::new(move |end: StreamEnd| {
        let mut bill = Bill::default();
        bill.add(&model, end.usage);
        meter.finish(200, &bill, end.first_byte);
    });
    let fwd = SseForwarder::new(d.response.body, strip_usage, prompt, None, started, on_end);
    Body::Stream(Box::pin(fwd))
}

async fn whole(d: Dispatched, meter: Meter, prompt: u64) -> Result<Body, GatewayError> {
    let model = d.candidate.model.clone();
    let bytes = match d.response.collect(MAX_UPSTREAM_BODY).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(model = %model.name, error = %e, "provider broke the response");
            meter.finish(502, &Bill::default(), None);
            return Err(GatewayError::upstream_invalid_response(&model.name));
        }
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        meter.finish(502, &Bill::default(), None);
        return Err(GatewayError::upstream_invalid_response(&model.name));
    };
    let usage = v.get("usage").and_then(Usage::from_json).unwrap_or(Usage {
        prompt_tokens: prompt,
        completion_tokens: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        estimated: true,
    });
    let mut bill = Bill::default();
    bill.add(&model, usage);
    meter.finish(200, &bill, None);
    Ok(Body::Json(bytes))
}
