//! The listener's limits, attacked over real loopback sockets with short configured timeouts.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use super::*;
use crate::{Client, Endpoint};

struct TestServer {
    addr: SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
    _stop: watch::Sender<bool>,
}

impl TestServer {
    fn client(&self) -> Client {
        Client::new(Endpoint::Https {
            addr: self.addr.to_string(),
            tls: self.client_tls.clone(),
        })
    }

    /// A TLS connection speaking HTTP/1.1 (no ALPN).
    async fn h1(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut cfg = (*self.client_tls).clone();
        cfg.alpn_protocols.clear();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from(flotilla_pki::SERVER_NAME).unwrap();
        TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// A plain TCP connection from `127.0.0.<last>`.
    async fn raw_from(&self, last: u8) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))
        .unwrap();
        s.connect(self.addr).await.unwrap()
    }
}

fn router() -> Router {
    Router::new()
        .route("/ping", get(|| async { "pong" }))
        .route(
            "/stream",
            get(|| async {
                // 15 lines, 100 ms apart: longer than the test's idle timeout.
                let s = futures::stream::unfold(0u32, |i| async move {
                    if i == 15 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, Infallible>(format!("{{\"i\":{i}}}\n")), i + 1))
                });
                axum::body::Body::from_stream(s)
            }),
        )
}

async fn start(limits: ServerLimits) -> TestServer {
    let ca = flotilla_pki::Ca::generate("c1", Duration::from_secs(3600)).unwrap();
    let (cert, key) = ca
        .issue(
            "c1",
            "n1",
            flotilla_pki::Role::Manager,
            Duration::from_secs(3600),
        )
        .unwrap();
    let server = flotilla_pki::server_config(ca.cert_pem(), &cert, &key).unwrap();
    let client_tls = flotilla_pki::client_config(ca.cert_pem(), Some((&cert, &key))).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(serve_tls_with(
        listener,
        move || server.clone(),
        router(),
        stop_rx,
        limits,
    ));
    TestServer {
        addr,
        client_tls,
        _stop: stop_tx,
    }
}

/// True when the peer ends the connection (EOF or reset) within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn connections_over_the_caps_are_closed_while_an_existing_client_keeps_working() {
    let srv = start(ServerLimits {
        max_connections: 6,
        max_connections_per_ip: 3,
        tls_handshake_timeout: Duration::from_secs(60),
        ..ServerLimits::default()
    })
    .await;
    // A well-behaved client, connected first (one slot, from 127.0.0.1).
    let good = srv.client();
    let r = good
        .request(hyper::Method::GET, "/ping", None)
        .await
        .unwrap();
    assert_eq!(&r.body[..], b"pong");

    // Three idle connections from 127.0.0.2 fill its per-address cap; the fourth is closed.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(srv.raw_from(2).await);
    }
    let mut over = srv.raw_from(2).await;
    assert!(
        closed_within(&mut over, Duration::from_secs(10)).await,
        "a connection over the per-address cap stays open"
    );
    // Two more from 127.0.0.3 fill the total cap (1 + 3 + 2 = 6); the next one, from an
    // address with no connection at all, is closed.
    for _ in 0..2 {
        held.push(srv.raw_from(3).await);
    }
    let mut over = srv.raw_from(4).await;
    assert!(
        closed_within(&mut over, Duration::from_secs(10)).await,
        "a connection over the total cap stays open"
    );
    // The existing client is unaffected.
    let r = good
        .request(hyper::Method::GET, "/ping", None)
        .await
        .unwrap();
    assert_eq!(&r.body[..], b"pong");

    // Once the idle connections go, new clients get in again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match srv
            .client()
            .request(hyper::Method::GET, "/ping", None)
            .await
        {
            Ok(r) => {
                assert_eq!(&r.body[..], b"pong");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "not yet");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("slots were not given back: {e}"),
        }
    }
}

#[tokio::test]
async fn half_a_request_head_is_disconnected_within_the_header_timeout() {
    let srv = start(ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    })
    .await;
    let mut s = srv.h1().await;
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: flotilla-node\r\nX-Slow: ")
        .await
        .unwrap();
    s.flush().await.unwrap();
    let t0 = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "a client stuck in its request head is never disconnected"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );

    // A whole request on a fresh connection is answered.
    let mut s = srv.h1().await;
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: flotilla-node\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap_or_default();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("pong"),
        "{out}"
    );
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let srv = start(ServerLimits {
        idle_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    })
    .await;
    // TLS done, then not a byte: hyper is still deciding between HTTP/1 and HTTP/2.
    let mut s = srv.h1().await;
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "a silent connection is never closed"
    );
}

#[tokio::test]
async fn a_streaming_response_is_not_idle() {
    let srv = start(ServerLimits {
        idle_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    })
    .await;
    let mut lines = 0;
    srv.client()
        .stream_lines("/stream", |_| {
            lines += 1;
            true
        })
        .await
        .unwrap();
    assert_eq!(lines, 15, "the stream was cut");
}

#[test]
fn accept_failures_back_off_and_are_logged_once_a_second() {
    let mut b = AcceptBackoff::default();
    let t0 = Instant::now();
    let (d1, r1) = b.failed(t0);
    assert_eq!((d1, r1), (Duration::from_millis(10), Some(1)));
    let (d2, r2) = b.failed(t0 + Duration::from_millis(10));
    assert_eq!((d2, r2), (Duration::from_millis(20), None));
    let mut last = d2;
    for i in 0..20 {
        let (d, _) = b.failed(t0 + Duration::from_millis(20 + i));
        assert!(d >= last && d <= Duration::from_secs(1), "{d:?}");
        last = d;
    }
    assert_eq!(last, Duration::from_secs(1));
    // The next report a second later counts what was not logged.
    let (_, r) = b.failed(t0 + Duration::from_secs(2));
    assert_eq!(r, Some(22));
    b.succeeded();
    assert_eq!(
        b.failed(t0 + Duration::from_secs(2)).0,
        Duration::from_millis(10)
    );
}

#[test]
fn the_limiter_caps_in_total_and_per_address_and_gives_slots_back() {
    let l = ConnLimiter::new(3, 2);
    let a: IpAddr = "10.0.0.1".parse().unwrap();
    let b: IpAddr = "10.0.0.2".parse().unwrap();
    let a1 = l.try_acquire(a).unwrap();
    let _a2 = l.try_acquire(a).unwrap();
    assert_eq!(l.try_acquire(a).err(), Some(Refused::PerIp));
    let _b1 = l.try_acquire(b).unwrap();
    assert_eq!(l.try_acquire(b).err(), Some(Refused::Total));
    drop(a1);
    assert_eq!(l.open(), 2);
    assert!(l.try_acquire(b).is_ok());
}
