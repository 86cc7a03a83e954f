//! Local (AnyIP) routes: a whole address range made local to the namespace.
//!
//! `ip route replace local POOL dev lo table local metric M` makes every address of `POOL`
//! an address of this host without putting any of them on an interface: the kernel accepts
//! packets for them and lets sockets bind to them (AnyIP). The node uses it for the service
//! VIP pool, so the routing mesh can listen on `VIP:port` for any VIP without adding one
//! address per service.
//!
//! Each node identifies its entry by a metric of its own. Several nodes sharing one network
//! namespace (tests, `dev`) then each own a separate route for the same pool, and each
//! removes only its own when it is cleaned up, leaving the others' VIPs working.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::RouteMessageBuilder;

use crate::error::errno;
use crate::{link, Error, Net, Result};

/// The kernel's `local` routing table (255).
const TABLE_LOCAL: u8 = 255;

fn local_route(pool: Ipv4Net, lo: u32, metric: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(pool.network(), pool.prefix_len())
        .output_interface(lo)
        .priority(metric)
        .table_id(u32::from(TABLE_LOCAL))
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build()
}

/// Adds (or replaces) the local route of `pool` on `lo` with `metric`
/// (`ip route replace local POOL dev lo table local metric M`). Idempotent.
pub async fn ensure_local(net: &Net, pool: Ipv4Net, metric: u32) -> Result<()> {
    let pool = pool.trunc();
    let lo = link::index(net, "lo")
        .await?
        .ok_or_else(|| Error::LinkNotFound("lo".into()))?;
    net.handle()
        .route()
        .add(local_route(pool, lo, metric))
        .replace()
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("add local route {pool} metric {metric}"), e))
}

/// Removes the local route of `pool` with `metric`; returns whether there was one (a
/// missing route, or a namespace without `lo`, is `Ok(false)`). Other metrics' routes for
/// the same pool stay.
pub async fn remove_local(net: &Net, pool: Ipv4Net, metric: u32) -> Result<bool> {
    let pool = pool.trunc();
    let Some(lo) = link::index(net, "lo").await? else {
        return Ok(false);
    };
    match net
        .handle()
        .route()
        .del(local_route(pool, lo, metric))
        .execute()
        .await
    {
        Ok(()) => {
            tracing::debug!(%pool, metric, "deleted local route");
            Ok(true)
        }
        Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(false),
        Err(e) => Err(Error::netlink(
            format!("delete local route {pool} metric {metric}"),
            e,
        )),
    }
}

/// Whether the local route of `pool` with `metric` exists (errors read as `false`).
pub async fn local_exists(net: &Net, pool: Ipv4Net, metric: u32) -> bool {
    let pool = pool.trunc();
    let filter = RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(u32::from(TABLE_LOCAL))
        .build();
    let mut routes = net.handle().route().get(filter).execute();
    while let Ok(Some(r)) = routes.try_next().await {
        if is_local_route(&r, pool, metric) {
            return true;
        }
    }
    false
}

fn is_local_route(r: &RouteMessage, pool: Ipv4Net, metric: u32) -> bool {
    let mut table = u32::from(r.header.table);
    let mut dst = None;
    let mut priority = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Priority(p) => priority = Some(*p),
            _ => {}
        }
    }
    table == u32::from(TABLE_LOCAL)
        && r.header.kind == RouteType::Local
        && dst == Some(pool.network())
        && r.header.destination_prefix_length == pool.prefix_len()
        && priority == Some(metric)
}

/// A route's IPv4 destination.
pub(crate) fn route_dst(r: &RouteMessage) -> Option<Ipv4Net> {
    let a = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(*a),
        _ => None,
    })?;
    Ipv4Net::new(a, r.header.destination_prefix_length).ok()
}

/// A route's output interface.
pub(crate) fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// A route's table.
pub(crate) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// The IPv4 routes of the main table.
pub(crate) async fn main_routes(net: &Net) -> Result<Vec<RouteMessage>> {
    let all: Vec<RouteMessage> = net
        .handle()
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list routes", e))?;
    Ok(all
        .into_iter()
        .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .collect())
}
