//! Logging: journald (structured fields kept) when running under systemd, else stderr. The level
//! can be changed while running (SIGHUP).

use std::os::fd::AsRawFd;

use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogTarget};

/// Changes the log level of the running process.
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    pub fn set_level(&self, level: &str) -> anyhow::Result<()> {
        self.0.reload(EnvFilter::try_new(level)?)?;
        Ok(())
    }
}

pub fn init(cfg: &LogConfig) -> anyhow::Result<LogHandle> {
    let (filter, handle) = reload::Layer::new(EnvFilter::try_new(&cfg.level)?);
    let journald = match cfg.target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => stderr_is_journal(),
    };
    // Asked for journald but none answers (a stale socket, a container): log to stderr rather
    // than refuse to start.
    let journald = journald && {
        let alive =
            std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect("/run/systemd/journal/socket")).is_ok();
        if !alive {
            eprintln!("rufus-gateway: journald is not reachable; logging to stderr");
        }
        alive
    };
    if journald {
        // No field prefix: `journalctl -u rufus-gateway SESSION_ID=4` works as an operator expects.
        use tracing_journald::{Priority, PriorityMappings};
        // Syslog's meaning of the levels (tracing-journald would log info as "notice").
        let priorities = PriorityMappings {
            error: Priority::Error,
            warn: Priority::Warning,
            info: Priority::Informational,
            debug: Priority::Debug,
            trace: Priority::Debug,
        };
        let layer = tracing_journald::layer()?
            .with_syslog_identifier("rufus-gateway".into())
            .with_field_prefix(None)
            .with_priority_mappings(priorities);
        tracing_subscriber::registry().with(filter).with(layer).try_init()?;
    } else {
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
        tracing_subscriber::registry().with(filter).with(fmt).try_init()?;
    }
    Ok(LogHandle(handle))
}

/// systemd sets `JOURNAL_STREAM=dev:inode` when stderr is connected to the journal.
#[allow(clippy::useless_conversion)] // the inode number is 32 bits wide on 32-bit ARM
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.split_once(':') else { return false };
    match nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) {
        Ok(st) => {
            dev.parse::<u64>().ok() == Some(u64::from(st.st_dev))
                && ino.parse::<u64>().ok() == Some(u64::from(st.st_ino))
        }
        Err(_) => false,
    }
}
