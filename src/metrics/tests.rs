use super::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

const DASHBOARD: &str = include_str!("../../config/grafana/triage-dashboard.json");
const PROMETHEUS_YML: &str = include_str!("../../config/prometheus.yml");

fn known() -> KnownNames {
    KnownNames {
        keys: vec!["alice".into(), "bob".into()],
        models: vec!["gpt-4o-mini".into(), "claude-sonnet".into()],
        routers: vec!["default".into()],
        tiers: vec!["cheap".into(), "strong".into()],
        labels: vec!["code".into(), "chat".into()],
    }
}

fn metrics() -> Metrics {
    match Metrics::with_known(&known()) {
        Ok(m) => m,
        Err(e) => panic!("metrics: {e}"),
    }
}

fn req<'a>() -> RequestRecord<'a> {
    RequestRecord {
        router: "default",
        label: "code",
        tier: "cheap",
        model: "gpt-4o-mini",
        key: "alice",
        status: 200,
        cache: CacheOutcome::Miss,
        stream: false,
        duration: Duration::from_millis(5),
        upstream_wait: Duration::from_millis(4),
        ttft: None,
    }
}

fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    sum_samples(&parse_text(&m.render()), name, labels)
}

#[test]
fn request_counter_has_exact_labels() {
    let m = metrics();
    m.record_request(&req());
    m.record_request(&req());
    m.record_request(&RequestRecord {
        status: 503,
        ..req()
    });
    let samples = parse_text(&m.render());
    let want: BTreeMap<String, String> = [
        ("router", "default"),
        ("label", "code"),
        ("tier", "cheap"),
        ("model", "gpt-4o-mini"),
        ("key", "alice"),
        ("status_class", "2xx"),
        ("cache", "miss"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = samples
        .iter()
        .find(|s| s.name == "triage_requests_total" && s.labels == want);
    assert_eq!(s.map(|s| s.value), Some(2.0));
    assert_eq!(
        sum_samples(
            &samples,
            "triage_requests_total",
            &[("status_class", "5xx")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sum_samples(
            &samples,
            "triage_request_duration_seconds_count",
            &[("stream", "false"), ("tier", "cheap")]
        ),
        Some(3.0)
    );
}

#[test]
fn unconfigured_names_become_other_and_secrets_never_appear() {
    let m = metrics();
    let secret = "sk-live-0123456789abcdefghijklmnop";
    m.record_request(&RequestRecord {
        router: "rogue",
        label: "poetry",
        tier: "",
        model: "gpt-9",
        key: secret,
        cache: CacheOutcome::Hit,
        ..req()
    });
    m.record_refusal(secret, LimitKind::Rpm);
    let text = m.render();
    assert!(!text.contains(secret));
    let s = parse_text(&text);
    assert_eq!(
        sum_samples(
            &s,
            "triage_requests_total",
            &[
                ("router", "other"),
                ("label", "other"),
                ("tier", "none"),
                ("model", "other"),
                ("key", "other"),
                ("cache", "hit"),
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        sum_samples(
            &s,
            "triage_limit_refusals_total",
            &[("key", "other"), ("kind", "rpm")]
        ),
        Some(1.0)
    );
}

#[test]
fn set_known_swaps_allowed_names_at_runtime() {
    let m = metrics();
    m.record_retry("new-model");
    let mut k = known();
    k.models.push("new-model".into());
    m.set_known(&k);
    m.record_retry("new-model");
    m.record_retry("new-model");
    assert_eq!(
        value(&m, "triage_retries_total", &[("model", "other")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "triage_retries_total", &[("model", "new-model")]),
        Some(2.0)
    );
}

#[test]
fn usage_cost_is_exact_in_nanos_and_converted_to_usd() {
    let m = metrics();
    let u = UsageRecord {
        key: "alice",
        model: "gpt-4o-mini",
        tier: "cheap",
        prompt_tokens: 1200,
        completion_tokens: 300,
        cached_tokens: 1000,
        cost_nanos: 123_456_789,
    };
    m.record_usage(&u);
    m.record_usage(&UsageRecord { cost_nanos: 1, ..u });
    let s = parse_text(&m.render());
    let labels = [
        ("key", "alice"),
        ("model", "gpt-4o-mini"),
        ("tier", "cheap"),
    ];
    assert_eq!(
        sum_samples(&s, "triage_cost_nanodollars_total", &labels),
        Some(123_456_790.0)
    );
    let usd = sum_samples(&s, "triage_cost_usd_total", &labels).unwrap_or(f64::NAN);
    assert!((usd - 0.12345679).abs() < 1e-12, "usd = {usd}");
    for (dir, n) in [
        ("prompt", 2400.0),
        ("completion", 600.0),
        ("cached", 2000.0),
    ] {
        assert_eq!(
            sum_samples(
                &s,
                "triage_tokens_total",
                &[("key", "alice"), ("direction", dir)]
            ),
            Some(n),
            "{dir}"
        );
    }
}

#[test]
fn budget_gauges_skip_unknown_keys_and_allow_overspend() {
    let m = metrics();
    m.set_budget_remaining("alice", -2_500_000_000);
    m.set_period_spend("alice", 12_500_000_000);
    m.set_budget_remaining("mallory", 5);
    let s = parse_text(&m.render());
    assert_eq!(
        sum_samples(&s, "triage_budget_remaining_usd", &[("key", "alice")]),
        Some(-2.5)
    );
    assert_eq!(
        sum_samples(&s, "triage_period_spend_usd", &[("key", "alice")]),
        Some(12.5)
    );
    assert_eq!(
        sum_samples(&s, "triage_budget_remaining_usd", &[("key", "other")]),
        None
    );
    assert_eq!(
        sum_samples(&s, "triage_budget_remaining_usd", &[("key", "mallory")]),
        None
    );
}

#[test]
fn overhead_excludes_upstream_wait_and_ttft_only_when_given() {
    let m = metrics();
    m.record_request(&req());
    m.record_request(&RequestRecord {
        stream: true,
        ttft: Some(Duration::from_millis(300)),
        upstream_wait: Duration::from_secs(10), // longer than total: saturates to zero
        ..req()
    });
    let s = parse_text(&m.render());
    let router = [("router", "default")];
    assert_eq!(
        sum_samples(&s, "triage_gateway_overhead_seconds_sum", &router),
        Some(0.001)
    );
    assert_eq!(
        sum_samples(&s, "triage_gateway_overhead_seconds_count", &router),
        Some(2.0)
    );
    assert_eq!(
        sum_samples(
            &s,
            "triage_gateway_overhead_seconds_bucket",
            &[("router", "default"), ("le", "0.001")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sum_samples(
            &s,
            "triage_time_to_first_token_seconds_count",
            &[("model", "gpt-4o-mini")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sum_samples(
            &s,
            "triage_time_to_first_token_seconds_bucket",
            &[("le", "0.25")]
        ),
        Some(0.0)
    );
}

#[test]
fn classification_upstream_vote_cache_session_recorders() {
    let m = metrics();
    let d = Duration::from_micros(40);
    m.record_classification("default", "keyword", "code", d, None);
    m.record_classification(
        "default",
        "llm",
        "unknown",
        d,
        Some(UnknownReason::LowConfidence),
    );
    m.record_classification("default", "llm", "", d, Some(UnknownReason::Failure));
    m.record_upstream("claude-sonnet", Duration::from_secs(2), UpstreamOutcome::Ok);
    m.record_upstream(
        "claude-sonnet",
        Duration::from_secs(30),
        UpstreamOutcome::Error(UpstreamErrorKind::Timeout),
    );
    m.record_upstream_error("claude-sonnet", UpstreamErrorKind::Protocol);
    m.record_fallback("claude-sonnet", "gpt-4o-mini");
    m.record_cooldown("claude-sonnet");
    m.set_deployment_healthy("gpt-4o-mini", true);
    m.record_vote("default", "majority", 2.0 / 3.0, 1);
    m.record_vote("default", "majority", 7.0, 0);
    m.record_vote("default", "majority", f64::NAN, 2);
    m.record_cascade_escalation("default", "confidence");
    m.record_cache_lookup("exact", true);
    m.record_cache_lookup("exact", false);
    m.record_cache_lookup("exact", false);
    m.record_cache_evictions("exact", 4);
    m.set_cache_bytes("exact", 4096);
    m.set_sessions_active(3);
    m.record_session_limit("turns");
    m.record_loop_detected("block");

    let s = parse_text(&m.render());
    let v = |name: &str, l: &[(&str, &str)]| sum_samples(&s, name, l);
    assert_eq!(
        v("triage_classifier_labels_total", &[("label", "unknown")]),
        Some(1.0)
    );
    assert_eq!(
        v("triage_classifier_labels_total", &[("label", "none")]),
        Some(1.0)
    );
    assert_eq!(
        v(
            "triage_classifier_unknown_total",
            &[("router", "default"), ("reason", "low_confidence")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v("triage_classifier_unknown_total", &[("reason", "failure")]),
        Some(1.0)
    );
    assert_eq!(
        v(
            "triage_classifier_duration_seconds_count",
            &[("classifier", "llm")]
        ),
        Some(2.0)
    );
    assert_eq!(
        v(
            "triage_upstream_duration_seconds_count",
            &[("model", "claude-sonnet"), ("outcome", "error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "triage_upstream_errors_total",
            &[("model", "claude-sonnet")]
        ),
        Some(2.0)
    );
    assert_eq!(
        v(
            "triage_fallbacks_total",
            &[("from_model", "claude-sonnet"), ("to_model", "gpt-4o-mini")]
        ),
        Some(1.0)
    );
    assert_eq!(v("triage_deployment_cooldowns_total", &[]), Some(1.0));
    assert_eq!(
        v("triage_deployment_healthy", &[("model", "claude-sonnet")]),
        Some(0.0)
    );
    assert_eq!(
        v("triage_deployment_healthy", &[("model", "gpt-4o-mini")]),
        Some(1.0)
    );
    // NaN agreement is not observed; 7.0 is clamped into the 1.0 bucket.
    assert_eq!(v("triage_vote_agreement_ratio_count", &[]), Some(2.0));
    assert_eq!(
        v("triage_vote_agreement_ratio_bucket", &[("le", "0.6")]),
        Some(0.0)
    );
    assert_eq!(
        v("triage_vote_agreement_ratio_bucket", &[("le", "0.7")]),
        Some(1.0)
    );
    assert_eq!(
        v("triage_vote_agreement_ratio_bucket", &[("le", "1")]),
        Some(2.0)
    );
    assert_eq!(v("triage_vote_cancelled_total", &[]), Some(3.0));
    assert_eq!(
        v(
            "triage_cascade_escalations_total",
            &[("router", "default"), ("gate", "confidence")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v("triage_cache_hits_total", &[("cache", "exact")]),
        Some(1.0)
    );
    assert_eq!(
        v("triage_cache_misses_total", &[("cache", "exact")]),
        Some(2.0)
    );
    assert_eq!(v("triage_cache_evictions_total", &[]), Some(4.0));
    assert_eq!(v("triage_cache_bytes", &[("cache", "exact")]), Some(4096.0));
    assert_eq!(v("triage_sessions_active", &[]), Some(3.0));
    assert_eq!(
        v("triage_session_limits_total", &[("kind", "turns")]),
        Some(1.0)
    );
    assert_eq!(
        v("triage_loops_detected_total", &[("action", "block")]),
        Some(1.0)
    );
}

#[test]
fn inflight_guard_decrements_on_drop() {
    let m = metrics();
    let a = m.inflight();
    let b = m.inflight();
    assert_eq!(value(&m, "triage_inflight_requests", &[]), Some(2.0));
    drop(a);
    assert_eq!(value(&m, "triage_inflight_requests", &[]), Some(1.0));
    drop(b);
    assert_eq!(value(&m, "triage_inflight_requests", &[]), Some(0.0));
}

#[test]
fn instances_have_independent_registries() {
    let a = metrics();
    let b = metrics();
    a.record_retry("gpt-4o-mini");
    assert_eq!(value(&a, "triage_retries_total", &[]), Some(1.0));
    assert_eq!(value(&b, "triage_retries_total", &[]), None);
}

#[test]
fn status_classes() {
    assert_eq!(status_class(200), "2xx");
    assert_eq!(status_class(204), "2xx");
    assert_eq!(status_class(429), "4xx");
    assert_eq!(status_class(599), "5xx");
    assert_eq!(status_class(0), "other");
    assert_eq!(status_class(999), "other");
}

#[test]
fn family_names_follow_conventions() {
    let m = metrics();
    let names = metric_family_names(&m);
    for required in [
        "triage_requests_total",
        "triage_request_duration_seconds",
        "triage_time_to_first_token_seconds",
        "triage_upstream_duration_seconds",
        "triage_gateway_overhead_seconds",
        "triage_tokens_total",
        "triage_cost_usd_total",
        "triage_cost_nanodollars_total",
        "triage_budget_remaining_usd",
        "triage_period_spend_usd",
        "triage_limit_refusals_total",
        "triage_classifier_duration_seconds",
        "triage_classifier_labels_total",
        "triage_classifier_unknown_total",
        "triage_fallbacks_total",
        "triage_retries_total",
        "triage_deployment_cooldowns_total",
        "triage_deployment_healthy",
        "triage_vote_agreement_ratio",
        "triage_vote_cancelled_total",
        "triage_cascade_escalations_total",
        "triage_cache_hits_total",
        "triage_cache_misses_total",
        "triage_cache_bytes",
        "triage_cache_evictions_total",
        "triage_sessions_active",
        "triage_session_limits_total",
        "triage_loops_detected_total",
        "triage_upstream_errors_total",
        "triage_inflight_requests",
    ] {
        assert!(names.contains(required), "missing {required}");
    }
    for f in m.families() {
        assert!(f.name.starts_with("triage_"), "{}", f.name);
        match f.kind {
            MetricKind::Counter => assert!(f.name.ends_with("_total"), "{}", f.name),
            MetricKind::Histogram => assert!(
                f.name.ends_with("_seconds") || f.name.ends_with("_ratio"),
                "{}",
                f.name
            ),
            MetricKind::Gauge => assert!(!f.name.ends_with("_total"), "{}", f.name),
        }
    }
    // Families with no samples yet are still listed (gather() would hide them).
    let rendered: BTreeSet<String> = parse_text(&m.render())
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(!rendered.contains("triage_requests_total"));
}

#[test]
fn render_has_type_lines_and_content_type() {
    let m = metrics();
    m.record_request(&req());
    let text = m.render();
    assert!(text.contains("# TYPE triage_requests_total counter"));
    assert!(text.contains("# TYPE triage_request_duration_seconds histogram"));
    assert!(CONTENT_TYPE.starts_with("text/plain"));
}

// ---- dashboard checks ----

fn collect_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match (k.as_str(), child) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => collect_queries(child, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| collect_queries(c, out)),
        _ => {}
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// `(metric name, label names in its selector)` for every `triage_*` reference.
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (i == 0 || !is_ident(bytes[i - 1]))
            && bytes[i..].iter().collect::<String>().starts_with("triage_");
        if !starts {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        let name: String = bytes[start..i].iter().collect();
        let mut labels = Vec::new();
        if bytes.get(i) == Some(&'{') {
            let close = bytes[i..].iter().position(|c| *c == '}').map(|p| p + i);
            let inner: String = bytes[i + 1..close.unwrap_or(bytes.len())].iter().collect();
            for matcher in inner.split(',') {
                let lname: String = matcher
                    .trim()
                    .chars()
                    .take_while(|c| is_ident(*c))
                    .collect();
                if !lname.is_empty() {
                    labels.push(lname);
                }
            }
            i = close.unwrap_or(bytes.len());
        }
        out.push((name, labels));
    }
    out
}

/// Label names in every `by (...)` / `without (...)` clause.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for kw in ["by", "without"] {
        let mut rest = expr;
        while let Some(p) = rest.find(kw) {
            let before_ok = p == 0 || !rest[..p].chars().next_back().is_some_and(is_ident);
            let after = rest[p + kw.len()..].trim_start();
            if before_ok && after.starts_with('(') {
                if let Some(end) = after.find(')') {
                    out.extend(
                        after[1..end]
                            .split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty()),
                    );
                }
            }
            rest = &rest[p + kw.len()..];
        }
    }
    out
}

#[test]
fn dashboard_only_references_registered_series_and_labels() {
    let m = metrics();
    let mut series: HashMap<String, (MetricKind, BTreeSet<String>)> = HashMap::new();
    for f in m.families() {
        for s in f.series_names() {
            let mut labels: BTreeSet<String> = f.labels.iter().cloned().collect();
            if s.ends_with("_bucket") && f.kind == MetricKind::Histogram {
                labels.insert("le".into());
            }
            series.insert(s, (f.kind, labels));
        }
    }

    let dash: Value = match serde_json::from_str(DASHBOARD) {
        Ok(v) => v,
        Err(e) => panic!("dashboard json: {e}"),
    };
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    assert!(!dash["uid"].as_str().unwrap_or("").is_empty());
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "needs a DS_PROMETHEUS datasource variable"
    );

    let panels = dash["panels"].as_array().cloned().unwrap_or_default();
    let mut ids = BTreeSet::new();
    let mut targets = 0;
    for p in &panels {
        let id = p["id"].as_u64().unwrap_or(0);
        assert!(ids.insert(id), "duplicate panel id {id}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        for t in p["targets"].as_array().cloned().unwrap_or_default() {
            targets += 1;
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(
                expr.contains("triage_"),
                "panel {} has a target without a triage metric",
                p["title"]
            );
        }
    }
    assert!(targets >= 20, "only {targets} targets");

    let mut queries = Vec::new();
    collect_queries(&dash, &mut queries);
    let mut referenced = BTreeSet::new();
    for q in &queries {
        let sels = selectors(q);
        let mut expr_labels = BTreeSet::new();
        for (name, labels) in &sels {
            let Some((_, allowed)) = series.get(name) else {
                panic!("`{q}` references unregistered series {name}");
            };
            for l in labels {
                assert!(allowed.contains(l), "`{q}`: {name} has no label {l}");
            }
            expr_labels.extend(allowed.iter().cloned());
            referenced.insert(name.clone());
        }
        if !sels.is_empty() {
            for l in grouping_labels(q) {
                assert!(
                    expr_labels.contains(&l),
                    "`{q}` groups by unknown label {l}"
                );
            }
        }
    }
    for must in [
        "triage_cost_usd_total",
        "triage_requests_total",
        "triage_request_duration_seconds_bucket",
        "triage_gateway_overhead_seconds_bucket",
        "triage_cache_hits_total",
        "triage_limit_refusals_total",
        "triage_classifier_unknown_total",
        "triage_vote_agreement_ratio_bucket",
        "triage_cascade_escalations_total",
    ] {
        assert!(referenced.contains(must), "dashboard lacks {must}");
    }
}

#[test]
fn selector_extraction_handles_suffixes_and_matchers() {
    let s = selectors(
        r#"histogram_quantile(0.99, sum by (le) (rate(triage_x_bucket{a=~"$a", b!="x"}[5m]))) / xtriage_no"#,
    );
    assert_eq!(
        s,
        vec![("triage_x_bucket".to_string(), vec!["a".into(), "b".into()])]
    );
    assert_eq!(
        grouping_labels("sum by (le, tier) (x) + sum without(model) (y) + standby(z)"),
        vec!["le", "tier", "model"]
    );
}

#[test]
fn prometheus_example_scrapes_the_gateway() {
    assert!(PROMETHEUS_YML.contains("scrape_configs:"));
    // The private metrics listener, and the API port as the token alternative.
    assert!(PROMETHEUS_YML.contains("127.0.0.1:9464"));
    assert!(PROMETHEUS_YML.contains("metrics_path: /metrics"));
    assert!(PROMETHEUS_YML.contains("127.0.0.1:8080"));
}

/// Hot-path cost; run with `cargo test --release -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_record_request() {
    let m = metrics();
    let n = 200_000u32;
    let start = std::time::Instant::now();
    for _ in 0..n {
        m.record_request(&req());
    }
    let per = start.elapsed() / n;
    let start = std::time::Instant::now();
    for _ in 0..n {
        m.record_usage(&UsageRecord {
            key: "alice",
            model: "gpt-4o-mini",
            tier: "cheap",
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_tokens: 0,
            cost_nanos: 7,
        });
    }
    let per_usage = start.elapsed() / n;
    let start = std::time::Instant::now();
    let text = m.render();
    println!(
        "record_request {per:?}/op, record_usage {per_usage:?}/op, render {:?} ({} bytes)",
        start.elapsed(),
        text.len()
    );
}
