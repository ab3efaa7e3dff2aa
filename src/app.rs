//! Wiring: the one place that creates the channels and starts the actors (reader and store on
//! threads of their own, uplink and control socket as tasks), and the one place that stops them.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use std::path::PathBuf;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::ClockWatch;
use crate::config::Config;
use crate::control::ControlServer;
use crate::feed::FeedServer;
use crate::http::{HttpOptions, HttpServer};
use crate::logging::LogHandle;
use crate::optional::{self, Tasks};
use crate::status::Listener;
use crate::reader::{Reader, ReaderStats};
use crate::reload::Reloader;
use crate::signal::{Event as SignalEvent, Signal};
use crate::status::StatusSource;
use crate::store::{Live, Store, StoreParts, StoreStats};
use crate::uplink::{Uplink, UplinkStatus};

/// Reads waiting for the store: far more than a mass start produces within one commit interval
/// (the store takes a thousand per commit). The channel's slots are allocated and written up
/// front: a read goes boxed, so a slot is 16 bytes (64 KB in all), not the 200 of a read (800 KB
/// resident from the start, measured).
const READ_QUEUE: usize = 4096;
/// How often systemd's `STATUS=` line is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// A started gateway: its handles, and the way to stop it.
pub struct Running {
    pub cancel: CancellationToken,
    /// Passings and (while watched) reads, as they are committed.
    pub live: Live,
    pub status: StatusSource,
    tasks: Tasks,
    reader: JoinHandle<anyhow::Result<()>>,
    store: JoinHandle<anyhow::Result<()>>,
    signal: Option<Signal>,
    backup_stop: Arc<std::sync::atomic::AtomicBool>,
}

/// How the gateway was started: what a reload needs, and whether signals are ours to handle.
#[derive(Default)]
pub struct Options {
    /// The config file, re-read on SIGHUP.
    pub config_path: Option<PathBuf>,
    pub log: Option<LogHandle>,
    /// Handle SIGTERM/SIGINT/SIGHUP (the daemon does; the demo leaves Ctrl-C alone).
    pub signals: bool,
    /// The reader's port as a previous process left it in systemd's descriptor store.
    pub kept_port: Option<std::os::fd::OwnedFd>,
}

/// What the store holds from the reader, for a rewind (nothing to recall when rewinds are off).
fn recall(cfg: &Config) -> crate::reader::talk::Recall {
    if !cfg.reader.rewind {
        return Default::default();
    }
    // Replayed reads come in among live ones: the last few hundred hold the last live one.
    let max_skew_us = i64::try_from(cfg.reader.max_skew.as_micros()).unwrap_or(i64::MAX);
    match crate::store::query::Db::open_readonly(&cfg.storage.path).and_then(|db| db.last_reads(500)) {
        Ok(rows) => crate::reader::talk::Recall::from_reads(&rows, max_skew_us),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell what the store holds from the reader; no rewind at the first connect");
            Default::default()
        }
    }
}

/// Start every actor. Returns once the store is open, the reader started and the socket bound.
pub fn start(cfg: &Config, options: Options, cancel: CancellationToken) -> anyhow::Result<Running> {
    // A second gateway on the same control socket is refused before it touches anything: it
    // opened the database (and, with `session.auto_start`, a session) and the reader before.
    if crate::control::another_running(&cfg.control.socket) {
        anyhow::bail!(
            "control.socket: another rufus-gateway is already running with control socket {}",
            cfg.control.socket.display()
        );
    }
    let reader_stats = Arc::new(ReaderStats::default());
    let store_stats = Arc::new(StoreStats::default());
    let uplink_status = Arc::new(Mutex::new(UplinkStatus::default()));
    let notify = Arc::new(Notify::new());
    let live = Live::new();
    let events = live.passings.clone();
    let (reads_tx, reads_rx) = crossbeam_channel::bounded(READ_QUEUE);

    let StoreParts { store, handle } = Store::open(cfg, reads_rx, notify.clone(), live.clone(), store_stats.clone())?;
    let store_stats_live = store_stats.live.clone();
    let reader_live = reader_stats.live.clone();
    let store = std::thread::Builder::new().name("store".into()).spawn(move || store.run())?;

    let reader =
        Reader::new(cfg, reads_tx, reader_stats.clone())?.with_kept_port(options.kept_port).with_recall(recall(cfg));
    let reader_cancel = cancel.clone();
    let reader = std::thread::Builder::new().name("reader".into()).spawn(move || reader.run(reader_cancel))?;

    let status = StatusSource {
        port: cfg.reader.port.clone().unwrap_or_default(),
        db_path: cfg.storage.path.clone(),
        reader: reader_stats,
        store: store_stats,
        uplink: uplink_status.clone(),
        clock: ClockWatch::new(&cfg.clock),
        listening: Arc::default(),
        signal: Arc::default(),
        backup: cfg.backup.dir.is_some().then(Arc::default),
    };
    let (api_tx, api_rx) = watch::channel(cfg.api.clone());
    let reloader = options.config_path.map(|path| Reloader {
        path,
        current: Mutex::new(cfg.clone()),
        store: handle.clone(),
        api: api_tx,
        log: options.log,
        wake_uplink: notify.clone(),
    });
    let uplink = Uplink::new(cfg, api_rx, handle.clone(), notify, uplink_status)?;
    let uplink_live = uplink.live.clone();

    let mut tasks = Tasks::new();
    // The control socket: anything that stops it binding (a stray file at its path) is reported
    // and retried like the optional listeners, and the pipeline goes on.
    {
        let (h, s, alias, path, reads) =
            (handle.clone(), status.clone(), cfg.session.alias.clone(), cfg.control.socket.clone(), live.reads.clone());
        let bind = move |_: &str| ControlServer::bind(&path, h.clone(), s.clone(), alias.clone(), reads.clone());
        let listen = cfg.control.socket.display().to_string();
        optional::start(&mut tasks, Listener::Control, listen, status.listening.clone(), bind, cancel.clone());
    }
    let c = cancel.clone();
    tasks.spawn(async move { ("uplink", uplink.run(c).await) });
    let c = cancel.clone();
    let s = status.clone();
    tasks.spawn(async move { ("status", report_status(s, c).await) });
    // Optional listeners: one that cannot bind is reported and retried; the pipeline goes on.
    if let Some(listen) = cfg.http.listen.clone() {
        let options = HttpOptions {
            token: cfg.http.token.clone(),
            hosts: cfg.http.hosts.clone(),
            default_alias: cfg.session.alias.clone(),
            bibs: live.bibs.clone(),
        };
        let (s, h, cap) = (status.clone(), handle.clone(), HttpServer::cap(status.listening.clone()));
        let bind = move |addr: &str| HttpServer::bind(addr, &options, s.clone(), h.clone(), cap.clone());
        optional::start(&mut tasks, Listener::Http, listen, status.listening.clone(), bind, cancel.clone());
    }
    if let Some(listen) = cfg.feed.listen.clone() {
        let (events, db, cap) = (events.clone(), cfg.storage.path.clone(), FeedServer::cap(status.listening.clone()));
        let bind = move |addr: &str| FeedServer::bind(addr, events.clone(), db.clone(), cap.clone());
        optional::start(&mut tasks, Listener::Feed, listen, status.listening.clone(), bind, cancel.clone());
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let c = cancel.clone();
        let actors = crate::supervisor::Actors { reader: reader_live, store: store_stats_live, uplink: uplink_live };
        tasks.spawn(async move { ("watchdog", crate::supervisor::watchdog(interval, actors, c).await) });
    }
    if options.signals {
        let c = cancel.clone();
        tasks.spawn(async move { ("signals", crate::supervisor::watch_signals(c, reloader).await) });
    }
    // The USB stick backup: optional, on a thread of its own that nothing waits for (a hung
    // stick leaves only that thread stuck; it is not joined at a stop).
    let backup_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(backup) =
        status.backup.clone().and_then(|b| crate::backup::Backup::new(&cfg.backup, &cfg.storage.path, b))
    {
        let stop = backup_stop.clone();
        if let Err(e) = std::thread::Builder::new().name("backup".into()).spawn(move || backup.run(stop)) {
            warn!(error = %e, "cannot start the USB backup; carrying on without it");
        }
    }
    // The LED and beeper: optional, on a thread of their own; a device that cannot be driven is
    // reported, never a stop.
    let source = status.clone();
    let signal = match Signal::start(
        &cfg.signal,
        move || source.snapshot().ok().map(|s| s.health(chrono::Utc::now())),
        status.signal.clone(),
    ) {
        Ok(signal) => signal,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot start the LED and beeper; carrying on without them");
            None
        }
    };
    if let Some(signal) = &signal {
        let (tx, mut passings, c) = (signal.sender(), live.passings.subscribe(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    event = passings.recv() => match event {
                        // A full queue drops the blip, never waits.
                        Ok(p) => { let _ = tx.try_send(SignalEvent::Passing { test: p.test }); }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
    }
    Ok(Running { cancel, live, status, tasks, reader, store, signal, backup_stop })
}

impl Running {
    /// Run until cancelled or until an actor fails; then stop everything in order: the uplink
    /// finishes its request in flight, the reader stops, the store commits what it holds.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut failure: Option<anyhow::Error> = None;
        while let Some(joined) = self.tasks.join_next().await {
            let (name, result) = joined.unwrap_or_else(|e| ("task", Err(anyhow::anyhow!("panicked: {e}"))));
            if let Err(e) = result {
                error!(actor = name, error = %format!("{e:#}"), "actor failed; stopping");
                failure.get_or_insert(e.context(format!("{name} failed")));
            }
            self.cancel.cancel();
        }
        let reader = tokio::task::spawn_blocking(move || self.reader.join()).await?;
        if let Ok(Err(e)) | Err(e) = reader.map_err(|_| anyhow::anyhow!("reader thread panicked")) {
            warn!(error = %format!("{e:#}"), "reader stopped with an error");
        }
        // Every sender is gone now: the store drains, commits and returns.
        let store = tokio::task::spawn_blocking(move || self.store.join()).await?;
        self.backup_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Off, and the LED's own trigger given back.
        if let Some(signal) = self.signal.take() {
            let _ = tokio::task::spawn_blocking(move || signal.stop()).await;
        }
        match store {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some(anyhow::anyhow!("store thread panicked"))),
        }
        match failure {
            None => {
                info!("stopped cleanly");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

/// Keep systemd's one-line `STATUS=` current.
async fn report_status(source: StatusSource, cancel: CancellationToken) -> anyhow::Result<()> {
    loop {
        let s = source.clone();
        if let Ok(Ok(status)) = tokio::task::spawn_blocking(move || s.snapshot()).await {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status.one_line())]);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(STATUS_INTERVAL) => {}
        }
    }
}
