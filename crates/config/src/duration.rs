//! Durations written as a number and a unit: `250ms`, `2s`, `1.5s`, `24h`, `1h30m`.

use std::time::Duration;

/// The accepted units and their length in nanoseconds, in display order.
pub(crate) const UNITS: &[(&str, u128)] = &[
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
    ("d", 86_400 * 1_000_000_000),
];

/// At most this many fractional digits are significant (beyond nanoseconds for every unit).
const MAX_FRACTION_DIGITS: usize = 20;

/// Parses a duration: one or more `NUMBER UNIT` parts (`1h30m`), the number being decimal with an
/// optional fraction (`1.5s`), whitespace allowed between parts and before a unit. Sub-nanosecond
/// remainders are truncated. The error says what is wrong, without the allowed units.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("empty duration".to_owned());
    }
    let too_large = || "too large".to_owned();
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(after) => {
                let len = after.bytes().take_while(u8::is_ascii_digit).count();
                after.split_at(len)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(match after.chars().next() {
                Some(c) => format!("expected a number, found {c:?}"),
                None => "expected a number".to_owned(),
            });
        }
        let after = after.trim_start();
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err("missing unit".to_owned());
        }
        let Some(&(_, unit_ns)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(format!("unknown unit {unit:?}"));
        };
        let mut part: u128 = 0;
        for digit in int_part.bytes() {
            part = part
                .checked_mul(10)
                .and_then(|p| p.checked_add(u128::from(digit - b'0')))
                .ok_or_else(too_large)?;
        }
        part = part.checked_mul(unit_ns).ok_or_else(too_large)?;
        let frac_part = &frac_part[..frac_part.len().min(MAX_FRACTION_DIGITS)];
        if !frac_part.is_empty() {
            let mut numerator: u128 = 0;
            let mut denominator: u128 = 1;
            for digit in frac_part.bytes() {
                numerator = numerator * 10 + u128::from(digit - b'0');
                denominator *= 10;
            }
            // numerator < 10^20 and unit_ns < 10^14: the product fits in a u128 (< 10^38).
            part = part
                .checked_add(numerator * unit_ns / denominator)
                .ok_or_else(too_large)?;
        }
        total = total.checked_add(part).ok_or_else(too_large)?;
        rest = after.trim_start();
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_large())?;
    // The remainder of a division by 10^9 always fits in a u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn units_and_forms() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("2s"), Duration::from_secs(2));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("3.s"), Duration::from_secs(3));
        assert_eq!(ok("24h"), Duration::from_secs(86_400));
        assert_eq!(ok("1d"), Duration::from_secs(86_400));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("10us"), Duration::from_micros(10));
        assert_eq!(ok("1h30m"), Duration::from_secs(5_400));
        assert_eq!(ok(" 1h 30m "), Duration::from_secs(5_400));
        assert_eq!(ok("250 ms"), Duration::from_millis(250));
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("0.1us"), Duration::from_nanos(100));
        assert_eq!(ok("1.0000000000000000000000001s"), Duration::from_secs(1));
    }

    #[test]
    fn errors() {
        let err = |s: &str| parse_duration(s).unwrap_err();
        assert_eq!(err(""), "empty duration");
        assert_eq!(err("250"), "missing unit");
        assert_eq!(err("2 sec"), "unknown unit \"sec\"");
        assert_eq!(err("ms"), "expected a number, found 'm'");
        assert_eq!(err("-1s"), "expected a number, found '-'");
        assert_eq!(err("1s-"), "expected a number, found '-'");
        assert_eq!(
            err("99999999999999999999999999999999999999999d"),
            "too large"
        );
        assert_eq!(err("999999999999999999d"), "too large");
    }
}
