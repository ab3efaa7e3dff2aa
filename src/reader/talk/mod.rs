//! The conversation with a reader that can be asked things (reader-control.md): how far its clock
//! is from ours (measured at connect and every `reader.clock_check`, and set when configured),
//! and the rewind of what it read while we were not listening (`reader.rewind`).
//!
//! Pure: the reader thread hands every record here before parsing (replies are taken here),
//! asks [`Talk::admit`] about every parsed read, and sends what [`Talk::poll`] returns. Every
//! method takes the time it is called at, so the tests drive it without a clock.

use chrono::{DateTime, NaiveDateTime, Utc};
use chrono_tz::Tz;
use tracing::{info, warn};

use super::control::{elite, ipico, ultra};
use super::format::Reject;
use crate::clock::Stamp;
use crate::config::{ClockMode, Format, ReaderConfig, UltraRewindForm};

mod admit;
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
/// How far a read's time (less the reader clock's measured offset) may stray from its arrival
/// and still be taken as made now: the reader's own buffering, and the offset's error.
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
        let want_rewind = cfg.rewind && matches!(family, Family::Ipico | Family::Elite | Family::Ultra);
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
            gaps: Vec::new(),
            window: (None, 0, 0),
            reported_off: false,
            connected_at: None,
            pending: Vec::new(),
            elite_out: Vec::new(),
            replay_port: cfg.elite_replay_port,
            live_seen: false,
            time_asked: false,
            unanswered: false,
        }
    }

    /// A fresh connection: measure (and set) the clock now, rewind what we missed.
    pub fn connected(&mut self, now: Stamp, host_synced: bool) {
        self.connected_at = Some(now);
        self.live_seen = false;
        self.time_asked = false;
        self.gaps.clear();
        self.pending.clear();
        self.window = (None, 0, now.monotonic_us);
        self.rewind = if self.want_rewind { Rewind::Idle } else { Rewind::Off };
        self.clock = ClockJob::Idle { next_mono: None };
        self.set_after_rewind = false;
        self.measured = false;
        self.elite_out.clear();
        if matches!(self.family, Family::Ipico | Family::Elite | Family::Ultra) && self.mode != ClockMode::Ignore {
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
        match self.family {
            Family::Ipico => ipico::get_clock().into_bytes(),
            Family::Elite => elite::GET_CLOCK.as_bytes().to_vec(),
            _ => ultra::GET_CLOCK.to_vec(),
        }
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

    fn poll_clock(&mut self, now: Stamp, host_synced: bool, out: &mut Vec<Vec<u8>>) {
        let mono = now.monotonic_us;
        if self.set_after_rewind && !self.download_pending() && matches!(self.clock, ClockJob::Idle { .. }) {
            self.set_after_rewind = false;
            info!("the download is over: setting the reader's clock");
            self.clock = ClockJob::Measuring { samples: Vec::new(), sent: None, failures: 0, then: Then::Set };
        }
        match &mut self.clock {
            ClockJob::Idle { next_mono: Some(at) } if mono >= *at => {
                let then = if self.set_owed && host_synced && matches!(self.family, Family::Ipico | Family::Elite) {
                    info!("the host clock is synchronised now: setting the reader's clock");
                    Then::Set
                } else {
                    Then::Report
                };
                self.clock = ClockJob::Measuring { samples: Vec::new(), sent: None, failures: 0, then };
                self.poll_clock(now, host_synced, out);
            }
            ClockJob::Idle { .. } => {}
            ClockJob::Measuring { sent: None, .. } => {
                let command = self.get_clock();
                if let ClockJob::Measuring { sent, .. } = &mut self.clock {
                    *sent = Some(now);
                }
                self.send_reader(out, command);
            }
            ClockJob::Measuring { sent: Some(s), failures, .. } if mono - s.monotonic_us >= PROBE_TIMEOUT_US => {
                *failures += 1;
                if *failures >= PROBE_ATTEMPTS {
                    // Said once (status keeps saying it), not at every check.
                    if !self.unanswered {
                        warn!("the reader does not answer clock requests; its clock is not measured");
                    }
                    self.unanswered = true;
                    self.shared.clock(|c| c.clock_error = Some("the reader does not answer clock requests".into()));
                    self.clock = ClockJob::Idle { next_mono: self.next_check(mono) };
                } else {
                    let command = self.get_clock();
                    if let ClockJob::Measuring { sent, .. } = &mut self.clock {
                        *sent = Some(now);
                    }
                    self.send_reader(out, command);
                }
            }
            ClockJob::Measuring { .. } => {}
            ClockJob::Setting { send_mono, target } if mono >= *send_mono => {
                let Some(local) = crate::timestamp::utc_to_local(target.timestamp_micros(), self.tz) else {
                    self.refuse("not set: the host's time cannot be shown in reader.timezone", now);
                    return;
                };
                let (command, settle) = match self.family {
                    Family::Ipico => (ipico::set_clock(local).into_bytes(), ipico::SET_ROLLOVER_MS as i64 * 1000),
                    Family::Elite => (elite::set_clock(local).into_bytes(), 1_000_000),
                    _ => (ultra::set_clock(local), 1_000_000),
                };
                self.send_reader(out, command);
                info!(to = %local, "reader clock set");
                self.set_owed = false;
                self.shared.clock(|c| {
                    c.clock_set_at = Some(crate::clock::rfc3339(now.utc_us));
                    c.clock_error = None;
                });
                // Verify once the new second has taken effect.
                self.clock = ClockJob::Verifying { at_mono: mono + settle + 200_000 };
            }
            ClockJob::Setting { .. } => {}
            ClockJob::Asking { sent: None, .. } => {
                if let ClockJob::Asking { sent, .. } = &mut self.clock {
                    *sent = Some(now);
                }
                out.push(b"?".to_vec());
            }
            ClockJob::Asking { sent: Some(s), .. } if mono - s.monotonic_us >= PROBE_TIMEOUT_US => {
                self.refuse("not set: the Ultra did not say whether it is reading", now);
            }
            ClockJob::Asking { .. } => {}
            ClockJob::Verifying { at_mono } if mono >= *at_mono => {
                self.clock = ClockJob::Measuring { samples: Vec::new(), sent: None, failures: 0, then: Then::Report };
                self.poll_clock(now, host_synced, out);
            }
            ClockJob::Verifying { .. } => {}
        }
    }

    fn next_check(&self, mono: i64) -> Option<i64> {
        (self.check_us > 0).then_some(mono + self.check_us)
    }

    /// Take a control reply: `Ok(true)` when the record was one (it is not a read), an error
    /// when it was a control frame that does not hold together (counted as rejected).
    pub fn reply(&mut self, record: &[u8], at: Stamp) -> Result<bool, Reject> {
        match self.family {
            Family::Ipico if record.starts_with(b"ab") => {
                let reply = ipico::parse(&String::from_utf8_lossy(record)).map_err(|e| match e {
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

    fn clock_reply(&mut self, local: NaiveDateTime, resolution_us: i64, at: Stamp) {
        let ClockJob::Measuring { samples, sent: Some(sent), then, .. } = &mut self.clock else { return };
        // Checked: a reply may name any year chrono can hold (an Ultra's `r` up to +262142).
        let Some(reader) = crate::timestamp::local_to_utc(local, self.tz) else { return };
        let rtt_us = at.monotonic_us - sent.monotonic_us;
        self.unanswered = false;
        // The reader's clock was read about halfway through the round trip; its reading is
        // truncated to its resolution, so the middle of that step is the best guess.
        let offset_us = reader.timestamp_micros() + resolution_us / 2 - (sent.utc_us + rtt_us / 2);
        samples.push(Sample { rtt_us, offset_us });
        let want = if self.family == Family::Ipico { IPICO_SAMPLES } else { 1 };
        if samples.len() < want {
            *self.clock_sent_mut() = None;
            return;
        }
        let best = samples.iter().min_by_key(|s| s.rtt_us).copied().unwrap_or(Sample { rtt_us, offset_us });
        let mut rtts: Vec<i64> = samples.iter().map(|s| s.rtt_us).collect();
        rtts.sort_unstable();
        let one_way = rtts[rtts.len() / 2] / 2;
        let then = *then;
        self.report(best.offset_us, at);
        if then == Then::Set && self.download_pending() {
            // The stored reads were stamped by the clock as it is: they are downloaded (and
            // told from live ones) first, and the clock is set after.
            self.set_after_rewind = true;
            self.clock = ClockJob::Idle { next_mono: None };
        } else if then == Then::Set && self.family == Family::Ultra {
            // An Ultra's clock "cannot be fixed when the Ultra is in 'Read' mode": ask first.
            self.clock = ClockJob::Asking { sent: None, one_way };
        } else if then == Then::Set {
            self.schedule_set(one_way, at);
        } else {
            self.clock = ClockJob::Idle { next_mono: self.next_check(at.monotonic_us) };
        }
    }

    fn schedule_set(&mut self, one_way: i64, at: Stamp) {
        // Aim for the next whole second far enough ahead to send in time: an IPICO Lite takes
        // the new second about 500 ms after the command arrives (reader-control.md §1); others
        // are sent to arrive on the second.
        let lead = if self.family == Family::Ipico { ipico::SET_ROLLOVER_MS as i64 * 1000 } else { 0 } + one_way;
        let now_utc = at.utc_us;
        let target_us = (now_utc + lead + 200_000).div_euclid(1_000_000) * 1_000_000 + 1_000_000;
        let Some(target) = DateTime::from_timestamp_micros(target_us) else {
            self.refuse("not set: the host's time is out of range", at);
            return;
        };
        self.clock = ClockJob::Setting { send_mono: at.monotonic_us + (target_us - lead - now_utc), target };
    }

    fn clock_sent_mut(&mut self) -> &mut Option<Stamp> {
        match &mut self.clock {
            ClockJob::Measuring { sent, .. } => sent,
            _ => unreachable!("only called while measuring"),
        }
    }

    fn report(&mut self, offset_us: i64, at: Stamp) {
        let off = offset_us.abs() > self.tolerance_us;
        let ms = (offset_us as f64 / 1000.0).round() as i64;
        if off && !self.reported_off {
            warn!(
                offset_ms = ms,
                "READER CLOCK {} by {:.3} s (beyond reader.clock_tolerance): its timestamps are off by as much",
                if offset_us > 0 { "FAST" } else { "SLOW" },
                offset_us.abs() as f64 / 1e6
            );
        } else if !off && self.reported_off {
            info!(offset_ms = ms, "reader clock within tolerance again");
        } else {
            info!(offset_ms = ms, "reader clock measured");
        }
        self.reported_off = off;
        self.measured = true;
        self.shared.clock(|c| {
            c.clock_offset_ms = Some(ms);
            c.clock_measured_at = Some(crate::clock::rfc3339(at.utc_us));
            c.clock_off = off;
            if !self.set_owed {
                c.clock_error = None;
            }
        });
    }

    /// Impinj: `firstSeenTimestamp` minus arrival is the offset less the latency, so the largest
    /// over a window is the best estimate.
    fn impinj_sample(&mut self, sample: i64, at: Stamp) {
        let (best, n, start) = &mut self.window;
        *best = (*best).max(Some(sample));
        *n += 1;
        let first = self.reported_off || self.shared.clock.lock().map(|c| c.clock_offset_ms.is_none()).unwrap_or(true);
        let span = if first { IMPINJ_FIRST_WINDOW_US } else { self.check_us.max(IMPINJ_FIRST_WINDOW_US) };
        if *n >= IMPINJ_SAMPLES && at.monotonic_us - *start >= span {
            let offset = best.unwrap_or(0);
            self.window = (None, 0, at.monotonic_us);
            self.report(offset, at);
        }
    }

    /// The reader clock's last measured offset from ours, µs (0 while never measured).
    pub fn offset_us(&self) -> i64 {
        self.shared.clock.lock().ok().and_then(|c| c.clock_offset_ms).unwrap_or(0).saturating_mul(1000)
    }
}
