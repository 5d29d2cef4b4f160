#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Many replicas, one set of limits: three in-process gateways share rate limits and budgets
//! through a real `redis-server` child process, which the tests kill and restart.
mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use triage::limits::SubjectKind;
use triage::server::Gateway;
use triage::store::SpendLedger;

/// `extra` goes into `[keys.app]` first (limits of the key `app` = KEY), then may add tables.
fn redis_config(
    upstream: &str,
    redis: &str,
    policy: &str,
    state_dir: &std::path::Path,
    extra: &str,
) -> String {
    let extra = format!(
        r#"{extra}
[keys.other]
key_sha256 = "{}"
rpm = {{RPM}}
[models.flat]
provider = "up"
upstream_model = "flat-upstream"
price = {{ input = 0.0, output = 1000.0 }}
max_output_tokens = 1
"#,
        sha(KEY2)
    );
    let store = format!(
        "[store]\nkind = \"redis\"\nurl = \"{redis}\"\non_unavailable = \"{policy}\"\nstate_dir = \"{}\"\nreservation_ttl = \"1m\"\ntimeout = \"2s\"\n",
        state_dir.display()
    );
    let toml = config(upstream, &extra).replace("[store]\nkind = \"memory\"\n", &store);
    assert!(toml.contains("kind = \"redis\""));
    toml
}

struct Fleet {
    gws: Vec<Gateway>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn fleet(
    upstream: &str,
    redis: &str,
    policy: &str,
    app_limits: &str,
    other_rpm: u32,
) -> Fleet {
    let mut gws = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let toml = redis_config(upstream, redis, policy, dir.path(), app_limits)
            .replace("{RPM}", &other_rpm.to_string());
        gws.push(start_gateway(&toml).await);
        dirs.push(dir);
    }
    Fleet { gws, _dirs: dirs }
}

impl Fleet {
    async fn shutdown(self) {
        for g in self.gws {
            g.shutdown().await;
        }
    }
}

fn body() -> Value {
    json!({"model": "flat", "messages": user("hi"), "max_tokens": 1})
}

/// (status, error code) of one chat request.
async fn ask(gw: &Gateway, key: &str) -> (u16, String) {
    let (status, _, text) = post_chat_as(gw, key, body()).await;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

fn metric(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    let samples = triage::metrics::parse_text(&gw.state.metrics.render());
    triage::metrics::sum_samples(&samples, name, labels).unwrap_or(0.0)
}

async fn key_self(gw: &Gateway) -> Value {
    get_json(&http(), format!("{}/triage/keys/self", gw.base_url())).await
}

/// Polls `gw` until its limiter reaches Redis again (a status read: it consumes no limit).
async fn until_up(gw: &Gateway) -> bool {
    for _ in 0..100 {
        key_self(gw).await;
        if metric(gw, "triage_store_up", &[]) == 1.0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_budget_and_one_rpm() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let up = MockUpstream::start(|_, _| Reply::Content("ok".into())).await;
    // One request costs exactly its reservation: 1 output token at $1000/M = $0.001.
    let f = fleet(
        &up.url,
        &redis.url(),
        "fail_closed",
        "budget = 0.1\nperiod = \"monthly\"",
        10,
    )
    .await;

    // 300 concurrent requests, round-robin over the three replicas: exactly 100 fit the budget.
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let url = f.gws[i % 3].base_url();
            tokio::spawn(async move {
                let r = http()
                    .post(format!("{url}/chat/completions"))
                    .bearer_auth(KEY)
                    .json(&body())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                (
                    status,
                    v["error"]["code"].as_str().unwrap_or("").to_string(),
                )
            })
        })
        .collect();
    let mut ok = 0;
    let mut over_budget = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => ok += 1,
            (429, code) if code == "insufficient_quota" => over_budget += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((ok, over_budget), (100, 200));
    assert_eq!(up.calls(), 100);
    let served: f64 = f
        .gws
        .iter()
        .map(|g| metric(g, "triage_requests_total", &[("status_class", "2xx")]))
        .sum();
    assert_eq!(served, 100.0);

    // Every replica reads the same shared spend.
    for gw in &f.gws {
        let st = key_self(gw).await;
        assert_eq!(
            st["limits"]["key"]["spent_nanos"],
            json!(100_000_000u64),
            "{st}"
        );
        assert_eq!(st["limits"]["key"]["reserved_nanos"], json!(0));
        assert_eq!(st["limits"]["key"]["remaining_nanos"], json!(0), "{st}");
    }
    // Each replica also wrote its own settlements to its durable ledger; together, all of them.
    let mut ledger_total = 0;
    for gw in &f.gws {
        let l = gw
            .state
            .ledger
            .as_ref()
            .expect("redis store keeps a local ledger");
        l.flush().unwrap();
        ledger_total += l.spent_since(SubjectKind::Key, "app", 0).unwrap();
    }
    assert_eq!(ledger_total, 100_000_000);

    // rpm = 10 for `other`: 30 requests over three replicas, exactly 10 pass.
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let url = f.gws[i % 3].base_url();
            tokio::spawn(async move {
                let r = http()
                    .post(format!("{url}/chat/completions"))
                    .bearer_auth(KEY2)
                    .json(&body())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let remaining = r
                    .headers()
                    .get("x-ratelimit-remaining-requests")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, remaining)
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let (status, remaining) = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        assert!(remaining.is_some(), "rate headers on every answer");
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_closed_refuses_while_redis_is_down_and_recovers_on_restart() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let up = MockUpstream::start(|_, _| Reply::Content("ok".into())).await;
    let f = fleet(&up.url, &redis.url(), "fail_closed", "", 3).await;
    assert_eq!(ask(&f.gws[0], KEY).await.0, 200);

    redis.kill();
    for gw in &f.gws {
        assert_eq!(ask(gw, KEY).await, (503, "store_unavailable".to_string()));
    }
    let (status, headers, text) = post_chat_as(&f.gws[1], KEY, body()).await;
    assert_eq!(status, 503);
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    assert!(
        metric(
            &f.gws[1],
            "triage_store_unavailable_total",
            &[("op", "admit"), ("outcome", "refused")]
        ) >= 1.0
    );
    assert_eq!(metric(&f.gws[1], "triage_store_up", &[]), 0.0);
    assert_eq!(
        up.calls(),
        1,
        "nothing reached the provider while the limits were unknown"
    );

    // Same port, empty Redis: the replicas reconnect on their own.
    let _redis = Redis::start_on(redis.port).await.unwrap();
    for gw in &f.gws {
        assert!(until_up(gw).await, "replica reconnected");
    }
    // The limits are shared again (Redis restarted empty): `other` has rpm 3 across the fleet.
    assert_eq!(ask(&f.gws[0], KEY2).await.0, 200);
    assert_eq!(ask(&f.gws[1], KEY2).await.0, 200);
    assert_eq!(ask(&f.gws[2], KEY2).await.0, 200);
    assert_eq!(
        ask(&f.gws[0], KEY2).await,
        (429, "rate_limit_exceeded".to_string())
    );
    assert_eq!(ask(&f.gws[1], KEY2).await.0, 429);
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_uses_local_limits_while_redis_is_down() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let up = MockUpstream::start(|_, _| Reply::Content("ok".into())).await;
    let f = fleet(&up.url, &redis.url(), "fail_open", "", 2).await;
    // Shared: rpm 2 across the fleet.
    assert_eq!(ask(&f.gws[0], KEY2).await.0, 200);
    assert_eq!(ask(&f.gws[1], KEY2).await.0, 200);
    assert_eq!(
        ask(&f.gws[2], KEY2).await,
        (429, "rate_limit_exceeded".to_string())
    );

    redis.kill();
    // Each replica now enforces the same limits on its own.
    assert_eq!(ask(&f.gws[0], KEY2).await.0, 200);
    assert_eq!(ask(&f.gws[0], KEY2).await.0, 200);
    assert_eq!(
        ask(&f.gws[0], KEY2).await,
        (429, "rate_limit_exceeded".to_string())
    );
    assert_eq!(ask(&f.gws[1], KEY2).await.0, 200);
    assert!(
        metric(
            &f.gws[0],
            "triage_store_unavailable_total",
            &[("op", "admit"), ("outcome", "local")]
        ) >= 1.0
    );
    assert_eq!(metric(&f.gws[0], "triage_store_up", &[]), 0.0);

    // Back on the same port (empty): each replica reconnects on its own and the shared rpm
    // applies again. Gateway 0's local rpm is spent, so its 200 comes from Redis.
    let _redis = Redis::start_on(redis.port).await.unwrap();
    for gw in &f.gws {
        assert!(until_up(gw).await, "replica reconnected");
    }
    assert_eq!(ask(&f.gws[0], KEY2).await.0, 200);
    assert_eq!(ask(&f.gws[1], KEY2).await.0, 200);
    // Gateway 2 never used its local limits; the shared rpm refuses it.
    assert_eq!(
        ask(&f.gws[2], KEY2).await,
        (429, "rate_limit_exceeded".to_string())
    );
    f.shutdown().await;
}

#[test]
fn store_config_is_validated_with_key_paths() {
    let base = config("http://127.0.0.1:9/v1", "");
    let with = |store: &str| base.replace("[store]\nkind = \"memory\"\n", store);
    let parse = |toml: String| triage::config::Config::parse(&toml, std::path::Path::new("."));

    let cfg = parse(with(
        "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n",
    ))
    .unwrap();
    match &cfg.store {
        triage::config::StoreConfig::Redis {
            on_unavailable,
            key_prefix,
            reservation_ttl,
            state_dir,
            ..
        } => {
            assert_eq!(*on_unavailable, triage::config::OnUnavailable::FailClosed);
            assert_eq!(key_prefix, "triage");
            assert_eq!(*reservation_ttl, Duration::from_secs(600));
            assert_eq!(state_dir, std::path::Path::new("state"));
        }
        other => panic!("{other:?}"),
    }
    let cfg = parse(with(
        "[store]\nkind = \"redis\"\nurl = \"redis://r:6379/\"\non_unavailable = \"fail_open\"\nreservation_ttl = \"5s\"\n",
    ))
    .unwrap();
    assert!(matches!(
        cfg.store,
        triage::config::StoreConfig::Redis {
            on_unavailable: triage::config::OnUnavailable::FailOpen,
            ..
        }
    ));
    // A ttl shorter than a request may run is allowed, with a warning.
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.starts_with("store.reservation_ttl:")),
        "{:?}",
        cfg.warnings
    );

    let err = parse(with(
        "[store]\nkind = \"redis\"\non_unavailable = \"maybe\"\nkey_prefix = \"a{b}\"\nreservation_ttl = \"0s\"\n",
    ))
    .unwrap_err()
    .to_string();
    for path in [
        "store.url:",
        "store.on_unavailable:",
        "store.key_prefix:",
        "store.reservation_ttl:",
    ] {
        assert!(err.contains(path), "{path} missing in:\n{err}");
    }
    let err = parse(with("[store]\nkind = \"redis\"\nurl = \"http://x\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("store.url:"), "{err}");
    let err = parse(with("[store]\nkind = \"sqlite\"\nurl = \"redis://x/\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("store.url: only applies to kind = \"redis\""),
        "{err}"
    );
    let err = parse(with("[store]\nkind = \"etcd\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("store.kind:"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Agent sessions and the response cache, shared through Redis.

const KEY3: &str = "sk-test-key-3";

/// Three replicas on `redis` with `extra` appended under `[keys.app]` (then any tables).
async fn fleet_with(upstream: &str, redis: &str, policy: &str, extra: &str) -> Fleet {
    let mut gws = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let store = format!(
            "[store]\nkind = \"redis\"\nurl = \"{redis}\"\non_unavailable = \"{policy}\"\nstate_dir = \"{}\"\nreservation_ttl = \"1m\"\n",
            dir.path().display()
        );
        let toml = config(upstream, extra).replace("[store]\nkind = \"memory\"\n", &store);
        assert!(toml.contains("kind = \"redis\""));
        gws.push(start_gateway(&toml).await);
        dirs.push(dir);
    }
    Fleet { gws, _dirs: dirs }
}

/// Guards: `app` max 3 turns; `other` max 1 token; `ttl` max 1 turn, forgotten after 2 s idle.
fn session_guards() -> String {
    format!(
        r#"[keys.app.guard]
max_turns = 3
[keys.other]
key_sha256 = "{}"
[keys.other.guard]
max_tokens = 1
[keys.ttl]
key_sha256 = "{}"
[keys.ttl.guard]
max_turns = 1
idle_ttl = "2s"
"#,
        sha(KEY2),
        sha(KEY3)
    )
}

/// (status, headers, body) of a chat request in session `session`.
async fn in_session(
    gw: &Gateway,
    key: &str,
    session: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = http()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(key)
        .header("x-triage-session", session)
        .json(&json!({"model": "fast", "messages": user("hello")}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

fn redis_con(redis: &Redis) -> redis::Connection {
    redis.connection()
}

/// Redis key of a key-guard session (`{triage:session:LEN:SCOPE:ID}`).
fn session_key(key_name: &str, id: &str) -> String {
    let scope = format!("key:{key_name}");
    format!("{{triage:session:{}:{scope}:{id}}}", scope.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_are_shared_by_three_replicas() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let up = MockUpstream::start(|_, _| Reply::Content("ok".into())).await;
    let f = fleet_with(&up.url, &redis.url(), "fail_closed", &session_guards()).await;

    // max_turns = 3, twelve concurrent requests of one session over three replicas: exactly 3.
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let url = f.gws[i % 3].base_url();
            tokio::spawn(async move {
                let r = http()
                    .post(format!("{url}/chat/completions"))
                    .bearer_auth(KEY)
                    .header("x-triage-session", "run-1")
                    .json(&json!({"model": "fast", "messages": user("hello")}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let limit = r
                    .headers()
                    .get("x-triage-session-limit")
                    .map(|v| v.to_str().unwrap().to_string());
                let v: Value = r.json().await.unwrap();
                (
                    status,
                    v["error"]["code"].as_str().map(str::to_string),
                    limit,
                )
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, _, _) => ok += 1,
            (429, Some(code), Some(limit)) => {
                assert_eq!(code, "session_limit_exceeded");
                assert_eq!(limit, "turns=3/3");
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(up.calls(), 3, "refused turns never reach the provider");
    // Every replica reads the same counters; refused requests were not counted.
    let run1 = triage::guard::SessionKey::new("key:app", "run-1");
    for gw in &f.gws {
        let u = gw.state.sessions.usage(&run1).await.unwrap();
        assert_eq!(u.turns, 3);
    }
    // Another session of the same key is independent.
    assert_eq!(in_session(&f.gws[2], KEY, "run-1b").await.0, 200);

    // Tokens recorded by one replica count on another: max_tokens = 1 is reached by one answer.
    assert_eq!(in_session(&f.gws[0], KEY2, "run-2").await.0, 200);
    let run2 = triage::guard::SessionKey::new("key:other", "run-2");
    let mut tokens = 0;
    for _ in 0..200 {
        if let Some(u) = f.gws[1].state.sessions.usage(&run2).await {
            tokens = u.tokens;
            if tokens > 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(tokens > 1, "usage recorded on replica 0, read on replica 1");
    let (status, h, v) = in_session(&f.gws[2], KEY2, "run-2").await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(
        h.get("x-triage-session-limit").unwrap(),
        &format!("tokens={tokens}/1")
    );

    // Idle TTL: the hash expires idle_ttl after its last touch; then the session starts over.
    let mut con = redis_con(&redis);
    assert_eq!(in_session(&f.gws[0], KEY3, "run-3").await.0, 200);
    let k = session_key("ttl", "run-3");
    let pttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut con).unwrap();
    assert!(pttl > 0 && pttl <= 2000, "pttl {pttl}");
    let first: u64 = redis::cmd("HGET")
        .arg(&k)
        .arg("first")
        .query(&mut con)
        .unwrap();
    let (status, h, _) = in_session(&f.gws[1], KEY3, "run-3").await;
    assert_eq!(status, 429);
    assert_eq!(h.get("x-triage-session-limit").unwrap(), "turns=1/1");
    // The refusal renewed the TTL but neither counted a turn nor moved first_seen.
    let (turns, first_after): (u64, u64) = redis::cmd("HMGET")
        .arg(&k)
        .arg("turns")
        .arg("first")
        .query(&mut con)
        .unwrap();
    assert_eq!((turns, first_after), (1, first));
    let mut gone = false;
    for _ in 0..100 {
        let n: i64 = redis::cmd("EXISTS").arg(&k).query(&mut con).unwrap();
        if n == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "session expired after idle_ttl");
    assert_eq!(in_session(&f.gws[2], KEY3, "run-3").await.0, 200);
    let run3 = triage::guard::SessionKey::new("key:ttl", "run-3");
    assert_eq!(f.gws[2].state.sessions.usage(&run3).await.unwrap().turns, 1);
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_follow_the_unavailability_policy() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let up = MockUpstream::start(|_, _| Reply::Content("ok".into())).await;
    let closed = fleet_with(&up.url, &redis.url(), "fail_closed", &session_guards()).await;
    let open = fleet_with(&up.url, &redis.url(), "fail_open", &session_guards()).await;
    assert_eq!(in_session(&open.gws[0], KEY, "s").await.0, 200);
    redis.kill();

    // fail_closed: the session store refuses (before the limiter is even asked).
    let (status, h, v) = in_session(&closed.gws[0], KEY, "s").await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable");
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert!(
        metric(
            &closed.gws[0],
            "triage_store_unavailable_total",
            &[("op", "session"), ("outcome", "refused")]
        ) >= 1.0
    );

    // fail_open: each replica counts the session on its own (max_turns = 3 per replica).
    for _ in 0..3 {
        assert_eq!(in_session(&open.gws[1], KEY, "s").await.0, 200);
    }
    let (status, h, _) = in_session(&open.gws[1], KEY, "s").await;
    assert_eq!(status, 429);
    assert_eq!(h.get("x-triage-session-limit").unwrap(), "turns=3/3");
    assert!(
        metric(
            &open.gws[1],
            "triage_store_unavailable_total",
            &[("op", "session"), ("outcome", "local")]
        ) >= 1.0
    );

    // Back on the same port (empty): the session store reconnects on its own.
    let redis = Redis::start_on(redis.port).await.unwrap();
    let mut back = false;
    for _ in 0..100 {
        if in_session(&closed.gws[0], KEY, "s2").await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "sessions served from redis again");
    let n: i64 = redis::cmd("EXISTS")
        .arg(session_key("app", "s2"))
        .query(&mut redis_con(&redis))
        .unwrap();
    assert_eq!(n, 1);
    closed.shutdown().await;
    open.shutdown().await;
}

/// Waits until Redis holds `n` shared cache entries; returns their keys.
async fn cache_keys(con: &mut redis::Connection, n: usize) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for _ in 0..200 {
        keys = redis::cmd("KEYS")
            .arg("{triage:cache:*")
            .query(con)
            .unwrap();
        if keys.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_cache_answers_from_another_replica() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let up = MockUpstream::start(|req, _| {
        if req["messages"][0]["content"] == "long" {
            Reply::Content("x".repeat(10_000))
        } else {
            Reply::Content("the cached answer".into())
        }
    })
    .await;
    // Entries up to max_bytes / 8 = 8 KiB are cached (and shared).
    let extra = "[cache]\nshared = true\nttl = \"1m\"\nmax_bytes = 65536\n";
    let f = fleet_with(&up.url, &redis.url(), "fail_closed", extra).await;
    let mut con = redis_con(&redis);
    let ask = |stream: bool, text: &str| json!({"model": "fast", "messages": user(text), "stream": stream});

    // Replica 0 fills (non-streamed); replica 1 answers from Redis, replica 2 streams it.
    let (status, _, first) = post_chat(&f.gws[0], ask(false, "q1")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(up.calls(), 1);
    let keys = cache_keys(&mut con, 1).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let pttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut con).unwrap();
    assert!(pttl > 0 && pttl <= 60_000, "entry TTL {pttl}");
    let (status, h, text) = post_chat(&f.gws[1], ask(false, "q1")).await;
    assert_eq!(status, 200);
    assert_eq!(h.get("x-triage-cache").unwrap(), "hit");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "the cached answer");
    assert_eq!(
        v["usage"],
        serde_json::from_str::<Value>(&first).unwrap()["usage"]
    );
    let (status, h, text) = post_chat(&f.gws[2], ask(true, "q1")).await;
    assert_eq!(status, 200);
    assert_eq!(h.get("x-triage-cache").unwrap(), "hit");
    assert_eq!(sse_content(&text), "the cached answer");
    assert_eq!(up.calls(), 1, "no upstream call for a shared hit");
    let shared_hits = |gw: &Gateway| {
        gw.state
            .cache
            .load()
            .as_ref()
            .as_ref()
            .unwrap()
            .stats()
            .shared_hits
    };
    assert_eq!(shared_hits(&f.gws[1]), 1);
    // Now in replica 1's memory too: the next hit does not ask Redis.
    assert_eq!(post_chat(&f.gws[1], ask(false, "q1")).await.0, 200);
    assert_eq!(shared_hits(&f.gws[1]), 1);

    // A streamed fill shares its chunks: replayed as a stream elsewhere, chunk for chunk.
    let (status, _, streamed) = post_chat(&f.gws[1], ask(true, "q2")).await;
    assert_eq!(status, 200);
    assert_eq!(up.calls(), 2);
    assert_eq!(cache_keys(&mut con, 2).await.len(), 2);
    let (status, h, replay) = post_chat(&f.gws[0], ask(true, "q2")).await;
    assert_eq!(status, 200);
    assert_eq!(h.get("x-triage-cache").unwrap(), "hit");
    assert_eq!(sse_content(&replay), sse_content(&streamed));
    assert_eq!(sse_data(&replay).len(), sse_data(&streamed).len());
    let (_, h, text) = post_chat(&f.gws[2], ask(false, "q2")).await;
    assert_eq!(h.get("x-triage-cache").unwrap(), "hit");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "the cached answer");
    assert_eq!(up.calls(), 2);

    // Too large for the cache: neither kept nor shared.
    assert_eq!(post_chat(&f.gws[0], ask(false, "long")).await.0, 200);
    assert_eq!(post_chat(&f.gws[1], ask(false, "long")).await.0, 200);
    assert_eq!(up.calls(), 4);
    let n: usize = redis::cmd("KEYS")
        .arg("{triage:cache:*")
        .query::<Vec<String>>(&mut con)
        .unwrap()
        .len();
    assert_eq!(n, 2);
    f.shutdown().await;
}

#[test]
fn shared_cache_needs_the_redis_store() {
    let parse = |toml: String| triage::config::Config::parse(&toml, std::path::Path::new("."));
    let err = parse(config("http://127.0.0.1:9/v1", "[cache]\nshared = true\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cache.shared: needs [store] kind = \"redis\""),
        "{err}"
    );
    let toml = config("http://127.0.0.1:9/v1", "[cache]\nshared = true\n").replace(
        "[store]\nkind = \"memory\"\n",
        "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n",
    );
    assert!(parse(toml).unwrap().cache.shared);
}

/// A Redis that stalls (`DEBUG SLEEP 2`) stalls nothing else: no Redis call runs on a worker
/// thread or in `Drop`, so health checks and requests limited in memory answer at once, and
/// requests limited through Redis wait at most the store timeout before the policy applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_does_not_stall_other_requests() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let up = MockUpstream::start(|_, _| Reply::Content("ok".into())).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = redis_config(&up.url, &redis.url(), "fail_open", dir.path(), "")
        .replace("{RPM}", "1000")
        .replace("timeout = \"2s\"\n", "timeout = \"100ms\"\n");
    let shared = start_gateway(&toml).await;
    // A gateway with its limits in memory, in the same runtime.
    let flat = "rpm = 1000\n[models.flat]\nprovider = \"up\"\nupstream_model = \"flat-upstream\"\nprice = { input = 0.0, output = 1000.0 }\nmax_output_tokens = 1\n";
    let local = start_gateway(&config(&up.url, flat)).await;
    // Connected, scripts loaded, and one settlement in flight when Redis stops answering.
    assert_eq!(ask(&shared, KEY).await.0, 200);

    // One client, warmed up: building one costs more than the answers measured here.
    let client = http();
    let healthz_url = format!("http://{}/healthz", shared.addr);
    assert_eq!(client.get(&healthz_url).send().await.unwrap().status(), 200);

    let sleeper = redis.stall(2.0).await;
    let stalled_at = Instant::now();
    // More requests on Redis than there are worker threads.
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let url = shared.base_url();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = http()
                    .post(format!("{url}/chat/completions"))
                    .bearer_auth(KEY)
                    .json(&body())
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let t = Instant::now();
    let health = client.get(&healthz_url).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let healthz = t.elapsed();
    let t = Instant::now();
    let r = client
        .post(format!("{}/chat/completions", local.base_url()))
        .bearer_auth(KEY)
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let memory_limited = t.elapsed();
    println!("while redis sleeps: /healthz {healthz:?}, memory-limited request {memory_limited:?}");
    assert!(
        healthz < Duration::from_millis(200),
        "/healthz took {healthz:?}"
    );
    assert!(
        memory_limited < Duration::from_millis(200),
        "a memory-limited request took {memory_limited:?}"
    );
    // fail_open: Redis-limited requests fall back to local limits after the timeout, long
    // before Redis wakes up.
    for w in waiting {
        let (status, took) = w.await.unwrap();
        assert_eq!(status, 200);
        assert!(took < Duration::from_millis(1500), "took {took:?}");
    }
    assert!(
        stalled_at.elapsed() < Duration::from_secs(2),
        "redis woke up before the requests were answered"
    );
    tokio::task::spawn_blocking(move || sleeper.join().unwrap())
        .await
        .unwrap();
    shared.shutdown().await;
    local.shutdown().await;
}
