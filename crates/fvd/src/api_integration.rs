//! API handlers of the integration services: freeze/thaw/freeze status and copy-file.
//! A child module of `api` (shares its error and job helpers).

use super::{bad, body, err, job_response, R, S};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use fv_model::api::FreezeRequest;
use serde::Deserialize;

pub(super) async fn vm_freeze(
    State(m): S,
    super::VmId(id): super::VmId,
    b: axum::body::Bytes,
) -> R {
    const OP: &str = "vm.freeze";
    let req: FreezeRequest = body(OP, &b, true)?;
    Ok(Json(m.freeze(id, req.timeout_s).await.map_err(err(OP))?).into_response())
}

pub(super) async fn vm_thaw(State(m): S, super::VmId(id): super::VmId) -> R {
    const OP: &str = "vm.thaw";
    Ok(Json(m.thaw(id).await.map_err(err(OP))?).into_response())
}

pub(super) async fn vm_freeze_status(State(m): S, super::VmId(id): super::VmId) -> R {
    const OP: &str = "vm.freeze_status";
    Ok(Json(m.freeze_status(id).await.map_err(err(OP))?).into_response())
}

#[derive(Deserialize)]
pub(super) struct CopyQ {
    dest: String,
    #[serde(default)]
    create_full_path: bool,
    #[serde(default)]
    overwrite: bool,
}

/// The body is the file's bytes (application/octet-stream), spooled by fvd into the
/// VM's runtime dir: fvd never reads a host path on the caller's behalf.
pub(super) async fn vm_copy_file(
    State(m): S,
    super::VmId(id): super::VmId,
    q: Result<Query<CopyQ>, QueryRejection>,
    headers: axum::http::HeaderMap,
    payload: axum::body::Body,
) -> R {
    const OP: &str = "vm.copy_file";
    let Query(q) = q.map_err(|e| bad(OP, format!("query: {e} (need ?dest=PATH)")))?;
    m.copy_file_check(id, &q.dest).map_err(err(OP))?;
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    let spool = m
        .copy_file_spool(id, len, payload.into_data_stream())
        .await
        .map_err(err(OP))?;
    let job = m
        .copy_file_start(id, spool, q.dest, q.create_full_path, q.overwrite)
        .map_err(err(OP))?;
    Ok(job_response(&job))
}
