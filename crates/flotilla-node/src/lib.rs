//! The Flotilla node daemon (`flotilla node run`): identity and certificates on disk, the
//! mTLS listener and local socket serving the API, the Raft store on managers, and the loops
//! every node runs (heartbeats, certificate renewal) or only the leader runs (node liveness).
//!
//! See ARCHITECTURE.md for how the pieces connect.
#![forbid(unsafe_code)]

mod agent;
pub mod api;
mod config;
mod control;
mod daemon;
mod disk;
mod error;
mod executor;
mod gc;
mod joining;
mod leader;
mod manager;
mod network;
mod tls;
mod transport;
mod trust;

use std::sync::{Arc, RwLock};

pub use config::{NodeConfig, StartMode};
pub use daemon::{cleanup, leftovers, run, RunOutcome};
pub use disk::{NodeIdentity, Paths};
pub use error::{ApiError, NodeError};
pub use manager::Manager;

use error::ApiError as Err_;

/// Everything a running node shares between its listener, its loops and its handlers.
pub struct NodeCtx {
    pub cfg: NodeConfig,
    pub paths: Paths,
    identity: RwLock<NodeIdentity>,
    pub tls: Arc<tls::TlsState>,
    pub manager: Option<Arc<Manager>>,
    /// The node's container runtime and image store.
    pub runtime: Option<flotilla_runtime::Runtime>,
    /// Notified when the cluster changed this node's role and the daemon must restart its
    /// internals in the new role (promotion / demotion).
    pub role_changed: tokio::sync::Notify,
    /// Trust policy and assigned images from the last assignment set (see `trust`).
    pub agent_images: trust::AgentImages,
    /// The managers of the last network map (node ids); `None` until one arrived. A node
    /// without a store accepts a manager certificate only from these.
    pub known_managers: RwLock<Option<std::collections::HashSet<String>>>,
}

impl NodeCtx {
    pub fn identity(&self) -> NodeIdentity {
        match self.identity.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn cluster_id(&self) -> String {
        self.identity().cluster_id
    }

    pub fn manager(&self) -> Result<Arc<Manager>, Err_> {
        self.manager
            .clone()
            .ok_or_else(|| Err_::unavailable("this node is not a manager"))
    }

    /// Records a new role in node.json (after the matching certificate is installed).
    pub fn set_role(&self, role: flotilla_types::NodeRole) -> std::io::Result<()> {
        let id = {
            let mut g = match self.identity.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            g.role = role;
            g.clone()
        };
        disk::write_identity(&self.paths, &id)
    }

    /// Updates the known manager addresses (persisted when they change).
    pub fn set_managers(&self, managers: Vec<String>) {
        let changed = {
            let mut g = match self.identity.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if g.managers != managers && !managers.is_empty() {
                g.managers = managers;
                Some(g.clone())
            } else {
                None
            }
        };
        if let Some(id) = changed {
            if let Err(e) = disk::write_identity(&self.paths, &id) {
                tracing::warn!(error = %e, "saving manager list failed");
            }
        }
    }
}
