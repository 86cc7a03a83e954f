//! The node's volumes as its managers see them (manager certificates only, see the policy):
//! `GET /v1/agent/volumes` (names, sizes, the containers holding them),
//! `DELETE /v1/agent/volumes/{name}` (refused while a container here holds it) and
//! `GET /v1/agent/volumes/{name}/export` (a tar stream) and
//! `POST /v1/agent/volumes/{name}/import` (a tar into a new or empty volume; the archive is
//! untrusted: `flotilla-volume` unpacks it confined to the volume).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::Response;

use flotilla_api::{json_ok, ApiError};
use flotilla_types::LocalVolumeInfo;

use crate::storage::{volumes_in_use, NodeStorage};
use crate::{blocking, AgentCtx};

fn storage(ctx: &AgentCtx) -> Result<Arc<NodeStorage>, ApiError> {
    ctx.storage
        .get()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("this node's volume store is not open (see its log)"))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    flotilla_volume::validate_name(name).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `GET /v1/agent/volumes`
pub async fn list(State(ctx): State<Arc<AgentCtx>>) -> Result<Response, ApiError> {
    let s = storage(&ctx)?;
    let in_use = volumes_in_use(&ctx.runtime).await;
    let out = blocking(move || {
        let vols = s
            .volumes
            .list()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok::<_, ApiError>(
            vols.into_iter()
                .map(|v| LocalVolumeInfo {
                    size_bytes: s.volumes.usage(&v.name).unwrap_or(0),
                    size_limit: v.size_limit,
                    in_use_by: in_use.get(&v.name).cloned().unwrap_or_default(),
                    name: v.name,
                })
                .collect::<Vec<_>>(),
        )
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(json_ok(&out))
}

/// `DELETE /v1/agent/volumes/{name}`
pub async fn remove(
    State(ctx): State<Arc<AgentCtx>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let s = storage(&ctx)?;
    let in_use = volumes_in_use(&ctx.runtime).await;
    if let Some(holders) = in_use.get(&name) {
        return Err(ApiError::conflict(format!(
            "volume {name} is mounted by {} on this node",
            holders.join(", ")
        )));
    }
    let n = name.clone();
    blocking(move || s.volumes.remove(&n))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| match e {
            flotilla_volume::VolumeError::NotFound(_) => ApiError::not_found(e.to_string()),
            other => ApiError::internal(other.to_string()),
        })?;
    tracing::info!(volume = %name, "volume removed");
    Ok(json_ok(&serde_json::json!({ "removed": name })))
}

/// A `Write` that hands the tar stream to the response body in 64 KiB chunks.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = bytes::Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 << 10 {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// `GET /v1/agent/volumes/{name}/export`: the volume as a tar stream (ids as the container
/// sees them). An error after the first bytes ends the stream early (the client's tar reader
/// then reports a truncated archive).
pub async fn export(
    State(ctx): State<Arc<AgentCtx>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let s = storage(&ctx)?;
    if s.volumes.get(&name).is_err() {
        return Err(ApiError::not_found(format!(
            "volume {name} is not on this node"
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let err_tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter {
            tx,
            buf: Vec::with_capacity(64 << 10),
        };
        let res = s
            .volumes
            .export(&name, &mut w)
            .map_err(|e| e.to_string())
            .and_then(|()| std::io::Write::flush(&mut w).map_err(|e| e.to_string()));
        if let Err(e) = res {
            tracing::warn!(volume = %name, error = %e, "volume export failed");
            let _ = err_tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "application/x-tar")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// `POST /v1/agent/volumes/{name}/import`: the body (a tar, at most the image upload limit)
/// is spooled to the data dir, then unpacked into the volume, created if needed and empty.
pub async fn import(
    State(ctx): State<Arc<AgentCtx>>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    if let Err(e) = check_name(&name) {
        return Err(flotilla_api::body::refuse_unread(req, e).await);
    }
    let s = match storage(&ctx) {
        Ok(s) => s,
        Err(e) => return Err(flotilla_api::body::refuse_unread(req, e).await),
    };
    if volumes_in_use(&ctx.runtime).await.contains_key(&name) {
        let e = ApiError::conflict(format!("volume {name} is mounted by a task on this node"));
        return Err(flotilla_api::body::refuse_unread(req, e).await);
    }
    let _slot = match ctx.uploads.try_take() {
        Ok(s) => s,
        Err(e) => return Err(flotilla_api::body::refuse_unread(req, e).await),
    };
    let tmp = crate::images::spill(&ctx.runtime, req, "empty upload: send a tar archive").await?;
    let n = name.clone();
    let res = blocking(move || {
        let spooled = |e| flotilla_volume::VolumeError::Io {
            context: "the spooled archive".into(),
            source: e,
        };
        // The archive's digest as received, for a sender that checks the copy (volume move).
        let digest = std::fs::File::open(&tmp.0)
            .and_then(|f| {
                let mut h = Sha256::new();
                let n = std::io::copy(&mut std::io::BufReader::new(f), &mut h)?;
                Ok((hex::encode(h.finalize()), n))
            })
            .map_err(spooled);
        let r = digest.and_then(|d| {
            std::fs::File::open(&tmp.0)
                .map_err(spooled)
                .and_then(|f| s.volumes.import(&n, std::io::BufReader::new(f)))
                .map(|v| (v, d))
        });
        drop(tmp);
        r
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    match res {
        Ok((v, (sha256, bytes))) => {
            tracing::info!(volume = %name, bytes, "volume imported");
            Ok(json_ok(&serde_json::json!({
                "imported": v.name,
                "sha256": sha256,
                "bytes": bytes,
            })))
        }
        Err(e @ flotilla_volume::VolumeError::NotEmpty(_)) => {
            Err(ApiError::conflict(e.to_string()))
        }
        Err(e @ flotilla_volume::VolumeError::Busy(_)) => Err(ApiError::conflict(e.to_string())),
        Err(e @ flotilla_volume::VolumeError::BadArchive(_)) => {
            Err(ApiError::bad_request(e.to_string()))
        }
        Err(e @ flotilla_volume::VolumeError::InvalidName { .. }) => {
            Err(ApiError::bad_request(e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}
