//! The VM state machine: QEMU process, QMP, guest agent, disks.

// A child module so the integration services can use the VM's private state.
#[path = "integration.rs"]
pub mod integration;

use crate::disks::{self, ServedDisk};
use crate::qemu_cmd::{self, Paths};
use anyhow::{anyhow, bail, Context, Result};
use fv_model::{Generation, VmState};
use fv_qga::Qga;
use fv_qmp::Qmp;
use fv_worker_proto::{ErrorCode, Event, LaunchSpec, WorkerError, WorkerStatus};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};

pub const STATE_FILE: &str = "vmstate.bin";
pub const STATE_META: &str = "vmstate.json";

/// How long a crashed worker keeps answering before it exits.
const CRITICAL_LINGER: Duration = Duration::from_secs(30);

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
        {
            let mut s = self.lock();
            if s.state == state && s.reason == reason {
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

    fn op_guard(&self, what: &str) -> Result<tokio::sync::MutexGuard<'_, ()>, WorkerError> {
        self.op.try_lock().map_err(|_| {
            werr(
                ErrorCode::InvalidState,
                format!(
                    "cannot {what}: another operation is in progress (state {})",
                    self.state()
                ),
            )
        })
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
            let msg = format!("start failed: {e:#}");
            tracing::error!("{msg}");
            self.kill_qemu();
            self.finish_critical(msg);
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
            _ = exit_rx.wait_for(|e| e.is_some()) => bail!("QEMU exited during start-up (see qemu.log)"),
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
            self.finish_critical(format!("QEMU exited unexpectedly: {detail} (see qemu.log)"));
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
        self.set_state(state, reason);
        self.request_exit(Duration::from_millis(500));
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
        self.set_state(VmState::Critical, Some(cause));
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

    pub async fn pause(&self) -> Result<Value, WorkerError> {
        let _g = self.op_guard("pause")?;
        if self.state() != VmState::Running {
            return Err(self.invalid("pause"));
        }
        self.qmp()?.stop().await.map_err(qerr)?;
        self.note_paused();
        self.set_state(VmState::Paused, None);
        Ok(Value::Null)
    }

    pub async fn resume(self: &Arc<Self>) -> Result<Value, WorkerError> {
        let _g = self.op_guard("resume")?;
        if self.state() != VmState::Paused {
            return Err(self.invalid("resume"));
        }
        self.qmp()?.cont().await.map_err(qerr)?;
        self.set_state(VmState::Running, None);
        self.note_resumed();
        Ok(Value::Null)
    }

    pub async fn reset(&self) -> Result<Value, WorkerError> {
        let _g = self.op_guard("reset")?;
        let before = self.state();
        if !matches!(before, VmState::Running | VmState::Paused) {
            return Err(self.invalid("reset"));
        }
        let qmp = self.qmp()?;
        self.set_state(VmState::Resetting, None);
        let r = qmp.system_reset().await.map_err(qerr);
        self.set_state(before, None);
        r.map(|_| Value::Null)
    }

    pub async fn turn_off(&self) -> Result<Value, WorkerError> {
        let _g = self.op_guard("turn off")?;
        let st = self.state();
        if !matches!(
            st,
            VmState::Running | VmState::Paused | VmState::Stopping | VmState::Starting
        ) {
            return Err(self.invalid("turn off"));
        }
        // Pointless for a VM about to lose power, but a freeze must not outlive us.
        self.thaw_if_frozen("turn off").await;
        self.lock().exit_expected = true;
        self.set_state(VmState::Stopping, Some("turning off".into()));
        if let Ok(q) = self.qmp() {
            if let Err(e) = q.quit().await {
                tracing::warn!("quit: {e}");
            }
        }
        if !self.wait_qemu_exit(Duration::from_secs(10)).await {
            self.kill_qemu();
            self.wait_qemu_exit(Duration::from_secs(10)).await;
        }
        self.finish(VmState::Off, Some("turned off".into()));
        Ok(Value::Null)
    }

    pub async fn shut_down(self: &Arc<Self>, timeout_s: u64) -> Result<Value, WorkerError> {
        let _g = self.op_guard("shut down")?;
        if self.state() != VmState::Running {
            return Err(self.invalid("shut down"));
        }
        let qmp = self.qmp()?;
        // A frozen guest cannot flush its filesystems on the way down.
        self.thaw_if_frozen("shut down").await;
        // The shutdown integration service withdrawn: only the ACPI power button.
        let use_agent = self.services().shutdown;
        let method = if use_agent && self.qga.ping(Duration::from_secs(2)).await.is_ok() {
            match self.qga.shutdown("powerdown", Duration::from_secs(2)).await {
                Ok(()) => "agent",
                Err(e) => {
                    tracing::warn!("guest-shutdown failed ({e}); using ACPI");
                    qmp.system_powerdown().await.map_err(qerr)?;
                    "acpi"
                }
            }
        } else {
            qmp.system_powerdown().await.map_err(qerr)?;
            "acpi"
        };
        self.lock().shutdown_pending = true;
        self.set_state(VmState::Stopping, Some(format!("shutting down ({method})")));
        let me = self.clone();
        tokio::spawn(async move {
            if !me.wait_qemu_exit(Duration::from_secs(timeout_s)).await {
                let still = {
                    let mut s = me.lock();
                    std::mem::replace(&mut s.shutdown_pending, false)
                        && s.state == VmState::Stopping
                };
                if still {
                    me.emit(Event::ShutdownTimedOut);
                    me.set_state(
                        VmState::Running,
                        Some("guest did not shut down in time".into()),
                    );
                }
            }
        });
        Ok(json!({ "method": method }))
    }

    pub async fn save(self: &Arc<Self>, dir: &Path) -> Result<Value, WorkerError> {
        let _g = self.op_guard("save")?;
        let before = self.state();
        if !matches!(before, VmState::Running | VmState::Paused) {
            return Err(self.invalid("save"));
        }
        let qmp = self.qmp()?;
        let dir = qemu_cmd::resolve(&self.spec.vm_dir, dir);
        // A saved frozen guest would stay frozen after restore (the thaw timer is gone).
        self.thaw_if_frozen("save").await;
        self.set_state(VmState::Saving, None);
        match self.do_save(&qmp, &dir, before).await {
            Ok(v) => {
                self.lock().exit_expected = true;
                if let Err(e) = qmp.quit().await {
                    tracing::warn!("quit after save: {e}");
                }
                if !self.wait_qemu_exit(Duration::from_secs(10)).await {
                    self.kill_qemu();
                    self.wait_qemu_exit(Duration::from_secs(10)).await;
                }
                self.finish(VmState::Saved, None);
                Ok(v)
            }
            Err(e) => {
                let _ = qmp.migrate_cancel().await;
                if before == VmState::Running {
                    let _ = qmp.cont().await;
                }
                self.set_state(before, Some(format!("save failed: {}", e.message)));
                Err(e)
            }
        }
    }

    async fn do_save(&self, qmp: &Qmp, dir: &Path, before: VmState) -> Result<Value, WorkerError> {
        let io = |e: std::io::Error| werr(ErrorCode::Io, e.to_string());
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
        let tmp = dir.join(format!("{STATE_FILE}.partial"));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
        qmp.migrate(&format!("unix:{}", sock.display()))
            .await
            .map_err(qerr)?;
        let (mut conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .map_err(|_| {
                werr(
                    ErrorCode::QemuError,
                    "QEMU did not connect to the save socket",
                )
            })?
            .map_err(io)?;
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        let mut last_pct = 0u8;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                n = conn.read(&mut buf) => {
                    let n = n.map_err(io)?;
                    if n == 0 { break; }
                    file.write_all(buf.get(..n).unwrap_or(&[])).await.map_err(io)?;
                    total += n as u64;
                }
                _ = tick.tick() => {
                    if let Ok(info) = qmp.query_migrate().await {
                        if matches!(info.status.as_deref(), Some("failed") | Some("cancelled")) {
                            return Err(werr(ErrorCode::QemuError, format!("migration failed: {}", info.error_desc.unwrap_or_default())));
                        }
                        let p = info.percent();
                        if p > last_pct {
                            last_pct = p;
                            self.emit(Event::SaveProgress { percent: p });
                        }
                    }
                }
            }
        }
        drop(buf);
        // QEMU closes the stream when done; confirm it considers the save complete.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let info = qmp.query_migrate().await.map_err(qerr)?;
            match info.status.as_deref() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    return Err(werr(
                        ErrorCode::QemuError,
                        format!("migration failed: {}", info.error_desc.unwrap_or_default()),
                    ))
                }
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(werr(ErrorCode::QemuError, "migration did not complete"))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        drop(file);
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
        Ok(json!({ "path": final_path, "bytes": total }))
    }

    pub async fn change_media(
        &self,
        index: usize,
        path: Option<&Path>,
    ) -> Result<Value, WorkerError> {
        let _g = self.op_guard("change media")?;
        if !matches!(self.state(), VmState::Running | VmState::Paused) {
            return Err(self.invalid("change media"));
        }
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
        Ok(Value::Null)
    }

    pub async fn guest_ping(self: &Arc<Self>) -> Result<Value, WorkerError> {
        if !matches!(self.state(), VmState::Running | VmState::Stopping) {
            return Err(self.invalid("ping the guest"));
        }
        let t = Instant::now();
        match self.qga.ping(Duration::from_secs(5)).await {
            Ok(()) => {
                let newly = !std::mem::replace(&mut self.lock().agent_connected, true);
                if newly {
                    self.on_guest_ready();
                }
                Ok(json!({ "latency_ms": t.elapsed().as_millis() as u64 }))
            }
            Err(e) => {
                self.lock().agent_connected = false;
                Err(werr(ErrorCode::GuestAgentUnavailable, e.to_string()))
            }
        }
    }

    pub fn stats(&self) -> Value {
        let me = proc_stats(std::process::id());
        let qemu = self.lock().qemu_pid.map(proc_stats);
        let disks: Vec<Value> = self
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|d| {
                let s = d.stats.snapshot();
                json!({"path": d.path, "reads": s.reads, "writes": s.writes, "bytes_read": s.bytes_read,
                       "bytes_written": s.bytes_written, "flushes": s.flushes, "errors": s.errors})
            })
            .collect();
        json!({ "worker": me, "qemu": qemu, "disks": disks })
    }
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// RSS (KiB) and CPU seconds of a process from /proc.
pub fn proc_stats(pid: u32) -> Value {
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
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    json!({
        "pid": pid,
        "rss_kib": field("VmRSS:"),
        "rss_anon_kib": field("RssAnon:"),
        "rss_shmem_kib": field("RssShmem:"),
        "cpu_s": ticks as f64 / hz,
    })
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
