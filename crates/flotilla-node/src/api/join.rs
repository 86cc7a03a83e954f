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
use crate::error::ApiError;
use crate::manager::{encode, now_ms, Manager};

/// `GET /v1/join/ca`: the public root certificate, for a joining node to check against its
/// token's fingerprint.
pub async fn ca(State(ctx): State<Ctx>) -> Response {
    json_ok(&serde_json::json!({ "ca_pem": ctx.tls.ca_pem() }))
}

fn same_secret(a: &str, b: &str) -> bool {
    // Constant-time comparison of equal-length secrets.
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A manager's Raft id, derived from its node id.
pub fn raft_id_for(node_id: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(node_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b) >> 1 | 1
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
) -> Result<Response, ApiError> {
    let mgr = ctx.manager()?;
    let cluster = mgr.cluster()?;
    let token = JoinToken::parse(&req.token).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fp = flotilla_pki::fingerprint_pem(&cluster.ca_cert_pem)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if token.ca_fingerprint != fp {
        return Err(ApiError::bad_request(format!(
            "join token pins CA {} but this cluster's CA is {}: the token belongs to another cluster",
            &token.ca_fingerprint[..12],
            &fp[..12]
        )));
    }
    let role = if same_secret(&token.secret, &cluster.worker_secret) {
        NodeRole::Worker
    } else if same_secret(&token.secret, &cluster.manager_secret) {
        NodeRole::Manager
    } else {
        return Err(ApiError::unauthorized(
            "invalid join token: its secret is not current (rotated, or never valid); print a current one on a manager with `flotilla cluster join-token worker|manager`",
        ));
    };
    flotilla_types::validate_name(&req.name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    req.addr
        .parse::<SocketAddr>()
        .map_err(|e| ApiError::bad_request(format!("addr {:?}: {e}", req.addr)))?;
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
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let now = now_ms();
    let node = Node {
        id: node_id.clone(),
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
    };
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
        managers: manager_addrs(&mgr),
    }))
}

/// `POST /v1/nodes/{id}/renew`: a node renews its own certificate. The role comes from the
/// store, so promotions and demotions take effect at the next renewal.
pub async fn renew(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<RenewRequest>,
) -> Result<Response, ApiError> {
    if !caller.is_node_or_admin(&id) {
        return Err(ApiError::forbidden(
            "a node may only renew its own certificate",
        ));
    }
    let mgr = ctx.manager()?;
    let node: Node = mgr.get(&id)?.ok_or_else(|| {
        ApiError::not_found(format!("node {id} not found (removed from the cluster?)"))
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
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
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
) -> Result<Response, ApiError> {
    let Caller::Node {
        id,
        role: Role::Manager,
    } = &caller
    else {
        return Err(ApiError::forbidden(
            "only a manager node may add itself as a voter",
        ));
    };
    let mgr = ctx.manager()?;
    let node: Node = mgr
        .get(id)?
        .ok_or_else(|| ApiError::not_found(format!("node {id} not found")))?;
    if node.spec.role != NodeRole::Manager || raft_id_for(id) != req.raft_id {
        return Err(ApiError::forbidden(
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
