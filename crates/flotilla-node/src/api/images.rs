//! Images in this node's content store: `flotilla image import|load|ls|inspect|rm`.
//! (Distribution between nodes goes through the managers' OCI registry.)

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;

use flotilla_runtime::ImageConfigInput;

use super::{json_ok, Ctx};
use crate::error::ApiError;

fn runtime(ctx: &Ctx) -> Result<flotilla_runtime::Runtime, ApiError> {
    ctx.runtime
        .clone()
        .ok_or_else(|| ApiError::unavailable("this node has no image store"))
}

fn rt_err(e: flotilla_runtime::RuntimeError) -> ApiError {
    match e {
        flotilla_runtime::RuntimeError::ImageNotFound(_) => ApiError::not_found(e.to_string()),
        flotilla_runtime::RuntimeError::ImageInUse { .. } => ApiError::conflict(e.to_string()),
        other => ApiError::bad_request(other.to_string()),
    }
}

/// Writes an uploaded body to a temporary file in the store's directory.
fn spill(rt: &flotilla_runtime::Runtime, body: &[u8]) -> Result<tempfile_path::TempPath, ApiError> {
    let dir = rt.config().root.join("uploads");
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
    let path = dir.join(format!("upload-{}", flotilla_types::new_id()));
    std::fs::write(&path, body).map_err(|e| ApiError::internal(format!("saving upload: {e}")))?;
    Ok(tempfile_path::TempPath(path))
}

mod tempfile_path {
    /// Removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ImportQuery {
    name: String,
    /// JSON of the image config fields (cmd, entrypoint, env, workdir, user).
    #[serde(default)]
    config: Option<String>,
}

/// Unpacks a stored image for its containers now rather than at the first start; a failure
/// is left for that start to report.
fn prepare(rt: &flotilla_runtime::Runtime, digest: &str) {
    if let Err(e) = rt.prepare_image(digest) {
        tracing::warn!(digest, error = %e, "unpacking the image's layers failed; the first container start retries");
    }
}

/// `POST /v1/images/import?name=REF&config=JSON`, body: a tar of the root filesystem.
pub async fn import(
    State(ctx): State<Ctx>,
    Query(q): Query<ImportQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    // The name must be a reference services, pulls and pushes can use later.
    match flotilla_registry::ImageRef::parse(&q.name) {
        Ok(r) if r.digest.is_none() => {}
        _ => {
            return Err(ApiError::bad_request(format!(
                "image name {:?} is invalid: use NAME[:TAG], NAME in lowercase letters, digits, \
                 '.', '_', '-' and '/' (e.g. web or team/web:1.2)",
                q.name
            )))
        }
    }
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "empty upload: send a tar of the root filesystem",
        ));
    }
    let input: ImageConfigInput = match &q.config {
        Some(c) => {
            serde_json::from_str(c).map_err(|e| ApiError::bad_request(format!("config: {e}")))?
        }
        None => ImageConfigInput::default(),
    };
    let tmp = spill(&rt, &body)?;
    let name = q.name.clone();
    let digest = tokio::task::spawn_blocking(move || {
        let r = rt.images().import_rootfs(&tmp.0, &name, &input);
        drop(tmp);
        if let Ok(d) = &r {
            prepare(&rt, d);
        }
        r
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(rt_err)?;
    Ok(json_ok(
        &serde_json::json!({"name": q.name, "digest": digest}),
    ))
}

/// `POST /v1/images/load`, body: a `docker save` or OCI archive.
pub async fn load(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    let tmp = spill(&rt, &body)?;
    let loaded = tokio::task::spawn_blocking(move || {
        let r = rt.images().load_archive(&tmp.0);
        drop(tmp);
        if let Ok(images) = &r {
            for (_, d) in images {
                prepare(&rt, d);
            }
        }
        r
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(rt_err)?;
    let out: Vec<serde_json::Value> = loaded
        .into_iter()
        .map(|(r, d)| serde_json::json!({"name": r, "digest": d}))
        .collect();
    Ok(json_ok(&out))
}

pub async fn list(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    Ok(json_ok(&rt.images().list().map_err(rt_err)?))
}

pub async fn inspect(State(ctx): State<Ctx>, Path(r): Path<String>) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    Ok(json_ok(&rt.images().inspect(&r).map_err(rt_err)?))
}

pub async fn remove(State(ctx): State<Ctx>, Path(r): Path<String>) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    let freed = rt.remove_image(&r).map_err(rt_err)?;
    Ok(json_ok(&serde_json::json!({"removed": r, "freed": freed})))
}

/// Body of `POST /v1/images/signatures`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachSignature {
    /// Repository of the image (`name` of `name:tag`); the signature is tagged
    /// `sha256-<hex>.sig` there.
    pub repository: String,
    pub signature: flotilla_registry::Signature,
}

/// `POST /v1/images/signatures`: attaches a signature (made by the client, which holds the
/// private key) to an image in this node's store. It is stored as is: agents decide whether
/// it verifies under a trusted key.
pub async fn attach_signature(
    State(ctx): State<Ctx>,
    axum::Json(req): axum::Json<AttachSignature>,
) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    let sig = req.signature;
    let digest = sig
        .manifest_digest()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if rt.images().manifest(&digest).is_err() {
        return Err(ApiError::not_found(format!(
            "image {digest} is not on this node: sign an image the node holds (`flotilla image ls`)"
        )));
    }
    let repository = req.repository;
    let stored = tokio::task::spawn_blocking(move || {
        flotilla_registry::attach_signature(rt.images(), &repository, &sig)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(json_ok(
        &serde_json::json!({"image": digest, "signature": stored}),
    ))
}

#[derive(Debug, Deserialize)]
pub struct PruneQuery {
    /// Spare blobs younger than this (humantime, default 10m: uploads in flight).
    #[serde(default)]
    grace: Option<String>,
}

/// `POST /v1/images/prune?grace=10m`: image garbage collection on this node now.
pub async fn prune(
    State(ctx): State<Ctx>,
    Query(q): Query<PruneQuery>,
) -> Result<Response, ApiError> {
    let grace = match q.grace.as_deref() {
        Some(g) => humantime::parse_duration(g)
            .map_err(|e| ApiError::bad_request(format!("grace {g:?}: {e} (e.g. 0s, 10m)")))?,
        None => flotilla_registry::GcOptions::default().min_age,
    };
    let report = crate::gc::prune(&ctx, grace)
        .await
        .map_err(ApiError::internal)?;
    Ok(json_ok(&report))
}
