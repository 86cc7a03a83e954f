//! The node's files under its data directory:
//!
//! ```text
//! DIR/node.json        identity: cluster id, node id, role, raft id, name, known managers
//! DIR/tls/ca.pem       cluster root certificate
//! DIR/tls/node.pem     this node's certificate     DIR/tls/node.key  its key (0600)
//! DIR/tls/ca.key       none: the CA key lives only in the sealed store (a copy older
//!                      versions wrote here is removed when a manager starts)
//! DIR/raft/            the Raft log and state (managers only; they hold the CA key and the
//!                      join secrets)
//! DIR/admin/           operator bundle written by --init: ca.pem, cert.pem, key.pem
//! DIR/api.sock         local API socket (root only)
//! DIR/runtime/         images, container records and writable layers, container logs
//! DIR/net/             task network settings and address allocations
//! DIR/run/             a tmpfs the node mounts: state that dies with the host (runtime
//!                      bundles and shim state, runc's root, shim sockets, network namespaces)
//! ```
//!
//! Modes follow Docker's userns-remap layout: nothing under DIR is readable by other local
//! users. DIR and the directories on the way to each container's root filesystem
//! (`run`, `run/runtime`, `run/runtime/containers`, `<id>`, `<id>/bundle`) are 0710 with the
//! group of the host gid that container root maps to, so that the OCI runtime, already inside
//! the container's user namespace, can reach the rootfs; everything else is 0700 (directories)
//! or 0600 (secrets, records). Image layers sit under `runtime/` (0700): overlayfs reads them
//! with the mounting root's credentials, and no local user can run a set-uid file of a layer.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::NodeError;

pub use flotilla_types::NodeIdentity;

pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_path_buf(),
        }
    }
    pub fn identity(&self) -> PathBuf {
        self.dir.join("node.json")
    }
    pub fn tls(&self) -> PathBuf {
        self.dir.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls().join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.tls().join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.tls().join("node.pem")
    }
    pub fn node_key(&self) -> PathBuf {
        self.tls().join("node.key")
    }
    pub fn raft(&self) -> PathBuf {
        self.dir.join("raft")
    }
    pub fn admin(&self) -> PathBuf {
        self.dir.join("admin")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    /// The node's tmpfs for state that dies with the host.
    pub fn run(&self) -> PathBuf {
        self.dir.join("run")
    }
}

/// Creates `dir` and any missing parents, the parents as `create_dir_all` would and `dir`
/// itself 0700 (a new `tls/` or `admin/` is never readable by others, whatever the umask).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

/// A name no other writer picks: the process id and 64 bits from std's randomly seeded hasher.
fn unique_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    format!("{}.{:016x}", std::process::id(), h.finish())
}

/// Writes `data` to `path` atomically (temp file, fsync, rename) with the given mode.
///
/// The temp file is `.<name>.tmp.<pid>.<random>` beside `path` (so `node.key` and `node.pem`
/// never share one), created with `O_CREAT|O_EXCL|O_NOFOLLOW` and given `mode` on its file
/// descriptor before the data goes in: a file or symbolic link planted at that name is neither
/// followed nor reused with its old mode. A missing parent directory is created 0700.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        unique_suffix()
    ));
    write_atomic_via(path, &tmp, data, mode)
}

/// [`write_atomic`] through the given temp path.
fn write_atomic_via(path: &Path, tmp: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(parent)?;
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600 & mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(tmp)
    };
    let mut f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A stale temp file (a crash) or something planted: unlink removes the name, never
            // what a symbolic link points at. Then create it afresh, exclusively.
            std::fs::remove_file(tmp)?;
            open()?
        }
        r => r?,
    };
    let res = (|| {
        // On the descriptor, so the umask plays no part and no other path is touched.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    res?;
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}

/// The host ids a container's root runs as under the node's user namespace: the one user and
/// group, besides root, that must reach into the data dir (to the container's root filesystem
/// under `run/runtime/containers/<id>/bundle/rootfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRoot {
    pub uid: u32,
    pub gid: u32,
}

/// The effective uid of this process.
fn effective_uid() -> std::io::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no effective uid in /proc/self/status",
            )
        })
}

/// Gives a directory on the way to container root filesystems Docker's userns-remap mode:
/// 0710, group the mapped root's gid (it can traverse, no one else but root can even list it).
/// Without a user namespace: 0700.
pub fn set_traversal_mode(dir: &Path, mapped: Option<MappedRoot>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match mapped {
        Some(m) => {
            std::os::unix::fs::chown(dir, None, Some(m.gid))?;
            0o710
        }
        None => 0o700,
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Whether `uid`/`gid` may search a directory with these attributes.
fn can_traverse(meta: &std::fs::Metadata, who: MappedRoot) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode();
    if meta.uid() == who.uid {
        mode & 0o100 != 0
    } else if meta.gid() == who.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

fn config_err(msg: String) -> NodeError {
    NodeError::Config(msg)
}

/// Makes the node's data dir safe to use, before anything is written in it:
/// - an existing one must belong to this process's user and be writable by no one else (a
///   dir another local user made, for instance in `/tmp` before the node's first start, would
///   let that user read the keys or plant links); a symbolic link must be this user's too;
/// - a new one is created 0700;
/// - then it gets mode 0710 with the mapped root's group (0700 without a user namespace), and
///   its private subdirs (`tls`, `admin`, `raft`, `net`, ...) 0700, whatever an older version
///   left;
/// - with a user namespace, every directory above it must let the mapped root through:
///   otherwise each container would fail at start with the OCI runtime's bare "permission
///   denied", so this fails now, saying which directory and what to do.
///
/// Returns the data dir's canonical path.
pub fn prepare_data_dir(dir: &Path, mapped: Option<MappedRoot>) -> Result<PathBuf, NodeError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let euid = effective_uid().map_err(NodeError::io("reading this process's user id"))?;
    let shown = dir.display();
    match std::fs::symlink_metadata(dir) {
        Ok(link) => {
            if link.file_type().is_symlink() && link.uid() != euid {
                return Err(config_err(format!(
                    "data dir {shown} is a symbolic link owned by uid {}, not by uid {euid} that runs the node: another user could point it anywhere; replace it with a directory or a link of your own",
                    link.uid()
                )));
            }
            let meta =
                std::fs::metadata(dir).map_err(NodeError::io(format!("data dir {shown}")))?;
            if !meta.is_dir() {
                return Err(config_err(format!(
                    "data dir {shown} exists and is not a directory: choose another --data-dir"
                )));
            }
            if meta.uid() != euid {
                return Err(config_err(format!(
                    "data dir {shown} is owned by uid {}, not by uid {euid} that runs the node: another local user could read the node's keys and secrets there; remove it, or chown it to uid {euid} if you made it yourself",
                    meta.uid()
                )));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(config_err(format!(
                    "data dir {shown} is writable by other users (mode {:04o}): they could replace the node's files; run chmod 0700 {shown} if its contents are yours",
                    meta.mode() & 0o7777
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_private_dir(dir)
                .map_err(NodeError::io(format!("creating the data dir {shown}")))?;
        }
        Err(e) => return Err(NodeError::io(format!("data dir {shown}"))(e)),
    }
    let canon = std::fs::canonicalize(dir).map_err(NodeError::io(format!("data dir {shown}")))?;
    if let Some(who) = mapped {
        check_reachable(&canon, who)?;
    }
    set_traversal_mode(&canon, mapped).map_err(NodeError::io(format!(
        "setting the mode of {}",
        canon.display()
    )))?;
    // Private subdirs, including those an older version made 0755 (`run` and `runtime` get
    // their modes from their owners).
    let private = std::fs::Permissions::from_mode(0o700);
    let net = canon.join("net");
    if !net.exists() {
        create_private_dir(&net).map_err(NodeError::io(format!("creating {}", net.display())))?;
    }
    let entries =
        std::fs::read_dir(&canon).map_err(NodeError::io(format!("listing {}", canon.display())))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if name == "run" || name == "runtime" || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        std::fs::set_permissions(e.path(), private.clone())
            .map_err(NodeError::io(format!("chmod 0700 {}", e.path().display())))?;
    }
    Ok(canon)
}

/// Fails, saying what to change, when a directory above `dir` (a canonical path) keeps the
/// mapped container root out.
pub fn check_reachable(dir: &Path, who: MappedRoot) -> Result<(), NodeError> {
    use std::os::unix::fs::MetadataExt;
    for anc in dir.ancestors().skip(1) {
        let meta =
            std::fs::metadata(anc).map_err(NodeError::io(format!("checking {}", anc.display())))?;
        if can_traverse(&meta, who) {
            continue;
        }
        let dir_s = dir.display();
        let anc_s = anc.display();
        return Err(config_err(format!(
            "data dir {dir_s} is below {anc_s} (mode {:04o}, owner {}:{}), which other users cannot enter: containers run as host uid {} under a user namespace and could not reach their root filesystem (every task would fail with \"permission denied\"); use a data dir under /var/lib, or run chmod o+x {anc_s}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            who.uid
        )));
    }
    Ok(())
}

pub fn read_identity(paths: &Paths) -> std::io::Result<Option<NodeIdentity>> {
    match std::fs::read(paths.identity()) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn write_identity(paths: &Paths, id: &NodeIdentity) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(id)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    write_atomic(&paths.identity(), &data, 0o600)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn write_atomic_does_not_follow_a_link_planted_at_its_temp_path() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let target = dir.path().join("tls/node.key");
        let tmp = dir.path().join("tls/.node.key.tmp.planted");
        std::fs::create_dir_all(dir.path().join("tls")).unwrap();
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();

        write_atomic_via(&target, &tmp, b"secret", 0o600).unwrap();

        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(std::fs::read(&target).unwrap(), b"secret");
        assert_eq!(mode(&target), 0o600);
        assert!(!tmp.exists() && std::fs::symlink_metadata(&tmp).is_err());
    }

    #[test]
    fn write_atomic_ignores_a_link_planted_at_the_old_predictable_temp_name() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        // Before: `node.key` and `node.pem` were both written through `node.tmp`.
        std::os::unix::fs::symlink(&victim, dir.path().join("node.tmp")).unwrap();
        write_atomic(&dir.path().join("node.key"), b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(
            std::fs::read(dir.path().join("node.key")).unwrap(),
            b"secret"
        );
    }

    #[test]
    fn write_atomic_gives_its_mode_even_over_a_stale_wider_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("ca.key");
        let tmp = dir.path().join(".ca.key.tmp.stale");
        std::fs::write(&tmp, b"old").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();

        write_atomic_via(&target, &tmp, b"key", 0o600).unwrap();
        assert_eq!(mode(&target), 0o600);
        assert_eq!(std::fs::read(&target).unwrap(), b"key");

        write_atomic(&dir.path().join("ca.pem"), b"cert", 0o644).unwrap();
        assert_eq!(mode(&dir.path().join("ca.pem")), 0o644);
    }

    #[test]
    fn write_atomic_uses_a_distinct_temp_name_per_file_and_a_private_new_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("tls/node.key");
        let tmp_a = a.with_file_name(format!(".node.key.tmp.{}", unique_suffix()));
        let tmp_b = a.with_file_name(format!(".node.key.tmp.{}", unique_suffix()));
        assert_ne!(tmp_a, tmp_b);
        write_atomic(&a, b"k", 0o600).unwrap();
        write_atomic(&dir.path().join("tls/node.pem"), b"c", 0o644).unwrap();
        assert_eq!(mode(&dir.path().join("tls")), 0o700);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("tls"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
    }

    #[test]
    fn a_mapped_root_passes_through_group_or_other_search_bits_only() {
        let dir = tempfile::tempdir().unwrap();
        let who = MappedRoot {
            uid: 100_000,
            gid: 100_000,
        };
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        for (m, ok) in [(0o700, false), (0o711, true), (0o750, false), (0o701, true)] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m)).unwrap();
            assert_eq!(
                can_traverse(&std::fs::metadata(&d).unwrap(), who),
                ok,
                "{m:o}"
            );
        }
    }
}
