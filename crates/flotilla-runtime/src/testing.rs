//! Test helpers: a busybox image built from Debian's busybox-static, and the contract suite
//! every [`RuntimeDriver`] must pass.

use crate::driver::{ContainerStatus, RuntimeDriver};
use crate::error::{IoContext, Result, RuntimeError};
use crate::image::{ImageConfigInput, ImageStore};
use crate::spec::ContainerSpec;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Applets linked in the test rootfs.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "sleep", "id", "cat", "ls", "touch", "mount", "insmod", "trap", "true", "false",
    "mkdir", "grep", "dd", "head", "tail", "kill", "ps", "wc", "yes", "seq", "printf", "unshare",
    "hostname", "pwd",
];

/// Finds a static busybox, installing Debian's busybox-static when missing.
pub fn busybox() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    eprintln!("busybox missing: installing busybox-static with apt-get");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "busybox-static"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok && Path::new("/bin/busybox").is_file() {
        Ok(PathBuf::from("/bin/busybox"))
    } else {
        Err(RuntimeError::HostRequirement(
            "busybox not found: apt-get install busybox-static".into(),
        ))
    }
}

/// Writes a minimal busybox root filesystem into `dir`.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let bb = busybox()?;
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root", "mnt"] {
        fs::create_dir_all(dir.join(d)).ctx(|| format!("mkdir {d}"))?;
    }
    fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .ctx(|| "chmod tmp".into())?;
    fs::copy(&bb, dir.join("bin/busybox")).ctx(|| "copy busybox".into())?;
    for a in APPLETS {
        let l = dir.join("bin").join(a);
        if !l.exists() {
            std::os::unix::fs::symlink("busybox", &l).ctx(|| format!("link {a}"))?;
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .ctx(|| "passwd".into())?;
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").ctx(|| "group".into())?;
    Ok(())
}

/// Imports the busybox rootfs as image `name` (cmd `sh`). Returns the manifest digest.
pub fn import_busybox(store: &ImageStore, name: &str) -> Result<String> {
    let tmp = store
        .root()
        .join("tmp")
        .join(format!("busybox-src-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    busybox_rootfs(&tmp)?;
    let input = ImageConfigInput {
        cmd: Some(vec!["sh".into()]),
        workdir: Some("/".into()),
        ..Default::default()
    };
    let res = store.import_rootfs(&tmp, name, &input);
    let _ = fs::remove_dir_all(&tmp);
    res
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn check(cond: bool, what: &str) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!("contract violated: {what}")))
    }
}

/// A spec running `args` (the image's cmd when empty) in `image` with default (secure) options.
pub fn spec(id: &str, image: &str, args: &[&str]) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        image: image.into(),
        args: (!args.is_empty()).then(|| args.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

/// The contract every [`RuntimeDriver`] passes. `image` must be a busybox image
/// ([`import_busybox`]); `prefix` makes container ids unique.
pub async fn contract_suite(d: &dyn RuntimeDriver, image: &str, prefix: &str) -> Result<()> {
    // 1. echo: output in the log, exit 0, created → running → stopped.
    let id = format!("{prefix}-echo");
    let info = d
        .create(spec(
            &id,
            image,
            &["sh", "-c", "echo hello-out; echo hello-err >&2"],
        ))
        .await?;
    check(info.id == id, "create returns the id")?;
    let st = d.state(&id).await?;
    check(
        st.status == ContainerStatus::Created,
        &format!("state created after create: {st:?}"),
    )?;
    check(
        matches!(
            d.create(spec(&id, image, &["true"])).await,
            Err(RuntimeError::ContainerExists(_))
        ),
        "duplicate id refused",
    )?;
    d.start(&id).await?;
    let exit = d.wait(&id).await?;
    check(exit.code == 0 && !exit.oom_killed, "echo exits 0")?;
    let st = d.state(&id).await?;
    check(
        st.status == ContainerStatus::Stopped && st.exit_code == Some(0),
        "state stopped with code 0",
    )?;
    check(
        st.started_at.is_some() && st.finished_at.is_some(),
        "timestamps recorded",
    )?;
    let logs = crate::read_logs(&d.log_path(&id), None, None).ctx(|| "read logs".into())?;
    check(
        logs.iter()
            .any(|l| l.stream == "stdout" && l.line == "hello-out"),
        "stdout in the log",
    )?;
    check(
        logs.iter()
            .any(|l| l.stream == "stderr" && l.line == "hello-err"),
        "stderr in the log",
    )?;
    check(d.list().await?.iter().any(|c| c.id == id), "listed")?;
    d.remove(&id, false).await?;
    check(!d.log_path(&id).exists(), "log removed")?;
    check(
        matches!(d.state(&id).await, Err(RuntimeError::ContainerNotFound(_))),
        "gone after remove",
    )?;

    // 2. A failing command reports its exit code.
    let id = format!("{prefix}-fail");
    d.create(spec(&id, image, &["sh", "-c", "exit 3"])).await?;
    d.start(&id).await?;
    check(d.wait(&id).await?.code == 3, "exit code 3 recorded")?;
    d.remove(&id, true).await?;
    check(
        d.log_path(&id).parent().is_some_and(|p| p.exists()),
        "log kept when asked",
    )?;
    let _ = fs::remove_dir_all(
        d.log_path(&id)
            .parent()
            .unwrap_or(Path::new("/nonexistent")),
    );

    // 3. Signal and stop with a grace period: the process sees SIGTERM and exits by itself.
    let id = format!("{prefix}-term");
    d.create(spec(
        &id,
        image,
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.05; done",
        ],
    ))
    .await?;
    d.start(&id).await?;
    let lp = d.log_path(&id);
    let ready = wait_for(Duration::from_secs(10), || {
        let lp = lp.clone();
        async move {
            let l = crate::read_logs(&lp, None, None).ok()?;
            l.iter().any(|l| l.line == "ready").then_some(())
        }
    })
    .await;
    check(ready.is_some(), "container printed ready")?;
    check(
        d.state(&id).await?.status == ContainerStatus::Running,
        "running",
    )?;
    let exit = d.stop(&id, Duration::from_secs(10)).await?;
    check(exit.code == 7, "trap ran: exit 7 after SIGTERM")?;
    let logs = crate::read_logs(&lp, None, None).ctx(|| "read logs".into())?;
    check(logs.iter().any(|l| l.line == "got-term"), "SIGTERM seen")?;
    d.remove(&id, false).await?;

    // 4. A process ignoring SIGTERM is killed after the grace period.
    let id = format!("{prefix}-kill");
    d.create(spec(
        &id,
        image,
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 0.05; done",
        ],
    ))
    .await?;
    d.start(&id).await?;
    let lp = d.log_path(&id);
    wait_for(Duration::from_secs(10), || {
        let lp = lp.clone();
        async move {
            crate::read_logs(&lp, None, None)
                .ok()?
                .iter()
                .any(|l| l.line == "ready")
                .then_some(())
        }
    })
    .await;
    let t = Instant::now();
    let exit = d.stop(&id, Duration::from_millis(300)).await?;
    check(
        exit.code == 128 + 9,
        "killed by SIGKILL after the grace period",
    )?;
    check(
        t.elapsed() >= Duration::from_millis(250),
        "grace period honoured",
    )?;
    d.remove(&id, false).await?;

    // 5. Removing a running container works.
    let id = format!("{prefix}-rm");
    d.create(spec(&id, image, &["sleep", "100"])).await?;
    d.start(&id).await?;
    d.remove(&id, false).await?;
    check(
        matches!(d.state(&id).await, Err(RuntimeError::ContainerNotFound(_))),
        "running container removed",
    )?;
    Ok(())
}
