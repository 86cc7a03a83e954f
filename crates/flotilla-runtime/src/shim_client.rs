//! Client side of the shim socket protocol.

use crate::error::{Result, RuntimeError};
use flotilla_shim::{Request, Response, ShimState};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long a quick request (state, start, signal, delete) may take before the shim is
/// considered hung.
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request and reads the answer. `Err(ShimDead)` when nothing listens. `wait` and
/// `stop` may take as long as the container runs; every other request is bounded by
/// [`QUICK_TIMEOUT`].
pub async fn call(socket: &Path, id: &str, req: &Request) -> Result<ShimState> {
    match req {
        Request::Wait | Request::Stop { .. } => call_inner(socket, id, req).await,
        _ => tokio::time::timeout(QUICK_TIMEOUT, call_inner(socket, id, req))
            .await
            .map_err(|_| {
                RuntimeError::Shim(format!(
                    "shim for container {id} did not answer within {}s (it may be hung; remove the container)",
                    QUICK_TIMEOUT.as_secs()
                ))
            })?,
    }
}

async fn call_inner(socket: &Path, id: &str, req: &Request) -> Result<ShimState> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|_| RuntimeError::ShimDead(id.to_string()))?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| RuntimeError::Shim(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .map_err(|_| RuntimeError::ShimDead(id.to_string()))?;
    let mut reader = BufReader::new(r);
    let mut resp = String::new();
    let n = reader
        .read_line(&mut resp)
        .await
        .map_err(|_| RuntimeError::ShimDead(id.to_string()))?;
    if n == 0 {
        return Err(RuntimeError::ShimDead(id.to_string()));
    }
    match serde_json::from_str::<Response>(&resp)
        .map_err(|e| RuntimeError::Shim(format!("bad answer: {e}")))?
    {
        Response::Ok { state } => Ok(state),
        Response::Error { message } => Err(RuntimeError::Oci(message)),
    }
}
