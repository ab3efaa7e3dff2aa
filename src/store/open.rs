//! Opening the database and living with storage faults: the writer's connection, replacing a
//! corrupt file, reconnecting after the disk comes back, and rescuing reads that cannot be written.

use super::*;

/// Windows taken back into memory at a restart: the latest passings' (a cache; the rest are
/// looked up among the stored passings when a read needs them).
const RESTORED_WINDOWS: i64 = 4096;

/// The database fails SQLite's integrity check (with what it said): [`open_or_replace`] moves it
/// aside, whatever the message's words.
#[derive(Debug, thiserror::Error)]
#[error("integrity check failed: {0}")]
pub struct Corrupt(String);

/// Open (creating or migrating) the database for writing, with the durability settings.
pub fn open_writer(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut conn = Connection::open(path).with_context(|| format!("cannot open database {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    stable_plans(&conn)?;
    // A page cache of 256 KB, not SQLite's 2 MB: the writer appends, and what it looks up (the
    // open session, a chip's last passing) is a few index pages. Measured under a 20,000-read
    // flood: 2 MB to 1 MB took 1.1 MB off the peak, 512 KB to 256 KB another 0.3 MB; CPU and
    // bytes written per read did not move beyond the runs' noise (docs/PERFORMANCE.md).
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA journal_size_limit = 4194304;
         PRAGMA cache_size = -256;",
    )?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(Corrupt(check).into());
    }
    schema::migrate(&mut conn).context("cannot migrate the database schema")?;
    Ok(conn)
}

/// One query plan per statement, whatever values are bound. Without it, SQLite recompiles a
/// cached statement at every execution whenever a bound value is compared with an indexed column
/// of a table that has a partial index (it checks whether the value could satisfy the index's
/// condition): measured, a third of the uplink's query time was spent re-preparing.
pub fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map(|_| ())
}

/// Open the database; a corrupt one is moved aside (with its WAL) and replaced by a fresh one,
/// because a gateway that crash-loops reads nothing.
pub fn open_or_replace(path: &Path) -> anyhow::Result<Connection> {
    match open_writer(path) {
        Ok(conn) => Ok(conn),
        Err(e) if is_corruption(&e) => {
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
            let mut aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
            for n in 2.. {
                if !aside.exists() {
                    break;
                }
                aside = PathBuf::from(format!("{}.corrupt-{stamp}-{n}", path.display()));
            }
            for suffix in ["", "-wal", "-shm"] {
                let from = PathBuf::from(format!("{}{suffix}", path.display()));
                if from.exists() {
                    let to = PathBuf::from(format!("{}{suffix}", aside.display()));
                    std::fs::rename(&from, &to).with_context(|| format!("cannot move {} aside", from.display()))?;
                }
            }
            error!(error = %format!("{e:#}"), moved_to = %aside.display(), "DATABASE CORRUPT: moved aside, starting with a fresh database; export what you can from the moved file");
            open_writer(path)
        }
        Err(e) => Err(e),
    }
}

/// Stopping while the storage refuses writes: the reads still in memory go into one log entry
/// (journald keeps it in its own storage, `/run/log/journal` if need be) as CSV, so they can be
/// recovered with `journalctl -u rufus-gateway --output-fields=READS -o cat`.
pub(super) fn rescue(batch: &[Read]) {
    let mut csv = String::from("received_at,chip,antenna,rssi,timestamp,raw\n");
    for r in batch {
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        csv.push_str(&crate::csv_cell::csv_line(&[
            &clock::rfc3339(r.host.utc_us),
            &r.chip,
            &opt(r.antenna),
            &opt(r.rssi),
            &clock::rfc3339(r.timestamp_us),
            String::from_utf8_lossy(&r.raw).trim_end(),
        ]));
    }
    error!(
        lost = batch.len(),
        reads = %csv,
        "UNWRITTEN READS: stopping while the database cannot be written; these reads are only in this log entry: journalctl -u rufus-gateway --output-fields=READS -o cat"
    );
}

/// The writer's connection, or the reason there is none.
pub(super) fn db(conn: &mut Option<Connection>) -> anyhow::Result<&mut Connection> {
    conn.as_mut().ok_or_else(unavailable)
}

pub(super) fn unavailable() -> anyhow::Error {
    anyhow::anyhow!("the database is not open (storage unavailable)")
}

pub(super) fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull)
    })
}

/// SQLite says only "unable to open database file" or "disk I/O error": try the file ourselves for
/// the system's reason (read-only file system, permission denied), which is what the operator
/// needs to read. A disk that is merely full opens fine and keeps SQLite's words.
pub(super) fn explain_open_error(path: &Path, e: anyhow::Error) -> anyhow::Error {
    let probe = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
    match probe {
        Err(io) => anyhow::anyhow!("{}: {io} (SQLite: {})", path.display(), e.root_cause()),
        Ok(_) => e,
    }
}

pub(super) fn is_corruption(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<Corrupt>()
            || matches!(c.downcast_ref::<rusqlite::Error>(), Some(rusqlite::Error::SqliteFailure(f, _))
                if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
    })
}

impl Store {
    /// Open the database and take up its state: at the first opening, the open session (or a new
    /// one, with `session.auto_start`); after a reopening, the session in memory continues.
    pub(super) fn connect(&mut self) -> anyhow::Result<()> {
        self.connect_inner().map_err(|e| explain_open_error(&self.path, e))
    }

    pub(super) fn connect_inner(&mut self) -> anyhow::Result<()> {
        self.conn = None;
        let conn = open_or_replace(&self.path)?;
        // SQLite falls back to reading a file it cannot open for writing; that is no writer.
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            anyhow::bail!("the database file can only be opened for reading");
        }
        // A real write (the upsert rewrites the row), so storage that only looks writable is
        // found out here and not at the first commit.
        let boot_id = clock::boot_id();
        conn.execute(
            "INSERT INTO boots (boot_id, first_seen) VALUES (?1, ?2)
             ON CONFLICT (boot_id) DO UPDATE SET first_seen = first_seen",
            params![boot_id, clock::now_us()],
        )?;
        self.boot = conn.query_row("SELECT id FROM boots WHERE boot_id = ?1", [&boot_id], |r| r.get(0))?;
        self.conn = Some(conn);
        let result = self.take_up_state();
        if result.is_err() {
            self.conn = None;
        } else {
            self.opened.fetch_add(1, Ordering::AcqRel);
        }
        result
    }

    pub(super) fn take_up_state(&mut self) -> anyhow::Result<()> {
        if self.loaded {
            let Some(open) = self.open else { return Ok(()) };
            let stored: Option<i64> = db(&mut self.conn)?
                .query_row("SELECT next_num FROM sessions WHERE id = ?1 AND state = 'open'", [open.id], |r| r.get(0))
                .optional()?;
            match stored {
                // Numbers handed out before the storage failed stay taken (the API may have them).
                Some(n) if n < open.next_num => {
                    warn!(
                        session_id = open.id,
                        stored = n,
                        next_num = open.next_num,
                        "database reopened behind the session's numbering; numbering continues after the numbers already used"
                    );
                    return Ok(());
                }
                Some(_) => return Ok(()),
                None => {
                    error!(
                        session_id = open.id,
                        "the reopened database does not hold the open session (a different file?); taking up its state instead"
                    );
                    self.open = None;
                    self.windows.clear();
                }
            }
        }
        self.load_open_session()?;
        if self.open.is_none()
            && let Some(alias) = self.auto_start.clone()
        {
            let id = self.start_session(&alias, false).map_err(Failed::into_error)?;
            info!(session_id = id, alias = %alias, "session opened automatically (session.auto_start)");
        }
        self.loaded = true;
        Ok(())
    }

    /// Close a suspect connection and open the database afresh. The error stays shown while
    /// reads wait: the commit that writes them clears it.
    pub(super) fn reconnect(&mut self, nothing_waiting: bool) {
        match self.connect() {
            Ok(()) => {
                self.reopen_at = None;
                if nothing_waiting {
                    self.set_error(None);
                }
                info!(path = %self.path.display(), "database opened again; writing what waited in memory");
                self.notify.notify_one();
            }
            Err(e) => {
                self.reopen_at = Some(Instant::now() + REOPEN_EVERY);
                self.set_error(Some(format!("{e:#}")));
            }
        }
    }

    /// A change failed: if SQLite says the storage itself failed (not a refused request), say so
    /// in status at once, and reopen unless the disk is merely full.
    pub(super) fn storage_failed(&mut self, e: &anyhow::Error) {
        let Some(code) = e.chain().find_map(|c| match c.downcast_ref::<rusqlite::Error>() {
            Some(rusqlite::Error::SqliteFailure(f, _)) => Some(f.code),
            _ => None,
        }) else {
            return;
        };
        use rusqlite::ErrorCode::*;
        if !matches!(code, ReadOnly | SystemIoFailure | DiskFull | CannotOpen | DatabaseCorrupt | NotADatabase) {
            return;
        }
        if self.conn.is_some() {
            if code != DiskFull && self.reopen_at.is_none() {
                self.reopen_at = Some(Instant::now() + REOPEN_EVERY);
            }
            let first = self.stats.last_error.lock().map(|l| l.is_none()).unwrap_or(true);
            let text = format!("{:#}", explain_open_error(&self.path, anyhow::anyhow!("{e:#}")));
            if first {
                error!(error = %text, "cannot write to the database");
            }
            self.set_error(Some(text));
        }
    }

    pub(super) fn reopen_due(&self) -> bool {
        self.reopen_at.is_some_and(|t| Instant::now() >= t)
    }

    /// Resume exactly where we were: the open session, its counter, and its recent windows.
    pub(super) fn load_open_session(&mut self) -> anyhow::Result<()> {
        let conn = self.conn.as_ref().ok_or_else(unavailable)?;
        self.open = conn
            .query_row(
                "SELECT id, next_num, remote_state = 'local' FROM sessions WHERE state = 'open' ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok(OpenSession { id: r.get(0)?, next_num: r.get(1)?, test: r.get(2)? }),
            )
            .optional()?;
        let Some(open) = self.open else { return Ok(()) };
        // The latest windows, by number (not by their times: one read dated far ahead must not
        // hide the others); older ones are found among the stored passings when needed.
        let mut stmt = conn.prepare(
            "SELECT chip, window_start FROM passings WHERE session_id = ?1 ORDER BY num_passing DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![open.id, RESTORED_WINDOWS], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
        let mono = clock::monotonic_us();
        for row in rows {
            let (chip, start) = row?;
            match &mut self.windows {
                Windows::First(d) => d.remember(&chip, start, mono),
                Windows::Strongest(s) => s.restore_closed(chip, start, mono),
            }
        }
        if let Windows::Strongest(s) = &mut self.windows {
            let mut stmt = conn.prepare(
                "SELECT w.chip, w.start_us, w.best_read, w.best_rssi, r.timestamp, r.clock_synced = 0 AND r.timestamp = r.received_at, w.bib
                 FROM windows w JOIN reads r ON r.id = w.best_read WHERE w.session_id = ?1",
            )?;
            let rows = stmt.query_map([open.id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })?;
            // Monotonic time restarts with the machine: a restored window runs its full length again.
            let opened_mono_us = clock::monotonic_us();
            for row in rows {
                let (chip, start_us, read_id, rssi, timestamp_us, unsynced, stored_bib) = row?;
                // `bib_for`'s order: the bib map, then the bib the window was given (the
                // reader's own, from a regex `bib` group), then the chip.
                let bib = self.bibs.get(&chip).cloned().or(stored_bib).unwrap_or_else(|| chip.clone());
                let best = Candidate { read_id, chip: chip.clone(), bib, timestamp_us, rssi, unsynced };
                s.restore(chip, Window { start_us, opened_mono_us, best });
            }
        }
        info!(session_id = open.id, next_num = open.next_num, "resuming open session");
        Ok(())
    }
}
