//! Node-level network plumbing for Flotilla task networking.
//!
//! Everything here acts on one network namespace at a time, named by a [`Net`] handle
//! ([`Net::current`] for the agent's own namespace, [`Net::open`] for a namespace file).
//! Links, addresses, routes, neighbours and fdb entries go through rtnetlink; iptables is
//! the only program run (`iptables -w`, as Docker does); sysctls are written to `/proc/sys`
//! from a thread that sits in the right namespace.
//!
//! | module | what |
//! |---|---|
//! | [`ipam`] | task addresses (persisted JSON); re-exports the leader's pure allocators (node subnets, service VIPs) from `flotilla_control::ipam` |
//! | [`netns`] | named network namespaces (bind-mounted nsfs files under a run dir), `run_in` |
//! | [`bridge`] | the node bridge holding the gateway address, `ip_forward` |
//! | [`task`] | one veth per task: host end on the bridge, `eth0` in the task namespace |
//! | [`nat`] | per-node iptables chains: `FLT-<tag>-POST` (NAT), `FLT-<tag>-FWD` (nothing from outside into task subnets), `FLT-<tag>-IN` + `-NODE` + `-PUB` (VXLAN only from nodes, host closed to tasks) |
//! | [`overlay`] | kernel VXLAN, flannel-style L3 with deterministic VTEP MACs |
//! | [`route`] | local (AnyIP) routes on `lo`: the VIP pool as local addresses, one metric per node |
//! | [`crypt`] | encrypted tunnel between nodes: userspace AES-256-GCM over TUN + UDP (no WireGuard/ESP needed) |
//! | [`cleanup`] | find and remove everything a node left behind |
//!
//! Call order for the agent (all `async` calls take a [`Net`]; `host` is
//! `Net::current()` in the agent, which runs in the host namespace):
//!
//! * **node start** (subnet from `ipam::NodeSubnets`, allocated on the leader side by
//!   `flotilla_control::allocate`):
//!   1. [`bridge::ensure_bridge`]`(&host, "fltbr0", TaskAddrs::gateway_net(), mtu)`
//!      (also sets `net.ipv4.ip_forward=1`);
//!   2. [`nat::ensure`]`(&host, &NatRules { tag, subnet, bridge, overlay, cluster_pool,
//!      outbound_nat, trusted_ifaces, vxlan_port, dns, vip_pool })`;
//!   3. [`overlay::ensure_vxlan`]`(&host, &Vxlan { .. })`; [`Error::VxlanInUse`] means
//!      another node owns the VNI/port in this namespace: run without overlay;
//!   4. [`overlay::set_peers`]`(&host, vx, &peers)` now and on every change of the node list
//!      (all nodes, self included: the own subnet is skipped), and after every
//!      `ensure_vxlan` (re-creating the device drops its entries); at the same place
//!      [`nat::set_nodes`]`(&host, tag, &underlays)` (the VXLAN allow-list);
//!   5. [`nat::set_published`]`(&host, tag, &ports)` whenever the published ports change;
//!   6. [`route::ensure_local`]`(&host, vip_pool, metric)` with the node's own metric, so
//!      the mesh can listen on every VIP.
//! * **task start**: [`ipam::TaskAddrs::allocate`]; the OCI runtime creates the container
//!   with a new network namespace (inside its user namespace, so `runc exec` can join it);
//!   [`netns::adopt`]`(run_dir, task_id, init_pid)` names it (blocking: use
//!   `spawn_blocking`); [`task::attach`] with [`task::host_ifname`]`("fltv", task_id)`; then
//!   start the process. [`netns::create`] makes a host-owned namespace for other uses.
//! * **agent restart**: the same calls again; all of them are idempotent and keep what
//!   exists (`attach` keeps a working veth).
//! * **task stop**: [`task::detach`]; [`netns::remove`]; [`ipam::TaskAddrs::release`].
//! * **node cleanup**: [`cleanup::remove_all`] with the node's link prefixes, run dir and
//!   tag ([`cleanup::leftovers`] lists the same without removing), and
//!   [`route::remove_local`]`(&host, vip_pool, metric)` ([`route::local_exists`] to list it).
//!
//! Limitation: two VXLAN devices with the same VNI and destination port cannot coexist in
//! one network namespace (the kernel refuses the second with "A VXLAN device with the
//! specified VNI already exists", whatever the `local` address); see [`overlay`].

// `unsafe` only in `crypt` (the TUN ioctls), each block with a SAFETY comment.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod bridge;
pub mod cleanup;
pub mod crypt;
mod error;
pub mod ipam;
pub mod link;
pub mod nat;
mod net;
pub mod netns;
pub mod overlay;
pub mod resolv;
pub mod route;
mod sysctl;
pub mod task;

pub use error::{Error, Result};
pub use net::Net;
pub use sysctl::{read_sysctl, write_sysctl};
