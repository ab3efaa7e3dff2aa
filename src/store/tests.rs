//! The store actor on its own: a real writer thread on a temporary database, driven through its
//! handle and its read channel, checked through the read side. Fast (no binary, no network), and
//! each rule of the store has a test here: numbering, windows and the bib map, session
//! transitions and refusals, the delivery record, retention.

use std::time::{Duration, Instant};

use super::query::{Db, RemoteState, SessionState};
use super::*;
use crate::clock::Stamp;
use crate::config::ClockSource;

struct Rig {
    dir: tempfile::TempDir,
    handle: Option<StoreHandle>,
    reads: Option<Sender<Box<Read>>>,
    live: Live,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Rig {
    fn new(edit: impl FnOnce(&mut Config)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.path = dir.path().join("gateway.db");
        cfg.clock.source = ClockSource::Trust;
        edit(&mut cfg);
        let (tx, rx) = crossbeam_channel::bounded(1000);
        let live = Live::new();
        let StoreParts { store, handle } =
            Store::open(&cfg, rx, Arc::new(Notify::new()), live.clone(), Arc::default()).unwrap();
        let thread = std::thread::spawn(move || store.run());
        Rig { dir, handle: Some(handle), reads: Some(tx), live, thread: Some(thread) }
    }

    fn call(&self, op: Op) -> Reply {
        let rx = self.handle.as_ref().unwrap().submit(op).unwrap();
        rx.blocking_recv().unwrap()
    }

    /// A read of `chip`, `ms` milliseconds after `base_us`.
    fn read(&self, chip: &str, base_us: i64, ms: i64) {
        let at = base_us + ms * 1000;
        let read = Read {
            host: Stamp { utc_us: at, monotonic_us: crate::clock::monotonic_us() },
            clock_synced: true,
            chip: chip.into(),
            antenna: Some(1),
            rssi: None,
            reader_time_us: None,
            bib: None,
            replay_key: None,
            raw: chip.as_bytes().to_vec(),
            timestamp_us: at,
            host_stamped: false,
            replayed_at_us: None,
        };
        self.reads.as_ref().unwrap().send(Box::new(read)).unwrap();
    }

    fn db(&self) -> Db {
        Db::open_readonly(&self.dir.path().join("gateway.db")).unwrap()
    }

    /// Wait (with a deadline) until `cond` holds on the database.
    fn until(&self, what: &str, cond: impl Fn(&Db) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if cond(&self.db()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn passings(&self, session: i64) -> Vec<(i64, String, String)> {
        self.db()
            .passings_since(session, 0, 1000)
            .unwrap()
            .into_iter()
            .map(|p| (p.num_passing, p.bib, p.chip))
            .collect()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Every sender gone: the writer drains, commits and returns.
        self.reads.take();
        self.handle.take();
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
    }
}

fn base() -> i64 {
    crate::clock::now_us()
}

#[test]
fn reads_become_numbered_passings_through_the_window_and_the_bib_map() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("bibs.csv");
    std::fs::write(&map, "chip,bib\nAAA1,101\n").unwrap();
    let rig = Rig::new(|c| {
        c.passings.bib_map = Some(map.clone());
        c.passings.dedup_window = Duration::from_secs(3);
    });
    let id = rig.call(Op::StartSession { alias: "FINISH".into(), test: false }).unwrap().unwrap();
    let t = base();
    rig.read("AAA1", t, 0);
    rig.read("AAA1", t, 1000); // inside the 3 s window: the same passing
    rig.read("BBB2", t, 2000); // not in the map: its chip is its bib (`unmapped = "chip"`)
    rig.read("AAA1", t, 5000); // after the window: a new passing
    rig.until("3 passings", |db| db.queue().unwrap().pending == 3);
    let expected = [(1, "101", "AAA1"), (2, "BBB2", "BBB2"), (3, "101", "AAA1")];
    let got = rig.passings(id);
    assert_eq!(got.len(), 3);
    for ((n, bib, chip), (en, ebib, echip)) in got.iter().zip(expected) {
        assert_eq!((*n, bib.as_str(), chip.as_str()), (en, ebib, echip));
    }
}

#[test]
fn unmapped_chips_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("bibs.csv");
    std::fs::write(&map, "AAA1,101\n").unwrap();
    let rig = Rig::new(|c| {
        c.passings.bib_map = Some(map.clone());
        c.passings.unmapped = Unmapped::Skip;
    });
    let id = rig.call(Op::StartSession { alias: "FINISH".into(), test: false }).unwrap().unwrap();
    let t = base();
    rig.read("ZZZ9", t, 0);
    rig.read("AAA1", t, 10);
    rig.until("1 passing", |db| db.queue().unwrap().pending == 1);
    assert_eq!(rig.passings(id), [(1, "101".to_string(), "AAA1".to_string())]);
}

#[test]
fn session_transitions_and_refusals() {
    let rig = Rig::new(|_| {});
    assert_eq!(rig.call(Op::CloseSession), Err(StoreError::Refused("no session is open".into())));
    let first = rig.call(Op::StartSession { alias: "ONE".into(), test: false }).unwrap().unwrap();
    let row = rig.db().session(first).unwrap().unwrap();
    assert_eq!((row.state, row.remote_state), (SessionState::Open, RemoteState::Pending));

    rig.call(Op::RemoteOpened { session_id: first, token: "tok-1".into() }).unwrap();
    assert_eq!(rig.db().session(first).unwrap().unwrap().remote_state, RemoteState::Open);

    // A new session while one is open: the first stops taking reads and drains.
    let second = rig.call(Op::StartSession { alias: "TWO".into(), test: false }).unwrap().unwrap();
    assert_ne!(first, second);
    assert_eq!(rig.db().session(first).unwrap().unwrap().state, SessionState::Closing);
    assert_eq!(rig.db().open_session().unwrap().unwrap().id, second);

    rig.call(Op::RemoteClosed { session_id: first }).unwrap();
    let row = rig.db().session(first).unwrap().unwrap();
    assert_eq!((row.state, row.remote_state), (SessionState::Closed, RemoteState::Closed));

    // Closed at RUFUS by someone else: nothing to resend while it holds no passings.
    rig.call(Op::RemoteOpened { session_id: second, token: "tok-2".into() }).unwrap();
    rig.call(Op::ClosedRemotely { session_id: second, reason: "closed in the web app".into() }).unwrap();
    let row = rig.db().session(second).unwrap().unwrap();
    assert_eq!(row.remote_state, RemoteState::ClosedRemotely);
    assert!(
        matches!(rig.call(Op::Resend { alias: "THREE".into() }), Err(StoreError::Refused(r)) if r.contains("nothing to resend"))
    );
}

#[test]
fn the_delivery_record_moves_only_under_the_right_token() {
    let rig = Rig::new(|c| c.passings.dedup_window = Duration::ZERO);
    let id = rig.call(Op::StartSession { alias: "FINISH".into(), test: false }).unwrap().unwrap();
    rig.call(Op::RemoteOpened { session_id: id, token: "tok-right".into() }).unwrap();
    let t = base();
    for i in 0..5 {
        rig.read(&format!("C{i}"), t, i);
    }
    rig.until("5 pending", |db| db.queue().unwrap().pending == 5);

    // Another database's session under the same id: not ours to record.
    rig.call(Op::Delivered { session_id: id, token: "tok-other".into(), first: 1, last: 5 }).unwrap();
    assert_eq!(rig.db().queue().unwrap().pending, 5);

    rig.call(Op::Delivered { session_id: id, token: "tok-right".into(), first: 1, last: 3 }).unwrap();
    let q = rig.db().queue().unwrap();
    assert_eq!((q.pending, q.delivered), (2, 3));
    // An older, overlapping record never moves it back.
    rig.call(Op::Delivered { session_id: id, token: "tok-right".into(), first: 1, last: 2 }).unwrap();
    rig.call(Op::Delivered { session_id: id, token: "tok-right".into(), first: 4, last: 5 }).unwrap();
    let q = rig.db().queue().unwrap();
    assert_eq!((q.pending, q.delivered), (0, 5));
}

#[test]
fn retention_prunes_delivered_passings_and_keeps_pending_ones() {
    // Age counts from delivery: a short retention lets this test see it pass.
    let rig = Rig::new(|c| {
        c.storage.retention = Duration::from_secs(4);
        c.passings.dedup_window = Duration::ZERO;
    });
    let id = rig.call(Op::StartSession { alias: "OLD".into(), test: false }).unwrap().unwrap();
    rig.call(Op::RemoteOpened { session_id: id, token: "tok".into() }).unwrap();
    let t = base();
    for i in 0..4 {
        rig.read(&format!("OLD{i}"), t, i);
    }
    rig.until("4 pending", |db| db.queue().unwrap().pending == 4);
    rig.call(Op::Delivered { session_id: id, token: "tok".into(), first: 1, last: 2 }).unwrap();
    assert_eq!(rig.db().queue().unwrap().delivered, 2);
    // Pruned once the delivery is older than the retention (checked every retention / 4).
    assert_eq!(rig.passings(id).len(), 4, "nothing pruned before its time");
    rig.until("the delivered pair pruned", |db| db.passings_since(id, 0, 10).unwrap().len() == 2);
    let left: Vec<i64> = rig.passings(id).iter().map(|p| p.0).collect();
    assert_eq!(left, [3, 4], "what was never delivered is kept, whatever its age");
    assert_eq!(rig.db().queue().unwrap().pending, 2);
}

#[test]
fn a_test_session_is_local_and_never_interrupts_a_race() {
    let rig = Rig::new(|c| c.passings.dedup_window = Duration::ZERO);
    let test = rig.call(Op::StartSession { alias: "CHECK".into(), test: true }).unwrap().unwrap();
    let row = rig.db().session(test).unwrap().unwrap();
    assert_eq!((row.state, row.remote_state, row.test), (SessionState::Open, RemoteState::Local, true));
    let t = base();
    for i in 0..3 {
        rig.read(&format!("T{i}"), t, i);
    }
    rig.until("3 test passings", |db| db.session(test).unwrap().unwrap().passings == 3);
    // Nothing of it waits for the API, and the uplink has nothing to do.
    let q = rig.db().queue().unwrap();
    assert_eq!((q.pending, q.oldest_pending_at), (0, None));
    assert_eq!(rig.db().session(test).unwrap().unwrap().pending, 0);
    assert!(matches!(rig.db().next_work(10, None).unwrap(), super::query::Work::Idle));
    // Another chip check replaces it; a race session closes it.
    let again = rig.call(Op::StartSession { alias: "CHECK2".into(), test: true }).unwrap().unwrap();
    assert_eq!(rig.db().session(test).unwrap().unwrap().state, SessionState::Closed);
    let race = rig.call(Op::StartSession { alias: "RACE".into(), test: false }).unwrap().unwrap();
    let closed = rig.db().session(again).unwrap().unwrap();
    assert_eq!((closed.state, closed.remote_state), (SessionState::Closed, RemoteState::Local));
    // The race numbers from 1 and goes to the uplink.
    rig.read("T0", t, 10);
    rig.until("the race's first passing", |db| db.session(race).unwrap().unwrap().passings == 1);
    assert_eq!(rig.passings(race), [(1, "T0".to_string(), "T0".to_string())]);
    assert!(
        matches!(rig.db().next_work(10, None).unwrap(), super::query::Work::Create { session_id, .. } if session_id == race)
    );
    // A chip check while the race is open is refused, and says why.
    match rig.call(Op::StartSession { alias: "CHECK3".into(), test: true }) {
        Err(StoreError::Refused(why)) => {
            assert!(why.contains("race session") && why.contains("session close"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.db().open_session().unwrap().unwrap().id, race);
}

#[test]
fn watched_reads_carry_their_bib_and_passing() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("bibs.csv");
    std::fs::write(&map, "chip,bib\nW1,101\n").unwrap();
    let rig = Rig::new(|c| {
        c.passings.dedup_window = Duration::from_secs(3);
        c.passings.bib_map = Some(map.clone());
    });
    let id = rig.call(Op::StartSession { alias: "W".into(), test: true }).unwrap().unwrap();
    let t = base();
    // Unwatched: nothing is made (no receiver, no event).
    rig.read("W0", t, 0);
    rig.until("the first passing", |db| db.session(id).unwrap().unwrap().passings == 1);
    let mut watch = rig.live.reads.subscribe();
    rig.read("W1", t, 100);
    rig.read("W1", t, 200);
    rig.read("W2", t, 300);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 3 {
        match watch.try_recv() {
            Ok(e) => seen.push((*e).clone()),
            Err(_) => {
                assert!(Instant::now() < deadline, "saw only {seen:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let got: Vec<_> = seen.iter().map(|e| (e.chip.as_str(), e.bib.as_deref(), e.passing, e.test)).collect();
    assert_eq!(
        got,
        [("W1", Some("101"), Some(2), true), ("W1", Some("101"), None, true), ("W2", None, Some(3), true)],
        "a repeat inside the window has no passing; an unmapped chip no bib"
    );
    assert_eq!(seen[0].antenna, Some(1));
    assert_eq!(seen[0].at_us, t + 100_000);
}

#[test]
fn a_strongest_window_restored_after_a_restart_keeps_the_readers_bib() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.storage.path = dir.path().join("gateway.db");
    cfg.clock.source = ClockSource::Trust;
    cfg.passings.dedup_keep = crate::config::DedupKeep::Strongest;
    cfg.passings.dedup_window = Duration::from_secs(60);
    let open = |cfg: &Config| {
        let (_tx, rx) = crossbeam_channel::bounded(1);
        Store::open(cfg, rx, Arc::new(Notify::new()), Live::new(), Arc::default()).unwrap().store
    };
    let mut store = open(&cfg);
    let id = store.apply(Op::StartSession { alias: "BIBS".into(), test: false }).unwrap().unwrap();
    let at = crate::clock::now_us();
    let read = Read {
        host: Stamp { utc_us: at, monotonic_us: crate::clock::monotonic_us() },
        clock_synced: true,
        chip: "0A0B".into(),
        antenna: Some(1),
        rssi: Some(-50),
        reader_time_us: None,
        // A regex `bib` group's.
        bib: Some("B77".into()),
        replay_key: None,
        raw: b"0A0B;B77".to_vec(),
        timestamp_us: at,
        host_stamped: false,
        replayed_at_us: None,
    };
    assert!(store.flush(&mut vec![read]));
    drop(store);
    // A restart with the window still open: it is restored, and emitted when the session closes.
    let mut store = open(&cfg);
    store.apply(Op::CloseSession).unwrap();
    let passings = Db::open_readonly(&cfg.storage.path).unwrap().passings_since(id, 0, 10).unwrap();
    assert_eq!(passings.iter().map(|p| p.bib.as_str()).collect::<Vec<_>>(), ["B77"]);
}
