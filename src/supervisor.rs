//! Signals and systemd: SIGTERM/SIGINT stop the gateway gracefully; SIGHUP reloads the config
//! between `RELOADING=1` and `READY=1`.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

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
                let now = sd_notify::NotifyState::monotonic_usec_now().unwrap_or(sd_notify::NotifyState::MonotonicUsec(0));
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
