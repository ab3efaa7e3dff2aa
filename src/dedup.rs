//! De-duplication with `dedup_keep = "first"`: the first read of a chip opens a window; further
//! reads of that chip inside the window are suppressed. The window does not slide (a runner who
//! stands on the mat yields one passing per window), and it runs on the clock the timestamps come
//! from, so a replayed download de-duplicates like live data, in any order.

use std::collections::HashMap;

/// Undo record for one `accept`, so a failed commit can be rolled back in memory too.
pub struct Undo {
    chip: String,
    previous: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Dedup {
    window_us: i64,
    /// chip → start of its current window (µs).
    opened: HashMap<String, i64>,
    /// Latest timestamp seen, for pruning.
    newest_us: i64,
}

impl Dedup {
    pub fn new(window: std::time::Duration) -> Self {
        Self { window_us: window.as_micros() as i64, opened: HashMap::new(), newest_us: i64::MIN }
    }

    /// Is this read a new passing? When it is, its window opens now.
    pub fn accept(&mut self, chip: &str, at_us: i64) -> (bool, Option<Undo>) {
        if self.window_us == 0 {
            return (true, None);
        }
        self.newest_us = self.newest_us.max(at_us);
        if let Some(start) = self.opened.get(chip)
            && (at_us - start).abs() < self.window_us
        {
            return (false, None);
        }
        let previous = self.opened.insert(chip.to_string(), at_us);
        (true, Some(Undo { chip: chip.to_string(), previous }))
    }

    /// Reverse `accept`s, newest first.
    pub fn undo(&mut self, undos: Vec<Undo>) {
        for u in undos.into_iter().rev() {
            match u.previous {
                Some(p) => self.opened.insert(u.chip, p),
                None => self.opened.remove(&u.chip),
            };
        }
    }

    /// Forget windows that can no longer suppress anything (keeps memory bounded in a long race).
    pub fn prune(&mut self) {
        if self.window_us == 0 || self.newest_us == i64::MIN {
            return;
        }
        let horizon = self.newest_us - 2 * self.window_us;
        self.opened.retain(|_, start| *start >= horizon);
    }

    pub fn clear(&mut self) {
        self.opened.clear();
        self.newest_us = i64::MIN;
    }

    pub fn set_window(&mut self, window: std::time::Duration) {
        self.window_us = window.as_micros() as i64;
    }

    pub fn len(&self) -> usize {
        self.opened.len()
    }

    pub fn is_empty(&self) -> bool {
        self.opened.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: i64 = 1_000_000;

    #[test]
    fn first_read_opens_a_fixed_window() {
        let mut d = Dedup::new(Duration::from_secs(3));
        let cases = [
            ("a", 0, true),
            ("a", S, false),
            ("b", S, true),
            ("a", 2 * S, false),
            ("a", 3 * S - 1, false),
            ("a", 3 * S, true), // the window does not slide with repeated reads
            ("b", 3 * S + 1, false),
            ("b", 4 * S, true),
            ("a", 3 * S - S / 2, false), // out of order, inside the new window
        ];
        for (chip, at, want) in cases {
            assert_eq!(d.accept(chip, at).0, want, "{chip} at {at}");
        }
    }

    #[test]
    fn zero_window_keeps_everything() {
        let mut d = Dedup::new(Duration::ZERO);
        assert!(d.accept("a", 0).0);
        assert!(d.accept("a", 0).0);
        assert!(d.is_empty());
    }

    #[test]
    fn undo_restores_state() {
        let mut d = Dedup::new(Duration::from_secs(3));
        d.accept("a", 0);
        let (_, u1) = d.accept("a", 5 * S);
        let (_, u2) = d.accept("b", 5 * S);
        d.undo(vec![u1.unwrap(), u2.unwrap()]);
        assert!(!d.accept("a", S).0, "a's window at 0 is back");
        assert!(d.accept("b", 5 * S).0, "b is unknown again");
    }

    #[test]
    fn prune_forgets_old_windows_only() {
        let mut d = Dedup::new(Duration::from_secs(3));
        d.accept("old", 0);
        d.accept("new", 100 * S);
        d.prune();
        assert_eq!(d.len(), 1);
        assert!(!d.accept("new", 101 * S).0);
    }
}

/// A read that may become the passing of its window (`dedup_keep = "strongest"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub read_id: i64,
    pub chip: String,
    pub bib: String,
    pub timestamp_us: i64,
    pub rssi: Option<i64>,
    /// A host timestamp taken before the clock synchronised: held for correction.
    pub unsynced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub start_us: i64,
    /// Host monotonic time when the window opened; it is emitted `window` later. Membership is
    /// judged by the reads' own timestamps, emission by the host's monotonic clock, so that
    /// out-of-order and replayed reads are judged fairly and a wall-clock jump changes nothing.
    pub opened_mono_us: i64,
    pub best: Candidate,
}

/// `dedup_keep = "strongest"`: the first read of a chip opens a window; the passing is the read
/// with the highest RSSI in it (the earliest among equals), emitted once the window's length has
/// passed on the host's monotonic clock (or earlier, when a read of the chip opens a new window).
#[derive(Debug, Clone, Default)]
pub struct Strongest {
    window_us: i64,
    open: HashMap<String, Window>,
    /// Windows already emitted (chip → start), so late out-of-order reads stay suppressed.
    closed: HashMap<String, i64>,
    newest_us: i64,
}

impl Strongest {
    pub fn new(window: std::time::Duration) -> Self {
        Self { window_us: window.as_micros() as i64, newest_us: i64::MIN, ..Default::default() }
    }

    /// Offer a read; returns a window this read ended (its chip's previous one), if any.
    pub fn offer(&mut self, c: Candidate, mono_us: i64) -> Option<Window> {
        self.newest_us = self.newest_us.max(c.timestamp_us);
        if let Some(w) = self.open.get_mut(&c.chip) {
            if (c.timestamp_us - w.start_us).abs() < self.window_us {
                if c.rssi.unwrap_or(i64::MIN) > w.best.rssi.unwrap_or(i64::MIN) {
                    w.best = c;
                }
                return None;
            }
        } else if let Some(start) = self.closed.get(&c.chip)
            && (c.timestamp_us - start).abs() < self.window_us
        {
            return None;
        }
        let ended = self.open.remove(&c.chip);
        if let Some(w) = &ended {
            self.closed.insert(c.chip.clone(), w.start_us);
        }
        self.open.insert(c.chip.clone(), Window { start_us: c.timestamp_us, opened_mono_us: mono_us, best: c });
        ended
    }

    /// Windows whose time is up.
    pub fn due(&mut self, mono_now_us: i64) -> Vec<Window> {
        let window = self.window_us;
        let over: Vec<String> = self
            .open
            .iter()
            .filter(|(_, w)| mono_now_us >= w.opened_mono_us + window)
            .map(|(chip, _)| chip.clone())
            .collect();
        self.take(over)
    }

    /// Every open window, now (the session is ending).
    pub fn drain(&mut self) -> Vec<Window> {
        let all: Vec<String> = self.open.keys().cloned().collect();
        let out = self.take(all);
        self.closed.clear();
        out
    }

    fn take(&mut self, chips: Vec<String>) -> Vec<Window> {
        let mut out: Vec<Window> = chips
            .into_iter()
            .filter_map(|chip| {
                let w = self.open.remove(&chip)?;
                self.closed.insert(chip, w.start_us);
                Some(w)
            })
            .collect();
        out.sort_by_key(|w| (w.best.timestamp_us, w.best.read_id));
        out
    }

    pub fn clear(&mut self) {
        self.open.clear();
        self.closed.clear();
        self.newest_us = i64::MIN;
    }

    pub fn set_window(&mut self, window: std::time::Duration) {
        self.window_us = window.as_micros() as i64;
    }

    /// Monotonic time at which the earliest open window ends, for the writer's timer.
    pub fn next_due(&self) -> Option<i64> {
        self.open.values().map(|w| w.opened_mono_us + self.window_us).min()
    }

    pub fn open_window(&self, chip: &str) -> Option<&Window> {
        self.open.get(chip)
    }

    /// Restore an open window (after a restart).
    pub fn restore(&mut self, chip: String, w: Window) {
        self.newest_us = self.newest_us.max(w.best.timestamp_us);
        self.open.insert(chip, w);
    }

    /// Restore an emitted window (after a restart).
    pub fn restore_closed(&mut self, chip: String, start_us: i64) {
        self.closed.insert(chip, start_us);
    }

    pub fn prune(&mut self) {
        if self.newest_us == i64::MIN {
            return;
        }
        let horizon = self.newest_us - 2 * self.window_us;
        self.closed.retain(|_, start| *start >= horizon);
    }
}

#[cfg(test)]
mod strongest_tests {
    use super::*;
    use std::time::Duration;

    const S: i64 = 1_000_000;

    fn c(id: i64, chip: &str, t: i64, rssi: i64) -> Candidate {
        Candidate {
            read_id: id,
            chip: chip.into(),
            bib: chip.into(),
            timestamp_us: t,
            rssi: Some(rssi),
            unsynced: false,
        }
    }

    #[test]
    fn the_strongest_read_of_the_window_wins_when_it_ends() {
        let mut s = Strongest::new(Duration::from_secs(3));
        assert_eq!(s.offer(c(1, "a", 0, -70), 0), None);
        assert_eq!(s.offer(c(2, "a", S, -50), 0), None);
        assert_eq!(s.offer(c(3, "a", 2 * S, -60), 0), None);
        assert_eq!(s.offer(c(4, "b", 2 * S, -65), 0), None);
        assert!(s.due(S).is_empty(), "nothing is over yet");
        // A read of b far ahead in time ends b's window (not a's) and opens a new one.
        let ended = s.offer(c(5, "b", 9 * S, -40), 2 * S).expect("b's first window ended");
        assert_eq!(ended.best.read_id, 4);
        // Out of order: a still takes reads inside its window.
        assert_eq!(s.offer(c(6, "a", 2 * S + S / 2, -45), 2 * S), None);
        let due = s.due(3 * S);
        assert_eq!(due.iter().map(|w| (w.best.read_id, w.start_us)).collect::<Vec<_>>(), [(6, 0)]);
        // A late read inside a's emitted window stays suppressed.
        assert_eq!(s.offer(c(7, "a", S / 2, -10), 3 * S), None);
        assert!(s.open_window("a").is_none());
        // b's second window (opened by read 5, at monotonic 2 s) is due at 5 s.
        assert!(s.due(4 * S).is_empty());
        assert_eq!(s.due(5 * S)[0].best.read_id, 5);
    }

    #[test]
    fn a_new_window_ends_the_previous_one_and_ties_keep_the_earliest() {
        let mut s = Strongest::new(Duration::from_secs(3));
        s.offer(c(1, "a", 0, -50), 0);
        s.offer(c(2, "a", S, -50), 0);
        let ended = s.offer(c(3, "a", 10 * S, -80), 0).expect("the old window ended");
        assert_eq!(ended.best.read_id, 1);
        assert_eq!(s.drain().iter().map(|w| w.best.read_id).collect::<Vec<_>>(), [3]);
        assert_eq!(s.next_due(), None);
    }
}
