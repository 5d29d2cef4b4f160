#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::*;
use crate::store::{SpendLedger, SqliteLedger};

// 2024-02-29 23:59:00 UTC.
const T0_MS: i64 = 1_709_251_140_000;
const NEXT_DAY_S: i64 = 1_709_251_200;

fn spec() -> LimitSpec {
    LimitSpec::default()
}

fn specs(keys: &[(&str, Option<&str>, LimitSpec)], teams: &[(&str, LimitSpec)]) -> LimitSpecs {
    LimitSpecs {
        keys: keys
            .iter()
            .map(|(n, t, l)| {
                (
                    (*n).to_owned(),
                    KeySpec {
                        team: t.map(str::to_owned),
                        limits: l.clone(),
                    },
                )
            })
            .collect(),
        teams: teams
            .iter()
            .map(|(n, l)| ((*n).to_owned(), l.clone()))
            .collect(),
    }
}

fn limiter(s: &LimitSpecs) -> (Limiter, ManualClock) {
    let mc = ManualClock::new(T0_MS);
    let l = Limiter::new(s, mc.clock(), None).unwrap();
    (l, mc)
}

fn req(key: &str, est_tokens: u64, reserve_nanos: u64) -> AdmitRequest<'_> {
    AdmitRequest {
        key,
        est_tokens,
        reserve_nanos,
    }
}

fn cost(c: u64) -> Settlement<'static> {
    Settlement {
        model: "m",
        request_id: "r",
        cost_nanos: c,
        ..Settlement::default()
    }
}

fn refused(r: Result<Admission, AdmitError>) -> Refusal {
    match r {
        Err(AdmitError::Refused(r)) => *r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn spent(l: &Limiter, key: &str) -> (u64, u64) {
    let s = l.status(key).unwrap().key;
    (s.spent_nanos, s.reserved_nanos)
}

fn team_spent(l: &Limiter, key: &str) -> (u64, u64) {
    let s = l.status(key).unwrap().team.unwrap();
    (s.spent_nanos, s.reserved_nanos)
}

/// Runs `n` admissions at once (released by a barrier) and returns the admitted ones.
fn race(
    l: &Limiter,
    n: usize,
    key_of: impl Fn(usize) -> String + Sync,
    reserve: u64,
) -> Vec<Admission> {
    let barrier = Barrier::new(n);
    let admitted = parking_lot::Mutex::new(Vec::new());
    let budget_refusals = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for i in 0..n {
            let (barrier, admitted, budget_refusals, key_of) =
                (&barrier, &admitted, &budget_refusals, &key_of);
            sc.spawn(move || {
                let key = key_of(i);
                barrier.wait();
                match l.admit(&req(&key, 0, reserve)) {
                    Ok(a) => admitted.lock().push(a),
                    Err(AdmitError::Refused(r)) => {
                        assert_eq!(r.kind, RefusalKind::Budget);
                        assert_eq!(r.retry_after, None);
                        budget_refusals.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("{e}"),
                }
            });
        }
    });
    let admitted = admitted.into_inner();
    assert_eq!(admitted.len() + budget_refusals.load(Ordering::Relaxed), n);
    admitted
}

#[test]
fn concurrent_reservations_never_exceed_key_budget() {
    const R: u64 = 7_000_000;
    let s = specs(
        &[(
            "k",
            None,
            LimitSpec {
                budget_nanos: Some(100 * R),
                ..spec()
            },
        )],
        &[],
    );
    let (l, _) = limiter(&s);
    let admitted = race(&l, 300, |_| "k".to_owned(), R);
    assert_eq!(admitted.len(), 100);
    assert_eq!(spent(&l, "k"), (0, 100 * R));
    // Settle concurrently with actual <= reserved.
    std::thread::scope(|sc| {
        for (i, a) in admitted.into_iter().enumerate() {
            sc.spawn(move || a.settle(&cost(R - (i as u64 % 3))));
        }
    });
    let st = l.status("k").unwrap().key;
    assert_eq!(st.reserved_nanos, 0);
    assert!(st.spent_nanos <= 100 * R);
    assert_eq!(st.spent_nanos, 100 * R - (33 + 2 * 33));
    assert_eq!(st.in_flight, 0);
}

#[test]
fn concurrent_reservations_never_exceed_team_budget() {
    const R: u64 = 1_000;
    let s = specs(
        &[
            ("a", Some("t"), spec()),
            ("b", Some("t"), spec()),
            ("c", Some("t"), spec()),
        ],
        &[(
            "t",
            LimitSpec {
                budget_nanos: Some(100 * R),
                ..spec()
            },
        )],
    );
    let (l, _) = limiter(&s);
    let names = ["a", "b", "c"];
    let admitted = race(&l, 300, |i| names[i % 3].to_owned(), R);
    assert_eq!(admitted.len(), 100);
    for a in admitted {
        a.settle(&cost(R));
    }
    assert_eq!(team_spent(&l, "a"), (100 * R, 0));
    let per_key: u64 = names.iter().map(|k| spent(&l, k).0).sum();
    assert_eq!(per_key, 100 * R);
}

#[test]
fn rpm_refuses_then_recovers() {
    let s = specs(
        &[(
            "k",
            None,
            LimitSpec {
                rpm: Some(2),
                ..spec()
            },
        )],
        &[],
    );
    let (l, mc) = limiter(&s);
    let a = l.admit(&req("k", 0, 0)).unwrap();
    let w = a.rate().requests.unwrap();
    assert_eq!(
        (w.limit, w.remaining, w.reset),
        (2, 1, Duration::from_secs(30))
    );
    assert!(a
        .rate_headers()
        .contains(&("x-ratelimit-reset-requests", "30s".to_owned())));
    a.settle(&cost(0));
    drop(l.admit(&req("k", 0, 0)).unwrap());
    let r = refused(l.admit(&req("k", 0, 0)));
    assert_eq!(r.kind, RefusalKind::Rpm);
    assert_eq!(
        (r.subject_kind, r.subject.as_str()),
        (SubjectKind::Key, "k")
    );
    assert_eq!(r.retry_after, Some(Duration::from_secs(30)));
    assert_eq!(r.retry_after_secs(), Some(30));
    let h = r.rate_headers();
    assert!(h.contains(&("x-ratelimit-remaining-requests", "0".to_owned())));
    assert!(h.contains(&("x-ratelimit-reset-requests", "1m0s".to_owned())));
    assert!(h.contains(&("retry-after", "30".to_owned())));
    mc.advance(Duration::from_secs(29));
    assert_eq!(
        refused(l.admit(&req("k", 0, 0))).retry_after,
        Some(Duration::from_secs(1))
    );
    mc.advance(Duration::from_secs(1));
    assert!(l.admit(&req("k", 0, 0)).is_ok());
}

#[test]
fn tpm_refuses_settles_and_recovers() {
    let s = specs(
        &[(
            "k",
            None,
            LimitSpec {
                tpm: Some(600),
                ..spec()
            },
        )],
        &[],
    );
    let (l, mc) = limiter(&s);
    let a = l.admit(&req("k", 500, 0)).unwrap();
    let w = a.rate().tokens.unwrap();
    assert_eq!(
        (w.limit, w.remaining, w.reset),
        (600, 100, Duration::from_secs(50))
    );
    let r = refused(l.admit(&req("k", 200, 0)));
    assert_eq!(r.kind, RefusalKind::Tpm);
    assert_eq!(r.retry_after, Some(Duration::from_secs(10)));
    assert_eq!((r.limit, r.used, r.requested), (600, 500, 200));
    assert!(r
        .rate_headers()
        .contains(&("x-ratelimit-remaining-tokens", "100".to_owned())));
    // Real usage was 100 tokens: 400 come back at settlement.
    a.settle(&Settlement {
        prompt_tokens: 60,
        completion_tokens: 40,
        ..cost(0)
    });
    let b = l.admit(&req("k", 200, 0)).unwrap();
    assert_eq!(b.rate().tokens.map(|w| w.remaining), Some(300));
    // Usage far above the estimate puts the bucket in debt until it refills.
    b.settle(&Settlement {
        prompt_tokens: 1_000,
        ..cost(0)
    });
    let r = refused(l.admit(&req("k", 100, 0)));
    assert_eq!(r.retry_after, Some(Duration::from_secs(60)));
    mc.advance(Duration::from_secs(60));
    assert!(l.admit(&req("k", 100, 0)).is_ok());
}

#[test]
fn parallel_refuses_until_a_permit_is_released() {
    let s = specs(
        &[(
            "k",
            None,
            LimitSpec {
                max_parallel: Some(2),
                ..spec()
            },
        )],
        &[],
    );
    let (l, _) = limiter(&s);
    let a = l.admit(&req("k", 0, 0)).unwrap();
    let b = l.admit(&req("k", 0, 0)).unwrap();
    let r = refused(l.admit(&req("k", 0, 0)));
    assert_eq!(r.kind, RefusalKind::Parallel);
    assert_eq!((r.limit, r.used), (2, 2));
    assert!(r.retry_after.is_some());
    assert_eq!(l.status("k").unwrap().key.in_flight, 2);
    a.settle(&cost(0));
    let c = l.admit(&req("k", 0, 0)).unwrap();
    drop(b);
    drop(c);
    assert_eq!(l.status("k").unwrap().key.in_flight, 0);
}

#[test]
fn team_limits_apply_on_top_of_key_limits() {
    let s = specs(
        &[
            (
                "a",
                Some("t"),
                LimitSpec {
                    rpm: Some(100),
                    ..spec()
                },
            ),
            (
                "b",
                Some("t"),
                LimitSpec {
                    rpm: Some(100),
                    ..spec()
                },
            ),
        ],
        &[(
            "t",
            LimitSpec {
                rpm: Some(3),
                max_parallel: Some(10),
                budget_nanos: Some(50),
                ..spec()
            },
        )],
    );
    let (l, _) = limiter(&s);
    for k in ["a", "b", "a"] {
        l.admit(&req(k, 0, 10)).unwrap().settle(&cost(10));
    }
    let r = refused(l.admit(&req("b", 0, 10)));
    assert_eq!(r.kind, RefusalKind::Rpm);
    assert_eq!(
        (r.subject_kind, r.subject.as_str()),
        (SubjectKind::Team, "t")
    );
    // The exhausted team window is the one reported in the headers.
    assert_eq!(r.rate.requests.map(|w| w.limit), Some(3));
    assert_eq!(team_spent(&l, "a"), (30, 0));
    assert_eq!(spent(&l, "a"), (20, 0));
}

#[test]
fn team_refusal_rolls_back_key_state() {
    let s = specs(
        &[(
            "a",
            Some("t"),
            LimitSpec {
                tpm: Some(1_000),
                max_parallel: Some(1),
                budget_nanos: Some(1_000),
                ..spec()
            },
        )],
        &[(
            "t",
            LimitSpec {
                budget_nanos: Some(5),
                ..spec()
            },
        )],
    );
    let (l, _) = limiter(&s);
    let r = refused(l.admit(&req("a", 400, 10)));
    assert_eq!(r.kind, RefusalKind::Budget);
    assert_eq!(r.subject_kind, SubjectKind::Team);
    assert_eq!(r.retry_after, None);
    assert_eq!((r.limit, r.used, r.requested), (5, 0, 10));
    assert_eq!(r.period_end_unix, Some(1_709_251_200)); // monthly: 2024-03-01
    let st = l.status("a").unwrap().key;
    assert_eq!((st.reserved_nanos, st.in_flight), (0, 0));
    assert_eq!(st.tokens.map(|w| w.remaining), Some(1_000));
    // Key permit was released, so a fitting request passes.
    l.admit(&req("a", 400, 5)).unwrap().settle(&cost(5));
}

#[test]
fn drop_releases_reservation_and_permit() {
    let s = specs(
        &[(
            "k",
            Some("t"),
            LimitSpec {
                max_parallel: Some(1),
                budget_nanos: Some(100),
                ..spec()
            },
        )],
        &[],
    );
    let (l, _) = limiter(&s);
    let a = l.admit(&req("k", 0, 100)).unwrap();
    assert_eq!(spent(&l, "k"), (0, 100));
    assert_eq!(team_spent(&l, "k"), (0, 100));
    assert_eq!(
        refused(l.admit(&req("k", 0, 1))).kind,
        RefusalKind::Parallel
    );
    drop(a);
    assert_eq!(spent(&l, "k"), (0, 0));
    assert_eq!(team_spent(&l, "k"), (0, 0));
    assert_eq!(l.status("k").unwrap().key.in_flight, 0);
    // A panicking handler drops its admission during unwinding.
    let l2 = l.clone();
    let res = std::thread::spawn(move || {
        let _a = l2.admit(&req("k", 0, 100)).unwrap();
        panic!("handler failed");
    })
    .join();
    assert!(res.is_err());
    assert_eq!(spent(&l, "k"), (0, 0));
    l.admit(&req("k", 0, 100)).unwrap().settle(&cost(100));
    assert_eq!(spent(&l, "k"), (100, 0));
}

#[test]
fn overrun_is_charged_and_counted() {
    let s = specs(
        &[(
            "k",
            None,
            LimitSpec {
                budget_nanos: Some(100),
                ..spec()
            },
        )],
        &[],
    );
    let (l, _) = limiter(&s);
    let out = l.admit(&req("k", 0, 50)).unwrap().settle(&cost(120));
    assert_eq!(
        out,
        SettleOutcome {
            charged_nanos: 120,
            reserved_nanos: 50,
            overrun_nanos: 70
        }
    );
    assert_eq!(l.overrun_count(), 1);
    assert_eq!(l.status("k").unwrap().key.remaining_nanos, Some(0));
    assert_eq!(refused(l.admit(&req("k", 0, 0))).kind, RefusalKind::Budget);
}

#[test]
fn budget_period_rolls_over_by_timestamp() {
    let s = specs(
        &[(
            "k",
            None,
            LimitSpec {
                budget_nanos: Some(100),
                period: Period::Daily,
                ..spec()
            },
        )],
        &[],
    );
    let (l, mc) = limiter(&s);
    l.admit(&req("k", 0, 80)).unwrap().settle(&cost(80));
    let inflight = l.admit(&req("k", 0, 20)).unwrap();
    let r = refused(l.admit(&req("k", 0, 30)));
    assert_eq!(r.period_end_unix, Some(NEXT_DAY_S));
    let st = l.status("k").unwrap().key;
    assert_eq!(st.period_end_unix, Some(NEXT_DAY_S));
    assert_eq!(st.period_start_unix, Some(NEXT_DAY_S - 86_400));
    assert_eq!(st.remaining_nanos, Some(0));
    // Cross midnight UTC: spend resets, the in-flight reservation carries over.
    mc.set_unix_ms(NEXT_DAY_S * 1000);
    assert_eq!(spent(&l, "k"), (0, 20));
    let b = l.admit(&req("k", 0, 80)).unwrap();
    assert_eq!(refused(l.admit(&req("k", 0, 1))).kind, RefusalKind::Budget);
    inflight.settle(&cost(15));
    b.settle(&cost(80));
    assert_eq!(spent(&l, "k"), (95, 0));
    assert_eq!(
        l.status("k").unwrap().key.period_end_unix,
        Some(NEXT_DAY_S + 86_400)
    );
}

#[test]
fn reconfigure_keeps_state_of_surviving_subjects() {
    let s = specs(
        &[
            (
                "k",
                Some("t"),
                LimitSpec {
                    rpm: Some(1),
                    tpm: Some(1_000),
                    budget_nanos: Some(100),
                    ..spec()
                },
            ),
            ("gone", None, spec()),
        ],
        &[("t", spec())],
    );
    let (l, _) = limiter(&s);
    l.admit(&req("k", 300, 40)).unwrap().settle(&Settlement {
        prompt_tokens: 300,
        ..cost(40)
    });
    let held = l.admit(&req("gone", 0, 0)).unwrap();
    assert_eq!(refused(l.admit(&req("k", 0, 0))).kind, RefusalKind::Rpm);
    // Same rpm keeps the GCRA state; a new budget and tpm keep spend and the token level.
    let s2 = specs(
        &[(
            "k",
            Some("t"),
            LimitSpec {
                rpm: Some(1),
                tpm: Some(2_000),
                budget_nanos: Some(50),
                ..spec()
            },
        )],
        &[(
            "t",
            LimitSpec {
                budget_nanos: Some(1_000),
                ..spec()
            },
        )],
    );
    l.reconfigure(&s2).unwrap();
    assert_eq!(refused(l.admit(&req("k", 0, 0))).kind, RefusalKind::Rpm);
    let st = l.status("k").unwrap();
    assert_eq!(st.key.spent_nanos, 40);
    assert_eq!(
        st.key.tokens.map(|w| (w.limit, w.remaining)),
        Some((2_000, 700))
    );
    assert_eq!(st.team.map(|t| t.spent_nanos), Some(40));
    assert!(matches!(
        l.admit(&req("gone", 0, 0)),
        Err(AdmitError::UnknownKey(_))
    ));
    held.settle(&cost(1)); // settling into a removed subject is harmless
                           // A changed rpm starts a fresh limiter.
    let s3 = specs(
        &[(
            "k",
            Some("t"),
            LimitSpec {
                rpm: Some(5),
                budget_nanos: Some(50),
                ..spec()
            },
        )],
        &[],
    );
    l.reconfigure(&s3).unwrap();
    let r = refused(l.admit(&req("k", 0, 20)));
    assert_eq!((r.kind, r.used), (RefusalKind::Budget, 40));
    // Zero rate limits are rejected and leave the old config in place.
    let bad = specs(
        &[(
            "k",
            None,
            LimitSpec {
                rpm: Some(0),
                ..spec()
            },
        )],
        &[],
    );
    assert!(matches!(
        l.reconfigure(&bad),
        Err(LimitConfigError::Zero { field: "rpm", .. })
    ));
    assert_eq!(l.status("k").unwrap().key.limits.rpm, Some(5));
}

#[test]
fn headers_pick_the_tighter_subject() {
    let s = specs(
        &[(
            "k",
            Some("t"),
            LimitSpec {
                rpm: Some(60),
                tpm: Some(10_000),
                ..spec()
            },
        )],
        &[(
            "t",
            LimitSpec {
                rpm: Some(600),
                tpm: Some(1_000),
                ..spec()
            },
        )],
    );
    let (l, _) = limiter(&s);
    let a = l.admit(&req("k", 100, 0)).unwrap();
    let h = a.rate_headers();
    let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("x-ratelimit-limit-requests"), Some("60"));
    assert_eq!(get("x-ratelimit-remaining-requests"), Some("59"));
    assert_eq!(get("x-ratelimit-reset-requests"), Some("1s"));
    assert_eq!(get("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(get("x-ratelimit-remaining-tokens"), Some("900"));
    assert_eq!(get("x-ratelimit-reset-tokens"), Some("6s"));
    assert_eq!(h.len(), 6);
}

#[test]
fn status_serialises() {
    let s = specs(
        &[(
            "k",
            None,
            LimitSpec {
                budget_nanos: Some(2_500_000_000),
                ..spec()
            },
        )],
        &[],
    );
    let (l, _) = limiter(&s);
    l.admit(&req("k", 0, 1_000_000_000))
        .unwrap()
        .settle(&cost(500_000_000));
    let v = serde_json::to_value(l.status("k").unwrap()).unwrap();
    assert_eq!(v["key"]["spent_usd"], "0.50");
    assert_eq!(v["key"]["remaining_usd"], "2.00");
    assert_eq!(v["key"]["limits"]["period"], "monthly");
    assert_eq!(v["key"]["period_end_unix"], 1_709_251_200);
    assert!(v["team"].is_null());
}

#[test]
fn spend_survives_restart_through_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let s = specs(
        &[
            (
                "k",
                Some("t"),
                LimitSpec {
                    budget_nanos: Some(1_000),
                    period: Period::Daily,
                    ..spec()
                },
            ),
            ("j", Some("t"), spec()),
        ],
        &[(
            "t",
            LimitSpec {
                period: Period::Total,
                ..spec()
            },
        )],
    );
    let mc = ManualClock::new(T0_MS);
    {
        let ledger: Arc<dyn SpendLedger> = Arc::new(SqliteLedger::open(dir.path()).unwrap());
        let l = Limiter::new(&s, mc.clock(), Some(ledger.clone())).unwrap();
        l.admit(&req("k", 0, 100)).unwrap().settle(&cost(100)); // yesterday, for "k"'s daily budget
        mc.set_unix_ms(NEXT_DAY_S * 1000 + 5_000);
        l.admit(&req("k", 0, 300)).unwrap().settle(&cost(250));
        l.admit(&req("j", 0, 0)).unwrap().settle(&cost(7));
        ledger.flush().unwrap();
    }
    let ledger: Arc<dyn SpendLedger> = Arc::new(SqliteLedger::open(dir.path()).unwrap());
    let l = Limiter::new(&s, mc.clock(), Some(ledger)).unwrap();
    l.load_spend_from_ledger().unwrap();
    let st = l.status("k").unwrap();
    assert_eq!(st.key.spent_nanos, 250);
    assert_eq!(st.team.map(|t| t.spent_nanos), Some(357));
    assert_eq!(refused(l.admit(&req("k", 0, 751))).used, 250);
}

#[test]
fn period_change_reloads_spend_from_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let daily = specs(
        &[(
            "k",
            None,
            LimitSpec {
                period: Period::Daily,
                ..spec()
            },
        )],
        &[],
    );
    let mc = ManualClock::new(T0_MS);
    let ledger: Arc<dyn SpendLedger> = Arc::new(SqliteLedger::open(dir.path()).unwrap());
    let l = Limiter::new(&daily, mc.clock(), Some(ledger)).unwrap();
    l.admit(&req("k", 0, 0)).unwrap().settle(&cost(100));
    mc.set_unix_ms(NEXT_DAY_S * 1000);
    l.admit(&req("k", 0, 0)).unwrap().settle(&cost(10));
    assert_eq!(spent(&l, "k").0, 10);
    let total = specs(
        &[(
            "k",
            None,
            LimitSpec {
                period: Period::Total,
                ..spec()
            },
        )],
        &[],
    );
    l.reconfigure(&total).unwrap();
    assert_eq!(spent(&l, "k").0, 110);
}
