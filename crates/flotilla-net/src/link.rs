//! Small netlink helpers on links and addresses, shared by the other modules.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::errno;
use crate::{Error, Net, Result};

/// Longest interface name the kernel accepts.
pub const IFNAMSIZ_MAX: usize = 15;

/// Rejects names the kernel would refuse.
pub fn validate_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > IFNAMSIZ_MAX
        || name.contains(['/', ' ', ':', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(Error::Invalid(format!(
            "interface name {name:?} (1-15 chars, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

/// The link called `name`, if any.
pub(crate) async fn get(net: &Net, name: &str) -> Result<Option<LinkMessage>> {
    validate_ifname(name)?;
    let mut s = net.handle().link().get().match_name(name).execute();
    match s.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(Error::netlink(format!("get link {name}"), e)),
    }
}

/// The index of link `name`, if it exists.
pub async fn index(net: &Net, name: &str) -> Result<Option<u32>> {
    Ok(get(net, name).await?.map(|m| m.header.index))
}

pub(crate) async fn require(net: &Net, name: &str) -> Result<LinkMessage> {
    get(net, name)
        .await?
        .ok_or_else(|| Error::LinkNotFound(name.to_string()))
}

/// Names of every link in the namespace.
pub async fn names(net: &Net) -> Result<Vec<String>> {
    let links: Vec<LinkMessage> = net
        .handle()
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list links", e))?;
    Ok(links.iter().filter_map(name_of).collect())
}

pub(crate) fn name_of(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

pub(crate) fn kind_of(m: &LinkMessage) -> Option<InfoKind> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// Sets link `name` administratively up.
pub async fn set_up(net: &Net, name: &str) -> Result<()> {
    let idx = require(net, name).await?.header.index;
    net.handle()
        .link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("set {name} up"), e))
}

/// Deletes link `name`; returns whether it existed.
pub async fn delete(net: &Net, name: &str) -> Result<bool> {
    let Some(idx) = index(net, name).await? else {
        return Ok(false);
    };
    match net.handle().link().del(idx).execute().await {
        Ok(()) => {
            tracing::debug!(link = name, "deleted link");
            Ok(true)
        }
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(Error::netlink(format!("delete link {name}"), e)),
    }
}

/// IPv4 addresses (with prefix) on link `index`.
pub async fn addresses(net: &Net, index: u32) -> Result<Vec<Ipv4Net>> {
    let msgs: Vec<_> = net
        .handle()
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list addresses", e))?;
    let mut out = Vec::new();
    for m in msgs {
        if m.header.index != index {
            continue;
        }
        for a in &m.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip))
            | AddressAttribute::Address(IpAddr::V4(ip)) = a
            {
                if let Ok(n) = Ipv4Net::new(*ip, m.header.prefix_len) {
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Adds `addr` to link `index` unless it is already there.
pub async fn ensure_address(net: &Net, index: u32, addr: Ipv4Net) -> Result<()> {
    if addresses(net, index).await?.contains(&addr) {
        return Ok(());
    }
    match net
        .handle()
        .address()
        .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(Error::netlink(format!("add address {addr}"), e)),
    }
}

/// Creates a veth pair: `name` in `net`, `peer` directly in the namespace at `peer_netns`.
pub async fn create_veth(
    net: &Net,
    name: &str,
    peer: &str,
    peer_netns: &Path,
    mtu: u32,
) -> Result<()> {
    validate_ifname(name)?;
    validate_ifname(peer)?;
    let ns = std::fs::File::open(peer_netns)
        .map_err(|e| Error::io(format!("open netns {}", peer_netns.display()), e))?;
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .mtu(mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(name, peer)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    let r = net.handle().link().add(msg).execute().await;
    drop(ns);
    r.map_err(|e| Error::netlink(format!("create veth {name}/{peer}"), e))
}

/// Adds (or replaces) the route to `dst` via `gateway` on link `index`.
pub async fn replace_route(net: &Net, index: u32, dst: Ipv4Net, gateway: Ipv4Addr) -> Result<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .gateway(gateway)
        .output_interface(index)
        .build();
    net.handle()
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("route {dst} via {gateway}"), e))
}

/// Replaces the default route of `net` with one via `gateway` on link `index`.
pub async fn replace_default_route(net: &Net, index: u32, gateway: Ipv4Addr) -> Result<()> {
    replace_route(net, index, Ipv4Net::default(), gateway).await
}
