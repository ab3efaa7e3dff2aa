//! Pseudo-terminals: a stand-in serial port for the demo and the tests.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::Context;

/// The master side of a pseudo-terminal; `path` is the slave device the gateway opens as its port.
pub struct Pty {
    master: File,
    pub path: PathBuf,
}

impl Pty {
    /// A raw-mode pty. The slave is closed again at once: writes to the master are buffered by
    /// the kernel (about 16 KiB, then they block) until the gateway opens the slave.
    #[allow(unsafe_code)] // nix 0.26 openpty returns raw descriptors
    pub fn open() -> anyhow::Result<Pty> {
        let pair = nix::pty::openpty(None, None).context("openpty")?;
        // SAFETY: openpty just returned these descriptors; each is owned exactly once here.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(pair.master), OwnedFd::from_raw_fd(pair.slave)) };
        // Not inherited by processes we start: a gateway holding our master would never see a hang-up.
        for fd in [&master, &slave] {
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        }
        let mut attrs = nix::sys::termios::tcgetattr(slave.as_raw_fd())?;
        nix::sys::termios::cfmakeraw(&mut attrs);
        nix::sys::termios::tcsetattr(slave.as_raw_fd(), nix::sys::termios::SetArg::TCSANOW, &attrs)?;
        let path = nix::unistd::ttyname(slave.as_raw_fd()).context("ttyname")?;
        drop(slave);
        Ok(Pty { master: File::from(master), path })
    }

    /// Another writer on the same master (e.g. from a clone of its file).
    pub fn from_file(master: File, path: PathBuf) -> Pty {
        Pty { master, path }
    }

    /// Write bytes as a reader would (blocking when nobody reads the slave).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.master.write_all(bytes)?;
        self.master.flush()
    }

    pub fn try_clone(&self) -> std::io::Result<File> {
        self.master.try_clone()
    }
}
