//! Optional parts: the dashboard and the live feed are welcome, never required. One that cannot
//! listen (the port is taken, the address is not assigned yet at boot) is logged, shown in
//! `status` (what, why, since when) and retried with backoff; the pipeline (reader, store,
//! uplink) never waits for it and never stops because of it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::{ListenFailure, Listener, Listening};

/// First retry after this, doubling up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A server bound to its address, ready to run.
pub trait Server: Send + 'static {
    fn local_addr(&self) -> Option<String>;
    fn run(self, cancel: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send;
}

impl Server for crate::http::HttpServer {
    fn local_addr(&self) -> Option<String> {
        crate::http::HttpServer::local_addr(self)
    }
    fn run(self, cancel: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send {
        crate::http::HttpServer::run(self, cancel)
    }
}

impl Server for crate::control::ControlServer {
    fn local_addr(&self) -> Option<String> {
        crate::control::ControlServer::local_addr(self)
    }
    fn run(self, cancel: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send {
        crate::control::ControlServer::run(self, cancel)
    }
}

impl Server for crate::feed::FeedServer {
    fn local_addr(&self) -> Option<String> {
        crate::feed::FeedServer::local_addr(self)
    }
    fn run(self, cancel: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send {
        crate::feed::FeedServer::run(self, cancel)
    }
}

/// The actors' join set: each task ends with its name and how it ended.
pub type Tasks = tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>;

/// Start a listener: bind at once (so `status` says at start whether it listens), then serve it
/// in `tasks`, binding again whenever binding failed or the server stopped, until cancelled.
pub fn start<S: Server>(
    tasks: &mut Tasks,
    what: Listener,
    listen: String,
    listening: Arc<Mutex<Listening>>,
    bind: impl Fn(&str) -> anyhow::Result<S> + Send + 'static,
    cancel: CancellationToken,
) {
    let listener = Optional { what, listen, listening };
    let first = listener.bind(&bind);
    tasks.spawn(async move { (what.as_str(), listener.keep(first, bind, cancel).await) });
}

/// One listener: its name in `status.listening`, its configured address.
struct Optional {
    what: Listener,
    listen: String,
    listening: Arc<Mutex<Listening>>,
}

impl Optional {
    /// One attempt, recorded in status either way.
    fn bind<S: Server>(&self, bind: &impl Fn(&str) -> anyhow::Result<S>) -> Option<S> {
        match bind(&self.listen) {
            Ok(server) => {
                self.record(Ok(server.local_addr()));
                Some(server)
            }
            Err(e) => {
                self.record(Err(format!("{e:#}")));
                None
            }
        }
    }

    /// Serve, and bind again whenever binding failed or the server stopped, until cancelled.
    /// Never returns an error: nothing here may stop the gateway.
    async fn keep<S: Server>(
        self,
        first: Option<S>,
        bind: impl Fn(&str) -> anyhow::Result<S>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut next = first;
        let mut delay = RETRY_FIRST;
        loop {
            if let Some(server) = next.take() {
                delay = RETRY_FIRST;
                let outcome = server.run(cancel.clone()).await;
                if cancel.is_cancelled() {
                    return Ok(());
                }
                let why = match outcome {
                    Ok(()) => "stopped".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                self.record(Err(why));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
            next = self.bind(&bind);
        }
    }

    fn record(&self, outcome: Result<Option<String>, String>) {
        let Ok(mut l) = self.listening.lock() else { return };
        match outcome {
            Ok(address) => {
                if l.failing.remove(self.what.as_str()).is_some() {
                    info!(listener = self.what.as_str(), listen = %self.listen, "listening again");
                }
                l.set_address(self.what, address);
            }
            Err(error) => {
                l.set_address(self.what, None);
                let changed = l.failing.get(self.what.as_str()).is_none_or(|f| f.error != error);
                if changed {
                    warn!(listener = self.what.as_str(), listen = %self.listen, error = %error, "cannot listen; retrying (reading, storing and uploading go on)");
                    let since = l
                        .failing
                        .get(self.what.as_str())
                        .map(|f| f.since.clone())
                        .unwrap_or_else(|| crate::clock::rfc3339(crate::clock::now_us()));
                    l.failing
                        .insert(self.what.as_str().to_string(), ListenFailure { listen: self.listen.clone(), error, since });
                }
            }
        }
    }
}
