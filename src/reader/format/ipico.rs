//! `ipico`: IPICO Elite/Lite ASCII records (readers.md §1). Reader local time, hundredths in hex,
//! a checksum over everything between the `aa` header and the checksum itself.

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use chrono_tz::Tz;

use crate::reader::record::{Parsed, ParsedRead, Reject};
use crate::timestamp::local_to_utc;

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

// The control frames (`ab…`, on the stream's own socket or serial line): reader-control.md.

/// Instructions.
pub const GET_CLOCK: u8 = 0x02;
pub const SET_CLOCK: u8 = 0x01;
pub const DOWNLOAD: u8 = 0x4b;
/// The reader's own sync delay after a set, announced as `ab00094c…01f4`: the new second
/// takes effect at the next roll-over, about this much later.
pub const SET_ROLLOVER_MS: u64 = 500;

/// A frame to the reader: `ab`, reader id 00, data length, instruction, data, LRC (the low
/// byte of the ASCII sum of everything after `ab`), with its line end.
pub fn frame(instruction: u8, data: &[u8]) -> String {
    let mut body = format!("00{:02x}{instruction:02x}", data.len());
    for b in data {
        body.push_str(&format!("{b:02x}"));
    }
    format!("ab{body}{}\r\n", checksum(&body))
}

/// Ask for the clock.
pub fn get_clock() -> String {
    frame(GET_CLOCK, &[])
}

fn bcd(n: u32) -> u8 {
    (((n / 10) % 10) << 4 | (n % 10)) as u8
}

/// Set the clock to `local` (the reader keeps wall time with no zone), to the second:
/// `YYMMDD DW HHMMSS` in BCD, day of week Monday = 1 as the spec says.
pub fn set_clock(local: NaiveDateTime) -> String {
    frame(SET_CLOCK, &bcd_time(local))
}

/// `YYMMDD DW HHMMSS` in BCD.
fn bcd_time(local: NaiveDateTime) -> [u8; 7] {
    [
        bcd(local.year() as u32 % 100),
        bcd(local.month()),
        bcd(local.day()),
        bcd(local.weekday().number_from_monday()),
        bcd(local.hour()),
        bcd(local.minute()),
        bcd(local.second()),
    ]
}

/// The reader's answer to [`get_clock`] (for the emulator and the tests): the time to 10 ms
/// and the configuration byte.
#[cfg(any(test, feature = "test-support"))]
pub fn clock_reply(local: NaiveDateTime, config: u8) -> String {
    let mut data = bcd_time(local).to_vec();
    data.extend([(local.nanosecond() / 10_000_000) as u8, config]);
    frame(GET_CLOCK, &data)
}

/// The stored-read download (rewind): init, configure, start; then stop and clean up once
/// progress reaches the extent (the reader does not stop by itself).
pub fn download_init() -> String {
    frame(DOWNLOAD, &[0x02])
}
pub fn download_configure() -> String {
    frame(DOWNLOAD, &[0x07, 0x01, 0x05])
}
pub fn download_start() -> String {
    frame(DOWNLOAD, &[0x01, 0x01])
}
pub fn download_stop() -> String {
    frame(DOWNLOAD, &[0x01, 0x00])
}
pub fn download_cleanup() -> String {
    frame(DOWNLOAD, &[0x07, 0x00])
}

/// A reply from the reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The instruction was taken.
    Ack {
        instruction: u8,
    },
    /// The clock: local wall time to 10 ms, and the configuration byte.
    Clock {
        local: NaiveDateTime,
        config: u8,
    },
    /// The download: its state (1 idle, 3 running), how many records it holds and how many
    /// were sent (page:offset counters, comparable as numbers).
    Download {
        state: u8,
        extent: u32,
        progress: u32,
    },
    /// The reader's sync delay after a set clock, in ms.
    SyncDelay {
        ms: u16,
    },
    /// An error code: 0xf1 bad LRC, 0xf2 unknown instruction.
    Error {
        code: u8,
    },
    Other {
        instruction: u8,
        data: Vec<u8>,
    },
}

impl Reply {
    /// The download is over: the reader holds nothing, or is downloading (state 3) and has
    /// sent all it holds. The one rule for it: an idle status left from an earlier download
    /// (state 1, progress = extent) does not end this one.
    pub fn download_done(&self) -> bool {
        match self {
            Reply::Download { extent: 0, .. } => true,
            Reply::Download { state: 3, extent, progress } => progress >= extent,
            _ => false,
        }
    }
}

/// Why a control frame (`ab…`) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadFrame {
    #[error("not a control frame")]
    NotControl,
    #[error("too short, or not ASCII")]
    Short,
    #[error("bad LRC")]
    Checksum,
    #[error("not hex")]
    NotHex,
    #[error("its length byte does not match its data")]
    Length,
    #[error("a field out of range")]
    Field,
}

/// Parse a control reply (`ab…`), checking its LRC and length.
pub fn parse_reply(line: &str) -> Result<Reply, BadFrame> {
    let line = line.trim_end_matches(['\r', '\n']);
    let body = line.strip_prefix("ab").ok_or(BadFrame::NotControl)?;
    if body.len() < 8 || !body.is_ascii() || !body.len().is_multiple_of(2) {
        return Err(BadFrame::Short);
    }
    let (body, lrc) = body.split_at(body.len() - 2);
    if checksum(body) != lrc.to_ascii_lowercase() {
        return Err(BadFrame::Checksum);
    }
    let bytes: Vec<u8> = (0..body.len() / 2)
        .map(|i| u8::from_str_radix(&body[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| BadFrame::NotHex)?;
    let (len, instruction, data) = (bytes[1] as usize, bytes[2], &bytes[3..]);
    if len != data.len() {
        return Err(BadFrame::Length);
    }
    let from_bcd = |b: u8| -> Option<u32> {
        let (hi, lo) = (b >> 4, b & 0x0f);
        (hi < 10 && lo < 10).then_some(u32::from(hi) * 10 + u32::from(lo))
    };
    let counter = |d: &[u8]| (u32::from(d[0]) << 16) | (u32::from(d[1]) << 8) | u32::from(d[2]);
    Ok(match (instruction, data.len()) {
        (0xf1 | 0xf2, 0) => Reply::Error { code: instruction },
        (_, 0) => Reply::Ack { instruction },
        (GET_CLOCK, 9) => {
            let bcd = |b: u8| from_bcd(b).ok_or(BadFrame::Field);
            let date = NaiveDate::from_ymd_opt(2000 + bcd(data[0])? as i32, bcd(data[1])?, bcd(data[2])?)
                .ok_or(BadFrame::Field)?;
            let hundredths = u32::from(data[7]);
            if hundredths >= 100 {
                return Err(BadFrame::Field);
            }
            let time = NaiveTime::from_hms_milli_opt(bcd(data[4])?, bcd(data[5])?, bcd(data[6])?, hundredths * 10)
                .ok_or(BadFrame::Field)?;
            Reply::Clock { local: NaiveDateTime::new(date, time), config: data[8] }
        }
        (DOWNLOAD, 12 | 13) => {
            Reply::Download { state: data[0], extent: counter(&data[1..4]), progress: counter(&data[4..7]) }
        }
        (0x4c, 9) => Reply::SyncDelay { ms: u16::from(data[7]) << 8 | u16::from(data[8]) },
        _ => Reply::Other { instruction, data: data.to_vec() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: u32) -> chrono::NaiveDateTime {
        chrono::NaiveDate::from_ymd_opt(y, mo, d).unwrap().and_hms_milli_opt(h, mi, s, ms).unwrap()
    }
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

    #[test]
    fn ipico_commands_byte_for_byte() {
        assert_eq!(get_clock(), "ab00000222\r\n");
        assert_eq!(set_clock(at(2026, 3, 6, 19, 49, 21, 0)), "ab00070126030605194921f8\r\n");
        assert_eq!(download_init(), "ab00014b02b9\r\n");
        assert_eq!(download_configure(), "ab00034b07010586\r\n");
        assert_eq!(download_start(), "ab00024b01011a\r\n");
        assert_eq!(download_stop(), "ab00024b010019\r\n");
        assert_eq!(download_cleanup(), "ab00024b07001f\r\n");
        // Recording on and off (captured): the same frame builder gives them.
        assert_eq!(frame(DOWNLOAD, &[0x00, 0x01]), "ab00024b000119\r\n");
        assert_eq!(frame(DOWNLOAD, &[0x00, 0x00]), "ab00024b000018\r\n");
    }

    #[test]
    fn ipico_replies_parse() {
        assert_eq!(
            parse_reply("ab000902260306051855443727cf").unwrap(),
            Reply::Clock { local: at(2026, 3, 6, 18, 55, 44, 550), config: 0x27 }
        );
        assert_eq!(
            parse_reply("ab000902260306051949052a27f9").unwrap(),
            Reply::Clock { local: at(2026, 3, 6, 19, 49, 5, 420), config: 0x27 }
        );
        assert_eq!(
            parse_reply("ab000902260306051949210027c4").unwrap(),
            Reply::Clock { local: at(2026, 3, 6, 19, 49, 21, 0), config: 0x27 }
        );
        // And produced byte for byte, as the emulator answers.
        assert_eq!(clock_reply(at(2026, 3, 6, 18, 55, 44, 550), 0x27), "ab000902260306051855443727cf\r\n");
        assert_eq!(clock_reply(at(2026, 3, 6, 19, 49, 21, 0), 0x27), "ab000902260306051949210027c4\r\n");
        assert_eq!(parse_reply("ab00000121\r\n").unwrap(), Reply::Ack { instruction: SET_CLOCK });
        assert_eq!(parse_reply("ab00094c01555202a8555201f459").unwrap(), Reply::SyncDelay { ms: 500 });
        assert_eq!(parse_reply("ab0000f157").unwrap(), Reply::Error { code: 0xf1 });
        assert_eq!(parse_reply("ab0000f258").unwrap(), Reply::Error { code: 0xf2 });
        let idle = parse_reply("ab000d4b010204f60000000059058f031406").unwrap();
        assert_eq!(idle, Reply::Download { state: 1, extent: 0x0204f6, progress: 0 });
        for line in ["ab000c4b010204f60000000059058f03a0", "ab000c4b030204f60000000059058f03a2"] {
            assert!(
                matches!(parse_reply(line).unwrap(), Reply::Download { extent: 0x0204f6, progress: 0, .. }),
                "{line}"
            );
        }
        let going = parse_reply("ab000d4b030204f600016c0059058f03003d").unwrap();
        assert_eq!(going, Reply::Download { state: 3, extent: 0x0204f6, progress: 0x00016c });
        assert!(!going.download_done());
        assert!(parse_reply("ab000d4b030204f60204f60059058f030045").unwrap().download_done());
        assert!(parse_reply("ab000d4b030000000000000059058f0100bf").unwrap().download_done(), "empty memory");
        // After stop and cleanup: idle, everything sent.
        let after = parse_reply("ab000c4b010204f60204f60059058f03e2").unwrap();
        assert_eq!(after, Reply::Download { state: 1, extent: 0x0204f6, progress: 0x0204f6 });
        // A corrupted LRC is refused (as the spec's own GET example would be: its LRC is wrong).
        assert_eq!(parse_reply("ab0009022603060518554437274f").unwrap_err(), BadFrame::Checksum);
        assert_eq!(parse_reply("abzz").unwrap_err(), BadFrame::Short);
        assert!(!after.download_done(), "an idle status left from an earlier download ends nothing");
    }
}
