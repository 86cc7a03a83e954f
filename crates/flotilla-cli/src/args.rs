use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default data directory of a node, and so of the local API socket.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/flotilla";

#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about = "Flotilla: a container orchestrator", propagate_version = true)]
pub struct Cli {
    /// API endpoint: unix:///path/api.sock or https://IP:PORT (default: the local node's socket
    /// under /var/lib/flotilla).
    #[arg(long, global = true, env = "FLOTILLA_HOST")]
    pub host: Option<String>,
    /// Directory with ca.pem, cert.pem and key.pem for https:// hosts (the admin bundle written
    /// by `node run --init` to DATA_DIR/admin).
    #[arg(long, global = true, env = "FLOTILLA_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage nodes, or run the node daemon (`node run`).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Cluster-wide information and join tokens.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Stream changes to cluster objects.
    Events(EventsArgs),
    /// Per-container supervisor started by the agent (not for humans).
    #[command(hide = true)]
    Shim(ShimArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Run the node daemon in the foreground.
    Run(RunArgs),
    /// List nodes.
    Ls(FormatArgs),
    /// Show one node in detail.
    Inspect {
        node: String,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Change a node's availability or labels.
    Update(NodeUpdateArgs),
    /// Make a worker a manager.
    Promote { nodes: Vec<String> },
    /// Make a manager a worker.
    Demote { nodes: Vec<String> },
    /// Remove a node from the cluster.
    Rm {
        nodes: Vec<String>,
        /// Remove even if the node is still ready.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct NodeUpdateArgs {
    pub node: String,
    /// Add or replace a label (key=value).
    #[arg(long = "label-add", value_name = "KEY=VALUE")]
    pub label_add: Vec<String>,
    /// Remove a label.
    #[arg(long = "label-rm", value_name = "KEY")]
    pub label_rm: Vec<String>,
    #[arg(long, value_parser = ["active", "pause", "drain"])]
    pub availability: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where the node keeps its identity, certificates and state.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address of the node's mTLS listener (API, Raft, agents).
    #[arg(long, default_value = "127.0.0.1:4440")]
    pub listen: SocketAddr,
    /// Address other nodes use to reach this one (default: --listen).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Node name (default: host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Create a new cluster with this node as its first manager.
    #[arg(long, conflicts_with_all = ["join", "force_new_cluster"])]
    pub init: bool,
    /// Join the cluster through the manager at IP:PORT.
    #[arg(long, value_name = "MANAGER", requires = "token")]
    pub join: Option<String>,
    /// Join token (`flotilla cluster join-token worker|manager`).
    #[arg(long, requires = "join", env = "FLOTILLA_JOIN_TOKEN")]
    pub token: Option<String>,
    /// Recover from a permanent loss of quorum: restart this manager as the only member of
    /// a new Raft group that keeps all cluster state.
    #[arg(long)]
    pub force_new_cluster: bool,
    /// Lifetime of node certificates (renewed after two thirds), e.g. 90d, 1h, 30s.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub cert_lifetime: std::time::Duration,
    /// A node whose heartbeats stop for this long is marked down.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: std::time::Duration,
    /// Raft election timeout range in milliseconds, MIN-MAX.
    #[arg(long, default_value = "250-500")]
    pub election_timeout: String,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Cluster id, leader, managers and Raft state.
    Info(FormatArgs),
    /// Print (or rotate) the token a node needs to join.
    JoinToken {
        #[arg(value_parser = ["worker", "manager"])]
        role: String,
        /// Invalidate the current token and print a new one.
        #[arg(long)]
        rotate: bool,
        /// Print only the token.
        #[arg(long, short)]
        quiet: bool,
    },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Replay changes after this store revision.
    #[arg(long)]
    pub since: Option<u64>,
    /// Only these object types: `type=node`, `type=service`, … (repeatable).
    #[arg(long, value_name = "type=KIND")]
    pub filter: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ShimArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}
