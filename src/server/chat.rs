//! `POST /v1/chat/completions`: steps 5.1–5.10 of the request path in
//! `server/mod.rs`, in that order.

use super::dispatch::{dispatch, Dispatched};
use super::error::ApiError;
use super::handlers::{read_body, resolve, Caller, Target};
use super::request::{self, ChatRequest};
use super::state::{AppState, Runtime};
use super::stream::{SseForwarder, StreamEnd};
use super::{LogFacts, RequestId};
use crate::cache::{self, Entry, FillGuard, Lookup};
use crate::config::{CacheScope, ModelConfig, RouterConfig};
use crate::guard::{CeilingHit, Guard, LoopAction, SessionKey, SessionRefusal};
use crate::limits::{self, Admission, AdmitError, AdmitRequest, LimitStore, Settlement};
use crate::metrics::{CacheOutcome, LimitKind, RequestRecord, UsageRecord};
use crate::route::{self, Candidate, Classification, RouteDecision, RouteReason};
use crate::upstream::sse::{frame, DONE_FRAME};
use crate::usage::Usage;
use crate::vote::{self, CallResult, CallSpec, CompiledCascade, CompiledVote};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use parking_lot::Mutex;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::Instrument;

/// Largest non-streaming upstream answer we accept.
pub const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response {
    let mut facts = LogFacts {
        key: caller.name().map(str::to_string),
        ..LogFacts::default()
    };
    let rid = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from("-"));
    let _inflight = app.metrics.inflight();
    let started = Instant::now();
    let mut resp = match chat(&app, &caller, req, &rid, &mut facts).await {
        Ok(r) => r,
        Err(e) if facts.metered => e.into_response(),
        Err(e) => {
            // Requests refused before anything was metered still count.
            app.metrics.record_request(&RequestRecord {
                router: facts.router.as_deref().unwrap_or(""),
                label: "",
                tier: "",
                model: "",
                key: caller.name().unwrap_or(""),
                status: e.status.as_u16(),
                cache: CacheOutcome::None,
                stream: false,
                duration: started.elapsed(),
                upstream_wait: facts.upstream_wait,
                ttft: None,
            });
            e.into_response()
        }
    };
    resp.extensions_mut().insert(facts);
    resp
}

/// Everything `settle` needs once the response is over.
struct Meter {
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

/// Spend and tokens of one finished request, per model actually billed.
#[derive(Default)]
struct Bill {
    /// (model, usage, cost) per upstream call that produced tokens.
    lines: Vec<(Arc<ModelConfig>, Usage, u64)>,
}

impl Bill {
    fn add(&mut self, model: &Arc<ModelConfig>, usage: Usage) {
        let cost = cost_of(model, &usage);
        self.lines.push((model.clone(), usage, cost));
    }
    fn usage(&self) -> Usage {
        let mut u = Usage::default();
        for (_, l, _) in &self.lines {
            u.add(l);
        }
        u
    }
    fn cost(&self) -> u64 {
        self.lines.iter().map(|(_, _, c)| *c).sum()
    }
}

pub fn price_of(m: &ModelConfig) -> limits::Price {
    m.price
}

pub fn cost_of(m: &ModelConfig, u: &Usage) -> u64 {
    limits::cost_nanos(
        u.prompt_tokens,
        u.cached_tokens,
        u.completion_tokens,
        &price_of(m),
    )
}

impl Meter {
    fn new(
        app: &Arc<AppState>,
        caller: &Caller,
        plan: &Plan,
        stream: bool,
        cache: CacheOutcome,
        started: Instant,
        rid: &Arc<str>,
    ) -> Meter {
        Meter {
            app: app.clone(),
            key: caller.name().map(str::to_string),
            router: plan
                .router
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_default(),
            label: plan.decision.label.clone().unwrap_or_default(),
            tier: plan.decision.tier.clone().unwrap_or_default(),
            model: String::new(),
            admission: None,
            sessions: Vec::new(),
            started,
            upstream_wait: Duration::ZERO,
            stream,
            cache,
            request_id: rid.clone(),
            abandoned: None,
            finished: false,
        }
    }

    /// Step 10: settle spend and tokens, record metrics, update the session.
    fn finish(mut self, status: u16, bill: &Bill, first_byte: Option<Duration>) {
        self.settle(status, bill, first_byte);
    }

    /// Remembers what to charge if the request is abandoned from here on.
    fn on_abandon(&mut self, model: Option<&Arc<ModelConfig>>, prompt_tokens: u64, calls: u32) {
        self.abandoned = model.map(|m| {
            let u = Usage {
                prompt_tokens: prompt_tokens.saturating_mul(u64::from(calls.max(1))),
                completion_tokens: 0,
                cached_tokens: 0,
                estimated: true,
            };
            (m.clone(), u)
        });
    }

    fn settle(&mut self, status: u16, bill: &Bill, first_byte: Option<Duration>) {
        self.finished = true;
        let usage = bill.usage();
        let cost = bill.cost();
        let model = if self.model.is_empty() {
            ""
        } else {
            self.model.as_str()
        };
        if let Some(adm) = self.admission.take() {
            let out = adm.settle(&Settlement {
                model,
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
        let m = &self.app.metrics;
        let key = self.key.as_deref().unwrap_or("");
        m.record_request(&RequestRecord {
            router: &self.router,
            label: &self.label,
            tier: &self.tier,
            model,
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
        if !self.sessions.is_empty() {
            let sessions = std::mem::take(&mut self.sessions);
            let tokens = usage.total();
            tokio::spawn(async move {
                for (g, sk) in sessions {
                    g.record(Some(&sk), tokens, cost, SystemTime::now()).await;
                }
                // A settled session may have crossed a ceiling: nothing more to do
                // here; the next request is refused by `check`.
            });
        }
    }
}

/// What routing produced for this request.
struct Plan {
    decision: RouteDecision,
    candidates: Vec<Candidate>,
    vote: Option<Arc<CompiledVote>>,
    cascade: Option<Arc<CompiledCascade>>,
    router: Option<Arc<RouterConfig>>,
    classification_bill: Option<(Arc<ModelConfig>, Usage)>,
}

async fn chat(
    app: &Arc<AppState>,
    caller: &Caller,
    req: Request,
    rid: &Arc<str>,
    facts: &mut LogFacts,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    // 1–2. Body and parse.
    let (headers, bytes, _) = read_body(app, req).await?;
    let chat = request::parse_chat(&bytes)?;
    // 3. Target.
    let rt = app.runtime.load_full();
    let target = resolve(&rt, caller, &chat.model)?;
    if let Target::Router(r) = &target {
        facts.router = Some(r.name.clone());
    }
    let mut extra_headers: Vec<(HeaderName, String)> = Vec::new();

    // 4. Agent guards.
    let guards = check_guards(
        app,
        &rt,
        caller,
        &target,
        &headers,
        &chat,
        &mut extra_headers,
    )
    .await?;

    // An LLM classifier costs a call: admit (at the router's worst case) before
    // making it, so a key that is out of budget or rate cannot cause unbilled calls.
    let mut early: Option<Option<Admission>> = None;
    if let Target::Router(r) = &target {
        if matches!(r.classifier, crate::config::ClassifierKind::Llm { .. }) {
            let reserve = router_worst_case(app, &rt, &chat, r);
            let a = admit(app, caller, chat.features.prompt_tokens, reserve).await?;
            push_rate_headers(&a, &mut extra_headers);
            early = Some(a);
        }
    }

    // 5. Classify and route (before limits: the reservation needs the tier's prices).
    let plan = plan_route(app, &rt, caller, &target, &headers, &chat, guards.escalate).await;
    facts.route = Some(plan.decision.header_value());

    // 6. Cache lookup.
    let cache_cfg = &rt.config.cache;
    let cache = app.cache.load_full();
    let cache_ttl = cache_ttl(&rt, &target, &headers);
    let cacheable = cache.is_some()
        && cache_enabled_for(&rt, &target, &plan)
        && !matches!(cache_ttl, Some(d) if d.is_zero());
    let mut fill: Option<FillGuard> = None;
    let mut cache_outcome = CacheOutcome::None;
    if let (Some(c), true) = (cache.as_ref().as_ref(), cacheable) {
        let cc = headers
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok());
        let mode = cache::cache_mode(&chat.body, cc, cache_cfg.cache_sampled, cache_ttl);
        let scope = match (cache_cfg.scope, caller.name()) {
            (CacheScope::PerKey, Some(k)) => k,
            _ => "shared",
        };
        let key = cache::cache_key(scope, &chat.model, &chat.body);
        match c.lookup(key, mode).await {
            Lookup::Hit(entry) => {
                app.metrics.record_cache_lookup("response", true);
                return serve_hit(
                    app,
                    caller,
                    &chat,
                    entry,
                    plan,
                    guards.sessions,
                    early,
                    started,
                    rid,
                    extra_headers,
                    facts,
                )
                .await;
            }
            Lookup::Miss(g) => {
                app.metrics.record_cache_lookup("response", false);
                cache_outcome = CacheOutcome::Miss;
                fill = Some(g);
            }
            Lookup::Bypass => cache_outcome = CacheOutcome::Bypass,
        }
        facts.cache = Some(match cache_outcome {
            CacheOutcome::Miss => "miss",
            _ => "bypass",
        });
    }

    // 7. Rate limits and the worst-case spend reservation, in one admission.
    let admission = match early {
        Some(a) => a,
        None => {
            let reserve = reservation(&rt, &chat, &plan);
            let a = admit(app, caller, chat.features.prompt_tokens, reserve).await?;
            push_rate_headers(&a, &mut extra_headers);
            a
        }
    };

    let mut meter = Meter::new(app, caller, &plan, chat.stream, cache_outcome, started, rid);
    meter.admission = admission;
    meter.sessions = guards.sessions;
    let calls = plan.vote.as_ref().map_or(1, |v| v.cfg.n);
    meter.on_abandon(
        plan.candidates.first().map(|c| &c.model),
        chat.features.prompt_tokens,
        calls,
    );
    facts.metered = true;
    let mut bill = Bill::default();
    if let Some((m, u)) = &plan.classification_bill {
        bill.add(m, *u);
    }

    // 8–9. Execute and respond.
    if let Some(v) = plan.vote.clone() {
        let run = MultiCall::new(meter, bill, extra_headers, fill);
        return run_vote(app, &rt, &chat, plan, v, run, facts).await;
    }
    if let Some(c) = plan.cascade.clone() {
        let run = MultiCall::new(meter, bill, extra_headers, fill);
        return run_cascade(app, &rt, &chat, plan, c, run, facts).await;
    }
    let mut decision = plan.decision;
    let dispatched = dispatch(
        app,
        &rt,
        &plan.candidates,
        "/chat/completions",
        |m| upstream_body(&chat, m),
        decision.tier.as_deref(),
    )
    .instrument(tracing::info_span!(
        "upstream",
        tier = decision.tier.as_deref().unwrap_or("-")
    ))
    .await;
    let Dispatched {
        candidate,
        response,
        fell_back_from,
        skipped,
        upstream_wait,
    } = match dispatched {
        Ok(d) => d,
        Err(e) => {
            meter.finish(e.status.as_u16(), &bill, None);
            return Err(e);
        }
    };
    facts.upstream_wait = upstream_wait;
    decision.model = candidate.model.name.clone();
    if let Some(t) = &candidate.tier {
        decision.tier = Some(t.name.clone());
        meter.tier = t.name.clone();
    }
    decision.fell_back_from = fell_back_from;
    decision.skipped = skipped;
    meter.model = candidate.model.name.clone();
    meter.upstream_wait = upstream_wait;
    let route_header = decision.header_value();
    tracing::debug!(request_id = %rid, route = %route_header, "routed");
    facts.route = Some(route_header.clone());
    extra_headers.push((HeaderName::from_static("x-triage-route"), route_header));
    if cache_outcome != CacheOutcome::None {
        extra_headers.push((
            HeaderName::from_static("x-triage-cache"),
            cache_label(cache_outcome).into(),
        ));
    }

    let model = candidate.model.clone();
    let resp = if chat.stream {
        let record = fill.as_ref().and_then(|_| {
            let cache = app.cache.load();
            cache
                .as_ref()
                .as_ref()
                .map(|c| c.config().max_entry_bytes as usize)
        });
        let cache_ttl_copy = cache_ttl;
        let fill_cell = Mutex::new(fill);
        let on_end = Box::new(move |end: StreamEnd| {
            let mut bill = bill;
            bill.add(&model, end.usage);
            meter.finish(200, &bill, end.first_byte);
            if let (Some(g), Some(chunks)) = (fill_cell.lock().take(), end.chunks) {
                match Entry::from_chunk_bytes(chunks) {
                    Ok(entry) => {
                        tokio::spawn(async move {
                            g.complete(entry, cache_ttl_copy).await;
                        });
                    }
                    Err(e) => tracing::debug!(error = %e, "stream not cacheable"),
                }
            }
        });
        let fwd = SseForwarder::new(
            response.body,
            !chat.client_wants_usage,
            chat.features.prompt_tokens,
            record,
            started,
            on_end,
        );
        sse_response(Body::from_stream(fwd))
    } else {
        let body = match response.collect(MAX_UPSTREAM_BODY).await {
            Ok(b) => b,
            Err(e) => {
                let err = ApiError::bad_gateway(format!(
                    "Provider for `{}` broke the response: {e}",
                    model.name
                ));
                meter.finish(502, &bill, None);
                return Err(err);
            }
        };
        let Some(usage) = completion_usage(&body) else {
            meter.finish(502, &bill, None);
            return Err(ApiError::bad_gateway(format!(
                "Provider for `{}` returned a body that is not a chat completion.",
                model.name
            )));
        };
        let usage = if usage == Usage::default() {
            // The provider reported nothing: estimate, and say so in the ledger.
            estimate_usage(&chat, &body)
        } else {
            usage
        };
        bill.add(&model, usage);
        meter.finish(200, &bill, None);
        if let Some(g) = fill {
            let entry = Entry::from_parts(
                body.clone(),
                None,
                cache::Usage::from_json(&usage.to_json()),
            );
            g.complete(entry, cache_ttl).await;
        }
        json_response(body)
    };
    Ok(with_headers(resp, extra_headers))
}

fn cache_label(c: CacheOutcome) -> &'static str {
    match c {
        CacheOutcome::Hit => "hit",
        CacheOutcome::Miss => "miss",
        CacheOutcome::Bypass => "bypass",
        CacheOutcome::None => "none",
    }
}

fn estimate_usage(chat: &ChatRequest, body: &[u8]) -> Usage {
    let completion = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| vote::completion_text(&v))
        .map(|t| crate::usage::estimate_tokens(&t))
        .unwrap_or(0);
    Usage {
        prompt_tokens: chat.features.prompt_tokens,
        completion_tokens: completion,
        cached_tokens: 0,
        estimated: true,
    }
}

pub fn json_response(body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn sse_response(body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

fn with_headers(mut resp: Response, headers: Vec<(HeaderName, String)>) -> Response {
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

/// Usage of a non-streamed chat completion; `None` if the body is not one.
pub fn completion_usage(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[allow(dead_code)]
        choices: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        usage: Option<Value>,
    }
    let p: Peek = serde_json::from_slice(body).ok()?;
    Some(
        p.usage
            .as_ref()
            .and_then(Usage::from_json)
            .unwrap_or_default(),
    )
}

/// The body sent upstream: the client's fields, with the deployment's model
/// name, and usage always requested on streams (we need it for accounting).
/// Serialised straight from the parsed request, without copying it.
pub fn upstream_body(chat: &ChatRequest, m: &ModelConfig) -> Bytes {
    let body = UpstreamBody {
        body: &chat.body,
        model: &m.upstream_model,
        force_usage: chat.stream,
    };
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

struct UpstreamBody<'a> {
    body: &'a serde_json::Map<String, Value>,
    model: &'a str,
    force_usage: bool,
}

impl serde::Serialize for UpstreamBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.body.len() + 1))?;
        let mut saw_options = false;
        for (k, v) in self.body {
            match k.as_str() {
                "model" => map.serialize_entry(k, self.model)?,
                "stream_options" if self.force_usage => {
                    saw_options = true;
                    let mut o = v.as_object().cloned().unwrap_or_default();
                    o.insert("include_usage".into(), Value::Bool(true));
                    map.serialize_entry(k, &o)?;
                }
                _ => map.serialize_entry(k, v)?,
            }
        }
        if self.force_usage && !saw_options {
            map.serialize_entry(
                "stream_options",
                &serde_json::json!({"include_usage": true}),
            )?;
        }
        map.end()
    }
}

/// Result of the agent guards.
struct GuardOutcome {
    sessions: Vec<(Arc<Guard>, SessionKey)>,
    escalate: bool,
}

/// Step 4: session ceilings and loop detection, per router and per key.
async fn check_guards(
    app: &AppState,
    rt: &Runtime,
    caller: &Caller,
    target: &Target,
    headers: &HeaderMap,
    chat: &ChatRequest,
    extra: &mut Vec<(HeaderName, String)>,
) -> Result<GuardOutcome, ApiError> {
    let mut out = GuardOutcome {
        sessions: Vec::new(),
        escalate: false,
    };
    if rt.guards.is_empty() {
        return Ok(out);
    }
    // Each guard counts its sessions under its own scope: a router guard and a key
    // guard seeing the same session id must not share (and double-count) one entry.
    let caller_scope = caller
        .name()
        .map_or_else(|| "anonymous".to_string(), |k| format!("key:{k}"));
    let mut scopes: Vec<(&Arc<Guard>, String)> = Vec::new();
    if let Target::Router(r) = target {
        if let Some(g) = rt.guards.get(&format!("router:{}", r.name)) {
            scopes.push((g, format!("router:{}|{caller_scope}", r.name)));
        }
    }
    if let Some(k) = caller.name() {
        if let Some(g) = rt.guards.get(&format!("key:{k}")) {
            scopes.push((g, caller_scope.clone()));
        }
    }
    let body = Value::Object(chat.body.clone());
    for (g, scope_name) in scopes {
        if let Some(finding) = g.detect_loop(&body) {
            let action = finding.action;
            app.metrics.record_loop_detected(action.as_str());
            extra.push((
                HeaderName::from_static(crate::guard::LOOP_HEADER),
                finding.header_value(),
            ));
            match action {
                LoopAction::Block => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_request_error",
                        Some("loop_detected"),
                        format!(
                        "The conversation repeats itself ({}); refusing to call the model again.",
                        finding.header_value()
                    ),
                    )
                    .with_header(
                        HeaderName::from_static(crate::guard::LOOP_HEADER),
                        HeaderValue::from_str(&finding.header_value())
                            .unwrap_or(HeaderValue::from_static("repeated")),
                    ))
                }
                LoopAction::Escalate => out.escalate = true,
                LoopAction::Flag => {}
            }
        }
        let hv = headers
            .get(g.config().session_header.as_str())
            .and_then(|v| v.to_str().ok());
        let Some(sk) = g.session_key(&scope_name, hv, Some(&body)) else {
            continue;
        };
        match g.try_check(Some(&sk), SystemTime::now()).await {
            Ok(Some(w)) => extra.push((
                HeaderName::from_static(crate::guard::WARNING_HEADER),
                w.header_value(),
            )),
            Ok(None) => {}
            Err(SessionRefusal::Ceiling(hit)) => return Err(session_error(app, &hit)),
            Err(SessionRefusal::Unavailable) => {
                tracing::debug!("refused: the shared session store is unavailable (fail_closed)");
                return Err(store_unavailable(
                    "The shared session store is unavailable; try again shortly.".into(),
                ));
            }
        }
        out.sessions.push((g.clone(), sk));
    }
    app.metrics.set_sessions_active(app.sessions.active_count());
    Ok(out)
}

/// 503 `store_unavailable` (`fail_closed` while Redis is unreachable).
fn store_unavailable(msg: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "api_error",
        Some("store_unavailable"),
        msg,
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}

fn session_error(app: &AppState, hit: &CeilingHit) -> ApiError {
    app.metrics.record_session_limit(hit.kind.as_str());
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "invalid_request_error",
        Some("session_limit_exceeded"),
        format!(
            "Session ceiling reached: {} ({}).",
            hit.kind.as_str(),
            hit.header_value()
        ),
    )
    .with_param(hit.kind.as_str());
    if let Ok(v) = HeaderValue::from_str(&hit.header_value()) {
        e = e.with_header(HeaderName::from_static("x-triage-session-limit"), v);
    }
    e
}

/// Step 5: classification and the rule table (routers), or the model itself.
async fn plan_route(
    app: &AppState,
    rt: &Runtime,
    caller: &Caller,
    target: &Target,
    headers: &HeaderMap,
    chat: &ChatRequest,
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
            let t0 = Instant::now();
            let c: Classification = route::classify::classify(app, rt, r, chat)
                .instrument(tracing::info_span!("classify", router = %r.name))
                .await;
            let unknown = if c.failed {
                Some(crate::metrics::UnknownReason::Failure)
            } else if c.label != crate::config::UNKNOWN_LABEL && c.confidence < r.min_confidence {
                Some(crate::metrics::UnknownReason::LowConfidence)
            } else {
                None
            };
            app.metrics.record_classification(
                &r.name,
                classifier_kind(r),
                &c.label,
                t0.elapsed(),
                unknown,
            );
            let input = route::RuleInput {
                features: &chat.features,
                key: caller.name(),
                headers,
            };
            let (mut tier, mut reason) = route::choose_tier(r, &c, &input);
            let (mut vote, mut cascade) = match reason {
                RouteReason::Rule(i) => {
                    let rule = &r.rules[i];
                    (rule.vote.clone(), rule.cascade.clone())
                }
                _ => (None, None),
            };
            if vote.is_none() && cascade.is_none() {
                vote = r.vote.clone();
                cascade = r.cascade.clone();
            }
            if escalate && tier != r.unknown_tier {
                // A looping agent gets the most capable tier for this turn.
                tier = r.unknown_tier.clone();
                reason = RouteReason::Unknown("loop_escalated");
                cascade = None;
            }
            let candidates = route::tier_candidates(&rt.config, &tier, &app.health);
            Plan {
                decision: RouteDecision {
                    router: Some(r.name.clone()),
                    label: Some(c.label.clone()),
                    confidence: Some(c.confidence),
                    tier: Some(tier),
                    model: String::new(),
                    reason,
                    fell_back_from: Vec::new(),
                    skipped: Vec::new(),
                },
                candidates,
                vote,
                cascade,
                router: Some(r.clone()),
                classification_bill: c.bill.clone(),
            }
        }
    }
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
fn reserved_prompt_tokens(estimate: u64) -> u64 {
    estimate.saturating_add(estimate.div_ceil(2))
}

/// Step 7's worst case: every call this request may make, at the most
/// expensive candidate's prices, with the full output cap.
fn reservation(rt: &Runtime, chat: &ChatRequest, plan: &Plan) -> u64 {
    let reserved_prompt = reserved_prompt_tokens(chat.features.prompt_tokens);
    let worst = |models: &mut dyn Iterator<Item = &Arc<ModelConfig>>| -> u64 {
        models
            .map(|m| {
                let out = chat
                    .max_tokens
                    .unwrap_or(m.max_output_tokens)
                    .min(m.max_output_tokens.max(chat.max_tokens.unwrap_or(0)));
                let u = Usage {
                    prompt_tokens: reserved_prompt,
                    completion_tokens: out.saturating_mul(u64::from(chat.n)),
                    cached_tokens: 0,
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

fn push_rate_headers(a: &Option<Admission>, extra: &mut Vec<(HeaderName, String)>) {
    if let Some(a) = a {
        for (h, v) in a.rate_headers() {
            extra.push((HeaderName::from_static(h), v));
        }
    }
}

/// The reservation for a router before its classifier has run: the dearest
/// route it can take, plus the classifier's own call.
fn router_worst_case(
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
                estimated: true,
            };
            cost_of(m, &u)
        }),
        _ => None,
    };
    worst.saturating_add(classifier.unwrap_or(0))
}

/// Step 7: one admission for rate limits and the spend reservation.
async fn admit(
    app: &AppState,
    caller: &Caller,
    est_tokens: u64,
    reserve: u64,
) -> Result<Option<Admission>, ApiError> {
    let Some(key) = caller.name() else {
        return Ok(None);
    };
    let req = AdmitRequest {
        key,
        est_tokens,
        reserve_nanos: reserve,
    };
    match app.limiter.admit(&req).await {
        Ok(a) => Ok(Some(a)),
        Err(AdmitError::UnknownKey(_)) => Ok(None),
        Err(AdmitError::Unavailable(msg)) => {
            tracing::debug!(
                key,
                "refused: the shared limit store is unavailable (fail_closed)"
            );
            Err(store_unavailable(msg))
        }
        Err(AdmitError::Refused(r)) => {
            let kind = match r.kind {
                limits::RefusalKind::Rpm => LimitKind::Rpm,
                limits::RefusalKind::Tpm => LimitKind::Tpm,
                limits::RefusalKind::Parallel => LimitKind::Parallel,
                limits::RefusalKind::Budget => LimitKind::Budget,
            };
            app.metrics.record_refusal(key, kind);
            let (kind_str, code) = match r.kind {
                limits::RefusalKind::Budget => ("insufficient_quota", "insufficient_quota"),
                _ => ("requests", "rate_limit_exceeded"),
            };
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                if code == "insufficient_quota" {
                    "insufficient_quota"
                } else {
                    "rate_limit_error"
                },
                Some(code),
                r.message(),
            );
            e.param = None;
            let _ = kind_str;
            for (h, v) in r.rate_headers() {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    e = e.with_header(HeaderName::from_static(h), v);
                }
            }
            Err(e)
        }
    }
}

fn cache_enabled_for(rt: &Runtime, target: &Target, plan: &Plan) -> bool {
    let global = rt.config.cache.enabled;
    match target {
        Target::Router(r) => {
            let default = global && plan.vote.as_ref().is_none_or(|v| v.cfg.cache);
            r.cache.as_ref().and_then(|c| c.enabled).unwrap_or(default)
        }
        Target::Model(m) => rt
            .config
            .cache
            .models
            .get(&m.name)
            .and_then(|c| c.enabled)
            .unwrap_or(global),
    }
}

/// TTL for a stored answer: the request's `x-triage-cache-ttl`, else the
/// router's or model's override, else the global default.
fn cache_ttl(rt: &Runtime, target: &Target, headers: &HeaderMap) -> Option<Duration> {
    if let Some(v) = headers
        .get("x-triage-cache-ttl")
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(d) = humantime::parse_duration(v) {
            return Some(d);
        }
    }
    let over = match target {
        Target::Router(r) => r.cache.as_ref().and_then(|c| c.ttl),
        Target::Model(m) => rt.config.cache.models.get(&m.name).and_then(|c| c.ttl),
    };
    over.or(Some(rt.config.cache.ttl))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A cache hit: no upstream call and no charge, but limits still count it.
#[allow(clippy::too_many_arguments)]
async fn serve_hit(
    app: &Arc<AppState>,
    caller: &Caller,
    chat: &ChatRequest,
    entry: Arc<Entry>,
    plan: Plan,
    sessions: Vec<(Arc<Guard>, SessionKey)>,
    early: Option<Option<Admission>>,
    started: Instant,
    rid: &Arc<str>,
    mut extra: Vec<(HeaderName, String)>,
    facts: &mut LogFacts,
) -> Result<Response, ApiError> {
    // Limits still count a hit (it is a request); it reserves nothing.
    let admission = match early {
        Some(a) => a,
        None => {
            let a = admit(app, caller, chat.features.prompt_tokens, 0).await?;
            push_rate_headers(&a, &mut extra);
            a
        }
    };
    facts.cache = Some("hit");
    let mut meter = Meter::new(
        app,
        caller,
        &plan,
        chat.stream,
        CacheOutcome::Hit,
        started,
        rid,
    );
    meter.admission = admission;
    meter.sessions = sessions;
    let mut decision = plan.decision;
    if decision.model.is_empty() {
        decision.model = "cache".into();
    }
    facts.route = Some(decision.header_value());
    extra.push((
        HeaderName::from_static("x-triage-route"),
        decision.header_value(),
    ));
    extra.push((HeaderName::from_static("x-triage-cache"), "hit".into()));
    let id = format!("chatcmpl-{}", &rid.replace("req-", ""));
    facts.metered = true;
    let resp = if chat.stream {
        let chunks = entry
            .replay_chunks(
                &id,
                now_secs(),
                cache::DEFAULT_CHUNK_CHARS,
                chat.client_wants_usage,
            )
            .map_err(|e| ApiError::internal(format!("cached answer unreadable: {e}")))?;
        let mut frames: Vec<Result<Bytes, std::convert::Infallible>> =
            chunks.iter().map(|c| Ok(frame(c))).collect();
        frames.push(Ok(Bytes::from_static(DONE_FRAME)));
        meter.finish(200, &Bill::default(), Some(started.elapsed()));
        sse_response(Body::from_stream(futures::stream::iter(frames)))
    } else {
        let body = entry
            .replay_completion(&id, now_secs())
            .map_err(|e| ApiError::internal(format!("cached answer unreadable: {e}")))?;
        meter.finish(200, &Bill::default(), None);
        json_response(body)
    };
    Ok(with_headers(resp, extra))
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
) -> Result<CallResult, ApiError> {
    let body_for = |m: &ModelConfig| {
        let mut b = chat.body.clone();
        b.insert("model".into(), Value::String(m.upstream_model.clone()));
        b.remove("stream");
        b.remove("stream_options");
        if let Some(t) = call.temperature {
            if let Some(n) = serde_json::Number::from_f64(t) {
                b.insert("temperature".into(), Value::Number(n));
            }
        }
        if let Some(ms) = &call.messages {
            b.insert("messages".into(), Value::Array(ms.clone()));
            for k in [
                "tools",
                "tool_choice",
                "response_format",
                "functions",
                "function_call",
                "n",
            ] {
                b.remove(k);
            }
        }
        Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
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
    let body = d
        .response
        .collect(MAX_UPSTREAM_BODY)
        .await
        .map_err(|e| ApiError::bad_gateway(e.to_string()))?;
    let completion: Value = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_gateway(format!(
            "Provider for `{}` returned invalid JSON.",
            model.name
        ))
    })?;
    let usage = completion
        .get("usage")
        .and_then(Usage::from_json)
        .unwrap_or_default();
    served.lock().push((model, usage));
    Ok(CallResult {
        completion,
        usage: vote::Usage {
            prompt: usage.prompt_tokens,
            completion: usage.completion_tokens,
            cached: usage.cached_tokens,
        },
    })
}

/// Turns a decided completion into the client's response (SSE replay when streaming).
fn respond_with_completion(chat: &ChatRequest, completion: &Value, usage: Usage) -> Response {
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
        let mut frames: Vec<Result<Bytes, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(frame(c.to_string().as_bytes())))
            .collect();
        frames.push(Ok(Bytes::from_static(DONE_FRAME)));
        sse_response(Body::from_stream(futures::stream::iter(frames)))
    } else {
        json_response(Bytes::from(completion.to_string()))
    }
}

/// A request answered by several upstream calls (a vote or a cascade): once
/// decided it is billed per call, answered, and maybe cached, like any other.
struct MultiCall {
    meter: Meter,
    bill: Bill,
    extra: Vec<(HeaderName, String)>,
    fill: Option<FillGuard>,
    /// (deployment that answered, its usage) per finished call.
    served: Mutex<Vec<(Arc<ModelConfig>, Usage)>>,
    started: Instant,
}

impl MultiCall {
    fn new(
        meter: Meter,
        bill: Bill,
        extra: Vec<(HeaderName, String)>,
        fill: Option<FillGuard>,
    ) -> Self {
        MultiCall {
            meter,
            bill,
            extra,
            fill,
            served: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    /// Moves the finished calls into the bill; returns the models that answered, in order.
    fn collect(&mut self, facts: &mut LogFacts) -> Vec<String> {
        let wait = self.started.elapsed();
        self.meter.upstream_wait = wait;
        facts.upstream_wait = wait;
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
        decision: &RouteDecision,
        outcome: (&'static str, String),
        cacheable: bool,
        facts: &mut LogFacts,
    ) -> Response {
        self.meter.model = decision.model.clone();
        self.meter.tier = decision.tier.clone().unwrap_or_default();
        self.extra
            .push((HeaderName::from_static(outcome.0), outcome.1));
        self.extra.push((
            HeaderName::from_static("x-triage-route"),
            decision.header_value(),
        ));
        facts.route = Some(decision.header_value());
        let resp = respond_with_completion(chat, completion, self.bill.usage());
        self.meter.finish(200, &self.bill, None);
        if let (Some(g), true) = (self.fill, cacheable) {
            if let Ok(entry) = Entry::from_completion(completion) {
                g.complete(entry, None).await;
            }
        }
        with_headers(resp, self.extra)
    }

    fn fail(self, err: ApiError) -> ApiError {
        self.meter.finish(err.status.as_u16(), &self.bill, None);
        err
    }
}

async fn run_vote(
    app: &Arc<AppState>,
    rt: &Runtime,
    chat: &ChatRequest,
    plan: Plan,
    v: Arc<CompiledVote>,
    mut run: MultiCall,
    facts: &mut LogFacts,
) -> Result<Response, ApiError> {
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
            return Err(run.fail(ApiError::bad_gateway(format!(
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
            &decision,
            ("x-triage-vote", o.header()),
            true,
            facts,
        )
        .await)
}

async fn run_cascade(
    app: &Arc<AppState>,
    rt: &Runtime,
    chat: &ChatRequest,
    plan: Plan,
    c: Arc<CompiledCascade>,
    mut run: MultiCall,
    facts: &mut LogFacts,
) -> Result<Response, ApiError> {
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
            return Err(run.fail(ApiError::bad_gateway(
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
            &decision,
            ("x-triage-cascade", o.header()),
            o.passed,
            facts,
        )
        .await)
}

/// Prompt text of a `/v1/completions` (`prompt`) or `/v1/embeddings` (`input`) body.
fn passthrough_prompt_tokens(body: &serde_json::Map<String, Value>) -> u64 {
    fn count(v: &Value) -> u64 {
        match v {
            Value::String(s) => crate::usage::estimate_tokens(s),
            Value::Array(items) => items.iter().map(count).sum(),
            // Token ids: one each.
            Value::Number(_) => 1,
            _ => 0,
        }
    }
    body.get("prompt")
        .or_else(|| body.get("input"))
        .map(count)
        .unwrap_or(0)
}

/// `/v1/completions` and `/v1/embeddings`: the same model resolution,
/// fallbacks, limits and spend as chat; the body is passed through.
pub(crate) async fn passthrough(
    app: &Arc<AppState>,
    caller: &Caller,
    req: Request,
    path: &'static str,
    allow_routers: bool,
    rid: &Arc<str>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (_headers, bytes, _) = read_body(app, req).await?;
    let mut body = request::parse_object(&bytes)?;
    let model = request::model_field(&body)?;
    let rt = app.runtime.load_full();
    let (candidates, decision, router) = match resolve(&rt, caller, &model)? {
        Target::Model(m) => (route::direct_candidates(&rt.config, &m), RouteDecision::direct(&m.name), None),
        Target::Router(r) if allow_routers => {
            // No classifier for raw text completions: the most capable tier.
            let tier = r.unknown_tier.clone();
            let mut d = RouteDecision::direct(&model);
            d.router = Some(r.name.clone());
            d.tier = Some(tier.clone());
            d.reason = RouteReason::Unknown("not_chat");
            (route::tier_candidates(&rt.config, &tier, &app.health), d, Some(r))
        }
        Target::Router(_) => {
            return Err(ApiError::invalid_param(
                "model",
                format!("`{model}` is a router; routers serve chat and text completions, name a model here."),
            ))
        }
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let client_wants_usage = request::nested(&body, "stream_options", "include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if stream {
        // Usage on streams is needed for accounting, as on chat.
        let opts = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(o) = opts {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    let prompt = passthrough_prompt_tokens(&body);
    let embeddings = path == "/embeddings";
    let max_out = body.get("max_tokens").and_then(Value::as_u64);
    let reserve = candidates
        .iter()
        .map(|c| {
            let out = if embeddings {
                0
            } else {
                max_out.unwrap_or(c.model.max_output_tokens)
            };
            let u = Usage {
                prompt_tokens: reserved_prompt_tokens(prompt),
                completion_tokens: out,
                cached_tokens: 0,
                estimated: true,
            };
            cost_of(&c.model, &u)
        })
        .max()
        .unwrap_or(0);
    let admission = admit(app, caller, prompt, reserve).await?;
    let mut extra = Vec::new();
    push_rate_headers(&admission, &mut extra);
    let plan = Plan {
        decision,
        candidates,
        vote: None,
        cascade: None,
        router,
        classification_bill: None,
    };
    let mut meter = Meter::new(app, caller, &plan, stream, CacheOutcome::None, started, rid);
    meter.admission = admission;
    meter.on_abandon(plan.candidates.first().map(|c| &c.model), prompt, 1);
    let tier = plan.decision.tier.clone();
    let dispatched = dispatch(
        app,
        &rt,
        &plan.candidates,
        path,
        |m| {
            let mut b = body.clone();
            b.insert("model".into(), Value::String(m.upstream_model.clone()));
            Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
        },
        tier.as_deref(),
    )
    .await;
    let d = match dispatched {
        Ok(d) => d,
        Err(e) => {
            meter.finish(e.status.as_u16(), &Bill::default(), None);
            return Err(e);
        }
    };
    let mut decision = plan.decision;
    decision.model = d.candidate.model.name.clone();
    decision.fell_back_from = d.fell_back_from;
    decision.skipped = d.skipped;
    meter.model = decision.model.clone();
    meter.upstream_wait = d.upstream_wait;
    extra.push((
        HeaderName::from_static("x-triage-route"),
        decision.header_value(),
    ));
    let model = d.candidate.model.clone();
    let resp = if stream {
        let on_end = Box::new(move |end: StreamEnd| {
            let mut bill = Bill::default();
            bill.add(&model, end.usage);
            meter.finish(200, &bill, end.first_byte);
        });
        let fwd = SseForwarder::new(
            d.response.body,
            !client_wants_usage,
            prompt,
            None,
            started,
            on_end,
        );
        sse_response(Body::from_stream(fwd))
    } else {
        let bytes = match d.response.collect(MAX_UPSTREAM_BODY).await {
            Ok(b) => b,
            Err(e) => {
                meter.finish(502, &Bill::default(), None);
                return Err(ApiError::bad_gateway(e.to_string()));
            }
        };
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
            meter.finish(502, &Bill::default(), None);
            return Err(ApiError::bad_gateway(format!(
                "Provider for `{}` returned invalid JSON.",
                model.name
            )));
        };
        let usage = v.get("usage").and_then(Usage::from_json).unwrap_or(Usage {
            prompt_tokens: prompt,
            completion_tokens: 0,
            cached_tokens: 0,
            estimated: true,
        });
        let mut bill = Bill::default();
        bill.add(&model, usage);
        meter.finish(200, &bill, None);
        json_response(bytes)
    };
    Ok(with_headers(resp, extra))
}
