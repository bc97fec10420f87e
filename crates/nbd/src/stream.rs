//! Unix and TCP sockets behind one type.
use crate::NbdError;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub(crate) fn bind_unix(p: &Path) -> Result<Listener, NbdError> {
        let addr = p.display().to_string();
        if let Ok(md) = std::fs::symlink_metadata(p) {
            // Replace only a dead socket; never delete a regular file someone named.
            if !md.file_type().is_socket() {
                return Err(NbdError::Bind {
                    addr,
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "exists and is not a socket",
                    ),
                });
            }
            if crate::socket_in_use(p) {
                return Err(NbdError::AddressInUse { addr });
            }
            let _ = std::fs::remove_file(p);
        }
        let l = UnixListener::bind(p).map_err(|e| NbdError::Bind {
            addr: addr.clone(),
            source: e,
        })?;
        l.set_nonblocking(true)
            .map_err(|e| NbdError::Bind { addr, source: e })?;
        Ok(Listener::Unix(l))
    }

    pub(crate) fn bind_tcp(a: &str) -> Result<Listener, NbdError> {
        let l = TcpListener::bind(a).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                NbdError::AddressInUse {
                    addr: a.to_string(),
                }
            } else {
                NbdError::Bind {
                    addr: a.to_string(),
                    source: e,
                }
            }
        })?;
        l.set_nonblocking(true).map_err(|e| NbdError::Bind {
            addr: a.to_string(),
            source: e,
        })?;
        Ok(Listener::Tcp(l))
    }

    pub(crate) fn local_tcp(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Unix(_) => Err(io::Error::other("not a TCP listener")),
        }
    }

    /// Accept one connection, or return None after `wait` without one. Polling keeps
    /// shutdown simple (no self-pipe) at the cost of up to `wait` accept latency.
    pub(crate) fn accept_timeout(&self, wait: Duration) -> io::Result<Option<Stream>> {
        let r = match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        match r {
            Ok(s) => {
                s.set_nonblocking(false)?;
                Ok(Some(s))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(wait);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    pub(crate) fn shutdown_read(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Read),
            Stream::Tcp(s) => s.shutdown(Shutdown::Read),
        };
    }
    fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(nb),
            Stream::Tcp(s) => s.set_nonblocking(nb),
        }
    }
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
