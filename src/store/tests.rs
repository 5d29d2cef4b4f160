#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use super::*;

fn rec(ts_unix_ms: i64, key: &str, team: Option<&str>, cost: u64) -> SpendRecord {
    SpendRecord {
        ts_unix_ms,
        key: Arc::from(key),
        team: team.map(Arc::from),
        model: "gpt-test".to_owned(),
        prompt_tokens: 10,
        completion_tokens: 5,
        cached_tokens: 2,
        cost_nanos: cost,
        estimated: false,
        request_id: format!("req-{ts_unix_ms}"),
    }
}

// 2024-02-29 (Thu), 2024-03-01 (Fri), 2024-03-04 (Mon), in ms.
const FEB29: i64 = 1_709_210_096_000;
const MAR01: i64 = 1_709_251_200_000;
const MAR04: i64 = 1_709_510_400_000;

#[test]
fn round_trip_write_flush_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("nested/state");
    let mut expected_a = 0;
    {
        let l = SqliteLedger::open(&state).unwrap();
        assert!(l.path().exists());
        for i in 0..2_000u64 {
            let key = if i % 4 == 0 { "b" } else { "a" };
            if key == "a" {
                expected_a += i;
            }
            l.record(rec(FEB29 + i as i64, key, Some("t"), i));
        }
        l.flush().unwrap();
        assert_eq!(l.written_records(), 2_000);
        assert_eq!(l.pending_records(), 0);
        assert_eq!(l.write_errors(), 0);
    }
    let l = SqliteLedger::open(&state).unwrap();
    assert_eq!(l.spent_since(SubjectKind::Key, "a", 0).unwrap(), expected_a);
    assert_eq!(
        l.spent_since(SubjectKind::Team, "t", i64::MIN).unwrap(),
        (0..2_000).sum::<u64>()
    );
    assert_eq!(
        l.spent_since(SubjectKind::Key, "a", FEB29 + 2_000).unwrap(),
        0
    );
    assert_eq!(l.spent_since(SubjectKind::Key, "nobody", 0).unwrap(), 0);
    let conn = Connection::open(l.path()).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let (model, cached, est): (String, i64, bool) = conn
        .query_row(
            "SELECT model, cached_tokens, estimated FROM spend WHERE request_id = ?1",
            [format!("req-{}", FEB29 + 7)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((model.as_str(), cached, est), ("gpt-test", 2, false));
}

#[test]
fn drop_writes_queued_records() {
    let dir = tempfile::tempdir().unwrap();
    {
        let l = SqliteLedger::open(dir.path()).unwrap();
        for i in 0..50 {
            l.record(rec(FEB29 + i, "a", None, 3));
        }
    }
    let l = SqliteLedger::open(dir.path()).unwrap();
    assert_eq!(l.spent_since(SubjectKind::Key, "a", 0).unwrap(), 150);
}

#[test]
fn unwritable_state_dir_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    // Works even as root, where permission bits would not stop us.
    let err = SqliteLedger::open(&file.join("state")).unwrap_err();
    assert!(matches!(err, StoreError::Dir { .. }), "{err}");
    let err = SqliteLedger::open(&file).unwrap_err();
    assert!(
        matches!(err, StoreError::Sqlite { .. } | StoreError::Dir { .. }),
        "{err}"
    );
}

#[test]
fn write_failures_are_counted_kept_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let l = SqliteLedger::open(dir.path()).unwrap();
    l.set_fail_writes(true);
    l.record(rec(FEB29, "a", None, 11));
    l.record(rec(FEB29 + 1, "a", None, 22));
    let err = l.flush().unwrap_err();
    assert!(
        matches!(err, StoreError::Unwritten { pending: 2, .. }),
        "{err}"
    );
    assert!(l.write_errors() >= 1);
    assert_eq!(l.pending_records(), 2);
    assert_eq!(l.spent_since(SubjectKind::Key, "a", 0).unwrap(), 0);
    // The disk recovers: the kept records go out with the next flush.
    l.set_fail_writes(false);
    l.record(rec(FEB29 + 2, "a", None, 33));
    l.flush().unwrap();
    assert_eq!(l.spent_since(SubjectKind::Key, "a", 0).unwrap(), 66);
    assert_eq!(l.pending_records(), 0);
    assert_eq!(l.dropped_records(), 0);
}

#[test]
fn report_groups_by_key_and_period() {
    let dir = tempfile::tempdir().unwrap();
    {
        let l = SqliteLedger::open(dir.path()).unwrap();
        l.record(rec(FEB29, "a", None, 1));
        l.record(rec(FEB29 + 1, "a", None, 2));
        l.record(rec(MAR01, "a", None, 4));
        l.record(rec(MAR04, "a", None, 8));
        l.record(rec(MAR04, "b", Some("t"), 16));
        l.flush().unwrap();
    }
    let row = |k: &str, p: &str, s: u64, n: u64| SpendRow {
        key: k.into(),
        period: p.into(),
        spent_nanos: s,
        requests: n,
    };
    assert_eq!(
        spend_report(dir.path(), Some("a"), Period::Daily).unwrap(),
        vec![
            row("a", "2024-02-29", 3, 2),
            row("a", "2024-03-01", 4, 1),
            row("a", "2024-03-04", 8, 1)
        ]
    );
    assert_eq!(
        spend_report(dir.path(), Some("a"), Period::Weekly).unwrap(),
        vec![row("a", "2024-02-26", 7, 3), row("a", "2024-03-04", 8, 1)]
    );
    assert_eq!(
        spend_report(dir.path(), None, Period::Monthly).unwrap(),
        vec![
            row("a", "2024-02", 3, 2),
            row("a", "2024-03", 12, 2),
            row("b", "2024-03", 16, 1)
        ]
    );
    assert_eq!(
        spend_report(dir.path(), None, Period::Total).unwrap(),
        vec![row("a", "total", 15, 4), row("b", "total", 16, 1)]
    );
    assert!(spend_report(&dir.path().join("missing"), None, Period::Total).is_err());
}
