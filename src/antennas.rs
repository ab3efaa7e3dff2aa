//! Antenna health: reads per antenna, and an antenna that has gone quiet while the others read
//! (a cut cable, a mat kicked aside). Pure: time is a parameter; the reader thread feeds it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Antennas tracked at most (readers have 1 to 32); reads naming others are counted under none.
pub const ANTENNAS_MAX: usize = 64;

/// One antenna, as `status.reader.antennas` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AntennaStatus {
    pub antenna: i64,
    pub reads_total: u64,
    pub reads_last_minute: u64,
    pub last_read_at: Option<String>,
    /// Silent for `reader.antenna_silence` while the others read.
    #[serde(default)]
    pub silent: bool,
    /// How long it has been silent (seconds), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_for_s: Option<u64>,
}

#[derive(Debug, Clone)]
struct Antenna {
    number: i64,
    reads_total: u64,
    /// Monotonic µs and UTC µs of the last read.
    last: Option<(i64, i64)>,
    /// Reads per second over the last minute: (second, count), indexed by second % 60.
    seconds: [(i64, u32); 60],
    silent: bool,
}

impl Antenna {
    fn new(number: i64) -> Self {
        Self { number, reads_total: 0, last: None, seconds: [(-1, 0); 60], silent: false }
    }

    fn last_minute(&self, now_mono_us: i64) -> u64 {
        let now_s = now_mono_us.div_euclid(1_000_000);
        self.seconds.iter().filter(|(s, _)| *s >= 0 && now_s - *s < 60).map(|(_, n)| u64::from(*n)).sum()
    }
}

/// A change worth one line in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Silent { antenna: i64, for_s: u64 },
    Reading { antenna: i64 },
}

#[derive(Debug, Clone)]
pub struct Antennas {
    silence: Duration,
    /// When the reader began reading (monotonic µs; when tracking began, until a first read):
    /// an expected antenna never seen is silent from then. A reader that starts late, or a
    /// first batch of reads taken one line at a time, singles out no antenna.
    since_mono_us: i64,
    /// Sorted by number; few, so a vector.
    list: Vec<Antenna>,
}

impl Antennas {
    /// `expected`: antennas that must read even if never seen (`reader.antennas`).
    pub fn new(expected: &[i64], silence: Duration, now_mono_us: i64) -> Self {
        let mut list: Vec<Antenna> = expected.iter().take(ANTENNAS_MAX).map(|&n| Antenna::new(n)).collect();
        list.sort_by_key(|a| a.number);
        list.dedup_by_key(|a| a.number);
        Self { silence, since_mono_us: now_mono_us, list }
    }

    /// A read on `antenna`. Returns a change when it was silent.
    pub fn read(&mut self, antenna: i64, mono_us: i64, utc_us: i64) -> Option<Change> {
        if self.list.iter().all(|a| a.last.is_none()) {
            self.since_mono_us = self.since_mono_us.max(mono_us);
        }
        let i = match self.list.binary_search_by_key(&antenna, |a| a.number) {
            Ok(i) => i,
            Err(i) if self.list.len() < ANTENNAS_MAX => {
                self.list.insert(i, Antenna::new(antenna));
                i
            }
            Err(_) => return None,
        };
        let a = &mut self.list[i];
        a.reads_total += 1;
        a.last = Some((mono_us, utc_us));
        let second = mono_us.div_euclid(1_000_000);
        let slot = &mut a.seconds[second.rem_euclid(60) as usize];
        if slot.0 == second {
            slot.1 = slot.1.saturating_add(1);
        } else {
            *slot = (second, 1);
        }
        if a.silent {
            a.silent = false;
            return Some(Change::Reading { antenna });
        }
        None
    }

    /// Look for antennas gone quiet: silent for `silence` while another read within it
    /// (`silence` zero: never).
    pub fn check(&mut self, now_mono_us: i64) -> Vec<Change> {
        if self.silence.is_zero() {
            return Vec::new();
        }
        let silence = self.silence.as_micros() as i64;
        let recent = |a: &Antenna| a.last.is_some_and(|(m, _)| now_mono_us - m < silence);
        let mut changes = Vec::new();
        for i in 0..self.list.len() {
            let quiet_since = self.list[i].last.map_or(self.since_mono_us, |(m, _)| m);
            let others_read = self.list.iter().enumerate().any(|(j, b)| j != i && recent(b));
            let silent = now_mono_us - quiet_since >= silence && others_read;
            let a = &mut self.list[i];
            if silent && !a.silent {
                changes.push(Change::Silent {
                    antenna: a.number,
                    for_s: ((now_mono_us - quiet_since) / 1_000_000) as u64,
                });
            }
            // Cleared only by a read (`read`), or when the others stop too (a reader that went
            // quiet as a whole is not an antenna fault).
            if silent != a.silent && (silent || !others_read) {
                a.silent = silent;
            }
        }
        changes
    }

    pub fn status(&self, now_mono_us: i64) -> Vec<AntennaStatus> {
        self.list
            .iter()
            .map(|a| {
                let quiet_since = a.last.map_or(self.since_mono_us, |(m, _)| m);
                AntennaStatus {
                    antenna: a.number,
                    reads_total: a.reads_total,
                    reads_last_minute: a.last_minute(now_mono_us),
                    last_read_at: a.last.map(|(_, utc)| crate::clock::rfc3339(utc)),
                    silent: a.silent,
                    silent_for_s: a.silent.then(|| ((now_mono_us - quiet_since).max(0) / 1_000_000) as u64),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn counts_per_antenna_and_over_the_last_minute() {
        let mut a = Antennas::new(&[], Duration::from_secs(300), 0);
        for t in 0..90 {
            a.read(1, t * S, 1_000 * S + t * S);
        }
        a.read(2, 89 * S, 0);
        let s = a.status(89 * S + S / 2);
        assert_eq!(
            s.iter().map(|x| (x.antenna, x.reads_total, x.reads_last_minute)).collect::<Vec<_>>(),
            [(1, 90, 60), (2, 1, 1)]
        );
        assert_eq!(s[0].last_read_at.as_deref(), Some(crate::clock::rfc3339(1_089 * S).as_str()));
        assert!(!s[0].silent);
        // Long after: nothing in the last minute.
        assert_eq!(a.status(1_000 * S)[0].reads_last_minute, 0);
    }

    #[test]
    fn an_antenna_silent_while_others_read_is_reported_once_and_cleared_by_a_read() {
        let mut a = Antennas::new(&[], Duration::from_secs(300), 0);
        a.read(1, 0, 0);
        a.read(2, 0, 0);
        // Antenna 2 goes quiet; antenna 1 reads on.
        let mut changes = Vec::new();
        for t in 1..=400 {
            a.read(1, t * S, 0);
            changes.extend(a.check(t * S));
        }
        assert_eq!(changes, [Change::Silent { antenna: 2, for_s: 300 }], "once, when its window passed");
        let s = a.status(400 * S);
        assert!(s[1].silent && !s[0].silent);
        assert_eq!(s[1].silent_for_s, Some(400));
        assert_eq!(a.read(2, 401 * S, 0), Some(Change::Reading { antenna: 2 }));
        assert!(a.check(402 * S).is_empty());
        assert!(!a.status(402 * S)[1].silent);
    }

    #[test]
    fn a_reader_quiet_as_a_whole_is_no_antenna_fault() {
        let mut a = Antennas::new(&[], Duration::from_secs(60), 0);
        a.read(1, 0, 0);
        a.read(2, 0, 0);
        assert!(a.check(3_600 * S).is_empty(), "nobody reads: no antenna is singled out");
        assert!(a.status(3_600 * S).iter().all(|x| !x.silent));
    }

    #[test]
    fn an_expected_antenna_never_seen_is_silent_once_the_others_read() {
        let mut a = Antennas::new(&[1, 2, 3, 4], Duration::from_secs(60), 0);
        assert_eq!(a.status(0).len(), 4, "listed before any read");
        for t in 0..=60 {
            a.read(1, t * S, 0);
            a.read(2, t * S, 0);
            a.read(3, t * S, 0);
        }
        assert_eq!(a.check(61 * S), [Change::Silent { antenna: 4, for_s: 61 }]);
        // Without the list, an antenna never seen is not known to exist.
        let mut b = Antennas::new(&[], Duration::from_secs(60), 0);
        b.read(1, 0, 0);
        b.read(1, 61 * S, 0);
        assert!(b.check(61 * S).is_empty());
    }

    #[test]
    fn an_expected_antenna_is_given_its_window_from_the_first_read() {
        // The reader starts reading 10 s after tracking began (60 s window): antenna 2, listed,
        // reads a moment after antenna 1 and is never singled out.
        let mut a = Antennas::new(&[1, 2], Duration::from_secs(60), 0);
        a.read(1, 100 * S, 0);
        assert!(a.check(100 * S + 1).is_empty(), "antenna 2 has its window from the first read");
        a.read(2, 100 * S + 2, 0);
        assert!(a.check(200 * S).is_empty());
        let mut b = Antennas::new(&[1, 2], Duration::from_secs(60), 0);
        b.read(1, 100 * S, 0);
        b.read(1, 160 * S, 0);
        assert_eq!(b.check(160 * S), [Change::Silent { antenna: 2, for_s: 60 }], "then it is silent");
    }

    #[test]
    fn antenna_numbers_are_bounded() {
        let mut a = Antennas::new(&[], Duration::from_secs(60), 0);
        for n in 0..1_000 {
            a.read(n, 0, 0);
        }
        assert_eq!(a.status(0).len(), ANTENNAS_MAX);
    }
}
