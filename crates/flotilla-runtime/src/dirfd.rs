//! Directory descriptors for trees the node does not trust (an image's rootfs, a volume a
//! container writes to).
//!
//! A [`Dir`] is an open directory; every operation names one entry of it and never follows a
//! symlink in that name (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `O_EXCL` on creation), so no
//! symlink planted in the tree — nor one swapped in while it is read — leads outside it.
//! [`Dir::open_in_root`] resolves a path with `openat2(RESOLVE_IN_ROOT)`: `..` stops at the
//! directory and absolute symlinks are taken relative to it, as inside the container.
//! [`Dir::walk`] visits a tree iteratively (no recursion: a deep tree cannot exhaust the
//! stack), holding one descriptor per level.

#![allow(unsafe_code)]

use crate::image::layer::{
    check, fchmod, fchown, fstat, last_err, lchown_at, list_dir, lstat_at, mkdirat, openat,
    symlinkat, unlinkat,
};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A device node, FIFO or socket.
    Other,
}

/// A point in time as the kernel keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FileTime {
    pub secs: i64,
    pub nanos: i64,
}

/// The `lstat` of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    /// Permission bits, set-id and sticky bits included (`st_mode & 07777`).
    pub mode: u32,
    /// Host ids, as stored.
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub atime: FileTime,
    pub mtime: FileTime,
}

impl From<&libc::stat> for Stat {
    fn from(st: &libc::stat) -> Stat {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        Stat {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
            blocks: u64::try_from(st.st_blocks).unwrap_or(0),
            #[allow(clippy::useless_conversion)] // dev_t/nlink_t widths differ by target
            dev: u64::from(st.st_dev),
            ino: st.st_ino,
            #[allow(clippy::useless_conversion)]
            nlink: u64::from(st.st_nlink),
            atime: FileTime {
                secs: st.st_atime,
                nanos: st.st_atime_nsec,
            },
            mtime: FileTime {
                secs: st.st_mtime,
                nanos: st.st_mtime_nsec,
            },
        }
    }
}

fn cname(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single entry name"),
        ));
    }
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} contains a NUL byte"),
        )
    })
}

fn timespecs(atime: FileTime, mtime: FileTime) -> [libc::timespec; 2] {
    let ts = |t: FileTime| libc::timespec {
        tv_sec: t.secs,
        tv_nsec: t.nanos,
    };
    [ts(atime), ts(mtime)]
}

/// Sets the owner of an open file or directory (`fchown`).
pub fn set_owner(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    fchown(fd.as_fd(), uid, gid)
}

/// Sets the permission bits of an open file or directory (`fchmod`; set after the owner,
/// since a chown clears set-id bits).
pub fn set_mode(fd: impl AsFd, mode: u32) -> io::Result<()> {
    fchmod(fd.as_fd(), mode)
}

/// Sets the access and modification times of an open file or directory (`futimens`).
pub fn set_times(fd: impl AsFd, atime: FileTime, mtime: FileTime) -> io::Result<()> {
    let ts = timespecs(atime, mtime);
    // SAFETY: the descriptor is open and `ts` is an array of two timespecs, as futimens
    // requires.
    check(unsafe { libc::futimens(fd.as_fd().as_raw_fd(), ts.as_ptr()) })
}

/// `struct open_how` of openat2(2): the kernel's ABI, three u64 fields.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, name, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`: every
/// symlink on the way resolved inside `dir`, `..` stopping at it, no magic links, no other
/// mount. `Ok(None)` when nothing is there, a component is not a directory, a link loops, or
/// the way leaves the mount; other errors (ENOSYS on kernels before 5.6 among them) as they
/// are.
pub(crate) fn openat2_in_root(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    flags: libc::c_int,
) -> io::Result<Option<OwnedFd>> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV,
    };
    // SAFETY: `name` is NUL-terminated and `how` is an open_how whose size is passed; the
    // syscall returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let e = last_err();
        return match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV) => Ok(None),
            _ => Err(e),
        };
    }
    let fd = libc::c_int::try_from(fd)
        .map_err(|_| io::Error::other("openat2 returned a bad descriptor"))?;
    // SAFETY: `fd` was just returned by openat2: it is open and owned by nobody else.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// One step of [`Dir::walk`]. `path` is relative to the walked directory; `parent` is the
/// directory holding `name`.
pub enum Event<'a> {
    /// A directory, before its entries; `dir` is it, opened.
    Enter {
        parent: &'a Dir,
        name: &'a OsStr,
        path: &'a Path,
        stat: &'a Stat,
        dir: &'a Dir,
    },
    /// A directory, after its entries.
    Leave {
        parent: &'a Dir,
        name: &'a OsStr,
        path: &'a Path,
        stat: &'a Stat,
    },
    /// Anything that is not a directory (symlinks are not followed).
    Entry {
        parent: &'a Dir,
        name: &'a OsStr,
        path: &'a Path,
        stat: &'a Stat,
    },
}

impl<'a> Event<'a> {
    /// The entry this event first reaches, as (parent, name, path, stat): a directory on
    /// [`Event::Enter`], anything else on [`Event::Entry`]; `None` on [`Event::Leave`].
    pub fn reached(&self) -> Option<(&'a Dir, &'a OsStr, &'a Path, &'a Stat)> {
        match *self {
            Event::Enter {
                parent,
                name,
                path,
                stat,
                ..
            }
            | Event::Entry {
                parent,
                name,
                path,
                stat,
            } => Some((parent, name, path, stat)),
            Event::Leave { .. } => None,
        }
    }
}

fn at_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// An open directory (`O_RDONLY|O_DIRECTORY`).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Dir {
    /// Opens a directory the caller trusts the path of (symlinks in it are followed).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let f = File::open(path)?;
        let st = fstat(f.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Dir { fd: f.into() })
    }

    /// Opens the directory `rel` beneath this one with every symlink resolved inside it
    /// (`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`). `Ok(None)` when
    /// nothing is there, it is not a directory, or the way to it leaves this directory's
    /// mount.
    pub fn open_in_root(&self, rel: &Path) -> io::Result<Option<Dir>> {
        let comps: PathBuf = rel
            .components()
            .filter(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
            .collect();
        if comps.as_os_str().is_empty() {
            return self.try_clone().map(Some);
        }
        let name = CString::new(comps.as_os_str().as_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} contains a NUL byte", rel.display()),
            )
        })?;
        Ok(
            openat2_in_root(self.fd.as_fd(), &name, libc::O_RDONLY | libc::O_DIRECTORY)?
                .map(|fd| Dir { fd }),
        )
    }

    /// A second descriptor of this directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// The directory's own `stat`.
    pub fn stat(&self) -> io::Result<Stat> {
        fstat(self.fd.as_fd()).map(|st| Stat::from(&st))
    }

    /// The `lstat` of entry `name`; `None` when there is none.
    pub fn lstat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        Ok(lstat_at(self.fd.as_fd(), &cname(name)?)?.map(|st| Stat::from(&st)))
    }

    /// The entry names (without `.` and `..`).
    pub fn entries(&self) -> io::Result<Vec<OsString>> {
        // A fresh open file description: a duplicate of `fd` would share its directory
        // offset, and a second listing would start where the first one ended.
        let fresh = openat(
            self.fd.as_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        Ok(list_dir(fresh.as_fd())?
            .into_iter()
            .map(|c| OsString::from_vec(c.into_bytes()))
            .collect())
    }

    /// Whether the directory has no entries.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.entries()?.is_empty())
    }

    /// Opens the subdirectory `name`; a symlink there fails (`ELOOP`/`ENOTDIR`).
    pub fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        let fd = openat(
            self.fd.as_fd(),
            &cname(name)?,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        Ok(Dir { fd })
    }

    /// Opens the regular file `name` for reading. A symlink, FIFO, device or directory there
    /// fails (opening never blocks and never takes a terminal).
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        let fd = openat(
            self.fd.as_fd(),
            &cname(name)?,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )?;
        let st = fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a regular file"),
            ));
        }
        Ok(File::from(fd))
    }

    /// Creates the regular file `name` (it must not exist: never through a symlink), write
    /// only, with permission bits `mode` (before the umask).
    pub fn create_file(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let fd = openat(
            self.fd.as_fd(),
            &cname(name)?,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            mode,
        )?;
        Ok(File::from(fd))
    }

    /// Creates the directory `name` (it must not exist) and opens it.
    pub fn create_dir(&self, name: &OsStr, mode: u32) -> io::Result<Dir> {
        let c = cname(name)?;
        mkdirat(self.fd.as_fd(), &c, mode)?;
        let fd = openat(
            self.fd.as_fd(),
            &c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        Ok(Dir { fd })
    }

    /// The target of the symlink `name`, as stored (never resolved).
    pub fn read_link(&self, name: &OsStr) -> io::Result<OsString> {
        let c = cname(name)?;
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: `c` is NUL-terminated; `buf` is writable for `buf.len()` bytes and
            // readlinkat writes at most that many.
            let n = unsafe {
                libc::readlinkat(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            let n = usize::try_from(n).map_err(|_| last_err())?;
            if n < buf.len() {
                buf.truncate(n);
                return Ok(OsString::from_vec(buf));
            }
            if buf.len() >= 1 << 20 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("symlink {name:?} has an overlong target"),
                ));
            }
            buf.resize(buf.len() * 2, 0);
        }
    }

    /// Creates the symlink `name` with the text `target`.
    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> io::Result<()> {
        let t = CString::new(target.as_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("symlink target {target:?} contains a NUL byte"),
            )
        })?;
        symlinkat(&t, self.fd.as_fd(), &cname(name)?)
    }

    /// Sets the owner of the entry `name` itself (a symlink is not followed).
    pub fn set_owner_at(&self, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
        lchown_at(self.fd.as_fd(), &cname(name)?, uid, gid)
    }

    /// Sets the times of the entry `name` itself (a symlink is not followed).
    pub fn set_times_at(&self, name: &OsStr, atime: FileTime, mtime: FileTime) -> io::Result<()> {
        let c = cname(name)?;
        let ts = timespecs(atime, mtime);
        // SAFETY: `c` is NUL-terminated and `ts` is an array of two timespecs;
        // AT_SYMLINK_NOFOLLOW sets the times of a symlink itself.
        check(unsafe {
            libc::utimensat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    /// Renames the entry `from` to `to` within this directory (replacing `to` unless it is a
    /// non-empty directory).
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        let (f, t) = (cname(from)?, cname(to)?);
        // SAFETY: both names are NUL-terminated and outlive the call; renameat acts on the
        // entries themselves and follows no symlink in them.
        check(unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                f.as_ptr(),
                self.fd.as_raw_fd(),
                t.as_ptr(),
            )
        })
    }

    /// Removes the entry `name`: a file or symlink is unlinked (never followed), a directory
    /// removed with everything in it. Nothing there is fine.
    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        let c = cname(name)?;
        match lstat_at(self.fd.as_fd(), &c)? {
            None => Ok(()),
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                self.open_dir(name)?.clear()?;
                unlinkat(self.fd.as_fd(), &c, libc::AT_REMOVEDIR)
            }
            Some(_) => unlinkat(self.fd.as_fd(), &c, 0),
        }
    }

    /// Removes everything in this directory (the directory itself stays).
    pub fn clear(&self) -> io::Result<()> {
        self.walk(|ev| match ev {
            Event::Enter { .. } => Ok(()),
            Event::Entry { parent, name, .. } => {
                unlinkat(parent.fd.as_fd(), &cname(name)?, 0).or_else(ignore_missing)
            }
            Event::Leave { parent, name, .. } => {
                unlinkat(parent.fd.as_fd(), &cname(name)?, libc::AT_REMOVEDIR)
                    .or_else(ignore_missing)
            }
        })
    }

    /// Visits every entry beneath this directory, depth first: `Enter` and `Leave` around a
    /// directory's entries, `Entry` for the rest. Symlinks are reported, never followed; an
    /// entry that vanishes meanwhile is skipped. An error from `f` stops the walk.
    pub fn walk(&self, mut f: impl FnMut(Event<'_>) -> io::Result<()>) -> io::Result<()> {
        struct Frame {
            dir: Dir,
            name: OsString,
            stat: Stat,
            pending: std::vec::IntoIter<OsString>,
        }
        let mut stack: Vec<Frame> = Vec::new();
        let mut top = self.entries()?.into_iter();
        let mut path = PathBuf::new();
        loop {
            let next = match stack.last_mut() {
                Some(fr) => fr.pending.next(),
                None => top.next(),
            };
            let Some(name) = next else {
                let Some(fr) = stack.pop() else {
                    return Ok(());
                };
                let parent = stack.last().map_or(self, |p| &p.dir);
                drop(fr.dir);
                f(Event::Leave {
                    parent,
                    name: &fr.name,
                    path: &path,
                    stat: &fr.stat,
                })?;
                path.pop();
                continue;
            };
            let parent = stack.last().map_or(self, |p| &p.dir);
            path.push(&name);
            let st = match parent.lstat(&name) {
                Ok(Some(st)) => st,
                Ok(None) => {
                    path.pop();
                    continue;
                }
                Err(e) => return Err(at_path(e, &path)),
            };
            if st.kind != Kind::Dir {
                f(Event::Entry {
                    parent,
                    name: &name,
                    path: &path,
                    stat: &st,
                })?;
                path.pop();
                continue;
            }
            let dir = match parent.open_dir(&name) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    path.pop();
                    continue;
                }
                Err(e) => return Err(at_path(e, &path)),
            };
            // The directory opened, which is what the walk descends into.
            let st = dir.stat().map_err(|e| at_path(e, &path))?;
            f(Event::Enter {
                parent,
                name: &name,
                path: &path,
                stat: &st,
                dir: &dir,
            })?;
            let pending = dir.entries().map_err(|e| at_path(e, &path))?.into_iter();
            stack.push(Frame {
                dir,
                name,
                stat: st,
                pending,
            });
        }
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn walks_without_following_and_removes_only_links() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        let outside = t.path().join("outside");
        fs::create_dir(&outside)?;
        fs::write(outside.join("keep"), b"x")?;
        let v = t.path().join("v");
        fs::create_dir_all(v.join("a/b"))?;
        fs::write(v.join("a/b/f"), b"data")?;
        symlink(&outside, v.join("a/out"))?;
        symlink("/", v.join("root"))?;
        let d = Dir::open(&v)?;
        let mut seen = Vec::new();
        d.walk(|ev| {
            match ev {
                Event::Enter { path, .. } => seen.push(format!("+{}", path.display())),
                Event::Leave { path, .. } => seen.push(format!("-{}", path.display())),
                Event::Entry { path, stat, .. } => {
                    seen.push(format!("{}:{:?}", path.display(), stat.kind))
                }
            }
            Ok(())
        })?;
        seen.sort();
        assert_eq!(
            seen,
            [
                "+a",
                "+a/b",
                "-a",
                "-a/b",
                "a/b/f:File",
                "a/out:Symlink",
                "root:Symlink"
            ]
        );
        assert!(d.open_dir(OsStr::new("root")).is_err(), "no following");
        assert!(d.open_file(OsStr::new("root")).is_err());
        assert!(d.lstat(OsStr::new("../x")).is_err(), "one name only");
        d.clear()?;
        assert!(d.is_empty()?);
        assert!(outside.join("keep").is_file(), "link target untouched");
        Ok(())
    }

    #[test]
    fn open_in_root_stays_inside() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        let root = t.path().join("root");
        fs::create_dir_all(root.join("etc/inner"))?;
        fs::create_dir_all(t.path().join("etc/host-only"))?;
        symlink("/etc", root.join("abs"))?;
        symlink("../../..", root.join("up"))?;
        let d = Dir::open(&root)?;
        let abs = d.open_in_root(Path::new("/abs"))?.map(|x| x.entries());
        assert_eq!(abs.transpose()?, Some(vec![OsString::from("inner")]));
        let up = d.open_in_root(Path::new("up/etc"))?.map(|x| x.entries());
        assert_eq!(up.transpose()?, Some(vec![OsString::from("inner")]));
        assert!(d.open_in_root(Path::new("missing"))?.is_none());
        Ok(())
    }
}
