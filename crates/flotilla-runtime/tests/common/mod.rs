//! Shared set-up for the runtime's integration tests: real runc, real mounts, root required.
#![allow(dead_code)]

use flotilla_runtime::{testing, Runtime, RuntimeConfig, RuntimeDriver};
use std::path::{Path, PathBuf};

/// Whether this machine can run the integration tests (root + runc). Prints loudly when not.
pub fn can_run() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let runc =
        flotilla_runtime::HostProbe::run(&RuntimeConfig::new("/nonexistent", "/bin/true", vec![]))
            .runtime_path
            .is_some();
    if !root || !runc {
        eprintln!(
            "!!!!! SKIPPING runtime integration test: needs root ({root}) and runc ({runc}) !!!!!"
        );
        return false;
    }
    true
}

/// A runtime rooted in a fresh directory, removed (with every container) on drop.
pub struct Env {
    pub runtime: Runtime,
    pub root: PathBuf,
    pub image: String,
    pub prefix: String,
}

pub fn shim_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flotilla-runtime-test"))
}

pub fn config(root: &Path) -> RuntimeConfig {
    let mut cfg = RuntimeConfig::new(root, shim_exe(), vec!["shim".into()]);
    cfg.log_max_bytes = 1 << 20;
    cfg
}

/// A short unique prefix for container ids (cgroups are global to the host).
pub fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ft-{tag}-{}-{:x}", std::process::id(), nanos & 0xffff)
}

impl Env {
    pub fn new(tag: &str) -> Env {
        let prefix = unique(tag);
        let root = PathBuf::from("/tmp").join(format!("flotilla-rt-{prefix}"));
        let _ = std::fs::remove_dir_all(&root);
        let runtime = Runtime::new(config(&root)).expect("runtime");
        let image =
            testing::import_busybox(runtime.images(), "busybox:test").expect("busybox image");
        Env {
            runtime,
            root,
            image,
            prefix,
        }
    }

    pub fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::env::var_os("FLOTILLA_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.root.display());
            return;
        }
        let rt = self.runtime.clone();
        let cleanup = async move {
            if let Ok(list) = rt.list().await {
                for c in list {
                    let _ = rt.remove(&c.id, false).await;
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(_) => {
                // Inside a runtime: run the cleanup on a separate thread with its own runtime.
                let _ = std::thread::spawn(move || {
                    if let Ok(r) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        r.block_on(cleanup);
                    }
                })
                .join();
            }
            Err(_) => {
                if let Ok(r) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    r.block_on(cleanup);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Paths under /sys/fs/cgroup that still hold a cgroup for `id`: the unified hierarchy
/// (`/sys/fs/cgroup/flotilla/<id>` on cgroup v2) and every v1 controller or hybrid
/// `unified` mount (`/sys/fs/cgroup/<hierarchy>/flotilla/<id>`).
pub fn leftover_cgroups(id: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![base.join("flotilla").join(id)];
    if let Ok(rd) = std::fs::read_dir(base) {
        candidates.extend(rd.flatten().map(|e| e.path().join("flotilla").join(id)));
    }
    candidates.into_iter().filter(|p| p.is_dir()).collect()
}

/// Mount points under `root`.
pub fn mounts_under(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let r = root.display().to_string();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&r))
        .map(str::to_string)
        .collect()
}

/// Runs a container to completion: (exit code, stdout+stderr lines).
pub async fn run_to_exit(
    rt: &Runtime,
    spec: flotilla_runtime::ContainerSpec,
) -> (i32, Vec<String>) {
    let id = spec.id.clone();
    rt.create(spec).await.expect("create");
    rt.start(&id).await.expect("start");
    let exit = rt.wait(&id).await.expect("wait");
    let lines = flotilla_runtime::read_logs(&rt.log_path(&id), None, None)
        .expect("logs")
        .into_iter()
        .map(|l| l.line)
        .collect();
    (exit.code, lines)
}

/// Waits until the container's log has a line equal to `want`.
pub async fn wait_line(rt: &Runtime, id: &str, want: &str, secs: u64) -> bool {
    let lp = rt.log_path(id);
    testing::wait_for(std::time::Duration::from_secs(secs), || {
        let lp = lp.clone();
        let want = want.to_string();
        async move {
            flotilla_runtime::read_logs(&lp, None, None)
                .ok()?
                .iter()
                .any(|l| l.line == want)
                .then_some(())
        }
    })
    .await
    .is_some()
}

/// The real uid of a host process.
pub fn host_uid(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
