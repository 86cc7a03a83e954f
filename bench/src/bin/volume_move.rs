//! Volume move benchmark: a task with a 1 GiB volume (64 files of random data) is drained off
//! its node; the leader moves its volume to the other node in two passes (a pre-copy while the
//! task runs, then what changed once it stopped; the old node's export streamed through the
//! leader into the new node's import over mTLS, checked by SHA-256 on both ends) and the task
//! starts there. Against `rsync -a` of the same data between two directories of
//! the same disk (the anchor, same round). Two nodes on loopback (127.0.0.71 manager, .72
//! worker); the volume goes back and forth, one drain per round.
//!
//! Reports per round: drain command → task running on the new node, rsync's time and their
//! ratio, and the task's downtime: from the old task seen stopped to the new one seen running
//! (polls of `service ps`; "stopped" is when its desired state leaves `running`, so the stop
//! grace period, 1 s here as `sleep` ignores SIGTERM, is part of it), and each pass as the
//! leader timed it.
//!
//! Run: `bench/volume-move/run.sh [--rounds 3] [--mib 1024]` (needs root, runc, busybox-static,
//! rsync).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use flotilla_bench::{busybox_rootfs, cli, machine, wait_for, Node};

fn arg(name: &str, default: usize) -> usize {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `db` task's (id, node id, state) list.
fn tasks(sock: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let out = cli(sock, &["service", "ps", "db", "--format", "json"])?;
    let v: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    Ok(v.iter()
        .filter(|t| t["desired_state"] == "running")
        .map(|t| {
            (
                t["id"].as_str().unwrap_or_default().to_string(),
                t["node_id"].as_str().unwrap_or_default().to_string(),
                t["status"]["state"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect())
}

fn running_on(sock: &str, node: &str) -> bool {
    tasks(sock).is_ok_and(|ts| ts.iter().any(|(_, n, s)| n == node && s == "running"))
}

fn rsync_secs(src: &Path, scratch: &Path) -> anyhow::Result<f64> {
    let dst = scratch.join("rsync-copy");
    let _ = std::fs::remove_dir_all(&dst);
    // Dirty pages of the last round out of the way, as for the move.
    Command::new("sync").status()?;
    let t = Instant::now();
    let st = Command::new("rsync")
        .arg("-a")
        .arg(format!("{}/", src.display()))
        .arg(&dst)
        .status()
        .context("rsync (apt-get install rsync)")?;
    let secs = t.elapsed().as_secs_f64();
    if !st.success() {
        bail!("rsync failed: {st}");
    }
    std::fs::remove_dir_all(&dst)?;
    Ok(secs)
}

fn main() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 3);
    let mib = arg("--mib", 1024).max(16);
    println!("machine: {}", machine());
    let tmp = tempfile::tempdir()?;
    let rootfs = tmp.path().join("rootfs");
    busybox_rootfs(&rootfs)?;
    let mut m1 = Node {
        name: "m1".into(),
        dir: tmp.path().join("m1"),
        addr: "127.0.0.71:4440".into(),
        child: None,
        extra: vec![],
    };
    m1.spawn(&[
        "--init",
        "--address-pool",
        "10.171.0.0/17",
        "--vip-pool",
        "10.171.128.0/17",
    ])?;
    let sock = m1.socket();
    wait_for("the manager", Duration::from_secs(30), || {
        cli(&sock, &["node", "ls"]).ok()
    })?;
    let token = cli(&sock, &["cluster", "join-token", "worker", "-q"])?
        .trim()
        .to_string();
    let mut w1 = Node {
        name: "w1".into(),
        dir: tmp.path().join("w1"),
        addr: "127.0.0.72:4440".into(),
        child: None,
        extra: vec![],
    };
    w1.spawn(&["--join", "127.0.0.71:4440", "--token", &token])?;
    let id_of = |name: &str| -> anyhow::Result<String> {
        let out = cli(&sock, &["node", "ls", "--format", "json"])?;
        let v: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        v.iter()
            .find(|n| n["spec"]["name"] == name && n["status"]["state"] == "ready")
            .and_then(|n| n["id"].as_str().map(str::to_string))
            .context("not ready yet")
    };
    let w1_id = wait_for("w1 ready", Duration::from_secs(60), || id_of("w1").ok())?;
    let m1_id = id_of("m1")?;
    cli(
        &sock,
        &[
            "image",
            "import",
            rootfs.to_str().unwrap_or(""),
            "--name",
            "bb:bench",
        ],
    )?;
    cli(&sock, &["volume", "create", "data", "--node", "w1"])?;
    let fill = format!(
        "[ -f /data/done ] || {{ for i in $(seq 1 64); do \
         dd if=/dev/urandom of=/data/f$i bs=1M count={} 2>/dev/null; done; touch /data/done; }}; \
         exec sleep 100000",
        mib / 64
    );
    cli(
        &sock,
        &[
            "service",
            "create",
            "--name",
            "db",
            "--detach",
            "--stop-grace-period",
            "1s",
            "--mount",
            "type=volume,src=data,dst=/data",
            "bb:bench",
            "sh",
            "-c",
            &fill,
        ],
    )?;
    let data_on = |n: &Node| n.dir.join("volumes/data/_data");
    wait_for("the volume filled", Duration::from_secs(600), || {
        data_on(&w1).join("done").exists().then_some(())
    })?;
    println!(
        "{rounds} rounds; volume: 64 files, {} MiB of random data; one move per round, alternating direction",
        (mib / 64) * 64
    );
    println!();
    println!("| round | from → to | drain → running on the new node | rsync -a, same data | drain / rsync | downtime (stopped → running) | passes (leader's timing) |");
    println!("|---|---|---:|---:|---:|---:|---|");
    let mut ratios = Vec::new();
    let mut downs = Vec::new();
    for r in 0..rounds {
        let (from, to, from_name, to_name, src) = if r % 2 == 0 {
            (&w1_id, &m1_id, "w1", "m1", data_on(&w1))
        } else {
            (&m1_id, &w1_id, "m1", "w1", data_on(&m1))
        };
        let rsync = rsync_secs(&src, tmp.path())?;
        Command::new("sync").status()?;
        cli(
            &sock,
            &["node", "update", "--availability", "active", to_name],
        )?;
        let t = Instant::now();
        cli(
            &sock,
            &["node", "update", "--availability", "drain", from_name],
        )?;
        wait_for("the old task stopped", Duration::from_secs(60), || {
            (!running_on(&sock, from)).then_some(())
        })?;
        let stopped = Instant::now();
        // The leader moves the volume by itself (a drain), then the task starts there.
        wait_for(
            "the task running on the new node",
            Duration::from_secs(600),
            || running_on(&sock, to).then_some(()),
        )?;
        let down = stopped.elapsed().as_secs_f64();
        let total = t.elapsed().as_secs_f64();
        let home = cli(&sock, &["volume", "inspect", "data"])?;
        if !home.contains(to.as_str()) {
            bail!("the volume did not move: {home}");
        }
        let ratio = total / rsync;
        ratios.push(ratio);
        downs.push(down);
        // The passes as the leader timed them (`volume inspect`: last_move).
        let v: serde_json::Value = serde_json::from_str(&home)?;
        let passes: Vec<String> = v["last_move"]["passes"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        format!(
                            "{} {:.1} MiB {:.2} s",
                            p["pass"].as_str().unwrap_or("?"),
                            p["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                            p["ms"].as_u64().unwrap_or(0) as f64 / 1000.0
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "| {} | {from_name} → {to_name} | {total:.2} s | {rsync:.2} s | {ratio:.2}× | {down:.2} s | {} |",
            r + 1,
            passes.join("; ")
        );
    }
    println!();
    println!(
        "median: drain / rsync {:.2}× (goal ≤ 1.2×), downtime {:.2} s (goal ≤ 2 s)",
        median(&mut ratios),
        median(&mut downs)
    );
    let _ = cli(&sock, &["service", "rm", "db"]);
    Ok(())
}
