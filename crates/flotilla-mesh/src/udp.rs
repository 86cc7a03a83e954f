//! The UDP frontend: one session per client address, each with its own upstream socket connected
//! to the backend chosen when the session started.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::pool::{Lease, Pool};
use crate::sock::ListenOptions;
use crate::tcp::Counters;
use crate::MeshError;

/// Options of a UDP frontend.
#[derive(Debug, Clone)]
pub struct UdpOptions {
    /// A session with no datagram in either direction for this long is closed (default 30 s).
    pub idle_timeout: Duration,
    /// New clients beyond this many sessions are dropped (default 16384).
    pub max_sessions: usize,
    /// Socket options of the listening socket.
    pub listen: ListenOptions,
}

impl Default for UdpOptions {
    fn default() -> Self {
        UdpOptions {
            idle_timeout: Duration::from_secs(30),
            max_sessions: 16384,
            listen: ListenOptions::default(),
        }
    }
}

struct Session {
    upstream: Arc<UdpSocket>,
    /// Milliseconds since the frontend's epoch of the last datagram in either direction.
    last: Arc<AtomicU64>,
    reply: JoinHandle<()>,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Session>>>;

fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Session>> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A listening UDP frontend. Dropping it closes the port and every session.
pub struct UdpFrontend {
    local_addr: SocketAddr,
    pool: Pool,
    counters: Arc<Counters>,
    sessions: Sessions,
    recv: JoinHandle<()>,
}

impl std::fmt::Debug for UdpFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpFrontend")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl UdpFrontend {
    /// Binds `listen` and starts relaying datagrams to backends of `pool`.
    pub async fn bind(
        listen: SocketAddr,
        pool: Pool,
        opts: UdpOptions,
    ) -> Result<UdpFrontend, MeshError> {
        let sock = crate::sock::udp_socket(listen, opts.listen)?;
        let local_addr = sock.local_addr()?;
        let counters = Arc::new(Counters::default());
        let sessions: Sessions = Arc::default();
        let recv = tokio::spawn(recv_loop(
            Arc::new(sock),
            pool.clone(),
            opts,
            counters.clone(),
            sessions.clone(),
        ));
        Ok(UdpFrontend {
            local_addr,
            pool,
            counters,
            sessions,
            recv,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The pool this frontend balances over.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Sessions open now.
    pub fn active(&self) -> usize {
        self.counters.active.load(Ordering::Acquire)
    }

    /// Sessions accepted since the frontend started.
    pub fn total(&self) -> u64 {
        self.counters().total.load(Ordering::Relaxed)
    }

    /// Sessions that no backend took.
    pub fn failed(&self) -> u64 {
        self.counters().failed.load(Ordering::Relaxed)
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Closes the port and every session, and waits until the port can be bound again.
    pub async fn close(mut self) {
        self.close_inner().await;
    }

    async fn close_inner(&mut self) {
        self.recv.abort();
        let _ = (&mut self.recv).await;
        let all: Vec<Session> = lock(&self.sessions).drain().map(|(_, s)| s).collect();
        for s in all {
            s.reply.abort();
            let _ = s.reply.await;
        }
    }
}

impl Drop for UdpFrontend {
    fn drop(&mut self) {
        self.recv.abort();
        for (_, s) in lock(&self.sessions).drain() {
            s.reply.abort();
        }
    }
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

fn now_ms(epoch: tokio::time::Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

async fn recv_loop(
    sock: Arc<UdpSocket>,
    pool: Pool,
    opts: UdpOptions,
    counters: Arc<Counters>,
    sessions: Sessions,
) {
    let mut buf = vec![0u8; 65536];
    let epoch = tokio::time::Instant::now();
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                // ICMP errors surface here on some systems; they concern one peer, not the socket.
                debug!(error = %e, "udp frontend recv failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let existing = lock(&sessions)
            .get(&client)
            .map(|s| (s.upstream.clone(), s.last.clone()));
        let upstream = match existing {
            Some((u, last)) => {
                last.store(now_ms(epoch), Ordering::Relaxed);
                u
            }
            None => {
                if lock(&sessions).len() >= opts.max_sessions {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match open_session(&pool).await {
                    Ok((upstream, lease)) => {
                        let upstream = Arc::new(upstream);
                        counters.opened();
                        let last = Arc::new(AtomicU64::new(now_ms(epoch)));
                        // Spawn and insert under the lock, so a reply task that ends at once
                        // finds (and removes) its session.
                        let mut map = lock(&sessions);
                        // The guard lives in the task's future: dropped even if the task is
                        // aborted before it first runs.
                        let guard = SessionGuard {
                            counters: counters.clone(),
                            sessions: sessions.clone(),
                            client,
                            upstream: upstream.clone(),
                        };
                        let reply = tokio::spawn(reply_loop(
                            sock.clone(),
                            upstream.clone(),
                            client,
                            lease,
                            last.clone(),
                            epoch,
                            opts.idle_timeout,
                            guard,
                        ));
                        map.insert(
                            client,
                            Session {
                                upstream: upstream.clone(),
                                last,
                                reply,
                            },
                        );
                        drop(map);
                        upstream
                    }
                    Err(e) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        debug!(client = %client, error = %e, "no backend for udp session");
                        continue;
                    }
                }
            }
        };
        if let Err(e) = upstream.send(&buf[..n]).await {
            debug!(client = %client, error = %e, "udp send to backend failed; session closed");
            if let Some(s) = lock(&sessions).remove(&client) {
                s.reply.abort();
            }
        }
    }
}

async fn open_session(pool: &Pool) -> Result<(UdpSocket, Lease), MeshError> {
    let lease = pool.pick().ok_or(MeshError::NoBackend)?;
    let sock = UdpSocket::bind(unspecified_for(lease.addr())).await?;
    sock.connect(lease.addr()).await?;
    Ok((sock, lease))
}

/// Decrements the session count and forgets the session when its reply task ends.
struct SessionGuard {
    counters: Arc<Counters>,
    sessions: Sessions,
    client: SocketAddr,
    upstream: Arc<UdpSocket>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.sessions);
        if map
            .get(&self.client)
            .is_some_and(|s| Arc::ptr_eq(&s.upstream, &self.upstream))
        {
            map.remove(&self.client);
        }
        drop(map);
        self.counters.closed();
    }
}

#[allow(clippy::too_many_arguments)]
async fn reply_loop(
    sock: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    lease: Lease,
    last: Arc<AtomicU64>,
    epoch: tokio::time::Instant,
    idle: Duration,
    _guard: SessionGuard,
) {
    let mut buf = vec![0u8; 65536];
    let mut wait = idle;
    loop {
        match tokio::time::timeout(wait, upstream.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                last.store(now_ms(epoch), Ordering::Relaxed);
                wait = idle;
                if let Err(e) = sock.send_to(&buf[..n], client).await {
                    debug!(client = %client, error = %e, "udp send to client failed");
                }
            }
            Ok(Err(e)) => {
                // Typically ECONNREFUSED: the backend is gone. End the session so the client's
                // next datagram picks another backend.
                debug!(client = %client, backend = %lease.addr(), error = %e, "udp backend error");
                lease.mark_failed();
                return;
            }
            Err(_) => {
                let quiet = Duration::from_millis(
                    now_ms(epoch).saturating_sub(last.load(Ordering::Relaxed)),
                );
                if quiet < idle {
                    // The client spoke meanwhile: wait for the rest of the idle period.
                    wait = idle - quiet;
                    continue;
                }
                debug!(client = %client, backend = %lease.addr(), "udp session idle, closed");
                return;
            }
        }
    }
}
