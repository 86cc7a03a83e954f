//! Unpacking layer tarballs into overlay lower directories.
//!
//! OCI whiteouts are converted to overlayfs form: `.wh.NAME` becomes a 0:0 character device
//! `NAME`, and `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque=y`). Ownership is
//! shifted into the node's user-namespace range (like `dockerd --userns-remap`), so container
//! root owns its image files while the host sees only unprivileged ids.

#![allow(unsafe_code)]

use crate::config::IdRange;
use crate::error::{IoContext, Result, RuntimeError};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

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

/// Normalises an entry path to a safe relative path (no `..`, no root) and classifies it.
pub fn classify(path: &Path) -> Result<EntryKind> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => rel.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(RuntimeError::BadArchive(format!(
                    "layer entry escapes the root: {}",
                    path.display()
                )))
            }
        }
    }
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
            return Err(RuntimeError::BadArchive("empty whiteout name".into()));
        }
        return Ok(EntryKind::Whiteout(
            parent.join(std::ffi::OsStr::from_bytes(target)),
        ));
    }
    Ok(EntryKind::Normal(rel))
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

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| RuntimeError::BadArchive(format!("path with NUL: {}", p.display())))
}

fn make_whiteout(path: &Path) -> Result<()> {
    let c = c_path(path)?;
    // SAFETY: valid NUL-terminated path; a 0:0 char device is overlayfs' whiteout marker.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
    if r != 0 {
        return Err(io::Error::last_os_error()).ctx(|| format!("whiteout {}", path.display()));
    }
    Ok(())
}

fn set_opaque(dir: &Path) -> Result<()> {
    let c = c_path(dir)?;
    let name =
        CString::new("trusted.overlay.opaque").map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    // SAFETY: valid NUL-terminated path and name; the value is a 1-byte buffer of known size.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error()).ctx(|| format!("opaque {}", dir.display()));
    }
    Ok(())
}

fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).ctx(|| format!("remove {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).ctx(|| format!("remove {}", path.display())),
        Err(_) => Ok(()),
    }
}

/// Unpacks one (uncompressed) layer tar into `dest`, shifting ownership by `shift`.
/// Returns the diff id (`sha256:` of the tar stream).
pub fn unpack_layer(reader: impl Read, dest: &Path, shift: Option<IdRange>) -> Result<String> {
    let mut hashing = HashingReader::new(reader);
    {
        let mut ar = tar::Archive::new(&mut hashing);
        ar.set_preserve_permissions(true);
        ar.set_preserve_mtime(true);
        ar.set_unpack_xattrs(false);
        ar.set_overwrite(true);
        let map = |id: u64| -> u32 {
            let id = u32::try_from(id).unwrap_or(65_534);
            shift.map_or(id, |r| r.shift(id))
        };
        let root_owner = map(0);
        for entry in ar.entries().ctx(|| "read layer".into())? {
            let mut entry = entry.ctx(|| "read layer entry".into())?;
            let path = entry.path().ctx(|| "layer entry path".into())?.into_owned();
            match classify(&path)? {
                EntryKind::Opaque(dir) => {
                    let d = dest.join(&dir);
                    fs::create_dir_all(&d).ctx(|| format!("mkdir {}", d.display()))?;
                    set_opaque(&d)?;
                }
                EntryKind::Whiteout(target) => {
                    let t = dest.join(&target);
                    if let Some(parent) = t.parent() {
                        fs::create_dir_all(parent).ctx(|| format!("mkdir {}", parent.display()))?;
                    }
                    remove_any(&t)?;
                    make_whiteout(&t)?;
                    std::os::unix::fs::lchown(&t, Some(root_owner), Some(root_owner))
                        .ctx(|| format!("chown {}", t.display()))?;
                }
                EntryKind::Normal(rel) => {
                    if rel.as_os_str().is_empty() {
                        continue;
                    }
                    let header = entry.header();
                    let uid = map(header.uid().unwrap_or(0));
                    let gid = map(header.gid().unwrap_or(0));
                    let mode = header.mode().unwrap_or(0o644);
                    let kind = header.entry_type();
                    let t = dest.join(&rel);
                    // A file replacing a directory from this same layer, or vice versa.
                    if !kind.is_dir() {
                        if let Ok(m) = fs::symlink_metadata(&t) {
                            if m.is_dir() {
                                remove_any(&t)?;
                            }
                        }
                    }
                    let unpacked = entry
                        .unpack_in(dest)
                        .ctx(|| format!("unpack {}", rel.display()))?;
                    if !unpacked {
                        continue;
                    }
                    std::os::unix::fs::lchown(&t, Some(uid), Some(gid))
                        .ctx(|| format!("chown {}", t.display()))?;
                    if !kind.is_symlink() && !kind.is_hard_link() {
                        // chown clears set-id bits; put the recorded mode back.
                        fs::set_permissions(&t, fs::Permissions::from_mode(mode & 0o7777))
                            .ctx(|| format!("chmod {}", t.display()))?;
                    }
                }
            }
        }
    }
    // Hash the trailing padding too, so the digest covers the whole stream.
    io::copy(&mut hashing, &mut io::sink()).ctx(|| "read layer".into())?;
    let (digest, _) = hashing.finish();
    if let Some(r) = shift {
        // The layer root itself: owned by container root.
        let _ = std::os::unix::fs::lchown(dest, Some(r.shift(0)), Some(r.shift(0)));
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

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
