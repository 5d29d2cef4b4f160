//! What clients see when something goes wrong: stable reason codes without
//! provider internals, `x-triage-route` on failures, `Retry-After` where
//! waiting helps, and the `unknown` label below `min_confidence`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Everything the gateway logs in this test binary (plain text, no colour).
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A port on 127.0.0.1 with nothing listening.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn post(
    gw: &triage::server::Gateway,
    request_id: &str,
    body: Value,
) -> (u16, reqwest::header::HeaderMap, String) {
    let r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .header("x-request-id", request_id)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
}

#[tokio::test]
async fn unreachable_provider_is_a_502_without_its_address_and_the_detail_is_logged() {
    let log = captured_log();
    let port = dead_port();
    let up = MockUpstream::echo().await;
    let extra = format!(
        r#"
[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
[models.gone]
provider = "dead"
upstream_model = "gone-upstream"
price = {{ input = 1.0, output = 2.0 }}
max_output_tokens = 100
"#
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let (s, h, b) = post(
        &gw,
        "req-unreachable-1",
        json!({"model": "gone", "messages": user("hi")}),
    )
    .await;
    assert_eq!(s, 502, "{b}");
    let addr = format!("127.0.0.1:{port}");
    for leak in [addr.as_str(), "os error", "Connection refused", "http://"] {
        assert!(!b.contains(leak), "body leaks {leak:?}: {b}");
    }
    let e: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(e["error"]["code"], "upstream_unreachable");
    assert_eq!(e["error"]["type"], "api_error");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("`gone`"),
        "{b}"
    );
    // The attempt is in the route header, as on success.
    let route = header(&h, "x-triage-route");
    assert!(route.contains("fallback_from=gone"), "{route}");
    assert!(route.starts_with("api=chat; "), "{route}");
    // The operator's log has the detail, under the request id.
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("req-unreachable-1") && l.contains(&addr)),
        "no log line with the request id and the provider address:\n{text}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn cooling_deployments_give_503_with_retry_after_and_the_route() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "fast-upstream" {
            Reply::RetryAfter(503, 20)
        } else {
            Reply::Echo
        }
    })
    .await;
    let gw = start_gateway(&config(&up.url, "")).await;
    // The provider asks for 20 s: the deployment cools down that long.
    let (s, h, b) = post(&gw, "r1", json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["code"],
        "upstream_error"
    );
    assert!(header(&h, "x-triage-route").contains("fallback_from=fast"));

    let (s, h, b) = post(&gw, "r2", json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["code"],
        "no_healthy_deployment"
    );
    let secs: u64 = header(&h, "retry-after").parse().unwrap();
    assert!((1..=20).contains(&secs), "retry-after {secs}");
    let route = header(&h, "x-triage-route");
    assert!(route.contains("cooling=fast"), "{route}");
    assert!(!route.contains("fallback_from"), "{route}");
    assert_eq!(up.calls_for("fast-upstream"), 1, "no call while cooling");
    gw.shutdown().await;
}

#[tokio::test]
async fn budget_refusal_says_when_the_period_resets() {
    let up = MockUpstream::echo().await;
    // A budget smaller than any reservation: the first request is refused.
    let gw = start_gateway(&config(
        &up.url,
        "budget = 0.000000001\nperiod = \"daily\"\n",
    ))
    .await;
    let (s, h, b) = post(&gw, "r1", json!({"model": "smart", "messages": user("hi")})).await;
    assert_eq!(s, 429, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["code"],
        "insufficient_quota"
    );
    let secs: u64 = header(&h, "retry-after").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    assert!(
        secs.abs_diff(to_midnight) <= 2,
        "retry-after {secs}, seconds to UTC midnight {to_midnight}"
    );
    assert_eq!(h.get_all("retry-after").iter().count(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn below_min_confidence_the_label_is_unknown_everywhere() {
    let up = MockUpstream::echo().await;
    let extra = r#"
[classifiers.support.examples]
billing = ["I was charged twice, refund me", "my invoice is wrong", "cancel my subscription and refund"]
bug = ["the app crashes when I save", "error message on login", "the page is blank after update"]
[routers.strict]
classifier = "support"
min_confidence = 0.99
unknown_tier = "large"
[[routers.strict.rules]]
tier = "small"
"#;
    let gw = start_gateway(&config(&up.url, extra)).await;
    let (s, h, b) = post(
        &gw,
        "r1",
        // Half billing, half bug: neither label is sure.
        json!({"model": "strict", "messages": user("refund my invoice, the app crashes")}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let route = header(&h, "x-triage-route");
    assert!(
        route.contains("label=unknown; top=bug; confidence=")
            || route.contains("label=unknown; top=billing; confidence="),
        "{route}"
    );
    assert!(route.contains("reason=unknown:low_confidence"), "{route}");
    assert!(route.contains("tier=large"), "{route}");

    // Metrics agree: the classification and the request count under `unknown`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(triage::server::serve_metrics(gw.state.clone(), listener));
    let page = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    task.abort();
    let strict: Vec<&str> = page
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("router=\"strict\""))
        .filter(|l| l.contains("label=\""))
        .collect();
    assert!(!strict.is_empty(), "{page}");
    for l in &strict {
        assert!(l.contains("label=\"unknown\""), "{l}");
    }
    gw.shutdown().await;
}
