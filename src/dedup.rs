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
