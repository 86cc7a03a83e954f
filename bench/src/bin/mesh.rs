//! Mesh benchmark: the flotilla-mesh TCP proxy against Debian's nginx, in the same run, in front of
//! the same three in-process HTTP/1.1 keep-alive backends, driven by `wrk`.
//!
//! Runs alternate (direct, mesh, nginx) for `--rounds` rounds; the median of each is reported,
//! with mesh/nginx throughput ratio and the p99 difference. The direct run (wrk straight to one
//! backend) is the floor. Two phases: saturated (`-t2 -c64` by default), then light load
//! (`-t1 -c4`) where the latency a proxy adds is not hidden by queueing.
//!
//! Run: `cargo build --release -p flotilla-bench --bin mesh && target/release/mesh`
//! Options: `--duration 10` (s per run), `--connections 64`, `--wrk-threads 2`, `--rounds 3`,
//! `--mesh-threads 2` (proxy threads: `flotilla_mesh::Workers`), `--multi-thread` (one
//! multi-thread tokio runtime instead), `--no-nginx`, `--no-light`.
//! Needs `wrk` and `nginx` (apt-get install -y wrk nginx-light).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use flotilla_bench::{machine, wait_for};
use flotilla_mesh::{Backend, Pool, TcpFrontend, TcpOptions, Workers};

const BODY: &str = "hello, world\n";

struct Args {
    duration: u64,
    connections: u32,
    wrk_threads: u32,
    rounds: usize,
    mesh_threads: usize,
    nginx: bool,
    light: bool,
    multi_thread: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        duration: 10,
        connections: 64,
        wrk_threads: 2,
        rounds: 3,
        mesh_threads: 2,
        nginx: true,
        light: true,
        multi_thread: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--no-nginx" {
            a.nginx = false;
            continue;
        }
        if k == "--multi-thread" {
            a.multi_thread = true;
            continue;
        }
        if k == "--no-light" {
            a.light = false;
            continue;
        }
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--duration" => a.duration = v.parse()?,
            "--connections" => a.connections = v.parse()?,
            "--wrk-threads" => a.wrk_threads = v.parse()?,
            "--rounds" => a.rounds = v.parse()?,
            "--mesh-threads" => a.mesh_threads = v.parse()?,
            _ => bail!("unknown option {k}"),
        }
    }
    Ok(a)
}

/// A minimal HTTP/1.1 keep-alive server: answers every request head (no body expected) with a
/// fixed 200; pipelining-safe.
async fn backend(l: TcpListener) {
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let resp = resp.clone();
        tokio::spawn(async move {
            let _ = serve_http(s, resp.as_bytes()).await;
        });
    }
}

async fn serve_http(mut s: TcpStream, resp: &[u8]) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    let mut out = Vec::with_capacity(resp.len() * 4);
    loop {
        if filled == buf.len() {
            return Ok(()); // head too large: give up on this client
        }
        let n = s.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut start = 0;
        while let Some(end) = find(&buf[start..filled], b"\r\n\r\n") {
            out.extend_from_slice(resp);
            start += end + 4;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(dir: &std::path::Path, backends: &[SocketAddr], port: u16) -> anyhow::Result<Nginx> {
        let servers: String = backends
            .iter()
            .map(|b| format!("        server {b};\n"))
            .collect();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n    access_log off;\n\
             client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             upstream be {{\n{servers}        keepalive 128;\n    }}\n\
             server {{\n        listen 127.0.0.1:{port};\n        location / {{\n\
             proxy_pass http://be;\n            proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n        }}\n    }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("nginx not found: apt-get install -y nginx-light (or pass --no-nginx)")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        wait_for("nginx", Duration::from_secs(10), || {
            std::net::TcpStream::connect(addr).ok()
        })?;
        Ok(Nginx { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers; SIGKILL would orphan them.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let stopped = wait_for("nginx to stop", Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        });
        if stopped.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p99_ms: f64,
    p50_ms: f64,
    /// CPU time of the proxy per request (0 for the direct run).
    cpu_us: f64,
}

/// Parses "1.23ms" / "850.00us" / "1.02s" into milliseconds.
fn parse_ms(v: &str) -> Option<f64> {
    let (num, unit) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * unit)
}

fn wrk(a: &Args, threads: u32, connections: u32, addr: SocketAddr) -> anyhow::Result<Run> {
    let out = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", a.duration))
        .arg("--latency")
        .arg(format!("http://{addr}/"))
        .output()
        .context("wrk not found: apt-get install -y wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        eprintln!("warning: wrk reported errors against {addr}:\n{text}");
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let p99 = field("99%")
        .and_then(|v| parse_ms(&v))
        .with_context(|| format!("no 99% latency in wrk output:\n{text}"))?;
    let p50 = field("50%").and_then(|v| parse_ms(&v)).unwrap_or(0.0);
    Ok(Run {
        rps,
        p99_ms: p99,
        p50_ms: p50,
        cpu_us: 0.0,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Targets {
    direct: SocketAddr,
    mesh: SocketAddr,
    nginx: Option<SocketAddr>,
    /// Pid of the nginx master (its children are the workers).
    nginx_pid: Option<u32>,
}

/// utime + stime (clock ticks) from a `/proc/.../stat` file, with the parent pid.
fn stat_ticks(path: &std::path::Path) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((ppid, ticks))
}

/// CPU time (clock ticks) used so far by the proxy under test: this process's `mesh*` threads,
/// or nginx's master and workers. `None` for the direct run.
fn proxy_ticks(name: &str, t: &Targets) -> Option<u64> {
    match name {
        "mesh" => {
            let mut sum = 0;
            for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                if comm.starts_with("mesh") {
                    sum += stat_ticks(&e.path().join("stat")).map_or(0, |(_, t)| t);
                }
            }
            Some(sum)
        }
        "nginx" => {
            let master = t.nginx_pid?;
            let mut sum = 0;
            for e in std::fs::read_dir("/proc").ok()?.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some((ppid, ticks)) = stat_ticks(&e.path().join("stat")) {
                    if pid == master || ppid == master {
                        sum += ticks;
                    }
                }
            }
            Some(sum)
        }
        _ => None,
    }
}

/// Alternating rounds against every target with one wrk setting; prints each run and the medians.
fn phase(a: &Args, threads: u32, connections: u32, t: &Targets) -> anyhow::Result<()> {
    let mut results: Vec<(&str, SocketAddr, Vec<Run>)> =
        vec![("direct", t.direct, vec![]), ("mesh", t.mesh, vec![])];
    if let Some(n) = t.nginx {
        results.push(("nginx", n, vec![]));
    }
    for round in 0..a.rounds {
        // Alternate the order of mesh and nginx between rounds.
        let mut order: Vec<usize> = (0..results.len()).collect();
        if round % 2 == 1 {
            order[1..].reverse();
        }
        for i in order {
            let before = proxy_ticks(results[i].0, t);
            let mut r = wrk(a, threads, connections, results[i].1)?;
            let after = proxy_ticks(results[i].0, t);
            // CPU the proxy spent per request, in microseconds (USER_HZ is 100 on Linux).
            r.cpu_us = match (before, after) {
                (Some(b), Some(a2)) if r.rps > 0.0 => {
                    (a2.saturating_sub(b) as f64 * 10_000.0) / (r.rps * a.duration as f64)
                }
                _ => 0.0,
            };
            println!(
                "round {} {:>6}: {:>10.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms  proxy cpu {:>5.1} us/req",
                round + 1,
                results[i].0,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.cpu_us
            );
            results[i].2.push(r);
        }
    }
    println!("median of {} rounds:", a.rounds);
    let mut med = std::collections::HashMap::new();
    for (name, _, runs) in &results {
        let rps = median(runs.iter().map(|r| r.rps).collect());
        let p99 = median(runs.iter().map(|r| r.p99_ms).collect());
        let p50 = median(runs.iter().map(|r| r.p50_ms).collect());
        let cpu = median(runs.iter().map(|r| r.cpu_us).collect());
        println!(
            "{name:>8}: {rps:>10.0} req/s  p50 {p50:>6.3} ms  p99 {p99:>6.3} ms  proxy cpu {cpu:>5.1} us/req"
        );
        med.insert(*name, (rps, p99, cpu));
    }
    if let (Some(m), Some(n)) = (med.get("mesh"), med.get("nginx")) {
        println!(
            "mesh/nginx throughput: {:.2}x   p99 mesh - nginx: {:+.3} ms   cpu per request mesh/nginx: {:.2}x",
            m.0 / n.0,
            m.1 - n.1,
            if n.2 > 0.0 { m.2 / n.2 } else { 0.0 }
        );
    }
    if let (Some(m), Some(d)) = (med.get("mesh"), med.get("direct")) {
        println!(
            "mesh vs direct: {:.2}x throughput, p99 added {:+.3} ms",
            m.0 / d.0,
            m.1 - d.1
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    println!("machine: {}", machine());

    // Backends on their own runtime (2 threads), the proxy on another: the proxy's share of the
    // CPU is then comparable with nginx's two worker processes.
    let backends_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("backend")
        .enable_all()
        .build()?;
    let backends: Vec<SocketAddr> = backends_rt.block_on(async {
        let mut addrs = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(l.local_addr()?);
            tokio::spawn(backend(l));
        }
        Ok::<_, std::io::Error>(addrs)
    })?;

    let pool = Pool::new(
        backends
            .iter()
            .enumerate()
            .map(|(i, b)| Backend::new(format!("task{i}"), *b))
            .collect(),
    );
    // The proxy: flotilla-mesh Workers (one current-thread runtime and SO_REUSEPORT listener per
    // thread, the way the agent runs it), or with `--multi-thread` one multi-thread runtime.
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    let mesh_addr = if a.multi_thread {
        let mesh_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.mesh_threads)
            .thread_name("mesh")
            .enable_all()
            .build()?;
        let fe = mesh_rt.block_on(TcpFrontend::bind(
            "127.0.0.1:0".parse()?,
            pool.clone(),
            TcpOptions::default(),
        ))?;
        let addr = fe.local_addr();
        keep.push(Box::new(fe));
        keep.push(Box::new(mesh_rt));
        addr
    } else {
        let workers = Workers::start(a.mesh_threads)?;
        let opts = TcpOptions {
            runtimes: workers.handles(),
            ..TcpOptions::default()
        };
        // Bind from the backends' runtime: the frontend itself lives on the workers.
        let fe = backends_rt.block_on(TcpFrontend::bind(
            "127.0.0.1:0".parse()?,
            pool.clone(),
            opts,
        ))?;
        let addr = fe.local_addr();
        keep.push(Box::new(fe));
        keep.push(Box::new(workers));
        addr
    };

    let tmp = tempfile::tempdir()?;
    let nginx = if a.nginx {
        let port = free_port()?;
        Some((
            Nginx::start(tmp.path(), &backends, port)?,
            SocketAddr::from(([127, 0, 0, 1], port)),
        ))
    } else {
        None
    };

    let targets = Targets {
        direct: backends[0],
        mesh: mesh_addr,
        nginx: nginx.as_ref().map(|(_, addr)| *addr),
        nginx_pid: nginx.as_ref().map(|(n, _)| n.child.id()),
    };
    println!(
        "{} rounds of {} s per target, proxy: {} threads ({}), 3 backends",
        a.rounds,
        a.duration,
        a.mesh_threads,
        if a.multi_thread {
            "one multi-thread runtime"
        } else {
            "flotilla_mesh::Workers: a current-thread runtime and SO_REUSEPORT listener each"
        }
    );
    println!(
        "\n== saturated: wrk -t{} -c{} ==",
        a.wrk_threads, a.connections
    );
    phase(&a, a.wrk_threads, a.connections, &targets)?;
    if a.light {
        println!("\n== light load (added latency): wrk -t1 -c4 ==");
        phase(&a, 1, 4, &targets)?;
    }
    println!();
    let spread: Vec<String> = pool
        .stats()
        .iter()
        .map(|s| format!("{}={}", s.id, s.total))
        .collect();
    println!("mesh connections per backend: {}", spread.join(" "));
    drop(nginx);
    drop(keep);
    Ok(())
}
