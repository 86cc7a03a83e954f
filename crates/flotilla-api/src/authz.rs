//! Authorization of every request a node serves, as middleware ([`authorize`]) applied before
//! routing: the request's path finds its route in the policy table ([`crate::policy`]), the
//! transport's [`Peer`] becomes a [`Caller`], and [`policy::check`] decides. Who is a member
//! of the cluster (and as what) is the node's to say: a manager reads its store, a worker goes
//! by its last network map. Both answer through [`Members`].
//!
//! Raft RPCs go by the transport's peer alone (a current Raft peer's manager certificate);
//! every other request first resolves its caller, so a certificate of another cluster or of a
//! removed node is refused (403) whatever it asks for.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use flotilla_pki::Role;

use crate::policy::{self, Access, Params};
use crate::{ApiError, Caller, Peer, CALLER_HEADER};

/// The node's view of the cluster's membership, for authorization.
pub trait Members: Send + Sync + 'static {
    /// The cluster this node belongs to.
    fn cluster_id(&self) -> String;
    /// Who a verified node certificate (`id`, `cert_role`) speaks for: a removed node is no
    /// one (an error), a demoted manager's certificate acts as a worker's.
    fn node_caller(&self, id: &str, cert_role: Role) -> Result<Caller, ApiError>;
    /// Whether `node_id` may send Raft RPCs to this node (never, on a worker).
    fn raft_peer(&self, node_id: &str) -> bool;
}

/// The middleware: puts the request's [`Caller`] in its extensions, or answers 401/403.
pub async fn authorize(
    State(members): State<Arc<dyn Members>>,
    mut req: Request,
    next: Next,
) -> Response {
    match authorized_caller(members.as_ref(), &req) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The request's [`Caller`], or why it may not make this request: the route's [`Access`] from
/// [`policy::lookup`] (admins only for a path no route serves), the caller from the transport's
/// [`Peer`] (and, from a manager, the caller it forwards for), then [`policy::check`].
pub fn authorized_caller(members: &dyn Members, req: &Request) -> Result<Caller, ApiError> {
    let peer = req
        .extensions()
        .get::<Peer>()
        .cloned()
        .unwrap_or(Peer::Anonymous);
    let method = req.method();
    let path = req.uri().path();
    let (access, params) = match policy::lookup(method, path) {
        Some((route, params)) => (route.access, params),
        None => (Access::Admin, Params::default()),
    };
    let caller = match access {
        Access::RaftPeer => raft_caller(members, &peer),
        _ => resolve_caller(members, &peer, req)?,
    };
    policy::check(&caller, access, &params, method, path)?;
    Ok(caller)
}

/// A Raft RPC's caller: the manager whose certificate this is, if it is a Raft peer of this
/// node in this cluster (membership, not the node table: a manager being added has no table
/// yet); anyone else is anonymous to Raft.
fn raft_caller(members: &dyn Members, peer: &Peer) -> Caller {
    match peer {
        Peer::Verified(id)
            if id.cluster_id == members.cluster_id()
                && id.role == Role::Manager
                && members.raft_peer(&id.node_id) =>
        {
            Caller::Node {
                id: id.node_id.clone(),
                role: Role::Manager,
            }
        }
        _ => Caller::Anonymous,
    }
}

/// Who `peer` speaks for: admins for the local socket and admin certificates, the cluster's
/// word on a node certificate ([`Members::node_caller`]), and for a manager's certificate the
/// caller it forwards in [`CALLER_HEADER`] (a node, in turn, as the cluster has it).
fn resolve_caller(members: &dyn Members, peer: &Peer, req: &Request) -> Result<Caller, ApiError> {
    let id = match peer {
        Peer::Local => return Ok(Caller::Admin),
        Peer::Anonymous => return Ok(Caller::Anonymous),
        Peer::Verified(id) => id,
    };
    if id.cluster_id != members.cluster_id() {
        return Err(ApiError::forbidden(
            "certificate belongs to another cluster",
        ));
    }
    if id.role == Role::Admin {
        return Ok(Caller::Admin);
    }
    let direct = members.node_caller(&id.node_id, id.role)?;
    let forwarded = req
        .headers()
        .get(CALLER_HEADER)
        .and_then(|v| v.to_str().ok());
    Ok(match (forwarded, &direct) {
        // A manager forwarding a request on behalf of its own caller, whose node (if it is
        // one) is checked against this store in turn.
        (
            Some(v),
            Caller::Node {
                role: Role::Manager,
                ..
            },
        ) => match Caller::from_header(v) {
            Caller::Node { id, role } => members.node_caller(&id, role)?,
            other => other,
        },
        _ => direct,
    })
}

#[cfg(test)]
mod tests;
