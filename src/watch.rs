//! `rufus-gateway watch`: follow the reads as the store commits them, through the control socket.
//!
//! The daemon side subscribes to the store's read events (made only while someone watches) and
//! writes one JSON object per line: each read, and every [`SUMMARY_EVERY`] a summary. A watcher
//! that reads too slowly never slows the pipeline: it misses reads (and is told how many), and one
//! that takes nothing for [`STALL_MAX`] is dropped. The CLI side (`control::watch`) prints
//! the lines, as they are with `--json`, or for a person ([`human`]).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::store::ReadEvent;
use crate::store::query::ShownRead;

/// How often a summary line is written.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// A watcher that takes no line for this long is dropped (its terminal is paused, or gone).
pub const STALL_MAX: Duration = Duration::from_secs(60);
/// Distinct chips remembered for the summary; beyond it the count says "at least". Bounded so
/// that a watcher costs the same at any read rate (a reader flooding distinct chips).
const CHIPS_MAX: usize = 10_000;
/// Antennas counted apart in one second; more are counted as "other".
const ANTENNAS_MAX: usize = 16;

/// Every [`SUMMARY_EVERY`]: what this watcher has seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub summary: bool,
    pub at: String,
    /// Distinct chips since the watch began.
    pub chips: usize,
    /// Reads since the watch began.
    pub reads: u64,
    /// Reads in the last minute.
    pub reads_per_minute: usize,
    /// Reads in the last minute, by antenna (`"none"` when the format has none).
    pub antennas: BTreeMap<String, usize>,
    /// Reads this watcher missed because it read too slowly (since the watch began).
    pub missed: u64,
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Summary(Summary),
    Read(ShownRead),
}

impl From<&ReadEvent> for ShownRead {
    fn from(e: &ReadEvent) -> Self {
        ShownRead {
            at_us: e.at_us,
            chip: e.chip.clone(),
            bib: e.bib.clone(),
            antenna: e.antenna,
            rssi: e.rssi,
            passing: e.passing,
            strongest: e.strongest,
            test: e.test,
        }
    }
}

/// What a watcher has seen, for its summaries: a bounded chip set and, per second of the last
/// minute, counts per antenna (not one entry per read).
#[derive(Debug, Default)]
pub struct Tally {
    chips: HashSet<String>,
    reads: u64,
    missed: u64,
    /// When the tally began (seconds are counted from it).
    origin: Option<Instant>,
    /// (second, reads per antenna) for the seconds of the last minute that had reads.
    recent: VecDeque<(u64, BTreeMap<String, usize>)>,
}

fn antenna_key(antenna: Option<i64>) -> String {
    antenna.map_or_else(|| "none".to_string(), |a| a.to_string())
}

impl Tally {
    pub fn read(&mut self, e: &ReadEvent, now: Instant) {
        if e.strongest {
            return; // an announcement of a read already counted
        }
        self.reads += 1;
        if self.chips.len() < CHIPS_MAX {
            self.chips.insert(e.chip.clone());
        }
        let second = self.second(now);
        if self.recent.back().is_none_or(|(s, _)| *s != second) {
            self.recent.push_back((second, BTreeMap::new()));
            self.forget(second);
        }
        if let Some((_, counts)) = self.recent.back_mut() {
            let key = antenna_key(e.antenna);
            let key = if counts.len() < ANTENNAS_MAX || counts.contains_key(&key) { key } else { "other".into() };
            *counts.entry(key).or_insert(0) += 1;
        }
    }

    fn second(&mut self, now: Instant) -> u64 {
        now.duration_since(*self.origin.get_or_insert(now)).as_secs()
    }

    /// Drop the seconds older than a minute before `second`.
    fn forget(&mut self, second: u64) {
        while self.recent.front().is_some_and(|(s, _)| second.saturating_sub(*s) >= 60) {
            self.recent.pop_front();
        }
    }

    pub fn missed(&mut self, n: u64) {
        self.missed += n;
    }

    pub fn summary(&mut self, now: Instant) -> Summary {
        let second = self.second(now);
        self.forget(second);
        let mut antennas: BTreeMap<String, usize> = BTreeMap::new();
        for (_, counts) in &self.recent {
            for (a, n) in counts {
                *antennas.entry(a.clone()).or_insert(0) += n;
            }
        }
        Summary {
            summary: true,
            at: crate::clock::api_timestamp(crate::clock::now_us()),
            chips: self.chips.len(),
            reads: self.reads,
            reads_per_minute: antennas.values().sum(),
            antennas,
            missed: self.missed,
        }
    }

    /// Entries held: the chips and the per-second counts (what a watcher costs).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.chips.len() + self.recent.iter().map(|(_, c)| c.len()).sum::<usize>()
    }
}

/// Daemon side: stream reads and summaries to one watcher until it leaves, stalls, or the daemon
/// stops (the caller cancels this future).
pub async fn serve(
    write: &mut (impl AsyncWriteExt + Unpin),
    mut reads: broadcast::Receiver<Arc<ReadEvent>>,
) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    let mut tick = tokio::time::interval_at(Instant::now() + SUMMARY_EVERY, SUMMARY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::with_capacity(4096);
    loop {
        out.clear();
        tokio::select! {
            _ = tick.tick() => {
                serde_json::to_writer(&mut out, &Line::Summary(tally.summary(Instant::now())))?;
                out.push(b'\n');
            }
            event = reads.recv() => match event {
                Ok(e) => {
                    // Take what else is already there: one write for a burst.
                    let mut next = Some(e);
                    while let Some(e) = next.take() {
                        tally.read(&e, Instant::now());
                        serde_json::to_writer(&mut out, &Line::Read(ShownRead::from(&*e)))?;
                        out.push(b'\n');
                        if out.len() < 64 * 1024 {
                            next = reads.try_recv().ok();
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tally.missed(n);
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
        match tokio::time::timeout(STALL_MAX, write.write_all(&out)).await {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("the watcher took nothing for {STALL_MAX:?}"),
        }
    }
}

/// A line for a person: local time of day, chip, bib, antenna, RSSI, what it became.
pub fn human(line: &Line) -> String {
    match line {
        Line::Read(r) => {
            let time = local_time(&crate::clock::api_timestamp(r.at_us));
            let bib = r.bib.as_deref().map_or_else(|| "unmapped".to_string(), |b| format!("bib {b}"));
            let antenna = r.antenna.map_or_else(String::new, |a| format!("ant {a}"));
            let rssi = r.rssi.map_or_else(String::new, |v| format!("rssi {v}"));
            let became = match (r.passing, r.strongest) {
                (Some(n), true) => format!("passing #{n} (strongest read of its window)"),
                (Some(n), false) => format!("passing #{n}"),
                (None, _) => "repeat".to_string(),
            };
            let test = if r.test { "  [test]" } else { "" };
            format!("{time}  {:<24} {bib:<14} {antenna:<6} {rssi:<9} {became}{test}", r.chip)
        }
        Line::Summary(s) => {
            let antennas: Vec<String> = s.antennas.iter().map(|(a, n)| format!("{a}: {n}")).collect();
            let missed =
                if s.missed > 0 { format!("; {} reads not shown (too slow)", s.missed) } else { String::new() };
            format!(
                "-- {}  {} chips, {} reads; last minute: {} reads{}{missed}",
                local_time(&s.at),
                s.chips,
                s.reads,
                s.reads_per_minute,
                if antennas.is_empty() { String::new() } else { format!(" (antenna {})", antennas.join(", ")) }
            )
        }
    }
}

/// The box's local time of day, to the millisecond.
fn local_time(at: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(at)
        .map(|t| t.with_timezone(&chrono::Local).format("%H:%M:%S%.3f").to_string())
        .unwrap_or_else(|_| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(chip: &str, antenna: Option<i64>, passing: Option<i64>) -> ReadEvent {
        ReadEvent {
            at_us: 1_674_379_225_123_000,
            chip: chip.into(),
            bib: (chip == "A").then(|| "7".to_string()),
            antenna,
            rssi: Some(-60),
            passing,
            strongest: false,
            session_id: Some(1),
            test: false,
        }
    }

    #[test]
    fn the_json_line_is_the_documented_one() {
        let line = serde_json::to_value(Line::Read(ShownRead::from(&event("A", Some(2), Some(5))))).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"at": "2023-01-22T09:20:25.123Z", "chip": "A", "bib": "7", "antenna": 2, "rssi": -60, "passing": 5})
        );
        let repeat = serde_json::to_value(Line::Read(ShownRead::from(&event("B", None, None)))).unwrap();
        assert_eq!(repeat["passing"], serde_json::Value::Null);
        assert_eq!(repeat["bib"], serde_json::Value::Null);
        // Both kinds of line come back as what they were.
        let text = serde_json::to_string(&Line::Read(ShownRead::from(&event("B", None, None)))).unwrap();
        assert!(matches!(serde_json::from_str::<Line>(&text).unwrap(), Line::Read(_)));
        let mut tally = Tally::default();
        let text = serde_json::to_string(&Line::Summary(tally.summary(Instant::now()))).unwrap();
        assert!(matches!(serde_json::from_str::<Line>(&text).unwrap(), Line::Summary(s) if s.summary));
    }

    #[test]
    fn the_summary_counts_chips_and_the_last_minute_by_antenna() {
        let mut tally = Tally::default();
        let start = Instant::now();
        for (chip, antenna) in [("A", Some(1)), ("A", Some(2)), ("B", Some(1)), ("C", None)] {
            tally.read(&event(chip, antenna, None), start);
        }
        // An announcement of a strongest read is not another read.
        tally.read(&ReadEvent { strongest: true, ..event("A", None, Some(1)) }, start);
        tally.missed(3);
        let s = tally.summary(start + Duration::from_secs(30));
        assert_eq!((s.chips, s.reads, s.reads_per_minute, s.missed), (3, 4, 4, 3));
        assert_eq!(s.antennas, BTreeMap::from([("1".into(), 2), ("2".into(), 1), ("none".into(), 1)]));
        tally.read(&event("D", Some(3), None), start + Duration::from_secs(50));
        let later = tally.summary(start + Duration::from_secs(90));
        assert_eq!((later.chips, later.reads, later.reads_per_minute), (4, 5, 1), "the minute slides");
        assert_eq!(later.antennas, BTreeMap::from([("3".into(), 1)]));
        assert!(human(&Line::Summary(later)).contains("antenna 3: 1"));
    }

    #[test]
    fn a_person_reads_bib_or_unmapped_and_passing_or_repeat() {
        let line = human(&Line::Read(ShownRead::from(&event("A", Some(2), Some(5)))));
        assert!(line.contains("bib 7") && line.contains("ant 2") && line.contains("passing #5"), "{line}");
        let line = human(&Line::Read(ShownRead::from(&event("B", None, None))));
        assert!(line.contains("unmapped") && line.ends_with("repeat"), "{line}");
    }

    #[test]
    fn a_watcher_costs_the_same_at_any_read_rate() {
        let mut tally = Tally::default();
        let start = Instant::now();
        // A minute and a half of a reader flooding distinct chips on 100 antennas, 2,000 a second.
        for i in 0..180_000u64 {
            let at = start + Duration::from_micros(i * 500);
            let chip = format!("{i:024X}");
            tally.read(&event(&chip, Some((i % 100) as i64), None), at);
        }
        let held = tally.held();
        assert!(held <= CHIPS_MAX + 61 * (ANTENNAS_MAX + 1), "{held}");
        let s = tally.summary(start + Duration::from_secs(90));
        assert_eq!(s.reads, 180_000);
        assert_eq!(s.chips, CHIPS_MAX, "at least this many");
        assert!(s.reads_per_minute >= 118_000 && s.reads_per_minute <= 120_000, "{}", s.reads_per_minute);
        assert!(s.antennas.contains_key("other") && s.antennas.len() <= ANTENNAS_MAX + 1, "{:?}", s.antennas);
    }

    /// On tokio's paused clock (no wall-clock waits): a summary every ten seconds, counting the
    /// reads sent before it, and a watcher that stops taking lines is let go after a minute.
    #[tokio::test(start_paused = true)]
    async fn summaries_on_time_and_a_stalled_watcher_let_go() {
        use tokio::io::AsyncBufReadExt;
        let t0 = Instant::now();
        let (tx, rx) = broadcast::channel(16);
        // A pipe of 4 KiB: the watcher's terminal.
        let (client, mut server) = tokio::io::duplex(4096);
        let daemon = tokio::spawn(async move { serve(&mut server, rx).await });
        tx.send(Arc::new(event("A", Some(1), Some(1)))).unwrap();
        let mut lines = tokio::io::BufReader::new(client).lines();
        let first: Line = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(matches!(first, Line::Read(ref r) if r.chip == "A" && r.passing == Some(1)), "{first:?}");
        let second: Line = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        let Line::Summary(summary) = second else { panic!("{second:?}") };
        assert_eq!((summary.reads, summary.chips), (1, 1));
        assert_eq!(Instant::now() - t0, SUMMARY_EVERY, "the first summary, ten seconds in");
        // The watcher stops reading: once the pipe is full, a minute later it is let go.
        let stalled = Instant::now();
        for n in 0..200 {
            tx.send(Arc::new(event(&format!("C{n}"), Some(1), None))).unwrap();
            tokio::task::yield_now().await;
        }
        let error = daemon.await.unwrap().unwrap_err().to_string();
        assert!(error.contains("took nothing"), "{error}");
        let waited = Instant::now() - stalled;
        assert!((STALL_MAX..STALL_MAX + SUMMARY_EVERY).contains(&waited), "let go after {waited:?}");
        drop(lines);
    }
}
