//! Upkeep while running: host-stamped passings corrected once the clock is synchronised, and
//! retention (delivered passings and their reads pruned in small steps).

use super::*;

impl Store {
    /// Once the clock is synchronised, host timestamps taken earlier in this boot are corrected
    /// with the monotonic clock: the true time of a read is its monotonic time plus the offset
    /// between the two clocks now.
    pub(super) fn correct_clock(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn prune(&mut self) -> anyhow::Result<()> {
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
            // Closed test sessions (chip checks): nothing was to be delivered; age counts from
            // the close.
            passings += tx.execute(
                "DELETE FROM passings WHERE id IN (SELECT p.id FROM sessions s CROSS JOIN passings p
                    WHERE s.remote_state = 'local' AND s.state = 'closed' AND s.closed_at < ?1
                    AND p.session_id = s.id LIMIT ?2)",
                params![cutoff, PRUNE_STEP],
            )?;
            // Reads of sessions finished remotely or closed tests (or of no session), not used by
            // a passing left.
            let reads = tx.execute(
                "DELETE FROM reads WHERE id IN (
                    SELECT r.id FROM reads r LEFT JOIN sessions s ON s.id = r.session_id
                    WHERE r.received_at < ?1 AND (r.session_id IS NULL OR s.remote_state = 'closed'
                        OR (s.remote_state = 'local' AND s.state = 'closed'))
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
}
