//! Pure, incremental vote counting with quorum early exit.
//!
//! Comparison keys: the answer text goes through the JSON pointer (answer parsed as JSON,
//! a surrounding ``` fence tolerated; string values used as-is, other values as compact JSON),
//! then the regex (capture group 1, or the whole match when the regex has no groups), then
//! normalisation. An answer where any step fails (not JSON, pointer missing, no regex match)
//! or whose key ends up empty is *invalid*: it takes part in no group and does not count
//! toward `min_valid`, exactly like a failed call.

use super::config::{normalize_text, CompiledVote, Strategy, TieRule, YesMatcher};

/// Whether the outcome can still change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// More answers could change the outcome.
    Pending,
    /// The outcome is fixed; outstanding calls may be cancelled.
    Decided,
}

/// Threshold-specific part of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThresholdResult {
    /// Whether at least `k` answers said yes.
    pub flagged: bool,
    /// Number of yes answers seen.
    pub yes: u32,
    /// The configured `k`.
    pub k: u32,
}

/// Final tally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TallyResult {
    /// Strategy used.
    pub strategy: Strategy,
    /// Call index whose answer is returned.
    pub winner: usize,
    /// Answers agreeing with the winner (threshold: answers on the winning side).
    pub agree: u32,
    /// Configured `n`.
    pub of: u32,
    /// Usable answers seen.
    pub valid: u32,
    /// Answers (ok or not) seen.
    pub received: u32,
    /// Threshold decision, for `Strategy::Threshold`.
    pub threshold: Option<ThresholdResult>,
}

/// Fewer usable answers than `min_valid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("only {valid} valid answers, {needed} needed")]
pub struct Insufficient {
    /// Usable answers seen.
    pub valid: u32,
    /// Configured/resolved `min_valid`.
    pub needed: u32,
}

#[derive(Debug, Clone)]
struct Entry {
    call: usize,
    model: Option<usize>,
    group: usize,
    is_yes: bool,
}

#[derive(Debug, Clone)]
struct Group {
    key: String,
    members: Vec<usize>, // indices into `entries`, arrival order
}

/// Incremental tally over `n` calls.
#[derive(Debug, Clone)]
pub struct Tally<'a> {
    cfg: &'a CompiledVote,
    received: u32,
    entries: Vec<Entry>,
    groups: Vec<Group>,
    yes: u32,
}

fn strip_fence(s: &str) -> &str {
    let t = s.trim();
    if let Some(rest) = t.strip_prefix("```") {
        if let Some(body) = rest.strip_suffix("```") {
            // Drop an optional language tag on the opening fence line.
            return match body.split_once('\n') {
                Some((_lang, b)) => b.trim(),
                None => body.trim(),
            };
        }
    }
    t
}

/// Comparison key for one answer, or `None` when it is invalid for comparison.
pub fn comparison_key(cfg: &CompiledVote, answer: &str) -> Option<String> {
    let mut text: String = match cfg.cfg.compare.json_pointer.as_deref() {
        Some(ptr) => {
            let v: serde_json::Value = serde_json::from_str(strip_fence(answer)).ok()?;
            match v.pointer(ptr)? {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }
        }
        None => answer.to_string(),
    };
    if let Some(re) = &cfg.compare_regex {
        let caps = re.captures(&text)?;
        let m = if re.captures_len() > 1 {
            caps.get(1)?
        } else {
            caps.get(0)?
        };
        text = m.as_str().to_string();
    }
    let key = if cfg.cfg.compare.normalize {
        normalize_text(&text)
    } else {
        text
    };
    (!key.trim().is_empty()).then_some(key)
}

fn model_rank(m: Option<usize>) -> usize {
    m.unwrap_or(usize::MAX)
}

impl<'a> Tally<'a> {
    /// Empty tally for `cfg.cfg.n` calls.
    pub fn new(cfg: &'a CompiledVote) -> Self {
        Tally {
            cfg,
            received: 0,
            entries: Vec::new(),
            groups: Vec::new(),
            yes: 0,
        }
    }

    fn n(&self) -> u32 {
        self.cfg.cfg.n
    }

    /// Calls not yet reported.
    pub fn remaining(&self) -> u32 {
        self.n().saturating_sub(self.received)
    }

    /// Usable answers so far.
    pub fn valid(&self) -> u32 {
        self.entries.len() as u32
    }

    /// Record call `call` (made to `model`, an index into `models`) with its content,
    /// `None` for a failed call. Returns whether the outcome is now decided.
    pub fn push(&mut self, call: usize, model: Option<usize>, content: Option<&str>) -> Status {
        self.received = self.received.saturating_add(1);
        if let Some(key) = content.and_then(|c| comparison_key(self.cfg, c)) {
            let is_yes = match &self.cfg.yes {
                Some(YesMatcher::Pattern(re)) => re.is_match(&key),
                Some(YesMatcher::Equals(e)) => key == *e,
                None => false,
            };
            if is_yes {
                self.yes += 1;
            }
            let idx = self.entries.len();
            let group = match self.groups.iter().position(|g| g.key == key) {
                Some(g) => {
                    self.groups[g].members.push(idx);
                    g
                }
                None => {
                    self.groups.push(Group {
                        key,
                        members: vec![idx],
                    });
                    self.groups.len() - 1
                }
            };
            self.entries.push(Entry {
                call,
                model,
                group,
                is_yes,
            });
        }
        self.status()
    }

    /// Whether the outcome is decided given the calls still outstanding.
    pub fn status(&self) -> Status {
        let remaining = self.remaining();
        let valid = self.valid();
        let min_valid = self.cfg.min_valid;
        if remaining == 0 || valid + remaining < min_valid {
            return Status::Decided;
        }
        if valid < min_valid {
            return Status::Pending;
        }
        let decided = match self.cfg.cfg.strategy {
            Strategy::Majority => {
                let (mut first, mut second) = (0u32, 0u32);
                for g in &self.groups {
                    let c = g.members.len() as u32;
                    if c > first {
                        second = first;
                        first = c;
                    } else if c > second {
                        second = c;
                    }
                }
                first > second + remaining
            }
            Strategy::Threshold => self.yes >= self.cfg.k || self.yes + remaining < self.cfg.k,
            Strategy::BestOf => false,
        };
        if decided {
            Status::Decided
        } else {
            Status::Pending
        }
    }

    /// Pick one entry among `candidates` (entry indices, arrival order) by the tie rule.
    fn pick(&self, candidates: impl Iterator<Item = usize>) -> Option<usize> {
        match self.cfg.cfg.tie {
            TieRule::First => candidates.min(),
            // min_by_key keeps the first of equals, so arrival order breaks remaining ties.
            TieRule::MostCapable => candidates.min_by_key(|&e| model_rank(self.entries[e].model)),
        }
    }

    /// Size of the agreement group of call `call` (0 if it was not a valid answer).
    pub fn agree_with(&self, call: usize) -> u32 {
        self.entries
            .iter()
            .find(|e| e.call == call)
            .map_or(0, |e| self.groups[e.group].members.len() as u32)
    }

    /// Call indices of the valid answers, ascending.
    pub fn valid_calls(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.entries.iter().map(|e| e.call).collect();
        v.sort_unstable();
        v
    }

    /// Outcome over the answers seen so far.
    pub fn finish(&self) -> Result<TallyResult, Insufficient> {
        let valid = self.valid();
        if valid < self.cfg.min_valid || valid == 0 {
            return Err(Insufficient {
                valid,
                needed: self.cfg.min_valid.max(1),
            });
        }
        let strategy = self.cfg.cfg.strategy;
        let base = |winner: usize, agree: u32, threshold| TallyResult {
            strategy,
            winner,
            agree,
            of: self.n(),
            valid,
            received: self.received,
            threshold,
        };
        let insufficient = Insufficient {
            valid,
            needed: self.cfg.min_valid,
        };
        match strategy {
            Strategy::Majority | Strategy::BestOf => {
                let top = self
                    .groups
                    .iter()
                    .map(|g| g.members.len())
                    .max()
                    .unwrap_or(0);
                let tied: Vec<&Group> = self
                    .groups
                    .iter()
                    .filter(|g| g.members.len() == top)
                    .collect();
                // Each tied group is represented by its best member under the tie rule;
                // the winning group is the one whose representative wins the same rule.
                let reps = tied
                    .iter()
                    .filter_map(|g| self.pick(g.members.iter().copied()));
                let entry = self.pick(reps).ok_or(insufficient)?;
                Ok(base(self.entries[entry].call, top as u32, None))
            }
            Strategy::Threshold => {
                let k = self.cfg.k;
                let flagged = self.yes >= k;
                let side = |want: bool| {
                    self.entries
                        .iter()
                        .enumerate()
                        .filter(move |(_, e)| e.is_yes == want)
                        .map(|(i, _)| i)
                };
                let entry = self
                    .pick(side(flagged))
                    .or_else(|| self.pick(0..self.entries.len()))
                    .ok_or(insufficient)?;
                let agree = side(flagged).count() as u32;
                Ok(base(
                    self.entries[entry].call,
                    agree,
                    Some(ThresholdResult {
                        flagged,
                        yes: self.yes,
                        k,
                    }),
                ))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::vote::config::VoteConfig;

    fn cfg(src: &str) -> CompiledVote {
        let v: VoteConfig = toml::from_str(src).unwrap();
        v.compile("t").unwrap()
    }

    #[test]
    fn majority_winner_and_early_exit() {
        let c = cfg("n = 5");
        let mut t = Tally::new(&c);
        assert_eq!(t.push(0, None, Some("Paris")), Status::Pending);
        assert_eq!(t.push(1, None, Some(" paris ")), Status::Pending);
        assert_eq!(t.push(2, None, Some("Lyon")), Status::Pending);
        // 3 vs 1 with one outstanding: can't be caught.
        assert_eq!(t.push(3, None, Some("PARIS")), Status::Decided);
        let r = t.finish().unwrap();
        assert_eq!((r.winner, r.agree, r.of, r.valid), (0, 3, 5, 4));
        assert_eq!(r.strategy, Strategy::Majority);
    }

    #[test]
    fn majority_not_decided_while_catchable() {
        let c = cfg("n = 5");
        let mut t = Tally::new(&c);
        t.push(0, None, Some("a"));
        t.push(1, None, Some("a"));
        assert_eq!(t.push(2, None, Some("b")), Status::Pending); // 2 vs 1+2
        assert_eq!(t.push(3, None, None), Status::Pending); // 2 vs 1+1
        assert_eq!(t.push(4, None, Some("b")), Status::Decided);
    }

    #[test]
    fn tie_first_uses_arrival_order() {
        let c = cfg("n = 4");
        let mut t = Tally::new(&c);
        t.push(3, None, Some("b"));
        t.push(0, None, Some("a"));
        t.push(1, None, Some("a"));
        t.push(2, None, Some("b"));
        let r = t.finish().unwrap();
        assert_eq!((r.winner, r.agree), (3, 2));
    }

    #[test]
    fn tie_most_capable_prefers_earliest_model() {
        let c = cfg("n = 4\nmodels = [\"big\", \"mid\", \"small\"]\ntie = \"most_capable\"");
        let mut t = Tally::new(&c);
        t.push(1, Some(1), Some("b"));
        t.push(2, Some(2), Some("a"));
        t.push(0, Some(0), Some("a"));
        t.push(3, Some(1), Some("b"));
        let r = t.finish().unwrap();
        // Group "a" contains model 0; its answer from model 0 (call 0) is returned.
        assert_eq!((r.winner, r.agree), (0, 2));
    }

    #[test]
    fn json_pointer_extraction() {
        let c = cfg("n = 3\ncompare = { json_pointer = \"/answer\" }");
        let mut t = Tally::new(&c);
        t.push(0, None, Some(r#"{"answer": "Yes", "why": "x"}"#));
        t.push(
            1,
            None,
            Some("```json\n{\"answer\": \"yes\", \"why\": \"other\"}\n```"),
        );
        t.push(2, None, Some("not json"));
        let r = t.finish().unwrap();
        assert_eq!((r.winner, r.agree, r.valid), (0, 2, 2));
        assert_eq!(
            comparison_key(&c, r#"{"answer": {"b": 1, "a": 2}}"#).as_deref(),
            Some(r#"{"a":2,"b":1}"#)
        );
        assert_eq!(comparison_key(&c, r#"{"other": 1}"#), None);
    }

    #[test]
    fn regex_extraction() {
        let c = cfg("n = 3\ncompare = { regex = '(-?\\d+)\\D*$' }");
        assert_eq!(comparison_key(&c, "so 2 + 3 = 5.").as_deref(), Some("5"));
        let mut t = Tally::new(&c);
        t.push(0, None, Some("The answer is -7."));
        t.push(1, None, Some("no number here"));
        t.push(2, None, Some("after work: -7"));
        let r = t.finish().unwrap();
        assert_eq!((r.winner, r.agree, r.valid), (0, 2, 2));
        // No capture group: whole match.
        let c = cfg("n = 1\ncompare = { regex = '[A-D]' }");
        assert_eq!(comparison_key(&c, "answer: C").as_deref(), Some("c"));
    }

    #[test]
    fn threshold_flags_early() {
        let c = cfg("n = 5\nstrategy = \"threshold\"\nk = 2\nyes = { pattern = \"^yes\" }");
        let mut t = Tally::new(&c);
        assert_eq!(t.push(0, None, Some("No.")), Status::Pending);
        assert_eq!(t.push(1, None, Some("YES, it is")), Status::Pending);
        assert_eq!(t.push(2, None, Some("yes")), Status::Decided);
        let r = t.finish().unwrap();
        let th = r.threshold.unwrap();
        assert!(th.flagged);
        assert_eq!((th.yes, th.k, r.winner, r.agree), (2, 2, 1, 2));
    }

    #[test]
    fn threshold_unflags_when_k_unreachable() {
        let c = cfg("n = 5\nstrategy = \"threshold\"\nk = 3\nyes = { equals = \"Yes\" }");
        let mut t = Tally::new(&c);
        t.push(0, None, Some("no"));
        t.push(1, None, Some("no"));
        assert_eq!(t.push(2, None, Some("maybe")), Status::Decided); // 0 + 2 < 3
        let r = t.finish().unwrap();
        let th = r.threshold.unwrap();
        assert!(!th.flagged);
        assert_eq!((th.yes, r.winner, r.agree), (0, 0, 3));
    }

    #[test]
    fn min_valid_insufficient() {
        let c = cfg("n = 4\nmin_valid = 3");
        let mut t = Tally::new(&c);
        t.push(0, None, None);
        assert_eq!(t.push(1, None, Some("a")), Status::Pending);
        // 1 valid + 1 remaining < 3: cannot be met any more.
        assert_eq!(t.push(2, None, Some("")), Status::Decided);
        assert_eq!(
            t.finish(),
            Err(Insufficient {
                valid: 1,
                needed: 3
            })
        );
    }

    #[test]
    fn min_valid_delays_early_exit() {
        let c =
            cfg("n = 5\nmin_valid = 3\nstrategy = \"threshold\"\nk = 1\nyes = { equals = \"y\" }");
        let mut t = Tally::new(&c);
        assert_eq!(t.push(0, None, Some("y")), Status::Pending);
        assert_eq!(t.push(1, None, Some("n")), Status::Pending);
        assert_eq!(t.push(2, None, Some("n")), Status::Decided);
        assert!(t.finish().unwrap().threshold.unwrap().flagged);
    }

    #[test]
    fn all_failed_is_insufficient() {
        let c = cfg("n = 2");
        let mut t = Tally::new(&c);
        t.push(0, None, None);
        assert_eq!(t.push(1, None, None), Status::Decided);
        assert_eq!(t.finish().unwrap_err().valid, 0);
    }

    #[test]
    fn best_of_waits_for_all() {
        let c = cfg("n = 3\nstrategy = \"best_of\"\njudge = \"j\"");
        let mut t = Tally::new(&c);
        t.push(2, None, Some("a"));
        assert_eq!(t.push(0, None, Some("a")), Status::Pending);
        assert_eq!(t.push(1, None, Some("b")), Status::Decided);
        assert_eq!(t.valid_calls(), vec![0, 1, 2]);
        assert_eq!(t.agree_with(0), 2);
        assert_eq!(t.agree_with(1), 1);
    }

    #[test]
    fn extra_pushes_do_not_panic() {
        let c = cfg("n = 1");
        let mut t = Tally::new(&c);
        t.push(0, None, Some("a"));
        assert_eq!(t.push(7, None, Some("b")), Status::Decided);
        assert_eq!(t.remaining(), 0);
    }
}
