//! Volumes, binds, tmpfs, secrets and configs through real clusters: a busybox "database"
//! whose lines survive updates, forced restarts, an agent restart and its node going down
//! (the task waits for the node instead of starting elsewhere on an empty volume); one volume
//! per replica; the refusals; tmpfs limits; secrets delivered as files only to the node that
//! runs the task, rotated by `service update`, and found nowhere on disk afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}{}", stdout(o), stderr(o));
    stdout(o)
}

/// The lines of `/log` in volume `name`, read back through `volume export`.
fn volume_log(c: &Cluster, name: &str) -> Vec<String> {
    let file = c.tmp.path().join(format!("{name}.tar"));
    ok(
        &c.run(&["volume", "export", name, "-o", file.to_str().unwrap()]),
        "volume export",
    );
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(&file)
        .args(["--wildcards", "*log"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", stderr(&out));
    stdout(&out).lines().map(str::to_string).collect()
}

fn volumes(c: &Cluster) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(
        &c.run(&["volume", "ls", "--format", "json"]),
        "volume ls",
    ))
    .unwrap()
}

/// The one task of `svc` that should run, once it runs: (task id, node id).
fn running_one(c: &Cluster, svc: &str) -> (String, String) {
    wait_for(&format!("{svc} running"), Duration::from_secs(60), || {
        let r = c.running(svc);
        (r.len() == 1).then(|| r[0].clone())
    })
}

#[test]
fn s10_volume_data_survives_updates_restarts_and_a_down_node() {
    let mut c = Cluster::init(63, &["--heartbeat-timeout", "8s"]);
    c.join("w1", "worker");
    c.import("db", "sleep 1000");
    let img = "db".to_string();
    let w1 = c.node_id("w1");
    // The volume lives on w1 (else the first task's node would be its home).
    ok(
        &c.run(&[
            "volume", "create", "data", "--node", "w1", "--label", "app=db",
        ]),
        "volume create",
    );
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "db",
            "--mount",
            "type=volume,src=data,dst=/data",
            "--stop-grace-period",
            "1s",
            &img,
            "sh",
            "-c",
            "echo start >> /data/log; exec sleep 1000",
        ]),
        "service create",
    );
    let (t1, node) = running_one(&c, "db");
    assert_eq!(node, w1, "the task runs where its volume lives");
    assert_eq!(volume_log(&c, "data"), vec!["start"]);

    // An update and a forced restart replace the task; the data stays.
    ok(
        &c.run(&["service", "update", "--env-add", "A=1", "db"]),
        "update",
    );
    let (t2, node) = running_one(&c, "db");
    assert_ne!(t1, t2);
    assert_eq!(node, w1);
    ok(&c.run(&["service", "update", "--force", "db"]), "force");
    let (t3, _) = wait_for("a third task", Duration::from_secs(60), || {
        let r = running_one(&c, "db");
        (r.0 != t2).then_some(r)
    });
    assert_eq!(volume_log(&c, "data"), vec!["start"; 3]);

    // The agent restarts: the container is re-adopted, nothing starts again.
    c.nodes[1].restart();
    wait_for("w1 ready again", Duration::from_secs(60), || {
        let n = c.node_ls().ok()?;
        n.iter()
            .any(|n| n["id"] == w1.as_str() && n["status"]["state"] == "ready")
            .then_some(())
    });
    assert_eq!(running_one(&c, "db").0, t3);
    assert_eq!(volume_log(&c, "data"), vec!["start"; 3]);

    // w1 goes down: the replacement waits for it, never starting elsewhere.
    c.nodes[1].kill9();
    let why = wait_for("the replacement to wait", Duration::from_secs(60), || {
        c.tasks("db").into_iter().find_map(|t| {
            let m = t["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (t["status"]["state"] == "pending" && m.contains("volume data lives on node"))
                .then_some(m)
        })
    });
    assert!(why.contains("down"), "{why}");
    assert!(
        c.tasks("db")
            .iter()
            .all(|t| t["status"]["state"] != "running" || t["node_id"] == w1.as_str()),
        "no task runs away from the volume"
    );
    // Back up: the old container is stopped first, then the new task mounts the volume.
    c.nodes[1].spawn(&[]);
    let (t4, node) = wait_for("the task back on w1", Duration::from_secs(90), || {
        let r = c.running("db");
        (r.len() == 1 && r[0].0 != t3).then(|| r[0].clone())
    });
    assert_eq!(node, w1);
    assert_ne!(t4, t3);
    assert_eq!(volume_log(&c, "data"), vec!["start"; 4]);

    // The listing: node, labels, size and user; rm refused while used, then removes the data.
    let v = volumes(&c);
    let data = v.iter().find(|v| v["name"] == "data").unwrap();
    assert_eq!(data["node_id"], w1.as_str());
    assert_eq!(data["labels"]["app"], "db");
    assert!(data["size_bytes"].as_u64().unwrap_or(0) > 0, "{data}");
    assert_eq!(data["used_by"][0], "db");
    let o = c.run(&["volume", "rm", "data"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("in use by db"), "{}", stderr(&o));
    ok(&c.run(&["service", "rm", "db"]), "service rm");
    wait_for(
        "volume rm once the task stopped",
        Duration::from_secs(60),
        || {
            c.run(&["volume", "rm", "data"])
                .status
                .success()
                .then_some(())
        },
    );
    assert!(
        !c.nodes[1].dir.join("volumes").join("data").exists(),
        "the data is gone from w1"
    );
}

#[test]
fn s20_replicas_get_their_own_volumes_and_bad_mounts_are_refused() {
    let c = Cluster::init(64, &[]);
    c.import("vol", "sleep 1000");
    let img = "vol".to_string();
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "2",
            "--mount",
            "src=web-{{.Task.Slot}},dst=/data",
            "--mount",
            "type=tmpfs,dst=/scratch,tmpfs-size=1m",
            &img,
            "sh",
            "-c",
            "echo slot >> /data/log; busybox dd if=/dev/zero of=/scratch/f bs=1k count=2048 2>&1; echo dd-rc=$?; exec sleep 1000",
        ]),
        "create",
    );
    let names: Vec<String> = volumes(&c)
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["web-1", "web-2"]);
    assert_eq!(volume_log(&c, "web-1"), vec!["slot"]);
    // Backup and restore: export web-1, import the archive into a new volume.
    let m1 = c.node_id("m1");
    ok(
        &c.run(&["volume", "create", "copy", "--node", &m1]),
        "create copy",
    );
    let tar = c.tmp.path().join("web-1.tar");
    ok(
        &c.run(&["volume", "import", "copy", tar.to_str().unwrap()]),
        "import",
    );
    assert_eq!(volume_log(&c, "copy"), vec!["slot"]);
    let o = c.run(&["volume", "import", "copy", tar.to_str().unwrap()]);
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    // A hostile archive writes nothing outside the volume.
    ok(
        &c.run(&["volume", "create", "evil", "--node", &m1]),
        "create evil",
    );
    let evil = c.tmp.path().join("evil.tar");
    std::fs::write(&evil, tar_with_entry("../../../escaped", b"x")).unwrap();
    let o = c.run(&["volume", "import", "evil", evil.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad volume archive"), "{}", stderr(&o));
    assert!(!c.nodes[0].dir.join("escaped").exists());
    assert!(!c.nodes[0].dir.join("volumes").join("escaped").exists());
    // The tmpfs holds 1 MiB: dd fails with ENOSPC.
    let logs = wait_for("dd's output", Duration::from_secs(30), || {
        let l = stdout(&c.run(&["service", "logs", "web"]));
        (l.matches("dd-rc=1").count() == 2).then_some(l)
    });
    assert!(logs.contains("No space left on device"), "{logs}");

    for (args, says) in [
        (
            vec!["--mount", "type=bind,src=/etc,dst=/x"],
            "not under a host path the cluster allows",
        ),
        (
            vec!["--replicas", "2", "--mount", "src=one,dst=/d"],
            "every replica would mount the same volume",
        ),
        (
            vec!["--update-order", "start-first", "--mount", "src=one,dst=/d"],
            "start-first",
        ),
        (vec!["--mount", "src=../x,dst=/d"], "volume source"),
        (vec!["--mount", "type=tmpfs,dst=/d,tmpfs-size=x"], "64m"),
        (vec!["--secret", "nope"], "secret \"nope\" not found"),
    ] {
        let mut a = vec!["service", "create", "--name", "bad", "--detach"];
        a.extend(args.iter());
        a.push(&img);
        let o = c.run(&a);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    // Hostile API bodies get a 400 that says why, and store nothing.
    let sock = c.nodes[0].socket();
    let big = "A".repeat(700 * 1024);
    for (body, says) in [
        (r#"{"name":"s1","data":"!!!"}"#.to_string(), "base64"),
        (
            r#"{"name":"../x","data":"eA=="}"#.to_string(),
            "secret name",
        ),
        (r#"{"name":"s1","data":""}"#.to_string(), "cannot be empty"),
        (format!(r#"{{"name":"s1","data":"{big}"}}"#), "the most is"),
        (r#"{"name":"s1"}"#.to_string(), "data"),
    ] {
        let (code, text) = unix_post(&sock, "/v1/secrets", &body);
        assert_eq!(code, 400, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["message"].as_str().unwrap().contains(says), "{text}");
    }
    for (body, says) in [
        (r#"{"name":"a/b"}"#, "volume name"),
        (r#"{"name":"v1","node":"nowhere"}"#, "not found"),
    ] {
        let (code, text) = unix_post(&sock, "/v1/volumes", body);
        assert!(code == 400 || code == 404, "{code} {text}");
        assert!(text.contains(says), "{text}");
    }
    let o = c.run(&["secret", "ls", "--format", "json"]);
    assert_eq!(ok(&o, "secret ls").trim(), "[]");
    // An allowed bind works, read-only.
    let host = c.tmp.path().join("shared");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("hello"), "from the host\n").unwrap();
    ok(
        &c.run(&["cluster", "update", "--bind-allow", host.to_str().unwrap()]),
        "bind-allow",
    );
    let spec = format!("type=bind,src={},dst=/host,readonly", host.display());
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "binder",
            "--mount",
            &spec,
            &img,
            "sh",
            "-c",
            "cat /host/hello; touch /host/x 2>&1 || echo ro-ok; exec sleep 1000",
        ]),
        "bind service",
    );
    let logs = wait_for("bind output", Duration::from_secs(30), || {
        let l = stdout(&c.run(&["service", "logs", "binder"]));
        l.contains("ro-ok").then_some(l)
    });
    assert!(logs.contains("from the host"), "{logs}");
    assert!(!host.join("x").exists());
    // A symlink inside the allowed directory does not lead out of it.
    std::os::unix::fs::symlink("/etc", host.join("escape")).unwrap();
    let spec = format!("type=bind,src={},dst=/host", host.join("escape").display());
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "escaper",
        "--mount",
        &spec,
        "--timeout",
        "20s",
        &img,
    ]);
    assert!(!o.status.success(), "a bind through a symlink was accepted");
    assert!(
        stderr(&o).contains("leads through a symlink"),
        "{}",
        stderr(&o)
    );
}

/// Every file under `dir` (not following symlinks, skipping sockets and the like) that holds
/// `needle`.
fn files_holding(dir: &Path, needle: &[u8], out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            files_holding(&p, needle, out);
        } else if m.is_file() {
            if let Ok(b) = std::fs::read(&p) {
                if b.windows(needle.len()).any(|w| w == needle) {
                    out.push(p);
                }
            }
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin.take().unwrap().write_all(data)?;
            ch.wait_with_output()
        })
        .unwrap();
    stdout(&out).split_whitespace().next().unwrap().to_string()
}

#[test]
fn s30_secrets_reach_only_their_task_rotate_and_leave_no_trace() {
    let mut c = Cluster::init(65, &[]);
    c.join("w1", "worker");
    c.join("w2", "worker");
    c.import("app", "sleep 1000");
    let img = "app".to_string();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("pw-{:x}-{}", nanos, std::process::id());
    // Three unrelated values: the config is printed by the task (and so sits in its log until
    // the log is swept); the secrets never are, only their digests.
    let secret2 = format!("pw2-{:x}-{}", nanos.wrapping_mul(31), std::process::id());
    let conf = format!("conf-{:x}", nanos.wrapping_mul(17));
    let outside = tempfile::tempdir().unwrap();
    let f1 = outside.path().join("s1");
    let f2 = outside.path().join("s2");
    let f3 = outside.path().join("conf");
    std::fs::write(&f3, &conf).unwrap();
    std::fs::write(&f1, &secret).unwrap();
    std::fs::write(&f2, &secret2).unwrap();
    ok(
        &c.run(&["secret", "create", "db_pass", f1.to_str().unwrap()]),
        "secret create",
    );
    ok(
        &c.run(&["config", "create", "app_conf", f3.to_str().unwrap()]),
        "config create",
    );
    // Inspect shows the digest, never the data; a config shows its data.
    let s: serde_json::Value =
        serde_json::from_str(&ok(&c.run(&["secret", "inspect", "db_pass"]), "inspect")).unwrap();
    assert_eq!(
        s["digest"],
        format!("sha256:{}", sha256_hex(secret.as_bytes())).as_str()
    );
    assert!(s.get("data").is_none(), "{s}");
    let cfg: serde_json::Value =
        serde_json::from_str(&ok(&c.run(&["config", "inspect", "app_conf"]), "inspect")).unwrap();
    assert!(cfg["data"].as_str().is_some_and(|d| !d.is_empty()));
    // The same name twice is refused: secrets are immutable.
    let o = c.run(&["secret", "create", "db_pass", f2.to_str().unwrap()]);
    assert!(stderr(&o).contains("immutable"), "{}", stderr(&o));

    let script = "busybox sha256sum /run/secrets/db_pass; busybox stat -c 'owner=%u:%g mode=%a' /run/secrets/db_pass /etc/app.conf; cat /etc/app.conf; echo; exec sleep 1000";
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "app",
            "--constraint",
            "node.hostname!=never",
            "--constraint",
            "node.role==worker",
            "--secret",
            "db_pass",
            "--config",
            "src=app_conf,target=/etc/app.conf,uid=1000,gid=1000,mode=0440",
            "--stop-grace-period",
            "1s",
            &img,
            "sh",
            "-c",
            script,
        ]),
        "create",
    );
    let logs = wait_for("the digest in the logs", Duration::from_secs(60), || {
        let l = stdout(&c.run(&["service", "logs", "app"]));
        l.contains(&conf).then_some(l)
    });
    assert!(logs.contains(&sha256_hex(secret.as_bytes())), "{logs}");
    assert!(logs.contains("owner=0:0 mode=444"), "{logs}");
    assert!(logs.contains("owner=1000:1000 mode=440"), "{logs}");
    // service inspect shows references only.
    let insp = ok(&c.run(&["service", "inspect", "app"]), "inspect");
    assert!(!insp.contains(&secret), "{insp}");

    // A worker's certificate reaches only its own tasks' secrets.
    let (task, node) = running_one(&c, "app");
    let (mine, other) = if node == c.node_id("w1") {
        (1, 2)
    } else {
        (2, 1)
    };
    let other_id = c.node_id(&c.nodes[other].name.clone());
    let node_id = node.clone();
    let path_other = format!("/v1/nodes/{other_id}/tasks/{task}/files");
    let path_mine_as_other = format!("/v1/nodes/{node_id}/tasks/{task}/files");
    let keys = c.nodes[other].dir.join("tls");
    let m1 = c.nodes[0].addr.clone();
    let (code, body) = curl(&keys, &m1, "GET", &path_other, &[]);
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains(&secret));
    let (code, body) = curl(&keys, &m1, "GET", &path_mine_as_other, &[]);
    assert_eq!(code, 403, "{body}");
    // The other worker has no copy.
    let mut hits = Vec::new();
    files_holding(&c.nodes[other].dir, secret.as_bytes(), &mut hits);
    assert!(hits.is_empty(), "{hits:?}");
    let _ = mine;

    // Rotation: a new secret at the same target, through a rolling update.
    ok(
        &c.run(&["secret", "create", "db_pass2", f2.to_str().unwrap()]),
        "secret create 2",
    );
    ok(
        &c.run(&[
            "service",
            "update",
            "--secret-rm",
            "db_pass",
            "--secret-add",
            "src=db_pass2,target=db_pass",
            "app",
        ]),
        "rotate",
    );
    wait_for("the new digest", Duration::from_secs(60), || {
        let l = stdout(&c.run(&["service", "logs", "app"]));
        l.contains(&sha256_hex(secret2.as_bytes())).then_some(())
    });
    let o = c.run(&["secret", "rm", "db_pass2"]);
    assert!(stderr(&o).contains("in use by app"), "{}", stderr(&o));
    ok(&c.run(&["secret", "rm", "db_pass"]), "rm the old secret");

    // Remove everything; the value is then nowhere under any node's directory (Raft files and
    // snapshots included) nor in the daemons' environment.
    ok(&c.run(&["service", "rm", "app"]), "service rm");
    wait_for("the files tmpfs unmounted", Duration::from_secs(30), || {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        (!mounts.contains(&task)).then_some(())
    });
    // The removed service's task holds the secret until it has stopped.
    wait_for(
        "secret rm once the task ended",
        Duration::from_secs(60),
        || {
            c.run(&["secret", "rm", "db_pass2"])
                .status
                .success()
                .then_some(())
        },
    );
    let (b64, b64_2) = (base64_of(secret.as_bytes()), base64_of(secret2.as_bytes()));
    for n in &c.nodes {
        for needle in [
            secret.as_bytes(),
            b64.as_bytes(),
            secret2.as_bytes(),
            b64_2.as_bytes(),
        ] {
            let mut hits = Vec::new();
            files_holding(&n.dir, needle, &mut hits);
            assert!(hits.is_empty(), "{}: {hits:?}", n.name);
        }
    }
    for n in &c.nodes {
        if let Some(pid) = n.child.as_ref().map(|c| c.id()) {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            assert!(!env.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }
}

fn base64_of(data: &[u8]) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin.take().unwrap().write_all(data)?;
            ch.wait_with_output()
        })
        .unwrap();
    // The stored form may start mid-group: search for the first full quartets only.
    let s = stdout(&out);
    s[..s.len().saturating_sub(4)].to_string()
}

/// A ustar archive holding one regular file named `name` (any bytes, `..` included).
fn tar_with_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// POSTs `body` over a node's unix socket; returns (HTTP status, body).
fn unix_post(sock: &str, path: &str, body: &str) -> (u16, String) {
    let sock = sock.trim_start_matches("unix://");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--unix-socket", sock])
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://localhost{path}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin.take().unwrap().write_all(body.as_bytes())?;
            ch.wait_with_output()
        })
        .unwrap();
    let text = stdout(&out);
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A volume with a size limit: a task that fills it gets "No space left on device", the node
/// and its other tasks keep working, `volume ls` shows the limit, and removing the volume
/// leaves no mount behind.
#[test]
fn s40_a_full_volume_fails_its_task_not_the_node() {
    let c = Cluster::init(67, &[]);
    c.import("fill", "sleep 1000");
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "keeper",
            "fill",
            "sh",
            "-c",
            "exec sleep 1000",
        ]),
        "create keeper",
    );
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "filler",
            "--mount",
            "type=volume,src=small,dst=/data,volume-opt=size=8m",
            "fill",
            "sh",
            "-c",
            "dd if=/dev/zero of=/data/fill bs=1M count=64 2>&1; echo dd-exit=$?; \
             df -k /data | tail -1; exec sleep 1000",
        ]),
        "create filler",
    );
    let log = wait_for("the filler's dd to end", Duration::from_secs(60), || {
        let text = stdout(&c.run(&["service", "logs", "filler"]));
        text.contains("dd-exit=").then_some(text)
    });
    assert!(
        log.contains("No space left on device") && !log.contains("dd-exit=0"),
        "the task got ENOSPC: {log}"
    );
    // The volume's file system is 8 MiB; the node's disk is not what filled up.
    let vols = volumes(&c);
    let small = vols.iter().find(|v| v["name"] == "small").expect("listed");
    assert_eq!(small["size_limit"], 8 << 20, "{small}");
    let used = small["size_bytes"].as_u64().expect("size");
    assert!(used > 4 << 20 && used <= 8 << 20, "used {used}");
    let table = ok(&c.run(&["volume", "ls"]), "volume ls");
    assert!(table.contains("/ 8.0 MiB"), "{table}");
    // The node goes on: the other task runs and a new one starts.
    assert_eq!(c.running("keeper").len(), 1);
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "after",
            "fill",
            "sh",
            "-c",
            "echo after-ok > /tmp/x && exec sleep 1000",
        ]),
        "a new service after the volume filled",
    );
    running_one(&c, "after");

    ok(
        &c.run(&["service", "rm", "filler", "keeper", "after"]),
        "service rm",
    );
    // Refused while the removed task's container still holds it.
    wait_for("volume rm small", Duration::from_secs(60), || {
        c.run(&["volume", "rm", "small"])
            .status
            .success()
            .then_some(())
    });
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let data = c.tmp.path().to_str().unwrap().to_string();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(&data) && l.contains("/volumes/")),
        "no volume mount left: {mounts}"
    );
}

/// `volume move`: by hand while its task runs (a first pass, the task stopped, a final pass,
/// the task started on the new node); by hand with the service scaled to 0; and by the leader
/// when a drain stops the task: the copy is checked on both ends, the task starts on the new
/// node with its lines intact and in order, and the old copy goes.
#[test]
fn s50_a_volume_moves_with_a_drain() {
    let c = {
        let mut c = Cluster::init(68, &[]);
        c.join("w1", "worker");
        c
    };
    c.import("db", "sleep 1000");
    let (m1, w1) = (c.node_id("m1"), c.node_id("w1"));
    ok(
        &c.run(&["volume", "create", "data", "--node", "w1"]),
        "volume create",
    );
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "db",
            "--mount",
            "type=volume,src=data,dst=/data",
            "--stop-grace-period",
            "1s",
            "db",
            "sh",
            "-c",
            "echo start >> /data/log; seq 1 20000 > /data/numbers; exec sleep 1000",
        ]),
        "service create",
    );
    let (t1, node) = running_one(&c, "db");
    assert_eq!(node, w1);
    assert_eq!(volume_log(&c, "data"), vec!["start"]);

    // Refusals, each with what to do.
    for (args, says) in [
        (vec!["data", "--to", "w1"], "already"),
        (vec!["data", "--to", "nowhere"], "not found"),
        (vec!["nosuch", "--to", "m1"], "not found"),
        (vec!["../x", "--to", "m1"], "not found"),
    ] {
        let mut full = vec!["volume", "move"];
        full.extend(args.iter().copied());
        let o = c.run(&full);
        assert!(!o.status.success(), "{args:?} was refused");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    // The API: a body without `to` is a 400 with a JSON message; a worker may not move.
    let m1_addr = c.nodes[0].addr.clone();
    let admin = c.tmp.path().join("admin-as-node");
    std::fs::create_dir_all(&admin).unwrap();
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("cert.pem", "node.pem"),
        ("key.pem", "node.key"),
    ] {
        std::fs::copy(c.admin_dir().join(from), admin.join(to)).unwrap();
    }
    let (code, body) = curl(&admin, &m1_addr, "POST", "/v1/volumes/data/move", &[]);
    assert_eq!(code, 400, "{body}");
    let msg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(msg["message"].as_str().unwrap().contains("to"), "{body}");
    let (code, body) = curl(
        &c.nodes[1].dir.join("tls"),
        &m1_addr,
        "POST",
        "/v1/volumes/data/move",
        &[],
    );
    assert_eq!(code, 403, "a worker's certificate: {body}");
    assert_eq!(
        running_one(&c, "db").0,
        t1,
        "the refused moves left the task alone"
    );

    // A copy an earlier move left on m1 (as a leader change mid-move would), with a file the
    // real data does not have: the move deletes it first.
    let cp = Command::new("cp")
        .arg("-a")
        .arg(c.nodes[1].dir.join("volumes").join("data"))
        .arg(c.nodes[0].dir.join("volumes"))
        .output()
        .unwrap();
    assert!(cp.status.success(), "cp: {}", stderr(&cp));
    std::fs::write(
        c.nodes[0].dir.join("volumes/data/_data/STALE"),
        b"left by an earlier move",
    )
    .unwrap();

    // By hand while the task runs: a first pass with it running, then the task stops, the
    // final pass, and its replacement starts on m1 with the data.
    let out = ok(
        &c.run(&["volume", "move", "data", "--to", "m1"]),
        "volume move with its task running",
    );
    assert!(
        out.contains("pre-copy pass:")
            && out.contains("final pass:")
            && out.contains("the copy on the old node is deleted"),
        "{out}"
    );
    let (t2, node) = running_one(&c, "db");
    assert_ne!(t2, t1);
    assert_eq!(node, m1, "the task went with its data");
    assert_eq!(volume_log(&c, "data"), vec!["start", "start"]);
    assert!(
        !c.nodes[1].dir.join("volumes").join("data").exists(),
        "the old copy on w1 is deleted once the task runs on m1"
    );
    assert!(
        !c.nodes[0].dir.join("volumes/data/_data/STALE").exists(),
        "the leftover copy was replaced, not merged"
    );
    let v = volumes(&c);
    let data = v.iter().find(|v| v["name"] == "data").unwrap();
    let passes: Vec<&str> = data["last_move"]["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pass"].as_str().unwrap())
        .collect();
    assert_eq!(passes, vec!["pre-copy", "final"], "{data}");

    // By hand with the service scaled to 0: one pass, back to w1. (A move while the task still
    // runs would take it along in two passes: wait until the scale has stopped it.)
    ok(&c.run(&["service", "scale", "db=0"]), "scale to 0");
    wait_for("db stopped", Duration::from_secs(60), || {
        c.running("db").is_empty().then_some(())
    });
    let out = wait_for("the move", Duration::from_secs(60), || {
        let o = c.run(&["volume", "move", "data", "--to", "w1"]);
        if o.status.success() {
            return Some(stdout(&o));
        }
        // Until the old container is removed.
        assert!(stderr(&o).contains("try again"), "{}", stderr(&o));
        None
    });
    assert!(
        out.contains("checked on both nodes")
            && out.contains("the copy on the old node is deleted")
            && !out.contains("pre-copy"),
        "{out}"
    );
    assert!(
        !c.nodes[0].dir.join("volumes").join("data").exists(),
        "no service task was waiting: the old copy on m1 is deleted at once"
    );
    ok(&c.run(&["service", "scale", "db=1"]), "scale to 1");
    let (t3, node) = running_one(&c, "db");
    assert_ne!(t3, t2);
    assert_eq!(node, w1, "the task goes where its data is");
    assert_eq!(volume_log(&c, "data"), vec!["start", "start", "start"]);

    // A drain moves the data with the task: w1 drained, the leader copies the volume to m1
    // (the node the scheduler picks) and the task starts there with its lines in order.
    ok(
        &c.run(&["node", "update", "--availability", "drain", "w1"]),
        "drain w1",
    );
    let (t4, node) = wait_for("the task on m1", Duration::from_secs(90), || {
        let r = c.running("db");
        (r.len() == 1 && r[0].0 != t3).then(|| r[0].clone())
    });
    assert_ne!(t4, t3);
    assert_eq!(node, m1, "the task followed its data off the drained node");
    assert_eq!(
        volume_log(&c, "data"),
        vec!["start", "start", "start", "start"],
        "lines intact, in order"
    );
    let v = volumes(&c);
    let data = v.iter().find(|v| v["name"] == "data").unwrap();
    assert_eq!(data["node_id"], m1.as_str());
    wait_for("the old copy gone from w1", Duration::from_secs(30), || {
        (!c.nodes[1].dir.join("volumes").join("data").exists()).then_some(())
    });
    assert!(c.nodes[0].dir.join("volumes/data/_data/numbers").exists());

    // A global service's task stays on its node: its volume does not move under it.
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "agent",
            "--mode",
            "global",
            "--mount",
            "type=volume,src=gdata,dst=/data",
            "db",
            "sh",
            "-c",
            "echo start >> /data/log; exec sleep 1000",
        ]),
        "global service",
    );
    running_one(&c, "agent");
    let o = c.run(&["volume", "move", "gdata", "--to", "w1"]);
    assert!(!o.status.success(), "a global task's volume was moved");
    assert!(
        stderr(&o).contains("global service agent, which stays on its node"),
        "{}",
        stderr(&o)
    );
    assert_eq!(volume_log(&c, "gdata"), vec!["start"], "left alone");
}

/// A drain moves a volume in two passes while its task keeps writing: the first pass copies
/// it with the task running, the stop waits for that pass, the final pass sends what changed
/// once the task has stopped (one writer: the old task's last line, written on SIGTERM, is
/// on the new node before any line of the new task), and every line is there in order.
#[test]
fn s60_a_drain_pre_copies_a_volume_while_its_task_writes() {
    let c = {
        let mut c = Cluster::init(69, &[]);
        c.join("w1", "worker");
        c
    };
    c.import("db", "sleep 1000");
    let (m1, w1) = (c.node_id("m1"), c.node_id("w1"));
    ok(
        &c.run(&["volume", "create", "data", "--node", "w1"]),
        "volume create",
    );
    // Each run: 64 MiB of data (so the first pass takes a while), then numbered lines under
    // its own id every 20 ms, and a last line when told to stop.
    let script = "id=$(busybox cut -c1-8 /proc/sys/kernel/random/uuid); \
        [ -f /data/blob ] || busybox dd if=/dev/zero of=/data/blob bs=1M count=64 2>/dev/null; \
        trap 'echo \"$id end\" >> /data/log; exit 0' TERM; \
        i=0; while true; do i=$((i+1)); echo \"$id $i\" >> /data/log; sleep 0.02; done";
    ok(
        &c.run(&[
            "service",
            "create",
            "--name",
            "db",
            "--mount",
            "type=volume,src=data,dst=/data",
            "--stop-grace-period",
            "5s",
            "db",
            "sh",
            "-c",
            script,
        ]),
        "service create",
    );
    let (t1, node) = running_one(&c, "db");
    assert_eq!(node, w1);
    // 150 lines take at least 3 s (a 20 ms sleep each) after the blob was written: older than
    // the 2 s in which a file the first pass reads is sent again whatever its stat.
    wait_for("lines in the log", Duration::from_secs(60), || {
        (volume_log(&c, "data").len() >= 150).then_some(())
    });
    let before = volume_log(&c, "data").len();

    ok(
        &c.run(&["node", "update", "--availability", "drain", "w1"]),
        "drain w1",
    );
    let (t2, node) = wait_for("the task on m1", Duration::from_secs(120), || {
        let r = c.running("db");
        (r.len() == 1 && r[0].0 != t1).then(|| r[0].clone())
    });
    assert_eq!(node, m1, "the task followed its data off the drained node");
    assert_ne!(t2, t1);
    // The new task writes too: wait for a few of its lines.
    let log = wait_for("the new task's lines", Duration::from_secs(30), || {
        let log = volume_log(&c, "data");
        let ids: Vec<&str> = log.iter().filter_map(|l| l.split(' ').next()).collect();
        (ids.first() != ids.last() && log.len() > before + 3).then_some(log)
    });
    // First run: `A 1` … `A n`, `A end`; then the second: `B 1` … in order, nothing lost.
    let first = log[0].split(' ').next().unwrap().to_string();
    let mine: Vec<&String> = log.iter().take_while(|l| l.starts_with(&first)).collect();
    let n = mine.len() - 1;
    for (i, l) in mine[..n].iter().enumerate() {
        assert_eq!(
            **l,
            format!("{first} {}", i + 1),
            "first run, line {i}: {log:?}"
        );
    }
    assert_eq!(
        *mine[n],
        format!("{first} end"),
        "the old task's last line (written on SIGTERM) made it, before any new line: {log:?}"
    );
    assert!(
        n > before,
        "lines written during the first pass and after it are there ({n} > {before})"
    );
    let rest = &log[n + 1..];
    let second = rest[0].split(' ').next().unwrap().to_string();
    assert_ne!(second, first);
    for (i, l) in rest.iter().enumerate() {
        assert_eq!(
            *l,
            format!("{second} {}", i + 1),
            "second run, line {i}: {log:?}"
        );
    }

    // The move's record: a pre-copy of everything, then a small final pass.
    let v: serde_json::Value = serde_json::from_str(&ok(
        &c.run(&["volume", "inspect", "data"]),
        "volume inspect",
    ))
    .unwrap();
    assert_eq!(v["node_id"], m1.as_str());
    let passes = v["last_move"]["passes"].as_array().unwrap();
    let names: Vec<&str> = passes.iter().map(|p| p["pass"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["pre-copy", "final"], "{v}");
    let (pre, fin) = (
        passes[0]["bytes"].as_u64().unwrap(),
        passes[1]["bytes"].as_u64().unwrap(),
    );
    assert!(pre > 64 << 20, "the pre-copy took the blob: {v}");
    assert!(fin < 4 << 20, "the final pass only what changed: {v}");
    assert!(v.get("moving").is_none(), "no move under way: {v}");
    wait_for("the old copy gone from w1", Duration::from_secs(30), || {
        (!c.nodes[1].dir.join("volumes").join("data").exists()).then_some(())
    });
}
