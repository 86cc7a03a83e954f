//! The manager's HTTP API. The node merges [`router`] into the one router that serves both its
//! local unix socket and its mTLS listener; two middlewares run before every handler here:
//!
//! 1. `flotilla_api::authz::authorize` (applied by the node to all its routes) turns the
//!    transport's peer into a [`Caller`] and refuses what the caller may not do (anonymous
//!    callers reach only ping and the join endpoints; worker certificates only their own
//!    agent endpoints; Raft RPCs only manager certificates). [`crate::Manager`] answers its
//!    membership questions.
//! 2. `leader_gate` makes every cluster-level request consistent: the leader answers
//!    (reads after a linearizable barrier), followers proxy to the leader, and when no leader
//!    can be reached reads are answered from local state marked stale
//!    (`x-flotilla-stale: true`) while writes fail fast with a quorum message.
//!
//! Handlers read whole tables through [`crate::Manager::blocking`] (see the crate's
//! documentation); a lookup of one object by key stays inline.

mod autolock;
mod cluster;
pub mod dispatch;
mod events;
mod join;
mod logs;
pub mod network;
pub mod networks;
mod nodes;
mod raft;
mod services;
pub mod storage;
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

pub use crate::error::ManagerError;
use flotilla_api::body;
use flotilla_api::CALLER_HEADER;
pub use flotilla_api::{json_ok, ndjson, stream_response, ApiError, Caller, STALE_HEADER};

use crate::Manager;

/// The state every manager handler gets.
pub type Ctx = Arc<Manager>;

/// The manager's routes: cluster-level ones behind `leader_gate`, the dispatcher's streams,
/// service logs, Raft RPCs and the registry. Authorization runs before them (the node applies
/// it to all its routes).
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
        .route("/v1/cluster/unlock-key", get(autolock::show))
        .route("/v1/cluster/unlock-key/rotate", post(autolock::rotate))
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
        .route(
            "/v1/nodes/{id}/tasks/{task}/files",
            get(storage::task_files),
        )
        .route(
            "/v1/secrets",
            get(storage::list_secrets).post(storage::create_secret),
        )
        .route(
            "/v1/secrets/{id}",
            get(storage::inspect_secret).delete(storage::remove_secret),
        )
        .route(
            "/v1/configs",
            get(storage::list_configs).post(storage::create_config),
        )
        .route(
            "/v1/configs/{id}",
            get(storage::inspect_config).delete(storage::remove_config),
        )
        .route(
            "/v1/volumes",
            get(storage::list_volumes).post(storage::create_volume),
        )
        .route("/v1/volumes/prune", post(storage::prune_volumes))
        .route(
            "/v1/volumes/{name}",
            get(storage::inspect_volume).delete(storage::remove_volume),
        )
        .route("/v1/networks", get(networks::list).post(networks::create))
        .route(
            "/v1/networks/{name}",
            get(networks::inspect).delete(networks::remove),
        )
        .layer(axum::extract::DefaultBodyLimit::max(body::JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(ctx.clone(), leader_gate));
    let local_routes = Router::new()
        .route("/v1/events", get(events::events))
        .route("/v1/nodes/{id}/assignments", get(dispatch::assignments))
        .route("/v1/nodes/{id}/network", get(network::stream))
        .route("/v1/services/{id}/logs", get(logs::service_logs))
        .route("/v1/volumes/{name}/export", get(storage::export_volume))
        .route("/v1/volumes/{name}/import", post(storage::import_volume))
        .route("/v1/volumes/{name}/move", post(storage::move_volume))
        .route(
            "/internal/raft/{kind}",
            post(raft::rpc).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
        );
    let mut app: Router = cluster_routes.merge(local_routes).with_state(ctx.clone());
    if let Some(registry) = registry_router(&ctx) {
        app = app.merge(registry);
    }
    app
}

/// Managers serve the OCI distribution API (`/v2/`) from their content store; a blob they
/// lack is fetched from another manager.
fn registry_router(ctx: &Ctx) -> Option<Router> {
    let state = match flotilla_registry::RegistryState::new(ctx.images.clone()) {
        Ok(s) => s.with_peer(Arc::new(PeerManagers::new(ctx))),
        Err(e) => {
            tracing::warn!(error = %e, "registry disabled");
            return None;
        }
    };
    Some(flotilla_registry::router(state))
}

/// The other managers, as blob sources for the registry (looked up at call time).
pub struct PeerManagers {
    ctx: std::sync::Weak<Manager>,
}

impl PeerManagers {
    pub fn new(ctx: &Ctx) -> PeerManagers {
        PeerManagers {
            ctx: Arc::downgrade(ctx),
        }
    }

    /// The other managers (address, registry client), in Raft membership order.
    pub fn clients(&self) -> Vec<(String, flotilla_registry::RegistryClient)> {
        let Some(mgr) = self.ctx.upgrade() else {
            return Vec::new();
        };
        let status = mgr.store.status();
        status
            .voters
            .iter()
            .chain(status.learners.iter())
            .filter(|(id, _)| *id != status.id)
            .filter_map(|(_, addr)| Some((addr.clone(), mgr.registry_client(addr)?)))
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

/// What a worker answers to manager requests.
pub fn worker_refusal() -> ApiError {
    ApiError::unavailable(
        "this node is a worker: cluster commands go to a manager, e.g. `flotilla --host unix:///MANAGER_DATA_DIR/api.sock …` or `--host https://MANAGER:PORT --tls-dir ADMIN_BUNDLE`",
    )
}

async fn leader_gate(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let mgr = ctx.clone();
    let is_read = req.method() == Method::GET;
    let status = mgr.store.status();
    if status.is_leader() {
        if !is_read {
            return next.run(req).await;
        }
        // Linearizable read: confirm leadership with a quorum, then read local state.
        let barrier =
            tokio::time::timeout(mgr.config.write_timeout, mgr.store.linearizable_barrier()).await;
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
    ManagerError::unavailable(mgr.quorum_message().await).into_response()
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

/// `?version=N` for optimistic concurrency.
#[derive(Debug, Default, serde::Deserialize)]
pub struct VersionQuery {
    pub version: Option<u64>,
}
