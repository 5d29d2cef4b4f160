//! OpenAI-style `x-ratelimit-*` header numbers.

use serde::Serialize;
use std::fmt::Write as _;
use std::time::Duration;

/// One rate window's numbers: the limit, what is left, and when it is fully replenished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Requests or tokens per minute.
    pub limit: u64,
    /// Left right now.
    pub remaining: u64,
    /// Time until the window is back to `limit`.
    pub reset: Duration,
}

impl Window {
    /// The tighter of two windows (fewer remaining; on a tie, the later reset).
    pub(crate) fn tighter(a: Option<Window>, b: Option<Window>) -> Option<Window> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if (b.remaining, a.reset) < (a.remaining, b.reset) {
                b
            } else {
                a
            }),
            (a, None) => a,
            (None, b) => b,
        }
    }
}

/// Request and token windows for the subject that binds tightest (key or its team).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RateInfo {
    /// `x-ratelimit-*-requests`; `None` when no rpm limit applies (or it was not reached).
    pub requests: Option<Window>,
    /// `x-ratelimit-*-tokens`; `None` when no tpm limit applies.
    pub tokens: Option<Window>,
}

impl RateInfo {
    /// Header name/value pairs, omitting windows without a configured limit.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(6);
        if let Some(w) = self.requests {
            out.push(("x-ratelimit-limit-requests", w.limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", w.remaining.to_string()));
            out.push(("x-ratelimit-reset-requests", format_reset(w.reset)));
        }
        if let Some(w) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", w.limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", w.remaining.to_string()));
            out.push(("x-ratelimit-reset-tokens", format_reset(w.reset)));
        }
        out
    }
}

/// Formats a duration the way OpenAI does (Go's `Duration.String`, rounded up to milliseconds so a
/// client never retries early): "0s", "20ms", "1s", "1.5s", "6m0s", "1h2m3.25s".
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let mut out = String::new();
    let hours = ms / 3_600_000;
    let minutes = (ms / 60_000) % 60;
    let secs = (ms / 1000) % 60;
    let frac = ms % 1000;
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    if frac > 0 {
        let f = format!("{frac:03}");
        let _ = write!(out, ".{}", f.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_format() {
        let f = |ms: u64| format_reset(Duration::from_millis(ms));
        assert_eq!(format_reset(Duration::ZERO), "0s");
        assert_eq!(format_reset(Duration::from_micros(300)), "1ms");
        assert_eq!(f(20), "20ms");
        assert_eq!(f(1000), "1s");
        assert_eq!(f(1500), "1.5s");
        assert_eq!(f(360_000), "6m0s");
        assert_eq!(f(90_250), "1m30.25s");
        assert_eq!(f(3_723_250), "1h2m3.25s");
        assert_eq!(f(3_600_000), "1h0m0s");
    }

    #[test]
    fn header_names() {
        let w = Window {
            limit: 60,
            remaining: 59,
            reset: Duration::from_secs(1),
        };
        let info = RateInfo {
            requests: Some(w),
            tokens: None,
        };
        assert_eq!(
            info.headers(),
            vec![
                ("x-ratelimit-limit-requests", "60".to_owned()),
                ("x-ratelimit-remaining-requests", "59".to_owned()),
                ("x-ratelimit-reset-requests", "1s".to_owned()),
            ]
        );
        let tighter = Window::tighter(Some(w), Some(Window { remaining: 3, ..w }));
        assert_eq!(tighter.map(|w| w.remaining), Some(3));
    }
}
