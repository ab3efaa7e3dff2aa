//! The daemon's state in one structure: `status --json`, the human summary, sd_notify `STATUS=`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::clock::ClockWatch;
use crate::reader::{ReaderStats, ReaderStatus};
use crate::signal::{Health, PENDING_TOO_LONG, Pattern};
use crate::store::StoreStats;
use crate::store::query::{Db, QueueCounts, RemoteState, SessionRow, SessionState};
use crate::uplink::{UplinkState, UplinkStatus};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// What is wrong, in words, most important first; empty when all is well.
    pub problems: Vec<String>,
    pub reader: ReaderStatus,
    pub session: Option<SessionRow>,
    pub queue: QueueCounts,
    pub uplink: UplinkStatus,
    pub clock: ClockStatus,
    pub storage: StorageStatus,
    /// Where the dashboard and the live feed listen (null when off).
    #[serde(default)]
    pub listening: Listening,
    /// The LED and the beeper (`[signal]`); null when neither is configured.
    #[serde(default)]
    pub signal: Option<crate::signal::SignalStatus>,
    /// The USB stick backup (`[backup]`); null when `backup.dir` is not set.
    #[serde(default)]
    pub backup: Option<crate::backup::BackupStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Listening {
    /// The address the dashboard listens on; null when off or not listening.
    pub http: Option<String>,
    /// The address the live feed listens on; null when off or not listening.
    pub feed: Option<String>,
    /// The control socket's path; null while it cannot listen.
    #[serde(default)]
    pub control: Option<String>,
    /// Listeners that are configured but cannot listen, by name (`http`, `feed`, `control`).
    #[serde(default)]
    pub failing: std::collections::BTreeMap<String, ListenFailure>,
    /// Connections refused since start because a listener had all the clients it takes, by
    /// listener (`http`, `feed`, `control`).
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
}

impl Listening {
    pub fn set_address(&mut self, what: Listener, address: Option<String>) {
        match what {
            Listener::Http => self.http = address,
            Listener::Feed => self.feed = address,
            Listener::Control => self.control = address,
        }
    }
}

/// A listener of the box: its name in `status.listening` (`failing`, `refused`) and the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Control,
    Http,
    Feed,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Control => "control",
            Listener::Http => "http",
            Listener::Feed => "feed",
        }
    }
}

/// A listener that cannot listen: where it should, why it cannot, since when (it is retried).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenFailure {
    pub listen: String,
    pub error: String,
    pub since: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClockStatus {
    pub synchronized: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageStatus {
    pub path: String,
    pub error: Option<String>,
    pub buffered_reads: u64,
    pub dropped_reads: u64,
    /// Replayed reads whose time falls in no open session: stored as reads, no passing.
    #[serde(default)]
    pub replayed_outside_sessions: u64,
}

/// Everything status is made from; cheap to clone into a blocking task.
#[derive(Clone)]
pub struct StatusSource {
    pub port: String,
    pub db_path: PathBuf,
    pub reader: Arc<ReaderStats>,
    pub store: Arc<StoreStats>,
    pub uplink: Arc<Mutex<UplinkStatus>>,
    pub clock: ClockWatch,
    pub listening: Arc<Mutex<Listening>>,
    pub signal: Arc<Mutex<crate::signal::SignalStatus>>,
    /// None when `backup.dir` is not set.
    pub backup: Option<Arc<Mutex<crate::backup::BackupStatus>>>,
}

impl StatusSource {
    /// Blocking (SQLite): call from a blocking thread.
    pub fn snapshot(&self) -> anyhow::Result<Status> {
        let read = || -> anyhow::Result<_> {
            let db = Db::open_readonly(&self.db_path)?;
            let session = db.open_session()?.or(latest_closing(&db)?);
            let queue = db.queue()?;
            let held: Vec<SessionRow> = db
                .sessions()?
                .into_iter()
                .filter(|s| s.remote_state == RemoteState::ClosedRemotely && s.pending > 0)
                .collect();
            let last_minute = db.reads_since(crate::clock::now_us() - 60_000_000)?;
            Ok((session, queue, held, last_minute))
        };
        let mut error = self.store.last_error.lock().map(|e| e.clone()).unwrap_or(None);
        // Storage that cannot even be read (gone, unreadable) still gets a status: what the
        // daemon knows in memory, and the reason.
        let mut readable = true;
        let (session, queue, held_sessions, last_minute) = read().unwrap_or_else(|e| {
            readable = false;
            error.get_or_insert_with(|| format!("cannot read the database: {e:#}"));
            (None, QueueCounts::default(), Vec::new(), 0)
        });
        let uplink = self.uplink.lock().map(|u| u.clone()).unwrap_or_default();
        let mut reader = self.reader.snapshot(&self.port);
        reader.reads_last_minute = last_minute;
        let status = Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            problems: Vec::new(),
            reader,
            session,
            queue,
            uplink,
            clock: ClockStatus { synchronized: self.clock.synchronized() },
            storage: StorageStatus {
                path: self.db_path.display().to_string(),
                error,
                buffered_reads: self.store.buffered_reads.load(Ordering::Relaxed),
                dropped_reads: self.store.dropped_reads.load(Ordering::Relaxed),
                replayed_outside_sessions: self.store.replayed_elsewhere.load(Ordering::Relaxed),
            },
            listening: self.listening.lock().map(|l| l.clone()).unwrap_or_default(),
            signal: self.signal.lock().ok().map(|s| s.clone()).filter(|s| s.led.is_some() || s.beeper.is_some()),
            backup: self.backup.as_ref().and_then(|b| b.lock().ok().map(|b| b.shown(crate::clock::now_us()))),
        };
        Ok(with_problems(status, &held_sessions, readable))
    }
}

fn latest_closing(db: &Db) -> rusqlite::Result<Option<SessionRow>> {
    Ok(db.sessions()?.into_iter().rev().find(|s| s.state == SessionState::Closing))
}

fn with_problems(mut s: Status, held: &[SessionRow], readable: bool) -> Status {
    let mut p = Vec::new();
    if let Some(e) = &s.storage.error {
        p.push(format!("DATABASE CANNOT BE WRITTEN ({e}); {} reads waiting in memory", s.storage.buffered_reads));
    }
    if s.uplink.state == UplinkState::AuthFailed {
        p.push(format!(
            "API REFUSES THIS BOX: {}",
            s.uplink.last_error.as_deref().unwrap_or("check api.api_key and api.deviceid")
        ));
    }
    for h in held {
        p.push(format!(
            "SESSION {} ({}) WAS CLOSED REMOTELY: {} passings are kept here, not sent; run `rufus-gateway session resend` or export them",
            h.id, h.alias, h.pending
        ));
    }
    for a in s.reader.antennas.iter().filter(|a| a.silent) {
        p.push(format!(
            "ANTENNA {} SILENT for {} s while the others read: check its cable and mat",
            a.antenna,
            a.silent_for_s.unwrap_or_default()
        ));
    }
    if !s.reader.connected {
        p.push(format!(
            "READER NOT CONNECTED on {}: {}",
            s.reader.port,
            s.reader.last_error.as_deref().unwrap_or("waiting for the port")
        ));
    }
    if s.reader.clock.clock_off
        && let Some(ms) = s.reader.clock.clock_offset_ms
    {
        p.push(format!(
            "READER CLOCK {} by {:.3} s (measured {}): reader timestamps are off by as much; set its clock, or reader.clock = \"set\"",
            if ms > 0 { "FAST" } else { "SLOW" },
            ms.abs() as f64 / 1000.0,
            s.reader.clock.clock_measured_at.as_deref().unwrap_or("")
        ));
    }
    if s.reader.retiming {
        p.push(format!(
            "READER TIME NOT BELIEVED: {} reads so far (the last at {}) carried a time further than reader.max_skew from the host clock; they keep the host's time. Check the reader's clock",
            s.reader.retimed_total,
            s.reader.last_retimed_at.as_deref().unwrap_or("")
        ));
    }
    if let Some(e) = &s.reader.clock.clock_error {
        p.push(format!("READER CLOCK: {e} (reader.clock = \"ignore\" stops asking)"));
    }
    if let (crate::reader::talk::RewindState::Failed, Some(e)) = (s.reader.rewind.state, &s.reader.rewind.error) {
        p.push(format!(
            "REWIND INCOMPLETE: {e}; {} replayed reads were taken in; it is asked again at the next connect",
            s.reader.rewind.reads
        ));
    }
    for (what, f) in &s.listening.failing {
        let name = match what.as_str() {
            "http" => "DASHBOARD",
            "control" => "CONTROL SOCKET (the command line's way in)",
            _ => "LIVE FEED",
        };
        p.push(format!(
            "{name} NOT LISTENING on {} since {}: {}; retrying (reading, storing and uploading are not affected)",
            f.listen, f.since, f.error
        ));
    }
    if matches!(s.uplink.state, UplinkState::Offline | UplinkState::BackingOff) {
        p.push(format!(
            "OFFLINE: {} passings waiting; they will be sent when the API answers ({})",
            s.queue.pending - s.queue.held,
            s.uplink.last_error.as_deref().unwrap_or("no answer")
        ));
    }
    // (Unknown while the database cannot be read: the storage problem says so.)
    if s.session.as_ref().is_none_or(|x| x.state != SessionState::Open) && readable {
        p.push("NO SESSION OPEN: reads are kept but not uploaded; run `rufus-gateway session start`".into());
    } else if let Some(test) = s.session.as_ref().filter(|x| x.test && x.state == SessionState::Open) {
        p.push(format!(
            "TEST SESSION {} ({}) OPEN: a chip check, nothing is sent to RUFUS; start the race with `rufus-gateway session start`",
            test.id, test.alias
        ));
    }
    if let Some(b) = &s.backup {
        // Files left alone: the backup goes on under other names, and the stick is suspect.
        if let Some(files) = &b.left_alone {
            p.push(format!(
                "BACKUP STICK at {} holds files this box must not write ({files}); its sessions are written under other names: check the stick",
                b.dir
            ));
        }
        match &b.error {
            Some(e) => p.push(format!(
                "BACKUP NOT WRITTEN to {} ({e}); reading, storing and uploading are not affected",
                b.dir
            )),
            None if !b.mounted => {
                p.push(format!("NO BACKUP STICK at {}: plug in the stick labelled RUFUSBACKUP", b.dir))
            }
            None => {}
        }
    }
    if let Some(e) = s.signal.as_ref().and_then(|x| x.error.as_ref()) {
        p.push(format!("LED OR BEEPER CANNOT BE DRIVEN ({e}); see the README's \"LED and beeper\""));
    }
    if s.queue.waiting_for_clock > 0 {
        p.push(format!(
            "{} PASSINGS WAIT FOR THE CLOCK: read before NTP synchronised; they are corrected and sent once it does (at most clock.max_hold)",
            s.queue.waiting_for_clock
        ));
    } else if !s.clock.synchronized {
        p.push("CLOCK NOT SYNCHRONISED: host timestamps may be wrong until NTP synchronises".into());
    }
    s.problems = p;
    s
}

impl Status {
    /// What the LED shows (the pattern the state calls for, worst first) and whether the
    /// beeper's reader-lost alarm is due.
    pub fn health(&self, now: chrono::DateTime<chrono::Utc>) -> Health {
        let race_open = self.session.as_ref().is_some_and(|x| x.state == SessionState::Open && !x.test);
        Health { pattern: self.led_pattern(now), reader_lost_in_race: !self.reader.connected && race_open }
    }

    fn led_pattern(&self, now: chrono::DateTime<chrono::Utc>) -> Pattern {
        let s = self;
        if !s.reader.connected || s.storage.error.is_some() {
            return Pattern::Fast;
        }
        let waiting_too_long = s
            .queue
            .oldest_pending_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| (now - t.with_timezone(&chrono::Utc)).to_std().is_ok_and(|age| age > PENDING_TOO_LONG));
        let session_open = s.session.as_ref().is_some_and(|x| x.state == SessionState::Open);
        if waiting_too_long
            || s.uplink.state == UplinkState::AuthFailed
            || !s.clock.synchronized
            || s.reader.clock.clock_off
            || s.reader.retiming
            || s.reader.antennas.iter().any(|a| a.silent)
            || s.backup.as_ref().is_some_and(|b| b.error.is_some())
            || !session_open
        {
            return Pattern::Slow;
        }
        Pattern::Steady
    }

    /// A few aligned lines a person can read at a glance, the problem first.
    pub fn human(&self) -> String {
        let mut out = String::new();
        if self.problems.is_empty() {
            out.push_str("OK: reading, storing and uploading\n\n");
        } else {
            for p in &self.problems {
                out.push_str(&format!("! {p}\n"));
            }
            out.push('\n');
        }
        let r = &self.reader;
        out.push_str(&format!(
            "reader    {} on {}, {} reads/min, {} reads since start, {} rejected, last read {}\n",
            if r.connected { "connected" } else { "NOT CONNECTED" },
            r.port,
            r.reads_last_minute,
            r.reads_total,
            r.rejected_total,
            r.last_read_at.as_deref().unwrap_or("never")
        ));
        if !r.antennas.is_empty() {
            let each: Vec<String> = r
                .antennas
                .iter()
                .map(|a| format!("{}: {}/min{}", a.antenna, a.reads_last_minute, if a.silent { " SILENT" } else { "" }))
                .collect();
            out.push_str(&format!("antennas  {}\n", each.join(", ")));
        }
        if let Some(ms) = r.clock.clock_offset_ms {
            out.push_str(&format!(
                "rdr clock {:+.3} s from ours (measured {}){}\n",
                ms as f64 / 1000.0,
                r.clock.clock_measured_at.as_deref().unwrap_or(""),
                if r.clock.clock_off { ", BEYOND TOLERANCE" } else { "" }
            ));
        }
        if r.rewind.state != crate::reader::talk::RewindState::Off {
            out.push_str(&format!(
                "rewind    {:?}: {} replayed reads{}\n",
                r.rewind.state,
                r.rewind.reads,
                r.rewind.asked.as_deref().map(|a| format!(" ({a})")).unwrap_or_default()
            ));
        }
        match &self.session {
            Some(s) => out.push_str(&format!(
                "session   #{} {} — {}{}, remote {}{}\n",
                s.id,
                s.alias,
                s.state,
                if s.test { " (TEST: chip check)" } else { "" },
                s.remote_state,
                s.remote_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
            )),
            None => out.push_str("session   none open\n"),
        }
        let q = &self.queue;
        out.push_str(&format!(
            "queue     {} pending{}, {} delivered, {} undeliverable{}\n",
            q.pending,
            if q.held > 0 { format!(" ({} held by a remotely closed session)", q.held) } else { String::new() },
            q.delivered,
            q.undeliverable,
            q.oldest_pending_at.as_ref().map(|t| format!(", oldest waiting {t}")).unwrap_or_default()
        ));
        let u = &self.uplink;
        out.push_str(&format!(
            "uplink    {}{}{}\n",
            u.state.as_str(),
            u.last_success_at.as_ref().map(|t| format!(", last success {t}")).unwrap_or_default(),
            u.last_error.as_ref().map(|e| format!(", last error: {e}")).unwrap_or_default()
        ));
        out.push_str(&format!(
            "clock     {}\n",
            if self.clock.synchronized { "synchronised" } else { "NOT synchronised" }
        ));
        out.push_str(&format!(
            "storage   {}{}\n",
            self.storage.path,
            self.storage.error.as_ref().map(|e| format!(" — ERROR: {e}")).unwrap_or_default()
        ));
        out
    }

    /// One line for systemd's `STATUS=`.
    pub fn one_line(&self) -> String {
        let session = match &self.session {
            Some(s) => format!("session #{} {} ({}/{})", s.id, s.alias, s.state, s.remote_state),
            None => "no session".into(),
        };
        format!(
            "{session}; {} pending; uplink {}; reader {}",
            self.queue.pending,
            self.uplink.state.as_str(),
            if self.reader.connected { "connected" } else { "disconnected" }
        )
    }
}
