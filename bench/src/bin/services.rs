//! Services benchmark, with Docker Swarm (Debian's docker.io) as the anchor in the same run.
//!
//! - `service create --replicas 20` and `--replicas 100` → all running, Flotilla (one node) vs
//!   Swarm (one node, same busybox image) in two ways: with Docker's default network for a task
//!   (a namespace and a veth on a bridge, as Flotilla gives every task) and with `--network host`
//!   (no namespace, less work than Flotilla does). Both systems are measured by polling their
//!   APIs in-process every 20 ms until every replica runs (Swarm's CLI would add a 5 s stability
//!   wait, so `-d` is used for both); every timed round starts on a quiet machine (`settle`);
//! - kill -9 a worker of a 3-node Flotilla cluster → its tasks running elsewhere;
//! - with `--secrets` (only this): 100 replicas with three secrets each against 100 without, the
//!   rounds interleaved, the order alternating from round to round (the anchor is the same
//!   service without secrets); `--secrets-control`
//!   runs the same rounds with no secrets in either arm.
//!
//! Run: `cargo build --release -p flotilla -p flotilla-bench && target/release/services [--no-swarm] [--repeat K] [--secrets]`
//! Needs root; starts its own dockerd in a temporary directory (apt-get install docker.io for the
//! anchor) with Docker's default storage driver here (overlay2), its task bridge on a private
//! /23 made for the run (`dkbench0`, removed afterwards), `--iptables=false --ip-forward=false
//! --ip-masq=false` so that it changes nothing else on the host, and with
//! `DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1` and `--no-resolve-image` on every create, so that
//! Swarm uses the local image without asking docker.io (no lookup leaves the machine).
//! Each size runs `--repeat K` rounds (default 3), interleaved; medians are compared.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use flotilla_api::{Client, Endpoint};
use flotilla_bench::*;

/// The bridge the benchmark's dockerd puts task containers on (`--bridge`), made and removed by
/// the benchmark so that no host network is touched.
const BRIDGE: &str = "dkbench0";
const BRIDGE_ADDR: &str = "10.213.0.1/23";

struct Docker {
    sock: String,
    /// `docker swarm init` makes `docker_gwbridge` and `swarm leave` keeps it: removed on drop
    /// unless it was there before this run.
    own_gwbridge: bool,
    api: Client,
    dir: std::path::PathBuf,
    pid: Option<std::process::Child>,
}

impl Docker {
    fn start(dir: &std::path::Path) -> anyhow::Result<Docker> {
        let _ = Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(Stdio::null())
            .status();
        let own_gwbridge = !std::path::Path::new("/sys/class/net/docker_gwbridge").exists();
        for args in [
            vec!["link", "add", BRIDGE, "type", "bridge"],
            vec!["addr", "add", BRIDGE_ADDR, "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ] {
            let ok = Command::new("ip")
                .args(&args)
                .status()
                .is_ok_and(|st| st.success());
            if !ok {
                let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
                bail!("ip {args:?} failed");
            }
        }
        let sock = format!("unix://{}/docker.sock", dir.display());
        let child = Command::new("dockerd")
            // Swarm's agent otherwise tries to pull every task's image from its registry
            // (docker.io for a local `bb:bench`) before using the local copy: DNS off this
            // machine, which the benchmark must not cause. Flotilla does not pull a present image
            // either.
            .env("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1")
            .args(["--storage-driver=overlay2", "--bridge", BRIDGE])
            .args(["--iptables=false", "--ip-forward=false", "--ip-masq=false"])
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("pid"))
            .args(["-H", &sock])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dockerd.log"))?)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
                return Err(e)
                    .context("dockerd not found: apt-get install docker.io (or pass --no-swarm)");
            }
        };
        let d = Docker {
            own_gwbridge,
            api: Client::new(Endpoint::Unix(dir.join("docker.sock"))),
            sock,
            dir: dir.to_path_buf(),
            pid: Some(child),
        };
        wait_for("dockerd", Duration::from_secs(60), || d.run(&["info"]).ok())?;
        d.run(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
        Ok(d)
    }
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = Command::new("docker")
            .env("DOCKER_HOST", &self.sock)
            .args(args)
            .output()?;
        if !o.status.success() {
            bail!("docker {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let _ = self.run(&["swarm", "leave", "--force"]);
        if let Some(mut c) = self.pid.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
        // dockerd leaves its own network namespace mounted in its exec root.
        let _ = Command::new("umount")
            .arg(self.dir.join("exec/netns/default"))
            .status();
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
        if self.own_gwbridge {
            let _ = Command::new("ip")
                .args(["link", "del", "docker_gwbridge"])
                .status();
        }
    }
}

/// Running tasks of a Swarm service, from the Engine API (`ServiceStatus`, API 1.41).
async fn swarm_running(api: &Client, name: &str) -> anyhow::Result<u64> {
    let v: Vec<serde_json::Value> = api
        .get_json("/v1.41/services?status=true")
        .await
        .context("docker API: GET /services?status=true")?;
    Ok(v.iter()
        .find(|s| s["Spec"]["Name"] == name)
        .and_then(|s| s["ServiceStatus"]["RunningTasks"].as_u64())
        .unwrap_or(0))
}

async fn flotilla_running(client: &Client, name: &str) -> u64 {
    let v: Vec<serde_json::Value> = client.get_json("/v1/services").await.unwrap_or_default();
    v.iter()
        .find(|s| s["spec"]["name"] == name)
        .and_then(|s| s["service_status"]["running_tasks"].as_u64())
        .unwrap_or(0)
}

/// Median of samples (sorts them; the lower middle for an even count, as the nearest-rank
/// 50th percentile gives).
fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    pct(v, 50.0)
}

/// "min–max s" of sorted samples.
fn range(v: &[Duration]) -> String {
    match (v.first(), v.last()) {
        (Some(a), Some(b)) => format!("{:.2}–{:.2} s", a.as_secs_f64(), b.as_secs_f64()),
        _ => "-".into(),
    }
}

/// Waits for a quiet machine before a timed round (see `settle`); says so when it never was.
fn quiet() {
    let busy = settle(Duration::from_secs(20));
    if busy >= 0.05 {
        println!(
            "(note: {:.0} % of CPU still busy after 20 s of waiting for a quiet machine)",
            busy * 100.0
        );
    }
}

/// Starts `node` as a one-node cluster and imports the bench image; its socket and a client.
fn single_node(node: &mut Node, rootfs: &std::path::Path) -> anyhow::Result<(String, Client)> {
    node.spawn(&["--init"])?;
    let sock = node.socket();
    wait_for("node", Duration::from_secs(30), || {
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
    let client = Client::new(Endpoint::Unix(node.dir.join("api.sock")));
    Ok((sock, client))
}

/// One round: `service create --replicas n` → all running. Also returns the OCI config of one
/// of the bundles Flotilla generated, for the runtime-floor anchor.
async fn flotilla_round(
    sock: &str,
    client: &Client,
    data_dir: &std::path::Path,
    n: u64,
    extra: &[&str],
) -> anyhow::Result<(Duration, Option<serde_json::Value>)> {
    let name = format!("f{n}");
    let replicas = n.to_string();
    let mut args = vec![
        "service",
        "create",
        "--detach",
        "--name",
        &name,
        "--replicas",
        &replicas,
    ];
    args.extend_from_slice(extra);
    args.extend(["bb:bench", "sleep", "100000"]);
    let t = Instant::now();
    cli(sock, &args)?;
    loop {
        if flotilla_running(client, &name).await >= n {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("flotilla: {n} replicas not running after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = t.elapsed();
    let config = std::fs::read_dir(data_dir.join("run/runtime/containers"))
        .ok()
        .and_then(|mut it| it.next())
        .and_then(|e| e.ok())
        .and_then(|e| std::fs::read(e.path().join("bundle/config.json")).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    cli(sock, &["service", "rm", &name])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let tasks: Vec<serde_json::Value> = client.get_json("/v1/tasks").await.unwrap_or_default();
        if tasks.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((d, config))
}

/// The runtime floor: `runc create` + `runc start` of `n` containers from bundles with the same
/// OCI config Flotilla generated (user namespace, seccomp, capabilities, cgroup, a new network
/// namespace), 4 at a time, without Flotilla (no shim, overlay, veth, Raft or agent). Every
/// bundle shares one read-only root (Flotilla gives each its own overlay).
fn runc_floor(
    config: &serde_json::Value,
    rootfs: &std::path::Path,
    dir: &std::path::Path,
    n: u64,
) -> anyhow::Result<Duration> {
    let root = dir.join("rootfs");
    if !root.exists() {
        std::fs::create_dir_all(dir)?;
        let st = Command::new("cp")
            .arg("-a")
            .arg(rootfs)
            .arg(&root)
            .status()?;
        if !st.success() {
            bail!("cp -a {} failed", rootfs.display());
        }
        for d in ["proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let uid = config["linux"]["uidMappings"][0]["hostID"]
            .as_u64()
            .unwrap_or(0);
        let st = Command::new("chown")
            .args(["-R", &format!("{uid}:{uid}")])
            .arg(&root)
            .status()?;
        if !st.success() {
            bail!("chown of the floor rootfs failed");
        }
    }
    let state = dir.join("state");
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("floor{n}-{i}");
        let b = dir.join(&id);
        std::fs::create_dir_all(&b)?;
        let mut c = config.clone();
        c["root"] = serde_json::json!({"path": root, "readonly": true});
        c["hostname"] = serde_json::json!(id);
        c["process"]["terminal"] = serde_json::json!(false);
        c["linux"]["cgroupsPath"] = serde_json::json!(format!("/flotilla-floor/{id}"));
        if let Some(m) = c["mounts"].as_array_mut() {
            m.retain(|m| {
                m["destination"] != "/etc/hosts" && m["destination"] != "/etc/resolv.conf"
            });
        }
        if let Some(ns) = c["linux"]["namespaces"].as_array_mut() {
            for x in ns.iter_mut() {
                if let Some(o) = x.as_object_mut() {
                    o.remove("path");
                }
            }
        }
        std::fs::write(b.join("config.json"), serde_json::to_vec(&c)?)?;
        ids.push(id);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicUsize::new(0);
    let runc = |args: &[&str]| {
        Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let t = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                let b = dir.join(id);
                let ok =
                    runc(&["create", "--bundle", &b.to_string_lossy(), id]) && runc(&["start", id]);
                if !ok {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let d = t.elapsed();
    for id in &ids {
        runc(&["delete", "-f", id]);
    }
    // runc removes each container's cgroup, not the parent it was given.
    if let Ok(hier) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hier.flatten() {
            let _ = std::fs::remove_dir(h.path().join("flotilla-floor"));
        }
    }
    let _ = std::fs::remove_dir("/sys/fs/cgroup/flotilla-floor");
    let f = failed.load(std::sync::atomic::Ordering::Relaxed);
    if f > 0 {
        bail!("runc floor: {f} of {n} containers failed to start");
    }
    Ok(d)
}

/// One Swarm round: `host` runs the tasks with `--network host`, otherwise each task gets
/// Docker's default network (its own namespace, a veth on the bridge, an address).
async fn swarm_round(d: &Docker, n: u64, host: bool) -> anyhow::Result<Duration> {
    let name = format!("s{n}");
    let replicas = n.to_string();
    let mut args = vec![
        "service",
        "create",
        "-d",
        "--quiet",
        // The image is local: without this dockerd asks registry-1.docker.io for its digest
        // (DNS off the machine), which it must not do (and which did not change the times).
        "--no-resolve-image",
    ];
    if host {
        args.extend(["--network", "host"]);
    }
    args.extend([
        "--name",
        &name,
        "--replicas",
        &replicas,
        "bb:bench",
        "sleep",
        "100000",
    ]);
    let t = Instant::now();
    d.run(&args)?;
    // Polled in-process over the Engine API, as Flotilla is: a `docker service ls` process
    // every 20 ms would take CPU from the system being measured.
    loop {
        if swarm_running(&d.api, &name).await? >= n {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("swarm: {n} replicas not running after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let el = t.elapsed();
    d.run(&["service", "rm", &name])?;
    wait_for("swarm containers gone", Duration::from_secs(180), || {
        d.run(&["ps", "-q"]).ok().filter(|o| o.trim().is_empty())
    })?;
    Ok(el)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let no_swarm = std::env::args().any(|a| a == "--no-swarm");
    let tmp = tempfile::tempdir()?;
    println!("machine: {}", machine());
    let rootfs = tmp.path().join("rootfs");
    busybox_rootfs(&rootfs)?;

    // Flotilla, one node.
    let mut n1 = Node {
        name: "n1".into(),
        dir: tmp.path().join("n1"),
        addr: "127.0.101.1:4440".into(),
        child: None,
        extra: vec![],
    };
    let (sock, client) = single_node(&mut n1, &rootfs)?;

    let docker = if no_swarm {
        None
    } else {
        let dd = tmp.path().join("docker");
        std::fs::create_dir_all(&dd)?;
        let d = Docker::start(&dd)?;
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .output()?;
        let mut imp = Command::new("docker")
            .env("DOCKER_HOST", &d.sock)
            .args(["import", "-", "bb:bench"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        use std::io::Write;
        imp.stdin.take().context("stdin")?.write_all(&tar.stdout)?;
        imp.wait()?;
        Some(d)
    };

    let floor_dir = tmp.path().join("floor");
    // Single rounds swing by ±20 % on this VM (runc alone included), so every size runs
    // `--repeat` rounds (default 3), each system's rounds interleaved, and compares medians.
    let repeat: usize = std::env::args()
        .skip_while(|a| a != "--repeat")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .filter(|k| *k > 0)
        .unwrap_or(3);
    if std::env::args().any(|a| a == "--secrets" || a == "--secrets-control") {
        return secrets_rounds(&sock, &client, &n1.dir, tmp.path(), repeat).await;
    }
    let mut rows = Vec::new();
    for n in [20u64, 100] {
        let (mut fl, mut sw, mut sh, mut fo) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut config = None;
        for r in 1..=repeat {
            quiet();
            let (f, c) = flotilla_round(&sock, &client, &n1.dir, n, &[]).await?;
            if config.is_none() {
                config = c;
            }
            let mut line = format!(
                "  --replicas {n}, round {r}: flotilla {:.2} s",
                f.as_secs_f64()
            );
            fl.push(f);
            if let Some(d) = &docker {
                quiet();
                let s = swarm_round(d, n, false).await?;
                line += &format!(", docker swarm {:.2} s", s.as_secs_f64());
                sw.push(s);
                quiet();
                let s = swarm_round(d, n, true).await?;
                line += &format!(", swarm --network host {:.2} s", s.as_secs_f64());
                sh.push(s);
            }
            if let Some(c) = &config {
                quiet();
                let x = runc_floor(c, &rootfs, &floor_dir, n)?;
                line += &format!(", runc alone {:.2} s", x.as_secs_f64());
                fo.push(x);
            }
            println!("{line}");
        }
        let f = median(&mut fl);
        print!(
            "create --replicas {n} → all running, median of {repeat}: flotilla {:.2} s ({})",
            f.as_secs_f64(),
            range(&fl)
        );
        if !sw.is_empty() {
            let s = median(&mut sw);
            let h = median(&mut sh);
            print!(
                ", docker swarm {:.2} s ({}), swarm / flotilla = {:.1}x; swarm --network host {:.2} s ({}), swarm host / flotilla = {:.1}x",
                s.as_secs_f64(),
                range(&sw),
                s.as_secs_f64() / f.as_secs_f64(),
                h.as_secs_f64(),
                range(&sh),
                h.as_secs_f64() / f.as_secs_f64()
            );
        }
        if !fo.is_empty() {
            let x = median(&mut fo);
            print!(
                "; runc alone (same OCI config, 4 at a time) {:.2} s ({}), flotilla / runc = {:.2}x",
                x.as_secs_f64(),
                range(&fo),
                f.as_secs_f64() / x.as_secs_f64()
            );
        }
        println!();
        rows.push((n, f));
    }
    drop(docker);
    n1.kill9();
    let _ = Command::new(flotilla_bin())
        .args(["node", "cleanup", "--data-dir"])
        .arg(&n1.dir)
        .status();

    // The same rounds with crun as the node's OCI runtime (`node run --runtime`).
    if let Some(crun) = ["/usr/bin/crun", "/usr/local/bin/crun"]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
    {
        let mut c1 = Node {
            name: "c1".into(),
            dir: tmp.path().join("c1"),
            addr: "127.0.101.2:4440".into(),
            child: None,
            extra: vec!["--runtime".into(), crun.to_string()],
        };
        let (csock, cclient) = single_node(&mut c1, &rootfs)?;
        for (n, runc_time) in &rows {
            quiet();
            let (f, _) = flotilla_round(&csock, &cclient, &c1.dir, *n, &[]).await?;
            println!(
                "create --replicas {n} → all running, node run --runtime {crun}: flotilla {:.2} s (with runc: {:.2} s)",
                f.as_secs_f64(),
                runc_time.as_secs_f64()
            );
        }
        c1.kill9();
        let _ = Command::new(flotilla_bin())
            .args(["node", "cleanup", "--data-dir"])
            .arg(&c1.dir)
            .status();
    }

    // Node failure on a 3-node cluster.
    let mut nodes: Vec<Node> = ["m", "w1", "w2"]
        .iter()
        .enumerate()
        .map(|(i, name)| Node {
            name: name.to_string(),
            dir: tmp.path().join(name),
            addr: format!("127.0.102.{}:4440", i + 1),
            child: None,
            extra: vec![],
        })
        .collect();
    nodes[0].spawn(&["--init"])?;
    let ms_ = nodes[0].socket();
    wait_for("manager", Duration::from_secs(30), || {
        cli(&ms_, &["node", "ls"]).ok()
    })?;
    let token = cli(&ms_, &["cluster", "join-token", "worker", "-q"])?
        .trim()
        .to_string();
    let maddr = nodes[0].addr.clone();
    for n in nodes.iter_mut().skip(1) {
        n.spawn(&["--join", &maddr, "--token", &token])?;
    }
    wait_for("3 ready nodes", Duration::from_secs(60), || {
        let out = cli(&ms_, &["node", "ls", "--format", "json"]).ok()?;
        let v: Vec<serde_json::Value> = serde_json::from_str(&out).ok()?;
        (v.iter().filter(|n| n["status"]["state"] == "ready").count() == 3).then_some(())
    })?;
    // Every node gets the image locally (as every Swarm node has it), signed with the admin
    // key of the first manager (workers have no admin bundle of their own).
    let key = nodes[0].dir.join("admin/signing-key.pem");
    for n in &nodes {
        cli(
            &n.socket(),
            &[
                "image",
                "import",
                rootfs.to_str().unwrap_or(""),
                "--name",
                "bb:bench",
                "--sign-key",
                key.to_str().unwrap_or(""),
            ],
        )?;
    }
    cli(
        &ms_,
        &[
            "service",
            "create",
            "--name",
            "fo",
            "--replicas",
            "12",
            "bb:bench",
            "sleep",
            "100000",
        ],
    )?;
    let mclient = Client::new(Endpoint::Unix(nodes[0].dir.join("api.sock")));
    let w1_id = {
        let out = cli(&ms_, &["node", "inspect", "w1", "--format", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["id"].as_str().context("id")?.to_string()
    };
    nodes[1].kill9();
    let t = Instant::now();
    loop {
        let tasks: Vec<serde_json::Value> = mclient
            .get_json("/v1/tasks?desired-state=running")
            .await
            .unwrap_or_default();
        let ok = tasks
            .iter()
            .filter(|t| t["status"]["state"] == "running" && t["node_id"] != w1_id.as_str())
            .count();
        if ok >= 12 {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("tasks not rescheduled after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "kill -9 a worker (4 of 12 tasks) → 12 running elsewhere: {:.2} s (heartbeat timeout 3 s; Swarm's default detection is ~15 s, not measured: one dockerd per machine)",
        t.elapsed().as_secs_f64()
    );
    // Leave nothing running: remove the service while the remaining nodes are up.
    cli(&ms_, &["service", "rm", "fo"])?;
    nodes[1].spawn(&[])?;
    wait_for("containers removed", Duration::from_secs(120), || {
        let tasks: Vec<serde_json::Value> =
            serde_json::from_str(&cli(&ms_, &["service", "ls", "--format", "json"]).ok()?).ok()?;
        tasks.is_empty().then_some(())
    })?;
    let all_gone = || {
        nodes.iter().all(|n| {
            std::fs::read_dir(n.dir.join("runtime/containers"))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
        })
    };
    wait_for("all containers gone", Duration::from_secs(120), || {
        all_gone().then_some(())
    })?;
    Ok(())
}

/// `--secrets`: 100 replicas with three secrets each against 100 without, rounds interleaved.
async fn secrets_rounds(
    sock: &str,
    client: &Client,
    data_dir: &std::path::Path,
    tmp: &std::path::Path,
    repeat: usize,
) -> anyhow::Result<()> {
    for i in 1..=3 {
        let f = tmp.join(format!("secret-{i}"));
        std::fs::write(&f, format!("bench secret {i}"))?;
        cli(
            sock,
            &[
                "secret",
                "create",
                &format!("bench-s{i}"),
                &f.to_string_lossy(),
            ],
        )?;
    }
    // `--secrets-control`: both arms without secrets (an A/A run: what the order of the rounds
    // alone does to the ratio).
    let control = std::env::args().any(|a| a == "--secrets-control");
    let with: &[&str] = if control {
        &[]
    } else {
        &[
            "--secret", "bench-s1", "--secret", "bench-s2", "--secret", "bench-s3",
        ]
    };
    let b = if control {
        "no secrets (control)"
    } else {
        "3 secrets"
    };
    let (mut plain, mut secret) = (Vec::new(), Vec::new());
    let mut paired = Vec::new();
    for r in 1..=repeat {
        // The arm that runs second in a round is slower (an A/A run shows it), so the order
        // alternates: plain first in odd rounds, secrets first in even ones.
        let (p, s) = if r % 2 == 1 {
            quiet();
            let (p, _) = flotilla_round(sock, client, data_dir, 100, &[]).await?;
            quiet();
            let (s, _) = flotilla_round(sock, client, data_dir, 100, with).await?;
            (p, s)
        } else {
            quiet();
            let (s, _) = flotilla_round(sock, client, data_dir, 100, with).await?;
            quiet();
            let (p, _) = flotilla_round(sock, client, data_dir, 100, &[]).await?;
            (p, s)
        };
        paired.push(Duration::from_secs_f64(s.as_secs_f64() / p.as_secs_f64()));
        println!(
            "  --replicas 100, round {r}: no secrets {:.2} s, {b} {:.2} s",
            p.as_secs_f64(),
            s.as_secs_f64()
        );
        plain.push(p);
        secret.push(s);
    }
    let p = median(&mut plain);
    let s = median(&mut secret);
    println!(
        "create --replicas 100 → all running, median of {repeat}: no secrets {:.2} s ({}), {b} {:.2} s ({}), ratio {:.2}x",
        p.as_secs_f64(),
        range(&plain),
        s.as_secs_f64(),
        range(&secret),
        s.as_secs_f64() / p.as_secs_f64()
    );
    println!(
        "median of the per-round ratios: {:.2}x",
        median(&mut paired).as_secs_f64()
    );
    Ok(())
}
