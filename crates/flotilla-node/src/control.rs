//! The leader's control loop: the I/O around the pure orchestrator and scheduler of
//! `flotilla-control`. It wakes on store changes (watch), on API kicks and at the deadlines the
//! orchestrator asks for; each pass lists services, tasks and nodes, reconciles every service,
//! writes the actions (one batch per service, optimistic concurrency on every task), then places
//! unassigned tasks in one batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use flotilla_control::{Action, Decision, OrchestratorConfig, Reconcile};
use flotilla_store::{Batch, Op, StoreError, Table};
use flotilla_types::{Node, Service, Task, TaskState, TaskStatus, UpdateState};

use crate::manager::{encode, now_ms, Manager};
use crate::NodeCtx;

/// Turns orchestrator actions into store ops. Returns the ops, or None when an action refers
/// to an object we do not have (the next pass recomputes).
fn ops_for(
    service: Option<&Service>,
    tasks: &HashMap<&str, &Task>,
    r: &Reconcile,
    now: u64,
) -> Option<Vec<Op>> {
    let mut ops = Vec::new();
    let mut svc = service.cloned();
    let mut svc_changed = false;
    for a in &r.actions {
        match a {
            Action::CreateTask(t) => {
                let mut t: Task = (**t).clone();
                t.meta.created_at = now;
                t.meta.updated_at = now;
                ops.push(Op::create(Table::Tasks, &t.id, encode(&t).ok()?));
            }
            Action::UpdateTask(u) => {
                let mut t = (*tasks.get(u.task_id.as_str())?).clone();
                if let Some(d) = u.desired_state {
                    t.desired_state = d;
                }
                if let Some(st) = &u.status {
                    let mut status = TaskStatus::new(st.state, st.at, st.message.clone());
                    status.container_id = t.status.container_id.clone();
                    status.exit_code = t.status.exit_code;
                    t.status = status;
                }
                t.meta.updated_at = now;
                ops.push(Op::update(
                    Table::Tasks,
                    &t.id,
                    encode(&t).ok()?,
                    Some(u.version),
                ));
            }
            Action::DeleteTask { task_id, version } => {
                ops.push(Op::delete(Table::Tasks, task_id, Some(*version)));
            }
            Action::SetUpdateStatus(st) => {
                let s = svc.as_mut()?;
                s.update_status = Some(st.clone());
                svc_changed = true;
            }
            Action::Rollback { message } => {
                let s = svc.as_mut()?;
                let prev = s.previous_spec.take()?;
                let failed = std::mem::replace(&mut s.spec, prev);
                s.previous_spec = Some(failed);
                s.spec_version += 1;
                s.update_status = Some(flotilla_types::UpdateStatus {
                    state: UpdateState::RollbackStarted,
                    started_at: now,
                    completed_at: None,
                    message: message.clone(),
                });
                svc_changed = true;
            }
        }
    }
    if svc_changed {
        let s = svc?;
        ops.push(Op::update(
            Table::Services,
            &s.id,
            encode(&s).ok()?,
            Some(s.meta.version),
        ));
    }
    Some(ops)
}

/// Writes `ops` in batches that stay well under the store's entry size limit. Splitting is
/// safe: every op carries its own precondition, and the next pass recomputes whatever a
/// rejected chunk did not do.
async fn write_chunked(mgr: &Manager, ops: Vec<Op>, what: &str) -> Result<(), StoreError> {
    let limit = (mgr.store.config().max_batch_bytes / 2).max(64 * 1024);
    let mut batch = Batch::new();
    let mut chunks = Vec::new();
    for op in ops {
        batch.push(op);
        if batch.approx_size() >= limit {
            chunks.push(std::mem::take(&mut batch));
        }
    }
    if !batch.is_empty() {
        chunks.push(batch);
    }
    // Chunks are independent, so up to `PIPELINE` of them are in flight at once: Raft appends
    // and replicates the next entry while the previous one is being fsynced and applied,
    // instead of paying a full commit round per chunk. Their order does not matter.
    let mut writes =
        futures::stream::iter(chunks.into_iter().map(|b| mgr.store.write(b))).buffered(PIPELINE);
    let mut first_err = None;
    while let Some(r) = writes.next().await {
        match r {
            Ok(out) => {
                if let Err(f) = out.result {
                    tracing::debug!(what, failure = %f, "write raced; the next pass retries");
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Raft entries of one control-loop write kept in flight at once.
const PIPELINE: usize = 4;

/// One pass: reconcile every service, then schedule. Returns the earliest wake-up wanted.
async fn pass(mgr: &Manager, cfg: &OrchestratorConfig) -> Result<Option<u64>, StoreError> {
    let now = now_ms();
    let list = |e: crate::error::ApiError| StoreError::Storage(e.message);
    let mut services: Vec<Service> = mgr.list().map_err(list)?;
    let mut nodes: Vec<Node> = mgr.list().map_err(list)?;
    if let Ok(cluster) = mgr.cluster() {
        let ops = crate::network::allocation_ops(&cluster.network, &nodes, &services, now);
        if !ops.is_empty() {
            write_chunked(mgr, ops, "allocate").await?;
            services = mgr.list().map_err(list)?;
            nodes = mgr.list().map_err(list)?;
        }
    }
    let tasks: Vec<Task> = mgr.list().map_err(list)?;
    let by_id: HashMap<&str, &Task> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut per_service: HashMap<&str, Vec<Task>> = HashMap::new();
    for t in &tasks {
        per_service
            .entry(t.service_id.as_str())
            .or_default()
            .push(t.clone());
    }
    let mut wake: Option<u64> = None;
    let mut wrote = false;
    for s in &services {
        let mine = per_service.remove(s.id.as_str()).unwrap_or_default();
        let r = flotilla_control::reconcile(s, &mine, &nodes, now, cfg);
        wake = min_opt(wake, r.wake_at);
        if r.actions.is_empty() {
            continue;
        }
        if let Some(ops) = ops_for(Some(s), &by_id, &r, now) {
            if !ops.is_empty() {
                write_chunked(mgr, ops, "reconcile").await?;
                wrote = true;
            }
        }
    }
    // Tasks of removed services.
    for (_sid, orphans) in per_service {
        let r = flotilla_control::reconcile_removed(&orphans, &nodes, now);
        wake = min_opt(wake, r.wake_at);
        if let Some(ops) = ops_for(None, &by_id, &r, now) {
            if !ops.is_empty() {
                write_chunked(mgr, ops, "cleanup").await?;
                wrote = true;
            }
        }
    }
    // Schedule on the state after this pass's writes.
    let tasks: Vec<Task> = if wrote {
        mgr.list().map_err(list)?
    } else {
        tasks
    };
    let unassigned: Vec<Task> = tasks
        .iter()
        .filter(|t| {
            matches!(t.status.state, TaskState::New | TaskState::Pending)
                && t.desired_state <= TaskState::Running
        })
        .cloned()
        .collect();
    if !unassigned.is_empty() {
        let decisions = flotilla_control::schedule(&unassigned, &nodes, &tasks);
        let by_id: HashMap<&str, &Task> = unassigned.iter().map(|t| (t.id.as_str(), t)).collect();
        let mut ops = Vec::new();
        for d in decisions {
            let Some(t) = by_id.get(d.task_id()) else {
                continue;
            };
            let mut t = (*t).clone();
            match d {
                Decision::Assign { node_id, .. } => {
                    t.status = TaskStatus::new(
                        TaskState::Assigned,
                        now,
                        "scheduler assigned task to node",
                    );
                    t.node_id = Some(node_id);
                }
                Decision::NoSuitableNode { reason, .. } => {
                    if t.status.state == TaskState::Pending && t.status.message == reason {
                        continue;
                    }
                    t.status = TaskStatus::new(TaskState::Pending, now, reason);
                }
            }
            t.meta.updated_at = now;
            if let Ok(v) = encode(&t) {
                ops.push(Op::update(Table::Tasks, &t.id, v, Some(t.meta.version)));
            }
        }
        if !ops.is_empty() {
            write_chunked(mgr, ops, "schedule").await?;
        }
    }
    Ok(wake)
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

pub async fn control_loop(ctx: Arc<NodeCtx>, mut stop: watch::Receiver<bool>) {
    let Some(mgr) = ctx.manager.clone() else {
        return;
    };
    let cfg = OrchestratorConfig {
        task_history: ctx.cfg.task_history.max(1),
    };
    let mut watcher = mgr.store.watch(mgr.store.revision()).ok();
    let mut wake_at: Option<u64> = None;
    loop {
        let sleep_ms = match wake_at {
            Some(at) => at.saturating_sub(now_ms()).clamp(10, 1000),
            None => 1000,
        };
        let mut changed = false;
        tokio::select! {
            _ = flotilla_api::server::stopped(&mut stop) => return,
            _ = mgr.wake.notified() => changed = true,
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            ev = async {
                match watcher.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            } => {
                match ev {
                    Some(Ok(_)) => changed = true,
                    Some(Err(_)) | None => {
                        watcher = mgr.store.watch(mgr.store.revision()).ok();
                        changed = true;
                    }
                }
            }
        }
        if !mgr.is_leader() {
            continue;
        }
        if changed {
            // Let a burst of changes land, then drain what is queued.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Some(w) = watcher.as_mut() {
                while let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_millis(0), w.next()).await
                {}
            }
        }
        match pass(&mgr, &cfg).await {
            Ok(w) => wake_at = w,
            Err(e) => {
                tracing::warn!(error = %e, "control pass failed");
                wake_at = Some(now_ms() + 500);
            }
        }
    }
}
