#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Many replicas, one set of limits: three in-process gateways share rate limits and budgets
//! through a real `redis-server` child process, which the tests kill and restart.
mod common;

use common::*;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use triage::limits::SubjectKind;
use triage::server::Gateway;
use triage::store::SpendLedger;

/// A `redis-server` child on 127.0.0.1, without persistence.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// `None` (after printing why) when redis-server is not installed.
    async fn start() -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port).await
    }

    async fn start_on(port: u16) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        };
        let r = Redis { child, port };
        let client = redis::Client::open(r.url()).unwrap();
        for _ in 0..300 {
            if let Ok(mut c) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return Some(r);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

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
        "[store]\nkind = \"redis\"\nurl = \"{redis}\"\non_unavailable = \"{policy}\"\nstate_dir = \"{}\"\nreservation_ttl = \"1m\"\n",
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
    http()
        .get(format!("{}/triage/keys/self", gw.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
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
