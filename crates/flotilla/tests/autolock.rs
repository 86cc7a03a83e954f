//! Autolock of the managers' encryption at rest (issue 19, point 4), end to end: real node
//! processes on 127.0.18x.y, real Raft, restarts by kill -9.
//!
//! - a10: one manager locks, serves nothing but ping and unlock after a restart, refuses
//!   wrong keys, unlocks over mTLS with the admin bundle and carries on with its state; then
//!   autolock off writes the key file back and a restart needs no key.
//! - a20: three locked managers restarted one at a time, each unlocked; the cluster keeps
//!   quorum (a write succeeds while each one is down or locked); a worker is not affected; a
//!   manager down during a key rotation opens once with the old key, then needs the new one.
//! - a30: a rotated unlock key: the old key no longer opens a restarted manager, the new one
//!   does.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(90);
const LOCKED: &str = "this manager is locked: run `flotilla cluster unlock`";

fn keys_dir(n: &NodeProc) -> PathBuf {
    n.dir.join("raft").join("keys")
}

/// `flotilla cluster unlock` against `host`, the key on standard input.
fn unlock(host: &str, tls: Option<&Path>, key: &str) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--host").arg(host);
    if let Some(dir) = tls {
        cmd.arg("--tls-dir").arg(dir);
    }
    let mut child = cmd
        .args(["cluster", "unlock"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flotilla cluster unlock");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{key}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A raw request over the node's local socket (an admin): (status, body).
fn curl_unix(n: &NodeProc, method: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-X", method])
        .arg("--unix-socket")
        .arg(n.dir.join("api.sock"))
        .args(["-H", "content-type: application/json"])
        .args(if method == "GET" {
            vec![]
        } else {
            vec!["--data", "{}"]
        })
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://flotilla{path}"))
        .output()
        .expect("curl");
    let text = stdout(&out);
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The unlock key a CLI output shows.
fn key_in(o: &Output) -> String {
    stdout(o)
        .split_whitespace()
        .find(|w| w.starts_with("FLTKEY-1-"))
        .unwrap_or_else(|| panic!("no unlock key in: {}{}", stdout(o), stderr(o)))
        .to_string()
}

/// Turns autolock on through the first manager; returns the key the CLI printed.
fn enable(c: &Cluster) -> String {
    let o = c.any_cli(&["cluster", "update", "--autolock", "true"]);
    assert!(o.status.success(), "autolock on: {}", stderr(&o));
    assert!(
        stdout(&o).contains("flotilla cluster unlock"),
        "{}",
        stdout(&o)
    );
    key_in(&o)
}

fn wait_kek(n: &NodeProc, present: bool) {
    let kek = keys_dir(n).join("kek");
    wait_for(
        &format!("{}: kek file present={present}", n.name),
        LONG,
        || (kek.exists() == present).then_some(()),
    );
}

/// Waits until the node (restarted) answers as locked.
fn wait_locked(n: &NodeProc) {
    let sock = n.socket();
    wait_for(&format!("{} locked", n.name), LONG, || {
        let o = cli(&sock, &["node", "ls"]);
        stderr(&o).contains(LOCKED).then_some(())
    });
}

#[test]
fn a10_one_manager_locks_refuses_wrong_keys_and_unlocks_with_its_state() {
    let mut c = Cluster::init(180, &[]);
    c.import("bb:1", "sleep 100000");
    let o = c.run(&["service", "create", "--name", "web", "bb:1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("web running", LONG, || {
        (c.running("web").len() == 1).then_some(())
    });

    let key = enable(&c);
    wait_kek(&c.nodes[0], false);
    assert!(keys_dir(&c.nodes[0]).join("dek").exists());
    let info = c.cluster_info().unwrap();
    assert_eq!(info["settings"]["autolock"], "on", "{info:#}");
    let o = c.run(&["cluster", "unlock-key", "-q"]);
    assert_eq!(stdout(&o).trim(), key);
    // Autolock on again: same key, not printed again.
    let o = c.run(&["cluster", "update", "--autolock", "true"]);
    assert!(o.status.success() && !stdout(&o).contains("FLTKEY-1-"));
    // An unlocked manager says so.
    let o = unlock(&c.nodes[0].socket(), None, &key);
    assert!(
        !o.status.success() && stderr(&o).contains("not locked"),
        "{}",
        stderr(&o)
    );

    c.nodes[0].restart();
    wait_locked(&c.nodes[0]);
    let n = &c.nodes[0];
    let (st, body) = curl_unix(n, "GET", "/v1/ping");
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"locked\":true"), "{body}");
    for (method, path) in [
        ("GET", "/v1/services"),
        ("GET", "/v1/nodes"),
        ("GET", "/v1/cluster"),
        ("GET", "/v1/cluster/unlock-key"),
        ("GET", "/v1/secrets"),
        ("GET", "/v1/images"),
        ("GET", "/v1/events"),
        ("POST", "/v1/services"),
        ("PUT", "/v1/cluster/settings"),
        ("GET", "/v2/"),
    ] {
        let (st, body) = curl_unix(n, method, path);
        assert_eq!(st, 503, "{method} {path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["message"].as_str().unwrap().starts_with(LOCKED),
            "{method} {path}: {body}"
        );
    }
    // Wrong and malformed keys: a clear error, still locked.
    let wrong = format!("FLTKEY-1-{}", "ab".repeat(32));
    let o = unlock(&n.socket(), None, &wrong);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not open"), "{}", stderr(&o));
    let o = unlock(&n.socket(), None, "garbage");
    assert!(stderr(&o).contains("not an unlock key"), "{}", stderr(&o));
    let o = unlock(&n.socket(), None, "");
    assert!(!o.status.success());
    assert!(stderr(&cli(&n.socket(), &["service", "ls"])).contains(LOCKED));

    // The right key, over mTLS with the admin bundle (TLS works while locked).
    let host = format!("https://{}", n.addr);
    let o = unlock(&host, Some(&c.admin_dir()), &key);
    assert!(o.status.success(), "unlock: {}", stderr(&o));
    assert!(stdout(&o).contains("unlocked"), "{}", stdout(&o));
    // Serving again, with its state.
    let o = c.run(&["service", "inspect", "web", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("web running after unlock", LONG, || {
        (c.running("web").len() == 1).then_some(())
    });
    assert!(!keys_dir(&c.nodes[0]).join("kek").exists());

    // Autolock off: the key file is back, and a restart needs no key.
    let o = c.run(&["cluster", "update", "--autolock", "false"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_kek(&c.nodes[0], true);
    let o = c.run(&["cluster", "unlock-key"]);
    assert!(!o.status.success() && stderr(&o).contains("autolock is off"));
    c.nodes[0].restart();
    let sock = c.nodes[0].socket();
    wait_for("serving without a key", LONG, || {
        cli(&sock, &["service", "ls"])
            .status
            .success()
            .then_some(())
    });
    let o = c.run(&["service", "rm", "web"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("web removed", LONG, || {
        c.tasks_all().is_empty().then_some(())
    });
}

fn label(c: &Cluster, i: usize, key: &str) -> Option<()> {
    let o = cli(
        &c.nodes[i].socket(),
        &["node", "inspect", "m1", "--format", "json"],
    );
    (o.status.success() && stdout(&o).contains(&format!("\"{key}\""))).then_some(())
}

/// A manager's own Raft progress (`/v1/ping`, never forwarded): (applied, committed).
fn raft_progress(n: &NodeProc) -> Option<(u64, u64)> {
    let (st, body) = curl_unix(n, "GET", "/v1/ping");
    if st != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((
        v["raft"]["applied_index"].as_u64()?,
        v["raft"]["commit_index"].as_u64()?,
    ))
}

#[test]
fn a20_rolling_restart_of_locked_managers_keeps_quorum() {
    let mut c = Cluster::init(181, &[]);
    c.join("m2", "manager");
    c.join("m3", "manager");
    c.join("w1", "worker");
    let key = enable(&c);
    for i in 0..3 {
        wait_kek(&c.nodes[i], false);
    }
    // A worker has no store: autolock does not touch it, and it restarts without a key.
    assert!(!c.nodes[3].dir.join("raft").exists());
    c.nodes[3].restart();
    wait_for("w1 ready again", LONG, || {
        let nodes = c.node_ls().ok()?;
        nodes
            .iter()
            .any(|n| n["spec"]["name"] == "w1" && n["status"]["state"] == "ready")
            .then_some(())
    });
    let body = wait_for("w1 answers", LONG, || {
        let (st, body) = curl_unix(&c.nodes[3], "GET", "/v1/ping");
        (st == 200).then_some(body)
    });
    assert!(!body.contains("locked"), "{body}");
    for i in 0..3 {
        c.nodes[i].restart();
        wait_locked(&c.nodes[i]);
        // The other two still form a quorum: a write succeeds while this one is locked.
        let kv = format!("while{i}=locked");
        wait_for(&format!("write with m{} locked", i + 1), LONG, || {
            let o = c.any_cli(&["node", "update", "m1", "--label-add", &kv]);
            o.status.success().then_some(())
        });
        let committed = (0..3)
            .filter(|&j| j != i)
            .filter_map(|j| raft_progress(&c.nodes[j]))
            .map(|(_, commit)| commit)
            .max()
            .unwrap();
        let o = unlock(&c.nodes[i].socket(), None, &key);
        assert!(o.status.success(), "unlock m{}: {}", i + 1, stderr(&o));
        // It rejoins Raft and applies, itself, what was written while it was locked (before
        // the next manager goes down, or two of three would be).
        wait_for(&format!("m{} caught up", i + 1), LONG, || {
            let (applied, _) = raft_progress(&c.nodes[i])?;
            (applied >= committed).then_some(())
        });
        label(&c, i, &format!("while{i}")).unwrap();
        assert!(!keys_dir(&c.nodes[i]).join("kek").exists());
    }
    c.wait_leader(LONG);
    let o = c.any_cli(&["node", "update", "m1", "--label-add", "after=all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..3 {
        wait_for("every manager has the last write", LONG, || {
            label(&c, i, "after")
        });
    }

    // A manager that is down while the key is rotated opens once with the old key, then
    // re-wraps with the new one.
    c.nodes[2].stop();
    let o = c.any_cli(&["cluster", "unlock-key", "--rotate", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let new = stdout(&o).trim().to_string();
    assert_ne!(new, key);
    c.nodes[2].spawn(&[]);
    wait_locked(&c.nodes[2]);
    let dek = keys_dir(&c.nodes[2]).join("dek");
    let before = std::fs::read(&dek).unwrap();
    let o = unlock(&c.nodes[2].socket(), None, &new);
    assert!(stderr(&o).contains("does not open"), "{}", stderr(&o));
    let o = unlock(&c.nodes[2].socket(), None, &key);
    assert!(o.status.success(), "old key once: {}", stderr(&o));
    wait_for("m3 re-wrapped with the new key", LONG, || {
        (std::fs::read(&dek).ok()? != before).then_some(())
    });
    c.nodes[2].restart();
    wait_locked(&c.nodes[2]);
    let o = unlock(&c.nodes[2].socket(), None, &key);
    assert!(stderr(&o).contains("does not open"), "{}", stderr(&o));
    let o = unlock(&c.nodes[2].socket(), None, &new);
    assert!(o.status.success(), "new key: {}", stderr(&o));
}

#[test]
fn a30_a_rotated_unlock_key_replaces_the_old_one() {
    let mut c = Cluster::init(182, &[]);
    let old = enable(&c);
    wait_kek(&c.nodes[0], false);
    let dek = keys_dir(&c.nodes[0]).join("dek");
    let before = std::fs::read(&dek).unwrap();
    let o = c.run(&["cluster", "unlock-key", "--rotate"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let new = key_in(&o);
    assert_ne!(new, old);
    // Re-wrapped with the new key, without a restart.
    wait_for("dek re-wrapped", LONG, || {
        (std::fs::read(&dek).ok()? != before).then_some(())
    });
    let o = c.run(&["cluster", "unlock-key", "-q"]);
    assert_eq!(stdout(&o).trim(), new);

    c.nodes[0].restart();
    wait_locked(&c.nodes[0]);
    let sock = c.nodes[0].socket();
    let o = unlock(&sock, None, &old);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not open"), "{}", stderr(&o));
    assert!(stderr(&cli(&sock, &["node", "ls"])).contains(LOCKED));
    let o = unlock(&sock, None, &new);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("serving after unlock", LONG, || {
        cli(&sock, &["node", "ls"]).status.success().then_some(())
    });
}
