//! Kernel VXLAN overlay, flannel-style L3.
//!
//! Every node has one VXLAN device (learning off) whose MAC is derived from the node subnet
//! ([`vtep_mac`]: `02:f1:` + the subnet's four octets) and whose address is the subnet's
//! network address /32. For each peer, [`set_peers`] installs
//!
//! * route `peer.subnet via <peer network addr> dev <vx> onlink metric 100`,
//! * permanent neighbour `<peer network addr> lladdr <peer MAC> dev <vx>`,
//! * fdb entry `<peer MAC> dev <vx> dst <peer underlay> self permanent`,
//!
//! so no address exchange beyond (underlay, subnet) is needed.
//!
//! Several nodes in one namespace (tests, `dev`): the kernel refuses a second VXLAN device
//! with the same VNI and port in a namespace, whatever its `local` address
//! ([`Error::VxlanInUse`]); different VNIs or ports coexist. Such nodes reach each other
//! through their bridges, so [`set_peers`] skips every peer whose subnet is already routed
//! through another device, and a node that got [`Error::VxlanInUse`] can run without
//! overlay (it is then reachable only from nodes in the same namespace).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};

use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::error::errno;
use crate::link::{self, validate_ifname};
use crate::route::{main_routes, route_dst, route_oif};
use crate::{Error, Net, Result};

/// Metric of overlay routes. Higher than a connected route's (0), so when a subnet
/// becomes local (another node's bridge appears in this namespace) the kernel prefers the
/// bridge at once, before [`set_peers`] removes the overlay route.
pub const ROUTE_METRIC: u32 = 100;

/// Default VXLAN UDP port (the Linux/flannel one, not IANA 4789, which Docker uses).
pub const DEFAULT_PORT: u16 = 8472;

/// The VTEP MAC of the node owning `subnet`: `02:f1:a:b:c:d` for subnet `a.b.c.d/n`.
pub fn vtep_mac(subnet: Ipv4Net) -> [u8; 6] {
    let o = subnet.network().octets();
    [0x02, 0xf1, o[0], o[1], o[2], o[3]]
}

/// The local VXLAN device [`ensure_vxlan`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    /// Device name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// This node's underlay address.
    pub local: Ipv4Addr,
    /// This node's subnet (gives the MAC and the device address).
    pub subnet: Ipv4Net,
    /// MTU of the device (underlay MTU - 50).
    pub mtu: u32,
}

/// One other node, as seen by the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OverlayPeer {
    /// The peer's underlay address.
    pub underlay: Ipv4Addr,
    /// The peer's node subnet.
    pub subnet: Ipv4Net,
    /// The peer's blocks of user-defined networks, routed through the peer's VTEP like its
    /// subnet.
    pub extra: Vec<Ipv4Net>,
}

/// What [`set_peers`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeersApplied {
    /// Subnets now routed through the overlay.
    pub routed: Vec<Ipv4Net>,
    /// Subnets skipped because another device already routes them (same namespace).
    pub skipped_local: Vec<Ipv4Net>,
    /// Subnets whose entries were removed.
    pub removed: Vec<Ipv4Net>,
}

fn vxlan_params(
    m: &rtnetlink::packet_route::link::LinkMessage,
) -> (Option<u32>, Option<u16>, Option<Ipv4Addr>) {
    let (mut id, mut port, mut local) = (None, None, None);
    for a in &m.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                if let LinkInfo::Data(InfoData::Vxlan(v)) = i {
                    for x in v {
                        match x {
                            InfoVxlan::Id(n) => id = Some(*n),
                            InfoVxlan::Port(p) => port = Some(*p),
                            InfoVxlan::Local(l) => local = Some(*l),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    (id, port, local)
}

/// Makes sure the VXLAN device exists as described, carries `<subnet network>/32`, has the
/// VTEP MAC and is up; a device of that name with other parameters is made again.
/// Returns its index, or [`Error::VxlanInUse`] when another device has the VNI and port.
pub async fn ensure_vxlan(net: &Net, v: &Vxlan) -> Result<u32> {
    validate_ifname(&v.name)?;
    let mac = vtep_mac(v.subnet);
    if let Some(m) = link::get(net, &v.name).await? {
        let same = link::kind_of(&m) == Some(InfoKind::Vxlan)
            && vxlan_params(&m) == (Some(v.vni), Some(v.port), Some(v.local));
        if !same {
            tracing::info!(vxlan = %v.name, "vxlan device differs, recreating");
            link::delete(net, &v.name).await?;
        }
    }
    let idx = match link::get(net, &v.name).await? {
        Some(m) => m.header.index,
        None => {
            let msg = LinkVxlan::new(&v.name, v.vni)
                .port(v.port)
                .local(v.local)
                .learning(false)
                .mtu(v.mtu)
                .address(mac.to_vec())
                .build();
            match net.handle().link().add(msg).execute().await {
                Ok(()) => tracing::info!(vxlan = %v.name, vni = v.vni, "created vxlan device"),
                Err(e) if errno(&e) == Some(libc::EEXIST) => {
                    if link::index(net, &v.name).await?.is_none() {
                        return Err(Error::VxlanInUse {
                            vni: v.vni,
                            port: v.port,
                        });
                    }
                }
                Err(e) => return Err(Error::netlink(format!("create vxlan {}", v.name), e)),
            }
            link::require(net, &v.name).await?.header.index
        }
    };
    let m = link::require(net, &v.name).await?;
    let has_mac = m
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Address(x) if x.as_slice() == mac));
    if !has_mac
        || m.attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Mtu(x) if *x != v.mtu))
    {
        net.handle()
            .link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .address(mac.to_vec())
                    .mtu(v.mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("set mac/mtu of {}", v.name), e))?;
    }
    let own = Ipv4Net::new(v.subnet.network(), 32).map_err(|e| Error::Invalid(e.to_string()))?;
    link::ensure_address(net, idx, own).await?;
    link::set_up(net, &v.name).await?;
    Ok(idx)
}

async fn neighbours(net: &Net, family: AddressFamily, index: u32) -> Result<Vec<NeighbourMessage>> {
    let all: Vec<NeighbourMessage> = net
        .handle()
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list neighbours", e))?;
    Ok(all
        .into_iter()
        .filter(|n| n.header.ifindex == index)
        .collect())
}

fn neigh_lladdr(n: &NeighbourMessage) -> Option<Vec<u8>> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
        _ => None,
    })
}

fn neigh_dst(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(*a),
        // fdb (AF_BRIDGE) dumps carry the VTEP address undecoded
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

/// Converges the overlay entries of device `name` to `peers`: adds or replaces route,
/// neighbour and fdb entry for each peer whose subnet no other device routes, and removes
/// the entries of every other subnet. Idempotent.
pub async fn set_peers(net: &Net, name: &str, peers: &[OverlayPeer]) -> Result<PeersApplied> {
    let vx = link::require(net, name).await?.header.index;
    let routes = main_routes(net).await?;
    let mut out = PeersApplied::default();
    let mut want: Vec<OverlayPeer> = Vec::new();
    for p in peers {
        let subnet = p.subnet.trunc();
        let local = routes
            .iter()
            .any(|r| route_dst(r) == Some(subnet) && route_oif(r).is_some_and(|o| o != vx));
        if local {
            out.skipped_local.push(subnet);
        } else if !want.iter().any(|w| w.subnet == subnet) {
            // Blocks another device routes (a node of this namespace) are left to it.
            let extra: Vec<Ipv4Net> = p
                .extra
                .iter()
                .map(|b| b.trunc())
                .filter(|b| {
                    !routes
                        .iter()
                        .any(|r| route_dst(r) == Some(*b) && route_oif(r).is_some_and(|o| o != vx))
                })
                .collect();
            want.push(OverlayPeer {
                underlay: p.underlay,
                subnet,
                extra,
            });
        }
    }
    let h = net.handle();
    for p in &want {
        let gw = p.subnet.network();
        let mac = vtep_mac(p.subnet);
        h.neighbours()
            .add(vx, IpAddr::V4(gw))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("neighbour {gw} on {name}"), e))?;
        h.neighbours()
            .add_bridge(vx, &mac)
            .destination(IpAddr::V4(p.underlay))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("fdb {} on {name}", p.underlay), e))?;
        for dst in std::iter::once(p.subnet).chain(p.extra.iter().copied()) {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .gateway(gw)
                .output_interface(vx)
                .onlink()
                .priority(ROUTE_METRIC)
                .build();
            h.route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| Error::netlink(format!("route {dst} on {name}"), e))?;
            out.routed.push(dst);
        }
    }

    // Remove what is no longer wanted.
    let want_subnets: HashSet<Ipv4Net> = want
        .iter()
        .flat_map(|p| std::iter::once(p.subnet).chain(p.extra.iter().copied()))
        .collect();
    let want_gws: HashSet<Ipv4Addr> = want.iter().map(|p| p.subnet.network()).collect();
    let want_macs: HashSet<[u8; 6]> = want.iter().map(|p| vtep_mac(p.subnet)).collect();
    for r in main_routes(net).await? {
        if route_oif(&r) != Some(vx) {
            continue;
        }
        let Some(dst) = route_dst(&r) else { continue };
        if want_subnets.contains(&dst) {
            continue;
        }
        match h.route().del(r).execute().await {
            Ok(()) => out.removed.push(dst),
            Err(e) if errno(&e) == Some(libc::ESRCH) => {}
            Err(e) => return Err(Error::netlink(format!("delete route {dst} on {name}"), e)),
        }
    }
    for n in neighbours(net, AddressFamily::Inet, vx).await? {
        let Some(dst) = neigh_dst(&n) else { continue };
        if want_gws.contains(&dst) {
            continue;
        }
        let mut m = NeighbourMessage::default();
        m.header = n.header.clone();
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        match h.neighbours().del(m).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(Error::netlink(
                    format!("delete neighbour {dst} on {name}"),
                    e,
                ))
            }
        }
    }
    for n in neighbours(net, AddressFamily::Bridge, vx).await? {
        let Some(mac) = neigh_lladdr(&n) else {
            continue;
        };
        if mac.len() == 6 && want_macs.iter().any(|w| w.as_slice() == mac.as_slice()) {
            continue;
        }
        let mut m = NeighbourMessage::default();
        m.header = n.header.clone();
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.clone()));
        if let Some(dst) = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(d) => Some(d.clone()),
            _ => None,
        }) {
            m.attributes.push(NeighbourAttribute::Destination(dst));
        }
        match h.neighbours().del(m).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => return Err(Error::netlink(format!("delete fdb entry on {name}"), e)),
        }
    }
    tracing::debug!(
        vxlan = name,
        routed = out.routed.len(),
        skipped = out.skipped_local.len(),
        removed = out.removed.len(),
        "overlay peers set"
    );
    Ok(out)
}

/// The overlay entries currently programmed on device `name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayState {
    /// Routes through the device (main table).
    pub routes: Vec<Ipv4Net>,
    /// IPv4 neighbour entries on the device.
    pub neighbours: Vec<Ipv4Addr>,
    /// fdb entries: VTEP MAC and underlay destination.
    pub fdb: Vec<([u8; 6], Option<Ipv4Addr>)>,
}

/// Reads the routes, neighbours and fdb entries of device `name` (diagnostics, tests).
pub async fn state(net: &Net, name: &str) -> Result<OverlayState> {
    let vx = link::require(net, name).await?.header.index;
    let mut st = OverlayState::default();
    for r in main_routes(net).await? {
        if route_oif(&r) == Some(vx) {
            if let Some(d) = route_dst(&r) {
                st.routes.push(d);
            }
        }
    }
    for n in neighbours(net, AddressFamily::Inet, vx).await? {
        if let Some(d) = neigh_dst(&n) {
            st.neighbours.push(d);
        }
    }
    for n in neighbours(net, AddressFamily::Bridge, vx).await? {
        if let Some(mac) = neigh_lladdr(&n) {
            if let Ok(mac) = <[u8; 6]>::try_from(mac.as_slice()) {
                st.fdb.push((mac, neigh_dst(&n)));
            }
        }
    }
    st.routes.sort();
    st.neighbours.sort();
    st.fdb.sort();
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_from_subnet() {
        let s: Ipv4Net = "10.200.3.0/24".parse().expect("net");
        assert_eq!(vtep_mac(s), [0x02, 0xf1, 10, 200, 3, 0]);
    }
}
