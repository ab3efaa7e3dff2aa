//! What status and metrics see of the conversation with the reader, and what the store
//! remembers of it (where a rewind begins).

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::reader::format::ultra;

/// What the reader last gave us, from the store at start and from every live read after:
/// where a rewind begins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recall {
    /// The reader time of the last live read whose time was believed (UTC µs, by its clock):
    /// the last, not the newest, so a clock set back is followed, and a read dated ahead (not
    /// believed) moves nothing.
    pub reader_time_us: Option<i64>,
    /// Ultra: the highest log index stored.
    pub ultra_index: Option<u64>,
    /// Ultra: holes among the log indexes stored (the most recent [`MAX_HOLES`]): a rewind that
    /// a restart cut short left them, and they are asked for again.
    pub holes: Vec<(u64, u64)>,
}

/// Holes asked for again at start, and the widest (wider is a new log, not a hole).
const MAX_HOLES: usize = 8;
const MAX_HOLE: u64 = 10_000;

/// A stored read, as far as a rewind cares.
#[derive(Debug, Clone, Default)]
pub struct StoredRead {
    pub reader_time_us: Option<i64>,
    pub received_at_us: i64,
    pub clock_synced: bool,
    pub replayed: bool,
    pub raw: Vec<u8>,
}

impl Recall {
    /// From the last reads stored, newest first: the reader time of the newest live read whose
    /// time is believed (within `max_skew_us` of its arrival on a synchronised clock), and the
    /// highest Ultra log index.
    pub fn from_reads<'a>(reads: impl IntoIterator<Item = &'a StoredRead>, max_skew_us: i64) -> Recall {
        let mut recall = Recall::default();
        let mut indexes = Vec::new();
        for read in reads {
            if recall.reader_time_us.is_none()
                && !read.replayed
                && let Some(t) = read.reader_time_us
                && (!read.clock_synced || t.abs_diff(read.received_at_us) <= max_skew_us.unsigned_abs())
            {
                recall.reader_time_us = Some(t);
            }
            if let Some((_, index)) = std::str::from_utf8(&read.raw).ok().and_then(ultra::replay_marks) {
                recall.ultra_index = recall.ultra_index.max(Some(index));
                indexes.push(index);
            }
        }
        indexes.sort_unstable();
        indexes.dedup();
        recall.holes = indexes
            .windows(2)
            .filter(|w| w[1] - w[0] > 1 && w[1] - w[0] - 1 <= MAX_HOLE)
            .map(|w| (w[0] + 1, w[1] - 1))
            .collect();
        let skip = recall.holes.len().saturating_sub(MAX_HOLES);
        recall.holes.drain(..skip);
        recall
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewindState {
    /// `reader.rewind` is off, or the reader cannot replay.
    #[default]
    Off,
    /// Waiting for something to rewind.
    Idle,
    Running,
    Done,
    Failed,
}

/// `status.reader.rewind`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewindStatus {
    pub state: RewindState,
    /// What was asked for, in words (`log 101..600`, `stored reads since …`).
    pub asked: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Replayed reads taken in by the current or last rewind.
    pub reads: u64,
    /// Replayed reads not taken by the current or last rewind, and since the gateway started:
    /// outside what was asked (flagged as replayed while no rewind ran, an index or a time
    /// outside the range asked; an IPICO download resends its whole memory, and what is older
    /// than the last live read we have counts here too).
    #[serde(default)]
    pub outside: u64,
    #[serde(default)]
    pub outside_total: u64,
    /// Replayed reads taken in since the gateway started, and rewinds finished.
    pub reads_total: u64,
    pub rewinds_total: u64,
    pub error: Option<String>,
}

/// The clock part of `status.reader`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClockStatus {
    pub clock: Option<String>,
    /// Reader clock minus host clock, ms (positive: the reader is fast).
    pub clock_offset_ms: Option<i64>,
    pub clock_measured_at: Option<String>,
    /// The offset is beyond `reader.clock_tolerance`.
    #[serde(default)]
    pub clock_off: bool,
    pub clock_set_at: Option<String>,
    /// Why the clock could not be measured or set.
    pub clock_error: Option<String>,
}

/// What status and metrics see of the conversation.
#[derive(Debug, Default)]
pub struct Shared {
    pub clock: Mutex<ClockStatus>,
    pub rewind: Mutex<RewindStatus>,
}

impl Shared {
    pub(super) fn clock(&self, f: impl FnOnce(&mut ClockStatus)) {
        if let Ok(mut c) = self.clock.lock() {
            f(&mut c);
        }
    }
    pub(super) fn rewind(&self, f: impl FnOnce(&mut RewindStatus)) {
        if let Ok(mut r) = self.rewind.lock() {
            f(&mut r);
        }
    }
}
