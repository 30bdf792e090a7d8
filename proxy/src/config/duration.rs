//! Durations in the config file: `30s`, `15m`, `4h`, `2d`, `1h30m`.
//!
//! A duration is one or more `<digits><unit>` parts with units `s`, `m`, `h`
//! and `d` (24 hours), added together. Parts may repeat and come in any order
//! (`1h30m`, `90m` and `30m1h` are the same). Empty strings, signs, spaces
//! inside, fractions, missing or unknown units, and values that overflow are
//! rejected.

use chrono::Duration;

/// Parses a config duration (see the module docs).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err(
            "empty duration (expected e.g. \"30s\", \"15m\", \"4h\", \"1h30m\", \"2d\")".into(),
        );
    }
    if s.starts_with('-') {
        return Err(format!("{text:?}: durations cannot be negative"));
    }
    let mut total: i64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "{text:?} is not a duration (expected e.g. \"30s\", \"15m\", \"4h\", \"1h30m\", \"2d\")"
            ));
        }
        let (num, after) = rest.split_at(digits);
        let mut value: i64 = 0;
        for b in num.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(i64::from(b - b'0')))
                .ok_or_else(|| format!("{text:?} is too long a duration"))?;
        }
        let unit_len = after
            .chars()
            .take_while(|c| !c.is_ascii_digit())
            .map(char::len_utf8)
            .sum::<usize>();
        let (unit, tail) = after.split_at(unit_len);
        let factor: i64 = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "" => {
                return Err(format!(
                    "{text:?}: missing unit after {num} (use s, m, h or d, e.g. \"{num}m\")"
                ))
            }
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use s, m, h or d)"
                ))
            }
        };
        total = value
            .checked_mul(factor)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{text:?} is too long a duration"))?;
        rest = tail;
    }
    Duration::try_seconds(total).ok_or_else(|| format!("{text:?} is too long a duration"))
}

/// Formats a duration in the config spelling, whole seconds, largest units
/// first (`1h30m`, `2d`, `0s`); `parse_duration` reads it back. Negative
/// durations get a leading `-` (which `parse_duration` rejects).
pub fn format_duration(d: Duration) -> String {
    let secs = d.num_seconds();
    let mut rest = secs.unsigned_abs();
    if rest == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    if secs < 0 {
        out.push('-');
    }
    for (unit, size) in [("d", 86_400u64), ("h", 3_600), ("m", 60), ("s", 1)] {
        let n = rest / size;
        if n > 0 {
            out.push_str(&n.to_string());
            out.push_str(unit);
            rest %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_documented_spellings() {
        let p = |s: &str| parse_duration(s).unwrap().num_seconds();
        assert_eq!(p("30s"), 30);
        assert_eq!(p("1m"), 60);
        assert_eq!(p("15m"), 900);
        assert_eq!(p("4h"), 4 * 3600);
        assert_eq!(p("168h"), 168 * 3600);
        assert_eq!(p("1h30m"), 5400);
        assert_eq!(p("2d"), 2 * 86_400);
        assert_eq!(p("1d2h3m4s"), 86_400 + 7200 + 180 + 4);
        assert_eq!(p("30m1h"), 5400);
        assert_eq!(p("0s"), 0);
        assert_eq!(p(" 8h "), 8 * 3600);
        assert_eq!(p("007m"), 420);
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "", "   ", "-1h", "+1h", "h", "1", "10", "1x", "1hm", "1 h", "1h 30m", "1.5h", "1H",
            "1ms", "1w", "1y", "h1", "1h-", "∞", "1µs", "1hé",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn rejects_overflow() {
        assert!(parse_duration("9223372036854775807s").is_err());
        assert!(parse_duration("9223372036854775808s").is_err());
        assert!(parse_duration("99999999999999999999999999h").is_err());
        assert!(parse_duration("106751991167300d").is_err());
        assert!(parse_duration("100000000000000d").is_err());
        // Large but representable.
        assert_eq!(parse_duration("36500d").unwrap().num_days(), 36_500);
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        assert!(parse_duration("5").unwrap_err().contains("missing unit"));
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("-5m").unwrap_err().contains("negative"));
        assert!(parse_duration("").unwrap_err().contains("empty"));
    }

    #[test]
    fn formats_largest_units_first() {
        assert_eq!(format_duration(Duration::seconds(0)), "0s");
        assert_eq!(format_duration(Duration::seconds(5400)), "1h30m");
        assert_eq!(format_duration(Duration::hours(48)), "2d");
        assert_eq!(format_duration(Duration::seconds(-90)), "-1m30s");
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn parse_never_panics_on_duration_like_text(s in "[0-9smhd+ -]{0,30}") {
            if let Ok(d) = parse_duration(&s) {
                prop_assert!(d >= Duration::zero());
            }
        }

        #[test]
        fn parts_add_up(d in 0i64..1000, h in 0i64..1000, m in 0i64..1000, s in 0i64..100_000) {
            let text = format!("{d}d{h}h{m}m{s}s");
            let got = parse_duration(&text).unwrap();
            prop_assert_eq!(got.num_seconds(), d * 86_400 + h * 3_600 + m * 60 + s);
        }

        #[test]
        fn format_round_trips(secs in 0i64..(i64::MAX / 1000)) {
            let d = Duration::seconds(secs);
            prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}
