//! FHIR date, dateTime and instant values as time ranges.
//!
//! FHIR compares dates as ranges: `2020` means all of 2020, `2020-03-01T10:00:00Z` one second.
//! Both search parameter values and resource elements become half-open ranges of microseconds
//! since the Unix epoch, which makes the search prefixes simple interval comparisons.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// `[start, end)` in microseconds since the Unix epoch. Open ends use `i64::MIN` / `i64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub start: i64,
    pub end: i64,
}

impl DateRange {
    pub const UNBOUNDED: DateRange = DateRange {
        start: i64::MIN,
        end: i64::MAX,
    };

    pub fn instant(micros: i64) -> Self {
        Self {
            start: micros,
            end: micros.saturating_add(1),
        }
    }
}

/// Parses a FHIR `date`, `dateTime` or `instant` (also a search value such as `2020-01-01T10:00`)
/// into the range it denotes. Values without a time zone are read as UTC.
pub fn parse_range(text: &str) -> Option<DateRange> {
    let (date_part, time_part) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut fields = date_part.split('-');
    let year: i32 = digits(fields.next()?, 4)?.try_into().ok()?;
    let month = match fields.next() {
        Some(m) => Some(digits(m, 2)?),
        None => None,
    };
    let day = match fields.next() {
        Some(d) => Some(digits(d, 2)?),
        None => None,
    };
    if fields.next().is_some() {
        return None;
    }

    let Some(time_part) = time_part else {
        // Partial or full date: the whole year, month or day.
        let (start, end) = match (month, day) {
            (None, None) => (
                Date::from_calendar_date(year, Month::January, 1).ok()?,
                Date::from_calendar_date(year + 1, Month::January, 1).ok()?,
            ),
            (Some(m), None) => {
                let start = Date::from_calendar_date(year, month_of(m)?, 1).ok()?;
                let next = if m == 12 {
                    Date::from_calendar_date(year + 1, Month::January, 1).ok()?
                } else {
                    Date::from_calendar_date(year, month_of(m + 1)?, 1).ok()?
                };
                (start, next)
            }
            (Some(m), Some(d)) => {
                let start =
                    Date::from_calendar_date(year, month_of(m)?, u8::try_from(d).ok()?).ok()?;
                (start, start.next_day()?)
            }
            (None, Some(_)) => return None,
        };
        return Some(DateRange {
            start: date_micros(start),
            end: date_micros(end),
        });
    };

    let date = Date::from_calendar_date(year, month_of(month?)?, u8::try_from(day?).ok()?).ok()?;
    // Split the zone off the clock time.
    let (clock, offset) = if let Some(c) = time_part.strip_suffix('Z') {
        (c, UtcOffset::UTC)
    } else if let Some(pos) = time_part.rfind(['+', '-']) {
        let (c, zone) = time_part.split_at(pos);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (h, m) = zone[1..].split_once(':')?;
        let h = i8::try_from(digits(h, 2)?).ok()?;
        let m = i8::try_from(digits(m, 2)?).ok()?;
        (c, UtcOffset::from_hms(sign * h, sign * m, 0).ok()?)
    } else {
        (time_part, UtcOffset::UTC)
    };
    let mut parts = clock.split(':');
    let hour = u8::try_from(digits(parts.next()?, 2)?).ok()?;
    let minute = u8::try_from(digits(parts.next()?, 2)?).ok()?;
    let (second, fraction, step) = match parts.next() {
        None => (0u8, 0i64, 60_000_000i64),
        Some(s) => {
            let (whole, frac) = match s.split_once('.') {
                Some((w, f)) => (w, Some(f)),
                None => (s, None),
            };
            let second = u8::try_from(digits(whole, 2)?).ok()?;
            match frac {
                None => (second, 0, 1_000_000),
                Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
                    // Precision beyond microseconds is kept as a one-microsecond range.
                    let used = &f[..f.len().min(6)];
                    let scale = 10i64.pow(6 - used.len() as u32);
                    (second, used.parse::<i64>().ok()? * scale, scale)
                }
                Some(_) => return None,
            }
        }
    };
    if parts.next().is_some() {
        return None;
    }
    // FHIR allows a leap second (60); treat it as the last second of the minute.
    let time = Time::from_hms(hour, minute, second.min(59)).ok()?;
    let at = PrimitiveDateTime::new(date, time).assume_offset(offset);
    let start = i64::try_from(at.unix_timestamp_nanos() / 1000).ok()? + fraction;
    Some(DateRange {
        start,
        end: start + step,
    })
}

/// Renders microseconds since the epoch as a FHIR `instant` in UTC (`2024-05-01T12:00:00.123456Z`).
pub fn format_instant(micros: i64) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let (y, m, d) = (at.year(), at.month() as u8, at.day());
    let (hh, mm, ss) = (at.hour(), at.minute(), at.second());
    format!(
        "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{:06}Z",
        at.microsecond()
    )
}

/// Renders microseconds since the epoch as an HTTP date (`Last-Modified`).
pub fn format_http_date(micros: i64) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[at.weekday().number_days_from_monday() as usize],
        at.day(),
        MONTHS[at.month() as usize - 1],
        at.year(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// Now, in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

fn digits(s: &str, len: usize) -> Option<u32> {
    if s.len() == len && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn month_of(m: u32) -> Option<Month> {
    Month::try_from(u8::try_from(m).ok()?).ok()
}

fn date_micros(date: Date) -> i64 {
    let at = PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_utc();
    i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn partial_dates_cover_their_whole_period() {
        let y = parse_range("2020").expect("year");
        assert_eq!(y.end - y.start, 366 * DAY);
        let m = parse_range("2021-02").expect("month");
        assert_eq!(m.end - m.start, 28 * DAY);
        let dec = parse_range("2021-12").expect("december");
        assert_eq!(dec.end - dec.start, 31 * DAY);
        let d = parse_range("2021-02-03").expect("day");
        assert_eq!(d.end - d.start, DAY);
        assert_eq!(
            d.start,
            parse_range("2021-02-03T00:00:00Z").expect("dt").start
        );
    }

    #[test]
    fn time_zones_and_fractions() {
        let a = parse_range("2021-02-03T10:00:00+02:00").expect("tz");
        let b = parse_range("2021-02-03T08:00:00Z").expect("utc");
        assert_eq!(a, b);
        let f = parse_range("2021-02-03T08:00:00.5Z").expect("fraction");
        assert_eq!(f.start - b.start, 500_000);
        assert_eq!(f.end - f.start, 100_000);
        let minute = parse_range("2021-02-03T08:00").expect("no seconds");
        assert_eq!(minute.end - minute.start, 60_000_000);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "20",
            "2020-13",
            "2020-02-30",
            "2020-1-01",
            "x2020",
            "2020-01-01T25:00Z",
            "2020-01-01T10:00:00+2",
        ] {
            assert!(parse_range(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn formats_round_trip() {
        let r = parse_range("2024-05-01T12:34:56.123456Z").expect("instant");
        assert_eq!(format_instant(r.start), "2024-05-01T12:34:56.123456Z");
        assert_eq!(format_http_date(r.start), "Wed, 01 May 2024 12:34:56 GMT");
    }
}
