//! TCP frontend: balancing, failover, draining, PROXY protocol, half-close, shutdown.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use flotilla_mesh::{ListenOptions, Pool, ProxyProtocol, TcpFrontend, TcpOptions, V2_SIGNATURE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ANY: &str = "127.0.0.1:0";

async fn three() -> Vec<LineServer> {
    vec![
        LineServer::start("a").await,
        LineServer::start("b").await,
        LineServer::start("c").await,
    ]
}

async fn frontend(servers: &[LineServer], opts: TcpOptions) -> TcpFrontend {
    let pool = Pool::new(servers.iter().map(|s| s.backend()).collect());
    TcpFrontend::bind(ANY.parse().expect("addr"), pool, opts)
        .await
        .expect("bind frontend")
}

#[tokio::test]
async fn t10_spreads_over_three_backends() {
    let servers = three().await;
    let fe = frontend(&servers, TcpOptions::default()).await;
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(one_request(fe.local_addr()).await.expect("answer"));
    }
    let counts = count(&ids);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (id, n) in &counts {
        assert!(*n >= 60, "backend {id} got only {n} of 300: {counts:?}");
    }
}

#[tokio::test]
async fn t11_least_connections_prefers_idle_backend() {
    let servers = three().await;
    let fe = frontend(&servers, TcpOptions::default()).await;
    let mut held1 = LineClient::connect(fe.local_addr()).await;
    let id1 = held1.ask("x").await.expect("answer");
    let mut held2 = LineClient::connect(fe.local_addr()).await;
    let id2 = held2.ask("x").await.expect("answer");
    assert_ne!(id1, id2, "second connection went to the busy backend");
    for _ in 0..20 {
        let id = one_request(fe.local_addr()).await.expect("answer");
        assert!(id != id1 && id != id2, "request went to busy backend {id}");
        wait_until("short connection torn down", || fe.active() == 2).await;
    }
    // The held connections still work.
    assert_eq!(held1.ask("y").await.as_deref(), Some(id1.as_str()));
    assert_eq!(held2.ask("y").await.as_deref(), Some(id2.as_str()));
}

#[tokio::test]
async fn t20_failover_when_a_backend_stops_listening() {
    let servers = three().await;
    let fe = frontend(&servers, TcpOptions::default()).await;
    servers[1].stop_listening().await;
    let mut ids = Vec::new();
    for i in 0..200 {
        match one_request(fe.local_addr()).await {
            Some(id) => ids.push(id),
            None => panic!("request {i} failed"),
        }
    }
    let counts = count(&ids);
    assert!(!counts.contains_key("b"), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 200);
    let stats = fe.pool().stats();
    let b = stats.iter().find(|s| s.id == "b").expect("b stats");
    assert!(b.failed >= 1, "{b:?}");
}

#[tokio::test]
async fn t21_all_backends_down_fails_fast_and_counts() {
    let servers = three().await;
    let fe = frontend(&servers, TcpOptions::default()).await;
    for s in &servers {
        s.stop_listening().await;
    }
    assert_eq!(one_request(fe.local_addr()).await, None);
    let empty = TcpFrontend::bind(
        ANY.parse().expect("addr"),
        Pool::default(),
        TcpOptions::default(),
    )
    .await
    .expect("bind");
    assert_eq!(one_request(empty.local_addr()).await, None);
}

#[tokio::test]
async fn t30_removed_backend_drains() {
    let servers = vec![LineServer::start("a").await, LineServer::start("b").await];
    let fe = frontend(&servers, TcpOptions::default()).await;
    let mut held = LineClient::connect(fe.local_addr()).await;
    let old = held.ask("hello").await.expect("answer");
    let keep = servers.iter().find(|s| s.id != old).expect("other");
    fe.pool().set_backends(vec![keep.backend()]);
    for _ in 0..20 {
        assert_eq!(
            one_request(fe.local_addr()).await.as_deref(),
            Some(keep.id.as_str())
        );
    }
    // The long-lived connection to the removed backend keeps working.
    for i in 0..5 {
        assert_eq!(
            held.ask(&format!("still-{i}")).await.as_deref(),
            Some(old.as_str())
        );
    }
    let stats = fe.pool().stats();
    let d = stats
        .iter()
        .find(|s| s.id == old)
        .expect("draining backend listed");
    assert!(d.draining && d.active == 1, "{d:?}");
    drop(held);
    wait_until("drained backend forgotten", || {
        fe.pool().stats().iter().all(|s| s.id != old)
    })
    .await;
}

/// A backend that reads a PROXY header, then answers with what it parsed and closes.
async fn proxy_backend() -> (SocketAddr, tokio::task::JoinHandle<String>) {
    let l = TcpListener::bind(ANY).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut first = [0u8; 12];
        s.read_exact(&mut first).await.expect("read");
        let parsed = if first == V2_SIGNATURE {
            let mut hdr = [0u8; 4];
            s.read_exact(&mut hdr).await.expect("read");
            assert_eq!(hdr[0], 0x21, "v2 PROXY command");
            assert_eq!(hdr[1], 0x11, "TCP over IPv4");
            let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.expect("read");
            let ip = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            format!(
                "v2 {}:{} {}:{}",
                ip(&body[0..4]),
                port(&body[8..10]),
                ip(&body[4..8]),
                port(&body[10..12])
            )
        } else {
            let mut line = first.to_vec();
            while !line.ends_with(b"\r\n") {
                let b = s.read_u8().await.expect("read");
                line.push(b);
                assert!(line.len() <= 107, "v1 header too long");
            }
            let text = String::from_utf8(line).expect("utf8");
            let f: Vec<&str> = text.trim_end().split(' ').collect();
            assert_eq!(&f[..2], &["PROXY", "TCP4"]);
            format!("v1 {}:{} {}:{}", f[2], f[4], f[3], f[5])
        };
        // The payload follows the header untouched.
        let mut payload = [0u8; 5];
        s.read_exact(&mut payload).await.expect("payload");
        assert_eq!(&payload, b"hello");
        s.write_all(b"ok").await.expect("write");
        parsed
    });
    (addr, task)
}

#[tokio::test]
async fn t40_proxy_protocol_v1_and_v2() {
    for (version, tag) in [(ProxyProtocol::V1, "v1"), (ProxyProtocol::V2, "v2")] {
        let (addr, parsed) = proxy_backend().await;
        let pool = Pool::new(vec![flotilla_mesh::Backend::new("p", addr)]);
        let opts = TcpOptions {
            proxy_protocol: Some(version),
            ..TcpOptions::default()
        };
        let fe = TcpFrontend::bind(ANY.parse().expect("addr"), pool, opts)
            .await
            .expect("bind");
        let mut c = TcpStream::connect(fe.local_addr()).await.expect("connect");
        let me = c.local_addr().expect("local");
        c.write_all(b"hello").await.expect("write");
        assert_eq!(read_to_end(&mut c).await, b"ok");
        let got = within("backend", parsed).await.expect("backend task");
        assert_eq!(got, format!("{tag} {me} {}", fe.local_addr()));
    }
}

#[tokio::test]
async fn t50_half_close_is_forwarded() {
    // Backend: read everything until EOF, then answer with the byte count and close.
    let l = TcpListener::bind(ANY).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.expect("read");
        s.write_all(format!("got {}", v.len()).as_bytes())
            .await
            .expect("write");
    });
    let pool = Pool::new(vec![flotilla_mesh::Backend::new("h", addr)]);
    let fe = TcpFrontend::bind(ANY.parse().expect("addr"), pool, TcpOptions::default())
        .await
        .expect("bind");
    let mut c = TcpStream::connect(fe.local_addr()).await.expect("connect");
    c.write_all(&vec![7u8; 100_000]).await.expect("write");
    c.shutdown().await.expect("half-close");
    assert_eq!(read_to_end(&mut c).await, b"got 100000");
}

#[tokio::test]
async fn t60_shutdown_waits_then_cuts() {
    let servers = vec![LineServer::start("a").await];
    let fe = frontend(&servers, TcpOptions::default()).await;
    let addr = fe.local_addr();
    let mut held = LineClient::connect(addr).await;
    assert!(held.ask("x").await.is_some());
    let cut = within("shutdown", fe.shutdown(Duration::from_millis(100))).await;
    assert_eq!(cut, 1);
    assert_eq!(held.ask("after").await, None, "connection was cut");
    // The port is free again (checked without SO_REUSEPORT, which would share it).
    let exclusive = TcpOptions {
        listen: ListenOptions {
            reuse_port: false,
            freebind: false,
        },
        ..TcpOptions::default()
    };
    let again = TcpFrontend::bind(addr, Pool::default(), exclusive).await;
    assert!(again.is_ok(), "{again:?}");

    // With no open connection, shutdown returns at once and cuts nothing.
    let fe = frontend(&servers, TcpOptions::default()).await;
    assert_eq!(
        within("shutdown", fe.shutdown(Duration::from_secs(30))).await,
        0
    );
}

#[tokio::test]
async fn t61_dropped_frontend_drains_open_connections() {
    let servers = vec![LineServer::start("a").await];
    let fe = frontend(&servers, TcpOptions::default()).await;
    let addr = fe.local_addr();
    let mut held = LineClient::connect(addr).await;
    assert!(held.ask("x").await.is_some());
    drop(fe);
    wait_until_refused(addr).await;
    assert_eq!(held.ask("still").await.as_deref(), Some("a"));
}

async fn wait_until_refused(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "port still accepting"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn t22_failover_on_connect_timeout() {
    // A backend whose accept queue is full and never drained: new SYNs are dropped, so a connect
    // to it hangs until the frontend's connect timeout.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(ANY.parse().expect("addr")).expect("bind");
    let stuck = sock.listen(1).expect("listen");
    let stuck_addr = stuck.local_addr().expect("addr");
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(stuck_addr)).await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
        assert!(fillers.len() < 64, "accept queue never filled");
    }
    let good = LineServer::start("good").await;
    let pool = Pool::new(vec![
        flotilla_mesh::Backend::new("stuck", stuck_addr),
        good.backend(),
    ]);
    let opts = TcpOptions {
        connect_timeout: Duration::from_millis(100),
        ..TcpOptions::default()
    };
    let fe = TcpFrontend::bind(ANY.parse().expect("addr"), pool, opts)
        .await
        .expect("bind");
    for _ in 0..10 {
        assert_eq!(one_request(fe.local_addr()).await.as_deref(), Some("good"));
    }
    let stats = fe.pool().stats();
    let s = stats.iter().find(|s| s.id == "stuck").expect("stats");
    assert!(s.failed >= 1, "{s:?}");
    assert_eq!(fe.failed(), 0);
}

#[tokio::test]
async fn t70_worker_threads_share_the_port_and_the_pool() {
    let servers = three().await;
    let workers = flotilla_mesh::Workers::start(2).expect("workers");
    let opts = TcpOptions {
        runtimes: workers.handles(),
        ..TcpOptions::default()
    };
    let fe = frontend(&servers, opts).await;
    let mut ids = Vec::new();
    for _ in 0..90 {
        ids.push(one_request(fe.local_addr()).await.expect("answer"));
    }
    let counts = count(&ids);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert_eq!(fe.total(), 90);
    let mut held = LineClient::connect(fe.local_addr()).await;
    assert!(held.ask("x").await.is_some());
    let addr = fe.local_addr();
    wait_until("short connections torn down", || fe.active() == 1).await;
    assert_eq!(
        within("shutdown", fe.shutdown(Duration::from_millis(50))).await,
        1
    );
    assert_eq!(held.ask("y").await, None);
    wait_until_refused(addr).await;
}

#[tokio::test]
async fn t51_large_transfer_both_ways_is_intact() {
    // Echo backend: copies everything back, then closes after EOF.
    let l = TcpListener::bind(ANY).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.expect("echo");
        w.shutdown().await.expect("shutdown");
    });
    let pool = Pool::new(vec![flotilla_mesh::Backend::new("echo", addr)]);
    let fe = TcpFrontend::bind(ANY.parse().expect("addr"), pool, TcpOptions::default())
        .await
        .expect("bind");
    let c = TcpStream::connect(fe.local_addr()).await.expect("connect");
    let (mut r, mut w) = c.into_split();
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("half-close");
    });
    let mut got = Vec::new();
    within("echo", r.read_to_end(&mut got)).await.expect("read");
    writer.await.expect("writer");
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "payload corrupted");
}
