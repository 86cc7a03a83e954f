//! Copy-up: populating an empty volume from the image's content at its mount point, as Docker
//! does for a new named volume ([`crate::BindMount::copy_up`]).
//!
//! The image is untrusted. The mount point is resolved inside the container's assembled rootfs
//! (`openat2(RESOLVE_IN_ROOT)`, as the OCI runtime resolves it), so `dst -> /etc` copies the
//! image's `/etc` and `dst -> ../../..` stops at the rootfs; below it, the tree is read
//! through directory descriptors that never follow a symlink (symlinks are copied as links).
//! Everything is written through descriptors of the volume dir with `O_EXCL`/`O_NOFOLLOW`.
//! Owners are copied as they are: the layers are already shifted into the container's id
//! range. Devices, FIFOs and sockets are skipped; hard links become copies; extended
//! attributes are not copied.

use crate::dirfd::{self, Dir, Event, Kind};
use crate::error::{IoContext, Result};
use std::io;
use std::path::Path;

/// What a copy-up did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CopyUp {
    /// The volume dir already held something: nothing was copied.
    pub kept: bool,
    /// Entries copied (0 when the image has nothing at the mount point).
    pub entries: u64,
    pub bytes: u64,
}

/// Copies the image's content at `dst` (a path inside the container) from `rootfs` into the
/// host directory `volume` when `volume` is empty. On failure `volume` is emptied again, so a
/// retry copies afresh.
pub(crate) fn copy_up(rootfs: &Path, dst: &Path, volume: &Path) -> Result<CopyUp> {
    let vol = Dir::open(volume).ctx(|| format!("open volume dir {}", volume.display()))?;
    if !vol
        .is_empty()
        .ctx(|| format!("list volume dir {}", volume.display()))?
    {
        return Ok(CopyUp {
            kept: true,
            ..Default::default()
        });
    }
    let root = Dir::open(rootfs).ctx(|| format!("open rootfs {}", rootfs.display()))?;
    let Some(src) = root
        .open_in_root(dst)
        .ctx(|| format!("resolve {} in the image", dst.display()))?
    else {
        return Ok(CopyUp::default());
    };
    let mut done = CopyUp::default();
    let res = copy_tree(&src, &vol, &mut done).ctx(|| {
        format!(
            "copy the image's {} into {}",
            dst.display(),
            volume.display()
        )
    });
    if res.is_err() {
        if let Err(e) = vol.clear() {
            tracing::warn!(volume = %volume.display(), error = %e,
                "cannot empty the volume dir after a failed copy-up");
        }
    }
    res.map(|()| done)
}

fn copy_tree(src: &Dir, vol: &Dir, done: &mut CopyUp) -> io::Result<()> {
    // The destination directories matching the walk's open ones.
    let mut dsts: Vec<Dir> = Vec::new();
    src.walk(|ev| {
        let cur = dsts.last().unwrap_or(vol);
        match ev {
            Event::Enter { name, stat, .. } => {
                let d = cur.create_dir(name, 0o700)?;
                dirfd::set_owner(&d, stat.uid, stat.gid)?;
                dirfd::set_mode(&d, stat.mode)?;
                done.entries += 1;
                dsts.push(d);
            }
            Event::Leave { stat, .. } => {
                if let Some(d) = dsts.pop() {
                    dirfd::set_times(&d, stat.atime, stat.mtime)?;
                }
            }
            Event::Entry {
                parent, name, stat, ..
            } => match stat.kind {
                Kind::File => {
                    let mut from = parent.open_file(name)?;
                    let mut to = cur.create_file(name, 0o600)?;
                    done.bytes += io::copy(&mut from, &mut to)?;
                    dirfd::set_owner(&to, stat.uid, stat.gid)?;
                    dirfd::set_mode(&to, stat.mode)?;
                    dirfd::set_times(&to, stat.atime, stat.mtime)?;
                    done.entries += 1;
                }
                Kind::Symlink => {
                    let target = parent.read_link(name)?;
                    cur.symlink(&target, name)?;
                    cur.set_owner_at(name, stat.uid, stat.gid)?;
                    cur.set_times_at(name, stat.atime, stat.mtime)?;
                    done.entries += 1;
                }
                Kind::Dir | Kind::Other => {
                    tracing::debug!(entry = ?name, "copy-up skips a device, FIFO or socket");
                }
            },
        }
        Ok(())
    })?;
    // The volume's root takes the owner and mode of the image's directory.
    let st = src.stat()?;
    dirfd::set_owner(vol, st.uid, st.gid)?;
    dirfd::set_mode(vol, st.mode)?;
    dirfd::set_times(vol, st.atime, st.mtime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    #[test]
    fn copies_content_and_never_leaves_the_rootfs() -> Result<()> {
        let t = tempfile::tempdir().ctx(|| "tempdir".into())?;
        let io = |r: io::Result<()>| r.ctx(|| "setup".into());
        let rootfs = t.path().join("rootfs");
        io(fs::create_dir_all(rootfs.join("data/sub")))?;
        io(fs::write(rootfs.join("data/sub/f"), b"hello"))?;
        io(fs::set_permissions(
            rootfs.join("data/sub/f"),
            fs::Permissions::from_mode(0o640),
        ))?;
        io(std::os::unix::fs::chown(
            rootfs.join("data/sub/f"),
            Some(1234),
            Some(4321),
        ))?;
        io(symlink("/etc/passwd", rootfs.join("data/link")))?;
        io(symlink("/etc", rootfs.join("evil")))?;
        io(symlink("../../..", rootfs.join("up")))?;
        // The host's side: a marker that must never be copied.
        io(fs::create_dir_all(t.path().join("etc")))?;
        io(fs::write(t.path().join("etc/host-marker"), b"host"))?;
        io(fs::create_dir_all(rootfs.join("etc")))?;
        io(fs::write(rootfs.join("etc/image-file"), b"img"))?;

        let vol = t.path().join("vol");
        io(fs::create_dir(&vol))?;
        let got = copy_up(&rootfs, Path::new("/data"), &vol)?;
        assert_eq!((got.kept, got.entries, got.bytes), (false, 3, 5));
        let m = fs::metadata(vol.join("sub/f")).ctx(|| "stat".into())?;
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (1234, 4321, 0o640),
            "owner and mode kept"
        );
        let l = fs::read_link(vol.join("link")).ctx(|| "readlink".into())?;
        assert_eq!(l, Path::new("/etc/passwd"), "symlink copied as a link");

        // Not empty: kept.
        let again = copy_up(&rootfs, Path::new("/data"), &vol)?;
        assert!(again.kept);

        for dst in ["/evil", "/up/etc", "/missing"] {
            let v = t.path().join(format!("v{}", dst.replace('/', "-")));
            io(fs::create_dir(&v))?;
            copy_up(&rootfs, Path::new(dst), &v)?;
            assert!(!v.join("host-marker").exists(), "{dst}: host file copied");
            let names: Vec<_> = fs::read_dir(&v)
                .ctx(|| "list".into())?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(
                names.is_empty() || names == ["image-file"],
                "{dst}: only the image's /etc: {names:?}"
            );
        }
        Ok(())
    }
}
