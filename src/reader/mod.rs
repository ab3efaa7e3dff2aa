//! The reader actor: a dedicated thread that opens the port (reopening it with backoff when it is
//! missing or fails), frames and parses records, stamps them, and hands reads to the store.
//!
//! **A reader's bytes are untrusted input; the gateway's own host clock (when synchronised) is
//! the reference; a live read is never dropped.** Nothing here panics on what a reader sends:
//! every number and time from the wire goes through checked constructors, and a time out of
//! range is a rejected record (`bad_time`), counted. A reader time further than
//! `reader.max_skew` from the synchronised host clock is not believed: the read keeps the host's
//! time (`retimed`, counted, a problem line while it lasts) and moves no rewind start point. A
//! read is "replayed" only while a rewind the gateway asked for runs, and only inside what was
//! asked ([`talk`]); flagged or stored reads outside it are not taken, and counted.

mod connection;
pub mod elite;
pub mod format;
pub mod record;
mod stats;
pub mod talk;
pub mod transport;

use std::sync::Arc;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::antennas::Change;
use crate::clock::{ClockWatch, Stamp};
use crate::config::{Config, ReaderConfig, TimestampSource};
#[cfg(test)]
pub use connection::Stamping;
use connection::{Connection, Pump};
use format::{Framer, Parser};
use record::{Framed, Parsed, ParsedRead, Reject};
use transport::{Port, Received};

pub use stats::{ReaderStats, ReaderStatus};

/// Reopen delays: quick at first, capped at one `open` a second, so a replugged cable is read
/// again within about a second of its return.
const REOPEN_DELAYS: [Duration; 3] = [Duration::from_millis(250), Duration::from_millis(500), Duration::from_secs(1)];
/// The reader thread's promise to the watchdog: back within this, whatever the reader does (a
/// read waits at most 500 ms, a write 2 s, an open 3 s, a reopen delay 1 s).
const LIVENESS: Duration = Duration::from_secs(10);
/// One report of one tag, as the store receives it.
#[derive(Debug, Clone)]
pub struct Read {
    pub host: Stamp,
    pub clock_synced: bool,
    pub chip: String,
    pub antenna: Option<i64>,
    pub rssi: Option<i64>,
    pub reader_time_us: Option<i64>,
    pub bib: Option<String>,
    /// See `ParsedRead::replay_key`.
    pub replay_key: Option<String>,
    pub raw: Vec<u8>,
    /// The time the passing will carry: the reader's when configured and known, else the host's.
    pub timestamp_us: i64,
    /// `timestamp_us` came from the host clock (so it is only as good as that clock).
    pub host_stamped: bool,
    /// A read replayed at the gateway's request (a rewind), made at this time on the host's clock
    /// (its reader time less the reader clock's offset): the session whose open interval holds
    /// it is the one it belongs to. `None`: a live read, which belongs to the session open now.
    pub replayed_at_us: Option<i64>,
}

pub struct Reader {
    cfg: ReaderConfig,
    parser: Parser,
    clock: ClockWatch,
    out: crossbeam_channel::Sender<Box<Read>>,
    stats: Arc<ReaderStats>,
    /// The port a previous process kept open in systemd's descriptor store, to be taken back.
    kept: Option<std::os::fd::OwnedFd>,
    /// What the store holds from this reader: where a rewind begins.
    recall: talk::Recall,
}

impl Reader {
    /// What to send the reader, and how often, for formats that must be polled.
    fn poll_command(&self) -> Option<(Vec<u8>, Duration)> {
        match self.cfg.format {
            crate::config::Format::Chafon if !self.cfg.poll_interval.is_zero() => {
                Some((format::chafon::INVENTORY_COMMAND.to_vec(), self.cfg.poll_interval))
            }
            _ => None,
        }
    }

    pub fn new(cfg: &Config, out: crossbeam_channel::Sender<Box<Read>>, stats: Arc<ReaderStats>) -> anyhow::Result<Self> {
        if let Ok(mut a) = stats.antennas.lock() {
            *a = Some(crate::antennas::Antennas::new(
                &cfg.reader.antennas,
                cfg.reader.antenna_silence,
                crate::clock::monotonic_us(),
            ));
        }
        Ok(Self {
            parser: Parser::from_config(&cfg.reader, cfg.passings.chip_encoding)?,
            cfg: cfg.reader.clone(),
            clock: ClockWatch::new(&cfg.clock),
            out,
            stats,
            kept: None,
            recall: talk::Recall::default(),
        })
    }

    /// What the store already holds from the reader (see [`talk::Recall`]).
    pub fn with_recall(mut self, recall: talk::Recall) -> Self {
        self.recall = recall;
        self
    }

    /// Start from the port a previous process kept open (see [`crate::fdstore`]).
    pub fn with_kept_port(mut self, fd: Option<std::os::fd::OwnedFd>) -> Self {
        self.kept = fd;
        self
    }

    /// The kept port if it is still the configured one, else a freshly opened port (then kept
    /// in the store for the next process).
    fn open_port(&self, kept: Option<std::os::fd::OwnedFd>) -> std::io::Result<Port> {
        let port_name = self.cfg.port.as_deref().unwrap_or_default();
        if let Some(fd) = kept {
            match Port::adopt(fd, &self.cfg) {
                Ok(port) => {
                    info!(port = %port_name, "reader port taken back from systemd, open all along: what the reader sent meanwhile is read now");
                    return Ok(port);
                }
                Err((fd, why)) => {
                    info!(port = %port_name, reason = %why, "the port kept by systemd is not the configured one; opening the configured port");
                    crate::fdstore::forget(crate::fdstore::READER);
                    release(fd);
                }
            }
        }
        let port = Port::open(&self.cfg)?;
        crate::fdstore::keep(crate::fdstore::READER, port.as_fd());
        Ok(port)
    }

    /// Blocking: run on a dedicated thread. Returns when cancelled or when the store is gone.
    pub fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let _span = tracing::info_span!("reader").entered();
        let port_name = self.cfg.port.clone().unwrap_or_default();
        let mut kept = self.kept.take();
        let mut session = Connection::new(&self);
        let mut attempt = 0usize;
        let mut last_open_error: Option<(String, Instant)> = None;
        while !cancel.is_cancelled() {
            self.stats.live.beat(LIVENESS);
            match self.open_port(kept.take()) {
                Ok(mut port) => {
                    attempt = 0;
                    last_open_error = None;
                    self.stats.connected.store(true, Ordering::Relaxed);
                    self.stats.set_error(None);
                    info!(port = %port_name, "reader connected");
                    let outcome = session.serve(&mut port, &cancel);
                    self.stats.connected.store(false, Ordering::Relaxed);
                    match outcome {
                        // The port stays in systemd's store: the next process reads on.
                        Pump::Cancelled => break,
                        Pump::StoreGone => return Ok(()),
                        Pump::Lost(e) => {
                            crate::fdstore::forget(crate::fdstore::READER);
                            warn!(port = %port_name, error = %e, "reader disconnected; reopening");
                            self.stats.set_error(Some(format!("disconnected: {e}")));
                        }
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    // One line when the failure starts or changes, then one a minute.
                    let repeat = matches!(&last_open_error, Some((prev, at)) if *prev == text && at.elapsed() < Duration::from_secs(60));
                    if !repeat {
                        warn!(port = %port_name, error = %text, "cannot open reader port; retrying");
                        last_open_error = Some((text.clone(), Instant::now()));
                    }
                    self.stats.set_error(Some(format!("cannot open: {text}")));
                }
            }
            let delay = REOPEN_DELAYS[attempt.min(REOPEN_DELAYS.len() - 1)];
            attempt += 1;
            if wait_cancelled(&cancel, delay) {
                break;
            }
        }
        Ok(())
    }
}

/// Let go of a kept port that is not ours to use: lift its exclusive claims first, so opening
/// the configured device is not refused while systemd still closes its copy.
fn release(fd: std::os::fd::OwnedFd) {
    // On a descriptor that is not a tty, TIOCNXCL fails harmlessly.
    let _ = rustix::termios::ioctl_tiocnxcl(&fd);
    let _ = rustix::fs::flock(&fd, rustix::fs::FlockOperation::Unlock);
}

/// Sleep up to `delay`, waking early on cancellation. Returns true when cancelled.
fn wait_cancelled(cancel: &CancellationToken, delay: Duration) -> bool {
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if cancel.is_cancelled() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())));
    }
    cancel.is_cancelled()
}
