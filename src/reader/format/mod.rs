//! Parsers: one framed record in, a parsed read (or a skip, or a rejection with its reason) out.
//!
//! Pure functions of their input: no clock, no I/O. The reader actor stamps host time and hands
//! the record here; new reader families add a module and a `Format` variant (readers.md, "Later").

pub mod chafon;
pub mod impinj;
pub mod ipico;
pub mod regex;
pub mod ultra;

use chrono::NaiveDate;
use chrono_tz::Tz;

use crate::config::{ChipEncoding, Format, ReaderConfig};
use crate::reader::record::{Framed, LineFramer, Parsed, ParsedRead, Reject, is_hex_chip, is_safe_bib, is_safe_chip};

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

/// The framer a format needs: lines for the text formats, length+CRC for Chafon, lines with
/// binary status records for Ultra.
pub enum Framer<T> {
    Lines(LineFramer<T>),
    Chafon(chafon::ChafonFramer<T>),
    Ultra(ultra::UltraFramer<T>),
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
}
