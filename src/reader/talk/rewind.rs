//! Rewinds: an IPICO Lite's stored-read download, an Elite's replay, an Ultra's log by index (a
//! gap in its log indexes) or by time (nothing live to tell the gap).

use tracing::{info, warn};

use super::*;

impl Talk {
    /// An Elite's replay ended (`None`: the reader closed it, as it should).
    pub fn replay_end(&mut self, error: Option<String>, at: Stamp) {
        if matches!(self.rewind, Rewind::Replay { .. }) {
            self.finish(at, error);
        }
    }

    /// IPICO: a download is wanted at this connect and not over yet.
    pub(super) fn download_pending(&self) -> bool {
        self.family == Family::Ipico && matches!(self.rewind, Rewind::Idle | Rewind::Download { .. })
    }

    pub(super) fn poll_rewind(&mut self, now: Stamp, out: &mut Vec<Vec<u8>>) {
        let mono = now.monotonic_us;
        // The IPICO download waits for the clock work of a connect, which shares the line.
        let clock_busy = !matches!(self.clock, ClockJob::Idle { .. });
        let quiet_too_long =
            self.quiet_since_connect() && self.connected_at.is_some_and(|c| mono - c.monotonic_us >= ULTRA_QUIET_US);
        let running = !matches!(self.rewind, Rewind::Off | Rewind::Idle);
        if running && mono >= self.rewind_deadline {
            match self.rewind {
                Rewind::Download { .. } => {
                    out.push(ipico::download_stop().into_bytes());
                    out.push(ipico::download_cleanup().into_bytes());
                }
                Rewind::Log { .. } | Rewind::Time { .. } => out.push(ultra::STOP.to_vec()),
                _ => {}
            }
            let minutes = REWIND_MAX_US / 60_000_000;
            self.finish(now, Some(format!("stopped after {minutes} min: the reader was still replaying")));
            return;
        }
        match &mut self.rewind {
            Rewind::Idle if self.family == Family::Ipico && !clock_busy && self.connected_at.is_some() => {
                let Some(since) = self.recall.reader_time_us else {
                    info!("nothing to rewind: no read from this reader is stored yet");
                    self.rewind = Rewind::Off;
                    return;
                };
                if !self.measured {
                    // Stored reads come unflagged among live ones: only the reader's clock,
                    // measured now, tells them apart. Without it a live read could be dropped.
                    self.not_supported(now, "the reader's clock is not measured (reader.clock = \"ignore\", or no answer), so its stored reads cannot be told from live ones");
                    return;
                }
                self.start(now, format!("stored reads since {}", crate::clock::rfc3339(since)));
                out.push(ipico::download_init().into_bytes());
                self.rewind =
                    Rewind::Download { step: 0, sent_mono: mono, attempts: 1, progress: None, moved_mono: mono, since };
            }
            Rewind::Idle if self.family == Family::Elite && !clock_busy && self.connected_at.is_some() => {
                let Some(since) = self.recall.reader_time_us else {
                    info!("nothing to rewind: no read from this reader is stored yet");
                    self.rewind = Rewind::Off;
                    return;
                };
                if !self.measured {
                    self.not_supported(now, "the reader's clock is not measured (reader.clock = \"ignore\", or no answer), so what it replays cannot be bounded in time");
                    return;
                }
                let Some(local) = crate::timestamp::utc_to_local(since, self.tz) else {
                    self.not_supported(now, "the last read's time cannot be shown in reader.timezone");
                    return;
                };
                // It asks for everything since, so up to the reader's now.
                let until = self.connected_reader_us(now).saturating_add(LIVE_SLACK_US);
                self.start(now, format!("replay since {}", crate::clock::rfc3339(since)));
                self.elite_out.push(crate::reader::elite::Request::Replay(
                    elite::replay_start(1, self.replay_port, Some(local)).into_bytes(),
                ));
                self.rewind = Rewind::Replay { since, until };
            }
            Rewind::Idle if self.family == Family::Ultra && !self.gaps.is_empty() => {
                let gap = self.gaps.remove(0);
                self.start(now, format!("log {}..{}", gap.from, gap.to));
                out.push(ultra::rewind_by_index(self.form, gap.from, gap.to));
                self.rewind = Rewind::Log { gap, last_mono: mono, got: 0 };
            }
            Rewind::Idle if quiet_too_long && !self.measured => {
                // Asked by a clock we do not know, the reader would bring the wrong reads.
                info!("no rewind by time: the reader's clock is not measured (the next live read still tells a gap)");
                self.time_asked = true;
            }
            Rewind::Idle if quiet_too_long => {
                // Nothing live says where the gap ends: ask by time, from the last live read we
                // have to a minute past the reader's now (its local time, seconds since 1980).
                let since = self.recall.reader_time_us.unwrap_or(now.utc_us);
                let end = now.utc_us.saturating_add(self.offset_us()).saturating_add(60_000_000);
                let (Some(start_local), Some(end_local)) =
                    (crate::timestamp::utc_to_local(since, self.tz), crate::timestamp::utc_to_local(end, self.tz))
                else {
                    self.time_asked = true;
                    self.not_supported(now, "the times to ask for cannot be shown in reader.timezone");
                    return;
                };
                let command = ultra::rewind_by_time(self.form, start_local, end_local);
                self.time_asked = true;
                self.start(now, format!("reads since {}", crate::clock::rfc3339(since)));
                out.push(command);
                self.rewind = Rewind::Time { since, until: end, last_mono: mono };
            }
            Rewind::Time { last_mono, .. } if mono - *last_mono >= TIME_REPLAY_IDLE_US => {
                // No end signal, no index to wait for: over when quiet.
                self.finish(now, None);
            }
            Rewind::Download { step, sent_mono, attempts, .. } if *step < 3 && mono - *sent_mono >= STEP_TIMEOUT_US => {
                if *attempts >= STEP_ATTEMPTS {
                    let step = *step;
                    self.not_supported(
                        now,
                        &format!("the reader did not answer download step {step} ({STEP_ATTEMPTS} tries)"),
                    );
                    return;
                }
                *attempts += 1;
                *sent_mono = mono;
                out.push(Self::download_step(*step));
            }
            Rewind::Download { step: 3, moved_mono, .. } if mono - *moved_mono >= REWIND_IDLE_US => {
                out.push(ipico::download_stop().into_bytes());
                out.push(ipico::download_cleanup().into_bytes());
                self.finish(now, Some("the download stopped progressing".into()));
            }
            Rewind::Log { last_mono, gap, got } if mono - *last_mono >= REWIND_IDLE_US => {
                // The Ultra sends no end: what did not come in this long is not coming.
                let asked = gap.to.saturating_sub(gap.from).saturating_add(1);
                let error = (*got < asked && !gap.checking)
                    .then(|| format!("the reader replayed {got} of the {asked} reads asked for"));
                self.finish(now, error);
            }
            _ => {}
        }
    }

    /// Our connect, on the reader's clock as last measured.
    fn connected_reader_us(&self, now: Stamp) -> i64 {
        self.connected_at.map_or(now.utc_us, |c| c.utc_us).saturating_add(self.offset_us())
    }

    /// The rewind cannot be made (said once: an IPICO or an Elite is asked nothing more until the
    /// next connect; an Ultra's gaps are still asked by index).
    fn not_supported(&mut self, now: Stamp, why: &str) {
        self.finish(now, Some(format!("not supported: {why}")));
    }

    pub(super) fn download_step(step: u8) -> Vec<u8> {
        match step {
            0 => ipico::download_init(),
            1 => ipico::download_configure(),
            _ => ipico::download_start(),
        }
        .into_bytes()
    }

    pub(super) fn download_reply(&mut self, reply: &ipico::Reply, at: Stamp) {
        let ipico::Reply::Download { progress, .. } = *reply else { return };
        let Rewind::Download { step, sent_mono, attempts, progress: seen, moved_mono, .. } = &mut self.rewind else {
            return;
        };
        let mono = at.monotonic_us;
        if *step < 2 {
            *step += 1;
            *sent_mono = mono;
            *attempts = 1;
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
        if reply.download_done() {
            self.pending.push(ipico::download_stop().into_bytes());
            self.pending.push(ipico::download_cleanup().into_bytes());
            self.finish(at, None);
        }
    }

    /// An IPICO error reply while a download runs: the reader does not know the command.
    pub(super) fn download_refused(&mut self, code: u8, at: Stamp) {
        if matches!(self.rewind, Rewind::Download { .. }) {
            self.not_supported(at, &format!("the reader refused the download command (error {code:#04x})"));
        }
    }

    pub(super) fn start(&mut self, now: Stamp, asked: String) {
        info!(asked = %asked, "rewinding the reader");
        self.rewind_reads = 0;
        self.rewind_deadline = now.monotonic_us.saturating_add(REWIND_MAX_US);
        self.shared.rewind(|r| {
            r.state = RewindState::Running;
            r.asked = Some(asked);
            r.started_at = Some(crate::clock::rfc3339(now.utc_us));
            r.finished_at = None;
            r.reads = 0;
            r.outside = 0;
            r.error = None;
        });
    }

    pub(super) fn finish(&mut self, now: Stamp, error: Option<String>) {
        let reads = self.rewind_reads;
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
        if self.family.replays_whole_memory() {
            // One download or replay per connect: the whole memory is replayed each time.
            self.rewind = Rewind::Off;
        }
    }

    pub(super) fn count_replayed(&mut self) {
        self.rewind_reads += 1;
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
}
