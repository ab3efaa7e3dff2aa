//! Host time: UTC and monotonic stamps, the boot id, and whether the system clock is synchronised.
//!
//! A Raspberry Pi has no battery-backed clock: until NTP synchronises, `now()` can be minutes or
//! months off. Every read therefore records the flag, the boot id and the monotonic time, so
//! host timestamps can be judged (and corrected) later.

use std::path::PathBuf;

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::config::{ClockConfig, ClockSource};

/// A host time stamp: wall clock (UTC µs) and monotonic clock (µs since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub utc_us: i64,
    pub monotonic_us: i64,
}

impl Stamp {
    pub fn now() -> Self {
        Self { utc_us: Utc::now().timestamp_micros(), monotonic_us: monotonic_us() }
    }
}

pub fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

/// Microseconds since boot. `time_t` and the nanoseconds are 32 bits wide on 32-bit ARM: widened
/// before any arithmetic (68 years of uptime fit a 32-bit second count; the product does not).
#[allow(clippy::useless_conversion)] // i64 already on 64-bit targets
pub fn monotonic_us() -> i64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| i64::from(t.tv_sec()) * 1_000_000 + i64::from(t.tv_nsec()) / 1000)
        .unwrap_or(0)
}

/// The kernel's id of this boot; monotonic times only compare within one boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The wire format of the RUFUS API: `YYYY-MM-DDTHH:mm:ss.sssZ`.
pub fn api_timestamp(utc_us: i64) -> String {
    use std::fmt::Write;
    // Fixed fields written directly: chrono's `format` parses its pattern on every call, which
    // was a third of the cost of encoding a batch.
    let t = DateTime::from_timestamp_micros(utc_us).unwrap_or_default();
    let mut out = String::with_capacity(24);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.timestamp_subsec_millis()
    );
    out
}

/// RFC 3339 for status and export, microseconds kept.
pub fn rfc3339(utc_us: i64) -> String {
    DateTime::from_timestamp_micros(utc_us).unwrap_or_default().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Serde for a time kept as microseconds and shown as [`rfc3339`] (in status and session lists):
/// a number inside the process, text only where it is shown.
pub mod rfc3339_us {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(utc_us: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*utc_us))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        parsed(&String::deserialize(d)?)
    }

    /// Text read back (by the command line) as microseconds.
    fn parsed<E: serde::de::Error>(text: &str) -> Result<i64, E> {
        super::parse_us(text).ok_or_else(|| E::custom(format!("not an RFC 3339 time: {text:?}")))
    }

    /// The same, for a time that may be absent.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(utc_us: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
            match utc_us {
                Some(us) => s.serialize_str(&crate::clock::rfc3339(*us)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
            Option::<String>::deserialize(d)?.map(|text| super::parsed(&text)).transpose()
        }
    }
}

/// Serde for a time kept as microseconds and shown as the API shows it ([`api_timestamp`]).
pub mod api_timestamp_us {
    use serde::Serializer;

    pub fn serialize<S: Serializer>(utc_us: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::api_timestamp(*utc_us))
    }

    /// Either form reads back the same way.
    pub use super::rfc3339_us::deserialize;
}

/// An RFC 3339 time as microseconds since the epoch.
pub fn parse_us(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_micros())
}

/// Answers "is the system clock synchronised?" per `[clock] source`.
#[derive(Debug, Clone)]
pub struct ClockWatch {
    source: ClockSource,
    flag: PathBuf,
}

impl ClockWatch {
    pub fn new(cfg: &ClockConfig) -> Self {
        Self { source: cfg.source, flag: cfg.timesyncd_flag.clone() }
    }

    pub fn synchronized(&self) -> bool {
        match self.source {
            ClockSource::Trust => true,
            ClockSource::Timesyncd => self.flag.exists(),
            ClockSource::Adjtimex => kernel_synchronized(),
            ClockSource::Auto => self.flag.exists() || kernel_synchronized(),
        }
    }
}

/// chrony, ntpd and timesyncd all clear `STA_UNSYNC` once they discipline the clock.
#[allow(unsafe_code)] // adjtimex (read-only): a libc call with no safe wrapper
fn kernel_synchronized() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's state into the zeroed struct.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state != -1 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_timestamps_have_milliseconds_and_z() {
        assert_eq!(api_timestamp(1_674_379_225_000_000), "2023-01-22T09:20:25.000Z");
        assert_eq!(api_timestamp(1_674_379_225_123_999), "2023-01-22T09:20:25.123Z");
    }

    #[test]
    fn api_timestamps_match_chrono_formatting() {
        // Years 1970 to 2200, and the last microsecond of a second, a day and a leap year's day.
        let mut cases: Vec<i64> = (0..20_000).map(|_| fastrand::i64(0..7_258_118_400_000_000)).collect();
        cases.extend([0, 999_999, 86_399_999_999, 951_868_799_999_999, 951_868_800_000_000]);
        for us in cases {
            let want = DateTime::from_timestamp_micros(us).unwrap().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
            assert_eq!(api_timestamp(us), want, "{us}");
        }
    }

    #[test]
    fn trust_and_flag_file() {
        let dir = std::env::temp_dir().join(format!("rg-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flag = dir.join("synchronized");
        let mut cfg = ClockConfig { source: ClockSource::Trust, timesyncd_flag: flag.clone(), ..Default::default() };
        assert!(ClockWatch::new(&cfg).synchronized());
        cfg.source = ClockSource::Timesyncd;
        assert!(!ClockWatch::new(&cfg).synchronized());
        std::fs::write(&flag, b"").unwrap();
        assert!(ClockWatch::new(&cfg).synchronized());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
