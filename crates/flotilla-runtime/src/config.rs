//! Runtime configuration.

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::PathBuf;

/// A contiguous range of host ids that container ids 0.. map to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// First host uid/gid (container id 0 maps here).
    pub host_start: u32,
    /// Number of ids mapped.
    pub size: u32,
}

impl Default for IdRange {
    fn default() -> Self {
        IdRange {
            host_start: 100_000,
            size: 65_536,
        }
    }
}

impl IdRange {
    /// Shifts a container id into the host range (ids beyond the range map to the overflow id).
    pub fn shift(&self, id: u32) -> u32 {
        if id < self.size {
            self.host_start + id
        } else {
            self.host_start + self.size.saturating_sub(1).min(65_534)
        }
    }

    /// The container id a host id stands for: `None` for a host id outside the range.
    pub fn unshift(&self, host_id: u32) -> Option<u32> {
        host_id
            .checked_sub(self.host_start)
            .filter(|id| *id < self.size)
    }
}

/// Configuration of the node runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Root of the runtime's lasting state, e.g. `<data-dir>/runtime`: `images/` (content store
    /// and unpacked layers), `containers/<id>/` (the record `meta.json` and the overlay's upper
    /// and work dirs) and `logs/<id>/`.
    pub root: PathBuf,
    /// Root of the state that dies with the host: `containers/<id>/` (bundle, shim status and
    /// logs), `runc/` (the OCI runtime's `--root`) and `sock/`. A node puts it on a tmpfs (as
    /// containerd keeps its state in `/run`): a container start creates about twenty files
    /// there. Defaults to `<root>/state`.
    pub state: PathBuf,
    /// OCI runtime binary: `runc` (searched in PATH) by default, or e.g. `/usr/bin/crun`.
    pub runtime_bin: PathBuf,
    /// Executable that runs the shim, e.g. the `flotilla` binary.
    pub shim_exe: PathBuf,
    /// Arguments put before the shim's own flags, e.g. `["shim"]`.
    pub shim_args: Vec<OsString>,
    /// Rotate a container log when it would exceed this size (0: never).
    pub log_max_bytes: u64,
    /// Number of log files kept per container, the live one included.
    pub log_max_files: u32,
    /// User-namespace range for containers; `None` disables user namespaces node-wide.
    pub userns: Option<IdRange>,
    /// Parent of every container cgroup, e.g. `/flotilla` → `/flotilla/<id>`.
    pub cgroup_parent: String,
    /// Hide the cgroup2 mount of a hybrid layout from the OCI runtime (crun needs this). `None`
    /// decides automatically: on for a runtime whose file name contains `crun` on a hybrid host.
    pub hide_cgroup2: Option<bool>,
    /// Keep one shim started ahead of need (`flotilla shim --standby`), so that a create does
    /// not wait for the shim's exec and fork. On by default.
    pub shim_standby: bool,
    /// Statically linked init for containers that ask for `--init` (Debian's `tini` package
    /// ships `/usr/bin/tini-static`). Bind-mounted read-only into such containers only.
    pub init_bin: PathBuf,
}

impl RuntimeConfig {
    /// Defaults for a given root and shim command.
    pub fn new(
        root: impl Into<PathBuf>,
        shim_exe: impl Into<PathBuf>,
        shim_args: Vec<OsString>,
    ) -> Self {
        let root: PathBuf = root.into();
        RuntimeConfig {
            state: root.join("state"),
            root,
            runtime_bin: PathBuf::from("runc"),
            shim_exe: shim_exe.into(),
            shim_args,
            log_max_bytes: 10 << 20,
            log_max_files: 3,
            userns: Some(IdRange::default()),
            cgroup_parent: "/flotilla".into(),
            hide_cgroup2: None,
            shim_standby: true,
            init_bin: PathBuf::from("/usr/bin/tini-static"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshift_inverts_shift_within_the_range() {
        let r = IdRange::default();
        assert_eq!(r.unshift(r.shift(0)), Some(0));
        assert_eq!(r.unshift(r.shift(1000)), Some(1000));
        assert_eq!(r.unshift(0), None, "host root is outside the range");
        assert_eq!(r.unshift(r.host_start + r.size), None);
    }
}
