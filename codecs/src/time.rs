//! Calendar arithmetic for device clocks: civil date ⇄ seconds since 1970, RFC 3339 output.
//!
//! The proleptic Gregorian algorithms are Howard Hinnant's `days_from_civil` /
//! `civil_from_days` (public domain, <https://howardhinnant.github.io/date_algorithms.html>).
//! No system clock is read: deciding whether a device time is plausible needs "now", which
//! the gateway passes in.

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

/// Seconds since 1970-01-01T00:00:00 of a civil date-time, or `None` if any part is out of
/// range (month 13, 31 April, hour 24, ...). Device clocks send such values when unset.
pub fn from_civil(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Option<i64> {
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 || s > 59
    {
        return None;
    }
    Some(
        days_from_civil(y, mo, d) * 86_400
            + i64::from(h) * 3600
            + i64::from(mi) * 60
            + i64::from(s),
    )
}

/// `2026-11-21T08:00:00Z` (with `utc`) or `2026-11-21T08:00:00` (a zoneless wall clock).
pub fn format_rfc3339(t: i64, utc: bool) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        if utc { "Z" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_across_eras() {
        for days in [-800_000, -1, 0, 1, 10_957, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn known_instants() {
        assert_eq!(from_civil(2015, 5, 11, 22, 1, 31), Some(1_431_381_691));
        assert_eq!(format_rfc3339(1_665_561_758, true), "2022-10-12T08:02:38Z");
        assert_eq!(format_rfc3339(0, false), "1970-01-01T00:00:00");
    }

    #[test]
    fn rejects_impossible_dates() {
        assert_eq!(from_civil(2023, 2, 29, 0, 0, 0), None);
        assert!(from_civil(2024, 2, 29, 0, 0, 0).is_some());
        assert_eq!(from_civil(2024, 4, 31, 0, 0, 0), None);
        assert_eq!(from_civil(2024, 13, 1, 0, 0, 0), None);
        assert_eq!(from_civil(2024, 1, 1, 24, 0, 0), None);
    }
}
