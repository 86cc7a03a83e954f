//! The agent's errors.
//!
//! - [`AgentError`]: failures of the agent's loops and of the node it asks.
//! - [`TaskError`]: why a task's start path failed. Its text becomes the task's status message
//!   (the runner adds `create: ` or `start: ` for those steps), so each variant's text is part
//!   of what operators and the end-to-end tests read.
//! - [`PullError`]: why an image could not be pulled; shared (in an `Arc`) by every task that
//!   waited for the same pull.
//! - [`NetError`]: failures of task networking; those of `prepare_task`, `adopt_netns` and
//!   `attach_task` reach task statuses through [`TaskError::Network`], with the same text.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_pki::Role;
use flotilla_registry::{RegistryError, TrustError};
use flotilla_runtime::RuntimeError;

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No manager accepted the call; `last` is the last manager's answer.
    #[error("no manager answered: {last}")]
    NoManager { last: String },
    #[error(transparent)]
    Client(#[from] flotilla_api::ClientError),
    #[error(transparent)]
    Tls(#[from] flotilla_api::TlsError),
    #[error("node key: {0}")]
    Pki(#[from] flotilla_pki::PkiError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A renewal for a role change brought a certificate of another role.
    #[error("renewed certificate has role {got:?}, expected {want:?}")]
    WrongRole { got: Role, want: Role },
    /// The cluster's state (on a manager node) could not be read.
    #[error("cluster state: {0}")]
    Cluster(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The node is shutting down.
    #[error("node shutting down")]
    ShuttingDown,
}

impl AgentError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }
}

/// Why a task's start path failed (its status message, see the module doc).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The agent is going away (its context is dropped).
    #[error("node shutting down")]
    ShuttingDown,
    /// The image is not here and could not be pulled (this task's pull or the one it waited
    /// for).
    #[error(transparent)]
    Pull(Arc<PullError>),
    /// The trust policy refused the image present on this node.
    #[error(transparent)]
    NotTrusted(#[from] TrustError),
    /// The runtime failed (image lookup, `create`, `start`, the container's state or exit).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The task's network could not be prepared or wired.
    #[error(transparent)]
    Network(#[from] NetError),
    /// The created container reports an init pid that names no process.
    #[error("container init has pid {0}")]
    InitPid(i32),
    /// Wiring the task's veth did not finish in time (a netlink reply that never came).
    #[error("task network: wiring the veth took over {} s", .0.as_secs())]
    AttachTimeout(Duration),
    /// The blocking worker running a step failed (it panicked, or the runtime shut down).
    #[error(transparent)]
    Worker(#[from] tokio::task::JoinError),
    /// The task's volumes, binds, secrets or configs could not be prepared.
    #[error("task storage: {0}")]
    Storage(String),
}

/// Why an image could not be pulled from the managers' registries.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// No manager to pull from.
    #[error("image {image} is not on this node and no manager is known")]
    NoManager { image: String },
    /// The last manager tried failed (no manager refused the image on trust).
    #[error("pulling {image} from {manager}: {source}")]
    Registry {
        image: String,
        manager: String,
        #[source]
        source: RegistryError,
    },
    /// A manager's copy was refused by the trust policy (reported alone, whatever the other
    /// managers answered: it is the task's rejection message).
    #[error(transparent)]
    NotTrusted(TrustError),
}

/// Why a task-networking operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The node's subnet is not set up.
    #[error("task network not ready")]
    NotReady,
    /// A user-defined network the task is attached to has no block on this node.
    #[error("network {network:?} is not set up on this node after {waited:?} (removed, or no block of its range for this node)")]
    NoNetwork {
        network: String,
        waited: std::time::Duration,
    },
    /// No subnet arrived from the managers within `waited`.
    #[error(
        "this node's task network is not set up after {}s (no subnet from the managers yet)",
        .waited.as_secs()
    )]
    NotSetUp { waited: Duration },
    /// A netlink, iptables or address-allocation operation failed (the error names it).
    #[error(transparent)]
    Net(#[from] flotilla_net::Error),
    /// Naming or wiring a task's namespace failed.
    #[error("task network: {0}")]
    Wire(#[source] flotilla_net::Error),
    /// The overlay's VXLAN device could not be set up.
    #[error("overlay: {0}")]
    Overlay(#[source] flotilla_net::Error),
    /// The local route of the VIP pool could not be set up.
    #[error("local route for the VIP pool {pool}: {source}")]
    VipRoute {
        pool: ipnet::Ipv4Net,
        #[source]
        source: flotilla_net::Error,
    },
    /// A subnet's prefix length is invalid.
    #[error(transparent)]
    Prefix(#[from] ipnet::PrefixLenError),
    /// A state directory could not be created. The text is the OS error alone, as task
    /// statuses have always shown it; `path` says which directory.
    #[error("{source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A state file (`settings.json`, a task's `hosts` or `resolv.conf`) could not be written;
    /// `path` is the file the step failed on (the temporary file, or the file it replaces).
    #[error("write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The network settings could not be serialized.
    #[error(transparent)]
    Settings(#[from] serde_json::Error),
    /// A task's namespace path has no file name.
    #[error("task namespace path has no name")]
    NamespaceName,
    /// The blocking worker running the operation failed.
    #[error(transparent)]
    Worker(#[from] tokio::task::JoinError),
}

#[cfg(test)]
mod tests {
    //! Task errors become status messages: their texts are pinned here.

    use super::*;

    fn not_trusted() -> TrustError {
        TrustError::NotTrusted {
            reference: "web:1".into(),
            reasons: vec!["bad signature".into()],
        }
    }

    fn text(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    #[test]
    fn pull_error_texts() {
        assert_eq!(
            text(PullError::NoManager {
                image: "web:1".into()
            }),
            "image web:1 is not on this node and no manager is known"
        );
        let e = PullError::Registry {
            image: "web:1".into(),
            manager: "10.0.0.1:4243".into(),
            source: RegistryError::Invalid("manifest unknown".into()),
        };
        assert_eq!(
            text(&e),
            "pulling web:1 from 10.0.0.1:4243: manifest unknown"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            text(PullError::NotTrusted(not_trusted())),
            "image web:1 is not signed by a trusted key"
        );
    }

    #[test]
    fn task_error_texts() {
        assert_eq!(text(TaskError::ShuttingDown), "node shutting down");
        let shared = Arc::new(PullError::NoManager {
            image: "web:1".into(),
        });
        assert_eq!(
            text(TaskError::Pull(shared)),
            "image web:1 is not on this node and no manager is known"
        );
        assert_eq!(
            text(TaskError::NotTrusted(not_trusted())),
            "image web:1 is not signed by a trusted key"
        );
        assert_eq!(
            text(TaskError::Runtime(RuntimeError::ContainerNotFound(
                "t1".into()
            ))),
            "container not found: t1"
        );
        assert_eq!(text(TaskError::InitPid(-1)), "container init has pid -1");
        assert_eq!(
            text(TaskError::AttachTimeout(Duration::from_secs(30))),
            "task network: wiring the veth took over 30 s"
        );
        assert_eq!(
            text(TaskError::Network(NetError::NotReady)),
            "task network not ready"
        );
    }

    #[test]
    fn net_error_texts() {
        assert_eq!(text(NetError::NotReady), "task network not ready");
        assert_eq!(
            text(NetError::NotSetUp {
                waited: Duration::from_secs(60)
            }),
            "this node's task network is not set up after 60s (no subnet from the managers yet)"
        );
        let invalid = || flotilla_net::Error::Invalid("netns of pid 0".into());
        assert_eq!(
            text(NetError::Net(invalid())),
            "invalid argument: netns of pid 0"
        );
        assert_eq!(
            text(NetError::Wire(invalid())),
            "task network: invalid argument: netns of pid 0"
        );
        assert_eq!(
            text(NetError::Overlay(invalid())),
            "overlay: invalid argument: netns of pid 0"
        );
        assert_eq!(
            text(NetError::VipRoute {
                pool: "10.199.0.0/16".parse().expect("pool"),
                source: invalid(),
            }),
            "local route for the VIP pool 10.199.0.0/16: invalid argument: netns of pid 0"
        );
        let denied = || std::io::Error::from_raw_os_error(13);
        assert_eq!(
            text(NetError::CreateDir {
                path: "/d/run/net/tasks/t1".into(),
                source: denied(),
            }),
            text(denied())
        );
        assert_eq!(
            text(NetError::Write {
                path: "/d/run/net/tasks/t1/hosts.tmp".into(),
                source: denied(),
            }),
            format!("write /d/run/net/tasks/t1/hosts.tmp: {}", denied())
        );
        assert_eq!(
            text(NetError::NamespaceName),
            "task namespace path has no name"
        );
    }
}
