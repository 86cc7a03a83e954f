//! 50 containers started and removed leave no mounts, cgroups, shims or state behind.
mod common;
use common::Env;
use flotilla_runtime::testing::spec;
use flotilla_runtime::{ContainerStatus, RuntimeDriver};
use futures::stream::{self, StreamExt};

fn rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_fifty_containers_leave_nothing_behind() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("fifty");
    let rt = &env.runtime;
    let image = env.image.as_str();
    let ids: Vec<String> = (0..50).map(|i| env.id(&format!("c{i}"))).collect();
    let results: Vec<_> = stream::iter(ids.iter().cloned())
        .map(|id| async move {
            rt.create(spec(&id, image, &["sh", "-c", "echo up; sleep 300"]))
                .await?;
            rt.start(&id).await?;
            rt.state(&id).await
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut states = Vec::new();
    for r in results {
        states.push(r.expect("create/start"));
    }
    assert!(states.iter().all(|s| s.status == ContainerStatus::Running));
    let rss: Vec<u64> = states.iter().filter_map(|s| rss_kib(s.shim_pid)).collect();
    let max = rss.iter().max().copied().unwrap_or(0);
    eprintln!(
        "shim RSS over 50 shims: max {max} KiB, mean {} KiB",
        rss.iter().sum::<u64>() / rss.len().max(1) as u64
    );
    eprintln!(
        "test process (agent) RSS with 50 running containers: {} KiB",
        rss_kib(std::process::id() as i32).unwrap_or(0)
    );
    assert_eq!(common::mounts_under(&env.root).len(), 50);

    stream::iter(ids.iter().cloned())
        .map(|id| async move { rt.remove(&id, false).await })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .for_each(|r| r.expect("remove"));

    assert!(
        common::mounts_under(&env.root).is_empty(),
        "mounts left: {:?}",
        common::mounts_under(&env.root)
    );
    for id in &ids {
        assert!(
            common::leftover_cgroups(id).is_empty(),
            "cgroup left for {id}"
        );
    }
    let shims = flotilla_runtime::testing::wait_for(std::time::Duration::from_secs(10), || {
        let alive: Vec<i32> = states
            .iter()
            .map(|s| s.shim_pid)
            .filter(|p| common::alive(*p))
            .collect();
        async move { alive.is_empty().then_some(()) }
    })
    .await;
    assert!(shims.is_some(), "shims left running");
    assert!(
        states.iter().all(|s| !common::alive(s.pid)),
        "container processes left"
    );
    for d in ["containers", "logs"] {
        assert_eq!(count(&env.root.join(d)), 0, "{d} is empty");
    }
    let state = &env.runtime.config().state;
    for d in ["containers", "sock", "runc"] {
        assert_eq!(count(&state.join(d)), 0, "state/{d} is empty");
    }
}
