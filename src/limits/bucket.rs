//! Tokens-per-minute bucket with integer refill; supports refunds and extra charges at settlement.

use std::time::Duration;

/// Fixed-point scale: one token = 60e9 units, so a bucket refills exactly `tpm` units per nanosecond.
const SCALE: i128 = 60_000_000_000;

/// A token bucket holding at most one minute of tokens; it may go into debt when usage exceeds
/// the admission estimate, which then delays later requests.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tpm: u64,
    level: i128,
    last_ns: u128,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(tpm: u64, now: Duration) -> Self {
        Self {
            tpm,
            level: i128::from(tpm) * SCALE,
            last_ns: now.as_nanos(),
        }
    }

    fn capacity(&self) -> i128 {
        i128::from(self.tpm) * SCALE
    }

    /// Changes the limit in place, keeping the current fill level (capped to the new capacity).
    pub(crate) fn set_tpm(&mut self, tpm: u64) {
        self.tpm = tpm;
        self.level = self.level.min(self.capacity());
    }

    pub(crate) fn tpm(&self) -> u64 {
        self.tpm
    }

    fn refill(&mut self, now: Duration) {
        let now = now.as_nanos();
        if now <= self.last_ns {
            return;
        }
        // Capping elapsed at one minute keeps the product far from overflow; a minute refills fully.
        let elapsed = (now - self.last_ns).min(60_000_000_000) as i128;
        self.level = (self.level + elapsed * i128::from(self.tpm)).min(self.capacity());
        self.last_ns = now;
    }

    /// Takes `n` tokens if available. A request larger than the whole bucket is admitted when the
    /// bucket is full (leaving it in debt) rather than never. Err holds the wait until it fits.
    pub(crate) fn try_take(&mut self, n: u64, now: Duration) -> Result<(), Duration> {
        self.refill(now);
        let need = i128::from(n.min(self.tpm)) * SCALE;
        if self.level >= need {
            self.level -= i128::from(n) * SCALE;
            Ok(())
        } else {
            let tpm = i128::from(self.tpm.max(1));
            let wait_ns = (need - self.level + tpm - 1) / tpm;
            Err(Duration::from_nanos(
                u64::try_from(wait_ns).unwrap_or(u64::MAX),
            ))
        }
    }

    /// Adjusts a previous charge of `charged` tokens to the `actual` usage (refund or extra).
    pub(crate) fn settle(&mut self, charged: u64, actual: u64, now: Duration) {
        self.refill(now);
        let delta = (i128::from(charged) - i128::from(actual)) * SCALE;
        self.level = (self.level + delta).min(self.capacity());
    }

    /// Whole tokens available now and the time until the bucket is full again.
    pub(crate) fn window(&mut self, now: Duration) -> (u64, Duration) {
        self.refill(now);
        let remaining = u64::try_from((self.level.max(0)) / SCALE).unwrap_or(u64::MAX);
        let tpm = i128::from(self.tpm.max(1));
        let missing = self.capacity() - self.level;
        let reset_ns = (missing + tpm - 1) / tpm;
        let reset = Duration::from_nanos(u64::try_from(reset_ns.max(0)).unwrap_or(u64::MAX));
        (remaining, reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_refill_refund_debt() {
        let t0 = Duration::ZERO;
        let mut b = TokenBucket::new(600, t0); // 10 tokens/s
        assert_eq!(b.try_take(500, t0), Ok(()));
        assert_eq!(b.window(t0), (100, Duration::from_secs(50)));
        // 200 needs 100 more tokens = 10 s.
        assert_eq!(b.try_take(200, t0), Err(Duration::from_secs(10)));
        assert_eq!(b.try_take(200, Duration::from_secs(10)), Ok(()));
        // Refund of an over-estimate.
        b.settle(200, 50, Duration::from_secs(10));
        assert_eq!(b.window(Duration::from_secs(10)).0, 150);
        // Usage above the estimate drives the bucket into debt.
        b.settle(0, 300, Duration::from_secs(10));
        assert_eq!(b.window(Duration::from_secs(10)).0, 0);
        assert!(b.try_take(1, Duration::from_secs(10)).is_err());
        assert_eq!(
            b.try_take(1, Duration::from_secs(25) + Duration::from_millis(100)),
            Ok(())
        );
        // Oversized requests pass only on a full bucket.
        let mut b = TokenBucket::new(100, t0);
        assert_eq!(b.try_take(1000, t0), Ok(()));
        assert_eq!(
            b.try_take(1000, Duration::from_secs(60)),
            Err(Duration::from_secs(540))
        );
        // Shrinking the limit caps the level.
        let mut b = TokenBucket::new(1000, t0);
        b.set_tpm(10);
        assert_eq!(b.window(t0), (10, Duration::ZERO));
    }
}
