//! The VM state machine: QEMU process, QMP, guest agent, disks.

// A child module so the integration services can use the VM's private state.
#[path = "integration.rs"]
pub mod integration;

use crate::disks::{self, ServedDisk};
use crate::qemu_cmd::{self, Paths};
use anyhow::{anyhow, bail, Context, Result};
use fv_model::state::{allows, Action};
use fv_model::{Generation, VmState};
use fv_qga::Qga;
use fv_qmp::Qmp;
use fv_worker_proto::{
    DiskStats, ErrorCode, Event, FinalResult, LaunchSpec, ProcStats, Reply, WorkerError,
    WorkerStats, WorkerStatus,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};

pub const STATE_FILE: &str = "vmstate.bin";
pub const STATE_META: &str = "vmstate.json";

/// How long a crashed worker keeps answering before it exits.
const CRITICAL_LINGER: Duration = Duration::from_secs(30);
/// A guest that lost the ACPI power button press (e.g. right after a reset, before
/// its ACPI daemon runs) gets the shut down request again this often.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(10);
/// Migration bandwidth of a save (bytes/s): far above what a disk takes.
const SAVE_MAX_BANDWIDTH: u64 = 16 << 30;
/// Lines of qemu.log quoted in a failed start's reason.
const QEMU_LOG_LINES: usize = 5;

/// Cancellation of one long operation (Cancel, or Turn Off cancelling everything).
#[derive(Clone)]
pub struct Cancel(Arc<watch::Sender<bool>>);

impl Default for Cancel {
    fn default() -> Self {
        Cancel(Arc::new(watch::channel(false).0))
    }
}

impl Cancel {
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
    /// Resolves once cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// A long operation in progress (listed in status, cancelled by Turn Off).
struct RunningOp {
    name: &'static str,
    cancel: Cancel,
}

/// Removes its operation from the list when the operation ends.
struct OpEntry<'a> {
    vm: &'a Vm,
    key: u64,
}

impl Drop for OpEntry<'_> {
    fn drop(&mut self) {
        self.vm.lock().ops.remove(&self.key);
    }
}

pub struct Shared {
    pub state: VmState,
    pub reason: Option<String>,
    pub qemu_pid: Option<u32>,
    pub qemu_started: Option<Instant>,
    /// Set before we make QEMU exit (turn off, save) or ask the guest to (shutdown).
    pub exit_expected: bool,
    /// QEMU reported SHUTDOWN (guest powered off or quit was requested).
    pub shutdown_seen: bool,
    pub agent_connected: bool,
    pub macs: Vec<String>,
    /// Final state reached; the worker is about to exit.
    pub finished: bool,
    pub shutdown_pending: bool,
    /// Turn Off has begun: nothing but Stopping, Off or Critical may follow, and
    /// every other operation gives up without touching the state.
    pub turning_off: bool,
    /// Long operations running now, by a worker-wide key.
    ops: HashMap<u64, RunningOp>,
    next_op: u64,
    /// The saved-state directory a completed save left (for the result file).
    saved_dir: Option<PathBuf>,
}

pub struct Vm {
    pub spec: LaunchSpec,
    pub shared: Mutex<Shared>,
    pub events: broadcast::Sender<Event>,
    pub qga: Qga,
    qmp: Mutex<Option<Arc<Qmp>>>,
    disks: Mutex<Vec<ServedDisk>>,
    /// Serialises state-changing operations; a busy lock answers InvalidState.
    op: tokio::sync::Mutex<()>,
    /// Some(clean) once QEMU has exited.
    qemu_exit: watch::Sender<Option<(bool, String)>>,
    /// Tells main to exit (after the given delay).
    pub exit: watch::Sender<Option<Duration>>,
    cd_ids: Mutex<Vec<String>>,
    /// Integration services (heartbeat, KVP, time sync, freeze) state.
    integ: Mutex<integration::IntegState>,
    /// Wakes the key-value exchange loop (guest ready, services changed).
    kvp_kick: tokio::sync::Notify,
    /// Serialises freeze and thaw.
    freeze_lock: tokio::sync::Mutex<()>,
    /// File descriptors handed over with AttachFd (tap devices, opened files).
    pub fds: Mutex<HashMap<String, OwnedFd>>,
}

pub fn werr(code: ErrorCode, message: impl Into<String>) -> WorkerError {
    WorkerError {
        code,
        message: message.into(),
    }
}

fn qerr(e: fv_qmp::QmpError) -> WorkerError {
    werr(ErrorCode::QemuError, e.to_string())
}

impl Vm {
    pub fn new(spec: LaunchSpec) -> Arc<Vm> {
        let qga = Qga::new(spec.runtime_dir.join(qemu_cmd::QGA_SOCK));
        let (events, _) = broadcast::channel(64);
        let integ = integration::IntegState::new(
            spec.config.integration_services,
            spec.config.name.clone(),
        );
        Arc::new(Vm {
            spec,
            shared: Mutex::new(Shared {
                state: VmState::Starting,
                reason: None,
                qemu_pid: None,
                qemu_started: None,
                exit_expected: false,
                shutdown_seen: false,
                agent_connected: false,
                macs: Vec::new(),
                finished: false,
                shutdown_pending: false,
                turning_off: false,
                ops: HashMap::new(),
                next_op: 1,
                saved_dir: None,
            }),
            events,
            qga,
            qmp: Mutex::new(None),
            disks: Mutex::new(Vec::new()),
            op: tokio::sync::Mutex::new(()),
            qemu_exit: watch::channel(None).0,
            exit: watch::channel(None).0,
            cd_ids: Mutex::new(Vec::new()),
            integ: Mutex::new(integ),
            kvp_kick: tokio::sync::Notify::new(),
            freeze_lock: tokio::sync::Mutex::new(()),
            fds: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A poisoned lock only means a panic elsewhere; the data is still usable.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> VmState {
        self.lock().state
    }

    pub fn emit(&self, e: Event) {
        tracing::info!("event: {e:?}");
        let _ = self.events.send(e);
    }

    pub fn set_state(&self, state: VmState, reason: Option<String>) {
        self.set_state_inner(state, reason, false)
    }

    /// `last`: the final state itself (set once by finish / finish_critical).
    fn set_state_inner(&self, state: VmState, reason: Option<String>, last: bool) {
        {
            let mut s = self.lock();
            if s.state == state && s.reason == reason {
                return;
            }
            // Once Turn Off has begun, an operation it cancelled must not put back
            // the state it started from.
            if s.turning_off
                && !matches!(state, VmState::Stopping | VmState::Off | VmState::Critical)
            {
                return;
            }
            // A final state is final.
            if s.finished && !last {
                return;
            }
            s.state = state;
            s.reason = reason.clone();
        }
        self.emit(Event::StateChanged { state, reason });
    }

    fn qmp(&self) -> Result<Arc<Qmp>, WorkerError> {
        self.qmp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                werr(
                    ErrorCode::InvalidState,
                    format!("QEMU is not running (state {})", self.state()),
                )
            })
    }

    fn invalid(&self, what: &str) -> WorkerError {
        let s = self.lock();
        let why = s
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        werr(
            ErrorCode::InvalidState,
            format!("cannot {what} while the VM is {}{why}", s.state),
        )
    }

    /// The state table's answer for `action` now, as a worker error.
    fn check(&self, action: Action) -> Result<(), WorkerError> {
        let s = self.lock();
        if s.turning_off && action != Action::TurnOff {
            return Err(werr(
                ErrorCode::InvalidState,
                format!("cannot {action}: the VM is being turned off"),
            ));
        }
        allows(s.state, action).map_err(|r| {
            let why = s
                .reason
                .as_deref()
                .map(|x| format!(" ({x})"))
                .unwrap_or_default();
            werr(ErrorCode::InvalidState, format!("{r}{why}"))
        })
    }

    /// Check `action` against the state table, then take the lock that keeps two
    /// state changes from interleaving (Turn Off never takes it).
    fn op_guard(&self, action: Action) -> Result<tokio::sync::MutexGuard<'_, ()>, WorkerError> {
        self.check(action)?;
        let g = self.op.try_lock().map_err(|_| {
            werr(
                ErrorCode::InvalidState,
                format!(
                    "cannot {action}: another operation is in progress (state {})",
                    self.state()
                ),
            )
        })?;
        // The state may have changed while the holder finished.
        self.check(action)?;
        Ok(g)
    }

    /// List a long operation (status, Turn Off cancels it) until the entry drops.
    fn register_op(&self, name: &'static str, cancel: Cancel) -> OpEntry<'_> {
        let mut s = self.lock();
        let key = s.next_op;
        s.next_op = s.next_op.wrapping_add(1);
        s.ops.insert(key, RunningOp { name, cancel });
        OpEntry { vm: self, key }
    }

    fn turning_off(&self) -> bool {
        self.lock().turning_off
    }

    pub fn status(&self) -> WorkerStatus {
        let (heartbeat, guest, freeze, services) = {
            let g = self.integ();
            (g.heartbeat, g.guest.clone(), g.freeze, g.services)
        };
        let s = self.lock();
        let com = self
            .spec
            .config
            .com_ports
            .iter()
            .enumerate()
            .map(|(i, on)| on.then(|| qemu_cmd::com_socket(&self.spec.runtime_dir, i)))
            .collect();
        WorkerStatus {
            vm_id: self.spec.config.id.to_string(),
            state: s.state,
            reason: s.reason.clone(),
            operations: s.ops.values().map(|o| o.name.to_string()).collect(),
            worker_pid: std::process::id(),
            qemu_pid: s.qemu_pid,
            uptime_s: s.qemu_started.map(|t| t.elapsed().as_secs()).unwrap_or(0),
            com_sockets: com,
            guest_agent_connected: s.agent_connected,
            macs: s.macs.clone(),
            heartbeat,
            guest,
            freeze,
            integration_services: services,
        }
    }

    pub fn request_exit(&self, after: Duration) {
        self.exit.send_replace(Some(after));
    }

    // ---------------------------------------------------------------- start

    /// Bring the VM up (cold boot or restore). On failure the VM goes Critical.
    pub async fn start(self: &Arc<Self>) {
        if let Err(e) = self.try_start().await {
            if self.turning_off() {
                // Turn Off finishes the VM (Off); the start simply ends.
                tracing::info!("start ended by turn off: {e:#}");
                self.kill_qemu();
                return;
            }
            let msg = format!("start failed: {e:#}");
            tracing::error!("{msg}");
            self.kill_qemu();
            self.finish_critical(msg);
        }
    }

    /// How QEMU ended ("exit status: 1"), once it has.
    fn qemu_exit_detail(&self) -> String {
        self.qemu_exit
            .borrow()
            .as_ref()
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| "still running".into())
    }

    /// The last lines QEMU wrote (its stderr goes to qemu.log), for failure reasons.
    pub fn qemu_log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.spec.runtime_dir.join("qemu.log")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
        let from = lines.len().saturating_sub(QEMU_LOG_LINES);
        let tail = lines.get(from..).unwrap_or(&[]).join(" | ");
        if tail.is_empty() {
            "empty".into()
        } else {
            tail
        }
    }

    async fn try_start(self: &Arc<Self>) -> Result<()> {
        let spec = &self.spec;
        spec.config
            .validate()
            .map_err(|e| anyhow!("invalid config: {e}"))?;
        let restore = match &spec.restore_from {
            Some(d) => Some(self.check_saved_state(&qemu_cmd::resolve(&spec.vm_dir, d))?),
            None => None,
        };
        let ovmf = if spec.config.generation == Generation::Gen2 {
            Some(self.prepare_ovmf()?)
        } else {
            None
        };
        let spec2 = spec.clone();
        let force_vhost_user = std::env::var_os("FV_WORKER_FORCE_VHOST_USER").is_some();
        let served = tokio::task::spawn_blocking(move || disks::start(&spec2, force_vhost_user))
            .await
            .context("disk thread")??;
        let disk_sockets = served.iter().map(|d| d.socket.clone()).collect();
        *self.disks.lock().unwrap_or_else(|p| p.into_inner()) = served;

        let paths = Paths {
            runtime: spec.runtime_dir.clone(),
            disk_sockets,
            ovmf,
            force_vhost_user,
        };
        let mut cmd = qemu_cmd::build(spec, &paths);
        // Debugging aid only (e.g. a SeaBIOS debugcon): extra QEMU arguments.
        if let Ok(extra) = std::env::var("FV_WORKER_QEMU_EXTRA") {
            cmd.args
                .extend(extra.split_whitespace().map(str::to_string));
        }
        for w in &cmd.warnings {
            self.emit(Event::Warning { message: w.clone() });
        }
        *self.cd_ids.lock().unwrap_or_else(|p| p.into_inner()) =
            cmd.cds.iter().map(|(id, _)| id.clone()).collect();
        self.lock().macs = cmd.macs.clone();
        for s in [qemu_cmd::QMP_SOCK, qemu_cmd::QGA_SOCK] {
            let _ = std::fs::remove_file(spec.runtime_dir.join(s));
        }
        if let (Some(uid), gid) = (spec.qemu_uid, spec.qemu_gid) {
            // QEMU connects to our sockets and creates its own in the runtime dir.
            chown_for_qemu(&spec.runtime_dir, uid, gid)?;
        }
        tracing::info!(
            "qemu: {} {}",
            spec.qemu_binary.display(),
            cmd.args.join(" ")
        );
        if self.turning_off() {
            bail!("turned off while starting");
        }
        let child = spawn_qemu(spec, &cmd.args)?;
        let pid = child.id();
        {
            let mut s = self.lock();
            s.qemu_pid = pid;
            s.qemu_started = Some(Instant::now());
        }
        let me = self.clone();
        tokio::spawn(async move { me.watch_qemu(child).await });

        let qmp_path = spec.runtime_dir.join(qemu_cmd::QMP_SOCK);
        let mut exit_rx = self.qemu_exit.subscribe();
        let qmp = tokio::select! {
            q = Qmp::connect_retry(&qmp_path, Duration::from_secs(60)) => q.context("connect QMP")?,
            _ = exit_rx.wait_for(|e| e.is_some()) => bail!(
                "QEMU exited during start-up: {} (qemu.log: {})",
                self.qemu_exit_detail(),
                self.qemu_log_tail()
            ),
        };
        let qmp = Arc::new(qmp);
        let events = qmp.events();
        *self.qmp.lock().unwrap_or_else(|p| p.into_inner()) = Some(qmp.clone());
        let me = self.clone();
        tokio::spawn(async move { me.qmp_events(events).await });
        qmp.migrate_set_capabilities(&[("events", true)]).await?;

        for (id, medium) in &cmd.cds {
            if let Some(p) = medium {
                let path = p.to_str().ok_or_else(|| anyhow!("non-UTF-8 media path"))?;
                qmp.blockdev_change_medium(id, path, "raw", true)
                    .await
                    .with_context(|| format!("insert {path}"))?;
            }
        }
        for id in &cmd.links_down {
            qmp.execute("set_link", Some(json!({"name": id, "up": false})))
                .await?;
        }
        if let Some(dir) = restore {
            self.restore(&qmp, &dir).await?;
            // The guest clock stopped at save time: set it once the agent answers.
            self.integ().time_sync_pending = true;
        }
        if self.turning_off() {
            bail!("turned off while starting");
        }
        qmp.cont().await?;
        self.set_state(VmState::Running, None);
        let me = self.clone();
        tokio::spawn(async move { me.probe_agent().await });
        let me = self.clone();
        tokio::spawn(async move { me.heartbeat_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.kvp_loop().await });
        Ok(())
    }

    fn prepare_ovmf(&self) -> Result<(PathBuf, PathBuf)> {
        let sb = self.spec.config.secure_boot;
        let code = PathBuf::from(if sb {
            "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
        } else {
            "/usr/share/OVMF/OVMF_CODE_4M.fd"
        });
        let template = PathBuf::from(if sb {
            "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
        } else {
            "/usr/share/OVMF/OVMF_VARS_4M.fd"
        });
        // The variable store is part of the VM (boot entries live there), so it sits
        // in the VM folder and survives restarts.
        let vars = self
            .spec
            .vm_dir
            .join(format!("{}.VARS.fd", self.spec.config.id));
        if !vars.exists() {
            std::fs::copy(&template, &vars)
                .with_context(|| format!("copy {} to {}", template.display(), vars.display()))?;
        }
        if let (Some(uid), gid) = (self.spec.qemu_uid, self.spec.qemu_gid) {
            std::os::unix::fs::chown(&vars, Some(uid), gid)?;
        }
        Ok((code, vars))
    }

    fn check_saved_state(&self, dir: &Path) -> Result<PathBuf> {
        let meta: Value = serde_json::from_slice(
            &std::fs::read(dir.join(STATE_META))
                .with_context(|| format!("read {}", dir.join(STATE_META).display()))?,
        )?;
        let id = self.spec.config.id.to_string();
        if meta.get("vm_id").and_then(Value::as_str) != Some(id.as_str()) {
            bail!("saved state in {} belongs to another VM", dir.display());
        }
        if !dir.join(STATE_FILE).is_file() {
            bail!("{} is missing", dir.join(STATE_FILE).display());
        }
        Ok(dir.to_path_buf())
    }

    async fn restore(&self, qmp: &Qmp, dir: &Path) -> Result<()> {
        let sock = self.spec.runtime_dir.join("restore.sock");
        let _ = std::fs::remove_file(&sock);
        let mut ev = qmp.events();
        qmp.migrate_incoming(&format!("unix:{}", sock.display()))
            .await?;
        let mut file = tokio::fs::File::open(dir.join(STATE_FILE)).await?;
        let mut s = tokio::net::UnixStream::connect(&sock)
            .await
            .context("connect to QEMU's incoming socket")?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            s.write_all(buf.get(..n).unwrap_or(&[])).await?;
        }
        s.shutdown().await?;
        drop(buf);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            let info = qmp.query_migrate().await?;
            match info.status.as_deref() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    bail!("restore failed: {}", info.error_desc.unwrap_or_default())
                }
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                bail!("restore did not complete");
            }
            // Wake on the MIGRATION event or poll again shortly.
            let _ = tokio::time::timeout(Duration::from_millis(200), ev.recv()).await;
        }
        let _ = std::fs::remove_file(&sock);
        Ok(())
    }

    async fn probe_agent(self: Arc<Self>) {
        loop {
            if self.lock().finished {
                return;
            }
            let ok = self.qga.ping(Duration::from_secs(2)).await.is_ok();
            let was = std::mem::replace(&mut self.lock().agent_connected, ok);
            if ok && !was {
                self.on_guest_ready();
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn qmp_events(self: Arc<Self>, mut rx: broadcast::Receiver<fv_qmp::QmpEvent>) {
        loop {
            let e = match rx.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            tracing::info!("qmp event {} {}", e.name, e.data);
            match e.name.as_str() {
                "SHUTDOWN" => self.lock().shutdown_seen = true,
                "RESET" => {
                    // Guest reboot: the agent restarts with it.
                    self.lock().agent_connected = false;
                    self.integration_reset();
                    self.qga.disconnect().await;
                    let me = self.clone();
                    tokio::spawn(async move { me.probe_agent().await });
                }
                _ => {}
            }
        }
    }

    async fn watch_qemu(self: Arc<Self>, mut child: tokio::process::Child) {
        let st = child.wait().await;
        let detail = match &st {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        let (expected, shutdown_seen) = {
            let mut s = self.lock();
            s.qemu_pid = None;
            (s.exit_expected, s.shutdown_seen)
        };
        let success = st.as_ref().map(|s| s.success()).unwrap_or(false);
        let clean = success && (expected || shutdown_seen);
        tracing::info!("qemu exited: {detail} (clean {clean})");
        *self.qmp.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.emit(Event::QemuExited {
            clean,
            detail: detail.clone(),
        });
        self.qemu_exit.send_replace(Some((clean, detail.clone())));
        if expected {
            // The operation that made QEMU exit finishes the job.
            return;
        }
        if clean {
            // The guest powered off (by itself or after ShutDown).
            let _op = self.op.lock().await;
            self.finish(VmState::Off, Some("guest shut down".into()));
        } else if self.state() != VmState::Starting {
            self.finish_critical(format!(
                "QEMU exited unexpectedly: {detail} (qemu.log: {})",
                self.qemu_log_tail()
            ));
        }
    }

    /// Stop disk serving, flush, report the final state and let the worker exit.
    fn finish(&self, state: VmState, reason: Option<String>) {
        if std::mem::replace(&mut self.lock().finished, true) {
            return;
        }
        let errs = {
            let mut d = self.disks.lock().unwrap_or_else(|p| p.into_inner());
            disks::stop_all(&mut d)
        };
        for e in &errs {
            tracing::error!("{e}");
            self.emit(Event::Warning { message: e.clone() });
        }
        self.write_result(state, reason.clone());
        self.set_state_inner(state, reason, true);
        self.request_exit(Duration::from_millis(500));
    }

    /// Leave the final outcome in the runtime dir: an fvd that was down (or killed)
    /// when it happened reads it on restart instead of guessing.
    fn write_result(&self, state: VmState, reason: Option<String>) {
        let saved_dir = if state == VmState::Saved {
            self.lock().saved_dir.clone()
        } else {
            None
        };
        let r = FinalResult {
            vm_id: self.spec.config.id.to_string(),
            state,
            reason,
            saved_dir,
            at: integration::unix_now(),
        };
        let path = self.spec.runtime_dir.join(fv_worker_proto::RESULT_NAME);
        let tmp = path.with_extension("json.tmp");
        let res = serde_json::to_vec_pretty(&r)
            .map_err(std::io::Error::other)
            .and_then(|b| write_synced(&tmp, &b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            tracing::error!("cannot write {}: {e}", path.display());
        }
    }

    fn finish_critical(&self, cause: String) {
        if std::mem::replace(&mut self.lock().finished, true) {
            return;
        }
        let errs = {
            let mut d = self.disks.lock().unwrap_or_else(|p| p.into_inner());
            disks::stop_all(&mut d)
        };
        for e in errs {
            self.emit(Event::Warning { message: e });
        }
        self.write_result(VmState::Critical, Some(cause.clone()));
        self.set_state_inner(VmState::Critical, Some(cause), true);
        self.request_exit(CRITICAL_LINGER);
    }

    /// A client read the status of a crashed VM: no need to linger much longer.
    pub fn critical_acknowledged(&self) {
        let s = self.lock();
        if s.finished && s.state == VmState::Critical {
            drop(s);
            self.request_exit(Duration::from_secs(2));
        }
    }

    fn kill_qemu(&self) {
        let pid = self.lock().qemu_pid;
        if let Some(pid) = pid {
            self.lock().exit_expected = true;
            // SAFETY: plain kill(2) on the QEMU we started (pid still ours: we have not
            // reaped it yet, watch_qemu clears qemu_pid when it does).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }

    async fn wait_qemu_exit(&self, within: Duration) -> bool {
        let mut rx = self.qemu_exit.subscribe();
        let r = tokio::time::timeout(within, rx.wait_for(|e| e.is_some())).await;
        r.is_ok()
    }

    // ---------------------------------------------------------------- operations

    pub async fn pause(&self) -> Result<Reply, WorkerError> {
        let _g = self.op_guard(Action::Pause)?;
        self.qmp()?.stop().await.map_err(qerr)?;
        self.note_paused();
        self.set_state(VmState::Paused, None);
        Ok(Reply::Done)
    }

    pub async fn resume(self: &Arc<Self>) -> Result<Reply, WorkerError> {
        let _g = self.op_guard(Action::Resume)?;
        self.qmp()?.cont().await.map_err(qerr)?;
        self.set_state(VmState::Running, None);
        self.note_resumed();
        Ok(Reply::Done)
    }

    /// Hardware reset. As Hyper-V's Reset, a paused VM comes back running.
    pub async fn reset(self: &Arc<Self>) -> Result<Reply, WorkerError> {
        let _g = self.op_guard(Action::Reset)?;
        let before = self.state();
        let qmp = self.qmp()?;
        self.set_state(VmState::Resetting, None);
        let r = qmp.system_reset().await.map_err(qerr);
        let r = match (r, before) {
            (Ok(()), VmState::Paused) => {
                let c = qmp.cont().await.map_err(qerr);
                if c.is_ok() {
                    self.note_resumed();
                }
                c.map(|()| VmState::Running)
            }
            (Ok(()), _) => Ok(VmState::Running),
            (Err(e), _) => Err(e),
        };
        match r {
            Ok(after) => {
                self.set_state(after, None);
                Ok(Reply::Done)
            }
            Err(e) => {
                self.set_state(before, Some(format!("reset failed: {}", e.message)));
                Err(e)
            }
        }
    }

    /// Pull the plug, whatever runs: a save, shut down, reset or start in progress
    /// is cancelled (a partial saved state is discarded) and the VM ends Off.
    pub async fn turn_off(&self) -> Result<Reply, WorkerError> {
        self.check(Action::TurnOff)?;
        let (already, ops, was) = {
            let mut s = self.lock();
            let already = std::mem::replace(&mut s.turning_off, true);
            let ops: Vec<Cancel> = s.ops.values().map(|o| o.cancel.clone()).collect();
            s.exit_expected = true;
            (already, ops, s.state)
        };
        if already {
            // A second Turn Off waits for the first one's result.
            self.wait_qemu_exit(Duration::from_secs(30)).await;
            return Ok(Reply::Done);
        }
        for c in ops {
            c.cancel();
        }
        // Pointless for a VM about to lose power, but a freeze must not outlive us.
        if was == VmState::Running {
            self.thaw_if_frozen("turn off").await;
        }
        self.set_state(VmState::Stopping, Some("turning off".into()));
        if let Ok(q) = self.qmp() {
            // QMP may not answer while a migration completes: never wait long on it.
            match tokio::time::timeout(Duration::from_secs(5), q.quit()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("quit: {e}"),
                Err(_) => tracing::warn!("quit: QEMU did not answer within 5 s"),
            }
        }
        if !self.wait_qemu_exit(Duration::from_secs(10)).await {
            self.kill_qemu();
            self.wait_qemu_exit(Duration::from_secs(10)).await;
        }
        self.finish(VmState::Off, Some("turned off".into()));
        Ok(Reply::Done)
    }

    pub async fn shut_down(self: &Arc<Self>, timeout_s: u64) -> Result<Reply, WorkerError> {
        let _g = self.op_guard(Action::ShutDown)?;
        let qmp = self.qmp()?;
        // A frozen guest cannot flush its filesystems on the way down.
        self.thaw_if_frozen("shut down").await;
        let method = self.request_shutdown(&qmp).await?;
        self.lock().shutdown_pending = true;
        self.set_state(VmState::Stopping, Some(format!("shutting down ({method})")));
        let me = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_s);
            let mut attempts = 1u32;
            loop {
                let next = (tokio::time::Instant::now() + SHUTDOWN_RETRY).min(deadline);
                let mut rx = me.qemu_exit.subscribe();
                let exited = tokio::time::timeout_at(next, rx.wait_for(|e| e.is_some()))
                    .await
                    .is_ok();
                drop(rx);
                let pending = {
                    let s = me.lock();
                    s.shutdown_pending && s.state == VmState::Stopping && !s.turning_off
                };
                if exited || !pending {
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    me.lock().shutdown_pending = false;
                    me.emit(Event::ShutdownTimedOut);
                    me.set_state(
                        VmState::Running,
                        Some("guest did not shut down in time".into()),
                    );
                    return;
                }
                // The guest may have missed the request (a reset just before, ACPI
                // not yet listening): ask again.
                let Ok(q) = me.qmp() else { return };
                attempts = attempts.saturating_add(1);
                match me.request_shutdown(&q).await {
                    Ok(m) => me.emit(Event::Warning {
                        message: format!(
                            "guest still running after a shut down request: asked again ({m}, attempt {attempts})"
                        ),
                    }),
                    Err(e) => tracing::warn!("repeated shut down request failed: {e}"),
                }
            }
        });
        Ok(Reply::ShutDown {
            method: method.to_string(),
        })
    }

    /// Ask the guest to shut down: agent when offered and answering, else ACPI.
    async fn request_shutdown(&self, qmp: &Qmp) -> Result<&'static str, WorkerError> {
        // The shutdown integration service withdrawn: only the ACPI power button.
        let use_agent = self.services().shutdown;
        if use_agent && self.qga.ping(Duration::from_secs(2)).await.is_ok() {
            match self.qga.shutdown("powerdown", Duration::from_secs(2)).await {
                Ok(()) => return Ok("agent"),
                Err(e) => tracing::warn!("guest-shutdown failed ({e}); using ACPI"),
            }
        }
        qmp.system_powerdown().await.map_err(qerr)?;
        Ok("acpi")
    }

    /// Save memory and device state into `dir`, then end Saved. `cancel` (Cancel,
    /// Turn Off) stops it: the partial state is removed and the VM goes back to the
    /// state before (or Off, after Turn Off).
    pub async fn save(
        self: &Arc<Self>,
        dir: &Path,
        cancel: Cancel,
        request: u64,
    ) -> Result<Reply, WorkerError> {
        let _g = self.op_guard(Action::Save)?;
        let before = self.state();
        let qmp = self.qmp()?;
        let dir = qemu_cmd::resolve(&self.spec.vm_dir, dir);
        let _op = self.register_op("save", cancel.clone());
        // A saved frozen guest would stay frozen after restore (the thaw timer is gone).
        self.thaw_if_frozen("save").await;
        self.set_state(VmState::Saving, None);
        match self.do_save(&qmp, &dir, before, &cancel, request).await {
            Ok(r) => {
                {
                    let mut s = self.lock();
                    s.exit_expected = true;
                    s.saved_dir = Some(dir.clone());
                }
                if let Err(e) = qmp.quit().await {
                    tracing::warn!("quit after save: {e}");
                }
                if !self.wait_qemu_exit(Duration::from_secs(10)).await {
                    self.kill_qemu();
                    self.wait_qemu_exit(Duration::from_secs(10)).await;
                }
                self.finish(VmState::Saved, None);
                Ok(r)
            }
            Err(e) => {
                if self.turning_off() {
                    // Turn Off owns the VM now (it ends Off).
                    return Err(werr(
                        ErrorCode::Cancelled,
                        "save cancelled: the VM was turned off",
                    ));
                }
                let _ = tokio::time::timeout(Duration::from_secs(10), qmp.migrate_cancel()).await;
                if before == VmState::Running {
                    let _ = qmp.cont().await;
                }
                let why = if e.code == ErrorCode::Cancelled {
                    "save cancelled".to_string()
                } else {
                    format!("save failed: {}", e.message)
                };
                self.set_state(before, Some(why));
                Err(e)
            }
        }
    }

    async fn do_save(
        self: &Arc<Self>,
        qmp: &Arc<Qmp>,
        dir: &Path,
        before: VmState,
        cancel: &Cancel,
        request: u64,
    ) -> Result<Reply, WorkerError> {
        let io = |e: std::io::Error| werr(ErrorCode::Io, e.to_string());
        let cancelled = || werr(ErrorCode::Cancelled, "save cancelled");
        std::fs::create_dir_all(dir).map_err(io)?;
        if before == VmState::Running {
            qmp.stop().await.map_err(qerr)?;
        }
        let sock = self.spec.runtime_dir.join("save.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).map_err(io)?;
        if let Some(uid) = self.spec.qemu_uid {
            std::os::unix::fs::chown(&sock, Some(uid), self.spec.qemu_gid).map_err(io)?;
        }
        // QEMU caps a migration at 128 MiB/s by default; a save to a local file has
        // no network to spare. Tests slow it down on purpose (a long save) with the
        // debug knob FV_WORKER_SAVE_MAX_BANDWIDTH (bytes per second).
        let bandwidth = std::env::var("FV_WORKER_SAVE_MAX_BANDWIDTH")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(SAVE_MAX_BANDWIDTH);
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": bandwidth })),
        )
        .await
        .map_err(qerr)?;
        let tmp = dir.join(format!("{STATE_FILE}.partial"));
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let discard = |tmp: &Path| {
            let _ = std::fs::remove_file(tmp);
        };
        if let Err(e) = qmp.migrate(&format!("unix:{}", sock.display())).await {
            discard(&tmp);
            return Err(qerr(e));
        }
        let accepted = tokio::select! {
            a = tokio::time::timeout(Duration::from_secs(30), listener.accept()) => a,
            _ = cancel.cancelled() => {
                discard(&tmp);
                return Err(cancelled());
            }
        };
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        let conn = match accepted {
            Ok(Ok((c, _))) => c,
            Ok(Err(e)) => {
                discard(&tmp);
                return Err(io(e));
            }
            Err(_) => {
                discard(&tmp);
                return Err(werr(
                    ErrorCode::QemuError,
                    "QEMU did not connect to the save socket within 30 s",
                ));
            }
        };
        // The stream is drained by a thread of its own that never waits on QMP: in
        // its completion phase QEMU holds its main lock while it writes, so it answers
        // QMP only once everything it writes has been read.
        let conn = conn.into_std().map_err(io)?;
        conn.set_nonblocking(false).map_err(io)?;
        let stopper = conn.try_clone().map_err(io)?;
        let mut drain = tokio::task::spawn_blocking(move || drain_stream(conn, file));
        let progress = {
            let (me, q) = (self.clone(), qmp.clone());
            tokio::spawn(async move { me.save_progress(&q, request).await })
        };
        let drained = tokio::select! {
            r = &mut drain => r,
            _ = cancel.cancelled() => {
                // Unblocks the drain thread; QEMU sees its socket close and fails
                // the migration (Turn Off kills it anyway).
                let _ = stopper.shutdown(std::net::Shutdown::Both);
                let _ = (&mut drain).await;
                progress.abort();
                discard(&tmp);
                return Err(cancelled());
            }
        };
        progress.abort();
        let total = match drained {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                discard(&tmp);
                return Err(io(e));
            }
            Err(e) => {
                discard(&tmp);
                return Err(werr(
                    ErrorCode::Internal,
                    format!("save stream thread: {e}"),
                ));
            }
        };
        // QEMU closes the stream when done; confirm it considers the save complete.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let info = tokio::select! {
                i = qmp.query_migrate() => i,
                _ = cancel.cancelled() => {
                    discard(&tmp);
                    return Err(cancelled());
                }
            };
            let info = match info {
                Ok(i) => i,
                Err(e) => {
                    discard(&tmp);
                    return Err(qerr(e));
                }
            };
            match info.status.as_deref() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    discard(&tmp);
                    return Err(werr(
                        ErrorCode::QemuError,
                        format!("migration failed: {}", info.error_desc.unwrap_or_default()),
                    ));
                }
                _ if tokio::time::Instant::now() > deadline => {
                    discard(&tmp);
                    return Err(werr(
                        ErrorCode::QemuError,
                        "QEMU closed the save stream but did not report the migration complete within 60 s",
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let meta = json!({
            "vm_id": self.spec.config.id.to_string(),
            "generation": self.spec.config.generation,
            "memory_mib": self.spec.config.memory_mib,
            "bytes": total,
            "saved_at_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "paused_before_save": before == VmState::Paused,
        });
        let final_path = dir.join(STATE_FILE);
        std::fs::rename(&tmp, &final_path).map_err(io)?;
        let meta_bytes = serde_json::to_vec_pretty(&meta)
            .map_err(|e| werr(ErrorCode::Internal, e.to_string()))?;
        write_synced(&dir.join(STATE_META), &meta_bytes).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.emit(Event::SaveProgress { percent: 100 });
        self.emit(Event::OperationProgress {
            request,
            op: "save".into(),
            percent: 100,
        });
        Ok(Reply::Saved {
            path: final_path,
            bytes: total,
        })
    }

    /// Report migration progress until aborted. Runs beside the stream drain; a
    /// query that blocks (QEMU busy completing) delays only this task.
    async fn save_progress(&self, qmp: &Qmp, request: u64) {
        let mut last = 0u8;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Ok(info) = qmp.query_migrate().await else {
                continue;
            };
            // 100 only once the file is complete and synced.
            let p = info.percent().min(99);
            if p > last {
                last = p;
                self.emit(Event::SaveProgress { percent: p });
                self.emit(Event::OperationProgress {
                    request,
                    op: "save".into(),
                    percent: p,
                });
            }
        }
    }

    pub async fn change_media(
        &self,
        index: usize,
        path: Option<&Path>,
    ) -> Result<Reply, WorkerError> {
        let _g = self.op_guard(Action::ChangeMedia)?;
        let id = self
            .cd_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
            .cloned()
            .ok_or_else(|| werr(ErrorCode::BadRequest, format!("no DVD drive {index}")))?;
        let qmp = self.qmp()?;
        match path {
            Some(p) => {
                let p = qemu_cmd::resolve(&self.spec.vm_dir, p);
                let s = p
                    .to_str()
                    .ok_or_else(|| werr(ErrorCode::BadRequest, "path is not UTF-8"))?;
                if !p.is_file() {
                    return Err(werr(ErrorCode::BadRequest, format!("{s} is not a file")));
                }
                qmp.blockdev_change_medium(&id, s, "raw", true)
                    .await
                    .map_err(|e| {
                        let mut w = qerr(e);
                        // Landlock (confine.rs) or the per-VM uid said no: say where
                        // media may come from instead of a bare EACCES.
                        if w.message.contains("Permission denied") {
                            w.message.push_str(
                                " (a running VM can insert media only from its own folder \
                                 or the host's media folders, host setting media_folders, \
                                 besides the media it started with)",
                            );
                        }
                        w
                    })?;
            }
            None => qmp.eject(&id).await.map_err(qerr)?,
        }
        Ok(Reply::Done)
    }

    pub async fn guest_ping(self: &Arc<Self>) -> Result<Reply, WorkerError> {
        // Also while stopping: the agent may be what carries the shut down.
        if self.state() != VmState::Stopping {
            self.check(Action::GuestService)?;
        }
        let t = Instant::now();
        match self.qga.ping(Duration::from_secs(5)).await {
            Ok(()) => {
                let newly = !std::mem::replace(&mut self.lock().agent_connected, true);
                if newly {
                    self.on_guest_ready();
                }
                Ok(Reply::GuestPing {
                    latency_ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
                })
            }
            Err(e) => {
                self.lock().agent_connected = false;
                Err(werr(ErrorCode::GuestAgentUnavailable, e.to_string()))
            }
        }
    }

    /// Keep a descriptor fvd handed over (SCM_RIGHTS) under `name`.
    pub fn attach_fd(&self, name: String, fd: OwnedFd) -> Result<Reply, WorkerError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if name.is_empty() || name.len() > 64 {
            return Err(werr(
                ErrorCode::BadRequest,
                "attach_fd: name must be 1-64 bytes",
            ));
        }
        let f = std::fs::File::from(fd);
        let md = f.metadata().map_err(|e| {
            werr(
                ErrorCode::Io,
                format!("fstat of the passed descriptor: {e}"),
            )
        })?;
        let ft = md.file_type();
        let file_type = if ft.is_file() {
            "file"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_block_device() {
            "block"
        } else {
            "other"
        };
        self.fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), OwnedFd::from(f));
        Ok(Reply::FdAttached {
            name,
            dev: md.dev(),
            ino: md.ino(),
            file_type: file_type.into(),
        })
    }

    pub fn stats(&self) -> WorkerStats {
        let qemu = self.lock().qemu_pid.map(proc_stats);
        let disks = self
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|d| {
                let s = d.stats.snapshot();
                DiskStats {
                    path: d.path.clone(),
                    reads: s.reads,
                    writes: s.writes,
                    bytes_read: s.bytes_read,
                    bytes_written: s.bytes_written,
                    flushes: s.flushes,
                    errors: s.errors,
                }
            })
            .collect();
        WorkerStats {
            worker: proc_stats(std::process::id()),
            qemu,
            disks,
        }
    }
}

/// Copy the migration stream into the file until QEMU closes it; fsync. Returns the
/// byte count.
fn drain_stream(
    mut conn: std::os::unix::net::UnixStream,
    mut file: std::fs::File,
) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        file.write_all(buf.get(..n).unwrap_or(&[]))?;
        total = total.saturating_add(n as u64);
    }
    file.sync_all()?;
    Ok(total)
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// RSS (KiB) and CPU seconds of a process from /proc.
pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = f
        .get(11)
        .copied()
        .unwrap_or(0)
        .saturating_add(f.get(12).copied().unwrap_or(0));
    ProcStats {
        pid,
        rss_kib: field("VmRSS:"),
        rss_anon_kib: field("RssAnon:"),
        rss_shmem_kib: field("RssShmem:"),
        cpu_s: ticks as f64 / hz,
    }
}

fn chown_for_qemu(runtime: &Path, uid: u32, gid: Option<u32>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(runtime, Some(uid), gid)?;
    // Only this VM's QEMU (and root) may enter: other VMs' QEMUs, which run under
    // other uids, cannot reach our QMP, agent, console or disk sockets.
    std::fs::set_permissions(runtime, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(runtime)? {
        let p = e?.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("disk-"))
        {
            std::os::unix::fs::chown(&p, Some(uid), gid)?;
        }
    }
    Ok(())
}

fn spawn_qemu(spec: &LaunchSpec, args: &[String]) -> Result<tokio::process::Child> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.runtime_dir.join("qemu.log"))
        .context("open qemu.log")?;
    let mut cmd = std::process::Command::new(&spec.qemu_binary);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir(&spec.runtime_dir);
    if let Some(gid) = spec.qemu_gid {
        cmd.gid(gid);
    }
    if let Some(uid) = spec.qemu_uid {
        cmd.uid(uid);
    }
    // SAFETY: the hook only calls async-signal-safe prctl(2). A QEMU whose worker is
    // gone has lost its disk back-ends, so it must not outlive the worker.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = tokio::process::Command::from(cmd)
        .spawn()
        .with_context(|| format!("spawn {}", spec.qemu_binary.display()))?;
    Ok(child)
}
