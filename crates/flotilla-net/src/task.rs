//! One veth pair per task: the host end on the node bridge, `eth0` in the task namespace.
//!
//! The peer is created directly inside the task namespace under its final name (one
//! netlink request with `IFLA_NET_NS_FD` on the peer), so no temporary name ever appears
//! in the host namespace and nothing is left half-moved by a crash.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use rtnetlink::{LinkBridgePort, LinkUnspec};

use crate::link::{self, validate_ifname};
use crate::{Error, Net, Result};

/// Name of the interface inside the task namespace.
pub const TASK_IFNAME: &str = "eth0";

/// What [`attach`] wires up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLink {
    /// The task's network namespace file (from [`crate::netns::adopt`] or
    /// [`crate::netns::create`]).
    pub netns: PathBuf,
    /// Host end name, at most 15 chars (e.g. [`host_ifname`] of the task id).
    pub host_ifname: String,
    /// The node bridge.
    pub bridge: String,
    /// The task address with the node subnet's prefix, e.g. `10.200.3.7/24`.
    pub addr: Ipv4Net,
    /// The gateway (bridge address).
    pub gateway: Ipv4Addr,
    /// MTU of both ends.
    pub mtu: u32,
}

/// A host interface name for a task: `prefix` + the first hex chars of an FNV-1a hash of
/// the task id, 15 chars at most.
pub fn host_ifname(prefix: &str, task_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let hex = format!("{h:016x}");
    let keep = link::IFNAMSIZ_MAX.saturating_sub(prefix.len()).min(8);
    format!("{prefix}{}", &hex[..keep])
}

/// Connects the task namespace to the bridge: veth pair, host end on the bridge and up,
/// `eth0` with `addr` up in the namespace, default route via `gateway`.
///
/// Re-entrant: if the host end exists and `eth0` already carries `addr`, only the cheap
/// settings are re-applied (agent restart). A half-made pair is deleted and made again.
pub async fn attach(host: &Net, t: &TaskLink) -> Result<()> {
    attach_as(host, t, TASK_IFNAME, None).await
}

/// Connects the task namespace to another network's bridge (a user-defined network): like
/// [`attach`], with the inner end named `ifname` (`eth1`, …) and, instead of the default
/// route, a route to the network's whole `range` via `t.gateway`.
pub async fn attach_extra(host: &Net, t: &TaskLink, ifname: &str, range: Ipv4Net) -> Result<()> {
    attach_as(host, t, ifname, Some(range)).await
}

async fn attach_as(host: &Net, t: &TaskLink, inner_if: &str, range: Option<Ipv4Net>) -> Result<()> {
    validate_ifname(&t.host_ifname)?;
    validate_ifname(inner_if)?;
    validate_ifname(&t.bridge)?;
    if !t.addr.contains(&t.gateway) {
        return Err(Error::Invalid(format!(
            "gateway {} is outside the task subnet {}",
            t.gateway, t.addr
        )));
    }
    let bridge = link::require(host, &t.bridge).await?.header.index;
    let inner = Net::open(&t.netns)?;

    let existing = link::get(host, &t.host_ifname).await?;
    let reuse = match (&existing, link::index(&inner, inner_if).await?) {
        (Some(_), Some(idx)) => link::addresses(&inner, idx).await?.contains(&t.addr),
        _ => false,
    };
    if !reuse {
        // Leftovers of an interrupted attach: remove both ends before starting over.
        if existing.is_some() {
            link::delete(host, &t.host_ifname).await?;
        }
        link::delete(&inner, inner_if).await?;
        link::create_veth(host, &t.host_ifname, inner_if, &t.netns, t.mtu).await?;
    }

    let hidx = link::require(host, &t.host_ifname).await?.header.index;
    host.handle()
        .link()
        .set(
            LinkUnspec::new_with_index(hidx)
                .controller(bridge)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("attach {} to {}", t.host_ifname, t.bridge), e))?;
    // Hairpin: a task's connection to its own service's VIP can be NATed back to the task
    // itself. With `br_netfilter` on, the bridge then forwards the frame out of the port it
    // came in by, which a bridge port refuses unless it is in hairpin mode.
    host.handle()
        .link()
        .set_port(LinkBridgePort::new(hidx).hairpin(true).build())
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("hairpin mode on {}", t.host_ifname), e))?;

    let eidx = link::require(&inner, inner_if).await?.header.index;
    link::ensure_address(&inner, eidx, t.addr).await?;
    link::set_up(&inner, inner_if).await?;
    match range {
        None => link::replace_default_route(&inner, eidx, t.gateway).await?,
        Some(r) => link::replace_route(&inner, eidx, r.trunc(), t.gateway).await?,
    }
    tracing::debug!(host_if = %t.host_ifname, addr = %t.addr, reused = reuse, "task attached");
    Ok(())
}

/// Deletes the host end (the peer goes with it); returns whether it existed.
pub async fn detach(host: &Net, host_ifname: &str) -> Result<bool> {
    link::delete(host, host_ifname).await
}
