//! An IPICO Elite's control port (text commands, `tcp://host:9999`) and replay port (10300), used
//! only when `reader.elite_control` is set: both are known from one program (ChronoKeep) and no
//! capture. A helper thread per reader connection does their I/O, so the reader thread never
//! waits on them: it hands requests over and takes events back between reads.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::record::{Framed, LineFramer};
use crate::clock::Stamp;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the control connection is read for replies between requests.
const REPLY_WAIT: Duration = Duration::from_millis(100);
/// The reader opens its replay port after `replay_start`: it is tried for this long.
const REPLAY_CONNECT_FOR: Duration = Duration::from_secs(10);
/// A replay silent this long is over (it should end with the reader closing the connection).
const REPLAY_IDLE: Duration = Duration::from_secs(30);
/// Events waiting for the reader thread. A replay that sends faster than the reader thread
/// takes its records in waits here (its socket stops being read), instead of filling memory.
const EVENTS_QUEUED: usize = 1024;
/// The most a replay may bring, and the longest it may last: then it is cut off and said to
/// have failed (a real memory holds some hundred thousand reads of under 40 bytes).
const REPLAY_MAX_BYTES: u64 = 16 << 20;
const REPLAY_MAX: Duration = Duration::from_secs(15 * 60);

// The control port's commands and replies (reader-control.md): text, one per line.

pub const GET_CLOCK: &str = "getdate\n";

/// `setdate.yyMMddHH:mm:ss` (local wall time, to the second).
pub fn set_clock(local: NaiveDateTime) -> String {
    format!("setdate.{}\n", local.format("%y%m%d%H:%M:%S"))
}

/// Replay what reader 1 (`ttyS0`) or 2 (`ttyS1`) stored since `since` (all of it without),
/// to TCP `port` (10300 in the source); the replay ends when the reader closes that connection.
pub fn replay_start(reader: u8, port: u16, since: Option<NaiveDateTime>) -> String {
    let file = format!("file.ttyS{} port.{port}", reader.saturating_sub(1));
    match since {
        Some(t) => format!("replay_start {file} datetime.{}\n", t.format("%y%m%d%H%M%S")),
        None => format!("replay_start {file}\n"),
    }
}

/// The `getdate` reply, Linux `date` output after `date.`: `Wed Nov 12 15:30:30 CST 2008`
/// (the zone name is not trusted: the reader's wall time is taken as local).
pub fn parse_clock(line: &str) -> Option<NaiveDateTime> {
    let text = line.trim().strip_prefix("date.")?;
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, month, day, time, _zone, year] = parts.as_slice() else { return None };
    NaiveDateTime::parse_from_str(&format!("{month} {day} {year} {time}"), "%b %d %Y %H:%M:%S").ok()
}

/// What the reader thread asks of the Elite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A control command (`getdate`, `setdate.…`).
    Command(Vec<u8>),
    /// `replay_start …`, then read the replay port until the reader closes it.
    Replay(Vec<u8>),
}

/// What comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A line from the control port, stamped on arrival.
    Line(String, Stamp),
    /// A record from the replay port (or one refused as too long, counted like any other).
    Replayed(Framed<Stamp>),
    /// The replay is over: `None` when the reader closed it, else why it ended.
    ReplayEnd(Option<String>),
    /// The control port cannot be reached or failed.
    Error(String),
}

pub struct Elite {
    requests: Sender<Request>,
    events: Receiver<Event>,
}

impl Elite {
    /// Start the helper for the control port `control` (`tcp://host:port`); replays come from
    /// `replay_port` on the same host.
    pub fn start(control: &str, replay_port: u16) -> Elite {
        let (requests, rx) = crossbeam_channel::unbounded();
        let (tx, events) = crossbeam_channel::bounded(EVENTS_QUEUED);
        let addr = control.trim_start_matches("tcp://").to_string();
        let spawned = std::thread::Builder::new().name("elite".into()).spawn(move || serve(&addr, replay_port, rx, tx));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the IPICO Elite helper");
        }
        Elite { requests, events }
    }

    pub fn send(&self, request: Request) {
        let _ = self.requests.send(request);
    }

    pub fn events(&self) -> crossbeam_channel::TryIter<'_, Event> {
        self.events.try_iter()
    }
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let target = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} does not resolve")))?;
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn serve(addr: &str, replay_port: u16, requests: Receiver<Request>, events: Sender<Event>) {
    let mut control: Option<TcpStream> = None;
    let mut lines = LineFramer::default();
    let mut framed = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let request = match requests.recv_timeout(REPLY_WAIT) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            // The reader connection is gone.
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Some(request) = request {
            if control.is_none() {
                match connect(addr).and_then(|s| s.set_read_timeout(Some(REPLY_WAIT)).map(|_| s)) {
                    Ok(s) => control = Some(s),
                    Err(e) => {
                        let _ = events.send(Event::Error(format!("cannot reach the control port {addr}: {e}")));
                        continue;
                    }
                }
            }
            let (command, replay) = match request {
                Request::Command(c) => (c, false),
                Request::Replay(c) => (c, true),
            };
            if let Some(s) = control.as_mut()
                && let Err(e) = s.write_all(&command)
            {
                let _ = events.send(Event::Error(format!("control port {addr}: {e}")));
                control = None;
                continue;
            }
            if replay {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
                let events = events.clone();
                let _ = std::thread::Builder::new()
                    .name("elite-replay".into())
                    .spawn(move || replay_from(&format!("{host}:{replay_port}"), &events));
            }
        }
        // Whatever the control port said meanwhile.
        if let Some(s) = control.as_mut() {
            match s.read(&mut buf) {
                Ok(0) => {
                    control = None;
                    lines.reset();
                }
                Ok(n) => {
                    lines.push(&buf[..n], Stamp::now(), &mut framed);
                    for line in framed.drain(..) {
                        let _ = events.send(match line {
                            Framed::Record { bytes, stamp } => {
                                Event::Line(String::from_utf8_lossy(&bytes).into_owned(), stamp)
                            }
                            Framed::Rejected { bytes, .. } => Event::Error(format!(
                                "the control port sent a line of over {} bytes (it begins {:?})",
                                bytes.len(),
                                String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
                            )),
                        });
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => control = None,
            }
        }
    }
}

/// Read the replay port until the reader closes it.
fn replay_from(addr: &str, events: &Sender<Event>) {
    let deadline = Instant::now() + REPLAY_CONNECT_FOR;
    let mut stream = loop {
        match connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                let _ = events.send(Event::ReplayEnd(Some(format!("cannot reach the replay port {addr}: {e}"))));
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let end = (|| -> Option<String> {
        stream.set_read_timeout(Some(REPLAY_IDLE)).ok()?;
        if let Err(e) = stream.write_all(b"\n") {
            return Some(format!("replay port {addr}: {e}"));
        }
        let mut lines = LineFramer::default();
        let mut framed = Vec::new();
        let mut buf = vec![0u8; 8192];
        let (started, mut total) = (Instant::now(), 0u64);
        loop {
            if started.elapsed() >= REPLAY_MAX || total >= REPLAY_MAX_BYTES {
                return Some(format!(
                    "cut off after {} s and {} kB: more than a replay can hold",
                    started.elapsed().as_secs(),
                    total / 1024
                ));
            }
            match stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    total += n as u64;
                    lines.push(&buf[..n], Stamp::now(), &mut framed);
                    for record in framed.drain(..) {
                        if events.send(Event::Replayed(record)).is_err() {
                            return Some("the reader connection is gone".into());
                        }
                    }
                }
                Err(e) => return Some(format!("replay port {addr}: {e}")),
            }
        }
    })();
    let _ = events.send(Event::ReplayEnd(end));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: u32) -> NaiveDateTime {
        chrono::NaiveDate::from_ymd_opt(y, mo, d).unwrap().and_hms_milli_opt(h, mi, s, ms).unwrap()
    }

    /// The replay port is framed like any reader line: a line too long is a counted reject
    /// (it was dropped silently), and the lines after it come through.
    #[test]
    fn a_replay_line_too_long_is_a_reject_and_the_next_ones_come() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let reader = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut hello = [0u8; 1];
            conn.read_exact(&mut hello).unwrap();
            let long = vec![b'x'; crate::reader::record::MAX_LINE + 100];
            conn.write_all(&[&long[..], b"\r\naa0102\r\n\r\nab03"].concat()).unwrap();
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        replay_from(&addr, &tx);
        reader.join().unwrap();
        let events: Vec<Event> = rx.try_iter().collect();
        let shown: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::Replayed(Framed::Record { bytes, .. }) => String::from_utf8_lossy(bytes).into_owned(),
                Event::Replayed(Framed::Rejected { reason, bytes, .. }) => format!("{reason:?} {}", bytes.len()),
                other => format!("{other:?}"),
            })
            .collect();
        // The tail without a line end is not a record: the replay ended in the middle of it.
        assert_eq!(shown, ["TooLong 4096", "aa0102", "ReplayEnd(None)"]);
    }

    #[test]
    fn elite_commands_and_replies() {
        assert_eq!(set_clock(at(2026, 3, 6, 19, 49, 21, 0)), "setdate.26030619:49:21\n");
        assert_eq!(GET_CLOCK, "getdate\n");
        assert_eq!(parse_clock("date.Wed Nov 12 15:30:30 CST 2008"), Some(at(2008, 11, 12, 15, 30, 30, 0)));
        assert_eq!(parse_clock("date.Mon Mar  2 09:05:01 UTC 2026"), Some(at(2026, 3, 2, 9, 5, 1, 0)), "one-digit day");
        assert_eq!(parse_clock("Wed Nov 12 15:30:30 CST 2008"), None);
        assert_eq!(replay_start(1, 10300, None), "replay_start file.ttyS0 port.10300\n");
        assert_eq!(
            replay_start(2, 10300, Some(at(2026, 3, 6, 19, 49, 21, 0))),
            "replay_start file.ttyS1 port.10300 datetime.260306194921\n"
        );
    }
}
