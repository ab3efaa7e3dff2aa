//! Logging: journald (structured fields kept) when running under systemd, else stderr.

use std::os::fd::AsRawFd;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::config::{LogConfig, LogTarget};

pub fn init(cfg: &LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&cfg.level)?;
    let journald = match cfg.target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => stderr_is_journal(),
    };
    if journald {
        let layer = tracing_journald::layer()?.with_syslog_identifier("rufus-gateway".into());
        tracing_subscriber::registry().with(filter).with(layer).try_init()?;
    } else {
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
        tracing_subscriber::registry().with(filter).with(fmt).try_init()?;
    }
    Ok(())
}

/// systemd sets `JOURNAL_STREAM=dev:inode` when stderr is connected to the journal.
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.split_once(':') else { return false };
    match nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) {
        Ok(st) => dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino),
        Err(_) => false,
    }
}
