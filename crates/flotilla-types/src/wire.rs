//! What agents and managers send each other on the dispatcher's endpoints.

use serde::{Deserialize, Serialize};

use crate::{Task, TaskStatus, TrustPolicy};

/// Everything a manager wants a node to run (`GET /v1/nodes/{id}/assignments`, streamed:
/// each message is the whole set).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignments {
    /// The store revision the set was read at.
    pub revision: u64,
    pub tasks: Vec<Task>,
    /// The cluster's image trust policy (from the cluster object); agents verify images
    /// against it before running them. `None` from an older manager: agents fail closed.
    #[serde(default)]
    pub trust: Option<TrustPolicy>,
}

/// One task's new status, as its agent saw it (`POST /v1/nodes/{id}/tasks` takes a batch).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub task_id: String,
    pub status: TaskStatus,
}

/// A manager that just joined (or was promoted) asks to become a Raft voter
/// (`POST /v1/cluster/managers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddManager {
    pub raft_id: u64,
    pub addr: String,
}
