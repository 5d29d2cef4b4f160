//! Agent guards end to end: session ceilings and loop detection configured
//! on a router (`[routers.X.guard]`) or a key (`[keys.X.guard]`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use triage::guard::{SessionKey, SessionUsage};
use triage::server::Gateway;

/// A rules router `g` whose catch-all rule picks tier `small` (unknown: `large`),
/// with `guard` as the body of `[routers.g.guard]`.
fn guarded_router(guard: &str) -> String {
    format!(
        r#"
[routers.g]
classifier = "rules"
keywords = {{ chat = ["."] }}
unknown_tier = "large"
[[routers.g.rules]]
tier = "small"
[routers.g.guard]
{guard}
"#
    )
}

fn hdr(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.to_str().unwrap().to_string())
}

/// POST with optional session header (default header name).
async fn send(
    gw: &Gateway,
    session: Option<(&str, &str)>,
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .json(&body);
    if let Some((name, id)) = session {
        r = r.header(name, id);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": user("hello")})
}

fn sess(id: &str) -> Option<(&'static str, &str)> {
    Some(("x-triage-session", id))
}

/// A key-guard session's counters, once the last response's settlement is recorded.
async fn usage_when(gw: &Gateway, id: &str, cond: impl Fn(&SessionUsage) -> bool) -> SessionUsage {
    usage_in(gw, "key:app", id, cond).await
}

async fn usage_in(
    gw: &Gateway,
    scope: &str,
    id: &str,
    cond: impl Fn(&SessionUsage) -> bool,
) -> SessionUsage {
    let key = SessionKey::new(scope, id);
    for _ in 0..300 {
        if let Some(u) = gw.state.sessions.usage(&key).await {
            if cond(&u) {
                return u;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "session {scope}/{id}: {:?}",
        gw.state.sessions.usage(&key).await
    );
}

fn assert_ceiling(
    status: u16,
    h: &reqwest::header::HeaderMap,
    body: &Value,
    kind: &str,
    limit_header: &str,
) {
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "session_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], kind);
    assert_eq!(
        hdr(h, "x-triage-session-limit").as_deref(),
        Some(limit_header),
        "{body}"
    );
}

// ---- Loop detection --------------------------------------------------------

/// The body an agent sends on turn `turn` (1-based): the task, then one identical
/// `search` call and its result per earlier turn (argument formatting varies).
fn agent_turn(model: &str, turn: usize) -> Value {
    let mut messages = vec![
        json!({"role": "system", "content": "You are a research agent. Use tools."}),
        json!({"role": "user", "content": "Find today's weather in Paris."}),
    ];
    for i in 1..turn {
        let args = if i % 2 == 0 {
            r#"{"q": "weather paris", "limit": 5}"#
        } else {
            r#"{"limit":5,"q":"weather paris"}"#
        };
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": format!("call_{i}"), "type": "function", "function": {"name": "search", "arguments": args}}
        ]}));
        messages.push(
            json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": "no results"}),
        );
    }
    json!({"model": model, "messages": messages, "tools": [
        {"type": "function", "function": {"name": "search", "parameters": {"type": "object",
            "properties": {"q": {"type": "string"}, "limit": {"type": "integer"}}}}}
    ]})
}

const LOOP_3: &str = r#"repeated=search({"limit":5,"q":"weather paris"}) count=3"#;

#[tokio::test]
async fn loop_flag_annotates_from_the_kth_repeat() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &guarded_router("loop = { k = 3, window = 10, action = \"flag\" }"),
    ))
    .await;
    for turn in 1..=3 {
        let (status, h, body) = send(&gw, None, agent_turn("g", turn)).await;
        assert_eq!(status, 200, "turn {turn}: {body}");
        assert_eq!(hdr(&h, "x-triage-loop"), None, "turn {turn}");
    }
    let (status, h, body) = send(&gw, None, agent_turn("g", 4)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(hdr(&h, "x-triage-loop").as_deref(), Some(LOOP_3));
    // Flagging changes nothing else: same tier, answered normally.
    assert!(hdr(&h, "x-triage-route").unwrap().contains("tier=small"));
    let (_, h, _) = send(&gw, None, agent_turn("g", 5)).await;
    assert_eq!(
        hdr(&h, "x-triage-loop").as_deref(),
        Some(r#"repeated=search({"limit":5,"q":"weather paris"}) count=4"#)
    );
    assert_eq!(up.calls(), 5);
    gw.shutdown().await;
}

#[tokio::test]
async fn loop_escalate_routes_the_kth_repeat_to_the_unknown_tier() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &guarded_router("loop = { k = 3, action = \"escalate\" }"),
    ))
    .await;
    for turn in 1..=3 {
        let (status, h, body) = send(&gw, None, agent_turn("g", turn)).await;
        assert_eq!(status, 200, "turn {turn}: {body}");
        let route = hdr(&h, "x-triage-route").unwrap();
        assert!(
            route.contains("tier=small; model=fast; reason=rule[0]"),
            "turn {turn}: {route}"
        );
    }
    assert_eq!(up.calls_for("smart-upstream"), 0);
    let (status, h, body) = send(&gw, None, agent_turn("g", 4)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(hdr(&h, "x-triage-loop").as_deref(), Some(LOOP_3));
    let route = hdr(&h, "x-triage-route").unwrap();
    assert!(
        route.contains("tier=large; model=smart; reason=unknown:loop_escalated"),
        "{route}"
    );
    assert_eq!(up.calls_for("smart-upstream"), 1);
    assert_eq!(up.last_request()["model"], "smart-upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn loop_block_refuses_the_kth_repeat_without_calling_upstream() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &guarded_router("loop = { k = 4, window = 6, action = \"block\" }"),
    ))
    .await;
    for turn in 1..=4 {
        let (status, _, body) = send(&gw, None, agent_turn("g", turn)).await;
        assert_eq!(status, 200, "turn {turn}: {body}");
    }
    let (status, h, body) = send(&gw, None, agent_turn("g", 5)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "loop_detected");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let finding = r#"repeated=search({"limit":5,"q":"weather paris"}) count=4"#;
    assert!(
        body["error"]["message"].as_str().unwrap().contains(finding),
        "{body}"
    );
    assert_eq!(hdr(&h, "x-triage-loop").as_deref(), Some(finding));
    assert_eq!(up.calls(), 4);
    // A different tool call breaks the pattern within the window.
    let mut body = agent_turn("g", 4);
    body["messages"].as_array_mut().unwrap().push(json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"paris forecast\"}"}}]}));
    body["messages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "tool", "tool_call_id": "x", "content": "sunny"}));
    let (status, _, b) = send(&gw, None, body).await;
    assert_eq!(status, 200, "{b}");
    gw.shutdown().await;
}

#[tokio::test]
async fn loop_on_a_key_guard_and_repeated_text_answers() {
    let up = MockUpstream::echo().await;
    // On the key: applies to direct model requests too.
    let extra = "[keys.app.guard]\nloop = { k = 2, action = \"block\" }";
    let gw = start_gateway(&config(&up.url, extra)).await;
    let (status, _, body) = send(&gw, None, agent_turn("fast", 2)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send(&gw, None, agent_turn("fast", 3)).await;
    assert_eq!(status, 422, "{body}");
    // The assistant giving the same answer twice is a loop too.
    let msgs = json!([
        {"role": "user", "content": "fix the build"},
        {"role": "assistant", "content": "I cannot  fix that."},
        {"role": "user", "content": "try again"},
        {"role": "assistant", "content": "i cannot fix that."},
        {"role": "user", "content": "again"}
    ]);
    let (status, h, body) = send(&gw, None, json!({"model": "fast", "messages": msgs})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-loop").as_deref(),
        Some("repeated_text=i cannot fix that. count=2")
    );
    assert_eq!(up.calls(), 1);
    gw.shutdown().await;
}

// ---- Session ceilings -------------------------------------------------------

#[tokio::test]
async fn max_turns_refuses_the_request_after_the_limit() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &guarded_router("max_turns = 3"))).await;
    for i in 1..=3 {
        let (status, _, body) = send(&gw, sess("run-1"), hello("g")).await;
        assert_eq!(status, 200, "turn {i}: {body}");
    }
    let (status, h, body) = send(&gw, sess("run-1"), hello("g")).await;
    assert_ceiling(status, &h, &body, "turns", "turns=3/3");
    // Refusals are not turns; other sessions are independent.
    let (status, h, body) = send(&gw, sess("run-1"), hello("g")).await;
    assert_ceiling(status, &h, &body, "turns", "turns=3/3");
    let (status, _, _) = send(&gw, sess("run-2"), hello("g")).await;
    assert_eq!(status, 200);
    assert_eq!(up.calls(), 4);
    gw.shutdown().await;
}

#[tokio::test]
async fn max_tokens_trips_once_the_settled_total_reaches_it() {
    let up = MockUpstream::echo().await;
    // Each call: 2 prompt + 2 completion tokens ("hello" -> "echo: hello").
    let gw = start_gateway(&config(&up.url, "[keys.app.guard]\nmax_tokens = 8")).await;
    let (status, _, _) = send(&gw, sess("t"), hello("fast")).await;
    assert_eq!(status, 200);
    usage_when(&gw, "t", |u| u.tokens == 4).await;
    let (status, _, _) = send(&gw, sess("t"), hello("fast")).await;
    assert_eq!(status, 200);
    usage_when(&gw, "t", |u| u.tokens == 8).await;
    let (status, h, body) = send(&gw, sess("t"), hello("fast")).await;
    assert_ceiling(status, &h, &body, "tokens", "tokens=8/8");
    assert_eq!(up.calls(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn max_spend_trips_once_the_settled_spend_reaches_it() {
    let up = MockUpstream::echo().await;
    // fast: 2 x $1/M + 2 x $2/M = $0.000006 per call.
    let gw = start_gateway(&config(
        &up.url,
        "[keys.app.guard]\nmax_spend_usd = \"0.000012\"",
    ))
    .await;
    for want in [6_000, 12_000] {
        let (status, _, body) = send(&gw, sess("s"), hello("fast")).await;
        assert_eq!(status, 200, "{body}");
        usage_when(&gw, "s", |u| u.spend_nanos == want).await;
    }
    let (status, h, body) = send(&gw, sess("s"), hello("fast")).await;
    assert_ceiling(status, &h, &body, "spend", "spend=0.000012/0.000012");
    // Streams are settled into the session too.
    let (status, _, _) = send(
        &gw,
        sess("s2"),
        json!({"model": "fast", "messages": user("hello"), "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    usage_when(&gw, "s2", |u| u.spend_nanos == 6_000 && u.tokens == 4).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn max_wall_clock_trips_after_the_duration() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &guarded_router("max_wall_clock = \"1s\""))).await;
    for _ in 0..2 {
        let (status, _, body) = send(&gw, sess("w"), hello("g")).await;
        assert_eq!(status, 200, "{body}");
    }
    // Waiting past the limit only makes the outcome more certain.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, h, body) = send(&gw, sess("w"), hello("g")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "session_limit_exceeded");
    assert_eq!(body["error"]["param"], "wall_clock");
    assert!(
        hdr(&h, "x-triage-session-limit")
            .unwrap()
            .starts_with("wall_clock="),
        "{h:?}"
    );
    // A new session has its own clock.
    let (status, _, _) = send(&gw, sess("w2"), hello("g")).await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn warn_at_adds_a_warning_header_from_the_threshold() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &guarded_router("max_turns = 4\nwarn_at = 0.5"),
    ))
    .await;
    let (status, h, _) = send(&gw, sess("a"), hello("g")).await;
    assert_eq!(status, 200);
    assert_eq!(hdr(&h, "x-triage-session-warning"), None);
    for turn in 2..=4 {
        let (status, h, _) = send(&gw, sess("a"), hello("g")).await;
        assert_eq!(status, 200);
        assert_eq!(
            hdr(&h, "x-triage-session-warning"),
            Some(format!("turns={turn}/4"))
        );
    }
    let (status, h, body) = send(&gw, sess("a"), hello("g")).await;
    assert_ceiling(status, &h, &body, "turns", "turns=4/4");
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_sessions_expire_and_start_over() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &guarded_router("max_turns = 1\nidle_ttl = \"300ms\""),
    ))
    .await;
    let (status, _, _) = send(&gw, sess("i"), hello("g")).await;
    assert_eq!(status, 200);
    let (status, h, body) = send(&gw, sess("i"), hello("g")).await;
    assert_ceiling(status, &h, &body, "turns", "turns=1/1");
    // Idle for longer than idle_ttl: forgotten.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, _, body) = send(&gw, sess("i"), hello("g")).await;
    assert_eq!(status, 200, "{body}");
    let (status, h, body) = send(&gw, sess("i"), hello("g")).await;
    assert_ceiling(status, &h, &body, "turns", "turns=1/1");
    gw.shutdown().await;
}

#[tokio::test]
async fn requests_without_a_session_are_not_counted() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &guarded_router("max_turns = 1\nmax_tokens = 1\nwarn_at = 0.1"),
    ))
    .await;
    for _ in 0..4 {
        let (status, h, body) = send(
            &gw,
            None,
            json!({"model": "g", "messages": user("hello"), "user": "u-1"}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(hdr(&h, "x-triage-session-warning"), None);
    }
    // A blank header is no session either.
    let (status, _, _) = send(&gw, sess("  "), hello("g")).await;
    assert_eq!(status, 200);
    gw.state.sessions.run_pending_tasks();
    assert_eq!(gw.state.sessions.active_count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn session_from_user_and_custom_header() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &guarded_router(
            "session_header = \"x-agent-run\"\nsession_from_user = true\nmax_turns = 2",
        ),
    ))
    .await;
    let as_user = |u: &str| json!({"model": "g", "messages": user("hello"), "user": u});
    for _ in 0..2 {
        let (status, _, body) = send(&gw, None, as_user("u-1")).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, h, body) = send(&gw, None, as_user("u-1")).await;
    assert_ceiling(status, &h, &body, "turns", "turns=2/2");
    let (status, _, _) = send(&gw, None, as_user("u-2")).await;
    assert_eq!(status, 200);
    // The configured header wins over `user`; the default header name means nothing here.
    let (status, _, body) = send(&gw, Some(("x-agent-run", "run-9")), as_user("u-1")).await;
    assert_eq!(status, 200, "{body}");
    usage_in(&gw, "router:g|key:app", "run-9", |u| u.turns == 1).await;
    let (status, _, body) = send(&gw, sess("run-9"), as_user("u-1")).await;
    assert_eq!(status, 429, "{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn router_and_key_guards_count_a_session_separately() {
    let up = MockUpstream::echo().await;
    let extra = format!(
        "{}\n[keys.app.guard]\nmax_turns = 10\nmax_tokens = 1000",
        guarded_router("max_turns = 3\nmax_tokens = 1000")
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    // The router's ceiling allows exactly 3 requests, even with a key guard on the same session.
    for i in 1..=3 {
        let (status, _, body) = send(&gw, sess("both"), hello("g")).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    let (status, h, body) = send(&gw, sess("both"), hello("g")).await;
    assert_ceiling(status, &h, &body, "turns", "turns=3/3");
    // The key's own count saw 3 admitted requests, and tokens once each (4 per call).
    let u = usage_when(&gw, "both", |u| u.tokens >= 12).await;
    assert_eq!((u.turns, u.tokens), (3, 12));
    gw.shutdown().await;
}
