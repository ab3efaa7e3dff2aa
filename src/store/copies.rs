//! What leaves the box as files: the rows `export` writes and the USB backup appends. Queries
//! only; the CSV is written by their owners ([`crate::export`], [`crate::backup`]).

use rusqlite::{OptionalExtension, params};

use super::query::{DELIVERED_BY_WATERMARK, Db, PASSING_STATE};

/// A passing as `export` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedPassing {
    pub session_id: i64,
    pub alias: String,
    pub num_passing: i64,
    pub bib: String,
    pub chip: String,
    pub timestamp_us: i64,
    pub state: String,
    pub error: Option<String>,
    /// When it was delivered: its own record, or the delivery whose range holds it.
    pub delivered_at_us: Option<i64>,
    pub resent_from: Option<String>,
}

/// A raw read as `export --reads` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedRead {
    pub received_at_us: i64,
    pub chip: String,
    pub antenna: Option<i64>,
    pub rssi: Option<i64>,
    pub reader_time_us: Option<i64>,
    pub session_id: Option<i64>,
    pub clock_synced: bool,
    pub raw: Vec<u8>,
}

/// A raw read as the USB backup copies it, by its row id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackedUpRead {
    pub id: i64,
    pub received_at_us: i64,
    pub chip: String,
    pub antenna: Option<i64>,
    pub rssi: Option<i64>,
    pub reader_time_us: Option<i64>,
}

impl Db {
    /// Every passing (of one session, or all), in order, one at a time to `each`: an export of a
    /// season's database is not held in memory.
    pub fn export_passings(
        &self,
        session: Option<i64>,
        mut each: impl FnMut(ExportedPassing) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT p.session_id, s.alias, p.num_passing, p.bib, p.chip, p.timestamp, {PASSING_STATE}, p.error,
                coalesce(p.delivered_at, CASE WHEN {DELIVERED_BY_WATERMARK} THEN
                    (SELECT d.at FROM deliveries d WHERE d.session_id = p.session_id AND d.last >= p.num_passing ORDER BY d.last LIMIT 1)
                END),
                p.resent_from
             FROM passings p JOIN sessions s ON s.id = p.session_id
             WHERE ?1 IS NULL OR p.session_id = ?1 ORDER BY p.session_id, p.num_passing"
        ))?;
        let mut rows = stmt.query(params![session])?;
        while let Some(r) = rows.next()? {
            each(ExportedPassing {
                session_id: r.get(0)?,
                alias: r.get(1)?,
                num_passing: r.get(2)?,
                bib: r.get(3)?,
                chip: r.get(4)?,
                timestamp_us: r.get(5)?,
                state: r.get(6)?,
                error: r.get(7)?,
                delivered_at_us: r.get(8)?,
                resent_from: r.get(9)?,
            })?;
        }
        Ok(())
    }

    /// Every raw read (of one session, or all), in arrival order, one at a time to `each`.
    pub fn export_reads(
        &self,
        session: Option<i64>,
        mut each: impl FnMut(ExportedRead) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut stmt = self.conn.prepare(
            "SELECT received_at, chip, antenna, rssi, reader_time, session_id, clock_synced, raw FROM reads
             WHERE ?1 IS NULL OR session_id = ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query(params![session])?;
        while let Some(r) = rows.next()? {
            each(ExportedRead {
                received_at_us: r.get(0)?,
                chip: r.get(1)?,
                antenna: r.get(2)?,
                rssi: r.get(3)?,
                reader_time_us: r.get(4)?,
                session_id: r.get(5)?,
                clock_synced: r.get(6)?,
                raw: r.get(7)?,
            })?;
        }
        Ok(())
    }

    /// The session's read of this id, as (arrival time, chip): how the backup recognises its own
    /// last row on a stick.
    pub fn read_of_session(&self, id: i64, session_id: i64) -> rusqlite::Result<Option<(i64, String)>> {
        self.conn
            .prepare_cached("SELECT received_at, chip FROM reads WHERE id = ?1 AND session_id = ?2")?
            .query_row(params![id, session_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    }

    /// The session's raw reads after read id `after`, by id: a range, not a scan of the table.
    pub fn reads_after(&self, session_id: i64, after: i64, limit: i64) -> rusqlite::Result<Vec<BackedUpRead>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, received_at, chip, antenna, rssi, reader_time FROM reads
             WHERE id > ?1 AND session_id = ?2 ORDER BY id LIMIT ?3",
        )?;
        stmt.query_map(params![after, session_id, limit], |r| {
            Ok(BackedUpRead {
                id: r.get(0)?,
                received_at_us: r.get(1)?,
                chip: r.get(2)?,
                antenna: r.get(3)?,
                rssi: r.get(4)?,
                reader_time_us: r.get(5)?,
            })
        })?
        .collect()
    }
}
