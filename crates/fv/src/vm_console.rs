//! `fv vm console`: an interactive serial console through fvd's console API.
use crate::client::{read_head, read_response, Client};
use anyhow::{anyhow, Result};
use fv_model::api::VmView;
use nix::sys::termios::{self, SetArg};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// fvd's upgrade protocol name for the console (fvd/src/console.rs).
const UPGRADE: &str = "fv-console";

/// Ctrl-] ends the session, as with telnet and virsh.
const ESCAPE: u8 = 0x1d;

struct RawMode {
    saved: Option<termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(s) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, s);
        }
    }
}

/// Attach to COM`port` of `vm` through fvd's console API (an HTTP upgrade, so
/// fvd's authorization decides: `vm.console.input` to type, `vm.console.output`
/// with `read_only` to watch). Works on the local socket and over TLS alike.
pub fn run(c: &Client, vm: &VmView, port: usize, read_only: bool) -> Result<()> {
    let mut s = c.connect().map_err(|e| anyhow!("{e}"))?;
    let method = if read_only { "GET" } else { "POST" };
    let path = format!("/vms/{}/console?port={port}", vm.id);
    let head = c.head(
        method,
        &path,
        &[
            ("Connection", "Upgrade".to_string()),
            ("Upgrade", UPGRADE.to_string()),
        ],
    );
    s.write_all(head.as_bytes())?;
    // Read the answer's head byte by byte: console bytes may follow it at once and
    // must not disappear into a read buffer.
    let mut raw = Vec::new();
    let mut b = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 || raw.len() > 64 << 10 {
            return Err(anyhow!("fvd closed the console request"));
        }
        raw.push(b[0]);
    }
    let mut cur = std::io::Cursor::new(raw);
    let (status, headers) = read_head(&mut cur)?;
    if status != 101 {
        // An ordinary error answer: its body follows on the stream.
        let mut rd = std::io::BufReader::new(s);
        let r = read_response(&mut rd, Some((status, headers)))?;
        crate::output::check(r)?;
        return Err(anyhow!(
            "fvd answered {status} instead of opening the console"
        ));
    }
    eprintln!(
        "Connected to {} COM{port}{}. Escape character is ^]",
        vm.name,
        if read_only { " (watching only)" } else { "" }
    );
    // One stream for both directions: short read timeouts let the reader and the
    // writer take turns (a TLS stream cannot be split or cloned).
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let stream = Arc::new(Mutex::new(s));
    let done = Arc::new(AtomicBool::new(false));
    let _raw = RawMode::enter();
    let reader = {
        let stream = stream.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut out = std::io::stdout();
            while !done.load(Ordering::Relaxed) {
                let r = match stream.lock() {
                    Ok(mut g) => g.read(&mut buf),
                    Err(_) => break,
                };
                match r {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = buf.get(..n).unwrap_or_default();
                        if out.write_all(chunk).and_then(|_| out.flush()).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        // Let the writer in.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    while !done.load(Ordering::Relaxed) {
        let n = stdin.read(&mut buf).map_err(|e| anyhow!("stdin: {e}"))?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        let (send, quit) = match chunk.iter().position(|b| *b == ESCAPE) {
            Some(i) => (chunk.get(..i).unwrap_or_default(), true),
            None => (chunk, false),
        };
        let ok = match stream.lock() {
            Ok(mut g) => g.write_all(send).and_then(|_| g.flush()).is_ok(),
            Err(_) => false,
        };
        if quit || !ok {
            break;
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = reader.join();
    drop(_raw);
    eprintln!("\r\nDisconnected from {}.", vm.name);
    Ok(())
}
