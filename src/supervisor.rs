//! Signals and systemd: SIGTERM/SIGINT stop the gateway gracefully; SIGHUP reloads the config
//! between `RELOADING=1` and `READY=1`.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::liveness::Liveness;
use crate::reload::Reloader;

/// Runs until a stop signal arrives (then cancels everything) or until cancelled.
pub async fn watch_signals(cancel: CancellationToken, reloader: Option<Reloader>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = term.recv() => { info!(signal = "SIGTERM", "stopping"); break; }
            _ = int.recv() => { info!(signal = "SIGINT", "stopping"); break; }
            _ = hup.recv() => {
                let Some(reloader) = &reloader else { continue };
                // Not sd-notify's `monotonic_usec_now`: it multiplies a 32-bit `time_t` on 32-bit
                // ARM, which overflows after 36 minutes of uptime (a panic, or a wrong value).
                let now = sd_notify::NotifyState::MonotonicUsec(i128::from(crate::clock::monotonic_us()));
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading, now]);
                info!(signal = "SIGHUP", "reloading the configuration");
                reloader.reload_and_report().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    cancel.cancel();
    Ok(())
}

/// The actors whose progress the watchdog checks.
pub struct Actors {
    /// The reader thread: a write to a reader that stopped reading, or any other wait that does
    /// not end, withholds the ping (systemd restarts the service; the reader's port is kept in
    /// its descriptor store, so nothing the reader sent meanwhile is lost).
    pub reader: Arc<Liveness>,
    pub store: Arc<Liveness>,
    pub uplink: Arc<Liveness>,
}

/// `WATCHDOG=1` at half the interval systemd asked for, only while the reader thread, the store
/// writer and the uplink keep their promises.
pub async fn watchdog(interval: Duration, actors: Actors, cancel: CancellationToken) -> anyhow::Result<()> {
    let grace = interval / 2;
    let mut reported = false;
    loop {
        let stuck: Vec<&str> = [("reader", &actors.reader), ("store", &actors.store), ("uplink", &actors.uplink)]
            .into_iter()
            .filter(|(_, l)| !l.alive(grace))
            .map(|(n, _)| n)
            .collect();
        if stuck.is_empty() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            reported = false;
        } else if !reported {
            error!(stuck = ?stuck, "an actor stopped making progress; withholding the watchdog ping so systemd restarts the service");
            reported = true;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval / 2) => {}
        }
    }
}
