//! RFC 3339 formatting and parsing of `SystemTime`, and short duration
//! strings (`10s`, `500ms`), without a date library.
//!
//! Civil-date conversions use Howard Hinnant's `days_from_civil` and
//! `civil_from_days` algorithms for the proleptic Gregorian calendar.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECONDS_PER_DAY: i64 = 86_400;

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Seconds and nanoseconds since the epoch; seconds may be negative, nanos
/// are always in `[0, 1e9)`.
fn split(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (secs, nanos) = (d.as_secs() as i64, d.subsec_nanos());
            if nanos == 0 {
                (-secs, 0)
            } else {
                (-secs - 1, 1_000_000_000 - nanos)
            }
        }
    }
}

/// Formats `t` as RFC 3339 in UTC, with as many fractional digits as
/// needed (none, 3, 6 or 9).
pub fn format_rfc3339(t: SystemTime) -> String {
    let (secs, nanos) = split(t);
    let (year, month, day) = civil_from_days(secs.div_euclid(SECONDS_PER_DAY));
    let rem = secs.rem_euclid(SECONDS_PER_DAY);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let frac = if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}{frac}Z")
}

/// Parses an RFC 3339 timestamp (`2024-05-01T12:00:00Z`, optional
/// fraction, `Z` or `±hh:mm` offset) or a number of seconds since the epoch
/// (`1714564800`, `1714564800.25`, `-5`).
pub fn parse_timestamp(s: &str) -> Result<SystemTime, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if !secs.is_finite() {
            return Err(format!("timestamp {s:?} is not finite"));
        }
        let d =
            Duration::try_from_secs_f64(secs.abs()).map_err(|e| format!("timestamp {s:?}: {e}"))?;
        return if secs >= 0.0 {
            UNIX_EPOCH.checked_add(d)
        } else {
            UNIX_EPOCH.checked_sub(d)
        }
        .ok_or_else(|| format!("timestamp {s:?} is out of range"));
    }
    parse_rfc3339(s).ok_or_else(|| {
        format!("timestamp {s:?} is neither RFC 3339 (2024-05-01T12:00:00Z) nor seconds since the epoch")
    })
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = frac[..digits].parse::<u32>().ok()? * 10u32.pow(9 - digits as u32);
        rest = &frac[digits..];
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[3..4], ":") => {
            let sign = match &rest[..1] {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            let (oh, om) = (num(s.len() - 5..s.len() - 3)?, num(s.len() - 2..s.len())?);
            sign * i64::from(oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * SECONDS_PER_DAY + i64::from(hour * 3600 + minute * 60 + second) - offset_secs;
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))?
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?
    };
    t.checked_add(Duration::from_nanos(u64::from(nanos)))
}

/// Parses `10s`, `500ms`, `2m`, `1h`, `250us` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split_at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split_at);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("duration {s:?} does not start with a number"))?;
    let unit_secs = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" => 1e-6,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "duration {s:?} has unknown unit {other:?} (use us, ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(value * unit_secs).map_err(|e| format!("duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64, nanos: u32) -> SystemTime {
        let base = if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        };
        base + Duration::from_nanos(u64::from(nanos))
    }

    #[test]
    fn formats_known_instants() {
        let cases = [
            (0, 0, "1970-01-01T00:00:00Z"),
            (951_782_400, 0, "2000-02-29T00:00:00Z"),
            (1_714_564_800, 250_000_000, "2024-05-01T12:00:00.250Z"),
            (1_714_564_800, 1_000, "2024-05-01T12:00:00.000001Z"),
            (1_714_564_800, 7, "2024-05-01T12:00:00.000000007Z"),
            (-1, 0, "1969-12-31T23:59:59Z"),
            (-1, 500_000_000, "1969-12-31T23:59:59.500Z"),
        ];
        for (secs, nanos, text) in cases {
            assert_eq!(format_rfc3339(at(secs, nanos)), text);
            assert_eq!(parse_timestamp(text), Ok(at(secs, nanos)), "{text}");
        }
    }

    #[test]
    fn round_trips_across_many_days() {
        let mut secs: i64 = -5_000_000_000;
        while secs < 5_000_000_000 {
            let t = at(secs, 123_456_000);
            assert_eq!(parse_timestamp(&format_rfc3339(t)), Ok(t), "secs {secs}");
            secs += 86_400 * 37 + 3_599;
        }
    }

    #[test]
    fn parses_offsets_and_epoch_seconds() {
        assert_eq!(
            parse_timestamp("2024-05-01T14:00:00+02:00"),
            Ok(at(1_714_564_800, 0))
        );
        assert_eq!(
            parse_timestamp("2024-05-01T07:30:00-04:30"),
            Ok(at(1_714_564_800, 0))
        );
        assert_eq!(parse_timestamp("1714564800"), Ok(at(1_714_564_800, 0)));
        assert_eq!(parse_timestamp("1.5"), Ok(at(1, 500_000_000)));
        assert_eq!(parse_timestamp("-2"), Ok(at(-2, 0)));
        for bad in [
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00:00.Z",
            "NaN",
            "inf",
        ] {
            assert!(parse_timestamp(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        for bad in ["", "s", "10 parsecs", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
