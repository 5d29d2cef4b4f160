//! Exact-match response cache for chat completions: byte-bounded, TTL'd (global or
//! per entry), single-flight, and faithful to streams (stores the original chunks).
//!
//! Flow for a handler:
//! 1. `mode = cache_mode(body, cache_control, allow_sampled_n, ttl)`;
//!    `key = cache_key(scope, target, body)`.
//! 2. `match cache.lookup(key, mode).await`:
//!    - `Hit(entry)`: replay (`entry.replay_completion` / `entry.replay_chunks`).
//!    - `Miss(guard)`: fetch upstream; on a complete answer
//!      `guard.complete(Entry::from_..., ttl).await`; on error/disconnect just drop
//!      the guard (errors are never cached; a waiter takes over).
//!    - `Bypass`: fetch, do not store.
//!
//! With a [`SharedTier`] (Redis), a `Use` lookup that misses in memory asks Redis before
//! fetching (the leader does, so single-flight stays per replica), and every completed fill is
//! also written to Redis in the background.

mod key;
mod policy;
mod shared;

pub use crate::protocol::openai::chunks::{
    assemble_completion, completion_to_chunks, refresh_ids, DEFAULT_CHUNK_CHARS,
};
pub use key::{cache_key, cache_key_with, CacheKey, IGNORED_FIELDS};
pub use policy::{cache_mode, CacheControl, CacheMode};
pub use shared::{decode as decode_shared, encode as encode_shared, SharedTier};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use moka::notification::RemovalCause;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

/// Errors from building or replaying entries.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Stored or supplied JSON could not be (de)serialized.
    #[error("cache entry json: {0}")]
    Json(#[from] serde_json::Error),
}

pub use crate::usage::Usage;

/// One stored answer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Serialized non-streaming `chat.completion`.
    pub completion: Bytes,
    /// When the answer was streamed: each SSE `data:` payload (`chat.completion.chunk`
    /// JSON) in order, without the `[DONE]` sentinel.
    pub chunks: Option<Arc<[Bytes]>>,
    /// Usage of the original upstream call.
    pub usage: Usage,
    /// When the entry was built (for `Age`-style display).
    pub stored_at: SystemTime,
}

/// Fixed per-entry bookkeeping cost added to the weight.
const ENTRY_OVERHEAD: u64 = 160;
/// Per-chunk bookkeeping cost added to the weight.
const CHUNK_OVERHEAD: u64 = 16;

impl Entry {
    /// Entry from an already-serialized completion and optional raw chunk payloads.
    pub fn from_parts(completion: Bytes, chunks: Option<Vec<Bytes>>, usage: Usage) -> Self {
        Self {
            completion,
            chunks: chunks.map(Arc::from),
            usage,
            stored_at: SystemTime::now(),
        }
    }

    /// Entry from a non-streamed `chat.completion` value.
    pub fn from_completion(completion: &Value) -> Result<Self, CacheError> {
        let usage = completion
            .get("usage")
            .map(Usage::from_json_lenient)
            .unwrap_or_default();
        Ok(Self::from_parts(
            Bytes::from(serde_json::to_vec(completion)?),
            None,
            usage,
        ))
    }

    /// Entry from a streamed answer given as parsed chunks (the completion is assembled).
    pub fn from_chunks(chunks: &[Value]) -> Result<Self, CacheError> {
        let raw = chunks
            .iter()
            .map(|c| serde_json::to_vec(c).map(Bytes::from))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_assembled(chunks, raw)
    }

    /// Entry from a streamed answer given as the raw SSE `data:` payloads (kept verbatim).
    pub fn from_chunk_bytes(raw: Vec<Bytes>) -> Result<Self, CacheError> {
        let parsed = raw
            .iter()
            .map(|b| serde_json::from_slice::<Value>(b))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_assembled(&parsed, raw)
    }

    fn from_assembled(parsed: &[Value], raw: Vec<Bytes>) -> Result<Self, CacheError> {
        let completion = assemble_completion(parsed);
        let usage = completion
            .get("usage")
            .map(Usage::from_json_lenient)
            .unwrap_or_default();
        Ok(Self::from_parts(
            Bytes::from(serde_json::to_vec(&completion)?),
            Some(raw),
            usage,
        ))
    }

    /// Bytes this entry is charged against `max_bytes`.
    pub fn weight(&self) -> u64 {
        let chunks = self.chunks.as_deref().unwrap_or(&[]);
        let chunk_bytes: u64 = chunks.iter().map(|c| c.len() as u64 + CHUNK_OVERHEAD).sum();
        ENTRY_OVERHEAD + self.completion.len() as u64 + chunk_bytes
    }

    /// The stored completion as JSON.
    pub fn completion_json(&self) -> Result<Value, CacheError> {
        Ok(serde_json::from_slice(&self.completion)?)
    }

    /// The completion re-serialized with a fresh `id`/`created`.
    pub fn replay_completion(&self, id: &str, created: u64) -> Result<Bytes, CacheError> {
        let mut v = self.completion_json()?;
        refresh_ids(&mut v, id, created);
        Ok(Bytes::from(serde_json::to_vec(&v)?))
    }

    /// SSE `data:` payloads for a streamed replay, with fresh `id`/`created`: the
    /// original chunks if the answer was streamed, otherwise synthesized from the
    /// completion in deltas of `chunk_chars` characters. With `include_usage == false`
    /// the usage-only chunk and per-chunk `usage` fields are dropped.
    pub fn replay_chunks(
        &self,
        id: &str,
        created: u64,
        chunk_chars: usize,
        include_usage: bool,
    ) -> Result<Vec<Bytes>, CacheError> {
        let values: Vec<Value> = match self.chunks.as_deref() {
            Some(raw) => raw
                .iter()
                .map(|b| serde_json::from_slice(b))
                .collect::<Result<_, _>>()?,
            None => completion_to_chunks(&self.completion_json()?, chunk_chars),
        };
        let mut out = Vec::with_capacity(values.len());
        for mut v in values {
            if !include_usage {
                let usage_only = v
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty)
                    && v.get("usage").is_some_and(|u| !u.is_null());
                if usage_only {
                    continue;
                }
                if let Value::Object(m) = &mut v {
                    m.remove("usage");
                }
            }
            refresh_ids(&mut v, id, created);
            out.push(Bytes::from(serde_json::to_vec(&v)?));
        }
        Ok(out)
    }
}

/// Cache sizing and timing.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Upper bound on the summed [`Entry::weight`] of all entries.
    pub max_bytes: u64,
    /// Entries heavier than this are not stored (one answer must not flush the cache).
    pub max_entry_bytes: u64,
    /// TTL when `complete` is given none.
    pub default_ttl: Duration,
    /// How long a waiter waits for a leader before fetching on its own (its answer is
    /// still stored). `None` waits as long as the leader lives.
    pub max_wait: Option<Duration>,
}

impl CacheConfig {
    /// `max_bytes` total, `default_ttl`; entries up to 1/8 of the budget; waiters give
    /// up after 5 minutes.
    pub fn new(max_bytes: u64, default_ttl: Duration) -> Self {
        Self {
            max_bytes,
            max_entry_bytes: (max_bytes / 8).max(1),
            default_ttl,
            max_wait: Some(Duration::from_secs(300)),
        }
    }
}

/// Counters for metrics (monotonic except `bytes`, `entries`, `inflight`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from the store (memory or the shared tier).
    pub hits: u64,
    /// Of `hits`, those read from the shared tier (Redis).
    pub shared_hits: u64,
    /// Lookups served by waiting for an identical in-flight request.
    pub coalesced: u64,
    /// Lookups that had to fetch (leaders, plus waiters that timed out).
    pub misses: u64,
    /// `Refresh` lookups (no-cache).
    pub refreshes: u64,
    /// `Bypass` lookups.
    pub bypasses: u64,
    /// Entries written.
    pub inserts: u64,
    /// Completed answers not stored because heavier than `max_entry_bytes`.
    pub too_large: u64,
    /// Entries dropped (or refused admission) to stay under `max_bytes`.
    pub evictions: u64,
    /// Entries dropped because their TTL ran out.
    pub expirations: u64,
    /// Waiters that gave up after `max_wait`.
    pub wait_timeouts: u64,
    /// Current weighted size (eventually consistent).
    pub bytes: u64,
    /// Current entry count (eventually consistent).
    pub entries: u64,
    /// Fills currently in flight.
    pub inflight: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    shared_hits: AtomicU64,
    coalesced: AtomicU64,
    misses: AtomicU64,
    refreshes: AtomicU64,
    bypasses: AtomicU64,
    inserts: AtomicU64,
    too_large: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    wait_timeouts: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Clone)]
struct Stored {
    entry: Arc<Entry>,
    ttl: Duration,
}

struct PerEntryTtl;

impl moka::Expiry<CacheKey, Stored> for PerEntryTtl {
    fn expire_after_create(&self, _: &CacheKey, v: &Stored, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        v: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

#[derive(Clone)]
enum FlightState {
    Pending,
    Done(Arc<Entry>),
    Abandoned,
}

type Flight = Arc<watch::Sender<FlightState>>;

struct Inner {
    store: moka::future::Cache<CacheKey, Stored>,
    inflight: Mutex<HashMap<CacheKey, Flight>>,
    counters: Arc<Counters>,
    cfg: CacheConfig,
    shared: Option<SharedTier>,
}

/// The response cache; cheap to clone (shared state).
#[derive(Clone)]
pub struct ResponseCache {
    inner: Arc<Inner>,
}

/// Result of [`ResponseCache::lookup`].
pub enum Lookup {
    /// A stored (or just-fetched by another request) answer.
    Hit(Arc<Entry>),
    /// This caller must fetch; report the outcome through the guard.
    Miss(FillGuard),
    /// Caching is off for this request: fetch and do not store.
    Bypass,
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hit(_) => f.write_str("Hit"),
            Self::Miss(g) => write!(f, "Miss(leader={})", g.is_leader()),
            Self::Bypass => f.write_str("Bypass"),
        }
    }
}

enum Join {
    Lead(FillGuard),
    Wait(watch::Receiver<FlightState>),
}

impl ResponseCache {
    /// Builds an empty cache.
    pub fn new(cfg: CacheConfig) -> Self {
        Self::build(cfg, None)
    }

    /// Builds an empty cache backed by a shared tier (see the module docs).
    pub fn with_shared(cfg: CacheConfig, shared: SharedTier) -> Self {
        Self::build(cfg, Some(shared))
    }

    fn build(cfg: CacheConfig, shared: Option<SharedTier>) -> Self {
        let counters = Arc::new(Counters::default());
        let listener_counters = Arc::clone(&counters);
        let store = moka::future::Cache::builder()
            .max_capacity(cfg.max_bytes)
            .weigher(|_: &CacheKey, v: &Stored| u32::try_from(v.entry.weight()).unwrap_or(u32::MAX))
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_k, _v, cause| match cause {
                RemovalCause::Size => bump(&listener_counters.evictions),
                RemovalCause::Expired => bump(&listener_counters.expirations),
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            })
            .build();
        Self {
            inner: Arc::new(Inner {
                store,
                inflight: Mutex::new(HashMap::new()),
                counters,
                cfg,
                shared,
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.cfg
    }

    /// Looks `key` up according to `mode`, coalescing identical concurrent misses:
    /// one caller gets `Miss` (the leader), the others wait and get its `Hit`. If the
    /// leader drops its guard without completing, exactly one waiter becomes the new
    /// leader. Dropping this future at any point is safe.
    pub async fn lookup(&self, key: CacheKey, mode: CacheMode) -> Lookup {
        let c = &self.inner.counters;
        match mode {
            CacheMode::Bypass => {
                bump(&c.bypasses);
                Lookup::Bypass
            }
            CacheMode::Refresh => {
                bump(&c.refreshes);
                // Lead if nobody is fetching (so `Use` callers can wait on us);
                // otherwise fetch independently and still store.
                match self.join(key) {
                    Join::Lead(g) => Lookup::Miss(g),
                    Join::Wait(_) => Lookup::Miss(self.detached(key)),
                }
            }
            CacheMode::Use => self.lookup_use(key).await,
        }
    }

    async fn lookup_use(&self, key: CacheKey) -> Lookup {
        let c = &self.inner.counters;
        let deadline = self
            .inner
            .cfg
            .max_wait
            .map(|d| tokio::time::Instant::now() + d);
        loop {
            if let Some(s) = self.inner.store.get(&key).await {
                bump(&c.hits);
                return Lookup::Hit(s.entry);
            }
            let rx = match self.join(key) {
                Join::Lead(mut guard) => {
                    // A previous leader may have stored and left between our `get`
                    // and `join`; re-check so we don't fetch twice.
                    if let Some(s) = self.inner.store.get(&key).await {
                        guard.resolve(FlightState::Done(Arc::clone(&s.entry)));
                        bump(&c.hits);
                        return Lookup::Hit(s.entry);
                    }
                    if let Some(entry) = self.shared_get(&key).await {
                        guard.resolve(FlightState::Done(Arc::clone(&entry)));
                        bump(&c.hits);
                        bump(&c.shared_hits);
                        return Lookup::Hit(entry);
                    }
                    bump(&c.misses);
                    return Lookup::Miss(guard);
                }
                Join::Wait(rx) => rx,
            };
            let outcome = match deadline {
                Some(d) => match tokio::time::timeout_at(d, wait_flight(rx)).await {
                    Ok(o) => o,
                    Err(_) => {
                        bump(&c.wait_timeouts);
                        bump(&c.misses);
                        return Lookup::Miss(self.detached(key));
                    }
                },
                None => wait_flight(rx).await,
            };
            if let Some(entry) = outcome {
                bump(&c.coalesced);
                return Lookup::Hit(entry);
            }
            // Leader gave up: loop; the first waiter to `join` leads, the rest wait.
        }
    }

    /// Reads the shared tier; a hit is kept in memory for the rest of its shared TTL.
    async fn shared_get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let (entry, ttl) = self.inner.shared.as_ref()?.get(key).await?;
        let entry = Arc::new(entry);
        self.insert(*key, Arc::clone(&entry), Some(ttl)).await;
        Some(entry)
    }

    /// Writes a completed fill to the shared tier, off the response path; entries too large
    /// for memory are not shared either.
    fn share(&self, key: CacheKey, entry: &Arc<Entry>, ttl: Option<Duration>) {
        let Some(tier) = &self.inner.shared else {
            return;
        };
        let ttl = ttl.unwrap_or(self.inner.cfg.default_ttl);
        if ttl.is_zero()
            || entry.weight() > self.inner.cfg.max_entry_bytes.min(self.inner.cfg.max_bytes)
        {
            return;
        }
        tier.put_background(&key, Arc::clone(entry), ttl);
    }

    /// Whether this cache has a shared tier.
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// Registers as leader for `key`, or subscribes to the current leader.
    fn join(&self, key: CacheKey) -> Join {
        let mut map = self.inner.inflight.lock();
        if let Some(tx) = map.get(&key) {
            return Join::Wait(tx.subscribe());
        }
        let tx: Flight = Arc::new(watch::channel(FlightState::Pending).0);
        map.insert(key, Arc::clone(&tx));
        Join::Lead(FillGuard {
            cache: self.clone(),
            key,
            flight: Some(tx),
        })
    }

    fn detached(&self, key: CacheKey) -> FillGuard {
        FillGuard {
            cache: self.clone(),
            key,
            flight: None,
        }
    }

    /// Stores `entry` directly in memory (no single-flight, not written to the shared tier);
    /// `None` TTL uses the default.
    pub async fn insert(&self, key: CacheKey, entry: Arc<Entry>, ttl: Option<Duration>) {
        let ttl = ttl.unwrap_or(self.inner.cfg.default_ttl);
        if ttl.is_zero() {
            return;
        }
        if entry.weight() > self.inner.cfg.max_entry_bytes.min(self.inner.cfg.max_bytes) {
            bump(&self.inner.counters.too_large);
            tracing::debug!(key = ?key, weight = entry.weight(), "response too large to cache");
            return;
        }
        self.inner.store.insert(key, Stored { entry, ttl }).await;
        bump(&self.inner.counters.inserts);
    }

    /// Reads `key` without single-flight or hit/miss accounting.
    pub async fn peek(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.inner.store.get(key).await.map(|s| s.entry)
    }

    /// Removes one entry.
    pub async fn invalidate(&self, key: &CacheKey) {
        self.inner.store.invalidate(key).await;
    }

    /// Removes every entry (lazily, per moka).
    pub fn clear(&self) {
        self.inner.store.invalidate_all();
    }

    /// Runs moka's deferred maintenance (evictions, expirations, size accounting).
    pub async fn run_pending_tasks(&self) {
        self.inner.store.run_pending_tasks().await;
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: r(&c.hits),
            shared_hits: r(&c.shared_hits),
            coalesced: r(&c.coalesced),
            misses: r(&c.misses),
            refreshes: r(&c.refreshes),
            bypasses: r(&c.bypasses),
            inserts: r(&c.inserts),
            too_large: r(&c.too_large),
            evictions: r(&c.evictions),
            expirations: r(&c.expirations),
            wait_timeouts: r(&c.wait_timeouts),
            bytes: self.inner.store.weighted_size(),
            entries: self.inner.store.entry_count(),
            inflight: self.inner.inflight.lock().len() as u64,
        }
    }
}

/// Waits until the leader finishes; `Some` on success, `None` if it gave up.
async fn wait_flight(mut rx: watch::Receiver<FlightState>) -> Option<Arc<Entry>> {
    let state = rx
        .wait_for(|s| !matches!(s, FlightState::Pending))
        .await
        .ok()?;
    match &*state {
        FlightState::Done(e) => Some(Arc::clone(e)),
        FlightState::Pending | FlightState::Abandoned => None,
    }
}

/// Obligation of the caller that must fetch. Call [`FillGuard::complete`] with a
/// complete answer; dropping it (error, cancellation, client gone) hands the fetch to
/// one waiting request instead.
pub struct FillGuard {
    cache: ResponseCache,
    key: CacheKey,
    /// `None` for a detached fill (refresh racing a leader, or a timed-out waiter):
    /// it stores but nobody waits on it.
    flight: Option<Flight>,
}

impl FillGuard {
    /// The key being filled.
    pub fn key(&self) -> CacheKey {
        self.key
    }

    /// Whether other requests may be waiting on this fill.
    pub fn is_leader(&self) -> bool {
        self.flight.is_some()
    }

    /// Stores `entry` (TTL `ttl`, or the default) and hands it to all waiters.
    pub async fn complete(mut self, entry: Entry, ttl: Option<Duration>) -> Arc<Entry> {
        let entry = Arc::new(entry);
        // If this future is dropped mid-insert, `Drop` releases the waiters.
        self.cache.insert(self.key, Arc::clone(&entry), ttl).await;
        self.cache.share(self.key, &entry, ttl);
        self.resolve(FlightState::Done(Arc::clone(&entry)));
        entry
    }

    /// Gives up explicitly (same as dropping the guard).
    pub fn abandon(self) {}

    fn resolve(&mut self, state: FlightState) {
        let Some(tx) = self.flight.take() else {
            return;
        };
        {
            let mut map = self.cache.inner.inflight.lock();
            if map.get(&self.key).is_some_and(|t| Arc::ptr_eq(t, &tx)) {
                map.remove(&self.key);
            }
        }
        // After removal, so a woken waiter that must lead finds the slot free.
        tx.send_replace(state);
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.resolve(FlightState::Abandoned);
    }
}

#[cfg(test)]
mod tests;
