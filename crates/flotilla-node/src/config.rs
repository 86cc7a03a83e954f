//! `flotilla node run`'s configuration: start modes and every flag, checked once before
//! anything is bound or written.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::NodeError;

/// How a node starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartMode {
    /// Create a new cluster: root CA, cluster id, this node as the first manager.
    Init,
    /// Join the cluster at `manager` with a join token.
    Join { manager: String, token: String },
    /// Resume from the data directory.
    Resume,
    /// Disaster recovery: resume this manager's data as a new single-manager cluster.
    ForceNewCluster,
}

/// Everything `flotilla node run` takes. Validate once with [`NodeConfig::validate`] before
/// binding anything.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the node keeps its identity, certificates, Raft data and runtime state.
    pub data_dir: PathBuf,
    /// TCP address of the node's mTLS listener (API, Raft, agent sessions).
    pub listen: SocketAddr,
    /// Address other nodes use to reach this one (default: `listen`).
    pub advertise: Option<SocketAddr>,
    /// Node name (default: the host name).
    pub name: Option<String>,
    pub mode: StartMode,
    /// Lifetime of node certificates; they renew after two thirds of it.
    pub cert_lifetime: Duration,
    /// Interval of agent heartbeats to the leader.
    pub heartbeat_period: Duration,
    /// A node whose heartbeats stop for this long is marked down.
    pub heartbeat_timeout: Duration,
    /// Raft timings (milliseconds).
    pub raft_heartbeat_ms: u64,
    pub raft_election_min_ms: u64,
    pub raft_election_max_ms: u64,
    /// Deadline for a write to commit before it is reported as quorum loss.
    pub write_timeout: Duration,
    /// Raft snapshot interval in entries.
    pub snapshot_every: u64,
    /// OCI runtime binary (`--runtime`); default `runc` from PATH.
    pub runtime_bin: Option<PathBuf>,
    /// Ended tasks kept per slot (or node) for `service ps` and logs, when this manager leads.
    pub task_history: usize,
    /// The cluster's address plan, used by `--init` only.
    pub network: flotilla_types::NetworkSettings,
    /// Task networking on this node (`--network none` turns it off: tasks get only loopback).
    pub task_networking: bool,
    /// Resolvers the tasks' DNS responder forwards names outside the cluster to.
    pub dns_upstreams: Vec<std::net::SocketAddr>,
}

impl NodeConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr, mode: StartMode) -> NodeConfig {
        NodeConfig {
            data_dir,
            listen,
            advertise: None,
            name: None,
            mode,
            cert_lifetime: Duration::from_secs(7 * 24 * 3600),
            heartbeat_period: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(3),
            raft_heartbeat_ms: 75,
            raft_election_min_ms: 250,
            raft_election_max_ms: 500,
            write_timeout: Duration::from_secs(3),
            snapshot_every: 1000,
            runtime_bin: None,
            task_history: 5,
            network: flotilla_types::NetworkSettings::default(),
            task_networking: true,
            dns_upstreams: Vec::new(),
        }
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise.unwrap_or(self.listen).to_string()
    }

    /// Checks the flags against each other; the error names the flag to fix.
    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |m: String| Err(NodeError::Config(m));
        if self.listen.ip().is_unspecified() && self.advertise.is_none() {
            return bad(format!(
                "--listen {} is a wildcard address: also give --advertise IP:PORT, the address other nodes reach this one at",
                self.listen
            ));
        }
        if self.cert_lifetime < Duration::from_secs(10) {
            return bad("--cert-lifetime must be at least 10s".into());
        }
        if self.heartbeat_timeout <= self.heartbeat_period {
            return bad("--heartbeat-timeout must be longer than the heartbeat period".into());
        }
        if !(self.raft_heartbeat_ms < self.raft_election_min_ms
            && self.raft_election_min_ms < self.raft_election_max_ms)
        {
            return bad("raft timings must satisfy heartbeat < election-min < election-max".into());
        }
        if let Some(name) = &self.name {
            if let Err(e) = flotilla_types::validate_name(name) {
                return bad(format!("--name: {e}"));
            }
        }
        Ok(())
    }
}

/// The `--dns` flags of `node run`: none given → the host's resolvers; `none` → cluster names
/// only; else the addresses (at most three).
pub fn dns_upstreams(flags: &[String]) -> Result<Vec<std::net::SocketAddr>, String> {
    use flotilla_net::resolv;
    match flags {
        [] => Ok(resolv::host_upstreams()),
        [one] if one == "none" => Ok(Vec::new()),
        _ if flags.len() > resolv::MAX_UPSTREAMS => Err(format!(
            "--dns: at most {} resolvers",
            resolv::MAX_UPSTREAMS
        )),
        _ => flags.iter().map(|f| resolv::parse_upstream(f)).collect(),
    }
}
