//! Step 2: agent guards — session ceilings and loop detection, per router
//! and per key.

use super::state::{AppState, Runtime};
use super::target::Target;
use super::{GatewayError, Request};
use crate::guard::{CeilingHit, Guard, LoopAction, SessionKey, SessionRefusal};
use serde_json::Value;
use std::sync::Arc;
use std::time::SystemTime;

/// Result of the agent guards.
pub struct GuardOutcome {
    /// Sessions to charge when the request settles.
    pub sessions: Vec<(Arc<Guard>, SessionKey)>,
    /// A loop was found whose action is to escalate to the most capable tier.
    pub escalate: bool,
}

pub async fn check(
    app: &AppState,
    rt: &Runtime,
    req: &Request,
    target: &Target,
    headers: &mut Vec<(&'static str, String)>,
) -> Result<GuardOutcome, GatewayError> {
    let mut out = GuardOutcome {
        sessions: Vec::new(),
        escalate: false,
    };
    if rt.guards.is_empty() {
        return Ok(out);
    }
    let body = Value::Object(req.chat.body.clone());
    for (g, scope_name) in scopes(rt, req, target) {
        if let Some(finding) = g.detect_loop(&body) {
            let action = finding.action;
            app.metrics.record_loop_detected(action.as_str());
            headers.push((crate::guard::LOOP_HEADER, finding.header_value()));
            match action {
                LoopAction::Block => return Err(loop_error(&finding.header_value())),
                LoopAction::Escalate => out.escalate = true,
                LoopAction::Flag => {}
            }
        }
        let hv = req
            .headers
            .get(g.config().session_header.as_str())
            .or(req.session.as_deref());
        let Some(sk) = g.session_key(&scope_name, hv, Some(&body)) else {
            continue;
        };
        match g.try_check(Some(&sk), SystemTime::now()).await {
            Ok(Some(w)) => headers.push((crate::guard::WARNING_HEADER, w.header_value())),
            Ok(None) => {}
            Err(SessionRefusal::Ceiling(hit)) => return Err(session_error(app, &hit)),
            Err(SessionRefusal::Unavailable) => {
                tracing::debug!("refused: the shared session store is unavailable (fail_closed)");
                return Err(GatewayError::store_unavailable(
                    "The shared session store is unavailable; try again shortly.",
                ));
            }
        }
        out.sessions.push((g.clone(), sk));
    }
    app.metrics.set_sessions_active(app.sessions.active_count());
    Ok(out)
}

/// The guards that apply, each with its own scope: a router guard and a key
/// guard seeing the same session id must not share (and double-count) one entry.
fn scopes<'a>(rt: &'a Runtime, req: &Request, target: &Target) -> Vec<(&'a Arc<Guard>, String)> {
    let caller_scope = req
        .caller
        .name()
        .map_or_else(|| "anonymous".to_string(), |k| format!("key:{k}"));
    let mut scopes = Vec::new();
    if let Target::Router(r) = target {
        if let Some(g) = rt.guards.get(&format!("router:{}", r.name)) {
            scopes.push((g, format!("router:{}|{caller_scope}", r.name)));
        }
    }
    if let Some(k) = req.caller.name() {
        if let Some(g) = rt.guards.get(&format!("key:{k}")) {
            scopes.push((g, caller_scope));
        }
    }
    scopes
}

fn loop_error(finding: &str) -> GatewayError {
    GatewayError::new(
        422,
        "invalid_request_error",
        Some("loop_detected"),
        format!("The conversation repeats itself ({finding}); refusing to call the model again."),
    )
    .with_header(crate::guard::LOOP_HEADER, finding)
}

fn session_error(app: &AppState, hit: &CeilingHit) -> GatewayError {
    app.metrics.record_session_limit(hit.kind.as_str());
    GatewayError::new(
        429,
        "invalid_request_error",
        Some("session_limit_exceeded"),
        format!(
            "Session ceiling reached: {} ({}).",
            hit.kind.as_str(),
            hit.header_value()
        ),
    )
    .with_param(hit.kind.as_str())
    .with_header("x-triage-session-limit", hit.header_value())
}
