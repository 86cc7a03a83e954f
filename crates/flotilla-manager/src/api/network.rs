//! `GET /v1/nodes/{id}/network`: the network map agents program their routing mesh, DNS and
//! overlay from. Like the assignment stream it is newline-delimited JSON, sent at once and
//! again whenever a node, service or task change alters it, plus a keep-alive resend; any
//! manager serves it from its own replica.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Extension;

use flotilla_store::Table;
use flotilla_types::{
    NetBackend, NetNetwork, NetNode, NetService, Network, NetworkMap, Node, NodeState, Service,
    Task, TaskState,
};

use super::{Caller, Ctx};
use crate::error::ManagerError;
use crate::manager::Manager;

/// The host part of `IP:PORT` (or the whole string when it has no port).
pub fn host_of(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => sa.ip().to_string(),
        Err(_) => addr
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_else(|| addr.to_string()),
    }
}

pub use flotilla_control::ipam::is_task_addr;

/// [`is_task_addr`] on the strings of the store and the network map (false when either does
/// not parse).
pub fn is_task_addr_str(subnet: &str, addr: &str) -> bool {
    match (subnet.parse::<ipnet::Ipv4Net>(), addr.parse()) {
        (Ok(net), Ok(ip)) => is_task_addr(net, ip),
        _ => false,
    }
}

/// Whether a task should take traffic: wanted, running, addressed, and healthy when it has a
/// health check.
pub fn in_pool(t: &Task) -> bool {
    t.desired_state == TaskState::Running && t.status.address.is_some() && is_up(t)
}

/// Running, and healthy when it has a health check: the service's or its image's (the agent
/// reports `starting` for either until the first healthy probe).
pub fn is_up(t: &Task) -> bool {
    t.status.state == TaskState::Running
        && match t.status.health {
            Some(h) => h == flotilla_types::Health::Healthy,
            None => t.spec.container.healthcheck.is_none(),
        }
}

/// Builds the map from the objects (pure; sorted so equal states compare equal).
pub fn build(
    revision: u64,
    settings: flotilla_types::NetworkSettings,
    nodes: &[Node],
    services: &[Service],
    tasks: &[Task],
    networks: &[Network],
    tunnel_keys: &[flotilla_types::TunnelKeyRecord],
) -> NetworkMap {
    let mut net_nodes: Vec<NetNode> = nodes
        .iter()
        .map(|n| NetNode {
            id: n.id.clone(),
            ip: host_of(&n.status.addr),
            subnet: n.network.as_ref().map(|x| x.subnet.clone()),
            ready: n.status.state == NodeState::Ready,
            manager: n.spec.role == flotilla_types::NodeRole::Manager,
        })
        .collect();
    net_nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let subnets: std::collections::HashMap<&str, &str> = nodes
        .iter()
        .filter_map(|n| Some((n.id.as_str(), n.network.as_ref()?.subnet.as_str())))
        .collect();
    let blocks: std::collections::HashMap<&str, &Network> =
        networks.iter().map(|n| (n.name.as_str(), n)).collect();
    // The block of `network` on `node` (the default subnet when `network` is `None`).
    let block_of = |node: &str, network: Option<&str>| -> Option<&str> {
        match network {
            None => subnets.get(node).copied(),
            Some(n) => blocks.get(n)?.blocks.get(node).map(String::as_str),
        }
    };
    let mut net_services: Vec<NetService> = services
        .iter()
        .map(|s| {
            let attached = &s.spec.task_template.networks;
            let first = attached.first().map(|a| a.target.as_str());
            let mut backends: Vec<NetBackend> = tasks
                .iter()
                .filter(|t| t.service_id == s.id && in_pool(t))
                .filter_map(|t| {
                    let node_id = t.node_id.clone()?;
                    let addr = t.status.address.clone()?;
                    // The leader stores only checked addresses; this keeps an address written
                    // before that check (or by a bug) out of every node's mesh and DNS.
                    if !is_task_addr_str(block_of(&node_id, first)?, &addr) {
                        return None;
                    }
                    // An address on every attached network, each inside this node's block.
                    let mut addrs = std::collections::BTreeMap::new();
                    for a in attached {
                        let x = t.status.addresses.get(&a.target)?;
                        if !is_task_addr_str(block_of(&node_id, Some(&a.target))?, x) {
                            return None;
                        }
                        addrs.insert(a.target.clone(), x.clone());
                    }
                    Some(NetBackend {
                        task_id: t.id.clone(),
                        node_id,
                        addr,
                        addrs,
                    })
                })
                .collect();
            backends.sort_by(|a, b| a.task_id.cmp(&b.task_id));
            NetService {
                id: s.id.clone(),
                name: s.spec.name.clone(),
                mode: s.spec.endpoint_spec.mode,
                vip: s.vip.clone(),
                ports: s.spec.endpoint_spec.ports.clone(),
                networks: attached.clone(),
                network_vips: s
                    .network_vips
                    .iter()
                    .filter(|(n, _)| attached.iter().any(|a| &a.target == *n))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect(),
                backends,
            }
        })
        .collect();
    net_services.sort_by(|a, b| a.id.cmp(&b.id));
    let mut net_networks: Vec<NetNetwork> = networks
        .iter()
        .map(|n| NetNetwork {
            name: n.name.clone(),
            subnet: n.subnet.clone(),
            internal: n.internal,
            encrypted: n.encrypted,
            blocks: n.blocks.clone(),
        })
        .collect();
    net_networks.sort_by(|a, b| a.name.cmp(&b.name));
    NetworkMap {
        revision,
        settings,
        nodes: net_nodes,
        // Only when some network needs them.
        tunnel_keys: if networks.iter().any(|n| n.encrypted) {
            tunnel_keys.to_vec()
        } else {
            Vec::new()
        },
        services: net_services,
        networks: net_networks,
    }
}

fn current(mgr: &Manager) -> Result<NetworkMap, ManagerError> {
    let revision = mgr.store.revision();
    let cluster = mgr.cluster()?;
    let (settings, tunnel_keys) = (cluster.network, cluster.tunnel_keys);
    let nodes: Vec<Node> = mgr.list()?;
    let services: Vec<Service> = mgr.list()?;
    let tasks: Vec<Task> = mgr.list()?;
    let networks: Vec<Network> = mgr.list()?;
    Ok(build(
        revision,
        settings,
        &nodes,
        &services,
        &tasks,
        &networks,
        &tunnel_keys,
    ))
}

fn same(a: &NetworkMap, b: &NetworkMap) -> bool {
    a.settings == b.settings
        && a.nodes == b.nodes
        && a.services == b.services
        && a.networks == b.networks
        && a.tunnel_keys == b.tunnel_keys
}

pub async fn stream(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ManagerError> {
    let claim =
        super::dispatch::own_stream(&ctx, &caller, super::dispatch::StreamKind::Network, &id)?;
    super::dispatch::push_stream(
        ctx.clone(),
        claim,
        |ev| match ev.table {
            Table::Services | Table::Nodes | Table::Cluster | Table::Networks => true,
            // Backends are placed tasks; unplaced ones never carry an address.
            Table::Tasks => super::dispatch::task_node(ev).is_none_or(|n| n.is_some()),
            _ => false,
        },
        current,
        same,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(id: &str, state: &str, desired: &str, health: Option<&str>, hc: bool) -> Task {
        let mut v = json!({
            "id": id, "service_id": "s1", "slot": 1, "node_id": "n1",
            "spec": {"container": {"image": "x"}},
            "spec_version": 1, "desired_state": desired,
            "status": {"state": state, "timestamp": 1, "address": format!("10.200.0.{}", id.len())}
        });
        if let Some(h) = health {
            v["status"]["health"] = json!(h);
        }
        if hc {
            v["spec"]["container"]["healthcheck"] =
                json!({"probe": {"tcp": {"port": 80}}, "interval": 1, "timeout": 1, "retries": 1});
        }
        serde_json::from_value(v).expect("task")
    }

    #[test]
    fn only_wanted_running_healthy_addressed_tasks_take_traffic() {
        assert!(in_pool(&task("a", "running", "running", None, false)));
        assert!(in_pool(&task(
            "b",
            "running",
            "running",
            Some("healthy"),
            true
        )));
        assert!(!in_pool(&task(
            "c",
            "running",
            "running",
            Some("starting"),
            true
        )));
        assert!(!in_pool(&task(
            "d",
            "running",
            "running",
            Some("unhealthy"),
            true
        )));
        // The image's own health check: the spec has none, the agent reports its health.
        assert!(!in_pool(&task(
            "dd",
            "running",
            "running",
            Some("starting"),
            false
        )));
        assert!(!in_pool(&task("e", "running", "shutdown", None, false)));
        assert!(!in_pool(&task("f", "starting", "running", None, false)));
        let mut no_addr = task("g", "running", "running", None, false);
        no_addr.status.address = None;
        assert!(!in_pool(&no_addr));
    }

    #[test]
    fn task_addresses_must_be_hosts_of_the_node_subnet() {
        let net = "10.200.3.0/24";
        assert!(is_task_addr_str(net, "10.200.3.2"));
        assert!(is_task_addr_str(net, "10.200.3.254"));
        for bad in [
            "10.200.3.0",
            "10.200.3.1",
            "10.200.3.255",
            "10.200.4.2",
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "10.200.3.2:80",
            "::1",
            "",
        ] {
            assert!(!is_task_addr_str(net, bad), "{bad} accepted");
        }
        assert!(!is_task_addr_str("garbage", "10.200.3.2"));
    }

    fn node(id: &str, subnet: Option<&str>) -> Node {
        let mut v = json!({
            "id": id, "version": 1,
            "spec": {"name": id, "role": "worker", "availability": "active"},
            "description": {"hostname": "h", "os": "linux", "arch": "x86_64", "resources": {}},
            "status": {"state": "ready", "addr": "127.0.0.1:4440"}
        });
        if let Some(s) = subnet {
            v["network"] = json!({ "subnet": s });
        }
        serde_json::from_value(v).expect("node")
    }

    #[test]
    fn the_map_leaves_out_addresses_outside_the_owning_nodes_subnet() {
        let service: Service = serde_json::from_value(json!({
            "id": "s1", "version": 1,
            "spec": {
                "name": "web",
                "task_template": {"container": {"image": "x"}},
                "mode": {"replicated": {"replicas": 3}}
            }
        }))
        .expect("service");
        let mut good = task("good", "running", "running", None, false);
        good.status.address = Some("10.200.0.7".into());
        let mut loopback = task("loop", "running", "running", None, false);
        loopback.status.address = Some("127.0.0.1".into());
        // An address of another node's subnet: stealing that node's task traffic.
        let mut other = task("other", "running", "running", None, false);
        other.status.address = Some("10.200.1.7".into());
        // A node without a subnet has no task addresses at all.
        let mut unallocated = task("unalloc", "running", "running", None, false);
        unallocated.node_id = Some("n2".into());
        let nodes = [node("n1", Some("10.200.0.0/24")), node("n2", None)];
        let map = build(
            1,
            Default::default(),
            &nodes,
            &[service],
            &[good, loopback, other, unallocated],
            &[],
            &[],
        );
        let addrs: Vec<&str> = map.services[0]
            .backends
            .iter()
            .map(|b| b.addr.as_str())
            .collect();
        assert_eq!(addrs, ["10.200.0.7"]);
    }

    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(host_of("127.0.0.2:4440"), "127.0.0.2");
        assert_eq!(host_of("[::1]:4440"), "::1");
        assert_eq!(host_of("10.0.0.1"), "10.0.0.1");
    }
}
