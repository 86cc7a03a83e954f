//! The default seccomp profile.
//!
//! Docker's profile is an allow-list of ~350 syscalls; ours is the equivalent deny-list of what
//! Docker's profile refuses to a container without extra capabilities: kernel modules, mounts and
//! namespace creation, keyrings, clock setting, kexec/reboot, BPF, perf, userfaultfd, handle-based
//! opens, swap, quotas, and the obsolete ones. Denied calls fail with EPERM; `clone3` fails with
//! ENOSYS so libc falls back to `clone`, whose namespace flags are filtered by argument.

use crate::error::{Result, RuntimeError};
use oci_spec::runtime::LinuxSeccomp;
use serde_json::json;

/// Syscalls the default profile refuses with EPERM.
pub const DENIED: &[&str] = &[
    "acct",
    "add_key",
    "afs_syscall",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "putpmsg",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "security",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "syslog",
    "tuxcall",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
    "vm86",
    "vm86old",
    "vserver",
];

/// Namespace flags `clone` may not carry (CLONE_NEWNS … CLONE_NEWNET, CLONE_NEWCGROUP).
pub const CLONE_NS_FLAGS: &[u64] = &[
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

/// The profile, as an oci-spec value.
pub fn default_profile() -> Result<LinuxSeccomp> {
    let mut syscalls = vec![
        json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM as u32}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS as u32}),
    ];
    for f in CLONE_NS_FLAGS {
        syscalls.push(json!({
            "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM as u32,
            "args": [{"index": 0, "value": f, "valueTwo": f, "op": "SCMP_CMP_MASKED_EQ"}]
        }));
    }
    let v = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    });
    serde_json::from_value(v).map_err(|e| RuntimeError::Invalid(format!("seccomp profile: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn profile_parses() -> crate::error::Result<()> {
        let p = super::default_profile()?;
        assert!(p
            .syscalls()
            .as_ref()
            .is_some_and(|s| s.len() == 2 + super::CLONE_NS_FLAGS.len()));
        Ok(())
    }
}
