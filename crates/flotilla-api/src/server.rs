//! Serving a `Router` on the node's unix socket and on its TLS listener.
//!
//! The TLS listener faces the network (any container, any host that reaches the node), so
//! every resource a peer can hold is bounded ([`ServerLimits`]):
//!
//! - connections: at most `max_connections` at once, and `max_connections_per_ip` from one
//!   source address; a connection over either cap is accepted and closed at once;
//! - time: the TLS handshake, then the request head (HTTP/1, also between keep-alive
//!   requests), must arrive within their timeouts; a connection with no request in flight
//!   (response bodies still streaming count as in flight) is closed after `idle_timeout`; HTTP/2
//!   connections are pinged, and closed when the ping is not answered;
//! - accept errors (EMFILE/ENFILE when the process is out of descriptors) back off instead of
//!   spinning, and are logged at most once a second.
//!
//! Request bodies are bounded by the routes (axum body limits, and the node's own readers).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use flotilla_pki::Identity;

/// Who is calling, as established by the transport (attached to every request as an axum
/// extension).
#[derive(Debug, Clone)]
pub enum Peer {
    /// The node's own unix socket (mode 0600, root): full access.
    Local,
    /// TLS with a client certificate that chains to the cluster CA.
    Verified(Identity),
    /// TLS without a client certificate: only the join endpoints answer.
    Anonymous,
}

/// What one listener lets its peers hold. The defaults suit a node's API listener; the
/// process's descriptor limit is raised at node start so that `max_connections` fits in it
/// with room for Raft, the mesh and containers.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections open at once, all peers together (default 4096). The unix socket is not
    /// capped (it is root-only).
    pub max_connections: usize,
    /// Connections open at once from one source address (default 256).
    pub max_connections_per_ip: usize,
    /// Time for the TLS handshake (default 10 s).
    pub tls_handshake_timeout: Duration,
    /// Time for an HTTP/1 request head, from when the server starts waiting for it; this also
    /// bounds how long an idle HTTP/1 keep-alive connection stays open (default 30 s).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (default 120 s).
    pub idle_timeout: Duration,
    /// HTTP/2 keep-alive ping interval (default 30 s); a ping unanswered within
    /// `keepalive_timeout` (default 20 s) closes the connection.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 4096,
            max_connections_per_ip: 256,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Requests in flight on one connection, and since when there has been none.
struct Activity {
    state: Mutex<(usize, Instant)>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new((0, Instant::now())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.lock().0 += 1;
        InFlight(self.clone())
    }

    /// Since when no request has been in flight (None while one is).
    fn idle_since(&self) -> Option<Instant> {
        let g = self.lock();
        (g.0 == 0).then_some(g.1)
    }
}

/// One request in flight; lives until its response body is finished or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.0 = g.0.saturating_sub(1);
        if g.0 == 0 {
            g.1 = Instant::now();
        }
    }
}

fn builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper silently ignores its header timeout and keep-alive pings.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    b
}

async fn serve_conn<S>(
    io: S,
    peer: Peer,
    router: Router,
    limits: &ServerLimits,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let svc = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(peer.clone());
            let router = router.clone();
            let in_flight = activity.begin();
            async move {
                let resp = router
                    .oneshot(req.map(axum::body::Body::new))
                    .await
                    .unwrap_or_else(|e: Infallible| match e {});
                // The request stays in flight until its (maybe streaming) body is done.
                let resp = resp.map(|body| {
                    axum::body::Body::new(body.map_frame(move |f| {
                        let _in_flight = &in_flight;
                        f
                    }))
                });
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let builder = builder(limits);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle = limits.idle_timeout;
    let mut check = Instant::now() + idle;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with error");
                }
                return;
            }
            _ = stopped(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
            _ = tokio::time::sleep_until(check) => {
                let now = Instant::now();
                match activity.idle_since() {
                    Some(since) if now.duration_since(since) >= idle => {
                        tracing::debug!(?idle, "idle connection closed");
                        conn.as_mut().graceful_shutdown();
                        // A peer that does not read the goodbye is cut.
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
                        return;
                    }
                    Some(since) => check = since + idle,
                    None => check = now + idle,
                }
            }
        }
    }
}

/// Back-off of an accept loop: a failing `accept` (EMFILE, ENFILE, ENOBUFS …) waits before
/// the next try, longer while it keeps failing, and is logged at most once a second.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    delay: Duration,
    warned_at: Option<Instant>,
    suppressed: u64,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// After a failed accept at `now`: how long to wait, and (at most once a second) how many
    /// failures to report (this one included).
    pub(crate) fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        self.delay = if self.delay.is_zero() {
            Self::FIRST
        } else {
            (self.delay * 2).min(Self::MAX)
        };
        self.suppressed += 1;
        let report = match self.warned_at {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => None,
            _ => {
                self.warned_at = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        };
        (self.delay, report)
    }

    /// After a successful accept.
    pub(crate) fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// Waits out an accept failure (or until `stop`). False when stopping.
async fn back_off(
    backoff: &mut AcceptBackoff,
    e: &std::io::Error,
    what: &str,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let (delay, report) = backoff.failed(Instant::now());
    if let Some(n) = report {
        tracing::warn!(error = %e, failures = n, ?delay, "{what} accept failed; backing off");
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stopped(stop) => false,
    }
}

/// The connection caps of a listener: one slot per open connection, overall and per source
/// address.
#[derive(Debug)]
pub(crate) struct ConnLimiter {
    max: usize,
    per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A connection's slot; given back on drop.
pub(crate) struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Total,
    PerIp,
}

impl ConnLimiter {
    pub(crate) fn new(max: usize, per_ip: usize) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            max,
            per_ip,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, usize>)> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refused> {
        let mut g = self.lock();
        if g.0 >= self.max {
            return Err(Refused::Total);
        }
        let from_ip = g.1.entry(ip).or_insert(0);
        if *from_ip >= self.per_ip {
            return Err(Refused::PerIp);
        }
        *from_ip += 1;
        g.0 += 1;
        Ok(ConnSlot {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.lock().0
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut g = self.limiter.lock();
        g.0 = g.0.saturating_sub(1);
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// Serves `router` on a unix socket until `stop` turns true. Removes a stale socket file
/// first and makes the new one owner-only.
pub async fn serve_unix(
    path: &Path,
    router: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let limits = Arc::new(ServerLimits::default());
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let (stream, _) = match res {
                    Ok(s) => s,
                    Err(e) => {
                        if !back_off(&mut backoff, &e, "unix", &mut stop).await {
                            break;
                        }
                        continue;
                    }
                };
                backoff.succeeded();
                let (router, stop, limits) = (router.clone(), stop.clone(), limits.clone());
                tokio::spawn(async move {
                    serve_conn(stream, Peer::Local, router, &limits, stop).await
                });
            }
            _ = stopped(&mut stop) => break,
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Serves `router` over TLS on `listener` until `stop` turns true, with the default
/// [`ServerLimits`]. `tls` is asked for the current server configuration on every
/// connection, so certificate renewals take effect without a restart.
pub async fn serve_tls<F>(
    listener: TcpListener,
    tls: F,
    router: Router,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    F: Fn() -> Arc<rustls::ServerConfig> + Send + Sync + 'static,
{
    serve_tls_with(listener, tls, router, stop, ServerLimits::default()).await
}

/// [`serve_tls`] with explicit limits.
pub async fn serve_tls_with<F>(
    listener: TcpListener,
    tls: F,
    router: Router,
    mut stop: watch::Receiver<bool>,
    limits: ServerLimits,
) -> std::io::Result<()>
where
    F: Fn() -> Arc<rustls::ServerConfig> + Send + Sync + 'static,
{
    let limits = Arc::new(limits);
    let slots = ConnLimiter::new(limits.max_connections, limits.max_connections_per_ip);
    let mut backoff = AcceptBackoff::default();
    let mut refused_warned: Option<Instant> = None;
    loop {
        tokio::select! {
            res = listener.accept() => {
                let (stream, remote) = match res {
                    Ok(s) => s,
                    Err(e) => {
                        if !back_off(&mut backoff, &e, "tcp", &mut stop).await {
                            break;
                        }
                        continue;
                    }
                };
                backoff.succeeded();
                let slot = match slots.try_acquire(remote.ip()) {
                    Ok(s) => s,
                    Err(why) => {
                        // Closed at once: the peer sees the connection end.
                        drop(stream);
                        let now = Instant::now();
                        if refused_warned.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                            refused_warned = Some(now);
                            let (cap, limit) = match why {
                                Refused::Total => ("total", limits.max_connections),
                                Refused::PerIp => ("per address", limits.max_connections_per_ip),
                            };
                            tracing::warn!(%remote, cap, limit, open = slots.open(), "api connection refused: too many connections");
                        }
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls());
                let router = router.clone();
                let stop = stop.clone();
                let limits = limits.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let tls_stream = match tokio::time::timeout(
                        limits.tls_handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "tls handshake timed out");
                            return;
                        }
                    };
                    let peer = match tls_stream.get_ref().1.peer_certificates() {
                        Some([leaf, ..]) => match flotilla_pki::parse_identity(leaf.as_ref()) {
                            Ok(id) => Peer::Verified(id),
                            Err(e) => {
                                tracing::debug!(%remote, error = %e, "client certificate without identity");
                                Peer::Anonymous
                            }
                        },
                        _ => Peer::Anonymous,
                    };
                    serve_conn(tls_stream, peer, router, &limits, stop).await;
                });
            }
            _ = stopped(&mut stop) => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
