//! Sysctls, written through `/proc/sys` in the calling thread's network namespace.

use crate::{Error, Result};

fn path(key: &str) -> Result<String> {
    if key.is_empty() || key.contains("..") || key.starts_with('/') {
        return Err(Error::Invalid(format!("sysctl key {key:?}")));
    }
    Ok(format!("/proc/sys/{}", key.replace('.', "/")))
}

/// Writes `value` to sysctl `key` (dotted, e.g. `net.ipv4.ip_forward`) in the network
/// namespace of the calling thread (use [`crate::Net::run`] or [`crate::netns::run_in`]).
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let p = path(key)?;
    std::fs::write(&p, value).map_err(|e| Error::io(format!("write {p}"), e))
}

/// Reads sysctl `key` (trimmed) in the network namespace of the calling thread.
pub fn read_sysctl(key: &str) -> Result<String> {
    let p = path(key)?;
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io(format!("read {p}"), e))
}
