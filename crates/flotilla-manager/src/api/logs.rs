//! `GET /v1/services/{key}/logs` on any manager: fans out to every node that ran one of the
//! service's tasks (their node-local `GET /v1/tasks/{id}/logs`, served by the agent) and
//! merges the streams, each line labelled with its task; with `follow` it also picks up tasks
//! that start later.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use flotilla_runtime::LogLine;
use flotilla_types::{task_logs_path, LogQuery, Node, Service, Task};

use super::{Caller, Ctx};
use crate::error::ManagerError;

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

fn since_rfc3339(s: &str) -> Result<String, ManagerError> {
    flotilla_runtime::since_to_rfc3339(s, SystemTime::now())
        .map_err(|e| ManagerError::bad_request(e.to_string()))
}

/// The longest line of a node's task log stream the fan-out accepts: the shim writes at most
/// `flotilla_runtime::LOG_MAX_LINE` bytes of text per record, which JSON escaping can
/// make up to six times longer (`\u0000`), plus the timestamp and stream fields.
pub const MAX_LOG_LINE: usize = 6 * flotilla_runtime::LOG_MAX_LINE + 1024;

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
) -> Result<Response, ManagerError> {
    if !caller.is_admin() {
        return Err(ManagerError::forbidden("logs are for admins"));
    }
    let (service, only_task) = ctx
        .blocking(move |m| find_target(&m.list::<Service>()?, &m.list::<Task>()?, &key))
        .await?;
    let since = q.since.as_deref().map(since_rfc3339).transpose()?;
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(1024);
    let fan_out = FanOut {
        service,
        only_task,
        follow: q.follow,
        tail: q.tail,
        since,
    };
    tokio::spawn(fan_out.run(ctx, tx));
    Ok(super::stream_response(rx)?)
}

/// The service `key` names (id, name or unique id prefix), or the task it names (id, or a
/// prefix of at least 6 characters) with its service.
fn find_target(
    services: &[Service],
    tasks: &[Task],
    key: &str,
) -> Result<(Service, Option<String>), ManagerError> {
    let service = services
        .iter()
        .find(|s| s.id == key || s.spec.name == key)
        .or_else(|| {
            let m: Vec<&Service> = services.iter().filter(|s| s.id.starts_with(key)).collect();
            (m.len() == 1).then(|| m[0])
        });
    if let Some(s) = service {
        return Ok((s.clone(), None));
    }
    let t = tasks
        .iter()
        .find(|t| t.id == key || (key.len() >= 6 && t.id.starts_with(key)))
        .ok_or_else(|| {
            ManagerError::not_found(format!(
                "no service or task {key}: see `flotilla service ls`"
            ))
        })?;
    let s = services
        .iter()
        .find(|s| s.id == t.service_id)
        .cloned()
        .ok_or_else(|| ManagerError::not_found("the task's service is gone"))?;
    Ok((s, Some(t.id.clone())))
}

/// One `service logs` request: whose logs, and how.
struct FanOut {
    service: Service,
    /// Only this task's log, when the request named a task.
    only_task: Option<String>,
    follow: bool,
    tail: Option<usize>,
    since: Option<String>,
}

impl FanOut {
    /// Streams the log of every task of the service that started, as it finds them (again
    /// every 300 ms with `follow`), into `tx`, until every stream ended or the client left.
    async fn run(self, mgr: Ctx, tx: mpsc::Sender<bytes::Bytes>) {
        let mut started: HashSet<String> = HashSet::new();
        let mut handles = Vec::new();
        loop {
            let (tasks, nodes) = mgr
                .blocking(|m| {
                    let tasks: Vec<Task> = m.list().unwrap_or_default();
                    let nodes: Vec<Node> = m.list().unwrap_or_default();
                    Ok((tasks, nodes))
                })
                .await
                .unwrap_or_default();
            for t in tasks.iter().filter(|t| self.wants(t)) {
                if started.contains(&t.id) {
                    continue;
                }
                let Some((addr, node_name)) = node_addr(&nodes, &t.node_id) else {
                    continue;
                };
                started.insert(t.id.clone());
                let path = task_logs_path(&t.id, self.follow, self.tail, self.since.as_deref());
                let label = Label {
                    task_id: t.id.clone(),
                    service: self.service.spec.name.clone(),
                    slot: t.slot,
                    node: node_name,
                };
                let client = mgr.tls.node(&addr);
                handles.push(tokio::spawn(forward(client, path, label, tx.clone())));
            }
            if !self.follow {
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
    }

    /// Whether `t` is a task of the request that has started (and so may have a log).
    fn wants(&self, t: &Task) -> bool {
        t.service_id == self.service.id
            && self.only_task.as_ref().is_none_or(|o| *o == t.id)
            && t.status.state >= flotilla_types::TaskState::Starting
    }
}

/// What each line of one task's log is labelled with.
struct Label {
    task_id: String,
    service: String,
    slot: Option<u64>,
    node: String,
}

impl Label {
    fn line(&self, line: LogLine) -> bytes::Bytes {
        super::ndjson(&ServiceLogLine {
            task_id: self.task_id.clone(),
            service: self.service.clone(),
            slot: self.slot,
            node: self.node.clone(),
            line,
        })
    }
}

/// Forwards one task's log from its node (`client` at `path`) into `tx`, labelled, until the
/// node's stream ends or the client left.
async fn forward(
    client: flotilla_api::Client,
    path: String,
    label: Label,
    tx: mpsc::Sender<bytes::Bytes>,
) {
    let (ltx, mut lrx) = mpsc::unbounded_channel::<LogLine>();
    // The node is trusted only this far: a line longer than any the shim writes ends its
    // stream.
    let stream =
        client.stream_lines_max(
            &path,
            MAX_LOG_LINE,
            move |line| match serde_json::from_slice::<LogLine>(line) {
                Ok(l) => ltx.send(l).is_ok(),
                Err(_) => true,
            },
        );
    tokio::pin!(stream);
    loop {
        tokio::select! {
            res = &mut stream => {
                if let Err(e) = res {
                    tracing::debug!(task = %label.task_id, error = %e, "log stream from node ended");
                }
                while let Ok(l) = lrx.try_recv() {
                    if tx.send(label.line(l)).await.is_err() {
                        return;
                    }
                }
                return;
            }
            Some(l) = lrx.recv() => {
                if tx.send(label.line(l)).await.is_err() {
                    return;
                }
            }
        }
    }
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
            line: "\u{1}".repeat(flotilla_runtime::LOG_MAX_LINE),
        };
        let json = serde_json::to_vec(&l).unwrap();
        assert!(json.len() <= MAX_LOG_LINE, "{}", json.len());
    }
}
