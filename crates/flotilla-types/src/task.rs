//! Tasks: one scheduled instance of a service on one node, with Swarm's states and the
//! status its agent reports.

use serde::{Deserialize, Serialize};

use crate::{Meta, TaskSpec};

/// One scheduled instance of a service: a container on one node. A task never moves backwards
/// through its states; a restart is a new task in the same slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    #[serde(flatten)]
    pub meta: Meta,
    pub service_id: String,
    /// Replicated services and jobs: 1..=N. Global services: none (the node identifies it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
    /// Set by the scheduler (or at creation for global services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    pub spec: TaskSpec,
    /// `Service::spec_version` this task was created from.
    #[serde(default)]
    pub spec_version: u64,
    /// For jobs: the `Service::job_iteration` this task belongs to.
    #[serde(default)]
    pub job_iteration: u64,
    pub desired_state: TaskState,
    pub status: TaskStatus,
}

/// Swarm's task states, in order. Comparisons (`<`, `>=`) follow this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Pending,
    Assigned,
    Accepted,
    Preparing,
    Ready,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Remove,
    Orphaned,
}

impl TaskState {
    pub const ALL: [TaskState; 14] = [
        TaskState::New,
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Accepted,
        TaskState::Preparing,
        TaskState::Ready,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Shutdown,
        TaskState::Failed,
        TaskState::Rejected,
        TaskState::Remove,
        TaskState::Orphaned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Accepted => "accepted",
            TaskState::Preparing => "preparing",
            TaskState::Ready => "ready",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Shutdown => "shutdown",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Remove => "remove",
            TaskState::Orphaned => "orphaned",
        }
    }

    /// The task has stopped for good (its container is gone or will never start).
    pub fn is_terminal(self) -> bool {
        self > TaskState::Running
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown task state {s:?}"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: TaskState,
    /// Unix milliseconds of the last state change.
    pub timestamp: u64,
    /// Human summary of the state ("started", "no suitable node (…)").
    #[serde(default)]
    pub message: String,
    /// Error that ended the task, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Health as seen by the agent (only with a health check). A value this version does not
    /// know reads as `None`, so one odd field never fails a whole report.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "Health::lenient"
    )]
    pub health: Option<Health>,
    /// The task's IP address on its node's task network (its first network's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The task's address on each user-defined network (network name → address).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub addresses: std::collections::BTreeMap<String, String>,
}

/// A task's health as its agent's probes see it (Docker's `starting` / `healthy` /
/// `unhealthy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Within the start period, or no probe has passed yet.
    Starting,
    Healthy,
    /// `retries` probes in a row failed after the start period.
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }

    /// Deserializes an optional health, reading anything unknown (or not a string) as `None`.
    pub fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Health>, D::Error> {
        let v = Option::<serde_json::Value>::deserialize(d)?;
        Ok(v.and_then(|v| serde_json::from_value(v).ok()))
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TaskStatus {
    pub fn new(state: TaskState, timestamp: u64, message: impl Into<String>) -> Self {
        TaskStatus {
            state,
            timestamp,
            message: message.into(),
            err: None,
            exit_code: None,
            container_id: None,
            health: None,
            address: None,
            addresses: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_ordered_like_swarm() {
        assert!(TaskState::New < TaskState::Pending);
        assert!(TaskState::Running < TaskState::Complete);
        assert!(!TaskState::Running.is_terminal());
        assert!(TaskState::Failed.is_terminal());
        for st in TaskState::ALL {
            assert_eq!(st.as_str().parse::<TaskState>(), Ok(st));
        }
    }

    #[test]
    fn unknown_health_reads_as_none() {
        let st = TaskStatus::new(TaskState::Running, 1, "started");
        let mut v = serde_json::to_value(&st).expect("encode");
        v["health"] = serde_json::json!("healthy");
        let got: TaskStatus = serde_json::from_value(v.clone()).expect("decode");
        assert_eq!(got.health, Some(Health::Healthy));
        v["health"] = serde_json::json!("\u{1b}]0;pwned\u{7}");
        let got: TaskStatus = serde_json::from_value(v.clone()).expect("decode");
        assert_eq!(got.health, None);
        v["health"] = serde_json::json!(42);
        let got: TaskStatus = serde_json::from_value(v).expect("decode");
        assert_eq!(got.health, None);
    }
}
