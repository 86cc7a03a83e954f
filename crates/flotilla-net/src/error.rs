//! Errors of this crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while plumbing the node network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink request failed.
    #[error("netlink {op} failed: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A link the operation needs does not exist.
    #[error("link {0} not found")]
    LinkNotFound(String),
    /// An argument was rejected before touching the kernel.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An allocator has no free entry left.
    #[error("{0} exhausted: widen the range or free entries")]
    Exhausted(String),
    /// A persisted allocation file belongs to another subnet.
    #[error("address file {path} is for subnet {found}, not {expected}: remove it if the node subnet changed")]
    SubnetMismatch {
        /// The file.
        path: PathBuf,
        /// Subnet recorded in the file.
        found: ipnet::Ipv4Net,
        /// Subnet asked for.
        expected: ipnet::Ipv4Net,
    },
    /// The allocation file could not be parsed.
    #[error("address file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An iptables command failed.
    #[error("iptables {args} failed: {stderr}")]
    Iptables {
        /// Arguments given.
        args: String,
        /// What iptables printed.
        stderr: String,
    },
    /// Another VXLAN device already uses this VNI and port in the namespace.
    ///
    /// Happens when several nodes run in one network namespace (tests, `dev`): their subnets
    /// are reachable through their bridges already, so the caller can run without overlay.
    #[error("a vxlan device with vni {vni} and port {port} already exists in this network namespace: the overlay is not needed here (nodes share a namespace), or choose another vni/port")]
    VxlanInUse {
        /// The VNI asked for.
        vni: u32,
        /// The UDP port asked for.
        port: u16,
    },
    /// A helper thread panicked.
    #[error("helper thread panicked: {0}")]
    Panicked(String),
    /// The tunnel's key derivation or random source failed.
    #[error("tunnel crypto failed: {0}")]
    Crypto(String),
    /// No tokio runtime is running on this thread.
    #[error("no tokio runtime: call from inside a tokio runtime")]
    NoRuntime,
}

impl Error {
    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn nix(op: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::Io {
            op: op.into(),
            source: std::io::Error::from(errno),
        }
    }

    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        Error::Netlink {
            op: op.into(),
            source,
        }
    }
}

/// The leader-side allocators (re-exported in [`crate::ipam`]) keep their own error; `?`
/// turns it into the matching variant here.
impl From<flotilla_control::ipam::IpamError> for Error {
    fn from(e: flotilla_control::ipam::IpamError) -> Self {
        use flotilla_control::ipam::IpamError;
        match e {
            IpamError::Invalid(m) => Error::Invalid(m),
            IpamError::Exhausted(m) => Error::Exhausted(m),
        }
    }
}

/// The errno carried by a netlink error, if any (positive, e.g. `libc::EEXIST`).
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}
