//! Images in this node's content store: `flotilla image import|load|ls|inspect|rm`, signature
//! attachment and pruning. (Distribution between nodes goes through the managers' OCI
//! registry.) The store is read and written on the blocking pool.

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::{Semaphore, SemaphorePermit};

use flotilla_runtime::ImageConfigInput;

use flotilla_api::{json_ok, ApiError};
use flotilla_registry::TrustCheck;

use crate::{blocking, AgentCtx};

type Ctx = std::sync::Arc<AgentCtx>;

fn runtime(ctx: &Ctx) -> Result<flotilla_runtime::Runtime, ApiError> {
    Ok(ctx.runtime.clone())
}

fn worker_err(e: tokio::task::JoinError) -> ApiError {
    ApiError::internal(e.to_string())
}

fn rt_err(e: flotilla_runtime::RuntimeError) -> ApiError {
    match e {
        flotilla_runtime::RuntimeError::ImageNotFound(_) => ApiError::not_found(e.to_string()),
        flotilla_runtime::RuntimeError::ImageInUse { .. } => ApiError::conflict(e.to_string()),
        other => ApiError::bad_request(other.to_string()),
    }
}

/// The largest `image import`/`image load` upload (4 GiB).
pub const UPLOAD_LIMIT: u64 = 4 << 30;

/// An upload that sends nothing for this long is given up (408).
const UPLOAD_STALL: Duration = Duration::from_secs(60);

/// Uploads processed at once on this node; more are refused with 503 (each holds a file of
/// up to [`UPLOAD_LIMIT`] in the data directory and a core while it is imported).
pub const MAX_UPLOADS: usize = 2;

/// Slots for concurrent uploads.
pub struct UploadSlots(Semaphore);

impl UploadSlots {
    pub const fn new(n: usize) -> UploadSlots {
        UploadSlots(Semaphore::const_new(n))
    }

    /// A slot, or 503 when all are taken.
    pub(crate) fn try_take(&self) -> Result<SemaphorePermit<'_>, ApiError> {
        self.0.try_acquire().map_err(|_| {
            ApiError::unavailable(format!(
                "{MAX_UPLOADS} image uploads are already running on this node: retry when one finishes"
            ))
        })
    }
}

/// A file the upload is streamed to, in the store's directory; removed on drop (which happens
/// on the blocking pool: with the import, or through [`TempPath::discard`]).
pub(crate) struct TempPath(pub(crate) PathBuf);

impl TempPath {
    /// Removes the file off the async threads.
    fn discard(self) {
        drop(blocking(move || drop(self)));
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams an uploaded body to a temporary file in the store's directory, bounded by
/// [`UPLOAD_LIMIT`]; refuses an empty one with `empty`.
pub(crate) async fn spill(
    rt: &flotilla_runtime::Runtime,
    req: Request,
    empty: &str,
) -> Result<TempPath, ApiError> {
    let (parts, body) = req.into_parts();
    let dir = rt.config().root.join("uploads");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let tmp = TempPath(dir.join(format!("upload-{}", flotilla_types::new_id())));
    let spooled =
        flotilla_api::body::spool(&parts.headers, body, UPLOAD_LIMIT, UPLOAD_STALL, &tmp.0).await;
    match spooled {
        Ok(0) => {
            tmp.discard();
            Err(ApiError::bad_request(empty))
        }
        Ok(_) => Ok(tmp),
        Err(e) => {
            tmp.discard();
            Err(e)
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

/// Unpacks an image's layers in the background, but only once the node's trust policy
/// accepts the image: import and load only store the (digest-verified) content, so that
/// unsigned bytes never reach the layer unpacker while signatures are enforced. An image
/// left packed here is unpacked by its first container create, after the agent's check.
fn unpack_if_trusted(ctx: &Ctx, rt: flotilla_runtime::Runtime, reference: String, digest: String) {
    let policy = ctx.images.policy();
    // Left to finish on its own.
    drop(blocking(move || {
        if let Err(e) = policy.verify(rt.images(), &reference, &digest) {
            tracing::debug!(%reference, %digest, error = %e, "image left packed until it is trusted");
            return;
        }
        if let Err(e) = rt.prepare_image(&digest) {
            tracing::warn!(%digest, error = %e, "unpacking the image's layers failed; the first container start retries");
        }
    }));
}

/// What `import` checks before it reads the upload: the name must be a reference services,
/// pulls and pushes can use later, and the config must parse.
fn import_checks(q: &ImportQuery) -> Result<ImageConfigInput, ApiError> {
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
    let input: ImageConfigInput = match &q.config {
        Some(c) => {
            serde_json::from_str(c).map_err(|e| ApiError::bad_request(format!("config: {e}")))?
        }
        None => ImageConfigInput::default(),
    };
    if let Some(sig) = &input.stop_signal {
        flotilla_types::parse_signal(sig).map_err(ApiError::bad_request)?;
    }
    Ok(input)
}

/// `POST /v1/images/import?name=REF&config=JSON`, body: a tar of the root filesystem.
pub async fn import(
    State(ctx): State<Ctx>,
    Query(q): Query<ImportQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    let checked = import_checks(&q).and_then(|input| Ok((input, ctx.uploads.try_take()?)));
    let (input, _slot) = match checked {
        Ok(c) => c,
        Err(e) => return Err(flotilla_api::body::refuse_unread(req, e).await),
    };
    let tmp = spill(&rt, req, "empty upload: send a tar of the root filesystem").await?;
    let name = q.name.clone();
    let store = rt.clone();
    let digest = blocking(move || {
        let r = store.images().import_rootfs(&tmp.0, &name, &input);
        drop(tmp);
        r
    })
    .await
    .map_err(worker_err)?
    .map_err(rt_err)?;
    unpack_if_trusted(&ctx, rt, q.name.clone(), digest.clone());
    Ok(json_ok(
        &serde_json::json!({"name": q.name, "digest": digest}),
    ))
}

/// `POST /v1/images/load`, body: a `docker save` or OCI archive.
pub async fn load(State(ctx): State<Ctx>, req: Request) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    let _slot = match ctx.uploads.try_take() {
        Ok(s) => s,
        Err(e) => return Err(flotilla_api::body::refuse_unread(req, e).await),
    };
    let tmp = spill(
        &rt,
        req,
        "empty upload: send a `docker save` or OCI archive",
    )
    .await?;
    let store = rt.clone();
    let loaded = blocking(move || {
        let r = store.images().load_archive(&tmp.0);
        drop(tmp);
        r
    })
    .await
    .map_err(worker_err)?
    .map_err(rt_err)?;
    for (r, d) in &loaded {
        unpack_if_trusted(&ctx, rt.clone(), r.clone(), d.clone());
    }
    let out: Vec<serde_json::Value> = loaded
        .into_iter()
        .map(|(r, d)| serde_json::json!({"name": r, "digest": d}))
        .collect();
    Ok(json_ok(&out))
}

/// `GET /v1/images`.
pub async fn list(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    let images = blocking(move || rt.images().list())
        .await
        .map_err(worker_err)?
        .map_err(rt_err)?;
    Ok(json_ok(&images))
}

/// `GET /v1/images/{ref}`.
pub async fn inspect(State(ctx): State<Ctx>, Path(r): Path<String>) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    let image = blocking(move || rt.images().inspect(&r))
        .await
        .map_err(worker_err)?
        .map_err(rt_err)?;
    Ok(json_ok(&image))
}

/// `DELETE /v1/images/{ref}`.
pub async fn remove(State(ctx): State<Ctx>, Path(r): Path<String>) -> Result<Response, ApiError> {
    let rt = runtime(&ctx)?;
    let reference = r.clone();
    let freed = blocking(move || rt.remove_image(&reference))
        .await
        .map_err(worker_err)?
        .map_err(rt_err)?;
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
    let present = {
        let (rt, digest) = (rt.clone(), digest.clone());
        blocking(move || rt.images().manifest(&digest).is_ok())
            .await
            .map_err(worker_err)?
    };
    if !present {
        return Err(ApiError::not_found(format!(
            "image {digest} is not on this node: sign an image the node holds (`flotilla image ls`)"
        )));
    }
    let repository = req.repository;
    let reference = repository.clone();
    let store = rt.clone();
    let stored =
        blocking(move || flotilla_registry::attach_signature(store.images(), &repository, &sig))
            .await
            .map_err(worker_err)?
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    // A trusted signature was what the image waited for to be unpacked (see `import`).
    unpack_if_trusted(&ctx, rt, format!("{reference}@{digest}"), digest.clone());
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
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_ok(&report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_third_upload_is_refused_with_503_until_a_slot_is_free() {
        let slots = UploadSlots::new(2);
        let a = slots.try_take();
        let b = slots.try_take();
        assert!(a.is_ok() && b.is_ok());
        let Err(e) = slots.try_take() else {
            panic!("a third upload got a slot")
        };
        assert_eq!(e.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.contains("retry"), "{}", e.message);
        drop(a);
        assert!(slots.try_take().is_ok());
    }
}
