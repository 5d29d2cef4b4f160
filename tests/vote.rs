//! Voting and cascades end to end: a router with `[routers.X.vote]` or
//! `[routers.X.cascade]` in front of a scripted upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_openai::types::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A rules router whose catch-all rule picks tier `small`, with `section`
/// (e.g. `[routers.v.vote]` or `[routers.v.cascade]` contents) appended.
fn router(kind: &str, body: &str) -> String {
    format!(
        r#"
[routers.v]
classifier = "rules"
keywords = {{ chat = ["."] }}
unknown_tier = "large"
[[routers.v.rules]]
tier = "small"
[routers.v.{kind}]
{body}
"#
    )
}

/// Candidate calls are told apart by the temperature the vote gives them:
/// 0.1 -> 1, 0.2 -> 2, ...; no temperature -> 0.
fn slot(req: &Value) -> u32 {
    req["temperature"]
        .as_f64()
        .map_or(0, |t| (t * 10.0).round() as u32)
}

fn content(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

fn hdr(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn delayed(ms: u64, text: &str) -> Reply {
    Reply::Delay(
        Duration::from_millis(ms),
        Box::new(Reply::Content(text.into())),
    )
}

fn ask(text: &str) -> Value {
    json!({"model": "v", "messages": user(text)})
}

/// Usage the common mock reports for a request it answered with `reply`.
fn mock_usage(req: &Value, reply: &str) -> (u64, u64) {
    let prompt: u64 = req["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| tokens(m["content"].as_str().unwrap_or("")))
        .sum::<u64>()
        + 1;
    (prompt, tokens(reply).max(1))
}

// fast: $1 / $2 per million tokens -> 1000 / 2000 nano-dollars per token.
fn fast_cost(prompt: u64, completion: u64) -> u64 {
    prompt * 1000 + completion * 2000
}

#[tokio::test]
async fn majority_picks_the_most_common_normalised_answer() {
    let up = MockUpstream::start(|req, _| match slot(req) {
        1 => Reply::Content("Paris".into()),
        2 => Reply::Content("  paris ".into()),
        // The dissenter is slow: once two agree, it can no longer change the outcome.
        _ => delayed(1500, "Lyon"),
    })
    .await;
    let gw = start_gateway(&config(
        &up.url,
        &router("vote", "n = 3\ntemperatures = [0.1, 0.2, 0.3]"),
    ))
    .await;
    let (status, h, body) = post_chat(&gw, ask("capital of France?")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=majority agree=2 of=3 cancelled=1"
    );
    assert_eq!(content(&body).trim().to_lowercase(), "paris");
    let route = hdr(&h, "x-triage-route");
    assert!(
        route.contains("router=v") && route.contains("tier=small") && route.contains("model=fast"),
        "{route}"
    );
    // Every candidate went to the routed tier's model, each with its own temperature.
    assert_eq!(up.calls_for("fast-upstream"), 3);
    let mut temps: Vec<u32> = up.state.requests.lock().unwrap().iter().map(slot).collect();
    temps.sort_unstable();
    assert_eq!(temps, vec![1, 2, 3]);
    gw.shutdown().await;
}

#[tokio::test]
async fn tie_first_goes_to_the_answer_that_arrived_first() {
    // Call 0 answers later than call 1: arrival order, not call index, breaks the tie.
    let up = MockUpstream::start(|req, _| match slot(req) {
        1 => delayed(600, "Lyon"),
        _ => Reply::Content("Paris".into()),
    })
    .await;
    let gw = start_gateway(&config(
        &up.url,
        &router("vote", "n = 2\ntemperatures = [0.1, 0.2]\ntie = \"first\""),
    ))
    .await;
    let (status, h, body) = post_chat(&gw, ask("capital of France?")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=majority agree=1 of=2 cancelled=0"
    );
    assert_eq!(content(&body), "Paris");
    gw.shutdown().await;
}

#[tokio::test]
async fn tie_most_capable_prefers_the_earliest_listed_model() {
    // The most capable model (listed first) answers last; it still wins the tie.
    let up = MockUpstream::start(|req, _| match req["model"].as_str() {
        Some("smart-upstream") => delayed(600, "Lyon"),
        _ => Reply::Content("Paris".into()),
    })
    .await;
    let gw = start_gateway(&config(
        &up.url,
        &router(
            "vote",
            "n = 2\nmodels = [\"smart\", \"fast\"]\ntie = \"most_capable\"",
        ),
    ))
    .await;
    let (status, h, body) = post_chat(&gw, ask("capital of France?")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=majority agree=1 of=2 cancelled=0"
    );
    assert_eq!(content(&body), "Lyon");
    assert!(
        hdr(&h, "x-triage-route").contains("model=smart"),
        "{}",
        hdr(&h, "x-triage-route")
    );
    assert_eq!(
        (
            up.calls_for("smart-upstream"),
            up.calls_for("fast-upstream")
        ),
        (1, 1)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn json_pointer_compares_only_the_pointed_value() {
    // As whole texts all three differ (the first would win the tie); by /answer two agree.
    let up = MockUpstream::start(|req, _| match slot(req) {
        1 => Reply::Content(r#"{"answer": 7, "reasoning": "a guess"}"#.into()),
        2 => delayed(
            300,
            "```json\n{\"answer\": 42, \"reasoning\": \"six sevens\"}\n```",
        ),
        _ => delayed(300, r#"{"reasoning": "6*7", "answer": 42}"#),
    })
    .await;
    let vote = "n = 3\ntemperatures = [0.1, 0.2, 0.3]\ncompare = { json_pointer = \"/answer\" }";
    let gw = start_gateway(&config(&up.url, &router("vote", vote))).await;
    let (status, h, body) = post_chat(&gw, ask("what is 6*7? answer as JSON")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=majority agree=2 of=3 cancelled=0"
    );
    let c = content(&body);
    assert!(c.contains("\"answer\": 42"), "{c}");
    gw.shutdown().await;
}

#[tokio::test]
async fn regex_compares_the_final_number() {
    let up = MockUpstream::start(|req, _| match slot(req) {
        1 => Reply::Content("Maybe 41?".into()),
        2 => delayed(300, "6 times 7 is 42."),
        _ => delayed(300, "I computed 40 + 2 = 42"),
    })
    .await;
    let vote = "n = 3\ntemperatures = [0.1, 0.2, 0.3]\ncompare = { regex = '(-?\\d+)\\D*$' }";
    let gw = start_gateway(&config(&up.url, &router("vote", vote))).await;
    let (status, h, body) = post_chat(&gw, ask("what is 6*7?")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=majority agree=2 of=3 cancelled=0"
    );
    let c = content(&body);
    assert!(
        c == "6 times 7 is 42." || c == "I computed 40 + 2 = 42",
        "{c}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn threshold_flags_when_k_of_n_say_yes() {
    let up = MockUpstream::start(|req, _| match slot(req) {
        1 => Reply::Content("Yes, this is spam.".into()),
        2 => Reply::Content("yes".into()),
        // k yes answers decide it: the third is not waited for.
        _ => delayed(1500, "No."),
    })
    .await;
    let vote = "n = 3\ntemperatures = [0.1, 0.2, 0.3]\nstrategy = \"threshold\"\nk = 2\nyes = { pattern = \"^yes\" }";
    let gw = start_gateway(&config(&up.url, &router("vote", vote))).await;
    let (status, h, body) = post_chat(&gw, ask("is this spam? buy cheap pills")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=threshold yes=2 of=3 k=2 flagged=true cancelled=1"
    );
    assert!(content(&body).to_lowercase().starts_with("yes"), "{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn threshold_not_flagged_below_k() {
    let up = MockUpstream::start(|req, _| match slot(req) {
        1 => Reply::Content("YES".into()),
        2 => Reply::Content("No".into()),
        _ => Reply::Content("no".into()),
    })
    .await;
    let vote = "n = 3\ntemperatures = [0.1, 0.2, 0.3]\nstrategy = \"threshold\"\nk = 2\nyes = { equals = \"yes\" }";
    let gw = start_gateway(&config(&up.url, &router("vote", vote))).await;
    let (status, h, body) = post_chat(&gw, ask("is this spam? hello mom")).await;
    assert_eq!(status, 200, "{body}");
    let v = hdr(&h, "x-triage-vote");
    assert!(
        v.starts_with("strategy=threshold yes=") && v.contains(" of=3 k=2 flagged=false "),
        "{v}"
    );
    // The answer returned is one from the winning ("no") side.
    assert_eq!(content(&body).to_lowercase(), "no");
    gw.shutdown().await;
}

#[tokio::test]
async fn best_of_returns_the_candidate_the_judge_picks_and_sums_usage() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "smart-upstream" {
            return Reply::Content("2".into());
        }
        match slot(req) {
            1 => Reply::Content("alpha answer".into()),
            2 => Reply::Content("beta answer here".into()),
            _ => Reply::Content("gamma".into()),
        }
    })
    .await;
    let vote = "n = 3\ntemperatures = [0.1, 0.2, 0.3]\nstrategy = \"best_of\"\njudge = \"smart\"\nrubric = \"Prefer the most precise answer.\"";
    let gw = start_gateway(&config(&up.url, &router("vote", vote))).await;
    let (status, h, body) = post_chat(&gw, ask("explain greek letters")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content(&body), "beta answer here");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=best_of winner=1 agree=1 valid=3 of=3 judge=ok cancelled=0"
    );

    let reqs = up.state.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 4);
    let judge = reqs
        .iter()
        .find(|r| r["model"] == "smart-upstream")
        .unwrap();
    assert_eq!(judge["temperature"], 0.0);
    assert!(judge["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("Prefer the most precise answer."));
    let prompt = judge["messages"][1]["content"].as_str().unwrap();
    assert!(prompt.contains("explain greek letters"), "{prompt}");
    // Candidates are numbered by call index.
    for (i, c) in ["alpha answer", "beta answer here", "gamma"]
        .iter()
        .enumerate()
    {
        assert!(
            prompt.contains(&format!("Candidate {}:\n<<<\n{c}\n>>>", i + 1)),
            "{prompt}"
        );
    }

    // usage is the sum over the three candidates and the judge; spend likewise.
    let mut want = (0, 0);
    let mut cost = 0;
    for r in &reqs {
        let reply = if r["model"] == "smart-upstream" {
            "2"
        } else {
            ["", "alpha answer", "beta answer here", "gamma"][slot(r) as usize]
        };
        let (p, c) = mock_usage(r, reply);
        want.0 += p;
        want.1 += c;
        cost += if r["model"] == "smart-upstream" {
            p * 10_000 + c * 20_000
        } else {
            fast_cost(p, c)
        };
    }
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            v["usage"]["prompt_tokens"].as_u64().unwrap(),
            v["usage"]["completion_tokens"].as_u64().unwrap()
        ),
        want
    );
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        want.0 + want.1
    );
    assert_eq!(spent(&gw, "app"), cost);
    gw.shutdown().await;
}

#[tokio::test]
async fn usage_is_summed_over_every_vote_call() {
    // Three different answers: nothing is decided early, all three complete.
    let replies = ["one", "two words", "three words here"];
    let up =
        MockUpstream::start(move |req, _| Reply::Content(replies[slot(req) as usize - 1].into()))
            .await;
    let gw = start_gateway(&config(
        &up.url,
        &router("vote", "n = 3\ntemperatures = [0.1, 0.2, 0.3]"),
    ))
    .await;
    let (status, h, body) = post_chat(&gw, ask("say some words please")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=majority agree=1 of=3 cancelled=0"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    // 4 words + 1 per call; 1 + 2 + 3 completion tokens.
    assert_eq!(v["usage"]["prompt_tokens"], 15);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 21);
    assert_eq!(spent(&gw, "app"), fast_cost(15, 6));
    gw.shutdown().await;
}

#[tokio::test]
async fn too_few_valid_answers_is_a_502_envelope() {
    let up = MockUpstream::start(|req, _| match slot(req) {
        1 => Reply::Content("the answer is 42".into()),
        // Not extractable by the regex: invalid, like a failed call.
        2 => Reply::Content("no idea".into()),
        _ => Reply::Status(400, json!({"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}})),
    })
    .await;
    let vote =
        "n = 3\ntemperatures = [0.1, 0.2, 0.3]\ncompare = { regex = '(\\d+)' }\nmin_valid = 2";
    let gw = start_gateway(&config(&up.url, &router("vote", vote))).await;
    let (status, h, body) = post_chat(&gw, ask("what is 6*7?")).await;
    assert_eq!(status, 502, "{body}");
    assert!(h.get("x-triage-vote").is_none());
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert_eq!(v["error"]["code"], "upstream_error");
    assert_eq!(
        v["error"]["message"],
        "Vote failed: only 1 valid answers, 2 needed."
    );
    assert_eq!(up.calls(), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn single_call_fallback_when_too_few_valid_answers() {
    let up = MockUpstream::start(|req, _| match slot(req) {
        // The fallback is a plain call: no vote temperature.
        0 => Reply::Content("plainly 42".into()),
        1 => Reply::Content("the answer is 42".into()),
        2 => Reply::Content("no idea".into()),
        _ => Reply::Status(400, json!({"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}})),
    })
    .await;
    let vote = "n = 3\ntemperatures = [0.1, 0.2, 0.3]\ncompare = { regex = '(\\d+)' }\nmin_valid = 2\non_insufficient = \"single_call\"";
    let gw = start_gateway(&config(&up.url, &router("vote", vote))).await;
    let (status, h, body) = post_chat(&gw, ask("what is 6*7?")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=majority valid=1 of=3 fallback=single_call"
    );
    assert_eq!(content(&body), "plainly 42");
    assert_eq!(up.calls(), 4);
    let fallback = up.last_request();
    assert!(fallback.get("temperature").is_none(), "{fallback}");
    // Billed: the two answered candidates and the fallback (4 prompt tokens each).
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 12);
    assert_eq!(v["usage"]["completion_tokens"], 4 + 2 + 2);
    assert_eq!(spent(&gw, "app"), fast_cost(12, 8));
    gw.shutdown().await;
}

#[tokio::test]
async fn streamed_vote_is_decided_then_replayed_as_sse() {
    let up = MockUpstream::start(|req, _| match slot(req) {
        3 => Reply::Content("The capital of France is Lyon.".into()),
        _ => Reply::Content("The capital of France is Paris, on the Seine.".into()),
    })
    .await;
    let gw = start_gateway(&config(
        &up.url,
        &router("vote", "n = 3\ntemperatures = [0.1, 0.2, 0.3]"),
    ))
    .await;
    let client = openai(&gw);
    let req = CreateChatCompletionRequestArgs::default()
        .model("v")
        .stream(true)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("capital of France?")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let mut s = client.chat().create_stream(req).await.unwrap();
    let mut text = String::new();
    let mut finish = None;
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        assert!(c.usage.is_none(), "usage chunk only when asked for");
        if let Some(ch) = c.choices.first() {
            text.push_str(ch.delta.content.as_deref().unwrap_or(""));
            if ch.finish_reason.is_some() {
                finish = ch.finish_reason;
            }
        }
    }
    assert_eq!(text, "The capital of France is Paris, on the Seine.");
    assert!(finish.is_some());
    // The candidates themselves were plain (non-streamed) calls.
    for r in up.state.requests.lock().unwrap().iter() {
        assert!(
            r.get("stream").is_none() && r.get("stream_options").is_none(),
            "{r}"
        );
    }

    // Raw: the header is there and usage comes as the last chunk when asked for.
    let (status, h, body) = post_chat(&gw, json!({"model": "v", "messages": user("capital of France?"), "stream": true, "stream_options": {"include_usage": true}})).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], "text/event-stream");
    assert!(
        hdr(&h, "x-triage-vote").starts_with("strategy=majority agree="),
        "{h:?}"
    );
    assert_eq!(
        sse_content(&body),
        "The capital of France is Paris, on the Seine."
    );
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(
        usage["usage"]["completion_tokens"].as_u64().unwrap() >= 16,
        "{usage}"
    );
    gw.shutdown().await;
}

// ---- Quorum early exit, with a mock that notices dropped requests -------

#[derive(Default)]
struct Observed {
    calls: AtomicUsize,
    completed: AtomicUsize,
    dropped: AtomicUsize,
}

/// Counts a request handler that was dropped (client went away) before it answered.
struct Watch(Arc<Observed>, bool);

impl Drop for Watch {
    fn drop(&mut self) {
        let c = if self.1 {
            &self.0.completed
        } else {
            &self.0.dropped
        };
        c.fetch_add(1, Ordering::SeqCst);
    }
}

/// Candidates at temperature >= 0.4 take 3 s; the others answer "42" at once.
/// Every answer reports 1000 prompt and 500 completion tokens.
async fn quorum_handler(
    State(st): State<Arc<Observed>>,
    axum::Json(v): axum::Json<Value>,
) -> Response {
    st.calls.fetch_add(1, Ordering::SeqCst);
    let mut w = Watch(st.clone(), false);
    if slot(&v) >= 4 {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    w.1 = true;
    axum::Json(json!({
        "id": "chatcmpl-q", "object": "chat.completion", "created": 1, "model": v["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500},
    }))
    .into_response()
}

#[tokio::test]
async fn quorum_exits_early_and_cancels_the_stragglers_uncharged() {
    let st = Arc::new(Observed::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(quorum_handler))
        .with_state(st.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });

    let gw = start_gateway(&config(
        &url,
        &router("vote", "n = 5\ntemperatures = [0.1, 0.2, 0.3, 0.4, 0.5]"),
    ))
    .await;
    let (status, h, body) = post_chat(&gw, ask("what is 6*7?")).await;
    assert_eq!(status, 200, "{body}");
    // Answered without waiting for the slow two.
    assert_eq!(st.completed.load(Ordering::SeqCst), 3);
    assert_eq!(
        hdr(&h, "x-triage-vote"),
        "strategy=majority agree=3 of=5 cancelled=2"
    );
    assert_eq!(content(&body), "42");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 3000);
    assert_eq!(v["usage"]["completion_tokens"], 1500);
    // The upstream saw both slow requests go away.
    assert!(
        eventually(|| st.dropped.load(Ordering::SeqCst) == 2).await,
        "dropped = {}",
        st.dropped.load(Ordering::SeqCst)
    );
    assert_eq!(st.calls.load(Ordering::SeqCst), 5);
    assert_eq!(st.completed.load(Ordering::SeqCst), 3);
    // Only the three completed calls are charged: 3 x (1000 x $1 + 500 x $2) / 1M.
    assert_eq!(spent(&gw, "app"), 3 * fast_cost(1000, 500));
    assert_eq!(key_limits(&gw, "app").key.reserved_nanos, 0);
    gw.shutdown().await;
}

// ---- Cascades ------------------------------------------------------------

fn completion_json(content: &str, finish: &str) -> String {
    json!({
        "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "fast-upstream",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    })
    .to_string()
}

/// Small answers `bad`, large answers `good`: the cascade must escalate and name `gate`.
async fn escalates(gates: &str, extra_body: Value, bad: Reply, good: &str, gate: &str) {
    let good_s = good.to_string();
    let bad_c = bad.clone();
    let up = MockUpstream::start(move |req, _| match req["model"].as_str() {
        Some("smart-upstream") => Reply::Content(good_s.clone()),
        _ => bad_c.clone(),
    })
    .await;
    let cascade = format!("tiers = [\"small\", \"large\"]\ngates = {{ {gates} }}");
    let gw = start_gateway(&config(&up.url, &router("cascade", &cascade))).await;
    let mut body = ask("give me the answer");
    for (k, v) in extra_body.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, h, resp) = post_chat(&gw, body.clone()).await;
    assert_eq!(status, 200, "{gate}: {resp}");
    assert_eq!(
        hdr(&h, "x-triage-cascade"),
        format!("tried=small,large passed=large gate_failed={gate}")
    );
    assert_eq!(content(&resp), good, "{gate}");
    let route = hdr(&h, "x-triage-route");
    assert!(
        route.contains("tier=large") && route.contains("model=smart"),
        "{gate}: {route}"
    );
    assert_eq!(
        (
            up.calls_for("fast-upstream"),
            up.calls_for("smart-upstream")
        ),
        (1, 1),
        "{gate}"
    );
    // The client's response_format reached both tiers.
    if let Some(rf) = body.get("response_format") {
        for r in up.state.requests.lock().unwrap().iter() {
            assert_eq!(&r["response_format"], rf);
        }
    }
    // Usage covers both tiers' calls.
    let reqs = up.state.requests.lock().unwrap().clone();
    let small = match &bad {
        Reply::Content(t) => mock_usage(&reqs[0], t),
        _ => (5, 7),
    };
    let large = mock_usage(&reqs[1], good);
    let v: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        small.0 + large.0,
        "{v}"
    );
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        small.1 + large.1,
        "{v}"
    );
    // smart: $10 / $20 per million tokens.
    assert_eq!(
        spent(&gw, "app"),
        fast_cost(small.0, small.1) + large.0 * 10_000 + large.1 * 20_000
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn cascade_escalates_on_empty_content() {
    escalates(
        "non_empty = true",
        json!({}),
        Reply::Content(String::new()),
        "Here you go.",
        "non_empty",
    )
    .await;
}

#[tokio::test]
async fn cascade_escalates_on_finish_reason_length() {
    let cut = Reply::Raw(
        200,
        "application/json",
        completion_json("The answer is a long story that", "length"),
    );
    escalates(
        "no_length_finish = true",
        json!({}),
        cut,
        "Short answer.",
        "finish_length",
    )
    .await;
}

#[tokio::test]
async fn cascade_escalates_on_invalid_json_for_json_object() {
    escalates(
        "json = \"auto\"",
        json!({"response_format": {"type": "json_object"}}),
        Reply::Content("{\"answer\": 42,".into()),
        "{\"answer\": 42}",
        "json",
    )
    .await;
}

#[tokio::test]
async fn cascade_escalates_on_json_schema_violation() {
    let rf = json!({"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    }}});
    // Valid JSON, wrong type for `age` and `tags` missing.
    escalates(
        "",
        json!({"response_format": rf}),
        Reply::Content(r#"{"name": "Ada", "age": "thirty-six"}"#.into()),
        r#"{"name": "Ada", "age": 36, "tags": ["math"]}"#,
        "json_schema",
    )
    .await;
}

#[tokio::test]
async fn cascade_escalates_on_refusal_phrase() {
    escalates(
        "refusal_phrases = [\"I can't help with\"]",
        json!({}),
        Reply::Content("I'm sorry, but I CAN'T   help with that request.".into()),
        "Sure, here it is.",
        "refusal",
    )
    .await;
}

#[tokio::test]
async fn cascade_escalates_when_must_match_fails() {
    escalates(
        "must_match = '^\\d+$'",
        json!({}),
        Reply::Content("about 42".into()),
        "42",
        "regex",
    )
    .await;
}

#[tokio::test]
async fn cascade_stops_at_the_small_tier_when_it_passes() {
    let up = MockUpstream::start(|req, _| match req["model"].as_str() {
        Some("smart-upstream") => Reply::Content("large answer".into()),
        _ => Reply::Content("{\"name\": \"Ada\", \"age\": 36}".into()),
    })
    .await;
    let cascade = "tiers = [\"small\", \"large\"]\ngates = { refusal_phrases = [\"as an AI\"], must_match = 'Ada' }";
    let gw = start_gateway(&config(&up.url, &router("cascade", cascade))).await;
    let rf = json!({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"]}}});
    let (status, h, body) = post_chat(
        &gw,
        json!({"model": "v", "messages": user("who?"), "response_format": rf}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(hdr(&h, "x-triage-cascade"), "tried=small passed=small");
    assert_eq!(content(&body), "{\"name\": \"Ada\", \"age\": 36}");
    assert!(hdr(&h, "x-triage-route").contains("tier=small"), "{h:?}");
    assert_eq!(up.calls_for("fast-upstream"), 1);
    assert_eq!(up.calls_for("smart-upstream"), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn cascade_per_rule_and_no_tier_passing() {
    // The cascade sits on a rule; when no tier passes, the last answer is returned, flagged.
    let up = MockUpstream::start(|req, _| match req["model"].as_str() {
        Some("smart-upstream") => Reply::Content("still words".into()),
        _ => Reply::Content("words".into()),
    })
    .await;
    let extra = r#"
[routers.r]
classifier = "rules"
keywords = { calc = ["\\d"], chat = ["."] }
unknown_tier = "large"
[[routers.r.rules]]
when = { label = "calc" }
tier = "small"
cascade = { tiers = ["small", "large"], gates = { must_match = '^\d+$' } }
[[routers.r.rules]]
tier = "small"
"#;
    let gw = start_gateway(&config(&up.url, extra)).await;
    let (status, h, body) =
        post_chat(&gw, json!({"model": "r", "messages": user("what is 6*7")})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hdr(&h, "x-triage-cascade"),
        "tried=small,large passed=none gate_failed=regex,regex"
    );
    assert_eq!(content(&body), "still words");
    // The other rule has no cascade: one plain call.
    let (status, h, body) =
        post_chat(&gw, json!({"model": "r", "messages": user("hello there")})).await;
    assert_eq!(status, 200, "{body}");
    assert!(h.get("x-triage-cascade").is_none());
    assert_eq!(content(&body), "words");
    assert_eq!(
        (
            up.calls_for("fast-upstream"),
            up.calls_for("smart-upstream")
        ),
        (2, 1)
    );
    gw.shutdown().await;
}
