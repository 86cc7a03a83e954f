//! The driver contract suite against runc via our shim.
mod common;
use flotilla_runtime::testing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_runc_passes_the_contract_suite() {
    if !common::can_run() {
        return;
    }
    let env = common::Env::new("contract");
    let res = testing::contract_suite(&env.runtime, &env.image, &env.prefix).await;
    if let Err(e) = &res {
        eprintln!("contract failed: {e}");
    }
    res.expect("contract suite");
    assert!(common::mounts_under(&env.root).is_empty(), "no mounts left");
}
