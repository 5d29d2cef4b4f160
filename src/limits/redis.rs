//! Shared [`LimitBackend`] in Redis, so that every gateway replica enforces one set of limits.
//!
//! Each admission, settlement and status read is one atomic Lua script (`EVALSHA`, falling back
//! to `EVAL` after a Redis restart) that reads the Redis server's clock (`TIME`), so replicas with
//! skewed clocks still agree on rate windows and budget periods.
//!
//! Keys, per subject (hash tag = subject, so one subject's keys share a Redis Cluster slot):
//! - `{P:key:NAME}:rpm` — GCRA theoretical arrival time (ms), burst = rpm;
//! - `{P:key:NAME}:tpm` — token bucket `{level, ts}`, refilled by tpm/minute, settled to real use;
//! - `{P:key:NAME}:inflight` — ZSET ticket → expiry (ms): requests in flight (`max_parallel`);
//! - `{P:key:NAME}:res` — HASH ticket → reserved nano-dollars, plus `=sum`;
//! - `{P:key:NAME}:budget` — HASH `{p, spent}`: spend of the period starting at unix second `p`.
//!
//! Teams use `{P:team:NAME}`. A replica that dies with requests in flight leaves tickets behind;
//! they expire after `reservation_ttl`, returning their parallel slot and reservation.
//!
//! Key and team are admitted in **one** script call (atomic across both) on a standalone Redis.
//! On Redis Cluster the two hash tags live in different slots and cannot share a script, so
//! [`RedisSettings::per_subject_calls`] admits the key, then the team, and releases the key's
//! ticket (refunding its tokens) when the team refuses; between those two calls another request
//! may briefly see the key's reservation. The connection itself is a single-node client.
//!
//! `admit` is synchronous (the [`LimitBackend`] trait is), so calls use blocking connections from
//! a small pool with short timeouts: a localhost round trip is tens of microseconds. While Redis
//! fails, a breaker skips it (one probe per [`RETRY_EVERY`]) so no worker waits on a dead server:
//! admissions are refused (`fail_closed`) or admitted by a local [`Limiter`] with the same specs
//! (`fail_open`). Settlements that cannot reach Redis are queued and replayed, in order, before
//! the next admission that does; spend of locally admitted requests is replayed the same way.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::{Client, Connection, RedisError, Script};
use parking_lot::{Mutex, RwLock};

use super::{
    nanos_to_usd_string, Admission, AdmissionTicket, AdmitError, AdmitRequest, Clock, KeyStatus,
    LimitBackend, LimitConfigError, LimitSpec, LimitSpecs, Limiter, Period, RateInfo, Refusal,
    RefusalKind, SettleOutcome, Settlement, SubjectKind, SubjectStatus, Window,
};
use crate::store::{SpendLedger, SpendRecord, StoreError};

/// How long the breaker skips Redis after a failure before one call probes it again.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);
/// Idle connections kept for reuse.
const POOL_MAX: usize = 32;
/// Settlements kept for replay while Redis is unreachable; beyond this the oldest are dropped
/// (their spend stays in the SQLite ledger).
const MAX_PENDING: usize = 100_000;
/// Queued settlements replayed per call, so one admission never carries a long backlog.
const REPLAY_BATCH: usize = 256;

/// Shared-store events for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEvent {
    /// A call failed: `op` is admit|settle|status, `outcome` what happened instead
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

/// How to reach Redis and what to do without it.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key (`triage`).
    pub key_prefix: String,
    /// Unsettled tickets (reservations, parallel slots) expire after this long.
    pub reservation_ttl: Duration,
    /// Connect, read and write timeout of one call.
    pub timeout: Duration,
    /// Admit locally while Redis is unreachable instead of refusing.
    pub fail_open: bool,
    /// One script call per subject (Redis Cluster key layout) instead of key+team at once.
    pub per_subject_calls: bool,
}

/// Redis could not be set up (a bad URL; an unreachable server is not an error).
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The URL did not parse.
    #[error("store.url: {0}")]
    Url(RedisError),
    /// Invalid limits.
    #[error(transparent)]
    Limits(#[from] LimitConfigError),
}

/// One key or team: its limits and its Redis key names.
#[derive(Debug)]
struct RSubject {
    kind: SubjectKind,
    name: Arc<str>,
    spec: LimitSpec,
    /// rpm, tpm, inflight, res, budget.
    keys: [String; 5],
}

impl RSubject {
    fn new(prefix: &str, kind: SubjectKind, name: &str, spec: &LimitSpec) -> Self {
        let tag = format!("{{{prefix}:{kind}:{name}}}");
        Self {
            kind,
            name: Arc::from(name),
            spec: spec.clone(),
            keys: ["rpm", "tpm", "inflight", "res", "budget"].map(|k| format!("{tag}:{k}")),
        }
    }

    fn tpm(&self) -> u64 {
        self.spec.tpm.unwrap_or(0)
    }

    fn period_code(&self) -> u8 {
        match self.spec.period {
            Period::Total => 0,
            Period::Daily => 1,
            Period::Weekly => 2,
            Period::Monthly => 3,
        }
    }
}

struct KeyEntry {
    key: Arc<RSubject>,
    team: Option<Arc<RSubject>>,
}

impl KeyEntry {
    fn subjects(&self) -> Vec<Arc<RSubject>> {
        std::iter::once(self.key.clone())
            .chain(self.team.clone())
            .collect()
    }
}

fn build_table(prefix: &str, specs: &LimitSpecs) -> HashMap<String, KeyEntry> {
    let unlimited = LimitSpec::default();
    let mut teams: HashMap<&str, Arc<RSubject>> = HashMap::new();
    for ks in specs.keys.values() {
        if let Some(t) = ks.team.as_deref() {
            teams.entry(t).or_insert_with(|| {
                let spec = specs.teams.get(t).unwrap_or(&unlimited);
                Arc::new(RSubject::new(prefix, SubjectKind::Team, t, spec))
            });
        }
    }
    specs
        .keys
        .iter()
        .map(|(name, ks)| {
            let entry = KeyEntry {
                key: Arc::new(RSubject::new(prefix, SubjectKind::Key, name, &ks.limits)),
                team: ks.team.as_deref().and_then(|t| teams.get(t).cloned()),
            };
            (name.clone(), entry)
        })
        .collect()
}

/// Skips Redis for [`RETRY_EVERY`] after a failure; then lets one caller probe it.
/// Also used by the async Redis client of sessions and the shared cache (`store::shared_redis`).
pub(crate) struct Breaker {
    start: Instant,
    down: AtomicBool,
    next_probe_ms: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    /// A closed breaker (Redis assumed reachable).
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            down: AtomicBool::new(false),
            next_probe_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether the breaker currently considers Redis reachable.
    pub(crate) fn is_up(&self) -> bool {
        !self.down.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether this call may use Redis; every allowed call must end in `success` or `failure`.
    pub(crate) fn allow(&self) -> bool {
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
    pub(crate) fn success(&self) -> bool {
        self.probing.store(false, Ordering::Release);
        self.down.swap(false, Ordering::AcqRel)
    }

    /// Returns true when this call took the store down.
    pub(crate) fn failure(&self) -> bool {
        let next = self.now_ms().saturating_add(RETRY_EVERY.as_millis() as u64);
        self.next_probe_ms.store(next, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        !self.down.swap(true, Ordering::AcqRel)
    }
}

/// A settlement, release or replayed spend: one `finish` script call per subject group.
#[derive(Debug, Clone)]
struct FinishJob {
    ticket: String,
    cost: u64,
    /// (subject, tokens to give back to its bucket; negative charges extra).
    subjects: Vec<(Arc<RSubject>, i64)>,
}

struct Scripts {
    admit: Script,
    finish: Script,
    status: Script,
}

struct Inner {
    client: Client,
    settings: RedisSettings,
    pool: Mutex<Vec<Connection>>,
    table: RwLock<Arc<HashMap<String, KeyEntry>>>,
    fallback: Option<Limiter>,
    ledger: Option<Arc<dyn SpendLedger>>,
    events: Option<StoreEvents>,
    breaker: Breaker,
    pending: Mutex<VecDeque<FinishJob>>,
    scripts: Scripts,
    seq: AtomicU64,
    replica: u64,
    overruns: AtomicU64,
}

/// The Redis-backed limiter; cheap to clone.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("url", &self.inner.settings.url)
            .field("prefix", &self.inner.settings.key_prefix)
            .finish_non_exhaustive()
    }
}

type Conn = Connection;

impl Inner {
    fn emit(&self, e: StoreEvent) {
        if let Some(f) = &self.events {
            f(e);
        }
    }

    fn connect(&self) -> Result<Conn, RedisError> {
        let t = self.settings.timeout;
        let con = self.client.get_connection_with_timeout(t)?;
        con.set_read_timeout(Some(t))?;
        con.set_write_timeout(Some(t))?;
        Ok(con)
    }

    /// Runs `f` on a pooled connection; on any error the pool is emptied (after a restart every
    /// pooled connection is dead) and the breaker opens. A pooled connection the server closed
    /// (the request never reached it) is retried once on a fresh one.
    fn with_conn<T>(
        &self,
        mut f: impl FnMut(&mut Conn) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let pooled = self.pool.lock().pop();
        let was_pooled = pooled.is_some();
        let mut con = match pooled {
            Some(c) => c,
            None => self.connect().inspect_err(|e| self.failed(e))?,
        };
        let mut res = f(&mut con);
        if was_pooled && matches!(&res, Err(e) if e.is_connection_dropped()) {
            self.pool.lock().clear();
            con = self.connect().inspect_err(|e| self.failed(e))?;
            res = f(&mut con);
        }
        match res {
            Ok(v) => {
                {
                    let mut pool = self.pool.lock();
                    if pool.len() < POOL_MAX {
                        pool.push(con);
                    }
                }
                if self.breaker.success() {
                    tracing::info!(url = %self.settings.url, "redis limit store is reachable again");
                    self.emit(StoreEvent::Up(true));
                }
                Ok(v)
            }
            Err(e) => {
                self.failed(&e);
                Err(e)
            }
        }
    }

    fn failed(&self, e: &RedisError) {
        self.pool.lock().clear();
        if self.breaker.failure() {
            tracing::warn!(url = %self.settings.url, error = %e, fail_open = self.settings.fail_open,
                "redis limit store unreachable");
            self.emit(StoreEvent::Up(false));
        } else {
            tracing::debug!(error = %e, "redis limit store call failed");
        }
    }

    /// Subject groups that may share one script call.
    fn groups<'a, T>(&self, items: &'a [T]) -> Vec<&'a [T]> {
        if self.settings.per_subject_calls {
            items.chunks(1).collect()
        } else {
            vec![items]
        }
    }

    fn run_finish(&self, con: &mut Conn, job: &FinishJob) -> Result<(), RedisError> {
        for group in self.groups(&job.subjects) {
            let mut inv = self.scripts.finish.prepare_invoke();
            for (s, _) in group {
                for k in &s.keys {
                    inv.key(k);
                }
            }
            inv.arg(&job.ticket).arg(job.cost);
            for (s, back) in group {
                inv.arg(s.tpm()).arg(*back).arg(s.period_code());
            }
            let _: i64 = inv.invoke(con)?;
        }
        Ok(())
    }

    /// Replays queued settlements (oldest first) so that the next admission sees their spend.
    /// Each job is taken out of the queue before it runs, so concurrent replays never apply one
    /// twice; a job that fails goes back to the front.
    fn replay(&self, con: &mut Conn) -> Result<(), RedisError> {
        for _ in 0..REPLAY_BATCH {
            let Some(job) = self.pending.lock().pop_front() else {
                return Ok(());
            };
            if let Err(e) = self.run_finish(con, &job) {
                self.pending.lock().push_front(job);
                return Err(e);
            }
        }
        Ok(())
    }

    fn queue(&self, job: FinishJob) {
        let mut q = self.pending.lock();
        if q.len() >= MAX_PENDING {
            q.pop_front();
            tracing::error!(
                "redis settlement queue full; dropped the oldest (its spend is in the ledger)"
            );
        }
        q.push_back(job);
    }

    /// Settles now, or queues for replay when Redis is unreachable.
    fn finish_or_queue(&self, job: FinishJob) {
        if self.breaker.allow() {
            let res = self.with_conn(|con| {
                self.replay(con)?;
                self.run_finish(con, &job)
            });
            if res.is_ok() {
                return;
            }
        }
        self.emit(StoreEvent::Unavailable {
            op: "settle",
            outcome: "queued",
        });
        self.queue(job);
    }

    fn ticket_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:x}", self.replica)
    }

    fn record_ledger(&self, key: &RSubject, team: Option<&RSubject>, s: &Settlement<'_>) {
        if let Some(ledger) = &self.ledger {
            ledger.record(SpendRecord {
                ts_unix_ms: Clock::system().unix_ms(),
                key: key.name.clone(),
                team: team.map(|t| t.name.clone()),
                model: s.model.to_owned(),
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
                cached_tokens: s.cached_tokens,
                cost_nanos: s.cost_nanos,
                estimated: s.estimated,
                request_id: s.request_id.to_owned(),
            });
        }
    }
}

/// A refusal as the `admit` script reports it.
struct ScriptRefusal {
    kind: RefusalKind,
    /// Index of the refusing subject within the call.
    idx: usize,
    wait: Duration,
    limit: u64,
    used: u64,
    requested: u64,
    period_end: Option<i64>,
}

/// Parsed `admit` script answer.
struct AdmitAnswer {
    refusal: Option<ScriptRefusal>,
    requests: Vec<Option<Window>>,
    tokens: Vec<Option<Window>>,
}

fn u(x: i64) -> u64 {
    u64::try_from(x).unwrap_or(0)
}

fn window(lim: i64, rem: i64, reset_ms: i64) -> Option<Window> {
    (lim >= 0).then(|| Window {
        limit: u(lim),
        remaining: u(rem),
        reset: Duration::from_millis(u(reset_ms)),
    })
}

fn parse_admit(v: &[i64], n: usize) -> Result<AdmitAnswer, RedisError> {
    if v.len() != 8 + 6 * n {
        return Err(RedisError::from((
            ::redis::ErrorKind::TypeError,
            "unexpected admit script answer",
        )));
    }
    let mut requests = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let w = &v[8 + 6 * i..8 + 6 * (i + 1)];
        requests.push(window(w[0], w[1], w[2]));
        tokens.push(window(w[3], w[4], w[5]));
    }
    let refusal = (v[0] == 0).then(|| {
        let kind = match v[1] {
            1 => RefusalKind::Rpm,
            2 => RefusalKind::Tpm,
            3 => RefusalKind::Parallel,
            _ => RefusalKind::Budget,
        };
        ScriptRefusal {
            kind,
            idx: usize::try_from(v[2]).unwrap_or(1).saturating_sub(1),
            wait: Duration::from_millis(u(v[3])),
            limit: u(v[4]),
            used: u(v[5]),
            requested: u(v[6]),
            period_end: (v[7] > 0).then_some(v[7]),
        }
    });
    Ok(AdmitAnswer {
        refusal,
        requests,
        tokens,
    })
}

fn tighter(ws: &[Option<Window>]) -> Option<Window> {
    ws.iter().fold(None, |acc, w| Window::tighter(acc, *w))
}

impl RedisLimiter {
    /// Builds the limiter. Redis need not be up yet: the first calls find out (and follow the
    /// unavailability policy until it is). `ledger` receives every settlement on this replica.
    pub fn new(
        specs: &LimitSpecs,
        settings: RedisSettings,
        ledger: Option<Arc<dyn SpendLedger>>,
        events: Option<StoreEvents>,
    ) -> Result<Self, RedisSetupError> {
        // Validates the specs exactly like the in-memory limiter does.
        let local = Limiter::new(specs, Clock::system(), ledger.clone())?;
        let client = Client::open(settings.url.as_str()).map_err(RedisSetupError::Url)?;
        let table = build_table(&settings.key_prefix, specs);
        let inner = Inner {
            client,
            pool: Mutex::new(Vec::new()),
            table: RwLock::new(Arc::new(table)),
            fallback: settings.fail_open.then_some(local),
            ledger,
            events,
            breaker: Breaker {
                start: Instant::now(),
                down: AtomicBool::new(false),
                next_probe_ms: AtomicU64::new(0),
                probing: AtomicBool::new(false),
            },
            pending: Mutex::new(VecDeque::new()),
            scripts: Scripts {
                admit: Script::new(&format!("{PRELUDE}{ADMIT}")),
                finish: Script::new(&format!("{PRELUDE}{FINISH}")),
                status: Script::new(&format!("{PRELUDE}{STATUS}")),
            },
            seq: AtomicU64::new(0),
            replica: rand::random(),
            overruns: AtomicU64::new(0),
            settings,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Checks the connection and loads the scripts; the gateway starts either way.
    pub fn ping(&self) -> Result<(), RedisError> {
        let i = &self.inner;
        i.with_conn(|con| {
            for s in [&i.scripts.admit, &i.scripts.finish, &i.scripts.status] {
                s.prepare_invoke().load(con)?;
            }
            Ok(())
        })
    }

    /// Loads this replica's ledger spend into the local fallback limiter (`fail_open` only).
    pub fn load_fallback_spend(&self) -> Result<(), StoreError> {
        match &self.inner.fallback {
            Some(l) => l.load_spend_from_ledger(),
            None => Ok(()),
        }
    }

    /// Settlements waiting for Redis to come back.
    pub fn pending_settlements(&self) -> usize {
        self.inner.pending.lock().len()
    }

    /// Whether the breaker currently considers Redis reachable.
    pub fn is_up(&self) -> bool {
        !self.inner.breaker.down.load(Ordering::Acquire)
    }

    /// Settlements whose cost exceeded their reservation, since start.
    pub fn overrun_count(&self) -> u64 {
        self.inner.overruns.load(Ordering::Relaxed)
    }

    fn unavailable(
        &self,
        req: &AdmitRequest<'_>,
        entry: &KeyEntry,
    ) -> Result<Admission, AdmitError> {
        let i = &self.inner;
        match &i.fallback {
            Some(local) => {
                i.emit(StoreEvent::Unavailable {
                    op: "admit",
                    outcome: "local",
                });
                let adm = local.admit(req)?;
                let rate = *adm.rate();
                let ticket = FallbackTicket {
                    inner: Some(adm),
                    lim: i.clone(),
                    subjects: entry.subjects(),
                };
                Ok(Admission::new(Box::new(ticket), rate))
            }
            None => {
                i.emit(StoreEvent::Unavailable {
                    op: "admit",
                    outcome: "refused",
                });
                Err(AdmitError::Unavailable(
                    "The shared limit store is unavailable; try again shortly.".into(),
                ))
            }
        }
    }

    /// One `admit` script call for `group`; the ticket is recorded in each subject.
    fn admit_group(
        &self,
        con: &mut Conn,
        group: &[Arc<RSubject>],
        ticket: &str,
        req: &AdmitRequest<'_>,
    ) -> Result<AdmitAnswer, RedisError> {
        let i = &self.inner;
        let mut inv = i.scripts.admit.prepare_invoke();
        for s in group {
            for k in &s.keys {
                inv.key(k);
            }
        }
        let ttl_ms = u64::try_from(i.settings.reservation_ttl.as_millis()).unwrap_or(u64::MAX);
        inv.arg(ticket)
            .arg(req.est_tokens)
            .arg(req.reserve_nanos)
            .arg(ttl_ms);
        for s in group {
            let l = &s.spec;
            let budget = l.budget_nanos.map(|b| b.to_string()).unwrap_or_default();
            inv.arg(l.rpm.unwrap_or(0))
                .arg(l.tpm.unwrap_or(0))
                .arg(l.max_parallel.unwrap_or(0))
                .arg(budget)
                .arg(s.period_code());
        }
        let v: Vec<i64> = inv.invoke(con)?;
        parse_admit(&v, group.len())
    }

    fn admit_redis(
        &self,
        con: &mut Conn,
        subjects: &[Arc<RSubject>],
        ticket: &str,
        req: &AdmitRequest<'_>,
    ) -> Result<Result<RateInfo, AdmitError>, RedisError> {
        let i = &self.inner;
        let mut requests = Vec::new();
        let mut tokens = Vec::new();
        let mut admitted: Vec<Arc<RSubject>> = Vec::new();
        for group in i.groups(subjects) {
            let ans = match self.admit_group(con, group, ticket, req) {
                Ok(a) => a,
                Err(e) => {
                    // Best effort: the ticket expires anyway if this fails too.
                    self.compensate(con, &admitted, ticket, req.est_tokens);
                    return Err(e);
                }
            };
            requests.extend(ans.requests);
            tokens.extend(ans.tokens);
            if let Some(r) = ans.refusal {
                // Only the split path gets here with subjects already admitted.
                self.compensate(con, &admitted, ticket, req.est_tokens);
                let s = &group[r.idx.min(group.len() - 1)];
                return Ok(Err(AdmitError::Refused(Box::new(Refusal {
                    kind: r.kind,
                    subject_kind: s.kind,
                    subject: s.name.to_string(),
                    retry_after: (r.kind != RefusalKind::Budget).then_some(r.wait),
                    limit: r.limit,
                    used: r.used,
                    requested: r.requested,
                    period_end_unix: r.period_end,
                    rate: RateInfo {
                        requests: tighter(&requests),
                        tokens: tighter(&tokens),
                    },
                }))));
            }
            admitted.extend(group.iter().cloned());
        }
        Ok(Ok(RateInfo {
            requests: tighter(&requests),
            tokens: tighter(&tokens),
        }))
    }

    /// Undoes a partial admission: frees the ticket and refunds its tokens (nothing ran).
    fn compensate(&self, con: &mut Conn, admitted: &[Arc<RSubject>], ticket: &str, tokens: u64) {
        if admitted.is_empty() {
            return;
        }
        let back = i64::try_from(tokens).unwrap_or(i64::MAX);
        let job = FinishJob {
            ticket: ticket.to_owned(),
            cost: 0,
            subjects: admitted
                .iter()
                .map(|s| (s.clone(), if s.tpm() > 0 { back } else { 0 }))
                .collect(),
        };
        if let Err(e) = self.inner.run_finish(con, &job) {
            tracing::warn!(error = %e, "could not release a partial admission; it expires with reservation_ttl");
        }
    }

    fn status_redis(
        &self,
        con: &mut Conn,
        subjects: &[Arc<RSubject>],
    ) -> Result<Vec<SubjectStatus>, RedisError> {
        let i = &self.inner;
        let mut out = Vec::with_capacity(subjects.len());
        for group in i.groups(subjects) {
            let mut inv = i.scripts.status.prepare_invoke();
            for s in group {
                for k in &s.keys {
                    inv.key(k);
                }
            }
            for s in group {
                inv.arg(s.tpm()).arg(s.period_code());
            }
            let v: Vec<i64> = inv.invoke(con)?;
            if v.len() != 7 * group.len() {
                return Err(RedisError::from((
                    ::redis::ErrorKind::TypeError,
                    "unexpected status script answer",
                )));
            }
            for (s, r) in group.iter().zip(v.chunks(7)) {
                let (spent, reserved) = (u(r[1]), u(r[2]));
                let remaining = s
                    .spec
                    .budget_nanos
                    .map(|b| b.saturating_sub(spent.saturating_add(reserved)));
                out.push(SubjectStatus {
                    kind: s.kind,
                    name: s.name.to_string(),
                    limits: s.spec.clone(),
                    in_flight: u32::try_from(r[0]).unwrap_or(u32::MAX),
                    spent_nanos: spent,
                    reserved_nanos: reserved,
                    remaining_nanos: remaining,
                    spent_usd: nanos_to_usd_string(spent),
                    remaining_usd: remaining.map(nanos_to_usd_string),
                    period_start_unix: (s.spec.period != Period::Total).then_some(r[3]),
                    period_end_unix: (r[4] > 0).then_some(r[4]),
                    tokens: s.spec.tpm.map(|tpm| Window {
                        limit: tpm,
                        remaining: u(r[5]),
                        reset: Duration::from_millis(u(r[6])),
                    }),
                });
            }
        }
        Ok(out)
    }
}

impl LimitBackend for RedisLimiter {
    fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, AdmitError> {
        let i = &self.inner;
        let table = i.table.read().clone();
        let entry = table
            .get(req.key)
            .ok_or_else(|| AdmitError::UnknownKey(req.key.to_owned()))?;
        if !i.breaker.allow() {
            return self.unavailable(req, entry);
        }
        let subjects = entry.subjects();
        let ticket = i.ticket_id();
        let res = i.with_conn(|con| {
            i.replay(con)?;
            self.admit_redis(con, &subjects, &ticket, req)
        });
        match res {
            Err(_) => self.unavailable(req, entry),
            Ok(Err(e)) => Err(e),
            Ok(Ok(rate)) => {
                let t = RedisTicket {
                    lim: i.clone(),
                    id: ticket,
                    subjects,
                    tokens: req.est_tokens,
                    reserve: req.reserve_nanos,
                    done: false,
                };
                Ok(Admission::new(Box::new(t), rate))
            }
        }
    }

    fn status(&self, key: &str) -> Option<KeyStatus> {
        let i = &self.inner;
        let subjects = i.table.read().get(key)?.subjects();
        let res = if i.breaker.allow() {
            i.with_conn(|con| self.status_redis(con, &subjects)).ok()
        } else {
            None
        };
        match res {
            Some(mut v) => {
                let team = (v.len() > 1).then(|| v.pop()).flatten();
                let key = v.pop()?;
                Some(KeyStatus { key, team })
            }
            None => {
                let local = i.fallback.as_ref();
                i.emit(StoreEvent::Unavailable {
                    op: "status",
                    outcome: if local.is_some() { "local" } else { "skipped" },
                });
                local.and_then(|l| l.status(key))
            }
        }
    }

    fn reconfigure(&self, specs: &LimitSpecs) -> Result<(), LimitConfigError> {
        let i = &self.inner;
        match &i.fallback {
            Some(l) => l.reconfigure(specs)?,
            None => {
                Limiter::new(specs, Clock::system(), None)?;
            }
        }
        *i.table.write() = Arc::new(build_table(&i.settings.key_prefix, specs));
        Ok(())
    }
}

/// An admission held in Redis.
struct RedisTicket {
    lim: Arc<Inner>,
    id: String,
    subjects: Vec<Arc<RSubject>>,
    tokens: u64,
    reserve: u64,
    done: bool,
}

impl AdmissionTicket for RedisTicket {
    fn settle(&mut self, s: &Settlement<'_>) -> SettleOutcome {
        if std::mem::replace(&mut self.done, true) {
            return SettleOutcome::default();
        }
        let actual = s.prompt_tokens.saturating_add(s.completion_tokens);
        let back = i64::try_from(i128::from(self.tokens) - i128::from(actual)).unwrap_or(0);
        let job = FinishJob {
            ticket: std::mem::take(&mut self.id),
            cost: s.cost_nanos,
            subjects: self
                .subjects
                .iter()
                .map(|subj| (subj.clone(), if subj.tpm() > 0 { back } else { 0 }))
                .collect(),
        };
        self.lim.finish_or_queue(job);
        let overrun = s.cost_nanos.saturating_sub(self.reserve);
        if overrun > 0 {
            self.lim.overruns.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                key = %self.subjects[0].name,
                request_id = s.request_id,
                model = s.model,
                reserved_nanos = self.reserve,
                cost_nanos = s.cost_nanos,
                "actual cost exceeded the reservation; charged in full"
            );
        }
        self.lim
            .record_ledger(&self.subjects[0], self.subjects.get(1).map(Arc::as_ref), s);
        SettleOutcome {
            charged_nanos: s.cost_nanos,
            reserved_nanos: self.reserve,
            overrun_nanos: overrun,
        }
    }

    fn release(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // The request may have reached the provider, so its token estimate stays charged.
        let job = FinishJob {
            ticket: std::mem::take(&mut self.id),
            cost: 0,
            subjects: self.subjects.iter().map(|s| (s.clone(), 0)).collect(),
        };
        self.lim.finish_or_queue(job);
    }
}

/// A local admission made while Redis was unreachable (`fail_open`); its spend is replayed into
/// Redis once it is back, so shared budgets count it.
struct FallbackTicket {
    inner: Option<Admission>,
    lim: Arc<Inner>,
    subjects: Vec<Arc<RSubject>>,
}

impl AdmissionTicket for FallbackTicket {
    fn settle(&mut self, s: &Settlement<'_>) -> SettleOutcome {
        let Some(adm) = self.inner.take() else {
            return SettleOutcome::default();
        };
        let out = adm.settle(s);
        if s.cost_nanos > 0 {
            self.lim.finish_or_queue(FinishJob {
                ticket: "-".into(),
                cost: s.cost_nanos,
                subjects: self.subjects.iter().map(|x| (x.clone(), 0)).collect(),
            });
        }
        out
    }

    fn release(&mut self) {
        self.inner.take();
    }
}

/// Helpers shared by the scripts. Money stays in integer strings (`HINCRBY`) and is compared as
/// doubles, exact up to 2^53 nano-dollars ($9 million).
const PRELUDE: &str = r#"
local DAY = 86400
local function int(x) return string.format('%d', math.floor(x)) end
local function fmt(x) return string.format('%.3f', x) end
local function fdiv(a, b) return math.floor(a / b) end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = fdiv(y, 400)
  local yoe = y - era * 400
  local mp = m + 9
  if m > 2 then mp = m - 3 end
  local doy = fdiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + fdiv(yoe, 4) - fdiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = fdiv(z, 146097)
  local doe = z - era * 146097
  local yoe = fdiv(doe - fdiv(doe, 1460) + fdiv(doe, 36524) - fdiv(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + fdiv(yoe, 4) - fdiv(yoe, 100))
  local mp = fdiv(5 * doy + 2, 153)
  local m = mp - 9
  if mp < 10 then m = mp + 3 end
  if m <= 2 then y = y + 1 end
  return y, m
end
-- Period codes: 0 total, 1 daily, 2 weekly (Monday), 3 monthly; UTC. Returns start, end (-1 = none).
local function period_bounds(kind, now_s)
  local day = fdiv(now_s, DAY)
  if kind == 1 then return day * DAY, (day + 1) * DAY end
  if kind == 2 then local s = (day - (day + 3) % 7) * DAY; return s, s + 7 * DAY end
  if kind == 3 then
    local y, m = civil_from_days(day)
    local s = days_from_civil(y, m, 1) * DAY
    if m == 12 then y = y + 1; m = 1 else m = m + 1 end
    return s, days_from_civil(y, m, 1) * DAY
  end
  return -1, -1
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000, tonumber(t[1])
end
-- Frees tickets whose replica never settled them, with their reservations.
local function purge(inflight, res, now_ms)
  local dead = redis.call('ZRANGEBYSCORE', inflight, '-inf', int(now_ms), 'LIMIT', 0, 256)
  for _, t in ipairs(dead) do
    local amt = redis.call('HGET', res, t)
    if amt then
      redis.call('HDEL', res, t)
      redis.call('HINCRBY', res, '=sum', '-' .. amt)
    end
    redis.call('ZREM', inflight, t)
  end
end
-- Spend of the current period; a new period (by the server's clock) starts from zero.
local function roll(budget, kind, now_s)
  local start, stop = period_bounds(kind, now_s)
  local h = redis.call('HMGET', budget, 'p', 'spent')
  local p = tonumber(h[1])
  local spent = h[2] or '0'
  if p ~= start then
    if p == nil or start > p then spent = '0' end
    redis.call('HSET', budget, 'p', int(start), 'spent', spent)
    if stop > 0 then
      redis.call('PEXPIREAT', budget, int((stop + DAY) * 1000))
    else
      redis.call('PERSIST', budget)
    end
  end
  return tonumber(spent) or 0
end
-- Token bucket: up to tpm tokens, refilled at tpm per minute; may go negative (debt).
local function bucket(key, tpm, now_ms)
  local h = redis.call('HMGET', key, 'level', 'ts')
  local level = tonumber(h[1]) or tpm
  local ts = tonumber(h[2]) or now_ms
  if now_ms > ts then level = level + (now_ms - ts) * tpm / 60000 end
  if level > tpm then level = tpm end
  return level
end
local function save_bucket(key, tpm, level, now_ms)
  redis.call('HSET', key, 'level', fmt(level), 'ts', fmt(now_ms))
  -- Once full again the bucket is indistinguishable from a missing one.
  redis.call('PEXPIRE', key, int((tpm - level) * 60000 / tpm + 1000))
end
"#;

/// KEYS: 5 per subject (rpm, tpm, inflight, res, budget).
/// ARGV: ticket, est_tokens, reserve nanos, ttl ms; then per subject: rpm, tpm, max_parallel
/// (0 = none), budget nanos ('' = none), period code.
/// Returns: ok(1/0), refusal kind (1 rpm, 2 tpm, 3 parallel, 4 budget), subject index (1-based),
/// retry ms, limit, used, requested, period end; then per subject the request and token windows
/// (limit, remaining, reset ms; -1 = none).
const ADMIT: &str = r#"
local n = #KEYS / 5
local ticket, est, reserve, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local reserve_n = tonumber(reserve)
local now_ms, now_s = clock()
local out = {1, 0, 0, 0, 0, 0, 0, -1}
for j = 1, 6 * n do out[8 + j] = -1 end
local function key(i, j) return KEYS[(i - 1) * 5 + j] end
local function arg(i, j) return ARGV[4 + (i - 1) * 5 + j] end
local function win(i, k, lim, rem, reset)
  local b = 8 + (i - 1) * 6 + k * 3
  out[b + 1] = lim; out[b + 2] = math.max(0, math.floor(rem)); out[b + 3] = math.max(0, math.ceil(reset))
end
local function refuse(kind, i, retry_ms, limit, used, requested, pend)
  out[1] = 0; out[2] = kind; out[3] = i; out[4] = math.max(0, math.ceil(retry_ms))
  out[5] = limit; out[6] = math.max(0, used); out[7] = requested; out[8] = pend
  return out
end
-- 1. Requests (GCRA): consumed in order; a refused request still counts as an attempt.
for i = 1, n do
  local rpm = tonumber(arg(i, 1))
  if rpm > 0 then
    local per = 60000 / rpm
    local tat = tonumber(redis.call('GET', key(i, 1))) or now_ms
    if tat < now_ms then tat = now_ms end
    local new_tat = tat + per
    if new_tat - now_ms > 60000 + 0.01 then
      win(i, 0, rpm, 0, tat - now_ms)
      return refuse(1, i, new_tat - now_ms - 60000, rpm, rpm, 1, -1)
    end
    redis.call('SET', key(i, 1), fmt(new_tat), 'PX', int(new_tat - now_ms + 1))
    win(i, 0, rpm, (now_ms + 60000 - new_tat) / per + 0.0001, new_tat - now_ms)
  end
end
-- 2. Tokens, checked for every subject before any is charged.
local levels = {}
for i = 1, n do
  local tpm = tonumber(arg(i, 2))
  if tpm > 0 then
    local level = bucket(key(i, 2), tpm, now_ms)
    levels[i] = level
    win(i, 1, tpm, level, (tpm - level) * 60000 / tpm)
    local need = math.min(est, tpm)
    if level < need then
      return refuse(2, i, (need - level) * 60000 / tpm, tpm, tpm - math.max(0, math.floor(level)), est, -1)
    end
  end
end
-- 3. Requests in flight (expired tickets first give back their slot and reservation).
for i = 1, n do
  purge(key(i, 3), key(i, 4), now_ms)
  local maxp = tonumber(arg(i, 3))
  if maxp > 0 then
    local cur = redis.call('ZCARD', key(i, 3))
    if cur >= maxp then return refuse(3, i, 1000, maxp, cur, 1, -1) end
  end
end
-- 4. Budget: spent + live reservations + this one must fit.
for i = 1, n do
  local kind = tonumber(arg(i, 5))
  local spent = roll(key(i, 5), kind, now_s)
  local budget = arg(i, 4)
  if budget ~= '' then
    local reserved = math.max(0, tonumber(redis.call('HGET', key(i, 4), '=sum')) or 0)
    local used = spent + reserved
    if used + reserve_n > tonumber(budget) then
      local _, stop = period_bounds(kind, now_s)
      return refuse(4, i, 0, tonumber(budget), used, reserve_n, stop)
    end
  end
end
-- Everything fits: charge tokens, take a slot, reserve.
for i = 1, n do
  if levels[i] then
    local tpm = tonumber(arg(i, 2))
    local level = levels[i] - est
    save_bucket(key(i, 2), tpm, level, now_ms)
    win(i, 1, tpm, level, (tpm - level) * 60000 / tpm)
  end
  redis.call('ZADD', key(i, 3), int(now_ms + ttl), ticket)
  if reserve_n > 0 then
    redis.call('HSET', key(i, 4), ticket, reserve)
    redis.call('HINCRBY', key(i, 4), '=sum', reserve)
  end
  -- Both expire together, long after every ticket in them.
  redis.call('PEXPIRE', key(i, 3), int(ttl + 60000))
  redis.call('PEXPIRE', key(i, 4), int(ttl + 60000))
end
return out
"#;

/// Settle, release or replay. KEYS: 5 per subject. ARGV: ticket, cost nanos; then per subject:
/// tpm (0 = none), tokens to give back (negative = charge more), period code.
const FINISH: &str = r#"
local n = #KEYS / 5
local ticket, cost = ARGV[1], ARGV[2]
local now_ms, now_s = clock()
for i = 1, n do
  local k = (i - 1) * 5
  local a = 2 + (i - 1) * 3
  local tpm, back, kind = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local amt = redis.call('HGET', KEYS[k + 4], ticket)
  if amt then
    redis.call('HDEL', KEYS[k + 4], ticket)
    redis.call('HINCRBY', KEYS[k + 4], '=sum', '-' .. amt)
  end
  redis.call('ZREM', KEYS[k + 3], ticket)
  if cost ~= '0' then
    roll(KEYS[k + 5], kind, now_s)
    redis.call('HINCRBY', KEYS[k + 5], 'spent', cost)
  end
  if tpm > 0 and back ~= 0 then
    local level = bucket(KEYS[k + 2], tpm, now_ms) + back
    if level > tpm then level = tpm end
    save_bucket(KEYS[k + 2], tpm, level, now_ms)
  end
end
return 1
"#;

/// KEYS: 5 per subject. ARGV per subject: tpm, period code. Returns per subject: in flight,
/// spent, reserved, period start, period end, tokens remaining, token reset ms (-1 = no tpm).
const STATUS: &str = r#"
local n = #KEYS / 5
local now_ms, now_s = clock()
local out = {}
for i = 1, n do
  local k = (i - 1) * 5
  local tpm, kind = tonumber(ARGV[(i - 1) * 2 + 1]), tonumber(ARGV[(i - 1) * 2 + 2])
  purge(KEYS[k + 3], KEYS[k + 4], now_ms)
  local spent = roll(KEYS[k + 5], kind, now_s)
  local start, stop = period_bounds(kind, now_s)
  local reserved = math.max(0, tonumber(redis.call('HGET', KEYS[k + 4], '=sum')) or 0)
  local rem, reset = -1, -1
  if tpm > 0 then
    local level = bucket(KEYS[k + 2], tpm, now_ms)
    rem = math.max(0, math.floor(level))
    reset = math.max(0, math.ceil((tpm - level) * 60000 / tpm))
  end
  local row = {redis.call('ZCARD', KEYS[k + 3]), spent, reserved, start, stop, rem, reset}
  for _, x in ipairs(row) do out[#out + 1] = x end
end
return out
"#;

#[cfg(test)]
mod tests;
