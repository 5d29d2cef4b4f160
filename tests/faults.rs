//! Issue 10 (reliability): every fault the gateway must survive, each against
//! a scripted upstream (the shared axum mock, or a tiny raw TCP server for
//! broken HTTP), plus client misbehaviour, graceful drain and hot reload on
//! the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn chat(model: &str, text: &str, stream: bool) -> Value {
    json!({"model": model, "messages": user(text), "stream": stream})
}

fn route(h: &reqwest::header::HeaderMap) -> String {
    h.get("x-triage-route")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Waits for `fut` at most `secs`; a hang is a test failure, not a stuck CI job.
async fn bounded<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {secs}s"),
    }
}

/// Polls `f` until true or `secs` pass.
async fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// The last SSE payload, parsed (the error event of a broken stream).
fn last_event(body: &str) -> Value {
    let data = sse_data(body);
    serde_json::from_str(data.last().expect("no SSE events")).unwrap_or(Value::Null)
}

fn assert_error_event_last(body: &str) {
    let data = sse_data(body);
    assert!(
        !data.iter().any(|d| d == "[DONE]"),
        "a broken stream must not claim [DONE]: {body}"
    );
    let ev = last_event(body);
    assert!(
        ev["error"]["message"].is_string(),
        "stream must end with an error event, got: {body}"
    );
    assert_eq!(ev["error"]["type"], "api_error");
    assert!(
        body.ends_with("\n\n"),
        "error event must be a whole SSE event"
    );
}

/// One OpenAI chunk payload with a content delta.
fn delta_payload(content: &str) -> String {
    json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
    .to_string()
}

fn role_payload() -> String {
    json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
    .to_string()
}

fn stop_payload() -> String {
    json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    .to_string()
}

fn ev(payload: &str) -> String {
    format!("data: {payload}\n\n")
}

/// Extra models on the shared mock provider: `NAME` -> upstream `NAME-upstream`.
fn model_toml(name: &str, provider: &str, fallbacks: &[&str]) -> String {
    let fb: Vec<String> = fallbacks.iter().map(|f| format!("{f:?}")).collect();
    format!(
        "[models.{name}]\nprovider = \"{provider}\"\nupstream_model = \"{name}-upstream\"\nprice = {{ input = 1.0, output = 2.0 }}\nmax_output_tokens = 100\nfallbacks = [{}]\n",
        fb.join(", ")
    )
}

fn provider_toml(name: &str, url: &str) -> String {
    format!("[providers.{name}]\nkind = \"openai\"\nbase_url = \"{url}\"\nfirst_byte_timeout = \"500ms\"\ntotal_timeout = \"5s\"\n")
}

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

// --- a raw TCP upstream: writes exactly the bytes we script, then resets ----

#[derive(Clone)]
enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Close cleanly (FIN) instead of the default reset.
    Fin,
}

struct RawUpstream {
    url: String,
    calls: Arc<AtomicUsize>,
}

async fn read_request(sock: &mut TcpStream) -> Option<Value> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < p + 4 + len {
                let n = sock.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return serde_json::from_slice(&buf[p + 4..p + 4 + len]).ok();
        }
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Serves each connection one scripted answer (chosen from the request body),
/// then drops the connection abruptly (RST) unless the script ends with `Fin`.
async fn raw_upstream(plan: impl Fn(&Value) -> Vec<Step> + Send + Sync + 'static) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let plan = Arc::new(plan);
    let c2 = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let plan = plan.clone();
            let calls = c2.clone();
            tokio::spawn(async move {
                let Some(req) = read_request(&mut sock).await else {
                    return;
                };
                calls.fetch_add(1, Ordering::SeqCst);
                for step in plan(&req) {
                    match step {
                        Step::Write(b) => {
                            if sock.write_all(&b).await.is_err() {
                                return;
                            }
                            let _ = sock.flush().await;
                        }
                        Step::Sleep(d) => tokio::time::sleep(d).await,
                        Step::Fin => {
                            let _ = sock.shutdown().await;
                            return;
                        }
                    }
                }
                let _ = sock.set_zero_linger();
                drop(sock);
            });
        }
    });
    RawUpstream {
        url: format!("http://{addr}/v1"),
        calls,
    }
}

fn http_chunk(s: &str) -> Vec<u8> {
    format!("{:x}\r\n{s}\r\n", s.len()).into_bytes()
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

fn w(s: impl Into<Vec<u8>>) -> Step {
    Step::Write(s.into())
}

// ---------------------------------------------------------------------------
// Upstream faults
// ---------------------------------------------------------------------------

#[tokio::test]
async fn refused_connection_falls_back_or_gives_a_502_envelope() {
    let up = MockUpstream::echo().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let extra = format!(
        "{}{}{}",
        provider_toml("dead", &format!("http://127.0.0.1:{dead}/v1")),
        model_toml("dead", "dead", &["fast"]),
        model_toml("dead_alone", "dead", &[]),
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;

    let (s, h, b) = bounded(
        10,
        "fallback",
        post_chat(&gw, chat("dead", "hi there", false)),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["choices"][0]["message"]["content"],
        "echo: hi there"
    );
    assert!(
        route(&h).contains("model=fast") && route(&h).contains("fallback_from=dead"),
        "{}",
        route(&h)
    );

    let (s, _, b) = bounded(
        10,
        "fallback stream",
        post_chat(&gw, chat("dead", "streamed", true)),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(sse_content(&b), "echo: streamed");
    assert_eq!(sse_data(&b).last().map(String::as_str), Some("[DONE]"));

    let (s, _, b) = bounded(
        10,
        "no fallback",
        post_chat(&gw, chat("dead_alone", "hi", false)),
    )
    .await;
    assert_eq!(s, 502, "{b}");
    let e: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(e["error"]["code"], "upstream_unreachable");
    assert_eq!(e["error"]["type"], "api_error");
    assert_eq!(up.calls_for("fast-upstream"), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn connection_reset_before_head_falls_back_and_after_first_byte_does_not() {
    let up = MockUpstream::echo().await;
    let raw = raw_upstream(|req| {
        let model = req["model"].as_str().unwrap_or("");
        match model {
            // Half a status line, then RST.
            "rawhead-upstream" => vec![w("HTTP/1.1 200 OK\r\ncontent-ty")],
            // A whole head promising 500 bytes, 20 of them, then RST.
            "rawbody-upstream" => vec![w("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"id\":\"chatcmpl-1\",")],
            // Two good SSE events (one split mid-chunk-frame), then RST.
            _ => {
                let body = format!("{}{}{}", ev(&role_payload()), ev(&delta_payload("Hel")), ev(&delta_payload("lo wor")));
                let (a, b) = body.split_at(body.len() / 2 + 3);
                vec![w(SSE_HEAD), w(http_chunk(a)), Step::Sleep(Duration::from_millis(20)), w(http_chunk(b)), Step::Sleep(Duration::from_millis(20))]
            }
        }
    })
    .await;
    let extra = format!(
        "{}retries = 2\n{}{}{}",
        provider_toml("raw", &raw.url),
        model_toml("rawhead", "raw", &["fast"]),
        model_toml("rawbody", "raw", &["fast"]),
        model_toml("rawstream", "raw", &["fast"]),
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;

    // Reset before any byte of the response: retried, then the next deployment answers.
    let (s, h, b) = bounded(
        10,
        "reset before head",
        post_chat(&gw, chat("rawhead", "one", false)),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(route(&h).contains("fallback_from=rawhead"));
    assert!(
        raw.calls.load(Ordering::SeqCst) >= 2,
        "retries before the first byte are allowed"
    );
    assert_eq!(up.calls_for("fast-upstream"), 1);

    // Reset inside a JSON body: a clean 502 envelope.
    let before = raw.calls.load(Ordering::SeqCst);
    let (s, _, b) = bounded(
        10,
        "reset mid body",
        post_chat(&gw, chat("rawbody", "two", false)),
    )
    .await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["code"],
        "upstream_invalid_response"
    );
    assert_eq!(
        raw.calls.load(Ordering::SeqCst),
        before + 1,
        "no retry once the body started"
    );
    assert_eq!(
        up.calls_for("fast-upstream"),
        1,
        "no fallback once the body started"
    );

    // Reset mid-stream: the client keeps what it got (once), then an error event; nobody else is called.
    let before = raw.calls.load(Ordering::SeqCst);
    let (s, _, b) = bounded(
        10,
        "reset mid stream",
        post_chat(&gw, chat("rawstream", "three", true)),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(sse_content(&b), "Hello wor");
    assert_error_event_last(&b);
    assert_eq!(raw.calls.load(Ordering::SeqCst), before + 1);
    assert_eq!(up.calls_for("fast-upstream"), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn error_statuses_fall_back_and_pass_through() {
    for code in [500u16, 502, 503, 429] {
        let up = MockUpstream::start(move |req, _| {
            if req["model"] == "flaky-upstream" || req["model"] == "flaky_alone-upstream" {
                Reply::Status(code, json!({"error": {"message": format!("upstream says {code}"), "type": "server_error", "param": null, "code": null}}))
            } else {
                Reply::Echo
            }
        })
        .await;
        let extra = format!(
            "{}{}",
            model_toml("flaky", "up", &["fast"]),
            model_toml("flaky_alone", "up", &[])
        );
        let gw = start_gateway(&config(&up.url, &extra)).await;

        let (s, h, b) = post_chat(&gw, chat("flaky", "hello", false)).await;
        assert_eq!(s, 200, "{code}: {b}");
        assert!(
            route(&h).contains("fallback_from=flaky"),
            "{code}: {}",
            route(&h)
        );
        // Without Retry-After one failure is no cooldown: the next request tries it again.
        let (s, _, b) = post_chat(&gw, chat("flaky", "hello", true)).await;
        assert_eq!(s, 200);
        assert_eq!(sse_content(&b), "echo: hello");
        assert_eq!(up.calls_for("flaky-upstream"), 2, "{code}");

        let (s, h, b) = post_chat(&gw, chat("flaky_alone", "hello", false)).await;
        let e: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{code}: not JSON: {b}"));
        if code == 429 {
            assert_eq!(s, 429);
            assert_eq!(
                e["error"]["message"], "upstream says 429",
                "the provider's 429 body passes through"
            );
            assert!(h.get("retry-after").is_none());
        } else {
            assert_eq!(s, 502, "{code}: {b}");
            assert_eq!(e["error"]["code"], "upstream_error");
        }
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn retry_after_puts_the_deployment_in_cooldown_for_at_least_that_long() {
    for code in [429u16, 503] {
        let up = MockUpstream::start(move |req, _| {
            if req["model"] == "flaky-upstream" && req["messages"][0]["content"] == "first" {
                Reply::RetryAfter(code, 2)
            } else {
                Reply::Echo
            }
        })
        .await;
        let extra = format!(
            "{}{}",
            model_toml("flaky", "up", &["fast"]),
            model_toml("alone", "up", &[])
        );
        let gw = start_gateway(&config(&up.url, &extra)).await;

        let t0 = Instant::now();
        let (s, h, _) = post_chat(&gw, chat("flaky", "first", false)).await;
        assert_eq!(s, 200);
        assert!(route(&h).contains("fallback_from=flaky"));
        assert_eq!(up.calls_for("flaky-upstream"), 1);

        // Inside the Retry-After window the deployment is skipped, not called.
        let (s, h, _) = post_chat(&gw, chat("flaky", "again", false)).await;
        assert_eq!(s, 200);
        if t0.elapsed() < Duration::from_millis(1500) {
            assert_eq!(
                up.calls_for("flaky-upstream"),
                1,
                "{code}: called during its Retry-After cooldown"
            );
            assert!(route(&h).contains("model=fast"));
        }
        // It comes back on its own, but not before Retry-After has passed.
        let mut served_again = None;
        for _ in 0..100 {
            let (s, h, _) = post_chat(&gw, chat("flaky", "later", false)).await;
            assert_eq!(s, 200);
            if up.calls_for("flaky-upstream") == 2 {
                served_again = Some((t0.elapsed(), route(&h)));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (after, r) = served_again.expect("deployment never came back after Retry-After");
        assert!(
            after >= Duration::from_secs(2),
            "{code}: probed again after {after:?}, before Retry-After: 2"
        );
        assert!(r.contains("model=flaky") && !r.contains("fallback"), "{r}");

        // The Retry-After reaches a client with nothing to fall back to.
        up.set_script(move |_, _| Reply::RetryAfter(code, 7));
        let (s, h, _) = post_chat(&gw, chat("alone", "x", false)).await;
        assert_eq!(s, if code == 429 { 429 } else { 502 });
        assert_eq!(
            h.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("7")
        );
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn invalid_json_from_upstream_is_a_clean_502() {
    let up = MockUpstream::start(|req, _| match req["model"].as_str() {
        Some("garbled-upstream") => Reply::Raw(
            200,
            "application/json",
            "{\"id\": \"chatcmpl-1\", \"choices\": [tru".into(),
        ),
        Some("html-upstream") => Reply::Raw(
            200,
            "text/html",
            "<html><body>502 Bad Gateway</body></html>".into(),
        ),
        _ => Reply::Echo,
    })
    .await;
    let extra = format!(
        "{}{}",
        model_toml("garbled", "up", &["fast"]),
        model_toml("html", "up", &["fast"])
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    for m in ["garbled", "html"] {
        let (s, _, b) = post_chat(&gw, chat(m, "x", false)).await;
        assert_eq!(s, 502, "{m}: {b}");
        let e: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(e["error"]["code"], "upstream_invalid_response");
        // Streaming: a body that is no SSE at all ends as an error event, not a hang.
        let (s, _, b) = bounded(10, m, post_chat(&gw, chat(m, "x", true))).await;
        assert_eq!(s, 200);
        assert_eq!(sse_content(&b), "");
        assert_error_event_last(&b);
    }
    assert_eq!(up.calls_for("fast-upstream"), 0);
    // Still serving.
    let (s, _, _) = post_chat(&gw, chat("fast", "ok", false)).await;
    assert_eq!(s, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn sse_stream_that_stops_without_done_ends_with_an_error_event() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "cut-upstream" {
            Reply::RawSse {
                pieces: vec![
                    ev(&role_payload()),
                    ev(&delta_payload("Hel")),
                    ev(&delta_payload("lo")),
                ],
                gap: Duration::from_millis(5),
            }
        } else {
            Reply::Echo
        }
    })
    .await;
    let toml = config(&up.url, &model_toml("cut", "up", &["fast2"])).replace(
        "total_timeout = \"10s\"",
        "total_timeout = \"10s\"\nretries = 2",
    );
    let gw = start_gateway(&toml).await;
    let (s, _, b) = bounded(10, "cut stream", post_chat(&gw, chat("cut", "x", true))).await;
    assert_eq!(s, 200);
    assert_eq!(sse_content(&b), "Hello");
    assert_error_event_last(&b);
    assert!(last_event(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("[DONE]"));
    assert_eq!(
        up.calls_for("cut-upstream"),
        1,
        "no retry after the stream started"
    );
    assert_eq!(
        up.calls_for("fast2-upstream"),
        0,
        "no fallback after the stream started"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn sse_garbage_heartbeats_and_odd_splits_reach_the_client_unchanged() {
    let words = ["Héllo", " wörld", " — ", "日本語", " 🎉", " done"];
    let mut payloads = vec![role_payload()];
    payloads.extend(words.iter().map(|w| delta_payload(w)));
    payloads.push(stop_payload());
    // The wire: valid events mixed with comments, heartbeats, junk fields,
    // non-JSON data, CRLF framing and id/retry lines.
    let mut wire = String::from(": connected\n\n");
    for (i, p) in payloads.iter().enumerate() {
        match i % 4 {
            0 => wire.push_str(&format!("id: {i}\nretry: 1000\ndata: {p}\n\n")),
            1 => wire.push_str(&format!("data: {p}\r\n\r\n")),
            _ => wire.push_str(&ev(p)),
        }
        wire.push_str(match i % 3 {
            0 => ": ping\n\n",
            1 => "garbage line without a field\n\n",
            _ => "data: {not json at all\n\n",
        });
    }
    wire.push_str(": ping\n\ndata: [DONE]\n\n");
    let expected: String = words.concat();

    for sizes in [
        vec![1usize, 2, 3, 5, 8, 13],
        vec![7],
        vec![3, 17, 1, 64, 11],
        vec![29, 1, 1, 97],
    ] {
        // Cut the bytes at odd offsets, including inside multi-byte characters.
        let bytes = wire.as_bytes();
        let mut pieces_b: Vec<Vec<u8>> = Vec::new();
        let (mut at, mut k) = (0, 0);
        while at < bytes.len() {
            let end = (at + sizes[k % sizes.len()]).min(bytes.len());
            pieces_b.push(bytes[at..end].to_vec());
            at = end;
            k += 1;
        }
        // RawSse pieces are Strings; a split inside a UTF-8 character cannot be
        // a String, so those go through the raw TCP server below instead.
        let all_utf8 = pieces_b.iter().all(|p| std::str::from_utf8(p).is_ok());
        let (status, body) = if all_utf8 {
            let pieces: Vec<String> = pieces_b
                .iter()
                .map(|p| String::from_utf8(p.clone()).unwrap())
                .collect();
            let up = MockUpstream::start(move |_, _| Reply::RawSse {
                pieces: pieces.clone(),
                gap: Duration::from_millis(1),
            })
            .await;
            let gw = start_gateway(&config(&up.url, "")).await;
            let (s, _, b) =
                bounded(20, "split stream", post_chat(&gw, chat("fast", "x", true))).await;
            gw.shutdown().await;
            (s, b)
        } else {
            let pieces = pieces_b.clone();
            let raw = raw_upstream(move |_| {
                let mut steps = vec![w(SSE_HEAD)];
                for p in &pieces {
                    let mut c = format!("{:x}\r\n", p.len()).into_bytes();
                    c.extend_from_slice(p);
                    c.extend_from_slice(b"\r\n");
                    steps.push(Step::Write(c));
                    steps.push(Step::Sleep(Duration::from_millis(1)));
                }
                steps.push(w("0\r\n\r\n"));
                steps.push(Step::Fin);
                steps
            })
            .await;
            let gw = start_gateway(&config(&raw.url, "")).await;
            let (s, _, b) = bounded(
                20,
                "split stream (raw)",
                post_chat(&gw, chat("fast", "x", true)),
            )
            .await;
            gw.shutdown().await;
            (s, b)
        };
        assert_eq!(status, 200);
        let mut want: Vec<String> = payloads.clone();
        want.push("[DONE]".into());
        assert_eq!(sse_data(&body), want, "split sizes {sizes:?}");
        assert_eq!(sse_content(&body), expected);
    }
}

#[tokio::test]
async fn slow_first_byte_falls_back_to_the_next_deployment() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "slow-upstream" {
            Reply::Delay(Duration::from_secs(5), Box::new(Reply::Echo))
        } else {
            Reply::Echo
        }
    })
    .await;
    // Headers at once, the first body byte only after 5 s.
    let raw = raw_upstream(|_| {
        vec![
            w("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"),
            Step::Sleep(Duration::from_secs(5)),
            w(http_chunk(&ev(&delta_payload("late")))),
        ]
    })
    .await;
    let extra = format!(
        "{}{}{}",
        model_toml("slow", "up", &["fast"]),
        provider_toml("raw", &raw.url),
        model_toml("headonly", "raw", &["fast2"]),
    );
    let toml = config(&up.url, &extra).replace(
        "first_byte_timeout = \"2s\"",
        "first_byte_timeout = \"500ms\"",
    );
    let gw = start_gateway(&toml).await;

    let (s, h, b) = bounded(
        10,
        "slow head",
        post_chat(&gw, chat("slow", "quick please", false)),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(
        route(&h).contains("model=fast;") && route(&h).contains("fallback_from=slow"),
        "{}",
        route(&h)
    );
    let (s, h, b) = bounded(
        10,
        "slow head stream",
        post_chat(&gw, chat("slow", "quick please", true)),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(sse_content(&b), "echo: quick please");
    assert!(route(&h).contains("fallback_from=slow"));

    let (s, h, b) = bounded(
        10,
        "slow body",
        post_chat(&gw, chat("headonly", "quick", true)),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        sse_content(&b),
        "echo: quick",
        "nothing of the abandoned deployment leaks: {b}"
    );
    assert!(route(&h).contains("model=fast2") && route(&h).contains("fallback_from=headonly"));
    assert_eq!(raw.calls.load(Ordering::SeqCst), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn slow_drip_after_the_first_byte_hits_total_timeout_with_a_clean_error_event() {
    let text = "one two three four five six seven eight nine ten eleven twelve";
    let up = MockUpstream::start(move |req, _| {
        if req["model"] == "drip-upstream" {
            Reply::SlowStream(text.into(), Duration::from_millis(300))
        } else {
            Reply::Echo
        }
    })
    .await;
    let raw = raw_upstream(|_| {
        let mut steps = vec![w(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4000\r\n\r\n{",
        )];
        for _ in 0..40 {
            steps.push(Step::Sleep(Duration::from_millis(100)));
            steps.push(w("\"x\":1,"));
        }
        steps
    })
    .await;
    let extra = format!(
        "{}{}{}total_timeout = \"1200ms\"\n",
        model_toml("drip", "up", &["fast"]),
        model_toml("dripjson", "raw", &["fast"]),
        provider_toml("raw", &raw.url).replace("total_timeout = \"5s\"\n", ""),
    );
    let toml = config(&up.url, &extra)
        .replace(
            "first_byte_timeout = \"2s\"",
            "first_byte_timeout = \"500ms\"",
        )
        .replace("total_timeout = \"10s\"", "total_timeout = \"1200ms\"");
    let gw = start_gateway(&toml).await;
    let (s, _, b) = bounded(10, "drip", post_chat(&gw, chat("drip", "x", true))).await;
    assert_eq!(s, 200);
    let got = sse_content(&b);
    assert!(
        !got.is_empty() && got.len() < text.len() && text.starts_with(&got),
        "a prefix, once: {got:?}"
    );
    assert_error_event_last(&b);
    assert!(
        last_event(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{b}"
    );
    assert_eq!(
        up.calls_for("fast-upstream"),
        0,
        "no fallback after the first byte"
    );
    assert!(
        eventually(|| up.state.cancelled.load(Ordering::SeqCst) == 1).await,
        "the upstream stream is dropped"
    );

    // Non-streaming: a JSON body that drips is a 502/504 envelope, not a hang.
    let (s, _, b) = bounded(
        10,
        "drip json",
        post_chat(&gw, chat("dripjson", "x", false)),
    )
    .await;
    assert!(s == 502 || s == 504, "{s} {b}");
    assert!(serde_json::from_str::<Value>(&b).unwrap()["error"]["message"].is_string());
    assert_eq!(raw.calls.load(Ordering::SeqCst), 1);
    assert_eq!(up.calls_for("fast-upstream"), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn retries_and_fallbacks_happen_only_before_the_first_byte() {
    let up = MockUpstream::start(|req, _| match req["model"].as_str() {
        Some("err-upstream") => Reply::Status(500, json!({"error": {"message": "boom"}})),
        Some("broken-upstream") => Reply::RawSse {
            pieces: vec![
                ev(&role_payload()),
                ev(&delta_payload("partial ")),
                ev(&delta_payload("answer")),
            ],
            gap: Duration::from_millis(5),
        },
        _ => Reply::Echo,
    })
    .await;
    let extra = format!(
        "{}{}",
        model_toml("err", "up", &["fast"]),
        model_toml("broken", "up", &["fast", "fast2"])
    );
    let toml = config(&up.url, &extra).replace(
        "total_timeout = \"10s\"",
        "total_timeout = \"10s\"\nretries = 2",
    );
    let gw = start_gateway(&toml).await;

    // Before the first byte: retried on the same deployment, then the next one.
    let (s, h, b) = post_chat(&gw, chat("err", "a", true)).await;
    assert_eq!(s, 200);
    assert_eq!(sse_content(&b), "echo: a");
    assert!(route(&h).contains("fallback_from=err"));
    assert_eq!(up.calls_for("err-upstream"), 3, "1 attempt + 2 retries");

    // After the first byte: exactly one call, output never duplicated.
    for i in 1..=3 {
        let (s, _, b) = bounded(10, "broken", post_chat(&gw, chat("broken", "b", true))).await;
        assert_eq!(s, 200);
        assert_eq!(sse_content(&b), "partial answer");
        assert_error_event_last(&b);
        assert_eq!(up.calls_for("broken-upstream"), i);
    }
    assert_eq!(up.calls_for("fast-upstream"), 1);
    assert_eq!(up.calls_for("fast2-upstream"), 0);
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// Circuit breaking
// ---------------------------------------------------------------------------

const MODE_FAIL: u8 = 0;
const MODE_SLOW_FAIL: u8 = 1;
const MODE_OK: u8 = 2;
const MODE_HANG: u8 = 3;

async fn breaker_setup(
    cooldown_after: u32,
    cooldown: &str,
) -> (MockUpstream, Arc<AtomicU8>, triage::server::Gateway) {
    let mode = Arc::new(AtomicU8::new(MODE_FAIL));
    let m = mode.clone();
    let up = MockUpstream::start(move |req, _| {
        if req["model"] != "fast-upstream" {
            return Reply::Echo;
        }
        let fail = Reply::Status(500, json!({"error": {"message": "down"}}));
        match m.load(Ordering::SeqCst) {
            MODE_FAIL => fail,
            MODE_SLOW_FAIL => Reply::Delay(Duration::from_millis(600), Box::new(fail)),
            MODE_HANG => Reply::Delay(Duration::from_secs(10), Box::new(Reply::Echo)),
            _ => Reply::Echo,
        }
    })
    .await;
    let toml = config(&up.url, "[routers.r]\nclassifier = \"rules\"\nunknown_tier = \"small\"\n[[routers.r.rules]]\ntier = \"small\"\n")
        .replace(
            "[tiers.small]\nmodels = [\"fast\", \"fast2\"]\n",
            &format!("[tiers.small]\nmodels = [\"fast\", \"fast2\"]\ncooldown_after = {cooldown_after}\ncooldown = \"{cooldown}\"\n"),
        )
        .replace("first_byte_timeout = \"2s\"", "first_byte_timeout = \"5s\"");
    assert!(toml.contains("cooldown_after"));
    let gw = start_gateway(&toml).await;
    (up, mode, gw)
}

async fn served_by(gw: &triage::server::Gateway) -> String {
    let (s, h, b) = bounded(10, "router request", post_chat(gw, chat("r", "hi", false))).await;
    assert_eq!(s, 200, "{b}");
    let r = route(&h);
    r.split("; ")
        .find_map(|p| p.strip_prefix("model="))
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn circuit_breaker_ejects_probes_once_and_recovers() {
    let (up, mode, gw) = breaker_setup(2, "1s").await;
    let fast = || up.calls_for("fast-upstream");

    // Two consecutive failures eject `fast`; traffic shifts to `fast2`.
    assert_eq!(served_by(&gw).await, "fast2");
    assert_eq!(served_by(&gw).await, "fast2");
    assert_eq!(fast(), 2);
    for _ in 0..5 {
        assert_eq!(served_by(&gw).await, "fast2");
    }
    assert_eq!(
        fast(),
        2,
        "an ejected deployment is skipped during its cooldown"
    );

    // Cooldown over, still broken: of many concurrent requests exactly one probes.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    mode.store(MODE_SLOW_FAIL, Ordering::SeqCst);
    let reqs: Vec<_> = (0..6).map(|_| served_by(&gw)).collect();
    let served = futures::future::join_all(reqs).await;
    assert!(served.iter().all(|m| m == "fast2"), "{served:?}");
    assert_eq!(fast(), 3, "half-open: exactly one probe");
    // The failed probe re-ejects at once.
    assert_eq!(served_by(&gw).await, "fast2");
    assert_eq!(fast(), 3);

    // Healed: after the next cooldown the probe succeeds and traffic returns.
    mode.store(MODE_OK, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(served_by(&gw).await, "fast");
    let fast2_before = up.calls_for("fast2-upstream");
    for _ in 0..5 {
        assert_eq!(served_by(&gw).await, "fast");
    }
    assert_eq!(up.calls_for("fast2-upstream"), fast2_before);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_abandoned_probe_does_not_leave_the_deployment_ejected_forever() {
    let (up, mode, gw) = breaker_setup(1, "300ms").await;
    assert_eq!(served_by(&gw).await, "fast2");
    assert_eq!(up.calls_for("fast-upstream"), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;

    // The probe hangs and its client gives up: the gateway drops the request.
    mode.store(MODE_HANG, Ordering::SeqCst);
    let r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .json(&chat("r", "probe", false))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    assert_eq!(
        up.calls_for("fast-upstream"),
        2,
        "that request was the probe"
    );

    // The deployment heals; it must be probed again and come back.
    mode.store(MODE_OK, Ordering::SeqCst);
    let mut back = false;
    for _ in 0..40 {
        if served_by(&gw).await == "fast" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        back,
        "deployment stayed ejected after its probe was cancelled"
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// Client misbehaviour
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_the_upstream() {
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let up = MockUpstream::start(move |_, _| {
        Reply::SlowStream(text.clone(), Duration::from_millis(100))
    })
    .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let resp = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .json(&chat("fast", "x", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut s = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("w1") {
        let c = bounded(5, "first chunks", s.next()).await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&c));
    }
    drop(s);
    assert!(
        wait_until(5, || up.state.cancelled.load(Ordering::SeqCst) == 1).await,
        "upstream stream was not cancelled after the client left"
    );
    assert_eq!(up.state.completed.load(Ordering::SeqCst), 0);
    let (st, _, _) = post_chat(&gw, chat("fast", "still here", false)).await;
    assert_eq!(st, 200);
    gw.shutdown().await;
}

fn with_server_settings(toml: String, settings: &str) -> String {
    let out = toml.replacen(
        "shutdown_grace = \"5s\"\n",
        &format!("shutdown_grace = \"5s\"\n{settings}\n"),
        1,
    );
    assert!(out.contains(settings));
    out
}

/// Reads until the peer closes; returns what it sent. Panics if it stays open.
async fn read_until_closed(sock: &mut TcpStream, secs: u64, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(end, sock.read(&mut buf)).await {
            Err(_) => panic!("{what}: connection still open after {secs}s"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slowloris_connections_are_closed_after_header_read_timeout() {
    let up = MockUpstream::echo().await;
    let toml = with_server_settings(config(&up.url, ""), "header_read_timeout = \"1s\"");
    let gw = start_gateway(&toml).await;
    let partials: [&[u8]; 4] = [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-",
        b"POS",
        b"PRI * HTTP/2.0\r\n",
        b"",
    ];
    for partial in partials {
        let mut sock = TcpStream::connect(gw.addr).await.unwrap();
        sock.write_all(partial).await.unwrap();
        let t0 = Instant::now();
        let got = read_until_closed(
            &mut sock,
            8,
            &format!("partial head {:?}", String::from_utf8_lossy(partial)),
        )
        .await;
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "closed before the timeout"
        );
        let text = String::from_utf8_lossy(&got);
        assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let (s, _, _) = post_chat(&gw, chat("fast", "alive", false)).await;
    assert_eq!(s, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn oversize_headers_are_refused_and_the_server_stays_up() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let big = "a".repeat(100 * 1024);
    let r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .header("x-big", big.as_str())
        .json(&chat("fast", "x", false))
        .send()
        .await;
    match r {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 431),
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
    // Raw, too: many medium headers adding up to > 100 KB.
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..1000 {
        head.push_str(&format!("x-h{i}: {}\r\n", "b".repeat(100)));
    }
    head.push_str("\r\n");
    let _ = sock.write_all(head.as_bytes()).await;
    let got = read_until_closed(&mut sock, 8, "oversize raw head").await;
    let text = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(up.calls(), 0);
    let (s, _, _) = post_chat(&gw, chat("fast", "alive", false)).await;
    assert_eq!(s, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn oversize_body_gets_a_413_envelope() {
    let up = MockUpstream::echo().await;
    let toml = with_server_settings(config(&up.url, ""), "max_body_bytes = 65536");
    let gw = start_gateway(&toml).await;
    let big = chat("fast", &"word ".repeat(40_000), false);
    let url = format!("{}/chat/completions", gw.base_url());

    // With a Content-Length.
    let r = http()
        .post(&url)
        .bearer_auth(KEY)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "request_too_large");
    assert_eq!(e["error"]["type"], "invalid_request_error");

    // Chunked, no length: cut off at the limit.
    let bytes = serde_json::to_vec(&big).unwrap();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let r = http()
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    match r {
        Ok(r) => {
            assert_eq!(r.status().as_u16(), 413);
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "request_too_large");
        }
        Err(e) => panic!("chunked oversize body: {e}"),
    }
    assert_eq!(up.calls(), 0);
    let (s, _, _) = post_chat(&gw, chat("fast", "small", false)).await;
    assert_eq!(s, 200);
    gw.shutdown().await;
}

/// (method, path, key, body, expected status)
type Case = (
    reqwest::Method,
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
);

#[tokio::test]
async fn ten_thousand_malformed_requests_neither_crash_nor_leak() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        // Wrong keys are among the cases: not throttled here (tests/security.rs is).
        "[auth]\nmax_failures_per_minute = 0\n",
    ))
    .await;
    let base = format!("http://{}", gw.addr);
    // (method, path, key, body, expected status)
    let cases: Vec<Case> = vec![
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(KEY),
            b"{not json".to_vec(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(KEY),
            b"[]".to_vec(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(KEY),
            b"".to_vec(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(KEY),
            br#"{"model": 5}"#.to_vec(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(KEY),
            br#"{"model":"fast","messages":"x","n":0}"#.to_vec(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(KEY),
            vec![0xff, 0xfe, 0x00, 0x7b],
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(KEY),
            br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            None,
            b"{}".to_vec(),
            401,
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some("sk-wrong"),
            b"{}".to_vec(),
            401,
        ),
        (
            reqwest::Method::GET,
            "/v1/chat/completions",
            Some(KEY),
            Vec::new(),
            405,
        ),
        (
            reqwest::Method::POST,
            "/v1/nope",
            Some(KEY),
            b"{}".to_vec(),
            404,
        ),
        (
            reqwest::Method::POST,
            "/v1/embeddings",
            Some(KEY),
            b"{\"model\":".to_vec(),
            400,
        ),
    ];
    let cases = Arc::new(cases);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()
        .unwrap();
    let run = |n: usize| {
        let cases = cases.clone();
        let client = client.clone();
        let base = base.clone();
        async move {
            let workers: Vec<_> = (0..8)
                .map(|wkr| {
                    let cases = cases.clone();
                    let client = client.clone();
                    let base = base.clone();
                    tokio::spawn(async move {
                        for i in 0..n / 8 {
                            let (m, p, k, b, want) = &cases[(i * 8 + wkr) % cases.len()];
                            let mut rb = client
                                .request(m.clone(), format!("{base}{p}"))
                                .body(b.clone());
                            if let Some(k) = k {
                                rb = rb.bearer_auth(k);
                            }
                            let r = rb.send().await.unwrap();
                            assert_eq!(
                                r.status().as_u16(),
                                *want,
                                "{m} {p} {:?}",
                                String::from_utf8_lossy(b)
                            );
                            let body = r.bytes().await.unwrap();
                            if *want != 405 || !body.is_empty() {
                                let v: Value = serde_json::from_slice(&body).unwrap();
                                assert!(v["error"]["message"].is_string());
                            }
                        }
                    })
                })
                .collect();
            for wk in workers {
                wk.await.unwrap();
            }
        }
    };
    run(800).await; // warm up allocator and pools
    let rss0 = rss_kb();
    bounded(120, "10k malformed", run(10_000)).await;
    // Protocol-level garbage too: each is a 400 or a closed connection.
    for i in 0..200 {
        let mut sock = TcpStream::connect(gw.addr).await.unwrap();
        let junk: &[u8] = match i % 4 {
            0 => b"GARBAGE\r\n\r\n",
            1 => b"POST /v1/chat/completions HTTP/9.9\r\n\r\n",
            2 => b"\x00\x01\x02\x03\x04\x05\r\n\r\n",
            _ => b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        };
        sock.write_all(junk).await.unwrap();
        let got = read_until_closed(&mut sock, 5, "garbage request").await;
        let t = String::from_utf8_lossy(&got);
        assert!(got.is_empty() || t.starts_with("HTTP/1.1 4"), "{t}");
    }
    let rss1 = rss_kb();
    eprintln!("VmRSS before {rss0} kB, after 10k malformed requests {rss1} kB");
    assert!(
        rss1 < rss0 + 50 * 1024,
        "RSS grew from {rss0} kB to {rss1} kB"
    );
    assert_eq!(up.calls(), 0);
    let (s, _, b) = post_chat(&gw, chat("fast", "still alive", false)).await;
    assert_eq!(s, 200, "{b}");
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// The real binary: graceful drain and hot reload
// ---------------------------------------------------------------------------

struct Triage {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Triage {
    fn cfg_path(&self) -> PathBuf {
        self.dir.path().join("triage.toml")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("triage.log")).unwrap_or_default()
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
    fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }
    async fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "triage did not exit within {secs}s; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Triage {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(path: &Path, toml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, toml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `config()` for a child listening on `port`.
fn child_config(url: &str, port: u16, extra: &str) -> String {
    config(url, extra).replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    )
}

async fn spawn_triage(toml: impl Fn(u16) -> String) -> Triage {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("triage.toml");
    write_config(&cfg, &toml(port));
    let log = std::fs::File::create(dir.path().join("triage.log")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let t = Triage { child, port, dir };
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let client = http();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client
            .get(&ready)
            .timeout(Duration::from_secs(1))
            .send()
            .await
        {
            if r.status() == 200 {
                return t;
            }
        }
        assert!(
            Instant::now() < end,
            "triage never became ready; log:\n{}",
            t.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_100_open_streams_and_exits_zero() {
    let text = "alpha beta gamma delta epsilon zeta eta theta iota kappa";
    let up =
        MockUpstream::start(move |_, _| Reply::SlowStream(text.into(), Duration::from_millis(150)))
            .await;
    let url = up.url.clone();
    let mut t = spawn_triage(|port| {
        child_config(&url, port, "").replace("shutdown_grace = \"5s\"", "shutdown_grace = \"30s\"")
    })
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let client = client.clone();
            let started = started.clone();
            let url = format!("{}/chat/completions", t.url());
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(KEY)
                    .json(&chat("fast", &format!("s{i}"), true))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                started.fetch_add(1, Ordering::SeqCst);
                r.text().await.unwrap()
            })
        })
        .collect();
    assert!(
        wait_until(30, || started.load(Ordering::SeqCst) == 100).await,
        "streams did not all start"
    );
    t.signal("TERM");
    for (i, task) in tasks.into_iter().enumerate() {
        let body = bounded(40, "draining stream", task).await.unwrap();
        assert_eq!(sse_content(&body), text, "stream {i} cut short: {body}");
        assert!(
            body.ends_with("data: [DONE]\n\n"),
            "stream {i} lacks [DONE]"
        );
    }
    let st = t.wait_exit(30).await;
    assert_eq!(st.code(), Some(0), "exit status {st:?}; log:\n{}", t.log());
    assert_eq!(up.state.completed.load(Ordering::SeqCst), 100);
    assert_eq!(up.state.cancelled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn sighup_reloads_config_keeps_streams_spend_and_rejects_invalid_files() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "smart-upstream" {
            Reply::SlowStream(
                "one two three four five six seven eight nine ten".into(),
                Duration::from_millis(150),
            )
        } else {
            Reply::Echo
        }
    })
    .await;
    // `budget` lands in [keys.app] (the table config() ends with).
    let base =
        |port: u16, extra: &str| child_config(&up.url, port, &format!("budget = 100.0\n{extra}"));
    let t = spawn_triage(|port| base(port, "")).await;
    let port = t.port;
    let client = http();
    let spent = || async {
        let v: Value = get_json(&client, format!("{}/triage/keys/self", t.url())).await;
        v["limits"]["key"]["spent_nanos"].as_u64().unwrap()
    };
    let models = || async {
        let v: Value = get_json(&client, format!("{}/models", t.url())).await;
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let post = |model: &'static str, stream: bool| {
        let client = client.clone();
        let url = format!("{}/chat/completions", t.url());
        async move {
            let r = client
                .post(url)
                .bearer_auth(KEY)
                .json(&chat(model, "hello", stream))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };

    let (s, _) = post("fast", false).await;
    assert_eq!(s, 200);
    let spend0 = spent().await;
    assert!(spend0 > 0);
    assert_eq!(post("newmodel", false).await.0, 404);

    // A valid new config with a model added; a stream is open meanwhile.
    let stream = tokio::spawn(post("smart", true));
    assert!(wait_until(10, || up.calls_for("smart-upstream") == 1).await);
    write_config(
        &t.cfg_path(),
        &base(port, &model_toml("newmodel", "up", &[])),
    );
    t.signal("HUP");
    let mut ok = false;
    for _ in 0..100 {
        if models().await.iter().any(|m| m == "newmodel") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "reload did not add the model; log:\n{}", t.log());
    assert_eq!(spent().await, spend0, "spend survives a reload");
    let (s, b) = post("newmodel", false).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(up.calls_for("newmodel-upstream"), 1);
    let (s, body) = bounded(20, "in-flight stream across reload", stream)
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        sse_content(&body),
        "one two three four five six seven eight nine ten"
    );
    assert!(body.ends_with("data: [DONE]\n\n"));

    // An invalid config: rejected, the running one keeps serving.
    let bad = format!(
        "{}[tiers.broken]\nmodels = [\"no-such-model\"]\n",
        base(port, &model_toml("newmodel", "up", &[]))
    );
    write_config(&t.cfg_path(), &bad);
    let spend1 = spent().await;
    t.signal("HUP");
    assert!(
        wait_until(10, || t.log().contains("reload rejected")).await,
        "no rejection logged:\n{}",
        t.log()
    );
    assert_eq!(spent().await, spend1, "spend survives a rejected reload");
    assert_eq!(post("newmodel", false).await.0, 200);
    assert!(models().await.iter().any(|m| m == "newmodel"));
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["check", "-c"])
        .arg(t.cfg_path())
        .output()
        .unwrap();
    assert!(!check.status.success());
    let out = String::from_utf8_lossy(&check.stdout);
    let first = out.lines().next().unwrap();
    assert!(first.contains("tiers.broken"), "{out}");
    assert!(
        t.log().contains(first),
        "the reload log shows the same error as `triage check`:\n{first}\nlog:\n{}",
        t.log()
    );
}
