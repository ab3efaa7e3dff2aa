//! `export`: passings or raw reads as CSV, straight from the database (daemon running or not).
//!
//! Every CSV the gateway writes (export, the live feed) goes through the `csv` writer, and every
//! text cell through [`cell`]: a chip, bib or alias that would start a spreadsheet formula is
//! neutralised as OWASP recommends for CSV injection.

use std::io::Write;

use rusqlite::params;

use crate::clock::rfc3339;
use crate::store::query::{Db, PASSING_STATE};

/// A text cell made safe to open in a spreadsheet: one that starts with `=`, `+`, `-` or `@`
/// (after blanks, tabs or carriage returns) gets a leading `'` (OWASP, "CSV Injection"), so Excel or LibreOffice show
/// it as text instead of evaluating it. Control characters (a line end in a bib-map cell) become
/// spaces, so that every record is one line for line-based readers; quoting is the writer's job.
pub fn cell(text: &str) -> std::borrow::Cow<'_, str> {
    let text: std::borrow::Cow<'_, str> = if text.chars().any(char::is_control) {
        text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().into()
    } else {
        text.into()
    };
    // Leading blanks (a tab or carriage return became one above) do not hide a formula.
    if text.trim_start().starts_with(['=', '+', '-', '@']) { format!("'{text}").into() } else { text }
}

/// One CSV record (cells neutralised by [`cell`]) with its `\n`.
pub fn csv_line(cells: &[&str]) -> String {
    let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    // Writing to a Vec cannot fail.
    let _ = w.write_record(cells.iter().map(|c| cell(c).into_owned()));
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_neutralised_and_commas_quoted() {
        assert_eq!(cell("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        for risky in ["+1", "-2+3", "@SUM(A1)", "\t=x", "\r=x", " =1"] {
            assert!(cell(risky).starts_with('\''), "{risky:?}");
        }
        assert_eq!(cell("208"), "208");
        assert_eq!(cell(""), "");
        assert_eq!(
            csv_line(&["1", "A,B", "=1+1", "2026-01-01T00:00:00.000Z"]),
            "1,\"A,B\",'=1+1,2026-01-01T00:00:00.000Z\n"
        );
        assert_eq!(cell(" 12"), " 12");
        assert_eq!(csv_line(&["2", "x\n999,FORGED"]), "2,\"x 999,FORGED\"\n", "one record, one line");
    }
}
