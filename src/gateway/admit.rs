//! Step 5: one admission for rate limits and the spend reservation.

use super::state::AppState;
use super::{Caller, GatewayError};
use crate::limits::{self, Admission, AdmitError, AdmitRequest, LimitStore};
use crate::metrics::LimitKind;

/// Admits the request (or refuses with 429/503); rate-limit headers for the
/// response go into `headers`. `None` when the caller has no limits.
pub async fn admit(
    app: &AppState,
    caller: &Caller,
    est_tokens: u64,
    reserve: u64,
    headers: &mut Vec<(&'static str, String)>,
) -> Result<Option<Admission>, GatewayError> {
    let Some(key) = caller.name() else {
        return Ok(None);
    };
    let req = AdmitRequest {
        key,
        est_tokens,
        reserve_nanos: reserve,
    };
    match app.limiter.admit(&req).await {
        Ok(a) => {
            headers.extend(a.rate_headers());
            Ok(Some(a))
        }
        Err(AdmitError::UnknownKey(_)) => Ok(None),
        Err(AdmitError::Unavailable(msg)) => {
            tracing::debug!(
                key,
                "refused: the shared limit store is unavailable (fail_closed)"
            );
            Err(GatewayError::store_unavailable(msg))
        }
        Err(AdmitError::Refused(r)) => {
            let kind = match r.kind {
                limits::RefusalKind::Rpm => LimitKind::Rpm,
                limits::RefusalKind::Tpm => LimitKind::Tpm,
                limits::RefusalKind::Parallel => LimitKind::Parallel,
                limits::RefusalKind::Budget => LimitKind::Budget,
            };
            app.metrics.record_refusal(key, kind);
            let (kind, code) = match r.kind {
                limits::RefusalKind::Budget => ("insufficient_quota", "insufficient_quota"),
                _ => ("rate_limit_error", "rate_limit_exceeded"),
            };
            let mut e = GatewayError::new(429, kind, Some(code), r.message());
            e.headers.extend(r.rate_headers());
            // A budget only frees up when its period ends: say when.
            if r.kind == limits::RefusalKind::Budget {
                if let Some(end) = r.period_end_unix {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let left = u64::try_from(end).unwrap_or(0).saturating_sub(now);
                    e = e.with_retry_after(left.max(1));
                }
            }
            Err(e)
        }
    }
}
