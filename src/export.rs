//! `export`: passings or raw reads as CSV, straight from the database (daemon running or not).
//!
//! Every text cell goes through [`crate::csv_cell::cell`] (formulas neutralised).

use std::io::Write;

use crate::clock::rfc3339;
use crate::csv_cell::cell;
use crate::store::query::Db;

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
    let mut n = 0;
    db.export_passings(session, |p| {
        let (date, time) = crate::backup::local_date_time(p.timestamp_us);
        csv.write_record([
            p.session_id.to_string(),
            cell(&p.alias).into_owned(),
            p.num_passing.to_string(),
            cell(&p.bib).into_owned(),
            cell(&p.chip).into_owned(),
            crate::clock::api_timestamp(p.timestamp_us),
            p.state,
            cell(&p.error.unwrap_or_default()).into_owned(),
            p.delivered_at_us.map(rfc3339).unwrap_or_default(),
            p.resent_from.unwrap_or_default(),
            date,
            time,
        ])?;
        n += 1;
        Ok(())
    })?;
    csv.flush()?;
    Ok(n)
}

pub fn reads(db: &Db, session: Option<i64>, out: impl Write) -> anyhow::Result<u64> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(["received_at", "chip", "antenna", "rssi", "reader_time", "session_id", "clock_synced", "raw"])?;
    let mut n = 0;
    let opt = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_default();
    db.export_reads(session, |r| {
        csv.write_record([
            rfc3339(r.received_at_us),
            cell(&r.chip).into_owned(),
            opt(r.antenna),
            opt(r.rssi),
            r.reader_time_us.map(rfc3339).unwrap_or_default(),
            opt(r.session_id),
            r.clock_synced.to_string(),
            cell(&raw_text(&r.raw)).into_owned(),
        ])?;
        n += 1;
        Ok(())
    })?;
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
