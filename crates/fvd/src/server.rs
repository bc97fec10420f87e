//! Running fvd: configuration, single-instance lock, the API listeners.
use crate::manager::{Manager, Paths};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
        tokio::spawn(crate::tls::serve(tcp, tls, app.clone()));
    }
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<crate::auth::Peer>(),
        )
        .await
    });
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
