//! The executor's ports: what it needs of the node's container runtime, its task network and
//! the cluster's images, as object-safe traits (futures boxed), so that the executor runs
//! over [`Runtime`], [`NodeNet`] and the managers in the agent, and over fakes in its tests.
//!
//! - the runtime: [`RuntimeDriver`] (create, start, state, wait, stop, remove, list), plus
//!   [`NodeRuntime`] for what a driver does not cover: the node's image store (presence,
//!   unpacking), the OCI runtime that exec probes use, and the log directories;
//! - [`TaskNetwork`]: a task's address, namespace and veth;
//! - [`TaskImages`]: the assignment set's images and trust policy, pulling an image from the
//!   managers and the policy's verdict on it (both need the agent's context: managers, TLS,
//!   policy).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use futures::future::BoxFuture;
use futures::FutureExt;

use flotilla_runtime::{Runtime, RuntimeDriver};
use flotilla_types::Assignments;

use crate::net::{NodeNet, TaskNames, TaskNet};
use crate::{AgentCtx, NetError, PullError, TaskError};

/// What the executor needs of the node's container runtime beyond [`RuntimeDriver`]. The
/// methods that touch the disk block: the executor calls them on the blocking pool.
pub trait NodeRuntime: RuntimeDriver {
    /// Whether the image store holds `reference` (a read of its index; blocking).
    fn has_image(&self, reference: &str) -> bool;
    /// Unpacks an image's layers for its containers, so that the first create does not wait
    /// for it (blocking; see [`Runtime::prepare_image`]).
    fn prepare_image(&self, reference: &str) -> flotilla_runtime::Result<()>;
    /// The OCI runtime binary and the `--root` that holds container `id` (exec probes).
    fn oci_runtime(&self, id: &str) -> (PathBuf, PathBuf);
    /// The directory holding one log directory per container id.
    fn logs_dir(&self) -> PathBuf;
    /// Whether container `id` has a state directory (blocking).
    fn has_state_dir(&self, id: &str) -> bool;
    /// The image's own health check (Docker's `HEALTHCHECK`), if it has one the executor can
    /// run (blocking).
    fn image_healthcheck(&self, reference: &str) -> Option<flotilla_types::HealthCheck>;
    /// The image's `VOLUME` paths (blocking); none by default.
    fn image_volumes(&self, _reference: &str) -> Vec<String> {
        Vec::new()
    }
}

impl NodeRuntime for Runtime {
    fn has_image(&self, reference: &str) -> bool {
        self.images().resolve(reference).is_ok()
    }

    fn prepare_image(&self, reference: &str) -> flotilla_runtime::Result<()> {
        Runtime::prepare_image(self, reference)
    }

    fn oci_runtime(&self, id: &str) -> (PathBuf, PathBuf) {
        Runtime::oci_runtime(self, id)
    }

    fn logs_dir(&self) -> PathBuf {
        self.config().root.join("logs")
    }

    fn has_state_dir(&self, id: &str) -> bool {
        self.config().root.join("containers").join(id).exists()
    }

    fn image_healthcheck(&self, reference: &str) -> Option<flotilla_types::HealthCheck> {
        let digest = self.images().resolve(reference).ok()?;
        let v = self.images().healthcheck(&digest).ok()??;
        super::health::from_image(&v)
    }

    fn image_volumes(&self, reference: &str) -> Vec<String> {
        self.images()
            .resolve(reference)
            .and_then(|d| self.images().volumes(&d))
            .unwrap_or_default()
    }
}

/// What the executor needs of the node's task network (see [`NodeNet`], which implements it
/// with the same methods).
pub trait TaskNetwork: Send + Sync {
    /// Gives a task its address and resolver files (see [`NodeNet::prepare_task`]).
    fn prepare_task<'a>(
        &'a self,
        task_id: &'a str,
        names: &'a TaskNames,
    ) -> BoxFuture<'a, Result<TaskNet, NetError>>;
    /// Names the network namespace of the created container whose init is `pid`.
    fn adopt_netns<'a>(&'a self, t: &'a TaskNet, pid: u32) -> BoxFuture<'a, Result<(), NetError>>;
    /// Wires the task's namespace (veth, address, default route).
    fn attach_task<'a>(&'a self, t: &'a TaskNet) -> BoxFuture<'a, Result<(), NetError>>;
    /// The address a task has (after an agent restart, from the persisted allocations).
    fn address_of<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<Ipv4Addr>>;
    /// Sets a task's own resolvers (`--dns`) for its address; nothing by default.
    fn set_task_resolvers<'a>(
        &'a self,
        _task_id: &'a str,
        _servers: Vec<std::net::SocketAddr>,
    ) -> BoxFuture<'a, ()> {
        async {}.boxed()
    }
    /// A task's addresses on user-defined networks (network → address; after an agent
    /// restart, from the persisted allocations); none by default.
    fn network_addresses<'a>(
        &'a self,
        _task_id: &'a str,
    ) -> BoxFuture<'a, std::collections::BTreeMap<String, Ipv4Addr>> {
        async { std::collections::BTreeMap::new() }.boxed()
    }
    /// Records which user-defined networks a re-adopted task is on (its DNS scope); nothing
    /// by default.
    fn set_task_networks<'a>(
        &'a self,
        _task_id: &'a str,
        _networks: Vec<String>,
    ) -> BoxFuture<'a, ()> {
        async {}.boxed()
    }
    /// Removes a task's veth, namespace, files and address (idempotent).
    fn release_task<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, ()>;
    /// Task ids that have a network namespace here.
    fn prepared_tasks(&self) -> BoxFuture<'_, Vec<String>>;
}

impl TaskNetwork for NodeNet {
    fn prepare_task<'a>(
        &'a self,
        task_id: &'a str,
        names: &'a TaskNames,
    ) -> BoxFuture<'a, Result<TaskNet, NetError>> {
        NodeNet::prepare_task(self, task_id, names).boxed()
    }

    fn adopt_netns<'a>(&'a self, t: &'a TaskNet, pid: u32) -> BoxFuture<'a, Result<(), NetError>> {
        NodeNet::adopt_netns(self, t, pid).boxed()
    }

    fn attach_task<'a>(&'a self, t: &'a TaskNet) -> BoxFuture<'a, Result<(), NetError>> {
        NodeNet::attach_task(self, t).boxed()
    }

    fn address_of<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<Ipv4Addr>> {
        NodeNet::address_of(self, task_id).boxed()
    }

    fn set_task_resolvers<'a>(
        &'a self,
        task_id: &'a str,
        servers: Vec<std::net::SocketAddr>,
    ) -> BoxFuture<'a, ()> {
        NodeNet::set_task_resolvers(self, task_id, servers).boxed()
    }

    fn network_addresses<'a>(
        &'a self,
        task_id: &'a str,
    ) -> BoxFuture<'a, std::collections::BTreeMap<String, Ipv4Addr>> {
        NodeNet::network_addresses(self, task_id).boxed()
    }

    fn set_task_networks<'a>(
        &'a self,
        task_id: &'a str,
        networks: Vec<String>,
    ) -> BoxFuture<'a, ()> {
        NodeNet::set_task_networks(self, task_id, networks).boxed()
    }

    fn release_task<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, ()> {
        NodeNet::release_task(self, task_id).boxed()
    }

    fn prepared_tasks(&self) -> BoxFuture<'_, Vec<String>> {
        NodeNet::prepared_tasks(self).boxed()
    }
}

/// Where tasks' images come from and whether they are trusted.
pub trait TaskImages: Send + Sync {
    /// Records a new assignment set (its trust policy, the images its tasks use).
    fn note(&self, set: &Assignments);
    /// Pulls `image` (pinned by digest) into the node's image store. Fails with
    /// [`TaskError::Pull`] when no manager could deliver it (the executor hands that error to
    /// the tasks waiting for the same pull), [`TaskError::ShuttingDown`] when the agent goes
    /// away.
    fn pull<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), TaskError>>;
    /// The trust policy's verdict on `image` (manifest `digest`, present in the store).
    fn verify<'a>(
        &'a self,
        image: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<(), TaskError>>;
}

/// The agent's [`TaskImages`]: the managers' registries and the trust policy of the agent's
/// context (held weakly: an executor does not keep a stopped agent alive).
pub struct ManagerImages {
    ctx: Weak<AgentCtx>,
}

impl ManagerImages {
    pub fn new(ctx: &Arc<AgentCtx>) -> ManagerImages {
        ManagerImages {
            ctx: Arc::downgrade(ctx),
        }
    }

    fn ctx(&self) -> Result<Arc<AgentCtx>, TaskError> {
        self.ctx.upgrade().ok_or(TaskError::ShuttingDown)
    }
}

impl TaskImages for ManagerImages {
    fn note(&self, set: &Assignments) {
        if let Some(ctx) = self.ctx.upgrade() {
            ctx.images.note(set);
        }
    }

    fn pull<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), TaskError>> {
        async move {
            let ctx = self.ctx()?;
            pull(&ctx, image)
                .await
                .map_err(|e| TaskError::Pull(Arc::new(e)))
        }
        .boxed()
    }

    fn verify<'a>(
        &'a self,
        image: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<(), TaskError>> {
        async move {
            let ctx = self.ctx()?;
            let store = ctx.runtime.images_shared();
            crate::trust::verify_image(&ctx, store, image, digest).await
        }
        .boxed()
    }
}

/// Pulls an image (pinned by digest) from the managers' registries, verifying every blob.
/// The trust policy is checked on the manifest and its signatures before any layer is
/// fetched, so an image the cluster does not trust never reaches this node's disk, let
/// alone the layer unpacker. Refused by every manager: the trust error alone (the task's
/// rejection message); else the last manager's error.
async fn pull(ctx: &AgentCtx, image: &str) -> Result<(), PullError> {
    let policy = ctx.images.policy();
    let mut last = PullError::NoManager {
        image: image.to_string(),
    };
    let mut refused = None;
    for addr in crate::upstream::targets(ctx) {
        let Some(client) = ctx.registry(&addr) else {
            continue;
        };
        let pulled = flotilla_registry::pull_trusted(
            &client,
            ctx.runtime.images(),
            image,
            Some(&policy),
            |_| {},
        )
        .await;
        match pulled {
            Ok(d) => {
                tracing::info!(image, digest = %d, manager = %addr, "pulled image");
                return Ok(());
            }
            Err(flotilla_registry::RegistryError::NotTrusted(e)) => refused = Some(e),
            Err(source) => {
                last = PullError::Registry {
                    image: image.to_string(),
                    manager: addr,
                    source,
                }
            }
        }
    }
    Err(refused.map(PullError::NotTrusted).unwrap_or(last))
}
