//! flotilla-runtime: the node runtime.
//!
//! - [`ImageStore`]: sha256 content store, `name:tag` index, `docker save` / OCI archive loading,
//!   rootfs import, layers unpacked once with ownership shifted into the user-namespace range.
//! - [`overlay`]: per-container overlay mounts (new mount API, no option-length limit).
//! - [`dirfd`]: directory descriptors over untrusted trees (never following a symlink), used
//!   by the volume copy-up and by `flotilla-volume`.
//! - [`spec`]: container spec → OCI `config.json` (secure defaults: userns, Docker's
//!   capabilities, no_new_privs, seccomp, masked paths).
//! - [`Runtime`]: the [`RuntimeDriver`] driving runc (or `--runtime PATH`) through one
//!   `flotilla shim` per container; survives agent restarts ([`RuntimeDriver::adopt`]).
//! - [`HostProbe`]: host requirements checked at node start.
//! - [`Runtime::remove_strays`]: shims found in `/proc` (by [`SHIM_ENV`]) that no record
//!   names, for `node cleanup`.
//! - [`testing`]: the driver contract suite and test-image helpers.

#![deny(unsafe_code)] // raw syscalls live only in `overlay`, `image::layer`, `dirfd` and `strays`, each with SAFETY comments

mod config;
mod copyup;
pub mod dirfd;
mod driver;
mod error;
pub mod image;
pub mod overlay;
mod probe;
mod rlimit;
mod runtime;
pub mod seccomp;
mod shim_client;
pub mod spec;
mod strays;
pub mod testing;

pub use config::{IdRange, RuntimeConfig};
pub use driver::{
    AdoptReport, ContainerInfo, ContainerState, ContainerStatus, ExitStatus, RuntimeDriver,
};
pub use error::{Result, RuntimeError};
pub use flotilla_shim::logfile::{
    now_rfc3339, read_logs, since_to_rfc3339, LogFollower, LogLine, MAX_LINE as LOG_MAX_LINE,
};
pub use image::{ImageConfigInput, ImageInspect, ImageStore, ImageSummary};
pub use probe::{CgroupLayout, HostProbe};
pub use runtime::Runtime;
pub use spec::{BindMount, ContainerSpec, Resources, SecurityOptions, TmpfsMount};
pub use strays::{ShimProcess, SHIM_ENV};
