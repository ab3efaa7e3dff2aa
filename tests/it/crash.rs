//! Crash safety: the real binary is killed with SIGKILL a dozen times at random moments while
//! reads stream in through a pseudo-terminal and uploads run. Afterwards every committed passing
//! must be on the server exactly once per `num_passing`, numbered without gaps, and the reads
//! that were lost must all have been in flight around a kill.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

const KILLS: usize = 12;
const LINES: u32 = 6000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_committed() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = "reader.pattern = '^(?P<chip>[0-9A-F]{8})$'\napi.batch_size = 25\nlog.level = \"info\"";
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), extra);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "CRASH"]);

    // The reader: distinct chips at ~1 per 2 ms, each with the time it was written.
    let written: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut pty_tail = rufus_gateway::demo::pty::Pty::from_file(pty.try_clone().unwrap(), pty.path.clone());
    let writer = {
        let (written, done) = (written.clone(), done.clone());
        std::thread::spawn(move || {
            for chip in chips(0..LINES) {
                // The time the line was handed to the kernel (a write blocks while the pty is full).
                pty.write(format!("{chip}\n").as_bytes()).unwrap();
                written.lock().unwrap().insert(chip.clone(), Instant::now());
                std::thread::sleep(Duration::from_millis(2));
            }
            done.store(true, Ordering::Relaxed);
        })
    };

    // Kill at random moments (the pauses are the randomness, not synchronisation).
    let mut outages: Vec<(Instant, Instant)> = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(150 + fastrand::u64(0..600))).await;
        let killed = Instant::now();
        gw.kill9();
        gw.start().await;
        outages.push((killed, Instant::now()));
    }
    let all_written = fake.wait_for(Duration::from_secs(60), "writer done", |_| done.load(Ordering::Relaxed)).await;
    all_written.unwrap();
    writer.join().unwrap();
    // A last read after everything else: once it is delivered, every earlier byte was processed.
    let sentinel = "FFFFFFFF";
    pty_tail.write(format!("{sentinel}\n").as_bytes()).unwrap();
    wait_fake(&fake, &gw, "the sentinel delivered", |s| {
        s.sessions.iter().any(|x| x.passings.values().any(|p| p.chip.as_deref() == Some(sentinel)))
    })
    .await;
    let status = gw
        .wait_status("queue drained", |s| s["queue"]["pending"] == 0 && s["reader"]["reads_total"].as_u64().is_some())
        .await;
    gw.terminate().await;

    // What the gateway committed.
    let db = gw.db();
    let sql = gw.sql();
    let sessions = db.sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    let mut stmt = sql.prepare("SELECT num_passing, chip, timestamp FROM passings ORDER BY num_passing").unwrap();
    let committed: Vec<(i64, String, i64)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect();
    let n = committed.len() as i64;
    assert_eq!(committed.iter().map(|c| c.0).collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>(), "gap-free numbering");
    assert_eq!(sessions[0].delivered, n);

    // What the server holds: exactly the committed passings, each number once, same content.
    let state = fake.state();
    assert_eq!(state.sessions.len(), 1, "one remote session across {KILLS} crashes");
    let remote = &state.sessions[0];
    let missing: Vec<i64> = (1..=n).filter(|k| !remote.passings.contains_key(k)).collect();
    assert!(
        missing.is_empty(),
        "committed passings missing on the server: {missing:?} (conflicts {}); log:\n{}",
        remote.conflicts,
        gw.logs()
    );
    assert_eq!(remote.passings.len() as i64, n, "every committed passing reached the API");
    for (num, chip, ts) in &committed {
        let p = &remote.passings[num];
        assert_eq!(p.chip.as_deref(), Some(chip.as_str()));
        assert_eq!(p.timestamp, rufus_gateway::clock::api_timestamp(*ts));
    }
    assert_eq!(remote.conflicts, 0, "no num_passing was ever reused for another passing");

    // Reads lost: written but never committed. Each must have been written around a kill.
    let written = written.lock().unwrap();
    let stored: std::collections::HashSet<&str> = committed.iter().map(|c| c.1.as_str()).collect();
    let mut lost_per_kill: BTreeMap<usize, usize> = BTreeMap::new();
    // A read can be lost only if it was in flight when the process died: read but not yet
    // committed (the 50 ms commit interval), or still in the tty's input queue, which the kernel
    // discards when the port's last reader dies. Typically within 60 ms of the kill (the figure is
    // printed); 1 s of slack keeps a loaded CI machine from failing the test, and still proves
    // that nothing is lost away from a crash.
    let before = Duration::from_secs(1);
    let after = Duration::from_millis(50);
    let mut offsets: Vec<i64> = Vec::new();
    for (chip, at) in written.iter().filter(|(c, _)| !stored.contains(c.as_str())) {
        let kill = outages.iter().position(|(killed, ready)| *at + before >= *killed && *at <= *ready + after);
        let Some(k) = kill else {
            let in_reads: i64 =
                sql.query_row("SELECT count(*) FROM reads WHERE chip = ?1", [chip], |r| r.get(0)).unwrap();
            let near: Vec<String> = outages
                .iter()
                .map(|(k, r)| format!("kill {:+} ms / ready {:+} ms", ms(*at, *k), ms(*at, *r)))
                .collect();
            panic!(
                "chip {chip} lost although written far from any kill (rows in reads: {in_reads}); relative to the outages: {near:?}"
            )
        };
        *lost_per_kill.entry(k).or_default() += 1;
        let killed = outages[k].0;
        offsets.push(if *at <= killed {
            -((killed - *at).as_millis() as i64)
        } else {
            (*at - killed).as_millis() as i64
        });
    }
    let lost: usize = lost_per_kill.values().sum();
    offsets.sort();
    println!(
        "lost reads were written between {} ms and {} ms relative to their kill",
        offsets.first().copied().unwrap_or(0),
        offsets.last().copied().unwrap_or(0)
    );
    println!(
        "{KILLS} kills: {} lines written, {n} passings committed and delivered once each, {} resent passings reported as duplicates by the server, {lost} reads lost (per kill: {lost_per_kill:?}); rejected fragments: {}",
        written.len(),
        remote.duplicates,
        status["reader"]["rejected_total"]
    );
}

/// Milliseconds from `a` to `b` (negative when `b` is earlier).
fn ms(a: Instant, b: Instant) -> i64 {
    if b >= a { (b - a).as_millis() as i64 } else { -((a - b).as_millis() as i64) }
}
