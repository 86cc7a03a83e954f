//! Errors of the node runtime.

use std::path::PathBuf;

/// Everything the runtime can fail with. Messages are lower-case and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A host requirement is missing; the message names the fix.
    #[error("host requirement missing: {0}")]
    HostRequirement(String),
    #[error("image not found: {0} (load it with `flotilla image load` or import a rootfs)")]
    ImageNotFound(String),
    #[error("container not found: {0}")]
    ContainerNotFound(String),
    #[error("container already exists: {0} (remove it first or pick another id)")]
    ContainerExists(String),
    #[error("image {image} is in use by container {container} (remove the container first)")]
    ImageInUse { image: String, container: String },
    #[error(
        "digest mismatch: expected {expected}, got {actual} (the blob is corrupt; fetch it again)"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("bad image archive: {0}")]
    BadArchive(String),
    #[error("mount failed: {0}")]
    Mount(String),
    #[error("shim failed: {0}")]
    Shim(String),
    #[error(
        "shim for container {0} is dead (its container state is unknown; remove the container)"
    )]
    ShimDead(String),
    #[error("oci runtime: {0}")]
    Oci(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
}

/// Shorthand result.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Adds a context string to I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RuntimeError::Io {
            context: context(),
            source,
        })
    }
}
