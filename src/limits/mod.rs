//! Per-key and per-team admission control: rpm (GCRA via `governor`), tpm (token bucket settled
//! to real usage), max parallel requests, and spend budgets reserved atomically so concurrent
//! requests can never settle past a budget.
//!
//! A request is admitted only if its key *and* the key's team admit it. [`Admission`] must be
//! settled with the real cost; dropping it unsettled releases its reservation and permit.

mod bucket;
mod clock;
mod headers;
mod memory;
mod money;
mod policy;
mod redis;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::store::{Period, StoreEvent, StoreEvents, SubjectKind};
pub use clock::{Clock, ManualClock};
pub use headers::{format_reset, RateInfo, Window};
pub use memory::Limiter;
pub use money::{
    cost_nanos, nanos_to_usd_string, usd_f64_to_nanos, usd_to_nanos, MoneyError, Price, UsdNanos,
    NANOS_PER_USD,
};
pub use redis::{RedisLimiter, RedisSettings, RedisSetupError};

/// Limits for one key or team; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSpec {
    /// Requests per minute (GCRA, burst = rpm).
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub max_parallel: Option<u32>,
    /// Spend ceiling per period, nano-dollars.
    pub budget_nanos: Option<u64>,
    /// Budget period.
    #[serde(default)]
    pub period: Period,
}

/// A key's limits and team membership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpec {
    /// Team whose limits also apply (a team without its own spec is tracked but unlimited).
    pub team: Option<String>,
    /// The key's own limits.
    pub limits: LimitSpec,
}

/// The whole limit configuration, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitSpecs {
    /// Keys by name.
    pub keys: HashMap<String, KeySpec>,
    /// Teams by name.
    pub teams: HashMap<String, LimitSpec>,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefusalKind {
    /// Requests per minute.
    Rpm,
    /// Tokens per minute.
    Tpm,
    /// Concurrent requests.
    Parallel,
    /// Spend budget for the period.
    Budget,
}

/// Why a request was refused, with the numbers for the error body and headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// Which limit.
    pub kind: RefusalKind,
    /// Key or team.
    pub subject_kind: SubjectKind,
    /// Key or team name.
    pub subject: String,
    /// When a retry can succeed; `None` for budgets (they only reset with the period).
    pub retry_after: Option<Duration>,
    /// The limit (rpm, tpm, max parallel, or budget nanos).
    pub limit: u64,
    /// Already used (requests, tokens, in flight, or spent+reserved nanos).
    pub used: u64,
    /// What this request asked for (1, estimated tokens, 1, or reserve nanos).
    pub requested: u64,
    /// Unix second when the budget period ends (budget refusals only).
    pub period_end_unix: Option<i64>,
    /// Rate windows at refusal time.
    pub rate: RateInfo,
}

impl Refusal {
    /// `x-ratelimit-*` headers plus `retry-after` (whole seconds, rounded up) when retrying helps.
    pub fn rate_headers(&self) -> Vec<(&'static str, String)> {
        let mut h = self.rate.headers();
        if let Some(secs) = self.retry_after_secs() {
            h.push(("retry-after", secs.to_string()));
        }
        h
    }

    /// `retry_after` in whole seconds, rounded up (at least 1).
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_nanos().div_ceil(1_000_000_000).max(1))
            .map(|s| u64::try_from(s).unwrap_or(u64::MAX))
    }

    /// Human-readable message for an OpenAI-style error body.
    pub fn message(&self) -> String {
        let who = format!("{} '{}'", self.subject_kind, self.subject);
        let retry = self
            .retry_after
            .map(|d| format!(" Please try again in {}.", format_reset(d)))
            .unwrap_or_default();
        match self.kind {
            RefusalKind::Rpm => format!(
                "Rate limit reached for {who} on requests per minute: Limit {}, Used {}, Requested {}.{retry}",
                self.limit, self.used, self.requested
            ),
            RefusalKind::Tpm => format!(
                "Rate limit reached for {who} on tokens per minute: Limit {}, Used {}, Requested {}.{retry}",
                self.limit, self.used, self.requested
            ),
            RefusalKind::Parallel => format!(
                "Too many concurrent requests for {who}: Limit {}, In flight {}.{retry}",
                self.limit, self.used
            ),
            RefusalKind::Budget => format!(
                "Budget exceeded for {who}: budget ${}, spent or reserved ${}, this request may cost up to ${}.",
                nanos_to_usd_string(self.limit),
                nanos_to_usd_string(self.used),
                nanos_to_usd_string(self.requested)
            ),
        }
    }
}

/// Admission failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// The key has no limit entry (the caller should have rejected it at authentication).
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// A limit refused the request.
    #[error("{}", .0.message())]
    Refused(Box<Refusal>),
    /// The shared limit store cannot be reached and the policy is to refuse (`fail_closed`).
    #[error("{0}")]
    Unavailable(String),
}

/// Invalid limit configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitConfigError {
    /// A rate limit of zero (remove the key, or set a zero budget, to block it).
    #[error("{kind} '{name}': {field} must be at least 1")]
    Zero {
        /// Key or team.
        kind: SubjectKind,
        /// Its name.
        name: String,
        /// Offending field.
        field: &'static str,
    },
}

/// What the caller knows when a request arrives.
#[derive(Debug, Clone, Copy)]
pub struct AdmitRequest<'a> {
    /// Authenticated key name.
    pub key: &'a str,
    /// Token estimate charged to tpm now (prompt estimate, optionally plus max output).
    pub est_tokens: u64,
    /// Worst-case cost to reserve against the budget, nano-dollars.
    pub reserve_nanos: u64,
}

/// Real usage of a finished request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settlement<'a> {
    /// Model that served it.
    pub model: &'a str,
    /// Gateway request id.
    pub request_id: &'a str,
    /// Prompt tokens (including cached).
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Actual cost, nano-dollars (charged even if above the reservation).
    pub cost_nanos: u64,
    /// Usage was estimated (provider reported none).
    pub estimated: bool,
}

/// Result of settling an admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SettleOutcome {
    /// Nano-dollars charged.
    pub charged_nanos: u64,
    /// Nano-dollars that had been reserved.
    pub reserved_nanos: u64,
    /// Charge above the reservation (logged; the provider's bill is authoritative).
    pub overrun_nanos: u64,
}

/// A store's half of an admission ([`LimitStore`]). `settle` and `release` must not block or do
/// I/O: they run in `Drop` and in stream callbacks.
pub trait AdmissionTicket: Send + Sync {
    /// Replaces the reservation with the actual usage; called at most once.
    fn settle(&mut self, s: &Settlement<'_>) -> SettleOutcome;
    /// Releases the reservation and permit without charging spend; called at most once.
    fn release(&mut self);
}

/// An admitted request. Settle it when done; dropping it releases everything and charges nothing.
pub struct Admission {
    ticket: Box<dyn AdmissionTicket>,
    rate: RateInfo,
    done: bool,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("rate", &self.rate)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Wraps a backend ticket with the rate numbers observed at admission.
    pub fn new(ticket: Box<dyn AdmissionTicket>, rate: RateInfo) -> Self {
        Self {
            ticket,
            rate,
            done: false,
        }
    }

    /// Rate windows observed at admission.
    pub fn rate(&self) -> &RateInfo {
        &self.rate
    }

    /// `x-ratelimit-*` headers for the response.
    pub fn rate_headers(&self) -> Vec<(&'static str, String)> {
        self.rate.headers()
    }

    /// Charges the real cost and tokens, releases the permit and writes the ledger record.
    pub fn settle(mut self, s: &Settlement<'_>) -> SettleOutcome {
        self.done = true;
        self.ticket.settle(s)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.done {
            self.ticket.release();
        }
    }
}

/// A subject's limits and current usage, for `GET /v1/triage/keys/self`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubjectStatus {
    /// Key or team.
    pub kind: SubjectKind,
    /// Name.
    pub name: String,
    /// Configured limits.
    pub limits: LimitSpec,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Settled spend this period, nano-dollars.
    pub spent_nanos: u64,
    /// Reserved by requests in flight, nano-dollars.
    pub reserved_nanos: u64,
    /// Budget left after spend and reservations; `None` without a budget.
    pub remaining_nanos: Option<u64>,
    /// `spent_nanos` in dollars.
    pub spent_usd: String,
    /// `remaining_nanos` in dollars.
    pub remaining_usd: Option<String>,
    /// Unix second the period started (`None` for `total`).
    pub period_start_unix: Option<i64>,
    /// Unix second the period ends (`None` for `total`).
    pub period_end_unix: Option<i64>,
    /// Token window now, if tpm is limited.
    pub tokens: Option<Window>,
}

/// Status of a key and its team.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyStatus {
    /// The key.
    pub key: SubjectStatus,
    /// Its team, if any.
    pub team: Option<SubjectStatus>,
}

/// Where admission state lives: in memory ([`Limiter`], one replica) or in Redis
/// ([`RedisLimiter`], shared by every replica). The policy (key table, refusals, status, settle
/// outcome, spend records) is shared by both, in `policy.rs`.
///
/// Settlement is [`Admission::settle`]: synchronous and free of I/O for every store (a Redis
/// settlement is handed to a background task), so it may run in `Drop` and stream callbacks.
pub trait LimitStore: Send + Sync {
    /// Admits a request against the key and its team, or says which limit refused it.
    fn admit(
        &self,
        req: &AdmitRequest<'_>,
    ) -> impl Future<Output = Result<Admission, AdmitError>> + Send;
    /// Limits and usage for a key and its team.
    fn status(&self, key: &str) -> impl Future<Output = Option<KeyStatus>> + Send;
    /// Applies new limits, keeping the state of subjects that still exist.
    fn reconfigure(&self, specs: &LimitSpecs) -> Result<(), LimitConfigError>;
}

/// The store chosen at startup by `[store]`. An enum rather than `dyn LimitStore` so that the
/// in-memory admission is a direct call: no boxed future, no await point that yields.
#[derive(Debug, Clone)]
pub enum LimitBackend {
    /// One replica, in memory.
    Memory(Limiter),
    /// Shared through Redis.
    Redis(RedisLimiter),
}

impl LimitBackend {
    /// Hands every queued Redis settlement to Redis, waiting at most `within` (clean shutdown).
    /// Returns how many are still unsettled.
    pub async fn flush(&self, within: Duration) -> usize {
        match self {
            LimitBackend::Memory(_) => 0,
            LimitBackend::Redis(r) => r.flush(within).await,
        }
    }
}

impl LimitStore for LimitBackend {
    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, AdmitError> {
        match self {
            LimitBackend::Memory(l) => l.admit(req),
            // Boxed so the Redis future does not enlarge every request's future.
            LimitBackend::Redis(r) => Box::pin(r.admit(req)).await,
        }
    }

    async fn status(&self, key: &str) -> Option<KeyStatus> {
        match self {
            LimitBackend::Memory(l) => l.status(key),
            LimitBackend::Redis(r) => Box::pin(r.status(key)).await,
        }
    }

    fn reconfigure(&self, specs: &LimitSpecs) -> Result<(), LimitConfigError> {
        match self {
            LimitBackend::Memory(l) => l.reconfigure(specs),
            LimitBackend::Redis(r) => r.reconfigure(specs),
        }
    }
}

#[cfg(test)]
mod tests;
