//! Optional parts: the dashboard and the live feed are welcome, never required. One that cannot
//! listen (the port is taken, the address is not assigned yet at boot) is logged, shown in
//! `status` (what, why, since when) and retried with backoff; the pipeline (reader, store,
//! uplink) never waits for it and never stops because of it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::{ListenFailure, Listening};

/// First retry after this, doubling up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A server bound to its address, ready to run.
pub trait Bound {
    fn local_addr(&self) -> Option<String>;
}

impl Bound for crate::http::HttpServer {
    fn local_addr(&self) -> Option<String> {
        crate::http::HttpServer::local_addr(self)
    }
}

impl Bound for crate::control::ControlServer {
    fn local_addr(&self) -> Option<String> {
        crate::control::ControlServer::local_addr(self)
    }
}

impl Bound for crate::feed::FeedServer {
    fn local_addr(&self) -> Option<String> {
        crate::feed::FeedServer::local_addr(self)
    }
}

/// One optional listener: its name in `status.listening`, its configured address.
pub struct Optional {
    /// `http`, `feed` or `control`.
    pub what: &'static str,
    pub listen: String,
    pub listening: Arc<Mutex<Listening>>,
}

impl Optional {
    /// One attempt, recorded in status either way.
    pub fn bind<S: Bound>(&self, bind: &impl Fn(&str) -> anyhow::Result<S>) -> Option<S> {
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
    pub async fn keep<S, B, R, F>(
        self,
        first: Option<S>,
        bind: B,
        run: R,
        cancel: CancellationToken,
    ) -> anyhow::Result<()>
    where
        S: Bound,
        B: Fn(&str) -> anyhow::Result<S>,
        R: Fn(S, CancellationToken) -> F,
        F: Future<Output = anyhow::Result<()>>,
    {
        let mut next = first;
        let mut delay = RETRY_FIRST;
        loop {
            if let Some(server) = next.take() {
                delay = RETRY_FIRST;
                let outcome = run(server, cancel.clone()).await;
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
                if l.failing.remove(self.what).is_some() {
                    info!(listener = self.what, listen = %self.listen, "listening again");
                }
                l.set_address(self.what, address);
            }
            Err(error) => {
                l.set_address(self.what, None);
                let changed = l.failing.get(self.what).is_none_or(|f| f.error != error);
                if changed {
                    warn!(listener = self.what, listen = %self.listen, error = %error, "cannot listen; retrying (reading, storing and uploading go on)");
                    let since = l
                        .failing
                        .get(self.what)
                        .map(|f| f.since.clone())
                        .unwrap_or_else(|| crate::clock::rfc3339(crate::clock::now_us()));
                    l.failing
                        .insert(self.what.to_string(), ListenFailure { listen: self.listen.clone(), error, since });
                }
            }
        }
    }
}
