//! Container specs and their translation to an OCI runtime `config.json`.
//!
//! Everything here is pure: [`build_spec`] takes the container spec, the image config and a few
//! node facts and returns an `oci_spec::runtime::Spec`.

use crate::config::IdRange;
use crate::error::{Result, RuntimeError};
use crate::seccomp;
use oci_spec::image::Config as ImageConfig;
use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxCpu, LinuxIdMapping, LinuxIdMappingBuilder, LinuxMemory,
    LinuxNamespace, LinuxNamespaceType, LinuxPids, LinuxResources, Mount, PosixRlimitBuilder,
    PosixRlimitType, Spec, User,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

/// A host path bind-mounted into the container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// Host directory or file (absolute).
    pub src: PathBuf,
    /// Path inside the container (absolute, no `..`, not `/`).
    pub dst: PathBuf,
    pub readonly: bool,
    /// When `src` is an empty directory at create, first copy the image's content at `dst`
    /// into it (modes, owners, symlinks as links, times), as Docker does for a new named
    /// volume. Symlinks of the image resolve inside the rootfs; devices, FIFOs and sockets
    /// are skipped, hard links become copies. Nothing is copied when `dst` is missing in the
    /// image or is not a directory.
    #[serde(default)]
    pub copy_up: bool,
}

/// A tmpfs mounted into the container, with Docker's `--mount type=tmpfs` defaults:
/// `nosuid,nodev,noexec`, mode 1777, no size limit (the kernel's default, half of RAM). Owned
/// by the container's root.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TmpfsMount {
    /// Path inside the container (absolute, no `..`, not `/`).
    pub dst: PathBuf,
    /// Size limit in bytes (`size=`); writes beyond it fail with ENOSPC.
    pub size: Option<u64>,
    /// Permission bits of the mount's root (`mode=`, octal up to 7777); 1777 when unset.
    pub mode: Option<u32>,
}

/// cgroup limits. `None` means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub memory_bytes: Option<i64>,
    /// CFS quota in µs per `cpu_period` (takes precedence over `nano_cpus`).
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    /// CPUs in units of 1e-9 (Docker's `--cpus 1.5` = 1_500_000_000).
    pub nano_cpus: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub pids_limit: Option<i64>,
}

/// Security options; the defaults are the secure ones. Every opt-out is recorded in the
/// container's info and shown by inspect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SecurityOptions {
    /// Run in a user namespace (container root = unprivileged host uid).
    pub userns: bool,
    /// Apply the default seccomp profile.
    pub seccomp: bool,
    pub no_new_privs: bool,
    /// Capabilities added to Docker's default set (`CAP_` prefix optional, `ALL` allowed).
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// All capabilities, no seccomp, no masked paths, no user namespace.
    pub privileged: bool,
}

impl Default for SecurityOptions {
    fn default() -> Self {
        SecurityOptions {
            userns: true,
            seccomp: true,
            no_new_privs: true,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            privileged: false,
        }
    }
}

/// What the agent asks the runtime to run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerSpec {
    /// `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
    pub id: String,
    /// Manifest digest or `name:tag`.
    pub image: String,
    /// Replaces the image's entrypoint (and then drops the image's cmd, as Docker does).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's cmd.
    pub args: Option<Vec<String>>,
    /// `KEY=VALUE`, overriding the image's.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `uid[:gid]` or `name[:group]` (looked up in the image's /etc/passwd and /etc/group).
    pub user: Option<String>,
    /// Defaults to the first 12 characters of the id.
    pub hostname: Option<String>,
    pub mounts: Vec<BindMount>,
    /// tmpfs mounts; their destinations and the binds' must all differ.
    pub tmpfs: Vec<TmpfsMount>,
    pub resources: Resources,
    pub security: SecurityOptions,
    pub labels: BTreeMap<String, String>,
    /// What `stop` sends before SIGKILL (a name or number); the image's `StopSignal`, else
    /// SIGTERM, when unset.
    pub stop_signal: Option<String>,
    /// Give the process a pseudo-terminal (`/dev/console`) as stdin/stdout/stderr; its output is
    /// logged as stdout.
    pub tty: bool,
    /// Run a minimal init (the node's `tini`) as PID 1, reaping zombies and forwarding signals.
    pub init: bool,
    /// Size of `/dev/shm` in bytes; 64 MiB when unset, as Docker.
    pub shm_size: Option<u64>,
    /// Join this network namespace (a bind-mounted nsfs file prepared by the agent) instead of
    /// getting a new one with only loopback.
    pub network_namespace: Option<PathBuf>,
}

/// Validates a container id.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "container id {id:?}: use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit"
        )))
    }
}

/// Checks the destinations of binds and tmpfs mounts: absolute, without `..`, not `/`, each
/// used once; bind sources absolute; tmpfs sizes above 0 and modes within 7777.
pub fn validate_mounts(spec: &ContainerSpec) -> Result<()> {
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let dsts = spec
        .mounts
        .iter()
        .map(|b| (&b.dst, "bind"))
        .chain(spec.tmpfs.iter().map(|t| (&t.dst, "tmpfs")));
    for (dst, kind) in dsts {
        let shown = dst.display();
        if !dst.is_absolute() {
            return Err(RuntimeError::Invalid(format!(
                "{kind} mount destination {shown} must be an absolute path"
            )));
        }
        if dst.components().any(|c| c == Component::ParentDir) {
            return Err(RuntimeError::Invalid(format!(
                "{kind} mount destination {shown} must not contain `..`"
            )));
        }
        let norm: PathBuf = dst.components().collect();
        if norm == Path::new("/") {
            return Err(RuntimeError::Invalid(format!(
                "{kind} mount destination {shown}: cannot mount over the container's root `/`"
            )));
        }
        if !seen.insert(norm) {
            return Err(RuntimeError::Invalid(format!(
                "mount destination {shown} is used twice: give each bind, volume or tmpfs \
                 mount its own destination"
            )));
        }
    }
    for b in &spec.mounts {
        if !b.src.is_absolute() {
            return Err(RuntimeError::Invalid(format!(
                "bind mount source {} must be an absolute path",
                b.src.display()
            )));
        }
    }
    for t in &spec.tmpfs {
        if t.size == Some(0) {
            return Err(RuntimeError::Invalid(format!(
                "tmpfs mount {}: size must be above 0 (leave it unset for no limit)",
                t.dst.display()
            )));
        }
        if t.mode.is_some_and(|m| m > 0o7777) {
            return Err(RuntimeError::Invalid(format!(
                "tmpfs mount {}: mode must be octal permission bits up to 7777",
                t.dst.display()
            )));
        }
    }
    Ok(())
}

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability runc 1.1 knows.
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

fn norm_cap(c: &str) -> String {
    let up = c.trim().to_ascii_uppercase();
    if up == "ALL" || up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

/// The effective capability names: defaults (or all when privileged) + add − drop.
pub fn capability_set(sec: &SecurityOptions) -> Result<Vec<String>> {
    let mut set: Vec<String> = if sec.privileged {
        ALL_CAPS
    } else {
        DEFAULT_CAPS
    }
    .iter()
    .map(|s| s.to_string())
    .collect();
    for c in sec.cap_add.iter().map(|c| norm_cap(c)) {
        if c == "CAP_ALL" || c == "ALL" {
            set = ALL_CAPS.iter().map(|s| s.to_string()).collect();
        } else if !ALL_CAPS.contains(&c.as_str()) {
            return Err(RuntimeError::Invalid(format!("unknown capability {c}")));
        } else if !set.contains(&c) {
            set.push(c);
        }
    }
    for c in sec.cap_drop.iter().map(|c| norm_cap(c)) {
        if c == "CAP_ALL" || c == "ALL" {
            set.clear();
        } else {
            set.retain(|x| *x != c);
        }
    }
    Ok(set)
}

/// Merges the process args Docker-style: entrypoint + cmd, the task's overrides winning.
pub fn merge_args(spec: &ContainerSpec, image: Option<&ImageConfig>) -> Result<Vec<String>> {
    let img_ep = image
        .and_then(|c| c.entrypoint().clone())
        .unwrap_or_default();
    let img_cmd = image.and_then(|c| c.cmd().clone()).unwrap_or_default();
    let (ep, cmd) = match (&spec.entrypoint, &spec.args) {
        (Some(ep), Some(args)) => (ep.clone(), args.clone()),
        (Some(ep), None) => (ep.clone(), Vec::new()),
        (None, Some(args)) => (img_ep, args.clone()),
        (None, None) => (img_ep, img_cmd),
    };
    let all: Vec<String> = ep.into_iter().chain(cmd).collect();
    if all.is_empty() {
        return Err(RuntimeError::Invalid(
            "no command: the image has no cmd/entrypoint and the task sets none".into(),
        ));
    }
    Ok(all)
}

/// Merges environments: image first, then the task's, later keys replacing earlier ones; PATH is
/// always set.
pub fn merge_env(spec: &ContainerSpec, image: Option<&ImageConfig>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let img = image.and_then(|c| c.env().clone()).unwrap_or_default();
    for kv in img.iter().chain(spec.env.iter()) {
        let key = kv.split('=').next().unwrap_or("");
        out.retain(|e| e.split('=').next() != Some(key));
        out.push(kv.clone());
    }
    if !out.iter().any(|e| e.starts_with("PATH=")) {
        out.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    out
}

fn lookup(db: &str, name: &str, id_field: usize) -> Option<u32> {
    db.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name))
            .then(|| f.get(id_field)?.parse().ok())
            .flatten()
    })
}

/// Resolves `user[:group]` against passwd/group file contents: `(uid, gid)`.
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<(u32, u32)> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => lookup(passwd, u, 2).ok_or_else(|| {
            RuntimeError::Invalid(format!("user {u} not found in the image's /etc/passwd"))
        })?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(group, g, 2).ok_or_else(|| {
                RuntimeError::Invalid(format!("group {g} not found in the image's /etc/group"))
            })?,
        },
        None => passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.get(2).and_then(|x| x.parse::<u32>().ok()) == Some(uid))
                    .then(|| f.get(3)?.parse().ok())
                    .flatten()
            })
            .unwrap_or(0),
    };
    Ok((uid, gid))
}

/// The process identity Docker derives from the image's account files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    /// The passwd entry's home, `/` when the user has none (`HOME` unless the env sets it).
    pub home: String,
    /// Groups of /etc/group that list the user by name, besides its primary group.
    pub additional_gids: Vec<u32>,
}

/// Resolves `user[:group]` like [`resolve_user`], plus the home directory and supplementary
/// groups from the same files. An explicit `:group` replaces the supplementary groups, as in
/// Docker.
pub fn resolve_account(user: &str, passwd: &str, group: &str) -> Result<Account> {
    let (uid, gid) = resolve_user(user, passwd, group)?;
    let entry: Option<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect())
        .find(|f: &Vec<&str>| f.get(2).and_then(|x| x.parse::<u32>().ok()) == Some(uid));
    let name = entry.as_ref().and_then(|f| f.first().copied());
    let home = entry
        .as_ref()
        .and_then(|f| f.get(5).copied())
        .filter(|h| h.starts_with('/'))
        .unwrap_or("/")
        .to_string();
    let mut additional_gids = Vec::new();
    if let (Some(name), false) = (name, user.contains(':')) {
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            let member = f
                .get(3)
                .is_some_and(|m| m.split(',').any(|m| m.trim() == name));
            if let (true, Some(g)) = (member, f.get(2).and_then(|g| g.parse::<u32>().ok())) {
                if g != gid && !additional_gids.contains(&g) {
                    additional_gids.push(g);
                }
            }
        }
    }
    Ok(Account {
        uid,
        gid,
        home,
        additional_gids,
    })
}

/// Where `--init`'s binary appears in the container.
pub const INIT_PATH: &str = "/sbin/flotilla-init";
/// Docker's default `RLIMIT_NOFILE` for containers (soft 1024 keeps `select()` users and
/// close-every-fd loops fast; hard 524288 as systemd's default).
pub const NOFILE_SOFT: u64 = 1024;
pub const NOFILE_HARD: u64 = 524_288;

/// Node facts [`build_spec`] needs.
pub struct BuildContext<'a> {
    /// Merged overlay root.
    pub rootfs: &'a Path,
    /// `linux.cgroupsPath`.
    pub cgroups_path: String,
    /// The user-namespace range when the container uses one.
    pub userns: Option<IdRange>,
    /// The process identity resolved in the image.
    pub account: Account,
    /// The hard `RLIMIT_NOFILE` the runtime itself has: a container's cannot exceed it.
    pub nofile_hard: u64,
    /// The node's init binary (`tini`), bind-mounted as PID 1 when the spec asks for one.
    pub init: Option<&'a Path>,
    /// The host accounts swap per cgroup: a memory limit then also bounds swap.
    pub swap_limit: bool,
}

fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| RuntimeError::Invalid(format!("spec: {e}")))
}

fn mapping(r: IdRange) -> Result<LinuxIdMapping> {
    LinuxIdMappingBuilder::default()
        .container_id(0u32)
        .host_id(r.host_start)
        .size(r.size)
        .build()
        .map_err(|e| RuntimeError::Invalid(e.to_string()))
}

/// Builds the OCI runtime spec for a container.
pub fn build_spec(
    spec: &ContainerSpec,
    image: Option<&ImageConfig>,
    ctx: &BuildContext<'_>,
) -> Result<Spec> {
    let mut s = Spec::default();
    let sec = &spec.security;

    // Process.
    let mut process = s.process().clone().unwrap_or_default();
    process.set_terminal(Some(spec.tty));
    let mut args = merge_args(spec, image)?;
    if spec.init {
        if ctx.init.is_none() {
            return Err(RuntimeError::Invalid(
                "--init needs tini on the node (apt-get install tini)".into(),
            ));
        }
        args.splice(0..0, [INIT_PATH.to_string(), "--".to_string()]);
    }
    process.set_args(Some(args));
    let mut env = merge_env(spec, image);
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", ctx.account.home));
    }
    process.set_env(Some(env));
    let nofile = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(NOFILE_SOFT.min(ctx.nofile_hard))
        .hard(NOFILE_HARD.min(ctx.nofile_hard))
        .build()
        .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    process.set_rlimits(Some(vec![nofile]));
    let cwd = spec
        .workdir
        .clone()
        .or_else(|| {
            image
                .and_then(|c| c.working_dir().clone())
                .filter(|w| !w.is_empty())
        })
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(RuntimeError::Invalid(format!(
            "workdir {cwd} must be absolute"
        )));
    }
    process.set_cwd(PathBuf::from(cwd));
    let mut user = User::default();
    user.set_uid(ctx.account.uid);
    user.set_gid(ctx.account.gid);
    if !ctx.account.additional_gids.is_empty() {
        user.set_additional_gids(Some(ctx.account.additional_gids.clone()));
    }
    process.set_user(user);
    process.set_no_new_privileges(Some(sec.no_new_privs && !sec.privileged));
    let caps: HashSet<Capability> = capability_set(sec)?
        .into_iter()
        .filter_map(|c| serde_json::from_value(serde_json::Value::String(c)).ok())
        .collect();
    let mut lc = LinuxCapabilities::default();
    lc.set_bounding(Some(caps.clone()));
    lc.set_effective(Some(caps.clone()));
    lc.set_permitted(Some(caps));
    lc.set_inheritable(None);
    lc.set_ambient(None);
    process.set_capabilities(Some(lc));
    s.set_process(Some(process));

    // Root and hostname.
    let mut root = s.root().clone().unwrap_or_default();
    root.set_path(ctx.rootfs.to_path_buf());
    root.set_readonly(Some(false));
    s.set_root(Some(root));
    let hostname = spec
        .hostname
        .clone()
        .unwrap_or_else(|| spec.id.chars().take(12).collect());
    s.set_hostname(Some(hostname));

    // Mounts: the standard set plus binds.
    let mut mounts: Vec<Mount> = s.mounts().clone().unwrap_or_default();
    if spec.network_namespace.is_some() && ctx.userns.is_some() {
        // sysfs can only be mounted by the owner of the network namespace; a user-namespaced
        // container joining the agent's (root-owned) task namespace gets a read-only bind of
        // /sys instead, as Docker does with userns-remap.
        for m in mounts.iter_mut() {
            if m.typ().as_deref() == Some("sysfs") {
                *m = json(serde_json::json!({
                    "destination": "/sys", "type": "bind", "source": "/sys",
                    "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]
                }))?;
            }
        }
    }
    if let Some(size) = spec.shm_size {
        if size == 0 {
            return Err(RuntimeError::Invalid("shm size must be above 0".into()));
        }
        for m in mounts.iter_mut() {
            if m.destination() == Path::new("/dev/shm") {
                *m = json(serde_json::json!({
                    "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", format!("size={size}")]
                }))?;
            }
        }
    }
    if let (true, Some(init)) = (spec.init, ctx.init) {
        mounts.push(json(serde_json::json!({
            "destination": INIT_PATH, "type": "bind", "source": init,
            "options": ["bind", "rprivate", "nosuid", "nodev", "ro"]
        }))?);
    }
    validate_mounts(spec)?;
    // Binds and tmpfs mounts, a parent before what is mounted beneath it (as Docker sorts
    // them), in the spec's order otherwise.
    let mut user: Vec<(usize, Mount)> = Vec::new();
    for b in &spec.mounts {
        let mut opts = vec![
            "rbind".to_string(),
            "rprivate".to_string(),
            "nosuid".to_string(),
            "nodev".to_string(),
        ];
        if b.readonly {
            opts.push("ro".into());
        }
        user.push((
            b.dst.components().count(),
            json(serde_json::json!({
                "destination": b.dst, "type": "bind", "source": b.src, "options": opts
            }))?,
        ));
    }
    for t in &spec.tmpfs {
        let mut opts = vec![
            "rw".to_string(),
            "nosuid".to_string(),
            "nodev".to_string(),
            "noexec".to_string(),
            "relatime".to_string(),
            format!("mode={:o}", t.mode.unwrap_or(0o1777)),
        ];
        if let Some(size) = t.size {
            opts.push(format!("size={size}"));
        }
        user.push((
            t.dst.components().count(),
            json(serde_json::json!({
                "destination": t.dst, "type": "tmpfs", "source": "tmpfs", "options": opts
            }))?,
        ));
    }
    user.sort_by_key(|(depth, _)| *depth);
    mounts.extend(user.into_iter().map(|(_, m)| m));
    s.set_mounts(Some(mounts));

    // Linux.
    let mut linux = s.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(PathBuf::from(&ctx.cgroups_path)));
    let mut namespaces: Vec<LinuxNamespace> = linux.namespaces().clone().unwrap_or_default();
    namespaces
        .retain(|n| n.typ() != LinuxNamespaceType::User && n.typ() != LinuxNamespaceType::Cgroup);
    if let Some(path) = &spec.network_namespace {
        namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
        namespaces.push(json(serde_json::json!({"type": "network", "path": path}))?);
    }
    if let Some(r) = ctx.userns {
        namespaces.push(json(serde_json::json!({"type": "user"}))?);
        linux.set_uid_mappings(Some(vec![mapping(r)?]));
        linux.set_gid_mappings(Some(vec![mapping(r)?]));
    }
    linux.set_namespaces(Some(namespaces));
    let mut res = LinuxResources::default();
    res.set_devices(Some(vec![json(
        serde_json::json!({"allow": false, "access": "rwm"}),
    )?]));
    let r = &spec.resources;
    if let Some(m) = r.memory_bytes {
        let mut mem = LinuxMemory::default();
        mem.set_limit(Some(m));
        if ctx.swap_limit {
            // As Docker does without --memory-swap: as much swap as memory. OCI's `swap` is
            // memory + swap (v1 memsw; runc writes `swap - limit` to v2's memory.swap.max).
            mem.set_swap(Some(m.saturating_mul(2)));
        }
        res.set_memory(Some(mem));
    }
    let mut cpu = LinuxCpu::default();
    let mut any_cpu = false;
    if let Some(q) = r.cpu_quota {
        cpu.set_quota(Some(q));
        cpu.set_period(Some(r.cpu_period.unwrap_or(100_000)));
        any_cpu = true;
    } else if let Some(n) = r.nano_cpus {
        let period = r.cpu_period.unwrap_or(100_000);
        cpu.set_quota(Some((n as u128 * period as u128 / 1_000_000_000) as i64));
        cpu.set_period(Some(period));
        any_cpu = true;
    }
    if let Some(sh) = r.cpu_shares {
        cpu.set_shares(Some(sh));
        any_cpu = true;
    }
    if any_cpu {
        res.set_cpu(Some(cpu));
    }
    if let Some(p) = r.pids_limit {
        let mut pids = LinuxPids::default();
        pids.set_limit(p);
        res.set_pids(Some(pids));
    }
    linux.set_resources(Some(res));
    if sec.privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
        linux.set_seccomp(None);
    } else {
        linux.set_masked_paths(Some(masked_paths()));
        linux.set_readonly_paths(Some(readonly_paths()));
        linux.set_seccomp(if sec.seccomp {
            Some(seccomp::default_profile()?)
        } else {
            None
        });
    }
    s.set_linux(Some(linux));
    Ok(s)
}

/// Docker's masked /proc and /sys paths.
pub fn masked_paths() -> Vec<String> {
    [
        "/proc/asound",
        "/proc/acpi",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Docker's read-only /proc paths.
pub fn readonly_paths() -> Vec<String> {
    [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::ConfigBuilder;

    fn img(ep: &[&str], cmd: &[&str]) -> Result<ImageConfig> {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        ConfigBuilder::default()
            .entrypoint(v(ep))
            .cmd(v(cmd))
            .env(vec!["A=1".to_string(), "PATH=/bin".to_string()])
            .build()
            .map_err(|e| RuntimeError::Invalid(e.to_string()))
    }

    #[test]
    fn args_merge_like_docker() -> Result<()> {
        let i = img(&["/ep"], &["c1"])?;
        let mut s = ContainerSpec::default();
        assert_eq!(merge_args(&s, Some(&i))?, ["/ep", "c1"]);
        s.args = Some(vec!["x".into()]);
        assert_eq!(merge_args(&s, Some(&i))?, ["/ep", "x"]);
        s.args = None;
        s.entrypoint = Some(vec!["/other".into()]);
        assert_eq!(
            merge_args(&s, Some(&i))?,
            ["/other"],
            "overriding the entrypoint drops the image cmd"
        );
        assert!(merge_args(&ContainerSpec::default(), None).is_err());
        Ok(())
    }

    #[test]
    fn env_task_overrides_image() -> Result<()> {
        let i = img(&[], &["x"])?;
        let s = ContainerSpec {
            env: vec!["A=2".into(), "B=3".into()],
            ..Default::default()
        };
        assert_eq!(merge_env(&s, Some(&i)), ["PATH=/bin", "A=2", "B=3"]);
        assert!(merge_env(&ContainerSpec::default(), None)[0].starts_with("PATH="));
        Ok(())
    }

    #[test]
    fn resolves_users() -> Result<()> {
        let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65533::/:/bin/false\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(resolve_user("nobody", passwd, group)?, (65534, 65533));
        assert_eq!(resolve_user("1000:50", passwd, group)?, (1000, 50));
        assert_eq!(resolve_user("root:staff", passwd, group)?, (0, 50));
        assert!(resolve_user("ghost", passwd, group).is_err());
        Ok(())
    }

    #[test]
    fn accounts_carry_home_and_supplementary_groups() -> Result<()> {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n\
                      odd:x:7:7::relative:/bin/sh\n";
        let group = "root:x:0:\napp:x:1000:\naudio:x:29:app,other\nvideo:x:44: app \n\
                     staff:x:50:other\nbroken:x:notanumber:app\n";
        let app = resolve_account("app", passwd, group)?;
        assert_eq!(
            (app.uid, app.gid, app.home.as_str()),
            (1000, 1000, "/home/app")
        );
        assert_eq!(app.additional_gids, [29, 44]);
        assert_eq!(
            resolve_account("1000", passwd, group)?.additional_gids,
            [29, 44]
        );
        let explicit = resolve_account("app:staff", passwd, group)?;
        assert_eq!((explicit.gid, explicit.additional_gids.len()), (50, 0));
        let unknown = resolve_account("4242", passwd, group)?;
        assert_eq!((unknown.home.as_str(), unknown.gid), ("/", 0));
        assert_eq!(resolve_account("odd", passwd, group)?.home, "/");
        assert_eq!(resolve_account("0", "", "")?.home, "/");
        Ok(())
    }

    #[test]
    fn init_shm_and_home_options_reach_the_spec() -> Result<()> {
        let spec = ContainerSpec {
            id: "abc".into(),
            args: Some(vec!["sleep".into(), "1".into()]),
            env: vec!["HOME=/elsewhere".into()],
            init: true,
            shm_size: Some(1 << 20),
            ..Default::default()
        };
        let mut ctx = BuildContext {
            rootfs: Path::new("/r"),
            cgroups_path: "/flotilla/abc".into(),
            userns: None,
            account: Account {
                uid: 1000,
                gid: 1000,
                home: "/home/app".into(),
                additional_gids: vec![29],
            },
            init: None,
            nofile_hard: NOFILE_HARD,
            swap_limit: false,
        };
        let e = build_spec(&spec, None, &ctx).expect_err("no init binary");
        assert!(e.to_string().contains("tini"), "{e}");
        ctx.init = Some(Path::new("/usr/bin/tini-static"));
        let v = serde_json::to_value(build_spec(&spec, None, &ctx)?)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        assert_eq!(
            v["process"]["args"],
            serde_json::json!([INIT_PATH, "--", "sleep", "1"])
        );
        let env = v["process"]["env"].to_string();
        assert!(
            env.contains("HOME=/elsewhere") && !env.contains("/home/app"),
            "{env}"
        );
        assert_eq!(
            v["process"]["user"]["additionalGids"],
            serde_json::json!([29])
        );
        let mounts = v["mounts"].as_array().cloned().unwrap_or_default();
        assert!(mounts.iter().any(|m| m["destination"] == INIT_PATH
            && m["source"] == "/usr/bin/tini-static"
            && m["options"].to_string().contains("\"ro\"")));
        assert!(mounts
            .iter()
            .any(|m| m["destination"] == "/dev/shm"
                && m["options"].to_string().contains("size=1048576")));
        let zero = ContainerSpec {
            shm_size: Some(0),
            ..spec
        };
        assert!(build_spec(&zero, None, &ctx).is_err());
        Ok(())
    }

    #[test]
    fn mounts_are_validated_and_tmpfs_gets_docker_options() -> Result<()> {
        let b = |dst: &str| BindMount {
            src: "/srv/v".into(),
            dst: dst.into(),
            ..Default::default()
        };
        let t = |dst: &str| TmpfsMount {
            dst: dst.into(),
            ..Default::default()
        };
        let with = |mounts: Vec<BindMount>, tmpfs: Vec<TmpfsMount>| ContainerSpec {
            id: "abc".into(),
            args: Some(vec!["true".into()]),
            mounts,
            tmpfs,
            ..Default::default()
        };
        for (spec, want) in [
            (with(vec![b("data")], vec![]), "absolute"),
            (with(vec![b("/a/../etc")], vec![]), ".."),
            (with(vec![b("/")], vec![]), "root"),
            (with(vec![], vec![t("/./")]), "root"),
            (with(vec![b("/d")], vec![t("/d/")]), "twice"),
            (with(vec![b("/d"), b("/./d")], vec![]), "twice"),
            (
                with(
                    vec![BindMount {
                        src: "rel".into(),
                        dst: "/d".into(),
                        ..Default::default()
                    }],
                    vec![],
                ),
                "source",
            ),
            (
                with(
                    vec![],
                    vec![TmpfsMount {
                        size: Some(0),
                        ..t("/t")
                    }],
                ),
                "size",
            ),
            (
                with(
                    vec![],
                    vec![TmpfsMount {
                        mode: Some(0o17777),
                        ..t("/t")
                    }],
                ),
                "mode",
            ),
        ] {
            let e = validate_mounts(&spec).expect_err(want);
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        let spec = with(
            vec![b("/data/sub")],
            vec![
                TmpfsMount {
                    size: Some(1 << 20),
                    mode: Some(0o700),
                    ..t("/data")
                },
                t("/run"),
            ],
        );
        let ctx = BuildContext {
            rootfs: Path::new("/r"),
            cgroups_path: "/flotilla/abc".into(),
            userns: Some(IdRange::default()),
            account: Account {
                uid: 0,
                gid: 0,
                home: "/root".into(),
                additional_gids: vec![],
            },
            init: None,
            nofile_hard: NOFILE_HARD,
            swap_limit: false,
        };
        let v = serde_json::to_value(build_spec(&spec, None, &ctx)?)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let mounts = v["mounts"].as_array().cloned().unwrap_or_default();
        let pos = |d: &str| mounts.iter().position(|m| m["destination"] == d);
        assert!(pos("/data") < pos("/data/sub"), "a parent is mounted first");
        let opts = |d: &str| pos(d).map(|i| mounts[i]["options"].clone());
        assert_eq!(
            opts("/data"),
            Some(serde_json::json!([
                "rw",
                "nosuid",
                "nodev",
                "noexec",
                "relatime",
                "mode=700",
                "size=1048576"
            ]))
        );
        assert_eq!(
            opts("/run"),
            Some(serde_json::json!([
                "rw",
                "nosuid",
                "nodev",
                "noexec",
                "relatime",
                "mode=1777"
            ]))
        );
        // Older records (no copy_up, no tmpfs) still parse.
        let old: ContainerSpec = serde_json::from_str(
            r#"{"id":"x","image":"i","mounts":[{"src":"/a","dst":"/b","readonly":true}]}"#,
        )
        .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        assert!(!old.mounts[0].copy_up && old.tmpfs.is_empty());
        Ok(())
    }

    #[test]
    fn caps_add_drop() -> Result<()> {
        let mut sec = SecurityOptions::default();
        assert_eq!(capability_set(&sec)?.len(), DEFAULT_CAPS.len());
        sec.cap_add = vec!["net_admin".into()];
        sec.cap_drop = vec!["CAP_CHOWN".into()];
        let set = capability_set(&sec)?;
        assert!(
            set.contains(&"CAP_NET_ADMIN".to_string()) && !set.contains(&"CAP_CHOWN".to_string())
        );
        sec.cap_drop = vec!["ALL".into()];
        assert!(capability_set(&sec)?.is_empty());
        Ok(())
    }

    #[test]
    fn builds_secure_spec() -> Result<()> {
        let spec = ContainerSpec {
            id: "abc".into(),
            args: Some(vec!["echo".into(), "hi".into()]),
            resources: Resources {
                memory_bytes: Some(64 << 20),
                nano_cpus: Some(1_500_000_000),
                cpu_shares: Some(512),
                pids_limit: Some(100),
                ..Default::default()
            },
            mounts: vec![BindMount {
                src: "/etc/hostname".into(),
                dst: "/h".into(),
                readonly: true,
                copy_up: false,
            }],
            ..Default::default()
        };
        let ctx = BuildContext {
            rootfs: Path::new("/r"),
            cgroups_path: "/flotilla/abc".into(),
            userns: Some(IdRange::default()),
            account: Account {
                uid: 0,
                gid: 0,
                home: "/root".into(),
                additional_gids: vec![],
            },
            init: None,
            nofile_hard: NOFILE_HARD,
            swap_limit: true,
        };
        let s = build_spec(&spec, None, &ctx)?;
        let v = serde_json::to_value(&s).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        assert_eq!(v["process"]["args"], serde_json::json!(["echo", "hi"]));
        assert!(v["process"]["env"]
            .as_array()
            .is_some_and(|e| e.contains(&serde_json::json!("HOME=/root"))));
        assert_eq!(
            v["process"]["rlimits"],
            serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 524288}])
        );
        let shm = v["mounts"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["destination"] == "/dev/shm"))
            .map(|m| m["options"].to_string());
        assert!(
            shm.as_deref().is_some_and(|o| o.contains("size=65536k")),
            "64 MiB /dev/shm by default: {shm:?}"
        );
        assert_eq!(v["process"]["noNewPrivileges"], true);
        assert_eq!(v["linux"]["uidMappings"][0]["hostID"], 100000);
        assert_eq!(v["linux"]["cgroupsPath"], "/flotilla/abc");
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 150000);
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], 100);
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(v["linux"]["resources"]["memory"]["swap"], 128 << 20);
        // Without swap accounting on the host, swap is left alone (runc would fail otherwise).
        let no_swap = BuildContext {
            swap_limit: false,
            ..ctx
        };
        let v2 = serde_json::to_value(build_spec(&spec, None, &no_swap)?)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        assert!(v2["linux"]["resources"]["memory"]["swap"].is_null());
        assert!(v["linux"]["seccomp"]["syscalls"]
            .as_array()
            .is_some_and(|a| !a.is_empty()));
        assert!(v["linux"]["namespaces"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["type"] == "user")));
        assert!(v["mounts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["destination"] == "/h"
                && m["options"]
                    .as_array()
                    .is_some_and(|o| o.contains(&serde_json::json!("ro"))))));
        let caps = v["process"]["capabilities"]["bounding"]
            .as_array()
            .map(|a| a.len());
        assert_eq!(caps, Some(DEFAULT_CAPS.len()));
        Ok(())
    }
}
