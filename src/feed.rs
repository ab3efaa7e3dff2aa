//! The live feed (`[feed] listen`): passings as TCP lines for timing software in the tent, with
//! or without internet.
//!
//! Protocol: on connect, a client may send one line holding the last `num_passing` it has (within
//! half a second); it first gets the open session's passings after that number, then every new
//! passing as it is committed, one line each: `num_passing,bib,chip,timestamp\n`
//! (timestamp `YYYY-MM-DDTHH:mm:ss.sssZ`). A client that reads slowly never slows the gateway: it
//! falls behind the live stream and catches up from the database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::PassingEvent;
use crate::store::query::Db;

/// How long a new client has to say where it stopped.
const HELLO_WAIT: Duration = Duration::from_millis(500);
const REPLAY_PAGE: i64 = 1000;

pub struct FeedServer {
    listener: TcpListener,
    events: broadcast::Sender<PassingEvent>,
    db_path: PathBuf,
}

impl FeedServer {
    pub fn bind(listen: &str, events: broadcast::Sender<PassingEvent>, db_path: PathBuf) -> anyhow::Result<Self> {
        let addr: SocketAddr = listen.parse()?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        info!(listen = %listener.local_addr()?, "live feed listening");
        Ok(Self { listener, events, db_path })
    }

    pub fn local_addr(&self) -> Option<String> {
        self.listener.local_addr().ok().map(|a| a.to_string())
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Subscribe before the replay, so nothing falls between the two.
                        let live = self.events.subscribe();
                        let (db, cancel) = (self.db_path.clone(), cancel.clone());
                        tokio::spawn(async move {
                            debug!(%peer, "feed client connected");
                            if let Err(e) = serve(stream, live, db, cancel).await {
                                debug!(%peer, error = %e, "feed client gone");
                            }
                        });
                    }
                    Err(e) => warn!(error = %e, "feed accept failed"),
                }
            }
        }
    }
}

fn line(num: i64, bib: &str, chip: &str, timestamp: &str) -> String {
    format!("{num},{bib},{chip},{timestamp}\n")
}

/// The open session and its last number.
async fn position(db: PathBuf) -> anyhow::Result<(Option<i64>, i64)> {
    tokio::task::spawn_blocking(move || {
        let db = Db::open_readonly(&db)?;
        Ok(match db.open_session()? {
            Some(s) => (Some(s.id), s.passings),
            None => (None, 0),
        })
    })
    .await?
}

/// Send the open session's passings after `last` (while it is still the client's session).
async fn catch_up(
    write: &mut (impl AsyncWriteExt + Unpin),
    db: &std::path::Path,
    session: Option<i64>,
    last: &mut i64,
) -> anyhow::Result<()> {
    loop {
        let (s, lines) = replay(db.to_path_buf(), *last).await?;
        if s != session || lines.is_empty() {
            return Ok(());
        }
        for (num, text) in lines {
            write.write_all(text.as_bytes()).await?;
            *last = num;
        }
    }
}

/// Lines for the open session's passings after `since`; returns them with the session and last number.
async fn replay(db: PathBuf, since: i64) -> anyhow::Result<(Option<i64>, Vec<(i64, String)>)> {
    tokio::task::spawn_blocking(move || {
        let db = Db::open_readonly(&db)?;
        let Some(session) = db.open_session()? else { return Ok((None, Vec::new())) };
        let rows = db.passings_since(session.id, since, REPLAY_PAGE)?;
        Ok((
            Some(session.id),
            rows.into_iter().map(|p| (p.num_passing, line(p.num_passing, &p.bib, &p.chip, &p.timestamp))).collect(),
        ))
    })
    .await?
}

async fn serve(
    stream: TcpStream,
    mut live: broadcast::Receiver<PassingEvent>,
    db: PathBuf,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    // Where the live stream stands at connection: a client that names no number starts here.
    let (mut session, current) = position(db.clone()).await?;
    let (read, mut write) = stream.into_split();
    let mut hello = String::new();
    let mut reader = BufReader::new(read);
    let since = match tokio::time::timeout(HELLO_WAIT, reader.read_line(&mut hello)).await {
        Ok(Ok(_)) => hello.trim().parse::<i64>().ok(),
        _ => None,
    };
    let mut last = since.unwrap_or(current);
    if since.is_some() {
        catch_up(&mut write, &db, session, &mut last).await?;
    }
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            e = live.recv() => e,
        };
        match event {
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
                write.write_all(line(p.num_passing, &p.bib, &p.chip, &ts).as_bytes()).await?;
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
