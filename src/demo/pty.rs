//! Pseudo-terminals: a stand-in serial port for the demo and the tests.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::Context;
use rustix::pty::OpenptFlags;

/// The master side of a pseudo-terminal; `path` is the slave device the gateway opens as its port.
pub struct Pty {
    master: File,
    pub path: PathBuf,
}

impl Pty {
    /// A raw-mode pty. The slave is closed again at once: writes to the master are buffered by
    /// the kernel (about 16 KiB, then they block) until the gateway opens the slave.
    pub fn open() -> anyhow::Result<Pty> {
        // Close-on-exec from the start, so no process started meanwhile by another thread (a
        // gateway under test) inherits the master: holding it, it would never see a hang-up.
        let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .context("posix_openpt")?;
        rustix::pty::grantpt(&master).context("grantpt")?;
        rustix::pty::unlockpt(&master).context("unlockpt")?;
        let path = PathBuf::from(
            rustix::pty::ptsname(&master, Vec::new()).context("ptsname")?.into_string().context("ptsname")?,
        );
        // std opens with O_CLOEXEC; O_NOCTTY keeps it from becoming our controlling terminal.
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let mut attrs = rustix::termios::tcgetattr(&slave).context("tcgetattr")?;
        attrs.make_raw();
        rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &attrs).context("tcsetattr")?;
        drop(slave);
        Ok(Pty { master: File::from(master), path })
    }

    /// Another writer on the same master (e.g. from a clone of its file).
    #[cfg(any(test, feature = "test-support"))]
    pub fn from_file(master: File, path: PathBuf) -> Pty {
        Pty { master, path }
    }

    /// Write bytes as a reader would (blocking when nobody reads the slave).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.master.write_all(bytes)?;
        self.master.flush()
    }

    #[cfg(any(test, feature = "test-support"))]
    pub fn try_clone(&self) -> std::io::Result<File> {
        self.master.try_clone()
    }
}
