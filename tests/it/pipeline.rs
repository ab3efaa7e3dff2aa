//! End to end: pseudo-terminal → real binary → fake RUFUS API. Sessions, offline operation,
//! restarts and shutdown.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rufus_gateway::demo::fake_api::{Fault, Route};

use crate::common::*;

const STRICT_CHIP: &str = r#"reader.pattern = '^(?P<chip>[0-9A-F]{8})$'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_chips_become_numbered_passings_in_one_remote_session() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    let out = gw.cli_ok(&["session", "start", "--alias", "FINISH"]);
    assert!(out.contains("FINISH"), "{out}");

    let chips = chips(0..300);
    let mut written_at: Vec<DateTime<Utc>> = Vec::new();
    for (i, chip) in chips.iter().enumerate() {
        written_at.push(Utc::now());
        pty.write(format!("{chip}\r\n").as_bytes()).unwrap();
        // Repeats inside the de-duplication window must not make extra passings.
        if i % 10 == 0 {
            pty.write(format!("{chip}\n{chip}\n").as_bytes()).unwrap();
        }
    }
    wait_fake(&fake, &gw, "300 passings delivered", |s| s.total_passings() == 300).await;
    let status = gw.wait_status("status shows 300 delivered", |s| s["queue"]["delivered"] == 300).await;
    assert_eq!(status["queue"]["pending"], 0);
    assert_eq!(status["session"]["alias"], "FINISH");
    assert_eq!(status["session"]["remote_state"], "open");
    assert_eq!(status["reader"]["connected"], true);
    assert_eq!(status["reader"]["reads_total"], 360);
    assert_eq!(status["uplink"]["state"], "online");

    let mut lags_ms: Vec<i64> = Vec::new();
    {
        let state = fake.state();
        assert_eq!(state.sessions.len(), 1, "one remote session");
        let session = &state.sessions[0];
        assert_eq!(session.alias, "FINISH");
        assert_eq!(session.passings.keys().copied().collect::<Vec<_>>(), (1..=300).collect::<Vec<i64>>());
        for (num, p) in &session.passings {
            let i = (*num - 1) as usize;
            assert_eq!(p.chip.as_deref(), Some(chips[i].as_str()), "passing {num} in read order");
            assert_eq!(p.bib, chips[i], "bib = chip without a bib map");
            let ts: DateTime<Utc> = p.timestamp.parse().unwrap();
            lags_ms.push((ts - written_at[i]).num_milliseconds());
        }
        assert!(state.violations.is_empty(), "strict API checks: {:?}", state.violations);
    }
    // Host timestamps: taken when the first byte arrived (ms precision on the wire).
    lags_ms.sort();
    let median = lags_ms[lags_ms.len() / 2];
    let max = *lags_ms.last().unwrap();
    println!("host timestamp minus write time: median {median} ms, min {} ms, max {max} ms", lags_ms[0]);
    assert!(lags_ms[0] >= -1, "a timestamp before its line was written: {lags_ms:?}");
    // How soon a line is stamped is the speed of the machine: under qemu-user (packaging/cross.sh
    // --test) every instruction is translated, so only the order above is checked there.
    if std::env::var_os("RUFUS_GATEWAY_EMULATED").is_none() {
        assert!((-1..=5).contains(&median), "median lag {median} ms");
        assert!(max <= 250, "lags {lags_ms:?}");
    }

    let out = gw.cli_ok(&["session", "close"]);
    assert!(out.contains("closing"), "{out}");
    wait_fake(&fake, &gw, "remote session closed", |s| !s.sessions[0].active).await;
    let status = gw.wait_status("session closed locally", |s| null(s, "session")).await;
    assert_eq!(status["queue"]["delivered"], 300);
    assert_eq!(gw.terminate().await.code(), Some(0), "SIGTERM exits 0");
}

/// The API refuses connections, then comes back: everything arrives, in order, in one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_session_start_then_catch_up_when_the_api_returns() {
    let (fake, device) = fake().await;
    fake.stop_listening();
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    let out = gw.cli_ok(&["session", "start", "--alias", "OFFLINE"]);
    assert!(out.contains("pending"), "remote state is pending: {out}");
    write_lines(&mut pty, &chips(0..80));
    let status = gw.wait_status("80 passings pending while offline", |s| s["queue"]["pending"] == 80).await;
    assert_eq!(status["session"]["remote_state"], "pending");
    gw.wait_status("uplink offline", |s| s["uplink"]["state"] == "offline").await;

    fake.resume().await.unwrap();
    let back = Instant::now();
    wait_fake(&fake, &gw, "80 passings delivered after the outage", |s| s.total_passings() == 80).await;
    let catch_up = back.elapsed();
    println!("caught up {:.2} s after the API came back", catch_up.as_secs_f64());
    assert!(catch_up < Duration::from_secs(10), "caught up within seconds: {catch_up:?}");
    let state = fake.state();
    assert_eq!(state.sessions.len(), 1);
    assert_eq!(state.sessions[0].alias, "OFFLINE");
    assert_eq!(state.sessions[0].passings.keys().copied().collect::<Vec<_>>(), (1..=80).collect::<Vec<i64>>());
}

/// The API accepts connections and never answers: the same, through timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_never_answers_is_offline_and_nothing_is_lost() {
    let (fake, device) = fake().await;
    fake.state().hang_all = true;
    let mut pty = pty();
    let mut gw = Gateway::new(
        &fake,
        &device,
        &pty.path.display().to_string(),
        &format!("{STRICT_CHIP}\napi.timeout = \"500ms\""),
    );
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "HANG"]);
    write_lines(&mut pty, &chips(0..40));
    gw.wait_status("40 pending, uplink offline", |s| s["queue"]["pending"] == 40 && s["uplink"]["state"] == "offline")
        .await;
    fake.state().hang_all = false;
    let back = Instant::now();
    wait_fake(&fake, &gw, "40 passings delivered", |s| s.total_passings() == 40).await;
    println!("caught up {:.2} s after the API answered again", back.elapsed().as_secs_f64());
    let state = fake.state();
    // Hung create requests may have produced extra (empty) remote sessions; the passings are in the last one.
    let with_passings: Vec<_> = state.sessions.iter().filter(|s| !s.passings.is_empty()).collect();
    assert_eq!(with_passings.len(), 1);
    assert_eq!(with_passings[0].passings.keys().copied().collect::<Vec<_>>(), (1..=40).collect::<Vec<i64>>());
}

/// Restart: same open session, same counters; numbering continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_open_session_and_its_numbering() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "RESTART"]);
    write_lines(&mut pty, &chips(0..25));
    wait_fake(&fake, &gw, "25 delivered", |s| s.total_passings() == 25).await;
    let before = gw.status();
    assert_eq!(gw.terminate().await.code(), Some(0));

    gw.start().await;
    let after = gw.status();
    assert_eq!(after["session"]["id"], before["session"]["id"]);
    assert_eq!(after["queue"]["delivered"], 25);
    write_lines(&mut pty, &chips(25..50));
    wait_fake(&fake, &gw, "50 delivered", |s| s.total_passings() == 50).await;
    let state = fake.state();
    assert_eq!(state.sessions.len(), 1, "no new remote session after a restart");
    assert_eq!(state.sessions[0].passings.keys().copied().collect::<Vec<_>>(), (1..=50).collect::<Vec<i64>>());
}

/// A stop never splits a record: the port stays open across a restart (systemd's descriptor
/// store), so half a line left behind would become two broken halves, one in each process.
/// The stopping gateway waits for the rest of a record it has begun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_finishes_the_record_it_has_begun() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    // One whole read, then the first half of the next in the same write: once the whole one is
    // counted, the half is in the gateway's framer.
    pty.write(b"C0DE0001\r\nABCD").unwrap();
    gw.wait_status("the whole read", |s| s["reader"]["reads_total"] == 1).await;
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + DEADLINE;
    while !gw.logs().contains("finishing the record in flight before stopping") {
        assert!(Instant::now() < deadline, "the stop did not wait for the record; log:\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pty.write(b"1234\r\n").unwrap();
    assert_eq!(gw.terminate().await.code(), Some(0), "log:\n{}", gw.logs());
    let reads = gw.cli_ok(&["export", "--reads"]);
    assert!(reads.contains("ABCD1234"), "the record split by the stop: {reads}");
    assert!(!gw.logs().contains("rejected reader records"), "a half became a rejected record");
}

/// SIGTERM while a request is in flight: the request completes and is recorded, then exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_and_exits_zero() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "TERM"]);
    wait_fake(&fake, &gw, "remote session created", |s| s.sessions.len() == 1).await;
    fake.push_fault(Route::Passings, Fault::Delay(Duration::from_millis(800)));
    write_lines(&mut pty, &chips(0..10));
    wait_fake(&fake, &gw, "the slow request to arrive", |s| s.requests.iter().any(|r| r.path == "/passings")).await;
    // The batch in flight holds what was committed when it left: all 10 here as a rule, fewer
    // on a slow machine (under emulation the first read can go out alone).
    let in_flight = fake.state().requests.iter().find(|r| r.path == "/passings").unwrap().batch;
    assert!(in_flight >= 1);
    let status = gw.terminate().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", gw.logs());
    assert_eq!(fake.state().total_passings(), in_flight, "the in-flight batch was delivered");
    let sessions = gw.db().sessions().unwrap();
    assert_eq!(sessions[0].delivered, in_flight as i64, "and recorded as delivered before exiting");
    assert_eq!(sessions[0].delivered + sessions[0].pending, 10, "the rest kept for the next start");
}

/// Enveloped (`{"body": …}`) replies work like flat ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enveloped_replies_are_understood() {
    let (fake, device) = fake().await;
    fake.state().envelope = true;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "ENVELOPE"]);
    write_lines(&mut pty, &chips(0..20));
    gw.wait_status("20 delivered", |s| s["queue"]["delivered"] == 20).await;
    gw.cli_ok(&["session", "close"]);
    wait_fake(&fake, &gw, "closed", |s| !s.sessions[0].active).await;
}

/// Export works with the daemon running and after it stopped; `session list` shows the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_list_work_with_and_without_the_daemon() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "EXPORT"]);
    write_lines(&mut pty, &chips(0..5));
    gw.wait_status("5 delivered", |s| s["queue"]["delivered"] == 5).await;
    let running = gw.cli_ok(&["export"]);
    assert_eq!(gw.terminate().await.code(), Some(0));
    let stopped = gw.cli_ok(&["export"]);
    assert_eq!(running, stopped);
    let lines: Vec<&str> = stopped.lines().collect();
    assert!(lines[0].starts_with("session_id,alias,num_passing,bib,chip,timestamp,state"), "{}", lines[0]);
    assert_eq!(lines.len(), 6);
    assert!(lines[1].starts_with(&format!("1,EXPORT,1,{0},{0},", chips(0..1)[0])), "{}", lines[1]);
    let reads = gw.cli_ok(&["export", "--reads"]);
    assert!(reads.starts_with("received_at,chip,antenna,rssi,reader_time,session_id"), "{reads}");
    assert_eq!(reads.lines().count(), 6);
    let list = gw.cli_ok(&["session", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["alias"], "EXPORT");
    assert_eq!(list[0]["passings"], 5);
    assert_eq!(list[0]["delivered"], 5);
    assert_eq!(list[0]["pending"], 0);
    // Without the daemon, commands that need it exit 69 and say how to start it.
    let out = gw.cli(&["status"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("systemctl start rufus-gateway"));
}

/// Two sessions started offline: the first drains and closes remotely before the second is
/// created (creating a session closes the device's other one on the real API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_started_offline_are_replayed_in_strict_order() {
    let (fake, device) = fake().await;
    fake.stop_listening();
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "START"]);
    write_lines(&mut pty, &chips(0..10));
    gw.wait_status("10 pending", |s| s["queue"]["pending"] == 10).await;
    gw.cli_ok(&["session", "start", "--alias", "FINISH"]);
    write_lines(&mut pty, &chips(10..25));
    let status = gw.wait_status("25 pending", |s| s["queue"]["pending"] == 25).await;
    assert_eq!(status["session"]["alias"], "FINISH");
    fake.resume().await.unwrap();
    wait_fake(&fake, &gw, "both sessions delivered", |s| s.total_passings() == 25).await;
    let state = fake.state();
    assert_eq!(state.sessions.iter().map(|s| s.alias.as_str()).collect::<Vec<_>>(), ["START", "FINISH"]);
    assert!(!state.sessions[0].active, "the first session was closed before the second was created");
    assert_eq!(state.sessions[0].passings.keys().copied().collect::<Vec<_>>(), (1..=10).collect::<Vec<i64>>());
    assert_eq!(state.sessions[1].passings.keys().copied().collect::<Vec<_>>(), (1..=15).collect::<Vec<i64>>());
    assert_eq!(state.sessions[1].passings[&1].chip.as_deref(), Some(chips(10..11)[0].as_str()));
    drop(state);
    let list: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["session", "list", "--json"])).unwrap();
    assert_eq!(list[0]["state"], "closed");
    assert_eq!(list[0]["remote_state"], "closed");
    assert_eq!(list[1]["state"], "open");
}

/// The port is missing at start, then appears (a by-id link): the gateway connects by itself;
/// garbage on the line is counted as rejected and never stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_port_is_waited_for_and_bad_lines_are_rejected() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("usb-reader-if00");
    let mut gw = Gateway::new(&fake, &device, &link.display().to_string(), STRICT_CHIP);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "PLUG"]);
    let status = gw.wait_status("reader reported missing", |s| s["reader"]["last_error"].is_string()).await;
    assert_eq!(status["reader"]["connected"], false);
    assert!(status["problems"].to_string().contains("READER NOT CONNECTED"), "{status:#}");

    std::os::unix::fs::symlink(&pty.path, &link).unwrap();
    gw.wait_status("reader connected", |s| s["reader"]["connected"] == true).await;
    pty.write(&vec![b'A'; 5000]).unwrap();
    pty.write(b"\n\xff\xfeABCD\nnot a chip\n").unwrap();
    write_lines(&mut pty, &chips(0..3));
    let status = gw.wait_status("3 delivered", |s| s["queue"]["delivered"] == 3).await;
    assert_eq!(status["reader"]["rejected"]["too_long"], 1, "{status:#}");
    assert_eq!(status["reader"]["rejected"]["invalid_utf8"], 1);
    assert_eq!(status["reader"]["rejected"]["no_match"], 1);
    assert_eq!(status["reader"]["reads_total"], 3);
}
