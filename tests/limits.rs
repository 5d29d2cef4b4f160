//! Virtual keys, rate limits and spend ceilings end to end: authentication and
//! `allow`, rpm/tpm/max_parallel refusals and recovery, team limits, the
//! budget under heavy concurrency, durable spend across restart and SIGKILL,
//! partial charges for abandoned streams, exact costs, and `triage keys new`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use triage::server::Gateway;

const BIN: &str = env!("CARGO_BIN_EXE_triage");

/// A non-streamed chat completion reporting exactly this usage.
fn completion_with_usage(prompt: u64, completion: u64, cached: u64) -> Reply {
    Reply::Raw(
        200,
        "application/json",
        json!({
            "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                      "prompt_tokens_details": {"cached_tokens": cached}},
        })
        .to_string(),
    )
}

/// The body the budget tests send: prompt estimate 4 + 1 + 3 = 8 tokens,
/// reserved at one and a half times: 12.
fn hi(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": user("hi"), "max_tokens": max_tokens})
}

/// `fast` costs $1 / $2 per Mtok = 1000 / 2000 nano-dollars per token, so a
/// request for `hi` with max_tokens 10 reserves 12 * 1000 + 10 * 2000; the
/// mock reports 12 prompt tokens so that each call costs exactly that.
const HI_RESERVE: u64 = 12 * 1000 + 10 * 2000;

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("missing header {name}: {h:?}"))
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["error"]["code"].as_str().unwrap_or("").to_string()
}

async fn key_self(gw: &Gateway, key: &str) -> (u16, Value) {
    let r = http()
        .get(format!("{}/triage/keys/self", gw.base_url()))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The test config with a durable SQLite store in `dir`.
fn sqlite_config(url: &str, extra: &str, dir: &Path) -> String {
    let base = config(url, extra);
    assert_eq!(base.matches("kind = \"memory\"").count(), 1);
    base.replace(
        "kind = \"memory\"",
        &format!("kind = \"sqlite\"\nstate_dir = \"{}\"", dir.display()),
    )
}

#[tokio::test]
async fn keys_authenticate_and_allow_lists_are_enforced() {
    const ENV_VAR: &str = "TRIAGE_LIMITS_TEST_ENV_SECRET";
    const ENV_SECRET: &str = "sk-from-the-environment";
    // Config::parse reads the real environment.
    std::env::set_var(ENV_VAR, ENV_SECRET);
    let up = MockUpstream::echo().await;
    let extra = format!(
        "[keys.limited]\nkey_sha256 = \"{}\"\nallow = [\"fast\"]\n[keys.envkey]\nkey_env = \"{ENV_VAR}\"\n",
        sha(KEY2)
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let url = format!("{}/chat/completions", gw.base_url());
    let body = json!({"model": "fast", "messages": user("hello")});

    // No key, an unknown key: 401 with the OpenAI envelope, nothing sent upstream.
    let r = http().post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(error_code(&r.text().await.unwrap()), "invalid_api_key");
    let (status, _, text) = post_chat_as(&gw, "sk-nobody", body.clone()).await;
    assert_eq!(status, 401, "{text}");
    assert_eq!(error_code(&text), "invalid_api_key");
    // The hash itself is not a key.
    let (status, _, _) = post_chat_as(&gw, &sha(KEY), body.clone()).await;
    assert_eq!(status, 401);
    let (status, _) = key_self(&gw, "sk-nobody").await;
    assert_eq!(status, 401);
    let r = http()
        .get(format!("{}/models", gw.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(up.calls(), 0);

    // `x-api-key` is accepted too.
    let r = http()
        .post(&url)
        .header("x-api-key", KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // The allow list: `fast` yes, `smart` 403, an unknown model 404.
    let (status, _, text) = post_chat_as(&gw, KEY2, body.clone()).await;
    assert_eq!(status, 200, "{text}");
    let calls = up.calls();
    let (status, _, text) = post_chat_as(
        &gw,
        KEY2,
        json!({"model": "smart", "messages": user("hello")}),
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert_eq!(error_code(&text), "model_not_allowed");
    let (status, _, text) = post_chat_as(
        &gw,
        KEY2,
        json!({"model": "nope", "messages": user("hello")}),
    )
    .await;
    assert_eq!(status, 404, "{text}");
    assert_eq!(
        up.calls(),
        calls,
        "refused requests never reach the provider"
    );
    // The model list shows only what the key may use.
    let models: Value = http()
        .get(format!("{}/models", gw.base_url()))
        .bearer_auth(KEY2)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["fast"]);
    let (status, me) = key_self(&gw, KEY2).await;
    assert_eq!(status, 200);
    assert_eq!(me["name"], "limited");
    assert_eq!(me["allow"], json!(["fast"]));

    // A key whose secret comes from the environment.
    let (status, _, text) = post_chat_as(
        &gw,
        ENV_SECRET,
        json!({"model": "smart", "messages": user("hello")}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, me) = key_self(&gw, ENV_SECRET).await;
    assert_eq!(status, 200);
    assert_eq!(me["name"], "envkey");
    gw.shutdown().await;

    // An unset key_env is a config error naming the field.
    let err = triage::config::Config::parse(
        &config(
            &up.url,
            "[keys.ghost]\nkey_env = \"TRIAGE_LIMITS_TEST_UNSET_VAR\"\n",
        ),
        Path::new("."),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("keys.ghost.key_env"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_when_the_provider_counts_more_prompt_tokens_than_estimated() {
    // We estimate 8 prompt tokens; the provider bills 11 (dense text tokenizes
    // worse than ~4 bytes a token). The reservation's margin still covers it.
    let up = MockUpstream::start(|_, _| {
        Reply::Delay(
            Duration::from_millis(30),
            Box::new(completion_with_usage(11, 10, 0)),
        )
    })
    .await;
    let budget = 20 * HI_RESERVE;
    let extra = format!("budget = {}\nperiod = \"total\"\n", budget as f64 / 1e9);
    let gw = start_gateway(&config(&up.url, &extra)).await;
    let url = format!("{}/chat/completions", gw.base_url());
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                http()
                    .post(url)
                    .bearer_auth(KEY)
                    .json(&hi("fast", 10))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut ok = 0u64;
    for t in tasks {
        if t.await.unwrap() == 200 {
            ok += 1;
        }
    }
    let st = key_limits(&gw, "app").key;
    assert!(ok >= 20, "at least the reserved-for requests succeed: {ok}");
    assert_eq!(st.spent_nanos, ok * (11 * 1000 + 10 * 2000));
    assert!(
        st.spent_nanos <= budget,
        "spent {} of {budget}",
        st.spent_nanos
    );
    assert_eq!(st.reserved_nanos, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_overspend_the_budget() {
    // Every call costs exactly its reservation, so exactly 100 fit whatever
    // the interleaving; the delay keeps many of them in flight at once.
    let up = MockUpstream::start(|_, _| {
        Reply::Delay(
            Duration::from_millis(50),
            Box::new(completion_with_usage(12, 10, 0)),
        )
    })
    .await;
    let budget = 100 * HI_RESERVE; // 3_200_000 nano-dollars
    let extra = "budget = 0.0032\nperiod = \"total\"\n";
    let gw = start_gateway(&config(&up.url, extra)).await;
    assert_eq!(key_limits(&gw, "app").key.limits.budget_nanos, Some(budget));

    let client = http();
    let url = format!("{}/chat/completions", gw.base_url());
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(KEY)
                    .json(&hi("fast", 10))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").is_some();
                (status, retry, r.text().await.unwrap())
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                refused += 1;
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["error"]["code"], "insufficient_quota", "{body}");
                assert_eq!(v["error"]["type"], "insufficient_quota", "{body}");
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("Budget exceeded for key 'app'"),
                    "{body}"
                );
                // A budget only resets with its period: retrying soon cannot help.
                assert!(!retry, "no retry-after on a budget refusal");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    let st = key_limits(&gw, "app").key;
    println!(
        "overspend test: {ok} succeeded, {refused} refused, spent {} of budget {budget} nano-dollars (reserved {}, upstream calls {})",
        st.spent_nanos,
        st.reserved_nanos,
        up.calls()
    );
    assert_eq!(ok, 100);
    assert_eq!(refused, 200);
    assert_eq!(up.calls(), 100, "refusals happen before any upstream call");
    assert!(st.spent_nanos <= budget);
    assert_eq!(st.spent_nanos, budget);
    assert_eq!(st.reserved_nanos, 0);
    assert_eq!(st.in_flight, 0);
    assert_eq!(st.remaining_nanos, Some(0));

    // The same numbers over HTTP.
    let (status, me) = key_self(&gw, KEY).await;
    assert_eq!(status, 200);
    assert_eq!(me["limits"]["key"]["spent_nanos"], budget);
    assert_eq!(me["limits"]["key"]["remaining_nanos"], 0);
    assert_eq!(me["limits"]["key"]["spent_usd"], "0.0032");
    // And the next one is refused too.
    let (status, _, body) = post_chat(&gw, hi("fast", 1)).await;
    assert_eq!(status, 429);
    assert_eq!(error_code(&body), "insufficient_quota");
    gw.shutdown().await;
}

#[tokio::test]
async fn rpm_refuses_with_headers_and_recovers() {
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "rpm = 60\n")).await;
    let body = json!({"model": "fast", "messages": user("hi")});

    let (status, h, _) = post_chat(&gw, body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "x-ratelimit-limit-requests"), "60");
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "59");
    assert!(h.get("x-ratelimit-reset-requests").is_some());
    assert!(
        h.get("x-ratelimit-limit-tokens").is_none(),
        "no tpm configured"
    );

    // Burst = rpm; the window refills one request per second meanwhile, so
    // count until the first refusal instead of assuming timing.
    let mut ok = 1;
    let refusal = loop {
        let (status, h, text) = post_chat(&gw, body.clone()).await;
        match status {
            200 => ok += 1,
            429 => break (h, text),
            s => panic!("{s}: {text}"),
        }
        assert!(ok < 200, "rpm never refused");
    };
    assert!(ok >= 60, "only {ok} admitted before the first refusal");
    let (h, text) = refusal;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests per minute"),
        "{text}"
    );
    assert_eq!(header(&h, "retry-after"), "1");
    assert_eq!(header(&h, "x-ratelimit-limit-requests"), "60");
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");
    assert!(h.get("x-ratelimit-reset-requests").is_some());
    let calls = up.calls();

    // After retry-after, a request fits again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut recovered = false;
    for _ in 0..10 {
        let (status, h, _) = post_chat(&gw, body.clone()).await;
        if status == 200 {
            let remaining: u64 = header(&h, "x-ratelimit-remaining-requests")
                .parse()
                .unwrap();
            assert!(remaining < 60, "remaining {remaining}");
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "rpm did not recover after the window");
    assert_eq!(up.calls(), calls + 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn tpm_refuses_with_headers_and_recovers() {
    // 600 tokens per minute = 10 per second.
    let up = MockUpstream::start(|req, _| {
        let big = req["messages"][0]["content"].as_str().unwrap_or("").len() > 100;
        if big {
            // Reported usage = the admission estimate (607): no refund.
            completion_with_usage(600, 7, 0)
        } else {
            Reply::Echo
        }
    })
    .await;
    let gw = start_gateway(&config(&up.url, "tpm = 600\n")).await;
    // 2400 bytes -> 600 estimated tokens, + 7 for framing.
    let big = json!({"model": "fast", "messages": user(&"x".repeat(2400))});
    let small = json!({"model": "fast", "messages": user("hi")});

    let (status, h, text) = post_chat(&gw, big).await;
    assert_eq!(
        status, 200,
        "a request larger than the bucket passes on a full bucket: {text}"
    );
    assert_eq!(header(&h, "x-ratelimit-limit-tokens"), "600");
    assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), "0");
    assert!(h.get("x-ratelimit-reset-tokens").is_some());

    // The bucket is 7 tokens in debt; "hi" needs 8 more: 1.5 s.
    let (status, h, text) = post_chat(&gw, small.clone()).await;
    assert_eq!(status, 429, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per minute"),
        "{text}"
    );
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    assert_eq!(header(&h, "x-ratelimit-limit-tokens"), "600");
    assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), "0");
    assert!(h.get("x-ratelimit-reset-tokens").is_some());
    assert_eq!(up.calls(), 1);

    tokio::time::sleep(Duration::from_secs(retry)).await;
    let mut recovered = false;
    for _ in 0..10 {
        let (status, _, _) = post_chat(&gw, small.clone()).await;
        if status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "tpm did not recover after retry-after");
    assert_eq!(up.calls(), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_parallel_refuses_a_second_request_until_the_first_finishes() {
    let up = MockUpstream::start(|_, n| {
        if n == 0 {
            Reply::Delay(
                Duration::from_millis(1000),
                Box::new(Reply::Content("slow answer".into())),
            )
        } else {
            Reply::Content("quick".into())
        }
    })
    .await;
    let gw = start_gateway(&config(&up.url, "max_parallel = 1\nrpm = 1000\n")).await;
    let body = json!({"model": "fast", "messages": user("hi")});

    let url = format!("{}/chat/completions", gw.base_url());
    let b = body.clone();
    let first = tokio::spawn(async move {
        http()
            .post(url)
            .bearer_auth(KEY)
            .json(&b)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert!(
        eventually(|| up.calls() == 1).await,
        "first request never reached the mock"
    );
    assert_eq!(in_flight(&gw, "app"), 1);

    let (status, h, text) = post_chat(&gw, body.clone()).await;
    assert_eq!(status, 429, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Too many concurrent requests for key 'app'"),
        "{text}"
    );
    assert_eq!(header(&h, "retry-after"), "1");
    assert!(h.get("x-ratelimit-limit-requests").is_some());
    assert_eq!(up.calls(), 1, "the refused request was not sent upstream");

    assert_eq!(first.await.unwrap(), 200);
    assert!(eventually(|| in_flight(&gw, "app") == 0).await);
    let (status, _, text) = post_chat(&gw, body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(up.calls(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn team_limits_apply_on_top_of_key_limits() {
    let up = MockUpstream::start(|_, _| completion_with_usage(12, 10, 0)).await;
    const A: &str = "sk-team-a";
    const B: &str = "sk-team-b";
    const C: &str = "sk-team-c";
    const D: &str = "sk-team-d";
    // Team t: rpm 3 shared by two keys allowed 100 each.
    // Team u: a budget for two requests shared by two keys with $1 each.
    let extra = format!(
        r#"
[teams.t]
rpm = 3
[teams.u]
budget = {team_budget}
period = "total"
[keys.a]
key_sha256 = "{}"
team = "t"
rpm = 100
[keys.b]
key_sha256 = "{}"
team = "t"
rpm = 100
[keys.c]
key_sha256 = "{}"
team = "u"
budget = 1.0
[keys.d]
key_sha256 = "{}"
team = "u"
budget = 1.0
"#,
        sha(A),
        sha(B),
        sha(C),
        sha(D),
        team_budget = (2 * HI_RESERVE) as f64 / 1e9,
    );
    let gw = start_gateway(&config(&up.url, &extra)).await;

    // rpm: a, a, b fit the team's 3; then both keys are refused by the team.
    for k in [A, A, B] {
        let (status, h, text) = post_chat_as(&gw, k, hi("fast", 10)).await;
        assert_eq!(status, 200, "{text}");
        assert!(h.get("x-ratelimit-remaining-requests").is_some());
    }
    for k in [B, A] {
        let (status, h, text) = post_chat_as(&gw, k, hi("fast", 10)).await;
        assert_eq!(status, 429, "{text}");
        assert_eq!(error_code(&text), "rate_limit_exceeded");
        assert!(text.contains("team 't'"), "{text}");
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), "3");
        assert!(h.get("retry-after").is_some());
    }
    // Each key alone is far below its own rpm.
    let st = key_limits(&gw, "a");
    assert_eq!(st.team.as_ref().unwrap().name, "t");
    assert_eq!(st.key.limits.rpm, Some(100));

    // Budget: c and d each fit their own $1, but the team holds only two.
    for k in [C, D] {
        let (status, _, text) = post_chat_as(&gw, k, hi("fast", 10)).await;
        assert_eq!(status, 200, "{text}");
    }
    let calls = up.calls();
    for k in [C, D] {
        let (status, _, text) = post_chat_as(&gw, k, hi("fast", 10)).await;
        assert_eq!(status, 429, "{text}");
        assert_eq!(error_code(&text), "insufficient_quota");
        assert!(text.contains("team 'u'"), "{text}");
    }
    assert_eq!(up.calls(), calls);
    let (status, me) = key_self(&gw, C).await;
    assert_eq!(status, 200);
    assert_eq!(me["team"], "u");
    assert_eq!(me["limits"]["key"]["spent_nanos"], HI_RESERVE);
    assert_eq!(me["limits"]["team"]["spent_nanos"], 2 * HI_RESERVE);
    assert_eq!(me["limits"]["team"]["remaining_nanos"], 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_spend() {
    let dir = tempfile::tempdir().unwrap();
    let up = MockUpstream::start(|_, _| completion_with_usage(12, 10, 0)).await;
    // Room for exactly three requests.
    let extra = format!(
        "budget = {}\nperiod = \"total\"\n",
        (3 * HI_RESERVE) as f64 / 1e9
    );
    let toml = sqlite_config(&up.url, &extra, dir.path());

    let gw = start_gateway(&toml).await;
    for _ in 0..2 {
        let (status, _, text) = post_chat(&gw, hi("fast", 10)).await;
        assert_eq!(status, 200, "{text}");
    }
    let (_, before) = key_self(&gw, KEY).await;
    assert_eq!(before["limits"]["key"]["spent_nanos"], 2 * HI_RESERVE);
    gw.state.flush();
    gw.shutdown().await;

    let gw = start_gateway(&toml).await;
    let (status, after) = key_self(&gw, KEY).await;
    assert_eq!(status, 200);
    assert_eq!(
        after["limits"]["key"]["spent_nanos"],
        before["limits"]["key"]["spent_nanos"]
    );
    assert_eq!(after["limits"]["key"]["remaining_nanos"], HI_RESERVE);
    // The reloaded spend is enforced: one more fits, then the budget is gone.
    let (status, _, text) = post_chat(&gw, hi("fast", 10)).await;
    assert_eq!(status, 200, "{text}");
    let (status, _, text) = post_chat(&gw, hi("fast", 10)).await;
    assert_eq!(status, 429, "{text}");
    assert_eq!(error_code(&text), "insufficient_quota");
    assert_eq!(up.calls(), 3);
    gw.state.flush();
    gw.shutdown().await;
}

/// Kills the child on drop, so a failing test leaves no gateway behind.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
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

/// `triage spend` rows for a key: (spent_usd, requests).
fn spend_cli(cfg: &Path, key: &str) -> Option<(String, u64)> {
    let out = std::process::Command::new(BIN)
        .args(["spend", "--config"])
        .arg(cfg)
        .args(["--period", "total"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "triage spend failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.len() == 4 && cols[0] == key && cols[1] == "total")
            .then(|| (cols[2].to_string(), cols[3].parse().unwrap()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_at_most_the_writer_batch_window() {
    const N: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let up = MockUpstream::start(|_, _| completion_with_usage(12, 10, 0)).await;
    let cfg = dir.path().join("triage.toml");
    std::fs::write(&cfg, sqlite_config(&up.url, "", &state)).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let child = std::process::Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&cfg)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = http();
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log_text = || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
    assert!(ready, "child gateway never became ready:\n{}", log_text());

    for i in 0..N {
        let r = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&hi("fast", 10))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            200,
            "request {i}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    // The writer lingers 25 ms per batch; 200 ms is well past it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    child.0.kill().unwrap(); // SIGKILL: no flush, no drain
    let status = child.0.wait().unwrap();
    assert!(!status.success());

    let (usd, requests) =
        spend_cli(&cfg, "app").unwrap_or_else(|| panic!("no spend row for app\n{}", log_text()));
    println!("after SIGKILL: {requests} of {N} requests recorded, ${usd}");
    assert!(
        requests >= N - 1,
        "only {requests} of {N} settled requests survived SIGKILL"
    );
    assert!(requests <= N);

    // A fresh gateway on the same directory starts from the recorded spend.
    let gw = start_gateway(&std::fs::read_to_string(&cfg).unwrap()).await;
    assert_eq!(spent(&gw, "app"), requests * HI_RESERVE);
    assert_eq!(
        triage::limits::nanos_to_usd_string(requests * HI_RESERVE),
        usd
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_settles_a_partial_charge() {
    let words: Vec<String> = (1..=40).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let t = text.clone();
    // Call 0 streams the whole answer at once (the full cost); call 1 slowly.
    let up = MockUpstream::start(move |_, n| match n {
        0 => Reply::Content(t.clone()),
        1 => Reply::SlowStream(t.clone(), Duration::from_millis(50)),
        _ => Reply::Content("ok".into()),
    })
    .await;
    let gw = start_gateway(&config(&up.url, "max_parallel = 1\n")).await;
    let body = json!({"model": "fast", "messages": user("hi"), "stream": true});

    let (status, _, full_body) = post_chat(&gw, body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(sse_content(&full_body), text);
    assert!(eventually(|| in_flight(&gw, "app") == 0).await);
    let full = spent(&gw, "app");
    // Mock usage: prompt 2, completion 40 at $1 / $2 per Mtok.
    assert_eq!(full, 2 * 1000 + 40 * 2000);

    let mut resp = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut seen = String::new();
    while sse_data(&seen).len() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(
            &chunk.expect("stream ended early"),
        ));
    }
    assert_eq!(in_flight(&gw, "app"), 1);
    drop(resp);

    assert!(
        eventually(|| in_flight(&gw, "app") == 0 && spent(&gw, "app") > full).await,
        "abandoned stream never settled: {:?}",
        key_limits(&gw, "app")
    );
    let partial = spent(&gw, "app") - full;
    println!("partial charge {partial} nano-dollars vs full answer {full}");
    assert!(
        partial > 0 && partial < full,
        "partial {partial}, full {full}"
    );
    assert_eq!(key_limits(&gw, "app").key.reserved_nanos, 0);
    assert!(
        eventually(|| up.state.cancelled.load(std::sync::atomic::Ordering::SeqCst) >= 1).await,
        "upstream stream not cancelled"
    );

    // The parallel permit came back: a max_parallel = 1 key can go on.
    let (status, _, text) =
        post_chat(&gw, json!({"model": "fast", "messages": user("again")})).await;
    assert_eq!(status, 200, "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn known_usage_costs_exact_nano_dollars() {
    let up = MockUpstream::start(|req, _| {
        if req["model"] == "priced-upstream" {
            completion_with_usage(1000, 500, 400)
        } else if req["model"] == "cheap-upstream" {
            completion_with_usage(3, 0, 0)
        } else {
            Reply::Content("a b c".into())
        }
    })
    .await;
    let extra = r#"
[models.priced]
provider = "up"
upstream_model = "priced-upstream"
price = { input = 2.5, cached_input = 1.25, output = 10.0 }
max_output_tokens = 1000
[models.cheap]
provider = "up"
upstream_model = "cheap-upstream"
price = { input = 0.0001, output = 0.0 }
max_output_tokens = 10
"#;
    let gw = start_gateway(&config(&up.url, extra)).await;

    // 600 uncached * 2500 + 400 cached * 1250 + 500 * 10000 nano-dollars per token.
    let (status, _, text) = post_chat(
        &gw,
        json!({"model": "priced", "messages": user("price me")}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(spent(&gw, "app"), 1_500_000 + 500_000 + 5_000_000);
    let (_, me) = key_self(&gw, KEY).await;
    assert_eq!(me["limits"]["key"]["spent_usd"], "0.007");

    // A fraction of a nano-dollar rounds up, never down.
    let (status, _, text) = post_chat(&gw, json!({"model": "cheap", "messages": user("x")})).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(spent(&gw, "app"), 7_000_001);

    // A stream is charged from its usage chunk: prompt 2, completion 3 on `fast`.
    let (status, _, body) = post_chat(
        &gw,
        json!({"model": "fast", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sse_content(&body), "a b c");
    assert!(
        eventually(|| spent(&gw, "app") == 7_000_001 + 2 * 1000 + 3 * 2000).await,
        "{:?}",
        key_limits(&gw, "app")
    );
    assert_eq!(key_limits(&gw, "app").key.reserved_nanos, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn keys_new_prints_a_key_and_its_hash() {
    let out = std::process::Command::new(BIN)
        .args(["keys", "new", "--name", "x"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout
        .lines()
        .find_map(|l| l.split_whitespace().last().filter(|w| w.starts_with("sk-")))
        .unwrap_or_else(|| panic!("no key in:\n{stdout}"))
        .to_string();
    let hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key_sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no key_sha256 line in:\n{stdout}"))
        .to_string();
    assert_eq!(hash, sha(&key));
    assert_eq!(hash.len(), 64);
    assert!(stdout.contains("[keys.x]"), "{stdout}");
    // The key itself is random.
    let again = std::process::Command::new(BIN)
        .args(["keys", "new", "--name", "x"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&again.stdout).contains(&key));

    // The printed TOML works as is.
    let snippet = &stdout[stdout.find("[keys.x]").unwrap()..];
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, &format!("\n{snippet}"))).await;
    let (status, _, text) =
        post_chat_as(&gw, &key, json!({"model": "fast", "messages": user("hi")})).await;
    assert_eq!(status, 200, "{text}");
    let (_, me) = key_self(&gw, &key).await;
    assert_eq!(me["name"], "x");
    gw.shutdown().await;
}

#[tokio::test]
async fn completions_and_embeddings_are_metered_and_limited() {
    // Text completions and embeddings draw on the same budget as chat.
    let up = MockUpstream::start(|req, _| {
        let body = if req.get("input").is_some() {
            json!({"object": "list", "model": req["model"],
                   "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                   "usage": {"prompt_tokens": 5, "total_tokens": 5}})
        } else {
            json!({"id": "c", "object": "text_completion", "created": 1, "model": req["model"],
                   "choices": [{"index": 0, "text": "seven words of plain text here now", "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})
        };
        Reply::Raw(200, "application/json", body.to_string())
    })
    .await;
    // Reservations: completion 3 * 1000 + 10 * 2000 = 23000, embedding 3 * 1000.
    let gw = start_gateway(&config(&up.url, "budget = 0.000024\nperiod = \"total\"\n")).await;
    let c = http();
    let post = |path: &'static str, body: Value| {
        let c = c.clone();
        let url = format!("{}{path}", gw.base_url());
        async move {
            let r = c
                .post(url)
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let limit = r.headers().get("x-ratelimit-remaining-requests").is_some();
            (status, limit, r.text().await.unwrap())
        }
    };
    let completion = json!({"model": "fast", "prompt": "hello", "max_tokens": 10});
    let (status, _, body) = post("/completions", completion.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(spent(&gw, "app"), 5 * 1000 + 7 * 2000);
    let (status, _, body) = post("/completions", completion).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&body), "insufficient_quota");
    let (status, _, body) = post("/embeddings", json!({"model": "fast", "input": "hello"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(spent(&gw, "app"), 5 * 1000 + 7 * 2000 + 5 * 1000);
    assert_eq!(
        up.calls(),
        2,
        "the refused completion never reached the provider"
    );
    let (status, _, _) = post("/embeddings", json!({"model": "fast", "input": "hello"})).await;
    assert_eq!(status, 429);
    gw.shutdown().await;
}

#[tokio::test]
async fn streamed_completions_are_charged_from_their_usage_chunk() {
    // The common mock streams chat-shaped chunks; what matters here is that
    // usage is asked for upstream, hidden from a client that did not ask, and billed.
    let up = MockUpstream::echo().await;
    let gw = start_gateway(&config(&up.url, "")).await;
    let r = http()
        .post(format!("{}/completions", gw.base_url()))
        .bearer_auth(KEY)
        .json(&json!({"model": "fast", "prompt": "hello", "stream": true, "messages": user("one two")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(
        !body.contains("\"usage\""),
        "usage stays hidden unless asked for: {body}"
    );
    assert_eq!(up.last_request()["stream_options"]["include_usage"], true);
    // echo: "echo: one two" -> 3 completion tokens; prompt 2 words + 1.
    assert!(
        eventually(|| spent(&gw, "app") == 3 * 1000 + 3 * 2000).await,
        "spent {}",
        spent(&gw, "app")
    );
    gw.shutdown().await;
}
