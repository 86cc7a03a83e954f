use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
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

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve_conn<S>(io: S, peer: Peer, router: Router, mut stop: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let router = router.clone();
        async move {
            let resp = router
                .oneshot(req.map(axum::body::Body::new))
                .await
                .unwrap_or_else(|e: Infallible| match e {});
            Ok::<_, Infallible>(resp)
        }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with error");
            }
        }
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
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
    loop {
        tokio::select! {
            res = listener.accept() => {
                let (stream, _) = match res {
                    Ok(s) => s,
                    Err(e) => { tracing::warn!(error = %e, "unix accept failed"); continue; }
                };
                tokio::spawn(serve_conn(stream, Peer::Local, router.clone(), stop.clone()));
            }
            _ = stopped(&mut stop) => break,
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Serves `router` over TLS on `listener` until `stop` turns true. `tls` is asked for the
/// current server configuration on every connection, so certificate renewals take effect
/// without a restart.
pub async fn serve_tls<F>(
    listener: TcpListener,
    tls: F,
    router: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    F: Fn() -> Arc<rustls::ServerConfig> + Send + Sync + 'static,
{
    loop {
        tokio::select! {
            res = listener.accept() => {
                let (stream, remote) = match res {
                    Ok(s) => s,
                    Err(e) => { tracing::warn!(error = %e, "tcp accept failed"); continue; }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls());
                let router = router.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let tls_stream = match tokio::time::timeout(
                        std::time::Duration::from_secs(10),
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
                    serve_conn(tls_stream, peer, router, stop).await;
                });
            }
            _ = stopped(&mut stop) => break,
        }
    }
    Ok(())
}
