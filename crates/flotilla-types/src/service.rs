//! Services: the spec a user declares (task template, mode, update and rollback policies,
//! endpoint and published ports) and the state the orchestrator keeps beside it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Meta;

/// A declared workload: "run this task template N times (or once per node), keep it so".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: ServiceSpec,
    /// The spec before the last update; `service rollback` returns to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_spec: Option<ServiceSpec>,
    /// Bumped on every spec change; tasks record the generation they were created from, so the
    /// orchestrator knows which tasks are out of date.
    #[serde(default)]
    pub spec_version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatus>,
    /// For jobs: bumped by `service update --force` to run the job again.
    #[serde(default)]
    pub job_iteration: u64,
    /// The service's virtual IP (endpoint mode `vip`), allocated by the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    /// The service's virtual IP on each user-defined network it is attached to (endpoint mode
    /// `vip`; network name → address in the network's VIP block), allocated by the leader.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_vips: BTreeMap<String, String>,
    /// Filled in on reads (never stored): how many tasks run and should run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_status: Option<ServiceStatus>,
}

/// A `--dns` entry: `IP` (port 53) or `IP:PORT`, IPv4.
pub fn parse_dns_server(s: &str) -> Result<std::net::SocketAddr, String> {
    let t = s.trim();
    if let Ok(ip) = t.parse::<std::net::Ipv4Addr>() {
        return Ok(std::net::SocketAddr::from((ip, 53)));
    }
    match t.parse::<std::net::SocketAddr>() {
        Ok(a) if a.is_ipv4() && a.port() != 0 => Ok(a),
        _ => Err(format!(
            "--dns {s:?}: give an IPv4 address, optionally with :PORT"
        )),
    }
}

impl Service {
    /// The task template as one task runs it: volume names with their placeholders
    /// (`{{.Task.Slot}}`, `{{.Task.ID}}`, `{{.Node.ID}}`, `{{.Service.Name}}`,
    /// `{{.Service.ID}}`) filled in. A global task's slot is empty, a replicated task's node.
    pub fn task_spec_for(
        &self,
        task_id: &str,
        slot: Option<u64>,
        node_id: Option<&str>,
    ) -> TaskSpec {
        let mut spec = self.spec.task_template.clone();
        for m in spec.container.mounts.iter_mut() {
            if m.kind == crate::MountKind::Volume && m.source.contains("{{") {
                m.source = m.volume_name_for(crate::MountVars {
                    service_id: &self.id,
                    service_name: &self.spec.name,
                    task_id,
                    slot,
                    node_id,
                });
            }
        }
        spec
    }

    /// Swaps the spec with the previous one and marks a rollback as started (Swarm keeps the
    /// spec it replaced, so a second rollback returns to where the first began). `false`:
    /// there is no previous spec, nothing changed.
    pub fn start_rollback(&mut self, now: u64, message: impl Into<String>) -> bool {
        let Some(prev) = self.previous_spec.take() else {
            return false;
        };
        let current = std::mem::replace(&mut self.spec, prev);
        self.previous_spec = Some(current);
        self.spec_version += 1;
        self.update_status = Some(UpdateStatus {
            state: UpdateState::RollbackStarted,
            started_at: now,
            completed_at: None,
            message: message.into(),
        });
        true
    }
}

/// Task counts of a service, as `service ls` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub running_tasks: u64,
    pub desired_tasks: u64,
    pub completed_tasks: u64,
    /// Tasks waiting for a node (state `pending`).
    #[serde(default)]
    pub pending_tasks: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub task_template: TaskSpec,
    pub mode: ServiceMode,
    #[serde(default)]
    pub update_config: UpdateConfig,
    #[serde(default)]
    pub rollback_config: UpdateConfig,
    #[serde(default)]
    pub endpoint_spec: EndpointSpec,
}

/// Replicated (N slots), global (one per eligible node) or jobs that run to completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceMode {
    Replicated {
        replicas: u64,
    },
    Global,
    ReplicatedJob {
        /// How many tasks may run at once.
        max_concurrent: u64,
        /// How many successful completions finish the job.
        total_completions: u64,
    },
    GlobalJob,
}

impl ServiceMode {
    pub fn name(&self) -> &'static str {
        match self {
            ServiceMode::Replicated { .. } => "replicated",
            ServiceMode::Global => "global",
            ServiceMode::ReplicatedJob { .. } => "replicated-job",
            ServiceMode::GlobalJob => "global-job",
        }
    }
}

/// What each task of a service runs, and where.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub container: ContainerSpec,
    #[serde(default)]
    pub resources: ResourceRequirements,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub placement: Placement,
    /// Bumped by `service update --force` to replace tasks without a spec change.
    #[serde(default)]
    pub force_update: u64,
    /// User-defined networks (`--network`), the first one carrying the default route; none:
    /// the cluster's default network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<crate::NetworkAttachment>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// `name:tag@sha256:…` once pinned at create time.
    pub image: String,
    /// Replaces the image's entrypoint when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    #[serde(default)]
    pub args: Vec<String>,
    /// `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds between the stop signal and SIGKILL; default 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period: Option<u64>,
    /// Signal that asks a task to stop (name or number); the image's `StopSignal`, else
    /// SIGTERM, when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// The container's hostname; the first 12 characters of the task id when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Search domains of the task's resolv.conf, before the cluster domain (`--dns-search`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_search: Vec<String>,
    /// Resolver options of the task's resolv.conf, e.g. `ndots:2` (`--dns-option`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_options: Vec<String>,
    /// Resolvers for the task's names outside the cluster, `IP` or `IP:PORT`, tried in order
    /// (`--dns`; the node's when empty). The task still asks its node, which answers cluster
    /// names and forwards the rest here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
    /// Allocate a pseudo-terminal for the task's process (its output is logged as stdout).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    /// Run a minimal init as PID 1 that reaps zombies and forwards signals.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
    /// Size of `/dev/shm` in bytes; 64 MiB when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
    /// Volumes, host binds and tmpfs (`--mount`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::Mount>,
    /// Secrets as files, under `/run/secrets/` unless the target is absolute (`--secret`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::FileReference>,
    /// Configs as files, under `/` unless the target is absolute (`--config`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<crate::FileReference>,
}

/// A task's stop grace period when its spec sets none.
pub const DEFAULT_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl ContainerSpec {
    /// Time between the stop signal and SIGKILL: `stop_grace_period`, else
    /// [`DEFAULT_STOP_GRACE`].
    pub fn stop_grace(&self) -> std::time::Duration {
        self.stop_grace_period
            .map_or(DEFAULT_STOP_GRACE, std::time::Duration::from_nanos)
    }
}

/// Exec/HTTP/TCP probes; durations in nanoseconds.
///
/// Schedule: the first probe runs as soon as the task's process starts. While the task is
/// `starting` (no healthy result yet, retries not used up) the agent probes every
/// `start_interval`, for at most max(`start_period`, 30 s) after the start (so a task that
/// never becomes healthy is not probed fast forever); after that, and once the task has been
/// healthy or unhealthy, every `interval`. Fast probes find health sooner but do not make a
/// task unhealthy sooner: a failure counts against `retries` only after the start period and
/// once `interval` has passed since the start or the last counted failure. A task with a check
/// counts as up (traffic, `service create` waiting, running replicas) only while healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    /// Between probes once the task has been healthy (or its start window is over).
    pub interval: u64,
    /// One probe's time limit.
    pub timeout: u64,
    /// Failed probes in a row (outside the start period) that make the task unhealthy.
    pub retries: u32,
    /// Failures during this period after the start do not count against `retries`.
    #[serde(default)]
    pub start_period: u64,
    /// Between probes while the task is starting (Docker's `--health-start-interval`, but
    /// also without a start period); 0 = the default: 250 ms for TCP and HTTP probes, 1 s for
    /// exec probes (a `runc exec` costs ~150× a connect). Never longer than `interval`.
    #[serde(default)]
    pub start_interval: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthProbe {
    /// Run inside the container (`sh -c CMD`); exit 0 = healthy.
    Exec {
        cmd: String,
    },
    Http {
        path: String,
        port: u16,
    },
    Tcp {
        port: u16,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRequirements {
    #[serde(default)]
    pub limits: crate::Resources,
    #[serde(default)]
    pub reservations: crate::Resources,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    None,
    OnFailure,
    #[default]
    Any,
}

/// Docker's restart policy; durations in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    #[serde(default)]
    pub condition: RestartCondition,
    /// Delay between a task ending and its replacement starting; default 5 s.
    #[serde(default = "default_restart_delay")]
    pub delay: u64,
    /// 0 = unlimited.
    #[serde(default)]
    pub max_attempts: u64,
    /// Window in which attempts are counted; 0 = unbounded.
    #[serde(default)]
    pub window: u64,
}

fn default_restart_delay() -> u64 {
    5_000_000_000
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay: default_restart_delay(),
            max_attempts: 0,
            window: 0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Swarm syntax: `node.labels.zone==eu`, `node.role!=manager`, `node.hostname==a`, `node.id==…`.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// Spread over the values of these node label names (`spread=node.labels.zone`), in order.
    #[serde(default)]
    pub preferences: Vec<String>,
    /// 0 = unlimited.
    #[serde(default)]
    pub max_replicas_per_node: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Pause,
    Continue,
    Rollback,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    #[default]
    StopFirst,
    StartFirst,
}

/// Rolling update (and rollback) parameters; durations in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Tasks replaced at once; 0 = all at once. Default 1.
    #[serde(default = "one")]
    pub parallelism: u64,
    #[serde(default)]
    pub delay: u64,
    #[serde(default)]
    pub failure_action: FailureAction,
    /// How long a new task is watched for failure after it starts; default 5 s.
    #[serde(default = "default_monitor")]
    pub monitor: u64,
    /// Fraction of failed tasks tolerated during an update.
    #[serde(default)]
    pub max_failure_ratio: f64,
    #[serde(default)]
    pub order: UpdateOrder,
}

fn one() -> u64 {
    1
}
fn default_monitor() -> u64 {
    5_000_000_000
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay: 0,
            failure_action: FailureAction::Pause,
            monitor: default_monitor(),
            max_failure_ratio: 0.0,
            order: UpdateOrder::StopFirst,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    /// Unix milliseconds.
    pub started_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
    #[serde(default)]
    pub message: String,
}

/// Published ports and the service's endpoint mode (filled in by networking).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    #[serde(default)]
    pub mode: EndpointMode,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    #[default]
    Vip,
    Dnsrr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    pub published: u16,
    pub target: u16,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `ingress` (default: routing mesh, every node) or `host` (only where a task runs).
    #[serde(default)]
    pub publish_mode: PublishMode,
    /// Opt-in PROXY protocol header (`v1` or `v2`) carrying the client's address to the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<String>,
}

/// Transport protocol of a published port: `tcp` (the default) or `udp`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// The lower-case name (also the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(format!("unknown protocol {other:?}: use tcp or udp")),
        }
    }
}

/// Where a published port listens: `ingress` (the default: the routing mesh, on every node)
/// or `host` (only on the nodes that run a task of the service).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    #[default]
    Ingress,
    Host,
}

impl PublishMode {
    /// The lower-case name (also the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        }
    }
}

impl std::fmt::Display for PublishMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PublishMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingress" => Ok(PublishMode::Ingress),
            "host" => Ok(PublishMode::Host),
            other => Err(format!(
                "unknown publish mode {other:?}: use ingress or host"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_servers_parse_or_say_the_form() {
        assert_eq!(
            parse_dns_server("10.0.0.2").map(|a| a.to_string()),
            Ok("10.0.0.2:53".to_string())
        );
        assert_eq!(
            parse_dns_server("10.0.0.2:5353").map(|a| a.to_string()),
            Ok("10.0.0.2:5353".to_string())
        );
        for bad in [
            "",
            "dns.example",
            "10.0.0.2:0",
            "[::1]:53",
            "::1",
            "10.0.0.2:99999",
            "1.2.3.4\nx",
        ] {
            assert!(parse_dns_server(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_enums_round_trip() {
        for p in [Protocol::Tcp, Protocol::Udp] {
            let json = serde_json::to_string(&p).expect("json");
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Protocol>(&json).expect("back"), p);
            assert_eq!(p.to_string().parse::<Protocol>().expect("parse"), p);
        }
        for m in [PublishMode::Ingress, PublishMode::Host] {
            let json = serde_json::to_string(&m).expect("json");
            assert_eq!(json, format!("\"{}\"", m.as_str()));
            assert_eq!(serde_json::from_str::<PublishMode>(&json).expect("back"), m);
            assert_eq!(m.to_string().parse::<PublishMode>().expect("parse"), m);
        }
    }

    #[test]
    fn port_config_wire_format_is_unchanged() {
        // Defaults when the fields are left out, as before.
        let p: PortConfig =
            serde_json::from_str(r#"{"published":8080,"target":80}"#).expect("defaults");
        assert_eq!(
            (p.protocol, p.publish_mode),
            (Protocol::Tcp, PublishMode::Ingress)
        );
        let p = PortConfig {
            published: 53,
            target: 5353,
            protocol: Protocol::Udp,
            publish_mode: PublishMode::Host,
            proxy_protocol: None,
        };
        let json = serde_json::to_string(&p).expect("json");
        assert_eq!(
            json,
            r#"{"published":53,"target":5353,"protocol":"udp","publish_mode":"host"}"#
        );
        assert_eq!(serde_json::from_str::<PortConfig>(&json).expect("back"), p);
    }

    #[test]
    fn unknown_values_are_rejected_with_the_valid_ones() {
        let e = "sctp".parse::<Protocol>().expect_err("sctp");
        assert!(e.contains("sctp") && e.contains("tcp or udp"), "{e}");
        let e = "Host".parse::<PublishMode>().expect_err("case matters");
        assert!(e.contains("ingress or host"), "{e}");
        let e =
            serde_json::from_str::<PortConfig>(r#"{"published":1,"target":2,"protocol":"sctp"}"#)
                .expect_err("sctp in JSON");
        let msg = e.to_string();
        assert!(
            msg.contains("sctp") && msg.contains("tcp") && msg.contains("udp"),
            "{msg}"
        );
        let e = serde_json::from_str::<PortConfig>(
            r#"{"published":1,"target":2,"publish_mode":"everywhere"}"#,
        )
        .expect_err("bad mode in JSON");
        let msg = e.to_string();
        assert!(
            msg.contains("everywhere") && msg.contains("ingress") && msg.contains("host"),
            "{msg}"
        );
    }
}
