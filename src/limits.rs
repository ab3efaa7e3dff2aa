//! Bounds shared by everything that listens (dashboard, live feed, control socket): a cap on
//! connections that refuses and counts the excess, an accept loop that pauses after an error
//! instead of spinning, a line reader that never buffers more than it was told, and a warning that
//! is written at most once a minute however often its cause repeats.
//!
//! Whatever a client does, the pipeline (reader → store → uplink) must not notice: these bounds
//! keep memory, descriptors, threads, CPU and the journal out of a client's reach.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::status::{Listener, Listening};

/// Connections the dashboard serves at once (a browser opens up to six; a tent has a few).
pub const HTTP_CONNECTIONS: usize = 64;
/// Live-feed clients at once (timing software, a scoreboard, a commentator's laptop …).
pub const FEED_CONNECTIONS: usize = 64;
/// What one remote address may hold of the dashboard's and the feed's connections (a browser
/// opens six; a timing program one or two), and the slots kept for the box itself.
pub const HTTP_PER_HOST: usize = 16;
pub const FEED_PER_HOST: usize = 8;
pub const RESERVED_FOR_THIS_BOX: usize = 4;
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
    what: Listener,
    slots: Arc<Semaphore>,
    max: usize,
    listening: Arc<Mutex<Listening>>,
    warn: Arc<Throttle>,
    /// Connections per remote address (the box itself is not counted).
    hosts: Hosts,
    /// The most one remote address may hold, and the slots only the box itself may take.
    per_host: usize,
    reserved: usize,
}

/// Connections per remote address, shared by a cap and its slots.
type Hosts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection's hold on a cap: a slot, and its address's share, given back when it ends.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    host: Option<(IpAddr, Hosts)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((ip, hosts)) = &self.host
            && let Ok(mut hosts) = hosts.lock()
            && let Some(n) = hosts.get_mut(ip)
        {
            *n -= 1;
            if *n == 0 {
                hosts.remove(ip);
            }
        }
    }
}

/// The box itself: `localhost`. Other loopback addresses (127.0.0.2 …) count as hosts of their
/// own, as the tests use them.
fn is_this_box(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

impl ConnectionCap {
    pub fn new(what: Listener, max: usize, listening: Arc<Mutex<Listening>>) -> Self {
        Self {
            what,
            slots: Arc::new(Semaphore::new(max)),
            max,
            listening,
            warn: Arc::new(Throttle::new(LOG_EVERY)),
            hosts: Arc::default(),
            per_host: max,
            reserved: 0,
        }
    }

    /// Fair shares: one remote address holds at most `per_host` connections, and `reserved`
    /// slots are kept for the box itself (its own tools, a kiosk browser on the Pi).
    pub fn with_shares(mut self, per_host: usize, reserved: usize) -> Self {
        self.per_host = per_host.max(1);
        self.reserved = reserved.min(self.max.saturating_sub(1));
        self
    }

    /// A slot for one more connection, held for as long as it is served; `None` (counted and
    /// logged, at most once a minute) when all are taken.
    pub fn admit(&self) -> Option<Slot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(Slot { _permit: permit, host: None }),
            Err(_) => self.refuse("too many clients"),
        }
    }

    /// A slot for a connection from `peer`, within its address's share (see [`Self::with_shares`]).
    pub fn admit_from(&self, peer: IpAddr) -> Option<Slot> {
        let ip = peer.to_canonical();
        if is_this_box(ip) {
            return self.admit();
        }
        if self.slots.available_permits() <= self.reserved {
            return self.refuse("too many clients (the last slots are kept for the box itself)");
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let held = hosts.get(&ip).copied().unwrap_or(0);
        if held >= self.per_host {
            drop(hosts);
            return self.refuse("too many clients from one address");
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            drop(hosts);
            return self.refuse("too many clients");
        };
        hosts.insert(ip, held + 1);
        Some(Slot { _permit: permit, host: Some((ip, self.hosts.clone())) })
    }

    fn refuse(&self, why: &'static str) -> Option<Slot> {
        if let Ok(mut l) = self.listening.lock() {
            *l.refused.entry(self.what.as_str().to_string()).or_default() += 1;
        }
        if let Some(count) = self.warn.hit() {
            warn!(
                listener = self.what.as_str(),
                max = self.max,
                per_host = self.per_host,
                refused = count,
                "connection refused: {why}"
            );
        }
        None
    }

    /// Connections being served now.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// An accept loop's pause after an error: out of descriptors (`EMFILE`), out of memory, a reset
/// before accept. Retrying at once would spin a core and flood the journal; the pause doubles
/// from 10 ms to 1 s and resets after a success.
pub struct AcceptPause {
    what: Listener,
    delay: Duration,
    warn: Throttle,
}

impl AcceptPause {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new(what: Listener) -> Self {
        Self { what, delay: Self::FIRST, warn: Throttle::new(LOG_EVERY) }
    }

    pub fn accepted(&mut self) {
        self.delay = Self::FIRST;
    }

    /// Log (throttled) and wait before the next accept.
    pub async fn failed(&mut self, error: &io::Error) {
        if let Some(count) = self.warn.hit() {
            warn!(listener = self.what.as_str(), error = %error, failures = count, "accept failed; pausing before the next");
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
        let cap = ConnectionCap::new(Listener::Feed, 2, listening.clone());
        let a = cap.admit().expect("first");
        let _b = cap.admit().expect("second");
        assert!(cap.admit().is_none());
        assert!(cap.admit().is_none());
        assert_eq!(listening.lock().unwrap().refused["feed"], 2);
        assert_eq!(cap.in_use(), 2);
        drop(a);
        assert!(cap.admit().is_some(), "a slot frees when its connection ends");
    }

    #[test]
    fn one_address_holds_its_share_and_the_box_keeps_its_slots() {
        let listening = Arc::new(Mutex::new(Listening::default()));
        let cap = ConnectionCap::new(Listener::Http, 8, listening).with_shares(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "::ffff:192.0.2.2".parse().unwrap());
        let held_a: Vec<Slot> = (0..5).filter_map(|_| cap.admit_from(a)).collect();
        assert_eq!(held_a.len(), 3, "a share of 3");
        let held_b: Vec<Slot> = (0..5).filter_map(|_| cap.admit_from(b)).collect();
        assert_eq!(held_b.len(), 3, "a v4-mapped address is its v4 address, with its own share");
        assert!(cap.admit_from("192.0.2.3".parse().unwrap()).is_none(), "the last 2 slots are the box's");
        let own: Vec<Slot> = (0..3).filter_map(|_| cap.admit_from("127.0.0.1".parse().unwrap())).collect();
        assert_eq!(own.len(), 2);
        drop(held_a);
        assert!(cap.admit_from(a).is_some(), "a share comes back when its connections end");
    }
}
