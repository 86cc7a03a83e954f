//! One node in its own "host" namespace: bridge, two tasks, NAT chains, teardown, and
//! re-attach after an agent restart.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{fetch, fetch_until, net, ping, sock, Sandbox, Server};
use flotilla_net::cleanup::{self, Owned};
use flotilla_net::task::{self, TaskLink};
use flotilla_net::{bridge, link, nat, netns, Net};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_tasks_nat_and_teardown() {
    let sb = Sandbox::new();
    let host_ns = sb.netns("t20-host");
    let host = Net::open(&host_ns).expect("open host");
    let gw = net("10.200.5.1/24");

    let br = bridge::ensure_bridge(&host, "fltbr0", gw, 1500)
        .await
        .expect("bridge");
    assert_eq!(
        bridge::ensure_bridge(&host, "fltbr0", gw, 1500)
            .await
            .expect("bridge again"),
        br
    );
    let fwd = host
        .run(|| flotilla_net::read_sysctl("net.ipv4.ip_forward"))
        .await
        .expect("run")
        .expect("sysctl");
    assert_eq!(fwd, "1");

    let tasks = ["t20-a", "t20-b"];
    let mut paths = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let p = sb.netns(t);
        let link = TaskLink {
            netns: p.clone(),
            host_ifname: task::host_ifname("fltv", t),
            bridge: "fltbr0".into(),
            addr: net(&format!("10.200.5.{}/24", i + 2)),
            gateway: Ipv4Addr::new(10, 200, 5, 1),
            mtu: 1500,
        };
        task::attach(&host, &link).await.expect("attach");
        assert_eq!(link.host_ifname.len(), 12);
        paths.push((p, link));
    }

    // task a -> task b, task a -> gateway (TCP), and ICMP to the gateway
    let _b = Server::start(&paths[1].0, sock("10.200.5.3:8080"), "from-b");
    let _gw = Server::start(&host_ns, sock("10.200.5.1:8081"), "from-host");
    assert_eq!(
        fetch_until(&paths[0].0, sock("10.200.5.3:8080"), WAIT).expect("a->b"),
        "from-b"
    );
    assert_eq!(
        fetch_until(&paths[0].0, sock("10.200.5.1:8081"), WAIT).expect("a->gw"),
        "from-host"
    );
    assert!(ping(&paths[1].0, "10.200.5.1"), "b pings the gateway");
    assert!(ping(&paths[1].0, "10.200.5.2"), "b pings a");

    // NAT chains: present, idempotent, then gone
    let rules = nat::NatRules {
        tag: "t20".into(),
        subnet: net("10.200.5.0/24"),
        bridge: "fltbr0".into(),
        overlay: Some("fltvx0".into()),
        cluster_pool: Some(net("10.200.0.0/16")),
        outbound_nat: true,
        trusted_ifaces: vec![],
        vxlan_port: None,
        dns: None,
        vip_pool: None,
    };
    nat::ensure(&host, &rules).await.expect("nat");
    nat::ensure(&host, &rules).await.expect("nat again");
    let natr = nat::rules(&host, "nat", "t20").await.expect("rules");
    assert!(
        natr.contains(&"-A POSTROUTING -j FLT-t20-POST".to_string()),
        "{natr:?}"
    );
    assert!(
        natr.contains(&"-A FLT-t20-POST -s 10.200.5.0/24 -j MASQUERADE".to_string()),
        "{natr:?}"
    );
    // -N (POST and NETS), jump, the jump to NETS and 4 rules: no duplicates
    assert_eq!(natr.len(), 8, "{natr:?}");
    let filt = nat::rules(&host, "filter", "t20").await.expect("rules");
    assert!(
        filt.contains(&"-A FORWARD -j FLT-t20-FWD".to_string()),
        "{filt:?}"
    );
    // FWD: -N, jump, the jump to ISO and 6 rules; IN: -N, jump, 6 rules; NODE and PUB: -N and
    // DROP each; ISO: -N (empty until `set_networks`)
    assert_eq!(filt.len(), 9 + 8 + 2 + 2 + 1, "{filt:?}");
    // outbound NAT off: converges to no MASQUERADE
    let off = nat::NatRules {
        outbound_nat: false,
        ..rules.clone()
    };
    nat::ensure(&host, &off).await.expect("nat off");
    let natr = nat::rules(&host, "nat", "t20").await.expect("rules");
    assert!(!natr.iter().any(|r| r.contains("MASQUERADE")), "{natr:?}");

    let owned = Owned {
        link_prefixes: vec!["fltv".into(), "fltbr".into()],
        netns_dir: Some(sb.netns_dir()),
        iptables_tags: vec!["t20".into()],
    };
    let left = cleanup::leftovers(&host, &owned).await.expect("leftovers");
    assert!(
        left.iter().any(|l| l == "iptables nat/FLT-t20-POST"),
        "{left:?}"
    );

    nat::teardown(&host, "t20").await.expect("teardown");
    nat::teardown(&host, "t20").await.expect("teardown again");
    assert!(nat::rules(&host, "nat", "t20").await.expect("r").is_empty());
    assert!(nat::rules(&host, "filter", "t20")
        .await
        .expect("r")
        .is_empty());

    // task stop: detach + remove; host side keeps nothing of the task
    for (p, l) in &paths {
        assert!(task::detach(&host, &l.host_ifname).await.expect("detach"));
        assert!(!task::detach(&host, &l.host_ifname)
            .await
            .expect("detach again"));
        netns::remove(p).expect("remove netns");
    }
    drop(_b);
    assert!(fetch(
        &host_ns,
        sock("10.200.5.3:8080"),
        Duration::from_millis(300)
    )
    .is_err());
    assert!(bridge::delete_link(&host, "fltbr0")
        .await
        .expect("delete bridge"));
    let owned = Owned {
        netns_dir: Some(sb.netns_dir().join("none")),
        ..owned
    };
    assert_eq!(
        cleanup::leftovers(&host, &owned).await.expect("leftovers"),
        Vec::<String>::new()
    );
    assert_eq!(
        link::names(&host).await.expect("names"),
        vec!["lo".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_after_restart_is_idempotent() {
    let sb = Sandbox::new();
    let host_ns = sb.netns("t21-host");
    let p = sb.netns("t21-task");
    let gw = net("10.200.6.1/24");
    let l = TaskLink {
        netns: p.clone(),
        host_ifname: "fltv-t21".into(),
        bridge: "fltbr1".into(),
        addr: net("10.200.6.9/24"),
        gateway: Ipv4Addr::new(10, 200, 6, 1),
        mtu: 1400,
    };
    {
        let host = Net::open(&host_ns).expect("open");
        bridge::ensure_bridge(&host, "fltbr1", gw, 1400)
            .await
            .expect("bridge");
        task::attach(&host, &l).await.expect("attach");
    }
    let _srv = Server::start(&p, sock("10.200.6.9:8080"), "task");
    assert_eq!(
        fetch_until(&host_ns, sock("10.200.6.9:8080"), WAIT).expect("first"),
        "task"
    );

    // "agent restart": new handles, same calls
    let host = Net::open(&host_ns).expect("open again");
    let idx_before = link::index(&host, "fltv-t21").await.expect("idx");
    bridge::ensure_bridge(&host, "fltbr1", gw, 1400)
        .await
        .expect("bridge again");
    task::attach(&host, &l).await.expect("attach again");
    assert_eq!(
        link::index(&host, "fltv-t21").await.expect("idx"),
        idx_before,
        "veth kept"
    );
    assert_eq!(
        fetch(&host_ns, sock("10.200.6.9:8080"), WAIT).expect("still"),
        "task"
    );

    // a half-made attach (eth0 gone) is redone
    let inner = Net::open(&p).expect("open task");
    assert!(link::delete(&inner, "eth0").await.expect("delete eth0"));
    assert!(
        link::index(&host, "fltv-t21").await.expect("idx").is_none(),
        "peer went too"
    );
    task::attach(&host, &l).await.expect("attach after damage");
    // the server socket is bound to 10.200.6.9 on the old eth0: a fresh one is needed
    drop(_srv);
    let _srv = Server::start(&p, sock("10.200.6.9:8081"), "task2");
    assert_eq!(
        fetch_until(&host_ns, sock("10.200.6.9:8081"), WAIT).expect("redone"),
        "task2"
    );
    let names = link::names(&inner).await.expect("names");
    assert_eq!(names.len(), 2, "{names:?}");
}
