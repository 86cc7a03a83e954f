//! Node runtime benchmark: our path (overlay + bundle + shim + runc) against plain runc on the
//! same bundle, interleaved round by round. Run through `bench/runtime/run.sh`.
//!
//! Usage: `runtime_bench [rounds]` (as root). Also serves as the shim: `runtime_bench shim …`.
//!
//! Measures, per round:
//! - create→running: ours = `create()` + `start()` of `sleep`; runc = `runc create` + `runc start`
//!   of the same config.json and rootfs;
//! - start→exit: ours = `start()` → `wait()` of `true`; runc = `runc start` → init reaped (we
//!   are its subreaper while measuring);
//! - RSS of one shim, and of this process (the "agent") with 50 running containers.

use flotilla_runtime::testing::{import_busybox, spec};
use flotilla_runtime::{Runtime, RuntimeConfig, RuntimeDriver};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "shim") {
        args.remove(0);
        std::process::exit(flotilla_shim::run(args));
    }
    let rounds: usize = args
        .first()
        .and_then(|a| a.to_str()?.parse().ok())
        .unwrap_or(20);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokio: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(bench(rounds)) {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn set_subreaper(on: bool) {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, on as libc::c_ulong, 0, 0, 0);
    }
}

fn wait_pid(pid: i32) {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; pid > 0 is our (adopted) child.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
    }
}

struct Runc {
    bin: PathBuf,
    root: PathBuf,
}

impl Runc {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }
    fn ok(&self, args: &[&str]) -> R<()> {
        let s = self.cmd(args).status()?;
        if s.success() {
            Ok(())
        } else {
            Err(format!("runc {args:?} failed").into())
        }
    }
}

/// A copy of a container's bundle whose config.json runs `args`, sharing the same rootfs.
fn baseline_bundle(src: &Path, dst: &Path, args: &[&str]) -> R<()> {
    std::fs::create_dir_all(dst)?;
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json"))?)?;
    cfg["process"]["args"] = serde_json::json!(args);
    cfg["root"]["path"] = serde_json::json!(src.join("rootfs"));
    let cg = cfg["linux"]["cgroupsPath"]
        .as_str()
        .unwrap_or("/flotilla/x")
        .to_string();
    cfg["linux"]["cgroupsPath"] = serde_json::json!(format!("{cg}-baseline"));
    std::fs::write(dst.join("config.json"), serde_json::to_vec(&cfg)?)?;
    Ok(())
}

async fn bench(rounds: usize) -> R<()> {
    let root = PathBuf::from(format!("/tmp/flotilla-bench-{}", std::process::id()));
    let mut cfg = RuntimeConfig::new(&root, std::env::current_exe()?, vec!["shim".into()]);
    cfg.log_max_bytes = 1 << 20;
    let runtime = Runtime::new(cfg)?;
    let image = import_busybox(runtime.images(), "busybox:bench")?;
    let runc = Runc {
        bin: runtime.probe().runtime_path.clone().ok_or("no runc")?,
        root: root.join("runc-baseline"),
    };
    std::fs::create_dir_all(&runc.root)?;
    println!(
        "runtime: {}",
        runtime.probe().runc_version.clone().unwrap_or_default()
    );

    // Template container whose bundle (config.json + mounted rootfs) the baseline reuses.
    runtime
        .create(spec("bench-template", &image, &["true"]))
        .await?;
    let tpl = root.join("containers/bench-template/bundle");
    let b_sleep = root.join("baseline-sleep");
    let b_true = root.join("baseline-true");
    baseline_bundle(&tpl, &b_sleep, &["sleep", "1000"])?;
    baseline_bundle(&tpl, &b_true, &["true"])?;

    let (mut ours_cr, mut base_cr, mut ours_se, mut base_se) = (vec![], vec![], vec![], vec![]);
    let (mut ours_create, mut ours_start, mut base_create, mut base_start) =
        (vec![], vec![], vec![], vec![]);
    for i in 0..rounds {
        // Ours: create→running.
        let id = format!("bench-s-{i}");
        let t = Instant::now();
        runtime
            .create(spec(&id, &image, &["sleep", "1000"]))
            .await?;
        ours_create.push(ms(t.elapsed()));
        let t2 = Instant::now();
        runtime.start(&id).await?;
        ours_start.push(ms(t2.elapsed()));
        ours_cr.push(ms(t.elapsed()));
        runtime.remove(&id, false).await?;
        // Baseline: create→running.
        let bid = format!("bench-b-{i}");
        let t = Instant::now();
        runc.ok(&["create", "--bundle", &b_sleep.display().to_string(), &bid])?;
        base_create.push(ms(t.elapsed()));
        let t2 = Instant::now();
        runc.ok(&["start", &bid])?;
        base_start.push(ms(t2.elapsed()));
        base_cr.push(ms(t.elapsed()));
        runc.ok(&["delete", "--force", &bid])?;
        // Ours: start→exit.
        let id = format!("bench-t-{i}");
        runtime.create(spec(&id, &image, &["true"])).await?;
        let t = Instant::now();
        runtime.start(&id).await?;
        runtime.wait(&id).await?;
        ours_se.push(ms(t.elapsed()));
        runtime.remove(&id, false).await?;
        // Baseline: start→exit (we adopt the init as subreaper to see it exit).
        let bid = format!("bench-u-{i}");
        set_subreaper(true);
        let pid_file = root.join("baseline.pid");
        runc.ok(&[
            "create",
            "--bundle",
            &b_true.display().to_string(),
            "--pid-file",
            &pid_file.display().to_string(),
            &bid,
        ])?;
        let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
        let t = Instant::now();
        runc.ok(&["start", &bid])?;
        wait_pid(pid);
        base_se.push(ms(t.elapsed()));
        set_subreaper(false);
        runc.ok(&["delete", "--force", &bid])?;
    }
    let (oc, bc, os, bs) = (
        median(&mut ours_cr),
        median(&mut base_cr),
        median(&mut ours_se),
        median(&mut base_se),
    );
    println!("rounds: {rounds} (interleaved; medians)");
    println!(
        "create→running: ours {oc:.1} ms, runc {bc:.1} ms, ratio {:.2}",
        oc / bc
    );
    println!(
        "  of which create: ours {:.1} ms, runc {:.1} ms; start: ours {:.1} ms, runc {:.1} ms",
        median(&mut ours_create),
        median(&mut base_create),
        median(&mut ours_start),
        median(&mut base_start)
    );
    println!(
        "start→exit:     ours {os:.1} ms, runc {bs:.1} ms, ratio {:.2}",
        os / bs
    );

    // Memory: 50 running containers.
    let mut shim_rss = Vec::new();
    for i in 0..50 {
        let id = format!("bench-m-{i}");
        runtime
            .create(spec(&id, &image, &["sleep", "1000"]))
            .await?;
        runtime.start(&id).await?;
    }
    for i in 0..50 {
        let st = runtime.state(&format!("bench-m-{i}")).await?;
        shim_rss.push(rss_kib(st.shim_pid as u32) as f64);
    }
    let agent = rss_kib(std::process::id());
    let max = shim_rss.iter().copied().fold(0.0, f64::max);
    println!(
        "shim RSS: median {:.0} KiB, max {max:.0} KiB (50 shims)",
        median(&mut shim_rss)
    );
    println!("agent (this process) RSS with 50 running containers: {agent} KiB");
    for i in 0..50 {
        runtime.remove(&format!("bench-m-{i}"), false).await?;
    }
    runtime.remove("bench-template", false).await?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
