//! The shim process: creates the container with the OCI runtime, then runs a single-threaded
//! poll loop that drains the container's stdout/stderr into the log, reaps children (it is a
//! subreaper), and answers requests on its unix socket.

use crate::logfile::{now_rfc3339, LineSplitter, LogWriter};
use crate::proto::{Request, Response, ShimState, Status};
use crate::ShimArgs;
use crate::{stdio, sys};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// After the init exits, how long to keep draining output held open by stray processes.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

struct Output {
    fd: Option<File>,
    stream: &'static str,
    split: LineSplitter,
    /// A pty, whose lines end in `\r\n`.
    tty: bool,
}

/// A pty's line without the carriage return its line discipline added.
fn trim_cr(tty: bool, line: &[u8]) -> &[u8] {
    match line {
        [rest @ .., b'\r'] if tty => rest,
        _ => line,
    }
}

struct Client {
    sock: UnixStream,
    buf: Vec<u8>,
    /// Waiting for the container to finish (wait/stop).
    waiting: bool,
}

pub(crate) struct Shim {
    args: ShimArgs,
    state: ShimState,
    log: LogWriter,
    outputs: [Output; 2],
    exited_at: Option<Instant>,
    kill_deadline: Option<Instant>,
    finalized: bool,
    /// `state` changed since `status.json` was last written. The serve loop writes it after
    /// answering, so a client does not wait for a file to be created (on a busy ext4 a new
    /// inode costs 0.1–0.5 ms); the next request is read only after the write.
    dirty: bool,
}

fn runtime_cmd(args: &ShimArgs) -> Command {
    let mut c = Command::new(&args.runtime);
    c.arg("--root").arg(&args.runtime_root);
    c.arg("--log").arg(args.state_dir.join("runtime.log"));
    c
}

/// Starts a container created by runc the way `runc start` does, without running runc (one Go
/// process less per container start, about 5 ms of CPU): runc's init waits, before it execs
/// the user's process, until something opens `<root>/<id>/exec.fifo` for reading and takes
/// the byte it writes; `runc start` does exactly that, then removes the fifo (its absence is
/// how runc tells `running` from `created`). `None` when the runtime is not runc or the fifo
/// is not where runc 1.x keeps it: the caller then runs `<runtime> start`.
fn start_via_fifo(args: &ShimArgs, init_pid: i32) -> Option<Result<(), String>> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_runc = args.runtime.file_name().is_some_and(|n| n == "runc");
    let fifo = args.runtime_root.join(&args.id).join("exec.fifo");
    let is_fifo = fs::symlink_metadata(&fifo).is_ok_and(|m| m.file_type().is_fifo());
    if !is_runc || !is_fifo {
        return None;
    }
    // Non-blocking, so that an init that died before opening its end cannot hang the shim.
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
    {
        Ok(f) => f,
        Err(e) => return Some(Err(format!("open {}: {e}", fifo.display()))),
    };
    let mut buf = [0u8; 16];
    loop {
        let mut fds = [libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Err(e) = sys::poll(&mut fds, 100) {
            return Some(Err(format!("poll exec fifo: {e}")));
        }
        if fds[0].revents != 0 {
            match f.read(&mut buf) {
                Ok(n) if n > 0 => break,
                // The writer came and went without a byte: its init failed.
                Ok(_) => return Some(Err("container process is already dead".into())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(format!("read exec fifo: {e}"))),
            }
        } else if !sys::alive_not_zombie(init_pid) {
            return Some(Err("container process is already dead".into()));
        }
    }
    drop(f);
    if let Err(e) = fs::remove_file(&fifo) {
        return Some(Err(format!("remove {}: {e}", fifo.display())));
    }
    Some(Ok(()))
}

/// Takes the pty master the runtime sent on the console socket (it connected and sent it
/// before `create` returned, so this does not wait on a live peer for long).
fn receive_pty(listener: &UnixListener) -> Result<OwnedFd, String> {
    // Non-blocking: a runtime that succeeded without connecting must not hang the shim.
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("console socket: {e}"))?;
    let (sock, _) = listener
        .accept()
        .map_err(|e| format!("console socket: the runtime sent no pty ({e})"))?;
    sock.set_nonblocking(false)
        .map_err(|e| format!("console socket: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("console socket: {e}"))?;
    let fd = sys::recv_fd(&sock).map_err(|e| format!("receive the pty: {e}"))?;
    let _ = sys::set_winsize(&fd, 24, 80);
    Ok(fd)
}

/// Last error message the runtime logged (runc/crun write JSON or text lines to `--log`).
fn runtime_error(state_dir: &Path, fallback: &str) -> String {
    let text = fs::read_to_string(state_dir.join("runtime.log")).unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let msg = serde_json::from_str::<serde_json::Value>(last)
        .ok()
        .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| last.to_string());
    if msg.is_empty() {
        fallback.to_string()
    } else {
        msg
    }
}

/// Reads the OOM-kill counter of the container's memory cgroup (v1 or v2).
fn oom_kills(cgroup: &str) -> u64 {
    let cg = cgroup.trim_start_matches('/');
    let candidates = [
        (
            format!("/sys/fs/cgroup/memory/{cg}/memory.oom_control"),
            "oom_kill ",
        ),
        (format!("/sys/fs/cgroup/{cg}/memory.events"), "oom_kill "),
    ];
    for (path, key) in candidates {
        if let Ok(text) = fs::read_to_string(&path) {
            for l in text.lines() {
                if let Some(v) = l.strip_prefix(key) {
                    return v.trim().parse().unwrap_or(0);
                }
            }
        }
    }
    0
}

impl Shim {
    /// Runs `runtime create`; on success returns the shim ready to serve.
    pub(crate) fn create(args: ShimArgs) -> Result<(Shim, UnixListener), String> {
        // No bundle: the container was removed before this shim got its arguments (its agent
        // vanished and was cleaned up after). Recreate nothing of it (state dir, log).
        let config = args.bundle.join("config.json");
        if !config.is_file() {
            return Err(format!("no {}: the container is gone", config.display()));
        }
        fs::create_dir_all(&args.state_dir).map_err(|e| format!("create state dir: {e}"))?;
        let log = LogWriter::open(&args.log, args.log_max_bytes, args.log_max_files)
            .map_err(|e| format!("open log {}: {e}", args.log.display()))?;
        let (out_r, out_w) = sys::pipe_cloexec().map_err(|e| format!("pipe: {e}"))?;
        let (err_r, err_w) = sys::pipe_cloexec().map_err(|e| format!("pipe: {e}"))?;
        if let Some((uid, gid)) = stdio::process_host_ids(&args.bundle) {
            for w in [&out_w, &err_w] {
                sys::fchown(w, uid, gid).map_err(|e| format!("chown stdio pipe: {e}"))?;
            }
        }
        let pid_file = args.state_dir.join("init.pid");
        let _ = fs::remove_file(&pid_file);
        // With a terminal the runtime makes the pty and sends its master over this socket;
        // the container's stdout and stderr are then both the pty.
        let console = stdio::wants_terminal(&args.bundle)
            .then(|| {
                // Beside the shim's own socket, whose directory the runtime keeps short
                // (a unix socket path has at most 107 bytes).
                let path = args.socket.with_extension("console");
                let _ = fs::remove_file(&path);
                UnixListener::bind(&path)
                    .map(|l| (l, path.clone()))
                    .map_err(|e| format!("bind {}: {e}", path.display()))
            })
            .transpose()?;
        let mut create = runtime_cmd(&args);
        create.arg("create").arg("--bundle").arg(&args.bundle);
        if let Some((_, path)) = &console {
            create.arg("--console-socket").arg(path);
        }
        let status = create
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&args.id)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            .status()
            .map_err(|e| format!("run {}: {e}", args.runtime.display()))?;
        let pty = match &console {
            Some((listener, path)) => {
                let got = status.success().then(|| receive_pty(listener));
                let _ = fs::remove_file(path);
                match got.transpose() {
                    Ok(pty) => pty,
                    Err(e) => {
                        // Created but without its terminal: remove it rather than leave it.
                        let _ = runtime_cmd(&args)
                            .args(["delete", "--force", &args.id])
                            .output();
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        if !status.success() {
            let msg = runtime_error(&args.state_dir, "create failed");
            let _ = runtime_cmd(&args)
                .args(["delete", "--force", &args.id])
                .output();
            return Err(format!("{} create: {msg}", args.runtime.display()));
        }
        let pid: i32 = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| "runtime wrote no pid file".to_string())?;
        // The pty master replaces the stdout pipe, which only the runtime held.
        let tty = pty.is_some();
        let out_r = pty.unwrap_or(out_r);
        for fd in [&out_r, &err_r] {
            sys::set_nonblocking(fd.as_raw_fd()).map_err(|e| format!("nonblock: {e}"))?;
        }
        let _ = fs::remove_file(&args.socket);
        if let Some(dir) = args.socket.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let listener = UnixListener::bind(&args.socket)
            .map_err(|e| format!("bind {}: {e}", args.socket.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("nonblock: {e}"))?;
        let state = ShimState {
            id: args.id.clone(),
            status: Status::Created,
            pid,
            shim_pid: sys::getpid(),
            exit_code: None,
            exit_signal: None,
            oom_killed: false,
            created_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
        };
        let to_file = |fd: OwnedFd| Some(File::from(fd));
        let shim = Shim {
            outputs: [
                Output {
                    fd: to_file(out_r),
                    stream: "stdout",
                    split: LineSplitter::default(),
                    tty,
                },
                Output {
                    fd: to_file(err_r),
                    stream: "stderr",
                    split: LineSplitter::default(),
                    tty: false,
                },
            ],
            args,
            state,
            log,
            exited_at: None,
            kill_deadline: None,
            finalized: false,
            dirty: false,
        };
        shim.persist();
        Ok((shim, listener))
    }

    pub(crate) fn pid(&self) -> i32 {
        self.state.pid
    }

    fn persist_if_dirty(&mut self) {
        if self.dirty {
            self.persist();
            self.dirty = false;
        }
    }

    fn persist(&self) {
        let path = self.args.state_dir.join("status.json");
        let tmp = self.args.state_dir.join("status.json.tmp");
        if let Ok(data) = serde_json::to_vec(&self.state) {
            if fs::write(&tmp, data).is_ok() {
                let _ = fs::rename(&tmp, &path);
            }
        }
    }

    fn drain_output(&mut self, idx: usize) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let out = &mut self.outputs[idx];
            let Some(fd) = out.fd.as_mut() else { return };
            let n = match fd.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A pty master reads EIO once every slave end is closed: its end of file.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => 0,
                Err(_) => return, // WouldBlock: drained for now
            };
            if n == 0 {
                self.close_output(idx);
                return;
            }
            let (stream, tty) = (out.stream, out.tty);
            let log = &mut self.log;
            out.split.feed(&buf[..n], |l| {
                let _ = log.write_record(stream, trim_cr(tty, l));
            });
        }
    }

    /// Logs what is left of an output's last line and stops reading it.
    fn close_output(&mut self, idx: usize) {
        let out = &mut self.outputs[idx];
        let (stream, tty) = (out.stream, out.tty);
        let log = &mut self.log;
        out.split.finish(|l| {
            let _ = log.write_record(stream, trim_cr(tty, l));
        });
        out.fd = None;
    }

    fn reap(&mut self) {
        while let Some((pid, status)) = sys::reap_any() {
            if pid == self.state.pid && self.exited_at.is_none() {
                self.record_exit(status);
            }
        }
    }

    fn record_exit(&mut self, status: i32) {
        let (code, sig) = sys::decode_status(status);
        self.state.exit_code = Some(code);
        self.state.exit_signal = sig;
        self.state.finished_at = Some(now_rfc3339());
        self.state.oom_killed = oom_kills(&self.args.cgroup) > 0;
        self.exited_at = Some(Instant::now());
        self.kill_deadline = None;
    }

    /// Exit recorded and output drained (or the drain deadline passed): answer waiters.
    fn maybe_finalize(&mut self) -> bool {
        if self.finalized {
            return true;
        }
        let Some(at) = self.exited_at else {
            return false;
        };
        let drained = self.outputs.iter().all(|o| o.fd.is_none());
        if !drained && at.elapsed() < DRAIN_AFTER_EXIT {
            return false;
        }
        for i in 0..2 {
            self.drain_output(i);
            self.close_output(i);
        }
        self.state.status = Status::Stopped;
        self.finalized = true;
        self.dirty = true;
        true
    }

    fn handle(&mut self, req: Request, client: &mut Client) -> Option<Response> {
        match req {
            Request::State => Some(self.ok()),
            Request::Start => {
                if self.state.status != Status::Created || self.exited_at.is_some() {
                    return Some(err(format!(
                        "container is {:?}, not created",
                        self.state.status
                    )));
                }
                let started = match start_via_fifo(&self.args, self.state.pid) {
                    Some(r) => r.map_err(|e| err(format!("start: {e}"))),
                    None => match runtime_cmd(&self.args)
                        .args(["start", &self.args.id])
                        .output()
                    {
                        Ok(o) if o.status.success() => Ok(()),
                        Ok(_) => Err(err(format!(
                            "start: {}",
                            runtime_error(&self.args.state_dir, "runtime start failed")
                        ))),
                        Err(e) => Err(err(format!("start: {e}"))),
                    },
                };
                match started {
                    Ok(()) => {
                        self.state.status = Status::Running;
                        self.state.started_at = Some(now_rfc3339());
                        self.dirty = true;
                        Some(self.ok())
                    }
                    Err(resp) => Some(resp),
                }
            }
            Request::Wait => {
                if self.finalized {
                    Some(self.ok())
                } else {
                    client.waiting = true;
                    None
                }
            }
            Request::Signal { signal } => {
                if self.exited_at.is_some() {
                    return Some(err("container is not running".into()));
                }
                match sys::kill(self.state.pid, signal) {
                    Ok(()) => Some(self.ok()),
                    Err(e) => Some(err(format!("signal: {e}"))),
                }
            }
            Request::Stop { grace_ms, signal } => {
                if self.finalized {
                    return Some(self.ok());
                }
                if !(1..=libc::SIGRTMAX()).contains(&signal) {
                    return Some(Response::Error {
                        message: format!("no such signal: {signal}"),
                    });
                }
                if self.exited_at.is_none() {
                    let _ = sys::kill(self.state.pid, signal);
                    let d = Instant::now() + Duration::from_millis(grace_ms);
                    self.kill_deadline = Some(self.kill_deadline.map_or(d, |k| k.min(d)));
                }
                client.waiting = true;
                None
            }
            Request::Delete => None, // handled by the loop
        }
    }

    fn ok(&self) -> Response {
        Response::Ok {
            state: self.state.clone(),
        }
    }

    /// Kills (if needed) and deletes the container with the runtime.
    fn delete(&mut self) -> Response {
        if self.exited_at.is_none() {
            let _ = sys::kill(self.state.pid, libc::SIGKILL);
            if let Ok(status) = sys::wait_pid(self.state.pid) {
                self.record_exit(status);
            }
        }
        let past = Instant::now()
            .checked_sub(DRAIN_AFTER_EXIT)
            .unwrap_or_else(Instant::now);
        self.exited_at = self.exited_at.or(Some(past));
        self.maybe_finalize();
        match runtime_cmd(&self.args)
            .args(["delete", "--force", &self.args.id])
            .output()
        {
            Ok(o) if o.status.success() => self.ok(),
            Ok(_) => err(format!(
                "delete: {}",
                runtime_error(&self.args.state_dir, "runtime delete failed")
            )),
            Err(e) => err(format!("delete: {e}")),
        }
    }

    /// Undoes a container nobody will ever ask about (its agent vanished before the
    /// handshake): kills its init, deletes it with the runtime and removes the socket. Bounded:
    /// an init that does not die within a few seconds is left to the runtime's `delete --force`.
    pub(crate) fn abandon(self, listener: UnixListener) {
        drop(listener);
        let _ = fs::remove_file(&self.args.socket);
        let pid = self.state.pid;
        if sys::kill(pid, libc::SIGKILL).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while sys::alive_not_zombie(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            while sys::reap_any().is_some() {}
        }
        // Without `--log`: the state dir (where `runtime.log` goes) may be gone already, and
        // runc refuses to run when it cannot open its log.
        let _ = Command::new(&self.args.runtime)
            .arg("--root")
            .arg(&self.args.runtime_root)
            .args(["delete", "--force", &self.args.id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The poll loop. Returns when a `delete` request was served.
    pub(crate) fn serve(mut self, listener: UnixListener) -> io::Result<()> {
        let (wake_r, wake_w) = sys::pipe_cloexec()?;
        sys::set_nonblocking(wake_r.as_raw_fd())?;
        sys::set_nonblocking(wake_w.as_raw_fd())?;
        sys::install_sigchld(&wake_w)?;
        let mut wake_r = File::from(wake_r);
        let mut clients: Vec<Client> = Vec::new();
        // The init may already have exited before the handler was installed.
        self.reap();
        loop {
            let mut fds = vec![
                pollfd(wake_r.as_raw_fd()),
                pollfd(listener.as_raw_fd()),
                pollfd(self.outputs[0].fd.as_ref().map_or(-1, |f| f.as_raw_fd())),
                pollfd(self.outputs[1].fd.as_ref().map_or(-1, |f| f.as_raw_fd())),
            ];
            fds.extend(clients.iter().map(|c| pollfd(c.sock.as_raw_fd())));
            let now = Instant::now();
            let mut timeout: Option<Duration> = None;
            if let Some(k) = self.kill_deadline {
                timeout = Some(k.saturating_duration_since(now));
            }
            if let (Some(at), false) = (self.exited_at, self.finalized) {
                let t = (at + DRAIN_AFTER_EXIT).saturating_duration_since(now);
                timeout = Some(timeout.map_or(t, |x| x.min(t)));
            }
            let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32 + 1);
            sys::poll(&mut fds, ms)?;

            if fds[0].revents != 0 {
                let mut b = [0u8; 64];
                while matches!(wake_r.read(&mut b), Ok(n) if n > 0) {}
                self.reap();
            }
            for i in 0..2 {
                if fds[2 + i].revents != 0 {
                    self.drain_output(i);
                }
            }
            if let Some(k) = self.kill_deadline {
                if Instant::now() >= k && self.exited_at.is_none() {
                    let _ = sys::kill(self.state.pid, libc::SIGKILL);
                    self.kill_deadline = None;
                }
            }
            let n_clients = clients.len();
            if fds[1].revents != 0 {
                while let Ok((sock, _)) = listener.accept() {
                    if sock.set_nonblocking(true).is_ok() {
                        clients.push(Client {
                            sock,
                            buf: Vec::new(),
                            waiting: false,
                        });
                    }
                }
            }
            // Serve client requests.
            let mut delete_requested: Option<usize> = None;
            let mut drop_idx = Vec::new();
            for (ci, client) in clients.iter_mut().enumerate() {
                if ci >= n_clients || fds[4 + ci].revents == 0 {
                    continue;
                }
                let mut b = [0u8; 4096];
                let mut closed = false;
                loop {
                    match client.sock.read(&mut b) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(n) => client.buf.extend_from_slice(&b[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                while let Some(pos) = client.buf.iter().position(|c| *c == b'\n') {
                    let line: Vec<u8> = client.buf.drain(..=pos).collect();
                    let resp = match serde_json::from_slice::<Request>(&line) {
                        Ok(Request::Delete) => {
                            delete_requested = Some(ci);
                            None
                        }
                        Ok(req) => self.handle(req, client),
                        Err(e) => Some(err(format!("bad request: {e}"))),
                    };
                    if let Some(resp) = resp {
                        if send(&client.sock, &resp).is_err() {
                            closed = true;
                        }
                    }
                }
                if closed || client.buf.len() > 64 * 1024 {
                    drop_idx.push(ci);
                }
            }
            if let Some(ci) = delete_requested {
                let resp = self.delete();
                let _ = send(&clients[ci].sock, &resp);
                let done = self.ok();
                for c in clients.iter().filter(|c| c.waiting) {
                    let _ = send(&c.sock, &done);
                }
                self.persist_if_dirty();
                let _ = fs::remove_file(&self.args.socket);
                return Ok(());
            }
            for ci in drop_idx.into_iter().rev() {
                clients.swap_remove(ci);
            }
            if self.maybe_finalize() {
                let done = self.ok();
                for c in clients.iter_mut().filter(|c| c.waiting) {
                    c.waiting = false;
                    let _ = send(&c.sock, &done);
                }
            }
            self.persist_if_dirty();
        }
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn err(message: String) -> Response {
    Response::Error { message }
}

fn send(sock: &UnixStream, resp: &Response) -> io::Result<()> {
    let mut data = serde_json::to_vec(resp).map_err(io::Error::other)?;
    data.push(b'\n');
    // Responses are small; a blocking write with a timeout keeps the loop simple.
    sock.set_nonblocking(false)?;
    sock.set_write_timeout(Some(Duration::from_secs(1)))?;
    let r = (&*sock).write_all(&data);
    sock.set_nonblocking(true)?;
    r
}

/// Redirects stdin/stdout to /dev/null and stderr to `shim.log` in the state dir.
pub(crate) fn detach_stdio(state_dir: &Path) -> io::Result<()> {
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("shim.log"))?;
    sys::dup2(null.as_raw_fd(), 0)?;
    sys::dup2(null.as_raw_fd(), 1)?;
    sys::dup2(log.as_raw_fd(), 2)?;
    Ok(())
}
