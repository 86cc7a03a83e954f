//! `cleanup::remove_all` removes every kind of object a node makes, and nothing else.

mod common;

use std::net::Ipv4Addr;

use common::{net, Sandbox};
use flotilla_net::cleanup::{self, Owned};
use flotilla_net::overlay::{self, Vxlan};
use flotilla_net::task::{self, TaskLink};
use flotilla_net::{bridge, link, nat, netns, Error, Net};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_all_leaves_nothing() {
    let sb = Sandbox::new();
    let host_ns = sb.netns("t40-host");
    let host = Net::open(&host_ns).expect("open");
    let node_dir = sb.dir().join("node-netns");
    let subnet = net("10.200.40.0/24");
    bridge::ensure_bridge(&host, "fltbr0", net("10.200.40.1/24"), 1500)
        .await
        .expect("bridge");
    let lo = link::index(&host, "lo").await.expect("idx").expect("lo");
    link::ensure_address(&host, lo, net("192.168.79.1/32"))
        .await
        .expect("addr");
    overlay::ensure_vxlan(
        &host,
        &Vxlan {
            name: "fltvx0".into(),
            vni: 7,
            port: overlay::DEFAULT_PORT,
            local: Ipv4Addr::new(192, 168, 79, 1),
            subnet,
            mtu: 1450,
        },
    )
    .await
    .expect("vxlan");
    for i in 0..2u8 {
        let p = sb.netns_in("node-netns", &format!("t40-task{i}"));
        task::attach(
            &host,
            &TaskLink {
                netns: p,
                host_ifname: format!("fltv{i}"),
                bridge: "fltbr0".into(),
                addr: net(&format!("10.200.40.{}/24", i + 2)),
                gateway: Ipv4Addr::new(10, 200, 40, 1),
                mtu: 1500,
            },
        )
        .await
        .expect("attach");
    }
    nat::ensure(
        &host,
        &nat::NatRules {
            tag: "t40".into(),
            subnet,
            bridge: "fltbr0".into(),
            overlay: Some("fltvx0".into()),
            cluster_pool: None,
            outbound_nat: true,
            trusted_ifaces: vec![],
            vxlan_port: None,
            dns: None,
            vip_pool: None,
        },
    )
    .await
    .expect("nat");
    // something that is not ours must survive
    bridge::ensure_bridge(&host, "other0", net("10.99.0.1/24"), 1500)
        .await
        .expect("other bridge");

    let owned = Owned {
        link_prefixes: vec!["fltv".into(), "fltbr".into()],
        netns_dir: Some(node_dir.clone()),
        iptables_tags: vec!["t40".into()],
    };
    let mut left = cleanup::leftovers(&host, &owned).await.expect("leftovers");
    left.sort();
    assert_eq!(left.len(), 2 + 1 + 1 + 2 + 7, "{left:?}"); // fltv0/1, fltvx0, fltbr0, 2 netns, 7 chains
    let removed = cleanup::remove_all(&host, &owned)
        .await
        .expect("remove_all");
    assert_eq!(removed.len(), left.len(), "{removed:?}");
    assert_eq!(
        cleanup::leftovers(&host, &owned).await.expect("leftovers"),
        Vec::<String>::new()
    );
    assert!(netns::list(&node_dir).expect("list").is_empty());
    let mut names = link::names(&host).await.expect("names");
    names.sort();
    assert_eq!(names, vec!["lo".to_string(), "other0".to_string()]);
    // idempotent
    assert!(cleanup::remove_all(&host, &owned)
        .await
        .expect("again")
        .is_empty());

    let bad = Owned {
        link_prefixes: vec!["e".into()],
        ..Owned::default()
    };
    assert!(matches!(
        cleanup::remove_all(&host, &bad).await,
        Err(Error::Invalid(_))
    ));
}
