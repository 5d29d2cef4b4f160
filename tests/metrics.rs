//! `GET /metrics` end to end: known traffic in, exact Prometheus values out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use triage::metrics::{parse_text, sum_samples, Sample};
use triage::server::Gateway;

/// Fetches and parses the page (no credentials: the private listener is open).
async fn scrape_at(base: &str) -> (String, Vec<Sample>) {
    let r = http().get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "content-type {ct}");
    let text = r.text().await.unwrap();
    let samples = parse_text(&text);
    (text, samples)
}

/// Scrapes through a private metrics listener (the API listener serves
/// /metrics only when the config opens it).
async fn scrape(gw: &Gateway) -> (String, Vec<Sample>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(triage::server::serve_metrics(gw.state.clone(), listener));
    let page = scrape_at(&format!("http://{addr}")).await;
    task.abort();
    page
}

/// Sum of matching samples, 0 if none.
fn val(s: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    sum_samples(s, name, labels).unwrap_or(0.0)
}

/// Scrapes until `requests_total` reaches `n` (streams are metered when they end).
async fn scrape_when_requests(gw: &Gateway, n: f64) -> Vec<Sample> {
    for _ in 0..200 {
        let (_, s) = scrape(gw).await;
        if val(&s, "triage_requests_total", &[]) >= n {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (text, _) = scrape(gw).await;
    panic!("requests_total never reached {n}:\n{text}");
}

/// Nano-dollars of one call, per the pricing rule: per-million prices, rounded up per call.
fn cost(prompt: u64, completion: u64, in_per_mtok: u64, out_per_mtok: u64) -> u64 {
    (prompt * in_per_mtok + completion * out_per_mtok).div_ceil(1_000_000)
}

const ODD_MODEL: &str = r#"
[models.odd]
provider = "up"
upstream_model = "odd-upstream"
price = { input = 0.123457, output = 0.765433 }
max_output_tokens = 100
"#;
const ODD_IN: u64 = 123_457_000;
const ODD_OUT: u64 = 765_433_000;
const FAST_IN: u64 = 1_000_000_000;
const FAST_OUT: u64 = 2_000_000_000;

#[tokio::test]
async fn requests_tokens_cost_and_histograms_are_exact() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, ODD_MODEL)).await;
    // The mock bills words + 1 prompt tokens and answers "echo: <text>".
    let calls: [(&str, &str, bool); 5] = [
        ("fast", "hello world", false),        // p 3, c 3
        ("fast", "one two three four", false), // p 5, c 5
        ("fast", "stream this now", true),     // p 4, c 4
        ("odd", "a b", false),                 // p 3, c 3
        ("odd", "a b c d e f g", false),       // p 8, c 8
    ];
    for (model, text, stream) in calls {
        let (status, _, body) = post_chat(
            &gw,
            json!({"model": model, "messages": user(text), "stream": stream}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let s = scrape_when_requests(&gw, 5.0).await;

    let app_ok = |model: &'static str| {
        [
            ("key", "app"),
            ("model", model),
            ("status_class", "2xx"),
            ("cache", "none"),
        ]
    };
    assert_eq!(val(&s, "triage_requests_total", &app_ok("fast")), 3.0);
    assert_eq!(val(&s, "triage_requests_total", &app_ok("odd")), 2.0);
    assert_eq!(val(&s, "triage_requests_total", &[]), 5.0);
    // A direct model request has no router, label or tier.
    assert_eq!(
        val(
            &s,
            "triage_requests_total",
            &[("router", "none"), ("label", "none"), ("tier", "none")]
        ),
        5.0
    );

    let tok = |model: &'static str, dir: &'static str| {
        val(
            &s,
            "triage_tokens_total",
            &[("key", "app"), ("model", model), ("direction", dir)],
        )
    };
    assert_eq!(tok("fast", "prompt"), 12.0);
    assert_eq!(tok("fast", "completion"), 12.0);
    assert_eq!(tok("fast", "cached"), 0.0);
    assert_eq!(tok("odd", "prompt"), 11.0);
    assert_eq!(tok("odd", "completion"), 11.0);

    let fast_nanos = cost(3, 3, FAST_IN, FAST_OUT)
        + cost(5, 5, FAST_IN, FAST_OUT)
        + cost(4, 4, FAST_IN, FAST_OUT);
    assert_eq!(fast_nanos, 36_000);
    let odd_nanos = cost(3, 3, ODD_IN, ODD_OUT) + cost(8, 8, ODD_IN, ODD_OUT);
    // Rounded up per call (2667 + 7112), not once over the sum (9778).
    assert_eq!(odd_nanos, 9_779);
    let nanos = |model: &'static str| {
        val(
            &s,
            "triage_cost_nanodollars_total",
            &[("key", "app"), ("model", model)],
        )
    };
    assert_eq!(nanos("fast"), fast_nanos as f64);
    assert_eq!(nanos("odd"), odd_nanos as f64);
    let usd = |model: &'static str| {
        val(
            &s,
            "triage_cost_usd_total",
            &[("key", "app"), ("model", model)],
        )
    };
    assert!(
        (usd("fast") - fast_nanos as f64 / 1e9).abs() < 1e-15,
        "usd {}",
        usd("fast")
    );
    assert!(
        (usd("odd") - odd_nanos as f64 / 1e9).abs() < 1e-15,
        "usd {}",
        usd("odd")
    );

    assert_eq!(val(&s, "triage_request_duration_seconds_count", &[]), 5.0);
    assert_eq!(
        val(
            &s,
            "triage_request_duration_seconds_count",
            &[("model", "fast")]
        ),
        3.0
    );
    assert_eq!(
        val(
            &s,
            "triage_request_duration_seconds_count",
            &[("stream", "true")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_request_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        5.0
    );
    assert!(val(&s, "triage_request_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(val(&s, "triage_gateway_overhead_seconds_count", &[]), 5.0);
    assert_eq!(
        val(
            &s,
            "triage_gateway_overhead_seconds_count",
            &[("router", "none")]
        ),
        5.0
    );
    // Only the stream has a time to first token.
    assert_eq!(
        val(&s, "triage_time_to_first_token_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_time_to_first_token_seconds_count",
            &[("model", "fast")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_upstream_duration_seconds_count",
            &[("outcome", "ok")]
        ),
        5.0
    );
    assert_eq!(
        val(
            &s,
            "triage_upstream_duration_seconds_count",
            &[("model", "odd")]
        ),
        2.0
    );
    assert_eq!(val(&s, "triage_inflight_requests", &[]), 0.0);
    assert_eq!(
        val(&s, "triage_deployment_healthy", &[("model", "fast")]),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_cache_hit_counts_as_a_request_but_costs_nothing() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        "[cache]\nenabled = true\nmax_bytes = 1000000\nttl = \"5m\"\n",
    ))
    .await;
    let body = json!({"model": "fast", "messages": user("cache me please")});
    let (status, h, _) = post_chat(&gw, body.clone()).await;
    assert_eq!(
        (status, h["x-triage-cache"].to_str().unwrap()),
        (200, "miss")
    );
    let (_, before) = scrape(&gw).await;
    let cost_before = val(&before, "triage_cost_nanodollars_total", &[]);
    let usd_before = val(&before, "triage_cost_usd_total", &[]);
    let tokens_before = val(&before, "triage_tokens_total", &[]);
    assert_eq!(cost_before, cost(4, 4, FAST_IN, FAST_OUT) as f64);
    assert_eq!(tokens_before, 8.0);

    let (status, h, _) = post_chat(&gw, body.clone()).await;
    assert_eq!(
        (status, h["x-triage-cache"].to_str().unwrap()),
        (200, "hit")
    );
    // The size gauge reads moka's eventually consistent weighted size.
    if let Some(c) = gw.state.cache.load().as_ref() {
        c.run_pending_tasks().await;
    }
    let (_, after) = scrape(&gw).await;
    assert_eq!(
        val(&after, "triage_cost_nanodollars_total", &[]),
        cost_before,
        "a hit costs nothing"
    );
    assert_eq!(val(&after, "triage_cost_usd_total", &[]), usd_before);
    assert_eq!(val(&after, "triage_tokens_total", &[]), tokens_before);
    assert_eq!(
        val(
            &after,
            "triage_requests_total",
            &[("key", "app"), ("cache", "hit")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &after,
            "triage_requests_total",
            &[("key", "app"), ("cache", "miss"), ("model", "fast")]
        ),
        1.0
    );
    assert_eq!(val(&after, "triage_requests_total", &[]), 2.0);
    assert_eq!(
        val(&after, "triage_cache_hits_total", &[("cache", "response")]),
        1.0
    );
    assert_eq!(
        val(
            &after,
            "triage_cache_misses_total",
            &[("cache", "response")]
        ),
        1.0
    );
    assert_eq!(
        val(&after, "triage_request_duration_seconds_count", &[]),
        2.0
    );
    assert!(val(&after, "triage_cache_bytes", &[("cache", "response")]) > 0.0);
    assert_eq!(up.calls(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn limit_refusals_are_counted_by_kind() {
    let up = MockUpstream::echo().await;
    // First lines of `extra` belong to `[keys.app]`.
    let gw = start_gateway(&config(&up.url, "rpm = 2\n")).await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let (status, _, _) = post_chat(
            &gw,
            json!({"model": "fast", "messages": user(&format!("request {i}"))}),
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 429]);
    let (_, s) = scrape(&gw).await;
    assert_eq!(
        val(
            &s,
            "triage_limit_refusals_total",
            &[("key", "app"), ("kind", "rpm")]
        ),
        1.0
    );
    assert_eq!(val(&s, "triage_limit_refusals_total", &[]), 1.0);
    assert_eq!(
        val(
            &s,
            "triage_requests_total",
            &[("key", "app"), ("status_class", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_requests_total",
            &[("key", "app"), ("status_class", "2xx")]
        ),
        2.0
    );
    // The refused request reached no upstream and cost nothing.
    assert_eq!(up.calls(), 2);
    assert_eq!(
        val(&s, "triage_tokens_total", &[("direction", "prompt")]),
        6.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn classifier_labels_and_routing_are_counted_per_router() {
    let up = MockUpstream::echo().await;
    let extra = r#"
[routers.auto]
classifier = "rules"
unknown_tier = "large"
[routers.auto.keywords]
code = ["(?i)\\brust\\b", "compile"]
chat = ["(?i)^hello"]
[[routers.auto.rules]]
when = { label = "code" }
tier = "large"
[[routers.auto.rules]]
when = { label = "chat" }
tier = "small"
"#;
    let gw = start_gateway(&config(&up.url, extra)).await;
    for text in [
        "write some Rust for me",
        "why does this not compile",
        "hello there",
        "what is the weather",
    ] {
        let (status, _, body) =
            post_chat(&gw, json!({"model": "auto", "messages": user(text)})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, s) = scrape(&gw).await;
    let label = |l: &'static str| {
        val(
            &s,
            "triage_classifier_labels_total",
            &[("router", "auto"), ("label", l)],
        )
    };
    assert_eq!(label("code"), 2.0);
    assert_eq!(label("chat"), 1.0);
    assert_eq!(label("unknown"), 1.0);
    assert_eq!(val(&s, "triage_classifier_labels_total", &[]), 4.0);
    assert_eq!(
        val(
            &s,
            "triage_classifier_duration_seconds_count",
            &[("classifier", "rules")]
        ),
        4.0
    );
    let req = |l: &'static str, tier: &'static str, model: &'static str| {
        val(
            &s,
            "triage_requests_total",
            &[
                ("router", "auto"),
                ("label", l),
                ("tier", tier),
                ("model", model),
                ("status_class", "2xx"),
            ],
        )
    };
    assert_eq!(req("code", "large", "smart"), 2.0);
    assert_eq!(req("chat", "small", "fast"), 1.0);
    assert_eq!(req("unknown", "large", "smart"), 1.0);
    assert_eq!(
        val(
            &s,
            "triage_gateway_overhead_seconds_count",
            &[("router", "auto")]
        ),
        4.0
    );
    assert_eq!(
        val(
            &s,
            "triage_request_duration_seconds_count",
            &[("router", "auto"), ("tier", "large")]
        ),
        3.0
    );
    // Cost is booked per tier too.
    assert_eq!(
        val(
            &s,
            "triage_cost_nanodollars_total",
            &[("model", "fast"), ("tier", "small")]
        ),
        cost(3, 3, FAST_IN, FAST_OUT) as f64
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn fallbacks_are_counted_when_a_deployment_fails() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "fast-upstream" {
            Reply::Status(500, json!({"error": {"message": "down"}}))
        } else {
            Reply::Echo
        }
    })
    .await;
    let extra = "[routers.r]\nclassifier = \"rules\"\nunknown_tier = \"small\"\n[[routers.r.rules]]\ntier = \"small\"\n";
    let gw = start_gateway(&config(&up.url, extra)).await;
    let (status, h, body) = post_chat(
        &gw,
        json!({"model": "r", "messages": user("please answer")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(h["x-triage-route"].to_str().unwrap().contains("fast2"));
    let (_, s) = scrape(&gw).await;
    assert_eq!(
        val(
            &s,
            "triage_fallbacks_total",
            &[("from_model", "fast"), ("to_model", "fast2")]
        ),
        1.0
    );
    assert_eq!(val(&s, "triage_fallbacks_total", &[]), 1.0);
    assert_eq!(
        val(
            &s,
            "triage_upstream_errors_total",
            &[("model", "fast"), ("kind", "server")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_upstream_duration_seconds_count",
            &[("model", "fast"), ("outcome", "error")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_upstream_duration_seconds_count",
            &[("model", "fast2"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_requests_total",
            &[
                ("router", "r"),
                ("tier", "small"),
                ("model", "fast2"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );
    // Only the deployment that answered is billed.
    assert_eq!(val(&s, "triage_tokens_total", &[("model", "fast")]), 0.0);
    assert_eq!(
        val(
            &s,
            "triage_tokens_total",
            &[("model", "fast2"), ("direction", "prompt")]
        ),
        3.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn label_values_are_bounded_and_secrets_never_appear() {
    let up = MockUpstream::echo().await;
    let secret_looking_name = "sk-this-key-name-looks-like-a-secret";
    let extra = format!(
        "[keys.\"{secret_looking_name}\"]\nkey_sha256 = \"{}\"\n",
        sha(KEY2)
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let bad_secret = "sk-live-DO-NOT-LEAK-0123456789abcdef";
    let model_name = "gpt-made-up-model-name";

    let (status, _, _) =
        post_chat_as(&gw, KEY2, json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(status, 200);
    let (status, _, _) = post_chat_as(
        &gw,
        bad_secret,
        json!({"model": "fast", "messages": user("hi")}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = post_chat(&gw, json!({"model": model_name, "messages": user("hi")})).await;
    assert_eq!(status, 404);
    let (status, _, _) = post_chat(&gw, json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(status, 200);

    let (text, s) = scrape(&gw).await;
    for needle in [
        KEY,
        KEY2,
        bad_secret,
        secret_looking_name,
        model_name,
        sha(KEY).as_str(),
        sha(KEY2).as_str(),
    ] {
        assert!(!text.contains(needle), "metrics page contains {needle:?}");
    }
    // The secret-looking key name is exported as "other".
    assert_eq!(
        val(
            &s,
            "triage_requests_total",
            &[("key", "other"), ("status_class", "2xx")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_requests_total",
            &[("key", "app"), ("status_class", "2xx")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_requests_total",
            &[("key", "app"), ("status_class", "4xx"), ("model", "none")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &s,
            "triage_tokens_total",
            &[("key", "other"), ("direction", "prompt")]
        ),
        2.0
    );
    let keys: BTreeSet<&str> = s
        .iter()
        .filter_map(|x| x.labels.get("key"))
        .map(String::as_str)
        .collect();
    assert!(
        keys.iter().all(|k| ["app", "other", "none"].contains(k)),
        "unbounded key labels {keys:?}"
    );
    let allowed_models = ["fast", "fast2", "smart", "other", "none"];
    for label in ["model", "from_model", "to_model"] {
        for x in s.iter().filter_map(|x| x.labels.get(label)) {
            assert!(
                allowed_models.contains(&x.as_str()),
                "unbounded {label} label {x:?}"
            );
        }
    }
    gw.shutdown().await;
}

/// Every string under an `expr` key, plus templating queries.
fn collect_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains("triage_") => out.push(s.clone()),
                    _ => collect_queries(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_queries(x, out)),
        _ => {}
    }
}

/// Metric names (`triage_*` identifiers) in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("triage_") {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test]
async fn dashboard_queries_only_use_registered_metrics() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let families = triage::metrics::metric_family_names(&gw.state.metrics);
    let dash: Value =
        serde_json::from_str(include_str!("../config/grafana/triage-dashboard.json")).unwrap();
    let mut exprs = Vec::new();
    collect_queries(&dash, &mut exprs);
    assert!(exprs.len() >= 20, "found only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "query uses no triage metric: {e}");
        for n in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| n.strip_suffix(suf).filter(|b| families.contains(*b)))
                .unwrap_or(&n)
                .to_string();
            assert!(
                families.contains(&base),
                "dashboard query uses unregistered metric {n}: {e}"
            );
            used.insert(base);
        }
    }
    // The headline families are on the dashboard.
    for f in [
        "triage_requests_total",
        "triage_cost_usd_total",
        "triage_request_duration_seconds",
        "triage_gateway_overhead_seconds",
    ] {
        assert!(used.contains(f), "dashboard does not chart {f}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_listen_serves_the_page_on_its_own_address() {
    let up = MockUpstream::echo().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gw = start_gateway(&config(
        &up.url,
        &format!("[metrics]\nlisten = \"{addr}\"\n"),
    ))
    .await;
    tokio::spawn(triage::server::serve_metrics(gw.state.clone(), listener));
    let (status, _, _) = post_chat(&gw, json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(status, 200);
    // Not on the main listener...
    let r = http()
        .get(format!("http://{}/metrics", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let text = r.text().await.unwrap();
    assert!(!text.contains("triage_requests_total"));
    // ...but on its own, with the same registry.
    let (_, s) = scrape_at(&format!("http://{addr}")).await;
    assert_eq!(
        val(
            &s,
            "triage_requests_total",
            &[("key", "app"), ("model", "fast")]
        ),
        1.0
    );
    // The metrics listener serves nothing else.
    let r = http()
        .get(format!("http://{addr}/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    gw.shutdown().await;

    let gw = start_gateway(&config(
        &up.url,
        "[metrics]\nenabled = false\npublic = true\n",
    ))
    .await;
    let r = http()
        .get(format!("http://{}/metrics", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        404,
        "metrics.enabled = false hides the page"
    );
    gw.shutdown().await;
}
