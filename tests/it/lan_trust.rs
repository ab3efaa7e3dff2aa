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

/// A TCP connection to `to` from the loopback address `from` (another "host" on the tent LAN).
fn connect_from(from: &str, to: &str) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&format!("{from}:0").parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    socket.connect(&to.parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    socket.into()
}

fn listening(gw: &Gateway, what: &str) -> String {
    gw.status()["listening"][what].as_str().unwrap_or_else(|| panic!("{what} address in status")).to_string()
}

const LISTENERS: &str = "session.auto_start = true\nhttp.listen = \"127.0.0.1:0\"\nhttp.token = \"a-long-enough-token-for-the-tests\"\nfeed.listen = \"127.0.0.1:0\"";

/// Row 4: one host opening 64 idle feed connections locked the timing software's feed client out
/// (the cap was global). Now one address holds at most 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_take_the_whole_feed() {
    use std::io::{BufRead, BufReader, Write};
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), LISTENERS);
    gw.start().await;
    let feed = listening(&gw, "feed");
    let attacker: Vec<std::net::TcpStream> = (0..64).map(|_| connect_from("127.0.0.2", &feed)).collect();
    let s = gw.wait_status("56 refused", |s| s["listening"]["refused"]["feed"].as_u64() == Some(56)).await;
    let mut client = connect_from("127.0.0.3", &feed);
    client.write_all(b"0\n").unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    write_lines(&mut pty, &["ABCD0042".into()]);
    let mut line = String::new();
    BufReader::new(&client).read_line(&mut line).unwrap();
    assert!(line.contains("ABCD0042"), "the timing software's client gets the passing: {line:?}");
    wait_fake(&fake, &gw, "the passing delivered", |s| s.total_passings() >= 1).await;
    drop(attacker);
    eprintln!(
        "lan row 4: 64 idle feed connections from one host: {} refused (8 held); another host's client fed: {}",
        s["listening"]["refused"]["feed"],
        line.trim()
    );
}

/// Row 5: one host keeping 64 keep-alive dashboard connections left 0 of 20 legitimate requests
/// served. Now one address holds at most 16 (and a connection lives at most a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_take_the_whole_dashboard() {
    use std::io::{Read, Write};
    let (fake, device) = fake().await;
    let pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), LISTENERS);
    gw.start().await;
    let http = listening(&gw, "http");
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut c = connect_from("127.0.0.2", &http);
        c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let _ = c.write_all(format!("GET /api/status HTTP/1.1\r\nHost: {http}\r\n\r\n").as_bytes());
        let mut buf = [0u8; 512];
        if matches!(c.read(&mut buf), Ok(n) if n > 0) {
            held.push(c); // answered, and kept alive
        }
    }
    assert_eq!(held.len(), 16, "one address holds 16 connections");
    let _ = http_client(); // installs the crypto provider
    let client =
        reqwest::Client::builder().local_address("127.0.0.3".parse::<std::net::IpAddr>().unwrap()).build().unwrap();
    let mut served = 0;
    for _ in 0..20 {
        let answer = client.get(format!("http://{http}/api/status")).send().await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            served += 1;
        }
    }
    assert_eq!(served, 20);
    drop(held);
    eprintln!(
        "lan row 5: 64 keep-alive connections from one host: 16 held, 48 refused; another host: {served} of 20 requests served"
    );
}

fn host() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// A gateway writing its backup to `dir` (a plain directory standing in for the stick: the rule
/// under test is how files on it are opened, not how it is mounted).
async fn backed_up(
    fake: &rufus_gateway::demo::fake_api::FakeApi,
    device: &str,
    pty: &rufus_gateway::demo::pty::Pty,
    dir: &std::path::Path,
) -> Gateway {
    let extra = format!(
        "backup.dir = \"{}\"\nbackup.interval = \"1s\"\nbackup.require_mount = false\npassings.dedup_window = \"0s\"",
        dir.display()
    );
    let mut gw = Gateway::new(fake, device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    gw
}

/// Wait until the file at `path` holds `rows` rows.
async fn rows_in(gw: &Gateway, path: &std::path::Path, rows: usize) -> String {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.lines().count() == rows + 1
        {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "{} never held {rows} rows; log:\n{}", path.display(), gw.logs());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Stick row 1: a symlink on the stick named like this session's CSV, pointing at a file outside
/// it, was opened, cut and appended to. Now it is left alone and reported, and the session is
/// written under the next name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_on_the_stick_is_never_followed() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let stick = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let precious = outside.path().join("gateway.db-wal");
    std::fs::write(&precious, "precious bytes\nthat must stay").unwrap();
    let gw = backed_up(&fake, &device, &pty, stick.path()).await;
    gw.cli_ok(&["session", "start", "--alias", "LINK"]);
    let name = rufus_gateway::backup::file_name(&host(), 1, "LINK");
    std::os::unix::fs::symlink(&precious, stick.path().join(&name)).unwrap();
    let chips: Vec<String> = (0..20).map(|i| format!("{i:08X}")).collect();
    write_lines(&mut pty, &chips);
    wait_fake(&fake, &gw, "20 passings delivered", |s| s.total_passings() == 20).await;
    let next = stick.path().join(name.replace(".csv", "-2.csv"));
    rows_in(&gw, &next, 20).await;
    let s = gw
        .wait_status("the link reported", |s| {
            s["backup"]["left_alone"].as_str().is_some_and(|e| e.contains("symbolic link"))
        })
        .await;
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious bytes\nthat must stay");
    assert!(s["problems"].to_string().contains("BACKUP STICK"), "{}", s["problems"]);
    assert!(gw.logs().contains("left alone"), "and in the journal");
    eprintln!(
        "stick row 1: the symlink left alone (target unchanged), 20 rows in {}; reported: {}",
        next.display(),
        s["backup"]["left_alone"]
    );
}

/// Stick row 3: a file of the same name from an earlier race (a reset database starts at
/// session 1 again), or a forged last line, was trusted: the new race was appended after the
/// old one, or not written at all. Now a file whose last row is not this session's is left alone
/// and reported, and the session is written under the next name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_this_sessions_is_never_appended_to() {
    use rufus_gateway::backup::HEADER;
    let (fake, device) = fake().await;
    let mut pty = pty();
    let stick = tempfile::tempdir().unwrap();
    let gw = backed_up(&fake, &device, &pty, stick.path()).await;
    let name = rufus_gateway::backup::file_name(&host(), 1, "AGAIN");
    let old: String = (1..=81)
        .map(|n| format!("{n},9{n},9{n},2026-05-01,09:00:00.000,2026-05-01T09:00:00.000Z,1,AGAIN,delivered\n"))
        .collect();
    std::fs::write(stick.path().join(&name), format!("{HEADER}\n{old}")).unwrap();
    let forged = rufus_gateway::backup::file_name(&host(), 1, "AGAIN").replace(".csv", "-2.csv");
    std::fs::write(stick.path().join(&forged), format!("{HEADER}\n999999999,1,1,d,t,ts,1,AGAIN,pending\n")).unwrap();
    gw.cli_ok(&["session", "start", "--alias", "AGAIN"]);
    let chips: Vec<String> = (0..90).map(|i| format!("{i:08X}")).collect();
    write_lines(&mut pty, &chips);
    wait_fake(&fake, &gw, "90 passings delivered", |s| s.total_passings() == 90).await;
    let third = stick.path().join(name.replace(".csv", "-3.csv"));
    rows_in(&gw, &third, 90).await;
    let s = gw
        .wait_status("both reported", |s| {
            s["backup"]["left_alone"].as_str().is_some_and(|e| e.contains("#81") && e.contains("#999999999"))
        })
        .await;
    assert_eq!(std::fs::read_to_string(stick.path().join(&name)).unwrap(), format!("{HEADER}\n{old}"), "untouched");
    eprintln!(
        "stick row 3: the old race's file and a forged one left alone; 90 rows in {}; reported: {}",
        third.display(),
        s["backup"]["left_alone"]
    );
}
