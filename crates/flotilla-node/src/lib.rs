//! The Flotilla node daemon (`flotilla node run`): configuration, the data directory and the
//! node's identity, its start modes (init, join, resume, force-new-cluster), and the wiring of
//! its two roles — `flotilla-manager` (on managers) and `flotilla-agent` (on every node) —
//! behind one mTLS listener and one local socket. Nothing here runs a control loop or serves a
//! resource; see ARCHITECTURE.md for how the pieces connect.
#![forbid(unsafe_code)]

mod autolock;
mod config;
mod daemon;
mod disk;
mod error;
mod joining;
mod keys;
mod routes;

use std::sync::{Arc, RwLock};

pub use config::{dns_upstreams, NodeConfig, StartMode};
pub use daemon::{cleanup, leftovers, run, RunOutcome};
pub use disk::{NodeIdentity, Paths};
pub use error::NodeError;

/// The node itself, as its roles see it: configuration, identity on disk, certificates, and
/// the signal to restart in a new role.
pub struct NodeCtx {
    pub cfg: NodeConfig,
    pub paths: Paths,
    identity: RwLock<NodeIdentity>,
    pub tls: Arc<flotilla_api::TlsState>,
    /// Notified when the cluster changed this node's role and the daemon must restart its
    /// internals in the new role (promotion / demotion).
    pub role_changed: tokio::sync::Notify,
}

impl NodeCtx {
    /// The identity lock guards a plain value replaced whole: a poisoned lock is used as is.
    fn identity_mut(&self) -> std::sync::RwLockWriteGuard<'_, NodeIdentity> {
        self.identity.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn identity(&self) -> NodeIdentity {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a new role in node.json (after the matching certificate is installed).
    pub fn set_role(&self, role: flotilla_types::NodeRole) -> std::io::Result<()> {
        let id = {
            let mut g = self.identity_mut();
            g.role = role;
            g.clone()
        };
        disk::write_identity(&self.paths, &id)
    }
}

impl flotilla_agent::NodeHandle for NodeCtx {
    fn identity(&self) -> NodeIdentity {
        NodeCtx::identity(self)
    }

    /// Updates the known manager addresses (persisted when they change).
    fn set_managers(&self, managers: Vec<String>) {
        let changed = {
            let mut g = self.identity_mut();
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

    fn save_certificates(
        &self,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<(), flotilla_agent::AgentError> {
        let io = flotilla_agent::AgentError::io;
        disk::write_atomic(&self.paths.node_key(), key_pem.as_bytes(), 0o600)
            .map_err(io("saving the node key"))?;
        disk::write_atomic(&self.paths.node_cert(), cert_pem.as_bytes(), 0o644)
            .map_err(io("saving the node certificate"))?;
        disk::write_atomic(&self.paths.ca_cert(), ca_pem.as_bytes(), 0o644)
            .map_err(io("saving the CA certificate"))
    }

    fn switch_role(
        &self,
        role: flotilla_types::NodeRole,
    ) -> Result<(), flotilla_agent::AgentError> {
        self.set_role(role)
            .map_err(flotilla_agent::AgentError::io("recording the new role"))?;
        self.role_changed.notify_one();
        Ok(())
    }
}
