//! A live copy of every passing on a USB stick (`[backup]`): one CSV per session, appended every
//! `backup.interval` and synced, that RUFUS Race Manager's backup import reads (Chip, BIB, Date,
//! Time columns).
//!
//! The file is its own record of what it holds: at each pass the last complete line gives the
//! last `num_passing` written (a line torn by a pulled stick is cut off first), and what the
//! database has after it is appended. So a stick pulled and plugged back, or another stick,
//! gets exactly what it misses: never a duplicated or a missing row.
//!
//! Optional and isolated: a thread of its own with its own read connection; nothing waits for
//! it. A stick that hangs leaves that thread stuck, and `status.backup.error` says so.
//!
//! The stick is a foreign filesystem: a file on it is opened without following a symbolic link,
//! and written only if it is a regular file on the stick itself; a new one is created exclusively.
//! A file is appended to only if its last row is this session's row of that number (same chip,
//! same time): a file of the same name from an earlier race, or a reset database, or a forged
//! last line, is left alone and reported, and the session is written under the next free name
//! (`…-2.csv`).

use std::collections::HashMap;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::BackupConfig;

mod files;
use crate::store::query::{Db, PassingRow, SessionRow};
use files::{Found, candidates, cells, left_alone, open_file};

/// The header RUFUS Race Manager's import maps (Chip, BIB, Date, Time), and what identifies a row.
pub const HEADER: &str = "num_passing,bib,chip,date,time,timestamp,session_id,alias,state";
/// The raw reads beside it (`backup.reads`); `read_id` is what a pass resumes from.
pub const READS_HEADER: &str = "read_id,received_at,chip,antenna,rssi,reader_time,session_id";
/// A pass that takes longer than this (a hung USB device) is reported.
const STALL: Duration = Duration::from_secs(10);
/// Rows read from the database per query.
const PAGE: i64 = 2_000;

/// `status.backup`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupStatus {
    pub dir: String,
    /// The directory is there and (with `require_mount`) a mount point: a stick is in.
    pub mounted: bool,
    pub last_written_at: Option<String>,
    /// Rows appended since the gateway started.
    pub rows: u64,
    /// Passes made since the gateway started (one each `backup.interval`).
    #[serde(default)]
    pub passes: u64,
    pub error: Option<String>,
    /// Files on the stick left alone in the last pass, and why (a link, not a regular file,
    /// another race's file): the sessions were written under other names.
    #[serde(default)]
    pub left_alone: Option<String>,
    /// Since when the current pass has been running, while it is (UTC µs; 0 = idle).
    #[serde(skip)]
    pub busy_since_us: i64,
}

impl BackupStatus {
    /// The status as shown: a pass running longer than 10 s (a hung stick) is an error.
    pub fn shown(&self, now_us: i64) -> BackupStatus {
        let mut s = self.clone();
        if s.busy_since_us > 0 && now_us - s.busy_since_us > STALL.as_micros() as i64 {
            s.error = Some(format!(
                "the stick does not answer: a write has been waiting {} s (pull it and plug it back)",
                (now_us - s.busy_since_us) / 1_000_000
            ));
        }
        s
    }
}

/// The file of a session: `rufus-gateway-<hostname>-<session id>-<alias>.csv`, with what FAT
/// cannot hold (`:` and the like) replaced.
pub fn file_name(host: &str, session_id: i64, alias: &str) -> String {
    let safe = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect()
    };
    format!("rufus-gateway-{}-{session_id}-{}.csv", safe(host), safe(alias))
}

/// Whether `dir` is a mount point: listed in this process's mount table.
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else { return false };
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|table| listed(&table, &dir))
}

/// Whether a mount table (`/proc/self/mountinfo`, mount point in the fifth field) lists `dir`.
fn listed(table: &str, dir: &Path) -> bool {
    table.lines().any(|line| line.split(' ').nth(4).is_some_and(|point| unescape(point) == dir.as_os_str()))
}

/// Mount table paths escape space, tab, newline and backslash as octal.
fn unescape(s: &str) -> std::ffi::OsString {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    std::os::unix::ffi::OsStringExt::from_vec(out)
}

/// The box's local date (`YYYY-MM-DD`) and time (`HH:MM:SS.mmm`) of a UTC instant, as RUFUS Race
/// Manager's import splits them.
pub fn local_date_time(utc_us: i64) -> (String, String) {
    let local = chrono::DateTime::from_timestamp_micros(utc_us).unwrap_or_default().with_timezone(&chrono::Local);
    (local.format("%Y-%m-%d").to_string(), local.format("%H:%M:%S%.3f").to_string())
}

/// A passing of `session` as a backup row (without its line end).
pub fn row(p: &PassingRow, session: &SessionRow) -> String {
    let (date, time) = local_date_time(p.timestamp_us);
    let (num, id) = (p.num_passing.to_string(), session.id.to_string());
    let ts = crate::clock::api_timestamp(p.timestamp_us);
    // `csv_line` neutralises every text cell and quotes as needed; its `\n` is the caller's.
    crate::csv_cell::csv_line(&[&num, &p.bib, &p.chip, &date, &time, &ts, &id, &session.alias, &p.state])
        .trim_end_matches('\n')
        .to_string()
}

pub struct Backup {
    cfg: BackupConfig,
    dir: PathBuf,
    db_path: PathBuf,
    host: String,
    status: Arc<Mutex<BackupStatus>>,
    /// Per session: the last `num_passing` known to be in its file, while the same stick is in.
    written: HashMap<i64, i64>,
    /// Per session (and `true` for its reads file): the file found to be its own on this stick.
    chosen: HashMap<(i64, bool), PathBuf>,
    /// Files on this stick left alone, and why (reported while the same stick is in).
    refused: Vec<String>,
    /// Closed sessions whose reads file is complete on this stick.
    reads_done: std::collections::HashSet<i64>,
    /// The mount the cache belongs to (device id of `dir`).
    mounted_dev: Option<u64>,
    db: Option<Db>,
}

impl Backup {
    /// None when `backup.dir` is not set.
    pub fn new(cfg: &BackupConfig, db_path: &Path, status: Arc<Mutex<BackupStatus>>) -> Option<Backup> {
        let dir = cfg.dir.clone()?;
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        if let Ok(mut s) = status.lock() {
            s.dir = dir.display().to_string();
        }
        Some(Backup {
            cfg: cfg.clone(),
            dir,
            db_path: db_path.to_path_buf(),
            host,
            status,
            written: HashMap::new(),
            chosen: HashMap::new(),
            refused: Vec::new(),
            reads_done: Default::default(),
            mounted_dev: None,
            db: None,
        })
    }

    /// Run on a thread of its own until `stop` is set.
    pub fn run(mut self, stop: Arc<std::sync::atomic::AtomicBool>) {
        let mut last_error: Option<String> = None;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let started = Instant::now();
            self.update(|s| s.busy_since_us = crate::clock::now_us());
            let result = self.pass();
            self.update(|s| s.busy_since_us = 0);
            let error = result.err().map(|e| format!("{e:#}"));
            if error != last_error {
                match &error {
                    Some(e) => warn!(dir = %self.dir.display(), error = %e, "cannot write the backup; retrying"),
                    None if last_error.is_some() => info!(dir = %self.dir.display(), "backup written again"),
                    None => {}
                }
                last_error = error.clone();
            }
            self.update(|s| {
                s.error = error.clone();
                s.passes += 1;
            });
            let wait = self.cfg.interval.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
            let until = Instant::now() + wait;
            while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut BackupStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// One pass: is a stick in? Then append to each session's file what it lacks.
    fn pass(&mut self) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let present = self.dir.is_dir() && (!self.cfg.require_mount || is_mount_point(&self.dir));
        self.update(|s| s.mounted = present);
        if !present {
            // Nothing is written to a directory that is not a stick: the SD card never fills.
            self.mounted_dev = None;
            self.written.clear();
            self.chosen.clear();
            self.refused.clear();
            self.update(|s| s.left_alone = None);
            self.reads_done.clear();
            return Ok(());
        }
        let dev = std::fs::metadata(&self.dir)?.dev();
        if self.mounted_dev != Some(dev) {
            // Another stick, or the same one plugged back: its files say what they hold.
            self.written.clear();
            self.chosen.clear();
            self.reads_done.clear();
            self.refused.clear();
            self.mounted_dev = Some(dev);
        }
        if self.db.is_none() {
            self.db = Some(Db::open_readonly(&self.db_path)?);
        }
        let sessions = match self.db.as_ref().map(Db::sessions) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                self.db = None;
                return Err(e.into());
            }
            None => return Ok(()),
        };
        // Chip checks stay on the box: the stick holds races.
        for session in sessions.iter().filter(|s| !s.test) {
            if self.cfg.reads {
                self.session_reads(session)?;
            }
            if session.passings == 0 || self.written.get(&session.id).is_some_and(|last| *last >= session.passings) {
                continue;
            }
            self.session(session)?;
        }
        let note = (!self.refused.is_empty()).then(|| self.refused.join("; "));
        let before = self.status.lock().ok().and_then(|s| s.left_alone.clone());
        if note != before
            && let Some(note) = &note
        {
            warn!(dir = %self.dir.display(), files = %note, "files on the backup stick left alone; the sessions are written under other names");
        }
        self.update(|s| s.left_alone = note);
        Ok(())
    }

    /// The session's file on this stick (`reads`: its reads file): the one of its name if that is
    /// its own (`own(last, last_line)`), else the next free name; files left alone are noted.
    fn open_own(
        &mut self,
        session: &SessionRow,
        reads: bool,
        own: impl Fn(&Db, i64, &str) -> rusqlite::Result<bool>,
    ) -> anyhow::Result<Found> {
        let dev = self.mounted_dev.ok_or_else(|| anyhow::anyhow!("no stick"))?;
        let (header, base) = if reads {
            let name = file_name(&self.host, session.id, &session.alias);
            (READS_HEADER, format!("{}-reads.csv", name.trim_end_matches(".csv")))
        } else {
            (HEADER, file_name(&self.host, session.id, &session.alias))
        };
        if let Some(path) = self.chosen.get(&(session.id, reads)) {
            return Ok(open_file(path, header, dev)?);
        }
        let db = self.db.as_ref().ok_or_else(|| anyhow::anyhow!("no database"))?;
        for name in candidates(&base) {
            let path = self.dir.join(&name);
            match open_file(&path, header, dev) {
                Ok(found) if found.last == 0 || own(db, found.last, &found.last_line)? => {
                    self.chosen.insert((session.id, reads), path);
                    return Ok(found);
                }
                Ok(found) => left_alone(
                    &mut self.refused,
                    format!(
                        "{name}: its last row (#{}) is not session {}'s (an earlier race, or a reset database)",
                        found.last, session.id
                    ),
                ),
                // Not a file of ours to write (a link, a FIFO, another filesystem): the next name.
                Err(e) if e.raw_os_error().is_none() => left_alone(&mut self.refused, format!("{name}: {e}")),
                // The stick itself fails (full, read-only, gone): said as it is, retried.
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("no file of session {} can be written on the stick", session.id)
    }

    fn session(&mut self, session: &SessionRow) -> anyhow::Result<()> {
        // Its own: the last row is this session's row of that number, the same chip at the same
        // time (the state column changes as passings are delivered).
        let Found { mut file, mut last, .. } = self.open_own(session, false, |db, last, line| {
            let cells = cells(line);
            Ok(last <= session.passings
                && db.passings_since(session.id, last - 1, 1)?.first().is_some_and(|r| {
                    let mine = self::cells(&row(r, session));
                    r.num_passing == last && cells.get(2) == mine.get(2) && cells.get(5) == mine.get(5)
                }))
        })?;
        let db = self.db.as_ref().ok_or_else(|| anyhow::anyhow!("no database"))?;
        let mut appended = 0u64;
        loop {
            let rows = db.passings_since(session.id, last, PAGE)?;
            if rows.is_empty() {
                break;
            }
            let mut text = String::with_capacity(rows.len() * 96);
            for r in &rows {
                text.push_str(&row(r, session));
                text.push('\n');
            }
            file.write_all(text.as_bytes())?;
            last = rows.last().map_or(last, |r| r.num_passing);
            appended += rows.len() as u64;
        }
        if appended > 0 {
            file.sync_all()?;
            let now = crate::clock::rfc3339(crate::clock::now_us());
            self.update(|s| {
                s.rows += appended;
                s.last_written_at = Some(now);
            });
        }
        self.written.insert(session.id, last);
        Ok(())
    }

    /// The session's raw reads (`backup.reads`), by read id; a closed session found complete is
    /// not looked at again while the same stick is in.
    fn session_reads(&mut self, session: &SessionRow) -> anyhow::Result<()> {
        if self.reads_done.contains(&session.id) {
            return Ok(());
        }
        // Its own: the last row is this session's read of that id (same arrival, same chip).
        let Found { mut file, mut last, .. } = self.open_own(session, true, |db, last, line| {
            let cells = cells(line);
            let mine = db.read_of_session(last, session.id)?;
            Ok(mine.is_some_and(|(at, chip)| {
                cells.get(1) == Some(&crate::clock::api_timestamp(at)) && cells.get(2) == Some(&chip)
            }))
        })?;
        let db = self.db.as_ref().ok_or_else(|| anyhow::anyhow!("no database"))?;
        let mut appended = 0u64;
        loop {
            // By rowid from the last one written: a range, not a scan of the table.
            let rows: Vec<(i64, String)> = db
                .reads_after(session.id, last, PAGE)?
                .into_iter()
                .map(|r| {
                    let number = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
                    let cells = [
                        r.id.to_string(),
                        crate::clock::api_timestamp(r.received_at_us),
                        r.chip,
                        number(r.antenna),
                        number(r.rssi),
                        r.reader_time_us.map(crate::clock::api_timestamp).unwrap_or_default(),
                        session.id.to_string(),
                    ];
                    let refs: Vec<&str> = cells.iter().map(String::as_str).collect();
                    (r.id, crate::csv_cell::csv_line(&refs))
                })
                .collect();
            let Some((newest, _)) = rows.last() else { break };
            last = *newest;
            let text: String = rows.iter().map(|(_, line)| line.as_str()).collect();
            file.write_all(text.as_bytes())?;
            appended += rows.len() as u64;
        }
        if appended > 0 {
            file.sync_all()?;
        } else if session.state == crate::store::query::SessionState::Closed {
            self.reads_done.insert(session.id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hold_nothing_fat_refuses() {
        assert_eq!(file_name("pi-finish", 4, "10K FINISH: line/2"), "rufus-gateway-pi-finish-4-10K_FINISH__line_2.csv");
        assert!(!file_name("a:b", 1, "c*d?e\"f<g>h|i\\j").contains([':', '*', '?', '"', '<', '>', '|', '\\', '/']));
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_last_number_found() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let path = dir.path().join("s.csv");
        let last = open_file(&path, HEADER, dev).unwrap().last;
        assert_eq!(last, 0);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{HEADER}\n"));
        std::fs::write(&path, format!("{HEADER}\n1,7,C1,d,t,ts,1,A,pending\n2,8,C2,d,t,ts,1,A,pending\n3,9,C"))
            .unwrap();
        let Found { mut file, last, last_line } = open_file(&path, HEADER, dev).unwrap();
        assert_eq!(last, 2, "the torn third row does not count");
        assert_eq!(cells(&last_line)[2], "C2");
        file.write_all(b"3,9,C3,d,t,ts,1,A,pending\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.ends_with("2,8,C2,d,t,ts,1,A,pending\n3,9,C3,d,t,ts,1,A,pending\n"), "{text}");
        // A header torn in two starts the file again.
        std::fs::write(&path, "num_pass").unwrap();
        let found = open_file(&path, HEADER, dev).unwrap();
        assert_eq!((found.last, std::fs::read_to_string(&path).unwrap()), (0, format!("{HEADER}\n")));
    }

    #[test]
    fn only_a_regular_file_on_the_stick_is_opened() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let target = dir.path().join("gateway.db-wal");
        std::fs::write(&target, "precious").unwrap();
        let link = dir.path().join("s.csv");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_file(&link, HEADER, dev).err().expect("a symlink is refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious", "untouched");
        let fifo = dir.path().join("f.csv");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::RWXU, 0).unwrap();
        assert!(open_file(&fifo, HEADER, dev).err().unwrap().to_string().contains("not a regular file"));
        assert!(
            open_file(&dir.path().join("new.csv"), HEADER, dev + 1)
                .err()
                .unwrap()
                .to_string()
                .contains("not on the stick")
        );
    }

    #[test]
    fn names_go_on_when_a_file_is_not_ours() {
        let names: Vec<String> = candidates("rufus-gateway-pi-1-A.csv").take(3).collect();
        assert_eq!(names, ["rufus-gateway-pi-1-A.csv", "rufus-gateway-pi-1-A-2.csv", "rufus-gateway-pi-1-A-3.csv"]);
    }

    #[test]
    fn mount_table_paths_are_unescaped() {
        assert_eq!(unescape("/media/my\\040stick"), std::ffi::OsString::from("/media/my stick"));
        // Lines as the kernel writes them (a chroot or a container lists its own).
        let table = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                     91 22 7:0 / /media/rufus\\040backup rw,nodev,nosuid shared:50 - vfat /dev/sdb1 rw\n";
        assert!(listed(table, Path::new("/media/rufus backup")));
        assert!(listed(table, Path::new("/")));
        assert!(!listed(table, Path::new("/media")));
        // A fresh temporary directory is never a mount point.
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
    }
}
