//! `[routers.X.guard]` / `[keys.X.guard]` configuration: session ceilings and loop detection.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::limits::{nanos_to_usd_string as format_usd, UsdNanos};

/// Default request header carrying the agent session id.
pub const DEFAULT_SESSION_HEADER: &str = "x-triage-session";
/// Default idle time after which a session is forgotten.
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(3600);

/// Guard settings for one router or one API key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// Request header carrying the session id (lowercase header name).
    #[serde(default = "default_session_header")]
    pub session_header: String,
    /// Fall back to the request body's `user` field when the header is absent.
    #[serde(default)]
    pub session_from_user: bool,
    /// Admitted requests per session; request `max_turns + 1` is refused.
    #[serde(default)]
    pub max_turns: Option<u64>,
    /// Settled tokens per session; refused once the recorded total is `>=` this.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Settled spend per session (`"2.50"` or `2.5` in TOML), stored as nano-dollars.
    #[serde(default)]
    pub max_spend_usd: Option<UsdNanos>,
    /// Session lifetime measured from its first admitted request (`"30m"`).
    #[serde(default, with = "humantime_serde")]
    pub max_wall_clock: Option<Duration>,
    /// Fraction (0, 1] of any ceiling at which a warning is returned.
    #[serde(default)]
    pub warn_at: Option<f64>,
    /// A session untouched for this long is forgotten (its counters reset).
    #[serde(default = "default_idle_ttl", with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// Loop-divergence detection; absent means off, `loop = {}` enables the defaults.
    #[serde(default, rename = "loop")]
    pub loop_detect: Option<LoopConfig>,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            session_header: default_session_header(),
            session_from_user: false,
            max_turns: None,
            max_tokens: None,
            max_spend_usd: None,
            max_wall_clock: None,
            warn_at: None,
            idle_ttl: DEFAULT_IDLE_TTL,
            loop_detect: None,
        }
    }
}

/// What the caller should do about a detected loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoopAction {
    /// Pass the request through and annotate the response.
    #[default]
    Flag,
    /// Route the request to a stronger model / tier.
    Escalate,
    /// Refuse the request.
    Block,
}

impl LoopAction {
    /// Config spelling (`flag` / `escalate` / `block`).
    pub fn as_str(self) -> &'static str {
        match self {
            LoopAction::Flag => "flag",
            LoopAction::Escalate => "escalate",
            LoopAction::Block => "block",
        }
    }
}

/// `loop = { k = 3, window = 10, action = "flag", text_repeat = true }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// Occurrences of one call signature (or one answer) within the window that make a loop.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Number of most recent tool calls (and, separately, assistant texts) inspected.
    #[serde(default = "default_window")]
    pub window: usize,
    /// What the caller does on a finding.
    #[serde(default)]
    pub action: LoopAction,
    /// Also detect the assistant giving the same text answer `k` times.
    #[serde(default = "default_true")]
    pub text_repeat: bool,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            k: default_k(),
            window: default_window(),
            action: LoopAction::Flag,
            text_repeat: true,
        }
    }
}

/// Upper bound on `loop.window`, which bounds the per-request hashing work.
pub const MAX_LOOP_WINDOW: usize = 1000;

fn default_session_header() -> String {
    DEFAULT_SESSION_HEADER.to_string()
}
fn default_idle_ttl() -> Duration {
    DEFAULT_IDLE_TTL
}
fn default_k() -> usize {
    3
}
fn default_window() -> usize {
    10
}
fn default_true() -> bool {
    true
}

impl GuardConfig {
    /// Checks the settings; each error is prefixed with `path` (e.g. `routers.auto.guard`).
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut errs = Vec::new();
        let mut err = |field: &str, msg: &str| errs.push(format!("{path}.{field}: {msg}"));

        if !is_header_name(&self.session_header) {
            err(
                "session_header",
                "must be a lowercase HTTP header name (a-z, 0-9, '-', '_')",
            );
        }
        if self.max_turns == Some(0) {
            err("max_turns", "must be at least 1");
        }
        if self.max_tokens == Some(0) {
            err("max_tokens", "must be at least 1");
        }
        if self.max_spend_usd.is_some_and(|s| s.0 == 0) {
            err("max_spend_usd", "must be greater than 0");
        }
        if self.max_wall_clock.is_some_and(|d| d.is_zero()) {
            err("max_wall_clock", "must be greater than 0");
        }
        if let Some(w) = self.warn_at {
            // NaN fails both comparisons, so it is rejected too.
            if !(w > 0.0 && w <= 1.0) {
                err("warn_at", "must be between 0 and 1");
            }
        }
        if self.idle_ttl.is_zero() {
            err("idle_ttl", "must be greater than 0");
        }
        if let Some(l) = &self.loop_detect {
            if l.k < 2 {
                err("loop.k", "must be at least 2");
            }
            if l.window < l.k {
                err("loop.window", "must be at least loop.k");
            }
            if l.window > MAX_LOOP_WINDOW {
                err("loop.window", &format!("must be at most {MAX_LOOP_WINDOW}"));
            }
        }
        errs
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Root {
        routers: std::collections::BTreeMap<String, Router>,
    }
    #[derive(Deserialize)]
    struct Router {
        guard: GuardConfig,
    }

    fn parse(toml_src: &str) -> Result<GuardConfig, toml::de::Error> {
        let root: Root = toml::from_str(toml_src)?;
        root.routers
            .into_values()
            .next()
            .map(|r| r.guard)
            .ok_or_else(|| serde::de::Error::custom("no router"))
    }

    #[test]
    fn full_config_parses() {
        let cfg = parse(
            r#"
            [routers.auto.guard]
            session_header = "x-agent-run"
            session_from_user = true
            max_turns = 40
            max_tokens = 200000
            max_spend_usd = "2.50"
            max_wall_clock = "30m"
            warn_at = 0.8
            idle_ttl = "15m"
            loop = { k = 4, window = 12, action = "escalate", text_repeat = false }
            "#,
        )
        .unwrap();
        assert_eq!(cfg.session_header, "x-agent-run");
        assert!(cfg.session_from_user);
        assert_eq!(cfg.max_turns, Some(40));
        assert_eq!(cfg.max_tokens, Some(200_000));
        assert_eq!(cfg.max_spend_usd, Some(UsdNanos(2_500_000_000)));
        assert_eq!(cfg.max_wall_clock, Some(Duration::from_secs(1800)));
        assert_eq!(cfg.warn_at, Some(0.8));
        assert_eq!(cfg.idle_ttl, Duration::from_secs(900));
        let l = cfg.loop_detect.clone().unwrap();
        assert_eq!(
            (l.k, l.window, l.action, l.text_repeat),
            (4, 12, LoopAction::Escalate, false)
        );
        assert!(cfg.validate("routers.auto.guard").is_empty());
    }

    #[test]
    fn defaults_apply() {
        let cfg = parse("[routers.a.guard]\n").unwrap();
        assert_eq!(cfg, GuardConfig::default());
        assert_eq!(cfg.session_header, "x-triage-session");
        assert_eq!(cfg.idle_ttl, Duration::from_secs(3600));
        assert!(cfg.loop_detect.is_none());
        let cfg = parse("[routers.a.guard.loop]\n").unwrap();
        assert_eq!(cfg.loop_detect, Some(LoopConfig::default()));
        let l = LoopConfig::default();
        assert_eq!(
            (l.k, l.window, l.action, l.text_repeat),
            (3, 10, LoopAction::Flag, true)
        );
    }

    #[test]
    fn unknown_fields_rejected() {
        assert!(parse("[routers.a.guard]\nmax_turn = 3\n").is_err());
        assert!(parse("[routers.a.guard]\nloop = { kk = 3 }\n").is_err());
        assert!(parse("[routers.a.guard]\nloop = { action = \"stop\" }\n").is_err());
    }

    #[test]
    fn spend_forms_are_exact() {
        let spend = |v: &str| parse(&format!("[routers.a.guard]\nmax_spend_usd = {v}\n"));
        assert_eq!(
            spend("1.15").unwrap().max_spend_usd,
            Some(UsdNanos(1_150_000_000))
        );
        assert_eq!(
            spend("\"1.15\"").unwrap().max_spend_usd,
            Some(UsdNanos(1_150_000_000))
        );
        assert_eq!(
            spend("\"$0.000000001\"").unwrap().max_spend_usd,
            Some(UsdNanos(1))
        );
        assert_eq!(
            spend("3").unwrap().max_spend_usd,
            Some(UsdNanos(3_000_000_000))
        );
        assert_eq!(
            spend("0.1").unwrap().max_spend_usd,
            Some(UsdNanos(100_000_000))
        );
        assert!(spend("-1.0").is_err());
        assert!(spend("-1").is_err());
        assert!(spend("\"abc\"").is_err());
        // Past the ninth decimal the one USD parser rounds half up, like every other amount.
        assert_eq!(
            spend("\"1.0000000001\"").unwrap().max_spend_usd,
            Some(UsdNanos(1_000_000_000))
        );
        assert_eq!(
            spend("\"1.0000000005\"").unwrap().max_spend_usd,
            Some(UsdNanos(1_000_000_001))
        );
        assert!(spend("\"99999999999999999999\"").is_err());
        assert!(spend("nan").is_err());
        assert_eq!(UsdNanos::parse(".5"), Ok(UsdNanos(500_000_000)));
        assert!(UsdNanos::parse(".").is_err());
        assert!(UsdNanos::parse("1e3").is_err());
    }

    #[test]
    fn usd_formatting() {
        assert_eq!(format_usd(1_500_000_000), "1.50");
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_usd(1_234), "0.000001234");
        assert_eq!(format_usd(2_000_000_000), "2.00");
        assert_eq!(format_usd(2_125_000_000), "2.125");
        // Round trip through Serialize / Deserialize.
        let cfg = GuardConfig {
            max_spend_usd: Some(UsdNanos(2_125_000_000)),
            ..GuardConfig::default()
        };
        let text = toml::to_string(&cfg).unwrap();
        let back: GuardConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn validate_reports_prefixed_paths() {
        let cfg = GuardConfig {
            session_header: "X Session".into(),
            max_turns: Some(0),
            max_tokens: Some(0),
            max_spend_usd: Some(UsdNanos(0)),
            max_wall_clock: Some(Duration::ZERO),
            warn_at: Some(1.5),
            idle_ttl: Duration::ZERO,
            loop_detect: Some(LoopConfig {
                k: 1,
                window: 2000,
                ..LoopConfig::default()
            }),
            ..GuardConfig::default()
        };
        let errs = cfg.validate("routers.auto.guard");
        for field in [
            "session_header",
            "max_turns",
            "max_tokens",
            "max_spend_usd",
            "max_wall_clock",
            "idle_ttl",
            "loop.k",
            "loop.window",
        ] {
            let prefix = format!("routers.auto.guard.{field}: ");
            assert!(
                errs.iter().any(|e| e.starts_with(&prefix)),
                "{field}: {errs:?}"
            );
        }
        assert!(errs.contains(&"routers.auto.guard.warn_at: must be between 0 and 1".to_string()));

        for bad in [0.0, -0.1, f64::NAN] {
            let c = GuardConfig {
                warn_at: Some(bad),
                ..GuardConfig::default()
            };
            assert_eq!(
                c.validate("keys.k.guard"),
                vec!["keys.k.guard.warn_at: must be between 0 and 1"]
            );
        }
        let c = GuardConfig {
            loop_detect: Some(LoopConfig {
                k: 5,
                window: 4,
                ..LoopConfig::default()
            }),
            ..GuardConfig::default()
        };
        assert_eq!(
            c.validate("p"),
            vec!["p.loop.window: must be at least loop.k"]
        );
    }
}
