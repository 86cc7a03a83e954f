//! The manager role: the Raft store plus what only managers hold (the CA key, join secrets)
//! and typed access to the replicated objects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use flotilla_pki::Ca;
use flotilla_store::{Batch, Op, Store, StoreError, Table, Versioned};
use flotilla_types::{Meta, Node, Service, Task};

use crate::error::{op_failure, ApiError};
use crate::tls::TlsState;

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
    /// Which image signatures agents accept (enforced unless turned off; clusters created
    /// before this field existed get an enforcing policy with no key).
    #[serde(default)]
    pub trust: flotilla_registry::TrustPolicy,
}

pub const CLUSTER_KEY: &str = "cluster";

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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

pub fn decode<T: Stored>(v: &Versioned) -> Result<T, ApiError> {
    let mut obj: T = serde_json::from_slice(&v.value)
        .map_err(|e| ApiError::internal(format!("corrupt {} {}: {e}", T::KIND, v.id)))?;
    obj.meta_mut().version = v.version;
    Ok(obj)
}

pub fn encode<T: Stored>(obj: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(obj).map_err(|e| ApiError::internal(format!("encoding: {e}")))
}

pub struct Manager {
    pub store: Store,
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
    pub write_timeout: Duration,
    /// For probing peers when quorum seems lost.
    pub tls: Arc<TlsState>,
    /// `--data-dir` and `--listen`, for the recovery hint.
    pub data_dir: String,
    pub listen: String,
    /// Objects already decoded, so that reading a table decodes only what changed.
    pub decoded: Decoded,
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
    fn table<T: Stored>(&self, raw: &[Versioned]) -> Result<Vec<T>, ApiError> {
        // Hits are taken under the lock, misses decoded without it. Concurrent readers (the
        // control loop, every agent's streams) share the map meanwhile; whichever puts its
        // fresh map back last wins, and both are correct (entries are keyed by version).
        let hits: Vec<Option<Arc<T>>> = match self.tables.lock() {
            Ok(t) => match t.get(&T::TABLE) {
                Some(map) => raw.iter().map(|v| Self::lookup::<T>(map, v)).collect(),
                None => vec![None; raw.len()],
            },
            Err(_) => vec![None; raw.len()],
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
        if let Ok(mut t) = self.tables.lock() {
            t.insert(T::TABLE, fresh);
        }
        Ok(out)
    }

    /// One object, from the cache when its version matches (a miss is decoded, not cached).
    fn one<T: Stored>(&self, v: &Versioned) -> Result<T, ApiError> {
        let hit = self
            .tables
            .lock()
            .ok()
            .and_then(|t| t.get(&T::TABLE).and_then(|m| Self::lookup::<T>(m, v)));
        match hit {
            Some(o) => Ok(T::clone(&o)),
            None => decode(v),
        }
    }
}

impl Manager {
    pub fn get<T: Stored>(&self, id: &str) -> Result<Option<T>, ApiError> {
        match self.store.get(T::TABLE, id)? {
            Some(v) => self.decoded.one(&v).map(Some),
            None => Ok(None),
        }
    }

    pub fn list<T: Stored>(&self) -> Result<Vec<T>, ApiError> {
        self.decoded.table(&self.store.list(T::TABLE)?)
    }

    /// Writes a batch; a failed precondition becomes 404/409 naming `what`, a commit timeout
    /// the quorum-loss message.
    pub async fn write(&self, batch: Batch, what: &str) -> Result<u64, ApiError> {
        let out = match self.store.write(batch).await {
            Ok(out) => out,
            Err(StoreError::Timeout) => {
                return Err(ApiError::unavailable(self.quorum_message().await))
            }
            Err(e) => return Err(e.into()),
        };
        match out.result {
            Ok(()) => Ok(out.revision),
            Err(f) => Err(op_failure(&f, what)),
        }
    }

    pub fn cluster(&self) -> Result<ClusterObject, ApiError> {
        let v = self
            .store
            .get(Table::Cluster, CLUSTER_KEY)?
            .ok_or_else(|| ApiError::unavailable("cluster object not replicated yet; retry"))?;
        serde_json::from_slice(&v.value)
            .map_err(|e| ApiError::internal(format!("corrupt cluster object: {e}")))
    }

    /// Read-modify-write of the cluster object: one Raft entry, conditional on the version read
    /// (a concurrent change makes it fail with 409 rather than be lost). Returns what `f`
    /// returns, and the object as written.
    pub async fn update_cluster<T>(
        &self,
        f: impl FnOnce(&mut ClusterObject) -> Result<T, ApiError>,
    ) -> Result<(T, ClusterObject), ApiError> {
        let (mut c, version) = self.cluster_versioned()?;
        let out = f(&mut c)?;
        let value = serde_json::to_vec(&c).map_err(|e| ApiError::internal(e.to_string()))?;
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

    fn cluster_versioned(&self) -> Result<(ClusterObject, u64), ApiError> {
        let v = self
            .store
            .get(Table::Cluster, CLUSTER_KEY)?
            .ok_or_else(|| ApiError::unavailable("cluster object not replicated yet; retry"))?;
        let obj = serde_json::from_slice(&v.value)
            .map_err(|e| ApiError::internal(format!("corrupt cluster object: {e}")))?;
        Ok((obj, v.version))
    }

    pub fn put_op<T: Stored>(obj: &T, id: &str, expect: Option<u64>) -> Result<Op, ApiError> {
        Ok(Op::update(T::TABLE, id, encode(obj)?, expect))
    }

    /// The signing CA, from the replicated cluster object (managers that joined later get the
    /// key through Raft).
    pub fn ca(&self) -> Result<Ca, ApiError> {
        let c = self.cluster()?;
        Ca::from_pem(&c.ca_cert_pem, &c.ca_key_pem)
            .map_err(|e| ApiError::internal(format!("cluster CA: {e}")))
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
            self.data_dir, self.listen
        )
    }

    /// Asks the leader's control loop to run a pass now.
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    pub fn is_leader(&self) -> bool {
        self.store.status().state == "leader"
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
        assert!(e.message.contains("corrupt task a"), "{}", e.message);
    }
}
