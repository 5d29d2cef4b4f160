//! The request pipeline, protocol-neutral: a `Request` (a parsed chat request
//! plus the caller and the few header facts the pipeline reads) goes in, an
//! `Outcome` (JSON or a chat SSE stream, the route decision and response
//! headers as data) or a `GatewayError` comes out. It knows no HTTP server;
//! `server/` decodes bodies into requests and encodes outcomes, and a handler
//! for another API translates into a `ChatRequest` and back around the same
//! entry point (`chat`).
//!
//! One request travels, in order:
//!
//! 1. **Connection** (`server::serve`): hyper HTTP/1.1 + HTTP/2; a request head
//!    must arrive within `server.header_read_timeout` (slowloris) and fit in
//!    `server.max_header_bytes`; on SIGTERM the listener closes and open
//!    requests and streams drain for up to `server.shutdown_grace`.
//! 2. **Access layer** (`server::access_log`): adopts the client's
//!    `x-request-id` or makes one, echoes it on the response, counts the
//!    request in flight, and writes one log line per request with status,
//!    latency, key and route. A panic becomes a 500 envelope, never a dropped
//!    connection.
//! 3. **Router** (`server::app`): `/healthz`, `/readyz`, `/metrics` are open;
//!    everything under `/v1` first passes **authentication** (virtual key →
//!    401). Unknown paths get a 404 envelope, wrong methods a 405 envelope.
//! 4. **Handler** (`server::handlers`): reads the body, bounded by
//!    `server.max_body_bytes` (413), parses the typed fields once and keeps the
//!    rest verbatim (`protocol::openai::chat`, 400 names the field), and calls
//!    `gateway::chat` (or `gateway::passthrough` for completions and
//!    embeddings). From here on, this module:
//!    1. `target`: resolve `model` to a router or a model, check the key may
//!       use it (404/403);
//!    2. `guards`: session ceilings and tool-call loop detection (429/422);
//!    3. `plan`: classify (routers only) and pick a tier by rule → `Plan`
//!       (an LLM classifier costs a call, so its router is admitted — step 5 —
//!       at its dearest route before classifying);
//!    4. `cache`: lookup, single-flight for identical concurrent misses (a hit
//!       still passes step 5 with nothing to reserve, then is answered);
//!    5. `admit`: one admission: rpm, tpm on the prompt estimate,
//!       max_parallel, and the worst-case cost reserved against the key's and
//!       team's budget (429);
//!    6. execute: `single` (one call with fallback across deployments; retries
//!       only before the first byte reaches the client) or `multi` (a vote or
//!       a cascade);
//!    7. respond: JSON, or SSE forwarded chunk by chunk as it arrives (`stream`);
//!    8. `meter`: when the response ends (or the client leaves): settle spend
//!       and tokens, record metrics, fill the cache if the answer was complete.
//! 5. **Encode** (`server`): the `Outcome` becomes the HTTP response, a
//!    `GatewayError` the protocol's error envelope.

pub mod admit;
pub mod cache;
pub mod error;
pub mod guards;
pub mod meter;
pub mod multi;
pub mod passthrough;
pub mod plan;
pub mod single;
pub mod state;
pub mod stream;
pub mod target;

pub use error::GatewayError;
pub use passthrough::passthrough;

use crate::auth::KeyIdentity;
use crate::metrics::{CacheOutcome, RequestRecord};
use crate::protocol::openai::chat::ChatRequest;
use crate::protocol::Headers;
use crate::route::RouteDecision;
use bytes::Bytes;
use futures::stream::BoxStream;
use state::AppState;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The API a request arrived on: carried into metrics, logs, the cache key
/// scope and `x-triage-route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    Chat,
    Completions,
    Embeddings,
    /// OpenAI Responses (ingress not served yet).
    Responses,
    /// Anthropic Messages (ingress not served yet).
    Messages,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
            Api::Messages => "messages",
        }
    }

    /// The upstream path this API's requests are sent to (chat for
    /// translated APIs).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Api::Completions => "/completions",
            Api::Embeddings => "/embeddings",
            Api::Chat | Api::Responses | Api::Messages => "/chat/completions",
        }
    }
}

/// The caller of a `/v1` request (absent only with `auth = "none"`).
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Arc<KeyIdentity>>);

impl Caller {
    pub fn name(&self) -> Option<&str> {
        self.0.as_ref().map(|k| k.name.as_str())
    }
}

/// One request, decoded by its edge.
pub struct Request {
    pub api: Api,
    pub chat: ChatRequest,
    /// The body as the client sent it (for edges that pass it on verbatim).
    pub raw: Bytes,
    pub caller: Caller,
    pub headers: Headers,
    /// A session id the edge found in the body (Claude Code's
    /// `metadata.user_id`, a Responses conversation), used by the agent
    /// guards when no session header names one.
    pub session_hint: Option<String>,
    pub request_id: Arc<str>,
    /// When the edge started on the request (latency and time to first byte).
    pub started: Instant,
}

/// Response body: a whole JSON document, or chat SSE frames as they come.
pub enum Body {
    Json(Bytes),
    Stream(BoxStream<'static, Result<Bytes, std::convert::Infallible>>),
}

/// What the pipeline answered.
pub struct Outcome {
    pub body: Body,
    pub decision: RouteDecision,
    /// Response headers (`x-triage-*`, rate-limit state), in order.
    pub headers: Vec<(&'static str, String)>,
}

/// Facts about a request for the access log, whatever its outcome.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub api: Option<&'static str>,
    pub key: Option<String>,
    pub router: Option<String>,
    pub upstream_wait: Duration,
    /// The request's metrics were already recorded (by its settlement).
    pub metered: bool,
    pub route: Option<String>,
    /// The plan's decision, for `x-triage-route` when the request fails after routing.
    pub decision: Option<RouteDecision>,
    pub cache: Option<&'static str>,
}

/// The answer and the log facts of one request.
pub struct Reply {
    pub result: Result<Outcome, GatewayError>,
    pub facts: Facts,
}

/// The entry point for every chat-shaped request (chat completions today;
/// Responses and Messages translated into a `ChatRequest` tomorrow).
pub async fn chat(app: &Arc<AppState>, req: Request) -> Reply {
    let mut facts = Facts {
        key: req.caller.name().map(str::to_string),
        ..Facts::default()
    };
    let _inflight = app.metrics.inflight();
    let result = run_chat(app, &req, &mut facts).await;
    finish(app, req.api, req.started, result, facts)
}

/// Finalises `x-triage-route` (the one place it is written) and counts
/// requests refused before anything was metered.
pub(crate) fn finish(
    app: &AppState,
    api: Api,
    started: Instant,
    result: Result<Outcome, GatewayError>,
    mut facts: Facts,
) -> Reply {
    facts.api = Some(api.as_str());
    let route = |d: &RouteDecision| format!("api={}; {}", api.as_str(), d.header_value());
    let result = match result {
        Ok(mut o) => {
            let r = route(&o.decision);
            facts.route = Some(r.clone());
            o.headers.push(("x-triage-route", r));
            Ok(o)
        }
        Err(mut e) => {
            // Failed after routing: the plan, plus every deployment tried or skipped.
            if let Some(mut d) = facts.decision.take() {
                d.fell_back_from = std::mem::take(&mut e.tried);
                d.skipped = std::mem::take(&mut e.cooling);
                d.model.clear();
                let r = route(&d);
                facts.route = Some(r.clone());
                e.headers.push(("x-triage-route", r));
            }
            Err(e)
        }
    };
    if let Err(e) = &result {
        if !facts.metered {
            app.metrics.record_request(&RequestRecord {
                router: facts.router.as_deref().unwrap_or(""),
                label: "",
                tier: "",
                model: "",
                key: facts.key.as_deref().unwrap_or(""),
                status: e.status,
                cache: CacheOutcome::None,
                stream: false,
                duration: started.elapsed(),
                upstream_wait: facts.upstream_wait,
                ttft: None,
            });
        }
    }
    Reply { result, facts }
}

/// Largest non-streaming upstream answer we accept.
pub const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// A planned, admitted request about to be executed (step 6).
pub struct Exec<'a> {
    pub app: &'a Arc<AppState>,
    pub rt: &'a state::Runtime,
    pub req: &'a Request,
    pub plan: plan::Plan,
    pub meter: meter::Meter,
    pub bill: meter::Bill,
    pub headers: Vec<(&'static str, String)>,
    pub fill: Option<crate::cache::FillGuard>,
    pub cache: CacheOutcome,
    pub ttl: Option<Duration>,
}

/// Steps 1–8 for one chat request.
async fn run_chat(
    app: &Arc<AppState>,
    req: &Request,
    facts: &mut Facts,
) -> Result<Outcome, GatewayError> {
    let chat = &req.chat;
    let rt = app.runtime.load_full();
    let target = target::resolve(&rt, &req.caller, &chat.model)?;
    if let target::Target::Router(r) = &target {
        facts.router = Some(r.name.clone());
    }
    let mut headers = Vec::new();
    let guards = guards::check(app, &rt, req, &target, &mut headers).await?;
    let early = admit_before_classifying(app, &rt, req, &target, &mut headers).await?;
    let plan = plan::plan(app, &rt, req, &target, guards.escalate).await;
    facts.route = Some(plan.decision.header_value());
    facts.decision = Some(plan.decision.clone());
    let (fill, cache, ttl) = match cache::lookup(app, &rt, req, &target, &plan).await {
        cache::CacheStep::Hit(entry) => {
            let hit = cache::Hit {
                app,
                req,
                entry,
                plan,
                sessions: guards.sessions,
                early,
                headers,
            };
            return cache::serve_hit(hit, facts).await;
        }
        cache::CacheStep::Go { fill, outcome, ttl } => (fill, outcome, ttl),
    };
    if cache != CacheOutcome::None {
        facts.cache = Some(cache::label(cache));
    }
    let admission = match early {
        Some(a) => a,
        None => {
            let reserve = plan::reservation(&rt, chat, &plan);
            admit::admit(
                app,
                &req.caller,
                chat.features.prompt_tokens,
                reserve,
                &mut headers,
            )
            .await?
        }
    };
    let meter = meter::Meter::new(meter::MeterInit {
        app,
        caller: &req.caller,
        plan: &plan,
        request_id: &req.request_id,
        started: req.started,
        stream: chat.stream,
        cache,
        admission,
        sessions: guards.sessions,
        prompt_tokens: Some(chat.features.prompt_tokens),
    });
    facts.metered = true;
    let mut bill = meter::Bill::default();
    if let Some((m, u)) = &plan.classification_bill {
        bill.add(m, *u);
    }
    let x = Exec {
        app,
        rt: &rt,
        req,
        plan,
        meter,
        bill,
        headers,
        fill,
        cache,
        ttl,
    };
    execute(x, facts).await
}

/// Step 6: a vote, a cascade, or one call.
async fn execute(x: Exec<'_>, facts: &mut Facts) -> Result<Outcome, GatewayError> {
    let (app, rt, chat) = (x.app, x.rt, &x.req.chat);
    if let Some(v) = x.plan.vote.clone() {
        let (run, plan) = multi::MultiCall::new(x);
        return multi::run_vote(app, rt, chat, plan, v, run, facts).await;
    }
    if let Some(c) = x.plan.cascade.clone() {
        let (run, plan) = multi::MultiCall::new(x);
        return multi::run_cascade(app, rt, chat, plan, c, run, facts).await;
    }
    single::call(x, facts).await
}

/// An LLM classifier costs a call: admit (at the router's worst case) before
/// making it, so a key that is out of budget or rate cannot cause unbilled
/// calls. `None` when admission waits for the plan (step 5).
async fn admit_before_classifying(
    app: &AppState,
    rt: &state::Runtime,
    req: &Request,
    target: &target::Target,
    headers: &mut Vec<(&'static str, String)>,
) -> Result<Option<Option<crate::limits::Admission>>, GatewayError> {
    let target::Target::Router(r) = target else {
        return Ok(None);
    };
    if !matches!(r.classifier, crate::config::ClassifierKind::Llm { .. }) {
        return Ok(None);
    }
    let reserve = plan::router_worst_case(app, rt, &req.chat, r);
    let a = admit::admit(
        app,
        &req.caller,
        req.chat.features.prompt_tokens,
        reserve,
        headers,
    )
    .await?;
    Ok(Some(a))
}
