//! The control socket: one JSON request per line, one JSON answer per line. The CLI's `status`
//! and `session start|close` talk to the daemon through it.
//!
//! Who may use it: root and the `rufus-gateway` group (mode 0660 in a 0750 directory), which can
//! read status and start and close sessions. Bounds: a request is one line of at most
//! [`REQUEST_MAX`] bytes that must arrive within [`REQUEST_WAIT`]; at most
//! [`CONTROL_CONNECTIONS`] clients at once; only a socket is ever replaced at its path.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::UnixListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::alias_or_default;
use crate::limits::{AcceptPause, CONTROL_CONNECTIONS, ConnectionCap, WATCHERS};
use crate::status::StatusSource;
use crate::store::query::Db;
use crate::store::{Op, ReadEvent, StoreHandle};

/// The daemon is not running or not reachable: exit 69 (`EX_UNAVAILABLE`).
#[derive(Debug, thiserror::Error)]
#[error(
    "the daemon is not running or not reachable at {socket} ({reason}); start it with `sudo systemctl start rufus-gateway` (or `rufus-gateway run` in a terminal)"
)]
pub struct NotRunning {
    pub socket: String,
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    SessionStart {
        alias: Option<String>,
        /// A test session (chip check), never sent to RUFUS.
        #[serde(default)]
        test: bool,
    },
    SessionClose,
    SessionResend {
        alias: Option<String>,
    },
    /// Stream the reads as they are committed (`rufus-gateway watch`): after the answer, one
    /// JSON object per line until the client leaves.
    Watch,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The longest request line: requests are a few dozen bytes, an alias at most 64 characters.
pub const REQUEST_MAX: usize = 4096;
/// How long a client has to send its request.
pub const REQUEST_WAIT: Duration = Duration::from_secs(5);
/// How long an answer may wait on a client that does not read it.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    store: StoreHandle,
    status: StatusSource,
    default_alias: String,
    cap: ConnectionCap,
    /// Slots for `watch` clients (inside `cap`).
    watchers: Arc<tokio::sync::Semaphore>,
    /// The store's read events, for `watch`.
    reads: broadcast::Sender<Arc<ReadEvent>>,
}

/// The answer to a client the cap refuses: it is told, rather than hung up on (the command line
/// then says "busy", not "not running").
const BUSY: &[u8] = b"{\"ok\":false,\"error\":\"busy: too many clients of the control socket; try again\"}\n";

impl ControlServer {
    /// The path's local address, for `status.listening.control`.
    pub fn local_addr(&self) -> Option<String> {
        Some(self.path.display().to_string())
    }

    /// Bind now (so readiness means the socket answers). A stale socket is replaced; anything
    /// else at the path (a regular file, a directory) is left alone and refused.
    pub fn bind(
        path: &Path,
        store: StoreHandle,
        status: StatusSource,
        default_alias: String,
        reads: broadcast::Sender<Arc<ReadEvent>>,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    anyhow::bail!("another rufus-gateway is already running with control socket {}", path.display());
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => anyhow::bail!(
                "{} exists and is not a socket; it is left alone: remove it or set control.socket to another path",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        let cap = ConnectionCap::new(crate::status::Listener::Control, CONTROL_CONNECTIONS, status.listening.clone());
        let watchers = Arc::new(tokio::sync::Semaphore::new(WATCHERS));
        Ok(Self { listener, path: path.to_path_buf(), store, status, default_alias, cap, watchers, reads })
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut pause = AcceptPause::new(crate::status::Listener::Control);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = self.listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => { pause.accepted(); stream }
                        Err(e) => { pause.failed(&e).await; continue; }
                    };
                    let Some(slot) = self.cap.admit() else {
                        // A fresh socket's buffer is empty: this never waits (and a client that
                        // cannot take a line this short gets nothing).
                        let _ = stream.try_write(BUSY);
                        continue;
                    };
                    let store = self.store.clone();
                    let status = self.status.clone();
                    let alias = self.default_alias.clone();
                    let reads = self.reads.clone();
                    let watchers = self.watchers.clone();
                    let cancel = cancel.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = serve(stream, &store, &status, &alias, &reads, &watchers) => {}
                        }
                    });
                }
            }
        }
        // Only our own socket is removed: the path may hold another process's by now.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.path);
        }
        Ok(())
    }
}

/// One client: one bounded request line within its deadline, one answer (then, for `watch`,
/// the stream of reads until the client leaves).
async fn serve(
    stream: tokio::net::UnixStream,
    store: &StoreHandle,
    status: &StatusSource,
    alias: &str,
    reads: &broadcast::Sender<Arc<ReadEvent>>,
    watchers: &Arc<tokio::sync::Semaphore>,
) {
    let (read, mut write) = stream.into_split();
    let mut read = AsyncBufReader::with_capacity(1024, read);
    let response = match tokio::time::timeout(REQUEST_WAIT, crate::limits::read_line(&mut read, REQUEST_MAX)).await {
        Ok(Ok(Some(line))) => match std::str::from_utf8(&line) {
            Ok(line) if is_watch(line) => {
                let Ok(_watching) = watchers.clone().try_acquire_owned() else {
                    let busy = refusal(format!(
                        "busy: {WATCHERS} watchers already follow the reads; try again when one leaves"
                    ));
                    let mut text = serde_json::to_string(&busy).unwrap_or_default();
                    text.push('\n');
                    let _ = tokio::time::timeout(ANSWER_WAIT, write.write_all(text.as_bytes())).await;
                    return;
                };
                // Subscribed before answering: nothing committed after the answer is missed.
                let live = reads.subscribe();
                let ok = Response { ok: true, result: Some(serde_json::json!({ "watching": true })), error: None };
                let mut text = serde_json::to_string(&ok).unwrap_or_default();
                text.push('\n');
                if !matches!(tokio::time::timeout(ANSWER_WAIT, write.write_all(text.as_bytes())).await, Ok(Ok(()))) {
                    return;
                }
                info!("a watcher follows the reads");
                // Ends when the watcher leaves (a write fails) or stalls; the reader half is
                // watched too, so one that leaves while nothing is read frees its slot now.
                let mut leaving = [0u8; 64];
                tokio::select! {
                    result = crate::watch::serve(&mut write, live) => {
                        if let Err(e) = result {
                            info!(reason = %e, "a watcher left");
                        }
                    }
                    _ = async { while matches!(read.read(&mut leaving).await, Ok(n) if n > 0) {} } => {}
                }
                return;
            }
            Ok(line) => handle(line, store, status, alias).await,
            Err(_) => refusal("bad request: not UTF-8".into()),
        },
        Ok(Ok(None)) => return,
        Ok(Err(e)) => refusal(format!("bad request: {e}")),
        Err(_) => refusal(format!("bad request: no request line within {REQUEST_WAIT:?}")),
    };
    let mut text = serde_json::to_string(&response).unwrap_or_default();
    text.push('\n');
    let _ = tokio::time::timeout(ANSWER_WAIT, write.write_all(text.as_bytes())).await;
}

fn is_watch(line: &str) -> bool {
    matches!(serde_json::from_str::<Request>(line), Ok(Request::Watch))
}

fn refusal(error: String) -> Response {
    Response { ok: false, result: None, error: Some(error) }
}

/// Whether a gateway answers on this socket already (a second one must not start).
pub fn another_running(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) && UnixStream::connect(path).is_ok()
}

async fn handle(line: &str, store: &StoreHandle, status: &StatusSource, default_alias: &str) -> Response {
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return Response { ok: false, result: None, error: Some(format!("bad request: {e}")) },
    };
    let result: anyhow::Result<Value> = async {
        match request {
            Request::Status => {
                let source = status.clone();
                let s = tokio::task::spawn_blocking(move || source.snapshot()).await??;
                Ok(serde_json::to_value(s)?)
            }
            Request::SessionStart { alias, test } => {
                let alias = alias_or_default(alias.as_deref(), default_alias).map_err(anyhow::Error::msg)?;
                let id = store.call(Op::StartSession { alias: alias.clone(), test }).await?.unwrap_or_default();
                info!(session_id = id, alias = %alias, test, "session started from the control socket");
                session_value(status, id).await
            }
            Request::SessionResend { alias } => {
                let alias = alias_or_default(alias.as_deref(), default_alias).map_err(anyhow::Error::msg)?;
                let id = store.call(Op::Resend { alias }).await?.unwrap_or_default();
                session_value(status, id).await
            }
            Request::SessionClose => {
                let id = store.call(Op::CloseSession).await?.unwrap_or_default();
                session_value(status, id).await
            }
            Request::Watch => anyhow::bail!("watch is answered by the stream"),
        }
    }
    .await;
    match result {
        Ok(v) => Response { ok: true, result: Some(v), error: None },
        Err(e) => Response { ok: false, result: None, error: Some(format!("{e:#}")) },
    }
}

async fn session_value(status: &StatusSource, id: i64) -> anyhow::Result<Value> {
    let path = status.db_path.clone();
    let row = tokio::task::spawn_blocking(move || Db::open_readonly(&path)?.session(id)).await??;
    Ok(serde_json::to_value(row)?)
}

/// `rufus-gateway watch`: ask the daemon to be watched and print what comes until it stops
/// (the daemon side is [`crate::watch::serve`]).
pub fn watch(socket: &Path, json: bool) -> anyhow::Result<()> {
    let not_running = |e: std::io::Error| NotRunning { socket: socket.display().to_string(), reason: e.to_string() };
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(not_running)?;
    let mut request = serde_json::to_string(&Request::Watch)?;
    request.push('\n');
    // As in `request`: a "busy" said before the request was written is still read.
    let written = stream.write_all(request.as_bytes());
    let mut lines = BufReader::new(stream);
    let mut first = String::new();
    let read = lines.read_line(&mut first);
    if first.is_empty() {
        return Err(
            not_running(written.err().or(read.err()).unwrap_or_else(|| std::io::Error::other("no answer"))).into()
        );
    }
    let response: Response = serde_json::from_str(&first)
        .map_err(|_| NotRunning { socket: socket.display().to_string(), reason: "no answer".into() })?;
    if !response.ok {
        anyhow::bail!(response.error.unwrap_or_else(|| "the daemon refused to be watched".into()));
    }
    if !json {
        eprintln!("watching the reads (Ctrl-C to stop); a summary every {} s", crate::watch::SUMMARY_EVERY.as_secs());
    }
    let stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).map_err(not_running)? == 0 {
            return Err(NotRunning { socket: socket.display().to_string(), reason: "the daemon stopped".into() }.into());
        }
        let mut out = stdout.lock();
        let written = if json {
            out.write_all(line.as_bytes())
        } else {
            match serde_json::from_str::<crate::watch::Line>(&line) {
                Ok(parsed) => writeln!(out, "{}", crate::watch::human(&parsed)),
                Err(_) => continue,
            }
        };
        // A closed pipe (`watch | head`) ends the watch quietly.
        if written.and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
    }
}

/// CLI side: send one request, wait for the answer.
pub fn request(socket: &Path, request: &Request) -> anyhow::Result<Value> {
    let not_running = |e: std::io::Error| NotRunning { socket: socket.display().to_string(), reason: e.to_string() };
    let mut stream = UnixStream::connect(socket).map_err(not_running)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    if line.len() > REQUEST_MAX {
        anyhow::bail!("the request is longer than the daemon takes ({REQUEST_MAX} bytes): is the alias that long?");
    }
    line.push('\n');
    // A daemon too busy to serve answers "busy" at once and hangs up, maybe before the request
    // is written: what it said is read even when the write failed.
    let written = stream.write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        let reason = match (written, read) {
            (Err(e), _) | (Ok(()), Err(e)) => e.to_string(),
            (Ok(()), Ok(_)) => "no answer".into(),
        };
        return Err(NotRunning { socket: socket.display().to_string(), reason }.into());
    }
    let response: Response = serde_json::from_str(&answer)?;
    if response.ok {
        Ok(response.result.unwrap_or(Value::Null))
    } else {
        anyhow::bail!(response.error.unwrap_or_else(|| "the daemon refused the request".into()))
    }
}
