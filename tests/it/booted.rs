//! The package on a real booted Debian 12: systemd as PID 1, journald, sysusers and the unit's
//! hardening all real. A debootstrap root (`tests/booted/make-root.sh`) is booted with
//! `systemd-nspawn -b` on a fresh overlay for each test, the `.deb` installed with apt, and the
//! gateway run through its installed unit against the fake RUFUS API on the host's loopback
//! (the container shares the host's network).
//!
//! Needs root, `systemd-nspawn` and `nsenter`, and two variables: `RUFUS_GATEWAY_BOOTED_ROOT`
//! (the prepared root, never modified) and `RUFUS_GATEWAY_DEB` (the package). Without them each
//! test says it skipped, and fails instead when `RUFUS_GATEWAY_REQUIRE_BOOTED=1` (CI).
//!
//! The serial reader is `tests/booted/reader-sim.py` on a pseudo-terminal inside the container
//! (a test drop-in allows the unit that device, `char-pts`): distinct chips at a steady rate,
//! and what it sends while no process holds the port open is lost, as on a real UART. So the
//! reads lost to a restart are measured, not assumed.
//!
//! Debugging: with `RUFUS_GATEWAY_BOOTED_KEEP=1`, a wait that times out prints the `nsenter`
//! command for the container and keeps it running for an hour instead of failing at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::DEADLINE;
use rufus_gateway::demo::fake_api::{FAKE_KEY, FakeApi};
use serde_json::Value;

/// One booted machine at a time: two cores do not boot several quickly.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Reads per second the simulated reader sends in the restart measurements.
const RATE: u32 = 50;
/// Longest a read waits in memory before it is committed (`storage.commit_interval`, default):
/// a kill -9 may lose the reads of one such window, and nothing else.
const COMMIT_WINDOW: Duration = Duration::from_millis(50);

struct Setup {
    root: PathBuf,
    deb: PathBuf,
}

fn setup(test: &str) -> Option<Setup> {
    let root = std::env::var_os("RUFUS_GATEWAY_BOOTED_ROOT").map(PathBuf::from);
    let deb = std::env::var_os("RUFUS_GATEWAY_DEB").map(PathBuf::from);
    let tools = ["systemd-nspawn", "nsenter", "dpkg-deb"].iter().all(|t| which(t));
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    match (root, deb) {
        (Some(root), Some(deb))
            if tools && root_user && root.join("usr/lib/systemd/systemd").exists() && deb.exists() =>
        {
            Some(Setup { root, deb })
        }
        other => {
            let why = format!(
                "{test}: skipped (root: {root_user}, nspawn/nsenter/dpkg-deb: {tools}, RUFUS_GATEWAY_BOOTED_ROOT and RUFUS_GATEWAY_DEB: {:?})",
                other
            );
            assert!(
                std::env::var("RUFUS_GATEWAY_REQUIRE_BOOTED").is_err(),
                "RUFUS_GATEWAY_REQUIRE_BOOTED is set: {why}"
            );
            println!("{why}");
            None
        }
    }
}

fn which(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A fresh, writable copy of the prepared root: an overlay over it, so the root itself is never
/// changed and a copy costs nothing. It outlives the boots of one test (a power cut, a boot).
struct Root {
    dir: tempfile::TempDir,
    merged: PathBuf,
}

impl Root {
    fn over(lower: &Path) -> Root {
        let dir = tempfile::Builder::new().prefix("rgw-booted-").tempdir_in("/var/tmp").unwrap();
        let (upper, work, merged) = (dir.path().join("upper"), dir.path().join("work"), dir.path().join("root"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir(d).unwrap();
        }
        let options = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        run(Command::new("mount").args(["-t", "overlay", "overlay", "-o", &options]).arg(&merged));
        Root { dir, merged }
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.merged.join(inside.trim_start_matches('/'))
    }

    fn write(&self, inside: &str, text: &str) {
        let path = self.path(inside);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
        let _ = self.dir.path();
    }
}

/// A booted container: `systemd-nspawn -b`, systemd as its PID 1.
struct Machine {
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    init: i32,
    console: PathBuf,
}

impl Machine {
    fn boot(root: &Root) -> Machine {
        let console = root.dir.path().join(format!("console-{}.log", fastrand::u32(..)));
        let log = std::fs::File::create(&console).unwrap();
        let started = Instant::now();
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(&root.merged)
            .args(["-b", "--register=no", "--keep-unit", "--console=pipe", "-q"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn starts");
        let mut machine = Machine { nspawn, init: 0, console };
        machine.init = machine.wait_for("the container's init", || {
            let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", machine.nspawn.id())).ok()?;
            let pid: i32 = children.split_whitespace().next()?.parse().ok()?;
            (std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim() == "systemd").then_some(pid)
        });
        // Up once systemd answers and has finished starting (degraded is fine: a container
        // lacks some hardware units).
        let state = machine.wait_for("the boot to finish", || {
            let out = machine.exec("systemctl is-system-running --wait");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            ["running", "degraded"].contains(&state.as_str()).then_some(state)
        });
        println!("booted in {:.1} s: {state}", started.elapsed().as_secs_f64());
        machine
    }

    /// A shell command inside the container (all its namespaces), with its output.
    fn exec(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
            .args(["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// Like `exec`, failing the test when the command fails; its standard output.
    fn sh(&self, script: &str) -> String {
        let out = self.exec(script);
        assert!(
            out.status.success(),
            "in the container: {script}\nexit {:?}\n{}\n{}\nconsole:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.console).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show` properties of a unit.
    fn show(&self, unit: &str) -> BTreeMap<String, String> {
        self.sh(&format!("systemctl show {unit}"))
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }

    fn main_pid(&self, unit: &str) -> i64 {
        self.show(unit)["MainPID"].parse().unwrap()
    }

    fn status(&self, unit_config: &str) -> Value {
        serde_json::from_str(&self.sh(&format!("rufus-gateway -c {unit_config} status --json"))).unwrap()
    }

    fn wait_for<T>(&self, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = probe() {
                return v;
            }
            if Instant::now() >= deadline && std::env::var_os("RUFUS_GATEWAY_BOOTED_KEEP").is_some() {
                println!("keeping the machine: nsenter -t {} -m -u -i -n -p", self.init);
                std::thread::sleep(Duration::from_secs(3600));
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nconsole:\n{}",
                std::fs::read_to_string(&self.console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The whole box loses power: every process of the container dies at once.
    fn power_cut(mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.init), nix::sys::signal::Signal::SIGKILL);
        let _ = self.nspawn.wait();
        self.init = 0;
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.init != 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.init), nix::sys::signal::Signal::SIGKILL);
            let _ = self.nspawn.wait();
        }
    }
}

/// The reader simulator, run as a transient unit inside the container.
struct Sim {
    name: String,
    state: String,
}

impl Sim {
    fn start(m: &Machine, name: &str, link: &str, rate: u32, first: u64) -> Sim {
        let state = format!("/run/{name}.json");
        m.sh(&format!(
            "rm -f {state}; systemd-run --quiet --unit={name} --collect /usr/local/bin/reader-sim {link} {rate} {state} dialout {first}"
        ));
        let sim = Sim { name: name.into(), state };
        m.wait_for("the simulator's pty", || sim.counters(m));
        sim
    }

    fn counters(&self, m: &Machine) -> Option<Value> {
        serde_json::from_str(&String::from_utf8_lossy(&m.exec(&format!("cat {}", self.state)).stdout)).ok()
    }

    fn sent_at_least(&self, m: &Machine, n: u64) {
        m.wait_for(&format!("{} reads sent", n), || {
            self.counters(m).filter(|c| c["last"].as_u64().unwrap_or(0) + 1 >= c["first"].as_u64().unwrap() + n)
        });
    }

    /// Stop sending; the final counters.
    fn stop(&self, m: &Machine) -> Value {
        m.sh(&format!("systemctl stop {}", self.name));
        m.wait_for("the simulator's final counters", || self.counters(m).filter(|c| c["done"] == true))
    }
}

/// The chips the fake API holds, per session token, in `num_passing` order.
fn delivered(fake: &FakeApi) -> Vec<(String, Vec<(i64, String)>)> {
    fake.state()
        .sessions
        .iter()
        .map(|s| (s.token.clone(), s.passings.iter().map(|(n, p)| (*n, p.chip.clone().unwrap_or_default())).collect()))
        .collect()
}

fn seq_of(chip: &str) -> u64 {
    u64::from_str_radix(chip, 16).unwrap_or(0)
}

/// Wait until the read `last` is delivered (passings are delivered in order: all committed
/// before it are then delivered too), then count which of `first..=last` never reached the API.
fn lost_between(m: &Machine, fake: &FakeApi, first: u64, last: u64) -> Vec<u64> {
    let last_chip = format!("{last:08X}");
    m.wait_for(&format!("read {last_chip} delivered"), || {
        delivered(fake).iter().any(|(_, p)| p.iter().any(|(_, c)| *c == last_chip)).then_some(())
    });
    let got: std::collections::HashSet<u64> =
        delivered(fake).iter().flat_map(|(_, p)| p.iter().map(|(_, c)| seq_of(c))).collect();
    (first..=last).filter(|s| !got.contains(s)).collect()
}

/// Every session's numbering is 1..=n without a gap, and the chips arrive in the order read.
fn assert_contiguous_and_ordered(fake: &FakeApi) {
    for (token, passings) in delivered(fake) {
        let numbers: Vec<i64> = passings.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, (1..=numbers.len() as i64).collect::<Vec<_>>(), "session {}…: gaps", &token[..6]);
        let seqs: Vec<u64> = passings.iter().map(|(_, c)| seq_of(c)).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "session {}…: out of order: {seqs:?}", &token[..6]);
    }
    let s = fake.state();
    let duplicated: u64 = s.sessions.iter().map(|x| x.conflicts).sum();
    assert_eq!(duplicated, 0, "a passing resent with other content");
}

const PATTERN: &str = "^(?P<chip>[0-9A-F]{8})$";

fn config(fake: &FakeApi, deviceid: &str, port: &str, name: &str) -> String {
    format!(
        r#"[api]
base_url = "{}"
api_key = "{FAKE_KEY}"
deviceid = "{deviceid}"
timeout = "3s"
retry_max_delay = "1s"

[reader]
port = "{port}"
pattern = '{PATTERN}'

[session]
alias = "{name}"
auto_start = true

[clock]
source = "trust"

[http]
listen = "127.0.0.1:0"
"#,
        fake.base_url()
    )
}

/// Boot a fresh root, install the package with apt, configure the main unit for a pty reader
/// at `/run/reader0`. Returns the root, the machine and the install time.
fn installed(s: &Setup, fake: &FakeApi, deviceid: &str) -> (Root, Machine, Duration) {
    let root = Root::over(&s.root);
    std::fs::copy(&s.deb, root.path("/root/rufus-gateway.deb")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/booted/reader-sim.py"),
        root.path("/usr/local/bin/reader-sim"),
    )
    .unwrap();
    let m = Machine::boot(&root);
    assert!(m.exec("getent passwd rufus-gateway").stdout.is_empty(), "the root must never have had the package");
    let started = Instant::now();
    m.sh("apt-get install -y -q /root/rufus-gateway.deb >/root/install.log 2>&1 || { cat /root/install.log; exit 1; }");
    let install = started.elapsed();
    // The test's own pieces: the config, and the pty device allowed to the unit.
    root.write("/etc/rufus-gateway/config.toml", &config(fake, deviceid, "/run/reader0", "START"));
    root.write("/etc/systemd/system/rufus-gateway.service.d/test-pty.conf", "[Service]\nDeviceAllow=char-pts rw\n");
    root.write("/etc/systemd/system/rufus-gateway@.service.d/test-pty.conf", "[Service]\nDeviceAllow=char-pts rw\n");
    m.sh("chmod 755 /usr/local/bin/reader-sim && systemctl daemon-reload");
    (root, m, install)
}

fn journal(m: &Machine, args: &str) -> String {
    m.sh(&format!("journalctl --no-pager {args}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_debian_installs_and_runs_the_gateway_under_systemd() {
    let Some(s) = setup("a_fresh_debian_installs_and_runs_the_gateway_under_systemd") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let (fake, deviceid) = crate::common::fake().await;
    let finish_device = "F1415400000000000000000000000001".to_string();
    fake.state().devices.insert(finish_device.clone(), ("SIM".into(), "0002".into()));
    let (root, m, install) = tokio::task::block_in_place(|| installed(&s, &fake, &deviceid));
    println!("apt-get install of the package: {:.1} s", install.as_secs_f64());
    tokio::task::block_in_place(|| {
        // The user, its groups, the config's mode.
        let groups = m.sh("id -nG rufus-gateway");
        assert!(groups.split_whitespace().any(|g| g == "dialout"), "{groups}");
        assert_eq!(m.sh("stat -c '%a %G' /etc/rufus-gateway/config.toml").trim(), "640 rufus-gateway");
        assert!(m.sh("rufus-gateway check-config").contains("is valid"));

        // A race through the serial reader.
        m.sh("systemctl enable --now rufus-gateway");
        let sim = Sim::start(&m, "reader0", "/run/reader0", RATE, 1);
        sim.sent_at_least(&m, 150);
        let c = sim.stop(&m);
        let (first, last) = (c["first"].as_u64().unwrap(), c["last"].as_u64().unwrap());
        let lost = lost_between(&m, &fake, first, last);
        assert!(lost.is_empty(), "a plain race lost reads {lost:?}");
        assert_contiguous_and_ordered(&fake);
        println!("serial race: {} reads, all delivered in order", last - first + 1);

        // What an operator sees: the STATUS= line, structured journal fields, no secret.
        let status = m.sh("systemctl status --no-pager rufus-gateway || true");
        let line = status.lines().find(|l| l.trim_start().starts_with("Status:")).unwrap_or_else(|| panic!("{status}"));
        assert!(line.contains("pending") && line.contains("uplink"), "{line}");
        let entries = journal(&m, "-o json -u rufus-gateway");
        let opened = entries
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["SESSION_ID"] == "1" && e["MESSAGE"].as_str().is_some_and(|t| t.contains("session")))
            .unwrap_or_else(|| panic!("no entry with SESSION_ID=1:\n{entries}"));
        assert_eq!(opened["SYSLOG_IDENTIFIER"], "rufus-gateway");
        assert!(!entries.contains(FAKE_KEY), "the API key is in the journal");
        for (token, _) in delivered(&fake) {
            assert!(!entries.contains(&token), "a whole session token is in the journal");
        }

        // Reload keeps the process.
        let pid = m.main_pid("rufus-gateway");
        m.sh("systemctl reload rufus-gateway");
        m.wait_for("the reload logged", || {
            journal(&m, "-u rufus-gateway -o cat").contains("reloading the configuration").then_some(())
        });
        assert_eq!(m.main_pid("rufus-gateway"), pid, "reload replaced the process");
        assert_eq!(m.show("rufus-gateway")["ActiveState"], "active");

        // Both units as installed pass systemd's own checks.
        let verify = m.exec("systemd-analyze verify /usr/lib/systemd/system/rufus-gateway.service /usr/lib/systemd/system/rufus-gateway@.service");
        let said = String::from_utf8_lossy(&verify.stderr).to_string() + &String::from_utf8_lossy(&verify.stdout);
        assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
        // The LED and beeper of [signal]: the udev rule that lets the service's group write
        // LED-class devices, and the unit's exception for where the Pi's LEDs live (absent here,
        // which must not stop the unit: it is running).
        let rule = m.sh("cat /usr/lib/udev/rules.d/60-rufus-gateway-leds.rules");
        assert!(rule.contains("SUBSYSTEM==\"leds\"") && rule.contains("chgrp rufus-gateway"), "{rule}");
        let writable = m.sh("systemctl show -p ReadWritePaths --value rufus-gateway");
        assert!(writable.contains("/sys/devices/platform/leds"), "{writable}");
        // The backup stick: its rule, the mount helper, the mount point, and the unit's exception.
        let rule = m.sh("cat /usr/lib/udev/rules.d/61-rufus-gateway-backup.rules");
        assert!(rule.contains("RUFUSBACKUP") && rule.contains("/usr/lib/rufus-gateway/mount-backup"), "{rule}");
        assert_eq!(m.sh("stat -c '%a %U' /usr/lib/rufus-gateway/mount-backup").trim(), "755 root");
        assert!(m.exec("test -d /media/rufus-backup").status.success(), "the mount point is made");
        assert!(writable.contains("/media/rufus-backup"), "{writable}");

        // The live unit's exposure.
        let security = m.sh("systemd-analyze security --no-pager rufus-gateway.service");
        let overall = security.lines().last().unwrap_or_default().to_string();
        let exposure: f64 =
            overall.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or_else(|| panic!("{overall}"));
        assert!(exposure <= 2.0, "{overall}");
        println!("live unit: {overall}");

        // Resources in normal running, for the unit's limits.
        let pid = m.main_pid("rufus-gateway");
        let proc_status = m.sh(&format!("cat /proc/{pid}/status"));
        let field = |k: &str| {
            proc_status
                .lines()
                .find(|l| l.starts_with(k))
                .unwrap_or_default()
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_string()
        };
        let fds = m.sh(&format!("ls /proc/{pid}/fd | wc -l"));
        println!(
            "running: VmHWM {} kB, VmRSS {} kB, {} threads, {} descriptors",
            field("VmHWM:"),
            field("VmRSS:"),
            field("Threads:"),
            fds.trim()
        );

        // The watchdog: a stopped process is killed and restarted by systemd.
        root.write("/etc/systemd/system/rufus-gateway.service.d/test-watchdog.conf", "[Service]\nWatchdogSec=2s\n");
        m.sh("systemctl daemon-reload && systemctl restart rufus-gateway");
        let stopped = m.main_pid("rufus-gateway");
        let restarts: u64 = m.show("rufus-gateway")["NRestarts"].parse().unwrap();
        m.sh(&format!("kill -STOP {stopped}"));
        m.wait_for("a restart after the watchdog fired", || {
            let p = m.show("rufus-gateway");
            (p["MainPID"] != stopped.to_string() && p["MainPID"] != "0" && p["ActiveState"] == "active").then_some(())
        });
        assert!(m.show("rufus-gateway")["NRestarts"].parse::<u64>().unwrap() > restarts);
        assert!(
            journal(&m, "-u rufus-gateway -o cat").contains("Watchdog timeout"),
            "no watchdog timeout in the journal"
        );
        std::fs::remove_file(root.path("/etc/systemd/system/rufus-gateway.service.d/test-watchdog.conf")).unwrap();
        m.sh("systemctl daemon-reload");

        // A bad config: exit 78, no restart loop; fixed, it starts.
        let good = std::fs::read_to_string(root.path("/etc/rufus-gateway/config.toml")).unwrap();
        root.write("/etc/rufus-gateway/config.toml", &good.replace("[reader]\n", "[reader]\nparity = \"sometimes\"\n"));
        let _ = m.exec("systemctl restart rufus-gateway");
        let failed = m.wait_for("the unit failed", || {
            let p = m.show("rufus-gateway");
            (p["ActiveState"] == "failed").then_some(p)
        });
        assert_eq!(failed["ExecMainStatus"], "78");
        // The manual restart counts from 0; each automatic restart would add one.
        assert_eq!(failed["NRestarts"], "0", "restarted after exit 78");
        let said = journal(&m, "-u rufus-gateway -o cat");
        assert!(said.contains("reader.parity"), "the journal names the key");
        root.write("/etc/rufus-gateway/config.toml", &good);
        m.sh("systemctl restart rufus-gateway");
        assert_eq!(m.show("rufus-gateway")["ActiveState"], "active");

        // A second reader beside the first: rufus-gateway@finish on a networked (tcp://) reader.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = format!("tcp://{}", listener.local_addr().unwrap());
        let finish =
            config(&fake, &finish_device, &port, "FINISH").replace("listen = \"127.0.0.1:0\"", "listen = \"\"");
        root.write("/etc/rufus-gateway/finish.toml", &finish);
        m.sh("chgrp rufus-gateway /etc/rufus-gateway/finish.toml && chmod 640 /etc/rufus-gateway/finish.toml");
        m.sh("systemctl start rufus-gateway@finish");
        let (mut conn, _) = listener.accept().unwrap();
        let chips: Vec<String> = (0..100u64).map(|i| format!("{:08X}", 0xF000_0000 + i)).collect();
        std::io::Write::write_all(&mut conn, chips.iter().map(|c| format!("{c}\r\n")).collect::<String>().as_bytes())
            .unwrap();
        m.wait_for("100 finish passings", || {
            let s = fake.state();
            s.sessions.iter().find(|x| x.alias == "FINISH").filter(|x| x.passings.len() == 100).map(|_| ())
        });
        assert_eq!(m.show("rufus-gateway")["ActiveState"], "active");
        assert_eq!(m.show("rufus-gateway@finish")["ActiveState"], "active");
        let finish_status = m.status("/etc/rufus-gateway/finish.toml");
        assert_eq!(finish_status["session"]["alias"], "FINISH");
        assert_contiguous_and_ordered(&fake);
        println!("rufus-gateway@finish: 100 reads over tcp://, delivered beside the main unit");

        // Purge: the program, the units' state and the config go; the race data stays.
        m.sh("apt-get purge -y -q rufus-gateway >/root/purge.log 2>&1 || { cat /root/purge.log; exit 1; }");
        for gone in [
            "/usr/bin/rufus-gateway",
            "/etc/rufus-gateway/config.toml",
            "/usr/lib/systemd/system/rufus-gateway.service",
        ] {
            assert!(!root.path(gone).exists(), "{gone} survived the purge");
        }
        for kept in ["/var/lib/rufus-gateway/gateway.db", "/var/lib/rufus-gateway/finish/gateway.db"] {
            assert!(root.path(kept).exists(), "{kept} was removed by the purge");
        }
        assert_eq!(m.show("rufus-gateway")["ActiveState"], "inactive");
        assert_eq!(m.show("rufus-gateway@finish")["ActiveState"], "inactive");
        assert!(!m.sh("getent passwd rufus-gateway").is_empty(), "the user owns the kept data");
        println!("purge: binary, units and config removed; databases and the user kept");
        m.power_cut();
    });
    drop(root);
}

/// Reads lost while the process is replaced, with the reader streaming 50 reads/s: a kill -9,
/// `systemctl restart`, an upgrade to a newer package, and a power cut of the whole box.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_is_lost_to_a_restart_an_upgrade_or_a_crash() {
    let Some(s) = setup("no_read_is_lost_to_a_restart_an_upgrade_or_a_crash") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let (fake, deviceid) = crate::common::fake().await;
    let (root, m, _) = tokio::task::block_in_place(|| installed(&s, &fake, &deviceid));
    // A newer version of the same package, for the upgrade.
    let newer = root.path("/root/rufus-gateway-newer.deb");
    let unpacked = root.dir.path().join("unpacked");
    run(Command::new("dpkg-deb").arg("-R").arg(&s.deb).arg(&unpacked));
    let control = std::fs::read_to_string(unpacked.join("DEBIAN/control")).unwrap();
    let version = control.lines().find_map(|l| l.strip_prefix("Version: ")).unwrap().to_string();
    std::fs::write(
        unpacked.join("DEBIAN/control"),
        control.replace(&format!("Version: {version}"), &format!("Version: {version}+upgrade1")),
    )
    .unwrap();
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "-b"]).arg(&unpacked).arg(&newer));

    tokio::task::block_in_place(|| {
        m.sh("systemctl enable --now rufus-gateway");
        let sim = Sim::start(&m, "reader0", "/run/reader0", RATE, 1);
        let window_reads = (COMMIT_WINDOW.as_secs_f64() * RATE as f64).ceil() as usize + 1;
        let mut figures = Vec::new();
        let scenarios: [(&str, &str, usize); 3] = [
            ("kill -9", "kill -9 $(systemctl show -p MainPID --value rufus-gateway)", window_reads),
            ("systemctl restart", "systemctl restart rufus-gateway", 0),
            (
                "upgrade",
                "apt-get install -y -q /root/rufus-gateway-newer.deb >/root/upgrade.log 2>&1 || { cat /root/upgrade.log; exit 1; }",
                0,
            ),
        ];
        for (what, command, allowed) in scenarios {
            sim.sent_at_least(&m, 100);
            let before = sim.counters(&m).unwrap();
            let pid = m.main_pid("rufus-gateway");
            let t0 = Instant::now();
            m.sh(command);
            let gap = m.wait_for(&format!("a new process after {what}"), || {
                let p = m.show("rufus-gateway");
                (p["MainPID"] != pid.to_string() && p["MainPID"] != "0" && p["ActiveState"] == "active")
                    .then(|| t0.elapsed())
            });
            // Reads keep flowing a while after the new process is up.
            let resumed = sim.counters(&m).unwrap()["last"].as_u64().unwrap();
            m.wait_for("reads after the restart", || {
                sim.counters(&m).filter(|c| c["last"].as_u64().unwrap() >= resumed + RATE as u64).map(|_| ())
            });
            let after = sim.counters(&m).unwrap();
            let (first, last) = (before["last"].as_u64().unwrap() + 1, after["last"].as_u64().unwrap());
            let lost = lost_between(&m, &fake, first, last);
            let dropped = after["dropped"].as_u64().unwrap() - before["dropped"].as_u64().unwrap();
            println!(
                "{what}: {} reads sent across it, {} lost ({} while the port was closed); new process ready {:.2} s after",
                last - first + 1,
                lost.len(),
                dropped,
                gap.as_secs_f64()
            );
            assert!(
                lost.len() <= allowed,
                "{what}: lost {lost:?} (allowed {allowed}); {dropped} sent while the port was closed"
            );
            assert_eq!(dropped, 0, "{what}: the port was closed while the process was replaced");
            figures.push((what, lost.len(), gap));
        }
        let installed = m.sh("dpkg-query -W -f='${Version}' rufus-gateway");
        assert!(installed.ends_with("+upgrade1"), "{installed}");
        let session = m.status("/etc/rufus-gateway/config.toml")["session"].clone();
        assert_contiguous_and_ordered(&fake);

        // A power cut with reads flowing, then a boot: the service starts by itself, resumes the
        // same session and delivers everything that was committed.
        sim.sent_at_least(&m, 50);
        m.power_cut();
        let m = Machine::boot(&root);
        m.wait_for("the gateway started at boot", || {
            (m.show("rufus-gateway")["ActiveState"] == "active").then_some(())
        });
        let after = m.status("/etc/rufus-gateway/config.toml");
        assert_eq!(after["session"]["id"], session["id"], "not the same session after the power cut");
        m.wait_for("everything committed delivered", || {
            (m.status("/etc/rufus-gateway/config.toml")["queue"]["pending"] == 0).then_some(())
        });
        let committed: u64 = m.sh("rufus-gateway export | tail -n +2 | wc -l").trim().parse().unwrap();
        let arrived: usize = fake.state().sessions.iter().map(|x| x.passings.len()).sum();
        assert_eq!(arrived as u64, committed, "passings committed before the power cut not all delivered");
        assert_contiguous_and_ordered(&fake);
        println!(
            "power cut: service active again after boot, same session, {committed} committed passings all delivered"
        );
        m.power_cut();
    });
    drop(root);
}

/// A loop device on the host, detached on drop.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// The USB backup through what the package ships: an ext4 image labelled RUFUSBACKUP (this
/// kernel has no vfat) is attached as a block device; udev's own rule processing (`udevadm test`,
/// as udevd is not run in a container) yields the shipped rule's command; the helper it runs
/// refuses the ext4 stick until the config allows ext4 (`backup.allow_ext4`), then asks
/// systemd-mount for /media/rufus-backup with nodev,nosuid,noexec,nosymfollow (a stand-in
/// records it: a container cannot mount a block device through a device unit; FAT and exFAT are
/// asked the same way, with the service's uid), and it is mounted so, following no link; the
/// service, under its hardened unit, keeps the race's passings there, equal to `export`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stick_plugged_in_is_mounted_by_the_shipped_rule_and_holds_the_race() {
    let Some(s) = setup("a_stick_plugged_in_is_mounted_by_the_shipped_rule_and_holds_the_race") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let (fake, deviceid) = crate::common::fake().await;
    let (root, m, _) = tokio::task::block_in_place(|| installed(&s, &fake, &deviceid));
    tokio::task::block_in_place(|| {
        // The stick, plugged in: a block device the container can see.
        let image = root.dir.path().join("stick.img");
        std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "RUFUSBACKUP"]).arg(&image));
        let dev = String::from_utf8(run(Command::new("losetup").args(["-f", "--show"]).arg(&image)).stdout)
            .unwrap()
            .trim()
            .to_string();
        let _attached = LoopDevice(dev.clone());
        let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&dev).unwrap());
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        m.sh(&format!("[ -e {dev} ] || mknod {dev} b {major} {minor}"));

        // What udev does on the "add" event: its rules, the shipped one among them.
        let name = Path::new(&dev).file_name().unwrap().to_str().unwrap().to_string();
        let test = m.sh(&format!("udevadm test --action=add /sys/class/block/{name} 2>&1"));
        // The rule's trace shows `$devnode`; the resulting `run:` line has the values.
        let line = test
            .lines()
            .find(|l| l.contains("/usr/lib/rufus-gateway/mount-backup") && !l.contains('$'))
            .unwrap_or_else(|| panic!("the shipped rule did not match a device labelled RUFUSBACKUP:\n{test}"));
        let command = line[line.find("/usr/lib/rufus-gateway/mount-backup").unwrap()..].trim_end_matches(['\'', '"']);
        assert_eq!(command, format!("/usr/lib/rufus-gateway/mount-backup {dev} ext4"), "{line}");
        // systemd-mount cannot mount a block device inside a container (device units are
        // "unsupported" there, so its mount unit fails on a dependency): a stand-in records what
        // the helper asks of it, and the test mounts with exactly that.
        m.sh("mv /usr/bin/systemd-mount /usr/bin/systemd-mount.real && printf '#!/bin/sh\\necho \"$@\" > /run/systemd-mount.args\\n' > /usr/bin/systemd-mount && chmod 755 /usr/bin/systemd-mount");
        let backup = config(&fake, &deviceid, "/run/reader0", "STICK")
            + "\n[backup]\ndir = \"/media/rufus-backup\"\ninterval = \"1s\"\n";
        // An ext4 stick is an untrusted ext4 image for the kernel to parse: refused unless a
        // config opts in, and the journal says why.
        root.write("/etc/rufus-gateway/config.toml", &backup);
        m.sh(command);
        assert_eq!(m.sh("test -e /run/systemd-mount.args && echo asked || echo not asked").trim(), "not asked");
        m.wait_for("the refused ext4 stick in the journal", || {
            m.sh("journalctl -q -t rufus-gateway-backup -o cat")
                .contains(&format!("stick {dev} labelled RUFUSBACKUP is ext4: not mounted"))
                .then_some(())
        });
        let backup = backup + "allow_ext4 = true\n";
        root.write("/etc/rufus-gateway/config.toml", &backup);
        m.sh(command);
        let asked = m.sh("cat /run/systemd-mount.args");
        assert_eq!(
            asked.trim(),
            format!("--no-block --collect --options=nodev,nosuid,noexec,noatime,nosymfollow {dev} /media/rufus-backup"),
            "what the helper asks of systemd-mount for an ext4 stick, allowed"
        );
        // What it asks for FAT and exFAT (this kernel has no vfat to mount them with).
        let (uid, gid) = (m.sh("id -u rufus-gateway"), m.sh("id -g rufus-gateway"));
        for (fstype, extra) in [("vfat", ",flush"), ("exfat", "")] {
            m.sh(&format!("/usr/lib/rufus-gateway/mount-backup {dev} {fstype}"));
            assert_eq!(
                m.sh("cat /run/systemd-mount.args").trim(),
                format!(
                    "--no-block --collect --options=nodev,nosuid,noexec,noatime,nosymfollow,uid={},gid={},umask=0077{extra} {dev} /media/rufus-backup",
                    uid.trim(),
                    gid.trim()
                ),
                "what the helper asks of systemd-mount for {fstype}"
            );
        }
        let options = asked.split_whitespace().find_map(|a| a.strip_prefix("--options=")).unwrap().to_string();
        m.sh(&format!("mount -o {options} {dev} /media/rufus-backup"));
        let options = m.sh("findmnt -no OPTIONS /media/rufus-backup");
        for option in ["nodev", "nosuid", "noexec", "nosymfollow"] {
            assert!(options.contains(option), "{options}");
        }
        // nosymfollow: a link on the stick leads nowhere, whoever follows it.
        m.sh("ln -s /etc/rufus-gateway/config.toml /media/rufus-backup/link");
        let followed = m.exec("cat /media/rufus-backup/link");
        assert!(!followed.status.success(), "a link on the stick was followed");
        m.sh("rm /media/rufus-backup/link");
        // An ext4 stick keeps its owners: given to the service once, as the README says.
        m.sh("chown rufus-gateway: /media/rufus-backup && chmod 700 /media/rufus-backup");

        m.sh("systemctl enable --now rufus-gateway");
        let sim = Sim::start(&m, "reader0", "/run/reader0", RATE, 1);
        sim.sent_at_least(&m, 100);
        sim.stop(&m);
        let exported = m.wait_for("the stick equal to export", || {
            let export = m.sh("rufus-gateway export --session 1");
            let file = m.exec("cat /media/rufus-backup/rufus-gateway-*-1-STICK.csv");
            let file = String::from_utf8_lossy(&file.stdout).to_string();
            let rows = |text: &str, cols: &[usize]| -> Vec<Vec<String>> {
                text.lines()
                    .skip(1)
                    .map(|l| {
                        let cells: Vec<&str> = l.split(',').collect();
                        cols.iter().map(|i| cells.get(*i).unwrap_or(&"").to_string()).collect()
                    })
                    .collect()
            };
            // export: session_id,alias,num_passing,bib,chip,timestamp,state,…,date,time;
            // the stick: num_passing,bib,chip,date,time,timestamp,session_id,alias,state.
            let from_export = rows(&export, &[2, 3, 4, 10, 11, 5, 0, 1]);
            let on_stick = rows(&file, &[0, 1, 2, 3, 4, 5, 6, 7]);
            (!from_export.is_empty() && from_export.len() >= 100 && from_export == on_stick)
                .then_some(from_export.len())
        });
        let owner = m.sh("stat -c %U /media/rufus-backup/rufus-gateway-*-1-STICK.csv");
        assert_eq!(owner.trim(), "rufus-gateway", "written by the service, under its hardened unit");
        let status = m.status("/etc/rufus-gateway/config.toml");
        assert_eq!(status["backup"]["mounted"], true);
        assert!(crate::common::null(&status, "backup.error"), "{}", status["backup"]);
        println!("the stick, mounted as the shipped rule asks, holds the race's {exported} passings, equal to export");
        m.sh("systemctl stop rufus-gateway && umount /media/rufus-backup");
    });
}
