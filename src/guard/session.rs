//! Per-session counters, ceiling evaluation and the session store (in-memory via moka).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::sync::Cache;
use moka::Expiry;
use parking_lot::Mutex;

use super::config::format_usd;

/// Default capacity of [`MemoryStore`]; beyond it moka evicts the least useful sessions.
pub const DEFAULT_MAX_SESSIONS: u64 = 100_000;

/// Identifies a session: `scope` isolates tenants (e.g. key or router name), `id` is client-chosen.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    /// Namespace chosen by the gateway, e.g. `key:alice` or `router:auto`.
    pub scope: String,
    /// Sanitised session id from the header or `user` field.
    pub id: String,
}

impl SessionKey {
    /// Builds a key from its parts as given (no sanitising; see `Guard::session_key`).
    pub fn new(scope: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            id: id.into(),
        }
    }
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionUsage {
    /// Admitted requests (counted at admission).
    pub turns: u64,
    /// Settled tokens (prompt + completion), added by `record`.
    pub tokens: u64,
    /// Settled spend in nano-dollars, added by `record`.
    pub spend_nanos: u64,
    /// Unix milliseconds of the first admitted request.
    pub first_seen_ms: u64,
}

/// Ceilings in store units; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Admitted requests per session.
    pub max_turns: Option<u64>,
    /// Settled tokens per session.
    pub max_tokens: Option<u64>,
    /// Settled nano-dollars per session.
    pub max_spend_nanos: Option<u64>,
    /// Milliseconds since the first admitted request.
    pub max_wall_clock_ms: Option<u64>,
}

/// Which ceiling was hit or is near.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CeilingKind {
    /// Admitted requests; unit: requests.
    Turns,
    /// Settled tokens; unit: tokens.
    Tokens,
    /// Settled spend; unit: nano-dollars.
    Spend,
    /// Session age; unit: milliseconds.
    WallClock,
}

impl CeilingKind {
    /// Stable lowercase name used in headers, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CeilingKind::Turns => "turns",
            CeilingKind::Tokens => "tokens",
            CeilingKind::Spend => "spend",
            CeilingKind::WallClock => "wall_clock",
        }
    }

    /// Renders an amount of this kind: spend in dollars, wall clock in whole seconds.
    pub fn format_amount(self, v: u64) -> String {
        match self {
            CeilingKind::Turns | CeilingKind::Tokens => v.to_string(),
            CeilingKind::Spend => format_usd(v),
            CeilingKind::WallClock => format!("{}s", v / 1000),
        }
    }
}

/// Usage of one ceiling: `used` of `limit`, in the kind's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CeilingUsage {
    /// Which ceiling.
    pub kind: CeilingKind,
    /// Configured ceiling.
    pub limit: u64,
    /// Amount used.
    pub used: u64,
}

impl CeilingUsage {
    /// `turns=8/10`, `spend=0.90/1.00`, `wall_clock=1500s/1800s`.
    pub fn header_value(&self) -> String {
        format!(
            "{}={}/{}",
            self.kind.as_str(),
            self.kind.format_amount(self.used),
            self.kind.format_amount(self.limit)
        )
    }
}

/// A request refused because a session ceiling has been reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct CeilingHit {
    /// Which ceiling.
    pub kind: CeilingKind,
    /// Configured ceiling (kind's unit).
    pub limit: u64,
    /// Usage at refusal (kind's unit); always `>= limit`.
    pub used: u64,
}

impl CeilingHit {
    /// Header-safe summary, e.g. `turns=3/3`.
    pub fn header_value(&self) -> String {
        CeilingUsage {
            kind: self.kind,
            limit: self.limit,
            used: self.used,
        }
        .header_value()
    }
}

impl fmt::Display for CeilingHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "session {} ceiling reached ({})",
            self.kind.as_str(),
            self.header_value()
        )
    }
}

impl Limits {
    /// True when no ceiling is set (the store need not be touched).
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }

    /// Refuses when any ceiling is already reached (`used >= limit`), checked before the turn is counted.
    /// Order: turns, tokens, spend, wall clock.
    pub fn evaluate(&self, u: &SessionUsage, now_ms: u64) -> Result<(), CeilingHit> {
        let elapsed = now_ms.saturating_sub(u.first_seen_ms);
        let checks = [
            (CeilingKind::Turns, self.max_turns, u.turns),
            (CeilingKind::Tokens, self.max_tokens, u.tokens),
            (CeilingKind::Spend, self.max_spend_nanos, u.spend_nanos),
            (CeilingKind::WallClock, self.max_wall_clock_ms, elapsed),
        ];
        for (kind, limit, used) in checks {
            if let Some(limit) = limit {
                if used >= limit {
                    return Err(CeilingHit { kind, limit, used });
                }
            }
        }
        Ok(())
    }
}

/// Why [`SessionStore::try_admit`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionRefusal {
    /// A ceiling is reached.
    #[error(transparent)]
    Ceiling(#[from] CeilingHit),
    /// A shared store could not be reached and its policy is to refuse (`fail_closed`).
    #[error("the shared session store is unavailable")]
    Unavailable,
}

/// Backing store for session counters. The in-memory [`MemoryStore`] serves one replica; the
/// shared [`super::RedisSessionStore`] (Lua scripts around the same rules as [`Limits::evaluate`])
/// serves several. Store failures are the implementation's policy (fail open or closed): only
/// [`SessionStore::try_admit`] can report one.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Atomically: load or create the session (`first_seen = now_ms`), refuse if a ceiling is reached,
    /// otherwise count one turn. Returns usage after the turn. Touching refreshes the idle TTL.
    async fn admit(
        &self,
        key: &SessionKey,
        limits: &Limits,
        now_ms: u64,
        idle_ttl: Duration,
    ) -> Result<SessionUsage, CeilingHit>;

    /// Adds settled tokens and spend (saturating). Creates the session if it expired meanwhile.
    async fn record(
        &self,
        key: &SessionKey,
        tokens: u64,
        spend_nanos: u64,
        now_ms: u64,
        idle_ttl: Duration,
    );

    /// Current counters, if the session is live.
    async fn usage(&self, key: &SessionKey) -> Option<SessionUsage>;

    /// Approximate number of live sessions (for a gauge).
    fn active_count(&self) -> u64;

    /// Like [`SessionStore::admit`], but a shared store that cannot be reached and whose policy
    /// is to refuse answers [`SessionRefusal::Unavailable`] (`admit` itself cannot say so).
    async fn try_admit(
        &self,
        key: &SessionKey,
        limits: &Limits,
        now_ms: u64,
        idle_ttl: Duration,
    ) -> Result<SessionUsage, SessionRefusal> {
        Ok(self.admit(key, limits, now_ms, idle_ttl).await?)
    }

    /// Runs pending housekeeping (expiry) so that `active_count` is current.
    fn run_pending_tasks(&self) {}
}

struct Entry {
    idle_ttl: Duration,
    usage: Mutex<SessionUsage>,
}

/// Per-entry idle expiry, so one store can serve guards with different `idle_ttl`s and survive reloads.
struct IdleExpiry;

impl Expiry<SessionKey, Arc<Entry>> for IdleExpiry {
    fn expire_after_create(
        &self,
        _key: &SessionKey,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.idle_ttl)
    }

    fn expire_after_read(
        &self,
        _key: &SessionKey,
        value: &Arc<Entry>,
        _read_at: Instant,
        _duration_until_expiry: Option<Duration>,
        _last_modified_at: Instant,
    ) -> Option<Duration> {
        Some(value.idle_ttl)
    }

    fn expire_after_update(
        &self,
        _key: &SessionKey,
        value: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.idle_ttl)
    }
}

/// In-process session store (moka, idle expiry per entry, bounded capacity).
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<SessionKey, Arc<Entry>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SESSIONS)
    }
}

impl MemoryStore {
    /// A store holding at most `max_sessions` sessions.
    pub fn new(max_sessions: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(max_sessions)
                .expire_after(IdleExpiry)
                .build(),
        }
    }

    /// Runs moka's pending housekeeping (expiry, eviction) so `active_count` is current.
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    fn entry(&self, key: &SessionKey, now_ms: u64, idle_ttl: Duration) -> Arc<Entry> {
        // get_with initialises once even under concurrent callers, so one session has one Entry.
        self.cache.get_with_by_ref(key, || {
            Arc::new(Entry {
                idle_ttl,
                usage: Mutex::new(SessionUsage {
                    first_seen_ms: now_ms,
                    ..SessionUsage::default()
                }),
            })
        })
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn admit(
        &self,
        key: &SessionKey,
        limits: &Limits,
        now_ms: u64,
        idle_ttl: Duration,
    ) -> Result<SessionUsage, CeilingHit> {
        let entry = self.entry(key, now_ms, idle_ttl);
        let mut u = entry.usage.lock();
        limits.evaluate(&u, now_ms)?;
        u.turns = u.turns.saturating_add(1);
        Ok(*u)
    }

    async fn record(
        &self,
        key: &SessionKey,
        tokens: u64,
        spend_nanos: u64,
        now_ms: u64,
        idle_ttl: Duration,
    ) {
        let entry = self.entry(key, now_ms, idle_ttl);
        let mut u = entry.usage.lock();
        u.tokens = u.tokens.saturating_add(tokens);
        u.spend_nanos = u.spend_nanos.saturating_add(spend_nanos);
    }

    async fn usage(&self, key: &SessionKey) -> Option<SessionUsage> {
        self.cache.get(key).map(|e| *e.usage.lock())
    }

    fn active_count(&self) -> u64 {
        self.cache.entry_count()
    }

    fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn evaluate_is_reached_not_exceeded() {
        let l = Limits {
            max_turns: Some(3),
            ..Limits::default()
        };
        let mut u = SessionUsage::default();
        for turns in 0..3 {
            u.turns = turns;
            assert!(l.evaluate(&u, 0).is_ok());
        }
        u.turns = 3;
        assert_eq!(
            l.evaluate(&u, 0),
            Err(CeilingHit {
                kind: CeilingKind::Turns,
                limit: 3,
                used: 3
            })
        );
    }

    #[test]
    fn evaluate_order_and_clock_skew() {
        let l = Limits {
            max_turns: Some(1),
            max_tokens: Some(1),
            max_spend_nanos: Some(1),
            max_wall_clock_ms: Some(1),
        };
        let u = SessionUsage {
            turns: 1,
            tokens: 1,
            spend_nanos: 1,
            first_seen_ms: 10,
        };
        assert_eq!(
            l.evaluate(&u, 20).map_err(|h| h.kind),
            Err(CeilingKind::Turns)
        );
        // A clock that went backwards must not underflow.
        let l = Limits {
            max_wall_clock_ms: Some(5),
            ..Limits::default()
        };
        assert!(l.evaluate(&u, 0).is_ok());
        assert!(Limits::default().is_unlimited());
        assert!(!l.is_unlimited());
    }

    #[test]
    fn header_values() {
        let h = CeilingHit {
            kind: CeilingKind::Spend,
            limit: 1_000_000_000,
            used: 1_020_000_000,
        };
        assert_eq!(h.header_value(), "spend=1.02/1.00");
        assert_eq!(
            h.to_string(),
            "session spend ceiling reached (spend=1.02/1.00)"
        );
        let w = CeilingUsage {
            kind: CeilingKind::WallClock,
            limit: 1_800_000,
            used: 1_500_999,
        };
        assert_eq!(w.header_value(), "wall_clock=1500s/1800s");
    }
}
