//! The REST API: routes, the operation table, errors and the OpenAPI document.
use crate::manager::{Manager, MgrError};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use fv_model::api::*;
use fv_model::VmState;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

// Integration-service handlers (freeze/thaw, copy-file).
#[path = "api_integration.rs"]
mod integration_api;

/// One API operation. `name` is stable (errors, events, the authorization table);
/// `authorization` is the Hyper-V operation it falls under.
#[derive(Debug, Clone, Copy)]
pub struct Operation {
    pub name: &'static str,
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub authorization: &'static str,
    pub request: Option<&'static str>,
    pub response: Resp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resp {
    Json(&'static str),
    JsonList(&'static str),
    /// 202 Accepted with the job and `Location: /jobs/{id}`.
    Job,
    NoContent,
    Sse,
    /// 101 Switching Protocols to a raw byte stream.
    Upgrade,
    Any,
}

macro_rules! op {
    ($name:literal, $m:literal, $p:literal, $auth:literal, $req:expr, $resp:expr, $sum:literal) => {
        Operation {
            name: $name,
            method: $m,
            path: $p,
            summary: $sum,
            authorization: $auth,
            request: $req,
            response: $resp,
        }
    };
}

/// Every handler, in one table.
pub const OPERATIONS: &[Operation] = &[
    op!(
        "host.view",
        "get",
        "/host",
        "read_service_configuration",
        None,
        Resp::Json("HostView"),
        "Host facts, capacity and settings"
    ),
    op!(
        "host.reconfigure",
        "patch",
        "/host",
        "reconfigure_service",
        Some("HostSettingsPatch"),
        Resp::Json("HostSettings"),
        "Change host settings"
    ),
    op!(
        "host.shutdown",
        "post",
        "/host/actions/shutdown",
        "reconfigure_service",
        None,
        Resp::Job,
        "Apply every running VM's automatic stop action, then stop fvd"
    ),
    op!(
        "vm.list",
        "get",
        "/vms",
        "view_vm_configuration",
        None,
        Resp::JsonList("VmView"),
        "List VMs"
    ),
    op!(
        "vm.create",
        "post",
        "/vms",
        "create_vm",
        Some("NewVmRequest"),
        Resp::Json("VmView"),
        "Create (register) a VM; ?scope=NAME places it in that scope (and is authorized there)"
    ),
    op!(
        "vm.view",
        "get",
        "/vms/{id}",
        "view_vm_configuration",
        None,
        Resp::Json("VmView"),
        "Show a VM (by id or name)"
    ),
    op!(
        "vm.reconfigure",
        "patch",
        "/vms/{id}",
        "reconfigure_vm",
        Some("VmConfigPatch"),
        Resp::Json("VmView"),
        "Merge a partial configuration (hardware changes need the VM Off)"
    ),
    op!(
        "vm.delete",
        "delete",
        "/vms/{id}",
        "delete_vm",
        None,
        Resp::NoContent,
        "Remove (unregister) a VM that is Off or Saved; ?delete_files=true also deletes its files"
    ),
    op!(
        "vm.start",
        "post",
        "/vms/{id}/actions/start",
        "start_vm",
        None,
        Resp::Job,
        "Start (cold boot, or restore from saved state)"
    ),
    op!(
        "vm.stop",
        "post",
        "/vms/{id}/actions/stop",
        "stop_vm",
        Some("StopRequest"),
        Resp::Job,
        "Shut down, turn off or save"
    ),
    op!(
        "vm.pause",
        "post",
        "/vms/{id}/actions/pause",
        "pause_and_restart_vm",
        None,
        Resp::Job,
        "Pause"
    ),
    op!(
        "vm.resume",
        "post",
        "/vms/{id}/actions/resume",
        "pause_and_restart_vm",
        None,
        Resp::Job,
        "Resume"
    ),
    op!(
        "vm.reset",
        "post",
        "/vms/{id}/actions/reset",
        "pause_and_restart_vm",
        None,
        Resp::Job,
        "Reset"
    ),
    op!(
        "vm.save",
        "post",
        "/vms/{id}/actions/save",
        "stop_vm",
        None,
        Resp::Job,
        "Save memory and device state"
    ),
    op!(
        "vm.console.output",
        "get",
        "/vms/{id}/console",
        "allow_output_from_vm",
        None,
        Resp::Upgrade,
        "Watch a COM port (?port=1|2): HTTP upgrade to `fv-console`, then the raw bytes the guest writes"
    ),
    op!(
        "vm.console.input",
        "post",
        "/vms/{id}/console",
        "allow_input_to_vm",
        None,
        Resp::Upgrade,
        "Use a COM port interactively (?port=1|2): HTTP upgrade to `fv-console`, then raw bytes both ways"
    ),
    op!(
        "vm.discard_saved_state",
        "post",
        "/vms/{id}/actions/discard-saved-state",
        "stop_vm",
        None,
        Resp::Json("VmView"),
        "Discard saved state (next start boots cold)"
    ),
    op!(
        "vm.disk.list",
        "get",
        "/vms/{id}/disks",
        "view_vm_configuration",
        None,
        Resp::JsonList("HardDrive"),
        "List hard drives"
    ),
    op!(
        "vm.disk.add",
        "post",
        "/vms/{id}/disks",
        "reconfigure_vm",
        Some("DiskRequest"),
        Resp::Json("VmView"),
        "Attach a hard drive (VM Off)"
    ),
    op!(
        "vm.disk.remove",
        "delete",
        "/vms/{id}/disks/{disk}",
        "reconfigure_vm",
        None,
        Resp::Json("VmView"),
        "Detach a hard drive by index (VM Off)"
    ),
    op!(
        "vm.dvd.set",
        "put",
        "/vms/{id}/dvd",
        "reconfigure_vm",
        Some("DvdRequest"),
        Resp::Json("VmView"),
        "Insert or eject DVD media (also while running)"
    ),
    op!(
        "vm.nic.list",
        "get",
        "/vms/{id}/nics",
        "view_vm_configuration",
        None,
        Resp::JsonList("NetworkAdapter"),
        "List network adapters"
    ),
    op!(
        "vm.nic.add",
        "post",
        "/vms/{id}/nics",
        "reconfigure_vm",
        Some("NicRequest"),
        Resp::Json("VmView"),
        "Add a network adapter (VM Off)"
    ),
    op!(
        "vm.nic.set",
        "patch",
        "/vms/{id}/nics/{nic}",
        "reconfigure_vm",
        Some("NicPatch"),
        Resp::Json("VmView"),
        "Change a network adapter (VM Off)"
    ),
    op!(
        "vm.nic.remove",
        "delete",
        "/vms/{id}/nics/{nic}",
        "reconfigure_vm",
        None,
        Resp::Json("VmView"),
        "Remove a network adapter (VM Off); its dynamic MAC returns to the pool"
    ),
    // Integration services (api_integration.rs).
    op!(
        "vm.freeze",
        "post",
        "/vms/{id}/actions/freeze",
        "backup_vm",
        Some("FreezeRequest"),
        Resp::Json("FreezeStatus"),
        "Freeze the guest's filesystems (backup integration service); thawed at the latest after timeout_s"
    ),
    op!(
        "vm.thaw",
        "post",
        "/vms/{id}/actions/thaw",
        "backup_vm",
        None,
        Resp::Json("FreezeStatus"),
        "Thaw the guest's filesystems"
    ),
    op!(
        "vm.freeze_status",
        "get",
        "/vms/{id}/freeze",
        "view_vm_configuration",
        None,
        Resp::Json("FreezeStatus"),
        "Whether the guest's filesystems are frozen"
    ),
    op!(
        "vm.copy_file",
        "post",
        "/vms/{id}/actions/copy-file",
        "copy_file_to_vm",
        Some("OctetStream"),
        Resp::Job,
        "Copy the body (application/octet-stream) to ?dest=PATH in the guest (&create_full_path=true, &overwrite=true); needs guest services"
    ),
    op!(
        "job.list",
        "get",
        "/jobs",
        "view_vm_configuration",
        None,
        Resp::JsonList("JobView"),
        "Recent jobs (?limit=N)"
    ),
    op!(
        "job.view",
        "get",
        "/jobs/{job}",
        "view_vm_configuration",
        None,
        Resp::Json("JobView"),
        "A job; ?wait=SECONDS long-polls until it ends"
    ),
    op!(
        "job.cancel",
        "post",
        "/jobs/{job}/cancel",
        "stop_vm",
        None,
        Resp::Json("JobView"),
        "Cancel a cancellable job"
    ),
    op!(
        "event.list",
        "get",
        "/events",
        "view_vm_configuration",
        None,
        Resp::JsonList("EventView"),
        "Events after ?since=SEQ (optionally ?vm=ID, ?limit=N)"
    ),
    op!(
        "event.stream",
        "get",
        "/events/stream",
        "view_vm_configuration",
        None,
        Resp::Sse,
        "Events as server-sent events (?since=SEQ replays first)"
    ),
    op!(
        "api.describe",
        "get",
        "/openapi.json",
        "view_vm_configuration",
        None,
        Resp::Any,
        "This OpenAPI document"
    ),
    // Authorization (crate::auth): roles, scopes, assignments, tokens, audit.
    op!(
        "auth.role.list",
        "get",
        "/auth/roles",
        "read_service_configuration",
        None,
        Resp::JsonList("RoleView"),
        "Roles (built-in and custom) with their operations"
    ),
    op!(
        "auth.role.view",
        "get",
        "/auth/roles/{role}",
        "read_service_configuration",
        None,
        Resp::Json("RoleView"),
        "One role"
    ),
    op!(
        "auth.role.create",
        "post",
        "/auth/roles",
        "reconfigure_service",
        Some("NewRoleRequest"),
        Resp::Json("RoleView"),
        "Create a custom role (a set of operations)"
    ),
    op!(
        "auth.role.delete",
        "delete",
        "/auth/roles/{role}",
        "reconfigure_service",
        None,
        Resp::NoContent,
        "Delete a custom role and its assignments"
    ),
    op!(
        "auth.scope.list",
        "get",
        "/auth/scopes",
        "read_service_configuration",
        None,
        Resp::JsonList("ScopeView"),
        "Authorization scopes and the VMs placed in them"
    ),
    op!(
        "auth.scope.create",
        "post",
        "/auth/scopes",
        "reconfigure_service",
        Some("NewScopeRequest"),
        Resp::Json("ScopeView"),
        "Create a scope"
    ),
    op!(
        "auth.scope.delete",
        "delete",
        "/auth/scopes/{scope}",
        "reconfigure_service",
        None,
        Resp::NoContent,
        "Delete an empty scope and its assignments"
    ),
    op!(
        "auth.scope.set",
        "put",
        "/vms/{id}/scope",
        "change_vm_authorization_scope",
        Some("SetScopeRequest"),
        Resp::Json("VmScope"),
        "Move a VM to a scope (needs the operation in both scopes)"
    ),
    op!(
        "auth.assignment.list",
        "get",
        "/auth/assignments",
        "read_service_configuration",
        None,
        Resp::JsonList("AssignmentView"),
        "Role assignments"
    ),
    op!(
        "auth.assignment.create",
        "post",
        "/auth/assignments",
        "reconfigure_service",
        Some("NewAssignmentRequest"),
        Resp::Json("AssignmentView"),
        "Assign a role to a principal in a scope (* = everywhere)"
    ),
    op!(
        "auth.assignment.delete",
        "delete",
        "/auth/assignments",
        "reconfigure_service",
        None,
        Resp::NoContent,
        "Remove an assignment (?principal=&role=&scope=)"
    ),
    op!(
        "auth.token.list",
        "get",
        "/auth/tokens",
        "reconfigure_service",
        None,
        Resp::JsonList("TokenView"),
        "API tokens (metadata only; administrators only)"
    ),
    op!(
        "auth.token.create",
        "post",
        "/auth/tokens",
        "reconfigure_service",
        Some("NewTokenRequest"),
        Resp::Json("NewTokenResponse"),
        "Create an API token; the secret is in this answer only"
    ),
    op!(
        "auth.token.revoke",
        "post",
        "/auth/tokens/{token}/revoke",
        "reconfigure_service",
        None,
        Resp::Json("TokenView"),
        "Revoke an API token (effective at once)"
    ),
    op!(
        "auth.settings.view",
        "get",
        "/auth/settings",
        "read_service_configuration",
        None,
        Resp::Json("AuthSettings"),
        "Authorization settings"
    ),
    op!(
        "auth.settings.set",
        "patch",
        "/auth/settings",
        "reconfigure_service",
        Some("AuthSettingsPatch"),
        Resp::Json("AuthSettings"),
        "Change authorization settings (root_is_admin)"
    ),
    op!(
        "audit.view",
        "get",
        "/audit",
        "read_service_configuration",
        None,
        Resp::JsonList("AuditEntry"),
        "Audit log of mutating calls and refusals (?since=SEQ, ?limit=N: the newest N)"
    ),
];

pub struct ApiError {
    status: StatusCode,
    body: ApiErrorBody,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub(crate) fn err(op: &'static str) -> impl Fn(MgrError) -> ApiError {
    move |e| {
        let status = match &e {
            MgrError::NotFound(_) => StatusCode::NOT_FOUND,
            MgrError::InvalidState { .. }
            | MgrError::Conflict(_)
            | MgrError::Admission(_)
            | MgrError::MacPoolExhausted(_) => StatusCode::CONFLICT,
            MgrError::BadRequest(_) => StatusCode::BAD_REQUEST,
            MgrError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            MgrError::GuestAgentUnavailable(_) | MgrError::ServiceDisabled(_) => {
                StatusCode::CONFLICT
            }
            MgrError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            MgrError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
        let state = match &e {
            MgrError::InvalidState { state, .. } => Some(*state),
            _ => None,
        };
        ApiError {
            status,
            body: ApiErrorBody {
                code: e.code().into(),
                message: e.to_string(),
                operation: op.into(),
                state,
            },
        }
    }
}

fn bad(op: &'static str, msg: String) -> ApiError {
    err(op)(MgrError::BadRequest(msg))
}

type S = State<Arc<Manager>>;
type R = Result<Response, ApiError>;

fn job_response(j: &crate::jobs::JobHandle) -> Response {
    let view = j.view();
    let mut r = (StatusCode::ACCEPTED, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/jobs/{}", j.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Parse a JSON body ourselves so malformed bodies get our error shape.
fn body<T: serde::de::DeserializeOwned>(
    op: &'static str,
    b: &axum::body::Bytes,
    default_empty: bool,
) -> Result<T, ApiError> {
    if b.is_empty() && default_empty {
        return serde_json::from_str("{}").map_err(|e| bad(op, format!("request body: {e}")));
    }
    serde_json::from_slice(b).map_err(|e| bad(op, format!("request body: {e}")))
}

async fn host_view(State(m): S) -> R {
    Ok(Json(m.host_view()).into_response())
}

async fn host_set(State(m): S, b: axum::body::Bytes) -> R {
    const OP: &str = "host.reconfigure";
    let p: HostSettingsPatch = body(OP, &b, false)?;
    Ok(Json(m.update_settings(p).map_err(err(OP))?).into_response())
}

async fn host_shutdown(State(m): S) -> R {
    Ok(job_response(
        &m.host_shutdown().map_err(err("host.shutdown"))?,
    ))
}

async fn vm_list(State(m): S, caller: crate::auth::Caller) -> R {
    let mut v = m.list();
    v.retain(|vm| caller.may(Some(vm.id)));
    Ok(Json(v).into_response())
}

async fn vm_create(State(m): S, b: axum::body::Bytes) -> R {
    const OP: &str = "vm.create";
    let req: NewVmRequest = body(OP, &b, false)?;
    let v = m.create(req).map_err(err(OP))?;
    let mut r = (StatusCode::CREATED, Json(&v)).into_response();
    if let Ok(h) = HeaderValue::from_str(&format!("/vms/{}", v.id)) {
        r.headers_mut().insert(header::LOCATION, h);
    }
    Ok(r)
}

async fn vm_view(State(m): S, Path(id): Path<String>) -> R {
    const OP: &str = "vm.view";
    let id = m.resolve(&id).map_err(err(OP))?;
    Ok(Json(m.view(id).await.map_err(err(OP))?).into_response())
}

async fn vm_patch(State(m): S, Path(id): Path<String>, b: axum::body::Bytes) -> R {
    const OP: &str = "vm.reconfigure";
    let id = m.resolve(&id).map_err(err(OP))?;
    let p: serde_json::Map<String, serde_json::Value> = body(OP, &b, false)?;
    Ok(Json(m.reconfigure(id, p).map_err(err(OP))?).into_response())
}

#[derive(Deserialize)]
struct DeleteQ {
    #[serde(default)]
    delete_files: bool,
}

async fn vm_delete(State(m): S, Path(id): Path<String>, Query(q): Query<DeleteQ>) -> R {
    const OP: &str = "vm.delete";
    let id = m.resolve(&id).map_err(err(OP))?;
    m.remove(id, q.delete_files).map_err(err(OP))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn vm_start(State(m): S, Path(id): Path<String>) -> R {
    const OP: &str = "vm.start";
    let id = m.resolve(&id).map_err(err(OP))?;
    Ok(job_response(&m.start(id, None).map_err(err(OP))?))
}

async fn vm_stop(State(m): S, Path(id): Path<String>, b: axum::body::Bytes) -> R {
    const OP: &str = "vm.stop";
    let id = m.resolve(&id).map_err(err(OP))?;
    let req: StopRequest = body(OP, &b, true)?;
    Ok(job_response(&m.stop(id, req).map_err(err(OP))?))
}

async fn simple(m: Arc<Manager>, id: String, action: &str, op: &'static str) -> R {
    let id = m.resolve(&id).map_err(err(op))?;
    Ok(job_response(&m.simple_action(id, action).map_err(err(op))?))
}

async fn vm_pause(State(m): S, Path(id): Path<String>) -> R {
    simple(m, id, "pause", "vm.pause").await
}
async fn vm_resume(State(m): S, Path(id): Path<String>) -> R {
    simple(m, id, "resume", "vm.resume").await
}
async fn vm_reset(State(m): S, Path(id): Path<String>) -> R {
    simple(m, id, "reset", "vm.reset").await
}

async fn vm_save(State(m): S, Path(id): Path<String>) -> R {
    const OP: &str = "vm.save";
    let id = m.resolve(&id).map_err(err(OP))?;
    Ok(job_response(&m.save(id, None).map_err(err(OP))?))
}

#[derive(Deserialize)]
struct ConsoleQ {
    port: Option<usize>,
}

async fn console_output(
    State(m): S,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQ>,
    req: axum::extract::Request,
) -> R {
    const OP: &str = "vm.console.output";
    let id = m.resolve(&id).map_err(err(OP))?;
    crate::console::open(m, id, q.port.unwrap_or(1), false, req, OP).await
}

async fn console_input(
    State(m): S,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQ>,
    req: axum::extract::Request,
) -> R {
    const OP: &str = "vm.console.input";
    let id = m.resolve(&id).map_err(err(OP))?;
    crate::console::open(m, id, q.port.unwrap_or(1), true, req, OP).await
}

async fn vm_discard(State(m): S, Path(id): Path<String>) -> R {
    const OP: &str = "vm.discard_saved_state";
    let id = m.resolve(&id).map_err(err(OP))?;
    Ok(Json(m.discard_saved_state(id).map_err(err(OP))?).into_response())
}

async fn disk_list(State(m): S, Path(id): Path<String>) -> R {
    const OP: &str = "vm.disk.list";
    let id = m.resolve(&id).map_err(err(OP))?;
    Ok(Json(m.config_of(id).map_err(err(OP))?.0.hard_drives).into_response())
}

async fn disk_add(State(m): S, Path(id): Path<String>, b: axum::body::Bytes) -> R {
    const OP: &str = "vm.disk.add";
    let id = m.resolve(&id).map_err(err(OP))?;
    let req: DiskRequest = body(OP, &b, false)?;
    Ok(Json(m.add_disk(id, req).map_err(err(OP))?).into_response())
}

async fn disk_remove(State(m): S, Path((id, disk)): Path<(String, String)>) -> R {
    const OP: &str = "vm.disk.remove";
    let id = m.resolve(&id).map_err(err(OP))?;
    Ok(Json(m.remove_disk(id, &disk).map_err(err(OP))?).into_response())
}

async fn dvd_set(State(m): S, Path(id): Path<String>, b: axum::body::Bytes) -> R {
    const OP: &str = "vm.dvd.set";
    let id = m.resolve(&id).map_err(err(OP))?;
    let req: DvdRequest = body(OP, &b, false)?;
    Ok(Json(m.set_dvd(id, req).await.map_err(err(OP))?).into_response())
}

async fn nic_list(State(m): S, Path(id): Path<String>) -> R {
    const OP: &str = "vm.nic.list";
    let id = m.resolve(&id).map_err(err(OP))?;
    Ok(Json(m.config_of(id).map_err(err(OP))?.0.network_adapters).into_response())
}

async fn nic_add(State(m): S, Path(id): Path<String>, b: axum::body::Bytes) -> R {
    const OP: &str = "vm.nic.add";
    let id = m.resolve(&id).map_err(err(OP))?;
    let req: NicRequest = body(OP, &b, true)?;
    Ok(Json(m.add_nic(id, req).map_err(err(OP))?).into_response())
}

async fn nic_set(State(m): S, Path((id, nic)): Path<(String, String)>, b: axum::body::Bytes) -> R {
    const OP: &str = "vm.nic.set";
    let id = m.resolve(&id).map_err(err(OP))?;
    let req: NicPatch = body(OP, &b, false)?;
    Ok(Json(m.set_nic(id, &nic, req).map_err(err(OP))?).into_response())
}

async fn nic_remove(State(m): S, Path((id, nic)): Path<(String, String)>) -> R {
    const OP: &str = "vm.nic.remove";
    let id = m.resolve(&id).map_err(err(OP))?;
    Ok(Json(m.remove_nic(id, &nic).map_err(err(OP))?).into_response())
}

#[derive(Deserialize)]
struct LimitQ {
    limit: Option<u32>,
}

async fn job_list(State(m): S, caller: crate::auth::Caller, Query(q): Query<LimitQ>) -> R {
    // Filter first, then cut to the limit, so a scoped caller still gets `limit` rows
    // of its own (the job table keeps a bounded history).
    let limit = q.limit.unwrap_or(100) as usize;
    let mut v = m.jobs.list(10_000);
    v.retain(|j| caller.may(j.vm_id));
    v.truncate(limit);
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct WaitQ {
    wait: Option<f64>,
}

fn job_id(op: &'static str, s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| err(op)(MgrError::NotFound(format!("no job {s:?}"))))
}

async fn job_view(State(m): S, Path(id): Path<String>, Query(q): Query<WaitQ>) -> R {
    const OP: &str = "job.view";
    let id = job_id(OP, &id)?;
    let v = match q.wait {
        Some(w) if w > 0.0 => m.jobs.wait(id, Duration::from_secs_f64(w.min(600.0))).await,
        _ => m.jobs.get(id),
    };
    let v = v.ok_or_else(|| err(OP)(MgrError::NotFound(format!("no job {id}"))))?;
    Ok(Json(v).into_response())
}

async fn job_cancel(State(m): S, Path(id): Path<String>) -> R {
    const OP: &str = "job.cancel";
    let id = job_id(OP, &id)?;
    if m.jobs.get(id).is_none() {
        return Err(err(OP)(MgrError::NotFound(format!("no job {id}"))));
    }
    m.jobs
        .cancel(id)
        .map_err(|e| err(OP)(MgrError::Conflict(e)))?;
    let v = m.jobs.wait(id, Duration::from_secs(10)).await;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct EventsQ {
    since: Option<i64>,
    vm: Option<String>,
    limit: Option<u32>,
}

async fn event_list(State(m): S, caller: crate::auth::Caller, Query(q): Query<EventsQ>) -> R {
    const OP: &str = "event.list";
    let vm = match &q.vm {
        Some(v) => Some(
            m.resolve(v)
                .or_else(|e| Uuid::parse_str(v).map_err(|_| e))
                .map_err(err(OP))?,
        ),
        None => None,
    };
    let mut ev =
        m.db.events(q.since.unwrap_or(0), vm, q.limit.unwrap_or(1000))
            .map_err(|e| err(OP)(MgrError::Internal(e.to_string())))?;
    ev.retain(|e| caller.may(e.vm_id));
    Ok(Json(ev).into_response())
}

async fn event_stream(State(m): S, caller: crate::auth::Caller, Query(q): Query<EventsQ>) -> R {
    const OP: &str = "event.stream";
    // Subscribe before replaying so nothing falls between the two.
    let rx = m.events.subscribe();
    let replay = match q.since {
        Some(s) => {
            m.db.events(s, None, 10_000)
                .map_err(|e| err(OP)(MgrError::Internal(e.to_string())))?
        }
        None => vec![],
    };
    let last = replay.last().map(|e| e.seq).unwrap_or(q.since.unwrap_or(0));
    let to_sse = |e: &EventView| {
        SseEvent::default()
            .id(e.seq.to_string())
            .event(e.kind.clone())
            .json_data(e)
    };
    let replay: Vec<EventView> = replay.into_iter().filter(|e| caller.may(e.vm_id)).collect();
    let head = futures_util::stream::iter(replay.into_iter().map(move |e| to_sse(&e)));
    let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |r| {
        let out = match r {
            Ok(e) if e.seq > last && caller.may(e.vm_id) => Some(to_sse(&e)),
            _ => None,
        };
        async move { out }
    });
    Ok(Sse::new(head.chain(live))
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn openapi() -> R {
    Ok(Json(openapi_document()).into_response())
}

async fn fallback(uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        body: ApiErrorBody {
            code: "not_found".into(),
            message: format!("no such endpoint: {}", uri.path()),
            operation: "api.route".into(),
            state: None,
        },
    }
}

/// The whole API; every route is behind the authorization layer (crate::auth).
pub fn router(m: Arc<Manager>, auth: Arc<crate::auth::Auth>) -> Router {
    let ctx = crate::auth::Ctx { m: m.clone(), auth };
    let app = Router::new()
        .route("/host", get(host_view).patch(host_set))
        .route("/host/actions/shutdown", post(host_shutdown))
        .route("/vms", get(vm_list).post(vm_create))
        .route("/vms/{id}", get(vm_view).patch(vm_patch).delete(vm_delete))
        .route("/vms/{id}/actions/start", post(vm_start))
        .route("/vms/{id}/actions/stop", post(vm_stop))
        .route("/vms/{id}/actions/pause", post(vm_pause))
        .route("/vms/{id}/actions/resume", post(vm_resume))
        .route("/vms/{id}/actions/reset", post(vm_reset))
        .route("/vms/{id}/actions/save", post(vm_save))
        .route("/vms/{id}/actions/discard-saved-state", post(vm_discard))
        .route("/vms/{id}/console", get(console_output).post(console_input))
        .route("/vms/{id}/actions/freeze", post(integration_api::vm_freeze))
        .route("/vms/{id}/actions/thaw", post(integration_api::vm_thaw))
        .route("/vms/{id}/freeze", get(integration_api::vm_freeze_status))
        .route(
            "/vms/{id}/actions/copy-file",
            post(integration_api::vm_copy_file),
        )
        .route("/vms/{id}/disks", get(disk_list).post(disk_add))
        .route("/vms/{id}/disks/{disk}", axum::routing::delete(disk_remove))
        .route("/vms/{id}/dvd", axum::routing::put(dvd_set))
        .route("/vms/{id}/nics", get(nic_list).post(nic_add))
        .route(
            "/vms/{id}/nics/{nic}",
            axum::routing::patch(nic_set).delete(nic_remove),
        )
        .route("/jobs", get(job_list))
        .route("/jobs/{job}", get(job_view))
        .route("/jobs/{job}/cancel", post(job_cancel))
        .route("/events", get(event_list))
        .route("/events/stream", get(event_stream))
        .route("/openapi.json", get(openapi))
        .fallback(fallback)
        .with_state(m);
    crate::auth::protect(app, ctx)
}

/// The OpenAPI 3.0 document: paths from [`OPERATIONS`], schemas from the model types.
pub fn openapi_document() -> serde_json::Value {
    use schemars::gen::SchemaSettings;
    use serde_json::{json, Map, Value};
    let mut gen = SchemaSettings::openapi3().into_generator();
    let add = |name: &str, s: schemars::schema::Schema| {
        (
            name.to_string(),
            serde_json::to_value(s).unwrap_or(Value::Null),
        )
    };
    let mut schemas: Vec<(String, Value)> = vec![
        add("HostView", gen.subschema_for::<HostView>()),
        add("HostSettings", gen.subschema_for::<HostSettings>()),
        add(
            "HostSettingsPatch",
            gen.subschema_for::<HostSettingsPatch>(),
        ),
        add("VmView", gen.subschema_for::<VmView>()),
        add("NewVmRequest", gen.subschema_for::<NewVmRequest>()),
        add("StopRequest", gen.subschema_for::<StopRequest>()),
        add("DiskRequest", gen.subschema_for::<DiskRequest>()),
        add("DvdRequest", gen.subschema_for::<DvdRequest>()),
        add("NicRequest", gen.subschema_for::<NicRequest>()),
        add("NicPatch", gen.subschema_for::<NicPatch>()),
        add("JobView", gen.subschema_for::<JobView>()),
        add("EventView", gen.subschema_for::<EventView>()),
        add("ApiErrorBody", gen.subschema_for::<ApiErrorBody>()),
        add("HardDrive", gen.subschema_for::<fv_model::HardDrive>()),
        add(
            "NetworkAdapter",
            gen.subschema_for::<fv_model::NetworkAdapter>(),
        ),
        add("VmState", gen.subschema_for::<VmState>()),
        add("FreezeRequest", gen.subschema_for::<FreezeRequest>()),
        add("FreezeStatus", gen.subschema_for::<FreezeStatus>()),
    ];
    schemas.extend(crate::auth::openapi_schemas(&mut gen));
    let mut components = Map::new();
    for (k, v) in gen.take_definitions() {
        components.insert(k, serde_json::to_value(v).unwrap_or(Value::Null));
    }
    // Names we refer to that are plain $refs already live in the definitions.
    schemas.retain(|(k, v)| !(v.get("$ref").is_some() && components.contains_key(k)));
    for (k, v) in schemas {
        components.insert(k, v);
    }
    components.insert(
        "VmConfigPatch".into(),
        json!({"type": "object", "description": "Any subset of VmConfig's fields; merged onto the current configuration. Changing anything but name, notes and the automatic actions needs the VM Off.", "additionalProperties": true}),
    );
    let sref = |n: &str| json!({"$ref": format!("#/components/schemas/{n}")});
    let error = json!({"description": "Error", "content": {"application/json": {"schema": sref("ApiErrorBody")}}});
    let mut paths = Map::new();
    for o in OPERATIONS {
        let mut params = Vec::new();
        for seg in o.path.split('/') {
            if let Some(p) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                params.push(json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}));
            }
        }
        let mut responses = Map::new();
        let ok = match o.response {
            Resp::Json(n) => (
                "200",
                json!({"description": "OK", "content": {"application/json": {"schema": sref(n)}}}),
            ),
            Resp::JsonList(n) => (
                "200",
                json!({"description": "OK", "content": {"application/json": {"schema": {"type": "array", "items": sref(n)}}}}),
            ),
            Resp::Job => (
                "202",
                json!({"description": "Accepted: the job (also in the Location header)", "content": {"application/json": {"schema": sref("JobView")}}}),
            ),
            Resp::NoContent => ("204", json!({"description": "Done"})),
            Resp::Sse => (
                "200",
                json!({"description": "Server-sent events, each an EventView", "content": {"text/event-stream": {"schema": sref("EventView")}}}),
            ),
            Resp::Upgrade => (
                "101",
                json!({"description": "Switching Protocols (Upgrade: fv-console); the connection then carries raw console bytes"}),
            ),
            Resp::Any => (
                "200",
                json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}),
            ),
        };
        let created =
            o.name == "vm.create" || o.name.starts_with("auth.") && o.name.ends_with(".create");
        let ok_code = if created { "201" } else { ok.0 };
        responses.insert(ok_code.into(), ok.1);
        responses.insert("default".into(), error.clone());
        let mut op = json!({
            "operationId": o.name,
            "summary": o.summary,
            "x-authorization-operation": o.authorization,
            "parameters": params,
            "responses": responses,
        });
        if let Some(r) = o.request {
            op["requestBody"] = json!({"required": o.name != "vm.stop", "content": {"application/json": {"schema": sref(r)}}});
            if r == "OctetStream" {
                op["requestBody"] = json!({"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
            }
        }
        let entry = paths.entry(o.path.to_string()).or_insert_with(|| json!({}));
        entry[o.method] = op;
    }
    canonical(json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Ferrovisor fvd API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The host service's REST API, on the Unix socket <runtime>/fvd.sock (and over TLS with `fvd --listen-tcp`). Long operations answer 202 with a job; errors are {code, message, operation}. Every operation is authorized by its operationId against the caller's roles in the target's scope: callers are local users by their socket peer credentials, or API tokens (`Authorization: Bearer <id>.<secret>`, required over TLS). 401 `unauthenticated` names the reason; 403 `forbidden` names the missing operation. List operations return only what the caller may view."
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer", "description": "An API token `<id>.<secret>` from POST /auth/tokens"}},
        },
        "security": [{}, {"token": []}],
    }))
}

/// Keys in sorted order whatever map type serde_json was built with, so the
/// committed document compares byte for byte.
fn canonical(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut items: Vec<(String, Value)> = m.into_iter().collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(items.into_iter().map(|(k, v)| (k, canonical(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(canonical).collect()),
        other => other,
    }
}
