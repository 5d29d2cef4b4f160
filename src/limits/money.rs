//! Integer nano-dollar money: parsing from config, display, and per-request cost.

use serde::{Deserialize, Serialize};

/// Nano-dollars in one US dollar.
pub const NANOS_PER_USD: u64 = 1_000_000_000;

/// A config amount that is not a valid non-negative dollar value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid USD amount {input:?}: {reason}")]
pub struct MoneyError {
    /// The rejected input as written.
    pub input: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

fn money_err(input: &str, reason: &'static str) -> MoneyError {
    MoneyError {
        input: input.to_owned(),
        reason,
    }
}

/// Parses a decimal dollar string ("2.50", "$0.000001", "1_000") into nano-dollars, rounding half up
/// past the ninth decimal.
pub fn usd_to_nanos(input: &str) -> Result<u64, MoneyError> {
    let s = input.trim();
    let s = s.strip_prefix('$').unwrap_or(s).trim();
    if s.starts_with('-') {
        return Err(money_err(input, "negative"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let (int_part, frac_part) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    let int_digits: Vec<u8> = int_part.bytes().filter(|b| *b != b'_').collect();
    let frac_digits: Vec<u8> = frac_part.bytes().filter(|b| *b != b'_').collect();
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(money_err(input, "no digits"));
    }
    if !int_digits
        .iter()
        .chain(frac_digits.iter())
        .all(u8::is_ascii_digit)
    {
        return Err(money_err(input, "not a plain decimal number"));
    }
    let mut nanos: u128 = 0;
    for d in &int_digits {
        nanos = nanos * 10 + u128::from(d - b'0');
        if nanos > u128::from(u64::MAX) {
            return Err(money_err(input, "too large"));
        }
    }
    nanos *= u128::from(NANOS_PER_USD);
    let mut scale = u128::from(NANOS_PER_USD);
    for d in frac_digits.iter().take(9) {
        scale /= 10;
        nanos += u128::from(d - b'0') * scale;
    }
    if frac_digits.get(9).is_some_and(|d| *d >= b'5') {
        nanos += 1;
    }
    u64::try_from(nanos).map_err(|_| money_err(input, "too large"))
}

/// Converts a float dollar amount from config (e.g. TOML `2.5`) via its shortest decimal form,
/// so `0.15` becomes exactly 150_000_000 nanos.
pub fn usd_f64_to_nanos(usd: f64) -> Result<u64, MoneyError> {
    if !usd.is_finite() {
        return Err(money_err(&usd.to_string(), "not finite"));
    }
    // Display for f64 never uses exponent notation and round-trips, so parsing it is exact.
    usd_to_nanos(&format!("{usd}"))
}

/// Formats nano-dollars as a dollar amount with at least two decimals: "1.50", "0.000000001".
pub fn nanos_to_usd_string(nanos: u64) -> String {
    let whole = nanos / NANOS_PER_USD;
    let frac = format!("{:09}", nanos % NANOS_PER_USD);
    let trimmed = frac.trim_end_matches('0');
    let frac = if trimmed.len() < 2 {
        &frac[..2]
    } else {
        trimmed
    };
    format!("{whole}.{frac}")
}

/// Model prices in nano-dollars per million tokens (the config's `price`, converted once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    /// Uncached input (prompt) tokens.
    pub input: u64,
    /// Cached input tokens (a subset of the prompt tokens).
    pub cached_input: u64,
    /// Input tokens written to the provider's prompt cache (Anthropic bills
    /// these above the input price; part of the prompt tokens).
    pub cache_write: u64,
    /// Output (completion) tokens.
    pub output: u64,
}

/// Cost in nano-dollars, each token class billed once: `cached_tokens` (cache reads) and
/// `cache_write_tokens` are parts of `prompt_tokens` (OpenAI usage semantics; Anthropic usage is
/// converted to them). Rounds up so metering never under-bills by a fraction of a nano-dollar.
pub fn cost_nanos(
    prompt_tokens: u64,
    cached_tokens: u64,
    cache_write_tokens: u64,
    completion_tokens: u64,
    price: &Price,
) -> u64 {
    let read = cached_tokens.min(prompt_tokens);
    let write = cache_write_tokens.min(prompt_tokens - read);
    let plain = prompt_tokens - read - write;
    let total = u128::from(plain) * u128::from(price.input)
        + u128::from(read) * u128::from(price.cached_input)
        + u128::from(write) * u128::from(price.cache_write)
        + u128::from(completion_tokens) * u128::from(price.output);
    u64::try_from(total.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// A dollar amount in config, held as integer nano-dollars: a string (`"2.50"`, `"$2.50"`) or
/// a number (`2.5`, converted via its shortest decimal form), parsed by [`usd_to_nanos`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UsdNanos(pub u64);

impl UsdNanos {
    /// Parses a dollar string exactly (see [`usd_to_nanos`]).
    pub fn parse(s: &str) -> Result<Self, MoneyError> {
        usd_to_nanos(s).map(UsdNanos)
    }

    /// Converts a config float exactly (see [`usd_f64_to_nanos`]).
    pub fn from_f64(v: f64) -> Result<Self, MoneyError> {
        usd_f64_to_nanos(v).map(UsdNanos)
    }
}

impl std::fmt::Display for UsdNanos {
    /// Dollars with at least 2 decimals (`1.50`, `0.000001234`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&nanos_to_usd_string(self.0))
    }
}

impl Serialize for UsdNanos {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&nanos_to_usd_string(self.0))
    }
}

impl<'de> Deserialize<'de> for UsdNanos {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, Visitor};
        struct V;
        impl Visitor<'_> for V {
            type Value = UsdNanos;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a USD amount as a string (\"2.50\") or number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UsdNanos, E> {
                UsdNanos::parse(v).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<UsdNanos, E> {
                UsdNanos::from_f64(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<UsdNanos, E> {
                v.checked_mul(NANOS_PER_USD)
                    .map(UsdNanos)
                    .ok_or_else(|| E::custom("USD amount is too large"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<UsdNanos, E> {
                let v =
                    u64::try_from(v).map_err(|_| E::custom("USD amount must not be negative"))?;
                self.visit_u64(v)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_usd() {
        assert_eq!(usd_to_nanos("2.50"), Ok(2_500_000_000));
        assert_eq!(usd_to_nanos("$0.15"), Ok(150_000_000));
        assert_eq!(usd_to_nanos(" 1_000 "), Ok(1_000 * NANOS_PER_USD));
        assert_eq!(usd_to_nanos(".5"), Ok(500_000_000));
        assert_eq!(usd_to_nanos("0.000000001"), Ok(1));
        assert_eq!(usd_to_nanos("0.0000000015"), Ok(2));
        assert_eq!(usd_to_nanos("0.0000000014999"), Ok(1));
        assert_eq!(usd_to_nanos("0"), Ok(0));
        assert!(usd_to_nanos("-1").is_err());
        assert!(usd_to_nanos("").is_err());
        assert!(usd_to_nanos("1e3").is_err());
        assert!(usd_to_nanos("1.2.3").is_err());
        assert!(usd_to_nanos("99999999999999999999").is_err());
        assert_eq!(usd_f64_to_nanos(0.15), Ok(150_000_000));
        assert_eq!(usd_f64_to_nanos(2.5), Ok(2_500_000_000));
        assert_eq!(usd_f64_to_nanos(1e-7), Ok(100));
        assert_eq!(usd_f64_to_nanos(0.1 + 0.2), Ok(300_000_000));
        assert!(usd_f64_to_nanos(f64::NAN).is_err());
        assert!(usd_f64_to_nanos(-0.5).is_err());
    }

    #[test]
    fn format_usd() {
        assert_eq!(nanos_to_usd_string(0), "0.00");
        assert_eq!(nanos_to_usd_string(1_500_000_000), "1.50");
        assert_eq!(nanos_to_usd_string(1), "0.000000001");
        assert_eq!(nanos_to_usd_string(123_456_000), "0.123456");
        assert_eq!(nanos_to_usd_string(u64::MAX), "18446744073.709551615");
    }

    #[test]
    fn cost() {
        // $2.50 / $1.25 / $10 per Mtok.
        let p = Price {
            input: 2_500_000_000,
            cached_input: 1_250_000_000,
            cache_write: 3_125_000_000,
            output: 10_000_000_000,
        };
        assert_eq!(cost_nanos(1_000_000, 0, 0, 0, &p), 2_500_000_000);
        assert_eq!(
            cost_nanos(1000, 400, 0, 500, &p),
            1_500_000 + 500_000 + 5_000_000
        );
        // Cached tokens beyond the prompt count are clamped.
        assert_eq!(cost_nanos(10, 50, 0, 0, &p), 12_500);
        // One token at a sub-nano price rounds up.
        let cheap = Price {
            input: 1,
            ..Price::default()
        };
        assert_eq!(cost_nanos(1, 0, 0, 0, &cheap), 1);
        assert_eq!(cost_nanos(u64::MAX, 0, 0, u64::MAX, &p), u64::MAX);
    }
}
