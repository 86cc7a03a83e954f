//! Bounded resources end to end: every place a peer can send bytes to a node process is
//! bounded in size, time or number. Each test performs the attack against real node
//! processes on 127.0.<net>.x (nets 150–154).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(60);
const MB: usize = 1 << 20;

/// A curl whose request body comes from stdin: `first` is written, then one byte every
/// 100 ms (the body never ends; the trickle lets curl, which blocks reading its stdin, see
/// the answer) until `release` is dropped.
struct StalledUpload {
    child: Option<Child>,
    release: Option<mpsc::Sender<()>>,
}

impl StalledUpload {
    fn start(args: &[&str], first: Vec<u8>) -> StalledUpload {
        let mut child = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "60"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl (apt-get install curl)");
        let mut stdin = child.stdin.take().unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            // Fails with EPIPE once curl stops reading (it got its answer): that is fine.
            if stdin.write_all(&first).is_err() {
                return;
            }
            loop {
                if stdin.write_all(b" ").and_then(|_| stdin.flush()).is_err() {
                    return;
                }
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => return,
                }
            }
        });
        StalledUpload {
            child: Some(child),
            release: Some(tx),
        }
    }

    /// Waits for curl's answer: (status, body). curl's own `--max-time` bounds the wait.
    fn answer(mut self) -> (u16, String) {
        let child = self.child.take().unwrap();
        let o = child.wait_with_output().unwrap();
        let out = stdout(&o);
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        (code.parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for StalledUpload {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        drop(self.release.take());
    }
}

/// Runs curl to completion: (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let o = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl (apt-get install curl)");
    let out = stdout(&o);
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    (code.parse().unwrap_or(0), body.to_string())
}

fn message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("not a JSON {{\"message\"}}: {body:?}"))
}

/// #2: a follower used to buffer a whole request body before proxying it to the leader, for
/// anyone (`/v1/join` is anonymous). Now it stops at the leader's 2 MB JSON limit and answers
/// 413 at once, without waiting for the rest of the (here endless) body.
#[test]
fn t10_a_follower_refuses_an_endless_anonymous_body_with_413() {
    let mut c = Cluster::init(150, &[]);
    c.join("m2", "manager");
    c.join("m3", "manager");
    let leader = c.wait_leader(LONG);
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let url = format!("https://{}/v1/join", c.nodes[follower].addr);

    // 3 MB of body with no end (chunked, no length): the old follower waited for the rest
    // forever (curl's --max-time then gives code 000).
    //
    // The follower answers 413 and closes with the rest of the body unread, so its kernel
    // resets the connection; when the reset reaches curl before curl has read the answer, the
    // answer is lost and curl reports the last status it saw, `100 Continue`. That is TCP,
    // not the server: such an attempt is repeated (a server that waits for the body never
    // answers at all, and fails every attempt).
    let t0 = Instant::now();
    let (mut code, mut body) = (0, String::new());
    for _ in 0..5 {
        let up = StalledUpload::start(
            &[
                "-k",
                "--http1.1",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-T",
                "-",
                &url,
            ],
            vec![b' '; 3 * MB],
        );
        (code, body) = up.answer();
        if code != 100 {
            break;
        }
    }
    assert_eq!(code, 413, "{body}");
    assert!(message(&body).contains("too large"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());

    // A declared length over the limit is refused before any of it is read (the client
    // waits for `100 Continue`, which never comes).
    let (code, body) = curl(&[
        "-k",
        "--http1.1",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        "expect: 100-continue",
        "-H",
        "content-length: 100000000000",
        "--data-binary",
        "x",
        &url,
    ]);
    assert_eq!(code, 413, "{body}");
    message(&body);

    // The follower still proxies ordinary requests.
    let o = cli(
        &c.nodes[follower].socket(),
        &["node", "ls", "--format", "json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

fn unpacked_layers(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("runtime/images/layers"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// #4 (import half): `image import` used to unpack the layers at once, before the client had
/// even signed the image, so unsigned bytes reached the layer unpacker whatever the trust
/// policy. Now import only stores the content; the layers are unpacked once a trusted
/// signature arrives (or by the first container create, after the agent's check).
#[test]
fn t20_an_unsigned_import_is_stored_but_not_unpacked() {
    let c = Cluster::init(151, &[]);
    let info = c.cluster_info().unwrap();
    assert_eq!(info["settings"]["signature_enforcement"], "on", "{info}");
    let data = c.nodes[0].dir.clone();
    let rootfs = c.tmp.path().join("rootfs");
    busybox_rootfs(&rootfs);
    let o = c.run(&[
        "image",
        "import",
        "--no-sign",
        rootfs.to_str().unwrap(),
        "--name",
        "uns:1",
        "--cmd",
        "sleep 1000",
    ]);
    assert!(o.status.success(), "import: {}", stderr(&o));
    assert_eq!(
        unpacked_layers(&data),
        Vec::<String>::new(),
        "unpacked at import"
    );

    // A task of it is refused by the agent, and the create never unpacks it either.
    let o = c.run(&["service", "create", "--detach", "--name", "uns", "uns:1"]);
    assert!(o.status.success(), "service create: {}", stderr(&o));
    wait_for("the unsigned task rejected", LONG, || {
        c.tasks("uns")
            .iter()
            .any(|t| t["status"]["state"] == "rejected")
            .then_some(())
    });
    assert_eq!(
        unpacked_layers(&data),
        Vec::<String>::new(),
        "unpacked by the create"
    );

    // Signed with the trusted admin key: now it is unpacked, in the background.
    let key = c.admin_dir().join("signing-key.pem");
    let o = c.run(&["image", "sign", "uns:1", "--key", key.to_str().unwrap()]);
    assert!(o.status.success(), "image sign: {}", stderr(&o));
    wait_for("the signed image's layer unpacked", LONG, || {
        (!unpacked_layers(&data).is_empty()).then_some(())
    });
    let o = c.run(&["service", "rm", "uns"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn uploads_in_progress(data: &Path) -> usize {
    std::fs::read_dir(data.join("runtime/uploads"))
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}

/// #19: `image import`/`load` used to hold each whole upload (up to 4 GiB) in memory, any
/// number at once. Now uploads stream to a file in the data directory, two at a time; a third
/// is refused with 503 before its body is read, and a declared length over the limit is 413.
#[test]
fn t30_uploads_stream_to_disk_two_at_a_time() {
    let c = Cluster::init(152, &[]);
    let data = c.nodes[0].dir.clone();
    let sock = data.join("api.sock");
    let sock = sock.to_str().unwrap();
    let load = |extra: &[&str], first: Vec<u8>| {
        let mut args = vec!["--unix-socket", sock, "-X", "POST", "-T", "-"];
        args.extend_from_slice(extra);
        args.push("http://localhost/v1/images/load");
        StalledUpload::start(&args, first)
    };
    // Two uploads that never finish hold both slots (their files exist on disk meanwhile).
    let a = load(&[], vec![0u8; 64 * 1024]);
    let b = load(&[], vec![0u8; 64 * 1024]);
    wait_for("two uploads spooling to disk", LONG, || {
        (uploads_in_progress(&data) == 2).then_some(())
    });
    let (code, body) = load(&[], vec![0u8; 1024]).answer();
    assert_eq!(code, 503, "{body}");
    assert!(
        message(&body).contains("uploads are already running"),
        "{body}"
    );

    // When they go, the slots and their files are given back.
    drop(a);
    drop(b);
    wait_for("the stalled uploads' files removed", LONG, || {
        (uploads_in_progress(&data) == 0).then_some(())
    });
    let (code, body) = wait_for("a free upload slot", LONG, || {
        let (code, body) = curl(&[
            "--unix-socket",
            sock,
            "-X",
            "POST",
            "--data-binary",
            "",
            "http://localhost/v1/images/load",
        ]);
        (code != 503).then_some((code, body))
    });
    assert_eq!(code, 400, "an empty upload: {body}");
    assert!(message(&body).contains("empty upload"), "{body}");

    // A declared length over 4 GiB: 413 before a byte is stored.
    let (code, body) = curl(&[
        "--unix-socket",
        sock,
        "-X",
        "POST",
        "-H",
        "expect: 100-continue",
        "-H",
        "content-length: 5000000000",
        "--data-binary",
        "x",
        "http://localhost/v1/images/load",
    ]);
    assert_eq!(code, 413, "{body}");
    message(&body);
    assert_eq!(uploads_in_progress(&data), 0);
}

/// #8: the node raises its open-file soft limit to the hard limit at start (it used to keep
/// whatever it was given, commonly 1024, which ~1,100 idle connections exhaust).
#[test]
fn t40_the_node_raises_its_open_file_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("n1");
    let addr = "127.0.153.1:4440".to_string();
    let script = r#"ulimit -Sn 1024 && exec "$0" "$@""#;
    let log = std::fs::File::create(tmp.path().join("n1.log")).unwrap();
    let child = Command::new("sh")
        .args(["-c", script, BIN, "node", "run", "--init", "--data-dir"])
        .arg(&dir)
        .args(["--listen", &addr, "--name", "n1"])
        .args([
            "--address-pool",
            "10.153.0.0/17",
            "--vip-pool",
            "10.153.128.0/17",
        ])
        .env("FLOTILLA_LOG", "info,openraft=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let node = NodeProc {
        name: "n1".into(),
        dir: dir.clone(),
        addr,
        child: Some(child),
        extra: Vec::new(),
        netns: None,
    };
    wait_for("the node to answer", LONG, || {
        let o = cli(&node.socket(), &["node", "ls", "--format", "json"]);
        o.status.success().then_some(())
    });
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert_ne!(nums[0], "1024", "soft limit not raised: {line}");
    let hard = if nums[1] == "unlimited" {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .unwrap()
            .trim()
            .to_string()
    } else {
        nums[1].to_string()
    };
    assert_eq!(nums[0], hard, "soft limit not at the hard limit: {line}");
    drop(node);
}
