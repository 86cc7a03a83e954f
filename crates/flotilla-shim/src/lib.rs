//! flotilla-shim: the per-container supervisor.
//!
//! One shim runs per container, started by the agent as `flotilla shim <args>` (see [`run`]).
//! It detaches (double fork + `setsid`), becomes a child subreaper, drives the OCI runtime
//! (`runc create/start/delete`), owns the container's stdout/stderr and writes them to a
//! JSON-lines log ([`logfile`]), records the exit code and OOM kills (also in `status.json`), and
//! serves the [`proto`] API on a unix socket. It keeps no tokio runtime: a single-threaded poll
//! loop keeps its memory small.
//!
//! Readiness handshake: the shim prints exactly one line on its stdout: `ok <init-pid> <shim-pid>`
//! once the container is created and the socket listens, or `error <message>`.
//!
//! Standby mode (`flotilla shim --standby`, or `flotilla-shim --standby`): the shim detaches,
//! prints `ready <protocol> <pid>` ([`STANDBY_PROTOCOL`]), and then reads its arguments from stdin
//! ([`encode_args`]) before doing anything else; end of input makes it exit quietly. The agent
//! keeps one such shim started ahead of need, so a container create does not wait for the shim's
//! exec and fork (see `Runtime` in flotilla-runtime). Every shim the runtime starts goes through
//! this mode; arguments on the command line remain for running a shim by hand.

#![deny(unsafe_code)] // raw syscalls live only in `sys`, each with a SAFETY comment

pub mod logfile;
pub mod proto;
mod server;
mod stdio;
mod sys;

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

pub use logfile::{read_logs, LogFollower, LogLine};
pub use proto::{Request, Response, ShimState, Status};
pub use sys::default_sigpipe;

/// Parsed command line of `flotilla shim`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimArgs {
    /// Container id, as given to the runtime.
    pub id: String,
    /// OCI bundle directory (with config.json).
    pub bundle: PathBuf,
    /// Directory for `status.json`, `init.pid`, `runtime.log`, `shim.log`.
    pub state_dir: PathBuf,
    /// Unix socket to serve.
    pub socket: PathBuf,
    /// Container log file (rotated as `<log>.1`, `<log>.2` …).
    pub log: PathBuf,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    /// OCI runtime binary (runc, crun …).
    pub runtime: PathBuf,
    /// The runtime's `--root` state directory.
    pub runtime_root: PathBuf,
    /// The container's cgroups path (as in config.json), to read OOM kills.
    pub cgroup: String,
    /// Hide the cgroup2 mount of a hybrid layout from the runtime (needed by crun).
    pub hide_cgroup2: bool,
    /// Stay in the foreground (no fork), for debugging.
    pub foreground: bool,
}

impl ShimArgs {
    /// Renders the arguments in the form [`ShimArgs::parse`] accepts.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        let mut kv = |k: &str, val: OsString| {
            v.push(k.into());
            v.push(val);
        };
        kv("--id", self.id.clone().into());
        kv("--bundle", self.bundle.clone().into());
        kv("--state-dir", self.state_dir.clone().into());
        kv("--socket", self.socket.clone().into());
        kv("--log", self.log.clone().into());
        kv("--log-max-bytes", self.log_max_bytes.to_string().into());
        kv("--log-max-files", self.log_max_files.to_string().into());
        kv("--runtime", self.runtime.clone().into());
        kv("--runtime-root", self.runtime_root.clone().into());
        kv("--cgroup", self.cgroup.clone().into());
        if self.hide_cgroup2 {
            v.push("--hide-cgroup2".into());
        }
        if self.foreground {
            v.push("--foreground".into());
        }
        v
    }

    /// Parses `--key value` flags (the arguments after `shim`).
    pub fn parse(args: &[OsString]) -> Result<ShimArgs, String> {
        let mut a = ShimArgs {
            id: String::new(),
            bundle: PathBuf::new(),
            state_dir: PathBuf::new(),
            socket: PathBuf::new(),
            log: PathBuf::new(),
            log_max_bytes: 10 << 20,
            log_max_files: 3,
            runtime: PathBuf::from("runc"),
            runtime_root: PathBuf::from("/run/flotilla/runc"),
            cgroup: String::new(),
            hide_cgroup2: false,
            foreground: false,
        };
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let k = k.to_str().ok_or("non-UTF-8 flag")?;
            match k {
                "--hide-cgroup2" => {
                    a.hide_cgroup2 = true;
                    continue;
                }
                "--foreground" => {
                    a.foreground = true;
                    continue;
                }
                _ => {}
            }
            let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
            let s = || {
                v.to_str()
                    .map(str::to_string)
                    .ok_or(format!("{k}: not UTF-8"))
            };
            match k {
                "--id" => a.id = s()?,
                "--bundle" => a.bundle = v.into(),
                "--state-dir" => a.state_dir = v.into(),
                "--socket" => a.socket = v.into(),
                "--log" => a.log = v.into(),
                "--log-max-bytes" => {
                    a.log_max_bytes = s()?.parse().map_err(|e| format!("{k}: {e}"))?
                }
                "--log-max-files" => {
                    a.log_max_files = s()?.parse().map_err(|e| format!("{k}: {e}"))?
                }
                "--runtime" => a.runtime = v.into(),
                "--runtime-root" => a.runtime_root = v.into(),
                "--cgroup" => a.cgroup = s()?,
                other => return Err(format!("unknown flag {other}")),
            }
        }
        for (name, empty) in [
            ("--id", a.id.is_empty()),
            ("--bundle", a.bundle.as_os_str().is_empty()),
            ("--state-dir", a.state_dir.as_os_str().is_empty()),
            ("--socket", a.socket.as_os_str().is_empty()),
            ("--log", a.log.as_os_str().is_empty()),
        ] {
            if empty {
                return Err(format!("missing {name}"));
            }
        }
        Ok(a)
    }
}

/// Version of the standby exchange (`ready <version> <pid>`, then [`encode_args`] on stdin). The agent
/// refuses a shim that announces another one: `flotilla` and `flotilla-shim` come from
/// different builds.
pub const STANDBY_PROTOCOL: u32 = 1;

/// Encodes shim arguments for a standby shim's stdin: the count, then every argument, each
/// followed by a NUL byte (arguments are paths and cannot contain NUL).
pub fn encode_args(args: &[OsString]) -> Vec<u8> {
    let mut out = format!("{}\0", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(a.as_bytes());
        out.push(0);
    }
    out
}

/// Reads what [`encode_args`] wrote. `Ok(None)`: end of input before anything arrived.
pub fn decode_args(input: &mut impl BufRead) -> Result<Option<Vec<OsString>>, String> {
    let mut field = |what: &str| -> Result<Option<Vec<u8>>, String> {
        let mut buf = Vec::new();
        let n = input
            .read_until(0, &mut buf)
            .map_err(|e| format!("read {what}: {e}"))?;
        if n == 0 {
            return Ok(None);
        }
        if buf.pop() != Some(0) {
            return Err(format!("truncated {what}"));
        }
        Ok(Some(buf))
    };
    let Some(count) = field("argument count")? else {
        return Ok(None);
    };
    let count: usize = std::str::from_utf8(&count)
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|c| *c <= 64)
        .ok_or("bad argument count")?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let a = field("argument")?.ok_or("end of input inside the arguments")?;
        args.push(OsString::from_vec(a));
    }
    Ok(Some(args))
}

/// Writes one handshake line to stdout, ignoring a reader that went away (`println!` would
/// panic on EPIPE).
macro_rules! answer {
    ($($t:tt)*) => {{
        let mut out = std::io::stdout();
        let _ = writeln!(out, $($t)*).and_then(|()| out.flush());
    }};
}

/// Entry point of `flotilla shim <args>` and `flotilla shim --standby`; returns the process
/// exit code.
///
/// Call it from `main` **before** starting any thread or async runtime: it forks.
/// `args` are the arguments after `shim` (see [`ShimArgs::parse`]).
pub fn run(args: Vec<OsString>) -> i32 {
    let standby = args.len() == 1 && args[0] == "--standby";
    let parsed = if standby {
        None
    } else {
        match ShimArgs::parse(&args) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("flotilla shim: {e}");
                return 2;
            }
        }
    };
    let foreground = parsed.as_ref().is_some_and(|a| a.foreground);
    if !foreground {
        match sys::fork() {
            Ok(Some(_)) => return 0, // the grandparent reaps us; the child reports readiness
            Ok(None) => {}
            Err(e) => {
                answer!("error fork: {e}");
                return 1;
            }
        }
    }
    if let Err(e) = sys::setsid() {
        if !foreground {
            answer!("error setsid: {e}");
            return 1;
        }
    }
    if let Err(e) = sys::set_child_subreaper() {
        answer!("error subreaper: {e}");
        return 1;
    }
    let args = match parsed {
        Some(a) => a,
        None => {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "ready {STANDBY_PROTOCOL} {}", std::process::id());
            let _ = out.flush();
            let decoded = decode_args(&mut std::io::stdin().lock());
            match decoded.and_then(|a| match a {
                Some(a) => ShimArgs::parse(&a).map(Some),
                None => Ok(None),
            }) {
                Ok(Some(a)) if !a.foreground => a,
                Ok(Some(_)) => {
                    answer!("error a standby shim cannot run in the foreground");
                    return 2;
                }
                Ok(None) => return 0, // the agent went away before it needed us
                Err(e) => {
                    answer!("error {e}");
                    return 2;
                }
            }
        }
    };
    sys::set_name(&format!("shim {}", args.id));
    if args.hide_cgroup2 {
        if let Err(e) = sys::hide_cgroup2() {
            answer!("error hide cgroup2: {e}");
            return 1;
        }
    }
    let (shim, listener) = match server::Shim::create(args.clone()) {
        Ok(x) => x,
        Err(e) => {
            answer!("error {}", e.replace('\n', " "));
            return 1;
        }
    };
    let mut out = std::io::stdout();
    let told = writeln!(out, "ok {} {}", shim.pid(), std::process::id()).and_then(|()| out.flush());
    if let Err(e) = told {
        // Nobody reads the handshake (EPIPE): the agent that asked for this container is gone
        // (killed, or it gave up waiting) and never learned of it. Whoever cleans up after it
        // (`node cleanup`, a restarted agent) may already have removed the container's record
        // after finding no socket here, before this shim bound it. Serving now would keep a
        // container nobody knows of, forever: undo it instead.
        let _ = writeln!(
            std::io::stderr(),
            "flotilla shim {}: nobody took the handshake ({e}); removing the container",
            args.id
        );
        shim.abandon(listener);
        return 1;
    }
    if !args.foreground {
        let _ = server::detach_stdio(&args.state_dir);
    }
    match shim.serve(listener) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flotilla shim {}: {e}", args.id);
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() -> Result<(), String> {
        let a = ShimArgs {
            id: "c1".into(),
            bundle: "/b".into(),
            state_dir: "/s".into(),
            socket: "/s/sock".into(),
            log: "/l/container.log".into(),
            log_max_bytes: 5,
            log_max_files: 2,
            runtime: "/usr/bin/crun".into(),
            runtime_root: "/r".into(),
            cgroup: "/flotilla/c1".into(),
            hide_cgroup2: true,
            foreground: false,
        };
        assert_eq!(ShimArgs::parse(&a.to_args())?, a);
        assert!(ShimArgs::parse(&["--id".into()]).is_err());
        Ok(())
    }

    #[test]
    fn standby_args_round_trip() -> Result<(), String> {
        let a = ShimArgs {
            id: "c2".into(),
            bundle: "/b with space/\n".into(),
            state_dir: "/s".into(),
            socket: "/s/sock".into(),
            log: "/l/container.log".into(),
            log_max_bytes: 5,
            log_max_files: 2,
            runtime: "runc".into(),
            runtime_root: "/r".into(),
            cgroup: String::new(),
            hide_cgroup2: false,
            foreground: false,
        };
        let wire = encode_args(&a.to_args());
        let back = decode_args(&mut &wire[..])?.ok_or("nothing decoded")?;
        assert_eq!(ShimArgs::parse(&back)?, a);
        // End of input before anything: the agent went away.
        assert_eq!(decode_args(&mut &b""[..])?, None);
        // Truncated or malformed input is an error, never a partial argument list.
        assert!(decode_args(&mut &wire[..wire.len() - 1]).is_err());
        assert!(decode_args(&mut &b"3\0a\0"[..]).is_err());
        assert!(decode_args(&mut &b"x\0"[..]).is_err());
        assert!(decode_args(&mut &b"99999\0"[..]).is_err());
        Ok(())
    }
}
