//! Shared [`LimitStore`] in Redis, so that every gateway replica enforces one set of limits.
//!
//! Each admission, settlement and status read is one atomic Lua script (`EVALSHA`, falling back
//! to `EVAL` after a Redis restart; sources in `redis/*.lua`) that reads the Redis server's clock
//! (`TIME`), so replicas with skewed clocks still agree on rate windows and budget periods.
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
//! All I/O is async ([`SharedRedis`]: one multiplexed connection, every call bounded by the
//! store's timeout, a breaker that skips Redis while it fails). Admission and status await their
//! script; settlement never waits: [`Admission::settle`] (and `Drop`) hand a job to a settler
//! task that runs it, keeps it queued while Redis is unreachable, and replays the queue in order
//! when Redis is back. An admission or status read first waits (at most the timeout) for the
//! settlements this replica handed off before it, so a replica always sees its own spend.
//! While Redis fails, admissions are refused (`fail_closed`) or admitted by a local [`Limiter`]
//! with the same specs (`fail_open`), whose spend is replayed into Redis the same way.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::{RedisError, Script};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::policy::{self, Counters, KeyTable};
use super::{
    Admission, AdmissionTicket, AdmitError, AdmitRequest, Clock, KeyStatus, LimitConfigError,
    LimitSpec, LimitSpecs, LimitStore, Limiter, Period, RateInfo, RefusalKind, SettleOutcome,
    Settlement, SubjectKind, SubjectStatus, Window,
};
use crate::store::{SharedRedis, SpendLedger, StoreError, StoreEvents, RETRY_EVERY};

/// Settlements kept for replay while Redis is unreachable; beyond this the oldest are dropped
/// (their spend stays in the SQLite ledger).
const MAX_PENDING: usize = 100_000;
/// Settlements the settler sends at once (pipelined on the multiplexed connection).
const BATCH: usize = 64;

const PRELUDE: &str = include_str!("redis/prelude.lua");
const ADMIT: &str = include_str!("redis/admit.lua");
const FINISH: &str = include_str!("redis/finish.lua");
const STATUS: &str = include_str!("redis/status.lua");

/// How to reach Redis and what to do without it.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key (`triage`).
    pub key_prefix: String,
    /// Unsettled tickets (reservations, parallel slots) expire after this long.
    pub reservation_ttl: Duration,
    /// Connect and response timeout of one call.
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
    /// The settler task needs a tokio runtime.
    #[error("the redis limit store must be built inside a tokio runtime")]
    NoRuntime,
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

type Table = KeyTable<RSubject>;

fn build_table(prefix: &str, specs: &LimitSpecs) -> Result<Table, LimitConfigError> {
    KeyTable::build(specs, |kind, name, spec| {
        Ok::<_, LimitConfigError>(RSubject::new(prefix, kind, name, spec))
    })
}

/// A settlement, release or replayed spend: one `finish` script call per subject group.
#[derive(Debug, Clone)]
struct FinishJob {
    ticket: String,
    cost: u64,
    /// (subject, tokens to give back to its bucket; negative charges extra).
    subjects: Vec<(Arc<RSubject>, i64)>,
    /// Already reported as queued (a job is counted once however often it is retried).
    queued: bool,
}

/// Runs `finish` scripts; shared by the settler task and admission compensation.
#[derive(Clone)]
struct Finisher {
    redis: Arc<SharedRedis>,
    script: Script,
    per_subject_calls: bool,
}

impl Finisher {
    /// Subject groups that may share one script call.
    fn groups<'a, T>(&self, items: &'a [T]) -> Vec<&'a [T]> {
        if self.per_subject_calls {
            items.chunks(1).collect()
        } else {
            vec![items]
        }
    }

    async fn run(&self, job: &FinishJob) -> Result<(), RedisError> {
        for group in self.groups(&job.subjects) {
            let mut inv = self.script.prepare_invoke();
            for (s, _) in group {
                for k in &s.keys {
                    inv.key(k);
                }
            }
            inv.arg(&job.ticket).arg(job.cost);
            for (s, back) in group {
                inv.arg(s.tpm()).arg(*back).arg(s.period_code());
            }
            let _: i64 = self
                .redis
                .call(|mut con| {
                    let inv = &inv;
                    async move { inv.invoke_async(&mut con).await }
                })
                .await?;
        }
        Ok(())
    }
}

enum SettleMsg {
    Job(FinishJob),
    /// Answered with the number of jobs still queued once everything sent before it was tried.
    Flush(oneshot::Sender<usize>),
}

/// The task that owns every settlement this replica hands to Redis.
struct Settler {
    fin: Finisher,
    rx: mpsc::UnboundedReceiver<SettleMsg>,
    queue: VecDeque<FinishJob>,
    flushes: Vec<oneshot::Sender<usize>>,
    /// Jobs done (settled, or dropped from a full queue); `sent - done` are pending.
    done: Arc<AtomicU64>,
}

impl Settler {
    async fn run(mut self) {
        loop {
            let msg = if self.queue.is_empty() {
                self.rx.recv().await
            } else {
                // Jobs wait for Redis: retry on the breaker's rhythm, or when asked to flush.
                match tokio::time::timeout(RETRY_EVERY, self.rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        self.pass().await;
                        continue;
                    }
                }
            };
            let Some(msg) = msg else {
                // Every limiter handle is gone: one last attempt, then stop.
                self.pass().await;
                return;
            };
            self.take(msg);
            while let Ok(m) = self.rx.try_recv() {
                self.take(m);
            }
            self.pass().await;
            for f in self.flushes.drain(..) {
                let _ = f.send(self.queue.len());
            }
        }
    }

    fn take(&mut self, msg: SettleMsg) {
        match msg {
            SettleMsg::Job(job) => {
                if self.queue.len() >= MAX_PENDING {
                    self.queue.pop_front();
                    self.done.fetch_add(1, Ordering::AcqRel);
                    tracing::error!(
                        "redis settlement queue full; dropped the oldest (its spend is in the ledger)"
                    );
                }
                self.queue.push_back(job);
            }
            SettleMsg::Flush(tx) => self.flushes.push(tx),
        }
    }

    /// Runs queued jobs oldest first, a batch at a time; stops at the first batch with a failure
    /// (Redis is down or stalled) and keeps the failed jobs at the front, in order.
    async fn pass(&mut self) {
        while !self.queue.is_empty() {
            let n = self.queue.len().min(BATCH);
            let batch: Vec<FinishJob> = self.queue.drain(..n).collect();
            let results = futures::future::join_all(batch.iter().map(|j| self.fin.run(j))).await;
            let mut failed = Vec::new();
            for (mut job, res) in batch.into_iter().zip(results) {
                match res {
                    Ok(()) => {
                        self.done.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(_) => {
                        if !std::mem::replace(&mut job.queued, true) {
                            self.fin.redis.unavailable("settle", "queued");
                        }
                        failed.push(job);
                    }
                }
            }
            if !failed.is_empty() {
                for job in failed.into_iter().rev() {
                    self.queue.push_front(job);
                }
                return;
            }
        }
    }
}

struct Scripts {
    admit: Script,
    status: Script,
}

struct Inner {
    redis: Arc<SharedRedis>,
    settings: RedisSettings,
    table: RwLock<Arc<Table>>,
    fallback: Option<Limiter>,
    ledger: Option<Arc<dyn SpendLedger>>,
    scripts: Scripts,
    fin: Finisher,
    settle_tx: mpsc::UnboundedSender<SettleMsg>,
    /// Jobs handed to the settler.
    sent: AtomicU64,
    /// Jobs the settler finished (see [`Settler::done`]).
    done: Arc<AtomicU64>,
    settler: Mutex<Option<JoinHandle<()>>>,
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

impl Inner {
    /// Hands a job to the settler; never blocks.
    fn hand_off(&self, job: FinishJob) {
        self.sent.fetch_add(1, Ordering::AcqRel);
        if self.settle_tx.send(SettleMsg::Job(job)).is_err() {
            // Only after the runtime shut down; the ledger still has the spend.
            self.done.fetch_add(1, Ordering::AcqRel);
            tracing::warn!("redis settler is gone; settlement not sent to redis");
        }
    }

    fn pending(&self) -> usize {
        let sent = self.sent.load(Ordering::Acquire);
        let done = self.done.load(Ordering::Acquire);
        usize::try_from(sent.saturating_sub(done)).unwrap_or(usize::MAX)
    }

    /// Waits (at most `within`) until the settler has tried every job handed to it before now.
    /// Returns the jobs still queued.
    async fn flush(&self, within: Duration) -> usize {
        if self.pending() == 0 {
            return 0;
        }
        let (tx, rx) = oneshot::channel();
        if self.settle_tx.send(SettleMsg::Flush(tx)).is_err() {
            return self.pending();
        }
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(n)) => n,
            _ => self.pending(),
        }
    }

    fn ticket_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:x}", self.replica)
    }

    fn record_ledger(&self, key: &RSubject, team: Option<&RSubject>, s: &Settlement<'_>) {
        if let Some(ledger) = &self.ledger {
            let now = Clock::system().unix_ms();
            ledger.record(policy::spend_record(
                now,
                &key.name,
                team.map(|t| &t.name),
                s,
            ));
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
    /// Builds the limiter and spawns its settler task on the current tokio runtime. Redis need
    /// not be up yet: the first calls find out (and follow the unavailability policy until it
    /// is). `ledger` receives every settlement on this replica; `events` the store's events.
    pub fn new(
        specs: &LimitSpecs,
        settings: RedisSettings,
        ledger: Option<Arc<dyn SpendLedger>>,
        events: Option<StoreEvents>,
    ) -> Result<Self, RedisSetupError> {
        let table = build_table(&settings.key_prefix, specs)?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| RedisSetupError::NoRuntime)?;
        let redis = SharedRedis::new(
            &settings.url,
            &settings.key_prefix,
            settings.timeout,
            events,
        )
        .map_err(RedisSetupError::Url)?;
        let fallback = match settings.fail_open {
            true => Some(Limiter::new(specs, Clock::system(), ledger.clone())?),
            false => None,
        };
        let fin = Finisher {
            redis: redis.clone(),
            script: Script::new(&format!("{PRELUDE}{FINISH}")),
            per_subject_calls: settings.per_subject_calls,
        };
        let (settle_tx, rx) = mpsc::unbounded_channel();
        let done = Arc::new(AtomicU64::new(0));
        let settler = Settler {
            fin: fin.clone(),
            rx,
            queue: VecDeque::new(),
            flushes: Vec::new(),
            done: done.clone(),
        };
        let handle = runtime.spawn(settler.run());
        let inner = Inner {
            redis,
            table: RwLock::new(Arc::new(table)),
            fallback,
            ledger,
            scripts: Scripts {
                admit: Script::new(&format!("{PRELUDE}{ADMIT}")),
                status: Script::new(&format!("{PRELUDE}{STATUS}")),
            },
            fin,
            settle_tx,
            sent: AtomicU64::new(0),
            done,
            settler: Mutex::new(Some(handle)),
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
    pub async fn ping(&self) -> Result<(), RedisError> {
        let i = &self.inner;
        let scripts = [&i.scripts.admit, &i.fin.script, &i.scripts.status];
        i.redis
            .call(|mut con| async move {
                for s in scripts {
                    s.prepare_invoke().load_async(&mut con).await?;
                }
                Ok(())
            })
            .await
    }

    /// Loads this replica's ledger spend into the local fallback limiter (`fail_open` only).
    pub fn load_fallback_spend(&self) -> Result<(), StoreError> {
        match &self.inner.fallback {
            Some(l) => l.load_spend_from_ledger(),
            None => Ok(()),
        }
    }

    /// Settlements handed off but not yet in Redis (in flight, or waiting for Redis to return).
    pub fn pending_settlements(&self) -> usize {
        self.inner.pending()
    }

    /// Waits at most `within` for the settler to send every pending settlement (shutdown, tests).
    /// Returns how many could not be sent.
    pub async fn flush(&self, within: Duration) -> usize {
        self.inner.flush(within).await
    }

    /// Whether the settler task is still running (it stops when the last handle is dropped).
    pub fn settler_running(&self) -> bool {
        self.inner
            .settler
            .lock()
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    /// Whether the breaker currently considers Redis reachable.
    pub fn is_up(&self) -> bool {
        self.inner.redis.is_up()
    }

    /// Settlements whose cost exceeded their reservation, since start.
    pub fn overrun_count(&self) -> u64 {
        self.inner.overruns.load(Ordering::Relaxed)
    }

    /// Admits a request against the key and its team in Redis (see the module docs).
    pub async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, AdmitError> {
        let i = &self.inner;
        let (key, team) = i.table.read().entry(req.key)?;
        let subjects: Vec<Arc<RSubject>> = std::iter::once(key).chain(team).collect();
        // This replica's earlier settlements land first, so it never admits against stale spend.
        i.flush(i.settings.timeout).await;
        let ticket = i.ticket_id();
        match self.admit_redis(&subjects, &ticket, req).await {
            Err(_) => self.unavailable(req, subjects),
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

    /// Limits and usage for a key and its team, from Redis (or the local fallback).
    pub async fn status(&self, key: &str) -> Option<KeyStatus> {
        let i = &self.inner;
        let (k, team) = i.table.read().entry(key).ok()?;
        let subjects: Vec<Arc<RSubject>> = std::iter::once(k).chain(team).collect();
        i.flush(i.settings.timeout).await;
        match self.status_redis(&subjects).await {
            Ok(mut v) => {
                let team = (v.len() > 1).then(|| v.pop()).flatten();
                let key = v.pop()?;
                Some(KeyStatus { key, team })
            }
            Err(_) => {
                let local = i.fallback.as_ref();
                let outcome = if local.is_some() { "local" } else { "skipped" };
                i.redis.unavailable("status", outcome);
                local.and_then(|l| l.status(key))
            }
        }
    }

    /// Applies new limits; tickets in flight settle against the subjects they were admitted on.
    pub fn reconfigure(&self, specs: &LimitSpecs) -> Result<(), LimitConfigError> {
        let i = &self.inner;
        let table = build_table(&i.settings.key_prefix, specs)?;
        if let Some(l) = &i.fallback {
            l.reconfigure(specs)?;
        }
        *i.table.write() = Arc::new(table);
        Ok(())
    }

    fn unavailable(
        &self,
        req: &AdmitRequest<'_>,
        subjects: Vec<Arc<RSubject>>,
    ) -> Result<Admission, AdmitError> {
        let i = &self.inner;
        match &i.fallback {
            Some(local) => {
                i.redis.unavailable("admit", "local");
                let adm = local.admit(req)?;
                let rate = *adm.rate();
                let ticket = FallbackTicket {
                    inner: Some(adm),
                    lim: i.clone(),
                    subjects,
                };
                Ok(Admission::new(Box::new(ticket), rate))
            }
            None => {
                i.redis.unavailable("admit", "refused");
                Err(AdmitError::Unavailable(
                    "The shared limit store is unavailable; try again shortly.".into(),
                ))
            }
        }
    }

    /// One `admit` script call for `group`; the ticket is recorded in each subject.
    async fn admit_group(
        &self,
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
        let v: Vec<i64> = i
            .redis
            .call(|mut con| {
                let inv = &inv;
                async move { inv.invoke_async(&mut con).await }
            })
            .await?;
        parse_admit(&v, group.len())
    }

    async fn admit_redis(
        &self,
        subjects: &[Arc<RSubject>],
        ticket: &str,
        req: &AdmitRequest<'_>,
    ) -> Result<Result<RateInfo, AdmitError>, RedisError> {
        let mut requests = Vec::new();
        let mut tokens = Vec::new();
        let mut admitted: Vec<Arc<RSubject>> = Vec::new();
        for group in self.inner.fin.groups(subjects) {
            let ans = match self.admit_group(group, ticket, req).await {
                Ok(a) => a,
                Err(e) => {
                    // Best effort: the ticket expires anyway if this fails too.
                    self.compensate(&admitted, ticket, req.est_tokens).await;
                    return Err(e);
                }
            };
            requests.extend(ans.requests);
            tokens.extend(ans.tokens);
            if let Some(r) = ans.refusal {
                // Only the split path gets here with subjects already admitted.
                self.compensate(&admitted, ticket, req.est_tokens).await;
                let s = &group[r.idx.min(group.len() - 1)];
                let rate = RateInfo {
                    requests: tighter(&requests),
                    tokens: tighter(&tokens),
                };
                return Ok(Err(policy::refusal(
                    r.kind,
                    (s.kind, &s.name),
                    Some(r.wait),
                    (r.limit, r.used, r.requested),
                    r.period_end,
                    rate,
                )));
            }
            admitted.extend(group.iter().cloned());
        }
        Ok(Ok(RateInfo {
            requests: tighter(&requests),
            tokens: tighter(&tokens),
        }))
    }

    /// Undoes a partial admission: frees the ticket and refunds its tokens (nothing ran).
    async fn compensate(&self, admitted: &[Arc<RSubject>], ticket: &str, tokens: u64) {
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
            queued: false,
        };
        if let Err(e) = self.inner.fin.run(&job).await {
            tracing::warn!(error = %e, "could not release a partial admission; it expires with reservation_ttl");
        }
    }

    async fn status_redis(
        &self,
        subjects: &[Arc<RSubject>],
    ) -> Result<Vec<SubjectStatus>, RedisError> {
        let i = &self.inner;
        let mut out = Vec::with_capacity(subjects.len());
        for group in i.fin.groups(subjects) {
            let mut inv = i.scripts.status.prepare_invoke();
            for s in group {
                for k in &s.keys {
                    inv.key(k);
                }
            }
            for s in group {
                inv.arg(s.tpm()).arg(s.period_code());
            }
            let v: Vec<i64> = i
                .redis
                .call(|mut con| {
                    let inv = &inv;
                    async move { inv.invoke_async(&mut con).await }
                })
                .await?;
            if v.len() != 7 * group.len() {
                return Err(RedisError::from((
                    ::redis::ErrorKind::TypeError,
                    "unexpected status script answer",
                )));
            }
            for (s, r) in group.iter().zip(v.chunks(7)) {
                let counters = Counters {
                    in_flight: u32::try_from(r[0]).unwrap_or(u32::MAX),
                    spent: u(r[1]),
                    reserved: u(r[2]),
                    period_start: r[3],
                    period_end: (r[4] > 0).then_some(r[4]),
                    tokens: s.spec.tpm.map(|tpm| Window {
                        limit: tpm,
                        remaining: u(r[5]),
                        reset: Duration::from_millis(u(r[6])),
                    }),
                };
                out.push(policy::subject_status(s.kind, &s.name, &s.spec, counters));
            }
        }
        Ok(out)
    }
}

impl LimitStore for RedisLimiter {
    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, AdmitError> {
        RedisLimiter::admit(self, req).await
    }

    async fn status(&self, key: &str) -> Option<KeyStatus> {
        RedisLimiter::status(self, key).await
    }

    fn reconfigure(&self, specs: &LimitSpecs) -> Result<(), LimitConfigError> {
        RedisLimiter::reconfigure(self, specs)
    }
}

/// An admission held in Redis. Settling or dropping it only hands a job to the settler.
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
        self.lim.hand_off(FinishJob {
            ticket: std::mem::take(&mut self.id),
            cost: s.cost_nanos,
            subjects: self
                .subjects
                .iter()
                .map(|subj| (subj.clone(), if subj.tpm() > 0 { back } else { 0 }))
                .collect(),
            queued: false,
        });
        let key = &self.subjects[0];
        self.lim
            .record_ledger(key, self.subjects.get(1).map(Arc::as_ref), s);
        policy::settle_outcome(&self.lim.overruns, &key.name, self.reserve, s)
    }

    fn release(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // The request may have reached the provider, so its token estimate stays charged.
        self.lim.hand_off(FinishJob {
            ticket: std::mem::take(&mut self.id),
            cost: 0,
            subjects: self.subjects.iter().map(|s| (s.clone(), 0)).collect(),
            queued: false,
        });
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
            self.lim.hand_off(FinishJob {
                ticket: "-".into(),
                cost: s.cost_nanos,
                subjects: self.subjects.iter().map(|x| (x.clone(), 0)).collect(),
                queued: false,
            });
        }
        out
    }

    fn release(&mut self) {
        self.inner.take();
    }
}

#[cfg(test)]
mod tests;
