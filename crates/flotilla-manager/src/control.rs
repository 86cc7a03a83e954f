//! The leader's control loop: the I/O around the pure orchestrator and scheduler of
//! `flotilla-control`. It wakes on store changes (watch), on API kicks and at the deadlines the
//! orchestrator asks for; each pass lists services, tasks and nodes (on the blocking pool),
//! reconciles every service, writes the actions (one batch per service, optimistic concurrency
//! on every task), then places unassigned tasks in one batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use flotilla_control::{Action, Decision, OrchestratorConfig, Reconcile};
use flotilla_store::{Batch, Op, StoreError, Table};
use flotilla_types::{Node, Service, Task, TaskState, TaskStatus, Volume};

use crate::error::ManagerError;
use crate::manager::{encode, Manager, Stored};
use flotilla_types::now_ms;

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
                if !s.start_rollback(now, message.clone()) {
                    return None;
                }
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

/// The allocator's decisions (a subnet per node, a VIP per `vip` service) as store writes,
/// each expecting the version the allocator read.
fn allocation_ops(
    settings: &flotilla_types::NetworkSettings,
    nodes: &[Node],
    services: &[Service],
    networks: &[flotilla_types::Network],
    now: u64,
) -> Vec<Op> {
    let alloc = flotilla_control::allocate::allocate(settings, nodes, services, networks, now);
    let mut ops = Vec::new();
    for n in &alloc.nodes {
        if let Ok(v) = encode(n) {
            ops.push(Op::update(Table::Nodes, &n.id, v, Some(n.meta.version)));
        }
    }
    for s in &alloc.services {
        if let Ok(v) = encode(s) {
            ops.push(Op::update(Table::Services, &s.id, v, Some(s.meta.version)));
        }
    }
    for n in &alloc.networks {
        if let Ok(v) = encode(n) {
            ops.push(Op::update(
                Table::Networks,
                &n.name,
                v,
                Some(n.meta.version),
            ));
        }
    }
    ops
}

/// Raft entries of one control-loop write kept in flight at once.
const PIPELINE: usize = 4;

/// The manager's read error as the store error a pass reports.
fn storage(e: ManagerError) -> StoreError {
    StoreError::Storage(e.to_string())
}

/// A whole table, read on the blocking pool.
async fn read<T: Stored>(mgr: &Arc<Manager>) -> Result<Vec<T>, StoreError> {
    mgr.list_blocking::<T>().await.map_err(storage)
}

/// Services and nodes with the allocator's decisions (node subnets, service VIPs) written
/// first when there are any, read again after that write.
async fn allocated(mgr: &Arc<Manager>, now: u64) -> Result<(Vec<Service>, Vec<Node>), StoreError> {
    let (services, nodes, networks, cluster) = mgr
        .blocking(|m| {
            Ok((
                m.list::<Service>()?,
                m.list::<Node>()?,
                m.list::<flotilla_types::Network>()?,
                m.cluster().ok(),
            ))
        })
        .await
        .map_err(storage)?;
    let Some(cluster) = cluster else {
        return Ok((services, nodes));
    };
    let ops = allocation_ops(&cluster.network, &nodes, &services, &networks, now);
    if ops.is_empty() {
        return Ok((services, nodes));
    }
    write_chunked(mgr, ops, "allocate").await?;
    mgr.blocking(|m| Ok((m.list::<Service>()?, m.list::<Node>()?)))
        .await
        .map_err(storage)
}

/// Reconciles every service, and the tasks of removed services, writing each one's actions.
/// Returns the earliest wake-up wanted and whether anything was written.
async fn reconcile_all(
    mgr: &Manager,
    services: &[Service],
    nodes: &[Node],
    tasks: &[Task],
    now: u64,
    cfg: &OrchestratorConfig,
) -> Result<(Option<u64>, bool), StoreError> {
    let by_id: HashMap<&str, &Task> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut per_service: HashMap<&str, Vec<Task>> = HashMap::new();
    for t in tasks {
        per_service
            .entry(t.service_id.as_str())
            .or_default()
            .push(t.clone());
    }
    let mut wake: Option<u64> = None;
    let mut wrote = false;
    for s in services {
        let mine = per_service.remove(s.id.as_str()).unwrap_or_default();
        let mut r = flotilla_control::reconcile(s, &mine, nodes, now, cfg);
        // A drain's stop of a task with a local volume waits for the volume's pre-copy.
        let held = mgr.moves.gate(&mut r.actions, tasks, nodes);
        if !held.is_empty() {
            tracing::debug!(service = %s.id, tasks = ?held, "stop held for a volume pre-copy");
        }
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
        let r = flotilla_control::reconcile_removed(&orphans, nodes, now);
        wake = min_opt(wake, r.wake_at);
        if let Some(ops) = ops_for(None, &by_id, &r, now) {
            if !ops.is_empty() {
                write_chunked(mgr, ops, "cleanup").await?;
                wrote = true;
            }
        }
    }
    Ok((wake, wrote))
}

/// The scheduler's decisions for the tasks waiting for a node, as store writes (none for a
/// task that stays pending for the reason it already shows).
fn schedule_ops(
    tasks: &[Task],
    nodes: &[Node],
    volumes: &[Volume],
    moving: &HashMap<String, String>,
    now: u64,
) -> Vec<Op> {
    let unassigned: Vec<Task> = tasks
        .iter()
        .filter(|t| {
            matches!(t.status.state, TaskState::New | TaskState::Pending)
                && t.desired_state <= TaskState::Running
        })
        .cloned()
        .collect();
    if unassigned.is_empty() {
        return Vec::new();
    }
    // Tasks with volumes go to the volumes' node, or wait for it.
    let homes = crate::volumes::homes(volumes, tasks);
    let (placeable, mut decisions) = crate::volumes::constrain(&unassigned, &homes, nodes, moving);
    decisions.extend(flotilla_control::schedule(&placeable, nodes, tasks));
    let by_id: HashMap<&str, &Task> = unassigned.iter().map(|t| (t.id.as_str(), t)).collect();
    // The volume homes first: a task is never assigned without its volume's home written
    // (both are in this pass's writes; a crash between them is healed by `homes`, which also
    // reads the homes off assigned tasks).
    let mut ops = crate::volumes::bind_ops(&decisions, &by_id, volumes, &homes, now);
    for d in decisions {
        let Some(t) = by_id.get(d.task_id()) else {
            continue;
        };
        let Some(t) = decided(t, d, now) else {
            continue;
        };
        if let Ok(v) = encode(&t) {
            ops.push(Op::update(Table::Tasks, &t.id, v, Some(t.meta.version)));
        }
    }
    ops
}

/// `t` as the scheduler's decision leaves it, or `None` when the decision changes nothing.
fn decided(t: &Task, d: Decision, now: u64) -> Option<Task> {
    let mut t = t.clone();
    match d {
        Decision::Assign { node_id, .. } => {
            t.status = TaskStatus::new(TaskState::Assigned, now, "scheduler assigned task to node");
            t.node_id = Some(node_id);
        }
        Decision::NoSuitableNode { reason, .. } => {
            if t.status.state == TaskState::Pending && t.status.message == reason {
                return None;
            }
            t.status = TaskStatus::new(TaskState::Pending, now, reason);
        }
    }
    t.meta.updated_at = now;
    Some(t)
}

/// One pass: allocate addresses, reconcile every service, then schedule. Returns the earliest
/// wake-up wanted.
async fn pass(mgr: &Arc<Manager>, cfg: &OrchestratorConfig) -> Result<Option<u64>, StoreError> {
    let now = now_ms();
    let (services, nodes) = allocated(mgr, now).await?;
    let keys_wake = match crate::tunnel::ensure_keys(mgr, now).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "making the tunnel keys failed; retrying soon");
            Some(now + 1000)
        }
    };
    let tasks: Vec<Task> = read(mgr).await?;
    let (wake, wrote) = reconcile_all(mgr, &services, &nodes, &tasks, now, cfg).await?;
    // Schedule on the state after this pass's writes.
    let tasks: Vec<Task> = if wrote { read(mgr).await? } else { tasks };
    let volumes: Vec<Volume> = read(mgr).await?;
    let ops = schedule_ops(&tasks, &nodes, &volumes, &mgr.moves.holding(), now);
    if !ops.is_empty() {
        write_chunked(mgr, ops, "schedule").await?;
    }
    Ok(min_opt(wake, keys_wake))
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

pub async fn control_loop(mgr: Arc<Manager>, mut stop: watch::Receiver<bool>) {
    let cfg = OrchestratorConfig {
        task_history: mgr.config.task_history.max(1),
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
