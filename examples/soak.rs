//! Soak test: mixed traffic through a `triage` child process against a local
//! mock upstream that injects faults, for a bounded time on 127.0.0.1.
//!
//!     cargo run --release --example soak -- --minutes 10
//!     benches/soak.sh 10            (builds, then runs this)
//!
//! Prints requests served, errors by kind, and triage's resident memory
//! (VmRSS of the child) at start, peak and end. Options:
//! `--minutes N` (default 10), `--seconds N` (overrides), `--concurrency N`
//! (default 16), `--triage PATH` (default: the `triage` binary next to this
//! example's target directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "sk-soak-key";

struct Args {
    duration: Duration,
    concurrency: usize,
    triage: PathBuf,
}

fn args() -> Args {
    let mut duration = Duration::from_secs(600);
    let mut concurrency = 16;
    let mut triage = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--minutes" => {
                duration =
                    Duration::from_secs_f64(val().parse::<f64>().expect("--minutes N") * 60.0)
            }
            "--seconds" => {
                duration = Duration::from_secs_f64(val().parse::<f64>().expect("--seconds N"))
            }
            "--concurrency" => concurrency = val().parse().expect("--concurrency N"),
            "--triage" => triage = Some(PathBuf::from(val())),
            "-h" | "--help" => {
                println!("soak [--minutes N | --seconds N] [--concurrency N] [--triage PATH]");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let triage = triage.unwrap_or_else(|| {
        // target/<profile>/examples/soak -> target/<profile>/triage
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(|p| p.parent())
            .unwrap()
            .join("triage")
    });
    assert!(
        triage.exists(),
        "no triage binary at {} (build it, or pass --triage)",
        triage.display()
    );
    Args {
        duration: duration.min(Duration::from_secs(24 * 3600)),
        concurrency: concurrency.clamp(1, 256),
        triage,
    }
}

// --- the fault-injecting upstream -------------------------------------------

#[derive(Default)]
struct Injected(Mutex<BTreeMap<&'static str, u64>>);

impl Injected {
    fn add(&self, k: &'static str) {
        *self.0.lock().unwrap().entry(k).or_default() += 1;
    }
}

fn chunk(content: Option<&str>, finish: Option<&str>) -> Bytes {
    let delta = match content {
        Some(c) => json!({"content": c}),
        None => json!({}),
    };
    let v = json!({"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    Bytes::from(format!("data: {v}\n\n"))
}

fn usage_chunk(p: u64, c: u64) -> Bytes {
    let v = json!({"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}});
    Bytes::from(format!("data: {v}\n\n"))
}

/// Words of the answer; `cut` stops early without [DONE], `reset` breaks the
/// connection mid-body, `gap` drips the words.
fn sse(words: usize, gap: Duration, cut: bool, reset: bool) -> Response {
    let s = futures::stream::unfold(0usize, move |i| async move {
        if i > words + 2 {
            return None;
        }
        if i > 0 && !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let item: Result<Bytes, std::io::Error> = if i < words {
            Ok(chunk(Some(&format!("w{i} ")), None))
        } else if cut {
            return None;
        } else if reset {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected reset",
            ))
        } else if i == words {
            Ok(chunk(None, Some("stop")))
        } else if i == words + 1 {
            Ok(usage_chunk(10, words as u64))
        } else {
            Ok(Bytes::from_static(b"data: [DONE]\n\n"))
        };
        let stop = item.is_err();
        Some((item, if stop { usize::MAX - 1 } else { i + 1 }))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(s))
        .unwrap()
}

fn completion(words: usize) -> Response {
    let text: Vec<String> = (0..words).map(|i| format!("w{i}")).collect();
    Json(json!({"id": "chatcmpl-soak", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.join(" ")}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words}}))
    .into_response()
}

fn err(status: u16) -> Response {
    (
        http::StatusCode::from_u16(status).unwrap(),
        Json(json!({"error": {"message": "injected", "type": "server_error", "param": null, "code": null}})),
    )
        .into_response()
}

async fn upstream(inj: Arc<Injected>, body: Value) -> Response {
    let stream = body["stream"] == json!(true);
    let flaky = body["model"] == "flaky-upstream";
    let roll: u32 = if flaky {
        rand::random_range(0..100)
    } else {
        100
    };
    let fault = match roll {
        0..=7 => "status_500",
        8..=11 => "status_503",
        12..=15 => "status_429_retry_after",
        16..=18 => "invalid_json",
        19..=22 => "stream_cut_without_done",
        23..=25 => "reset_mid_body",
        26..=28 => "slow_first_byte",
        29..=30 => "slow_drip",
        _ => "none",
    };
    inj.add(if flaky {
        fault
    } else {
        "good deployment (no fault)"
    });
    match fault {
        "status_500" => err(500),
        "status_503" => err(503),
        "status_429_retry_after" => {
            let mut r = err(429);
            r.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
            r
        }
        "invalid_json" => {
            ([("content-type", "application/json")], "{\"choices\": [tru").into_response()
        }
        "stream_cut_without_done" if stream => sse(5, Duration::from_millis(2), true, false),
        "reset_mid_body" => sse(5, Duration::from_millis(2), false, true),
        "slow_first_byte" => {
            tokio::time::sleep(Duration::from_millis(800)).await;
            if stream {
                sse(8, Duration::from_millis(2), false, false)
            } else {
                completion(8)
            }
        }
        "slow_drip" if stream => sse(40, Duration::from_millis(100), false, false),
        _ => {
            tokio::time::sleep(Duration::from_millis(rand::random_range(1..20))).await;
            if stream {
                sse(12, Duration::from_millis(3), false, false)
            } else {
                completion(12)
            }
        }
    }
}

async fn start_upstream(inj: Arc<Injected>) -> String {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |Json(body): Json<Value>| {
            let inj = inj.clone();
            async move { upstream(inj, body).await }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    format!("http://{addr}/v1")
}

fn config(url: &str, port: u16) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "10s"
header_read_timeout = "2s"
[store]
kind = "memory"
[providers.up]
kind = "openai"
base_url = "{url}"
first_byte_timeout = "400ms"
total_timeout = "2s"
[models.flaky]
provider = "up"
upstream_model = "flaky-upstream"
price = {{ input = 1.0, output = 2.0 }}
max_output_tokens = 100
fallbacks = ["good"]
[models.flaky_alone]
provider = "up"
upstream_model = "flaky-upstream"
price = {{ input = 1.0, output = 2.0 }}
max_output_tokens = 100
[models.good]
provider = "up"
upstream_model = "good-upstream"
price = {{ input = 1.0, output = 2.0 }}
max_output_tokens = 100
[tiers.main]
models = ["flaky", "good"]
cooldown_after = 3
cooldown = "2s"
[routers.auto]
classifier = "rules"
unknown_tier = "main"
[[routers.auto.rules]]
tier = "main"
[cache]
enabled = true
max_bytes = 4194304
[keys.soak]
key_sha256 = "{}"
"#,
        triage::auth::sha256_hex(KEY)
    )
}

fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// --- the client side -----------------------------------------------------------

#[derive(Default)]
struct Tally {
    served: AtomicU64,
    kinds: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn add(&self, k: impl Into<String>) {
        *self.kinds.lock().unwrap().entry(k.into()).or_default() += 1;
    }
}

async fn one_request(client: &reqwest::Client, base: &str, tally: &Tally, n: u64) {
    let roll = rand::random_range(0..100u32);
    let url = format!("{base}/chat/completions");
    let (model, stream, kind) = match roll {
        0..=34 => ("auto", false, "router_json"),
        35..=64 => ("auto", true, "router_stream"),
        65..=74 => ("flaky_alone", false, "direct_json"),
        75..=82 => ("flaky_alone", true, "direct_stream"),
        83..=87 => ("auto", true, "client_abort"),
        88..=91 => ("good", false, "cacheable"),
        _ => ("", false, "malformed"),
    };
    let req = if kind == "malformed" {
        client
            .post(&url)
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body("{\"model\": \"auto\", \"messages\": [")
    } else {
        let text = if kind == "cacheable" {
            "same question".to_string()
        } else {
            format!("question {n}")
        };
        client
            .post(&url)
            .bearer_auth(KEY)
            .json(&json!({"model": model, "stream": stream,
            "messages": [{"role": "user", "content": text}]}))
    };
    let resp = match tokio::time::timeout(Duration::from_secs(15), req.send()).await {
        Err(_) => return tally.add("client:timeout_head"),
        Ok(Err(e)) => {
            return tally.add(format!(
                "client:transport({})",
                if e.is_connect() { "connect" } else { "other" }
            ))
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status().as_u16();
    if kind == "client_abort" && status == 200 {
        let mut s = resp.bytes_stream();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        drop(s);
        tally.served.fetch_add(1, Ordering::Relaxed);
        return tally.add("ok:client_aborted_mid_stream");
    }
    let body = match tokio::time::timeout(Duration::from_secs(15), resp.text()).await {
        Err(_) => return tally.add("client:timeout_body (hang)"),
        Ok(Err(_)) => return tally.add("client:body_cut_without_error_event"),
        Ok(Ok(b)) => b,
    };
    tally.served.fetch_add(1, Ordering::Relaxed);
    if status != 200 {
        let code = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
        return tally.add(format!(
            "http_{status}:{}",
            code.unwrap_or_else(|| "-".into())
        ));
    }
    if stream {
        if body.ends_with("data: [DONE]\n\n") {
            tally.add(format!("ok:{kind}"));
        } else if body.contains("\"error\"") {
            tally.add(format!("stream_error_event:{kind}"));
        } else {
            tally.add(format!("BAD:stream_ended_without_done_or_error:{kind}"));
        }
    } else if serde_json::from_str::<Value>(&body)
        .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string())
    {
        tally.add(format!("ok:{kind}"));
    } else {
        tally.add(format!("BAD:200_without_completion:{kind}"));
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let inj = Arc::new(Injected::default());
    let up = start_upstream(inj.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("triage.toml");
    std::fs::write(&cfg, config(&up, port)).unwrap();
    let log = std::fs::File::create(dir.path().join("triage.log")).unwrap();
    let mut child = std::process::Command::new(&a.triage)
        .args(["serve", "-c"])
        .arg(&cfg)
        .env("RUST_LOG", "error")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning triage");
    let pid = child.id();
    let base = format!("http://127.0.0.1:{port}/v1");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency)
        .build()
        .unwrap();
    let t_ready = Instant::now();
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
        {
            if r.status() == 200 {
                break;
            }
        }
        if t_ready.elapsed() > Duration::from_secs(30) || child.try_wait().ok().flatten().is_some()
        {
            let _ = child.kill();
            let log = std::fs::read_to_string(dir.path().join("triage.log")).unwrap_or_default();
            panic!("triage did not start; its output:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_start = rss_kb(pid).unwrap_or(0);
    println!(
        "soak: {:.1} min, {} concurrent clients, triage pid {pid} ({}), upstream {up}",
        a.duration.as_secs_f64() / 60.0,
        a.concurrency,
        a.triage.display()
    );
    let tally = Arc::new(Tally::default());
    let seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + a.duration;
    let workers: Vec<_> = (0..a.concurrency)
        .map(|_| {
            let (client, base, tally, seq) =
                (client.clone(), base.clone(), tally.clone(), seq.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    one_request(&client, &base, &tally, n).await;
                }
            })
        })
        .collect();
    let mut rss_peak = rss_start;
    let every = (a.duration / 8).clamp(Duration::from_secs(10), Duration::from_secs(60));
    let mut next_report = start + every;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = rss_kb(pid).unwrap_or(0);
        rss_peak = rss_peak.max(r);
        if Instant::now() >= next_report {
            println!(
                "  {:>4.0}s  served {:>8}  rss {} kB",
                start.elapsed().as_secs_f64(),
                tally.served.load(Ordering::Relaxed),
                r
            );
            next_report += every;
        }
        if child.try_wait().ok().flatten().is_some() {
            println!("triage EXITED during the soak");
            break;
        }
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed();
    let rss_end = rss_kb(pid).unwrap_or(0);
    let metrics_ok = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let t_exit = Instant::now();
    let exit = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t_exit.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let served = tally.served.load(Ordering::Relaxed);
    println!("\n== soak result ({:.1} s) ==", elapsed.as_secs_f64());
    println!(
        "requests served (answered by triage): {served}  ({:.0}/s)",
        served as f64 / elapsed.as_secs_f64()
    );
    println!("outcomes:");
    for (k, v) in tally.kinds.lock().unwrap().iter() {
        println!("  {k:<48} {v}");
    }
    println!("upstream calls by injected fault:");
    for (k, v) in inj.0.lock().unwrap().iter() {
        println!("  {k:<48} {v}");
    }
    println!("triage VmRSS: start {rss_start} kB, peak {rss_peak} kB, end {rss_end} kB");
    println!("/metrics after soak: HTTP {metrics_ok}");
    match exit {
        Some(st) => println!("SIGTERM -> exit {:?}", st.code()),
        None => println!("SIGTERM -> did not exit within 20 s (killed)"),
    }
    let bad: u64 = tally
        .kinds
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("BAD") || k.contains("hang") || k.starts_with("client:"))
        .map(|(_, v)| *v)
        .sum();
    if bad > 0 || exit.and_then(|s| s.code()) != Some(0) {
        println!(
            "soak FAILED ({bad} bad outcomes); triage log kept at {}",
            dir.keep().display()
        );
        std::process::exit(1);
    }
}
