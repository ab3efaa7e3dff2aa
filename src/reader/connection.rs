//! One connection's pump: bytes from the port, framed, parsed (guarded: a panic in one record's
//! parsing rejects that record), admitted by the conversation ([`super::talk`]), stamped
//! ([`Stamping`]) and handed to the store; commands from the conversation written back.

use super::*;

/// At most one rejected-record warning per this interval (a wrong baud rate rejects everything).
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// At a stop, how long the rest of a half-read record is waited for (a 40-byte line takes 42 ms
/// at 9600 baud; a reader that went silent mid-record costs the stop this much).
const FINISH_RECORD: Duration = Duration::from_secs(1);
/// How often the reader re-checks whether the system clock is synchronised.
const CLOCK_RECHECK: Duration = Duration::from_secs(1);
/// How often antennas are checked for silence.
const ANTENNA_CHECK: Duration = Duration::from_secs(1);
/// Records from an Elite's replay port handled per turn of the loop, so a replay that floods
/// leaves room for live reads and for a stop.
const REPLAY_BATCH: usize = 256;

pub(super) enum Pump {
    Cancelled,
    StoreGone,
    Lost(std::io::Error),
}

/// The reader thread's working state: one connection's pump ([`Connection::pump`]), and what
/// carries from one connection to the next (the framer, the clock cache, reject logging, the
/// conversation with the reader).
pub(super) struct Connection<'a> {
    reader: &'a Reader,
    framer: Framer<Stamp>,
    synced: bool,
    synced_checked: Option<Instant>,
    rejects_since_log: u64,
    last_reject_log: Option<Instant>,
    talk: talk::Talk,
    /// The records being handled came from an Elite's replay port.
    replaying: bool,
}

impl<'a> Connection<'a> {
    pub(super) fn new(reader: &'a Reader) -> Self {
        Self {
            reader,
            framer: Framer::for_format(reader.cfg.format),
            synced: false,
            synced_checked: None,
            rejects_since_log: 0,
            last_reject_log: None,
            talk: talk::Talk::new(&reader.cfg, reader.recall.clone(), reader.stats.talk.clone()),
            replaying: false,
        }
    }

    /// One connection, from its opening to its end.
    pub(super) fn serve(&mut self, port: &mut Port, cancel: &CancellationToken) -> Pump {
        let synced = self.clock_synced();
        self.talk.connected(Stamp::now(), synced);
        let outcome = self.pump(port, cancel);
        self.talk.disconnected(Stamp::now());
        self.framer.reset();
        outcome
    }

    fn pump(&mut self, port: &mut Port, cancel: &CancellationToken) -> Pump {
        let mut buf = vec![0u8; 8192];
        let mut frames = Vec::new();
        let poll = self.reader.poll_command();
        let mut next_poll = Instant::now();
        let mut next_antenna_check = Instant::now();
        let mut stopping: Option<Instant> = None;
        let usual_timeout = transport::read_timeout(&self.reader.cfg);
        // An IPICO Elite's control and replay ports, for this connection.
        let elite =
            self.reader.cfg.elite_control.as_deref().map(|c| elite::Elite::start(c, self.reader.cfg.elite_replay_port));
        let mut timeout = usual_timeout;
        loop {
            self.reader.stats.live.beat(LIVENESS);
            if cancel.is_cancelled() {
                // A record whose first bytes were read is finished first: stopping now would
                // split it between this process and the next (a restart keeps the port open),
                // and neither half would be a read.
                let since = *stopping.get_or_insert_with(|| {
                    if !self.framer.between_records() {
                        debug!("finishing the record in flight before stopping");
                    }
                    Instant::now()
                });
                if self.framer.between_records() || since.elapsed() >= FINISH_RECORD {
                    return Pump::Cancelled;
                }
            }
            if let Some((command, every)) = &poll
                && stopping.is_none()
                && Instant::now() >= next_poll
            {
                if let Err(e) = port.send(command) {
                    return Pump::Lost(e);
                }
                next_poll = Instant::now() + *every;
            }
            if stopping.is_none() {
                let synced = self.clock_synced();
                for command in self.talk.poll(Stamp::now(), synced) {
                    if let Err(e) = port.send(&command) {
                        return Pump::Lost(e);
                    }
                }
                let mut more_replayed = false;
                if let Some(elite) = &elite {
                    for request in self.talk.take_elite() {
                        elite.send(request);
                    }
                    match self.elite_events(elite) {
                        Some(more) => more_replayed = more,
                        None => return Pump::StoreGone,
                    }
                }
                // Wake in time for the next command (an aligned clock set is due to the ms), and
                // at once while a replay has more waiting.
                let wanted = match self.talk.next_due() {
                    _ if more_replayed => Duration::from_millis(1),
                    Some(due) => {
                        let wait = due - crate::clock::monotonic_us();
                        usual_timeout.min(Duration::from_micros(wait.max(1000) as u64))
                    }
                    None => usual_timeout,
                };
                if wanted != timeout {
                    if let Err(e) = port.set_timeout(wanted) {
                        return Pump::Lost(e);
                    }
                    timeout = wanted;
                }
            }
            if Instant::now() >= next_antenna_check {
                self.check_antennas();
                next_antenna_check = Instant::now() + ANTENNA_CHECK;
            }
            match port.receive(&mut buf) {
                Ok(Received::Idle) => {}
                Ok(Received::Data(n)) => {
                    let stamp = Stamp::now();
                    self.framer.push(&buf[..n], stamp, &mut frames);
                    for frame in frames.drain(..) {
                        if !self.handle(frame) {
                            return Pump::StoreGone;
                        }
                    }
                }
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        let rest = port.salvage(&mut buf);
                        if !rest.is_empty() {
                            self.framer.push(&rest, Stamp::now(), &mut frames);
                            for frame in frames.drain(..) {
                                if !self.handle(frame) {
                                    return Pump::StoreGone;
                                }
                            }
                        }
                    }
                    return Pump::Lost(e);
                }
            }
        }
    }

    /// What an Elite's control and replay ports brought, a batch at most: whether more may be
    /// waiting (`None`: the store has gone away).
    fn elite_events(&mut self, elite: &elite::Elite) -> Option<bool> {
        let mut taken = 0;
        for event in elite.events().take(REPLAY_BATCH) {
            taken += 1;
            match event {
                elite::Event::Line(line, at) => self.talk.elite_line(&line, at),
                elite::Event::Replayed(framed) => {
                    self.replaying = true;
                    let alive = self.handle(framed);
                    self.replaying = false;
                    if !alive {
                        return None;
                    }
                }
                elite::Event::ReplayEnd(error) => self.talk.replay_end(error, Stamp::now()),
                elite::Event::Error(e) => {
                    warn!(error = %e, "IPICO Elite control port");
                    self.reader.stats.talk.clock.lock().map(|mut c| c.clock_error = Some(e)).ok();
                }
            }
        }
        Some(taken == REPLAY_BATCH)
    }

    /// Returns false when the store has gone away.
    fn handle(&mut self, frame: Framed<Stamp>) -> bool {
        let (bytes, stamp) = match frame {
            Framed::Record { bytes, stamp } => (bytes, stamp),
            Framed::Rejected { reason, bytes, .. } => {
                self.reject(reason, &bytes);
                return true;
            }
        };
        match self.talk.reply(&bytes, stamp) {
            Ok(true) => return true,
            Ok(false) => {}
            Err(reason) => {
                self.reject(reason, &bytes);
                return true;
            }
        }
        let today = chrono::DateTime::from_timestamp_micros(stamp.utc_us).unwrap_or_else(Utc::now).date_naive();
        let Some(parsed) = parse_guarded(&self.reader.parser, &bytes, today) else {
            self.reject(Reject::BadField, &bytes);
            return true;
        };
        match parsed {
            Parsed::Skip => true,
            Parsed::Reject(reason) => {
                self.reject(reason, &bytes);
                true
            }
            Parsed::Read(p) => self.emit(p, stamp, bytes),
            Parsed::Reads(reads) => reads.into_iter().all(|p| self.emit(p, stamp, bytes.clone())),
        }
    }

    /// Hand one parsed read to the store. Returns false when the store has gone away.
    fn emit(&mut self, p: ParsedRead, stamp: Stamp, bytes: Vec<u8>) -> bool {
        let reader_time_us = p.reader_time.and_then(crate::timestamp::reader_us);
        let synced = self.clock_synced();
        let admit = self.talk.admit(reader_time_us, &bytes, stamp, synced, self.replaying);
        if admit == talk::Admit::Retimed {
            let stats = &self.reader.stats;
            if stats.retimed.fetch_add(1, Ordering::Relaxed) == 0
                || stats.last_retimed_at.load(Ordering::Relaxed) < stamp.utc_us - 60_000_000
            {
                warn!(
                    reader_time = %reader_time_us.map(crate::clock::rfc3339).unwrap_or_default(),
                    "READER TIME NOT BELIEVED: further than reader.max_skew from the host clock; the read keeps the host's time"
                );
            }
            stats.last_retimed_at.store(stamp.utc_us, Ordering::Relaxed);
        }
        let how = Stamping { source: self.reader.cfg.timestamps, at: stamp, synced, offset_us: self.talk.offset_us() };
        let Some(read) = how.read(p, admit, bytes) else { return true };
        let stats = &self.reader.stats;
        stats.reads_total.fetch_add(1, Ordering::Relaxed);
        stats.last_read_at.store(stamp.utc_us, Ordering::Relaxed);
        if let Some(antenna) = read.antenna
            && let Ok(mut antennas) = stats.antennas.lock()
            && let Some(Change::Reading { antenna }) =
                antennas.as_mut().and_then(|a| a.read(antenna, stamp.monotonic_us, stamp.utc_us))
        {
            info!(antenna, "antenna reads again");
        }
        self.reader.out.send(Box::new(read)).is_ok()
    }

    /// Antennas gone quiet while the others read: said once, and again when they read.
    fn check_antennas(&self) {
        let changes = match self.reader.stats.antennas.lock() {
            Ok(mut a) => a.as_mut().map(|a| a.check(crate::clock::monotonic_us())).unwrap_or_default(),
            Err(_) => return,
        };
        for change in changes {
            if let Change::Silent { antenna, for_s } = change {
                warn!(
                    antenna,
                    silent_s = for_s,
                    "ANTENNA SILENT while the others read (reader.antenna_silence): check its cable and mat"
                );
            }
        }
    }

    fn clock_synced(&mut self) -> bool {
        if self.synced_checked.is_none_or(|at| at.elapsed() >= CLOCK_RECHECK) {
            self.synced = self.reader.clock.synchronized();
            self.synced_checked = Some(Instant::now());
        }
        self.synced
    }

    fn reject(&mut self, reason: Reject, bytes: &[u8]) {
        self.reader.stats.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.rejects_since_log += 1;
        if self.last_reject_log.is_none_or(|at| at.elapsed() >= REJECT_LOG_INTERVAL) {
            let sample: String = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).escape_debug().collect();
            warn!(reason = reason.as_str(), count = self.rejects_since_log, sample = %sample, "rejected reader records");
            self.rejects_since_log = 0;
            self.last_reject_log = Some(Instant::now());
        }
    }
}

/// How a parsed read is stamped, once [`talk::Talk::admit`] has said what it is.
#[derive(Debug, Clone, Copy)]
pub struct Stamping {
    pub source: TimestampSource,
    /// When it arrived.
    pub at: Stamp,
    /// The host clock was synchronised then.
    pub synced: bool,
    /// The reader clock's measured offset (reader − host, µs; 0 unmeasured).
    pub offset_us: i64,
}

impl Stamping {
    /// The read to store; `None` when it is not taken.
    pub fn read(&self, p: ParsedRead, admit: talk::Admit, raw: Vec<u8>) -> Option<Read> {
        let reader_time_us = p.reader_time.and_then(crate::timestamp::reader_us);
        let (timestamp_us, host_stamped, replayed_at_us) = match (admit, self.source, reader_time_us) {
            (talk::Admit::Drop, ..) => return None,
            // Made while we were away: its arrival says nothing of when. The reader's own time,
            // less its clock's measured offset from ours, does.
            (talk::Admit::Replayed(t), source, _) => {
                let made = t.saturating_sub(self.offset_us);
                (if source == TimestampSource::Reader { t } else { made }, false, Some(made))
            }
            (talk::Admit::Live, TimestampSource::Reader, Some(t)) => (t, false, None),
            (talk::Admit::Live | talk::Admit::Retimed, ..) => (self.at.utc_us, true, None),
        };
        Some(Read {
            host: self.at,
            clock_synced: self.synced,
            chip: p.chip,
            antenna: p.antenna,
            rssi: p.rssi,
            reader_time_us,
            bib: p.bib,
            replay_key: p.replay_key,
            raw,
            timestamp_us,
            host_stamped,
            replayed_at_us,
        })
    }
}

/// Parse one record, catching a panic. The parsers are pure functions of the record, and every
/// number in them goes through checked arithmetic (the fuzz targets feed them extreme fields),
/// but a panic left in one must not cost the reads already parsed: with the process aborting,
/// those handed to the store and not yet committed would be lost, and the reader would restart
/// into the same record. So the reader thread unwinds here, and only here (the panic hook in
/// [`crate::panics`] aborts on any other panic, where state may be half-changed): the record is
/// counted as rejected and the connection goes on. Nothing but the parser runs inside, and it
/// holds no state, so nothing is left half-done.
fn parse_guarded(parser: &Parser, bytes: &[u8], today: chrono::NaiveDate) -> Option<Parsed> {
    crate::panics::caught(|| parser.parse(bytes, today))
}
