//! Microbenchmarks of the per-request hot path: `cargo bench --bench hot_path`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use triage::classify::embedded::EmbeddedClassifier;
use triage::config::Config;
use triage::gateway::stream::SseForwarder;
use triage::limits::{
    AdmitRequest, Clock, KeySpec, LimitSpec, LimitSpecs, Limiter, Period, Settlement,
};
use triage::protocol::openai::chat::parse_chat;
use triage::route::{choose_tier, tier_candidates, Classification, Health, RuleInput};

/// Counts heap allocations so the report can show what each hot path allocates.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations per call of `f`, averaged over 100 calls after a warm-up.
fn allocs_per_call(mut f: impl FnMut()) -> f64 {
    f();
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..100 {
        f();
    }
    (ALLOCS.load(Ordering::Relaxed) - before) as f64 / 100.0
}

fn prompt(chars: usize) -> String {
    let base = "Please review this Rust function and explain why the borrow checker rejects it, then suggest a fix that keeps the API unchanged. ";
    base.repeat(chars / base.len() + 1)[..chars].to_string()
}

fn chat_body(chars: usize) -> Vec<u8> {
    json!({
        "model": "auto",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt(chars)}
        ],
        "temperature": 0.2,
        "max_tokens": 256,
        "tools": [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    })
    .to_string()
    .into_bytes()
}

fn demo_config() -> Config {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/triage.toml"))
        .unwrap();
    let text = text.replace("kind = \"sqlite\"", "kind = \"memory\"");
    Config::parse(&text, Path::new(".")).unwrap()
}

fn bench(c: &mut Criterion) {
    let body = chat_body(2000);
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse_chat_2kB", |b| {
        b.iter(|| parse_chat(black_box(&body)).unwrap())
    });
    g.finish();

    let model = EmbeddedClassifier::default_model().unwrap();
    let p2000 = prompt(2000);
    c.bench_function("classify_embedded_2000_chars", |b| {
        b.iter(|| model.classify(black_box(&p2000)))
    });
    // Worst case for normalisation: option markers on every line force one copy.
    let options = "(A) the borrow checker rejects it\nB. it compiles\n"
        .repeat(40)
        .chars()
        .take(2000)
        .collect::<String>();
    c.bench_function("classify_embedded_2000_chars_options", |b| {
        b.iter(|| model.classify(black_box(&options)))
    });
    let p100 = "Write a Python function that reverses a linked list.";
    c.bench_function("classify_embedded_short", |b| {
        b.iter(|| model.classify(black_box(p100)))
    });

    let cfg = demo_config();
    let router = cfg.routers["auto"].clone();
    let chat = parse_chat(&body).unwrap();
    let health = Health::default();
    let headers = triage::protocol::Headers::new();
    let cls = Classification {
        label: "code".into(),
        confidence: 0.9,
        failed: false,
        bill: None,
    };
    c.bench_function("route_decision", |b| {
        b.iter(|| {
            let input = RuleInput {
                features: &chat.features,
                key: Some("demo"),
                headers: &headers,
            };
            let (tier, _) = choose_tier(&router, black_box(&cls), &input);
            tier_candidates(&cfg, &tier, &health)
        })
    });

    c.bench_function("cache_key_2kB", |b| {
        b.iter(|| triage::cache::cache_key("demo", "auto", black_box(&chat.body)))
    });

    c.bench_function("auth_sha256_lookup", |b| {
        let keys = triage::auth::KeyTable::new(&cfg.keys);
        b.iter(|| keys.authenticate(black_box("sk-triage-demo")).is_some())
    });

    let mut specs = LimitSpecs::default();
    specs.keys.insert(
        "demo".into(),
        KeySpec {
            team: None,
            limits: LimitSpec {
                rpm: Some(u32::MAX / 2),
                tpm: Some(u64::MAX / 4),
                max_parallel: Some(1_000_000),
                budget_nanos: Some(u64::MAX / 4),
                period: Period::Monthly,
            },
        },
    );
    let limiter = Limiter::new(&specs, Clock::system(), None).unwrap();
    c.bench_function("limits_admit_and_settle", |b| {
        b.iter(|| {
            let a = limiter
                .admit(&AdmitRequest {
                    key: "demo",
                    est_tokens: 500,
                    reserve_nanos: 10_000,
                })
                .unwrap();
            a.settle(&Settlement {
                model: "m",
                request_id: "r",
                prompt_tokens: 500,
                completion_tokens: 100,
                cached_tokens: 0,
                cost_nanos: 5_000,
                estimated: false,
            })
        })
    });

    // 40 content chunks + usage + [DONE], forwarded one upstream read each.
    let mut chunks: Vec<Bytes> = (0..40)
        .map(|i| Bytes::from(format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n")))
        .collect();
    chunks.push(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":40}}\n\n"));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Elements(chunks.len() as u64));
    g.bench_function("forward_42_chunks", |b| {
        b.iter_batched(
            || chunks.clone(),
            |chunks| {
                rt.block_on(async {
                    use futures::StreamExt;
                    let up = Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)));
                    let fwd =
                        SseForwarder::new(up, true, 10, None, Instant::now(), Box::new(|_| {}));
                    fwd.fold(
                        0usize,
                        |n, b| async move { n + b.map(|b| b.len()).unwrap_or(0) },
                    )
                    .await
                })
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // The cache hit path without HTTP: key, lookup, replay.
    let cache = triage::cache::ResponseCache::new(triage::cache::CacheConfig::new(
        1 << 24,
        std::time::Duration::from_secs(600),
    ));
    let key = triage::cache::cache_key("demo", "auto", &chat.body);
    let completion = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": prompt(400)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 500, "completion_tokens": 100, "total_tokens": 600}});
    rt.block_on(cache.insert(
        key,
        std::sync::Arc::new(triage::cache::Entry::from_completion(&completion).unwrap()),
        None,
    ));
    let hit = || {
        rt.block_on(async {
            let k = triage::cache::cache_key("demo", "auto", &chat.body);
            match cache.lookup(k, triage::cache::CacheMode::Use).await {
                triage::cache::Lookup::Hit(e) => {
                    e.replay_completion("chatcmpl-x", 1).unwrap().len()
                }
                _ => 0,
            }
        })
    };
    assert!(hit() > 0, "the entry must be a hit");
    c.bench_function("cache_hit_key_lookup_replay", |b| b.iter(hit));

    eprintln!("\nallocations per call:");
    eprintln!(
        "  parse_chat_2kB               {:>6.1}",
        allocs_per_call(|| drop(parse_chat(&body)))
    );
    eprintln!(
        "  classify_embedded_2000_chars {:>6.1}",
        allocs_per_call(|| drop(model.classify(&p2000)))
    );
    eprintln!(
        "  route_decision               {:>6.1}",
        allocs_per_call(|| {
            let input = RuleInput {
                features: &chat.features,
                key: Some("demo"),
                headers: &headers,
            };
            let (tier, _) = choose_tier(&router, &cls, &input);
            drop(tier_candidates(&cfg, &tier, &health));
        })
    );
    eprintln!(
        "  cache_key_2kB                {:>6.1}",
        allocs_per_call(|| {
            black_box(triage::cache::cache_key("demo", "auto", &chat.body));
        })
    );
    eprintln!(
        "  limits_admit_and_settle      {:>6.1}",
        allocs_per_call(|| {
            let a = limiter
                .admit(&AdmitRequest {
                    key: "demo",
                    est_tokens: 500,
                    reserve_nanos: 10_000,
                })
                .unwrap();
            a.settle(&Settlement {
                model: "m",
                request_id: "r",
                prompt_tokens: 500,
                completion_tokens: 100,
                cached_tokens: 0,
                cost_nanos: 5_000,
                estimated: false,
            });
        })
    );
    eprintln!(
        "  cache_hit_key_lookup_replay  {:>6.1}",
        allocs_per_call(|| {
            black_box(hit());
        })
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
