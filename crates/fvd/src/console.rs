//! The serial console through the API (Hyper-V's VM connection): an HTTP/1.1
//! upgrade to a raw byte stream relayed to the VM's COM port socket. Going through
//! fvd instead of the worker's socket is what lets authorization decide who may
//! watch (`vm.console.output`, GET) and who may also type (`vm.console.input`,
//! POST), for local users and token holders alike, and it is what a web console
//! will use later.
use crate::api::ApiError;
use crate::manager::{Manager, MgrError};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fv_model::VmState;
use std::sync::Arc;
use uuid::Uuid;

/// The protocol name in `Upgrade:`; the stream after the 101 is raw console bytes.
pub const UPGRADE_PROTOCOL: &str = "fv-console";

/// Relay one client to COM`port` of VM `id`. `input` = the client may type.
pub async fn open(
    m: Arc<Manager>,
    id: Uuid,
    port: usize,
    input: bool,
    req: Request,
    op: &'static str,
) -> Result<Response, ApiError> {
    let fail = |e: MgrError| crate::api::err(op)(e);
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    if !wants {
        return Err(fail(MgrError::BadRequest(format!(
            "the console is a byte stream: send `Connection: Upgrade` and `Upgrade: {UPGRADE_PROTOCOL}`"
        ))));
    }
    let view = m.view(id).await.map_err(fail)?;
    if !matches!(view.state, VmState::Running | VmState::Paused) {
        return Err(fail(MgrError::InvalidState {
            message: format!(
                "cannot open the console of VM {}: it is {}",
                view.name, view.state
            ),
            state: view.state,
        }));
    }
    let path = view
        .com_sockets
        .get(port.wrapping_sub(1))
        .cloned()
        .flatten()
        .ok_or_else(|| {
            fail(MgrError::NotFound(format!(
                "VM {} has no COM{port}",
                view.name
            )))
        })?;
    // Connect before answering 101, so a failure is still an HTTP error.
    let vm_side = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        fail(MgrError::Conflict(format!(
            "COM{port} of {} is not reachable ({e}); another console may hold it",
            view.name
        )))
    })?;
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(client) = upgrade.await else { return };
        let client = hyper_util::rt::TokioIo::new(client);
        let (mut vm_rd, mut vm_wr) = vm_side.into_split();
        let (mut c_rd, mut c_wr) = tokio::io::split(client);
        // Either side closing ends the session (and frees the COM port, which QEMU
        // serves to one client at a time). Watch-only sessions read the client too,
        // to notice it leaving, but drop what it sends: it is never typed.
        let to_vm = async {
            if input {
                tokio::io::copy(&mut c_rd, &mut vm_wr).await
            } else {
                tokio::io::copy(&mut c_rd, &mut tokio::io::sink()).await
            }
        };
        tokio::select! {
            _ = tokio::io::copy(&mut vm_rd, &mut c_wr) => {}
            _ = to_vm => {}
        }
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    Ok(r.into_response())
}
