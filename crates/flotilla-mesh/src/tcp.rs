//! The TCP frontend: accepts connections on a published port or VIP and splices each to a backend
//! of its [`Pool`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::copy::LastActivity;
use crate::pool::Pool;
use crate::proxy_protocol::{self, ProxyProtocol};
use crate::sock::ListenOptions;
use crate::MeshError;

/// Options of a TCP frontend.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Time allowed for connecting to one backend before trying another (default 1 s).
    pub connect_timeout: Duration,
    /// How many *different* backends a connection tries before it is given up (default 3).
    pub max_attempts: usize,
    /// Prepend a PROXY protocol header to backend connections (default none).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Size of each of the two copy buffers of a connection (default 16 KiB, at least 1 KiB).
    pub buffer_size: usize,
    /// Listen backlog (default 1024).
    pub backlog: u32,
    /// Socket options of the listener.
    pub listen: ListenOptions,
    /// Runtimes to accept and proxy on, one listener each on the same address (needs
    /// `listen.reuse_port`); see [`crate::Workers`]. Empty (the default): the caller's runtime.
    pub runtimes: Vec<tokio::runtime::Handle>,
    /// Client connections open at once (default 4096; each holds two descriptors of the
    /// node). A connection over the cap is accepted and closed at once.
    pub max_connections: usize,
    /// A connection that moves no byte either way for this long is closed (default 1 h, as
    /// Envoy's TCP proxy).
    pub idle_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            connect_timeout: Duration::from_secs(1),
            max_attempts: 3,
            proxy_protocol: None,
            buffer_size: 16 * 1024,
            backlog: 1024,
            listen: ListenOptions::default(),
            runtimes: Vec::new(),
            max_connections: 4096,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Connection counters of a frontend.
#[derive(Default)]
pub(crate) struct Counters {
    pub active: AtomicUsize,
    pub total: AtomicU64,
    pub failed: AtomicU64,
    /// Connections (TCP) or sessions (UDP) turned away by a cap.
    pub refused: AtomicU64,
    pub idle: Notify,
}

impl Counters {
    pub fn opened(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.total.fetch_add(1, Ordering::Relaxed);
    }
    pub fn closed(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
    /// Waits until no connection is active, at most `grace`. True if idle.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(grace, wait).await.is_ok()
    }
}

/// Decrements the active count when a connection task ends, however it ends.
struct ActiveGuard(Arc<Counters>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.closed();
    }
}

fn encode_pp(p: Option<ProxyProtocol>) -> u8 {
    match p {
        None => 0,
        Some(ProxyProtocol::V1) => 1,
        Some(ProxyProtocol::V2) => 2,
    }
}

fn decode_pp(v: u8) -> Option<ProxyProtocol> {
    match v {
        1 => Some(ProxyProtocol::V1),
        2 => Some(ProxyProtocol::V2),
        _ => None,
    }
}

struct Ctx {
    pool: Pool,
    opts: TcpOptions,
    proxy_protocol: AtomicU8,
    counters: Arc<Counters>,
    kill: watch::Receiver<bool>,
}

/// A listening TCP frontend. Dropping it stops accepting (the port is released) while open
/// connections go on until they close; [`TcpFrontend::shutdown`] also waits for them, up to a grace.
pub struct TcpFrontend {
    local_addr: SocketAddr,
    ctx: Arc<Ctx>,
    kill: watch::Sender<bool>,
    accept: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpFrontend")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl TcpFrontend {
    /// Binds `listen` and starts proxying accepted connections to backends of `pool`.
    /// Must be called within a tokio runtime.
    pub async fn bind(
        listen: SocketAddr,
        pool: Pool,
        opts: TcpOptions,
    ) -> Result<TcpFrontend, MeshError> {
        let runtimes = if opts.runtimes.is_empty() {
            vec![tokio::runtime::Handle::current()]
        } else {
            opts.runtimes.clone()
        };
        // Bind every listener first (the first one fixes the port when asked for port 0), then
        // start accepting. A listener is registered with the runtime that drives it.
        let mut listeners = Vec::with_capacity(runtimes.len());
        let mut addr = listen;
        for rt in &runtimes {
            let _entered = rt.enter();
            let l = crate::sock::tcp_listener(addr, opts.backlog, opts.listen).map_err(
                |e| match e {
                    MeshError::Bind { source, .. } => MeshError::Bind {
                        addr: listen,
                        source,
                    },
                    other => other,
                },
            )?;
            addr = l.local_addr()?;
            listeners.push(l);
        }
        let local_addr = addr;
        let (kill_tx, kill_rx) = watch::channel(false);
        let ctx = Arc::new(Ctx {
            pool,
            proxy_protocol: AtomicU8::new(encode_pp(opts.proxy_protocol)),
            opts,
            counters: Arc::new(Counters::default()),
            kill: kill_rx,
        });
        let accept = runtimes
            .iter()
            .zip(listeners)
            .map(|(rt, l)| rt.spawn(accept_loop(l, ctx.clone())))
            .collect();
        debug!(listen = %local_addr, "tcp frontend listening");
        Ok(TcpFrontend {
            local_addr,
            ctx,
            kill: kill_tx,
            accept,
        })
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The pool this frontend balances over.
    pub fn pool(&self) -> &Pool {
        &self.ctx.pool
    }

    /// Changes the PROXY protocol setting for connections accepted from now on.
    pub fn set_proxy_protocol(&self, p: Option<ProxyProtocol>) {
        self.ctx
            .proxy_protocol
            .store(encode_pp(p), Ordering::Relaxed);
    }

    /// Client connections open now.
    pub fn active(&self) -> usize {
        self.ctx.counters.active.load(Ordering::Acquire)
    }

    /// Client connections accepted since the frontend started.
    pub fn total(&self) -> u64 {
        self.counters().total.load(Ordering::Relaxed)
    }

    /// Client connections that no backend took.
    pub fn failed(&self) -> u64 {
        self.counters().failed.load(Ordering::Relaxed)
    }

    /// Client connections closed at once because `max_connections` were open.
    pub fn refused(&self) -> u64 {
        self.counters().refused.load(Ordering::Relaxed)
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.ctx.counters
    }

    /// Stops accepting and waits until the listener is closed (the port can be bound again).
    pub async fn stop_accepting(&mut self) {
        for h in &self.accept {
            h.abort();
        }
        for h in self.accept.drain(..) {
            let _ = h.await;
        }
    }

    /// Stops accepting, waits up to `grace` for open connections to finish, then cuts the rest.
    /// Returns how many connections were cut.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        self.stop_accepting().await;
        let counters = self.ctx.counters.clone();
        if counters.wait_idle(grace).await {
            return 0;
        }
        let cut = counters.active.load(Ordering::Acquire);
        let _ = self.kill.send(true);
        // Cut connections end at their next poll; wait briefly so the count is settled.
        counters.wait_idle(Duration::from_secs(1)).await;
        cut
    }
}

impl Drop for TcpFrontend {
    fn drop(&mut self) {
        for h in &self.accept {
            h.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let mut warned_at: Option<tokio::time::Instant> = None;
    let mut refused_at: Option<tokio::time::Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if ctx.counters.active.load(Ordering::Acquire) >= ctx.opts.max_connections {
                    // Over the cap: closed at once (the listeners of several runtimes share
                    // the count, so the cap may be passed by a few at the same instant).
                    drop(stream);
                    ctx.counters.refused.fetch_add(1, Ordering::Relaxed);
                    let now = tokio::time::Instant::now();
                    if refused_at.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
                        warn!(client = %peer, max = ctx.opts.max_connections, "tcp frontend full: connection refused");
                        refused_at = Some(now);
                    }
                    continue;
                }
                ctx.counters.opened();
                let guard = ActiveGuard(ctx.counters.clone());
                tokio::spawn(serve(stream, peer, ctx.clone(), guard));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off a little instead of spinning, log at most
                // once a second.
                let now = tokio::time::Instant::now();
                if warned_at.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
                    warn!(error = %e, "tcp frontend accept failed");
                    warned_at = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Connects to a backend, trying up to `max_attempts` different ones.
async fn connect(ctx: &Ctx) -> Result<(TcpStream, crate::pool::Lease), MeshError> {
    let mut tried: Vec<usize> = Vec::new();
    let mut last = None;
    while tried.len() < ctx.opts.max_attempts.max(1) {
        let Some(lease) = ctx.pool.pick_excluding(&tried) else {
            break;
        };
        tried.push(lease.key());
        match tokio::time::timeout(ctx.opts.connect_timeout, TcpStream::connect(lease.addr())).await
        {
            Ok(Ok(s)) => {
                lease.mark_ok();
                return Ok((s, lease));
            }
            Ok(Err(e)) => {
                debug!(backend = %lease.addr(), task = lease.id(), error = %e, "backend connect failed");
                lease.mark_failed();
                last = Some(e.to_string());
            }
            Err(_) => {
                debug!(backend = %lease.addr(), task = lease.id(), "backend connect timed out");
                lease.mark_failed();
                last = Some("connect timed out".to_string());
            }
        }
    }
    match last {
        None => Err(MeshError::NoBackend),
        Some(last) => Err(MeshError::BackendsFailed {
            attempts: tried.len(),
            last,
        }),
    }
}

/// Resolves when `kill` turns true; never if its sender is gone (a dropped frontend drains).
async fn killed(mut kill: watch::Receiver<bool>) {
    loop {
        if *kill.borrow_and_update() {
            return;
        }
        if kill.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves once nothing has moved over the connection for `idle`.
async fn idle_for(activity: &LastActivity, idle: Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

async fn serve(client: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>, _guard: ActiveGuard) {
    let _ = client.set_nodelay(true);
    let (mut upstream, lease) = match connect(&ctx).await {
        Ok(v) => v,
        Err(e) => {
            ctx.counters.failed.fetch_add(1, Ordering::Relaxed);
            debug!(client = %peer, error = %e, "no backend for connection");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Some(pp) = decode_pp(ctx.proxy_protocol.load(Ordering::Relaxed)) {
        let dst = client.local_addr().unwrap_or(peer);
        let header = proxy_protocol::encode(pp, peer, dst);
        if let Err(e) = upstream.write_all(&header).await {
            ctx.counters.failed.fetch_add(1, Ordering::Relaxed);
            debug!(client = %peer, backend = %lease.addr(), error = %e, "writing proxy header failed");
            return;
        }
    }
    let size = ctx.opts.buffer_size.max(1024);
    let activity = LastActivity::new();
    tokio::select! {
        r = crate::copy::copy_bidirectional(&client, &upstream, size, &activity) => {
            if let Err(e) = r {
                debug!(client = %peer, backend = %lease.addr(), error = %e, "connection ended with error");
            }
        }
        _ = idle_for(&activity, ctx.opts.idle_timeout) => {
            debug!(client = %peer, backend = %lease.addr(), "idle connection closed");
        }
        _ = killed(ctx.kill.clone()) => {
            debug!(client = %peer, backend = %lease.addr(), "connection cut at shutdown");
        }
    }
    drop(lease);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Backend;
    use tokio::io::AsyncReadExt;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn frontend(opts: TcpOptions) -> TcpFrontend {
        let pool = Pool::new(vec![Backend::new("t1", echo().await)]);
        TcpFrontend::bind("127.0.0.1:0".parse().unwrap(), pool, opts)
            .await
            .unwrap()
    }

    async fn ping(s: &mut TcpStream, msg: &[u8]) -> bool {
        let mut buf = vec![0u8; msg.len()];
        s.write_all(msg).await.is_ok()
            && tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
                .await
                .is_ok_and(|r| r.is_ok())
            && buf == msg
    }

    /// True when the peer ends the connection within `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_open_ones_keep_working() {
        let fe = frontend(TcpOptions {
            max_connections: 3,
            ..TcpOptions::default()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(fe.local_addr()).await.unwrap();
            assert!(ping(&mut s, b"hi").await);
            held.push(s);
        }
        for _ in 0..5 {
            let mut s = TcpStream::connect(fe.local_addr()).await.unwrap();
            assert!(
                closed_within(&mut s, Duration::from_secs(10)).await,
                "a connection over the cap was proxied"
            );
        }
        assert_eq!(fe.refused(), 5);
        for s in &mut held {
            assert!(ping(s, b"still").await, "an open connection broke");
        }
        // A closed connection frees its place.
        drop(held.pop());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while fe.active() > 2 {
            assert!(tokio::time::Instant::now() < deadline, "slot not freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut s = TcpStream::connect(fe.local_addr()).await.unwrap();
        assert!(ping(&mut s, b"again").await);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let fe = frontend(TcpOptions {
            idle_timeout: Duration::from_millis(500),
            ..TcpOptions::default()
        })
        .await;
        let mut idle = TcpStream::connect(fe.local_addr()).await.unwrap();
        assert!(ping(&mut idle, b"hi").await);
        let mut busy = TcpStream::connect(fe.local_addr()).await.unwrap();
        // The busy one talks every 100 ms for a second: never 500 ms quiet.
        for _ in 0..10 {
            assert!(ping(&mut busy, b"tick").await, "a busy connection was cut");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            closed_within(&mut idle, Duration::from_secs(10)).await,
            "an idle connection stays open"
        );
    }
}
