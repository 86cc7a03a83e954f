//! cgroup limits: memory (OOM reported), CPU quota and shares, pids.
mod common;
use common::Env;
use flotilla_runtime::testing::spec;
use flotilla_runtime::{CgroupLayout, Resources, RuntimeDriver};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_memory_limit_exceeded_reports_oom() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("oom");
    let rt = &env.runtime;
    let id = env.id("oom");
    let mut s = spec(
        &id,
        &env.image,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
    );
    s.resources.memory_bytes = Some(32 << 20);
    rt.create(s).await.expect("create");
    rt.start(&id).await.expect("start");
    let exit = rt.wait(&id).await.expect("wait");
    assert!(exit.oom_killed, "OOM kill reported: {exit:?}");
    assert_eq!(exit.code, 137);
    let st = rt.state(&id).await.expect("state");
    assert!(st.oom_killed);
    rt.remove(&id, false).await.expect("remove");
    // Within the limit: no OOM.
    let id = env.id("fits");
    let mut s = spec(
        &id,
        &env.image,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=4"],
    );
    s.resources.memory_bytes = Some(32 << 20);
    let (code, _) = common::run_to_exit(rt, s).await;
    assert_eq!(code, 0);
    assert!(!rt.state(&id).await.expect("state").oom_killed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t41_cpu_and_pids_limits_reach_the_cgroup() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("limits");
    let rt = &env.runtime;
    let id = env.id("lim");
    let mut s = spec(&id, &env.image, &["sh", "-c", "echo ready; sleep 100"]);
    s.resources = Resources {
        memory_bytes: Some(64 << 20),
        nano_cpus: Some(500_000_000),
        cpu_shares: Some(512),
        pids_limit: Some(50),
        ..Default::default()
    };
    rt.create(s).await.expect("create");
    rt.start(&id).await.expect("start");
    assert!(common::wait_line(rt, &id, "ready", 10).await);
    let read = |p: String| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .trim()
            .to_string()
    };
    match rt.probe().cgroup_layout {
        CgroupLayout::V2 => {
            let base = format!("/sys/fs/cgroup/flotilla/{id}");
            assert_eq!(read(format!("{base}/cpu.max")), "50000 100000");
            // 512 shares (half of v1's default 1024) map to a weight below v2's default 100.
            let weight: u64 = read(format!("{base}/cpu.weight"))
                .parse()
                .expect("cpu.weight");
            assert!((1..100).contains(&weight), "cpu.weight {weight}");
            assert_eq!(read(format!("{base}/pids.max")), "50");
            assert_eq!(
                read(format!("{base}/memory.max")),
                (64u64 << 20).to_string()
            );
            // Debian's kernel accounts swap under cgroup v2 (t70 runs this in its VM).
            assert!(rt.probe().swap_accounting, "swap accounting not detected");
            if rt.probe().swap_accounting {
                // As much swap as memory, as Docker does.
                assert_eq!(
                    read(format!("{base}/memory.swap.max")),
                    (64u64 << 20).to_string()
                );
            }
        }
        _ => {
            assert_eq!(
                read(format!("/sys/fs/cgroup/cpu/flotilla/{id}/cpu.cfs_quota_us")),
                "50000"
            );
            assert_eq!(
                read(format!("/sys/fs/cgroup/cpu/flotilla/{id}/cpu.shares")),
                "512"
            );
            assert_eq!(
                read(format!("/sys/fs/cgroup/pids/flotilla/{id}/pids.max")),
                "50"
            );
            assert_eq!(
                read(format!(
                    "/sys/fs/cgroup/memory/flotilla/{id}/memory.limit_in_bytes"
                )),
                (64u64 << 20).to_string()
            );
            if rt.probe().swap_accounting {
                // Memory + swap: as much swap as memory, as Docker does.
                assert_eq!(
                    read(format!(
                        "/sys/fs/cgroup/memory/flotilla/{id}/memory.memsw.limit_in_bytes"
                    )),
                    (128u64 << 20).to_string()
                );
            }
        }
    }
    rt.remove(&id, false).await.expect("remove");
    assert!(
        common::leftover_cgroups(&id).is_empty(),
        "{:?}",
        common::leftover_cgroups(&id)
    );
}
