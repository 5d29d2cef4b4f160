//! Key lookup cost by number of configured keys: `cargo bench --bench auth`.
//! A hit and a miss per size; with lookup by digest both should stay flat
//! (one SHA-256 and one hash probe) from 10 to 100,000 keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use triage::auth::{sha256_hex, KeyTable};
use triage::config::{KeyConfig, LimitsConfig};

fn secret(i: usize) -> String {
    format!("sk-triage-bench-{i:048x}")
}

fn table(n: usize) -> KeyTable {
    let keys: Vec<KeyConfig> = (0..n)
        .map(|i| {
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(&hex::decode(sha256_hex(&secret(i))).unwrap());
            KeyConfig {
                name: format!("key{i}"),
                sha256,
                team: None,
                allow: vec![],
                limits: LimitsConfig::default(),
                guard: None,
            }
        })
        .collect();
    KeyTable::new(&keys)
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("auth_lookup");
    for n in [10usize, 10_000, 100_000] {
        let t = table(n);
        assert_eq!(t.len(), n);
        // The last key: the worst case for a linear scan.
        let hit = secret(n - 1);
        let miss = "sk-triage-not-a-configured-key-000000000000000000000000".to_string();
        assert!(t.authenticate(&hit).is_some());
        assert!(t.authenticate(&miss).is_none());
        g.bench_with_input(BenchmarkId::new("hit", n), &hit, |b, s| {
            b.iter(|| black_box(t.authenticate(black_box(s)).is_some()))
        });
        g.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, s| {
            b.iter(|| black_box(t.authenticate(black_box(s)).is_some()))
        });
    }
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
