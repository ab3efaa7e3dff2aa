//! `ultra`: RFID Race Timing Systems Ultra (readers.md §3). LF-terminated CSV; time counts from
//! 1980-01-01 00:00 in the reader's local time; status lines and binary 0x03 records share the
//! stream.

use chrono::{NaiveDate, NaiveDateTime, TimeDelta};
use chrono_tz::Tz;

use crate::reader::record::{Framed, LineFramer, Parsed, ParsedRead, Reject};
use crate::timestamp::local_to_utc;

const FIELDS: usize = 12;
/// Extended status records start with this byte, then a length byte.
const BINARY_RECORD: u8 = 0x03;

/// Lines, except binary status records (`0x03 len bytes…`, which may contain LF) at line start.
#[derive(Debug)]
pub struct UltraFramer<T> {
    lines: LineFramer<T>,
    /// Bytes of a binary record still to skip; `Some(None)`: the length byte comes next.
    skip: Option<Option<usize>>,
}

impl<T: Copy> Default for UltraFramer<T> {
    fn default() -> Self {
        Self { lines: LineFramer::default(), skip: None }
    }
}

impl<T: Copy> UltraFramer<T> {
    pub fn push(&mut self, chunk: &[u8], stamp: T, out: &mut Vec<Framed<T>>) {
        let mut rest = chunk;
        while !rest.is_empty() {
            match self.skip {
                Some(None) => {
                    self.skip = Some(Some(rest[0] as usize));
                    rest = &rest[1..];
                }
                Some(Some(n)) => {
                    let take = n.min(rest.len());
                    rest = &rest[take..];
                    self.skip = if n - take == 0 { None } else { Some(Some(n - take)) };
                }
                None if self.lines.at_line_start() && rest[0] == BINARY_RECORD => {
                    self.skip = Some(None);
                    rest = &rest[1..];
                }
                None => {
                    // Feed up to and including the next line end; a 0x03 may follow it.
                    let end = rest.iter().position(|b| *b == b'\n' || *b == b'\r').map_or(rest.len(), |i| i + 1);
                    self.lines.push(&rest[..end], stamp, out);
                    rest = &rest[end..];
                }
            }
        }
    }

    pub fn reset(&mut self) {
        self.lines.reset();
        self.skip = None;
    }

    /// Nothing of a line or of a binary record is held.
    pub fn at_record_start(&self) -> bool {
        self.lines.at_line_start() && self.skip.is_none()
    }
}

/// The fields of a chip line, the one place a line is split: twelve, the first a number.
fn chip_fields(line: &str) -> Option<Vec<&str>> {
    let fields: Vec<&str> = line.trim().split(',').collect();
    (fields.len() == FIELDS && !fields[0].is_empty() && fields[0].bytes().all(|b| b.is_ascii_digit())).then_some(fields)
}

pub struct UltraParser {
    tz: Tz,
}

impl UltraParser {
    pub fn new(tz: Tz) -> Self {
        Self { tz }
    }

    pub fn parse(&self, record: &[u8]) -> Parsed {
        let Ok(line) = std::str::from_utf8(record) else { return Parsed::Reject(Reject::InvalidUtf8) };
        // Status lines (V=…, S=…, U…, u…, Connected,…) are not reads.
        let Some(fields) = chip_fields(line) else { return Parsed::Skip };
        let int = |i: usize| fields[i].trim().parse::<i64>().ok();
        let (Some(seconds), Some(millis), Some(antenna)) = (int(2), int(3), int(4)) else {
            return Parsed::Reject(Reject::BadField);
        };
        if antenna == 0 {
            // The start trigger, not a tag.
            return Parsed::Skip;
        }
        let chip = fields[1].trim();
        if chip.is_empty() || !(0..1000).contains(&millis) || seconds < 0 {
            return Parsed::Reject(Reject::BadField);
        }
        let epoch = NaiveDate::from_ymd_opt(1980, 1, 1).and_then(|d| d.and_hms_opt(0, 0, 0)).expect("valid date");
        // Checked all the way: `seconds` is whatever the line says, up to `i64::MAX`.
        let since_epoch = TimeDelta::try_seconds(seconds)
            .zip(TimeDelta::try_milliseconds(millis))
            .and_then(|(s, ms)| s.checked_add(&ms));
        let Some(local) = since_epoch.and_then(|d| epoch.checked_add_signed(d)) else {
            return Parsed::Reject(Reject::BadTime);
        };
        let Some(reader_time) = local_to_utc(local, self.tz) else { return Parsed::Reject(Reject::BadTime) };
        Parsed::Read(ParsedRead {
            chip: chip.to_string(),
            antenna: Some(antenna),
            rssi: int(5),
            reader_time: Some(reader_time),
            bib: None,
            // A rewind replays reads with their original time: the same chip at the same
            // millisecond on the same reader is the same read.
            replay_key: Some(format!("ultra:{}:{chip}:{seconds}.{millis:03}", fields[7].trim())),
        })
    }
}

// Commands (reader-control.md): ASCII, on the reader's own connection.

/// The two forms of the rewind command found in the sources: ChronoKeep's ASCII
/// (`600<from>\r<to>\n`) and PikaTimer's (`6␀␀<from>\r<to>\r`, "like RFIDServer").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Ascii,
    Binary,
}

fn command(form: Form, kind: u8, a: u64, b: u64) -> Vec<u8> {
    let mut out = vec![kind];
    match form {
        Form::Ascii => out.extend_from_slice(b"00"),
        Form::Binary => out.extend_from_slice(&[0, 0]),
    }
    out.extend_from_slice(format!("{a}\r{b}").as_bytes());
    out.push(if form == Form::Ascii { b'\n' } else { b'\r' });
    out
}

/// Replay the log from index `from` (≥ 1) to `to`.
pub fn rewind_by_index(form: Form, from: u64, to: u64) -> Vec<u8> {
    command(form, b'6', from.max(1), to)
}

/// Replay what was read between two local times (seconds since 1980-01-01 00:00 local).
pub fn rewind_by_time(form: Form, start: NaiveDateTime, end: NaiveDateTime) -> Vec<u8> {
    command(form, b'8', seconds_since_1980(start), seconds_since_1980(end))
}

/// Stop a replay.
pub const STOP: &[u8] = b"9";
/// Ask for the clock.
pub const GET_CLOCK: &[u8] = b"r";

pub fn seconds_since_1980(local: NaiveDateTime) -> u64 {
    let epoch = NaiveDate::from_ymd_opt(1980, 1, 1).unwrap_or_default().and_hms_opt(0, 0, 0).unwrap_or_default();
    (local - epoch).num_seconds().max(0) as u64
}

/// Set the clock (local time, to the second); only while the reader is not reading.
pub fn set_clock(local: NaiveDateTime) -> Vec<u8> {
    format!("t {}\n", local.format("%H:%M:%S %d-%m-%Y")).into_bytes()
}

/// The clock reply, `H:M:S D-M-YYYY (n)`, not zero-padded; local time, 1 s resolution.
pub fn parse_clock(line: &str) -> Option<NaiveDateTime> {
    let text = line.trim();
    let (stamp, rest) = text.split_once(" (")?;
    rest.strip_suffix(')')?;
    NaiveDateTime::parse_from_str(stamp, "%H:%M:%S %d-%m-%Y").ok()
}

/// Of a chip line: whether it is replayed (field 7, the rewind flag) and its log index
/// (field 12, the duplicate key).
pub fn replay_marks(line: &str) -> Option<(bool, u64)> {
    let fields = chip_fields(line)?;
    Some((fields[6].trim() == "1", fields[11].trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: u32) -> chrono::NaiveDateTime {
        chrono::NaiveDate::from_ymd_opt(y, mo, d).unwrap().and_hms_milli_opt(h, mi, s, ms).unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
    }
    use chrono::{DateTime, Utc};

    fn utc(s: &str) -> Option<DateTime<Utc>> {
        Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn chip_reads_and_their_local_time() {
        let p = UltraParser::new("UTC".parse().unwrap());
        match p.parse(b"0,11055,1170518701,698,1,-71,0,2,1,0000000000000000,0,29319") {
            Parsed::Read(r) => {
                assert_eq!(r.chip, "11055");
                assert_eq!((r.antenna, r.rssi), (Some(1), Some(-71)));
                assert_eq!(r.reader_time, utc("2017-02-02T16:05:01.698Z"));
                assert_eq!(r.replay_key.as_deref(), Some("ultra:2:11055:1170518701.698"));
            }
            other => panic!("{other:?}"),
        }
        // The same read in a reader set to Madrid time (UTC+1 in February).
        let p = UltraParser::new("Europe/Madrid".parse().unwrap());
        match p.parse(b"0,11055,1170518701,698,1,-71,1,2,1,0000000000000000,0,29319") {
            Parsed::Read(r) => assert_eq!(r.reader_time, utc("2017-02-02T15:05:01.698Z")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn status_lines_triggers_and_bad_fields() {
        let p = UltraParser::new("UTC".parse().unwrap());
        for skip in
            ["V=Ultra 4.6", "S=1,2", "U2", "u", "Connected,2017-02-02", "0,11055,1170518701,698,0,-71,0,2,1,0,0,1"]
        {
            assert_eq!(p.parse(skip.as_bytes()), Parsed::Skip, "{skip}");
        }
        assert_eq!(p.parse(b"0,11055,soon,698,1,-71,0,2,1,0,0,1"), Parsed::Reject(Reject::BadField));
        assert_eq!(p.parse(b"0,11055,1170518701,1698,1,-71,0,2,1,0,0,1"), Parsed::Reject(Reject::BadField));
        assert_eq!(p.parse(b"0,,1170518701,698,1,-71,0,2,1,0,0,1"), Parsed::Reject(Reject::BadField));
    }

    #[test]
    fn binary_status_records_are_skipped_by_length() {
        let mut f = UltraFramer::default();
        let mut out = Vec::new();
        let stream: Vec<u8> = [
            &b"0,1,1,0,1,-7,0,2,1,0,0,1\n"[..],
            &[0x03, 0x04, b'a', b'\n', b'b', b'\n'],
            b"0,2,1,0,1,-7,0,2,1,0,0,2\n",
        ]
        .concat();
        for c in stream.chunks(3) {
            f.push(c, 0u8, &mut out);
        }
        let lines: Vec<Vec<u8>> = out
            .into_iter()
            .map(|o| match o {
                Framed::Record { bytes, .. } => bytes,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines, vec![b"0,1,1,0,1,-7,0,2,1,0,0,1".to_vec(), b"0,2,1,0,1,-7,0,2,1,0,0,2".to_vec()]);
    }

    #[test]
    fn ultra_commands_byte_for_byte() {
        assert_eq!(rewind_by_index(Form::Ascii, 29310, 29319), hex("36303032393331300d32393331390a"));
        assert_eq!(rewind_by_index(Form::Binary, 29310, 29319), hex("36000032393331300d32393331390d"));
        let (start, end) = (at(2017, 2, 2, 16, 0, 0, 0), at(2017, 2, 2, 17, 0, 0, 0));
        assert_eq!(rewind_by_time(Form::Ascii, start, end), b"8001170518400\r1170522000\n");
        assert_eq!(set_clock(at(2017, 2, 2, 16, 5, 1, 0)), hex("742031363a30353a30312030322d30322d323031370a"));
        assert_eq!(parse_clock("16:5:1 2-2-2017 (0)"), Some(at(2017, 2, 2, 16, 5, 1, 0)));
        assert_eq!(replay_marks("0,11055,1170518701,698,1,-71,0,2,1,0000000000000000,0,29319"), Some((false, 29319)));
        assert_eq!(replay_marks("0,11055,1170518701,698,1,-71,1,2,1,0000000000000000,0,29319"), Some((true, 29319)));
        assert_eq!(replay_marks("Connected,1170518400"), None);
    }
}
