//! Host probe run at node start: OCI runtime, cgroup layout, overlayfs, user namespaces.

use crate::config::RuntimeConfig;
use crate::error::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How cgroups are mounted at `/sys/fs/cgroup`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupLayout {
    /// Only v1 controllers.
    V1,
    /// v1 controllers plus a cgroup2 mount at `/sys/fs/cgroup/unified`.
    Hybrid,
    /// Unified hierarchy only.
    V2,
    /// Nothing recognisable mounted.
    Unknown,
}

/// What the host offers; shown by `flotilla node inspect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProbe {
    /// The OCI runtime binary as resolved (None: not found).
    pub runtime_path: Option<PathBuf>,
    /// First line of `<runtime> --version`, e.g. `runc version 1.1.5+ds1`.
    pub runc_version: Option<String>,
    pub cgroup_layout: CgroupLayout,
    /// overlayfs is listed in /proc/filesystems.
    pub overlay: bool,
    /// User namespaces can be created.
    pub userns: bool,
    /// The configured user-namespace range, if enabled.
    pub userns_range: Option<crate::config::IdRange>,
    /// Kernel release (uname -r).
    pub kernel: String,
    /// The kernel supports `lowerdir+` with the new mount API (Linux ≥ 6.8).
    pub overlay_lowerdir_plus: bool,
    /// Running as root (uid 0).
    pub root: bool,
    /// The command that runs each container's shim, e.g. `/usr/local/bin/flotilla-shim`.
    #[serde(default)]
    pub shim: String,
    /// The memory controller accounts swap (`memory.memsw.*` on v1, `memory.swap.max` on v2), so
    /// a memory limit can also bound swap.
    #[serde(default)]
    pub swap_accounting: bool,
}

/// Finds an executable: a path with a slash is taken as is, else PATH plus the sbin dirs.
pub fn which(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Detects the cgroup layout from a mountinfo text.
/// Whether the memory controller accounts swap. On v1 the root memory cgroup then has
/// `memory.memsw.limit_in_bytes`. On v2 only non-root cgroups have `memory.swap.max`, so look in
/// the runtime's parent cgroup, creating it as runc would on the first container (a host may
/// have no other child cgroup yet), and else in the root's children.
fn swap_accounting(layout: CgroupLayout, parent: &str) -> bool {
    let root = Path::new("/sys/fs/cgroup");
    match layout {
        CgroupLayout::V1 | CgroupLayout::Hybrid => {
            root.join("memory/memory.memsw.limit_in_bytes").exists()
        }
        CgroupLayout::V2 => {
            let own = root.join(parent.trim_start_matches('/'));
            let _ = fs::create_dir_all(&own);
            own.join("memory.swap.max").exists()
                || fs::read_dir(root).is_ok_and(|rd| {
                    rd.flatten()
                        .any(|e| e.path().join("memory.swap.max").exists())
                })
        }
        CgroupLayout::Unknown => false,
    }
}

pub fn cgroup_layout_from_mountinfo(mountinfo: &str) -> CgroupLayout {
    let mut v1 = false;
    let mut unified = false;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mnt), Some(fstype)) = (fields.get(4), fields.get(sep + 1)) else {
            continue;
        };
        match (*fstype, *mnt) {
            ("cgroup2", "/sys/fs/cgroup") => return CgroupLayout::V2,
            ("cgroup2", "/sys/fs/cgroup/unified") => unified = true,
            ("cgroup", m) if m.starts_with("/sys/fs/cgroup/") => v1 = true,
            _ => {}
        }
    }
    match (v1, unified) {
        (true, true) => CgroupLayout::Hybrid,
        (true, false) => CgroupLayout::V1,
        _ => CgroupLayout::Unknown,
    }
}

/// `(major, minor)` of a kernel release string like `6.18.0-1-amd64`.
pub fn kernel_version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

impl HostProbe {
    /// Probes the host for the given configuration.
    pub fn run(cfg: &RuntimeConfig) -> HostProbe {
        let runtime_path = which(&cfg.runtime_bin);
        let runc_version = runtime_path.as_ref().and_then(|p| {
            let out = Command::new(p).arg("--version").output().ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines().next().map(|l| l.trim().to_string())
        });
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let max_userns: u64 = fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let root = fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
            .unwrap_or(false);
        let cgroup_layout = cgroup_layout_from_mountinfo(&mountinfo);
        HostProbe {
            runtime_path,
            runc_version,
            swap_accounting: swap_accounting(cgroup_layout, &cfg.cgroup_parent),
            cgroup_layout,
            overlay: filesystems
                .lines()
                .any(|l| l.trim_end().ends_with("\toverlay")),
            userns: max_userns > 0 && Path::new("/proc/self/ns/user").exists(),
            userns_range: cfg.userns,
            overlay_lowerdir_plus: kernel_version(&kernel) >= (6, 8),
            kernel,
            root,
            shim: std::iter::once(cfg.shim_exe.as_os_str())
                .chain(cfg.shim_args.iter().map(|a| a.as_os_str()))
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// Fails with a message naming the fix when a requirement is missing.
    pub fn check(&self) -> Result<()> {
        let missing = |m: &str| Err(RuntimeError::HostRequirement(m.to_string()));
        if !self.root {
            return missing("the node runtime must run as root (start the node with sudo)");
        }
        if self.runtime_path.is_none() {
            return missing("runc not found: apt-get install runc (or pass --runtime PATH to another OCI runtime)");
        }
        if self.runc_version.is_none() {
            return missing("the oci runtime does not answer `--version`: reinstall it (apt-get install --reinstall runc)");
        }
        if self.cgroup_layout == CgroupLayout::Unknown {
            return missing(
                "no cgroup filesystem under /sys/fs/cgroup: mount cgroups (v1, hybrid or v2)",
            );
        }
        if !self.overlay {
            return missing("overlayfs not available: modprobe overlay (CONFIG_OVERLAY_FS)");
        }
        if self.userns_range.is_some() && !self.userns {
            return missing(
                "user namespaces are disabled: sysctl -w user.max_user_namespaces=15000 (or disable userns in the node config)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory";

    #[test]
    fn detects_layouts() {
        assert_eq!(cgroup_layout_from_mountinfo(HYBRID), CgroupLayout::Hybrid);
        let v1: String = HYBRID
            .lines()
            .filter(|l| !l.contains("unified"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(cgroup_layout_from_mountinfo(&v1), CgroupLayout::V1);
        let v2 = "30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(cgroup_layout_from_mountinfo(v2), CgroupLayout::V2);
        assert_eq!(cgroup_layout_from_mountinfo(""), CgroupLayout::Unknown);
    }

    #[test]
    fn parses_kernel_version() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), (6, 18));
        assert_eq!(kernel_version("5.10.0"), (5, 10));
    }

    #[test]
    fn probe_serializes_for_node_inspect() -> Result<(), serde_json::Error> {
        let p = HostProbe::run(&RuntimeConfig::new("/nonexistent", "/bin/true", vec![]));
        let v = serde_json::to_value(&p)?;
        eprintln!("{v}");
        for k in [
            "runc_version",
            "cgroup_layout",
            "overlay",
            "userns",
            "kernel",
        ] {
            assert!(v.get(k).is_some(), "{k} reported");
        }
        Ok(())
    }

    #[test]
    fn missing_runc_names_the_fix() {
        let mut cfg = RuntimeConfig::new("/nonexistent", "/bin/true", vec![]);
        cfg.runtime_bin = PathBuf::from("/nonexistent/runc");
        let mut p = HostProbe::run(&cfg);
        p.root = true;
        let msg = p
            .check()
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(msg.contains("apt-get install runc"), "{msg}");
    }
}
