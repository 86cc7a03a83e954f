//! Errors of the volume store.

use flotilla_runtime::RuntimeError;
use std::io;
use std::path::PathBuf;

/// Everything the volume store can fail with. Messages are lower-case and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No volume by that name on this node.
    #[error("volume {0} not found on this node (list volumes with `flotilla volume ls`)")]
    NotFound(String),
    /// The name breaks the naming rule (stated in the message).
    #[error("invalid volume name {name:?}: {rule}")]
    InvalidName { name: String, rule: &'static str },
    /// An import into a volume that already holds data.
    #[error(
        "volume {0} is not empty: import only into a new or empty volume \
         (remove it first or import under another name)"
    )]
    NotEmpty(String),
    /// Another import into this volume is running.
    #[error("volume {0} is busy with an import (wait for it to finish)")]
    Busy(String),
    /// A final pass of a move without a first one on this node (or after the agent
    /// restarted): the move starts over.
    #[error(
        "volume {0} has no first-pass snapshot on this node: the move starts over with a full copy"
    )]
    NoSnapshot(String),
    /// A size limit out of range.
    #[error(
        "volume size limit {0} bytes is out of range: give 8 MiB to 16 TiB (e.g. volume-opt=size=512m)"
    )]
    InvalidSize(u64),
    /// The archive is not a tar stream, or holds an entry a volume may not (a path leaving
    /// the volume, a device node, a link to outside).
    #[error("bad volume archive: {0}")]
    BadArchive(String),
    /// The node's disk (or the volume's quota) is full.
    #[error("no space left on the node's disk: {context} (free space under {root} and retry)")]
    NoSpace { context: String, root: PathBuf },
    /// A volume's `meta.json` cannot be read.
    #[error("{path}: {message} (remove the volume with `flotilla volume rm` and create it again)")]
    Corrupt { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Shorthand result.
pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// Whether an I/O error means a full disk or quota.
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Turns an I/O error into a [`VolumeError`], a full disk into [`VolumeError::NoSpace`].
pub(crate) fn io_err(root: &std::path::Path, context: String, source: io::Error) -> VolumeError {
    if is_no_space(&source) {
        VolumeError::NoSpace {
            context: format!("{context}: {source}"),
            root: root.to_path_buf(),
        }
    } else {
        VolumeError::Io { context, source }
    }
}

/// Maps an error of the runtime's unpacker.
pub(crate) fn from_unpack(root: &std::path::Path, e: RuntimeError) -> VolumeError {
    match e {
        RuntimeError::BadArchive(m) => VolumeError::BadArchive(m),
        RuntimeError::Io { context, source } => {
            if is_no_space(&source) {
                io_err(root, context, source)
            } else if matches!(
                source.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::Other
            ) {
                VolumeError::BadArchive(format!("{context}: {source}"))
            } else {
                VolumeError::Io { context, source }
            }
        }
        other => VolumeError::BadArchive(other.to_string()),
    }
}
