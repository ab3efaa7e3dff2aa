//! systemd's file descriptor store: the reader's port outlives the process.
//!
//! Once the port is open, a duplicate of its descriptor goes to the service manager
//! (`FDSTORE=1`, `FDNAME=reader`). When the process is replaced (a crash and the automatic
//! restart, `systemctl restart`, an upgrade that restarts the unit), the port is never closed:
//! bytes the reader sends meanwhile wait in the kernel's buffer, and the next process takes the
//! descriptor back from `LISTEN_FDS` and reads them. A serial port that is closed, by contrast,
//! drops everything that arrives until it is opened again.
//!
//! The unit must allow it (`FileDescriptorStoreMax=`). systemd keeps the store while the unit
//! runs, while it waits to be restarted and while a restart job is queued; it empties it when
//! the unit is stopped (`systemctl stop`), and drops a descriptor that reports a hang-up.
//! Outside systemd every call here does nothing.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use sd_notify::NotifyState;
use tracing::{debug, info};

/// The name of the reader's port in the store.
pub const READER: &str = "reader";

/// Descriptors the service manager handed over at start, by name.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: Vec<(String, OwnedFd)>,
}

impl Inherited {
    /// Take what systemd passed (`LISTEN_FDS`, `LISTEN_FDNAMES`, for this process only). Call
    /// once, early: the descriptors become owned here and are closed when dropped.
    #[allow(unsafe_code)] // descriptors handed over by systemd (LISTEN_FDS) become owned here
    pub fn take() -> Inherited {
        let fds = match sd_notify::listen_fds_with_names() {
            Ok(fds) => fds
                // SAFETY: systemd passed these descriptors to this process (LISTEN_PID is
                // checked) and nothing else in the process owns them.
                .map(|(fd, name)| (name, unsafe { OwnedFd::from_raw_fd(fd) }))
                .collect(),
            Err(e) => {
                debug!(error = %e, "no usable descriptors from the service manager");
                Vec::new()
            }
        };
        if !fds.is_empty() {
            let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
            info!(fds = ?names, "descriptors taken back from systemd");
        }
        Inherited { fds }
    }

    /// The descriptor stored under `name`, if any (the first; any others are dropped from the
    /// store, as a name should be there once).
    pub fn named(&mut self, name: &str) -> Option<OwnedFd> {
        let mut found = None;
        let mut rest = Vec::new();
        for (n, fd) in self.fds.drain(..) {
            if n == name && found.is_none() {
                found = Some(fd);
            } else if n == name {
                drop(fd);
            } else {
                rest.push((n, fd));
            }
        }
        self.fds = rest;
        found
    }

    /// Close what nobody asked for, and drop it from the store: a name this version does not
    /// use would otherwise be handed to every later start.
    pub fn forget_rest(self) {
        for (name, fd) in self.fds {
            info!(name = %name, "dropping a descriptor systemd kept that this version does not use");
            forget(&name);
            drop(fd);
        }
    }
}

/// Keep `fd` in the store under `name`, in place of whatever was stored under that name.
/// Returns whether the service manager took it (false outside systemd).
pub fn keep(name: &str, fd: BorrowedFd<'_>) -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    forget(name);
    match sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd]) {
        Ok(()) => {
            debug!(name, "descriptor kept in systemd's store");
            true
        }
        Err(e) => {
            debug!(name, error = %e, "systemd did not take the descriptor");
            false
        }
    }
}

/// Drop whatever the store holds under `name` (the port is gone, or is not the configured one).
pub fn forget(name: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
    }
}

/// Same device? `fd` is an open character device and `path` (after symlinks) names it.
pub fn is_device(fd: &impl AsFd, path: &str) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(open), Ok(named)) = (nix::sys::stat::fstat(fd.as_fd().as_raw_fd()), nix::sys::stat::stat(path)) else {
        return false;
    };
    let is_char = |mode: libc::mode_t| mode & libc::S_IFMT == libc::S_IFCHR;
    is_char(open.st_mode) && is_char(named.st_mode) && open.st_rdev == named.st_rdev
}
