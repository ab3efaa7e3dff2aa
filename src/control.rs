//! The control socket: one JSON request per line, one JSON answer per line. The CLI's `status`
//! and `session start|close` talk to the daemon through it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::StatusSource;
use crate::store::query::Db;
use crate::store::{Op, StoreHandle};

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
    SessionStart { alias: Option<String> },
    SessionClose,
    SessionResend { alias: Option<String> },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    store: StoreHandle,
    status: StatusSource,
    default_alias: String,
}

impl ControlServer {
    /// Bind now (so readiness means the socket answers). A stale socket file is replaced.
    pub fn bind(path: &Path, store: StoreHandle, status: StatusSource, default_alias: String) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                anyhow::bail!("another rufus-gateway is already running with control socket {}", path.display());
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        Ok(Self { listener, path: path.to_path_buf(), store, status, default_alias })
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = self.listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(s) => s,
                        Err(e) => { warn!(error = %e, "control socket accept failed"); continue; }
                    };
                    let store = self.store.clone();
                    let status = self.status.clone();
                    let alias = self.default_alias.clone();
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        let mut lines = AsyncBufReader::new(read).lines();
                        if let Ok(Some(line)) = lines.next_line().await {
                            let response = handle(&line, &store, &status, &alias).await;
                            let mut text = serde_json::to_string(&response).unwrap_or_default();
                            text.push('\n');
                            let _ = write.write_all(text.as_bytes()).await;
                        }
                    });
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
        Ok(())
    }
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
            Request::SessionStart { alias } => {
                let alias = alias.filter(|a| !a.trim().is_empty()).unwrap_or_else(|| default_alias.to_string());
                let id = store.call(Op::StartSession { alias: alias.clone() }).await?.unwrap_or_default();
                info!(session_id = id, alias = %alias, "session started from the control socket");
                session_value(status, id).await
            }
            Request::SessionResend { alias } => {
                let alias = alias.filter(|a| !a.trim().is_empty()).unwrap_or_else(|| default_alias.to_string());
                let id = store.call(Op::Resend { alias }).await?.unwrap_or_default();
                session_value(status, id).await
            }
            Request::SessionClose => {
                let id = store.call(Op::CloseSession).await?.unwrap_or_default();
                session_value(status, id).await
            }
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

/// CLI side: send one request, wait for the answer.
pub fn request(socket: &Path, request: &Request) -> anyhow::Result<Value> {
    let not_running = |e: std::io::Error| NotRunning { socket: socket.display().to_string(), reason: e.to_string() };
    let mut stream = UnixStream::connect(socket).map_err(not_running)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(not_running)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(not_running)?;
    if answer.is_empty() {
        return Err(NotRunning { socket: socket.display().to_string(), reason: "no answer".into() }.into());
    }
    let response: Response = serde_json::from_str(&answer)?;
    if response.ok {
        Ok(response.result.unwrap_or(Value::Null))
    } else {
        anyhow::bail!(response.error.unwrap_or_else(|| "the daemon refused the request".into()))
    }
}
