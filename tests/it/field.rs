//! Fault injection against the real binary: unplugged readers, full and read-only storage,
//! corrupt databases, an unsynchronised clock, floods and retention. Each test states what was
//! lost to its fault (nothing, unless it says why).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use rufus_gateway::demo::fake_api::{Fault, Route};

const STRICT_CHIP: &str = r#"reader.pattern = '^(?P<chip>[0-9A-F]{8})$'"#;

fn delivered(fake: &rufus_gateway::demo::fake_api::FakeApi) -> usize {
    fake.state().total_passings()
}

/// The reader's cable is pulled and plugged back: the by-id link vanishes and returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplug_and_replug_the_reader() {
    let (fake, device) = fake().await;
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("usb-Reader_0001-if00-port0");
    let first = pty();
    std::os::unix::fs::symlink(&first.path, &link).unwrap();
    let mut gw = Gateway::new(&fake, &device, &link.display().to_string(), STRICT_CHIP);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "UNPLUG"]);
    let mut first = first;
    write_lines(&mut first, &chips(0..20));
    wait_fake(&fake, &gw, "20 delivered before the unplug", |s| s.total_passings() == 20).await;

    // Unplug: the device and its link disappear. The link goes first: once the pseudo-terminal
    // is closed its number may be handed to another test's, which the link must not lead to.
    let unplugged = Instant::now();
    std::fs::remove_file(&link).unwrap();
    drop(first);
    let status = gw.wait_status("reader shown disconnected", |s| s["reader"]["connected"] == false).await;
    println!("disconnection shown {:.2} s after the unplug", unplugged.elapsed().as_secs_f64());
    assert!(status["problems"].to_string().contains("READER NOT CONNECTED"));

    // Replug: a new device node behind the same link.
    let mut second = pty();
    std::os::unix::fs::symlink(&second.path, &link).unwrap();
    let replugged = Instant::now();
    gw.wait_status("reader reconnected", |s| s["reader"]["connected"] == true).await;
    let reopen = replugged.elapsed();
    println!("reopened {:.2} s after the replug", reopen.as_secs_f64());
    assert!(
        reopen < Duration::from_secs(5),
        "reopened after {reopen:?} (budget 2 s; 5 s allowed for a loaded machine)"
    );
    write_lines(&mut second, &chips(20..40));
    wait_fake(&fake, &gw, "40 delivered after the replug", |s| s.total_passings() == 40).await;
    assert_eq!(gw.status()["reader"]["reads_total"], 40, "lost to the unplug: 0 reads");
    assert!(gw.logs().contains("reader disconnected"));
}

/// Mount-based faults need root; CI runs as root and sets RUFUS_GATEWAY_REQUIRE_MOUNTS so that a
/// skip there is a failure, not a silent pass.
fn skip_mount_test(why: &str) {
    assert!(std::env::var_os("RUFUS_GATEWAY_REQUIRE_MOUNTS").is_none(), "required but impossible: {why}");
    println!("skipped: {why}");
}

/// A tmpfs of our own, unmounted on drop. None where mounting is not allowed (not root).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(SmallDisk { dir })
        } else {
            skip_mount_test("cannot mount a tmpfs here (needs root)");
            None
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fill what is left with a file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// The SD card fills up, then space returns. The gateway keeps reading and answering, holds reads
/// in memory, and catches up by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_recovers_by_itself() {
    let Some(disk) = SmallDisk::mount("4m") else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let db = disk.path().join("gateway.db");
    let extra = format!("{STRICT_CHIP}\nstorage.path = \"{}\"", db.display());
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "DISKFULL"]);
    write_lines(&mut pty, &chips(0..20));
    wait_fake(&fake, &gw, "20 delivered", |s| s.total_passings() == 20).await;

    // Disk full while a batch is in flight: its delivery cannot be recorded either.
    fake.push_fault(Route::Passings, Fault::Delay(Duration::from_millis(800)));
    write_lines(&mut pty, &chips(20..40));
    wait_fake(&fake, &gw, "a slow batch in flight", |s| {
        s.requests.iter().filter(|r| r.path == "/passings").count() >= 2
    })
    .await;
    let filler = disk.fill();
    write_lines(&mut pty, &chips(40..340));
    let status = gw.wait_status("the full disk reported", |s| s["storage"]["error"].is_string()).await;
    println!("while full: {}", status["storage"]);
    assert!(status["problems"][0].as_str().unwrap().contains("DATABASE CANNOT BE WRITTEN"), "{status:#}");
    gw.wait_status("reads held in memory", |s| s["reader"]["reads_total"] == 340).await;
    assert!(gw.logs().contains("cannot write to the database"));
    std::fs::remove_file(filler).unwrap();
    let status = gw.wait_status("recovered and all delivered", |s| s["queue"]["delivered"] == 340).await;
    assert!(null(&status, "storage.error"));
    assert_eq!(status["storage"]["dropped_reads"], 0, "lost to the full disk: 0 reads (the memory buffer held them)");
    println!(
        "delivery records refused by the full disk and recorded later: {}",
        gw.logs().contains("recording it again later")
    );

    assert_eq!(delivered(&fake), 340);
    let nums: Vec<i64> = fake.state().sessions[0].passings.keys().copied().collect();
    assert_eq!(nums, (1..=340).collect::<Vec<_>>(), "gap-free, in order");
    assert_eq!(fake.state().sessions[0].conflicts, 0);
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// An ext4 file system of our own on a loop device, mounted with `errors=remount-ro` like a Pi's
/// root. `fail` makes the kernel turn it read-only at once (what a failing SD card does);
/// `repair` is the operator's fix: the image checked with e2fsck and mounted again in its place.
struct Ext4Disk {
    images: tempfile::TempDir,
    mnt: PathBuf,
    image: std::cell::Cell<u32>,
}

impl Ext4Disk {
    fn mount() -> Option<Ext4Disk> {
        let images = tempfile::tempdir().ok()?;
        let mnt = images.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        let img = images.path().join("card0.img");
        std::fs::File::create(&img).ok()?.set_len(32 << 20).ok()?;
        let made = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img).status().is_ok_and(|s| s.success());
        let disk = Ext4Disk { images, mnt, image: std::cell::Cell::new(0) };
        if made && disk.mount_image(&img) {
            Some(disk)
        } else {
            skip_mount_test("cannot make and mount an ext4 loop device here (needs root)");
            None
        }
    }

    fn mount_image(&self, img: &Path) -> bool {
        Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(img)
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The kernel finds an error and remounts the file system read-only (`trigger_fs_error`).
    fn fail(&self) {
        let out = Command::new("findmnt").args(["-no", "SOURCE"]).arg(&self.mnt).output().unwrap();
        let source = String::from_utf8(out.stdout).unwrap();
        let dev = Path::new(source.trim()).file_name().unwrap().to_str().unwrap().to_string();
        std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), "rufus-gateway test: the card fails\n").unwrap();
        let probe = std::fs::write(self.mnt.join("probe"), b"x").unwrap_err();
        assert_eq!(probe.raw_os_error(), Some(30), "the file system is read-only now: {probe}");
    }

    /// A new, empty card in place of the failed one.
    fn replace(&self) {
        self.image.set(self.image.get() + 1);
        let img = self.images.path().join(format!("card{}.img", self.image.get()));
        std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        assert!(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img).status().unwrap().success());
        assert!(Command::new("umount").arg("-l").arg(&self.mnt).status().unwrap().success());
        assert!(self.mount_image(&img), "mount the new card");
    }

    /// Check a copy of the image and mount it in place of the failed one.
    fn repair(&self) {
        let from = self.images.path().join(format!("card{}.img", self.image.get()));
        self.image.set(self.image.get() + 1);
        let to = self.images.path().join(format!("card{}.img", self.image.get()));
        std::fs::copy(&from, &to).unwrap();
        let fsck = Command::new("e2fsck").args(["-f", "-y"]).arg(&to).output().unwrap();
        assert!(fsck.status.code().is_some_and(|c| c <= 1), "e2fsck: {fsck:?}");
        assert!(Command::new("umount").arg("-l").arg(&self.mnt).status().unwrap().success());
        assert!(self.mount_image(&to), "mount the repaired image");
    }
}

impl Drop for Ext4Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// The card turns read-only in the middle of a race (ext4 `errors=remount-ro`): the gateway keeps
/// reading and answering, says so, keeps new reads in memory, still delivers what it had
/// committed (without resending it in a loop), and takes up the repaired card by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_that_turns_read_only_is_survived_and_taken_up_again() {
    let Some(disk) = Ext4Disk::mount() else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = format!(
        "{STRICT_CHIP}\nstorage.path = \"{}\"\nhttp.listen = \"127.0.0.1:0\"\nhttp.token = \"read-only-test-token\"",
        disk.mnt.join("gateway.db").display()
    );
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "READONLY"]);
    wait_fake(&fake, &gw, "remote session", |s| s.sessions.len() == 1).await;

    // 20 passings committed while the API is away; their batch is in flight when the card fails,
    // so the delivery cannot be recorded.
    fake.stop_listening();
    write_lines(&mut pty, &chips(0..20));
    gw.wait_status("20 pending", |s| s["queue"]["pending"] == 20).await;
    fake.push_fault(Route::Passings, Fault::Delay(Duration::from_millis(1500)));
    fake.resume().await.unwrap();
    wait_fake(&fake, &gw, "the batch of 20 in flight", |s| s.requests.iter().any(|r| r.batch == 20)).await;
    disk.fail();
    wait_fake(&fake, &gw, "20 delivered", |s| s.total_passings() == 20).await;

    // New reads while the card is read-only: held in memory, said plainly.
    write_lines(&mut pty, &chips(20..50));
    let status = gw
        .wait_status("30 reads held in memory", |s| {
            s["storage"]["buffered_reads"] == 30 && s["reader"]["reads_total"] == 50
        })
        .await;
    println!("while read-only: {}", status["storage"]);
    assert!(status["problems"][0].to_string().contains("DATABASE CANNOT BE WRITTEN"), "{status:#}\n{}", gw.logs());
    let error = status["storage"]["error"].as_str().unwrap();
    assert!(error.contains("Read-only file system"), "the system's reason is shown: {error}");
    let logs = gw.logs();
    assert!(logs.contains("cannot write to the database"), "{logs}");
    assert!(logs.contains("recording it again later"), "the delivery's record failed: {logs}");
    // The writer tries the card again (every 2 s) and is not fooled by a file it can only read.
    gw.wait_status("a reopening refused", |s| {
        let e = s["storage"]["error"].to_string();
        e.contains("readonly database") || e.contains("only be opened for reading")
    })
    .await;
    assert!(!gw.logs().contains("database opened again"));
    // A session change asked for now fails for the box's reason, not the user's: 503.
    let url = format!("http://{}/api/session/close", gw.status()["listening"]["http"].as_str().unwrap());
    let close = http_client().post(url).bearer_auth("read-only-test-token").send().await.unwrap();
    assert_eq!(close.status(), 503, "{:?}", close.text().await);
    assert_eq!(gw.status()["session"]["state"], "open", "nothing changed");

    disk.repair();
    let status = gw.wait_status("all 50 delivered and recorded", |s| s["queue"]["delivered"] == 50).await;
    assert!(null(&status, "storage.error"), "{status:#}");
    assert_eq!(status["storage"]["dropped_reads"], 0, "lost to the read-only card: 0 reads (held in memory)");
    assert_eq!(status["queue"]["pending"], 0);
    assert_eq!(gw.logs().matches("database opened again").count(), 1);

    {
        let state = fake.state();
        let nums: Vec<i64> = state.sessions[0].passings.keys().copied().collect();
        assert_eq!(nums, (1..=50).collect::<Vec<_>>(), "gap-free, in order");
        assert_eq!(state.sessions[0].conflicts, 0);
        // The delivered batch was recorded later, not resent in a loop while the card was read-only.
        let posts = state.requests.iter().filter(|r| r.path == "/passings").count();
        assert!(posts <= 8, "{posts} passing requests for 50 passings");
        println!("passing requests: {posts}; duplicates reported: {}", state.sessions[0].duplicates);
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// The failed card is swapped for a new, empty one while a delivery is still unrecorded: the
/// fresh database numbers a new session from 1 again, and nothing meant for the old session
/// (the uplink's cursor, the unrecorded delivery) may touch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_card_gets_a_fresh_database_and_nothing_of_the_old_one() {
    let Some(disk) = Ext4Disk::mount() else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = format!("{STRICT_CHIP}\nstorage.path = \"{}\"", disk.mnt.join("gateway.db").display());
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "OLDCARD"]);
    wait_fake(&fake, &gw, "remote session", |s| s.sessions.len() == 1).await;
    fake.stop_listening();
    write_lines(&mut pty, &chips(0..20));
    gw.wait_status("20 pending", |s| s["queue"]["pending"] == 20).await;
    fake.push_fault(Route::Passings, Fault::Delay(Duration::from_millis(1500)));
    fake.resume().await.unwrap();
    wait_fake(&fake, &gw, "the batch of 20 in flight", |s| s.requests.iter().any(|r| r.batch == 20)).await;
    disk.fail();
    wait_fake(&fake, &gw, "20 delivered", |s| s.total_passings() == 20).await;
    gw.wait_status("the failed card reported", |s| s["storage"]["error"].is_string()).await;

    disk.replace();
    gw.wait_status("the new card in use", |s| null(s, "storage.error")).await;
    gw.cli_ok(&["session", "start", "--alias", "NEWCARD"]);
    write_lines(&mut pty, &chips(100..125));
    wait_fake(&fake, &gw, "the new session's 25 delivered", |s| {
        s.sessions.len() == 2 && s.sessions[1].passings.len() == 25
    })
    .await;
    let status = gw.wait_status("all delivered and recorded", |s| s["queue"]["pending"] == 0).await;
    assert_eq!(status["queue"]["delivered"], 25, "{status:#}");
    assert!(gw.logs().contains("does not hold"), "the old delivery was not recorded in the new database");
    {
        let state = fake.state();
        let nums: Vec<i64> = state.sessions[1].passings.keys().copied().collect();
        assert_eq!(nums, (1..=25).collect::<Vec<_>>(), "the new session numbered from 1, none skipped");
        assert_eq!(state.sessions[0].passings.len(), 20);
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// A directory bind-mounted read-only over itself: storage that refuses writes from the start.
struct ReadOnlyDir {
    dir: tempfile::TempDir,
}

impl ReadOnlyDir {
    fn mount() -> Option<ReadOnlyDir> {
        let dir = tempfile::tempdir().ok()?;
        let bind = Command::new("mount").arg("--bind").arg(dir.path()).arg(dir.path()).status();
        let ro = bind.is_ok_and(|s| s.success())
            && Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
        if ro {
            Some(ReadOnlyDir { dir })
        } else {
            skip_mount_test("cannot bind-mount read-only here (needs root)");
            None
        }
    }

    fn make_writable(&self) {
        let ok = Command::new("mount").args(["-o", "remount,bind,rw"]).arg(self.dir.path()).status().unwrap();
        assert!(ok.success());
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Booting with read-only storage: no restart loop. The daemon comes up, reads into memory, says
/// why, and opens the database (and the automatic session) by itself once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_on_read_only_storage_reads_into_memory_until_it_is_writable() {
    let Some(ro) = ReadOnlyDir::mount() else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = format!(
        "{STRICT_CHIP}\nstorage.path = \"{}\"\nsession.auto_start = true\nsession.alias = \"ROSTART\"",
        ro.dir.path().join("gateway.db").display()
    );
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    let status = gw.wait_status("storage reported", |s| s["storage"]["error"].is_string()).await;
    println!("at start: {}", status["storage"]);
    let error = status["storage"]["error"].as_str().unwrap();
    assert!(error.contains("Read-only file system"), "the system's reason is shown: {error}");
    assert!(status["problems"][0].as_str().unwrap().contains("DATABASE CANNOT BE WRITTEN"), "{status:#}");
    assert!(gw.logs().contains("STORAGE UNAVAILABLE"));
    // Asking for a change that must be written is refused plainly, not hung.
    let start = gw.cli(&["session", "start", "--alias", "NOPE"]);
    assert!(!start.status.success());

    write_lines(&mut pty, &chips(0..25));
    gw.wait_status("25 reads held in memory", |s| s["storage"]["buffered_reads"] == 25).await;
    assert_eq!(delivered(&fake), 0);

    ro.make_writable();
    let status = gw.wait_status("all 25 delivered", |s| s["queue"]["delivered"] == 25).await;
    assert!(null(&status, "storage.error"), "{status:#}");
    assert_eq!(status["storage"]["dropped_reads"], 0, "lost to the read-only start: 0 reads");
    assert_eq!(status["session"]["alias"], "ROSTART");
    {
        let state = fake.state();
        assert_eq!(state.sessions.len(), 1);
        let nums: Vec<i64> = state.sessions[0].passings.keys().copied().collect();
        assert_eq!(nums, (1..=25).collect::<Vec<_>>());
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Stopped while the storage is still read-only: the reads held in memory are not silently lost;
/// they leave in one log entry (journald's field READS), as CSV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_could_not_be_written_are_logged_at_stop() {
    let Some(ro) = ReadOnlyDir::mount() else { return };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = format!("{STRICT_CHIP}\nstorage.path = \"{}\"", ro.dir.path().join("gateway.db").display());
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    write_lines(&mut pty, &chips(0..7));
    gw.wait_status("7 reads held in memory", |s| s["storage"]["buffered_reads"] == 7).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let logs = gw.logs();
    let entry = logs.lines().skip_while(|l| !l.contains("UNWRITTEN READS")).collect::<Vec<_>>().join("\n");
    assert!(!entry.is_empty(), "{logs}");
    for chip in chips(0..7) {
        assert!(entry.contains(&format!(",{chip},")), "{chip} kept in the log entry:\n{entry}");
    }
    println!("lost to a stop on read-only storage: 0 reads unaccounted (7 in the log entry)");
}

/// A database that is not a database, and one with damaged pages: moved aside, fresh start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_moved_aside() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);

    // 1. Garbage where the database should be.
    std::fs::write(&gw.db, vec![0x5a; 64 * 1024]).unwrap();
    gw.start().await;
    let aside = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains("corrupt"))
            .collect()
    };
    assert_eq!(aside(gw.dir.path()).len(), 1, "moved aside: {:?}", aside(gw.dir.path()));
    assert!(gw.logs().contains("DATABASE CORRUPT"));
    gw.cli_ok(&["session", "start", "--alias", "FRESH"]);
    write_lines(&mut pty, &chips(0..30));
    wait_fake(&fake, &gw, "30 delivered on the fresh database", |s| s.total_passings() == 30).await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    // 2. Damaged pages inside a real database (a power cut on a bad SD card).
    let len = std::fs::metadata(&gw.db).unwrap().len();
    assert!(len > 16 * 1024, "database has pages to damage ({len} bytes)");
    let mut bytes = std::fs::read(&gw.db).unwrap();
    for b in &mut bytes[4096..len as usize - 1024] {
        *b = 0xA5;
    }
    std::fs::write(&gw.db, bytes).unwrap();
    gw.start().await;
    assert_eq!(aside(gw.dir.path()).len(), 2, "{:?}", aside(gw.dir.path()));
    gw.cli_ok(&["session", "start", "--alias", "AGAIN"]);
    write_lines(&mut pty, &chips(30..35));
    wait_fake(&fake, &gw, "5 more delivered", |s| s.total_passings() == 35).await;
}

/// Host time before NTP: passings wait, are corrected when the clock synchronises, then sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passings_wait_for_the_clock_and_are_corrected() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let flags = tempfile::tempdir().unwrap();
    let flag = flags.path().join("synchronized");
    let extra = format!("{STRICT_CHIP}\nclock.source = \"timesyncd\"\nclock.timesyncd_flag = \"{}\"", flag.display());
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "CLOCK"]);
    let mut written = Vec::new();
    for chip in chips(0..10) {
        written.push(chrono::Utc::now());
        pty.write(format!("{chip}\n").as_bytes()).unwrap();
    }
    let status = gw.wait_status("10 waiting for the clock", |s| s["queue"]["waiting_for_clock"] == 10).await;
    assert_eq!(status["clock"]["synchronized"], false);
    assert!(status["problems"].to_string().contains("WAIT FOR THE CLOCK"), "{status:#}");
    assert_eq!(delivered(&fake), 0, "nothing sent with an unsynchronised timestamp");
    let export = gw.cli_ok(&["export", "--reads"]);
    assert!(export.lines().skip(1).all(|l| l.contains(",false,")), "reads record the unsynchronised flag:\n{export}");

    std::fs::write(&flag, b"").unwrap();
    wait_fake(&fake, &gw, "10 delivered once synchronised", |s| s.total_passings() == 10).await;
    assert!(gw.logs().contains("corrected the host timestamps"));
    // The clock here was right all along, so the correction must leave the times where they were.
    let state = fake.state();
    for (num, p) in &state.sessions[0].passings {
        let t: chrono::DateTime<chrono::Utc> = p.timestamp.parse().unwrap();
        let lag = (t - written[(*num - 1) as usize]).num_milliseconds();
        assert!((-2..=250).contains(&lag), "passing {num}: corrected time is {lag} ms from the write");
    }
}

/// Without synchronisation the hold ends after `clock.max_hold`: sent as they are, with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_passings_go_after_max_hold() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let flags = tempfile::tempdir().unwrap();
    let extra = format!(
        "{STRICT_CHIP}\nclock.source = \"timesyncd\"\nclock.timesyncd_flag = \"{}\"\nclock.max_hold = \"1s\"",
        flags.path().join("never").display()
    );
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "HOLD"]);
    write_lines(&mut pty, &chips(0..5));
    wait_fake(&fake, &gw, "5 delivered after max_hold", |s| s.total_passings() == 5).await;
    assert!(gw.logs().contains("clock not synchronised in time"));
    let status = gw.status();
    assert_eq!(status["queue"]["waiting_for_clock"], 0);
}

/// A mass start: 20,000 lines as fast as the pseudo-terminal takes them, all delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_absorbed_with_bounded_memory() {
    let (fake, device) = fake().await;
    let pty = pty();
    let mut gw =
        Gateway::new(&fake, &device, &pty.path.display().to_string(), &format!("{STRICT_CHIP}\nlog.level = \"info\""));
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "FLOOD"]);
    let pid = gw.pid();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut pty = pty;
        let block: String = chips(0..20_000).iter().map(|c| format!("{c}\n")).collect();
        pty.write(block.as_bytes()).unwrap();
        pty
    });
    wait_fake(&fake, &gw, "20,000 delivered", |s| s.total_passings() == 20_000).await;
    let elapsed = started.elapsed();
    let _pty = writer.join().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| -> u64 {
        status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
    };
    let (peak, now) = (kb("VmHWM:"), kb("VmRSS:"));
    println!(
        "flood: 20,000 lines delivered in {:.2} s (debug build); peak RSS {:.1} MB, RSS after {:.1} MB",
        elapsed.as_secs_f64(),
        peak as f64 / 1024.0,
        now as f64 / 1024.0
    );
    let nums: Vec<i64> = fake.state().sessions[0].passings.keys().copied().collect();
    assert_eq!(nums, (1..=20_000).collect::<Vec<_>>());
    // Under qemu-user (packaging/cross.sh --test) the process the kernel measures is the
    // emulator: its translation cache and its own heap are in that figure, so it says nothing
    // about the gateway's memory.
    if std::env::var_os("RUFUS_GATEWAY_EMULATED").is_some() {
        println!("peak RSS not checked under emulation (qemu's own memory is counted in it)");
    } else {
        assert!(peak < 64 * 1024, "peak RSS {peak} kB: memory must stay bounded");
    }
}

/// Retention: delivered rows of a finished session are pruned; undelivered ones never are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_delivered_rows_only() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(
        &fake,
        &device,
        &pty.path.display().to_string(),
        &format!("{STRICT_CHIP}\nstorage.retention = \"2s\""),
    );
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "OLD"]);
    write_lines(&mut pty, &chips(0..10));
    wait_fake(&fake, &gw, "10 delivered", |s| s.total_passings() == 10).await;
    gw.cli_ok(&["session", "close"]);
    wait_fake(&fake, &gw, "closed remotely", |s| !s.sessions[0].active).await;
    fake.stop_listening();
    gw.cli_ok(&["session", "start", "--alias", "NEW"]);
    write_lines(&mut pty, &chips(10..15));
    gw.wait_status("5 pending", |s| s["queue"]["pending"] == 5).await;

    let counts = |gw: &Gateway| -> (i64, i64) {
        let c = gw.sql();
        (
            c.query_row("SELECT count(*) FROM passings", [], |r| r.get(0)).unwrap(),
            c.query_row("SELECT count(*) FROM reads", [], |r| r.get(0)).unwrap(),
        )
    };
    let deadline = Instant::now() + DEADLINE;
    while counts(&gw) != (5, 5) {
        assert!(Instant::now() < deadline, "not pruned: {:?}\n{}", counts(&gw), gw.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["session", "list", "--json"])).unwrap();
    assert_eq!(list[0]["delivered"], 10, "session counters survive pruning");
    assert_eq!(list[1]["pending"], 5);
    fake.resume().await.unwrap();
    wait_fake(&fake, &gw, "the 5 pending delivered", |s| s.total_passings() == 15).await;
}

/// The wall clock jumps back two hours, then forward three, while the gateway runs (libfaketime
/// moves the daemon's clock; nothing else on the machine is touched). Passings keep the order
/// they were read in, and a passing's time, once taken, never changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_neither_reorders_nor_re_times_passings() {
    // Debian puts it under the multiarch directory of the machine's architecture.
    let found = std::fs::read_dir("/usr/lib").ok().and_then(|dirs| {
        dirs.filter_map(Result::ok)
            .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
            .find(|candidate| candidate.exists())
    });
    let Some(lib) = found else {
        assert!(
            std::env::var_os("RUFUS_GATEWAY_REQUIRE_FAKETIME").is_none(),
            "libfaketime required (apt-get install faketime)"
        );
        println!("skipped: needs libfaketime (Debian package faketime; .ci/run installs it)");
        return;
    };
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    let offset = gw.dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    gw.env = vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE".into(), offset.display().to_string()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "JUMP"]);
    let chips = chips(0..15);
    let timestamps = |fake: &rufus_gateway::demo::fake_api::FakeApi| -> Vec<chrono::DateTime<chrono::Utc>> {
        fake.state().sessions[0].passings.values().map(|p| p.timestamp.parse().unwrap()).collect()
    };
    write_lines(&mut pty, &chips[0..5]);
    wait_fake(&fake, &gw, "5 before the jump", |s| s.total_passings() == 5).await;
    let before = timestamps(&fake);

    std::fs::write(&offset, "-2h\n").unwrap();
    write_lines(&mut pty, &chips[5..10]);
    wait_fake(&fake, &gw, "5 after jumping back", |s| s.total_passings() == 10).await;
    std::fs::write(&offset, "+1h\n").unwrap();
    write_lines(&mut pty, &chips[10..15]);
    wait_fake(&fake, &gw, "5 after jumping forward", |s| s.total_passings() == 15).await;

    let state = fake.state();
    let session = &state.sessions[0];
    let order: Vec<&str> = session.passings.values().map(|p| p.chip.as_deref().unwrap()).collect();
    assert_eq!(order, chips.iter().map(String::as_str).collect::<Vec<_>>(), "numbered in the order read");
    assert_eq!(session.conflicts, 0);
    drop(state);
    let after = timestamps(&fake);
    assert_eq!(&after[..5], &before[..], "earlier passings keep their time");
    let back = (after[4] - after[5]).num_minutes();
    let forward = (after[10] - after[9]).num_minutes();
    println!("host clock jumped: {back} min back, then {forward} min forward; numbering kept read order");
    assert!((115..=121).contains(&back), "the jump back shows in host timestamps: {back} min");
    assert!((175..=181).contains(&forward), "the jump forward shows: {forward} min");
    // The database agrees with the server: nothing was re-timed afterwards.
    let stored: Vec<String> = gw
        .sql()
        .prepare("SELECT timestamp FROM passings ORDER BY num_passing")
        .unwrap()
        .query_map([], |r| Ok(rufus_gateway::clock::api_timestamp(r.get(0)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let sent: Vec<String> = fake.state().sessions[0].passings.values().map(|p| p.timestamp.clone()).collect();
    assert_eq!(stored, sent);
}
