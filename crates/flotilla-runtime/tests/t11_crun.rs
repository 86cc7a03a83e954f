//! The same contract suite with `--runtime crun` (skipped loudly when crun is not installed).
//! On a hybrid cgroup host the shim hides the cgroup2 mount from crun in a private mount namespace.
mod common;
use flotilla_runtime::{testing, Runtime};
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_crun_passes_the_contract_suite() {
    if !common::can_run() {
        return;
    }
    let Some(crun) = ["/usr/bin/crun", "/usr/local/bin/crun"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        eprintln!("!!!!! SKIPPING t11_crun: crun not installed (apt-get install crun) !!!!!");
        return;
    };
    let prefix = common::unique("crun");
    let root = PathBuf::from("/tmp").join(format!("flotilla-rt-{prefix}"));
    let mut cfg = common::config(&root);
    cfg.runtime_bin = crun;
    let runtime = Runtime::new(cfg).expect("runtime");
    let image = testing::import_busybox(runtime.images(), "busybox:test").expect("image");
    let res = testing::contract_suite(&runtime, &image, &prefix).await;
    assert!(common::mounts_under(&root).is_empty());
    let _ = std::fs::remove_dir_all(&root);
    res.expect("contract suite with crun");
}
