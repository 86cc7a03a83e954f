//! Builders shared by the unit tests.

use flotilla_types::{
    Availability, Meta, Node, NodeDescription, NodeRole, NodeSpec, NodeState, NodeStatus, Resources,
};

pub fn node(id: &str) -> Node {
    Node {
        id: id.to_string(),
        meta: Meta::default(),
        spec: NodeSpec {
            name: id.to_string(),
            role: NodeRole::Worker,
            availability: Availability::Active,
            labels: Default::default(),
        },
        description: NodeDescription {
            hostname: format!("host-{id}"),
            os: "linux".into(),
            arch: "x86_64".into(),
            resources: Resources {
                nano_cpus: 4_000_000_000,
                memory_bytes: 8 << 30,
            },
            engine: Default::default(),
        },
        status: NodeStatus {
            state: NodeState::Ready,
            message: String::new(),
            addr: format!("10.0.0.1:{}", 4000 + id.len()),
            last_heartbeat: 0,
        },
        manager_status: None,
        network: None,
    }
}

use flotilla_types::{
    ContainerSpec, RestartCondition, RestartPolicy, Service, ServiceMode, ServiceSpec, Task,
    TaskSpec, TaskState, UpdateConfig,
};

use crate::{reconcile_with_ids, schedule, Action, Decision, OrchestratorConfig, Reconcile};

pub const SEC: u64 = 1_000_000_000;

pub fn service(mode: ServiceMode) -> Service {
    Service {
        id: "svc".into(),
        meta: Meta::default(),
        spec: ServiceSpec {
            name: "web".into(),
            labels: Default::default(),
            task_template: TaskSpec {
                container: ContainerSpec {
                    image: "nginx@sha256:1".into(),
                    ..Default::default()
                },
                restart_policy: RestartPolicy {
                    condition: RestartCondition::Any,
                    delay: 0,
                    max_attempts: 0,
                    window: 0,
                },
                ..Default::default()
            },
            mode,
            update_config: UpdateConfig {
                monitor: 0,
                ..Default::default()
            },
            rollback_config: UpdateConfig {
                monitor: 0,
                ..Default::default()
            },
            endpoint_spec: Default::default(),
        },
        previous_spec: None,
        spec_version: 1,
        update_status: None,
        job_iteration: 0,
        vip: None,
        service_status: None,
        network_vips: Default::default(),
    }
}

/// A tiny in-memory cluster: applies actions like a driver and moves tasks like agents would.
pub struct Sim {
    pub svc: Service,
    pub tasks: Vec<Task>,
    pub nodes: Vec<Node>,
    pub now: u64,
    pub seq: u64,
    pub cfg: OrchestratorConfig,
    pub history: Vec<Action>,
}

impl Sim {
    pub fn new(mode: ServiceMode, nodes: &[&str]) -> Sim {
        Sim {
            svc: service(mode),
            tasks: Vec::new(),
            nodes: nodes.iter().map(|n| node(n)).collect(),
            now: 1_000_000,
            seq: 0,
            cfg: OrchestratorConfig::default(),
            history: Vec::new(),
        }
    }

    pub fn node_mut(&mut self, id: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("no such node")
    }

    pub fn task(&self, id: &str) -> &Task {
        self.tasks
            .iter()
            .find(|t| t.id == id)
            .expect("no such task")
    }

    pub fn task_mut(&mut self, id: &str) -> &mut Task {
        self.tasks
            .iter_mut()
            .find(|t| t.id == id)
            .expect("no such task")
    }

    /// One orchestrator pass, applied.
    pub fn reconcile(&mut self) -> Reconcile {
        let seq = &mut self.seq;
        let mut ids = || {
            *seq += 1;
            format!("t{seq:03}")
        };
        let r = reconcile_with_ids(
            &self.svc,
            &self.tasks,
            &self.nodes,
            self.now,
            &self.cfg,
            &mut ids,
        );
        self.apply(&r.actions);
        r
    }

    pub fn apply(&mut self, actions: &[Action]) {
        for a in actions {
            self.history.push(a.clone());
            match a {
                Action::CreateTask(t) => self.tasks.push((**t).clone()),
                Action::UpdateTask(u) => {
                    let now = self.now;
                    let t = self.task_mut(&u.task_id);
                    assert_eq!(t.meta.version, u.version);
                    t.meta.version += 1;
                    if let Some(d) = u.desired_state {
                        t.desired_state = d;
                    }
                    if let Some(s) = &u.status {
                        assert!(s.state >= t.status.state, "state went backwards");
                        t.status.state = s.state;
                        t.status.message = s.message.clone();
                        t.status.timestamp = now;
                    }
                }
                Action::DeleteTask { task_id, .. } => {
                    let t = self.task(task_id);
                    assert!(t.status.state.is_terminal(), "deleted a live task");
                    self.tasks.retain(|t| &t.id != task_id);
                }
                Action::SetUpdateStatus(u) => self.svc.update_status = Some(u.clone()),
                Action::Rollback { message } => {
                    let prev = self.svc.previous_spec.take().expect("no previous spec");
                    let failed = std::mem::replace(&mut self.svc.spec, prev);
                    self.svc.previous_spec = Some(failed);
                    self.svc.spec_version += 1;
                    self.svc.update_status = Some(flotilla_types::UpdateStatus {
                        state: flotilla_types::UpdateState::RollbackStarted,
                        started_at: self.now,
                        completed_at: None,
                        message: message.clone(),
                    });
                }
            }
        }
    }

    /// Scheduler pass: assigns new tasks.
    pub fn schedule(&mut self) -> Vec<Decision> {
        let pending: Vec<Task> = self
            .tasks
            .iter()
            .filter(|t| t.status.state <= TaskState::Pending)
            .cloned()
            .collect();
        let ds = schedule(&pending, &self.nodes, &self.tasks);
        for d in &ds {
            let now = self.now;
            match d {
                Decision::Assign { task_id, node_id } => {
                    let t = self.task_mut(task_id);
                    t.node_id = Some(node_id.clone());
                    t.status.state = TaskState::Assigned;
                    t.status.timestamp = now;
                }
                Decision::NoSuitableNode { task_id, reason } => {
                    let t = self.task_mut(task_id);
                    t.status.state = TaskState::Pending;
                    t.status.message = reason.clone();
                }
            }
        }
        ds
    }

    /// Agents: start assigned tasks, stop tasks asked to stop. Tasks on down nodes do nothing.
    pub fn agents(&mut self) {
        let now = self.now;
        let down: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.status.state == NodeState::Down)
            .map(|n| n.id.clone())
            .collect();
        for t in &mut self.tasks {
            if t.node_id.as_ref().is_some_and(|n| down.contains(n))
                || t.status.state < TaskState::Assigned
            {
                continue;
            }
            if t.desired_state > TaskState::Complete && !t.status.state.is_terminal() {
                t.status.state = TaskState::Shutdown;
                t.status.timestamp = now;
            } else if t.desired_state == TaskState::Running && t.status.state < TaskState::Running {
                t.status.state = TaskState::Running;
                t.status.timestamp = now;
            }
        }
    }

    /// reconcile → schedule → agents until nothing changes (at most `n` rounds).
    pub fn settle(&mut self, n: usize) -> Reconcile {
        let mut last = Reconcile::default();
        for _ in 0..n {
            last = self.reconcile();
            let before: Vec<(TaskState, TaskState)> = self
                .tasks
                .iter()
                .map(|t| (t.status.state, t.desired_state))
                .collect();
            self.schedule();
            self.agents();
            let after: Vec<(TaskState, TaskState)> = self
                .tasks
                .iter()
                .map(|t| (t.status.state, t.desired_state))
                .collect();
            if last.actions.is_empty() && before == after {
                break;
            }
        }
        last
    }

    pub fn running(&self) -> Vec<&Task> {
        self.tasks
            .iter()
            .filter(|t| {
                t.status.state == TaskState::Running && t.desired_state == TaskState::Running
            })
            .collect()
    }

    pub fn running_slots(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self.running().iter().filter_map(|t| t.slot).collect();
        s.sort_unstable();
        s
    }

    pub fn end(&mut self, id: &str, state: TaskState) {
        let now = self.now;
        let t = self.task_mut(id);
        t.status.state = state;
        t.status.timestamp = now;
    }

    pub fn creates(r: &Reconcile) -> Vec<&Task> {
        r.actions
            .iter()
            .filter_map(|a| match a {
                Action::CreateTask(t) => Some(&**t),
                _ => None,
            })
            .collect()
    }
}
