//! The optional shared tier of the response cache (`[cache] shared = true`, `[store] kind =
//! "redis"`): an in-memory miss looks in Redis before fetching; a fill is also written to Redis,
//! best effort, off the response path. Single-flight stays per replica.
//!
//! Key: `{P:cache:HEX}` (HEX = the 64-character cache key). Value: [`encode`] of the [`Entry`]
//! (completion, stream chunks, usage), with the entry's TTL (`SET .. PX`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{CacheKey, Entry, Usage};
use crate::store::SharedRedis;

/// Format tag of [`encode`]; a reader skips values with another tag.
const MAGIC: &[u8; 4] = b"tc1\0";
/// Chunk count meaning "not streamed".
const NO_CHUNKS: u32 = u32::MAX;

/// Compact binary form of an entry: magic, usage (3 × u64), stored_at (unix ms, u64), completion
/// (u32 length + bytes), chunk count (u32, `u32::MAX` = none) and each chunk (u32 length +
/// bytes); integers little-endian.
pub fn encode(e: &Entry) -> Vec<u8> {
    let chunks = e.chunks.as_deref();
    let size =
        40 + e.completion.len() + 4 + chunks.map_or(0, |c| c.iter().map(|b| b.len() + 4).sum());
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    for n in [
        e.usage.prompt_tokens,
        e.usage.completion_tokens,
        e.usage.cached_tokens,
    ] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    let stored = e
        .stored_at
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0);
    out.extend_from_slice(&stored.to_le_bytes());
    let put = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(b);
    };
    put(&mut out, &e.completion);
    match chunks {
        None => out.extend_from_slice(&NO_CHUNKS.to_le_bytes()),
        Some(c) => {
            out.extend_from_slice(&u32::try_from(c.len()).unwrap_or(0).to_le_bytes());
            for b in c {
                put(&mut out, b);
            }
        }
    }
    out
}

/// Reads [`encode`]'s format; `None` for anything else (another version, truncated data).
pub fn decode(b: &[u8]) -> Option<Entry> {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(a)
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
        fn bytes(&mut self) -> Option<Bytes> {
            let n = usize::try_from(self.u32()?).ok()?;
            Some(Bytes::copy_from_slice(self.take(n)?))
        }
    }
    let mut r = R(b);
    if r.take(4)? != MAGIC {
        return None;
    }
    let usage = Usage {
        prompt_tokens: r.u64()?,
        completion_tokens: r.u64()?,
        cached_tokens: r.u64()?,
        cache_write_tokens: 0,
        estimated: false,
    };
    let stored_at = UNIX_EPOCH + Duration::from_millis(r.u64()?);
    let completion = r.bytes()?;
    let chunks = match r.u32()? {
        NO_CHUNKS => None,
        n => {
            // Each chunk takes at least 4 bytes: a bogus count cannot allocate much.
            let n = usize::try_from(n).ok()?;
            if n > r.0.len() / 4 {
                return None;
            }
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(r.bytes()?);
            }
            Some(Arc::from(v))
        }
    };
    if !r.0.is_empty() {
        return None;
    }
    Some(Entry {
        completion,
        chunks,
        usage,
        stored_at: stored_at.min(SystemTime::now()),
    })
}

/// The Redis tier of one [`super::ResponseCache`].
#[derive(Debug, Clone)]
pub struct SharedTier {
    redis: Arc<SharedRedis>,
}

impl SharedTier {
    /// A tier storing entries in `redis`.
    pub fn new(redis: Arc<SharedRedis>) -> Self {
        Self { redis }
    }

    /// The Redis key of a cache key.
    pub fn redis_key(&self, key: &CacheKey) -> String {
        format!("{{{}:cache:{}}}", self.redis.key_prefix(), key.to_hex())
    }

    /// The stored entry and its remaining TTL; `None` when absent, unreadable or Redis fails.
    pub async fn get(&self, key: &CacheKey) -> Option<(Entry, Duration)> {
        let k = self.redis_key(key);
        let res: Result<(Option<Vec<u8>>, i64), _> = self
            .redis
            .call(|mut con| {
                let k = &k;
                async move { ::redis::pipe().get(k).pttl(k).query_async(&mut con).await }
            })
            .await;
        match res {
            Ok((Some(v), pttl)) if pttl > 0 => match decode(&v) {
                Some(e) => Some((e, Duration::from_millis(u64::try_from(pttl).unwrap_or(0)))),
                None => {
                    tracing::debug!(key = %key, "unreadable shared cache entry ignored");
                    None
                }
            },
            Ok(_) => None,
            Err(_) => {
                self.redis.unavailable("cache", "skipped");
                None
            }
        }
    }

    /// Writes `entry` with `ttl` in the background (best effort; failures are only counted).
    pub fn put_background(&self, key: &CacheKey, entry: Arc<Entry>, ttl: Duration) {
        let tier = self.clone();
        let k = self.redis_key(key);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        tokio::spawn(async move {
            let value = encode(&entry);
            let res: Result<(), _> = tier
                .redis
                .call(|mut con| {
                    let (k, value) = (&k, &value);
                    async move {
                        ::redis::cmd("SET")
                            .arg(k)
                            .arg(value)
                            .arg("PX")
                            .arg(ttl_ms)
                            .query_async(&mut con)
                            .await
                    }
                })
                .await;
            if res.is_err() {
                tier.redis.unavailable("cache", "skipped");
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        let usage = Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            cached_tokens: 1,
            cache_write_tokens: 0,
            estimated: false,
        };
        for chunks in [
            None,
            Some(vec![]),
            Some(vec![Bytes::from_static(b"{\"a\":1}"), Bytes::new()]),
        ] {
            let e = Entry::from_parts(Bytes::from_static(b"{\"x\":true}"), chunks, usage);
            let b = encode(&e);
            let d = decode(&b).unwrap();
            assert_eq!(d.completion, e.completion);
            assert_eq!(d.chunks.as_deref(), e.chunks.as_deref());
            assert_eq!(d.usage, usage);
            assert_eq!(d.weight(), e.weight());
            for cut in 0..b.len() {
                assert!(decode(&b[..cut]).is_none(), "truncated at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(decode(&longer).is_none());
        }
        assert!(decode(b"tc0\0").is_none());
    }
}
