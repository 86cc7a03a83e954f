//! Scheduler throughput on a simulated cluster: 10,000 nodes, 1,000,000 tasks placed in
//! batches (mixed services: plain, constrained, spread over zones, with memory reservations).
//!
//! Run: `cargo run --release -p flotilla-control --example sched_bench [nodes] [tasks] [batch] [commit]`
//!
//! With `commit`, every batch's assignments are also written, as the leader's control loop
//! writes them (each task as JSON, ops in entries of at most half the store's batch limit), to
//! a real single-manager store (openraft + redb, fsync on) in a temporary directory, and the
//! time to place *and commit* all tasks is reported.
//!
//! Prints placements/s and total time, plus an anchor (sorting 10M u64 in the same run) so
//! numbers from different machines can be compared.

use std::collections::BTreeMap;
use std::time::Instant;

use flotilla_control::{Decision, Scheduler};
use flotilla_store::{Batch, Op, RaftTransport, Store, StoreConfig, Table, TransportError};
use flotilla_types::{
    Availability, ContainerSpec, Meta, Node, NodeDescription, NodeRole, NodeSpec, NodeState,
    NodeStatus, Resources, Task, TaskSpec, TaskState, TaskStatus,
};

const SERVICES: usize = 100;
const ZONES: usize = 10;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn make_node(i: usize) -> Node {
    let mut labels = BTreeMap::new();
    labels.insert("zone".to_string(), format!("z{}", i % ZONES));
    if i.is_multiple_of(2) {
        labels.insert("disk".to_string(), "ssd".to_string());
    }
    Node {
        id: format!("node{i:06}"),
        meta: Meta::default(),
        spec: NodeSpec {
            name: format!("node{i}"),
            role: if i < 5 {
                NodeRole::Manager
            } else {
                NodeRole::Worker
            },
            availability: Availability::Active,
            labels,
        },
        description: NodeDescription {
            hostname: format!("host{i}"),
            os: "linux".into(),
            arch: "x86_64".into(),
            resources: Resources {
                nano_cpus: 64_000_000_000,
                memory_bytes: 256 << 30,
            },
            engine: BTreeMap::new(),
        },
        status: NodeStatus {
            state: NodeState::Ready,
            message: String::new(),
            addr: String::new(),
            last_heartbeat: 0,
        },
        manager_status: None,
        network: None,
    }
}

fn template(service: usize) -> TaskSpec {
    let mut spec = TaskSpec {
        container: ContainerSpec {
            image: format!("app{service}@sha256:0123"),
            ..Default::default()
        },
        ..Default::default()
    };
    match service % 4 {
        1 => {
            spec.placement.constraints =
                vec!["node.labels.disk==ssd".into(), "node.role!=manager".into()]
        }
        2 => spec.placement.preferences = vec!["spread=node.labels.zone".into()],
        3 => {
            spec.resources.reservations.memory_bytes = 64 << 20;
            spec.resources.reservations.nano_cpus = 100_000_000;
        }
        _ => {}
    }
    spec
}

/// A single manager never sends Raft RPCs.
struct NoPeers;

impl RaftTransport for NoPeers {
    fn call(
        &self,
        target: flotilla_store::NodeId,
        _addr: &str,
        _rpc: flotilla_store::RpcKind,
        _body: Vec<u8>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<u8>, TransportError>> + Send + '_>,
    > {
        Box::pin(async move { Err(TransportError::Unreachable(format!("no peer {target}"))) })
    }
}

/// Commits assignment updates the way the control loop does; returns the entries written.
async fn commit(store: &Store, tasks: &[Task]) -> usize {
    let limit = store.config().max_batch_bytes / 2;
    let mut batch = Batch::new();
    let mut entries = 0;
    for t in tasks {
        let value = serde_json::to_vec(t).expect("encode task");
        batch.push(Op::upsert(Table::Tasks, &t.id, value));
        if batch.approx_size() >= limit {
            store
                .write(std::mem::take(&mut batch))
                .await
                .expect("write");
            entries += 1;
        }
    }
    if !batch.is_empty() {
        store.write(batch).await.expect("write");
        entries += 1;
    }
    entries
}

fn main() {
    let n_nodes = arg(1, 10_000);
    let n_tasks = arg(2, 1_000_000);
    let batch = arg(3, 10_000).max(1);
    let with_commit = std::env::args().nth(4).as_deref() == Some("commit");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = with_commit.then(|| {
        rt.block_on(async {
            let cfg = StoreConfig {
                node_id: 1,
                data_dir: dir.path().to_path_buf(),
                write_timeout: std::time::Duration::from_secs(60),
                ..Default::default()
            };
            let store = Store::open(cfg, std::sync::Arc::new(NoPeers))
                .await
                .expect("open store");
            store.initialize("bench://1".into()).await.expect("init");
            while !store.status().is_leader() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            store
        })
    });
    let mut commit_time = 0.0f64;
    let mut entries = 0usize;

    let nodes: Vec<Node> = (0..n_nodes).map(make_node).collect();
    let templates: Vec<TaskSpec> = (0..SERVICES).map(template).collect();

    // Anchor: a fixed amount of plain CPU work, measured in the same run.
    let t = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v: Vec<u64> = (0..10_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect();
    v.sort_unstable();
    let anchor = t.elapsed().as_secs_f64();
    std::hint::black_box(&v);

    let start = Instant::now();
    let mut sched = Scheduler::new(&nodes, &[]);
    let build = start.elapsed().as_secs_f64();
    let mut placed = 0usize;
    let mut failed = 0usize;
    let mut sched_time = 0.0f64;
    let mut worst_batch = 0.0f64;
    let mut next = 0usize;
    while next < n_tasks {
        let end = (next + batch).min(n_tasks);
        // Each batch mixes all services (round-robin), like a burst of scale-ups.
        let tasks: Vec<Task> = (next..end)
            .map(|k| {
                let s = k % SERVICES;
                Task {
                    id: format!("task{k:09}"),
                    meta: Meta::default(),
                    service_id: format!("svc{s:03}"),
                    slot: Some((k / SERVICES) as u64 + 1),
                    node_id: None,
                    spec: templates[s].clone(),
                    spec_version: 1,
                    job_iteration: 0,
                    desired_state: TaskState::Running,
                    status: TaskStatus::new(TaskState::New, 0, "created"),
                }
            })
            .collect();
        let t = Instant::now();
        let ds = sched.schedule(&tasks);
        let dt = t.elapsed().as_secs_f64();
        sched_time += dt;
        worst_batch = worst_batch.max(dt);
        let mut assigned = Vec::with_capacity(ds.len());
        let mut by_id: std::collections::HashMap<String, Task> =
            tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
        for d in &ds {
            match d {
                Decision::Assign { task_id, node_id } => {
                    placed += 1;
                    if let (Some(mut t), true) = (by_id.remove(task_id), store.is_some()) {
                        t.node_id = Some(node_id.clone());
                        t.status = TaskStatus::new(TaskState::Assigned, 0, "assigned");
                        assigned.push(t);
                    }
                }
                Decision::NoSuitableNode { .. } => failed += 1,
            }
        }
        if let Some(store) = &store {
            let t = Instant::now();
            entries += rt.block_on(commit(store, &assigned));
            commit_time += t.elapsed().as_secs_f64();
        }
        next = end;
    }
    let total = start.elapsed().as_secs_f64();
    let min = (0..n_nodes)
        .map(|i| sched.tasks_on(&format!("node{i:06}")))
        .min()
        .unwrap_or(0);
    let max = (0..n_nodes)
        .map(|i| sched.tasks_on(&format!("node{i:06}")))
        .max()
        .unwrap_or(0);

    println!("scheduler bench: {n_nodes} nodes, {n_tasks} tasks, batches of {batch}, {SERVICES} services");
    println!("placed {placed}, no suitable node {failed}; tasks per node min {min} max {max}");
    println!("build view: {build:.3} s");
    println!(
        "scheduling: {sched_time:.3} s = {:.0} placements/s (worst batch {:.1} ms)",
        placed as f64 / sched_time,
        worst_batch * 1e3
    );
    println!("total (incl. generating tasks): {total:.3} s");
    println!(
        "anchor (sort 10M u64): {anchor:.3} s; scheduling/anchor = {:.2}",
        sched_time / anchor
    );
    if let Some(store) = store {
        println!(
            "committed: {placed} assignments in {entries} Raft entries, {commit_time:.3} s writing; placed + committed = {:.3} s ({:.0} tasks/s)",
            sched_time + commit_time,
            placed as f64 / (sched_time + commit_time)
        );
        let _ = rt.block_on(store.shutdown());
    }
}
