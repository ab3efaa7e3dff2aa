//! Transports: a serial port, or a TCP connection to a networked reader (`tcp://host:port`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::time::Duration;

use serialport::SerialPort;

use crate::config::{FlowControl, Parity, ReaderConfig};

/// A networked reader that goes silent because its link died (cable, Wi-Fi, power) is noticed by
/// TCP keepalive: first probe after 10 s of silence, then one every 5 s, and the link is declared
/// dead after 3 unanswered (≈ 25 s in all).
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(10))
    .with_interval(Duration::from_secs(5))
    .with_retries(3);

fn enable_keepalive(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).set_tcp_keepalive(&KEEPALIVE)
}

/// How long one `read` blocks when nothing arrives: the thread notices cancellation within this,
/// and an idle gateway wakes only twice a second for it.
pub const READ_TIMEOUT: Duration = Duration::from_millis(500);

/// A polled reader must be written to on time, so its reads block no longer than the poll interval.
pub fn read_timeout(cfg: &ReaderConfig) -> Duration {
    if cfg.poll_interval.is_zero() { READ_TIMEOUT } else { READ_TIMEOUT.min(cfg.poll_interval) }
}
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A command the reader does not take within this long means it stopped reading what we send:
/// the write fails, and the connection is taken as lost (and opened again). Without it the reader
/// thread would block for ever once the socket's send buffer is full. (A serial port's writes
/// wait at most its read timeout, the same way.)
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr} does not resolve")))
}

fn configure_tcp(stream: &TcpStream, cfg: &ReaderConfig) -> io::Result<()> {
    stream.set_read_timeout(Some(read_timeout(cfg)))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    enable_keepalive(stream)
}

fn data_bits(cfg: &ReaderConfig) -> serialport::DataBits {
    match cfg.data_bits {
        5 => serialport::DataBits::Five,
        6 => serialport::DataBits::Six,
        7 => serialport::DataBits::Seven,
        _ => serialport::DataBits::Eight,
    }
}

fn parity(cfg: &ReaderConfig) -> serialport::Parity {
    match cfg.parity {
        Parity::None => serialport::Parity::None,
        Parity::Odd => serialport::Parity::Odd,
        Parity::Even => serialport::Parity::Even,
    }
}

fn stop_bits(cfg: &ReaderConfig) -> serialport::StopBits {
    if cfg.stop_bits == 2 { serialport::StopBits::Two } else { serialport::StopBits::One }
}

fn flow_control(cfg: &ReaderConfig) -> serialport::FlowControl {
    match cfg.flow_control {
        FlowControl::None => serialport::FlowControl::None,
        FlowControl::Software => serialport::FlowControl::Software,
        FlowControl::Hardware => serialport::FlowControl::Hardware,
    }
}

pub enum Port {
    Serial(serialport::TTYPort),
    Tcp(TcpStream),
}

/// One `poll` of the port.
pub enum Received {
    Data(usize),
    /// Nothing arrived within the read timeout.
    Idle,
}

impl Port {
    pub fn open(cfg: &ReaderConfig) -> io::Result<Port> {
        let path = cfg.port.as_deref().unwrap_or_default();
        if let Some(addr) = path.strip_prefix("tcp://") {
            let stream = TcpStream::connect_timeout(&resolve(addr)?, TCP_CONNECT_TIMEOUT)?;
            configure_tcp(&stream, cfg)?;
            return Ok(Port::Tcp(stream));
        }
        let port = serialport::new(path, cfg.baud_rate)
            .data_bits(data_bits(cfg))
            .parity(parity(cfg))
            .stop_bits(stop_bits(cfg))
            .flow_control(flow_control(cfg))
            .timeout(read_timeout(cfg))
            .open_native()
            .map_err(io::Error::from)?;
        Ok(Port::Serial(port))
    }

    /// Take back a port kept open by a previous process (systemd's descriptor store), if it is
    /// still the configured one: the same device, or a connection to the configured reader. The
    /// configured settings are applied again. `Err` gives the descriptor back, with the reason.
    #[allow(unsafe_code)] // serialport has no safe way to adopt a kept descriptor
    pub fn adopt(fd: OwnedFd, cfg: &ReaderConfig) -> Result<Port, (OwnedFd, String)> {
        let path = cfg.port.as_deref().unwrap_or_default();
        if let Some(addr) = path.strip_prefix("tcp://") {
            let stream = TcpStream::from(fd);
            let peer = match stream.peer_addr() {
                Ok(peer) => peer,
                Err(e) => return Err((stream.into(), format!("not a connected socket ({e})"))),
            };
            match resolve(addr) {
                Ok(target) if target == peer => {}
                Ok(target) => return Err((stream.into(), format!("connected to {peer}, not {target}"))),
                Err(e) => return Err((stream.into(), format!("{addr} does not resolve ({e})"))),
            }
            return match configure_tcp(&stream, cfg) {
                Ok(()) => Ok(Port::Tcp(stream)),
                Err(e) => Err((stream.into(), format!("cannot apply the settings ({e})"))),
            };
        }
        if !crate::fdstore::is_device(&fd, path) {
            return Err((fd, format!("not the device {path}")));
        }
        // SAFETY: the descriptor is ours alone (taken from systemd), now owned by the port.
        let mut port = unsafe { <serialport::TTYPort as std::os::fd::FromRawFd>::from_raw_fd(fd.into_raw_fd()) };
        let settings = (|| -> serialport::Result<()> {
            port.set_baud_rate(cfg.baud_rate)?;
            port.set_data_bits(data_bits(cfg))?;
            port.set_parity(parity(cfg))?;
            port.set_stop_bits(stop_bits(cfg))?;
            port.set_flow_control(flow_control(cfg))?;
            port.set_timeout(read_timeout(cfg))
        })();
        match settings {
            Ok(()) => Ok(Port::Serial(port)),
            Err(e) => {
                // SAFETY: the port gives up its descriptor here and is not used again.
                let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(port.into_raw_fd()) };
                Err((fd, format!("cannot apply the settings ({e})")))
            }
        }
    }

    #[allow(unsafe_code)] // serialport exposes only the raw descriptor
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Port::Serial(p) => {
                use std::os::fd::AsRawFd;
                // SAFETY: the port owns this descriptor for as long as the borrow of `self`.
                unsafe { BorrowedFd::borrow_raw(p.as_raw_fd()) }
            }
            Port::Tcp(s) => s.as_fd(),
        }
    }

    /// Read what is there. An error, or the end of a TCP stream, means the link is gone.
    pub fn receive(&mut self, buf: &mut [u8]) -> io::Result<Received> {
        let result = match self {
            Port::Serial(p) => p.read(buf),
            Port::Tcp(s) => match s.read(buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the reader closed the connection")),
                other => other,
            },
        };
        match result {
            Ok(0) => Ok(Received::Idle),
            Ok(n) => Ok(Received::Data(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Received::Idle)
            }
            Err(e) => Err(e),
        }
    }

    /// After a hang-up, whatever the kernel still holds for us (serialport reports the hang-up
    /// before the data that arrived with it).
    pub fn salvage(&mut self, buf: &mut [u8]) -> Vec<u8> {
        const MAX_SALVAGE: usize = 64 * 1024;
        let mut out = Vec::new();
        if let Port::Serial(p) = self {
            use std::os::fd::AsRawFd;
            // Never block here: the device is going away.
            let _ = nix::fcntl::fcntl(p.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK));
            while out.len() < MAX_SALVAGE {
                match nix::unistd::read(p.as_raw_fd(), buf) {
                    Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
        }
        out
    }

    /// How long one `receive` waits for data (shortened while a command is due sooner).
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        let timeout = timeout.max(Duration::from_millis(1));
        match self {
            Port::Serial(p) => p.set_timeout(timeout).map_err(io::Error::from),
            Port::Tcp(s) => s.set_read_timeout(Some(timeout)),
        }
    }

    /// Send a command to the reader (a poll, a clock request or set, a rewind).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Port::Serial(p) => p.write_all(bytes),
            Port::Tcp(s) => s.write_all(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_stops_reading_fails_the_write_within_its_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // Small buffers on both sides, so the write blocks soon.
        socket2::SockRef::from(&listener).set_recv_buffer_size(4096).unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_peer, _) = listener.accept().unwrap(); // accepted, never read
        let cfg = ReaderConfig::default();
        configure_tcp(&stream, &cfg).unwrap();
        socket2::SockRef::from(&stream).set_send_buffer_size(4096).unwrap();
        let mut port = Port::Tcp(stream);
        let started = std::time::Instant::now();
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        let error = loop {
            match port.send(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => break e,
            }
            assert!(sent < 1 << 30, "a gigabyte taken by a peer that reads nothing");
        };
        let took = started.elapsed();
        assert!(matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{error:?}");
        // It returns (the reader thread is not held for ever), after the timeout at the earliest.
        assert!(took >= WRITE_TIMEOUT, "{took:?} after {sent} bytes");
    }

    #[test]
    fn a_networked_reader_gets_keepalive_probes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        enable_keepalive(&stream).unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(10));
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), Duration::from_secs(5));
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
    }
}
