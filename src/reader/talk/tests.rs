//! The conversation driven by hand: every time is given, so each rule is checked exactly.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};

use super::*;
use crate::config::{ClockMode, Format, ReaderConfig};
use crate::reader::record::Reject;

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
        assert_eq!(talk.reply(&ipico_clock(truncated), at(t + rtt)), Ok(true));
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
        assert_eq!(talk.reply(&ipico_clock(utc(t + 10 + 3200)), at(t + 20)), Ok(true));
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
    talk.reply(&ipico_clock(utc(3200)), at(0)).unwrap();
    for _ in 0..2 {
        let t = talk.next_due().unwrap();
        talk.poll(Stamp { utc_us: t, monotonic_us: t }, false);
        talk.reply(&ipico_clock(utc(3200)), Stamp { utc_us: t, monotonic_us: t }).unwrap();
    }
    assert!(matches!(talk.clock, ClockJob::Idle { .. }), "measured only");
    let error = shared.clock.lock().unwrap().clock_error.clone().unwrap();
    assert!(error.contains("not synchronised"), "{error}");
    // The next check with a synchronised host sets it.
    let due = talk.next_due().unwrap();
    talk.poll(Stamp { utc_us: T0, monotonic_us: due }, true);
    assert!(matches!(talk.clock, ClockJob::Measuring { then: Then::Set, .. }));
}

/// Measure an Ultra clock that is right (its reply is at the whole second `ms` falls in).
fn measure_ultra(talk: &mut Talk, ms: i64) {
    assert_eq!(talk.poll(at(ms), true), vec![ultra::GET_CLOCK.to_vec()]);
    let reply = format!("{} (1)", utc(ms).format("%-H:%-M:%-S %-d-%-m-%Y"));
    assert_eq!(talk.reply(reply.as_bytes(), at(ms)), Ok(true));
}

fn ultra_line(index: u64, replayed: bool) -> Vec<u8> {
    format!("0,{},1170518701,698,1,-71,{},2,1,0000000000000000,0,{index}\n", 11000 + index % 1000, replayed as u8)
        .into_bytes()
}

#[test]
fn an_ultra_gap_is_rewound_by_index_and_ends_at_its_last_read() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(100), holes: Vec::new() };
    let mut c = cfg(Format::Ultra, ClockMode::Ignore, true);
    c.ultra_rewind_form = crate::config::UltraRewindForm::Ascii;
    let (mut talk, shared) = new(&c, recall);
    talk.connected(at(0), true);
    assert!(talk.poll(at(0), true).is_empty(), "nothing known to be missing yet");
    assert_eq!(talk.admit(None, &ultra_line(601, false), at(1), true, false), Admit::Live);
    assert_eq!(talk.poll(at(2), true), vec![b"600101\r600\n".to_vec()]);
    for i in 101..=600 {
        assert!(matches!(talk.admit(Some(T0 - 1000), &ultra_line(i, true), at(3), true, false), Admit::Replayed(_)));
    }
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!((r.state, r.reads, r.rewinds_total), (RewindState::Done, 500, 1), "{r:?}");
    assert_eq!(r.asked.as_deref(), Some("log 101..600"));
}

#[test]
fn an_ultra_rewind_that_stops_short_is_a_failure() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(10), holes: Vec::new() };
    let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    talk.admit(None, &ultra_line(21, false), at(0), true, false);
    talk.poll(at(0), true);
    talk.admit(Some(T0 - 1000), &ultra_line(11, true), at(10), true, false);
    talk.poll(at(10 + 29_000), true);
    assert_eq!(shared.rewind.lock().unwrap().state, RewindState::Running);
    talk.poll(at(10 + 30_000), true);
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!(r.state, RewindState::Failed);
    assert_eq!(r.error.as_deref(), Some("the reader replayed 1 of the 10 reads asked for"));
}

#[test]
fn a_restarted_ultra_log_is_not_rewound() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(5000), holes: Vec::new() };
    let (mut talk, _) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    talk.admit(None, &ultra_line(3, false), at(0), true, false);
    assert!(talk.poll(at(1), true).is_empty());
    talk.admit(None, &ultra_line(4, false), at(2), true, false);
    assert!(talk.poll(at(3), true).is_empty(), "and it goes on from its new index");
}

/// Measure an IPICO clock `offset_ms` fast with three quick round trips, from `t` ms on; returns
/// the time after.
fn measure_ipico(talk: &mut Talk, mut t: i64, offset_ms: i64) -> i64 {
    for _ in 0..IPICO_SAMPLES {
        assert_eq!(talk.poll(at(t), true), vec![ipico::get_clock().into_bytes()]);
        assert_eq!(talk.reply(&ipico_clock(utc(t + offset_ms)), at(t)), Ok(true));
        t += 1;
    }
    t
}

fn download_status(state: u8, extent: u32, progress: u32) -> Vec<u8> {
    let e = extent.to_be_bytes();
    let p = progress.to_be_bytes();
    ipico::frame(ipico::DOWNLOAD, &[state, e[1], e[2], e[3], p[1], p[2], p[3], 0, 0x59, 0x05, 0x8f, 0x03]).into_bytes()
}

/// Through the three download steps, from `t` ms on; returns the time after.
fn start_download(talk: &mut Talk, t: i64) -> i64 {
    assert_eq!(talk.poll(at(t), true), vec![ipico::download_init().into_bytes()]);
    assert_eq!(talk.reply(&download_status(1, 3, 0), at(t + 1)), Ok(true));
    assert_eq!(talk.poll(at(t + 2), true), vec![ipico::download_configure().into_bytes()]);
    talk.reply(&download_status(1, 3, 0), at(t + 3)).unwrap();
    assert_eq!(talk.poll(at(t + 4), true), vec![ipico::download_start().into_bytes()]);
    talk.reply(&download_status(3, 3, 0), at(t + 5)).unwrap();
    t + 6
}

#[test]
fn an_ipico_download_steps_filters_and_ends() {
    let since = T0 - 60_000_000;
    let recall = Recall { reader_time_us: Some(since), ultra_index: None, holes: Vec::new() };
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Measure, true), recall);
    talk.connected(at(0), true);
    let t = measure_ipico(&mut talk, 0, 0);
    let t = start_download(&mut talk, t);
    assert_eq!(
        talk.admit(Some(since - 1), b"", at(t), true, false),
        Admit::Drop,
        "older than what we have: yesterday's"
    );
    assert_eq!(
        talk.admit(Some(since), b"", at(t), true, false),
        Admit::Replayed(since),
        "the last we have: a repeat the store recognises"
    );
    assert_eq!(talk.admit(Some(since + 1), b"", at(t), true, false), Admit::Replayed(since + 1), "missed");
    assert_eq!(talk.admit(Some(T0 + 100_000), b"", at(t), true, false), Admit::Live, "made after we connected");
    assert_eq!(talk.admit(Some(T0 + 3_600_000_000), b"", at(t), true, false), Admit::Drop, "from the reader's future");
    talk.reply(&download_status(3, 3, 3), at(t + 1)).unwrap();
    assert_eq!(
        talk.poll(at(t + 2), true),
        vec![ipico::download_stop().into_bytes(), ipico::download_cleanup().into_bytes()],
        "the reader does not stop by itself"
    );
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!((r.state, r.reads, r.outside), (RewindState::Done, 1, 2));
    assert_eq!(
        talk.admit(Some(since - 1), b"", at(t + 3), true, false),
        Admit::Live,
        "after the download, every read is live"
    );
}

#[test]
fn live_reads_during_a_download_are_never_dropped_whatever_the_memory_holds() {
    // One stored record dated 2099 made the last live time we have meaningless before; now a
    // read's time is believed only near the host's, and live reads are told by their own time.
    let far = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap().timestamp_micros();
    let recall = Recall { reader_time_us: Some(T0 - 10_000_000), ultra_index: None, holes: Vec::new() };
    let (mut talk, _) = new(&cfg(Format::Ipico, ClockMode::Measure, true), recall);
    talk.connected(at(0), true);
    let t = measure_ipico(&mut talk, 0, 0);
    let t = start_download(&mut talk, t);
    for i in 0..116 {
        let now = t + i * 100;
        assert_eq!(talk.admit(Some(T0 + now * 1000), b"", at(now), true, false), Admit::Live, "live read {i}");
    }
    assert_eq!(talk.admit(Some(far), b"", at(t), true, false), Admit::Drop);
    // A reader an hour fast, clock = "set": the memory is downloaded by the clock that wrote it,
    // and set after; live reads during the download are live.
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Set, true), recall_an_hour_fast());
    talk.connected(at(0), true);
    let t = measure_ipico(&mut talk, 0, 3_600_000);
    assert!(matches!(talk.clock, ClockJob::Idle { .. }), "the set waits for the download");
    let t = start_download(&mut talk, t);
    for i in 0..99 {
        let now = t + i * 100;
        assert_eq!(talk.admit(Some(T0 + (now + 3_600_000) * 1000), b"", at(now), true, false), Admit::Live);
    }
    let missed = T0 + (3_600_000 - 5_000) * 1000;
    assert_eq!(talk.admit(Some(missed), b"", at(t), true, false), Admit::Replayed(missed), "made 5 s before we came");
    talk.reply(&download_status(3, 3, 3), at(t + 10_000)).unwrap();
    assert_eq!(shared.rewind.lock().unwrap().state, RewindState::Done);
    let sent = talk.poll(at(t + 10_001), true);
    assert!(sent.contains(&ipico::get_clock().into_bytes()), "then measured again, to set: {sent:?}");
}

fn recall_an_hour_fast() -> Recall {
    Recall { reader_time_us: Some(T0 + 3_600_000_000 - 60_000_000), ultra_index: None, holes: Vec::new() }
}

#[test]
fn a_download_that_is_not_answered_or_refused_gives_up_and_says_so() {
    let recall = Recall { reader_time_us: Some(T0 - 60_000_000), ultra_index: None, holes: Vec::new() };
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Measure, true), recall.clone());
    talk.connected(at(0), true);
    let t = measure_ipico(&mut talk, 0, 0);
    let mut sent = 0;
    for ms in (t..t + 60_000).step_by(100) {
        sent += talk.poll(at(ms), true).len();
    }
    assert_eq!(sent, STEP_ATTEMPTS as usize, "three tries, then no more");
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!(r.state, RewindState::Failed);
    assert!(r.error.as_deref().unwrap().starts_with("not supported"), "{r:?}");
    // An error reply: not supported, at once.
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Measure, true), recall.clone());
    talk.connected(at(0), true);
    let t = measure_ipico(&mut talk, 0, 0);
    talk.poll(at(t), true);
    assert_eq!(talk.reply(b"ab0000f258", at(t + 1)), Ok(true));
    assert!(shared.rewind.lock().unwrap().error.as_deref().unwrap().contains("refused"));
    assert!(talk.poll(at(t + 10_000), true).is_empty());
    // Without a measured clock, stored and live reads cannot be told apart: no download.
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    assert!(talk.poll(at(0), true).is_empty());
    assert!(shared.rewind.lock().unwrap().error.as_deref().unwrap().contains("not measured"));
}

#[test]
fn malformed_control_frames_are_rejected_and_counted() {
    let (mut talk, _) = new(&cfg(Format::Ipico, ClockMode::Measure, false), Recall::default());
    assert_eq!(talk.reply(b"ab0009022603060518554437274f", at(0)), Err(Reject::BadChecksum));
    assert_eq!(talk.reply(b"abzz", at(0)), Err(Reject::BadLength));
    assert_eq!(talk.reply(b"ab00", at(0)), Err(Reject::BadLength));
}

#[test]
fn an_ultra_flagged_read_is_replayed_only_inside_what_was_asked() {
    let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Ignore, false), Recall::default());
    talk.connected(at(0), true);
    // No rewind asked: a flagged line is not taken (it used to be stamped with its 1980 time).
    assert_eq!(talk.admit(Some(315_532_800_000_000), &ultra_line(5, true), at(1), true, false), Admit::Drop);
    assert_eq!(shared.rewind.lock().unwrap().outside_total, 1);
    // A gap 101..=110: indexes outside it are not taken; times are held between the reads
    // either side of the gap.
    let recall = Recall { reader_time_us: Some(T0 - 20_000_000), ultra_index: Some(100), holes: Vec::new() };
    let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    assert_eq!(talk.admit(Some(T0), &ultra_line(111, false), at(0), true, false), Admit::Live);
    talk.poll(at(1), true);
    assert_eq!(talk.admit(Some(T0 - 10_000_000), &ultra_line(99, true), at(2), true, false), Admit::Drop);
    let far = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap().timestamp_micros();
    assert_eq!(talk.admit(Some(far), &ultra_line(101, true), at(2), true, false), Admit::Replayed(T0));
    assert_eq!(talk.admit(Some(0), &ultra_line(102, true), at(2), true, false), Admit::Replayed(T0 - 20_000_000));
    assert_eq!(shared.rewind.lock().unwrap().outside, 1);
}

#[test]
fn ultra_gaps_are_bounded_and_index_arithmetic_is_checked() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(u64::MAX - 1), holes: Vec::new() };
    let (mut talk, _) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    assert_eq!(talk.admit(None, &ultra_line(u64::MAX, false), at(0), true, false), Admit::Live);
    assert_eq!(talk.admit(None, &ultra_line(3, false), at(0), true, false), Admit::Live, "a new log");
    for i in 0..1000u64 {
        talk.admit(None, &ultra_line(10 + 2 * i, false), at(0), true, false);
    }
    assert!(talk.gaps.len() <= MAX_GAPS, "{}", talk.gaps.len());
    // A jump beyond any log is a new log, not a rewind of a million reads.
    let (mut talk, _) =
        new(&cfg(Format::Ultra, ClockMode::Ignore, true), Recall { ultra_index: Some(5), ..Recall::default() });
    talk.connected(at(0), true);
    talk.admit(None, &ultra_line(5 + MAX_GAP_READS + 10, false), at(0), true, false);
    assert!(talk.gaps.is_empty());
}

#[test]
fn a_live_time_beyond_max_skew_is_not_believed_and_moves_nothing() {
    let recall = Recall { reader_time_us: Some(T0 - 1_000_000), ultra_index: None, holes: Vec::new() };
    let (mut talk, _) = new(&cfg(Format::Ipico, ClockMode::Ignore, false), recall);
    talk.connected(at(0), true);
    let day = 86_400_000_000;
    assert_eq!(talk.admit(Some(T0 + day + 1), b"", at(0), true, false), Admit::Retimed);
    assert_eq!(talk.recall.reader_time_us, Some(T0 - 1_000_000), "recall unmoved");
    assert_eq!(
        talk.admit(Some(T0 + day + 1), b"", at(0), false, false),
        Admit::Live,
        "unsynchronised host: no reference"
    );
    assert_eq!(talk.admit(Some(T0 - 5_000), b"", at(0), true, false), Admit::Live);
    assert_eq!(talk.recall.reader_time_us, Some(T0 - 5_000), "the last live read, not the newest");
}

#[test]
fn a_quiet_ultra_reconnect_asks_only_for_the_gap_after_live_reads() {
    // Live reads advance the start point of a rewind by time.
    let recall = Recall { reader_time_us: Some(T0 - 3_600_000_000), ultra_index: Some(1), holes: Vec::new() };
    let (mut talk, _) = new(&cfg(Format::Ultra, ClockMode::Measure, true), recall);
    talk.connected(at(0), true);
    assert_eq!(talk.admit(Some(T0), &ultra_line(2, false), at(0), true, false), Admit::Live);
    talk.disconnected(at(1));
    talk.connected(at(10), true);
    measure_ultra(&mut talk, 10);
    let sent: Vec<Vec<u8>> = (0..=6).flat_map(|s| talk.poll(at(10 + s * 1000), true)).collect();
    let local = crate::timestamp::utc_to_local(T0, chrono_tz::UTC).unwrap();
    let start = ultra::seconds_since_1980(local);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].starts_with(format!("800{start}\r").as_bytes()), "{:?}", String::from_utf8_lossy(&sent[0]));
}

#[test]
fn an_elite_replay_takes_only_since_its_start_up_to_our_connect() {
    let since = T0 - 60_000_000;
    let mut c = cfg(Format::Ipico, ClockMode::Measure, true);
    c.elite_control = Some("tcp://127.0.0.1:9".into());
    let (mut talk, shared) = new(&c, Recall { reader_time_us: Some(since), ultra_index: None, holes: Vec::new() });
    talk.connected(at(0), true);
    talk.poll(at(0), true);
    assert_eq!(talk.take_elite().len(), 1, "getdate");
    talk.elite_line(&format!("date.{}", utc(0).format("%a %b %e %H:%M:%S UTC %Y")), at(1));
    talk.poll(at(2), true);
    assert_eq!(talk.take_elite().len(), 1, "replay_start");
    assert_eq!(talk.admit(Some(since + 5), b"", at(1), true, true), Admit::Replayed(since + 5));
    assert_eq!(talk.admit(Some(since - 5), b"", at(1), true, true), Admit::Drop);
    assert_eq!(talk.admit(Some(T0 + 3_600_000_000), b"", at(1), true, true), Admit::Drop);
    assert_eq!(shared.rewind.lock().unwrap().outside, 2);
}

#[test]
fn a_rewind_is_stopped_after_its_longest_time() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(100), holes: Vec::new() };
    let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    talk.admit(None, &ultra_line(1000, false), at(0), true, false);
    talk.poll(at(1), true);
    // The reader keeps replaying (one read every 10 s keeps the idle timeout away).
    let mut i = 101;
    let mut ms = 0;
    while shared.rewind.lock().unwrap().state == RewindState::Running {
        ms += 10_000;
        talk.admit(Some(T0 - 1000), &ultra_line(i, true), at(ms), true, false);
        let sent = talk.poll(at(ms), true);
        if sent.contains(&ultra::STOP.to_vec()) {
            break;
        }
        i += 1;
        assert!(ms < 20 * 60_000, "never stopped");
    }
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!(r.state, RewindState::Failed);
    assert!(r.error.unwrap().contains("stopped after 15 min"));
}

#[test]
fn clock_replies_out_of_range_are_ignored_not_a_panic() {
    let mut c = cfg(Format::Ultra, ClockMode::Measure, true);
    c.timezone = "Asia/Tokyo".parse().unwrap();
    let (mut talk, shared) =
        new(&c, Recall { reader_time_us: Some(T0 - 1_000_000), ultra_index: None, holes: Vec::new() });
    talk.connected(at(0), true);
    talk.poll(at(0), true);
    for reply in ["12:00:00 1-1-+262142 (1)", "12:00:00 31-12-9999 (1)", "0:0:0 1-1--262143 (1)"] {
        let _ = talk.reply(reply.as_bytes(), at(1));
    }
    // Whatever was measured, the quiet rewind by time that follows does not panic.
    for s in 0..=12 {
        talk.poll(at(s * 1000), true);
    }
    let _ = shared.rewind.lock().unwrap().clone();
}

#[test]
fn recall_takes_the_last_believed_live_time_and_the_highest_index() {
    let read = |t: Option<i64>, received: i64, replayed: bool, raw: Vec<u8>| StoredRead {
        reader_time_us: t,
        received_at_us: received,
        clock_synced: true,
        replayed,
        raw,
    };
    let day = 86_400_000_000;
    // Newest first: a replayed read, a read dated two days ahead (not believed), then the last
    // live one.
    let rows = [
        read(Some(T0 - 50), T0, true, ultra_line(9, true)),
        read(Some(T0 + 2 * day), T0, false, b"junk".to_vec()),
        read(Some(T0 - 10), T0 - 10, false, ultra_line(7, false)),
        read(Some(T0 + 99), T0 - 20, false, ultra_line(6, false)),
    ];
    let r = Recall::from_reads(&rows, day);
    assert_eq!(r, Recall { reader_time_us: Some(T0 - 10), ultra_index: Some(9), holes: vec![(8, 8)] });
}

#[test]
fn impinj_takes_the_largest_lead_over_a_window() {
    let (mut talk, shared) = new(&cfg(Format::ImpinjJson, ClockMode::Measure, false), Recall::default());
    talk.connected(at(0), true);
    assert!(talk.poll(at(0), true).is_empty(), "nothing is sent to an Impinj");
    // Reader 2 s fast; latencies 30, 5, 80, 12, 50 ms; a window of 5 s.
    for (i, latency) in [30, 5, 80, 12, 50].into_iter().enumerate() {
        let arrival = 1200 * i as i64;
        talk.admit(Some(T0 + (arrival - latency + 2000) * 1000), b"", at(arrival), true, false);
    }
    assert_eq!(offset(&shared), None, "the window is not over");
    talk.admit(Some(T0 + (6000 - 40 + 2000) * 1000), b"", at(6000), true, false);
    assert_eq!(offset(&shared), Some(1995), "2 s less the shortest latency");
}

#[test]
fn an_ultra_is_asked_whether_it_reads_before_a_set() {
    for (answer, set) in [(&b"S=1,1,0"[..], false), (&b"S=0,1,0"[..], true)] {
        let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Set, false), Recall::default());
        talk.connected(at(0), true);
        assert_eq!(talk.poll(at(0), true), vec![b"r".to_vec()]);
        assert_eq!(talk.reply(b"20:26:43 28-5-2026 (0)", at(20)), Ok(true));
        assert_eq!(talk.poll(at(21), true), vec![b"?".to_vec()]);
        assert_eq!(talk.reply(answer, at(30)), Ok(true), "the status line is taken");
        assert_eq!(matches!(talk.clock, ClockJob::Setting { .. }), set);
        let error = shared.clock.lock().unwrap().clock_error.clone();
        assert_eq!(error.is_some_and(|e| e.contains("the Ultra is reading")), !set);
    }
}

#[test]
fn a_quiet_ultra_is_asked_by_time_since_the_newest_read() {
    let since = T0 - 60_000_000;
    let recall = Recall { reader_time_us: Some(since), ultra_index: Some(100), holes: Vec::new() };
    let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Measure, true), recall);
    talk.connected(at(0), true);
    measure_ultra(&mut talk, 0);
    assert_eq!(talk.next_due(), Some(at(5000).monotonic_us), "a live read may yet tell the gap");
    assert!(talk.poll(at(4999), true).is_empty());
    let from = ultra::seconds_since_1980(utc(-60_000).naive_utc());
    let to = ultra::seconds_since_1980(utc(5000 + 60_000).naive_utc());
    assert_eq!(talk.poll(at(5000), true), vec![format!("800{from}\r{to}\n").into_bytes()]);
    // The newest read we have comes again (a repeat, not counted), then two we missed.
    talk.admit(Some(since), &ultra_line(100, true), at(5100), true, false);
    talk.admit(Some(since + 1000), &ultra_line(101, true), at(5200), true, false);
    talk.admit(Some(since + 2000), &ultra_line(102, true), at(5300), true, false);
    assert!(talk.poll(at(5300 + 9_999), true).is_empty());
    talk.poll(at(5300 + 10_000), true);
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!((r.state, r.reads), (RewindState::Done, 2), "{r:?}");
    // The next live read follows what the replay brought: no gap to ask again.
    talk.admit(None, &ultra_line(103, false), at(20_000), true, false);
    assert!(talk.poll(at(20_001), true).is_empty());
}

#[test]
fn an_unfinished_download_starts_again_where_it_did() {
    let since = T0 - 60_000_000;
    let recall = Recall { reader_time_us: Some(since), ultra_index: None, holes: Vec::new() };
    let (mut talk, shared) = new(&cfg(Format::Ipico, ClockMode::Measure, true), recall);
    talk.connected(at(0), true);
    let t = measure_ipico(&mut talk, 0, 0);
    let t = start_download(&mut talk, t);
    // One replayed read, then a live one, then the line drops.
    assert_eq!(talk.admit(Some(since + 1), b"", at(t), true, false), Admit::Replayed(since + 1));
    assert_eq!(talk.admit(Some(T0 + t * 1000), b"", at(t), true, false), Admit::Live);
    talk.disconnected(at(t + 10));
    assert_eq!(shared.rewind.lock().unwrap().state, RewindState::Failed);
    let t = t + 20;
    talk.connected(at(t), true);
    let t = measure_ipico(&mut talk, t, 0);
    let t = start_download(&mut talk, t);
    assert_eq!(
        talk.admit(Some(since + 2), b"", at(t), true, false),
        Admit::Replayed(since + 2),
        "what the first download had yet to bring is taken now, though a live read came after it"
    );
}

#[test]
fn an_ultra_gap_cut_short_is_asked_again_at_the_next_connect_or_start() {
    let recall = Recall { reader_time_us: None, ultra_index: Some(10), holes: Vec::new() };
    let (mut talk, _) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    talk.admit(None, &ultra_line(21, false), at(0), true, false);
    assert_eq!(talk.poll(at(1), true), vec![b"60011\r20\n".to_vec()]);
    talk.admit(Some(T0 - 1000), &ultra_line(11, true), at(2), true, false);
    talk.disconnected(at(3));
    talk.connected(at(4), true);
    assert_eq!(talk.poll(at(5), true), vec![b"60011\r20\n".to_vec()], "the whole gap again");
    // After a restart: the holes among the stored indexes.
    let recall = Recall { reader_time_us: None, ultra_index: Some(21), holes: vec![(12, 20)] };
    let (mut talk, shared) = new(&cfg(Format::Ultra, ClockMode::Ignore, true), recall);
    talk.connected(at(0), true);
    assert_eq!(talk.poll(at(1), true), vec![b"60012\r20\n".to_vec()]);
    talk.poll(at(1 + 30_000), true);
    let r = shared.rewind.lock().unwrap().clone();
    assert_eq!((r.state, r.error), (RewindState::Done, None), "a hole that brings nothing is no failure");
}
