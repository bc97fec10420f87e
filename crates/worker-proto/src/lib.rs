//! Control protocol between fvd and fv-worker.
//!
//! Transport: a Unix stream socket at `<runtime>/vms/<id>/worker.sock`, created by the
//! worker. Each line is one JSON [`Message`]. fvd sends [`Request`]s; the worker
//! answers each with a [`Response`] carrying the same `id`, and, once a connection
//! has sent [`Op::Subscribe`], pushes [`Event`]s on it. The worker outlives fvd: fvd
//! re-attaches after a restart simply by connecting again.
//!
//! Every answer is a typed [`Reply`] (tagged by `reply`). Requests run concurrently:
//! a long operation (Save) does not hold up Status, Pause or Turn Off; what may run
//! together is decided by `fv_model::state::allows`. A long operation started by
//! request `id` can be cancelled with [`Op::Cancel`]`{request: id}` on the same
//! connection. [`Op::AttachFd`] carries one file descriptor as SCM_RIGHTS ancillary
//! data on the bytes of its line (tap devices and opened files, later).
//!
//! When the worker reaches a final state it writes [`RESULT_NAME`] ([`FinalResult`])
//! in its runtime dir before it exits, so an fvd that was down at the time still
//! learns the real outcome.
#![forbid(unsafe_code)]

use fv_model::api::{FreezeStatus, GuestInfo, HeartbeatStatus, HeartbeatView};
pub use fv_model::state::{allows, Action, Refusal};
use fv_model::{IntegrationServices, VmState};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Protocol version; the worker refuses a `Hello` with another major.
pub const PROTOCOL_VERSION: u32 = 1;

/// Socket file name inside the VM's runtime directory.
pub const SOCKET_NAME: &str = "worker.sock";
/// PID file of the worker inside the VM's runtime directory.
pub const PID_NAME: &str = "worker.pid";
/// The worker's final outcome, kept in the runtime dir until fvd collects it.
pub const RESULT_NAME: &str = "result.json";

// One message per line, decoded and moved once: boxing the large reply would only
// add an allocation per message.
#[allow(clippy::large_enum_variant)]
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
    /// Replace the offered integration services (and the VM name published to the
    /// guest) while running.
    SetIntegration {
        services: IntegrationServices,
        #[serde(default)]
        vm_name: Option<String>,
    },
    /// Freeze the guest's filesystems; they are thawed at the latest after
    /// `timeout_s`. Answers `{filesystems, thaw_deadline}`.
    Freeze {
        timeout_s: u64,
    },
    /// Thaw the guest's filesystems. Answers `{filesystems}`.
    Thaw,
    /// Answers a `FreezeStatus` (the guest agent's view when it answers).
    FreezeStatus,
    /// Set the guest clock from the host now (time synchronisation service).
    SyncTime,
    /// Cancel the long operation started by request `request` on this connection
    /// (a save goes back to the state before it; the partial state is discarded).
    Cancel {
        request: u64,
    },
    /// Receive the file descriptor sent as SCM_RIGHTS with this line and keep it
    /// under `name` (replacing an earlier one). Answers what it is.
    AttachFd {
        name: String,
    },
    /// Copy the host file `src` (spooled by fvd into the runtime dir) to `dest` in the
    /// guest. Progress arrives as `CopyProgress { token }` events; the answer comes
    /// when done: `{bytes}`.
    CopyFile {
        src: PathBuf,
        dest: String,
        #[serde(default)]
        create_full_path: bool,
        #[serde(default)]
        overwrite: bool,
        #[serde(default)]
        token: String,
    },
}

impl Op {
    /// The op's wire name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello { .. } => "hello",
            Op::Status => "status",
            Op::Subscribe => "subscribe",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Reset => "reset",
            Op::TurnOff => "turn_off",
            Op::ShutDown { .. } => "shut_down",
            Op::Save { .. } => "save",
            Op::ChangeMedia { .. } => "change_media",
            Op::GuestPing => "guest_ping",
            Op::Stats => "stats",
            Op::SetIntegration { .. } => "set_integration",
            Op::Freeze { .. } => "freeze",
            Op::Thaw => "thaw",
            Op::FreezeStatus => "freeze_status",
            Op::SyncTime => "sync_time",
            Op::Cancel { .. } => "cancel",
            Op::AttachFd { .. } => "attach_fd",
            Op::CopyFile { .. } => "copy_file",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Reply>,
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
    /// The operation was cancelled (Cancel, or Turn Off pulled the plug under it).
    Cancelled,
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

/// A successful answer, one variant per kind of op (tagged `reply`; the fields sit
/// beside the tag).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The op was carried out and has nothing to report.
    Done,
    Hello {
        version: u32,
        vm_id: String,
        worker_pid: u32,
    },
    Status(WorkerStatus),
    /// A shut down was requested from the guest ("agent" or "acpi").
    ShutDown {
        method: String,
    },
    Saved {
        path: PathBuf,
        bytes: u64,
    },
    GuestPing {
        latency_ms: u64,
    },
    Stats(WorkerStats),
    Integration {
        integration_services: IntegrationServices,
    },
    Frozen {
        filesystems: u64,
        thaw_deadline: u64,
    },
    Thawed {
        filesystems: u64,
    },
    FreezeStatus(FreezeStatus),
    TimeSynced {
        guest_before_ns: i64,
        host_ns: i64,
        correction_ms: i64,
    },
    Copied {
        bytes: u64,
        dest: String,
    },
    /// The cancel reached its operation (which then answers `cancelled`).
    CancelRequested {
        request: u64,
    },
    /// What the descriptor passed with `AttachFd` refers to (fstat).
    FdAttached {
        name: String,
        dev: u64,
        ino: u64,
        /// "file", "socket", "char", "dir", "fifo", "block" or "other".
        file_type: String,
    },
}

/// Memory and CPU of one process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProcStats {
    pub pid: u32,
    pub rss_kib: Option<u64>,
    pub rss_anon_kib: Option<u64>,
    pub rss_shmem_kib: Option<u64>,
    pub cpu_s: f64,
}

/// I/O counters of one served disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct DiskStats {
    pub path: PathBuf,
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub errors: u64,
}

/// Answer to `Stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct WorkerStats {
    pub worker: ProcStats,
    pub qemu: Option<ProcStats>,
    pub disks: Vec<DiskStats>,
}

/// What a worker leaves in [`RESULT_NAME`] when it reaches a final state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinalResult {
    pub vm_id: String,
    /// Off, Saved or Critical.
    pub state: VmState,
    pub reason: Option<String>,
    /// Set when `state` is Saved: the saved-state directory, complete and fsynced.
    #[serde(default)]
    pub saved_dir: Option<PathBuf>,
    /// Unix seconds.
    pub at: u64,
}

/// Answer to `Status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub vm_id: String,
    pub state: VmState,
    /// Why the VM is in this state (a Critical VM's cause), when there is a reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// Long operations running now (op names, e.g. "save").
    #[serde(default)]
    pub operations: Vec<String>,
    pub worker_pid: u32,
    pub qemu_pid: Option<u32>,
    /// Seconds since QEMU started.
    pub uptime_s: u64,
    /// Paths of COM port sockets (index 0 = COM1).
    pub com_sockets: Vec<Option<PathBuf>>,
    pub guest_agent_connected: bool,
    /// MACs actually in use, per adapter in config order.
    pub macs: Vec<String>,
    #[serde(default)]
    pub heartbeat: HeartbeatView,
    /// Key-value exchange: the guest's last report.
    #[serde(default)]
    pub guest: Option<GuestInfo>,
    #[serde(default)]
    pub freeze: FreezeStatus,
    /// The services the worker currently offers.
    #[serde(default)]
    pub integration_services: IntegrationServices,
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
    /// A long operation's progress; `request` is the id of the request that started
    /// it on the connection that sent it (0 when unknown).
    OperationProgress {
        request: u64,
        op: String,
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
    /// Heartbeat status changed (never changes the VM state).
    HeartbeatChanged {
        status: HeartbeatStatus,
        last_answer: Option<u64>,
    },
    /// The guest clock was set from the host; `correction_ms` = host - guest before.
    TimeSynced {
        reason: String,
        guest_before_ns: i64,
        host_ns: i64,
        correction_ms: i64,
    },
    Frozen {
        filesystems: u64,
        thaw_deadline: u64,
    },
    /// `reason`: "requested", "timeout", "save", "shut down", "turn off", ...
    Thawed {
        filesystems: u64,
        reason: String,
    },
    CopyProgress {
        token: String,
        percent: u8,
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
    /// Confine the worker (and so its QEMU) to this VM's files with Landlock before
    /// it opens anything (see fv-worker's confine.rs). Off only for debugging.
    #[serde(default = "default_true")]
    pub confine: bool,
    /// Folders DVD media may be inserted from while the VM runs (read-only), beside
    /// the VM folder and the media present at start.
    #[serde(default)]
    pub media_dirs: Vec<PathBuf>,
    /// Directories the worker hides from itself and QEMU (fvd's runtime root with
    /// every VM's sockets and the API socket, `/run`); its own runtime dir stays.
    #[serde(default)]
    pub private_dirs: Vec<PathBuf>,
    /// The host's name, published to the guest by key-value exchange.
    #[serde(default)]
    pub host_name: String,
    /// Integration service timings (tests shorten them).
    #[serde(default)]
    pub integration_tuning: IntegrationTuning,
}

/// Timings of the integration services.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct IntegrationTuning {
    /// Heartbeat: ping interval and per-ping timeout.
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// Consecutive missed pings after which communication counts as lost.
    pub heartbeat_misses: u32,
    /// Key-value exchange: how often guest facts are re-read.
    pub kvp_interval_ms: u64,
    /// Resume after a pause longer than this sets the guest clock.
    pub time_sync_after_pause_ms: u64,
}

impl Default for IntegrationTuning {
    fn default() -> Self {
        IntegrationTuning {
            heartbeat_interval_ms: 5000,
            heartbeat_timeout_ms: 2000,
            heartbeat_misses: 2,
            kvp_interval_ms: 10_000,
            time_sync_after_pause_ms: 10_000,
        }
    }
}

fn default_true() -> bool {
    true
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

    #[test]
    fn typed_replies_keep_their_fields_beside_the_tag() {
        let r = Response {
            id: 3,
            ok: Some(Reply::ShutDown {
                method: "acpi".into(),
            }),
            error: None,
        };
        let s = encode(&r).unwrap();
        assert_eq!(
            s,
            "{\"id\":3,\"ok\":{\"reply\":\"shut_down\",\"method\":\"acpi\"}}\n"
        );
        let m: Message = serde_json::from_str(s.trim()).unwrap();
        let Message::Response(back) = m else {
            panic!("not a response: {s}")
        };
        assert_eq!(back.ok, r.ok);
        let st = Reply::FreezeStatus(FreezeStatus {
            frozen: true,
            filesystems: 2,
            thaw_deadline: Some(9),
        });
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["reply"], "freeze_status");
        assert_eq!(v["filesystems"], 2);
        assert_eq!(serde_json::from_value::<Reply>(v).unwrap(), st);
        let d: Message = serde_json::from_str(r#"{"id":1,"ok":{"reply":"done"}}"#).unwrap();
        assert!(matches!(
            d,
            Message::Response(Response {
                ok: Some(Reply::Done),
                ..
            })
        ));
    }
}
