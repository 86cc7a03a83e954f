//! The node's HTTP surface: the routes of its roles merged into one router (the manager's only
//! on managers), the node's own routes (ping, the CA for joining nodes), and the middleware
//! every request goes through — authorization first, then `{"message"}` errors.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};

use flotilla_api::authz::{self, Members};
use flotilla_api::{json_ok, ApiError, Caller};
use flotilla_manager::Manager;

use crate::NodeCtx;

/// What the node's own routes read.
#[derive(Clone)]
struct Own {
    node: Arc<NodeCtx>,
    manager: Option<Arc<Manager>>,
}

/// The node's router: the agent's routes, the manager's (on a manager), the node's own; every
/// request authorized against `members` (the manager's store on a manager, the agent's last
/// network map on a worker).
pub fn router(
    node: Arc<NodeCtx>,
    agent: Arc<flotilla_agent::AgentCtx>,
    manager: Option<Arc<Manager>>,
) -> Router {
    let members: Arc<dyn Members> = match &manager {
        Some(m) => m.clone(),
        None => agent.clone(),
    };
    let own = Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/join/ca", get(ca))
        .with_state(Own {
            node,
            manager: manager.clone(),
        });
    let mut app = own.merge(flotilla_agent::router(agent));
    app = match manager {
        Some(m) => app
            .merge(flotilla_manager::api::router(m))
            .fallback(|| async { ApiError::not_found("no such endpoint") }),
        // A worker answers every other API path with where to go instead.
        None => app.fallback(worker_fallback),
    };
    app.layer(middleware::from_fn_with_state(members, authz::authorize))
        .layer(middleware::from_fn(flotilla_api::respond::json_errors))
}

async fn worker_fallback(req: Request) -> Response {
    let path = req.uri().path();
    if path.starts_with("/v1/") || path.starts_with("/internal/") || path.starts_with("/v2") {
        flotilla_manager::api::worker_refusal().into_response()
    } else {
        ApiError::not_found("no such endpoint").into_response()
    }
}

/// `GET /v1/ping`: this node's own view (never forwarded), including its Raft progress on
/// managers, so callers can tell whether a restarted manager has caught up. An anonymous
/// caller learns only that the node answers: ids, role and Raft progress are for the cluster.
async fn ping(State(own): State<Own>, Extension(caller): Extension<Caller>) -> Response {
    if caller == Caller::Anonymous {
        return json_ok(&serde_json::json!({ "ok": true }));
    }
    let ident = own.node.identity();
    let raft = own.manager.as_ref().map(|m| {
        let st = m.store.status();
        serde_json::json!({
            "state": st.state,
            "term": st.term,
            "applied_index": st.applied,
            "commit_index": st.committed,
        })
    });
    json_ok(&serde_json::json!({
        "node_id": ident.node_id,
        "role": ident.role,
        "cluster_id": ident.cluster_id,
        "raft": raft,
    }))
}

/// `GET /v1/join/ca`: the public root certificate, for a joining node to check against its
/// token's fingerprint.
async fn ca(State(own): State<Own>) -> Response {
    json_ok(&serde_json::json!({ "ca_pem": own.node.tls.ca_pem() }))
}
