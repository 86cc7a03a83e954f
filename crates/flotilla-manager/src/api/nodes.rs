//! Nodes: `flotilla node ls|inspect|update|rm|promote|demote` (`/v1/nodes…`, leader), and the
//! agents' heartbeats (`POST /v1/nodes/{id}/heartbeat`): the leader records each check-in in
//! memory (for [`crate::liveness`]) and writes only what changed, within the node's write
//! budget. A node is found by id, name or unique id prefix ([`find_node`]); manager nodes get
//! their Raft status as this manager sees it.

use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use serde::Deserialize;

use flotilla_store::{Batch, Op, Table};
use flotilla_types::{
    Heartbeat, HeartbeatResponse, ManagerStatus, Node, NodeRole, NodeState, NodeUpdate,
};

use super::cluster::member_reachability;
use super::join::manager_addrs;
use super::{json_ok, Caller, Ctx, VersionQuery};
use crate::error::ManagerError;
use crate::manager::{encode, lock, Manager};
use flotilla_store::raft_id_for;
use flotilla_types::now_ms;

/// Finds a node by exact id, exact name, or unique id prefix (as the Docker CLI does).
pub fn find_node(mgr: &Manager, key: &str) -> Result<Node, ManagerError> {
    if let Some(n) = mgr.get::<Node>(key)? {
        return Ok(n);
    }
    let nodes: Vec<Node> = mgr.list()?;
    let by_name: Vec<&Node> = nodes.iter().filter(|n| n.spec.name == key).collect();
    if by_name.len() == 1 {
        return Ok(by_name[0].clone());
    }
    if by_name.len() > 1 {
        return Err(ManagerError::conflict(format!(
            "{} nodes are named {key:?}: use the node id",
            by_name.len()
        )));
    }
    let by_prefix: Vec<&Node> = nodes.iter().filter(|n| n.id.starts_with(key)).collect();
    match by_prefix.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ManagerError::not_found(format!(
            "node {key} not found: see `flotilla node ls`"
        ))),
        _ => Err(ManagerError::conflict(format!(
            "node prefix {key:?} is ambiguous: give more characters"
        ))),
    }
}

/// [`find_node`] on the blocking pool.
async fn find_blocking(mgr: &Ctx, key: String) -> Result<Node, ManagerError> {
    mgr.blocking(move |m| find_node(m, &key)).await
}

/// Adds what only the answering manager knows: Raft leadership and reachability.
fn with_live_status(mgr: &Manager, mut nodes: Vec<Node>) -> Vec<Node> {
    let status = mgr.store.status();
    for n in &mut nodes {
        if n.spec.role != NodeRole::Manager {
            n.manager_status = None;
            continue;
        }
        let raft_id = raft_id_for(&n.id);
        let addr = status
            .voters
            .iter()
            .chain(status.learners.iter())
            .find(|(id, _)| *id == raft_id)
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| n.status.addr.clone());
        n.manager_status = Some(ManagerStatus {
            raft_id,
            addr,
            leader: status.leader_id == Some(raft_id),
            reachability: member_reachability(&status, raft_id).to_string(),
        });
    }
    nodes
}

pub async fn list(State(ctx): State<Ctx>) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let mut nodes = with_live_status(mgr, mgr.list_blocking().await?);
    nodes.sort_by(|a, b| a.spec.name.cmp(&b.spec.name).then(a.id.cmp(&b.id)));
    Ok(json_ok(&nodes))
}

pub async fn inspect(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let node = find_blocking(mgr, key).await?;
    Ok(json_ok(&with_live_status(mgr, vec![node])))
}

pub async fn update(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
    Query(q): Query<VersionQuery>,
    Json(upd): Json<NodeUpdate>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    // The request is a change to apply (availability, labels), not a whole spec: when the
    // leader writes the node meanwhile (its status, address, description), the change is
    // applied again to the newer node. A caller that names the version it read gets the
    // conflict instead.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match update_once(mgr, &key, q.version, &upd).await {
            Err(e)
                if matches!(e, ManagerError::Conflict(_)) && q.version.is_none() && attempt < 5 =>
            {
                continue
            }
            res => return res,
        }
    }
}

async fn update_once(
    mgr: &Ctx,
    key: &str,
    version: Option<u64>,
    upd: &NodeUpdate,
) -> Result<Response, ManagerError> {
    let mut node = find_blocking(mgr, key.to_string()).await?;
    if upd.role.is_some_and(|r| r != node.spec.role) {
        return Err(ManagerError::bad_request(
            "change roles with `flotilla node promote` / `flotilla node demote`",
        ));
    }
    let expect = version.unwrap_or(node.meta.version);
    if let Some(a) = upd.availability {
        node.spec.availability = a;
    }
    for k in &upd.label_rm {
        if node.spec.labels.remove(k).is_none() {
            return Err(ManagerError::bad_request(format!(
                "node {} has no label {k:?}",
                node.spec.name
            )));
        }
    }
    for (k, v) in &upd.label_add {
        if k.is_empty() {
            return Err(ManagerError::bad_request("label keys must not be empty"));
        }
        node.spec.labels.insert(k.clone(), v.clone());
    }
    node.meta.updated_at = now_ms();
    let id = node.id.clone();
    let rev = mgr
        .write(
            Batch::single(Manager::put_op(&node, &id, Some(expect))?),
            "node",
        )
        .await?;
    node.meta.version = rev;
    Ok(json_ok(&node))
}

#[derive(Debug, Default, Deserialize)]
pub struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

pub async fn remove(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let node = find_blocking(mgr, key).await?;
    if node.spec.role == NodeRole::Manager {
        return Err(ManagerError::bad_request(format!(
            "node {} is a manager: demote it first (`flotilla node demote {}`)",
            node.spec.name, node.spec.name
        )));
    }
    if node.status.state == NodeState::Ready && !q.force {
        return Err(ManagerError::bad_request(format!(
            "node {} is ready: stop it first, or remove it anyway with --force",
            node.spec.name
        )));
    }
    mgr.write(
        Batch::single(Op::delete(Table::Nodes, &node.id, Some(node.meta.version))),
        "node",
    )
    .await?;
    lock(&mgr.heartbeats).remove(&node.id);
    Ok(json_ok(&serde_json::json!({ "removed": node.id })))
}

pub async fn promote(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let mut node = find_blocking(mgr, key).await?;
    if node.spec.role == NodeRole::Manager {
        return Ok(json_ok(&node));
    }
    node.spec.role = NodeRole::Manager;
    node.meta.updated_at = now_ms();
    let id = node.id.clone();
    mgr.write(
        Batch::single(Manager::put_op(&node, &id, Some(node.meta.version))?),
        "node",
    )
    .await?;
    Ok(json_ok(&node))
}

pub async fn demote(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let mut node = find_blocking(mgr, key).await?;
    if node.spec.role == NodeRole::Worker {
        return Ok(json_ok(&node));
    }
    let status = mgr.store.status();
    let raft_id = raft_id_for(&node.id);
    if status.id == raft_id {
        return Err(ManagerError::bad_request(
            "this manager is the leader: demote it from another manager after leadership moves (stop it briefly), or demote another manager",
        ));
    }
    if status.voters.len() <= 1 && status.voters.iter().any(|(v, _)| *v == raft_id) {
        return Err(ManagerError::bad_request(
            "cannot demote the last manager: promote another node first",
        ));
    }
    if status.voters.iter().any(|(v, _)| *v == raft_id)
        || status.learners.iter().any(|(v, _)| *v == raft_id)
    {
        let _one_at_a_time = mgr.membership.lock().await;
        mgr.store.remove_voter(raft_id).await?;
    }
    node.spec.role = NodeRole::Worker;
    node.manager_status = None;
    node.meta.updated_at = now_ms();
    let id = node.id.clone();
    mgr.write(Batch::single(Manager::put_op(&node, &id, None)?), "node")
        .await?;
    Ok(json_ok(&node))
}

/// Largest node description a heartbeat may carry, as JSON (a real one is about 1 KiB).
pub const MAX_DESCRIPTION: usize = 64 * 1024;
/// Largest hostname, and largest `os` / `arch`, in bytes.
const MAX_HOSTNAME: usize = 255;
const MAX_PLATFORM: usize = 64;

/// Checks what a heartbeat asks to store: `addr` must be `IP:PORT` (what agents send, their
/// advertise address), the description small. Refused, not cut: a real agent never comes
/// near the limits, and a heartbeat is resent anyway on the next period.
pub fn check_heartbeat(hb: &Heartbeat) -> Result<(), ManagerError> {
    if hb.addr.len() > 64 || hb.addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ManagerError::bad_request(format!(
            "heartbeat addr {:?} is not IP:PORT",
            hb.addr.chars().take(64).collect::<String>()
        )));
    }
    let d = &hb.description;
    let too_large = |what: &str, max: usize| {
        ManagerError::TooLarge(format!("heartbeat {what} is larger than {max} bytes"))
    };
    if d.hostname.len() > MAX_HOSTNAME {
        return Err(too_large("hostname", MAX_HOSTNAME));
    }
    if d.os.len() > MAX_PLATFORM || d.arch.len() > MAX_PLATFORM {
        return Err(too_large("os/arch", MAX_PLATFORM));
    }
    let size = serde_json::to_vec(d).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_DESCRIPTION {
        return Err(too_large("description", MAX_DESCRIPTION));
    }
    Ok(())
}

/// What a heartbeat changes in the store: `None` when nothing (the check-in itself is kept in
/// memory only, so a heartbeat that differs only in its time is not a Raft write), else
/// whether the change is only the agent's own data (address, description), which counts
/// against the node's write budget. Bringing a node back to ready always goes through.
pub fn heartbeat_change(node: &Node, hb: &Heartbeat) -> Option<bool> {
    let back = node.status.state != NodeState::Ready;
    let own = node.status.addr != hb.addr || node.description != hb.description;
    (back || own).then_some(!back)
}

/// `POST /v1/nodes/{id}/heartbeat` (leader): records the check-in in memory and writes only
/// changes (state, address, description) to the store, at most as often as the node's write
/// budget allows ([`super::dispatch::AGENT_WRITES`], then 429).
pub async fn heartbeat(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(hb): Json<Heartbeat>,
) -> Result<Response, ManagerError> {
    if !caller.is_node_or_admin(&id) {
        return Err(ManagerError::forbidden(
            "a node may only heartbeat for itself",
        ));
    }
    check_heartbeat(&hb)?;
    let mgr = &ctx;
    let mut node: Node = mgr.get(&id)?.ok_or_else(|| {
        ManagerError::not_found(format!("node {id} is not part of the cluster (removed?)"))
    })?;
    // Recorded only for nodes of the cluster (a removed node's certificate stays valid).
    lock(&mgr.heartbeats).insert(id.clone(), Instant::now());
    let change = heartbeat_change(&node, &hb);
    if change == Some(true) {
        mgr.dispatcher.take_agent_write(&caller, &id)?;
    }
    if change.is_some() {
        node.status.state = NodeState::Ready;
        node.status.message = String::new();
        node.status.addr = hb.addr.clone();
        node.status.last_heartbeat = now_ms();
        node.description = hb.description;
        node.meta.updated_at = now_ms();
        let op = Op::update(Table::Nodes, &id, encode(&node)?, Some(node.meta.version));
        // A concurrent change (e.g. `node update`) wins; the next heartbeat retries.
        let _ = mgr.store.write(Batch::single(op)).await?;
    }
    Ok(json_ok(&HeartbeatResponse {
        period_ms: mgr.config.heartbeat_period.as_millis() as u64,
        managers: manager_addrs(mgr),
        role: node.spec.role,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(state: &str) -> Node {
        serde_json::from_value(json!({
            "id": "n1", "version": 3,
            "spec": {"name": "n1", "role": "worker", "availability": "active"},
            "description": {"hostname": "h", "os": "linux", "arch": "x86_64", "resources": {}},
            "status": {"state": state, "addr": "127.0.0.2:4440", "last_heartbeat": 5}
        }))
        .expect("node")
    }

    fn beat(addr: &str) -> Heartbeat {
        Heartbeat {
            addr: addr.into(),
            description: node("ready").description,
        }
    }

    #[test]
    fn only_changes_are_writes_and_only_own_data_counts_against_the_budget() {
        assert_eq!(
            heartbeat_change(&node("ready"), &beat("127.0.0.2:4440")),
            None
        );
        assert_eq!(
            heartbeat_change(&node("ready"), &beat("127.0.0.9:4440")),
            Some(true)
        );
        let mut other = beat("127.0.0.2:4440");
        other.description.hostname = "elsewhere".into();
        assert_eq!(heartbeat_change(&node("ready"), &other), Some(true));
        // A node coming back is written whatever the budget says.
        assert_eq!(
            heartbeat_change(&node("down"), &beat("127.0.0.2:4440")),
            Some(false)
        );
    }

    #[test]
    fn heartbeats_are_checked_for_shape_and_size() {
        assert!(check_heartbeat(&beat("127.0.0.2:4440")).is_ok());
        assert!(check_heartbeat(&beat("[::1]:4440")).is_ok());
        for bad in [
            "",
            "127.0.0.2",
            "flotilla-node:4440",
            "127.0.0.2:4440\u{1b}[2J",
        ] {
            let e = check_heartbeat(&beat(bad)).expect_err(bad);
            assert!(matches!(e, ManagerError::BadRequest(_)), "{bad}");
        }
        let mut hb = beat("127.0.0.2:4440");
        hb.description.hostname = "h".repeat(MAX_HOSTNAME + 1);
        let e = check_heartbeat(&hb).expect_err("hostname");
        assert!(matches!(e, ManagerError::TooLarge(_)), "{e}");
        let mut hb = beat("127.0.0.2:4440");
        hb.description
            .engine
            .insert("blob".into(), json!("x".repeat(MAX_DESCRIPTION)));
        let e = check_heartbeat(&hb).expect_err("description");
        assert!(matches!(e, ManagerError::TooLarge(_)), "{e}");
        assert!(e.to_string().contains("description"), "{e}");
    }
}
