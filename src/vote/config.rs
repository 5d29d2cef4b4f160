//! Config schema for `[routers.X.vote]` / `[routers.X.cascade]` and their compiled runtime forms.

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Hard cap on `vote.n`: every call costs money, so a typo like `n = 500` must not fan out.
pub const MAX_N: u32 = 64;

/// How the voted calls are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Most frequent (normalised/extracted) answer wins.
    #[default]
    Majority,
    /// Flag when at least `k` answers say "yes".
    Threshold,
    /// A judge model picks the best candidate.
    BestOf,
}

impl Strategy {
    /// Name used in config and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Majority => "majority",
            Strategy::Threshold => "threshold",
            Strategy::BestOf => "best_of",
        }
    }
}

/// How ties between equally large answer groups are broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TieRule {
    /// The group whose first answer arrived first.
    #[default]
    First,
    /// The group containing an answer from the model earliest in `models`.
    MostCapable,
}

/// What to do when fewer than `min_valid` calls produced a usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInsufficient {
    /// Fail the request with `VoteError::InsufficientValid`.
    #[default]
    Error,
    /// Make one plain call to the routed model and return it unvoted.
    SingleCall,
}

fn default_true() -> bool {
    true
}

/// How answers are turned into comparison keys: JSON pointer, then regex, then normalisation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// Trim, lowercase and collapse whitespace before comparing.
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Parse the answer as JSON and compare only the value at this pointer (e.g. "/answer").
    #[serde(default)]
    pub json_pointer: Option<String>,
    /// Compare only capture group 1 (or the whole match when the regex has no groups).
    #[serde(default)]
    pub regex: Option<String>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            normalize: true,
            json_pointer: None,
            regex: None,
        }
    }
}

/// What counts as a "yes" answer for the threshold strategy (exactly one of the two).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YesConfig {
    /// Regex searched in the comparison key.
    #[serde(default)]
    pub pattern: Option<String>,
    /// String compared to the comparison key (normalised the same way when `normalize` is on).
    #[serde(default)]
    pub equals: Option<String>,
}

/// `[routers.X.vote]`: fan one request out to `n` calls and combine the answers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VoteConfig {
    /// Number of candidate calls (1..=64).
    pub n: u32,
    /// Models to spread calls over round-robin; empty = the routed model for every call.
    #[serde(default)]
    pub models: Vec<String>,
    /// Per-call temperatures, cycled when shorter than `n`; empty = keep the request's.
    #[serde(default)]
    pub temperatures: Vec<f64>,
    /// How answers are combined.
    #[serde(default)]
    pub strategy: Strategy,
    /// How answers are compared.
    #[serde(default)]
    pub compare: CompareConfig,
    /// Tie-breaking rule.
    #[serde(default)]
    pub tie: TieRule,
    /// Threshold: number of "yes" answers needed to flag.
    #[serde(default)]
    pub k: Option<u32>,
    /// Threshold: what counts as "yes".
    #[serde(default)]
    pub yes: Option<YesConfig>,
    /// best_of: model name of the judge.
    #[serde(default)]
    pub judge: Option<String>,
    /// best_of: what the judge should look for.
    #[serde(default)]
    pub rubric: Option<String>,
    /// Minimum number of usable answers; default 1 (majority, best_of) or `k` (threshold).
    #[serde(default)]
    pub min_valid: Option<u32>,
    /// What to do below `min_valid`.
    #[serde(default)]
    pub on_insufficient: OnInsufficient,
    /// Whether the response cache may store voted answers.
    #[serde(default)]
    pub cache: bool,
}

/// When the JSON gate applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonGate {
    /// Only when the request asked for `json_object` / `json_schema`.
    #[default]
    Auto,
    /// Always require the content to parse as JSON.
    Always,
    /// Never check JSON (nor the schema).
    Off,
}

/// Programmatic checks a cascade tier's answer must pass.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatesConfig {
    /// Content (or tool calls) must be present.
    #[serde(default = "default_true")]
    pub non_empty: bool,
    /// `finish_reason` must not be "length".
    #[serde(default = "default_true")]
    pub no_length_finish: bool,
    /// JSON parse / schema check.
    #[serde(default)]
    pub json: JsonGate,
    /// Case-insensitive substrings that mark a refusal.
    #[serde(default)]
    pub refusal_phrases: Vec<String>,
    /// Regex the content must match.
    #[serde(default)]
    pub must_match: Option<String>,
}

impl Default for GatesConfig {
    fn default() -> Self {
        GatesConfig {
            non_empty: true,
            no_length_finish: true,
            json: JsonGate::Auto,
            refusal_phrases: Vec::new(),
            must_match: None,
        }
    }
}

/// `[routers.X.cascade]`: try tiers in order until one passes the gates.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    /// Tier names, cheapest first (resolved to models by the caller).
    pub tiers: Vec<String>,
    /// Gates every answer must pass.
    #[serde(default)]
    pub gates: GatesConfig,
}

/// Vote config with regexes compiled and defaults resolved.
#[derive(Debug, Clone)]
pub struct CompiledVote {
    /// The source config.
    pub cfg: VoteConfig,
    /// Resolved `min_valid`.
    pub min_valid: u32,
    /// Resolved `k` (0 unless threshold).
    pub k: u32,
    pub(crate) compare_regex: Option<Regex>,
    pub(crate) yes: Option<YesMatcher>,
    pub(crate) rubric: String,
}

#[derive(Debug, Clone)]
pub(crate) enum YesMatcher {
    Pattern(Regex),
    Equals(String),
}

/// Gates config with regexes compiled and phrases normalised.
#[derive(Debug, Clone)]
pub struct CompiledGates {
    /// The source config.
    pub cfg: GatesConfig,
    pub(crate) refusal_phrases: Vec<String>,
    pub(crate) must_match: Option<Regex>,
}

/// Cascade config with gates compiled.
#[derive(Debug, Clone)]
pub struct CompiledCascade {
    /// Tier names in order.
    pub tiers: Vec<String>,
    /// Compiled gates.
    pub gates: CompiledGates,
}

/// Default judge rubric when `rubric` is unset.
pub const DEFAULT_RUBRIC: &str =
    "Pick the candidate that answers the question most correctly, completely and concisely.";

fn check_regex(path: &str, key: &str, src: &str, errs: &mut Vec<String>) -> Option<Regex> {
    match Regex::new(src) {
        Ok(r) => Some(r),
        Err(e) => {
            // regex errors are multi-line; keep the config error on one line.
            let msg = e.to_string().replace('\n', " ");
            errs.push(format!("{path}.{key}: invalid regex: {msg}"));
            None
        }
    }
}

/// Lowercase, trim and collapse runs of whitespace to one space.
pub fn normalize_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

impl VoteConfig {
    /// The `min_valid` that applies when the field is unset.
    pub fn effective_min_valid(&self) -> u32 {
        self.min_valid.unwrap_or(match self.strategy {
            Strategy::Threshold => self.k.unwrap_or(1),
            Strategy::Majority | Strategy::BestOf => 1,
        })
    }

    /// Config errors, each prefixed with its key path under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        self.check(path).1
    }

    /// Validate and compile regexes; errors as in `validate`.
    pub fn compile(&self, path: &str) -> Result<CompiledVote, Vec<String>> {
        let (compiled, errs) = self.check(path);
        match compiled {
            Some(c) if errs.is_empty() => Ok(c),
            _ => Err(errs),
        }
    }

    fn check(&self, path: &str) -> (Option<CompiledVote>, Vec<String>) {
        let mut errs = Vec::new();
        let n = self.n;
        if n == 0 {
            errs.push(format!("{path}.n: must be >= 1"));
        } else if n > MAX_N {
            errs.push(format!("{path}.n: must be <= {MAX_N}"));
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.trim().is_empty() {
                errs.push(format!("{path}.models[{i}]: must not be empty"));
            }
        }
        for (i, t) in self.temperatures.iter().enumerate() {
            if !t.is_finite() || !(0.0..=2.0).contains(t) {
                errs.push(format!("{path}.temperatures[{i}]: must be within 0..=2"));
            }
        }
        if self.tie == TieRule::MostCapable && self.models.is_empty() {
            errs.push(format!(
                "{path}.tie: \"most_capable\" needs `models` (earliest = most capable)"
            ));
        }
        if let Some(p) = &self.compare.json_pointer {
            if !p.is_empty() && !p.starts_with('/') {
                errs.push(format!(
                    "{path}.compare.json_pointer: must be empty or start with '/'"
                ));
            }
        }
        let compare_regex = self
            .compare
            .regex
            .as_deref()
            .and_then(|r| check_regex(path, "compare.regex", r, &mut errs));

        let mut yes = None;
        let mut k = 0;
        if self.strategy == Strategy::Threshold {
            match self.k {
                None => errs.push(format!("{path}.k: required for strategy = \"threshold\"")),
                Some(0) => errs.push(format!("{path}.k: must be >= 1")),
                Some(kv) if kv > n => errs.push(format!("{path}.k: must be <= n ({n})")),
                Some(kv) => k = kv,
            }
            match &self.yes {
                None => errs.push(format!("{path}.yes: required for strategy = \"threshold\"")),
                Some(y) => match (&y.pattern, &y.equals) {
                    (Some(p), None) => {
                        yes =
                            check_regex(path, "yes.pattern", p, &mut errs).map(YesMatcher::Pattern);
                    }
                    (None, Some(e)) => {
                        let e = if self.compare.normalize {
                            normalize_text(e)
                        } else {
                            e.clone()
                        };
                        yes = Some(YesMatcher::Equals(e));
                    }
                    _ => errs.push(format!(
                        "{path}.yes: set exactly one of `pattern` or `equals`"
                    )),
                },
            }
        } else {
            if self.k.is_some() {
                errs.push(format!(
                    "{path}.k: only valid with strategy = \"threshold\""
                ));
            }
            if self.yes.is_some() {
                errs.push(format!(
                    "{path}.yes: only valid with strategy = \"threshold\""
                ));
            }
        }

        if self.strategy == Strategy::BestOf {
            match &self.judge {
                Some(j) if !j.trim().is_empty() => {}
                _ => errs.push(format!("{path}.judge: required for strategy = \"best_of\"")),
            }
        } else {
            if self.judge.is_some() {
                errs.push(format!(
                    "{path}.judge: only valid with strategy = \"best_of\""
                ));
            }
            if self.rubric.is_some() {
                errs.push(format!(
                    "{path}.rubric: only valid with strategy = \"best_of\""
                ));
            }
        }

        let min_valid = self.effective_min_valid();
        if let Some(mv) = self.min_valid {
            if mv == 0 {
                errs.push(format!("{path}.min_valid: must be >= 1"));
            } else if mv > n {
                errs.push(format!("{path}.min_valid: must be <= n ({n})"));
            }
        }

        let compiled = CompiledVote {
            cfg: self.clone(),
            min_valid,
            k,
            compare_regex,
            yes,
            rubric: self
                .rubric
                .clone()
                .unwrap_or_else(|| DEFAULT_RUBRIC.to_string()),
        };
        (Some(compiled), errs)
    }
}

impl CompiledVote {
    /// Model index (into `models`) and temperature for candidate call `i`.
    pub fn call_params(&self, i: usize) -> (Option<usize>, Option<f64>) {
        let model = (!self.cfg.models.is_empty()).then(|| i % self.cfg.models.len());
        let temp = (!self.cfg.temperatures.is_empty())
            .then(|| self.cfg.temperatures[i % self.cfg.temperatures.len()]);
        (model, temp)
    }
}

impl GatesConfig {
    /// Config errors, each prefixed with its key path under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        self.check(path).1
    }

    /// Validate and compile.
    pub fn compile(&self, path: &str) -> Result<CompiledGates, Vec<String>> {
        let (c, errs) = self.check(path);
        if errs.is_empty() {
            Ok(c)
        } else {
            Err(errs)
        }
    }

    fn check(&self, path: &str) -> (CompiledGates, Vec<String>) {
        let mut errs = Vec::new();
        let mut phrases = Vec::new();
        for (i, p) in self.refusal_phrases.iter().enumerate() {
            let n = normalize_text(p);
            if n.is_empty() {
                errs.push(format!("{path}.refusal_phrases[{i}]: must not be empty"));
            } else {
                phrases.push(n);
            }
        }
        let must_match = self
            .must_match
            .as_deref()
            .and_then(|r| check_regex(path, "must_match", r, &mut errs));
        (
            CompiledGates {
                cfg: self.clone(),
                refusal_phrases: phrases,
                must_match,
            },
            errs,
        )
    }
}

impl CascadeConfig {
    /// Config errors, each prefixed with its key path under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        self.compile(path).err().unwrap_or_default()
    }

    /// Validate and compile.
    pub fn compile(&self, path: &str) -> Result<CompiledCascade, Vec<String>> {
        let mut errs = Vec::new();
        if self.tiers.is_empty() {
            errs.push(format!("{path}.tiers: must list at least one tier"));
        }
        for (i, t) in self.tiers.iter().enumerate() {
            // Tier names go into a comma/space-separated response header.
            if t.is_empty()
                || t.chars()
                    .any(|c| c == ',' || c == '=' || c.is_whitespace() || c.is_control())
            {
                errs.push(format!(
                    "{path}.tiers[{i}]: must be non-empty without spaces, ',' or '='"
                ));
            }
        }
        let (gates, gerrs) = self.gates.check(&format!("{path}.gates"));
        errs.extend(gerrs);
        if errs.is_empty() {
            Ok(CompiledCascade {
                tiers: self.tiers.clone(),
                gates,
            })
        } else {
            Err(errs)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn vote(toml_src: &str) -> VoteConfig {
        toml::from_str(toml_src).unwrap()
    }

    #[test]
    fn parses_full_vote_config() {
        let v = vote(
            r#"
            n = 5
            models = ["big", "small"]
            temperatures = [0.2, 0.8]
            strategy = "threshold"
            compare = { normalize = false, json_pointer = "/answer", regex = '(-?\d+)\D*$' }
            tie = "most_capable"
            k = 2
            yes = { pattern = "^yes" }
            min_valid = 3
            on_insufficient = "single_call"
            cache = true
            "#,
        );
        assert_eq!(v.strategy, Strategy::Threshold);
        assert_eq!(v.tie, TieRule::MostCapable);
        assert_eq!(v.on_insufficient, OnInsufficient::SingleCall);
        assert!(!v.compare.normalize);
        let c = v.compile("routers.auto.vote").unwrap();
        assert_eq!(c.min_valid, 3);
        assert_eq!(c.k, 2);
        assert_eq!(c.call_params(0), (Some(0), Some(0.2)));
        assert_eq!(c.call_params(3), (Some(1), Some(0.8)));
    }

    #[test]
    fn defaults() {
        let v = vote("n = 3");
        assert_eq!(v.strategy, Strategy::Majority);
        assert!(v.compare.normalize);
        assert!(!v.cache);
        let c = v.compile("v").unwrap();
        assert_eq!(c.min_valid, 1);
        assert_eq!(c.call_params(2), (None, None));
        let t = vote("n = 5\nstrategy = \"threshold\"\nk = 2\nyes = { equals = \" YES \" }");
        let c = t.compile("v").unwrap();
        assert_eq!(c.min_valid, 2);
        assert!(matches!(c.yes, Some(YesMatcher::Equals(ref s)) if s == "yes"));
    }

    #[test]
    fn rejects_unknown_fields() {
        assert!(toml::from_str::<VoteConfig>("n = 3\nbogus = 1").is_err());
        assert!(toml::from_str::<VoteConfig>("n = 3\ncompare = { nope = true }").is_err());
        assert!(toml::from_str::<CascadeConfig>("tiers = [\"a\"]\ngates = { x = 1 }").is_err());
    }

    #[test]
    fn validation_messages_have_paths() {
        let v = vote("n = 5\nstrategy = \"threshold\"\nk = 7\nyes = { pattern = \"(\" }");
        let errs = v.validate("routers.auto.vote");
        assert!(errs.contains(&"routers.auto.vote.k: must be <= n (5)".to_string()));
        assert!(errs
            .iter()
            .any(|e| e.starts_with("routers.auto.vote.yes.pattern: invalid regex")));
        assert!(v.compile("routers.auto.vote").is_err());

        let v = vote("n = 0\nk = 1\ntie = \"most_capable\"\nmin_valid = 2\ntemperatures = [3.0]");
        let errs = v.validate("r");
        for want in [
            "r.n: must be >= 1",
            "r.k: only valid with strategy = \"threshold\"",
            "r.min_valid: must be <= n (0)",
            "r.temperatures[0]: must be within 0..=2",
        ] {
            assert!(
                errs.iter().any(|e| e == want),
                "{want} missing from {errs:?}"
            );
        }
        assert!(errs.iter().any(|e| e.starts_with("r.tie:")));

        let v = vote("n = 3\nstrategy = \"best_of\"");
        assert_eq!(
            v.validate("r"),
            vec!["r.judge: required for strategy = \"best_of\"".to_string()]
        );
        let v = vote(
            "n = 3\nstrategy = \"threshold\"\nk = 1\nyes = { pattern = \"a\", equals = \"b\" }",
        );
        assert_eq!(
            v.validate("r"),
            vec!["r.yes: set exactly one of `pattern` or `equals`".to_string()]
        );
        assert!(vote("n = 3\ncompare = { json_pointer = \"answer\" }")
            .validate("r")
            .iter()
            .any(|e| e.starts_with("r.compare.json_pointer")));
    }

    #[test]
    fn cascade_config() {
        let c: CascadeConfig = toml::from_str(
            r#"
            tiers = ["small", "large"]
            gates = { json = "always", refusal_phrases = ["I can't  HELP"], must_match = "\\d" }
            "#,
        )
        .unwrap();
        assert!(c.gates.non_empty && c.gates.no_length_finish);
        let cc = c.compile("routers.x.cascade").unwrap();
        assert_eq!(cc.gates.refusal_phrases, vec!["i can't help".to_string()]);

        let bad: CascadeConfig =
            toml::from_str("tiers = [\"a,b\"]\ngates = { must_match = \"[\" }").unwrap();
        let errs = bad.validate("c");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("c.tiers[0]:"));
        assert!(errs[1].starts_with("c.gates.must_match: invalid regex"));
        let empty: CascadeConfig = toml::from_str("tiers = []").unwrap();
        assert_eq!(
            empty.validate("c"),
            vec!["c.tiers: must list at least one tier".to_string()]
        );
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_text("  Hello \n\t WORLD  "), "hello world");
        assert_eq!(normalize_text(""), "");
    }
}
