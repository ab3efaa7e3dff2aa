//! The store actor: one thread owns the only writing SQLite connection. It commits reads in small
//! groups, turns them into passings (de-duplication, bib mapping, `num_passing`), and applies the
//! session changes asked for by the control socket and the uplink. Everything else reads through
//! `query::Db` on connections of its own.

pub mod query;
pub mod schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, select};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::{Notify, broadcast, oneshot};
use tracing::{error, info, warn};

use crate::clock;
use crate::config::{Config, DedupKeep, Unmapped};
use crate::dedup::{Candidate, Dedup, Strongest, Undo, Window};
use crate::reader::Read;

/// Most reads committed in one transaction (the other bound is `storage.commit_interval`).
const MAX_GROUP: usize = 1000;
/// How often the writer does its periodic work (clock, windows); cancellation is noticed through
/// channel disconnection, not this.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How long a commit (or a pruning step) may take before the writer counts as stuck.
const COMMIT_PATIENCE: Duration = Duration::from_secs(5);
/// Rows deleted per pruning transaction: short transactions keep reads flowing.
const PRUNE_STEP: i64 = 500;
/// Delivery ranges pruned per transaction (a range is a batch: up to `api.batch_size` rows).
const PRUNE_RANGES: i64 = 5;
/// Pruning runs this often (or more often, for very short test retentions).
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// After a failed commit, wait this long before trying again.
const RETRY_COMMIT: Duration = Duration::from_millis(500);
/// Reads kept in memory while the disk refuses writes; beyond this the oldest are dropped (and counted).
const MAX_BUFFERED_READS: usize = 200_000;
/// While the database cannot be opened or written for a reason other than a full disk (storage
/// gone read-only, I/O errors), it is closed and opened afresh this often: a remounted or
/// replaced card is picked up without a restart.
const REOPEN_EVERY: Duration = Duration::from_secs(2);

/// A passing as it was committed, for live consumers (demo, feed, dashboard).
#[derive(Debug, Clone, Serialize)]
pub struct PassingEvent {
    pub session_id: i64,
    pub num_passing: i64,
    pub bib: String,
    pub chip: String,
    pub timestamp_us: i64,
}

/// A change the writer makes on request; each gets a reply once it is committed.
#[derive(Debug)]
pub enum Op {
    StartSession {
        alias: String,
    },
    CloseSession,
    RemoteOpened {
        session_id: i64,
        token: String,
    },
    /// The API confirmed the session's pending passings numbered `first..=last`, sent under the
    /// remote session `token` (a database opened afresh may hold another session by that id).
    /// Written at the next group commit, merged with the records before it (`DeferredDelivery`);
    /// answered then.
    Delivered {
        session_id: i64,
        token: String,
        first: i64,
        last: i64,
    },
    Undeliverable {
        session_id: i64,
        passing_id: i64,
        reason: String,
    },
    RemoteClosed {
        session_id: i64,
    },
    ClosedRemotely {
        session_id: i64,
        reason: String,
    },
    /// `session resend`: a new session holding what remotely closed sessions could not deliver.
    Resend {
        alias: String,
    },
    /// Held passings whose clock will not be corrected in time: send them as they are.
    ReleaseUnsynced {
        passing_ids: Vec<i64>,
    },
    /// Settings that change while running (SIGHUP).
    Reconfigure {
        bibs: HashMap<String, String>,
        unmapped: Unmapped,
        dedup_window: Duration,
    },
}

pub struct Command {
    pub op: Op,
    pub reply: oneshot::Sender<Reply>,
}

/// The writer's answer to a change: the affected session, or why it could not be written.
pub type Reply = Result<Option<i64>, String>;

/// The writer thread has exited (shutdown, or a fatal error): nothing more can be recorded.
#[derive(Debug, thiserror::Error)]
#[error("the store has stopped")]
pub struct StoreStopped;

/// The async side's way to ask the writer for a change.
#[derive(Clone)]
pub struct StoreHandle {
    tx: Sender<Command>,
    /// How many times the writer has opened the database: readers holding a connection reopen
    /// theirs when it changes (the file may be a different one after storage came back).
    opened: Arc<AtomicU64>,
}

impl StoreHandle {
    /// Changes each time the writer (re)opens the database; 0 while it never could.
    pub fn generation(&self) -> u64 {
        self.opened.load(Ordering::Acquire)
    }

    /// Queue a change now (it is applied in order with everything else); await the receiver for
    /// the outcome, or drop it.
    pub fn submit(&self, op: Op) -> Result<oneshot::Receiver<Reply>, StoreStopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command { op, reply }).map_err(|_| StoreStopped)?;
        Ok(rx)
    }

    /// Returns the affected session id, when the operation has one.
    pub async fn call(&self, op: Op) -> anyhow::Result<Option<i64>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command { op, reply }).map_err(|_| StoreStopped)?;
        rx.await.map_err(|_| StoreStopped)?.map_err(anyhow::Error::msg)
    }
}

/// Shared counters of the writer, for status and the watchdog.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Proof of life for the watchdog.
    pub live: Arc<crate::supervisor::Liveness>,
    pub commits: AtomicU64,
    pub buffered_reads: AtomicU64,
    pub dropped_reads: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
}

pub struct Store {
    /// None while the storage cannot be opened: reads wait in memory.
    conn: Option<Connection>,
    /// Set once a database's open session has been loaded.
    loaded: bool,
    /// When set, the connection is suspect (read-only storage, I/O errors): reopen at this time.
    reopen_at: Option<Instant>,
    opened: Arc<AtomicU64>,
    dedup_window: Duration,
    auto_start: Option<String>,
    path: PathBuf,
    reads: Receiver<Read>,
    commands: Receiver<Command>,
    notify: Arc<Notify>,
    events: broadcast::Sender<PassingEvent>,
    stats: Arc<StoreStats>,
    commit_interval: Duration,
    unmapped: Unmapped,
    bibs: HashMap<String, String>,
    windows: Windows,
    boot: i64,
    clock: crate::clock::ClockWatch,
    /// The clock's state at the last check.
    clock_synced: bool,
    retention: Duration,
    prune_every: Duration,
    last_prune: Instant,
    open: Option<OpenSession>,
    /// Delivery records waiting to be written (see `DeferredDelivery`).
    deferred: Option<DeferredDelivery>,
}

/// Delivery records of one session, merged until the next group commit (`storage.commit_interval`):
/// a fast link answers a batch every millisecond, far more often than a commit is worth, and a
/// record lost to a crash only makes its batches go again (same numbers). Written before any
/// other change, so a change never sees the queue older than the uplink left it.
struct DeferredDelivery {
    session_id: i64,
    token: String,
    first: i64,
    last: i64,
    replies: Vec<oneshot::Sender<Reply>>,
    due: Instant,
}

/// De-duplication state, per `passings.dedup_keep`.
enum Windows {
    First(Dedup),
    Strongest(Strongest),
}

impl Windows {
    fn new(keep: DedupKeep, window: Duration) -> Self {
        match keep {
            DedupKeep::First => Windows::First(Dedup::new(window)),
            DedupKeep::Strongest => Windows::Strongest(Strongest::new(window)),
        }
    }

    fn clear(&mut self) {
        match self {
            Windows::First(d) => d.clear(),
            Windows::Strongest(s) => s.clear(),
        }
    }

    fn prune(&mut self) {
        match self {
            Windows::First(d) => d.prune(),
            Windows::Strongest(s) => s.prune(),
        }
    }

    fn set_window(&mut self, window: Duration) {
        match self {
            Windows::First(d) => d.set_window(window),
            Windows::Strongest(s) => s.set_window(window),
        }
    }
}

/// Undo information for a failed commit.
enum Rollback {
    First(Vec<Undo>),
    Strongest(Box<Strongest>),
}

#[derive(Debug, Clone, Copy)]
struct OpenSession {
    id: i64,
    next_num: i64,
}

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
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA journal_size_limit = 4194304;",
    )?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        anyhow::bail!("integrity check failed: {check}");
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
fn rescue(batch: &[Read]) {
    let mut csv = String::from("received_at,chip,antenna,rssi,timestamp,raw\n");
    for r in batch {
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        csv.push_str(&crate::export::csv_line(&[
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
fn db(conn: &mut Option<Connection>) -> anyhow::Result<&mut Connection> {
    conn.as_mut().ok_or_else(unavailable)
}

fn unavailable() -> anyhow::Error {
    anyhow::anyhow!("the database is not open (storage unavailable)")
}

fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull)
    })
}

/// SQLite says only "unable to open database file" or "disk I/O error": try the file ourselves for
/// the system's reason (read-only file system, permission denied), which is what the operator
/// needs to read. A disk that is merely full opens fine and keeps SQLite's words.
fn explain_open_error(path: &Path, e: anyhow::Error) -> anyhow::Error {
    let probe = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
    match probe {
        Err(io) => anyhow::anyhow!("{}: {io} (SQLite: {})", path.display(), e.root_cause()),
        Ok(_) => e,
    }
}

fn is_corruption(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = c.downcast_ref::<rusqlite::Error>() {
            matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        } else {
            c.to_string().starts_with("integrity check failed")
        }
    })
}

/// Load a `chip,bib` CSV (an optional header row is recognised by its names).
pub fn load_bib_map(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let mut rdr = csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_path(path)?;
    let mut map = HashMap::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        let (Some(chip), Some(bib)) = (rec.get(0), rec.get(1)) else { continue };
        if i == 0 && chip.eq_ignore_ascii_case("chip") {
            continue;
        }
        if !chip.is_empty() && !bib.is_empty() {
            map.insert(chip.to_string(), bib.to_string());
        }
    }
    Ok(map)
}

pub struct StoreParts {
    pub store: Store,
    pub handle: StoreHandle,
}

impl Store {
    /// Open the database and prepare the writer; the handle is how everyone else reaches it.
    pub fn open(
        cfg: &Config,
        reads: Receiver<Read>,
        notify: Arc<Notify>,
        events: broadcast::Sender<PassingEvent>,
        stats: Arc<StoreStats>,
    ) -> anyhow::Result<StoreParts> {
        let bibs = match &cfg.passings.bib_map {
            Some(p) => load_bib_map(p).with_context(|| format!("passings.bib_map: cannot load {}", p.display()))?,
            None => HashMap::new(),
        };
        let (tx, commands) = crossbeam_channel::unbounded();
        let opened = Arc::new(AtomicU64::new(0));
        let mut store = Store {
            conn: None,
            loaded: false,
            reopen_at: None,
            opened: opened.clone(),
            dedup_window: cfg.passings.dedup_window,
            auto_start: cfg.session.auto_start.then(|| cfg.session.alias.clone()),
            path: cfg.storage.path.clone(),
            reads,
            commands,
            notify,
            events,
            stats,
            commit_interval: cfg.storage.commit_interval,
            unmapped: if cfg.passings.bib_map.is_some() { cfg.passings.unmapped } else { Unmapped::Chip },
            bibs,
            windows: Windows::new(cfg.passings.dedup_keep, cfg.passings.dedup_window),
            boot: 0,
            clock: crate::clock::ClockWatch::new(&cfg.clock),
            clock_synced: false,
            retention: cfg.storage.retention,
            prune_every: PRUNE_EVERY.min(cfg.storage.retention / 4),
            // Prune soon after start (a box that was off for weeks).
            last_prune: Instant::now() - PRUNE_EVERY,
            deferred: None,
            open: None,
        };
        // Storage that cannot be opened does not stop the gateway: it reads into memory, says so,
        // and keeps trying (a restart loop would read nothing at all).
        if let Err(e) = store.connect() {
            let text = format!("{e:#}");
            error!(error = %text, path = %store.path.display(), "STORAGE UNAVAILABLE: cannot open the database; keeping reads in memory and retrying");
            store.set_error(Some(text));
            store.reopen_at = Some(Instant::now() + REOPEN_EVERY);
        }
        Ok(StoreParts { store, handle: StoreHandle { tx, opened } })
    }

    /// Open the database and take up its state: at the first opening, the open session (or a new
    /// one, with `session.auto_start`); after a reopening, the session in memory continues.
    fn connect(&mut self) -> anyhow::Result<()> {
        self.connect_inner().map_err(|e| explain_open_error(&self.path, e))
    }

    fn connect_inner(&mut self) -> anyhow::Result<()> {
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

    fn take_up_state(&mut self) -> anyhow::Result<()> {
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
        self.load_open_session(self.dedup_window)?;
        if self.open.is_none()
            && let Some(alias) = self.auto_start.clone()
        {
            let id = self.start_session(&alias)?;
            info!(session_id = id, alias = %alias, "session opened automatically (session.auto_start)");
        }
        self.loaded = true;
        Ok(())
    }

    /// Close a suspect connection and open the database afresh. The error stays shown while
    /// reads wait: the commit that writes them clears it.
    fn reconnect(&mut self, nothing_waiting: bool) {
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
    fn storage_failed(&mut self, e: &anyhow::Error) {
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

    fn reopen_due(&self) -> bool {
        self.reopen_at.is_some_and(|t| Instant::now() >= t)
    }

    /// Resume exactly where we were: the open session, its counter, and its recent windows.
    fn load_open_session(&mut self, window: Duration) -> anyhow::Result<()> {
        let conn = self.conn.as_ref().ok_or_else(unavailable)?;
        self.open = conn
            .query_row("SELECT id, next_num FROM sessions WHERE state = 'open' ORDER BY id DESC LIMIT 1", [], |r| {
                Ok(OpenSession { id: r.get(0)?, next_num: r.get(1)? })
            })
            .optional()?;
        let Some(open) = self.open else { return Ok(()) };
        let mut stmt = conn.prepare(
            "SELECT chip, window_start FROM passings WHERE session_id = ?1
             AND window_start >= (SELECT max(window_start) FROM passings WHERE session_id = ?1) - ?2 ORDER BY num_passing",
        )?;
        let rows =
            stmt.query_map(params![open.id, window.as_micros() as i64], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
        for row in rows {
            let (chip, start) = row?;
            match &mut self.windows {
                Windows::First(d) => {
                    d.accept(&chip, start);
                }
                Windows::Strongest(s) => s.restore_closed(chip, start),
            }
        }
        if let Windows::Strongest(s) = &mut self.windows {
            let mut stmt = conn.prepare(
                "SELECT w.chip, w.start_us, w.best_read, w.best_rssi, r.timestamp, r.clock_synced = 0 AND r.timestamp = r.received_at
                 FROM windows w JOIN reads r ON r.id = w.best_read WHERE w.session_id = ?1",
            )?;
            let rows = stmt.query_map([open.id], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?;
            // Monotonic time restarts with the machine: a restored window runs its full length again.
            let opened_mono_us = clock::monotonic_us();
            for row in rows {
                let (chip, start_us, read_id, rssi, timestamp_us, unsynced) = row?;
                let bib = self.bibs.get(&chip).cloned().unwrap_or_else(|| chip.clone());
                let best = Candidate { read_id, chip: chip.clone(), bib, timestamp_us, rssi, unsynced };
                s.restore(chip, Window { start_us, opened_mono_us, best });
            }
        }
        info!(session_id = open.id, next_num = open.next_num, "resuming open session");
        Ok(())
    }

    /// Blocking: run on a dedicated thread. Returns once every producer (reader, uplink, control)
    /// has dropped its sender and everything received is committed.
    pub fn run(mut self) -> anyhow::Result<()> {
        let _span = tracing::info_span!("store").entered();
        let mut batch: Vec<Read> = Vec::new();
        // When the group must be committed (None: nothing waiting).
        let mut deadline: Option<Instant> = None;
        let mut failing = false;
        let mut housekeeping = Instant::now();
        let mut reads = self.reads.clone();
        let mut commands = self.commands.clone();
        let (mut reads_open, mut commands_open) = (true, true);
        loop {
            // The loop wakes at least every HOUSEKEEPING; a commit may take a while on an SD card.
            self.stats.live.beat(HOUSEKEEPING + COMMIT_PATIENCE);
            let draining = !reads_open && !commands_open;
            let now = Instant::now();
            if self.deferred.as_ref().is_some_and(|d| draining || now >= d.due) {
                self.record_deferred();
            }
            if draining && batch.is_empty() {
                break;
            }
            let full = batch.len() >= MAX_GROUP && !failing;
            if draining || full || deadline.is_some_and(|d| now >= d) {
                failing = !self.flush(&mut batch);
                deadline = failing.then(|| now + RETRY_COMMIT);
                if failing && draining {
                    rescue(&batch);
                    break;
                }
            }
            if now >= housekeeping {
                if self.housekeeping(batch.is_empty()) {
                    deadline.get_or_insert(now);
                }
                housekeeping = now + HOUSEKEEPING;
            }
            let mut wake = housekeeping;
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            if let Some(d) = &self.deferred {
                wake = wake.min(d.due);
            }
            if let Windows::Strongest(w) = &self.windows
                && let Some(due) = w.next_due()
            {
                wake = wake.min(now + Duration::from_micros((due - clock::monotonic_us()).max(0) as u64));
                housekeeping = housekeeping.min(wake);
            }
            select! {
                recv(reads) -> msg => match msg {
                    Ok(read) => {
                        batch.push(read);
                        deadline.get_or_insert_with(|| Instant::now() + self.commit_interval);
                    }
                    Err(_) => { reads_open = false; reads = crossbeam_channel::never(); }
                },
                recv(commands) -> msg => match msg {
                    Ok(Command { op: Op::Delivered { session_id, token, first, last }, reply }) => {
                        self.defer_delivery(session_id, token, first, last, reply);
                    }
                    Ok(cmd) => {
                        // Keep order: deliveries and reads that arrived before the command are
                        // written first.
                        self.record_deferred();
                        if self.flush(&mut batch) { deadline = None; }
                        let result = self.execute(cmd.op);
                        let _ = cmd.reply.send(result);
                        self.notify.notify_one();
                    }
                    Err(_) => { commands_open = false; commands = crossbeam_channel::never(); }
                },
                default(wake.saturating_duration_since(Instant::now())) => {}
            }
        }
        info!(path = %self.path.display(), "store closed");
        Ok(())
    }

    /// Apply a change; a failure is reported in status (and logged) and returned as text.
    fn execute(&mut self, op: Op) -> Reply {
        let result = self.apply(op);
        if let Err(e) = &result {
            self.storage_failed(e);
        }
        let result = result.map_err(|e| format!("{e:#}"));
        if let Err(e) = &result {
            warn!(error = %e, "a requested change could not be written");
        }
        result
    }

    /// Hold a delivery record for the next group commit, merged with the ones before it.
    fn defer_delivery(&mut self, session_id: i64, token: String, first: i64, last: i64, reply: oneshot::Sender<Reply>) {
        match &mut self.deferred {
            Some(d) if d.session_id == session_id && d.token == token => {
                d.first = d.first.min(first);
                d.last = d.last.max(last);
                d.replies.push(reply);
            }
            _ => {
                self.record_deferred();
                let due = Instant::now() + self.commit_interval;
                self.deferred = Some(DeferredDelivery { session_id, token, first, last, replies: vec![reply], due });
            }
        }
    }

    /// Write the held delivery records, if any, and answer each of them.
    fn record_deferred(&mut self) {
        let Some(d) = self.deferred.take() else { return };
        let result =
            self.execute(Op::Delivered { session_id: d.session_id, token: d.token, first: d.first, last: d.last });
        for reply in d.replies {
            let _ = reply.send(result.clone());
        }
        self.notify.notify_one();
    }

    /// Periodic work; returns true when strongest windows are due (commit them now).
    fn housekeeping(&mut self, nothing_waiting: bool) -> bool {
        self.windows.prune();
        if self.reopen_due() {
            self.reconnect(nothing_waiting);
        }
        if self.conn.is_none() || self.reopen_at.is_some() {
            return false;
        }
        if let Err(e) = self.correct_clock() {
            warn!(error = %format!("{e:#}"), "cannot correct held timestamps");
        }
        if self.last_prune.elapsed() >= self.prune_every {
            self.last_prune = Instant::now();
            if let Err(e) = self.prune() {
                warn!(error = %format!("{e:#}"), "cannot prune old rows");
            }
        }
        matches!(&self.windows, Windows::Strongest(w) if w.next_due().is_some_and(|t| t <= clock::monotonic_us()))
    }

    /// Once the clock is synchronised, host timestamps taken earlier in this boot are corrected
    /// with the monotonic clock: the true time of a read is its monotonic time plus the offset
    /// between the two clocks now.
    fn correct_clock(&mut self) -> anyhow::Result<()> {
        let synced = self.clock.synchronized();
        let became = synced && !self.clock_synced;
        self.clock_synced = synced;
        if !synced {
            return Ok(());
        }
        let offset = clock::now_us() - clock::monotonic_us();
        let tx = db(&mut self.conn)?.transaction()?;
        let held: Option<(i64, i64)> = tx.query_row(
            // On the (tiny) index of held passings: never a scan of the reads.
            "SELECT count(*), avg((SELECT r.monotonic_us FROM reads r WHERE r.id = p.read_id) + ?1 - p.timestamp)
             FROM passings p INDEXED BY passings_held WHERE p.clock_synced = 0 AND p.state = 'pending'
             AND (SELECT r.boot FROM reads r WHERE r.id = p.read_id) = ?2",
            params![offset, self.boot],
            |r| Ok(r.get::<_, i64>(0).ok().zip(r.get::<_, Option<f64>>(1)?.map(|v| v as i64))),
        )?;
        let Some((count, shift_us)) = held.filter(|(n, _)| *n > 0) else {
            if became {
                info!("system clock synchronised");
            }
            return Ok(());
        };
        tx.execute(
            "UPDATE passings INDEXED BY passings_held
             SET timestamp = (SELECT r.monotonic_us FROM reads r WHERE r.id = read_id) + ?1, clock_synced = 1
             WHERE clock_synced = 0 AND state = 'pending' AND (SELECT r.boot FROM reads r WHERE r.id = read_id) = ?2",
            params![offset, self.boot],
        )?;
        tx.commit()?;
        warn!(
            corrected = count,
            shift_ms = shift_us / 1000,
            "system clock synchronised: corrected the host timestamps of passings read before"
        );
        self.notify.notify_one();
        Ok(())
    }

    /// Delete delivered passings older than `storage.retention`, and reads no longer needed, a
    /// little at a time; never anything undelivered. Then give the pages back to the file system.
    fn prune(&mut self) -> anyhow::Result<()> {
        let cutoff = clock::now_us() - self.retention.as_micros() as i64;
        let mut total = (0, 0);
        loop {
            let tx = db(&mut self.conn)?.transaction()?;
            // Delivered ranges, oldest first, a step's worth at a time ('pending' rows within a
            // range are the delivered ones; refused ones are kept).
            let mut passings = 0;
            let ranges: Vec<(i64, i64, i64)> = tx
                .prepare_cached("SELECT session_id, first, last FROM deliveries WHERE at < ?1 ORDER BY at LIMIT ?2")?
                .query_map(params![cutoff, PRUNE_RANGES], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            for (session_id, first, last) in &ranges {
                passings += tx.execute(
                    "DELETE FROM passings WHERE session_id = ?1 AND num_passing BETWEEN ?2 AND ?3 AND state = 'pending'",
                    params![session_id, first, last],
                )?;
                tx.execute("DELETE FROM deliveries WHERE session_id = ?1 AND last = ?2", params![session_id, last])?;
            }
            // Rows a version-1 database marked delivered one by one (on their own partial index).
            passings += tx.execute(
                "DELETE FROM passings WHERE id IN (SELECT id FROM passings INDEXED BY passings_delivered_v1
                    WHERE state = 'delivered' AND delivered_at < ?1 LIMIT ?2)",
                params![cutoff, PRUNE_STEP],
            )?;
            // Reads of sessions finished remotely (or of no session), not used by a passing left.
            let reads = tx.execute(
                "DELETE FROM reads WHERE id IN (
                    SELECT r.id FROM reads r LEFT JOIN sessions s ON s.id = r.session_id
                    WHERE r.received_at < ?1 AND (r.session_id IS NULL OR s.remote_state = 'closed')
                    AND NOT EXISTS (SELECT 1 FROM passings p WHERE p.read_id = r.id)
                    AND NOT EXISTS (SELECT 1 FROM windows w WHERE w.best_read = r.id)
                    LIMIT ?2)",
                params![cutoff, PRUNE_STEP],
            )?;
            tx.commit()?;
            total = (total.0 + passings, total.1 + reads);
            if ranges.len() < PRUNE_RANGES as usize && passings < PRUNE_STEP as usize && reads < PRUNE_STEP as usize {
                break;
            }
        }
        if total != (0, 0) {
            db(&mut self.conn)?.execute_batch("PRAGMA incremental_vacuum(1000); PRAGMA wal_checkpoint(TRUNCATE);")?;
            info!(passings = total.0, reads = total.1, "pruned rows older than storage.retention");
        }
        Ok(())
    }

    /// Commit the batch. On failure the reads stay in memory (bounded) for the next attempt.
    fn flush(&mut self, batch: &mut Vec<Read>) -> bool {
        let strongest_due = match &mut self.windows {
            Windows::Strongest(w) => w.next_due().is_some_and(|t| t <= clock::monotonic_us()),
            Windows::First(_) => false,
        };
        if batch.is_empty() && !strongest_due {
            return true;
        }
        if self.reopen_due() {
            self.reconnect(false);
        }
        let mut events = Vec::new();
        let mut undo = match &self.windows {
            Windows::First(_) => Rollback::First(Vec::new()),
            Windows::Strongest(w) => Rollback::Strongest(Box::new(w.clone())),
        };
        match self.write_reads(batch, &mut undo, &mut events) {
            Ok(next) => {
                if let (Some(open), Some(next_num)) = (self.open.as_mut(), next) {
                    open.next_num = next_num;
                }
                batch.clear();
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.buffered_reads.store(0, Ordering::Relaxed);
                self.set_error(None);
                self.publish(events);
                true
            }
            Err(e) => {
                match (undo, &mut self.windows) {
                    (Rollback::First(u), Windows::First(d)) => d.undo(u),
                    (Rollback::Strongest(saved), Windows::Strongest(w)) => *w = *saved,
                    _ => {}
                }
                let disk_full = is_disk_full(&e);
                let text = format!("{:#}", explain_open_error(&self.path, e));
                let first = self.stats.last_error.lock().map(|l| l.is_none()).unwrap_or(true);
                if first {
                    error!(error = %text, buffered = batch.len(), "cannot write to the database; keeping reads in memory and retrying");
                }
                if self.conn.is_some() {
                    if self.reopen_at.is_none() && !disk_full {
                        self.reopen_at = Some(Instant::now() + REOPEN_EVERY);
                    }
                    self.set_error(Some(text));
                }
                if batch.len() > MAX_BUFFERED_READS {
                    let excess = batch.len() - MAX_BUFFERED_READS;
                    batch.drain(..excess);
                    self.stats.dropped_reads.fetch_add(excess as u64, Ordering::Relaxed);
                    error!(
                        dropped = excess,
                        "memory buffer full while the database refuses writes: oldest reads dropped"
                    );
                }
                self.stats.buffered_reads.store(batch.len() as u64, Ordering::Relaxed);
                false
            }
        }
    }

    fn set_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.stats.last_error.lock() {
            *e = error;
        }
    }

    /// One transaction: every read, and the passings they make. Returns the session's next number.
    fn write_reads(
        &mut self,
        batch: &[Read],
        undo: &mut Rollback,
        events: &mut Vec<PassingEvent>,
    ) -> anyhow::Result<Option<i64>> {
        let tx = db(&mut self.conn)?.transaction()?;
        let session = self.open;
        let mut next_num = session.map(|s| s.next_num);
        let mut touched: Vec<String> = Vec::new();
        {
            let mut seen =
                tx.prepare_cached("SELECT 1 FROM reads WHERE coalesce(session_id, 0) = ?1 AND replay_key = ?2")?;
            let mut insert_read = tx.prepare_cached(
                "INSERT INTO reads (received_at, monotonic_us, boot, clock_synced, chip, antenna, rssi, reader_time, timestamp, raw, replay_key, session_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            let mut passings = PassingWriter::new(&tx)?;
            for read in batch {
                // A replayed read (download, rewind) already stored for this session is a repeat.
                let replayed = match &read.replay_key {
                    Some(key) => seen.exists(params![session.map_or(0, |s| s.id), key])?,
                    None => false,
                };
                insert_read.execute(params![
                    read.host.utc_us,
                    read.host.monotonic_us,
                    self.boot,
                    read.clock_synced,
                    read.chip,
                    read.antenna,
                    read.rssi,
                    read.reader_time_us,
                    read.timestamp_us,
                    read.raw,
                    if replayed { None } else { read.replay_key.as_deref() },
                    session.map(|s| s.id),
                ])?;
                let read_id = tx.last_insert_rowid();
                let (Some(s), Some(num)) = (session, next_num.as_mut()) else { continue };
                if replayed {
                    continue;
                }
                let Some(bib) = bib_for(&self.bibs, self.unmapped, read) else { continue };
                match (&mut self.windows, &mut *undo) {
                    (Windows::First(d), Rollback::First(undo)) => {
                        let (fresh, u) = d.accept(&read.chip, read.timestamp_us);
                        undo.extend(u);
                        if fresh {
                            let c = candidate(read_id, read, bib);
                            events.push(passings.insert(s.id, num, &c, read.timestamp_us)?);
                        }
                    }
                    (Windows::Strongest(w), _) => {
                        let c = candidate(read_id, read, bib);
                        if let Some(ended) = w.offer(c, read.host.monotonic_us) {
                            events.push(passings.insert(s.id, num, &ended.best, ended.start_us)?);
                        }
                        touched.push(read.chip.clone());
                    }
                    _ => unreachable!("rollback matches the mode"),
                }
            }
            if let (Some(s), Some(num), Windows::Strongest(w)) = (session, next_num.as_mut(), &mut self.windows) {
                for ended in w.due(clock::monotonic_us()) {
                    touched.push(ended.best.chip.clone());
                    events.push(passings.insert(s.id, num, &ended.best, ended.start_us)?);
                }
                persist_windows(&tx, s.id, w, &touched)?;
            }
        }
        if let (Some(s), Some(n)) = (session, next_num) {
            tx.execute("UPDATE sessions SET next_num = ?1 WHERE id = ?2", params![n, s.id])?;
        }
        tx.commit()?;
        Ok(next_num)
    }

    fn apply(&mut self, op: Op) -> anyhow::Result<Option<i64>> {
        match op {
            Op::StartSession { alias } => self.start_session(&alias).map(Some),
            Op::Resend { alias } => self.start_session_with(&alias, true).map(|(id, _)| Some(id)),
            Op::CloseSession => {
                let Some(open) = self.open else { anyhow::bail!("no session is open") };
                self.close_locally(open.id)?;
                info!(
                    session_id = open.id,
                    "session closing: no more reads assigned; remote close after its queue drains"
                );
                Ok(Some(open.id))
            }
            Op::RemoteOpened { session_id, token } => {
                db(&mut self.conn)?.execute(
                    "UPDATE sessions SET token = ?1, remote_state = 'open', remote_error = NULL WHERE id = ?2 AND remote_state = 'pending'",
                    params![token, session_id],
                )?;
                Ok(Some(session_id))
            }
            Op::Delivered { session_id, token, first, last } => {
                // One row per batch, whatever its size: the session's watermark moves to `last`.
                // Batches go in order, each starting after the one before (whose record may have
                // failed and be retried after this one): everything up to `last` not refused
                // reached the API, so the range recorded starts at the old watermark.
                // Without an fsync of its own: a record lost to a power cut only makes the batch
                // go again (same numbers; the API counts duplicates), and the next commit of reads
                // syncs it anyway. The reads' commits keep `synchronous = FULL`.
                let conn = db(&mut self.conn)?;
                conn.prepare_cached("PRAGMA synchronous = NORMAL")?.execute([])?;
                let recorded = record_delivery(conn, session_id, &token, last);
                conn.prepare_cached("PRAGMA synchronous = FULL")?.execute([])?;
                if recorded?.is_none() {
                    warn!(
                        session_id,
                        first,
                        last,
                        "a delivery for a session this database does not hold (it was replaced); not recorded"
                    );
                    return Ok(None);
                }
                Ok(Some(session_id))
            }
            Op::Undeliverable { session_id, passing_id, reason } => {
                let tx = db(&mut self.conn)?.transaction()?;
                let changed = tx.execute(
                    "UPDATE passings SET state = 'undeliverable', error = ?1 WHERE id = ?2 AND state = 'pending'",
                    params![reason, passing_id],
                )?;
                tx.execute(
                    "UPDATE sessions SET undeliverable = undeliverable + ?1 WHERE id = ?2",
                    params![changed as i64, session_id],
                )?;
                tx.commit()?;
                Ok(Some(session_id))
            }
            Op::RemoteClosed { session_id } => {
                db(&mut self.conn)?.execute(
                    "UPDATE sessions SET remote_state = 'closed', state = 'closed', closed_at = coalesce(closed_at, ?1) WHERE id = ?2",
                    params![clock::now_us(), session_id],
                )?;
                Ok(Some(session_id))
            }
            Op::ReleaseUnsynced { passing_ids } => {
                let tx = db(&mut self.conn)?.transaction()?;
                {
                    let mut stmt =
                        tx.prepare_cached("UPDATE passings SET clock_synced = 2 WHERE id = ?1 AND clock_synced = 0")?;
                    for id in &passing_ids {
                        stmt.execute([id])?;
                    }
                }
                tx.commit()?;
                Ok(None)
            }
            Op::Reconfigure { bibs, unmapped, dedup_window } => {
                info!(bib_map_entries = bibs.len(), "bib map and de-duplication settings reloaded");
                self.unmapped = unmapped;
                self.bibs = bibs;
                self.windows.set_window(dedup_window);
                self.dedup_window = dedup_window;
                Ok(None)
            }
            Op::ClosedRemotely { session_id, reason } => {
                db(&mut self.conn)?.execute(
                    "UPDATE sessions SET remote_state = 'closed_remotely', remote_error = ?1,
                        state = CASE WHEN state = 'closing' THEN 'closed' ELSE state END WHERE id = ?2",
                    params![reason, session_id],
                )?;
                Ok(Some(session_id))
            }
        }
    }

    /// Open a new session at once (offline or not); the open one, if any, starts closing.
    fn start_session(&mut self, alias: &str) -> anyhow::Result<i64> {
        self.start_session_with(alias, false).map(|(id, _)| id)
    }

    /// Open a new session; with `resend`, move into it (numbered afresh from 1) the passings that
    /// remotely closed sessions could not deliver. One transaction: all of it or none.
    fn start_session_with(&mut self, alias: &str, resend: bool) -> anyhow::Result<(i64, i64)> {
        let now = clock::now_us();
        let tx = db(&mut self.conn)?.transaction()?;
        let events = drain_windows(&tx, &mut self.open, &mut self.windows)?;
        if let Some(open) = self.open {
            close_in(&tx, open.id, now)?;
        }
        tx.execute(
            "INSERT INTO sessions (alias, state, remote_state, created_at) VALUES (?1, 'open', 'pending', ?2)",
            params![alias, now],
        )?;
        let id = tx.last_insert_rowid();
        let mut next_num = 1;
        if resend {
            let held: Vec<i64> = tx
                .prepare("SELECT id FROM sessions WHERE remote_state = 'closed_remotely' ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for from in held {
                let passings: Vec<(i64, i64)> = tx
                    .prepare(
                        "SELECT id, num_passing FROM passings WHERE session_id = ?1 AND state = 'pending'
                         AND num_passing > (SELECT delivered_through FROM sessions WHERE id = ?1) ORDER BY num_passing",
                    )?
                    .query_map([from], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                for (passing, old_num) in &passings {
                    tx.execute(
                        "UPDATE passings SET session_id = ?1, num_passing = ?2, resent_from = ?3 WHERE id = ?4",
                        params![id, next_num, format!("{from}#{old_num}"), passing],
                    )?;
                    next_num += 1;
                }
                tx.execute(
                    "UPDATE sessions SET moved = moved + ?1 WHERE id = ?2",
                    params![passings.len() as i64, from],
                )?;
            }
            if next_num == 1 {
                anyhow::bail!(
                    "nothing to resend: no remotely closed session has passings waiting (see `rufus-gateway session list`)"
                );
            }
            tx.execute("UPDATE sessions SET next_num = ?1 WHERE id = ?2", params![next_num, id])?;
            info!(
                session_id = id,
                moved = next_num - 1,
                "passings of remotely closed sessions moved into a new session"
            );
        }
        tx.commit()?;
        self.publish(events);
        if let Some(open) = self.open {
            info!(session_id = open.id, "session closing: a new session was started");
        }
        self.open = Some(OpenSession { id, next_num });
        self.windows.clear();
        info!(session_id = id, alias, "session started");
        Ok((id, next_num - 1))
    }

    fn close_locally(&mut self, id: i64) -> anyhow::Result<()> {
        let tx = db(&mut self.conn)?.transaction()?;
        let events = drain_windows(&tx, &mut self.open, &mut self.windows)?;
        close_in(&tx, id, clock::now_us())?;
        tx.commit()?;
        self.publish(events);
        self.open = None;
        self.windows.clear();
        Ok(())
    }

    fn publish(&self, events: Vec<PassingEvent>) {
        if !events.is_empty() {
            self.notify.notify_one();
            for e in events {
                let _ = self.events.send(e);
            }
        }
    }
}

/// Emit every open strongest window into the session that is ending (inside its transaction).
fn drain_windows(
    tx: &rusqlite::Transaction<'_>,
    open: &mut Option<OpenSession>,
    windows: &mut Windows,
) -> anyhow::Result<Vec<PassingEvent>> {
    let (Some(open), Windows::Strongest(w)) = (open.as_mut(), windows) else { return Ok(Vec::new()) };
    let mut passings = PassingWriter::new(tx)?;
    let mut events = Vec::new();
    for ended in w.drain() {
        events.push(passings.insert(open.id, &mut open.next_num, &ended.best, ended.start_us)?);
    }
    tx.execute("DELETE FROM windows WHERE session_id = ?1", [open.id])?;
    tx.execute("UPDATE sessions SET next_num = ?1 WHERE id = ?2", params![open.next_num, open.id])?;
    Ok(events)
}

/// Inserts passings, numbering them.
struct PassingWriter<'t> {
    stmt: rusqlite::CachedStatement<'t>,
}

impl<'t> PassingWriter<'t> {
    fn new(tx: &'t rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            stmt: tx.prepare_cached(
                "INSERT INTO passings (session_id, num_passing, read_id, chip, bib, timestamp, window_start, clock_synced)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?,
        })
    }

    fn insert(
        &mut self,
        session_id: i64,
        num: &mut i64,
        c: &Candidate,
        window_start: i64,
    ) -> rusqlite::Result<PassingEvent> {
        self.stmt.execute(params![
            session_id,
            *num,
            c.read_id,
            c.chip,
            c.bib,
            c.timestamp_us,
            window_start,
            if c.unsynced { 0 } else { 1 }
        ])?;
        let event = PassingEvent {
            session_id,
            num_passing: *num,
            bib: c.bib.clone(),
            chip: c.chip.clone(),
            timestamp_us: c.timestamp_us,
        };
        *num += 1;
        Ok(event)
    }
}

/// Mirror the strongest windows of the touched chips into the `windows` table (crash safety).
fn persist_windows(
    tx: &rusqlite::Transaction<'_>,
    session_id: i64,
    w: &Strongest,
    touched: &[String],
) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT OR REPLACE INTO windows (chip, session_id, start_us, opened_mono, best_read, best_rssi) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM windows WHERE chip = ?1")?;
    let mut done = std::collections::HashSet::new();
    for chip in touched {
        if !done.insert(chip.as_str()) {
            continue;
        }
        match w.open_window(chip) {
            Some(win) => upsert.execute(params![
                chip,
                session_id,
                win.start_us,
                win.opened_mono_us,
                win.best.read_id,
                win.best.rssi
            ])?,
            None => delete.execute([chip])?,
        };
    }
    Ok(())
}

/// A session the API already closed has nothing left to do remotely: it is closed at once.
/// Move a session's watermark to `last` (see `Op::Delivered`); None if this database holds no
/// such session under that token.
fn record_delivery(conn: &mut Connection, session_id: i64, token: &str, last: i64) -> anyhow::Result<Option<()>> {
    let tx = conn.transaction()?;
    let through: Option<i64> = tx
        .prepare_cached("SELECT delivered_through FROM sessions WHERE id = ?1 AND token = ?2")?
        .query_row(params![session_id, token], |r| r.get(0))
        .optional()?;
    let Some(through) = through else { return Ok(None) };
    if last <= through {
        // A retried record of a range a later one already covered.
        return Ok(Some(()));
    }
    let delivered: i64 = tx
        .prepare_cached(
            "SELECT count(*) FROM passings
             WHERE session_id = ?1 AND num_passing > ?2 AND num_passing <= ?3 AND state = 'pending'",
        )?
        .query_row(params![session_id, through, last], |r| r.get(0))?;
    tx.prepare_cached("UPDATE sessions SET delivered_through = ?1, delivered = delivered + ?2 WHERE id = ?3")?
        .execute(params![last, delivered, session_id])?;
    tx.prepare_cached("INSERT INTO deliveries (session_id, last, first, at) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![session_id, last, through + 1, clock::now_us()])?;
    tx.commit()?;
    Ok(Some(()))
}

fn close_in(tx: &rusqlite::Transaction<'_>, id: i64, now: i64) -> rusqlite::Result<usize> {
    tx.execute(
        "UPDATE sessions SET state = CASE WHEN remote_state IN ('closed', 'closed_remotely') THEN 'closed' ELSE 'closing' END,
            closed_at = ?1 WHERE id = ?2 AND state = 'open'",
        params![now, id],
    )
}

fn candidate(read_id: i64, read: &Read, bib: String) -> Candidate {
    Candidate {
        read_id,
        chip: read.chip.clone(),
        bib,
        timestamp_us: read.timestamp_us,
        rssi: read.rssi,
        unsynced: read.host_stamped && !read.clock_synced,
    }
}

/// The bib of a read: the bib map, then a bib the reader sent, then the chip (or none: `unmapped = "skip"`).
fn bib_for(bibs: &HashMap<String, String>, unmapped: Unmapped, read: &Read) -> Option<String> {
    if let Some(bib) = bibs.get(&read.chip) {
        return Some(bib.clone());
    }
    if let Some(bib) = &read.bib {
        return Some(bib.clone());
    }
    match unmapped {
        Unmapped::Chip => Some(read.chip.clone()),
        Unmapped::Skip => None,
    }
}
