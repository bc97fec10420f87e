//! `fv vm copy-file`: stream a local file to fvd as the request body.
//!
//! The CLI reads the file (with the caller's own permissions) and sends its bytes;
//! fvd never opens a host path on the caller's behalf. One request per connection,
//! `Connection: close`, through the same client (local socket or TLS) as the rest.
use crate::client::{read_head, read_response, Client, HttpResponse};
use anyhow::{anyhow, Context, Result};
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

/// POST `path` with the file's bytes as an octet-stream body (over the socket or
/// TLS, as the client is configured); a progress bar on a terminal shows the upload.
pub fn upload(c: &Client, path: &str, file: &Path, show_progress: bool) -> Result<HttpResponse> {
    let f = std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(anyhow!("{} is not a regular file", file.display()));
    }
    let len = meta.len();
    let s = c.connect()?;
    // `Expect: 100-continue`: fvd checks the request (VM, guest services, caller's
    // rights) before it reads the body, so a refusal comes before any upload.
    let head = c.head(
        "POST",
        path,
        &[
            ("Content-Type", "application/octet-stream".to_string()),
            ("Content-Length", len.to_string()),
            ("Expect", "100-continue".to_string()),
        ],
    );
    let mut r = BufReader::new(s);
    r.get_mut().write_all(head.as_bytes())?;
    // A server that ignores Expect gets the body after a while anyway.
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))?;
    match read_head(&mut r) {
        Ok((100, _)) => {}
        // A final answer before the body: a refusal.
        Ok(h) => {
            r.get_ref()
                .set_read_timeout(Some(Duration::from_secs(3600)))?;
            return Ok(read_response(&mut r, Some(h))?);
        }
        Err(crate::client::ClientError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        Err(e) => return Err(e.into()),
    }
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(3600)))?;
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
    let sent = std::io::copy(&mut reader, r.get_mut()).and_then(|_| r.get_mut().flush());
    bar.finish_and_clear();
    // fvd may answer (and close) early, e.g. when the spool disk is full: read the
    // answer whatever happened to the upload.
    let resp = read_response(&mut r, None);
    match (sent, resp) {
        (_, Ok(r)) => Ok(r),
        (Err(e), Err(_)) => Err(anyhow!("sending {}: {e}", file.display())),
        (Ok(_), Err(e)) => Err(e.into()),
    }
}
