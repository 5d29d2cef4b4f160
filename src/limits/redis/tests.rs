#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Runs against a real `redis-server` child process; each test skips (with a message) when it
//! is not installed.

use super::*;
use crate::limits::KeySpec;
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Option<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        Self::start_on(port)
    }

    fn start_on(port: u16) -> Option<Server> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("redis-server is not installed; skipping");
            return None;
        };
        let s = Server { child, port };
        let client = Client::open(s.url().as_str()).ok()?;
        for _ in 0..200 {
            if let Ok(mut c) = client.get_connection() {
                if ::redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
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

#[test]
fn budget_holds_across_replicas_under_a_race() {
    let Some(srv) = Server::start() else { return };
    let sp = specs(
        LimitSpec {
            budget_nanos: Some(100),
            period: Period::Monthly,
            ..LimitSpec::default()
        },
        None,
    );
    let replicas: Vec<RedisLimiter> = (0..3).map(|_| limiter(&srv.url(), &sp)).collect();
    let barrier = Barrier::new(30);
    let admitted = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for i in 0..30 {
            let (l, barrier, admitted) = (&replicas[i % 3], &barrier, &admitted);
            sc.spawn(move || {
                barrier.wait();
                match l.admit(&req(0, 10)) {
                    Ok(a) => admitted.lock().push(a),
                    Err(e) => assert_eq!(refusal(Err(e)).kind, RefusalKind::Budget),
                }
            });
        }
    });
    let admitted = admitted.into_inner();
    assert_eq!(admitted.len(), 10);
    let st = replicas[1].status("k").unwrap().key;
    assert_eq!(
        (st.spent_nanos, st.reserved_nanos, st.in_flight),
        (0, 100, 10)
    );
    assert!(st.period_start_unix.is_some() && st.period_end_unix > st.period_start_unix);
    // Settling below the reservation frees the difference for everyone.
    for a in admitted {
        a.settle(&settled(4, 1));
    }
    let st = replicas[2].status("k").unwrap().key;
    assert_eq!(
        (st.spent_nanos, st.reserved_nanos, st.in_flight),
        (40, 0, 0)
    );
    assert_eq!(st.remaining_nanos, Some(60));
    let r = refusal(replicas[0].admit(&req(0, 61)));
    assert_eq!((r.limit, r.used, r.requested), (100, 40, 61));
    assert!(r.period_end_unix.is_some());
    // Dropping unsettled releases the reservation and charges nothing.
    drop(replicas[0].admit(&req(0, 60)).unwrap());
    assert_eq!(replicas[1].status("k").unwrap().key.spent_nanos, 40);
}

#[test]
fn rpm_and_tpm_are_shared() {
    let Some(srv) = Server::start() else { return };
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
    let first = a.admit(&req(600, 0)).unwrap();
    let rq = first.rate().requests.unwrap();
    assert_eq!((rq.limit, rq.remaining), (4, 3));
    let tk = first.rate().tokens.unwrap();
    assert_eq!((tk.limit, tk.remaining), (1000, 400));
    // 600 more tokens do not fit on the other replica...
    let r = refusal(b.admit(&req(600, 0)));
    assert_eq!(
        (r.kind, r.limit, r.requested),
        (RefusalKind::Tpm, 1000, 600)
    );
    assert!(r.retry_after.is_some());
    // ...until the first settles at its real usage (100 tokens) and refunds the rest.
    first.settle(&settled(0, 100));
    let tokens = b.status("k").unwrap().key.tokens.unwrap();
    assert!((900..=905).contains(&tokens.remaining), "{tokens:?}");
    drop(b.admit(&req(600, 0)).unwrap());
    // Requests: 4 per minute across both replicas; 3 were used above (refusals count too).
    drop(a.admit(&req(0, 0)).unwrap());
    let r = refusal(b.admit(&req(0, 0)));
    assert_eq!((r.kind, r.limit), (RefusalKind::Rpm, 4));
    assert!(r.retry_after.unwrap() > Duration::from_secs(10));
    assert_eq!(r.rate.requests.map(|w| w.remaining), Some(0));
}

#[test]
fn team_limits_and_parallel_slots() {
    for per_subject_calls in [false, true] {
        let Some(srv) = Server::start() else { return };
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
        let a = l.admit(&req(10, 30)).unwrap();
        // The team's budget refuses; the key's slot and tokens come back.
        let r = refusal(l.admit(&req(10, 30)));
        assert_eq!(
            (r.kind, r.subject_kind),
            (RefusalKind::Budget, SubjectKind::Team)
        );
        let st = l.status("k").unwrap();
        assert_eq!(st.key.in_flight, 1, "split={per_subject_calls}");
        assert_eq!(st.key.tokens.map(|t| t.remaining), Some(90));
        assert_eq!(st.team.as_ref().map(|t| t.reserved_nanos), Some(30));
        let b = l.admit(&req(10, 20)).unwrap();
        let r = refusal(l.admit(&req(10, 0)));
        assert_eq!(
            (r.kind, r.subject_kind, r.used),
            (RefusalKind::Parallel, SubjectKind::Key, 2)
        );
        a.settle(&settled(25, 10));
        drop(b);
        let st = l.status("k").unwrap();
        assert_eq!(st.key.in_flight, 0);
        let team = st.team.unwrap();
        assert_eq!((team.spent_nanos, team.reserved_nanos), (25, 0));
        assert_eq!(st.key.spent_nanos, 25);
    }
}

#[test]
fn a_crashed_replicas_tickets_expire() {
    let Some(srv) = Server::start() else { return };
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
    std::mem::forget(crashed.admit(&req(0, 10)).unwrap());
    let other = RedisLimiter::new(&sp, set, None, None).unwrap();
    assert_eq!(
        refusal(other.admit(&req(0, 10))).kind,
        RefusalKind::Parallel
    );
    let mut admitted = None;
    for _ in 0..300 {
        if let Ok(a) = other.admit(&req(0, 10)) {
            admitted = Some(a);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let a = admitted.expect("the dead ticket expired");
    a.settle(&settled(10, 0));
    let st = other.status("k").unwrap().key;
    assert_eq!(
        (st.spent_nanos, st.reserved_nanos, st.in_flight),
        (10, 0, 0)
    );
}

#[test]
fn lua_periods_match_rust() {
    let Some(srv) = Server::start() else { return };
    let client = Client::open(srv.url().as_str()).unwrap();
    let mut con = client.get_connection().unwrap();
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

#[test]
fn unavailability_policies_and_replay() {
    let Some(mut srv) = Server::start() else {
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
    closed.ping().unwrap();
    let held = closed.admit(&req(0, 100)).unwrap();
    srv.kill();
    // fail_closed refuses; the unsettled settlement waits for Redis.
    assert!(matches!(
        closed.admit(&req(0, 1)),
        Err(AdmitError::Unavailable(_))
    ));
    assert!(!closed.is_up());
    held.settle(&settled(70, 0));
    assert_eq!(closed.pending_settlements(), 1);
    // fail_open admits with local limits (rpm 2 on this replica) and replays the spend later.
    open.admit(&req(0, 10)).unwrap().settle(&settled(5, 0));
    drop(open.admit(&req(0, 10)).unwrap());
    assert_eq!(refusal(open.admit(&req(0, 10))).kind, RefusalKind::Rpm);
    assert_eq!(open.status("k").unwrap().key.spent_nanos, 5);
    {
        let ev = events.lock();
        assert!(ev.contains(&StoreEvent::Up(false)));
        assert!(ev.contains(&StoreEvent::Unavailable {
            op: "admit",
            outcome: "refused"
        }));
    }
    // Same port, empty Redis: the queued settlements land before the next admission.
    let srv = Server::start_on(srv.port).unwrap();
    let mut back = None;
    for _ in 0..300 {
        match closed.admit(&req(0, 1)) {
            Ok(a) => {
                back = Some(a);
                break;
            }
            Err(AdmitError::Unavailable(_)) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    drop(back.expect("recovered"));
    assert!(closed.is_up());
    assert_eq!(closed.pending_settlements(), 0);
    assert!(events.lock().contains(&StoreEvent::Up(true)));
    let mut spent = 0;
    for _ in 0..300 {
        // `open` replays its local spend on its next successful call.
        spent = open.status("k").map(|s| s.key.spent_nanos).unwrap_or(0);
        if spent == 75 {
            break;
        }
        let _ = open.admit(&req(0, 0));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(spent, 75);
    drop(srv);
}
