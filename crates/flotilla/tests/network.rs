//! Task networking end to end: real node processes, real containers, real bridges, veths,
//! VXLAN and the userspace routing mesh. HTTP requests go to the nodes' own addresses only
//! (loopback, or the test's private network namespaces).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// httpd answering with the container's hostname (the first 12 characters of the task id).
const WEB: &str = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www";

/// One HTTP/1.0 GET; the body, or why it failed.
fn get(addr: &str, path: &str) -> Result<String, String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    if !buf.starts_with("HTTP/1.") || buf.get(9..12) != Some("200") {
        return Err(format!("bad response: {:?}", buf.lines().next()));
    }
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(body.trim().to_string())
}

/// Waits until `service` has `n` running tasks that passed their health check.
fn wait_healthy(c: &Cluster, service: &str, n: usize) -> Vec<serde_json::Value> {
    wait_for(
        &format!("{n} healthy tasks of {service}"),
        Duration::from_secs(90),
        || {
            let ts: Vec<serde_json::Value> = c
                .tasks(service)
                .into_iter()
                .filter(|t| {
                    t["desired_state"] == "running"
                        && t["status"]["state"] == "running"
                        && t["status"]["health"] == "healthy"
                        && t["status"]["address"].is_string()
                })
                .collect();
            (ts.len() == n).then_some(ts)
        },
    )
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

fn create_web(c: &Cluster, name: &str, image: &str, port: u16, extra: &[&str]) {
    let publish = format!("{port}:80");
    let mut args = vec![
        "service",
        "create",
        "--name",
        name,
        "--replicas",
        "3",
        "-p",
        &publish,
        "--health-http",
        "/index.html",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "1s",
        "--health-retries",
        "2",
        "--detach",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[image, "sh", "-c", WEB]);
    let o = c.run(&args);
    assert!(o.status.success(), "create {name}: {}", stderr(&o));
}

/// Every node's published port reaches every replica.
fn assert_mesh_reaches_all(c: &Cluster, port: u16, tasks: &[serde_json::Value]) {
    let want: BTreeSet<String> = tasks
        .iter()
        .map(|t| short(t["id"].as_str().unwrap()))
        .collect();
    for n in &c.nodes {
        let addr = format!("{}:{port}", n.ip());
        let seen = wait_for(
            &format!("{addr} to reach all replicas"),
            Duration::from_secs(30),
            || {
                let mut seen = BTreeSet::new();
                for _ in 0..30 {
                    if let Ok(body) = get(&addr, "/") {
                        seen.insert(body);
                    }
                }
                (seen == want).then_some(seen)
            },
        );
        assert_eq!(seen, want);
    }
}

/// Stops every node, runs `node cleanup`, and asserts nothing is left behind.
fn stop_and_check_leftovers(c: &mut Cluster) {
    for n in c.nodes.iter_mut() {
        n.stop();
        n.cleanup();
        assert_eq!(n.leftovers(), "", "{} left something behind", n.name);
    }
}

/// A client task on `node_id` running `script`; returns its log once `done` appears in it.
fn client_log(c: &Cluster, name: &str, node_id: &str, script: &str, image: &str) -> String {
    client_log_with(c, name, node_id, script, image, &[])
}

/// [`client_log`] with extra `service create` flags.
fn client_log_with(
    c: &Cluster,
    name: &str,
    node_id: &str,
    script: &str,
    image: &str,
    extra: &[&str],
) -> String {
    let constraint = format!("node.id=={node_id}");
    let full = format!("{script}; echo CLIENT-DONE; sleep 3600");
    let mut args = vec![
        "service",
        "create",
        "--name",
        name,
        "--constraint",
        &constraint,
        "--detach",
    ];
    args.extend_from_slice(extra);
    args.extend([image, "sh", "-c", &full]);
    let o = c.run(&args);
    assert!(o.status.success(), "create {name}: {}", stderr(&o));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = stdout(&c.run(&["service", "logs", name]));
        if text.contains("CLIENT-DONE") {
            return text;
        }
        if std::time::Instant::now() > deadline {
            let ps = stdout(&c.run(&["service", "ps", name]));
            panic!("timed out after 60s waiting for {name} to finish: tasks {ps}, log {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn n10_mesh_discovery_health_rolling_update_and_no_leaks() {
    let mut c = Cluster::init(41, &[]);
    c.join("w1", "worker");
    c.join("w2", "worker");
    c.import("web:1", "/bin/sh");
    c.import("web:2", "sh");
    create_web(&c, "web", "web:1", 8080, &[]);
    let tasks = wait_healthy(&c, "web", 3);

    // 1. Routing mesh: each node's 8080 answers from all three replicas.
    assert_mesh_reaches_all(&c, 8080, &tasks);

    // 2. Kill one task's process: once the agent has noticed, no request fails.
    let victim = &tasks[0];
    let victim_id = victim["id"].as_str().unwrap().to_string();
    let victim_node = victim["node_id"].as_str().unwrap().to_string();
    let node_dir = c
        .nodes
        .iter()
        .find(|n| c.node_id(&n.name) == victim_node)
        .map(|n| n.dir.clone())
        .unwrap();
    let o = std::process::Command::new("runc")
        .arg("--root")
        .arg(node_dir.join("run/runtime/runc"))
        .args(["kill", &victim_id, "KILL"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "runc kill: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let entry = format!("{}:8080", c.nodes[0].ip());
    let mut early_failures = 0;
    wait_for(
        "the killed task to be noticed",
        Duration::from_secs(30),
        || {
            if get(&entry, "/").is_err() {
                early_failures += 1;
            }
            let t = c
                .tasks("web")
                .into_iter()
                .find(|t| t["id"] == victim_id.as_str())?;
            (t["status"]["state"] != "running").then_some(())
        },
    );
    let mut failures = Vec::new();
    for _ in 0..100 {
        if let Err(e) = get(&entry, "/") {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "requests failed after the kill was noticed: {failures:?}"
    );
    eprintln!("requests failed before the kill was noticed: {early_failures}");
    let tasks = wait_healthy(&c, "web", 3);

    // 3. Service discovery: the name resolves to the VIP, tasks.<name> to the tasks, and the
    //    VIP answers inside a container.
    let m1 = c.node_id("m1");
    let ips: Vec<String> = tasks
        .iter()
        .map(|t| t["status"]["address"].as_str().unwrap().to_string())
        .collect();
    let log = client_log(
        &c,
        "client",
        &m1,
        "nslookup web; nslookup tasks.web; wget -qO- http://web/; wget -qO- http://web.flotilla/",
        "web:1",
    );
    let svc: serde_json::Value = serde_json::from_str(&stdout(
        &c.run(&["service", "inspect", "web", "--format", "json"]),
    ))
    .unwrap();
    let vip = svc["vip"].as_str().expect("web has a VIP").to_string();
    assert!(log.contains(&vip), "web resolves to its VIP {vip}: {log}");
    for ip in &ips {
        assert!(log.contains(ip.as_str()), "tasks.web lists {ip}: {log}");
    }
    let names: BTreeSet<String> = tasks
        .iter()
        .map(|t| short(t["id"].as_str().unwrap()))
        .collect();
    let answered = names.iter().filter(|n| log.contains(n.as_str())).count();
    assert!(answered >= 1, "the VIP answered from a replica: {log}");

    // 4. An agent restart keeps its running tasks and their networking: same tasks, same
    //    addresses, and the mesh reaches them again.
    let w1 = c.node_id("w1");
    let on_w1 = |tasks: &[serde_json::Value]| -> BTreeSet<(String, String)> {
        tasks
            .iter()
            .filter(|t| t["node_id"] == w1.as_str())
            .map(|t| {
                (
                    t["id"].as_str().unwrap().to_string(),
                    t["status"]["address"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let before = on_w1(&tasks);
    let w1_idx = c.nodes.iter().position(|n| n.name == "w1").unwrap();
    c.nodes[w1_idx].restart();
    wait_for("w1 to be ready again", Duration::from_secs(60), || {
        let nodes = c.node_ls().ok()?;
        nodes
            .iter()
            .any(|n| n["spec"]["name"] == "w1" && n["status"]["state"] == "ready")
            .then_some(())
    });
    let tasks = wait_healthy(&c, "web", 3);
    let after = on_w1(&tasks);
    assert_eq!(
        before, after,
        "w1's tasks and addresses survive its agent's restart"
    );
    assert_mesh_reaches_all(&c, 8080, &tasks);

    // 5. Start-first rolling update under a bounded load: zero failed requests.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, ok, entry) = (stop.clone(), ok.clone(), entry.clone());
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match get(&entry, "/") {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => errors.push(e),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            errors
        })
    };
    let o = c.run(&[
        "service",
        "update",
        "web",
        "--image",
        "web:2",
        "--update-order",
        "start-first",
        "--update-parallelism",
        "1",
    ]);
    assert!(o.status.success(), "update: {}{}", stdout(&o), stderr(&o));
    let updated = wait_healthy(&c, "web", 3);
    stop.store(true, Ordering::Relaxed);
    let errors = load.join().unwrap();
    let served = ok.load(Ordering::Relaxed);
    assert!(
        served > 50,
        "the load ran during the update ({served} requests)"
    );
    assert!(
        errors.is_empty(),
        "{} of {} requests failed during the update: {errors:?}",
        errors.len(),
        served + errors.len()
    );
    assert!(updated.iter().all(|t| t["spec"]["container"]["image"]
        .as_str()
        .unwrap()
        .starts_with("web:2")));

    // 6. Removing everything leaves no task namespaces or veths behind, and after the nodes
    //    stop, `node cleanup` leaves nothing at all.
    let o = c.run(&["service", "rm", "web", "client"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    wait_for(
        "task networks to be released",
        Duration::from_secs(60),
        || {
            c.nodes
                .iter()
                .all(|n| {
                    std::fs::read_dir(n.dir.join("run/net/netns"))
                        .map(|d| d.count() == 0)
                        .unwrap_or(true)
                })
                .then_some(())
        },
    );
    stop_and_check_leftovers(&mut c);
}

#[test]
fn n20_overlay_between_hosts() {
    let mut c = Cluster::init_in_hosts(42, 3, &[]);
    c.join("w1", "worker");
    c.join("w2", "worker");
    c.import("web:1", "/bin/sh");
    create_web(&c, "web", "web:1", 8080, &["--replicas-max-per-node", "1"]);
    let tasks = wait_healthy(&c, "web", 3);
    let node_of: HashMap<String, String> = tasks
        .iter()
        .map(|t| {
            (
                t["node_id"].as_str().unwrap().to_string(),
                t["status"]["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(node_of.len(), 3, "one replica per host: {tasks:?}");

    // Each host's published port reaches the replicas on the other hosts (over VXLAN).
    assert_mesh_reaches_all(&c, 8080, &tasks);

    // A task on host 1 fetches a page from the task on host 3, by address and by name.
    let m1 = c.node_id("m1");
    let w2 = c.node_id("w2");
    let far_ip = node_of.get(&w2).unwrap().clone();
    let far_task = tasks
        .iter()
        .find(|t| t["node_id"] == w2.as_str())
        .map(|t| short(t["id"].as_str().unwrap()))
        .unwrap();
    // `edge`: one task on host 3, DNS round robin (no VIP), a TCP health check, and a
    // host-mode port with the PROXY protocol: only host 3 listens, and the task learns the
    // client's real address. The task prints what it receives (busybox nc).
    let constraint = format!("node.id=={w2}");
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "edge",
        "--constraint",
        &constraint,
        "--endpoint-mode",
        "dnsrr",
        "--health-tcp",
        "80",
        "--health-interval",
        "300ms",
        "--health-retries",
        "5",
        "--publish",
        "published=8082,target=80,mode=host,proxy-protocol=v1",
        "--detach",
        "web:1",
        "sh",
        "-c",
        "while true; do nc -l -p 80 </dev/null; done",
    ]);
    assert!(o.status.success(), "create edge: {}", stderr(&o));
    let edge = wait_healthy(&c, "edge", 1);
    let edge_ip = edge[0]["status"]["address"].as_str().unwrap().to_string();
    let svc: serde_json::Value = serde_json::from_str(&stdout(
        &c.run(&["service", "inspect", "edge", "--format", "json"]),
    ))
    .unwrap();
    assert!(svc.get("vip").is_none(), "dnsrr services get no VIP: {svc}");
    let host3 = c.nodes.iter().find(|n| n.name == "w2").unwrap().ip();
    let host1 = c.nodes[0].ip();
    wait_for(
        "host 3 to forward 8082 with a PROXY header",
        Duration::from_secs(30),
        || {
            let sa: SocketAddr = format!("{host3}:8082").parse().ok()?;
            let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(2)).ok()?;
            s.write_all(b"hello-through-the-mesh\n").ok()?;
            drop(s);
            let log = stdout(&c.run(&["service", "logs", "edge"]));
            (log.contains("PROXY TCP4 10.250.42.254 ") && log.contains("hello-through-the-mesh"))
                .then_some(())
        },
    );
    let sa: SocketAddr = format!("{host1}:8082").parse().unwrap();
    assert!(
        TcpStream::connect_timeout(&sa, Duration::from_secs(2)).is_err(),
        "a host-mode port listens only where the service's task runs"
    );

    let log = client_log(
        &c,
        "client",
        &m1,
        &format!("wget -qO- http://{far_ip}/; nslookup tasks.web; nslookup edge"),
        "web:1",
    );
    assert!(
        log.contains(&far_task),
        "host 1 reached the task on host 3 ({far_ip}): {log}"
    );
    assert!(
        log.contains(&edge_ip),
        "edge (dnsrr) resolves to its task {edge_ip}: {log}"
    );

    let o = c.run(&["service", "rm", "web", "edge", "client"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    stop_and_check_leftovers(&mut c);
}

/// A resolver for the test: answers `example.test` with 192.0.2.7 (TTL 60), NXDOMAIN for
/// anything else, and prints one line per query it receives.
const FAKE_UPSTREAM: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("listening", flush=True)
while True:
    q, peer = s.recvfrom(512)
    ident, flags, qd = struct.unpack(">HHH", q[:6])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode()); i += 1 + q[i]
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    name = ".".join(labels).lower()
    print("query", name, qtype, flush=True)
    if name == "example.test" and qtype == 1:
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 7])
        s.sendto(struct.pack(">HHHHHH", ident, 0x8180, 1, 1, 0, 0) + question + answer, peer)
    else:
        s.sendto(struct.pack(">HHHHHH", ident, 0x8183, 1, 0, 0, 0) + question, peer)
"#;

/// A network namespace `fltdns<net>` joined to the host by a veth (host 10.251.<net>.1/30,
/// namespace .2) running [`FAKE_UPSTREAM`]; removed on drop.
struct Upstream {
    ns: String,
    server: std::process::Child,
    log: std::path::PathBuf,
}

impl Upstream {
    fn start(net: u8, dir: &std::path::Path) -> Upstream {
        let (ns, host_if, ns_if) = (
            format!("fltdns{net}"),
            format!("fdns{net}h"),
            format!("fdns{net}n"),
        );
        let ip = |args: &[&str]| {
            let o = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(o.status.success(), "ip {args:?}: {}", stderr(&o));
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &host_if])
            .output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &ns]);
        ip(&[
            "addr",
            "add",
            &format!("10.251.{net}.1/30"),
            "dev",
            &host_if,
        ]);
        ip(&["link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("10.251.{net}.2/30"),
            "dev",
            &ns_if,
        ]);
        in_ns(&["ip", "link", "set", &ns_if, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        let log = dir.join("upstream.log");
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", FAKE_UPSTREAM])
            .arg(format!("10.251.{net}.2"))
            .stdout(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for("the fake upstream", Duration::from_secs(10), || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("listening")
                .then_some(())
        });
        Upstream { ns, server, log }
    }

    fn queries(&self, name: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("query {name} 1")))
            .count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

#[test]
fn n30_names_outside_the_cluster_resolve_through_the_nodes_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(44, dir.path());
    let c = Cluster::init(44, &["--dns", "10.251.44.2"]);
    c.import("dnsclient:1", "sh");
    let m1 = c.node_id("m1");
    let log = client_log(
        &c,
        "resolver",
        &m1,
        "nslookup example.test; nslookup example.test; nslookup missing.test",
        "dnsclient:1",
    );
    assert!(
        log.contains("192.0.2.7"),
        "example.test resolved upstream: {log}"
    );
    assert!(
        log.contains("NXDOMAIN") || log.contains("can't find missing.test"),
        "an unknown outside name is NXDOMAIN: {log}"
    );
    assert_eq!(
        upstream.queries("example.test"),
        1,
        "the second lookup came from the node's cache"
    );
    // Cluster names are still answered by the node, not forwarded.
    let before = std::fs::read_to_string(&upstream.log).unwrap_or_default();
    let log = client_log(&c, "cluster-name", &m1, "nslookup resolver", "dnsclient:1");
    assert!(log.contains("Address"), "{log}");
    let after = std::fs::read_to_string(&upstream.log).unwrap_or_default();
    assert!(
        !after[before.len()..].contains("query resolver "),
        "a cluster name was forwarded: {after}"
    );
}

/// A service's `--dns`: its tasks' outside names go to its own resolver, on a node that
/// forwards nothing itself (`--dns none`, the harness default); other tasks still get NXDOMAIN.
#[test]
fn n31_a_services_own_resolver() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(46, dir.path());
    let c = Cluster::init(46, &[]);
    c.import("dnsclient:1", "sh");
    let m1 = c.node_id("m1");
    let log = client_log_with(
        &c,
        "own-resolver",
        &m1,
        "nslookup example.test; nslookup resolver-peer",
        "dnsclient:1",
        &["--dns", "10.251.46.2"],
    );
    assert!(log.contains("192.0.2.7"), "resolved through --dns: {log}");
    assert!(upstream.queries("example.test") >= 1);
    let log = client_log(
        &c,
        "no-resolver",
        &m1,
        "nslookup example.test",
        "dnsclient:1",
    );
    assert!(
        !log.contains("192.0.2.7"),
        "a task without --dns used another task's resolver: {log}"
    );
    // Bad values are refused with the accepted form.
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "bad",
        "--dns",
        "8.8.8.8:0",
        "dnsclient:1",
    ]);
    assert!(stderr(&o).contains("IPv4 address"), "{}", stderr(&o));
}

/// A service without published ports answers on every port of its VIP, by name, from a task
/// on another host and from one on its own host (the kernel's VIP load balancing; UDP, the
/// draining of removed tasks and a task reaching itself are in `flotilla-net` t70).
#[test]
fn n32_a_vip_carries_every_port_across_hosts() {
    let mut c = Cluster::init_in_hosts(43, 2, &[]);
    c.join("w1", "worker");
    c.import("kv:1", "/bin/sh");
    // Two replicas, one per host; each answers "<port> <hostname>" on 7000 and 7001. Healthy
    // (so in the VIP's list) once 7000 listens.
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "kv",
        "--replicas",
        "2",
        "--replicas-max-per-node",
        "1",
        "--health-tcp",
        "7000",
        "--health-interval",
        "200ms",
        "--detach",
        "kv:1",
        "sh",
        "-c",
        "(while true; do echo \"p7001 $(hostname)\" | nc -l -p 7001; done) & \
         while true; do echo \"p7000 $(hostname)\" | nc -l -p 7000; done",
    ]);
    assert!(o.status.success(), "create kv: {}", stderr(&o));
    let tasks = wait_healthy(&c, "kv", 2);
    let want: BTreeSet<String> = tasks
        .iter()
        .map(|t| short(t["id"].as_str().unwrap()))
        .collect();
    let svc: serde_json::Value = serde_json::from_str(&stdout(
        &c.run(&["service", "inspect", "kv", "--format", "json"]),
    ))
    .unwrap();
    let vip = svc["vip"].as_str().expect("a VIP").to_string();
    for node in ["m1", "w1"] {
        let id = c.node_id(node);
        let log = client_log(
            &c,
            &format!("kv-client-{node}"),
            &id,
            "nslookup kv; for i in $(seq 1 24); do nc -w 2 kv 7000 </dev/null; \
             nc -w 2 kv 7001 </dev/null; done",
            "kv:1",
        );
        assert!(log.contains(&vip), "kv resolves to its VIP {vip}: {log}");
        for port in ["p7000", "p7001"] {
            let seen: BTreeSet<String> = log
                .lines()
                .filter_map(|l| {
                    let mut words = l.split_whitespace().skip_while(|w| *w != port);
                    words.next()?;
                    words.next()
                })
                .map(str::to_string)
                .collect();
            assert_eq!(
                seen, want,
                "from {node}, {port} of the VIP reached both replicas: {log}"
            );
        }
    }
    let o = c.run(&["service", "rm", "kv", "kv-client-m1", "kv-client-w1"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    stop_and_check_leftovers(&mut c);
}

/// `nc` lines `<word> <hostname>` a client log shows for `word`: the hostnames reached.
fn reached(log: &str, word: &str) -> BTreeSet<String> {
    log.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip_while(|w| *w != word);
            words.next()?;
            words.next()
        })
        .map(str::to_string)
        .collect()
}

/// A replicated service on `networks`, one task per host, answering `<word> <hostname>` on
/// port 7000 (healthy once it listens).
fn create_on_networks(c: &Cluster, name: &str, word: &str, networks: &[&str]) {
    let script = format!("while true; do echo \"{word} $(hostname)\" | nc -l -p 7000; done");
    let mut args = vec![
        "service",
        "create",
        "--name",
        name,
        "--replicas",
        "2",
        "--replicas-max-per-node",
        "1",
        "--health-tcp",
        "7000",
        "--health-interval",
        "200ms",
        "--detach",
    ];
    for n in networks {
        args.extend(["--network", n]);
    }
    args.extend(["nb:1", "sh", "-c", &script]);
    let o = c.run(&args);
    assert!(o.status.success(), "create {name}: {}", stderr(&o));
}

/// User-defined networks: a task reaches the services of the networks it is on, by name and
/// VIP, across hosts, and nothing of the others (names unknown, addresses unreachable); an
/// internal network does not reach outside the cluster; a network in use cannot be removed.
#[test]
fn n40_user_defined_networks_separate_services_across_hosts() {
    let mut c = Cluster::init_in_hosts(45, 2, &[]);
    c.join("w1", "worker");
    c.import("nb:1", "/bin/sh");
    // "Outside the cluster": a listener of the test on the hosts' bridge.
    let outside = std::net::TcpListener::bind("10.250.45.254:17045").unwrap();
    std::thread::spawn(move || {
        for s in outside.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(b"OUTSIDE reached\n");
        }
    });

    for args in [
        &["network", "create", "front"][..],
        &["network", "create", "--subnet", "10.45.96.0/20", "back"][..],
        &["network", "create", "--internal", "iso"][..],
    ] {
        let o = c.run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = c.run(&[
        "network",
        "create",
        "--subnet",
        "192.168.7.0/24",
        "elsewhere",
    ]);
    assert!(
        !o.status.success(),
        "a range outside the address pool is refused"
    );
    assert!(stderr(&o).contains("10.45.0.0/17"), "{}", stderr(&o));
    let o = c.run(&["network", "create", "front"]);
    assert!(!o.status.success(), "a second `front` is refused");
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "x",
        "--network",
        "nope",
        "nb:1",
        "true",
    ]);
    assert!(!o.status.success(), "an unknown network is refused");
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));

    create_on_networks(&c, "srv-f", "FRONT", &["front"]);
    create_on_networks(&c, "srv-b", "BACK", &["name=back,alias=bdb"]);
    let f_tasks = wait_healthy(&c, "srv-f", 2);
    let b_tasks = wait_healthy(&c, "srv-b", 2);
    let names = |ts: &[serde_json::Value]| -> BTreeSet<String> {
        ts.iter()
            .map(|t| short(t["id"].as_str().unwrap()))
            .collect()
    };
    let addrs = |ts: &[serde_json::Value], net: &str| -> Vec<String> {
        ts.iter()
            .map(|t| {
                t["status"]["addresses"][net]
                    .as_str()
                    .unwrap_or_else(|| panic!("an address on {net}: {t}"))
                    .to_string()
            })
            .collect()
    };
    let b_addrs = addrs(&b_tasks, "back");
    for a in &b_addrs {
        let ip: std::net::Ipv4Addr = a.parse().unwrap();
        let [x, y, z, _] = ip.octets();
        assert!(
            (x, y) == (10, 45) && (96..112).contains(&z),
            "{a} in back's range"
        );
    }
    let f_addrs = addrs(&f_tasks, "front");
    // A service's VIP on each of its networks, inside the network's range.
    let vip = |name: &str, net: &str| -> String {
        let svc: serde_json::Value = serde_json::from_str(&stdout(
            &c.run(&["service", "inspect", name, "--format", "json"]),
        ))
        .unwrap();
        svc["network_vips"][net]
            .as_str()
            .unwrap_or_else(|| panic!("a VIP on {net}: {svc}"))
            .to_string()
    };
    let (vip_f, vip_b) = (vip("srv-f", "front"), vip("srv-b", "back"));
    assert!(vip_b.starts_with("10.45.111."), "back's VIP block: {vip_b}");

    // A client on `front` on each host: both front tasks by name, nothing of `back`.
    for node in ["m1", "w1"] {
        let id = c.node_id(node);
        let mut script = String::from(
            "nslookup srv-f; nslookup srv-b; nslookup bdb; for i in $(seq 1 12); do nc -w 2 srv-f 7000 </dev/null; done; ",
        );
        for a in b_addrs.iter().chain([&vip_b]) {
            script.push_str(&format!("nc -w 2 {a} 7000 </dev/null; "));
        }
        script.push_str("nc -w 3 10.250.45.254 17045 </dev/null");
        let log = client_log_with(
            &c,
            &format!("cf-{node}"),
            &id,
            &script,
            "nb:1",
            &["--network", "front"],
        );
        assert!(
            log.contains(&vip_f),
            "srv-f resolves to its VIP from {node}: {log}"
        );
        assert!(
            log.contains("can't find srv-b")
                && log.contains("can't find bdb")
                && !log.contains(&format!("Address: {vip_b}")),
            "srv-b is unknown on front ({node}): {log}"
        );
        assert_eq!(
            reached(&log, "FRONT"),
            names(&f_tasks),
            "from {node}: {log}"
        );
        assert!(
            reached(&log, "BACK").is_empty(),
            "back reached from front on {node}: {log}"
        );
        assert!(
            log.contains("OUTSIDE reached"),
            "front reaches outside from {node}: {log}"
        );
    }

    // A client on both networks reaches both services, by name.
    let w1 = c.node_id("w1");
    let log = client_log_with(
        &c,
        "c-both",
        &w1,
        "for i in $(seq 1 12); do nc -w 2 srv-f 7000 </dev/null; nc -w 2 srv-b 7000 </dev/null; done; \
         for i in $(seq 1 12); do echo -n ALIAS-; nc -w 2 bdb 7000 </dev/null; done",
        "nb:1",
        &["--network", "back", "--network", "front"],
    );
    assert_eq!(reached(&log, "FRONT"), names(&f_tasks), "{log}");
    assert_eq!(reached(&log, "BACK"), names(&b_tasks), "{log}");
    // The alias srv-b has on `back`.
    assert_eq!(reached(&log, "ALIAS-BACK"), names(&b_tasks), "{log}");

    // An internal network: nothing outside, nothing of the other networks.
    let m1 = c.node_id("m1");
    let mut script = String::from("nc -w 3 10.250.45.254 17045 </dev/null; ");
    for a in f_addrs.iter().chain(b_addrs.iter()) {
        script.push_str(&format!("nc -w 2 {a} 7000 </dev/null; "));
    }
    script.push_str("true");
    let log = client_log_with(&c, "c-iso", &m1, &script, "nb:1", &["--network", "iso"]);
    assert!(
        !log.contains("OUTSIDE"),
        "an internal network reached outside: {log}"
    );
    assert!(
        reached(&log, "FRONT").is_empty() && reached(&log, "BACK").is_empty(),
        "{log}"
    );

    // A network in use stays; once unused it goes.
    let o = c.run(&["network", "rm", "back"]);
    assert!(!o.status.success(), "back is in use");
    assert!(stderr(&o).contains("srv-b"), "{}", stderr(&o));
    let o = c.run(&[
        "service", "rm", "srv-f", "srv-b", "cf-m1", "cf-w1", "c-both", "c-iso",
    ]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    // Refused (409, "retry") until the removed services' tasks have stopped.
    for n in ["front", "back", "iso"] {
        wait_for(&format!("network rm {n}"), Duration::from_secs(30), || {
            let o = c.run(&["network", "rm", n]);
            if !o.status.success() {
                assert!(stderr(&o).contains("not stopped"), "rm {n}: {}", stderr(&o));
            }
            o.status.success().then_some(())
        });
    }
    let o = c.run(&["network", "ls", "--format", "json"]);
    assert_eq!(stdout(&o).trim(), "[]", "{}", stdout(&o));
    stop_and_check_leftovers(&mut c);
}

/// Counts, on an interface of the test's namespace, the frames that contain each marker and
/// the UDP datagrams to the tunnel and VXLAN ports, until `stop` exists.
const CAPTURE: &str = r#"
import os, socket, sys
iface, enc, plain, stop = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode(), sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind((iface, 0))
s.settimeout(0.1)
print("listening", flush=True)
n = tun = vx = e = p = 0
while not os.path.exists(stop):
    try:
        f = s.recv(65535)
    except socket.timeout:
        continue
    n += 1
    e += enc in f
    p += plain in f
    if len(f) >= 42 and f[12:14] == b"\x08\x00" and f[23] == 17:
        ihl = (f[14] & 15) * 4
        port = int.from_bytes(f[14 + ihl + 2 : 14 + ihl + 4], "big")
        tun += port == 4790
        vx += port == 4789
print(f"frames={n} tunnel={tun} vxlan={vx} enc={e} plain={p}", flush=True)
"#;

/// An encrypted network: its tasks reach each other across hosts, and a capture of the
/// underlay shows the tunnel's datagrams but never the text they carry (a plain network's
/// text, captured alike, shows the capture sees the overlay's payloads).
#[test]
fn n41_an_encrypted_network_keeps_its_traffic_off_the_wire() {
    let mut c = Cluster::init_in_hosts(47, 2, &[]);
    c.join("w1", "worker");
    c.import("nb:1", "/bin/sh");
    for args in [
        &["network", "create", "--opt", "encrypted", "sec"][..],
        &["network", "create", "plain"][..],
    ] {
        let o = c.run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = c.run(&["network", "create", "--opt", "mtu=9000", "x"]);
    assert!(!o.status.success(), "an unknown option is refused");
    create_on_networks(&c, "srv-e", "ENC-SECRET-4c1d", &["sec"]);
    create_on_networks(&c, "srv-p", "PLAIN-TEXT-9f2e", &["plain"]);
    let e_tasks = wait_healthy(&c, "srv-e", 2);
    let p_tasks = wait_healthy(&c, "srv-p", 2);
    let names = |ts: &[serde_json::Value]| -> BTreeSet<String> {
        ts.iter()
            .map(|t| short(t["id"].as_str().unwrap()))
            .collect()
    };

    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let out = dir.path().join("capture.log");
    let mut capture = std::process::Command::new("python3")
        .args([
            "-c",
            CAPTURE,
            "flttv47h1",
            "ENC-SECRET-4c1d",
            "PLAIN-TEXT-9f2e",
        ])
        .arg(&stop)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    wait_for("the capture", Duration::from_secs(10), || {
        std::fs::read_to_string(&out)
            .ok()?
            .contains("listening")
            .then_some(())
    });
    // Clients on w1 (host 2): every task of each service, one of them on m1 (host 1).
    let w1 = c.node_id("w1");
    let each = |svc: &str| format!("for i in $(seq 1 16); do nc -w 2 {svc} 7000 </dev/null; done");
    let log_e = client_log_with(
        &c,
        "c-sec",
        &w1,
        &each("srv-e"),
        "nb:1",
        &["--network", "sec"],
    );
    let log_p = client_log_with(
        &c,
        "c-plain",
        &w1,
        &each("srv-p"),
        "nb:1",
        &["--network", "plain"],
    );
    std::fs::write(&stop, b"").unwrap();
    let _ = capture.wait();
    let stats = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        reached(&log_e, "ENC-SECRET-4c1d"),
        names(&e_tasks),
        "{log_e}"
    );
    assert_eq!(
        reached(&log_p, "PLAIN-TEXT-9f2e"),
        names(&p_tasks),
        "{log_p}"
    );
    let field = |k: &str| -> u64 {
        stats
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {stats}"))
    };
    assert!(
        field("tunnel") > 0,
        "the tunnel carried the encrypted network: {stats}"
    );
    assert!(
        field("plain") > 0,
        "the capture sees overlay payloads: {stats}"
    );
    assert_eq!(
        field("enc"),
        0,
        "plaintext of the encrypted network on the wire: {stats}"
    );

    let o = c.run(&["service", "rm", "srv-e", "srv-p", "c-sec", "c-plain"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    stop_and_check_leftovers(&mut c);
}
