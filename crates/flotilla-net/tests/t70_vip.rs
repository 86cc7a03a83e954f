//! VIPs in the kernel (`nat::set_vips`): a task's connections to a VIP, on any port, TCP and
//! UDP, reach the service's tasks on one host (hairpin through the bridge) and across two
//! hosts over VXLAN; the mesh's ports are left alone; a task leaving the list keeps its
//! established connections and gets no new ones; a VIP without tasks refuses at once.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{fetch, fetch_until, net, rules_for, sock, Sandbox, Server};
use flotilla_net::nat::{self, VipBalance, L4};
use flotilla_net::overlay::{self, OverlayPeer, Vxlan};
use flotilla_net::task::{self, TaskLink};
use flotilla_net::{bridge, link, netns, route, Net};

const WAIT: Duration = Duration::from_secs(5);
const VIP: &str = "10.199.0.2";

fn vip() -> Ipv4Addr {
    VIP.parse().expect("vip")
}

/// A task `10.200.<n>.<host>` named `<name>` on `host`'s bridge.
async fn task_on(sb: &Sandbox, host: &Net, name: &str, n: u8, last: u8, veth: &str) -> PathBuf {
    let ns = sb.netns(name);
    task::attach(
        host,
        &TaskLink {
            netns: ns.clone(),
            host_ifname: veth.into(),
            bridge: "fltbr0".into(),
            addr: net(&format!("10.200.{n}.{last}/24")),
            gateway: Ipv4Addr::new(10, 200, n, 1),
            mtu: 1450,
        },
    )
    .await
    .expect("attach");
    ns
}

/// A TCP server in `ns` on `port` that answers each line with `<name> <line>` and keeps the
/// connection open (for the draining check).
fn line_server(ns: &Path, port: u16, name: &str) {
    let listener = netns::run_in(ns, move || {
        TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
    })
    .expect("run_in")
    .expect("bind");
    let name = name.to_string();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let mut w = match c.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                for line in BufReader::new(c).lines().map_while(Result::ok) {
                    if w.write_all(format!("{name} {line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A UDP server in `ns` on `port` that answers each datagram with `<name>`.
fn udp_server(ns: &Path, port: u16, name: &str) {
    let s = netns::run_in(ns, move || {
        UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port)))
    })
    .expect("run_in")
    .expect("bind udp");
    let name = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = s.recv_from(&mut buf) {
            let _ = s.send_to(name.as_bytes(), peer);
        }
    });
}

/// One line through a new connection from `ns` to `addr`; the answer's first word.
fn ask(ns: &Path, addr: SocketAddr) -> std::io::Result<String> {
    let mut s = connect(ns, addr)?;
    s.write_all(b"hi\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn connect(ns: &Path, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = netns::run_in(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })
    .map_err(std::io::Error::other)??;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

/// Who answers `n` UDP datagrams sent from `ns` to `addr` (a connected socket: a reply from
/// any address but `addr` is not received).
fn udp_names(ns: &Path, addr: SocketAddr, n: usize) -> HashSet<String> {
    let mut names = HashSet::new();
    for _ in 0..n {
        let s = netns::run_in(ns, move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(addr)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        })
        .expect("run_in")
        .expect("udp socket");
        let mut buf = [0u8; 512];
        if s.send(b"?").is_ok() {
            if let Ok(len) = s.recv(&mut buf) {
                names.insert(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
        }
    }
    names
}

/// Answers to `n` new connections to `addr`.
fn tcp_names(ns: &Path, addr: SocketAddr, n: usize) -> HashSet<String> {
    (0..n).filter_map(|_| ask(ns, addr).ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_every_port_tcp_udp_hairpin_and_draining() {
    let sb = Sandbox::new();
    let host_ns = sb.netns("t70-host");
    let host = Net::open(&host_ns).expect("host");
    bridge::ensure_bridge(&host, "fltbr0", net("10.200.1.1/24"), 1450)
        .await
        .expect("bridge");
    let client = task_on(&sb, &host, "t70-client", 1, 2, "fltv0").await;
    let b1 = task_on(&sb, &host, "t70-b1", 1, 3, "fltv1").await;
    let b2 = task_on(&sb, &host, "t70-b2", 1, 4, "fltv2").await;
    route::ensure_local(&host, net("10.199.0.0/16"), 100)
        .await
        .expect("vip route");
    nat::ensure(&host, &rules_for("t70", 1, None))
        .await
        .expect("nat");
    for (ns, name) in [(&b1, "b1"), (&b2, "b2")] {
        line_server(ns, 7000, name);
        udp_server(ns, 7001, name);
    }
    // The mesh's port on the VIP: a listener on the host.
    let _mesh = Server::start(&host_ns, sock(&format!("{VIP}:80")), "mesh");
    let v = |port: u16| SocketAddr::from((vip(), port));

    // No VIP entries yet: the connection is refused at once, not left to time out.
    let t = Instant::now();
    let err = ask(&client, v(7000)).expect_err("no backends");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    let balance = |backends: &[&str]| {
        vec![VipBalance {
            vip: vip(),
            mesh_ports: vec![(L4::Tcp, 80)],
            backends: backends.iter().map(|b| b.parse().expect("ip")).collect(),
            source: None,
        }]
    };
    nat::set_vips(&host, "t70", &balance(&["10.200.1.3", "10.200.1.4"]))
        .await
        .expect("vips");
    // TCP on a port nobody published: both tasks take connections (40 tries: the chance
    // that one of two is never picked is 2^-39).
    let names = tcp_names(&client, v(7000), 40);
    assert_eq!(names, HashSet::from(["b1".into(), "b2".into()]), "TCP");
    // UDP, the reply comes from the VIP (the client's socket is connected to it).
    let names = udp_names(&client, v(7001), 40);
    assert_eq!(names, HashSet::from(["b1".into(), "b2".into()]), "UDP");
    // The mesh's port is left to the mesh.
    assert_eq!(
        fetch(&client, v(80), WAIT).expect("mesh port"),
        "mesh",
        "a target port the mesh serves is not NATed"
    );
    // A task reaching itself through its own VIP (hairpin: with `br_netfilter` the bridge
    // sends the frame back out of the task's port; 20 tries, each to b1 with 1/2).
    let me = tcp_names(&b1, v(7000), 20);
    assert_eq!(
        me,
        HashSet::from(["b1".into(), "b2".into()]),
        "a task reaches itself and the other task through its VIP"
    );

    // Draining: a connection to b1 stays up after b1 leaves the list; new ones go to b2.
    let mut held = None;
    for _ in 0..64 {
        let mut s = connect(&client, v(7000)).expect("connect");
        s.write_all(b"one\n").expect("write");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        if line.starts_with("b1 ") {
            held = Some((s, r));
            break;
        }
    }
    let (mut s, mut r) = held.expect("a connection landed on b1");
    nat::set_vips(&host, "t70", &balance(&["10.200.1.4"]))
        .await
        .expect("vips without b1");
    assert_eq!(
        tcp_names(&client, v(7000), 20),
        HashSet::from(["b2".into()]),
        "new connections avoid a removed task"
    );
    s.write_all(b"two\n").expect("write after removal");
    let mut line = String::new();
    r.read_line(&mut line).expect("read after removal");
    assert_eq!(line, "b1 two\n", "the established connection is kept");

    // An empty list: refused again; the chain holds nothing for the VIP.
    nat::set_vips(&host, "t70", &balance(&[]))
        .await
        .expect("none");
    let err = ask(&client, v(7000)).expect_err("no backends");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let rules = nat::rules(&host, "nat", "t70").await.expect("rules");
    assert!(
        rules.iter().all(|r| !r.contains("--to-destination")),
        "no DNAT left: {rules:?}"
    );
    assert!(
        rules.contains(&"-A PREROUTING -i fltbr0 -j FLT-t70-VIP".to_string()),
        "{rules:?}"
    );

    nat::teardown(&host, "t70").await.expect("teardown");
    let rules = nat::rules(&host, "nat", "t70").await.expect("rules");
    assert!(rules.is_empty(), "teardown removes the jump too: {rules:?}");
    assert!(nat::chains(&host, "t70").await.expect("chains").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_hosts_the_task_sees_its_client() {
    let sb = Sandbox::new();
    let a_ns = sb.netns("t71-a");
    let b_ns = sb.netns("t71-b");
    let (ua, ub) = (
        Ipv4Addr::new(192, 168, 78, 1),
        Ipv4Addr::new(192, 168, 78, 2),
    );
    let a = Net::open(&a_ns).expect("a");
    let b = Net::open(&b_ns).expect("b");
    link::create_veth(&a, "fltu0", "fltu0", &b_ns, 1500)
        .await
        .expect("underlay");
    for (n, addr) in [(&a, "192.168.78.1/24"), (&b, "192.168.78.2/24")] {
        let idx = link::index(n, "fltu0").await.expect("idx").expect("exists");
        link::ensure_address(n, idx, net(addr)).await.expect("addr");
        link::set_up(n, "fltu0").await.expect("up");
    }
    let mut peers = Vec::new();
    for (host, n, u) in [(&a, 1u8, ua), (&b, 2u8, ub)] {
        let subnet = net(&format!("10.200.{n}.0/24"));
        bridge::ensure_bridge(host, "fltbr0", net(&format!("10.200.{n}.1/24")), 1450)
            .await
            .expect("bridge");
        overlay::ensure_vxlan(
            host,
            &Vxlan {
                name: "fltvx0".into(),
                vni: 1,
                port: overlay::DEFAULT_PORT,
                local: u,
                subnet,
                mtu: 1450,
            },
        )
        .await
        .expect("vxlan");
        peers.push(OverlayPeer {
            underlay: u,
            subnet,
            extra: Vec::new(),
        });
    }
    let client = task_on(&sb, &a, "t71-client", 1, 2, "fltv0").await;
    let far = task_on(&sb, &b, "t71-far", 2, 2, "fltv0").await;
    for (host, n) in [(&a, 1u8), (&b, 2u8)] {
        overlay::set_peers(host, "fltvx0", &peers)
            .await
            .expect("peers");
        route::ensure_local(host, net("10.199.0.0/16"), 100)
            .await
            .expect("vip route");
        nat::ensure(host, &rules_for("t71", n, Some(overlay::DEFAULT_PORT)))
            .await
            .expect("nat");
        nat::set_nodes(host, "t71", &[ua, ub]).await.expect("nodes");
    }
    // The task answers with the address it sees.
    let _who = Server::start(&far, sock("0.0.0.0:9000"), "{peer}");
    udp_server(&far, 9001, "far");
    nat::set_vips(
        &a,
        "t71",
        &[VipBalance {
            vip: vip(),
            mesh_ports: vec![],
            backends: vec!["10.200.2.2".parse().expect("ip")],
            source: None,
        }],
    )
    .await
    .expect("vips");
    assert_eq!(
        fetch_until(&client, SocketAddr::from((vip(), 9000)), WAIT).expect("vip across hosts"),
        "10.200.1.2",
        "the task sees its client's own address"
    );
    assert_eq!(
        udp_names(&client, SocketAddr::from((vip(), 9001)), 3),
        HashSet::from(["far".into()]),
        "UDP across hosts"
    );
}
