//! Overlay mounts for container root filesystems.
//!
//! The classic `mount(2)` option string is limited to one page (~4 KiB), which caps the number of
//! lower layers with long paths. We use the new mount API (`fsopen` + one `fsconfig("lowerdir+")`
//! per layer, Linux ≥ 6.8), which has no such limit, and fall back to `mount(2)` with the classic
//! option string on older kernels (Debian 12's 6.1, for one). When absolute layer paths do not fit
//! in that page, the layers are named through short relative symlinks (`0`, `1`, … in a private
//! directory) that the mount resolves from a thread with its own working directory, so images up
//! to overlayfs' own layer limit mount on old kernels too.

#![allow(unsafe_code)]

use crate::error::{Result, RuntimeError};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Longest option string `mount(2)` accepts (one page, minus the NUL).
pub const MAX_MOUNT_DATA: usize = 4095;

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| RuntimeError::Invalid(format!("path with NUL: {}", p.display())))
}

/// Classic overlay option string; `lowers` are top-most first.
pub fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> String {
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    )
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn mount_new_api(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    let fstype = CString::new("overlay").map_err(io::Error::other)?;
    // SAFETY: fsopen takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fsopen succeeded; we own the returned descriptor.
    let fs = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let set = |key: &str, val: &Path| -> io::Result<()> {
        let k = CString::new(key).map_err(io::Error::other)?;
        let v = CString::new(val.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: valid fs context fd and NUL-terminated key/value strings.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                k.as_ptr(),
                v.as_ptr(),
                0,
            )
        };
        if r < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    };
    for l in lowers {
        set("lowerdir+", l)?;
    }
    set("upperdir", upper)?;
    set("workdir", work)?;
    // SAFETY: CMD_CREATE takes no key/value pointers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    // SAFETY: fsmount on a created fs context; returns a new mount fd or -1.
    let m = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if m < 0 {
        return Err(errno());
    }
    // SAFETY: fsmount succeeded; we own the returned descriptor.
    let mnt = unsafe { OwnedFd::from_raw_fd(m as i32) };
    let tgt = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let empty = CString::new("").map_err(io::Error::other)?;
    // SAFETY: move the detached mount (empty path relative to its fd) onto the target path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            tgt.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Mounts an overlay at `target`. `lowers` are top-most first. `links` is a private directory
/// (created when needed) for the short layer names of the old-kernel fallback.
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    links: &Path,
) -> Result<()> {
    match mount_new_api(lowers, upper, work, target) {
        Ok(()) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) => {
            tracing::debug!(error = %e, "new mount api unavailable for overlay, using mount(2)");
        }
        Err(e) => {
            return Err(RuntimeError::Mount(format!(
                "overlay on {}: {e}",
                target.display()
            )))
        }
    }
    let opts = overlay_options(lowers, upper, work);
    if opts.len() <= MAX_MOUNT_DATA {
        return mount_classic(&opts, target);
    }
    mount_short_names(lowers, upper, work, target, links)
}

/// `mount(2)` of an overlay with a classic option string.
fn mount_classic(opts: &str, target: &Path) -> Result<()> {
    let src = CString::new("overlay").map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    let data = CString::new(opts).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    let tgt = cstr(target)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            src.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(RuntimeError::Mount(format!(
            "overlay on {}: {}",
            target.display(),
            errno()
        )));
    }
    Ok(())
}

/// Short relative names for `lowers`: `links/<i>` → layer `i` (hex), top-most first.
fn link_layers(lowers: &[PathBuf], links: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(links)
        .map_err(|e| RuntimeError::Mount(format!("create {}: {e}", links.display())))?;
    let mut names = Vec::with_capacity(lowers.len());
    for (i, layer) in lowers.iter().enumerate() {
        let name = PathBuf::from(format!("{i:x}"));
        let link = links.join(&name);
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(RuntimeError::Mount(format!(
                    "remove {}: {e}",
                    link.display()
                )))
            }
        }
        std::os::unix::fs::symlink(layer, &link)
            .map_err(|e| RuntimeError::Mount(format!("symlink {}: {e}", link.display())))?;
        names.push(name);
    }
    Ok(names)
}

/// The old-kernel fallback for many layers: `mount(2)` with layer names relative to `links`,
/// from a thread whose working directory (unshared from the process) is `links`.
fn mount_short_names(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    links: &Path,
) -> Result<()> {
    let names = link_layers(lowers, links)?;
    let opts = overlay_options(&names, upper, work);
    if opts.len() > MAX_MOUNT_DATA {
        return Err(RuntimeError::Mount(format!(
            "overlay options for {} layers are {} bytes even with short layer names, over the \
             {MAX_MOUNT_DATA}-byte limit of mount(2): use a shorter runtime root or a kernel ≥ 6.8",
            lowers.len(),
            opts.len()
        )));
    }
    tracing::debug!(
        layers = lowers.len(),
        "overlay options too long for mount(2): using short layer names"
    );
    let links = links.to_path_buf();
    let target = target.to_path_buf();
    std::thread::spawn(move || -> Result<()> {
        // SAFETY: unshare(CLONE_FS) only detaches this thread's root, cwd and umask from the rest
        // of the process; it takes no pointers. The chdir below then affects this thread alone.
        if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
            return Err(RuntimeError::Mount(format!(
                "unshare working directory: {}",
                errno()
            )));
        }
        std::env::set_current_dir(&links)
            .map_err(|e| RuntimeError::Mount(format!("chdir {}: {e}", links.display())))?;
        mount_classic(&opts, &target)
    })
    .join()
    .map_err(|_| RuntimeError::Mount("overlay mount thread panicked".into()))?
}

/// Unmounts `target` if it is mounted (lazily when busy).
pub fn unmount(target: &Path) -> Result<()> {
    let tgt = cstr(target)?;
    // SAFETY: valid NUL-terminated path.
    let r = unsafe { libc::umount2(tgt.as_ptr(), 0) };
    if r == 0 {
        return Ok(());
    }
    let e = errno();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()), // not a mount point (any more)
        Some(libc::EBUSY) => {
            // SAFETY: as above.
            let r = unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH) };
            if r == 0 {
                Ok(())
            } else {
                Err(RuntimeError::Mount(format!(
                    "unmount {}: {}",
                    target.display(),
                    errno()
                )))
            }
        }
        _ => Err(RuntimeError::Mount(format!(
            "unmount {}: {e}",
            target.display()
        ))),
    }
}

/// Mounts a tmpfs of at most `size_mib` MiB (nosuid, nodev, mode 0711, private propagation)
/// at `dir`, creating it, unless `dir` already is a tmpfs (one mounted by an earlier run of the
/// node, whose containers still use it, or a data dir that lives on a tmpfs). Returns whether
/// it mounted one.
pub fn ensure_tmpfs(dir: &Path, size_mib: u64) -> Result<bool> {
    std::fs::create_dir_all(dir)
        .map_err(|e| RuntimeError::Mount(format!("create {}: {e}", dir.display())))?;
    let tgt = cstr(dir)?;
    // SAFETY: an all-zero statfs is a valid value for the kernel to fill in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a pointer to a live, writable statfs.
    if unsafe { libc::statfs(tgt.as_ptr(), &mut st) } == 0 && st.f_type == libc::TMPFS_MAGIC {
        return Ok(false);
    }
    let opts = CString::new(format!("mode=0711,size={size_mib}m"))
        .map_err(|_| RuntimeError::Mount("tmpfs options".into()))?;
    // SAFETY: valid NUL-terminated strings; `data` is the option string tmpfs parses.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            tgt.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(RuntimeError::Mount(format!(
            "mount a tmpfs on {}: {}",
            dir.display(),
            errno()
        )));
    }
    // The mounts made under it (container roots, network namespaces) are the node's own:
    // nothing to propagate to other mount namespaces.
    // SAFETY: valid NUL-terminated path; no source, type or data for a propagation change.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            tgt.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        tracing::warn!(dir = %dir.display(), error = %errno(), "cannot make the state tmpfs private");
    }
    Ok(true)
}

/// Those of `paths` that are mount points now (one read of the mount table).
pub fn mounted_among(paths: &[PathBuf]) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let targets: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        if targets.contains(p.display().to_string().as_str()) && !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_options_order_top_first() {
        let o = overlay_options(
            &["/a".into(), "/b".into()],
            Path::new("/u"),
            Path::new("/w"),
        );
        assert_eq!(o, "lowerdir=/a:/b,upperdir=/u,workdir=/w");
    }

    #[test]
    fn short_layer_names_point_at_the_layers() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let lowers: Vec<PathBuf> = (0..20)
            .map(|i| dir.path().join(format!("layer-{i}")))
            .collect();
        let links = dir.path().join("l");
        let names = link_layers(&lowers, &links)?;
        assert_eq!(names[0], PathBuf::from("0"));
        assert_eq!(names[19], PathBuf::from("13"));
        // Idempotent: a retried create relinks.
        let again = link_layers(&lowers, &links)?;
        assert_eq!(names, again);
        for (n, l) in names.iter().zip(&lowers) {
            assert_eq!(std::fs::read_link(links.join(n)).ok().as_ref(), Some(l));
        }
        Ok(())
    }
}
