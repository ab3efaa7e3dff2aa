//! Writing reads and turning them into passings: the group commit, de-duplication windows, bib
//! mapping, `num_passing`, and the delivery record the uplink's answers move.

use super::*;

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

/// Emit every open strongest window into the session that is ending (inside its transaction).
pub(super) fn drain_windows(
    tx: &rusqlite::Transaction<'_>,
    open: &mut Option<OpenSession>,
    windows: &mut Windows,
) -> anyhow::Result<Vec<PassingEvent>> {
    let (Some(open), Windows::Strongest(w)) = (open.as_mut(), windows) else { return Ok(Vec::new()) };
    let mut passings = PassingWriter::new(tx)?;
    let mut events = Vec::new();
    for ended in w.drain() {
        events.push(passings.insert(open, &ended.best, ended.start_us)?);
    }
    tx.execute("DELETE FROM windows WHERE session_id = ?1", [open.id])?;
    tx.execute("UPDATE sessions SET next_num = ?1 WHERE id = ?2", params![open.next_num, open.id])?;
    Ok(events)
}

/// How far a replayed read's time may miss a session's open interval and still belong to it:
/// the time is the reader's less its clock's measured offset, and an offset measured to a clock
/// that shows whole seconds (Ultra, Elite) is known to about half a second.
const SESSION_EDGE_US: i64 = 1_000_000;

/// The session a replayed read made at `made` (host UTC µs) belongs to: the one whose open
/// interval holds it, else one that opened or closed within [`SESSION_EDGE_US`] of it.
fn session_at(tx: &rusqlite::Transaction<'_>, made: i64) -> rusqlite::Result<Option<i64>> {
    let mut stmt = tx.prepare_cached(
        "SELECT id FROM sessions WHERE created_at <= ?1 AND (closed_at IS NULL OR closed_at > ?1)
         ORDER BY id DESC LIMIT 1",
    )?;
    for at in [made, made.saturating_add(SESSION_EDGE_US), made.saturating_sub(SESSION_EDGE_US)] {
        if let Some(id) = stmt.query_row([at], |r| r.get(0)).optional()? {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// The start of a stored passing's window of `chip` in the session that holds `at`, if any.
fn stored_window(
    tx: &rusqlite::Transaction<'_>,
    session_id: i64,
    chip: &str,
    at: i64,
    window_us: i64,
) -> rusqlite::Result<Option<i64>> {
    if window_us <= 0 {
        return Ok(None);
    }
    tx.prepare_cached(
        "SELECT window_start FROM passings WHERE session_id = ?1 AND chip = ?2
         AND window_start > ?3 - ?4 AND window_start < ?3 + ?4 LIMIT 1",
    )?
    .query_row(params![session_id, chip, at, window_us], |r| r.get(0))
    .optional()
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

    /// Insert the session's next passing (numbered from `session.next_num`, which moves on).
    fn insert(
        &mut self,
        session: &mut OpenSession,
        c: &Candidate,
        window_start: i64,
    ) -> rusqlite::Result<PassingEvent> {
        let (session_id, num) = (session.id, &mut session.next_num);
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
            test: session.test,
        };
        *num += 1;
        Ok(event)
    }
}

/// Mirror the strongest windows of the touched chips into the `windows` table (crash safety).
pub(super) fn persist_windows(
    tx: &rusqlite::Transaction<'_>,
    session_id: i64,
    w: &Strongest,
    touched: &[String],
) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT OR REPLACE INTO windows (chip, session_id, start_us, opened_mono, best_read, best_rssi, bib) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
                win.best.rssi,
                win.best.bib
            ])?,
            None => delete.execute([chip])?,
        };
    }
    Ok(())
}

/// Move a session's watermark to `last` (see `Op::Delivered`); None if this database holds no
/// such session under that token.
pub(super) fn record_delivery(
    conn: &mut Connection,
    session_id: i64,
    token: &str,
    last: i64,
) -> anyhow::Result<Option<()>> {
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

pub(super) fn candidate(read_id: i64, read: &Read, bib: String) -> Candidate {
    Candidate {
        read_id,
        chip: read.chip.clone(),
        bib,
        timestamp_us: read.timestamp_us,
        rssi: read.rssi,
        unsynced: read.host_stamped && !read.clock_synced,
    }
}

/// A read as `watch` shows it (its passing number is filled in once it makes one).
fn watch_event(bibs: &HashMap<String, String>, read: &Read, session: Option<&OpenSession>) -> ReadEvent {
    ReadEvent {
        at_us: read.timestamp_us,
        chip: read.chip.clone(),
        bib: bibs.get(&read.chip).cloned().or_else(|| read.bib.clone()),
        antenna: read.antenna,
        rssi: read.rssi,
        passing: None,
        strongest: false,
        session_id: session.map(|s| s.id),
        test: session.is_some_and(|s| s.test),
    }
}

/// With `dedup_keep = "strongest"`, the passings that windows just ended with, announced to
/// `watch` as their best reads.
fn strongest_events(
    seen: &mut Vec<ReadEvent>,
    ended: &[PassingEvent],
    bibs: &HashMap<String, String>,
    strongest: bool,
) {
    if !strongest {
        return;
    }
    for p in ended {
        seen.push(ReadEvent {
            at_us: p.timestamp_us,
            chip: p.chip.clone(),
            bib: bibs.get(&p.chip).cloned(),
            antenna: None,
            rssi: None,
            passing: Some(p.num_passing),
            strongest: true,
            session_id: Some(p.session_id),
            test: p.test,
        });
    }
}

/// The bib of a read: the bib map, then a bib the reader sent, then the chip (or none: `unmapped = "skip"`).
pub(super) fn bib_for(bibs: &HashMap<String, String>, unmapped: Unmapped, read: &Read) -> Option<String> {
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

impl Store {
    /// Hold a delivery record for the next group commit, merged with the ones before it.
    pub(super) fn defer_delivery(
        &mut self,
        session_id: i64,
        token: String,
        first: i64,
        last: i64,
        reply: oneshot::Sender<Reply>,
    ) {
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
    pub(super) fn record_deferred(&mut self) {
        let Some(d) = self.deferred.take() else { return };
        let result =
            self.execute(Op::Delivered { session_id: d.session_id, token: d.token, first: d.first, last: d.last });
        for reply in d.replies {
            let _ = reply.send(result.clone());
        }
        self.notify.notify_one();
    }

    /// Commit the batch. On failure the reads stay in memory (bounded) for the next attempt.
    pub(super) fn flush(&mut self, batch: &mut Vec<Read>) -> bool {
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
        let mut watched = self.watched().then(Vec::new);
        let mut undo = match &self.windows {
            Windows::First(_) => Rollback::First(Vec::new()),
            Windows::Strongest(w) => Rollback::Strongest(Box::new(w.clone())),
        };
        match self.write_reads(batch, &mut undo, &mut events, watched.as_mut()) {
            Ok(next) => {
                if let (Some(open), Some(next_num)) = (self.open.as_mut(), next) {
                    open.next_num = next_num;
                }
                batch.clear();
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.buffered_reads.store(0, Ordering::Relaxed);
                self.set_error(None);
                self.publish(events);
                for e in watched.into_iter().flatten() {
                    let _ = self.live.reads.send(Arc::new(e));
                }
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

    /// One transaction: every read, and the passings they make. Returns the session's next number.
    /// With `watched`, each read is also described there, for `watch` (published after the commit).
    pub(super) fn write_reads(
        &mut self,
        batch: &[Read],
        undo: &mut Rollback,
        events: &mut Vec<PassingEvent>,
        mut watched: Option<&mut Vec<ReadEvent>>,
    ) -> anyhow::Result<Option<i64>> {
        let tx = db(&mut self.conn)?.transaction()?;
        // A copy: its number moves on here, and reaches `self.open` only once committed.
        let mut session = self.open;
        let mut touched: Vec<String> = Vec::new();
        {
            // Any stored read with the key, in any session: a rewind can span a session start,
            // and the morning's chip check is replayed with the rest of the memory.
            let mut seen = tx.prepare_cached("SELECT 1 FROM reads WHERE replay_key = ?1 LIMIT 1")?;
            let mut insert_read = tx.prepare_cached(
                "INSERT INTO reads (received_at, monotonic_us, boot, clock_synced, chip, antenna, rssi, reader_time, timestamp, raw, replay_key, session_id, replayed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?;
            let mut passings = PassingWriter::new(&tx)?;
            let window_us = self.dedup_window.as_micros() as i64;
            for read in batch {
                // A replayed read (download, rewind) already stored is a repeat.
                let repeat = match &read.replay_key {
                    Some(key) => seen.exists(params![key])?,
                    None => false,
                };
                // A live read belongs to the session open now; a replayed one to the session
                // whose open interval holds the time it was made (none: it makes no passing).
                let home = match read.replayed_at_us {
                    None => session.map(|s| s.id),
                    Some(made) => session_at(&tx, made)?,
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
                    if repeat { None } else { read.replay_key.as_deref() },
                    home,
                    read.replayed_at_us.is_some(),
                ])?;
                let read_id = tx.last_insert_rowid();
                let before = events.len();
                if let Some(seen) = watched.as_deref_mut() {
                    seen.push(watch_event(&self.bibs, read, session.as_ref()));
                }
                let Some(s) = session.as_mut() else { continue };
                if repeat {
                    continue;
                }
                if home != Some(s.id) {
                    // Replayed from a time no open session holds: kept as a read only.
                    self.stats.replayed_elsewhere.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Some(bib) = bib_for(&self.bibs, self.unmapped, read) else { continue };
                let (chip, at) = (read.chip.as_str(), read.timestamp_us);
                match (&mut self.windows, &mut *undo) {
                    (Windows::First(d), Rollback::First(undo)) => {
                        // Memory first (the hot path); a window it has forgotten is in the
                        // passings stored.
                        if window_us > 0
                            && !d.covers(chip, at, read.host.monotonic_us)
                            && let Some(start) = stored_window(&tx, s.id, chip, at, window_us)?
                        {
                            d.remember(chip, start, read.host.monotonic_us);
                            continue;
                        }
                        let (fresh, u) = d.accept(chip, at, read.host.monotonic_us);
                        undo.extend(u);
                        if fresh {
                            let c = candidate(read_id, read, bib);
                            events.push(passings.insert(s, &c, at)?);
                            if let (Some(seen), Some(p)) = (watched.as_deref_mut(), events.last())
                                && let Some(last) = seen.last_mut()
                            {
                                last.passing = Some(p.num_passing);
                            }
                        }
                    }
                    (Windows::Strongest(w), _) => {
                        if !w.covers(chip, at)
                            && let Some(start) = stored_window(&tx, s.id, chip, at, window_us)?
                        {
                            w.restore_closed(chip.to_string(), start, read.host.monotonic_us);
                            continue;
                        }
                        let c = candidate(read_id, read, bib);
                        if let Some(ended) = w.offer(c, read.host.monotonic_us) {
                            events.push(passings.insert(s, &ended.best, ended.start_us)?);
                        }
                        touched.push(read.chip.clone());
                    }
                    _ => unreachable!("rollback matches the mode"),
                }
                if let Some(seen) = watched.as_deref_mut() {
                    strongest_events(seen, &events[before..], &self.bibs, self.windows.keeps_strongest());
                }
            }
            if let (Some(s), Windows::Strongest(w)) = (session.as_mut(), &mut self.windows) {
                let before = events.len();
                for ended in w.due(clock::monotonic_us()) {
                    touched.push(ended.best.chip.clone());
                    events.push(passings.insert(s, &ended.best, ended.start_us)?);
                }
                if let Some(seen) = watched {
                    strongest_events(seen, &events[before..], &self.bibs, true);
                }
                persist_windows(&tx, s.id, w, &touched)?;
            }
        }
        if let Some(s) = session {
            tx.execute("UPDATE sessions SET next_num = ?1 WHERE id = ?2", params![s.next_num, s.id])?;
        }
        tx.commit()?;
        Ok(session.map(|s| s.next_num))
    }
}
