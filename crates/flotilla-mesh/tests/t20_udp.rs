//! UDP frontend: echo through sessions, one backend per session, idle expiry.

mod common;

use std::time::Duration;

use common::*;
use flotilla_mesh::{Pool, UdpFrontend, UdpOptions};
use tokio::net::UdpSocket;

async fn exchange(c: &UdpSocket, msg: &str) -> String {
    c.send(msg.as_bytes()).await.expect("send");
    let mut buf = [0u8; 2048];
    let n = within("udp answer", c.recv(&mut buf)).await.expect("recv");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

async fn client(fe: &UdpFrontend) -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    c.connect(fe.local_addr()).await.expect("connect");
    c
}

#[tokio::test]
async fn t10_udp_echo_sessions_and_idle_expiry() {
    let a = UdpEcho::start("a").await;
    let b = UdpEcho::start("b").await;
    let opts = UdpOptions {
        idle_timeout: Duration::from_millis(300),
        ..UdpOptions::default()
    };
    let fe = UdpFrontend::bind(
        "127.0.0.1:0".parse().expect("addr"),
        Pool::new(vec![a.backend(), b.backend()]),
        opts,
    )
    .await
    .expect("bind");

    let c1 = client(&fe).await;
    let first = exchange(&c1, "one").await;
    let (id1, body) = first.split_once(':').expect("id:body");
    assert_eq!(body, "one");
    // The session sticks to its backend.
    for i in 0..10 {
        assert_eq!(exchange(&c1, &format!("m{i}")).await, format!("{id1}:m{i}"));
    }
    // A second client gets the other (idle) backend.
    let c2 = client(&fe).await;
    let second = exchange(&c2, "two").await;
    let (id2, _) = second.split_once(':').expect("id:body");
    assert_ne!(id1, id2);
    assert_eq!(fe.active(), 2);

    // Idle sessions expire; a client that comes back gets a new session.
    wait_until("sessions expired", || fe.active() == 0).await;
    assert!(exchange(&c1, "again").await.ends_with(":again"));
    assert_eq!(fe.active(), 1);
}

#[tokio::test]
async fn t11_udp_no_backend_counts_failure() {
    let fe = UdpFrontend::bind(
        "127.0.0.1:0".parse().expect("addr"),
        Pool::default(),
        UdpOptions::default(),
    )
    .await
    .expect("bind");
    let c = client(&fe).await;
    c.send(b"x").await.expect("send");
    let a = UdpEcho::start("late").await;
    wait_until("failure counted", || fe.failed() == 1).await;
    fe.pool().set_backends(vec![a.backend()]);
    assert_eq!(exchange(&c, "y").await, "late:y");
}

#[tokio::test]
async fn t12_udp_session_moves_when_its_backend_dies() {
    let a = UdpEcho::start("a").await;
    let b = UdpEcho::start("b").await;
    let fe = UdpFrontend::bind(
        "127.0.0.1:0".parse().expect("addr"),
        Pool::new(vec![a.backend(), b.backend()]),
        UdpOptions::default(),
    )
    .await
    .expect("bind");
    let c = client(&fe).await;
    let first = exchange(&c, "hi").await;
    let (id, _) = first.split_once(':').expect("id:body");
    let (dead, alive) = if id == "a" { (a, b) } else { (b, a) };
    drop(dead);
    // Datagrams are lossy: the client retries, as UDP clients do, until another backend answers.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut buf = [0u8; 64];
    loop {
        assert!(tokio::time::Instant::now() < deadline, "never failed over");
        c.send(b"retry").await.expect("send");
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), c.recv(&mut buf)).await
        {
            assert_eq!(&buf[..n], format!("{}:retry", alive.id).as_bytes());
            break;
        }
    }
}
