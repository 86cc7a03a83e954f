//! The incremental copy of a volume (`volume move`'s two passes).
//!
//! The first pass is a full export ([`VolumeStore::export_tracked`](crate::VolumeStore::export_tracked))
//! that also records, for every entry it wrote, a [`Snapshot`]: the path, and for a regular file
//! the `fstat` taken before its data was read (inode, size, mtime, ctime, mode, owner). The
//! final pass ([`VolumeStore::export_changes`](crate::VolumeStore::export_changes)) sends a
//! *delta stream*:
//!
//! ```text
//! MAGIC                      b"flotilla-volume-delta/1\n"
//! u64, big-endian            length of the deletion list
//! deletion list              paths (relative to the data dir) each followed by a NUL
//! tar                        as `export` writes it: the root entry, every directory and
//!                            symlink, and the regular files whose stat differs from the
//!                            snapshot (or that the snapshot marks racy)
//! ```
//!
//! A file counts as unchanged only when inode, size, mtime, ctime, mode and owner are all
//! equal. ctime is set by the kernel on every write, truncate, chmod, chown or utimes and
//! cannot be set back by a process, so a container cannot hide a change by restoring the
//! mtime. The kernel stamps times with a coarse clock: a write within the same tick as the
//! first pass's `fstat` could leave every field equal, so a file whose ctime was less than
//! [`RACY`] old when it was read is sent again whatever its stat says (git's "racily clean"
//! rule). Granularity is whole files: a changed file is sent whole.
//!
//! The target ([`VolumeStore::apply_changes`](crate::VolumeStore::apply_changes)) treats the
//! stream as hostile: every deletion path is checked before anything is deleted (relative,
//! no empty, `.` or `..` component, not the root) and resolved one component at a time
//! through directory descriptors that never follow a symlink (a symlink on the way is
//! refused, the last component is unlinked, never followed); the tar goes through the same
//! confined unpacker as an import.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_runtime::dirfd::Dir;

use crate::error::{Result, VolumeError};

/// The first bytes of a delta stream.
pub const MAGIC: &[u8] = b"flotilla-volume-delta/1\n";

/// The longest deletion list a target reads.
pub const MAX_DELETIONS_BYTES: u64 = 64 << 20;

/// A file whose ctime is younger than this when the first pass reads it is sent again.
pub const RACY: Duration = Duration::from_secs(2);

/// What a regular file looked like when the first pass read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileState {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
    uid: u32,
    gid: u32,
}

impl FileState {
    pub(crate) fn of(m: &std::fs::Metadata) -> FileState {
        FileState {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }
    }

    /// Whether the file changed so recently that an equal stat proves nothing.
    fn racy(&self, now: SystemTime) -> bool {
        let ctime = u64::try_from(self.ctime.0)
            .ok()
            .map(|s| UNIX_EPOCH + Duration::new(s, u32::try_from(self.ctime.1).unwrap_or(0)));
        match ctime {
            Some(c) => now.duration_since(c).map_or(true, |age| age < RACY),
            None => true,
        }
    }
}

/// One entry a first pass wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A directory or symlink (always sent again: a header only).
    Other,
    /// A regular file as read; `racy`: to be sent again whatever its stat.
    File { state: FileState, racy: bool },
}

/// The entries a first pass wrote (relative path bytes → what was read), kept by the source
/// node until the final pass.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub(crate) entries: HashMap<Vec<u8>, Seen>,
}

impl Snapshot {
    pub(crate) fn record_other(&mut self, path: &[u8]) {
        self.entries.insert(path.to_vec(), Seen::Other);
    }

    pub(crate) fn record_file(&mut self, path: &[u8], state: FileState, now: SystemTime) {
        let racy = state.racy(now);
        self.entries
            .insert(path.to_vec(), Seen::File { state, racy });
    }

    /// Whether the file at `path`, now `state`, must be sent again.
    pub(crate) fn file_changed(&self, path: &[u8], state: &FileState) -> bool {
        match self.entries.get(path) {
            Some(Seen::File { state: old, racy }) => *racy || old != state,
            _ => true,
        }
    }

    /// Entries recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Writes the head of a delta stream: the magic and the deletion list.
pub(crate) fn write_head(w: &mut impl Write, deleted: &[Vec<u8>]) -> io::Result<()> {
    let len: u64 = deleted.iter().map(|p| p.len() as u64 + 1).sum();
    w.write_all(MAGIC)?;
    w.write_all(&len.to_be_bytes())?;
    for p in deleted {
        w.write_all(p)?;
        w.write_all(&[0])?;
    }
    Ok(())
}

/// Reads the head of a delta stream: the deletion paths, each checked ([`check_path`]).
pub fn read_head(r: &mut impl Read) -> Result<Vec<Vec<u8>>> {
    let bad = |m: String| VolumeError::BadArchive(m);
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic)
        .map_err(|e| bad(format!("delta stream: {e}")))?;
    if magic != MAGIC {
        return Err(bad("not a volume delta stream (bad magic)".into()));
    }
    let mut len = [0u8; 8];
    r.read_exact(&mut len)
        .map_err(|e| bad(format!("delta stream: {e}")))?;
    let len = u64::from_be_bytes(len);
    if len > MAX_DELETIONS_BYTES {
        return Err(bad(format!(
            "delta stream: a deletion list of {len} bytes (the most is {MAX_DELETIONS_BYTES})"
        )));
    }
    let mut list = Vec::new();
    r.take(len)
        .read_to_end(&mut list)
        .map_err(|e| bad(format!("delta stream: {e}")))?;
    if list.len() as u64 != len {
        return Err(bad("delta stream: the deletion list is cut short".into()));
    }
    if list.last().is_some_and(|b| *b != 0) {
        return Err(bad(
            "delta stream: the deletion list does not end with a NUL".into(),
        ));
    }
    let mut out = Vec::new();
    if !list.is_empty() {
        for p in list[..list.len() - 1].split(|b| *b == 0) {
            check_path(p)?;
            out.push(p.to_vec());
        }
    }
    Ok(out)
}

/// Checks a deletion path: relative, components neither empty nor `.` nor `..`, not the
/// root.
pub fn check_path(p: &[u8]) -> Result<()> {
    let refuse = |why: &str| {
        Err(VolumeError::BadArchive(format!(
            "delta deletes {:?}: {why}",
            String::from_utf8_lossy(p)
        )))
    };
    if p.is_empty() {
        return refuse("an empty path (the volume root is never deleted)");
    }
    if p.starts_with(b"/") {
        return refuse("an absolute path");
    }
    if p.len() > 4096 {
        return refuse("a path longer than 4096 bytes");
    }
    for c in p.split(|b| *b == b'/') {
        match c {
            b"" => return refuse("an empty path component"),
            b"." | b".." => return refuse("a `.` or `..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// Deletes `p` (checked by [`check_path`]) beneath `root`: each parent is opened without
/// following a symlink (one there is refused), the last component is removed as it is (a
/// symlink unlinked, a directory with its contents). A path already gone is fine.
pub(crate) fn delete_in(root: &Dir, p: &[u8]) -> Result<()> {
    check_path(p)?;
    let comps: Vec<&OsStr> = p.split(|b| *b == b'/').map(OsStr::from_bytes).collect();
    let Some((last, parents)) = comps.split_last() else {
        return Ok(());
    };
    let shown = || String::from_utf8_lossy(p).into_owned();
    let mut cur: Option<Dir> = None;
    for c in parents {
        let dir = cur.as_ref().unwrap_or(root);
        match dir.lstat(c) {
            Ok(None) => return Ok(()),
            Ok(Some(st)) if st.kind == flotilla_runtime::dirfd::Kind::Dir => {}
            Ok(Some(st)) if st.kind == flotilla_runtime::dirfd::Kind::Symlink => {
                return Err(VolumeError::BadArchive(format!(
                    "delta deletes {}: {} on the way is a symlink (a deletion never follows one)",
                    shown(),
                    c.to_string_lossy()
                )))
            }
            // A file where a directory was: what was beneath it is gone already.
            Ok(Some(_)) => return Ok(()),
            Err(e) => {
                return Err(VolumeError::Io {
                    context: format!("delete {}", shown()),
                    source: e,
                })
            }
        }
        let next = dir.open_dir(c).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) {
                VolumeError::BadArchive(format!(
                    "delta deletes {}: {} on the way is not a directory",
                    shown(),
                    c.to_string_lossy()
                ))
            } else {
                VolumeError::Io {
                    context: format!("delete {}", shown()),
                    source: e,
                }
            }
        })?;
        cur = Some(next);
    }
    cur.as_ref()
        .unwrap_or(root)
        .remove(last)
        .map_err(|e| VolumeError::Io {
            context: format!("delete {}", shown()),
            source: e,
        })
}

/// A reader that hashes (SHA-256) and counts what passes through it.
pub(crate) struct Hashing<R> {
    pub(crate) inner: R,
    pub(crate) hasher: sha2::Sha256,
    pub(crate) count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_paths_are_checked() {
        for ok in [&b"a"[..], b"a/b", b"a.b/..c", b".hidden"] {
            assert!(check_path(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"..",
            b"../x",
            b"a/../../x",
            b"a//b",
            b"a/./b",
            b".",
            b"a/",
        ] {
            assert!(
                matches!(check_path(bad), Err(VolumeError::BadArchive(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_head_round_trips_and_hostile_heads_are_refused() {
        let mut buf = Vec::new();
        write_head(&mut buf, &[b"a/b".to_vec(), b"c".to_vec()]).unwrap();
        buf.extend_from_slice(b"rest");
        let mut r = &buf[..];
        assert_eq!(
            read_head(&mut r).unwrap(),
            vec![b"a/b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(r, b"rest");

        let head = |list: &[u8]| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&(list.len() as u64).to_be_bytes());
            b.extend_from_slice(list);
            b
        };
        for bad in [
            head(b"../etc\0"),
            head(b"/etc\0"),
            head(b"a\0\0"),
            head(b"a"),
            b"not a delta".to_vec(),
        ] {
            assert!(read_head(&mut &bad[..]).is_err(), "{bad:?}");
        }
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(read_head(&mut &huge[..]).is_err());
        let mut short = MAGIC.to_vec();
        short.extend_from_slice(&10u64.to_be_bytes());
        short.extend_from_slice(b"ab\0");
        assert!(read_head(&mut &short[..]).is_err());
    }
}
