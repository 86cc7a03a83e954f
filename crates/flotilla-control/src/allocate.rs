//! The address allocator (Swarm's allocator): gives every node a task subnet, every node a
//! block of every user-defined network, and every `vip`-mode service a virtual IP, lowest
//! free first.
//!
//! It runs only on the leader, inside the control loop, so two allocations never race. The
//! caller writes every returned object conditionally on the `meta.version` it carries (the
//! version it was read at); on a conflict it drops the batch and allocates again.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use flotilla_types::{EndpointMode, Network, NetworkSettings, Node, NodeNetwork, Service};

use crate::ipam::{NodeSubnets, VipPool};

/// The objects [`allocate`] changed, to be written back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    /// Nodes that got a subnet (`network` set, `meta.updated_at = now`).
    pub nodes: Vec<Node>,
    /// Services that got a VIP (mode `vip`) or gave theirs back (mode `dnsrr`), with
    /// `service_status` cleared (it is filled in on reads, never stored).
    pub services: Vec<Service>,
    /// Networks whose per-node blocks changed (a block for a new node, blocks of removed
    /// nodes dropped), `meta.updated_at = now`.
    pub networks: Vec<Network>,
}

impl Allocation {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.services.is_empty() && self.networks.is_empty()
    }
}

/// Prefix length of the per-node blocks of a network with range `range`: the cluster's node
/// subnet prefix when the range holds at least 16 of them, else 4 bits longer than the
/// range (16 blocks), at most /28.
pub fn block_prefix(range: Ipv4Net, node_prefix: u8) -> u8 {
    node_prefix
        .max(range.prefix_len().saturating_add(4))
        .min(28)
}

/// The block of a network's range its services' VIPs come from: the range's last block (of
/// [`block_prefix`]), which no node gets.
pub fn vip_block(range: Ipv4Net, node_prefix: u8) -> Option<Ipv4Net> {
    range.subnets(block_prefix(range, node_prefix)).ok()?.last()
}

/// The network's blocks with one for every node of `nodes` that lacks one (lowest free of
/// its range) and none for nodes no longer listed; `None` when nothing changes. A node that
/// does not fit (range exhausted) gets no block, with a warning.
fn network_blocks(
    net: &Network,
    nodes: &[Node],
    node_prefix: u8,
) -> Option<std::collections::BTreeMap<String, String>> {
    let range: Ipv4Net = net.subnet.parse().ok()?;
    let alloc = NodeSubnets::new(range, block_prefix(range, node_prefix)).ok()?;
    let mut blocks = net.blocks.clone();
    blocks.retain(|id, _| nodes.iter().any(|n| &n.id == id));
    let mut taken: Vec<Ipv4Net> = blocks.values().filter_map(|b| b.parse().ok()).collect();
    taken.extend(vip_block(range, node_prefix));
    let missing: Vec<&Node> = nodes
        .iter()
        .filter(|n| !blocks.contains_key(&n.id))
        .collect();
    for n in missing {
        let Ok(block) = alloc.allocate(taken.iter()) else {
            tracing::warn!(network = %net.name, node = %n.id, range = %range, "the network's range has no free block for this node");
            break;
        };
        taken.push(block);
        blocks.insert(n.id.clone(), block.to_string());
    }
    (blocks != net.blocks).then_some(blocks)
}

/// Allocates what is missing: a subnet of `settings.address_pool` (prefix
/// `settings.subnet_prefix`, outside every user-defined network's range) for every node without
/// one, a block of every network's range for every node without one there, a VIP of
/// `settings.vip_pool` for every `vip`-mode service without one, and releases the VIP of
/// services no longer in `vip` mode.
///
/// Objects come back in input order, each with its old `meta.version`. A pool that does not
/// parse allocates nothing; an exhausted pool stops its allocations with a warning (the next
/// call retries). Nothing is changed twice: call again after the writes land.
/// A service's VIPs on its user-defined networks: the ones it has that still hold (VIP mode,
/// attached, inside the network's VIP block), plus the lowest free address of the VIP block
/// of every other network it is attached to (recorded as taken in `net_vips`).
fn network_vips(
    s: &Service,
    net_vips: &mut std::collections::HashMap<&str, (Ipv4Net, Vec<Ipv4Addr>)>,
) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    if s.spec.endpoint_spec.mode != EndpointMode::Vip {
        return out;
    }
    for a in &s.spec.task_template.networks {
        let Some((block, taken)) = net_vips.get_mut(a.target.as_str()) else {
            continue;
        };
        let kept = s
            .network_vips
            .get(&a.target)
            .and_then(|v| v.parse::<Ipv4Addr>().ok())
            .filter(|v| crate::ipam::is_task_addr(*block, *v));
        let vip = match kept {
            Some(v) => Some(v),
            None => {
                let free = block
                    .hosts()
                    .find(|h| !taken.contains(h) && crate::ipam::is_task_addr(*block, *h));
                if free.is_none() {
                    tracing::warn!(service = %s.spec.name, network = %a.target, "the network's VIP block is exhausted");
                }
                free
            }
        };
        if let Some(v) = vip {
            if !taken.contains(&v) {
                taken.push(v);
            }
            out.insert(a.target.clone(), v.to_string());
        }
    }
    out
}

pub fn allocate(
    settings: &NetworkSettings,
    nodes: &[Node],
    services: &[Service],
    networks: &[Network],
    now: u64,
) -> Allocation {
    let mut out = Allocation::default();
    for net in networks {
        if let Some(blocks) = network_blocks(net, nodes, settings.subnet_prefix) {
            let mut net = net.clone();
            net.blocks = blocks;
            net.used_by.clear();
            net.meta.updated_at = now;
            out.networks.push(net);
        }
    }
    let subnets = settings
        .address_pool
        .parse::<Ipv4Net>()
        .ok()
        .and_then(|p| NodeSubnets::new(p, settings.subnet_prefix).ok());
    if let Some(alloc) = subnets {
        let mut taken: Vec<Ipv4Net> = nodes
            .iter()
            .filter_map(|n| n.network.as_ref()?.subnet.parse().ok())
            .chain(networks.iter().filter_map(|n| n.subnet.parse().ok()))
            .collect();
        for n in nodes.iter().filter(|n| n.network.is_none()) {
            let Ok(subnet) = alloc.allocate(taken.iter()) else {
                tracing::warn!(node = %n.id, pool = %settings.address_pool, "the address pool has no free subnet for this node");
                break;
            };
            taken.push(subnet);
            let mut n = n.clone();
            n.network = Some(NodeNetwork {
                subnet: subnet.to_string(),
            });
            n.meta.updated_at = now;
            out.nodes.push(n);
        }
    }
    let vips = settings
        .vip_pool
        .parse::<Ipv4Net>()
        .ok()
        .and_then(|p| VipPool::new(p).ok());
    // Each network's VIP block, and the VIPs taken in it.
    let mut net_vips: std::collections::HashMap<&str, (Ipv4Net, Vec<Ipv4Addr>)> = networks
        .iter()
        .filter_map(|n| {
            let range: Ipv4Net = n.subnet.parse().ok()?;
            Some((
                n.name.as_str(),
                (vip_block(range, settings.subnet_prefix)?, Vec::new()),
            ))
        })
        .collect();
    for s in services {
        for (n, v) in &s.network_vips {
            if let (Some((_, taken)), Ok(v)) = (net_vips.get_mut(n.as_str()), v.parse()) {
                taken.push(v);
            }
        }
    }
    if let Some(alloc) = vips {
        let mut taken: Vec<Ipv4Addr> = services
            .iter()
            .filter_map(|s| s.vip.as_ref()?.parse().ok())
            .collect();
        for s in services {
            let wants = s.spec.endpoint_spec.mode == EndpointMode::Vip;
            let per_net = network_vips(s, &mut net_vips);
            if wants == s.vip.is_some() && per_net == s.network_vips {
                continue;
            }
            let mut s = s.clone();
            s.network_vips = per_net;
            if wants == s.vip.is_some() {
                s.service_status = None;
                out.services.push(s);
                continue;
            }
            if wants {
                let Ok(vip) = alloc.allocate(taken.iter()) else {
                    tracing::warn!(service = %s.spec.name, pool = %settings.vip_pool, "the VIP pool is exhausted");
                    break;
                };
                taken.push(vip);
                s.vip = Some(vip.to_string());
            } else {
                s.vip = None;
            }
            s.service_status = None;
            out.services.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;
    use flotilla_types::{ServiceMode, ServiceStatus};

    fn node(id: &str, subnet: Option<&str>, version: u64) -> Node {
        let mut n = testutil::node(id);
        n.meta.version = version;
        n.network = subnet.map(|s| NodeNetwork { subnet: s.into() });
        n
    }

    fn service(id: &str, mode: EndpointMode, vip: Option<&str>) -> Service {
        let mut s = testutil::service(ServiceMode::Replicated { replicas: 1 });
        s.id = id.into();
        s.spec.name = id.into();
        s.meta.version = 7;
        s.spec.endpoint_spec.mode = mode;
        s.vip = vip.map(Into::into);
        s.service_status = Some(ServiceStatus {
            running_tasks: 1,
            desired_tasks: 1,
            ..Default::default()
        });
        s
    }

    #[test]
    fn allocator_gives_lowest_free_subnets_and_vips() {
        let settings = NetworkSettings::default();
        let nodes = vec![
            node("a", Some("10.200.0.0/24"), 3),
            node("b", None, 4),
            node("c", None, 5),
        ];
        let services = vec![
            service("s1", EndpointMode::Vip, Some("10.199.0.1")),
            service("s2", EndpointMode::Vip, None),
            service("s3", EndpointMode::Dnsrr, Some("10.199.0.9")),
        ];
        let a = allocate(&settings, &nodes, &services, &[], 1);
        assert!(!a.is_empty());

        let got: Vec<(&str, &str, u64, u64)> = a
            .nodes
            .iter()
            .map(|n| {
                let subnet = n.network.as_ref().expect("allocated").subnet.as_str();
                (n.id.as_str(), subnet, n.meta.version, n.meta.updated_at)
            })
            .collect();
        assert_eq!(
            got,
            [("b", "10.200.1.0/24", 4, 1), ("c", "10.200.2.0/24", 5, 1)]
        );

        let ids: Vec<&str> = a.services.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s2", "s3"], "s1 has its VIP already");
        let s2 = &a.services[0];
        assert_eq!(s2.vip.as_deref(), Some("10.199.0.2"));
        let s3 = &a.services[1];
        assert_eq!(s3.vip, None, "dnsrr gives its VIP back");
        for s in &a.services {
            assert_eq!(s.meta.version, 7, "{}: the version read", s.id);
            assert_eq!(s.service_status, None, "{}: never stored", s.id);
        }

        // Applied, nothing is left to do.
        let mut nodes = nodes;
        for n in a.nodes {
            let i = nodes.iter().position(|x| x.id == n.id).expect("known");
            nodes[i] = n;
        }
        let mut services = services;
        for s in a.services {
            let i = services.iter().position(|x| x.id == s.id).expect("known");
            services[i] = s;
        }
        assert!(allocate(&settings, &nodes, &services, &[], 2).is_empty());
    }

    #[test]
    fn exhausted_or_invalid_pools_allocate_what_fits() {
        let settings = NetworkSettings {
            address_pool: "10.200.0.0/23".into(),
            subnet_prefix: 24,
            vip_pool: "10.199.0.0/30".into(),
            ..Default::default()
        };
        let nodes = vec![node("a", None, 1), node("b", None, 1), node("c", None, 1)];
        let services = vec![
            service("s1", EndpointMode::Vip, None),
            service("s2", EndpointMode::Vip, None),
            service("s3", EndpointMode::Vip, None),
        ];
        let a = allocate(&settings, &nodes, &services, &[], 1);
        let subnets: Vec<&str> = a
            .nodes
            .iter()
            .filter_map(|n| Some(n.network.as_ref()?.subnet.as_str()))
            .collect();
        assert_eq!(subnets, ["10.200.0.0/24", "10.200.1.0/24"]);
        let vips: Vec<&str> = a.services.iter().filter_map(|s| s.vip.as_deref()).collect();
        assert_eq!(vips, ["10.199.0.1", "10.199.0.2"]);

        let bad = NetworkSettings {
            address_pool: "not a pool".into(),
            vip_pool: "10.199.0.0/31".into(),
            ..Default::default()
        };
        assert!(allocate(&bad, &nodes, &services, &[], 1).is_empty());
    }

    fn network(name: &str, subnet: &str, blocks: &[(&str, &str)]) -> Network {
        Network {
            name: name.into(),
            subnet: subnet.into(),
            blocks: blocks
                .iter()
                .map(|(n, b)| (n.to_string(), b.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn networks_get_a_block_per_node_and_node_subnets_avoid_their_ranges() {
        let settings = NetworkSettings {
            address_pool: "10.200.0.0/22".into(),
            ..Default::default()
        };
        // The network holds the pool's second /24: node b's default subnet must skip it.
        let nets = vec![
            network(
                "front",
                "10.200.1.0/24",
                &[("a", "10.200.1.0/28"), ("gone", "10.200.1.16/28")],
            ),
            network("wide", "10.201.0.0/16", &[]),
            network("broken", "not a range", &[]),
        ];
        let nodes = vec![node("a", Some("10.200.0.0/24"), 1), node("b", None, 1)];
        let a = allocate(&settings, &nodes, &[], &nets, 5);
        let subnets: Vec<&str> = a
            .nodes
            .iter()
            .filter_map(|n| Some(n.network.as_ref()?.subnet.as_str()))
            .collect();
        assert_eq!(subnets, ["10.200.2.0/24"]);
        assert_eq!(a.networks.len(), 2, "{:?}", a.networks);
        let front = &a.networks[0];
        assert_eq!(front.meta.updated_at, 5);
        let blocks: Vec<(&str, &str)> = front
            .blocks
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // A /24 range gives /28 blocks; the removed node's block is dropped and reused.
        assert_eq!(blocks, [("a", "10.200.1.0/28"), ("b", "10.200.1.16/28")]);
        let wide: Vec<&str> = a.networks[1].blocks.values().map(String::as_str).collect();
        assert_eq!(wide, ["10.201.0.0/24", "10.201.1.0/24"]);
        assert_eq!(block_prefix("10.200.0.0/16".parse().expect("net"), 24), 24);
        assert_eq!(block_prefix("10.200.0.0/22".parse().expect("net"), 24), 26);
        assert_eq!(block_prefix("10.200.0.0/26".parse().expect("net"), 24), 28);

        // A VIP-mode service on `front` gets a VIP in front's last block (not a node's).
        let mut svc = service("s9", EndpointMode::Vip, Some("10.199.0.1"));
        svc.spec.task_template.networks = vec![flotilla_types::NetworkAttachment {
            target: "front".into(),
            aliases: vec![],
        }];
        let got = allocate(&settings, &nodes, std::slice::from_ref(&svc), &nets, 5);
        assert_eq!(got.services.len(), 1);
        let vips: Vec<(&str, &str)> = got.services[0]
            .network_vips
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(vips, [("front", "10.200.1.242")]);
        assert_eq!(
            vip_block("10.200.1.0/24".parse().expect("net"), 24),
            Some("10.200.1.240/28".parse().expect("net"))
        );
        // Detached (or dnsrr): the VIP goes.
        let mut kept = got.services[0].clone();
        kept.spec.task_template.networks.clear();
        let again = allocate(&settings, &nodes, &[kept], &nets, 6);
        assert!(again.services[0].network_vips.is_empty());

        // Applied, nothing is left to do.
        let mut nets = nets;
        nets[0] = a.networks[0].clone();
        nets[1] = a.networks[1].clone();
        let mut nodes = nodes;
        nodes[1] = a.nodes[0].clone();
        assert!(allocate(&settings, &nodes, &[], &nets, 6).is_empty());
    }
}
