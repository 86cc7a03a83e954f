//! Task networking on a node: the leader's address allocator, and the agent side that turns
//! the network map into a bridge, per-task namespaces, the overlay, the routing mesh and DNS.
//!
//! - **Allocator** (leader, inside the control loop): every node gets a subnet of the cluster
//!   pool, every `vip` service a virtual IP ([`allocation_ops`]).
//! - **Node setup** (agent, once the node knows its subnet): bridge `fltbr<tag>` holding the
//!   gateway (first host address), NAT chains `FLT-<tag>-*`, a VXLAN device `fltvx<tag>` unless
//!   another node in this network namespace already has the overlay (nodes run as processes
//!   of one host in tests), a local route for the VIP pool so VIPs are local addresses, and
//!   the DNS responder on the gateway, port 53.
//! - **Tasks**: an address from the node subnet (persisted in `DATA/net/ipam.json`), a network
//!   namespace under `DATA/run/net/netns/`, a veth pair, `/etc/hosts` and `/etc/resolv.conf`.
//! - **Network map** (streamed from a manager): overlay peers, DNS records and the routing
//!   mesh's frontends (published ports on this node's address, VIP ports) with the healthy
//!   tasks as backends.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Mutex};

use flotilla_mesh::{Backend, DnsOptions, DnsServer, FrontendSpec, Mesh, MeshOptions, Protocol};
use flotilla_net::ipam::TaskAddrs;
use flotilla_net::{bridge, cleanup, nat, netns, overlay, task as veth, Net};
use flotilla_store::{Op, Table};
use flotilla_types::{EndpointMode, NetworkMap, NetworkSettings, Node, Service};

use crate::manager::encode;

/// MTU of task interfaces: leaves room for VXLAN's 50 bytes on a 1500-byte underlay.
const TASK_MTU: u32 = 1450;

/// The address allocator (Swarm's allocator): gives every node a task subnet and every
/// `vip`-mode service a virtual IP, lowest free first. It runs only on the leader, inside the
/// control loop, so two allocations never race; each write carries the object's version.
pub fn allocation_ops(
    settings: &NetworkSettings,
    nodes: &[Node],
    services: &[Service],
    now: u64,
) -> Vec<Op> {
    use flotilla_net::ipam::{NodeSubnets, VipPool};
    let mut ops = Vec::new();
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
            n.network = Some(flotilla_types::NodeNetwork {
                subnet: subnet.to_string(),
            });
            n.meta.updated_at = now;
            if let Ok(v) = encode(&n) {
                ops.push(Op::update(Table::Nodes, &n.id, v, Some(n.meta.version)));
            }
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
            if let Ok(v) = encode(&s) {
                ops.push(Op::update(Table::Services, &s.id, v, Some(s.meta.version)));
            }
        }
    }
    ops
}

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
            veth_prefix: format!("fv{}", &tag[..4]),
            dir: data_dir.join("net"),
            vdir: crate::disk::Paths::new(data_dir).run().join("net"),
            tag,
        }
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
}

/// The node's subnet once set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ready {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
}

struct Inner {
    net: Option<Net>,
    addrs: Option<TaskAddrs>,
    overlay: bool,
    mesh: Mesh,
    dns: Option<DnsServer>,
    domain: String,
}

pub struct NodeNet {
    node_id: String,
    names: Names,
    /// Where published ports listen (the node's listen address, or all addresses).
    bind_ip: IpAddr,
    /// The node's underlay address (advertised).
    underlay: Ipv4Addr,
    inner: Mutex<Inner>,
    ready: watch::Sender<Option<Ready>>,
    /// The mesh's proxy threads (one current-thread runtime each, listeners with SO_REUSEPORT,
    /// as nginx workers); kept as long as the mesh.
    _workers: Option<flotilla_mesh::Workers>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl NodeNet {
    pub fn new(data_dir: &Path, node_id: &str, bind_ip: IpAddr, underlay: IpAddr) -> Arc<NodeNet> {
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
            inner: Mutex::new(Inner {
                net: None,
                addrs: None,
                overlay: false,
                mesh: Mesh::new(opts),
                dns: None,
                domain: "flotilla".into(),
            }),
            ready: watch::channel(None).0,
            _workers: workers,
        })
    }

    /// Sets up the node's side of the task network (idempotent).
    async fn setup(
        &self,
        inner: &mut Inner,
        subnet: Ipv4Net,
        s: &NetworkSettings,
    ) -> Result<Ready, String> {
        let gateway = flotilla_net::ipam::gateway_of(subnet);
        let gw_net = Ipv4Net::new(gateway, subnet.prefix_len()).map_err(err)?;
        if inner.net.is_none() {
            inner.net = Some(Net::current().map_err(err)?);
        }
        let Some(net) = inner.net.clone() else {
            return Err("no netlink connection".into());
        };
        bridge::ensure_bridge(&net, &self.names.bridge, gw_net, 1500)
            .await
            .map_err(err)?;
        let v = overlay::Vxlan {
            name: self.names.vxlan.clone(),
            vni: s.vxlan_vni,
            port: s.vxlan_port,
            local: self.underlay,
            subnet,
            mtu: TASK_MTU,
        };
        inner.overlay = match overlay::ensure_vxlan(&net, &v).await {
            Ok(_) => true,
            Err(flotilla_net::Error::VxlanInUse { .. }) => {
                tracing::info!(
                    "another node in this network namespace runs the overlay; using its routes"
                );
                false
            }
            Err(e) => return Err(format!("overlay: {e}")),
        };
        nat::ensure(
            &net,
            &nat::NatRules {
                tag: self.names.tag.clone(),
                subnet,
                bridge: self.names.bridge.clone(),
                overlay: inner.overlay.then(|| self.names.vxlan.clone()),
                cluster_pool: s.address_pool.parse().ok(),
                outbound_nat: s.outbound_nat,
                // Other nodes' bridges and overlay devices in this namespace (see `Names`).
                trusted_ifaces: vec!["fltbr+".into(), "fltvx+".into()],
                vxlan_port: Some(s.vxlan_port),
                dns: Some(SocketAddrV4::new(gateway, 53)),
                vip_pool: s.vip_pool.parse().ok(),
            },
        )
        .await
        .map_err(err)?;
        std::fs::create_dir_all(&self.names.dir).map_err(err)?;
        std::fs::create_dir_all(self.names.netns_dir()).map_err(err)?;
        // Remembered for `node cleanup`, which runs without the cluster.
        write_file(
            &self.names.dir.join("settings.json"),
            &serde_json::to_string(s).map_err(err)?,
        )?;
        if let Ok(pool) = s.vip_pool.parse::<Ipv4Net>() {
            ensure_local_route(&net, pool, self.names.route_metric()).await?;
        }
        inner.addrs = Some(TaskAddrs::open(self.names.dir.join("ipam.json"), subnet).map_err(err)?);
        inner.domain = s.dns_domain.clone();
        Ok(Ready { subnet, gateway })
    }

    /// Applies a network map from the managers.
    pub async fn apply_map(&self, map: &NetworkMap) {
        let mut inner = self.inner.lock().await;
        let me = map.nodes.iter().find(|n| n.id == self.node_id);
        let Some(subnet) = me
            .and_then(|n| n.subnet.as_ref())
            .and_then(|s| s.parse::<Ipv4Net>().ok())
        else {
            return;
        };
        let ready = *self.ready.borrow();
        if ready.map(|r| r.subnet) != Some(subnet) {
            match self.setup(&mut inner, subnet, &map.settings).await {
                Ok(r) => {
                    tracing::info!(subnet = %subnet, overlay = inner.overlay, "task network ready");
                    self.ready.send_replace(Some(r));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "setting up the task network failed; retrying on the next map");
                    return;
                }
            }
        }
        let Some(net) = inner.net.clone() else { return };
        // The DNS responder on the gateway (retried on every map until it listens).
        let ready = *self.ready.borrow();
        if inner.dns.is_none() {
            if let Some(r) = ready {
                let opts = DnsOptions {
                    domain: Some(inner.domain.clone()),
                    ..Default::default()
                };
                match DnsServer::bind(SocketAddr::new(IpAddr::V4(r.gateway), 53), opts).await {
                    Ok(d) => inner.dns = Some(d),
                    Err(e) => {
                        tracing::warn!(error = %e, "the DNS responder could not start; retrying on the next map")
                    }
                }
            }
        }
        if inner.overlay {
            let peers: Vec<overlay::OverlayPeer> = map
                .nodes
                .iter()
                .filter(|n| n.id != self.node_id)
                .filter_map(|n| {
                    Some(overlay::OverlayPeer {
                        underlay: n.ip.parse().ok()?,
                        subnet: n.subnet.as_ref()?.parse().ok()?,
                    })
                })
                .collect();
            if let Err(e) = overlay::set_peers(&net, &self.names.vxlan, &peers).await {
                tracing::warn!(error = %e, "programming overlay peers failed");
            }
            // Only the cluster's nodes may send to the VXLAN port.
            let underlays: Vec<Ipv4Addr> =
                map.nodes.iter().filter_map(|n| n.ip.parse().ok()).collect();
            if let Err(e) = nat::set_nodes(&net, &self.names.tag, &underlays).await {
                tracing::warn!(error = %e, "updating the vxlan allow-list failed");
            }
        }
        // DNS: `name` → VIP (or the tasks for dnsrr); `tasks.name` → the tasks.
        let mut records: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        let subnets = node_subnets(map);
        for s in &map.services {
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
        if let Some(d) = &inner.dns {
            d.set_records(records);
        }
        // Routing mesh.
        let specs = frontends(map, &self.node_id, self.bind_ip);
        // Tasks may reach this node's published ports (not its other host ports).
        let published: Vec<(nat::L4, u16)> = specs
            .iter()
            .filter(|f| f.listen.ip() == self.bind_ip)
            .map(|f| {
                let p = match f.protocol {
                    Protocol::Tcp => nat::L4::Tcp,
                    Protocol::Udp => nat::L4::Udp,
                };
                (p, f.listen.port())
            })
            .collect();
        if let Err(e) = nat::set_published(&net, &self.names.tag, &published).await {
            tracing::warn!(error = %e, "updating the published ports tasks may reach failed");
        }
        let report = inner.mesh.apply(specs).await;
        for f in &report.failed {
            tracing::debug!(listen = %f.listen, error = %f.error, "a mesh frontend could not listen; retrying on the next map");
        }
    }

    /// Waits until the node's subnet is set up.
    async fn wait_ready(&self, within: Duration) -> Result<Ready, String> {
        let mut rx = self.ready.subscribe();
        let r = tokio::time::timeout(within, rx.wait_for(|r| r.is_some())).await;
        match r {
            Ok(Ok(v)) => v.ok_or_else(|| "task network not ready".to_string()),
            _ => Err(format!(
                "this node's task network is not set up after {}s (no subnet from the managers yet)",
                within.as_secs()
            )),
        }
    }

    /// Gives a task its address and resolver files. Its namespace is the one the OCI runtime
    /// creates with the container (inside the container's user namespace, so that `runc exec`
    /// can join it); [`NodeNet::adopt_netns`] names it and [`NodeNet::attach_task`] wires it,
    /// both before the container's process starts.
    pub async fn prepare_task(&self, task_id: &str, hostname: &str) -> Result<TaskNet, String> {
        let ready = self.wait_ready(Duration::from_secs(60)).await?;
        // The lock covers the allocation only: namespaces and veths of many tasks are made
        // concurrently (a 100-replica service starts 100 of them at once).
        let (domain, addr) = {
            let mut inner = self.inner.lock().await;
            let domain = inner.domain.clone();
            let addrs = inner.addrs.as_mut().ok_or("task network not ready")?;
            (domain, addrs.allocate(task_id).map_err(err)?)
        };
        let path = self.names.netns_dir().join(task_id);
        let link = veth::TaskLink {
            netns: path.clone(),
            host_ifname: veth::host_ifname(&self.names.veth_prefix, task_id),
            bridge: self.names.bridge.clone(),
            addr: Ipv4Net::new(addr, ready.subnet.prefix_len()).map_err(err)?,
            gateway: ready.gateway,
            mtu: TASK_MTU,
        };
        let dir = self.names.task_dir(task_id);
        std::fs::create_dir_all(&dir).map_err(err)?;
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{addr}\t{hostname}\n"
        );
        let resolv = format!(
            "nameserver {}\nsearch {domain}\noptions ndots:0\n",
            ready.gateway
        );
        let hosts_path = dir.join("hosts");
        let resolv_path = dir.join("resolv.conf");
        write_file(&hosts_path, &hosts)?;
        write_file(&resolv_path, &resolv)?;
        Ok(TaskNet {
            netns: path,
            addr,
            hosts: hosts_path,
            resolv: resolv_path,
            link,
        })
    }

    /// Names the network namespace of the task's container (its init process `pid`, created
    /// and waiting to start) under the node's netns dir, with `lo` up and the sysctls set. A
    /// namespace left by an earlier attempt of the same task is replaced, its veth removed.
    pub async fn adopt_netns(&self, t: &TaskNet, pid: u32) -> Result<(), String> {
        if t.netns.exists() {
            let net = self.inner.lock().await.net.clone();
            if let Some(net) = net {
                let _ = veth::detach(&net, &t.link.host_ifname).await;
            }
        }
        let dir = self.names.netns_dir();
        let name = t
            .netns
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or("task namespace path has no name")?;
        tokio::task::spawn_blocking(move || netns::adopt(&dir, &name, pid))
            .await
            .map_err(err)?
            .map(|_| ())
            .map_err(|e| format!("task network: {e}"))
    }

    /// Wires the task's namespace to the bridge (veth, address, default route).
    pub async fn attach_task(&self, t: &TaskNet) -> Result<(), String> {
        let net = self
            .inner
            .lock()
            .await
            .net
            .clone()
            .ok_or("task network not ready")?;
        veth::attach(&net, &t.link)
            .await
            .map_err(|e| format!("task network: {e}"))
    }

    /// The address a task has (after an agent restart, from the persisted allocations).
    pub async fn address_of(&self, task_id: &str) -> Option<Ipv4Addr> {
        // Right after an agent restart the allocations load with the first network map.
        let _ = self.wait_ready(Duration::from_secs(10)).await;
        let inner = self.inner.lock().await;
        inner.addrs.as_ref()?.get(task_id)
    }

    /// Removes a task's veth, namespace, files and address (idempotent).
    pub async fn release_task(&self, task_id: &str) {
        let net = self.inner.lock().await.net.clone();
        if let Some(net) = net {
            let ifname = veth::host_ifname(&self.names.veth_prefix, task_id);
            if let Err(e) = veth::detach(&net, &ifname).await {
                tracing::warn!(task = task_id, error = %e, "removing the task's veth failed");
            }
        }
        let path = self.names.netns_dir().join(task_id);
        if let Err(e) = netns::remove(&path) {
            tracing::warn!(task = task_id, error = %e, "removing the task's network namespace failed");
        }
        let _ = std::fs::remove_dir_all(self.names.task_dir(task_id));
        let mut inner = self.inner.lock().await;
        if let Some(a) = inner.addrs.as_mut() {
            if let Err(e) = a.release(task_id) {
                tracing::warn!(task = task_id, error = %e, "releasing the task's address failed");
            }
        }
    }

    /// Task ids that have a network namespace here.
    pub fn prepared_tasks(&self) -> Vec<String> {
        netns::list(&self.names.netns_dir())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().to_string()))
            .collect()
    }

    /// Stops the mesh and DNS (the kernel objects stay for running tasks).
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        inner.mesh.clear().await;
        inner.dns = None;
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("write {}: {e}", path.display()))
}

/// `ip route replace local POOL dev lo table local metric M`: every VIP of the pool is a local
/// address (AnyIP), so the mesh can listen on VIP:port without one address per VIP. Each node
/// owns its own entry (its metric), so nodes sharing a network namespace (tests) each remove
/// only theirs.
async fn ensure_local_route(net: &Net, pool: Ipv4Net, metric: u32) -> Result<(), String> {
    use flotilla_net::link;
    let lo = link::index(net, "lo")
        .await
        .map_err(err)?
        .ok_or("no loopback interface")?;
    let msg = local_route(pool, lo, metric);
    match net.handle().route().add(msg).replace().execute().await {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("local route for the VIP pool {pool}: {e}")),
    }
}

fn local_route(
    pool: Ipv4Net,
    lo: u32,
    metric: u32,
) -> rtnetlink::packet_route::route::RouteMessage {
    rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(pool.network(), pool.prefix_len())
        .output_interface(lo)
        .priority(metric)
        .table_id(255)
        .kind(rtnetlink::packet_route::route::RouteType::Local)
        .scope(rtnetlink::packet_route::route::RouteScope::Host)
        .build()
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
fn backend_ip(
    subnets: &HashMap<&str, Ipv4Net>,
    b: &flotilla_types::NetBackend,
) -> Option<Ipv4Addr> {
    let ip: Ipv4Addr = b.addr.parse().ok()?;
    let subnet = *subnets.get(b.node_id.as_str())?;
    crate::api::network::is_task_addr(subnet, ip).then_some(ip)
}

/// The mesh frontends this node runs for a map.
pub fn frontends(map: &NetworkMap, node_id: &str, bind_ip: IpAddr) -> Vec<FrontendSpec> {
    let subnets = node_subnets(map);
    let mut out: Vec<FrontendSpec> = Vec::new();
    let mut seen: HashSet<(SocketAddr, Protocol)> = HashSet::new();
    for s in &map.services {
        for p in &s.ports {
            let protocol = if p.protocol == "udp" {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            let proxy_protocol = match p.proxy_protocol.as_deref() {
                Some("v1") => Some(flotilla_mesh::ProxyProtocol::V1),
                Some("v2") => Some(flotilla_mesh::ProxyProtocol::V2),
                _ => None,
            };
            let host_mode = p.publish_mode == "host";
            let backends: Vec<Backend> = s
                .backends
                .iter()
                .filter(|b| !host_mode || b.node_id == node_id)
                .filter_map(|b| {
                    let ip = backend_ip(&subnets, b)?;
                    Some(Backend::new(
                        b.task_id.clone(),
                        SocketAddr::new(IpAddr::V4(ip), p.target),
                    ))
                })
                .collect();
            if host_mode && backends.is_empty() {
                continue;
            }
            let listen = SocketAddr::new(bind_ip, p.published);
            if seen.insert((listen, protocol)) {
                out.push(FrontendSpec {
                    listen,
                    protocol,
                    backends,
                    proxy_protocol,
                });
            }
        }
        // The VIP answers on every target port, load-balanced over all tasks.
        if let (EndpointMode::Vip, Some(vip)) = (
            s.mode,
            s.vip.as_ref().and_then(|v| v.parse::<Ipv4Addr>().ok()),
        ) {
            let mut targets: Vec<(u16, Protocol)> = s
                .ports
                .iter()
                .map(|p| {
                    (
                        p.target,
                        if p.protocol == "udp" {
                            Protocol::Udp
                        } else {
                            Protocol::Tcp
                        },
                    )
                })
                .collect();
            targets.sort();
            targets.dedup();
            for (port, protocol) in targets {
                let listen = SocketAddr::new(IpAddr::V4(vip), port);
                let backends = s
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let ip = backend_ip(&subnets, b)?;
                        Some(Backend::new(
                            b.task_id.clone(),
                            SocketAddr::new(IpAddr::V4(ip), port),
                        ))
                    })
                    .collect();
                if seen.insert((listen, protocol)) {
                    out.push(FrontendSpec {
                        listen,
                        protocol,
                        backends,
                        proxy_protocol: None,
                    });
                }
            }
        }
    }
    out
}

/// The VIP pool of the node's local route (from the settings it recorded at set-up).
fn own_vip_pool(names: &Names) -> Option<Ipv4Net> {
    let text = std::fs::read_to_string(names.dir.join("settings.json")).ok()?;
    let s: NetworkSettings = serde_json::from_str(&text).ok()?;
    s.vip_pool.parse().ok()
}

/// Removes every network object of the node whose data dir is `data_dir` (for
/// `flotilla node cleanup`). Returns what was removed.
pub async fn cleanup(data_dir: &Path, node_id: &str) -> Result<Vec<String>, String> {
    let names = Names::new(data_dir, node_id);
    let net = Net::current().map_err(err)?;
    let mut removed = cleanup::remove_all(&net, &names.owned())
        .await
        .map_err(err)?;
    if let Some(pool) = own_vip_pool(&names) {
        let lo = flotilla_net::link::index(&net, "lo").await.ok().flatten();
        if let Some(lo) = lo {
            let msg = local_route(pool, lo, names.route_metric());
            if net.handle().route().del(msg).execute().await.is_ok() {
                removed.push(format!("route local {pool}"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&names.dir);
    let _ = std::fs::remove_dir_all(&names.vdir);
    Ok(removed)
}

/// What [`cleanup`] would remove (tests assert it is empty after a node is cleaned up).
pub async fn leftovers(data_dir: &Path, node_id: &str) -> Result<Vec<String>, String> {
    let names = Names::new(data_dir, node_id);
    let net = Net::current().map_err(err)?;
    let mut out = cleanup::leftovers(&net, &names.owned())
        .await
        .map_err(err)?;
    if let Some(pool) = own_vip_pool(&names) {
        if route_exists(&net, pool, names.route_metric()).await {
            out.push(format!("route local {pool}"));
        }
    }
    Ok(out)
}

async fn route_exists(net: &Net, pool: Ipv4Net, metric: u32) -> bool {
    use futures::TryStreamExt;
    let filter = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(255)
        .build();
    let mut routes = net.handle().route().get(filter).execute();
    while let Ok(Some(r)) = routes.try_next().await {
        let dst = r.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::route::RouteAttribute::Destination(
                rtnetlink::packet_route::route::RouteAddress::Inet(ip),
            ) => Some(*ip),
            _ => None,
        });
        let priority = r.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::route::RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        });
        if dst == Some(pool.network())
            && r.header.destination_prefix_length == pool.prefix_len()
            && priority == Some(metric)
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::{NetBackend, NetService, PortConfig};
    use serde_json::json;

    fn port(published: u16, target: u16, mode: &str) -> PortConfig {
        PortConfig {
            published,
            target,
            protocol: "tcp".into(),
            publish_mode: mode.into(),
            proxy_protocol: None,
        }
    }

    fn backend(task: &str, node: &str, addr: &str) -> NetBackend {
        NetBackend {
            task_id: task.into(),
            node_id: node.into(),
            addr: addr.into(),
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
                    ports: vec![port(8080, 80, "ingress")],
                    backends: vec![
                        backend("t1", "n1", "10.200.0.2"),
                        backend("t2", "n2", "10.200.1.2"),
                    ],
                },
                NetService {
                    id: "s2".into(),
                    name: "edge".into(),
                    mode: EndpointMode::Dnsrr,
                    vip: None,
                    ports: vec![port(9090, 90, "host")],
                    backends: vec![backend("t3", "n2", "10.200.1.3")],
                },
            ],
        }
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
    }

    fn node_json(id: &str, subnet: Option<&str>, version: u64) -> Node {
        let mut v = json!({
            "id": id, "version": version,
            "spec": {"name": id, "role": "worker", "availability": "active"},
            "description": {"hostname": "h", "os": "linux", "arch": "x86_64", "resources": {}},
            "status": {"state": "ready", "addr": "127.0.0.1:4440"}
        });
        if let Some(s) = subnet {
            v["network"] = json!({ "subnet": s });
        }
        serde_json::from_value(v).expect("node")
    }

    fn service_json(id: &str, mode: &str, vip: Option<&str>) -> Service {
        let mut v = json!({
            "id": id, "version": 7,
            "spec": {
                "name": id,
                "task_template": {"container": {"image": "x"}},
                "mode": {"replicated": {"replicas": 1}},
                "endpoint_spec": {"mode": mode}
            }
        });
        if let Some(a) = vip {
            v["vip"] = json!(a);
        }
        serde_json::from_value(v).expect("service")
    }

    #[test]
    fn allocator_gives_lowest_free_subnets_and_vips() {
        let settings = NetworkSettings::default();
        let nodes = vec![
            node_json("a", Some("10.200.0.0/24"), 3),
            node_json("b", None, 4),
            node_json("c", None, 5),
        ];
        let services = vec![
            service_json("s1", "vip", Some("10.199.0.1")),
            service_json("s2", "vip", None),
            service_json("s3", "dnsrr", Some("10.199.0.9")),
        ];
        let ops = allocation_ops(&settings, &nodes, &services, 1);
        let decoded: Vec<serde_json::Value> = ops
            .iter()
            .map(|op| match op {
                Op::Update { value, .. } => serde_json::from_slice(value).expect("json"),
                other => panic!("unexpected op {other:?}"),
            })
            .collect();
        let subnets: Vec<&str> = decoded
            .iter()
            .filter_map(|v| v["network"]["subnet"].as_str())
            .collect();
        assert_eq!(subnets, ["10.200.1.0/24", "10.200.2.0/24"]);
        let s2 = decoded
            .iter()
            .find(|v| v["id"] == "s2")
            .expect("s2 allocated");
        assert_eq!(s2["vip"], "10.199.0.2");
        let s3 = decoded
            .iter()
            .find(|v| v["id"] == "s3")
            .expect("s3 released");
        assert!(s3.get("vip").is_none(), "dnsrr gives its VIP back: {s3}");
    }
}
