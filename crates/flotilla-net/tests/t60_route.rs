//! Local (AnyIP) routes: add, find, make the pool bindable, remove (idempotently), and one
//! node's metric leaves another node's route for the same pool alone.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::{net, sock, Sandbox, Server};
use flotilla_net::{netns, route, Net};

/// Whether a TCP listener can bind `addr` inside `ns` (only local addresses can be bound).
fn bindable(ns: &std::path::Path, addr: &str) -> bool {
    let addr = sock(addr);
    netns::run_in(ns, move || TcpListener::bind(addr).is_ok()).expect("run_in")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_route_add_find_remove() {
    let sb = Sandbox::new();
    let ns = sb.netns("t60-host");
    let host = Net::open(&ns).expect("open");
    let pool = net("10.199.60.0/29");
    let (mine, other) = (1001, 1002);

    assert!(!route::local_exists(&host, pool, mine).await);
    assert!(!bindable(&ns, "10.199.60.5:18060"), "not local before");
    assert!(!route::remove_local(&host, pool, mine)
        .await
        .expect("remove missing"));

    route::ensure_local(&host, pool, mine).await.expect("add");
    route::ensure_local(&host, pool, mine)
        .await
        .expect("add is idempotent");
    assert!(route::local_exists(&host, pool, mine).await);
    assert!(!route::local_exists(&host, pool, other).await);
    assert!(!route::local_exists(&host, net("10.199.60.0/28"), mine).await);

    // Every address of the pool is local now: a listener binds one and answers.
    let srv = Server::start(&ns, sock("10.199.60.5:18060"), "anyip");
    let got = common::fetch_until(&ns, sock("10.199.60.5:18060"), Duration::from_secs(5))
        .expect("connect to a pool address");
    assert_eq!(got, "anyip");
    drop(srv);

    // A second node in the same namespace owns its own entry.
    route::ensure_local(&host, pool, other)
        .await
        .expect("add other");
    assert!(route::remove_local(&host, pool, mine)
        .await
        .expect("remove"));
    assert!(!route::local_exists(&host, pool, mine).await);
    assert!(route::local_exists(&host, pool, other).await, "other kept");
    assert!(!route::remove_local(&host, pool, mine)
        .await
        .expect("remove again"));

    assert!(route::remove_local(&host, pool, other)
        .await
        .expect("remove other"));
    assert!(!route::local_exists(&host, pool, other).await);
    assert!(!bindable(&ns, "10.199.60.5:18061"), "not local after");
}
