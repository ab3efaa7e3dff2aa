//! Reader timestamps: how a `regex` pattern's `timestamp` group is written
//! (`reader.timestamp_format`), and a reader's local wall-clock time to UTC. Used by the config
//! (to check the setting) and by the parsers; it depends on neither.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// How a regex `timestamp` group is written (`reader.timestamp_format`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimestampFormat {
    Rfc3339,
    /// Seconds since 1970, optionally with a fraction.
    Unix,
    UnixMs,
    /// A chrono strftime pattern in the reader's time zone; a pattern without a date is a time of day.
    Pattern(String),
}

impl TimestampFormat {
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "rfc3339" => TimestampFormat::Rfc3339,
            "unix" => TimestampFormat::Unix,
            "unix_ms" => TimestampFormat::UnixMs,
            pattern if pattern.contains('%') => {
                let items: Vec<_> = chrono::format::StrftimeItems::new(pattern).collect();
                if items.iter().any(|i| matches!(i, chrono::format::Item::Error)) {
                    return Err(format!("\"{pattern}\" is not a valid strftime pattern"));
                }
                TimestampFormat::Pattern(pattern.to_string())
            }
            other => {
                return Err(format!(
                    "\"{other}\" is not rfc3339, unix, unix_ms or a strftime pattern such as \"%d-%m-%Y %H:%M:%S%.3f\""
                ));
            }
        })
    }

    /// Convert one timestamp field to UTC.
    pub fn to_utc(&self, text: &str, tz: Tz, today: NaiveDate) -> Option<DateTime<Utc>> {
        let text = text.trim();
        match self {
            TimestampFormat::Rfc3339 => {
                DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc)).or_else(|| {
                    // Readers often omit the offset: then the time is in the reader's zone.
                    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").ok().and_then(|n| local_to_utc(n, tz))
                })
            }
            TimestampFormat::Unix => {
                let secs: f64 = text.parse().ok()?;
                if !secs.is_finite() {
                    return None;
                }
                let micros = (secs * 1e6).round() as i64;
                DateTime::from_timestamp_micros(micros)
            }
            TimestampFormat::UnixMs => DateTime::from_timestamp_millis(text.parse().ok()?),
            TimestampFormat::Pattern(p) => match NaiveDateTime::parse_from_str(text, p) {
                Ok(n) => local_to_utc(n, tz),
                Err(_) => {
                    let time = chrono::NaiveTime::parse_from_str(text, p).ok()?;
                    local_to_utc(today.and_time(time), tz)
                }
            },
        }
    }
}

/// The years a reader's time may name. Outside them it is refused (`bad_time`) before any
/// arithmetic: chrono panics on some conversions near its own limits (±262,143), and a reader
/// or a crafted line can name any year up to them.
pub const READER_YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;

/// A reader's local wall-clock time to UTC. In the repeated hour of a DST change the earlier
/// instant is taken; a time inside the skipped hour does not exist and is refused, and so is a
/// year outside [`READER_YEARS`].
pub fn local_to_utc(local: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    if !READER_YEARS.contains(&local.year()) {
        return None;
    }
    tz.from_local_datetime(&local).earliest().map(|t| t.with_timezone(&Utc))
}

/// UTC µs to the wall time of `tz` (what a reader set to that zone shows); `None` outside
/// [`READER_YEARS`].
pub fn utc_to_local(us: i64, tz: Tz) -> Option<NaiveDateTime> {
    let utc = DateTime::from_timestamp_micros(us).filter(|t| READER_YEARS.contains(&t.year()))?;
    utc.naive_utc().checked_add_offset(utc.with_timezone(&tz).offset().fix())
}

/// A parsed reader time inside [`READER_YEARS`], as UTC µs.
pub fn reader_us(t: DateTime<Utc>) -> Option<i64> {
    READER_YEARS.contains(&t.year()).then(|| t.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 3, 7).unwrap()
    }

    #[test]
    fn timestamp_formats() {
        let utc: Tz = "UTC".parse().unwrap();
        let madrid: Tz = "Europe/Madrid".parse().unwrap();
        let cases: &[(&str, &str, Tz, &str)] = &[
            ("rfc3339", "2018-06-14T00:15:54.36879Z", utc, "2018-06-14T00:15:54.368790Z"),
            ("rfc3339", "2018-06-14T02:15:54.5+02:00", utc, "2018-06-14T00:15:54.500Z"),
            ("rfc3339", "2026-07-01T10:00:00.250", madrid, "2026-07-01T08:00:00.250Z"),
            ("unix", "1700000000", utc, "2023-11-14T22:13:20Z"),
            ("unix", "1700000000.125", utc, "2023-11-14T22:13:20.125Z"),
            ("unix_ms", "1700000000125", utc, "2023-11-14T22:13:20.125Z"),
            ("%d-%m-%Y %H:%M:%S%.3f", "22-09-2011 02:41:30.620", utc, "2011-09-22T02:41:30.620Z"),
            ("%d-%m-%Y %H:%M:%S%.3f", "22-01-2026 10:00:00.000", madrid, "2026-01-22T09:00:00Z"),
            ("%Y/%m/%d %H:%M:%S", "2008/10/28 10:49:35", madrid, "2008-10-28T09:49:35Z"),
            // Time of day only: today's date in the reader's zone.
            ("%H:%M:%S%.3f", "09:20:25.100", utc, "2026-03-07T09:20:25.100Z"),
            // DST in Madrid: 2026-10-25 02:30 happens twice; the earlier (summer time) wins.
            ("%Y-%m-%d %H:%M:%S", "2026-10-25 02:30:00", madrid, "2026-10-25T00:30:00Z"),
        ];
        for (fmt, text, tz, want) in cases {
            let f = TimestampFormat::parse(fmt).unwrap();
            let got = f.to_utc(text, *tz, day()).unwrap_or_else(|| panic!("{fmt} {text}"));
            let want = DateTime::parse_from_rfc3339(want).unwrap().with_timezone(&Utc);
            assert_eq!(got, want, "{fmt} {text}");
        }
        // 2026-03-29 02:30 does not exist in Madrid (clocks jump 02:00 → 03:00).
        let f = TimestampFormat::parse("%Y-%m-%d %H:%M:%S").unwrap();
        assert_eq!(f.to_utc("2026-03-29 02:30:00", madrid, day()), None);
        assert_eq!(TimestampFormat::parse("unix").unwrap().to_utc("soon", utc, day()), None);
        assert!(TimestampFormat::parse("yesterday").is_err());
    }
}
