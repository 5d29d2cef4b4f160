#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Runs against a real `redis-server` child process (the launcher shared with the integration
//! tests); each test reports SKIPPED when it is not installed, or fails under
//! `TRIAGE_REQUIRE_REDIS=1`.

use super::*;
use crate::limits::{KeySpec, Refusal, StoreEvent};
use std::sync::Arc;
use tokio::sync::Barrier;

#[path = "../../../tests/common/redis_server.rs"]
mod redis_server;
use redis_server::Redis as Server;

/// Waits for this replica's settlements to reach Redis (another replica's reads don't wait).
async fn settled_in(l: &RedisLimiter) {
    assert_eq!(l.flush(Duration::from_secs(5)).await, 0);
}

fn settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        key_prefix: "t".into(),
        reservation_ttl: Duration::from_secs(60),
        timeout: Duration::from_millis(500),
        fail_open: false,
        per_subject_calls: false,
    }
}

fn specs(key: LimitSpec, team: Option<LimitSpec>) -> LimitSpecs {
    let mut s = LimitSpecs::default();
    s.keys.insert(
        "k".into(),
        KeySpec {
            team: team.as_ref().map(|_| "t".to_owned()),
            limits: key,
        },
    );
    if let Some(t) = team {
        s.teams.insert("t".into(), t);
    }
    s
}

fn limiter(url: &str, specs: &LimitSpecs) -> RedisLimiter {
    RedisLimiter::new(specs, settings(url), None, None).unwrap()
}

fn req(est_tokens: u64, reserve_nanos: u64) -> AdmitRequest<'static> {
    AdmitRequest {
        key: "k",
        est_tokens,
        reserve_nanos,
    }
}

fn settled(cost: u64, tokens: u64) -> Settlement<'static> {
    Settlement {
        model: "m",
        request_id: "r",
        completion_tokens: tokens,
        cost_nanos: cost,
        ..Settlement::default()
    }
}

fn refusal(r: Result<Admission, AdmitError>) -> Refusal {
    match r {
        Err(AdmitError::Refused(r)) => *r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_across_replicas_under_a_race() {
    let Some(srv) = Server::start().await else {
        return;
    };
    let sp = specs(
        LimitSpec {
            budget_nanos: Some(100),
            period: Period::Monthly,
            ..LimitSpec::default()
        },
        None,
    );
    let replicas: Vec<RedisLimiter> = (0..3).map(|_| limiter(&srv.url(), &sp)).collect();
    let barrier = Arc::new(Barrier::new(30));
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (l, barrier, admitted) =
                (replicas[i % 3].clone(), barrier.clone(), admitted.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                match l.admit(&req(0, 10)).await {
                    Ok(a) => admitted.lock().push(a),
                    Err(e) => assert_eq!(refusal(Err(e)).kind, RefusalKind::Budget),
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = std::mem::take(&mut *admitted.lock());
    assert_eq!(admitted.len(), 10);
    let st = replicas[1].status("k").await.unwrap().key;
    assert_eq!(
        (st.spent_nanos, st.reserved_nanos, st.in_flight),
        (0, 100, 10)
    );
    assert!(st.period_start_unix.is_some() && st.period_end_unix > st.period_start_unix);
    // Settling below the reservation frees the difference for everyone.
    for a in admitted {
        a.settle(&settled(4, 1));
    }
    for r in &replicas {
        settled_in(r).await;
    }
    let st = replicas[2].status("k").await.unwrap().key;
    assert_eq!(
        (st.spent_nanos, st.reserved_nanos, st.in_flight),
        (40, 0, 0)
    );
    assert_eq!(st.remaining_nanos, Some(60));
    let r = refusal(replicas[0].admit(&req(0, 61)).await);
    assert_eq!((r.limit, r.used, r.requested), (100, 40, 61));
    assert!(r.period_end_unix.is_some());
    // Dropping unsettled releases the reservation and charges nothing.
    drop(replicas[0].admit(&req(0, 60)).await.unwrap());
    settled_in(&replicas[0]).await;
    assert_eq!(replicas[1].status("k").await.unwrap().key.spent_nanos, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_and_tpm_are_shared() {
    let Some(srv) = Server::start().await else {
        return;
    };
    let sp = specs(
        LimitSpec {
            rpm: Some(4),
            tpm: Some(1000),
            ..LimitSpec::default()
        },
        None,
    );
    let a = limiter(&srv.url(), &sp);
    let b = limiter(&srv.url(), &sp);
    let first = a.admit(&req(600, 0)).await.unwrap();
    let rq = first.rate().requests.unwrap();
    assert_eq!((rq.limit, rq.remaining), (4, 3));
    let tk = first.rate().tokens.unwrap();
    assert_eq!((tk.limit, tk.remaining), (1000, 400));
    // 600 more tokens do not fit on the other replica...
    let r = refusal(b.admit(&req(600, 0)).await);
    assert_eq!(
        (r.kind, r.limit, r.requested),
        (RefusalKind::Tpm, 1000, 600)
    );
    assert!(r.retry_after.is_some());
    // ...until the first settles at its real usage (100 tokens) and refunds the rest.
    first.settle(&settled(0, 100));
    settled_in(&a).await;
    let tokens = b.status("k").await.unwrap().key.tokens.unwrap();
    assert!((900..=905).contains(&tokens.remaining), "{tokens:?}");
    drop(b.admit(&req(600, 0)).await.unwrap());
    // Requests: 4 per minute across both replicas; 3 were used above (refusals count too).
    drop(a.admit(&req(0, 0)).await.unwrap());
    let r = refusal(b.admit(&req(0, 0)).await);
    assert_eq!((r.kind, r.limit), (RefusalKind::Rpm, 4));
    assert!(r.retry_after.unwrap() > Duration::from_secs(10));
    assert_eq!(r.rate.requests.map(|w| w.remaining), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_limits_and_parallel_slots() {
    for per_subject_calls in [false, true] {
        let Some(srv) = Server::start().await else {
            return;
        };
        let sp = specs(
            LimitSpec {
                max_parallel: Some(2),
                tpm: Some(100),
                ..LimitSpec::default()
            },
            Some(LimitSpec {
                budget_nanos: Some(50),
                ..LimitSpec::default()
            }),
        );
        let mut set = settings(&srv.url());
        set.per_subject_calls = per_subject_calls;
        let l = RedisLimiter::new(&sp, set, None, None).unwrap();
        let a = l.admit(&req(10, 30)).await.unwrap();
        // The team's budget refuses; the key's slot and tokens come back.
        let r = refusal(l.admit(&req(10, 30)).await);
        assert_eq!(
            (r.kind, r.subject_kind),
            (RefusalKind::Budget, SubjectKind::Team)
        );
        let st = l.status("k").await.unwrap();
        assert_eq!(st.key.in_flight, 1, "split={per_subject_calls}");
        assert_eq!(st.key.tokens.map(|t| t.remaining), Some(90));
        assert_eq!(st.team.as_ref().map(|t| t.reserved_nanos), Some(30));
        let b = l.admit(&req(10, 20)).await.unwrap();
        let r = refusal(l.admit(&req(10, 0)).await);
        assert_eq!(
            (r.kind, r.subject_kind, r.used),
            (RefusalKind::Parallel, SubjectKind::Key, 2)
        );
        a.settle(&settled(25, 10));
        drop(b);
        let st = l.status("k").await.unwrap();
        assert_eq!(st.key.in_flight, 0);
        let team = st.team.unwrap();
        assert_eq!((team.spent_nanos, team.reserved_nanos), (25, 0));
        assert_eq!(st.key.spent_nanos, 25);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_tickets_expire() {
    let Some(srv) = Server::start().await else {
        return;
    };
    let sp = specs(
        LimitSpec {
            max_parallel: Some(1),
            budget_nanos: Some(10),
            ..LimitSpec::default()
        },
        None,
    );
    let mut set = settings(&srv.url());
    set.reservation_ttl = Duration::from_millis(200);
    let crashed = RedisLimiter::new(&sp, set.clone(), None, None).unwrap();
    // A replica that dies never settles or releases.
    std::mem::forget(crashed.admit(&req(0, 10)).await.unwrap());
    let other = RedisLimiter::new(&sp, set, None, None).unwrap();
    assert_eq!(
        refusal(other.admit(&req(0, 10)).await).kind,
        RefusalKind::Parallel
    );
    let mut admitted = None;
    for _ in 0..300 {
        if let Ok(a) = other.admit(&req(0, 10)).await {
            admitted = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let a = admitted.expect("the dead ticket expired");
    a.settle(&settled(10, 0));
    let st = other.status("k").await.unwrap().key;
    assert_eq!(
        (st.spent_nanos, st.reserved_nanos, st.in_flight),
        (10, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_periods_match_rust() {
    let Some(srv) = Server::start().await else {
        return;
    };
    let mut con = srv.connection();
    let script = Script::new(&format!(
        "{PRELUDE} local s, e = period_bounds(tonumber(ARGV[1]), tonumber(ARGV[2])) return {{s, e}}"
    ));
    let times = [
        0i64,
        1_709_210_096, // 2024-02-29 (leap day, Thursday)
        1_733_011_200, // 2024-12-01
        1_735_689_599, // 2024-12-31 23:59:59
        1_735_689_600, // 2025-01-01
        1_740_787_199, // 2025-02-28 23:59:59
        4_102_444_800, // 2100-01-01
    ];
    for t in times {
        for (code, p) in [
            (1, Period::Daily),
            (2, Period::Weekly),
            (3, Period::Monthly),
        ] {
            let got: Vec<i64> = script.arg(code).arg(t).invoke(&mut con).unwrap();
            assert_eq!(
                got,
                vec![p.start_of(t), p.end_of(t).unwrap()],
                "{p:?} at {t}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailability_policies_and_replay() {
    let Some(mut srv) = Server::start().await else {
        return;
    };
    let sp = specs(
        LimitSpec {
            rpm: Some(2),
            budget_nanos: Some(1000),
            ..LimitSpec::default()
        },
        None,
    );
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let sink: StoreEvents = Arc::new(move |e| ev.lock().push(e));
    let closed = RedisLimiter::new(&sp, settings(&srv.url()), None, Some(sink)).unwrap();
    let mut set = settings(&srv.url());
    set.fail_open = true;
    let open = RedisLimiter::new(&sp, set, None, None).unwrap();
    closed.ping().await.unwrap();
    let held = closed.admit(&req(0, 100)).await.unwrap();
    srv.kill();
    // fail_closed refuses; the unsettled settlement waits for Redis.
    assert!(matches!(
        closed.admit(&req(0, 1)).await,
        Err(AdmitError::Unavailable(_))
    ));
    assert!(!closed.is_up());
    held.settle(&settled(70, 0));
    assert_eq!(closed.pending_settlements(), 1);
    // fail_open admits with local limits (rpm 2 on this replica) and replays the spend later.
    open.admit(&req(0, 10))
        .await
        .unwrap()
        .settle(&settled(5, 0));
    drop(open.admit(&req(0, 10)).await.unwrap());
    assert_eq!(
        refusal(open.admit(&req(0, 10)).await).kind,
        RefusalKind::Rpm
    );
    assert_eq!(open.status("k").await.unwrap().key.spent_nanos, 5);
    {
        let ev = events.lock();
        assert!(ev.contains(&StoreEvent::Up(false)));
        assert!(ev.contains(&StoreEvent::Unavailable {
            op: "admit",
            outcome: "refused"
        }));
    }
    // Same port, empty Redis: the queued settlements land before the next admission.
    let srv = Server::start_on(srv.port).await.unwrap();
    let mut back = None;
    for _ in 0..300 {
        match closed.admit(&req(0, 1)).await {
            Ok(a) => {
                back = Some(a);
                break;
            }
            Err(AdmitError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let back = back.expect("recovered");
    assert!(closed.is_up());
    assert_eq!(closed.pending_settlements(), 0);
    drop(back);
    assert!(events.lock().contains(&StoreEvent::Up(true)));
    let mut spent = 0;
    for _ in 0..300 {
        // `open` replays its local spend on its next successful call.
        spent = open
            .status("k")
            .await
            .map(|s| s.key.spent_nanos)
            .unwrap_or(0);
        if spent == 75 {
            break;
        }
        let _ = open.admit(&req(0, 0)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spent, 75);
    drop(srv);
}
