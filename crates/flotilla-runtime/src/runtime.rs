//! [`Runtime`]: the default [`RuntimeDriver`], runc (or another OCI runtime) via flotilla-shim.
//!
//! Lasting state, under `RuntimeConfig::root`:
//! - `containers/<id>/meta.json` — [`ContainerInfo`]; `fs/upper`, `fs/work` (the overlay's
//!   writable layer);
//! - `logs/<id>/container.log[.N]` — container logs (kept after removal when asked);
//! - `images/` — the [`ImageStore`];
//! - `init/<variant>` — the read-only layer of mount points above every image's.
//!
//! State that dies with the host, under `RuntimeConfig::state` (a tmpfs on a node):
//! - `containers/<id>/` — `bundle/config.json` and `bundle/rootfs` (the overlay mount point);
//!   the shim's `status.json`, `init.pid`, `runtime.log`, `shim.log`;
//! - `sock/<hash>.sock` — shim sockets (short paths, under the 108-byte sun_path limit);
//! - `runc/` — the OCI runtime's `--root`.
//!
//! Mounts: binds and tmpfs mounts are checked by `spec::validate_mounts`; a bind with
//! `copy_up` whose source is an empty directory is filled from the image's content at its
//! destination (`copyup`), read from the mounted rootfs before the OCI runtime runs.
//!
//! `meta.json` is written last: a container dir without it is a create that was interrupted,
//! and `adopt` removes it (as it removes volatile dirs without a lasting one).
//!
//! Modes (Docker's userns-remap layout): `root` and its directories 0700 (a writable layer's
//! `upper` keeps the container root's owner and 0755 inside them), records and `config.json`
//! 0600, container logs 0600. Only the way to each rootfs mount point (`state`, `state/containers`,
//! `<id>`, `<id>/bundle`) is 0710 with the group of the host gid container root maps to,
//! because the OCI runtime resolves the rootfs from inside the container's user namespace
//! (`root` too when `state` lies inside it). Overlayfs reads the layers with the mounting
//! root's credentials: `images/layers` needs no traversal by anyone else, so no local user
//! can run a set-uid file of a layer.

use crate::config::{IdRange, RuntimeConfig};
use crate::driver::{
    AdoptReport, ContainerInfo, ContainerState, ContainerStatus, ExitStatus, RuntimeDriver,
};
use crate::error::{IoContext, Result, RuntimeError};
use crate::image::ImageStore;
use crate::overlay;
use crate::probe::{CgroupLayout, HostProbe};
use crate::shim_client;
use crate::spec::{self, BuildContext, ContainerSpec};
use crate::strays::{self, ShimProcess};
use flotilla_shim::{Request, ShimArgs, ShimState, Status};
use futures::future::BoxFuture;
use futures::FutureExt;
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::task::JoinHandle;

/// How long `create` waits for the shim's handshake (the runtime's `create` included).
const SHIM_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a freshly started standby shim may take to say `ready`.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(30);

/// A shim started ahead of need (`flotilla shim --standby`): detached, waiting for its
/// arguments on `stdin`. Dropping it closes that pipe, and the shim exits.
struct Standby {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

/// The default runtime driver.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RuntimeConfig,
    images: Arc<ImageStore>,
    probe: HostProbe,
    runtime_path: PathBuf,
    hide_cgroup2: bool,
    /// The hard open-files limit after [`crate::rlimit::raise_nofile_hard`].
    nofile_hard: u64,
    /// The standby shim the next `create` hands its container to.
    standby: Mutex<Option<Standby>>,
    /// The task starting the next standby shim, if one runs.
    filler: Mutex<Option<JoinHandle<()>>>,
    /// Parsed `meta.json` records by container id. A record never changes once written, so a
    /// listing reads only the records it has not seen (an agent lists its containers on every
    /// assignment set it receives: about fifty times during a 100-replica start), and every
    /// other call checks only that the container's dir still exists.
    records: Mutex<std::collections::HashMap<String, ContainerInfo>>,
    /// What every shim this runtime starts gets as [`strays::SHIM_ENV`] (its canonical root),
    /// so `node cleanup` finds shims no record names.
    mark: PathBuf,
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(p).ctx(|| format!("create {}", p.display()))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", p.display()))
}

/// A directory on the way to a container's root filesystem, which the OCI runtime resolves
/// from inside the container's user namespace: Docker's userns-remap layout, 0710 with the
/// group of the host gid container root maps to (it may pass, no one else but root may even
/// list it); 0700 without user namespaces. `mapped_gid` is that gid.
fn traversal_dir(p: &Path, mapped_gid: Option<u32>) -> Result<()> {
    fs::create_dir_all(p).ctx(|| format!("create {}", p.display()))?;
    let mode = match mapped_gid {
        Some(gid) => {
            std::os::unix::fs::chown(p, None, Some(gid))
                .ctx(|| format!("chown {}", p.display()))?;
            0o710
        }
        None => 0o700,
    };
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", p.display()))
}

/// Writes a file readable by root only (0600 set on the descriptor, whatever the umask or an
/// older file's mode).
fn write_private(p: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    crate::image::create_private(p)?
        .write_all(data)
        .ctx(|| format!("write {}", p.display()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RuntimeError::Shim(format!("worker thread failed: {e}")))?
}

impl Runtime {
    /// Probes the host (failing with a message naming the fix when something is missing) and
    /// opens the state directories.
    pub fn new(cfg: RuntimeConfig) -> Result<Runtime> {
        let probe = HostProbe::run(&cfg);
        probe.check()?;
        let runtime_path = probe.runtime_path.clone().ok_or_else(|| {
            RuntimeError::HostRequirement("runc not found: apt-get install runc".into())
        })?;
        // Nothing here is for other local users (records hold env vars, layers hold set-uid
        // files owned by the mapped root). The container's root reaches only its rootfs
        // mount point, through the state dir; overlayfs reads layers and the writable layer
        // with the mounting root's credentials, so they stay 0700.
        let mapped_gid = cfg.userns.map(|r| r.shift(0));
        if cfg.state.starts_with(&cfg.root) {
            traversal_dir(&cfg.root, mapped_gid)?;
        } else {
            mkdir(&cfg.root, 0o700)?;
        }
        for d in ["containers", "logs"] {
            mkdir(&cfg.root.join(d), 0o700)?;
        }
        let init = cfg.root.join("init");
        if init.is_dir() {
            mkdir(&init, 0o700)?;
        }
        for d in ["", "containers"] {
            traversal_dir(&cfg.state.join(d), mapped_gid)?;
        }
        for d in ["sock", "runc"] {
            mkdir(&cfg.state.join(d), 0o700)?;
        }
        let images = Arc::new(ImageStore::open(cfg.root.join("images"))?);
        let mark = strays::mark_of(&cfg.root);
        let is_crun = runtime_path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("crun"));
        let hide_cgroup2 = cfg
            .hide_cgroup2
            .unwrap_or(is_crun && probe.cgroup_layout == CgroupLayout::Hybrid);
        Ok(Runtime {
            inner: Arc::new(Inner {
                cfg,
                images,
                probe,
                runtime_path,
                hide_cgroup2,
                nofile_hard: crate::rlimit::raise_nofile_hard(spec::NOFILE_HARD),
                standby: Mutex::new(None),
                filler: Mutex::new(None),
                records: Mutex::new(std::collections::HashMap::new()),
                mark,
            }),
        })
    }

    /// Process id of the standby shim the next `create` will use, if one is ready.
    pub fn standby_pid(&self) -> Option<u32> {
        self.inner
            .standby
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.pid))
    }

    /// Waits until the standby shim that the last `create` asked for is ready (or failed to
    /// start). Benchmarks call it so that its start-up does not overlap what they time next.
    pub async fn settle(&self) {
        let filler = self.inner.filler.lock().ok().and_then(|mut f| f.take());
        if let Some(f) = filler {
            let _ = f.await;
        }
    }

    /// Unpacks an image's layers the way its containers use them (ownership shifted into the
    /// node's user-namespace range), so that the first container start does not wait for it.
    /// Called after an import, load or pull, as Docker and containerd unpack at pull time.
    /// Blocking; a failure here only means the first create unpacks (and reports) instead.
    pub fn prepare_image(&self, reference: &str) -> Result<()> {
        let digest = self.inner.images.resolve(reference)?;
        self.inner
            .images
            .unpacked_layers(&digest, self.inner.cfg.userns)
            .map(|_| ())
    }

    /// The content store.
    pub fn images(&self) -> &ImageStore {
        &self.inner.images
    }

    /// The content store, shared (e.g. with the registry that serves it).
    pub fn images_shared(&self) -> Arc<ImageStore> {
        self.inner.images.clone()
    }

    /// What the host probe found (for `node inspect`).
    pub fn probe(&self) -> &HostProbe {
        &self.inner.probe
    }

    /// The configuration in force.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.cfg
    }

    /// The OCI runtime binary and the `--root` that holds container `id`, for commands the
    /// agent runs itself (`exec`).
    pub fn oci_runtime(&self, id: &str) -> (PathBuf, PathBuf) {
        (self.inner.runtime_path.clone(), self.inner.runc_root_of(id))
    }

    /// Removes an image reference unless a container uses the image; frees unused blobs and layers.
    pub fn remove_image(&self, reference: &str) -> Result<Vec<String>> {
        let digest = self.inner.images.resolve(reference)?;
        for c in self.inner.list_sync()? {
            if c.image == digest {
                return Err(RuntimeError::ImageInUse {
                    image: reference.into(),
                    container: c.id,
                });
            }
        }
        self.inner.images.remove(reference)
    }

    /// The stored info of a container.
    pub fn inspect(&self, id: &str) -> Result<ContainerInfo> {
        self.inner.info(id)
    }

    /// This runtime's live shim processes, found in `/proc` rather than through records (see
    /// [`crate::strays`]): its containers' shims, its standby, and any shim no record names.
    pub fn shim_processes(&self) -> Vec<ShimProcess> {
        self.inner.shim_processes()
    }

    /// What [`Runtime::remove_strays`] would remove: shim processes (those of listed containers
    /// too), OCI runtime containers without a record and container dirs whose create never
    /// finished.
    pub fn strays(&self) -> Result<Vec<String>> {
        let inner = &self.inner;
        let mut out: Vec<String> = inner
            .shim_processes()
            .iter()
            .map(|p| p.to_string())
            .collect();
        for id in inner.stray_runtime_containers() {
            out.push(format!("runc container {id}"));
        }
        let dir = inner.cfg.root.join("containers");
        for e in fs::read_dir(&dir)
            .ctx(|| format!("list {}", dir.display()))?
            .flatten()
        {
            if !e.path().join("meta.json").exists() {
                out.push(format!(
                    "unfinished container {}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
        Ok(out)
    }

    /// For `node cleanup`, once the containers the records name are removed and no agent uses
    /// this runtime: kills every shim process of it still alive (with its process group),
    /// then removes the OCI runtime's containers that have no record and the dirs of creates
    /// that never finished. Returns what it removed, as [`Runtime::strays`] names it.
    pub async fn remove_strays(&self) -> Result<Vec<String>> {
        let inner = self.inner.clone();
        blocking(move || {
            let procs = inner.shim_processes();
            let left = strays::kill(&procs, Duration::from_secs(10));
            if !left.is_empty() {
                let names: Vec<String> = left.iter().map(|p| p.to_string()).collect();
                return Err(RuntimeError::Shim(format!(
                    "still alive after SIGKILL: {}",
                    names.join(", ")
                )));
            }
            let mut out: Vec<String> = procs.iter().map(|p| p.to_string()).collect();
            for id in inner.stray_runtime_containers() {
                inner.cleanup_sync(&id, false)?;
                out.push(format!("runc container {id}"));
            }
            for id in inner.half_created_sync()? {
                out.push(format!("unfinished container {id}"));
            }
            Ok(out)
        })
        .await
    }
}

impl Inner {
    fn shim_processes(&self) -> Vec<ShimProcess> {
        strays::find(&self.mark, &self.cfg.root, &self.cfg.state)
    }

    /// Containers the OCI runtime holds (under either runc root) whose lasting dir is gone.
    fn stray_runtime_containers(&self) -> Vec<String> {
        let mut ids = strays::runtime_containers(&self.runc_root());
        ids.extend(strays::runtime_containers(&self.cfg.root.join("runc")));
        ids.sort();
        ids.dedup();
        ids.retain(|id| spec::validate_id(id).is_ok() && !self.dir(id).exists());
        ids
    }

    /// A container's lasting dir (its record and writable layer).
    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.root.join("containers").join(id)
    }

    /// A container's volatile dir (bundle and shim state).
    fn vdir(&self, id: &str) -> PathBuf {
        self.cfg.state.join("containers").join(id)
    }

    fn runc_root(&self) -> PathBuf {
        self.cfg.state.join("runc")
    }

    // Containers created by a build that kept all state under `root` (before the state dir
    // existed) keep their runc root, socket and status file there until they are removed.

    /// The runc root holding container `id`: the state dir's, or the older one under `root`.
    fn runc_root_of(&self, id: &str) -> PathBuf {
        let legacy = self.cfg.root.join("runc");
        if !self.runc_root().join(id).exists() && legacy.join(id).exists() {
            legacy
        } else {
            self.runc_root()
        }
    }

    fn socket(&self, id: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(id.as_bytes()));
        let name = format!("{}.sock", &h[..16]);
        let current = self.cfg.state.join("sock").join(&name);
        let legacy = self.cfg.root.join("sock").join(&name);
        if !current.exists() && legacy.exists() {
            legacy
        } else {
            current
        }
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.cfg.root.join("logs").join(id).join("container.log")
    }

    /// A container's record: from the cache while its dir exists (one `stat` instead of a read
    /// and a parse on every call: state, start, signal, wait, remove), else from `meta.json`.
    fn info(&self, id: &str) -> Result<ContainerInfo> {
        spec::validate_id(id).map_err(|_| RuntimeError::ContainerNotFound(id.into()))?;
        let cached = self.records().get(id).cloned();
        if let Some(i) = cached {
            if self.dir(id).is_dir() {
                return Ok(i);
            }
            self.records().remove(id);
            return Err(RuntimeError::ContainerNotFound(id.into()));
        }
        let i = self.read_record(id)?;
        self.records().insert(id.to_string(), i.clone());
        Ok(i)
    }

    /// Reads and parses `meta.json` (no cache).
    fn read_record(&self, id: &str) -> Result<ContainerInfo> {
        let p = self.dir(id).join("meta.json");
        let b = fs::read(&p).map_err(|_| RuntimeError::ContainerNotFound(id.into()))?;
        serde_json::from_slice(&b).map_err(|e| RuntimeError::Json {
            path: p,
            message: e.to_string(),
        })
    }

    fn records(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, ContainerInfo>> {
        match self.records.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        }
    }

    fn list_sync(&self) -> Result<Vec<ContainerInfo>> {
        let dir = self.cfg.root.join("containers");
        // Held throughout, so that a removal (which drops its record after its dirs) is never
        // undone by a listing that read the directory before it.
        let mut known = self.records();
        let ids: std::collections::HashSet<String> = fs::read_dir(&dir)
            .ctx(|| format!("list {}", dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        known.retain(|id, _| ids.contains(id));
        for id in &ids {
            if known.contains_key(id) {
                continue;
            }
            match self.read_record(id) {
                Ok(i) => {
                    known.insert(id.clone(), i);
                }
                Err(err) => {
                    // Normal while a container is being created (its meta.json comes last).
                    tracing::debug!(container = %id, error = %err, "container dir without readable meta.json")
                }
            }
        }
        let mut out: Vec<ContainerInfo> = known.values().cloned().collect();
        drop(known);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn shim_args(&self, info: &ContainerInfo) -> ShimArgs {
        ShimArgs {
            id: info.id.clone(),
            bundle: info.bundle.clone(),
            state_dir: self.vdir(&info.id),
            socket: self.socket(&info.id),
            log: info.log_path.clone(),
            log_max_bytes: self.cfg.log_max_bytes,
            log_max_files: self.cfg.log_max_files,
            runtime: self.runtime_path.clone(),
            runtime_root: self.runc_root(),
            cgroup: info.cgroups_path.clone(),
            hide_cgroup2: self.hide_cgroup2,
            foreground: false,
        }
    }

    /// Everything of `create` up to a running shim. On error the caller cleans up.
    fn create_sync(&self, spec: ContainerSpec) -> Result<ContainerInfo> {
        spec::validate_mounts(&spec)?;
        let id = spec.id.clone();
        let dir = self.dir(&id);
        let digest = self.images.resolve(&spec.image)?;
        let image_cfg = self.images.config(&digest)?;
        let stop_signal = match spec.stop_signal.as_deref().or_else(|| {
            image_cfg
                .config()
                .as_ref()
                .and_then(|c| c.stop_signal().as_deref())
                .filter(|s| !s.is_empty())
        }) {
            Some(s) => flotilla_types::parse_signal(s).map_err(RuntimeError::Invalid)?,
            None => flotilla_types::SIGTERM,
        };
        let sec = &spec.security;
        let userns: Option<IdRange> = if sec.userns && !sec.privileged {
            self.cfg.userns
        } else {
            None
        };
        let layers = self.images.unpacked_layers(&digest, userns)?;
        let bundle = self.vdir(&id).join("bundle");
        let rootfs = bundle.join("rootfs");
        let upper = dir.join("fs/upper");
        let work = dir.join("fs/work");
        mkdir(&dir, 0o700)?;
        mkdir(&dir.join("fs"), 0o700)?;
        mkdir(&upper, 0o755)?;
        mkdir(&work, 0o700)?;
        // After the lasting dir: with an older layout it is the volatile one too.
        let mapped_gid = self.cfg.userns.map(|r| r.shift(0));
        traversal_dir(&self.vdir(&id), mapped_gid)?;
        traversal_dir(&bundle, mapped_gid)?;
        mkdir(&rootfs, 0o755)?;
        if let Some(r) = userns {
            let root = r.shift(0);
            std::os::unix::fs::chown(&upper, Some(root), Some(root))
                .ctx(|| "chown upper".into())?;
            std::os::unix::fs::chown(&rootfs, Some(root), Some(root))
                .ctx(|| "chown rootfs".into())?;
        }
        let mut lowers = vec![self.init_layer(&spec, userns)?];
        lowers.extend(layers);
        overlay::mount_overlay(&lowers, &upper, &work, &rootfs, &dir.join("fs/l"))?;
        // Volumes asking for it get the image's content at their mount point, read from the
        // assembled rootfs before the OCI runtime mounts anything over it.
        for b in spec.mounts.iter().filter(|b| b.copy_up) {
            let done = crate::copyup::copy_up(&rootfs, &b.dst, &b.src)?;
            tracing::debug!(container = %id, dst = %b.dst.display(), src = %b.src.display(),
                kept = done.kept, entries = done.entries, bytes = done.bytes, "volume copy-up");
        }
        // The image's /etc/passwd and /etc/group, resolved inside the rootfs: an absolute
        // symlink (`/etc/shadow`, `/dev/zero`) is taken relative to the rootfs and never
        // reaches the host. A missing file reads as empty (numeric users need none). One that
        // is not a regular file or is over 1 MiB reads as empty too, and its error is what
        // is reported when the user then cannot be resolved.
        const ETC_MAX: u64 = 1 << 20;
        let read = |p: &str| {
            let got = crate::image::layer::read_in_root(&rootfs, Path::new(p), ETC_MAX);
            match got {
                Ok(data) => (
                    String::from_utf8_lossy(&data.unwrap_or_default()).into_owned(),
                    None,
                ),
                Err(e) => (String::new(), Some(e)),
            }
        };
        let user_str = spec
            .user
            .clone()
            .or_else(|| image_cfg.config().as_ref().and_then(|c| c.user().clone()))
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "0".into());
        let (passwd, passwd_err) = read("etc/passwd");
        let (group, group_err) = read("etc/group");
        let read_err = passwd_err.or(group_err);
        let account =
            spec::resolve_account(&user_str, &passwd, &group).map_err(|e| match read_err {
                Some(r) => RuntimeError::Invalid(format!("cannot resolve user {user_str}: {r}")),
                None => e,
            })?;
        let cgroups_path = format!("{}/{}", self.cfg.cgroup_parent.trim_end_matches('/'), id);
        let oci = spec::build_spec(
            &spec,
            image_cfg.config().as_ref(),
            &BuildContext {
                rootfs: &rootfs,
                cgroups_path: cgroups_path.clone(),
                userns,
                account,
                init: Some(self.cfg.init_bin.as_path()).filter(|p| p.is_file()),
                nofile_hard: self.nofile_hard,
                swap_limit: self.probe.swap_accounting,
            },
        )?;
        let config_json = serde_json::to_vec(&oci)
            .map_err(|e| RuntimeError::Invalid(format!("write config.json: {e}")))?;
        write_private(&bundle.join("config.json"), &config_json)?;
        let mut opt_outs = Vec::new();
        if sec.privileged {
            opt_outs.push("privileged".to_string());
        }
        if userns.is_none() {
            opt_outs.push("userns=host".into());
        }
        if !sec.seccomp || sec.privileged {
            opt_outs.push("seccomp=unconfined".into());
        }
        if !sec.no_new_privs || sec.privileged {
            opt_outs.push("no-new-privileges=false".into());
        }
        for c in &sec.cap_add {
            opt_outs.push(format!("cap-add={c}"));
        }
        let info = ContainerInfo {
            id: id.clone(),
            image: digest,
            created_at: flotilla_shim::logfile::now_rfc3339(),
            bundle,
            log_path: self.log_path(&id),
            cgroups_path,
            userns,
            security_opt_outs: opt_outs,
            runtime: self.runtime_path.clone(),
            stop_signal,
            spec,
        };
        let meta =
            serde_json::to_vec_pretty(&info).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        write_private(&dir.join("meta.json"), &meta)?;
        Ok(info)
    }

    /// The read-only layer put above the image's: the mount points every container gets
    /// (`/proc`, `/dev`, `/sys`, and the `/etc` files the task network binds), so that the OCI
    /// runtime does not create them in each container's writable layer when the image lacks
    /// them (six files per start, on the data dir's disk; Docker keeps an "init layer" for the
    /// same reason). One per set of files and id range, built once, never changed.
    fn init_layer(&self, spec: &ContainerSpec, userns: Option<IdRange>) -> Result<PathBuf> {
        const ETC_FILES: [&str; 3] = ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"];
        let files: Vec<&str> = ETC_FILES
            .iter()
            .copied()
            .filter(|f| spec.mounts.iter().any(|m| m.dst == Path::new(f)))
            .collect();
        let mask: u32 = ETC_FILES
            .iter()
            .enumerate()
            .filter(|(_, f)| files.contains(f))
            .map(|(i, _)| 1 << i)
            .sum();
        let name = match userns {
            Some(r) => format!("v1-{mask}.u{}-{}", r.host_start, r.size),
            None => format!("v1-{mask}"),
        };
        let base = self.cfg.root.join("init");
        let dst = base.join(&name);
        if dst.is_dir() {
            return Ok(dst);
        }
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = base.join(format!(".tmp-{}-{seq}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let owner = userns.map(|r| r.shift(0));
        let build = || -> Result<()> {
            mkdir(&base, 0o700)?;
            let mut dirs = vec![tmp.clone()];
            for d in ["proc", "dev", "sys"] {
                dirs.push(tmp.join(d));
            }
            if !files.is_empty() {
                dirs.push(tmp.join("etc"));
            }
            for d in &dirs {
                mkdir(d, 0o755)?;
            }
            let mut made = dirs;
            for f in &files {
                let p = tmp.join(f.trim_start_matches('/'));
                fs::write(&p, b"").ctx(|| format!("create {}", p.display()))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
                    .ctx(|| format!("chmod {}", p.display()))?;
                made.push(p);
            }
            if let Some(uid) = owner {
                for p in &made {
                    std::os::unix::fs::chown(p, Some(uid), Some(uid))
                        .ctx(|| format!("chown {}", p.display()))?;
                }
            }
            Ok(())
        };
        if let Err(e) = build() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, &dst) {
            Ok(()) => Ok(dst),
            Err(_) if dst.is_dir() => {
                // Built concurrently by another create.
                let _ = fs::remove_dir_all(&tmp);
                Ok(dst)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(RuntimeError::Io {
                    context: format!("store {}", dst.display()),
                    source: e,
                })
            }
        }
    }

    /// Starts `flotilla shim --standby` and waits until it has detached and says `ready`.
    async fn spawn_standby(&self) -> Result<Standby> {
        let mut child = tokio::process::Command::new(&self.cfg.shim_exe)
            .args(&self.cfg.shim_args)
            .arg("--standby")
            .env(strays::SHIM_ENV, &self.mark)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .ctx(|| format!("start shim {}", self.cfg.shim_exe.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(RuntimeError::Shim("shim started without its pipes".into()));
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(STANDBY_TIMEOUT, stdout.read_line(&mut line)).await;
        if read.is_ok() {
            // The process we started forks the real shim and exits at once.
            let _ = child.wait().await;
        } else {
            // Hung before it could fork: do not wait for it. Closing its pipes (on return) ends
            // a shim that did fork.
            let _ = child.start_kill();
        }
        let want = format!("ready {}", flotilla_shim::STANDBY_PROTOCOL);
        let pid = line
            .trim()
            .strip_prefix(&want)
            .and_then(|rest| rest.trim().parse::<u32>().ok());
        match (read, pid) {
            (Ok(Ok(_)), Some(pid)) => Ok(Standby { stdin, stdout, pid }),
            (Ok(Ok(_)), None) if line.starts_with("ready") => Err(RuntimeError::Shim(format!(
                "{} answered {:?}, this agent expects {want:?}: it comes from another build; install the flotilla-shim built with this flotilla",
                self.cfg.shim_exe.display(),
                line.trim()
            ))),
            (Ok(Ok(_)), None) => Err(RuntimeError::Shim(format!(
                "shim did not start: {}",
                line.trim().strip_prefix("error ").unwrap_or(line.trim())
            ))),
            (Ok(Err(e)), _) => Err(RuntimeError::Shim(format!("read from the shim: {e}"))),
            (Err(_), _) => Err(RuntimeError::Shim(format!(
                "the shim did not start within {}s",
                STANDBY_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Starts the next standby shim in the background, unless one is ready or starting.
    fn replenish(self: &Arc<Self>) {
        if !self.cfg.shim_standby {
            return;
        }
        let Ok(mut filler) = self.filler.lock() else {
            return;
        };
        if filler.as_ref().is_some_and(|f| !f.is_finished()) {
            return;
        }
        let me = self.clone();
        *filler = Some(tokio::spawn(async move {
            if me.standby.lock().map_or(true, |s| s.is_some()) {
                return;
            }
            match me.spawn_standby().await {
                Ok(sb) => {
                    if let Ok(mut slot) = me.standby.lock() {
                        slot.get_or_insert(sb);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot start a standby shim"),
            }
        }));
    }

    /// Hands the container to a shim (the standby one when ready, else a new one) and waits for
    /// its one-line handshake (`ok …` / `error …`).
    async fn spawn_shim(self: &Arc<Self>, info: &ContainerInfo) -> Result<()> {
        let wire = flotilla_shim::encode_args(&self.shim_args(info).to_args());
        let ready = self.standby.lock().ok().and_then(|mut s| s.take());
        let mut shim = match ready {
            Some(mut sb) => match sb.stdin.write_all(&wire).await {
                Ok(()) => sb,
                Err(e) => {
                    // It died while waiting (or belongs to a stopped async runtime): it never
                    // read the arguments, so a new shim can take them.
                    tracing::debug!(error = %e, "standby shim unusable; starting another");
                    self.spawn_standby_with(&wire).await?
                }
            },
            None => self.spawn_standby_with(&wire).await?,
        };
        self.replenish();
        drop(shim.stdin);
        let mut line = String::new();
        let read =
            tokio::time::timeout(SHIM_HANDSHAKE_TIMEOUT, shim.stdout.read_line(&mut line)).await;
        if read.is_err() {
            return Err(RuntimeError::Shim(format!(
                "no handshake from the shim within {}s (is the oci runtime hanging? see {}/runtime.log)",
                SHIM_HANDSHAKE_TIMEOUT.as_secs(),
                self.vdir(&info.id).display()
            )));
        }
        let line = line.trim();
        if line.starts_with("ok ") {
            tracing::debug!(container = %info.id, handshake = %line, "shim ready");
            Ok(())
        } else if let Some(msg) = line.strip_prefix("error ") {
            Err(RuntimeError::Oci(msg.to_string()))
        } else {
            Err(RuntimeError::Shim(format!(
                "shim exited without a handshake (got {line:?})"
            )))
        }
    }

    async fn spawn_standby_with(&self, wire: &[u8]) -> Result<Standby> {
        let mut sb = self.spawn_standby().await?;
        sb.stdin
            .write_all(wire)
            .await
            .ctx(|| "send the shim its arguments".into())?;
        Ok(sb)
    }

    /// State from the shim, or from `status.json` when the shim is dead.
    async fn state(&self, id: &str) -> Result<ContainerState> {
        self.info(id)?;
        match shim_client::call(&self.socket(id), id, &Request::State).await {
            Ok(s) => Ok(to_state(&s, true)),
            Err(RuntimeError::ShimDead(_)) => Ok(self.dead_state(id)),
            Err(e) => Err(e),
        }
    }

    fn dead_state(&self, id: &str) -> ContainerState {
        let recorded: Option<ShimState> = fs::read(self.vdir(id).join("status.json"))
            .or_else(|_| fs::read(self.dir(id).join("status.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match recorded {
            Some(s) if s.exit_code.is_some() => to_state(&s, false),
            Some(s) => ContainerState {
                status: ContainerStatus::Unknown,
                ..to_state(&s, false)
            },
            None => ContainerState {
                id: id.to_string(),
                status: ContainerStatus::Unknown,
                pid: 0,
                exit_code: None,
                oom_killed: false,
                started_at: None,
                finished_at: None,
                shim_alive: false,
                shim_pid: 0,
            },
        }
    }

    async fn exit_of(&self, id: &str, req: Request) -> Result<ExitStatus> {
        self.info(id)?;
        let s = match shim_client::call(&self.socket(id), id, &req).await {
            Ok(s) => to_state(&s, true),
            Err(RuntimeError::ShimDead(_)) => {
                let s = self.dead_state(id);
                if s.exit_code.is_none() {
                    return Err(RuntimeError::ShimDead(id.into()));
                }
                s
            }
            Err(e) => return Err(e),
        };
        Ok(ExitStatus {
            code: s.exit_code.unwrap_or(255),
            oom_killed: s.oom_killed,
        })
    }

    /// Removes container dirs that never got their meta.json (create interrupted by a crash),
    /// and volatile dirs whose container is gone.
    fn half_created_sync(&self) -> Result<Vec<String>> {
        let mut cleaned = Vec::new();
        let dir = self.cfg.root.join("containers");
        for e in fs::read_dir(&dir)
            .ctx(|| format!("list {}", dir.display()))?
            .flatten()
        {
            let id = e.file_name().to_string_lossy().into_owned();
            if !e.path().join("meta.json").exists() {
                tracing::warn!(container = %id, "removing a container whose create was interrupted");
                self.cleanup_sync(&id, false)?;
                cleaned.push(id);
            }
        }
        let vdir = self.cfg.state.join("containers");
        for e in fs::read_dir(&vdir)
            .ctx(|| format!("list {}", vdir.display()))?
            .flatten()
        {
            let id = e.file_name().to_string_lossy().into_owned();
            if !self.dir(&id).exists() {
                tracing::warn!(container = %id, "removing the state of a container without a record");
                self.cleanup_sync(&id, false)?;
                cleaned.push(id);
            }
        }
        Ok(cleaned)
    }

    /// Frees everything of a container (idempotent).
    fn cleanup_sync(&self, id: &str, keep_log: bool) -> Result<()> {
        let dir = self.dir(id);
        let vdir = self.vdir(id);
        let info = self.info(id).ok();
        // The runtime's own state (when the shim could not delete it).
        let _ = Command::new(&self.runtime_path)
            .arg("--root")
            .arg(self.runc_root_of(id))
            .args(["delete", "--force", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // A record written by an older build names its bundle under the lasting dir.
        let mut rootfs = vec![vdir.join("bundle/rootfs"), dir.join("bundle/rootfs")];
        if let Some(i) = &info {
            rootfs.push(i.bundle.join("rootfs"));
        }
        for r in overlay::mounted_among(&rootfs) {
            overlay::unmount(&r)?;
        }
        if let Some(i) = &info {
            remove_cgroup(&i.cgroups_path);
        }
        self.records().remove(id);
        let _ = fs::remove_file(self.socket(id));
        for d in [&vdir, &dir] {
            if d.exists() {
                fs::remove_dir_all(d).ctx(|| format!("remove {}", d.display()))?;
            }
        }
        if !keep_log {
            let logs = self.cfg.root.join("logs").join(id);
            if logs.exists() {
                fs::remove_dir_all(&logs).ctx(|| format!("remove {}", logs.display()))?;
            }
        }
        Ok(())
    }
}

/// Removes a container's cgroup directories left in any hierarchy (v1 controllers or v2).
fn remove_cgroup(cgroups_path: &str) {
    let rel = cgroups_path.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let mut candidates = vec![PathBuf::from("/sys/fs/cgroup").join(rel)];
    if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            candidates.push(e.path().join(rel));
        }
    }
    for c in candidates {
        if c.is_dir() {
            if let Err(e) = fs::remove_dir(&c) {
                tracing::warn!(cgroup = %c.display(), error = %e, "could not remove container cgroup");
            }
        }
    }
}

fn to_state(s: &ShimState, alive: bool) -> ContainerState {
    ContainerState {
        id: s.id.clone(),
        status: match s.status {
            Status::Created => ContainerStatus::Created,
            Status::Running => ContainerStatus::Running,
            Status::Stopped => ContainerStatus::Stopped,
        },
        pid: s.pid,
        exit_code: s.exit_code,
        oom_killed: s.oom_killed,
        started_at: s.started_at.clone(),
        finished_at: s.finished_at.clone(),
        shim_alive: alive,
        shim_pid: s.shim_pid,
    }
}

impl RuntimeDriver for Runtime {
    fn create(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<ContainerInfo>> {
        let inner = self.inner.clone();
        async move {
            spec::validate_id(&spec.id)?;
            let id = spec.id.clone();
            let dir = inner.dir(&id);
            // Claim the id atomically.
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(RuntimeError::ContainerExists(id))
                }
                Err(e) => {
                    return Err(RuntimeError::Io {
                        context: format!("create {}", dir.display()),
                        source: e,
                    })
                }
            }
            tracing::debug!(container = %id, "creating container");
            let i2 = inner.clone();
            let res = match blocking(move || i2.create_sync(spec)).await {
                Ok(info) => inner.spawn_shim(&info).await.map(|()| info),
                Err(e) => Err(e),
            };
            if let Err(err) = &res {
                tracing::warn!(container = %id, error = %err, "create failed; cleaning up");
                let i3 = inner.clone();
                let id2 = id.clone();
                let _ = blocking(move || i3.cleanup_sync(&id2, false)).await;
            }
            res
        }
        .boxed()
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        async move {
            self.inner.info(id)?;
            shim_client::call(&self.inner.socket(id), id, &Request::Start)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerState>> {
        async move { self.inner.state(id).await }.boxed()
    }

    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ExitStatus>> {
        async move { self.inner.exit_of(id, Request::Wait).await }.boxed()
    }

    fn signal<'a>(&'a self, id: &'a str, signal: i32) -> BoxFuture<'a, Result<()>> {
        async move {
            self.inner.info(id)?;
            shim_client::call(&self.inner.socket(id), id, &Request::Signal { signal })
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, Result<ExitStatus>> {
        let grace_ms = grace.as_millis().min(u64::MAX as u128) as u64;
        async move {
            let signal = self.inner.info(id)?.stop_signal;
            self.inner
                .exit_of(id, Request::Stop { grace_ms, signal })
                .await
        }
        .boxed()
    }

    fn remove<'a>(&'a self, id: &'a str, keep_log: bool) -> BoxFuture<'a, Result<()>> {
        async move {
            self.inner.info(id)?;
            match shim_client::call(&self.inner.socket(id), id, &Request::Delete).await {
                Ok(_) | Err(RuntimeError::ShimDead(_)) => {}
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "shim delete failed; forcing")
                }
            }
            // The shim exits right after answering; make sure it is gone before removing its dir.
            let inner = self.inner.clone();
            let id2 = id.to_string();
            blocking(move || inner.cleanup_sync(&id2, keep_log)).await
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>>> {
        let inner = self.inner.clone();
        async move { blocking(move || inner.list_sync()).await }.boxed()
    }

    fn adopt(&self) -> BoxFuture<'_, Result<AdoptReport>> {
        async move {
            let mut report = AdoptReport::default();
            // A create interrupted by an agent crash leaves a dir without meta.json: undo it.
            let inner = self.inner.clone();
            let half_created = blocking(move || inner.half_created_sync()).await?;
            report.cleaned_up = half_created;
            for info in self.list().await? {
                let s = match self.inner.state(&info.id).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(container = %info.id, error = %e, "shim does not answer");
                        ContainerState { shim_alive: false, ..self.inner.dead_state(&info.id) }
                    }
                };
                if s.shim_alive {
                    tracing::info!(container = %info.id, pid = s.pid, status = ?s.status, "re-adopted shim");
                    report.adopted.push(s);
                } else {
                    tracing::warn!(container = %info.id, status = ?s.status, exit_code = ?s.exit_code, "shim is dead");
                    report.dead_shims.push(s);
                }
            }
            Ok(report)
        }
        .boxed()
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.inner.log_path(id)
    }
}
