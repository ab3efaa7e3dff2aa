//! Rewinds: an IPICO Lite's stored-read download, an Elite's replay, an Ultra's log by index.

use tracing::{info, warn};

use super::*;

impl Talk {
    /// An Elite's replay ended (`None`: the reader closed it, as it should).
    pub fn replay_end(&mut self, error: Option<String>, at: Stamp) {
        if matches!(self.rewind, Rewind::Replay { .. }) {
            self.finish(at, error);
        }
    }

    pub(super) fn poll_rewind(&mut self, now: Stamp, out: &mut Vec<Vec<u8>>) {
        let mono = now.monotonic_us;
        // The IPICO download waits for the clock work of a connect, which shares the line.
        let clock_busy = !matches!(self.clock, ClockJob::Idle { .. });
        let quiet_too_long =
            self.quiet_since_connect() && self.connected_at.is_some_and(|c| mono - c.monotonic_us >= ULTRA_QUIET_US);
        match &mut self.rewind {
            Rewind::Idle if self.family == Family::Ipico && !clock_busy && self.connected_at.is_some() => {
                let Some(since) = self.recall.reader_time_us else {
                    info!("nothing to rewind: no read from this reader is stored yet");
                    self.rewind = Rewind::Off;
                    return;
                };
                self.start(now, format!("stored reads since {}", crate::clock::rfc3339(since)));
                out.push(ipico::download_init().into_bytes());
                self.rewind = Rewind::Download { step: 0, sent_mono: mono, progress: None, moved_mono: mono, since };
            }
            Rewind::Idle if self.family == Family::Elite && !clock_busy && self.connected_at.is_some() => {
                let Some(since) = self.recall.reader_time_us else {
                    info!("nothing to rewind: no read from this reader is stored yet");
                    self.rewind = Rewind::Off;
                    return;
                };
                let local = DateTime::from_timestamp_micros(since)
                    .unwrap_or_else(Utc::now)
                    .with_timezone(&self.tz)
                    .naive_local();
                self.start(now, format!("replay since {}", crate::clock::rfc3339(since)));
                self.elite_out.push(crate::reader::elite::Request::Replay(
                    elite::replay_start(1, self.replay_port, Some(local)).into_bytes(),
                ));
                self.rewind = Rewind::Replay { since };
            }
            Rewind::Idle if self.family == Family::Ultra && !self.gaps.is_empty() => {
                let (from, to) = self.gaps.remove(0);
                self.start(now, format!("log {from}..{to}"));
                out.push(ultra::rewind_by_index(self.form, from, to));
                self.rewind = Rewind::Log { from, to, last_mono: mono, got: 0 };
            }
            Rewind::Idle if quiet_too_long => {
                // Nothing live says where the gap ends: ask by time, from the newest read we
                // have to a minute past the reader's now (its local time, seconds since 1980).
                let since = self.recall.reader_time_us.unwrap_or(now.utc_us);
                let tz = self.tz;
                let local = |us: i64| {
                    DateTime::from_timestamp_micros(us).unwrap_or_else(Utc::now).with_timezone(&tz).naive_local()
                };
                let end = now.utc_us + self.offset_us() + 60_000_000;
                let command = ultra::rewind_by_time(self.form, local(since), local(end));
                self.time_asked = true;
                self.start(now, format!("reads since {}", crate::clock::rfc3339(since)));
                out.push(command);
                self.rewind = Rewind::Time { since, last_mono: mono };
            }
            Rewind::Time { last_mono, .. } if mono - *last_mono >= TIME_REPLAY_IDLE_US => {
                // No end signal, no index to wait for: over when quiet.
                self.finish(now, None);
            }
            Rewind::Download { step, sent_mono, .. } if *step < 3 && mono - *sent_mono >= STEP_TIMEOUT_US => {
                *sent_mono = mono;
                out.push(Self::download_step(*step));
            }
            Rewind::Download { step: 3, moved_mono, .. } if mono - *moved_mono >= REWIND_IDLE_US => {
                out.push(ipico::download_stop().into_bytes());
                out.push(ipico::download_cleanup().into_bytes());
                self.finish(now, Some("the download stopped progressing".into()));
            }
            Rewind::Log { last_mono, from, to, got } if mono - *last_mono >= REWIND_IDLE_US => {
                // The Ultra sends no end: what did not come in this long is not coming.
                let asked = *to - *from + 1;
                let error = (*got < asked).then(|| format!("the reader replayed {got} of the {asked} reads asked for"));
                self.finish(now, error);
            }
            _ => {}
        }
    }

    pub(super) fn download_step(step: u8) -> Vec<u8> {
        match step {
            0 => ipico::download_init(),
            1 => ipico::download_configure(),
            _ => ipico::download_start(),
        }
        .into_bytes()
    }

    pub(super) fn download_reply(&mut self, extent: u32, progress: u32, at: Stamp) {
        let Rewind::Download { step, sent_mono, progress: seen, moved_mono, .. } = &mut self.rewind else { return };
        let mono = at.monotonic_us;
        if *step < 2 {
            *step += 1;
            *sent_mono = mono;
            let next = Self::download_step(*step);
            self.pending.push(next);
            return;
        }
        if *step == 2 {
            *step = 3;
            *moved_mono = mono;
        }
        if *seen != Some(progress) {
            *seen = Some(progress);
            *moved_mono = mono;
        }
        if extent == 0 || progress >= extent {
            self.pending.push(ipico::download_stop().into_bytes());
            self.pending.push(ipico::download_cleanup().into_bytes());
            self.finish(at, None);
        }
    }

    pub(super) fn start(&mut self, now: Stamp, asked: String) {
        info!(asked = %asked, "rewinding the reader");
        self.shared.rewind(|r| {
            r.state = RewindState::Running;
            r.asked = Some(asked);
            r.started_at = Some(crate::clock::rfc3339(now.utc_us));
            r.finished_at = None;
            r.reads = 0;
            r.error = None;
        });
    }

    pub(super) fn finish(&mut self, now: Stamp, error: Option<String>) {
        let reads = self.shared.rewind.lock().map(|r| r.reads).unwrap_or(0);
        match &error {
            None => info!(reads, "rewind finished"),
            Some(e) => warn!(reads, error = %e, "rewind ended early"),
        }
        self.shared.rewind(|r| {
            r.state = if error.is_some() { RewindState::Failed } else { RewindState::Done };
            r.finished_at = Some(crate::clock::rfc3339(now.utc_us));
            r.rewinds_total += 1;
            r.error = error;
        });
        self.rewind = Rewind::Idle;
        if matches!(self.family, Family::Ipico | Family::Elite) {
            // One download or replay per connect: the whole memory is replayed each time.
            self.rewind = Rewind::Off;
        }
    }

    pub(super) fn count_replayed(&self) {
        self.shared.rewind(|r| {
            r.reads += 1;
            r.reads_total += 1;
        });
    }

    /// Ultra: connected, rewinding wanted, and no live read (nor a rewind by time) yet.
    pub(super) fn quiet_since_connect(&self) -> bool {
        self.family == Family::Ultra
            && self.want_rewind
            && !self.live_seen
            && !self.time_asked
            && self.connected_at.is_some()
            && self.recall.reader_time_us.is_some()
    }

    /// An Ultra's read: a replayed one counts for its rewind; a live one may reveal a gap.
    pub(super) fn admit_ultra(&mut self, reader_time_us: Option<i64>, raw: &[u8], at: Stamp) -> Admit {
        let Some((replayed, index)) = std::str::from_utf8(raw).ok().and_then(ultra::replay_marks) else {
            return Admit::Live;
        };
        if replayed {
            if let Rewind::Time { since, last_mono } = &mut self.rewind {
                *last_mono = at.monotonic_us;
                if reader_time_us.is_some_and(|t| t > *since) {
                    self.count_replayed();
                }
                // What it brings is not a gap for the next live read to ask again.
                self.recall.ultra_index = self.recall.ultra_index.max(Some(index));
                return Admit::Replayed;
            }
            if let Rewind::Log { from, to, last_mono, got } = &mut self.rewind
                && (*from..=*to).contains(&index)
            {
                *last_mono = at.monotonic_us;
                *got += 1;
                let done = index >= *to;
                self.count_replayed();
                if done {
                    self.finish(at, None);
                }
            }
            return Admit::Replayed;
        }
        self.live_seen = true;
        match self.recall.ultra_index {
            Some(last) if index > last + 1 && self.want_rewind => self.gaps.push((last + 1, index - 1)),
            Some(last) if index + 1 < last => {
                warn!(
                    index,
                    last, "the reader's log starts again (it was cleared or replaced): nothing before this is rewound"
                )
            }
            _ => {}
        }
        if self.recall.ultra_index.is_none_or(|last| index > last || index + 1 < last) {
            self.recall.ultra_index = Some(index);
        }
        Admit::Live
    }
}
