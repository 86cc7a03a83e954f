//! Shim processes of a runtime, found in `/proc` rather than through container records.
//!
//! `node cleanup` removes the containers its records name, through their shims' sockets. A
//! shim can be alive without either: one whose agent was killed while it was still inside
//! `runc create` (its socket not bound yet, so the cleanup found "no shim" and removed the
//! record), a standby, or one whose record was lost. The runtime starts every shim with
//! [`SHIM_ENV`] naming its root (a process's initial environment stays readable in
//! `/proc/<pid>/environ`, through `fork` too), so such a shim can still be found and ended.
//! Shims started by builds without that variable are recognised by their name (`shim <id>`)
//! and a descriptor under the runtime's directories.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Environment variable the runtime starts its shims with: the canonical path of its root.
pub const SHIM_ENV: &str = "FLOTILLA_SHIM_OF";

/// A live process started for a runtime's containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimProcess {
    pub pid: i32,
    /// Its `comm`: `shim <container id>` (15 bytes at most) once it serves a container.
    pub name: String,
}

impl std::fmt::Display for ShimProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shim process {} ({})", self.pid, self.name)
    }
}

/// The value of [`SHIM_ENV`] for a runtime rooted at `root`.
pub(crate) fn mark_of(root: &Path) -> PathBuf {
    fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf())
}

/// `(state, comm)` from `/proc/<pid>/stat`.
fn stat_of(pid: i32) -> Option<(char, i32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let _ppid = f.next()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, pgrp))
}

fn has_env(pid: i32, want: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|kv| kv == want))
        .unwrap_or(false)
}

fn has_fd_under(pid: i32, dirs: &[&Path]) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .any(|t| dirs.iter().any(|d| t.starts_with(d)))
}

/// Live (not zombie) shim processes of the runtime rooted at `root` with its state in `state`:
/// those started with [`SHIM_ENV`] = `mark`, and those named `shim …` holding a file under
/// `root` or `state`. This process is never among them.
pub(crate) fn find(mark: &Path, root: &Path, state: &Path) -> Vec<ShimProcess> {
    let mut want = format!("{SHIM_ENV}=").into_bytes();
    want.extend_from_slice(mark.as_os_str().as_bytes());
    let dirs: Vec<PathBuf> = [root, state]
        .iter()
        .map(|d| mark_of(d))
        .chain([root.to_path_buf(), state.to_path_buf()])
        .collect();
    let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let name = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_default();
        let ours = has_env(pid, &want) || (name.starts_with("shim ") && has_fd_under(pid, &dirs));
        if ours && stat_of(pid).is_some_and(|(st, _)| st != 'Z' && st != 'X') {
            out.push(ShimProcess { pid, name });
        }
    }
    out.sort_by_key(|p| p.pid);
    out
}

/// Kills `procs` with SIGKILL, each with its process group when it leads one (a shim calls
/// `setsid`: the OCI runtime it is running and the container processes that did not leave the
/// group go with it), and waits up to `within` for them to be gone. Returns those still alive.
pub(crate) fn kill(procs: &[ShimProcess], within: Duration) -> Vec<ShimProcess> {
    for p in procs {
        let target = match stat_of(p.pid) {
            Some((_, pgrp)) if pgrp == p.pid => -p.pid,
            Some(_) => p.pid,
            None => continue,
        };
        tracing::info!(pid = p.pid, name = %p.name, "killing a shim process no container record names");
        send_kill(target);
    }
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<ShimProcess> = procs
            .iter()
            .filter(|p| stat_of(p.pid).is_some_and(|(st, _)| st != 'Z' && st != 'X'))
            .cloned()
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[allow(unsafe_code)]
fn send_kill(target: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. `target` is a pid
    // (> 0) or the negated id of a process group led by that pid, never 0 or -1.
    unsafe {
        libc::kill(target, libc::SIGKILL);
    }
}

/// Ids of the OCI runtime's containers under `runc_root` (one directory each).
pub(crate) fn runtime_containers(runc_root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = fs::read_dir(runc_root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .filter_map(|n| OsStr::to_str(&n).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}
