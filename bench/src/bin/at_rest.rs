//! Cost of encryption at rest on the Raft store: 3 managers' stores in one process (the
//! transport calls the peer's `Store::handle_rpc` directly, JSON bodies as over HTTP), fsync on,
//! production Raft timing, with and without a keyring, interleaved in the same run.
//!
//! - batched mutations/s: `tasks` task creations of ~1 KB each, in Raft entries of at most
//!   512 KiB (as the orchestrator writes them), on the leader until applied there;
//! - commit latency: `writes` sequential one-op writes (~200 B) on the leader, p50/p99;
//! - anchor: a 4 KiB O_DSYNC write on the same disk.
//!
//! Each round starts a fresh 3-store cluster in a fresh directory; rounds alternate plain and
//! sealed so drift of the shared machine hits both. Prints the medians over the rounds and the
//! sealed/plain ratios.
//!
//! Run: `cargo build --release -p flotilla-bench --bin at_rest && target/release/at_rest [rounds] [tasks] [writes] [plain|sealed]`
//! (the last argument runs one kind only, for a profiler: no ratio then).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_bench::{fsync_anchor, machine, ms, pct, settle};
use flotilla_store::flotilla_secrets::Keyring;
use flotilla_store::{
    Batch, NodeId, Op, RaftTransport, RpcKind, Store, StoreConfig, Table, TransportError,
};

#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<NodeId, Store>>,
    /// Bytes of RPC request bodies sent so far (re-sent entries included).
    sent: AtomicU64,
}

struct InProc {
    net: Arc<Net>,
}

impl RaftTransport for InProc {
    fn call(
        &self,
        target: NodeId,
        _addr: &str,
        rpc: RpcKind,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send + '_>> {
        self.net
            .sent
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        Box::pin(async move {
            let store = self
                .net
                .nodes
                .lock()
                .map_err(|_| TransportError::Other("poisoned".into()))?
                .get(&target)
                .cloned();
            let Some(store) = store else {
                return Err(TransportError::Unreachable(format!(
                    "node {target} is down"
                )));
            };
            let handler = tokio::spawn(async move { store.handle_rpc(rpc, &body).await });
            match handler.await {
                Ok(reply) => reply.map_err(|e| TransportError::Other(e.to_string())),
                Err(e) => Err(TransportError::Other(format!("handler failed: {e}"))),
            }
        })
    }
}

fn addr(id: NodeId) -> String {
    format!("inproc://m{id}")
}

/// A fresh 3-store cluster under `dir`; each store has its own keyring when `sealed`.
async fn cluster(dir: &std::path::Path, sealed: bool) -> anyhow::Result<(Arc<Net>, Store)> {
    let net = Arc::new(Net::default());
    let mut leader = None;
    for id in 1..=3u64 {
        let cfg = StoreConfig {
            node_id: id,
            data_dir: dir.join(format!("m{id}")),
            write_timeout: Duration::from_secs(60),
            at_rest: if sealed {
                Some(Arc::new(Keyring::generate()?))
            } else {
                None
            },
            ..StoreConfig::default()
        };
        let store = Store::open(cfg, Arc::new(InProc { net: net.clone() })).await?;
        net.nodes
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(id, store.clone());
        if id == 1 {
            leader = Some(store);
        }
    }
    let leader = leader.ok_or_else(|| anyhow::anyhow!("no store"))?;
    leader.initialize(addr(1)).await?;
    leader.add_voter(2, addr(2)).await?;
    leader.add_voter(3, addr(3)).await?;
    Ok((net, leader))
}

/// A task object of about 1 KB of JSON, like the orchestrator's.
fn task_value(service: &str, slot: usize) -> String {
    format!(
        r#"{{"id":"t{slot:020}","service_id":"{service}","slot":{slot},"node_id":null,"desired_state":"running","status":{{"state":"pending","message":"no suitable node (scheduling constraints not satisfied on 0 nodes)","timestamp":1764892800000,"container_id":null,"exit_code":null}},"spec":{{"image":"registry.local/acme/web@sha256:{digest}","command":["/bin/server","--listen",":8080"],"env":["MODE=production","LOG_LEVEL=info","REGION=eu-west-1"],"labels":{{"app":"web","tier":"frontend"}},"resources":{{"cpus":0.5,"memory":268435456}},"restart":{{"condition":"any","delay_ms":5000,"max_attempts":0}},"placement":{{"constraints":["node.labels.zone==nowhere"]}},"networks":["frontend","backend"],"mounts":[]}},"version":{{"index":0}},"created_at":1764892800000,"updated_at":1764892800000,"annotations":{{"note":"{pad}"}}}}"#,
        digest = "ab".repeat(32),
        pad = "x".repeat(180),
    )
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass, which is zeroed and ours.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Round {
    mutations_per_s: f64,
    /// RPC request bytes per batched mutation (replication, re-sends included).
    rpc_bytes: f64,
    /// CPU time of the 3 stores per batched mutation.
    cpu_us: f64,
    p50: Duration,
    p99: Duration,
}

async fn round(
    dir: &std::path::Path,
    sealed: bool,
    tasks: usize,
    writes: usize,
) -> anyhow::Result<Round> {
    let (net, leader) = cluster(dir, sealed).await?;
    // Batched: entries of at most 512 KiB.
    let service = if sealed { "svc-sealed" } else { "svc-plain" };
    let mut batches = Vec::new();
    let mut batch = Batch::new();
    let mut bytes = 0;
    for slot in 0..tasks {
        let v = task_value(service, slot);
        bytes += v.len() + 24;
        batch.push(Op::upsert(Table::Tasks, format!("t{slot:020}"), v));
        if bytes >= 512 * 1024 - 2048 {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    let started = Instant::now();
    let cpu0 = cpu_time();
    let sent0 = net.sent.load(Ordering::Relaxed);
    for b in batches {
        leader
            .write(b)
            .await?
            .result
            .map_err(|f| anyhow::anyhow!("batch refused: {f}"))?;
    }
    let mutations_per_s = tasks as f64 / started.elapsed().as_secs_f64();
    // Let the followers finish applying, so their work is counted.
    let rev = leader.revision();
    let followers: Vec<Store> = net
        .nodes
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .values()
        .cloned()
        .collect();
    for f in &followers {
        while f.revision() < rev {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let cpu_us = (cpu_time() - cpu0).as_secs_f64() * 1e6 / tasks as f64;
    let rpc_bytes = (net.sent.load(Ordering::Relaxed) - sent0) as f64 / tasks as f64;
    // Commit latency: sequential single-op writes.
    let value = format!(r#"{{"spec":"{}"}}"#, "y".repeat(180));
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let t = Instant::now();
        leader
            .write(Batch::single(Op::upsert(
                Table::Nodes,
                format!("n{i}"),
                value.clone(),
            )))
            .await?
            .result
            .map_err(|f| anyhow::anyhow!("write refused: {f}"))?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let stores: Vec<Store> = net
        .nodes
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .drain()
        .map(|(_, s)| s)
        .collect();
    for s in stores {
        s.shutdown().await?;
    }
    Ok(Round {
        mutations_per_s,
        rpc_bytes,
        cpu_us,
        p50: pct(&lat, 50.0),
        p99: pct(&lat, 99.0),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let tasks: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let writes: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let only: Option<bool> = match args.get(4).map(String::as_str) {
        None => None,
        Some("plain") => Some(false),
        Some("sealed") => Some(true),
        Some(other) => anyhow::bail!("unknown kind {other:?}: expected plain or sealed"),
    };
    // On the disk of the current directory's temp dir (not a tmpfs: fsync must cost).
    let tmp = tempfile::tempdir()?;
    println!("machine: {}", machine());
    println!("dir: {}", tmp.path().display());
    let fs = fsync_anchor(tmp.path(), 500)?;
    println!(
        "anchor: 4 KiB O_DSYNC write p50 {:.3} ms, p99 {:.3} ms",
        ms(pct(&fs, 50.0)),
        ms(pct(&fs, 99.0))
    );
    println!(
        "{rounds} rounds each of plain and sealed, alternating; {tasks} task creations (~1 KB) in \
         entries of <= 512 KiB, then {writes} sequential one-op writes; 3 stores, fsync on"
    );
    let mut plain = Vec::new();
    let mut sealed = Vec::new();
    // (throughput, CPU) ratios sealed/plain of each pair of adjacent rounds (one of each kind).
    let mut pairs: Vec<(f64, f64)> = Vec::new();
    for r in 0..rounds * 2 {
        // Alternate which goes first in each pair.
        let is_sealed = only.unwrap_or((r % 2 == 1) ^ ((r / 2) % 2 == 1));
        settle(Duration::from_secs(10));
        let dir = tmp.path().join(format!("round{r}"));
        let res = round(&dir, is_sealed, tasks, writes).await?;
        println!(
            "  {:<6} batched {:>8.0} mutations/s ({:.0} us CPU each, {:.0} B of RPC each)   commit p50 {:.2} ms p99 {:.2} ms",
            if is_sealed { "sealed" } else { "plain" },
            res.mutations_per_s,
            res.cpu_us,
            res.rpc_bytes,
            ms(res.p50),
            ms(res.p99)
        );
        std::fs::remove_dir_all(&dir)?;
        if r % 2 == 1 && only.is_none() {
            let other = if is_sealed {
                plain.last()
            } else {
                sealed.last()
            };
            if let Some(o) = other {
                let (s, p) = if is_sealed { (&res, o) } else { (o, &res) };
                pairs.push((s.mutations_per_s / p.mutations_per_s, s.cpu_us / p.cpu_us));
            }
        }
        if is_sealed {
            sealed.push(res);
        } else {
            plain.push(res);
        }
    }
    if only.is_some() {
        return Ok(());
    }
    let m = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
    let (pm, sm) = (
        m(&plain, |r| r.mutations_per_s),
        m(&sealed, |r| r.mutations_per_s),
    );
    let (pc, sc) = (m(&plain, |r| r.cpu_us), m(&sealed, |r| r.cpu_us));
    let (pp50, sp50) = (m(&plain, |r| ms(r.p50)), m(&sealed, |r| ms(r.p50)));
    let (pp99, sp99) = (m(&plain, |r| ms(r.p99)), m(&sealed, |r| ms(r.p99)));
    println!("medians over {rounds} rounds:");
    println!("  plain : batched {pm:>8.0} mutations/s ({pc:.0} us CPU each)   commit p50 {pp50:.2} ms p99 {pp99:.2} ms");
    println!("  sealed: batched {sm:>8.0} mutations/s ({sc:.0} us CPU each)   commit p50 {sp50:.2} ms p99 {sp99:.2} ms");
    println!(
        "  sealed/plain: throughput {:.3}x ({:+.1} %), CPU per mutation {:.3}x ({:+.1} %), commit p50 {:.3}x ({:+.1} %); goal: <= 5 % slower",
        sm / pm,
        (sm / pm - 1.0) * 100.0,
        sc / pc,
        (sc / pc - 1.0) * 100.0,
        sp50 / pp50,
        (sp50 / pp50 - 1.0) * 100.0
    );
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.3}x ({lo:.3}-{hi:.3})", median(v.to_vec()))
    };
    let tp: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let cp: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    println!(
        "  sealed/plain per pair of adjacent rounds, median (range) over {} pairs: throughput {}, CPU per mutation {}",
        pairs.len(),
        range(&tp),
        range(&cp)
    );
    Ok(())
}
