//! Overlay: two "hosts" (namespaces joined by a veth underlay), each with bridge, task and
//! VXLAN; and several nodes sharing one namespace.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use common::{fetch, fetch_until, net, sock, Sandbox, Server};
use flotilla_net::overlay::{self, OverlayPeer, Vxlan};
use flotilla_net::task::{self, TaskLink};
use flotilla_net::{bridge, link, nat, Error, Net};

const WAIT: Duration = Duration::from_secs(5);

struct Node {
    host: Net,
    task_ns: std::path::PathBuf,
    subnet: ipnet::Ipv4Net,
}

async fn node(sb: &Sandbox, host_ns: &Path, name: &str, n: u8, underlay: Ipv4Addr) -> Node {
    let host = Net::open(host_ns).expect("open host");
    let subnet = net(&format!("10.200.{n}.0/24"));
    bridge::ensure_bridge(&host, "fltbr0", net(&format!("10.200.{n}.1/24")), 1450)
        .await
        .expect("bridge");
    overlay::ensure_vxlan(
        &host,
        &Vxlan {
            name: "fltvx0".into(),
            vni: 1,
            port: overlay::DEFAULT_PORT,
            local: underlay,
            subnet,
            mtu: 1450,
        },
    )
    .await
    .expect("vxlan");
    let task_ns = sb.netns(&format!("{name}-task"));
    task::attach(
        &host,
        &TaskLink {
            netns: task_ns.clone(),
            host_ifname: "fltv0".into(),
            bridge: "fltbr0".into(),
            addr: net(&format!("10.200.{n}.2/24")),
            gateway: Ipv4Addr::new(10, 200, n, 1),
            mtu: 1450,
        },
    )
    .await
    .expect("attach");
    Node {
        host,
        task_ns,
        subnet,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_over_vxlan() {
    let sb = Sandbox::new();
    let a_ns = sb.netns("t30-a");
    let b_ns = sb.netns("t30-b");
    let (ua, ub) = (
        Ipv4Addr::new(192, 168, 77, 1),
        Ipv4Addr::new(192, 168, 77, 2),
    );
    {
        // underlay: a veth between the two host namespaces
        let a = Net::open(&a_ns).expect("a");
        let b = Net::open(&b_ns).expect("b");
        link::create_veth(&a, "fltu0", "fltu0", &b_ns, 1500)
            .await
            .expect("underlay");
        for (n, addr) in [(&a, "192.168.77.1/24"), (&b, "192.168.77.2/24")] {
            let idx = link::index(n, "fltu0").await.expect("idx").expect("exists");
            link::ensure_address(n, idx, net(addr)).await.expect("addr");
            link::set_up(n, "fltu0").await.expect("up");
        }
    }
    let a = node(&sb, &a_ns, "t30-a", 1, ua).await;
    let b = node(&sb, &b_ns, "t30-b", 2, ub).await;
    let peers = [
        OverlayPeer {
            underlay: ua,
            subnet: a.subnet,
            extra: Vec::new(),
        },
        OverlayPeer {
            underlay: ub,
            subnet: b.subnet,
            extra: Vec::new(),
        },
    ];
    for n in [&a, &b] {
        let applied = overlay::set_peers(&n.host, "fltvx0", &peers)
            .await
            .expect("peers");
        // its own subnet is on its bridge
        assert_eq!(applied.skipped_local, vec![n.subnet]);
        assert_eq!(applied.routed.len(), 1);
    }
    // idempotent
    overlay::set_peers(&a.host, "fltvx0", &peers)
        .await
        .expect("peers again");
    let st = overlay::state(&a.host, "fltvx0").await.expect("state");
    assert_eq!(st.routes, vec![b.subnet]);
    assert_eq!(st.neighbours, vec![Ipv4Addr::new(10, 200, 2, 0)]);
    assert_eq!(st.fdb, vec![(overlay::vtep_mac(b.subnet), Some(ub))]);

    let _srv = Server::start(&b.task_ns, sock("10.200.2.2:8080"), "from-b");
    assert_eq!(
        fetch_until(&a.task_ns, sock("10.200.2.2:8080"), WAIT).expect("a task -> b task"),
        "from-b"
    );
    assert!(
        common::ping(&b.task_ns, "10.200.1.2"),
        "b task pings a task"
    );

    // the source is kept across the overlay, also with NAT on, and the host itself (where
    // the L4 proxy runs) reaches remote tasks too
    nat::ensure(
        &a.host,
        &nat::NatRules {
            tag: "t30".into(),
            subnet: a.subnet,
            bridge: "fltbr0".into(),
            overlay: Some("fltvx0".into()),
            cluster_pool: Some(net("10.200.0.0/16")),
            outbound_nat: true,
            trusted_ifaces: vec![],
            vxlan_port: Some(overlay::DEFAULT_PORT),
            dns: None,
            vip_pool: None,
        },
    )
    .await
    .expect("nat");
    // the VXLAN port takes packets from the cluster's nodes only
    nat::set_nodes(&a.host, "t30", &[ua, ub])
        .await
        .expect("nodes");
    assert!(
        common::ping(&b.task_ns, "10.200.1.2"),
        "b task pings a task through a's boundary"
    );
    let _who = Server::start(&b.task_ns, sock("10.200.2.2:8081"), "{peer}");
    assert_eq!(
        fetch_until(&a.task_ns, sock("10.200.2.2:8081"), WAIT).expect("task -> task"),
        "10.200.1.2"
    );
    assert_eq!(
        fetch_until(&a_ns, sock("10.200.2.2:8081"), WAIT).expect("host -> remote task"),
        "10.200.1.0",
        "host traffic leaves with the vxlan address"
    );
    // outbound traffic (to B's underlay address, outside the pool) is masqueraded
    let _out = Server::start(&b_ns, sock("192.168.77.2:9000"), "{peer}");
    assert_eq!(
        fetch_until(&a.task_ns, sock("192.168.77.2:9000"), WAIT).expect("task -> outside"),
        "192.168.77.1"
    );

    // peers withdrawn: routes gone, traffic fails
    for n in [&a, &b] {
        let applied = overlay::set_peers(&n.host, "fltvx0", &[])
            .await
            .expect("no peers");
        assert_eq!(applied.removed.len(), 1, "{applied:?}");
        let again = overlay::set_peers(&n.host, "fltvx0", &[])
            .await
            .expect("no peers again");
        assert!(again.removed.is_empty());
    }
    assert!(fetch(
        &a.task_ns,
        sock("10.200.2.2:8080"),
        Duration::from_millis(500)
    )
    .is_err());
    let st = overlay::state(&a.host, "fltvx0").await.expect("state");
    assert_eq!(st, overlay::OverlayState::default());

    // and back (convergence both ways)
    for n in [&a, &b] {
        overlay::set_peers(&n.host, "fltvx0", &peers)
            .await
            .expect("peers back");
    }
    assert_eq!(
        fetch_until(&a.task_ns, sock("10.200.2.2:8080"), WAIT).expect("again"),
        "from-b"
    );

    // ensure_vxlan is idempotent and keeps the device
    let before = link::index(&a.host, "fltvx0").await.expect("idx");
    overlay::ensure_vxlan(
        &a.host,
        &Vxlan {
            name: "fltvx0".into(),
            vni: 1,
            port: overlay::DEFAULT_PORT,
            local: ua,
            subnet: a.subnet,
            mtu: 1450,
        },
    )
    .await
    .expect("vxlan again");
    assert_eq!(link::index(&a.host, "fltvx0").await.expect("idx"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_namespace() {
    let sb = Sandbox::new();
    let shared = sb.netns("t31-host");
    let host = Net::open(&shared).expect("open");
    let lo = link::index(&host, "lo").await.expect("idx").expect("lo");
    for a in ["192.168.78.1/32", "192.168.78.2/32"] {
        link::ensure_address(&host, lo, net(a)).await.expect("addr");
    }
    let n1 = node(&sb, &shared, "t31-n1", 11, Ipv4Addr::new(192, 168, 78, 1)).await;
    let n2_peer = OverlayPeer {
        underlay: Ipv4Addr::new(192, 168, 78, 2),
        subnet: net("10.200.12.0/24"),
        extra: Vec::new(),
    };
    // node 1 hears of node 2 before node 2 made its bridge: an overlay route is installed,
    // with a metric that lets the bridge's connected route win once it appears
    let applied = overlay::set_peers(&n1.host, "fltvx0", std::slice::from_ref(&n2_peer))
        .await
        .expect("peers early");
    assert_eq!(applied.routed, vec![net("10.200.12.0/24")]);

    // node 2: own bridge; the kernel refuses a second vxlan with the same vni/port
    bridge::ensure_bridge(&host, "fltbr2", net("10.200.12.1/24"), 1450)
        .await
        .expect("bridge 2");
    let err = overlay::ensure_vxlan(
        &host,
        &Vxlan {
            name: "fltvx2".into(),
            vni: 1,
            port: overlay::DEFAULT_PORT,
            local: Ipv4Addr::new(192, 168, 78, 2),
            subnet: net("10.200.12.0/24"),
            mtu: 1450,
        },
    )
    .await
    .expect_err("same vni and port");
    assert!(
        matches!(err, Error::VxlanInUse { vni: 1, port: 8472 }),
        "{err}"
    );
    assert!(link::index(&host, "fltvx2").await.expect("idx").is_none());

    let t2 = sb.netns("t31-n2-task");
    task::attach(
        &host,
        &TaskLink {
            netns: t2.clone(),
            host_ifname: "fltv2".into(),
            bridge: "fltbr2".into(),
            addr: net("10.200.12.2/24"),
            gateway: Ipv4Addr::new(10, 200, 12, 1),
            mtu: 1450,
        },
    )
    .await
    .expect("attach 2");

    // before node 1 hears again: its stale overlay route loses against bridge 2's route
    let _srv = Server::start(&t2, sock("10.200.12.2:8080"), "n2");
    assert_eq!(
        fetch_until(&n1.task_ns, sock("10.200.12.2:8080"), WAIT).expect("n1 task -> n2 task"),
        "n2"
    );

    // node 1 is told about node 2 again and skips it: the subnet is on bridge 2 now, and
    // the overlay route goes
    let applied = overlay::set_peers(&n1.host, "fltvx0", &[n2_peer])
        .await
        .expect("peers");
    assert_eq!(applied.skipped_local, vec![net("10.200.12.0/24")]);
    assert!(applied.routed.is_empty());
    assert_eq!(applied.removed, vec![net("10.200.12.0/24")]);
    assert_eq!(
        overlay::state(&n1.host, "fltvx0").await.expect("state"),
        overlay::OverlayState::default()
    );
    assert_eq!(
        fetch(&n1.task_ns, sock("10.200.12.2:8080"), WAIT).expect("still"),
        "n2"
    );
}
