//! The open-files limit containers get.
//!
//! runc applies `process.rlimits` from inside the container's user namespace, where a hard limit
//! above the one it inherited cannot be set. So the runtime raises its own process's hard
//! `RLIMIT_NOFILE` to Docker's container default once (root may), and a container's hard limit
//! is never above what the runtime ends up with.

#![allow(unsafe_code)]

/// Raises this process's hard `RLIMIT_NOFILE` to at least `want` when allowed, keeping the soft
/// limit; returns the hard limit in effect afterwards.
pub fn raise_nofile_hard(want: u64) -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return want;
    }
    if cur.rlim_max >= want {
        return want;
    }
    let raised = libc::rlimit {
        rlim_cur: cur.rlim_cur,
        rlim_max: want,
    };
    // SAFETY: setrlimit reads one valid rlimit struct; failure (no CAP_SYS_RESOURCE) is handled.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        want
    } else {
        cur.rlim_max
    }
}
