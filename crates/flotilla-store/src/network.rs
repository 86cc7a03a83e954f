//! The pluggable transport and openraft's network glue over it.
//!
//! RPC bodies are JSON: requests are the openraft request types, replies are
//! `Result<Response, RaftError>` so a remote Raft error travels back intact.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload, RPCTypes, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::TransportError;
use crate::raft_types::{Entry, LogId, TypeConfig};
use crate::types::{NodeId, RpcKind};
use crate::wire::SnapshotChunk;

/// How Raft RPCs reach peers. The daemon implements it over mTLS HTTP; tests use an in-process
/// one. `call` sends `body` to node `target` at `addr` and returns the reply body, which the
/// peer produced with [`crate::Store::handle_rpc`].
///
/// Return [`TransportError::Unreachable`] when the peer cannot be reached at all (openraft backs
/// off 500 ms before retrying that peer) and [`TransportError::Other`] otherwise. The caller
/// applies its own deadline (openraft's per-RPC TTL), so `call` need not time out by itself.
pub trait RaftTransport: Send + Sync + 'static {
    fn call(
        &self,
        target: NodeId,
        addr: &str,
        rpc: RpcKind,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send + '_>>;
}

/// When each peer last answered us (outbound) and when each leader last called us (inbound).
#[derive(Default)]
pub(crate) struct PeerTracker {
    outbound: Mutex<HashMap<NodeId, Instant>>,
    inbound: Mutex<HashMap<NodeId, Instant>>,
}

impl PeerTracker {
    pub(crate) fn record_outbound(&self, target: NodeId) {
        if let Ok(mut m) = self.outbound.lock() {
            m.insert(target, Instant::now());
        }
    }

    pub(crate) fn record_inbound(&self, from: NodeId) {
        if let Ok(mut m) = self.inbound.lock() {
            m.insert(from, Instant::now());
        }
    }

    fn ms_since(map: &Mutex<HashMap<NodeId, Instant>>, id: NodeId) -> Option<u64> {
        let m = map.lock().ok()?;
        m.get(&id)
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn outbound_ms(&self, id: NodeId) -> Option<u64> {
        Self::ms_since(&self.outbound, id)
    }

    pub(crate) fn inbound_ms(&self, id: NodeId) -> Option<u64> {
        Self::ms_since(&self.inbound, id)
    }
}

/// Soft size limit of one AppendEntries request (estimated; a single larger entry is still
/// sent alone).
pub(crate) const MAX_APPEND_BYTES: usize = 1024 * 1024;

/// How many leading entries fit in `budget` bytes (at least one).
pub(crate) fn entries_within(entries: &[Entry], budget: usize) -> usize {
    let mut used = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let size = match &e.payload {
            EntryPayload::Normal(batch) => batch.approx_size(),
            _ => 256,
        };
        used = used.saturating_add(size);
        if used > budget && i > 0 {
            return i;
        }
    }
    entries.len()
}

pub(crate) struct NetworkFactory {
    pub(crate) self_id: NodeId,
    pub(crate) transport: Arc<dyn RaftTransport>,
    pub(crate) peers: Arc<PeerTracker>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = NetworkClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        NetworkClient {
            self_id: self.self_id,
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            peers: self.peers.clone(),
            unanswered: None,
            fresh: true,
        }
    }
}

pub(crate) struct NetworkClient {
    self_id: NodeId,
    target: NodeId,
    addr: String,
    transport: Arc<dyn RaftTransport>,
    peers: Arc<PeerTracker>,
    /// Last entry of an AppendEntries request whose reply never arrived (openraft dropped the
    /// call at its deadline). The follower may have stored it anyway; see `append_entries`.
    unanswered: Option<LogId>,
    /// A new replication stream whose follower has held every probed entry so far; see
    /// `append_entries`.
    fresh: bool,
}

impl NetworkClient {
    async fn send<Req, Resp, E>(
        &self,
        kind: RpcKind,
        action: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let ttl = option.hard_ttl();
        let call = self.transport.call(self.target, &self.addr, kind, body);
        let reply = match tokio::time::timeout(ttl, call).await {
            Err(_) => {
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.self_id,
                    target: self.target,
                    timeout: ttl,
                }))
            }
            Ok(Err(e @ TransportError::Unreachable(_))) => {
                tracing::debug!(target_node = self.target, addr = %self.addr, rpc = %kind, error = %e, "peer unreachable");
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Err(e)) => {
                tracing::debug!(target_node = self.target, addr = %self.addr, rpc = %kind, error = %e, "rpc failed");
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            Ok(Ok(reply)) => reply,
        };
        let decoded: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.peers.record_outbound(self.target);
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for NetworkClient {
    /// Sends at most ~[`MAX_APPEND_BYTES`] of entries per RPC and reports a partial success for
    /// the rest: openraft 0.9 gives an AppendEntries RPC only `heartbeat_interval` to complete,
    /// so a lagging follower must not be sent hundreds of large batches in one request.
    ///
    /// If the previous request was dropped at that deadline (slow encode/transfer/fsync), the
    /// follower has usually finished storing it anyway (the server side completes the call).
    /// Before re-sending the same entries, a cheap empty request probes whether the follower
    /// already holds the last of them; if so (Raft's log matching guarantees the prefix too),
    /// that counts as progress. Without this, an entry that takes longer than the deadline to
    /// ship would be re-sent forever.
    ///
    /// The first request of a new replication stream (a new leader, or a new member) is probed
    /// the same way: openraft 0.9 starts without knowing where the follower's log ends and
    /// sends from the middle of the leader's log, so after a large batch a new leader re-shipped
    /// dozens of 512 KiB entries the follower already had (~60 ms each) before its first write
    /// could commit. Empty requests for the newest entry of an earlier term settle that.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // While the stream is fresh, probe the newest entry of an earlier term in each request
        // (the follower cannot hold this leader's own entries yet; a new leader's first one is
        // its blank entry). openraft sends at most `max_payload_entries` per request, so a long
        // log takes a few probes; the first miss ends the probing.
        let fresh_probe = if self.fresh && !rpc.entries.is_empty() {
            let id = rpc
                .entries
                .iter()
                .rev()
                .find(|e| e.log_id.leader_id.term < rpc.vote.leader_id.term)
                .map(|e| e.log_id);
            if id.is_none() {
                self.fresh = false;
            }
            id
        } else {
            None
        };
        let probe_id = match self.unanswered.take() {
            Some(id) if rpc.entries.iter().any(|e| e.log_id == id) => Some(id),
            _ => fresh_probe,
        };
        if let Some(probe_id) = probe_id {
            let probe = AppendEntriesRequest::<TypeConfig> {
                vote: rpc.vote,
                prev_log_id: Some(probe_id),
                leader_commit: rpc.leader_commit,
                entries: Vec::new(),
            };
            let resp = self
                .send(
                    RpcKind::AppendEntries,
                    RPCTypes::AppendEntries,
                    &probe,
                    &option,
                )
                .await?;
            match resp {
                AppendEntriesResponse::Success => {
                    tracing::debug!(
                        target_node = self.target,
                        matched = %probe_id,
                        "follower already stored these entries"
                    );
                    let last = rpc.entries.last().map(|e| e.log_id);
                    return Ok(if last == Some(probe_id) {
                        AppendEntriesResponse::Success
                    } else {
                        AppendEntriesResponse::PartialSuccess(Some(probe_id))
                    });
                }
                AppendEntriesResponse::HigherVote(v) => {
                    return Ok(AppendEntriesResponse::HigherVote(v))
                }
                // Not there (or conflicting): send the entries for real.
                AppendEntriesResponse::PartialSuccess(_) | AppendEntriesResponse::Conflict => {
                    self.fresh = false;
                }
            }
        }

        let keep = entries_within(&rpc.entries, MAX_APPEND_BYTES);
        let partial = if keep < rpc.entries.len() {
            tracing::debug!(
                target_node = self.target,
                sent = keep,
                held_back = rpc.entries.len() - keep,
                "splitting append entries by size"
            );
            rpc.entries.truncate(keep);
            rpc.entries.last().map(|e| e.log_id)
        } else {
            None
        };
        // Cleared below only if this call is not dropped before the reply arrives.
        self.unanswered = rpc.entries.last().map(|e| e.log_id);
        let resp = self
            .send(
                RpcKind::AppendEntries,
                RPCTypes::AppendEntries,
                &rpc,
                &option,
            )
            .await;
        // A timeout or broken call leaves the outcome unknown: probe next time.
        if !matches!(resp, Err(RPCError::Timeout(_)) | Err(RPCError::Network(_))) {
            self.unanswered = None;
        }
        Ok(match (resp?, partial) {
            (AppendEntriesResponse::Success, Some(last)) => {
                AppendEntriesResponse::PartialSuccess(Some(last))
            }
            (resp, _) => resp,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let chunk = SnapshotChunk::from(rpc);
        self.send(
            RpcKind::InstallSnapshot,
            RPCTypes::InstallSnapshot,
            &chunk,
            &option,
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(RpcKind::Vote, RPCTypes::Vote, &rpc, &option)
            .await
    }
}
