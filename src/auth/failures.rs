//! Failed authentications counted per client address, so a key cannot be
//! guessed at line rate. An IPv6 client is counted by its /64: one host
//! usually owns a whole /64 and could rotate addresses inside it for free.

use moka::sync::Cache;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The window failures are counted in.
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; past this the least recently used are dropped,
/// so a spray from many addresses costs bounded memory.
const MAX_TRACKED: u64 = 100_000;

/// The unit failures are counted by: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientBucket(u128);

impl ClientBucket {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientBucket(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientBucket(u128::from(u32::from(v4))),
                // The prefix keeps the high 64 bits; bit 32 (never set by an
                // IPv4 value) keeps `::/64` apart from `0.0.0.1`.
                None => ClientBucket((u128::from(v6) & (!0u128 << 64)) | (1 << 32)),
            },
        }
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    failures: AtomicU32,
}

/// Failures per client bucket in fixed one-minute windows (the window starts
/// at the bucket's first failure).
#[derive(Clone)]
pub struct AuthFailures {
    windows: Cache<ClientBucket, Arc<Window>>,
}

impl Default for AuthFailures {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for AuthFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFailures")
            .field("tracked", &self.windows.entry_count())
            .finish()
    }
}

impl AuthFailures {
    pub fn new() -> Self {
        AuthFailures {
            windows: Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_live(WINDOW)
                .build(),
        }
    }

    /// While `bucket` has used up `max` failures in its window: how long until
    /// it may try again. `max == 0` turns the limit off.
    pub fn blocked(&self, bucket: ClientBucket, max: u32) -> Option<Duration> {
        if max == 0 {
            return None;
        }
        let w = self.windows.get(&bucket)?;
        let left = WINDOW.checked_sub(w.started.elapsed())?;
        (w.failures.load(Ordering::Relaxed) >= max).then_some(left)
    }

    /// Counts one failure of `bucket`.
    pub fn record(&self, bucket: ClientBucket) {
        let w = self.windows.get_with(bucket, || {
            Arc::new(Window {
                started: Instant::now(),
                failures: AtomicU32::new(0),
            })
        });
        if w.started.elapsed() >= WINDOW {
            // Expired but not yet evicted: start a new window.
            self.windows.insert(
                bucket,
                Arc::new(Window {
                    started: Instant::now(),
                    failures: AtomicU32::new(1),
                }),
            );
            return;
        }
        w.failures.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn ipv6_counts_by_slash_64() {
        assert_eq!(
            ClientBucket::of(ip("2001:db8:1:2::1")),
            ClientBucket::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            ClientBucket::of(ip("2001:db8:1:2::1")),
            ClientBucket::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientBucket::of(ip("::ffff:10.0.0.1")),
            ClientBucket::of(ip("10.0.0.1"))
        );
        assert_ne!(
            ClientBucket::of(ip("10.0.0.1")),
            ClientBucket::of(ip("10.0.0.2"))
        );
        // No IPv4 address shares a bucket with an IPv6 /64.
        assert_ne!(ClientBucket::of(ip("::1")), ClientBucket::of(ip("0.0.0.1")));
    }

    #[test]
    fn blocks_after_max_failures_in_the_window() {
        let f = AuthFailures::new();
        let a = ClientBucket::of(ip("192.0.2.7"));
        let b = ClientBucket::of(ip("192.0.2.8"));
        for _ in 0..3 {
            assert!(f.blocked(a, 3).is_none());
            f.record(a);
        }
        let left = f.blocked(a, 3);
        assert!(left.is_some_and(|d| d <= WINDOW && d > Duration::from_secs(50)));
        assert!(
            f.blocked(b, 3).is_none(),
            "other addresses are not affected"
        );
        assert!(f.blocked(a, 0).is_none(), "0 turns the limit off");
        assert!(f.blocked(a, 4).is_none());
    }
}
