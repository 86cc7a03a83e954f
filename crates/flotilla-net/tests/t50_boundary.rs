//! The network boundary of a node (`nat::ensure`, `set_nodes`, `set_published`), attacked
//! from test namespaces:
//!
//! * a host on the underlay that is not a cluster node injects VXLAN frames (and a member
//!   injects frames for the host itself);
//! * a LAN host routes the task pool (and the VIP pool) through the node;
//! * a task connects to the node's API port and other host listeners.
//!
//! Each attack succeeds without the rules (checked before they are installed) and fails
//! with them; what must keep working is checked alongside.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{fetch, fetch_until, net, rules_for, sock, Sandbox, Server};
use flotilla_net::nat::{self, L4};
use flotilla_net::overlay::{self, OverlayPeer, Vxlan};
use flotilla_net::task::{self, TaskLink};
use flotilla_net::{bridge, link, netns, Net};

const WAIT: Duration = Duration::from_secs(5);
/// How long a connect that must fail (dropped SYN) is given.
const REFUSE: Duration = Duration::from_millis(700);
const VNI: u32 = 42;
const VXLAN_PORT: u16 = 4789;

/// A host namespace `host_ns` joined to `other_ns` by a veth `fltu0`, with `host_addr` and
/// `other_addrs` on the two ends.
async fn underlay(host_ns: &Path, other_ns: &Path, host_addr: &str, other_addrs: &[&str]) {
    let h = Net::open(host_ns).expect("host");
    let o = Net::open(other_ns).expect("other");
    link::create_veth(&h, "fltu0", "fltu0", other_ns, 1500)
        .await
        .expect("underlay veth");
    for (n, addrs) in [(&h, vec![host_addr]), (&o, other_addrs.to_vec())] {
        let idx = link::index(n, "fltu0").await.expect("idx").expect("exists");
        for a in addrs {
            link::ensure_address(n, idx, net(a)).await.expect("addr");
        }
        link::set_up(n, "fltu0").await.expect("up");
    }
}

/// Bridge `fltbr0` with `10.200.<n>.1/24` and one task `10.200.<n>.2` in `<name>-task`.
async fn bridge_and_task(sb: &Sandbox, host: &Net, name: &str, n: u8) -> std::path::PathBuf {
    bridge::ensure_bridge(host, "fltbr0", net(&format!("10.200.{n}.1/24")), 1450)
        .await
        .expect("bridge");
    let t = sb.netns(&format!("{name}-task"));
    task::attach(
        host,
        &TaskLink {
            netns: t.clone(),
            host_ifname: "fltv0".into(),
            bridge: "fltbr0".into(),
            addr: net(&format!("10.200.{n}.2/24")),
            gateway: Ipv4Addr::new(10, 200, n, 1),
            mtu: 1450,
        },
    )
    .await
    .expect("attach");
    t
}

/// Packets counted so far by `rule` (`iptables -S` form, without counters) of `chain`; 0
/// when there is no such rule (yet).
async fn hits(host: &Net, chain: &str, rule: &str) -> u64 {
    let all = nat::counters(host, "filter", chain)
        .await
        .unwrap_or_default();
    all.iter()
        .find(|(r, _)| r == rule)
        .map(|(_, n)| *n)
        .unwrap_or(0)
}

/// Waits until `rule` of `chain` has counted more than `before` packets.
async fn wait_hit(host: &Net, chain: &str, rule: &str, before: u64) {
    let end = Instant::now() + WAIT;
    loop {
        let n = hits(host, chain, rule).await;
        if n > before {
            return;
        }
        assert!(
            Instant::now() < end,
            "{rule:?} still at {n} packets after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn udp_bind(ns: &Path, addr: SocketAddr) -> UdpSocket {
    let s = netns::run_in(ns, move || UdpSocket::bind(addr))
        .expect("run_in")
        .expect("bind udp");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    s
}

/// Receives one datagram within [`WAIT`]; `None` if none came.
fn recv_within(s: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    let end = Instant::now() + within;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        match s.recv(&mut buf) {
            Ok(n) => return Some(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    None
}

/// Whether a datagram containing `marker` arrives on `s` within `within` (at least one
/// look at what is queued); other datagrams are skipped.
fn recv_marker(s: &UdpSocket, marker: &[u8], within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        s.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 2048];
        while let Ok(n) = s.recv(&mut buf) {
            if buf[..n].windows(marker.len()).any(|w| w == marker) {
                s.set_nonblocking(false).expect("blocking");
                return true;
            }
        }
        s.set_nonblocking(false).expect("blocking");
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a datagram is waiting on `s` right now.
fn pending(s: &UdpSocket) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 2048];
    let got = s.recv(&mut buf).is_ok();
    s.set_nonblocking(false).expect("blocking");
    got
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A VXLAN datagram payload: VXLAN header, Ethernet from `src_mac` to `dst_mac`, IPv4/UDP
/// from `src` to `dst` carrying `payload` (UDP checksum 0: none).
fn vxlan_frame(
    vni: u32,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&[0x08, 0x00]);
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Sends `datagram` from `from` (an address of `ns`) to `to`.
fn send_from(ns: &Path, from: Ipv4Addr, to: SocketAddrV4, datagram: Vec<u8>) {
    netns::run_in(ns, move || -> std::io::Result<()> {
        let s = UdpSocket::bind(SocketAddrV4::new(from, 0))?;
        s.send_to(&datagram, to)?;
        Ok(())
    })
    .expect("run_in")
    .expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_only_from_cluster_nodes() {
    let sb = Sandbox::new();
    let node_ns = sb.netns("t50-node");
    let lan_ns = sb.netns("t50-lan");
    // .2 is a cluster node, .3 a stranger on the same underlay
    underlay(
        &node_ns,
        &lan_ns,
        "192.168.90.1/24",
        &["192.168.90.2/24", "192.168.90.3/24"],
    )
    .await;
    let (me, member, stranger) = (
        Ipv4Addr::new(192, 168, 90, 1),
        Ipv4Addr::new(192, 168, 90, 2),
        Ipv4Addr::new(192, 168, 90, 3),
    );
    let host = Net::open(&node_ns).expect("open");
    let task_ns = bridge_and_task(&sb, &host, "t50", 1).await;
    let subnet = net("10.200.1.0/24");
    overlay::ensure_vxlan(
        &host,
        &Vxlan {
            name: "fltvx0".into(),
            vni: VNI,
            port: VXLAN_PORT,
            local: me,
            subnet,
            mtu: 1450,
        },
    )
    .await
    .expect("vxlan");
    let peer_subnet = net("10.200.2.0/24");
    overlay::set_peers(
        &host,
        "fltvx0",
        &[OverlayPeer {
            underlay: member,
            subnet: peer_subnet,
            extra: Vec::new(),
        }],
    )
    .await
    .expect("peers");

    let target = SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 2), 9999);
    let rx = udp_bind(&task_ns, SocketAddr::V4(target));
    // a frame "from a task of node .2" for the task here
    let frame = |payload: &[u8], dst: SocketAddrV4| {
        vxlan_frame(
            VNI,
            overlay::vtep_mac(subnet),
            overlay::vtep_mac(peer_subnet),
            SocketAddrV4::new(Ipv4Addr::new(10, 200, 2, 5), 40000),
            dst,
            payload,
        )
    };
    let vx_to = SocketAddrV4::new(me, VXLAN_PORT);

    // Without rules anyone on the underlay can inject: the attack works.
    send_from(&lan_ns, stranger, vx_to, frame(b"open", target));
    assert_eq!(
        recv_within(&rx, WAIT).as_deref(),
        Some(&b"open"[..]),
        "the crafted frame reaches the task when nothing filters"
    );

    // ... and the LAN host can route into the overlay through the node: the node relays
    // its datagram for a task of node .2 to .2's VXLAN port.
    let lan = Net::open(&lan_ns).expect("lan");
    let lan_if = link::index(&lan, "fltu0").await.expect("idx").expect("if");
    lan.handle()
        .route()
        .add(
            rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(peer_subnet.network(), peer_subnet.prefix_len())
                .gateway(me)
                .output_interface(lan_if)
                .build(),
        )
        .execute()
        .await
        .expect("route");
    let far_task = SocketAddrV4::new(Ipv4Addr::new(10, 200, 2, 7), 5000);
    let member_vx = udp_bind(&lan_ns, SocketAddr::from((member, VXLAN_PORT)));
    send_from(&lan_ns, stranger, far_task, b"relay-open".to_vec());
    assert!(
        recv_marker(&member_vx, b"relay-open", WAIT),
        "the node relays into the overlay when nothing filters"
    );

    let tag = "t50";
    nat::ensure(&host, &rules_for(tag, 1, Some(VXLAN_PORT)))
        .await
        .expect("ensure");
    nat::set_nodes(&host, tag, &[me, member])
        .await
        .expect("nodes");
    let chain = nat::nodes_chain(tag);
    let drop_rule = format!("-A {chain} -j DROP");

    // The stranger's frame is dropped at the VXLAN port ...
    let before = hits(&host, &chain, &drop_rule).await;
    send_from(&lan_ns, stranger, vx_to, frame(b"stranger", target));
    let end = Instant::now() + WAIT;
    while hits(&host, &chain, &drop_rule).await == before {
        if let Some(got) = recv_within(&rx, Duration::from_millis(10)) {
            panic!(
                "a stranger's frame reached the task: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        assert!(Instant::now() < end, "the stranger's frame was not dropped");
    }
    // ... while the member's, sent after it on the same path, arrives, and first.
    send_from(&lan_ns, member, vx_to, frame(b"member", target));
    assert_eq!(
        recv_within(&rx, WAIT).as_deref(),
        Some(&b"member"[..]),
        "a member's frame passes, the stranger's never arrived"
    );

    // Even a member cannot use the overlay to reach the node's own listeners.
    let gw_port = SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 1), 7777);
    let host_rx = udp_bind(&node_ns, "0.0.0.0:7777".parse().expect("addr"));
    let in_chain = nat::input_chain(tag);
    let vx_drop = format!("-A {in_chain} -i fltvx0 -j DROP");
    let before = hits(&host, &in_chain, &vx_drop).await;
    send_from(&lan_ns, member, vx_to, frame(b"to-host", gw_port));
    wait_hit(&host, &in_chain, &vx_drop, before).await;
    assert!(!pending(&host_rx), "the host listener got the frame");

    // Node leaves: its frames are dropped from now on; node list converges without flush.
    nat::set_nodes(&host, tag, &[me]).await.expect("nodes");
    let before = hits(&host, &chain, &drop_rule).await;
    send_from(&lan_ns, member, vx_to, frame(b"left", target));
    wait_hit(&host, &chain, &drop_rule, before).await;
    // ... and comes back.
    nat::set_nodes(&host, tag, &[member, me])
        .await
        .expect("nodes");
    nat::set_nodes(&host, tag, &[member, me])
        .await
        .expect("nodes again");
    send_from(&lan_ns, member, vx_to, frame(b"back", target));
    assert_eq!(recv_within(&rx, WAIT).as_deref(), Some(&b"back"[..]));
    let rules = nat::rules(&host, "filter", tag).await.expect("rules");
    let node_rules: Vec<&String> = rules
        .iter()
        .filter(|r| r.starts_with(&format!("-A {chain}")))
        .collect();
    assert_eq!(
        node_rules,
        vec![
            &format!("-A {chain} -s 192.168.90.2/32 -j RETURN"),
            &format!("-A {chain} -s 192.168.90.1/32 -j RETURN"),
            &drop_rule,
        ],
        "{rules:#?}"
    );
    eprintln!("{}", rules.join("\n"));

    // The LAN host's datagram for node .2's task is not relayed any more.
    let fwd = nat::fwd_chain(tag);
    let pool_drop = format!("-A {fwd} -d 10.200.0.0/16 -j DROP");
    let before = hits(&host, &fwd, &pool_drop).await;
    send_from(&lan_ns, stranger, far_task, b"relay-closed".to_vec());
    let end = Instant::now() + WAIT;
    while hits(&host, &fwd, &pool_drop).await == before {
        assert!(
            !recv_marker(&member_vx, b"relay-closed", Duration::from_millis(10)),
            "the node relayed a LAN host's datagram into the overlay"
        );
        assert!(Instant::now() < end, "the relayed datagram was not dropped");
    }
    assert!(!recv_marker(&member_vx, b"relay-closed", Duration::ZERO));

    // ensure again (agent restart) keeps the list, and does not rewrite unchanged chains
    // (a flush would reset the counters)
    let vx_drops = hits(&host, &in_chain, &vx_drop).await;
    assert!(vx_drops > 0);
    nat::ensure(&host, &rules_for(tag, 1, Some(VXLAN_PORT)))
        .await
        .expect("ensure again");
    assert_eq!(hits(&host, &in_chain, &vx_drop).await, vx_drops);
    send_from(&lan_ns, member, vx_to, frame(b"kept", target));
    assert_eq!(recv_within(&rx, WAIT).as_deref(), Some(&b"kept"[..]));

    nat::teardown(&host, tag).await.expect("teardown");
    assert!(nat::chains(&host, tag).await.expect("chains").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_hosts_cannot_route_into_task_subnets() {
    let sb = Sandbox::new();
    let node_ns = sb.netns("t51-node");
    let lan_ns = sb.netns("t51-lan");
    underlay(&node_ns, &lan_ns, "192.168.91.1/24", &["192.168.91.2/24"]).await;
    let host = Net::open(&node_ns).expect("open");
    let task_ns = bridge_and_task(&sb, &host, "t51", 3).await;
    // a VIP the mesh listens on (the node routes the VIP pool as local addresses)
    let lo = link::index(&host, "lo").await.expect("idx").expect("lo");
    link::ensure_address(&host, lo, net("10.199.0.5/32"))
        .await
        .expect("vip");
    // the LAN host routes both pools through the node
    let lan = Net::open(&lan_ns).expect("lan");
    let lan_if = link::index(&lan, "fltu0").await.expect("idx").expect("if");
    for pool in ["10.200.0.0/16", "10.199.0.0/16"] {
        let p = net(pool);
        lan.handle()
            .route()
            .add(
                rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(p.network(), p.prefix_len())
                    .gateway(Ipv4Addr::new(192, 168, 91, 1))
                    .output_interface(lan_if)
                    .build(),
            )
            .execute()
            .await
            .expect("route");
    }
    let task_port = sock("10.200.3.2:8080");
    let vip_port = sock("10.199.0.5:80");
    let _srv = Server::start(&task_ns, task_port, "unpublished");
    let _vip = Server::start(&node_ns, vip_port, "vip");
    let _out = Server::start(&lan_ns, sock("192.168.91.2:9000"), "{peer}");
    // The node's DNS responder (TCP side) on the bridge gateway: it forwards names outside
    // the cluster, so from the LAN it would be an open resolver.
    let dns_port = sock("10.200.3.1:53");
    let _dns = Server::start(&node_ns, dns_port, "dns");

    // Without rules the LAN host reaches the task's unpublished port, the VIP and the DNS
    // responder.
    assert_eq!(
        fetch_until(&lan_ns, task_port, WAIT).expect("open"),
        "unpublished"
    );
    assert_eq!(fetch_until(&lan_ns, vip_port, WAIT).expect("open"), "vip");
    assert_eq!(fetch_until(&lan_ns, dns_port, WAIT).expect("open"), "dns");

    let tag = "t51";
    nat::ensure(&host, &rules_for(tag, 3, None))
        .await
        .expect("ensure");
    let fwd = nat::fwd_chain(tag);
    let drop_rule = format!("-A {fwd} -o fltbr0 -j DROP");
    let before = hits(&host, &fwd, &drop_rule).await;
    assert!(
        fetch(&lan_ns, task_port, REFUSE).is_err(),
        "the LAN host reached an unpublished task port"
    );
    assert!(hits(&host, &fwd, &drop_rule).await > before, "dropped here");
    let in_chain = nat::input_chain(tag);
    let vip_drop = format!("-A {in_chain} -d 10.199.0.0/16 -j DROP");
    let before = hits(&host, &in_chain, &vip_drop).await;
    assert!(
        fetch(&lan_ns, vip_port, REFUSE).is_err(),
        "the LAN host reached a VIP"
    );
    assert!(hits(&host, &in_chain, &vip_drop).await > before);
    let dns_drop = format!("-A {in_chain} -d 10.200.3.1/32 -p tcp -m tcp --dport 53 -j DROP");
    let before = hits(&host, &in_chain, &dns_drop).await;
    assert!(
        fetch(&lan_ns, dns_port, REFUSE).is_err(),
        "the LAN host reached the node's DNS responder"
    );
    assert!(hits(&host, &in_chain, &dns_drop).await > before);

    // What keeps working: the task goes out (masqueraded) and gets its replies, the node
    // (the mesh) reaches the task and the VIP, the task reaches the VIP.
    assert_eq!(
        fetch_until(&task_ns, sock("192.168.91.2:9000"), WAIT).expect("task -> outside"),
        "192.168.91.1"
    );
    assert_eq!(
        fetch_until(&node_ns, task_port, WAIT).expect("node -> task"),
        "unpublished"
    );
    assert_eq!(
        fetch_until(&node_ns, vip_port, WAIT).expect("node -> vip"),
        "vip"
    );
    assert_eq!(
        fetch_until(&task_ns, vip_port, WAIT).expect("task -> vip"),
        "vip"
    );
    assert_eq!(
        fetch_until(&task_ns, dns_port, WAIT).expect("task -> dns"),
        "dns"
    );
    assert_eq!(
        fetch_until(&node_ns, dns_port, WAIT).expect("node -> dns"),
        "dns"
    );
    let filt = nat::rules(&host, "filter", tag).await.expect("rules");
    eprintln!("{}", filt.join("\n"));
    nat::teardown(&host, tag).await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_cannot_reach_host_listeners() {
    let sb = Sandbox::new();
    let node_ns = sb.netns("t52-node");
    let host = Net::open(&node_ns).expect("open");
    let task_ns = bridge_and_task(&sb, &host, "t52", 4).await;
    // the node's own address (as on the underlay)
    let lo = link::index(&host, "lo").await.expect("idx").expect("lo");
    link::ensure_address(&host, lo, net("192.168.92.1/32"))
        .await
        .expect("addr");
    let gw = Ipv4Addr::new(10, 200, 4, 1);
    // the API (all addresses), a published port (all addresses), the DNS responder (UDP
    // and TCP on the gateway)
    let _api = Server::start(&node_ns, sock("0.0.0.0:4440"), "api");
    let _published = Server::start(&node_ns, sock("0.0.0.0:8080"), "published");
    let _dns_tcp = Server::start(&node_ns, sock("10.200.4.1:53"), "dns-tcp");
    let dns_udp = udp_bind(&node_ns, sock("10.200.4.1:53"));
    let dns = std::thread::spawn(move || {
        // answers every query with "answer:" + the query, until dropped by the test's end
        let mut buf = [0u8; 512];
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if let Ok((n, peer)) = dns_udp.recv_from(&mut buf) {
                let mut reply = b"answer:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = dns_udp.send_to(&reply, peer);
                if &buf[..n] == b"stop" {
                    return;
                }
            }
        }
    });
    let query = |q: &'static [u8]| -> Option<Vec<u8>> {
        let task_ns = task_ns.clone();
        netns::run_in(&task_ns, move || -> std::io::Result<Option<Vec<u8>>> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect("10.200.4.1:53")?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let end = Instant::now() + WAIT;
            let mut buf = [0u8; 512];
            while Instant::now() < end {
                s.send(q)?;
                if let Ok(n) = s.recv(&mut buf) {
                    return Ok(Some(buf[..n].to_vec()));
                }
            }
            Ok(None)
        })
        .expect("run_in")
        .expect("udp")
    };
    let api_gw = SocketAddr::from((gw, 4440));
    let api_node = sock("192.168.92.1:4440");
    let published = SocketAddr::from((gw, 8080));

    // Without rules the task reaches the API on the gateway and on the node address.
    assert_eq!(fetch_until(&task_ns, api_gw, WAIT).expect("open"), "api");
    assert_eq!(fetch_until(&task_ns, api_node, WAIT).expect("open"), "api");

    let tag = "t52";
    nat::ensure(&host, &rules_for(tag, 4, None))
        .await
        .expect("ensure");
    nat::set_published(&host, tag, &[(L4::Tcp, 8080), (L4::Udp, 8080)])
        .await
        .expect("published");
    let pub_chain = nat::published_chain(tag);
    let drop_rule = format!("-A {pub_chain} -j DROP");
    let before = hits(&host, &pub_chain, &drop_rule).await;
    assert!(
        fetch(&task_ns, api_gw, REFUSE).is_err(),
        "the task reached the API on the gateway"
    );
    assert!(
        fetch(&task_ns, api_node, REFUSE).is_err(),
        "the task reached the API on the node address"
    );
    assert!(hits(&host, &pub_chain, &drop_rule).await >= before + 2);

    // DNS (UDP and TCP), the published port, ICMP to the gateway: still there.
    assert_eq!(query(b"q1").as_deref(), Some(&b"answer:q1"[..]));
    assert_eq!(
        fetch_until(&task_ns, SocketAddr::from((gw, 53)), WAIT).expect("dns tcp"),
        "dns-tcp"
    );
    assert_eq!(
        fetch_until(&task_ns, published, WAIT).expect("published"),
        "published"
    );
    assert!(
        common::ping(&task_ns, "10.200.4.1"),
        "task pings the gateway"
    );

    // The port is withdrawn: closed to tasks; published again: open; idempotent.
    nat::set_published(&host, tag, &[(L4::Udp, 8080)])
        .await
        .expect("unpublish");
    assert!(fetch(&task_ns, published, REFUSE).is_err());
    for _ in 0..2 {
        nat::set_published(&host, tag, &[(L4::Tcp, 8080), (L4::Udp, 8080)])
            .await
            .expect("publish");
    }
    assert_eq!(
        fetch_until(&task_ns, published, WAIT).expect("published again"),
        "published"
    );
    let pub_rules: Vec<String> = nat::rules(&host, "filter", tag)
        .await
        .expect("rules")
        .into_iter()
        .filter(|r| r.starts_with(&format!("-A {pub_chain}")))
        .collect();
    assert_eq!(pub_rules.len(), 3, "{pub_rules:?}");

    // IPv6: the bridge has none, so host listeners on [::] are not reachable from tasks by
    // the bridge's link-local address.
    let v6 = host
        .run(|| {
            (
                std::fs::read_to_string("/proc/sys/net/ipv6/conf/fltbr0/disable_ipv6"),
                std::fs::read_to_string("/proc/net/if_inet6"),
            )
        })
        .await
        .expect("run");
    assert_eq!(v6.0.expect("sysctl").trim(), "1");
    assert!(
        !v6.1.expect("if_inet6").contains("fltbr0"),
        "the bridge has an IPv6 address"
    );

    assert_eq!(query(b"stop").as_deref(), Some(&b"answer:stop"[..]));
    dns.join().expect("dns thread");
    nat::teardown(&host, tag).await.expect("teardown");
}
