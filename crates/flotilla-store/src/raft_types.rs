//! The openraft type configuration. Everything openraft-typed stays inside this crate.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::types::{Batch, OpFailure};

openraft::declare_raft_types!(
    /// Flotilla's Raft types: app data is a [`Batch`], ids are `u64`, nodes carry an address.
    pub(crate) TypeConfig:
        D = Batch,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What applying one entry produced (sent back to the writer on the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Response {
    pub(crate) result: Result<(), OpFailure>,
}

pub(crate) type Entry = openraft::Entry<TypeConfig>;
pub(crate) type LogId = openraft::LogId<u64>;
pub(crate) type Vote = openraft::Vote<u64>;
pub(crate) type StorageError = openraft::StorageError<u64>;
pub(crate) type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
pub(crate) type SnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;
pub(crate) type Snapshot = openraft::Snapshot<TypeConfig>;
pub(crate) type Raft = openraft::Raft<TypeConfig>;

/// Wraps any displayable error as an openraft read error.
pub(crate) fn read_err(e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::read(openraft::AnyError::error(e.to_string())).into()
}

/// Wraps any displayable error as an openraft write error.
pub(crate) fn write_err(e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::write(openraft::AnyError::error(e.to_string())).into()
}

/// Runs blocking storage work (redb transactions with fsync) off the async worker threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(write_err(format!("storage task failed: {e}"))),
    }
}
