//! `chafon`: Chafon UHFReader18 / UHFReader288 binary frames (readers.md §2).
//!
//! `Len Adr Cmd Status Data… CRC-LSB CRC-MSB`; `Len` counts the bytes after itself. The framer
//! finds frames by length and CRC and resynchronises byte by byte after garbage; the parser reads
//! answer-mode inventory replies (18 and 288 layouts) and real-time (0xEE) pushes.

use crate::config::ChipEncoding;
use crate::reader::record::{Framed, ParsedRead, Reject, decode_ascii_chip};

/// Smallest sane `Len`: Adr, Cmd, Status and the two CRC bytes.
const MIN_LEN: usize = 5;
/// Bytes kept while looking for a frame; beyond this the oldest are garbage.
const MAX_BUFFER: usize = 1024;

const CMD_INVENTORY: u8 = 0x01;
const CMD_REALTIME: u8 = 0xEE;

/// 288-style inventory command (verified vector in readers.md), sent every `poll_interval`.
pub const INVENTORY_COMMAND: [u8; 10] = [0x09, 0x00, 0x01, 0x04, 0xfe, 0x00, 0x80, 0x32, 0x80, 0xbe];

/// CRC-16/MCRF4XX: preset 0xFFFF, reflected polynomial 0x8408, no final XOR.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for b in bytes {
        crc ^= *b as u16;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x8408 } else { crc >> 1 };
        }
    }
    crc
}

/// Append the CRC (LSB first) to `Len…Data` (for the emulator and the tests).
#[cfg(any(test, feature = "test-support"))]
pub fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

fn complete_frame_at(buf: &[u8], at: usize) -> Option<usize> {
    let len = *buf.get(at)? as usize;
    if len < MIN_LEN || at + len + 1 > buf.len() {
        return None;
    }
    let end = at + len + 1;
    let crc = u16::from_le_bytes([buf[end - 2], buf[end - 1]]);
    (crc16(&buf[at..end - 2]) == crc).then_some(end)
}

#[derive(Debug)]
pub struct ChafonFramer<T> {
    buf: Vec<u8>,
    stamp: Option<T>,
    garbage: usize,
}

impl<T: Copy> Default for ChafonFramer<T> {
    fn default() -> Self {
        Self { buf: Vec::with_capacity(256), stamp: None, garbage: 0 }
    }
}

impl<T: Copy> ChafonFramer<T> {
    pub fn push(&mut self, chunk: &[u8], stamp: T, out: &mut Vec<Framed<T>>) {
        if self.buf.is_empty() {
            self.stamp = Some(stamp);
        }
        self.buf.extend_from_slice(chunk);
        loop {
            if self.buf.is_empty() {
                break;
            }
            if let Some(end) = complete_frame_at(&self.buf, 0) {
                self.flush_garbage(stamp, out);
                let bytes: Vec<u8> = self.buf.drain(..end).collect();
                out.push(Framed::Record { bytes, stamp: self.stamp.unwrap_or(stamp) });
                self.stamp = Some(stamp);
                continue;
            }
            let len = self.buf[0] as usize;
            let waiting = len >= MIN_LEN && self.buf.len() < len + 1;
            // A plausible frame still arriving: wait, unless a complete valid frame starts later
            // (then the first byte was garbage that looked like a length).
            if waiting
                && !(1..self.buf.len()).any(|i| complete_frame_at(&self.buf, i).is_some())
                && self.buf.len() < MAX_BUFFER
            {
                break;
            }
            self.buf.remove(0);
            self.garbage += 1;
            self.stamp = Some(stamp);
        }
    }

    fn flush_garbage(&mut self, stamp: T, out: &mut Vec<Framed<T>>) {
        if self.garbage > 0 {
            out.push(Framed::Rejected { reason: Reject::BadChecksum, bytes: Vec::new(), stamp });
            self.garbage = 0;
        }
    }

    pub fn reset(&mut self) {
        self.buf.clear();
        self.stamp = None;
        self.garbage = 0;
    }

    /// Nothing of a frame has arrived yet.
    pub fn at_record_start(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Antenna from the one-hot `Ant` byte (1, 2, 4, 8 → 1–4); other values are kept as they are.
fn antenna(ant: u8) -> i64 {
    match ant {
        1 => 1,
        2 => 2,
        4 => 3,
        8 => 4,
        other => other as i64,
    }
}

fn chip(epc: &[u8], encoding: ChipEncoding) -> Option<String> {
    let hex: String = epc.iter().map(|b| format!("{b:02X}")).collect();
    match encoding {
        ChipEncoding::Hex => (!hex.is_empty()).then_some(hex),
        ChipEncoding::Ascii => decode_ascii_chip(&hex),
    }
}

/// Tags of one answer-mode reply in the 288 layout (`Ant Num (EPCLen EPC RSSI)*`), if consistent.
fn tags_288(data: &[u8], encoding: ChipEncoding) -> Option<Vec<ParsedRead>> {
    let (&ant, rest) = data.split_first()?;
    let (&num, mut rest) = rest.split_first()?;
    let mut reads = Vec::new();
    for _ in 0..num {
        let (&len, tail) = rest.split_first()?;
        let len = len as usize;
        if tail.len() < len + 1 {
            return None;
        }
        reads.push(ParsedRead {
            chip: chip(&tail[..len], encoding)?,
            antenna: Some(antenna(ant)),
            rssi: Some(tail[len] as i64),
            reader_time: None,
            bib: None,
            replay_key: None,
        });
        rest = &tail[len + 1..];
    }
    rest.is_empty().then_some(reads)
}

/// The UHFReader18 layout (`Num (EPCLen EPC)*`), if consistent.
fn tags_18(data: &[u8], encoding: ChipEncoding) -> Option<Vec<ParsedRead>> {
    let (&num, mut rest) = data.split_first()?;
    let mut reads = Vec::new();
    for _ in 0..num {
        let (&len, tail) = rest.split_first()?;
        let len = len as usize;
        if tail.len() < len {
            return None;
        }
        reads.push(ParsedRead {
            chip: chip(&tail[..len], encoding)?,
            antenna: None,
            rssi: None,
            reader_time: None,
            bib: None,
            replay_key: None,
        });
        rest = &tail[len..];
    }
    rest.is_empty().then_some(reads)
}

/// One CRC-checked frame to its tag reads. `Ok(vec![])` is a frame without tags (skipped).
pub fn parse(frame: &[u8], encoding: ChipEncoding) -> Result<Vec<ParsedRead>, Reject> {
    if frame.len() < MIN_LEN + 1 {
        return Err(Reject::BadLength);
    }
    let (cmd, status, data) = (frame[2], frame[3], &frame[4..frame.len() - 2]);
    match (cmd, status) {
        (CMD_INVENTORY, 0x01..=0x04) => {
            if data.is_empty() {
                return Ok(Vec::new());
            }
            tags_288(data, encoding).or_else(|| tags_18(data, encoding)).ok_or(Reject::BadField)
        }
        (CMD_REALTIME, 0x00) => {
            let [ant, len, rest @ ..] = data else { return Err(Reject::BadLength) };
            let len = *len as usize;
            if rest.len() != len + 1 {
                return Err(Reject::BadLength);
            }
            Ok(vec![ParsedRead {
                chip: chip(&rest[..len], encoding).ok_or(Reject::BadField)?,
                antenna: Some(antenna(*ant)),
                rssi: Some(rest[len] as i64),
                reader_time: None,
                bib: None,
                replay_key: None,
            }])
        }
        // Command replies, antenna errors (0xF8), other statuses: not tag reads.
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn crc_matches_the_verified_vectors() {
        for v in [
            "1500010301010c0000000000000000000003136bb1a5",
            "2300010301020c0000000000000000000003136b0c0000000000000000000003146c70f2",
            "13000103010c0000000000000000000003133f39",
            "0700010101001e4b",
            "05007601ebd8",
            "0500760062c9",
            "09000104fe00803280be",
        ] {
            let bytes = hex(v);
            assert_eq!(with_crc(bytes[..bytes.len() - 2].to_vec()), bytes, "{v}");
        }
        assert_eq!(INVENTORY_COMMAND.to_vec(), hex("09000104fe00803280be"));
    }

    #[test]
    fn verified_frames_parse() {
        let r = parse(&hex("1500010301010c0000000000000000000003136bb1a5"), ChipEncoding::Hex).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].chip.as_str(), r[0].antenna, r[0].rssi), ("000000000000000000000313", Some(1), Some(0x6b)));
        let r =
            parse(&hex("2300010301020c0000000000000000000003136b0c0000000000000000000003146c70f2"), ChipEncoding::Hex)
                .unwrap();
        assert_eq!(
            r.iter().map(|t| (t.chip.as_str(), t.rssi)).collect::<Vec<_>>(),
            [("000000000000000000000313", Some(0x6b)), ("000000000000000000000314", Some(0x6c))]
        );
        let r = parse(&hex("13000103010c0000000000000000000003133f39"), ChipEncoding::Hex).unwrap();
        assert_eq!((r[0].chip.as_str(), r[0].antenna, r[0].rssi), ("000000000000000000000313", None, None));
        assert!(parse(&hex("0700010101001e4b"), ChipEncoding::Hex).unwrap().is_empty());
    }

    #[test]
    fn realtime_frames_antennas_and_ascii_chips() {
        for (ant, want) in [(1u8, 1i64), (2, 2), (4, 3), (8, 4)] {
            let mut f = vec![0, 0x00, 0xEE, 0x00, ant, 12];
            f.extend(hex("30303030304D433030393738"));
            f.push(0x55);
            f[0] = (f.len() + 1) as u8;
            let frame = with_crc(f);
            let r = parse(&frame, ChipEncoding::Ascii).unwrap();
            assert_eq!((r[0].chip.as_str(), r[0].antenna, r[0].rssi), ("MC00978", Some(want), Some(0x55)));
        }
        // Truncated real-time data.
        let frame = with_crc(vec![0x07, 0x00, 0xEE, 0x00, 0x01, 0x0c]);
        assert_eq!(parse(&frame, ChipEncoding::Hex), Err(Reject::BadLength));
        // Antenna error status is not a read.
        assert!(parse(&with_crc(vec![0x05, 0x00, 0x01, 0xF8]), ChipEncoding::Hex).unwrap().is_empty());
        // Inconsistent tag counts.
        assert_eq!(
            parse(&with_crc(vec![0x08, 0x00, 0x01, 0x01, 0x05, 0x09, 0x01]), ChipEncoding::Hex),
            Err(Reject::BadField)
        );
    }

    fn frames(input: &[&[u8]]) -> (Vec<Vec<u8>>, usize) {
        let mut f = ChafonFramer::default();
        let mut out = Vec::new();
        for c in input {
            f.push(c, 0u8, &mut out);
        }
        let mut records = Vec::new();
        let mut rejected = 0;
        for o in out {
            match o {
                Framed::Record { bytes, .. } => records.push(bytes),
                Framed::Rejected { .. } => rejected += 1,
            }
        }
        (records, rejected)
    }

    #[test]
    fn framing_splits_merges_and_resynchronises() {
        let a = hex("1500010301010c0000000000000000000003136bb1a5");
        let b = hex("0700010101001e4b");
        let stream = [a.clone(), b.clone(), a.clone()].concat();
        for cut in 0..stream.len() {
            let (r, _) = frames(&[&stream[..cut], &stream[cut..]]);
            assert_eq!(r, vec![a.clone(), b.clone(), a.clone()], "cut {cut}");
        }
        // Garbage before, between (including a byte that looks like a long length) and a corrupted frame.
        let mut bad = a.clone();
        bad[10] ^= 0xff;
        let noisy = [vec![0x00, 0x99, 0x13], a.clone(), vec![0xF0], bad, b.clone()].concat();
        let (r, rejected) = frames(&[&noisy]);
        assert_eq!(r, vec![a.clone(), b.clone()]);
        assert_eq!(rejected, 2, "one rejection per garbage run");
    }
}
