//! A container may reopen its own stdout and stderr by path (`/dev/stdout`, `/dev/stderr`,
//! `/proc/self/fd/1`), as nginx does through its log symlinks, as root in its user namespace
//! and as a non-root user, and the lines land in its log on the right stream.
mod common;
use flotilla_runtime::testing::spec;
use flotilla_runtime::{Runtime, RuntimeDriver};
use std::path::PathBuf;

const SCRIPT: &str = "echo out-by-path > /dev/stdout && echo err-by-path > /dev/stderr \
     && echo fd1-by-path > /proc/self/fd/1 && echo fd2-by-path >> /proc/self/fd/2 \
     && id -u";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13_root_and_non_root_reopen_stdout_and_stderr_by_path() {
    if !common::can_run() {
        return;
    }
    let prefix = common::unique("stdio");
    let root = PathBuf::from("/tmp").join(format!("flotilla-rt-{prefix}"));
    let rt = Runtime::new(common::config(&root)).expect("runtime");
    let image =
        flotilla_runtime::testing::import_busybox(rt.images(), "busybox:test").expect("image");
    for (tag, user) in [("root", None), ("user", Some("1000:1000"))] {
        let id = format!("{prefix}-{tag}");
        let mut s = spec(&id, &image, &["sh", "-c", SCRIPT]);
        s.user = user.map(str::to_string);
        let (code, _) = common::run_to_exit(&rt, s).await;
        let lines = flotilla_runtime::read_logs(&rt.log_path(&id), None, None).expect("logs");
        let got: Vec<(String, String)> = lines.into_iter().map(|l| (l.stream, l.line)).collect();
        assert_eq!(code, 0, "{tag}: the writes by path fail: {got:?}");
        let want_uid = if user.is_some() { "1000" } else { "0" };
        for (stream, line) in [
            ("stdout", "out-by-path"),
            ("stderr", "err-by-path"),
            ("stdout", "fd1-by-path"),
            ("stderr", "fd2-by-path"),
            ("stdout", want_uid),
        ] {
            assert!(
                got.iter().any(|(s, l)| s == stream && l == line),
                "{tag}: {line} on {stream} missing: {got:?}"
            );
        }
        rt.remove(&id, false).await.expect("remove");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13_a_tty_container_gets_a_terminal_and_its_output_is_logged() {
    if !common::can_run() {
        return;
    }
    let prefix = common::unique("tty");
    let root = PathBuf::from("/tmp").join(format!("flotilla-rt-{prefix}"));
    let rt = Runtime::new(common::config(&root)).expect("runtime");
    let image =
        flotilla_runtime::testing::import_busybox(rt.images(), "busybox:test").expect("image");
    let id = format!("{prefix}-t");
    let mut s = spec(
        &id,
        &image,
        &[
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; echo size=$(stty size); \
             echo to-stderr >&2; test -c /dev/console && echo console",
        ],
    );
    s.tty = true;
    let (code, lines) = common::run_to_exit(&rt, s).await;
    let got: Vec<(String, String)> = flotilla_runtime::read_logs(&rt.log_path(&id), None, None)
        .expect("logs")
        .into_iter()
        .map(|l| (l.stream, l.line))
        .collect();
    assert_eq!(code, 0, "{lines:?}");
    for want in ["is-a-tty", "size=24 80", "to-stderr", "console"] {
        assert!(
            got.iter().any(|(s, l)| s == "stdout" && l == want),
            "{want} on stdout, without a carriage return: {got:?}"
        );
    }
    rt.remove(&id, false).await.expect("remove");
    let _ = std::fs::remove_dir_all(&root);
}
