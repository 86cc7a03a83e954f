//! The node bridge: tasks' veths hang off it, it holds the gateway address.

use ipnet::Ipv4Net;
use rtnetlink::LinkBridge;

use crate::error::errno;
use crate::link::{self, validate_ifname};
use crate::{Error, Net, Result};

/// Makes sure bridge `name` exists with `gateway` (gateway address with the node subnet's
/// prefix, e.g. `10.200.3.1/24`) and MTU `mtu`, is up, has IPv6 off, and that
/// `net.ipv4.ip_forward` is 1 in `net`. Idempotent. Returns the bridge's index.
pub async fn ensure_bridge(net: &Net, name: &str, gateway: Ipv4Net, mtu: u32) -> Result<u32> {
    validate_ifname(name)?;
    let idx = match link::get(net, name).await? {
        Some(m) => {
            if link::kind_of(&m) != Some(rtnetlink::packet_route::link::InfoKind::Bridge) {
                return Err(Error::Invalid(format!(
                    "link {name} exists and is not a bridge"
                )));
            }
            m.header.index
        }
        None => {
            let msg = LinkBridge::new(name).mtu(mtu).up().build();
            match net.handle().link().add(msg).execute().await {
                Ok(()) => tracing::info!(bridge = name, "created bridge"),
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(Error::netlink(format!("create bridge {name}"), e)),
            }
            link::require(net, name).await?.header.index
        }
    };
    link::ensure_address(net, idx, gateway).await?;
    link::set_up(net, name).await?;
    let ifname = name.to_string();
    net.run(move || -> Result<()> {
        // Only write on change: a write resets per-interface forwarding settings.
        if crate::read_sysctl("net.ipv4.ip_forward")? != "1" {
            crate::write_sysctl("net.ipv4.ip_forward", "1")?;
        }
        disable_ipv6(&ifname)
    })
    .await??;
    Ok(idx)
}

/// Turns IPv6 off on the bridge device itself (not on its ports): task networks are IPv4
/// only, and the bridge's link-local address would otherwise let tasks reach every host
/// listener bound to `[::]`, past the IPv4 input rules of [`crate::nat`]. Frames between
/// tasks are bridged below IP and are not affected. A kernel without IPv6 needs nothing.
fn disable_ipv6(ifname: &str) -> Result<()> {
    let p = std::path::Path::new("/proc/sys/net/ipv6/conf")
        .join(ifname)
        .join("disable_ipv6");
    match std::fs::read_to_string(&p) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => {
            std::fs::write(&p, "1").map_err(|e| Error::io(format!("write {}", p.display()), e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
    }
}

/// Deletes link `name` (bridge or other); returns whether it existed.
pub async fn delete_link(net: &Net, name: &str) -> Result<bool> {
    link::delete(net, name).await
}
