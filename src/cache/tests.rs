#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use serde_json::json;
use tokio::sync::mpsc;

fn key(n: u8) -> CacheKey {
    CacheKey([n; 32])
}

fn cache() -> ResponseCache {
    ResponseCache::new(CacheConfig::new(1 << 20, Duration::from_secs(3600)))
}

fn entry(text: &str) -> Entry {
    Entry::from_completion(&json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                  "prompt_tokens_details": {"cached_tokens": 2}}
    }))
    .unwrap()
}

fn content(e: &Entry) -> String {
    e.completion_json().unwrap()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Polls (yielding) until `n` requests wait on the in-flight fill for `k`.
async fn until_waiters(c: &ResponseCache, k: CacheKey, n: usize) {
    loop {
        let count = c
            .inner
            .inflight
            .lock()
            .get(&k)
            .map_or(0, |tx| tx.receiver_count());
        if count == n {
            return;
        }
        tokio::task::yield_now().await;
    }
}

enum Outcome {
    Hit(String),
    Led,
}

/// Spawns `n` identical lookups; leaders send their guard to the returned channel.
fn spawn_lookups(
    c: &ResponseCache,
    k: CacheKey,
    n: usize,
) -> (
    Vec<tokio::task::JoinHandle<Outcome>>,
    mpsc::UnboundedReceiver<FillGuard>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handles = (0..n)
        .map(|_| {
            let c = c.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match c.lookup(k, CacheMode::Use).await {
                    Lookup::Hit(e) => Outcome::Hit(content(&e)),
                    Lookup::Miss(g) => {
                        tx.send(g).ok().unwrap();
                        Outcome::Led
                    }
                    Lookup::Bypass => panic!("unexpected bypass"),
                }
            })
        })
        .collect();
    (handles, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_identical_lookups_one_leader() {
    let c = cache();
    let k = key(1);
    let (handles, mut leaders) = spawn_lookups(&c, k, 50);
    let guard = leaders.recv().await.unwrap();
    assert!(guard.is_leader());
    until_waiters(&c, k, 49).await;
    guard.complete(entry("answer"), None).await;
    let mut led = 0;
    for h in handles {
        match h.await.unwrap() {
            Outcome::Led => led += 1,
            Outcome::Hit(text) => assert_eq!(text, "answer"),
        }
    }
    assert_eq!(led, 1);
    assert!(leaders.try_recv().is_err());
    let s = c.stats();
    assert_eq!((s.misses, s.coalesced, s.hits, s.inserts), (1, 49, 0, 1));
    assert_eq!(s.inflight, 0);
    // Later lookups hit the store.
    assert!(matches!(c.lookup(k, CacheMode::Use).await, Lookup::Hit(_)));
    assert_eq!(c.stats().hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_failure_elects_exactly_one_new_leader() {
    let c = cache();
    let k = key(2);
    let (handles, mut leaders) = spawn_lookups(&c, k, 50);
    let first = leaders.recv().await.unwrap();
    until_waiters(&c, k, 49).await;
    drop(first); // upstream error: nothing is cached
    let second = leaders.recv().await.unwrap();
    assert!(second.is_leader());
    until_waiters(&c, k, 48).await;
    assert!(leaders.try_recv().is_err());
    assert!(c.peek(&k).await.is_none());
    second.complete(entry("retry"), None).await;
    let mut led = 0;
    for h in handles {
        match h.await.unwrap() {
            Outcome::Led => led += 1,
            Outcome::Hit(text) => assert_eq!(text, "retry"),
        }
    }
    assert_eq!(led, 2);
    let s = c.stats();
    assert_eq!((s.misses, s.coalesced, s.inserts), (2, 48, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waiters_and_leaders_do_not_break_others() {
    let c = cache();
    let k = key(3);
    // A leader whose request future is dropped mid-fetch.
    let leader_task = {
        let c = c.clone();
        tokio::spawn(async move {
            let Lookup::Miss(_guard) = c.lookup(k, CacheMode::Use).await else {
                panic!("expected leader");
            };
            std::future::pending::<()>().await;
        })
    };
    while c.stats().inflight == 0 {
        tokio::task::yield_now().await;
    }
    let (handles, mut leaders) = spawn_lookups(&c, k, 5);
    until_waiters(&c, k, 5).await;
    // A waiter that gets cancelled.
    let doomed = {
        let c = c.clone();
        tokio::spawn(async move { c.lookup(k, CacheMode::Use).await })
    };
    until_waiters(&c, k, 6).await;
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());
    until_waiters(&c, k, 5).await;
    // Client disconnect of the leader: its guard is dropped with the task.
    leader_task.abort();
    let _ = leader_task.await;
    let next = leaders.recv().await.unwrap();
    until_waiters(&c, k, 4).await;
    next.complete(entry("ok"), None).await;
    let led = futures_count(handles).await;
    assert_eq!(led, 1);
}

async fn futures_count(handles: Vec<tokio::task::JoinHandle<Outcome>>) -> usize {
    let mut led = 0;
    for h in handles {
        if let Outcome::Led = h.await.unwrap() {
            led += 1;
        }
    }
    led
}

#[tokio::test]
async fn waiter_times_out_and_fetches_detached() {
    let mut cfg = CacheConfig::new(1 << 20, Duration::from_secs(3600));
    cfg.max_wait = Some(Duration::from_millis(50));
    let c = ResponseCache::new(cfg);
    let k = key(4);
    let Lookup::Miss(leader) = c.lookup(k, CacheMode::Use).await else {
        panic!("expected leader");
    };
    // The leader is stuck, so the waiter gives up after max_wait.
    let Lookup::Miss(detached) = c.lookup(k, CacheMode::Use).await else {
        panic!("expected detached miss");
    };
    assert!(!detached.is_leader());
    assert_eq!(c.stats().wait_timeouts, 1);
    detached.complete(entry("side"), None).await;
    assert_eq!(content(&c.peek(&k).await.unwrap()), "side");
    leader.complete(entry("lead"), None).await;
    assert_eq!(content(&c.peek(&k).await.unwrap()), "lead");
}

#[tokio::test]
async fn modes_refresh_and_bypass() {
    let c = cache();
    let k = key(5);
    let Lookup::Miss(g) = c.lookup(k, CacheMode::Use).await else {
        panic!("expected miss");
    };
    g.complete(entry("v1"), None).await;
    assert!(matches!(
        c.lookup(k, CacheMode::Bypass).await,
        Lookup::Bypass
    ));
    // no-cache: skip the stored answer, store the fresh one.
    let Lookup::Miss(g) = c.lookup(k, CacheMode::Refresh).await else {
        panic!("refresh must not hit");
    };
    assert!(g.is_leader());
    g.complete(entry("v2"), None).await;
    let Lookup::Hit(e) = c.lookup(k, CacheMode::Use).await else {
        panic!("expected hit");
    };
    assert_eq!(content(&e), "v2");
    assert_eq!(
        e.usage,
        Usage {
            prompt_tokens: 5,
            completion_tokens: 7,
            cached_tokens: 2,
            cache_write_tokens: 0,
            estimated: false,
        }
    );
    let s = c.stats();
    assert_eq!((s.bypasses, s.refreshes, s.hits, s.misses), (1, 1, 1, 1));
    // A refresh racing a leader fetches on its own instead of waiting.
    let k2 = key(6);
    let Lookup::Miss(lead) = c.lookup(k2, CacheMode::Use).await else {
        panic!("expected miss");
    };
    let Lookup::Miss(side) = c.lookup(k2, CacheMode::Refresh).await else {
        panic!("expected miss");
    };
    assert!(lead.is_leader() && !side.is_leader());
}

#[tokio::test]
async fn ttl_expiry_default_and_per_entry() {
    let c = cache();
    let (short, long) = (key(7), key(8));
    let Lookup::Miss(g) = c.lookup(short, CacheMode::Use).await else {
        panic!()
    };
    g.complete(entry("short"), Some(Duration::from_millis(30)))
        .await;
    let Lookup::Miss(g) = c.lookup(long, CacheMode::Use).await else {
        panic!()
    };
    g.complete(entry("long"), None).await;
    // moka's clock is real time; sleeping longer than the TTL only makes expiry surer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(matches!(
        c.lookup(short, CacheMode::Use).await,
        Lookup::Miss(_)
    ));
    assert!(matches!(
        c.lookup(long, CacheMode::Use).await,
        Lookup::Hit(_)
    ));
    // moka's timer wheel reaps expired entries in ~1 s buckets; poll (bounded).
    for _ in 0..100 {
        c.run_pending_tasks().await;
        if c.stats().expirations > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = c.stats();
    assert_eq!(s.expirations, 1);
    assert_eq!(s.entries, 1);
    // A zero TTL still answers waiters but stores nothing.
    let k = key(9);
    let Lookup::Miss(g) = c.lookup(k, CacheMode::Use).await else {
        panic!()
    };
    let e = g.complete(entry("x"), Some(Duration::ZERO)).await;
    assert_eq!(content(&e), "x");
    assert!(c.peek(&k).await.is_none());
}

#[tokio::test]
async fn byte_bound_evicts_and_rejects_oversized() {
    let mut cfg = CacheConfig::new(20_000, Duration::from_secs(3600));
    cfg.max_entry_bytes = 5_000;
    let c = ResponseCache::new(cfg);
    let body = "x".repeat(900);
    let w = entry(&body).weight();
    assert!(w > 900 && w < 2_000);
    for i in 0..60u8 {
        c.insert(key(i), Arc::new(entry(&body)), None).await;
    }
    c.run_pending_tasks().await;
    let s = c.stats();
    assert_eq!(s.inserts, 60);
    assert!(s.bytes <= 20_000, "bytes {}", s.bytes);
    assert!(s.evictions >= 60 - 20_000 / w, "evictions {}", s.evictions);
    assert_eq!(s.entries * w, s.bytes);
    c.insert(key(200), Arc::new(entry(&"y".repeat(6_000))), None)
        .await;
    assert_eq!(c.stats().too_large, 1);
    assert!(c.peek(&key(200)).await.is_none());
}

fn stream_chunks() -> Vec<Value> {
    let base = |choices: Value| {
        json!({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 9,
               "model": "m", "choices": choices})
    };
    vec![
        base(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        ),
        base(json!([{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}])),
        base(json!([{"index": 0, "delta": {"content": "lo"}, "finish_reason": null}])),
        base(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])),
        {
            let mut u = base(json!([]));
            u["usage"] = json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5});
            u
        },
    ]
}

#[test]
fn streamed_entry_replays_original_chunks() {
    let chunks = stream_chunks();
    let e = Entry::from_chunks(&chunks).unwrap();
    assert_eq!(e.usage.completion_tokens, 2);
    assert_eq!(content(&e), "Hello");
    let replay = e.replay_chunks("chatcmpl-new", 77, 4, true).unwrap();
    assert_eq!(replay.len(), chunks.len());
    for (raw, orig) in replay.iter().zip(&chunks) {
        let mut v: Value = serde_json::from_slice(raw).unwrap();
        assert_eq!(v["id"], "chatcmpl-new");
        assert_eq!(v["created"], 77);
        refresh_ids(&mut v, "chatcmpl-s", 9);
        assert_eq!(&v, orig);
    }
    let no_usage = e.replay_chunks("i", 1, 4, false).unwrap();
    assert_eq!(no_usage.len(), chunks.len() - 1);
    // Raw bytes path keeps payloads verbatim.
    let raw: Vec<Bytes> = chunks
        .iter()
        .map(|c| Bytes::from(serde_json::to_vec(c).unwrap()))
        .collect();
    let e2 = Entry::from_chunk_bytes(raw.clone()).unwrap();
    assert_eq!(e2.chunks.as_deref().unwrap(), &raw[..]);
    assert_eq!(e2.completion, e.completion);
    assert!(Entry::from_chunk_bytes(vec![Bytes::from_static(b"{oops")]).is_err());
}

#[test]
fn non_streamed_entry_replays_as_synthesized_stream() {
    let e = entry("The quick brown fox jumps over the lazy dog.");
    let replay = e.replay_chunks("chatcmpl-r", 5, 8, true).unwrap();
    assert!(replay.len() > 5);
    let values: Vec<Value> = replay
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    let rebuilt = assemble_completion(&values);
    let mut orig = e.completion_json().unwrap();
    refresh_ids(&mut orig, "chatcmpl-r", 5);
    assert_eq!(rebuilt, orig);
    let body = e.replay_completion("chatcmpl-z", 6).unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["created"].as_u64()),
        (Some("chatcmpl-z"), Some(6))
    );
}
