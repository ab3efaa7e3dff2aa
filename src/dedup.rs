//! De-duplication. With `dedup_keep = "first"` ([`Dedup`]) the first read of a chip opens a window; further
//! reads of that chip inside the window are suppressed. The window does not slide (a runner who
//! stands on the mat yields one passing per window), and it runs on the clock the timestamps come
//! from, so a replayed download de-duplicates like live data, in any order: each chip keeps its
//! recent window starts, not only the last, so an old replayed read between two live ones neither
//! splits nor duplicates a window.
//!
//! This is the store's in-memory cache of the windows. Housekeeping runs on the host's monotonic
//! clock (a chip not seen for a while is forgotten), never on the reads' own times: one read
//! dated far ahead must not age every other window out. A read older than what is cached here is
//! checked against the passings stored (see `store::passings`), so a forgotten window still
//! suppresses.
//!
//! With `dedup_keep = "strongest"` ([`Strongest`]) the passing is the window's strongest read,
//! decided when the window ends.

use std::collections::HashMap;

/// Window starts kept per chip (a runner on a lap course passes a few times an hour; a replay
/// reaches back at most a few windows around the one it fills).
const STARTS_PER_CHIP: usize = 8;
/// A chip not read for this long (host monotonic time) is forgotten, unless its window is longer.
const FORGET_AFTER_US: i64 = 60_000_000;

/// A chip's window starts, oldest first: two inline (a chip is rarely read in more windows than
/// that within a minute), more on the heap. With a flood of distinct chips this map is most of
/// the store's memory: 20,000 chips took 3.6 MB with a `Vec` and a `String` each, 2.4 MB so.
type Starts = smallvec::SmallVec<[i64; 2]>;

/// Undo record for one `accept`, so a failed commit can be rolled back in memory too.
pub struct Undo {
    chip: Box<str>,
    previous: Option<Starts>,
}

#[derive(Debug, Default)]
struct Recent {
    /// Window starts (µs, on the reads' clock), oldest first.
    starts: Starts,
    /// When the chip was last read (host monotonic µs).
    seen_mono: i64,
}

/// Whether `at` falls in the window that opened at `start`.
fn inside(at: i64, start: i64, window_us: i64) -> bool {
    at.abs_diff(start) < window_us.unsigned_abs()
}

fn forget_after(window_us: i64) -> i64 {
    FORGET_AFTER_US.max(window_us.saturating_mul(2))
}

#[derive(Debug, Default)]
pub struct Dedup {
    window_us: i64,
    chips: HashMap<Box<str>, Recent>,
}

impl Dedup {
    pub fn new(window: std::time::Duration) -> Self {
        Self { window_us: window.as_micros() as i64, chips: HashMap::new() }
    }

    /// Does a window of this chip already hold `at`? (Marks the chip as seen at `mono_us`.)
    pub fn covers(&mut self, chip: &str, at_us: i64, mono_us: i64) -> bool {
        let window = self.window_us;
        match self.chips.get_mut(chip) {
            Some(r) => {
                r.seen_mono = r.seen_mono.max(mono_us);
                r.starts.iter().any(|s| inside(at_us, *s, window))
            }
            None => false,
        }
    }

    /// Is this read a new passing? When it is, its window opens now.
    pub fn accept(&mut self, chip: &str, at_us: i64, mono_us: i64) -> (bool, Option<Undo>) {
        if self.window_us == 0 {
            return (true, None);
        }
        if self.covers(chip, at_us, mono_us) {
            return (false, None);
        }
        let previous = self.chips.get(chip).map(|r| r.starts.clone());
        self.remember(chip, at_us, mono_us);
        (true, Some(Undo { chip: chip.into(), previous }))
    }

    /// Note a window start known from elsewhere (a stored passing, a restart).
    pub fn remember(&mut self, chip: &str, start_us: i64, mono_us: i64) {
        let r = match self.chips.get_mut(chip) {
            Some(r) => r,
            None => self.chips.entry(chip.into()).or_default(),
        };
        r.seen_mono = r.seen_mono.max(mono_us);
        if !r.starts.contains(&start_us) {
            if r.starts.len() >= STARTS_PER_CHIP {
                r.starts.remove(0);
            }
            r.starts.push(start_us);
        }
    }

    /// Reverse `accept`s, newest first.
    pub fn undo(&mut self, undos: Vec<Undo>) {
        for u in undos.into_iter().rev() {
            match u.previous {
                Some(p) => {
                    if let Some(r) = self.chips.get_mut(&u.chip) {
                        r.starts = p;
                    }
                }
                None => {
                    self.chips.remove(&u.chip);
                }
            }
        }
    }

    /// Forget chips not read for a while, by the host's monotonic clock (keeps memory bounded in
    /// a long race, whatever times the reads carry).
    pub fn prune(&mut self, mono_now_us: i64) {
        let keep = forget_after(self.window_us);
        self.chips.retain(|_, r| mono_now_us.saturating_sub(r.seen_mono) < keep);
    }

    pub fn clear(&mut self) {
        self.chips.clear();
    }

    pub fn set_window(&mut self, window: std::time::Duration) {
        self.window_us = window.as_micros() as i64;
    }

    /// Chips remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.chips.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.chips.is_empty()
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
            assert_eq!(d.accept(chip, at, 0).0, want, "{chip} at {at}");
        }
    }

    #[test]
    fn an_old_read_between_two_live_ones_neither_splits_nor_duplicates() {
        // Live at 100 s, replayed at 50 s, live at 101 s: two windows (100 and 50), not three.
        let mut d = Dedup::new(Duration::from_secs(3));
        assert!(d.accept("a", 100 * S, 0).0);
        assert!(d.accept("a", 50 * S, 1).0, "a window of its own, long before");
        assert!(!d.accept("a", 101 * S, 2).0, "still inside the window at 100 s");
        assert!(!d.accept("a", 51 * S, 3).0, "inside the replayed window");
    }

    #[test]
    fn zero_window_keeps_everything() {
        let mut d = Dedup::new(Duration::ZERO);
        assert!(d.accept("a", 0, 0).0);
        assert!(d.accept("a", 0, 0).0);
        assert!(d.is_empty());
    }

    #[test]
    fn undo_restores_state() {
        let mut d = Dedup::new(Duration::from_secs(3));
        d.accept("a", 0, 0);
        let (_, u1) = d.accept("a", 5 * S, 0);
        let (_, u2) = d.accept("b", 5 * S, 0);
        d.undo(vec![u1.unwrap(), u2.unwrap()]);
        assert!(!d.accept("a", S, 0).0, "a's window at 0 is back");
        assert!(d.accept("a", 5 * S, 0).0, "a's window at 5 s is gone");
        assert!(d.accept("b", 5 * S, 0).0, "b is unknown again");
    }

    #[test]
    fn prune_runs_on_the_host_clock_not_on_read_times() {
        let mut d = Dedup::new(Duration::from_secs(3));
        d.accept("a", 0, 0);
        // A read dated a day ahead (a reader's wrong clock) ages nothing out.
        d.accept("future", 86_400 * S, S);
        d.prune(2 * S);
        assert_eq!(d.len(), 2);
        assert!(!d.accept("a", S, 2 * S).0);
        // A chip not read for a minute of host time is forgotten.
        d.accept("b", 10 * S, 30 * S);
        d.prune(62 * S);
        assert_eq!(d.len(), 1, "a and future forgotten, b kept");
    }

    #[test]
    fn starts_per_chip_are_bounded() {
        let mut d = Dedup::new(Duration::from_secs(3));
        for i in 0..100 {
            d.accept("a", i * 10 * S, 0);
        }
        assert_eq!(d.chips["a"].starts.len(), STARTS_PER_CHIP);
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
/// passed on the host's monotonic clock (or earlier, when a later read of the chip opens a new
/// window). A read older than the chip's open window and outside every window of it (a replayed
/// one) is a window of its own, emitted at once: the open window is left to run.
#[derive(Debug, Clone, Default)]
pub struct Strongest {
    window_us: i64,
    open: HashMap<String, Window>,
    /// Windows already emitted (chip → their starts, oldest first, and when the chip was last
    /// read on the host's monotonic clock), so late out-of-order reads stay suppressed.
    closed: HashMap<String, (Vec<i64>, i64)>,
}

impl Strongest {
    pub fn new(window: std::time::Duration) -> Self {
        Self { window_us: window.as_micros() as i64, ..Default::default() }
    }

    /// Does a window of this chip, open or emitted, already hold `at`?
    pub fn covers(&self, chip: &str, at_us: i64) -> bool {
        self.open.get(chip).is_some_and(|w| inside(at_us, w.start_us, self.window_us))
            || self.closed.get(chip).is_some_and(|(starts, _)| starts.iter().any(|s| inside(at_us, *s, self.window_us)))
    }

    /// Offer a read; returns a window this read ended (its chip's previous one, or the read's
    /// own when it is older than the open one), if any.
    pub fn offer(&mut self, c: Candidate, mono_us: i64) -> Option<Window> {
        if let Some((_, seen)) = self.closed.get_mut(&c.chip) {
            *seen = (*seen).max(mono_us);
        }
        if let Some(w) = self.open.get_mut(&c.chip)
            && inside(c.timestamp_us, w.start_us, self.window_us)
        {
            if c.rssi.unwrap_or(i64::MIN) > w.best.rssi.unwrap_or(i64::MIN) {
                w.best = c;
            }
            return None;
        }
        if self.covers(&c.chip, c.timestamp_us) {
            return None;
        }
        if self.open.get(&c.chip).is_some_and(|w| c.timestamp_us < w.start_us) {
            let own = Window { start_us: c.timestamp_us, opened_mono_us: mono_us, best: c };
            self.close(own.best.chip.clone(), own.start_us, mono_us);
            return Some(own);
        }
        let ended = self.open.remove(&c.chip);
        if let Some(w) = &ended {
            self.close(c.chip.clone(), w.start_us, mono_us);
        }
        self.open.insert(c.chip.clone(), Window { start_us: c.timestamp_us, opened_mono_us: mono_us, best: c });
        ended
    }

    fn close(&mut self, chip: String, start_us: i64, mono_us: i64) {
        let (starts, seen) = self.closed.entry(chip).or_default();
        *seen = (*seen).max(mono_us);
        if !starts.contains(&start_us) {
            if starts.len() >= STARTS_PER_CHIP {
                starts.remove(0);
            }
            starts.push(start_us);
        }
    }

    /// Windows whose time is up.
    pub fn due(&mut self, mono_now_us: i64) -> Vec<Window> {
        let window = self.window_us;
        let over: Vec<String> = self
            .open
            .iter()
            .filter(|(_, w)| mono_now_us >= w.opened_mono_us.saturating_add(window))
            .map(|(chip, _)| chip.clone())
            .collect();
        self.take(over, mono_now_us)
    }

    /// Every open window, now (the session is ending).
    pub fn drain(&mut self) -> Vec<Window> {
        let all: Vec<String> = self.open.keys().cloned().collect();
        let out = self.take(all, 0);
        self.closed.clear();
        out
    }

    fn take(&mut self, chips: Vec<String>, mono_us: i64) -> Vec<Window> {
        let mut out: Vec<Window> = chips
            .into_iter()
            .filter_map(|chip| {
                let w = self.open.remove(&chip)?;
                self.close(chip, w.start_us, mono_us);
                Some(w)
            })
            .collect();
        out.sort_by_key(|w| (w.best.timestamp_us, w.best.read_id));
        out
    }

    pub fn clear(&mut self) {
        self.open.clear();
        self.closed.clear();
    }

    pub fn set_window(&mut self, window: std::time::Duration) {
        self.window_us = window.as_micros() as i64;
    }

    /// Monotonic time at which the earliest open window ends, for the writer's timer.
    pub fn next_due(&self) -> Option<i64> {
        self.open.values().map(|w| w.opened_mono_us.saturating_add(self.window_us)).min()
    }

    pub fn open_window(&self, chip: &str) -> Option<&Window> {
        self.open.get(chip)
    }

    /// Restore an open window (after a restart).
    pub fn restore(&mut self, chip: String, w: Window) {
        self.open.insert(chip, w);
    }

    /// Restore an emitted window (after a restart, or known from a stored passing).
    pub fn restore_closed(&mut self, chip: String, start_us: i64, mono_us: i64) {
        self.close(chip, start_us, mono_us);
    }

    /// Forget emitted windows of chips not read for a while, by the host's monotonic clock.
    pub fn prune(&mut self, mono_now_us: i64) {
        let keep = forget_after(self.window_us);
        self.closed.retain(|_, (_, seen)| mono_now_us.saturating_sub(*seen) < keep);
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
        assert!(s.covers("a", S / 2) && !s.covers("a", 4 * S));
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

    #[test]
    fn a_replayed_read_older_than_the_open_window_is_a_window_of_its_own() {
        // Live at 100 s, replayed at 50 s, live at 101 s: windows at 100 and 50, not three.
        let mut s = Strongest::new(Duration::from_secs(3));
        assert_eq!(s.offer(c(1, "a", 100 * S, -70), 0), None);
        let own = s.offer(c(2, "a", 50 * S, -60), 0).expect("emitted at once");
        assert_eq!((own.start_us, own.best.read_id), (50 * S, 2));
        assert_eq!(s.offer(c(3, "a", 101 * S, -50), 0), None, "joins the window at 100 s");
        assert_eq!(s.offer(c(4, "a", 51 * S, -10), 0), None, "inside the emitted window");
        let rest = s.drain();
        assert_eq!(rest.iter().map(|w| (w.start_us, w.best.read_id)).collect::<Vec<_>>(), [(100 * S, 3)]);
    }
}
