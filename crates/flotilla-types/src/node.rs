//! Nodes: a machine of the cluster, its spec (role, availability, labels), what its agent
//! reports (description, status) and, on managers, its Raft membership.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Meta;

/// A machine in the cluster. Managers hold Raft state; every node (managers included, unless
/// drained) runs tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: NodeSpec,
    pub description: NodeDescription,
    pub status: NodeStatus,
    /// Present on managers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_status: Option<ManagerStatus>,
    /// The node's task subnet, allocated by the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::NodeNetwork>,
}

/// What an operator controls about a node (`flotilla node update`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub role: NodeRole,
    pub availability: Availability,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Manager,
    Worker,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Manager => "manager",
            NodeRole::Worker => "worker",
        }
    }
}

impl std::str::FromStr for NodeRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "manager" => Ok(NodeRole::Manager),
            "worker" => Ok(NodeRole::Worker),
            other => Err(format!("unknown role {other:?}: use manager or worker")),
        }
    }
}

/// Swarm's node availability: `active` takes tasks, `pause` takes no new tasks, `drain` moves
/// its tasks elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        }
    }
}

impl std::str::FromStr for Availability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            other => Err(format!(
                "unknown availability {other:?}: use active, pause or drain"
            )),
        }
    }
}

/// Facts the node reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeDescription {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub resources: Resources,
    /// Flotilla version and the runtime host probe (runc version, cgroup layout, …).
    #[serde(default)]
    pub engine: BTreeMap<String, serde_json::Value>,
}

/// CPU in nano-CPUs (1e9 = one core) and memory in bytes, as in Docker's API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub nano_cpus: u64,
    #[serde(default)]
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Unknown,
    Down,
    Ready,
    Disconnected,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Unknown => "unknown",
            NodeState::Down => "down",
            NodeState::Ready => "ready",
            NodeState::Disconnected => "disconnected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub state: NodeState,
    #[serde(default)]
    pub message: String,
    /// Address other nodes and clients use (`--advertise`, else `--listen`).
    pub addr: String,
    /// Unix milliseconds of the last heartbeat the leader recorded.
    #[serde(default)]
    pub last_heartbeat: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManagerStatus {
    /// The manager's Raft member id.
    pub raft_id: u64,
    pub addr: String,
    #[serde(default)]
    pub leader: bool,
    /// `reachable` or `unreachable`, as seen by the answering manager.
    #[serde(default)]
    pub reachability: String,
}
