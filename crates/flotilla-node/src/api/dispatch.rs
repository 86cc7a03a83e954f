//! The dispatcher: how agents learn their tasks and report back.
//!
//! - `GET /v1/nodes/{id}/assignments`: a long-lived newline-delimited JSON stream of the complete
//!   set of tasks assigned to the node, sent at once and again whenever one of them changes
//!   (watch on the store; no polling), plus a keep-alive resend every few seconds. Any manager
//!   serves it from its own replica.
//! - `POST /v1/nodes/{id}/tasks`: status reports (batched); forwarded to the leader like every
//!   write, applied in one Raft entry, never moving a task backwards.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use flotilla_store::{Batch, Event, Op, Table};
use flotilla_types::{Task, TaskState, TaskStatus};

use super::{json_ok, Caller, Ctx};
use crate::error::ApiError;
use crate::manager::{encode, now_ms, Manager};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignments {
    pub revision: u64,
    pub tasks: Vec<Task>,
    /// The cluster's image trust policy (from the cluster object); agents verify images
    /// against it before running them. `None` from an older manager: agents fail closed.
    #[serde(default)]
    pub trust: Option<flotilla_registry::TrustPolicy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub task_id: String,
    pub status: TaskStatus,
}

fn assigned(mgr: &Manager, node_id: &str) -> Result<Assignments, ApiError> {
    let revision = mgr.store.revision();
    let tasks: Vec<Task> = mgr
        .list::<Task>()?
        .into_iter()
        .filter(|t| t.node_id.as_deref() == Some(node_id) && t.status.state >= TaskState::Assigned)
        .collect();
    let trust = Some(mgr.cluster()?.trust);
    Ok(Assignments {
        revision,
        tasks,
        trust,
    })
}

pub async fn assignments(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !caller.is_node_or_admin(&id) {
        return Err(ApiError::forbidden(
            "a node may only read its own assignments",
        ));
    }
    let mgr = ctx.manager()?;
    let me = id.clone();
    push_stream(
        mgr,
        move |ev| match ev.table {
            Table::Cluster => true,
            // A task concerns this node's assignments only once it is placed here (a task's
            // node never changes after that); unplaced tasks, the bulk of a large create, don't.
            Table::Tasks => task_node(ev).is_none_or(|n| n.as_deref() == Some(me.as_str())),
            _ => false,
        },
        move |m| assigned(m, &id),
        |a, b| a.tasks == b.tasks && a.trust == b.trust,
    )
}

/// The node a task event is about, read without decoding the whole task: `Some(None)` for a
/// task not placed on any node, `None` when the event carries no readable task.
pub fn task_node(ev: &Event) -> Option<Option<String>> {
    #[derive(Deserialize)]
    struct NodeOf {
        #[serde(default)]
        node_id: Option<String>,
    }
    let v = ev.value.as_deref()?;
    serde_json::from_slice::<NodeOf>(v).ok().map(|n| n.node_id)
}

/// How often a push stream resends its current state when nothing changed, so that both
/// ends notice a dead connection (agents give up on a stream after 12 s of silence).
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// A long-lived NDJSON stream of `build`'s result: sent at once, then again whenever a change
/// that `relevant` accepts alters it (`same` says whether it did), plus a keep-alive resend
/// every 5 s so a dead connection is noticed by both sides. Bursts of changes are coalesced.
/// `relevant` keeps rebuilds (which read whole tables) off changes that cannot matter.
pub fn push_stream<T, R, B, S>(
    mgr: std::sync::Arc<Manager>,
    relevant: R,
    build: B,
    same: S,
) -> Result<Response, ApiError>
where
    T: Serialize + Send + 'static,
    R: Fn(&Event) -> bool + Send + 'static,
    B: Fn(&Manager) -> Result<T, ApiError> + Send + 'static,
    S: Fn(&T, &T) -> bool + Send + 'static,
{
    let mut watch = mgr.store.watch(mgr.store.revision())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let first = build(&mgr)?;
    tokio::spawn(async move {
        let send = super::ndjson::<T>;
        if tx.send(send(&first)).await.is_err() {
            return;
        }
        let mut last = Some(first);
        // The keep-alive is due 5 s after the last message sent, however many events arrive
        // meanwhile: timed from the last event instead, a steady flow of changes that do not
        // concern this stream (a large create's unplaced tasks) starved it, and agents dropped
        // the silent stream and reconnected.
        let mut sent_at = tokio::time::Instant::now();
        loop {
            let dirty = tokio::select! {
                ev = watch.next() => match ev {
                    Some(Ok(ev)) => relevant(&ev),
                    _ => {
                        // Compacted or closed: start over from the current state.
                        match mgr.store.watch(mgr.store.revision()) {
                            Ok(w) => watch = w,
                            Err(_) => return,
                        }
                        true
                    }
                },
                _ = tokio::time::sleep_until(sent_at + KEEPALIVE) => {
                    last = None;
                    true
                }
                _ = tx.closed() => return,
            };
            if !dirty {
                continue;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, watch.next()).await {}
            let Ok(now) = build(&mgr) else {
                continue;
            };
            if last.as_ref().is_some_and(|l| same(l, &now)) {
                continue;
            }
            if tx.send(send(&now)).await.is_err() {
                return;
            }
            sent_at = tokio::time::Instant::now();
            last = Some(now);
        }
    });
    super::stream_response(rx)
}

pub async fn report(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(reports): Json<Vec<StatusReport>>,
) -> Result<Response, ApiError> {
    if !caller.is_node_or_admin(&id) {
        return Err(ApiError::forbidden("a node may only report its own tasks"));
    }
    let mgr = ctx.manager()?;
    let mut batch = Batch::new();
    let mut applied = 0usize;
    for r in reports {
        let Some(mut t) = mgr.get::<Task>(&r.task_id)? else {
            continue;
        };
        if t.node_id.as_deref() != Some(id.as_str()) {
            continue;
        }
        // Never move backwards; the same state may refresh details (health, message).
        if r.status.state < t.status.state {
            continue;
        }
        if r.status == t.status {
            continue;
        }
        t.status = r.status;
        t.meta.updated_at = now_ms();
        batch.push(Op::update(
            Table::Tasks,
            &t.id,
            encode(&t)?,
            Some(t.meta.version),
        ));
        applied += 1;
    }
    if !batch.is_empty() {
        let out = mgr.store.write(batch).await?;
        if let Err(f) = out.result {
            // A concurrent orchestrator write; the agent resends on its next report.
            return Err(ApiError::conflict(format!(
                "status report raced: {f}; resend"
            )));
        }
        mgr.kick();
    }
    Ok(json_ok(&serde_json::json!({ "applied": applied })))
}
