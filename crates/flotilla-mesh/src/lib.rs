//! Userspace data plane of Flotilla's routing mesh and service discovery.
//!
//! - [`Pool`]: the backends of one service port, least-connections balancing, draining;
//! - [`TcpFrontend`] / [`UdpFrontend`]: L4 proxies in front of a pool (published ports, VIPs);
//! - [`Mesh`]: every frontend of a node, reconciled from a desired state by [`Mesh::apply`];
//! - [`DnsServer`]: the embedded DNS responder for service and task names.
//!
//! Everything runs on the caller's tokio runtime.
//!
//! # Use from the node agent
//!
//! One [`Mesh`] per node. Whenever services, tasks or task addresses change, build the complete
//! list of [`FrontendSpec`]s and call [`Mesh::apply`] (idempotent; unchanged frontends keep their
//! connections, changed backend sets drain the removed backends):
//!
//! - a **published port** `P/tcp` of a service: `listen: 0.0.0.0:P`, backends = every running task
//!   of the service in the cluster, at `task_ip:target_port` (routing-mesh semantics: any node
//!   accepts and forwards);
//! - a **service VIP**: `listen: VIP:target_port`, same backends. VIP and published listeners on
//!   the same port coexist (`SO_REUSEPORT`, most specific address wins); the VIP must be local
//!   (e.g. `ip route add local <vip-range> dev lo`) or bind with [`ListenOptions::freebind`].
//!
//! One [`DnsServer`] per node, bound on the bridge gateway (`gateway:53`, which containers get as
//! their nameserver), fed with [`DnsServer::set_records`]: service name → VIP (or task IPs in
//! DNS round-robin mode), task names → task IP; `upstreams` = the host's resolvers.
//!
//! For throughput, give the mesh a few [`Workers`] (one per core is a good start) through
//! `MeshOptions { tcp: TcpOptions { runtimes: workers.handles(), .. }, .. }`.
//!
//! [`Mesh::stats`] is serializable, for metrics.

#![forbid(unsafe_code)]

mod copy;
mod dns;
mod error;
mod mesh;
mod pool;
mod proxy_protocol;
mod sock;
mod tcp;
mod udp;
mod workers;

pub use dns::{
    respond, DnsCache, DnsOptions, DnsServer, Lookup, Outcome, Records, SourceNetworks,
    SourceUpstreams, UDP_MAX,
};
pub use error::MeshError;
pub use mesh::{
    ApplyReport, FrontendError, FrontendKey, FrontendSpec, FrontendStats, Mesh, MeshOptions,
    MeshStats, Protocol,
};
pub use pool::{Backend, BackendStats, Lease, Pool, EJECT_FOR};
pub use proxy_protocol::{encode as encode_proxy_header, ProxyProtocol, V2_SIGNATURE};
pub use sock::ListenOptions;
pub use tcp::{TcpFrontend, TcpOptions};
pub use udp::{UdpFrontend, UdpOptions};
pub use workers::Workers;
