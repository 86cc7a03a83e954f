//! Health checks benchmark (issue 18, point 6), one node on loopback:
//!
//! - `service create --replicas 2 -p P:80` of a busybox httpd that listens 1 s after its process
//!   starts → the first successful `GET` through the published port (polled every 10 ms from a
//!   second thread, from the moment the CLI starts), and when the CLI returned "converged". Modes:
//!   no health check (the anchor: the mesh routes as soon as the task runs, so the first success is
//!   "the process listens" plus the mesh), `--health-tcp 80` with the default start interval,
//!   with Docker's default start interval (5 s), and with the start interval equal to the default
//!   interval (30 s), which is the schedule before start intervals (one probe per interval).
//! - The cost of probes: CPU time of the node daemon (its own, and with the `runc exec` children
//!   it reaped) over 30 s with 10 replicas, for no check (the baseline), a TCP check every 100 ms
//!   and an exec check (`true`) every second; per probe = (check − baseline) / probes, the probes
//!   counted as replicas × window / (interval + probe time); the probe time of an exec check is
//!   a few per cent of its interval, so its count is an upper bound and its cost a lower one.
//!
//! Run: `bench/health/run.sh [--repeat K]` (builds release, needs root, runc, busybox-static).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use flotilla_bench::*;

/// The task: listens 1 s after it starts, serves /etc.
const SLOW_WEB: &str = "sleep 1; exec /bin/busybox httpd -f -p 80 -h /etc";
const NODE_IP: &str = "127.0.103.1";

fn get_ok(addr: &str) -> bool {
    let Ok(sa) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&sa, Duration::from_secs(1)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    if write!(s, "GET /passwd HTTP/1.0\r\nHost: bench\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    s.read_to_string(&mut buf).is_ok() && buf.get(9..12) == Some("200")
}

/// One round: create → (CLI returned, first successful request), both from the create's start.
fn round(
    sock: &str,
    name: &str,
    port: u16,
    flags: &[&str],
) -> anyhow::Result<(Duration, Duration)> {
    let addr = format!("{NODE_IP}:{port}");
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if get_ok(&addr) {
                    return Some(t0.elapsed());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        })
    };
    let publish = format!("{port}:80");
    let mut args = vec![
        "service",
        "create",
        "--name",
        name,
        "--replicas",
        "2",
        "-p",
        &publish,
    ];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["bb:bench", "sh", "-c", SLOW_WEB]);
    let created = cli(sock, &args);
    let converged = t0.elapsed();
    let first = if created.is_ok() {
        wait_for(
            "a first successful request",
            Duration::from_secs(90),
            || poller.is_finished().then_some(()),
        )
        .ok();
        poller.join().ok().flatten()
    } else {
        stop.store(true, Ordering::SeqCst);
        let _ = poller.join();
        None
    };
    let _ = cli(sock, &["service", "rm", name]);
    created?;
    Ok((converged, first.context("no successful request")?))
}

/// (own, own + reaped children) CPU time of `pid`, from /proc/<pid>/stat.
fn cpu_of(pid: u32) -> anyhow::Result<(Duration, Duration)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = s.rsplit_once(')').context("stat")?.1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the command: state(3) … utime(14) stime(15) cutime(16) cstime(17).
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t = |ticks: u64| Duration::from_secs_f64(ticks as f64 / hz);
    let own = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let kids = f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0);
    Ok((t(own), t(own + kids)))
}

/// CPU of the daemon over `window` with 10 replicas of a check given by `flags`.
fn cost(
    sock: &str,
    pid: u32,
    name: &str,
    flags: &[&str],
    window: Duration,
) -> anyhow::Result<(Duration, Duration)> {
    let mut args = vec!["service", "create", "--name", name, "--replicas", "10"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["bb:bench", "sh", "-c", SLOW_WEB]);
    cli(sock, &args)?;
    std::thread::sleep(Duration::from_secs(3));
    let (a0, b0) = cpu_of(pid)?;
    std::thread::sleep(window);
    let (a1, b1) = cpu_of(pid)?;
    cli(sock, &["service", "rm", name])?;
    std::thread::sleep(Duration::from_secs(5));
    Ok((a1 - a0, b1 - b0))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let repeat: usize = std::env::args()
        .skip_while(|a| a != "--repeat")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    println!("machine: {}", machine());
    let tmp = tempfile::tempdir()?;
    let rootfs = tmp.path().join("rootfs");
    busybox_rootfs(&rootfs)?;
    let mut node = Node {
        name: "h1".into(),
        dir: tmp.path().join("h1"),
        addr: format!("{NODE_IP}:4440"),
        child: None,
        extra: vec![],
    };
    node.spawn(&[
        "--init",
        "--address-pool",
        "10.163.0.0/17",
        "--vip-pool",
        "10.163.128.0/17",
    ])?;
    let sock = node.socket();
    wait_for("the node", Duration::from_secs(30), || {
        cli(&sock, &["node", "ls"]).ok()
    })?;
    cli(
        &sock,
        &[
            "image",
            "import",
            rootfs.to_str().unwrap_or(""),
            "--name",
            "bb:bench",
        ],
    )?;
    let pid = node.child.as_ref().map(|c| c.id()).context("node pid")?;

    let modes: [(&str, &[&str]); 4] = [
        ("no health check (anchor)", &[]),
        (
            "--health-tcp 80 (default start interval)",
            &["--health-tcp", "80"],
        ),
        (
            "--health-tcp 80 --health-start-interval 5s (Docker's default)",
            &["--health-tcp", "80", "--health-start-interval", "5s"],
        ),
        (
            "--health-tcp 80 --health-start-interval 30s (= interval: the old schedule)",
            &["--health-tcp", "80", "--health-start-interval", "30s"],
        ),
    ];
    // Warm-up: the first task of a node pays for unpacking the image.
    round(&sock, "warm", 18200, &[])?;
    let mut results: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); modes.len()];
    for r in 0..repeat {
        for (i, (_, flags)) in modes.iter().enumerate() {
            settle(Duration::from_secs(20));
            let (conv, first) = round(
                &sock,
                &format!("web{r}x{i}"),
                18201 + (r * modes.len() + i) as u16,
                flags,
            )?;
            results[i].0.push(conv);
            results[i].1.push(first);
        }
    }
    println!("create --replicas 2 of an httpd listening 1 s after start; medians of {repeat}:");
    for ((label, _), (conv, first)) in modes.iter().zip(results) {
        println!(
            "  {label}: CLI returned {:.0} ms, first successful request {:.0} ms (runs: {:?})",
            ms(median(conv)),
            ms(median(first.clone())),
            first.iter().map(|d| ms(*d).round()).collect::<Vec<_>>()
        );
    }

    let window = Duration::from_secs(30);
    settle(Duration::from_secs(20));
    let (base_own, base_all) = cost(&sock, pid, "c0", &[], window)?;
    settle(Duration::from_secs(20));
    let (tcp_own, tcp_all) = cost(
        &sock,
        pid,
        "c1",
        &[
            "--health-tcp",
            "80",
            "--health-interval",
            "100ms",
            "--health-start-interval",
            "100ms",
        ],
        window,
    )?;
    settle(Duration::from_secs(20));
    let (exec_own, exec_all) = cost(
        &sock,
        pid,
        "c2",
        &[
            "--health-cmd",
            "true",
            "--health-interval",
            "1s",
            "--health-start-interval",
            "1s",
            "--health-timeout",
            "5s",
        ],
        window,
    )?;
    let per = |d: Duration, base: Duration, probes: f64| {
        d.saturating_sub(base).as_secs_f64() * 1e6 / probes
    };
    let tcp_probes = 10.0 * window.as_secs_f64() / 0.1;
    let exec_probes = 10.0 * window.as_secs_f64() / 1.0;
    println!(
        "daemon CPU over {}s, 10 replicas: baseline {:.0} ms own / {:.0} ms with children",
        window.as_secs(),
        ms(base_own),
        ms(base_all)
    );
    println!(
        "  tcp every 100 ms: {:.0} / {:.0} ms → ≈{:.0} µs own, {:.0} µs with children per probe ({tcp_probes:.0} probes)",
        ms(tcp_own),
        ms(tcp_all),
        per(tcp_own, base_own, tcp_probes),
        per(tcp_all, base_all, tcp_probes)
    );
    println!(
        "  exec `true` every 1 s: {:.0} / {:.0} ms → ≈{:.0} µs own, {:.0} µs with children per probe (≤{exec_probes:.0} probes)",
        ms(exec_own),
        ms(exec_all),
        per(exec_own, base_own, exec_probes),
        per(exec_all, base_all, exec_probes)
    );
    Ok(())
}
