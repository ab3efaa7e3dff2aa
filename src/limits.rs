//! Bounds shared by everything that listens (dashboard, live feed, control socket): a cap on
//! connections that refuses and counts the excess, an accept loop that pauses after an error
//! instead of spinning, a line reader that never buffers more than it was told, and a warning that
//! is written at most once a minute however often its cause repeats.
//!
//! Whatever a client does, the pipeline (reader → store → uplink) must not notice: these bounds
//! keep memory, descriptors, threads, CPU and the journal out of a client's reach.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::status::Listening;

/// Connections the dashboard serves at once (a browser opens up to six; a tent has a few).
pub const HTTP_CONNECTIONS: usize = 64;
/// Live-feed clients at once (timing software, a scoreboard, a commentator's laptop …).
pub const FEED_CONNECTIONS: usize = 64;
/// Control-socket clients at once (the CLI: one request each).
pub const CONTROL_CONNECTIONS: usize = 16;
/// `watch` clients at once, inside the control socket's cap: watchers that never read hold their
/// slots, and `status` and `session close` must still get in.
pub const WATCHERS: usize = 4;

/// How often a repeated warning may reach the journal: journald's own rate limit would otherwise
/// drop the warnings that matter along with the flood.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// At most `max` connections at once; one beyond is refused (closed at once) and counted in
/// `status.listening.refused`.
#[derive(Clone)]
pub struct ConnectionCap {
    what: &'static str,
    slots: Arc<Semaphore>,
    max: usize,
    listening: Arc<Mutex<Listening>>,
    warn: Arc<Throttle>,
}

impl ConnectionCap {
    pub fn new(what: &'static str, max: usize, listening: Arc<Mutex<Listening>>) -> Self {
        Self { what, slots: Arc::new(Semaphore::new(max)), max, listening, warn: Arc::new(Throttle::new(LOG_EVERY)) }
    }

    /// A slot for one more connection, held for as long as it is served; `None` (counted and
    /// logged, at most once a minute) when all are taken.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                if let Ok(mut l) = self.listening.lock() {
                    *l.refused.entry(self.what.to_string()).or_default() += 1;
                }
                if let Some(count) = self.warn.hit() {
                    warn!(
                        listener = self.what,
                        max = self.max,
                        refused = count,
                        "connection refused: too many clients"
                    );
                }
                None
            }
        }
    }

    /// Connections being served now.
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// An accept loop's pause after an error: out of descriptors (`EMFILE`), out of memory, a reset
/// before accept. Retrying at once would spin a core and flood the journal; the pause doubles
/// from 10 ms to 1 s and resets after a success.
pub struct AcceptPause {
    what: &'static str,
    delay: Duration,
    warn: Throttle,
}

impl AcceptPause {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new(what: &'static str) -> Self {
        Self { what, delay: Self::FIRST, warn: Throttle::new(LOG_EVERY) }
    }

    pub fn accepted(&mut self) {
        self.delay = Self::FIRST;
    }

    /// Log (throttled) and wait before the next accept.
    pub async fn failed(&mut self, error: &io::Error) {
        if let Some(count) = self.warn.hit() {
            warn!(listener = self.what, error = %error, failures = count, "accept failed; pausing before the next");
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MAX);
    }
}

/// "Something happened again": says when to log, and how many times it happened since the last
/// log line (the first time logs at once).
pub struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self { every, state: Mutex::new((None, 0)) }
    }

    /// Count one occurrence; `Some(n)` when it is time to log (n occurrences since the last log).
    pub fn hit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        let due = state.0.is_none_or(|last| last.elapsed() >= self.every);
        if due {
            let count = state.1;
            *state = (Some(Instant::now()), 0);
            Some(count)
        } else {
            None
        }
    }
}

/// Why a bounded line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One line (without its `\n`, or what came before the end of the stream) of at most `max` bytes.
/// Never buffers more than `max + 1` bytes, however long the line the peer sends. `Ok(None)` at
/// the end of the stream with nothing read.
pub async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, max: usize) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    reader.take(max as u64 + 1).read_until(b'\n', &mut line).await?;
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(line));
    }
    if line.len() > max {
        return Err(LineError::TooLong(max));
    }
    Ok(if line.is_empty() { None } else { Some(line) })
}

/// A counter that is only ever read for status.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut input: &[u8] = b"12\nabcdef\nxyz";
        assert_eq!(read_line(&mut input, 4).await.unwrap(), Some(b"12".to_vec()));
        assert!(matches!(read_line(&mut input, 4).await, Err(LineError::TooLong(4))));
        // A line of exactly `max` bytes and its newline fits.
        let mut input: &[u8] = b"abcd\n";
        assert_eq!(read_line(&mut input, 4).await.unwrap(), Some(b"abcd".to_vec()));
        assert_eq!(read_line(&mut input, 4).await.unwrap(), None);
        let mut input: &[u8] = b"xyz";
        assert_eq!(read_line(&mut input, 4).await.unwrap(), Some(b"xyz".to_vec()));
    }

    #[test]
    fn the_throttle_logs_the_first_and_then_counts() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.hit(), Some(1));
        for _ in 0..999 {
            assert_eq!(t.hit(), None);
        }
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.hit(), Some(1));
        assert_eq!(t.hit(), Some(1));
    }

    #[test]
    fn the_cap_refuses_and_counts() {
        let listening = Arc::new(Mutex::new(Listening::default()));
        let cap = ConnectionCap::new("feed", 2, listening.clone());
        let a = cap.admit().expect("first");
        let _b = cap.admit().expect("second");
        assert!(cap.admit().is_none());
        assert!(cap.admit().is_none());
        assert_eq!(listening.lock().unwrap().refused["feed"], 2);
        assert_eq!(cap.in_use(), 2);
        drop(a);
        assert!(cap.admit().is_some(), "a slot frees when its connection ends");
    }
}
