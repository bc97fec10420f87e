//! fvd's side of the integration services: freeze/thaw (backup), copy-file (guest
//! services), pushing changed service settings to a running worker, and turning
//! worker integration events into fvd events.
//!
//! A child module of `manager` so it can use the VM table directly.

use super::{Manager, MgrError, Result, Vm};
use crate::jobs::JobHandle;
use crate::worker::{CallError, WorkerConn};
use fv_model::api::{
    FreezeStatus, HeartbeatStatus, COPY_FILE_MAX_BYTES, FREEZE_DEFAULT_TIMEOUT_S,
    FREEZE_MAX_TIMEOUT_S,
};
use fv_model::VmState;
use fv_worker_proto::{ErrorCode, Event, Op};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

/// Spool files fvd writes into a VM's runtime dir for copy-file.
const SPOOL_PREFIX: &str = "copy-";

fn from_worker(state: VmState, e: CallError) -> MgrError {
    match e {
        CallError::Worker(w) => match w.code {
            ErrorCode::GuestAgentUnavailable => MgrError::GuestAgentUnavailable(w.message),
            ErrorCode::InvalidState => MgrError::InvalidState {
                message: w.message,
                state,
            },
            ErrorCode::BadRequest => MgrError::BadRequest(w.message),
            _ => MgrError::Internal(w.message),
        },
        other => MgrError::Internal(other.to_string()),
    }
}

fn at(unix_s: u64) -> String {
    crate::util::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(unix_s))
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::ENOSPC) || e.raw_os_error() == Some(nix::libc::EDQUOT)
}

impl Manager {
    /// The running VM's worker, or why there is none.
    fn running_worker(&self, id: Uuid, action: &str) -> Result<(Arc<WorkerConn>, String)> {
        let vms = self.vms.lock();
        let vm = vms
            .get(&id)
            .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
        match &vm.worker {
            Some(w) if vm.row.state == VmState::Running => Ok((w.clone(), vm.config.name.clone())),
            _ => Err(Self::invalid_state(vm, action)),
        }
    }

    fn state_of(&self, id: Uuid) -> VmState {
        self.vms
            .lock()
            .get(&id)
            .map(|v| v.row.state)
            .unwrap_or(VmState::Off)
    }

    /// Freeze the guest's filesystems (backup integration service) for at most
    /// `timeout_s` seconds; the worker thaws at the deadline whatever happens here.
    pub async fn freeze(&self, id: Uuid, timeout_s: Option<u64>) -> Result<FreezeStatus> {
        let t = timeout_s.unwrap_or(FREEZE_DEFAULT_TIMEOUT_S);
        if !(1..=FREEZE_MAX_TIMEOUT_S).contains(&t) {
            return Err(MgrError::BadRequest(format!(
                "timeout_s must be 1-{FREEZE_MAX_TIMEOUT_S}"
            )));
        }
        {
            let vms = self.vms.lock();
            let vm = vms
                .get(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            if !vm.config.integration_services.backup {
                return Err(MgrError::GuestAgentUnavailable(format!(
                    "application-consistent operations are unavailable: the backup integration \
                     service is withdrawn for VM {:?} (enable it with `fv vm set {} --enable-integration backup`)",
                    vm.config.name, vm.config.name
                )));
            }
        }
        let (w, _) = self.running_worker(id, "freeze the filesystems of")?;
        w.call(Op::Freeze { timeout_s: t }, Duration::from_secs(90))
            .await
            .map_err(|e| from_worker(self.state_of(id), e))?;
        self.freeze_status(id).await
    }

    pub async fn thaw(&self, id: Uuid) -> Result<FreezeStatus> {
        let (w, _) = self.running_worker(id, "thaw the filesystems of")?;
        w.call(Op::Thaw, Duration::from_secs(30))
            .await
            .map_err(|e| from_worker(self.state_of(id), e))?;
        self.freeze_status(id).await
    }

    pub async fn freeze_status(&self, id: Uuid) -> Result<FreezeStatus> {
        let w = {
            let vms = self.vms.lock();
            let vm = vms
                .get(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            vm.worker.clone()
        };
        let Some(w) = w else {
            return Ok(FreezeStatus::default());
        };
        let v = w
            .call(Op::FreezeStatus, Duration::from_secs(10))
            .await
            .map_err(|e| from_worker(self.state_of(id), e))?;
        let fv_worker_proto::Reply::FreezeStatus(st) = v else {
            return Err(super::internal(format!(
                "the worker answered freeze_status with {v:?}"
            )));
        };
        if let Some(vm) = self.vms.lock().get_mut(&id) {
            if let Some((s, _)) = vm.status.as_mut() {
                s.freeze = st;
            }
        }
        Ok(st)
    }

    /// Checks before fvd accepts a copy-file body: the VM runs, offers guest services,
    /// and the destination is an absolute guest path. Returns where to spool.
    pub fn copy_file_check(&self, id: Uuid, dest: &str) -> Result<PathBuf> {
        {
            let vms = self.vms.lock();
            let vm = vms
                .get(&id)
                .ok_or_else(|| MgrError::NotFound(format!("no VM {id}")))?;
            if !vm.config.integration_services.guest_services {
                return Err(MgrError::ServiceDisabled(format!(
                    "the guest services integration service (Hyper-V's Guest Service Interface) is off \
                     for VM {:?}; enable it with `fv vm set {} --enable-integration guest_services`",
                    vm.config.name, vm.config.name
                )));
            }
        }
        self.running_worker(id, "copy a file into")?;
        if !dest.starts_with('/') || dest.ends_with('/') || dest.contains('\0') {
            return Err(MgrError::BadRequest(format!(
                "dest {dest:?} must be an absolute file path in the guest"
            )));
        }
        Ok(self.vm_runtime(id))
    }

    /// Write the request body into a spool file in the VM's runtime dir (never a path
    /// the caller names), at most [`COPY_FILE_MAX_BYTES`].
    pub async fn copy_file_spool<S, B, E>(
        &self,
        id: Uuid,
        length: Option<u64>,
        mut body: S,
    ) -> Result<PathBuf>
    where
        S: futures_util::Stream<Item = std::result::Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt;
        let dir = self.vm_runtime(id);
        if let Some(n) = length {
            if n > COPY_FILE_MAX_BYTES {
                return Err(MgrError::TooLarge(format!(
                    "the file has {n} bytes; copy-file takes at most {COPY_FILE_MAX_BYTES}"
                )));
            }
            if let Ok(fs) = nix::sys::statvfs::statvfs(&dir) {
                let free = fs.blocks_available().saturating_mul(fs.fragment_size());
                if n > free {
                    return Err(MgrError::InsufficientStorage(format!(
                        "{} has {free} bytes free; the file needs {n}",
                        dir.display()
                    )));
                }
            }
        }
        let path = dir.join(format!("{SPOOL_PREFIX}{}.bin", Uuid::new_v4()));
        let r = async {
            let mut f = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                // The caller's data: readable by fvd and the worker (root) only.
                .mode(0o600)
                .open(&path)
                .await
                .map_err(|e| {
                    MgrError::Internal(format!("cannot create {}: {e}", path.display()))
                })?;
            let mut total = 0u64;
            let full = |e: std::io::Error| {
                if is_enospc(&e) {
                    MgrError::InsufficientStorage(format!(
                        "{} is full while spooling the file: {e}",
                        dir.display()
                    ))
                } else {
                    MgrError::Internal(format!("cannot write {}: {e}", path.display()))
                }
            };
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| MgrError::BadRequest(format!("reading the body: {e}")))?;
                let b = chunk.as_ref();
                total += b.len() as u64;
                if total > COPY_FILE_MAX_BYTES {
                    return Err(MgrError::TooLarge(format!(
                        "copy-file takes at most {COPY_FILE_MAX_BYTES} bytes"
                    )));
                }
                f.write_all(b).await.map_err(full)?;
            }
            f.flush().await.map_err(full)?;
            if let Some(n) = length {
                if n != total {
                    return Err(MgrError::BadRequest(format!(
                        "the body has {total} bytes, Content-Length said {n}"
                    )));
                }
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => Ok(path),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Hand the spooled file to the worker; the job reports the worker's progress.
    pub fn copy_file_start(
        self: &Arc<Self>,
        id: Uuid,
        spool: PathBuf,
        dest: String,
        create_full_path: bool,
        overwrite: bool,
    ) -> Result<JobHandle> {
        let (w, name) = match self.running_worker(id, "copy a file into") {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&spool);
                return Err(e);
            }
        };
        let job = self.jobs.create(
            "vm.copy_file",
            Some((id, name)),
            false,
            Some(format!("to {dest}")),
        );
        let token = job.id.to_string();
        if let Some(vm) = self.vms.lock().get_mut(&id) {
            vm.copy_jobs.insert(token.clone(), job.clone());
        }
        let (m, j) = (self.clone(), job.clone());
        tokio::spawn(async move {
            j.start();
            let r = w
                .call(
                    Op::CopyFile {
                        src: spool.clone(),
                        dest: dest.clone(),
                        create_full_path,
                        overwrite,
                        token: token.clone(),
                    },
                    Duration::from_secs(6 * 3600),
                )
                .await;
            let _ = std::fs::remove_file(&spool);
            if let Some(vm) = m.vms.lock().get_mut(&id) {
                vm.copy_jobs.remove(&token);
            }
            match r {
                Ok(v) => {
                    m.events.emit(
                        "vm.file_copied",
                        Some(id),
                        Some(j.id),
                        format!(
                            "{} bytes copied to {dest} in the guest",
                            match v {
                                fv_worker_proto::Reply::Copied { bytes, .. } => bytes,
                                _ => 0,
                            }
                        ),
                        None,
                    );
                    j.complete();
                }
                Err(e) => {
                    let code = match &e {
                        CallError::Worker(w) => w.code.to_string(),
                        _ => "worker_error".into(),
                    };
                    j.fail(&code, e.to_string());
                }
            }
        });
        Ok(job)
    }

    /// After a reconfigure while running: the worker adopts the new service set
    /// (and VM name for key-value exchange) at once.
    pub(super) fn push_integration(&self, id: Uuid) {
        let (w, services, name) = {
            let vms = self.vms.lock();
            let Some(vm) = vms.get(&id) else { return };
            let Some(w) = vm.worker.clone() else { return };
            (w, vm.config.integration_services, vm.config.name.clone())
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            let op = Op::SetIntegration {
                services,
                vm_name: Some(name),
            };
            if let Err(e) = w.call(op, Duration::from_secs(30)).await {
                events.emit(
                    "vm.warning",
                    Some(id),
                    None,
                    format!("the running VM did not take the new integration services: {e}"),
                    None,
                );
            }
        });
    }

    /// Integration events from the worker: recorded as fvd events, and the cached
    /// status follows so views are current without a round trip.
    pub(super) fn integration_event(&self, vm: &mut Vm, e: Event) {
        let id = vm.config.id;
        let name = vm.config.name.clone();
        match e {
            Event::HeartbeatChanged {
                status,
                last_answer,
            } => {
                if let Some((s, _)) = vm.status.as_mut() {
                    s.heartbeat.status = status;
                    s.heartbeat.last_answer = last_answer;
                }
                let (kind, msg) = match status {
                    HeartbeatStatus::Ok => ("vm.heartbeat.ok", "heartbeat OK".to_string()),
                    HeartbeatStatus::LostCommunication => (
                        "vm.heartbeat.lost",
                        format!(
                            "heartbeat lost: the guest stopped answering{}",
                            last_answer
                                .map(|t| format!(" (last answer at {})", at(t)))
                                .unwrap_or_default()
                        ),
                    ),
                    HeartbeatStatus::NoContact => {
                        ("vm.heartbeat.no_contact", "heartbeat: no contact".into())
                    }
                    HeartbeatStatus::Disabled => (
                        "vm.heartbeat.disabled",
                        "heartbeat service withdrawn".into(),
                    ),
                };
                self.events
                    .emit(kind, Some(id), None, format!("{name}: {msg}"), None);
            }
            Event::TimeSynced {
                reason,
                correction_ms,
                ..
            } => self.events.emit(
                "vm.time_synced",
                Some(id),
                None,
                format!(
                    "{name}: guest clock set from the host after {reason} (corrected by {:.1} s)",
                    correction_ms as f64 / 1000.0
                ),
                None,
            ),
            Event::Frozen {
                filesystems,
                thaw_deadline,
            } => {
                if let Some((s, _)) = vm.status.as_mut() {
                    s.freeze = FreezeStatus {
                        frozen: true,
                        filesystems,
                        thaw_deadline: Some(thaw_deadline),
                    };
                }
                self.events.emit(
                    "vm.frozen",
                    Some(id),
                    None,
                    format!(
                        "{name}: {filesystems} guest filesystem(s) frozen until {} at the latest",
                        at(thaw_deadline)
                    ),
                    None,
                );
            }
            Event::Thawed {
                filesystems,
                reason,
            } => {
                if let Some((s, _)) = vm.status.as_mut() {
                    s.freeze = FreezeStatus::default();
                }
                self.events.emit(
                    "vm.thawed",
                    Some(id),
                    None,
                    format!("{name}: {filesystems} guest filesystem(s) thawed ({reason})"),
                    None,
                );
            }
            Event::CopyProgress { token, percent } => {
                if let Some(j) = vm.copy_jobs.get(&token) {
                    j.progress(percent);
                }
            }
            _ => {}
        }
    }
}
