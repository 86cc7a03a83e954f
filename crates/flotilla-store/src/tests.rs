//! Unit tests: the openraft storage suite and single-node behaviour.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use crate::at_rest::Sealer;
use crate::log_store::LogStore;
use crate::raft_types::{write_err, StorageError, TypeConfig};
use crate::state_machine::StateMachine;
use crate::*;

/// Builds the log store and state machine; with `keyed`, both seal every value at rest.
struct SuiteBuilder {
    keyed: bool,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SuiteBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(write_err)?;
        let log_db = redb::Database::create(dir.path().join(LOG_FILE)).map_err(write_err)?;
        let sm_db = redb::Database::create(dir.path().join(STATE_FILE)).map_err(write_err)?;
        let sealer = if self.keyed {
            Sealer::new(Some(keyring()))
        } else {
            Sealer::default()
        };
        let log = LogStore::new(Arc::new(log_db), sealer.clone())?;
        let sm = StateMachine::open(Arc::new(sm_db), 1000, sealer)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn t00_openraft_storage_suite() {
    Suite::test_all(SuiteBuilder { keyed: false }).expect("openraft storage suite");
}

#[test]
fn t01_openraft_storage_suite_sealed_at_rest() {
    Suite::test_all(SuiteBuilder { keyed: true }).expect("openraft storage suite, keyed");
}

fn keyring() -> Arc<flotilla_secrets::Keyring> {
    Arc::new(flotilla_secrets::Keyring::generate().expect("keyring"))
}

/// A transport for single-node stores: every peer is unreachable.
struct NoPeers;

impl RaftTransport for NoPeers {
    fn call(
        &self,
        target: NodeId,
        _addr: &str,
        _rpc: RpcKind,
        _body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send + '_>> {
        Box::pin(async move {
            Err(TransportError::Unreachable(format!(
                "no peer {target} in unit tests"
            )))
        })
    }
}

fn cfg(dir: &TempDir) -> StoreConfig {
    StoreConfig {
        node_id: 1,
        data_dir: dir.path().to_path_buf(),
        heartbeat_ms: 50,
        election_min_ms: 150,
        election_max_ms: 300,
        ..Default::default()
    }
}

async fn single(cfg: StoreConfig) -> Store {
    let store = Store::open(cfg, Arc::new(NoPeers)).await.expect("open");
    store.initialize("node-1".into()).await.expect("initialize");
    store
}

async fn ok_write(store: &Store, ops: Vec<Op>) -> u64 {
    let out = store.write(Batch { ops }).await.expect("write");
    out.result.expect("preconditions hold");
    out.revision
}

async fn next_event(w: &mut Watch) -> Result<Event, StoreError> {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("event in time")
        .expect("stream open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_batch_is_atomic_and_versions_are_log_indexes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = single(cfg(&dir)).await;
    assert!(store.is_initialized());

    let r1 = ok_write(
        &store,
        vec![
            Op::create(Table::Services, "a", "1"),
            Op::create(Table::Services, "b", "1"),
        ],
    )
    .await;
    let a = store
        .get(Table::Services, "a")
        .expect("get")
        .expect("a exists");
    assert_eq!(
        (a.version, a.created, a.value.as_slice()),
        (r1, r1, b"1".as_slice())
    );
    assert_eq!(store.revision(), r1);

    // The second op fails: nothing of the batch is applied, the first failing op is named.
    let out = store
        .write(Batch {
            ops: vec![
                Op::update(Table::Services, "a", "2", None),
                Op::create(Table::Services, "b", "x"),
            ],
        })
        .await
        .expect("write");
    let failure = out.result.expect_err("create of existing b must fail");
    assert_eq!(
        (failure.op_index, failure.table, failure.id.as_str()),
        (1, Table::Services, "b")
    );
    assert_eq!(failure.kind, FailureKind::AlreadyExists);
    assert_eq!(
        store
            .get(Table::Services, "a")
            .expect("get")
            .expect("a")
            .value,
        b"1"
    );
    assert!(
        out.revision > r1,
        "a rejected batch still consumes a log index"
    );

    // Version conflicts and not-found.
    let out = store
        .write(Batch::single(Op::update(
            Table::Services,
            "a",
            "2",
            Some(r1 + 100),
        )))
        .await
        .expect("write");
    assert_eq!(
        out.result.expect_err("conflict").kind,
        FailureKind::VersionConflict {
            current: r1,
            expected: r1 + 100
        }
    );
    let out = store
        .write(Batch::single(Op::delete(Table::Services, "nope", None)))
        .await
        .expect("write");
    assert_eq!(out.result.expect_err("absent").kind, FailureKind::NotFound);
    let out = store
        .write(Batch::single(Op::update(
            Table::Services,
            "nope",
            "1",
            None,
        )))
        .await
        .expect("write");
    assert_eq!(out.result.expect_err("absent").kind, FailureKind::NotFound);

    // A correct expected version succeeds; created is kept; ops see earlier ops of the batch.
    let r2 = ok_write(
        &store,
        vec![
            Op::update(Table::Services, "a", "2", Some(r1)),
            Op::create(Table::Tasks, "t", "new"),
            Op::update(Table::Tasks, "t", "newer", None),
            Op::delete(Table::Services, "b", Some(r1)),
            Op::upsert(Table::Nodes, "n", "up"),
        ],
    )
    .await;
    let a = store.get(Table::Services, "a").expect("get").expect("a");
    assert_eq!(
        (a.version, a.created, a.value.as_slice()),
        (r2, r1, b"2".as_slice())
    );
    let t = store.get(Table::Tasks, "t").expect("get").expect("t");
    assert_eq!(
        (t.version, t.created, t.value.as_slice()),
        (r2, r2, b"newer".as_slice())
    );
    assert!(store.get(Table::Services, "b").expect("get").is_none());
    let (rev, services) = store.list_at(Table::Services).expect("list");
    assert_eq!(rev, r2);
    assert_eq!(
        services.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        vec!["a"]
    );

    // Events of that batch, in op order, all at revision r2.
    let mut w = store.watch(r2 - 1).expect("watch");
    let kinds: Vec<(EventKind, String)> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            let e = next_event(&mut w).await.expect("event");
            assert_eq!(e.revision, r2);
            v.push((e.kind, e.id));
        }
        v
    };
    assert_eq!(
        kinds,
        vec![
            (EventKind::Updated, "a".into()),
            (EventKind::Created, "t".into()),
            (EventKind::Updated, "t".into()),
            (EventKind::Deleted, "b".into()),
            (EventKind::Created, "n".into()),
        ]
    );
    store.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_watch_replays_then_follows_live_and_reports_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = single(StoreConfig {
        event_retention: 10,
        ..cfg(&dir)
    })
    .await;
    let start = store.revision();

    let r1 = ok_write(&store, vec![Op::create(Table::Configs, "c1", "v1")]).await;
    let r2 = ok_write(&store, vec![Op::update(Table::Configs, "c1", "v2", None)]).await;

    // Replay from history...
    let mut w = store.watch(start).expect("watch");
    let e = next_event(&mut w).await.expect("replayed");
    assert_eq!(
        (e.revision, e.kind, e.value.as_deref()),
        (r1, EventKind::Created, Some(b"v1".as_slice()))
    );
    let e = next_event(&mut w).await.expect("replayed");
    assert_eq!(
        (e.revision, e.kind, e.version),
        (r2, EventKind::Updated, r2)
    );

    // ...then live.
    let writer = store.clone();
    let live = tokio::spawn(async move {
        ok_write(&writer, vec![Op::delete(Table::Configs, "c1", None)]).await
    });
    let e = next_event(&mut w).await.expect("live");
    let r3 = live.await.expect("join");
    assert_eq!(
        (e.revision, e.kind, e.value.as_deref(), e.version),
        (r3, EventKind::Deleted, Some(b"v2".as_slice()), r2)
    );

    // Push history past retention (10 kept + slack of 64) in a few big batches.
    for round in 0..4 {
        let ops = (0..30)
            .map(|i| Op::upsert(Table::Tasks, format!("t{round}-{i}"), "x"))
            .collect();
        ok_write(&store, ops).await;
    }
    let mut old = store.watch(start).expect("watch");
    match next_event(&mut old).await {
        Err(StoreError::Compacted { oldest }) => assert!(oldest > r3, "oldest {oldest}"),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(old.next().await.is_none(), "a compacted watch ends");

    // A watch from the current revision sees only new events.
    let now = store.revision();
    let mut fresh = store.watch(now).expect("watch");
    let r = ok_write(&store, vec![Op::create(Table::Secrets, "s", "x")]).await;
    let e = next_event(&mut fresh).await.expect("live");
    assert_eq!(
        (e.revision, e.table, e.id.as_str()),
        (r, Table::Secrets, "s")
    );

    // The earlier live watcher kept up and continues too.
    let mut seen = 0;
    loop {
        let e = next_event(&mut w).await.expect("continues");
        seen += 1;
        if e.revision == r {
            break;
        }
    }
    assert_eq!(seen, 4 * 30 + 1);
    store.shutdown().await.expect("shutdown");
}

/// Replay reads history in pages (whole revisions only) and hands over to the live feed
/// without gaps or duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_long_replay_is_paged_without_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = single(cfg(&dir)).await;
    let start = store.revision();
    for b in 0..3 {
        let ops = (0..700)
            .map(|i| Op::upsert(Table::Tasks, format!("t{b}-{i:03}"), "x"))
            .collect();
        ok_write(&store, ops).await;
    }
    let mut w = store.watch(start).expect("watch");
    let writer = store.clone();
    let live = tokio::spawn(async move {
        ok_write(&writer, vec![Op::create(Table::Tasks, "live", "x")]).await
    });
    let mut ids = Vec::new();
    while ids.len() < 3 * 700 + 1 {
        ids.push(next_event(&mut w).await.expect("event").id);
    }
    live.await.expect("join");
    let mut expected: Vec<String> = (0..3)
        .flat_map(|b| (0..700).map(move |i| format!("t{b}-{i:03}")))
        .collect();
    expected.push("live".into());
    assert_eq!(ids, expected);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_restart_from_disk_keeps_state_revision_and_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Small snapshot interval so the restart also crosses a snapshot + log purge.
    let config = StoreConfig {
        snapshot_every: 5,
        logs_to_keep: 2,
        ..cfg(&dir)
    };
    let store = single(config.clone()).await;
    let first = ok_write(&store, vec![Op::create(Table::Nodes, "n0", "0")]).await;
    for i in 1..12 {
        ok_write(
            &store,
            vec![Op::upsert(Table::Nodes, format!("n{i}"), i.to_string())],
        )
        .await;
    }
    let last = ok_write(
        &store,
        vec![Op::update(Table::Nodes, "n0", "changed", Some(first))],
    )
    .await;
    let before = store.list(Table::Nodes).expect("list");
    let status = store.status();
    assert_eq!(status.state, crate::RaftRole::Leader);
    assert_eq!(status.voters, vec![(1, "node-1".to_string())]);
    assert!(
        status.applied >= last && status.committed >= last,
        "{status:?}"
    );
    store.shutdown().await.expect("shutdown");
    assert_eq!(store.status().state, crate::RaftRole::Shutdown);
    drop(store);

    let store = Store::open(config, Arc::new(NoPeers))
        .await
        .expect("reopen");
    assert!(store.is_initialized());
    assert!(
        store.revision() >= last,
        "revision went backwards: {} < {last}",
        store.revision()
    );
    assert_eq!(store.list(Table::Nodes).expect("list"), before);
    // Event history survived the restart.
    let mut w = store.watch(first - 1).expect("watch");
    let e = next_event(&mut w).await.expect("history");
    assert_eq!((e.revision, e.id.as_str()), (first, "n0"));
    // The single voter elects itself again and accepts writes at higher revisions.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        match store
            .write(Batch::single(Op::upsert(Table::Cluster, "c", "1")))
            .await
        {
            Ok(out) => break out.revision,
            Err(StoreError::ForwardToLeader { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("write after restart: {e}"),
        }
    };
    assert!(r > last);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t35_uninitialized_node_forwards_and_config_is_validated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(cfg(&dir), Arc::new(NoPeers))
        .await
        .expect("open");
    assert!(!store.is_initialized());
    match store
        .write(Batch::single(Op::upsert(Table::Nodes, "n", "x")))
        .await
    {
        Err(StoreError::ForwardToLeader {
            leader_id: None,
            leader_addr: None,
        }) => {}
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    match store.linearizable_barrier().await {
        Err(StoreError::ForwardToLeader { .. }) => {}
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    let status = store.status();
    assert_eq!((status.leader_id, status.applied), (None, 0));
    store.shutdown().await.expect("shutdown");

    let bad = StoreConfig {
        election_max_ms: 100,
        ..cfg(&dir)
    };
    match Store::open(bad, Arc::new(NoPeers)).await {
        Err(StoreError::InvalidConfig(msg)) => assert!(msg.contains("election"), "{msg}"),
        Err(e) => panic!("expected InvalidConfig, got {e}"),
        Ok(_) => panic!("expected InvalidConfig"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t36_oversized_batch_is_refused_before_raft() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = single(StoreConfig {
        max_batch_bytes: 4096,
        ..cfg(&dir)
    })
    .await;
    let before = store.revision();
    let big = Batch::single(Op::upsert(Table::Images, "i", vec![b'x'; 8192]));
    match store.write(big).await {
        Err(StoreError::InvalidArgument(msg)) => assert!(msg.contains("max_batch_bytes"), "{msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_eq!(store.revision(), before, "nothing was proposed");
    store.shutdown().await.expect("shutdown");
}

#[test]
fn t37_append_requests_are_split_by_size() {
    use crate::network::entries_within;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};
    let entry = |index: u64, bytes: usize| crate::raft_types::Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Batch::single(Op::upsert(
            Table::Tasks,
            "t",
            vec![b'v'; bytes],
        ))),
    };
    let entries: Vec<_> = (1..=10).map(|i| entry(i, 300 * 1024)).collect();
    assert_eq!(entries_within(&entries, 1024 * 1024), 3);
    // A single oversized entry is still sent alone.
    assert_eq!(entries_within(&[entry(1, 4 * 1024 * 1024)], 1024 * 1024), 1);
    assert_eq!(entries_within(&entries[..2], 1024 * 1024), 2);
    assert_eq!(entries_within(&[], 1024 * 1024), 0);
}

/// Applies are not fsynced: after a crash the state machine can be behind the committed index.
/// Opening the store must re-apply the committed log before serving reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t32_open_reapplies_committed_entries_missing_from_the_state_machine() {
    use openraft::storage::RaftLogStorage;
    use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership, Vote};
    use std::collections::{BTreeMap, BTreeSet};

    let dir = tempfile::tempdir().expect("tempdir");
    {
        // What a node leaves behind if it crashed after committing entries 1..=3 but before
        // any apply became durable: the log and committed id are on disk, the state is empty.
        let log_db = redb::Database::create(dir.path().join(LOG_FILE)).expect("log db");
        let mut log = LogStore::new(Arc::new(log_db), Sealer::default()).expect("log store");
        let membership = Membership::new(
            vec![BTreeSet::from([1])],
            BTreeMap::from([(1, BasicNode::new("node-1"))]),
        );
        let lid = |term, index| {
            LogId::new(
                CommittedLeaderId::new(term, if term == 0 { 0 } else { 1 }),
                index,
            )
        };
        let mut entries = vec![crate::raft_types::Entry {
            log_id: lid(0, 0),
            payload: EntryPayload::Membership(membership),
        }];
        entries.push(crate::raft_types::Entry {
            log_id: lid(1, 1),
            payload: EntryPayload::Blank,
        });
        for i in 2..=3u64 {
            entries.push(crate::raft_types::Entry {
                log_id: lid(1, i),
                payload: EntryPayload::Normal(Batch::single(Op::upsert(
                    Table::Volumes,
                    format!("v{i}"),
                    "data",
                ))),
            });
        }
        log.append_for_test(&entries).expect("append");
        log.save_vote(&Vote::new_committed(1, 1))
            .await
            .expect("vote");
        log.save_committed(Some(lid(1, 3)))
            .await
            .expect("committed");
    }
    let store = Store::open(cfg(&dir), Arc::new(NoPeers))
        .await
        .expect("open");
    assert!(store.is_initialized());
    assert!(store.revision() >= 3, "revision {}", store.revision());
    let v3 = store
        .get(Table::Volumes, "v3")
        .expect("get")
        .expect("re-applied");
    assert_eq!((v3.version, v3.created), (3, 3));
    assert_eq!(store.list(Table::Volumes).expect("list").len(), 2);
    // Events were regenerated by the re-apply.
    let mut w = store.watch(0).expect("watch");
    assert_eq!(next_event(&mut w).await.expect("event").id, "v2");
    store.shutdown().await.expect("shutdown");
}

/// The daemon holds stores across tasks and awaits these futures in axum handlers.
#[allow(dead_code)]
fn public_types_and_futures_are_send() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Store>();
    send_sync::<StoreError>();
    fn futures(s: Store, mut w: Watch) {
        send(&s.write(Batch::new()));
        send(&s.linearizable_barrier());
        send(&s.handle_rpc(RpcKind::Vote, &[]));
        send(&s.add_voter(2, String::new()));
        send(&s.remove_voter(2));
        send(&s.initialize(String::new()));
        send(&s.shutdown());
        send(&w.next());
        send(&Store::open(StoreConfig::default(), Arc::new(NoPeers)));
        send(&Store::force_new_cluster(
            StoreConfig::default(),
            Arc::new(NoPeers),
            String::new(),
        ));
    }
    let _ = futures;
}

/// 32 random hex characters.
fn marker() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a leak of `marker` could look like on disk: itself, upper-cased, and its base64 (standard
/// and URL-safe) at each of the three byte alignments, without the edge characters that depend
/// on the neighbouring bytes.
fn leak_forms(marker: &str) -> Vec<Vec<u8>> {
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
    forms
}

/// Every file under `dir` (recursively) holding a leak form of `marker`.
fn files_with(dir: &std::path::Path, marker: &str) -> Vec<String> {
    let forms = leak_forms(marker);
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

/// Writes `rounds` batches holding `marker` in values (objects, then updates and a delete so
/// events carry it too), with `snapshot_every: 5` so snapshots are built and the log purged.
async fn write_marked(store: &Store, marker: &str, rounds: usize) {
    for i in 0..rounds {
        ok_write(
            store,
            vec![
                Op::upsert(
                    Table::Secrets,
                    format!("s{i}"),
                    format!(r#"{{"data":"{marker}"}}"#),
                ),
                Op::upsert(
                    Table::Services,
                    format!("svc{}", i % 3),
                    format!("env={marker}"),
                ),
            ],
        )
        .await;
    }
    ok_write(store, vec![Op::delete(Table::Secrets, "s0", None)]).await;
}

fn keyed_cfg(dir: &TempDir, keys: &Arc<flotilla_secrets::Keyring>) -> StoreConfig {
    StoreConfig {
        snapshot_every: 5,
        logs_to_keep: 2,
        at_rest: Some(keys.clone()),
        ..cfg(dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_keyed_store_leaves_no_plaintext_and_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keyring();
    let mark = marker();
    let store = single(keyed_cfg(&dir, &keys)).await;
    write_marked(&store, &mark, 20).await;
    let before = store.list(Table::Secrets).expect("list");
    assert_eq!(before.len(), 19);
    assert!(String::from_utf8_lossy(&before[0].value).contains(&mark));
    store.shutdown().await.expect("shutdown");
    drop(store);
    let hits = files_with(dir.path(), &mark);
    assert!(hits.is_empty(), "plaintext on disk: {hits:?}");

    // Reopened with the same keys: same state, history readable.
    let store = Store::open(keyed_cfg(&dir, &keys), Arc::new(NoPeers))
        .await
        .expect("reopen");
    assert_eq!(store.list(Table::Secrets).expect("list"), before);
    // The event history (sealed too) replays from disk.
    let first = next_event(&mut store.watch(0).expect("watch"))
        .await
        .expect("history");
    assert_eq!(first.id, "s0");
    assert!(String::from_utf8_lossy(first.value.as_deref().unwrap_or_default()).contains(&mark));
    store.shutdown().await.expect("shutdown");
    drop(store);

    // Other keys, or none: refused with a clear error rather than garbage.
    for (at_rest, want) in [
        (Some(keyring()), "failed authentication"),
        (None, "encrypted at rest"),
    ] {
        let config = StoreConfig {
            at_rest,
            ..keyed_cfg(&dir, &keys)
        };
        let err = match Store::open(config, Arc::new(NoPeers)).await {
            Err(e) => e.to_string(),
            Ok(store) => {
                let e = store
                    .list(Table::Secrets)
                    .expect_err("sealed values need the keys")
                    .to_string();
                store.shutdown().await.expect("shutdown");
                e
            }
        };
        assert!(err.contains(want), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t81_plain_store_is_sealed_in_place_when_keys_arrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = marker();
    let plain_cfg = StoreConfig {
        snapshot_every: 5,
        logs_to_keep: 2,
        ..cfg(&dir)
    };
    let store = single(plain_cfg).await;
    write_marked(&store, &mark, 12).await;
    let before = store.list(Table::Secrets).expect("list");
    let services = store.list(Table::Services).expect("list");
    store.shutdown().await.expect("shutdown");
    drop(store);
    assert!(
        !files_with(dir.path(), &mark).is_empty(),
        "the plain store should hold the marker (else this test proves nothing)"
    );

    let keys = keyring();
    let store = Store::open(keyed_cfg(&dir, &keys), Arc::new(NoPeers))
        .await
        .expect("open with keys");
    let hits = files_with(dir.path(), &mark);
    assert!(
        hits.is_empty(),
        "plaintext left after the upgrade: {hits:?}"
    );
    assert_eq!(store.list(Table::Secrets).expect("list"), before);
    assert_eq!(store.list(Table::Services).expect("list"), services);
    // Still a working store: it elects itself and takes writes, sealed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store
            .write(Batch::single(Op::upsert(Table::Configs, "c", mark.clone())))
            .await
        {
            Ok(out) => {
                out.result.expect("ok");
                break;
            }
            Err(StoreError::ForwardToLeader { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("write after upgrade: {e}"),
        }
    }
    store.shutdown().await.expect("shutdown");
    drop(store);
    let hits = files_with(dir.path(), &mark);
    assert!(hits.is_empty(), "plaintext after more writes: {hits:?}");
    // No upgrade leftovers.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".sealing")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t82_values_swapped_on_disk_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keyring();
    let store = single(keyed_cfg(&dir, &keys)).await;
    ok_write(
        &store,
        vec![
            Op::create(Table::Secrets, "a", "value of a"),
            Op::create(Table::Secrets, "b", "value of b"),
        ],
    )
    .await;
    store.shutdown().await.expect("shutdown");
    drop(store);
    {
        // An attacker with the disk (not the keys) swaps the two sealed values.
        use redb::ReadableDatabase;
        let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("secrets");
        let db = redb::Database::create(dir.path().join(STATE_FILE)).expect("open");
        let (a, b) = {
            let txn = db.begin_read().expect("read");
            let t = txn.open_table(def).expect("table");
            let get = |k: &str| t.get(k).expect("get").expect("present").value().to_vec();
            (get("a"), get("b"))
        };
        let txn = db.begin_write().expect("write");
        {
            let mut t = txn.open_table(def).expect("table");
            t.insert("a", b.as_slice()).expect("insert");
            t.insert("b", a.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let store = Store::open(keyed_cfg(&dir, &keys), Arc::new(NoPeers))
        .await
        .expect("reopen");
    let err = store.get(Table::Secrets, "a").expect_err("swapped value");
    assert!(err.to_string().contains("secrets/a"), "{err}");
    assert!(store.list(Table::Secrets).is_err());
    store.shutdown().await.expect("shutdown");
}
