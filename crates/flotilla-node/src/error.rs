//! Errors of the node daemon outside request handling (start-up, joining, cleanup). Each
//! message says what was wrong and how to fix it; causes are kept as sources.

use flotilla_store::StoreError;

/// Why the node daemon could not start, join, or clean up.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A usage error: the message names the flag or state to change.
    #[error("{0}")]
    Config(String),
    /// A file or system call failed; `what` says on what.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Making or reading keys and certificates failed.
    #[error("tls: {what}: {source}")]
    Pki {
        what: &'static str,
        #[source]
        source: flotilla_pki::PkiError,
    },
    #[error(transparent)]
    Certificates(#[from] flotilla_api::TlsError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The cluster refused this node, or the manager is not the one the token names.
    #[error("{0}")]
    Join(String),
    /// The manager given to `--join` did not answer.
    #[error("cannot reach the manager at {manager}: {source}")]
    Unreachable {
        manager: String,
        #[source]
        source: flotilla_api::ClientError,
    },
    #[error("{0}")]
    Api(#[from] flotilla_api::ClientError),
    #[error(transparent)]
    Manager(#[from] flotilla_manager::ManagerError),
    #[error(transparent)]
    Agent(#[from] flotilla_agent::AgentError),
    #[error("network: {0}")]
    Net(#[from] flotilla_agent::NetError),
    #[error("container runtime: {0}")]
    Runtime(#[from] flotilla_runtime::RuntimeError),
    #[error("image signing key: {0}")]
    Signing(#[from] flotilla_registry::RegistryError),
}

impl NodeError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError + 'static {
        let what: String = what.into();
        move |source| NodeError::Io { what, source }
    }

    /// Wraps a key or certificate error with what was being made.
    pub fn pki(what: &'static str) -> impl FnOnce(flotilla_pki::PkiError) -> NodeError {
        move |source| NodeError::Pki { what, source }
    }
}
