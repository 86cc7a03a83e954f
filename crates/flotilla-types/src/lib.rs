//! Flotilla's domain objects, shared by every other crate: nodes, services, tasks, secrets, configs,
//! and the JSON shapes of the HTTP API. No I/O lives here.
//!
//! The object model mirrors Docker Swarm's (Node, Service + ServiceSpec, Task with Swarm's states) so
//! that the Docker Engine API can later be served as a thin translation. JSON field names are
//! snake_case; durations are integer **nanoseconds** (as in Docker's API); times are Unix
//! milliseconds.
#![forbid(unsafe_code)]

mod api;
mod id;
mod identity;
mod network;
mod node;
mod service;
mod signal;
mod storage;
mod task;
mod trust;
mod wire;

pub use api::*;
pub use id::{new_id, validate_name, IdError};
pub use identity::{now_ms, NodeIdentity};
pub use network::*;
pub use node::*;
pub use service::*;
pub use signal::{parse_signal, SIGRTMAX, SIGRTMIN, SIGTERM};
pub use storage::*;
pub use task::*;
pub use trust::*;
pub use wire::*;

/// Metadata every stored object carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// Raft log index of the entry that last wrote the object; pass it back as `?version=N`
    /// for optimistic concurrency.
    #[serde(default)]
    pub version: u64,
    /// Unix milliseconds.
    #[serde(default)]
    pub created_at: u64,
    /// Unix milliseconds.
    #[serde(default)]
    pub updated_at: u64,
}
