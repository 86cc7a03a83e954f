//! # flotilla-store: the replicated cluster state
//!
//! The managers' shared state (nodes, services, tasks, secrets, ...) replicated with
//! **openraft 0.9** (storage-v2 API) and persisted with **redb**. All openraft glue lives in this
//! crate; the public API ([`Store`] and the plain types below) carries no openraft types, so a
//! move to openraft 0.10 only touches this crate.
//!
//! ## Data model
//! - [`Table`]s of [`Versioned`] objects: an id, opaque value bytes (JSON by convention), the
//!   Raft log index that created the object and the one that last wrote it (`version`).
//! - A write is a [`Batch`] of [`Op`]s proposed as **one Raft entry** and applied atomically:
//!   preconditions (exists / absent / `expect_version`) are all checked before anything is
//!   written. In openraft 0.9 the leader fsyncs once per entry, so batching is how throughput
//!   scales (see `tests/cluster.rs::t60_batch_throughput`).
//! - Every applied op yields an [`Event`]; [`Store::watch`] replays retained events from disk
//!   and then follows live ones. Gaps are never silent: they surface as
//!   [`StoreError::Compacted`] and the consumer relists ([`Store::list_at`]).
//!
//! ## Files (in `data_dir`)
//! - `raft-log.redb` ([`LOG_FILE`]): log entries, vote, committed log id, last purged log id.
//!   Every mutation is committed with fsync before openraft hears it is done (the `LogFlushed`
//!   callback fires after the commit).
//! - `state.redb` ([`STATE_FILE`]): one redb table per [`Table`], the last applied log id and
//!   membership, the event history and the current snapshot. Applies commit without fsync; the
//!   persisted committed index plus re-apply at startup (`Raft::new`) and the fsynced snapshot
//!   builds make that safe (details in `state_machine.rs`).
//!
//! ## Encryption at rest
//! With [`StoreConfig::at_rest`] set to a [`flotilla_secrets::Keyring`], every value of both files
//! (log entries, Raft metadata, objects, events, the stored snapshot) is sealed (AES-256-GCM)
//! with an AAD naming its table and key, so values cannot be swapped between places. Raft RPC bodies
//! stay plain (they travel over mTLS); each manager seals with its own keys. Opening a plain store
//! with a keyring rewrites each file sealed (a new file renamed over the old) before Raft starts.
//! Details in `at_rest.rs`.
//!
//! ## Snapshots
//! Built from the redb state (all tables, a compact binary format, tables by name), every
//! `snapshot_every` entries; the log is then purged keeping `logs_to_keep` entries. Lagging or
//! new nodes receive them through chunked `install_snapshot` (1 MiB chunks, base64 in the JSON
//! body, 30 s per chunk); installing one replaces all tables and resets watchers
//! ([`StoreError::Compacted`]).
//!
//! ## Transport
//! [`RaftTransport`] moves opaque JSON bodies between managers; the daemon implements it over
//! mTLS HTTP and routes incoming bodies to [`Store::handle_rpc`]. Connect failures must be
//! reported as [`TransportError::Unreachable`]. The network glue records, per peer, when an
//! RPC last succeeded ([`RaftStatus::peers`]). Bodies stay under ~2 MB with the default
//! `max_batch_bytes` (AppendEntries requests are split by size; snapshot chunks are 1 MiB), and
//! an AppendEntries call must complete within `heartbeat_ms` (openraft 0.9's RPC deadline), so
//! the transport should reuse connections.
//!
//! ## Source map
//! | file | what |
//! |---|---|
//! | `store.rs` | [`Store`]: open, write, reads, watch, membership, status, force-new-cluster |
//! | `log_store.rs` | openraft `RaftLogStorage` on redb (`raft-log.redb`) |
//! | `state_machine.rs` | openraft `RaftStateMachine`: batch apply, events, snapshots (`state.redb`) |
//! | `network.rs` | [`RaftTransport`], openraft `RaftNetwork` glue, peer contact tracking |
//! | `wire.rs` | compact (base64) wire form of snapshot chunks |
//! | `watch.rs` | [`Watch`], the change-feed consumer |
//! | `at_rest.rs` | sealing of every stored value, AAD layout, upgrade of plain files |
//! | `raft_types.rs` | the openraft type config (`D = Batch`) |
//! | `types.rs`, `config.rs`, `error.rs` | the public plain types |
//!
//! ## Failure behaviour
//! Writes and read barriers have a deadline (`write_timeout`): losing quorum yields
//! [`StoreError::Timeout`] rather than a hang. Storage errors stop the Raft core
//! ([`StoreError::Fatal`]); the manager should exit and be restarted. Disaster recovery from a
//! single surviving manager is [`Store::force_new_cluster`].
#![forbid(unsafe_code)]
// openraft's storage traits fix the error type to `openraft::StorageError` (~224 bytes); the
// storage helpers return it too, so boxing would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

mod at_rest;
mod config;
mod error;
mod log_store;
mod network;
mod raft_types;
mod state_machine;
mod store;
mod types;
mod watch;
mod wire;

#[cfg(test)]
mod tests;

pub use config::StoreConfig;
pub use error::{StoreError, TransportError};
/// The keys of [`StoreConfig::at_rest`] (re-exported so users of the store can load them).
pub use flotilla_secrets;
pub use network::RaftTransport;
pub use store::{Store, LOG_FILE, STATE_FILE};
pub use types::{
    Batch, Event, EventKind, FailureKind, NodeId, Op, OpFailure, PeerContact, RaftRole, RaftStatus,
    RpcKind, Table, Versioned, WriteOutcome,
};
pub use watch::Watch;

/// A manager's Raft id, derived from its node id (odd and below 2^63, never 0).
pub fn raft_id_for(node_id: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(node_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b) >> 1 | 1
}
