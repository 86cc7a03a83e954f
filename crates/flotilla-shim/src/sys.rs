//! Thin wrappers over the few raw syscalls the shim needs. Every `unsafe` block is here.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `fork()`: `Ok(None)` in the child, `Ok(Some(pid))` in the parent.
/// Only call while the process is single-threaded.
pub fn fork() -> io::Result<Option<i32>> {
    // SAFETY: the shim calls this before it creates any thread, so the child inherits a
    // consistent address space (no lock can be held by a vanished thread).
    let pid = cvt(unsafe { libc::fork() })?;
    Ok(if pid == 0 { None } else { Some(pid) })
}

/// Starts a new session so the shim leaves the agent's process group and terminal.
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid has no memory-safety preconditions.
    cvt(unsafe { libc::setsid() }).map(|_| ())
}

/// Makes orphaned descendants (the container init once runc exits) our children.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument and touches no memory of ours.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) })
        .map(|_| ())
}

/// A pipe with both ends close-on-exec: (read, write).
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two ints as pipe2 requires.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets O_NONBLOCK on a descriptor.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take no pointers.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(|_| ())
}

static SIGCHLD_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_sig: libc::c_int) {
    let fd = SIGCHLD_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid one-byte local. A full
        // pipe (EAGAIN) is fine: a wake-up is already pending.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

/// Installs a SIGCHLD handler that writes a byte to `notify` (the write end of a non-blocking
/// self-pipe), so the poll loop wakes up when a child changes state.
pub fn install_sigchld(notify: &OwnedFd) -> io::Result<()> {
    SIGCHLD_FD.store(notify.as_raw_fd(), Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is a valid starting value; we fill the handler and flags, and
    // the handler only performs async-signal-safe work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
        libc::sigemptyset(&mut sa.sa_mask);
        cvt(libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()))?;
    }
    Ok(())
}

/// Reaps one terminated child without blocking: `(pid, raw wait status)`.
pub fn reap_any() -> Option<(i32, i32)> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

/// Waits (blocking) for a specific child.
pub fn wait_pid(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Decodes a wait status into (exit code, killing signal). Killed by a signal gives 128+sig.
pub fn decode_status(status: i32) -> (i32, Option<i32>) {
    if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), None)
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        (128 + sig, Some(sig))
    } else {
        (255, None)
    }
}

/// `kill(pid, sig)`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill takes plain integers; pid > 0 so it never targets a process group.
    cvt(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// Whether process `pid` exists and has not exited (a zombie counts as exited).
pub fn alive_not_zombie(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // `/proc/<pid>/stat`: "pid (comm) S ..."; comm may hold spaces and parentheses.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// `poll(2)` over the given descriptors.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid mutable slice of pollfd and its length is passed alongside.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Points fd `target` at `src` (dup2).
pub fn dup2(src: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on descriptors we own; it atomically replaces `target`.
    cvt(unsafe { libc::dup2(src, target) }).map(|_| ())
}

/// Enters a private mount namespace and detaches the cgroup2 mount of a hybrid layout, so
/// runtimes that reject hybrid cgroups (crun) see pure v1. Must run before any thread exists.
pub fn hide_cgroup2() -> io::Result<()> {
    let root = CString::new("/").map_err(io::Error::other)?;
    let unified = CString::new("/sys/fs/cgroup/unified").map_err(io::Error::other)?;
    // SAFETY: unshare/mount/umount2 with valid NUL-terminated strings and null data pointers.
    unsafe {
        cvt(libc::unshare(libc::CLONE_NEWNS))?;
        cvt(libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ))?;
        if libc::umount2(unified.as_ptr(), libc::MNT_DETACH) != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Our pid.
pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// Restores the default SIGPIPE disposition (terminate quietly), which Rust's runtime replaces
/// with "ignore": client commands piped into `head` then end like other Unix tools instead of
/// failing on EPIPE. Call before starting threads; never in a daemon.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler code; this only changes the process's disposition
    // for SIGPIPE, and callers do it from `main` before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Names this process (its `comm`, at most 15 bytes), so that `ps -o comm`, `top` and `pgrep`
/// show which container a shim serves: every shim has the same command line.
pub fn set_name(name: &str) {
    let mut b: Vec<u8> = name.bytes().filter(|c| *c != 0).take(15).collect();
    b.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes; `b` is one and
    // outlives the call.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, b.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

/// `fchown(fd, uid, gid)`.
pub fn fchown(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchown on a descriptor we own; it takes no pointers.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(|_| ())
}

/// Receives one file descriptor passed with `SCM_RIGHTS` on `sock` (runc's `--console-socket`
/// sends the pty master this way, with the pty's name as the payload).
pub fn recv_fd(sock: &std::os::unix::net::UnixStream) -> io::Result<OwnedFd> {
    let mut payload = [0u8; 4096];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // Room for one control message holding one int, aligned as the kernel needs.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let control_len = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = (control_len as usize).min(std::mem::size_of_val(&control));
    // SAFETY: msg points at buffers that live across the call; MSG_CMSG_CLOEXEC marks the
    // received descriptor close-on-exec.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR returns null or a header inside
    // `control`.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no descriptor received",
        ));
    }
    // SAFETY: cmsg is non-null and points into `control`, which is still alive.
    let (level, typ, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
    // SAFETY: CMSG_LEN is pure arithmetic.
    let want = unsafe { libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    if level != libc::SOL_SOCKET || typ != libc::SCM_RIGHTS || len != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected control message",
        ));
    }
    // SAFETY: the header says SCM_RIGHTS with exactly one int of data; CMSG_DATA points at it
    // (read unaligned, as the data may not be aligned for c_int).
    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>()) };
    // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets a terminal's window size (rows, columns).
pub fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one valid winsize struct.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(|_| ())
}
