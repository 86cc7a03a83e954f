//! JSON bodies of the `/v1` HTTP API that are not stored objects themselves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Availability, NodeDescription, NodeRole};

/// Every API error: `{"message": "..."}` with an HTTP status that says what kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: String,
    /// The answering node.
    pub node_id: String,
    pub leader: Option<ClusterMember>,
    pub managers: Vec<ClusterMember>,
    pub raft: RaftInfo,
    /// False when this answer came from a node that could not confirm it is current.
    pub consistent: bool,
    /// SHA-256 of the root CA certificate (hex), as pinned by join tokens.
    pub ca_fingerprint: String,
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    pub node_id: String,
    pub name: String,
    pub raft_id: u64,
    pub addr: String,
    pub leader: bool,
    /// `reachable` / `unreachable` / `unknown`, from the answering manager's view.
    pub reachability: String,
    pub voter: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftInfo {
    pub raft_id: u64,
    pub state: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
}

/// `GET /v1/cluster/join-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokens {
    pub worker: String,
    pub manager: String,
}

/// `POST /v1/join` (anonymous TLS, after the joiner has pinned the CA).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    /// PEM certificate signing request for the node's own key (the key never leaves the node).
    pub csr_pem: String,
    pub name: String,
    pub addr: String,
    pub description: NodeDescription,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    pub cluster_id: String,
    pub node_id: String,
    pub role: NodeRole,
    pub raft_id: u64,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Managers' addresses, so the node can find a leader later.
    pub managers: Vec<String>,
}

/// `POST /v1/nodes/{id}/renew`: a node renews its own certificate (mTLS, same identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    pub csr_pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewResponse {
    pub cert_pem: String,
    pub ca_pem: String,
}

/// `POST /v1/nodes/{id}` body (`flotilla node update`); absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<Availability>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_rm: Vec<String>,
}

/// `POST /v1/nodes/{id}/heartbeat` from a node's agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub addr: String,
    pub description: NodeDescription,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// Milliseconds until the next heartbeat is due.
    pub period_ms: u64,
    pub managers: Vec<String>,
    /// The role the cluster wants this node in (promote/demote).
    pub role: NodeRole,
}

/// One line of `GET /v1/events` (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    pub revision: u64,
    /// `node`, `service`, `task`, `secret`, `config`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// `create`, `update`, `remove`.
    pub action: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<serde_json::Value>,
}

/// The query of `GET /v1/tasks/{id}/logs` and `GET /v1/services/{id}/logs`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    pub follow: bool,
    pub tail: Option<usize>,
    /// RFC 3339 time, or a duration ago (`10m`).
    pub since: Option<String>,
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters), so that a
/// `+` in an RFC 3339 offset stays a `+` and a `&` cannot add parameters.
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The node-local logs URL of task `id` (what a manager's `service logs` fan-out calls).
pub fn task_logs_path(id: &str, follow: bool, tail: Option<usize>, since: Option<&str>) -> String {
    let mut path = format!("/v1/tasks/{}/logs?follow={follow}", query_value(id));
    if let Some(n) = tail {
        path.push_str(&format!("&tail={n}"));
    }
    if let Some(s) = since {
        path.push_str(&format!("&since={}", query_value(s)));
    }
    path
}
