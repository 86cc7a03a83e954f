//! The node bridge: tasks' veths hang off it, it holds the gateway address.

use ipnet::Ipv4Net;
use rtnetlink::LinkBridge;

use crate::error::errno;
use crate::link::{self, validate_ifname};
use crate::{Error, Net, Result};

/// Makes sure bridge `name` exists with `gateway` (gateway address with the node subnet's
/// prefix, e.g. `10.200.3.1/24`) and MTU `mtu`, is up, and that `net.ipv4.ip_forward` is 1
/// in `net`. Idempotent. Returns the bridge's index.
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
    net.run(|| -> Result<()> {
        // Only write on change: a write resets per-interface forwarding settings.
        if crate::read_sysctl("net.ipv4.ip_forward")? != "1" {
            crate::write_sysctl("net.ipv4.ip_forward", "1")?;
        }
        Ok(())
    })
    .await??;
    Ok(idx)
}

/// Deletes link `name` (bridge or other); returns whether it existed.
pub async fn delete_link(net: &Net, name: &str) -> Result<bool> {
    link::delete(net, name).await
}
