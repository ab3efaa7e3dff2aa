//! `ipico`: IPICO Elite/Lite ASCII records (readers.md §1). Reader local time, hundredths in hex,
//! a checksum over everything between the `aa` header and the checksum itself.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};
use chrono_tz::Tz;

use super::{Parsed, ParsedRead, Reject, local_to_utc};

const PLAIN_LEN: usize = 36;
const TTO_LEN: usize = 42;

pub struct IpicoParser {
    tz: Tz,
}

impl IpicoParser {
    pub fn new(tz: Tz) -> Self {
        Self { tz }
    }

    pub fn parse(&self, record: &[u8]) -> Parsed {
        let line = trim_eol(record);
        // Control replies (`ab…`), banners and anything else not starting `aa` share the stream.
        if !line.starts_with(b"aa") {
            return Parsed::Skip;
        }
        if line.len() != PLAIN_LEN && line.len() != TTO_LEN {
            return Parsed::Reject(Reject::BadLength);
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return Parsed::Reject(Reject::InvalidUtf8);
        };
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Parsed::Reject(Reject::BadField);
        }
        let body = &text[2..text.len() - 2];
        if checksum(body) != text[text.len() - 2..].to_ascii_lowercase() {
            return Parsed::Reject(Reject::BadChecksum);
        }
        let tag = &text[4..16];
        // A stored-read download or a seen-memory overflow re-sends a read with its original
        // time (and other I/Q counters): reader, tag and time identify it.
        let replay_key = Some(format!("ipico:{}:{}:{}", &text[2..4], tag.to_ascii_lowercase(), &text[20..34]));
        let Some(reader_time) = self.time(&text[20..26], &text[26..32], &text[32..34]) else {
            return Parsed::Reject(Reject::BadTime);
        };
        Parsed::Read(ParsedRead {
            chip: tag.to_ascii_lowercase(),
            antenna: None,
            rssi: None,
            reader_time: Some(reader_time),
            bib: None,
            replay_key,
        })
    }

    fn time(&self, yymmdd: &str, hhmmss: &str, hundredths_hex: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let num = |s: &str| s.parse::<u32>().ok();
        let date =
            NaiveDate::from_ymd_opt(2000 + num(&yymmdd[0..2])? as i32, num(&yymmdd[2..4])?, num(&yymmdd[4..6])?)?;
        let hundredths = u32::from_str_radix(hundredths_hex, 16).ok().filter(|h| *h < 100)?;
        let time = NaiveTime::from_hms_milli_opt(
            num(&hhmmss[0..2])?,
            num(&hhmmss[2..4])?,
            num(&hhmmss[4..6])?,
            hundredths * 10,
        )?;
        local_to_utc(NaiveDateTime::new(date, time), self.tz)
    }
}

/// Low byte of the sum of the ASCII codes, as two lowercase hex digits.
pub fn checksum(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |acc, b| acc.wrapping_add(b));
    format!("{sum:02x}")
}

/// Build a valid plain record (simulator, tests): reader id, 12-hex tag, local time.
pub fn encode(reader_id: u8, tag: &str, local: NaiveDateTime) -> String {
    use chrono::{Datelike, Timelike};
    let hundredths = local.nanosecond() / 10_000_000;
    let body = format!(
        "{reader_id:02x}{tag:0>12}0001{:02}{:02}{:02}{:02}{:02}{:02}{hundredths:02x}",
        local.year() % 100,
        local.month(),
        local.day(),
        local.hour(),
        local.minute(),
        local.second()
    );
    format!("aa{body}{}", checksum(&body))
}

fn trim_eol(mut line: &[u8]) -> &[u8] {
    while let [rest @ .., b'\r' | b'\n'] = line {
        line = rest;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn parse(line: &str, tz: &str) -> Parsed {
        IpicoParser::new(tz.parse().unwrap()).parse(line.as_bytes())
    }

    #[test]
    fn verified_vectors() {
        let cases = [
            ("aa400000000123450a2a01123018455927a7", "000000012345", "2001-12-30T18:45:59.390Z"),
            ("aa0005800012860800012603062027472353", "058000128608", "2026-03-06T20:27:47.350Z"),
            ("aa000580001286080001260308122253100c00009d", "058000128608", "2026-03-08T12:22:53.160Z"),
        ];
        for (line, chip, time) in cases {
            match parse(&format!("{line}\r\n"), "UTC") {
                Parsed::Read(r) => {
                    assert_eq!(r.chip, chip);
                    assert_eq!(r.reader_time, Some(utc(time)), "{line}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn reader_local_time_is_converted() {
        // 20:27:47 in Madrid in March (UTC+1) is 19:27:47 UTC.
        match parse("aa0005800012860800012603062027472353", "Europe/Madrid") {
            Parsed::Read(r) => assert_eq!(r.reader_time, Some(utc("2026-03-06T19:27:47.350Z"))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejections_and_skips() {
        let good = "aa0005800012860800012603062027472353";
        let mut bad_sum = good.to_string();
        bad_sum.replace_range(34..36, "54");
        let cases: Vec<(String, Parsed)> = vec![
            (bad_sum, Parsed::Reject(Reject::BadChecksum)),
            (good[..35].to_string(), Parsed::Reject(Reject::BadLength)),
            (format!("{good}00"), Parsed::Reject(Reject::BadLength)),
            ("ab00000222".to_string(), Parsed::Skip),
            ("IPICO Elite v3.2".to_string(), Parsed::Skip),
            // Month 13 with a correct checksum.
            (encode_raw("0005800012860800012613062027472"), Parsed::Reject(Reject::BadTime)),
            // Hundredths 0x64 = 100 is impossible.
            (encode_raw("0005800012860800012603062027476"), Parsed::Reject(Reject::BadTime)),
            (format!("aa{}zz", &good[2..34]), Parsed::Reject(Reject::BadField)),
        ];
        for (line, want) in cases {
            assert_eq!(parse(&line, "UTC"), want, "{line}");
        }
    }

    /// 31 hex chars of body + a final digit pair, with a valid checksum.
    fn encode_raw(body31: &str) -> String {
        let body = if body31.ends_with('6') { format!("{body31}4") } else { format!("{body31}3") };
        format!("aa{body}{}", checksum(&body))
    }

    #[test]
    fn encode_round_trips() {
        let local = NaiveDateTime::parse_from_str("2026-11-28 09:15:02.470", "%Y-%m-%d %H:%M:%S%.3f").unwrap();
        let line = encode(1, "abc123", local);
        assert_eq!(line.len(), 36);
        match parse(&line, "UTC") {
            Parsed::Read(r) => {
                assert_eq!(r.chip, "000000abc123");
                assert_eq!(r.reader_time, Some(utc("2026-11-28T09:15:02.470Z")));
            }
            other => panic!("{other:?}"),
        }
    }
}
