//! What a reader's bytes become before any format is known: framed records (with the host time
//! of their first byte), the parsed read a format makes of one, and why one is refused. Every
//! chip and bib alphabet is here, where a read enters.
//!
//! A leaf: it names nothing else of `reader/`, so every family's file can use it and none
//! depends on another.

use chrono::{DateTime, Utc};

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

/// What a parser found in one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRead {
    pub chip: String,
    pub antenna: Option<i64>,
    pub rssi: Option<i64>,
    /// The reader's own time for the read, converted to UTC, when the format carries one.
    pub reader_time: Option<DateTime<Utc>>,
    /// A bib the record itself carries (regex `bib` group).
    pub bib: Option<String>,
    /// Identifies this exact read across replays (stored-read downloads, rewinds): the same key
    /// twice is the same read, whatever the de-duplication window.
    pub replay_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Read(ParsedRead),
    /// Formats that report several tags in one record (Chafon answer mode).
    Reads(Vec<ParsedRead>),
    /// Not a tag read (status line, banner, control reply, heartbeat): ignored, not counted.
    Skip,
    Reject(Reject),
}

/// Why a record was refused; each has its own counter in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    TooLong,
    InvalidUtf8,
    NoMatch,
    BadLength,
    BadChecksum,
    BadTime,
    BadField,
    /// A chip code outside its format's alphabet (hex for hex formats; letters, digits, `-` and
    /// `_` for ASCII-encoded chips), or longer than [`CHIP_MAX`]: tags anyone can program must
    /// not carry a line end, a comma or a formula into the feed, a CSV file or the API.
    BadChip,
    /// A bib a record carries (a regex `bib` group) outside its alphabet ([`is_safe_bib`]): an
    /// escape sequence would clear a timer's screen in `watch` and reach the API as it is.
    BadBib,
}

/// The longest chip code: an EPC is at most 496 bits (124 hex digits).
pub const CHIP_MAX: usize = 128;
/// The longest bib a record may carry, in characters.
pub const BIB_MAX: usize = 32;

/// A bib from a record: letters and digits of any script, ASCII punctuation and spaces, at most
/// [`BIB_MAX`] characters. No control or format characters (escape sequences, bidi overrides).
pub fn is_safe_bib(bib: &str) -> bool {
    !bib.is_empty()
        && bib.chars().count() <= BIB_MAX
        && bib.chars().all(|c| c.is_alphanumeric() || c.is_ascii_punctuation() || c == ' ')
}

/// A hex chip code (IPICO, Chafon, Impinj): hex digits only.
pub fn is_hex_chip(chip: &str) -> bool {
    !chip.is_empty() && chip.len() <= CHIP_MAX && chip.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Any other chip code: ASCII letters, digits, `-` and `_` (and, from a user's own `pattern`,
/// spaces between groups, as some readers print hex in blocks).
pub fn is_safe_chip(chip: &str, spaces: bool) -> bool {
    !chip.is_empty()
        && chip.len() <= CHIP_MAX
        && chip.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (spaces && b == b' '))
}

impl Reject {
    pub const ALL: [Reject; 9] = [
        Reject::TooLong,
        Reject::InvalidUtf8,
        Reject::NoMatch,
        Reject::BadLength,
        Reject::BadChecksum,
        Reject::BadTime,
        Reject::BadField,
        Reject::BadChip,
        Reject::BadBib,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::TooLong => "too_long",
            Reject::InvalidUtf8 => "invalid_utf8",
            Reject::NoMatch => "no_match",
            Reject::BadLength => "bad_length",
            Reject::BadChecksum => "bad_checksum",
            Reject::BadTime => "bad_time",
            Reject::BadField => "bad_field",
            Reject::BadChip => "bad_chip",
            Reject::BadBib => "bad_bib",
        }
    }

    pub fn index(self) -> usize {
        Reject::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// `chip_encoding = "ascii"`: hex EPC bytes that spell the chip code; leading NULs and zeros dropped.
pub fn decode_ascii_chip(hex: &str) -> Option<String> {
    // Hex digits only, checked first: slicing a multi-byte character below would panic (found by
    // the fuzz target: a user pattern may capture any text).
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect();
    let bytes = bytes?;
    // Printable text; [`Parser::parse`] then refuses what is not a safe chip (`bad_chip`).
    let text: String = bytes.iter().skip_while(|b| **b == 0 || **b == b'0').map(|b| *b as char).collect();
    (!text.is_empty() && text.chars().all(|c| c.is_ascii_graphic())).then_some(text)
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

    #[test]
    fn ascii_chips() {
        assert_eq!(decode_ascii_chip("00323038").as_deref(), Some("208"));
        assert_eq!(decode_ascii_chip("30303030304D433030393738").as_deref(), Some("MC00978"));
        assert_eq!(decode_ascii_chip("0001"), None);
        assert_eq!(decode_ascii_chip("abc"), None);
        assert_eq!(decode_ascii_chip("\u{578}#"), None, "not hex, and not a panic");
        // ",9" and "=1" decode; the parser refuses them as chips (`chip_alphabets`).
        assert_eq!(decode_ascii_chip("2C39").as_deref(), Some(",9"));
    }

    #[test]
    fn bib_alphabet() {
        for good in ["B12", "1042", "Ñandú 7", "M-40/2", "A.1"] {
            assert!(is_safe_bib(good), "{good:?}");
        }
        for bad in
            ["", "\u{1b}]0;pwned\u{7}", "A\u{1b}[2J", "x\ny", "\u{202e}21", "\u{9b}31m", &"9".repeat(BIB_MAX + 1)]
        {
            assert!(!is_safe_bib(bad), "{bad:?}");
        }
    }

    #[test]
    fn chip_alphabets() {
        assert!(is_hex_chip("E2000017221101441890ABcd"));
        for bad in ["", "E2 00", "XYZ", "AB\n999", &"A".repeat(CHIP_MAX + 1)] {
            assert!(!is_hex_chip(bad), "{bad:?}");
        }
        assert!(is_safe_chip("MC-00_978", false));
        assert!(is_safe_chip("0102 0304", true) && !is_safe_chip("0102 0304", false));
        for bad in ["", "=1+1", "A,B", "a\"b", "x\ny", "é"] {
            assert!(!is_safe_chip(bad, true), "{bad:?}");
        }
    }
}
