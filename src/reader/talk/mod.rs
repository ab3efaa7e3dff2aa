//! The conversation with a reader that can be asked things (reader-control.md): how far its clock
//! is from ours (measured at connect and every `reader.clock_check`, and set when configured),
//! and the rewind of what it read while we were not listening (`reader.rewind`).
//!
//! No I/O and no clock: the reader thread hands every record here before parsing (replies are
//! taken here), asks [`Talk::admit`] about every parsed read, and sends what [`Talk::poll`]
//! returns. Every method takes the time it is called at, so the tests drive it without a clock.
//! What it decides it writes to `status.reader` ([`Shared`]) and the journal; it never reads
//! status back.

use chrono::{DateTime, NaiveDateTime, Utc};
use chrono_tz::Tz;
use tracing::warn;

use super::elite;
use super::format::{ipico, ultra};
use super::record::Reject;
use crate::clock::Stamp;
use crate::config::{ClockMode, Format, ReaderConfig, UltraRewindForm};

mod admit;
mod clock;
mod rewind;
mod shared;
#[cfg(test)]
mod tests;

pub use shared::{ClockStatus, Recall, RewindState, RewindStatus, Shared, StoredRead};

/// A clock request without an answer for this long has failed.
const PROBE_TIMEOUT_US: i64 = 2_000_000;
/// Requests that fail in a row before a measurement gives up (until the next check).
const PROBE_ATTEMPTS: u32 = 3;
/// IPICO: samples per measurement (the one with the shortest round trip counts; the median round
/// trip gives the one-way latency that aligns a set).
const IPICO_SAMPLES: usize = 3;
/// A download step without an answer is sent again after this long, at most this many times.
const STEP_TIMEOUT_US: i64 = 3_000_000;
const STEP_ATTEMPTS: u32 = 3;
/// The longest a rewind may run, whatever the reader sends (a whole IPICO memory at 9600 baud
/// takes about ten minutes): then it is stopped and said to have failed.
const REWIND_MAX_US: i64 = 15 * 60 * 1_000_000;
/// How far ahead of its arrival a read's time (less the reader clock's measured offset) may be
/// and still be taken as made now (the offset's error, the reader's rounding); a replay asked
/// "up to our connect" takes this much more.
const LIVE_SLACK_US: i64 = 2_000_000;
/// Gaps in an Ultra's log waiting for their rewind; more are merged into the last one.
const MAX_GAPS: usize = 8;
/// A jump in an Ultra's log index larger than this is a new log, not a gap to rewind.
const MAX_GAP_READS: u64 = 1_000_000;
/// A rewind that brings nothing new for this long is over (the Ultra has no end signal; an IPICO
/// download that stops progressing has failed).
const REWIND_IDLE_US: i64 = 30_000_000;
/// Ultra: with no live read this long after a reconnect, what was missed is asked by time (no
/// live read, no index to tell the gap), and such a replay is over when quiet this long.
const ULTRA_QUIET_US: i64 = 5_000_000;
const TIME_REPLAY_IDLE_US: i64 = 10_000_000;
/// Impinj: reads per measurement window, and the shortest first window.
const IMPINJ_SAMPLES: usize = 5;
const IMPINJ_FIRST_WINDOW_US: i64 = 5_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Ipico,
    /// An IPICO Elite, talked to on its control port (see [`super::elite`]).
    Elite,
    Ultra,
    Impinj,
    Mute,
}

/// What differs by family, said once (the conversation itself is the same for all).
impl Family {
    /// Answers clock requests and replays what it stored.
    fn talks(self) -> bool {
        matches!(self, Family::Ipico | Family::Elite | Family::Ultra)
    }

    /// A rewind replays the whole memory: one per connect (an Ultra's log is asked gap by gap).
    fn replays_whole_memory(self) -> bool {
        matches!(self, Family::Ipico | Family::Elite)
    }

    /// The clock request.
    fn get_clock(self) -> Vec<u8> {
        match self {
            Family::Ipico => ipico::get_clock().into_bytes(),
            Family::Elite => elite::GET_CLOCK.as_bytes().to_vec(),
            Family::Ultra | Family::Impinj | Family::Mute => ultra::GET_CLOCK.to_vec(),
        }
    }

    /// The set command for this local time, and how long after it the reader shows it (µs).
    fn set_clock(self, local: NaiveDateTime) -> (Vec<u8>, i64) {
        match self {
            Family::Ipico => (ipico::set_clock(local).into_bytes(), Self::IPICO_ROLLOVER_US),
            Family::Elite => (elite::set_clock(local).into_bytes(), 1_000_000),
            Family::Ultra | Family::Impinj | Family::Mute => (ultra::set_clock(local), 1_000_000),
        }
    }

    /// How long after a set arrives the reader takes the new second (µs): an IPICO Lite about
    /// 500 ms later (reader-control.md §1); the others on arrival.
    fn set_lead_us(self) -> i64 {
        if self == Family::Ipico { Self::IPICO_ROLLOVER_US } else { 0 }
    }

    const IPICO_ROLLOVER_US: i64 = ipico::SET_ROLLOVER_MS as i64 * 1000;

    /// Clock requests per measurement (the one with the shortest round trip counts).
    fn samples(self) -> usize {
        if self == Family::Ipico { IPICO_SAMPLES } else { 1 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    rtt_us: i64,
    offset_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Report,
    Set,
}

#[derive(Debug)]
enum ClockJob {
    Idle {
        next_mono: Option<i64>,
    },
    Measuring {
        samples: Vec<Sample>,
        sent: Option<Stamp>,
        failures: u32,
        then: Then,
    },
    /// IPICO: send the set at `send_mono` for the reader to show `target` at the next second.
    Setting {
        send_mono: i64,
        target: DateTime<Utc>,
    },
    /// Ultra: `?` sent, to learn whether it reads (then it is not set).
    Asking {
        sent: Option<Stamp>,
        one_way: i64,
    },
    Verifying {
        at_mono: i64,
    },
}

/// A rewind, and what it asked for. Times are the reader's (UTC µs by its clock).
#[derive(Debug)]
enum Rewind {
    Off,
    Idle,
    /// IPICO download: the step sent last (0 init, 1 configure, 2 start, 3 running), when, how
    /// often, the progress seen and when it last moved. It asks for the whole memory; what is
    /// taken is `since` (the last live read we have) up to our connect.
    Download {
        step: u8,
        sent_mono: i64,
        attempts: u32,
        progress: Option<u32>,
        moved_mono: i64,
        since: i64,
    },
    /// Elite: `replay_start` since `since`; the helper reads the replay port to its end. Reads
    /// after `until` (our connect) are not what was asked.
    Replay {
        since: i64,
        until: i64,
    },
    /// Ultra by time, `since` the last live read we have to `until` (when no live read tells
    /// the gap).
    Time {
        since: i64,
        until: i64,
        last_mono: i64,
    },
    /// Ultra by log index; the times of what it brings are held between the reads either side
    /// of the gap.
    Log {
        gap: Gap,
        last_mono: i64,
        got: u64,
    },
}

/// A gap in an Ultra's log: the indexes missing, and the reader times of the live reads either
/// side of it (the replayed reads' times are clamped between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gap {
    from: u64,
    to: u64,
    after_us: Option<i64>,
    before_us: Option<i64>,
    /// A hole among the stored reads found at start (a rewind a restart cut short, or lines
    /// that were never reads): a replay that brings less is not a failure.
    checking: bool,
}

/// What [`Talk::admit`] makes of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Made now: stamped on arrival, or with its reader time when so configured.
    Live,
    /// Made now, but its reader time is further than `reader.max_skew` from the synchronised
    /// host clock: not believed. It is stamped on arrival and moves nothing.
    Retimed,
    /// Replayed at our request, inside what was asked: made at this reader time (clamped to
    /// what was asked); its arrival says nothing of when it was made.
    Replayed(i64),
    /// Not taken: a replayed read outside what was asked (counted in `status.reader.rewind`).
    Drop,
}

pub struct Talk {
    family: Family,
    mode: ClockMode,
    check_us: i64,
    tolerance_us: i64,
    max_skew_us: i64,
    tz: Tz,
    form: ultra::Form,
    want_rewind: bool,
    shared: std::sync::Arc<Shared>,
    recall: Recall,
    clock: ClockJob,
    /// A set is owed: refused while the host clock was unsynchronised (IPICO: done once it is).
    set_owed: bool,
    rewind: Rewind,
    /// When the running rewind must be over (monotonic µs).
    rewind_deadline: i64,
    /// IPICO: a set waits for the download (the memory was written by the clock as it is).
    set_after_rewind: bool,
    /// The reader's clock was measured since this connect (an IPICO download needs it to tell
    /// stored reads from live ones).
    measured: bool,
    /// Ultra: gaps in the log waiting for their rewind.
    gaps: Vec<Gap>,
    /// Impinj: the window's largest (reader − host) and its size and start.
    window: (Option<i64>, usize, i64),
    reported_off: bool,
    connected_at: Option<Stamp>,
    /// Commands decided on a reply, sent at the next poll.
    pending: Vec<Vec<u8>>,
    /// For an Elite's control and replay ports.
    elite_out: Vec<super::elite::Request>,
    replay_port: u16,
    /// Ultra: a live read came since the connect, or a rewind by time was asked.
    live_seen: bool,
    time_asked: bool,
    /// The last measurement got no answer (said in the journal once).
    unanswered: bool,
    /// The reader clock's last measured offset from ours (µs, to the millisecond shown in
    /// status). Kept here: status is written, never read back.
    offset_us: Option<i64>,
    /// Reads the running (or last) rewind brought.
    rewind_reads: u64,
}

impl Talk {
    pub fn new(cfg: &ReaderConfig, recall: Recall, shared: std::sync::Arc<Shared>) -> Talk {
        let family = match cfg.format {
            Format::Ipico if cfg.elite_control.is_some() => Family::Elite,
            Format::Ipico => Family::Ipico,
            Format::Ultra => Family::Ultra,
            Format::ImpinjJson => Family::Impinj,
            Format::Regex | Format::Chafon => Family::Mute,
        };
        let mode = if family == Family::Mute { ClockMode::Ignore } else { cfg.clock_mode() };
        let want_rewind = cfg.rewind && family.talks();
        let gaps = if want_rewind && family == Family::Ultra {
            recall
                .holes
                .iter()
                .map(|&(from, to)| Gap { from, to, after_us: None, before_us: None, checking: true })
                .collect()
        } else {
            Vec::new()
        };
        shared.clock(|c| c.clock = Some(mode.as_str().to_string()));
        shared.rewind(|r| r.state = if want_rewind { RewindState::Idle } else { RewindState::Off });
        Talk {
            family,
            mode,
            check_us: cfg.clock_check.as_micros() as i64,
            tolerance_us: cfg.clock_tolerance.as_micros() as i64,
            max_skew_us: i64::try_from(cfg.max_skew.as_micros()).unwrap_or(i64::MAX),
            tz: cfg.timezone,
            form: match cfg.ultra_rewind_form {
                UltraRewindForm::Ascii => ultra::Form::Ascii,
                UltraRewindForm::Binary => ultra::Form::Binary,
            },
            want_rewind,
            shared,
            recall,
            clock: ClockJob::Idle { next_mono: None },
            set_owed: false,
            rewind: Rewind::Off,
            rewind_deadline: 0,
            set_after_rewind: false,
            measured: false,
            gaps,
            window: (None, 0, 0),
            reported_off: false,
            connected_at: None,
            pending: Vec::new(),
            elite_out: Vec::new(),
            replay_port: cfg.elite_replay_port,
            live_seen: false,
            time_asked: false,
            unanswered: false,
            offset_us: None,
            rewind_reads: 0,
        }
    }

    /// A fresh connection: measure (and set) the clock now, rewind what we missed.
    pub fn connected(&mut self, now: Stamp, host_synced: bool) {
        self.connected_at = Some(now);
        self.live_seen = false;
        self.time_asked = false;
        // Gaps still waiting are indexes of the reader's log: still there to ask for.
        self.pending.clear();
        self.window = (None, 0, now.monotonic_us);
        self.rewind = if self.want_rewind { Rewind::Idle } else { Rewind::Off };
        self.clock = ClockJob::Idle { next_mono: None };
        self.set_after_rewind = false;
        self.measured = false;
        self.elite_out.clear();
        if self.family.talks() && self.mode != ClockMode::Ignore {
            let then = if self.mode == ClockMode::Set {
                if host_synced {
                    Then::Set
                } else {
                    self.refuse_set();
                    Then::Report
                }
            } else {
                Then::Report
            };
            self.clock = ClockJob::Measuring { samples: Vec::new(), sent: None, failures: 0, then };
        }
    }

    fn refuse_set(&mut self) {
        self.set_owed = true;
        warn!("reader clock NOT SET: the host clock is not synchronised (reader.clock = \"set\" waits for NTP)");
        self.shared.clock(|c| c.clock_error = Some("not set: the host clock is not synchronised".into()));
    }

    /// A set given up at this connect (said once; measuring goes on).
    fn refuse(&mut self, why: &str, at: Stamp) {
        warn!("reader clock NOT SET: {why}");
        let why = why.to_string();
        self.shared.clock(|c| c.clock_error = Some(why));
        self.clock = ClockJob::Idle { next_mono: self.next_check(at.monotonic_us) };
    }

    /// The connection is gone: an unfinished rewind is asked again at the next connect.
    pub fn disconnected(&mut self, now: Stamp) {
        // Live reads taken during an unfinished download or replay are newer than what it had
        // yet to bring: the next one starts where this one did.
        if let Rewind::Download { since, .. } | Rewind::Replay { since, .. } = self.rewind {
            self.recall.reader_time_us = Some(since);
        }
        if let Rewind::Log { gap, .. } = self.rewind {
            // Asked again (what it brought is recognised as repeats).
            self.gaps.insert(0, gap);
        }
        if matches!(
            self.rewind,
            Rewind::Download { .. } | Rewind::Log { .. } | Rewind::Replay { .. } | Rewind::Time { .. }
        ) {
            self.finish(now, Some("the connection was lost before the rewind ended".into()));
        }
        self.connected_at = None;
    }

    /// When `poll` next has something to do (monotonic µs), if it waits on time.
    pub fn next_due(&self) -> Option<i64> {
        if !self.pending.is_empty() {
            return Some(0);
        }
        let clock = match &self.clock {
            ClockJob::Idle { next_mono } => *next_mono,
            ClockJob::Measuring { sent: Some(s), .. } => Some(s.monotonic_us + PROBE_TIMEOUT_US),
            ClockJob::Measuring { sent: None, .. } => Some(0),
            ClockJob::Setting { send_mono, .. } => Some(*send_mono),
            ClockJob::Asking { sent: Some(s), .. } => Some(s.monotonic_us + PROBE_TIMEOUT_US),
            ClockJob::Asking { sent: None, .. } => Some(0),
            ClockJob::Verifying { at_mono } => Some(*at_mono),
        };
        let rewind = match &self.rewind {
            Rewind::Download { sent_mono, moved_mono, step, .. } => Some(
                if *step < 3 { sent_mono + STEP_TIMEOUT_US } else { moved_mono + REWIND_IDLE_US }
                    .min(self.rewind_deadline),
            ),
            Rewind::Log { last_mono, .. } => Some((last_mono + REWIND_IDLE_US).min(self.rewind_deadline)),
            Rewind::Time { last_mono, .. } => Some((last_mono + TIME_REPLAY_IDLE_US).min(self.rewind_deadline)),
            Rewind::Replay { .. } => Some(self.rewind_deadline),
            Rewind::Idle if !self.gaps.is_empty() => Some(0),
            Rewind::Idle if self.quiet_since_connect() => self.connected_at.map(|c| c.monotonic_us + ULTRA_QUIET_US),
            _ => None,
        };
        match (clock, rewind) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What to send the reader now.
    pub fn poll(&mut self, now: Stamp, host_synced: bool) -> Vec<Vec<u8>> {
        let mut out = std::mem::take(&mut self.pending);
        self.poll_clock(now, host_synced, &mut out);
        self.poll_rewind(now, &mut out);
        out
    }

    fn get_clock(&self) -> Vec<u8> {
        self.family.get_clock()
    }

    /// A command to the reader: on its own line, or an Elite's control port.
    fn send_reader(&mut self, out: &mut Vec<Vec<u8>>, command: Vec<u8>) {
        if self.family == Family::Elite {
            self.elite_out.push(super::elite::Request::Command(command));
        } else {
            out.push(command);
        }
    }

    /// What to ask of an Elite's control and replay ports now.
    pub fn take_elite(&mut self) -> Vec<super::elite::Request> {
        std::mem::take(&mut self.elite_out)
    }

    /// A line from an Elite's control port.
    pub fn elite_line(&mut self, line: &str, at: Stamp) {
        if let Some(local) = elite::parse_clock(line) {
            self.clock_reply(local, 1_000_000, at);
        }
    }

    /// Take a control reply: `Ok(true)` when the record was one (it is not a read), an error
    /// when it was a control frame that does not hold together (counted as rejected).
    pub fn reply(&mut self, record: &[u8], at: Stamp) -> Result<bool, Reject> {
        match self.family {
            Family::Ipico if record.starts_with(b"ab") => {
                let reply = ipico::parse_reply(&String::from_utf8_lossy(record)).map_err(|e| match e {
                    ipico::BadFrame::Checksum => Reject::BadChecksum,
                    ipico::BadFrame::Short | ipico::BadFrame::Length => Reject::BadLength,
                    ipico::BadFrame::NotControl | ipico::BadFrame::NotHex | ipico::BadFrame::Field => Reject::BadField,
                })?;
                match reply {
                    ipico::Reply::Clock { local, .. } => self.clock_reply(local, 10_000, at),
                    ipico::Reply::Download { .. } => self.download_reply(&reply, at),
                    ipico::Reply::Error { code } => self.download_refused(code, at),
                    _ => {}
                }
                Ok(true)
            }
            Family::Ultra => {
                if let ClockJob::Asking { sent: Some(_), one_way } = self.clock
                    && let Some(state) = record.strip_prefix(b"S=")
                {
                    if state.first() == Some(&b'0') {
                        self.schedule_set(one_way, at);
                    } else {
                        self.refuse(
                            "not set: the Ultra is reading (its clock can be set only while it is stopped)",
                            at,
                        );
                    }
                    return Ok(true);
                }
                let Some(local) = std::str::from_utf8(record).ok().and_then(ultra::parse_clock) else {
                    return Ok(false);
                };
                self.clock_reply(local, 1_000_000, at);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The reader clock's last measured offset from ours, µs (0 while never measured).
    pub fn offset_us(&self) -> i64 {
        self.offset_us.unwrap_or(0)
    }
}
