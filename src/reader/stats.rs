//! What the reader thread tells status and metrics: counters, the last error, antennas, the
//! clock and rewinds.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::record::Reject;
use super::talk;

/// Counters the reader shares with status and metrics.
#[derive(Debug, Default)]
pub struct ReaderStats {
    pub connected: AtomicBool,
    pub reads_total: AtomicU64,
    pub rejected: [AtomicU64; Reject::ALL.len()],
    /// Host time of the last read, UTC µs; 0 = never.
    pub last_read_at: AtomicI64,
    /// Live reads whose reader time was not believed (beyond `reader.max_skew`), stamped with
    /// host time instead; and the host time of the last (UTC µs; 0 = never).
    pub retimed: AtomicU64,
    pub last_retimed_at: AtomicI64,
    /// Proof of life for the watchdog: the reader thread beats between records and reopens.
    pub live: Arc<crate::liveness::Liveness>,
    pub last_error: Mutex<Option<String>>,
    /// Reads per antenna, and antennas gone quiet (set up by `Reader::new`).
    pub antennas: Mutex<Option<crate::antennas::Antennas>>,
    /// The reader's clock and rewinds (see [`talk`]).
    pub talk: Arc<talk::Shared>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReaderStatus {
    pub port: String,
    pub connected: bool,
    pub reads_total: u64,
    pub rejected_total: u64,
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Live reads whose reader time was further than `reader.max_skew` from the synchronised host
    /// clock: kept, with the host's time.
    #[serde(default)]
    pub retimed_total: u64,
    #[serde(default)]
    pub last_retimed_at: Option<String>,
    /// A read was retimed in the last minute (a problem while it lasts).
    #[serde(default)]
    pub retiming: bool,
    pub last_read_at: Option<String>,
    pub last_error: Option<String>,
    /// Reads stored in the last 60 s (from the database).
    #[serde(default)]
    pub reads_last_minute: i64,
    /// Per antenna, where the format carries one (and those `reader.antennas` names).
    #[serde(default)]
    pub antennas: Vec<crate::antennas::AntennaStatus>,
    #[serde(flatten)]
    pub clock: talk::ClockStatus,
    #[serde(default)]
    pub rewind: talk::RewindStatus,
}

impl ReaderStats {
    pub fn snapshot(&self, port: &str) -> ReaderStatus {
        let rejected: std::collections::BTreeMap<_, _> = Reject::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), self.rejected[r.index()].load(Ordering::Relaxed)))
            .collect();
        let last = self.last_read_at.load(Ordering::Relaxed);
        let retimed_at = self.last_retimed_at.load(Ordering::Relaxed);
        ReaderStatus {
            retimed_total: self.retimed.load(Ordering::Relaxed),
            retiming: retimed_at != 0 && crate::clock::now_us().saturating_sub(retimed_at) < 60_000_000,
            last_retimed_at: (retimed_at != 0).then(|| crate::clock::rfc3339(retimed_at)),
            port: port.to_string(),
            connected: self.connected.load(Ordering::Relaxed),
            reads_total: self.reads_total.load(Ordering::Relaxed),
            rejected_total: rejected.values().sum(),
            rejected,
            last_read_at: (last != 0).then(|| crate::clock::rfc3339(last)),
            last_error: self.last_error.lock().map(|e| e.clone()).unwrap_or(None),
            reads_last_minute: 0,
            antennas: self
                .antennas
                .lock()
                .ok()
                .and_then(|a| a.as_ref().map(|a| a.status(crate::clock::monotonic_us())))
                .unwrap_or_default(),
            clock: self.talk.clock.lock().map(|c| c.clone()).unwrap_or_default(),
            rewind: self.talk.rewind.lock().map(|r| r.clone()).unwrap_or_default(),
        }
    }

    pub(super) fn set_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = error;
        }
    }
}
