//! `fv vm console`: an interactive serial console on the COM port socket fvd reports.
use anyhow::{anyhow, Context, Result};
use fv_model::api::VmView;
use nix::sys::termios::{self, SetArg};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

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

pub fn run(vm: &VmView, port: usize) -> Result<()> {
    let path = vm
        .com_sockets
        .get(port.saturating_sub(1))
        .cloned()
        .flatten()
        .ok_or_else(|| {
            crate::output::Refused(format!(
                "VM {} has no COM{port} socket (it is {})",
                vm.name, vm.state
            ))
        })?;
    let sock =
        UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    eprintln!(
        "Connected to {} COM{port} ({}). Escape character is ^]",
        vm.name,
        path.display()
    );
    let mut from_vm = sock.try_clone()?;
    let mut to_vm = sock;
    let _raw = RawMode::enter();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        loop {
            match from_vm.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        if reader.is_finished() {
            break;
        }
        let n = stdin.read(&mut buf).map_err(|e| anyhow!("stdin: {e}"))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if let Some(i) = chunk.iter().position(|b| *b == ESCAPE) {
            let _ = to_vm.write_all(&chunk[..i]);
            break;
        }
        if to_vm.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    drop(_raw);
    eprintln!("\r\nDisconnected from {}.", vm.name);
    Ok(())
}
