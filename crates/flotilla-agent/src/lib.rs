//! The agent role of a Flotilla node: it runs the tasks the managers assign to this node and
//! reports on them. Every node runs one, managers included.
//!
//! - [`executor`]: assignment sets → containers, one runner per task ([`executor::runner`] is
//!   its pure state machine; the executor performs its effects over the traits of
//!   [`executor::ports`]: runtime, task network, images);
//! - [`upstream`]: the agent's side of the dispatcher — following the assignment and network
//!   map streams, sending status reports, calling the first manager that answers;
//! - [`heartbeat`]: heartbeats, role switches and certificate renewal;
//! - [`net`]: this node's task network (bridge, overlay, namespaces, routing mesh, DNS);
//! - [`trust`]: image signature checks before a container is created;
//! - [`gc`], [`images`], [`logs`]: node-local images and task logs, and their HTTP routes.
//!
//! The agent talks to managers over HTTP only (wire types of `flotilla-types`); what it needs
//! of the node it runs on (identity, certificates on disk, a role change) it asks through
//! [`NodeHandle`].
//!
//! Failures have types ([`error`]): a task's start-path failure is a [`TaskError`] whose text
//! becomes the task's status message.
//!
//! **Blocking work stays off the async threads.** File system calls (`std::fs`, `Path::exists`,
//! reads of the image store, task logs or address files), unmounts and other blocking system
//! calls run through `blocking` (below), on tokio's blocking pool; async code awaits the result. So
//! do the node's callbacks that may touch its disk ([`NodeHandle::set_managers`],
//! [`NodeHandle::save_certificates`], [`NodeHandle::switch_role`], [`ClusterImages::in_use`]).
//! The one exception is [`heartbeat::describe_host`] (with [`heartbeat::hostname`]), which
//! reads `/proc` once, before the agent starts.
//!
//! **No lock is held across an await** except where the lock exists to serialize that await:
//! [`net::NodeNet`]'s map lock (network maps apply one at a time) and the executor's per-image
//! pull locks (one pull per image). Every other lock is a `std::sync` lock released before the
//! next await (the task address allocator's is taken on the blocking pool, see [`net`]).
#![forbid(unsafe_code)]

pub mod error;
pub mod executor;
pub mod gc;
pub mod heartbeat;
pub mod images;
pub mod logs;
pub mod net;
pub mod storage;
pub mod trust;
pub mod upstream;
mod volumes;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::routing::{delete, get, post};
use axum::Router;
use tokio::sync::watch;

use flotilla_api::TlsState;
use flotilla_runtime::Runtime;
use flotilla_types::{NodeIdentity, NodeRole};

pub use error::{AgentError, NetError, PullError, TaskError};

/// Runs blocking work (see the module doc) on tokio's blocking pool, in the caller's tracing
/// span. It starts at once; await the handle for the result (an error only if `f` panicked or
/// the runtime shut down before it ran), or drop it to let the work finish on its own.
pub(crate) fn blocking<T, F>(f: F) -> tokio::task::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

/// What the agent needs of the node it runs on.
pub trait NodeHandle: Send + Sync + 'static {
    /// The node's identity as last recorded.
    fn identity(&self) -> NodeIdentity;
    /// Records the managers' addresses (from a heartbeat answer).
    fn set_managers(&self, managers: Vec<String>);
    /// Saves renewed certificates where the node keeps them (before they are swapped in).
    fn save_certificates(
        &self,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<(), AgentError>;
    /// Records a new role (its certificate is installed) and asks the node to restart its
    /// internals in it.
    fn switch_role(&self, role: NodeRole) -> Result<(), AgentError>;
}

/// On a manager node, the images the cluster still refers to (image garbage collection keeps
/// them, and the node's store is the cluster's registry).
pub trait ClusterImages: Send + Sync + 'static {
    fn in_use(&self) -> Result<HashSet<String>, AgentError>;
}

/// How the agent is configured (from `node run`'s flags).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's data directory (task network state lives under it).
    pub data_dir: PathBuf,
    /// The first heartbeat period (managers set the next ones).
    pub heartbeat_period: Duration,
    /// Task networking (`--network none` turns it off: tasks get only loopback).
    pub task_networking: bool,
    /// The address the node's listener binds (the routing mesh publishes ports on it).
    pub bind_ip: IpAddr,
    /// The address other nodes reach this one at (the overlay's underlay).
    pub underlay: IpAddr,
    /// Resolvers for names outside the cluster (`--dns`, else the host's resolv.conf).
    pub dns_upstreams: Vec<std::net::SocketAddr>,
}

/// Everything the agent's loops and routes share.
pub struct AgentCtx {
    pub config: AgentConfig,
    pub node: Arc<dyn NodeHandle>,
    pub tls: Arc<TlsState>,
    pub runtime: Runtime,
    /// Trust policy and assigned images from the last assignment set.
    pub images: trust::AgentImages,
    /// The managers of the last network map (node ids); `None` until one arrived. Without a
    /// store, a manager certificate counts only from these.
    pub known_managers: RwLock<Option<HashSet<String>>>,
    /// Set on a manager node.
    pub cluster: Option<Arc<dyn ClusterImages>>,
    /// Image uploads (`image import|load`) processed at once.
    pub uploads: images::UploadSlots,
    /// Volumes, secrets and configs of tasks (set when the agent starts).
    pub storage: std::sync::OnceLock<Arc<storage::NodeStorage>>,
}

impl AgentCtx {
    pub fn new(
        config: AgentConfig,
        node: Arc<dyn NodeHandle>,
        tls: Arc<TlsState>,
        runtime: Runtime,
        cluster: Option<Arc<dyn ClusterImages>>,
    ) -> Arc<AgentCtx> {
        Arc::new(AgentCtx {
            config,
            node,
            tls,
            runtime,
            images: Default::default(),
            known_managers: RwLock::new(None),
            cluster,
            uploads: images::UploadSlots::new(images::MAX_UPLOADS),
            storage: std::sync::OnceLock::new(),
        })
    }

    /// Whether this node is a manager (its own address is tried first).
    pub fn on_manager(&self) -> bool {
        self.cluster.is_some()
    }

    /// A registry client for the manager at `addr`.
    pub fn registry(&self, addr: &str) -> Option<flotilla_registry::RegistryClient> {
        flotilla_registry::RegistryClient::for_node(
            addr,
            self.tls.client_config_h1(),
            flotilla_pki::SERVER_NAME,
        )
        .ok()
    }
}

/// Without a store, who a node certificate speaks for goes by the managers of the last
/// network map, and by the certificate alone before one arrived. No Raft RPC is accepted.
impl flotilla_api::authz::Members for AgentCtx {
    fn cluster_id(&self) -> String {
        self.node.identity().cluster_id
    }

    fn node_caller(
        &self,
        id: &str,
        cert_role: flotilla_pki::Role,
    ) -> Result<flotilla_api::Caller, flotilla_api::ApiError> {
        let g = self
            .known_managers
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let listed = g.as_ref().is_none_or(|m| m.contains(id));
        let role = if cert_role == flotilla_pki::Role::Manager && !listed {
            flotilla_pki::Role::Worker
        } else {
            cert_role
        };
        Ok(flotilla_api::Caller::Node {
            id: id.to_string(),
            role,
        })
    }

    fn raft_peer(&self, _node_id: &str) -> bool {
        false
    }
}

/// The node-local routes the agent serves: its images and its tasks' logs.
pub fn router(ctx: Arc<AgentCtx>) -> Router {
    Router::new()
        .route("/v1/tasks/{id}/logs", get(logs::task_logs))
        .route("/v1/agent/volumes", get(volumes::list))
        .route("/v1/agent/volumes/{name}", delete(volumes::remove))
        .route("/v1/agent/volumes/{name}/export", get(volumes::export))
        .route("/v1/agent/volumes/{name}/import", post(volumes::import))
        .route("/v1/agent/volumes/{name}/tree", get(volumes::tree))
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
        .with_state(ctx)
}

/// A running agent: its loops, until `stop` turns true.
pub struct Agent {
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Re-adopts this node's containers, then starts the agent's loops: assignments, status
    /// reports, the network map, heartbeats (with the host's `description`), certificate
    /// renewal and image garbage collection.
    pub async fn start(
        ctx: Arc<AgentCtx>,
        description: flotilla_types::NodeDescription,
        stop: watch::Receiver<bool>,
    ) -> Agent {
        let node_id = ctx.node.identity().node_id;
        let net = ctx.config.task_networking.then(|| {
            net::NodeNet::new(
                &ctx.config.data_dir,
                &node_id,
                ctx.config.bind_ip,
                ctx.config.underlay,
                ctx.config.dns_upstreams.clone(),
            )
        });
        let storage = match storage::NodeStorage::open(&ctx) {
            Ok(s) => {
                let s = Arc::new(s);
                let _ = ctx.storage.set(s.clone());
                Some(s)
            }
            Err(e) => {
                tracing::error!(error = %e, "task storage unavailable: tasks with volumes, secrets or configs will fail");
                None
            }
        };
        let (exec, reports) = executor::Executor::new(&ctx, net.clone(), storage);
        match flotilla_runtime::RuntimeDriver::adopt(&ctx.runtime).await {
            Ok(r) => tracing::info!(
                adopted = r.adopted.len(),
                dead_shims = r.dead_shims.len(),
                "re-attached to existing containers"
            ),
            Err(e) => tracing::warn!(error = %e, "re-adopting containers failed"),
        }
        let loops = vec![
            tokio::spawn(upstream::assignment_loop(ctx.clone(), exec, stop.clone())),
            tokio::spawn(upstream::report_loop(ctx.clone(), reports, stop.clone())),
            tokio::spawn({
                let (ctx, stop) = (ctx.clone(), stop.clone());
                async move {
                    if let Some(net) = net {
                        upstream::network_loop(ctx, net.clone(), stop).await;
                        net.shutdown().await;
                    }
                }
            }),
            tokio::spawn(heartbeat::heartbeat_loop(
                ctx.clone(),
                description,
                stop.clone(),
            )),
            tokio::spawn(heartbeat::renewal_loop(ctx.clone(), stop.clone())),
            tokio::spawn(gc::gc_loop(ctx.clone(), stop)),
        ];
        Agent { loops }
    }

    /// Waits for the loops to end (after `stop`).
    pub async fn join(self) {
        for l in self.loops {
            let _ = l.await;
        }
    }
}
