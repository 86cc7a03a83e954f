use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use flotilla_store::RpcKind;

use super::Ctx;
use crate::error::ApiError;

/// `POST /internal/raft/{append|vote|snapshot}` from another manager.
pub async fn rpc(
    State(ctx): State<Ctx>,
    Path(kind): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mgr = ctx.manager()?;
    let kind: RpcKind = kind
        .parse()
        .map_err(|e: flotilla_store::StoreError| ApiError::bad_request(e.to_string()))?;
    let out = mgr.store.handle_rpc(kind, &body).await?;
    Ok(out.into_response())
}
