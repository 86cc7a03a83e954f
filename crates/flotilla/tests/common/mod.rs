//! Test harness: real `flotilla` node processes on distinct loopback addresses, real sockets,
//! real disks. Every wait is a condition polled against a deadline.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

pub struct NodeProc {
    pub name: String,
    pub dir: PathBuf,
    pub addr: String,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    /// Run inside this network namespace (`/run/netns/NAME`), like a separate host.
    pub netns: Option<String>,
}

/// The node binary, entered into `netns` when given (nsenter switches only the network
/// namespace; `ip netns exec` would also give the node a private mount namespace).
fn node_command(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(BIN);
            c
        }
        None => Command::new(BIN),
    }
}

impl NodeProc {
    pub fn socket(&self) -> String {
        format!("unix://{}/api.sock", self.dir.display())
    }

    pub fn log(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    pub fn spawn(&mut self, args: &[String]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file");
        let child = node_command(self.netns.as_deref())
            .arg("node")
            .arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg(&self.addr)
            .args(args)
            .args(&self.extra)
            // Tests send no traffic off the machine: no forwarding to the host's resolvers
            // unless a test names its own (`--dns` in the cluster's extra arguments).
            .args(
                (!self.extra.iter().any(|a| a == "--dns"))
                    .then_some(["--dns", "none"])
                    .into_iter()
                    .flatten(),
            )
            .env("FLOTILLA_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn flotilla");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn(&[]);
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        // Killed and reaped first: nothing can start a container after the cleanup listed them.
        self.kill9();
        // Containers outlive their agent by design: remove them, or they keep running after the
        // test's temporary directory is gone. The cleanup also ends shim processes no record
        // names (a shim whose create the kill interrupted).
        let o = node_command(self.netns.as_deref())
            .args(["node", "cleanup", "--data-dir"])
            .arg(&self.dir)
            .env("FLOTILLA_LOG", "warn")
            .output();
        // A drop cannot fail the test, but a leak must not pass silently.
        match o {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("!!! node cleanup {} failed: {}", self.name, stderr(&o)),
            Err(e) => eprintln!("!!! node cleanup {} did not run: {e}", self.name),
        }
    }
}

impl NodeProc {
    /// What `node cleanup` would still remove for this node (empty = nothing leaked).
    pub fn leftovers(&self) -> String {
        let o = node_command(self.netns.as_deref())
            .args(["node", "cleanup", "--dry-run", "--data-dir"])
            .arg(&self.dir)
            .env("FLOTILLA_LOG", "warn")
            .output()
            .expect("node cleanup --dry-run");
        if o.status.success() {
            String::new()
        } else {
            format!("{}{}", stdout(&o), stderr(&o))
        }
    }

    /// `node cleanup` (in the node's network namespace); panics if it fails.
    pub fn cleanup(&self) {
        let o = node_command(self.netns.as_deref())
            .args(["node", "cleanup", "--data-dir"])
            .arg(&self.dir)
            .env("FLOTILLA_LOG", "warn")
            .output()
            .expect("node cleanup");
        assert!(
            o.status.success(),
            "node cleanup {}: {}",
            self.name,
            stderr(&o)
        );
    }

    /// The host part of the node's address.
    pub fn ip(&self) -> String {
        self.addr
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or_default()
            .to_string()
    }
}

/// Separate "hosts" for multi-node networking tests: one network namespace per node, each
/// with a veth to a test bridge in the test's own namespace (10.250.<net>.254/24; host k is
/// 10.250.<net>.k). Everything is removed on drop.
pub struct Hosts {
    pub net: u8,
    pub names: Vec<String>,
    bridge: String,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Hosts {
    pub fn new(net: u8, count: usize) -> Hosts {
        let bridge = format!("flttb{net}");
        let mut h = Hosts {
            net,
            names: Vec::new(),
            bridge: bridge.clone(),
        };
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("10.250.{net}.254/24"),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        // With br_netfilter loaded and Docker's FORWARD policy DROP, bridged frames between
        // the hosts would be dropped: accept what crosses the test bridge.
        let _ = Command::new("iptables")
            .args([
                "-w", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
            ])
            .output();
        for k in 1..=count {
            let name = format!("flt-t{net}-h{k}");
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            ip(&["netns", "add", &name]);
            h.names.push(name.clone());
            let outer = format!("flttv{net}h{k}");
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ]);
            ip(&["link", "set", &outer, "master", &bridge, "up"]);
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.250.{net}.{k}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &name, "link", "set", "eth0", "up"]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        h
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let b = self.bridge.as_str();
        while Command::new("iptables")
            .args(["-w", "-D", "FORWARD", "-i", b, "-o", b, "-j", "ACCEPT"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {}
    }
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    /// 127.0.<net>.x
    pub net: u8,
    pub extra: Vec<String>,
    /// Declared after `nodes`: nodes are cleaned up (inside their namespaces) first.
    pub hosts: Option<Hosts>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first: their cleanup needs the data dirs, which `tmp` deletes when it drops.
        self.nodes.clear();
    }
}

/// Runs the CLI; returns its output.
pub fn cli(host: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--host")
        .arg(host)
        .args(args)
        .output()
        .expect("run flotilla cli")
}

pub fn cli_tls(host: &str, tls_dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--host")
        .arg(host)
        .arg("--tls-dir")
        .arg(tls_dir)
        .args(args)
        .output()
        .expect("run flotilla cli")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// A new cluster whose first manager is initialized on 127.0.<net>.1.
    pub fn init(net: u8, extra: &[&str]) -> Cluster {
        Self::init_with(net, extra, None)
    }

    /// Like [`Cluster::init`], with every node in its own network namespace ([`Hosts`]).
    pub fn init_in_hosts(net: u8, hosts: usize, extra: &[&str]) -> Cluster {
        Self::init_with(net, extra, Some(Hosts::new(net, hosts)))
    }

    fn init_with(net: u8, extra: &[&str], hosts: Option<Hosts>) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = Cluster {
            tmp,
            nodes: Vec::new(),
            net,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            hosts,
        };
        // Clusters of concurrent tests share the host's network namespace: give each its own
        // address plan so their bridges and VIPs never overlap.
        let pool = format!("10.{net}.0.0/17");
        let vips = format!("10.{net}.128.0/17");
        c.add_node(
            "m1",
            &["--init", "--address-pool", &pool, "--vip-pool", &vips],
        );
        let sock = c.nodes[0].socket();
        wait_for("first manager to answer", Duration::from_secs(30), || {
            let o = cli(&sock, &["node", "ls", "--format", "json"]);
            o.status.success().then_some(())
        });
        c
    }

    pub fn admin_dir(&self) -> PathBuf {
        self.nodes[0].dir.join("admin")
    }

    fn add_node(&mut self, name: &str, args: &[&str]) -> usize {
        let idx = self.nodes.len();
        let (addr, netns) = match &self.hosts {
            Some(h) => (
                format!("10.250.{}.{}:4440", self.net, idx + 1),
                Some(
                    h.names
                        .get(idx)
                        .cloned()
                        .expect("a host namespace for every node"),
                ),
            ),
            None => (format!("127.0.{}.{}:4440", self.net, idx + 1), None),
        };
        let mut n = NodeProc {
            name: name.to_string(),
            dir: self.tmp.path().join(name),
            addr,
            child: None,
            extra: self.extra.clone(),
            netns,
        };
        let mut all: Vec<String> = vec!["--name".into(), name.into()];
        all.extend(args.iter().map(|s| s.to_string()));
        n.spawn(&all);
        self.nodes.push(n);
        idx
    }

    pub fn token(&self, role: &str) -> String {
        let o = self.any_cli(&["cluster", "join-token", role, "-q"]);
        assert!(o.status.success(), "join-token: {}", stderr(&o));
        stdout(&o).trim().to_string()
    }

    /// Joins a node through the first live manager; waits until it shows as ready.
    pub fn join(&mut self, name: &str, role: &str) -> usize {
        let token = self.token(role);
        let via = self.live_manager_addr();
        let idx = self.add_node(name, &["--join", &via, "--token", &token]);
        let want = name.to_string();
        wait_for(
            &format!("{name} to be ready"),
            Duration::from_secs(60),
            || {
                let nodes = self.node_ls().ok()?;
                nodes
                    .iter()
                    .any(|n| n["spec"]["name"] == want.as_str() && n["status"]["state"] == "ready")
                    .then_some(())
            },
        );
        if role == "manager" {
            let addr = self.nodes[idx].addr.clone();
            wait_for(
                &format!("{name} to be a raft voter"),
                Duration::from_secs(60),
                || {
                    let info = self.cluster_info().ok()?;
                    info["managers"]
                        .as_array()?
                        .iter()
                        .any(|m| m["addr"] == addr.as_str() && m["voter"] == true)
                        .then_some(())
                },
            );
        }
        idx
    }

    pub fn live_manager_addr(&mut self) -> String {
        for n in self.nodes.iter_mut() {
            if n.is_running() && n.dir.join("raft").exists() {
                return n.addr.clone();
            }
        }
        panic!("no live manager")
    }

    /// Runs a CLI command against the first live manager socket.
    pub fn any_cli(&self, args: &[&str]) -> Output {
        let mut last = None;
        for n in &self.nodes {
            if n.child.is_none() || !n.dir.join("raft").exists() {
                continue;
            }
            let o = cli(&n.socket(), args);
            if o.status.success() {
                return o;
            }
            last = Some(o);
        }
        last.expect("no manager to ask")
    }

    pub fn node_ls(&self) -> Result<Vec<serde_json::Value>, String> {
        let o = self.any_cli(&["node", "ls", "--format", "json"]);
        if !o.status.success() {
            return Err(stderr(&o));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
    }

    pub fn cluster_info(&self) -> Result<serde_json::Value, String> {
        let o = self.any_cli(&["cluster", "info", "--format", "json"]);
        if !o.status.success() {
            return Err(stderr(&o));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
    }

    /// Index of the node that is the current Raft leader, as a consistent (non-stale)
    /// `cluster info` from any live manager reports it.
    pub fn leader(&self) -> Option<usize> {
        for n in &self.nodes {
            if n.child.is_none() || !n.dir.join("raft").exists() {
                continue;
            }
            let o = cli(&n.socket(), &["cluster", "info", "--format", "json"]);
            if !o.status.success() || stderr(&o).contains("stale") {
                continue;
            }
            let v: serde_json::Value = match serde_json::from_slice(&o.stdout) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let addr = v["leader"]["addr"].as_str()?.to_string();
            return self
                .nodes
                .iter()
                .position(|n| n.addr == addr && n.child.is_some());
        }
        None
    }

    pub fn wait_leader(&self, within: Duration) -> usize {
        wait_for("a leader", within, || self.leader())
    }
}

/// A busybox root filesystem for test images (Debian's busybox-static).
pub fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static installed");
    for a in [
        "sh", "echo", "sleep", "cat", "ls", "id", "hostname", "date", "false", "true", "test",
        "mount", "touch", "httpd", "wget", "nslookup", "mkdir", "kill", "nc",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

impl Cluster {
    /// Imports a busybox image on the first manager only; other nodes pull it from the
    /// managers' registry when a task needs it.
    pub fn import(&self, name: &str, cmd: &str) -> String {
        let rootfs = self.tmp.path().join("rootfs");
        if !rootfs.exists() {
            busybox_rootfs(&rootfs);
        }
        let o = cli(
            &self.nodes[0].socket(),
            &[
                "image",
                "import",
                rootfs.to_str().unwrap(),
                "--name",
                name,
                "--cmd",
                cmd,
            ],
        );
        assert!(o.status.success(), "import: {}", stderr(&o));
        stdout(&o)
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// Runs the CLI against the first manager's socket.
    pub fn run(&self, args: &[&str]) -> Output {
        cli(&self.nodes[0].socket(), args)
    }

    pub fn tasks(&self, service: &str) -> Vec<serde_json::Value> {
        let o = self.run(&["service", "ps", service, "--format", "json"]);
        assert!(o.status.success(), "service ps: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Every task of every service.
    pub fn tasks_all(&self) -> Vec<serde_json::Value> {
        let o = cli(
            &self.nodes[0].socket(),
            &["service", "ls", "--format", "json"],
        );
        let services: Vec<serde_json::Value> =
            serde_json::from_slice(&o.stdout).unwrap_or_default();
        let mut out = Vec::new();
        for s in services {
            out.extend(self.tasks(s["id"].as_str().unwrap_or_default()));
        }
        out
    }

    pub fn node_id(&self, name: &str) -> String {
        let nodes = self.node_ls().unwrap();
        nodes
            .iter()
            .find(|n| n["spec"]["name"] == name)
            .and_then(|n| n["id"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    /// Running tasks (desired running) of a service, as (task id, node id).
    pub fn running(&self, service: &str) -> Vec<(String, String)> {
        self.tasks(service)
            .iter()
            .filter(|t| t["status"]["state"] == "running" && t["desired_state"] == "running")
            .map(|t| {
                (
                    t["id"].as_str().unwrap_or_default().to_string(),
                    t["node_id"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

/// `curl` against `addr` with a node's key files (`ca.pem`, `node.pem`, `node.key` in `keys`);
/// returns (HTTP status, body).
pub fn curl(keys: &Path, addr: &str, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let (ip, port) = addr.rsplit_once(':').unwrap();
    let mut cmd = Command::new("curl");
    // HTTP/1.1: curl 7.88 reports an HTTP/2 stream the server answers (403) and resets before
    // reading the request body as a transfer error, not as the answer.
    cmd.args(["-sS", "--http1.1", "--max-time", "5", "-X", method])
        .arg("--cacert")
        .arg(keys.join("ca.pem"))
        .arg("--cert")
        .arg(keys.join("node.pem"))
        .arg("--key")
        .arg(keys.join("node.key"))
        .arg("--resolve")
        .arg(format!("flotilla-node:{port}:{ip}"))
        .args(["-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if method == "POST" {
        cmd.args(["-H", "content-type: application/json", "--data", "{}"]);
    }
    let out = cmd
        .arg(format!("https://flotilla-node:{port}{path}"))
        .output()
        .expect("curl");
    let text = stdout(&out);
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
