//! Parsers: one framed record in, a parsed read (or a skip, or a rejection with its reason) out.
//!
//! Pure functions of their input: no clock, no I/O. The reader actor stamps host time and hands
//! the record here; new reader families add a module and a `Format` variant (readers.md, "Later").

pub mod chafon;
pub mod impinj;
pub mod ipico;
pub mod regex;
pub mod ultra;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;

use crate::config::{ChipEncoding, Format, ReaderConfig};
pub use crate::timestamp::{TimestampFormat, local_to_utc};

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

/// A configured parser for one reader.
pub enum Parser {
    Regex(regex::RegexParser),
    Ipico(ipico::IpicoParser),
    Chafon(ChipEncoding),
    Ultra(ultra::UltraParser),
    ImpinjJson(ChipEncoding),
}

impl Parser {
    pub fn from_config(cfg: &ReaderConfig, encoding: ChipEncoding) -> anyhow::Result<Self> {
        let tz: Tz = cfg.timezone;
        Ok(match cfg.format {
            Format::Regex => {
                Parser::Regex(regex::RegexParser::new(&cfg.pattern, cfg.timestamp_format.clone(), tz, encoding)?)
            }
            Format::Ipico => Parser::Ipico(ipico::IpicoParser::new(tz)),
            Format::Chafon => Parser::Chafon(encoding),
            Format::Ultra => Parser::Ultra(ultra::UltraParser::new(tz)),
            Format::ImpinjJson => Parser::ImpinjJson(encoding),
        })
    }

    /// Parse one record. `today` is the host's date, used only by time-of-day-only formats.
    /// Every chip code is checked against the format's alphabet here, where it enters.
    /// Every reader time is checked against [`crate::timestamp::READER_YEARS`] here too, so no
    /// later arithmetic on it can leave chrono's range.
    pub fn parse(&self, record: &[u8], today: NaiveDate) -> Parsed {
        let time_ok = |r: &ParsedRead| r.reader_time.is_none_or(|t| crate::timestamp::reader_us(t).is_some());
        match self.parse_record(record, today) {
            Parsed::Read(r) if !self.chip_ok(&r.chip) => Parsed::Reject(Reject::BadChip),
            Parsed::Reads(reads) if reads.iter().any(|r| !self.chip_ok(&r.chip)) => Parsed::Reject(Reject::BadChip),
            Parsed::Read(r) if !time_ok(&r) => Parsed::Reject(Reject::BadTime),
            Parsed::Read(r) if r.bib.as_deref().is_some_and(|b| !is_safe_bib(b)) => Parsed::Reject(Reject::BadBib),
            Parsed::Reads(reads) if !reads.iter().all(time_ok) => Parsed::Reject(Reject::BadTime),
            parsed => parsed,
        }
    }

    fn chip_ok(&self, chip: &str) -> bool {
        match self {
            Parser::Ipico(_) | Parser::Chafon(ChipEncoding::Hex) | Parser::ImpinjJson(ChipEncoding::Hex) => {
                is_hex_chip(chip)
            }
            Parser::Regex(p) => is_safe_chip(chip, p.encoding() == ChipEncoding::Hex),
            _ => is_safe_chip(chip, false),
        }
    }

    fn parse_record(&self, record: &[u8], today: NaiveDate) -> Parsed {
        match self {
            Parser::Regex(p) => p.parse(record, today),
            Parser::Ipico(p) => p.parse(record),
            Parser::Chafon(encoding) => match chafon::parse(record, *encoding) {
                Ok(reads) if reads.is_empty() => Parsed::Skip,
                Ok(mut reads) if reads.len() == 1 => Parsed::Read(reads.remove(0)),
                Ok(reads) => Parsed::Reads(reads),
                Err(reason) => Parsed::Reject(reason),
            },
            Parser::Ultra(p) => p.parse(record),
            Parser::ImpinjJson(encoding) => impinj::parse(record, *encoding),
        }
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
