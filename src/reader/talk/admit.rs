//! What a read is: live, live with a time not believed, replayed inside what was asked, or a
//! replayed read outside it. The rules (README, "The reader's clock, and rewinds"):
//!
//! - A live read is never dropped. Its reader time is believed only within `reader.max_skew` of
//!   the host clock (when that is synchronised); a time not believed moves nothing here.
//! - A read is replayed only while a rewind the gateway asked for runs, and only inside what was
//!   asked: an index in `from..=to`, or a time from the last live read we have to our connect.
//!   Its time is clamped to that range. Anything else flagged or stored is not taken, and counted.

use super::*;

impl Talk {
    /// What a parsed read is. `reader_time_us` is the reader's time for it, already inside
    /// [`crate::timestamp::READER_YEARS`]; `from_replay_port`: it came from an Elite's replay port.
    pub fn admit(
        &mut self,
        reader_time_us: Option<i64>,
        raw: &[u8],
        at: Stamp,
        host_synced: bool,
        from_replay_port: bool,
    ) -> Admit {
        match self.family {
            Family::Elite if from_replay_port => self.admit_elite_replay(reader_time_us),
            Family::Ipico if matches!(self.rewind, Rewind::Download { .. }) => {
                self.admit_during_download(reader_time_us, at, host_synced)
            }
            Family::Ultra => self.admit_ultra(reader_time_us, raw, at, host_synced),
            Family::Impinj => {
                let admit = self.live(reader_time_us, at, host_synced);
                if admit == Admit::Live
                    && self.mode != ClockMode::Ignore
                    && let Some(t) = reader_time_us
                {
                    self.impinj_sample(t.saturating_sub(at.utc_us), at);
                }
                admit
            }
            _ => self.live(reader_time_us, at, host_synced),
        }
    }

    /// A live read: its time is believed, and then it is where the next rewind starts.
    fn live(&mut self, reader_time_us: Option<i64>, at: Stamp, host_synced: bool) -> Admit {
        match reader_time_us {
            Some(t) if host_synced && t.abs_diff(at.utc_us) > self.max_skew_us.unsigned_abs() => Admit::Retimed,
            Some(t) => {
                self.recall.reader_time_us = Some(t);
                Admit::Live
            }
            None => Admit::Live,
        }
    }

    /// A replayed read not taken.
    fn outside(&self) -> Admit {
        self.shared.rewind(|r| {
            r.outside += 1;
            r.outside_total += 1;
        });
        Admit::Drop
    }

    /// An Elite replays since the start of a whole second: what is at `since` may be a repeat
    /// (taken, not counted), what is before it or after our connect was not asked for.
    fn admit_elite_replay(&mut self, reader_time_us: Option<i64>) -> Admit {
        let Rewind::Replay { since, until } = self.rewind else { return self.outside() };
        match reader_time_us {
            Some(t) if (since..=until).contains(&t) => {
                if t > since {
                    self.count_replayed();
                }
                Admit::Replayed(t)
            }
            _ => self.outside(),
        }
    }

    /// During an IPICO download, stored reads and live ones share the line, unflagged. A read
    /// made (by the clock as measured at this connect) since we connected is live; one made
    /// before is a stored read, taken from the last live read we have on (a live read taken for
    /// one, by the offset's error of some ms, is still taken, with its own time); one made after
    /// its own arrival is neither (a memory written by a clock since set back). No live read is
    /// dropped: a live read's time is after the last live read we have, and not ahead of itself.
    fn admit_during_download(&mut self, reader_time_us: Option<i64>, at: Stamp, host_synced: bool) -> Admit {
        let Some(t) = reader_time_us else { return self.live(None, at, host_synced) };
        let made = t.saturating_sub(self.offset_us());
        let connected = self.connected_at.map_or(at.utc_us, |c| c.utc_us);
        if made > at.utc_us.saturating_add(LIVE_SLACK_US) {
            return self.outside();
        }
        if made >= connected {
            return self.live(Some(t), at, host_synced);
        }
        let Rewind::Download { since, moved_mono, .. } = &mut self.rewind else { return self.outside() };
        *moved_mono = at.monotonic_us;
        let since = *since;
        if t < since {
            return self.outside();
        }
        // At the very instant of the last read we have: taken (a repeat is recognised by its
        // key), not counted.
        if t > since {
            self.count_replayed();
        }
        Admit::Replayed(t)
    }

    /// An Ultra's read: flagged ones are replayed (if asked for); a live one may reveal a gap.
    fn admit_ultra(&mut self, reader_time_us: Option<i64>, raw: &[u8], at: Stamp, host_synced: bool) -> Admit {
        let Some((flagged, index)) = std::str::from_utf8(raw).ok().and_then(ultra::replay_marks) else {
            return self.live(reader_time_us, at, host_synced);
        };
        if flagged {
            return self.admit_ultra_replayed(reader_time_us, index, at);
        }
        self.live_seen = true;
        let before = self.recall.reader_time_us;
        let admit = self.live(reader_time_us, at, host_synced);
        let after = (admit == Admit::Live).then_some(reader_time_us).flatten();
        self.note_index(index, before, after);
        admit
    }

    /// A live read's log index: a gap behind it is queued for a rewind; a jump back is a new log.
    fn note_index(&mut self, index: u64, before_us: Option<i64>, after_us: Option<i64>) {
        let Some(last) = self.recall.ultra_index else {
            self.recall.ultra_index = Some(index);
            return;
        };
        if index > last {
            let from = last.saturating_add(1);
            let missing = index - from;
            if missing > MAX_GAP_READS {
                warn!(index, last, "the reader's log index jumped ahead: taken as a new log, not rewound");
            } else if missing > 0 && self.want_rewind {
                self.queue_gap(Gap { from, to: index - 1, after_us: before_us, before_us: after_us, checking: false });
            }
            self.recall.ultra_index = Some(index);
        } else if index.saturating_add(1) < last {
            warn!(
                index,
                last, "the reader's log starts again (it was cleared or replaced): nothing before this is rewound"
            );
            self.recall.ultra_index = Some(index);
        }
    }

    fn queue_gap(&mut self, gap: Gap) {
        if self.gaps.len() >= MAX_GAPS
            && let Some(last) = self.gaps.last_mut()
        {
            // One rewind for the lot: the reader replays what it has of it.
            last.to = gap.to;
            last.before_us = gap.before_us;
            return;
        }
        self.gaps.push(gap);
    }

    fn admit_ultra_replayed(&mut self, reader_time_us: Option<i64>, index: u64, at: Stamp) -> Admit {
        let Some(t) = reader_time_us else { return self.outside() };
        match &mut self.rewind {
            Rewind::Time { since, until, last_mono } if (*since..=*until).contains(&t) => {
                *last_mono = at.monotonic_us;
                let counted = t > *since;
                // What it brings is not a gap for the next live read to ask again.
                self.recall.ultra_index = self.recall.ultra_index.max(Some(index));
                if counted {
                    self.count_replayed();
                }
                Admit::Replayed(t)
            }
            Rewind::Log { gap, last_mono, got } if (gap.from..=gap.to).contains(&index) => {
                *last_mono = at.monotonic_us;
                *got += 1;
                let gap = *gap;
                self.count_replayed();
                if index >= gap.to {
                    self.finish(at, None);
                }
                let t = match gap.after_us {
                    Some(lo) => t.max(lo),
                    None => t,
                };
                // Not after the read that told the gap; without a believed time for it, not
                // further ahead of the reader's now than a live read's time may be.
                let now = at.utc_us.saturating_add(self.offset_us());
                let hi = gap.before_us.unwrap_or_else(|| now.saturating_add(self.max_skew_us));
                Admit::Replayed(t.min(hi))
            }
            _ => self.outside(),
        }
    }
}
