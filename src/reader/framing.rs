//! Framing: bytes as they come off the port, in chunks of any size, to records.
//!
//! Each record carries the host time of the chunk that delivered its first byte, because that
//! is the closest the host gets to the moment the reader sent it.

use super::format::Reject;

/// Longest line accepted; anything longer is garbage or a wrong baud rate.
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed<T> {
    Record { bytes: Vec<u8>, stamp: T },
    Rejected { reason: Reject, bytes: Vec<u8>, stamp: T },
}

/// CR/LF-terminated lines. Empty lines are dropped; an over-long line is rejected once and the
/// rest of it, up to the next newline, discarded.
#[derive(Debug)]
pub struct LineFramer<T> {
    buf: Vec<u8>,
    first_stamp: Option<T>,
    overflowed: bool,
}

impl<T: Copy> Default for LineFramer<T> {
    fn default() -> Self {
        Self { buf: Vec::with_capacity(256), first_stamp: None, overflowed: false }
    }
}

impl<T: Copy> LineFramer<T> {
    pub fn push(&mut self, chunk: &[u8], stamp: T, out: &mut Vec<Framed<T>>) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let (piece, ended) = match rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
                Some(i) => {
                    let piece = &rest[..i];
                    rest = &rest[i + 1..];
                    (piece, true)
                }
                None => {
                    let piece = rest;
                    rest = &[];
                    (piece, false)
                }
            };
            if !piece.is_empty() && self.first_stamp.is_none() {
                self.first_stamp = Some(stamp);
            }
            if !self.overflowed {
                if self.buf.len() + piece.len() > MAX_LINE {
                    let take = MAX_LINE - self.buf.len();
                    self.buf.extend_from_slice(&piece[..take]);
                    out.push(Framed::Rejected {
                        reason: Reject::TooLong,
                        bytes: std::mem::take(&mut self.buf),
                        stamp: self.first_stamp.take().unwrap_or(stamp),
                    });
                    self.overflowed = true;
                } else {
                    self.buf.extend_from_slice(piece);
                }
            }
            if ended {
                if self.overflowed {
                    self.overflowed = false;
                    self.first_stamp = None;
                } else if !self.buf.is_empty() {
                    out.push(Framed::Record {
                        bytes: std::mem::take(&mut self.buf),
                        stamp: self.first_stamp.take().unwrap_or(stamp),
                    });
                }
                self.buf.clear();
            }
        }
    }

    /// Forget a partial line (the port was reopened: its tail will never come).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.first_stamp = None;
        self.overflowed = false;
    }

    /// Nothing of a line has arrived yet.
    pub fn at_line_start(&self) -> bool {
        self.buf.is_empty() && !self.overflowed
    }
}

/// The framer a format needs: lines for the text formats, length+CRC for Chafon, lines with
/// binary status records for Ultra.
pub enum Framer<T> {
    Lines(LineFramer<T>),
    Chafon(super::format::chafon::ChafonFramer<T>),
    Ultra(super::format::ultra::UltraFramer<T>),
}

impl<T: Copy> Framer<T> {
    pub fn for_format(format: crate::config::Format) -> Self {
        use crate::config::Format;
        match format {
            Format::Chafon => Framer::Chafon(Default::default()),
            Format::Ultra => Framer::Ultra(Default::default()),
            Format::Regex | Format::Ipico | Format::ImpinjJson => Framer::Lines(Default::default()),
        }
    }

    pub fn push(&mut self, chunk: &[u8], stamp: T, out: &mut Vec<Framed<T>>) {
        match self {
            Framer::Lines(f) => f.push(chunk, stamp, out),
            Framer::Chafon(f) => f.push(chunk, stamp, out),
            Framer::Ultra(f) => f.push(chunk, stamp, out),
        }
    }

    pub fn reset(&mut self) {
        match self {
            Framer::Lines(f) => f.reset(),
            Framer::Chafon(f) => f.reset(),
            Framer::Ultra(f) => f.reset(),
        }
    }

    /// No record is half read: stopping here splits none between this process and the next.
    pub fn between_records(&self) -> bool {
        match self {
            Framer::Lines(f) => f.at_line_start(),
            Framer::Chafon(f) => f.at_record_start(),
            Framer::Ultra(f) => f.at_record_start(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(chunks: &[(&[u8], u32)]) -> Vec<Framed<u32>> {
        let mut f = LineFramer::default();
        let mut out = Vec::new();
        for (c, s) in chunks {
            f.push(c, *s, &mut out);
        }
        out
    }

    fn rec(b: &str, stamp: u32) -> Framed<u32> {
        Framed::Record { bytes: b.as_bytes().to_vec(), stamp }
    }

    #[test]
    fn lines_carry_the_stamp_of_their_first_byte() {
        let out = frame_all(&[(b"AB", 1), (b"C\r\nDE", 2), (b"F\n\n\r\n", 3), (b"G", 4)]);
        assert_eq!(out, vec![rec("ABC", 1), rec("DEF", 2)]);
    }

    #[test]
    fn every_split_gives_the_same_records() {
        let stream = b"one\r\ntwo\nthree\r\n\r\nfour\n";
        let whole: Vec<Vec<u8>> = frame_all(&[(stream, 0)])
            .into_iter()
            .map(|f| match f {
                Framed::Record { bytes, .. } => bytes,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(whole.len(), 4);
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let parts = frame_all(&[(&stream[..cut], 0), (&stream[cut..cut2], 0), (&stream[cut2..], 0)]);
                let got: Vec<Vec<u8>> = parts
                    .into_iter()
                    .map(|f| match f {
                        Framed::Record { bytes, .. } => bytes,
                        other => panic!("{other:?}"),
                    })
                    .collect();
                assert_eq!(got, whole, "cuts {cut} {cut2}");
            }
        }
    }

    #[test]
    fn between_records_only_when_nothing_of_one_is_held() {
        let mut out = Vec::new();
        for format in [crate::config::Format::Regex, crate::config::Format::Ultra] {
            let mut f: Framer<u32> = Framer::for_format(format);
            assert!(f.between_records());
            f.push(b"ABCD", 1, &mut out);
            assert!(!f.between_records(), "{format:?}");
            f.push(b"1234\r\n", 2, &mut out);
            assert!(f.between_records(), "{format:?}");
        }
        let mut f: Framer<u32> = Framer::for_format(crate::config::Format::Chafon);
        f.push(&[0x11, 0x00], 1, &mut out);
        assert!(!f.between_records(), "a Chafon frame begun");
        f.reset();
        assert!(f.between_records());
    }

    #[test]
    fn long_lines_are_rejected_once_and_framing_recovers() {
        let long = vec![b'x'; MAX_LINE + 10];
        let out = frame_all(&[(&long[..3000], 1), (&long[3000..], 2), (b"yyy\nok\n", 3)]);
        assert_eq!(out.len(), 2);
        match &out[0] {
            Framed::Rejected { reason, bytes, stamp } => {
                assert_eq!(*reason, Reject::TooLong);
                assert_eq!(bytes.len(), MAX_LINE);
                assert_eq!(*stamp, 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out[1], rec("ok", 3));
        // Exactly MAX_LINE is accepted.
        let exact = [vec![b'z'; MAX_LINE], b"\n".to_vec()].concat();
        assert!(matches!(&frame_all(&[(&exact, 0)])[0], Framed::Record { bytes, .. } if bytes.len() == MAX_LINE));
    }
}
