//! Session operations asked for by the control socket, the dashboard and the uplink: start,
//! close, resend, and what the API's answers change.

use super::*;

/// Close a session in `tx` (a session the API already closed, or a test session, has nothing left
/// to do remotely: it is closed at once).
pub(super) fn close_in(tx: &rusqlite::Transaction<'_>, id: i64, now: i64) -> rusqlite::Result<usize> {
    tx.execute(
        "UPDATE sessions SET state = CASE WHEN remote_state IN ('closed', 'closed_remotely', 'local') THEN 'closed' ELSE 'closing' END,
            closed_at = ?1 WHERE id = ?2 AND state = 'open'",
        params![now, id],
    )
}

/// What kind of session `start_session_with` opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    Race,
    /// A chip check: local, never sent.
    Test,
    /// A race session holding what remotely closed sessions could not deliver.
    Resend,
}

impl Store {
    pub(super) fn apply(&mut self, op: Op) -> Result<Option<i64>, Failed> {
        match op {
            Op::StartSession { alias, test } => self.start_session(&alias, test).map(Some),
            Op::Resend { alias } => self.start_session_with(&alias, Start::Resend).map(|(id, _)| Some(id)),
            Op::CloseSession => {
                let Some(open) = self.open else { return Err(Failed::Refused("no session is open".into())) };
                self.close_locally(open.id)?;
                if open.test {
                    info!(session_id = open.id, "test session closed");
                } else {
                    info!(
                        session_id = open.id,
                        "session closing: no more reads assigned; remote close after its queue drains"
                    );
                }
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
                self.bibs = Arc::new(bibs);
                if let Ok(mut shared) = self.live.bibs.write() {
                    *shared = self.bibs.clone();
                }
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

    /// Open a new session at once (offline or not); the open one, if any, starts closing. A test
    /// session (chip check) never replaces a race session: that is refused.
    pub(super) fn start_session(&mut self, alias: &str, test: bool) -> Result<i64, Failed> {
        self.start_session_with(alias, if test { Start::Test } else { Start::Race }).map(|(id, _)| id)
    }

    /// Open a new session; with `Start::Resend`, move into it (numbered afresh from 1) the
    /// passings that remotely closed sessions could not deliver. One transaction: all of it or none.
    pub(super) fn start_session_with(&mut self, alias: &str, kind: Start) -> Result<(i64, i64), Failed> {
        let test = kind == Start::Test;
        if let (true, Some(open)) = (test, self.open)
            && !open.test
        {
            return Err(Failed::Refused(format!(
                "race session #{} is open: a chip check would take its reads. Close it first with `rufus-gateway session close`",
                open.id
            )));
        }
        let now = clock::now_us();
        let tx = db(&mut self.conn)?.transaction()?;
        let events = drain_windows(&tx, &mut self.open, &mut self.windows)?;
        if let Some(open) = self.open {
            close_in(&tx, open.id, now)?;
        }
        tx.execute(
            "INSERT INTO sessions (alias, state, remote_state, created_at) VALUES (?1, 'open', ?2, ?3)",
            params![alias, if test { "local" } else { "pending" }, now],
        )?;
        let id = tx.last_insert_rowid();
        let mut next_num = 1;
        if kind == Start::Resend {
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
                return Err(Failed::Refused(
                    "nothing to resend: no remotely closed session has passings waiting (see `rufus-gateway session list`)"
                        .into(),
                ));
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
        match self.open {
            Some(open) if open.test => info!(session_id = open.id, "test session closed: a new session was started"),
            Some(open) => info!(session_id = open.id, "session closing: a new session was started"),
            None => {}
        }
        self.open = Some(OpenSession { id, next_num, test });
        self.windows.clear();
        if test {
            info!(session_id = id, alias, "test session started (chip check): nothing of it is sent to RUFUS");
        } else {
            info!(session_id = id, alias, "session started");
        }
        Ok((id, next_num - 1))
    }

    pub(super) fn close_locally(&mut self, id: i64) -> anyhow::Result<()> {
        let tx = db(&mut self.conn)?.transaction()?;
        let events = drain_windows(&tx, &mut self.open, &mut self.windows)?;
        close_in(&tx, id, clock::now_us())?;
        tx.commit()?;
        self.publish(events);
        self.open = None;
        self.windows.clear();
        Ok(())
    }
}
