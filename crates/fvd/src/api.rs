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
        "Jobs, newest first: the newest ?limit=N (default 100) the caller may see, created after ?since=RFC3339"
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
        "Events, newest first: after ?since=SEQ and before ?before=SEQ (optionally ?vm=ID), the newest ?limit=N (default 1000) the caller may see"
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
            MgrError::Forbidden(_) => StatusCode::FORBIDDEN,
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

/// Parse a JSON body ourselves so malformed bodies get our error shape: type errors
/// name the field and what was expected, unknown members are refused by name.
pub(crate) fn body<T: serde::de::DeserializeOwned + serde::Serialize>(
    op: &'static str,
    b: &axum::body::Bytes,
    default_empty: bool,
) -> Result<T, ApiError> {
    let v = json_value(op, b, default_empty)?;
    crate::util::from_value_strict(v).map_err(|e| bad(op, format!("request body: {e}")))
}

fn json_value(
    op: &'static str,
    b: &axum::body::Bytes,
    default_empty: bool,
) -> Result<serde_json::Value, ApiError> {
    if b.is_empty() {
        if default_empty {
            return Ok(serde_json::Value::Object(Default::default()));
        }
        return Err(bad(
            op,
            "request body: empty; a JSON object is expected".into(),
        ));
    }
    serde_json::from_slice(b).map_err(|e| bad(op, format!("request body is not valid JSON: {e}")))
}

/// The operation a request was routed to (for errors raised before its handler).
fn op_of(parts: &axum::http::request::Parts) -> &'static str {
    let mp = parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str());
    let method = parts.method.as_str().to_ascii_lowercase();
    OPERATIONS
        .iter()
        .find(|o| Some(o.path) == mp && o.method == method)
        .map(|o| o.name)
        .unwrap_or("api.route")
}

/// The VM a `{id}` route is about, as the authorization layer resolved it for this
/// caller (by id, or by a name unique among the VMs the caller may see).
pub struct VmId(pub Uuid);

impl<St: Send + Sync> axum::extract::FromRequestParts<St> for VmId {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &St,
    ) -> Result<Self, ApiError> {
        match parts.extensions.get::<crate::auth::ResolvedVm>() {
            Some(r) => Ok(VmId(r.0)),
            // Only reachable if a route escaped the authorization layer.
            None => Err(err(op_of(parts))(MgrError::NotFound("no VM given".into()))),
        }
    }
}

/// `Query` with our error shape (the field that failed and why).
pub struct Q<T>(pub T);

impl<St: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<St> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &St,
    ) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, st).await {
            Ok(Query(q)) => Ok(Q(q)),
            Err(e) => Err(bad(op_of(parts), format!("query: {}", e.body_text()))),
        }
    }
}

/// `Path` with our error shape.
pub struct P<T>(pub T);

impl<St: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<St>
    for P<T>
{
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &St,
    ) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, st).await {
            Ok(Path(p)) => Ok(P(p)),
            Err(e) => Err(bad(op_of(parts), format!("path: {}", e.body_text()))),
        }
    }
}

/// The raw body, with our error shape when it cannot be read (too large: 413).
pub struct ReqBody(pub axum::body::Bytes);

impl<St: Send + Sync> axum::extract::FromRequest<St> for ReqBody {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, st: &St) -> Result<Self, ApiError> {
        let (parts, b) = req.into_parts();
        let op = op_of(&parts);
        let req = axum::extract::Request::from_parts(parts, b);
        match axum::body::Bytes::from_request(req, st).await {
            Ok(b) => Ok(ReqBody(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(err(op)(
                MgrError::TooLarge(format!("request body: {}", e.body_text())),
            )),
            Err(e) => Err(bad(op, format!("request body: {}", e.body_text()))),
        }
    }
}

async fn host_view(State(m): S) -> R {
    Ok(Json(m.host_view()).into_response())
}

/// A JSON merge patch of the host settings: applied to the current settings, the
/// result must be a complete, valid `HostSettings` (removing a setting that has no
/// default is refused); what changed goes through the manager's checks.
async fn host_set(State(m): S, ReqBody(b): ReqBody) -> R {
    const OP: &str = "host.reconfigure";
    let patch = json_value(OP, &b, false)?;
    if !patch.is_object() {
        return Err(bad(
            OP,
            "request body: a JSON object (merge patch) is expected".into(),
        ));
    }
    let cur = m.settings();
    let mut v =
        serde_json::to_value(&cur).map_err(|e| err(OP)(MgrError::Internal(e.to_string())))?;
    crate::util::merge_patch(&mut v, &patch);
    let new: HostSettings =
        crate::util::from_value_strict(v).map_err(|e| bad(OP, format!("request body: {e}")))?;
    // Host folders: absolute, no NUL, within PATH_MAX (VM folders are made in them).
    let folders = [
        ("vm_folder", &new.vm_folder),
        ("disk_folder", &new.disk_folder),
    ]
    .into_iter()
    .chain(new.media_folders.iter().map(|p| ("media_folders", p)));
    for (field, p) in folders {
        fv_model::check_path(field, p).map_err(|e| bad(OP, format!("request body: {e}")))?;
        if !p.is_absolute() {
            return Err(bad(
                OP,
                format!(
                    "request body: {field}: {} is not an absolute path",
                    p.display()
                ),
            ));
        }
    }
    let ch = |a: bool| a;
    let p = HostSettingsPatch {
        vm_folder: ch(new.vm_folder != cur.vm_folder).then(|| new.vm_folder.clone()),
        disk_folder: ch(new.disk_folder != cur.disk_folder).then(|| new.disk_folder.clone()),
        mac_pool_start: ch(new.mac_pool_start != cur.mac_pool_start)
            .then(|| new.mac_pool_start.clone()),
        mac_pool_size: ch(new.mac_pool_size != cur.mac_pool_size).then_some(new.mac_pool_size),
        allow_memory_overcommit: ch(new.allow_memory_overcommit != cur.allow_memory_overcommit)
            .then_some(new.allow_memory_overcommit),
        cpu_reserve_pool_percent: ch(new.cpu_reserve_pool_percent != cur.cpu_reserve_pool_percent)
            .then_some(new.cpu_reserve_pool_percent),
        accel: ch(new.accel != cur.accel).then_some(new.accel),
        recovery_action: ch(new.recovery_action != cur.recovery_action)
            .then_some(new.recovery_action),
        shutdown_timeout_s: ch(new.shutdown_timeout_s != cur.shutdown_timeout_s)
            .then_some(new.shutdown_timeout_s),
        vm_isolation: ch(new.vm_isolation != cur.vm_isolation).then_some(new.vm_isolation),
        vm_uid_base: ch(new.vm_uid_base != cur.vm_uid_base).then_some(new.vm_uid_base),
        media_folders: ch(new.media_folders != cur.media_folders)
            .then(|| new.media_folders.clone()),
    };
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

async fn vm_create(State(m): S, ReqBody(b): ReqBody) -> R {
    const OP: &str = "vm.create";
    let req: NewVmRequest = body(OP, &b, false)?;
    let v = m.create(req).map_err(err(OP))?;
    let mut r = (StatusCode::CREATED, Json(&v)).into_response();
    if let Ok(h) = HeaderValue::from_str(&format!("/vms/{}", v.id)) {
        r.headers_mut().insert(header::LOCATION, h);
    }
    Ok(r)
}

async fn vm_view(State(m): S, VmId(id): VmId) -> R {
    const OP: &str = "vm.view";
    Ok(Json(m.view(id).await.map_err(err(OP))?).into_response())
}

async fn vm_patch(State(m): S, VmId(id): VmId, ReqBody(b): ReqBody) -> R {
    const OP: &str = "vm.reconfigure";
    let p: serde_json::Map<String, serde_json::Value> = body(OP, &b, false)?;
    Ok(Json(m.reconfigure(id, p).map_err(err(OP))?).into_response())
}

#[derive(Deserialize)]
struct DeleteQ {
    #[serde(default)]
    delete_files: bool,
}

async fn vm_delete(State(m): S, VmId(id): VmId, Q(q): Q<DeleteQ>) -> R {
    const OP: &str = "vm.delete";
    m.remove(id, q.delete_files).map_err(err(OP))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn vm_start(State(m): S, VmId(id): VmId) -> R {
    const OP: &str = "vm.start";
    Ok(job_response(&m.start(id, None).map_err(err(OP))?))
}

async fn vm_stop(State(m): S, VmId(id): VmId, ReqBody(b): ReqBody) -> R {
    const OP: &str = "vm.stop";
    let req: StopRequest = body(OP, &b, true)?;
    Ok(job_response(&m.stop(id, req).map_err(err(OP))?))
}

async fn simple(m: Arc<Manager>, id: Uuid, action: &str, op: &'static str) -> R {
    Ok(job_response(&m.simple_action(id, action).map_err(err(op))?))
}

async fn vm_pause(State(m): S, VmId(id): VmId) -> R {
    simple(m, id, "pause", "vm.pause").await
}
async fn vm_resume(State(m): S, VmId(id): VmId) -> R {
    simple(m, id, "resume", "vm.resume").await
}
async fn vm_reset(State(m): S, VmId(id): VmId) -> R {
    simple(m, id, "reset", "vm.reset").await
}

async fn vm_save(State(m): S, VmId(id): VmId) -> R {
    const OP: &str = "vm.save";
    Ok(job_response(&m.save(id, None).map_err(err(OP))?))
}

#[derive(Deserialize)]
struct ConsoleQ {
    port: Option<usize>,
}

async fn console_output(
    State(m): S,
    VmId(id): VmId,
    Q(q): Q<ConsoleQ>,
    req: axum::extract::Request,
) -> R {
    const OP: &str = "vm.console.output";
    crate::console::open(m, id, q.port.unwrap_or(1), false, req, OP).await
}

async fn console_input(
    State(m): S,
    VmId(id): VmId,
    Q(q): Q<ConsoleQ>,
    req: axum::extract::Request,
) -> R {
    const OP: &str = "vm.console.input";
    crate::console::open(m, id, q.port.unwrap_or(1), true, req, OP).await
}

async fn vm_discard(State(m): S, VmId(id): VmId) -> R {
    const OP: &str = "vm.discard_saved_state";
    Ok(Json(m.discard_saved_state(id).map_err(err(OP))?).into_response())
}

async fn disk_list(State(m): S, VmId(id): VmId) -> R {
    const OP: &str = "vm.disk.list";
    Ok(Json(m.config_of(id).map_err(err(OP))?.0.hard_drives).into_response())
}

async fn disk_add(State(m): S, VmId(id): VmId, ReqBody(b): ReqBody) -> R {
    const OP: &str = "vm.disk.add";
    let req: DiskRequest = body(OP, &b, false)?;
    Ok(Json(m.add_disk(id, req).map_err(err(OP))?).into_response())
}

async fn disk_remove(State(m): S, VmId(id): VmId, P((_, disk)): P<(String, String)>) -> R {
    const OP: &str = "vm.disk.remove";
    Ok(Json(m.remove_disk(id, &disk).map_err(err(OP))?).into_response())
}

async fn dvd_set(State(m): S, VmId(id): VmId, ReqBody(b): ReqBody) -> R {
    const OP: &str = "vm.dvd.set";
    let req: DvdRequest = body(OP, &b, false)?;
    Ok(Json(m.set_dvd(id, req).await.map_err(err(OP))?).into_response())
}

async fn nic_list(State(m): S, VmId(id): VmId) -> R {
    const OP: &str = "vm.nic.list";
    Ok(Json(m.config_of(id).map_err(err(OP))?.0.network_adapters).into_response())
}

async fn nic_add(State(m): S, VmId(id): VmId, ReqBody(b): ReqBody) -> R {
    const OP: &str = "vm.nic.add";
    let req: NicRequest = body(OP, &b, true)?;
    Ok(Json(m.add_nic(id, req).map_err(err(OP))?).into_response())
}

/// A JSON merge patch of one adapter: `connection` merges onto the current one (so
/// `{"connection": {"name": "other"}}` keeps the switch type), `static_mac: null`
/// (or "") returns to a dynamic MAC, `connection: null` disconnects.
async fn nic_set(
    State(m): S,
    VmId(id): VmId,
    P((_, nic)): P<(String, String)>,
    ReqBody(b): ReqBody,
) -> R {
    const OP: &str = "vm.nic.set";
    let mut v = json_value(OP, &b, false)?;
    let Some(o) = v.as_object_mut() else {
        return Err(bad(
            OP,
            "request body: a JSON object (merge patch) is expected".into(),
        ));
    };
    if o.get("name").is_some_and(|n| n.is_null()) {
        return Err(bad(
            OP,
            "request body: name: an adapter always has a name".into(),
        ));
    }
    if o.get("static_mac").is_some_and(|n| n.is_null()) {
        o.insert("static_mac".into(), serde_json::json!(""));
    }
    match o.get_mut("connection") {
        Some(c) if c.is_null() => *c = serde_json::json!({"type": "not_connected"}),
        Some(c) if c.is_object() => {
            let (cfg, _) = m.config_of(id).map_err(err(OP))?;
            let i = Manager::nic_index(&cfg, &nic).map_err(err(OP))?;
            if let Some(cur) = cfg.network_adapters.get(i) {
                let mut base = serde_json::to_value(&cur.connection)
                    .map_err(|e| err(OP)(MgrError::Internal(e.to_string())))?;
                // A new type starts from nothing: a switch's name does not carry over.
                if c.get("type").is_some() && c.get("type") != base.get("type") {
                    base = serde_json::json!({});
                }
                crate::util::merge_patch(&mut base, c);
                *c = base;
            }
        }
        _ => {}
    }
    let req: NicPatch =
        crate::util::from_value_strict(v).map_err(|e| bad(OP, format!("request body: {e}")))?;
    Ok(Json(m.set_nic(id, &nic, req).map_err(err(OP))?).into_response())
}

async fn nic_remove(State(m): S, VmId(id): VmId, P((_, nic)): P<(String, String)>) -> R {
    const OP: &str = "vm.nic.remove";
    Ok(Json(m.remove_nic(id, &nic).map_err(err(OP))?).into_response())
}

#[derive(Deserialize)]
struct JobsQ {
    limit: Option<u32>,
    /// RFC 3339 time: only jobs created after it.
    since: Option<String>,
}

/// Newest first. Filtered to what the caller may see, then cut to `limit`, so a
/// scoped caller still gets the newest `limit` jobs of its own.
async fn job_list(State(m): S, caller: crate::auth::Caller, Q(q): Q<JobsQ>) -> R {
    const OP: &str = "job.list";
    let limit = q.limit.unwrap_or(100).min(10_000) as usize;
    let since = match &q.since {
        Some(t) => Some(
            humantime::parse_rfc3339_weak(t)
                .map(crate::util::rfc3339)
                .map_err(|e| {
                    bad(
                        OP,
                        format!(
                            "query: since: {:?} is not an RFC 3339 time ({e})",
                            crate::util::log_safe(t)
                        ),
                    )
                })?,
        ),
        None => None,
    };
    let mut v = m.jobs.list(10_000, since.as_deref());
    v.retain(|j| caller.may(j.vm_id));
    v.truncate(limit);
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct WaitQ {
    wait: Option<f64>,
}

fn job_id(op: &'static str, s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| err(op)(MgrError::NotFound(job_not_found(s))))
}

async fn job_view(State(m): S, P(id): P<String>, Q(q): Q<WaitQ>) -> R {
    const OP: &str = "job.view";
    let id = job_id(OP, &id)?;
    let v = match q.wait {
        // NaN and infinity compare false / are clamped: never a panic in from_secs_f64.
        Some(w) if w > 0.0 => m.jobs.wait(id, Duration::from_secs_f64(w.min(600.0))).await,
        _ => m.jobs.get(id),
    };
    let v = v.ok_or_else(|| err(OP)(MgrError::NotFound(format!("no job {id}"))))?;
    Ok(Json(v).into_response())
}

async fn job_cancel(State(m): S, P(id): P<String>) -> R {
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
    /// Only events older than this sequence number (paging back through the list).
    before: Option<i64>,
    vm: Option<String>,
    limit: Option<u32>,
}

/// Newest first: events after `since` (and before `before`), filtered to what the
/// caller may see, then cut to `limit` (default 1000).
async fn event_list(State(m): S, caller: crate::auth::Caller, Q(q): Q<EventsQ>) -> R {
    const OP: &str = "event.list";
    let vm = match &q.vm {
        // A VM the caller may not see is treated like one that does not exist.
        Some(v) => Some(
            m.resolve(v)
                .ok()
                .filter(|id| caller.may(Some(*id)))
                .or_else(|| Uuid::parse_str(v).ok())
                .ok_or_else(|| err(OP)(MgrError::NotFound(vm_not_found(v))))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(1000).min(10_000) as usize;
    let since = q.since.unwrap_or(0);
    let mut before = q.before;
    let mut out = Vec::new();
    // Page back until `limit` visible events are found or the range is exhausted.
    loop {
        let page =
            m.db.events_newest_first(since, before, vm, 1000)
                .map_err(|e| err(OP)(MgrError::Internal(e.to_string())))?;
        let last = page.last().map(|e| e.seq);
        let n = page.len();
        out.extend(page.into_iter().filter(|e| caller.may(e.vm_id)));
        if out.len() >= limit || n < 1000 {
            break;
        }
        before = last;
    }
    out.truncate(limit);
    Ok(Json(out).into_response())
}

async fn event_stream(State(m): S, caller: crate::auth::Caller, Q(q): Q<EventsQ>) -> R {
    const OP: &str = "event.stream";
    // Subscribe before replaying so nothing falls between the two.
    let rx = m.events.subscribe();
    // The replay is in order (oldest first), as a stream is read.
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

/// The 404 for a VM that does not exist, and for one the caller may not see: the
/// same answer, so a refusal tells nothing about other scopes.
pub(crate) fn vm_not_found(key: &str) -> String {
    format!("no VM named or with id {key:?}")
}

/// The 404 for a job that does not exist or that the caller may not see.
pub(crate) fn job_not_found(key: &str) -> String {
    match Uuid::parse_str(key) {
        Ok(id) => format!("no job {id}"),
        Err(_) => format!("no job {key:?}"),
    }
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
    // Bodies that are JSON merge patches of a VmConfig: its members, none required,
    // nothing else (unknown members are refused with 400).
    let vm_config = components
        .get("VmConfig")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut patch_props = vm_config
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    patch_props.remove("id");
    patch_props.remove("version");
    components.insert(
        "VmConfigPatch".into(),
        json!({"type": "object", "description": "A JSON merge patch (RFC 7396) of the VM's configuration: objects merge at every depth ({\"cpu\": {\"count\": 2}} keeps reserve, limit and weight), null removes a member (it takes its default), arrays replace. Unknown members are refused with 400 naming them. Changing anything but name, notes, the automatic actions and integration services needs the VM Off.", "properties": patch_props.clone(), "additionalProperties": false}),
    );
    let mut new_props = patch_props;
    new_props.insert("name".into(), json!({"type": "string", "minLength": 1, "maxLength": fv_model::limits::NAME_MAX_CHARS, "description": "1-100 characters, no control characters, no '/'"}));
    new_props.insert(
        "generation".into(),
        json!({"type": "string", "enum": ["1", "2"], "description": "Default \"2\""}),
    );
    new_props.insert("vm_dir".into(), json!({"type": "string", "description": "Absolute folder for this VM (default: <host vm_folder>/<id>)"}));
    components.insert(
        "NewVmRequest".into(),
        json!({"type": "object", "required": ["name"], "description": "Body of POST /vms: a name, and any VmConfig members, merged (as a JSON merge patch) onto the defaults of the generation; id and version are chosen by fvd. Unknown members are refused with 400 naming them.", "properties": new_props, "additionalProperties": false}),
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
        for (name, schema, required) in query_params(o.name) {
            params
                .push(json!({"name": name, "in": "query", "required": required, "schema": schema}));
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
            "description": "The host service's REST API, on the Unix socket <runtime>/fvd.sock (and over TLS with `fvd --listen-tcp`). Long operations answer 202 with a job; errors are {code, message, operation}. Every operation is authorized by its operationId against the caller's roles in the target's scope: callers are local users by their socket peer credentials, or API tokens (`Authorization: Bearer <id>.<secret>`, required over TLS). 401 `unauthenticated` names the reason; 403 `forbidden` names the missing operation. List operations return only what the caller may view. An object (VM, job) in a scope where the caller may neither view it nor perform the operation is answered exactly like one that does not exist (404 not_found); an operation the caller holds in no scope is 403. Request bodies are checked at the edge: unknown members are refused (400 naming them), type errors name the field and what was expected, names are 1-100 characters without control characters or '/', memory is a multiple of 2 MiB within the host's memory, vCPUs within the host's logical processors and QEMU's limit. PATCH bodies are JSON merge patches (RFC 7396). A full disk is 507 insufficient_storage naming the path, and the failed call changes nothing. Lists of jobs and events are newest first."
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer", "description": "An API token `<id>.<secret>` from POST /auth/tokens"}},
        },
        "security": [{}, {"token": []}],
    }))
}

/// The query parameters of an operation, for the OpenAPI document.
fn query_params(op: &str) -> Vec<(&'static str, serde_json::Value, bool)> {
    use serde_json::json;
    let int = |min: i64| json!({"type": "integer", "minimum": min});
    match op {
        "vm.create" => vec![("scope", json!({"type": "string"}), false)],
        "vm.delete" => vec![("delete_files", json!({"type": "boolean"}), false)],
        "vm.console.output" | "vm.console.input" => {
            vec![("port", json!({"type": "integer", "enum": [1, 2]}), false)]
        }
        "vm.copy_file" => vec![
            ("dest", json!({"type": "string"}), true),
            ("create_full_path", json!({"type": "boolean"}), false),
            ("overwrite", json!({"type": "boolean"}), false),
        ],
        "job.list" => vec![
            ("limit", int(0), false),
            (
                "since",
                json!({"type": "string", "format": "date-time"}),
                false,
            ),
        ],
        "job.view" => vec![(
            "wait",
            json!({"type": "number", "minimum": 0, "maximum": 600}),
            false,
        )],
        "event.list" => vec![
            ("since", int(0), false),
            ("before", int(0), false),
            ("vm", json!({"type": "string"}), false),
            ("limit", int(0), false),
        ],
        "event.stream" => vec![("since", int(0), false)],
        "audit.view" => vec![("since", int(0), false), ("limit", int(0), false)],
        "auth.assignment.delete" => vec![
            ("principal", json!({"type": "string"}), true),
            ("role", json!({"type": "string"}), true),
            ("scope", json!({"type": "string"}), true),
        ],
        _ => vec![],
    }
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
