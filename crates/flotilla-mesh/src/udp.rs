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
    /// Sessions open at once (default 1024). Each holds a socket (a descriptor) of the node
    /// for up to `idle_timeout`, and UDP sources are trivially spoofed, so this is what bounds
    /// a flood of fake clients: datagrams of new clients beyond the cap are dropped (counted
    /// in `refused`) until sessions expire; existing sessions are unaffected.
    pub max_sessions: usize,
    /// Sessions open at once from one source address (default 64), so that one host (or one
    /// NAT) cannot take every session. Spoofed floods with random sources are bounded only by
    /// `max_sessions`.
    pub max_sessions_per_source: usize,
    /// Socket options of the listening socket.
    pub listen: ListenOptions,
}

impl Default for UdpOptions {
    fn default() -> Self {
        UdpOptions {
            idle_timeout: Duration::from_secs(30),
            max_sessions: 1024,
            max_sessions_per_source: 64,
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

/// Open sessions per source address.
type PerSource = Arc<Mutex<HashMap<IpAddr, usize>>>;

fn lock<T>(s: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

    /// Datagrams of new clients dropped because a session cap was reached.
    pub fn refused(&self) -> u64 {
        self.counters().refused.load(Ordering::Relaxed)
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
    let per_source: PerSource = Arc::default();
    let mut refused_at: Option<tokio::time::Instant> = None;
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
                let full = lock(&sessions).len() >= opts.max_sessions;
                let from_source = lock(&per_source).get(&client.ip()).copied().unwrap_or(0);
                if full || from_source >= opts.max_sessions_per_source {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    let now = tokio::time::Instant::now();
                    if refused_at.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
                        tracing::warn!(%client, full, from_source, "udp frontend: session cap reached, datagram dropped");
                        refused_at = Some(now);
                    }
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
                        *lock(&per_source).entry(client.ip()).or_insert(0) += 1;
                        let guard = SessionGuard {
                            counters: counters.clone(),
                            sessions: sessions.clone(),
                            per_source: per_source.clone(),
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
    per_source: PerSource,
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
        let mut per = lock(&self.per_source);
        if let Some(n) = per.get_mut(&self.client.ip()) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.client.ip());
            }
        }
        drop(per);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Backend;

    /// A UDP echo server; returns its address.
    async fn echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    /// Sends `msg` from `sock` and waits for the echo (false when none comes in 2 s).
    async fn ask(sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> bool {
        sock.send_to(msg, to).await.unwrap();
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await,
            Ok(Ok(n)) if &buf[..n] == msg
        )
    }

    async fn client_from(last: u8) -> UdpSocket {
        UdpSocket::bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn sessions_are_capped_per_source_and_in_total() {
        let pool = Pool::new(vec![Backend::new("t1", echo().await)]);
        let fe = UdpFrontend::bind(
            "127.0.0.1:0".parse().unwrap(),
            pool,
            UdpOptions {
                max_sessions: 4,
                max_sessions_per_source: 2,
                ..UdpOptions::default()
            },
        )
        .await
        .unwrap();
        let to = fe.local_addr();
        // Two sessions from 127.0.0.2 are served; a third client port of the same address is
        // not.
        let a1 = client_from(2).await;
        let a2 = client_from(2).await;
        let a3 = client_from(2).await;
        assert!(ask(&a1, to, b"a1").await);
        assert!(ask(&a2, to, b"a2").await);
        assert!(
            !ask(&a3, to, b"a3").await,
            "a third session from one source"
        );
        // Two more from 127.0.0.3 fill the frontend; 127.0.0.4 gets nothing.
        let b1 = client_from(3).await;
        let b2 = client_from(3).await;
        assert!(ask(&b1, to, b"b1").await);
        assert!(ask(&b2, to, b"b2").await);
        let c1 = client_from(4).await;
        assert!(!ask(&c1, to, b"c1").await, "a session over the total cap");
        assert_eq!(fe.active(), 4);
        assert_eq!(fe.refused(), 2);
        // Existing sessions keep working.
        assert!(ask(&a1, to, b"again").await);
        assert!(ask(&b2, to, b"again").await);
    }

    #[test]
    fn the_default_cap_is_modest() {
        let o = UdpOptions::default();
        assert_eq!((o.max_sessions, o.max_sessions_per_source), (1024, 64));
    }
}
