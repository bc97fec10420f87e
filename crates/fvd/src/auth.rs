//! Authorization, enforced in one place: a route layer that maps (method, matched
//! path) to the operation in [`OPERATIONS`], finds who is calling (Unix peer
//! credentials or a bearer token) and what the call is about (the VM's scope), and
//! asks [`Policy::check_in_scope`]. The policy lives behind a lock and is persisted
//! before a change is answered, so every change applies to the very next request.
//! Also: the `/auth/...` and `/audit` API, and the audit log of every mutating call
//! and every refusal.
use crate::api::{Operation, OPERATIONS};
use crate::auth_store::{AuditEntry, StoreError};
use crate::manager::Manager;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{
    ConnectInfo, FromRequestParts, MatchedPath, Path, Query, RawPathParams, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, RequestExt, Router};
use fv_authz::{AuthzError, OperationInfo, Policy, Principal, DEFAULT_SCOPE, GLOBAL_SCOPE};
use fv_model::api::ApiErrorBody;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use uuid::Uuid;

/// GETs that are not "view" operations: token metadata is for administrators only,
/// so Monitor (all view operations) must not get it.
/// Watching a console is not "viewing" either: Hyper-V keeps "allow output from VM"
/// apart from view rights (the screen shows what the guest shows), so Monitor lacks it.
const ADMIN_ONLY_READS: &[&str] = &["auth.token.list", "vm.console.output"];

/// Operations that filter what the caller may see instead of refusing: a principal
/// holding one in scope A gets A's objects. Refused only when held nowhere.
pub const LIST_OPERATIONS: &[&str] = &["vm.list", "job.list", "event.list", "event.stream"];

/// A view (read-only) operation: every GET except the admin-only reads.
pub fn is_view(op: &Operation) -> bool {
    op.method == "get" && !ADMIN_ONLY_READS.contains(&op.name)
}

/// The authorization catalogue: exactly the API's operations.
pub fn catalogue() -> Vec<OperationInfo> {
    let mut seen = BTreeSet::new();
    OPERATIONS
        .iter()
        .filter(|o| seen.insert(o.name))
        .map(|o| OperationInfo {
            name: o.name.to_string(),
            view: is_view(o),
        })
        .collect()
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub enum Peer {
    /// The Unix socket, with the kernel's SO_PEERCRED.
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// The TLS listener: only a bearer token identifies the caller.
    Tls { addr: SocketAddr },
    /// Peer credentials could not be read: treated as unauthenticated.
    Unknown,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        match s.io().peer_cred() {
            Ok(c) => Peer::Unix {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            Err(_) => Peer::Unknown,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Authz(#[from] AuthzError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

impl AuthError {
    fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            AuthError::Authz(e) => match e {
                AuthzError::Denied { .. } => (StatusCode::FORBIDDEN, "forbidden"),
                AuthzError::UnknownOperation(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                AuthzError::UnknownRole(_) | AuthzError::UnknownScope(_) => {
                    (StatusCode::NOT_FOUND, "not_found")
                }
                AuthzError::BuiltinRole(_) | AuthzError::Exists(_) | AuthzError::ScopeInUse(_) => {
                    (StatusCode::CONFLICT, "conflict")
                }
                AuthzError::InvalidToken | AuthzError::TokenExpired | AuthzError::TokenRevoked => {
                    (StatusCode::UNAUTHORIZED, "unauthenticated")
                }
            },
            AuthError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            AuthError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AuthError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AuthError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        }
    }

    fn respond(&self, op: &str) -> Response {
        let (s, code) = self.status_code();
        error_response(s, code, op, self.to_string())
    }
}

fn error_response(status: StatusCode, code: &str, op: &str, message: String) -> Response {
    (
        status,
        Json(ApiErrorBody {
            code: code.into(),
            message,
            operation: op.into(),
            state: None,
        }),
    )
        .into_response()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339_secs(t: u64) -> String {
    // checked: a time past what SystemTime holds must not panic the handler.
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(t)) {
        Some(at) => crate::util::rfc3339(at),
        None => format!("@{t}"),
    }
}

/// The longest token lifetime: a hundred years (and within RFC 3339's year 9999).
const MAX_TOKEN_LIFETIME_S: u64 = 100 * 365 * 24 * 3600;

/// The policy and the audit log.
pub struct Auth {
    policy: RwLock<Policy>,
    store: crate::auth_store::Store,
}

impl Auth {
    /// Load the policy (or start with the defaults: root is Administrator, nothing
    /// else assigned). `vms` are the registered VMs: memberships of VMs removed
    /// meanwhile are dropped, so they do not keep a scope "in use".
    pub fn open(state_dir: &std::path::Path, vms: &[Uuid]) -> Result<Arc<Auth>, AuthError> {
        let store = crate::auth_store::Store::open(&state_dir.join("fvd.db"))?;
        let mut p: Policy = store.policy()?.unwrap_or_else(|| Policy::new(Vec::new()));
        // The catalogue comes from this binary's table, never from the stored copy,
        // so operations added by an upgrade are known (and built-in roles get them).
        p.operations = catalogue();
        let known: BTreeSet<String> = vms.iter().map(Uuid::to_string).collect();
        p.members.retain(|k, _| known.contains(k));
        store.put_policy(&p)?;
        Ok(Arc::new(Auth {
            policy: RwLock::new(p),
            store,
        }))
    }

    pub fn read<T>(&self, f: impl FnOnce(&Policy) -> T) -> T {
        f(&self.policy.read())
    }

    /// Apply a change to a copy, persist it, then make it current: a change that
    /// cannot be stored is not applied, and one that is answered is on disk.
    pub fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Policy) -> Result<T, AuthError>,
    ) -> Result<T, AuthError> {
        let mut guard = self.policy.write();
        let mut next = guard.clone();
        let out = f(&mut next)?;
        self.store.put_policy(&next)?;
        *guard = next;
        Ok(out)
    }

    fn principal_name(&self, p: &Principal) -> Option<String> {
        match p {
            Principal::Unix { uid } => nix::unistd::User::from_uid((*uid).into())
                .ok()
                .flatten()
                .map(|u| u.name),
            Principal::Token { id } => self.read(|pol| pol.tokens.get(id).map(|t| t.name.clone())),
        }
    }

    fn audit(&self, e: AuditEntry) {
        if let Err(err) = self.store.add_audit(&e) {
            tracing::error!("cannot store audit entry: {err}");
        }
    }
}

#[derive(Clone)]
pub struct Ctx {
    pub m: Arc<Manager>,
    pub auth: Arc<Auth>,
}

/// The authenticated caller of the current request, for handlers that decide more
/// (list filtering, the destination scope of a move).
#[derive(Clone)]
pub struct Caller {
    pub principal: Principal,
    pub operation: &'static str,
    auth: Option<Arc<Auth>>,
}

impl Caller {
    /// May the caller use its operation on this VM (None = host-level object)?
    /// Evaluated against the current policy each time, so a long event stream stops
    /// showing what a revoked token or a removed assignment no longer allows.
    pub fn may(&self, vm: Option<Uuid>) -> bool {
        let Some(auth) = &self.auth else {
            return false;
        };
        auth.read(|p| {
            if let Principal::Token { id } = &self.principal {
                let now = unix_now();
                let ok = p
                    .tokens
                    .get(id)
                    .is_some_and(|t| !t.revoked && t.expires_at.is_none_or(|e| now < e));
                if !ok {
                    return false;
                }
            }
            p.check(
                &self.principal,
                self.operation,
                vm.map(|v| v.to_string()).as_deref(),
            )
            .is_ok()
        })
    }

    fn check_scope(&self, scope: &str) -> Result<(), AuthError> {
        let Some(auth) = &self.auth else {
            return Err(AuthError::Conflict("no caller".into()));
        };
        auth.read(|p| p.check_in_scope(&self.principal, self.operation, Some(scope)))?;
        Ok(())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Without the middleware (a bug) the caller may see and do nothing.
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or(Caller {
            principal: Principal::Token { id: String::new() },
            operation: "api.route",
            auth: None,
        }))
    }
}

/// The VM of a `{id}` route as resolved for this caller (set by [`enforce`], read by
/// handlers through `api::VmId`): by id, or by a name unique among the VMs the
/// caller may see, so another scope's VM of the same name neither shadows nor shows.
#[derive(Clone, Copy)]
pub struct ResolvedVm(pub Uuid);

/// The view operation that makes an object of this route visible to a caller.
fn view_op_for(params: &[(String, String)]) -> Option<&'static str> {
    if params.iter().any(|(k, _)| k == "id") {
        Some("vm.view")
    } else if params.iter().any(|(k, _)| k == "job") {
        Some("job.view")
    } else {
        None
    }
}

/// An object the caller may see: the scope to check the operation in (None =
/// host-level) and, for a VM, its id.
type Seen = (Option<String>, Option<Uuid>);
/// What the caller gets instead: status, code, message.
type Unseen = (StatusCode, &'static str, String);

/// The object a request names and the caller may see, or the 404/409 it gets
/// instead. Objects that do not exist and objects in scopes where the caller holds
/// neither the operation nor the view operation get the same 404 (same message
/// for the same key), so a refusal does not tell whether or where they exist.
fn visible_object(
    ctx: &Ctx,
    principal: &Principal,
    op: &Operation,
    params: &[(String, String)],
) -> Result<Option<Seen>, Unseen> {
    let Some(view_op) = view_op_for(params) else {
        return Ok(None);
    };
    let sees = |scope: Option<&str>| {
        ctx.auth.read(|p| {
            p.check_in_scope(principal, op.name, scope).is_ok()
                || p.check_in_scope(principal, view_op, scope).is_ok()
        })
    };
    let scope_of = |id: Uuid| ctx.auth.read(|p| p.scope_of(&id.to_string()).to_string());
    if let Some((_, key)) = params.iter().find(|(k, _)| k == "id") {
        let seen: Vec<Uuid> = ctx
            .m
            .ids_for(key)
            .into_iter()
            .filter(|id| sees(Some(&scope_of(*id))))
            .collect();
        return match seen.as_slice() {
            [id] => Ok(Some((Some(scope_of(*id)), Some(*id)))),
            [] => Err((
                StatusCode::NOT_FOUND,
                "not_found",
                crate::api::vm_not_found(key),
            )),
            many => Err((
                StatusCode::CONFLICT,
                "conflict",
                format!("{} VMs are named {key:?}; use the id", many.len()),
            )),
        };
    }
    let key = params
        .iter()
        .find(|(k, _)| k == "job")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let job = Uuid::parse_str(key).ok().and_then(|j| ctx.m.jobs.get(j));
    // Host jobs (host.shutdown) are host-level: only the global scope covers them.
    let scope = job.as_ref().map(|j| j.vm_id.map(scope_of));
    match scope {
        Some(scope) if sees(scope.as_deref()) => Ok(Some((scope, None))),
        _ => Err((
            StatusCode::NOT_FOUND,
            "not_found",
            crate::api::job_not_found(key),
        )),
    }
}

/// Set by a handler on its response: what the call was about, for the audit log.
#[derive(Clone)]
pub struct AuditTarget(pub String);

fn bearer(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| "malformed Authorization header".to_string())?;
    match v.split_once(' ') {
        Some((scheme, tok)) if scheme.eq_ignore_ascii_case("bearer") => {
            Ok(Some(tok.trim().to_string()))
        }
        _ => Err("the Authorization header must be `Bearer <id>.<secret>`".into()),
    }
}

/// Who is calling: a bearer token wins (also on the Unix socket, for tools and
/// tests); otherwise the Unix peer's uid. TLS callers must present a token.
fn authenticate(
    auth: &Auth,
    peer: Option<&Peer>,
    headers: &HeaderMap,
) -> Result<Principal, String> {
    if let Some(tok) = bearer(headers)? {
        return auth
            .read(|p| p.authenticate_token(&tok, unix_now()))
            .map_err(|e| e.to_string());
    }
    match peer {
        Some(Peer::Unix { uid, .. }) => Ok(Principal::Unix { uid: *uid }),
        Some(Peer::Tls { .. }) => Err("a bearer token is required over TLS".into()),
        _ => Err("the caller could not be identified".into()),
    }
}

/// A worker runs as uid 0 and would be Administrator; its QEMU runs in the per-VM
/// uid range. Neither may call fvd (a compromised VM must not manage the host), with
/// or without a token. Landlock does not cover connecting to the socket, so we check.
fn is_vm_peer(ctx: &Ctx, uid: u32, pid: Option<i32>) -> bool {
    let base = ctx.m.settings().vm_uid_base;
    let range = (base, base.saturating_add(fv_model::api::VM_UID_RANGE));
    crate::vm_peers::is_vm_process(&ctx.m.paths.runtime_dir, pid, uid, range)
}

struct Target {
    /// The scope to check in; None = host-level (only the global scope covers it).
    scope: Option<String>,
    label: Option<String>,
    /// `vm.create` with `?scope=`: place the new VM there once it exists.
    create_in: Option<String>,
}

fn resolve_target(
    ctx: &Ctx,
    op: &Operation,
    params: &[(String, String)],
    uri: &axum::http::Uri,
) -> Target {
    let default = || Some(DEFAULT_SCOPE.to_string());
    let scope_of = |id: Uuid| Some(ctx.auth.read(|p| p.scope_of(&id.to_string()).to_string()));
    if let Some((_, key)) = params.iter().find(|(k, _)| k == "id") {
        // A VM that does not exist (or an ambiguous name) is checked in the default
        // scope; the handler then answers 404 (or 409).
        return match ctx.m.resolve(key) {
            Ok(id) => {
                let name = ctx.m.config_of(id).map(|c| c.0.name).unwrap_or_default();
                Target {
                    scope: scope_of(id),
                    label: Some(format!("vm:{id} ({name})")),
                    create_in: None,
                }
            }
            Err(_) => Target {
                scope: default(),
                label: Some(format!("vm:{key}")),
                create_in: None,
            },
        };
    }
    if let Some((_, key)) = params.iter().find(|(k, _)| k == "job") {
        let label = Some(format!("job:{key}"));
        return match Uuid::parse_str(key).ok().and_then(|j| ctx.m.jobs.get(j)) {
            Some(j) => Target {
                // Host jobs (host.shutdown) are host-level.
                scope: j.vm_id.and_then(scope_of),
                label,
                create_in: None,
            },
            None => Target {
                scope: default(),
                label,
                create_in: None,
            },
        };
    }
    if op.name == "vm.create" {
        // New VMs land in the default scope, or in `?scope=NAME`: creating there is
        // checked there, so a scope's administrators can add VMs to it.
        let q: Option<Query<std::collections::HashMap<String, String>>> =
            Query::try_from_uri(uri).ok();
        let want = q.and_then(|q| q.0.get("scope").cloned());
        return Target {
            scope: want.clone().or_else(default),
            label: None,
            create_in: want,
        };
    }
    Target {
        scope: None,
        label: params.first().map(|(k, v)| format!("{k}:{v}")),
        create_in: None,
    }
}

struct Record {
    principal: Option<Principal>,
    operation: String,
    method: String,
    path: String,
    target: Option<String>,
}

impl Ctx {
    fn log(&self, r: &Record, status: StatusCode, result: String, message: Option<String>) {
        let (principal, principal_name) = match &r.principal {
            Some(p) => (p.to_string(), self.auth.principal_name(p)),
            None => ("anonymous".to_string(), None),
        };
        self.auth.audit(AuditEntry {
            seq: 0,
            time: crate::util::now(),
            principal,
            principal_name,
            operation: r.operation.clone(),
            method: r.method.clone(),
            path: r.path.clone(),
            target: r.target.clone(),
            status: status.as_u16(),
            result,
            message,
        });
    }

    fn refuse(&self, r: &Record, status: StatusCode, code: &str, message: String) -> Response {
        tracing::info!(
            principal = ?r.principal.as_ref().map(|p| p.to_string()),
            operation = %r.operation,
            "refused: {message}"
        );
        self.log(r, status, code.to_string(), Some(message.clone()));
        error_response(status, code, &r.operation, message)
    }
}

/// The route layer: authenticate, authorize, run, audit.
pub async fn enforce(
    State(ctx): State<Ctx>,
    mut req: axum::extract::Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let mutating = !(method == Method::GET || method == Method::HEAD);
    let lookup_method = if method == Method::HEAD {
        "get".to_string()
    } else {
        method.as_str().to_ascii_lowercase()
    };
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let op = matched.as_deref().and_then(|mp| {
        OPERATIONS
            .iter()
            .find(|o| o.path == mp && o.method == lookup_method)
    });
    let mut rec = Record {
        principal: None,
        operation: op.map(|o| o.name).unwrap_or("api.route").to_string(),
        method: method.to_string(),
        path: req.uri().path().to_string(),
        target: None,
    };
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| &c.0);
    if let Some(Peer::Unix { uid, pid, .. }) = peer {
        if is_vm_peer(&ctx, *uid, *pid) {
            rec.principal = Some(Principal::Unix { uid: *uid });
            let why = format!(
                "uid:{uid} (pid {}) may not perform {}: VM processes (workers, QEMU) may not use fvd's API",
                pid.unwrap_or(0),
                rec.operation
            );
            return ctx.refuse(&rec, StatusCode::FORBIDDEN, "forbidden", why);
        }
    }
    let principal = match authenticate(&ctx.auth, peer, req.headers()) {
        Ok(p) => p,
        Err(why) => return ctx.refuse(&rec, StatusCode::UNAUTHORIZED, "unauthenticated", why),
    };
    rec.principal = Some(principal.clone());
    // Never allowed by default: a route without a table entry is refused.
    let Some(op) = op else {
        let why = format!(
            "{principal} may not call {method} {}: it is not an operation in the API table",
            matched.as_deref().unwrap_or("?")
        );
        return ctx.refuse(&rec, StatusCode::FORBIDDEN, "forbidden", why);
    };
    let params: Vec<(String, String)> = match req.extract_parts::<RawPathParams>().await {
        Ok(p) => p
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut target = resolve_target(&ctx, op, &params, req.uri());
    rec.target = target.label.clone();
    let nowhere = |p: &Policy| {
        (!p.holds_anywhere(&principal, op.name))
            .then(|| format!("{principal} may not perform {} in any scope", op.name))
    };
    // Holding the operation nowhere is refused the same for every object (it says
    // nothing about the object); otherwise an object the caller cannot see is a 404.
    if view_op_for(&params).is_some() || LIST_OPERATIONS.contains(&op.name) {
        if let Some(why) = ctx.auth.read(nowhere) {
            return ctx.refuse(&rec, StatusCode::FORBIDDEN, "forbidden", why);
        }
    }
    match visible_object(&ctx, &principal, op, &params) {
        Ok(Some((scope, vm))) => {
            target.scope = scope;
            if let Some(id) = vm {
                req.extensions_mut().insert(ResolvedVm(id));
            }
        }
        Ok(None) => {}
        Err((status, code, msg)) => {
            if mutating {
                ctx.log(&rec, status, code.to_string(), Some(msg.clone()));
            }
            return error_response(status, code, op.name, msg);
        }
    }
    let decision = ctx.auth.read(|p| {
        if LIST_OPERATIONS.contains(&op.name) {
            Ok(())
        } else {
            p.check_in_scope(&principal, op.name, target.scope.as_deref())
                .map_err(|e| e.to_string())
        }
    });
    if let Err(why) = decision {
        return ctx.refuse(&rec, StatusCode::FORBIDDEN, "forbidden", why);
    }
    let requester = crate::access::Requester::from_principal(
        &principal,
        ctx.auth.read(|p| p.root_is_admin),
        match &principal {
            Principal::Token { .. } => ctx.auth.principal_name(&principal),
            Principal::Unix { .. } => None,
        },
    );
    req.extensions_mut().insert(Caller {
        principal,
        operation: op.name,
        auth: Some(ctx.auth.clone()),
    });
    if let Some(sc) = &target.create_in {
        if !ctx.auth.read(|p| p.scopes.contains(sc)) {
            let why = format!("no scope {sc:?}");
            return ctx.refuse(&rec, StatusCode::NOT_FOUND, "not_found", why);
        }
    }
    // Host paths the handler is given are checked against this caller's rights.
    let resp = crate::access::with_requester(requester, next.run(req)).await;
    let status = resp.status();
    if let (Some(sc), StatusCode::CREATED) = (&target.create_in, status) {
        let id = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| l.strip_prefix("/vms/"))
            .map(str::to_string);
        if let Some(id) = id {
            // The VM exists now; if it cannot be placed, it stays in the default
            // scope (where the caller may lack rights) and the log says why.
            if let Err(e) = ctx.auth.mutate(|p| Ok(p.set_scope(&id, sc)?)) {
                tracing::error!("new VM {id} could not be placed in scope {sc}: {e}");
            }
        }
    }
    if !mutating && status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED {
        return resp;
    }
    if let Some(t) = resp.extensions().get::<AuditTarget>() {
        rec.target = Some(t.0.clone());
    } else if rec.target.is_none() {
        rec.target = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    if status.is_client_error() || status.is_server_error() {
        // Error bodies are small JSON: read the code for the log, then pass it on.
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let code = v["code"].as_str().unwrap_or("error").to_string();
        let msg = v["message"].as_str().map(str::to_string);
        ctx.log(&rec, status, code, msg);
        return Response::from_parts(parts, Body::from(bytes));
    }
    ctx.log(&rec, status, "ok".into(), None);
    resp
}

// ---------- the /auth and /audit API ----------

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RoleView {
    pub name: String,
    pub builtin: bool,
    pub operations: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NewRoleRequest {
    pub name: String,
    /// Operation names from the API table (`vm.start`, ...).
    pub operations: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ScopeView {
    pub name: String,
    /// VMs placed in this scope (the default scope lists only VMs placed nowhere else
    /// implicitly, so it is empty here; every VM not listed elsewhere is in it).
    pub vms: Vec<Uuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NewScopeRequest {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SetScopeRequest {
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmScope {
    pub vm_id: Uuid,
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssignmentView {
    /// `uid:N` or `token:ID`.
    pub principal: String,
    pub principal_name: Option<String>,
    pub role: String,
    /// A scope name, or `*` for everywhere including host-level operations.
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NewAssignmentRequest {
    /// `uid:N`, `user:NAME` (resolved to its uid now) or `token:ID`.
    pub principal: String,
    pub role: String,
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub created: String,
    pub expires: Option<String>,
    pub revoked: bool,
    pub expired: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NewTokenRequest {
    pub name: String,
    /// Lifetime in seconds; absent = never expires.
    pub expires_in_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NewTokenResponse {
    pub id: String,
    pub name: String,
    pub expires: Option<String>,
    /// `<id>.<secret>`: send as `Authorization: Bearer ...`. Shown only this once;
    /// fvd keeps only its SHA-256.
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuthSettings {
    /// uid 0 is Administrator everywhere. Turning it off needs another principal
    /// with Administrator in the global scope, so the host cannot be locked out.
    pub root_is_admin: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuthSettingsPatch {
    pub root_is_admin: Option<bool>,
}

/// Schemas of the types above, for the OpenAPI document.
pub fn openapi_schemas(
    gen: &mut schemars::gen::SchemaGenerator,
) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut add = |n: &str, s: schemars::schema::Schema| {
        out.push((
            n.to_string(),
            serde_json::to_value(s).unwrap_or(serde_json::Value::Null),
        ))
    };
    add("RoleView", gen.subschema_for::<RoleView>());
    add("NewRoleRequest", gen.subschema_for::<NewRoleRequest>());
    add("ScopeView", gen.subschema_for::<ScopeView>());
    add("NewScopeRequest", gen.subschema_for::<NewScopeRequest>());
    add("SetScopeRequest", gen.subschema_for::<SetScopeRequest>());
    add("VmScope", gen.subschema_for::<VmScope>());
    add("AssignmentView", gen.subschema_for::<AssignmentView>());
    add(
        "NewAssignmentRequest",
        gen.subschema_for::<NewAssignmentRequest>(),
    );
    add("TokenView", gen.subschema_for::<TokenView>());
    add("NewTokenRequest", gen.subschema_for::<NewTokenRequest>());
    add("NewTokenResponse", gen.subschema_for::<NewTokenResponse>());
    add("AuthSettings", gen.subschema_for::<AuthSettings>());
    add(
        "AuthSettingsPatch",
        gen.subschema_for::<AuthSettingsPatch>(),
    );
    add("AuditEntry", gen.subschema_for::<AuditEntry>());
    out
}

type R = Result<Response, Response>;

fn parse<T: serde::de::DeserializeOwned + Serialize>(
    b: &axum::body::Bytes,
) -> Result<T, AuthError> {
    // The same strict parsing as every other body: fields named, unknown ones refused.
    let v: serde_json::Value = serde_json::from_slice(b)
        .map_err(|e| AuthError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    crate::util::from_value_strict(v)
        .map_err(|e| AuthError::BadRequest(format!("request body: {e}")))
}

fn created<T: Serialize>(v: &T, target: String) -> Response {
    let mut r = (StatusCode::CREATED, Json(v)).into_response();
    r.extensions_mut().insert(AuditTarget(target));
    r
}

fn valid_name(what: &str, n: &str) -> Result<(), AuthError> {
    if n.is_empty()
        || n.len() > 64
        || n == GLOBAL_SCOPE
        || n.chars().any(|c| c.is_control() || c == '/')
    {
        return Err(AuthError::BadRequest(format!(
            "{what} name {n:?}: 1-64 characters, no '/', control characters or '*' alone"
        )));
    }
    Ok(())
}

fn role_view(r: fv_authz::Role) -> RoleView {
    RoleView {
        name: r.name,
        builtin: r.builtin,
        operations: r.operations.into_iter().collect(),
    }
}

async fn role_list(State(c): State<Ctx>) -> R {
    let v: Vec<RoleView> = c
        .auth
        .read(|p| p.roles())
        .into_iter()
        .map(role_view)
        .collect();
    Ok(Json(v).into_response())
}

async fn role_view_h(State(c): State<Ctx>, Path(name): Path<String>) -> R {
    c.auth
        .read(|p| p.roles().into_iter().find(|r| r.name == name))
        .map(|r| Json(role_view(r)).into_response())
        .ok_or_else(|| AuthError::NotFound(format!("no role {name:?}")).respond("auth.role.view"))
}

async fn role_create(State(c): State<Ctx>, crate::api::ReqBody(b): crate::api::ReqBody) -> R {
    const OP: &str = "auth.role.create";
    let req: NewRoleRequest = parse(&b).map_err(|e| e.respond(OP))?;
    valid_name("role", &req.name).map_err(|e| e.respond(OP))?;
    let r = c
        .auth
        .mutate(|p| {
            if p.custom_roles.contains_key(&req.name) {
                return Err(AuthzError::Exists(format!("role {}", req.name)).into());
            }
            p.add_role(&req.name, &req.operations)?;
            Ok(p.roles().into_iter().find(|r| r.name == req.name))
        })
        .map_err(|e| e.respond(OP))?;
    let r = r
        .map(role_view)
        .ok_or_else(|| AuthError::NotFound(format!("role {} vanished", req.name)).respond(OP))?;
    Ok(created(&r, format!("role:{}", r.name)))
}

async fn role_delete(State(c): State<Ctx>, Path(name): Path<String>) -> R {
    const OP: &str = "auth.role.delete";
    c.auth
        .mutate(|p| Ok(p.remove_role(&name)?))
        .map_err(|e| e.respond(OP))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn scope_list(State(c): State<Ctx>) -> R {
    let v: Vec<ScopeView> = c.auth.read(|p| {
        p.scopes
            .iter()
            .map(|s| ScopeView {
                name: s.clone(),
                vms: p
                    .members
                    .iter()
                    .filter(|(_, sc)| *sc == s)
                    .filter_map(|(o, _)| Uuid::parse_str(o).ok())
                    .collect(),
            })
            .collect()
    });
    Ok(Json(v).into_response())
}

async fn scope_create(State(c): State<Ctx>, crate::api::ReqBody(b): crate::api::ReqBody) -> R {
    const OP: &str = "auth.scope.create";
    let req: NewScopeRequest = parse(&b).map_err(|e| e.respond(OP))?;
    valid_name("scope", &req.name).map_err(|e| e.respond(OP))?;
    c.auth
        .mutate(|p| Ok(p.add_scope(&req.name)?))
        .map_err(|e| e.respond(OP))?;
    Ok(created(
        &ScopeView {
            name: req.name.clone(),
            vms: vec![],
        },
        format!("scope:{}", req.name),
    ))
}

async fn scope_delete(State(c): State<Ctx>, Path(name): Path<String>) -> R {
    const OP: &str = "auth.scope.delete";
    let known: BTreeSet<String> = c.m.list().iter().map(|v| v.id.to_string()).collect();
    c.auth
        .mutate(|p| {
            // VMs removed since fvd started no longer hold the scope.
            p.members.retain(|k, _| known.contains(k));
            Ok(p.remove_scope(&name)?)
        })
        .map_err(|e| e.respond(OP))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Move a VM to another scope. The middleware checked `auth.scope.set` in the VM's
/// current scope; moving it also needs the operation in the destination (Hyper-V's
/// "change VM authorization scope" on both sides), else anyone could push a VM into
/// a scope they control.
async fn vm_scope_set(
    State(c): State<Ctx>,
    caller: Caller,
    crate::api::VmId(id): crate::api::VmId,
    crate::api::ReqBody(b): crate::api::ReqBody,
) -> R {
    const OP: &str = "auth.scope.set";
    let req: SetScopeRequest = parse(&b).map_err(|e| e.respond(OP))?;
    if !c.auth.read(|p| p.scopes.contains(&req.scope)) {
        return Err(AuthError::Authz(AuthzError::UnknownScope(req.scope)).respond(OP));
    }
    caller.check_scope(&req.scope).map_err(|e| e.respond(OP))?;
    c.auth
        .mutate(|p| Ok(p.set_scope(&id.to_string(), &req.scope)?))
        .map_err(|e| e.respond(OP))?;
    let mut r = Json(VmScope {
        vm_id: id,
        scope: req.scope.clone(),
    })
    .into_response();
    r.extensions_mut()
        .insert(AuditTarget(format!("vm:{id} -> scope:{}", req.scope)));
    Ok(r)
}

fn parse_principal(s: &str, p: &Policy) -> Result<Principal, AuthError> {
    let bad = AuthError::BadRequest;
    match s.split_once(':') {
        Some(("uid", n)) => n
            .parse()
            .map(|uid| Principal::Unix { uid })
            .map_err(|_| bad(format!("bad uid in {s:?}"))),
        Some(("user", name)) => match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(Principal::Unix {
                uid: u.uid.as_raw(),
            }),
            _ => Err(AuthError::NotFound(format!("no local user {name:?}"))),
        },
        Some(("token", id)) => {
            if p.tokens.contains_key(id) {
                Ok(Principal::Token { id: id.to_string() })
            } else {
                Err(AuthError::NotFound(format!("no token {id:?}")))
            }
        }
        _ => Err(bad(format!(
            "principal {s:?}: expected uid:N, user:NAME or token:ID"
        ))),
    }
}

fn assignment_view(auth: &Auth, a: &fv_authz::Assignment) -> AssignmentView {
    AssignmentView {
        principal: a.principal.to_string(),
        principal_name: auth.principal_name(&a.principal),
        role: a.role.clone(),
        scope: a.scope.clone(),
    }
}

async fn assignment_list(State(c): State<Ctx>) -> R {
    let all: Vec<fv_authz::Assignment> = c.auth.read(|p| p.assignments.iter().cloned().collect());
    let v: Vec<AssignmentView> = all.iter().map(|a| assignment_view(&c.auth, a)).collect();
    Ok(Json(v).into_response())
}

async fn assignment_create(State(c): State<Ctx>, crate::api::ReqBody(b): crate::api::ReqBody) -> R {
    const OP: &str = "auth.assignment.create";
    let req: NewAssignmentRequest = parse(&b).map_err(|e| e.respond(OP))?;
    let principal = c
        .auth
        .read(|p| parse_principal(&req.principal, p))
        .map_err(|e| e.respond(OP))?;
    c.auth
        .mutate(|p| Ok(p.assign(principal.clone(), &req.role, &req.scope)?))
        .map_err(|e| e.respond(OP))?;
    let a = fv_authz::Assignment {
        principal,
        role: req.role,
        scope: req.scope,
    };
    let v = assignment_view(&c.auth, &a);
    let t = format!("{} {} in {}", v.principal, v.role, v.scope);
    Ok(created(&v, t))
}

#[derive(Deserialize)]
struct AssignmentQ {
    principal: Option<String>,
    role: Option<String>,
    scope: Option<String>,
}

async fn assignment_delete(State(c): State<Ctx>, Query(q): Query<AssignmentQ>) -> R {
    const OP: &str = "auth.assignment.delete";
    let (Some(pr), Some(role), Some(scope)) = (q.principal, q.role, q.scope) else {
        return Err(AuthError::BadRequest(
            "give ?principal=...&role=...&scope=... of the assignment to remove".into(),
        )
        .respond(OP));
    };
    let principal = c
        .auth
        .read(|p| parse_principal(&pr, p))
        .map_err(|e| e.respond(OP))?;
    let a = fv_authz::Assignment {
        principal,
        role,
        scope,
    };
    let removed = c
        .auth
        .mutate(|p| Ok(p.unassign(&a)))
        .map_err(|e| e.respond(OP))?;
    if !removed {
        return Err(AuthError::NotFound(format!(
            "no assignment of {} to {} in {}",
            a.principal, a.role, a.scope
        ))
        .respond(OP));
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.extensions_mut().insert(AuditTarget(format!(
        "{} {} in {}",
        a.principal, a.role, a.scope
    )));
    Ok(r)
}

fn token_view(t: &fv_authz::Token, now: u64) -> TokenView {
    TokenView {
        id: t.id.clone(),
        name: t.name.clone(),
        created: rfc3339_secs(t.created_at),
        expires: t.expires_at.map(rfc3339_secs),
        revoked: t.revoked,
        expired: t.expires_at.is_some_and(|e| now >= e),
    }
}

async fn token_list(State(c): State<Ctx>) -> R {
    let now = unix_now();
    let v: Vec<TokenView> = c
        .auth
        .read(|p| p.tokens.values().map(|t| token_view(t, now)).collect());
    Ok(Json(v).into_response())
}

async fn token_create(State(c): State<Ctx>, crate::api::ReqBody(b): crate::api::ReqBody) -> R {
    const OP: &str = "auth.token.create";
    let req: NewTokenRequest = parse(&b).map_err(|e| e.respond(OP))?;
    valid_name("token", &req.name).map_err(|e| e.respond(OP))?;
    let now = unix_now();
    if req.expires_in_s.is_some_and(|s| s > MAX_TOKEN_LIFETIME_S) {
        return Err(AuthError::BadRequest(format!(
            "expires_in_s: at most {MAX_TOKEN_LIFETIME_S} seconds (100 years)"
        ))
        .respond(OP));
    }
    let expires_at = match req.expires_in_s {
        Some(s) => Some(now.checked_add(s).ok_or_else(|| {
            AuthError::BadRequest("expires_in_s is too large".into()).respond(OP)
        })?),
        None => None,
    };
    let token = c
        .auth
        .mutate(|p| Ok(p.create_token(&req.name, expires_at, now)))
        .map_err(|e| e.respond(OP))?;
    let id = token.split('.').next().unwrap_or_default().to_string();
    let v = NewTokenResponse {
        id: id.clone(),
        name: req.name,
        expires: expires_at.map(rfc3339_secs),
        token,
    };
    Ok(created(&v, format!("token:{id}")))
}

async fn token_revoke(State(c): State<Ctx>, Path(id): Path<String>) -> R {
    const OP: &str = "auth.token.revoke";
    let t = c
        .auth
        .mutate(|p| {
            if !p.revoke_token(&id) {
                return Err(AuthError::NotFound(format!("no token {id:?}")));
            }
            Ok(p.tokens.get(&id).cloned())
        })
        .map_err(|e| e.respond(OP))?;
    match t {
        Some(t) => Ok(Json(token_view(&t, unix_now())).into_response()),
        None => Err(AuthError::NotFound(format!("no token {id:?}")).respond(OP)),
    }
}

async fn settings_view(State(c): State<Ctx>) -> R {
    let v = AuthSettings {
        root_is_admin: c.auth.read(|p| p.root_is_admin),
    };
    Ok(Json(v).into_response())
}

async fn settings_set(State(c): State<Ctx>, crate::api::ReqBody(b): crate::api::ReqBody) -> R {
    const OP: &str = "auth.settings.set";
    let req: AuthSettingsPatch = parse(&b).map_err(|e| e.respond(OP))?;
    let v = c
        .auth
        .mutate(|p| {
            if let Some(on) = req.root_is_admin {
                let other_admin = p.assignments.iter().any(|a| {
                    a.role == fv_authz::ADMINISTRATOR
                        && a.scope == GLOBAL_SCOPE
                        && a.principal != (Principal::Unix { uid: 0 })
                });
                if !on && !other_admin {
                    return Err(AuthError::Conflict(
                        "root_is_admin stays on until another principal holds Administrator in scope *"
                            .into(),
                    ));
                }
                p.root_is_admin = on;
            }
            Ok(AuthSettings {
                root_is_admin: p.root_is_admin,
            })
        })
        .map_err(|e| e.respond(OP))?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct AuditQ {
    since: Option<i64>,
    limit: Option<u32>,
}

async fn audit_list(State(c): State<Ctx>, Query(q): Query<AuditQ>) -> R {
    const OP: &str = "audit.view";
    let v = c
        .auth
        .store
        .audit(q.since, q.limit.unwrap_or(1000).min(100_000))
        .map_err(|e| AuthError::Store(e).respond(OP))?;
    Ok(Json(v).into_response())
}

/// The `/auth` and `/audit` routes (their operations are in [`OPERATIONS`]).
pub fn routes(ctx: Ctx) -> Router {
    Router::new()
        .route("/auth/roles", get(role_list).post(role_create))
        .route("/auth/roles/{role}", get(role_view_h).delete(role_delete))
        .route("/auth/scopes", get(scope_list).post(scope_create))
        .route("/auth/scopes/{scope}", axum::routing::delete(scope_delete))
        .route("/vms/{id}/scope", put(vm_scope_set))
        .route(
            "/auth/assignments",
            get(assignment_list)
                .post(assignment_create)
                .delete(assignment_delete),
        )
        .route("/auth/tokens", get(token_list).post(token_create))
        .route("/auth/tokens/{token}/revoke", post(token_revoke))
        .route("/auth/settings", get(settings_view).patch(settings_set))
        .route("/audit", get(audit_list))
        .with_state(ctx)
}

/// Wrap the whole API (all routes already added) in the enforcement layer.
pub fn protect(app: Router, ctx: Ctx) -> Router {
    app.merge(routes(ctx.clone()))
        .route_layer(axum::middleware::from_fn_with_state(ctx, enforce))
}
