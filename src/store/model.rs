//! The reader's word against an oracle: random interleavings of live reads (some dated far
//! ahead or far back), reads made while the gateway was away and replayed when it asks, forged
//! and repeated replays, duplicate lines, reader clock steps, session starts and closes (chip
//! checks among them) and restarts, through the real conversation ([`Talk`]), stamping,
//! store and de-duplication (an Ultra reader, rewound by log index), against a small oracle
//! that knows what each session must hold:
//!
//! - every live read is stored;
//! - each session's passings are exactly the oracle's, in the same order, numbered 1, 2, 3…
//!
//! The oracle de-duplicates with no memory bound and no pruning, by the rules of DESIGN.md:
//! a read whose key (chip and reader time) was seen makes no passing; a live read belongs to the
//! session open when it arrives, a replayed one to the session whose interval holds its time
//! (within a second); a read makes a passing only in the session open when it is stored, when
//! no window of its chip there holds its time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::clock::Stamp;
use crate::config::{ChipEncoding, ClockMode, ClockSource, Format, TimestampSource};
use crate::reader::format::Parser;
use crate::reader::record::Parsed;
use crate::reader::talk::{Recall, Shared, Talk};
use crate::reader::{Stamping, talk::Admit};

/// Simulated time starts here (2026-05-28T20:26:40Z), in ms.
const T0_MS: i64 = 1_780_000_000_000;
/// The Ultra's epoch, 1980-01-01T00:00:00Z, in ms.
const EPOCH_1980_MS: i64 = 315_532_800_000;
const WINDOW_MS: i64 = 3_000;
const EDGE_MS: i64 = 1_000;
const FAR_FUTURE_MS: i64 = 4_070_908_800_000; // 2099-01-01
const FAR_PAST_MS: i64 = 978_307_200_000; // 2001-01-01

#[derive(Debug, Clone, Copy)]
enum When {
    Honest,
    FarFuture,
    FarPast,
}

#[derive(Debug, Clone)]
enum Event {
    Read {
        chip: u8,
        dt_ms: u16,
        when: When,
    },
    /// The last live line again.
    Duplicate,
    /// A flagged line nobody asked for: an old line again, or a forged one.
    ForgedReplay {
        back: u8,
        forged: bool,
    },
    Disconnect,
    Reconnect,
    Restart,
    StartSession {
        test: bool,
    },
    CloseSession,
    /// The reader's clock jumps ahead (while connected).
    ClockStep {
        ms: u32,
    },
    /// Nobody crosses the mat for a while (the in-memory windows are forgotten).
    Pause {
        s: u16,
    },
}

fn event() -> impl Strategy<Value = Event> {
    let when = prop_oneof![8 => Just(When::Honest), 1 => Just(When::FarFuture), 1 => Just(When::FarPast)];
    prop_oneof![
        30 => (0u8..4, 1u16..5000, when).prop_map(|(chip, dt_ms, when)| Event::Read { chip, dt_ms, when }),
        2 => Just(Event::Duplicate),
        2 => (0u8..20, any::<bool>()).prop_map(|(back, forged)| Event::ForgedReplay { back, forged }),
        3 => Just(Event::Disconnect),
        3 => Just(Event::Reconnect),
        2 => Just(Event::Restart),
        3 => any::<bool>().prop_map(|test| Event::StartSession { test }),
        2 => Just(Event::CloseSession),
        1 => (1u32..3_600_000).prop_map(|ms| Event::ClockStep { ms }),
        2 => (30u16..400).prop_map(|s| Event::Pause { s }),
    ]
}

/// One line the reader made.
#[derive(Debug, Clone)]
struct Line {
    index: u64,
    chip: String,
    reader_ms: i64,
}

impl Line {
    fn text(&self, flagged: bool) -> Vec<u8> {
        let since = self.reader_ms - EPOCH_1980_MS;
        format!(
            "0,{},{},{},1,-60,{},1,1,0000000000000000,0,{}\n",
            self.chip,
            since.div_euclid(1000),
            since.rem_euclid(1000),
            u8::from(flagged),
            self.index
        )
        .into_bytes()
    }
}

#[derive(Debug, Clone, Copy)]
struct OSession {
    id: i64,
    created_ms: i64,
    closed_ms: Option<i64>,
}

/// What each session must hold.
#[derive(Default)]
struct Oracle {
    sessions: Vec<OSession>,
    open: Option<i64>,
    keys: HashSet<(String, i64)>,
    starts: HashMap<(i64, String), Vec<i64>>,
    passings: HashMap<i64, Vec<(String, i64)>>,
    live_stored: usize,
}

impl Oracle {
    fn session_at(&self, ms: i64) -> Option<i64> {
        let holds = |at: i64| {
            self.sessions.iter().rev().find(|s| s.created_ms <= at && s.closed_ms.is_none_or(|c| c > at)).map(|s| s.id)
        };
        holds(ms).or_else(|| holds(ms + EDGE_MS)).or_else(|| holds(ms - EDGE_MS))
    }

    /// A read the store takes: `home` its session, `at_ms` the passing's time.
    fn stored(&mut self, line: &Line, home: Option<i64>, at_ms: i64) {
        if !self.keys.insert((line.chip.clone(), line.reader_ms)) {
            return;
        }
        let (Some(open), Some(home)) = (self.open, home) else { return };
        if open != home {
            return;
        }
        let starts = self.starts.entry((open, line.chip.clone())).or_default();
        if starts.iter().any(|s| (at_ms - s).abs() < WINDOW_MS) {
            return;
        }
        starts.push(at_ms);
        self.passings.entry(open).or_default().push((line.chip.clone(), at_ms));
    }
}

struct Harness {
    dir: tempfile::TempDir,
    cfg: Config,
    store: Store,
    parser: Parser,
    talk: Talk,
    source: TimestampSource,
    now_ms: i64,
    offset_ms: i64,
    connected: bool,
    memory: Vec<Line>,
    /// Lines made while the gateway was not listening (not yet taken).
    replays: VecDeque<Line>,
    last_live: Option<Line>,
    batch: Vec<Read>,
    oracle: Oracle,
}

fn open_store(cfg: &Config) -> Store {
    let (_tx, rx) = crossbeam_channel::bounded(1);
    let parts = Store::open(cfg, rx, Arc::new(Notify::new()), Live::new(), Arc::default()).expect("store opens");
    parts.store
}

fn new_talk(cfg: &Config) -> Talk {
    let db = query::Db::open_readonly(&cfg.storage.path).expect("readable");
    let max_skew = cfg.reader.max_skew.as_micros() as i64;
    let recall = Recall::from_reads(&db.last_reads(500).expect("last reads"), max_skew);
    Talk::new(&cfg.reader, recall, Arc::new(Shared::default()))
}

impl Harness {
    fn new(source: TimestampSource) -> Harness {
        let base = std::path::Path::new("/dev/shm");
        let dir = if base.is_dir() { tempfile::tempdir_in(base) } else { tempfile::tempdir() }.unwrap();
        let mut cfg = Config::default();
        cfg.storage.path = dir.path().join("gateway.db");
        cfg.clock.source = ClockSource::Trust;
        cfg.passings.dedup_window = std::time::Duration::from_millis(WINDOW_MS as u64);
        cfg.reader.format = Format::Ultra;
        cfg.reader.timestamps = source;
        cfg.reader.clock = Some(ClockMode::Ignore);
        cfg.reader.rewind = true;
        let store = open_store(&cfg);
        let talk = new_talk(&cfg);
        let parser = Parser::from_config(&cfg.reader, ChipEncoding::Hex).unwrap();
        let mut h = Harness {
            dir,
            cfg,
            store,
            parser,
            talk,
            source,
            now_ms: 0,
            offset_ms: 0,
            connected: false,
            memory: Vec::new(),
            replays: VecDeque::new(),
            last_live: None,
            batch: Vec::new(),
            oracle: Oracle::default(),
        };
        h.connect();
        h
    }

    fn stamp(&self) -> Stamp {
        Stamp { utc_us: (T0_MS + self.now_ms) * 1000, monotonic_us: 1_000_000 + self.now_ms * 1000 }
    }

    fn connect(&mut self) {
        self.talk.connected(self.stamp(), true);
        self.connected = true;
    }

    /// Hand one line to the gateway as the reader thread does; what the talk made of it.
    fn deliver(&mut self, bytes: &[u8]) -> Option<Admit> {
        let stamp = self.stamp();
        let today = chrono::NaiveDate::from_ymd_opt(2026, 5, 28).unwrap();
        let line = &bytes[..bytes.len() - 1];
        let Parsed::Read(p) = self.parser.parse(line, today) else { panic!("{:?}", String::from_utf8_lossy(line)) };
        let reader_time = p.reader_time.and_then(crate::timestamp::reader_us);
        let admit = self.talk.admit(reader_time, line, stamp, true, false);
        let how = Stamping { source: self.source, at: stamp, synced: true, offset_us: self.talk.offset_us() };
        self.batch.extend(how.read(p, admit, line.to_vec()));
        Some(admit)
    }

    fn flush(&mut self) {
        assert!(self.store.flush(&mut self.batch), "the store takes every batch");
    }

    /// What the talk asks of the reader now, answered: replays of the log indexes asked.
    fn poll(&mut self) {
        if !self.connected {
            return;
        }
        for command in self.talk.poll(self.stamp(), true) {
            if command.first() == Some(&b'6') {
                let text = String::from_utf8_lossy(&command[3..]).into_owned();
                let (from, to) = text.trim_end().split_once('\r').expect("600<from>\\r<to>");
                let (from, to): (u64, u64) = (from.parse().unwrap(), to.trim().parse().unwrap());
                self.replays.extend(self.memory.iter().filter(|l| (from..=to).contains(&l.index)).cloned());
            }
        }
    }

    /// Some of the replays asked for (a replay interleaves with live reads).
    fn replay(&mut self, n: usize) {
        for _ in 0..n {
            let Some(line) = self.replays.pop_front() else { return };
            let admit = self.deliver(&line.text(true));
            assert!(matches!(admit, Some(Admit::Replayed(_))), "a replay that was asked for is taken: {admit:?}");
            // Replayed: its time is the reader's (never measured here: offset 0).
            let home = self.oracle.session_at(line.reader_ms);
            self.oracle.stored(&line, home, line.reader_ms);
        }
    }

    fn apply(&mut self, event: &Event) {
        let dt = match event {
            Event::Read { dt_ms, .. } => i64::from(*dt_ms),
            // Not while a replay is on its way (a rewind quiet for 30 s is over).
            Event::Pause { s } if self.replays.is_empty() => i64::from(*s) * 1000,
            _ => 10,
        };
        self.now_ms += dt;
        self.poll();
        self.replay(1 + (self.now_ms as usize % 4));
        match *event {
            Event::Read { chip, when, .. } => {
                let honest = T0_MS + self.now_ms + self.offset_ms;
                let reader_ms = match when {
                    _ if !self.connected => honest,
                    When::Honest => honest,
                    When::FarFuture => FAR_FUTURE_MS + self.now_ms,
                    When::FarPast => FAR_PAST_MS + self.now_ms,
                };
                let line = Line { index: self.memory.len() as u64 + 1, chip: format!("100{chip}"), reader_ms };
                self.memory.push(line.clone());
                if self.connected {
                    let admit = self.deliver(&line.text(false));
                    assert!(matches!(admit, Some(Admit::Live | Admit::Retimed)), "a live read is taken: {admit:?}");
                    self.live(&line);
                    self.last_live = Some(line);
                }
            }
            Event::Duplicate => {
                if let (true, Some(line)) = (self.connected, self.last_live.clone()) {
                    self.deliver(&line.text(false));
                    self.live(&line);
                }
            }
            Event::ForgedReplay { back, forged } => {
                if self.connected && !self.memory.is_empty() {
                    let line = if forged {
                        Line { index: self.memory.len() as u64 + 1000, chip: "9999".into(), reader_ms: T0_MS }
                    } else {
                        // A line already taken live, flagged: never a new passing.
                        let taken: Vec<&Line> = self
                            .memory
                            .iter()
                            .filter(|l| self.oracle.keys.contains(&(l.chip.clone(), l.reader_ms)))
                            .collect();
                        let Some(line) = taken.iter().rev().nth(usize::from(back)).copied().cloned() else { return };
                        line
                    };
                    let admit = self.deliver(&line.text(true));
                    if forged {
                        assert_eq!(admit, Some(Admit::Drop), "a forged replay is not taken");
                    }
                }
            }
            Event::Disconnect => {
                if self.connected {
                    self.talk.disconnected(self.stamp());
                    self.connected = false;
                    self.replays.clear();
                }
            }
            Event::Reconnect => {
                if !self.connected {
                    self.connect();
                }
            }
            Event::Restart => {
                self.flush();
                self.store = open_store(&self.cfg);
                self.talk = new_talk(&self.cfg);
                self.replays.clear();
                self.connect();
            }
            Event::StartSession { test } => {
                self.flush();
                if let Ok(Some(id)) = self.store.apply(Op::StartSession { alias: "MODEL".into(), test }) {
                    let at = self.now_ms;
                    let conn = self.store.conn.as_ref().unwrap();
                    conn.execute("UPDATE sessions SET created_at = ?1 WHERE id = ?2", params![(T0_MS + at) * 1000, id])
                        .unwrap();
                    if let Some(prev) = self.oracle.open {
                        conn.execute(
                            "UPDATE sessions SET closed_at = ?1 WHERE id = ?2",
                            params![(T0_MS + at) * 1000, prev],
                        )
                        .unwrap();
                        self.oracle
                            .sessions
                            .iter_mut()
                            .filter(|s| s.id == prev)
                            .for_each(|s| s.closed_ms = Some(T0_MS + at));
                    }
                    self.oracle.sessions.push(OSession { id, created_ms: T0_MS + at, closed_ms: None });
                    self.oracle.open = Some(id);
                }
            }
            Event::CloseSession => {
                self.flush();
                if let Ok(Some(id)) = self.store.apply(Op::CloseSession) {
                    let at = T0_MS + self.now_ms;
                    let conn = self.store.conn.as_ref().unwrap();
                    conn.execute("UPDATE sessions SET closed_at = ?1 WHERE id = ?2", params![at * 1000, id]).unwrap();
                    self.oracle.sessions.iter_mut().filter(|s| s.id == id).for_each(|s| s.closed_ms = Some(at));
                    self.oracle.open = None;
                }
            }
            Event::ClockStep { ms } => {
                if self.connected {
                    self.offset_ms += i64::from(ms);
                }
            }
            Event::Pause { .. } => {}
        }
        self.flush();
        // The writer's housekeeping.
        self.store.windows.prune(self.stamp().monotonic_us);
    }

    /// A live line the store took.
    fn live(&mut self, line: &Line) {
        self.oracle.live_stored += 1;
        let arrival = T0_MS + self.now_ms;
        let believed = (line.reader_ms - arrival).abs() <= 24 * 3_600_000;
        let at = if self.source == TimestampSource::Reader && believed { line.reader_ms } else { arrival };
        let open = self.oracle.open;
        self.oracle.stored(line, open, at);
    }

    /// The reader comes back, reads once more (which tells the last gap), and replays all asked.
    fn finish(&mut self) {
        if !self.connected {
            self.now_ms += 10;
            self.connect();
        }
        self.apply(&Event::Read { chip: 0, dt_ms: 10, when: When::Honest });
        for _ in 0..120 {
            self.now_ms += 1000;
            self.poll();
            self.replay(usize::MAX);
            self.flush();
        }
    }

    fn check(&self) {
        let conn = self.store.conn.as_ref().unwrap();
        let live: i64 = conn.query_row("SELECT count(*) FROM reads WHERE replayed = 0", [], |r| r.get(0)).unwrap();
        assert_eq!(live as usize, self.oracle.live_stored, "every live read is stored");
        let mut stmt = conn
            .prepare("SELECT num_passing, chip, timestamp FROM passings WHERE session_id = ?1 ORDER BY num_passing")
            .unwrap();
        let ids: Vec<i64> = conn
            .prepare("SELECT id FROM sessions")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for id in ids {
            let rows: Vec<(i64, String, i64)> =
                stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect();
            let numbers: Vec<i64> = rows.iter().map(|r| r.0).collect();
            assert_eq!(numbers, (1..=rows.len() as i64).collect::<Vec<_>>(), "session {id}: numbered 1, 2, 3…");
            let got: Vec<(String, i64)> = rows.into_iter().map(|(_, chip, t)| (chip, t / 1000)).collect();
            let want = self.oracle.passings.get(&id).cloned().unwrap_or_default();
            assert_eq!(got, want, "session {id}: the oracle's passings");
        }
        let _ = &self.dir;
    }
}

/// 10,000 cases natively; a few hundred under emulation (the Pi suites), where the same code
/// runs ten times slower and proves nothing more (the model is machine-independent).
fn cases() -> u32 {
    let emulated = std::env::var_os("RUFUS_GATEWAY_EMULATED").is_some();
    std::env::var("RUFUS_GATEWAY_MODEL_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(if emulated {
        200
    } else {
        10_000
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_store_holds_what_the_oracle_says(
        events in proptest::collection::vec(event(), 1..40),
        reader_times in any::<bool>(),
    ) {
        let source = if reader_times { TimestampSource::Reader } else { TimestampSource::Host };
        let mut h = Harness::new(source);
        for e in &events {
            h.apply(e);
        }
        h.finish();
        h.check();
    }
}
