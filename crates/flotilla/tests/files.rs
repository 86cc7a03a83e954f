//! A node's files on disk, attacked by an unprivileged local user (uid 65534 through
//! `setpriv`): the Raft files (which hold the CA key and the join secrets), the keys, the node
//! record and a task's container record stay out of reach while the task runs; and the data
//! dirs a node must not use are refused at start, in plain words.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Runs `args` as uid/gid 65534 with no supplementary groups: an ordinary local user.
/// (Through `env`: setpriv keeps root's capabilities until its own `execve`.)
fn as_local_user(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "env",
        ])
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs")
}

fn refused(what: &str, file: &Path) {
    let o = as_local_user(&["cat", file.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("Permission denied"),
        "{what}: a local user read {} (status {:?}, {} bytes, stderr {err:?})",
        file.display(),
        o.status.code(),
        o.stdout.len()
    );
}

fn mode_and_group(p: &Path) -> (u32, u32) {
    let m = std::fs::metadata(p).unwrap();
    (m.mode() & 0o7777, m.gid())
}

#[test]
fn f10_a_local_user_reads_no_raft_file_key_or_container_record() {
    let c = Cluster::init(190, &[]);
    c.import("bb:1", "echo ready; sleep 1000");
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "secret",
        "--env",
        "DB_PASSWORD=hunter2",
        "bb:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let running = c.running("secret");
    assert_eq!(running.len(), 1, "the task runs with the private layout");
    let task = &running[0].0;

    let data = &c.nodes[0].dir;
    let raft = data.join("raft");
    let redb: Vec<PathBuf> = std::fs::read_dir(&raft)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "redb"))
        .collect();
    assert_eq!(redb.len(), 2, "raft-log.redb and state.redb: {redb:?}");
    // The CA key and join secrets are in there, sealed (encryption at rest): their field names
    // appear nowhere in the files.
    assert!(
        !redb.iter().any(|f| std::fs::read(f)
            .unwrap()
            .windows(10)
            .any(|w| w == b"ca_key_pem")),
        "the cluster object is sealed in the raft files"
    );
    for f in &redb {
        refused("a raft file (CA key, join secrets)", f);
        assert_eq!(mode_and_group(f).0, 0o600, "{}", f.display());
    }
    // The keys that open them.
    for k in ["kek", "dek"] {
        let f = raft.join("keys").join(k);
        refused("an encryption-at-rest key", &f);
        assert_eq!(mode_and_group(&f).0, 0o600, "{}", f.display());
    }
    assert!(
        !data.join("tls/ca.key").exists(),
        "the CA key lives only in the sealed raft files"
    );
    refused("the node key", &data.join("tls/node.key"));
    refused("the node record", &data.join("node.json"));
    refused("the admin key", &data.join("admin/key.pem"));
    let record = data.join("runtime/containers").join(task).join("meta.json");
    assert!(record.is_file(), "{} exists", record.display());
    refused("the task's container record (env vars)", &record);
    refused("the image index", &data.join("runtime/images/index.json"));
    let o = as_local_user(&["ls", data.to_str().unwrap()]);
    assert!(!o.status.success(), "a local user lists the data dir");

    // Docker's userns-remap layout: only the mapped root's group passes the data dir and the
    // state tmpfs on the way to each rootfs.
    assert_eq!(mode_and_group(data), (0o710, 100_000), "data dir");
    assert_eq!(mode_and_group(&data.join("run")), (0o710, 100_000), "run");
    for d in ["raft", "tls", "admin", "net"] {
        assert_eq!(mode_and_group(&data.join(d)).0, 0o700, "{d}");
    }
    assert_eq!(mode_and_group(&data.join("runtime")).0, 0o700, "runtime");
}

/// `flotilla node run --init` on `dir` (nothing else running there); returns its output.
fn start(dir: &Path, net: u8) -> Output {
    let mut child = Command::new(BIN)
        .args(["node", "run", "--init", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.{net}.1:4440")])
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A refused start exits at once; one that was accepted would run until stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_refused(o: &Output, words: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "the node started: {err}");
    for w in words {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
}

#[test]
fn f20_a_data_dir_another_user_made_or_can_write_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A local user made it first (e.g. in /tmp, before the node's first start).
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let o = start(&theirs, 191);
    assert_refused(&o, &["is owned by uid 65534", "remove it"]);
    assert!(
        std::fs::read_dir(&theirs).unwrap().next().is_none(),
        "nothing was written into it"
    );

    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).unwrap();
    let o = start(&open, 191);
    assert_refused(&o, &["writable by other users (mode 0777)", "chmod 0700"]);
    assert!(std::fs::read_dir(&open).unwrap().next().is_none());

    // A link another user owns, to a directory root owns.
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let o = start(&link, 191);
    assert_refused(&o, &["symbolic link owned by uid 65534"]);
}

#[test]
fn f30_a_data_dir_containers_cannot_reach_is_refused_in_plain_words() {
    let tmp = tempfile::tempdir().unwrap();
    let private = tmp.path().join("home");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, PermissionsExt::from_mode(0o700)).unwrap();
    let dir = private.join("flotilla");
    let o = start(&dir, 192);
    assert_refused(
        &o,
        &[
            &format!("is below {} (mode 0700", private.display()),
            "host uid 100000 under a user namespace",
            "could not reach their root filesystem",
            &format!("chmod o+x {}", private.display()),
        ],
    );
    assert!(!dir.join("node.json").exists(), "no node was made");
}

#[test]
fn f40_an_older_wide_data_dir_is_closed_at_restart() {
    let mut c = Cluster::init(193, &[]);
    let data = c.nodes[0].dir.clone();
    c.nodes[0].stop();
    // What an older version left: 0755 dirs, 0644 Raft files.
    for d in [data.clone(), data.join("raft"), data.join("tls")] {
        std::fs::set_permissions(&d, PermissionsExt::from_mode(0o755)).unwrap();
    }
    let state = data.join("raft/state.redb");
    std::fs::set_permissions(&state, PermissionsExt::from_mode(0o644)).unwrap();
    c.nodes[0].restart();
    let sock = c.nodes[0].socket();
    wait_for("the manager to answer", Duration::from_secs(30), || {
        cli(&sock, &["node", "ls"]).status.success().then_some(())
    });
    assert_eq!(mode_and_group(&data), (0o710, 100_000));
    assert_eq!(mode_and_group(&data.join("raft")).0, 0o700);
    assert_eq!(mode_and_group(&data.join("tls")).0, 0o700);
    assert_eq!(mode_and_group(&state).0, 0o600);
    refused("a raft file after the restart", &state);
}
