//! Cluster core (issue 2) end to end: real node processes on 127.0.x.y, real Raft over mTLS,
//! real disks. Each test uses its own 127.0.<net>.0/24 so tests can run side by side.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(60);

fn three_managers_one_worker(net: u8, extra: &[&str]) -> Cluster {
    let mut c = Cluster::init(net, extra);
    c.join("m2", "manager");
    c.join("m3", "manager");
    c.join("w1", "worker");
    c
}

#[test]
fn t10_three_managers_and_a_worker_form_a_cluster() {
    let c = three_managers_one_worker(11, &[]);
    let nodes = c.node_ls().unwrap();
    assert_eq!(nodes.len(), 4, "{nodes:#?}");
    let leaders = nodes
        .iter()
        .filter(|n| n["manager_status"]["leader"] == true)
        .count();
    assert_eq!(leaders, 1, "exactly one leader: {nodes:#?}");
    let managers = nodes
        .iter()
        .filter(|n| n["spec"]["role"] == "manager")
        .count();
    assert_eq!(managers, 3);
    let worker = nodes.iter().find(|n| n["spec"]["name"] == "w1").unwrap();
    assert_eq!(worker["spec"]["role"], "worker");
    assert!(worker.get("manager_status").is_none());
    for n in &nodes {
        assert_eq!(n["status"]["state"], "ready", "{n:#?}");
        assert_eq!(n["id"].as_str().unwrap().len(), 25);
    }
    // Every manager answers the same (followers forward to the leader).
    for i in 0..3 {
        let o = cli(&c.nodes[i].socket(), &["node", "ls", "--format", "json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v.len(), 4);
    }
    // A worker's socket refuses cluster commands with a pointer to a manager.
    let o = cli(&c.nodes[3].socket(), &["node", "ls"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("worker"), "{}", stderr(&o));
    // Optimistic concurrency: an update carrying a stale version is refused with 409 and JSON.
    let w = nodes.iter().find(|n| n["spec"]["name"] == "w1").unwrap();
    let (id, version) = (w["id"].as_str().unwrap(), w["version"].as_u64().unwrap());
    let sock = c.nodes[0].dir.join("api.sock");
    let path = format!("/v1/nodes/{id}?version={version}");
    let (code, body) = unix_post(&sock, &path, r#"{"label_add":{"a":"1"}}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = unix_post(&sock, &path, r#"{"label_add":{"a":"2"}}"#);
    assert_eq!(code, 409, "{body}");
    let msg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        msg["message"]
            .as_str()
            .unwrap()
            .contains("changed concurrently"),
        "{body}"
    );
    let (code, body) = unix_post(&sock, &path, r#"{"label_add": 7}"#);
    assert_eq!(code, 400, "bad input is a 400: {body}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["message"].is_string(),
        "{body}"
    );
    // The change feed replays from a revision, filtered by type.
    let o = c.any_cli(&[
        "events",
        "--since",
        "0",
        "--filter",
        "type=node",
        "--limit",
        "4",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let evs: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(evs.len(), 4);
    assert!(evs.iter().all(|e| e["type"] == "node"), "{evs:#?}");
    assert!(evs
        .windows(2)
        .all(|w| w[0]["revision"].as_u64() <= w[1]["revision"].as_u64()));
    assert!(evs.iter().any(|e| e["action"] == "create"));
    let o = c.any_cli(&["events", "--filter", "type=bogus", "--limit", "1"]);
    assert!(
        !o.status.success() && stderr(&o).contains("unknown event type"),
        "{}",
        stderr(&o)
    );
    // The cluster info view.
    let info = c.cluster_info().unwrap();
    assert_eq!(info["managers"].as_array().unwrap().len(), 3);
    assert!(info["leader"]["addr"].is_string());
    assert!(info["raft"]["commit_index"].as_u64().unwrap() > 0);
}

fn label_count(c: &Cluster, node: &str) -> Option<serde_json::Value> {
    let o = c.any_cli(&["node", "inspect", node, "--format", "json"]);
    if !o.status.success() {
        return None;
    }
    let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).ok()?;
    Some(v[0]["spec"]["labels"].clone())
}

/// Writes a label through any live manager until one acknowledges it.
fn ack_write(c: &Cluster, node: &str, key: &str, value: &str, within: Duration) {
    let kv = format!("{key}={value}");
    wait_for(&format!("write {kv} acknowledged"), within, || {
        let o = c.any_cli(&["node", "update", node, "--label-add", &kv]);
        o.status.success().then_some(())
    });
}

#[test]
fn t20_leader_failover_rejoin_and_full_restart() {
    let mut c = three_managers_one_worker(12, &[]);
    ack_write(&c, "w1", "before", "1", LONG);
    let old = c.wait_leader(LONG);
    c.nodes[old].kill9();
    let t0 = Instant::now();
    ack_write(&c, "w1", "after", "1", LONG);
    eprintln!(
        "first write after leader kill accepted in {:?}",
        t0.elapsed()
    );
    let new = c.wait_leader(LONG);
    assert_ne!(new, old);
    // The old leader restarts from its data dir and rejoins as a follower.
    c.nodes[old].restart();
    let addr = c.nodes[old].addr.clone();
    wait_for("old leader reachable again", LONG, || {
        let info = c.cluster_info().ok()?;
        info["managers"]
            .as_array()?
            .iter()
            .any(|m| m["addr"] == addr.as_str() && m["reachability"] == "reachable")
            .then_some(())
    });
    // It serves the state written while it was down.
    wait_for("old leader has caught up", LONG, || {
        let o = cli(
            &c.nodes[old].socket(),
            &["node", "inspect", "w1", "--format", "json"],
        );
        (o.status.success() && stdout(&o).contains("\"after\"")).then_some(())
    });
    // Restart all three managers: the state is intact.
    for i in 0..3 {
        c.nodes[i].stop();
    }
    for i in 0..3 {
        c.nodes[i].restart();
    }
    c.wait_leader(LONG);
    let labels = wait_for("labels after full restart", LONG, || label_count(&c, "w1"));
    assert_eq!(labels["before"], "1");
    assert_eq!(labels["after"], "1");
    assert_eq!(c.node_ls().unwrap().len(), 4);
}

#[test]
fn t30_acknowledged_writes_survive_leader_kills() {
    let mut c = three_managers_one_worker(13, &[]);
    let mut acked = Vec::new();
    for i in 0..500 {
        if i > 0 && i % 125 == 0 {
            let leader = c.wait_leader(LONG);
            c.nodes[leader].kill9();
            // Writes keep going while it is down; it comes back a little later.
            for j in 0..10 {
                let key = format!("k{i}-{j}");
                ack_write(&c, "w1", &key, "v", LONG);
                acked.push(key);
            }
            c.nodes[leader].restart();
        }
        let key = format!("k{i}");
        ack_write(&c, "w1", &key, "v", LONG);
        acked.push(key);
    }
    c.wait_leader(LONG);
    let labels = wait_for("final labels", LONG, || label_count(&c, "w1"));
    let missing: Vec<&String> = acked.iter().filter(|k| labels[k.as_str()] != "v").collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    assert_eq!(acked.len(), 530);
}

#[test]
fn t40_tokens_certificates_and_rotation() {
    let mut c = Cluster::init(14, &["--cert-lifetime", "12s"]);
    let good = c.token("worker");
    let addr = c.nodes[0].addr.clone();
    let before = c.node_ls().unwrap().len();

    let try_join = |c: &Cluster, name: &str, token: &str| -> String {
        let dir = c.tmp.path().join(name);
        let o = std::process::Command::new(BIN)
            .args(["node", "run", "--data-dir"])
            .arg(&dir)
            .args([
                "--listen",
                "127.0.14.9:4440",
                "--name",
                name,
                "--join",
                &addr,
                "--token",
                token,
            ])
            .output()
            .unwrap();
        assert!(!o.status.success(), "join with a bad token must fail");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let run = dir.join("run").display().to_string();
        assert!(
            !mounts
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(run.as_str())),
            "a refused join leaves its state tmpfs mounted"
        );
        stderr(&o)
    };
    // Malformed.
    let e = try_join(&c, "bad1", "FLT1-nonsense");
    assert!(e.contains("malformed join token"), "{e}");
    // Right CA, wrong secret.
    let wrong_secret = format!("{}-{}", &good[..good.rfind('-').unwrap()], "0".repeat(32));
    let e = try_join(&c, "bad2", &wrong_secret);
    assert!(e.contains("invalid join token"), "{e}");
    // A token pinning another CA.
    let other_ca = format!(
        "FLT1-{}-{}",
        "a".repeat(64),
        &good[good.rfind('-').unwrap() + 1..]
    );
    let e = try_join(&c, "bad3", &other_ca);
    assert!(e.contains("CA fingerprint mismatch"), "{e}");
    // A rotated token stops working; the new one works.
    let o = c.any_cli(&["cluster", "join-token", "worker", "--rotate", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rotated = stdout(&o).trim().to_string();
    assert_ne!(rotated, good);
    let e = try_join(&c, "bad4", &good);
    assert!(e.contains("invalid join token"), "{e}");
    assert_eq!(
        c.node_ls().unwrap().len(),
        before,
        "refused joins changed the cluster"
    );
    c.join("w1", "worker");

    // Remote API: with the admin bundle it works; without a client certificate it is refused.
    let https = format!("https://{addr}");
    let o = cli_tls(&https, &c.admin_dir(), &["node", "ls", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let no_cert = c.tmp.path().join("nocert");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(c.admin_dir().join("ca.pem"), no_cert.join("ca.pem")).unwrap();
    // A self-made certificate from another CA.
    let other = Cluster::init(15, &[]);
    std::fs::copy(other.admin_dir().join("cert.pem"), no_cert.join("cert.pem")).unwrap();
    std::fs::copy(other.admin_dir().join("key.pem"), no_cert.join("key.pem")).unwrap();
    let o = cli_tls(&https, &no_cert, &["node", "ls"]);
    assert!(
        !o.status.success(),
        "a foreign client certificate must be refused"
    );
    let raw = raw_https_without_cert(&addr, &c.admin_dir().join("ca.pem"));
    assert!(
        raw.contains("401") && raw.contains("client certificate is required"),
        "{raw}"
    );

    // Certificates rotate: 12 s lifetime renews after 8 s, without restarts.
    let cert_path = c.nodes[1].dir.join("tls/node.pem");
    let first = std::fs::read(&cert_path).unwrap();
    let first_read = Instant::now();
    wait_for(
        "worker certificate renewed",
        Duration::from_secs(40),
        || (std::fs::read(&cert_path).ok()? != first).then_some(()),
    );
    let mgr_cert = c.nodes[0].dir.join("tls/node.pem");
    let first_mgr = std::fs::read(&mgr_cert).unwrap();
    wait_for(
        "manager certificate renewed",
        Duration::from_secs(40),
        || (std::fs::read(&mgr_cert).ok()? != first_mgr).then_some(()),
    );
    // Past the first certificates' expiry (12 s) plus a heartbeat timeout, the nodes still talk
    // to each other (heartbeats over mTLS with the renewed certificates keep both ready).
    wait_for(
        "first certificates expired",
        Duration::from_secs(60),
        || (first_read.elapsed() > Duration::from_secs(16)).then_some(()),
    );
    let o = cli_tls(&https, &c.admin_dir(), &["node", "ls", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        nodes.iter().all(|n| n["status"]["state"] == "ready"),
        "{nodes:#?}"
    );
    assert!(c.nodes[1].is_running() && c.nodes[0].is_running());
    let log = std::fs::read_to_string(c.nodes[1].log()).unwrap();
    assert!(log.contains("node certificate renewed"), "{log}");
}

/// Speaks TLS (trusting the cluster CA) but offers no client certificate.
fn raw_https_without_cert(addr: &str, ca: &std::path::Path) -> String {
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import ssl, socket, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False
host, port = sys.argv[1].rsplit(':', 1)
s = ctx.wrap_socket(socket.create_connection((host, int(port))), server_hostname='flotilla-node')
s.sendall(b'GET /v1/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
out = b''
while True:
    d = s.recv(4096)
    if not d: break
    out += d
print(out.decode(errors='replace'))
"#,
        )
        .arg(addr)
        .arg(ca)
        .output()
        .unwrap();
    format!("{}{}", stdout(&o), stderr(&o))
}

#[test]
fn t50_quorum_loss_fails_fast_and_reads_are_stale() {
    let mut c = three_managers_one_worker(16, &[]);
    let leader = c.wait_leader(LONG);
    // Kill the two followers.
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for i in &survivors {
        c.nodes[*i].kill9();
    }
    let sock = c.nodes[leader].socket();
    let t0 = Instant::now();
    let o = cli(&sock, &["node", "update", "w1", "--label-add", "x=1"]);
    let took = t0.elapsed();
    assert!(!o.status.success(), "a write without quorum must fail");
    let err = stderr(&o);
    assert!(err.contains("quorum lost"), "{err}");
    assert!(err.contains("1 of 3 managers reachable"), "{err}");
    assert!(err.contains("--force-new-cluster"), "{err}");
    assert!(
        took < Duration::from_secs(5),
        "write failed only after {took:?}"
    );
    // Reads still answer, marked stale.
    let o = cli(&sock, &["node", "ls", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("stale"), "{}", stderr(&o));

    // Recovery: the surviving manager restarts as a new single-manager cluster with all state.
    c.nodes[leader].stop();
    let dir = c.nodes[leader].dir.clone();
    let addr = c.nodes[leader].addr.clone();
    let mut rec = std::process::Command::new(BIN)
        .args(["node", "run", "--data-dir"])
        .arg(&dir)
        .args(["--listen", &addr, "--force-new-cluster"])
        .stderr(std::fs::File::create(c.tmp.path().join("recover.log")).unwrap())
        .spawn()
        .unwrap();
    let o = wait_for("recovered manager accepts writes", LONG, || {
        let o = cli(
            &sock,
            &["node", "update", "w1", "--label-add", "recovered=yes"],
        );
        o.status.success().then_some(o)
    });
    drop(o);
    let o = cli(&sock, &["cluster", "info", "--format", "json"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["managers"].as_array().unwrap().len(), 1, "{info:#}");
    let o = cli(&sock, &["node", "ls", "--format", "json"]);
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(nodes.len(), 4, "all objects kept: {nodes:#?}");
    let _ = rec.kill();
    let _ = rec.wait();
}

#[test]
fn t60_promote_and_demote() {
    let mut c = three_managers_one_worker(17, &[]);
    let o = c.any_cli(&["node", "promote", "w1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let addr = c.nodes[3].addr.clone();
    wait_for("w1 is a raft voter", LONG, || {
        let info = c.cluster_info().ok()?;
        let m = info["managers"].as_array()?;
        (m.len() == 4
            && m.iter().any(|m| {
                m["addr"] == addr.as_str() && m["voter"] == true && m["reachability"] == "reachable"
            }))
        .then_some(())
    });
    // Its own socket now answers cluster commands (it is a manager).
    let o = cli(&c.nodes[3].socket(), &["node", "ls", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Demote it again (it is not the leader: the leader was elected among the first three).
    let o = c.any_cli(&["node", "demote", "w1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("three voters again", LONG, || {
        let info = c.cluster_info().ok()?;
        (info["managers"].as_array()?.len() == 3).then_some(())
    });
    wait_for("w1 runs as a worker", LONG, || {
        let o = cli(&c.nodes[3].socket(), &["node", "ls"]);
        (!o.status.success() && stderr(&o).contains("worker")).then_some(())
    });
    let nodes = c.node_ls().unwrap();
    let w1 = nodes.iter().find(|n| n["spec"]["name"] == "w1").unwrap();
    assert_eq!(w1["spec"]["role"], "worker");
    assert!(c.nodes[3].is_running());
    // The last manager cannot be demoted; the leader is refused with a hint.
    let leader = c.wait_leader(LONG);
    let o = c.any_cli(&["node", "demote", &c.nodes[leader].name.clone()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("leader"), "{}", stderr(&o));
}

/// POST over the node's unix socket; returns (status, body).
fn unix_post(sock: &std::path::Path, path: &str, body: &str) -> (u16, String) {
    let o = std::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args([
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ])
        .arg(format!("http://localhost{path}"))
        .output()
        .unwrap();
    let out = stdout(&o);
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// An agent's assignment stream gets its keep-alive every 5 s even while the store changes all
/// the time in ways that do not concern it; before, each such change pushed the keep-alive
/// back, and agents of a busy cluster dropped their "silent" streams and reconnected.
#[test]
fn t70_stream_keepalive_is_not_starved_by_unrelated_changes() {
    let c = Cluster::init(18, &[]);
    let id = c.node_id("m1");
    let sock = c.nodes[0].dir.join("api.sock");
    let mut curl = std::process::Command::new("curl")
        .args(["-sN", "--unix-socket"])
        .arg(&sock)
        .arg(format!("http://flotilla/v1/nodes/{id}/assignments"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl (apt-get install curl)");
    let out = curl.stdout.take().expect("stdout");
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines() {
            if l.is_err() {
                break;
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let count = || lines.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("the first assignment message", LONG, || {
        (count() >= 1).then_some(())
    });
    // Node label changes, back to back: store events the assignment stream ignores.
    let start = Instant::now();
    let mut i = 0;
    while count() < 2 && start.elapsed() < Duration::from_secs(20) {
        // The leader may write the node meanwhile (its address, right after start): the
        // change is then applied again by the server, not refused.
        let o = c.run(&["node", "update", "--label-add", &format!("tick={i}"), "m1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        i += 1;
    }
    let _ = curl.kill();
    let _ = curl.wait();
    assert!(
        count() >= 2,
        "no keep-alive within {:?} while {i} unrelated changes arrived",
        start.elapsed()
    );
    assert!(i >= 5, "the changes kept coming ({i} of them)");
}
