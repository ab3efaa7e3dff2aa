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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::params;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::BackupConfig;
use crate::store::query::{Db, SessionRow};

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

/// Whether `dir` is a mount point (its device differs from its parent's, or it is listed in
/// the mount table).
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

/// A passing as a backup row (without its line end).
pub fn row(r: &BackupRow) -> String {
    let (date, time) = local_date_time(r.timestamp_us);
    let (num, session) = (r.num_passing.to_string(), r.session_id.to_string());
    let ts = crate::clock::api_timestamp(r.timestamp_us);
    // `csv_line` neutralises every text cell and quotes as needed; its `\n` is the caller's.
    crate::csv_cell::csv_line(&[&num, &r.bib, &r.chip, &date, &time, &ts, &session, &r.alias, &r.state])
        .trim_end_matches('\n')
        .to_string()
}

#[derive(Debug, Clone)]
pub struct BackupRow {
    pub num_passing: i64,
    pub bib: String,
    pub chip: String,
    pub timestamp_us: i64,
    pub session_id: i64,
    pub alias: String,
    pub state: String,
}

/// The session's passings after `after`, in order.
fn rows_after(db: &Db, session: &SessionRow, after: i64) -> rusqlite::Result<Vec<BackupRow>> {
    let mut stmt = db.connection().prepare_cached(&format!(
        "SELECT p.num_passing, p.bib, p.chip, p.timestamp, {} FROM passings p JOIN sessions s ON s.id = p.session_id
         WHERE p.session_id = ?1 AND p.num_passing > ?2 ORDER BY p.num_passing LIMIT ?3",
        crate::store::query::PASSING_STATE
    ))?;
    stmt.query_map(params![session.id, after, PAGE], |r| {
        Ok(BackupRow {
            num_passing: r.get(0)?,
            bib: r.get(1)?,
            chip: r.get(2)?,
            timestamp_us: r.get(3)?,
            session_id: session.id,
            alias: session.alias.clone(),
            state: r.get(4)?,
        })
    })?
    .collect()
}

/// Open a session's file for appending, cutting off a torn last line; returns it with the number
/// in the first column of its last row (0 when only the header, or new).
fn open_file(path: &Path, header: &str) -> std::io::Result<(File, i64)> {
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        file.write_all(format!("{header}\n").as_bytes())?;
        return Ok((file, 0));
    }
    // The tail holds the last complete line (rows are short).
    let tail_len = len.min(64 * 1024);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.read_to_end(&mut tail)?;
    let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < tail.len() {
        // A line torn by a pull or a full stick: cut it off, it is written again whole.
        file.set_len(len - tail_len + complete as u64)?;
    }
    let lines = &tail[..complete];
    let last_line = lines[..lines.len().saturating_sub(1)]
        .rsplit(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).to_string())
        .unwrap_or_default();
    let last = last_line.split(',').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    if complete == 0 && tail_len == len {
        // Nothing whole at all (not even the header): start again.
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(format!("{header}\n").as_bytes())?;
        return Ok((file, 0));
    }
    file.seek(SeekFrom::End(0))?;
    Ok((file, last))
}

pub struct Backup {
    cfg: BackupConfig,
    dir: PathBuf,
    db_path: PathBuf,
    host: String,
    status: Arc<Mutex<BackupStatus>>,
    /// Per session: the last `num_passing` known to be in its file, while the same stick is in.
    written: HashMap<i64, i64>,
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
            self.reads_done.clear();
            return Ok(());
        }
        let dev = std::fs::metadata(&self.dir)?.dev();
        if self.mounted_dev != Some(dev) {
            // Another stick, or the same one plugged back: its files say what they hold.
            self.written.clear();
            self.reads_done.clear();
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
        Ok(())
    }

    fn session(&mut self, session: &SessionRow) -> anyhow::Result<()> {
        let path = self.dir.join(file_name(&self.host, session.id, &session.alias));
        let (mut file, mut last) = open_file(&path, HEADER)?;
        let db = self.db.as_ref().ok_or_else(|| anyhow::anyhow!("no database"))?;
        let mut appended = 0u64;
        loop {
            let rows = rows_after(db, session, last)?;
            if rows.is_empty() {
                break;
            }
            let mut text = String::with_capacity(rows.len() * 96);
            for r in &rows {
                text.push_str(&row(r));
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
        let name = file_name(&self.host, session.id, &session.alias);
        let path = self.dir.join(format!("{}-reads.csv", name.trim_end_matches(".csv")));
        let (mut file, mut last) = open_file(&path, READS_HEADER)?;
        let db = self.db.as_ref().ok_or_else(|| anyhow::anyhow!("no database"))?;
        let mut appended = 0u64;
        loop {
            // By rowid from the last one written: a range, not a scan of the table.
            let mut stmt = db.connection().prepare_cached(
                "SELECT id, received_at, chip, antenna, rssi, reader_time FROM reads
                 WHERE id > ?1 AND session_id = ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows: Vec<(i64, String)> = stmt
                .query_map(params![last, session.id, PAGE], |r| {
                    let id: i64 = r.get(0)?;
                    let number = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
                    let cells = [
                        id.to_string(),
                        crate::clock::api_timestamp(r.get(1)?),
                        r.get::<_, String>(2)?,
                        number(r.get(3)?),
                        number(r.get(4)?),
                        r.get::<_, Option<i64>>(5)?.map(crate::clock::api_timestamp).unwrap_or_default(),
                        session.id.to_string(),
                    ];
                    let refs: Vec<&str> = cells.iter().map(String::as_str).collect();
                    Ok((id, crate::csv_cell::csv_line(&refs)))
                })?
                .collect::<Result<_, _>>()?;
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        let (_, last) = open_file(&path, HEADER).unwrap();
        assert_eq!(last, 0);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{HEADER}\n"));
        std::fs::write(&path, format!("{HEADER}\n1,7,C1,d,t,ts,1,A,pending\n2,8,C2,d,t,ts,1,A,pending\n3,9,C"))
            .unwrap();
        let (mut file, last) = open_file(&path, HEADER).unwrap();
        assert_eq!(last, 2, "the torn third row does not count");
        file.write_all(b"3,9,C3,d,t,ts,1,A,pending\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.ends_with("2,8,C2,d,t,ts,1,A,pending\n3,9,C3,d,t,ts,1,A,pending\n"), "{text}");
        // A header torn in two starts the file again.
        std::fs::write(&path, "num_pass").unwrap();
        let (_, last) = open_file(&path, HEADER).unwrap();
        assert_eq!((last, std::fs::read_to_string(&path).unwrap()), (0, format!("{HEADER}\n")));
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
