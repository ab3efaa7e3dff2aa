//! What a stick, a phone or a laptop on the tent LAN, or a reader, can make the box do: the rows
//! of the stick-and-LAN issue that are done, each through the real binary.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::*;

const VALID: &str = r#"
[api]
api_key = "ror-ae4fc6c19681a20fad30"
deviceid = "65A1B2"
[reader]
port = "/dev/ttyUSB0"
"#;

fn check_config(path: &std::path::Path) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).arg("-c").arg(path).arg("check-config").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Row 8: a regex `bib` group capturing ESC/OSC/BEL bytes was printed raw by `watch` and sent to
/// the API. Now such a record is refused (`bad_bib`), and the reads around it flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bib_with_escape_sequences_is_refused_and_reads_flow() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = "reader.pattern = '^(?P<chip>[0-9A-F]+);(?P<bib>.*)$'\nsession.auto_start = true";
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), extra);
    gw.start().await;
    write_lines(
        &mut pty,
        &["ABC1;B11".into(), "ABC2;\u{1b}]0;pwned\u{7}\u{1b}[2J".into(), "ABC3;\u{202e}12".into(), "ABC4;B14".into()],
    );
    wait_fake(&fake, &gw, "2 passings", |s| s.total_passings() >= 2).await;
    let s = gw.wait_status("2 bibs refused", |s| s["reader"]["rejected"]["bad_bib"] == 2).await;
    let bibs: Vec<String> =
        fake.state().sessions.iter().flat_map(|s| s.passings.values().map(|p| p.bib.clone())).collect();
    assert_eq!(bibs, ["B11", "B14"]);
    eprintln!(
        "lan row 8: bibs with escapes refused ({} bad_bib), the others sent: {bibs:?}",
        s["reader"]["rejected"]["bad_bib"]
    );
}

/// Row 9: `signal.led = "../elsewhere"` or an absolute path wrote outside `leds_dir`. Now a name
/// that is a path is refused by `check-config` (exit 78) and at start.
#[test]
fn led_and_beeper_are_names_not_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    for (key, value) in [("led", "../elsewhere"), ("led", "/tmp/x"), ("beeper", ".."), ("beeper", "a/b")] {
        std::fs::write(&path, format!("{VALID}[signal]\n{key} = \"{value}\"\n")).unwrap();
        let (code, _, stderr) = check_config(&path);
        assert_eq!(code, Some(78), "{key} = {value}: {stderr}");
        assert!(stderr.contains(&format!("signal.{key}")), "{stderr}");
    }
    std::fs::write(&path, format!("{VALID}[signal]\nled = \"ACT\"\n")).unwrap();
    assert_eq!(check_config(&path).0, Some(0));
}

/// Row 10: a config holding `api_key` that any user can read was not warned about.
#[test]
fn a_world_readable_config_with_the_api_key_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, VALID).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stdout, _) = check_config(&path);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("WARNING: api.api_key:") && stdout.contains("mode 644"), "{stdout}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (_, stdout, _) = check_config(&path);
    assert!(!stdout.contains("WARNING: api.api_key:"), "{stdout}");
}

/// Row 6: 16 `watch` clients that never read took every slot of the control socket, so
/// `rufus-gateway status` and `session close` said "the daemon is not running" (exit 69). Now
/// `watch` has 4 slots of its own, and a client refused for want of a slot is told "busy".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_never_read_leave_room_for_the_command_line() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), "");
    gw.start().await;
    let connect = || UnixStream::connect(&gw.socket).unwrap();
    let mut watchers = Vec::new();
    let mut busy = 0;
    for _ in 0..16 {
        let mut s = connect();
        s.write_all(b"{\"command\":\"watch\"}\n").unwrap();
        let mut answer = String::new();
        BufReader::new(s.try_clone().unwrap()).read_line(&mut answer).unwrap();
        if answer.contains("\"watching\":true") {
            watchers.push(s); // and never read again
        } else {
            assert!(answer.contains("busy"), "{answer}");
            busy += 1;
        }
    }
    assert_eq!((watchers.len(), busy), (4, 12));
    gw.cli_ok(&["status"]);
    gw.cli_ok(&["session", "start", "--alias", "WATCHED"]);
    write_lines(&mut pty, &["ABCD0001".into()]);
    wait_fake(&fake, &gw, "a passing", |s| s.total_passings() >= 1).await;
    gw.cli_ok(&["session", "close"]);
    // Every other slot held by clients that say nothing: the command line is told "busy".
    let idle: Vec<UnixStream> = (0..12).map(|_| connect()).collect();
    let out = gw.cli(&["status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("busy"), "{stderr}");
    drop(idle);
    eprintln!(
        "lan row 6: 16 watch clients: 4 watching, 12 told busy; status and session close answered; a full socket says \"busy\" (exit 1), not \"not running\" (69)"
    );
}

/// Row 7: one `watch --json` while a reader floods distinct chips: each watcher kept every read of
/// the last minute (RSS 19 → 105 MB). Now a watcher keeps per-second counts per antenna and at
/// most 10,000 chips (the bound itself is a unit test of `watch::Tally`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_costs_the_same_whatever_the_reader_floods() {
    use std::io::{BufRead, BufReader, Write};
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), "passings.dedup_window = \"0s\"");
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "FLOOD"]);
    let mut watcher = std::os::unix::net::UnixStream::connect(&gw.socket).unwrap();
    watcher.write_all(b"{\"command\":\"watch\"}\n").unwrap();
    // The watcher reads everything, as `watch --json | tee` would.
    let lines = std::thread::spawn(move || BufReader::new(watcher).lines().map_while(Result::ok).count());
    let before = usage(gw.pid());
    let total = 30_000;
    for burst in 0..30 {
        let lines: Vec<String> = (0..1000).map(|i| format!("{:08X}", burst * 1000 + i)).collect();
        write_lines(&mut pty, &lines);
    }
    wait_fake(&fake, &gw, "30,000 passings", |s| s.total_passings() >= total).await;
    let after = usage(gw.pid());
    let grew_kb = after.rss_kb.saturating_sub(before.rss_kb);
    drop(gw);
    let seen = lines.join().unwrap();
    assert!(seen >= 1, "the watcher saw the stream");
    assert!(grew_kb < 16 * 1024, "RSS {} → {} kB", before.rss_kb, after.rss_kb);
    eprintln!(
        "lan row 7: 30,000 distinct chips with a watcher: all delivered, RSS {} → {} kB, the watcher got {seen} lines",
        before.rss_kb, after.rss_kb
    );
}
