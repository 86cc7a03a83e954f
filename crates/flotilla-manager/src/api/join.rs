//! Joining and staying in the cluster: `POST /v1/join` (a join token buys a node
//! certificate and a node record), `POST /v1/nodes/{id}/renew` (certificate renewal, with the
//! role the store holds now) and `POST /v1/cluster/managers` (a manager node becomes a Raft
//! voter).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use flotilla_pki::{JoinToken, Role};
use flotilla_store::{Batch, Op};
use flotilla_types::{
    Availability, JoinRequest, JoinResponse, ManagerStatus, Meta, Node, NodeRole, NodeSpec,
    NodeState, NodeStatus, RenewRequest, RenewResponse,
};

use super::{json_ok, Caller, Ctx};
use crate::error::ManagerError;
use crate::manager::{encode, ClusterObject, Manager};
use flotilla_store::raft_id_for;
use flotilla_types::now_ms;

fn same_secret(a: &str, b: &str) -> bool {
    // Constant-time comparison of equal-length secrets.
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn role_of(r: NodeRole) -> Role {
    match r {
        NodeRole::Manager => Role::Manager,
        NodeRole::Worker => Role::Worker,
    }
}

pub fn manager_addrs(mgr: &Manager) -> Vec<String> {
    mgr.store
        .status()
        .voters
        .into_iter()
        .map(|(_, a)| a)
        .collect()
}

/// `POST /v1/join` (leader): checks the token, signs the joiner's key with an identity chosen
/// here, and records the node.
pub async fn join(
    State(ctx): State<Ctx>,
    Json(req): Json<JoinRequest>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let cluster = mgr.cluster()?;
    let role = token_role(&cluster, &req.token)?;
    flotilla_types::validate_name(&req.name)
        .map_err(|e| ManagerError::bad_request(e.to_string()))?;
    req.addr
        .parse::<SocketAddr>()
        .map_err(|e| ManagerError::bad_request(format!("addr {:?}: {e}", req.addr)))?;
    let node_id = flotilla_types::new_id();
    let raft_id = raft_id_for(&node_id);
    let cert_pem = mgr
        .ca()?
        .sign_csr(
            &req.csr_pem,
            &cluster.cluster_id,
            &node_id,
            role_of(role),
            Duration::from_secs(cluster.cert_lifetime_secs),
        )
        .map_err(|e| ManagerError::bad_request(e.to_string()))?;
    let node = joined_node(&req, &node_id, role, raft_id, now_ms());
    mgr.write(
        Batch::single(Op::create(
            flotilla_store::Table::Nodes,
            &node_id,
            encode(&node)?,
        )),
        "node",
    )
    .await?;
    tracing::info!(node = %node_id, name = %req.name, role = role.as_str(), "node joined");
    Ok(json_ok(&JoinResponse {
        cluster_id: cluster.cluster_id,
        node_id,
        role,
        raft_id,
        cert_pem,
        ca_pem: cluster.ca_cert_pem,
        managers: manager_addrs(mgr),
    }))
}

/// The role a join token grants: it must pin this cluster's CA and carry a current secret.
fn token_role(cluster: &ClusterObject, token: &str) -> Result<NodeRole, ManagerError> {
    let token = JoinToken::parse(token).map_err(|e| ManagerError::bad_request(e.to_string()))?;
    let fp = flotilla_pki::fingerprint_pem(&cluster.ca_cert_pem)
        .map_err(|e| ManagerError::internal(e.to_string()))?;
    if token.ca_fingerprint != fp {
        return Err(ManagerError::bad_request(format!(
            "join token pins CA {} but this cluster's CA is {}: the token belongs to another cluster",
            &token.ca_fingerprint[..12],
            &fp[..12]
        )));
    }
    if same_secret(&token.secret, &cluster.worker_secret) {
        Ok(NodeRole::Worker)
    } else if same_secret(&token.secret, &cluster.manager_secret) {
        Ok(NodeRole::Manager)
    } else {
        Err(ManagerError::unauthorized(
            "invalid join token: its secret is not current (rotated, or never valid); print a current one on a manager with `flotilla cluster join-token worker|manager`",
        ))
    }
}

/// The node record of a joiner, as first written (its state unknown until its agent checks in).
fn joined_node(req: &JoinRequest, node_id: &str, role: NodeRole, raft_id: u64, now: u64) -> Node {
    Node {
        id: node_id.to_string(),
        meta: Meta {
            version: 0,
            created_at: now,
            updated_at: now,
        },
        spec: NodeSpec {
            name: req.name.clone(),
            role,
            availability: Availability::Active,
            labels: Default::default(),
        },
        description: req.description.clone(),
        status: NodeStatus {
            state: NodeState::Unknown,
            message: "joined".into(),
            addr: req.addr.clone(),
            last_heartbeat: 0,
        },
        manager_status: (role == NodeRole::Manager).then(|| ManagerStatus {
            raft_id,
            addr: req.addr.clone(),
            leader: false,
            reachability: "unknown".into(),
        }),
        network: None,
    }
}

/// `POST /v1/nodes/{id}/renew`: a node renews its own certificate. The role comes from the
/// store, so promotions and demotions take effect at the next renewal.
pub async fn renew(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<RenewRequest>,
) -> Result<Response, ManagerError> {
    if !caller.is_node_or_admin(&id) {
        return Err(ManagerError::forbidden(
            "a node may only renew its own certificate",
        ));
    }
    let mgr = &ctx;
    let node: Node = mgr.get(&id)?.ok_or_else(|| {
        ManagerError::not_found(format!("node {id} not found (removed from the cluster?)"))
    })?;
    let cluster = mgr.cluster()?;
    let cert_pem = mgr
        .ca()?
        .sign_csr(
            &req.csr_pem,
            &cluster.cluster_id,
            &id,
            role_of(node.spec.role),
            Duration::from_secs(cluster.cert_lifetime_secs),
        )
        .map_err(|e| ManagerError::bad_request(e.to_string()))?;
    tracing::info!(node = %id, "certificate renewed");
    Ok(json_ok(&RenewResponse {
        cert_pem,
        ca_pem: cluster.ca_cert_pem,
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AddManager {
    pub raft_id: u64,
    pub addr: String,
}

/// `POST /v1/cluster/managers`: a manager that joined (or was promoted) asks to become a Raft
/// voter once its own Raft endpoint is up. Learner first, promoted when caught up.
pub async fn add_manager(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<AddManager>,
) -> Result<Response, ManagerError> {
    let Caller::Node {
        id,
        role: Role::Manager,
    } = &caller
    else {
        return Err(ManagerError::forbidden(
            "only a manager node may add itself as a voter",
        ));
    };
    let mgr = &ctx;
    let node: Node = mgr
        .get(id)?
        .ok_or_else(|| ManagerError::not_found(format!("node {id} not found")))?;
    if node.spec.role != NodeRole::Manager || raft_id_for(id) != req.raft_id {
        return Err(ManagerError::forbidden(
            "this node is not a manager of the cluster",
        ));
    }
    let status = mgr.store.status();
    if status
        .voters
        .iter()
        .any(|(v, a)| *v == req.raft_id && *a == req.addr)
    {
        return Ok(json_ok(&serde_json::json!({"added": false})));
    }
    let _one_at_a_time = mgr.membership.lock().await;
    mgr.store.add_voter(req.raft_id, req.addr.clone()).await?;
    tracing::info!(node = %id, raft_id = req.raft_id, addr = %req.addr, "manager added as voter");
    Ok(json_ok(&serde_json::json!({"added": true})))
}
