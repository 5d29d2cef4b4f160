#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Latency each limit store adds per request: the in-memory `Limiter` against `RedisLimiter`
//! on a local `redis-server` (started here on a free port, or `REDIS_URL`).
//!
//! Redis settlement only hands a job to the settler task, so its `settle` is the hand-off; the
//! settler's throughput shows in the concurrent run, which waits for every settlement.
//!
//!     cargo run --profile bench --example store_latency [-- ITERATIONS]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use triage::limits::{
    AdmitRequest, Clock, KeySpec, LimitSpec, LimitSpecs, LimitStore, Limiter, Period, RedisLimiter,
    RedisSettings, Settlement,
};

fn specs() -> LimitSpecs {
    let limits = LimitSpec {
        rpm: Some(u32::MAX),
        tpm: Some(u64::MAX / 4),
        max_parallel: Some(1000),
        budget_nanos: Some(u64::MAX / 4),
        period: Period::Monthly,
    };
    let mut s = LimitSpecs::default();
    s.keys.insert(
        "k".into(),
        KeySpec {
            team: Some("t".into()),
            limits: limits.clone(),
        },
    );
    s.teams.insert("t".into(), limits);
    s
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(name: &str, l: &impl LimitStore, n: usize) {
    let req = AdmitRequest {
        key: "k",
        est_tokens: 500,
        reserve_nanos: 10_000,
    };
    let s = Settlement {
        model: "m",
        request_id: "r",
        prompt_tokens: 500,
        completion_tokens: 100,
        cost_nanos: 5_000,
        ..Settlement::default()
    };
    for _ in 0..n / 10 {
        l.admit(&req).await.unwrap().settle(&s);
    }
    let (mut admit, mut settle, mut status) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for _ in 0..n {
        let t = Instant::now();
        let a = l.admit(&req).await.unwrap();
        let t1 = Instant::now();
        a.settle(&s);
        let t2 = Instant::now();
        std::hint::black_box(l.status("k").await);
        let t3 = Instant::now();
        admit.push(t1 - t);
        settle.push(t2 - t1);
        status.push(t3 - t2);
    }
    for (what, v) in [
        ("admit", &mut admit),
        ("settle", &mut settle),
        ("status", &mut status),
    ] {
        let mean = v.iter().sum::<Duration>() / v.len() as u32;
        println!(
            "{name:<7} {what:<7} mean {mean:>10.2?}  p50 {:>10.2?}  p99 {:>10.2?}",
            pct(v, 0.5),
            pct(v, 0.99)
        );
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let mem = Limiter::new(&specs(), Clock::system(), None).unwrap();
    measure("memory", &mem, n).await;

    let mut child = None;
    let url = match std::env::var("REDIS_URL") {
        Ok(u) => u,
        Err(_) => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let c = Command::new("redis-server")
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
                .spawn()
                .expect("redis-server (or set REDIS_URL)");
            child = Some(c);
            tokio::time::sleep(Duration::from_millis(300)).await;
            format!("redis://127.0.0.1:{port}/")
        }
    };
    let settings = RedisSettings {
        url: url.clone(),
        key_prefix: "bench".into(),
        reservation_ttl: Duration::from_secs(600),
        timeout: Duration::from_secs(1),
        fail_open: false,
        per_subject_calls: false,
    };
    // The floor: one PING round trip on an async connection.
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut ping = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
        ping.push(t.elapsed());
    }
    let mean = ping.iter().sum::<Duration>() / n as u32;
    println!(
        "redis   PING    mean {mean:>10.2?}  p50 {:>10.2?}  p99 {:>10.2?}",
        pct(&mut ping, 0.5),
        pct(&mut ping, 0.99)
    );
    let redis = Arc::new(RedisLimiter::new(&specs(), settings.clone(), None, None).unwrap());
    redis.ping().await.unwrap();
    measure("redis", redis.as_ref(), n).await;
    let split = RedisLimiter::new(
        &specs(),
        RedisSettings {
            per_subject_calls: true,
            ..settings
        },
        None,
        None,
    )
    .unwrap();
    measure("split", &split, n).await;

    // Throughput with 4 tasks admitting and settling at once on one replica, until every
    // settlement is in Redis.
    redis.flush(Duration::from_secs(30)).await;
    let t = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let r = redis.clone();
            tokio::spawn(async move {
                let req = AdmitRequest {
                    key: "k",
                    est_tokens: 500,
                    reserve_nanos: 10_000,
                };
                for _ in 0..n / 4 {
                    r.admit(&req).await.unwrap().settle(&Settlement {
                        cost_nanos: 5_000,
                        ..Settlement::default()
                    });
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(redis.flush(Duration::from_secs(30)).await, 0);
    let el = t.elapsed();
    println!(
        "redis   4 tasks: {:.0} admit+settle per second",
        n as f64 / el.as_secs_f64()
    );
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}
