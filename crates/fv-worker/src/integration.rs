//! Integration services (Hyper-V's heartbeat, time synchronisation, key-value
//! exchange, backup and guest services), all through qemu-guest-agent.
//!
//! The guest is untrusted: every agent call is bounded by a timeout, whatever it
//! reports is size-limited before it is kept, and no answer (or a wrong one) never
//! changes the VM's state — it only changes what the services report.
//!
//! A child module of `vm` so it can use the VM's private state.

use super::{werr, Vm};
use fv_model::api::{FreezeStatus, GuestAdapter, GuestInfo, HeartbeatStatus, HeartbeatView};
use fv_model::{IntegrationServices, VmState};
use fv_qga::QgaError;
use fv_worker_proto::{ErrorCode, Event, Reply, WorkerError};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Hyper-V's pool of host-provided ("auto external") values, as the Linux KVP
/// daemon keeps it: records of a 512-byte key and a 2048-byte value, NUL padded.
pub const KVP_POOL: &str = "/var/lib/hyperv/.kvp_pool_3";
const KVP_DIR: &str = "/var/lib/hyperv";
const KVP_KEY_SIZE: usize = 512;
const KVP_VALUE_SIZE: usize = 2048;
/// Copy-file chunk (raw bytes per guest-file-write; base64 makes it 64 KiB on the wire).
const COPY_CHUNK: usize = 48 << 10;
/// Longest guest-reported string we keep, and most adapters / addresses per adapter.
const MAX_GUEST_STR: usize = 256;
const MAX_ADAPTERS: usize = 64;
const MAX_ADDRS: usize = 64;
/// Per-call bound for the small agent queries.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Integration-service state of one VM (inside `Vm::integ`).
pub struct IntegState {
    pub services: IntegrationServices,
    /// VM name published to the guest (follows renames pushed by fvd).
    pub vm_name: String,
    pub heartbeat: HeartbeatView,
    /// The guest answered a heartbeat since start/reset.
    hb_answered: bool,
    hb_misses: u32,
    pub guest: Option<GuestInfo>,
    pub freeze: FreezeStatus,
    /// Bumped by every freeze, so an old deadline timer does not thaw a newer freeze.
    freeze_gen: u64,
    pub paused_at: Option<Instant>,
    /// Set the guest clock once the agent answers (start from saved state).
    pub time_sync_pending: bool,
}

impl IntegState {
    pub fn new(services: IntegrationServices, vm_name: String) -> IntegState {
        IntegState {
            services,
            vm_name,
            heartbeat: HeartbeatView {
                status: if services.heartbeat {
                    HeartbeatStatus::NoContact
                } else {
                    HeartbeatStatus::Disabled
                },
                last_answer: None,
            },
            hb_answered: false,
            hb_misses: 0,
            guest: None,
            freeze: FreezeStatus::default(),
            freeze_gen: 0,
            paused_at: None,
            time_sync_pending: false,
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn agent_err(e: QgaError) -> WorkerError {
    match e {
        QgaError::Command { .. } | QgaError::BadReply { .. } => {
            werr(ErrorCode::QemuError, e.to_string())
        }
        _ => werr(ErrorCode::GuestAgentUnavailable, e.to_string()),
    }
}

fn unavailable(reason: impl std::fmt::Display) -> WorkerError {
    werr(
        ErrorCode::GuestAgentUnavailable,
        format!("application-consistent operations are unavailable: {reason}"),
    )
}

fn bounded(s: Option<String>) -> Option<String> {
    s.map(|s| s.chars().take(MAX_GUEST_STR).collect::<String>())
        .filter(|s| !s.is_empty())
}

/// The pool file: fixed-size records, NUL padded; over-long values are cut.
pub fn kvp_pool_bytes(records: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * (KVP_KEY_SIZE + KVP_VALUE_SIZE));
    for (k, v) in records {
        for (s, size) in [(k.as_bytes(), KVP_KEY_SIZE), (v.as_bytes(), KVP_VALUE_SIZE)] {
            // Keep one NUL terminator, as the Hyper-V daemon's C strings have.
            let n = s.len().min(size - 1);
            out.extend_from_slice(s.get(..n).unwrap_or(&[]));
            out.resize(out.len() + (size - n), 0);
        }
    }
    out
}

impl Vm {
    pub(super) fn integ(&self) -> std::sync::MutexGuard<'_, IntegState> {
        self.integ.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn services(&self) -> IntegrationServices {
        self.integ().services
    }

    fn finished(&self) -> bool {
        self.lock().finished
    }

    fn set_heartbeat(&self, f: impl FnOnce(&mut IntegState)) {
        let ev = {
            let mut g = self.integ();
            let before = g.heartbeat.status;
            f(&mut g);
            (g.heartbeat.status != before).then_some(g.heartbeat)
        };
        if let Some(h) = ev {
            self.emit(Event::HeartbeatChanged {
                status: h.status,
                last_answer: h.last_answer,
            });
        }
    }

    /// The guest rebooted (or the VM was reset): nothing it told us holds any more.
    pub(super) fn integration_reset(&self) {
        self.set_heartbeat(|g| {
            g.hb_answered = false;
            g.hb_misses = 0;
            g.guest = None;
            g.freeze = FreezeStatus::default();
            if g.services.heartbeat {
                g.heartbeat.status = HeartbeatStatus::NoContact;
            }
        });
    }

    /// Runs for the VM's lifetime: ping the agent every interval while Running.
    /// Never acts on the VM: losing the heartbeat is only reported.
    pub(super) async fn heartbeat_loop(self: Arc<Self>) {
        let t = self.spec.integration_tuning;
        let interval = Duration::from_millis(t.heartbeat_interval_ms.max(100));
        let timeout = Duration::from_millis(t.heartbeat_timeout_ms.max(100));
        let misses = t.heartbeat_misses.max(1);
        loop {
            if self.finished() {
                return;
            }
            if !self.services().heartbeat {
                self.set_heartbeat(|g| g.heartbeat.status = HeartbeatStatus::Disabled);
            } else if self.state() == VmState::Running {
                // The whole ping (agent lock wait, resync, reply) is bounded.
                let bound = timeout * 2 + Duration::from_secs(2);
                let ok = matches!(
                    tokio::time::timeout(bound, self.qga.ping(timeout)).await,
                    Ok(Ok(()))
                );
                // A pause or stop that began during the ping is no guest failure.
                if self.state() == VmState::Running && self.services().heartbeat {
                    self.heartbeat_result(ok, misses);
                }
            }
            tokio::time::sleep(interval).await;
        }
    }

    fn heartbeat_result(&self, ok: bool, misses: u32) {
        self.set_heartbeat(|g| {
            if g.heartbeat.status == HeartbeatStatus::Disabled {
                g.heartbeat.status = HeartbeatStatus::NoContact;
            }
            if ok {
                g.hb_answered = true;
                g.hb_misses = 0;
                g.heartbeat.last_answer = Some(unix_now());
                g.heartbeat.status = HeartbeatStatus::Ok;
            } else {
                g.hb_misses = g.hb_misses.saturating_add(1);
                if g.hb_answered && g.hb_misses >= misses {
                    g.heartbeat.status = HeartbeatStatus::LostCommunication;
                }
            }
        });
    }

    /// The agent answered for the first time since start/reset.
    pub(super) fn on_guest_ready(self: &Arc<Self>) {
        self.emit(Event::GuestReady);
        self.kvp_kick.notify_one();
        let (services, sync) = {
            let mut g = self.integ();
            (
                g.services,
                std::mem::replace(&mut g.time_sync_pending, false),
            )
        };
        if services.key_value_exchange {
            let me = self.clone();
            tokio::spawn(async move { me.publish_host_kvp().await });
        }
        if sync && services.time_sync {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.sync_time("start from saved state").await {
                    me.emit(Event::Warning {
                        message: format!("time synchronisation after restore failed: {e}"),
                    });
                }
            });
        }
    }

    /// fvd changed the offered services (or renamed the VM) while running.
    pub async fn set_integration(
        self: &Arc<Self>,
        services: IntegrationServices,
        vm_name: Option<String>,
    ) -> Result<Reply, WorkerError> {
        let (old, renamed) = {
            let mut g = self.integ();
            let old = g.services;
            g.services = services;
            let renamed = match vm_name {
                Some(n) if n != g.vm_name => {
                    g.vm_name = n;
                    true
                }
                _ => false,
            };
            if !services.key_value_exchange {
                g.guest = None;
            }
            (old, renamed)
        };
        if services.heartbeat != old.heartbeat {
            self.set_heartbeat(|g| {
                g.hb_misses = 0;
                g.heartbeat.status = if services.heartbeat {
                    if g.hb_answered {
                        HeartbeatStatus::Ok
                    } else {
                        HeartbeatStatus::NoContact
                    }
                } else {
                    HeartbeatStatus::Disabled
                };
            });
        }
        let agent = self.lock().agent_connected;
        if services.key_value_exchange && agent && (renamed || !old.key_value_exchange) {
            self.kvp_kick.notify_one();
            let me = self.clone();
            tokio::spawn(async move { me.publish_host_kvp().await });
        }
        tracing::info!("integration services now {services:?}");
        Ok(Reply::Integration {
            integration_services: services,
        })
    }

    // ------------------------------------------------------------ key-value exchange

    /// Runs for the VM's lifetime: re-read guest facts every interval (and when kicked).
    pub(super) async fn kvp_loop(self: Arc<Self>) {
        let interval = Duration::from_millis(self.spec.integration_tuning.kvp_interval_ms.max(500));
        loop {
            if self.finished() {
                return;
            }
            let due = {
                let g = self.integ();
                // No point asking an agent the heartbeat already found gone.
                g.services.key_value_exchange
                    && !g.freeze.frozen
                    && g.heartbeat.status != HeartbeatStatus::LostCommunication
            } && self.state() == VmState::Running
                && self.lock().agent_connected;
            if due {
                self.refresh_guest_info().await;
            }
            let _ = tokio::time::timeout(interval, self.kvp_kick.notified()).await;
        }
    }

    async fn refresh_guest_info(&self) {
        let os = self.qga.osinfo(QUERY_TIMEOUT).await;
        if let Err(QgaError::Unavailable(_) | QgaError::Timeout { .. }) = &os {
            // The agent is not there: don't hold its channel for two more timeouts.
            tracing::debug!("key-value exchange: the guest agent does not answer");
            return;
        }
        let host = self.qga.host_name(QUERY_TIMEOUT).await;
        let ifs = self.qga.network_interfaces(QUERY_TIMEOUT).await;
        if os.is_err() && host.is_err() && ifs.is_err() {
            tracing::debug!("key-value exchange: the guest did not answer");
            return;
        }
        let prev = self.integ().guest.clone().unwrap_or_default();
        let mut info = GuestInfo {
            updated_at: unix_now(),
            ..prev
        };
        if let Ok(os) = os {
            info.os_name = bounded(os.pretty_name.or(os.name));
            info.os_version = bounded(os.version.or(os.version_id));
            info.kernel_release = bounded(os.kernel_release);
        }
        if let Ok(h) = host {
            info.hostname = bounded(Some(h));
        }
        if let Ok(ifs) = ifs {
            info.adapters = ifs
                .into_iter()
                .filter(|i| i.name != "lo")
                .take(MAX_ADAPTERS)
                .map(|i| {
                    let pick = |kind: &str| -> Vec<String> {
                        i.ip_addresses
                            .iter()
                            .filter(|a| a.ip_address_type == kind)
                            .filter_map(|a| a.ip_address.parse::<std::net::IpAddr>().ok())
                            .map(|a| a.to_string())
                            .take(MAX_ADDRS)
                            .collect()
                    };
                    GuestAdapter {
                        mac: bounded(i.hardware_address.clone().map(|m| m.to_ascii_lowercase())),
                        name: i.name.chars().take(MAX_GUEST_STR).collect(),
                        ipv4: pick("ipv4"),
                        ipv6: pick("ipv6"),
                    }
                })
                .collect();
        }
        let mut g = self.integ();
        if g.services.key_value_exchange {
            g.guest = Some(info);
        }
    }

    /// Publish host name, VM name and VM id to the guest (Hyper-V's pool 3).
    pub(super) async fn publish_host_kvp(self: Arc<Self>) {
        let host = if self.spec.host_name.is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        } else {
            self.spec.host_name.clone()
        };
        let name = self.integ().vm_name.clone();
        // Hyper-V publishes the VM id as an upper-case GUID.
        let id = self.spec.config.id.to_string().to_ascii_uppercase();
        let pool = kvp_pool_bytes(&[
            ("HostName", &host),
            ("PhysicalHostName", &host),
            ("PhysicalHostNameFullyQualified", &host),
            ("VirtualMachineName", &name),
            ("VirtualMachineId", &id),
        ]);
        let mut r = self.write_guest_file(KVP_POOL, &pool).await;
        if r.is_err() {
            // Guests without Hyper-V's KVP daemon lack the directory; create it only
            // where the agent allows guest-exec.
            match self.guest_exec_allowed().await {
                true => match self.guest_mkdir_p(KVP_DIR).await {
                    Ok(()) => r = self.write_guest_file(KVP_POOL, &pool).await,
                    Err(e) => r = Err(e),
                },
                false => {
                    r = Err(werr(
                        ErrorCode::BadRequest,
                        format!("{KVP_DIR} does not exist and the agent does not allow guest-exec"),
                    ))
                }
            }
        }
        match r {
            Ok(_) => tracing::info!("key-value exchange: published host values to {KVP_POOL}"),
            Err(e) => self.emit(Event::Warning {
                message: format!(
                    "key-value exchange: cannot publish host values to the guest: {}",
                    e.message
                ),
            }),
        }
    }

    async fn guest_exec_allowed(&self) -> bool {
        match self.qga.info(QUERY_TIMEOUT).await {
            Ok(i) => i
                .supported_commands
                .iter()
                .any(|c| c.name == "guest-exec" && c.enabled),
            Err(_) => false,
        }
    }

    async fn guest_mkdir_p(&self, dir: &str) -> Result<(), WorkerError> {
        let st = self
            .qga
            .exec_wait("mkdir", &["-p", "--", dir], Duration::from_secs(10))
            .await
            .map_err(agent_err)?;
        if st.exit_code != Some(0) {
            return Err(werr(
                ErrorCode::Io,
                format!(
                    "mkdir -p {dir} in the guest failed: {}",
                    String::from_utf8_lossy(&st.stderr).trim()
                ),
            ));
        }
        Ok(())
    }

    /// Write `data` to a guest file (truncating it).
    async fn write_guest_file(&self, path: &str, data: &[u8]) -> Result<u64, WorkerError> {
        let h = self
            .qga
            .file_open(path, "w", QUERY_TIMEOUT)
            .await
            .map_err(agent_err)?;
        let mut r = Ok(0);
        for chunk in data.chunks(COPY_CHUNK) {
            match self.write_chunk(h, chunk).await {
                Ok(n) => r = r.map(|d| d + n),
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
        }
        let c = self
            .qga
            .file_close(h, QUERY_TIMEOUT)
            .await
            .map_err(agent_err);
        let n = r?;
        c?;
        Ok(n)
    }

    async fn write_chunk(&self, h: i64, chunk: &[u8]) -> Result<u64, WorkerError> {
        let n = self
            .qga
            .file_write(h, chunk, Duration::from_secs(30))
            .await
            .map_err(agent_err)?;
        if n != chunk.len() as u64 {
            return Err(werr(
                ErrorCode::Io,
                format!("the guest wrote {n} of {} bytes", chunk.len()),
            ));
        }
        Ok(n)
    }

    // ------------------------------------------------------------ time synchronisation

    /// Set the guest clock from the host's CLOCK_REALTIME. Callable by anything that
    /// brings back an old guest state (restore, resume after a long pause, and later
    /// checkpoint apply).
    pub async fn sync_time(&self, reason: &str) -> Result<Reply, WorkerError> {
        if !self.services().time_sync {
            return Err(werr(
                ErrorCode::InvalidState,
                "the time synchronisation integration service is withdrawn for this VM",
            ));
        }
        if self.state() != VmState::Running {
            return Err(self.invalid("synchronise the guest clock"));
        }
        let guest_before = self.qga.get_time(QUERY_TIMEOUT).await.map_err(agent_err)?;
        let host = now_ns();
        if let Err(e) = self.qga.set_time(Some(host), Duration::from_secs(10)).await {
            // qemu-ga sets the clock and then runs `hwclock -w`; a guest without a
            // writable RTC reports an error although its clock is already right.
            let after = self.qga.get_time(QUERY_TIMEOUT).await.map_err(agent_err)?;
            if (after - now_ns()).abs() > 2_000_000_000 {
                return Err(agent_err(e));
            }
            tracing::warn!("guest-set-time: {e} (the clock is set nevertheless)");
        }
        let correction_ms = (host - guest_before) / 1_000_000;
        self.emit(Event::TimeSynced {
            reason: reason.to_string(),
            guest_before_ns: guest_before,
            host_ns: host,
            correction_ms,
        });
        Ok(Reply::TimeSynced {
            guest_before_ns: guest_before,
            host_ns: host,
            correction_ms,
        })
    }

    pub(super) fn note_paused(&self) {
        self.integ().paused_at = Some(Instant::now());
    }

    /// After a resume: a long pause left the guest clock behind.
    pub(super) fn note_resumed(self: &Arc<Self>) {
        let paused = self.integ().paused_at.take();
        let threshold =
            Duration::from_millis(self.spec.integration_tuning.time_sync_after_pause_ms);
        let Some(p) = paused else { return };
        let d = p.elapsed();
        if d <= threshold || !self.services().time_sync {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let why = format!("resume after {} s paused", d.as_secs());
            if let Err(e) = me.sync_time(&why).await {
                me.emit(Event::Warning {
                    message: format!("time synchronisation after resume failed: {e}"),
                });
            }
        });
    }

    // ------------------------------------------------------------ backup (freeze/thaw)

    /// Why application-consistent operations cannot run now, if they cannot.
    async fn check_backup_available(&self) -> Result<(), WorkerError> {
        if !self.services().backup {
            return Err(unavailable(
                "the backup integration service is withdrawn for this VM",
            ));
        }
        if self.state() != VmState::Running {
            let s = self.state();
            return Err(werr(
                ErrorCode::InvalidState,
                format!("cannot freeze the guest's filesystems while the VM is {s}"),
            ));
        }
        if let Err(e) = self.qga.ping(Duration::from_secs(2)).await {
            return Err(unavailable(format!(
                "the guest agent does not answer ({e})"
            )));
        }
        Ok(())
    }

    pub async fn freeze(self: &Arc<Self>, timeout_s: u64) -> Result<Reply, WorkerError> {
        // fvd allows 1-600 s; a freeze must never be unbounded whoever asks.
        let timeout_s = timeout_s.clamp(1, 3600);
        let _g = self.freeze_lock.lock().await;
        self.check_backup_available().await?;
        if self.integ().freeze.frozen {
            return Err(werr(
                ErrorCode::InvalidState,
                "the guest's filesystems are already frozen (thaw first)",
            ));
        }
        let n = match self.qga.fsfreeze_freeze(Duration::from_secs(60)).await {
            Ok(n) => n,
            Err(e) => {
                // A freeze that failed or timed out may have frozen some filesystems.
                let _ = self.qga.fsfreeze_thaw(Duration::from_secs(10)).await;
                return Err(agent_err(e));
            }
        };
        let deadline = unix_now() + timeout_s;
        let gen = {
            let mut g = self.integ();
            g.freeze_gen += 1;
            g.freeze = FreezeStatus {
                frozen: true,
                filesystems: n,
                thaw_deadline: Some(deadline),
            };
            g.freeze_gen
        };
        self.emit(Event::Frozen {
            filesystems: n,
            thaw_deadline: deadline,
        });
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(timeout_s)).await;
            // Retried: a guest that stays frozen blocks its own writers indefinitely.
            for _ in 0..5 {
                let still = {
                    let g = me.integ();
                    g.freeze.frozen && g.freeze_gen == gen
                };
                if !still || me.finished() {
                    return;
                }
                match me.thaw_inner("timeout", Some(gen)).await {
                    Ok(_) => return,
                    Err(e) => tracing::warn!("thaw at the freeze deadline failed: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        Ok(Reply::Frozen {
            filesystems: n,
            thaw_deadline: deadline,
        })
    }

    pub async fn thaw(&self) -> Result<Reply, WorkerError> {
        let n = self.thaw_inner("requested", None).await?;
        Ok(Reply::Thawed { filesystems: n })
    }

    /// Thaw (only freeze generation `gen`, when given). Thawing is always allowed,
    /// even with the backup service withdrawn: it only undoes.
    async fn thaw_inner(&self, reason: &str, gen: Option<u64>) -> Result<u64, WorkerError> {
        let _g = self.freeze_lock.lock().await;
        if let Some(gen) = gen {
            let g = self.integ();
            if !g.freeze.frozen || g.freeze_gen != gen {
                return Ok(0);
            }
        }
        let n = self
            .qga
            .fsfreeze_thaw(Duration::from_secs(10))
            .await
            .map_err(agent_err)?;
        let was = std::mem::take(&mut self.integ().freeze).frozen;
        if was || n > 0 {
            self.emit(Event::Thawed {
                filesystems: n,
                reason: reason.to_string(),
            });
        }
        Ok(n)
    }

    /// Before save, shut down or turn off: never leave a guest frozen behind.
    pub(super) async fn thaw_if_frozen(&self, reason: &str) {
        if !self.integ().freeze.frozen {
            return;
        }
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), self.thaw_inner(reason, None))
            .await
            .unwrap_or_else(|_| Err(werr(ErrorCode::GuestAgentUnavailable, "timed out")))
        {
            tracing::warn!("thaw before {reason} failed: {e}");
        }
    }

    pub async fn freeze_status(&self) -> Result<Reply, WorkerError> {
        let mut st = self.integ().freeze;
        if self.state() == VmState::Running {
            if let Ok(s) = self.qga.fsfreeze_status(QUERY_TIMEOUT).await {
                st.frozen = s == "frozen";
                if !st.frozen {
                    st.thaw_deadline = None;
                }
            }
        }
        Ok(Reply::FreezeStatus(st))
    }

    // ------------------------------------------------------------ guest services (copy file)

    /// Copy a host file (spooled by fvd) into the guest, like Hyper-V's Copy-VMFile.
    pub async fn copy_file(
        &self,
        src: &Path,
        dest: &str,
        create_full_path: bool,
        overwrite: bool,
        token: &str,
    ) -> Result<Reply, WorkerError> {
        if !self.services().guest_services {
            return Err(werr(
                ErrorCode::InvalidState,
                "the guest services integration service is off for this VM",
            ));
        }
        if self.state() != VmState::Running {
            return Err(self.invalid("copy a file into the guest"));
        }
        if self.integ().freeze.frozen {
            return Err(werr(
                ErrorCode::InvalidState,
                "the guest's filesystems are frozen; thaw first",
            ));
        }
        if !dest.starts_with('/') || dest.contains('\0') || dest.ends_with('/') {
            return Err(werr(
                ErrorCode::BadRequest,
                format!("destination {dest:?} must be an absolute file path in the guest"),
            ));
        }
        // fvd's spool file lives in our runtime dir; nothing else is read.
        let src = crate::qemu_cmd::resolve(&self.spec.runtime_dir, src);
        let escapes = src.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::RootDir
            )
        });
        if escapes || src.parent() != Some(self.spec.runtime_dir.as_path()) {
            return Err(werr(
                ErrorCode::BadRequest,
                "the source must be in the VM's runtime directory",
            ));
        }
        let io = |e: std::io::Error| werr(ErrorCode::Io, format!("{}: {e}", src.display()));
        let mut file = tokio::fs::File::open(&src).await.map_err(io)?;
        let size = file.metadata().await.map_err(io)?.len();
        if let Err(e) = self.qga.ping(Duration::from_secs(2)).await {
            return Err(werr(
                ErrorCode::GuestAgentUnavailable,
                format!("the guest agent does not answer ({e})"),
            ));
        }
        // Refuse to replace an existing file unless asked to.
        if let Ok(h) = self.qga.file_open(dest, "r", QUERY_TIMEOUT).await {
            let _ = self.qga.file_close(h, QUERY_TIMEOUT).await;
            if !overwrite {
                return Err(werr(
                    ErrorCode::InvalidState,
                    format!("{dest} already exists in the guest (use overwrite)"),
                ));
            }
        }
        let parent = dest.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        let h = match self.qga.file_open(dest, "w", QUERY_TIMEOUT).await {
            Ok(h) => h,
            Err(e) if create_full_path && !parent.is_empty() => {
                if !self.guest_exec_allowed().await {
                    return Err(werr(
                        ErrorCode::BadRequest,
                        format!("cannot create {parent} in the guest: the agent does not allow guest-exec ({e})"),
                    ));
                }
                self.guest_mkdir_p(parent).await?;
                self.qga
                    .file_open(dest, "w", QUERY_TIMEOUT)
                    .await
                    .map_err(agent_err)?
            }
            Err(e) => {
                let hint = if create_full_path {
                    ""
                } else {
                    " (does the folder exist? use create_full_path)"
                };
                return Err(werr(
                    ErrorCode::Io,
                    format!("cannot create {dest} in the guest: {e}{hint}"),
                ));
            }
        };
        let r = self.copy_stream(&mut file, h, size, token).await;
        let c = self
            .qga
            .file_close(h, QUERY_TIMEOUT)
            .await
            .map_err(agent_err);
        let written = r?;
        c?;
        // Verify what arrived: the guest's own idea of the file size.
        let h = self
            .qga
            .file_open(dest, "r", QUERY_TIMEOUT)
            .await
            .map_err(agent_err)?;
        let pos = self.qga.file_seek(h, 0, "end", QUERY_TIMEOUT).await;
        let _ = self.qga.file_close(h, QUERY_TIMEOUT).await;
        let guest_size = pos.map_err(agent_err)?;
        if guest_size != size || written != size {
            return Err(werr(
                ErrorCode::Io,
                format!("{dest} in the guest has {guest_size} bytes, the source {size}"),
            ));
        }
        Ok(Reply::Copied {
            bytes: size,
            dest: dest.to_string(),
        })
    }

    async fn copy_stream(
        &self,
        file: &mut tokio::fs::File,
        h: i64,
        size: u64,
        token: &str,
    ) -> Result<u64, WorkerError> {
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut done = 0u64;
        let mut last = 0u8;
        loop {
            // Fill a whole chunk (short reads are possible) before sending it.
            let mut n = 0;
            while n < buf.len() {
                let r = file
                    .read(buf.get_mut(n..).unwrap_or(&mut []))
                    .await
                    .map_err(|e| werr(ErrorCode::Io, e.to_string()))?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            if n == 0 {
                break;
            }
            done += self.write_chunk(h, buf.get(..n).unwrap_or(&[])).await?;
            let p = (done.saturating_mul(100) / size.max(1)).min(100) as u8;
            if p > last {
                last = p;
                self.emit(Event::CopyProgress {
                    token: token.to_string(),
                    percent: p,
                });
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn pool_records_are_fixed_size_and_nul_padded() {
        let b = kvp_pool_bytes(&[("HostName", "h1"), ("VirtualMachineName", "vm")]);
        assert_eq!(b.len(), 2 * (512 + 2048));
        assert_eq!(&b[..8], b"HostName");
        assert!(b[8..512].iter().all(|&x| x == 0));
        assert_eq!(&b[512..514], b"h1");
        assert_eq!(&b[2560..2578], b"VirtualMachineName");
        let long = "x".repeat(5000);
        let b = kvp_pool_bytes(&[("k", &long)]);
        assert_eq!(b.len(), 2560);
        assert_eq!(b[2559], 0);
    }
}
