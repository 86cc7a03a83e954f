//! Unpacking layer tarballs into overlay lower directories.
//!
//! OCI whiteouts are converted to overlayfs form: `.wh.NAME` becomes a 0:0 character device
//! `NAME`, and `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque=y`). Ownership is
//! shifted into the node's user-namespace range (like `dockerd --userns-remap`), so container
//! root owns its image files while the host sees only unprivileged ids.
//!
//! Nothing a layer holds can reach outside the layer directory. Every entry is applied through
//! directory descriptors: its parent directories are opened one component at a time from the
//! layer root with `O_NOFOLLOW` (missing ones are created 0755, owned by container root, as tar
//! does), and the entry itself is made with `*at` calls on (parent descriptor, name) that never
//! follow a symlink. A symlink or a non-directory where an entry needs a parent directory is
//! refused: tar would follow it, and no build tool writes a layer that needs it. Symlink
//! targets are stored as text, never resolved; hard-link sources are looked up beneath the root
//! the same way and not followed. Character and block devices are skipped (containers get a
//! deny-all device cgroup, and a device node in a host directory is a hazard): the only device
//! nodes made are the 0:0 whiteouts. Paths and link names longer than `PATH_MAX` are refused,
//! which bounds the depth of the tree.
//!
//! [`unpack_volume`] applies the same confinement to a volume archive (names taken literally,
//! no whiteouts; device nodes refused).
//!
//! [`read_in_root`] and [`ConfinedDir`] read files of an untrusted tree (an image's rootfs, an
//! unpacked image archive) with every symlink resolved inside that tree.

#![allow(unsafe_code)]

use crate::config::IdRange;
use crate::error::{IoContext, Result, RuntimeError};
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Longest entry path or link name accepted: the kernel's `PATH_MAX`.
const MAX_PATH: usize = 4096;

/// What a tar entry means for the overlay.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// `dir/.wh.name`: delete `dir/name` from lower layers.
    Whiteout(PathBuf),
    /// `dir/.wh..wh..opq`: hide everything lower layers have in `dir`.
    Opaque(PathBuf),
    /// Anything else, at this relative path.
    Normal(PathBuf),
}

fn bad(msg: String) -> RuntimeError {
    RuntimeError::BadArchive(msg)
}

/// Normalises an entry path to a safe relative path (no `..`, no root, no NUL) and classifies it.
pub fn classify(path: &Path) -> Result<EntryKind> {
    let rel = normalize(path)?;
    let name = rel
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    if name == b".wh..wh..opq" {
        return Ok(EntryKind::Opaque(parent));
    }
    if let Some(target) = name.strip_prefix(b".wh.") {
        if target.is_empty() {
            return Err(bad("empty whiteout name".into()));
        }
        if target == b"." || target == b".." {
            return Err(bad(format!(
                "whiteout of . or .. is not allowed: {}",
                path.display()
            )));
        }
        return Ok(EntryKind::Whiteout(parent.join(OsStr::from_bytes(target))));
    }
    Ok(EntryKind::Normal(rel))
}

/// Normalises an entry path to a safe relative path: no `..`, no root, no NUL (`.` and a
/// leading `/` are dropped).
fn normalize(path: &Path) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) if p.as_bytes().contains(&0) => {
                return Err(bad(format!(
                    "layer entry name contains a NUL byte: {}",
                    path.display()
                )))
            }
            Component::Normal(p) => rel.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad(format!(
                    "layer entry escapes the root: {}",
                    path.display()
                )))
            }
        }
    }
    Ok(rel)
}

/// A reader that hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// `sha256:<hex>` and byte count of everything read so far.
    pub fn finish(self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Wraps a possibly gzip-compressed stream into a plain tar stream.
pub fn decompressed(mut r: impl Read + 'static) -> Result<Box<dyn Read>> {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        let n = r.read(&mut magic[got..]).ctx(|| "read layer".into())?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = io::Cursor::new(magic[..got].to_vec());
    let chained = head.chain(r);
    if got == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(chained)))
    } else if got == 2 && magic == [0x28, 0xb5] {
        Err(RuntimeError::BadArchive(
            "zstd layers are not supported: re-export the image with gzip or plain layers".into(),
        ))
    } else {
        Ok(Box::new(chained))
    }
}

// ---- Thin wrappers over the *at system calls. None of them follows a symlink in `name`. ----

pub(crate) fn last_err() -> io::Error {
    io::Error::last_os_error()
}

pub(crate) fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(last_err())
    }
}

pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is an open descriptor; the
    // mode argument is read only with O_CREAT, and is a plain integer either way.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    if fd < 0 {
        return Err(last_err());
    }
    // SAFETY: `fd` was just returned by openat: it is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(AT_SYMLINK_NOFOLLOW)`; `None` when nothing is there.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated, `st` is writable and large enough for a `stat`.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        let e = last_err();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(Some(unsafe { st.assume_init() }))
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fd` is open, `st` is writable and large enough for a `stat`.
    check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
}

pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call. unlinkat never follows a
    // symlink in its last component.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call. The target is stored as
    // text; the kernel does not resolve it.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

fn linkat(src_dir: BorrowedFd<'_>, src: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and outlive the call. Flags 0: a symlink source
    // is linked itself, not followed.
    check(unsafe {
        libc::linkat(
            src_dir.as_raw_fd(),
            src.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            0,
        )
    })
}

fn mknodat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    dev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; mknodat fails with EEXIST on
    // anything already there, symlinks included.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) })
}

pub(crate) fn lchown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; AT_SYMLINK_NOFOLLOW changes a
    // symlink itself.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor (not O_PATH).
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode & 0o7777) })
}

fn times(mtime: u64) -> [libc::timespec; 2] {
    // Like tar-rs: a zero mtime becomes 1, which some tools handle better.
    let t = libc::timespec {
        tv_sec: libc::time_t::try_from(mtime.max(1)).unwrap_or(libc::time_t::MAX),
        tv_nsec: 0,
    };
    [t, t]
}

fn futimens(fd: BorrowedFd<'_>, mtime: u64) -> io::Result<()> {
    let ts = times(mtime);
    // SAFETY: `fd` is open and `ts` is an array of two timespecs, as futimens requires.
    check(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) })
}

fn lutimes_at(dir: BorrowedFd<'_>, name: &CStr, mtime: u64) -> io::Result<()> {
    let ts = times(mtime);
    // SAFETY: `name` is NUL-terminated, `ts` is an array of two timespecs; AT_SYMLINK_NOFOLLOW
    // sets the times of a symlink itself.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

fn set_opaque(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open directory (not O_PATH); name and value are NUL-terminated /
    // of the stated length.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    })
}

/// The names in a directory (without `.` and `..`).
pub(crate) fn list_dir(fd: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    // SAFETY: `fd` is open; F_DUPFD_CLOEXEC returns a new descriptor (or -1).
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(last_err());
    }
    // SAFETY: `dup` is an open directory descriptor that nothing else owns; on success the
    // stream owns it (closedir closes it).
    let stream = unsafe { libc::fdopendir(dup) };
    if stream.is_null() {
        let e = last_err();
        // SAFETY: fdopendir failed, so `dup` is still ours to close.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    let mut names = Vec::new();
    let res = loop {
        // SAFETY: errno is thread-local; resetting it tells end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid open directory stream.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            let e = last_err();
            break match e.raw_os_error() {
                Some(0) | None => Ok(()),
                _ => Err(e),
            };
        }
        // SAFETY: `ent` points at a dirent that stays valid until the next readdir call;
        // d_name is NUL-terminated. It is copied out at once.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` is valid and not used after this.
    unsafe { libc::closedir(stream) };
    res.map(|()| names)
}

/// Removes the directory `name` in `dir` with everything in it, through descriptors only.
fn remove_tree(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    {
        let fd = openat(
            dir,
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        for child in list_dir(fd.as_fd())? {
            match lstat_at(fd.as_fd(), &child)? {
                Some(st) if is_dir(&st) => remove_tree(fd.as_fd(), &child)?,
                Some(_) => unlinkat(fd.as_fd(), &child, 0)?,
                None => {}
            }
        }
    }
    unlinkat(dir, name, libc::AT_REMOVEDIR)
}

/// Makes room for a new entry `name` in `dir`: removes what is there (a directory
/// recursively). Returns whether anything was removed.
fn clear(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    match lstat_at(dir, name)? {
        None => Ok(false),
        Some(st) if is_dir(&st) => remove_tree(dir, name).map(|()| true),
        Some(_) => unlinkat(dir, name, 0).map(|()| true),
    }
}

/// The components of a relative path as C strings: none empty, `.`, `..`, or with NUL.
fn components(rel: &Path, entry: &Path) -> Result<Vec<CString>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(p) if p.as_bytes() != b"." && p.as_bytes() != b".." => {
                CString::new(p.as_bytes()).map_err(|_| {
                    bad(format!(
                        "layer entry name contains a NUL byte: {}",
                        entry.display()
                    ))
                })
            }
            _ => Err(bad(format!(
                "layer entry has a bad path component: {}",
                entry.display()
            ))),
        })
        .collect()
}

fn shown(comps: &[CString]) -> String {
    comps
        .iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// The layer directory being unpacked, reached only through descriptors.
struct Tree {
    /// `dest`, opened O_RDONLY|O_DIRECTORY.
    root: OwnedFd,
    /// Host id of container root: owner of directories created implicitly and of whiteouts.
    owner: u32,
    /// The last parent directory opened (most entries share their parent with the previous
    /// one). Dropped whenever anything is removed, which could detach it.
    cached: Option<(Vec<CString>, OwnedFd)>,
    /// Unpacking a volume archive ([`unpack_volume`]) rather than a layer.
    volume: bool,
    /// A volume archive's root entry (`./`) set the root's owner and mode.
    root_set: bool,
}

impl Tree {
    /// Opens the directory `comps` beneath the root (the root itself when empty), one
    /// component at a time, never following a symlink. Missing directories are created when
    /// `create` (0755, owned by container root); otherwise they are an error.
    fn walk(&self, comps: &[CString], create: bool, entry: &Path) -> Result<OwnedFd> {
        let mut cur: Option<OwnedFd> = None;
        for (i, c) in comps.iter().enumerate() {
            let dir = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            let next = match openat(dir, c, flags, 0) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    implied_dir(dir, c, self.owner)
                        .ctx(|| format!("create {} in the layer", shown(&comps[..=i])))?
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    return Err(bad(format!(
                        "layer entry {}: {} is not in the layer",
                        entry.display(),
                        shown(&comps[..=i])
                    )))
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => {
                    return Err(bad(format!(
                        "layer entry {}: {} is a symlink or a file, not a directory \
                         (a layer may not write through it)",
                        entry.display(),
                        shown(&comps[..=i])
                    )))
                }
                Err(e) => {
                    return Err(e).ctx(|| format!("open {} in the layer", shown(&comps[..=i])))
                }
            };
            cur = Some(next);
        }
        match cur {
            Some(fd) => Ok(fd),
            None => self.root.try_clone().ctx(|| "dup layer root".into()),
        }
    }

    /// The parent directory `comps` of an entry (created when missing), cached.
    fn parent(&mut self, comps: &[CString], entry: &Path) -> Result<BorrowedFd<'_>> {
        if comps.is_empty() {
            return Ok(self.root.as_fd());
        }
        let hit = matches!(&self.cached, Some((c, _)) if c.as_slice() == comps);
        if !hit {
            let fd = self.walk(comps, true, entry)?;
            self.cached = Some((comps.to_vec(), fd));
        }
        match &self.cached {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(RuntimeError::Invalid("layer parent cache is empty".into())),
        }
    }

    fn forget(&mut self, removed: bool) {
        if removed {
            self.cached = None;
        }
    }
}

/// Ids and times of an entry, ids already shifted.
struct Attrs {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: u64,
}

/// Unpacks one (uncompressed) layer tar into `dest`, shifting ownership by `shift`.
/// Returns the diff id (`sha256:` of the tar stream).
///
/// Hostile entries (see the module docs) fail with [`RuntimeError::BadArchive`]; `dest` may
/// then hold part of the layer, and the caller removes it. Nothing outside `dest` is touched.
pub fn unpack_layer(reader: impl Read, dest: &Path, shift: Option<IdRange>) -> Result<String> {
    unpack(reader, dest, shift, false).map(|(digest, _)| digest)
}

/// Unpacks a volume archive (a plain tar, as `flotilla volume export` writes) into the volume
/// data dir `dest`, with the confinement of [`unpack_layer`] and ownership shifted by `shift`.
/// Unlike a layer: names are taken literally (`.wh.x` is a file, not a whiteout), a device
/// node is refused, and the root entry (`./`) sets the owner and mode of `dest` itself
/// (otherwise `dest` ends up owned by container root).
/// Returns the `sha256:` digest and the length of the whole stream read (trailing padding
/// included), so a caller can check a copy without reading it twice.
pub fn unpack_volume(
    reader: impl Read,
    dest: &Path,
    shift: Option<IdRange>,
) -> Result<(String, u64)> {
    unpack(reader, dest, shift, true)
}

fn unpack(
    reader: impl Read,
    dest: &Path,
    shift: Option<IdRange>,
    volume: bool,
) -> Result<(String, u64)> {
    let mut hashing = HashingReader::new(io::BufReader::with_capacity(256 * 1024, reader));
    let map = |id: u64| -> u32 {
        let id = u32::try_from(id).unwrap_or(65_534);
        shift.map_or(id, |r| r.shift(id))
    };
    let root = File::open(dest).ctx(|| format!("open {}", dest.display()))?;
    let mut tree = Tree {
        root: root.into(),
        owner: map(0),
        cached: None,
        volume,
        root_set: false,
    };
    let st = fstat(tree.root.as_fd()).ctx(|| format!("stat {}", dest.display()))?;
    if !is_dir(&st) {
        return Err(RuntimeError::Invalid(format!(
            "{} is not a directory",
            dest.display()
        )));
    }
    let mut buf = vec![0u8; 128 * 1024];
    {
        let mut ar = tar::Archive::new(&mut hashing);
        for entry in ar.entries().ctx(|| "read layer".into())? {
            let mut entry = entry.ctx(|| "read layer entry".into())?;
            unpack_entry(&mut tree, &mut entry, &map, &mut buf)?;
        }
    }
    // Hash the trailing padding too, so the digest covers the whole stream.
    io::copy(&mut hashing, &mut io::sink()).ctx(|| "read layer".into())?;
    let (digest, len) = hashing.finish();
    if shift.is_some() && !tree.root_set {
        // The layer root itself: owned by container root.
        let _ = fchown(tree.root.as_fd(), tree.owner, tree.owner);
    }
    Ok((digest, len))
}

fn unpack_entry<R: Read>(
    tree: &mut Tree,
    entry: &mut tar::Entry<'_, R>,
    map: &dyn Fn(u64) -> u32,
    buf: &mut [u8],
) -> Result<()> {
    let raw = entry.path_bytes();
    if raw.len() > MAX_PATH {
        return Err(bad(format!(
            "layer entry path is longer than {MAX_PATH} bytes"
        )));
    }
    let trailing_slash = raw.ends_with(b"/");
    let path = entry.path().ctx(|| "layer entry path".into())?.into_owned();
    let kind = entry.header().entry_type();
    let owner = tree.owner;
    let classified = if tree.volume {
        EntryKind::Normal(normalize(&path)?)
    } else {
        classify(&path)?
    };
    match classified {
        EntryKind::Opaque(dir) => {
            let comps = components(&dir, &path)?;
            let Some((name, parents)) = comps.split_last() else {
                return set_opaque(tree.root.as_fd()).ctx(|| "mark the layer root opaque".into());
            };
            let p = tree.parent(parents, &path)?;
            let fd = match lstat_at(p, name).ctx(|| format!("stat {}", dir.display()))? {
                None => implied_dir(p, name, owner),
                Some(st) if is_dir(&st) => openat(
                    p,
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                ),
                Some(_) => {
                    return Err(bad(format!(
                        "layer entry {}: {} is not a directory",
                        path.display(),
                        dir.display()
                    )))
                }
            }
            .ctx(|| format!("open {}", dir.display()))?;
            set_opaque(fd.as_fd()).ctx(|| format!("mark {} opaque", dir.display()))
        }
        EntryKind::Whiteout(target) => {
            let comps = components(&target, &path)?;
            let Some((name, parents)) = comps.split_last() else {
                return Err(bad(format!("bad whiteout {}", path.display())));
            };
            if name.to_bytes().starts_with(b".wh.") {
                // aufs metadata (`.wh..wh.plnk` …): means nothing to overlayfs.
                return Ok(());
            }
            let p = tree.parent(parents, &path)?;
            let removed = clear(p, name).ctx(|| format!("remove {}", target.display()))?;
            mknodat(p, name, libc::S_IFCHR, libc::makedev(0, 0))
                .and_then(|()| lchown_at(p, name, owner, owner))
                .ctx(|| format!("whiteout {}", target.display()))?;
            tree.forget(removed);
            Ok(())
        }
        EntryKind::Normal(rel) => {
            let comps = components(&rel, &path)?;
            let h = entry.header();
            let a = Attrs {
                uid: map(h.uid().unwrap_or(0)),
                gid: map(h.gid().unwrap_or(0)),
                mode: h.mode().unwrap_or(0o644),
                mtime: h.mtime().unwrap_or(0),
            };
            let Some((name, parents)) = comps.split_last() else {
                // The root itself (`./`): a layer's owner is set at the end; a volume takes
                // the entry's owner and mode.
                if tree.volume && kind == tar::EntryType::Directory {
                    set_attrs(tree.root.as_fd(), &a)
                        .ctx(|| "set the volume root's owner".into())?;
                    tree.root_set = true;
                }
                return Ok(());
            };
            let ctx = || format!("unpack {}", rel.display());
            use tar::EntryType as T;
            match kind {
                T::Directory => {
                    let p = tree.parent(parents, &path)?;
                    let removed = directory(p, name, &a).ctx(ctx)?;
                    tree.forget(removed);
                }
                T::Regular if trailing_slash => {
                    // Old tar: a directory is a regular entry whose name ends in `/`.
                    let p = tree.parent(parents, &path)?;
                    let removed = directory(p, name, &a).ctx(ctx)?;
                    tree.forget(removed);
                }
                T::Regular | T::Continuous | T::GNUSparse | T::__Nonexhaustive(_) => {
                    let p = tree.parent(parents, &path)?;
                    let removed = clear(p, name).ctx(ctx)?;
                    tree_file(p, name, &a, entry, buf).ctx(ctx)?;
                    tree.forget(removed);
                }
                T::Symlink => {
                    let target = link_name(entry, &path)?;
                    if target.as_bytes().is_empty() {
                        return Err(bad(format!(
                            "symlink {} has an empty target",
                            path.display()
                        )));
                    }
                    let p = tree.parent(parents, &path)?;
                    let removed = clear(p, name).ctx(ctx)?;
                    symlinkat(&target, p, name)
                        .and_then(|()| lchown_at(p, name, a.uid, a.gid))
                        .and_then(|()| lutimes_at(p, name, a.mtime))
                        .ctx(ctx)?;
                    tree.forget(removed);
                }
                T::Link => {
                    let src = link_name(entry, &path)?;
                    let src_path = Path::new(OsStr::from_bytes(src.as_bytes()));
                    let src_rel = match classify(src_path)? {
                        EntryKind::Normal(p) if !p.as_os_str().is_empty() => p,
                        _ => {
                            return Err(bad(format!(
                                "hard link {} has a bad source {}",
                                path.display(),
                                src_path.display()
                            )))
                        }
                    };
                    let src_comps = components(&src_rel, &path)?;
                    let Some((src_name, src_parents)) = src_comps.split_last() else {
                        return Err(bad(format!("hard link {} has no source", path.display())));
                    };
                    let src_dir = tree.walk(src_parents, false, &path)?;
                    if lstat_at(src_dir.as_fd(), src_name).ctx(ctx)?.is_none() {
                        return Err(bad(format!(
                            "hard link {}: source {} is not in the layer",
                            path.display(),
                            src_rel.display()
                        )));
                    }
                    let p = tree.parent(parents, &path)?;
                    let removed = clear(p, name).ctx(ctx)?;
                    // The inode keeps the owner and mode of its own entry: a chown here would
                    // clear the set-id bits of the file linked to.
                    linkat(src_dir.as_fd(), src_name, p, name).ctx(ctx)?;
                    tree.forget(removed);
                }
                T::Fifo => {
                    let p = tree.parent(parents, &path)?;
                    let removed = clear(p, name).ctx(ctx)?;
                    mknodat(p, name, libc::S_IFIFO | 0o600, 0).ctx(ctx)?;
                    // A read-only, non-blocking open of a FIFO returns at once.
                    let fd = openat(
                        p,
                        name,
                        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW,
                        0,
                    )
                    .ctx(ctx)?;
                    set_attrs(fd.as_fd(), &a).ctx(ctx)?;
                    futimens(fd.as_fd(), a.mtime).ctx(ctx)?;
                    tree.forget(removed);
                }
                T::Char | T::Block if tree.volume => {
                    return Err(bad(format!(
                        "{} is a device node: a volume may not hold one",
                        path.display()
                    )));
                }
                T::Char | T::Block => {
                    tracing::debug!(entry = %path.display(), "layer device node skipped");
                }
                T::GNULongName | T::GNULongLink | T::XHeader | T::XGlobalHeader => {}
            }
            Ok(())
        }
    }
}

/// A directory tar would create for an entry's missing parent: 0755, container root's.
fn implied_dir(dir: BorrowedFd<'_>, name: &CStr, owner: u32) -> io::Result<OwnedFd> {
    mkdirat(dir, name, 0o700)?;
    let fd = openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    fchown(fd.as_fd(), owner, owner)?;
    fchmod(fd.as_fd(), 0o755)?;
    Ok(fd)
}

/// chown, then chmod: chown clears set-id bits, the recorded mode puts them back.
fn set_attrs(fd: BorrowedFd<'_>, a: &Attrs) -> io::Result<()> {
    fchown(fd, a.uid, a.gid)?;
    fchmod(fd, a.mode)
}

/// A directory entry: an existing directory is kept (its owner and mode updated), anything
/// else there is replaced. Returns whether something was removed.
fn directory(dir: BorrowedFd<'_>, name: &CStr, a: &Attrs) -> io::Result<bool> {
    let removed = match lstat_at(dir, name)? {
        Some(st) if is_dir(&st) => false,
        Some(_) => {
            unlinkat(dir, name, 0)?;
            true
        }
        None => false,
    };
    match mkdirat(dir, name, 0o700) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        r => r?,
    }
    let fd = openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    set_attrs(fd.as_fd(), a)?;
    Ok(removed)
}

/// A regular file: created anew (O_EXCL, so never through a symlink), data copied from the
/// entry, then owner, mode and mtime set on the descriptor.
fn tree_file<R: Read>(
    dir: BorrowedFd<'_>,
    name: &CStr,
    a: &Attrs,
    entry: &mut tar::Entry<'_, R>,
    buf: &mut [u8],
) -> io::Result<()> {
    let fd = openat(
        dir,
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o600,
    )?;
    let mut f = File::from(fd);
    loop {
        let n = match entry.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        f.write_all(&buf[..n])?;
    }
    set_attrs(f.as_fd(), a)?;
    futimens(f.as_fd(), a.mtime)
}

/// The link name of a symlink or hard link entry, NUL-free and at most `PATH_MAX` long.
fn link_name<R: Read>(entry: &tar::Entry<'_, R>, path: &Path) -> Result<CString> {
    let raw = entry
        .link_name_bytes()
        .ok_or_else(|| bad(format!("link {} has no target", path.display())))?;
    if raw.len() > MAX_PATH {
        return Err(bad(format!(
            "link {} has a target longer than {MAX_PATH} bytes",
            path.display()
        )));
    }
    CString::new(raw.into_owned()).map_err(|_| {
        bad(format!(
            "link {} has a target with a NUL byte",
            path.display()
        ))
    })
}

/// Unpacks the members of an image archive (`docker save`, an OCI layout as tar) into a
/// private directory, confined like [`unpack_layer`]: only directories (0700), regular files
/// (0600) and symlinks, all root's; anything else, and whiteout names, are skipped. Read the
/// result only through [`ConfinedDir`], which resolves the symlinks inside it.
pub(crate) struct ArchiveUnpacker {
    tree: Tree,
    buf: Vec<u8>,
}

impl ArchiveUnpacker {
    pub(crate) fn new(dest: &Path) -> Result<ArchiveUnpacker> {
        let root = File::open(dest).ctx(|| format!("open {}", dest.display()))?;
        Ok(ArchiveUnpacker {
            tree: Tree {
                root: root.into(),
                owner: 0,
                cached: None,
                volume: false,
                root_set: false,
            },
            buf: vec![0u8; 128 * 1024],
        })
    }

    /// Unpacks one member.
    pub(crate) fn unpack<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        if entry.path_bytes().len() > MAX_PATH {
            return Err(bad(format!(
                "archive member path is longer than {MAX_PATH} bytes"
            )));
        }
        let path = entry
            .path()
            .ctx(|| "archive member path".into())?
            .into_owned();
        let EntryKind::Normal(rel) = classify(&path)? else {
            return Ok(());
        };
        let comps = components(&rel, &path)?;
        let Some((name, parents)) = comps.split_last() else {
            return Ok(());
        };
        let kind = entry.header().entry_type();
        let mtime = entry.header().mtime().unwrap_or(0);
        let ctx = || format!("unpack archive member {}", rel.display());
        let removed = match kind {
            tar::EntryType::Directory => {
                let a = Attrs {
                    uid: 0,
                    gid: 0,
                    mode: 0o700,
                    mtime,
                };
                let p = self.tree.parent(parents, &path)?;
                directory(p, name, &a).ctx(ctx)?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let a = Attrs {
                    uid: 0,
                    gid: 0,
                    mode: 0o600,
                    mtime,
                };
                let p = self.tree.parent(parents, &path)?;
                let removed = clear(p, name).ctx(ctx)?;
                tree_file(p, name, &a, entry, &mut self.buf).ctx(ctx)?;
                removed
            }
            tar::EntryType::Symlink => {
                let target = link_name(entry, &path)?;
                let p = self.tree.parent(parents, &path)?;
                let removed = clear(p, name).ctx(ctx)?;
                symlinkat(&target, p, name).ctx(ctx)?;
                removed
            }
            _ => false,
        };
        self.tree.forget(removed);
        Ok(())
    }
}

// ---- Reading files of an untrusted tree. ----

/// A directory whose files are opened with every path resolved inside it
/// (`openat2(RESOLVE_IN_ROOT)`): `..` stops at the directory, absolute symlinks are taken
/// relative to it, magic links (`/proc/self/...`) are refused. Only regular files are
/// returned, and FIFOs cannot block the opener.
pub struct ConfinedDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl ConfinedDir {
    /// Opens `path` (itself trusted) as the root of the lookups.
    pub fn open(path: &Path) -> Result<ConfinedDir> {
        let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
        Ok(ConfinedDir {
            fd: f.into(),
            path: path.to_path_buf(),
        })
    }

    /// The path this directory was opened at (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the regular file `rel` for reading; `Ok(None)` when there is no such file.
    /// Anything else than a regular file there (a directory, a FIFO, a device) is
    /// [`RuntimeError::BadArchive`].
    pub fn open_file(&self, rel: &Path) -> Result<Option<File>> {
        let shown = rel.display();
        let name = CString::new(rel.as_os_str().as_bytes())
            .map_err(|_| bad(format!("{shown}: path contains a NUL byte")))?;
        // O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOCTTY: no terminal
        // becomes ours.
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
        let opened = crate::dirfd::openat2_in_root(self.fd.as_fd(), &name, flags);
        let f = match opened {
            Ok(Some(fd)) => File::from(fd),
            Ok(None) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                return Err(RuntimeError::HostRequirement(
                    "openat2(2) is missing: use Linux 5.6 or later".into(),
                ))
            }
            Err(e) => return Err(e).ctx(|| format!("open {shown} in {}", self.path.display())),
        };
        let st = fstat(f.as_fd()).ctx(|| format!("stat {shown}"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(bad(format!("{shown} is not a regular file")));
        }
        Ok(Some(f))
    }

    /// Reads the regular file `rel` whole, refusing one larger than `max` bytes; `Ok(None)`
    /// when there is no such file.
    pub fn read(&self, rel: &Path, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(f) = self.open_file(rel)? else {
            return Ok(None);
        };
        let mut data = Vec::new();
        f.take(max.saturating_add(1))
            .read_to_end(&mut data)
            .ctx(|| format!("read {}", rel.display()))?;
        if data.len() as u64 > max {
            return Err(bad(format!("{} is larger than {max} bytes", rel.display())));
        }
        Ok(Some(data))
    }
}

/// Reads the regular file `rel` of the tree at `root` with every symlink resolved inside
/// `root` (see [`ConfinedDir`]): `etc/passwd -> /etc/shadow` reads `root/etc/shadow`, a
/// symlink to `/dev/zero` finds nothing. `Ok(None)` when there is no such file; a file that
/// is not regular or is larger than `max` bytes is an error.
pub fn read_in_root(root: &Path, rel: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    ConfinedDir::open(root)?.read(rel, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn classifies_whiteouts() -> Result<()> {
        assert_eq!(
            classify(Path::new("etc/.wh.passwd"))?,
            EntryKind::Whiteout("etc/passwd".into())
        );
        assert_eq!(
            classify(Path::new("./.wh.x"))?,
            EntryKind::Whiteout("x".into())
        );
        assert_eq!(
            classify(Path::new("var/.wh..wh..opq"))?,
            EntryKind::Opaque("var".into())
        );
        assert_eq!(
            classify(Path::new("/bin/sh"))?,
            EntryKind::Normal("bin/sh".into())
        );
        assert!(classify(Path::new("../etc/shadow")).is_err());
        assert!(classify(Path::new("a/.wh...")).is_err(), "whiteout of ..");
        assert!(classify(Path::new(".wh..")).is_err(), "whiteout of .");
        assert!(classify(Path::new(std::ffi::OsStr::from_bytes(b"a\0b"))).is_err());
        Ok(())
    }

    fn tar_with(entries: &[(&str, &[u8])]) -> io::Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o4755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            b.append_data(&mut h, path, *data)?;
        }
        b.into_inner()
    }

    #[test]
    fn unpacks_with_shift_and_whiteouts() -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().ctx(|| "tempdir".into())?;
        let data = tar_with(&[
            ("bin/tool", b"x"),
            ("etc/.wh.gone", b""),
            ("var/.wh..wh..opq", b""),
        ])
        .ctx(|| "tar".into())?;
        let digest = unpack_layer(&data[..], dir.path(), Some(IdRange::default()))?;
        assert_eq!(
            digest,
            format!("sha256:{}", hex::encode(Sha256::digest(&data)))
        );
        let m = fs::metadata(dir.path().join("bin/tool")).ctx(|| "stat".into())?;
        assert_eq!(m.uid(), 100_000);
        assert_eq!(m.mode() & 0o7777, 0o4755, "set-uid bit survives the chown");
        let w = fs::symlink_metadata(dir.path().join("etc/gone")).ctx(|| "stat".into())?;
        assert_eq!(w.mode() & libc::S_IFMT, libc::S_IFCHR);
        assert_eq!(w.rdev(), 0);
        Ok(())
    }
}
