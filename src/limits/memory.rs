//! In-memory [`LimitStore`]: per-subject state behind small locks and atomics.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;
use parking_lot::{Mutex, RwLock};

use super::bucket::TokenBucket;
use super::policy::{self, Counters, KeyTable};
use super::{
    Admission, AdmissionTicket, AdmitError, AdmitRequest, Clock, KeyStatus, LimitConfigError,
    LimitSpec, LimitSpecs, LimitStore, Period, RateInfo, RefusalKind, SettleOutcome, Settlement,
    SubjectKind, SubjectStatus, Window,
};
use crate::store::{SpendLedger, StoreError};

type Gcra = governor::RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

/// What every subject shares: the clock, the ledger and counters.
struct Shared {
    clock: Clock,
    ledger: Option<Arc<dyn SpendLedger>>,
    overruns: AtomicU64,
}

#[derive(Debug)]
struct BudgetState {
    period: Period,
    period_start: i64,
    spent: u64,
    reserved: u64,
}

impl BudgetState {
    fn new(period: Period, now_s: i64) -> Self {
        Self {
            period,
            period_start: period.start_of(now_s),
            spent: 0,
            reserved: 0,
        }
    }

    /// Starts a new period when `now` has passed into one; reservations in flight carry over.
    fn roll(&mut self, now_s: i64) {
        let start = self.period.start_of(now_s);
        if start > self.period_start {
            self.spent = 0;
            self.period_start = start;
        }
    }
}

/// One key or team. Rebuilt on reconfigure; the mutable state lives in shared `Arc`s so that
/// admissions holding the old `Subject` settle into the same counters.
struct Subject {
    kind: SubjectKind,
    name: Arc<str>,
    spec: LimitSpec,
    rpm: Option<Arc<Gcra>>,
    tpm: Option<Arc<Mutex<TokenBucket>>>,
    in_flight: Arc<AtomicU32>,
    budget: Arc<Mutex<BudgetState>>,
    shared: Arc<Shared>,
}

type RateRefusal = (Duration, Window);

impl Subject {
    /// Builds a subject, reusing `prev`'s state. Returns whether the budget period kind changed.
    fn build(
        kind: SubjectKind,
        name: &str,
        spec: &LimitSpec,
        prev: Option<&Subject>,
        shared: &Arc<Shared>,
    ) -> Result<(Self, bool), LimitConfigError> {
        let zero = |field| LimitConfigError::Zero {
            kind,
            name: name.to_owned(),
            field,
        };
        let now = shared.clock.mono();
        let now_s = shared.clock.unix_secs();
        let rpm = match spec.rpm {
            None => None,
            Some(r) => match prev.and_then(|p| p.rpm.clone().filter(|_| p.spec.rpm == Some(r))) {
                Some(same) => Some(same),
                None => {
                    let r = NonZeroU32::new(r).ok_or_else(|| zero("rpm"))?;
                    Some(Arc::new(Gcra::new(
                        Quota::per_minute(r),
                        InMemoryState::default(),
                        shared.clock.clone(),
                    )))
                }
            },
        };
        let tpm = match spec.tpm {
            None => None,
            Some(0) => return Err(zero("tpm")),
            Some(t) => match prev.and_then(|p| p.tpm.clone()) {
                Some(bucket) => {
                    bucket.lock().set_tpm(t);
                    Some(bucket)
                }
                None => Some(Arc::new(Mutex::new(TokenBucket::new(t, now)))),
            },
        };
        if spec.max_parallel == Some(0) {
            return Err(zero("max_parallel"));
        }
        let mut period_changed = false;
        let (in_flight, budget) = match prev {
            Some(p) => {
                {
                    let mut b = p.budget.lock();
                    if b.period != spec.period {
                        // Spend is re-read from the ledger afterwards when one is attached.
                        b.period = spec.period;
                        b.period_start = spec.period.start_of(now_s);
                        period_changed = true;
                    }
                }
                (p.in_flight.clone(), p.budget.clone())
            }
            None => (
                Arc::new(AtomicU32::new(0)),
                Arc::new(Mutex::new(BudgetState::new(spec.period, now_s))),
            ),
        };
        Ok((
            Subject {
                kind,
                name: Arc::from(name),
                spec: spec.clone(),
                rpm,
                tpm,
                in_flight,
                budget,
                shared: shared.clone(),
            },
            period_changed,
        ))
    }

    fn check_rpm(&self) -> Result<Option<Window>, RateRefusal> {
        let (Some(g), Some(limit)) = (&self.rpm, self.spec.rpm) else {
            return Ok(None);
        };
        let limit = u64::from(limit);
        let per = Duration::from_secs(60) / u32::try_from(limit).unwrap_or(u32::MAX).max(1);
        match g.check() {
            Ok(snap) => {
                let remaining = u64::from(snap.remaining_burst_capacity());
                let used = u32::try_from(limit.saturating_sub(remaining)).unwrap_or(u32::MAX);
                Ok(Some(Window {
                    limit,
                    remaining,
                    reset: per.saturating_mul(used),
                }))
            }
            Err(not_until) => {
                let wait =
                    not_until.wait_time_from(governor::clock::Clock::now(&self.shared.clock));
                let rest = u32::try_from(limit.saturating_sub(1)).unwrap_or(u32::MAX);
                Err((
                    wait,
                    Window {
                        limit,
                        remaining: 0,
                        reset: wait.saturating_add(per.saturating_mul(rest)),
                    },
                ))
            }
        }
    }

    fn take_tokens(&self, n: u64, now: Duration) -> Result<Option<Window>, RateRefusal> {
        let Some(bucket) = &self.tpm else {
            return Ok(None);
        };
        let mut b = bucket.lock();
        let res = b.try_take(n, now);
        let (remaining, reset) = b.window(now);
        let w = Window {
            limit: b.tpm(),
            remaining,
            reset,
        };
        match res {
            Ok(()) => Ok(Some(w)),
            Err(wait) => Err((wait, w)),
        }
    }

    fn peek_tokens(&self, now: Duration) -> Option<Window> {
        let bucket = self.tpm.as_ref()?;
        let mut b = bucket.lock();
        let (remaining, reset) = b.window(now);
        Some(Window {
            limit: b.tpm(),
            remaining,
            reset,
        })
    }

    fn acquire_permit(&self) -> Result<(), (u64, u64)> {
        let max = self.spec.max_parallel.unwrap_or(u32::MAX);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|n| (u64::from(max), u64::from(n)))
    }

    fn release_permit(&self) {
        // Saturating: never wrap below zero even if a bug released twice.
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Reserves `amount` iff spent + reserved + amount <= budget, atomically for this subject.
    fn reserve(&self, amount: u64, now_s: i64) -> Result<(), (u64, u64)> {
        let mut b = self.budget.lock();
        b.roll(now_s);
        if let Some(budget) = self.spec.budget_nanos {
            let used = b.spent.saturating_add(b.reserved);
            if used.saturating_add(amount) > budget {
                return Err((budget, used));
            }
        }
        b.reserved = b.reserved.saturating_add(amount);
        Ok(())
    }

    fn status(&self) -> SubjectStatus {
        let now_s = self.shared.clock.unix_secs();
        let (period_start, spent, reserved) = {
            let mut b = self.budget.lock();
            b.roll(now_s);
            (b.period_start, b.spent, b.reserved)
        };
        let counters = Counters {
            in_flight: self.in_flight.load(Ordering::Acquire),
            spent,
            reserved,
            period_start,
            period_end: self.spec.period.end_of(now_s),
            tokens: self.peek_tokens(self.shared.clock.mono()),
        };
        policy::subject_status(self.kind, &self.name, &self.spec, counters)
    }
}

/// Everything one admission holds; undoes what it holds unless settled.
struct MemTicket {
    key: Arc<Subject>,
    team: Option<Arc<Subject>>,
    tokens: u64,
    tokens_held: [bool; 2],
    permit_held: [bool; 2],
    reserve: u64,
    reserve_held: [bool; 2],
    done: bool,
}

impl MemTicket {
    fn subjects(&self) -> [Option<&Arc<Subject>>; 2] {
        [Some(&self.key), self.team.as_ref()]
    }

    /// Returns permits and reservations; refunds tokens only when the request never ran.
    fn undo(&mut self, refund_tokens: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let now = self.key.shared.clock.mono();
        for (i, s) in self.subjects().into_iter().enumerate() {
            let Some(s) = s else { continue };
            if self.reserve_held[i] {
                let mut b = s.budget.lock();
                b.reserved = b.reserved.saturating_sub(self.reserve);
            }
            if self.permit_held[i] {
                s.release_permit();
            }
            if refund_tokens && self.tokens_held[i] {
                if let Some(bucket) = &s.tpm {
                    bucket.lock().settle(self.tokens, 0, now);
                }
            }
        }
    }
}

impl Drop for MemTicket {
    fn drop(&mut self) {
        // Only reached unsettled when admission was refused part-way: nothing ran, refund all.
        self.undo(true);
    }
}

impl AdmissionTicket for MemTicket {
    fn settle(&mut self, s: &Settlement<'_>) -> SettleOutcome {
        if self.done {
            return SettleOutcome::default();
        }
        self.done = true;
        let shared = self.key.shared.clone();
        let now = shared.clock.mono();
        let now_ms = shared.clock.unix_ms();
        let now_s = now_ms.div_euclid(1000);
        let actual_tokens = s.prompt_tokens.saturating_add(s.completion_tokens);
        for (i, subj) in self.subjects().into_iter().enumerate() {
            let Some(subj) = subj else { continue };
            {
                let mut b = subj.budget.lock();
                b.roll(now_s);
                if self.reserve_held[i] {
                    b.reserved = b.reserved.saturating_sub(self.reserve);
                }
                b.spent = b.spent.saturating_add(s.cost_nanos);
            }
            if self.tokens_held[i] {
                if let Some(bucket) = &subj.tpm {
                    bucket.lock().settle(self.tokens, actual_tokens, now);
                }
            }
            if self.permit_held[i] {
                subj.release_permit();
            }
        }
        if let Some(ledger) = &shared.ledger {
            let team = self.team.as_ref().map(|t| &t.name);
            ledger.record(policy::spend_record(now_ms, &self.key.name, team, s));
        }
        policy::settle_outcome(&shared.overruns, &self.key.name, self.reserve, s)
    }

    fn release(&mut self) {
        // The request may have reached the provider, so its token estimate stays charged.
        self.undo(false);
    }
}

type Table = KeyTable<Subject>;

struct Inner {
    table: RwLock<Arc<Table>>,
    shared: Arc<Shared>,
    reconfigure: Mutex<()>,
}

/// The in-memory limiter; cheap to clone (shared state).
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.inner.table.read();
        f.debug_struct("Limiter")
            .field("keys", &t.keys.len())
            .field("teams", &t.teams.len())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// Builds a limiter; settlements are written to `ledger` when given.
    pub fn new(
        specs: &LimitSpecs,
        clock: Clock,
        ledger: Option<Arc<dyn SpendLedger>>,
    ) -> Result<Self, LimitConfigError> {
        let shared = Arc::new(Shared {
            clock,
            ledger,
            overruns: AtomicU64::new(0),
        });
        let (table, _) = build_table(specs, &Table::default(), &shared)?;
        Ok(Self {
            inner: Arc::new(Inner {
                table: RwLock::new(Arc::new(table)),
                shared,
                reconfigure: Mutex::new(()),
            }),
        })
    }

    /// Loads current-period spend of every key and team from the attached ledger (at startup).
    pub fn load_spend_from_ledger(&self) -> Result<(), StoreError> {
        let Some(ledger) = &self.inner.shared.ledger else {
            return Ok(());
        };
        ledger.flush()?;
        let table = self.inner.table.read().clone();
        let subjects = table
            .keys
            .values()
            .map(|e| &e.key)
            .chain(table.teams.values());
        for s in subjects {
            load_subject(s, ledger.as_ref())?;
        }
        Ok(())
    }

    /// Admits a request: rpm, then tpm, parallel and budget, each for the key then its team.
    /// A refused request keeps no tokens, permit or reservation; only rpm cells stay consumed.
    pub fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, AdmitError> {
        let (key, team) = self.inner.table.read().entry(req.key)?;
        let clock = &self.inner.shared.clock;
        let now = clock.mono();
        let mut t = MemTicket {
            key,
            team,
            tokens: req.est_tokens,
            tokens_held: [false; 2],
            permit_held: [false; 2],
            reserve: req.reserve_nanos,
            reserve_held: [false; 2],
            done: false,
        };
        let subjects: [Option<Arc<Subject>>; 2] = [Some(t.key.clone()), t.team.clone()];
        let peek_tokens = |subjects: &[Option<Arc<Subject>>; 2]| {
            let [k, tm] = subjects;
            Window::tighter(
                k.as_ref().and_then(|s| s.peek_tokens(now)),
                tm.as_ref().and_then(|s| s.peek_tokens(now)),
            )
        };

        // Requests: consumed first (a refused request still counts as an attempt, as upstream).
        let mut req_windows = [None, None];
        for (i, s) in subjects.iter().enumerate() {
            let Some(s) = s else { continue };
            match s.check_rpm() {
                Ok(w) => req_windows[i] = w,
                Err((wait, w)) => {
                    let rate = RateInfo {
                        requests: Some(w),
                        tokens: peek_tokens(&subjects),
                    };
                    let numbers = (w.limit, w.limit, 1);
                    return Err(refusal(RefusalKind::Rpm, s, Some(wait), numbers, rate));
                }
            }
        }
        let requests = Window::tighter(req_windows[0], req_windows[1]);

        let mut tok_windows = [None, None];
        for (i, s) in subjects.iter().enumerate() {
            let Some(s) = s else { continue };
            match s.take_tokens(req.est_tokens, now) {
                Ok(w) => {
                    t.tokens_held[i] = w.is_some();
                    tok_windows[i] = w;
                }
                Err((wait, w)) => {
                    drop(t); // refunds the key's tokens before we report the team's window
                    let rate = RateInfo {
                        requests,
                        tokens: peek_tokens(&subjects),
                    };
                    let used = w.limit.saturating_sub(w.remaining);
                    let numbers = (w.limit, used, req.est_tokens);
                    return Err(refusal(RefusalKind::Tpm, s, Some(wait), numbers, rate));
                }
            }
        }
        let rate = RateInfo {
            requests,
            tokens: Window::tighter(tok_windows[0], tok_windows[1]),
        };

        for (i, s) in subjects.iter().enumerate() {
            let Some(s) = s else { continue };
            if let Err((limit, used)) = s.acquire_permit() {
                drop(t);
                let rate = RateInfo {
                    requests,
                    tokens: peek_tokens(&subjects),
                };
                // Parallel slots free up as requests finish; suggest a short back-off.
                let numbers = (limit, used, 1);
                let retry = Some(Duration::from_secs(1));
                return Err(refusal(RefusalKind::Parallel, s, retry, numbers, rate));
            }
            t.permit_held[i] = true;
        }

        let now_s = clock.unix_secs();
        for (i, s) in subjects.iter().enumerate() {
            let Some(s) = s else { continue };
            if let Err((budget, used)) = s.reserve(req.reserve_nanos, now_s) {
                drop(t);
                let rate = RateInfo {
                    requests,
                    tokens: peek_tokens(&subjects),
                };
                return Err(policy::refusal(
                    RefusalKind::Budget,
                    (s.kind, &s.name),
                    None,
                    (budget, used, req.reserve_nanos),
                    s.spec.period.end_of(now_s),
                    rate,
                ));
            }
            t.reserve_held[i] = true;
        }
        Ok(Admission::new(Box::new(t), rate))
    }

    /// Limits and usage for a key and its team.
    pub fn status(&self, key: &str) -> Option<KeyStatus> {
        let (k, team) = self.inner.table.read().entry(key).ok()?;
        Some(KeyStatus {
            key: k.status(),
            team: team.map(|t| t.status()),
        })
    }

    /// Limits and usage of one team (for admin views).
    pub fn team_status(&self, team: &str) -> Option<SubjectStatus> {
        let t = self.inner.table.read().teams.get(team).cloned()?;
        Some(t.status())
    }

    /// Hot reload: subjects that still exist keep spend, in-flight, token and (if their rpm is
    /// unchanged) request state. A changed budget period re-reads spend from the ledger.
    pub fn reconfigure(&self, specs: &LimitSpecs) -> Result<(), LimitConfigError> {
        let _serial = self.inner.reconfigure.lock();
        let old = self.inner.table.read().clone();
        let (table, period_changed) = build_table(specs, &old, &self.inner.shared)?;
        let table = Arc::new(table);
        *self.inner.table.write() = table.clone();
        if let (Some(ledger), false) = (&self.inner.shared.ledger, period_changed.is_empty()) {
            if let Err(e) = ledger.flush() {
                tracing::warn!(error = %e, "ledger flush before reloading spend failed");
            }
            for (kind, name) in period_changed {
                let s = match kind {
                    SubjectKind::Key => table.keys.get(&name).map(|e| &e.key),
                    SubjectKind::Team => table.teams.get(&name),
                };
                if let Some(s) = s {
                    if let Err(e) = load_subject(s, ledger.as_ref()) {
                        tracing::warn!(%kind, name, error = %e, "could not reload spend after period change");
                    }
                }
            }
        }
        Ok(())
    }

    /// Settlements whose cost exceeded their reservation, since start.
    pub fn overrun_count(&self) -> u64 {
        self.inner.shared.overruns.load(Ordering::Relaxed)
    }

    /// The clock this limiter reads.
    pub fn clock(&self) -> &Clock {
        &self.inner.shared.clock
    }
}

impl LimitStore for Limiter {
    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, AdmitError> {
        Limiter::admit(self, req)
    }

    async fn status(&self, key: &str) -> Option<KeyStatus> {
        Limiter::status(self, key)
    }

    fn reconfigure(&self, specs: &LimitSpecs) -> Result<(), LimitConfigError> {
        Limiter::reconfigure(self, specs)
    }
}

fn refusal(
    kind: RefusalKind,
    s: &Subject,
    retry_after: Option<Duration>,
    numbers: (u64, u64, u64),
    rate: RateInfo,
) -> AdmitError {
    policy::refusal(kind, (s.kind, &s.name), retry_after, numbers, None, rate)
}

/// Sets a subject's current-period spend from the ledger.
fn load_subject(s: &Subject, ledger: &dyn SpendLedger) -> Result<(), StoreError> {
    let now_s = s.shared.clock.unix_secs();
    let start = s.spec.period.start_of(now_s);
    let spent = ledger.spent_since(s.kind, &s.name, start.saturating_mul(1000))?;
    let mut b = s.budget.lock();
    b.roll(now_s);
    if b.period_start == start {
        b.spent = spent;
    }
    Ok(())
}

type PeriodChanges = Vec<(SubjectKind, String)>;

fn build_table(
    specs: &LimitSpecs,
    old: &Table,
    shared: &Arc<Shared>,
) -> Result<(Table, PeriodChanges), LimitConfigError> {
    // `KeyTable::build` validates everything first: building mutates survivors' shared state.
    let mut changed = Vec::new();
    let table = KeyTable::build(specs, |kind, name, spec| {
        let prev = match kind {
            SubjectKind::Team => old.teams.get(name).map(Arc::as_ref),
            SubjectKind::Key => old.keys.get(name).map(|e| e.key.as_ref()),
        };
        let (s, period_changed) = Subject::build(kind, name, spec, prev, shared)?;
        if period_changed {
            changed.push((kind, name.to_owned()));
        }
        Ok::<_, LimitConfigError>(s)
    })?;
    Ok((table, changed))
}
