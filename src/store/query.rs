//! The read side: queries on a connection of their own (WAL lets them run beside the writer).
//! Used by the uplink (what to send next), status, `session list` and `export`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRow {
    pub id: i64,
    pub alias: String,
    pub state: SessionState,
    pub remote_state: RemoteState,
    /// The session's credential: never serialised, never logged whole.
    #[serde(skip)]
    pub token: Option<String>,
    pub remote_error: Option<String>,
    #[serde(rename = "created_at", with = "crate::clock::rfc3339_us")]
    pub created_at_us: i64,
    #[serde(rename = "closed_at", with = "crate::clock::rfc3339_us::option")]
    pub closed_at_us: Option<i64>,
    pub passings: i64,
    pub pending: i64,
    pub delivered: i64,
    pub undeliverable: i64,
    /// Moved into a later session by `session resend`.
    pub moved: i64,
    /// A test session (chip check): `remote_state` is `local`, nothing of it is sent.
    #[serde(default)]
    pub test: bool,
}

/// A session's life on the box (`sessions.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Reads are assigned to it.
    Open,
    /// No more reads; its queue drains, then it is closed remotely.
    Closing,
    Closed,
}

/// A session's life at RUFUS (`sessions.remote_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteState {
    /// Not created at RUFUS yet (offline, or not reached yet).
    Pending,
    Open,
    Closed,
    /// Closed at RUFUS by someone else: what it still holds waits for `session resend`.
    ClosedRemotely,
    /// A test session (a chip check, `session start --test`): never sent to RUFUS.
    Local,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Open => "open",
            SessionState::Closing => "closing",
            SessionState::Closed => "closed",
        }
    }
}

impl RemoteState {
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteState::Pending => "pending",
            RemoteState::Open => "open",
            RemoteState::Closed => "closed",
            RemoteState::ClosedRemotely => "closed_remotely",
            RemoteState::Local => "local",
        }
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::fmt::Display for RemoteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Both are stored as their JSON names.
fn state_from_sql<T: serde::de::DeserializeOwned>(r: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    serde_json::from_value(serde_json::Value::String(text.clone())).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown state {text:?}").into(),
        )
    })
}

const SESSION_COLUMNS: &str = "id, alias, state, remote_state, token, remote_error, created_at, closed_at, next_num - 1, delivered, undeliverable, moved";

fn session_row(r: &Row<'_>) -> rusqlite::Result<SessionRow> {
    let passings: i64 = r.get(8)?;
    let delivered: i64 = r.get(9)?;
    let undeliverable: i64 = r.get(10)?;
    let moved: i64 = r.get(11)?;
    let remote_state: RemoteState = state_from_sql(r, 3)?;
    // A test session's passings wait for nothing: none is pending.
    let pending = if remote_state == RemoteState::Local { 0 } else { passings - delivered - undeliverable - moved };
    Ok(SessionRow {
        id: r.get(0)?,
        alias: r.get(1)?,
        state: state_from_sql(r, 2)?,
        remote_state,
        token: r.get(4)?,
        remote_error: r.get(5)?,
        created_at_us: r.get(6)?,
        closed_at_us: r.get(7)?,
        passings,
        pending,
        delivered,
        undeliverable,
        moved,
        test: remote_state == RemoteState::Local,
    })
}

macro_rules! delivered_by_watermark {
    () => {
        "p.state = 'pending' AND p.num_passing <= s.delivered_through"
    };
}

/// A passing's state (`pending | delivered | undeliverable`) from its row `p` and its session
/// `s`: delivery is recorded by the session's watermark, not row by row (schema version 2).
pub const PASSING_STATE: &str = concat!("CASE WHEN ", delivered_by_watermark!(), " THEN 'delivered' ELSE p.state END");

/// The one rule for a passing delivered by its session's watermark, as SQL over `p` and `s`:
/// still `pending` in its row, at or below the session's `delivered_through`.
pub const DELIVERED_BY_WATERMARK: &str = delivered_by_watermark!();

/// Totals over every session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting to be sent (includes `held`).
    pub pending: i64,
    pub delivered: i64,
    pub undeliverable: i64,
    /// Pending passings of sessions the API closed: kept, waiting for `session resend` or export.
    pub held: i64,
    /// Pending passings stamped before the clock synchronised, waiting for correction.
    pub waiting_for_clock: i64,
    /// Timestamp of the oldest passing still waiting.
    pub oldest_pending_at: Option<String>,
}

/// A passing as the dashboard and the feed show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PassingRow {
    pub num_passing: i64,
    pub bib: String,
    pub chip: String,
    #[serde(rename = "timestamp", with = "crate::clock::api_timestamp_us")]
    pub timestamp_us: i64,
    pub state: String,
}

/// A passing as the uplink sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub id: i64,
    pub num_passing: i64,
    pub bib: String,
    pub chip: String,
    pub timestamp_us: i64,
    /// Held for clock correction: the boot and monotonic time of its read.
    pub held: Option<(String, i64)>,
}

/// The uplink's next step, replaying the store in order (DESIGN.md, Architecture).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Create { session_id: i64, alias: String },
    Send { session_id: i64, token: String, passings: Vec<Outgoing> },
    Close { session_id: i64, token: String },
    Idle,
}

/// A read as a person sees it: in `watch` (a line of `watch --json`) and in a chip check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShownRead {
    /// The time the read carries (shown as RFC 3339, UTC, milliseconds).
    #[serde(rename = "at", with = "crate::clock::api_timestamp_us")]
    pub at_us: i64,
    pub chip: String,
    /// From the bib map; null when the chip is not in it.
    pub bib: Option<String>,
    pub antenna: Option<i64>,
    pub rssi: Option<i64>,
    /// The passing it became (`num_passing`), or null for a repeat inside the window.
    pub passing: Option<i64>,
    /// With `dedup_keep = "strongest"`: the best read of a window that just ended, announced again
    /// with its passing number.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strongest: bool,
    /// Of a test session (chip check), in `watch`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub test: bool,
}

/// A chip's reads in a chip check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChipCount {
    pub chip: String,
    pub bib: Option<String>,
    pub reads: i64,
    pub antennas: Vec<i64>,
    pub best_rssi: Option<i64>,
    pub last_read_at: String,
}

/// Where the uplink stands: the last passing it delivered (perhaps not recorded yet), named by
/// the session's id and remote token. The next batch starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub session_id: i64,
    pub token: String,
    pub last: i64,
}

impl Cursor {
    /// The number to send after, for this session: 0 when the cursor belongs to another session,
    /// or to a session of a database since replaced (whose id now names another, by token).
    pub fn after(cursor: Option<&Cursor>, session_id: i64, token: &str) -> i64 {
        cursor.filter(|c| c.session_id == session_id && c.token == token).map_or(0, |c| c.last)
    }
}

/// A reading connection's page cache: its queries walk an index to the newest rows (the next
/// batch, the last passings), a few pages each; SQLite's default is 2 MB per connection. See the
/// writer's (`store::open`) for what was measured.
const READER_CACHE: &str = "PRAGMA cache_size = -256";

pub struct Db {
    pub(super) conn: Connection,
}

impl Db {
    pub fn open_readonly(path: &Path) -> rusqlite::Result<Db> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        super::stable_plans(&conn)?;
        conn.execute_batch(READER_CACHE)?;
        Ok(Db { conn })
    }

    pub fn sessions(&self) -> rusqlite::Result<Vec<SessionRow>> {
        let mut stmt = self.conn.prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sessions ORDER BY id"))?;
        stmt.query_map([], session_row)?.collect()
    }

    pub fn session(&self, id: i64) -> rusqlite::Result<Option<SessionRow>> {
        self.conn
            .query_row(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"), [id], session_row)
            .optional()
    }

    /// The last `n` reads stored, newest first, with their reader times and raw bytes: where a
    /// rewind begins.
    pub fn last_reads(&self, n: usize) -> rusqlite::Result<Vec<crate::reader::talk::StoredRead>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT reader_time, received_at, clock_synced, replayed, raw FROM reads ORDER BY id DESC LIMIT ?1",
        )?;
        stmt.query_map([n as i64], |r| {
            Ok(crate::reader::talk::StoredRead {
                reader_time_us: r.get(0)?,
                received_at_us: r.get(1)?,
                clock_synced: r.get(2)?,
                replayed: r.get(3)?,
                raw: r.get::<_, Option<Vec<u8>>>(4)?.unwrap_or_default(),
            })
        })?
        .collect()
    }

    /// The session reads are assigned to, if any.
    pub fn open_session(&self) -> rusqlite::Result<Option<SessionRow>> {
        self.conn
            .query_row(
                &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE state = 'open' ORDER BY id DESC LIMIT 1"),
                [],
                session_row,
            )
            .optional()
    }

    pub fn queue(&self) -> rusqlite::Result<QueueCounts> {
        let (passings, delivered, undeliverable, held): (i64, i64, i64, i64) = self.conn.query_row(
            "SELECT coalesce(sum(next_num - 1 - moved), 0), coalesce(sum(delivered), 0), coalesce(sum(undeliverable), 0),
                    coalesce(sum(CASE WHEN remote_state = 'closed_remotely' THEN next_num - 1 - delivered - undeliverable - moved ELSE 0 END), 0)
             FROM sessions WHERE remote_state != 'local'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        let (oldest, waiting_for_clock): (Option<i64>, i64) = self.conn.query_row(
            // Each session's passings after its watermark, on the (session_id, num_passing) index:
            // the CROSS JOIN keeps the planner, which has no statistics, from ever scanning the
            // whole (mostly delivered) table instead.
            "SELECT min(p.timestamp), coalesce(sum(p.clock_synced = 0), 0)
             FROM sessions s CROSS JOIN passings p
             WHERE s.delivered_through < s.next_num - 1 AND s.remote_state != 'local'
               AND p.session_id = s.id AND p.num_passing > s.delivered_through AND p.state = 'pending'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(QueueCounts {
            pending: passings - delivered - undeliverable,
            delivered,
            undeliverable,
            held,
            waiting_for_clock,
            oldest_pending_at: oldest.map(crate::clock::rfc3339),
        })
    }

    /// What the uplink must do next: the oldest session not finished remotely decides. `sent` is
    /// the uplink's cursor: the session (by id and remote token) and the last number it
    /// delivered, perhaps not recorded yet; the next batch starts after it, or after the
    /// session's recorded watermark if that is further. A cursor for another session (or for a
    /// session of a database since replaced, whose id now names another) is ignored.
    pub fn next_work(&self, limit: usize, sent: Option<&Cursor>) -> rusqlite::Result<Work> {
        let head: Option<(i64, String, String, String, Option<String>, i64)> = self
            .conn
            .prepare_cached(
                "SELECT id, alias, state, remote_state, token, delivered_through FROM sessions
                 WHERE remote_state IN ('pending', 'open') ORDER BY id LIMIT 1",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
            .optional()?;
        let Some((session_id, alias, state, remote_state, token, through)) = head else {
            return Ok(Work::Idle);
        };
        let token = match (remote_state.as_str(), token) {
            ("open", Some(token)) => token,
            _ => return Ok(Work::Create { session_id, alias }),
        };
        let after = Cursor::after(sent, session_id, &token).max(through);
        let passings = self.pending(session_id, limit, after)?;
        if !passings.is_empty() {
            return Ok(Work::Send { session_id, token, passings });
        }
        if state == "open" { Ok(Work::Idle) } else { Ok(Work::Close { session_id, token }) }
    }

    fn pending(&self, session_id: i64, limit: usize, after: i64) -> rusqlite::Result<Vec<Outgoing>> {
        let mut stmt = self.conn.prepare_cached(
            // The read's boot and monotonic time matter only for a held passing: looked up for those
            // alone (a backlog drains without touching the wide `reads` rows).
            "SELECT p.id, p.num_passing, p.bib, p.chip, p.timestamp, p.clock_synced,
                CASE WHEN p.clock_synced = 0 THEN (SELECT b.boot_id FROM reads r JOIN boots b ON b.id = r.boot WHERE r.id = p.read_id) END,
                CASE WHEN p.clock_synced = 0 THEN (SELECT r.monotonic_us FROM reads r WHERE r.id = p.read_id) END
             FROM passings p
             WHERE p.session_id = ?1 AND p.state = 'pending' AND p.num_passing > ?3 ORDER BY p.num_passing LIMIT ?2",
        )?;
        stmt.query_map(params![session_id, limit as i64, after], |r| {
            let held = r.get::<_, i64>(5)? == 0;
            Ok(Outgoing {
                id: r.get(0)?,
                num_passing: r.get(1)?,
                bib: r.get(2)?,
                chip: r.get(3)?,
                timestamp_us: r.get(4)?,
                held: if held { Some((r.get(6)?, r.get(7)?)) } else { None },
            })
        })?
        .collect()
    }

    /// Passings of a session after `since`, for the dashboard and the live feed.
    pub fn passings_since(&self, session_id: i64, since: i64, limit: i64) -> rusqlite::Result<Vec<PassingRow>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT p.num_passing, p.bib, p.chip, p.timestamp, {PASSING_STATE} FROM passings p JOIN sessions s ON s.id = p.session_id
             WHERE p.session_id = ?1 AND p.num_passing > ?2 ORDER BY p.num_passing LIMIT ?3"
        ))?;
        stmt.query_map(params![session_id, since, limit], |r| {
            Ok(PassingRow {
                num_passing: r.get(0)?,
                bib: r.get(1)?,
                chip: r.get(2)?,
                timestamp_us: r.get(3)?,
                state: r.get(4)?,
            })
        })?
        .collect()
    }

    /// A test session's latest reads, newest first, with the passing each became (if any).
    /// Bounded to reads since the session began (on the `received_at` index).
    pub fn chip_check_reads(&self, session: &SessionRow, limit: i64) -> rusqlite::Result<Vec<ShownRead>> {
        let since = session.created_at_us;
        let mut stmt = self.conn.prepare_cached(
            "SELECT r.timestamp, r.chip, r.antenna, r.rssi, (SELECT p.num_passing FROM passings p WHERE p.read_id = r.id)
             FROM reads r WHERE r.received_at >= ?1 AND r.session_id = ?2 ORDER BY r.id DESC LIMIT ?3",
        )?;
        stmt.query_map(params![since, session.id, limit], |r| {
            Ok(ShownRead {
                at_us: r.get(0)?,
                chip: r.get(1)?,
                bib: None,
                antenna: r.get(2)?,
                rssi: r.get(3)?,
                passing: r.get(4)?,
                strongest: false,
                test: false,
            })
        })?
        .collect()
    }

    /// A test session's reads per chip (most recently read first): count, antennas, best RSSI.
    pub fn chip_check_counts(&self, session: &SessionRow, limit: i64) -> rusqlite::Result<Vec<ChipCount>> {
        let since = session.created_at_us;
        let mut stmt = self.conn.prepare_cached(
            "SELECT chip, count(*), group_concat(DISTINCT antenna), max(rssi), max(received_at)
             FROM reads WHERE received_at >= ?1 AND session_id = ?2 GROUP BY chip ORDER BY max(id) DESC LIMIT ?3",
        )?;
        stmt.query_map(params![since, session.id, limit], |r| {
            let antennas: Option<String> = r.get(2)?;
            Ok(ChipCount {
                chip: r.get(0)?,
                bib: None,
                reads: r.get(1)?,
                antennas: antennas.map(|a| a.split(',').filter_map(|n| n.parse().ok()).collect()).unwrap_or_default(),
                best_rssi: r.get(3)?,
                last_read_at: crate::clock::rfc3339(r.get(4)?),
            })
        })?
        .collect()
    }

    /// Reads per minute over the last `minutes` minutes, oldest first.
    pub fn reads_per_minute(&self, now_us: i64, minutes: i64) -> rusqlite::Result<Vec<i64>> {
        let start = now_us - minutes * 60_000_000;
        let mut counts = vec![0i64; minutes as usize];
        let mut stmt = self.conn.prepare_cached(
            "SELECT (received_at - ?1) / 60000000, count(*) FROM reads WHERE received_at >= ?1 GROUP BY 1",
        )?;
        let rows = stmt.query_map([start], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (minute, n) = row?;
            if let Some(slot) = counts.get_mut(minute as usize) {
                *slot += n;
            }
        }
        Ok(counts)
    }

    /// Reads received in the last minute (index on `received_at`).
    pub fn reads_since(&self, since_us: i64) -> rusqlite::Result<i64> {
        self.conn.query_row("SELECT count(*) FROM reads WHERE received_at >= ?1", [since_us], |r| r.get(0))
    }
}

/// One read connection shared by every client of a listener (the dashboard's page, the live
/// feed): opened on first use, reopened after an error. Queries queue on it, so a crowd of
/// clients holds one connection and one blocking thread, never one each.
#[derive(Clone)]
pub struct SharedDb {
    path: std::path::PathBuf,
    connection: std::sync::Arc<tokio::sync::Mutex<Option<Db>>>,
}

impl SharedDb {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), connection: Default::default() }
    }

    pub async fn run<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Db) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let mut slot = self.connection.clone().lock_owned().await;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let db = match slot.take() {
                Some(db) => db,
                None => Db::open_readonly(&path)?,
            };
            let result = query(&db);
            if result.is_ok() {
                *slot = Some(db);
            }
            result
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in the database, in JSON and on screen are one and the same.
    #[test]
    fn state_names_agree() {
        for s in [SessionState::Open, SessionState::Closing, SessionState::Closed] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(format!("{s}"), s.as_str());
        }
        for s in [RemoteState::Pending, RemoteState::Open, RemoteState::Closed, RemoteState::ClosedRemotely] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let conn = Connection::open_in_memory().unwrap();
        let read = |text: &str| -> rusqlite::Result<RemoteState> {
            conn.query_row("SELECT ?1", [text], |r| state_from_sql(r, 0))
        };
        assert_eq!(read("closed_remotely").unwrap(), RemoteState::ClosedRemotely);
        assert!(read("bogus").is_err(), "an unknown state is an error, not a guess");
    }
}
