//! Load tool for docs/PERFORMANCE.md: drives the release binary through a pseudo-terminal against
//! the in-process fake API and reads the cost from /proc. Not a test: figures, not assertions.
//!
//! ```sh
//! cargo build --release --bins --examples && target/release/examples/load [--reads 20000] [--rounds 15] [--scale]
//! # parts: --drain-only, --scale-only, --flood-only (idle and peak memory)
//! # the shipping binary: RUFUS_GATEWAY_BIN=/path/to/a/binary built with --bin rufus-gateway
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rufus_gateway::control::{self, Request};
use rufus_gateway::demo::fake_api::{FAKE_KEY, FakeApi};
use rufus_gateway::demo::pty::Pty;

/// What /proc says about a process (all threads).
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    cpu_ns: u64,
    rss_kb: u64,
    hwm_kb: u64,
    write_bytes: u64,
    switches: u64,
}

fn sample(pid: u32) -> Sample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is the 14th field overall.
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let write_bytes =
        io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut switches = 0;
    let mut cpu_ns = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            // schedstat: nanoseconds on the CPU, per thread (finer than the 10 ms ticks of stat).
            let sched = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            cpu_ns += sched.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            for key in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
                switches += s
                    .lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    // Threads that already exited are only in the process totals (ticks); prefer the finer sum.
    let ticks_ns = (num(11) + num(12)) as f64 / ticks_per_sec() * 1e9;
    let cpu_ns = if cpu_ns > 0 { cpu_ns.max(ticks_ns as u64) } else { ticks_ns as u64 };
    Sample { cpu_ns, rss_kb: kb("VmRSS:"), hwm_kb: kb("VmHWM:"), write_bytes, switches }
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

struct Gateway {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start(binary: &Path, fake: &FakeApi, device: &str, port: &Path, extra: &str, db: Option<&Path>) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let db = db.map(Path::to_path_buf).unwrap_or_else(|| dir.path().join("gateway.db"));
        let socket = dir.path().join("control.sock");
        let config = format!(
            "[api]\nbase_url = \"{}\"\napi_key = \"{FAKE_KEY}\"\ndeviceid = \"{device}\"\nretry_max_delay = \"1s\"\n\
             [reader]\nport = \"{}\"\npattern = '^(?P<chip>[0-9A-F]{{8}})$'\n\
             [clock]\nsource = \"trust\"\n[storage]\npath = \"{}\"\n[control]\nsocket = \"{}\"\n\
             [log]\nlevel = \"warn\"\ntarget = \"stderr\"\n{extra}",
            fake.base_url(),
            port.display(),
            db.display(),
            socket.display()
        );
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(binary);
        command.arg("-c").arg(&path).arg("run").stdout(Stdio::null());
        // A load tool killed half-way (e.g. by `timeout`) must not leave gateways behind: one would
        // keep reopening its pseudo-terminal's path and take a later run's. (The gateway is started
        // from the main thread, which lives as long as the tool.)
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start the gateway");
        let gw = Gateway { child, socket, _dir: dir };
        wait(Duration::from_secs(20), || control::request(&gw.socket, &Request::Status).is_ok());
        gw
    }

    fn status(&self) -> serde_json::Value {
        control::request(&self.socket, &Request::Status).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn wait(timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn flood(pty: Pty, n: u32, offset: u32) -> std::thread::JoinHandle<Pty> {
    std::thread::spawn(move || {
        let mut pty = pty;
        let block: String = (offset..offset + n).map(|i| format!("{:08X}\n", 0xA000_0000u32 + i)).collect();
        pty.write(block.as_bytes()).unwrap();
        pty
    })
}

struct FloodResult {
    seconds: f64,
    cpu_us_per_read: f64,
    bytes_per_read: f64,
    peak_mb: f64,
}

/// Start a gateway, flood it with `n` distinct reads, measure until all are on the fake API.
async fn flood_run(binary: &Path, n: u32, extra: &str) -> (FloodResult, Sample, f64) {
    let (fake, device) = FakeApi::start().await.unwrap();
    let pty = Pty::open().unwrap();
    let gw = Gateway::start(binary, &fake, &device, &pty.path, extra, None);
    control::request(&gw.socket, &Request::SessionStart { alias: Some("LOAD".into()), test: false }).unwrap();
    // Idle, fresh: RSS and wake-ups over 10 s with nothing happening.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle0 = sample(gw.pid());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle1 = sample(gw.pid());
    let wakeups = (idle1.switches - idle0.switches) as f64 / 10.0;
    if std::env::var_os("RUFUS_LOAD_SMAPS").is_some() {
        print_smaps(gw.pid(), "idle");
    }
    let before = sample(gw.pid());
    let start = Instant::now();
    let writer = flood(pty, n, 0);
    fake.wait_for(Duration::from_secs(300), "flood delivered", |s| s.total_passings() == n as usize).await.unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let _pty = writer.join().unwrap();
    let after = sample(gw.pid());
    if std::env::var_os("RUFUS_LOAD_SMAPS").is_some() {
        print_smaps(gw.pid(), "after the flood");
    }
    let result = FloodResult {
        seconds,
        cpu_us_per_read: (after.cpu_ns - before.cpu_ns) as f64 / 1e3 / n as f64,
        bytes_per_read: (after.write_bytes - before.write_bytes) as f64 / n as f64,
        peak_mb: after.hwm_kb as f64 / 1024.0,
    };
    let idle_cpu = (idle1.cpu_ns - idle0.cpu_ns) as f64 / 1e9 / 10.0 * 100.0;
    println!("    idle CPU over 10 s: {idle_cpu:.2} %");
    (result, idle1, wakeups)
}

/// Where the resident memory is (`RUFUS_LOAD_SMAPS=1`): the totals, and the mappings holding
/// the most, largest first.
fn print_smaps(pid: u32, when: &str) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |key: &str| {
        rollup.lines().find(|l| l.starts_with(key)).map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
    };
    println!(
        "    smaps {when}: Rss {} kB (anon {} kB, file {} kB)",
        field("Rss:").unwrap_or_default(),
        field("Anonymous:").unwrap_or_default(),
        field("Rss:")
            .and_then(|r| Some(r.parse::<i64>().ok()? - field("Anonymous:")?.parse::<i64>().ok()?))
            .unwrap_or(0)
    );
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut name = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            name = words.nth(4).unwrap_or("[anon]").to_string();
        } else if first == "Rss:" {
            maps.push((words.next().and_then(|v| v.parse().ok()).unwrap_or(0), name.clone()));
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    for (kb, name) in maps.iter().take(12) {
        println!("      {kb:>6} kB  {name}");
    }
}

/// The naive forwarder on the same flood.
async fn naive_run(naive: &Path, n: u32) -> FloodResult {
    let (fake, device) = FakeApi::start().await.unwrap();
    let pty = Pty::open().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("naive.db");
    let mut child = Command::new(naive)
        .args([pty.path.to_str().unwrap(), db.to_str().unwrap(), &fake.base_url(), FAKE_KEY, &device])
        .spawn()
        .expect("naive forwarder (cargo build --release --examples)");
    fake.wait_for(Duration::from_secs(20), "naive session", |s| !s.sessions.is_empty()).await.unwrap();
    let before = sample(child.id());
    let start = Instant::now();
    let writer = flood(pty, n, 0);
    fake.wait_for(Duration::from_secs(900), "naive delivered", |s| s.total_passings() == n as usize).await.unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let _pty = writer.join().unwrap();
    let after = sample(child.id());
    let _ = child.kill();
    let _ = child.wait();
    FloodResult {
        seconds,
        cpu_us_per_read: (after.cpu_ns - before.cpu_ns) as f64 / 1e3 / n as f64,
        bytes_per_read: (after.write_bytes - before.write_bytes) as f64 / n as f64,
        peak_mb: after.hwm_kb as f64 / 1024.0,
    }
}

/// Rounds of the backlog drain (`--rounds`): the gateway and the bare client alternate, so both
/// see the same machine noise; the medians are reported.
const DRAIN_ROUNDS: usize = 15;

/// CPU nanoseconds per thread name (`/proc/PID/task/*/comm`), summed over threads of that name.
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
            let sched = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            let ns = sched.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            *by_name.entry(name).or_insert(0) += ns;
        }
    }
    by_name
}

/// One round of the backlog drain: wall time and CPU time of the gateway and of the bare client
/// for the same batches, and the median time between two accepted requests of each.
struct DrainRound {
    gateway: f64,
    bare: f64,
    gateway_cpu: f64,
    bare_cpu: f64,
    gateway_gap: f64,
    bare_gap: f64,
    /// The gateway's CPU seconds by thread: the uplink (the main thread, which runs the async
    /// side), the store, and the blocking pool that runs the uplink's queries.
    threads: std::collections::BTreeMap<String, f64>,
}

/// Backlog: `n` passings stored while the API is down, then drained, `rounds_wanted` times; and
/// the bare client posting the same batches to the same server after each.
async fn drain_run(binary: &Path, n: u32, rounds_wanted: usize) -> Vec<DrainRound> {
    let (fake, device) = FakeApi::start().await.unwrap();
    fake.stop_listening();
    let mut pty = Some(Pty::open().unwrap());
    let path = pty.as_ref().unwrap().path.clone();
    let gw = Gateway::start(binary, &fake, &device, &path, "", None);
    let mut rounds = Vec::new();
    for round in 0..rounds_wanted {
        if round > 0 {
            fake.stop_listening();
        }
        let alias = format!("DRAIN{round}");
        control::request(&gw.socket, &Request::SessionStart { alias: Some(alias), test: false }).unwrap();
        pty = Some(flood(pty.take().unwrap(), n, round as u32 * n).join().unwrap());
        wait(Duration::from_secs(120), || gw.status()["queue"]["pending"] == n as i64);
        let (cpu_before, threads_before) = (sample(gw.pid()).cpu_ns, thread_cpu(gw.pid()));
        let resumed = Instant::now();
        fake.resume().await.unwrap();
        // The bare client posts to this server too (its own session): n more per round.
        let total = (2 * round + 1) * n as usize;
        fake.wait_for(Duration::from_secs(300), "backlog drained", |s| s.total_passings() == total).await.unwrap();
        let gateway_cpu = (sample(gw.pid()).cpu_ns - cpu_before) as f64 / 1e9;
        let threads = thread_cpu(gw.pid())
            .into_iter()
            .map(|(name, ns)| {
                let before = threads_before.get(&name).copied().unwrap_or(0);
                (name, ns.saturating_sub(before) as f64 / 1e9)
            })
            .filter(|(_, secs)| *secs > 0.0)
            .collect();
        let bare_from = Instant::now();
        let (bare, bare_cpu) = bare_process(&fake, &device, n).await;
        let state = fake.state();
        // Accepted batches between two instants, as the server saw them.
        let accepted = |from: Instant, to: Option<Instant>| -> Vec<Instant> {
            state
                .requests
                .iter()
                .filter(|r| r.path == "/passings" && r.status == 200 && r.at >= from && to.is_none_or(|t| r.at < t))
                .map(|r| r.at)
                .collect()
        };
        let gap = |at: &[Instant]| median(at.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect());
        let (ok, bare_ok) = (accepted(resumed, Some(bare_from)), accepted(bare_from, None));
        // From the first accepted batch to the last: the retry delay before the first is the
        // backoff (up to api.retry_max_delay), a setting, not throughput. One request's worth is
        // added, as the bare client's timing includes its first request.
        let (first, last) = (ok[0], ok[ok.len() - 1]);
        let gateway = (last - first).as_secs_f64() * ok.len() as f64 / (ok.len() - 1).max(1) as f64;
        rounds.push(DrainRound {
            gateway,
            bare,
            gateway_cpu,
            bare_cpu,
            gateway_gap: gap(&ok),
            bare_gap: gap(&bare_ok),
            threads,
        });
    }
    rounds
}

/// The yardstick: `examples/bare-client`, a process of its own (like the gateway), posting the
/// same batches to the gateway's fake server. Returns its wall and CPU seconds.
async fn bare_process(fake: &FakeApi, device: &str, n: u32) -> (f64, f64) {
    let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/examples/bare-client");
    let (base, device) = (fake.base_url(), device.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&exe)
            .args([&base, FAKE_KEY, &device, &n.to_string(), "200"])
            .output()
            .expect("bare client (cargo build --release --examples)")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "bare client: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(|v| v.parse::<f64>().unwrap());
    (fields.next().unwrap(), fields.next().unwrap())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Print the rounds and their medians; returns the median of the per-round ratios.
fn report_drain(rounds: &[DrainRound], n: u32) -> f64 {
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "    round {:2}: gateway {:.3} s, bare client {:.3} s, ratio {:.2} | per batch {:.2} / {:.2} ms | CPU {:.3} / {:.3} s",
            i + 1,
            r.gateway,
            r.bare,
            r.gateway / r.bare,
            r.gateway_gap * 1e3,
            r.bare_gap * 1e3,
            r.gateway_cpu,
            r.bare_cpu,
        );
    }
    let m = |f: &dyn Fn(&DrainRound) -> f64| median(rounds.iter().map(f).collect());
    let names: std::collections::BTreeSet<&String> = rounds.iter().flat_map(|r| r.threads.keys()).collect();
    let threads: Vec<String> = names
        .iter()
        .map(|name| {
            let ms = m(&|r| r.threads.get(*name).copied().unwrap_or(0.0)) * 1e3;
            format!("{name} {ms:.1} ms")
        })
        .collect();
    println!("    gateway CPU by thread (medians): {}", threads.join(", "));
    let ratio = m(&|r| r.gateway / r.bare);
    println!(
        "    median: gateway {:.3} s, bare client {:.3} s, ratio {ratio:.2}; time per batch {:.2} / {:.2} ms (ratio {:.2}); CPU per passing {:.1} / {:.1} µs",
        m(&|r| r.gateway),
        m(&|r| r.bare),
        m(&|r| r.gateway_gap) * 1e3,
        m(&|r| r.bare_gap) * 1e3,
        m(&|r| r.gateway_gap / r.bare_gap),
        m(&|r| r.gateway_cpu) * 1e6 / n as f64,
        m(&|r| r.bare_cpu) * 1e6 / n as f64,
    );
    ratio
}

/// Status latency and delivery with many delivered rows already in the store.
async fn scale_run(binary: &Path, rows: i64) -> (f64, f64) {
    let (fake, device) = FakeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    {
        // Create the schema with the real code, then fill it.
        let mut conn = rufus_gateway::store::open_writer(&db).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO boots (boot_id, first_seen) VALUES ('old', 0)", []).unwrap();
        tx.execute(
            "INSERT INTO sessions (alias, state, remote_state, token, created_at, next_num, delivered, delivered_through) VALUES ('OLD', 'closed', 'closed', 'T', 0, ?1, ?2, ?2)",
            [rows + 1, rows],
        )
        .unwrap();
        let now = rufus_gateway::clock::now_us();
        {
            let mut read = tx
                .prepare("INSERT INTO reads (received_at, monotonic_us, boot, clock_synced, chip, timestamp, raw, session_id) VALUES (?1, 0, 1, 1, ?2, ?1, x'00', 1)")
                .unwrap();
            // Delivered as the gateway records it: by the session's watermark, a range per batch.
            let mut passing = tx
                .prepare("INSERT INTO passings (session_id, num_passing, read_id, chip, bib, timestamp, window_start) VALUES (1, ?1, ?2, ?3, ?3, ?4, ?4)")
                .unwrap();
            let mut delivery =
                tx.prepare("INSERT INTO deliveries (session_id, last, first, at) VALUES (1, ?1, ?2, ?3)").unwrap();
            for i in 0..rows {
                let chip = format!("{i:08X}");
                // Two seconds apart: a million rows span the 23 days before now (within retention).
                let at = now - (rows - i) * 2_000_000;
                read.execute(rusqlite::params![at, chip]).unwrap();
                passing.execute(rusqlite::params![i + 1, i + 1, chip, at]).unwrap();
                if (i + 1) % 200 == 0 || i + 1 == rows {
                    delivery.execute(rusqlite::params![i + 1, (i / 200) * 200 + 1, at]).unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }
    let pty = Pty::open().unwrap();
    let gw = Gateway::start(binary, &fake, &device, &pty.path, "", Some(&db));
    control::request(&gw.socket, &Request::SessionStart { alias: Some("SCALE".into()), test: false }).unwrap();
    let mut times: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            control::request(&gw.socket, &Request::Status).unwrap();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let start = Instant::now();
    let _pty = flood(pty, 1000, 0).join().unwrap();
    fake.wait_for(Duration::from_secs(120), "1000 delivered", |s| s.total_passings() == 1000).await.unwrap();
    (times[10], start.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u32 = args
        .iter()
        .position(|a| a == "--reads")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let scale = args.iter().any(|a| a == "--scale");
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(DRAIN_ROUNDS);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The binary a box runs: building the examples turns on the test suite's `test-support`
    // feature for the whole build, so measure a binary built on its own
    // (`cargo build --release --bin rufus-gateway`, copied aside) by naming it here.
    let binary = std::env::var_os("RUFUS_GATEWAY_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/rufus-gateway"));
    let naive = root.join("target/release/examples/naive-forwarder");
    println!(
        "rufus-gateway load tool: {n} reads, binary {} ({} bytes)",
        binary.display(),
        std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0)
    );

    if args.iter().any(|a| a == "--scale-only") {
        for rows in [10_000i64, 100_000, 1_000_000] {
            let (status_ms, deliver_s) = scale_run(&binary, rows).await;
            println!(
                "    {rows:>9} rows: status median {status_ms:.2} ms, 1000 new reads delivered in {deliver_s:.2} s"
            );
        }
        return;
    }
    if args.iter().any(|a| a == "--drain-only") {
        println!("\n## backlog drain ({rounds} rounds of {n})");
        report_drain(&drain_run(&binary, n, rounds).await, n);
        return;
    }
    println!("\n## flood, dashboard and feed off");
    let (plain, idle, wakeups) = flood_run(&binary, n, "").await;
    println!("    idle (fresh) RSS {:.1} MB, wake-ups {wakeups:.1}/s", idle.rss_kb as f64 / 1024.0);
    report(&plain);
    if args.iter().any(|a| a == "--flood-only") {
        return;
    }
    println!("\n## flood, dashboard and feed on (nobody connected)");
    let (web, idle_web, _) =
        flood_run(&binary, n, "[http]\nlisten = \"127.0.0.1:0\"\n[feed]\nlisten = \"127.0.0.1:0\"\n").await;
    println!("    idle (fresh) RSS {:.1} MB", idle_web.rss_kb as f64 / 1024.0);
    report(&web);
    println!(
        "    dashboard+feed add {:+.2} MB peak RSS, {:+.2} µs CPU per read",
        web.peak_mb - plain.peak_mb,
        web.cpu_us_per_read - plain.cpu_us_per_read
    );

    println!("\n## naive forwarder (commit per read), same flood");
    let naive_result = naive_run(&naive, n).await;
    report(&naive_result);
    println!(
        "    gateway/naive: CPU per read {:.2}, bytes per read {:.3}",
        plain.cpu_us_per_read / naive_result.cpu_us_per_read,
        plain.bytes_per_read / naive_result.bytes_per_read
    );

    println!("\n## backlog drain ({rounds} rounds of {n})");
    report_drain(&drain_run(&binary, n, rounds).await, n);

    if scale {
        println!("\n## scale: delivered rows already in the store");
        for rows in [10_000i64, 100_000, 1_000_000] {
            let (status_ms, deliver_s) = scale_run(&binary, rows).await;
            println!(
                "    {rows:>9} rows: status median {status_ms:.2} ms, 1000 new reads delivered in {deliver_s:.2} s"
            );
        }
    }
}

fn report(r: &FloodResult) {
    println!(
        "    delivered in {:.2} s; CPU {:.1} µs per read; {:.0} bytes written per read; peak RSS {:.1} MB",
        r.seconds, r.cpu_us_per_read, r.bytes_per_read, r.peak_mb
    );
}
