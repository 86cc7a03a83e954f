//! Errors of the mesh data plane.

use std::net::SocketAddr;

/// What can go wrong in the mesh. Binding errors are the ones a caller acts on (report the
/// frontend as failed, retry on the next `apply`); the others are per-connection and only logged.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A listener (TCP or UDP) could not be bound; typically the port is taken or the address is
    /// not local. Retried on the next [`crate::Mesh::apply`].
    #[error("cannot bind {addr}: {source} (is the port free and the address local?)")]
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The pool of the service is empty: no task of the service is running.
    #[error("no backend available")]
    NoBackend,
    /// Every backend that was tried refused the connection or timed out.
    #[error("no backend accepted the connection after {attempts} attempt(s): {last}")]
    BackendsFailed {
        /// How many different backends were tried.
        attempts: usize,
        /// The error of the last attempt.
        last: String,
    },
    /// Any other I/O error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
