//! Time sources: monotonic time for rate windows, wall-clock unix time for budget periods.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The limiter's clock; `Manual` lets tests (and simulations) move time without sleeping.
#[derive(Debug, Clone)]
pub enum Clock {
    /// Real time.
    System(Instant),
    /// Time that only moves when told to.
    Manual(ManualClock),
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Clock::System(Instant::now())
    }

    /// Monotonic time since this clock was created.
    #[inline]
    pub fn mono(&self) -> Duration {
        match self {
            Clock::System(start) => start.elapsed(),
            Clock::Manual(m) => Duration::from_nanos(m.mono_ns.load(Ordering::Acquire)),
        }
    }

    /// Wall-clock milliseconds since the unix epoch.
    #[inline]
    pub fn unix_ms(&self) -> i64 {
        match self {
            Clock::System(_) => match SystemTime::now().duration_since(UNIX_EPOCH) {
                Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
                Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
            },
            Clock::Manual(m) => m.unix_ms.load(Ordering::Acquire),
        }
    }

    /// Wall-clock seconds since the unix epoch.
    #[inline]
    pub fn unix_secs(&self) -> i64 {
        self.unix_ms().div_euclid(1000)
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Duration;

    #[inline]
    fn now(&self) -> Duration {
        self.mono()
    }
}

/// A shared, manually advanced clock; clones see the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    mono_ns: Arc<AtomicU64>,
    unix_ms: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock whose wall time starts at `unix_ms`.
    pub fn new(unix_ms: i64) -> Self {
        let c = Self::default();
        c.unix_ms.store(unix_ms, Ordering::Release);
        c
    }

    /// Moves monotonic and wall time forward together.
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.mono_ns.fetch_add(ns, Ordering::AcqRel);
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.unix_ms.fetch_add(ms, Ordering::AcqRel);
    }

    /// Jumps wall time only (e.g. across a period boundary).
    pub fn set_unix_ms(&self, unix_ms: i64) {
        self.unix_ms.store(unix_ms, Ordering::Release);
    }

    /// A `Clock` reading this manual clock.
    pub fn clock(&self) -> Clock {
        Clock::Manual(self.clone())
    }
}
