//! Pure address allocators of the leader (no I/O).
//!
//! * [`NodeSubnets`]: one subnet per node out of the cluster pool.
//! * [`VipPool`]: one address per `vip`-mode service out of the VIP range.
//! * [`gateway_of`]: the first host of a node subnet (the node's bridge address).
//!
//! Task addresses inside a node subnet are the agent's business and persist on its disk:
//! `flotilla_net::ipam::TaskAddrs`.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// What the allocators reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// A pool or prefix that cannot be allocated from.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The pool has no free entry left.
    #[error("{0} exhausted: widen the range or free entries")]
    Exhausted(String),
}

/// Default prefix length of a node subnet.
pub const DEFAULT_NODE_PREFIX: u8 = 24;

/// Carves fixed-size node subnets out of a cluster pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSubnets {
    pool: Ipv4Net,
    prefix_len: u8,
}

impl NodeSubnets {
    /// A pool handing out `/prefix_len` subnets; `prefix_len` must lie between the pool's
    /// own prefix and 30.
    pub fn new(pool: Ipv4Net, prefix_len: u8) -> Result<Self, IpamError> {
        if prefix_len < pool.prefix_len() || prefix_len > 30 {
            return Err(IpamError::Invalid(format!(
                "node subnet prefix /{prefix_len} must be between /{} and /30",
                pool.prefix_len()
            )));
        }
        Ok(Self {
            pool: pool.trunc(),
            prefix_len,
        })
    }

    /// The pool.
    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

    /// The lowest subnet of the pool that overlaps none of `taken`.
    pub fn allocate<'a>(
        &self,
        taken: impl IntoIterator<Item = &'a Ipv4Net>,
    ) -> Result<Ipv4Net, IpamError> {
        let taken: Vec<Ipv4Net> = taken.into_iter().copied().collect();
        let subnets = self
            .pool
            .subnets(self.prefix_len)
            .map_err(|e| IpamError::Invalid(e.to_string()))?;
        for candidate in subnets {
            if !taken
                .iter()
                .any(|t| t.contains(&candidate) || candidate.contains(t))
            {
                return Ok(candidate);
            }
        }
        Err(IpamError::Exhausted(format!(
            "node subnet pool {}",
            self.pool
        )))
    }
}

/// Hands out single service VIPs from a range, skipping its network and broadcast addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipPool {
    range: Ipv4Net,
}

impl VipPool {
    /// A VIP pool over `range` (at most /30 so it has usable hosts).
    pub fn new(range: Ipv4Net) -> Result<Self, IpamError> {
        if range.prefix_len() > 30 {
            return Err(IpamError::Invalid(format!(
                "vip range {range} is too small (needs /30 or wider)"
            )));
        }
        Ok(Self {
            range: range.trunc(),
        })
    }

    /// The range.
    pub fn range(&self) -> Ipv4Net {
        self.range
    }

    /// The lowest address of the range that is not in `taken`.
    pub fn allocate<'a>(
        &self,
        taken: impl IntoIterator<Item = &'a Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        let taken: HashSet<Ipv4Addr> = taken.into_iter().copied().collect();
        self.range
            .hosts()
            .find(|a| !taken.contains(a))
            .ok_or_else(|| IpamError::Exhausted(format!("vip range {}", self.range)))
    }
}

/// The first host of `subnet` (the bridge/gateway address).
pub fn gateway_of(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1))
}

/// Whether `ip` can be a task's address in the node subnet `subnet`: inside it, and neither
/// the network address, the gateway (the node's bridge, first host) nor the broadcast address.
/// Task addresses come from the reporting agent; the leader keeps only those that pass this
/// check, and every consumer of the network map checks again, so a worker cannot point other
/// nodes' routing mesh or DNS at loopback, the metadata service or another node's tasks.
pub fn is_task_addr(subnet: Ipv4Net, ip: Ipv4Addr) -> bool {
    let subnet = subnet.trunc();
    subnet.contains(&ip)
        && ip != subnet.network()
        && ip != subnet.broadcast()
        && ip != gateway_of(subnet)
}

/// The 4-hex-digit tag of a user-defined network, part of its bridge's and allocation file's
/// names on every node (FNV-1a, folded to 16 bits). The manager refuses a new network whose
/// tag another one has.
pub fn network_tag(name: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:04x}", (h ^ (h >> 16)) & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("net")
    }

    #[test]
    fn node_subnets_lowest_free_and_exhaustion() {
        let p = NodeSubnets::new(net("10.200.0.0/22"), 24).expect("pool");
        assert_eq!(p.allocate(&[]).expect("a"), net("10.200.0.0/24"));
        let taken = [net("10.200.0.0/24"), net("10.200.2.0/24")];
        assert_eq!(p.allocate(&taken).expect("b"), net("10.200.1.0/24"));
        let taken = [
            net("10.200.0.0/24"),
            net("10.200.1.0/24"),
            net("10.200.2.0/24"),
            net("10.200.3.0/24"),
        ];
        assert!(matches!(p.allocate(&taken), Err(IpamError::Exhausted(_))));
        // a wider taken range overlapping several candidates blocks them all
        let taken = [net("10.200.0.0/23")];
        assert_eq!(p.allocate(&taken).expect("c"), net("10.200.2.0/24"));
        assert!(NodeSubnets::new(net("10.200.0.0/16"), 8).is_err());
        assert!(NodeSubnets::new(net("10.200.0.0/16"), 31).is_err());
    }

    #[test]
    fn vip_pool_skips_network_and_broadcast() {
        let p = VipPool::new(net("10.199.0.0/30")).expect("pool");
        let a = p.allocate(&[]).expect("a");
        assert_eq!(a, Ipv4Addr::new(10, 199, 0, 1));
        let b = p.allocate(&[a]).expect("b");
        assert_eq!(b, Ipv4Addr::new(10, 199, 0, 2));
        assert!(matches!(p.allocate(&[a, b]), Err(IpamError::Exhausted(_))));
        assert!(VipPool::new(net("10.199.0.0/31")).is_err());
    }

    #[test]
    fn gateway_is_first_host() {
        assert_eq!(
            gateway_of(net("10.200.7.0/29")),
            Ipv4Addr::new(10, 200, 7, 1)
        );
        // not truncated first: still the host after the network address
        assert_eq!(
            gateway_of(net("10.200.7.5/29")),
            Ipv4Addr::new(10, 200, 7, 1)
        );
    }

    #[test]
    fn network_tags_are_four_hex_digits_and_stable() {
        assert_eq!(network_tag("front").len(), 4);
        assert_eq!(network_tag("front"), network_tag("front"));
        assert_ne!(network_tag("front"), network_tag("back"));
        assert!(network_tag("").chars().all(|c| c.is_ascii_hexdigit()));
    }
}
