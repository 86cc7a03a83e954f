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

/// One path's samples (ms).
#[derive(Default)]
struct Samples {
    create: Vec<f64>,
    start: Vec<f64>,
    create_running: Vec<f64>,
    start_exit: Vec<f64>,
}

/// Ours, create→running of `sleep`, then start→exit of `true`.
async fn ours_round(rt: &Runtime, image: &str, tag: &str, out: &mut Samples) -> R<()> {
    let id = format!("bench-s-{tag}");
    rt.settle().await;
    let t = Instant::now();
    rt.create(spec(&id, image, &["sleep", "1000"])).await?;
    out.create.push(ms(t.elapsed()));
    let t2 = Instant::now();
    rt.start(&id).await?;
    out.start.push(ms(t2.elapsed()));
    out.create_running.push(ms(t.elapsed()));
    rt.remove(&id, false).await?;
    let id = format!("bench-t-{tag}");
    rt.settle().await;
    rt.create(spec(&id, image, &["true"])).await?;
    let t = Instant::now();
    rt.start(&id).await?;
    rt.wait(&id).await?;
    out.start_exit.push(ms(t.elapsed()));
    rt.remove(&id, false).await?;
    rt.settle().await;
    Ok(())
}

/// Plain runc on the template's bundle: the same two measurements.
fn runc_round(
    runc: &Runc,
    b_sleep: &Path,
    b_true: &Path,
    pid_file: &Path,
    i: usize,
    out: &mut Samples,
) -> R<()> {
    let bid = format!("bench-b-{i}");
    let t = Instant::now();
    runc.ok(&["create", "--bundle", &b_sleep.display().to_string(), &bid])?;
    out.create.push(ms(t.elapsed()));
    let t2 = Instant::now();
    runc.ok(&["start", &bid])?;
    out.start.push(ms(t2.elapsed()));
    out.create_running.push(ms(t.elapsed()));
    runc.ok(&["delete", "--force", &bid])?;
    // start→exit: we adopt the init as subreaper to see it exit.
    let bid = format!("bench-u-{i}");
    set_subreaper(true);
    runc.ok(&[
        "create",
        "--bundle",
        &b_true.display().to_string(),
        "--pid-file",
        &pid_file.display().to_string(),
        &bid,
    ])?;
    let pid: i32 = std::fs::read_to_string(pid_file)?.trim().parse()?;
    let t = Instant::now();
    runc.ok(&["start", &bid])?;
    wait_pid(pid);
    out.start_exit.push(ms(t.elapsed()));
    set_subreaper(false);
    runc.ok(&["delete", "--force", &bid])?;
    Ok(())
}

async fn bench(rounds: usize) -> R<()> {
    let root = PathBuf::from(format!("/tmp/flotilla-bench-{}", std::process::id()));
    // The shim is the one run.sh names (`flotilla-shim`, as on a node; or `flotilla`, run as
    // `flotilla shim`), else this program in shim mode.
    let (shim_exe, shim_args) = match std::env::var_os("FLOTILLA_BENCH_SHIM") {
        Some(p)
            if Path::new(&p)
                .file_name()
                .is_some_and(|n| n == "flotilla-shim") =>
        {
            (PathBuf::from(p), vec![])
        }
        Some(p) => (PathBuf::from(p), vec![OsString::from("shim")]),
        None => (std::env::current_exe()?, vec![OsString::from("shim")]),
    };
    println!("shim: {}", shim_exe.display());
    let mut cfg = RuntimeConfig::new(&root, shim_exe, shim_args);
    cfg.log_max_bytes = 1 << 20;
    let runtime = Runtime::new(cfg.clone())?;
    // The same node runtime without a standby shim: every create starts its shim from scratch.
    cfg.shim_standby = false;
    let cold = Runtime::new(cfg)?;
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
    let tpl = runtime
        .config()
        .state
        .join("containers/bench-template/bundle");
    let b_sleep = root.join("baseline-sleep");
    let b_true = root.join("baseline-true");
    baseline_bundle(&tpl, &b_sleep, &["sleep", "1000"])?;
    baseline_bundle(&tpl, &b_true, &["true"])?;
    let pid_file = root.join("baseline.pid");

    let (mut ours, mut ours_cold, mut base) =
        (Samples::default(), Samples::default(), Samples::default());
    for i in 0..rounds {
        // Rotate the order so that no path always runs right after another's teardown.
        for k in 0..3 {
            match (i + k) % 3 {
                0 => ours_round(&runtime, &image, &format!("w{i}"), &mut ours).await?,
                1 => ours_round(&cold, &image, &format!("c{i}"), &mut ours_cold).await?,
                _ => runc_round(&runc, &b_sleep, &b_true, &pid_file, i, &mut base)?,
            }
        }
    }
    let (bc, bs) = (
        median(&mut base.create_running),
        median(&mut base.start_exit),
    );
    println!("rounds: {rounds} (interleaved, order rotated; medians)");
    for (name, s) in [
        ("ours", &mut ours),
        ("ours, no standby shim", &mut ours_cold),
    ] {
        let (oc, os) = (median(&mut s.create_running), median(&mut s.start_exit));
        println!("[{name}]");
        println!(
            "create→running: ours {oc:.1} ms, runc {bc:.1} ms, ratio {:.2}",
            oc / bc
        );
        println!(
            "  of which create: ours {:.1} ms, runc {:.1} ms; start: ours {:.1} ms, runc {:.1} ms",
            median(&mut s.create),
            median(&mut base.create),
            median(&mut s.start),
            median(&mut base.start)
        );
        println!(
            "start→exit:     ours {os:.1} ms, runc {bs:.1} ms, ratio {:.2}",
            os / bs
        );
    }

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
