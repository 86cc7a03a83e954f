use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A duration flag (`500ms`, `5s`, `1m30s`, `2h`); the parser's own message says where it
/// stopped, this adds what a valid value looks like.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} in {s:?}: use a duration such as 500ms, 5s, 1m30s or 2h"))
}

/// Default data directory of a node, and so of the local API socket.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/flotilla";

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla: a container orchestrator",
    propagate_version = true
)]
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
    /// Create and manage services.
    #[command(subcommand)]
    Service(Box<ServiceCmd>),
    /// Manage images in the cluster's content store.
    #[command(subcommand)]
    Image(ImageCmd),
    /// The keys whose image signatures the cluster trusts.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Secrets: named, immutable, encrypted data given to tasks as files.
    #[command(subcommand)]
    Secret(FileCmd),
    /// Configs: named, immutable data given to tasks as files.
    #[command(subcommand)]
    Config(FileCmd),
    /// Named volumes: data on one node that outlives tasks.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// User-defined overlay networks: services on one reach each other, and only them.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Start a single-node cluster in the foreground with a demo service.
    Dev(DevArgs),
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
    Run(Box<RunArgs>),
    /// Stop and remove every container of a stopped node (before deleting its data dir).
    Cleanup {
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Only list what would be removed (containers, network objects); exit 1 if anything.
        #[arg(long)]
        dry_run: bool,
    },
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
    /// Lifetime of node certificates (renewed after two thirds), e.g. 7d, 1h, 30s. A node that
    /// stays away longer than this must join again with a token.
    #[arg(long, default_value = "7d", value_parser = duration)]
    pub cert_lifetime: std::time::Duration,
    /// A node whose heartbeats stop for this long is marked down.
    #[arg(long, default_value = "3s", value_parser = duration)]
    pub heartbeat_timeout: std::time::Duration,
    /// Raft election timeout range in milliseconds, MIN-MAX.
    #[arg(long, default_value = "250-500")]
    pub election_timeout: String,
    /// Ended tasks kept per replica slot (or node, for global services) while this manager leads.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub task_history_limit: u64,
    /// OCI runtime binary, e.g. /usr/bin/crun (default: runc from PATH).
    #[arg(long)]
    pub runtime: Option<PathBuf>,
    /// With --init: the pool task subnets are carved from (one per node).
    #[arg(long, default_value = "10.200.0.0/16", value_name = "CIDR")]
    pub address_pool: String,
    /// With --init: prefix length of each node's subnet.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u8).range(8..=28))]
    pub subnet_size: u8,
    /// With --init: the pool of service virtual IPs.
    #[arg(long, default_value = "10.199.0.0/16", value_name = "CIDR")]
    pub vip_pool: String,
    /// With --init: UDP port of the VXLAN overlay between nodes.
    #[arg(long, default_value_t = 4789)]
    pub vxlan_port: u16,
    /// With --init: do not masquerade task traffic leaving the node.
    #[arg(long)]
    pub no_outbound_nat: bool,
    /// `bridge` (default): each task gets its own network namespace on the node bridge;
    /// `none`: tasks get only loopback (no routing mesh, no service discovery).
    #[arg(long, default_value = "bridge", value_parser = ["bridge", "none"])]
    pub network: String,
    /// Resolver for names outside the cluster, IP[:PORT] (repeatable, at most 3); default: the
    /// host's /etc/resolv.conf (behind systemd-resolved's stub); `none`: cluster names only.
    #[arg(long, value_name = "IP[:PORT]|none")]
    pub dns: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Cluster id, leader, managers and Raft state.
    Info(FormatArgs),
    /// Change cluster settings.
    Update {
        /// Whether agents refuse images without a valid signature by a trusted key.
        #[arg(long, value_parser = ["on", "off"])]
        signature_enforcement: Option<String>,
        /// A host directory services may bind-mount (repeatable; replaces the list; give ""
        /// once to allow none).
        #[arg(long, value_name = "DIR")]
        bind_allow: Vec<String>,
        /// Autolock: a restarted manager waits for `cluster unlock` with the unlock key
        /// (printed once when turned on) before it opens its data.
        #[arg(long, value_name = "true|false")]
        autolock: Option<bool>,
    },
    /// Unlock a manager that restarted with autolock on (--host points at it); reads the
    /// unlock key from standard input.
    Unlock,
    /// Print (or rotate) the unlock key of an autolocked cluster.
    UnlockKey {
        /// Replace the key with a new one (keep the old one until every manager is up).
        #[arg(long)]
        rotate: bool,
        /// Print only the key.
        #[arg(long, short)]
        quiet: bool,
    },
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

#[derive(Debug, Subcommand)]
pub enum FileCmd {
    /// Create one from FILE, or from standard input with `-`.
    Create {
        name: String,
        file: PathBuf,
        /// Label KEY=VALUE (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        label: Vec<String>,
    },
    /// List them.
    Ls(FormatArgs),
    /// Show one (a secret's data is never shown: its digest and size are).
    Inspect {
        name: String,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Remove them (refused while a service uses one).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (on NODE, else on the node of its first task).
    Create {
        name: String,
        #[arg(long)]
        node: Option<String>,
        /// Label KEY=VALUE (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        label: Vec<String>,
    },
    /// List volumes with their node, size and users.
    Ls(FormatArgs),
    /// Show one volume.
    Inspect {
        name: String,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Remove volumes and their data (refused while a service uses one).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Forget a volume whose node cannot be reached (its data stays on that node).
        #[arg(long, short)]
        force: bool,
    },
    /// Remove every volume no service uses.
    Prune,
    /// Fill a new or empty volume from a tar archive (FILE, or `-` for standard input). The
    /// volume must have a node: `volume create NAME --node NODE` first.
    Import { name: String, file: PathBuf },
    /// Move a volume to another node: copied over the nodes' mTLS connections and checked by
    /// its SHA-256 on both ends; the tasks waiting for it then start there. A replicated
    /// service's task running with it is moved too: a first pass while it runs, then the task
    /// stops, a final pass sends what changed, and its replacement starts on the new node.
    /// Progress is shown while it runs. The old copy is deleted once a task runs on the new
    /// node.
    Move {
        name: String,
        /// Node id or hostname.
        #[arg(long)]
        to: String,
    },
    /// Write a volume's content as a tar archive to FILE, or to standard output.
    Export {
        name: String,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create a network (prints its name).
    Create {
        name: String,
        /// The network driver: overlay (the only one).
        #[arg(long, short)]
        driver: Option<String>,
        /// Its address range, a CIDR inside the cluster's address pool (default: a free /20 of
        /// the pool).
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// No traffic leaves the network: no outbound NAT.
        #[arg(long)]
        internal: bool,
        /// Accepted for Docker compatibility (there are no standalone containers).
        #[arg(long)]
        attachable: bool,
        /// Driver option (repeatable): `encrypted` (or `encrypted=true`) encrypts the network's
        /// traffic between nodes.
        #[arg(long, short = 'o', value_name = "OPTION")]
        opt: Vec<String>,
        /// Label KEY=VALUE (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        label: Vec<String>,
    },
    /// List networks with their range and the services attached.
    Ls(FormatArgs),
    /// Show networks (JSON).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Remove networks (refused while a service is attached).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TrustCmd {
    /// List trusted keys (`--format json` shows the ids `trust rm` takes).
    Ls(FormatArgs),
    /// Trust a public key (ed25519 or ECDSA P-256 `PUBLIC KEY` PEM; a private key file is
    /// accepted too, only its public half is sent).
    Add { file: PathBuf },
    /// Stop trusting a key.
    Rm {
        #[arg(value_name = "KEYID")]
        key_id: String,
    },
    /// Generate a signing key pair locally: FILE (private, mode 0600) and FILE.pub.
    Keygen {
        file: PathBuf,
        #[arg(long, default_value = "ed25519", value_parser = ["ed25519", "ecdsa-p256"])]
        algorithm: String,
    },
}

/// Where the signing key comes from, for commands that sign.
#[derive(Debug, Args, Default)]
pub struct SignArgs {
    /// Do not sign (agents refuse unsigned images while enforcement is on).
    #[arg(long)]
    pub no_sign: bool,
    /// Signing key (PKCS#8 PEM; default: signing-key.pem in --tls-dir, or in the admin bundle
    /// next to the unix socket's data dir).
    #[arg(long, value_name = "FILE", conflicts_with = "no_sign")]
    pub sign_key: Option<PathBuf>,
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

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service.
    Create(ServiceCreateArgs),
    /// List services.
    Ls(FormatArgs),
    /// List the tasks of one or more services.
    Ps(ServicePsArgs),
    /// Show a service in detail.
    Inspect {
        service: String,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Change a service; a change to what the tasks run is rolled out as a rolling update.
    Update(ServiceUpdateArgs),
    /// Set the number of replicas: `scale web=5 api=2`.
    Scale {
        #[arg(value_name = "SERVICE=REPLICAS", required = true)]
        pairs: Vec<String>,
        #[arg(long, short)]
        detach: bool,
    },
    /// Return to the previous spec.
    Rollback {
        service: String,
        #[arg(long, short)]
        detach: bool,
    },
    /// Remove services.
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Show the output of a service's (or one task's) containers, from every node.
    Logs(ServiceLogsArgs),
}

#[derive(Debug, Args)]
pub struct ServicePsArgs {
    #[arg(required = true)]
    pub services: Vec<String>,
    /// `desired-state=running`, `node=NAME` (repeatable).
    #[arg(long, short)]
    pub filter: Vec<String>,
    /// Show only running tasks' ids.
    #[arg(long, short)]
    pub quiet: bool,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ServiceLogsArgs {
    /// Service name/id, or a task id.
    pub target: String,
    /// Keep following new output, including tasks that start later.
    #[arg(long, short)]
    pub follow: bool,
    /// Only the last N lines of each task.
    #[arg(long)]
    pub tail: Option<usize>,
    /// Only lines since this time (RFC 3339) or this long ago (e.g. 10m).
    #[arg(long)]
    pub since: Option<String>,
    /// Prefix each line with its timestamp.
    #[arg(long, short)]
    pub timestamps: bool,
}

/// Flags shared by `service create` and `service update`.
#[derive(Debug, Args, Default)]
pub struct SpecFlags {
    /// Number of tasks (replicated services and jobs).
    #[arg(long)]
    pub replicas: Option<u64>,
    /// For replicated jobs: how many tasks may run at once.
    #[arg(long)]
    pub max_concurrent: Option<u64>,
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    #[arg(long)]
    pub workdir: Option<String>,
    #[arg(long, short)]
    pub user: Option<String>,
    /// Placement constraint, e.g. node.labels.zone==eu (repeatable).
    #[arg(long)]
    pub constraint: Vec<String>,
    /// Placement preference, e.g. spread=node.labels.zone (repeatable).
    #[arg(long = "placement-pref")]
    pub placement_pref: Vec<String>,
    #[arg(long)]
    pub replicas_max_per_node: Option<u64>,
    /// CPUs to reserve, e.g. 0.5.
    #[arg(long)]
    pub reserve_cpu: Option<f64>,
    /// Memory to reserve, e.g. 64m, 1g.
    #[arg(long)]
    pub reserve_memory: Option<String>,
    #[arg(long)]
    pub limit_cpu: Option<f64>,
    #[arg(long)]
    pub limit_memory: Option<String>,
    #[arg(long, value_parser = ["none", "on-failure", "any"])]
    pub restart_condition: Option<String>,
    #[arg(long, value_parser = duration)]
    pub restart_delay: Option<std::time::Duration>,
    #[arg(long)]
    pub restart_max_attempts: Option<u64>,
    #[arg(long, value_parser = duration)]
    pub restart_window: Option<std::time::Duration>,
    /// Command run inside the container (`sh -c`); exit 0 = healthy.
    #[arg(long)]
    pub health_cmd: Option<String>,
    #[arg(long, value_parser = duration)]
    pub health_interval: Option<std::time::Duration>,
    #[arg(long, value_parser = duration)]
    pub health_timeout: Option<std::time::Duration>,
    #[arg(long)]
    pub health_retries: Option<u32>,
    #[arg(long, value_parser = duration)]
    pub health_start_period: Option<std::time::Duration>,
    /// Time between probes until the first healthy one (default 250ms for --health-tcp and
    /// --health-http, 1s for --health-cmd; at most the interval). The first probe runs as soon as the task starts; fast probing lasts at most
    /// max(start period, 30s), then probes come every --health-interval. Failures still count
    /// against --health-retries at most once per interval.
    #[arg(long, value_parser = duration)]
    pub health_start_interval: Option<std::time::Duration>,
    /// HTTP health check: GET PATH on the task's address; 2xx/3xx = healthy. PORT defaults to
    /// the first published target port, else 80.
    #[arg(long, value_name = "PATH[:PORT]")]
    pub health_http: Option<String>,
    /// TCP health check: a connection to this port of the task succeeds = healthy.
    #[arg(long, value_name = "PORT")]
    pub health_tcp: Option<u16>,
    /// Publish a port: PUBLISHED:TARGET[/tcp|/udp], or
    /// published=P,target=T[,protocol=tcp|udp][,mode=ingress|host][,proxy-protocol=v1|v2]
    /// (repeatable; on update, replaces the entry with the same published port).
    #[arg(long, short = 'p', value_name = "SPEC")]
    pub publish: Vec<String>,
    /// On update: stop publishing this port (PUBLISHED[/udp]).
    #[arg(long, value_name = "PUBLISHED")]
    pub publish_rm: Vec<String>,
    /// How the service name resolves inside containers: vip (one virtual IP, load-balanced)
    /// or dnsrr (the tasks' addresses).
    #[arg(long, value_parser = ["vip", "dnsrr"])]
    pub endpoint_mode: Option<String>,
    #[arg(long)]
    pub update_parallelism: Option<u64>,
    #[arg(long, value_parser = duration)]
    pub update_delay: Option<std::time::Duration>,
    #[arg(long, value_parser = ["pause", "continue", "rollback"])]
    pub update_failure_action: Option<String>,
    #[arg(long, value_parser = duration)]
    pub update_monitor: Option<std::time::Duration>,
    #[arg(long, value_parser = ["stop-first", "start-first"])]
    pub update_order: Option<String>,
    #[arg(long, value_parser = duration)]
    pub stop_grace_period: Option<std::time::Duration>,
    /// Signal that stops a task (e.g. SIGQUIT, INT, 3); the image's STOPSIGNAL, else SIGTERM.
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Replace the image's entrypoint (a command line, split as a shell would; "" clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// The containers' hostname (default: the first 12 characters of the task id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Run an init (tini) as PID 1 that reaps zombies and forwards signals (`--init=false`
    /// turns it off on update).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub init: Option<bool>,
    /// Allocate a pseudo-terminal for each task (`--tty=false` turns it off on update).
    #[arg(long, short = 't', num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub tty: Option<bool>,
    /// A resolver for the tasks' names outside the cluster, IP[:PORT] (repeatable, at most 3; on
    /// update, replaces the list; `--dns none` clears it): the node forwards them there instead
    /// of to its own resolvers.
    #[arg(long, value_name = "IP[:PORT]")]
    pub dns: Vec<String>,
    /// A search domain for the tasks' resolv.conf (repeatable; on update, replaces the list).
    #[arg(long, value_name = "DOMAIN")]
    pub dns_search: Vec<String>,
    /// A resolver option for the tasks' resolv.conf, e.g. ndots:2 (repeatable; on update,
    /// replaces the list).
    #[arg(long, value_name = "OPTION")]
    pub dns_option: Vec<String>,
    /// Size of /dev/shm, e.g. 128m (default 64m).
    #[arg(long)]
    pub shm_size: Option<String>,
    /// Mount a volume, host directory or tmpfs (repeatable; on update, replaces the mount at
    /// the same target): type=volume,src=NAME,dst=/data[,readonly][,volume-nocopy][,shared]
    /// [,volume-label=K=V][,volume-opt=size=512m] (NAME may hold {{.Task.Slot}}),
    /// type=bind,src=/host/dir,dst=/x
    /// (under a `cluster update --bind-allow` path), type=tmpfs,dst=/x[,tmpfs-size=64m]
    /// [,tmpfs-mode=1770].
    #[arg(long, visible_alias = "mount-add", value_name = "SPEC")]
    pub mount: Vec<String>,
    /// On update: remove the mount at this container path.
    #[arg(long, value_name = "TARGET")]
    pub mount_rm: Vec<String>,
    /// Give the tasks a secret as a file: NAME or src=NAME[,target=PATH][,uid=][,gid=]
    /// [,mode=0444] (under /run/secrets/ unless PATH is absolute; repeatable).
    #[arg(long, visible_alias = "secret-add", value_name = "SPEC")]
    pub secret: Vec<String>,
    /// On update: remove the secret with this name.
    #[arg(long, value_name = "NAME")]
    pub secret_rm: Vec<String>,
    /// Give the tasks a config as a file: NAME or src=NAME[,target=PATH][,uid=][,gid=]
    /// [,mode=0444] (under / unless PATH is absolute; repeatable).
    #[arg(long, visible_alias = "config-add", value_name = "SPEC")]
    pub config: Vec<String>,
    /// On update: remove the config with this name.
    #[arg(long, value_name = "NAME")]
    pub config_rm: Vec<String>,
    /// Attach the tasks to a user-defined network: NAME or name=NAME[,alias=ALIAS]... (each
    /// task gets an interface on it; repeatable, at most 8, the first one carries the default
    /// route; on update, replaces the attachment to the same network). Without any, the service
    /// is on the cluster's default network.
    #[arg(long, visible_alias = "network-add", value_name = "SPEC")]
    pub network: Vec<String>,
    /// On update: detach from this network.
    #[arg(long, value_name = "NAME")]
    pub network_rm: Vec<String>,
    /// Service label key=value (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// Return at once instead of showing progress until converged.
    #[arg(long, short)]
    pub detach: bool,
    /// Give up waiting for convergence after this long.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct ServiceCreateArgs {
    #[arg(long)]
    pub name: String,
    /// replicated (default), global, replicated-job or global-job.
    #[arg(long, default_value = "replicated", value_parser = ["replicated", "global", "replicated-job", "global-job"])]
    pub mode: String,
    #[command(flatten)]
    pub flags: SpecFlags,
    pub image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServiceUpdateArgs {
    pub service: String,
    #[arg(long)]
    pub image: Option<String>,
    #[arg(long = "env-add", value_name = "KEY=VALUE")]
    pub env_add: Vec<String>,
    #[arg(long = "env-rm", value_name = "KEY")]
    pub env_rm: Vec<String>,
    /// Replace the command's arguments.
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub args: Option<Vec<String>>,
    /// Replace the tasks even if nothing changed.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub flags: SpecFlags,
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import a root filesystem (directory or tar) as a one-layer image.
    Import {
        /// Directory or tar(.gz) file.
        src: PathBuf,
        #[arg(long)]
        name: String,
        /// Default command (repeat for each argument, or one string run by `sh -c`).
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        cmd: Option<Vec<String>>,
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        entrypoint: Option<Vec<String>>,
        #[arg(long, value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(long)]
        workdir: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        sign: SignArgs,
    },
    /// Load a `docker save` or OCI archive.
    Load {
        file: PathBuf,
        #[command(flatten)]
        sign: SignArgs,
    },
    /// Sign an image in the node's store (the signature travels with the image).
    Sign {
        image: String,
        /// Private key (PKCS#8 PEM, ed25519 or ECDSA P-256).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Push an image from an OCI layout directory into the cluster registry.
    Push {
        #[arg(value_name = "OCI_DIR[:TAG]")]
        src: String,
        #[arg(value_name = "NAME[:TAG]")]
        dest: String,
        #[command(flatten)]
        sign: SignArgs,
    },
    /// Pull an image from the cluster registry into an OCI layout directory.
    Pull {
        #[arg(value_name = "NAME[:TAG][@DIGEST]")]
        src: String,
        #[arg(value_name = "OCI_DIR[:TAG]")]
        dest: String,
    },
    /// Remove images and blobs nothing references (on the node the CLI talks to).
    Prune {
        /// Spare blobs younger than this (uploads in flight).
        #[arg(long, default_value = "10m")]
        grace: String,
    },
    /// List images.
    Ls(FormatArgs),
    /// Show one image.
    Inspect {
        image: String,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Remove images.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Data directory (default: a fresh temporary one, removed on exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:4440")]
    pub listen: SocketAddr,
    /// Do not deploy the demo service.
    #[arg(long)]
    pub no_demo: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_duration_says_what_a_good_one_looks_like() {
        assert_eq!(duration("1m30s"), Ok(std::time::Duration::from_secs(90)));
        let e = duration("bogus").expect_err("bogus");
        assert!(e.contains("use a duration such as 500ms, 5s"), "{e}");
    }
}
