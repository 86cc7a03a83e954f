//! The scheduler: picks a node for every unassigned task.
//!
//! Filters, in order: node ready, availability active, placement constraints, then (dynamically,
//! as tasks are placed) reserved resources and `max_replicas_per_node`. Among the nodes left,
//! placement preferences spread tasks over label values (level by level), then the node with the
//! fewest tasks of the task's service wins, then the one with the fewest tasks overall, then the
//! smallest node id.
//!
//! Tasks are placed group by group (one group = one service at one spec version, so they share
//! constraints and reservations). Each group filters the nodes once and then places its tasks
//! from a min-heap keyed by (tasks of the service, tasks in total, node id): a placement costs
//! O(log nodes), not a rescan. [`Scheduler`] keeps per-node counters between calls, so a driver
//! can keep one alive and feed it changes instead of rebuilding it for each batch.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

use flotilla_types::{Availability, Node, NodeState, Resources, Task, TaskState};

use crate::constraint::{parse_constraints, parse_preferences, Constraint, SpreadPreference};

/// The scheduler's answer for one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Set `task.node_id = node_id` and move the task to `assigned`.
    Assign { task_id: String, node_id: String },
    /// Leave the task unassigned (state `pending`) with `reason` as its status message; try again
    /// when nodes or tasks change.
    NoSuitableNode { task_id: String, reason: String },
}

impl Decision {
    pub fn task_id(&self) -> &str {
        match self {
            Decision::Assign { task_id, .. } | Decision::NoSuitableNode { task_id, .. } => task_id,
        }
    }
}

/// Places tasks in one call, counting what is already on the nodes.
///
/// * `unassigned`: tasks to place; tasks that are not `new`/`pending`, or whose desired state is
///   past `running`, are skipped (no decision). A task whose `node_id` is already set (global
///   services) is only checked against that node.
/// * `nodes`: every node of the cluster.
/// * `existing`: tasks that occupy nodes (any task with a `node_id` in a state from `assigned` to
///   `running` counts; others are ignored, so passing all tasks is fine).
pub fn schedule(unassigned: &[Task], nodes: &[Node], existing: &[Task]) -> Vec<Decision> {
    let mut s = Scheduler::new(nodes, existing);
    s.schedule(unassigned)
}

/// Per-node view of the cluster used for placement, kept up to date incrementally.
#[derive(Debug, Clone)]
pub struct Scheduler {
    /// Sorted by node id, so the index order is the id order (deterministic ties).
    nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    /// Service id → node index → number of that service's tasks on the node.
    per_service: HashMap<String, HashMap<usize, u32>>,
    /// Constraint list → nodes passing the static filters; cleared when nodes change.
    static_cache: HashMap<(Vec<String>, Vec<String>), Arc<StaticSet>>,
}

#[derive(Debug, Clone)]
struct NodeInfo {
    node: Node,
    tasks: u32,
    reserved: Resources,
}

/// Whether a task occupies its node for the scheduler's counters: assigned and not ended. (A
/// global task created with its node set but not yet assigned does not count until placed.)
fn occupies(task: &Task) -> bool {
    task.node_id.is_some()
        && task.status.state >= TaskState::Assigned
        && task.status.state <= TaskState::Running
}

fn schedulable(task: &Task) -> bool {
    task.status.state <= TaskState::Pending && task.desired_state <= TaskState::Running
}

impl Scheduler {
    /// Builds the view from all nodes and the tasks already on them (see [`schedule`]).
    pub fn new(nodes: &[Node], existing: &[Task]) -> Scheduler {
        let mut sorted: Vec<&Node> = nodes.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        sorted.dedup_by(|a, b| a.id == b.id);
        let mut s = Scheduler {
            index: sorted
                .iter()
                .enumerate()
                .map(|(i, n)| (n.id.clone(), i))
                .collect(),
            nodes: sorted
                .into_iter()
                .map(|n| NodeInfo {
                    node: n.clone(),
                    tasks: 0,
                    reserved: Resources::default(),
                })
                .collect(),
            per_service: HashMap::new(),
            static_cache: HashMap::new(),
        };
        for t in existing.iter().filter(|t| occupies(t)) {
            s.add_task(t);
        }
        s
    }

    /// Counts `task` on its node (call when a task appears on a node outside this scheduler's
    /// own decisions). Tasks not in `assigned..=running`, or without a node, are ignored.
    pub fn add_task(&mut self, task: &Task) {
        if !occupies(task) {
            return;
        }
        if let Some(&i) = task.node_id.as_ref().and_then(|id| self.index.get(id)) {
            self.bump(i, &task.service_id, task.spec.resources.reservations);
        }
    }

    /// Stops counting `task` on its node (call when a counted task ends or is deleted).
    pub fn remove_task(&mut self, task: &Task) {
        let Some(&i) = task.node_id.as_ref().and_then(|id| self.index.get(id)) else {
            return;
        };
        let info = &mut self.nodes[i];
        info.tasks = info.tasks.saturating_sub(1);
        let r = task.spec.resources.reservations;
        info.reserved.nano_cpus = info.reserved.nano_cpus.saturating_sub(r.nano_cpus);
        info.reserved.memory_bytes = info.reserved.memory_bytes.saturating_sub(r.memory_bytes);
        if let Some(per) = self.per_service.get_mut(&task.service_id) {
            if let Some(c) = per.get_mut(&i) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    per.remove(&i);
                }
            }
            if per.is_empty() {
                self.per_service.remove(&task.service_id);
            }
        }
    }

    /// Replaces a node's record (state, availability, labels, resources changed) or adds a new
    /// node. Adding a node re-indexes, which costs O(nodes + counted services).
    pub fn upsert_node(&mut self, node: &Node) {
        self.static_cache.clear();
        if let Some(&i) = self.index.get(&node.id) {
            self.nodes[i].node = node.clone();
            return;
        }
        // Insert keeping id order; shift indexes in the per-service counters.
        let pos = self.nodes.partition_point(|n| n.node.id < node.id);
        self.nodes.insert(
            pos,
            NodeInfo {
                node: node.clone(),
                tasks: 0,
                reserved: Resources::default(),
            },
        );
        self.reindex(|i| if i >= pos { Some(i + 1) } else { Some(i) });
    }

    /// Forgets a node and its counters.
    pub fn remove_node(&mut self, node_id: &str) {
        let Some(&pos) = self.index.get(node_id) else {
            return;
        };
        self.static_cache.clear();
        self.nodes.remove(pos);
        self.reindex(|i| match i.cmp(&pos) {
            std::cmp::Ordering::Less => Some(i),
            std::cmp::Ordering::Equal => None,
            std::cmp::Ordering::Greater => Some(i - 1),
        });
    }

    fn reindex(&mut self, map: impl Fn(usize) -> Option<usize>) {
        self.index = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.node.id.clone(), i))
            .collect();
        for per in self.per_service.values_mut() {
            *per = per
                .drain()
                .filter_map(|(i, c)| map(i).map(|j| (j, c)))
                .collect();
        }
    }

    /// Number of tasks counted on `node_id` (all services).
    pub fn tasks_on(&self, node_id: &str) -> u32 {
        self.index.get(node_id).map_or(0, |&i| self.nodes[i].tasks)
    }

    fn bump(&mut self, i: usize, service_id: &str, r: Resources) {
        let info = &mut self.nodes[i];
        info.tasks += 1;
        info.reserved.nano_cpus = info.reserved.nano_cpus.saturating_add(r.nano_cpus);
        info.reserved.memory_bytes = info.reserved.memory_bytes.saturating_add(r.memory_bytes);
        if let Some(per) = self.per_service.get_mut(service_id) {
            *per.entry(i).or_insert(0) += 1;
        } else {
            self.per_service
                .insert(service_id.to_string(), HashMap::from([(i, 1)]));
        }
    }

    /// Places `unassigned` tasks (see [`schedule`]); the counters include the placements made,
    /// so the next call sees them. Decisions come back in input order.
    pub fn schedule(&mut self, unassigned: &[Task]) -> Vec<Decision> {
        let mut out: Vec<Option<Decision>> = vec![None; unassigned.len()];
        // Group by (service, spec version), keeping first-seen order.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of: HashMap<(&str, u64), usize> = HashMap::new();
        for (k, t) in unassigned.iter().enumerate() {
            if !schedulable(t) {
                continue;
            }
            if t.node_id.is_some() {
                out[k] = Some(self.place_preassigned(t));
                continue;
            }
            let g = *group_of
                .entry((t.service_id.as_str(), t.spec_version))
                .or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
            groups[g].push(k);
        }
        for g in groups {
            self.place_group(unassigned, &g, &mut out);
        }
        out.into_iter().flatten().collect()
    }

    fn place_preassigned(&mut self, t: &Task) -> Decision {
        let task_id = t.id.clone();
        let node_id = t.node_id.clone().unwrap_or_default();
        let constraints = match parse_constraints(&t.spec.placement.constraints) {
            Ok(c) => c,
            Err(e) => return no_node(task_id, e.to_string()),
        };
        let Some(&i) = self.index.get(&node_id) else {
            return no_node(task_id, format!("node {node_id} does not exist"));
        };
        let mut why = Why::default();
        if why.static_ok(&self.nodes[i].node, &constraints) {
            let mut d = Dynamic::default();
            let count = self.service_count(&t.service_id, i);
            if d.fits(&self.nodes[i], t, count) {
                self.bump(i, &t.service_id, t.spec.resources.reservations);
                return Decision::Assign { task_id, node_id };
            }
            why.dynamic = d;
        }
        let base = [&self.nodes[i].node];
        no_node(task_id, why.reason(&constraints, &base))
    }

    /// Nodes passing the static filters (ready, active, constraints), cached per constraint
    /// list until the node set changes.
    fn static_set(
        &mut self,
        placement: &flotilla_types::Placement,
        constraints: &[Constraint],
        prefs: &[SpreadPreference],
    ) -> Arc<StaticSet> {
        let key = (placement.constraints.clone(), placement.preferences.clone());
        if let Some(s) = self.static_cache.get(&key) {
            return Arc::clone(s);
        }
        let mut why = Why::default();
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| why.static_ok(&self.nodes[i].node, constraints))
            .collect();
        let shape = Shape::build(&candidates, prefs, &self.nodes);
        let set = Arc::new(StaticSet {
            candidates,
            why,
            shape,
        });
        self.static_cache.insert(key, Arc::clone(&set));
        set
    }

    fn service_count(&self, service_id: &str, i: usize) -> u32 {
        self.per_service
            .get(service_id)
            .and_then(|m| m.get(&i))
            .copied()
            .unwrap_or(0)
    }

    fn place_group(&mut self, tasks: &[Task], group: &[usize], out: &mut [Option<Decision>]) {
        let Some(&first) = group.first() else {
            return;
        };
        let proto = &tasks[first];
        let fail_all = |out: &mut [Option<Decision>], reason: &str| {
            for &k in group {
                out[k] = Some(no_node(tasks[k].id.clone(), reason.to_string()));
            }
        };
        let constraints = match parse_constraints(&proto.spec.placement.constraints) {
            Ok(c) => c,
            Err(e) => return fail_all(out, &format!("no suitable node ({e})")),
        };
        let prefs = match parse_preferences(&proto.spec.placement.preferences) {
            Ok(p) => p,
            Err(e) => return fail_all(out, &format!("no suitable node ({e})")),
        };
        let statics = self.static_set(&proto.spec.placement, &constraints, &prefs);
        let (candidates, mut why) = (&statics.candidates, statics.why.clone());
        let service = proto.service_id.clone();
        let mut counts = vec![0u32; candidates.len()];
        if let Some(per) = self.per_service.get(&service) {
            let all = candidates.len() == self.nodes.len();
            for (&i, &c) in per {
                let pos = if all {
                    Ok(i)
                } else {
                    candidates.binary_search(&i)
                };
                if let Ok(pos) = pos {
                    counts[pos] = c;
                }
            }
        }
        let mut tree = SpreadTree::build(&statics, &counts, &self.nodes, group.len());
        let mut dynamic = Dynamic::default();
        let mut failure: Option<String> = None;
        for &k in group {
            let t = &tasks[k];
            let svc = self.per_service.get(&service);
            match tree.pick(self, t, svc, &mut dynamic) {
                Some(i) => {
                    self.bump(i, &service, t.spec.resources.reservations);
                    tree.placed(i, self.service_count(&service, i), self.nodes[i].tasks);
                    out[k] = Some(Decision::Assign {
                        task_id: t.id.clone(),
                        node_id: self.nodes[i].node.id.clone(),
                    });
                }
                None => {
                    // Every later task of the group fails the same way; build the text once.
                    let reason = failure.get_or_insert_with(|| {
                        why.dynamic = dynamic.clone();
                        let base: Vec<&Node> = self
                            .nodes
                            .iter()
                            .map(|n| &n.node)
                            .filter(|n| ready_and_active(n))
                            .collect();
                        why.reason(&constraints, &base)
                    });
                    out[k] = Some(no_node(t.id.clone(), reason.clone()));
                }
            }
        }
    }
}

fn no_node(task_id: String, reason: String) -> Decision {
    Decision::NoSuitableNode { task_id, reason }
}

/// Counts of nodes rejected by each filter, for the user-facing reason.
#[derive(Debug, Default, Clone)]
struct Why {
    not_ready: usize,
    not_active: usize,
    /// Nodes that passed ready/active but not the constraints.
    constraint_rejected: usize,
    dynamic: Dynamic,
}

fn ready_and_active(node: &Node) -> bool {
    node.status.state == NodeState::Ready && node.spec.availability == Availability::Active
}

impl Why {
    fn static_ok(&mut self, node: &Node, constraints: &[Constraint]) -> bool {
        if node.status.state != NodeState::Ready {
            self.not_ready += 1;
            return false;
        }
        if node.spec.availability != Availability::Active {
            self.not_active += 1;
            return false;
        }
        if !constraints.iter().all(|c| c.matches(node)) {
            self.constraint_rejected += 1;
            return false;
        }
        true
    }

    /// The message users see, e.g.
    /// `no suitable node (constraint node.labels.zone==eu matched 0 of 3 nodes)`.
    /// `base` is the set of nodes the constraints were tried on (ready and active ones).
    fn reason(&self, constraints: &[Constraint], base: &[&Node]) -> String {
        let mut parts = Vec::new();
        if self.not_ready > 0 {
            parts.push(format!("{} not ready", plural(self.not_ready)));
        }
        if self.not_active > 0 {
            parts.push(format!(
                "{} not active (paused or drained)",
                plural(self.not_active)
            ));
        }
        if self.constraint_rejected > 0 {
            for c in constraints {
                let m = base.iter().filter(|n| c.matches(n)).count();
                if m < base.len() {
                    parts.push(format!(
                        "constraint {c} matched {m} of {}",
                        plural(base.len())
                    ));
                }
            }
        }
        let d = &self.dynamic;
        if d.cpu > 0 {
            parts.push(format!("insufficient cpu on {}", plural(d.cpu)));
        }
        if d.memory > 0 {
            parts.push(format!("insufficient memory on {}", plural(d.memory)));
        }
        if d.max_replicas > 0 {
            parts.push(format!(
                "max replicas per node reached on {}",
                plural(d.max_replicas)
            ));
        }
        if parts.is_empty() {
            return "no suitable node (no nodes in the cluster)".to_string();
        }
        format!("no suitable node ({})", parts.join("; "))
    }
}

fn plural(n: usize) -> String {
    if n == 1 {
        "1 node".to_string()
    } else {
        format!("{n} nodes")
    }
}

/// Nodes dropped during a group's placement because they filled up.
#[derive(Debug, Default, Clone)]
struct Dynamic {
    cpu: usize,
    memory: usize,
    max_replicas: usize,
}

impl Dynamic {
    /// Whether `t` fits on `info` now; records why not.
    fn fits(&mut self, info: &NodeInfo, t: &Task, service_count: u32) -> bool {
        let max = t.spec.placement.max_replicas_per_node;
        if max > 0 && u64::from(service_count) >= max {
            self.max_replicas += 1;
            return false;
        }
        let need = t.spec.resources.reservations;
        let have = info.node.description.resources;
        if need.nano_cpus > 0
            && have.nano_cpus.saturating_sub(info.reserved.nano_cpus) < need.nano_cpus
        {
            self.cpu += 1;
            return false;
        }
        if need.memory_bytes > 0
            && have.memory_bytes.saturating_sub(info.reserved.memory_bytes) < need.memory_bytes
        {
            self.memory += 1;
            return false;
        }
        true
    }
}

/// Ordering key of a node within a group: (tasks of the service, tasks in total, node index).
/// Smaller is better; the index order is the node id order.
type Key = (u32, u32, usize);

/// A min-heap over many keys of which only a few will be popped: it heapifies the `expect`
/// smallest keys and keeps the rest in a reserve that is drawn from (in chunks, smallest first)
/// only when the reserve could hold the minimum. Placing k tasks on n nodes then costs
/// O(n + k log k) instead of O(n log n).
struct LazyHeap {
    heap: BinaryHeap<Reverse<Key>>,
    reserve: Vec<Key>,
    reserve_min: Option<Key>,
    chunk: usize,
}

impl LazyHeap {
    fn new(mut keys: Vec<Key>, expect: usize) -> LazyHeap {
        let chunk = expect.saturating_add(16).max(64);
        let mut h = LazyHeap {
            heap: BinaryHeap::new(),
            reserve: Vec::new(),
            reserve_min: None,
            chunk,
        };
        if keys.len() <= chunk {
            h.heap = keys.into_iter().map(Reverse).collect();
        } else {
            keys.select_nth_unstable(chunk - 1);
            h.reserve = keys.split_off(chunk);
            h.heap = keys.into_iter().map(Reverse).collect();
            h.reserve_min = h.reserve.iter().min().copied();
        }
        h
    }

    fn refill(&mut self) {
        let n = self.chunk.min(self.reserve.len());
        if n < self.reserve.len() {
            self.reserve.select_nth_unstable(n - 1);
            let rest = self.reserve.split_off(n);
            let take = std::mem::replace(&mut self.reserve, rest);
            self.heap.extend(take.into_iter().map(Reverse));
        } else {
            self.heap.extend(self.reserve.drain(..).map(Reverse));
        }
        self.reserve_min = self.reserve.iter().min().copied();
    }

    fn pop(&mut self) -> Option<Key> {
        while let Some(rmin) = self.reserve_min {
            match self.heap.peek() {
                Some(Reverse(top)) if *top < rmin => break,
                _ => self.refill(),
            }
        }
        self.heap.pop().map(|Reverse(k)| k)
    }

    fn push(&mut self, k: Key) {
        self.heap.push(Reverse(k));
    }

    fn is_empty(&self) -> bool {
        self.heap.is_empty() && self.reserve.is_empty()
    }
}

/// Nodes passing a placement's static filters, and how they split by its preferences; cached
/// per (constraints, preferences) until the node set changes.
#[derive(Debug)]
struct StaticSet {
    /// Sorted node indexes.
    candidates: Vec<usize>,
    why: Why,
    shape: Shape,
}

/// The preference tree without counts: tree node parents and children (by label value), and
/// the leaf of each candidate (empty when there are no preferences: the root is the only leaf).
#[derive(Debug)]
struct Shape {
    parent: Vec<usize>,
    children: Vec<BTreeMap<String, usize>>,
    leaf_of: Vec<usize>,
}

impl Shape {
    fn build(candidates: &[usize], prefs: &[SpreadPreference], nodes: &[NodeInfo]) -> Shape {
        let mut shape = Shape {
            parent: vec![0],
            children: vec![BTreeMap::new()],
            leaf_of: Vec::new(),
        };
        if prefs.is_empty() {
            return shape;
        }
        shape.leaf_of.reserve(candidates.len());
        for &i in candidates {
            let mut cur = 0;
            for p in prefs {
                let v = p.value(&nodes[i].node);
                cur = match shape.children[cur].get(v) {
                    Some(&n) => n,
                    None => {
                        shape.parent.push(cur);
                        shape.children.push(BTreeMap::new());
                        let n = shape.parent.len() - 1;
                        shape.children[cur].insert(v.to_string(), n);
                        n
                    }
                };
            }
            shape.leaf_of.push(cur);
        }
        shape
    }
}

/// Candidate nodes of one group arranged by placement preferences: each level splits by one
/// label's value; leaves hold a min-heap of nodes. With no preferences it is a single leaf.
struct SpreadTree {
    /// Arena; index 0 is the root.
    nodes: Vec<TreeNode>,
    set: Arc<StaticSet>,
}

struct TreeNode {
    parent: usize,
    /// Tasks of the service below this tree node.
    count: u64,
    /// Child tree nodes ordered by label value, for deterministic ties.
    children: Vec<usize>,
    heap: Option<LazyHeap>,
    exhausted: bool,
}

impl SpreadTree {
    /// `counts[k]` = tasks of the service on `set.candidates[k]`.
    fn build(
        set: &Arc<StaticSet>,
        counts: &[u32],
        nodes: &[NodeInfo],
        expect: usize,
    ) -> SpreadTree {
        let shape = &set.shape;
        let mut tree = SpreadTree {
            nodes: shape
                .parent
                .iter()
                .zip(&shape.children)
                .map(|(&parent, ch)| TreeNode {
                    parent,
                    count: 0,
                    children: ch.values().copied().collect(),
                    heap: None,
                    exhausted: false,
                })
                .collect(),
            set: Arc::clone(set),
        };
        if shape.leaf_of.is_empty() {
            let keys: Vec<Key> = set
                .candidates
                .iter()
                .zip(counts)
                .map(|(&i, &c)| (c, nodes[i].tasks, i))
                .collect();
            tree.nodes[0].count = counts.iter().map(|&c| u64::from(c)).sum();
            tree.nodes[0].heap = Some(LazyHeap::new(keys, expect));
        } else {
            let mut leaf_keys: Vec<Vec<Key>> = vec![Vec::new(); tree.nodes.len()];
            for (k, (&i, &c)) in set.candidates.iter().zip(counts).enumerate() {
                let leaf = shape.leaf_of[k];
                leaf_keys[leaf].push((c, nodes[i].tasks, i));
                if c > 0 {
                    tree.add_count(leaf, u64::from(c));
                }
            }
            for (leaf, keys) in leaf_keys.into_iter().enumerate() {
                if !keys.is_empty() {
                    tree.nodes[leaf].heap = Some(LazyHeap::new(keys, expect));
                }
            }
        }
        if set.candidates.is_empty() {
            tree.nodes[0].exhausted = true;
        }
        tree
    }

    fn add_count(&mut self, leaf: usize, c: u64) {
        let mut cur = leaf;
        loop {
            self.nodes[cur].count += c;
            if cur == 0 {
                break;
            }
            cur = self.nodes[cur].parent;
        }
    }

    /// Picks the node for `t`, or `None` when every candidate is full.
    fn pick(
        &mut self,
        s: &Scheduler,
        t: &Task,
        svc: Option<&HashMap<usize, u32>>,
        d: &mut Dynamic,
    ) -> Option<usize> {
        loop {
            if self.nodes[0].exhausted {
                return None;
            }
            // Descend to the least-loaded non-exhausted leaf.
            let mut cur = 0;
            while !self.nodes[cur].children.is_empty() {
                let next = self.nodes[cur]
                    .children
                    .iter()
                    .copied()
                    .filter(|&c| !self.nodes[c].exhausted)
                    .min_by_key(|&c| self.nodes[c].count);
                match next {
                    Some(n) => cur = n,
                    None => break, // cannot happen: exhaustion propagates up
                }
            }
            if let Some(heap) = self.nodes[cur].heap.as_mut() {
                while let Some((_, _, i)) = heap.pop() {
                    let count = svc.and_then(|m| m.get(&i)).copied().unwrap_or(0);
                    if d.fits(&s.nodes[i], t, count) {
                        return Some(i);
                    }
                }
            }
            // Leaf is empty: mark it and its now-empty ancestors exhausted, then retry.
            loop {
                let n = &self.nodes[cur];
                let done = n.heap.as_ref().is_none_or(LazyHeap::is_empty)
                    && n.children.iter().all(|&c| self.nodes[c].exhausted);
                if !done {
                    break;
                }
                self.nodes[cur].exhausted = true;
                if cur == 0 {
                    break;
                }
                cur = self.nodes[cur].parent;
            }
        }
    }

    /// Records a placement on node `i` (now with `svc` tasks of the service, `total` tasks).
    fn placed(&mut self, i: usize, svc: u32, total: u32) {
        let leaf = if self.set.shape.leaf_of.is_empty() {
            0
        } else {
            match self.set.candidates.binary_search(&i) {
                Ok(pos) => self.set.shape.leaf_of[pos],
                Err(_) => return,
            }
        };
        self.add_count(leaf, 1);
        if let Some(h) = self.nodes[leaf].heap.as_mut() {
            h.push((svc, total, i));
        }
    }
}

#[cfg(test)]
mod tests {
    use flotilla_types::{Availability, NodeState, ServiceMode, Task, TaskState};

    use super::*;
    use crate::testutil::{node, service};

    const GIB: u64 = 1 << 30;

    fn task(id: &str, service_id: &str) -> Task {
        let s = service(ServiceMode::Replicated { replicas: 1 });
        Task {
            id: id.into(),
            meta: Default::default(),
            service_id: service_id.into(),
            slot: Some(1),
            node_id: None,
            spec: s.spec.task_template,
            spec_version: 1,
            job_iteration: 0,
            desired_state: TaskState::Running,
            status: flotilla_types::TaskStatus::new(TaskState::New, 0, "created"),
        }
    }

    fn tasks(n: usize, service_id: &str, f: impl Fn(&mut Task)) -> Vec<Task> {
        (0..n)
            .map(|i| {
                let mut t = task(&format!("{service_id}-{i}"), service_id);
                f(&mut t);
                t
            })
            .collect()
    }

    fn nodes(ids: &[&str]) -> Vec<Node> {
        ids.iter().map(|i| node(i)).collect()
    }

    fn counts(ds: &[Decision]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for d in ds {
            if let Decision::Assign { node_id, .. } = d {
                *m.entry(node_id.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    fn reasons(ds: &[Decision]) -> Vec<&str> {
        ds.iter()
            .filter_map(|d| match d {
                Decision::NoSuitableNode { reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn spreads_evenly_and_breaks_ties_by_node_id() {
        let ns = nodes(&["c", "a", "b"]);
        let ds = schedule(&tasks(1, "s", |_| {}), &ns, &[]);
        assert_eq!(
            ds,
            vec![Decision::Assign {
                task_id: "s-0".into(),
                node_id: "a".into()
            }]
        );
        let ds = schedule(&tasks(6, "s", |_| {}), &ns, &[]);
        assert_eq!(
            counts(&ds).values().copied().collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
        let ns: Vec<Node> = (0..10).map(|i| node(&format!("n{i}"))).collect();
        let ds = schedule(&tasks(1000, "s", |_| {}), &ns, &[]);
        assert!(counts(&ds).values().all(|&c| c == 100));
    }

    #[test]
    fn prefers_fewest_of_the_service_then_fewest_overall() {
        let ns = nodes(&["a", "b", "c"]);
        // a: 1 task of s; b: 3 tasks of other; c: 1 task of other.
        let mut existing = tasks(1, "s", |t| t.node_id = Some("a".into()));
        existing.extend(tasks(3, "o", |t| t.node_id = Some("b".into())));
        existing.extend(tasks(1, "x", |t| t.node_id = Some("c".into())));
        for t in &mut existing {
            t.status.state = TaskState::Running;
        }
        let ds = schedule(&tasks(2, "s", |_| {}), &ns, &existing);
        // First: b or c have 0 of s; c has fewer overall. Second: b (0 of s) beats a and c (1).
        let placed: Vec<&str> = ds
            .iter()
            .map(|d| match d {
                Decision::Assign { node_id, .. } => node_id.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(placed, vec!["c", "b"]);
    }

    #[test]
    fn constraint_nobody_meets_explains_itself() {
        let ns = nodes(&["a", "b", "c"]);
        let ts = tasks(2, "s", |t| {
            t.spec.placement.constraints = vec!["node.labels.zone==eu".into()]
        });
        let ds = schedule(&ts, &ns, &[]);
        assert_eq!(
            reasons(&ds),
            vec!["no suitable node (constraint node.labels.zone==eu matched 0 of 3 nodes)"; 2]
        );
        assert_eq!(ds[0].task_id(), "s-0");
    }

    #[test]
    fn constraints_select_nodes() {
        let mut ns = nodes(&["a", "b", "c"]);
        ns[1].spec.labels.insert("zone".into(), "eu".into());
        ns[2].spec.role = flotilla_types::NodeRole::Manager;
        let ts = tasks(3, "s", |t| {
            t.spec.placement.constraints = vec!["node.role!=manager".into()]
        });
        let c = counts(&schedule(&ts, &ns, &[]));
        assert_eq!(c.keys().collect::<Vec<_>>(), vec!["a", "b"]);
        let ts = tasks(2, "s", |t| {
            t.spec.placement.constraints = vec![
                "node.labels.zone==eu".into(),
                "node.hostname==host-b".into(),
            ]
        });
        assert_eq!(counts(&schedule(&ts, &ns, &[])).get("b"), Some(&2));
    }

    #[test]
    fn invalid_constraint_is_the_reason() {
        let ns = nodes(&["a"]);
        let ts = tasks(1, "s", |t| {
            t.spec.placement.constraints = vec!["node.zone=eu".into()]
        });
        let r = schedule(&ts, &ns, &[]);
        assert_eq!(
            reasons(&r),
            vec!["no suitable node (invalid constraint \"node.zone=eu\": expected KEY==VALUE or KEY!=VALUE)"]
        );
    }

    #[test]
    fn unready_and_inactive_nodes_are_reported() {
        let mut ns = nodes(&["a", "b", "c"]);
        ns[0].status.state = NodeState::Down;
        ns[1].spec.availability = Availability::Drain;
        ns[2].spec.availability = Availability::Pause;
        let ds = schedule(&tasks(1, "s", |_| {}), &ns, &[]);
        assert_eq!(
            reasons(&ds),
            vec!["no suitable node (1 node not ready; 2 nodes not active (paused or drained))"]
        );
        let ds = schedule(&tasks(1, "s", |_| {}), &[], &[]);
        assert_eq!(
            reasons(&ds),
            vec!["no suitable node (no nodes in the cluster)"]
        );
    }

    #[test]
    fn memory_reservations_fill_nodes() {
        let ns = nodes(&["a", "b", "c"]);
        let big = tasks(1, "s", |t| {
            t.spec.resources.reservations.memory_bytes = 16 * GIB
        });
        assert_eq!(
            reasons(&schedule(&big, &ns, &[])),
            vec!["no suitable node (insufficient memory on 3 nodes)"]
        );
        let ts = tasks(7, "s", |t| {
            t.spec.resources.reservations.memory_bytes = 3 * GIB
        });
        let ds = schedule(&ts, &ns, &[]);
        assert_eq!(
            counts(&ds).values().sum::<usize>(),
            6,
            "two 3 GiB tasks per 8 GiB node"
        );
        assert_eq!(
            reasons(&ds),
            vec!["no suitable node (insufficient memory on 3 nodes)"]
        );
        let cpu = tasks(3, "s", |t| {
            t.spec.resources.reservations.nano_cpus = 3_000_000_000
        });
        let ds = schedule(&cpu, &ns[..1], &[]);
        assert_eq!(
            reasons(&ds),
            vec!["no suitable node (insufficient cpu on 1 node)"; 2]
        );
    }

    #[test]
    fn existing_reservations_count() {
        let ns = nodes(&["a", "b"]);
        let mut existing = tasks(1, "o", |t| {
            t.node_id = Some("a".into());
            t.status.state = TaskState::Running;
            t.spec.resources.reservations.memory_bytes = 6 * GIB;
        });
        // An ended task no longer reserves anything.
        existing.extend(tasks(1, "p", |t| {
            t.node_id = Some("b".into());
            t.status.state = TaskState::Failed;
            t.spec.resources.reservations.memory_bytes = 8 * GIB;
        }));
        let ts = tasks(2, "s", |t| {
            t.spec.resources.reservations.memory_bytes = 4 * GIB
        });
        let c = counts(&schedule(&ts, &ns, &existing));
        assert_eq!(c.get("b"), Some(&2));
    }

    #[test]
    fn max_replicas_per_node() {
        let ns = nodes(&["a", "b", "c"]);
        let ts = tasks(4, "s", |t| t.spec.placement.max_replicas_per_node = 1);
        let ds = schedule(&ts, &ns, &[]);
        assert_eq!(counts(&ds).len(), 3);
        assert_eq!(
            reasons(&ds),
            vec!["no suitable node (max replicas per node reached on 3 nodes)"]
        );
    }

    #[test]
    fn spread_preference_balances_label_values_first() {
        let mut ns = nodes(&["a1", "b1", "b2", "b3", "x"]);
        ns[0].spec.labels.insert("zone".into(), "a".into());
        for n in &mut ns[1..4] {
            n.spec.labels.insert("zone".into(), "b".into());
        }
        // x has no zone label: its own group.
        let ts = tasks(6, "s", |t| {
            t.spec.placement.preferences = vec!["spread=node.labels.zone".into()]
        });
        let c = counts(&schedule(&ts, &ns, &[]));
        assert_eq!(c.get("a1"), Some(&2));
        assert_eq!(c.get("x"), Some(&2));
        let b: usize = ["b1", "b2", "b3"]
            .iter()
            .map(|n| c.get(*n).copied().unwrap_or(0))
            .sum();
        assert_eq!(b, 2);
        // A full branch makes way for the others.
        let ts = tasks(6, "s", |t| {
            t.spec.placement.preferences = vec!["spread=node.labels.zone".into()];
            t.spec.placement.max_replicas_per_node = 1;
        });
        let ds = schedule(&ts, &ns, &[]);
        assert_eq!(counts(&ds).len(), 5);
        assert_eq!(reasons(&ds).len(), 1);
    }

    #[test]
    fn two_level_preferences() {
        let mut ns: Vec<Node> = Vec::new();
        for (id, dc, rack) in [
            ("n1", "d1", "r1"),
            ("n2", "d1", "r1"),
            ("n3", "d1", "r2"),
            ("n4", "d2", "r3"),
        ] {
            let mut n = node(id);
            n.spec.labels.insert("dc".into(), dc.into());
            n.spec.labels.insert("rack".into(), rack.into());
            ns.push(n);
        }
        let ts = tasks(4, "s", |t| {
            t.spec.placement.preferences = vec![
                "spread=node.labels.dc".into(),
                "spread=node.labels.rack".into(),
            ]
        });
        let c = counts(&schedule(&ts, &ns, &[]));
        assert_eq!(c.get("n4"), Some(&2), "half to d2");
        assert_eq!(c.get("n3"), Some(&1), "d1 split over racks");
        assert_eq!(
            c.get("n1").copied().unwrap_or(0) + c.get("n2").copied().unwrap_or(0),
            1
        );
    }

    #[test]
    fn preassigned_tasks_only_check_their_node() {
        let mut ns = nodes(&["a", "b"]);
        let ts = tasks(1, "g", |t| t.node_id = Some("b".into()));
        assert_eq!(
            schedule(&ts, &ns, &[]),
            vec![Decision::Assign {
                task_id: "g-0".into(),
                node_id: "b".into()
            }]
        );
        ns[1].spec.availability = Availability::Drain;
        assert_eq!(
            reasons(&schedule(&ts, &ns, &[])),
            vec!["no suitable node (1 node not active (paused or drained))"]
        );
        ns[1].spec.availability = Availability::Active;
        let ts = tasks(1, "g", |t| {
            t.node_id = Some("b".into());
            t.spec.placement.constraints = vec!["node.labels.gpu==yes".into()];
        });
        assert_eq!(
            reasons(&schedule(&ts, &ns, &[])),
            vec!["no suitable node (constraint node.labels.gpu==yes matched 0 of 1 node)"]
        );
    }

    #[test]
    fn skips_tasks_that_are_not_waiting() {
        let ns = nodes(&["a"]);
        let mut ts = tasks(3, "s", |_| {});
        ts[0].status.state = TaskState::Assigned;
        ts[1].desired_state = TaskState::Shutdown;
        let ds = schedule(&ts, &ns, &[]);
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].task_id(), "s-2");
    }

    #[test]
    fn scheduler_state_is_incremental() {
        let ns = nodes(&["b", "c"]);
        let mut s = Scheduler::new(&ns, &[]);
        let ds = s.schedule(&tasks(4, "s", |_| {}));
        assert_eq!(
            counts(&ds).values().copied().collect::<Vec<_>>(),
            vec![2, 2]
        );
        assert_eq!(s.tasks_on("b"), 2);
        s.upsert_node(&node("a"));
        let ds = s.schedule(&tasks(2, "t", |_| {}));
        assert_eq!(counts(&ds).get("a"), Some(&1), "new node is used first");
        let mut gone = task("s-0", "s");
        gone.node_id = Some("b".into());
        gone.status.state = TaskState::Running;
        // a: t-0; b: s-0, s-2, t-1; c: s-1, s-3.
        assert_eq!(
            (s.tasks_on("a"), s.tasks_on("b"), s.tasks_on("c")),
            (1, 3, 2)
        );
        s.remove_task(&gone);
        assert_eq!(s.tasks_on("b"), 2);
        s.add_task(&gone);
        assert_eq!(s.tasks_on("b"), 3);
        s.remove_node("a");
        assert_eq!(s.tasks_on("a"), 0);
        assert_eq!(s.tasks_on("c"), 2);
        let ds = s.schedule(&tasks(1, "u", |_| {}));
        assert_eq!(counts(&ds).get("c"), Some(&1), "fewest tasks overall");
    }

    #[test]
    fn lazy_heap_pops_like_a_full_heap() {
        // xorshift, deterministic
        let mut x: u64 = 42;
        let mut rnd = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for expect in [0, 1, 5, 100] {
            let keys: Vec<Key> = (0..500)
                .map(|i| (rnd(3) as u32, rnd(50) as u32, i))
                .collect();
            let mut lazy = LazyHeap::new(keys.clone(), expect);
            let mut full: BinaryHeap<Reverse<Key>> = keys.into_iter().map(Reverse).collect();
            for step in 0..2000 {
                let a = lazy.pop();
                let b = full.pop().map(|Reverse(k)| k);
                assert_eq!(a, b, "step {step}");
                let Some((c, t, i)) = a else { break };
                // Usually put it back with a bigger key (a placement), sometimes drop it.
                if rnd(10) != 0 {
                    lazy.push((c + 1, t + 1, i));
                    full.push(Reverse((c + 1, t + 1, i)));
                }
            }
        }
    }

    #[test]
    fn preassigned_tasks_are_not_counted_before_placement() {
        let ns = nodes(&["a"]);
        let ts = tasks(1, "g", |t| {
            t.node_id = Some("a".into());
            t.spec.placement.max_replicas_per_node = 1;
        });
        // The same task is both waiting and part of "all tasks".
        let ds = schedule(&ts, &ns, &ts);
        assert!(matches!(ds[0], Decision::Assign { .. }), "{ds:?}");
        let mut s = Scheduler::new(&ns, &ts);
        s.schedule(&ts);
        assert_eq!(s.tasks_on("a"), 1);
    }
}
