//! The leader's control-loop logic as pure functions: no sockets, disks, clocks or async.
//!
//! Drivers (elsewhere) watch the store, call these functions with the current objects and the
//! current time in Unix milliseconds, persist what comes back, and call again on the next change
//! or at the time asked for.
//!
//! * [`reconcile`] — the orchestrator, one service at a time: compares the tasks that exist with
//!   the tasks that should (replicated slots 1..=N, one per eligible node for global, jobs run
//!   to their completion count), applies the restart policy, replaces tasks on down or drained
//!   nodes and unhealthy ones, drives rolling updates and rollbacks, prunes task history.
//!   Returns [`Action`]s plus the time it wants to be called again ([`Reconcile::wake_at`]).
//!   [`reconcile_removed`] cleans up after `service rm`.
//! * [`schedule`] / [`Scheduler`] — assigns new tasks to nodes: filters (ready, active,
//!   constraints, resources, max replicas per node), then spread scoring; returns a
//!   [`Decision`] per task with a user-facing reason when nothing fits.
//! * [`node_liveness`] — marks nodes whose heartbeats stopped as down.
//! * [`Constraint`] / [`SpreadPreference`] — the placement constraint and preference syntax.
//!
//! The orchestrator keeps no memory between calls: everything it needs is in the tasks (see the
//! meaning of desired states in [`reconcile`]'s module docs, repeated on [`Action`]), so a new
//! leader continues where the old one stopped. Time only enters as the `now_ms` argument and
//! the task/status timestamps, which keeps every test deterministic.
#![forbid(unsafe_code)]

mod constraint;
mod liveness;
mod orchestrator;
mod scheduler;
#[cfg(test)]
mod testutil;

pub use constraint::{
    matches_all, parse_constraints, parse_preferences, Constraint, ConstraintError, ConstraintKey,
    SpreadPreference,
};
pub use liveness::{next_liveness_check, node_liveness};
pub use orchestrator::{
    reconcile, reconcile_removed, reconcile_with_ids, Action, OrchestratorConfig, Reconcile,
    StatusChange, TaskUpdate,
};
pub use scheduler::{schedule, Decision, Scheduler};
