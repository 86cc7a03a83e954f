//! The `Store` handle: the public face of the Raft group on this node.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, Fatal, ForwardToLeader,
    InitializeError, RaftError,
};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState, SnapshotPolicy};
use redb::Database;
use tokio::time::Instant;

use crate::at_rest::{self, Sealer};
use crate::config::StoreConfig;
use crate::error::{storage, StoreError};
use crate::log_store::{self, LogStore};
use crate::network::{NetworkFactory, PeerTracker, RaftTransport};
use crate::raft_types::{Raft, TypeConfig};
use crate::state_machine::{self, SmShared, StateMachine};
use crate::types::{
    Batch, NodeId, Op, PeerContact, RaftRole, RaftStatus, RpcKind, Table, Versioned, WriteOutcome,
};
use crate::watch::Watch;
use crate::wire::SnapshotChunk;

/// File holding the Raft log, vote and committed index.
pub const LOG_FILE: &str = "raft-log.redb";
/// File holding the applied state, change events and the current snapshot.
pub const STATE_FILE: &str = "state.redb";

/// Chunk size for snapshot transfer (base64 on the wire: ~1.4 MB bodies, under axum's default
/// 2 MB body limit).
const SNAPSHOT_CHUNK: u64 = 1024 * 1024;
/// Per-chunk deadline for snapshot transfer (openraft's default 200 ms never completes a large
/// snapshot on a busy machine).
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 30_000;
/// Batching used when force-new-cluster restores objects.
const RESTORE_MAX_OPS: usize = 1000;
const RESTORE_MAX_BYTES: usize = 2 * 1024 * 1024;

/// Handle to this node's replica of the cluster state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    cfg: StoreConfig,
    raft: Raft,
    sm_db: Arc<Database>,
    sealer: Sealer,
    sm: Arc<SmShared>,
    peers: Arc<PeerTracker>,
    committed: Arc<AtomicU64>,
    /// Initialized as of open/initialize (metrics cover joins after that).
    initialized: AtomicBool,
    /// Set once [`Store::shutdown`] ran: readers holding this store must stop serving from it.
    shut_down: AtomicBool,
    membership_lock: tokio::sync::Mutex<()>,
}

type Metrics = RaftMetrics<NodeId, BasicNode>;

fn fatal(f: Fatal<NodeId>) -> StoreError {
    match f {
        Fatal::Stopped => StoreError::ShuttingDown,
        other => StoreError::Fatal(other.to_string()),
    }
}

fn forward(f: ForwardToLeader<NodeId, BasicNode>) -> StoreError {
    StoreError::ForwardToLeader {
        leader_id: f.leader_id,
        leader_addr: f.leader_node.map(|n| n.addr),
    }
}

fn map_write_err(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> StoreError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => forward(f),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_),
        )) => StoreError::MembershipInProgress,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(other)) => {
            StoreError::Membership(other.to_string())
        }
        RaftError::Fatal(f) => fatal(f),
    }
}

/// Creates the store's directory 0700, or makes an existing one 0700: its files hold the
/// cluster's secrets (the CA key, the join secrets).
fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |e: std::io::Error| {
        StoreError::Storage(format!("cannot create data dir {}: {e}", dir.display()))
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        r => r.map_err(err)?,
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// Creates a redb file 0600 before redb opens it (redb creates files with the umask's mode,
/// 0644 under the usual 022), and makes an existing one 0600. (No other user can plant a link
/// here: the directory is 0700.)
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::Storage(format!("cannot open {}: {e}", path.display())))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| StoreError::Storage(format!("cannot chmod {}: {e}", path.display())))
}

/// Opens (creating if missing, mode 0600) a redb file, retrying briefly while a previous
/// instance in this process is still releasing it.
pub(crate) async fn open_db(path: &Path) -> Result<Arc<Database>, StoreError> {
    private_file(path)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match Database::create(path) {
            Ok(db) => return Ok(Arc::new(db)),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                return Err(StoreError::Storage(format!(
                    "cannot open {}: {e}; is another flotilla process using this data dir?",
                    path.display()
                )))
            }
        }
    }
}

/// The store's sealer; with a keyring, first seals in place every plain value of the files in
/// `cfg.data_dir` (a store written before encryption at rest, see [`crate::at_rest`]).
async fn seal_in_place(cfg: &StoreConfig) -> Result<Sealer, StoreError> {
    let sealer = Sealer::new(cfg.at_rest.clone());
    at_rest::upgrade_file(
        &cfg.data_dir.join(LOG_FILE),
        &sealer,
        log_store::count_plain_values,
        log_store::copy_sealed,
    )
    .await?;
    at_rest::upgrade_file(
        &cfg.data_dir.join(STATE_FILE),
        &sealer,
        state_machine::count_plain_values,
        state_machine::copy_sealed,
    )
    .await?;
    Ok(sealer)
}

impl Store {
    /// Opens the store in `cfg.data_dir` and starts the Raft node. On restart, the state machine
    /// is brought up to the last persisted committed index before this returns, so reads never
    /// go backwards. A brand-new node does nothing until [`Store::initialize`] is called on it
    /// or a leader adds it with [`Store::add_voter`].
    pub async fn open(
        cfg: StoreConfig,
        transport: Arc<dyn RaftTransport>,
    ) -> Result<Store, StoreError> {
        cfg.validate()?;
        private_dir(&cfg.data_dir)?;
        let sealer = seal_in_place(&cfg).await?;
        let log_db = open_db(&cfg.data_dir.join(LOG_FILE)).await?;
        let sm_db = open_db(&cfg.data_dir.join(STATE_FILE)).await?;
        let log_store = LogStore::new(log_db, sealer.clone()).map_err(storage)?;
        let committed = log_store.committed_handle();
        let sm = StateMachine::open(sm_db.clone(), cfg.event_retention, sealer.clone())
            .map_err(storage)?;
        let shared = sm.shared();
        let peers = Arc::new(PeerTracker::default());
        let network = NetworkFactory {
            self_id: cfg.node_id,
            transport,
            peers: peers.clone(),
        };

        let raft_cfg = openraft::Config {
            cluster_name: "flotilla".to_string(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_min_ms,
            election_timeout_max: cfg.election_max_ms,
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.logs_to_keep,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StoreError::InvalidConfig(e.to_string()))?;

        let raft = Raft::new(cfg.node_id, Arc::new(raft_cfg), network, log_store, sm)
            .await
            .map_err(fatal)?;
        let initialized = raft.is_initialized().await.map_err(fatal)?;
        tracing::info!(
            node_id = cfg.node_id,
            data_dir = %cfg.data_dir.display(),
            applied = shared.applied.load(Ordering::Acquire),
            at_rest = sealer.is_keyed(),
            "store opened"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                id: cfg.node_id,
                cfg,
                raft,
                sm_db,
                sealer,
                sm: shared,
                peers,
                committed,
                initialized: AtomicBool::new(initialized),
                shut_down: AtomicBool::new(false),
                membership_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// [`Store::shutdown`] has run (for instance: this manager was demoted and restarted its
    /// internals as a worker); what it still holds is no longer kept current.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shut_down.load(Ordering::Acquire)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    fn metrics(&self) -> Metrics {
        self.inner.raft.metrics().borrow().clone()
    }

    /// Waits until `pred` holds on the metrics, or `deadline`.
    async fn wait_for(
        &self,
        deadline: Instant,
        pred: impl Fn(&Metrics) -> bool,
    ) -> Result<Metrics, StoreError> {
        let mut rx = self.inner.raft.metrics();
        loop {
            {
                let m = rx.borrow_and_update();
                if pred(&m) {
                    return Ok(m.clone());
                }
                if m.state == ServerState::Shutdown {
                    return Err(StoreError::ShuttingDown);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => return Err(StoreError::Timeout),
                Ok(Err(_)) => return Err(StoreError::ShuttingDown),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Bootstraps a brand-new single-voter cluster whose only member is this node at `addr`,
    /// then waits (up to `membership_timeout`) until this node is its leader. No-op if the node
    /// is already part of a cluster.
    pub async fn initialize(&self, addr: String) -> Result<(), StoreError> {
        if self.is_initialized() {
            return Ok(());
        }
        let id = self.inner.id;
        let members = BTreeMap::from([(id, BasicNode::new(addr.clone()))]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => {
                self.inner.initialized.store(true, Ordering::Release);
                tracing::info!(node_id = id, addr = %addr, "initialized new cluster")
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                self.inner.initialized.store(true, Ordering::Release);
                return Ok(());
            }
            Err(RaftError::APIError(e)) => return Err(StoreError::InvalidArgument(e.to_string())),
            Err(RaftError::Fatal(f)) => return Err(fatal(f)),
        }
        let deadline = Instant::now() + self.inner.cfg.membership_timeout;
        self.wait_for(deadline, |m| {
            m.current_leader == Some(id) && m.state == ServerState::Leader
        })
        .await?;
        Ok(())
    }

    /// True once this node belongs to a cluster (initialized here, or received log/membership
    /// from a leader).
    pub fn is_initialized(&self) -> bool {
        if self.inner.initialized.load(Ordering::Acquire) {
            return true;
        }
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        m.last_log_index.is_some()
            || m.membership_config
                .membership()
                .voter_ids()
                .next()
                .is_some()
    }

    /// Server side of [`RaftTransport`]: decodes a request body, hands it to openraft and
    /// encodes the reply (including Raft-level errors, which travel back to the caller).
    /// `Err` only for undecodable requests or a stopped store.
    pub async fn handle_rpc(&self, rpc: RpcKind, body: &[u8]) -> Result<Vec<u8>, StoreError> {
        let bad =
            |e: serde_json::Error| StoreError::Rpc(format!("cannot decode {rpc} request: {e}"));
        let raft = &self.inner.raft;
        let reply = match rpc {
            RpcKind::AppendEntries => {
                let req: AppendEntriesRequest<TypeConfig> =
                    serde_json::from_slice(body).map_err(bad)?;
                let leader = req.vote.leader_id().voted_for();
                let res = raft.append_entries(req).await;
                if let (Ok(_), Some(leader)) = (&res, leader) {
                    self.inner.peers.record_inbound(leader);
                }
                if let Err(RaftError::Fatal(f)) = &res {
                    return Err(fatal(f.clone()));
                }
                serde_json::to_vec(&res)
            }
            RpcKind::Vote => {
                let req: VoteRequest<NodeId> = serde_json::from_slice(body).map_err(bad)?;
                let res = raft.vote(req).await;
                if let Err(RaftError::Fatal(f)) = &res {
                    return Err(fatal(f.clone()));
                }
                serde_json::to_vec(&res)
            }
            RpcKind::InstallSnapshot => {
                let chunk: SnapshotChunk = serde_json::from_slice(body).map_err(bad)?;
                let req = InstallSnapshotRequest::<TypeConfig>::from(chunk);
                let leader = req.vote.leader_id().voted_for();
                let res = raft.install_snapshot(req).await;
                if let (Ok(_), Some(leader)) = (&res, leader) {
                    self.inner.peers.record_inbound(leader);
                }
                if let Err(RaftError::Fatal(f)) = &res {
                    return Err(fatal(f.clone()));
                }
                serde_json::to_vec(&res)
            }
        };
        reply.map_err(|e| StoreError::Rpc(format!("cannot encode {rpc} reply: {e}")))
    }

    /// Proposes `batch` as ONE Raft entry. Leader only. Returns once the entry is committed
    /// (fsynced on a quorum) and applied locally; [`WriteOutcome::result`] tells whether the
    /// batch's preconditions held (if not, nothing was written).
    ///
    /// Errors: batch over `max_batch_bytes` → [`StoreError::InvalidArgument`];
    /// not leader → [`StoreError::ForwardToLeader`]; no commit within
    /// `write_timeout` → [`StoreError::Timeout`]. After a timeout the entry may still commit
    /// later: re-read before retrying.
    pub async fn write(&self, batch: Batch) -> Result<WriteOutcome, StoreError> {
        let ops = batch.ops.len();
        let size = batch.approx_size();
        if size > self.inner.cfg.max_batch_bytes {
            return Err(StoreError::InvalidArgument(format!(
                "batch of {ops} ops is about {size} bytes, over max_batch_bytes ({}); split it",
                self.inner.cfg.max_batch_bytes
            )));
        }
        let fut = self.inner.raft.client_write(batch);
        match tokio::time::timeout(self.inner.cfg.write_timeout, fut).await {
            Err(_) => {
                tracing::warn!(
                    ops,
                    timeout_ms = self.inner.cfg.write_timeout.as_millis() as u64,
                    "write timed out"
                );
                Err(StoreError::Timeout)
            }
            Ok(Err(e)) => Err(map_write_err(e)),
            Ok(Ok(resp)) => Ok(WriteOutcome {
                revision: resp.log_id.index,
                result: resp.data.result,
            }),
        }
    }

    /// Linearizable read barrier (ReadIndex: one heartbeat round to a quorum, then waits until
    /// that index is applied here). Leader only. Returns the applied revision to read at: local
    /// reads after this see every write committed before the call.
    /// Errors as for [`Store::write`] (no quorum → [`StoreError::Timeout`]).
    pub async fn linearizable_barrier(&self) -> Result<u64, StoreError> {
        let deadline = Instant::now() + self.inner.cfg.write_timeout;
        let retry_every = Duration::from_millis(self.inner.cfg.heartbeat_ms);
        loop {
            let fut = self.inner.raft.ensure_linearizable();
            match tokio::time::timeout_at(deadline, fut).await {
                Err(_) => return Err(StoreError::Timeout),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    return Err(forward(f))
                }
                // One heartbeat round failed to reach a quorum (slow or lost peers): try again
                // until the deadline.
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                    if Instant::now() + retry_every >= deadline {
                        tracing::warn!(error = %e, "linearizable read: no quorum before the deadline");
                        return Err(StoreError::Timeout);
                    }
                    tracing::debug!(error = %e, "linearizable read: quorum not reached, retrying");
                    tokio::time::sleep(retry_every).await;
                }
                Ok(Err(RaftError::Fatal(f))) => return Err(fatal(f)),
                Ok(Ok(read_log_id)) => {
                    return Ok(self
                        .revision()
                        .max(read_log_id.map(|l| l.index).unwrap_or(0)))
                }
            }
        }
    }

    /// Local read of one object from the applied state (no consensus).
    pub fn get(&self, table: Table, id: &str) -> Result<Option<Versioned>, StoreError> {
        state_machine::get(&self.inner.sm_db, &self.inner.sealer, table, id)
    }

    /// Local read of a whole table (no consensus), ordered by id.
    pub fn list(&self, table: Table) -> Result<Vec<Versioned>, StoreError> {
        state_machine::list(&self.inner.sm_db, &self.inner.sealer, table).map(|(_, objs)| objs)
    }

    /// Like [`Store::list`], plus the revision the listing reflects (read atomically with it):
    /// `watch(revision)` then continues exactly after the listing.
    pub fn list_at(&self, table: Table) -> Result<(u64, Vec<Versioned>), StoreError> {
        state_machine::list(&self.inner.sm_db, &self.inner.sealer, table)
    }

    /// Last applied log index.
    pub fn revision(&self) -> u64 {
        self.inner.sm.applied.load(Ordering::Acquire)
    }

    /// Change feed of events with revision > `from_revision`: first replayed from the retained
    /// history, then live. See [`Watch`] for how it reports gaps.
    pub fn watch(&self, from_revision: u64) -> Result<Watch, StoreError> {
        // Subscribe before the replay reads the disk so nothing falls in between.
        let rx = self.inner.sm.feed.subscribe();
        Ok(Watch::new(
            &self.inner.sm_db,
            self.inner.sealer.clone(),
            rx,
            from_revision,
        ))
    }

    fn require_leader(&self, m: &Metrics) -> Result<(), StoreError> {
        if m.state == ServerState::Leader {
            return Ok(());
        }
        let leader_addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        Err(StoreError::ForwardToLeader {
            leader_id: m.current_leader,
            leader_addr,
        })
    }

    /// Waits until the effective membership is committed (applied) and not joint (pitfall:
    /// a new change must not start before the previous one is committed).
    async fn wait_membership_settled(&self, deadline: Instant) -> Result<Metrics, StoreError> {
        self.wait_for(deadline, |m| {
            let mem_idx = m.membership_config.log_id().map(|l| l.index);
            let applied = m.last_applied.map(|l| l.index);
            mem_idx <= applied && m.membership_config.membership().get_joint_config().len() <= 1
        })
        .await
        .map_err(|e| match e {
            StoreError::Timeout => StoreError::MembershipInProgress,
            other => other,
        })
    }

    /// Adds node `id` at `addr` as a voter. Leader only. Membership changes are serialized:
    /// this waits for any previous change to commit, adds the node as a learner and waits until
    /// it has caught up (log or snapshot), then promotes it and waits until the new membership
    /// is committed. Idempotent for a node that is already a voter (its address is not
    /// changed). Deadline: `membership_timeout`; on [`StoreError::Timeout`] the node may remain
    /// a learner (e.g. it was unreachable): call `add_voter` again once it is up, or
    /// `remove_voter` to drop it.
    pub async fn add_voter(&self, id: NodeId, addr: String) -> Result<(), StoreError> {
        let _guard = self.inner.membership_lock.lock().await;
        let deadline = Instant::now() + self.inner.cfg.membership_timeout;
        self.require_leader(&self.metrics())?;
        let m = self.wait_membership_settled(deadline).await?;
        self.require_leader(&m)?;
        if m.membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id)
        {
            return Ok(());
        }
        tracing::info!(node_id = id, addr = %addr, "adding learner");
        let add = self
            .inner
            .raft
            .add_learner(id, BasicNode::new(addr.clone()), true);
        match tokio::time::timeout_at(deadline, add).await {
            Err(_) => return Err(StoreError::Timeout),
            Ok(Err(e)) => return Err(map_write_err(e)),
            Ok(Ok(_)) => {}
        }
        tracing::info!(node_id = id, addr = %addr, "promoting learner to voter");
        let change = self
            .inner
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false);
        match tokio::time::timeout_at(deadline, change).await {
            Err(_) => return Err(StoreError::Timeout),
            Ok(Err(e)) => return Err(map_write_err(e)),
            Ok(Ok(_)) => {}
        }
        self.wait_membership_settled(deadline).await?;
        Ok(())
    }

    /// Removes node `id` (voter or learner) from the cluster. Leader only; serialized like
    /// [`Store::add_voter`]. Removing the leader itself is allowed: it steps down once the
    /// change is committed. No-op if `id` is not a member.
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), StoreError> {
        let _guard = self.inner.membership_lock.lock().await;
        let deadline = Instant::now() + self.inner.cfg.membership_timeout;
        self.require_leader(&self.metrics())?;
        let m = self.wait_membership_settled(deadline).await?;
        self.require_leader(&m)?;
        let membership = m.membership_config.membership();
        let changes = if membership.voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if membership.learner_ids().any(|l| l == id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Ok(());
        };
        tracing::info!(node_id = id, "removing member");
        let change = self.inner.raft.change_membership(changes, false);
        match tokio::time::timeout_at(deadline, change).await {
            Err(_) => return Err(StoreError::Timeout),
            Ok(Err(e)) => return Err(map_write_err(e)),
            Ok(Ok(_)) => {}
        }
        if id != self.inner.id {
            self.wait_membership_settled(deadline).await?;
        }
        Ok(())
    }

    /// A cheap snapshot of this node's Raft state (from openraft metrics; no I/O).
    pub fn status(&self) -> RaftStatus {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let addr_of = |id: NodeId| {
            membership
                .get_node(&id)
                .map(|n| n.addr.clone())
                .unwrap_or_default()
        };
        let voters: Vec<(NodeId, String)> =
            membership.voter_ids().map(|v| (v, addr_of(v))).collect();
        let learners: Vec<(NodeId, String)> =
            membership.learner_ids().map(|l| (l, addr_of(l))).collect();
        let state = match m.state {
            ServerState::Leader => RaftRole::Leader,
            ServerState::Follower => RaftRole::Follower,
            ServerState::Candidate => RaftRole::Candidate,
            ServerState::Learner => RaftRole::Learner,
            ServerState::Shutdown => RaftRole::Shutdown,
        };
        let peers = if m.state == ServerState::Leader {
            membership
                .nodes()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, n)| PeerContact {
                    id: *id,
                    addr: n.addr.clone(),
                    last_contact_ms: self.inner.peers.outbound_ms(*id),
                })
                .collect()
        } else {
            match m.current_leader {
                Some(l) if l != m.id => vec![PeerContact {
                    id: l,
                    addr: addr_of(l),
                    last_contact_ms: self.inner.peers.inbound_ms(l),
                }],
                _ => Vec::new(),
            }
        };
        let applied = m
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0)
            .max(self.revision());
        RaftStatus {
            id: m.id,
            state,
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone())),
            last_log_index: m.last_log_index.unwrap_or(0).max(applied),
            committed: self.inner.committed.load(Ordering::Relaxed).max(applied),
            applied,
            voters,
            learners,
            peers,
            quorum_ack_ms: if m.state == ServerState::Leader {
                m.millis_since_quorum_ack
            } else {
                None
            },
        }
    }

    /// Stops the Raft node and makes the applied state durable. Reads keep working on this
    /// handle; writes fail with [`StoreError::ShuttingDown`]. Drop every clone (and every
    /// [`Watch`]'s store) to release the files.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.shut_down.store(true, Ordering::Release);
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| StoreError::Fatal(format!("raft task failed: {e}")))?;
        state_machine::sync(&self.inner.sm_db)?;
        tracing::info!(node_id = self.inner.id, "store shut down");
        Ok(())
    }

    /// Disaster recovery from ONE surviving manager's data dir (`--force-new-cluster`).
    /// Offline: no other `Store` may have `cfg.data_dir` open.
    ///
    /// 1. Opens the old files without starting Raft and re-applies any committed log entries
    ///    the state machine had not applied yet, so the state is that of the last entry this
    ///    node knew to be committed.
    /// 2. Reads every object of every table.
    /// 3. Moves the old `raft-log.redb` and `state.redb` aside (renamed to
    ///    `*.pre-force-new-cluster-<unix seconds>`; delete them once the new cluster is
    ///    healthy).
    /// 4. Opens a fresh store, bootstraps a single-voter cluster with this node at `addr`, and
    ///    rewrites every object with `Upsert` batches.
    ///
    /// Kept: every object's table, id and value bytes. Not kept: versions and `created`
    /// (they become the new cluster's log indexes, so clients must re-read before a
    /// conditional update), change-event history (watchers must relist), the old Raft log,
    /// vote, membership (now just this node; re-add other managers with `add_voter`) and
    /// snapshots. Entries that were not committed, or committed without this node knowing,
    /// are lost.
    pub async fn force_new_cluster(
        cfg: StoreConfig,
        transport: Arc<dyn RaftTransport>,
        addr: String,
    ) -> Result<Store, StoreError> {
        cfg.validate()?;
        let log_path = cfg.data_dir.join(LOG_FILE);
        let state_path = cfg.data_dir.join(STATE_FILE);
        if !state_path.exists() {
            return Err(StoreError::InvalidArgument(format!(
                "no store state in {}; force-new-cluster needs a former manager's data dir",
                cfg.data_dir.display()
            )));
        }
        let sealer = seal_in_place(&cfg).await?;
        let objects = {
            let sm_db = open_db(&state_path).await?;
            let mut sm = StateMachine::open(sm_db.clone(), cfg.event_retention, sealer.clone())
                .map_err(storage)?;
            if log_path.exists() {
                let log_db = open_db(&log_path).await?;
                let log = LogStore::new(log_db, sealer.clone()).map_err(storage)?;
                let committed = log.read_committed_sync().map_err(storage)?;
                let (applied, _) = state_machine::read_applied_state(&sm_db, &sealer)
                    .map_err(StoreError::Storage)?;
                let applied_idx = applied.map(|l| l.index);
                if let Some(c) = committed {
                    if applied_idx.is_none_or(|a| a < c.index) {
                        let start = match applied_idx {
                            Some(a) => Bound::Excluded(a),
                            None => Bound::Unbounded,
                        };
                        let entries = log
                            .read_range((start, Bound::Included(c.index)))
                            .map_err(storage)?;
                        tracing::info!(
                            count = entries.len(),
                            upto = c.index,
                            "re-applying committed entries"
                        );
                        sm.apply(entries).await.map_err(storage)?;
                    }
                }
            }
            let objects = state_machine::export_all(&sm_db, &sealer)?;
            state_machine::sync(&sm_db)?;
            objects
        };
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for path in [&log_path, &state_path] {
            if path.exists() {
                let mut aside = path.clone().into_os_string();
                aside.push(format!(".pre-force-new-cluster-{stamp}"));
                std::fs::rename(path, &aside).map_err(|e| {
                    StoreError::Storage(format!("cannot move {} aside: {e}", path.display()))
                })?;
            }
        }
        let total: usize = objects.iter().map(|(_, objs)| objs.len()).sum();
        tracing::warn!(node_id = cfg.node_id, addr = %addr, objects = total, "forcing a new single-manager cluster");

        let store = Store::open(cfg, transport).await?;
        store.initialize(addr).await?;
        let mut batch = Batch::new();
        let mut bytes = 0usize;
        for (table, objs) in objects {
            for obj in objs {
                bytes += obj.value.len() + obj.id.len();
                batch.push(Op::Upsert {
                    table,
                    id: obj.id,
                    value: obj.value,
                });
                if batch.len() >= RESTORE_MAX_OPS || bytes >= RESTORE_MAX_BYTES {
                    store.restore_batch(std::mem::take(&mut batch)).await?;
                    bytes = 0;
                }
            }
        }
        if !batch.is_empty() {
            store.restore_batch(batch).await?;
        }
        tracing::info!(
            objects = total,
            revision = store.revision(),
            "force-new-cluster restore complete"
        );
        Ok(store)
    }

    async fn restore_batch(&self, batch: Batch) -> Result<(), StoreError> {
        let out = self.write(batch).await?;
        out.result
            .map_err(|f| StoreError::Storage(format!("restore failed: {f}")))
    }
}
