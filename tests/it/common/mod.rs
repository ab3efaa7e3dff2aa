//! Helpers shared by the integration tests: the real binary, a pseudo-terminal as its serial port,
//! the in-process fake RUFUS API, and condition waits with deadlines (never bare sleeps).

#![allow(dead_code)]

pub mod emulator;
pub mod readers;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rufus_gateway::demo::fake_api::{FAKE_KEY, FakeApi};
use rufus_gateway::demo::pty::Pty;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_rufus-gateway");

/// Generous: CI machines are slow and shared; a passing test never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub async fn fake() -> (FakeApi, String) {
    FakeApi::start().await.expect("fake API starts")
}

/// One gateway under test: its directory, config and (when running) process.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub db: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Extra environment for the daemon (NOTIFY_SOCKET, WATCHDOG_USEC, …).
    pub env: Vec<(String, String)>,
    /// Descriptors handed over at start as systemd does (`LISTEN_FDS`, fd 3 on), by name: the
    /// descriptor store's return at a restart.
    pub listen_fds: Vec<(String, std::os::fd::OwnedFd)>,
    /// The daemon's descriptor limit (`RLIMIT_NOFILE`), when a test needs a low one.
    pub nofile: Option<u64>,
}

/// The config used by most tests: host-trusted clock, quick retries, stderr logging.
pub fn config_text(base_url: &str, deviceid: &str, port: &str, dir: &std::path::Path, extra: &str) -> String {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    let mut put = |section: &str, line: String| match sections.iter_mut().find(|(s, _)| s == section) {
        Some((_, lines)) => lines.push(line),
        None => sections.push((section.to_string(), vec![line])),
    };
    put("api", format!("base_url = \"{base_url}\""));
    put("api", format!("api_key = \"{FAKE_KEY}\""));
    put("api", format!("deviceid = \"{deviceid}\""));
    put("api", "timeout = \"2s\"".into());
    put("api", "retry_max_delay = \"1s\"".into());
    put("reader", format!("port = \"{port}\""));
    put("clock", "source = \"trust\"".into());
    put("storage", format!("path = \"{}\"", dir.join("gateway.db").display()));
    put("control", format!("socket = \"{}\"", dir.join("control.sock").display()));
    put("log", "level = \"debug\"".into());
    put("log", "target = \"stderr\"".into());
    // `extra` lines look like "section.key = value" and override the defaults above.
    for line in extra.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (path, value) = line.split_once('=').expect("section.key = value");
        let (section, key) = path.trim().split_once('.').expect("section.key");
        let entry = format!("{} = {}", key.trim(), value.trim());
        match sections.iter_mut().find(|(s, _)| s == section) {
            Some((_, lines)) => {
                lines.retain(|l| !l.starts_with(&format!("{} ", key.trim())));
                lines.push(entry);
            }
            None => sections.push((section.to_string(), vec![entry])),
        }
    }
    sections.iter().map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n"))).collect::<Vec<_>>().join("\n")
}

impl Gateway {
    pub fn new(fake: &FakeApi, deviceid: &str, port: &str, extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_text(&fake.base_url(), deviceid, port, dir.path(), extra)).unwrap();
        Gateway {
            socket: dir.path().join("control.sock"),
            db: dir.path().join("gateway.db"),
            log: dir.path().join("gateway.log"),
            config,
            dir,
            child: None,
            starts: 0,
            env: Vec::new(),
            listen_fds: Vec::new(),
            nofile: None,
        }
    }

    /// Start `rufus-gateway run` and wait until its control socket answers.
    pub async fn start(&mut self) {
        self.spawn();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.try_status().is_some() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited during start-up ({status}); log:\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "gateway did not become ready; log:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start `rufus-gateway run` without waiting for anything.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = Command::new(BIN);
        if !self.listen_fds.is_empty() {
            // LISTEN_PID must be the daemon's own: a shell sets it to its PID, then becomes it.
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            command = Command::new("/bin/sh");
            command.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", BIN]);
            let names: Vec<&str> = self.listen_fds.iter().map(|(n, _)| n.as_str()).collect();
            command.env("LISTEN_FDS", names.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
            let fds: Vec<i32> = self.listen_fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            // SAFETY: only dup2 and fcntl between fork and exec (async-signal-safe); the source
            // descriptors are ours and stay open until the child has started.
            unsafe {
                command.pre_exec(move || {
                    for (i, fd) in fds.iter().enumerate() {
                        let target = 3 + i as i32;
                        if libc::dup2(*fd, target) < 0 || libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some(limit) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit only, between fork and exec (async-signal-safe).
            unsafe {
                command.pre_exec(move || {
                    let l = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .args(["-c", self.config.to_str().unwrap(), "run"])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn gateway");
        self.child = Some(child);
        self.starts += 1;
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL: no chance to clean up (the crash test).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// SIGTERM and wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "gateway did not stop after SIGTERM; log:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn try_status(&self) -> Option<Value> {
        rufus_gateway::control::request(&self.socket, &rufus_gateway::control::Request::Status).ok()
    }

    pub fn status(&self) -> Value {
        self.try_status().unwrap_or_else(|| panic!("status failed; log:\n{}", self.logs()))
    }

    /// Poll `status --json` until `cond` holds.
    pub async fn wait_status(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.try_status()
                && cond(&s)
            {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for: {what}\nlast status: {:#}\nlog:\n{}",
                    self.try_status().unwrap_or(Value::Null),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Run the CLI with this gateway's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN).arg("-c").arg(&self.config).args(args).output().expect("run cli")
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "{args:?} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), self.logs());
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn db(&self) -> rufus_gateway::store::query::Db {
        rufus_gateway::store::query::Db::open_readonly(&self.db).expect("open db")
    }

    /// The database as SQL, read-only, for what a test checks that the store has no query for.
    pub fn sql(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(&self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open db")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Wait for a condition on the fake API, failing with the gateway's log.
/// Whether the field at `path` (dot-separated keys) of a JSON document is null. The key must be
/// there: a renamed or dropped field fails the test instead of reading as null.
pub fn null(doc: &serde_json::Value, path: &str) -> bool {
    let mut at = doc;
    for key in path.split('.') {
        at = at.get(key).unwrap_or_else(|| panic!("no field {key:?} (of {path:?}) in {doc}"));
    }
    at.is_null()
}

pub async fn wait_fake(
    fake: &FakeApi,
    gw: &Gateway,
    what: &str,
    cond: impl Fn(&rufus_gateway::demo::fake_api::FakeState) -> bool,
) {
    if let Err(e) = fake.wait_for(DEADLINE, what, cond).await {
        panic!("{e}\nrequests: {:?}\nlog:\n{}", fake.state().requests, gw.logs());
    }
}

/// A reader on a pseudo-terminal, writing lines (a thread of its own so a full pty never blocks the runtime).
pub fn pty() -> Pty {
    Pty::open().expect("openpty")
}

pub fn write_lines(pty: &mut Pty, lines: &[String]) {
    for l in lines {
        pty.write(format!("{l}\r\n").as_bytes()).unwrap();
    }
}

/// Distinct 8-hex-digit chips.
pub fn chips(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("{:08X}", 0xC0DE_0000u32 + i)).collect()
}

/// An HTTP client for the tests (the crate uses rustls with the ring provider, installed here).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// What `/proc` says about a process: resident memory, threads, CPU time, open descriptors.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub rss_kb: u64,
    pub threads: u64,
    /// User + system time, in clock ticks (100 per second on Linux).
    pub cpu_ticks: u64,
    pub fds: usize,
}

pub fn usage(pid: i32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field, stime the 15th.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    Usage { rss_kb: field("VmRSS:"), threads: field("Threads:"), cpu_ticks: tick(11) + tick(12), fds }
}
