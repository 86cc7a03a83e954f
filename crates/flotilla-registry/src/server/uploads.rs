//! Blob uploads: monolithic (`POST ?digest=`), chunked (`POST`, `PATCH`…, `PUT ?digest=`),
//! resumable (`GET` status → `Range`), cancellable (`DELETE`), and cross-repository mounts
//! (`POST ?mount=<digest>&from=<repo>`).
//!
//! A session is one file `<uploads>/<id>`; its length is the upload's offset.

use super::{append_body, blocking, respond, RegistryState, Req};
use crate::digest::check_digest;
use crate::error::{ErrorCode, IoContext, RegistryError, Result};
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use std::path::PathBuf;

fn session_path(st: &RegistryState, id: &str) -> Result<PathBuf> {
    let ok = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(unknown(id));
    }
    Ok(st.uploads.join(id))
}

fn unknown(id: &str) -> RegistryError {
    RegistryError::dist(
        ErrorCode::BlobUploadUnknown,
        format!("upload {id} is unknown (start a new upload with POST)"),
    )
}

fn new_id() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| RegistryError::Invalid("no randomness for an upload id".into()))?;
    Ok(hex::encode(b))
}

fn range(len: u64) -> String {
    format!("0-{}", len.saturating_sub(1))
}

async fn session_len(st: &RegistryState, id: &str) -> Result<(PathBuf, u64)> {
    let p = session_path(st, id)?;
    match tokio::fs::metadata(&p).await {
        Ok(m) => Ok((p, m.len())),
        Err(_) => Err(unknown(id)),
    }
}

fn accepted(name: &str, id: &str, len: u64) -> Result<Response> {
    respond(
        StatusCode::ACCEPTED,
        &[
            ("location", format!("/v2/{name}/blobs/uploads/{id}")),
            ("range", range(len)),
            ("docker-upload-uuid", id.to_string()),
            ("content-length", "0".into()),
        ],
        Body::empty(),
    )
}

fn created(name: &str, digest: &str) -> Result<Response> {
    respond(
        StatusCode::CREATED,
        &[
            ("location", format!("/v2/{name}/blobs/{digest}")),
            ("docker-content-digest", digest.to_string()),
            ("content-length", "0".into()),
        ],
        Body::empty(),
    )
}

/// Verifies a finished upload file against `digest` and moves it into the store.
async fn commit(st: &RegistryState, path: PathBuf, digest: &str) -> Result<()> {
    let store = st.store.clone();
    let d = digest.to_string();
    let p = path.clone();
    let res = blocking(move || {
        let f = std::fs::File::open(&p).ctx(|| format!("open {}", p.display()))?;
        store.put_blob(Some(&d), f)?;
        Ok(())
    })
    .await;
    let _ = tokio::fs::remove_file(&path).await;
    res.map_err(|e| match e.code() {
        Some(ErrorCode::DigestInvalid) => RegistryError::dist(
            ErrorCode::DigestInvalid,
            format!("uploaded content does not match digest {digest} (upload it again)"),
        ),
        _ => e,
    })
}

pub(super) async fn start(
    st: &RegistryState,
    name: &str,
    req: Req,
    body: Body,
) -> Result<Response> {
    if let Some(m) = req.query.get("mount") {
        check_digest(m)?;
        // Blobs are shared by every repository of this registry: a mount succeeds whenever
        // the blob is present (here or at a peer).
        if st.ensure_blob(m, req.allow_peer()).await? {
            tracing::debug!(repo = name, digest = %m, from = ?req.query.get("from"), "blob mounted");
            return created(name, m);
        }
    }
    if let Some(d) = req.query.get("digest") {
        check_digest(d)?;
        let d = d.clone();
        let tmp = st.uploads.join(new_id()?);
        if let Err(e) = append_body(body, &tmp).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        commit(st, tmp, &d).await?;
        tracing::debug!(repo = name, digest = %d, "blob uploaded (monolithic)");
        return created(name, &d);
    }
    let id = new_id()?;
    let p = st.uploads.join(&id);
    tokio::fs::write(&p, b"")
        .await
        .ctx(|| format!("create {}", p.display()))?;
    tracing::debug!(repo = name, upload = %id, "upload started");
    accepted(name, &id, 0)
}

/// `Content-Range: <start>-<end>` (also accepts the `bytes ` prefix).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim().trim_start_matches("bytes").trim();
    let v = v.split('/').next().unwrap_or(v);
    let (a, b) = v.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

pub(super) async fn patch(
    st: &RegistryState,
    name: &str,
    id: &str,
    req: Req,
    body: Body,
) -> Result<Response> {
    let (p, len) = session_len(st, id).await?;
    let want = match req.header("content-range") {
        Some(v) => {
            let (a, b) = parse_content_range(v).ok_or_else(|| {
                RegistryError::dist(
                    ErrorCode::BlobUploadInvalid,
                    format!("bad Content-Range {v}: use <start>-<end>"),
                )
            })?;
            if a != len || b < a {
                return Err(RegistryError::dist(
                    ErrorCode::RangeInvalid,
                    format!(
                        "chunk {a}-{b} does not continue the upload at offset {len} (GET the upload for its Range and resume there)"
                    ),
                ));
            }
            Some(b - a + 1)
        }
        None => None,
    };
    let wrote = append_body(body, &p).await;
    let wrote = match wrote {
        Ok(n) => n,
        Err(e) => {
            truncate(&p, len).await;
            return Err(e);
        }
    };
    if let Some(w) = want {
        if w != wrote {
            truncate(&p, len).await;
            return Err(RegistryError::dist(
                ErrorCode::SizeInvalid,
                format!("chunk has {wrote} bytes but Content-Range announced {w}"),
            ));
        }
    }
    accepted(name, id, len + wrote)
}

async fn truncate(p: &std::path::Path, len: u64) {
    if let Ok(f) = tokio::fs::OpenOptions::new().write(true).open(p).await {
        let _ = f.set_len(len).await;
    }
}

pub(super) async fn finish(
    st: &RegistryState,
    name: &str,
    id: &str,
    req: Req,
    body: Body,
) -> Result<Response> {
    let (p, _) = session_len(st, id).await?;
    let digest = req.query.get("digest").cloned().ok_or_else(|| {
        RegistryError::dist(
            ErrorCode::DigestInvalid,
            "finishing an upload needs ?digest=sha256:<hex>",
        )
    })?;
    check_digest(&digest)?;
    append_body(body, &p).await?;
    commit(st, p, &digest).await?;
    tracing::debug!(repo = name, upload = %id, %digest, "upload finished");
    created(name, &digest)
}

pub(super) async fn status(st: &RegistryState, name: &str, id: &str) -> Result<Response> {
    let (_, len) = session_len(st, id).await?;
    let mut r = accepted(name, id, len)?;
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

pub(super) async fn cancel(st: &RegistryState, id: &str) -> Result<Response> {
    let (p, _) = session_len(st, id).await?;
    tokio::fs::remove_file(&p)
        .await
        .ctx(|| format!("remove {}", p.display()))?;
    respond(StatusCode::NO_CONTENT, &[], Body::empty())
}
