//! `flotilla node run`: start-up for each mode, then serve until SIGTERM/SIGINT.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use flotilla_agent::{AgentConfig, AgentCtx};
use flotilla_api::TlsState;
use flotilla_manager::transport::HttpRaftTransport;
use flotilla_manager::{ClusterObject, Manager, ManagerConfig, CLUSTER_KEY};
use flotilla_pki::{Ca, JoinToken, Role};
use flotilla_store::{raft_id_for, Batch, Op, Store, StoreConfig, Table};
use flotilla_types::{
    now_ms, Availability, ManagerStatus, Meta, Node, NodeRole, NodeSpec, NodeState, NodeStatus,
};

use crate::disk::{
    prepare_data_dir, read_identity, set_traversal_mode, write_atomic, write_identity, MappedRoot,
    NodeIdentity, Paths,
};
use crate::{autolock, joining, routes, NodeConfig, NodeCtx, NodeError, StartMode};

const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
const ADMIN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
use flotilla_registry::{SIGNING_KEY_FILE, SIGNING_PUB_FILE};

fn default_name() -> String {
    flotilla_agent::heartbeat::hostname()
        .filter(|s| flotilla_types::validate_name(s).is_ok())
        .unwrap_or_else(|| "node".into())
}

/// Creates the cluster's root CA, the first manager's identity and the admin bundle.
fn init_cluster(
    cfg: &NodeConfig,
    paths: &Paths,
) -> Result<(NodeIdentity, ClusterObject), NodeError> {
    let cluster_id = flotilla_types::new_id();
    let node_id = flotilla_types::new_id();
    let ca =
        Ca::generate(&cluster_id, CA_LIFETIME).map_err(NodeError::pki("making the cluster CA"))?;
    let (cert, key) = ca
        .issue(&cluster_id, &node_id, Role::Manager, cfg.cert_lifetime)
        .map_err(NodeError::pki("issuing the first manager's certificate"))?;
    write_atomic(&paths.ca_cert(), ca.cert_pem().as_bytes(), 0o644)
        .map_err(NodeError::io("writing CA"))?;
    write_atomic(&paths.node_cert(), cert.as_bytes(), 0o644)
        .map_err(NodeError::io("writing cert"))?;
    write_atomic(&paths.node_key(), key.as_bytes(), 0o600).map_err(NodeError::io("writing key"))?;
    let (acert, akey) = ca
        .issue(
            &cluster_id,
            &format!("admin-{}", &node_id[..8]),
            Role::Admin,
            ADMIN_LIFETIME,
        )
        .map_err(NodeError::pki("issuing the admin certificate"))?;
    let admin = paths.admin();
    write_atomic(&admin.join("ca.pem"), ca.cert_pem().as_bytes(), 0o644)
        .map_err(NodeError::io("admin bundle"))?;
    write_atomic(&admin.join("cert.pem"), acert.as_bytes(), 0o644)
        .map_err(NodeError::io("admin bundle"))?;
    write_atomic(&admin.join("key.pem"), akey.as_bytes(), 0o600)
        .map_err(NodeError::io("admin bundle"))?;
    // The admin's image signing key; the cluster trusts it from the start.
    let signing = flotilla_registry::SigningKey::generate()?;
    write_atomic(
        &admin.join(SIGNING_KEY_FILE),
        signing.to_pem().as_bytes(),
        0o600,
    )
    .map_err(NodeError::io("admin bundle"))?;
    write_atomic(
        &admin.join(SIGNING_PUB_FILE),
        signing.public_key_pem().as_bytes(),
        0o644,
    )
    .map_err(NodeError::io("admin bundle"))?;
    let fp = ca.fingerprint();
    let cluster = ClusterObject {
        cluster_id: cluster_id.clone(),
        ca_cert_pem: ca.cert_pem().to_string(),
        ca_key_pem: ca.key_pem().to_string(),
        worker_secret: JoinToken::new(&fp).secret,
        manager_secret: JoinToken::new(&fp).secret,
        cert_lifetime_secs: cfg.cert_lifetime.as_secs(),
        created_at: now_ms(),
        network: cfg.network.clone(),
        trust: flotilla_types::TrustPolicy {
            keys: vec![signing.trusted_key()],
            enforce: true,
        },
        bind_allow: Vec::new(),
        unlock_key: None,
        tunnel_keys: Vec::new(),
    };
    let identity = NodeIdentity {
        cluster_id,
        node_id: node_id.clone(),
        name: cfg.name.clone().unwrap_or_else(default_name),
        role: NodeRole::Manager,
        raft_id: raft_id_for(&node_id),
        addr: cfg.advertise_addr(),
        managers: vec![cfg.advertise_addr()],
    };
    Ok((identity, cluster))
}

fn first_node(identity: &NodeIdentity, description: flotilla_types::NodeDescription) -> Node {
    let now = now_ms();
    Node {
        id: identity.node_id.clone(),
        meta: Meta {
            version: 0,
            created_at: now,
            updated_at: now,
        },
        spec: NodeSpec {
            name: identity.name.clone(),
            role: NodeRole::Manager,
            availability: Availability::Active,
            labels: Default::default(),
        },
        description,
        status: NodeStatus {
            state: NodeState::Ready,
            message: String::new(),
            addr: identity.addr.clone(),
            last_heartbeat: now,
        },
        manager_status: Some(ManagerStatus {
            raft_id: identity.raft_id,
            addr: identity.addr.clone(),
            leader: true,
            reachability: "reachable".into(),
        }),
        network: None,
    }
}

async fn wait_leader(store: &Store, within: Duration) -> Result<(), NodeError> {
    let deadline = tokio::time::Instant::now() + within;
    while !store.status().is_leader() {
        if tokio::time::Instant::now() > deadline {
            return Err(NodeError::Config(
                "this node did not become leader after bootstrap".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Size bound of the node's state tmpfs (`DATA_DIR/run`); it holds a few KiB per container.
const RUN_TMPFS_MIB: u64 = 256;

/// Mounts the node's state tmpfs, unless it is mounted already (the node restarted while its
/// containers ran on). Bundles, shim state, runc's root and network namespaces live there: a
/// container start creates about twenty files, and on a disk file system (ext4 without a
/// journal above all) allocating inodes right after a teardown freed thousands is a large part
/// of a start. Without it (mount refused) the same files go to the data dir's file system.
/// Returns whether it mounted one.
fn mount_run_dir(paths: &Paths) -> bool {
    match flotilla_runtime::overlay::ensure_tmpfs(&paths.run(), RUN_TMPFS_MIB) {
        Ok(true) => {
            tracing::debug!(dir = %paths.run().display(), "mounted the node's state tmpfs");
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(error = %e, "no tmpfs for the node's state; using the data dir's file system");
            false
        }
    }
}

/// Unmounts the node's state tmpfs and removes its mount point (`node cleanup`, after the
/// containers and namespaces that used it are gone).
fn unmount_run_dir(data_dir: &std::path::Path) -> Result<(), NodeError> {
    let run = Paths::new(data_dir).run();
    for m in flotilla_runtime::overlay::mounted_among(std::slice::from_ref(&run)) {
        flotilla_runtime::overlay::unmount(&m)?;
    }
    match std::fs::remove_dir_all(&run) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::io(format!("remove {}", run.display()))(e)),
    }
}

/// The host ids container root maps to on this node (`None` without user namespaces).
fn mapped_root(cfg: &NodeConfig) -> Result<Option<MappedRoot>, NodeError> {
    Ok(runtime_config(cfg)?.userns.map(|r| MappedRoot {
        uid: r.shift(0),
        gid: r.shift(0),
    }))
}

/// Opens the node's container runtime under DATA_DIR/runtime; a missing host requirement is a
/// start-up error that names the fix.
fn open_runtime(cfg: &NodeConfig) -> Result<flotilla_runtime::Runtime, NodeError> {
    flotilla_runtime::Runtime::new(runtime_config(cfg)?)
        .map_err(|e| NodeError::Config(format!("container runtime: {e}")))
}

/// The node's runtime configuration: lasting state in DATA_DIR/runtime, the rest on the
/// state tmpfs.
fn runtime_config(cfg: &NodeConfig) -> Result<flotilla_runtime::RuntimeConfig, NodeError> {
    let exe = std::env::current_exe().map_err(NodeError::io("locating the flotilla binary"))?;
    // Each container's shim: the small `flotilla-shim` installed beside this binary, else this
    // binary in shim mode (same code; about 1.4 MB more resident memory per container).
    let small = exe.with_file_name("flotilla-shim");
    let (shim_exe, shim_args) = if small.is_file() {
        (small, vec![])
    } else {
        (exe, vec!["shim".into()])
    };
    let mut rc =
        flotilla_runtime::RuntimeConfig::new(cfg.data_dir.join("runtime"), shim_exe, shim_args);
    rc.state = Paths::new(&cfg.data_dir).run().join("runtime");
    if let Some(bin) = &cfg.runtime_bin {
        rc.runtime_bin = bin.clone();
    }
    Ok(rc)
}

/// `flotilla node cleanup`: stops and removes every container this node's runtime holds
/// (for a node that left the cluster, or before deleting its data directory). Refuses while
/// the node daemon runs.
pub async fn cleanup(data_dir: &std::path::Path) -> Result<usize, NodeError> {
    let sock = Paths::new(data_dir).socket();
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        return Err(NodeError::Config(format!(
            "the node daemon for {} is running: stop it first (it would restart the containers)",
            data_dir.display()
        )));
    }
    // Containers first (they hold the namespaces), then the node's network objects.
    let removed = cleanup_containers(data_dir).await?;
    if let Ok(Some(id)) = crate::disk::read_identity(&Paths::new(data_dir)) {
        match flotilla_agent::net::cleanup(data_dir, &id.node_id).await {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(removed = gone.len(), "removed the node's network objects")
            }
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Size-limited volumes' file systems (their data stays in the images).
    let volumes = data_dir.join("volumes");
    match flotilla_volume::unmount_all(&volumes) {
        Ok(gone) if !gone.is_empty() => {
            tracing::info!(
                unmounted = gone.len(),
                "unmounted the volumes' file systems"
            )
        }
        Ok(_) => {}
        Err(e) => {
            return Err(NodeError::Config(format!(
                "volumes under {}: {e}",
                volumes.display()
            )))
        }
    }
    unmount_run_dir(data_dir)?;
    Ok(removed)
}

/// What [`cleanup`] would remove: containers (`container <id>`) and network objects.
pub async fn leftovers(data_dir: &std::path::Path) -> Result<Vec<String>, NodeError> {
    let mut out = Vec::new();
    if data_dir.join("runtime").exists() {
        let cfg = NodeConfig::new(
            data_dir.to_path_buf(),
            std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
            StartMode::Resume,
        );
        let rt = open_runtime(&cfg)?;
        let containers = flotilla_runtime::RuntimeDriver::list(&rt).await?;
        out.extend(
            containers
                .into_iter()
                .map(|c| format!("container {}", c.id)),
        );
        // Shim processes (those of the containers above too) and what no record names.
        out.extend(rt.strays()?);
    }
    if let Ok(Some(id)) = crate::disk::read_identity(&Paths::new(data_dir)) {
        let net = flotilla_agent::net::leftovers(data_dir, &id.node_id).await?;
        out.extend(net);
    }
    let run = Paths::new(data_dir).run();
    for m in flotilla_runtime::overlay::mounted_among(std::slice::from_ref(&run)) {
        out.push(format!("mount {}", m.display()));
    }
    for m in flotilla_volume::mounted(&data_dir.join("volumes")) {
        out.push(format!("mount {}", m.display()));
    }
    Ok(out)
}

async fn cleanup_containers(data_dir: &std::path::Path) -> Result<usize, NodeError> {
    if !data_dir.join("runtime").exists() {
        return Ok(0);
    }
    let mut cfg = NodeConfig::new(
        data_dir.to_path_buf(),
        "127.0.0.1:1"
            .parse()
            .map_err(|_| NodeError::Config("addr".into()))?,
        StartMode::Resume,
    );
    cfg.runtime_bin = None;
    let rt = open_runtime(&cfg)?;
    let containers = flotilla_runtime::RuntimeDriver::list(&rt).await?;
    let mut removed = 0;
    for c in containers {
        match flotilla_runtime::RuntimeDriver::remove(&rt, &c.id, false).await {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(container = %c.id, error = %e, "removing container failed"),
        }
    }
    // Then what the records do not name: a shim whose agent was killed while it was still
    // inside `runc create` (no socket yet when its container was removed above), the standby,
    // the OCI runtime's containers without a record, creates that never finished.
    // A failure here is reported like a container's, and the rest of the cleanup still runs.
    match rt.remove_strays().await {
        Ok(strays) if !strays.is_empty() => {
            tracing::info!(removed = ?strays, "removed what no container record names")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "removing shims or containers no record names failed")
        }
    }
    Ok(removed)
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Shut down on request.
    Stopped,
    /// The node's role changed: call [`run`] again (mode [`StartMode::Resume`]).
    RoleChanged,
}

/// Runs a node until `shutdown` resolves (the binary passes SIGTERM/SIGINT).
pub async fn run(
    cfg: NodeConfig,
    engine: std::collections::BTreeMap<String, serde_json::Value>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<RunOutcome, NodeError> {
    cfg.validate()?;
    raise_nofile_limit();
    let paths = Paths::new(&cfg.data_dir);
    // Before anything is written: the data dir is this user's alone, and the containers'
    // (user-namespaced) root can reach it.
    let mapped = mapped_root(&cfg)?;
    prepare_data_dir(&cfg.data_dir, mapped)?;
    let mounted = mount_run_dir(&paths);
    let res = match set_traversal_mode(&paths.run(), mapped) {
        Ok(()) => run_node(cfg, engine, shutdown).await,
        Err(e) => Err(NodeError::io(format!(
            "setting the mode of {}",
            paths.run().display()
        ))(e)),
    };
    if res.is_err() && mounted && run_dir_unused(&paths) {
        // A start that failed (a refused join, a taken port) leaves no mount behind.
        if let Err(e) = unmount_run_dir(&paths.dir) {
            tracing::warn!(error = %e, "cannot unmount the node's state tmpfs");
        }
    }
    res
}

/// Whether the state tmpfs holds no container or network namespace.
fn run_dir_unused(paths: &Paths) -> bool {
    let empty =
        |p: std::path::PathBuf| std::fs::read_dir(p).map_or(true, |mut d| d.next().is_none());
    empty(paths.run().join("runtime/containers")) && empty(paths.run().join("net/netns"))
}

/// Who this node is, by start mode: a new cluster's first manager (with the cluster object to
/// seed), a node that just joined (a manager also asks to become a voter), or the identity in
/// the data directory.
struct Started {
    identity: NodeIdentity,
    bootstrap: Option<ClusterObject>,
    register_voter: bool,
}

async fn resolve_identity(
    cfg: &NodeConfig,
    paths: &Paths,
    existing: Option<NodeIdentity>,
    description: &flotilla_types::NodeDescription,
) -> Result<Started, NodeError> {
    let mut bootstrap: Option<ClusterObject> = None;
    let mut register_voter = false;
    let identity = match (&cfg.mode, existing) {
        (StartMode::Init, Some(id)) => {
            return Err(NodeError::Config(format!(
                "{} already holds node {} of cluster {}: drop --init to resume it, or use an empty --data-dir",
                cfg.data_dir.display(),
                id.node_id,
                id.cluster_id
            )))
        }
        (StartMode::Join { .. }, Some(id)) => {
            return Err(NodeError::Config(format!(
                "{} already holds node {} of cluster {}: drop --join/--token to resume it, or use an empty --data-dir",
                cfg.data_dir.display(),
                id.node_id,
                id.cluster_id
            )))
        }
        (StartMode::Init, None) => {
            let (identity, cluster) = init_cluster(cfg, paths)?;
            bootstrap = Some(cluster);
            identity
        }
        (StartMode::Join { manager, token }, None) => {
            let name = cfg.name.clone().unwrap_or_else(default_name);
            let id = joining::join_cluster(cfg, paths, manager, token, name, description.clone()).await?;
            register_voter = id.role == NodeRole::Manager;
            id
        }
        (StartMode::Resume | StartMode::ForceNewCluster, None) => {
            return Err(NodeError::Config(format!(
                "{} holds no node: start a new cluster with --init, or join one with --join MANAGER --token TOKEN",
                cfg.data_dir.display()
            )))
        }
        (StartMode::Resume | StartMode::ForceNewCluster, Some(mut id)) => {
            if id.addr != cfg.advertise_addr() {
                tracing::info!(old = %id.addr, new = %cfg.advertise_addr(), "advertise address changed");
                id.addr = cfg.advertise_addr();
            }
            id
        }
    };
    Ok(Started {
        identity,
        bootstrap,
        register_voter,
    })
}

/// Seeds a new cluster: the Raft group of one, then the cluster object and the first node in
/// one batch.
async fn seed_cluster(
    mgr: &Manager,
    identity: &NodeIdentity,
    cluster: ClusterObject,
    description: flotilla_types::NodeDescription,
) -> Result<(), NodeError> {
    mgr.store.initialize(identity.addr.clone()).await?;
    wait_leader(&mgr.store, Duration::from_secs(10)).await?;
    let cluster_bytes =
        serde_json::to_vec(&cluster).map_err(|e| NodeError::Config(e.to_string()))?;
    let node_bytes = serde_json::to_vec(&first_node(identity, description))
        .map_err(|e| NodeError::Config(e.to_string()))?;
    let out = mgr
        .store
        .write(Batch::from(vec![
            Op::create(Table::Cluster, CLUSTER_KEY, cluster_bytes),
            Op::create(Table::Nodes, &identity.node_id, node_bytes),
        ]))
        .await?;
    if let Err(f) = out.result {
        return Err(NodeError::Config(format!(
            "seeding the new cluster failed: {f}"
        )));
    }
    tracing::info!(cluster = %identity.cluster_id, node = %identity.node_id, "cluster initialized");
    Ok(())
}

/// Shuts a manager's store down; a demoted node keeps its old Raft data aside rather than
/// deleting it.
async fn close_manager(mgr: Arc<Manager>, outcome: RunOutcome, ctx: &NodeCtx) {
    if let Err(e) = mgr.store.shutdown().await {
        tracing::warn!(error = %e, "store shutdown");
    }
    drop(mgr);
    if outcome == RunOutcome::RoleChanged && ctx.identity().role == NodeRole::Worker {
        let raft = ctx.paths.raft();
        if raft.exists() {
            let aside = ctx
                .paths
                .dir
                .join(format!("raft.demoted-{}", now_ms() / 1000));
            if let Err(e) = std::fs::rename(&raft, &aside) {
                tracing::warn!(error = %e, "moving the old raft data aside failed");
            }
        }
    }
}

/// The agent of this node; on a manager it also keeps the images the cluster refers to.
fn agent_ctx(
    ctx: &Arc<NodeCtx>,
    runtime: &flotilla_runtime::Runtime,
    manager: Option<&Arc<Manager>>,
) -> Arc<AgentCtx> {
    let cfg = &ctx.cfg;
    AgentCtx::new(
        AgentConfig {
            data_dir: cfg.data_dir.clone(),
            heartbeat_period: cfg.heartbeat_period,
            task_networking: cfg.task_networking,
            bind_ip: cfg.listen.ip(),
            underlay: cfg.advertise.unwrap_or(cfg.listen).ip(),
            dns_upstreams: cfg.dns_upstreams.clone(),
        },
        ctx.clone(),
        ctx.tls.clone(),
        runtime.clone(),
        manager.map(|m| Arc::new(ClusterImagesOf(Arc::downgrade(m))) as _),
    )
}

/// Serves `router` on the mTLS listener and on the local socket until `stop`.
fn serve(
    listener: TcpListener,
    tls: &Arc<TlsState>,
    paths: &Paths,
    router: axum::Router,
    stop: &watch::Receiver<bool>,
) -> [tokio::task::JoinHandle<std::io::Result<()>>; 2] {
    let tls = tls.clone();
    let tcp = tokio::spawn(flotilla_api::serve_tls(
        listener,
        move || tls.server_config(),
        router.clone(),
        stop.clone(),
    ));
    let sock = paths.socket();
    let stop = stop.clone();
    let unix = tokio::spawn(async move { flotilla_api::serve_unix(&sock, router, stop).await });
    [tcp, unix]
}

/// The loops only a manager runs (each acts only while this manager leads, where it matters).
fn manager_loops(
    m: &Arc<Manager>,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(flotilla_manager::control::control_loop(
            m.clone(),
            stop.clone(),
        )),
        tokio::spawn(flotilla_manager::liveness::liveness_loop(
            m.clone(),
            stop.clone(),
        )),
        tokio::spawn(flotilla_manager::replicate::replicate_loop(
            m.clone(),
            stop.clone(),
        )),
        tokio::spawn(flotilla_manager::volumes::mover_loop(
            m.clone(),
            stop.clone(),
        )),
    ]
}

/// This host as the scheduler and `node inspect` see it, with the runtime's probe.
fn describe(
    runtime: &flotilla_runtime::Runtime,
    mut engine: std::collections::BTreeMap<String, serde_json::Value>,
) -> flotilla_types::NodeDescription {
    if let Ok(v) = serde_json::to_value(runtime.probe()) {
        engine.insert("runtime".into(), v);
    }
    flotilla_agent::heartbeat::describe_host(engine)
}

/// The node's identity for this start (see [`resolve_identity`]), checked against the mode
/// and recorded in node.json.
async fn start_identity(
    cfg: &NodeConfig,
    paths: &Paths,
    description: &flotilla_types::NodeDescription,
) -> Result<Started, NodeError> {
    let existing = read_identity(paths).map_err(NodeError::io("reading node.json"))?;
    let started = resolve_identity(cfg, paths, existing, description).await?;
    if cfg.mode == StartMode::ForceNewCluster && started.identity.role != NodeRole::Manager {
        return Err(NodeError::Config(
            "--force-new-cluster needs a manager's data directory".into(),
        ));
    }
    write_identity(paths, &started.identity).map_err(NodeError::io("writing node.json"))?;
    Ok(started)
}

async fn run_node(
    cfg: NodeConfig,
    engine: std::collections::BTreeMap<String, serde_json::Value>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<RunOutcome, NodeError> {
    let paths = Paths::new(&cfg.data_dir);
    let runtime = open_runtime(&cfg)?;
    let description = describe(&runtime, engine);
    // Bind first: a taken port is a usage error before anything is written.
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| NodeError::Config(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let Started {
        identity,
        bootstrap,
        register_voter,
    } = start_identity(&cfg, &paths, &description).await?;

    // The node's certificates and key are plain files, not sealed with the store's keys: TLS
    // (and so the admin's unlock over the network) works while a manager is locked.
    let tls = Arc::new(TlsState::load(
        &paths.ca_cert(),
        &paths.node_cert(),
        &paths.node_key(),
    )?);
    let ctx = Arc::new(NodeCtx {
        cfg: cfg.clone(),
        paths: Paths::new(&cfg.data_dir),
        identity: RwLock::new(identity.clone()),
        tls: tls.clone(),
        role_changed: tokio::sync::Notify::new(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let switch = routes::Switch::default();
    let mut listener = Some(listener);
    let mut servers = None;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut at_rest = None;
    let manager = if identity.role == NodeRole::Manager {
        // The CA key lives only in the sealed store (the cluster object); a plain copy that
        // an older version wrote at init goes.
        match std::fs::remove_file(paths.ca_key()) {
            Ok(()) => tracing::info!("removed the plain CA key file; the sealed store holds it"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NodeError::io("removing the plain CA key file")(e)),
        }
        let keys_dir = crate::keys::dir(&paths.raft());
        let (keyring, unlocked) = match crate::keys::open(&paths.raft())? {
            crate::keys::Keys::Open(k) => (k, None),
            crate::keys::Keys::Locked(locked) => {
                // Autolock: serve only ping and unlock until an admin gives the unlock key.
                let (tx, rx) = tokio::sync::oneshot::channel();
                let unlocker = Arc::new(autolock::Unlocker::new(locked, tx));
                switch.set(routes::locked_router(identity.clone(), unlocker));
                servers = listener
                    .take()
                    .map(|l| serve(l, &tls, &paths, switch.router(), &stop_rx));
                tracing::warn!(node = %identity.node_id, listen = %cfg.listen,
                    "this manager is locked (autolock): waiting for `flotilla cluster unlock`");
                let unlocked = tokio::select! {
                    _ = &mut shutdown => None,
                    u = rx => u.ok(),
                };
                let Some(u) = unlocked else {
                    let _ = stop_tx.send(true);
                    for server in servers.into_iter().flatten() {
                        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
                    }
                    return Ok(RunOutcome::Stopped);
                };
                (u.keyring, Some((u.key, u.done)))
            }
        };
        let opened = open_manager(&cfg, &paths, &identity, &tls, &runtime, keyring.clone()).await;
        let state = match unlocked {
            Some((key, done)) => {
                let _ = done.send(opened.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                autolock::AtRest::unlocked(keys_dir, keyring, key)
            }
            None => autolock::AtRest::with_kek_file(keys_dir, keyring),
        };
        at_rest = Some(Arc::new(state));
        Some(opened?)
    } else {
        None
    };
    let agent = agent_ctx(&ctx, &runtime, manager.as_ref());
    // A new cluster is seeded before the API opens, so no client ever sees it half-made.
    if let (Some(mgr), Some(cluster)) = (&manager, bootstrap) {
        seed_cluster(mgr, &identity, cluster, description.clone()).await?;
    }
    switch.set(routes::router(ctx.clone(), agent.clone(), manager.clone()));
    if let Some(l) = listener.take() {
        servers = Some(serve(l, &tls, &paths, switch.router(), &stop_rx));
    }

    // A manager whose Raft state is empty (just joined, or just promoted) asks to be added.
    if register_voter || manager.as_ref().is_some_and(|m| !m.store.is_initialized()) {
        register_as_voter(&ctx).await?;
    }
    tracing::info!(node = %identity.node_id, name = %identity.name, role = identity.role.as_str(),
        listen = %cfg.listen, socket = %paths.socket().display(), "node running");

    let agent_loops = flotilla_agent::Agent::start(agent, description, stop_rx.clone()).await;
    let mut manager_loops = manager
        .as_ref()
        .map_or_else(Vec::new, |m| manager_loops(m, &stop_rx));
    if let (Some(m), Some(at_rest)) = (&manager, at_rest) {
        manager_loops.push(tokio::spawn(autolock::autolock_loop(
            m.clone(),
            at_rest,
            stop_rx.clone(),
        )));
    }

    let outcome = tokio::select! {
        _ = &mut shutdown => RunOutcome::Stopped,
        _ = ctx.role_changed.notified() => RunOutcome::RoleChanged,
    };
    tracing::info!(?outcome, "shutting down");
    let _ = stop_tx.send(true);
    agent_loops.join().await;
    for l in manager_loops {
        let _ = l.await;
    }
    // The servers get 5 s to finish their requests.
    for server in servers.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    if let Some(mgr) = manager {
        close_manager(mgr, outcome, &ctx).await;
    }
    Ok(outcome)
}

/// A freshly joined manager asks the leader to add it as a Raft voter (retrying while the
/// cluster is busy with another membership change).
async fn register_as_voter(ctx: &Arc<NodeCtx>) -> Result<(), NodeError> {
    let ident = ctx.identity();
    let body = flotilla_types::AddManager {
        raft_id: ident.raft_id,
        addr: ident.addr.clone(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        for m in &ident.managers {
            if *m == ident.addr {
                continue;
            }
            let client = ctx.tls.peer(m).with_timeout(Duration::from_secs(90));
            match client
                .post_json::<_, serde_json::Value>("/v1/cluster/managers", &body)
                .await
            {
                Ok(_) => {
                    tracing::info!("joined the raft group as a voter");
                    return Ok(());
                }
                Err(e) => last = format!("{m}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(NodeError::Join(format!(
        "could not become a raft voter: {last}"
    )))
}

/// Opens this manager's Raft store (a new single-manager cluster from it with
/// `--force-new-cluster`).
async fn open_manager(
    cfg: &NodeConfig,
    paths: &Paths,
    identity: &NodeIdentity,
    tls: &Arc<TlsState>,
    runtime: &flotilla_runtime::Runtime,
    keyring: Arc<flotilla_store::flotilla_secrets::Keyring>,
) -> Result<Arc<Manager>, NodeError> {
    let store_cfg = StoreConfig {
        node_id: identity.raft_id,
        data_dir: paths.raft(),
        heartbeat_ms: cfg.raft_heartbeat_ms,
        election_min_ms: cfg.raft_election_min_ms,
        election_max_ms: cfg.raft_election_max_ms,
        snapshot_every: cfg.snapshot_every,
        write_timeout: cfg.write_timeout,
        // Encryption at rest: this manager's keys, created on first start or unlocked
        // (keys.rs, autolock.rs).
        at_rest: Some(keyring),
        ..StoreConfig::default()
    };
    let transport = Arc::new(HttpRaftTransport { tls: tls.clone() });
    let store = if cfg.mode == StartMode::ForceNewCluster {
        tracing::warn!("forcing a new single-manager cluster from this manager's data");
        Store::force_new_cluster(store_cfg, transport, identity.addr.clone()).await?
    } else {
        Store::open(store_cfg, transport).await?
    };
    let config = ManagerConfig {
        node_id: identity.node_id.clone(),
        heartbeat_period: cfg.heartbeat_period,
        heartbeat_timeout: cfg.heartbeat_timeout,
        task_history: cfg.task_history,
        write_timeout: cfg.write_timeout,
        data_dir: cfg.data_dir.display().to_string(),
        listen: cfg.listen.to_string(),
    };
    Ok(Arc::new(Manager::new(
        store,
        config,
        tls.clone(),
        runtime.images_shared(),
    )))
}

/// The images a manager's cluster refers to, for the agent's image garbage collection.
struct ClusterImagesOf(std::sync::Weak<Manager>);

impl flotilla_agent::ClusterImages for ClusterImagesOf {
    fn in_use(&self) -> Result<std::collections::HashSet<String>, flotilla_agent::AgentError> {
        let Some(mgr) = self.0.upgrade() else {
            return Err(flotilla_agent::AgentError::ShuttingDown);
        };
        mgr.images_in_use()
            .map_err(|e| flotilla_agent::AgentError::Cluster(Box::new(e)))
    }
}

/// Raises the soft limit on open files to the hard one (at most `fs.nr_open`), and logs it.
/// The node is one process for the API, Raft, the agents' streams and the routing mesh (two
/// descriptors per proxied connection); the common soft limit of 1024 is soon reached, and
/// then every listener fails to accept.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return;
        }
    };
    let target = if hard == RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    if soft >= target {
        tracing::info!(limit = soft, "open-file limit");
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => tracing::info!(limit = target, was = soft, "raised the open-file limit"),
        Err(e) => {
            tracing::warn!(limit = soft, hard, error = %e, "cannot raise the open-file limit")
        }
    }
}
