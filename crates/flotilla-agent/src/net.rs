//! Task networking on a node: the agent turns the network map into a bridge, per-task
//! namespaces, the overlay, the routing mesh and DNS. (Addresses are allocated on the leader:
//! `flotilla_control::allocate`.)
//!
//! - **Node setup** (agent, once the node knows its subnet): bridge `fltbr<tag>` holding the
//!   gateway (first host address), NAT chains `FLT-<tag>-*`, a VXLAN device `fltvx<tag>` unless
//!   another node in this network namespace already has the overlay (nodes run as processes
//!   of one host in tests), a local route for the VIP pool so VIPs are local addresses, and
//!   the DNS responder on the gateway, port 53.
//! - **Tasks**: an address from the node subnet (persisted in `DATA/net/ipam.json`), a network
//!   namespace under `DATA/run/net/netns/`, a veth pair, `/etc/hosts` and `/etc/resolv.conf`.
//! - **Network map** (streamed from a manager): overlay peers, DNS records, the routing
//!   mesh's frontends (published ports on this node's address, a VIP's target ports) and the
//!   VIPs' kernel load balancing (every other port: `nat::set_vips`), with the healthy tasks
//!   as backends.
//!
//! **Locking: task starts never wait for a network map.** [`NodeNet::apply_map`] holds the map
//! lock (a tokio mutex over the overlay flag, the mesh and the DNS responder) across its
//! netlink, iptables, DNS and mesh awaits, so maps apply one at a time and in order;
//! [`NodeNet::shutdown`] takes it too. The task paths (`prepare_task`, `adopt_netns`,
//! `attach_task`, `release_task`, `address_of`) never take it: they need only what set-up
//! publishes, in this order — the netlink connection (set once), the address allocator
//! (replaced whole), then `ready` — so a task that saw `ready` finds both. The allocator is
//! behind a `std` mutex taken only on the blocking pool, for one allocation or release (each
//! persists `ipam.json`), never across an await. File system work and unmounts run through
//! `crate::blocking`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use flotilla_mesh::{Backend, DnsOptions, DnsServer, FrontendSpec, Mesh, MeshOptions, Protocol};
use flotilla_net::ipam::TaskAddrs;
use flotilla_net::{bridge, cleanup, nat, netns, overlay, task as veth, Net};
use flotilla_types::{
    EndpointMode, NetBackend, NetService, NetworkMap, NetworkSettings, PortConfig, PublishMode,
};

use crate::{blocking, NetError};

/// MTU of task interfaces: leaves room for VXLAN's 50 bytes on a 1500-byte underlay.
const TASK_MTU: u32 = 1450;

/// MTU of the encrypted tunnel's device: a 1500-byte underlay less the outer IPv4 and UDP
/// headers and the tunnel's fragment header, offload header and tag (1413).
const TUNNEL_MTU: u32 = 1500 - flotilla_net::crypt::OVERHEAD;

/// MTU of task interfaces on encrypted networks: the tunnel's, so that a full-size packet
/// goes in one datagram.
const ENCRYPTED_TASK_MTU: u32 = TUNNEL_MTU;

/// Short, stable tag of a node for interface and chain names.
pub fn node_tag(node_id: &str) -> String {
    let h = Sha256::digest(node_id.as_bytes());
    hex::encode(&h[..3])
}

/// Names of everything a node creates.
#[derive(Debug, Clone)]
pub struct Names {
    pub tag: String,
    pub bridge: String,
    pub vxlan: String,
    /// The encrypted tunnel's device: the VXLAN device's name plus `e`, so that the overlay's
    /// iptables rules (`fltvx<tag>+`) cover it too.
    pub tunnel: String,
    pub veth_prefix: String,
    /// Lasting state: `settings.json`, `ipam.json`.
    pub dir: PathBuf,
    /// State that dies with the host (on the node's tmpfs): `netns/<task>` (namespace
    /// mounts) and `tasks/<task>/` (its `hosts` and `resolv.conf`).
    pub vdir: PathBuf,
}

impl Names {
    pub fn new(data_dir: &Path, node_id: &str) -> Names {
        let tag = node_tag(node_id);
        Names {
            bridge: format!("fltbr{tag}"),
            vxlan: format!("fltvx{tag}"),
            tunnel: format!("fltvx{tag}e"),
            veth_prefix: format!("fv{}", &tag[..4]),
            dir: data_dir.join("net"),
            vdir: data_dir.join("run").join("net"),
            tag,
        }
    }
    /// The short tag of a user-defined network (bridge and allocation file names).
    fn net_tag(network: &str) -> String {
        flotilla_control::ipam::network_tag(network)
    }
    /// The bridge of a user-defined network: the node bridge's name plus the network's tag,
    /// so that `fltbr<tag>+` matches every bridge of the node in iptables.
    fn net_bridge(&self, network: &str) -> String {
        format!("{}{}", self.bridge, Self::net_tag(network))
    }
    /// The allocation file of a user-defined network's block.
    fn net_ipam(&self, network: &str) -> PathBuf {
        self.dir
            .join(format!("ipam-{}.json", Self::net_tag(network)))
    }
    /// The host end of a task's veth on a user-defined network.
    fn net_veth(&self, task_id: &str, network: &str) -> String {
        veth::host_ifname(&self.veth_prefix, &format!("{task_id}\0{network}"))
    }
    /// The metric of this node's VIP-pool route (distinct per node).
    fn route_metric(&self) -> u32 {
        1000 + u32::from_str_radix(&self.tag, 16).unwrap_or(0) % 1_000_000
    }
    fn netns_dir(&self) -> PathBuf {
        self.vdir.join("netns")
    }
    fn task_dir(&self, task_id: &str) -> PathBuf {
        self.vdir.join("tasks").join(task_id)
    }
    pub fn owned(&self) -> cleanup::Owned {
        cleanup::Owned {
            link_prefixes: vec![
                self.bridge.clone(),
                self.vxlan.clone(),
                self.veth_prefix.clone(),
            ],
            netns_dir: Some(self.netns_dir()),
            iptables_tags: vec![self.tag.clone()],
        }
    }
}

/// What a task's container needs from its network.
#[derive(Debug, Clone)]
pub struct TaskNet {
    pub netns: PathBuf,
    pub addr: Ipv4Addr,
    pub hosts: PathBuf,
    pub resolv: PathBuf,
    /// The veth to wire with [`NodeNet::attach_task`] (before the container starts).
    link: veth::TaskLink,
    /// The first user-defined network the task is on (its `eth0`, `addr`), if any.
    network: Option<String>,
    /// Its further user-defined networks (`eth1`, …).
    extra: Vec<ExtraNet>,
}

/// A task's interface on a further user-defined network.
#[derive(Debug, Clone)]
struct ExtraNet {
    network: String,
    addr: Ipv4Addr,
    /// The network's range, routed through this interface.
    range: Ipv4Net,
    link: veth::TaskLink,
}

impl TaskNet {
    /// The task's address on each user-defined network it is on.
    pub fn network_addresses(&self) -> std::collections::BTreeMap<String, String> {
        self.network
            .iter()
            .map(|n| (n.clone(), self.addr.to_string()))
            .chain(
                self.extra
                    .iter()
                    .map(|e| (e.network.clone(), e.addr.to_string())),
            )
            .collect()
    }
}

/// A user-defined network as set up on this node.
#[derive(Debug)]
struct UserNet {
    range: Ipv4Net,
    block: Ipv4Net,
    gateway: Ipv4Addr,
    bridge: String,
    internal: bool,
    encrypted: bool,
    /// Task addresses of the block (persisted in `DATA/net/ipam-<tag>.json`).
    addrs: TaskAddrs,
}

/// The user-defined networks set up here, shared with the blocking pool (taken only there,
/// for one allocation or release, and by map applications between awaits).
type Nets = Arc<Mutex<HashMap<String, UserNet>>>;

fn lock_nets(nets: &Mutex<HashMap<String, UserNet>>) -> MutexGuard<'_, HashMap<String, UserNet>> {
    nets.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
impl TaskNet {
    /// A task network with address `addr` and nothing behind it (for fakes of
    /// [`crate::executor::TaskNetwork`]); its files would live under `dir`.
    pub(crate) fn detached(addr: Ipv4Addr, dir: &Path) -> TaskNet {
        let netns = dir.join("netns");
        TaskNet {
            link: veth::TaskLink {
                netns: netns.clone(),
                host_ifname: "fl-test".into(),
                bridge: "fl-test-br".into(),
                addr: Ipv4Net::from(addr),
                gateway: Ipv4Addr::UNSPECIFIED,
                mtu: TASK_MTU,
            },
            netns,
            addr,
            hosts: dir.join("hosts"),
            resolv: dir.join("resolv.conf"),
            network: None,
            extra: Vec::new(),
        }
    }
}

/// The node's set-up subnet, as task paths use it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ready {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    /// The DNS domain tasks search.
    domain: String,
}

/// What applying network maps changes (behind the map lock, see the module doc).
struct MapState {
    /// This node runs the overlay's VXLAN device (see [`Names`]).
    overlay: bool,
    mesh: Mesh,
    dns: Option<DnsServer>,
    /// The VIPs' kernel load balancing last set (`None`: not yet, or it failed).
    vips: Option<Vec<nat::VipBalance>>,
    /// The user-defined networks' rules last set (`None`: not yet, or they failed).
    networks: Option<nat::Networks>,
    /// The encrypted tunnel, while an encrypted network exists and this node runs the
    /// overlay.
    tunnel: Option<flotilla_net::crypt::Tunnel>,
}

/// Task address allocations, shared with the blocking pool.
type Addrs = Arc<Mutex<Option<TaskAddrs>>>;

pub struct NodeNet {
    node_id: String,
    names: Names,
    /// Where published ports listen (the node's listen address, or all addresses).
    bind_ip: IpAddr,
    /// The node's underlay address (advertised).
    underlay: Ipv4Addr,
    /// Resolvers the DNS responder forwards names outside the cluster to (`--dns`, else the
    /// host's); empty: cluster names only.
    dns_upstreams: Vec<SocketAddr>,
    /// Tasks' own resolvers by task address (`--dns`), read by the DNS responder.
    task_resolvers: flotilla_mesh::SourceUpstreams,
    /// Tasks' user-defined networks by task address (their DNS scope), read by the DNS
    /// responder.
    task_networks: flotilla_mesh::SourceNetworks,
    /// The user-defined networks set up on this node.
    nets: Nets,
    /// Bumped whenever a map application changed `nets` (task paths wait on it).
    nets_rev: watch::Sender<u64>,
    /// The netlink connection of the node's namespace, opened by the first set-up.
    net: OnceLock<Net>,
    /// Task addresses of the set-up subnet; `None` before set-up.
    addrs: Addrs,
    /// The set-up subnet; task paths wait for it.
    ready: watch::Sender<Option<Ready>>,
    /// Held for a whole map application (see the module doc).
    map: tokio::sync::Mutex<MapState>,
    /// The mesh's proxy threads (one current-thread runtime each, listeners with SO_REUSEPORT,
    /// as nginx workers); kept as long as the mesh.
    _workers: Option<flotilla_mesh::Workers>,
}

/// The allocator's updates are whole (an allocation or release replaces its state once
/// persisted), so a poisoned lock is used as it is.
fn lock(addrs: &Mutex<Option<TaskAddrs>>) -> MutexGuard<'_, Option<TaskAddrs>> {
    addrs.lock().unwrap_or_else(|p| p.into_inner())
}

/// A task's names: its hostname (for `/etc/hosts`) and its resolver settings (`--dns-search`,
/// `--dns-option`), validated by the manager.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskNames {
    pub hostname: String,
    pub search: Vec<String>,
    pub options: Vec<String>,
    /// The task's own resolvers for outside names (`--dns`); the node's when empty.
    pub servers: Vec<SocketAddr>,
    /// The user-defined networks the task is on, the first carrying its default route; none:
    /// the default network.
    pub networks: Vec<String>,
}

/// A task's `/etc/resolv.conf`: the node's responder, the task's search domains then the cluster
/// domain, `ndots:0` (cluster names are single labels) unless the task sets its own, then its
/// other options.
pub fn resolv_conf(gateway: Ipv4Addr, domain: &str, names: &TaskNames) -> String {
    let mut search: Vec<&str> = names.search.iter().map(String::as_str).collect();
    if !search.contains(&domain) {
        search.push(domain);
    }
    let mut options: Vec<&str> = Vec::new();
    if !names.options.iter().any(|o| o.starts_with("ndots:")) {
        options.push("ndots:0");
    }
    options.extend(names.options.iter().map(String::as_str));
    format!(
        "nameserver {gateway}\nsearch {}\noptions {}\n",
        search.join(" "),
        options.join(" ")
    )
}

impl NodeNet {
    pub fn new(
        data_dir: &Path,
        node_id: &str,
        bind_ip: IpAddr,
        underlay: IpAddr,
        dns_upstreams: Vec<SocketAddr>,
    ) -> Arc<NodeNet> {
        let underlay = match underlay {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .min(4);
        let workers = match flotilla_mesh::Workers::start(threads) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "mesh worker threads did not start; proxying on the agent's runtime");
                None
            }
        };
        let mut opts = MeshOptions::default();
        if let Some(w) = &workers {
            opts.tcp.runtimes = w.handles();
        }
        Arc::new(NodeNet {
            node_id: node_id.to_string(),
            names: Names::new(data_dir, node_id),
            bind_ip,
            underlay,
            dns_upstreams,
            task_resolvers: Default::default(),
            task_networks: Default::default(),
            nets: Arc::new(Mutex::new(HashMap::new())),
            nets_rev: watch::channel(0).0,
            net: OnceLock::new(),
            addrs: Arc::new(Mutex::new(None)),
            ready: watch::channel(None).0,
            map: tokio::sync::Mutex::new(MapState {
                overlay: false,
                mesh: Mesh::new(opts),
                dns: None,
                vips: None,
                networks: None,
                tunnel: None,
            }),
            _workers: workers,
        })
    }

    /// The netlink connection, opened on first use.
    fn netlink(&self) -> Result<Net, NetError> {
        if let Some(net) = self.net.get() {
            return Ok(net.clone());
        }
        let net = Net::current()?;
        Ok(self.net.get_or_init(|| net).clone())
    }

    /// Sets up the node's side of the task network (idempotent): returns what task paths use
    /// and whether this node runs the overlay. The allocator is in place when it returns.
    async fn setup(&self, subnet: Ipv4Net, s: &NetworkSettings) -> Result<(Ready, bool), NetError> {
        let gateway = flotilla_control::ipam::gateway_of(subnet);
        let gw_net = Ipv4Net::new(gateway, subnet.prefix_len())?;
        let net = self.netlink()?;
        bridge::ensure_bridge(&net, &self.names.bridge, gw_net, 1500).await?;
        let overlay = self.ensure_overlay(&net, subnet, s).await?;
        nat::ensure(&net, &self.nat_rules(subnet, gateway, overlay, s)).await?;
        self.save_settings(s).await?;
        if let Ok(pool) = s.vip_pool.parse::<Ipv4Net>() {
            flotilla_net::route::ensure_local(&net, pool, self.names.route_metric())
                .await
                .map_err(|source| NetError::VipRoute { pool, source })?;
        }
        let path = self.names.dir.join("ipam.json");
        let addrs = blocking(move || TaskAddrs::open(path, subnet)).await??;
        *lock(&self.addrs) = Some(addrs);
        let ready = Ready {
            subnet,
            gateway,
            domain: s.dns_domain.clone(),
        };
        Ok((ready, overlay))
    }

    /// The overlay's VXLAN device: `false` when another node in this network namespace runs
    /// it (see [`Names`]).
    async fn ensure_overlay(
        &self,
        net: &Net,
        subnet: Ipv4Net,
        s: &NetworkSettings,
    ) -> Result<bool, NetError> {
        let v = overlay::Vxlan {
            name: self.names.vxlan.clone(),
            vni: s.vxlan_vni,
            port: s.vxlan_port,
            local: self.underlay,
            subnet,
            mtu: TASK_MTU,
        };
        match overlay::ensure_vxlan(net, &v).await {
            Ok(_) => Ok(true),
            Err(flotilla_net::Error::VxlanInUse { .. }) => {
                tracing::info!(
                    "another node in this network namespace runs the overlay; using its routes"
                );
                Ok(false)
            }
            Err(e) => Err(NetError::Overlay(e)),
        }
    }

    /// The node's NAT and filter rules.
    fn nat_rules(
        &self,
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        overlay: bool,
        s: &NetworkSettings,
    ) -> nat::NatRules {
        nat::NatRules {
            tag: self.names.tag.clone(),
            subnet,
            // Every bridge of the node: the default network's and each user-defined one's.
            bridge: format!("{}+", self.names.bridge),
            // The VXLAN device and the encrypted tunnel's.
            overlay: overlay.then(|| format!("{}+", self.names.vxlan)),
            cluster_pool: s.address_pool.parse().ok(),
            outbound_nat: s.outbound_nat,
            // Other nodes' bridges and overlay devices in this namespace (see `Names`).
            trusted_ifaces: vec!["fltbr+".into(), "fltvx+".into()],
            vxlan_port: Some(s.vxlan_port),
            dns: Some(SocketAddrV4::new(gateway, 53)),
            vip_pool: s.vip_pool.parse().ok(),
        }
    }

    /// Makes the state directories and records the settings (for `node cleanup`, which runs
    /// without the cluster).
    async fn save_settings(&self, s: &NetworkSettings) -> Result<(), NetError> {
        let text = serde_json::to_string(s)?;
        let (dir, netns_dir) = (self.names.dir.clone(), self.names.netns_dir());
        blocking(move || {
            create_dir(&dir)?;
            create_dir(&netns_dir)?;
            write_file(&dir.join("settings.json"), &text)
        })
        .await?
    }

    /// Applies a network map from the managers: sets the node up for its subnet (once per
    /// subnet), then programs the DNS responder, the overlay peers and the routing mesh.
    pub async fn apply_map(&self, map: &NetworkMap) {
        let mut state = self.map.lock().await;
        let Some(subnet) = self.own_subnet(map) else {
            return;
        };
        if !self.ensure_setup(&mut state, subnet, &map.settings).await {
            return;
        }
        let Some(net) = self.net.get().cloned() else {
            return;
        };
        self.ensure_dns(&mut state).await;
        self.program_networks(&mut state, &net, map, subnet).await;
        if state.overlay {
            self.program_overlay(&net, map).await;
        }
        self.program_tunnel(&mut state, &net, map).await;
        if let Some(d) = &state.dns {
            d.set_records(dns_records(map));
            d.set_network_records(network_dns_records(map));
        }
        self.program_mesh(&mut state, &net, map).await;
    }

    /// The user-defined networks: a bridge and an allocator for each block this node has,
    /// none for networks gone, and the rules separating them.
    async fn program_networks(
        &self,
        state: &mut MapState,
        net: &Net,
        map: &NetworkMap,
        subnet: Ipv4Net,
    ) {
        let mut changed = false;
        let mut wanted: HashMap<String, (Ipv4Net, Ipv4Net, bool, bool)> = HashMap::new();
        let mut bridges: HashSet<String> = HashSet::new();
        for n in &map.networks {
            let (Ok(range), Some(Ok(block))) = (
                n.subnet.parse::<Ipv4Net>(),
                n.blocks.get(&self.node_id).map(|b| b.parse::<Ipv4Net>()),
            ) else {
                continue;
            };
            // Two networks whose tags collide would share a bridge: the second is skipped.
            if !bridges.insert(self.names.net_bridge(&n.name)) || !range.contains(&block) {
                tracing::warn!(network = %n.name, "network skipped: its bridge name is taken or its block lies outside its range");
                continue;
            }
            wanted.insert(
                n.name.clone(),
                (range, block.trunc(), n.internal, n.encrypted),
            );
        }
        // Gone, or a different block: remove (made again below).
        let stale: Vec<String> = lock_nets(&self.nets)
            .iter()
            .filter(|(name, u)| {
                wanted
                    .get(*name)
                    .is_none_or(|(r, b, _, e)| *r != u.range || *b != u.block || *e != u.encrypted)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            let removed = lock_nets(&self.nets).remove(&name);
            if let Some(u) = removed {
                changed = true;
                if let Err(e) = bridge::delete_link(net, &u.bridge).await {
                    tracing::warn!(network = %name, error = %e, "removing the network's bridge failed");
                }
                let path = self.names.net_ipam(&name);
                let _ = blocking(move || std::fs::remove_file(path)).await;
                tracing::info!(network = %name, "network removed from this node");
            }
        }
        for (name, (range, block, internal, encrypted)) in &wanted {
            if lock_nets(&self.nets).contains_key(name) {
                continue;
            }
            match self
                .setup_network(net, name, *range, *block, *internal, *encrypted)
                .await
            {
                Ok(u) => {
                    lock_nets(&self.nets).insert(name.clone(), u);
                    changed = true;
                    tracing::info!(network = %name, block = %block, "network ready on this node");
                }
                Err(e) => {
                    tracing::warn!(network = %name, error = %e, "setting up the network failed; retrying on the next map")
                }
            }
        }
        let rules = nat::Networks {
            pool: map.settings.address_pool.parse().ok(),
            default_bridge: Some((self.names.bridge.clone(), subnet)),
            networks: map
                .networks
                .iter()
                .filter_map(|n| {
                    let range: Ipv4Net = n.subnet.parse().ok()?;
                    Some(nat::NetRange {
                        range,
                        internal: n.internal,
                        vips: flotilla_control::allocate::vip_block(
                            range,
                            map.settings.subnet_prefix,
                        ),
                    })
                })
                .collect(),
            local: {
                let nets = lock_nets(&self.nets);
                let mut l: Vec<nat::LocalBlock> = nets
                    .values()
                    .map(|u| nat::LocalBlock {
                        bridge: u.bridge.clone(),
                        block: u.block,
                        outbound_nat: map.settings.outbound_nat && !u.internal,
                    })
                    .collect();
                l.sort_by(|a, b| a.bridge.cmp(&b.bridge));
                l
            },
            vteps: map
                .nodes
                .iter()
                .filter_map(|n| Some(n.subnet.as_ref()?.parse::<Ipv4Net>().ok()?.network()))
                .collect(),
            tunnel: {
                let nets = lock_nets(&self.nets);
                let mut enc: Vec<(Ipv4Net, Ipv4Addr)> = nets
                    .values()
                    .filter(|u| u.encrypted)
                    .map(|u| (u.range, u.gateway))
                    .collect();
                enc.sort();
                (state.overlay && !enc.is_empty()).then(|| (self.names.tunnel.clone(), enc))
            },
        };
        if state.networks.as_ref() != Some(&rules) {
            match nat::set_networks(net, &self.names.tag, &rules).await {
                Ok(()) => state.networks = Some(rules),
                Err(e) => {
                    state.networks = None;
                    tracing::warn!(error = %e, "updating the networks' rules failed; retrying on the next map");
                }
            }
        }
        // Task paths wait for a network (or for the first map) on this.
        self.nets_rev.send_modify(|r| *r += u64::from(changed) + 1);
    }

    /// A user-defined network's bridge and allocator on this node.
    async fn setup_network(
        &self,
        net: &Net,
        name: &str,
        range: Ipv4Net,
        block: Ipv4Net,
        internal: bool,
        encrypted: bool,
    ) -> Result<UserNet, NetError> {
        let gateway = flotilla_control::ipam::gateway_of(block);
        let bridge = self.names.net_bridge(name);
        bridge::ensure_bridge(
            net,
            &bridge,
            Ipv4Net::new(gateway, block.prefix_len())?,
            1500,
        )
        .await?;
        let path = self.names.net_ipam(name);
        let addrs = blocking(move || match TaskAddrs::open(&path, block) {
            // A network made again with another block: its old allocations are void.
            Err(flotilla_net::Error::SubnetMismatch { .. }) => {
                let _ = std::fs::remove_file(&path);
                TaskAddrs::open(&path, block)
            }
            r => r,
        })
        .await??;
        Ok(UserNet {
            range,
            block,
            gateway,
            bridge,
            internal,
            encrypted,
            addrs,
        })
    }

    /// This node's subnet in the map.
    fn own_subnet(&self, map: &NetworkMap) -> Option<Ipv4Net> {
        map.nodes
            .iter()
            .find(|n| n.id == self.node_id)
            .and_then(|n| n.subnet.as_ref())
            .and_then(|s| s.parse::<Ipv4Net>().ok())
    }

    /// Sets the node up when its subnet is new, then publishes `ready`; `false` when set-up
    /// failed (retried on the next map).
    async fn ensure_setup(
        &self,
        state: &mut MapState,
        subnet: Ipv4Net,
        s: &NetworkSettings,
    ) -> bool {
        let current = self.ready.borrow().as_ref().map(|r| r.subnet);
        if current == Some(subnet) {
            return true;
        }
        match self.setup(subnet, s).await {
            Ok((ready, overlay)) => {
                state.overlay = overlay;
                // The chains were (re)made: set the VIPs again on this map.
                state.vips = None;
                state.networks = None;
                tracing::info!(subnet = %subnet, overlay, "task network ready");
                self.ready.send_replace(Some(ready));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "setting up the task network failed; retrying on the next map");
                false
            }
        }
    }

    /// The DNS responder on the gateway (retried on every map until it listens).
    async fn ensure_dns(&self, state: &mut MapState) {
        if state.dns.is_some() {
            return;
        }
        let Some(ready) = self.ready.borrow().clone() else {
            return;
        };
        let opts = DnsOptions {
            domain: Some(ready.domain.clone()),
            upstreams: self.dns_upstreams.clone(),
            source_upstreams: self.task_resolvers.clone(),
            source_networks: self.task_networks.clone(),
            ..Default::default()
        };
        match DnsServer::bind(SocketAddr::new(IpAddr::V4(ready.gateway), 53), opts).await {
            Ok(d) => state.dns = Some(d),
            Err(e) => {
                tracing::warn!(error = %e, "the DNS responder could not start; retrying on the next map")
            }
        }
    }

    /// The overlay's peers (the other nodes' subnets), and the nodes that may send to the
    /// VXLAN port.
    async fn program_overlay(&self, net: &Net, map: &NetworkMap) {
        let peers: Vec<overlay::OverlayPeer> = map
            .nodes
            .iter()
            .filter(|n| n.id != self.node_id)
            .filter_map(|n| {
                Some(overlay::OverlayPeer {
                    underlay: n.ip.parse().ok()?,
                    subnet: n.subnet.as_ref()?.parse().ok()?,
                    // The peer's blocks of user-defined networks, each inside its range.
                    extra: map
                        .networks
                        .iter()
                        .filter(|x| !x.encrypted)
                        .filter_map(|x| {
                            let range: Ipv4Net = x.subnet.parse().ok()?;
                            let b: Ipv4Net = x.blocks.get(&n.id)?.parse().ok()?;
                            range.contains(&b).then_some(b)
                        })
                        .collect(),
                })
            })
            .collect();
        if let Err(e) = overlay::set_peers(net, &self.names.vxlan, &peers).await {
            tracing::warn!(error = %e, "programming overlay peers failed");
        }
        // Only the cluster's nodes may send to the VXLAN port.
        let underlays: Vec<Ipv4Addr> = map.nodes.iter().filter_map(|n| n.ip.parse().ok()).collect();
        if let Err(e) = nat::set_nodes(net, &self.names.tag, &underlays).await {
            tracing::warn!(error = %e, "updating the vxlan allow-list failed");
        }
    }

    /// The encrypted tunnel: started while an encrypted network exists (and this node runs the
    /// overlay; nodes sharing one network namespace route between their bridges directly),
    /// with the map's keys and, as peers, the other nodes and their blocks of encrypted
    /// networks; stopped (its device and routes removed) when none is left.
    async fn program_tunnel(&self, state: &mut MapState, net: &Net, map: &NetworkMap) {
        let keys: Vec<flotilla_net::crypt::TunnelKey> = map
            .tunnel_keys
            .iter()
            .filter_map(|k| {
                let b = hex::decode(&k.key).ok()?;
                Some(flotilla_net::crypt::TunnelKey {
                    id: k.id,
                    secret: b.try_into().ok()?,
                })
            })
            .collect();
        let wanted = state.overlay && map.networks.iter().any(|n| n.encrypted) && !keys.is_empty();
        if !wanted {
            if state.tunnel.take().is_some() {
                tracing::info!("encrypted tunnel stopped");
            }
            return;
        }
        if state.tunnel.is_none() {
            let cfg = flotilla_net::crypt::TunnelConfig {
                ifname: self.names.tunnel.clone(),
                listen: SocketAddrV4::new(self.underlay, map.settings.tunnel_port),
                mtu: TUNNEL_MTU,
            };
            match flotilla_net::crypt::Tunnel::start(net, cfg, keys.clone()).await {
                Ok(t) => {
                    tracing::info!(port = map.settings.tunnel_port, "encrypted tunnel started");
                    state.tunnel = Some(t);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "starting the encrypted tunnel failed; retrying on the next map");
                    return;
                }
            }
        }
        let Some(t) = &state.tunnel else {
            return;
        };
        t.set_keys(keys);
        let peers: Vec<flotilla_net::crypt::TunnelPeer> = map
            .nodes
            .iter()
            .filter(|n| n.id != self.node_id)
            .filter_map(|n| {
                let ip: Ipv4Addr = n.ip.parse().ok()?;
                let routes: Vec<Ipv4Net> = map
                    .networks
                    .iter()
                    .filter(|x| x.encrypted)
                    .filter_map(|x| {
                        let range: Ipv4Net = x.subnet.parse().ok()?;
                        let b: Ipv4Net = x.blocks.get(&n.id)?.parse().ok()?;
                        range.contains(&b).then_some(b)
                    })
                    .collect();
                Some(flotilla_net::crypt::TunnelPeer {
                    underlay: SocketAddrV4::new(ip, map.settings.tunnel_port),
                    routes,
                })
            })
            .collect();
        if let Err(e) = t.set_peers(net, &peers).await {
            tracing::warn!(error = %e, "programming the encrypted tunnel's peers failed");
        }
    }

    /// The routing mesh's frontends, and the published ports tasks may reach.
    async fn program_mesh(&self, state: &mut MapState, net: &Net, map: &NetworkMap) {
        let specs = frontends(map, &self.node_id, self.bind_ip);
        // Tasks may reach this node's published ports (not its other host ports).
        let published = published_ports(&specs, self.bind_ip);
        if let Err(e) = nat::set_published(net, &self.names.tag, &published).await {
            tracing::warn!(error = %e, "updating the published ports tasks may reach failed");
        }
        let report = state.mesh.apply(specs).await;
        for f in &report.failed {
            tracing::debug!(listen = %f.listen, error = %f.error, "a mesh frontend could not listen; retrying on the next map");
        }
        // Every other port of a VIP: destination NAT in the kernel, set when it changed (after
        // the mesh, which is in memory: an `iptables-restore` must not delay it).
        let vips = vip_balances(map);
        if state.vips.as_ref() != Some(&vips) {
            match nat::set_vips(net, &self.names.tag, &vips).await {
                Ok(()) => state.vips = Some(vips),
                Err(e) => {
                    state.vips = None;
                    tracing::warn!(error = %e, "updating the VIPs' load balancing failed; retrying on the next map");
                }
            }
        }
    }

    /// Waits until the node's subnet is set up.
    async fn wait_ready(&self, within: Duration) -> Result<Ready, NetError> {
        let mut rx = self.ready.subscribe();
        let waited = tokio::time::timeout(within, rx.wait_for(|r| r.is_some())).await;
        match waited {
            Ok(Ok(ready)) => ready.clone().ok_or(NetError::NotReady),
            _ => Err(NetError::NotSetUp { waited: within }),
        }
    }

    /// Gives a task its address and resolver files. Its namespace is the one the OCI runtime
    /// creates with the container (inside the container's user namespace, so that `runc exec`
    /// can join it); [`NodeNet::adopt_netns`] names it and [`NodeNet::attach_task`] wires it,
    /// both before the container's process starts. Many tasks are prepared at once (a
    /// 100-replica service starts 100 of them): only the allocation is serialized.
    pub async fn prepare_task(
        &self,
        task_id: &str,
        names: &TaskNames,
    ) -> Result<TaskNet, NetError> {
        let ready = self.wait_ready(Duration::from_secs(60)).await?;
        let path = self.names.netns_dir().join(task_id);
        let (addr, link, network, extra) = if names.networks.is_empty() {
            let addr = self.allocate(task_id).await?;
            let link = veth::TaskLink {
                netns: path.clone(),
                host_ifname: veth::host_ifname(&self.names.veth_prefix, task_id),
                bridge: self.names.bridge.clone(),
                addr: Ipv4Net::new(addr, ready.subnet.prefix_len())?,
                gateway: ready.gateway,
                mtu: TASK_MTU,
            };
            (addr, link, None, Vec::new())
        } else {
            self.wait_networks(&names.networks, Duration::from_secs(60))
                .await?;
            let mut links = Vec::new();
            for n in &names.networks {
                let (addr, block, gateway, range, bridge, mtu) =
                    self.allocate_on(n, task_id).await?;
                let link = veth::TaskLink {
                    netns: path.clone(),
                    host_ifname: self.names.net_veth(task_id, n),
                    bridge,
                    addr: Ipv4Net::new(addr, block.prefix_len())?,
                    gateway,
                    mtu,
                };
                links.push(ExtraNet {
                    network: n.clone(),
                    addr,
                    range,
                    link,
                });
            }
            let first = links.remove(0);
            (first.addr, first.link, Some(first.network), links)
        };
        let (hosts, resolv) = self
            .write_resolver_files(task_id, names, addr, &ready)
            .await?;
        self.task_resolvers
            .set(IpAddr::V4(addr), names.servers.clone());
        self.task_networks
            .set(IpAddr::V4(addr), names.networks.clone());
        for e in &extra {
            self.task_networks
                .set(IpAddr::V4(e.addr), names.networks.clone());
        }
        Ok(TaskNet {
            netns: path,
            addr,
            hosts,
            resolv,
            link,
            network,
            extra,
        })
    }

    /// Waits until every one of `networks` is set up on this node.
    async fn wait_networks(&self, networks: &[String], within: Duration) -> Result<(), NetError> {
        let mut rx = self.nets_rev.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let missing = {
                let nets = lock_nets(&self.nets);
                networks.iter().find(|n| !nets.contains_key(*n)).cloned()
            };
            let Some(missing) = missing else {
                return Ok(());
            };
            let changed = tokio::time::timeout_at(deadline, rx.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return Err(NetError::NoNetwork {
                    network: missing,
                    waited: within,
                });
            }
        }
    }

    /// The task's address on a user-defined network (allocated and persisted if it has none),
    /// with the network's block, gateway, range and bridge.
    async fn allocate_on(
        &self,
        network: &str,
        task_id: &str,
    ) -> Result<(Ipv4Addr, Ipv4Net, Ipv4Addr, Ipv4Net, String, u32), NetError> {
        let (nets, n, id) = (self.nets.clone(), network.to_string(), task_id.to_string());
        blocking(move || {
            let mut nets = lock_nets(&nets);
            let u = nets.get_mut(&n).ok_or_else(|| NetError::NoNetwork {
                network: n.clone(),
                waited: Duration::ZERO,
            })?;
            let addr = u.addrs.allocate(&id)?;
            let mtu = if u.encrypted {
                ENCRYPTED_TASK_MTU
            } else {
                TASK_MTU
            };
            Ok((addr, u.block, u.gateway, u.range, u.bridge.clone(), mtu))
        })
        .await?
    }

    /// The task's address (allocated and persisted if it has none).
    async fn allocate(&self, task_id: &str) -> Result<Ipv4Addr, NetError> {
        let (addrs, id) = (self.addrs.clone(), task_id.to_string());
        blocking(move || -> Result<Ipv4Addr, NetError> {
            let mut addrs = lock(&addrs);
            Ok(addrs.as_mut().ok_or(NetError::NotReady)?.allocate(&id)?)
        })
        .await?
    }

    /// Writes the task's `hosts` and `resolv.conf` (bind-mounted into its container); returns
    /// their paths.
    async fn write_resolver_files(
        &self,
        task_id: &str,
        names: &TaskNames,
        addr: Ipv4Addr,
        ready: &Ready,
    ) -> Result<(PathBuf, PathBuf), NetError> {
        let dir = self.names.task_dir(task_id);
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{addr}\t{}\n",
            names.hostname
        );
        let resolv = resolv_conf(ready.gateway, &ready.domain, names);
        blocking(move || {
            create_dir(&dir)?;
            let (hosts_path, resolv_path) = (dir.join("hosts"), dir.join("resolv.conf"));
            write_file(&hosts_path, &hosts)?;
            write_file(&resolv_path, &resolv)?;
            Ok((hosts_path, resolv_path))
        })
        .await?
    }

    /// Names the network namespace of the task's container (its init process `pid`, created
    /// and waiting to start) under the node's netns dir, with `lo` up and the sysctls set. A
    /// namespace left by an earlier attempt of the same task is replaced, its veth removed.
    pub async fn adopt_netns(&self, t: &TaskNet, pid: u32) -> Result<(), NetError> {
        let path = t.netns.clone();
        if blocking(move || path.exists()).await? {
            if let Some(net) = self.net.get() {
                let _ = veth::detach(net, &t.link.host_ifname).await;
                for e in &t.extra {
                    let _ = veth::detach(net, &e.link.host_ifname).await;
                }
            }
        }
        let dir = self.names.netns_dir();
        let name = t
            .netns
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or(NetError::NamespaceName)?;
        blocking(move || netns::adopt(&dir, &name, pid))
            .await?
            .map(|_| ())
            .map_err(NetError::Wire)
    }

    /// Wires the task's namespace to the bridge (veth, address, default route).
    pub async fn attach_task(&self, t: &TaskNet) -> Result<(), NetError> {
        let net = self.net.get().ok_or(NetError::NotReady)?;
        veth::attach(net, &t.link).await.map_err(NetError::Wire)?;
        for (i, e) in t.extra.iter().enumerate() {
            let ifname = format!("eth{}", i + 1);
            veth::attach_extra(net, &e.link, &ifname, e.range)
                .await
                .map_err(NetError::Wire)?;
        }
        Ok(())
    }

    /// The address a task has (after an agent restart, from the persisted allocations).
    /// Sets a running task's own resolvers (`--dns`) again, e.g. after an agent restart
    /// re-adopted it (they live in the agent's memory).
    pub async fn set_task_resolvers(&self, task_id: &str, servers: Vec<SocketAddr>) {
        if let Some(addr) = self.address_of(task_id).await {
            self.task_resolvers.set(IpAddr::V4(addr), servers.clone());
        }
        for addr in self.network_addresses(task_id).await.into_values() {
            self.task_resolvers.set(IpAddr::V4(addr), servers.clone());
        }
    }

    /// A task's addresses on user-defined networks (after an agent restart, once the first
    /// map set the networks up again).
    pub async fn network_addresses(
        &self,
        task_id: &str,
    ) -> std::collections::BTreeMap<String, Ipv4Addr> {
        let _ = self.wait_ready(Duration::from_secs(10)).await;
        let mut rx = self.nets_rev.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|r| *r > 0)).await;
        lock_nets(&self.nets)
            .iter()
            .filter_map(|(n, u)| Some((n.clone(), u.addrs.get(task_id)?)))
            .collect()
    }

    /// Records a re-adopted task's user-defined networks for its DNS scope.
    pub async fn set_task_networks(&self, task_id: &str, networks: Vec<String>) {
        for addr in self.network_addresses(task_id).await.into_values() {
            self.task_networks.set(IpAddr::V4(addr), networks.clone());
        }
    }

    pub async fn address_of(&self, task_id: &str) -> Option<Ipv4Addr> {
        // Right after an agent restart the allocations load with the first network map.
        let _ = self.wait_ready(Duration::from_secs(10)).await;
        let (addrs, id) = (self.addrs.clone(), task_id.to_string());
        blocking(move || lock(&addrs).as_ref()?.get(&id))
            .await
            .ok()
            .flatten()
    }

    /// Removes a task's veth, namespace, files and address (idempotent).
    pub async fn release_task(&self, task_id: &str) {
        let (addrs, id) = (self.addrs.clone(), task_id.to_string());
        let addr = blocking(move || lock(&addrs).as_ref()?.get(&id))
            .await
            .ok()
            .flatten();
        if let Some(addr) = addr {
            self.task_resolvers.set(IpAddr::V4(addr), Vec::new());
        }
        // Its addresses on user-defined networks (released below with the default one).
        let on: Vec<(String, Ipv4Addr)> = lock_nets(&self.nets)
            .iter()
            .filter_map(|(n, u)| Some((n.clone(), u.addrs.get(task_id)?)))
            .collect();
        for (_, a) in &on {
            self.task_resolvers.set(IpAddr::V4(*a), Vec::new());
            self.task_networks.set(IpAddr::V4(*a), Vec::new());
        }
        if let Some(net) = self.net.get() {
            let ifname = veth::host_ifname(&self.names.veth_prefix, task_id);
            if let Err(e) = veth::detach(net, &ifname).await {
                tracing::warn!(task = task_id, error = %e, "removing the task's veth failed");
            }
            for (n, _) in &on {
                let ifname = self.names.net_veth(task_id, n);
                if let Err(e) = veth::detach(net, &ifname).await {
                    tracing::warn!(task = task_id, network = %n, error = %e, "removing the task's veth failed");
                }
            }
        }
        let path = self.names.netns_dir().join(task_id);
        let dir = self.names.task_dir(task_id);
        let (addrs, id, nets) = (self.addrs.clone(), task_id.to_string(), self.nets.clone());
        let _ = blocking(move || {
            if let Err(e) = netns::remove(&path) {
                tracing::warn!(task = %id, error = %e, "removing the task's network namespace failed");
            }
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(a) = lock(&addrs).as_mut() {
                if let Err(e) = a.release(&id) {
                    tracing::warn!(task = %id, error = %e, "releasing the task's address failed");
                }
            }
            for (n, u) in lock_nets(&nets).iter_mut() {
                if let Err(e) = u.addrs.release(&id) {
                    tracing::warn!(task = %id, network = %n, error = %e, "releasing the task's address failed");
                }
            }
        })
        .await;
    }

    /// Task ids that have a network namespace here.
    pub async fn prepared_tasks(&self) -> Vec<String> {
        let dir = self.names.netns_dir();
        let listed = blocking(move || netns::list(&dir)).await;
        listed
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().to_string()))
            .collect()
    }

    /// Stops the mesh and DNS (the kernel objects stay for running tasks).
    pub async fn shutdown(&self) {
        let mut state = self.map.lock().await;
        state.mesh.clear().await;
        state.dns = None;
    }
}

/// Creates a directory and its parents.
fn create_dir(path: &Path) -> Result<(), NetError> {
    std::fs::create_dir_all(path).map_err(|source| NetError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces a file's content at once (write a temporary file, rename it over).
fn write_file(path: &Path, text: &str) -> Result<(), NetError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|source| NetError::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| NetError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Each node's task subnet, from the map.
fn node_subnets(map: &NetworkMap) -> HashMap<&str, Ipv4Net> {
    map.nodes
        .iter()
        .filter_map(|n| Some((n.id.as_str(), n.subnet.as_ref()?.parse().ok()?)))
        .collect()
}

/// A backend's address, when it is a task address of the subnet of the node that runs it
/// (the managers check this already; checked again here, so that no stored or forged address
/// can point this node's mesh or DNS at loopback, a metadata service or another node's tasks).
fn backend_ip(subnets: &HashMap<&str, Ipv4Net>, b: &NetBackend) -> Option<Ipv4Addr> {
    let ip: Ipv4Addr = b.addr.parse().ok()?;
    let subnet = *subnets.get(b.node_id.as_str())?;
    flotilla_control::ipam::is_task_addr(subnet, ip).then_some(ip)
}

/// Each node's subnet and its blocks of the user-defined networks, from the map.
struct Blocks<'a> {
    default: HashMap<&'a str, Ipv4Net>,
    /// (network, node) → block, each inside the network's range.
    nets: HashMap<(&'a str, &'a str), Ipv4Net>,
    /// Network → range.
    ranges: HashMap<&'a str, Ipv4Net>,
}

impl<'a> Blocks<'a> {
    fn of(map: &'a NetworkMap) -> Self {
        let mut nets = HashMap::new();
        let mut ranges = HashMap::new();
        for n in &map.networks {
            let Ok(range) = n.subnet.parse::<Ipv4Net>() else {
                continue;
            };
            ranges.insert(n.name.as_str(), range);
            for (node, b) in &n.blocks {
                if let Ok(b) = b.parse::<Ipv4Net>() {
                    if range.contains(&b) {
                        nets.insert((n.name.as_str(), node.as_str()), b);
                    }
                }
            }
        }
        Blocks {
            default: node_subnets(map),
            nets,
            ranges,
        }
    }

    /// A backend's address on its service's first network (the default network's subnet
    /// of its node, or its node's block of the first user-defined network), when it is a task
    /// address there (see [`backend_ip`]).
    fn primary(&self, s: &NetService, b: &NetBackend) -> Option<Ipv4Addr> {
        match s.networks.first() {
            None => backend_ip(&self.default, b),
            Some(a) => {
                let ip: Ipv4Addr = b.addr.parse().ok()?;
                let block = *self.nets.get(&(a.target.as_str(), b.node_id.as_str()))?;
                flotilla_control::ipam::is_task_addr(block, ip).then_some(ip)
            }
        }
    }

    /// A backend's address on the user-defined network `network`, when it is a task address
    /// of its node's block there.
    fn on(&self, network: &str, b: &NetBackend) -> Option<Ipv4Addr> {
        let ip: Ipv4Addr = b.addrs.get(network)?.parse().ok()?;
        let block = *self.nets.get(&(network, b.node_id.as_str()))?;
        flotilla_control::ipam::is_task_addr(block, ip).then_some(ip)
    }
}

/// A mesh backend for a task on `port`, when its address passes [`Blocks::primary`].
fn backend(blocks: &Blocks, s: &NetService, b: &NetBackend, port: u16) -> Option<Backend> {
    let ip = blocks.primary(s, b)?;
    Some(Backend::new(
        b.task_id.clone(),
        SocketAddr::new(IpAddr::V4(ip), port),
    ))
}

/// DNS records of a map: `name` → VIP (or the tasks for dnsrr); `tasks.name` → the tasks.
fn dns_records(map: &NetworkMap) -> HashMap<String, Vec<Ipv4Addr>> {
    let subnets = node_subnets(map);
    let mut records = HashMap::new();
    for s in map.services.iter().filter(|s| s.networks.is_empty()) {
        let tasks: Vec<Ipv4Addr> = s
            .backends
            .iter()
            .filter_map(|b| backend_ip(&subnets, b))
            .collect();
        let vip = s.vip.as_ref().and_then(|v| v.parse().ok());
        let name_addrs = match (s.mode, vip) {
            (EndpointMode::Vip, Some(v)) => vec![v],
            _ => tasks.clone(),
        };
        records.insert(s.name.clone(), name_addrs);
        records.insert(format!("tasks.{}", s.name), tasks);
    }
    records
}

/// DNS records of each user-defined network: its services' names and aliases → their VIP (or
/// their tasks' addresses on that network for dnsrr); `tasks.name` → those addresses.
fn network_dns_records(map: &NetworkMap) -> HashMap<String, HashMap<String, Vec<Ipv4Addr>>> {
    let blocks = Blocks::of(map);
    let mut out: HashMap<String, HashMap<String, Vec<Ipv4Addr>>> = HashMap::new();
    for n in &map.networks {
        out.entry(n.name.clone()).or_default();
    }
    for s in &map.services {
        for a in &s.networks {
            let Some(records) = out.get_mut(&a.target) else {
                continue;
            };
            let tasks: Vec<Ipv4Addr> = s
                .backends
                .iter()
                .filter_map(|b| blocks.on(&a.target, b))
                .collect();
            let vip = s
                .network_vips
                .get(&a.target)
                .and_then(|v| v.parse::<Ipv4Addr>().ok())
                .filter(|v| {
                    blocks
                        .ranges
                        .get(a.target.as_str())
                        .is_some_and(|r| r.contains(v))
                });
            let name_addrs = match (s.mode, vip) {
                (EndpointMode::Vip, Some(v)) => vec![v],
                (EndpointMode::Vip, None) => Vec::new(),
                _ => tasks.clone(),
            };
            for name in std::iter::once(&s.name).chain(a.aliases.iter()) {
                records.insert(name.clone(), name_addrs.clone());
                records.insert(format!("tasks.{name}"), tasks.clone());
            }
        }
    }
    out
}

/// The mesh's transport for a published port's protocol.
fn mesh_protocol(p: flotilla_types::Protocol) -> Protocol {
    match p {
        flotilla_types::Protocol::Tcp => Protocol::Tcp,
        flotilla_types::Protocol::Udp => Protocol::Udp,
    }
}

/// The PROXY protocol header a published port sends its backends, if any.
fn proxy_protocol_of(p: &PortConfig) -> Option<flotilla_mesh::ProxyProtocol> {
    match p.proxy_protocol.as_deref() {
        Some("v1") => Some(flotilla_mesh::ProxyProtocol::V1),
        Some("v2") => Some(flotilla_mesh::ProxyProtocol::V2),
        _ => None,
    }
}

/// The ports of frontends on `bind_ip` (this node's published ports), for the NAT rules.
fn published_ports(specs: &[FrontendSpec], bind_ip: IpAddr) -> Vec<(nat::L4, u16)> {
    specs
        .iter()
        .filter(|f| f.listen.ip() == bind_ip)
        .map(|f| {
            let p = match f.protocol {
                Protocol::Tcp => nat::L4::Tcp,
                Protocol::Udp => nat::L4::Udp,
            };
            (p, f.listen.port())
        })
        .collect()
}

/// The mesh frontends this node runs for a map: each service's published ports, then its VIP
/// ports; the first frontend for an address and protocol wins.
pub fn frontends(map: &NetworkMap, node_id: &str, bind_ip: IpAddr) -> Vec<FrontendSpec> {
    let subnets = Blocks::of(map);
    let mut out: Vec<FrontendSpec> = Vec::new();
    let mut seen: HashSet<(SocketAddr, Protocol)> = HashSet::new();
    for s in &map.services {
        let published = published_frontends(s, node_id, bind_ip, &subnets);
        for f in published.into_iter().chain(vip_frontends(s, &subnets)) {
            if seen.insert((f.listen, f.protocol)) {
                out.push(f);
            }
        }
    }
    out
}

/// A service's published ports on this node: ingress ports to every task, host-mode ports to
/// this node's tasks (none without one).
fn published_frontends(
    s: &NetService,
    node_id: &str,
    bind_ip: IpAddr,
    subnets: &Blocks,
) -> Vec<FrontendSpec> {
    s.ports
        .iter()
        .filter_map(|p| {
            let host_mode = p.publish_mode == PublishMode::Host;
            let backends: Vec<Backend> = s
                .backends
                .iter()
                .filter(|b| !host_mode || b.node_id == node_id)
                .filter_map(|b| backend(subnets, s, b, p.target))
                .collect();
            if host_mode && backends.is_empty() {
                return None;
            }
            Some(FrontendSpec {
                listen: SocketAddr::new(bind_ip, p.published),
                protocol: mesh_protocol(p.protocol),
                backends,
                proxy_protocol: proxy_protocol_of(p),
            })
        })
        .collect()
}

/// A VIP service's VIP: it answers on every target port, load-balanced over all tasks.
fn vip_frontends(s: &NetService, subnets: &Blocks) -> Vec<FrontendSpec> {
    let vip = s.vip.as_ref().and_then(|v| v.parse::<Ipv4Addr>().ok());
    let (EndpointMode::Vip, Some(vip)) = (s.mode, vip) else {
        return Vec::new();
    };
    let mut targets: Vec<(u16, Protocol)> = s
        .ports
        .iter()
        .map(|p| (p.target, mesh_protocol(p.protocol)))
        .collect();
    targets.sort();
    targets.dedup();
    targets
        .into_iter()
        .map(|(port, protocol)| FrontendSpec {
            listen: SocketAddr::new(IpAddr::V4(vip), port),
            protocol,
            backends: s
                .backends
                .iter()
                .filter_map(|b| backend(subnets, s, b, port))
                .collect(),
            proxy_protocol: None,
        })
        .collect()
}

/// Each VIP service's kernel load balancing: its healthy tasks (addresses checked by
/// [`backend_ip`]) on every port but the target ports the mesh serves (see
/// [`vip_frontends`]).
fn vip_balances(map: &NetworkMap) -> Vec<nat::VipBalance> {
    let blocks = Blocks::of(map);
    let mut out: Vec<nat::VipBalance> = Vec::new();
    let mut seen: HashSet<Ipv4Addr> = HashSet::new();
    for s in map.services.iter().filter(|s| s.mode == EndpointMode::Vip) {
        if s.networks.is_empty() {
            let Some(vip) = s.vip.as_ref().and_then(|v| v.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            // One service per VIP (a forged map naming a VIP twice gets the first).
            if !seen.insert(vip) {
                continue;
            }
            let mut backends: Vec<Ipv4Addr> = s
                .backends
                .iter()
                .filter_map(|b| backend_ip(&blocks.default, b))
                .collect();
            backends.sort();
            backends.dedup();
            out.push(nat::VipBalance {
                vip,
                mesh_ports: s
                    .ports
                    .iter()
                    .map(|p| match p.protocol {
                        flotilla_types::Protocol::Tcp => (nat::L4::Tcp, p.target),
                        flotilla_types::Protocol::Udp => (nat::L4::Udp, p.target),
                    })
                    .collect(),
                backends,
                source: None,
            });
            continue;
        }
        // On user-defined networks: the service's VIP on each network (inside its range)
        // takes that network's tasks, on every port, from clients of that network only.
        for a in &s.networks {
            let Some(range) = blocks.ranges.get(a.target.as_str()) else {
                continue;
            };
            let Some(vip) = s
                .network_vips
                .get(&a.target)
                .and_then(|v| v.parse::<Ipv4Addr>().ok())
                .filter(|v| range.contains(v))
            else {
                continue;
            };
            if !seen.insert(vip) {
                continue;
            }
            let mut backends: Vec<Ipv4Addr> = s
                .backends
                .iter()
                .filter_map(|b| blocks.on(&a.target, b))
                .collect();
            backends.sort();
            backends.dedup();
            out.push(nat::VipBalance {
                vip,
                mesh_ports: Vec::new(),
                backends,
                source: Some(*range),
            });
        }
    }
    out.sort_by_key(|v| v.vip);
    out
}

/// The VIP pool of the node's local route (from the settings it recorded at set-up).
async fn own_vip_pool(names: &Names) -> Option<Ipv4Net> {
    let path = names.dir.join("settings.json");
    let text = blocking(move || std::fs::read_to_string(path))
        .await
        .ok()?
        .ok()?;
    let s: NetworkSettings = serde_json::from_str(&text).ok()?;
    s.vip_pool.parse().ok()
}

/// Removes every network object of the node whose data dir is `data_dir` (for
/// `flotilla node cleanup`). Returns what was removed.
pub async fn cleanup(data_dir: &Path, node_id: &str) -> Result<Vec<String>, NetError> {
    let names = Names::new(data_dir, node_id);
    let net = Net::current()?;
    let mut removed = cleanup::remove_all(&net, &names.owned()).await?;
    if let Some(pool) = own_vip_pool(&names).await {
        if let Ok(true) = flotilla_net::route::remove_local(&net, pool, names.route_metric()).await
        {
            removed.push(format!("route local {pool}"));
        }
    }
    let (dir, vdir) = (names.dir, names.vdir);
    let _ = blocking(move || {
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(vdir);
    })
    .await;
    Ok(removed)
}

/// What [`cleanup()`] would remove (tests assert it is empty after a node is cleaned up). The
/// error is text: the node's caller records it as is.
pub async fn leftovers(data_dir: &Path, node_id: &str) -> Result<Vec<String>, NetError> {
    let names = Names::new(data_dir, node_id);
    let net = Net::current()?;
    let mut out = cleanup::leftovers(&net, &names.owned()).await?;
    if let Some(pool) = own_vip_pool(&names).await {
        if flotilla_net::route::local_exists(&net, pool, names.route_metric()).await {
            out.push(format!("route local {pool}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::{NetBackend, NetService, PortConfig};

    fn port(published: u16, target: u16, mode: PublishMode) -> PortConfig {
        PortConfig {
            published,
            target,
            protocol: flotilla_types::Protocol::Tcp,
            publish_mode: mode,
            proxy_protocol: None,
        }
    }

    fn backend(task: &str, node: &str, addr: &str) -> NetBackend {
        NetBackend {
            task_id: task.into(),
            node_id: node.into(),
            addr: addr.into(),
            addrs: Default::default(),
        }
    }

    fn net_node(id: &str, subnet: &str) -> flotilla_types::NetNode {
        flotilla_types::NetNode {
            id: id.into(),
            ip: "127.0.0.1".into(),
            subnet: Some(subnet.into()),
            ready: true,
            manager: false,
        }
    }

    fn map() -> NetworkMap {
        NetworkMap {
            revision: 1,
            settings: NetworkSettings::default(),
            nodes: vec![
                net_node("n1", "10.200.0.0/24"),
                net_node("n2", "10.200.1.0/24"),
            ],
            services: vec![
                NetService {
                    id: "s1".into(),
                    name: "web".into(),
                    mode: EndpointMode::Vip,
                    vip: Some("10.199.0.1".into()),
                    ports: vec![port(8080, 80, PublishMode::Ingress)],
                    backends: vec![
                        backend("t1", "n1", "10.200.0.2"),
                        backend("t2", "n2", "10.200.1.2"),
                    ],
                    networks: Vec::new(),
                    network_vips: Default::default(),
                },
                NetService {
                    id: "s2".into(),
                    name: "edge".into(),
                    mode: EndpointMode::Dnsrr,
                    vip: None,
                    ports: vec![port(9090, 90, PublishMode::Host)],
                    backends: vec![backend("t3", "n2", "10.200.1.3")],
                    networks: Vec::new(),
                    network_vips: Default::default(),
                },
            ],
            networks: Vec::new(),
            tunnel_keys: Vec::new(),
        }
    }

    /// A node whose task network is set up by hand (no netlink): the allocator, then `ready`.
    fn set_up_by_hand(dir: &Path) -> Arc<NodeNet> {
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let net = NodeNet::new(dir, "n1", ip, ip, Vec::new());
        let subnet: Ipv4Net = "10.200.0.0/24".parse().expect("subnet");
        std::fs::create_dir_all(&net.names.dir).expect("net dir");
        let addrs = TaskAddrs::open(net.names.dir.join("ipam.json"), subnet).expect("ipam");
        *lock(&net.addrs) = Some(addrs);
        net.ready.send_replace(Some(Ready {
            subnet,
            gateway: Ipv4Addr::new(10, 200, 0, 1),
            domain: "flotilla".into(),
        }));
        net
    }

    #[tokio::test]
    async fn tasks_are_prepared_and_released_while_a_map_is_being_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = set_up_by_hand(dir.path());
        let _applying = net.map.lock().await;
        let within = Duration::from_secs(10);
        let names = TaskNames {
            hostname: "task1".into(),
            ..Default::default()
        };
        let t = tokio::time::timeout(within, net.prepare_task("task1", &names))
            .await
            .expect("not held up by the map lock")
            .expect("prepared");
        assert_eq!(t.addr, Ipv4Addr::new(10, 200, 0, 2));
        let resolv = std::fs::read_to_string(&t.resolv).expect("resolv.conf");
        assert_eq!(
            resolv,
            "nameserver 10.200.0.1\nsearch flotilla\noptions ndots:0\n"
        );
        let hosts = std::fs::read_to_string(&t.hosts).expect("hosts");
        assert!(hosts.ends_with("10.200.0.2\ttask1\n"), "{hosts}");
        assert_eq!(net.address_of("task1").await, Some(t.addr));
        tokio::time::timeout(within, net.release_task("task1"))
            .await
            .expect("not held up by the map lock");
        assert_eq!(net.address_of("task1").await, None);
        assert!(!t.hosts.exists());
    }

    #[test]
    fn resolv_conf_puts_the_tasks_search_domains_and_options_first() {
        let gw = Ipv4Addr::new(10, 200, 0, 1);
        let plain = resolv_conf(gw, "flotilla", &TaskNames::default());
        assert_eq!(
            plain,
            "nameserver 10.200.0.1\nsearch flotilla\noptions ndots:0\n"
        );
        let names = TaskNames {
            hostname: "h".into(),
            search: vec!["corp.example".into(), "flotilla".into()],
            options: vec!["ndots:2".into(), "timeout:1".into()],
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(gw, "flotilla", &names),
            "nameserver 10.200.0.1\nsearch corp.example flotilla\noptions ndots:2 timeout:1\n"
        );
        let names = TaskNames {
            options: vec!["edns0".into()],
            ..Default::default()
        };
        assert!(resolv_conf(gw, "flotilla", &names).ends_with("options ndots:0 edns0\n"));
    }

    #[test]
    fn frontends_for_ingress_host_mode_and_vips() {
        let ip: IpAddr = "127.0.0.2".parse().expect("ip");
        let on_n1 = frontends(&map(), "n1", ip);
        // Ingress 8080 on this node to both tasks; the VIP on the target port; no host-mode
        // port here (no local task of `edge`).
        let listens: Vec<String> = on_n1.iter().map(|f| f.listen.to_string()).collect();
        assert_eq!(listens, ["127.0.0.2:8080", "10.199.0.1:80"]);
        let ingress = &on_n1[0];
        let addrs: Vec<String> = ingress
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(addrs, ["10.200.0.2:80", "10.200.1.2:80"]);
        let on_n2 = frontends(&map(), "n2", ip);
        let host = on_n2
            .iter()
            .find(|f| f.listen.port() == 9090)
            .expect("host-mode port where the task runs");
        assert_eq!(host.backends.len(), 1);
        assert_eq!(host.backends[0].addr.to_string(), "10.200.1.3:90");
    }

    #[test]
    fn udp_ports_become_udp_frontends() {
        let mut m = map();
        m.services[0].ports[0].protocol = flotilla_types::Protocol::Udp;
        let ip: IpAddr = "127.0.0.2".parse().expect("ip");
        let got: Vec<(String, Protocol)> = frontends(&m, "n1", ip)
            .iter()
            .map(|f| (f.listen.to_string(), f.protocol))
            .collect();
        assert_eq!(
            got,
            [
                ("127.0.0.2:8080".to_string(), Protocol::Udp),
                ("10.199.0.1:80".to_string(), Protocol::Udp)
            ]
        );
    }

    #[test]
    fn backends_outside_their_nodes_subnet_are_ignored() {
        let mut m = map();
        // Forged: loopback, the metadata service, n1's subnet claimed for a task of n2, the
        // gateway of n2, and a task of a node the map does not know.
        m.services[0].backends = vec![
            backend("t1", "n1", "10.200.0.2"),
            backend("t4", "n2", "127.0.0.1"),
            backend("t5", "n2", "169.254.169.254"),
            backend("t6", "n2", "10.200.0.9"),
            backend("t7", "n2", "10.200.1.1"),
            backend("t8", "n9", "10.200.9.2"),
        ];
        let ip: IpAddr = "127.0.0.2".parse().expect("ip");
        for f in frontends(&m, "n1", ip) {
            if f.listen.port() == 9090 {
                continue;
            }
            let addrs: Vec<String> = f.backends.iter().map(|b| b.addr.ip().to_string()).collect();
            assert_eq!(addrs, ["10.200.0.2"], "{}", f.listen);
        }
        let subnets = node_subnets(&m);
        let kept: Vec<Ipv4Addr> = m.services[0]
            .backends
            .iter()
            .filter_map(|b| backend_ip(&subnets, b))
            .collect();
        assert_eq!(kept, [Ipv4Addr::new(10, 200, 0, 2)]);
        // The kernel's VIP load balancing gets the same single address.
        let vips = vip_balances(&m);
        assert_eq!(vips[0].backends, [Ipv4Addr::new(10, 200, 0, 2)]);
    }

    #[test]
    fn vips_balance_every_port_but_the_meshs_and_dnsrr_has_none() {
        let mut m = map();
        let mut dup = m.services[0].clone();
        dup.name = "forged-same-vip".into();
        dup.backends = vec![backend("t9", "n2", "10.200.1.9")];
        m.services.push(dup);
        let mut rr = m.services[0].clone();
        rr.name = "rr".into();
        rr.mode = EndpointMode::Dnsrr;
        rr.vip = Some("10.199.0.77".into());
        m.services.push(rr);
        let vips = vip_balances(&m);
        let vip: Vec<String> = vips.iter().map(|v| v.vip.to_string()).collect();
        let first = &m.services[0];
        assert_eq!(
            vip,
            [first.vip.clone().expect("vip")],
            "one entry per VIP, no dnsrr"
        );
        assert_eq!(
            vips[0].mesh_ports,
            first
                .ports
                .iter()
                .map(|p| (nat::L4::Tcp, p.target))
                .collect::<Vec<_>>()
        );
        let mut want: Vec<Ipv4Addr> = first
            .backends
            .iter()
            .map(|b| b.addr.parse().expect("ip"))
            .collect();
        want.sort();
        assert_eq!(
            vips[0].backends, want,
            "the first service naming the VIP wins"
        );
    }

    /// `map()` plus two user-defined networks with blocks on n1 and n2, and a service `api`
    /// on both (`front` first, alias `pay` on `back`) with a task on each node.
    fn map_with_networks() -> NetworkMap {
        let mut m = map();
        let net = |name: &str, range: &str, b1: &str, b2: &str| flotilla_types::NetNetwork {
            name: name.into(),
            subnet: range.into(),
            internal: false,
            encrypted: false,
            blocks: [
                ("n1".to_string(), b1.to_string()),
                ("n2".to_string(), b2.to_string()),
            ]
            .into_iter()
            .collect(),
        };
        m.networks = vec![
            net(
                "front",
                "10.200.240.0/20",
                "10.200.240.0/24",
                "10.200.241.0/24",
            ),
            net(
                "back",
                "10.200.224.0/20",
                "10.200.224.0/24",
                "10.200.225.0/24",
            ),
        ];
        let on = |task: &str, node: &str, front: &str, back: &str| {
            let mut b = backend(task, node, front);
            b.addrs.insert("front".into(), front.into());
            b.addrs.insert("back".into(), back.into());
            b
        };
        m.services.push(NetService {
            id: "s3".into(),
            name: "api".into(),
            mode: EndpointMode::Vip,
            vip: Some("10.199.0.3".into()),
            ports: vec![],
            networks: vec![
                flotilla_types::NetworkAttachment {
                    target: "front".into(),
                    aliases: vec![],
                },
                flotilla_types::NetworkAttachment {
                    target: "back".into(),
                    aliases: vec!["pay".into()],
                },
            ],
            network_vips: [
                ("front".to_string(), "10.200.255.2".to_string()),
                ("back".to_string(), "10.200.239.2".to_string()),
            ]
            .into_iter()
            .collect(),
            backends: vec![
                on("t10", "n1", "10.200.240.2", "10.200.224.2"),
                on("t11", "n2", "10.200.241.2", "10.200.225.2"),
                // Forged: n1's front block claimed by n2, the back gateway, a network the
                // task is not on.
                on("t12", "n2", "10.200.240.9", "10.200.225.1"),
            ],
        });
        m
    }

    #[test]
    fn services_on_networks_are_balanced_and_named_per_network() {
        let m = map_with_networks();
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        let vips: Vec<(String, Option<String>, Vec<Ipv4Addr>)> = vip_balances(&m)
            .into_iter()
            .filter(|v| v.vip != ip("10.199.0.1"))
            .map(|v| {
                (
                    v.vip.to_string(),
                    v.source.map(|s| s.to_string()),
                    v.backends,
                )
            })
            .collect();
        assert_eq!(
            vips,
            [
                (
                    "10.200.239.2".to_string(),
                    Some("10.200.224.0/20".to_string()),
                    vec![ip("10.200.224.2"), ip("10.200.225.2")]
                ),
                (
                    "10.200.255.2".to_string(),
                    Some("10.200.240.0/20".to_string()),
                    vec![ip("10.200.240.2"), ip("10.200.241.2")]
                ),
            ]
        );
        // The default table does not know it; each network's table does, by its names there.
        assert!(!dns_records(&m).contains_key("api"));
        let nets = network_dns_records(&m);
        assert_eq!(nets["front"]["api"], [ip("10.200.255.2")]);
        assert!(!nets["front"].contains_key("pay"));
        assert_eq!(nets["back"]["pay"], [ip("10.200.239.2")]);
        assert_eq!(
            nets["back"]["tasks.api"],
            [ip("10.200.224.2"), ip("10.200.225.2")]
        );
        assert!(
            !nets["back"].contains_key("web"),
            "a default-network service"
        );
        // The mesh reaches the tasks by their first network's address.
        let mut api = m.services[2].clone();
        api.ports = vec![port(9443, 443, PublishMode::Ingress)];
        let mut m2 = m.clone();
        m2.services[2] = api;
        let f = frontends(&m2, "n1", "127.0.0.2".parse().expect("ip"));
        let ingress = f
            .iter()
            .find(|f| f.listen.port() == 9443)
            .expect("published");
        let addrs: Vec<String> = ingress
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(addrs, ["10.200.240.2:443", "10.200.241.2:443"]);
    }

    #[test]
    fn a_forged_network_block_outside_its_range_carries_nothing() {
        let mut m = map_with_networks();
        // `evil` claims n1's default subnet as n2's block; a task there at 10.200.0.5.
        m.networks.push(flotilla_types::NetNetwork {
            name: "evil".into(),
            subnet: "10.200.192.0/20".into(),
            internal: false,
            encrypted: false,
            blocks: [("n2".to_string(), "10.200.0.0/24".to_string())]
                .into_iter()
                .collect(),
        });
        let mut svc = m.services[2].clone();
        svc.id = "s4".into();
        svc.name = "evil-svc".into();
        svc.networks = vec![flotilla_types::NetworkAttachment {
            target: "evil".into(),
            aliases: vec![],
        }];
        svc.network_vips = [("evil".to_string(), "10.200.207.2".to_string())]
            .into_iter()
            .collect();
        let mut b = backend("t20", "n2", "10.200.0.5");
        b.addrs.insert("evil".into(), "10.200.0.5".into());
        svc.backends = vec![b];
        m.services.push(svc);
        let blocks = Blocks::of(&m);
        assert!(!blocks.nets.contains_key(&("evil", "n2")));
        let evil: Vec<nat::VipBalance> = vip_balances(&m)
            .into_iter()
            .filter(|v| v.vip == "10.200.207.2".parse::<Ipv4Addr>().expect("ip"))
            .collect();
        assert_eq!(evil.len(), 1);
        assert!(evil[0].backends.is_empty(), "{evil:?}");
        assert!(network_dns_records(&m)["evil"]["tasks.evil-svc"].is_empty());
    }
}
