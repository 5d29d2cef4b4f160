//! Async orchestrators over an abstract "call one upstream" closure.
//!
//! Dropping a future returned by the closure must cancel its upstream request (true for
//! reqwest); `run_vote` relies on that to stop stragglers once the vote is decided.

use std::future::Future;
use std::sync::LazyLock;

use futures::stream::{FuturesUnordered, StreamExt};
use regex::Regex;
use serde_json::{json, Value};

use super::config::{CompiledCascade, CompiledVote, OnInsufficient, Strategy};
use super::gates::{completion_text, GateFailure, RequestGates};
use super::tally::{Status, Tally, ThresholdResult};

pub use crate::usage::Usage;

/// What the closure returns for one finished upstream call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResult {
    /// The upstream chat.completion body.
    pub completion: Value,
    /// Its usage.
    pub usage: Usage,
}

/// Why a call is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// One of the `n` voters.
    Candidate,
    /// The best_of judge.
    Judge,
    /// The `on_insufficient = "single_call"` retry.
    Fallback,
}

/// Parameters of one call the closure must make.
#[derive(Debug, Clone, PartialEq)]
pub struct CallSpec {
    /// 0..n for candidates, n for the judge / fallback call.
    pub index: usize,
    /// Why the call is made.
    pub kind: CallKind,
    /// Model to call; `None` = the routed model.
    pub model: Option<String>,
    /// Index into `vote.models` for candidates, else `None`.
    pub model_index: Option<usize>,
    /// Temperature override; `None` = keep the request's.
    pub temperature: Option<f64>,
    /// Judge only: send these messages instead of the client's, non-streaming, no tools.
    pub messages: Option<Vec<Value>>,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// Answered, usable for comparison.
    Ok,
    /// Answered, but extraction failed (not counted as valid).
    Invalid,
    /// The closure returned an error.
    Failed,
    /// Dropped before finishing (the caller charges partial generation).
    Cancelled,
}

/// Per-call bookkeeping, for per-model metering.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    /// Same as `CallSpec::index`.
    pub index: usize,
    /// Same as `CallSpec::kind`.
    pub kind: CallKind,
    /// Same as `CallSpec::model`.
    pub model: Option<String>,
    /// Same as `CallSpec::model_index`.
    pub model_index: Option<usize>,
    /// Outcome.
    pub state: CallState,
    /// Usage reported by the closure (zero unless the call completed).
    pub usage: Usage,
}

/// What the best_of judge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JudgeVerdict {
    /// Picked candidate number (1-based, candidates numbered by ascending call index).
    Chose(usize),
    /// Reply unparseable: the first valid candidate was used.
    Unparsed,
    /// Judge call failed: the first valid candidate was used.
    Failed,
    /// Only one valid candidate: no judge call made.
    Skipped,
}

/// Result of `run_vote`.
#[derive(Debug, Clone, PartialEq)]
pub struct VoteOutcome {
    /// The completion to return to the client (the winner's, unmodified).
    pub completion: Value,
    /// Call index of the winner (`n` for the fallback call).
    pub winner: usize,
    /// Strategy used.
    pub strategy: Strategy,
    /// Answers agreeing with the winner (threshold: answers on the winning side).
    pub agree: u32,
    /// Configured `n`.
    pub of: u32,
    /// Usable candidate answers.
    pub valid: u32,
    /// Threshold decision.
    pub threshold: Option<ThresholdResult>,
    /// best_of judge verdict.
    pub judge: Option<JudgeVerdict>,
    /// True when `on_insufficient = "single_call"` kicked in.
    pub fallback: bool,
    /// Candidate calls dropped after the outcome was decided.
    pub cancelled: u32,
    /// Sum over completed calls (candidates, judge, fallback).
    pub usage: Usage,
    /// Every call made, candidates first in index order.
    pub calls: Vec<CallRecord>,
}

impl VoteOutcome {
    /// Value for a response header describing the vote.
    pub fn header(&self) -> String {
        let s = self.strategy.as_str();
        if self.fallback {
            return format!(
                "strategy={s} valid={} of={} fallback=single_call",
                self.valid, self.of
            );
        }
        match (self.strategy, self.threshold, self.judge) {
            (Strategy::Threshold, Some(t), _) => format!(
                "strategy={s} yes={} of={} k={} flagged={} cancelled={}",
                t.yes, self.of, t.k, t.flagged, self.cancelled
            ),
            (Strategy::BestOf, _, Some(j)) => {
                let j = match j {
                    JudgeVerdict::Chose(_) => "ok",
                    JudgeVerdict::Unparsed => "unparsed",
                    JudgeVerdict::Failed => "failed",
                    JudgeVerdict::Skipped => "skipped",
                };
                format!(
                    "strategy={s} winner={} agree={} valid={} of={} judge={j} cancelled={}",
                    self.winner, self.agree, self.valid, self.of, self.cancelled
                )
            }
            _ => format!(
                "strategy={s} agree={} of={} cancelled={}",
                self.agree, self.of, self.cancelled
            ),
        }
    }
}

/// Vote failures; `E` is the closure's error type.
#[derive(Debug, thiserror::Error)]
pub enum VoteError<E> {
    /// Fewer than `min_valid` usable answers and `on_insufficient = "error"`.
    #[error("vote: only {valid} valid answers, {needed} needed")]
    InsufficientValid {
        /// Usable answers.
        valid: u32,
        /// Required answers.
        needed: u32,
        /// Errors of the failed calls, in completion order.
        errors: Vec<E>,
    },
    /// Too few usable answers and the single-call fallback failed too.
    #[error("vote: only {valid} valid answers, {needed} needed; fallback call failed")]
    FallbackFailed {
        /// Usable answers.
        valid: u32,
        /// Required answers.
        needed: u32,
        /// The fallback call's error.
        error: E,
    },
}

fn record(spec: &CallSpec, state: CallState) -> CallRecord {
    CallRecord {
        index: spec.index,
        kind: spec.kind,
        model: spec.model.clone(),
        model_index: spec.model_index,
        state,
        usage: Usage::default(),
    }
}

impl CompiledVote {
    /// Spec of candidate call `i`.
    pub fn candidate_spec(&self, i: usize) -> CallSpec {
        let (model_index, temperature) = self.call_params(i);
        CallSpec {
            index: i,
            kind: CallKind::Candidate,
            model: model_index.and_then(|m| self.cfg.models.get(m).cloned()),
            model_index,
            temperature,
            messages: None,
        }
    }
}

/// Run `cfg.n` calls concurrently and combine them; see the module docs of `tally` for
/// how answers are compared. `question` (the user's request as text) is only shown to the
/// best_of judge. Outstanding calls are dropped as soon as the outcome is decided.
pub async fn run_vote<F, Fut, E>(
    cfg: &CompiledVote,
    question: &str,
    mut call: F,
) -> Result<VoteOutcome, VoteError<E>>
where
    F: FnMut(CallSpec) -> Fut,
    Fut: Future<Output = Result<CallResult, E>>,
{
    let n = cfg.cfg.n as usize;
    let mut calls = Vec::with_capacity(n + 1);
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        let spec = cfg.candidate_spec(i);
        calls.push(record(&spec, CallState::Cancelled));
        let fut = call(spec);
        pending.push(async move { (i, fut.await) });
    }

    let mut tally = Tally::new(cfg);
    let mut completions: Vec<Option<Value>> = vec![None; n];
    let mut errors = Vec::new();
    let mut usage = Usage::default();
    while let Some((i, res)) = pending.next().await {
        let model = calls[i].model_index;
        let status = match res {
            Ok(r) => {
                usage += r.usage;
                calls[i].usage = r.usage;
                let before = tally.valid();
                let st = tally.push(i, model, completion_text(&r.completion).as_deref());
                calls[i].state = if tally.valid() > before {
                    CallState::Ok
                } else {
                    CallState::Invalid
                };
                completions[i] = Some(r.completion);
                st
            }
            Err(e) => {
                calls[i].state = CallState::Failed;
                errors.push(e);
                tally.push(i, model, None)
            }
        };
        if status == Status::Decided {
            break;
        }
    }
    let cancelled = pending.len() as u32;
    // Dropping the stream drops the outstanding futures, cancelling their requests.
    drop(pending);

    let result = match tally.finish() {
        Ok(r) => r,
        Err(ins) => {
            if cfg.cfg.on_insufficient == OnInsufficient::Error {
                return Err(VoteError::InsufficientValid {
                    valid: ins.valid,
                    needed: ins.needed,
                    errors,
                });
            }
            let spec = CallSpec {
                index: n,
                kind: CallKind::Fallback,
                model: None,
                model_index: None,
                temperature: None,
                messages: None,
            };
            let mut rec = record(&spec, CallState::Failed);
            return match call(spec).await {
                Ok(r) => {
                    usage += r.usage;
                    rec.state = CallState::Ok;
                    rec.usage = r.usage;
                    calls.push(rec);
                    Ok(VoteOutcome {
                        completion: r.completion,
                        winner: n,
                        strategy: cfg.cfg.strategy,
                        agree: 0,
                        of: cfg.cfg.n,
                        valid: ins.valid,
                        threshold: None,
                        judge: None,
                        fallback: true,
                        cancelled,
                        usage,
                        calls,
                    })
                }
                Err(error) => Err(VoteError::FallbackFailed {
                    valid: ins.valid,
                    needed: ins.needed,
                    error,
                }),
            };
        }
    };

    let mut winner = result.winner;
    let mut agree = result.agree;
    let mut judge = None;
    if cfg.cfg.strategy == Strategy::BestOf {
        let cands = tally.valid_calls();
        let verdict = if cands.len() <= 1 {
            JudgeVerdict::Skipped
        } else {
            let texts: Vec<String> = cands
                .iter()
                .map(|&c| {
                    completions[c]
                        .as_ref()
                        .and_then(completion_text)
                        .unwrap_or_default()
                })
                .collect();
            let spec = CallSpec {
                index: n,
                kind: CallKind::Judge,
                model: cfg.cfg.judge.clone(),
                model_index: None,
                temperature: Some(0.0),
                messages: Some(build_judge_messages(question, &cfg.rubric, &texts)),
            };
            let mut rec = record(&spec, CallState::Failed);
            let verdict = match call(spec).await {
                Ok(r) => {
                    usage += r.usage;
                    rec.usage = r.usage;
                    rec.state = CallState::Ok;
                    let reply = completion_text(&r.completion).unwrap_or_default();
                    match parse_judge_choice(&reply, texts.len()) {
                        Some(k) => JudgeVerdict::Chose(k),
                        None => {
                            rec.state = CallState::Invalid;
                            tracing::warn!(reply = %reply.chars().take(200).collect::<String>(), "best_of: unparseable judge reply; using first valid candidate");
                            JudgeVerdict::Unparsed
                        }
                    }
                }
                Err(_) => {
                    tracing::warn!("best_of: judge call failed; using first valid candidate");
                    JudgeVerdict::Failed
                }
            };
            calls.push(rec);
            verdict
        };
        let pick = match verdict {
            JudgeVerdict::Chose(k) => k - 1,
            _ => 0,
        };
        if let Some(&c) = cands.get(pick) {
            winner = c;
            agree = tally.agree_with(c);
        }
        judge = Some(verdict);
    }

    let completion = completions
        .get_mut(winner)
        .and_then(Option::take)
        .unwrap_or(Value::Null);
    Ok(VoteOutcome {
        completion,
        winner,
        strategy: result.strategy,
        agree,
        of: result.of,
        valid: result.valid,
        threshold: result.threshold,
        judge,
        fallback: false,
        cancelled,
        usage,
        calls,
    })
}

/// Messages for the best_of judge: rubric in the system prompt, numbered candidates.
pub fn build_judge_messages(question: &str, rubric: &str, candidates: &[String]) -> Vec<Value> {
    let m = candidates.len();
    let system = format!(
        "You are an impartial judge comparing candidate answers to the same request.\n\
         {rubric}\n\
         Reply with only the number of the best candidate (1-{m}) and nothing else."
    );
    let mut user = format!("Request:\n<<<\n{question}\n>>>\n");
    for (i, c) in candidates.iter().enumerate() {
        user.push_str(&format!("\nCandidate {}:\n<<<\n{c}\n>>>\n", i + 1));
    }
    user.push_str(&format!(
        "\nWhich candidate is best? Reply with a single number from 1 to {m}."
    ));
    vec![
        json!({"role": "system", "content": system}),
        json!({"role": "user", "content": user}),
    ]
}

static CANDIDATE_REF: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:candidate|answer|option|response)\s*(?:#|no\.?|number)?\s*(\d+)").ok()
});
static INTEGER: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\d+").ok());

/// Parse the judge's reply into a 1-based candidate number within `1..=m`.
///
/// Accepts a bare number ("2", "**2**", "2."), JSON like `{"choice": 2}`, consistent
/// references ("Candidate 2 is best"), or a reply mentioning exactly one in-range number.
/// Anything ambiguous yields `None`. A leading `<think>…</think>` block is ignored.
pub fn parse_judge_choice(reply: &str, m: usize) -> Option<usize> {
    let in_range = |k: usize| (1..=m).contains(&k).then_some(k);
    let text = match reply.rfind("</think>") {
        Some(p) => &reply[p + "</think>".len()..],
        None => reply,
    };
    let bare = text.trim().trim_matches(|c: char| !c.is_alphanumeric());
    if let Ok(k) = bare.parse::<usize>() {
        return in_range(k);
    }
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(text.trim()) {
        for key in ["choice", "best", "winner", "candidate", "answer"] {
            let k = match o.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|v| v as usize),
                Some(Value::String(s)) => s.trim().parse().ok(),
                _ => None,
            };
            if let Some(k) = k {
                return in_range(k);
            }
        }
    }
    let distinct = |it: &mut dyn Iterator<Item = usize>| {
        let mut found: Option<usize> = None;
        for k in it.filter_map(in_range) {
            match found {
                Some(f) if f != k => return Err(()),
                _ => found = Some(k),
            }
        }
        Ok(found)
    };
    if let Some(re) = CANDIDATE_REF.as_ref() {
        let mut refs = re
            .captures_iter(text)
            .filter_map(|c| c.get(1)?.as_str().parse::<usize>().ok());
        match distinct(&mut refs) {
            Ok(Some(k)) => return Some(k),
            Err(()) => return None,
            Ok(None) => {}
        }
    }
    let re = INTEGER.as_ref()?;
    let mut nums = re
        .find_iter(text)
        .filter_map(|m| m.as_str().parse::<usize>().ok());
    distinct(&mut nums).ok().flatten()
}

/// How one cascade tier went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierResult {
    /// Answer passed every gate.
    Passed,
    /// Answer failed this gate.
    GateFailed(GateFailure),
    /// The closure returned an error.
    Error,
}

/// One tried tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierAttempt {
    /// Index into `tiers`.
    pub tier: usize,
    /// Tier name.
    pub name: String,
    /// Outcome.
    pub result: TierResult,
    /// Usage of this tier's call.
    pub usage: Usage,
}

/// Result of `run_cascade`.
#[derive(Debug, Clone, PartialEq)]
pub struct CascadeOutcome {
    /// Completion to return: the first passing answer, or the last answer received.
    pub completion: Value,
    /// Tier index that produced `completion`.
    pub tier: usize,
    /// False when no tier passed (then `completion` is the last answer received).
    pub passed: bool,
    /// Gate failure of `completion` when `passed` is false.
    pub gate_failure: Option<GateFailure>,
    /// Every tier tried, in order.
    pub attempts: Vec<TierAttempt>,
    /// Sum over all tiers' calls.
    pub usage: Usage,
}

impl CascadeOutcome {
    /// Value for a response header, e.g. `tried=small,large passed=large gate_failed=json_schema`.
    pub fn header(&self) -> String {
        let tried: Vec<&str> = self.attempts.iter().map(|a| a.name.as_str()).collect();
        let failed: Vec<&str> = self
            .attempts
            .iter()
            .filter_map(|a| match &a.result {
                TierResult::Passed => None,
                TierResult::GateFailed(g) => Some(g.name()),
                TierResult::Error => Some("error"),
            })
            .collect();
        let passed = if self.passed {
            self.attempts
                .iter()
                .find(|a| a.result == TierResult::Passed)
                .map_or("none", |a| a.name.as_str())
        } else {
            "none"
        };
        let mut h = format!("tried={} passed={passed}", tried.join(","));
        if !failed.is_empty() {
            h.push_str(" gate_failed=");
            h.push_str(&failed.join(","));
        }
        h
    }
}

/// Cascade failures; `E` is the closure's error type.
#[derive(Debug, thiserror::Error)]
pub enum CascadeError<E> {
    /// No tier produced an answer at all.
    #[error("cascade: every tier failed")]
    AllFailed {
        /// Per-tier errors, in tier order.
        errors: Vec<E>,
    },
}

/// Try tiers in order (`call(tier_index)`), returning the first answer passing the gates.
/// When none passes, the last answer received is returned with `passed = false` (the
/// client still gets the best effort; the header says `passed=none`). A tier whose call
/// errors is skipped; only when every tier errors is `CascadeError::AllFailed` returned.
pub async fn run_cascade<F, Fut, E>(
    cfg: &CompiledCascade,
    request: &Value,
    mut call: F,
) -> Result<CascadeOutcome, CascadeError<E>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<CallResult, E>>,
{
    let gates = RequestGates::new(request, &cfg.gates);
    let mut attempts = Vec::with_capacity(cfg.tiers.len());
    let mut errors = Vec::new();
    let mut usage = Usage::default();
    let mut last: Option<(usize, Value, GateFailure)> = None;
    for (tier, name) in cfg.tiers.iter().enumerate() {
        match call(tier).await {
            Ok(r) => {
                usage += r.usage;
                let verdict = gates.check(&r.completion);
                attempts.push(TierAttempt {
                    tier,
                    name: name.clone(),
                    result: match &verdict {
                        Ok(()) => TierResult::Passed,
                        Err(g) => TierResult::GateFailed(g.clone()),
                    },
                    usage: r.usage,
                });
                match verdict {
                    Ok(()) => {
                        return Ok(CascadeOutcome {
                            completion: r.completion,
                            tier,
                            passed: true,
                            gate_failure: None,
                            attempts,
                            usage,
                        })
                    }
                    Err(g) => {
                        tracing::debug!(tier = %name, gate = g.name(), "cascade: gate failed, escalating");
                        last = Some((tier, r.completion, g));
                    }
                }
            }
            Err(e) => {
                errors.push(e);
                attempts.push(TierAttempt {
                    tier,
                    name: name.clone(),
                    result: TierResult::Error,
                    usage: Usage::default(),
                });
            }
        }
    }
    match last {
        Some((tier, completion, g)) => Ok(CascadeOutcome {
            completion,
            tier,
            passed: false,
            gate_failure: Some(g),
            attempts,
            usage,
        }),
        None => Err(CascadeError::AllFailed { errors }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "run_tests.rs"]
mod tests;
