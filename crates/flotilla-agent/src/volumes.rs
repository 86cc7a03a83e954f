//! The node's volumes as its managers see them (manager certificates only, see the policy):
//! `GET /v1/agent/volumes` (names, sizes, the containers holding them),
//! `DELETE /v1/agent/volumes/{name}` (refused while a container here holds it) and
//! `GET /v1/agent/volumes/{name}/export` (a tar stream; `?pass=first|final` for the two
//! passes of a move), `POST /v1/agent/volumes/{name}/import` (a tar into a new or empty
//! volume, or a move's final delta onto the copy its first pass left; the stream is
//! untrusted: `flotilla-volume` unpacks it confined to the volume) and
//! `GET /v1/agent/volumes/{name}/tree` (a digest of the tree, to check a move).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
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

/// The size of the chunks an export hands to the response body, and of an import's reads.
const CHUNK: usize = 256 << 10;

/// A `Write` that hands the tar stream to the response body in [`CHUNK`]s.
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
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Which pass of a move an export or import is (`?pass=first|final`); none: a plain export
/// or import.
#[derive(Debug, Default, serde::Deserialize)]
pub struct PassQuery {
    #[serde(default)]
    pass: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Plain,
    First,
    Final,
}

fn pass_of(q: &PassQuery) -> Result<Pass, ApiError> {
    match q.pass.as_deref() {
        None => Ok(Pass::Plain),
        Some("first") => Ok(Pass::First),
        Some("final") => Ok(Pass::Final),
        Some(other) => Err(ApiError::bad_request(format!(
            "pass {other:?}: give first or final"
        ))),
    }
}

/// `GET /v1/agent/volumes/{name}/export[?pass=first|final]`: the volume as a tar stream (ids
/// as the container sees them). `pass=first` also keeps a snapshot of what was read (works
/// while a container writes the volume); `pass=final` sends only what changed since, as a
/// delta stream (`flotilla_volume::delta`), and is refused while a container here holds the
/// volume. An error after the first bytes ends the stream early (the receiver then reports a
/// truncated archive).
pub async fn export(
    State(ctx): State<Arc<AgentCtx>>,
    Path(name): Path<String>,
    Query(q): Query<PassQuery>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let pass = pass_of(&q)?;
    let s = storage(&ctx)?;
    if s.volumes.get(&name).is_err() {
        return Err(ApiError::not_found(format!(
            "volume {name} is not on this node"
        )));
    }
    if pass == Pass::Final {
        if let Some(holders) = volumes_in_use(&ctx.runtime).await.get(&name) {
            return Err(ApiError::conflict(format!(
                "volume {name} is mounted by {} on this node: the final pass waits for it to stop",
                holders.join(", ")
            )));
        }
        if !s.volumes.has_snapshot(&name) {
            return Err(ApiError::conflict(format!(
                "volume {name} has no first pass on this node (the agent restarted?): the move \
                 starts over"
            )));
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let err_tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        let res = match pass {
            Pass::Plain => s.volumes.export(&name, &mut w).map(|()| None),
            Pass::First => s.volumes.export_tracked(&name, &mut w).map(Some),
            Pass::Final => s.volumes.export_changes(&name, &mut w).map(Some),
        }
        .map_err(|e| e.to_string())
        .and_then(|st| {
            std::io::Write::flush(&mut w)
                .map(|()| st)
                .map_err(|e| e.to_string())
        });
        match res {
            Ok(Some(st)) => tracing::info!(volume = %name, files = st.files,
                bytes = st.file_bytes, deleted = st.deleted, first = (pass == Pass::First),
                "volume pass exported"),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "volume export failed");
                let _ = err_tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
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

/// How long an import waits for the next bytes of its body.
const BODY_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// The request body as a blocking `Read`, for the unpacker on the blocking pool: frames are
/// handed over through a small channel as they arrive (nothing is spooled), and a body that
/// stalls for [`BODY_STALL`] fails the read.
fn body_reader(req: Request) -> BodyReader {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(16);
    tokio::spawn(async move {
        let mut body = req.into_body();
        loop {
            let frame =
                tokio::time::timeout(BODY_STALL, http_body_util::BodyExt::frame(&mut body)).await;
            let item = match frame {
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the upload stalled for {} s", BODY_STALL.as_secs()),
                )),
                Ok(None) => return,
                Ok(Some(Err(e))) => Err(std::io::Error::other(format!("the upload broke: {e}"))),
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(d) if d.is_empty() => continue,
                    Ok(d) => Ok(d),
                    Err(_) => continue,
                },
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    BodyReader {
        rx,
        cur: bytes::Bytes::new(),
    }
}

struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    cur: bytes::Bytes,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => self.cur = b,
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// `POST /v1/agent/volumes/{name}/import[?pass=final]`: the body is unpacked as it arrives
/// (hashed on the way, never spooled): a tar into the volume, created if needed and empty;
/// with `pass=final` a delta stream onto the existing volume (a move's first pass left it
/// here). Answers the SHA-256 and length of the body as received, for the sender to check.
pub async fn import(
    State(ctx): State<Arc<AgentCtx>>,
    Path(name): Path<String>,
    Query(q): Query<PassQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    if let Err(e) = check_name(&name) {
        return Err(flotilla_api::body::refuse_unread(req, e).await);
    }
    let pass = match pass_of(&q) {
        Ok(p) => p,
        Err(e) => return Err(flotilla_api::body::refuse_unread(req, e).await),
    };
    let s = match storage(&ctx) {
        Ok(s) => s,
        Err(e) => return Err(flotilla_api::body::refuse_unread(req, e).await),
    };
    if volumes_in_use(&ctx.runtime).await.contains_key(&name) {
        let e = ApiError::conflict(format!("volume {name} is mounted by a task on this node"));
        return Err(flotilla_api::body::refuse_unread(req, e).await);
    }
    if pass == Pass::Final && s.volumes.get(&name).is_err() {
        let e = ApiError::conflict(format!(
            "volume {name} is not on this node: a final pass needs the first one"
        ));
        return Err(flotilla_api::body::refuse_unread(req, e).await);
    }
    let _slot = match ctx.uploads.try_take() {
        Ok(s) => s,
        Err(e) => return Err(flotilla_api::body::refuse_unread(req, e).await),
    };
    let reader = body_reader(req);
    let n = name.clone();
    let res = blocking(move || {
        let r = std::io::BufReader::with_capacity(CHUNK, reader);
        match pass {
            Pass::Final => s.volumes.apply_changes(&n, r),
            Pass::Plain | Pass::First => s.volumes.import_hashed(&n, r).map(|(_, got)| got),
        }
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    match res {
        Ok(got) => {
            tracing::info!(volume = %name, bytes = got.bytes, deleted = got.deleted,
                delta = (pass == Pass::Final), "volume imported");
            Ok(json_ok(&serde_json::json!({
                "imported": name,
                "sha256": got.sha256,
                "bytes": got.bytes,
                "deleted": got.deleted,
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
        Err(e @ flotilla_volume::VolumeError::NotFound(_)) => {
            Err(ApiError::not_found(e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

/// `GET /v1/agent/volumes/{name}/tree`: a digest of the volume's tree without contents
/// (`VolumeStore::tree_digest`), for a move to compare both ends after its final pass.
pub async fn tree(
    State(ctx): State<Arc<AgentCtx>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let s = storage(&ctx)?;
    let n = name.clone();
    let res = blocking(move || s.volumes.tree_digest(&n))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    match res {
        Ok(d) => Ok(json_ok(&d)),
        Err(e @ flotilla_volume::VolumeError::NotFound(_)) => {
            Err(ApiError::not_found(e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}
