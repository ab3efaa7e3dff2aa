//! The box a person stands next to: a chip check (test session) that RUFUS never sees, and
//! `watch`, which follows every read without slowing the pipeline.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// Chip, antenna and RSSI, comma-separated.
const WITH_ANTENNA: &str = r#"reader.pattern = '^(?P<chip>[0-9A-F]{8}),(?P<antenna>\d+),(?P<rssi>-?\d+)$'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chip_check_reaches_nobody_and_the_race_after_it_starts_clean() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let dir = tempfile::tempdir().unwrap();
    let bibs = dir.path().join("bibs.csv");
    std::fs::write(&bibs, "chip,bib\nC0DE0000,100\nC0DE0001,101\nC0DE0002,102\n").unwrap();
    let extra = format!(
        "{WITH_ANTENNA}\npassings.bib_map = \"{}\"\npassings.dedup_window = \"3s\"\nhttp.listen = \"127.0.0.1:0\"",
        bibs.display()
    );
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;

    let out = gw.cli_ok(&["session", "start", "--test", "--alias", "CHECK"]);
    assert!(out.contains("test session") && out.contains("never sent"), "{out}");
    // Three mapped chips (one read twice, inside the window), one not in the bib map.
    write_lines(
        &mut pty,
        &[
            "C0DE0000,1,-60".into(),
            "C0DE0001,2,-55".into(),
            "C0DE0000,1,-58".into(),
            "C0DE0002,3,-70".into(),
            "C0DE00FF,4,-80".into(),
        ],
    );
    let s = gw.wait_status("four test passings", |s| s["session"]["passings"] == 4).await;
    assert_eq!(s["session"]["test"], true);
    assert_eq!(s["session"]["remote_state"], "local");
    assert_eq!(s["queue"]["pending"], 0, "a chip check waits for nothing");
    let problems = s["problems"].to_string();
    assert!(problems.contains("TEST SESSION"), "{problems}");
    let human = gw.cli_ok(&["status"]);
    assert!(human.contains("TEST"), "{human}");

    // Bibs as the bib map says, the chip where it has none; counts per chip.
    let id = s["session"]["id"].as_i64().unwrap();
    let passings: Vec<(String, String)> =
        gw.db().passings_since(id, 0, 100).unwrap().into_iter().map(|p| (p.chip, p.bib)).collect();
    assert_eq!(
        passings,
        [("C0DE0000", "100"), ("C0DE0001", "101"), ("C0DE0002", "102"), ("C0DE00FF", "C0DE00FF")]
            .map(|(c, b)| (c.to_string(), b.to_string()))
    );
    let list: Value = serde_json::from_str(&gw.cli_ok(&["session", "list", "--json"])).unwrap();
    assert_eq!(list[0]["test"], true);
    assert_eq!(list[0]["remote_state"], "local");

    // The dashboard's chip check: the latest reads (newest first) and a count per chip.
    let url = format!("http://{}/api/chipcheck", s["listening"]["http"].as_str().unwrap());
    let check: Value = http_client().get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(check["test"], true);
    let reads: Vec<(String, Value, Value, Value)> = check["reads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["chip"].as_str().unwrap().to_string(), r["bib"].clone(), r["antenna"].clone(), r["passing"].clone())
        })
        .collect();
    assert_eq!(
        reads,
        [
            ("C0DE00FF".into(), Value::Null, 4.into(), 4.into()),
            ("C0DE0002".into(), "102".into(), 3.into(), 3.into()),
            ("C0DE0000".into(), "100".into(), 1.into(), Value::Null),
            ("C0DE0001".into(), "101".into(), 2.into(), 2.into()),
            ("C0DE0000".into(), "100".into(), 1.into(), 1.into()),
        ],
        "not in the bib map: null; a repeat: no passing"
    );
    let counts: Vec<(String, i64, i64)> = check["chips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (c["chip"].as_str().unwrap().to_string(), c["reads"].as_i64().unwrap(), c["best_rssi"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("C0DE00FF".into(), 1, -80),
            ("C0DE0002".into(), 1, -70),
            ("C0DE0000".into(), 2, -58),
            ("C0DE0001".into(), 1, -55)
        ]
    );
    let per_antenna: Vec<(i64, i64)> = s["reader"]["antennas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["antenna"].as_i64().unwrap(), a["reads_total"].as_i64().unwrap()))
        .collect();
    assert_eq!(per_antenna, [(1, 2), (2, 1), (3, 1), (4, 1)]);

    // A race session started now closes the chip check and numbers from 1.
    gw.cli_ok(&["session", "start", "--alias", "RACE"]);
    let list: Value = serde_json::from_str(&gw.cli_ok(&["session", "list", "--json"])).unwrap();
    assert_eq!((list[0]["state"].as_str(), list[0]["remote_state"].as_str()), (Some("closed"), Some("local")));
    let check: Value = http_client().get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(check, serde_json::json!({ "test": false }));
    write_lines(&mut pty, &["C0DE0001,2,-50".into(), "C0DE0005,1,-50".into()]);
    wait_fake(&fake, &gw, "the race's two passings", |s| s.total_passings() == 2).await;
    {
        let state = fake.state();
        let race = state.session_by_alias("RACE");
        assert_eq!(race.len(), 1);
        let nums: Vec<i64> = race[0].passings.keys().copied().collect();
        assert_eq!(nums, [1, 2], "the race starts clean");
        // The API never heard of the chip check.
        assert!(state.session_by_alias("CHECK").is_empty());
        assert!(
            state.requests.iter().all(|r| !r.path.contains("CHECK")),
            "no request names the test session: {:?}",
            state.requests
        );
    }
    // A chip check during the race is refused, with the reason.
    let refused = gw.cli(&["session", "start", "--test"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("race session") && why.contains("session close"), "{why}");
    assert_eq!(gw.status()["session"]["alias"], "RACE");
}

/// A `watch --json` child process, and its output lines.
struct Watcher {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watcher {
    async fn start(gw: &Gateway) -> Watcher {
        let watchers = gw.logs().matches("a watcher follows the reads").count();
        let mut child = Command::new(BIN)
            .arg("-c")
            .arg(&gw.config)
            .args(["watch", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // Subscribed once the daemon says so.
        let deadline = Instant::now() + DEADLINE;
        while gw.logs().matches("a watcher follows the reads").count() == watchers {
            assert!(Instant::now() < deadline, "the watcher did not connect; log:\n{}", gw.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Watcher { child, lines }
    }

    /// The next `n` read lines (summaries skipped).
    fn reads(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + DEADLINE;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("only {} of {n} reads seen", out.len()));
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["summary"] != true {
                out.push(v);
            }
        }
        out
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `lines` and wait until the store holds `total` reads; returns the gateway's CPU ticks spent.
async fn burst(gw: &Gateway, pty: &mut rufus_gateway::demo::pty::Pty, lines: &[String], total: i64) -> u64 {
    let pid = gw.pid();
    let before = usage(pid).cpu_ticks;
    write_lines(pty, lines);
    gw.wait_status("the burst stored", |s| s["reader"]["reads_total"].as_i64() == Some(total)).await;
    // The store has committed them once the session's passings are there too.
    let deadline = Instant::now() + DEADLINE;
    while gw.db().reads_since(0).unwrap() < total {
        assert!(Instant::now() < deadline, "reads not committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    usage(pid).cpu_ticks - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_every_read_of_a_burst_in_order_and_a_stalled_one_slows_nothing() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = format!("{WITH_ANTENNA}\npassings.dedup_window = \"1h\"");
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "WATCHED"]);
    // 2,000 reads: 1,500 chips, the first 500 of them read again (repeats inside the window).
    let make = |round: u32| -> Vec<String> {
        let chips = chips(round * 10_000..round * 10_000 + 1500);
        chips
            .iter()
            .chain(chips[..500].iter())
            .enumerate()
            .map(|(i, c)| format!("{c},{},-{}", i % 4 + 1, 40 + i % 30))
            .collect()
    };

    // Nobody watching: the baseline.
    let mut quiet = 0;
    for round in 0..3 {
        quiet += burst(&gw, &mut pty, &make(round), 2000 * (i64::from(round) + 1)).await;
    }
    let quiet = quiet as f64 / 3.0;

    // One watcher: every read, in order, with what it became.
    let watcher = Watcher::start(&gw).await;
    let lines = make(3);
    let watched_cpu = burst(&gw, &mut pty, &lines, 8000).await;
    let seen = watcher.reads(2000);
    let chips_seen: Vec<String> = seen.iter().map(|v| v["chip"].as_str().unwrap().to_string()).collect();
    let chips_sent: Vec<String> = lines.iter().map(|l| l.split(',').next().unwrap().to_string()).collect();
    assert_eq!(chips_seen, chips_sent, "every read, in order");
    let passings: Vec<Option<i64>> = seen.iter().map(|v| v["passing"].as_i64()).collect();
    let expected: Vec<Option<i64>> = (4501..=6000).map(Some).chain(std::iter::repeat_n(None, 500)).collect();
    assert_eq!(passings, expected, "fresh chips numbered on from the bursts before, repeats null");
    assert_eq!(seen[0]["antenna"], 1);
    assert_eq!(seen[0]["rssi"], -40);
    assert_eq!(seen[0]["bib"], Value::Null, "no bib map: unmapped");
    drop(watcher);

    // A watcher that asks and then never reads: the pipeline goes on as before.
    let mut stalled = std::os::unix::net::UnixStream::connect(&gw.socket).unwrap();
    stalled.write_all(b"{\"command\":\"watch\"}\n").unwrap();
    let watchers = gw.logs().matches("a watcher follows the reads").count();
    let deadline = Instant::now() + DEADLINE;
    while gw.logs().matches("a watcher follows the reads").count() < watchers.max(2) {
        assert!(Instant::now() < deadline, "the stalled watcher did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut stalled_cpu = 0;
    for round in 4..7 {
        stalled_cpu += burst(&gw, &mut pty, &make(round), 2000 * (i64::from(round) + 1)).await;
    }
    let stalled_cpu = stalled_cpu as f64 / 3.0;
    wait_fake(&fake, &gw, "every passing delivered", |s| s.total_passings() == 7 * 1500).await;
    println!(
        "gateway CPU per 2,000-read burst (10 ms ticks): nobody watching {quiet:.1} (mean of 3), one watcher {watched_cpu}, a stalled watcher {stalled_cpu:.1} (mean of 3)"
    );
    drop(stalled);

    // The daemon stops: the watch ends by itself, saying so (exit 69, as for a daemon not running).
    let mut watcher = Watcher::start(&gw).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let deadline = Instant::now() + DEADLINE;
    let code = loop {
        if let Some(status) = watcher.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "watch did not end with the daemon");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(69));
}

/// Keep antennas `reading` busy (one read each per round) until `cond` holds on the status.
async fn read_until(
    gw: &Gateway,
    pty: &mut rufus_gateway::demo::pty::Pty,
    reading: &[i64],
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + DEADLINE;
    let mut n = 0u32;
    loop {
        for a in reading {
            n += 1;
            write_lines(pty, &[format!("{:08X},{a},-50", 0xA000_0000u32 + n)]);
        }
        if let Some(s) = gw.try_status()
            && cond(&s)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}\nlog:\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn silent(s: &Value, antenna: i64) -> bool {
    s["reader"]["antennas"]
        .as_array()
        .is_some_and(|all| all.iter().any(|a| a["antenna"] == antenna && a["silent"] == true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_antenna_is_reported_within_its_window_and_cleared_when_it_reads() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = format!(
        "{WITH_ANTENNA}\nreader.antennas = [1, 2, 3]\nreader.antenna_silence = \"2s\"\nhttp.listen = \"127.0.0.1:0\""
    );
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    // A listed antenna that never read is silent from the start (once the others read).
    let started = Instant::now();
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "MATS"]);
    let listed = gw.status();
    let numbers: Vec<i64> =
        listed["reader"]["antennas"].as_array().unwrap().iter().map(|a| a["antenna"].as_i64().unwrap()).collect();
    assert_eq!(numbers, [1, 2, 3], "listed antennas are shown before they read");

    // Antenna 3 never reads while 1 and 2 do: a problem once its window has passed.
    let s = read_until(&gw, &mut pty, &[1, 2], "antenna 3 silent", |s| silent(s, 3)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "not before its window: {took:?}");
    assert!(!silent(&s, 1) && !silent(&s, 2));
    let problems = s["problems"].to_string();
    assert!(problems.contains("ANTENNA 3 SILENT"), "{problems}");
    let a1 = &s["reader"]["antennas"][0];
    assert!(a1["reads_total"].as_u64().unwrap() > 0 && a1["reads_last_minute"].as_u64().unwrap() > 0, "{a1}");
    assert!(a1["last_read_at"].is_string());
    let url = format!("http://{}", s["listening"]["http"].as_str().unwrap());
    let metrics = http_client().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("rufus_antenna_silent{antenna=\"3\"} 1"), "{metrics}");
    assert!(metrics.contains("rufus_antenna_silent{antenna=\"1\"} 0"), "{metrics}");

    // It reads: cleared at once, and said so.
    let s = read_until(&gw, &mut pty, &[1, 2, 3], "antenna 3 reading again", |s| !silent(s, 3)).await;
    assert!(!s["problems"].to_string().contains("ANTENNA"), "{}", s["problems"]);
    // Antenna 2 goes quiet now; 1 and 3 read on.
    read_until(&gw, &mut pty, &[1, 3], "antenna 2 silent", |s| silent(s, 2)).await;
    let log = gw.logs();
    assert_eq!(log.matches("ANTENNA SILENT").count(), 2, "once per silence:\n{log}");
    assert_eq!(log.matches("antenna reads again").count(), 1, "{log}");
}

/// A stand-in LED-class device: `brightness` is a FIFO, so every value the daemon writes is seen,
/// with the time it arrived (no sampling to miss a 60 ms blip).
struct FakeLed {
    dir: std::path::PathBuf,
    writes: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
}

impl FakeLed {
    fn new(leds: &std::path::Path, name: &str, max: &str, trigger: &str) -> FakeLed {
        let dir = leds.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("max_brightness"), format!("{max}\n")).unwrap();
        std::fs::write(dir.join("trigger"), format!("{trigger}\n")).unwrap();
        let brightness = dir.join("brightness");
        nix::unistd::mkfifo(&brightness, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Read and write: opening never blocks, and the daemon's opens for writing find a reader.
        let fifo = std::fs::OpenOptions::new().read(true).write(true).open(&brightness).unwrap();
        let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = writes.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(fifo).lines().map_while(Result::ok) {
                log.lock().unwrap().push((Instant::now(), line));
            }
        });
        FakeLed { dir, writes }
    }

    /// Writes in [from, from + span), with the time each was read.
    fn timed_between(&self, from: Instant, span: Duration) -> Vec<(Instant, String)> {
        self.writes.lock().unwrap().iter().filter(|(t, _)| *t >= from && *t < from + span).cloned().collect()
    }

    /// Values written in [from, from + span).
    fn between(&self, from: Instant, span: Duration) -> Vec<String> {
        self.timed_between(from, span).into_iter().map(|(_, v)| v).collect()
    }

    fn last(&self) -> Option<String> {
        self.writes.lock().unwrap().last().map(|(_, v)| v.clone())
    }

    fn trigger(&self) -> String {
        std::fs::read_to_string(self.dir.join("trigger")).unwrap().trim().to_string()
    }
}

/// Wait for the LED pattern the daemon reports, then watch the LED itself for `span`: the number
/// of changes and the level it ended at.
async fn observe(gw: &Gateway, led: &FakeLed, pattern: &str, span: Duration) -> (usize, Option<String>) {
    gw.wait_status(&format!("LED pattern {pattern}"), |s| s["signal"]["led_pattern"] == pattern).await;
    // The window opens a moment after the pattern is reported: writes of the pattern before it,
    // which the FIFO's reader thread may take late on a loaded machine, fall outside.
    tokio::time::sleep(SETTLE).await;
    let from = Instant::now();
    tokio::time::sleep(span).await;
    (edges(&led.timed_between(from, span)), led.last())
}

/// How long a pattern is left to settle before it is watched.
const SETTLE: Duration = Duration::from_millis(500);

/// Changes of level: writes less than 20 ms apart (the fastest pattern changes every 125 ms)
/// are one change that the FIFO's reader took late, in one read.
fn edges(writes: &[(Instant, String)]) -> usize {
    writes.windows(2).filter(|w| w[1].0 - w[0].0 >= Duration::from_millis(20)).count() + usize::from(!writes.is_empty())
}

/// Rising edges (beeps) written in [from, now).
fn beeps(beeper: &FakeLed, from: Instant) -> usize {
    beeper.between(from, from.elapsed()).iter().filter(|v| *v != "0").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_led_and_beeper_show_each_state_and_are_given_back_on_stop() {
    let (fake, device) = fake().await;
    let leds = tempfile::tempdir().unwrap();
    let led = FakeLed::new(leds.path(), "ACT", "255", "none [mmc0] timer heartbeat");
    let beeper = FakeLed::new(leds.path(), "buzzer", "1", "[none] timer");
    let flag = leds.path().join("synchronized");
    std::fs::write(&flag, "").unwrap();
    let link = leds.path().join("reader");
    let first = pty();
    std::os::unix::fs::symlink(&first.path, &link).unwrap();
    let extra = format!(
        "reader.pattern = '^(?P<chip>[0-9A-F]{{8}}),(?P<timestamp>[^,]+)$'\nreader.timestamps = \"reader\"\n\
         clock.source = \"timesyncd\"\nclock.timesyncd_flag = \"{}\"\n\
         signal.led = \"ACT\"\nsignal.beeper = \"buzzer\"\nsignal.leds_dir = \"{}\"",
        flag.display(),
        leds.path().display()
    );
    let mut gw = Gateway::new(&fake, &device, &link.display().to_string(), &extra);
    gw.start().await;
    assert_eq!(led.trigger(), "none", "the LED's trigger is taken over");
    let stamp = |ago: i64| (chrono::Utc::now() - chrono::Duration::seconds(ago)).to_rfc3339();

    // No session yet: attention (slow). A race session and all well: steady on.
    let (changes, _) = observe(&gw, &led, "slow", Duration::from_secs(2)).await;
    assert!((3..=5).contains(&changes), "1 Hz: {changes} changes in 2 s");
    gw.cli_ok(&["session", "start", "--alias", "RACE"]);
    let (changes, level) = observe(&gw, &led, "steady", Duration::from_millis(1500)).await;
    assert_eq!((changes, level.as_deref()), (0, Some("255")), "steady on");

    // A passing: a blip (off, on again); no beep in a race with beep_on_passing = "test".
    let mut first = first;
    let sent = Instant::now();
    write_lines(&mut first, &[format!("C0DE0001,{}", stamp(0))]);
    gw.wait_status("the passing", |s| s["session"]["passings"] == 1).await;
    let blip = {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let seen = led.between(sent, sent.elapsed());
            if seen.len() >= 2 {
                break seen;
            }
            assert!(Instant::now() < deadline, "no blip: {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert_eq!(blip[..2], ["0", "255"], "a blip is a short off");
    assert_eq!(beeps(&beeper, sent), 0);

    // The reader unplugged during the race: fast blink, and the alarm (three beeps).
    std::fs::remove_file(&link).unwrap();
    let unplugged = Instant::now();
    drop(first);
    let (changes, _) = observe(&gw, &led, "fast", Duration::from_secs(2)).await;
    assert!((12..=20).contains(&changes), "4 Hz: {changes} changes in 2 s");
    let deadline = Instant::now() + DEADLINE;
    while beeps(&beeper, unplugged) < 3 {
        assert!(Instant::now() < deadline, "no alarm: {:?}", beeper.between(unplugged, unplugged.elapsed()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(beeps(&beeper, unplugged), 3, "three beeps, then quiet until the next round (30 s)");
    // Plugged back: steady again.
    let mut second = pty();
    std::os::unix::fs::symlink(&second.path, &link).unwrap();
    let (changes, _) = observe(&gw, &led, "steady", Duration::from_secs(1)).await;
    assert_eq!(changes, 0);

    // The API stopped with a passing read 90 s ago waiting: slow. Back: steady.
    fake.stop_listening();
    write_lines(&mut second, &[format!("C0DE0002,{}", stamp(90))]);
    let (changes, _) = observe(&gw, &led, "slow", Duration::from_secs(2)).await;
    assert!((3..=5).contains(&changes), "1 Hz: {changes} changes in 2 s");
    fake.resume().await.unwrap();
    observe(&gw, &led, "steady", Duration::from_millis(500)).await;

    // The clock loses synchronisation: slow. Back: steady.
    std::fs::remove_file(&flag).unwrap();
    let (changes, _) = observe(&gw, &led, "slow", Duration::from_secs(2)).await;
    assert!((3..=5).contains(&changes), "1 Hz: {changes} changes in 2 s");
    std::fs::write(&flag, "").unwrap();
    observe(&gw, &led, "steady", Duration::from_millis(500)).await;

    // A chip check: one beep per passing.
    gw.cli_ok(&["session", "close"]);
    gw.cli_ok(&["session", "start", "--test"]);
    let checked = Instant::now();
    for i in 0..3 {
        write_lines(&mut second, &[format!("C0DE01{i:02},{}", stamp(0))]);
        gw.wait_status("the chip's passing", |s| s["session"]["passings"] == i + 1).await;
    }
    let deadline = Instant::now() + DEADLINE;
    while beeps(&beeper, checked) < 3 {
        assert!(Instant::now() < deadline, "beeps: {:?}", beeper.between(checked, checked.elapsed()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.status()["signal"]["beeps_total"], 3);

    // A clean stop: off, and the LED's own trigger back.
    assert_eq!(gw.terminate().await.code(), Some(0));
    let deadline = Instant::now() + DEADLINE;
    while led.last().as_deref() != Some("0") {
        assert!(Instant::now() < deadline, "the LED was left on");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(led.trigger(), "mmc0", "its trigger is given back");
    assert_eq!(beeper.last().as_deref(), Some("0"));
}
