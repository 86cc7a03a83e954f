//! `GET`/`HEAD /v2/<name>/blobs/<digest>`.

use super::{file_body, respond, RegistryState, Req};
use crate::digest::check_digest;
use crate::error::{ErrorCode, IoContext, RegistryError, Result};
use axum::body::Body;
use axum::http::{Method, StatusCode};
use axum::response::Response;

pub(super) async fn get(
    st: &RegistryState,
    name: &str,
    digest: &str,
    req: &Req,
) -> Result<Response> {
    check_digest(digest)?;
    if !st.ensure_blob(digest, req.allow_peer()).await? {
        return Err(RegistryError::dist(
            ErrorCode::BlobUnknown,
            format!("blob {digest} is unknown to the registry (push it first)"),
        ));
    }
    let path = st.meta.blob_file(&st.store, digest).ok_or_else(|| {
        RegistryError::dist(ErrorCode::BlobUnknown, format!("blob {digest} vanished"))
    })?;
    let file = tokio::fs::File::open(&path)
        .await
        .ctx(|| format!("open {}", path.display()))?;
    let len = file
        .metadata()
        .await
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    tracing::debug!(repo = name, %digest, size = len, "serving blob");
    let headers = [
        ("content-type", "application/octet-stream".to_string()),
        ("content-length", len.to_string()),
        ("docker-content-digest", digest.to_string()),
        ("etag", format!("\"{digest}\"")),
    ];
    let body = if req.method == Method::HEAD {
        Body::empty()
    } else {
        file_body(file)
    };
    respond(StatusCode::OK, &headers, body)
}
