//! The response cache end to end: hits and misses through HTTP, key
//! sensitivity, scopes, single-flight, stream replay, TTLs, eviction, and
//! that a hit is never charged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_openai::types::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use triage::server::Gateway;

/// A `[cache]` table with a generous size; `more` goes inside the table.
fn cache_toml(more: &str) -> String {
    format!("[cache]\nenabled = true\nmax_bytes = 1000000\nttl = \"5m\"\n{more}\n")
}

/// POST a raw body string with extra headers.
async fn post_raw(
    gw: &Gateway,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.text().await.unwrap())
}

async fn post_with(
    gw: &Gateway,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    post_raw(gw, KEY, &body.to_string(), headers).await
}

/// The `x-triage-cache` header ("" when absent).
fn cache_hdr(h: &reqwest::header::HeaderMap) -> String {
    h.get("x-triage-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn content(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {body}"))
        .to_string()
}

fn usage(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap();
    v["usage"].clone()
}

fn cache_of(gw: &Gateway) -> triage::cache::ResponseCache {
    let c = gw.state.cache.load_full();
    c.as_ref().clone().expect("cache is enabled in this config")
}

/// Waits (bounded) until the cache has stored `n` entries (stream fills are async).
async fn wait_inserts(gw: &Gateway, n: u64) {
    let c = cache_of(gw);
    assert!(
        eventually(|| c.stats().inserts >= n).await,
        "cache never stored {n} entries: {:?}",
        c.stats()
    );
}

/// Asserts one request's status and cache header, returns its body.
async fn expect(gw: &Gateway, body: &Value, headers: &[(&str, &str)], want: &str) -> String {
    let (status, h, text) = post_with(gw, body, headers).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(cache_hdr(&h), want, "request {body} headers {headers:?}");
    text
}

#[tokio::test]
async fn hit_after_miss_calls_upstream_once() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let body = json!({"model": "fast", "messages": user("what is two plus two"), "temperature": 0});
    let first = expect(&gw, &body, &[], "miss").await;
    let second = expect(&gw, &body, &[], "hit").await;
    assert_eq!(up.calls(), 1);
    assert_eq!(content(&first), "echo: what is two plus two");
    assert_eq!(content(&second), content(&first));
    // The hit shows the original call's usage.
    assert_eq!(usage(&second), usage(&first));
    assert_eq!(usage(&second)["completion_tokens"], 6);
    gw.shutdown().await;
}

#[tokio::test]
async fn key_changes_with_every_generation_parameter() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let base = json!({"model": "fast", "messages": user("question"), "temperature": 0.2});
    expect(&gw, &base, &[], "miss").await;
    expect(&gw, &base, &[], "hit").await;
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let variants = [
        with("temperature", json!(0.3)),
        with("top_p", json!(0.9)),
        with("max_tokens", json!(20)),
        with(
            "tools",
            json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]),
        ),
        with("response_format", json!({"type": "json_object"})),
        with("seed", json!(7)),
        with("stop", json!(["END"])),
        with("messages", user("another question")),
        with(
            "messages",
            json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "question"}]),
        ),
        with("model", json!("fast2")),
    ];
    for (i, v) in variants.iter().enumerate() {
        expect(&gw, v, &[], "miss").await;
        assert_eq!(up.calls(), 2 + i, "variant {v} must call upstream");
    }
    // Each variant was stored under its own key.
    for v in &variants {
        expect(&gw, v, &[], "hit").await;
    }
    expect(&gw, &base, &[], "hit").await;
    assert_eq!(up.calls(), 1 + variants.len());
    gw.shutdown().await;
}

#[tokio::test]
async fn key_ignores_field_order_stream_and_user() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let a = r#"{"model":"fast","temperature":0.2,"messages":[{"role":"user","content":"order matters not"}],"response_format":{"type":"text","x":1}}"#;
    let b = r#"{"response_format":{"x":1,"type":"text"},"messages":[{"content":"order matters not","role":"user"}],"temperature":0.2,"model":"fast"}"#;
    let (s, h, first) = post_raw(&gw, KEY, a, &[]).await;
    assert_eq!((s, cache_hdr(&h).as_str()), (200, "miss"));
    let (s, h, second) = post_raw(&gw, KEY, b, &[]).await;
    assert_eq!(
        (s, cache_hdr(&h).as_str()),
        (200, "hit"),
        "field order must not change the key"
    );
    assert_eq!(content(&second), content(&first));

    let mut v: Value = serde_json::from_str(a).unwrap();
    v["user"] = json!("bob");
    expect(&gw, &v, &[], "hit").await;
    v["stream"] = json!(false);
    expect(&gw, &v, &[], "hit").await;
    v["stream"] = json!(true);
    let sse = expect(&gw, &v, &[], "hit").await;
    assert_eq!(sse_content(&sse), "echo: order matters not");
    assert_eq!(up.calls(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn per_key_scope_isolates_keys() {
    let up = MockUpstream::echo().await;
    let extra = format!(
        "[keys.other]\nkey_sha256 = \"{}\"\n{}",
        sha(KEY2),
        cache_toml("scope = \"per_key\"")
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let body = json!({"model": "fast", "messages": user("private question")});
    let (_, h, _) = post_chat_as(&gw, KEY, body.clone()).await;
    assert_eq!(cache_hdr(&h), "miss");
    let (_, h, _) = post_chat_as(&gw, KEY2, body.clone()).await;
    assert_eq!(
        cache_hdr(&h),
        "miss",
        "another key must not see this key's answers"
    );
    assert_eq!(up.calls(), 2);
    let (_, h, _) = post_chat_as(&gw, KEY, body.clone()).await;
    assert_eq!(cache_hdr(&h), "hit");
    let (_, h, _) = post_chat_as(&gw, KEY2, body.clone()).await;
    assert_eq!(cache_hdr(&h), "hit");
    assert_eq!(up.calls(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn shared_scope_shares_between_keys() {
    let up = MockUpstream::echo().await;
    let extra = format!(
        "[keys.other]\nkey_sha256 = \"{}\"\n{}",
        sha(KEY2),
        cache_toml("scope = \"shared\"")
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let body = json!({"model": "fast", "messages": user("common question")});
    let (_, h, first) = post_chat_as(&gw, KEY, body.clone()).await;
    assert_eq!(cache_hdr(&h), "miss");
    let (_, h, second) = post_chat_as(&gw, KEY2, body.clone()).await;
    assert_eq!(cache_hdr(&h), "hit");
    assert_eq!(content(&second), content(&first));
    assert_eq!(up.calls(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn concurrent_identical_requests_make_one_upstream_call() {
    let up =
        MockUpstream::start(|_, _| Reply::Delay(Duration::from_millis(400), Box::new(Reply::Echo)))
            .await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let body = json!({"model": "fast", "messages": user("all at once")});
    let results = futures::future::join_all((0..50).map(|_| post_chat(&gw, body.clone()))).await;
    assert_eq!(
        up.calls(),
        1,
        "single-flight must coalesce identical misses"
    );
    let mut misses = 0;
    for (status, h, text) in &results {
        assert_eq!(*status, 200, "{text}");
        assert_eq!(content(text), "echo: all at once");
        assert_eq!(usage(text)["completion_tokens"], 4);
        match cache_hdr(h).as_str() {
            "miss" => misses += 1,
            "hit" => {}
            other => panic!("unexpected x-triage-cache {other:?}"),
        }
    }
    assert_eq!(misses, 1);
    gw.shutdown().await;
}

/// Content deltas of a stream read with async-openai, one entry per chunk.
async fn sdk_stream(gw: &Gateway, text: &str) -> (Vec<String>, usize) {
    let req = CreateChatCompletionRequestArgs::default()
        .model("fast")
        .stream(true)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let mut s = openai(gw).chat().create_stream(req).await.unwrap();
    let mut deltas = Vec::new();
    let mut chunks = 0;
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        chunks += 1;
        assert!(
            c.usage.is_none(),
            "usage chunk must be dropped when not asked for"
        );
        if let Some(t) = c.choices.first().and_then(|ch| ch.delta.content.clone()) {
            deltas.push(t);
        }
    }
    (deltas, chunks)
}

#[tokio::test]
async fn streamed_hit_replays_the_original_chunks() {
    let answer = "one two three four five six seven eight";
    let up = MockUpstream::start(move |_, _| Reply::Content(answer.to_string())).await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let (live, live_chunks) = sdk_stream(&gw, "count for me").await;
    assert_eq!(live.concat(), answer);
    wait_inserts(&gw, 1).await;
    let (replayed, replay_chunks) = sdk_stream(&gw, "count for me").await;
    assert_eq!(up.calls(), 1, "the second stream must come from the cache");
    assert_eq!(replayed.concat(), answer);
    assert_eq!(replayed, live, "the original chunks, in order");
    assert_eq!(replay_chunks, live_chunks);
    assert!(replay_chunks >= 8, "several chunks, got {replay_chunks}");
    // Over raw HTTP the replay is marked and ends with [DONE].
    let (status, h, body) = post_chat(
        &gw,
        json!({"model": "fast", "messages": user("count for me"), "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(cache_hdr(&h), "hit");
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
    assert_eq!(sse_content(&body), answer);
    assert_eq!(up.calls(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn streamed_miss_serves_a_later_non_streamed_hit() {
    let answer = "alpha beta gamma delta";
    let up = MockUpstream::start(move |_, _| Reply::Content(answer.to_string())).await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let mut body =
        json!({"model": "fast", "messages": user("greek letters please"), "stream": true});
    let live = expect(&gw, &body, &[], "miss").await;
    assert_eq!(sse_content(&live), answer);
    wait_inserts(&gw, 1).await;
    body["stream"] = json!(false);
    let hit = expect(&gw, &body, &[], "hit").await;
    assert_eq!(content(&hit), answer);
    // Usage of the original (streamed) call: 3 words + 1, and 4 words.
    assert_eq!(usage(&hit)["prompt_tokens"], 4);
    assert_eq!(usage(&hit)["completion_tokens"], 4);
    let v: Value = serde_json::from_str(&hit).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(up.calls(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn non_streamed_miss_serves_a_later_streamed_hit() {
    let answer = "the quick brown fox jumps over the lazy dog again and again and again";
    let up = MockUpstream::start(move |_, _| Reply::Content(answer.to_string())).await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let mut body = json!({"model": "fast", "messages": user("tell me about the fox")});
    let first = expect(&gw, &body, &[], "miss").await;
    assert_eq!(content(&first), answer);
    body["stream"] = json!(true);
    let sse = expect(&gw, &body, &[], "hit").await;
    assert_eq!(sse_content(&sse), answer);
    let data = sse_data(&sse);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let content_chunks = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert!(
        content_chunks >= 3,
        "replayed in several chunks, got {content_chunks}"
    );
    // Asking for usage on the replay gets the original call's usage.
    body["stream_options"] = json!({"include_usage": true});
    let sse = expect(&gw, &body, &[], "hit").await;
    let data = sse_data(&sse);
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], usage(&first));
    assert_eq!(up.calls(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn ttls_from_request_header_and_model_override_expire() {
    let up = MockUpstream::echo().await;
    let extra = cache_toml("[cache.models.smart]\nttl = \"1s\"");
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let short = json!({"model": "fast", "messages": user("short lived")});
    let long = json!({"model": "fast", "messages": user("long lived")});
    let smart = json!({"model": "smart", "messages": user("model ttl")});
    expect(&gw, &short, &[("x-triage-cache-ttl", "1")], "miss").await;
    expect(&gw, &long, &[], "miss").await;
    expect(&gw, &smart, &[], "miss").await;
    assert_eq!(up.calls(), 3);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    expect(&gw, &short, &[], "miss").await;
    expect(&gw, &smart, &[], "miss").await;
    // The global TTL (5m) still holds for the other entry.
    expect(&gw, &long, &[], "hit").await;
    assert_eq!(up.calls(), 5);
    // A zero per-request TTL means "do not cache".
    let zero = json!({"model": "fast", "messages": user("never kept")});
    let (_, h, _) = post_with(&gw, &zero, &[("x-triage-cache-ttl", "0")]).await;
    assert_ne!(cache_hdr(&h), "hit");
    expect(&gw, &zero, &[], "miss").await;
    assert_eq!(up.calls(), 7);
    gw.shutdown().await;
}

#[tokio::test]
async fn model_and_router_overrides_switch_caching_off() {
    let up = MockUpstream::echo().await;
    let extra = format!(
        "[routers.nocache]\nclassifier = \"rules\"\nunknown_tier = \"small\"\n[routers.nocache.cache]\nenabled = false\n\
         [[routers.nocache.rules]]\ntier = \"small\"\n\
         [routers.cached]\nclassifier = \"rules\"\nunknown_tier = \"small\"\n[[routers.cached.rules]]\ntier = \"small\"\n{}",
        cache_toml("[cache.models.fast2]\nenabled = false")
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    for model in ["fast2", "nocache"] {
        let body = json!({"model": model, "messages": user("override me")});
        let before = up.calls();
        for _ in 0..2 {
            let (s, h, _) = post_chat(&gw, body.clone()).await;
            assert_eq!(s, 200);
            assert_ne!(cache_hdr(&h), "hit", "{model} has caching off");
        }
        assert_eq!(
            up.calls(),
            before + 2,
            "{model} must call upstream every time"
        );
    }
    let body = json!({"model": "cached", "messages": user("override me")});
    expect(&gw, &body, &[], "miss").await;
    expect(&gw, &body, &[], "hit").await;
    gw.shutdown().await;
}

fn cache_stats(gw: &Gateway) -> triage::cache::CacheStats {
    cache_of(gw).stats()
}

#[tokio::test]
async fn byte_bound_evicts_when_answers_do_not_fit() {
    const N: usize = 40;
    const MAX: u64 = 6000;
    let up = MockUpstream::echo().await;
    let body = |i: usize| json!({"model": "fast", "messages": user(&format!("item number {i}"))});

    // Control: a big cache keeps all of them.
    let big = start_gateway(&config(&up.url, &cache_toml(""))).await;
    for i in 0..N {
        expect(&big, &body(i), &[], "miss").await;
    }
    for i in 0..N {
        expect(&big, &body(i), &[], "hit").await;
    }
    big.shutdown().await;

    let calls0 = up.calls();
    let gw = start_gateway(&config(
        &up.url,
        &format!("[cache]\nenabled = true\nmax_bytes = {MAX}\nttl = \"5m\"\n"),
    ))
    .await;
    for i in 0..N {
        expect(&gw, &body(i), &[], "miss").await;
    }
    let cache = cache_of(&gw);
    cache.run_pending_tasks().await;
    let s = cache_stats(&gw);
    assert_eq!(
        s.too_large, 0,
        "entries must be small enough to be stored: {s:?}"
    );
    assert_eq!(s.inserts, N as u64);
    assert!(
        s.bytes <= MAX,
        "weighted size {} over the bound {MAX}",
        s.bytes
    );
    assert!(
        s.entries < N as u64,
        "all {N} entries stayed in {MAX} bytes: {s:?}"
    );
    // Side-effect-free look at which answers stayed.
    let present = {
        let mut n = 0;
        for i in 0..N {
            let b = body(i);
            let key = triage::cache::cache_key("app", "fast", b.as_object().unwrap());
            if cache.peek(&key).await.is_some() {
                n += 1;
            }
        }
        n
    };
    assert!(
        present > 0 && present < N,
        "{present} of {N} answers present"
    );
    // Through HTTP, some earlier answers are gone and cost an upstream call again.
    let mut misses = 0;
    for i in 0..N {
        let (s, h, _) = post_chat(&gw, body(i)).await;
        assert_eq!(s, 200);
        if cache_hdr(&h) == "miss" {
            misses += 1;
        }
    }
    assert!(misses > 0, "every answer survived a cache {MAX} bytes big");
    assert_eq!(up.calls(), calls0 + N + misses);
    gw.shutdown().await;
}

#[tokio::test]
async fn errors_are_never_cached() {
    let up = MockUpstream::start(|req, n| {
        let q = req["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        match (q.as_str(), n) {
            ("server error first", 0) => Reply::Status(500, json!({"error": {"message": "boom"}})),
            ("client error first", 2) => Reply::Status(
                400,
                json!({"error": {"message": "bad", "type": "invalid_request_error"}}),
            ),
            _ => Reply::Echo,
        }
    })
    .await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let body = json!({"model": "fast", "messages": user("server error first")});
    let (s, _, _) = post_chat(&gw, body.clone()).await;
    assert_eq!(s, 502);
    let ok = expect(&gw, &body, &[], "miss").await;
    assert_eq!(content(&ok), "echo: server error first");
    assert_eq!(up.calls(), 2, "the 5xx must not have been stored");
    expect(&gw, &body, &[], "hit").await;

    let body = json!({"model": "fast", "messages": user("client error first")});
    let (s, _, _) = post_chat(&gw, body.clone()).await;
    assert_eq!(s, 400);
    expect(&gw, &body, &[], "miss").await;
    assert_eq!(up.calls(), 4, "the 4xx must not have been stored");
    expect(&gw, &body, &[], "hit").await;
    assert_eq!(up.calls(), 4);
    gw.shutdown().await;
}

#[tokio::test]
async fn no_store_bypasses_and_no_cache_refreshes() {
    let up = MockUpstream::start(|_, n| Reply::Content(format!("answer {n}"))).await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let body = json!({"model": "fast", "messages": user("cache control")});
    assert_eq!(content(&expect(&gw, &body, &[], "miss").await), "answer 0");
    // no-store: neither read nor written.
    let b = expect(&gw, &body, &[("cache-control", "no-store")], "bypass").await;
    assert_eq!(content(&b), "answer 1");
    assert_eq!(content(&expect(&gw, &body, &[], "hit").await), "answer 0");
    let fresh = json!({"model": "fast", "messages": user("never stored")});
    expect(&gw, &fresh, &[("cache-control", "no-store")], "bypass").await;
    expect(&gw, &fresh, &[], "miss").await;
    assert_eq!(up.calls(), 4);
    // no-cache: skip the lookup, fetch, and store the fresh answer.
    let r = expect(&gw, &body, &[("cache-control", "no-cache")], "miss").await;
    assert_eq!(content(&r), "answer 4");
    assert_eq!(up.calls(), 5);
    assert_eq!(content(&expect(&gw, &body, &[], "hit").await), "answer 4");
    assert_eq!(up.calls(), 5);
    gw.shutdown().await;
}

#[tokio::test]
async fn sampled_n_is_not_cached_unless_allowed() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &cache_toml(""))).await;
    let sampled =
        json!({"model": "fast", "messages": user("give me options"), "n": 2, "temperature": 0.7});
    expect(&gw, &sampled, &[], "bypass").await;
    expect(&gw, &sampled, &[], "bypass").await;
    assert_eq!(up.calls(), 2);
    // n defaults temperature to 1: still sampled.
    let default_temp = json!({"model": "fast", "messages": user("give me options"), "n": 3});
    expect(&gw, &default_temp, &[], "bypass").await;
    assert_eq!(up.calls(), 3);
    // Greedy decoding gives n identical answers: cacheable.
    let greedy =
        json!({"model": "fast", "messages": user("give me options"), "n": 2, "temperature": 0});
    expect(&gw, &greedy, &[], "miss").await;
    expect(&gw, &greedy, &[], "hit").await;
    assert_eq!(up.calls(), 4);
    gw.shutdown().await;

    let gw = start_gateway(&config(&up.url, &cache_toml("cache_sampled = true"))).await;
    expect(&gw, &sampled, &[], "miss").await;
    expect(&gw, &sampled, &[], "hit").await;
    assert_eq!(up.calls(), 5);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_hit_charges_nothing() {
    let up = MockUpstream::echo().await;
    // The first lines of `extra` still belong to `[keys.app]`.
    let extra = format!("budget = 10.0\n{}", cache_toml(""));
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let spent = || spent(&gw, "app");
    assert_eq!(spent(), 0);
    let body = json!({"model": "fast", "messages": user("how much does this cost")});
    let first = expect(&gw, &body, &[], "miss").await;
    // fast: $1 in / $2 out per Mtok = 1000 / 2000 nanos per token; 5+1 prompt, 6 completion.
    assert_eq!(spent(), 6 * 1000 + 6 * 2000);
    let after_miss = spent();
    for _ in 0..3 {
        let hit = expect(&gw, &body, &[], "hit").await;
        assert_eq!(
            usage(&hit),
            usage(&first),
            "a hit still shows the original usage"
        );
    }
    assert_eq!(spent(), after_miss, "hits must not be charged");
    let st = key_limits(&gw, "app");
    assert_eq!(st.key.reserved_nanos, 0);
    assert_eq!(up.calls(), 1);
    // The key's own view agrees.
    let r = http()
        .get(format!("{}/triage/keys/self", gw.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["limits"]["key"]["spent_nanos"], after_miss);
    gw.shutdown().await;
}
