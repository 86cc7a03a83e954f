//! flotilla-volume: local named volumes of one node.
//!
//! A volume is a directory on the node that containers mount (the runtime's
//! [`BindMount`](flotilla_runtime::BindMount), with `copy_up` for a new volume so it starts
//! with the image's content at the mount point). [`VolumeStore`] creates, lists, measures,
//! removes, exports and imports them; which task may mount which volume, and when, is the
//! agent's business.
//!
//! # On disk
//!
//! ```text
//! <root>/                    0710 root:<mapped root>   (0700 root:root without userns)
//!   <name>/                  0710 root:<mapped root>
//!     meta.json              0600 root   {created_at, labels}, written atomically, last
//!     _data/                 0755 <mapped root> (or the image dir's owner and mode after a
//!                            copy-up / the archive's after an import): what is mounted
//!   .trash-<name>-<pid>-<n>/ a volume being removed (renamed away first, deleted on open)
//! ```
//!
//! `<mapped root>` is the host id container root maps to (`IdRange::shift(0)`): the OCI
//! runtime resolves a bind source from inside the container's user namespace, so container
//! root must be able to pass `<root>` and `<name>` (it cannot list them), and no other host
//! user can reach volume data. Names follow `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`
//! ([`validate_name`]), so a name is one path component. A `<name>` dir without `meta.json`
//! is an interrupted create: it is not listed, and `create` completes it.
//!
//! # Hostile input
//!
//! Everything under `_data` is written by containers and is untrusted, as are import
//! archives. Usage, export and removal walk `_data` through directory descriptors that never
//! follow a symlink ([`flotilla_runtime::dirfd`]): a symlink to `/` is measured, exported and
//! removed as a link. Imports go through the runtime's hardened unpacker
//! ([`unpack_volume`](flotilla_runtime::image::layer::unpack_volume)): no entry lands
//! outside `_data` (`..`, absolute paths, symlinked parents, hard links to outside are
//! refused), device nodes are refused, owners are shifted into the node's range, and a
//! failed import is undone. A full disk is [`VolumeError::NoSpace`], not a panic.

#![forbid(unsafe_code)]

pub mod delta;
mod error;
mod store;

pub use delta::Snapshot;
pub use error::{Result, VolumeError};
pub use store::{
    mounted, unmount_all, validate_name, validate_size_limit, ExportStats, LocalVolume, Received,
    TreeDigest, VolumeStore, MAX_SIZE_LIMIT, MIN_SIZE_LIMIT, NAME_RULE,
};
