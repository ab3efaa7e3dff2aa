//! The USB stick backup, with an ext4 loop image labelled RUFUSBACKUP standing in for the stick
//! (this kernel has no vfat): mounted before the race, pulled (`umount -l`) and plugged back,
//! full, read-only, and a directory with no stick in it. Needs root; CI sets
//! RUFUS_GATEWAY_REQUIRE_MOUNTS so that a skip there fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// The box's time zone for these tests: the backup's and the export's date and time are local.
const TZ: &str = "Europe/Madrid";
const STRICT_CHIP: &str = r#"reader.pattern = '^(?P<chip>[0-9A-F]{8})$'"#;

fn skip(why: &str) {
    assert!(std::env::var_os("RUFUS_GATEWAY_REQUIRE_MOUNTS").is_none(), "required but impossible: {why}");
    println!("skipped: {why}");
}

/// A stick: an ext4 image labelled RUFUSBACKUP, and the directory it is mounted at.
struct Stick {
    dir: tempfile::TempDir,
    image: PathBuf,
    mnt: PathBuf,
}

impl Stick {
    fn new(size_mb: u64) -> Option<Stick> {
        let dir = tempfile::tempdir().ok()?;
        let image = dir.path().join("stick.img");
        std::fs::File::create(&image).ok()?.set_len(size_mb << 20).ok()?;
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "RUFUSBACKUP", "-m", "0"])
            .arg(&image)
            .status()
            .is_ok_and(|s| s.success());
        let mnt = dir.path().join("rufus-backup");
        std::fs::create_dir(&mnt).ok()?;
        let stick = Stick { dir, image, mnt };
        if made && stick.plug(&[]) {
            Some(stick)
        } else {
            skip("cannot make and mount an ext4 loop image here (needs root)");
            None
        }
    }

    fn plug(&self, options: &[&str]) -> bool {
        let mut opts = vec!["loop"];
        opts.extend(options);
        Command::new("mount")
            .args(["-o", &opts.join(",")])
            .arg(&self.image)
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Pulled out: the mount goes at once, whatever is using it.
    fn pull(&self) {
        assert!(Command::new("umount").arg("-l").arg(&self.mnt).status().unwrap().success());
    }

    /// The stick mounted somewhere else for a moment (a laptop), to look at or change its files.
    fn elsewhere<T>(&self, f: impl FnOnce(&Path) -> T) -> T {
        let other = self.dir.path().join("laptop");
        std::fs::create_dir_all(&other).unwrap();
        assert!(Command::new("mount").args(["-o", "loop"]).arg(&self.image).arg(&other).status().unwrap().success());
        let result = f(&other);
        assert!(Command::new("umount").arg(&other).status().unwrap().success());
        result
    }

    /// The passings files on the stick (not the reads files beside them).
    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.mnt)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "csv"))
                    .filter(|p| !p.to_string_lossy().ends_with("-reads.csv"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

impl Drop for Stick {
    fn drop(&mut self) {
        for at in [self.mnt.clone(), self.dir.path().join("laptop")] {
            let _ = Command::new("umount").arg("-l").arg(at).stderr(std::process::Stdio::null()).status();
        }
    }
}

/// CSV text as rows of named cells.
fn table(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = rdr.headers().unwrap().iter().map(str::to_string).collect();
    rdr.records().map(|r| header.iter().cloned().zip(r.unwrap().iter().map(str::to_string)).collect()).collect()
}

/// The columns the backup and the export share (the backup's `state` is the one at writing).
const SHARED: [&str; 8] = ["num_passing", "bib", "chip", "date", "time", "timestamp", "session_id", "alias"];

fn project(rows: &[BTreeMap<String, String>]) -> Vec<Vec<String>> {
    rows.iter().map(|r| SHARED.iter().map(|c| r.get(*c).cloned().unwrap_or_default()).collect()).collect()
}

/// `export --session ID` in the box's time zone.
fn export(gw: &Gateway, session: i64) -> Vec<BTreeMap<String, String>> {
    let out = Command::new(BIN)
        .env("TZ", TZ)
        .arg("-c")
        .arg(&gw.config)
        .args(["export", "--session", &session.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    table(&String::from_utf8(out.stdout).unwrap())
}

async fn gateway(
    fake: &rufus_gateway::demo::fake_api::FakeApi,
    device: &str,
    pty: &rufus_gateway::demo::pty::Pty,
    dir: &Path,
    extra: &str,
) -> Gateway {
    let extra = format!(
        "{STRICT_CHIP}\nbackup.dir = \"{}\"\nbackup.interval = \"1s\"\npassings.dedup_window = \"0s\"\n{extra}",
        dir.display()
    );
    let mut gw = Gateway::new(fake, device, &pty.path.display().to_string(), &extra);
    gw.env.push(("TZ".into(), TZ.into()));
    gw.start().await;
    gw
}

/// Wait until the stick's one file has `rows` rows; returns its text.
async fn file_with(gw: &Gateway, stick: &Stick, rows: usize) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let [file] = stick.files().as_slice()
            && let Ok(text) = std::fs::read_to_string(file)
            && text.lines().count() == rows + 1
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the stick never held {rows} rows: {:?}\nstatus: {}\nlog:\n{}",
            stick.files().iter().map(std::fs::read_to_string).collect::<Vec<_>>(),
            gw.try_status().unwrap_or_default(),
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stick_in_before_the_race_holds_what_export_says_within_the_interval() {
    let Some(stick) = Stick::new(16) else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let gw = gateway(&fake, &device, &pty, &stick.mnt, "backup.reads = true").await;
    gw.cli_ok(&["session", "start", "--alias", "10K FINISH:A"]);
    let session = gw.status()["session"]["id"].as_i64().unwrap();

    let written = Instant::now();
    write_lines(&mut pty, &chips(0..50));
    let text = file_with(&gw, &stick, 50).await;
    let delay = written.elapsed();
    println!("passing to stick: {:.2} s for 50 reads (backup.interval 1 s)", delay.as_secs_f64());
    assert!(text.starts_with("num_passing,bib,chip,date,time,timestamp,session_id,alias,state\n"), "{text}");
    let file = &stick.files()[0];
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    assert_eq!(
        file.file_name().unwrap().to_str().unwrap(),
        format!("rufus-gateway-{host}-{session}-10K_FINISH_A.csv"),
        "no ':' or space in the name (FAT)"
    );
    let backup = table(&text);
    assert_eq!(project(&backup), project(&export(&gw, session)), "the stick equals export");
    // Local date and time of the box (Madrid), the UTC instant as sent to the API.
    let first = &backup[0];
    let utc = chrono::DateTime::parse_from_rfc3339(&first["timestamp"]).unwrap();
    let local = utc.with_timezone(&chrono_tz::Europe::Madrid);
    assert_eq!(first["date"], local.format("%Y-%m-%d").to_string());
    assert_eq!(first["time"], local.format("%H:%M:%S%.3f").to_string());
    // The raw reads beside it (backup.reads), numbered by read.
    let reads_file = file.to_string_lossy().replace(".csv", "-reads.csv");
    let deadline = Instant::now() + DEADLINE;
    let reads = loop {
        let text = std::fs::read_to_string(&reads_file).unwrap_or_default();
        if text.lines().count() == 51 {
            break table(&text);
        }
        assert!(Instant::now() < deadline, "reads file: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let chips_read: Vec<&str> = reads.iter().map(|r| r["chip"].as_str()).collect();
    let chips_sent = chips(0..50);
    assert_eq!(chips_read, chips_sent.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        reads.windows(2).all(|w| w[0]["read_id"].parse::<i64>().unwrap() < w[1]["read_id"].parse::<i64>().unwrap())
    );
    let s = gw.status();
    assert_eq!(s["backup"]["mounted"], true);
    assert_eq!(s["backup"]["rows"], 50);
    assert!(s["backup"]["last_written_at"].is_string() && null(&s, "backup.error"), "{}", s["backup"]);
    wait_fake(&fake, &gw, "all delivered", |s| s.total_passings() == 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stick_pulled_mid_race_gets_what_it_missed_when_plugged_back() {
    let Some(stick) = Stick::new(16) else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let gw = gateway(&fake, &device, &pty, &stick.mnt, "").await;
    gw.cli_ok(&["session", "start", "--alias", "PULLED"]);
    let session = gw.status()["session"]["id"].as_i64().unwrap();
    write_lines(&mut pty, &chips(0..20));
    file_with(&gw, &stick, 20).await;

    // Pulled: the race goes on; nothing is written into the empty mount point on the SD card.
    stick.pull();
    gw.wait_status("the stick seen gone", |s| s["backup"]["mounted"] == false).await;
    write_lines(&mut pty, &chips(20..50));
    wait_fake(&fake, &gw, "all 50 delivered without the stick", |s| s.total_passings() == 50).await;
    assert!(stick.files().is_empty(), "nothing written to the SD card while the stick is out");
    let s = gw.status();
    assert!(s["problems"].to_string().contains("NO BACKUP STICK"), "{}", s["problems"]);

    // Pulled in the middle of a line: the stick has a torn row (as a pull during a write leaves).
    stick.elsewhere(|at| {
        let file = std::fs::read_dir(at)
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.path().extension().is_some_and(|x| x == "csv"))
            .unwrap()
            .path();
        let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
        std::io::Write::write_all(&mut f, b"21,C0DE00").unwrap();
    });
    assert!(stick.plug(&[]), "plug back");
    let text = file_with(&gw, &stick, 50).await;
    let backup = table(&text);
    let nums: Vec<i64> = backup.iter().map(|r| r["num_passing"].parse().unwrap()).collect();
    assert_eq!(nums, (1..=50).collect::<Vec<_>>(), "no duplicate, no gap, the torn row written whole");
    assert_eq!(project(&backup), project(&export(&gw, session)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_stick_is_reported_and_the_race_goes_on() {
    let Some(stick) = Stick::new(8) else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    // Full: everything but a few bytes taken.
    let filler = stick.mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0u8; 64]).is_ok() {}
        let _ = f.sync_all();
    }
    let gw = gateway(&fake, &device, &pty, &stick.mnt, "").await;
    gw.cli_ok(&["session", "start", "--alias", "FULL"]);
    let pid = gw.pid();
    let before = usage(pid).cpu_ticks;
    write_lines(&mut pty, &chips(0..1000));
    wait_fake(&fake, &gw, "every passing delivered with a full stick", |s| s.total_passings() == 1000).await;
    let full_cpu = usage(pid).cpu_ticks - before;
    let s = gw.wait_status("the full stick reported", |s| s["backup"]["error"].is_string()).await;
    let error = s["backup"]["error"].as_str().unwrap();
    assert!(error.contains("No space left") || error.contains("space"), "{error}");
    assert!(s["problems"].to_string().contains("BACKUP NOT WRITTEN"), "{}", s["problems"]);

    // Read-only (a stick with its lock switch on): the same, and nothing written.
    stick.pull();
    stick.elsewhere(|at| std::fs::remove_file(at.join("filler")).unwrap());
    assert!(stick.plug(&["ro"]), "plug back read-only");
    let before = usage(pid).cpu_ticks;
    write_lines(&mut pty, &chips(1000..2000));
    wait_fake(&fake, &gw, "every passing delivered with a read-only stick", |s| s.total_passings() == 2000).await;
    let ro_cpu = usage(pid).cpu_ticks - before;
    let s = gw
        .wait_status("the read-only stick reported", |s| {
            s["backup"]["error"].as_str().is_some_and(|e| e.contains("Read-only"))
        })
        .await;
    assert_eq!(s["backup"]["mounted"], true);

    // Writable again: it catches up by itself.
    stick.pull();
    assert!(stick.plug(&[]), "plug back writable");
    file_with(&gw, &stick, 2000).await;
    let s = gw.wait_status("the error cleared", |s| null(s, "backup.error")).await;
    assert!(!s["problems"].to_string().contains("BACKUP"), "{}", s["problems"]);

    // As many reads with a working stick, for comparison.
    let before = usage(pid).cpu_ticks;
    write_lines(&mut pty, &chips(2000..3000));
    wait_fake(&fake, &gw, "delivered with a working stick", |s| s.total_passings() == 3000).await;
    let ok_cpu = usage(pid).cpu_ticks - before;
    println!(
        "gateway CPU per 1,000 reads (10 ms ticks): full stick {full_cpu}, read-only stick {ro_cpu}, working stick {ok_cpu}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_mount_a_directory_without_a_stick_is_left_alone() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let plain = tempfile::tempdir().unwrap();
    let gw = gateway(&fake, &device, &pty, plain.path(), "").await;
    gw.cli_ok(&["session", "start", "--alias", "NOSTICK"]);
    write_lines(&mut pty, &chips(0..10));
    wait_fake(&fake, &gw, "delivered", |s| s.total_passings() == 10).await;
    // Three passes after the passings are stored.
    let passes = gw.status()["backup"]["passes"].as_u64().unwrap();
    let s = gw.wait_status("three more passes", |s| s["backup"]["passes"].as_u64() >= Some(passes + 3)).await;
    assert_eq!(s["backup"]["mounted"], false);
    assert_eq!(std::fs::read_dir(plain.path()).unwrap().count(), 0, "nothing written on the SD card");
    assert!(s["problems"].to_string().contains("NO BACKUP STICK"), "{}", s["problems"]);
    drop(gw);

    // Without require_mount, the same directory is written: the check above could have failed.
    let gw = gateway(&fake, &device, &pty, plain.path(), "backup.require_mount = false").await;
    gw.cli_ok(&["session", "start", "--alias", "PLAIN"]);
    write_lines(&mut pty, &chips(10..12));
    let deadline = Instant::now() + DEADLINE;
    while std::fs::read_dir(plain.path()).unwrap().count() == 0 {
        assert!(Instant::now() < deadline, "not written without require_mount; log:\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status: Value = gw.status();
    assert_eq!(status["backup"]["mounted"], true);
}

/// A stick that hangs (a USB device that stops answering): the backup's write blocks in the
/// kernel. Stood in for by the stick's filesystem frozen (`fsfreeze`): every write to it waits,
/// as on a dead device. Reading, storing and uploading go on, status says so after 10 s, and a
/// stop is not held up by the stuck thread (the process ends once the stick answers again, as
/// it would once a dead stick is pulled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_stick_is_reported_and_holds_nothing_up() {
    let Some(stick) = Stick::new(16) else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = gateway(&fake, &device, &pty, &stick.mnt, "").await;
    gw.cli_ok(&["session", "start", "--alias", "HUNG"]);
    write_lines(&mut pty, &chips(0..10));
    file_with(&gw, &stick, 10).await;
    let frozen = Frozen::new(&stick.mnt);
    write_lines(&mut pty, &chips(10..2000));
    wait_fake(&fake, &gw, "every passing delivered while the stick hangs", |s| s.total_passings() == 2000).await;
    let s = gw
        .wait_status("the hung stick reported", |s| {
            s["backup"]["error"].as_str().is_some_and(|e| e.contains("does not answer"))
        })
        .await;
    assert!(s["problems"].to_string().contains("BACKUP NOT WRITTEN"), "{}", s["problems"]);
    // The race goes on.
    write_lines(&mut pty, &chips(2000..2100));
    wait_fake(&fake, &gw, "more passings delivered", |s| s.total_passings() == 2100).await;
    let stopped = Instant::now();
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + DEADLINE;
    while !gw.logs().contains("stopped cleanly") {
        assert!(Instant::now() < deadline, "the stop waited on the stuck thread; log:\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("stopped {:.2} s after SIGTERM with the backup thread stuck", stopped.elapsed().as_secs_f64());
    drop(frozen);
    assert_eq!(gw.terminate().await.code(), Some(0), "a clean stop despite the stuck thread");
}

/// A filesystem frozen for as long as this lives (thawed at the end, whatever happens).
struct Frozen(PathBuf);

impl Frozen {
    fn new(mnt: &Path) -> Frozen {
        assert!(Command::new("fsfreeze").arg("-f").arg(mnt).status().unwrap().success(), "fsfreeze");
        Frozen(mnt.to_path_buf())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).status();
    }
}
