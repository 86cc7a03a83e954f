//! The address allocator (Swarm's allocator): gives every node a task subnet and every
//! `vip`-mode service a virtual IP, lowest free first.
//!
//! It runs only on the leader, inside the control loop, so two allocations never race. The
//! caller writes every returned object conditionally on the `meta.version` it carries (the
//! version it was read at); on a conflict it drops the batch and allocates again.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use flotilla_types::{EndpointMode, NetworkSettings, Node, NodeNetwork, Service};

use crate::ipam::{NodeSubnets, VipPool};

/// The objects [`allocate`] changed, to be written back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    /// Nodes that got a subnet (`network` set, `meta.updated_at = now`).
    pub nodes: Vec<Node>,
    /// Services that got a VIP (mode `vip`) or gave theirs back (mode `dnsrr`), with
    /// `service_status` cleared (it is filled in on reads, never stored).
    pub services: Vec<Service>,
}

impl Allocation {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.services.is_empty()
    }
}

/// Allocates what is missing: a subnet of `settings.address_pool` (prefix
/// `settings.subnet_prefix`) for every node without one, a VIP of `settings.vip_pool` for every
/// `vip`-mode service without one, and releases the VIP of services no longer in `vip` mode.
///
/// Objects come back in input order, each with its old `meta.version`. A pool that does not
/// parse allocates nothing; an exhausted pool stops its allocations with a warning (the next
/// call retries). Nothing is changed twice: call again after the writes land.
pub fn allocate(
    settings: &NetworkSettings,
    nodes: &[Node],
    services: &[Service],
    now: u64,
) -> Allocation {
    let mut out = Allocation::default();
    let subnets = settings
        .address_pool
        .parse::<Ipv4Net>()
        .ok()
        .and_then(|p| NodeSubnets::new(p, settings.subnet_prefix).ok());
    if let Some(alloc) = subnets {
        let mut taken: Vec<Ipv4Net> = nodes
            .iter()
            .filter_map(|n| n.network.as_ref()?.subnet.parse().ok())
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
    if let Some(alloc) = vips {
        let mut taken: Vec<Ipv4Addr> = services
            .iter()
            .filter_map(|s| s.vip.as_ref()?.parse().ok())
            .collect();
        for s in services {
            let wants = s.spec.endpoint_spec.mode == EndpointMode::Vip;
            if wants == s.vip.is_some() {
                continue;
            }
            let mut s = s.clone();
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
        let a = allocate(&settings, &nodes, &services, 1);
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
        assert!(allocate(&settings, &nodes, &services, 2).is_empty());
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
        let a = allocate(&settings, &nodes, &services, 1);
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
        assert!(allocate(&bad, &nodes, &services, 1).is_empty());
    }
}
