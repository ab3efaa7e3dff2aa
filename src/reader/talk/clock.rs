//! The reader's clock: measured by request (IPICO, Elite, Ultra) or from its timestamps
//! (Impinj), reported against `reader.clock_tolerance`, and set when configured.

use tracing::{info, warn};

use super::*;

impl Talk {
    pub(super) fn poll_clock(&mut self, now: Stamp, host_synced: bool, out: &mut Vec<Vec<u8>>) {
        let mono = now.monotonic_us;
        if self.set_after_rewind && !self.download_pending() && matches!(self.clock, ClockJob::Idle { .. }) {
            self.set_after_rewind = false;
            info!("the download is over: setting the reader's clock");
            self.clock = ClockJob::Measuring { samples: Vec::new(), sent: None, failures: 0, then: Then::Set };
        }
        match &mut self.clock {
            ClockJob::Idle { next_mono: Some(at) } if mono >= *at => {
                let then = if self.set_owed && host_synced && self.family.replays_whole_memory() {
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
                let (command, settle) = self.family.set_clock(local);
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

    pub(super) fn next_check(&self, mono: i64) -> Option<i64> {
        (self.check_us > 0).then_some(mono + self.check_us)
    }

    pub(super) fn clock_reply(&mut self, local: NaiveDateTime, resolution_us: i64, at: Stamp) {
        let ClockJob::Measuring { samples, sent: Some(sent), then, .. } = &mut self.clock else { return };
        // Checked: a reply may name any year chrono can hold (an Ultra's `r` up to +262142).
        let Some(reader) = crate::timestamp::local_to_utc(local, self.tz) else { return };
        let rtt_us = at.monotonic_us - sent.monotonic_us;
        self.unanswered = false;
        // The reader's clock was read about halfway through the round trip; its reading is
        // truncated to its resolution, so the middle of that step is the best guess.
        let offset_us = reader.timestamp_micros() + resolution_us / 2 - (sent.utc_us + rtt_us / 2);
        samples.push(Sample { rtt_us, offset_us });
        let want = self.family.samples();
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

    pub(super) fn schedule_set(&mut self, one_way: i64, at: Stamp) {
        // Aim for the next whole second far enough ahead to send in time: an IPICO Lite takes
        // the new second about 500 ms after the command arrives (reader-control.md §1); others
        // are sent to arrive on the second.
        let lead = self.family.set_lead_us() + one_way;
        let now_utc = at.utc_us;
        let target_us = (now_utc + lead + 200_000).div_euclid(1_000_000) * 1_000_000 + 1_000_000;
        let Some(target) = DateTime::from_timestamp_micros(target_us) else {
            self.refuse("not set: the host's time is out of range", at);
            return;
        };
        self.clock = ClockJob::Setting { send_mono: at.monotonic_us + (target_us - lead - now_utc), target };
    }

    pub(super) fn clock_sent_mut(&mut self) -> &mut Option<Stamp> {
        match &mut self.clock {
            ClockJob::Measuring { sent, .. } => sent,
            _ => unreachable!("only called while measuring"),
        }
    }

    pub(super) fn report(&mut self, offset_us: i64, at: Stamp) {
        let off = offset_us.unsigned_abs() > self.tolerance_us.unsigned_abs();
        let ms = (offset_us as f64 / 1000.0).round() as i64;
        if off && !self.reported_off {
            warn!(
                offset_ms = ms,
                "READER CLOCK {} by {:.3} s (beyond reader.clock_tolerance): its timestamps are off by as much",
                if offset_us > 0 { "FAST" } else { "SLOW" },
                offset_us.unsigned_abs() as f64 / 1e6
            );
        } else if !off && self.reported_off {
            info!(offset_ms = ms, "reader clock within tolerance again");
        } else {
            info!(offset_ms = ms, "reader clock measured");
        }
        self.reported_off = off;
        self.measured = true;
        self.offset_us = Some(ms.saturating_mul(1000));
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
    pub(super) fn impinj_sample(&mut self, sample: i64, at: Stamp) {
        let (best, n, start) = &mut self.window;
        *best = (*best).max(Some(sample));
        *n += 1;
        let first = self.reported_off || self.offset_us.is_none();
        let span = if first { IMPINJ_FIRST_WINDOW_US } else { self.check_us.max(IMPINJ_FIRST_WINDOW_US) };
        if *n >= IMPINJ_SAMPLES && at.monotonic_us - *start >= span {
            let offset = best.unwrap_or(0);
            self.window = (None, 0, at.monotonic_us);
            self.report(offset, at);
        }
    }
}
