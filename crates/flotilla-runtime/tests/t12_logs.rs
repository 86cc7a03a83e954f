//! Container logs end to end: JSON lines with nanosecond timestamps, size rotation, follow.
mod common;
use flotilla_runtime::testing::spec;
use flotilla_runtime::{LogFollower, Runtime, RuntimeDriver};
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12_logs_rotate_and_follow() {
    if !common::can_run() {
        return;
    }
    let prefix = common::unique("logs");
    let root = PathBuf::from("/tmp").join(format!("flotilla-rt-{prefix}"));
    let mut cfg = common::config(&root);
    cfg.log_max_bytes = 8 * 1024;
    cfg.log_max_files = 3;
    let rt = Runtime::new(cfg).expect("runtime");
    let image =
        flotilla_runtime::testing::import_busybox(rt.images(), "busybox:test").expect("image");

    let id = format!("{prefix}-seq");
    let (code, _) = common::run_to_exit(&rt, spec(&id, &image, &["seq", "1", "3000"])).await;
    assert_eq!(code, 0);
    let path = rt.log_path(&id);
    let files: Vec<PathBuf> = (0..5)
        .map(|n| {
            if n == 0 {
                path.clone()
            } else {
                PathBuf::from(format!("{}.{n}", path.display()))
            }
        })
        .filter(|p| p.exists())
        .collect();
    assert_eq!(files.len(), 3, "rotated to at most 3 files: {files:?}");
    for f in &files {
        assert!(std::fs::metadata(f).expect("stat").len() <= 8 * 1024);
    }
    let lines = flotilla_runtime::read_logs(&path, None, None).expect("read");
    assert_eq!(lines.last().map(|l| l.line.as_str()), Some("3000"));
    let nums: Vec<u32> = lines.iter().filter_map(|l| l.line.parse().ok()).collect();
    assert!(
        nums.windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous and ordered"
    );
    let ts = &lines[0].ts;
    assert_eq!(
        ts.len(),
        "2026-01-01T00:00:00.000000000Z".len(),
        "nanosecond RFC 3339: {ts}"
    );
    assert!(lines.windows(2).all(|w| w[0].ts <= w[1].ts));
    let raw = std::fs::read_to_string(&path).expect("raw");
    let first: serde_json::Value =
        serde_json::from_str(raw.lines().next().expect("line")).expect("json line");
    assert_eq!(first["stream"], "stdout");
    let tail = flotilla_runtime::read_logs(&path, None, Some(5)).expect("tail");
    assert_eq!(tail.len(), 5);

    // Follow a running container.
    let id = format!("{prefix}-follow");
    rt.create(spec(
        &id,
        &image,
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo f$i; sleep 0.05; done; sleep 100",
        ],
    ))
    .await
    .expect("create");
    let mut follower = LogFollower::from_end(&rt.log_path(&id)).expect("follow");
    rt.start(&id).await.expect("start");
    let mut seen = Vec::new();
    let got = flotilla_runtime::testing::wait_for(std::time::Duration::from_secs(10), || {
        seen.extend(follower.poll().expect("poll").into_iter().map(|l| l.line));
        let done = seen.len() >= 5;
        async move { done.then_some(()) }
    })
    .await;
    assert!(got.is_some(), "followed: {seen:?}");
    assert_eq!(seen, ["f1", "f2", "f3", "f4", "f5"]);
    for c in rt.list().await.expect("list") {
        rt.remove(&c.id, false).await.expect("remove");
    }
    let _ = std::fs::remove_dir_all(&root);
}
