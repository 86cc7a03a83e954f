//! The orchestrator: for one service, compares the tasks that exist with the tasks that should
//! exist and returns the [`Action`]s that close the gap.
//!
//! Everything is derived from the objects passed in, so a new leader picks up where the old one
//! stopped. The few facts that must survive between calls are written into the tasks themselves:
//!
//! * desired state `running` on a task that has ended = "not handled yet" (a restart is due,
//!   maybe after the restart delay);
//! * desired state `complete` on an ended task = "given up": the restart policy said no, the slot
//!   stays empty until the service spec changes;
//! * desired state `shutdown` = stopped on purpose (replaced, drained, updated);
//! * desired state `remove` = the slot is gone (scale down, service removed): delete once ended.
//!
//! Work is grouped by *key*: the slot for replicated services and jobs, the node for global ones.

use std::collections::{BTreeMap, HashMap};

use flotilla_types::{
    new_id, Availability, FailureAction, Meta, Node, NodeState, RestartCondition, Service,
    ServiceMode, Task, TaskState, TaskStatus, UpdateConfig, UpdateOrder, UpdateState, UpdateStatus,
};

use crate::constraint::{parse_constraints, Constraint};

/// Knobs of the orchestrator that are cluster settings rather than part of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrchestratorConfig {
    /// Ended tasks kept per slot (or node) for `service ps`; older ones are deleted. At least
    /// one is always kept, and more when a restart policy's `max_attempts` needs them to count.
    pub task_history: usize,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig { task_history: 5 }
    }
}

/// What one reconcile pass wants done. Apply `actions` in one store batch (they never touch the
/// same task twice), then call again when the service, its tasks or the nodes change, or at
/// `wake_at` at the latest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reconcile {
    pub actions: Vec<Action>,
    /// Unix ms at which the orchestrator wants to look again even if nothing changes (restart
    /// delay, update delay or monitor window ending). `None` = only on changes.
    pub wake_at: Option<u64>,
}

/// One change to persist. Task changes carry the `meta.version` of the task they were computed
/// from: write them with optimistic concurrency and simply re-run the reconcile on conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Insert this new task (state `new`, desired `running`; `node_id` set for global modes).
    CreateTask(Box<Task>),
    /// Change an existing task.
    UpdateTask(TaskUpdate),
    /// Delete an ended task (history pruning, scale down, service removal).
    DeleteTask { task_id: String, version: u64 },
    /// Store this as `service.update_status`.
    SetUpdateStatus(UpdateStatus),
    /// The update failed and its failure action is rollback: set `spec = previous_spec`,
    /// `previous_spec = <the failed spec>`, bump `spec_version`, and set `update_status` to
    /// `rollback_started` (started now, with `message`). The next reconcile rolls the tasks back
    /// with `rollback_config`.
    Rollback { message: String },
}

/// Changes to one task; `None` fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskUpdate {
    pub task_id: String,
    /// The task's `meta.version` as seen by the orchestrator.
    pub version: u64,
    pub desired_state: Option<TaskState>,
    /// Set `status` to `TaskStatus::new(state, at, message)` (keeping `container_id`,
    /// `exit_code`). Only used where no agent can report: tasks on lost nodes (`orphaned`) and
    /// tasks shut down before any node accepted them (`shutdown`).
    pub status: Option<StatusChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub state: TaskState,
    pub message: String,
    /// Unix ms (the `now_ms` of the call).
    pub at: u64,
}

/// Reconciles one service; new task ids come from [`flotilla_types::new_id`].
///
/// * `tasks`: every task of the service, in any state (others are ignored).
/// * `nodes`: every node of the cluster.
pub fn reconcile(
    service: &Service,
    tasks: &[Task],
    nodes: &[Node],
    now_ms: u64,
    cfg: &OrchestratorConfig,
) -> Reconcile {
    reconcile_with_ids(service, tasks, nodes, now_ms, cfg, &mut new_id)
}

/// [`reconcile`] with an id generator, for deterministic tests.
pub fn reconcile_with_ids(
    service: &Service,
    tasks: &[Task],
    nodes: &[Node],
    now_ms: u64,
    cfg: &OrchestratorConfig,
    ids: &mut dyn FnMut() -> String,
) -> Reconcile {
    let mut o = Orch::new(service, nodes, now_ms, cfg, ids);
    let tasks: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.service_id == service.id)
        .collect();
    let views = o.prepass(&tasks);
    match service.spec.mode {
        ServiceMode::Replicated { .. } | ServiceMode::Global => o.run_service(&views),
        ServiceMode::ReplicatedJob { .. } | ServiceMode::GlobalJob => o.run_job(&views),
    }
    o.out.finish()
}

/// Cleans up after `service rm`: every task is told to stop (desired `remove`) and deleted once
/// it has ended. Call with the removed service's tasks until none are left.
pub fn reconcile_removed(tasks: &[Task], nodes: &[Node], now_ms: u64) -> Reconcile {
    let mut out = Out::default();
    let node_map: HashMap<&str, &Node> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    for t in tasks {
        if t.status.state.is_terminal() {
            out.delete(t);
            continue;
        }
        if let Some(msg) = lost(t, &node_map) {
            out.observe(t, TaskState::Orphaned, msg, now_ms);
        } else if t.status.state < TaskState::Assigned {
            out.observe(
                t,
                TaskState::Shutdown,
                "removed before it was assigned",
                now_ms,
            );
        }
        if t.desired_state != TaskState::Remove {
            out.desire(t, TaskState::Remove);
        }
    }
    out.finish()
}

// ---------------------------------------------------------------------------------------------

/// Collects actions so that each task gets at most one update, in a deterministic order.
#[derive(Default)]
struct Out {
    updates: Vec<TaskUpdate>,
    index: HashMap<String, usize>,
    deletes: Vec<Action>,
    creates: Vec<Action>,
    service: Vec<Action>,
    wake_at: Option<u64>,
}

impl Out {
    fn entry(&mut self, t: &Task) -> &mut TaskUpdate {
        let i = match self.index.get(&t.id) {
            Some(&i) => i,
            None => {
                self.updates.push(TaskUpdate {
                    task_id: t.id.clone(),
                    version: t.meta.version,
                    desired_state: None,
                    status: None,
                });
                self.index.insert(t.id.clone(), self.updates.len() - 1);
                self.updates.len() - 1
            }
        };
        &mut self.updates[i]
    }

    fn desire(&mut self, t: &Task, d: TaskState) {
        let current = self
            .index
            .get(&t.id)
            .and_then(|&i| self.updates[i].desired_state)
            .unwrap_or(t.desired_state);
        if current != d {
            self.entry(t).desired_state = Some(d);
        }
    }

    fn observe(&mut self, t: &Task, state: TaskState, message: &str, at: u64) {
        self.entry(t).status = Some(StatusChange {
            state,
            message: message.to_string(),
            at,
        });
    }

    fn delete(&mut self, t: &Task) {
        if !self.index.contains_key(&t.id) {
            self.deletes.push(Action::DeleteTask {
                task_id: t.id.clone(),
                version: t.meta.version,
            });
        }
    }

    fn wake(&mut self, at: u64) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    fn finish(self) -> Reconcile {
        let mut actions: Vec<Action> = self.updates.into_iter().map(Action::UpdateTask).collect();
        actions.extend(self.deletes);
        actions.extend(self.creates);
        actions.extend(self.service);
        Reconcile {
            actions,
            wake_at: self.wake_at,
        }
    }
}

fn ns_to_ms(ns: u64) -> u64 {
    ns.div_ceil(1_000_000)
}

/// Why a task is lost with its node, if it is: it was handed to a node (state `assigned` or
/// later, not ended) that is now down or gone.
fn lost(t: &Task, node_map: &HashMap<&str, &Node>) -> Option<&'static str> {
    if t.status.state.is_terminal() || t.status.state < TaskState::Assigned {
        return None;
    }
    match node_map.get(t.node_id.as_deref()?) {
        None => Some("node removed"),
        Some(n) if n.status.state == NodeState::Down => Some("node down"),
        Some(_) => None,
    }
}

/// A task as the orchestrator sees it after this call's own status writes.
#[derive(Clone, Copy)]
struct View<'a> {
    t: &'a Task,
    /// Effective observed state.
    state: TaskState,
    /// Effective time of the last state change (ended-at for ended tasks).
    ts: u64,
}

impl View<'_> {
    fn ended(&self) -> bool {
        self.state.is_terminal()
    }
    fn unhealthy(&self) -> bool {
        !self.ended() && self.t.status.health == Some(flotilla_types::Health::Unhealthy)
    }
    /// Ended (or must end) without the orchestrator asking: counts for the restart policy.
    fn failed_or_done(&self) -> bool {
        matches!(
            self.state,
            TaskState::Complete | TaskState::Failed | TaskState::Rejected | TaskState::Orphaned
        ) || self.unhealthy()
    }
    /// Failed, rejected, lost or unhealthy (not: stopped on purpose, completed).
    fn failed(&self) -> bool {
        self.failed_or_done() && self.state != TaskState::Complete
    }
    /// Desired running (or earlier): the orchestrator still wants it, or has not handled its end.
    fn wanted(&self) -> bool {
        self.t.desired_state <= TaskState::Running
    }
    /// Being stopped on purpose and not ended yet.
    fn stopping(&self) -> bool {
        self.t.desired_state > TaskState::Complete && !self.ended()
    }
    fn age_key(&self) -> (u64, &str) {
        (self.t.meta.created_at, self.t.id.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Slot(u64),
    Node(String),
}

/// May this node run (new) tasks of the service?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    /// Create tasks here as needed.
    Create,
    /// Keep what runs, start nothing new (paused, down or disconnected node).
    Keep,
    /// Shut down what runs here (drained, constraints no longer met, node gone, slot beyond
    /// the replica count).
    Evict,
    /// Slot beyond the replica count: stop and delete.
    Remove,
}

/// Per-key state the rolling update needs.
enum KeyStatus<'a> {
    Clean,
    /// Runs an outdated task (`Some`) or was given up at an older spec version (`None`).
    Dirty(Option<&'a Task>),
    /// Replacement in progress (old stopping, or new not yet running).
    Busy,
    /// Runs a current task in state running since `since`, created at `created`.
    Running {
        since: u64,
        created: u64,
    },
}

/// The restart policy's verdict for an ended task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    Now,
    At(u64),
    Never,
}

struct Orch<'a, 'i> {
    service: &'a Service,
    nodes: HashMap<&'a str, &'a Node>,
    now: u64,
    cfg: &'a OrchestratorConfig,
    ids: &'i mut dyn FnMut() -> String,
    constraints: Option<Vec<Constraint>>,
    out: Out,
}

impl<'a, 'i> Orch<'a, 'i> {
    fn new(
        service: &'a Service,
        nodes: &'a [Node],
        now: u64,
        cfg: &'a OrchestratorConfig,
        ids: &'i mut dyn FnMut() -> String,
    ) -> Self {
        Orch {
            service,
            nodes: nodes.iter().map(|n| (n.id.as_str(), n)).collect(),
            now,
            cfg,
            ids,
            constraints: parse_constraints(&service.spec.task_template.placement.constraints).ok(),
            out: Out::default(),
        }
    }

    /// Marks lost tasks orphaned and never-assigned stopped tasks shut down; returns the views.
    fn prepass<'t>(&mut self, tasks: &[&'t Task]) -> Vec<View<'t>> {
        tasks
            .iter()
            .map(|&t| {
                let mut v = View {
                    t,
                    state: t.status.state,
                    ts: t.status.timestamp,
                };
                if !t.status.state.is_terminal() {
                    if let Some(msg) = lost(t, &self.nodes) {
                        self.out.observe(t, TaskState::Orphaned, msg, self.now);
                        v.state = TaskState::Orphaned;
                        v.ts = self.now;
                    } else if t.desired_state > TaskState::Running
                        && t.status.state < TaskState::Assigned
                    {
                        self.out.observe(
                            t,
                            TaskState::Shutdown,
                            "shut down before it was assigned",
                            self.now,
                        );
                        v.state = TaskState::Shutdown;
                        v.ts = self.now;
                    }
                }
                v
            })
            .collect()
    }

    fn key_of(&self, t: &Task) -> Option<Key> {
        match self.service.spec.mode {
            ServiceMode::Replicated { .. } | ServiceMode::ReplicatedJob { .. } => {
                t.slot.filter(|&s| s > 0).map(Key::Slot)
            }
            ServiceMode::Global | ServiceMode::GlobalJob => t.node_id.clone().map(Key::Node),
        }
    }

    /// Groups views by key; tasks without a usable key are stopped and deleted.
    fn group<'t>(&mut self, views: &[View<'t>]) -> BTreeMap<Key, Vec<View<'t>>> {
        let mut by_key: BTreeMap<Key, Vec<View<'t>>> = BTreeMap::new();
        for v in views {
            match self.key_of(v.t) {
                Some(k) => by_key.entry(k).or_default().push(*v),
                None => self.remove_task(v),
            }
        }
        by_key
    }

    fn remove_task(&mut self, v: &View) {
        if v.t.status.state.is_terminal() {
            self.out.delete(v.t);
        } else if !v.ended() && v.t.desired_state != TaskState::Remove {
            self.out.desire(v.t, TaskState::Remove);
        }
    }

    /// Whether node `id` may run tasks of this service.
    fn node_fit(&self, id: &str) -> Fit {
        let Some(n) = self.nodes.get(id) else {
            return Fit::Evict;
        };
        if n.spec.availability == Availability::Drain {
            return Fit::Evict;
        }
        match &self.constraints {
            Some(c) if !c.iter().all(|c| c.matches(n)) => return Fit::Evict,
            // Unparseable constraints (should have been refused by the API): change nothing.
            None => return Fit::Keep,
            _ => {}
        }
        let up = matches!(n.status.state, NodeState::Ready | NodeState::Unknown);
        if up && n.spec.availability == Availability::Active {
            Fit::Create
        } else {
            Fit::Keep
        }
    }

    /// For replicated modes: must this current-spec task leave its node (drain, constraints)?
    fn must_move(&self, t: &Task) -> bool {
        let Some(n) = t.node_id.as_deref().and_then(|id| self.nodes.get(id)) else {
            return false;
        };
        if n.spec.availability == Availability::Drain {
            return true;
        }
        self.is_current(t)
            && self
                .constraints
                .as_ref()
                .is_some_and(|c| !c.iter().all(|c| c.matches(n)))
    }

    /// A task is up to date when it was created from the current spec version, or when it runs
    /// exactly the current task template (as in Swarm: after a rollback, tasks the failed update
    /// never touched already match and keep running).
    fn is_current(&self, t: &Task) -> bool {
        t.spec_version == self.service.spec_version
            || t.spec
                == self
                    .service
                    .task_spec_for(&t.id, t.slot, t.node_id.as_deref())
    }

    fn create(&mut self, key: &Key) {
        let s = self.service;
        let (slot, node_id) = match key {
            Key::Slot(n) => (Some(*n), None),
            Key::Node(id) => (None, Some(id.clone())),
        };
        let id = (self.ids)();
        let spec = s.task_spec_for(&id, slot, node_id.as_deref());
        let task = Task {
            id,
            meta: Meta {
                version: 0,
                created_at: self.now,
                updated_at: self.now,
            },
            service_id: s.id.clone(),
            slot,
            node_id,
            spec,
            spec_version: s.spec_version,
            job_iteration: s.job_iteration,
            desired_state: TaskState::Running,
            status: TaskStatus::new(TaskState::New, self.now, "created"),
        };
        self.out.creates.push(Action::CreateTask(Box::new(task)));
    }

    /// The restart policy's verdict for the slot whose latest ended task is `last`.
    fn restart(&self, last: &View, key_views: &[View], job: bool) -> Restart {
        let p = last.t.spec.restart_policy;
        // Anything but a clean exit is a failure here, including a shutdown nobody asked for.
        let failed = last.unhealthy() || (last.ended() && last.state != TaskState::Complete);
        let allowed = match p.condition {
            RestartCondition::None => false,
            RestartCondition::OnFailure => failed,
            // A job's success is never "restarted".
            RestartCondition::Any => !job || failed,
        };
        if !allowed {
            return Restart::Never;
        }
        if p.max_attempts > 0 {
            let since = if p.window > 0 {
                last.ts.saturating_sub(ns_to_ms(p.window))
            } else {
                0
            };
            let prior = key_views
                .iter()
                .filter(|v| v.t.id != last.t.id)
                .filter(|v| v.t.spec_version == last.t.spec_version)
                .filter(|v| v.t.job_iteration == last.t.job_iteration)
                .filter(|v| (v.ended() || v.unhealthy()) && v.failed_or_done())
                .filter(|v| v.ts >= since)
                .count() as u64;
            if prior >= p.max_attempts {
                return Restart::Never;
            }
        }
        // A task lost with its node did not crash: the restart delay is a crash-loop back-off,
        // so the replacement starts at once (drained tasks are replaced at once too).
        if last.state == TaskState::Orphaned {
            return Restart::Now;
        }
        let due = last.ts.saturating_add(ns_to_ms(p.delay));
        if self.now >= due {
            Restart::Now
        } else {
            Restart::At(due)
        }
    }

    /// Deletes ended tasks beyond the history limit (and any ended task marked `remove`).
    fn prune(&mut self, views: &[View], protect: &[&str]) {
        let max_attempts = views
            .iter()
            .map(|v| v.t.spec.restart_policy.max_attempts)
            .max()
            .unwrap_or(0);
        let keep = self.cfg.task_history.max(1).max(
            usize::try_from(max_attempts)
                .unwrap_or(usize::MAX)
                .saturating_add(1),
        );
        let newest = views
            .iter()
            .max_by(|a, b| a.age_key().cmp(&b.age_key()))
            .map(|v| v.t.id.as_str());
        let mut ended: Vec<&View> = views
            .iter()
            .filter(|v| v.t.status.state.is_terminal() && !v.wanted())
            .collect();
        for v in ended
            .iter()
            .filter(|v| v.t.desired_state == TaskState::Remove)
        {
            self.out.delete(v.t);
        }
        ended.retain(|v| v.t.desired_state != TaskState::Remove);
        ended.sort_by(|a, b| (b.ts, b.age_key()).cmp(&(a.ts, a.age_key())));
        for v in ended.into_iter().skip(keep) {
            let id = v.t.id.as_str();
            if Some(id) != newest && !protect.contains(&id) {
                self.out.delete(v.t);
            }
        }
    }

    // ---- replicated and global services ---------------------------------------------------

    fn run_service(&mut self, views: &[View]) {
        let by_key = self.group(views);
        let mut wanted: Vec<(Key, Fit)> = Vec::new();
        match self.service.spec.mode {
            ServiceMode::Replicated { replicas } => {
                for k in by_key.keys() {
                    if let Key::Slot(s) = k {
                        if *s > replicas {
                            wanted.push((k.clone(), Fit::Remove));
                        }
                    }
                }
                wanted.extend((1..=replicas).map(|s| (Key::Slot(s), Fit::Create)));
            }
            _ => {
                let mut ids: Vec<&str> = self.nodes.keys().copied().collect();
                for k in by_key.keys() {
                    if let Key::Node(id) = k {
                        ids.push(id);
                    }
                }
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    let fit = self.node_fit(id);
                    if fit == Fit::Create || by_key.contains_key(&Key::Node(id.to_string())) {
                        wanted.push((Key::Node(id.to_string()), fit));
                    }
                }
            }
        }
        let total = wanted.iter().filter(|(_, f)| *f == Fit::Create).count();
        let mut statuses: Vec<(Key, KeyStatus)> = Vec::new();
        let empty = Vec::new();
        for (key, fit) in wanted {
            let kv = by_key.get(&key).unwrap_or(&empty);
            let st = self.service_key(&key, kv, fit);
            statuses.push((key, st));
        }
        self.rolling_update(views, statuses, total);
    }

    /// One slot (or node) of a replicated (or global) service.
    fn service_key<'t>(&mut self, key: &Key, views: &[View<'t>], fit: Fit) -> KeyStatus<'t> {
        if fit == Fit::Remove {
            for v in views {
                self.remove_task(v);
            }
            return KeyStatus::Clean;
        }
        if fit == Fit::Evict {
            for v in views.iter().filter(|v| v.wanted() && !v.ended()) {
                self.out.desire(v.t, TaskState::Shutdown);
            }
            if matches!(key, Key::Node(id) if !self.nodes.contains_key(id.as_str())) {
                // The node left the cluster: drop its history too.
                for v in views.iter().filter(|v| v.t.status.state.is_terminal()) {
                    self.out.delete(v.t);
                }
            } else {
                self.prune(views, &[]);
            }
            return KeyStatus::Clean;
        }
        let replicated = matches!(key, Key::Slot(_));
        let mut alive: Vec<View> = Vec::new();
        let mut dead: Vec<View> = Vec::new();
        let mut stopping = false;
        let mut moved = false;
        for v in views {
            if v.wanted() {
                if v.ended() || v.unhealthy() {
                    dead.push(*v);
                } else if replicated && self.must_move(v.t) {
                    self.out.desire(v.t, TaskState::Shutdown);
                    moved = true;
                } else {
                    alive.push(*v);
                }
            } else if v.stopping() {
                stopping = true;
            }
        }
        let status = if !alive.is_empty() {
            for d in &dead {
                self.out.desire(d.t, TaskState::Shutdown);
            }
            self.alive_key(&alive)
        } else if !dead.is_empty() {
            if fit == Fit::Keep {
                // Cannot start anything here now; a fresh task comes once the node is back.
                for d in &dead {
                    self.out.desire(d.t, TaskState::Shutdown);
                }
                KeyStatus::Clean
            } else {
                let last = dead
                    .iter()
                    .max_by(|a, b| (a.ts, a.age_key()).cmp(&(b.ts, b.age_key())))
                    .copied();
                match last.map(|l| self.restart(&l, views, false)) {
                    Some(Restart::Now) => {
                        for d in &dead {
                            self.out.desire(d.t, TaskState::Shutdown);
                        }
                        self.create(key);
                        KeyStatus::Busy
                    }
                    Some(Restart::At(t)) => {
                        self.out.wake(t);
                        KeyStatus::Busy
                    }
                    _ => {
                        for d in &dead {
                            self.out.desire(d.t, TaskState::Complete);
                        }
                        KeyStatus::Clean
                    }
                }
            }
        } else if stopping && !moved {
            KeyStatus::Busy
        } else if fit == Fit::Keep {
            KeyStatus::Clean
        } else {
            let newest = views.iter().max_by(|a, b| a.age_key().cmp(&b.age_key()));
            match newest {
                Some(n) if n.t.desired_state == TaskState::Complete => {
                    if self.is_current(n.t) {
                        KeyStatus::Clean
                    } else {
                        KeyStatus::Dirty(None)
                    }
                }
                _ => {
                    self.create(key);
                    KeyStatus::Busy
                }
            }
        };
        self.prune(views, &[]);
        match status {
            // Do not start replacing what cannot be started again here.
            KeyStatus::Dirty(_) if fit == Fit::Keep => KeyStatus::Clean,
            other => other,
        }
    }

    /// A key with at least one live task: keep one, stop duplicates, report update state.
    fn alive_key<'t>(&mut self, alive: &[View<'t>]) -> KeyStatus<'t> {
        let newest_cur = alive
            .iter()
            .filter(|v| self.is_current(v.t))
            .max_by(|a, b| a.age_key().cmp(&b.age_key()))
            .copied();
        match newest_cur {
            Some(n) => {
                let others: Vec<&View> = alive.iter().filter(|v| v.t.id != n.t.id).collect();
                if n.state == TaskState::Running {
                    for o in others {
                        self.out.desire(o.t, TaskState::Shutdown);
                    }
                    KeyStatus::Running {
                        since: n.ts,
                        created: n.t.meta.created_at,
                    }
                } else {
                    // Start-first in progress, or a fresh task on its way up.
                    KeyStatus::Busy
                }
            }
            None => {
                let keep = alive
                    .iter()
                    .max_by(|a, b| a.age_key().cmp(&b.age_key()))
                    .copied();
                for o in alive
                    .iter()
                    .filter(|v| Some(v.t.id.as_str()) != keep.map(|k| k.t.id.as_str()))
                {
                    self.out.desire(o.t, TaskState::Shutdown);
                }
                KeyStatus::Dirty(keep.map(|k| k.t))
            }
        }
    }

    /// Advances the rolling update (or rollback) by what parallelism, delay and monitor allow.
    fn rolling_update(&mut self, views: &[View], statuses: Vec<(Key, KeyStatus)>, total: usize) {
        let s = self.service;
        let now = self.now;
        let dirty: Vec<(&Key, Option<&Task>)> = statuses
            .iter()
            .filter_map(|(k, st)| match st {
                KeyStatus::Dirty(t) => Some((k, *t)),
                _ => None,
            })
            .collect();
        let (started_at, rollback) = match s.update_status.as_ref().map(|u| u.state) {
            Some(UpdateState::Paused) | Some(UpdateState::RollbackPaused) => return,
            Some(UpdateState::Updating) => (
                s.update_status.as_ref().map_or(now, |u| u.started_at),
                false,
            ),
            Some(UpdateState::RollbackStarted) => {
                (s.update_status.as_ref().map_or(now, |u| u.started_at), true)
            }
            None | Some(UpdateState::Completed) | Some(UpdateState::RollbackCompleted) => {
                if dirty.is_empty() {
                    return;
                }
                self.out.service.push(Action::SetUpdateStatus(UpdateStatus {
                    state: UpdateState::Updating,
                    started_at: now,
                    completed_at: None,
                    message: "update in progress".to_string(),
                }));
                (now, false)
            }
        };
        let uc: UpdateConfig = if rollback {
            s.spec.rollback_config
        } else {
            s.spec.update_config
        };

        // Failures of tasks this update started.
        let failed: Vec<&View> = views
            .iter()
            .filter(|v| v.t.spec_version == s.spec_version && v.failed() && v.ts >= started_at)
            .filter(|v| v.state != TaskState::Orphaned)
            .collect();
        if !failed.is_empty()
            && failed.len() as f64 > uc.max_failure_ratio * total as f64
            && uc.failure_action != FailureAction::Continue
        {
            let first = failed
                .iter()
                .min_by_key(|v| (v.ts, v.t.id.as_str()))
                .map_or("", |v| v.t.id.as_str());
            let what = if rollback { "rollback" } else { "update" };
            let message =
                format!("{what} paused due to failure or early termination of task {first}");
            if !rollback
                && uc.failure_action == FailureAction::Rollback
                && s.previous_spec.is_some()
            {
                self.out.service.push(Action::Rollback {
                    message: format!(
                        "update rolled back due to failure or early termination of task {first}"
                    ),
                });
            } else {
                self.out.service.push(Action::SetUpdateStatus(UpdateStatus {
                    state: if rollback {
                        UpdateState::RollbackPaused
                    } else {
                        UpdateState::Paused
                    },
                    started_at,
                    completed_at: None,
                    message,
                }));
            }
            return;
        }

        let delay = ns_to_ms(uc.delay);
        let monitor = ns_to_ms(uc.monitor);
        let mut busy = 0usize;
        let mut monitoring: Option<u64> = None;
        for (_, st) in &statuses {
            match st {
                KeyStatus::Busy => busy += 1,
                KeyStatus::Running { since, created } if *created >= started_at => {
                    if now < since.saturating_add(delay) {
                        busy += 1;
                        self.out.wake(since.saturating_add(delay));
                    }
                    let end = since.saturating_add(monitor);
                    if now < end {
                        monitoring = Some(monitoring.map_or(end, |m: u64| m.min(end)));
                    }
                }
                _ => {}
            }
        }
        if dirty.is_empty() {
            if busy > 0 {
                return;
            }
            if let Some(end) = monitoring {
                self.out.wake(end);
                return;
            }
            self.out.service.push(Action::SetUpdateStatus(UpdateStatus {
                state: if rollback {
                    UpdateState::RollbackCompleted
                } else {
                    UpdateState::Completed
                },
                started_at,
                completed_at: Some(now),
                message: if rollback {
                    "rollback completed"
                } else {
                    "update completed"
                }
                .to_string(),
            }));
            return;
        }
        let room = if uc.parallelism == 0 {
            usize::MAX
        } else {
            usize::try_from(uc.parallelism)
                .unwrap_or(usize::MAX)
                .saturating_sub(busy)
        };
        for (key, old) in dirty.into_iter().take(room) {
            match (old, uc.order) {
                (Some(t), UpdateOrder::StopFirst) => {
                    self.out.desire(t, TaskState::Shutdown);
                    if t.status.state < TaskState::Assigned {
                        self.out
                            .observe(t, TaskState::Shutdown, "replaced by update", now);
                        self.create(key);
                    }
                }
                (Some(_), UpdateOrder::StartFirst) | (None, _) => self.create(key),
            }
        }
    }

    // ---- jobs ---------------------------------------------------------------------------------

    fn run_job(&mut self, views: &[View]) {
        let s = self.service;
        let iteration = s.job_iteration;
        let by_key = self.group(views);
        let (keys, max_concurrent): (Vec<(Key, Fit)>, usize) = match s.spec.mode {
            ServiceMode::ReplicatedJob {
                max_concurrent,
                total_completions,
            } => {
                let conc = max_concurrent.max(1);
                let total = if total_completions == 0 {
                    conc
                } else {
                    total_completions
                };
                let mut keys: Vec<(Key, Fit)> =
                    (1..=total).map(|s| (Key::Slot(s), Fit::Create)).collect();
                keys.extend(
                    by_key
                        .keys()
                        .filter(|k| matches!(k, Key::Slot(s) if *s > total))
                        .map(|k| (k.clone(), Fit::Remove)),
                );
                (keys, usize::try_from(conc).unwrap_or(usize::MAX))
            }
            _ => {
                let mut ids: Vec<&str> = self.nodes.keys().copied().collect();
                ids.extend(by_key.keys().filter_map(|k| match k {
                    Key::Node(id) => Some(id.as_str()),
                    Key::Slot(_) => None,
                }));
                ids.sort_unstable();
                ids.dedup();
                let keys = ids
                    .into_iter()
                    .map(|id| (Key::Node(id.to_string()), self.node_fit(id)))
                    .collect();
                (keys, usize::MAX)
            }
        };
        let empty = Vec::new();
        let mut running = 0usize;
        let mut restarts: Vec<(Key, Vec<View>)> = Vec::new();
        let mut fresh: Vec<Key> = Vec::new();
        for (key, fit) in keys {
            let kv = by_key.get(&key).unwrap_or(&empty);
            if fit == Fit::Remove {
                for v in kv {
                    self.remove_task(v);
                }
                continue;
            }
            // Tasks of an earlier run of the job are stopped.
            let (cur, old): (Vec<View>, Vec<View>) =
                kv.iter().partition(|v| v.t.job_iteration == iteration);
            for v in old.iter().filter(|v| v.wanted() && !v.ended()) {
                self.out.desire(v.t, TaskState::Shutdown);
            }
            let done = cur
                .iter()
                .find(|v| v.t.status.state == TaskState::Complete)
                .map(|v| v.t.id.as_str());
            let mut alive = Vec::new();
            let mut dead = Vec::new();
            let mut stopping = false;
            let mut moved = false;
            for v in &cur {
                if v.wanted() && v.state != TaskState::Complete {
                    if v.ended() || v.unhealthy() {
                        dead.push(*v);
                    } else if fit == Fit::Evict
                        || (matches!(key, Key::Slot(_)) && self.must_move(v.t))
                    {
                        self.out.desire(v.t, TaskState::Shutdown);
                        moved = true;
                    } else {
                        alive.push(*v);
                    }
                } else if v.stopping() {
                    stopping = true;
                }
            }
            if done.is_some() || !alive.is_empty() || matches!(fit, Fit::Keep | Fit::Evict) {
                for d in &dead {
                    self.out.desire(d.t, TaskState::Shutdown);
                }
                running += alive.len().min(1);
            } else if !dead.is_empty() {
                let last = dead
                    .iter()
                    .max_by(|a, b| (a.ts, a.age_key()).cmp(&(b.ts, b.age_key())))
                    .copied();
                match last.map(|l| self.restart(&l, kv, true)) {
                    Some(Restart::Now) => restarts.push((key, dead)),
                    Some(Restart::At(t)) => self.out.wake(t),
                    _ => {
                        for d in &dead {
                            self.out.desire(d.t, TaskState::Complete);
                        }
                    }
                }
            } else if stopping && !moved {
                running += 1;
            } else {
                let given_up = cur
                    .iter()
                    .any(|v| v.t.desired_state == TaskState::Complete && v.ended());
                if !given_up {
                    fresh.push(key);
                }
            }
            let protect: Vec<&str> = done.into_iter().collect();
            self.prune(kv, &protect);
        }
        let mut budget = max_concurrent.saturating_sub(running);
        for (key, dead) in restarts {
            if budget == 0 {
                break;
            }
            budget -= 1;
            for d in &dead {
                self.out.desire(d.t, TaskState::Shutdown);
            }
            self.create(&key);
        }
        for key in fresh.into_iter().take(budget) {
            self.create(&key);
        }
    }
}

#[cfg(test)]
mod tests;
