//! Load benchmark: `cargo bench --bench load`.
//!
//! Starts the built-in mock provider and triage as separate processes (the
//! release binaries), then measures the mock **directly** and **through
//! triage** in the same run, for JSON and SSE, at several concurrencies, and
//! prints requests/s, p50/p99 latency, time to first byte, the overhead
//! (through − direct) and the throughput ratio. Then triage's resident memory
//! idle and with 1,000 open streams. Everything targets 127.0.0.1 and is
//! bounded in time (`LOAD_SECS` per cell, default 3). `LOAD_CONC=1,32` and
//! `LOAD_ONLY=sse` narrow the run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "sk-triage-bench";

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_triage")
}

fn spawn(args: &[&str]) -> Proc {
    Proc(
        Command::new(bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn wait_up(client: &reqwest::Client, url: &str) {
    for _ in 0..200 {
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    url: String,
    body: serde_json::Value,
    auth: bool,
    stream: bool,
}

struct Result_ {
    rps: f64,
    p50: f64,
    p99: f64,
    ttfb50: f64,
    errors: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(client: &reqwest::Client, s: &Scenario, conc: usize, secs: f64) -> Result_ {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let s = Arc::new(s.clone());
    let mut tasks = Vec::new();
    for w in 0..conc {
        let client = client.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ttfb = Vec::new();
            let mut errors = 0;
            let mut i = 0u64;
            while Instant::now() < deadline {
                let mut body = s.body.clone();
                if s.name.contains("miss") {
                    body["seed"] = json!(w as u64 * 1_000_000 + i);
                }
                i += 1;
                let t0 = Instant::now();
                let mut rb = client.post(&s.url).json(&body);
                if s.auth {
                    rb = rb.bearer_auth(KEY);
                }
                match rb.send().await {
                    Ok(r) if r.status().is_success() => {
                        let mut stream = r.bytes_stream();
                        let mut first = None;
                        let mut ok = true;
                        while let Some(c) = stream.next().await {
                            if c.is_err() {
                                ok = false;
                                break;
                            }
                            if first.is_none() {
                                first = Some(t0.elapsed());
                            }
                        }
                        if ok {
                            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                            if s.stream {
                                ttfb.push(first.unwrap_or_default().as_secs_f64() * 1000.0);
                            }
                        } else {
                            errors += 1;
                        }
                    }
                    _ => errors += 1,
                }
            }
            (lat, ttfb, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut ttfb = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, f, e) = t.await.unwrap();
        lat.extend(l);
        ttfb.extend(f);
        errors += e;
    }
    Result_ {
        rps: lat.len() as f64 / secs,
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
        ttfb50: pct(&mut ttfb, 0.5),
        errors,
    }
}

fn config(mock: &str, slow_mock: &str, listen: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
log_level = "warn"
[store]
kind = "memory"
[providers.mock]
kind = "openai"
base_url = "{mock}"
[providers.slow]
kind = "openai"
base_url = "{slow_mock}"
[models.small]
provider = "mock"
upstream_model = "mock-small"
price = {{ input = 0.15, output = 0.6 }}
[models.large]
provider = "mock"
upstream_model = "mock-large"
price = {{ input = 2.5, output = 10.0 }}
[models.slow]
provider = "slow"
upstream_model = "mock-slow"
[tiers.small]
models = ["small"]
[tiers.large]
models = ["large"]
[routers.auto]
classifier = "embedded"
unknown_tier = "large"
[[routers.auto.rules]]
when = {{ label = ["chat", "knowledge", "writing", "extraction"] }}
tier = "small"
[[routers.auto.rules]]
tier = "large"
[routers.cached]
classifier = "embedded"
unknown_tier = "small"
[[routers.cached.rules]]
tier = "small"
[routers.cached.cache]
enabled = true
[cache]
enabled = true
max_bytes = 67108864
ttl = "10m"
[routers.auto.cache]
enabled = false
[keys.bench]
key_sha256 = "{}"
rpm = 100000000
tpm = 100000000000
max_parallel = 100000
budget = 1000000.0
[cache.models.small]
enabled = false
[cache.models.large]
enabled = false
"#,
        triage::auth::sha256_hex(KEY)
    )
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; ignore any arguments.
    let secs: f64 = std::env::var("LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let concs: Vec<usize> = std::env::var("LOAD_CONC")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 32, 256]);
    let dir = tempfile::tempdir().unwrap();
    let (mp, sp, tp) = (free_port(), free_port(), free_port());
    let mock_url = format!("http://127.0.0.1:{mp}/v1");
    let _mock = spawn(&[
        "mock-upstream",
        "--listen",
        &format!("127.0.0.1:{mp}"),
        "--reply-words",
        "24",
    ]);
    let _slow = spawn(&[
        "mock-upstream",
        "--listen",
        &format!("127.0.0.1:{sp}"),
        "--reply-words",
        "200",
        "--tokens-per-second",
        "10",
    ]);
    let cfg_path = dir.path().join("bench.toml");
    std::fs::write(
        &cfg_path,
        config(
            &mock_url,
            &format!("http://127.0.0.1:{sp}/v1"),
            &format!("127.0.0.1:{tp}"),
        ),
    )
    .unwrap();
    let triage = spawn(&["serve", "-c", cfg_path.to_str().unwrap()]);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    wait_up(&client, &format!("http://127.0.0.1:{mp}/v1/models")).await;
    wait_up(&client, &format!("http://127.0.0.1:{tp}/healthz")).await;
    let pid = triage.0.id();
    let idle_rss = rss_mb(pid);

    let direct = format!("{mock_url}/chat/completions");
    let through = format!("http://127.0.0.1:{tp}/v1/chat/completions");
    let msg = json!([{"role": "user", "content": "hi there, how are you today?"}]);
    let body =
        |model: &str, stream: bool| json!({"model": model, "messages": msg, "stream": stream});
    // Each scenario against the mock directly, then through triage.
    let pair = |name: &'static str, model: &str, stream: bool| {
        let direct_name = if stream { "direct sse" } else { "direct json" };
        (
            Scenario {
                name: direct_name,
                url: direct.clone(),
                body: body("mock-small", stream),
                auth: false,
                stream,
            },
            Scenario {
                name,
                url: through.clone(),
                body: body(model, stream),
                auth: true,
                stream,
            },
        )
    };
    let pairs: Vec<(Scenario, Scenario)> = vec![
        pair("passthrough json", "small", false),
        pair("auto json", "auto", false),
        pair("cache-hit json", "cached", false),
        pair("passthrough sse", "small", true),
        pair("auto sse", "auto", true),
    ];
    // Warm up connections and the cache entry.
    for (_, t) in &pairs {
        let _ = run(&client, t, 4, 0.3).await;
    }
    println!("triage load benchmark: {secs} s per cell, load generator on the same machine");
    println!(
        "{:<18} {:>5} | {:>9} {:>8} {:>8} {:>8} | {:>9} {:>8} {:>8} {:>8} | {:>9} {:>7} {:>6}",
        "scenario",
        "conc",
        "direct/s",
        "p50 ms",
        "p99 ms",
        "ttfb50",
        "triage/s",
        "p50 ms",
        "p99 ms",
        "ttfb50",
        "ovh p50",
        "ratio",
        "errors"
    );
    // LOAD_ONLY=sse runs only the scenarios whose name contains it.
    let only = std::env::var("LOAD_ONLY").unwrap_or_default();
    for (d, t) in pairs.iter().filter(|(_, t)| t.name.contains(only.as_str())) {
        for &c in &concs {
            let rd = run(&client, d, c, secs).await;
            let rt = run(&client, t, c, secs).await;
            println!(
                "{:<18} {:>5} | {:>9.0} {:>8.3} {:>8.3} {:>8.3} | {:>9.0} {:>8.3} {:>8.3} {:>8.3} | {:>7.3}ms {:>6.0}% {:>6}",
                t.name, c, rd.rps, rd.p50, rd.p99, rd.ttfb50, rt.rps, rt.p50, rt.p99, rt.ttfb50,
                rt.p50 - rd.p50, 100.0 * rt.rps / rd.rps.max(1e-9), rd.errors + rt.errors
            );
        }
    }

    // Memory with 1,000 open streams against a slow upstream.
    let after_load = rss_mb(pid);
    let n = 1000;
    let slow_client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut handles = Vec::new();
    for _ in 0..n {
        let c = slow_client.clone();
        let url = through.clone();
        let opened = opened.clone();
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            let r = c.post(&url).bearer_auth(KEY).json(&json!({"model": "slow", "messages": [{"role": "user", "content": "tell me a long story"}], "stream": true})).send().await;
            if let Ok(r) = r {
                let mut s = r.bytes_stream();
                if s.next().await.is_some() {
                    opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                stop.notified().await;
                drop(s);
            }
        }));
    }
    let t0 = Instant::now();
    while opened.load(std::sync::atomic::Ordering::SeqCst) < n
        && t0.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let streams_rss = rss_mb(pid);
    let open_now = opened.load(std::sync::atomic::Ordering::SeqCst);
    stop.notify_waiters();
    for h in handles {
        h.abort();
    }
    println!();
    println!("triage resident memory: idle {idle_rss:.1} MB, after load {after_load:.1} MB, with {open_now} open streams {streams_rss:.1} MB");
}
