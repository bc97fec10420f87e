//! The VM manager: registry, state machine, admission control, MAC pool, workers.
//!
//! Locking: `vms` (a plain mutex) is never held across an await. State transitions that
//! must be atomic with their checks (start's admission, save, stop) happen under it.
use crate::access;
use crate::db::{Db, VmRow};
use crate::events::Events;
use crate::host::{self, Cgroups};
use crate::jobs::{JobHandle, Jobs};
use crate::util;
use crate::worker::{CallError, WorkerConn, WorkerMsg};
use fv_model::api::*;
use fv_model::state::{allows, Action};
use fv_model::{
    AutomaticStartAction, AutomaticStopAction, ControllerKind, DvdDrive, Generation, HardDrive,
    NetworkAdapter, NicConnection, NicKind, Slot, VmConfig, VmState,
};
use fv_worker_proto::{Event, LaunchSpec, Op, WorkerStatus};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

// Integration services (freeze/thaw, copy-file, worker integration events).
#[path = "integration.rs"]
mod integration;

/// An error of a manager operation, mapped to an HTTP status by the API layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MgrError {
    #[error("{0}")]
    NotFound(String),
    /// The caller lacks a right on a host path it named (crate::access).
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    InvalidState { message: String, state: VmState },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Admission(String),
    #[error("{0}")]
    MacPoolExhausted(String),
    #[error("{0}")]
    Internal(String),
    /// No guest agent (or the backup service is withdrawn): application-consistent
    /// operations cannot run.
    #[error("{0}")]
    GuestAgentUnavailable(String),
    /// The integration service an operation needs is withdrawn for the VM.
    #[error("{0}")]
    ServiceDisabled(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    TooLarge(String),
}

impl MgrError {
    pub fn code(&self) -> &'static str {
        match self {
            MgrError::NotFound(_) => "not_found",
            MgrError::Forbidden(_) => "forbidden",
            MgrError::InvalidState { .. } => "invalid_state",
            MgrError::BadRequest(_) => "bad_request",
            MgrError::Conflict(_) => "conflict",
            MgrError::Admission(_) => "admission_refused",
            MgrError::MacPoolExhausted(_) => "mac_pool_exhausted",
            MgrError::Internal(_) => "internal",
            MgrError::GuestAgentUnavailable(_) => "guest_agent_unavailable",
            MgrError::ServiceDisabled(_) => "integration_service_disabled",
            MgrError::InsufficientStorage(_) => "insufficient_storage",
            MgrError::TooLarge(_) => "payload_too_large",
        }
    }
}

fn internal(e: impl std::fmt::Display) -> MgrError {
    MgrError::Internal(e.to_string())
}

pub type Result<T> = std::result::Result<T, MgrError>;

/// Messages from all worker connections: (VM, connection serial, message).
pub type WorkerRx = mpsc::UnboundedReceiver<(Uuid, u64, WorkerMsg)>;

/// Where things live and which binaries fvd uses.
#[derive(Debug, Clone)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub worker_bin: PathBuf,
    pub qemu_binary: PathBuf,
}

/// Exit fvd expects from a worker (so its end is not a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Off,
    Saved,
}

struct Vm {
    config: VmConfig,
    row: VmRow,
    worker: Option<Arc<WorkerConn>>,
    status: Option<(WorkerStatus, Instant)>,
    expect: Option<Expect>,
    guest_ready: bool,
    accel: Option<String>,
    last_exit: Option<String>,
    last_recovery: Option<Instant>,
    shutdown_timed_out: bool,
    /// Job to which SaveProgress events are reported.
    progress_job: Option<JobHandle>,
    /// Copy-file jobs by the token their CopyProgress events carry.
    copy_jobs: HashMap<String, JobHandle>,
}

impl Vm {
    fn vm_dir(&self) -> PathBuf {
        self.row
            .config_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }
    /// Counts against the host's CPU/memory: a worker exists or is being started.
    fn active(&self) -> bool {
        self.worker.is_some() || fv_model::state::has_qemu(self.row.state)
    }
}

pub struct Manager {
    pub paths: Paths,
    pub db: Arc<Db>,
    pub events: Events,
    pub jobs: Arc<Jobs>,
    pub cgroups: Cgroups,
    settings: Mutex<HostSettings>,
    vms: Mutex<HashMap<Uuid, Vm>>,
    worker_tx: mpsc::UnboundedSender<(Uuid, u64, WorkerMsg)>,
    changed: watch::Sender<u64>,
    pub shutdown: tokio::sync::Notify,
    shutting_down: AtomicBool,
}

fn default_settings(state_dir: &Path) -> HostSettings {
    HostSettings {
        vm_folder: state_dir.join("vms"),
        disk_folder: state_dir.join("disks"),
        mac_pool_start: host::default_mac_pool_start(),
        mac_pool_size: 256,
        allow_memory_overcommit: false,
        cpu_reserve_pool_percent: 100,
        accel: AccelSetting::Auto,
        recovery_action: RecoveryAction::RestartOnce,
        shutdown_timeout_s: 120,
        vm_isolation: true,
        vm_uid_base: fv_model::api::DEFAULT_VM_UID_BASE,
        media_folders: vec![state_dir.join("media")],
    }
}

const HW_EDITABLE_WHEN_ON: &[&str] = &[
    "name",
    "notes",
    "automatic_start_action",
    "automatic_start_delay_s",
    "automatic_stop_action",
    // Pushed to the running worker (SetIntegration).
    "integration_services",
];

fn read_config(path: &Path) -> std::result::Result<VmConfig, String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&s).map_err(|e| format!("cannot parse {}: {e}", path.display()))
}

fn write_config(path: &Path, c: &VmConfig) -> Result<()> {
    let s = serde_json::to_vec_pretty(c).map_err(internal)?;
    util::atomic_write(path, &s).map_err(|e| io_err("write", path, e))
}

/// A file-system error on `path`: a full disk (or quota) is 507 naming the path,
/// anything else an internal error saying what failed.
fn io_err(what: &str, path: &Path, e: std::io::Error) -> MgrError {
    if util::is_no_space(&e) {
        MgrError::InsufficientStorage(format!(
            "cannot {what} {}: no space left on its file system ({e}); nothing was changed",
            path.display()
        ))
    } else if util::is_callers_path_error(&e) {
        // The path the caller (or the host settings) gave cannot be used: not a
        // folder, a file in the way, too long, NUL, read-only file system.
        MgrError::BadRequest(format!(
            "cannot {what} {}: {}",
            path.display(),
            util::log_safe(&e.to_string())
        ))
    } else {
        MgrError::Internal(format!("cannot {what} {}: {e}", path.display()))
    }
}

/// The final result a worker left in its runtime dir, if it is this VM's.
fn read_result(rt: &Path, id: Uuid) -> Option<fv_worker_proto::FinalResult> {
    let b = std::fs::read(rt.join(fv_worker_proto::RESULT_NAME)).ok()?;
    let r: fv_worker_proto::FinalResult = serde_json::from_slice(&b).ok()?;
    (r.vm_id == id.to_string()).then_some(r)
}

fn log_tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

impl Manager {
    pub fn open(paths: Paths) -> anyhow::Result<(Arc<Manager>, WorkerRx)> {
        std::fs::create_dir_all(&paths.state_dir)?;
        std::fs::create_dir_all(paths.runtime_dir.join("vms"))?;
        std::fs::create_dir_all(paths.state_dir.join("logs"))?;
        let db = Arc::new(Db::open(&paths.state_dir.join("fvd.db"))?);
        let settings = match db.settings()? {
            Some(s) => s,
            None => {
                let s = default_settings(&paths.state_dir);
                db.put_settings(&s)?;
                s
            }
        };
        let events = Events::new(db.clone());
        let jobs = Jobs::new(db.clone(), events.clone());
        let (worker_tx, worker_rx) = mpsc::unbounded_channel();
        let (changed, _) = watch::channel(0);
        let m = Arc::new(Manager {
            paths,
            db,
            events,
            jobs,
            cgroups: Cgroups::detect(),
            settings: Mutex::new(settings),
            vms: Mutex::new(HashMap::new()),
            worker_tx,
            changed,
            shutdown: tokio::sync::Notify::new(),
            shutting_down: AtomicBool::new(false),
        });
        Ok((m, worker_rx))
    }

    /// Dispatch worker events forever.
    pub async fn run_worker_events(self: Arc<Self>, mut rx: WorkerRx) {
        while let Some((vm, serial, msg)) = rx.recv().await {
            self.on_worker_msg(vm, serial, msg);
        }
    }

    pub fn settings(&self) -> HostSettings {
        self.settings.lock().clone()
    }

    pub fn update_settings(&self, p: HostSettingsPatch) -> Result<HostSettings> {
        let mut s = self.settings();
        if let Some(v) = p.vm_folder {
            s.vm_folder = v;
        }
        if let Some(v) = p.disk_folder {
            s.disk_folder = v;
        }
        if let Some(v) = p.mac_pool_start {
            let m = host::parse_mac(&v).ok_or_else(|| {
                MgrError::BadRequest(format!("mac_pool_start: {v:?} is not a MAC address"))
            })?;
            s.mac_pool_start = host::format_mac(m);
        }
        if let Some(v) = p.mac_pool_size {
            if !(1..=65536).contains(&v) {
                return Err(MgrError::BadRequest("mac_pool_size must be 1-65536".into()));
            }
            s.mac_pool_size = v;
        }
        if let Some(v) = p.allow_memory_overcommit {
            s.allow_memory_overcommit = v;
        }
        if let Some(v) = p.cpu_reserve_pool_percent {
            if v > 100 {
                return Err(MgrError::BadRequest(
                    "cpu_reserve_pool_percent must be 0-100".into(),
                ));
            }
            s.cpu_reserve_pool_percent = v;
        }
        if let Some(v) = p.accel {
            s.accel = v;
        }
        if let Some(v) = p.recovery_action {
            s.recovery_action = v;
        }
        if let Some(v) = p.shutdown_timeout_s {
            s.shutdown_timeout_s = v;
        }
        if let Some(v) = p.vm_isolation {
            s.vm_isolation = v;
        }
        if let Some(v) = p.vm_uid_base {
            if v < 65536 || v.checked_add(fv_model::api::VM_UID_RANGE).is_none() {
                return Err(MgrError::BadRequest(format!(
                    "vm_uid_base must leave room for {} uids above 65535",
                    fv_model::api::VM_UID_RANGE
                )));
            }
            s.vm_uid_base = v;
        }
        if let Some(v) = p.media_folders {
            if let Some(bad) = v.iter().find(|p| !p.is_absolute()) {
                return Err(MgrError::BadRequest(format!(
                    "media folder {} is not an absolute path",
                    bad.display()
                )));
            }
            s.media_folders = v;
        }
        let start = host::parse_mac(&s.mac_pool_start).unwrap_or(0);
        if start + s.mac_pool_size as u64 > 1 << 48 {
            return Err(MgrError::BadRequest(
                "the MAC pool runs past FF:FF:FF:FF:FF:FF".into(),
            ));
        }
        self.db.put_settings(&s).map_err(|e| self.db_err(e))?;
        *self.settings.lock() = s.clone();
        self.events.emit(
            "host.reconfigured",
            None,
            None,
            "host settings changed".into(),
            None,
        );
        Ok(s)
    }

    /// A database error: a full disk is 507 naming the database file.
    fn db_err(&self, e: crate::db::DbError) -> MgrError {
        let path = self.paths.state_dir.join("fvd.db");
        if e.is_disk_full() {
            MgrError::InsufficientStorage(format!(
                "cannot write {}: no space left on its file system ({e}); nothing was changed",
                path.display()
            ))
        } else {
            MgrError::Internal(format!("{}: {e}", path.display()))
        }
    }

    pub fn host_view(&self) -> HostView {
        let s = self.settings();
        let (total, avail) = util::meminfo_mib();
        let (accel, why) = host::resolve_accel(s.accel);
        let cpus = util::logical_cpus();
        let vms = self.vms.lock();
        let active: Vec<&Vm> = vms.values().filter(|v| v.active()).collect();
        HostView {
            hostname: util::hostname(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            logical_cpus: cpus,
            memory_total_mib: total,
            memory_available_mib: avail,
            accel,
            accel_reason: why,
            cgroup: self.cgroups.name().to_string(),
            cpu_reserve_capacity_percent: cpus as u64 * s.cpu_reserve_pool_percent as u64,
            cpu_reserved_percent: active
                .iter()
                .map(|v| v.config.cpu.reserve_percent as u64 * v.config.cpu.count as u64)
                .sum(),
            memory_assigned_mib: active.iter().map(|v| v.config.memory_mib).sum(),
            vms: vms.len() as u32,
            vms_running: active.len() as u32,
            mac_pool_used: self.db.macs().map(|m| m.len() as u32).unwrap_or(0),
            state_dir: self.paths.state_dir.clone(),
            runtime_dir: self.paths.runtime_dir.clone(),
            settings: s,
            tls_fingerprint: crate::tls::fingerprint(),
        }
    }

    // ---------- registry ----------

    /// Find a VM by id or (unique) name.
    pub fn resolve(&self, key: &str) -> Result<Uuid> {
        let vms = self.vms.lock();
        if let Ok(id) = Uuid::parse_str(key) {
            if vms.contains_key(&id) {
                return Ok(id);
            }
        }
        let hits: Vec<Uuid> = vms
            .values()
            .filter(|v| v.config.name == key)
            .map(|v| v.config.id)
            .collect();
        match hits.len() {
            0 => Err(MgrError::NotFound(format!(
                "no VM named or with id {key:?}"
            ))),
            1 => Ok(hits[0]),
            n => Err(MgrError::Conflict(format!(
                "{n} VMs are named {key:?}; use the id"
            ))),
        }
    }

    /// Every VM `key` may name: the VM with that id, else all VMs with that name
    /// (the authorization layer keeps those the caller may see).
    pub fn ids_for(&self, key: &str) -> Vec<Uuid> {
        let vms = self.vms.lock();
        if let Ok(id) = Uuid::parse_str(key) {
            if vms.contains_key(&id) {
                return vec![id];
            }
        }
        vms.values()
            .filter(|v| v.config.name == key)
            .map(|v| v.config.id)
            .collect()
    }

    pub fn list(&self) -> Vec<VmView> {
        let vms = self.vms.lock();
        let mut v: Vec<VmView> = vms.values().map(|vm| self.view_of(vm)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        v
    }

    fn view_of(&self, vm: &Vm) -> VmView {
        let live = match &vm.status {
            Some((s, _)) if vm.worker.is_some() => Some(s),
            _ => None,
        };
        let (worker_pid, qemu_pid, uptime, com) = match &vm.status {
            Some((s, at)) if vm.worker.is_some() => (
                Some(s.worker_pid),
                s.qemu_pid,
                Some(s.uptime_s + at.elapsed().as_secs()),
                s.com_sockets.clone(),
            ),
            _ => (None, None, None, vec![]),
        };
        VmView {
            id: vm.config.id,
            name: vm.config.name.clone(),
            state: vm.row.state,
            state_reason: vm.row.state_reason.clone(),
            vm_dir: vm.vm_dir(),
            config_path: vm.row.config_path.clone(),
            config: vm.config.clone(),
            has_saved_state: vm.row.saved_dir.is_some(),
            worker_pid,
            qemu_pid,
            uptime_s: uptime,
            com_sockets: com,
            guest_ready: vm.guest_ready,
            accel: if vm.worker.is_some() {
                vm.accel.clone()
            } else {
                None
            },
            heartbeat: live.map(|s| s.heartbeat),
            guest: live.and_then(|s| s.guest.clone()),
            freeze: live.map(|s| s.freeze),
        }
    }

    /// The VM's view, with fresh worker status when it has a worker.
    pub async fn view(&self, id: Uuid) -> Result<VmView> {
        let w = self.vms.lock().get(&id).and_then(|v| v.worker.clone());
        if let Some(w) = w {
            if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(3), w.status()).await {
                if let Some(vm) = self.vms.lock().get_mut(&id) {
                    if vm.worker.as_ref().is_some_and(|x| x.serial == w.serial) {
                        vm.status = Some((st, Instant::now()));
                    }
                }
            }
        }
        let vms = self.vms.lock();
        let vm = vms
            .get(&id)
            .ok_or_else(|| MgrError::NotFound(format!("VM {id} is gone")))?;
        Ok(self.view_of(vm))
    }

    fn set_state(&self, id: Uuid, state: VmState, reason: Option<String>) {
        let mut vms = self.vms.lock();
        let Some(vm) = vms.get_mut(&id) else { return };
        self.set_state_locked(vm, state, reason);
    }

    fn set_state_locked(&self, vm: &mut Vm, state: VmState, reason: Option<String>) {
        let changed = vm.row.state != state || vm.row.state_reason != reason;
        vm.row.state = state;
        vm.row.state_reason = reason.clone();
        if matches!(state, VmState::Running | VmState::Paused) {
            vm.row.was_running = true;
        } else if matches!(state, VmState::Off) {
            vm.row.was_running = false;
        }
        if let Err(e) = self.db.put_vm(&vm.row) {
            tracing::error!("cannot store VM state: {e}");
        }
        if changed {
            let msg = match &reason {
                Some(r) => format!("{} is {state}: {r}", vm.config.name),
                None => format!("{} is {state}", vm.config.name),
            };
            self.events.emit(
                "vm.state_changed",
                Some(vm.config.id),
                None,
                msg,
                Some(state),
            );
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// The state table's verdict on `action` for this VM (fv_model::state).
    fn refuse(vm: &Vm, action: Action) -> Result<()> {
        allows(vm.row.state, action).map_err(|r| {
            let state = vm.row.state;
            let extra = match &vm.row.state_reason {
                Some(x) if state == VmState::Critical => format!(" ({x})"),
                _ => String::new(),
            };
            MgrError::InvalidState {
                message: format!(
                    "cannot {} VM {:?}: it is {state}: {}{extra}",
                    r.action, vm.config.name, r.why
                ),
                state,
            }
        })
    }

    fn invalid_state(vm: &Vm, action: &str) -> MgrError {
        let state = vm.row.state;
        let extra = match &vm.row.state_reason {
            Some(r) if state == VmState::Critical => format!(" ({r})"),
            _ => String::new(),
        };
        MgrError::InvalidState {
            message: format!(
                "cannot {action} VM {:?}: it is {state}{extra}",
                vm.config.name
            ),
            state,
        }
    }

    /// Apply `patch` to `base` as a JSON merge patch (RFC 7396: objects merge at every
    /// depth, `null` removes a member so it takes its default). Unknown members are
    /// refused by name; type errors name the field.
    fn merge(
        base: &VmConfig,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<VmConfig> {
        let mut v = serde_json::to_value(base).map_err(internal)?;
        let mut patch = patch.clone();
        for k in ["id", "version"] {
            if let Some(val) = patch.get(k) {
                if v.get(k) != Some(val) {
                    return Err(MgrError::BadRequest(format!("{k} cannot be changed")));
                }
            }
        }
        if let Some(n) = patch.get_mut("network_adapters") {
            *n = Self::fill_nics(n.take());
        }
        util::merge_patch(&mut v, &serde_json::Value::Object(patch));
        util::from_value_strict(v)
            .map_err(|e| MgrError::BadRequest(format!("invalid configuration: {e}")))
    }

    /// Let callers omit ids/names/MAC fields of new adapters.
    fn fill_nics(v: serde_json::Value) -> serde_json::Value {
        let serde_json::Value::Array(items) = v else {
            return v;
        };
        let items = items
            .into_iter()
            .enumerate()
            .map(|(i, mut n)| {
                if let Some(o) = n.as_object_mut() {
                    o.entry("id")
                        .or_insert_with(|| serde_json::Value::String(Uuid::new_v4().to_string()));
                    o.entry("name").or_insert_with(|| {
                        serde_json::Value::String(format!("Network Adapter {}", i + 1))
                    });
                    o.entry("kind")
                        .or_insert_with(|| serde_json::json!("synthetic"));
                    o.entry("static_mac").or_insert(serde_json::Value::Null);
                    o.entry("dynamic_mac").or_insert(serde_json::Value::Null);
                    o.entry("connection")
                        .or_insert_with(|| serde_json::json!({"type": "not_connected"}));
                }
                n
            })
            .collect();
        serde_json::Value::Array(items)
    }

    /// Checks beyond `VmConfig::validate`: what a caller may give (names, sizes; values
    /// unchanged from `old` are not checked again), host limits and MAC uniqueness.
    fn check_config(
        &self,
        c: &mut VmConfig,
        vms: &HashMap<Uuid, Vm>,
        old: Option<&VmConfig>,
    ) -> Result<()> {
        c.validate()
            .map_err(|e| MgrError::BadRequest(format!("invalid configuration: {e}")))?;
        // Host limits first: they say more about a huge value than its alignment.
        let (total_mib, _) = util::meminfo_mib();
        if total_mib > 0
            && c.memory_mib > total_mib
            && old.is_none_or(|o| o.memory_mib != c.memory_mib)
        {
            return Err(MgrError::BadRequest(format!(
                "invalid configuration: memory_mib: {} MiB is more than this host's {total_mib} MiB of memory",
                c.memory_mib
            )));
        }
        let cpus = util::logical_cpus();
        if c.cpu.count > cpus {
            return Err(MgrError::BadRequest(format!(
                "invalid configuration: cpu.count: {} virtual processors requested; this host has {cpus} logical processors",
                c.cpu.count
            )));
        }
        fv_model::validate_input(c, old)
            .map_err(|e| MgrError::BadRequest(format!("invalid configuration: {e}")))?;
        let mut seen: Vec<String> = Vec::new();
        for n in c.network_adapters.iter_mut() {
            if let Some(m) = &n.static_mac {
                let norm = host::normalize_static_mac(m).ok_or_else(|| {
                    MgrError::BadRequest(format!("{m:?} is not a unicast MAC address"))
                })?;
                n.static_mac = Some(norm);
            }
            if let Some(m) = n.mac() {
                if seen.iter().any(|s| s == m) {
                    return Err(MgrError::Conflict(format!(
                        "MAC {m} is used twice in this VM"
                    )));
                }
                seen.push(m.to_string());
            }
        }
        for other in vms.values().filter(|o| o.config.id != c.id) {
            for n in &other.config.network_adapters {
                if let Some(m) = n.mac() {
                    if c.network_adapters
                        .iter()
                        .any(|x| x.static_mac.as_deref() == Some(m))
                    {
                        return Err(MgrError::Conflict(format!(
                            "MAC {m} is already used by VM {:?}",
                            other.config.name
                        )));
                    }
                }
            }
        }
        // A static MAC that is currently handed out by the pool would collide later.
        if let Ok(alloc) = self.db.macs() {
            for (m, vm, _) in alloc {
                if vm != c.id
                    && c.network_adapters
                        .iter()
                        .any(|x| x.static_mac.as_deref() == Some(m.as_str()))
                {
                    return Err(MgrError::Conflict(format!(
                        "MAC {m} is allocated from the pool to another VM"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn create(&self, req: NewVmRequest) -> Result<VmView> {
        fv_model::check_name("name", &req.name)
            .map_err(|e| MgrError::BadRequest(format!("invalid configuration: {e}")))?;
        let base = VmConfig::new(&req.name, req.generation.unwrap_or(Generation::Gen2));
        let mut patch = req.config.clone();
        patch.remove("id");
        patch.remove("version");
        let mut c = Self::merge(&base, &patch)?;
        if let Some(d) = &req.vm_dir {
            fv_model::check_path("vm_dir", d)
                .map_err(|e| MgrError::BadRequest(format!("invalid configuration: {e}")))?;
            if !d.is_absolute() {
                return Err(MgrError::BadRequest(format!(
                    "invalid configuration: vm_dir: {} is not an absolute path",
                    d.display()
                )));
            }
        }
        let dir = req
            .vm_dir
            .clone()
            .unwrap_or_else(|| self.settings().vm_folder.join(c.id.to_string()));
        let config_path = dir.join(format!("{}.json", c.id));
        let who = access::current();
        self.check_access(&who, &dir, None, &c, req.vm_dir.as_deref())?;
        let mut vms = self.vms.lock();
        self.check_config(&mut c, &vms, None)?;
        Self::check_files(&c, &dir)?;
        // A failure from here on removes what this call made (folders, config), so a
        // full disk leaves nothing behind.
        let made = util::create_dir_all_new(&dir).map_err(|e| io_err("create", &dir, e))?;
        if let Err(e) = write_config(&config_path, &c) {
            util::remove_dirs(&made);
            return Err(e);
        }
        let row = VmRow {
            id: c.id,
            config_path,
            state: VmState::Off,
            state_reason: None,
            saved_dir: None,
            was_running: false,
        };
        if let Err(e) = self.db.put_vm(&row) {
            let _ = std::fs::remove_file(&row.config_path);
            util::remove_dirs(&made);
            return Err(self.db_err(e));
        }
        let mut created = made.clone();
        created.push(row.config_path.clone());
        self.record_access(c.id, &who, None, &c, Some(created));
        let vm = Vm::new(c, row);
        let view = self.view_of(&vm);
        self.events.emit(
            "vm.created",
            Some(view.id),
            None,
            format!("VM {:?} created", view.name),
            Some(VmState::Off),
        );
        vms.insert(view.id, vm);
        Ok(view)
    }

    fn resolve_path(dir: &Path, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    }

    // ---------- host paths follow the caller (crate::access) ----------

    /// The storage roots: where callers other than root may name paths.
    fn storage_roots(&self) -> Vec<PathBuf> {
        let s = self.settings();
        let mut v = vec![s.vm_folder, s.disk_folder];
        v.extend(s.media_folders);
        v
    }

    fn access_err(e: access::AccessError) -> MgrError {
        match e {
            access::AccessError::Denied { .. } => MgrError::Forbidden(e.to_string()),
            access::AccessError::Missing { .. } => MgrError::BadRequest(e.to_string()),
            access::AccessError::Internal(_) => MgrError::Internal(e.to_string()),
        }
    }

    /// Check, for `who`, the paths `new` names that `old` did not (or named with
    /// fewer rights), and a VM folder the caller chose.
    fn check_access(
        &self,
        who: &access::Requester,
        dir: &Path,
        old: Option<&VmConfig>,
        new: &VmConfig,
        vm_dir: Option<&Path>,
    ) -> Result<()> {
        if *who == access::Requester::Unrestricted {
            return Ok(());
        }
        let before = old.map(access::named_paths).unwrap_or_default();
        let wants: Vec<access::Want> = access::named_paths(new)
            .into_iter()
            .filter(|(p, u, w)| {
                !before
                    .iter()
                    .any(|(bp, bu, bw)| bp == p && bu == u && (*bw || !*w))
            })
            .map(|(p, u, w)| access::want(dir, &p, u, w))
            .collect();
        let dirs: Vec<PathBuf> = vm_dir.map(Path::to_path_buf).into_iter().collect();
        access::check(who, &wants, &dirs, &self.storage_roots()).map_err(Self::access_err)
    }

    /// Record who attached each path `new` names (paths kept from `old` keep their
    /// owner) and, for a new VM, what fvd created for it.
    fn record_access(
        &self,
        id: Uuid,
        who: &access::Requester,
        old: Option<&VmConfig>,
        new: &VmConfig,
        created: Option<Vec<PathBuf>>,
    ) {
        let mut rec = access::Record::load(&self.paths.state_dir, id);
        let before = old.map(access::named_paths).unwrap_or_default();
        let mut attached = Vec::new();
        for (p, u, w) in access::named_paths(new) {
            let kept = before
                .iter()
                .any(|(bp, bu, bw)| *bp == p && *bu == u && (*bw || !w));
            let owner = match (kept, rec.owner_of(&p, u, w)) {
                (true, Some(o)) => Some(o.clone()),
                // Configured before owners were recorded: stays unrecorded.
                (true, None) => None,
                (false, _) => Some(who.owner()),
            };
            if let Some(owner) = owner {
                attached.push(access::Attached {
                    path: p,
                    usage: u,
                    write: w,
                    owner,
                });
            }
        }
        rec.attached = attached;
        if let Some(c) = created {
            rec.created = c;
        }
        if let Err(e) = rec.save(&self.paths.state_dir, id) {
            tracing::error!("VM {id}: cannot record who attached its files: {e}");
        }
    }

    /// At start: every path is checked again with the rights of whoever attached it
    /// (the file may have changed since). Paths with no recorded owner (configured
    /// outside the API, e.g. an edited config file) are checked as the caller
    /// starting the VM, or, when fvd starts it itself, against the storage roots.
    /// A VM with no record at all was configured before fvd recorded owners: its
    /// paths are kept as they are (recorded as root's), as they were allowed then.
    fn recheck_access(&self, id: Uuid) -> Result<()> {
        let (c, dir) = {
            let vms = self.vms.lock();
            let vm = vms
                .get(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            (vm.config.clone(), vm.vm_dir())
        };
        let sd = &self.paths.state_dir;
        if !sd.join("access").join(format!("{id}.json")).exists() {
            self.record_access(id, &access::Requester::Unrestricted, None, &c, None);
            return Ok(());
        }
        let rec = access::Record::load(sd, id);
        let caller = access::current();
        let fallback = if caller == access::Requester::Unrestricted && !access::in_request() {
            // fvd's own start (auto-start, recovery): the host-wide rule only.
            access::Requester::Host
        } else {
            caller
        };
        let mut by: Vec<(access::Requester, Vec<access::Want>)> = Vec::new();
        for (p, u, w) in access::named_paths(&c) {
            let who = rec
                .owner_of(&p, u, w)
                .map(access::Requester::from_owner)
                .unwrap_or_else(|| fallback.clone());
            let want = access::want(&dir, &p, u, w);
            match by.iter_mut().find(|(r, _)| *r == who) {
                Some((_, v)) => v.push(want),
                None => by.push((who, vec![want])),
            }
        }
        let roots = self.storage_roots();
        for (who, wants) in by {
            access::check(&who, &wants, &[], &roots).map_err(|e| {
                let mut m = Self::access_err(e);
                if let MgrError::Forbidden(s) | MgrError::BadRequest(s) = &mut m {
                    s.push_str(" (checked again at start, with the rights of whoever attached it)");
                }
                m
            })?;
        }
        Ok(())
    }

    /// Disk and ISO files must exist when configured (Hyper-V refuses missing files too).
    fn check_files(c: &VmConfig, dir: &Path) -> Result<()> {
        let mut paths: Vec<&Path> = c.hard_drives.iter().map(|d| d.path.as_path()).collect();
        paths.extend(c.dvd_drives.iter().filter_map(|d| d.path.as_deref()));
        if let Some(db) = &c.direct_boot {
            paths.push(&db.kernel);
            if let Some(i) = &db.initrd {
                paths.push(i);
            }
        }
        for p in paths {
            let full = Self::resolve_path(dir, p);
            if !full.is_file() {
                return Err(MgrError::BadRequest(format!(
                    "{} does not exist or is not a file",
                    full.display()
                )));
            }
        }
        Ok(())
    }

    /// Reconfigure: merge a partial config. Hardware changes need the VM Off.
    pub fn reconfigure(
        &self,
        id: Uuid,
        patch: serde_json::Map<String, serde_json::Value>,
    ) -> Result<VmView> {
        // Paths the patch adds are checked for the caller before anything changes
        // (outside the VM lock: the check runs a child process).
        let who = access::current();
        {
            let (old, dir) = {
                let vms = self.vms.lock();
                let vm = vms
                    .get(&id)
                    .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
                (vm.config.clone(), vm.vm_dir())
            };
            if let Ok(c) = Self::merge(&old, &patch) {
                self.check_access(&who, &dir, Some(&old), &c, None)?;
            }
        }
        let mut vms = self.vms.lock();
        let vm = vms
            .get(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        let old = vm.config.clone();
        let mut c = Self::merge(&old, &patch)?;
        let old_v = serde_json::to_value(&old).map_err(internal)?;
        let new_v = serde_json::to_value(&c).map_err(internal)?;
        let hw_changed: Vec<String> = match (old_v.as_object(), new_v.as_object()) {
            (Some(a), Some(b)) => b
                .iter()
                .filter(|(k, v)| {
                    !HW_EDITABLE_WHEN_ON.contains(&k.as_str()) && a.get(*k) != Some(*v)
                })
                .map(|(k, _)| k.clone())
                .collect(),
            _ => vec![],
        };
        if !hw_changed.is_empty() && (vm.row.state != VmState::Off || vm.worker.is_some()) {
            let mut e = Self::invalid_state(vm, &format!("change {} of", hw_changed.join(", ")));
            if let MgrError::InvalidState { message, .. } = &mut e {
                message.push_str(" (hardware changes need the VM Off)");
            }
            return Err(e);
        }
        self.check_config(&mut c, &vms, Some(&old))?;
        let vm = vms
            .get_mut(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        Self::check_files(&c, &vm.vm_dir())?;
        // Written first: a write that fails (full disk) changes nothing, MACs included.
        write_config(&vm.row.config_path, &c)?;
        self.record_access(id, &who, Some(&old), &c, None);
        // Adapters removed: their dynamic MACs go back to the pool.
        for n in &old.network_adapters {
            if !c
                .network_adapters
                .iter()
                .any(|x| x.id == n.id && x.dynamic_mac == n.dynamic_mac)
            {
                let _ = self.db.release_nic_mac(n.id);
            }
        }
        let push = vm.worker.is_some()
            && (old.integration_services != c.integration_services || old.name != c.name);
        if old.name != c.name {
            self.events.emit(
                "vm.renamed",
                Some(id),
                None,
                format!("VM {:?} renamed to {:?}", old.name, c.name),
                None,
            );
        }
        vm.config = c;
        self.events.emit(
            "vm.reconfigured",
            Some(id),
            None,
            format!("VM {:?} reconfigured", vm.config.name),
            None,
        );
        let view = self.view_of(vm);
        drop(vms);
        if push {
            self.push_integration(id);
        }
        Ok(view)
    }

    pub fn config_of(&self, id: Uuid) -> Result<(VmConfig, VmState)> {
        let vms = self.vms.lock();
        let vm = vms
            .get(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        Ok((vm.config.clone(), vm.row.state))
    }

    pub fn add_disk(&self, id: Uuid, req: DiskRequest) -> Result<VmView> {
        let (c, _) = self.config_of(id)?;
        let slot = match req.slot {
            Some(s) => s,
            None => Self::free_slot(&c)?,
        };
        let mut drives = c.hard_drives.clone();
        drives.push(HardDrive {
            slot,
            path: req.path,
            read_only: req.read_only,
        });
        let mut p = serde_json::Map::new();
        p.insert(
            "hard_drives".into(),
            serde_json::to_value(drives).map_err(internal)?,
        );
        self.reconfigure(id, p)
    }

    fn free_slot(c: &VmConfig) -> Result<Slot> {
        let used: Vec<Slot> = c
            .hard_drives
            .iter()
            .map(|d| d.slot)
            .chain(c.dvd_drives.iter().map(|d| d.slot))
            .collect();
        let (kind, ctrls, locs) = match c.generation {
            Generation::Gen1 => (ControllerKind::Ide, 2, 2),
            Generation::Gen2 => (ControllerKind::Scsi, 4, 64),
        };
        for controller_number in 0..ctrls {
            for location in 0..locs {
                let s = Slot {
                    controller: kind,
                    controller_number,
                    location,
                };
                if !used.contains(&s) {
                    return Ok(s);
                }
            }
        }
        Err(MgrError::Conflict(format!("no free {kind:?} slot left")))
    }

    /// Remove a hard drive by index or by path.
    pub fn remove_disk(&self, id: Uuid, which: &str) -> Result<VmView> {
        let (c, _) = self.config_of(id)?;
        let mut drives = c.hard_drives.clone();
        let idx = match which.parse::<usize>() {
            Ok(i) if i < drives.len() => i,
            _ => drives
                .iter()
                .position(|d| d.path == Path::new(which))
                .ok_or_else(|| {
                    MgrError::NotFound(format!("VM {:?} has no disk {which:?}", c.name))
                })?,
        };
        drives.remove(idx);
        let mut p = serde_json::Map::new();
        p.insert(
            "hard_drives".into(),
            serde_json::to_value(drives).map_err(internal)?,
        );
        self.reconfigure(id, p)
    }

    /// Change DVD media: in the config when Off; live through the worker when running.
    pub async fn set_dvd(&self, id: Uuid, req: DvdRequest) -> Result<VmView> {
        let (c, state, worker, dir) = {
            let vms = self.vms.lock();
            let vm = vms
                .get(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            (
                vm.config.clone(),
                vm.row.state,
                vm.worker.clone(),
                vm.vm_dir(),
            )
        };
        let who = access::current();
        if let Some(p) = &req.path {
            let w = access::want(&dir, p, access::Use::Dvd, false);
            access::check(&who, &[w], &[], &self.storage_roots()).map_err(Self::access_err)?;
            if !Self::resolve_path(&dir, p).is_file() {
                return Err(MgrError::BadRequest(format!(
                    "{} does not exist",
                    Self::resolve_path(&dir, p).display()
                )));
            }
        }
        let mut drives = c.dvd_drives.clone();
        if req.index >= drives.len() {
            if req.index == drives.len() && state == VmState::Off && worker.is_none() {
                let slot = Self::free_slot(&c)?;
                drives.push(DvdDrive { slot, path: None });
            } else {
                return Err(MgrError::NotFound(format!(
                    "VM {:?} has no DVD drive {}",
                    c.name, req.index
                )));
            }
        }
        match (state, worker) {
            (VmState::Running | VmState::Paused, Some(w)) => {
                let abs = req.path.as_ref().map(|p| Self::resolve_path(&dir, p));
                w.call(
                    Op::ChangeMedia {
                        dvd_index: req.index,
                        path: abs,
                    },
                    Duration::from_secs(30),
                )
                .await
                .map_err(|e| MgrError::Conflict(format!("cannot change media: {e}")))?;
            }
            (VmState::Off, None) => {}
            _ => {
                let vms = self.vms.lock();
                let vm = vms
                    .get(&id)
                    .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
                return Err(Self::invalid_state(vm, "change the DVD of"));
            }
        }
        if let Some(d) = drives.get_mut(req.index) {
            d.path = req.path;
        }
        // Write the media change straight to the config (allowed in any state).
        let mut vms = self.vms.lock();
        let vm = vms
            .get_mut(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        let mut nc = vm.config.clone();
        nc.dvd_drives = drives;
        nc.validate()
            .map_err(|e| MgrError::BadRequest(e.to_string()))?;
        write_config(&vm.row.config_path, &nc)?;
        let old = std::mem::replace(&mut vm.config, nc);
        self.record_access(id, &who, Some(&old), &vm.config, None);
        self.events.emit(
            "vm.reconfigured",
            Some(id),
            None,
            format!("VM {:?}: DVD {} media changed", vm.config.name, req.index),
            None,
        );
        Ok(self.view_of(vm))
    }

    pub fn add_nic(&self, id: Uuid, req: NicRequest) -> Result<VmView> {
        let (c, _) = self.config_of(id)?;
        let mut nics = c.network_adapters.clone();
        nics.push(NetworkAdapter {
            id: Uuid::new_v4(),
            name: req
                .name
                .unwrap_or_else(|| format!("Network Adapter {}", nics.len() + 1)),
            kind: req.kind.unwrap_or(NicKind::Synthetic),
            static_mac: req.static_mac.filter(|s| !s.is_empty()),
            dynamic_mac: None,
            connection: req.connection.unwrap_or(NicConnection::NotConnected),
        });
        let mut p = serde_json::Map::new();
        p.insert(
            "network_adapters".into(),
            serde_json::to_value(nics).map_err(internal)?,
        );
        self.reconfigure(id, p)
    }

    pub(crate) fn nic_index(c: &VmConfig, which: &str) -> Result<usize> {
        if let Ok(i) = which.parse::<usize>() {
            if i < c.network_adapters.len() {
                return Ok(i);
            }
        }
        c.network_adapters
            .iter()
            .position(|n| n.id.to_string() == which || n.name == which || n.mac() == Some(which))
            .ok_or_else(|| {
                MgrError::NotFound(format!("VM {:?} has no network adapter {which:?}", c.name))
            })
    }

    pub fn remove_nic(&self, id: Uuid, which: &str) -> Result<VmView> {
        let (c, _) = self.config_of(id)?;
        let mut nics = c.network_adapters.clone();
        nics.remove(Self::nic_index(&c, which)?);
        let mut p = serde_json::Map::new();
        p.insert(
            "network_adapters".into(),
            serde_json::to_value(nics).map_err(internal)?,
        );
        self.reconfigure(id, p)
    }

    pub fn set_nic(&self, id: Uuid, which: &str, patch: NicPatch) -> Result<VmView> {
        let (c, _) = self.config_of(id)?;
        let mut nics = c.network_adapters.clone();
        let i = Self::nic_index(&c, which)?;
        if let Some(n) = nics.get_mut(i) {
            if let Some(name) = patch.name {
                n.name = name;
            }
            if let Some(m) = patch.static_mac {
                n.static_mac = if m.is_empty() { None } else { Some(m) };
                if n.static_mac.is_some() {
                    n.dynamic_mac = None;
                }
            }
            if let Some(conn) = patch.connection {
                n.connection = conn;
            }
        }
        let mut p = serde_json::Map::new();
        p.insert(
            "network_adapters".into(),
            serde_json::to_value(nics).map_err(internal)?,
        );
        self.reconfigure(id, p)
    }

    /// Unregister (Off or Saved only). With `delete_files`, also delete the config, the
    /// saved state and the disks that live inside the VM's folder (never disks elsewhere).
    pub fn remove(&self, id: Uuid, delete_files: bool) -> Result<()> {
        let mut vms = self.vms.lock();
        let vm = vms
            .get(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        Self::refuse(vm, Action::Delete)?;
        if vm.worker.is_some() {
            return Err(Self::invalid_state(vm, "remove"));
        }
        self.db.delete_vm(id).map_err(internal)?;
        let vm = vms
            .remove(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        if delete_files {
            self.delete_created_files(id, &vm);
        }
        access::Record::remove(&self.paths.state_dir, id);
        self.events.emit(
            "vm.removed",
            Some(id),
            None,
            format!(
                "VM {:?} removed{}",
                vm.config.name,
                if delete_files { " with its files" } else { "" }
            ),
            None,
        );
        Ok(())
    }

    /// `--delete-files`: delete what fvd itself created for this VM (its config, its
    /// saved state, the folder if fvd made it and it is then empty) and nothing
    /// else: not the disks (as Hyper-V's Remove-VM), not files others put there.
    /// Nothing is followed through a symlink: a folder that is no longer the real
    /// folder fvd made is left alone.
    fn delete_created_files(&self, id: Uuid, vm: &Vm) {
        let rec = access::Record::load(&self.paths.state_dir, id);
        let dir = vm.vm_dir();
        let is_dir = std::fs::symlink_metadata(&dir)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if !is_dir {
            tracing::warn!(
                "VM {id}: {} is no longer a folder (a symlink, or gone): its files are left in place",
                dir.display()
            );
            return;
        }
        if let Some(s) = &vm.row.saved_dir {
            // Only the saved state fvd writes (`<vm_dir>/saved-state`).
            let ours = dir.join("saved-state");
            let is_dir = std::fs::symlink_metadata(&ours)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if *s == ours && is_dir {
                let _ = std::fs::remove_dir_all(&ours);
            }
        }
        // The config always is fvd's (it writes it, whatever the folder).
        let mut files = vec![vm.row.config_path.clone()];
        files.extend(rec.created.iter().filter(|p| **p != dir).cloned());
        for f in files {
            if !f.starts_with(&dir) {
                continue;
            }
            let regular = std::fs::symlink_metadata(&f)
                .map(|m| m.is_file())
                .unwrap_or(false);
            if regular {
                let _ = std::fs::remove_file(&f);
            }
        }
        // Folders fvd made, deepest first; each goes only if it is empty now.
        let mut dirs: Vec<&PathBuf> = rec
            .created
            .iter()
            .filter(|p| p.starts_with(&dir) || **p == dir || dir.starts_with(p))
            .collect();
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }

    // ---------- admission and MACs ----------

    /// Refuse a start the host cannot honour: CPU reserve and memory.
    fn admit(&self, id: Uuid, vms: &HashMap<Uuid, Vm>) -> Result<()> {
        let s = self.settings();
        let vm = vms
            .get(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        let c = &vm.config;
        let cpus = util::logical_cpus();
        if c.cpu.count > cpus {
            return Err(MgrError::Admission(format!(
                "VM {:?} has {} virtual processors; this host has {cpus} logical processors",
                c.name, c.cpu.count
            )));
        }
        let capacity = cpus as u64 * s.cpu_reserve_pool_percent as u64;
        let others: Vec<&Vm> = vms
            .values()
            .filter(|v| v.config.id != id && v.active())
            .collect();
        let reserved: u64 = others
            .iter()
            .map(|v| v.config.cpu.reserve_percent as u64 * v.config.cpu.count as u64)
            .sum();
        let need = c.cpu.reserve_percent as u64 * c.cpu.count as u64;
        if reserved + need > capacity {
            return Err(MgrError::Admission(format!(
                "not enough CPU reserve: VM {:?} reserves {need}% of a logical processor, only {}% is left \
                 (reserve pool {capacity}%, {reserved}% reserved by running VMs)",
                c.name,
                capacity.saturating_sub(reserved)
            )));
        }
        if !s.allow_memory_overcommit {
            let (_, avail) = util::meminfo_mib();
            // Running VMs have not touched all their memory yet; what they may still take
            // is not available.
            let pending: u64 = others
                .iter()
                .map(|v| {
                    let rss = v
                        .status
                        .as_ref()
                        .and_then(|(st, _)| st.qemu_pid)
                        .map(util::rss_mib)
                        .unwrap_or(0);
                    v.config.memory_mib.saturating_sub(rss)
                })
                .sum();
            let left = avail.saturating_sub(pending);
            if c.memory_mib > left {
                return Err(MgrError::Admission(format!(
                    "not enough memory: VM {:?} needs {} MiB, only {left} MiB is available \
                     (host MemAvailable {avail} MiB, {pending} MiB still promised to running VMs)",
                    c.name, c.memory_mib
                )));
            }
        }
        Ok(())
    }

    /// Give every dynamic adapter without a MAC one from the pool (lowest free address).
    fn assign_macs(&self, id: Uuid, vms: &mut HashMap<Uuid, Vm>) -> Result<()> {
        let s = self.settings();
        let start = host::parse_mac(&s.mac_pool_start).unwrap_or(0);
        let in_use: std::collections::HashSet<u64> = {
            let mut set: std::collections::HashSet<u64> = self
                .db
                .macs()
                .map_err(internal)?
                .iter()
                .filter_map(|(m, _, _)| host::parse_mac(m))
                .collect();
            for v in vms.values() {
                for n in &v.config.network_adapters {
                    if let Some(m) = n.mac().and_then(host::parse_mac) {
                        set.insert(m);
                    }
                }
            }
            set
        };
        let vm = vms
            .get_mut(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        let mut c = vm.config.clone();
        let mut taken = in_use;
        let mut changed = false;
        for n in c
            .network_adapters
            .iter_mut()
            .filter(|n| n.static_mac.is_none() && n.dynamic_mac.is_none())
        {
            let free = (0..s.mac_pool_size as u64)
                .map(|i| start + i)
                .find(|m| !taken.contains(m));
            let Some(m) = free else {
                return Err(MgrError::MacPoolExhausted(format!(
                    "the dynamic MAC pool is exhausted: all {} addresses from {} are in use; \
                     enlarge it (fv host set --mac-pool-size N) or give the adapter a static MAC",
                    s.mac_pool_size, s.mac_pool_start
                )));
            };
            let mac = host::format_mac(m);
            taken.insert(m);
            n.dynamic_mac = Some(mac.clone());
            changed = true;
        }
        if changed {
            for n in c.network_adapters.iter() {
                if n.static_mac.is_none() {
                    if let Some(m) = &n.dynamic_mac {
                        if !vm
                            .config
                            .network_adapters
                            .iter()
                            .any(|o| o.id == n.id && o.dynamic_mac.as_ref() == Some(m))
                        {
                            self.db.allocate_mac(m, id, n.id).map_err(internal)?;
                        }
                    }
                }
            }
            write_config(&vm.row.config_path, &c)?;
            vm.config = c;
        }
        Ok(())
    }

    // ---------- lifecycle ----------

    fn vm_runtime(&self, id: Uuid) -> PathBuf {
        self.paths.runtime_dir.join("vms").join(id.to_string())
    }

    fn log_path(&self, id: Uuid) -> PathBuf {
        self.paths.state_dir.join("logs").join(format!("{id}.log"))
    }

    /// Start (cold, or restore from saved state). Returns the job.
    pub fn start(self: &Arc<Self>, id: Uuid, detail: Option<String>) -> Result<JobHandle> {
        self.recheck_access(id)?;
        let (name, restore) = {
            let mut vms = self.vms.lock();
            let vm = vms
                .get(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            Self::refuse(vm, Action::Start)?;
            if vm.worker.is_some() && !Self::worker_finished(vm) {
                return Err(Self::invalid_state(vm, "start"));
            }
            if self.shutting_down.load(Ordering::SeqCst) {
                return Err(MgrError::Conflict("the host is shutting down".into()));
            }
            self.admit(id, &vms)?;
            self.assign_macs(id, &mut vms)?;
            let vm = vms
                .get_mut(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            if vm.worker.is_some() && Self::worker_finished(vm) {
                // Its end (Gone) is then ignored; the new launch replaces its files.
                vm.worker = None;
                vm.status = None;
            }
            let restore = vm.row.saved_dir.clone();
            vm.guest_ready = false;
            vm.expect = None;
            vm.last_exit = None;
            self.set_state_locked(vm, VmState::Starting, None);
            (vm.config.name.clone(), restore)
        };
        let job = self
            .jobs
            .create("vm.start", Some((id, name)), false, detail);
        let m = self.clone();
        let j = job.clone();
        tokio::spawn(async move {
            j.start();
            match m.launch(id, restore.clone(), &j).await {
                Ok(()) => j.complete(),
                Err(e) => {
                    let kept = m.keep_failure_logs(id);
                    m.kill_leftovers(id);
                    let e = match kept {
                        Some(d) => format!("{e} (worker.log and qemu.log kept in {})", d.display()),
                        None => e.to_string(),
                    };
                    let (state, reason) = if restore.is_some() {
                        (VmState::Saved, format!("restore failed: {e}"))
                    } else {
                        (VmState::Off, format!("start failed: {e}"))
                    };
                    {
                        let mut vms = m.vms.lock();
                        if let Some(vm) = vms.get_mut(&id) {
                            vm.worker = None;
                            vm.status = None;
                            m.set_state_locked(vm, state, Some(reason));
                        }
                    }
                    j.fail("start_failed", e.to_string());
                }
            }
        });
        Ok(job)
    }

    async fn launch(
        self: &Arc<Self>,
        id: Uuid,
        restore: Option<PathBuf>,
        job: &JobHandle,
    ) -> Result<()> {
        let s = self.settings();
        let (accel, _) = host::resolve_accel(s.accel);
        let (config, vm_dir) = {
            let vms = self.vms.lock();
            let vm = vms
                .get(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            (vm.config.clone(), vm.vm_dir())
        };
        let rt = self.vm_runtime(id);
        let _ = std::fs::remove_dir_all(&rt);
        std::fs::create_dir_all(&rt)
            .map_err(|e| MgrError::Internal(format!("cannot create {}: {e}", rt.display())))?;
        let mut allowed = vec![vm_dir.clone(), s.disk_folder.clone()];
        for d in &config.hard_drives {
            if let Some(p) = Self::resolve_path(&vm_dir, &d.path).parent() {
                if !allowed.iter().any(|a| a == p) {
                    allowed.push(p.to_path_buf());
                }
            }
        }
        // Each VM's QEMU gets a uid (and private gid) of its own, kept for the VM's
        // life, so one VM's QEMU cannot touch another's processes or files.
        let qemu_uid = if s.vm_isolation {
            let slot = self
                .db
                .vm_uid_slot(id, fv_model::api::VM_UID_RANGE)
                .map_err(internal)?
                .ok_or_else(|| {
                    MgrError::Admission(format!(
                        "no free per-VM uid in {}..{} (host setting vm_uid_base)",
                        s.vm_uid_base,
                        s.vm_uid_base.saturating_add(fv_model::api::VM_UID_RANGE)
                    ))
                })?;
            Some(s.vm_uid_base.saturating_add(slot))
        } else {
            None
        };
        if let Some(uid) = qemu_uid {
            Self::check_traversable(&rt, uid)?;
            if config.generation == Generation::Gen2 || !config.dvd_drives.is_empty() {
                // QEMU opens the UEFI variables and DVD media in the VM folder itself.
                Self::check_traversable(&vm_dir, uid)?;
            }
        }
        let spec = LaunchSpec {
            config: config.clone(),
            vm_dir: vm_dir.clone(),
            runtime_dir: rt.clone(),
            restore_from: restore.clone(),
            accel: accel.clone(),
            qemu_binary: self.paths.qemu_binary.clone(),
            qemu_uid,
            qemu_gid: qemu_uid,
            allowed_disk_dirs: allowed,
            confine: s.vm_isolation,
            media_dirs: s.media_folders.clone(),
            private_dirs: if s.vm_isolation {
                vec![self.paths.runtime_dir.clone(), PathBuf::from("/run")]
            } else {
                vec![]
            },
            host_name: util::hostname(),
            integration_tuning: Default::default(),
        };
        let launch = rt.join("launch.json");
        util::atomic_write(
            &launch,
            &serde_json::to_vec_pretty(&spec).map_err(internal)?,
        )
        .map_err(internal)?;
        let key = id.to_string();
        // QEMU needs its guest RAM plus its own overhead (TCG translation cache, devices).
        let overhead = if accel == "tcg" { 768 } else { 256 };
        let mem_limit = (config.memory_mib + overhead + config.memory_mib / 4) * 1024 * 1024;
        if let Err(e) = self.cgroups.setup(
            &key,
            config.cpu.count,
            config.cpu.weight,
            config.cpu.limit_percent,
            mem_limit,
        ) {
            self.events.emit(
                "vm.warning",
                Some(id),
                None,
                format!("cannot set up cgroup: {e}"),
                None,
            );
        }
        job.progress(10);
        let log_path = self.log_path(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| MgrError::Internal(format!("cannot open {}: {e}", log_path.display())))?;
        let log2 = log.try_clone().map_err(internal)?;
        let mut child = std::process::Command::new(&self.paths.worker_bin)
            .arg("--launch")
            .arg(&launch)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                MgrError::Internal(format!(
                    "cannot run {}: {e}",
                    self.paths.worker_bin.display()
                ))
            })?;
        let pid = child.id();
        if let Err(e) = self.cgroups.add(&key, pid) {
            self.events.emit(
                "vm.warning",
                Some(id),
                None,
                format!("cannot place worker in its cgroup: {e}"),
                None,
            );
        }
        // Reap the worker when it exits while we are its parent.
        let (exit_tx, exit_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let st = child.wait();
            let _ = exit_tx.send(st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()));
        });
        self.events.emit(
            "vm.worker_started",
            Some(id),
            Some(job.id),
            format!("worker pid {pid} launched ({accel})"),
            None,
        );
        job.progress(20);
        let sock = rt.join(fv_worker_proto::SOCKET_NAME);
        let deadline = Instant::now() + Duration::from_secs(60);
        let (conn, status) = loop {
            if let Ok(st) = exit_rx.try_recv() {
                return Err(MgrError::Internal(format!(
                    "worker exited ({st}): {}",
                    log_tail(&log_path, 5)
                )));
            }
            if sock.exists() {
                match WorkerConn::connect(&sock, id, self.worker_tx.clone()).await {
                    Ok(x) => break x,
                    Err(e) if Instant::now() > deadline => {
                        return Err(MgrError::Internal(format!("cannot connect to worker: {e}")))
                    }
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                return Err(MgrError::Internal(format!(
                    "worker did not open {} within 60 s: {}",
                    sock.display(),
                    log_tail(&log_path, 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if let Some(q) = status.qemu_pid {
            let _ = self.cgroups.add(&key, q);
        }
        {
            let mut vms = self.vms.lock();
            let vm = vms
                .get_mut(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            vm.worker = Some(conn.clone());
            vm.status = Some((status.clone(), Instant::now()));
            vm.accel = Some(accel);
            if status.state != VmState::Starting {
                // Events sent before we connected are lost: the status carries why.
                if status.state == VmState::Critical {
                    vm.last_exit = status.reason.clone();
                }
                self.set_state_locked(vm, status.state, status.reason.clone());
            }
        }
        job.progress(50);
        // Wait for Running (restores of big memories under TCG can take a while).
        let st = self
            .wait_state(id, Duration::from_secs(600), |s, has_worker| {
                !has_worker
                    || matches!(
                        s,
                        VmState::Running | VmState::Paused | VmState::Critical | VmState::Off
                    )
            })
            .await;
        match st {
            Some((VmState::Running | VmState::Paused, true)) => {
                if let Ok(st) = conn.status().await {
                    if let Some(q) = st.qemu_pid {
                        let _ = self.cgroups.add(&key, q);
                    }
                    if let Some(vm) = self.vms.lock().get_mut(&id) {
                        vm.status = Some((st, Instant::now()));
                    }
                }
                if let Some(dir) = restore {
                    // The saved state is consumed: the guest has moved on from it.
                    let _ = std::fs::remove_dir_all(&dir);
                    let mut vms = self.vms.lock();
                    if let Some(vm) = vms.get_mut(&id) {
                        vm.row.saved_dir = None;
                        let _ = self.db.put_vm(&vm.row);
                    }
                }
                Ok(())
            }
            Some((s, _)) => {
                let why = self
                    .vms
                    .lock()
                    .get(&id)
                    .and_then(|v| v.last_exit.clone().or(v.row.state_reason.clone()));
                let why = why.filter(|w| !w.trim().is_empty()).unwrap_or_else(|| {
                    let t = log_tail(&rt.join("worker.log"), 5);
                    if t.is_empty() {
                        "the worker gave no reason".into()
                    } else {
                        format!("worker.log: {t}")
                    }
                });
                Err(MgrError::Internal(format!(
                    "VM ended {s} while starting: {why}"
                )))
            }
            None => Err(MgrError::Internal(
                "VM did not reach Running within 600 s".into(),
            )),
        }
    }

    /// A worker re-attached in its final state (Saved or Off) only lingers before it
    /// exits: it does not keep the VM from starting again.
    fn worker_finished(vm: &Vm) -> bool {
        matches!(vm.row.state, VmState::Saved | VmState::Off)
            && vm
                .status
                .as_ref()
                .is_some_and(|(s, _)| matches!(s.state, VmState::Saved | VmState::Off))
    }

    /// Take a worker's final result (result.json) as the VM's state. False when it
    /// does not apply (another VM's, or a saved state that is gone).
    fn adopt_result(&self, vm: &mut Vm, r: &fv_worker_proto::FinalResult) -> bool {
        if r.vm_id != vm.config.id.to_string() {
            return false;
        }
        match r.state {
            VmState::Saved => {
                let Some(d) = r.saved_dir.as_ref().filter(|d| d.is_dir()) else {
                    return false;
                };
                vm.row.saved_dir = Some(d.clone());
                self.set_state_locked(
                    vm,
                    VmState::Saved,
                    Some("save completed by the worker while fvd was not watching".into()),
                );
                true
            }
            VmState::Off => {
                self.set_state_locked(vm, VmState::Off, r.reason.clone());
                true
            }
            VmState::Critical => {
                vm.last_exit = r.reason.clone();
                self.set_state_locked(vm, VmState::Critical, r.reason.clone());
                true
            }
            _ => false,
        }
    }

    /// QEMU runs under the VM's own uid (not root): every folder above `dir` must let
    /// it pass (search permission for others), or QEMU fails at start-up with a
    /// bare "Permission denied" on its sockets.
    fn check_traversable(dir: &Path, uid: u32) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        for a in dir.ancestors().skip(1) {
            let Ok(md) = std::fs::metadata(a) else {
                continue;
            };
            let ok = md.mode() & 0o001 != 0 || md.uid() == uid;
            if !ok {
                return Err(MgrError::Conflict(format!(
                    "QEMU runs as uid {uid} and cannot enter {} (mode {:04o}), which holds {}: \
                     make it traversable (chmod o+x {}) or choose --state-dir/--runtime-dir \
                     outside it",
                    a.display(),
                    md.mode() & 0o7777,
                    dir.display(),
                    a.display()
                )));
            }
        }
        Ok(())
    }

    /// Keep the logs of a failed start (the runtime dir is removed next) in the VM
    /// folder's `last-failure/`; returns that folder when something was kept.
    fn keep_failure_logs(&self, id: Uuid) -> Option<PathBuf> {
        let vm_dir = self.vms.lock().get(&id).map(|v| v.vm_dir())?;
        let dest = vm_dir.join("last-failure");
        let rt = self.vm_runtime(id);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(&dest).ok()?;
        let mut kept = false;
        for (src, name) in [
            (rt.join("worker.log"), "worker.log"),
            (rt.join("qemu.log"), "qemu.log"),
            (rt.join("launch.json"), "launch.json"),
            (self.log_path(id), "fvd-worker-output.log"),
        ] {
            if std::fs::copy(&src, dest.join(name)).is_ok() {
                kept = true;
            }
        }
        kept.then_some(dest)
    }

    /// Wait until `pred(state, has_worker)` holds; returns it, or None on timeout.
    async fn wait_state(
        &self,
        id: Uuid,
        timeout: Duration,
        pred: impl Fn(VmState, bool) -> bool,
    ) -> Option<(VmState, bool)> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let cur = {
                let vms = self.vms.lock();
                vms.get(&id).map(|v| (v.row.state, v.worker.is_some()))
            };
            let (s, w) = cur?;
            if pred(s, w) {
                return Some((s, w));
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Kill what is left in the VM's cgroup and remove it and the runtime dir.
    fn kill_leftovers(&self, id: Uuid) {
        let key = id.to_string();
        let rt = self.vm_runtime(id);
        if let Ok(p) = std::fs::read_to_string(rt.join(fv_worker_proto::PID_NAME)) {
            if let Ok(pid) = p.trim().parse::<u32>() {
                if util::pid_alive(pid) && self.cgroups.procs(&key).contains(&pid) {
                    util::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        for _ in 0..20 {
            let procs = self.cgroups.procs(&key);
            if procs.is_empty() {
                break;
            }
            for p in procs {
                util::kill(p, nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.cgroups.remove(&key);
        let _ = std::fs::remove_dir_all(&rt);
    }

    fn worker_of(&self, id: Uuid, action: Action) -> Result<(Arc<WorkerConn>, String)> {
        let vms = self.vms.lock();
        let vm = vms
            .get(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        Self::refuse(vm, action)?;
        match &vm.worker {
            Some(w) => Ok((w.clone(), vm.config.name.clone())),
            None => Err(Self::invalid_state(vm, action.verb())),
        }
    }

    /// Pause, resume or reset: quick worker calls, still reported as jobs.
    pub fn simple_action(self: &Arc<Self>, id: Uuid, action: &str) -> Result<JobHandle> {
        let (op, act, opname, transient) = match action {
            "pause" => (Op::Pause, Action::Pause, "vm.pause", None),
            "resume" => (Op::Resume, Action::Resume, "vm.resume", None),
            "reset" => (
                Op::Reset,
                Action::Reset,
                "vm.reset",
                Some(VmState::Resetting),
            ),
            _ => return Err(MgrError::BadRequest(format!("unknown action {action}"))),
        };
        let (w, name) = self.worker_of(id, act)?;
        if let Some(t) = transient {
            self.set_state(id, t, None);
        }
        let job = self.jobs.create(opname, Some((id, name)), false, None);
        let (m, j) = (self.clone(), job.clone());
        tokio::spawn(async move {
            j.start();
            let r = w.call(op, Duration::from_secs(60)).await;
            // The worker reports the new state as an event; read it back to be sure.
            if let Ok(st) = w.status().await {
                let mut vms = m.vms.lock();
                if let Some(vm) = vms.get_mut(&id) {
                    if vm.worker.as_ref().is_some_and(|x| x.serial == w.serial) {
                        let s = st.state;
                        vm.status = Some((st, Instant::now()));
                        m.set_state_locked(vm, s, None);
                    }
                }
            }
            match r {
                Ok(_) => j.complete(),
                Err(e) => j.fail("worker_error", e.to_string()),
            }
        });
        Ok(job)
    }

    /// Stop: shut down (graceful), turn off, or save.
    pub fn stop(self: &Arc<Self>, id: Uuid, req: StopRequest) -> Result<JobHandle> {
        match req.mode {
            StopMode::Save => self.save(id, None),
            StopMode::TurnOff => {
                // Wherever a QEMU exists (a save or shut down in progress too).
                let (w, name) = self.worker_of(id, Action::TurnOff)?;
                self.expect(id, Expect::Off, Some(VmState::Stopping));
                let job =
                    self.jobs
                        .create("vm.stop", Some((id, name)), false, Some("turn off".into()));
                let (m, j) = (self.clone(), job.clone());
                tokio::spawn(async move {
                    j.start();
                    let r = m.turn_off(id, &w).await;
                    match r {
                        Ok(()) => j.complete(),
                        Err(e) => j.fail("worker_error", e),
                    }
                });
                Ok(job)
            }
            StopMode::ShutDown => {
                // With --force a shut down already in progress may be cut short.
                let act = if req.force {
                    Action::ForceShutDown
                } else {
                    Action::ShutDown
                };
                let (w, name) = self.worker_of(id, act)?;
                let timeout = self.settings().shutdown_timeout_s;
                self.expect(id, Expect::Off, Some(VmState::Stopping));
                if let Some(vm) = self.vms.lock().get_mut(&id) {
                    vm.shutdown_timed_out = false;
                }
                let job = self.jobs.create(
                    "vm.stop",
                    Some((id, name)),
                    true,
                    Some(
                        if req.force {
                            "shut down (force)"
                        } else {
                            "shut down"
                        }
                        .into(),
                    ),
                );
                let (m, j) = (self.clone(), job.clone());
                tokio::spawn(async move {
                    j.start();
                    if let Err(e) = w
                        .call(Op::ShutDown { timeout_s: timeout }, Duration::from_secs(30))
                        .await
                    {
                        if req.force {
                            // e.g. a shut down already in progress: --force means off anyway.
                            let msg = format!("shut down refused ({e}); turning off (--force)");
                            m.events.emit("vm.warning", Some(id), Some(j.id), msg, None);
                            match m.turn_off(id, &w).await {
                                Ok(()) => j.complete(),
                                Err(e) => j.fail("worker_error", e),
                            }
                            return;
                        }
                        m.resync(id, &w).await;
                        j.fail("worker_error", format!("shut down request failed: {e}"));
                        return;
                    }
                    let cancel = j.cancel.clone();
                    let waited = tokio::select! {
                        r = m.wait_state(id, Duration::from_secs(timeout + 5), |s, wk| !wk || s == VmState::Off) => r.is_some(),
                        _ = m.wait_flag(id) => false,
                        _ = async { if let Some(c) = &cancel { c.cancelled().await } else { std::future::pending::<()>().await } } => {
                            m.resync(id, &w).await;
                            j.cancelled("shut down cancelled; the guest may still be shutting down".into());
                            return;
                        }
                    };
                    if waited {
                        // Worker reported Off; its exit finishes the transition.
                        let _ = m.wait_state(id, Duration::from_secs(30), |_, wk| !wk).await;
                        j.complete();
                    } else if req.force {
                        m.events.emit(
                            "vm.warning",
                            Some(id),
                            Some(j.id),
                            "guest did not shut down in time; turning off (--force)".into(),
                            None,
                        );
                        match m.turn_off(id, &w).await {
                            Ok(()) => j.complete(),
                            Err(e) => j.fail("worker_error", e),
                        }
                    } else {
                        m.resync(id, &w).await;
                        j.fail("shutdown_timed_out", format!("the guest did not shut down within {timeout} s; it is still running (use --force or --turn-off)"));
                    }
                });
                Ok(job)
            }
        }
    }

    /// Resolves when the worker reported ShutdownTimedOut.
    async fn wait_flag(&self, id: Uuid) {
        let mut rx = self.changed.subscribe();
        loop {
            if self
                .vms
                .lock()
                .get(&id)
                .is_none_or(|v| v.shutdown_timed_out)
            {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn expect(&self, id: Uuid, e: Expect, state: Option<VmState>) {
        let mut vms = self.vms.lock();
        if let Some(vm) = vms.get_mut(&id) {
            vm.expect = Some(e);
            if let Some(s) = state {
                self.set_state_locked(vm, s, None);
            }
        }
    }

    /// An operation that expected the worker to exit gave up: the worker's state is
    /// the truth again.
    async fn resync(&self, id: Uuid, w: &WorkerConn) {
        let st = w.status().await;
        let mut vms = self.vms.lock();
        if let Some(vm) = vms.get_mut(&id) {
            vm.expect = None;
            let same = vm.worker.as_ref().is_some_and(|x| x.serial == w.serial);
            if let (Ok(st), true) = (st, same) {
                let s = st.state;
                vm.status = Some((st, Instant::now()));
                self.set_state_locked(vm, s, None);
            }
        }
    }

    async fn turn_off(&self, id: Uuid, w: &WorkerConn) -> std::result::Result<(), String> {
        self.expect(id, Expect::Off, None);
        match w.call(Op::TurnOff, Duration::from_secs(60)).await {
            Ok(_) | Err(CallError::Closed) => {}
            Err(e) => return Err(format!("turn off failed: {e}")),
        }
        if self
            .wait_state(id, Duration::from_secs(30), |_, wk| !wk)
            .await
            .is_none()
        {
            // The worker hangs: pull its plug ourselves.
            self.kill_leftovers(id);
        }
        Ok(())
    }

    /// Save memory and device state into `<vm_dir>/saved-state`.
    pub fn save(self: &Arc<Self>, id: Uuid, detail: Option<String>) -> Result<JobHandle> {
        let (w, name, dir) = {
            let mut vms = self.vms.lock();
            let vm = vms
                .get_mut(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            Self::refuse(vm, Action::Save)?;
            let w = match &vm.worker {
                Some(w) => w.clone(),
                None => return Err(Self::invalid_state(vm, "save")),
            };
            vm.expect = Some(Expect::Saved);
            let dir = vm.vm_dir().join("saved-state");
            self.set_state_locked(vm, VmState::Saving, None);
            (w, vm.config.name.clone(), dir)
        };
        // Cancellable: the worker cancels the migration and the VM runs on.
        let job = self.jobs.create("vm.save", Some((id, name)), true, detail);
        if let Some(vm) = self.vms.lock().get_mut(&id) {
            vm.progress_job = Some(job.clone());
        }
        let (m, j) = (self.clone(), job.clone());
        tokio::spawn(async move {
            j.start();
            let _ = std::fs::remove_dir_all(&dir);
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let cancel = j.cancel.clone();
            let w2 = w.clone();
            // A cancel of the job becomes a Cancel of the worker's save operation.
            let canceller = tokio::spawn(async move {
                let (Some(c), Ok(req)) = (cancel, started_rx.await) else {
                    return;
                };
                c.cancelled().await;
                let _ = w2
                    .call(Op::Cancel { request: req }, Duration::from_secs(10))
                    .await;
            });
            let r = match std::fs::create_dir_all(&dir) {
                Ok(()) => w
                    .call_long(
                        Op::Save { dir: dir.clone() },
                        Duration::from_secs(3600),
                        started_tx,
                    )
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
            };
            canceller.abort();
            if let Some(vm) = m.vms.lock().get_mut(&id) {
                vm.progress_job = None;
            }
            match r {
                Ok(_) => {
                    {
                        let mut vms = m.vms.lock();
                        if let Some(vm) = vms.get_mut(&id) {
                            vm.row.saved_dir = Some(dir.clone());
                            // A save asked for by a user is not "running when fvd stopped";
                            // host_shutdown() sets the flag for the VMs it saves.
                            vm.row.was_running = false;
                            m.set_state_locked(vm, VmState::Saved, None);
                        }
                    }
                    let _ = m.wait_state(id, Duration::from_secs(30), |_, wk| !wk).await;
                    j.complete();
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    // Turn Off took over (it cancels the save): it decides the state.
                    let turned_off = m
                        .vms
                        .lock()
                        .get(&id)
                        .is_some_and(|v| v.expect == Some(Expect::Off));
                    if turned_off || e.contains("the VM was turned off") {
                        j.cancelled(format!("save cancelled: the VM was turned off ({e})"));
                        return;
                    }
                    if j.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                        m.resync(id, &w).await;
                        j.cancelled("save cancelled; the VM runs on".into());
                        return;
                    }
                    let gone = m.vms.lock().get(&id).is_some_and(|v| v.worker.is_none());
                    {
                        let mut vms = m.vms.lock();
                        if let Some(vm) = vms.get_mut(&id) {
                            vm.expect = None;
                            if gone {
                                m.set_state_locked(
                                    vm,
                                    VmState::Critical,
                                    Some(format!("save failed and the worker is gone: {e}")),
                                );
                            } else {
                                m.set_state_locked(
                                    vm,
                                    VmState::Running,
                                    Some(format!("save failed: {e}")),
                                );
                            }
                        }
                    }
                    if !gone {
                        // The worker tells the true state (it may have stayed Paused).
                        if let Ok(st) = w.status().await {
                            m.set_state(id, st.state, Some(format!("save failed: {e}")));
                        }
                    }
                    j.fail("save_failed", e);
                }
            }
        });
        Ok(job)
    }

    /// Discard saved state: the next start is a cold boot.
    pub fn discard_saved_state(&self, id: Uuid) -> Result<VmView> {
        let mut vms = self.vms.lock();
        let vm = vms
            .get_mut(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        Self::refuse(vm, Action::DiscardSavedState)?;
        if vm.worker.is_some() {
            return Err(Self::invalid_state(vm, "discard the saved state of"));
        }
        if let Some(d) = vm.row.saved_dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
        self.set_state_locked(vm, VmState::Off, Some("saved state discarded".into()));
        Ok(self.view_of(vm))
    }

    // ---------- worker events ----------

    fn on_worker_msg(self: &Arc<Self>, id: Uuid, serial: u64, msg: WorkerMsg) {
        let mut restart = false;
        {
            let mut vms = self.vms.lock();
            let Some(vm) = vms.get_mut(&id) else { return };
            if vm.worker.as_ref().is_none_or(|w| w.serial != serial) {
                // A connection we let go of, or one launch() has not adopted yet (it
                // reads the state back right after adopting).
                return;
            }
            match msg {
                WorkerMsg::Event(Event::StateChanged { state, reason }) => {
                    if vm.worker.is_none() {
                        return;
                    }
                    if state == VmState::Critical {
                        vm.last_exit = reason.clone();
                    }
                    // Saved is fvd's to declare (when the save call returns).
                    if state != VmState::Saved {
                        self.set_state_locked(vm, state, reason);
                    }
                }
                // The same progress, per request (SaveProgress carries it for the job).
                WorkerMsg::Event(Event::OperationProgress { .. }) => {}
                WorkerMsg::Event(Event::SaveProgress { percent }) => {
                    if let Some(j) = &vm.progress_job {
                        j.progress(percent);
                    }
                }
                WorkerMsg::Event(Event::ShutdownTimedOut) => {
                    vm.shutdown_timed_out = true;
                    self.events.emit(
                        "vm.warning",
                        Some(id),
                        None,
                        format!("{}: the guest did not shut down in time", vm.config.name),
                        None,
                    );
                    self.changed.send_modify(|n| *n += 1);
                }
                WorkerMsg::Event(Event::QemuExited { clean, detail }) => {
                    vm.last_exit = Some(detail.clone());
                    if !clean {
                        self.events.emit(
                            "vm.warning",
                            Some(id),
                            None,
                            format!("{}: QEMU exited: {detail}", vm.config.name),
                            None,
                        );
                    }
                }
                WorkerMsg::Event(Event::GuestReady) => {
                    vm.guest_ready = true;
                    self.events.emit(
                        "vm.guest_ready",
                        Some(id),
                        None,
                        format!("{}: guest is ready", vm.config.name),
                        None,
                    );
                    self.changed.send_modify(|n| *n += 1);
                }
                WorkerMsg::Event(
                    e @ (Event::HeartbeatChanged { .. }
                    | Event::TimeSynced { .. }
                    | Event::Frozen { .. }
                    | Event::Thawed { .. }
                    | Event::CopyProgress { .. }),
                ) => self.integration_event(vm, e),
                WorkerMsg::Event(Event::Warning { message }) => {
                    self.events.emit(
                        "vm.warning",
                        Some(id),
                        None,
                        format!("{}: {message}", vm.config.name),
                        None,
                    );
                }
                WorkerMsg::Gone => {
                    vm.worker = None;
                    vm.status = None;
                    vm.guest_ready = false;
                    let expect = vm.expect.take();
                    // The worker's own final word, when no call of ours awaits it
                    // (e.g. a save or shut down that began before fvd restarted).
                    let result = if expect == Some(Expect::Saved) {
                        None
                    } else {
                        read_result(&self.vm_runtime(id), id)
                    };
                    match (expect, result) {
                        (Some(Expect::Saved), _) => {
                            // The save task decides (Saved, or Critical when the call failed).
                        }
                        // A crash (Critical) goes on below: its cause, then recovery.
                        (_, Some(r))
                            if r.state != VmState::Critical && self.adopt_result(vm, &r) => {}
                        (Some(Expect::Off), _) => self.set_state_locked(vm, VmState::Off, None),
                        (None, _) if vm.row.state == VmState::Off => {
                            self.set_state_locked(vm, VmState::Off, None)
                        }
                        (None, result) => {
                            let cause = vm
                                .last_exit
                                .clone()
                                .or(result.and_then(|r| r.reason))
                                .filter(|c| !c.trim().is_empty())
                                .unwrap_or_else(|| {
                                    let out = log_tail(&self.log_path(id), 3);
                                    let wl = log_tail(&self.vm_runtime(id).join("worker.log"), 3);
                                    format!(
                                        "worker exited unexpectedly (killed or crashed) without a final state; \
                                         worker.log: {}; worker output: {}",
                                        if wl.is_empty() { "empty" } else { &wl },
                                        if out.is_empty() { "none" } else { &out },
                                    )
                                });
                            self.set_state_locked(vm, VmState::Critical, Some(cause));
                            let s = self.settings();
                            let recent = vm
                                .last_recovery
                                .is_some_and(|t| t.elapsed() < Duration::from_secs(600));
                            if s.recovery_action == RecoveryAction::RestartOnce
                                && !recent
                                && !self.shutting_down.load(Ordering::SeqCst)
                            {
                                vm.last_recovery = Some(Instant::now());
                                restart = true;
                            }
                        }
                    }
                    self.changed.send_modify(|n| *n += 1);
                }
            }
        }
        // Cleanup happens outside the lock (it may sleep), then the recovery restart.
        let gone = self
            .vms
            .lock()
            .get(&id)
            .is_some_and(|v| v.worker.is_none() && v.row.state != VmState::Starting);
        if !gone {
            return;
        }
        let m = self.clone();
        tokio::spawn(async move {
            let m2 = m.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // A worker that closed its socket may still be flushing disks: give it time.
                let key = id.to_string();
                for _ in 0..100 {
                    if m2.cgroups.procs(&key).is_empty() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if m2
                    .vms
                    .lock()
                    .get(&id)
                    .is_some_and(|v| v.worker.is_none() && v.row.state != VmState::Starting)
                {
                    m2.kill_leftovers(id);
                }
            })
            .await;
            if restart {
                if let Err(e) = m.start(id, Some("automatic recovery after a crash".into())) {
                    m.events.emit(
                        "vm.warning",
                        Some(id),
                        None,
                        format!("automatic recovery failed: {e}"),
                        None,
                    );
                }
            }
        });
    }

    // ---------- fvd start: reconcile; host shutdown ----------

    /// Load registrations, re-attach to live workers, clean up stale ones, settle
    /// jobs left by the previous fvd, then apply automatic start actions.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let rows = self.db.vms()?;
        for row in rows {
            let config = match read_config(&row.config_path) {
                Ok(c) => c,
                Err(e) => {
                    let mut c = VmConfig::new(&row.id.to_string(), Generation::Gen2);
                    c.id = row.id;
                    let mut vm = Vm::new(c, row.clone());
                    self.set_state_locked(
                        &mut vm,
                        VmState::Critical,
                        Some(format!("configuration unavailable: {e}")),
                    );
                    self.vms.lock().insert(row.id, vm);
                    continue;
                }
            };
            let id = row.id;
            let prev = row.state;
            self.vms.lock().insert(id, Vm::new(config, row.clone()));
            let rt = self.vm_runtime(id);
            let sock = rt.join(fv_worker_proto::SOCKET_NAME);
            let mut attached = false;
            if sock.exists() {
                for _ in 0..3 {
                    if let Ok((conn, st)) =
                        WorkerConn::connect(&sock, id, self.worker_tx.clone()).await
                    {
                        let mut vms = self.vms.lock();
                        if let Some(vm) = vms.get_mut(&id) {
                            vm.worker = Some(conn);
                            let s = st.state;
                            vm.accel = serde_json::from_slice::<LaunchSpec>(
                                &std::fs::read(rt.join("launch.json")).unwrap_or_default(),
                            )
                            .ok()
                            .map(|l| l.accel);
                            vm.status = Some((st, Instant::now()));
                            self.set_state_locked(vm, s, None);
                            // A worker in its final state (lingering before it exits)
                            // has written its result: take it now, saved state included.
                            if matches!(s, VmState::Saved | VmState::Off) {
                                if let Some(r) = read_result(&rt, id) {
                                    if self.adopt_result(vm, &r) {
                                        let _ = self.db.put_vm(&vm.row);
                                    }
                                }
                            }
                            self.events.emit(
                                "vm.reattached",
                                Some(id),
                                None,
                                format!("{}: re-attached to its worker ({s})", vm.config.name),
                                Some(s),
                            );
                        }
                        attached = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            if attached {
                continue;
            }
            // A worker that finished while fvd was down left its outcome behind.
            let result = read_result(&rt, id);
            if rt.exists() {
                self.kill_leftovers(id);
            }
            if let Some(r) = result {
                let mut vms = self.vms.lock();
                if let Some(vm) = vms.get_mut(&id) {
                    if self.adopt_result(vm, &r) {
                        let _ = self.db.put_vm(&vm.row);
                        continue;
                    }
                }
            }
            let saved_ok = row.saved_dir.as_ref().is_some_and(|d| d.is_dir());
            let mut vms = self.vms.lock();
            let Some(vm) = vms.get_mut(&id) else { continue };
            match prev {
                VmState::Saved if saved_ok => {}
                VmState::Off => {}
                VmState::Saved => {
                    vm.row.saved_dir = None;
                    self.set_state_locked(
                        vm,
                        VmState::Off,
                        Some("saved state files are missing".into()),
                    );
                }
                VmState::Saving if saved_ok => {
                    // fvd died while saving; the worker finished and exited.
                    self.set_state_locked(
                        vm,
                        VmState::Saved,
                        Some("save completed while fvd was down".into()),
                    );
                }
                VmState::Critical => {}
                other => {
                    let was = vm.row.was_running;
                    if saved_ok {
                        self.set_state_locked(vm, VmState::Saved, None);
                    } else {
                        vm.row.saved_dir = None;
                        self.set_state_locked(
                            vm,
                            VmState::Critical,
                            Some(format!(
                                "was {other} but its worker is gone (host restart or crash)"
                            )),
                        );
                    }
                    vm.row.was_running = was || matches!(other, VmState::Running | VmState::Paused);
                    let _ = self.db.put_vm(&vm.row);
                }
            }
        }
        self.settle_jobs().await;
        self.auto_start();
        Ok(())
    }

    /// Jobs a previous fvd left running: complete those whose goal the VM reached,
    /// fail the others with "fvd restarted".
    async fn settle_jobs(self: &Arc<Self>) {
        let jobs = self.jobs.db().jobs(10_000, None).unwrap_or_default();
        for j in jobs.into_iter().filter(|j| !j.state.is_final()) {
            let state = j
                .vm_id
                .and_then(|v| self.vms.lock().get(&v).map(|x| x.row.state));
            let goal: &[VmState] = match j.operation.as_str() {
                "vm.start" | "vm.resume" | "vm.reset" => &[VmState::Running],
                "vm.stop" => &[VmState::Off],
                "vm.save" => &[VmState::Saved],
                "vm.pause" => &[VmState::Paused],
                _ => &[],
            };
            let h = crate::jobs::adopt(&self.jobs, j.clone());
            match state {
                Some(s) if goal.contains(&s) => h.complete(),
                Some(VmState::Starting | VmState::Saving | VmState::Stopping)
                    if !goal.is_empty() =>
                {
                    // The worker still carries the operation out: keep watching it.
                    let (m, vm) = (self.clone(), j.vm_id.unwrap_or_default());
                    let goal = goal.to_vec();
                    tokio::spawn(async move {
                        match m
                            .wait_state(vm, Duration::from_secs(600), |s, _| {
                                !matches!(
                                    s,
                                    VmState::Starting | VmState::Saving | VmState::Stopping
                                )
                            })
                            .await
                        {
                            Some((s, _)) if goal.contains(&s) => h.complete(),
                            Some((s, _)) => {
                                h.fail("fvd_restarted", format!("fvd restarted; the VM ended {s}"))
                            }
                            None => h.fail(
                                "fvd_restarted",
                                "fvd restarted; the operation did not finish".into(),
                            ),
                        }
                    });
                }
                _ => h.fail(
                    "fvd_restarted",
                    "fvd restarted while the job was running".into(),
                ),
            }
        }
    }

    fn auto_start(self: &Arc<Self>) {
        let todo: Vec<(Uuid, u32, String)> = {
            let vms = self.vms.lock();
            vms.values()
                .filter(|v| {
                    v.worker.is_none()
                        && matches!(
                            v.row.state,
                            VmState::Off | VmState::Saved | VmState::Critical
                        )
                })
                .filter(|v| match v.config.automatic_start_action {
                    AutomaticStartAction::Nothing => false,
                    AutomaticStartAction::StartIfRunning => v.row.was_running,
                    AutomaticStartAction::AlwaysStart => true,
                })
                .map(|v| {
                    (
                        v.config.id,
                        v.config.automatic_start_delay_s,
                        v.config.name.clone(),
                    )
                })
                .collect()
        };
        for (id, delay, name) in todo {
            let m = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(delay as u64)).await;
                if let Err(e) = m.start(id, Some("automatic start".into())) {
                    m.events.emit(
                        "vm.warning",
                        Some(id),
                        None,
                        format!("{name}: automatic start failed: {e}"),
                        None,
                    );
                }
            });
        }
    }

    /// Host shutdown: apply each running VM's automatic stop action, then ask fvd to exit.
    /// VMs keep `was_running`, so "start if it was running" brings them back.
    pub fn host_shutdown(self: &Arc<Self>) -> Result<JobHandle> {
        self.shutting_down.store(true, Ordering::SeqCst);
        let job = self.jobs.create("host.shutdown", None, false, None);
        let (m, j) = (self.clone(), job.clone());
        tokio::spawn(async move {
            j.start();
            let running: Vec<(Uuid, AutomaticStopAction)> = {
                let vms = m.vms.lock();
                vms.values()
                    .filter(|v| v.worker.is_some())
                    .map(|v| (v.config.id, v.config.automatic_stop_action))
                    .collect()
            };
            let mut errors = Vec::new();
            let mut subjobs = Vec::new();
            for (id, action) in running {
                let r = match action {
                    AutomaticStopAction::Save => m.save(id, Some("automatic stop action".into())),
                    AutomaticStopAction::TurnOff => m.stop(
                        id,
                        StopRequest {
                            mode: StopMode::TurnOff,
                            force: false,
                        },
                    ),
                    AutomaticStopAction::ShutDown => m.stop(
                        id,
                        StopRequest {
                            mode: StopMode::ShutDown,
                            force: true,
                        },
                    ),
                };
                match r {
                    Ok(h) => subjobs.push(h),
                    Err(e) => {
                        // e.g. Paused VMs cannot shut down: turn them off.
                        match m.stop(
                            id,
                            StopRequest {
                                mode: StopMode::TurnOff,
                                force: false,
                            },
                        ) {
                            Ok(h) => subjobs.push(h),
                            Err(e2) => errors.push(format!("{e}; {e2}")),
                        }
                    }
                }
            }
            for h in &subjobs {
                let v = m.jobs.wait(h.id, Duration::from_secs(3600)).await;
                if let Some(v) = v {
                    if v.state != JobState::Completed {
                        errors.push(format!(
                            "{}: {}",
                            v.vm_name.unwrap_or_default(),
                            v.error_description.unwrap_or_default()
                        ));
                    }
                }
            }
            {
                // Mark them so "start if it was running" restarts them with the host.
                let mut vms = m.vms.lock();
                for h in &subjobs {
                    if let Some(vid) = h.view().and_then(|v| v.vm_id) {
                        if let Some(vm) = vms.get_mut(&vid) {
                            vm.row.was_running = true;
                            let _ = m.db.put_vm(&vm.row);
                        }
                    }
                }
            }
            if errors.is_empty() {
                j.complete();
            } else {
                j.fail("shutdown_incomplete", errors.join("; "));
            }
            m.shutdown.notify_waiters();
        });
        Ok(job)
    }
}

impl Vm {
    fn new(config: VmConfig, row: VmRow) -> Vm {
        Vm {
            config,
            row,
            worker: None,
            status: None,
            expect: None,
            guest_ready: false,
            accel: None,
            last_exit: None,
            last_recovery: None,
            shutdown_timed_out: false,
            progress_job: None,
            copy_jobs: HashMap::new(),
        }
    }
}
