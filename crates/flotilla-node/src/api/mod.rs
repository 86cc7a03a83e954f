//! The HTTP API of a node. One router serves both the local unix socket and the mTLS
//! listener; two middlewares run before every handler:
//!
//! 1. [`authorize`] turns the transport's [`Peer`] into a [`Caller`] and refuses what the caller
//!    may not do (anonymous callers reach only ping and the join endpoints; worker
//!    certificates only their own agent endpoints; Raft RPCs only manager certificates).
//! 2. [`leader_gate`] makes every cluster-level request consistent: the leader answers
//!    (reads after a linearizable barrier), followers proxy to the leader, and when no leader
//!    can be reached reads are answered from local state marked stale
//!    (`x-flotilla-stale: true`) while writes fail fast with a quorum message.

mod body;
mod cluster;
pub mod dispatch;
mod events;
mod images;
pub mod join;
pub mod logs;
pub mod network;
mod nodes;
mod raft;
mod services;
mod trust;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;

use flotilla_api::Peer;
use flotilla_pki::Role;

use crate::error::ApiError;
use crate::NodeCtx;

pub type Ctx = Arc<NodeCtx>;

/// Who a request acts for, after authentication and (for forwarded requests) the
/// forwarding manager's word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Local socket or an admin certificate.
    Admin,
    Node {
        id: String,
        role: Role,
    },
    Anonymous,
}

impl Caller {
    fn header_value(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Node { id, role } => format!(
                "node:{}:{id}",
                if *role == Role::Manager {
                    "manager"
                } else {
                    "worker"
                }
            ),
            Caller::Anonymous => "anonymous".into(),
        }
    }
    fn from_header(v: &str) -> Caller {
        let parts: Vec<&str> = v.splitn(3, ':').collect();
        match parts.as_slice() {
            ["admin"] => Caller::Admin,
            ["node", "manager", id] => Caller::Node {
                id: id.to_string(),
                role: Role::Manager,
            },
            ["node", "worker", id] => Caller::Node {
                id: id.to_string(),
                role: Role::Worker,
            },
            _ => Caller::Anonymous,
        }
    }
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }
    /// The caller is the node `id` itself (or an admin).
    pub fn is_node_or_admin(&self, id: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Node { id: me, .. } => me == id,
            Caller::Anonymous => false,
        }
    }
}

const CALLER_HEADER: &str = "x-flotilla-caller";
pub const STALE_HEADER: &str = "x-flotilla-stale";

pub fn router(ctx: Ctx) -> Router {
    let cluster_routes = Router::new()
        .route("/v1/join", post(join::join))
        .route("/v1/nodes", get(nodes::list))
        .route(
            "/v1/nodes/{id}",
            get(nodes::inspect)
                .post(nodes::update)
                .delete(nodes::remove),
        )
        .route("/v1/nodes/{id}/promote", post(nodes::promote))
        .route("/v1/nodes/{id}/demote", post(nodes::demote))
        .route("/v1/nodes/{id}/heartbeat", post(nodes::heartbeat))
        .route("/v1/nodes/{id}/renew", post(join::renew))
        .route("/v1/cluster", get(cluster::info))
        .route("/v1/cluster/join-tokens", get(cluster::join_tokens))
        .route(
            "/v1/cluster/join-tokens/rotate",
            post(cluster::rotate_token),
        )
        .route("/v1/cluster/managers", post(join::add_manager))
        .route("/v1/cluster/settings", put(trust::update_settings))
        .route("/v1/trust/keys", get(trust::list).post(trust::add))
        .route("/v1/trust/keys/{id}", delete(trust::remove))
        .route("/v1/services", get(services::list).post(services::create))
        .route(
            "/v1/services/{id}",
            get(services::inspect).delete(services::remove),
        )
        .route("/v1/services/{id}/update", post(services::update))
        .route("/v1/services/{id}/rollback", post(services::rollback))
        .route("/v1/tasks", get(services::tasks))
        .route("/v1/nodes/{id}/tasks", post(dispatch::report))
        .layer(axum::extract::DefaultBodyLimit::max(body::JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(ctx.clone(), leader_gate));
    let local_routes = Router::new()
        .route("/v1/ping", get(cluster::ping))
        .route("/v1/join/ca", get(join::ca))
        .route("/v1/events", get(events::events))
        .route("/v1/nodes/{id}/assignments", get(dispatch::assignments))
        .route("/v1/nodes/{id}/network", get(network::stream))
        .route("/v1/tasks/{id}/logs", get(logs::task_logs))
        .route("/v1/images", get(images::list))
        // Uploads are streamed to disk by the handlers, bounded by `images::UPLOAD_LIMIT`.
        .route("/v1/images/import", post(images::import))
        .route("/v1/images/load", post(images::load))
        .route("/v1/images/signatures", post(images::attach_signature))
        .route("/v1/images/prune", post(images::prune))
        .route(
            "/v1/images/{*ref}",
            get(images::inspect).delete(images::remove),
        )
        .route("/v1/services/{id}/logs", get(logs::service_logs))
        .route(
            "/internal/raft/{kind}",
            post(raft::rpc).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
        );
    let mut app: Router = cluster_routes
        .merge(local_routes)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(ctx.clone());
    if let Some(registry) = registry_router(&ctx) {
        app = app.merge(registry);
    }
    app.layer(middleware::from_fn_with_state(ctx, authorize))
        .layer(middleware::from_fn(json_errors))
}

/// Every API error is `{"message": ...}`: rejections from extractors (bad JSON, bad query,
/// body too large, wrong method) come out of axum as plain text and are wrapped here; a body
/// that does not parse is a 400, like any other bad input.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if is_json {
        return resp;
    }
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let text = match axum::body::to_bytes(resp.into_body(), 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase()
    } else {
        text
    };
    ApiError::new(status, message).into_response()
}

/// Managers serve the OCI distribution API (`/v2/`) from their content store; a blob they
/// lack is fetched from another manager.
fn registry_router(ctx: &Ctx) -> Option<Router> {
    let (Some(_), Some(rt)) = (&ctx.manager, &ctx.runtime) else {
        return None;
    };
    let state = match flotilla_registry::RegistryState::new(rt.images_shared()) {
        Ok(s) => s.with_peer(Arc::new(PeerManagers {
            ctx: Arc::downgrade(ctx),
        })),
        Err(e) => {
            tracing::warn!(error = %e, "registry disabled");
            return None;
        }
    };
    Some(flotilla_registry::router(state))
}

/// The other managers, as blob sources for the registry (looked up at call time).
pub(crate) struct PeerManagers {
    ctx: std::sync::Weak<NodeCtx>,
}

impl PeerManagers {
    pub(crate) fn new(ctx: &Ctx) -> PeerManagers {
        PeerManagers {
            ctx: Arc::downgrade(ctx),
        }
    }

    /// The other managers (address, registry client), in Raft membership order.
    pub(crate) fn clients(&self) -> Vec<(String, flotilla_registry::RegistryClient)> {
        let Some(ctx) = self.ctx.upgrade() else {
            return Vec::new();
        };
        let Some(mgr) = ctx.manager.clone() else {
            return Vec::new();
        };
        let status = mgr.store.status();
        status
            .voters
            .iter()
            .chain(status.learners.iter())
            .filter(|(id, _)| *id != status.id)
            .filter_map(|(_, addr)| Some((addr.clone(), ctx.tls.registry(addr)?)))
            .collect()
    }
}

impl flotilla_registry::BlobSource for PeerManagers {
    fn fetch<'a>(
        &'a self,
        digest: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        flotilla_registry::Result<Option<flotilla_registry::BlobStream>>,
    > {
        Box::pin(async move {
            for (_, client) in self.clients() {
                if let Ok(Some(stream)) =
                    flotilla_registry::BlobSource::fetch(&client, digest).await
                {
                    return Ok(Some(stream));
                }
            }
            Ok(None)
        })
    }

    fn resolve_tag<'a>(
        &'a self,
        name: &'a str,
        tag: &'a str,
    ) -> futures::future::BoxFuture<'a, flotilla_registry::Result<Option<String>>> {
        Box::pin(async move {
            for (_, client) in self.clients() {
                if let Ok(Some(d)) =
                    flotilla_registry::BlobSource::resolve_tag(&client, name, tag).await
                {
                    return Ok(Some(d));
                }
            }
            Ok(None)
        })
    }
}

fn anonymous_allowed(path: &str) -> bool {
    matches!(path, "/v1/ping" | "/v1/join/ca" | "/v1/join")
}

/// Who a node certificate speaks for on this node, read from the store: a removed node is no
/// one, and a certificate grants manager rights only while the store still lists its node as
/// a manager (a demoted manager's certificate stays valid until it expires, but acts as a
/// worker's). A node without a store (a worker) goes by the managers of its last network map,
/// and by the certificate alone before it has one.
fn node_caller(ctx: &NodeCtx, id: &str, cert_role: Role) -> Result<Caller, ApiError> {
    let Some(mgr) = &ctx.manager else {
        let listed = match ctx.known_managers.read() {
            Ok(g) => g.as_ref().is_none_or(|m| m.contains(id)),
            Err(p) => p.into_inner().as_ref().is_none_or(|m| m.contains(id)),
        };
        let role = if cert_role == Role::Manager && !listed {
            Role::Worker
        } else {
            cert_role
        };
        return Ok(Caller::Node {
            id: id.to_string(),
            role,
        });
    };
    let node = mgr
        .get::<flotilla_types::Node>(id)?
        .ok_or_else(|| {
            ApiError::forbidden(format!(
                "node {id} is not a member of this cluster (removed with `node rm`?): join it again with a token"
            ))
        })?;
    let role = match (cert_role, node.spec.role) {
        (Role::Manager, flotilla_types::NodeRole::Manager) => Role::Manager,
        _ => Role::Worker,
    };
    Ok(Caller::Node {
        id: id.to_string(),
        role,
    })
}

/// Raft RPCs come only from members of this node's Raft group. A node that has not learned
/// any membership yet (a manager being added, before the leader's first entries) accepts any
/// manager certificate of the cluster: that is how the leader reaches it.
fn raft_peer_allowed(ctx: &NodeCtx, node_id: &str) -> bool {
    let Some(mgr) = &ctx.manager else {
        return false;
    };
    let status = mgr.store.status();
    let raft_id = join::raft_id_for(node_id);
    (status.voters.is_empty() && status.learners.is_empty())
        || status
            .voters
            .iter()
            .chain(status.learners.iter())
            .any(|(id, _)| *id == raft_id)
}

async fn authorize(State(ctx): State<Ctx>, mut req: Request, next: Next) -> Response {
    match authorized_caller(&ctx, &req) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The request's [`Caller`], or why it may not make this request.
fn authorized_caller(ctx: &NodeCtx, req: &Request) -> Result<Caller, ApiError> {
    let peer = req
        .extensions()
        .get::<Peer>()
        .cloned()
        .unwrap_or(Peer::Anonymous);
    let path = req.uri().path();
    if path.starts_with("/internal/raft/") {
        // Membership, not the node table: a manager being added has no table yet.
        return match &peer {
            Peer::Verified(id)
                if id.cluster_id == ctx.cluster_id()
                    && id.role == Role::Manager
                    && raft_peer_allowed(ctx, &id.node_id) =>
            {
                Ok(Caller::Node {
                    id: id.node_id.clone(),
                    role: Role::Manager,
                })
            }
            _ => Err(ApiError::forbidden(
                "raft rpcs need the certificate of a current manager of this cluster",
            )),
        };
    }
    let caller = match &peer {
        Peer::Local => Caller::Admin,
        Peer::Anonymous => Caller::Anonymous,
        Peer::Verified(id) => {
            if id.cluster_id != ctx.cluster_id() {
                return Err(ApiError::forbidden(
                    "certificate belongs to another cluster",
                ));
            }
            match id.role {
                Role::Admin => Caller::Admin,
                Role::Manager | Role::Worker => {
                    let direct = node_caller(ctx, &id.node_id, id.role)?;
                    let forwarded = req
                        .headers()
                        .get(CALLER_HEADER)
                        .and_then(|v| v.to_str().ok());
                    match (forwarded, &direct) {
                        // A manager forwarding a request on behalf of its own caller, whose
                        // node (if it is one) is checked against this store in turn.
                        (
                            Some(v),
                            Caller::Node {
                                role: Role::Manager,
                                ..
                            },
                        ) => match Caller::from_header(v) {
                            Caller::Node { id, role } => node_caller(ctx, &id, role)?,
                            other => other,
                        },
                        _ => direct,
                    }
                }
            }
        }
    };
    if path == "/v2" || path.starts_with("/v2/") {
        // The registry: admins push and pull; nodes only pull.
        let read = matches!(*req.method(), Method::GET | Method::HEAD);
        let allowed = caller.is_admin() || (matches!(caller, Caller::Node { .. }) && read);
        if !allowed {
            return Err(ApiError::unauthorized(
                "the registry needs a client certificate: the admin bundle to push (skopeo --dest-cert-dir DATA_DIR/admin), a node certificate to pull",
            ));
        }
    } else if caller == Caller::Anonymous && !anonymous_allowed(path) {
        return Err(ApiError::unauthorized(
            "a client certificate is required: pass --tls-dir with the admin bundle (DATA_DIR/admin of the first manager)",
        ));
    } else if let Caller::Node { id, role } = &caller {
        // Node certificates may only use their own agent endpoints (and the read-only basics).
        let own = path == format!("/v1/nodes/{id}/heartbeat")
            || path == format!("/v1/nodes/{id}/renew")
            || path == format!("/v1/nodes/{id}/assignments")
            || path == format!("/v1/nodes/{id}/network")
            || path == format!("/v1/nodes/{id}/tasks")
            || (*role == Role::Manager
                && path.starts_with("/v1/tasks/")
                && path.ends_with("/logs"))
            || path == "/v1/cluster/managers"
            || anonymous_allowed(path);
        if !own {
            return Err(ApiError::forbidden(format!(
                "node certificates may not call {path}; use an admin bundle"
            )));
        }
    }
    Ok(caller)
}

/// The local node's manager, or the error a worker gives for cluster-level requests.
fn worker_refusal() -> ApiError {
    ApiError::unavailable(
        "this node is a worker: cluster commands go to a manager, e.g. `flotilla --host unix:///MANAGER_DATA_DIR/api.sock …` or `--host https://MANAGER:PORT --tls-dir ADMIN_BUNDLE`",
    )
}

async fn leader_gate(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let Some(mgr) = ctx.manager.clone() else {
        return worker_refusal().into_response();
    };
    let is_read = req.method() == Method::GET;
    let status = mgr.store.status();
    if status.state == "leader" {
        if !is_read {
            return next.run(req).await;
        }
        // Linearizable read: confirm leadership with a quorum, then read local state.
        let barrier =
            tokio::time::timeout(mgr.write_timeout, mgr.store.linearizable_barrier()).await;
        let stale = !matches!(barrier, Ok(Ok(_)));
        let mut resp = next.run(req).await;
        if stale {
            resp.headers_mut()
                .insert(STALE_HEADER, HeaderValue::from_static("true"));
        }
        return resp;
    }
    // Not the leader: proxy to it.
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anonymous);
    // The leader's extractors would refuse a body over the limit, but only after this node
    // had buffered all of it: bound it here, in size and in time (anonymous callers reach
    // `/v1/join`).
    let (parts, body) = req.into_parts();
    let body = match body::read_limited(
        &parts.headers,
        body,
        body::JSON_BODY_LIMIT,
        body::BODY_READ_TIMEOUT,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if let Some(addr) = status
        .leader_addr
        .clone()
        .filter(|_| status.leader_id.is_some())
    {
        match proxy(&ctx, &addr, &parts, &caller, body.clone()).await {
            Ok(resp) => return resp,
            Err(e) => {
                tracing::debug!(leader = %addr, error = %e, "forwarding to leader failed");
            }
        }
    }
    if is_read {
        let req = Request::from_parts(parts, Body::from(body));
        let mut resp = next.run(req).await;
        resp.headers_mut()
            .insert(STALE_HEADER, HeaderValue::from_static("true"));
        return resp;
    }
    ApiError::unavailable(quorum_message(&ctx).await).into_response()
}

async fn proxy(
    ctx: &Ctx,
    leader: &str,
    parts: &axum::http::request::Parts,
    caller: &Caller,
    body: bytes::Bytes,
) -> Result<Response, flotilla_api::ClientError> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string());
    let client = ctx.tls.peer(leader).with_timeout(Duration::from_secs(120));
    let resp = client
        .send_with_headers(
            parts.method.clone(),
            &path,
            if body.is_empty() {
                None
            } else {
                Some(body.to_vec())
            },
            &[(CALLER_HEADER, caller.header_value())],
        )
        .await?;
    let mut out = Response::builder().status(resp.status);
    for (k, v) in resp.headers.iter() {
        if k == hyper::header::CONTENT_TYPE || k.as_str().starts_with("x-flotilla") {
            out = out.header(k, v);
        }
    }
    Ok(out
        .body(Body::from(resp.body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// "quorum lost: 1 of 3 managers reachable …" with what to do about it.
pub async fn quorum_message(ctx: &Ctx) -> String {
    match &ctx.manager {
        Some(mgr) => mgr.quorum_message().await,
        None => worker_refusal().message,
    }
}

/// `?version=N` for optimistic concurrency.
#[derive(Debug, Default, serde::Deserialize)]
pub struct VersionQuery {
    pub version: Option<u64>,
}

pub fn json_ok<T: serde::Serialize>(v: &T) -> Response {
    axum::Json(v).into_response()
}

/// One newline-terminated JSON document.
pub fn ndjson<T: serde::Serialize>(v: &T) -> bytes::Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b.into()
}

/// A streaming `application/x-ndjson` response fed by `rx` (ends when the sender is dropped).
pub fn stream_response(
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> Result<Response, ApiError> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|item| (Ok::<_, std::io::Error>(item), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}
