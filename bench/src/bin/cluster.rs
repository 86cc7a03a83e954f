//! Cluster-core benchmark: 3 managers on loopback.
//!
//! - write latency p50/p99 through the API (admin mTLS client → leader → Raft, fsync on);
//!   anchor: a 4 KiB O_DSYNC write on the same disk, in the same run;
//! - batched mutation throughput: one `service create --replicas N` whose tasks nobody can
//!   run writes N task creations in one entry and N scheduler decisions in another;
//! - leader kill -9 → first accepted write, median of ≥ 10 trials.
//!
//! Run: `cargo build --release -p flotilla -p flotilla-bench && target/release/cluster [trials] [writes] [tasks]`

use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::Method;

use flotilla_api::{Client, Endpoint};
use flotilla_bench::*;

fn admin_client(dir: &std::path::Path, addr: &str) -> anyhow::Result<Client> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let tls = flotilla_pki::client_config(
        &read("ca.pem")?,
        Some((&read("cert.pem")?, &read("key.pem")?)),
    )?;
    Ok(Client::new(Endpoint::Https {
        addr: addr.to_string(),
        tls,
    })
    .with_timeout(Duration::from_secs(5)))
}

fn leader_addr(nodes: &[Node]) -> Option<String> {
    for n in nodes.iter().filter(|n| n.child.is_some()) {
        if let Ok(out) = cli(&n.socket(), &["cluster", "info", "--format", "json"]) {
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            if let Some(a) = v["leader"]["addr"].as_str() {
                return Some(a.to_string());
            }
        }
    }
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let trials: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let writes: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let tasks: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let tmp = tempfile::tempdir()?;
    if std::env::var("BENCH_KEEP").is_ok() {
        println!("keeping {}", tmp.path().display());
    }
    println!("machine: {}", machine());
    println!("flotilla: {}", flotilla_bin().display());

    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node {
            name: format!("m{i}"),
            dir: tmp.path().join(format!("m{i}")),
            addr: format!("127.0.100.{i}:4440"),
            child: None,
            extra: vec![],
        })
        .collect();
    // Raft election timeout range (ms), e.g. BENCH_ELECTION=250-500 (the default).
    let election = std::env::var("BENCH_ELECTION").unwrap_or_else(|_| "250-500".into());
    for n in nodes.iter_mut() {
        n.extra = vec!["--election-timeout".into(), election.clone()];
    }
    println!("election timeout: {election} ms");
    nodes[0].spawn(&["--init"])?;
    let s0 = nodes[0].socket();
    wait_for("m1", Duration::from_secs(30), || {
        cli(&s0, &["node", "ls"]).ok()
    })?;
    let token = cli(&s0, &["cluster", "join-token", "manager", "-q"])?
        .trim()
        .to_string();
    for i in 1..3 {
        let a = nodes[0].addr.clone();
        nodes[i].spawn(&["--join", &a, "--token", &token])?;
        let addr = nodes[i].addr.clone();
        wait_for("manager joined as voter", Duration::from_secs(60), || {
            let out = cli(&s0, &["cluster", "info", "--format", "json"]).ok()?;
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            v["managers"]
                .as_array()?
                .iter()
                .any(|m| m["addr"] == addr.as_str() && m["voter"] == true)
                .then_some(())
        })?;
    }
    let admin = nodes[0].dir.join("admin");
    let m1_id = {
        let out = cli(&s0, &["node", "inspect", "m1", "--format", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["id"].as_str().context("node id")?.to_string()
    };

    // Anchor.
    let fs = fsync_anchor(tmp.path(), 500)?;
    let fsync_p50 = pct(&fs, 50.0);
    println!(
        "anchor: 4 KiB O_DSYNC write p50 {:.3} ms, p99 {:.3} ms",
        ms(fsync_p50),
        ms(pct(&fs, 99.0))
    );

    // Write latency.
    let leader = leader_addr(&nodes).context("no leader")?;
    let client = admin_client(&admin, &leader)?;
    let path = format!("/v1/nodes/{m1_id}");
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let body = serde_json::json!({ "label_add": { format!("k{}", i % 50): i.to_string() } });
        let t = Instant::now();
        client
            .request(Method::POST, &path, Some(serde_json::to_vec(&body)?))
            .await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let p50 = pct(&lat, 50.0);
    println!(
        "write latency (API → leader → 3-manager Raft, fsync): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms over {writes} sequential writes; p50 / fsync anchor = {:.1}x",
        ms(p50),
        ms(pct(&lat, 90.0)),
        ms(pct(&lat, 99.0)),
        ms(p50) / ms(fsync_p50).max(1e-6)
    );

    // Batched mutations: N task creations (one entry) + N scheduler decisions (one entry).
    let rootfs = tmp.path().join("rootfs");
    busybox_rootfs(&rootfs)?;
    cli(
        &s0,
        &[
            "image",
            "import",
            rootfs.to_str().unwrap_or(""),
            "--name",
            "bb:bench",
            "--cmd",
            "sleep 1000",
        ],
    )?;
    let spec = serde_json::json!({
        "name": "batch", "mode": {"replicated": {"replicas": tasks}},
        "task_template": {"container": {"image": "bb:bench"}, "placement": {"constraints": ["node.labels.nowhere==x"]}},
    });
    // Completion is observed on a follower's changefeed (`/v1/events`), which is pushed, costs
    // the leader nothing, and only shows entries that are committed (a follower applies only
    // committed entries). Polling the leader for 10,000 tasks would itself load the leader.
    let follower = nodes
        .iter()
        .find(|n| n.addr != leader)
        .context("no follower")?
        .addr
        .clone();
    let fc = admin_client(&admin, &follower)?.with_timeout(Duration::from_secs(600));
    let ping: serde_json::Value = fc.get_json("/v1/ping").await?;
    let since = ping["raft"]["applied_index"]
        .as_u64()
        .context("follower applied index")?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Instant>();
    let watcher = tokio::spawn(async move {
        let mut created = std::collections::HashSet::new();
        let mut pending = std::collections::HashSet::new();
        let mut done_tx = Some(done_tx);
        let r = fc
            .stream_lines(&format!("/v1/events?since={since}&type=task"), |line| {
                let Ok(ev) = serde_json::from_slice::<serde_json::Value>(line) else {
                    return true;
                };
                let id = ev["id"].as_str().unwrap_or_default().to_string();
                if ev["action"] == "create" {
                    created.insert(id.clone());
                }
                if ev["object"]["status"]["state"] == "pending" {
                    pending.insert(id);
                }
                if created.len() as u64 >= tasks && pending.len() as u64 >= tasks {
                    if let Some(tx) = done_tx.take() {
                        let _ = tx.send(Instant::now());
                    }
                    return false;
                }
                true
            })
            .await;
        (r, created.len(), pending.len())
    });
    let t0 = Instant::now();
    let resp = client
        .request(
            Method::POST,
            "/v1/services",
            Some(serde_json::to_vec(&spec)?),
        )
        .await?;
    let created: serde_json::Value = serde_json::from_slice(&resp.body)?;
    let sid = created["id"].as_str().context("service id")?.to_string();
    let t_end = match tokio::time::timeout(Duration::from_secs(300), done_rx).await {
        Ok(Ok(t)) => t,
        _ => {
            watcher.abort();
            anyhow::bail!("batched tasks not all created and pending after 300 s");
        }
    };
    let (r, _, _) = watcher.await?;
    r?;
    let el = t_end - t0;
    let mutations = 2 * tasks;
    println!(
        "batched mutations: {mutations} ({tasks} task creations + {tasks} scheduler decisions) committed in {:.2} s = {:.0} mutations/s (orchestrator + scheduler included; observed on a follower's changefeed)",
        el.as_secs_f64(),
        mutations as f64 / el.as_secs_f64()
    );
    client
        .request(Method::DELETE, &format!("/v1/services/{sid}"), None)
        .await?;
    // Failover is measured on a settled cluster: the removal of those tasks must be over.
    let slow = client.clone().with_timeout(Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let left = slow
            .get_json::<Vec<serde_json::Value>>("/v1/tasks")
            .await
            .map(|v| v.len());
        if left.as_ref().is_ok_and(|n| *n == 0) {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("batched tasks not removed after 300 s: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Failover.
    let mut fo = Vec::new();
    for trial in 0..trials {
        let leader = leader_addr(&nodes).context("no leader")?;
        let idx = nodes
            .iter()
            .position(|n| n.addr == leader)
            .context("leader index")?;
        let others: Vec<Client> = nodes
            .iter()
            .filter(|n| n.addr != leader)
            .map(|n| {
                admin_client(&admin, &n.addr).map(|c| c.with_timeout(Duration::from_millis(1500)))
            })
            .collect::<Result<_, _>>()?;
        nodes[idx].kill9();
        let t = Instant::now();
        'outer: loop {
            for c in &others {
                let body = serde_json::json!({ "label_add": { "failover": trial.to_string() } });
                let a = Instant::now();
                match c
                    .request(Method::POST, &path, Some(serde_json::to_vec(&body)?))
                    .await
                {
                    Ok(_) => break 'outer,
                    Err(e) => {
                        if std::env::var("BENCH_DEBUG").is_ok() {
                            let m = e.to_string();
                            println!(
                                "    {:>5.0} ms (+{:.0} ms) {:?}: {}",
                                ms(t.elapsed()),
                                ms(a.elapsed()),
                                c.endpoint(),
                                &m[..m.len().min(90)]
                            );
                        }
                    }
                }
            }
            if t.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("no write accepted 30 s after killing the leader");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let d = t.elapsed();
        println!(
            "  trial {trial}: leader {leader} killed → first accepted write after {:.0} ms",
            ms(d)
        );
        fo.push(d);
        nodes[idx].spawn(&[])?;
        // Before the next kill, the restarted manager must have caught up with the leader's
        // commit index (a lagging survivor is a different, slower scenario).
        let leader_now = loop {
            if let Some(l) = leader_addr(&nodes) {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let lc = admin_client(&admin, &leader_now)?;
        let rc = admin_client(&admin, &nodes[idx].addr)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let l: serde_json::Value = lc.get_json("/v1/ping").await.unwrap_or_default();
            let r: serde_json::Value = rc.get_json("/v1/ping").await.unwrap_or_default();
            let lci = l["raft"]["commit_index"].as_u64().unwrap_or(u64::MAX);
            let rai = r["raft"]["applied_index"].as_u64().unwrap_or(0);
            if rai >= lci && rai > 0 {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("restarted manager did not catch up");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    fo.sort();
    if fo.is_empty() {
        return Ok(());
    }
    println!(
        "failover (leader kill -9 → first accepted write): median {:.0} ms, min {:.0} ms, max {:.0} ms over {} trials (Docker Swarm's defaults: ~10 s, not measured here)",
        ms(pct(&fo, 50.0)),
        ms(fo[0]),
        ms(fo[fo.len() - 1]),
        fo.len()
    );
    if std::env::var("BENCH_KEEP").is_ok() {
        let _ = tmp.keep();
    }
    Ok(())
}
