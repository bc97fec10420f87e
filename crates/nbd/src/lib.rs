//! An NBD server exporting one [`BlockDevice`] on a Unix socket or a TCP address.
//!
//! Fixed-newstyle handshake (NBD_OPT_GO/INFO/EXPORT_NAME/LIST/ABORT,
//! structured replies, `base:allocation` metadata context), the READ, WRITE
//! (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE), BLOCK_STATUS and DISC commands,
//! one thread per connection, and a [`ShutdownHandle`] that stops accepting,
//! lets in-flight requests finish, flushes the device and closes.
#![forbid(unsafe_code)]

mod align;
mod conn;
mod proto;
mod stream;

pub use proto::MAX_PAYLOAD;

use fv_vdisk_core::BlockDevice;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use stream::{Listener, Stream};

/// Everything that can go wrong while setting up or running the server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} is in use by another server")]
    AddressInUse { addr: String },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("flush on shutdown failed: {0}")]
    Flush(#[source] fv_vdisk_core::DiskError),
    #[error("invalid export name: {0}")]
    InvalidName(String),
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    /// "host:port" (port 0 picks a free port; see [`Server::uri`]).
    Tcp(String),
}

impl ListenAddr {
    /// "HOST:PORT" (no '/') is TCP; anything else is a Unix socket path.
    pub fn parse(s: &str) -> ListenAddr {
        let looks_tcp = !s.contains('/')
            && s.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if looks_tcp {
            ListenAddr::Tcp(s.to_string())
        } else {
            ListenAddr::Unix(PathBuf::from(s))
        }
    }
}

/// How the export is presented.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Export name; the empty (default) name also reaches this export.
    pub name: String,
    pub description: String,
    /// Export read-only even if the device is writable.
    pub read_only: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN. Safe for any `BlockDevice` shared by all
    /// connections (no per-connection cache: a flush on one connection flushes the
    /// device); switch off for devices that cache per handle.
    pub multi_conn: bool,
    /// Connections served at once; further ones are closed at accept.
    pub max_connections: usize,
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            name: String::new(),
            description: String::new(),
            read_only: false,
            multi_conn: true,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// What the server did, returned when it stops.
#[derive(Debug, Clone, Default)]
pub struct ServeSummary {
    pub connections: u64,
}

pub(crate) struct Shared {
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, Stream>>,
    next_id: AtomicU64,
    active: AtomicUsize,
    /// Serialises read-modify-write of partial sectors across connections.
    pub(crate) rmw: Mutex<()>,
}

impl Shared {
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Fuzzing entry point, not API: one client session against `device` with the
/// default [`ExportOptions`] (option haggling, then transmission), reading the
/// client's bytes from `input` and writing the server's to `output`, as a connection
/// thread does on a socket. Ends at the end of `input` or at a protocol violation.
#[doc(hidden)]
pub fn fuzz_session(device: Arc<dyn BlockDevice>, input: &[u8], output: &mut dyn std::io::Write) {
    let ctx = conn::ExportCtx::new(&device, &ExportOptions::default());
    let shared = Shared {
        stop: AtomicBool::new(false),
        conns: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        active: AtomicUsize::new(0),
        rmw: Mutex::new(()),
    };
    let _ = conn::session(input, output, device.as_ref(), &ctx, &shared, || Ok(()));
}

/// Stops a running [`Server`] from any thread (e.g. a signal handler thread).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Stop accepting; every connection finishes the request it is executing and
    /// then closes (its read side is shut down, so no further requests arrive).
    pub fn shutdown(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
        for s in self.0.conns.lock().values() {
            s.shutdown_read();
        }
    }
}

/// A bound, not yet serving NBD server.
pub struct Server {
    listener: Listener,
    device: Arc<dyn BlockDevice>,
    opts: ExportOptions,
    shared: Arc<Shared>,
    uri: String,
    unix_path: Option<PathBuf>,
}

impl Server {
    /// Bind the address. A stale Unix socket file (nobody listening) is replaced;
    /// a live one is refused.
    pub fn bind(
        addr: &ListenAddr,
        device: Arc<dyn BlockDevice>,
        opts: ExportOptions,
    ) -> Result<Server, NbdError> {
        if opts.name.len() > proto::MAX_STRING || opts.name.contains('\0') {
            return Err(NbdError::InvalidName(opts.name));
        }
        let (listener, uri, unix_path) = match addr {
            ListenAddr::Unix(p) => {
                let l = Listener::bind_unix(p)?;
                let uri = format!(
                    "nbd+unix:///{}?socket={}",
                    uri_escape(&opts.name),
                    p.display()
                );
                (l, uri, Some(p.clone()))
            }
            ListenAddr::Tcp(a) => {
                let l = Listener::bind_tcp(a)?;
                let local = l.local_tcp().map_err(|e| NbdError::Io {
                    op: "local address",
                    source: e,
                })?;
                let host = if local.is_ipv6() {
                    format!("[{}]", local.ip())
                } else {
                    local.ip().to_string()
                };
                let uri = format!("nbd://{}:{}/{}", host, local.port(), uri_escape(&opts.name));
                (l, uri, None)
            }
        };
        Ok(Server {
            listener,
            device,
            opts,
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                active: AtomicUsize::new(0),
                rmw: Mutex::new(()),
            }),
            uri,
            unix_path,
        })
    }

    /// The export URI in the form qemu understands.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// Serve on a background thread.
    pub fn spawn(self) -> RunningServer {
        let handle = self.shutdown_handle();
        let uri = self.uri.clone();
        let join = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || self.serve());
        RunningServer {
            handle,
            uri,
            join: Some(join),
        }
    }

    /// Serve until shut down; then wait for every connection, flush the device and
    /// remove the Unix socket file.
    pub fn serve(self) -> Result<ServeSummary, NbdError> {
        let ctx = Arc::new(conn::ExportCtx::new(&self.device, &self.opts));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut summary = ServeSummary::default();
        let res = self.accept_loop(&ctx, &mut threads, &mut summary);
        // Stop even if accept failed, so the connection threads end.
        ShutdownHandle(self.shared.clone()).shutdown();
        for t in threads {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        let flushed = if ctx.read_only {
            Ok(())
        } else {
            self.device.flush().map_err(NbdError::Flush)
        };
        res?;
        flushed?;
        Ok(summary)
    }

    fn accept_loop(
        &self,
        ctx: &Arc<conn::ExportCtx>,
        threads: &mut Vec<JoinHandle<()>>,
        summary: &mut ServeSummary,
    ) -> Result<(), NbdError> {
        while !self.shared.stopping() {
            threads.retain(|t| !t.is_finished());
            let stream = match self.listener.accept_timeout(Duration::from_millis(50)) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!("nbd accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => {
                    return Err(NbdError::Io {
                        op: "accept",
                        source: e,
                    })
                }
            };
            if self.shared.active.load(Ordering::SeqCst) >= self.opts.max_connections {
                tracing::warn!("nbd: connection limit reached, closing new connection");
                continue;
            }
            let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
            match stream.try_clone() {
                Ok(c) => {
                    self.shared.conns.lock().insert(id, c);
                }
                Err(e) => {
                    tracing::warn!("nbd: cannot register connection: {e}");
                    continue;
                }
            }
            // A shutdown between accept and registration must still reach this one.
            if self.shared.stopping() {
                stream.shutdown_read();
            }
            summary.connections += 1;
            self.shared.active.fetch_add(1, Ordering::SeqCst);
            let dev = self.device.clone();
            let ctx = ctx.clone();
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    if let Err(e) = conn::serve_connection(stream, dev.as_ref(), &ctx, &shared) {
                        tracing::debug!("nbd connection {id} ended: {e}");
                    }
                    shared.conns.lock().remove(&id);
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.shared.conns.lock().remove(&id);
                    self.shared.active.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!("nbd: cannot start connection thread: {e}");
                }
            }
        }
        Ok(())
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(23) | Some(24) | Some(105) | Some(12))
}

/// A server running on its own thread; dropping it shuts it down and waits.
pub struct RunningServer {
    handle: ShutdownHandle,
    uri: String,
    join: Option<std::io::Result<JoinHandle<Result<ServeSummary, NbdError>>>>,
}

impl RunningServer {
    pub fn uri(&self) -> &str {
        &self.uri
    }
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }
    /// Shut down and wait for the final flush.
    pub fn stop(mut self) -> Result<ServeSummary, NbdError> {
        self.finish()
    }
    fn finish(&mut self) -> Result<ServeSummary, NbdError> {
        self.handle.shutdown();
        match self.join.take() {
            Some(Ok(j)) => j.join().unwrap_or_else(|_| {
                Err(NbdError::Io {
                    op: "server thread",
                    source: std::io::Error::other("panicked"),
                })
            }),
            Some(Err(e)) => Err(NbdError::Io {
                op: "spawn server thread",
                source: e,
            }),
            None => Ok(ServeSummary::default()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn uri_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Is `p` a Unix socket someone is listening on?
pub fn socket_in_use(p: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(p).is_ok()
}
