//! Budget periods in UTC, computed from unix timestamps (no timezone database needed).

use serde::{Deserialize, Serialize};

const DAY: i64 = 86_400;

/// The window a spend budget applies to; calendar periods are UTC and weeks start on Monday.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// Calendar day (UTC).
    Daily,
    /// ISO week, Monday 00:00 UTC to the next Monday.
    Weekly,
    /// Calendar month (UTC).
    #[default]
    Monthly,
    /// Never resets.
    Total,
}

impl Period {
    /// Unix second at which the period containing `now` started (`i64::MIN` for `Total`).
    pub fn start_of(self, now_unix: i64) -> i64 {
        let day = now_unix.div_euclid(DAY);
        match self {
            Period::Daily => day.saturating_mul(DAY),
            // 1970-01-01 was a Thursday: Monday-based weekday = (day + 3) mod 7.
            Period::Weekly => (day - (day + 3).rem_euclid(7)).saturating_mul(DAY),
            Period::Monthly => {
                let (y, m, _) = civil_from_days(day);
                days_from_civil(y, m, 1).saturating_mul(DAY)
            }
            Period::Total => i64::MIN,
        }
    }

    /// Unix second at which the period containing `now` ends (exclusive); `None` for `Total`.
    pub fn end_of(self, now_unix: i64) -> Option<i64> {
        let start = self.start_of(now_unix);
        match self {
            Period::Daily => Some(start.saturating_add(DAY)),
            Period::Weekly => Some(start.saturating_add(7 * DAY)),
            Period::Monthly => {
                let (y, m, _) = civil_from_days(start.div_euclid(DAY));
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some(days_from_civil(ny, nm, 1).saturating_mul(DAY))
            }
            Period::Total => None,
        }
    }

    /// Lower-case name, as used in config and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Total => "total",
        }
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) for days since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-02-29 12:34:56 UTC (a Thursday, leap day).
    const T: i64 = 1_709_210_096;

    #[test]
    fn civil_round_trip() {
        for day in [-800_000i64, -1, 0, 1, 19_782, 2_932_896] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(T / DAY), (2024, 2, 29));
    }

    #[test]
    fn period_bounds() {
        assert_eq!(Period::Daily.start_of(T), 1_709_164_800); // 2024-02-29 00:00
        assert_eq!(Period::Daily.end_of(T), Some(1_709_251_200));
        assert_eq!(Period::Weekly.start_of(T), 1_708_905_600); // Mon 2024-02-26
        assert_eq!(Period::Weekly.end_of(T), Some(1_709_510_400)); // Mon 2024-03-04
        assert_eq!(Period::Monthly.start_of(T), 1_706_745_600); // 2024-02-01
        assert_eq!(Period::Monthly.end_of(T), Some(1_709_251_200)); // 2024-03-01
        assert_eq!(Period::Monthly.end_of(1_733_011_200), Some(1_735_689_600)); // Dec -> Jan
        assert_eq!(Period::Total.start_of(T), i64::MIN);
        assert_eq!(Period::Total.end_of(T), None);
        // The end of a period is the start of the next one.
        for p in [Period::Daily, Period::Weekly, Period::Monthly] {
            let end = p.end_of(T).unwrap_or_default();
            assert_eq!(p.start_of(end), end);
            assert_eq!(p.start_of(end - 1), p.start_of(T));
        }
    }
}
