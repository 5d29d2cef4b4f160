//! Circuit breaker and events shared by every Redis client (limits, sessions, shared cache).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the breaker skips Redis after a failure before one call probes it again.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Shared-store events for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEvent {
    /// A call failed: `op` is admit|settle|status|session|cache, `outcome` what happened instead
    /// (refused|local|queued|skipped).
    Unavailable {
        /// The operation.
        op: &'static str,
        /// What the gateway did instead.
        outcome: &'static str,
    },
    /// Redis answers again (`true`) or stopped answering (`false`).
    Up(bool),
}

/// Callback receiving [`StoreEvent`]s.
pub type StoreEvents = Arc<dyn Fn(StoreEvent) + Send + Sync>;

/// Skips Redis for [`RETRY_EVERY`] after a failure; then lets one caller probe it.
pub struct Breaker {
    start: Instant,
    down: AtomicBool,
    next_probe_ms: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    /// A closed breaker (Redis assumed reachable).
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            down: AtomicBool::new(false),
            next_probe_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether the breaker currently considers Redis reachable.
    pub fn is_up(&self) -> bool {
        !self.down.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether this call may use Redis; every allowed call must end in `success` or `failure`.
    pub fn allow(&self) -> bool {
        if !self.down.load(Ordering::Acquire) {
            return true;
        }
        self.now_ms() >= self.next_probe_ms.load(Ordering::Acquire)
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Returns true when this call brought the store back.
    pub fn success(&self) -> bool {
        self.probing.store(false, Ordering::Release);
        self.down.swap(false, Ordering::AcqRel)
    }

    /// Returns true when this call took the store down.
    pub fn failure(&self) -> bool {
        let next = self
            .now_ms()
            .saturating_add(u64::try_from(RETRY_EVERY.as_millis()).unwrap_or(u64::MAX));
        self.next_probe_ms.store(next, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        !self.down.swap(true, Ordering::AcqRel)
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Self::new()
    }
}
