//! systemd integration against the real binary: the sd_notify protocol (READY, STATUS, WATCHDOG,
//! RELOADING/READY, STOPPING), the watchdog withheld when an actor is stuck, and structured
//! fields in a real journald.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::Signal;

const STRICT_CHIP: &str = r#"reader.pattern = '^(?P<chip>[0-9A-F]{8})$'"#;

/// A notify socket the test owns, collecting every datagram with the time it arrived.
struct NotifySocket {
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> (NotifySocket, String) {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let messages: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        });
        (NotifySocket { messages }, path.display().to_string())
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.messages.lock().unwrap().clone()
    }

    fn count(&self, what: &str) -> usize {
        self.all().iter().filter(|(_, m)| m.contains(what)).count()
    }

    async fn wait_for(&self, what: &str, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.count(what) < n {
            assert!(
                Instant::now() < deadline,
                "no {n}× {what}; got {:?}",
                self.all().iter().map(|m| &m.1).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_protocol() {
    let (fake, device) = fake().await;
    let pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    let (notify, path) = NotifySocket::bind(gw.dir.path());
    gw.env = vec![("NOTIFY_SOCKET".into(), path), ("WATCHDOG_USEC".into(), "1000000".into())];
    gw.start().await;
    notify.wait_for("READY=1", 1).await;
    notify.wait_for("STATUS=", 1).await;
    let status = notify.all().into_iter().find(|(_, m)| m.starts_with("STATUS=")).unwrap().1;
    assert!(status.contains("pending") && status.contains("uplink"), "{status}");
    // Pings at half the interval: a few within a couple of seconds.
    notify.wait_for("WATCHDOG=1", 3).await;

    // Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    let config = std::fs::read_to_string(&gw.config).unwrap().replace("level = \"debug\"", "level = \"info\"");
    std::fs::write(&gw.config, config).unwrap();
    gw.signal(Signal::SIGHUP);
    notify.wait_for("RELOADING=1", 1).await;
    notify.wait_for("READY=1", 2).await;
    let messages = notify.all();
    let reloading = messages.iter().find(|(_, m)| m.contains("RELOADING=1")).unwrap();
    // The reload's time on CLOCK_MONOTONIC, in µs (this test's clock: same boot, a moment ago).
    let sent: i64 = reloading
        .1
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("{}", reloading.1))
        .parse()
        .unwrap();
    let now = rufus_gateway::clock::monotonic_us();
    assert!(sent > 0 && sent <= now && now - sent < 60_000_000, "MONOTONIC_USEC={sent}, now {now}");
    let ready_again = messages.iter().filter(|(_, m)| m.contains("READY=1")).nth(1).unwrap();
    assert!(ready_again.0 >= reloading.0);
    let logs = gw.logs();
    assert!(logs.contains("configuration reloaded"), "{logs}");

    // An invalid file is refused and the old config kept.
    std::fs::write(&gw.config, "[api]\nbatch_size = \"lots\"\n").unwrap();
    gw.signal(Signal::SIGHUP);
    notify.wait_for("READY=1", 3).await;
    let deadline = Instant::now() + DEADLINE;
    while !gw.logs().contains("configuration NOT reloaded") {
        assert!(Instant::now() < deadline, "{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gw.try_status().is_some(), "still running");

    assert_eq!(gw.terminate().await.code(), Some(0));
    assert!(notify.count("STOPPING=1") >= 1);
}

/// Stop the store thread alone (ptrace stops one thread; the others run on): the watchdog pings
/// stop while it is stuck, and resume once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_store_withholds_the_watchdog() {
    // The store promised to be back within 6 s (1 s tick + 5 s commit patience), plus 0.5 s grace.
    a_stuck_thread_withholds_the_watchdog("store", Duration::from_secs(8)).await;
}

/// The reader thread, stuck (as it was in a write to a reader that stopped reading): the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_reader_thread_withholds_the_watchdog() {
    // The reader thread promised to be back within 10 s, plus 0.5 s grace.
    a_stuck_thread_withholds_the_watchdog("reader", Duration::from_secs(12)).await;
}

async fn a_stuck_thread_withholds_the_watchdog(thread: &str, promise: Duration) {
    let (fake, device) = fake().await;
    let pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    let (notify, path) = NotifySocket::bind(gw.dir.path());
    gw.env = vec![("NOTIFY_SOCKET".into(), path), ("WATCHDOG_USEC".into(), "1000000".into())];
    gw.start().await;
    notify.wait_for("WATCHDOG=1", 2).await;

    let pid = gw.pid();
    let tid = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == thread))
        .map(|e| e.file_name().to_str().unwrap().parse::<i32>().unwrap())
        .unwrap_or_else(|| panic!("the {thread} thread"));
    // SAFETY: plain ptrace calls on a thread of our own child process.
    let attached = unsafe { libc::ptrace(libc::PTRACE_ATTACH, tid, 0, 0) } == 0;
    if !attached {
        let why = std::io::Error::last_os_error();
        assert!(std::env::var_os("RUFUS_GATEWAY_REQUIRE_PTRACE").is_none(), "ptrace required but not permitted: {why}");
        println!("skipped: ptrace not permitted here ({why})");
        return;
    }
    let mut wstatus = 0;
    unsafe { libc::waitpid(tid, &mut wstatus, libc::__WALL) };
    let stopped = Instant::now();
    let deadline = stopped + promise + Duration::from_secs(12);
    let mut last_ping = stopped;
    loop {
        if let Some((at, _)) = notify.all().into_iter().rev().find(|(_, m)| m.contains("WATCHDOG=1")) {
            last_ping = at;
        }
        if last_ping.elapsed() > Duration::from_secs(3) && stopped.elapsed() > promise {
            break;
        }
        assert!(Instant::now() < deadline, "pings never stopped while the {thread} thread was stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("last ping {:.1} s after the {thread} thread stopped", (last_ping - stopped).as_secs_f64());
    let logs = gw.logs();
    let said = logs.lines().find(|l| l.contains("withholding the watchdog ping")).unwrap_or_else(|| panic!("{logs}"));
    assert!(said.contains(thread), "{said}");
    let pings = notify.count("WATCHDOG=1");
    unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
    notify.wait_for("WATCHDOG=1", pings + 2).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Structured fields reach a real journald and can be filtered on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_gets_structured_fields() {
    let journald = Path::new("/lib/systemd/systemd-journald");
    let socket = Path::new("/run/systemd/journal/socket");
    let mut started = None;
    let running = std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(socket)).is_ok();
    if !running {
        if !journald.exists() || std::fs::create_dir_all("/run/systemd/journal").is_err() {
            assert!(
                std::env::var_os("RUFUS_GATEWAY_REQUIRE_JOURNALD").is_none(),
                "journald required but cannot be started"
            );
            println!("skipped: no journald and none can be started here");
            return;
        }
        started = std::process::Command::new(journald)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok();
        let alive = || std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(socket)).is_ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !alive() {
            assert!(
                std::env::var_os("RUFUS_GATEWAY_REQUIRE_JOURNALD").is_none(),
                "journald required but did not start"
            );
            println!("skipped: journald did not start");
            return;
        }
    }
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = format!("{STRICT_CHIP}\nlog.target = \"journald\"\nlog.level = \"info\"");
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    let pid = gw.pid();
    gw.cli_ok(&["session", "start", "--alias", "JOURNAL"]);
    write_lines(&mut pty, &chips(0..3));
    wait_fake(&fake, &gw, "3 delivered", |s| s.total_passings() == 3).await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    let query = |filters: &[String]| -> Vec<serde_json::Value> {
        let out =
            std::process::Command::new("journalctl").args(["-o", "json", "--no-pager"]).args(filters).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    let deadline = Instant::now() + DEADLINE;
    let entries = loop {
        let entries = query(&["SYSLOG_IDENTIFIER=rufus-gateway".into(), format!("_PID={pid}"), "SESSION_ID=1".into()]);
        if entries.iter().any(|e| e["MESSAGE"] == "remote session created") || Instant::now() > deadline {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Stopped while its storage cannot be written (here: a path under /proc), the reads still in
    // memory leave in one entry, readable as CSV with the command the log message names.
    let mut pty2 = crate::common::pty();
    let extra =
        format!("{STRICT_CHIP}\nlog.target = \"journald\"\nstorage.path = \"/proc/rufus-gateway-test/gateway.db\"");
    let mut gw2 = Gateway::new(&fake, &device, &pty2.path.display().to_string(), &extra);
    gw2.start().await;
    let pid2 = gw2.pid();
    write_lines(&mut pty2, &chips(10..14));
    gw2.wait_status("4 reads held in memory", |s| s["storage"]["buffered_reads"] == 4).await;
    assert_eq!(gw2.terminate().await.code(), Some(0));
    let deadline = Instant::now() + DEADLINE;
    let rescued = loop {
        let out = std::process::Command::new("journalctl")
            .args(["--no-pager", "--output-fields=READS", "-o", "cat", "SYSLOG_IDENTIFIER=rufus-gateway"])
            .arg(format!("_PID={pid2}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if chips(10..14).iter().all(|c| text.contains(c.as_str())) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    if let Some(mut j) = started {
        let _ = j.kill();
        let _ = j.wait();
    }
    for chip in chips(10..14) {
        assert!(rescued.contains(&format!(",{chip},")), "{chip} in the READS field:\n{rescued}");
    }
    let created =
        entries.iter().find(|e| e["MESSAGE"] == "remote session created").unwrap_or_else(|| panic!("{entries:#?}"));
    assert_eq!(created["SESSION_ID"], "1");
    assert_eq!(created["ALIAS"], "JOURNAL");
    assert_eq!(created["PRIORITY"], "6", "info");
    let token = created["TOKEN"].as_str().unwrap();
    assert!(token.ends_with('…') && token.len() < 20, "the token is masked: {token}");
    println!("journald entry: {}", serde_json::to_string(created).unwrap());
}

/// The reader's port through systemd's descriptor store: a new port is handed to the store
/// (`FDSTORE=1`, `FDNAME=reader`); the one handed back at start is used when it is still the
/// configured device; one that is not (the config now names another port) is dropped from the
/// store and the configured port opened instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kept_reader_port_is_taken_back_only_when_it_is_the_configured_one() {
    use std::os::fd::OwnedFd;
    let open = |path: &Path| -> OwnedFd {
        std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open the pty's slave").into()
    };
    let (fake, device) = fake().await;
    let mut configured = pty();
    let other = pty();
    let extra = format!("{STRICT_CHIP}\nsession.auto_start = true");

    // Started fresh: the port it opens goes to the store.
    let mut gw = Gateway::new(&fake, &device, &configured.path.display().to_string(), &extra);
    let (notify, path) = NotifySocket::bind(gw.dir.path());
    gw.env = vec![("NOTIFY_SOCKET".into(), path)];
    gw.start().await;
    notify.wait_for("FDSTORE=1\nFDNAME=reader", 1).await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    // Handed back the configured port: taken back, nothing new stored.
    gw.listen_fds = vec![("reader".into(), open(&configured.path))];
    gw.start().await;
    let deadline = Instant::now() + DEADLINE;
    while !gw.logs().contains("reader port taken back from systemd") {
        assert!(Instant::now() < deadline, "{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write_lines(&mut configured, &chips(0..5));
    wait_fake(&fake, &gw, "5 passings", |s| s.total_passings() == 5).await;
    assert_eq!(notify.count("FDSTORE=1"), 1, "the kept port was stored again: {:?}", notify.all());
    assert_eq!(gw.terminate().await.code(), Some(0));

    // Handed back another device: dropped from the store, the configured port opened and stored.
    gw.listen_fds = vec![("reader".into(), open(&other.path))];
    gw.start().await;
    notify.wait_for("FDSTOREREMOVE=1\nFDNAME=reader", 1).await;
    notify.wait_for("FDSTORE=1\nFDNAME=reader", 2).await;
    assert!(gw.logs().contains("not the configured one"), "{}", gw.logs());
    write_lines(&mut configured, &chips(5..10));
    wait_fake(&fake, &gw, "10 passings", |s| s.total_passings() == 10).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    drop(other);
}
