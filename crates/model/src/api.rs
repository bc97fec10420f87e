//! Request and response bodies of fvd's REST API.
//!
//! Timestamps are RFC 3339 strings (UTC). Percentages of CPU are "percent of one
//! logical processor" (200 = two full logical processors).
use crate::{NicConnection, NicKind, VmConfig, VmState};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use uuid::Uuid;

/// Which accelerator QEMU uses; `auto` picks KVM only where it really works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AccelSetting {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// What fvd does when a VM's worker or QEMU dies unexpectedly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RecoveryAction {
    /// Leave the VM Critical with the cause.
    None,
    /// Restart it once; a second crash within 10 minutes leaves it Critical.
    #[default]
    RestartOnce,
}

/// Host-wide settings (Hyper-V's host settings), stored in fvd's database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HostSettings {
    /// Where new VMs get their folder (`<vm_folder>/<id>/<id>.json`).
    pub vm_folder: PathBuf,
    /// Where new virtual disks are created by default.
    pub disk_folder: PathBuf,
    /// First address of the dynamic MAC pool (OUI 00:15:5D).
    pub mac_pool_start: String,
    /// Number of addresses in the pool.
    pub mac_pool_size: u32,
    /// Start VMs even when their memory exceeds what the host has available.
    pub allow_memory_overcommit: bool,
    /// Share of the host's CPU capacity VMs may reserve, in percent (the rest is the host's).
    pub cpu_reserve_pool_percent: u32,
    pub accel: AccelSetting,
    pub recovery_action: RecoveryAction,
    /// Seconds a graceful shut down may take before the job fails (or turns off with --force).
    pub shutdown_timeout_s: u64,
    /// Run each VM's worker confined to that VM's files (Landlock) and its QEMU
    /// under a uid of its own. Off only for debugging.
    #[serde(default = "default_true")]
    pub vm_isolation: bool,
    /// First uid (and gid) of the per-VM range; VM n runs QEMU as base + n.
    #[serde(default = "default_vm_uid_base")]
    pub vm_uid_base: u32,
    /// Folders DVD media may be inserted from while a VM runs (beside the VM's own folder).
    #[serde(default)]
    pub media_folders: Vec<PathBuf>,
}

fn default_true() -> bool {
    true
}

/// Above the ranges distributions and container tools hand out (subuids start at 100000).
pub const DEFAULT_VM_UID_BASE: u32 = 1_500_000_000;
/// Size of the per-VM uid range.
pub const VM_UID_RANGE: u32 = 1 << 20;

fn default_vm_uid_base() -> u32 {
    DEFAULT_VM_UID_BASE
}

/// Partial update of [`HostSettings`]; absent fields are left unchanged. On the wire
/// `PATCH /host` is a JSON merge patch of `HostSettings` (fvd turns it into this).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HostSettingsPatch {
    pub vm_folder: Option<PathBuf>,
    pub disk_folder: Option<PathBuf>,
    pub mac_pool_start: Option<String>,
    pub mac_pool_size: Option<u32>,
    pub allow_memory_overcommit: Option<bool>,
    pub cpu_reserve_pool_percent: Option<u32>,
    pub accel: Option<AccelSetting>,
    pub recovery_action: Option<RecoveryAction>,
    pub shutdown_timeout_s: Option<u64>,
    pub vm_isolation: Option<bool>,
    pub vm_uid_base: Option<u32>,
    pub media_folders: Option<Vec<PathBuf>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HostView {
    pub hostname: String,
    pub version: String,
    pub logical_cpus: u32,
    pub memory_total_mib: u64,
    pub memory_available_mib: u64,
    /// The accelerator new starts use ("kvm" or "tcg") and why.
    pub accel: String,
    pub accel_reason: String,
    /// "v1", "v2" or "none".
    pub cgroup: String,
    /// CPU capacity VMs may reserve, in percent of one logical processor.
    pub cpu_reserve_capacity_percent: u64,
    /// Reserved by VMs that are running now.
    pub cpu_reserved_percent: u64,
    /// Memory of VMs that are running now.
    pub memory_assigned_mib: u64,
    pub vms: u32,
    pub vms_running: u32,
    pub mac_pool_used: u32,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub settings: HostSettings,
    /// SHA-256 fingerprint of the TLS listener's certificate (when `--listen-tcp`),
    /// for remote callers to pin.
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VmView {
    pub id: Uuid,
    pub name: String,
    pub state: VmState,
    /// Why the VM is in this state (Critical causes, failed starts...).
    pub state_reason: Option<String>,
    /// The VM's folder; relative paths in the config resolve against it.
    pub vm_dir: PathBuf,
    pub config_path: PathBuf,
    pub config: VmConfig,
    pub has_saved_state: bool,
    pub worker_pid: Option<u32>,
    pub qemu_pid: Option<u32>,
    pub uptime_s: Option<u64>,
    /// COM port sockets (index 0 = COM1) while running; `fv vm console` connects here.
    pub com_sockets: Vec<Option<PathBuf>>,
    pub guest_ready: bool,
    pub accel: Option<String>,
    /// Heartbeat integration service, while running.
    #[serde(default)]
    pub heartbeat: Option<HeartbeatView>,
    /// What the guest reports through key-value exchange, while running.
    #[serde(default)]
    pub guest: Option<GuestInfo>,
    /// Filesystem freeze (backup integration service), while running.
    #[serde(default)]
    pub freeze: Option<FreezeStatus>,
}

/// VM health as seen by the heartbeat integration service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum HeartbeatStatus {
    Ok,
    /// The guest has not answered since the VM started (or was reset).
    #[default]
    NoContact,
    /// The guest answered before, and now misses consecutive heartbeats.
    LostCommunication,
    /// The heartbeat service is withdrawn for this VM.
    Disabled,
}

impl std::fmt::Display for HeartbeatStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeartbeatStatus::Ok => "ok",
            HeartbeatStatus::NoContact => "no_contact",
            HeartbeatStatus::LostCommunication => "lost_communication",
            HeartbeatStatus::Disabled => "disabled",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HeartbeatView {
    pub status: HeartbeatStatus,
    /// When the guest last answered (Unix seconds).
    pub last_answer: Option<u64>,
}

/// Guest facts from key-value exchange (guest-get-osinfo, -host-name,
/// -network-get-interfaces). Reported by the guest: informative, never trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GuestInfo {
    pub os_name: Option<String>,
    pub os_version: Option<String>,
    pub kernel_release: Option<String>,
    pub hostname: Option<String>,
    #[serde(default)]
    pub adapters: Vec<GuestAdapter>,
    /// When this was read from the guest (Unix seconds).
    pub updated_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GuestAdapter {
    /// Lower-case, colon-separated; matches the VM's network adapter MAC.
    pub mac: Option<String>,
    /// The guest's interface name (e.g. eth0).
    pub name: String,
    #[serde(default)]
    pub ipv4: Vec<String>,
    #[serde(default)]
    pub ipv6: Vec<String>,
}

/// Filesystem freeze state (backup integration service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FreezeStatus {
    pub frozen: bool,
    /// Filesystems frozen by the last freeze.
    pub filesystems: u64,
    /// When the worker thaws by itself (Unix seconds), while frozen.
    pub thaw_deadline: Option<u64>,
}

/// Body of `POST /vms/{id}/actions/freeze`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    /// Seconds until the filesystems are thawed even without a thaw call
    /// (default 60, at most 600).
    pub timeout_s: Option<u64>,
}

pub const FREEZE_DEFAULT_TIMEOUT_S: u64 = 60;
pub const FREEZE_MAX_TIMEOUT_S: u64 = 600;
/// Largest file `copy-file` accepts.
pub const COPY_FILE_MAX_BYTES: u64 = 4 << 30;

/// Body of `POST /vms`. Any other [`VmConfig`] field may be given too (it is merged onto
/// the defaults of the generation); `id` and `version` are chosen by fvd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NewVmRequest {
    pub name: String,
    pub generation: Option<crate::Generation>,
    /// Folder for this VM (default: `<host vm_folder>/<id>`).
    pub vm_dir: Option<PathBuf>,
    #[serde(flatten)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// Body of `POST /vms/{id}/nics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NicRequest {
    pub name: Option<String>,
    pub kind: Option<NicKind>,
    /// A static MAC; absent for a dynamic one from the host pool.
    pub static_mac: Option<String>,
    pub connection: Option<NicConnection>,
}

/// Body of `PATCH /vms/{id}/nics/{nic}`: change connection or MAC (MAC only when Off).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NicPatch {
    pub name: Option<String>,
    /// `Some("")` switches back to a dynamic MAC.
    pub static_mac: Option<String>,
    pub connection: Option<NicConnection>,
}

/// Body of `POST /vms/{id}/disks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    pub path: PathBuf,
    /// Slot; default: the first free one (IDE on generation 1, SCSI on generation 2).
    pub slot: Option<crate::Slot>,
    #[serde(default)]
    pub read_only: bool,
}

/// Body of `PUT /vms/{id}/dvd`: insert or eject (path absent) the medium of a DVD drive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DvdRequest {
    /// Drive index (default 0); a drive is added when the VM has none and is Off.
    #[serde(default)]
    pub index: usize,
    pub path: Option<PathBuf>,
}

/// Body of `POST /vms/{id}/actions/stop`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// Graceful shut down through the guest.
    #[default]
    ShutDown,
    /// Pull the plug.
    TurnOff,
    /// Save memory and device state.
    Save,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    #[serde(default)]
    pub mode: StopMode,
    /// With shut_down: turn off when the guest does not shut down in time.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    New,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            JobState::New => "new",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct JobView {
    pub id: Uuid,
    /// Operation name, e.g. `vm.start`.
    pub operation: String,
    pub vm_id: Option<Uuid>,
    pub vm_name: Option<String>,
    pub state: JobState,
    pub percent_complete: u8,
    pub error_code: Option<String>,
    pub error_description: Option<String>,
    pub created: String,
    pub started: Option<String>,
    pub ended: Option<String>,
    pub cancellable: bool,
    /// Free-form detail, e.g. who started it ("automatic start").
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EventView {
    /// Increasing sequence number; `GET /events?since=N` returns those after N
    /// (newest first), `?before=N` those before N.
    pub seq: i64,
    pub time: String,
    /// e.g. `vm.state_changed`, `job.completed`, `job.failed`, `vm.warning`, `vm.guest_ready`.
    pub kind: String,
    pub vm_id: Option<Uuid>,
    pub job_id: Option<Uuid>,
    pub message: String,
    pub state: Option<VmState>,
}

/// Every error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ApiErrorBody {
    /// Stable code: `not_found`, `invalid_state`, `bad_request`, `conflict`,
    /// `admission_refused`, `mac_pool_exhausted`, `worker_error`, `internal`.
    pub code: String,
    pub message: String,
    /// The operation that failed, e.g. `vm.start`.
    pub operation: String,
    /// The VM's current state, for `invalid_state`.
    pub state: Option<VmState>,
}
