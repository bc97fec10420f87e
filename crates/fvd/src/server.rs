//! Running fvd: configuration, single-instance lock, the API listeners.
use crate::manager::{Manager, Paths};
use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub listen_tcp: Option<String>,
}

pub const SOCKET_NAME: &str = "fvd.sock";

/// The worker binary: FV_WORKER_BIN, else `fv-worker` next to our own executable.
pub fn worker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FV_WORKER_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("fv-worker")))
        .unwrap_or_else(|| PathBuf::from("fv-worker"))
}

/// QEMU: FV_QEMU_BIN, else qemu-system-x86_64 from PATH.
pub fn qemu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FV_QEMU_BIN") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let c = d.join("qemu-system-x86_64");
        if c.is_file() {
            return c;
        }
    }
    PathBuf::from("/usr/bin/qemu-system-x86_64")
}

fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("fvd.lock"))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::anyhow!("another fvd uses {} ({e})", dir.display()))
}

/// Run fvd until SIGTERM/SIGINT (VMs keep running) or a host shutdown completes.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)?;
    std::fs::create_dir_all(&cfg.runtime_dir)?;
    let _lock = lock_state_dir(&cfg.state_dir)?;
    let paths = Paths {
        state_dir: cfg.state_dir.clone(),
        runtime_dir: cfg.runtime_dir.clone(),
        worker_bin: worker_bin(),
        qemu_binary: qemu_bin(),
    };
    let (m, rx) = Manager::open(paths)?;
    tokio::spawn(m.clone().run_worker_events(rx));
    m.reconcile().await?;
    let sock = cfg.runtime_dir.join(SOCKET_NAME);
    // We hold the state lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&sock);
    let vm_ids: Vec<uuid::Uuid> = m.list().iter().map(|v| v.id).collect();
    let auth = crate::auth::Auth::open(&cfg.state_dir, &vm_ids)?;
    let limits = Arc::new(ConnLimits::for_this_process());
    tracing::info!(
        "connection limits: {} per local user or remote address, {} in all for non-root callers, {} with root (RLIMIT_NOFILE {})",
        limits.per_peer,
        limits.others,
        limits.total,
        limits.nofile
    );
    let listener = tokio::net::UnixListener::bind(&sock)?;
    // Any local user may connect: the authorization layer decides what they may do
    // (by their peer credentials), and unassigned users are refused everything.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))?;
    let app = crate::api::router(m.clone(), auth);
    tracing::info!("fvd listening on {}", sock.display());
    m.events.emit(
        "host.started",
        None,
        None,
        format!("fvd started (API at {})", sock.display()),
        None,
    );
    if let Some(addr) = &cfg.listen_tcp {
        // TLS only: tokens must never cross the network in clear.
        let (tls, fp) = crate::tls::load_or_create(&cfg.state_dir)?;
        crate::tls::publish_fingerprint(&fp);
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        tracing::info!("fvd listening on TLS {local}; certificate SHA-256 fingerprint {fp}");
        eprintln!("fvd: TLS API on {local}, certificate SHA-256 fingerprint {fp}");
        tokio::spawn(crate::tls::serve(tcp, tls, app.clone(), limits.clone()));
    }
    let server = tokio::spawn(serve_unix(listener, app, limits));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: fvd stops; VMs keep running"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: fvd stops; VMs keep running"),
        _ = m.shutdown.notified() => tracing::info!("host shutdown done: fvd stops"),
        r = server => { r??; }
    }
    m.events
        .emit("host.stopped", None, None, "fvd stopped".into(), None);
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

// ---------- connection limits ----------

/// A client that has not sent a whole request header within this time is cut off:
/// also an idle keep-alive connection waiting for its next request.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body that delivers nothing for this long is abandoned (a slow upload
/// that keeps moving is fine; an upload that stalls is not).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent connections one local uid (other than root) or one remote address may hold.
pub const PER_PEER_CONNECTIONS: usize = 128;
/// File descriptors kept out of the connection budget: the database, logs, worker
/// sockets and pipes, child processes.
const RESERVED_FDS: u64 = 1024;
/// Of the connection budget, what only root may use: whatever others do, root can
/// still connect and manage the host.
const ROOT_ROOM: usize = 256;
/// Refusals are logged once and then every this many, so a flood cannot flood the log.
const REFUSAL_LOG_EVERY: u64 = 1000;

/// Who a connection counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConnKey {
    Uid(u32),
    Addr(IpAddr),
    /// Peer credentials could not be read.
    Unknown,
}

impl std::fmt::Display for ConnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnKey::Uid(u) => write!(f, "uid {u}"),
            ConnKey::Addr(a) => write!(f, "address {a}"),
            ConnKey::Unknown => write!(f, "an unidentified peer"),
        }
    }
}

/// Counts open API connections per peer and in all, and refuses those over a limit.
#[derive(Debug)]
pub struct ConnLimits {
    pub per_peer: usize,
    /// Limit on all connections except root's.
    pub others: usize,
    /// Limit on all connections, root's included (below the fd limit).
    pub total: usize,
    /// The soft RLIMIT_NOFILE in force.
    pub nofile: u64,
    state: parking_lot::Mutex<ConnState>,
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct ConnState {
    per: HashMap<ConnKey, usize>,
    all: usize,
    non_root: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnRefused {
    #[error("{key} already holds {open} connections to fvd (limit {limit} per local user or remote address)")]
    PerPeer {
        key: ConnKey,
        open: usize,
        limit: usize,
    },
    #[error("fvd already holds {open} connections (limit {limit}{})", if *.root_room { ", the rest is kept for root" } else { "" })]
    Total {
        open: usize,
        limit: usize,
        root_room: bool,
    },
}

/// Raise the soft fd limit to the hard one (a busy host needs the room; the hard
/// limit is what the administrator allowed). Returns the soft limit in force.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("cannot read RLIMIT_NOFILE: {e}");
            1024
        }
    }
}

impl ConnLimits {
    /// Limits from a soft fd limit: the total stays [`RESERVED_FDS`] below it.
    pub fn new(nofile: u64, per_peer: usize) -> ConnLimits {
        let total = usize::try_from(nofile.saturating_sub(RESERVED_FDS))
            .unwrap_or(usize::MAX)
            .max(ROOT_ROOM.saturating_mul(2));
        ConnLimits {
            per_peer,
            others: total.saturating_sub(ROOT_ROOM),
            total,
            nofile,
            state: parking_lot::Mutex::new(ConnState::default()),
            refused: AtomicU64::new(0),
        }
    }

    /// Raise RLIMIT_NOFILE and size the limits to it.
    pub fn for_this_process() -> ConnLimits {
        ConnLimits::new(raise_nofile(), PER_PEER_CONNECTIONS)
    }

    /// Count a new connection, or say why it is refused. Root (uid 0 on the Unix
    /// socket) has no per-peer limit and may use the room kept for it.
    pub fn admit(self: &Arc<Self>, key: ConnKey) -> Result<ConnGuard, ConnRefused> {
        let root = key == ConnKey::Uid(0);
        let mut st = self.state.lock();
        if st.all >= self.total {
            return Err(ConnRefused::Total {
                open: st.all,
                limit: self.total,
                root_room: false,
            });
        }
        if !root {
            if st.non_root >= self.others {
                return Err(ConnRefused::Total {
                    open: st.non_root,
                    limit: self.others,
                    root_room: true,
                });
            }
            let open = st.per.get(&key).copied().unwrap_or(0);
            if open >= self.per_peer {
                return Err(ConnRefused::PerPeer {
                    key,
                    open,
                    limit: self.per_peer,
                });
            }
            st.non_root = st.non_root.saturating_add(1);
        }
        st.all = st.all.saturating_add(1);
        let n = st.per.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        Ok(ConnGuard {
            limits: self.clone(),
            key,
            root,
        })
    }

    /// Log a refusal (rate-limited).
    fn note_refused(&self, why: &ConnRefused) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(REFUSAL_LOG_EVERY) {
            tracing::warn!(
                "refused API connection: {why} ({} refused so far)",
                n.saturating_add(1)
            );
        }
    }

    /// Open connections held by `key` (for tests and diagnostics).
    pub fn open_by(&self, key: &ConnKey) -> usize {
        self.state.lock().per.get(key).copied().unwrap_or(0)
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    key: ConnKey,
    root: bool,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut st = self.limits.state.lock();
        st.all = st.all.saturating_sub(1);
        if !self.root {
            st.non_root = st.non_root.saturating_sub(1);
        }
        if let Some(n) = st.per.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per.remove(&self.key);
            }
        }
    }
}

/// The answer a refused connection gets before it is closed (best effort: the
/// socket is not waited on).
fn refusal_response(why: &ConnRefused) -> Vec<u8> {
    let body = serde_json::json!({
        "code": "too_many_connections",
        "message": why.to_string(),
        "operation": "api.connect",
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Refuse an accepted connection: log, answer 503 if the socket takes it at once, close.
pub fn refuse<S: AsRawWrite>(limits: &ConnLimits, stream: &S, why: &ConnRefused) {
    limits.note_refused(why);
    let _ = stream.try_write_now(&refusal_response(why));
}

/// A non-blocking write on a freshly accepted socket.
pub trait AsRawWrite {
    fn try_write_now(&self, buf: &[u8]) -> std::io::Result<usize>;
}

impl AsRawWrite for tokio::net::UnixStream {
    fn try_write_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.try_write(buf)
    }
}

impl AsRawWrite for tokio::net::TcpStream {
    fn try_write_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.try_write(buf)
    }
}

/// Wrap a request body so that a body that stops delivering data for
/// [`BODY_IDLE_TIMEOUT`] ends with an error instead of holding the handler.
pub fn body_with_idle_timeout(body: axum::body::Body) -> axum::body::Body {
    use futures_util::StreamExt;
    let s = body.into_data_stream();
    let s = futures_util::stream::unfold(Some(s), |st| async move {
        let mut s = st?;
        match tokio::time::timeout(BODY_IDLE_TIMEOUT, s.next()).await {
            Ok(Some(item)) => Some((item, Some(s))),
            Ok(None) => None,
            Err(_) => Some((
                Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "request body: nothing received for {} s",
                        BODY_IDLE_TIMEOUT.as_secs()
                    ),
                ))),
                None,
            )),
        }
    });
    axum::body::Body::from_stream(s)
}

/// Serve one admitted connection with the header timeout, the body idle timeout and
/// upgrades (console), with `peer` as the request's `ConnectInfo`.
pub async fn serve_connection<IO>(io: IO, peer: crate::auth::Peer, app: axum::Router)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer.clone()));
        let app = app.clone();
        async move {
            use tower::ServiceExt;
            let req = req.map(|b| body_with_idle_timeout(axum::body::Body::new(b)));
            app.oneshot(req).await
        }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    if let Err(e) = b
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .with_upgrades()
        .await
    {
        tracing::debug!("API connection ended: {e}");
    }
}

/// Accept on the Unix socket forever. Every connection is accepted (so the backlog
/// never fills up in front of root) and then admitted or refused by its uid.
async fn serve_unix(
    listener: tokio::net::UnixListener,
    app: axum::Router,
    limits: Arc<ConnLimits>,
) -> std::io::Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends (should not happen below the total limit):
                // back off instead of spinning.
                tracing::warn!("API socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = match stream.peer_cred() {
            Ok(c) => crate::auth::Peer::Unix {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            Err(_) => crate::auth::Peer::Unknown,
        };
        let key = match &peer {
            crate::auth::Peer::Unix { uid, .. } => ConnKey::Uid(*uid),
            _ => ConnKey::Unknown,
        };
        let guard = match limits.admit(key) {
            Ok(g) => g,
            Err(why) => {
                refuse(&limits, &stream, &why);
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, app).await;
            drop(guard);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_keep_room_for_root() {
        let l = Arc::new(ConnLimits::new(1024 + 600, 2));
        assert_eq!(l.total, 600);
        assert_eq!(l.others, 600 - ROOT_ROOM);
        let a: Vec<_> = (0..2)
            .map(|_| l.admit(ConnKey::Uid(1000)).unwrap())
            .collect();
        assert!(matches!(
            l.admit(ConnKey::Uid(1000)),
            Err(ConnRefused::PerPeer { .. })
        ));
        // Root is not bound by the per-peer limit.
        let r: Vec<_> = (0..5).map(|_| l.admit(ConnKey::Uid(0)).unwrap()).collect();
        assert_eq!(l.open_by(&ConnKey::Uid(0)), 5);
        drop(a);
        assert_eq!(l.open_by(&ConnKey::Uid(1000)), 0);
        // Many users together stop at `others`; root still gets in.
        let many: Vec<_> = (0..l.others)
            .map(|i| l.admit(ConnKey::Uid(2000 + (i / 2) as u32)).unwrap())
            .collect();
        assert!(matches!(
            l.admit(ConnKey::Uid(9)),
            Err(ConnRefused::Total {
                root_room: true,
                ..
            })
        ));
        let root_more = l.admit(ConnKey::Uid(0));
        assert!(root_more.is_ok());
        drop((many, r, root_more));
        assert_eq!(l.state.lock().all, 0);
    }
}
