//! `impinj-json`: Impinj Speedway Connect's JSON output, one object per line (readers.md §4).

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::config::ChipEncoding;
use crate::reader::record::{Parsed, ParsedRead, Reject, decode_ascii_chip};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    #[serde(default)]
    epc: Option<String>,
    #[serde(default)]
    antenna_port: Option<i64>,
    #[serde(default)]
    first_seen_timestamp: Option<String>,
    #[serde(default)]
    peak_rssi: Option<f64>,
    #[serde(default)]
    is_heart_beat: bool,
}

pub fn parse(record: &[u8], encoding: ChipEncoding) -> Parsed {
    let Ok(line) = std::str::from_utf8(record) else { return Parsed::Reject(Reject::InvalidUtf8) };
    let line = line.trim();
    if !line.starts_with('{') {
        return Parsed::Skip;
    }
    let Ok(report) = serde_json::from_str::<Report>(line) else { return Parsed::Reject(Reject::BadField) };
    if report.is_heart_beat {
        return Parsed::Skip;
    }
    let Some(epc) = report.epc.filter(|e| !e.is_empty()) else { return Parsed::Reject(Reject::BadField) };
    let chip = match encoding {
        ChipEncoding::Hex => epc.to_ascii_uppercase(),
        ChipEncoding::Ascii => match decode_ascii_chip(&epc) {
            Some(c) => c,
            None => return Parsed::Reject(Reject::BadField),
        },
    };
    let reader_time = match report.first_seen_timestamp.as_deref() {
        None => None,
        Some(t) => match DateTime::parse_from_rfc3339(t) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(_) => return Parsed::Reject(Reject::BadTime),
        },
    };
    let replay_key =
        reader_time.map(|t| format!("impinj:{}:{epc}:{}", report.antenna_port.unwrap_or(0), t.timestamp_micros()));
    Parsed::Read(ParsedRead {
        chip,
        antenna: report.antenna_port,
        rssi: report.peak_rssi.map(|r| r.round() as i64),
        reader_time,
        bib: None,
        replay_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_heartbeats_and_fraction_digits() {
        let line = br#"{"antennaPort":7,"epc":"999908290000000000000004","firstSeenTimestamp":"2018-06-14T00:15:54.36879Z","peakRssi":-51,"isHeartBeat":false}"#;
        match parse(line, ChipEncoding::Hex) {
            Parsed::Read(r) => {
                assert_eq!(r.chip, "999908290000000000000004");
                assert_eq!((r.antenna, r.rssi), (Some(7), Some(-51)));
                assert_eq!(r.reader_time.unwrap().timestamp_micros(), 1_528_935_354_368_790);
            }
            other => panic!("{other:?}"),
        }
        let six =
            br#"{"antennaPort":1,"epc":"AB","firstSeenTimestamp":"2018-06-14T00:15:54.373293Z","peakRssi":-60.5}"#;
        match parse(six, ChipEncoding::Hex) {
            Parsed::Read(r) => assert_eq!(r.reader_time.unwrap().timestamp_micros(), 1_528_935_354_373_293),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(br#"{"isHeartBeat":true}"#, ChipEncoding::Hex), Parsed::Skip);
        assert_eq!(parse(b"Speedway Connect ready", ChipEncoding::Hex), Parsed::Skip);
        assert_eq!(
            parse(br#"{"epc":"AB","firstSeenTimestamp":"yesterday"}"#, ChipEncoding::Hex),
            Parsed::Reject(Reject::BadTime)
        );
        assert_eq!(parse(br#"{"epc":"AB""#, ChipEncoding::Hex), Parsed::Reject(Reject::BadField));
        assert_eq!(parse(br#"{"antennaPort":1}"#, ChipEncoding::Hex), Parsed::Reject(Reject::BadField));
    }
}
