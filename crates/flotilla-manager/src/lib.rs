//! The manager role of a Flotilla node: the Raft store and everything that reads or writes it.
//!
//! - [`Manager`] ([`manager`]): typed, cached access to the replicated objects, the cluster
//!   object (CA key, join secrets, trust policy), membership and quorum diagnostics;
//! - [`control`]: the leader's control loop, driving `flotilla-control`'s orchestrator,
//!   scheduler and address allocator and writing their decisions;
//! - [`liveness`]: the leader marks nodes whose heartbeats stopped as down;
//! - [`replicate`]: every manager keeps a copy of every image a service uses;
//! - [`api`]: the cluster-level HTTP API (behind the leader gate), the dispatcher's streams
//!   to agents, service logs, the registry, Raft RPCs ([`transport`] is their client side).
//!
//! It never reaches an agent's internals: agents talk to it over HTTP only, with the wire
//! types of `flotilla-types`.
//!
//! # Store reads and the async runtime
//!
//! Store reads are synchronous: a redb read transaction, then JSON decoding (through the
//! [`manager::Decoded`] cache). The rule:
//!
//! - Whatever reads a whole table ([`Manager::list`], and every function built on it: the
//!   control pass, the agents' stream rebuilds, the liveness and replication loops, the
//!   listing handlers, finding an object by name or prefix) runs on tokio's blocking pool
//!   through [`Manager::blocking`] or [`Manager::list_blocking`]; async code only awaits it.
//!   At most one such read per CPU runs at once.
//! - A lookup of one object by key ([`Manager::get`], [`Manager::cluster`]: one B-tree search
//!   and one decoded object) may run inline in async code, as the heartbeat, renewal, join,
//!   trust and authorization paths do.
//! - Synchronous entry points for other crates ([`Manager::images_in_use`]) are to be called
//!   from blocking code.
//!
//! # Locks
//!
//! Every `std::sync::Mutex` of the crate is taken through one helper that uses a poisoned
//! lock's value as it is: each guards a cache, a rate limiter or a registry whose every change
//! is one insert, removal or replacement, so a panic elsewhere cannot leave it half-updated.
//! Async mutexes (`tokio::sync::Mutex`) serialize membership changes and service naming.
//!
//! # Per-manager state
//!
//! Everything a manager keeps in memory (decoded objects, heartbeats, the dispatcher's write
//! budgets and stream claims in [`api::dispatch::Dispatcher`]) belongs to its [`Manager`];
//! there are no process-wide statics, so managers sharing a process (tests) share nothing.
#![forbid(unsafe_code)]

pub mod api;
pub mod control;
pub mod error;
pub mod liveness;
pub mod manager;
pub mod replicate;
pub mod transport;
pub mod tunnel;
pub mod volumes;

pub use error::ManagerError;
pub use manager::{ClusterObject, Manager, ManagerConfig, CLUSTER_KEY};
