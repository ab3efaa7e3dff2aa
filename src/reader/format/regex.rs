//! `regex`: any line-based reader, described by one regular expression with named groups
//! `chip` (required), `timestamp`, `antenna`, `rssi`, `bib`.

use chrono::NaiveDate;
use chrono_tz::Tz;

use crate::config::ChipEncoding;
use crate::reader::record::{Parsed, ParsedRead, Reject, decode_ascii_chip};
use crate::timestamp::TimestampFormat;

pub struct RegexParser {
    re: regex::Regex,
    timestamp_format: TimestampFormat,
    tz: Tz,
    encoding: ChipEncoding,
}

impl RegexParser {
    pub fn encoding(&self) -> ChipEncoding {
        self.encoding
    }

    pub fn new(
        pattern: &str,
        timestamp_format: TimestampFormat,
        tz: Tz,
        encoding: ChipEncoding,
    ) -> anyhow::Result<Self> {
        Ok(Self { re: regex::Regex::new(pattern)?, timestamp_format, tz, encoding })
    }

    pub fn parse(&self, record: &[u8], today: NaiveDate) -> Parsed {
        let Ok(line) = std::str::from_utf8(record) else {
            return Parsed::Reject(Reject::InvalidUtf8);
        };
        let line = line.trim_end_matches(['\r', '\n']);
        let Some(caps) = self.re.captures(line) else {
            return Parsed::Reject(Reject::NoMatch);
        };
        let Some(chip) = caps.name("chip").map(|m| m.as_str().trim()).filter(|c| !c.is_empty()) else {
            return Parsed::Reject(Reject::NoMatch);
        };
        let chip = match self.encoding {
            ChipEncoding::Hex => chip.to_string(),
            ChipEncoding::Ascii => match decode_ascii_chip(chip) {
                Some(c) => c,
                None => return Parsed::Reject(Reject::BadField),
            },
        };
        let number = |name: &str| -> Result<Option<i64>, Reject> {
            match caps.name(name).map(|m| m.as_str().trim()).filter(|s| !s.is_empty()) {
                None => Ok(None),
                Some(text) => parse_int(text).map(Some).ok_or(Reject::BadField),
            }
        };
        let (antenna, rssi) = match (number("antenna"), number("rssi")) {
            (Ok(a), Ok(r)) => (a, r),
            _ => return Parsed::Reject(Reject::BadField),
        };
        let reader_time = match caps.name("timestamp").map(|m| m.as_str()).filter(|s| !s.trim().is_empty()) {
            None => None,
            Some(text) => match self.timestamp_format.to_utc(text, self.tz, today) {
                Some(t) => Some(t),
                None => return Parsed::Reject(Reject::BadTime),
            },
        };
        let bib = caps.name("bib").map(|m| m.as_str().trim().to_string()).filter(|b| !b.is_empty());
        Parsed::Read(ParsedRead { chip, antenna, rssi, reader_time, bib, replay_key: None })
    }
}

/// Decimal, or hex with a `0x` prefix or a plain hex byte such as Wiclax's antenna `0A`.
fn parse_int(text: &str) -> Option<i64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return i64::from_str_radix(hex, 16).ok();
    }
    text.parse().ok().or_else(|| i64::from_str_radix(text, 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    fn parser(pattern: &str, ts: &str, tz: &str) -> RegexParser {
        RegexParser::new(pattern, TimestampFormat::parse(ts).unwrap(), tz.parse().unwrap(), ChipEncoding::Hex).unwrap()
    }

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 28).unwrap()
    }

    fn utc(s: &str) -> Option<DateTime<Utc>> {
        Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn default_pattern_takes_bare_hex_lines() {
        let p = parser("^(?P<chip>[0-9A-Fa-f]+)$", "rfc3339", "UTC");
        match p.parse(b"E2000017221101441890ABCD\r\n", today()) {
            Parsed::Read(r) => {
                assert_eq!(r.chip, "E2000017221101441890ABCD");
                assert_eq!((r.antenna, r.rssi, r.reader_time, r.bib), (None, None, None, None));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.parse(b"hello world", today()), Parsed::Reject(Reject::NoMatch));
        assert_eq!(p.parse(&[0xff, 0xfe, b'A'], today()), Parsed::Reject(Reject::InvalidUtf8));
    }

    #[test]
    fn csv_alien_and_wiclax_by_configuration_alone() {
        let csv =
            parser(r"^(?P<chip>[0-9A-F]+),(?P<timestamp>[^,]+),(?P<antenna>\d+),(?P<rssi>-?\d+)$", "rfc3339", "UTC");
        match csv.parse(b"E2801160600002085A2B,2026-11-28T09:00:01.250Z,2,-61", today()) {
            Parsed::Read(r) => {
                assert_eq!(r.chip, "E2801160600002085A2B");
                assert_eq!(r.antenna, Some(2));
                assert_eq!(r.rssi, Some(-61));
                assert_eq!(r.reader_time, utc("2026-11-28T09:00:01.250Z"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(csv.parse(b"E280,not-a-time,2,-61", today()), Parsed::Reject(Reject::BadTime));

        let alien = parser(
            r"^Tag:(?P<chip>[0-9A-F ]+?), Disc:(?P<timestamp>[0-9/ :]+), .*Ant:(?P<antenna>\d+)",
            "%Y/%m/%d %H:%M:%S",
            "Europe/Madrid",
        );
        match alien.parse(
            b"Tag:0102 0304 0506 0708, Disc:2008/10/28 10:49:35, Last:2008/10/28 10:49:35, Count:1, Ant:3",
            today(),
        ) {
            Parsed::Read(r) => {
                assert_eq!(r.chip, "0102 0304 0506 0708");
                assert_eq!(r.antenna, Some(3));
                assert_eq!(r.reader_time, utc("2008-10-28T09:49:35Z"));
            }
            other => panic!("{other:?}"),
        }

        let wiclax = parser(
            r"^(?P<chip>\d+);(?P<timestamp>[^;]+);(?P<antenna>[0-9A-F]+);(?P<rssi>\d*);",
            "%d-%m-%Y %H:%M:%S%.3f",
            "UTC",
        );
        match wiclax.parse(b"01539;22-09-2011 02:41:30.620;0A;559;;0", today()) {
            Parsed::Read(r) => {
                assert_eq!(r.chip, "01539");
                assert_eq!(r.antenna, Some(10));
                assert_eq!(r.rssi, Some(559));
                assert_eq!(r.reader_time, utc("2011-09-22T02:41:30.620Z"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bib_group_and_ascii_chips() {
        let p = RegexParser::new(
            r"^(?P<chip>[0-9A-F]+);(?P<bib>\d*)$",
            TimestampFormat::Rfc3339,
            "UTC".parse().unwrap(),
            ChipEncoding::Ascii,
        )
        .unwrap();
        match p.parse(b"00323038;208", today()) {
            Parsed::Read(r) => assert_eq!((r.chip.as_str(), r.bib.as_deref()), ("208", Some("208"))),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.parse(b"0000;", today()), Parsed::Reject(Reject::BadField));
    }
}
