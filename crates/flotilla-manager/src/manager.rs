//! The manager role: the Raft store plus what only managers hold (the CA key, join secrets)
//! and typed access to the replicated objects.
//!
//! [`Manager::get`], [`Manager::list`] and [`Manager::cluster`] read the store synchronously
//! and decode JSON; [`Manager::blocking`] and [`Manager::list_blocking`] run such reads on
//! tokio's blocking pool (the rule is in the crate's documentation).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use flotilla_pki::Ca;
use flotilla_store::{Batch, Op, Store, StoreError, Table, Versioned};
use flotilla_types::{Meta, Node, Service, Task};

use crate::api::dispatch::Dispatcher;
use crate::error::{op_failure, ManagerError};
use flotilla_api::TlsState;

/// Locks `m`, using the value of a poisoned lock as it is. The crate's mutexes guard caches,
/// rate limits and registries whose every change is one insert, remove or replacement, so a
/// panic elsewhere cannot leave them half-updated; this is the crate's one policy for them.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cluster-wide singleton (table `cluster`, id `cluster`). Holds secrets: never returned
/// by the API as is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterObject {
    pub cluster_id: String,
    pub ca_cert_pem: String,
    /// The root key, replicated to managers so any of them can sign as leader.
    pub ca_key_pem: String,
    pub worker_secret: String,
    pub manager_secret: String,
    /// Lifetime of issued node certificates, seconds.
    pub cert_lifetime_secs: u64,
    /// Unix ms.
    pub created_at: u64,
    /// The address plan of task networks (set at init).
    #[serde(default)]
    pub network: flotilla_types::NetworkSettings,
    /// Which image signatures agents accept (enforced unless turned off; a cluster object
    /// without this field reads as an enforcing policy with no key).
    #[serde(default)]
    pub trust: flotilla_registry::TrustPolicy,
    /// Host directories services may bind-mount (`cluster update --bind-allow`); none by
    /// default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bind_allow: Vec<String>,
    /// Autolock (`cluster update --autolock true`): the unlock key's text form
    /// (`FLTKEY-1-…`), which wraps every manager's data keys in place of its `kek` file.
    /// `None`: autolock off. A secret like the CA key: sealed in the store, shown only to
    /// admins by `cluster unlock-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlock_key: Option<String>,
    /// The keys of the nodes' encrypted tunnel (encrypted networks), newest first; made and
    /// rotated by the leader (`crate::tunnel`), handed to nodes in their network map.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnel_keys: Vec<flotilla_types::TunnelKeyRecord>,
}

pub const CLUSTER_KEY: &str = "cluster";

/// Objects stored as JSON whose `Meta` the store's versions fill in.
pub trait Stored: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    const TABLE: Table;
    const KIND: &'static str;
    fn meta_mut(&mut self) -> &mut Meta;
}

impl Stored for Node {
    const TABLE: Table = Table::Nodes;
    const KIND: &'static str = "node";
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

impl Stored for Service {
    const TABLE: Table = Table::Services;
    const KIND: &'static str = "service";
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

impl Stored for Task {
    const TABLE: Table = Table::Tasks;
    const KIND: &'static str = "task";
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

pub fn decode<T: Stored>(v: &Versioned) -> Result<T, ManagerError> {
    let mut obj: T = serde_json::from_slice(&v.value).map_err(|source| ManagerError::Corrupt {
        kind: T::KIND,
        id: v.id.clone(),
        source,
    })?;
    obj.meta_mut().version = v.version;
    Ok(obj)
}

pub fn encode<T: Stored>(obj: &T) -> Result<Vec<u8>, ManagerError> {
    serde_json::to_vec(obj).map_err(|e| ManagerError::internal(format!("encoding: {e}")))
}

/// What a manager is configured with (from `node run`'s flags).
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// This manager's node.
    pub node_id: String,
    /// The agents' heartbeat period (told to agents in every heartbeat answer).
    pub heartbeat_period: Duration,
    /// A node whose heartbeats stop for this long is marked down.
    pub heartbeat_timeout: Duration,
    /// Ended tasks kept per slot (or node).
    pub task_history: usize,
    /// Deadline for a write to commit before it is reported as quorum loss.
    pub write_timeout: Duration,
    /// `--data-dir` and `--listen`, for the recovery hint.
    pub data_dir: String,
    pub listen: String,
}

/// The manager role of a node: its Raft store and what only managers do with it.
pub struct Manager {
    pub store: Store,
    pub config: ManagerConfig,
    /// This node's image store: the registry the cluster pulls from.
    pub images: Arc<flotilla_registry::ImageStore>,
    pub cluster_id: String,
    /// Leader only: when each node's agent last checked in (in memory, like swarmkit's
    /// dispatcher; only state changes are written to Raft).
    pub heartbeats: Mutex<HashMap<String, std::time::Instant>>,
    /// Serializes membership changes (one at a time, as Raft requires).
    pub membership: tokio::sync::Mutex<()>,
    /// Serializes service create/rename so names stay unique.
    pub names: tokio::sync::Mutex<()>,
    /// Wakes the control loop after an API change.
    pub wake: tokio::sync::Notify,
    /// The node's certificates (peer managers, log fan-out, probing peers).
    pub tls: Arc<TlsState>,
    /// Objects already decoded, so that reading a table decodes only what changed.
    pub decoded: Decoded,
    /// The dispatcher's per-node state: write budgets and open agent streams.
    pub dispatcher: Dispatcher,
    /// Leader only: volume moves under way and the stops held for their pre-copies.
    pub moves: crate::volumes::Moves,
    /// Store reads running on the blocking pool at once ([`Manager::blocking`]): one per CPU,
    /// so that many streams rebuilding after the same change take turns instead of each
    /// holding a copy of a whole table at the same time.
    read_slots: tokio::sync::Semaphore,
}

/// Decoded objects by table and id, each with the store version it was decoded from. A version
/// is the Raft index of the entry that wrote the object, so an equal version means equal bytes
/// and the decoded copy can stand in for decoding them again. The control loop and every
/// dispatcher stream read whole tables after each change, which without this decodes every
/// task again for each status report (O(tasks²) JSON parsing over a large start).
#[derive(Default)]
pub struct Decoded {
    tables: Mutex<HashMap<Table, Cached>>,
}

type Cached = HashMap<String, (u64, Arc<dyn std::any::Any + Send + Sync>)>;

impl Decoded {
    fn lookup<T: Stored>(map: &Cached, v: &Versioned) -> Option<Arc<T>> {
        match map.get(&v.id) {
            Some((version, obj)) if *version == v.version => obj.clone().downcast::<T>().ok(),
            _ => None,
        }
    }

    /// The objects of `raw` (one whole table), reusing copies decoded earlier; keeps exactly
    /// the listed objects afterwards (deleted ones drop out).
    fn table<T: Stored>(&self, raw: &[Versioned]) -> Result<Vec<T>, ManagerError> {
        // Hits are taken under the lock, misses decoded without it. Concurrent readers (the
        // control loop, every agent's streams) share the map meanwhile; whichever puts its
        // fresh map back last wins, and both are correct (entries are keyed by version).
        let hits: Vec<Option<Arc<T>>> = match lock(&self.tables).get(&T::TABLE) {
            Some(map) => raw.iter().map(|v| Self::lookup::<T>(map, v)).collect(),
            None => vec![None; raw.len()],
        };
        let mut fresh: Cached = HashMap::with_capacity(raw.len());
        let mut out = Vec::with_capacity(raw.len());
        for (v, hit) in raw.iter().zip(hits) {
            let obj = match hit {
                Some(o) => o,
                None => Arc::new(decode::<T>(v)?),
            };
            out.push(T::clone(&obj));
            fresh.insert(v.id.clone(), (v.version, obj));
        }
        lock(&self.tables).insert(T::TABLE, fresh);
        Ok(out)
    }

    /// One object, from the cache when its version matches (a miss is decoded, not cached).
    fn one<T: Stored>(&self, v: &Versioned) -> Result<T, ManagerError> {
        let hit = lock(&self.tables)
            .get(&T::TABLE)
            .and_then(|m| Self::lookup::<T>(m, v));
        match hit {
            Some(o) => Ok(T::clone(&o)),
            None => decode(v),
        }
    }
}

impl Manager {
    pub fn get<T: Stored>(&self, id: &str) -> Result<Option<T>, ManagerError> {
        match self.store.get(T::TABLE, id)? {
            Some(v) => self.decoded.one(&v).map(Some),
            None => Ok(None),
        }
    }

    pub fn list<T: Stored>(&self) -> Result<Vec<T>, ManagerError> {
        self.decoded.table(&self.store.list(T::TABLE)?)
    }

    /// Runs `f`, which reads the store, on tokio's blocking pool and waits for its result, so
    /// that whole-table reads and their decoding never hold an async worker thread. At most one
    /// read per CPU runs at once; the others wait here. A panic in `f` is raised again here.
    pub async fn blocking<R, F>(self: &Arc<Self>, f: F) -> Result<R, ManagerError>
    where
        R: Send + 'static,
        F: FnOnce(&Manager) -> Result<R, ManagerError> + Send + 'static,
    {
        let _slot = self
            .read_slots
            .acquire()
            .await
            .map_err(|e| ManagerError::internal(format!("store read: {e}")))?;
        let mgr = Arc::clone(self);
        match tokio::task::spawn_blocking(move || f(&mgr)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(ManagerError::internal(format!("store read: {e}"))),
        }
    }

    /// [`Manager::list`] on the blocking pool.
    pub async fn list_blocking<T: Stored>(self: &Arc<Self>) -> Result<Vec<T>, ManagerError> {
        self.blocking(|m| m.list::<T>()).await
    }

    /// Writes a batch; a failed precondition becomes 404/409 naming `what`, a commit timeout
    /// the quorum-loss message.
    pub async fn write(&self, batch: Batch, what: &str) -> Result<u64, ManagerError> {
        let out = match self.store.write(batch).await {
            Ok(out) => out,
            Err(StoreError::Timeout) => {
                return Err(ManagerError::unavailable(self.quorum_message().await))
            }
            Err(e) => return Err(e.into()),
        };
        match out.result {
            Ok(()) => Ok(out.revision),
            Err(f) => Err(op_failure(&f, what)),
        }
    }

    pub fn cluster(&self) -> Result<ClusterObject, ManagerError> {
        let v = self
            .store
            .get(Table::Cluster, CLUSTER_KEY)?
            .ok_or_else(|| ManagerError::unavailable("cluster object not replicated yet; retry"))?;
        serde_json::from_slice(&v.value)
            .map_err(|e| ManagerError::internal(format!("corrupt cluster object: {e}")))
    }

    /// Read-modify-write of the cluster object: one Raft entry, conditional on the version read
    /// (a concurrent change makes it fail with 409 rather than be lost). Returns what `f`
    /// returns, and the object as written.
    pub async fn update_cluster<T>(
        &self,
        f: impl FnOnce(&mut ClusterObject) -> Result<T, ManagerError>,
    ) -> Result<(T, ClusterObject), ManagerError> {
        let (mut c, version) = self.cluster_versioned()?;
        let out = f(&mut c)?;
        let value = serde_json::to_vec(&c).map_err(|e| ManagerError::internal(e.to_string()))?;
        self.write(
            Batch::single(Op::update(
                Table::Cluster,
                CLUSTER_KEY,
                value,
                Some(version),
            )),
            "cluster",
        )
        .await?;
        Ok((out, c))
    }

    fn cluster_versioned(&self) -> Result<(ClusterObject, u64), ManagerError> {
        let v = self
            .store
            .get(Table::Cluster, CLUSTER_KEY)?
            .ok_or_else(|| ManagerError::unavailable("cluster object not replicated yet; retry"))?;
        let obj = serde_json::from_slice(&v.value)
            .map_err(|e| ManagerError::internal(format!("corrupt cluster object: {e}")))?;
        Ok((obj, v.version))
    }

    pub fn put_op<T: Stored>(obj: &T, id: &str, expect: Option<u64>) -> Result<Op, ManagerError> {
        Ok(Op::update(T::TABLE, id, encode(obj)?, expect))
    }

    /// The signing CA, from the replicated cluster object (managers that joined later get the
    /// key through Raft).
    pub fn ca(&self) -> Result<Ca, ManagerError> {
        let c = self.cluster()?;
        Ca::from_pem(&c.ca_cert_pem, &c.ca_key_pem)
            .map_err(|e| ManagerError::internal(format!("cluster CA: {e}")))
    }

    /// "quorum lost: 1 of 3 managers reachable, 2 needed …" and how to recover. Probes every
    /// other voter with a short ping.
    pub async fn quorum_message(&self) -> String {
        let status = self.store.status();
        let total = status.voters.len().max(1);
        let mut reachable = 0usize;
        let mut checks = Vec::new();
        for (id, addr) in &status.voters {
            if *id == status.id {
                reachable += 1;
                continue;
            }
            let client = self.tls.peer(addr).with_timeout(Duration::from_millis(500));
            checks.push(async move {
                client
                    .request(hyper::Method::GET, "/v1/ping", None)
                    .await
                    .is_ok()
            });
        }
        reachable += futures::future::join_all(checks)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        let needed = total / 2 + 1;
        if reachable >= needed {
            return format!(
                "the write did not commit in time although {reachable} of {total} managers are reachable \
                 (the managers are overloaded or their disks are slow); it may still be applied: \
                 check with `flotilla service ls` before retrying"
            );
        }
        format!(
            "quorum lost: {reachable} of {total} managers reachable, {needed} needed; writes are refused until a majority is back. \
             If the missing managers are gone for good, recover from this one: stop it and restart it with \
             `flotilla node run --data-dir {} --listen {} --force-new-cluster`",
            self.config.data_dir, self.config.listen
        )
    }

    /// Asks the leader's control loop to run a pass now.
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    pub fn is_leader(&self) -> bool {
        self.store.status().is_leader()
    }

    /// A manager with everything but its store's contents: `store` opened by the node.
    pub fn new(
        store: Store,
        config: ManagerConfig,
        tls: Arc<TlsState>,
        images: Arc<flotilla_registry::ImageStore>,
    ) -> Manager {
        Manager {
            store,
            cluster_id: tls.identity().cluster_id,
            config,
            images,
            heartbeats: Mutex::new(Default::default()),
            membership: tokio::sync::Mutex::new(()),
            names: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            tls,
            decoded: Default::default(),
            dispatcher: Dispatcher::new(),
            moves: Default::default(),
            read_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(4, |n| n.get()),
            ),
        }
    }

    /// A registry client for the manager at `addr`.
    pub fn registry_client(&self, addr: &str) -> Option<flotilla_registry::RegistryClient> {
        flotilla_registry::RegistryClient::for_node(
            addr,
            self.tls.client_config_h1(),
            flotilla_pki::SERVER_NAME,
        )
        .ok()
    }

    /// Digests of the images this cluster still refers to: every service's (current and
    /// previous spec) and every task's that has not ended. Image garbage collection keeps them.
    /// Reads two whole tables synchronously: call it from blocking code.
    pub fn images_in_use(&self) -> Result<std::collections::HashSet<String>, ManagerError> {
        let mut keep = std::collections::HashSet::new();
        let services: Vec<Service> = self.list()?;
        for s in &services {
            for spec in std::iter::once(&s.spec).chain(s.previous_spec.as_ref()) {
                if let Some(d) = flotilla_registry::digest_of(&spec.task_template.container.image) {
                    keep.insert(d.to_string());
                }
            }
        }
        let tasks: Vec<Task> = self.list()?;
        keep.extend(flotilla_registry::task_images(&tasks));
        Ok(keep)
    }
}

/// Who a node certificate speaks for on this manager, read from the store: a removed node is
/// no one, and a certificate grants manager rights only while the store still lists its node
/// as a manager (a demoted manager's certificate stays valid until it expires, but acts as a
/// worker's). Raft RPCs come only from members of this manager's Raft group; one that has not
/// learned any membership yet (being added, before the leader's first entries) accepts any
/// manager certificate of the cluster: that is how the leader reaches it.
impl flotilla_api::authz::Members for Manager {
    fn cluster_id(&self) -> String {
        self.cluster_id.clone()
    }

    fn node_caller(
        &self,
        id: &str,
        cert_role: flotilla_pki::Role,
    ) -> Result<flotilla_api::Caller, flotilla_api::ApiError> {
        use flotilla_pki::Role;
        let node = self.get::<Node>(id)?.ok_or_else(|| {
            ManagerError::forbidden(format!(
                "node {id} is not a member of this cluster (removed with `node rm`?): join it again with a token"
            ))
        })?;
        let role = match (cert_role, node.spec.role) {
            (Role::Manager, flotilla_types::NodeRole::Manager) => Role::Manager,
            _ => Role::Worker,
        };
        Ok(flotilla_api::Caller::Node {
            id: id.to_string(),
            role,
        })
    }

    fn raft_peer(&self, node_id: &str) -> bool {
        let status = self.store.status();
        let raft_id = flotilla_store::raft_id_for(node_id);
        (status.voters.is_empty() && status.learners.is_empty())
            || status
                .voters
                .iter()
                .chain(status.learners.iter())
                .any(|(id, _)| *id == raft_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::TaskState;

    fn raw(id: &str, version: u64, state: &str) -> Versioned {
        let v = serde_json::json!({
            "id": id, "service_id": "s1", "slot": 1, "node_id": "n1",
            "spec": {"container": {"image": "x"}},
            "spec_version": 1, "desired_state": "running",
            "status": {"state": state, "timestamp": 1}
        });
        Versioned {
            id: id.into(),
            version,
            created: 1,
            value: serde_json::to_vec(&v).expect("json"),
        }
    }

    fn states(tasks: &[Task]) -> Vec<(String, u64, TaskState)> {
        tasks
            .iter()
            .map(|t| (t.id.clone(), t.meta.version, t.status.state))
            .collect()
    }

    #[test]
    fn decoded_objects_follow_versions_and_deletions() {
        let d = Decoded::default();
        let t = d
            .table::<Task>(&[raw("a", 3, "assigned"), raw("b", 4, "running")])
            .expect("list");
        assert_eq!(
            states(&t),
            [
                ("a".into(), 3, TaskState::Assigned),
                ("b".into(), 4, TaskState::Running)
            ]
        );
        // Same version: the copy decoded before is used (these bytes are never parsed).
        let mut stale = raw("a", 3, "running");
        stale.value = b"not json".to_vec();
        let t = d.table::<Task>(&[stale.clone()]).expect("cached");
        assert_eq!(states(&t), [("a".into(), 3, TaskState::Assigned)]);
        assert_eq!(
            d.one::<Task>(&stale).expect("one").status.state,
            TaskState::Assigned
        );
        // A new version is decoded.
        let t = d.table::<Task>(&[raw("a", 9, "running")]).expect("new");
        assert_eq!(states(&t), [("a".into(), 9, TaskState::Running)]);
        // "b" was not listed last time: it is gone from the cache, and so is a deleted "a".
        let mut b = raw("b", 4, "running");
        b.value = b"not json".to_vec();
        assert!(d.one::<Task>(&b).is_err());
        assert!(d.table::<Task>(&[]).expect("empty").is_empty());
        assert!(d.one::<Task>(&stale).is_err());
        // A corrupt object is an error naming it, not a panic.
        let e = d.table::<Task>(&[stale]).expect_err("corrupt");
        assert!(e.to_string().contains("corrupt task a"), "{e}");
    }
}
