//! Step 4: the response cache — lookup with single-flight for identical
//! concurrent misses, and answering a hit.

use super::admit::admit;
use super::meter::{Bill, Meter, MeterInit};
use super::plan::Plan;
use super::state::{AppState, Runtime};
use super::target::Target;
use super::{Body, Facts, GatewayError, Outcome, Request};
use crate::cache::{self, Entry, FillGuard, Lookup};
use crate::config::CacheScope;
use crate::guard::{Guard, SessionKey};
use crate::limits::Admission;
use crate::metrics::CacheOutcome;
use crate::protocol::sse::{frame, DONE_FRAME};
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the lookup found.
pub enum CacheStep {
    Hit(Arc<Entry>),
    /// Not answered from the cache: fill it (if `fill`) once the answer is complete.
    Go {
        fill: Option<FillGuard>,
        outcome: CacheOutcome,
        ttl: Option<Duration>,
    },
}

pub fn label(c: CacheOutcome) -> &'static str {
    match c {
        CacheOutcome::Hit => "hit",
        CacheOutcome::Miss => "miss",
        CacheOutcome::Bypass => "bypass",
        CacheOutcome::None => "none",
    }
}

pub async fn lookup(
    app: &AppState,
    rt: &Runtime,
    req: &Request,
    target: &Target,
    plan: &Plan,
) -> CacheStep {
    let ttl = ttl(rt, target, req);
    let cache = app.cache.load_full();
    let cacheable = enabled_for(rt, target, plan) && !matches!(ttl, Some(d) if d.is_zero());
    let Some(c) = cache.as_ref().as_ref().filter(|_| cacheable) else {
        return CacheStep::Go {
            fill: None,
            outcome: CacheOutcome::None,
            ttl,
        };
    };
    let cfg = &rt.config.cache;
    let cc = req.headers.get("cache-control");
    let mode = cache::cache_mode(&req.chat.body, cc, cfg.cache_sampled, ttl);
    let scope = match (cfg.scope, req.caller.name()) {
        (CacheScope::PerKey, Some(k)) => k,
        _ => "shared",
    };
    // Each API has its own entries: a Messages request and the chat request
    // it translates to must not answer each other.
    let scope = match req.api {
        super::Api::Chat => std::borrow::Cow::Borrowed(scope),
        api => std::borrow::Cow::Owned(format!("{scope}|api={}", api.as_str())),
    };
    let key = cache::cache_key(&scope, &req.chat.model, &req.chat.body);
    let (fill, outcome) = match c.lookup(key, mode).await {
        Lookup::Hit(entry) => {
            app.metrics.record_cache_lookup("response", true);
            return CacheStep::Hit(entry);
        }
        Lookup::Miss(g) => {
            app.metrics.record_cache_lookup("response", false);
            (Some(g), CacheOutcome::Miss)
        }
        Lookup::Bypass => (None, CacheOutcome::Bypass),
    };
    CacheStep::Go { fill, outcome, ttl }
}

fn enabled_for(rt: &Runtime, target: &Target, plan: &Plan) -> bool {
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
fn ttl(rt: &Runtime, target: &Target, req: &Request) -> Option<Duration> {
    if let Some(v) = req.headers.get("x-triage-cache-ttl") {
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

/// A cache hit and what the request gathered before it.
pub struct Hit<'a> {
    pub app: &'a Arc<AppState>,
    pub req: &'a Request,
    pub entry: Arc<Entry>,
    pub plan: Plan,
    pub sessions: Vec<(Arc<Guard>, SessionKey)>,
    /// Admitted before classifying (LLM classifier); else admitted here.
    pub early: Option<Option<Admission>>,
    pub headers: Vec<(&'static str, String)>,
}

/// A cache hit: no upstream call and no charge, but limits still count it
/// (it is a request); it reserves nothing.
pub async fn serve_hit(h: Hit<'_>, facts: &mut Facts) -> Result<Outcome, GatewayError> {
    let Hit {
        app,
        req,
        entry,
        plan,
        sessions,
        early,
        mut headers,
    } = h;
    let chat = &req.chat;
    let admission = match early {
        Some(a) => a,
        None => {
            admit(
                app,
                &req.caller,
                chat.features.prompt_tokens,
                0,
                &mut headers,
            )
            .await?
        }
    };
    facts.cache = Some("hit");
    let meter = Meter::new(MeterInit {
        app,
        caller: &req.caller,
        plan: &plan,
        request_id: &req.request_id,
        started: req.started,
        stream: chat.stream,
        cache: CacheOutcome::Hit,
        admission,
        sessions,
        prompt_tokens: None,
    });
    facts.metered = true;
    let mut decision = plan.decision;
    if decision.model.is_empty() {
        decision.model = "cache".into();
    }
    headers.push(("x-triage-cache", "hit".into()));
    let id = format!("chatcmpl-{}", &req.request_id.replace("req-", ""));
    let unreadable =
        |e: cache::CacheError| GatewayError::internal(format!("cached answer unreadable: {e}"));
    let body = if chat.stream {
        let chunks = entry
            .replay_chunks(
                &id,
                now_secs(),
                cache::DEFAULT_CHUNK_CHARS,
                chat.client_wants_usage,
            )
            .map_err(unreadable)?;
        meter.finish(200, &Bill::default(), Some(req.started.elapsed()));
        replay(chunks.iter().map(|c| frame(c)))
    } else {
        let body = entry
            .replay_completion(&id, now_secs())
            .map_err(unreadable)?;
        meter.finish(200, &Bill::default(), None);
        Body::Json(body)
    };
    Ok(Outcome {
        body,
        decision,
        headers,
    })
}

/// A stream of ready frames, closed by `[DONE]`.
pub fn replay(frames: impl Iterator<Item = Bytes>) -> Body {
    let mut all: Vec<Result<Bytes, std::convert::Infallible>> = frames.map(Ok).collect();
    all.push(Ok(Bytes::from_static(DONE_FRAME)));
    Body::Stream(Box::pin(futures::stream::iter(all)))
}
