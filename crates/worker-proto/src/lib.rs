//! Control protocol between fvd and fv-worker.
//!
//! Transport: a Unix stream socket at `<runtime>/vms/<id>/worker.sock`, created by the
//! worker. Each line is one JSON [`Message`]. fvd sends [`Request`]s; the worker
//! answers each with a [`Response`] carrying the same `id`, and, once a connection
//! has sent [`Op::Subscribe`], pushes [`Event`]s on it. The worker outlives fvd: fvd
//! re-attaches after a restart simply by connecting again.
#![forbid(unsafe_code)]

use fv_model::VmState;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Protocol version; the worker refuses a `Hello` with another major.
pub const PROTOCOL_VERSION: u32 = 1;

/// Socket file name inside the VM's runtime directory.
pub const SOCKET_NAME: &str = "worker.sock";
/// PID file of the worker inside the VM's runtime directory.
pub const PID_NAME: &str = "worker.pid";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Message {
    Request(Request),
    Response(Response),
    Event(EventMessage),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Hello {
        version: u32,
    },
    /// Current state and facts.
    Status,
    /// Receive events on this connection from now on.
    Subscribe,
    Pause,
    Resume,
    Reset,
    /// Pull the plug. The worker stops QEMU, flushes disks and exits.
    TurnOff,
    /// Graceful: guest agent when present, else ACPI. Answers once the request is sent;
    /// the state change arrives as an event. `timeout_s` bounds how long the worker
    /// waits before reporting `ShutdownTimedOut` (it never forces off by itself).
    ShutDown {
        timeout_s: u64,
    },
    /// Save device + memory state into `dir` (in the VM folder), then exit.
    /// Progress arrives as `SaveProgress` events; the response comes when done.
    Save {
        dir: PathBuf,
    },
    /// Insert (Some) or eject (None) the medium of a DVD drive, by drive index.
    ChangeMedia {
        dvd_index: usize,
        path: Option<PathBuf>,
    },
    /// Ping the guest agent.
    GuestPing,
    /// Memory and CPU statistics of the worker and QEMU.
    Stats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WorkerError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error, PartialEq)]
#[error("{code}: {message}")]
pub struct WorkerError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidState,
    BadRequest,
    QemuError,
    GuestAgentUnavailable,
    Io,
    Internal,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        f.write_str(s.as_deref().unwrap_or("error"))
    }
}

/// Answer to `Status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub vm_id: String,
    pub state: VmState,
    pub worker_pid: u32,
    pub qemu_pid: Option<u32>,
    /// Seconds since QEMU started.
    pub uptime_s: u64,
    /// Paths of COM port sockets (index 0 = COM1).
    pub com_sockets: Vec<Option<PathBuf>>,
    pub guest_agent_connected: bool,
    /// MACs actually in use, per adapter in config order.
    pub macs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventMessage {
    pub event: Event,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    StateChanged {
        state: VmState,
        reason: Option<String>,
    },
    SaveProgress {
        percent: u8,
    },
    ShutdownTimedOut,
    /// QEMU exited; `clean` when asked to (turn off, shutdown, save).
    QemuExited {
        clean: bool,
        detail: String,
    },
    GuestReady,
    Warning {
        message: String,
    },
}

/// Arguments fvd passes when launching a worker (as a JSON file, `--launch FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The VM's config as of start (the worker never writes it).
    pub config: fv_model::VmConfig,
    /// The VM folder; relative paths in the config resolve against it.
    pub vm_dir: PathBuf,
    /// The VM's runtime directory (sockets, pid files); worker.sock goes here.
    pub runtime_dir: PathBuf,
    /// Restore from this saved-state directory instead of cold booting.
    pub restore_from: Option<PathBuf>,
    /// Accelerator: "kvm" or "tcg".
    pub accel: String,
    /// QEMU binary.
    pub qemu_binary: PathBuf,
    /// Run QEMU as this uid/gid (None = same user as the worker).
    pub qemu_uid: Option<u32>,
    pub qemu_gid: Option<u32>,
    /// Directories differencing parents may live in.
    pub allowed_disk_dirs: Vec<PathBuf>,
}

/// Encode one message as a line.
pub fn encode(msg: &impl Serialize) -> Result<String, serde_json::Error> {
    let mut s = serde_json::to_string(msg)?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn request_shape() {
        let r = Request {
            id: 7,
            op: Op::ShutDown { timeout_s: 30 },
        };
        let s = encode(&r).unwrap();
        assert_eq!(
            s,
            "{\"id\":7,\"op\":{\"op\":\"shut_down\",\"timeout_s\":30}}\n"
        );
        let m: Message = serde_json::from_str(s.trim()).unwrap();
        assert!(matches!(m, Message::Request(Request { id: 7, .. })));
        let e: Message = serde_json::from_str(r#"{"event":{"kind":"guest_ready"}}"#).unwrap();
        assert!(matches!(e, Message::Event(_)));
    }
}
