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
/// decisions for the ones that must wait.
pub fn constrain(
    unassigned: &[Task],
    homes: &HashMap<String, String>,
    nodes: &[Node],
) -> (Vec<Task>, Vec<Decision>) {
    let node = |id: &str| nodes.iter().find(|n| n.id == id);
    let mut place = Vec::new();
    let mut wait = Vec::new();
    // A volume without a home is placed with one task per pass; the others follow it.
    let mut homing: HashSet<String> = HashSet::new();
    'tasks: for t in unassigned {
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
        let held = tasks.iter().any(|o| {
            o.id != t.id
                && o.node_id.is_some()
                && o.status.state >= TaskState::Assigned
                && o.status.state <= TaskState::Running
                && named(o).any(|m| mounts.iter().any(|x| x.source == m.source))
        });
        if held {
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

/// How often the leader looks for volumes a drain should move.
const MOVER_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The leader moves the volumes of tasks a drain stopped to the node the scheduler picks for
/// each task ([`drain_moves`]), one at a time, with `volume move` (a checked copy over mTLS,
/// then the new home). A move refused because the old container has not let go yet is
/// retried on the next tick.
pub async fn mover_loop(
    mgr: std::sync::Arc<crate::manager::Manager>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(MOVER_PERIOD);
    loop {
        tokio::select! {
            _ = flotilla_api::server::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        if !mgr.is_leader() {
            continue;
        }
        let plan = mgr
            .blocking(|m| {
                let volumes: Vec<Volume> = m.list()?;
                let tasks: Vec<Task> = m.list()?;
                let nodes: Vec<Node> = m.list()?;
                Ok(drain_moves(&volumes, &tasks, &nodes))
            })
            .await;
        let Ok(plan) = plan else { continue };
        for (volume, from, to) in plan {
            match crate::api::storage::move_to(&mgr, &volume, &to).await {
                Ok(m) => tracing::info!(
                    %volume, %from, %to, bytes = m.bytes, copy_ms = m.copy_ms,
                    source_removed = m.source_removed, "moved a drained node's volume with its task"
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
        let (place, wait) = constrain(&[task("t1", "db")], &homes, &nodes);
        assert!(wait.is_empty());
        assert_eq!(place[0].node_id.as_deref(), Some("n2"));

        let nodes = [node("n1", NodeState::Ready), node("n2", NodeState::Down)];
        let (place, wait) = constrain(&[task("t1", "db")], &homes, &nodes);
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
    fn a_new_volume_is_placed_once_and_bound_to_the_first_node() {
        let homes = HashMap::new();
        let ts = [task("t1", "new"), task("t2", "new"), task("t3", "other")];
        let (place, wait) = constrain(&ts, &homes, &[node("n1", NodeState::Ready)]);
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
