//! Where tasks with volumes may run: a named volume's data lives on one node (its home), so a
//! task mounting it is placed there, and waits (`pending`, with the reason) while that node is
//! down or drained rather than starting elsewhere on an empty directory. A volume without a
//! home gets the node of the first task placed with it, written in the same pass.
//!
//! Pure functions over the leader's lists; `control.rs` calls them around the scheduler.

use std::collections::{HashMap, HashSet};

use flotilla_control::Decision;
use flotilla_store::{Op, Table};
use flotilla_types::{Availability, Meta, MountKind, Node, NodeState, Task, TaskState, Volume};

use crate::manager::encode;

/// The named volumes a task mounts, with the labels a mount gives a volume it creates.
fn named(t: &Task) -> impl Iterator<Item = &flotilla_types::Mount> {
    t.spec
        .container
        .mounts
        .iter()
        .filter(|m| m.kind == MountKind::Volume && !m.source.is_empty())
}

/// Volume name → home node: from the volume objects, else from a task that already holds the
/// volume on a node (assigned up to running), so a home is never lost between two writes.
pub fn homes(volumes: &[Volume], tasks: &[Task]) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = volumes
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.node_id.clone()?)))
        .collect();
    for t in tasks {
        let Some(node) = &t.node_id else { continue };
        if t.status.state < TaskState::Assigned || t.status.state > TaskState::Running {
            continue;
        }
        for m in named(t) {
            out.entry(m.source.clone()).or_insert_with(|| node.clone());
        }
    }
    out
}

/// Splits the tasks waiting for a node: the ones the scheduler may place (a task whose volume
/// has a home is handed over with that node set, so the scheduler checks only that node), and
/// decisions for the ones that must wait. `moving` holds the volumes a `volume move` is
/// taking elsewhere (volume → target node): their tasks wait until the new home is written.
pub fn constrain(
    unassigned: &[Task],
    homes: &HashMap<String, String>,
    nodes: &[Node],
    moving: &HashMap<String, String>,
) -> (Vec<Task>, Vec<Decision>) {
    let node = |id: &str| nodes.iter().find(|n| n.id == id);
    let mut place = Vec::new();
    let mut wait = Vec::new();
    // A volume without a home is placed with one task per pass; the others follow it.
    let mut homing: HashSet<String> = HashSet::new();
    'tasks: for t in unassigned {
        if let Some((vol, to)) = named(t).find_map(|m| Some((&m.source, moving.get(&m.source)?))) {
            let to = node(to).map_or(to.as_str(), |n| n.spec.name.as_str());
            wait.push(Decision::NoSuitableNode {
                task_id: t.id.clone(),
                reason: format!(
                    "volume {vol} is moving to node {to}: the task starts there once the copy \
                     is checked"
                ),
            });
            continue;
        }
        let mut home: Option<(&str, &str)> = None;
        for m in named(t) {
            match homes.get(&m.source) {
                Some(h) => match home {
                    Some((other_vol, other)) if other != h => {
                        wait.push(Decision::NoSuitableNode {
                            task_id: t.id.clone(),
                            reason: format!(
                                "volumes {other_vol} and {} live on different nodes ({other} and {h}); a task mounts volumes of one node",
                                m.source
                            ),
                        });
                        continue 'tasks;
                    }
                    _ => home = Some((m.source.as_str(), h.as_str())),
                },
                None => {
                    if !homing.insert(m.source.clone()) {
                        wait.push(Decision::NoSuitableNode {
                            task_id: t.id.clone(),
                            reason: format!("waiting for volume {} to be placed", m.source),
                        });
                        continue 'tasks;
                    }
                }
            }
        }
        let Some((vol, h)) = home else {
            place.push(t.clone());
            continue;
        };
        if let Some(pre) = &t.node_id {
            if pre != h {
                wait.push(Decision::NoSuitableNode {
                    task_id: t.id.clone(),
                    reason: format!("volume {vol} lives on node {h}, not on this task's node"),
                });
                continue;
            }
        }
        let why = match node(h) {
            None => Some(format!(
                "volume {vol} lives on node {h}, which left the cluster: `flotilla volume rm --force {vol}` forgets it"
            )),
            Some(n) if n.status.state != NodeState::Ready => Some(format!(
                "volume {vol} lives on node {} ({}), which is {}: the task waits for it",
                n.spec.name,
                n.id,
                n.status.state.as_str()
            )),
            Some(n) if n.spec.availability == Availability::Drain => Some(format!(
                "volume {vol} lives on node {} ({}), which is drained: the volume moves to the \
                 node this task gets (`flotilla volume move {vol} --to NODE` chooses one)",
                n.spec.name, n.id
            )),
            Some(n) if n.spec.availability != Availability::Active => Some(format!(
                "volume {vol} lives on node {} ({}), whose availability is {}: the task waits \
                 for it (`flotilla volume move {vol} --to NODE` takes the data elsewhere)",
                n.spec.name,
                n.id,
                n.spec.availability.as_str()
            )),
            Some(_) => None,
        };
        if let Some(reason) = why {
            wait.push(Decision::NoSuitableNode {
                task_id: t.id.clone(),
                reason,
            });
            continue;
        }
        // As a global task: the scheduler only checks that node (constraints, resources).
        let mut t = t.clone();
        t.node_id = Some(h.to_string());
        place.push(t);
    }
    (place, wait)
}

/// The writes that give volumes their homes: for each task assigned in this pass that mounts a
/// volume without one, the volume object (created, or updated with the node).
pub fn bind_ops(
    decisions: &[Decision],
    tasks: &HashMap<&str, &Task>,
    volumes: &[Volume],
    homes: &HashMap<String, String>,
    now: u64,
) -> Vec<Op> {
    let by_name: HashMap<&str, &Volume> = volumes.iter().map(|v| (v.name.as_str(), v)).collect();
    let mut ops = Vec::new();
    let mut done = HashSet::new();
    for d in decisions {
        let Decision::Assign { task_id, node_id } = d else {
            continue;
        };
        let Some(t) = tasks.get(task_id.as_str()) else {
            continue;
        };
        for m in named(t) {
            let existing = by_name.get(m.source.as_str());
            if existing.is_some_and(|v| v.node_id.is_some()) || !done.insert(m.source.clone()) {
                continue;
            }
            let mut v = existing.map(|v| (*v).clone()).unwrap_or_else(|| Volume {
                name: m.source.clone(),
                meta: Meta {
                    version: 0,
                    created_at: now,
                    updated_at: now,
                },
                labels: m.volume_labels.clone(),
                driver: "local".into(),
                ..Default::default()
            });
            let node = homes.get(&m.source).unwrap_or(node_id);
            v.node_id = Some(node.clone());
            v.meta.updated_at = now;
            let Ok(value) = encode(&v) else { continue };
            ops.push(match existing {
                Some(e) => Op::update(Table::Volumes, &v.name, value, Some(e.meta.version)),
                None => Op::create(Table::Volumes, &v.name, value),
            });
        }
    }
    ops
}

/// The volume moves a drain asks for: for each task waiting (pending, not bound to a node)
/// for unshared volumes that all live on one ready but drained node, the node the scheduler
/// would give that task if its data were elsewhere: (volume name, from node, to node). One
/// move per volume; none while another live task holds the volume.
pub fn drain_moves(
    volumes: &[Volume],
    tasks: &[Task],
    nodes: &[Node],
) -> Vec<(String, String, String)> {
    planned_moves(volumes, tasks, nodes, false)
}

/// The pre-copies a drain asks for: as [`drain_moves`], but for the volumes another task
/// still runs with on the drained node (the one whose stop [`hold_stops`] holds back): the
/// first pass copies them while it runs.
pub fn precopy_moves(
    volumes: &[Volume],
    tasks: &[Task],
    nodes: &[Node],
) -> Vec<(String, String, String)> {
    planned_moves(volumes, tasks, nodes, true)
}

fn planned_moves(
    volumes: &[Volume],
    tasks: &[Task],
    nodes: &[Node],
    running: bool,
) -> Vec<(String, String, String)> {
    let homes = homes(volumes, tasks);
    let node = |id: &str| nodes.iter().find(|n| n.id == id);
    let mut out: Vec<(String, String, String)> = Vec::new();
    let mut planned: HashSet<String> = HashSet::new();
    for t in tasks {
        if t.desired_state != TaskState::Running
            || t.status.state != TaskState::Pending
            || t.node_id.is_some()
        {
            continue;
        }
        let mounts: Vec<&flotilla_types::Mount> = named(t).collect();
        if mounts.is_empty() || mounts.iter().any(|m| m.shared) {
            continue;
        }
        let mut from: Option<&str> = None;
        let mut one_home = true;
        for m in &mounts {
            match (homes.get(&m.source), from) {
                (Some(h), None) => from = Some(h),
                (Some(h), Some(f)) if h == f => {}
                _ => one_home = false,
            }
        }
        let (true, Some(from)) = (one_home, from) else {
            continue;
        };
        let drained = node(from).is_some_and(|n| {
            n.status.state == NodeState::Ready && n.spec.availability == Availability::Drain
        });
        if !drained || mounts.iter().any(|m| planned.contains(&m.source)) {
            continue;
        }
        // Another live task still holding one of the volumes (the one the drain is stopping).
        // The final pass waits until none does (one writer); a pre-copy wants the one that
        // still runs on the drained node.
        let holders: Vec<&Task> = tasks
            .iter()
            .filter(|o| {
                o.id != t.id
                    && o.node_id.is_some()
                    && o.status.state >= TaskState::Assigned
                    && o.status.state <= TaskState::Running
                    && named(o).any(|m| mounts.iter().any(|x| x.source == m.source))
            })
            .collect();
        let wanted = if running {
            !holders.is_empty()
                && holders.iter().all(|o| {
                    o.status.state == TaskState::Running && o.node_id.as_deref() == Some(from)
                })
        } else {
            holders.is_empty()
        };
        if !wanted {
            continue;
        }
        let others: Vec<Node> = nodes.iter().filter(|n| n.id != from).cloned().collect();
        let decision = flotilla_control::schedule(std::slice::from_ref(t), &others, tasks);
        let Some(Decision::Assign { node_id, .. }) = decision.into_iter().next() else {
            continue;
        };
        for m in &mounts {
            planned.insert(m.source.clone());
            out.push((m.source.clone(), from.to_string(), node_id.clone()));
        }
    }
    out
}

/// How often the leader looks for volumes a drain should move (it also looks on every store
/// change).
const MOVER_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a stop stays held for a pre-copy nobody started (no node for the task, say).
const HOLD_UNSTARTED: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a finished pre-copy waits for its final pass before its copy is dropped (the
/// drain was undone, or the task went elsewhere).
const PRECOPY_STALE: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a volume's move stands, as the leader keeps it in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The first pass runs, the task still running on the old node.
    PreCopying,
    /// The first pass is on the new node; the task may stop.
    PreCopied(flotilla_types::VolumePass),
    /// The first pass failed: the task stops, the move copies everything after it.
    GivenUp,
    /// The final pass (or a one-pass copy) runs.
    Copying,
}

/// One volume's move.
#[derive(Clone, Debug)]
pub struct MoveState {
    pub from: String,
    pub to: String,
    pub phase: Phase,
    /// Bytes of the running pass relayed so far, and the volume's size when it started.
    pub done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub total: u64,
    pub since: std::time::Instant,
    /// A `volume move` that stopped the volume's task: tasks wanting the volume wait
    /// ([`constrain`]) until the new home is written or the move gives up.
    pub hold: bool,
}

impl MoveState {
    pub fn new(from: &str, to: &str, phase: Phase) -> MoveState {
        MoveState {
            from: from.to_string(),
            to: to.to_string(),
            phase,
            done: Default::default(),
            total: 0,
            since: std::time::Instant::now(),
            hold: false,
        }
    }

    /// As `volume inspect` shows it.
    pub fn shown(&self) -> flotilla_types::VolumeMoving {
        let pass = match &self.phase {
            Phase::PreCopying => "pre-copy",
            Phase::PreCopied(_) => "pre-copied",
            Phase::GivenUp => "pre-copy failed",
            Phase::Copying => "final",
        };
        flotilla_types::VolumeMoving {
            to: self.to.clone(),
            pass: pass.to_string(),
            bytes_done: self.done.load(std::sync::atomic::Ordering::Relaxed),
            bytes_total: self.total,
        }
    }
}

/// The leader's volume moves under way (in memory: a new leader starts over, and the next
/// move to a node deletes the copy a lost move left there, `api::storage::clear_leftover`),
/// and the stops
/// held for them.
#[derive(Default)]
pub struct Moves {
    inner: std::sync::Mutex<MovesInner>,
}

#[derive(Default)]
struct MovesInner {
    by_volume: HashMap<String, MoveState>,
    /// Task id → when its stop was first held.
    held: HashMap<String, std::time::Instant>,
}

impl Moves {
    fn lock(&self) -> std::sync::MutexGuard<'_, MovesInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, volume: &str) -> Option<MoveState> {
        self.lock().by_volume.get(volume).cloned()
    }

    pub fn set(&self, volume: &str, st: MoveState) {
        self.lock().by_volume.insert(volume.to_string(), st);
    }

    /// Sets the phase of a move that is still recorded (keeps its progress counter).
    pub fn set_phase(&self, volume: &str, phase: Phase) {
        if let Some(st) = self.lock().by_volume.get_mut(volume) {
            st.phase = phase;
            st.since = std::time::Instant::now();
        }
    }

    /// Records `st` unless a move of `volume` is recorded already; whether it was.
    pub fn start(&self, volume: &str, st: MoveState) -> bool {
        match self.lock().by_volume.entry(volume.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(st);
                true
            }
        }
    }

    pub fn remove(&self, volume: &str) -> Option<MoveState> {
        self.lock().by_volume.remove(volume)
    }

    /// The volumes whose tasks must wait (volume → target node): moves with `hold`.
    pub fn holding(&self) -> HashMap<String, String> {
        self.lock()
            .by_volume
            .iter()
            .filter(|(_, m)| m.hold)
            .map(|(v, m)| (v.clone(), m.to.clone()))
            .collect()
    }

    /// Every recorded move.
    pub fn all(&self) -> Vec<(String, MoveState)> {
        self.lock()
            .by_volume
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Filters the orchestrator's `actions` through [`hold_stops`] with what is recorded
    /// here; returns the task ids held.
    pub fn gate(
        &self,
        actions: &mut Vec<flotilla_control::Action>,
        tasks: &[Task],
        nodes: &[Node],
    ) -> Vec<String> {
        let mut inner = self.lock();
        let now = std::time::Instant::now();
        let MovesInner { by_volume, held } = &mut *inner;
        let precopy = |volume: &str, task: &str| match by_volume.get(volume).map(|m| &m.phase) {
            Some(Phase::PreCopied(_)) | Some(Phase::GivenUp) => Gate::Release,
            Some(Phase::PreCopying) | Some(Phase::Copying) => Gate::Hold,
            None => match held.get(task) {
                Some(at) if now.duration_since(*at) >= HOLD_UNSTARTED => Gate::Release,
                _ => Gate::Hold,
            },
        };
        let ids = hold_stops(actions, tasks, nodes, precopy);
        // Called once per service: entries of other services stay; old ones go.
        held.retain(|_, at| now.duration_since(*at) < HOLD_UNSTARTED * 30);
        for id in &ids {
            held.entry(id.clone()).or_insert(now);
        }
        ids
    }
}

/// What a held stop waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Keep the task running (its volume's pre-copy runs or is about to start).
    Hold,
    /// Let it stop (pre-copied, or the pre-copy failed or never started).
    Release,
}

/// The pre-copy gate of a drain: removes from `actions` each order to stop a task that runs on
/// a ready, drained node with unshared volumes while a task waits to replace it there (pending,
/// or created by these same actions) and `precopy(volume, task)` says to hold it; the next
/// control pass orders the stop again. Keeping the old task running while the first pass
/// copies its volume is what makes the downtime the final pass only. Returns the ids held.
pub fn hold_stops(
    actions: &mut Vec<flotilla_control::Action>,
    tasks: &[Task],
    nodes: &[Node],
    precopy: impl Fn(&str, &str) -> Gate,
) -> Vec<String> {
    use flotilla_control::Action;
    let created: Vec<Task> = actions
        .iter()
        .filter_map(|a| match a {
            Action::CreateTask(t) => Some((**t).clone()),
            _ => None,
        })
        .collect();
    let mut held = Vec::new();
    actions.retain(|a| {
        let Action::UpdateTask(u) = a else {
            return true;
        };
        if u.desired_state != Some(TaskState::Shutdown) || u.status.is_some() {
            return true;
        }
        let Some(t) = tasks.iter().find(|t| t.id == u.task_id) else {
            return true;
        };
        let Some(node) = t.node_id.as_deref() else {
            return true;
        };
        let drained = nodes.iter().any(|n| {
            n.id == node
                && n.status.state == NodeState::Ready
                && n.spec.availability == Availability::Drain
        });
        let mounts: Vec<&flotilla_types::Mount> = named(t).collect();
        if t.status.state != TaskState::Running
            || !drained
            || mounts.is_empty()
            || mounts.iter().any(|m| m.shared)
        {
            return true;
        }
        let replaced = tasks
            .iter()
            .filter(|o| {
                o.id != t.id
                    && o.node_id.is_none()
                    && o.desired_state == TaskState::Running
                    && matches!(o.status.state, TaskState::New | TaskState::Pending)
            })
            .chain(created.iter())
            .any(|o| named(o).any(|m| mounts.iter().any(|x| x.source == m.source)));
        if !replaced {
            return true;
        }
        if mounts
            .iter()
            .any(|m| precopy(&m.source, &t.id) == Gate::Hold)
        {
            held.push(t.id.clone());
            return false;
        }
        true
    });
    held
}

/// The leader's drain mover. For a task a drain wants off its node with unshared volumes,
/// the control loop holds the stop ([`Moves::gate`]) while this loop copies the volumes to
/// the node the scheduler picks for the replacement ([`precopy_moves`], the first pass, the
/// task still running); then the stop goes through, and once no task holds the volumes
/// ([`drain_moves`]) the final pass sends what changed and the new home is written
/// (`api::storage::move_to`). Without a first pass (it failed, or none could start) the
/// move is one full copy. Runs every second and on each store change; one final move at a
/// time, pre-copies in the background.
pub async fn mover_loop(
    mgr: std::sync::Arc<crate::manager::Manager>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(MOVER_PERIOD);
    let mut watcher = mgr.store.watch(mgr.store.revision()).ok();
    loop {
        tokio::select! {
            _ = flotilla_api::server::stopped(&mut stop) => return,
            _ = tick.tick() => {}
            ev = async {
                match watcher.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            } => {
                if !matches!(ev, Some(Ok(_))) {
                    watcher = mgr.store.watch(mgr.store.revision()).ok();
                }
            }
        }
        if !mgr.is_leader() {
            continue;
        }
        let plan = mgr
            .blocking(|m| {
                let volumes: Vec<Volume> = m.list()?;
                let tasks: Vec<Task> = m.list()?;
                let nodes: Vec<Node> = m.list()?;
                Ok((
                    precopy_moves(&volumes, &tasks, &nodes),
                    drain_moves(&volumes, &tasks, &nodes),
                ))
            })
            .await;
        let Ok((pre, finals)) = plan else { continue };
        for (volume, from, to) in pre {
            if !mgr
                .moves
                .start(&volume, MoveState::new(&from, &to, Phase::PreCopying))
            {
                continue;
            }
            let mgr = mgr.clone();
            tokio::spawn(async move {
                let phase = match crate::api::storage::precopy(&mgr, &volume, &from, &to).await {
                    Ok(pass) => {
                        tracing::info!(%volume, %from, %to, bytes = pass.bytes, ms = pass.ms,
                            "pre-copied a drained node's volume; its task may stop");
                        Phase::PreCopied(pass)
                    }
                    Err(e) => {
                        tracing::warn!(%volume, %from, %to, error = %e,
                            "pre-copy failed: the task stops and the volume is copied whole");
                        Phase::GivenUp
                    }
                };
                mgr.moves.set_phase(&volume, phase);
                mgr.wake.notify_one();
            });
        }
        let planned: HashSet<&str> = finals.iter().map(|(v, _, _)| v.as_str()).collect();
        for (volume, st) in mgr.moves.all() {
            let stale = !st.hold
                && st.since.elapsed() >= PRECOPY_STALE
                && !planned.contains(volume.as_str());
            if stale && matches!(st.phase, Phase::PreCopied(_) | Phase::GivenUp) {
                let still_held = mgr
                    .blocking({
                        let volume = volume.clone();
                        move |m| {
                            let volumes: Vec<Volume> = m.list()?;
                            let tasks: Vec<Task> = m.list()?;
                            let nodes: Vec<Node> = m.list()?;
                            Ok(precopy_moves(&volumes, &tasks, &nodes)
                                .iter()
                                .any(|(v, _, _)| *v == volume))
                        }
                    })
                    .await
                    .unwrap_or(true);
                if !still_held {
                    tracing::info!(%volume, to = %st.to, "a pre-copy nobody finished: its copy is dropped");
                    crate::api::storage::drop_precopy(&mgr, &volume, &st).await;
                }
            }
        }
        for (volume, from, to) in finals {
            match crate::api::storage::move_to(&mgr, &volume, &to).await {
                Ok(m) => tracing::info!(
                    %volume, %from, %to, bytes = m.bytes, copy_ms = m.copy_ms,
                    passes = m.passes.len(), source_removed = m.source_removed,
                    "moved a drained node's volume with its task"
                ),
                Err(e) => {
                    tracing::debug!(%volume, %from, %to, error = %e, "moving a drained node's volume: retrying")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::{Mount, TaskStatus};

    fn task(id: &str, vol: &str) -> Task {
        let mut t = Task {
            id: id.into(),
            meta: Meta::default(),
            service_id: "s".into(),
            slot: Some(1),
            node_id: None,
            spec: Default::default(),
            spec_version: 1,
            job_iteration: 0,
            status: TaskStatus::new(TaskState::Pending, 0, "new"),
            desired_state: TaskState::Running,
        };
        t.spec.container.mounts.push(Mount {
            source: vol.into(),
            target: "/data".into(),
            ..Default::default()
        });
        t
    }

    fn node(id: &str, state: NodeState) -> Node {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "spec": {"name": id, "role": "worker", "availability": "active", "labels": {}},
            "description": {"hostname": id, "os": "linux", "arch": "x86_64", "resources": {"nano_cpus": 1, "memory_bytes": 1}},
            "status": {"state": state.as_str(), "message": "", "addr": "127.0.0.1:1", "last_heartbeat": 0}
        }))
        .expect("node json")
    }

    #[test]
    fn a_task_goes_to_its_volume_and_waits_for_a_down_home() {
        let homes: HashMap<String, String> = [("db".to_string(), "n2".to_string())].into();
        let nodes = [node("n1", NodeState::Ready), node("n2", NodeState::Ready)];
        let (place, wait) = constrain(&[task("t1", "db")], &homes, &nodes, &HashMap::new());
        assert!(wait.is_empty());
        assert_eq!(place[0].node_id.as_deref(), Some("n2"));

        let nodes = [node("n1", NodeState::Ready), node("n2", NodeState::Down)];
        let (place, wait) = constrain(&[task("t1", "db")], &homes, &nodes, &HashMap::new());
        assert!(place.is_empty());
        match &wait[0] {
            Decision::NoSuitableNode { reason, .. } => {
                assert!(
                    reason.contains("volume db lives on node n2") && reason.contains("down"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_task_waits_while_its_volume_moves_even_to_a_ready_home() {
        let homes: HashMap<String, String> = [("db".to_string(), "n1".to_string())].into();
        let nodes = [node("n1", NodeState::Ready), node("n2", NodeState::Ready)];
        let moving: HashMap<String, String> = [("db".to_string(), "n2".to_string())].into();
        let ts = [task("t1", "db"), task("t2", "other")];
        let (place, wait) = constrain(&ts, &homes, &nodes, &moving);
        assert_eq!(place.len(), 1, "the other volume's task is placed");
        assert_eq!(place[0].id, "t2");
        match &wait[0] {
            Decision::NoSuitableNode { task_id, reason } => {
                assert_eq!(task_id, "t1");
                assert!(reason.contains("volume db is moving to node"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_volume_is_placed_once_and_bound_to_the_first_node() {
        let homes = HashMap::new();
        let ts = [task("t1", "new"), task("t2", "new"), task("t3", "other")];
        let (place, wait) = constrain(
            &ts,
            &homes,
            &[node("n1", NodeState::Ready)],
            &HashMap::new(),
        );
        assert_eq!(
            place.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            vec!["t1", "t3"]
        );
        assert_eq!(wait.len(), 1);
        let by_id: HashMap<&str, &Task> = ts.iter().map(|t| (t.id.as_str(), t)).collect();
        let ds = vec![
            Decision::Assign {
                task_id: "t1".into(),
                node_id: "n1".into(),
            },
            Decision::Assign {
                task_id: "t3".into(),
                node_id: "n1".into(),
            },
        ];
        let ops = bind_ops(&ds, &by_id, &[], &homes, 5);
        assert_eq!(ops.len(), 2);
    }

    #[test]
    fn a_drain_moves_a_waiting_tasks_volume_once_nothing_holds_it() {
        let drained = |id: &str| {
            let mut n = node(id, NodeState::Ready);
            n.spec.availability = Availability::Drain;
            n
        };
        let vol = |name: &str, home: &str| Volume {
            name: name.into(),
            node_id: Some(home.into()),
            ..Default::default()
        };
        let nodes = [drained("n1"), node("n2", NodeState::Ready)];
        let waiting = task("t2", "db");
        // The old task still runs on n1: nothing moves yet.
        let mut old = task("t1", "db");
        old.node_id = Some("n1".into());
        old.status.state = TaskState::Running;
        old.desired_state = TaskState::Shutdown;
        let vols = [vol("db", "n1")];
        assert!(drain_moves(&vols, &[old.clone(), waiting.clone()], &nodes).is_empty());
        // Stopped: the volume goes where the scheduler puts the task.
        old.status.state = TaskState::Shutdown;
        assert_eq!(
            drain_moves(&vols, &[old.clone(), waiting.clone()], &nodes),
            vec![("db".to_string(), "n1".to_string(), "n2".to_string())]
        );
        // Not for a pause, a down node, a shared mount, a task bound to its node, or when no
        // other node fits.
        let mut paused = drained("n1");
        paused.spec.availability = Availability::Pause;
        assert!(drain_moves(
            &vols,
            std::slice::from_ref(&waiting),
            &[paused, node("n2", NodeState::Ready)]
        )
        .is_empty());
        let mut down = drained("n1");
        down.status.state = NodeState::Down;
        assert!(drain_moves(
            &vols,
            std::slice::from_ref(&waiting),
            &[down, node("n2", NodeState::Ready)]
        )
        .is_empty());
        let mut shared = waiting.clone();
        shared.spec.container.mounts[0].shared = true;
        assert!(drain_moves(&vols, &[shared], &nodes).is_empty());
        let mut bound = waiting.clone();
        bound.node_id = Some("n1".into());
        assert!(drain_moves(&vols, &[bound], &nodes).is_empty());
        assert!(drain_moves(
            &vols,
            std::slice::from_ref(&waiting),
            &[drained("n1"), drained("n2")]
        )
        .is_empty());
        // Two tasks waiting for one volume: one move.
        let twice = drain_moves(&vols, &[waiting.clone(), task("t3", "db")], &nodes);
        assert_eq!(twice.len(), 1);
    }

    #[test]
    fn a_drain_holds_the_stop_until_the_pre_copy_and_the_final_move_waits_for_the_stop() {
        use flotilla_control::{Action, TaskUpdate};
        let mut drained = node("n1", NodeState::Ready);
        drained.spec.availability = Availability::Drain;
        let nodes = [drained.clone(), node("n2", NodeState::Ready)];
        let vols = [Volume {
            name: "db".into(),
            node_id: Some("n1".into()),
            ..Default::default()
        }];
        let mut old = task("t1", "db");
        old.node_id = Some("n1".into());
        old.status.state = TaskState::Running;
        let waiting = task("t2", "db");
        let stop = |t: &Task| {
            Action::UpdateTask(TaskUpdate {
                task_id: t.id.clone(),
                version: 0,
                desired_state: Some(TaskState::Shutdown),
                status: None,
            })
        };
        let tasks = [old.clone(), waiting.clone()];
        // While the pre-copy is to come or runs: held; the stop of another task is not.
        let mut other = task("t9", "other");
        other.node_id = Some("n1".into());
        other.status.state = TaskState::Running;
        let mut actions = vec![stop(&old), stop(&other)];
        let held = hold_stops(&mut actions, &tasks, &nodes, |_, _| Gate::Hold);
        assert_eq!(held, vec!["t1".to_string()]);
        assert_eq!(
            actions.len(),
            1,
            "only t9's stop goes through (nothing replaces it)"
        );
        // The replacement created in the same pass counts too.
        let mut actions = vec![stop(&old), Action::CreateTask(Box::new(waiting.clone()))];
        assert_eq!(
            hold_stops(&mut actions, std::slice::from_ref(&old), &nodes, |_, _| {
                Gate::Hold
            }),
            vec!["t1".to_string()]
        );
        // Pre-copied (or given up): the stop goes through.
        let mut actions = vec![stop(&old)];
        assert!(hold_stops(&mut actions, &tasks, &nodes, |_, _| Gate::Release).is_empty());
        assert_eq!(actions.len(), 1);
        // Not for an active node, a shared volume or a task not running.
        let mut actions = vec![stop(&old)];
        let active = [node("n1", NodeState::Ready), node("n2", NodeState::Ready)];
        assert!(hold_stops(&mut actions, &tasks, &active, |_, _| Gate::Hold).is_empty());
        let mut shared = old.clone();
        shared.spec.container.mounts[0].shared = true;
        let mut actions = vec![stop(&shared)];
        assert!(
            hold_stops(&mut actions, &[shared, waiting.clone()], &nodes, |_, _| {
                Gate::Hold
            })
            .is_empty()
        );

        // The mover: a pre-copy while t1 runs on the drained node, no final move yet (one
        // writer: the new copy is written only once the old task has stopped) …
        assert_eq!(
            precopy_moves(&vols, &tasks, &nodes),
            vec![("db".to_string(), "n1".to_string(), "n2".to_string())]
        );
        assert!(drain_moves(&vols, &tasks, &nodes).is_empty());
        // … still none while it stops …
        old.desired_state = TaskState::Shutdown;
        let stopping = [old.clone(), waiting.clone()];
        assert!(drain_moves(&vols, &stopping, &nodes).is_empty());
        // … and the final move once it has stopped.
        old.status.state = TaskState::Shutdown;
        let stopped = [old.clone(), waiting.clone()];
        assert!(precopy_moves(&vols, &stopped, &nodes).is_empty());
        assert_eq!(drain_moves(&vols, &stopped, &nodes).len(), 1);
    }

    #[test]
    fn homes_come_from_running_tasks_too() {
        let mut t = task("t1", "db");
        t.node_id = Some("n3".into());
        t.status.state = TaskState::Running;
        let h = homes(&[], &[t.clone()]);
        assert_eq!(h.get("db").map(String::as_str), Some("n3"));
        t.status.state = TaskState::Shutdown;
        assert!(homes(&[], &[t]).is_empty());
    }
}
