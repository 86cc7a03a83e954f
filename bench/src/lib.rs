//! Shared helpers of the benchmarks: node processes on loopback, statistics, anchors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The release binary under test (`FLOTILLA_BIN` overrides).
pub fn flotilla_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FLOTILLA_BIN") {
        return PathBuf::from(p);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.join("../target/release/flotilla")
}

pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub addr: String,
    pub child: Option<Child>,
    /// Flags added to every start.
    pub extra: Vec<String>,
}

impl Node {
    pub fn spawn(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))?;
        let child = Command::new(flotilla_bin())
            .args(["node", "run", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &self.addr, "--name", &self.name])
            .args(extra)
            .args(&self.extra)
            .env(
                "FLOTILLA_LOG",
                std::env::var("BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting flotilla (build it first: cargo build --release -p flotilla)")?;
        self.child = Some(child);
        Ok(())
    }
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    pub fn socket(&self) -> String {
        format!("unix://{}/api.sock", self.dir.display())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(flotilla_bin())
            .args(["node", "cleanup", "--data-dir"])
            .arg(&self.dir)
            .output();
    }
}

pub fn cli(host: &str, args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new(flotilla_bin())
        .arg("--host")
        .arg(host)
        .args(args)
        .output()?;
    if !o.status.success() {
        bail!("flotilla {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

pub fn wait_for<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Busy share of all CPUs (0.0–1.0) over `window`, from `/proc/stat`.
pub fn cpu_busy(window: Duration) -> Option<f64> {
    fn read() -> Option<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = s
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal …
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((v.iter().take(8).sum(), idle))
    }
    let (t0, i0) = read()?;
    std::thread::sleep(window);
    let (t1, i1) = read()?;
    let total = t1.saturating_sub(t0);
    (total > 0).then(|| 1.0 - i1.saturating_sub(i0) as f64 / total as f64)
}

/// Waits (up to `max`) until the machine is quiet: under 5 % of all CPUs busy over 300 ms.
/// Every timed round starts from here, so neither system pays for the other's background
/// work (dockerd settling after `swarm init`, a previous round's teardown). Returns the last
/// busy share seen; callers print it when the machine never got quiet.
pub fn settle(max: Duration) -> f64 {
    let deadline = Instant::now() + max;
    loop {
        let busy = cpu_busy(Duration::from_millis(300)).unwrap_or(0.0);
        if busy < 0.05 || Instant::now() > deadline {
            return busy;
        }
    }
}

/// Percentile of sorted samples (nearest rank).
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Anchor: latency of a 4 KiB `O_DSYNC` write on the disk that holds `dir` (the floor of any
/// fsynced commit).
pub fn fsync_anchor(dir: &Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("fsync-anchor");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(&path)?;
    let buf = vec![7u8; 4096];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf)?;
        out.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    out.sort();
    Ok(out)
}

/// A busybox root filesystem (Debian's busybox-static).
pub fn busybox_rootfs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("apt-get install busybox-static")?;
    for a in ["sh", "echo", "sleep", "cat", "hostname"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a))?;
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    Ok(())
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}
