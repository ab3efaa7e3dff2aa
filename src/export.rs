//! `export`: passings or raw reads as CSV, straight from the database (daemon running or not).
//!
//! Every text cell goes through [`crate::csv_cell::cell`] (formulas neutralised).

use std::io::Write;

use rusqlite::params;

use crate::clock::rfc3339;
use crate::csv_cell::cell;
use crate::store::query::{Db, PASSING_STATE};

pub fn passings(db: &Db, session: Option<i64>, out: impl Write) -> anyhow::Result<u64> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record([
        "session_id",
        "alias",
        "num_passing",
        "bib",
        "chip",
        "timestamp",
        "state",
        "error",
        "delivered_at",
        "resent_from",
        // The box's local date and time, as RUFUS Race Manager's backup import splits them.
        "date",
        "time",
    ])?;
    let mut stmt = db.connection().prepare(&format!(
        // A passing delivered by the watermark has its time in the delivery range that holds it.
        "SELECT p.session_id, s.alias, p.num_passing, p.bib, p.chip, p.timestamp, {PASSING_STATE}, p.error,
            coalesce(p.delivered_at, CASE WHEN p.state = 'pending' AND p.num_passing <= s.delivered_through THEN
                (SELECT d.at FROM deliveries d WHERE d.session_id = p.session_id AND d.last >= p.num_passing ORDER BY d.last LIMIT 1)
            END),
            p.resent_from
         FROM passings p JOIN sessions s ON s.id = p.session_id
         WHERE ?1 IS NULL OR p.session_id = ?1 ORDER BY p.session_id, p.num_passing"
    ))?;
    let mut rows = stmt.query(params![session])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let text = |i| -> rusqlite::Result<String> { Ok(cell(&r.get::<_, String>(i)?).into_owned()) };
        let (date, time) = crate::backup::local_date_time(r.get(5)?);
        csv.write_record([
            r.get::<_, i64>(0)?.to_string(),
            text(1)?,
            r.get::<_, i64>(2)?.to_string(),
            text(3)?,
            text(4)?,
            crate::clock::api_timestamp(r.get(5)?),
            r.get(6)?,
            cell(&r.get::<_, Option<String>>(7)?.unwrap_or_default()).into_owned(),
            r.get::<_, Option<i64>>(8)?.map(rfc3339).unwrap_or_default(),
            r.get::<_, Option<String>>(9)?.unwrap_or_default(),
            date,
            time,
        ])?;
        n += 1;
    }
    csv.flush()?;
    Ok(n)
}

pub fn reads(db: &Db, session: Option<i64>, out: impl Write) -> anyhow::Result<u64> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(["received_at", "chip", "antenna", "rssi", "reader_time", "session_id", "clock_synced", "raw"])?;
    let mut stmt = db.connection().prepare(
        "SELECT received_at, chip, antenna, rssi, reader_time, session_id, clock_synced, raw FROM reads
         WHERE ?1 IS NULL OR session_id = ?1 ORDER BY id",
    )?;
    let mut rows = stmt.query(params![session])?;
    let mut n = 0;
    let opt = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_default();
    while let Some(r) = rows.next()? {
        let raw: Vec<u8> = r.get(7)?;
        csv.write_record([
            rfc3339(r.get(0)?),
            cell(&r.get::<_, String>(1)?).into_owned(),
            opt(r.get(2)?),
            opt(r.get(3)?),
            r.get::<_, Option<i64>>(4)?.map(rfc3339).unwrap_or_default(),
            opt(r.get(5)?),
            r.get::<_, bool>(6)?.to_string(),
            cell(&raw_text(&raw)).into_owned(),
        ])?;
        n += 1;
    }
    csv.flush()?;
    Ok(n)
}

/// Text records as they are; binary frames (Chafon) as `hex:` and their bytes.
fn raw_text(raw: &[u8]) -> String {
    match std::str::from_utf8(raw) {
        Ok(text) if !text.chars().any(|c| c.is_control()) => text.to_string(),
        _ => format!("hex:{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}
