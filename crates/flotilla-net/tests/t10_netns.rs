//! Namespaces: create/remove/run_in, loopback up, sysctls, idempotence, no leftovers.

mod common;

use common::{sock, Sandbox, Server};
use flotilla_net::{netns, read_sysctl, Net};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_run_in_remove() {
    let sb = Sandbox::new();
    let p = sb.netns("t10a");
    assert!(netns::is_netns(&p));
    // idempotent
    assert_eq!(netns::create(&sb.netns_dir(), "t10a").expect("again"), p);

    // sysctls are per namespace
    let inside = netns::run_in(&p, || read_sysctl("net.ipv4.ip_unprivileged_port_start"))
        .expect("run_in")
        .expect("read");
    assert_eq!(inside, "0");
    let range = netns::run_in(&p, || read_sysctl("net.ipv4.ping_group_range"))
        .expect("run_in")
        .expect("read");
    assert_eq!(
        range.split_whitespace().collect::<Vec<_>>(),
        ["0", "2147483647"]
    );

    // a different namespace from ours: only lo in it, and lo is up (loopback TCP works)
    let net = Net::open(&p).expect("open");
    let names = flotilla_net::link::names(&net).await.expect("names");
    assert_eq!(names, vec!["lo".to_string()]);
    let _srv = Server::start(&p, sock("127.0.0.1:18080"), "lo-ok");
    let got = common::fetch_until(
        &p,
        sock("127.0.0.1:18080"),
        std::time::Duration::from_secs(5),
    )
    .expect("loopback connect");
    assert_eq!(got, "lo-ok");
    drop(net);

    netns::remove(&p).expect("remove");
    assert!(!p.exists());
    netns::remove(&p).expect("remove is idempotent");
    assert!(netns::list(&sb.netns_dir()).expect("list").is_empty());
    assert!(netns::create(&sb.netns_dir(), "../evil").is_err());
}
