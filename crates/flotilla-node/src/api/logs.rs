//! Container logs.
//!
//! - `GET /v1/tasks/{id}/logs` on the node that ran the task: its log file (JSON lines written
//!   by the shim), optionally followed until the container is gone.
//! - `GET /v1/services/{key}/logs` on any manager: fans out to every node that ran one of the
//!   service's tasks and merges the streams, each line labelled with its task; with `follow` it
//!   also picks up tasks that start later.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use flotilla_runtime::{LogFollower, LogLine, RuntimeDriver};
use flotilla_types::{Node, Service, Task};

use super::{Caller, Ctx};
use crate::error::ApiError;

#[derive(Debug, Default, Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<usize>,
    /// RFC 3339 time, or a duration ago (`10m`).
    since: Option<String>,
}

/// One merged line of `service logs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceLogLine {
    pub task_id: String,
    pub service: String,
    pub slot: Option<u64>,
    pub node: String,
    #[serde(flatten)]
    pub line: LogLine,
}

fn since_rfc3339(s: &str) -> Result<String, ApiError> {
    if let Ok(d) = humantime::parse_duration(s) {
        let t = SystemTime::now()
            .checked_sub(d)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        return Ok(flotilla_shim::logfile::rfc3339_nanos(t));
    }
    if s.len() >= 10 && s.as_bytes()[4] == b'-' {
        return Ok(s.to_string());
    }
    Err(ApiError::bad_request(format!(
        "--since {s:?}: use an RFC 3339 time (2026-01-02T15:04:05Z) or a duration like 10m"
    )))
}

/// The longest line of a node's task log stream the fan-out accepts: the shim writes at most
/// [`flotilla_shim::logfile::MAX_LINE`] bytes of text per record, which JSON escaping can
/// make up to six times longer (`\u0000`), plus the timestamp and stream fields.
pub const MAX_LOG_LINE: usize = 6 * flotilla_shim::logfile::MAX_LINE + 1024;

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters), so that a
/// `+` in an RFC 3339 offset stays a `+` and a `&` cannot add parameters.
fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The node-local logs URL of task `id` that the fan-out calls.
fn task_logs_path(id: &str, follow: bool, tail: Option<usize>, since: Option<&str>) -> String {
    let mut path = format!("/v1/tasks/{}/logs?follow={follow}", query_value(id));
    if let Some(n) = tail {
        path.push_str(&format!("&tail={n}"));
    }
    if let Some(s) = since {
        path.push_str(&format!("&since={}", query_value(s)));
    }
    path
}

/// `GET /v1/tasks/{id}/logs` (node-local).
pub async fn task_logs(
    State(ctx): State<Ctx>,
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
    let rt = ctx
        .runtime
        .clone()
        .ok_or_else(|| ApiError::unavailable("this node has no container runtime"))?;
    if flotilla_runtime::spec::validate_id(&id).is_err() {
        return Err(ApiError::bad_request("invalid task id"));
    }
    let path = rt.log_path(&id);
    if !path.exists() {
        return Err(ApiError::not_found(format!(
            "no logs for task {id} on this node"
        )));
    }
    let since = q.since.as_deref().map(since_rfc3339).transpose()?;
    // Start following before reading, then skip what the read already returned.
    let mut follower = if q.follow {
        Some(LogFollower::from_end(&path).map_err(|e| ApiError::internal(e.to_string()))?)
    } else {
        None
    };
    let lines = flotilla_runtime::read_logs(&path, since.as_deref(), q.tail)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(256);
    let container_dir = rt.config().root.join("containers").join(&id);
    tokio::spawn(async move {
        let mut last = String::new();
        for l in &lines {
            if tx.send(super::ndjson(l)).await.is_err() {
                return;
            }
        }
        if let Some(l) = lines.last() {
            last = l.ts.clone();
        }
        let Some(f) = follower.as_mut() else { return };
        loop {
            let gone = !container_dir.exists();
            match f.poll() {
                Ok(new) => {
                    for l in new {
                        if l.ts.as_str() <= last.as_str() {
                            continue;
                        }
                        last = l.ts.clone();
                        if tx.send(super::ndjson(&l)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(_) => return,
            }
            if gone {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    super::stream_response(rx)
}

fn node_addr(nodes: &[Node], id: &Option<String>) -> Option<(String, String)> {
    let id = id.as_ref()?;
    nodes
        .iter()
        .find(|n| &n.id == id)
        .map(|n| (n.status.addr.clone(), n.spec.name.clone()))
}

/// `GET /v1/services/{key}/logs` (any manager): merged logs of a service, or of one task.
pub async fn service_logs(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    if !caller.is_admin() {
        return Err(ApiError::forbidden("logs are for admins"));
    }
    let mgr = ctx.manager()?;
    let services: Vec<Service> = mgr.list()?;
    let tasks: Vec<Task> = mgr.list()?;
    let (service, only_task) = match services
        .iter()
        .find(|s| s.id == key || s.spec.name == key)
        .or_else(|| {
            let m: Vec<&Service> = services.iter().filter(|s| s.id.starts_with(&key)).collect();
            (m.len() == 1).then(|| m[0])
        }) {
        Some(s) => (s.clone(), None),
        None => {
            let t = tasks
                .iter()
                .find(|t| t.id == key || (key.len() >= 6 && t.id.starts_with(&key)))
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "no service or task {key}: see `flotilla service ls`"
                    ))
                })?;
            let s = services
                .iter()
                .find(|s| s.id == t.service_id)
                .cloned()
                .ok_or_else(|| ApiError::not_found("the task's service is gone"))?;
            (s, Some(t.id.clone()))
        }
    };
    let since = q.since.as_deref().map(since_rfc3339).transpose()?;
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(1024);
    let follow = q.follow;
    let tail = q.tail;
    tokio::spawn(async move {
        let mut started: HashSet<String> = HashSet::new();
        let mut handles = Vec::new();
        loop {
            let tasks: Vec<Task> = mgr.list().unwrap_or_default();
            let nodes: Vec<Node> = mgr.list().unwrap_or_default();
            for t in tasks.iter().filter(|t| {
                t.service_id == service.id
                    && only_task.as_ref().is_none_or(|o| *o == t.id)
                    && t.status.state >= flotilla_types::TaskState::Starting
            }) {
                if started.contains(&t.id) {
                    continue;
                }
                let Some((addr, node_name)) = node_addr(&nodes, &t.node_id) else {
                    continue;
                };
                started.insert(t.id.clone());
                let path = task_logs_path(&t.id, follow, tail, since.as_deref());
                let client = ctx.tls.node(&addr);
                let tx = tx.clone();
                let label = (t.id.clone(), service.spec.name.clone(), t.slot, node_name);
                handles.push(tokio::spawn(async move {
                    let (ltx, mut lrx) = mpsc::unbounded_channel::<LogLine>();
                    // The node is trusted only this far: a line longer than any the shim
                    // writes ends its stream.
                    let stream = client.stream_lines_max(&path, MAX_LOG_LINE, move |line| {
                        match serde_json::from_slice::<LogLine>(line) {
                            Ok(l) => ltx.send(l).is_ok(),
                            Err(_) => true,
                        }
                    });
                    tokio::pin!(stream);
                    loop {
                        tokio::select! {
                            res = &mut stream => {
                                if let Err(e) = res {
                                    tracing::debug!(task = %label.0, error = %e, "log stream from node ended");
                                }
                                while let Ok(l) = lrx.try_recv() {
                                    let out = ServiceLogLine { task_id: label.0.clone(), service: label.1.clone(), slot: label.2, node: label.3.clone(), line: l };
                                    if tx.send(super::ndjson(&out)).await.is_err() { return; }
                                }
                                return;
                            }
                            Some(l) = lrx.recv() => {
                                let out = ServiceLogLine { task_id: label.0.clone(), service: label.1.clone(), slot: label.2, node: label.3.clone(), line: l };
                                if tx.send(super::ndjson(&out)).await.is_err() { return; }
                            }
                        }
                    }
                }));
            }
            if !follow {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = tx.closed() => return,
            }
        }
        for h in handles {
            let _ = h.await;
        }
    });
    super::stream_response(rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parsed(path: &str) -> LogQuery {
        let uri: axum::http::Uri = format!("http://node{path}").parse().unwrap();
        axum::extract::Query::<LogQuery>::try_from_uri(&uri)
            .unwrap()
            .0
    }

    #[test]
    fn the_fan_out_url_keeps_an_offset_with_a_plus() {
        let since = "2026-01-02T15:04:05+02:00";
        let path = task_logs_path("abc", true, Some(5), Some(since));
        let q = parsed(&path);
        assert_eq!(q.since.as_deref(), Some(since), "{path}");
        assert!(q.follow);
        assert_eq!(q.tail, Some(5));
    }

    #[test]
    fn a_since_value_cannot_add_parameters() {
        let since = "2026-01-02T15:04:05Z&tail=1 #x";
        let path = task_logs_path("abc", false, None, Some(since));
        let q = parsed(&path);
        assert_eq!(q.since.as_deref(), Some(since), "{path}");
        assert_eq!(q.tail, None);
    }

    #[test]
    fn a_full_shim_record_fits_the_line_cap() {
        // The worst case: every byte a control character, escaped as \u00XX.
        let l = LogLine {
            ts: "2026-01-02T15:04:05.123456789Z".into(),
            stream: "stderr".into(),
            line: "\u{1}".repeat(flotilla_shim::logfile::MAX_LINE),
        };
        let json = serde_json::to_vec(&l).unwrap();
        assert!(json.len() <= MAX_LOG_LINE, "{}", json.len());
    }
}
