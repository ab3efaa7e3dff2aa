//! Encoders that produce what each reader family sends, for the format tests.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use rufus_gateway::reader::format::chafon;

/// One tag read, as a test describes it.
#[derive(Debug, Clone)]
pub struct TagRead {
    pub chip: String,
    pub at: DateTime<Utc>,
    pub antenna: u8,
    pub rssi: i64,
}

fn local(at: DateTime<Utc>, tz: Tz) -> NaiveDateTime {
    tz.from_utc_datetime(&at.naive_utc()).naive_local()
}

/// IPICO: `chip` must be 12 hex digits.
pub fn ipico(r: &TagRead, tz: Tz) -> Vec<u8> {
    format!("{}\r\n", rufus_gateway::reader::format::ipico::encode(1, &r.chip, local(r.at, tz))).into_bytes()
}

/// Ultra: seconds since 1980-01-01 in the reader's local time.
pub fn ultra(r: &TagRead, tz: Tz, logindex: u64) -> Vec<u8> {
    let epoch = chrono::NaiveDate::from_ymd_opt(1980, 1, 1).unwrap().and_hms_opt(0, 0, 0).unwrap();
    let since = local(r.at, tz) - epoch;
    let ms = since.num_milliseconds();
    format!("0,{},{},{},{},{},0,1,1,0000000000000000,0,{logindex}\n", r.chip, ms / 1000, ms % 1000, r.antenna, r.rssi)
        .into_bytes()
}

/// Impinj Speedway Connect JSON.
pub fn impinj(r: &TagRead) -> Vec<u8> {
    format!(
        "{{\"antennaPort\":{},\"epc\":\"{}\",\"firstSeenTimestamp\":\"{}\",\"peakRssi\":{},\"isHeartBeat\":false}}\n",
        r.antenna,
        r.chip,
        r.at.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
        r.rssi
    )
    .into_bytes()
}

/// Chafon real-time frame (`chip` is the EPC in hex); RSSI as the raw byte.
pub fn chafon_realtime(r: &TagRead) -> Vec<u8> {
    let epc = hex(&r.chip);
    let mut f = vec![0, 0x00, 0xEE, 0x00, 1 << (r.antenna - 1), epc.len() as u8];
    f.extend(&epc);
    f.push(r.rssi as u8);
    f[0] = (f.len() + 1) as u8;
    chafon::with_crc(f)
}

/// Chafon UHFReader288 answer frame with several tags.
pub fn chafon_answer(reads: &[TagRead]) -> Vec<u8> {
    let mut f = vec![0, 0x00, 0x01, 0x01, 1 << (reads[0].antenna - 1), reads.len() as u8];
    for r in reads {
        let epc = hex(&r.chip);
        f.push(epc.len() as u8);
        f.extend(&epc);
        f.push(r.rssi as u8);
    }
    f[0] = (f.len() + 1) as u8;
    chafon::with_crc(f)
}

/// A CSV line for the regex format: `chip;dd-mm-YYYY HH:MM:SS.fff;antenna;rssi` in local time.
pub fn csv(r: &TagRead, tz: Tz) -> Vec<u8> {
    format!("{};{};{};{}\n", r.chip, local(r.at, tz).format("%d-%m-%Y %H:%M:%S%.3f"), r.antenna, r.rssi).into_bytes()
}

pub const CSV_PATTERN: &str = r"^(?P<chip>[0-9A-F]+);(?P<timestamp>[^;]+);(?P<antenna>\d+);(?P<rssi>-?\d+)$";
pub const CSV_TIME: &str = "%d-%m-%Y %H:%M:%S%.3f";

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}
