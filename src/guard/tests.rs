use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::*;

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn guard(cfg: GuardConfig) -> (Guard, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::default());
    (Guard::new(cfg, store.clone()), store)
}

fn key(id: &str) -> SessionKey {
    SessionKey::new("key:alice", id)
}

#[tokio::test]
async fn turns_ceiling_refuses_the_request_after_max() {
    let (g, store) = guard(GuardConfig {
        max_turns: Some(3),
        ..GuardConfig::default()
    });
    let s = key("run-1");
    for _ in 0..3 {
        assert_eq!(g.check(Some(&s), t0()).await, Ok(None));
    }
    let hit = CeilingHit {
        kind: CeilingKind::Turns,
        limit: 3,
        used: 3,
    };
    assert_eq!(g.check(Some(&s), t0()).await, Err(hit));
    // Refusals do not count as turns.
    assert_eq!(g.check(Some(&s), t0()).await, Err(hit));
    assert_eq!(store.usage(&s).await.map(|u| u.turns), Some(3));
    // Other sessions and other scopes are independent.
    assert_eq!(g.check(Some(&key("run-2")), t0()).await, Ok(None));
    assert_eq!(
        g.check(Some(&SessionKey::new("key:bob", "run-1")), t0())
            .await,
        Ok(None)
    );
}

#[tokio::test]
async fn tokens_ceiling_trips_once_recorded_total_reaches_limit() {
    let (g, _) = guard(GuardConfig {
        max_tokens: Some(1000),
        ..GuardConfig::default()
    });
    let s = key("t");
    assert!(g.check(Some(&s), t0()).await.is_ok());
    g.record(Some(&s), 999, 0, t0()).await;
    assert!(g.check(Some(&s), t0()).await.is_ok());
    g.record(Some(&s), 1, 0, t0()).await;
    assert_eq!(
        g.check(Some(&s), t0()).await,
        Err(CeilingHit {
            kind: CeilingKind::Tokens,
            limit: 1000,
            used: 1000
        })
    );
}

#[tokio::test]
async fn spend_ceiling_is_integer_nanos() {
    let cfg: GuardConfig = toml::from_str("max_spend_usd = 0.01").unwrap();
    let (g, _) = guard(cfg);
    let s = key("s");
    assert!(g.check(Some(&s), t0()).await.is_ok());
    g.record(Some(&s), 10, 9_999_999, t0()).await;
    assert!(g.check(Some(&s), t0()).await.is_ok());
    g.record(Some(&s), 10, 1, t0()).await;
    let hit = g.check(Some(&s), t0()).await.unwrap_err();
    assert_eq!(
        hit,
        CeilingHit {
            kind: CeilingKind::Spend,
            limit: 10_000_000,
            used: 10_000_000
        }
    );
    assert_eq!(hit.header_value(), "spend=0.01/0.01");
}

#[tokio::test]
async fn wall_clock_measured_from_first_request() {
    let cfg: GuardConfig = toml::from_str("max_wall_clock = \"30m\"").unwrap();
    let (g, _) = guard(cfg);
    let s = key("w");
    assert!(g.check(Some(&s), t0()).await.is_ok());
    let just_before = t0() + Duration::from_millis(30 * 60 * 1000 - 1);
    assert!(g.check(Some(&s), just_before).await.is_ok());
    let at = t0() + Duration::from_secs(30 * 60);
    assert_eq!(
        g.check(Some(&s), at).await,
        Err(CeilingHit {
            kind: CeilingKind::WallClock,
            limit: 1_800_000,
            used: 1_800_000
        })
    );
    // A session that starts later gets its own clock.
    assert!(g.check(Some(&key("w2")), at).await.is_ok());
}

#[tokio::test]
async fn warn_at_turns_from_the_threshold_turn() {
    let (g, _) = guard(GuardConfig {
        max_turns: Some(10),
        warn_at: Some(0.8),
        ..GuardConfig::default()
    });
    let s = key("warn");
    for turn in 1..=10u64 {
        let w = g.check(Some(&s), t0()).await.unwrap();
        if turn < 8 {
            assert_eq!(w, None, "turn {turn}");
        } else {
            assert_eq!(w.unwrap().header_value(), format!("turns={turn}/10"));
        }
    }
    assert!(g.check(Some(&s), t0()).await.is_err());
}

#[tokio::test]
async fn warn_at_covers_every_ceiling() {
    let cfg: GuardConfig = toml::from_str(
        r#"
        max_turns = 100
        max_tokens = 1000
        max_spend_usd = "1.00"
        max_wall_clock = "10m"
        warn_at = 0.9
        "#,
    )
    .unwrap();
    let (g, _) = guard(cfg);
    let s = key("all");
    assert_eq!(g.check(Some(&s), t0()).await, Ok(None));
    g.record(Some(&s), 899, 899_999_999, t0()).await;
    let later = t0() + Duration::from_secs(8 * 60);
    assert_eq!(g.check(Some(&s), later).await, Ok(None));
    g.record(Some(&s), 1, 1, t0()).await;
    let w = g
        .check(Some(&s), t0() + Duration::from_secs(9 * 60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        w.header_value(),
        "tokens=900/1000, spend=0.90/1.00, wall_clock=540s/600s"
    );
    assert!(w.header_value().bytes().all(|b| (0x20..0x7f).contains(&b)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admissions_cannot_share_the_last_turn() {
    let (g, store) = guard(GuardConfig {
        max_turns: Some(5),
        ..GuardConfig::default()
    });
    let g = Arc::new(g);
    let s = key("race");
    for _ in 0..4 {
        assert!(g.check(Some(&s), t0()).await.is_ok());
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (g, s, barrier) = (g.clone(), s.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                g.check(Some(&s), t0()).await.is_ok()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 1);
    assert_eq!(store.usage(&s).await.map(|u| u.turns), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_requests_create_one_session() {
    let (g, store) = guard(GuardConfig {
        max_turns: Some(10),
        ..GuardConfig::default()
    });
    let g = Arc::new(g);
    let s = key("fresh");
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (g, s) = (g.clone(), s.clone());
            tokio::spawn(async move { g.check(Some(&s), t0()).await.is_ok() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 10);
    assert_eq!(store.usage(&s).await.map(|u| u.turns), Some(10));
}

#[tokio::test]
async fn sessions_expire_after_idle_ttl() {
    let (g, store) = guard(GuardConfig {
        max_turns: Some(1),
        idle_ttl: Duration::from_millis(30),
        ..GuardConfig::default()
    });
    let s = key("idle");
    assert!(g.check(Some(&s), t0()).await.is_ok());
    assert!(g.check(Some(&s), t0()).await.is_err());
    store.run_pending_tasks();
    assert_eq!(store.active_count(), 1);
    // Sleeping longer than the TTL only makes expiry more certain, so this is not a timing assert.
    tokio::time::sleep(Duration::from_millis(120)).await;
    // Reads see expiry immediately.
    assert_eq!(store.usage(&s).await, None);
    // moka's timer wheel evicts with ~1 s granularity, so poll the count with a generous cap.
    for _ in 0..100 {
        store.run_pending_tasks();
        if store.active_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.active_count(), 0);
    // The session starts over.
    assert_eq!(g.check(Some(&s), t0()).await, Ok(None));
    assert!(g.check(Some(&s), t0()).await.is_err());
}

#[tokio::test]
async fn no_session_id_is_unaffected() {
    let (g, store) = guard(GuardConfig {
        max_turns: Some(1),
        ..GuardConfig::default()
    });
    let body = json!({"model": "m", "user": "u-1", "messages": []});
    assert_eq!(g.session_key("key:a", None, Some(&body)), None);
    assert_eq!(g.session_key("key:a", Some("   "), Some(&body)), None);
    for _ in 0..5 {
        assert_eq!(g.check(None, t0()).await, Ok(None));
        g.record(None, 1_000_000, 1_000_000_000, t0()).await;
    }
    store.run_pending_tasks();
    assert_eq!(store.active_count(), 0);
}

#[tokio::test]
async fn guard_without_ceilings_does_not_touch_the_store() {
    let (g, store) = guard(GuardConfig::default());
    let s = key("x");
    for _ in 0..3 {
        assert_eq!(g.check(Some(&s), t0()).await, Ok(None));
    }
    g.record(Some(&s), 5, 5, t0()).await;
    store.run_pending_tasks();
    assert_eq!(store.active_count(), 0);
}

#[test]
fn session_key_sources() {
    let (g, _) = guard(GuardConfig {
        session_from_user: true,
        ..GuardConfig::default()
    });
    let body = json!({"user": " u-7 ", "messages": []});
    assert_eq!(
        g.session_key("k", Some(" hdr "), Some(&body)),
        Some(SessionKey::new("k", "hdr"))
    );
    assert_eq!(
        g.session_key("k", None, Some(&body)),
        Some(SessionKey::new("k", "u-7"))
    );
    assert_eq!(g.session_key("k", None, Some(&json!({"user": 5}))), None);
    assert_eq!(g.session_key("k", None, None), None);

    let long = "a".repeat(MAX_SESSION_ID_LEN + 1);
    let hashed = g.session_key("k", Some(&long), None).unwrap();
    assert!(hashed.id.starts_with("h:") && hashed.id.len() == 34);
    assert_eq!(g.session_key("k", Some(&long), None), Some(hashed.clone()));
    let spaced = g.session_key("k", Some("a b\u{e9}"), None).unwrap();
    assert!(spaced.id.starts_with("h:"));
    let exact = "b".repeat(MAX_SESSION_ID_LEN);
    assert_eq!(g.session_key("k", Some(&exact), None).unwrap().id, exact);
}

#[test]
fn guard_detect_loop_uses_config() {
    let msgs: Vec<_> = (0..3)
        .map(|_| json!({"role": "assistant", "tool_calls": [{"function": {"name": "search", "arguments": "{\"q\":\"weather\"}"}}]}))
        .collect();
    let body = json!({ "messages": msgs });
    let (off, _) = guard(GuardConfig::default());
    assert_eq!(off.detect_loop(&body), None);
    let (on, _) = guard(GuardConfig {
        loop_detect: Some(LoopConfig {
            action: LoopAction::Block,
            ..LoopConfig::default()
        }),
        ..GuardConfig::default()
    });
    let f = on.detect_loop(&body).unwrap();
    assert_eq!(f.action, LoopAction::Block);
    assert_eq!(
        f.header_value(),
        r#"repeated=search({"q":"weather"}) count=3"#
    );
}
