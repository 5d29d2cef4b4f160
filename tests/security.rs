//! Who may see and send what (issue #22), end to end: limits on every request
//! of every connection, /metrics exposure, failed-auth throttling, body
//! limits on every endpoint, and no secret in any log line or response.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Adds a line to the `[server]` table of a `common::config` text.
fn with_server(toml: &str, line: &str) -> String {
    toml.replacen("[server]\n", &format!("[server]\n{line}\n"), 1)
}

// ---------------------------------------------------------------- raw HTTP/1.1

/// One response read off a raw socket: status, lower-cased headers, body.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads exactly one content-length–framed response (all our responses are).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RawResponse> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

fn get_with_header(path: &str, header_bytes: usize) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nx-padding: {}\r\n\r\n",
        "a".repeat(header_bytes)
    )
    .into_bytes()
}

fn assert_431_envelope(r: &RawResponse) {
    assert_eq!(r.status, 431);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    let v = r.json();
    assert_eq!(v["error"]["code"], "request_header_fields_too_large");
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn header_limit_holds_on_fresh_and_kept_alive_connections() {
    let up = MockUpstream::echo().await;
    // Default max_header_bytes: 64 KiB.
    let gw = start_gateway(&config(&up.url, "")).await;

    // A fresh connection, 100 KB of header.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(&get_with_header("/v1/models", 100_000))
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf).await.expect("a response");
    assert_431_envelope(&r);

    // Kept alive: a normal request, then the same 100 KB header, then another
    // normal one; each request is judged on its own.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    for round in 0..3 {
        s.write_all(&get_with_header("/v1/models", 10))
            .await
            .unwrap();
        let ok = read_response(&mut s, &mut buf).await.expect("a response");
        assert_eq!(ok.status, 200, "round {round}");
        s.write_all(&get_with_header("/v1/models", 100_000))
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf)
            .await
            .expect("a 431, not a closed connection");
        assert_431_envelope(&r);
    }
    // Just under the limit still passes on the same connection.
    s.write_all(&get_with_header("/v1/models", 60_000))
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.unwrap().status, 200);

    // A head far past the transport cap is still refused (by hyper).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    let _ = s.write_all(&get_with_header("/v1/models", 2_000_000)).await;
    if let Some(r) = read_response(&mut s, &mut buf).await {
        assert_eq!(r.status, 431);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn header_read_timeout_holds_on_kept_alive_connections() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&with_server(
        &config(&up.url, ""),
        "header_read_timeout = \"300ms\"",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(&get_with_header("/healthz", 10)).await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.unwrap().status, 200);
    // Second request: half a head, then nothing.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed only after {:?}",
        started.elapsed()
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------- HTTP/2

fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

#[tokio::test]
async fn header_limit_holds_on_every_http2_stream() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let client = h2_client();
    let url = format!("{}/models", gw.base_url());
    for _ in 0..3 {
        let ok = client.get(&url).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(ok.version(), reqwest::Version::HTTP_2);
        assert_eq!(ok.status().as_u16(), 200);
        let big = client
            .get(&url)
            .bearer_auth(KEY)
            .header("x-padding", "a".repeat(100_000))
            .send()
            .await
            .unwrap();
        assert_eq!(big.version(), reqwest::Version::HTTP_2);
        assert_eq!(big.status().as_u16(), 431);
        let v: Value = big.json().await.unwrap();
        assert_eq!(v["error"]["code"], "request_header_fields_too_large");
    }
    gw.shutdown().await;
}

// ---------------------------------------------------------------- /metrics

async fn get(url: String, token: Option<&str>) -> (u16, String) {
    let mut req = http().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn metrics_are_not_served_on_the_api_port_by_default() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "team = \"blue\"\n[teams.blue]\n")).await;
    let (status, _, _) = post_chat(&gw, json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(status, 200);
    let metrics = format!("http://{}/metrics", gw.addr);
    let (status, body) = get(metrics.clone(), None).await;
    assert_eq!(status, 404);
    assert!(!body.contains("triage_"), "{body}");
    // A virtual key is not a metrics token.
    let (status, body) = get(metrics, Some(KEY)).await;
    assert_eq!(status, 404);
    assert!(!body.contains("triage_"));
    // Health endpoints stay open and name no tenant.
    for path in ["/healthz", "/readyz"] {
        let (status, body) = get(format!("http://{}{path}", gw.addr), None).await;
        assert_eq!(status, 200, "{path}");
        assert!(!body.contains("app") && !body.contains("blue"), "{body}");
    }
    assert!(gw.state.runtime.load().config.metrics.listen.is_some());
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_token_opens_the_api_port_and_public_opens_it_to_all() {
    const VAR: &str = "TRIAGE_SECURITY_TEST_METRICS_TOKEN";
    const TOKEN: &str = "metrics-token-5f1c2a";
    // SAFETY-free in edition 2021; only this test reads the variable.
    std::env::set_var(VAR, TOKEN);
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &format!("[metrics]\nlisten = \"off\"\ntoken_env = \"{VAR}\"\n"),
    ))
    .await;
    let (status, _, _) = post_chat(&gw, json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(status, 200);
    let url = format!("http://{}/metrics", gw.addr);
    let (status, body) = get(url.clone(), None).await;
    assert_eq!(status, 401, "no token");
    assert!(!body.contains("triage_requests_total"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_metrics_token");
    let (status, body) = get(url.clone(), Some("metrics-token-5f1c2b")).await;
    assert_eq!(status, 401, "wrong token");
    assert!(!body.contains("triage_requests_total"));
    let (status, body) = get(url.clone(), Some(KEY)).await;
    assert_eq!(status, 401, "a virtual key is not the token");
    assert!(!body.contains("triage_requests_total"));
    let (status, body) = get(url, Some(TOKEN)).await;
    assert_eq!(status, 200, "right token");
    assert!(body.contains("triage_requests_total"));
    gw.shutdown().await;

    let gw = start_gateway(&config(&up.url, "[metrics]\npublic = true\n")).await;
    let (status, body) = get(format!("http://{}/metrics", gw.addr), None).await;
    assert_eq!(status, 200, "public = true");
    assert!(body.contains("triage_"));
    gw.shutdown().await;

    // Both at once is ambiguous: refused at load.
    let both = config(
        &up.url,
        &format!("[metrics]\npublic = true\ntoken_env = \"{VAR}\"\n"),
    );
    let err = triage::config::Config::parse(&both, std::path::Path::new("."))
        .expect_err("public + token_env is an error");
    assert!(err.to_string().contains("metrics.public"), "{err}");
}

// ---------------------------------------------------------------- failed auth

#[tokio::test]
async fn failed_authentication_is_throttled_per_address() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        "[auth]\nmode = \"keys\"\nmax_failures_per_minute = 3\n",
    ))
    .await;
    let models = format!("{}/models", gw.base_url());
    let wrong = |i: usize| format!("sk-guess-{i}");
    for i in 0..3 {
        let r = http()
            .get(&models)
            .bearer_auth(wrong(i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "guess {i}");
    }
    // Over the limit: refused before the key is looked at, right key or not.
    for key in [wrong(9).as_str(), KEY] {
        let r = http().get(&models).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 429);
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "retry-after {retry}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "too_many_auth_failures");
    }
    // Open endpoints are unaffected.
    let (status, _) = get(format!("http://{}/healthz", gw.addr), None).await;
    assert_eq!(status, 200);
    // The counter, by reason (read on the private listener).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let maddr = listener.local_addr().unwrap();
    let task = tokio::spawn(triage::server::serve_metrics(gw.state.clone(), listener));
    let (_, page) = get(format!("http://{maddr}/metrics"), None).await;
    task.abort();
    let samples = triage::metrics::parse_text(&page);
    let n = |reason: &str| {
        triage::metrics::sum_samples(
            &samples,
            "triage_auth_failures_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(n("invalid"), 3.0);
    assert_eq!(n("too_many_failures"), 2.0);
    gw.shutdown().await;

    // 0 turns it off.
    let gw = start_gateway(&config(&up.url, "[auth]\nmax_failures_per_minute = 0\n")).await;
    let models = format!("{}/models", gw.base_url());
    for i in 0..40 {
        let r = http()
            .get(&models)
            .bearer_auth(wrong(i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    let r = http().get(&models).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    gw.shutdown().await;
}

// ---------------------------------------------------------------- body limit

/// A body the client streams without a Content-Length (chunked on HTTP/1.1).
fn chunked(total: usize) -> reqwest::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..total.div_ceil(1000))
        .map(|_| Ok(vec![b' '; 1000]))
        .collect();
    reqwest::Body::wrap_stream(futures::stream::iter(chunks))
}

#[tokio::test]
async fn body_limit_applies_to_every_endpoint_chunked_too() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&with_server(&config(&up.url, ""), "max_body_bytes = 4096")).await;
    let base = format!("http://{}", gw.addr);
    let endpoints = [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("GET", "/v1/triage/keys/self"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/messages"),
        ("GET", "/healthz"),
        ("POST", "/nowhere"),
    ];
    for (method, path) in endpoints {
        let m: reqwest::Method = method.parse().unwrap();
        for declared in [true, false] {
            let req = http()
                .request(m.clone(), format!("{base}{path}"))
                .bearer_auth(KEY)
                .header("content-type", "application/json");
            let req = if declared {
                req.body(vec![b' '; 10_000])
            } else {
                // hyper's client frames a GET's unsized body only if told to.
                req.header("transfer-encoding", "chunked")
                    .body(chunked(10_000))
            };
            let r = req.send().await.unwrap();
            assert_eq!(
                r.status().as_u16(),
                413,
                "{method} {path} declared={declared}"
            );
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "request_too_large");
        }
    }
    // Under the limit, chunked, is served.
    let body = serde_json::to_vec(&json!({"model": "fast", "messages": user("hi")})).unwrap();
    let r = http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(
            body.chunks(7)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    gw.shutdown().await;
}

// ---------------------------------------------------------------- secrets

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the real binary at trace level for our crate, sends requests with a
/// valid key (both headers, JSON and stream), invalid keys, a metrics token,
/// while it calls the upstream with a provider key; then greps everything it
/// wrote and every response for each secret.
#[tokio::test]
async fn secrets_never_appear_in_logs_or_responses() {
    const APP_KEY: &str = "sk-triage-secret-app-key-0a1b2c3d4e5f60718293";
    const PROVIDER_KEY: &str = "sk-provider-secret-9f8e7d6c5b4a39281706";
    const METRICS_TOKEN: &str = "metrics-secret-token-44c0ffee";
    const WRONG_KEY: &str = "sk-triage-wrong-guess-77aa88bb99cc00dd11ee";
    let up = MockUpstream::echo().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("triage.toml");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
log_format = "json"
log_level = "triage=trace,info"
[store]
kind = "memory"
[providers.up]
kind = "openai"
base_url = "{url}"
api_key_env = "TRIAGE_SEC_PROVIDER_KEY"
[models.fast]
provider = "up"
upstream_model = "fast-upstream"
price = {{ input = 1.0, output = 2.0 }}
[keys.app]
key_env = "TRIAGE_SEC_APP_KEY"
[metrics]
listen = "off"
token_env = "TRIAGE_SEC_METRICS_TOKEN"
"#,
        url = up.url
    );
    std::fs::write(&cfg, text).unwrap();
    let log_path = dir.path().join("triage.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .env("TRIAGE_SEC_PROVIDER_KEY", PROVIDER_KEY)
        .env("TRIAGE_SEC_APP_KEY", APP_KEY)
        .env("TRIAGE_SEC_METRICS_TOKEN", METRICS_TOKEN)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = http();
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen = String::new();
    if ready {
        let chat = json!({"model": "fast", "messages": user("hello")});
        let stream = json!({"model": "fast", "messages": user("hello"), "stream": true});
        let unknown = json!({"model": "nope", "messages": user("hello")});
        let reqs = vec![
            client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(APP_KEY)
                .json(&chat),
            client
                .post(format!("{base}/v1/chat/completions"))
                .header("x-api-key", APP_KEY)
                .json(&stream),
            client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(APP_KEY)
                .json(&unknown),
            client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(WRONG_KEY)
                .json(&chat),
            client
                .get(format!("{base}/v1/models"))
                .header("x-api-key", WRONG_KEY),
            client
                .get(format!("{base}/v1/triage/keys/self"))
                .bearer_auth(APP_KEY),
            client.get(format!("{base}/metrics")).bearer_auth(WRONG_KEY),
            client
                .get(format!("{base}/metrics"))
                .bearer_auth(METRICS_TOKEN),
        ];
        for req in reqs {
            let r = req.send().await.unwrap();
            seen.push_str(&format!("{} {:?}\n", r.status(), r.headers()));
            seen.push_str(&r.text().await.unwrap());
            seen.push('\n');
        }
    }
    // SIGTERM so the shutdown path logs too.
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(ready, "gateway did not start:\n{logs}");
    assert!(
        logs.contains("\"status\":200") || logs.contains("status=200"),
        "the access log was captured:\n{logs}"
    );
    // The upstream saw the provider key's request (so it was in use).
    assert!(up.calls() >= 2);
    for secret in [APP_KEY, PROVIDER_KEY, METRICS_TOKEN, WRONG_KEY] {
        assert!(!logs.contains(secret), "log contains {secret}:\n{logs}");
        assert!(
            !seen.contains(secret),
            "a response contains {secret}:\n{seen}"
        );
        // Nor its digest, which identifies it.
        let digest = sha(secret);
        assert!(!logs.contains(&digest), "log contains sha256({secret})");
        assert!(
            !seen.contains(&digest),
            "a response contains sha256({secret})"
        );
    }
}
