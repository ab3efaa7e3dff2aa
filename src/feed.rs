//! The live feed (`[feed] listen`): passings as TCP lines for timing software in the tent, with
//! or without internet.
//!
//! Protocol: on connect, a client may send one line holding the last `num_passing` it has (within
//! half a second); it first gets the open session's passings after that number, then every new
//! passing as it is committed, one line each: `num_passing,bib,chip,timestamp\n`
//! (timestamp `YYYY-MM-DDTHH:mm:ss.sssZ`), written by a CSV writer (a bib with a comma is quoted;
//! one that would start a spreadsheet formula is neutralised, see [`crate::csv_cell::cell`]). A
//! client that reads slowly never slows the gateway: it falls behind the live stream and catches up
//! from the database.
//!
//! Bounds: the first line is read up to 32 bytes (a number needs far fewer), 4 KiB more ends a
//! client (it is meant to listen), at most
//! [`FEED_CONNECTIONS`] clients at once, a client that takes no data for [`WRITE_STALL`] is
//! dropped, and a stop never waits on a client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::limits::{AcceptPause, ConnectionCap, FEED_CONNECTIONS, FEED_PER_HOST, RESERVED_FOR_THIS_BOX};
use crate::store::PassingEvent;
use crate::store::query::SharedDb;

/// How long a new client has to say where it stopped.
const HELLO_WAIT: Duration = Duration::from_millis(500);
/// The longest first line: a `num_passing` and its line end.
pub const HELLO_MAX: usize = 32;
/// What a client may send after its first line before it is dropped (it is meant to listen).
pub const EXTRA_MAX: usize = 4096;
/// A client that accepts no data for this long is dropped (it reconnects and says where it stopped).
pub const WRITE_STALL: Duration = Duration::from_secs(30);
const REPLAY_PAGE: i64 = 1000;

pub struct FeedServer {
    listener: TcpListener,
    events: broadcast::Sender<PassingEvent>,
    db: SharedDb,
    cap: ConnectionCap,
}

impl FeedServer {
    pub fn bind(
        listen: &str,
        events: broadcast::Sender<PassingEvent>,
        db_path: PathBuf,
        cap: ConnectionCap,
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = listen.parse()?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        info!(listen = %listener.local_addr()?, "live feed listening");
        Ok(Self { listener, events, db: SharedDb::new(&db_path), cap })
    }

    /// The cap every feed listener of this process shares (`status.listening.refused.feed`).
    pub fn cap(listening: std::sync::Arc<std::sync::Mutex<crate::status::Listening>>) -> ConnectionCap {
        ConnectionCap::new(crate::status::Listener::Feed, FEED_CONNECTIONS, listening).with_shares(FEED_PER_HOST, RESERVED_FOR_THIS_BOX)
    }

    pub fn local_addr(&self) -> Option<String> {
        self.listener.local_addr().ok().map(|a| a.to_string())
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut pause = AcceptPause::new(crate::status::Listener::Feed);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        pause.accepted();
                        let Some(slot) = self.cap.admit_from(peer.ip()) else { continue };
                        // Subscribe before the replay, so nothing falls between the two.
                        let live = self.events.subscribe();
                        let (db, cancel) = (self.db.clone(), cancel.clone());
                        tokio::spawn(async move {
                            let _slot = slot;
                            debug!(%peer, "feed client connected");
                            // A stop drops the client wherever it is (waiting, writing, replaying).
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                served = serve(stream, live, db) => if let Err(e) = served {
                                    debug!(%peer, error = %e, "feed client gone");
                                }
                            }
                        });
                    }
                    Err(e) => pause.failed(&e).await,
                }
            }
        }
    }
}

/// One feed line: `num_passing,bib,chip,timestamp\n`, by the CSV writer.
pub fn line(num: i64, bib: &str, chip: &str, timestamp: &str) -> String {
    crate::csv_cell::csv_line(&[&num.to_string(), bib, chip, timestamp])
}

/// Write within [`WRITE_STALL`], or give the client up.
async fn send(write: &mut (impl AsyncWriteExt + Unpin), text: &str) -> anyhow::Result<()> {
    match tokio::time::timeout(WRITE_STALL, write.write_all(text.as_bytes())).await {
        Ok(written) => Ok(written?),
        Err(_) => anyhow::bail!("client took no data for {WRITE_STALL:?}"),
    }
}

/// The client's first line, if it sends one in time: the last `num_passing` it has.
pub async fn hello(read: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> Option<i64> {
    match tokio::time::timeout(HELLO_WAIT, crate::limits::read_line(read, HELLO_MAX)).await {
        Ok(Ok(Some(line))) => std::str::from_utf8(&line).ok()?.trim().parse::<i64>().ok(),
        _ => None,
    }
}

/// The open session and its last number.
async fn position(db: &SharedDb) -> anyhow::Result<(Option<i64>, i64)> {
    db.run(|db| {
        // A test session (chip check) is not a race: the feed gives timing software none of it.
        Ok(match db.open_session()?.filter(|s| !s.test) {
            Some(s) => (Some(s.id), s.passings),
            None => (None, 0),
        })
    })
    .await
}

/// Send the open session's passings after `last` (while it is still the client's session).
async fn catch_up(
    write: &mut (impl AsyncWriteExt + Unpin),
    db: &SharedDb,
    session: Option<i64>,
    last: &mut i64,
) -> anyhow::Result<()> {
    loop {
        let (s, lines) = replay(db, *last).await?;
        if s != session || lines.is_empty() {
            return Ok(());
        }
        for (num, text) in lines {
            send(write, &text).await?;
            *last = num;
        }
    }
}

/// Lines for the open session's passings after `since`; returns them with the session and last number.
async fn replay(db: &SharedDb, since: i64) -> anyhow::Result<(Option<i64>, Vec<(i64, String)>)> {
    db.run(move |db| {
        let Some(session) = db.open_session()?.filter(|s| !s.test) else { return Ok((None, Vec::new())) };
        let rows = db.passings_since(session.id, since, REPLAY_PAGE)?;
        Ok((
            Some(session.id),
            rows.into_iter()
                .map(|p| {
                    (p.num_passing, line(p.num_passing, &p.bib, &p.chip, &crate::clock::api_timestamp(p.timestamp_us)))
                })
                .collect(),
        ))
    })
    .await
}

async fn serve(stream: TcpStream, mut live: broadcast::Receiver<PassingEvent>, db: SharedDb) -> anyhow::Result<()> {
    // Where the live stream stands at connection: a client that names no number starts here.
    let (mut session, current) = position(&db).await?;
    let (read, mut write) = stream.into_split();
    // A small buffer: the first line is all a client ever sends.
    let mut reader = BufReader::with_capacity(64, read);
    let since = hello(&mut reader).await;
    let mut last = since.unwrap_or(current);
    if since.is_some() {
        catch_up(&mut write, &db, session, &mut last).await?;
    }
    // Watch the client too: one that leaves frees its slot now, not at the next passing. Nothing
    // more is expected from it: a few stray bytes are ignored, a stream of them ends the client.
    let mut ignored = [0u8; 1024];
    let mut extra = 0usize;
    loop {
        let event = tokio::select! {
            e = live.recv() => e,
            read = reader.read(&mut ignored) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => {
                    extra += n;
                    if extra > EXTRA_MAX {
                        anyhow::bail!("the client keeps sending; it is only expected to listen");
                    }
                    continue;
                }
            },
        };
        match event {
            Ok(p) if p.test => {}
            Ok(p) => {
                if session != Some(p.session_id) {
                    // A new session numbers from 1 again.
                    session = Some(p.session_id);
                    last = 0;
                }
                if p.num_passing <= last {
                    continue; // already sent by the replay
                }
                let ts = crate::clock::api_timestamp(p.timestamp_us);
                send(&mut write, &line(p.num_passing, &p.bib, &p.chip, &ts)).await?;
                last = p.num_passing;
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Too slow for the live stream: catch up from the database instead.
                debug!(missed, "feed client lagged; replaying from the store");
                catch_up(&mut write, &db, session, &mut last).await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}
