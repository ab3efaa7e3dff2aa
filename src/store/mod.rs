//! The store actor: one thread owns the only writing SQLite connection. It commits reads in small
//! groups, turns them into passings (de-duplication, bib mapping, `num_passing`), and applies the
//! session changes asked for by the control socket and the uplink. Everything else reads through
//! `query::Db` on connections of its own.

pub mod copies;
mod maintenance;
mod open;
mod passings;
pub mod query;
pub mod schema;
mod sessions;

#[cfg(feature = "test-support")]
pub use open::open_writer;
pub use open::stable_plans;
pub use passings::load_bib_map;

// Shared between the parts of the actor (each part sees them through `use super::*`).
use open::{db, explain_open_error, is_disk_full, rescue};
use passings::{drain_windows, record_delivery};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, select};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
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
    /// Of a test session (chip check): not for timing software.
    pub test: bool,
}

/// One read as it was committed, for `rufus-gateway watch`: made only while someone watches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadEvent {
    /// The time the read (and its passing) carries, UTC µs.
    pub at_us: i64,
    pub chip: String,
    /// From the bib map (or the reader); None: not in the bib map.
    pub bib: Option<String>,
    pub antenna: Option<i64>,
    pub rssi: Option<i64>,
    /// The passing this read became, or None: a repeat inside the de-duplication window (or no
    /// session open). With `dedup_keep = "strongest"`, reads are never passings themselves: the
    /// window's best read is announced again, with its number, when the window ends (`strongest`).
    pub passing: Option<i64>,
    #[serde(default)]
    pub strongest: bool,
    pub session_id: Option<i64>,
    #[serde(default)]
    pub test: bool,
}

/// What the writer tells live consumers once a commit is done.
#[derive(Clone)]
pub struct Live {
    /// Passings (demo, feed, LED and beeper).
    pub passings: broadcast::Sender<PassingEvent>,
    /// Reads, only while a `watch` listens (an `Arc` keeps the preallocated slots small).
    pub reads: broadcast::Sender<Arc<ReadEvent>>,
    /// The bib map in use (replaced at a reload), for the dashboard's chip check.
    pub bibs: Arc<std::sync::RwLock<Bibs>>,
}

/// A bib map, shared without copying.
pub type Bibs = Arc<HashMap<String, String>>;

/// Reads a slow watcher may fall behind by before it misses some: more than a mass start's burst.
const WATCH_BACKLOG: usize = 4096;

impl Live {
    pub fn new() -> Self {
        Self { passings: broadcast::channel(1024).0, reads: broadcast::channel(WATCH_BACKLOG).0, bibs: Arc::default() }
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

/// A change the writer makes on request; each gets a reply once it is committed.
#[derive(Debug)]
pub enum Op {
    StartSession {
        alias: String,
        /// A test session (chip check): local, never sent to RUFUS.
        test: bool,
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

/// The writer's answer to a change: the affected session, or why it was not made.
pub type Reply = Result<Option<i64>, StoreError>;

/// Why a change was not made, sorted by what the caller should say: a refusal is the user's to
/// fix (the dashboard answers 409), a storage failure the box's (503; it may work later).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Not possible now ("no session is open", "nothing to resend"): the reason, in words.
    #[error("{0}")]
    Refused(String),
    /// The database could not be written or read.
    #[error("{0}")]
    Storage(String),
    /// The writer thread has exited (shutdown, or a fatal error): nothing more can be recorded.
    #[error("the store has stopped")]
    Stopped,
}

/// Why the writer did not make a requested change: the two cases its callers tell apart.
#[derive(Debug)]
pub(crate) enum Failed {
    /// Not possible now ("no session is open"): the reason, in words; nothing was written.
    Refused(String),
    /// The database failed.
    Storage(anyhow::Error),
}

impl Failed {
    /// As an error for a caller that does not tell the cases apart.
    pub(crate) fn into_error(self) -> anyhow::Error {
        match self {
            Failed::Refused(why) => anyhow::anyhow!(why),
            Failed::Storage(e) => e,
        }
    }
}

/// Any error from SQLite or the file system is a storage failure (`?` says so).
impl<E: Into<anyhow::Error>> From<E> for Failed {
    fn from(e: E) -> Self {
        Failed::Storage(e.into())
    }
}

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
    pub fn submit(&self, op: Op) -> Result<oneshot::Receiver<Reply>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command { op, reply }).map_err(|_| StoreError::Stopped)?;
        Ok(rx)
    }

    /// Returns the affected session id, when the operation has one.
    pub async fn call(&self, op: Op) -> Result<Option<i64>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command { op, reply }).map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }
}

/// Shared counters of the writer, for status and the watchdog.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Proof of life for the watchdog.
    pub live: Arc<crate::liveness::Liveness>,
    pub commits: AtomicU64,
    pub buffered_reads: AtomicU64,
    pub dropped_reads: AtomicU64,
    /// Replayed reads whose time falls in no open session: stored as reads, no passing.
    pub replayed_elsewhere: AtomicU64,
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
    reads: Receiver<Box<Read>>,
    commands: Receiver<Command>,
    notify: Arc<Notify>,
    live: Live,
    stats: Arc<StoreStats>,
    commit_interval: Duration,
    unmapped: Unmapped,
    bibs: Bibs,
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

    fn prune(&mut self, mono_now_us: i64) {
        match self {
            Windows::First(d) => d.prune(mono_now_us),
            Windows::Strongest(s) => s.prune(mono_now_us),
        }
    }

    fn keeps_strongest(&self) -> bool {
        matches!(self, Windows::Strongest(_))
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
    /// A test session (chip check, `remote_state = 'local'`).
    test: bool,
}

pub struct StoreParts {
    pub store: Store,
    pub handle: StoreHandle,
}

impl Store {
    /// Open the database and prepare the writer; the handle is how everyone else reaches it.
    pub fn open(
        cfg: &Config,
        reads: Receiver<Box<Read>>,
        notify: Arc<Notify>,
        live: Live,
        stats: Arc<StoreStats>,
    ) -> anyhow::Result<StoreParts> {
        let bibs: Bibs = Arc::new(match &cfg.passings.bib_map {
            Some(p) => load_bib_map(p).with_context(|| format!("passings.bib_map: cannot load {}", p.display()))?,
            None => HashMap::new(),
        });
        if let Ok(mut shared) = live.bibs.write() {
            *shared = bibs.clone();
        }
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
            live,
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
                        batch.push(*read);
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
        self.apply(op).map_err(|failed| match failed {
            Failed::Refused(why) => StoreError::Refused(why),
            Failed::Storage(e) => {
                self.storage_failed(&e);
                let text = format!("{e:#}");
                warn!(error = %text, "a requested change could not be written");
                StoreError::Storage(text)
            }
        })
    }

    /// Periodic work; returns true when strongest windows are due (commit them now).
    fn housekeeping(&mut self, nothing_waiting: bool) -> bool {
        self.windows.prune(clock::monotonic_us());
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

    fn set_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.stats.last_error.lock() {
            *e = error;
        }
    }

    fn publish(&self, events: Vec<PassingEvent>) {
        if !events.is_empty() {
            self.notify.notify_one();
            for e in events {
                let _ = self.live.passings.send(e);
            }
        }
    }

    /// Whether anyone watches the reads (otherwise no `ReadEvent` is made at all).
    fn watched(&self) -> bool {
        self.live.reads.receiver_count() > 0
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
