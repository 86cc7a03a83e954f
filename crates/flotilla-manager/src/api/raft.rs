//! The server side of the Raft RPCs between managers (`POST /internal/raft/{kind}`, manager
//! certificates of this Raft group only; [`crate::transport`] is the client side): the body
//! goes to the store as is and its answer comes back as is.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use flotilla_store::RpcKind;

use super::Ctx;
use crate::error::ManagerError;

/// `POST /internal/raft/{append|vote|snapshot}` from another manager.
pub async fn rpc(
    State(ctx): State<Ctx>,
    Path(kind): Path<String>,
    body: Bytes,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let kind: RpcKind = kind
        .parse()
        .map_err(|e: flotilla_store::StoreError| ManagerError::bad_request(e.to_string()))?;
    let out = mgr.store.handle_rpc(kind, &body).await?;
    Ok(out.into_response())
}
