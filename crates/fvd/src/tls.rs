//! The remote listener: the same router over TLS only (never plain TCP).
//!
//! tokio-rustls accepts, hyper's HTTP/1.1 server runs the connection and the axum
//! router is called as a tower service with the peer recorded in the request, so the
//! authorization middleware sees the same `ConnectInfo<Peer>` it sees on the Unix
//! socket. (axum-server would add a second server stack for no gain.) A self-signed
//! certificate is made on first start and reused; callers pin its SHA-256 fingerprint.
use crate::auth::Peer;
use axum::Router;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate files in {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("generating the TLS certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS certificate {0}: {1}")]
    Pem(PathBuf, String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

static FINGERPRINT: OnceLock<String> = OnceLock::new();

/// The served certificate's SHA-256 fingerprint, when the TLS listener is on.
pub fn fingerprint() -> Option<String> {
    FINGERPRINT.get().cloned()
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex (what
/// `openssl x509 -fingerprint -sha256` prints, so admins can compare).
pub fn fingerprint_of(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    d.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Write a file so it is complete or absent, with `mode` from the start (the key must
/// never be readable by others, not even briefly).
fn write_private(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Load `<state>/tls/{cert.pem,key.pem}`, generating them on first start.
/// Returns the server config and the certificate's fingerprint.
pub fn load_or_create(state_dir: &Path) -> Result<(rustls::ServerConfig, String), TlsError> {
    let dir = state_dir.join("tls");
    let io = |e| TlsError::Io(dir.clone(), e);
    std::fs::create_dir_all(&dir).map_err(io)?;
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if !cert_path.exists() || !key_path.exists() {
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        let host = crate::util::hostname();
        if !names.contains(&host) && !host.is_empty() {
            names.push(host);
        }
        let ck = rcgen::generate_simple_self_signed(names)?;
        // Key first: a cert without its key would be reused and fail every start.
        write_private(&key_path, ck.key_pair.serialize_pem().as_bytes(), 0o600).map_err(io)?;
        write_private(&cert_path, ck.cert.pem().as_bytes(), 0o644).map_err(io)?;
        tracing::info!(
            "generated a self-signed TLS certificate in {}",
            dir.display()
        );
    }
    let cert_pem = std::fs::read(&cert_path).map_err(io)?;
    let key_pem = std::fs::read(&key_path).map_err(io)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(cert_path.clone(), e.to_string()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError::Pem(cert_path.clone(), "no certificate".into()))?;
    let fp = fingerprint_of(leaf.as_ref());
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError::Pem(key_path.clone(), e.to_string()))?
        .ok_or_else(|| TlsError::Pem(key_path.clone(), "no private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((cfg, fp))
}

/// Record the fingerprint for `GET /host` (once per process).
pub fn publish_fingerprint(fp: &str) {
    let _ = FINGERPRINT.set(fp.to_string());
}

/// Accept TLS connections forever and serve `app` on each, within the connection
/// limits (counted per remote address, before the handshake).
pub async fn serve(
    listener: TcpListener,
    cfg: rustls::ServerConfig,
    app: Router,
    limits: Arc<crate::server::ConnLimits>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("TLS listener accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let guard = match limits.admit(crate::server::ConnKey::Addr(addr.ip())) {
            Ok(g) => g,
            Err(why) => {
                // Plain text before TLS: the client sees a failed handshake; the
                // log says why.
                crate::server::refuse(&limits, &tcp, &why);
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that never finishes the handshake must not hold a task forever.
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake from {addr}: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            crate::server::serve_connection(tls, Peer::Tls { addr }, app).await;
            drop(guard);
        });
    }
}
