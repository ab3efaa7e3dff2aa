//! The conversation driven by hand: every time is given, so each rule is checked exactly.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};

use super::*;
use crate::config::{ClockMode, Format, ReaderConfig};

const T0: i64 = 1_780_000_000_000_000; // 2026-05-28T20:26:40Z, in µs

fn cfg(format: Format, clock: ClockMode, rewind: bool) -> ReaderConfig {
    ReaderConfig { format, clock: Some(clock), rewind, ..ReaderConfig::default() }
}

fn at(ms: i64) -> Stamp {
    Stamp { utc_us: T0 + ms * 1000, monotonic_us: 5_000_000 + ms * 1000 }
}

fn utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(T0 + ms * 1000).unwrap()
}

/// The IPICO clock reply for a reader whose clock reads `reader` (UTC reader zone).
fn ipico_clock(reader: DateTime<Utc>) -> Vec<u8> {
    ipico::clock_reply(reader.naive_utc(), 0x27).into_bytes()
}

fn new(cfg: &ReaderConfig, recall: Recall) -> (Talk, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    (Talk::new(cfg, recall, shared.clone()), shared)
}

fn offset(shared: &Shared) -> Option<i64> {
    shared.clock.lock().unwrap().clock_offset_ms
}

#[test]
fn an_ipico_offset_is_the_shortest_round_trip_halved() {
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Measure, false), Recall::default());
    talk.connected(at(0), true);
    // The reader is 3,200 ms fast; round trips of 40, 10 and 60 ms.
    let mut t = 0;
    for rtt in [40, 10, 60] {
        assert_eq!(talk.poll(at(t), true), vec![ipico::get_clock().into_bytes()]);
        assert!(talk.poll(at(t + 1), true).is_empty(), "one request at a time");
        // Read by the reader halfway, truncated to 10 ms.
        let reader = utc(t + rtt / 2 + 3200);
        let truncated = Utc.timestamp_micros(reader.timestamp_micros() / 10_000 * 10_000).unwrap();
        assert!(talk.reply(&ipico_clock(truncated), at(t + rtt)));
        t += 100;
    }
    let got = offset(&shared).unwrap();
    assert!((got - 3200).abs() <= 5, "{got}");
    let c = shared.clock.lock().unwrap().clone();
    assert!(c.clock_off, "beyond the default 1 s tolerance");
    // The next measurement is due a clock_check later.
    assert_eq!(talk.next_due(), Some(at(200 + 60).monotonic_us + 300_000_000), "from the last reply");
}

#[test]
fn a_reader_that_does_not_answer_is_said_once_and_asked_again_later() {
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Measure, false), Recall::default());
    talk.connected(at(0), true);
    let mut sent = 0;
    for ms in (0..10_000).step_by(100) {
        sent += talk.poll(at(ms), true).len();
    }
    assert_eq!(sent, 3, "three tries, two seconds apart");
    assert!(shared.clock.lock().unwrap().clock_error.as_deref().unwrap().contains("does not answer"));
    assert_eq!(offset(&shared), None);
}

#[test]
fn set_is_aligned_to_the_roll_over() {
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Set, false), Recall::default());
    talk.connected(at(0), true);
    let mut t = 0;
    for _ in 0..3 {
        talk.poll(at(t), true);
        assert!(talk.reply(&ipico_clock(utc(t + 10 + 3200)), at(t + 20)));
        t += 100;
    }
    // One-way latency 10 ms: the set leaves 500 + 10 ms before a whole second.
    let due = talk.next_due().unwrap();
    let send_utc = T0 + (due - at(0).monotonic_us);
    assert_eq!((send_utc + 510_000).rem_euclid(1_000_000), 0, "sent at S - 510 ms");
    let early = Stamp { utc_us: send_utc - 1000, monotonic_us: due - 1000 };
    assert!(talk.poll(early, true).is_empty(), "not before its time");
    let now = Stamp { utc_us: send_utc, monotonic_us: due };
    let sent = talk.poll(now, true);
    let target = Utc.timestamp_micros(send_utc + 510_000).unwrap().naive_utc();
    assert_eq!(sent, vec![ipico::set_clock(target).into_bytes()]);
    assert!(shared.clock.lock().unwrap().clock_set_at.is_some());
    // Verified by a measurement once the new second has taken effect.
    assert_eq!(talk.next_due(), Some(due + 700_000));
}

#[test]
fn set_waits_for_a_synchronised_host() {
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Set, false), Recall::default());
    talk.connected(at(0), false);
    talk.poll(at(0), false);
    talk.reply(&ipico_clock(utc(3200)), at(0));
    for _ in 0..2 {
        let t = talk.next_due().unwrap();
        talk.poll(Stamp { utc_us: t, monotonic_us: t }, false);
        talk.reply(&ipico_clock(utc(3200)), Stamp { utc_us: t, monotonic_us: t });
    }
    assert!(matches!(talk.clock, ClockJob::Idle { .. }), "measured only");
    let error = shared.clock.lock().unwrap().clock_error.clone().unwrap();
    assert!(error.contains("not synchronised"), "{error}");
    // The next check with a synchronised host sets it.
    let due = talk.next_due().unwrap();
    talk.poll(Stamp { utc_us: T0, monotonic_us: due }, true);
    assert!(matches!(talk.clock, ClockJob::Measuring { then: Then::Set, .. }));
}

fn ultra_line(index: u64, replayed: bool) -> Vec<u8> {
    format!("0,{},1170518701,698,1,-71,{},2,1,0000000000000000,0,{index}\n", 11000 + index, replayed as u8).into_bytes()
}

#[test]
fn an_ultra_gap_is_rewound_by_index_and_ends_at_its_last_read() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(100) };
    let mut c = cfg(Format::Ultra, ClockMode::Ignore, true);
    c.ultra_rewind_form = crate::config::UltraRewindForm::Ascii;
    let (mut talk, shared) = new(&c, recall);
    talk.connected(at(0), true);
    assert!(talk.poll(at(0), true).is_empty(), "nothing known to be missing yet");
    assert_eq!(talk.admit(None, &ultra_line(601, false), at(1), false), Admit::Live);
    assert_eq!(talk.poll(at(2), true), vec![b"600101\r600\n".to_vec()]);
    for i in 101..=600 {
        assert_eq!(talk.admit(None, &ultra_line(i, true), at(3), false), Admit::Replayed);
    }
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!((r.state, r.reads, r.rewinds_total), (RewindState::Done, 500, 1), "{r:?}");
    assert_eq!(r.asked.as_deref(), Some("log 101..600"));
}

#[test]
fn an_ultra_rewind_that_stops_short_is_a_failure() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(10) };
    let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    talk.admit(None, &ultra_line(21, false), at(0), false);
    talk.poll(at(0), true);
    talk.admit(None, &ultra_line(11, true), at(10), false);
    talk.poll(at(10 + 29_000), true);
    assert_eq!(shared.rewind.lock().unwrap().state, RewindState::Running);
    talk.poll(at(10 + 30_000), true);
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!(r.state, RewindState::Failed);
    assert_eq!(r.error.as_deref(), Some("the reader replayed 1 of the 10 reads asked for"));
}

#[test]
fn a_restarted_ultra_log_is_not_rewound() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(5000) };
    let (mut talk, _) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    talk.admit(None, &ultra_line(3, false), at(0), false);
    assert!(talk.poll(at(1), true).is_empty());
    talk.admit(None, &ultra_line(4, false), at(2), false);
    assert!(talk.poll(at(3), true).is_empty(), "and it goes on from its new index");
}

#[test]
fn an_ipico_download_steps_filters_and_ends() {
    let since = T0 - 60_000_000;
    let recall = Recall { reader_time_us: Some(since), ultra_index: None };
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    assert_eq!(talk.poll(at(0), true), vec![ipico::download_init().into_bytes()]);
    let status = |state: u8, extent: u32, progress: u32| {
        let e = extent.to_be_bytes();
        let p = progress.to_be_bytes();
        ipico::frame(ipico::DOWNLOAD, &[state, e[1], e[2], e[3], p[1], p[2], p[3], 0, 0x59, 0x05, 0x8f, 0x03])
            .into_bytes()
    };
    assert!(talk.reply(&status(1, 3, 0), at(1)));
    assert_eq!(talk.poll(at(2), true), vec![ipico::download_configure().into_bytes()]);
    talk.reply(&status(1, 3, 0), at(3));
    assert_eq!(talk.poll(at(4), true), vec![ipico::download_start().into_bytes()]);
    talk.reply(&status(3, 3, 0), at(5));
    assert_eq!(talk.admit(Some(since - 1), b"", at(6), false), Admit::Drop, "older than what we have: yesterday's");
    assert_eq!(
        talk.admit(Some(since), b"", at(6), false),
        Admit::Replayed,
        "the last we have: a repeat the store recognises"
    );
    assert_eq!(talk.admit(Some(since + 1), b"", at(6), false), Admit::Replayed, "missed");
    assert_eq!(talk.admit(Some(T0 + 1000), b"", at(6), false), Admit::Live, "made after we connected");
    talk.reply(&status(3, 3, 3), at(7));
    assert_eq!(
        talk.poll(at(8), true),
        vec![ipico::download_stop().into_bytes(), ipico::download_cleanup().into_bytes()],
        "the reader does not stop by itself"
    );
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!((r.state, r.reads), (RewindState::Done, 1));
    assert_eq!(talk.admit(Some(since - 1), b"", at(9), false), Admit::Live, "after the download, every read is live");
}

#[test]
fn recall_takes_the_newest_time_and_the_highest_index() {
    let a = ultra_line(7, false);
    let b = ultra_line(9, true);
    let r = Recall::from_reads([(Some(5), a.as_slice()), (Some(9), b.as_slice()), (None, b"junk".as_slice())]);
    assert_eq!(r, Recall { reader_time_us: Some(9), ultra_index: Some(9) });
}

#[test]
fn impinj_takes_the_largest_lead_over_a_window() {
    let (mut talk, shared) = new(&cfg(Format::ImpinjJson, ClockMode::Measure, false), Recall::default());
    talk.connected(at(0), true);
    assert!(talk.poll(at(0), true).is_empty(), "nothing is sent to an Impinj");
    // Reader 2 s fast; latencies 30, 5, 80, 12, 50 ms; a window of 5 s.
    for (i, latency) in [30, 5, 80, 12, 50].into_iter().enumerate() {
        let arrival = 1200 * i as i64;
        talk.admit(Some(T0 + (arrival - latency + 2000) * 1000), b"", at(arrival), false);
    }
    assert_eq!(offset(&shared), None, "the window is not over");
    talk.admit(Some(T0 + (6000 - 40 + 2000) * 1000), b"", at(6000), false);
    assert_eq!(offset(&shared), Some(1995), "2 s less the shortest latency");
}

#[test]
fn an_ultra_is_asked_whether_it_reads_before_a_set() {
    for (answer, set) in [(&b"S=1,1,0"[..], false), (&b"S=0,1,0"[..], true)] {
        let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Set, false), Recall::default());
        talk.connected(at(0), true);
        assert_eq!(talk.poll(at(0), true), vec![b"r".to_vec()]);
        assert!(talk.reply(b"20:26:43 28-5-2026 (0)", at(20)));
        assert_eq!(talk.poll(at(21), true), vec![b"?".to_vec()]);
        assert!(talk.reply(answer, at(30)), "the status line is taken");
        assert_eq!(matches!(talk.clock, ClockJob::Setting { .. }), set);
        let error = shared.clock.lock().unwrap().clock_error.clone();
        assert_eq!(error.is_some_and(|e| e.contains("the Ultra is reading")), !set);
    }
}

#[test]
fn a_quiet_ultra_is_asked_by_time_since_the_newest_read() {
    let since = T0 - 60_000_000;
    let recall = Recall { reader_time_us: Some(since), ultra_index: Some(100) };
    let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    assert_eq!(talk.next_due(), Some(at(5000).monotonic_us), "a live read may yet tell the gap");
    assert!(talk.poll(at(4999), true).is_empty());
    let from = ultra::seconds_since_1980(utc(-60_000).naive_utc());
    let to = ultra::seconds_since_1980(utc(5000 + 60_000).naive_utc());
    assert_eq!(talk.poll(at(5000), true), vec![format!("800{from}\r{to}\n").into_bytes()]);
    // The newest read we have comes again (a repeat, not counted), then two we missed.
    talk.admit(Some(since), &ultra_line(100, true), at(5100), false);
    talk.admit(Some(since + 1000), &ultra_line(101, true), at(5200), false);
    talk.admit(Some(since + 2000), &ultra_line(102, true), at(5300), false);
    assert!(talk.poll(at(5300 + 9_999), true).is_empty());
    talk.poll(at(5300 + 10_000), true);
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!((r.state, r.reads), (RewindState::Done, 2), "{r:?}");
    // The next live read follows what the replay brought: no gap to ask again.
    talk.admit(None, &ultra_line(103, false), at(20_000), false);
    assert!(talk.poll(at(20_001), true).is_empty());
}

#[test]
fn an_unfinished_download_starts_again_where_it_did() {
    let since = T0 - 60_000_000;
    let recall = Recall { reader_time_us: Some(since), ultra_index: None };
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    talk.poll(at(0), true);
    for step in 1..=3 {
        talk.reply(
            &ipico::frame(ipico::DOWNLOAD, &[1, 0, 0, 9, 0, 0, 0, 0, 0x59, 0x05, 0x8f, 0x03]).into_bytes(),
            at(step),
        );
        talk.poll(at(step), true);
    }
    // One replayed read, then a live one, then the line drops.
    assert_eq!(talk.admit(Some(since + 1), b"", at(10), false), Admit::Replayed);
    assert_eq!(talk.admit(Some(T0 + 5_000), b"", at(10), false), Admit::Live);
    talk.disconnected(at(20));
    assert_eq!(shared.rewind.lock().unwrap().state, RewindState::Failed);
    talk.connected(at(30), true);
    talk.poll(at(30), true);
    for step in 31..=33 {
        talk.reply(
            &ipico::frame(ipico::DOWNLOAD, &[1, 0, 0, 9, 0, 0, 0, 0, 0x59, 0x05, 0x8f, 0x03]).into_bytes(),
            at(step),
        );
        talk.poll(at(step), true);
    }
    assert_eq!(
        talk.admit(Some(since + 2), b"", at(40), false),
        Admit::Replayed,
        "what the first download had yet to bring is taken now, though a live read came after it"
    );
}
