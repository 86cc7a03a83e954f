//! Multi-node tests over an in-process transport that calls the peer's `Store::handle_rpc`
//! directly. Nodes can be killed (shut down) or cut off (unreachable both ways).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_store::{
    Batch, NodeId, Op, RaftRole, RaftStatus, RaftTransport, RpcKind, Store, StoreConfig,
    StoreError, Table, TransportError,
};
use tempfile::TempDir;
use tokio::time::Instant;

#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<NodeId, Store>>,
    cut: Mutex<HashSet<NodeId>>,
    /// Replies from this node to requests larger than the byte count arrive after the delay
    /// (a slow link or disk for big payloads).
    slow: Mutex<Option<(NodeId, usize, Duration)>>,
}

impl Net {
    fn store(&self, id: NodeId) -> Option<Store> {
        self.nodes.lock().expect("lock").get(&id).cloned()
    }

    fn is_cut(&self, id: NodeId) -> bool {
        self.cut.lock().expect("lock").contains(&id)
    }

    fn set_cut(&self, id: NodeId, cut: bool) {
        let mut c = self.cut.lock().expect("lock");
        if cut {
            c.insert(id);
        } else {
            c.remove(&id);
        }
    }
}

struct InProc {
    from: NodeId,
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
        Box::pin(async move {
            if self.net.is_cut(self.from) || self.net.is_cut(target) {
                return Err(TransportError::Unreachable(format!(
                    "node {target} is cut off"
                )));
            }
            let Some(store) = self.net.store(target) else {
                return Err(TransportError::Unreachable(format!(
                    "node {target} is down"
                )));
            };
            let slow = *self.net.slow.lock().expect("lock");
            let delay = match slow {
                Some((node, over, delay)) if node == target && body.len() > over => Some(delay),
                _ => None,
            };
            // Like an HTTP server, the callee finishes the request even if the caller gives up.
            let handler = tokio::spawn(async move { store.handle_rpc(rpc, &body).await });
            let reply = handler.await;
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            match reply {
                Ok(reply) => reply.map_err(|e| TransportError::Other(e.to_string())),
                Err(e) => Err(TransportError::Other(format!("handler failed: {e}"))),
            }
        })
    }
}

struct Cluster {
    net: Arc<Net>,
    dirs: HashMap<NodeId, TempDir>,
    write_timeout: Duration,
}

fn addr(id: NodeId) -> String {
    format!("inproc://node-{id}")
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            net: Arc::new(Net::default()),
            dirs: HashMap::new(),
            write_timeout: Duration::from_secs(2),
        }
    }

    fn cfg(&mut self, id: NodeId) -> StoreConfig {
        let dir = self
            .dirs
            .entry(id)
            .or_insert_with(|| tempfile::tempdir().expect("tempdir"));
        // Much roomier timeouts than production: the test machine is shared and can be very
        // busy (load averages of 20 on 2 cores were seen); spurious elections would make the
        // tests flaky without testing anything of ours.
        StoreConfig {
            node_id: id,
            data_dir: dir.path().to_path_buf(),
            heartbeat_ms: 250,
            election_min_ms: 1250,
            election_max_ms: 2500,
            write_timeout: self.write_timeout,
            membership_timeout: Duration::from_secs(30),
            ..Default::default()
        }
    }

    async fn start_with(&mut self, cfg: StoreConfig) -> Store {
        let id = cfg.node_id;
        let transport = Arc::new(InProc {
            from: id,
            net: self.net.clone(),
        });
        let store = Store::open(cfg, transport).await.expect("open");
        self.net
            .nodes
            .lock()
            .expect("lock")
            .insert(id, store.clone());
        store
    }

    async fn start(&mut self, id: NodeId) -> Store {
        let cfg = self.cfg(id);
        self.start_with(cfg).await
    }

    async fn kill(&self, id: NodeId) {
        let store = self.net.nodes.lock().expect("lock").remove(&id);
        if let Some(store) = store {
            store.shutdown().await.expect("shutdown");
        }
    }

    fn get(&self, id: NodeId) -> Store {
        self.net.store(id).expect("node running")
    }

    /// A 3-voter cluster: 1 initializes, 2 and 3 are added.
    async fn three(&mut self) -> Store {
        let s1 = self.start(1).await;
        self.start(2).await;
        self.start(3).await;
        s1.initialize(addr(1)).await.expect("initialize");
        s1.add_voter(2, addr(2)).await.expect("add 2");
        s1.add_voter(3, addr(3)).await.expect("add 3");
        s1
    }
}

/// Polls `f` until it returns `Some`, or panics after `secs`.
async fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn voter_ids(s: &RaftStatus) -> Vec<NodeId> {
    s.voters.iter().map(|(id, _)| *id).collect()
}

/// Writes on whichever node is leader, following ForwardToLeader, until `secs` pass.
async fn write_anywhere(
    cluster: &Cluster,
    ids: &[NodeId],
    batch: Batch,
    secs: u64,
) -> (NodeId, u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        for id in ids {
            let Some(store) = cluster.net.store(*id) else {
                continue;
            };
            match store.write(batch.clone()).await {
                Ok(out) => {
                    out.result.expect("preconditions");
                    return (*id, out.revision);
                }
                Err(StoreError::ForwardToLeader { .. }) | Err(StoreError::Timeout) => {}
                Err(e) => panic!("write on {id}: {e}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader accepted the write in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_three_nodes_replicate_and_fail_over() {
    let mut c = Cluster::new();
    let s1 = c.three().await;
    let status = s1.status();
    assert_eq!(status.state, RaftRole::Leader);
    assert_eq!(voter_ids(&status), vec![1, 2, 3]);

    let out = s1
        .write(Batch {
            ops: vec![
                Op::create(Table::Services, "web", r#"{"replicas":3}"#),
                Op::create(Table::Nodes, "n1", "{}"),
            ],
        })
        .await
        .expect("write");
    out.result.expect("ok");
    let rev = out.revision;
    assert!(s1.linearizable_barrier().await.expect("barrier") >= rev);

    // Replicated and applied everywhere, same versions.
    for id in [2, 3] {
        let s = c.get(id);
        eventually(10, "replication", || (s.revision() >= rev).then_some(())).await;
        let web = s
            .get(Table::Services, "web")
            .expect("get")
            .expect("replicated");
        assert_eq!(
            (web.version, web.value.as_slice()),
            (rev, br#"{"replicas":3}"#.as_slice())
        );
        // Followers forward writes and barriers to the leader.
        match s
            .write(Batch::single(Op::upsert(Table::Nodes, "x", "1")))
            .await
        {
            Err(StoreError::ForwardToLeader {
                leader_id: Some(1),
                leader_addr: Some(a),
            }) => assert_eq!(a, addr(1)),
            other => panic!("expected ForwardToLeader, got {other:?}"),
        }
        assert!(matches!(
            s.linearizable_barrier().await,
            Err(StoreError::ForwardToLeader { .. })
        ));
        // A follower knows when it last heard from the leader.
        let st = eventually(5, "follower contact", || {
            let st = s.status();
            st.peers.first().and_then(|p| p.last_contact_ms).map(|_| st)
        })
        .await;
        assert_eq!(
            (st.leader_id, st.peers.len(), st.peers[0].id),
            (Some(1), 1, 1)
        );
    }
    // The leader tracks contact with every other member.
    let st = eventually(5, "leader contact", || {
        let st = s1.status();
        st.peers
            .iter()
            .all(|p| p.last_contact_ms.is_some())
            .then_some(st)
    })
    .await;
    assert_eq!(
        st.peers.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![2, 3]
    );

    // Kill the leader: one of the others takes over and accepts writes.
    c.kill(1).await;
    let (leader, rev2) = write_anywhere(
        &c,
        &[2, 3],
        Batch::single(Op::update(Table::Services, "web", "v2", Some(rev))),
        15,
    )
    .await;
    assert!(rev2 > rev);
    let other = if leader == 2 { 3 } else { 2 };
    let s_other = c.get(other);
    eventually(10, "replication after failover", || {
        (s_other.revision() >= rev2).then_some(())
    })
    .await;
    assert_eq!(
        s_other
            .get(Table::Services, "web")
            .expect("get")
            .expect("web")
            .value,
        b"v2"
    );
    let st = c.get(leader).status();
    assert_eq!((st.state, st.leader_id), (RaftRole::Leader, Some(leader)));
    let dead = st
        .peers
        .iter()
        .find(|p| p.id == 1)
        .expect("node 1 still a member");
    assert!(dead.last_contact_ms.is_some_and(|ms| ms > 0) || dead.last_contact_ms.is_none());

    // The old leader restarts from disk and catches up (its files are released once every
    // handle to the old instance is gone).
    drop(s1);
    let s1 = c.start(1).await;
    eventually(15, "restarted node catches up", || {
        (s1.revision() >= rev2).then_some(())
    })
    .await;
    assert_eq!(
        s1.get(Table::Services, "web")
            .expect("get")
            .expect("web")
            .value,
        b"v2"
    );
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t45_write_without_quorum_times_out_within_deadline() {
    let mut c = Cluster::new();
    let s1 = c.three().await;
    s1.write(Batch::single(Op::upsert(Table::Cluster, "c", "1")))
        .await
        .expect("write")
        .result
        .expect("ok");

    c.net.set_cut(2, true);
    c.net.set_cut(3, true);
    let timeout = s1.config().write_timeout;
    let started = Instant::now();
    let res = s1
        .write(Batch::single(Op::upsert(Table::Cluster, "c", "2")))
        .await;
    let took = started.elapsed();
    assert!(
        matches!(res, Err(StoreError::Timeout)),
        "expected Timeout, got {res:?}"
    );
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(1),
        "took {took:?}"
    );

    // The leader does not step down in openraft 0.9, but its status shows the stale quorum.
    let st = s1.status();
    assert_eq!(st.state, RaftRole::Leader);
    assert!(st.quorum_ack_ms.is_some_and(|ms| ms >= 1000), "{st:?}");
    let started = Instant::now();
    let res = s1.linearizable_barrier().await;
    assert!(
        matches!(res, Err(StoreError::Timeout)),
        "expected Timeout, got {res:?}"
    );
    assert!(started.elapsed() < timeout + Duration::from_secs(1));

    // Heal: the cluster recovers and the value is the one last committed by someone.
    c.net.set_cut(2, false);
    c.net.set_cut(3, false);
    write_anywhere(
        &c,
        &[1, 2, 3],
        Batch::single(Op::upsert(Table::Cluster, "c", "3")),
        20,
    )
    .await;
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
}

/// A follower that missed several large batches catches up from the log: the leader ships them
/// in size-bounded AppendEntries requests (partial successes) within the RPC deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t47_lagging_follower_catches_up_with_large_batches() {
    let mut c = Cluster::new();
    c.write_timeout = Duration::from_secs(10);
    let s1 = c.three().await;
    c.net.set_cut(3, true);
    let value = format!(r#"{{"spec":"{}"}}"#, "y".repeat(200));
    let mut last = 0;
    for b in 0..8 {
        let ops = (0..1000)
            .map(|i| Op::upsert(Table::Tasks, format!("t{b}-{i}"), value.clone()))
            .collect();
        let out = s1.write(Batch { ops }).await.expect("write with 2 of 3 up");
        out.result.expect("ok");
        last = out.revision;
    }
    c.net.set_cut(3, false);
    let s3 = c.get(3);
    eventually(30, "node 3 catches up", || {
        (s3.revision() >= last).then_some(())
    })
    .await;
    assert_eq!(s3.list(Table::Tasks).expect("list").len(), 8000);
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
}

/// An entry whose AppendEntries reply takes longer than the RPC deadline (heartbeat) still
/// commits: the follower stored it, and the leader's next round probes for it instead of
/// re-sending it forever. Node 2 is cut off, so node 3's acknowledgement is needed for quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t48_entry_slower_than_the_rpc_deadline_still_commits() {
    let mut c = Cluster::new();
    c.write_timeout = Duration::from_secs(15);
    let s1 = c.three().await;
    c.net.set_cut(2, true);
    *c.net.slow.lock().expect("lock") = Some((3, 16 * 1024, Duration::from_millis(400)));
    let ops = (0..300)
        .map(|i| Op::upsert(Table::Tasks, format!("slow-{i}"), "x".repeat(200)))
        .collect();
    let out = s1
        .write(Batch { ops })
        .await
        .expect("commits despite slow replies");
    out.result.expect("ok");
    let s3 = c.get(3);
    eventually(10, "node 3 applies it", || {
        (s3.revision() >= out.revision).then_some(())
    })
    .await;
    *c.net.slow.lock().expect("lock") = None;
    c.net.set_cut(2, false);
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_add_voter_by_snapshot_then_remove_voter() {
    let mut c = Cluster::new();
    // Tiny snapshot interval and no kept logs: a joining node must receive a snapshot.
    let small = |mut cfg: StoreConfig| {
        cfg.snapshot_every = 10;
        cfg.logs_to_keep = 0;
        cfg
    };
    let cfg1 = small(c.cfg(1));
    let s1 = c.start_with(cfg1).await;
    s1.initialize(addr(1)).await.expect("initialize");
    for i in 0..30 {
        s1.write(Batch::single(Op::upsert(
            Table::Tasks,
            format!("t{i}"),
            format!("{i}"),
        )))
        .await
        .expect("write")
        .result
        .expect("ok");
    }
    let cfg2 = small(c.cfg(2));
    let s2 = c.start_with(cfg2).await;
    let mut w2 = s2.watch(0).expect("watch on the joining node");
    s1.add_voter(2, addr(2)).await.expect("add voter 2");
    assert_eq!(voter_ids(&s1.status()), vec![1, 2]);
    // Idempotent.
    s1.add_voter(2, addr(2)).await.expect("add again");

    let rev = s1.revision();
    eventually(10, "node 2 catches up", || {
        (s2.revision() >= rev).then_some(())
    })
    .await;
    assert_eq!(s2.list(Table::Tasks).expect("list").len(), 30);
    // The snapshot install reset node 2's watcher.
    match tokio::time::timeout(Duration::from_secs(5), w2.next())
        .await
        .expect("in time")
    {
        Some(Err(StoreError::Compacted { oldest })) => assert!(oldest > 0),
        other => panic!("expected Compacted after snapshot install, got {other:?}"),
    }
    assert_eq!(s2.status().voters, vec![(1, addr(1)), (2, addr(2))]);

    // A third node joins, then node 2 is removed.
    let s3 = c.start(3).await;
    s1.add_voter(3, addr(3)).await.expect("add voter 3");
    s1.remove_voter(2).await.expect("remove voter 2");
    let st = s1.status();
    assert_eq!(voter_ids(&st), vec![1, 3]);
    assert!(st.learners.is_empty());
    let (_, r) = write_anywhere(
        &c,
        &[1],
        Batch::single(Op::upsert(Table::Tasks, "after", "x")),
        5,
    )
    .await;
    eventually(10, "node 3 replicates", || {
        (s3.revision() >= r).then_some(())
    })
    .await;
    // Removing a non-member is a no-op; followers refuse membership changes.
    s1.remove_voter(42).await.expect("no-op");
    assert!(matches!(
        s3.add_voter(4, addr(4)).await,
        Err(StoreError::ForwardToLeader { .. })
    ));
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t55_force_new_cluster_recovers_the_data() {
    let mut c = Cluster::new();
    let s1 = c.three().await;
    let mut batch = Batch::new();
    for i in 0..50 {
        batch.push(Op::create(
            Table::Services,
            format!("svc{i}"),
            format!(r#"{{"n":{i}}}"#),
        ));
    }
    batch.push(Op::create(Table::Secrets, "s", vec![0xff, 0x00, 0x01]));
    let rev = s1.write(batch).await.expect("write").revision;
    let s3 = c.get(3);
    eventually(10, "replication", || (s3.revision() >= rev).then_some(())).await;
    let before: Vec<_> = Table::ALL
        .iter()
        .map(|t| s3.list(*t).expect("list"))
        .collect();

    // Lose every manager; recover from node 3's data dir alone.
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
    drop((s1, s3));
    let cfg3 = c.cfg(3);
    let transport = Arc::new(InProc {
        from: 3,
        net: c.net.clone(),
    });
    let s3 = Store::force_new_cluster(cfg3.clone(), transport, addr(3))
        .await
        .expect("force new cluster");
    c.net.nodes.lock().expect("lock").insert(3, s3.clone());
    let st = s3.status();
    assert_eq!((st.state, voter_ids(&st)), (RaftRole::Leader, vec![3]));
    for (t, objs) in Table::ALL.iter().zip(&before) {
        let now = s3.list(*t).expect("list");
        let values = |v: &Vec<flotilla_store::Versioned>| {
            v.iter()
                .map(|o| (o.id.clone(), o.value.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&now), values(objs), "table {t}");
    }
    // The old files are kept aside.
    let kept = std::fs::read_dir(&cfg3.data_dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(".pre-force-new-cluster-")
        })
        .count();
    assert_eq!(kept, 2);
    // The new cluster accepts writes and can grow again.
    s3.write(Batch::single(Op::update(
        Table::Services,
        "svc0",
        "new",
        None,
    )))
    .await
    .expect("write")
    .result
    .expect("ok");
    let mut fresh = Cluster {
        net: c.net.clone(),
        dirs: HashMap::new(),
        write_timeout: Duration::from_secs(2),
    };
    let s4 = fresh.start(4).await;
    s3.add_voter(4, addr(4)).await.expect("add voter 4");
    let r = s3.revision();
    eventually(10, "node 4 catches up", || {
        (s4.revision() >= r).then_some(())
    })
    .await;
    assert_eq!(s4.list(Table::Services).expect("list").len(), 50);
    s4.shutdown().await.expect("shutdown");
    s3.shutdown().await.expect("shutdown");
}

/// Writes `batches` entries of `per_batch` ~200-byte upserts, then `singles` one-op writes, on
/// `leader`; returns (mutations/s batched, writes/s unbatched).
async fn measure(leader: &Store, batches: usize, per_batch: usize, singles: usize) -> (f64, f64) {
    let value = format!(r#"{{"spec":"{}"}}"#, "x".repeat(180));
    let started = Instant::now();
    for b in 0..batches {
        let ops = (0..per_batch)
            .map(|i| Op::upsert(Table::Tasks, format!("task-{b}-{i}"), value.clone()))
            .collect();
        leader
            .write(Batch { ops })
            .await
            .expect("write")
            .result
            .expect("ok");
    }
    let batched = (batches * per_batch) as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..singles {
        let op = Op::upsert(Table::Nodes, format!("n{i}"), value.clone());
        leader
            .write(Batch::single(op))
            .await
            .expect("write")
            .result
            .expect("ok");
    }
    let single = singles as f64 / started.elapsed().as_secs_f64();
    assert_eq!(
        leader.list(Table::Tasks).expect("list").len(),
        batches * per_batch
    );
    (batched, single)
}

/// Measures batched vs unbatched write throughput on one node and on a 3-node cluster
/// (prints; no timing assertion). For meaningful numbers use a release build:
/// `cargo nextest run -p flotilla-store --release t60 --no-capture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_batch_throughput() {
    // Smaller in debug builds so the default test run stays quick.
    let (batches, per_batch, singles) = if cfg!(debug_assertions) {
        (10usize, 500usize, 50usize)
    } else {
        (20, 2000, 200)
    };
    let mut one = Cluster::new();
    let s1 = one.start(1).await;
    s1.initialize(addr(1)).await.expect("initialize");
    let (b1, u1) = measure(&s1, batches, per_batch, singles).await;
    s1.shutdown().await.expect("shutdown");

    let mut three = Cluster::new();
    three.write_timeout = Duration::from_secs(30);
    let leader = three.three().await;
    let (b3, u3) = measure(&leader, batches, per_batch, singles).await;
    for id in [1, 2, 3] {
        three.kill(id).await;
    }
    println!(
        "THROUGHPUT ({batches} entries x {per_batch} upserts of ~200 B, then {singles} single-op writes)\n  \
         1 node : batched {b1:>8.0} mutations/s, unbatched {u1:>6.0} writes/s\n  \
         3 nodes: batched {b3:>8.0} mutations/s, unbatched {u3:>6.0} writes/s"
    );
}

/// 32 random hex characters.
fn marker() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Files under `dir` holding `marker`, upper-cased or base64-encoded (standard or URL-safe, at
/// each byte alignment, without the edge characters that depend on neighbouring bytes).
fn files_with(dir: &std::path::Path, marker: &str) -> Vec<String> {
    use base64::Engine;
    let mut forms = vec![
        marker.as_bytes().to_vec(),
        marker.to_uppercase().into_bytes(),
    ];
    for pad in ["", "x", "xy"] {
        for engine in [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::URL_SAFE,
        ] {
            let enc = engine.encode(format!("{pad}{marker}"));
            forms.push(enc.as_bytes()[4..enc.len() - 4].to_vec());
        }
    }
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).expect("read file");
            for form in &forms {
                if bytes.windows(form.len()).any(|w| w == form.as_slice()) {
                    hits.push(format!(
                        "{} ({})",
                        path.display(),
                        String::from_utf8_lossy(form)
                    ));
                }
            }
        }
    }
    hits
}

/// Encryption at rest on a 3-manager cluster, each manager with its own keys: a random marker
/// written through the API is nowhere in any file of any data dir (log, state, events, the
/// snapshot built by the leader and the one installed on a joining node), in any encoding;
/// and every manager reads it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_at_rest_no_plaintext_in_any_file_of_any_manager() {
    let mut c = Cluster::new();
    let keyed = |mut cfg: StoreConfig| {
        cfg.snapshot_every = 10;
        cfg.logs_to_keep = 0;
        cfg.at_rest = Some(Arc::new(
            flotilla_secrets::Keyring::generate().expect("keyring"),
        ));
        cfg
    };
    let mark = marker();
    let cfg1 = keyed(c.cfg(1));
    let s1 = c.start_with(cfg1).await;
    let cfg2 = keyed(c.cfg(2));
    c.start_with(cfg2).await;
    s1.initialize(addr(1)).await.expect("initialize");
    s1.add_voter(2, addr(2)).await.expect("add 2");
    for i in 0..30 {
        let ops = vec![
            Op::upsert(
                Table::Secrets,
                format!("db-pass-{i}"),
                format!(r#"{{"data":"{mark}"}}"#),
            ),
            Op::upsert(
                Table::Services,
                format!("svc-{}", i % 4),
                format!(r#"{{"env":["PASSWORD={mark}"]}}"#),
            ),
        ];
        s1.write(Batch { ops })
            .await
            .expect("write")
            .result
            .expect("ok");
    }
    s1.write(Batch::single(Op::delete(Table::Secrets, "db-pass-0", None)))
        .await
        .expect("write")
        .result
        .expect("ok");
    // Node 3 joins after the log was purged: it receives (and stores) a snapshot.
    let cfg3 = keyed(c.cfg(3));
    let s3 = c.start_with(cfg3).await;
    s1.add_voter(3, addr(3)).await.expect("add 3");
    let rev = s1.revision();
    for id in [2, 3] {
        let s = c.get(id);
        eventually(20, "followers catch up", || {
            (s.revision() >= rev).then_some(())
        })
        .await;
    }
    let secrets = s3.list(Table::Secrets).expect("list on node 3");
    assert_eq!(secrets.len(), 29);
    assert!(String::from_utf8_lossy(&secrets[0].value).contains(&mark));
    assert_eq!(c.get(2).list(Table::Secrets).expect("list"), secrets);
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
    for id in [1, 2, 3] {
        let dir = c.dirs[&id].path();
        let names: Vec<String> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n == flotilla_store::STATE_FILE),
            "{names:?}"
        );
        let hits = files_with(dir, &mark);
        assert!(hits.is_empty(), "node {id}: plaintext on disk: {hits:?}");
    }
}
