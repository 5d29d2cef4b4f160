//! The limit policy, written once for every store: the key table (keys, declared and implicit
//! teams), validation, refusals, settle outcome and overrun accounting, spend records, and the
//! status view. A store only keeps counters; what they mean is decided here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{
    nanos_to_usd_string, AdmitError, LimitConfigError, LimitSpec, LimitSpecs, Period, RateInfo,
    Refusal, RefusalKind, SettleOutcome, Settlement, SubjectKind, SubjectStatus, Window,
};
use crate::store::SpendRecord;

/// A key's own subject and its team's.
pub(super) struct KeyEntry<S> {
    pub key: Arc<S>,
    pub team: Option<Arc<S>>,
}

/// Every key and team of a store, by name.
pub(super) struct KeyTable<S> {
    pub keys: HashMap<String, KeyEntry<S>>,
    pub teams: HashMap<String, Arc<S>>,
}

impl<S> Default for KeyTable<S> {
    fn default() -> Self {
        Self {
            keys: HashMap::new(),
            teams: HashMap::new(),
        }
    }
}

impl<S> KeyTable<S> {
    /// Validates `specs`, then builds one subject per team (declared ones, and teams named by a
    /// key without a spec of their own, which are tracked but unlimited) and per key.
    pub fn build<E: From<LimitConfigError>>(
        specs: &LimitSpecs,
        mut make: impl FnMut(SubjectKind, &str, &LimitSpec) -> Result<S, E>,
    ) -> Result<Self, E> {
        validate(specs)?;
        let unlimited = LimitSpec::default();
        let implicit = specs
            .keys
            .values()
            .filter_map(|k| k.team.as_deref())
            .filter(|t| !specs.teams.contains_key(*t))
            .map(|t| (t, &unlimited));
        let declared = specs.teams.iter().map(|(n, s)| (n.as_str(), s));
        let mut teams: HashMap<String, Arc<S>> = HashMap::new();
        for (name, spec) in declared.chain(implicit) {
            if !teams.contains_key(name) {
                teams.insert(
                    name.to_owned(),
                    Arc::new(make(SubjectKind::Team, name, spec)?),
                );
            }
        }
        let mut keys = HashMap::with_capacity(specs.keys.len());
        for (name, ks) in &specs.keys {
            let key = Arc::new(make(SubjectKind::Key, name, &ks.limits)?);
            let team = ks.team.as_ref().and_then(|t| teams.get(t).cloned());
            keys.insert(name.clone(), KeyEntry { key, team });
        }
        Ok(Self { keys, teams })
    }

    /// The key's and its team's subjects.
    pub fn entry(&self, key: &str) -> Result<(Arc<S>, Option<Arc<S>>), AdmitError> {
        self.keys
            .get(key)
            .map(|e| (e.key.clone(), e.team.clone()))
            .ok_or_else(|| AdmitError::UnknownKey(key.to_owned()))
    }
}

/// Rejects rate limits of zero (a zero budget is how a key is blocked).
pub(super) fn validate(specs: &LimitSpecs) -> Result<(), LimitConfigError> {
    let all = specs
        .teams
        .iter()
        .map(|(n, s)| (SubjectKind::Team, n, s))
        .chain(
            specs
                .keys
                .iter()
                .map(|(n, k)| (SubjectKind::Key, n, &k.limits)),
        );
    for (kind, name, spec) in all {
        let field = match spec {
            LimitSpec { rpm: Some(0), .. } => "rpm",
            LimitSpec { tpm: Some(0), .. } => "tpm",
            LimitSpec {
                max_parallel: Some(0),
                ..
            } => "max_parallel",
            _ => continue,
        };
        return Err(LimitConfigError::Zero {
            kind,
            name: name.clone(),
            field,
        });
    }
    Ok(())
}

/// A refusal by `who` (kind, name); `numbers` are (limit, used, requested). Budgets carry no
/// retry time: they only reset with the period, given as `period_end`.
pub(super) fn refusal(
    kind: RefusalKind,
    who: (SubjectKind, &str),
    retry_after: Option<Duration>,
    numbers: (u64, u64, u64),
    period_end: Option<i64>,
    rate: RateInfo,
) -> AdmitError {
    let (limit, used, requested) = numbers;
    AdmitError::Refused(Box::new(Refusal {
        kind,
        subject_kind: who.0,
        subject: who.1.to_owned(),
        retry_after: if kind == RefusalKind::Budget {
            None
        } else {
            retry_after
        },
        limit,
        used,
        requested,
        period_end_unix: period_end,
        rate,
    }))
}

/// The outcome of settling `reserve` with `s`: the full cost is charged even above the
/// reservation (the provider's bill is authoritative); an overrun is counted and logged.
pub(super) fn settle_outcome(
    overruns: &AtomicU64,
    key: &str,
    reserve: u64,
    s: &Settlement<'_>,
) -> SettleOutcome {
    let overrun = s.cost_nanos.saturating_sub(reserve);
    if overrun > 0 {
        overruns.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            key,
            request_id = s.request_id,
            model = s.model,
            reserved_nanos = reserve,
            cost_nanos = s.cost_nanos,
            "actual cost exceeded the reservation; charged in full"
        );
    }
    SettleOutcome {
        charged_nanos: s.cost_nanos,
        reserved_nanos: reserve,
        overrun_nanos: overrun,
    }
}

/// The ledger record of a settlement.
pub(super) fn spend_record(
    ts_unix_ms: i64,
    key: &Arc<str>,
    team: Option<&Arc<str>>,
    s: &Settlement<'_>,
) -> SpendRecord {
    SpendRecord {
        ts_unix_ms,
        key: key.clone(),
        team: team.cloned(),
        model: s.model.to_owned(),
        prompt_tokens: s.prompt_tokens,
        completion_tokens: s.completion_tokens,
        cached_tokens: s.cached_tokens,
        cost_nanos: s.cost_nanos,
        estimated: s.estimated,
        request_id: s.request_id.to_owned(),
    }
}

/// A subject's counters as a store reads them.
pub(super) struct Counters {
    pub in_flight: u32,
    pub spent: u64,
    pub reserved: u64,
    pub period_start: i64,
    pub period_end: Option<i64>,
    pub tokens: Option<Window>,
}

/// The status view of a subject's counters.
pub(super) fn subject_status(
    kind: SubjectKind,
    name: &str,
    spec: &LimitSpec,
    c: Counters,
) -> SubjectStatus {
    let remaining = spec
        .budget_nanos
        .map(|budget| budget.saturating_sub(c.spent.saturating_add(c.reserved)));
    SubjectStatus {
        kind,
        name: name.to_owned(),
        limits: spec.clone(),
        in_flight: c.in_flight,
        spent_nanos: c.spent,
        reserved_nanos: c.reserved,
        remaining_nanos: remaining,
        spent_usd: nanos_to_usd_string(c.spent),
        remaining_usd: remaining.map(nanos_to_usd_string),
        period_start_unix: (spec.period != Period::Total).then_some(c.period_start),
        period_end_unix: c.period_end.filter(|_| spec.period != Period::Total),
        tokens: c.tokens,
    }
}
