//! A node's identity as its data directory records it (`node.json`).

use serde::{Deserialize, Serialize};

use crate::NodeRole;

/// Who a node is in its cluster; written at init or join, updated on role changes and when
/// the manager list changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub cluster_id: String,
    pub node_id: String,
    pub name: String,
    pub role: NodeRole,
    pub raft_id: u64,
    /// The address other nodes reach this one at.
    pub addr: String,
    /// Manager addresses this node knows (refreshed by heartbeats).
    #[serde(default)]
    pub managers: Vec<String>,
}

/// The wall clock in Unix milliseconds (0 before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
