//! [`Mesh`]: the set of frontends of one node, reconciled to a desired state.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::pool::{Backend, BackendStats, Pool};
use crate::proxy_protocol::ProxyProtocol;
use crate::tcp::{Counters, TcpFrontend, TcpOptions};
use crate::udp::{UdpFrontend, UdpOptions};
use crate::MeshError;

/// Transport of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP, proxied connection by connection.
    Tcp,
    /// UDP, relayed per client session.
    Udp,
}

/// One wanted frontend: a listening address and the backends behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendSpec {
    /// Where to listen: a published port (`0.0.0.0:8080`) or a service VIP and port.
    pub listen: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The running tasks of the service, at their target port.
    pub backends: Vec<Backend>,
    /// Prepend a PROXY protocol header to backend connections (TCP only; ignored for UDP).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// Options shared by every frontend of a [`Mesh`].
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// TCP frontend options (`proxy_protocol` is taken from each spec instead).
    pub tcp: TcpOptions,
    /// UDP frontend options.
    pub udp: UdpOptions,
    /// How long a removed TCP frontend lets its open connections finish before cutting them.
    pub drain_grace: Duration,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            tcp: TcpOptions::default(),
            udp: UdpOptions::default(),
            drain_grace: Duration::from_secs(30),
        }
    }
}

/// Key of a frontend: a TCP and a UDP frontend may share a port.
pub type FrontendKey = (SocketAddr, Protocol);

/// A frontend that could not be opened by [`Mesh::apply`]; it is tried again on the next apply.
#[derive(Debug)]
pub struct FrontendError {
    /// Listening address of the frontend.
    pub listen: SocketAddr,
    /// Its protocol.
    pub protocol: Protocol,
    /// Why it failed.
    pub error: MeshError,
}

/// What an [`Mesh::apply`] changed.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Frontends newly listening.
    pub opened: Vec<FrontendKey>,
    /// Frontends closed (TCP ones drain in the background).
    pub closed: Vec<FrontendKey>,
    /// Frontends kept, with their backend set replaced.
    pub updated: Vec<FrontendKey>,
    /// Frontends that could not be opened.
    pub failed: Vec<FrontendError>,
}

/// Counters of one frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendStats {
    /// Listening address as asked for.
    pub listen: SocketAddr,
    /// Address actually bound (differs for port 0); `None` while binding fails.
    pub bound: Option<SocketAddr>,
    /// Protocol.
    pub protocol: Protocol,
    /// Last bind error, while the frontend is not listening.
    pub error: Option<String>,
    /// Open client connections (TCP) or sessions (UDP).
    pub active: usize,
    /// Connections or sessions ever accepted.
    pub total: u64,
    /// Connections or sessions that no backend took.
    pub failed: u64,
    /// Per-backend counters (draining backends included while they have connections).
    pub backends: Vec<BackendStats>,
}

/// Counters of every frontend of a mesh, ordered by listening address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStats {
    /// One entry per wanted frontend.
    pub frontends: Vec<FrontendStats>,
}

enum Running {
    Tcp(TcpFrontend),
    Udp(UdpFrontend),
}

impl Running {
    fn pool(&self) -> &Pool {
        match self {
            Running::Tcp(f) => f.pool(),
            Running::Udp(f) => f.pool(),
        }
    }
    fn counters(&self) -> &Counters {
        match self {
            Running::Tcp(f) => f.counters(),
            Running::Udp(f) => f.counters(),
        }
    }
    fn local_addr(&self) -> SocketAddr {
        match self {
            Running::Tcp(f) => f.local_addr(),
            Running::Udp(f) => f.local_addr(),
        }
    }
}

/// The frontends of one node. Drive it with [`Mesh::apply`] each time the desired state changes
/// (services, tasks, their addresses); it is idempotent.
pub struct Mesh {
    opts: MeshOptions,
    running: HashMap<FrontendKey, Running>,
    /// Wanted frontends that failed to bind, with the error (retried on the next apply).
    failing: BTreeMap<FrontendKey, String>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .field("failing", &self.failing)
            .finish()
    }
}

impl Default for Mesh {
    fn default() -> Self {
        Self::new(MeshOptions::default())
    }
}

impl Mesh {
    /// A mesh with no frontend.
    pub fn new(opts: MeshOptions) -> Self {
        Mesh {
            opts,
            running: HashMap::new(),
            failing: BTreeMap::new(),
        }
    }

    /// Reconciles the frontends with `specs`: opens new ones, closes unwanted ones (TCP ones stop
    /// accepting at once and drain for [`MeshOptions::drain_grace`] in the background), and swaps
    /// the backend sets of kept ones without touching their connections. Frontends that cannot
    /// bind are reported and retried on the next call. Must run within a tokio runtime.
    ///
    /// Two specs with the same listen address and protocol: the last one wins.
    pub async fn apply(&mut self, specs: Vec<FrontendSpec>) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut wanted: HashMap<FrontendKey, FrontendSpec> = HashMap::new();
        for s in specs {
            wanted.insert((s.listen, s.protocol), s);
        }

        // Close first, so that a port moving between specs is free again.
        let gone: Vec<FrontendKey> = self
            .running
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            if let Some(r) = self.running.remove(&key) {
                self.close(key, r).await;
                report.closed.push(key);
            }
        }
        self.failing.retain(|k, _| wanted.contains_key(k));

        let mut keys: Vec<FrontendKey> = wanted.keys().copied().collect();
        keys.sort();
        for key in keys {
            let Some(spec) = wanted.remove(&key) else {
                continue;
            };
            if let Some(r) = self.running.get(&key) {
                if r.pool().backends() != spec.backends {
                    r.pool().set_backends(spec.backends);
                    report.updated.push(key);
                }
                if let Running::Tcp(t) = r {
                    t.set_proxy_protocol(spec.proxy_protocol);
                }
                continue;
            }
            let pool = Pool::new(spec.backends);
            let opened = match spec.protocol {
                Protocol::Tcp => {
                    let opts = TcpOptions {
                        proxy_protocol: spec.proxy_protocol,
                        ..self.opts.tcp.clone()
                    };
                    TcpFrontend::bind(spec.listen, pool, opts)
                        .await
                        .map(Running::Tcp)
                }
                Protocol::Udp => UdpFrontend::bind(spec.listen, pool, self.opts.udp.clone())
                    .await
                    .map(Running::Udp),
            };
            match opened {
                Ok(r) => {
                    info!(listen = %spec.listen, protocol = ?spec.protocol, bound = %r.local_addr(), "mesh frontend opened");
                    self.failing.remove(&key);
                    self.running.insert(key, r);
                    report.opened.push(key);
                }
                Err(error) => {
                    warn!(listen = %spec.listen, protocol = ?spec.protocol, %error, "mesh frontend cannot listen");
                    self.failing.insert(key, error.to_string());
                    report.failed.push(FrontendError {
                        listen: spec.listen,
                        protocol: spec.protocol,
                        error,
                    });
                }
            }
        }
        report
    }

    async fn close(&self, key: FrontendKey, r: Running) {
        info!(listen = %key.0, protocol = ?key.1, "mesh frontend closed");
        match r {
            Running::Tcp(mut t) => {
                t.stop_accepting().await;
                let grace = self.opts.drain_grace;
                if t.active() > 0 {
                    tokio::spawn(async move {
                        let cut = t.shutdown(grace).await;
                        if cut > 0 {
                            info!(listen = %key.0, cut, "drain grace over, connections cut");
                        }
                    });
                }
            }
            Running::Udp(u) => u.close().await,
        }
    }

    /// Closes every frontend (as `apply(vec![])` does); TCP connections drain in the background.
    pub async fn clear(&mut self) {
        self.apply(Vec::new()).await;
    }

    /// Closes every frontend and waits up to `grace` for open TCP connections to finish, cutting
    /// the rest (for agent shutdown). Returns how many connections were cut. Dropping a `Mesh`
    /// instead closes the listeners and lets open connections run until they end on their own.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        let mut drains = tokio::task::JoinSet::new();
        for (key, r) in self.running.drain() {
            info!(listen = %key.0, protocol = ?key.1, "mesh frontend closed");
            match r {
                Running::Tcp(t) => {
                    drains.spawn(t.shutdown(grace));
                }
                Running::Udp(u) => u.close().await,
            }
        }
        let mut cut = 0;
        while let Some(r) = drains.join_next().await {
            cut += r.unwrap_or(0);
        }
        cut
    }

    /// The address a frontend is bound to (differs from the spec for port 0).
    pub fn local_addr(&self, listen: SocketAddr, protocol: Protocol) -> Option<SocketAddr> {
        self.running
            .get(&(listen, protocol))
            .map(|r| r.local_addr())
    }

    /// Counters of every wanted frontend, listening or failing.
    pub fn stats(&self) -> MeshStats {
        let mut frontends: Vec<FrontendStats> = self
            .running
            .iter()
            .map(|((listen, protocol), r)| {
                let c = r.counters();
                FrontendStats {
                    listen: *listen,
                    bound: Some(r.local_addr()),
                    protocol: *protocol,
                    error: None,
                    active: c.active.load(Ordering::Acquire),
                    total: c.total.load(Ordering::Relaxed),
                    failed: c.failed.load(Ordering::Relaxed),
                    backends: r.pool().stats(),
                }
            })
            .collect();
        frontends.extend(
            self.failing
                .iter()
                .map(|((listen, protocol), e)| FrontendStats {
                    listen: *listen,
                    bound: None,
                    protocol: *protocol,
                    error: Some(e.clone()),
                    active: 0,
                    total: 0,
                    failed: 0,
                    backends: Vec::new(),
                }),
        );
        frontends.sort_by_key(|f| (f.listen, f.protocol));
        MeshStats { frontends }
    }
}
