//! A minimal blocking HTTP/1.1 client for fvd (a copy of fvd::client's protocol code,
//! so the CLI does not link the service). One request per connection, `Connection: close`.
//!
//! Local by default: fvd's Unix socket, where fvd knows us by our uid. Remote with
//! `FV_URL=https://HOST:PORT` (set by `fv --url`): TLS only, the server certificate
//! pinned by its SHA-256 (`FV_CERT_FINGERPRINT`) or checked against a CA file
//! (`FV_CACERT`), and an API token (`FV_TOKEN`, also sent on the Unix socket if set).
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Port of fvd's TLS listener when the URL names none.
pub const DEFAULT_PORT: u16 = 8443;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach fvd at {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("cannot reach fvd at {0}: {1}")]
    ConnectRemote(String, std::io::Error),
    #[error("talking to fvd: {0}")]
    Io(#[from] std::io::Error),
    #[error("fvd sent a malformed answer: {0}")]
    Protocol(String),
    #[error("fvd URL {0:?}: {1}")]
    Url(String, String),
    #[error("TLS: {0}")]
    Tls(String),
}

#[derive(Debug, Clone)]
enum Trust {
    /// SHA-256 of the server's leaf certificate.
    Pin(Vec<u8>),
    CaFile(PathBuf),
}

#[derive(Debug, Clone)]
struct Remote {
    url: String,
    host: String,
    port: u16,
    trust: Trust,
}

pub struct Client {
    pub socket: PathBuf,
    pub timeout: Duration,
    remote: Option<Result<Remote, String>>,
    token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `AB:CD:...`, `abcd...` or `sha256:...` -> 32 bytes.
pub fn parse_fingerprint(s: &str) -> Result<Vec<u8>, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hexs: String = t.chars().filter(|c| *c != ':').collect();
    let b = hex::decode(&hexs).map_err(|_| format!("fingerprint {s:?} is not hex"))?;
    if b.len() != 32 {
        return Err(format!("fingerprint {s:?} is not a SHA-256 (32 bytes)"));
    }
    Ok(b)
}

fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = match url.split_once("://") {
        Some(("https", r)) => r,
        Some((scheme, _)) => {
            return Err(format!("scheme {scheme}: fvd's remote API is https only"))
        }
        None => url,
    };
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        // [v6]:port
        let (h, after) = r.split_once(']').ok_or("unclosed [ in the host")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
            None => DEFAULT_PORT,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("bad port {p:?}"))?,
            ),
            None => (authority.to_string(), DEFAULT_PORT),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok((host, port))
}

fn remote_from_env() -> Option<Result<Remote, String>> {
    let url = env("FV_URL")?;
    Some((|| {
        let (host, port) = parse_url(&url)?;
        let trust = if let Some(fp) = env("FV_CERT_FINGERPRINT") {
            Trust::Pin(parse_fingerprint(&fp)?)
        } else if let Some(ca) = env("FV_CACERT") {
            Trust::CaFile(PathBuf::from(ca))
        } else {
            // No silent trust-on-first-use: fvd's certificate is self-signed.
            return Err("give the server's certificate: --cert-fingerprint SHA256 (shown by fvd at start and by `fv host show`) or --cacert PATH".into());
        };
        Ok(Remote {
            url: url.clone(),
            host,
            port,
            trust,
        })
    })())
}

/// Accepts exactly the certificate whose SHA-256 was pinned; signatures are still
/// verified, so the peer must hold that certificate's key.
#[derive(Debug)]
struct PinVerifier {
    sha256: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Sha256::digest(end_entity.as_ref());
        // Fingerprints are public: no need for a constant-time comparison here.
        if got.as_slice() == self.sha256.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint {}, not the pinned one",
                got.iter()
                    .map(|b| format!("{b:02X}"))
                    .collect::<Vec<_>>()
                    .join(":")
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls_config(trust: &Trust) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = |e: rustls::Error| ClientError::Tls(e.to_string());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls)?;
    let cfg = match trust {
        Trust::Pin(sha256) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                sha256: sha256.clone(),
                provider,
            }))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
            for c in certs {
                let c = c.map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
                roots.add(c).map_err(tls)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(cfg)
}

/// fvd's API socket: the given one, else FV_SOCKET, else the system default.
pub fn socket_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("FV_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/ferrovisor/fvd.sock"))
}

/// Percent-encode one path segment or query value.
pub fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// A connection to fvd: the Unix socket or TLS over TCP.
pub trait Stream: Read + Write + Send {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
}

impl Stream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(t)
    }
}

impl Client {
    /// The local socket, unless FV_URL names a remote fvd.
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
            timeout: Duration::from_secs(700),
            remote: remote_from_env(),
            token: env("FV_TOKEN"),
        }
    }

    /// A new connection (one request each; the local socket or TLS as configured).
    pub fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        let Some(remote) = &self.remote else {
            let s = UnixStream::connect(&self.socket)
                .map_err(|e| ClientError::Connect(self.socket.clone(), e))?;
            s.set_read_timeout(Some(self.timeout))?;
            return Ok(Box::new(s));
        };
        let r = remote
            .as_ref()
            .map_err(|e| ClientError::Url(env("FV_URL").unwrap_or_default(), e.clone()))?;
        let tcp = TcpStream::connect((r.host.as_str(), r.port))
            .map_err(|e| ClientError::ConnectRemote(r.url.clone(), e))?;
        tcp.set_read_timeout(Some(self.timeout))?;
        let name = ServerName::try_from(r.host.clone())
            .map_err(|e| ClientError::Url(r.url.clone(), e.to_string()))?;
        let conn = rustls::ClientConnection::new(Arc::new(tls_config(&r.trust)?), name)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        // Handshake now, so a wrong certificate reads as a TLS error, not an I/O one.
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .map_err(|e| ClientError::Tls(e.to_string()))?;
        }
        Ok(Box::new(s))
    }

    /// The request line and headers (ending with the blank line), with our token.
    pub fn head(&self, method: &str, path: &str, extra: &[(&str, String)]) -> String {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: fvd\r\nAccept: application/json\r\n");
        if !extra
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
        {
            req.push_str("Connection: close\r\n");
        }
        if let Some(t) = &self.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<HttpResponse, ClientError> {
        let mut s = self.connect()?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let extra = match body {
            Some(_) => vec![
                ("Content-Type", "application/json".to_string()),
                ("Content-Length", payload.len().to_string()),
            ],
            None => vec![],
        };
        let mut req = self.head(method, path, &extra);
        req.push_str(&payload);
        s.write_all(req.as_bytes())?;
        s.flush()?;
        read_response(&mut BufReader::new(s), None)
    }
}

/// Largest answer body we accept (fvd's lists are far smaller).
const MAX_BODY: usize = 256 << 20;

/// Read a status line and headers: (status, headers).
pub fn read_head(r: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>), ClientError> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// Read a whole answer; `head` if its status line and headers were read already.
pub fn read_response(
    r: &mut impl BufRead,
    head: Option<(u16, Vec<(String, String)>)>,
) -> Result<HttpResponse, ClientError> {
    let (status, headers) = match head {
        Some(h) => h,
        None => read_head(r)?,
    };
    let find = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let too_big = || ClientError::Protocol(format!("an answer over {MAX_BODY} bytes"));
    let mut body = Vec::new();
    let mut line = String::new();
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| ClientError::Protocol(format!("chunk size {line:?}")))?;
            if n == 0 {
                break;
            }
            if body.len() + n > MAX_BODY {
                return Err(too_big());
            }
            let at = body.len();
            body.resize(at + n, 0);
            r.read_exact(&mut body[at..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if n > MAX_BODY {
            return Err(too_big());
        }
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.take(MAX_BODY as u64).read_to_end(&mut body)?;
    }
    Ok(HttpResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_fingerprints() {
        assert_eq!(parse_url("https://h:9").unwrap(), ("h".into(), 9));
        assert_eq!(parse_url("https://[::1]:9/x").unwrap(), ("::1".into(), 9));
        assert_eq!(parse_url("h").unwrap(), ("h".into(), DEFAULT_PORT));
        assert!(parse_url("http://h:1").is_err());
        let fp = "AB:".repeat(31) + "AB";
        assert_eq!(parse_fingerprint(&fp).unwrap(), vec![0xab; 32]);
        assert_eq!(
            parse_fingerprint(&format!("sha256:{}", "ab".repeat(32))).unwrap(),
            vec![0xab; 32]
        );
        assert!(parse_fingerprint("abcd").is_err());
    }
}
