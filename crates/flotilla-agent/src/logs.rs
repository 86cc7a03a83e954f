//! `GET /v1/tasks/{id}/logs`, node-local: a task's log file (JSON lines written by its shim),
//! optionally followed until the container is gone. Managers call it for `service logs`. The
//! log file is read on the blocking pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use tokio::sync::mpsc;

use flotilla_api::{ndjson, stream_response, ApiError, Caller};
use flotilla_runtime::{LogFollower, LogLine, RuntimeDriver};
use flotilla_types::LogQuery;

use crate::{blocking, AgentCtx};

fn since_rfc3339(s: &str) -> Result<String, ApiError> {
    flotilla_runtime::since_to_rfc3339(s, SystemTime::now())
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `GET /v1/tasks/{id}/logs` (node-local).
pub async fn task_logs(
    State(ctx): State<Arc<AgentCtx>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let manager_caller = matches!(
        &caller,
        Caller::Node {
            role: flotilla_pki::Role::Manager,
            ..
        }
    );
    if !caller.is_admin() && !manager_caller {
        return Err(ApiError::forbidden("logs are for admins and managers"));
    }
    let rt = ctx.runtime.clone();
    if flotilla_runtime::spec::validate_id(&id).is_err() {
        return Err(ApiError::bad_request("invalid task id"));
    }
    let path = rt.log_path(&id);
    let exists = {
        let path = path.clone();
        blocking(move || path.exists()).await.unwrap_or(false)
    };
    if !exists {
        return Err(ApiError::not_found(format!(
            "no logs for task {id} on this node"
        )));
    }
    let since = q.since.as_deref().map(since_rfc3339).transpose()?;
    let (lines, follower) = blocking(move || open_logs(&path, since.as_deref(), q.tail, q.follow))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(256);
    let container_dir = rt.config().root.join("containers").join(&id);
    tokio::spawn(send_logs(tx, lines, follower, container_dir));
    stream_response(rx)
}

/// A task's log records so far and, to follow it, a follower started before they were read
/// (blocking).
fn open_logs(
    path: &std::path::Path,
    since: Option<&str>,
    tail: Option<usize>,
    follow: bool,
) -> std::io::Result<(Vec<LogLine>, Option<LogFollower>)> {
    // Start following before reading, then skip what the read already returned.
    let follower = if follow {
        Some(LogFollower::from_end(path)?)
    } else {
        None
    };
    let lines = flotilla_runtime::read_logs(path, since, tail)?;
    Ok((lines, follower))
}

/// Sends the records read, then (with a follower) new records every 100 ms until the
/// container is gone or the client leaves. The log file is read on the blocking pool.
async fn send_logs(
    tx: mpsc::Sender<bytes::Bytes>,
    lines: Vec<LogLine>,
    mut follower: Option<LogFollower>,
    container_dir: PathBuf,
) {
    for l in &lines {
        if tx.send(ndjson(l)).await.is_err() {
            return;
        }
    }
    let mut last = lines.last().map(|l| l.ts.clone()).unwrap_or_default();
    loop {
        let Some(mut f) = follower.take() else { return };
        let dir = container_dir.clone();
        let polled = blocking(move || {
            let gone = !dir.exists();
            f.poll().map(|new| (f, new, gone))
        })
        .await;
        let Ok(Ok((f, new, gone))) = polled else {
            return;
        };
        follower = Some(f);
        for l in new {
            if l.ts.as_str() <= last.as_str() {
                continue;
            }
            last = l.ts.clone();
            if tx.send(ndjson(&l)).await.is_err() {
                return;
            }
        }
        if gone {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tx.closed() => return,
        }
    }
}
