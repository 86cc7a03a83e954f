//! What a compromised worker (the holder of a worker certificate) cannot do: steer other
//! nodes' traffic with forged task addresses, turn its heartbeats and status reports into a
//! stream of Raft writes, or multiply its agent streams. Every attack speaks the API with the
//! worker's own certificate (`DATA/tls/node.{pem,key}`), against the first manager (the
//! leader), on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(60);
const PWNED: &str = "\u{1b}]0;pwned\u{7}";

/// curl with node `idx`'s certificate against the first manager.
fn node_curl(c: &Cluster, idx: usize) -> Command {
    let tls = c.nodes[idx].dir.join("tls");
    let mut cmd = Command::new("curl");
    cmd.arg("-s")
        .arg("--cert")
        .arg(tls.join("node.pem"))
        .arg("--key")
        .arg(tls.join("node.key"))
        .arg("--cacert")
        .arg(tls.join("ca.pem"))
        .arg("--resolve")
        .arg(format!("flotilla-node:4440:{}", c.nodes[0].ip()));
    cmd
}

/// POST `body` as node `idx`; returns (status, body).
fn post_as(c: &Cluster, idx: usize, path: &str, body: &serde_json::Value) -> (u16, String) {
    let mut child = node_curl(c, idx)
        .args(["-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ])
        .arg(format!("https://flotilla-node:4440{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl (apt-get install curl)");
    let text = serde_json::to_vec(body).unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let o = child.wait_with_output().unwrap();
    let out = stdout(&o);
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    (code.parse().unwrap_or(0), body.to_string())
}

/// An open NDJSON stream (curl) and its lines.
struct Stream {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Stream {
    fn open(mut cmd: Command, url: &str) -> Stream {
        let mut child = cmd
            .arg("-N")
            .arg(url)
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Stream { child, lines }
    }

    fn next_line(&self, within: Duration) -> String {
        self.lines.recv_timeout(within).expect("a stream message")
    }

    fn ended(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The current network map as the first manager serves it (admin, over its socket).
fn network_map(c: &Cluster, node_id: &str) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--unix-socket"])
        .arg(c.nodes[0].dir.join("api.sock"));
    let s = Stream::open(cmd, &format!("http://flotilla/v1/nodes/{node_id}/network"));
    serde_json::from_str(&s.next_line(LONG)).unwrap()
}

fn backends(map: &serde_json::Value, service: &str) -> Vec<String> {
    map["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| b["addr"].as_str().unwrap().to_string())
        .collect()
}

/// A-record answers for `name` from the DNS responder at `server` (port 53); `None` when it
/// does not answer or the name does not exist.
fn dns_a(server: Ipv4Addr, name: &str) -> Option<Vec<Ipv4Addr>> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    sock.send_to(&q, (server, 53)).ok()?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).ok()?;
    let r = &buf[..n];
    if r.len() < 12 || r[3] & 0x0f != 0 {
        return None;
    }
    let answers = u16::from_be_bytes([r[6], r[7]]);
    // Skip the question (the name as sent, then type and class).
    let mut i = q.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        // The answer's name: a compression pointer, or labels.
        if *r.get(i)? & 0xc0 == 0xc0 {
            i += 2;
        } else {
            while *r.get(i)? != 0 {
                i += 1 + *r.get(i)? as usize;
            }
            i += 1;
        }
        let rtype = u16::from_be_bytes([*r.get(i)?, *r.get(i + 1)?]);
        let len = u16::from_be_bytes([*r.get(i + 8)?, *r.get(i + 9)?]) as usize;
        i += 10;
        if rtype == 1 && len == 4 {
            out.push(Ipv4Addr::new(r[i], r[i + 1], r[i + 2], r[i + 3]));
        }
        i += len;
    }
    Some(out)
}

/// The gateway (first host) of a node's task subnet: where its DNS responder listens.
fn gateway(c: &Cluster, name: &str) -> Ipv4Addr {
    let nodes = c.node_ls().unwrap();
    let n = nodes.iter().find(|n| n["spec"]["name"] == name).unwrap();
    let subnet = n["network"]["subnet"].as_str().unwrap();
    let net: Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    Ipv4Addr::from(u32::from(net) + 1)
}

fn task_of(c: &Cluster, service: &str, id: &str) -> serde_json::Value {
    c.tasks(service)
        .into_iter()
        .find(|t| t["id"] == id)
        .unwrap()
}

/// A cluster of a manager and a worker, with one task of `victim` running on the worker;
/// returns the cluster, the worker's node id and the task as `service ps` shows it.
fn cluster_with_worker_task(net: u8) -> (Cluster, String, serde_json::Value) {
    let mut c = Cluster::init(net, &[]);
    c.join("w1", "worker");
    c.import("busy:1", "sh");
    let wid = c.node_id("w1");
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "victim",
        "--constraint",
        &format!("node.id=={wid}"),
        "--detach",
        "busy:1",
        "sleep",
        "3600",
    ]);
    assert!(o.status.success(), "create: {}", stderr(&o));
    let task = wait_for("victim running with an address", LONG, || {
        c.tasks("victim")
            .into_iter()
            .find(|t| t["status"]["state"] == "running" && t["status"]["address"].is_string())
    });
    (c, wid, task)
}

/// Sends one status report for `task` as the worker (node 1), its status changed by `edit`;
/// returns the answer's body (asserting 200).
fn report_as_worker(
    c: &Cluster,
    wid: &str,
    task: &serde_json::Value,
    edit: impl FnOnce(&mut serde_json::Value),
) -> serde_json::Value {
    let mut status = task["status"].clone();
    edit(&mut status);
    let body = serde_json::json!([{ "task_id": task["id"], "status": status }]);
    let (code, text) = post_as(c, 1, &format!("/v1/nodes/{wid}/tasks"), &body);
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Forged task addresses from the worker, for its own running task (loopback, the cloud
/// metadata service, an address of the manager's subnet), never become the task's address,
/// a backend in the network map, or an answer of `tasks.<svc>` on another node's DNS; the
/// rest of the report is kept.
#[test]
fn wt10_reported_task_addresses_stay_in_the_workers_subnet() {
    let (c, wid, task) = cluster_with_worker_task(170);
    let tid = task["id"].as_str().unwrap().to_string();
    let legit = task["status"]["address"].as_str().unwrap().to_string();
    let m1_gateway = gateway(&c, "m1");
    let foreign = Ipv4Addr::from(u32::from(m1_gateway) + 5).to_string();
    for (i, bad) in ["127.0.0.1", "169.254.169.254", foreign.as_str()]
        .into_iter()
        .enumerate()
    {
        report_as_worker(&c, &wid, &task, |s| {
            s["address"] = bad.into();
            s["timestamp"] = (s["timestamp"].as_u64().unwrap() + 1 + i as u64).into();
            s["message"] = format!("report {i}").into();
        });
        let stored = task_of(&c, "victim", &tid);
        assert_eq!(
            stored["status"]["address"], legit,
            "a reported {bad} became the task's address"
        );
        assert_eq!(stored["status"]["message"], format!("report {i}"));
        let map = network_map(&c, &c.node_id("m1"));
        assert_eq!(backends(&map, "victim"), vec![legit.clone()], "{map:#}");
    }
    // DNS on another node: once it has a map newer than the reports (a service created
    // after them resolves), `tasks.victim` still answers only the task's real address.
    let o = c.run(&[
        "service", "create", "--name", "marker", "--detach", "busy:1", "sleep", "3600",
    ]);
    assert!(o.status.success(), "create marker: {}", stderr(&o));
    wait_for("m1's DNS to know the marker service", LONG, || {
        dns_a(m1_gateway, "marker.flotilla").filter(|a| !a.is_empty())
    });
    let answers = dns_a(m1_gateway, "tasks.victim.flotilla").expect("tasks.victim resolves");
    let want: Vec<Ipv4Addr> = vec![legit.parse().unwrap()];
    assert_eq!(answers, want);
}

/// Free text from the worker: a terminal escape in a task's error is stored as sent but
/// printed escaped by `service ps`; an oversized error is cut to the cap (4 KiB).
#[test]
fn wt20_reported_text_is_capped_and_printed_escaped() {
    let (c, wid, task) = cluster_with_worker_task(172);
    let tid = task["id"].as_str().unwrap().to_string();
    report_as_worker(&c, &wid, &task, |s| s["err"] = PWNED.into());
    assert_eq!(task_of(&c, "victim", &tid)["status"]["err"], PWNED);
    let o = c.run(&["service", "ps", "victim"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(
        !table.contains('\u{1b}') && !table.contains('\u{7}'),
        "{table:?}"
    );
    assert!(table.contains("\\x1b]0;pwned\\x07"), "{table}");

    report_as_worker(&c, &wid, &task, |s| s["err"] = "x".repeat(100_000).into());
    let stored = task_of(&c, "victim", &tid);
    let err_len = stored["status"]["err"].as_str().unwrap().len();
    assert!(err_len <= 4096, "a {err_len}-byte error was stored");
}

/// Reports that differ from the stored status only in their timestamp are not applied (no
/// Raft write), however many the worker sends.
#[test]
fn wt30_timestamp_only_reports_are_not_writes() {
    let (c, wid, task) = cluster_with_worker_task(173);
    // The status as stored now (the agent may have reported since `task` was read).
    let task = task_of(&c, "victim", task["id"].as_str().unwrap());
    let before = applied_index(&c);
    for k in 1..=20u64 {
        let v = report_as_worker(&c, &wid, &task, |s| {
            s["timestamp"] = (s["timestamp"].as_u64().unwrap() + k).into();
        });
        assert_eq!(v["applied"], 0, "a timestamp-only report was written: {v}");
    }
    let writes = applied_index(&c) - before;
    assert!(
        writes < 10,
        "{writes} raft writes for 20 timestamp-only reports"
    );
}

fn applied_index(c: &Cluster) -> u64 {
    c.cluster_info().unwrap()["raft"]["applied_index"]
        .as_u64()
        .unwrap()
}

/// A cluster of a manager and a worker whose agent is stopped: what the tests do next is
/// the attacker alone, holding the worker's certificate (which the managers still accept).
/// Returns the worker's node id and its description as stored.
fn cluster_with_stopped_worker(net: u8) -> (Cluster, String, serde_json::Value) {
    let mut c = Cluster::init(net, &[]);
    c.join("w1", "worker");
    let wid = c.node_id("w1");
    let node = c
        .node_ls()
        .unwrap()
        .into_iter()
        .find(|n| n["id"] == wid.as_str())
        .unwrap();
    c.nodes[1].stop();
    (c, wid, node["description"].clone())
}

/// Heartbeats from the worker alternating its address as fast as it can send them give at
/// most the write budget (a burst of 50, then 20 a second) of Raft writes; the rest is
/// refused with 429.
#[test]
fn wt40_heartbeat_writes_are_rate_limited() {
    let (c, wid, description) = cluster_with_stopped_worker(171);
    let real_addr = c.nodes[1].addr.clone();
    let url = format!("https://flotilla-node:4440/v1/nodes/{wid}/heartbeat");
    // 600 heartbeats over one connection, the address alternating on every one.
    const N: usize = 600;
    let before = applied_index(&c);
    let start = Instant::now();
    let mut cmd = node_curl(&c, 1);
    for i in 0..N {
        if i > 0 {
            cmd.arg("--next");
            cmd.args(["-s", "--cert"])
                .arg(c.nodes[1].dir.join("tls/node.pem"))
                .arg("--key")
                .arg(c.nodes[1].dir.join("tls/node.key"))
                .arg("--cacert")
                .arg(c.nodes[1].dir.join("tls/ca.pem"))
                .arg("--resolve")
                .arg(format!("flotilla-node:4440:{}", c.nodes[0].ip()));
        }
        let addr = if i % 2 == 0 || i == N - 1 {
            real_addr.clone()
        } else {
            format!("127.0.171.99:{}", 5000 + i)
        };
        let body = serde_json::json!({ "addr": addr, "description": description });
        cmd.args(["-o", "/dev/null", "-w", "%{http_code}\n", "-X", "POST"])
            .args(["-H", "content-type: application/json", "-d"])
            .arg(body.to_string())
            .arg(&url);
    }
    let o = cmd.output().expect("curl");
    let elapsed = start.elapsed();
    let after = applied_index(&c);
    let codes: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(codes.len(), N, "{}", stderr(&o));
    let limited = codes.iter().filter(|c| *c == "429").count();
    let ok = codes.iter().filter(|c| *c == "200").count();
    assert_eq!(limited + ok, N, "{codes:?}");
    assert!(limited > 0, "no heartbeat was refused in {elapsed:?}");
    // Budget: 50 at once plus 20 a second, and a few writes of the cluster's own meanwhile.
    let budget = 50 + 20 * (elapsed.as_secs() + 1) + 20;
    let writes = after - before;
    assert!(
        writes <= budget,
        "{writes} raft writes for {N} heartbeats in {elapsed:?} (budget {budget})"
    );
}

/// Heartbeats with an address that is not IP:PORT (400) or an oversized description (413)
/// are refused, and the node keeps what it had.
#[test]
fn wt50_malformed_and_oversized_heartbeats_are_refused() {
    let (c, wid, description) = cluster_with_stopped_worker(174);
    let path = format!("/v1/nodes/{wid}/heartbeat");
    let real_addr = c.nodes[1].addr.clone();
    let bad_addr = serde_json::json!({ "addr": "flotilla-node:4440", "description": description });
    let (code, text) = post_as(&c, 1, &path, &bad_addr);
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("\"message\""), "{text}");
    let mut big = description.clone();
    big["engine"]["padding"] = "x".repeat(100_000).into();
    let big = serde_json::json!({ "addr": real_addr, "description": big });
    let (code, text) = post_as(&c, 1, &path, &big);
    assert_eq!(code, 413, "{text}");
    let node = c
        .node_ls()
        .unwrap()
        .into_iter()
        .find(|n| n["id"] == wid.as_str())
        .unwrap();
    assert_eq!(node["description"], description);
    assert_eq!(node["status"]["addr"], real_addr.as_str());
}

/// One assignment stream and one network stream per node: a newer one closes the older
/// (newest wins, so a reconnecting agent is never locked out by its own dead stream).
#[test]
fn wt60_a_second_stream_of_a_node_closes_the_first() {
    let (c, wid, _) = cluster_with_stopped_worker(175);
    for kind in ["assignments", "network"] {
        let url = format!("https://flotilla-node:4440/v1/nodes/{wid}/{kind}");
        let mut first = Stream::open(node_curl(&c, 1), &url);
        first.next_line(LONG);
        let second = Stream::open(node_curl(&c, 1), &url);
        second.next_line(LONG);
        wait_for(
            &format!("the first {kind} stream to be closed"),
            Duration::from_secs(20),
            || first.ended().then_some(()),
        );
        assert!(
            !matches!(
                second.lines.try_recv(),
                Err(std::sync::mpsc::TryRecvError::Disconnected)
            ),
            "the newer {kind} stream stays open"
        );
    }
}
