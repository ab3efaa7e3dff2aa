//! A reader emulator written from `shared/reader-control.md`: an IPICO Lite or an Ultra that
//! keeps every read in memory, has its own clock (an offset from ours plus a drift), answers
//! get/set clock and replays its memory as documented, on TCP (`tcp://127.0.0.1:<port 0>`) or on
//! a pseudo-terminal standing in for its serial line.
//!
//! IPICO: `ab00000222` → the clock to 10 ms; a set takes effect at the next roll-over (the reader
//! resets its hundredths to 0x34 and rolls to the new second 480 ms after the command, as
//! captured); the stored-read download (init, configure, start) streams the whole memory and then
//! a status whose progress equals its extent; it never stops by itself.
//! Ultra: `r` → `H:M:S D-M-YYYY (0)`; `t HH:mm:ss dd-MM-yyyy`; rewind by log index or by time in
//! either form (`600a\rb\n` or `6␀␀a\rb\r`, `8…` alike), replayed lines flagged 1; no end signal.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use rufus_gateway::demo::pty::Pty;
use rufus_gateway::reader::format::ipico;

use super::readers::{self, TagRead};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipico,
    Ultra,
}

struct Stored {
    line: Vec<u8>,
    index: u64,
    /// Reader-local seconds since 1980 (Ultra's rewind by time).
    local_s: u64,
}

enum Conn {
    Tcp(TcpStream),
    Pty(std::fs::File),
}

impl Conn {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(bytes),
            Conn::Pty(f) => f.write_all(bytes),
        }
    }
}

struct State {
    family: Family,
    tz: Tz,
    /// Reader clock minus host clock, µs, at `drift_from`.
    offset_us: i64,
    drift_ppm: f64,
    drift_from: Instant,
    memory: Vec<Stored>,
    conn: Option<Conn>,
    plugged: bool,
    /// Every command received, in order.
    commands: Vec<Vec<u8>>,
    /// Ultra rewinds seen: (form, kind, from, to).
    rewinds: Vec<(&'static str, u8, u64, u64)>,
    clock_sets: usize,
    /// Elite: what the last `replay_start` asked for (reader-local seconds since 1980; 0 = all).
    replay_since: Option<u64>,
    /// Ultra: in 'Read' mode (its clock cannot be set then).
    reading: bool,
    /// IPICO: the download is held after its start until released (live reads come meanwhile).
    hold_download: bool,
    held: bool,
    /// Ultra: the `r` reply to give instead of the clock (a hostile reader).
    clock_reply: Option<String>,
    /// Elite: bytes the replay port sends instead of its memory.
    replay_flood: Option<Vec<u8>>,
}

impl State {
    fn offset_now(&self) -> i64 {
        self.offset_us + (self.drift_from.elapsed().as_micros() as f64 * self.drift_ppm / 1e6) as i64
    }

    fn reader_now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::TimeDelta::microseconds(self.offset_now())
    }

    fn set_reader_time(&mut self, reader_utc: DateTime<Utc>) {
        self.offset_us = (reader_utc - Utc::now()).num_microseconds().unwrap_or(0);
        self.drift_from = Instant::now();
    }

    fn local(&self, at: DateTime<Utc>) -> NaiveDateTime {
        self.tz.from_utc_datetime(&at.naive_utc()).naive_local()
    }

    fn utc(&self, local: NaiveDateTime) -> DateTime<Utc> {
        self.tz.from_local_datetime(&local).earliest().expect("a local time that exists").with_timezone(&Utc)
    }

    /// Keep a read in memory, as the reader sends it; its line.
    fn keep(&mut self, chip: &str, at: DateTime<Utc>) -> Vec<u8> {
        let r = TagRead { chip: chip.to_string(), at, antenna: 1, rssi: -60 };
        let index = self.memory.len() as u64 + 1;
        let line = match self.family {
            Family::Ipico => readers::ipico(&r, self.tz),
            Family::Ultra => readers::ultra(&r, self.tz, index),
        };
        let local_s = rufus_gateway::reader::format::ultra::seconds_since_1980(self.local(at));
        self.memory.push(Stored { line: line.clone(), index, local_s });
        line
    }

    fn send(&mut self, bytes: &[u8]) {
        if let Some(conn) = &mut self.conn
            && conn.write(bytes).is_err()
        {
            self.conn = None;
        }
    }

    fn download_status(&self, state: u8, progress: u32) -> Vec<u8> {
        let e = self.memory.len() as u32;
        let p = progress;
        let data = [
            state,
            (e >> 16) as u8,
            (e >> 8) as u8,
            e as u8,
            (p >> 16) as u8,
            (p >> 8) as u8,
            p as u8,
            0,
            0x59,
            0x05,
            0x8f,
            0x03,
        ];
        ipico::frame(ipico::DOWNLOAD, &data).into_bytes()
    }

    /// IPICO: the whole memory, then the status that says so.
    fn stream_memory(&mut self) {
        let all: Vec<u8> = self.memory.iter().flat_map(|s| s.line.clone()).collect();
        self.send(&all);
        let done = self.download_status(3, self.memory.len() as u32);
        self.send(&done);
    }

    /// One IPICO control line.
    fn ipico_command(&mut self, line: &str) {
        let body = line.trim().trim_start_matches("ab");
        let bytes: Vec<u8> =
            (0..body.len() / 2).filter_map(|i| u8::from_str_radix(&body[2 * i..2 * i + 2], 16).ok()).collect();
        if bytes.len() < 3 {
            return;
        }
        let (instruction, data) = (bytes[2], &bytes[3..bytes.len() - 1]);
        let bcd = |b: u8| u32::from(b >> 4) * 10 + u32::from(b & 0x0f);
        match (instruction, data) {
            (ipico::GET_CLOCK, []) => {
                let frame = ipico::clock_reply(self.local(self.reader_now()), 0x27);
                self.send(frame.as_bytes());
            }
            (ipico::SET_CLOCK, [yy, mm, dd, _dw, h, m, s]) => {
                let date = NaiveDate::from_ymd_opt(2000 + bcd(*yy) as i32, bcd(*mm), bcd(*dd)).expect("a date");
                let target = self.utc(date.and_hms_opt(bcd(*h), bcd(*m), bcd(*s)).expect("a time"));
                // The hundredths restart at 0x34 of the old second; the new one comes 480 ms on.
                self.set_reader_time(target - chrono::TimeDelta::milliseconds(480));
                self.clock_sets += 1;
                self.send(b"ab00000121\r\nab00094c01555202a8555201f459\r\n");
            }
            (ipico::DOWNLOAD, [0x02]) | (ipico::DOWNLOAD, [0x07, 0x01, 0x05]) => {
                let status = self.download_status(1, 0);
                self.send(&status);
            }
            (ipico::DOWNLOAD, [0x01, 0x01]) => {
                let status = self.download_status(3, 0);
                self.send(&status);
                if self.hold_download {
                    self.held = true;
                } else {
                    self.stream_memory();
                }
            }
            (ipico::DOWNLOAD, _) => {
                let progress = self.memory.len() as u32;
                let status = self.download_status(1, progress);
                self.send(&status);
            }
            _ => self.send(b"ab0000f258\r\n"),
        }
    }

    /// Ultra commands in `buf`; returns how many bytes were taken.
    fn ultra_commands(&mut self, buf: &[u8]) -> usize {
        let mut at = 0;
        while at < buf.len() {
            let rest = &buf[at..];
            match rest[0] {
                b'\r' | b'\n' | 0 | b' ' => at += 1,
                b'r' if self.clock_reply.is_some() => {
                    let reply = self.clock_reply.clone().unwrap_or_default();
                    self.commands.push(b"r".to_vec());
                    self.send(format!("{reply}\n").as_bytes());
                    at += 1;
                }
                b'r' => {
                    let now = self.local(self.reader_now());
                    let reply = format!(
                        "{}:{}:{} {}-{}-{} (0)\n",
                        now.hour(),
                        now.minute(),
                        now.second(),
                        now.day(),
                        now.month(),
                        now.year()
                    );
                    self.commands.push(b"r".to_vec());
                    self.send(reply.as_bytes());
                    at += 1;
                }
                b'?' => {
                    self.commands.push(b"?".to_vec());
                    let status = format!("S={},1,0\n", self.reading as u8);
                    self.send(status.as_bytes());
                    at += 1;
                }
                b't' => {
                    let Some(end) = rest.iter().position(|&b| b == b'\n') else { break };
                    let text = String::from_utf8_lossy(&rest[1..end]).trim().to_string();
                    self.commands.push(rest[..=end].to_vec());
                    if let Ok(local) = NaiveDateTime::parse_from_str(&text, "%H:%M:%S %d-%m-%Y")
                        && !self.reading
                    {
                        let utc = self.utc(local);
                        self.set_reader_time(utc);
                        self.clock_sets += 1;
                    }
                    at += end + 1;
                }
                kind @ (b'6' | b'8') => {
                    // `600a\rb\n` (ChronoKeep) or `6␀␀a\rb\r` (PikaTimer).
                    if rest.len() < 3 {
                        break;
                    }
                    let form = match &rest[1..3] {
                        b"00" => "ascii",
                        [0, 0] => "binary",
                        _ => {
                            at += 1;
                            continue;
                        }
                    };
                    let Some(cr) = rest[3..].iter().position(|&b| b == b'\r').map(|p| p + 3) else { break };
                    let Some(end) = rest[cr + 1..].iter().position(|&b| b == b'\r' || b == b'\n').map(|p| p + cr + 1)
                    else {
                        break;
                    };
                    let num = |s: &[u8]| String::from_utf8_lossy(s).parse::<u64>().unwrap_or(0);
                    let (a, b) = (num(&rest[3..cr]), num(&rest[cr + 1..end]));
                    self.commands.push(rest[..=end].to_vec());
                    self.rewinds.push((form, kind, a, b));
                    let replay: Vec<u8> = self
                        .memory
                        .iter()
                        .filter(|s| match kind {
                            b'6' => (a..=b).contains(&s.index),
                            _ => (a == 0 && b == 0) || (a..=b).contains(&s.local_s),
                        })
                        .flat_map(|s| {
                            let line = String::from_utf8_lossy(&s.line).into_owned();
                            let mut fields: Vec<&str> = line.trim_end().split(',').collect();
                            fields[6] = "1";
                            format!("{}\n", fields.join(",")).into_bytes()
                        })
                        .collect();
                    self.send(&replay);
                    at += end + 1;
                }
                other => {
                    self.commands.push(vec![other]);
                    at += 1;
                }
            }
        }
        at
    }
}

pub struct Emulator {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    /// What the gateway's `reader.port` is set to.
    pub port: String,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Emulator {
    fn state(family: Family, tz: Tz, offset_ms: i64) -> Arc<Mutex<State>> {
        Arc::new(Mutex::new(State {
            family,
            tz,
            offset_us: offset_ms * 1000,
            drift_ppm: 0.0,
            drift_from: Instant::now(),
            memory: Vec::new(),
            conn: None,
            plugged: true,
            commands: Vec::new(),
            rewinds: Vec::new(),
            clock_sets: 0,
            replay_since: None,
            reading: true,
            hold_download: false,
            held: false,
            clock_reply: None,
            replay_flood: None,
        }))
    }

    /// A networked reader on 127.0.0.1, port chosen by the system.
    pub fn tcp(family: Family, tz: Tz, offset_ms: i64) -> Emulator {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = format!("tcp://{}", listener.local_addr().unwrap());
        let state = Self::state(family, tz, offset_ms);
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            let mut readers: Vec<std::thread::JoinHandle<()>> = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let mut state = s.lock().unwrap();
                        if !state.plugged {
                            let _ = stream.shutdown(Shutdown::Both);
                            continue;
                        }
                        stream.set_nonblocking(false).unwrap();
                        stream.set_nodelay(true).unwrap();
                        if let Some(Conn::Tcp(old)) = state.conn.take() {
                            let _ = old.shutdown(Shutdown::Both);
                        }
                        state.conn = Some(Conn::Tcp(stream.try_clone().unwrap()));
                        if state.family == Family::Ultra {
                            state.send(b"Connected,0\n");
                        }
                        drop(state);
                        let (s2, st2) = (s.clone(), st.clone());
                        readers.push(std::thread::spawn(move || serve(s2, st2, Box::new(stream))));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => break,
                }
            }
            for r in readers {
                let _ = r.join();
            }
        });
        Emulator { state, stop, port, threads: vec![accept] }
    }

    /// An IPICO Elite: its stream on one port, and its text control and replay ports (the
    /// replay port is chosen by the system: the gateway's `reader.elite_replay_port`).
    /// Returns the emulator, the control port's `tcp://` address and the replay port.
    pub fn elite(tz: Tz, offset_ms: i64) -> (Emulator, String, u16) {
        let mut emu = Self::tcp(Family::Ipico, tz, offset_ms);
        let control = TcpListener::bind("127.0.0.1:0").unwrap();
        let replay = TcpListener::bind("127.0.0.1:0").unwrap();
        let control_at = format!("tcp://{}", control.local_addr().unwrap());
        let replay_port = replay.local_addr().unwrap().port();
        for (listener, is_control) in [(control, true), (replay, false)] {
            listener.set_nonblocking(true).unwrap();
            let (s, st) = (emu.state.clone(), emu.stop.clone());
            emu.threads.push(std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).unwrap();
                            let (s2, st2) = (s.clone(), st.clone());
                            if is_control {
                                std::thread::spawn(move || elite_control(s2, st2, stream));
                            } else {
                                std::thread::spawn(move || elite_replay(s2, stream));
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                        Err(_) => break,
                    }
                }
            }));
        }
        (emu, control_at, replay_port)
    }

    /// A reader on a serial line: the gateway opens the pty's slave.
    pub fn pty(family: Family, tz: Tz, offset_ms: i64) -> Emulator {
        let pty = Pty::open().unwrap();
        let port = pty.path.display().to_string();
        let state = Self::state(family, tz, offset_ms);
        state.lock().unwrap().conn = Some(Conn::Pty(pty.try_clone().unwrap()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let input = pty.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let _keep = pty;
            serve(s, st, Box::new(input))
        });
        Emulator { state, stop, port, threads: vec![reader] }
    }

    /// The reader reads a tag now (reader time = its clock), keeps it, and sends it if connected.
    pub fn read(&self, chip: &str) {
        let mut state = self.state.lock().unwrap();
        let at = state.reader_now();
        let line = state.keep(chip, at);
        if state.plugged {
            state.send(&line);
        }
    }

    /// The reader reads a tag its clock stamps `at` (a wrong clock, or a test's own times), keeps
    /// it and sends it if connected.
    pub fn read_at(&self, chip: &str, at: DateTime<Utc>) {
        let mut state = self.state.lock().unwrap();
        let line = state.keep(chip, at);
        if state.plugged {
            state.send(&line);
        }
    }

    /// Send bytes as they are (a hostile or broken reader); nothing is kept.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.state.lock().unwrap().send(bytes);
    }

    /// IPICO: hold the next downloads after their start, until [`Emulator::release_download`].
    pub fn hold_downloads(&self, hold: bool) {
        self.state.lock().unwrap().hold_download = hold;
    }

    /// IPICO: a held download has started (the gateway asked for it).
    pub fn download_held(&self) -> bool {
        self.state.lock().unwrap().held
    }

    /// IPICO: stream the held download now.
    pub fn release_download(&self) {
        let mut state = self.state.lock().unwrap();
        state.held = false;
        state.stream_memory();
    }

    /// Ultra: answer `r` with this instead of the clock.
    pub fn set_clock_reply(&self, reply: &str) {
        self.state.lock().unwrap().clock_reply = Some(reply.to_string());
    }

    /// Elite: the replay port sends these bytes instead of its memory.
    pub fn set_replay_flood(&self, bytes: Vec<u8>) {
        self.state.lock().unwrap().replay_flood = Some(bytes);
    }

    /// The reader's clock is set to be this far from ours (ms).
    pub fn set_offset_ms(&self, ms: i64) {
        let mut state = self.state.lock().unwrap();
        state.offset_us = ms * 1000;
        state.drift_from = Instant::now();
    }

    /// Keep a read made at `at` (reader time) in memory only, as if read before we came.
    pub fn remember(&self, chip: &str, at: DateTime<Utc>) {
        self.state.lock().unwrap().keep(chip, at);
    }

    /// Pull the cable: the connection drops, and none is taken until [`Emulator::plug`].
    pub fn unplug(&self) {
        let mut state = self.state.lock().unwrap();
        state.plugged = false;
        if let Some(Conn::Tcp(s)) = state.conn.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn plug(&self) {
        self.state.lock().unwrap().plugged = true;
    }

    pub fn connected(&self) -> bool {
        self.state.lock().unwrap().conn.is_some()
    }

    /// The reader clock minus ours, now (ms).
    pub fn offset_ms(&self) -> f64 {
        self.state.lock().unwrap().offset_now() as f64 / 1000.0
    }

    pub fn set_drift_ppm(&self, ppm: f64) {
        let mut state = self.state.lock().unwrap();
        state.offset_us = state.offset_now();
        state.drift_from = Instant::now();
        state.drift_ppm = ppm;
    }

    /// Ultra: start or stop reading (its clock is set only while stopped).
    pub fn set_reading(&self, reading: bool) {
        self.state.lock().unwrap().reading = reading;
    }

    pub fn clock_sets(&self) -> usize {
        self.state.lock().unwrap().clock_sets
    }

    pub fn commands(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().commands.clone()
    }

    pub fn rewinds(&self) -> Vec<(&'static str, u8, u64, u64)> {
        self.state.lock().unwrap().rewinds.clone()
    }

    pub fn memory_len(&self) -> usize {
        self.state.lock().unwrap().memory.len()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut state) = self.state.lock()
            && let Some(Conn::Tcp(s)) = state.conn.take()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An Elite's control port: `getdate`, `setdate.yyMMddHH:mm:ss`, `replay_start …`, one per line.
fn elite_control(state: Arc<Mutex<State>>, stop: Arc<AtomicBool>, mut stream: TcpStream) {
    stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line).trim().to_string();
            let mut state = state.lock().unwrap();
            state.commands.push(text.clone().into_bytes());
            if text == "getdate" {
                let now = state.local(state.reader_now());
                let _ = stream.write_all(format!("date.{}\n", now.format("%a %b %e %H:%M:%S UTC %Y")).as_bytes());
            } else if let Some(when) = text.strip_prefix("setdate.") {
                if let Ok(local) = NaiveDateTime::parse_from_str(when, "%y%m%d%H:%M:%S") {
                    let utc = state.utc(local);
                    state.set_reader_time(utc);
                    state.clock_sets += 1;
                }
            } else if text.starts_with("replay_start ") {
                let since = text
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("datetime."))
                    .and_then(|t| NaiveDateTime::parse_from_str(t, "%y%m%d%H%M%S").ok())
                    .map_or(0, rufus_gateway::reader::format::ultra::seconds_since_1980);
                state.replay_since = Some(since);
            }
        }
    }
}

/// An Elite's replay port: after a `\n`, what `replay_start` asked for, then the reader closes it.
fn elite_replay(state: Arc<Mutex<State>>, mut stream: TcpStream) {
    let mut byte = [0u8; 1];
    if stream.read_exact(&mut byte).is_err() {
        return;
    }
    let lines: Vec<u8> = {
        let state = state.lock().unwrap();
        let Some(since) = state.replay_since else { return };
        if let Some(flood) = &state.replay_flood {
            let flood = flood.clone();
            drop(state);
            let _ = stream.write_all(&flood);
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        state.memory.iter().filter(|m| m.local_s >= since).flat_map(|m| m.line.clone()).collect()
    };
    let _ = stream.write_all(&lines);
    let _ = stream.shutdown(Shutdown::Both);
}

/// Answer the commands arriving on one connection until it closes or the emulator stops.
fn serve(state: Arc<Mutex<State>>, stop: Arc<AtomicBool>, mut input: Box<dyn ReadTimeout>) {
    input.short_timeout();
    let mut buf = vec![0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                if input.is_pty() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                continue;
            }
            // A pty's master reads EIO while no one has its slave open: wait for the gateway.
            Err(_) if input.is_pty() => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut state = state.lock().unwrap();
        match state.family {
            Family::Ipico => {
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&line).trim().to_string();
                    if text.is_empty() {
                        continue;
                    }
                    state.commands.push(text.clone().into_bytes());
                    state.ipico_command(&text);
                }
            }
            Family::Ultra => {
                let taken = state.ultra_commands(&pending);
                pending.drain(..taken);
            }
        }
    }
}

/// A command input that wakes up now and then to see whether the emulator stops.
trait ReadTimeout: Read + Send {
    fn short_timeout(&mut self);
    fn is_pty(&self) -> bool;
}

impl ReadTimeout for TcpStream {
    fn short_timeout(&mut self) {
        let _ = self.set_read_timeout(Some(Duration::from_millis(50)));
    }
    fn is_pty(&self) -> bool {
        false
    }
}

impl ReadTimeout for std::fs::File {
    fn short_timeout(&mut self) {
        // Non-blocking; `serve` waits 5 ms between empty reads.
        let _ = rustix::fs::fcntl_setfl(&*self, rustix::fs::OFlags::NONBLOCK);
    }
    fn is_pty(&self) -> bool {
        true
    }
}
