//! SIGHUP: re-read and validate the config, apply what can change while running, and say which
//! changed keys wait for a restart. An invalid file changes nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::config::{ApiConfig, Config, Purpose};
use crate::logging::LogHandle;
use crate::store::{Op, StoreHandle, load_bib_map};

pub struct Reloader {
    pub path: PathBuf,
    pub current: Mutex<Config>,
    pub store: StoreHandle,
    pub api: watch::Sender<ApiConfig>,
    pub log: Option<LogHandle>,
    pub wake_uplink: Arc<Notify>,
}

/// The outcome, for the journal and the tests.
#[derive(Debug, PartialEq, Eq)]
pub struct Reloaded {
    pub applied: Vec<&'static str>,
    pub need_restart: Vec<&'static str>,
}

impl Reloader {
    pub async fn reload(&self) -> anyhow::Result<Reloaded> {
        let path = self.path.clone();
        let new = tokio::task::spawn_blocking(move || Config::load(&path, Purpose::Daemon)).await??;
        let old = self.current.lock().map_err(|_| anyhow::anyhow!("config lock poisoned"))?.clone();
        let mut applied = Vec::new();
        let mut need_restart = Vec::new();

        if new.log.level != old.log.level {
            if let Some(log) = &self.log {
                log.set_level(&new.log.level)?;
            }
            applied.push("log.level");
        }
        // The bib map file may have changed even if its path did not: always re-read it.
        let bibs = match &new.passings.bib_map {
            Some(p) => load_bib_map(p)?,
            None => Default::default(),
        };
        self.store
            .call(Op::Reconfigure {
                bibs,
                unmapped: if new.passings.bib_map.is_some() {
                    new.passings.unmapped
                } else {
                    crate::config::Unmapped::Chip
                },
                dedup_window: new.passings.dedup_window,
            })
            .await?;
        applied.push("passings.bib_map");
        if new.passings.dedup_window != old.passings.dedup_window {
            applied.push("passings.dedup_window");
        }
        if new.passings.unmapped != old.passings.unmapped {
            applied.push("passings.unmapped");
        }
        if new.api != old.api {
            self.api.send_replace(new.api.clone());
            self.wake_uplink.notify_one();
            applied.push("api");
        }
        for (section, changed) in [
            ("reader", new.reader != old.reader),
            ("passings.dedup_keep", new.passings.dedup_keep != old.passings.dedup_keep),
            ("passings.chip_encoding", new.passings.chip_encoding != old.passings.chip_encoding),
            ("session", new.session != old.session),
            ("clock", new.clock != old.clock),
            ("storage", new.storage != old.storage),
            ("control", new.control != old.control),
            ("http", new.http != old.http),
            ("feed", new.feed != old.feed),
            ("log.target", new.log.target != old.log.target),
        ] {
            if changed {
                need_restart.push(section);
            }
        }
        // What needs a restart keeps its old value until then.
        let mut kept = old;
        kept.api = new.api;
        kept.log.level = new.log.level;
        kept.passings.bib_map = new.passings.bib_map;
        kept.passings.dedup_window = new.passings.dedup_window;
        kept.passings.unmapped = new.passings.unmapped;
        *self.current.lock().map_err(|_| anyhow::anyhow!("config lock poisoned"))? = kept;
        Ok(Reloaded { applied, need_restart })
    }

    /// Reload, log the outcome, and keep running whatever happens.
    pub async fn reload_and_report(&self) {
        match self.reload().await {
            Ok(r) if r.need_restart.is_empty() => info!(applied = ?r.applied, "configuration reloaded"),
            Ok(r) => warn!(
                applied = ?r.applied,
                need_restart = ?r.need_restart,
                "configuration reloaded; these changes take effect after `systemctl restart rufus-gateway`"
            ),
            Err(e) => {
                error!(error = %format!("{e:#}"), "configuration NOT reloaded: the new file is invalid; still running with the old one")
            }
        }
    }
}
