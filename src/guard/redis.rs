//! Session counters in Redis, shared by every replica (`[store] kind = "redis"`).
//!
//! One hash per session, `{P:session:LEN:SCOPE:ID}` (LEN = byte length of SCOPE, so scope and id
//! never run together), with fields `turns`, `tokens`, `spend` (nano-dollars) and `first` (unix ms
//! of the first request, by the Redis server's clock). Each call is one Lua script, so admission
//! (evaluate the ceilings, then count the turn) is atomic across replicas, with exactly the
//! [`MemoryStore`] semantics (see the `guard` module docs): `max_turns = 3` admits three requests
//! and refuses the fourth, and refused requests are not counted. Every call renews the idle TTL
//! (`PEXPIRE idle_ttl`); an expired session starts over.
//!
//! The wall clock runs on the server's clock, so replicas with skewed clocks agree; the
//! `first_seen_ms` returned is translated to the caller's clock (`now_ms - age`).
//!
//! While Redis is unreachable: `fail_open` serves sessions from a local [`MemoryStore`] (each
//! replica then counts on its own); `fail_closed` refuses admissions
//! ([`SessionRefusal::Unavailable`], 503 `store_unavailable`) and drops recorded usage.

use std::sync::Arc;
use std::time::Duration;

use ::redis::Script;
use async_trait::async_trait;

use super::session::{
    CeilingHit, CeilingKind, Limits, MemoryStore, SessionKey, SessionRefusal, SessionStore,
    SessionUsage,
};
use crate::store::SharedRedis;

/// Sessions in Redis, with a local fallback for `fail_open`.
pub struct RedisSessionStore {
    redis: Arc<SharedRedis>,
    fail_open: bool,
    /// Counters while Redis is unreachable (`fail_open` only).
    fallback: MemoryStore,
    /// Sessions this replica served within their idle TTL, for the `sessions_active` gauge
    /// (counting the fleet's sessions would need a scan).
    seen: MemoryStore,
    admit: Script,
    record: Script,
    usage: Script,
}

impl std::fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("redis", &self.redis)
            .field("fail_open", &self.fail_open)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn u(x: i64) -> u64 {
    u64::try_from(x).unwrap_or(0)
}

impl RedisSessionStore {
    /// Sessions in `redis`; `fail_open` chooses the local fallback over refusing.
    pub fn new(redis: Arc<SharedRedis>, fail_open: bool) -> Self {
        Self {
            redis,
            fail_open,
            fallback: MemoryStore::default(),
            seen: MemoryStore::default(),
            admit: Script::new(&format!("{CLOCK}{ADMIT}")),
            record: Script::new(&format!("{CLOCK}{RECORD}")),
            usage: Script::new(&format!("{CLOCK}{USAGE}")),
        }
    }

    /// The Redis key of a session.
    pub fn redis_key(&self, key: &SessionKey) -> String {
        format!(
            "{{{}:session:{}:{}:{}}}",
            self.redis.key_prefix(),
            key.scope.len(),
            key.scope,
            key.id
        )
    }

    async fn admit_redis(
        &self,
        key: &SessionKey,
        limits: &Limits,
        idle_ttl: Duration,
    ) -> Result<Vec<i64>, ::redis::RedisError> {
        let mut inv = self.admit.prepare_invoke();
        inv.key(self.redis_key(key));
        for l in [
            limits.max_turns,
            limits.max_tokens,
            limits.max_spend_nanos,
            limits.max_wall_clock_ms,
        ] {
            inv.arg(l.map(|v| v.to_string()).unwrap_or_default());
        }
        inv.arg(ms(idle_ttl));
        self.redis
            .call(|mut con| {
                let inv = &inv;
                async move { inv.invoke_async(&mut con).await }
            })
            .await
    }
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    async fn admit(
        &self,
        key: &SessionKey,
        limits: &Limits,
        now_ms: u64,
        idle_ttl: Duration,
    ) -> Result<SessionUsage, CeilingHit> {
        match self.try_admit(key, limits, now_ms, idle_ttl).await {
            Ok(u) => Ok(u),
            Err(SessionRefusal::Ceiling(hit)) => Err(hit),
            // This signature cannot refuse for an outage: answer from the local store.
            Err(SessionRefusal::Unavailable) => {
                self.fallback.admit(key, limits, now_ms, idle_ttl).await
            }
        }
    }

    async fn try_admit(
        &self,
        key: &SessionKey,
        limits: &Limits,
        now_ms: u64,
        idle_ttl: Duration,
    ) -> Result<SessionUsage, SessionRefusal> {
        self.seen.record(key, 0, 0, now_ms, idle_ttl).await;
        let v = match self.admit_redis(key, limits, idle_ttl).await {
            Ok(v) if v.len() == 7 => v,
            Ok(v) => {
                tracing::warn!(len = v.len(), "unexpected session admit script answer");
                return self.unavailable_admit(key, limits, now_ms, idle_ttl).await;
            }
            Err(_) => return self.unavailable_admit(key, limits, now_ms, idle_ttl).await,
        };
        // ok, ceiling (1 turns, 2 tokens, 3 spend, 4 wall clock), used, turns, tokens, spend, age.
        let usage = SessionUsage {
            turns: u(v[3]),
            tokens: u(v[4]),
            spend_nanos: u(v[5]),
            first_seen_ms: now_ms.saturating_sub(u(v[6])),
        };
        if v[0] == 1 {
            return Ok(usage);
        }
        let (kind, limit) = match v[1] {
            1 => (CeilingKind::Turns, limits.max_turns),
            2 => (CeilingKind::Tokens, limits.max_tokens),
            3 => (CeilingKind::Spend, limits.max_spend_nanos),
            _ => (CeilingKind::WallClock, limits.max_wall_clock_ms),
        };
        Err(SessionRefusal::Ceiling(CeilingHit {
            kind,
            limit: limit.unwrap_or(0),
            used: u(v[2]),
        }))
    }

    async fn record(
        &self,
        key: &SessionKey,
        tokens: u64,
        spend_nanos: u64,
        now_ms: u64,
        idle_ttl: Duration,
    ) {
        let clamp = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        let mut inv = self.record.prepare_invoke();
        inv.key(self.redis_key(key))
            .arg(clamp(tokens))
            .arg(clamp(spend_nanos))
            .arg(ms(idle_ttl));
        let res: Result<i64, _> = self
            .redis
            .call(|mut con| {
                let inv = &inv;
                async move { inv.invoke_async(&mut con).await }
            })
            .await;
        if res.is_err() {
            if self.fail_open {
                self.redis.unavailable("session", "local");
                self.fallback
                    .record(key, tokens, spend_nanos, now_ms, idle_ttl)
                    .await;
            } else {
                self.redis.unavailable("session", "skipped");
                tracing::debug!(scope = %key.scope, "session usage not recorded: redis unavailable");
            }
        }
    }

    async fn usage(&self, key: &SessionKey) -> Option<SessionUsage> {
        let mut inv = self.usage.prepare_invoke();
        inv.key(self.redis_key(key));
        let res: Result<Vec<i64>, _> = self
            .redis
            .call(|mut con| {
                let inv = &inv;
                async move { inv.invoke_async(&mut con).await }
            })
            .await;
        match res {
            Ok(v) if v.len() == 4 => {
                let now_ms = u64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0),
                )
                .unwrap_or(u64::MAX);
                Some(SessionUsage {
                    turns: u(v[0]),
                    tokens: u(v[1]),
                    spend_nanos: u(v[2]),
                    first_seen_ms: now_ms.saturating_sub(u(v[3])),
                })
            }
            Ok(_) => None,
            Err(_) if self.fail_open => self.fallback.usage(key).await,
            Err(_) => None,
        }
    }

    fn active_count(&self) -> u64 {
        self.seen.active_count()
    }

    fn run_pending_tasks(&self) {
        self.seen.run_pending_tasks();
        self.fallback.run_pending_tasks();
    }
}

impl RedisSessionStore {
    async fn unavailable_admit(
        &self,
        key: &SessionKey,
        limits: &Limits,
        now_ms: u64,
        idle_ttl: Duration,
    ) -> Result<SessionUsage, SessionRefusal> {
        if self.fail_open {
            self.redis.unavailable("session", "local");
            Ok(self.fallback.admit(key, limits, now_ms, idle_ttl).await?)
        } else {
            self.redis.unavailable("session", "refused");
            Err(SessionRefusal::Unavailable)
        }
    }
}

const CLOCK: &str = include_str!("redis/clock.lua");
const ADMIT: &str = include_str!("redis/admit.lua");
const RECORD: &str = include_str!("redis/record.lua");
const USAGE: &str = include_str!("redis/usage.lua");
