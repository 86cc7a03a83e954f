//! Task networking: the cluster's address plan, each node's subnet, service VIPs and the
//! network map every agent follows to program its routing mesh, DNS and overlay.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{EndpointMode, Meta, PortConfig};

/// A user-defined network (`network create`): an address range inside the cluster's address
/// pool, split into one block per node. Tasks of services attached to it get an interface on
/// it and reach only tasks that share one of their networks. Keyed by name (unique).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    #[serde(flatten)]
    pub meta: Meta,
    /// Random id, shown by `network ls`/`inspect` (the name is the key).
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `overlay` (the only driver).
    #[serde(default = "overlay_driver")]
    pub driver: String,
    /// The network's address range (CIDR, inside the cluster's address pool), given with
    /// `--subnet` or allocated at create.
    pub subnet: String,
    /// No traffic leaves the network: no outbound NAT, nothing outside the cluster's pool.
    #[serde(default)]
    pub internal: bool,
    /// Recorded for Swarm compatibility (standalone containers do not exist here).
    #[serde(default)]
    pub attachable: bool,
    /// Task traffic between nodes is encrypted (`--opt encrypted`): it crosses the underlay in
    /// the nodes' encrypted tunnel instead of the plain VXLAN overlay.
    #[serde(default)]
    pub encrypted: bool,
    /// The block of `subnet` each node's tasks take their addresses from (node id → CIDR),
    /// allocated by the leader.
    #[serde(default)]
    pub blocks: BTreeMap<String, String>,
    /// Filled in on reads: services attached to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}

fn overlay_driver() -> String {
    "overlay".into()
}

/// `POST /v1/networks`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub attachable: bool,
    /// `--opt encrypted`.
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A service's attachment to a user-defined network (`--network NAME` or
/// `--network name=NAME,alias=A`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetworkAttachment {
    /// The network's name.
    pub target: String,
    /// Extra DNS names of the service on this network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// A user-defined network as agents see it in the [`NetworkMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetNetwork {
    pub name: String,
    /// The network's whole range.
    pub subnet: String,
    pub internal: bool,
    /// Its traffic between nodes goes through the encrypted tunnel.
    #[serde(default)]
    pub encrypted: bool,
    /// Node id → that node's block.
    pub blocks: BTreeMap<String, String>,
}

/// Set once at `--init` (stored in the cluster object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkSettings {
    /// Task addresses: every node gets one subnet of this pool.
    pub address_pool: String,
    /// Prefix length of each node's subnet.
    pub subnet_prefix: u8,
    /// Service virtual IPs (`--endpoint-mode vip`).
    pub vip_pool: String,
    /// VXLAN network identifier and UDP port of the overlay between nodes.
    pub vxlan_vni: u32,
    pub vxlan_port: u16,
    /// UDP port of the encrypted tunnel between nodes (encrypted networks).
    pub tunnel_port: u16,
    /// Masquerade traffic from tasks leaving the node (anything but the overlay).
    pub outbound_nat: bool,
    /// DNS search domain inside containers (`web` and `web.flotilla` both resolve).
    pub dns_domain: String,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            address_pool: "10.200.0.0/16".into(),
            subnet_prefix: 24,
            vip_pool: "10.199.0.0/16".into(),
            vxlan_vni: 4242,
            vxlan_port: 4789,
            tunnel_port: 4790,
            outbound_nat: true,
            dns_domain: "flotilla".into(),
        }
    }
}

/// One node's place in the address plan (allocated by the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeNetwork {
    /// CIDR, e.g. `10.200.3.0/24`; the first host address is the node's bridge (gateway).
    pub subnet: String,
}

/// `GET /v1/nodes/{id}/network`: the stream of what an agent needs to program networking.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkMap {
    pub revision: u64,
    pub settings: NetworkSettings,
    pub nodes: Vec<NetNode>,
    pub services: Vec<NetService>,
    /// User-defined networks, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetNetwork>,
    /// The encrypted tunnel's keys, newest first (the first seals, any opens); present when a
    /// network is encrypted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnel_keys: Vec<TunnelKeyRecord>,
}

/// A key of the nodes' encrypted tunnel, made and rotated by the leader, kept in the cluster
/// object (sealed at rest) and handed to nodes in their network map (over mutual TLS).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelKeyRecord {
    pub id: u32,
    /// 32 bytes, hex.
    pub key: String,
    /// Unix ms.
    pub created_at: u64,
}

impl std::fmt::Debug for TunnelKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelKeyRecord")
            .field("id", &self.id)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetNode {
    pub id: String,
    /// Underlay IP (the node's advertised address without the port).
    pub ip: String,
    pub subnet: Option<String>,
    pub ready: bool,
    /// The store lists the node as a manager (workers accept manager certificates only from
    /// these nodes).
    #[serde(default)]
    pub manager: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetService {
    pub id: String,
    pub name: String,
    pub mode: EndpointMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    pub ports: Vec<PortConfig>,
    /// The user-defined networks the service is attached to, in order; empty: the default
    /// network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkAttachment>,
    /// The service's VIP on each of those networks (network name → address).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_vips: BTreeMap<String, String>,
    /// Tasks that should take traffic: running, healthy when the service has a health check,
    /// and still wanted (desired state running).
    pub backends: Vec<NetBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetBackend {
    pub task_id: String,
    pub node_id: String,
    /// Task IP address (on its first network).
    pub addr: String,
    /// The task's address on each user-defined network it is attached to (network name →
    /// address).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addrs: BTreeMap<String, String>,
}
