//! `fv vm copy-file`: stream a local file to fvd as the request body.
//!
//! The CLI reads the file (with the caller's own permissions) and sends its bytes;
//! fvd never opens a host path on the caller's behalf. One request per connection,
//! `Connection: close`, like the JSON client.
use super::client::HttpResponse;
use anyhow::{anyhow, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// POST `path` on fvd's socket with the file's bytes as an octet-stream body; a
/// progress bar on a terminal shows the upload.
pub fn upload(socket: &Path, path: &str, file: &Path, show_progress: bool) -> Result<HttpResponse> {
    let f = std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(anyhow!("{} is not a regular file", file.display()));
    }
    let len = meta.len();
    // The JSON client (client.rs) also speaks TLS to a remote fvd; this streaming
    // upload only knows the local socket so far.
    if std::env::var_os("FV_URL").is_some_and(|u| !u.is_empty()) {
        return Err(anyhow!(
            "copy-file to a remote fvd (FV_URL) is not supported yet; run it on the host"
        ));
    }
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach fvd at {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(3600)))?;
    // `Expect: 100-continue`: fvd checks the request (VM, guest services, caller's
    // rights) before it reads the body, so a refusal comes before any upload.
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: fvd\r\nConnection: close\r\nAccept: application/json\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n"
    );
    // Same credential as the JSON client sends on the socket.
    if let Some(t) = std::env::var("FV_TOKEN").ok().filter(|t| !t.is_empty()) {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    let mut r = BufReader::new(s.try_clone()?);
    // A server that ignores Expect gets the body after a while anyway.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(_) if line.split_whitespace().nth(1) == Some("100") => {
            // Skip the rest of the interim response.
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                    break;
                }
            }
            line.clear();
        }
        Ok(_) => {
            // A final answer before the body: a refusal.
            s.set_read_timeout(Some(Duration::from_secs(3600)))?;
            return read_response(&mut r, line);
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            line.clear();
        }
        Err(e) => return Err(e.into()),
    }
    s.set_read_timeout(Some(Duration::from_secs(3600)))?;
    let bar = if show_progress {
        let b = indicatif::ProgressBar::new(len);
        b.set_style(
            indicatif::ProgressStyle::with_template("upload [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut reader = bar.wrap_read(f.take(len));
    let sent = std::io::copy(&mut reader, &mut s);
    bar.finish_and_clear();
    // fvd may answer (and close) early, e.g. when the spool disk is full: read the
    // answer whatever happened to the upload.
    let resp = read_response(&mut r, line);
    match (sent, resp) {
        (_, Ok(r)) => Ok(r),
        (Err(e), Err(_)) => Err(anyhow!("sending {}: {e}", file.display())),
        (Ok(_), Err(e)) => Err(e),
    }
}

/// The answer, given its status line if already read (else empty).
fn read_response(r: &mut BufReader<UnixStream>, mut line: String) -> Result<HttpResponse> {
    if line.is_empty() {
        r.read_line(&mut line)?;
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("fvd sent a malformed status line {line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            } else if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.trim().eq_ignore_ascii_case("chunked");
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| anyhow!("fvd sent a malformed chunk size {line:?}"))?;
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(HttpResponse { status, body })
}
