//! The cluster object as the API shows it: `GET /v1/cluster` (`cluster info`: members, Raft
//! state, settings), the join tokens (`GET /v1/cluster/join-tokens`, admins only) and their
//! rotation (`POST /v1/cluster/join-tokens/rotate?role=worker|manager`). Secrets leave only
//! inside join tokens.

use axum::extract::{Query, State};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;

use flotilla_pki::JoinToken;
use flotilla_types::{ClusterInfo, ClusterMember, JoinTokens, Node, NodeRole, RaftInfo};

use super::{json_ok, Caller, Ctx};
use crate::error::ManagerError;
use crate::manager::ClusterObject;

/// Reachability of each member as this manager sees it: itself, and peers it heard from
/// within the last two seconds (the leader tracks every member; a follower only the leader).
pub fn member_reachability(status: &flotilla_store::RaftStatus, raft_id: u64) -> &'static str {
    if raft_id == status.id {
        return "reachable";
    }
    match status.peers.iter().find(|p| p.id == raft_id) {
        Some(p) => match p.last_contact_ms {
            Some(ms) if ms < 2000 => "reachable",
            _ => "unreachable",
        },
        None => "unknown",
    }
}

pub async fn info(State(ctx): State<Ctx>) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let status = mgr.store.status();
    let nodes: Vec<Node> = mgr.list_blocking().await?;
    let name_of = |raft_id: u64| {
        nodes
            .iter()
            .find(|n| {
                n.manager_status
                    .as_ref()
                    .is_some_and(|m| m.raft_id == raft_id)
            })
            .map(|n| (n.id.clone(), n.spec.name.clone()))
            .unwrap_or_default()
    };
    let member = |raft_id: u64, addr: &str, voter: bool| {
        let (node_id, name) = name_of(raft_id);
        ClusterMember {
            node_id,
            name,
            raft_id,
            addr: addr.to_string(),
            leader: status.leader_id == Some(raft_id),
            reachability: member_reachability(&status, raft_id).to_string(),
            voter,
        }
    };
    let mut managers: Vec<ClusterMember> = status
        .voters
        .iter()
        .map(|(id, addr)| member(*id, addr, true))
        .collect();
    managers.extend(
        status
            .learners
            .iter()
            .map(|(id, addr)| member(*id, addr, false)),
    );
    let leader = managers.iter().find(|m| m.leader).cloned();
    let info = ClusterInfo {
        cluster_id: mgr.cluster_id.clone(),
        node_id: mgr.config.node_id.clone(),
        leader,
        managers,
        raft: RaftInfo {
            raft_id: status.id,
            state: status.state.to_string(),
            term: status.term,
            commit_index: status.committed,
            applied_index: status.applied,
            last_log_index: status.last_log_index,
        },
        consistent: status.is_leader(),
        ca_fingerprint: flotilla_pki::fingerprint_pem(&ctx.tls.ca_pem()).unwrap_or_default(),
        settings: super::trust::settings(&mgr.cluster()?),
    };
    Ok(json_ok(&info))
}

fn tokens(c: &ClusterObject) -> JoinTokens {
    let fp = flotilla_pki::fingerprint_pem(&c.ca_cert_pem).unwrap_or_default();
    JoinTokens {
        worker: JoinToken {
            ca_fingerprint: fp.clone(),
            secret: c.worker_secret.clone(),
        }
        .to_string(),
        manager: JoinToken {
            ca_fingerprint: fp,
            secret: c.manager_secret.clone(),
        }
        .to_string(),
    }
}

pub async fn join_tokens(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ManagerError> {
    if !caller.is_admin() {
        return Err(ManagerError::forbidden("join tokens are for admins"));
    }
    let mgr = &ctx;
    Ok(json_ok(&tokens(&mgr.cluster()?)))
}

#[derive(Debug, Deserialize)]
pub struct RotateQuery {
    role: String,
}

pub async fn rotate_token(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<RotateQuery>,
) -> Result<Response, ManagerError> {
    if !caller.is_admin() {
        return Err(ManagerError::forbidden("join tokens are for admins"));
    }
    let role: NodeRole = q.role.parse().map_err(ManagerError::bad_request)?;
    let mgr = &ctx;
    let ((), c) = mgr
        .update_cluster(|c| {
            let fresh = JoinToken::new("").secret;
            match role {
                NodeRole::Worker => c.worker_secret = fresh,
                NodeRole::Manager => c.manager_secret = fresh,
            }
            Ok(())
        })
        .await?;
    Ok(json_ok(&tokens(&c)))
}
