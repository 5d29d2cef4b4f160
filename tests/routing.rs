//! Classify + route end to end: rule conditions, unknown/low-confidence
//! handling, the three classifier kinds (rules, embedded, LLM), deployment
//! fallback within and across tiers, cooldown and recovery, and `triage check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use triage::classify::embedded::{EmbeddedClassifier, Example, TrainOptions};
use triage::server::Gateway;

// ---------------------------------------------------------------------------
// Helpers

/// POST a chat body with any key and extra request headers.
async fn post(
    gw: &Gateway,
    key: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut rb = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(key)
        .json(&body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.text().await.unwrap())
}

/// The `x-triage-route` header as key -> value.
fn route_of(h: &reqwest::header::HeaderMap) -> HashMap<String, String> {
    let v = h
        .get("x-triage-route")
        .unwrap_or_else(|| panic!("no x-triage-route header in {h:?}"))
        .to_str()
        .unwrap();
    v.split("; ")
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("bad route part {kv:?} in {v:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A successful routed chat: returns the parsed route header.
async fn routed(
    gw: &Gateway,
    key: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> HashMap<String, String> {
    let (status, h, text) = post(gw, key, headers, body.clone()).await;
    assert_eq!(status, 200, "request {body} failed: {text}");
    route_of(&h)
}

/// Shorthand: route of a one-message chat to `model` with the test key.
async fn route_text(gw: &Gateway, model: &str, text: &str) -> HashMap<String, String> {
    routed(
        gw,
        KEY,
        &[],
        json!({"model": model, "messages": user(text)}),
    )
    .await
}

fn r<'a>(route: &'a HashMap<String, String>, k: &str) -> &'a str {
    route
        .get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("route {route:?} has no {k}"))
}

/// A value from the Prometheus page: the first sample of `name` whose labels contain every `want`.
/// (Scraped on a private metrics listener: the API listener does not serve /metrics by default.)
async fn metric(gw: &Gateway, name: &str, want: &[&str]) -> Option<f64> {
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
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| want.iter().all(|w| l.contains(w)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

const MOCK_ERR: &str =
    r#"{"error": {"message": "down", "type": "server_error", "param": null, "code": null}}"#;

fn down(code: u16) -> Reply {
    Reply::Status(code, serde_json::from_str(MOCK_ERR).unwrap())
}

/// A script where the listed upstream models fail with 503 and the rest echo.
fn failing(
    models: &'static [&'static str],
) -> impl Fn(&Value, usize) -> Reply + Send + Sync + 'static {
    move |req, _| {
        let m = req["model"].as_str().unwrap_or("");
        if models.contains(&m) {
            down(503)
        } else {
            Reply::Echo
        }
    }
}

/// `[tiers.mid]` = fast2 alone, and a second key `other` (= KEY2).
fn extra_base() -> String {
    format!(
        r#"
[keys.other]
key_sha256 = "{}"
[tiers.mid]
models = ["fast2"]
"#,
        sha(KEY2)
    )
}

// ---------------------------------------------------------------------------
// Rules classifier: labels, first match, unknown

const LABEL_ROUTER: &str = r#"
[routers.auto]
classifier = "rules"
min_confidence = 0.5
unknown_tier = "large"
keywords = { code = ["\\bpython\\b", "rust"], math = ["\\d+\\s*[+*/-]\\s*\\d+"], chat = ["^(hi|hello)\\b"], writing = ["\\bpoem\\b"] }
[[routers.auto.rules]]
when = { label = "chat" }
tier = "small"
[[routers.auto.rules]]
when = { label = ["code", "math"] }
tier = "mid"
[[routers.auto.rules]]
when = { label = "code" }
tier = "small"
"#;

#[tokio::test]
async fn label_rules_first_match_and_unknown_label() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &format!("{}{LABEL_ROUTER}", extra_base()))).await;

    // One label.
    let rt = route_text(&gw, "auto", "hello, how are you?").await;
    assert_eq!(
        (
            r(&rt, "router"),
            r(&rt, "label"),
            r(&rt, "confidence"),
            r(&rt, "tier"),
            r(&rt, "model"),
            r(&rt, "reason")
        ),
        ("auto", "chat", "1.00", "small", "fast", "rule[0]")
    );
    assert_eq!(up.last_request()["model"], "fast-upstream");

    // A list of labels: both members match the same rule. Rule [2] also names
    // `code`, but rule [1] comes first and wins.
    let rt = route_text(&gw, "auto", "write a python script").await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "tier"),
            r(&rt, "model"),
            r(&rt, "reason")
        ),
        ("code", "mid", "fast2", "rule[1]")
    );
    let rt = route_text(&gw, "auto", "what is 12 * 7").await;
    assert_eq!(
        (r(&rt, "label"), r(&rt, "tier"), r(&rt, "reason")),
        ("math", "mid", "rule[1]")
    );

    // No keyword matches: label unknown -> unknown_tier.
    let rt = route_text(&gw, "auto", "tell me about the weather in Paris").await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "tier"),
            r(&rt, "model"),
            r(&rt, "reason")
        ),
        ("unknown", "large", "smart", "unknown:label")
    );
    // A known label that no rule covers also lands on unknown_tier.
    let rt = route_text(&gw, "auto", "a poem about the sea").await;
    assert_eq!(
        (r(&rt, "label"), r(&rt, "tier"), r(&rt, "reason")),
        ("writing", "large", "unknown:no_rule")
    );

    // The answer itself is the upstream's, untouched.
    let (_, _, body) = post_chat(
        &gw,
        json!({"model": "auto", "messages": user("hello again")}),
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello again");
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// Every request-feature condition

const FEATURE_ROUTER: &str = r#"
[routers.feat]
classifier = "rules"
unknown_tier = "large"
keywords = { chat = ["^hello"], code = ["python"] }
[[routers.feat.rules]]
when = { has_tools = true }
tier = "small"
[[routers.feat.rules]]
when = { has_images = true }
tier = "small"
[[routers.feat.rules]]
when = { json_response = true }
tier = "small"
[[routers.feat.rules]]
when = { min_prompt_tokens = 300 }
tier = "large"
[[routers.feat.rules]]
when = { min_turns = 3 }
tier = "large"
[[routers.feat.rules]]
when = { header = { name = "x-tier", value = "gold" } }
tier = "large"
[[routers.feat.rules]]
when = { key = "other" }
tier = "large"
[[routers.feat.rules]]
when = { label = ["chat"], max_prompt_tokens = 40, min_confidence = 0.6, has_tools = false, has_images = false, json_response = false, min_turns = 1, max_turns = 1 }
tier = "small"
[[routers.feat.rules]]
tier = "mid"
"#;

#[tokio::test]
async fn every_rule_condition_matches_and_misses() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(
        &up.url,
        &format!("{}{FEATURE_ROUTER}", extra_base()),
    ))
    .await;
    let reason = |rt: HashMap<String, String>| r(&rt, "reason").to_string();
    let plain = || json!({"model": "feat", "messages": user("hello there")});

    // The plain short single-turn chat passes every negative condition of rule [7].
    assert_eq!(reason(routed(&gw, KEY, &[], plain()).await), "rule[7]");

    // has_tools
    let mut b = plain();
    b["tools"] = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    assert_eq!(reason(routed(&gw, KEY, &[], b).await), "rule[0]");
    // has_images: an image_url content part.
    let b = json!({"model": "feat", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello, what is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]});
    assert_eq!(reason(routed(&gw, KEY, &[], b).await), "rule[1]");
    // Text-only content parts are not images.
    let b = json!({"model": "feat", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]});
    assert_eq!(reason(routed(&gw, KEY, &[], b).await), "rule[7]");
    // json_response: response_format json_object (json_schema too); "text" is not.
    let mut b = plain();
    b["response_format"] = json!({"type": "json_object"});
    assert_eq!(reason(routed(&gw, KEY, &[], b).await), "rule[2]");
    let mut b = plain();
    b["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}});
    assert_eq!(reason(routed(&gw, KEY, &[], b).await), "rule[2]");
    let mut b = plain();
    b["response_format"] = json!({"type": "text"});
    assert_eq!(reason(routed(&gw, KEY, &[], b).await), "rule[7]");

    // min_prompt_tokens: ~500 estimated tokens.
    let long = format!("hello {}", "lorem ipsum ".repeat(170));
    assert_eq!(reason(route_text(&gw, "feat", &long).await), "rule[3]");
    // Between max (40) and min (300): neither rule [3] nor rule [7].
    let medium = format!("hello {}", "lorem ipsum ".repeat(30));
    assert_eq!(reason(route_text(&gw, "feat", &medium).await), "rule[8]");

    // min_turns / max_turns count user messages.
    let conv = |n: usize| {
        let mut ms = Vec::new();
        for i in 0..n {
            if i > 0 {
                ms.push(json!({"role": "assistant", "content": "ok"}));
            }
            ms.push(json!({"role": "user", "content": "hello"}));
        }
        json!({"model": "feat", "messages": ms})
    };
    assert_eq!(reason(routed(&gw, KEY, &[], conv(3)).await), "rule[4]");
    assert_eq!(reason(routed(&gw, KEY, &[], conv(4)).await), "rule[4]");
    assert_eq!(
        reason(routed(&gw, KEY, &[], conv(2)).await),
        "rule[8]",
        "2 turns: below min_turns 3, above max_turns 1"
    );
    // A system message is not a turn.
    let b = json!({"model": "feat", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]});
    assert_eq!(reason(routed(&gw, KEY, &[], b).await), "rule[7]");

    // header value: exact match only; absent or different value misses.
    assert_eq!(
        reason(routed(&gw, KEY, &[("x-tier", "gold")], plain()).await),
        "rule[5]"
    );
    assert_eq!(
        reason(routed(&gw, KEY, &[("x-tier", "silver")], plain()).await),
        "rule[7]"
    );

    // key name.
    let rt = routed(&gw, KEY2, &[], plain()).await;
    assert_eq!(
        (r(&rt, "reason"), r(&rt, "tier"), r(&rt, "model")),
        ("rule[6]", "large", "smart")
    );

    // label: `code` is not in rule [7]'s list.
    let rt = route_text(&gw, "feat", "python please").await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "reason"),
            r(&rt, "tier"),
            r(&rt, "model")
        ),
        ("code", "rule[8]", "mid", "fast2")
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn header_presence_only_condition() {
    let up = MockUpstream::echo().await;
    let extra = format!(
        r#"{}
[routers.h]
classifier = "rules"
unknown_tier = "small"
[[routers.h.rules]]
when = {{ header = {{ name = "x-priority" }} }}
tier = "large"
[[routers.h.rules]]
tier = "mid"
"#,
        extra_base()
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let b = json!({"model": "h", "messages": user("anything")});
    // The rules classifier without keywords says `unknown`, which goes to unknown_tier
    // before any rule is looked at.
    let rt = routed(&gw, KEY, &[("x-priority", "whatever")], b.clone()).await;
    assert_eq!(
        (r(&rt, "reason"), r(&rt, "tier")),
        ("unknown:label", "small")
    );
    gw.shutdown().await;

    // With a label, presence alone matches.
    let extra = format!(
        r#"{}
[routers.h]
classifier = "rules"
unknown_tier = "small"
keywords = {{ chat = ["."] }}
[[routers.h.rules]]
when = {{ header = {{ name = "x-priority" }} }}
tier = "large"
[[routers.h.rules]]
tier = "mid"
"#,
        extra_base()
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    assert_eq!(
        r(
            &routed(&gw, KEY, &[("x-priority", "whatever")], b.clone()).await,
            "reason"
        ),
        "rule[0]"
    );
    assert_eq!(
        r(
            &routed(&gw, KEY, &[("x-priority", "")], b.clone()).await,
            "reason"
        ),
        "rule[0]"
    );
    assert_eq!(r(&routed(&gw, KEY, &[], b).await, "reason"), "rule[1]");
    gw.shutdown().await;
}

#[tokio::test]
async fn classifier_input_modes() {
    let up = MockUpstream::echo().await;
    let mut extra = extra_base();
    for (name, mode) in [
        ("in_last", "last_user"),
        ("in_all", "all_user"),
        ("in_sys", "system_and_last_user"),
    ] {
        extra.push_str(&format!(
            r#"
[routers.{name}]
classifier = "rules"
input = "{mode}"
unknown_tier = "mid"
keywords = {{ code = ["python"], math = ["\\d+\\s*[+*/-]\\s*\\d+"] }}
[[routers.{name}.rules]]
when = {{ label = "code" }}
tier = "large"
[[routers.{name}.rules]]
when = {{ label = "math" }}
tier = "small"
"#
        ));
    }
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let with_system = |m: &str| {
        json!({"model": m, "messages": [{"role": "system", "content": "You are a python expert."},
                                        {"role": "user", "content": "what is 2 + 2"}]})
    };
    let two_turns = |m: &str| {
        json!({"model": m, "messages": [{"role": "user", "content": "write python code"},
                                        {"role": "assistant", "content": "sure"},
                                        {"role": "user", "content": "thanks!"}]})
    };
    let label = |rt: HashMap<String, String>| r(&rt, "label").to_string();
    assert_eq!(
        label(routed(&gw, KEY, &[], with_system("in_last")).await),
        "math"
    );
    assert_eq!(
        label(routed(&gw, KEY, &[], with_system("in_all")).await),
        "math"
    );
    // System text + last user text: `code` is the first label with a match.
    assert_eq!(
        label(routed(&gw, KEY, &[], with_system("in_sys")).await),
        "code"
    );
    assert_eq!(
        label(routed(&gw, KEY, &[], two_turns("in_last")).await),
        "unknown"
    );
    assert_eq!(
        label(routed(&gw, KEY, &[], two_turns("in_all")).await),
        "code"
    );
    assert_eq!(
        label(routed(&gw, KEY, &[], two_turns("in_sys")).await),
        "unknown"
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// Custom labels trained from TOML utterances; confidence thresholds

fn support_examples() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "billing",
            vec![
                "I was charged twice on my credit card this month",
                "Can I get a refund for my last invoice?",
                "Why is my bill higher than usual?",
                "Please update the payment method on my account",
                "The invoice amount is wrong, I paid already",
                "How do I cancel my subscription and get my money back?",
            ],
        ),
        (
            "bug",
            vec![
                "The app crashes when I click the save button",
                "I get an error 500 when uploading a file",
                "The page is blank after the latest update",
                "Login button does nothing on Android",
                "Search results are broken and show an exception",
                "The export feature freezes my browser",
            ],
        ),
        (
            "shipping",
            vec![
                "Where is my package? The tracking number shows nothing",
                "My order has not arrived yet after two weeks",
                "Can you ship to Canada and how long does delivery take?",
                "The parcel was delivered to the wrong address",
                "How much does express shipping cost?",
                "The courier lost my delivery",
            ],
        ),
    ]
}

/// The same training the gateway does for `[classifiers.X] examples` (label order, then text order).
fn train_support() -> EmbeddedClassifier {
    let ex: Vec<Example> = support_examples()
        .iter()
        .flat_map(|(l, ts)| {
            ts.iter().map(move |t| Example {
                text: t.to_string(),
                label: l.to_string(),
                source: None,
            })
        })
        .collect();
    EmbeddedClassifier::train(&ex, &TrainOptions::default()).unwrap()
}

fn support_toml() -> String {
    let mut s = String::from("\n[classifiers.support.examples]\n");
    for (label, texts) in support_examples() {
        s.push_str(&format!(
            "{label} = {}\n",
            serde_json::to_string(&texts).unwrap()
        ));
    }
    s
}

const BILLING: &str = "I think you charged my card twice, I want a refund";
const BUG: &str = "the app keeps crashing with an error when I save";
const SHIPPING: &str = "my package never arrived, where is my order";
const GIBBERISH: &str = "qzx vbnm plok wert";

#[tokio::test]
async fn custom_labels_from_utterances_and_confidence_thresholds() {
    // Preconditions on the model itself, so a change in training shows up here
    // rather than as a confusing routing failure.
    let model = train_support();
    let conf = |t: &str| {
        let p = model.classify(t);
        (model.label_name(p.label).unwrap().to_string(), p.confidence)
    };
    let (l, c) = conf(BILLING);
    assert!(
        l == "billing" && c > 0.6 && c < 0.99,
        "billing prompt: {l} {c}"
    );
    let (l, c) = conf(BUG);
    assert!(l == "bug" && c > 0.6, "bug prompt: {l} {c}");
    let (l, c) = conf(SHIPPING);
    assert!(l == "shipping" && c > 0.6, "shipping prompt: {l} {c}");
    let (_, c) = conf(GIBBERISH);
    assert!(c < 0.5, "gibberish prompt: {c}");

    let up = MockUpstream::echo().await;
    let extra = format!(
        r#"{}{}
[routers.support]
classifier = "support"
min_confidence = 0.5
unknown_tier = "large"
[[routers.support.rules]]
when = {{ label = "billing", min_confidence = 0.99 }}
tier = "large"
[[routers.support.rules]]
when = {{ label = "billing" }}
tier = "small"
[[routers.support.rules]]
when = {{ label = ["bug", "shipping"], min_confidence = 0.6 }}
tier = "mid"
[routers.lenient]
classifier = "support"
min_confidence = 0.5
unknown_tier = "mid"
[[routers.lenient.rules]]
when = {{ label = "billing", min_confidence = 0.6 }}
tier = "large"
[[routers.lenient.rules]]
tier = "small"
[routers.strict]
classifier = "support"
min_confidence = 0.99
unknown_tier = "mid"
[[routers.strict.rules]]
tier = "small"
"#,
        extra_base(),
        support_toml()
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;

    // Custom labels route by their rules; the header carries the model's confidence.
    let rt = route_text(&gw, "support", BILLING).await;
    assert_eq!(
        (r(&rt, "label"), r(&rt, "reason"), r(&rt, "tier")),
        ("billing", "rule[1]", "small"),
        "rule [0] needs 0.99"
    );
    assert_eq!(r(&rt, "confidence"), format!("{:.2}", conf(BILLING).1));
    let rt = route_text(&gw, "support", BUG).await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "reason"),
            r(&rt, "tier"),
            r(&rt, "model")
        ),
        ("bug", "rule[2]", "mid", "fast2")
    );
    let rt = route_text(&gw, "support", SHIPPING).await;
    assert_eq!((r(&rt, "label"), r(&rt, "reason")), ("shipping", "rule[2]"));

    // Rule-level min_confidence met.
    let rt = route_text(&gw, "lenient", BILLING).await;
    assert_eq!((r(&rt, "reason"), r(&rt, "tier")), ("rule[0]", "large"));

    // Low confidence: the router's min_confidence sends it to unknown_tier,
    // even though a catch-all rule exists.
    let rt = route_text(&gw, "support", GIBBERISH).await;
    assert_eq!(
        (r(&rt, "reason"), r(&rt, "tier"), r(&rt, "model")),
        ("unknown:low_confidence", "large", "smart")
    );
    let rt = route_text(&gw, "lenient", GIBBERISH).await;
    assert_eq!(
        (r(&rt, "reason"), r(&rt, "tier")),
        ("unknown:low_confidence", "mid")
    );
    // min_confidence = 0.99 on the router: even a clear prompt is low confidence.
    // The label is reported as `unknown`, the classifier's best kept as `top`.
    let rt = route_text(&gw, "strict", BUG).await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "top"),
            r(&rt, "reason"),
            r(&rt, "tier")
        ),
        ("unknown", "bug", "unknown:low_confidence", "mid")
    );

    let unknown = metric(
        &gw,
        "triage_classifier_unknown_total",
        &["router=\"support\"", "low_confidence"],
    )
    .await;
    assert_eq!(unknown, Some(1.0));
    gw.shutdown().await;
}

#[tokio::test]
async fn trained_model_file_round_trip_matches_classify() {
    let model = train_support();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("support.bin");
    model.save(&path).unwrap();
    let loaded = EmbeddedClassifier::load(&path).unwrap();
    assert_eq!(loaded, model, "save/load must round-trip");

    let up = MockUpstream::echo().await;
    let extra = format!(
        r#"{}
[classifiers.mine]
model_file = "{}"
[routers.mine]
classifier = "mine"
min_confidence = 0.5
unknown_tier = "large"
[[routers.mine.rules]]
when = {{ label = "billing" }}
tier = "small"
[[routers.mine.rules]]
when = {{ label = "bug" }}
tier = "mid"
[[routers.mine.rules]]
when = {{ label = "shipping" }}
tier = "large"
"#,
        extra_base(),
        path.display()
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let prompts = [
        BILLING,
        BUG,
        SHIPPING,
        GIBBERISH,
        "refund my subscription please",
        "the export button throws an exception",
        "how long does delivery to Canada take",
        "hello",
    ];
    let mut seen = std::collections::BTreeSet::new();
    for p in prompts {
        let pred = loaded.classify(p);
        let label = loaded.label_name(pred.label).unwrap();
        let rt = route_text(&gw, "mine", p).await;
        if pred.confidence < 0.5 {
            // Below min_confidence the label is `unknown`; the model's best is `top`.
            assert_eq!(
                (r(&rt, "label"), r(&rt, "top")),
                ("unknown", label),
                "{p:?}"
            );
        } else {
            assert_eq!(r(&rt, "label"), label, "{p:?}");
        }
        assert_eq!(
            r(&rt, "confidence"),
            format!("{:.2}", pred.confidence),
            "{p:?}"
        );
        let (reason, tier) = if pred.confidence < 0.5 {
            ("unknown:low_confidence".to_string(), "large")
        } else {
            (
                format!("rule[{}]", pred.label),
                ["small", "mid", "large"][pred.label],
            )
        };
        assert_eq!(
            (r(&rt, "reason"), r(&rt, "tier")),
            (reason.as_str(), tier),
            "{p:?}"
        );
        seen.insert(reason);
    }
    assert!(
        seen.len() >= 4,
        "the prompts should exercise every rule and low confidence: {seen:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn shipped_embedded_classifier_routes_code_and_chat() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/classifier.bin");
    let size = std::fs::metadata(&shipped).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 0,
        "the shipped model {} is empty (not trained yet)",
        shipped.display()
    );

    let up = MockUpstream::echo().await;
    let extra = format!(
        r#"{}
[routers.emb]
classifier = "embedded"
min_confidence = 0.5
unknown_tier = "mid"
[[routers.emb.rules]]
when = {{ label = "code" }}
tier = "large"
[[routers.emb.rules]]
when = {{ label = "chat" }}
tier = "small"
"#,
        extra_base()
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let rt = route_text(
        &gw,
        "emb",
        "Write a Python function that reverses a linked list",
    )
    .await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "reason"),
            r(&rt, "tier"),
            r(&rt, "model")
        ),
        ("code", "rule[0]", "large", "smart"),
        "{rt:?}"
    );
    let rt = route_text(&gw, "emb", "hi there! how are you?").await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "reason"),
            r(&rt, "tier"),
            r(&rt, "model")
        ),
        ("chat", "rule[1]", "small", "fast"),
        "{rt:?}"
    );
    // Long prompts keep their verdict; the second identical one is a lookup.
    gw.state.verdicts.run_pending_tasks();
    assert_eq!(
        gw.state.verdicts.entry_count(),
        0,
        "short prompts are not cached"
    );
    let long = "Please refactor this Rust code so the borrow checker accepts it. ".repeat(12);
    let first = route_text(&gw, "emb", &long).await;
    let second = route_text(&gw, "emb", &long).await;
    assert_eq!(first, second);
    // The model's own label, whether or not its calibrated confidence clears min_confidence.
    let raw = match r(&first, "label") {
        "unknown" => r(&first, "top"),
        label => label,
    };
    assert_eq!(raw, "code", "{first:?}");
    gw.state.verdicts.run_pending_tasks();
    assert_eq!(gw.state.verdicts.entry_count(), 1);
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// LLM classifier

fn llm_extra(timeout: &str) -> String {
    format!(
        r#"{}
[models.cls]
provider = "up"
upstream_model = "cls-upstream"
price = {{ input = 1.0, output = 2.0 }}
[routers.llm]
classifier = "llm"
classifier_model = "cls"
classifier_timeout = "{timeout}"
unknown_tier = "mid"
[[routers.llm.rules]]
when = {{ label = "code" }}
tier = "large"
[[routers.llm.rules]]
when = {{ label = "chat" }}
tier = "small"
"#,
        extra_base()
    )
}

/// The classifier model answers with `answer`; everything else echoes.
fn classifier_says(answer: Reply) -> impl Fn(&Value, usize) -> Reply + Send + Sync + 'static {
    move |req, _| {
        if req["model"] == "cls-upstream" {
            answer.clone()
        } else {
            Reply::Echo
        }
    }
}

fn llm_label_script(req: &Value, _: usize) -> Reply {
    if req["model"] != "cls-upstream" {
        return Reply::Echo;
    }
    let text = req["messages"][1]["content"].as_str().unwrap_or("");
    if text.contains("python") {
        Reply::Content(r#"{"label": "code"}"#.into())
    } else if text.starts_with("hi") {
        Reply::Content("```json\n{\"label\":\"chat\"}\n```".into())
    } else {
        Reply::Content(r#"{"label": "math"}"#.into())
    }
}

#[tokio::test]
async fn llm_classifier_routes_by_label_bills_and_caches_verdicts() {
    let up = MockUpstream::start(llm_label_script).await;
    let gw = start_gateway(&config(&up.url, &llm_extra("2s"))).await;
    let cls = "cls-upstream";

    let rt = route_text(&gw, "llm", "write python to sort a list").await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "confidence"),
            r(&rt, "reason"),
            r(&rt, "tier"),
            r(&rt, "model")
        ),
        ("code", "1.00", "rule[0]", "large", "smart")
    );
    assert_eq!(up.calls_for(cls), 1);
    assert_eq!(up.calls_for("smart-upstream"), 1);
    // The classifier call: constrained to the label set, with the prompt.
    let creq = up
        .state
        .requests
        .lock()
        .unwrap()
        .iter()
        .find(|r| r["model"] == cls)
        .cloned()
        .unwrap();
    assert_eq!(
        creq["messages"][1]["content"],
        "write python to sort a list"
    );
    let labels = &creq["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"];
    assert!(
        labels.as_array().unwrap().contains(&json!("code")),
        "{creq}"
    );
    // Its cost is billed to the request: prompt and completion tokens at cls's prices.
    let msgs = creq["messages"].as_array().unwrap();
    let prompt: u64 = msgs
        .iter()
        .map(|m| tokens(m["content"].as_str().unwrap()))
        .sum::<u64>()
        + 1;
    let completion = tokens(r#"{"label": "code"}"#);
    let expected = (prompt * 1_000 + completion * 2_000) as f64;
    let billed = metric(
        &gw,
        "triage_cost_nanodollars_total",
        &["key=\"app\"", "model=\"cls\""],
    )
    .await;
    assert_eq!(
        billed,
        Some(expected),
        "classifier call cost in nanodollars"
    );
    let toks = metric(
        &gw,
        "triage_tokens_total",
        &["model=\"cls\"", "direction=\"prompt\""],
    )
    .await;
    assert_eq!(toks, Some(prompt as f64));

    // Same prompt again: the verdict is cached, no classifier call.
    let rt = route_text(&gw, "llm", "write python to sort a list").await;
    assert_eq!((r(&rt, "label"), r(&rt, "reason")), ("code", "rule[0]"));
    assert_eq!(
        up.calls_for(cls),
        1,
        "cached verdict: no second classifier call"
    );
    assert_eq!(up.calls_for("smart-upstream"), 2);

    // Another label (fenced JSON answer is accepted), another rule.
    let rt = route_text(&gw, "llm", "hi, how is it going?").await;
    assert_eq!(
        (
            r(&rt, "label"),
            r(&rt, "reason"),
            r(&rt, "tier"),
            r(&rt, "model")
        ),
        ("chat", "rule[1]", "small", "fast")
    );
    // A valid label no rule covers.
    let rt = route_text(&gw, "llm", "integrate x squared").await;
    assert_eq!(
        (r(&rt, "label"), r(&rt, "reason"), r(&rt, "tier")),
        ("math", "unknown:no_rule", "mid")
    );
    assert_eq!(up.calls_for(cls), 3);

    // A model named directly skips classification entirely.
    let rt = route_text(&gw, "smart", "write python to sort a list, directly").await;
    assert_eq!((r(&rt, "model"), r(&rt, "reason")), ("smart", "direct"));
    assert!(
        !rt.contains_key("router") && !rt.contains_key("label"),
        "{rt:?}"
    );
    assert_eq!(up.calls_for(cls), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn llm_classifier_failures_go_to_unknown_tier() {
    let up = MockUpstream::start(classifier_says(Reply::Delay(
        Duration::from_millis(2500),
        Box::new(Reply::Content(r#"{"label": "code"}"#.into())),
    )))
    .await;
    let gw = start_gateway(&config(&up.url, &llm_extra("500ms"))).await;
    let cls = "cls-upstream";
    let failed = |rt: &HashMap<String, String>| {
        assert_eq!(
            (
                r(rt, "label"),
                r(rt, "reason"),
                r(rt, "tier"),
                r(rt, "model")
            ),
            ("unknown", "unknown:classifier_failed", "mid", "fast2"),
            "{rt:?}"
        );
    };

    // Timeout: the classifier answers after classifier_timeout (500ms).
    let rt = route_text(&gw, "llm", "python timeout case").await;
    failed(&rt);
    assert_eq!(up.calls_for(cls), 1);
    assert_eq!(
        up.calls_for("fast2-upstream"),
        1,
        "the request itself is still served"
    );

    // Error: the classifier model answers 500.
    up.set_script(classifier_says(down(500)));
    let rt = route_text(&gw, "llm", "python error case").await;
    failed(&rt);
    assert_eq!(up.calls_for(cls), 2);

    // Invalid answer: not one of the labels.
    up.set_script(classifier_says(Reply::Content(
        r#"{"label": "poetry"}"#.into(),
    )));
    let rt = route_text(&gw, "llm", "python invalid case").await;
    failed(&rt);
    up.set_script(classifier_says(Reply::Content(
        "I would say it is code".into(),
    )));
    let rt = route_text(&gw, "llm", "python prose case").await;
    failed(&rt);
    assert_eq!(up.calls_for(cls), 4);
    // The wasted classifier call is still billed.
    let billed = metric(
        &gw,
        "triage_cost_nanodollars_total",
        &["key=\"app\"", "model=\"cls\""],
    )
    .await;
    assert!(
        billed.is_some_and(|v| v > 0.0),
        "invalid answers cost tokens too: {billed:?}"
    );

    // Failures are not cached: the same prompt asks again, and now succeeds.
    up.set_script(classifier_says(Reply::Content(
        r#"{"label": "code"}"#.into(),
    )));
    let rt = route_text(&gw, "llm", "python prose case").await;
    assert_eq!(
        (r(&rt, "label"), r(&rt, "reason"), r(&rt, "model")),
        ("code", "rule[0]", "smart")
    );
    assert_eq!(up.calls_for(cls), 5);

    let unknown = metric(
        &gw,
        "triage_classifier_unknown_total",
        &["router=\"llm\"", "failure"],
    )
    .await;
    assert_eq!(unknown, Some(4.0));
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// Deployments: fallback, cooldown, recovery, 503

/// Router `auto`: everything (label chat) to `tier`.
fn all_to(tier: &str) -> String {
    format!(
        r#"
[routers.auto]
classifier = "rules"
unknown_tier = "{tier}"
keywords = {{ chat = ["."] }}
[[routers.auto.rules]]
tier = "{tier}"
"#
    )
}

#[tokio::test]
async fn fallback_within_a_tier_and_across_tiers() {
    let up = MockUpstream::start(failing(&["fast-upstream"])).await;
    let gw = start_gateway(&config(&up.url, &all_to("small"))).await;

    // fast answers 503: fast2 in the same tier serves.
    let rt = route_text(&gw, "auto", "hello one").await;
    assert_eq!(
        (
            r(&rt, "tier"),
            r(&rt, "model"),
            r(&rt, "reason"),
            r(&rt, "fallback_from")
        ),
        ("small", "fast2", "rule[0]+fallback", "fast")
    );
    assert_eq!(
        (
            up.calls_for("fast-upstream"),
            up.calls_for("fast2-upstream")
        ),
        (1, 1)
    );

    // Streaming takes the same path (fallback happens before the first byte).
    let (status, h, body) = post_chat(
        &gw,
        json!({"model": "auto", "messages": user("hello stream"), "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sse_content(&body), "echo: hello stream");
    let rt = route_of(&h);
    assert_eq!(
        (r(&rt, "model"), r(&rt, "fallback_from")),
        ("fast2", "fast")
    );

    // Both small deployments fail (429 and 5xx): the fallback tier serves.
    up.set_script(|req, _| match req["model"].as_str() {
        Some("fast-upstream") => down(502),
        Some("fast2-upstream") => Reply::RetryAfter(429, 0),
        _ => Reply::Echo,
    });
    let rt = route_text(&gw, "auto", "hello two").await;
    assert_eq!(
        (
            r(&rt, "tier"),
            r(&rt, "model"),
            r(&rt, "reason"),
            r(&rt, "fallback_from")
        ),
        ("large", "smart", "rule[0]+fallback", "fast,fast2")
    );
    assert_eq!(up.calls_for("smart-upstream"), 1);

    gw.shutdown().await;

    // A 4xx other than 429 is the request's fault: passed through, no fallback.
    // (Fresh gateway: fast has failed three times above and is cooling down.)
    let gw = start_gateway(&config(&up.url, &all_to("small"))).await;
    up.set_script(|req, _| match req["model"].as_str() {
        Some("fast-upstream") => Reply::Status(400, json!({"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}})),
        _ => Reply::Echo,
    });
    let before = up.calls_for("fast2-upstream");
    let (status, _, body) = post_chat(
        &gw,
        json!({"model": "auto", "messages": user("hello three")}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(up.calls_for("fast2-upstream"), before);
    gw.shutdown().await;
}

#[tokio::test]
async fn cooldown_skips_deployment_then_fallback_tier_serves() {
    // small = [fast, fast2] (cooldown after 3 by default, 30s), fallback large.
    let up = MockUpstream::start(failing(&["fast-upstream", "fast2-upstream"])).await;
    let gw = start_gateway(&config(&up.url, &all_to("small"))).await;
    for i in 0..3 {
        let rt = route_text(&gw, "auto", &format!("hello {i}")).await;
        assert_eq!(
            (r(&rt, "tier"), r(&rt, "model"), r(&rt, "fallback_from")),
            ("large", "smart", "fast,fast2")
        );
    }
    assert_eq!(
        (
            up.calls_for("fast-upstream"),
            up.calls_for("fast2-upstream")
        ),
        (3, 3)
    );
    assert_eq!(
        metric(
            &gw,
            "triage_deployment_cooldowns_total",
            &["model=\"fast\""]
        )
        .await,
        Some(1.0)
    );
    // Both are cooling now: skipped without a call, straight to the fallback tier.
    for i in 0..2 {
        let rt = route_text(&gw, "auto", &format!("hello again {i}")).await;
        // The header says the rule's tier was passed over, and why.
        assert_eq!(
            (
                r(&rt, "tier"),
                r(&rt, "model"),
                r(&rt, "reason"),
                r(&rt, "cooling")
            ),
            ("large", "smart", "rule[0]+fallback", "fast,fast2"),
            "{rt:?}"
        );
    }
    assert_eq!(
        (
            up.calls_for("fast-upstream"),
            up.calls_for("fast2-upstream")
        ),
        (3, 3),
        "cooling deployments get no calls"
    );
    assert_eq!(up.calls_for("smart-upstream"), 5);
    gw.shutdown().await;
}

const POOL: &str = r#"
[tiers.pool]
models = ["fast", "fast2"]
cooldown_after = 2
cooldown = "COOLDOWN"
"#;

#[tokio::test]
async fn cooldown_after_consecutive_failures_skips_without_a_call() {
    let up = MockUpstream::start(failing(&["fast-upstream"])).await;
    let extra = format!("{}{}", POOL.replace("COOLDOWN", "30s"), all_to("pool"));
    let gw = start_gateway(&config(&up.url, &extra)).await;
    for i in 0..2 {
        let rt = route_text(&gw, "auto", &format!("hello {i}")).await;
        assert_eq!(
            (r(&rt, "model"), r(&rt, "fallback_from")),
            ("fast2", "fast")
        );
    }
    assert_eq!(up.calls_for("fast-upstream"), 2);
    // Two consecutive failures: fast is cooling and gets no more calls.
    for i in 0..3 {
        let rt = route_text(&gw, "auto", &format!("later {i}")).await;
        assert_eq!(
            (
                r(&rt, "tier"),
                r(&rt, "model"),
                r(&rt, "reason"),
                r(&rt, "cooling")
            ),
            ("pool", "fast2", "rule[0]+fallback", "fast"),
            "{rt:?}"
        );
    }
    assert_eq!(up.calls_for("fast-upstream"), 2);
    assert_eq!(up.calls_for("fast2-upstream"), 5);
    assert_eq!(
        metric(&gw, "triage_deployment_healthy", &["model=\"fast\""]).await,
        Some(0.0)
    );
    gw.shutdown().await;

    // A success in between resets the count: failure, success, failure is no cooldown.
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    let up = MockUpstream::start(move |req, _| {
        if req["model"] == "fast-upstream"
            && n2
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                .is_multiple_of(2)
        {
            down(503)
        } else {
            Reply::Echo
        }
    })
    .await;
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let models: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(r(&route_text(&gw, "auto", &format!("hi {i}")).await, "model").to_string());
        }
        v
    };
    assert_eq!(models, ["fast2", "fast", "fast2", "fast"]);
    assert_eq!(up.calls_for("fast-upstream"), 4, "never cooled down");
    gw.shutdown().await;
}

#[tokio::test]
async fn deployment_recovers_after_cooldown() {
    let up = MockUpstream::start(failing(&["fast-upstream"])).await;
    let extra = format!("{}{}", POOL.replace("COOLDOWN", "300ms"), all_to("pool"));
    let gw = start_gateway(&config(&up.url, &extra)).await;
    for i in 0..2 {
        let rt = route_text(&gw, "auto", &format!("hello {i}")).await;
        assert_eq!(r(&rt, "model"), "fast2");
    }
    assert_eq!(up.calls_for("fast-upstream"), 2);
    // fast comes back; after the cooldown it is tried again and serves.
    up.set_script(|_, _| Reply::Echo);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let rt = route_text(&gw, "auto", "after cooldown").await;
    assert_eq!(
        (r(&rt, "model"), r(&rt, "reason")),
        ("fast", "rule[0]"),
        "{rt:?}"
    );
    assert_eq!(up.calls_for("fast-upstream"), 3);
    let rt = route_text(&gw, "auto", "and again").await;
    assert_eq!(r(&rt, "model"), "fast");
    assert_eq!(
        metric(&gw, "triage_deployment_healthy", &["model=\"fast\""]).await,
        Some(1.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn all_deployments_cooling_without_fallback_is_503_naming_the_tier() {
    let up = MockUpstream::start(failing(&["fast-upstream", "fast2-upstream"])).await;
    let extra = format!(
        r#"
[tiers.solo]
models = ["fast", "fast2"]
cooldown_after = 1
cooldown = "30s"
{}"#,
        all_to("solo")
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    // First request: both fail for real; the last upstream error is reported.
    let (status, _, body) =
        post_chat(&gw, json!({"model": "auto", "messages": user("hello")})).await;
    assert!(status == 502 || status == 503, "{status} {body}");
    assert_eq!(up.calls(), 2);
    // Now both are cooling: 503 without any upstream call, naming the tier.
    let (status, h, body) = post_chat(
        &gw,
        json!({"model": "auto", "messages": user("hello again")}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(up.calls(), 2);
    let v: Value = serde_json::from_str(&body).unwrap();
    let e = &v["error"];
    assert_eq!(e["type"], "api_error", "{v}");
    assert_eq!(e["code"], "no_healthy_deployment", "{v}");
    assert!(e["message"].as_str().unwrap().contains("`solo`"), "{v}");
    assert!(h.get("x-request-id").is_some());
    // Streaming requests get the same envelope (nothing was streamed yet).
    let (status, _, body) = post_chat(
        &gw,
        json!({"model": "auto", "messages": user("hello stream"), "stream": true}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("solo"), "{body}");
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// Models list, passthrough, `triage check`

#[tokio::test]
async fn models_list_has_routers_and_direct_models_pass_through() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &format!("{}{LABEL_ROUTER}", extra_base()))).await;
    let v: Value = get_json(&http(), format!("{}/models", gw.base_url())).await;
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let owner = |id: &str| {
        data.iter()
            .find(|m| m["id"] == id)
            .map(|m| m["owned_by"].as_str().unwrap().to_string())
    };
    assert_eq!(owner("auto").as_deref(), Some("triage-router"));
    for m in ["fast", "fast2", "smart"] {
        assert_eq!(owner(m).as_deref(), Some("triage"), "{v}");
    }
    assert!(data.iter().all(|m| m["object"] == "model"));

    // A model name is a passthrough: no classification, reason=direct.
    let rt = route_text(&gw, "fast2", "hello direct").await;
    assert_eq!((r(&rt, "model"), r(&rt, "reason")), ("fast2", "direct"));
    assert!(!rt.contains_key("tier"), "{rt:?}");
    assert_eq!(up.last_request()["model"], "fast2-upstream");
    // Unknown names are 404s.
    let (status, _, body) = post_chat(&gw, json!({"model": "nope", "messages": user("x")})).await;
    assert_eq!(status, 404, "{body}");
    gw.shutdown().await;
}

fn run_check(toml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triage"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_reports_unknown_tier_with_key_path() {
    let extra = r#"
[routers.auto]
classifier = "rules"
unknown_tier = "large"
keywords = { code = ["python"] }
[[routers.auto.rules]]
when = { label = "code" }
tier = "lage"
[[routers.auto.rules]]
when = { label = "cod" }
tier = "small"
"#;
    let (code, out) = run_check(&config("http://127.0.0.1:9/v1", extra));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines().any(|l| l.ends_with(
            r#":41:1: routers.auto.rules[0].tier: unknown tier "lage" (known: large, small)"#
        )),
        "{out}"
    );
    assert!(
        out.contains(r#"routers.auto.rules[1].when.label: unknown label "cod""#),
        "{out}"
    );

    // Unreachable rules are warnings, not errors.
    let extra = r#"
[routers.auto]
classifier = "rules"
unknown_tier = "large"
keywords = { code = ["python"] }
[[routers.auto.rules]]
tier = "small"
[[routers.auto.rules]]
when = { label = "code" }
tier = "large"
"#;
    let (code, out) = run_check(&config("http://127.0.0.1:9/v1", extra));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: routers.auto.rules[1]: unreachable"),
        "{out}"
    );
}

#[tokio::test]
async fn timeouts_and_connect_errors_fall_back() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "slow-upstream" {
            Reply::Delay(Duration::from_millis(1500), Box::new(Reply::Echo))
        } else {
            Reply::Echo
        }
    })
    .await;
    let extra = format!(
        r#"
[providers.slow]
kind = "openai"
base_url = "{url}"
first_byte_timeout = "200ms"
[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
connect_timeout = "500ms"
[models.slowm]
provider = "slow"
upstream_model = "slow-upstream"
[models.deadm]
provider = "dead"
upstream_model = "dead-upstream"
[tiers.flaky]
models = ["deadm", "slowm", "fast2"]
{}"#,
        all_to("flaky"),
        url = up.url
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let rt = route_text(&gw, "auto", "hello").await;
    assert_eq!(
        (
            r(&rt, "tier"),
            r(&rt, "model"),
            r(&rt, "reason"),
            r(&rt, "fallback_from")
        ),
        ("flaky", "fast2", "rule[0]+fallback", "deadm,slowm")
    );
    assert_eq!(up.calls_for("slow-upstream"), 1);
    assert_eq!(up.calls_for("fast2-upstream"), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn weighted_and_least_latency_strategies() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "lb-upstream" {
            Reply::Delay(Duration::from_millis(300), Box::new(Reply::Echo))
        } else {
            Reply::Echo
        }
    })
    .await;
    let mut extra = String::new();
    for (name, weight) in [
        ("wa", 1),
        ("wb", 3),
        ("wz", 0),
        ("wd", 1),
        ("la", 1),
        ("lb", 1),
    ] {
        extra.push_str(&format!(
            "[models.{name}]\nprovider = \"up\"\nupstream_model = \"{name}-upstream\"\nweight = {weight}\n"
        ));
    }
    extra.push_str(
        r#"
[tiers.w]
models = ["wa", "wb"]
strategy = "weighted"
[tiers.z]
models = ["wz", "wd"]
strategy = "weighted"
[tiers.ll]
models = ["la", "lb"]
strategy = "least_latency"
[routers.auto]
classifier = "rules"
unknown_tier = "small"
keywords = { chat = ["^w"], code = ["^z"], math = ["^l"] }
[[routers.auto.rules]]
when = { label = "chat" }
tier = "w"
[[routers.auto.rules]]
when = { label = "code" }
tier = "z"
[[routers.auto.rules]]
when = { label = "math" }
tier = "ll"
"#,
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;

    // Weight 0 is never the first pick; ordered would have chosen wz.
    for i in 0..10 {
        assert_eq!(
            r(&route_text(&gw, "auto", &format!("z {i}")).await, "model"),
            "wd"
        );
    }
    assert_eq!(up.calls_for("wz-upstream"), 0);

    // 1:3 weights: the split is random, so only a wide band is asserted.
    let n = 120;
    for i in 0..n {
        route_text(&gw, "auto", &format!("w {i}")).await;
    }
    let (a, b) = (up.calls_for("wa-upstream"), up.calls_for("wb-upstream"));
    assert_eq!(a + b, n);
    assert!(
        (60..=115).contains(&b) && a >= 5,
        "weighted 1:3 split was wa={a} wb={b}"
    );

    // least_latency: once both have a latency estimate, the fast one wins.
    for i in 0..12 {
        route_text(&gw, "auto", &format!("l {i}")).await;
    }
    let (la, lb) = (up.calls_for("la-upstream"), up.calls_for("lb-upstream"));
    assert_eq!(la + lb, 12);
    assert!(
        lb <= 2,
        "the slow deployment should only be tried while its latency is unknown: la={la} lb={lb}"
    );
    gw.shutdown().await;
}

#[test]
fn config_errors_name_unknown_tiers_models_labels_and_keys() {
    let extra = r#"
[tiers.t]
models = ["fast", "ghost"]
[routers.a]
classifier = "llm"
classifier_model = "ghost"
unknown_tier = "small"
[[routers.a.rules]]
tier = "small"
[routers.b]
classifier = "rules"
unknown_tier = "huge"
keywords = { code = ["python"] }
[[routers.b.rules]]
when = { label = "chat" }
tier = "small"
[classifiers.sup]
examples = { billing = ["refund please", "charged twice"], bug = ["it crashes"] }
[routers.c]
classifier = "sup"
unknown_tier = "small"
[[routers.c.rules]]
when = { label = "shipping" }
tier = "small"
[[routers.c.rules]]
when = { key = "ghost" }
tier = "large"
[routers.d]
classifier = "nope"
unknown_tier = "small"
[[routers.d.rules]]
tier = "small"
"#;
    let errs = match triage::config::Config::parse(
        &config("http://127.0.0.1:9/v1", extra),
        std::path::Path::new("."),
    ) {
        Ok(_) => panic!("config with unknown names was accepted"),
        Err(e) => e.errors,
    };
    let all = errs.join("\n");
    for want in [
        r#"tiers.t.models[1]: unknown model "ghost""#,
        r#"routers.a.classifier_model: unknown model "ghost""#,
        r#"routers.b.unknown_tier: unknown tier "huge""#,
        r#"routers.b.rules[0].when.label: unknown label "chat""#,
        r#"routers.c.rules[0].when.label: unknown label "shipping""#,
        r#"routers.c.rules[1].when.key: unknown key "ghost""#,
        r#"routers.d.classifier: unknown classifier "nope""#,
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in:\n{all}"
        );
    }
}

#[test]
fn model_file_labels_are_checked_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("support.bin");
    train_support().save(&path).unwrap();
    let extra = format!(
        r#"
[classifiers.mine]
model_file = "{}"
[routers.m]
classifier = "mine"
unknown_tier = "large"
[[routers.m.rules]]
when = {{ label = "refund" }}
tier = "small"
"#,
        path.display()
    );
    let cfg = triage::config::Config::parse(
        &config("http://127.0.0.1:9/v1", &extra),
        std::path::Path::new("."),
    )
    .unwrap();
    let err = match triage::build_state(cfg) {
        Ok(_) => panic!("a rule naming a label the model file lacks was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(r#"routers.m.rules[0].when.label: unknown label "refund""#),
        "{err}"
    );

    // A missing file is a config error with its key path.
    let extra = extra.replace("support.bin", "missing.bin");
    let errs = match triage::config::Config::parse(
        &config("http://127.0.0.1:9/v1", &extra),
        std::path::Path::new("."),
    ) {
        Ok(_) => panic!("missing model file accepted"),
        Err(e) => e.errors,
    };
    assert!(
        errs.iter()
            .any(|e| e.starts_with("classifiers.mine.model_file: file")),
        "{errs:?}"
    );
}

/// A half-open probe abandoned before its verdict (here: the LLM classifier's
/// own timeout drops the call) must not leave the deployment cooling forever.
#[tokio::test]
async fn abandoned_probe_does_not_wedge_a_deployment() {
    let classifier_delay = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chat_fails = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (d, f) = (classifier_delay.clone(), chat_fails.clone());
    let up = MockUpstream::start(move |req, _| {
        let is_classifier = req["response_format"]["json_schema"]["name"] == "route_label";
        let label = Reply::Content(r#"{"label": "chat"}"#.into());
        match (req["model"].as_str(), is_classifier) {
            (Some("fast-upstream"), true) if d.load(std::sync::atomic::Ordering::SeqCst) => {
                Reply::Delay(Duration::from_millis(1500), Box::new(label))
            }
            (Some("fast-upstream"), true) => label,
            (Some("fast-upstream"), false) if f.load(std::sync::atomic::Ordering::SeqCst) => {
                down(503)
            }
            _ => Reply::Echo,
        }
    })
    .await;
    let extra = r#"
[tiers.pool]
models = ["fast", "fast2"]
cooldown_after = 1
cooldown = "300ms"
[routers.llm]
classifier = "llm"
classifier_model = "fast"
classifier_timeout = "500ms"
unknown_tier = "pool"
[[routers.llm.rules]]
when = { label = "chat" }
tier = "pool"
"#;
    let gw = start_gateway(&config(&up.url, extra)).await;
    // fast fails as a tier deployment: cooling for 300ms.
    let rt = route_text(&gw, "llm", "hello one").await;
    assert_eq!(
        (r(&rt, "label"), r(&rt, "model"), r(&rt, "fallback_from")),
        ("chat", "fast2", "fast")
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    // The classifier call takes the probe slot and is abandoned at its timeout.
    classifier_delay.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt = route_text(&gw, "llm", "hello two").await;
    assert!(
        r(&rt, "reason").starts_with("unknown:classifier_failed"),
        "{rt:?}"
    );
    assert_eq!(r(&rt, "model"), "fast2");
    // fast is healthy again; after another cooldown period it must be usable.
    classifier_delay.store(false, std::sync::atomic::Ordering::SeqCst);
    chat_fails.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let rt = route_text(&gw, "llm", "hello three").await;
    assert_eq!(
        (r(&rt, "label"), r(&rt, "reason"), r(&rt, "model")),
        ("chat", "rule[0]", "fast"),
        "{rt:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn refused_requests_make_no_llm_classifier_call() {
    let up = MockUpstream::start(llm_label_script).await;
    let extra = format!(
        "{}\n[keys.limited]\nkey_sha256 = \"{}\"\nrpm = 1\n",
        llm_extra("2s"),
        sha("sk-limited")
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let (status, _, _) = post_chat_as(
            &gw,
            "sk-limited",
            json!({"model": "llm", "messages": user(&format!("write python number {i}"))}),
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(statuses, vec![200, 429, 429]);
    assert_eq!(
        up.calls_for("cls-upstream"),
        1,
        "refused requests must not reach the classifier"
    );
    gw.shutdown().await;
}
