//! DNS responder over real sockets: A, AAAA, NXDOMAIN, search domain, TCP, forwarding to a list
//! of upstreams, the cache of forwarded answers, garbage input, truncation.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use flotilla_mesh::{respond, DnsOptions, DnsServer, Outcome, Records, UDP_MAX};
use simple_dns::rdata::{RData, A};
use simple_dns::{
    Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn query(id: u16, name: &str, t: TYPE) -> Vec<u8> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(t),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.build_bytes_vec().expect("build")
}

/// (rcode, addresses, ttls) of an answer.
fn parse(bytes: &[u8]) -> (RCODE, Vec<Ipv4Addr>, Vec<u32>) {
    let p = Packet::parse(bytes).expect("parse answer");
    let mut ips = Vec::new();
    let mut ttls = Vec::new();
    for rr in &p.answers {
        if let RData::A(a) = &rr.rdata {
            ips.push(Ipv4Addr::from(a.address));
            ttls.push(rr.ttl);
        }
    }
    (p.rcode(), ips, ttls)
}

fn table() -> HashMap<String, Vec<Ipv4Addr>> {
    HashMap::from([
        (
            "web".to_string(),
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
        ),
        ("Api.".to_string(), vec![Ipv4Addr::new(10, 0, 0, 3)]),
    ])
}

async fn udp_ask(server: SocketAddr, q: &[u8]) -> Vec<u8> {
    udp_ask_from("127.0.0.1:0", server, q).await
}

/// [`udp_ask`] from a socket bound to `client` (the server tells clients apart by address).
async fn udp_ask_from(client: &str, server: SocketAddr, q: &[u8]) -> Vec<u8> {
    let c = UdpSocket::bind(client).await.expect("bind");
    c.send_to(q, server).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let (n, _) = within("dns answer", c.recv_from(&mut buf))
        .await
        .expect("recv");
    buf.truncate(n);
    buf
}

async fn server(opts: DnsOptions) -> DnsServer {
    let s = DnsServer::bind("127.0.0.1:0".parse().expect("addr"), opts)
        .await
        .expect("bind dns");
    s.set_records(table());
    s
}

#[tokio::test]
async fn t10_a_aaaa_nxdomain_over_udp() {
    let s = server(DnsOptions::default()).await;
    let addr = s.local_addr();

    let ans = udp_ask(addr, &query(1, "web", TYPE::A)).await;
    let p = Packet::parse(&ans).expect("parse");
    assert_eq!(p.id(), 1);
    assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_DESIRED));
    let (rcode, mut ips, ttls) = parse(&ans);
    assert_eq!(rcode, RCODE::NoError);
    ips.sort();
    assert_eq!(
        ips,
        vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
    );
    assert!(ttls.iter().all(|t| (1..=5).contains(t)), "{ttls:?}");

    // Case-insensitive, trailing dot, search domain.
    for name in [
        "WEB.",
        "web.flotilla",
        "Web.Flotilla.",
        "api",
        "API.flotilla",
    ] {
        let (rcode, ips, _) = parse(&udp_ask(addr, &query(2, name, TYPE::A)).await);
        assert_eq!(rcode, RCODE::NoError, "{name}");
        assert!(!ips.is_empty(), "{name}");
    }

    // AAAA of a known name: NOERROR, no answer.
    let (rcode, ips, _) = parse(&udp_ask(addr, &query(3, "web", TYPE::AAAA)).await);
    assert_eq!((rcode, ips.len()), (RCODE::NoError, 0));

    // Unknown: NXDOMAIN.
    for name in ["nope", "nope.flotilla", "example.com"] {
        let (rcode, ips, _) = parse(&udp_ask(addr, &query(4, name, TYPE::A)).await);
        assert_eq!((rcode, ips.len()), (RCODE::NameError, 0), "{name}");
    }

    // Records are replaced as a whole.
    s.set_records(HashMap::from([(
        "db".to_string(),
        vec![Ipv4Addr::new(10, 0, 0, 9)],
    )]));
    let (rcode, _, _) = parse(&udp_ask(addr, &query(5, "web", TYPE::A)).await);
    assert_eq!(rcode, RCODE::NameError);
    let (_, ips, _) = parse(&udp_ask(addr, &query(6, "db", TYPE::A)).await);
    assert_eq!(ips, vec![Ipv4Addr::new(10, 0, 0, 9)]);
}

#[tokio::test]
async fn t11_multi_address_answers_are_shuffled() {
    let s = server(DnsOptions::default()).await;
    let mut firsts = std::collections::HashSet::new();
    for i in 0..64 {
        let (_, ips, _) = parse(&udp_ask(s.local_addr(), &query(i, "web", TYPE::A)).await);
        firsts.insert(ips[0]);
        if firsts.len() == 2 {
            return;
        }
    }
    panic!("64 answers all had the same first address");
}

#[tokio::test]
async fn t20_tcp_queries_on_one_connection() {
    let s = server(DnsOptions::default()).await;
    assert_eq!(s.tcp_addr(), s.local_addr());
    let mut c = TcpStream::connect(s.tcp_addr()).await.expect("connect");
    for (i, name) in ["web", "api", "nope"].into_iter().enumerate() {
        let q = query(i as u16, name, TYPE::A);
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        c.write_all(&msg).await.expect("write");
        let n = within("tcp answer", c.read_u16()).await.expect("len") as usize;
        let mut ans = vec![0u8; n];
        c.read_exact(&mut ans).await.expect("read");
        let (rcode, ips, _) = parse(&ans);
        if name == "nope" {
            assert_eq!(rcode, RCODE::NameError);
        } else {
            assert_eq!(rcode, RCODE::NoError);
            assert!(!ips.is_empty());
        }
    }
}

/// A fake upstream on 127.0.0.1 answering every A query with 192.0.2.7 (TTL 60), and the number
/// of queries it received.
async fn fake_upstream() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = s.local_addr().expect("addr");
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(q) = Packet::parse(&buf[..n]) else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let mut r = Packet::new_reply(q.id());
            for qu in &q.questions {
                r.questions.push(qu.clone());
                r.answers.push(ResourceRecord::new(
                    qu.qname.clone(),
                    CLASS::IN,
                    60,
                    RData::A(A::from(Ipv4Addr::new(192, 0, 2, 7))),
                ));
            }
            let _ = s.send_to(&r.build_bytes_vec().expect("build"), peer).await;
        }
    });
    (addr, received, task)
}

#[tokio::test]
async fn t30_unknown_names_forwarded_to_upstream() {
    let (up, _, _task) = fake_upstream().await;
    let s = server(DnsOptions {
        upstreams: vec![up],
        ..DnsOptions::default()
    })
    .await;
    let (rcode, ips, _) = parse(&udp_ask(s.local_addr(), &query(7, "example.com", TYPE::A)).await);
    assert_eq!(
        (rcode, ips),
        (RCODE::NoError, vec![Ipv4Addr::new(192, 0, 2, 7)])
    );
    // Known names stay local; unknown names in the cluster domain are never forwarded.
    let (_, ips, _) = parse(&udp_ask(s.local_addr(), &query(8, "api", TYPE::A)).await);
    assert_eq!(ips, vec![Ipv4Addr::new(10, 0, 0, 3)]);
    let (rcode, _, _) = parse(&udp_ask(s.local_addr(), &query(9, "nope.flotilla", TYPE::A)).await);
    assert_eq!(rcode, RCODE::NameError);
}

/// A fake TCP upstream answering one length-prefixed query per connection with 192.0.2.8.
async fn fake_tcp_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let n = s.read_u16().await.expect("len") as usize;
            let mut q = vec![0u8; n];
            s.read_exact(&mut q).await.expect("query");
            let q = Packet::parse(&q).expect("parse");
            let mut r = Packet::new_reply(q.id());
            for qu in &q.questions {
                r.questions.push(qu.clone());
                r.answers.push(ResourceRecord::new(
                    qu.qname.clone(),
                    CLASS::IN,
                    60,
                    RData::A(A::from(Ipv4Addr::new(192, 0, 2, 8))),
                ));
            }
            let bytes = r.build_bytes_vec().expect("build");
            let mut msg = (bytes.len() as u16).to_be_bytes().to_vec();
            msg.extend_from_slice(&bytes);
            s.write_all(&msg).await.expect("write");
        }
    });
    addr
}

/// One query over a new TCP connection (two-byte length prefix); the answer.
async fn tcp_ask(addr: std::net::SocketAddr, q: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    let mut msg = (q.len() as u16).to_be_bytes().to_vec();
    msg.extend_from_slice(q);
    c.write_all(&msg).await.expect("write");
    let n = within("tcp answer", c.read_u16()).await.expect("len") as usize;
    let mut ans = vec![0u8; n];
    c.read_exact(&mut ans).await.expect("read");
    ans
}

#[tokio::test]
async fn t32_tcp_queries_forwarded_over_tcp() {
    let up = fake_tcp_upstream().await;
    let s = server(DnsOptions {
        upstreams: vec![up],
        ..DnsOptions::default()
    })
    .await;
    let ans = tcp_ask(s.tcp_addr(), &query(11, "example.org", TYPE::A)).await;
    let (rcode, ips, _) = parse(&ans);
    assert_eq!(
        (rcode, ips),
        (RCODE::NoError, vec![Ipv4Addr::new(192, 0, 2, 8)])
    );
}

#[tokio::test]
async fn t31_dead_upstream_gives_servfail() {
    // A bound socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let s = server(DnsOptions {
        upstreams: vec![silent.local_addr().expect("addr")],
        upstream_timeout: Duration::from_millis(100),
        ..DnsOptions::default()
    })
    .await;
    let (rcode, _, _) = parse(&udp_ask(s.local_addr(), &query(7, "example.com", TYPE::A)).await);
    assert_eq!(rcode, RCODE::ServerFailure);
}

#[tokio::test]
async fn t33_next_upstream_after_a_timeout_then_cached() {
    // The first upstream is a bound socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let (up, received, _task) = fake_upstream().await;
    let s = server(DnsOptions {
        upstreams: vec![silent.local_addr().expect("addr"), up],
        upstream_timeout: Duration::from_millis(200),
        ..DnsOptions::default()
    })
    .await;

    let ans = udp_ask(s.local_addr(), &query(21, "example.net", TYPE::A)).await;
    assert_eq!(Packet::parse(&ans).expect("parse").id(), 21);
    let (rcode, ips, ttls) = parse(&ans);
    assert_eq!(
        (rcode, ips, ttls),
        (RCODE::NoError, vec![Ipv4Addr::new(192, 0, 2, 7)], vec![60])
    );
    assert_eq!(received.load(Ordering::SeqCst), 1);

    // The same question again (other id, other case): from the cache, over UDP and TCP.
    let ans = udp_ask(s.local_addr(), &query(22, "Example.NET", TYPE::A)).await;
    let p = Packet::parse(&ans).expect("parse");
    assert_eq!(p.id(), 22);
    assert_eq!(p.questions[0].qname.to_string(), "Example.NET");
    let (rcode, ips, ttls) = parse(&ans);
    assert_eq!(
        (rcode, ips),
        (RCODE::NoError, vec![Ipv4Addr::new(192, 0, 2, 7)])
    );
    assert!(ttls.iter().all(|t| (1..=60).contains(t)), "{ttls:?}");

    let ans = tcp_ask(s.tcp_addr(), &query(23, "example.net", TYPE::A)).await;
    assert_eq!(Packet::parse(&ans).expect("parse").id(), 23);
    assert_eq!(parse(&ans).1, vec![Ipv4Addr::new(192, 0, 2, 7)]);

    assert_eq!(
        received.load(Ordering::SeqCst),
        1,
        "answered from the cache"
    );

    // Another question is forwarded again.
    let (_, ips, _) = parse(&udp_ask(s.local_addr(), &query(24, "other.net", TYPE::A)).await);
    assert_eq!(ips, vec![Ipv4Addr::new(192, 0, 2, 7)]);
    assert_eq!(received.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn t34_cache_disabled_forwards_every_query() {
    let (up, received, _task) = fake_upstream().await;
    let s = server(DnsOptions {
        upstreams: vec![up],
        cache_entries: 0,
        ..DnsOptions::default()
    })
    .await;
    for id in 0..3 {
        let (_, ips, _) = parse(&udp_ask(s.local_addr(), &query(id, "example.net", TYPE::A)).await);
        assert_eq!(ips, vec![Ipv4Addr::new(192, 0, 2, 7)]);
    }
    assert_eq!(received.load(Ordering::SeqCst), 3);
}

/// A client with its own resolvers (a task's `--dns`) has its outside names forwarded there,
/// uncached, while other clients get the node's (here none: NXDOMAIN); cluster names stay local.
#[tokio::test]
async fn t35_a_client_with_its_own_resolvers() {
    let (up, received, _task) = fake_upstream().await;
    let own = flotilla_mesh::SourceUpstreams::default();
    let s = server(DnsOptions {
        source_upstreams: own.clone(),
        ..DnsOptions::default()
    })
    .await;
    let ask_from = |client: &'static str, id: u16, name: &'static str| {
        let server = s.local_addr();
        async move { udp_ask_from(client, server, &query(id, name, TYPE::A)).await }
    };
    own.set("127.0.0.1".parse().expect("ip"), vec![up]);
    for id in 0..2 {
        let (rcode, ips, _) = parse(&ask_from("127.0.0.1:0", id, "example.net").await);
        assert_eq!(
            (rcode, ips),
            (RCODE::NoError, vec![Ipv4Addr::new(192, 0, 2, 7)])
        );
    }
    assert_eq!(received.load(Ordering::SeqCst), 2, "not cached");
    // Another client: the node forwards nothing.
    let (rcode, ips, _) = parse(&ask_from("127.0.0.2:0", 5, "example.net").await);
    assert_eq!((rcode, ips.len()), (RCODE::NameError, 0));
    // Cluster names are answered locally, for the client with resolvers too.
    let (rcode, ips, _) = parse(&ask_from("127.0.0.1:0", 6, "web").await);
    assert_eq!(rcode, RCODE::NoError);
    assert!(!ips.is_empty());
    assert_eq!(received.load(Ordering::SeqCst), 2);
    // Cleared: NXDOMAIN again.
    own.set("127.0.0.1".parse().expect("ip"), Vec::new());
    let (rcode, _, _) = parse(&ask_from("127.0.0.1:0", 7, "example.net").await);
    assert_eq!(rcode, RCODE::NameError);
}

/// A client on user-defined networks is answered from its networks' tables only, in its order;
/// a client on none from the default table.
#[tokio::test]
async fn t36_answers_are_scoped_to_the_clients_networks() {
    let scopes = flotilla_mesh::SourceNetworks::default();
    let s = server(DnsOptions {
        source_networks: scopes.clone(),
        ..DnsOptions::default()
    })
    .await;
    let table = |pairs: &[(&str, [u8; 4])]| -> HashMap<String, Vec<Ipv4Addr>> {
        pairs
            .iter()
            .map(|(n, a)| (n.to_string(), vec![Ipv4Addr::from(*a)]))
            .collect()
    };
    s.set_network_records(
        [
            (
                "front".to_string(),
                table(&[("pay", [10, 200, 16, 2]), ("shared", [10, 200, 16, 9])]),
            ),
            (
                "back".to_string(),
                table(&[("db", [10, 200, 32, 2]), ("shared", [10, 200, 32, 9])]),
            ),
        ]
        .into_iter()
        .collect(),
    );
    let ask_from = |client: &'static str, id: u16, name: &'static str| {
        let server = s.local_addr();
        async move { parse(&udp_ask_from(client, server, &query(id, name, TYPE::A)).await) }
    };
    scopes.set("127.0.0.3".parse().expect("ip"), vec!["front".into()]);
    scopes.set(
        "127.0.0.4".parse().expect("ip"),
        vec!["back".into(), "front".into()],
    );
    // On `front`: its names, not `back`'s, not the default network's.
    let (rcode, ips, _) = ask_from("127.0.0.3:0", 1, "pay").await;
    assert_eq!(
        (rcode, ips),
        (RCODE::NoError, vec![Ipv4Addr::new(10, 200, 16, 2)])
    );
    for (id, name) in [(2, "db"), (3, "web"), (4, "db.flotilla")] {
        let (rcode, ips, _) = ask_from("127.0.0.3:0", id, name).await;
        assert_eq!((rcode, ips.len()), (RCODE::NameError, 0), "{name}");
    }
    // On both: each network's names; a name on both from the first network.
    let (_, ips, _) = ask_from("127.0.0.4:0", 5, "pay").await;
    assert_eq!(ips, vec![Ipv4Addr::new(10, 200, 16, 2)]);
    let (_, ips, _) = ask_from("127.0.0.4:0", 6, "db").await;
    assert_eq!(ips, vec![Ipv4Addr::new(10, 200, 32, 2)]);
    let (_, ips, _) = ask_from("127.0.0.4:0", 7, "shared").await;
    assert_eq!(ips, vec![Ipv4Addr::new(10, 200, 32, 9)]);
    // On none: the default table, without the networks' names.
    let (rcode, ips, _) = ask_from("127.0.0.5:0", 8, "web").await;
    assert_eq!(rcode, RCODE::NoError);
    assert!(!ips.is_empty());
    let (rcode, _, _) = ask_from("127.0.0.5:0", 9, "pay").await;
    assert_eq!(rcode, RCODE::NameError);
    // Cleared: the default table again.
    scopes.set("127.0.0.3".parse().expect("ip"), Vec::new());
    let (rcode, _, _) = ask_from("127.0.0.3:0", 10, "web").await;
    assert_eq!(rcode, RCODE::NoError);
}

#[tokio::test]
async fn t40_garbage_is_ignored_or_formerr_and_server_survives() {
    let s = server(DnsOptions::default()).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut seed = 0x1234_5678u32;
    for len in 0..200usize {
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed & 0xff) as u8
            })
            .collect();
        c.send_to(&junk, s.local_addr()).await.expect("send");
    }
    // Truncated copies of a valid query too.
    let q = query(99, "web", TYPE::A);
    for cut in 0..q.len() {
        c.send_to(&q[..cut], s.local_addr()).await.expect("send");
    }
    // Still answering.
    let (rcode, ips, _) = parse(&udp_ask(s.local_addr(), &query(100, "web", TYPE::A)).await);
    assert_eq!((rcode, ips.len()), (RCODE::NoError, 2));
    // TCP garbage: the connection is dropped, the server goes on.
    let mut t = TcpStream::connect(s.tcp_addr()).await.expect("connect");
    t.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.expect("write");
    let mut v = Vec::new();
    let _ = within("tcp close", t.read_to_end(&mut v)).await;
}

#[test]
fn t50_respond_rules() {
    let opts = DnsOptions::default();
    let recs = Records::new(table(), opts.domain.as_deref());
    let keep = |_: &mut [Ipv4Addr]| {};
    // Too short, or a response: ignored.
    assert_eq!(
        respond(&[1, 2, 3], &recs, &opts, UDP_MAX, keep),
        Outcome::Ignore
    );
    let mut resp = query(1, "web", TYPE::A);
    resp[2] |= 0x80;
    assert_eq!(respond(&resp, &recs, &opts, UDP_MAX, keep), Outcome::Ignore);
    // A header claiming a question that is not there: FORMERR with the id.
    let bad = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
    let Outcome::Reply(r) = respond(&bad, &recs, &opts, UDP_MAX, keep) else {
        panic!("expected a reply")
    };
    assert_eq!(&r[..2], &[0xab, 0xcd]);
    assert_eq!(r[3] & 0x0f, 1, "FORMERR");
    // Too many addresses for UDP: truncated, empty, TC set; all of them over TCP.
    let many: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
    let recs = Records::new(HashMap::from([("big".to_string(), many)]), None);
    let Outcome::Reply(r) = respond(&query(2, "big", TYPE::A), &recs, &opts, UDP_MAX, keep) else {
        panic!("expected a reply")
    };
    let p = Packet::parse(&r).expect("parse");
    assert!(p.has_flags(PacketFlag::TRUNCATION) && p.answers.is_empty());
    assert!(r.len() <= UDP_MAX);
    let Outcome::Reply(r) = respond(&query(2, "big", TYPE::A), &recs, &opts, 65535, keep) else {
        panic!("expected a reply")
    };
    assert_eq!(Packet::parse(&r).expect("parse").answers.len(), 100);
    // Unknown name with an upstream: forward.
    let fwd = DnsOptions {
        upstreams: vec!["127.0.0.1:53".parse().expect("addr")],
        ..DnsOptions::default()
    };
    assert_eq!(
        respond(
            &query(3, "example.com", TYPE::A),
            &recs,
            &fwd,
            UDP_MAX,
            keep
        ),
        Outcome::Forward
    );
}
