//! The leader's control-loop logic as pure functions: no sockets, disks, clocks or async.
//!
//! Drivers (elsewhere) watch the store, call these functions with the current objects and the
//! current time in Unix milliseconds, persist what comes back, and call again on the next change
//! or at the time asked for. Durations in specs are nanoseconds (Docker's convention) and are
//! converted here, rounding up.
//!
//! # Pieces
//!
//! * [`reconcile`] — the orchestrator, one service at a time: compares the tasks that exist with
//!   the tasks that should (replicated slots 1..=N, one per eligible node for global, jobs until
//!   their completion count), applies the restart policy, replaces tasks on down or drained
//!   nodes and unhealthy ones, drives rolling updates and rollbacks, prunes task history.
//!   Returns [`Action`]s plus the time it wants to be called again ([`Reconcile::wake_at`]).
//!   [`reconcile_removed`] cleans up after `service rm`.
//! * [`schedule`] / [`Scheduler`] — assigns new tasks to nodes: filters (ready, active,
//!   constraints, resources, max replicas per node), then spread scoring; one [`Decision`] per
//!   task, with a user-facing reason when nothing fits.
//! * [`nodes_down`] — which nodes' heartbeats stopped (the leader marks them down).
//! * [`Constraint`] / [`SpreadPreference`] — the placement syntax, parsed and matched.
//! * [`RateLimiter`] — per-node token buckets the leader puts in front of agent writes.
//! * [`allocate()`] (module [`allocate`](mod@allocate)) — the address allocator: a task subnet
//!   for every node, a virtual IP for every `vip`-mode service; returns the changed objects
//!   ([`Allocation`]) to write back, each conditional on its `meta.version`. Built on the pure
//!   allocators of [`ipam`] ([`ipam::NodeSubnets`], [`ipam::VipPool`], [`ipam::gateway_of`]).
//!
//! # Driving the orchestrator
//!
//! For each service, whenever the service, one of its tasks or any node changes (debounce
//! freely), and at the latest at the returned `wake_at`:
//!
//! 1. `let r = reconcile(&service, &tasks_of_service, &all_nodes, now_ms, &cfg);`
//! 2. write `r.actions` as one batch: [`Action::CreateTask`] inserts, [`Action::UpdateTask`]
//!    sets `desired_state` and/or `status` (conditional on the task's `meta.version`),
//!    [`Action::DeleteTask`] deletes, [`Action::SetUpdateStatus`] / [`Action::Rollback`] change
//!    the service. On a version conflict drop the batch and reconcile again.
//! 3. arm a timer for `r.wake_at`.
//!
//! After `service rm`, call [`reconcile_removed`] with the service's remaining tasks instead,
//! until none remain.
//!
//! The orchestrator keeps no memory between calls, so a new leader continues where the old one
//! stopped. What must survive is written into the tasks' desired state:
//!
//! | desired state | meaning |
//! |---|---|
//! | `running` | wanted; on an ended task: its end is not handled yet (a restart is due, maybe after the restart delay) |
//! | `complete` on an ended task | given up by the restart policy; the slot stays empty until the spec changes |
//! | `shutdown` | stopped on purpose (replaced, drained, rolled) |
//! | `remove` | slot gone (scale down, service removed): deleted once ended |
//!
//! Agents should run a task while its desired state is `running` (or `complete`, for a task
//! already running) and stop it when it is `shutdown` or `remove`. The orchestrator writes a
//! task's observed `status` only where no agent can: `orphaned` for tasks on down/removed nodes,
//! `shutdown` for tasks stopped before any node got them.
//!
//! # Driving the scheduler
//!
//! Keep one [`Scheduler`] per leader term: build it from all nodes and tasks, then feed it
//! changes ([`Scheduler::upsert_node`], [`Scheduler::remove_node`], [`Scheduler::add_task`]
//! for tasks placed by someone else, [`Scheduler::remove_task`] when a counted task ends or is
//! deleted). Call [`Scheduler::schedule`] with all tasks in state `new`/`pending` (large batches
//! are cheaper: the set-up cost is per service group and call). Persist
//! [`Decision::Assign`] as `node_id = …, state = assigned`, and [`Decision::NoSuitableNode`] as
//! `state = pending, message = reason`; retry pending tasks when nodes or tasks change.
//! Placements it returns are already counted.
//!
//! Time only enters as `now_ms` arguments and task/status timestamps, which keeps every test
//! deterministic.
#![forbid(unsafe_code)]

pub mod allocate;
mod constraint;
pub mod ipam;
mod liveness;
mod orchestrator;
mod ratelimit;
mod scheduler;
#[cfg(test)]
mod testutil;

pub use allocate::{allocate, Allocation};
pub use constraint::{
    matches_all, parse_constraints, parse_preferences, Constraint, ConstraintError, ConstraintKey,
    SpreadPreference,
};
pub use liveness::nodes_down;
pub use orchestrator::{
    reconcile, reconcile_removed, reconcile_with_ids, Action, OrchestratorConfig, Reconcile,
    StatusChange, TaskUpdate,
};
pub use ratelimit::{RateLimit, RateLimiter};
pub use scheduler::{schedule, Decision, Scheduler};
