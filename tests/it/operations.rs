//! Race-day operations through the real binary: bind, resend, list, the human status.

use crate::common::*;
use rufus_gateway::demo::fake_api::FAKE_KEY;

const STRICT_CHIP: &str = r#"reader.pattern = '^(?P<chip>[0-9A-F]{8})$'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_bind_prints_a_deviceid_the_api_knows_and_handles_a_second_bind() {
    let (fake, _device) = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    // No deviceid yet: that is what bind is for.
    std::fs::write(&config, format!("[api]\nbase_url = \"{}\"\napi_key = \"{FAKE_KEY}\"\n", fake.base_url())).unwrap();
    let bind = || {
        std::process::Command::new(BIN)
            .arg("-c")
            .arg(&config)
            .args(["device", "bind", "--model", "Pi4", "--serial-number", "SN-0042", "--alias", "FINISH"])
            .output()
            .unwrap()
    };
    let out = bind();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let id = stdout.lines().find_map(|l| l.strip_prefix("deviceid = \"")).unwrap().trim_end_matches('"').to_string();
    assert!(fake.state().devices.contains_key(&id), "the fake API knows {id}");
    assert!(stdout.contains("bound: deviceid"), "{stdout}");

    let again = bind();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success());
    assert!(stdout.contains("already bound") && stdout.contains(&id), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_moves_the_held_passings_into_a_new_session_numbered_from_one() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    // Nothing to resend yet: a clear refusal.
    let out = gw.cli(&["session", "resend"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to resend"));

    gw.cli_ok(&["session", "start", "--alias", "LAP1"]);
    let chips = chips(0..25);
    write_lines(&mut pty, &chips[..10]);
    wait_fake(&fake, &gw, "10 delivered", |s| s.total_passings() == 10).await;
    let token = fake.state().sessions[0].token.clone();
    fake.close_remotely(&token);
    write_lines(&mut pty, &chips[10..25]);
    gw.wait_status("15 held", |s| s["queue"]["held"] == 15).await;
    let human = gw.cli_ok(&["status"]);
    assert!(human.starts_with("! SESSION 1 (LAP1) WAS CLOSED REMOTELY: 15 passings"), "the problem first:\n{human}");

    let out = gw.cli_ok(&["session", "resend", "--alias", "LAP1-RESEND"]);
    assert!(out.contains("15 passings moved"), "{out}");
    wait_fake(&fake, &gw, "the 15 in a new remote session", |s| {
        s.sessions.len() == 2 && s.sessions[1].passings.len() == 15
    })
    .await;
    {
        let state = fake.state();
        let resent = &state.sessions[1];
        assert_eq!(resent.alias, "LAP1-RESEND");
        assert_eq!(resent.passings.keys().copied().collect::<Vec<_>>(), (1..=15).collect::<Vec<i64>>());
        for (num, p) in &resent.passings {
            assert_eq!(p.chip.as_deref(), Some(chips[9 + *num as usize].as_str()), "same passings, in their order");
        }
        assert_eq!(state.sessions[0].passings.len(), 10, "nothing duplicated into the closed session");
        assert_eq!(state.sessions[0].conflicts + resent.conflicts, 0);
    }
    // Reads after the resend continue the new session's numbering.
    write_lines(&mut pty, &["ABCDEF01".to_string()]);
    wait_fake(&fake, &gw, "a live passing #16", |s| s.sessions[1].passings.contains_key(&16)).await;
    // Deliveries are recorded at the next group commit, not the moment the API answers.
    gw.wait_status("#16 recorded as delivered", |s| s["queue"]["pending"] == 0).await;

    let list: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["session", "list", "--json"])).unwrap();
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 2, "list shows every session");
    assert_eq!(rows[0]["remote_state"], "closed_remotely");
    assert_eq!(
        (rows[0]["passings"].as_i64(), rows[0]["delivered"].as_i64(), rows[0]["pending"].as_i64()),
        (Some(25), Some(10), Some(0))
    );
    assert_eq!(rows[0]["moved"], 15);
    assert_eq!((rows[1]["passings"].as_i64(), rows[1]["delivered"].as_i64()), (Some(16), Some(16)));
    let table = gw.cli_ok(&["session", "list"]);
    assert!(table.contains("LAP1-RESEND") && table.contains("closed_remotely"), "{table}");
    let export = gw.cli_ok(&["export", "--session", "2"]);
    let column = export.lines().next().unwrap().split(',').position(|c| c == "resent_from").unwrap();
    let first = export.lines().nth(1).unwrap().split(',').nth(column).unwrap();
    assert_eq!(first, "1#11", "origin kept: {export}");
    let status = gw.status();
    assert_eq!(status["queue"]["held"], 0);
    assert_eq!(status["queue"]["pending"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_human_status_reads_at_a_glance() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    let idle = gw.cli_ok(&["status"]);
    assert!(idle.starts_with("! NO SESSION OPEN"), "{idle}");
    gw.cli_ok(&["session", "start", "--alias", "GLANCE"]);
    write_lines(&mut pty, &chips(0..7));
    gw.wait_status("7 delivered", |s| s["queue"]["delivered"] == 7).await;
    let ok = gw.cli_ok(&["status"]);
    assert!(ok.starts_with("OK: reading, storing and uploading"), "{ok}");
    for expected in [
        "reader    connected",
        "7 reads/min",
        "session   #1 GLANCE — open, remote open",
        "queue     0 pending",
        "7 delivered",
        "uplink    online",
        "clock     synchronised",
    ] {
        assert!(ok.contains(expected), "missing {expected:?} in:\n{ok}");
    }
    fake.stop_listening();
    write_lines(&mut pty, &chips(7..9));
    gw.wait_status("offline", |s| s["uplink"]["state"] == "offline").await;
    let offline = gw.cli_ok(&["status"]);
    assert!(offline.starts_with("! OFFLINE: 2 passings waiting"), "{offline}");
}

/// A second `run` with the same config is refused before it touches anything: no second
/// connection to the reader, no session opened in the running gateway's database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_is_refused_before_it_opens_anything() {
    let (fake, device) = fake().await;
    let reader = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = format!("tcp://{}", reader.local_addr().unwrap());
    let mut gw = Gateway::new(
        &fake,
        &device,
        &port,
        "reader.pattern = '^(?P<chip>[0-9A-F]{8})$'\nsession.auto_start = true\nsession.alias = \"FIRST\"",
    );
    gw.start().await;
    let (_first, _) = reader.accept().unwrap();
    gw.wait_status("the first gateway's session open", |s| s["session"]["id"] == 1).await;

    let second = gw.cli(&["run"]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && stderr.contains("already running"), "{stderr}");
    // It never connected to the reader: no connection waits in the listener's queue.
    reader.set_nonblocking(true).unwrap();
    let waiting = reader.accept();
    assert!(
        matches!(&waiting, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the refused gateway connected to the reader: {waiting:?}"
    );
    // Nor touched the sessions: the first gateway's one, still open, is all there is.
    let list: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["session", "list", "--json"])).unwrap();
    let sessions = list.as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{list}");
    assert_eq!((sessions[0]["alias"].as_str(), sessions[0]["state"].as_str()), (Some("FIRST"), Some("open")));
}
