//! Guards for agent traffic: per-session ceilings (turns, tokens, spend, wall clock) and
//! loop-divergence detection.
//!
//! Ceiling semantics ("reached" means refused): before dispatch, [`Guard::check`] refuses a request
//! when a ceiling is already reached, i.e. `used >= limit`, otherwise it counts one turn atomically.
//! - `max_turns = 3`: requests 1..=3 are admitted, the 4th is refused with `turns=3/3`.
//! - `max_tokens` / `max_spend_usd`: settled usage is added by [`Guard::record`] after the response;
//!   requests are admitted while the recorded total is below the limit, so the request that crosses
//!   it completes and the next one is refused (usage is unknown before the response).
//! - `max_wall_clock`: refused once `now - first_seen >= max_wall_clock`, where `first_seen` is the
//!   first admitted request of the session.
//! - `warn_at = w`: an admitted request carries a warning for every ceiling with `used >= w * limit`,
//!   where turns include the request being admitted (`max_turns = 10, warn_at = 0.8` warns from the
//!   8th request: `turns=8/10`), tokens/spend are the settled totals and wall clock is the current age.
//! - A session untouched for `idle_ttl` is forgotten: its counters start over.
//! - Requests without a session id are never counted or refused.

pub mod config;
pub mod loops;
mod redis;
pub mod session;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub use config::{GuardConfig, LoopAction, LoopConfig, UsdNanos};
pub use loops::{detect_loop, LoopFinding, LoopKind};
pub use redis::RedisSessionStore;
pub use session::{
    CeilingHit, CeilingKind, CeilingUsage, Limits, MemoryStore, SessionKey, SessionRefusal,
    SessionStore, SessionUsage,
};

/// Suggested response header for [`Warning::header_value`].
pub const WARNING_HEADER: &str = "x-triage-session-warning";
/// Suggested response header for [`LoopFinding::header_value`].
pub const LOOP_HEADER: &str = "x-triage-loop";
/// Session ids longer than this (or not printable ASCII) are replaced by a hash.
pub const MAX_SESSION_ID_LEN: usize = 128;

/// Ceilings at or past `warn_at` for an admitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// One entry per ceiling at or past the warning threshold, in order turns, tokens, spend, wall clock.
    pub items: Vec<CeilingUsage>,
}

impl Warning {
    /// `turns=8/10` or `turns=8/10, spend=0.90/1.00` (printable ASCII).
    pub fn header_value(&self) -> String {
        self.items
            .iter()
            .map(CeilingUsage::header_value)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A compiled [`GuardConfig`] bound to a session store.
pub struct Guard {
    cfg: GuardConfig,
    limits: Limits,
    /// `warn_at` in parts per million, so comparisons are integer.
    warn_ppm: Option<u64>,
    store: Arc<dyn SessionStore>,
}

impl Guard {
    /// Compiles `cfg` (assumed validated). Share one `store` across guards and config reloads so
    /// sessions survive a reload; keys are isolated by [`SessionKey::scope`].
    pub fn new(cfg: GuardConfig, store: Arc<dyn SessionStore>) -> Self {
        let limits = Limits {
            max_turns: cfg.max_turns,
            max_tokens: cfg.max_tokens,
            max_spend_nanos: cfg.max_spend_usd.map(|u| u.0),
            max_wall_clock_ms: cfg
                .max_wall_clock
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        // A ratio, not money: one float conversion at load time is fine. `as` saturates NaN to 0.
        let warn_ppm = cfg
            .warn_at
            .map(|w| (w.clamp(0.0, 1.0) * 1_000_000.0).round() as u64);
        Self {
            cfg,
            limits,
            warn_ppm,
            store,
        }
    }

    /// The configuration this guard was built from.
    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    /// The compiled ceilings.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The backing store (e.g. for `active_count`).
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// Session key from the `session_header` value (caller looks it up), else the body's `user`
    /// field when `session_from_user`. Blank ids give `None`; long or non-ASCII ids are hashed.
    pub fn session_key(
        &self,
        scope: &str,
        header_value: Option<&str>,
        body: Option<&Value>,
    ) -> Option<SessionKey> {
        let from_header = header_value.map(str::trim).filter(|s| !s.is_empty());
        let id = from_header.or_else(|| {
            if !self.cfg.session_from_user {
                return None;
            }
            body?
                .get("user")?
                .as_str()
                .map(str::trim)
                .filter(|s| !s.is_empty())
        })?;
        Some(SessionKey::new(scope, sanitise_id(id)))
    }

    /// Admission before dispatch: refuses when a ceiling is reached, otherwise counts one turn and
    /// returns a warning if any ceiling is at or past `warn_at`. `None` session: always `Ok(None)`.
    pub async fn check(
        &self,
        session: Option<&SessionKey>,
        now: SystemTime,
    ) -> Result<Option<Warning>, CeilingHit> {
        let Some(key) = self.counted(session) else {
            return Ok(None);
        };
        let now_ms = unix_ms(now);
        let usage = self
            .store
            .admit(key, &self.limits, now_ms, self.cfg.idle_ttl)
            .await?;
        Ok(self.warning(&usage, now_ms))
    }

    /// The session to count, when there is one and any ceiling is set.
    fn counted<'a>(&self, session: Option<&'a SessionKey>) -> Option<&'a SessionKey> {
        session.filter(|_| !self.limits.is_unlimited())
    }

    /// [`Guard::check`] for the gateway: also refuses with [`SessionRefusal::Unavailable`] when a
    /// shared session store cannot be reached and its policy is `fail_closed`.
    pub async fn try_check(
        &self,
        session: Option<&SessionKey>,
        now: SystemTime,
    ) -> Result<Option<Warning>, SessionRefusal> {
        let Some(key) = self.counted(session) else {
            return Ok(None);
        };
        let now_ms = unix_ms(now);
        let usage = self
            .store
            .try_admit(key, &self.limits, now_ms, self.cfg.idle_ttl)
            .await?;
        Ok(self.warning(&usage, now_ms))
    }

    /// Adds settled tokens and spend after the request completes (also for failed/streamed ones
    /// that consumed tokens). `None` session: no-op.
    pub async fn record(
        &self,
        session: Option<&SessionKey>,
        tokens: u64,
        spend_nanos: u64,
        now: SystemTime,
    ) {
        let Some(key) = self.counted(session) else {
            return;
        };
        self.store
            .record(key, tokens, spend_nanos, unix_ms(now), self.cfg.idle_ttl)
            .await;
    }

    /// Loop finding for this request body, if loop detection is configured.
    pub fn detect_loop(&self, body: &Value) -> Option<LoopFinding> {
        detect_loop(body, self.cfg.loop_detect.as_ref()?)
    }

    fn warning(&self, u: &SessionUsage, now_ms: u64) -> Option<Warning> {
        let ppm = u128::from(self.warn_ppm?);
        let l = &self.limits;
        let candidates = [
            (CeilingKind::Turns, l.max_turns, u.turns),
            (CeilingKind::Tokens, l.max_tokens, u.tokens),
            (CeilingKind::Spend, l.max_spend_nanos, u.spend_nanos),
            (
                CeilingKind::WallClock,
                l.max_wall_clock_ms,
                now_ms.saturating_sub(u.first_seen_ms),
            ),
        ];
        let items: Vec<CeilingUsage> =
            candidates
                .into_iter()
                .filter_map(|(kind, limit, used)| {
                    let limit = limit?;
                    // used >= warn_at * limit, in integers.
                    (u128::from(used) * 1_000_000 >= u128::from(limit) * ppm)
                        .then_some(CeilingUsage { kind, limit, used })
                })
                .collect();
        (!items.is_empty()).then_some(Warning { items })
    }
}

fn sanitise_id(id: &str) -> String {
    if id.len() <= MAX_SESSION_ID_LEN && id.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        id.to_string()
    } else {
        // Bounded key size and safe for a future Redis key; collisions are confined to one scope.
        let hash = blake3::hash(id.as_bytes());
        format!("h:{}", &hash.to_hex()[..32])
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
