//! Task networking: the cluster's address plan, each node's subnet, service VIPs and the
//! network map every agent follows to program its routing mesh, DNS and overlay.

use serde::{Deserialize, Serialize};

use crate::{EndpointMode, PortConfig};

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
    /// Tasks that should take traffic: running, healthy when the service has a health check,
    /// and still wanted (desired state running).
    pub backends: Vec<NetBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetBackend {
    pub task_id: String,
    pub node_id: String,
    /// Task IP address.
    pub addr: String,
}
