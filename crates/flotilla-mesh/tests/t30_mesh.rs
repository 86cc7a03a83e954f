//! Mesh::apply: open, idempotence, update without dropping connections, bind failure and retry,
//! close, stats.

mod common;

use std::net::SocketAddr;

use common::*;
use flotilla_mesh::{FrontendSpec, Mesh, MeshOptions, MeshStats, Protocol};
use tokio::net::{TcpStream, UdpSocket};

fn tcp(listen: SocketAddr, backends: Vec<flotilla_mesh::Backend>) -> FrontendSpec {
    FrontendSpec {
        listen,
        protocol: Protocol::Tcp,
        backends,
        proxy_protocol: None,
    }
}

#[tokio::test]
async fn t10_apply_opens_updates_and_closes() {
    let a = LineServer::start("a").await;
    let b = LineServer::start("b").await;
    let u = UdpEcho::start("u").await;
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut mesh = Mesh::new(MeshOptions::default());

    let udp_spec = FrontendSpec {
        listen: any,
        protocol: Protocol::Udp,
        backends: vec![u.backend()],
        proxy_protocol: None,
    };
    let r = mesh
        .apply(vec![tcp(any, vec![a.backend()]), udp_spec.clone()])
        .await;
    assert_eq!(r.opened.len(), 2, "{r:?}");
    assert!(r.failed.is_empty(), "{r:?}");
    let tcp_addr = mesh.local_addr(any, Protocol::Tcp).expect("tcp bound");
    let udp_addr = mesh.local_addr(any, Protocol::Udp).expect("udp bound");

    // Idempotent.
    let r = mesh
        .apply(vec![tcp(any, vec![a.backend()]), udp_spec.clone()])
        .await;
    assert!(
        r.opened.is_empty() && r.closed.is_empty() && r.updated.is_empty(),
        "{r:?}"
    );
    assert_eq!(mesh.local_addr(any, Protocol::Tcp), Some(tcp_addr));

    let mut held = LineClient::connect(tcp_addr).await;
    assert_eq!(held.ask("x").await.as_deref(), Some("a"));
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    c.send_to(b"ping", udp_addr).await.expect("send");
    let mut buf = [0u8; 64];
    let n = within("udp", c.recv(&mut buf)).await.expect("recv");
    assert_eq!(&buf[..n], b"u:ping");

    // Update: new connections go to b, the open one to a continues.
    let r = mesh
        .apply(vec![tcp(any, vec![b.backend()]), udp_spec.clone()])
        .await;
    assert_eq!(r.updated, vec![(any, Protocol::Tcp)]);
    assert_eq!(one_request(tcp_addr).await.as_deref(), Some("b"));
    assert_eq!(held.ask("y").await.as_deref(), Some("a"));

    // Stats serialize, list the draining backend.
    let stats = mesh.stats();
    let json = serde_json::to_string(&stats).expect("json");
    let back: MeshStats = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, stats);
    let t = stats
        .frontends
        .iter()
        .find(|f| f.protocol == Protocol::Tcp)
        .expect("tcp stats");
    assert!(t.total >= 2 && t.active >= 1, "{t:?}");
    assert!(
        t.backends.iter().any(|b| b.id == "a" && b.draining),
        "{t:?}"
    );

    // Close: the port refuses new connections, the open one drains.
    let r = mesh.apply(vec![udp_spec]).await;
    assert_eq!(r.closed, vec![(any, Protocol::Tcp)]);
    assert!(TcpStream::connect(tcp_addr).await.is_err());
    assert_eq!(held.ask("z").await.as_deref(), Some("a"));
    assert_eq!(mesh.stats().frontends.len(), 1);
    mesh.clear().await;
    assert!(mesh.stats().frontends.is_empty());
}

#[tokio::test]
async fn t20_bind_failure_is_reported_and_retried() {
    let a = LineServer::start("a").await;
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = blocker.local_addr().expect("addr");
    let mut mesh = Mesh::default();

    let r = mesh.apply(vec![tcp(taken, vec![a.backend()])]).await;
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(r.opened.is_empty());
    let f = &mesh.stats().frontends[0];
    assert!(f.bound.is_none() && f.error.is_some(), "{f:?}");

    drop(blocker);
    let r = mesh.apply(vec![tcp(taken, vec![a.backend()])]).await;
    assert_eq!(r.opened, vec![(taken, Protocol::Tcp)], "{r:?}");
    assert_eq!(one_request(taken).await.as_deref(), Some("a"));
    assert!(mesh.stats().frontends[0].error.is_none());
}

#[tokio::test]
async fn t30_shutdown_waits_for_connections_up_to_grace() {
    let a = LineServer::start("a").await;
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut mesh = Mesh::default();
    mesh.apply(vec![tcp(any, vec![a.backend()])]).await;
    let addr = mesh.local_addr(any, Protocol::Tcp).expect("bound");
    let mut held = LineClient::connect(addr).await;
    assert!(held.ask("x").await.is_some());
    let cut = within(
        "mesh shutdown",
        mesh.shutdown(std::time::Duration::from_millis(50)),
    )
    .await;
    assert_eq!(cut, 1);
    assert_eq!(held.ask("y").await, None);
    assert!(TcpStream::connect(addr).await.is_err());
}
