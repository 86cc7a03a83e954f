//! Helpers shared by the integration tests: namespaces that are removed on drop, a tiny
//! TCP server, and connects from inside a namespace.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_net::netns;

/// A per-test run dir; every namespace file in it is unmounted and removed on drop, even
/// when the test panics. Every link a test makes lives in one of these namespaces, so
/// removing them removes the links (and the iptables rules) too.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("flt-net-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespace dir (what a node would keep under its run dir).
    pub fn netns_dir(&self) -> PathBuf {
        self.dir.path().join("netns")
    }

    pub fn netns(&self, name: &str) -> PathBuf {
        netns::create(&self.netns_dir(), name).expect("create netns")
    }

    /// A namespace in subdirectory `sub` of the sandbox (e.g. a node's own run dir).
    pub fn netns_in(&self, sub: &str, name: &str) -> PathBuf {
        netns::create(&self.dir.path().join(sub), name).expect("create netns")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Namespace files may sit in any direct subdirectory.
        let Ok(rd) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for entry in rd.flatten() {
            if let Ok(list) = netns::list(&entry.path()) {
                for p in list {
                    if let Err(e) = netns::remove(&p) {
                        eprintln!("cleanup: {e}");
                    }
                }
            }
        }
    }
}

/// Accepts connections on a listener bound inside a namespace and answers each with
/// `reply` (`{peer}` replaced by the client's address), until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(ns: &Path, addr: SocketAddr, reply: &str) -> Self {
        let listener = netns::run_in(ns, move || TcpListener::bind(addr))
            .expect("run_in")
            .expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let reply = reply.to_string();
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.set_nonblocking(false);
                        let text = reply.replace("{peer}", &peer.ip().to_string());
                        let _ = c.write_all(text.as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
            addr,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP connect from inside `ns`; returns what the server sent.
pub fn fetch(ns: &Path, addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    netns::run_in(ns, move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .map_err(std::io::Error::other)?
}

/// Retries [`fetch`] until it succeeds or `deadline` passes.
pub fn fetch_until(ns: &Path, addr: SocketAddr, deadline: Duration) -> std::io::Result<String> {
    let end = Instant::now() + deadline;
    loop {
        match fetch(ns, addr, Duration::from_millis(500)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= end => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `busybox ping -c1 -W1 target` from inside `ns`.
pub fn ping(ns: &Path, target: &str) -> bool {
    let target = target.to_string();
    netns::run_in(ns, move || {
        std::process::Command::new("/usr/bin/busybox")
            .args(["ping", "-c1", "-W1", &target])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
    .unwrap_or(false)
}

pub fn net(s: &str) -> ipnet::Ipv4Net {
    s.parse().expect("ipv4 net")
}

pub fn sock(s: &str) -> SocketAddr {
    s.parse().expect("socket addr")
}

/// The node chains a test host gets: subnet `10.200.<n>.0/24` on `fltbr0`, the cluster pool
/// `10.200.0.0/16`, the VIP pool `10.199.0.0/16`, DNS on the gateway, and with `vxlan_port` the
/// overlay device `fltvx0` and its allow-list.
pub fn rules_for(tag: &str, n: u8, vxlan_port: Option<u16>) -> flotilla_net::nat::NatRules {
    flotilla_net::nat::NatRules {
        tag: tag.into(),
        subnet: net(&format!("10.200.{n}.0/24")),
        bridge: "fltbr0".into(),
        overlay: vxlan_port.map(|_| "fltvx0".into()),
        cluster_pool: Some(net("10.200.0.0/16")),
        outbound_nat: true,
        trusted_ifaces: vec![],
        vxlan_port,
        dns: Some(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(10, 200, n, 1),
            53,
        )),
        vip_pool: Some(net("10.199.0.0/16")),
    }
}
