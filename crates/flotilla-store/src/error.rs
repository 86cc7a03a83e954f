//! Errors of the store, split by what the caller can do about them.

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Everything the store API can fail with.
///
/// Caller-actionable: [`StoreError::ForwardToLeader`] (retry on the leader),
/// [`StoreError::Timeout`] (no quorum answered in time; the outcome of a write is unknown),
/// [`StoreError::Compacted`] (relist, then watch again), [`StoreError::MembershipInProgress`]
/// (retry later), [`StoreError::NotInitialized`], [`StoreError::InvalidConfig`],
/// [`StoreError::InvalidArgument`]. Fatal: [`StoreError::Storage`], [`StoreError::Fatal`]
/// (the Raft core stopped; exit and restart the manager).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreError {
    #[error("this node is not the leader; forward the request to the leader (id {leader_id:?}, address {leader_addr:?})")]
    ForwardToLeader {
        leader_id: Option<NodeId>,
        leader_addr: Option<String>,
    },

    #[error("no quorum answered within the deadline (quorum lost?); the outcome of a write is unknown, re-read before retrying")]
    Timeout,

    /// `oldest` is the oldest revision a watch can currently start from.
    #[error("history before revision {oldest} was compacted; relist and watch again from the listed revision")]
    Compacted { oldest: u64 },

    #[error("the cluster is not initialized; initialize it or join this node to a cluster")]
    NotInitialized,

    #[error("invalid store configuration: {0}")]
    InvalidConfig(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("another membership change is in progress; retry when it has finished")]
    MembershipInProgress,

    #[error("membership change rejected: {0}")]
    Membership(String),

    #[error("storage failure: {0}; check the data directory and disk, then restart the node")]
    Storage(String),

    #[error("raft stopped with a fatal error: {0}; restart the node")]
    Fatal(String),

    #[error("the store is shutting down")]
    ShuttingDown,

    #[error("raft rpc failed: {0}")]
    Rpc(String),
}

/// A failure reported by a [`crate::RaftTransport`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TransportError {
    /// The peer cannot be reached (connect refused, DNS, TLS handshake...). Openraft backs off
    /// before retrying.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// Anything else (a broken connection mid-call, a bad HTTP status...). Retried right away.
    #[error("transport error: {0}")]
    Other(String),
}

pub(crate) fn storage<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Storage(e.to_string())
}
