//! Authorization comes from the store, not only from the certificate: a demoted manager's
//! certificate (valid until it expires) no longer grants manager rights, and a removed node's
//! certificate is refused at once. Each check replays what a holder of the old key files
//! would send, with curl and the files copied before the change.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Copies a node's key, certificate and the CA certificate aside (what an attacker who kept
/// them would hold after the node's role changed).
fn keep_keys(node_dir: &Path, into: &Path) -> PathBuf {
    std::fs::create_dir_all(into).unwrap();
    for f in ["ca.pem", "node.pem", "node.key"] {
        std::fs::copy(node_dir.join("tls").join(f), into.join(f)).unwrap();
    }
    into.to_path_buf()
}

#[test]
fn t10_a_demoted_managers_certificate_no_longer_acts_as_a_manager() {
    let mut c = Cluster::init(120, &[]);
    let m2 = c.join("m2", "manager");
    let w = c.join("w1", "worker");
    let leader = c.nodes[0].addr.clone();
    let worker = c.nodes[w].addr.clone();
    let keys = keep_keys(&c.nodes[m2].dir, &c.tmp.path().join("m2-keys"));

    // While it is a manager, the certificate may forward requests for an admin, and read task
    // logs on a worker (404: no such task, past the authorization).
    let admin = ["x-flotilla-caller: admin"];
    let (code, body) = curl(&keys, &leader, "GET", "/v1/cluster/join-tokens", &admin);
    assert_eq!(code, 200, "{body}");
    let logs = "/v1/tasks/nosuchtask/logs";
    let (code, body) = curl(&keys, &worker, "GET", logs, &[]);
    assert_eq!(code, 404, "{body}");

    let o = c.run(&["node", "demote", "m2"]);
    assert!(o.status.success(), "demote: {}", stderr(&o));

    // The same certificate now speaks for a worker: no admin forwarding, no Raft.
    let (code, body) = curl(&keys, &leader, "GET", "/v1/cluster/join-tokens", &admin);
    assert_eq!(
        code, 403,
        "join tokens through a demoted manager's key: {body}"
    );
    assert!(!body.contains("FLT1-"), "{body}");
    let (code, body) = curl(&keys, &leader, "POST", "/internal/raft/vote", &[]);
    assert_eq!(code, 403, "raft rpc from a demoted manager's key: {body}");
    assert!(body.contains("current manager"), "{body}");
    // The worker has no store: it learns the managers from its network map.
    wait_for(
        "the worker to refuse the demoted manager's key",
        std::time::Duration::from_secs(30),
        || (curl(&keys, &worker, "GET", logs, &[]).0 == 403).then_some(()),
    );
}

#[test]
fn t20_a_removed_nodes_certificate_is_refused_at_once() {
    let mut c = Cluster::init(121, &[]);
    let w = c.join("w1", "worker");
    let id = c.node_id("w1");
    let manager = c.nodes[0].addr.clone();
    let keys = keep_keys(&c.nodes[w].dir, &c.tmp.path().join("w1-keys"));
    let assignments = format!("/v1/nodes/{id}/assignments");

    // A member's certificate reaches its agent endpoints and the registry.
    let (code, body) = curl(&keys, &manager, "GET", "/v2/", &[]);
    assert_eq!(code, 200, "{body}");
    // Ping tells a member who answers; an anonymous caller only that something does.
    let (code, body) = curl(&keys, &manager, "GET", "/v1/ping", &[]);
    assert!(code == 200 && body.contains(&c.node_id("m1")), "{body}");
    let anon = Command::new("curl")
        .args(["-sSk", "--max-time", "5"])
        .arg(format!("https://{manager}/v1/ping"))
        .output()
        .expect("curl");
    let anon = stdout(&anon);
    assert!(anon.contains("\"ok\":true"), "{anon}");
    assert!(
        !anon.contains(&c.node_id("m1")) && !anon.contains("term"),
        "{anon}"
    );

    c.nodes[w].stop();
    let o = c.run(&["node", "rm", "--force", "w1"]);
    assert!(o.status.success(), "node rm: {}", stderr(&o));

    for (method, path) in [
        ("GET", assignments.as_str()),
        ("GET", "/v2/"),
        ("POST", &format!("/v1/nodes/{id}/heartbeat")),
        ("POST", &format!("/v1/nodes/{id}/renew")),
    ] {
        let (code, body) = curl(&keys, &manager, method, path, &[]);
        assert_eq!(
            code, 403,
            "{method} {path} with a removed node's key: {body}"
        );
        assert!(body.contains("not a member of this cluster"), "{body}");
    }
}

/// A joining node sends its token's secret only to a server that proves it is a manager: a
/// worker of the same cluster (whose certificate the CA pin accepts) gets no request at all,
/// because the TLS handshake fails on its role first.
#[test]
fn t30_a_joining_node_does_not_send_its_secret_to_a_worker() {
    let mut c = Cluster::init(122, &[]);
    let w = c.join("w1", "worker");
    let worker = c.nodes[w].addr.clone();
    let token = c.token("manager");
    let dir = c.tmp.path().join("joiner");
    let out = Command::new(BIN)
        .args(["node", "run", "--data-dir"])
        .arg(&dir)
        .args(["--listen", "127.0.122.9:4440", "--name", "joiner"])
        .args(["--join", &worker])
        .env("FLOTILLA_JOIN_TOKEN", &token)
        .output()
        .expect("run the joiner");
    let err = stderr(&out);
    assert!(!out.status.success(), "joined through a worker: {err}");
    assert!(err.contains("which is a Worker, not a Manager"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
