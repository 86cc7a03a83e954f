//! Named network namespaces, kept as bind-mounted nsfs files under a caller-given run dir
//! (like `ip netns add`, but not tied to `/run/netns`).
//!
//! Limitation: the run dir is not made a shared mount point as `ip netns` does for
//! `/run/netns`; mount namespaces created after a namespace file was mounted hold a copy
//! of that mount until they drop it (runc detaches the old root, so containers do).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::{Error, Result};

/// Sysctls set in every namespace made by [`create`] or named by [`adopt`]: containers run in
/// a user namespace and must still bind ports below 1024 and use ICMP sockets.
const NEW_NS_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_unprivileged_port_start", "0"),
    ("net.ipv4.ping_group_range", "0 2147483647"),
];

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || name.contains('/')
        || name == "."
        || name == ".."
        || name.contains('\0')
    {
        return Err(Error::Invalid(format!("netns name {name:?}")));
    }
    Ok(())
}

/// Whether `path` is a mounted network namespace file.
// The f_type width differs between architectures, hence the casts.
#[allow(clippy::unnecessary_cast)]
pub fn is_netns(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        Ok(s) => s.filesystem_type().0 as i64 == libc::NSFS_MAGIC as i64,
        Err(_) => false,
    }
}

/// Creates the network namespace `dir/name` (idempotent: an existing one is kept) with
/// `lo` up and the sysctls containers need; returns its path.
pub fn create(dir: &Path, name: &str) -> Result<PathBuf> {
    validate_name(name)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("create dir {}", dir.display()), e))?;
    let path = dir.join(name);
    if is_netns(&path) {
        return Ok(path);
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .open(&path)
    {
        Ok(_) => {}
        Err(e) => return Err(Error::io(format!("create {}", path.display()), e)),
    }
    let target = path.clone();
    let made = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            // This thread alone moves to the new namespace, and exits afterwards.
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::nix("unshare(CLONE_NEWNET)", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| Error::nix(format!("bind mount netns on {}", target.display()), e))?;
            setup_inside()
        })
        .join()
        .map_err(|_| Error::Panicked("netns create".into()))?
    });
    if let Err(e) = made {
        let _ = remove(&path);
        return Err(e);
    }
    tracing::debug!(netns = %path.display(), "created network namespace");
    Ok(path)
}

/// Runs in a thread inside a fresh namespace: `lo` up and sysctls.
fn setup_inside() -> Result<()> {
    for (k, v) in NEW_NS_SYSCTLS {
        crate::write_sysctl(k, v)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| Error::io("build tokio runtime", e))?;
    rt.block_on(async {
        let net = crate::Net::current()?;
        crate::link::set_up(&net, "lo").await
    })
}

/// Names the network namespace of process `pid` as `dir/name` (bind-mounts
/// `/proc/<pid>/ns/net` there, replacing a namespace of that name), then brings `lo` up and
/// sets the sysctls containers need, as [`create`] does. For a namespace the OCI runtime made
/// inside the container's user namespace: only a namespace owned by that user namespace can
/// be joined by `runc exec` (which enters the user namespace first).
pub fn adopt(dir: &Path, name: &str, pid: u32) -> Result<PathBuf> {
    validate_name(name)?;
    if pid == 0 {
        return Err(Error::Invalid("netns of pid 0".into()));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("create dir {}", dir.display()), e))?;
    let path = dir.join(name);
    if path.exists() {
        remove(&path)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .open(&path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    let source = format!("/proc/{pid}/ns/net");
    if let Err(e) = mount(
        Some(source.as_str()),
        &path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        let _ = std::fs::remove_file(&path);
        return Err(Error::nix(
            format!("bind mount {source} on {}", path.display()),
            e,
        ));
    }
    if let Err(e) = run_in(&path, setup_inside).and_then(|r| r) {
        let _ = remove(&path);
        return Err(e);
    }
    tracing::debug!(netns = %path.display(), pid, "adopted network namespace");
    Ok(path)
}

/// Unmounts (lazily) and unlinks the namespace file; succeeds if it is already gone.
pub fn remove(path: &Path) -> Result<()> {
    // A racing double create may have stacked two mounts: peel them all.
    for _ in 0..8 {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
            Err(e) => return Err(Error::nix(format!("umount {}", path.display()), e)),
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove {}", path.display()), e)),
    }
    tracing::debug!(netns = %path.display(), "removed network namespace");
    Ok(())
}

/// Namespace files (mounted or not) directly under `dir`; empty if `dir` does not exist.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("read dir {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(format!("read dir {}", dir.display()), e))?;
        let p = entry.path();
        // nsfs mounts report as regular files; skip directories and our own tmp files.
        if p.is_file() || is_netns(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Runs `f` on a new thread that has joined the network namespace at `path`, and returns
/// its result. Sockets opened by `f` stay in that namespace; children it spawns start there.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let ns =
        File::open(path).map_err(|e| Error::io(format!("open netns {}", path.display()), e))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // Only this short-lived thread changes namespace; it exits when f returns.
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::nix(format!("setns {}", path.display()), e))?;
            Ok(f())
        })
        .join()
        .map_err(|_| Error::Panicked(format!("run_in {}", path.display())))?
    })
}
