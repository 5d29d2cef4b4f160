//! The async Redis client behind the shared limits (`limits::RedisLimiter`), the shared session
//! store (`guard::RedisSessionStore`) and the shared response-cache tier (`cache::SharedTier`),
//! for `[store] kind = "redis"`.
//!
//! One multiplexed connection, opened lazily and reopened after any failure; every call is
//! bounded by the store's `timeout`. A [`Breaker`] skips Redis for [`RETRY_EVERY`] after a
//! failure, then lets one call probe it, so requests never queue on a dead or stalled server.
//! What to do instead (local fallback, refusal, skipping) is the caller's policy.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError};

#[cfg(doc)]
use super::breaker::RETRY_EVERY;
use super::breaker::{Breaker, StoreEvent, StoreEvents};

/// A shared async Redis connection with a timeout and a breaker; cheap to share (`Arc`).
pub struct SharedRedis {
    client: Client,
    url: String,
    key_prefix: String,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Failed connection attempts; callers that queued behind a failing attempt give up too.
    connect_failures: AtomicU64,
    breaker: Breaker,
    events: Option<StoreEvents>,
}

impl std::fmt::Debug for SharedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRedis")
            .field("url", &self.url)
            .field("prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

impl SharedRedis {
    /// A client for `url`; nothing is connected yet (Redis may come up after the gateway).
    /// `events` receives `Up` on breaker transitions and the `Unavailable` events emitted through
    /// [`SharedRedis::unavailable`].
    pub fn new(
        url: &str,
        key_prefix: &str,
        timeout: Duration,
        events: Option<StoreEvents>,
    ) -> Result<Arc<Self>, RedisError> {
        Ok(Arc::new(Self {
            client: Client::open(url)?,
            url: url.to_owned(),
            key_prefix: key_prefix.to_owned(),
            timeout,
            conn: tokio::sync::Mutex::new(None),
            connect_failures: AtomicU64::new(0),
            breaker: Breaker::new(),
            events,
        }))
    }

    /// Prefix of every key (`triage`).
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// Whether the last call reached Redis.
    pub fn is_up(&self) -> bool {
        self.breaker.is_up()
    }

    /// Reports a call that did not reach Redis (`op`: session|cache; `outcome`: what happened
    /// instead) to the metrics.
    pub fn unavailable(&self, op: &'static str, outcome: &'static str) {
        self.emit(StoreEvent::Unavailable { op, outcome });
    }

    fn emit(&self, e: StoreEvent) {
        if let Some(f) = &self.events {
            f(e);
        }
    }

    /// Connect/response timeout of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The shared connection, and whether it was opened by this call.
    async fn connection(&self) -> Result<(MultiplexedConnection, bool), RedisError> {
        let failures = self.connect_failures.load(Ordering::Acquire);
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok((c.clone(), false));
        }
        // Whoever held the lock just failed to connect: don't queue up one timeout each.
        if self.connect_failures.load(Ordering::Acquire) != failures {
            return Err(RedisError::from((
                ErrorKind::IoError,
                "redis connection failed just now",
            )));
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        match self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
        {
            Ok(c) => {
                *slot = Some(c.clone());
                Ok((c, true))
            }
            Err(e) => {
                self.connect_failures.fetch_add(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// One try of `f`; the flag says whether it failed on a cached connection the server had
    /// closed (e.g. after a restart: the command never ran, a fresh connection may succeed).
    async fn attempt<T, Fut>(
        &self,
        f: &impl Fn(MultiplexedConnection) -> Fut,
    ) -> Result<T, (RedisError, bool)>
    where
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let (con, fresh) = self.connection().await.map_err(|e| (e, false))?;
        match tokio::time::timeout(self.timeout * 2, f(con)).await {
            Ok(r) => r.map_err(|e| {
                let stale = !fresh && e.is_unrecoverable_error();
                (e, stale)
            }),
            Err(_) => Err((
                RedisError::from((ErrorKind::IoError, "redis call timed out")),
                false,
            )),
        }
    }

    /// Runs `f` on the connection, within twice the timeout (a script call may need `EVALSHA`
    /// and `EVAL` after a Redis restart). Fails at once while the breaker is open. A cached
    /// connection the server closed (e.g. after a restart; the command never ran) is replaced
    /// and `f` runs once more, so one restart does not open the breaker.
    pub async fn call<T, Fut>(
        &self,
        f: impl Fn(MultiplexedConnection) -> Fut,
    ) -> Result<T, RedisError>
    where
        Fut: Future<Output = Result<T, RedisError>>,
    {
        if !self.breaker.allow() {
            return Err(RedisError::from((
                ErrorKind::IoError,
                "redis skipped after a recent failure",
            )));
        }
        let mut res = self.attempt(&f).await;
        if matches!(res, Err((_, true))) {
            self.conn.lock().await.take();
            res = self.attempt(&f).await;
        }
        let res = res.map_err(|(e, _)| e);
        match &res {
            Ok(_) => {
                if self.breaker.success() {
                    tracing::info!(url = %self.url, "redis store is reachable again");
                    self.emit(StoreEvent::Up(true));
                }
            }
            Err(e) => {
                // A dead connection stays dead (e.g. after a Redis restart): reopen next time.
                self.conn.lock().await.take();
                if self.breaker.failure() {
                    tracing::warn!(url = %self.url, error = %e, "redis store unreachable");
                    self.emit(StoreEvent::Up(false));
                } else {
                    tracing::debug!(error = %e, "redis call failed");
                }
            }
        }
        res
    }
}
