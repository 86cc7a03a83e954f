//! The process environment of a container, as Docker gives it: the stop signal of the spec or
//! the image, `--init` as PID 1, `HOME` and supplementary groups from the image's accounts,
//! `RLIMIT_NOFILE` 1024/524288 and a 64 MiB `/dev/shm` (or `shm_size`).
mod common;
use flotilla_runtime::testing::spec;
use flotilla_runtime::{ImageConfigInput, Runtime, RuntimeDriver};
use std::path::PathBuf;
use std::time::Duration;

/// A busybox image whose `STOPSIGNAL` is SIGQUIT, with an account `app` in group `audio`.
fn import_quit_image(rt: &Runtime, dir: &std::path::Path) -> String {
    let src = dir.join("src");
    flotilla_runtime::testing::busybox_rootfs(&src).expect("busybox rootfs");
    std::fs::write(
        src.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        src.join("etc/group"),
        "root:x:0:\napp:x:1000:\naudio:x:29:app\n",
    )
    .expect("group");
    let input = ImageConfigInput {
        cmd: Some(vec!["sh".into()]),
        stop_signal: Some("SIGQUIT".into()),
        ..Default::default()
    };
    rt.images()
        .import_rootfs(&src, "quit:test", &input)
        .expect("import")
}

/// This process's hard open-files limit, from `/proc/self/limits`.
fn own_nofile_hard() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse().ok())
        .expect("Max open files line")
}

/// Traps the signals `stop` may send, says which came, and exits 0.
const TRAPPER: &str = "trap 'echo got-QUIT; exit 0' QUIT; trap 'echo got-TERM; exit 0' TERM; \
     trap 'echo got-USR1; exit 0' USR1; echo ready; while true; do sleep 0.05; done";

async fn stop_and_read(rt: &Runtime, s: flotilla_runtime::ContainerSpec) -> (i32, Vec<String>) {
    let id = s.id.clone();
    rt.create(s).await.expect("create");
    rt.start(&id).await.expect("start");
    assert!(common::wait_line(rt, &id, "ready", 10).await, "{id} ready");
    let exit = rt.stop(&id, Duration::from_secs(20)).await.expect("stop");
    let lines = flotilla_runtime::read_logs(&rt.log_path(&id), None, None)
        .expect("logs")
        .into_iter()
        .map(|l| l.line)
        .collect();
    rt.remove(&id, false).await.expect("remove");
    (exit.code, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t14_stop_signal_init_accounts_rlimits_and_shm() {
    if !common::can_run() {
        return;
    }
    let prefix = common::unique("penv");
    let root = PathBuf::from("/tmp").join(format!("flotilla-rt-{prefix}"));
    let rt = Runtime::new(common::config(&root)).expect("runtime");
    let image = import_quit_image(&rt, &root.join("img"));

    // The image's STOPSIGNAL, then the spec's, which wins.
    let (code, lines) = stop_and_read(
        &rt,
        spec(&format!("{prefix}-img"), &image, &["sh", "-c", TRAPPER]),
    )
    .await;
    assert_eq!(
        (code, lines.contains(&"got-QUIT".into())),
        (0, true),
        "{lines:?}"
    );
    let mut s = spec(&format!("{prefix}-spec"), &image, &["sh", "-c", TRAPPER]);
    s.stop_signal = Some("usr1".into());
    let (code, lines) = stop_and_read(&rt, s).await;
    assert_eq!(
        (code, lines.contains(&"got-USR1".into())),
        (0, true),
        "{lines:?}"
    );
    let mut bad = spec(&format!("{prefix}-bad"), &image, &["true"]);
    bad.stop_signal = Some("SIGNOPE".into());
    let e = rt.create(bad).await.expect_err("bad signal");
    assert!(e.to_string().contains("invalid signal"), "{e}");

    // Accounts, limits and /dev/shm.
    let probe = "echo home=$HOME; echo groups=$(id -G); echo nofile=$(ulimit -n)/$(ulimit -Hn); \
                 echo shm=$(df -k /dev/shm | tail -1 | awk '{print $2}'); \
                 echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline)";
    let mut s = spec(&format!("{prefix}-acct"), &image, &["sh", "-c", probe]);
    s.user = Some("app".into());
    let (code, lines) = common::run_to_exit(&rt, s).await;
    assert_eq!(code, 0, "{lines:?}");
    // Docker's 1024/524288, unless the runtime's own hard limit is lower and cannot be raised
    // (a sandbox without CAP_SYS_RESOURCE): runc cannot raise it inside the user namespace.
    let hard = own_nofile_hard().min(524_288);
    let nofile = format!("nofile={}/{hard}", hard.min(1024));
    for want in [
        "home=/home/app",
        "groups=1000 29",
        nofile.as_str(),
        "shm=65536",
    ] {
        assert!(lines.iter().any(|l| l == want), "{want} in {lines:?}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("pid1=sh -c")),
        "without --init the command is PID 1: {lines:?}"
    );

    // --init: tini is PID 1, forwards the stop signal, and a custom /dev/shm size.
    if std::path::Path::new("/usr/bin/tini-static").is_file() {
        let mut s = spec(&format!("{prefix}-init"), &image, &["sh", "-c", probe]);
        s.init = true;
        s.shm_size = Some(8 << 20);
        let (code, lines) = common::run_to_exit(&rt, s).await;
        assert_eq!(code, 0, "{lines:?}");
        assert!(lines.iter().any(|l| l == "home=/root"), "{lines:?}");
        assert!(lines.iter().any(|l| l == "shm=8192"), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("pid1=/sbin/flotilla-init -- sh -c")),
            "{lines:?}"
        );
        let mut s = spec(
            &format!("{prefix}-initstop"),
            &image,
            &["sh", "-c", TRAPPER],
        );
        s.init = true;
        let (code, lines) = stop_and_read(&rt, s).await;
        assert_eq!(
            (code, lines.contains(&"got-QUIT".into())),
            (0, true),
            "{lines:?}"
        );
    } else {
        eprintln!(
            "!!!!! /usr/bin/tini-static missing: --init not checked (apt-get install tini) !!!!!"
        );
    }
    for c in rt.list().await.expect("list") {
        rt.remove(&c.id, false).await.expect("remove");
    }
    let _ = std::fs::remove_dir_all(&root);
}
