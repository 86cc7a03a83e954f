//! A task's storage on this node: its volumes (the node's `flotilla-volume` store), host binds,
//! tmpfs mounts, and its secrets and configs as files on a per-task tmpfs.
//!
//! - **Volumes** are created on first use under `<data-dir>/volumes`, owned by the container's
//!   mapped root, and filled from the image's content at the target unless `volume-nocopy`
//!   (the runtime's copy-up). An image's `VOLUME` paths that no mount covers get anonymous
//!   volumes, removed with the task's container.
//! - **One writer**: a volume not declared `shared` is mounted by one container at a time. The
//!   task waits (up to [`VOLUME_WAIT`]) until every other container holding it here has
//!   stopped; containers carry the volumes they hold in the label [`VOLUMES_LABEL`], so this
//!   holds across agent restarts.
//! - **Secrets and configs** are fetched from the managers only for a task assigned to this
//!   node (the manager checks), written to a tmpfs mounted at
//!   `<runtime state>/files/<task>` (never on disk, never in the data dir), owned by the
//!   mapped ids the reference asks for, and bind-mounted read-only at their targets. The tmpfs
//!   is unmounted when the container is removed.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine;
use flotilla_runtime::{BindMount, ContainerStatus, IdRange, RuntimeDriver, TmpfsMount};
use flotilla_types::{FileKind, FileObject, MountKind, Task, TaskFiles};
use flotilla_volume::VolumeStore;

use crate::{AgentCtx, TaskError};

/// The container label listing the (unshared) volumes a container holds, comma-separated.
pub const VOLUMES_LABEL: &str = "flotilla.volumes";

/// How long a task waits for another container to release its volume.
pub const VOLUME_WAIT: Duration = Duration::from_secs(120);

/// What a task's container mounts besides its rootfs.
#[derive(Debug, Default)]
pub struct TaskMounts {
    pub binds: Vec<BindMount>,
    pub tmpfs: Vec<TmpfsMount>,
    /// Volumes held alone (the container's [`VOLUMES_LABEL`]).
    pub exclusive: Vec<String>,
}

/// The node's storage for tasks.
pub struct NodeStorage {
    pub volumes: VolumeStore,
    /// Where per-task file tmpfs mounts go (`<runtime state>/files`).
    files_root: PathBuf,
    userns: Option<IdRange>,
    ctx: Weak<AgentCtx>,
}

fn storage_err(what: impl std::fmt::Display) -> TaskError {
    TaskError::Storage(what.to_string())
}

impl NodeStorage {
    /// Opens the volume store under `data_dir/volumes` and the files root under the runtime's
    /// state directory.
    pub fn open(ctx: &Arc<AgentCtx>) -> Result<NodeStorage, String> {
        let cfg = ctx.runtime.config();
        let userns = cfg.userns;
        let volumes = VolumeStore::open(ctx.config.data_dir.join("volumes"), userns)
            .map_err(|e| format!("volume store: {e}"))?;
        let files_root = cfg.state.join("files");
        std::fs::create_dir_all(&files_root)
            .map_err(|e| format!("{}: {e}", files_root.display()))?;
        if let Some(r) = userns {
            std::os::unix::fs::chown(&files_root, Some(0), Some(r.shift(0)))
                .map_err(|e| format!("{}: {e}", files_root.display()))?;
            std::fs::set_permissions(&files_root, std::fs::Permissions::from_mode(0o710))
                .map_err(|e| format!("{}: {e}", files_root.display()))?;
        } else {
            std::fs::set_permissions(&files_root, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("{}: {e}", files_root.display()))?;
        }
        Ok(NodeStorage {
            volumes,
            files_root,
            userns,
            ctx: Arc::downgrade(ctx),
        })
    }

    fn shift(&self, id: u32) -> u32 {
        self.userns.map(|r| r.shift(id)).unwrap_or(id)
    }

    /// The per-task files directory.
    pub fn files_dir(&self, task_id: &str) -> PathBuf {
        self.files_root.join(task_id)
    }

    /// Everything a task mounts: volumes created (and waited for), binds checked, secrets and
    /// configs written. `image_volumes` are the image's `VOLUME` paths.
    pub async fn prepare(
        self: &Arc<Self>,
        task: &Task,
        image_volumes: Vec<String>,
        rt: &dyn RuntimeDriver,
    ) -> Result<TaskMounts, TaskError> {
        let mut out = TaskMounts::default();
        let c = &task.spec.container;
        let mut targets: Vec<String> = Vec::new();
        for (i, m) in c.mounts.iter().enumerate() {
            targets.push(m.target.trim_end_matches('/').to_string());
            match m.kind {
                MountKind::Volume => {
                    let (name, anonymous) = if m.source.is_empty() {
                        (anonymous_name(&task.id, i), true)
                    } else {
                        (m.source.clone(), false)
                    };
                    let path = self
                        .create_volume(&name, &m.volume_labels, m.volume_size)
                        .await?;
                    if !anonymous && !m.shared {
                        out.exclusive.push(name);
                    }
                    out.binds.push(BindMount {
                        src: path,
                        dst: m.target.clone().into(),
                        readonly: m.readonly,
                        copy_up: !m.nocopy,
                    });
                }
                MountKind::Bind => {
                    let src = PathBuf::from(&m.source);
                    // The manager checked the path against the allow-list; a symlink on the way
                    // (one a container with a writable bind could plant) would lead elsewhere.
                    match tokio::fs::canonicalize(&src).await {
                        Err(_) => {
                            return Err(storage_err(format!(
                                "bind source {} does not exist on this node",
                                m.source
                            )))
                        }
                        Ok(real) if real != src.components().collect::<PathBuf>() => {
                            return Err(storage_err(format!(
                                "bind source {} leads through a symlink (to {}): give the real path",
                                m.source,
                                real.display()
                            )))
                        }
                        Ok(_) => {}
                    }
                    out.binds.push(BindMount {
                        src,
                        dst: m.target.clone().into(),
                        readonly: m.readonly,
                        copy_up: false,
                    });
                }
                MountKind::Tmpfs => out.tmpfs.push(TmpfsMount {
                    dst: m.target.clone().into(),
                    size: m.tmpfs_size,
                    mode: m.tmpfs_mode,
                }),
            }
        }
        // The image's VOLUME paths no mount covers: anonymous volumes, as Docker.
        for (k, v) in image_volumes.iter().enumerate() {
            let t = v.trim_end_matches('/').to_string();
            if t.is_empty() || !t.starts_with('/') || t.split('/').any(|p| p == "..") {
                continue;
            }
            if targets.contains(&t) {
                continue;
            }
            targets.push(t.clone());
            let name = anonymous_name(&task.id, c.mounts.len() + k);
            let path = self.create_volume(&name, &BTreeMap::new(), None).await?;
            out.binds.push(BindMount {
                src: path,
                dst: t.into(),
                readonly: false,
                copy_up: true,
            });
        }
        self.wait_for_volumes(&task.id, &out.exclusive, rt).await?;
        if !c.secrets.is_empty() || !c.configs.is_empty() {
            out.binds.extend(self.write_files(task).await?);
        }
        Ok(out)
    }

    async fn create_volume(
        self: &Arc<Self>,
        name: &str,
        labels: &BTreeMap<String, String>,
        size_limit: Option<u64>,
    ) -> Result<PathBuf, TaskError> {
        let this = self.clone();
        let (name, labels) = (name.to_string(), labels.clone());
        crate::blocking(move || this.volumes.create_with(&name, labels, size_limit))
            .await
            .map_err(storage_err)?
            .map(|v| v.path)
            .map_err(|e| storage_err(format!("volume: {e}")))
    }

    /// Waits until no other container on this node holds one of `names` (a container that
    /// has stopped no longer holds it).
    async fn wait_for_volumes(
        &self,
        task_id: &str,
        names: &[String],
        rt: &dyn RuntimeDriver,
    ) -> Result<(), TaskError> {
        if names.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + VOLUME_WAIT;
        loop {
            let holder = holder_of(task_id, names, rt).await;
            let Some((other, vol)) = holder else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(storage_err(format!(
                    "volume {vol} is still mounted by task {other} on this node after {}s; a volume not declared `shared` has one running task at a time",
                    VOLUME_WAIT.as_secs()
                )));
            }
            tracing::debug!(task = %task_id, volume = %vol, holder = %other, "waiting for the volume");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fetches the task's secrets and configs and writes them to its tmpfs; returns the binds.
    async fn write_files(self: &Arc<Self>, task: &Task) -> Result<Vec<BindMount>, TaskError> {
        let ctx = self.ctx.upgrade().ok_or(TaskError::ShuttingDown)?;
        let node_id = ctx.node.identity().node_id;
        let path = format!("/v1/nodes/{node_id}/tasks/{}/files", task.id);
        let mut last = String::from("no manager known");
        let mut files = None;
        for addr in crate::upstream::targets(&ctx) {
            let client = ctx.tls.peer(&addr).with_timeout(Duration::from_secs(10));
            match client.get_json::<TaskFiles>(&path).await {
                Ok(f) => {
                    files = Some(f);
                    break;
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        let files = files.ok_or_else(|| {
            storage_err(format!(
                "fetching the task's secrets and configs failed: {last}"
            ))
        })?;
        let this = self.clone();
        let task = task.clone();
        crate::blocking(move || this.write_files_blocking(&task, &files))
            .await
            .map_err(storage_err)?
    }

    fn write_files_blocking(
        &self,
        task: &Task,
        files: &TaskFiles,
    ) -> Result<Vec<BindMount>, TaskError> {
        let dir = self.files_dir(&task.id);
        let c = &task.spec.container;
        let mut wanted: Vec<(FileKind, &flotilla_types::FileReference, &FileObject)> = Vec::new();
        for (kind, refs, objs) in [
            (FileKind::Secret, &c.secrets, &files.secrets),
            (FileKind::Config, &c.configs, &files.configs),
        ] {
            for r in refs {
                let o = objs
                    .iter()
                    .find(|o| {
                        if r.id.is_empty() {
                            o.name == r.source
                        } else {
                            o.id == r.id
                        }
                    })
                    .ok_or_else(|| {
                        storage_err(format!(
                            "the managers sent no {} {}",
                            kind.as_str(),
                            r.source
                        ))
                    })?;
                wanted.push((kind, r, o));
            }
        }
        // The manager is trusted, but bounded anyway: each object at most the API's limit.
        let mut decoded = Vec::with_capacity(wanted.len());
        let mut total = 0usize;
        for (kind, r, o) in &wanted {
            let data = base64::engine::general_purpose::STANDARD
                .decode(o.data.as_bytes())
                .map_err(|e| {
                    storage_err(format!(
                        "{} {}: bad data from the manager: {e}",
                        kind.as_str(),
                        r.source
                    ))
                })?;
            if data.len() > flotilla_types::MAX_SECRET_BYTES {
                return Err(storage_err(format!(
                    "{} {} is over the size limit",
                    kind.as_str(),
                    r.source
                )));
            }
            total += data.len();
            decoded.push(data);
        }
        mount_files_tmpfs(&dir, total, self.userns.map(|r| r.shift(0)))?;
        let mut binds = Vec::new();
        for (i, ((kind, r, _), data)) in wanted.iter().zip(decoded).enumerate() {
            // Files are named by position: a target path never becomes a host path.
            let file = dir.join(format!("{}-{i}", kind.as_str()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&file)
                .map_err(|e| storage_err(format!("{}: {e}", file.display())))?;
            f.write_all(&data)
                .map_err(|e| storage_err(format!("{}: {e}", file.display())))?;
            std::os::unix::fs::fchown(&f, Some(self.shift(r.uid)), Some(self.shift(r.gid)))
                .map_err(|e| storage_err(format!("chown {}: {e}", file.display())))?;
            f.set_permissions(std::fs::Permissions::from_mode(r.mode & 0o777))
                .map_err(|e| storage_err(format!("chmod {}: {e}", file.display())))?;
            binds.push(BindMount {
                src: file,
                dst: r.target_path(*kind).into(),
                readonly: true,
                copy_up: false,
            });
        }
        Ok(binds)
    }

    /// Frees what `prepare` made for a task whose container is gone: its files tmpfs and its
    /// anonymous volumes.
    pub async fn release(self: &Arc<Self>, task_id: &str) {
        let this = self.clone();
        let id = task_id.to_string();
        let _ = crate::blocking(move || {
            let dir = this.files_dir(&id);
            if dir.exists() {
                if let Err(e) = nix_umount(&dir) {
                    tracing::warn!(task = %id, error = %e, "unmounting the task's files failed");
                }
                let _ = std::fs::remove_dir(&dir);
            }
            let prefix = format!("anon-{id}-");
            if let Ok(list) = this.volumes.list() {
                for v in list.into_iter().filter(|v| v.name.starts_with(&prefix)) {
                    if let Err(e) = this.volumes.remove(&v.name) {
                        tracing::warn!(task = %id, volume = %v.name, error = %e, "removing an anonymous volume failed");
                    }
                }
            }
        })
        .await;
    }

    /// Tasks with a files directory here (for the sweep of leftovers).
    pub fn tasks_with_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.files_root)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// An anonymous volume's name: the task and the mount's position.
fn anonymous_name(task_id: &str, i: usize) -> String {
    format!("anon-{task_id}-{i}")
}

/// Another container (not `task_id`) on this node that holds one of `names` and has not
/// stopped, with the volume.
async fn holder_of(
    task_id: &str,
    names: &[String],
    rt: &dyn RuntimeDriver,
) -> Option<(String, String)> {
    let list = rt.list().await.ok()?;
    for c in list.iter().filter(|c| c.id != task_id) {
        let Some(held) = c.spec.labels.get(VOLUMES_LABEL) else {
            continue;
        };
        let Some(vol) = held.split(',').find(|v| names.iter().any(|n| n == v)) else {
            continue;
        };
        let stopped = matches!(
            rt.state(&c.id).await.map(|s| s.status),
            Ok(ContainerStatus::Stopped) | Err(_)
        );
        if !stopped {
            return Some((c.id.clone(), vol.to_string()));
        }
    }
    None
}

/// Volumes the containers on this node hold now (running or not yet stopped), with the tasks.
pub async fn volumes_in_use(rt: &dyn RuntimeDriver) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(list) = rt.list().await else {
        return out;
    };
    for c in list {
        let Some(vols) = c.spec.labels.get(VOLUMES_LABEL) else {
            continue;
        };
        if matches!(
            rt.state(&c.id).await.map(|s| s.status),
            Ok(ContainerStatus::Stopped)
        ) {
            continue;
        }
        for v in vols.split(',').filter(|v| !v.is_empty()) {
            out.entry(v.to_string()).or_default().push(c.id.clone());
        }
    }
    out
}

/// Mounts a tmpfs for one task's files: sized for them (plus room for the inodes), mode 0710
/// with the mapped root's group (the runtime reaches the files from the container's user
/// namespace; no other host user may list them).
fn mount_files_tmpfs(dir: &Path, total: usize, mapped_gid: Option<u32>) -> Result<(), TaskError> {
    if dir.exists() {
        // A leftover from an earlier attempt of this task: start clean.
        let _ = nix_umount(dir);
        let _ = std::fs::remove_dir_all(dir);
    }
    std::fs::create_dir(dir).map_err(|e| storage_err(format!("{}: {e}", dir.display())))?;
    let size = total + (1 << 20);
    let (mode, gid) = match mapped_gid {
        Some(g) => ("0710", g),
        None => ("0700", 0),
    };
    let opts = format!("size={size},mode={mode},uid=0,gid={gid},nr_inodes=4096");
    if let Err(e) = nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        // Not `noexec`: a flag on the source locks it for the container's user namespace, and
        // the runtime's read-only remount of the bind (nosuid, nodev, ro) would then fail.
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    ) {
        let _ = std::fs::remove_dir(dir);
        return Err(storage_err(format!(
            "mounting a tmpfs at {}: {e}",
            dir.display()
        )));
    }
    Ok(())
}

fn nix_umount(dir: &Path) -> std::io::Result<()> {
    match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
        Err(e) => Err(std::io::Error::from(e)),
    }
}
