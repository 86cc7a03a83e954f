//! Secure defaults: user namespace, capabilities, seccomp, masked /proc; and the explicit opt-out.
mod common;
use common::{run_to_exit, Env};
use flotilla_runtime::testing::spec;
use flotilla_runtime::{BindMount, RuntimeDriver};
use std::os::unix::fs::MetadataExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_container_root_is_unprivileged_on_the_host() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("uid");
    let rt = &env.runtime;
    let id = env.id("uid");
    rt.create(spec(
        &id,
        &env.image,
        &["sh", "-c", "id -u; touch /made-here; echo ready; sleep 100"],
    ))
    .await
    .expect("create");
    rt.start(&id).await.expect("start");
    assert!(
        common::wait_line(rt, &id, "ready", 10).await,
        "container started"
    );
    let st = rt.state(&id).await.expect("state");
    let logs = flotilla_runtime::read_logs(&rt.log_path(&id), None, None).expect("logs");
    assert_eq!(logs[0].line, "0", "id -u inside prints 0");
    assert_eq!(
        common::host_uid(st.pid),
        Some(100_000),
        "the host sees uid 100000 for the container's root"
    );
    let upper = env.root.join("containers").join(&id).join("fs/upper");
    assert_eq!(
        std::fs::metadata(&upper).expect("upper").uid(),
        100_000,
        "upper dir owned by the range root"
    );
    assert_eq!(
        std::fs::metadata(upper.join("made-here"))
            .expect("file")
            .uid(),
        100_000,
        "writes land as uid 100000"
    );
    let info = rt.inspect(&id).expect("inspect");
    assert!(
        info.security_opt_outs.is_empty(),
        "secure default has no opt-outs: {:?}",
        info.security_opt_outs
    );
    assert_eq!(info.userns.map(|r| r.host_start), Some(100_000));
    rt.remove(&id, false).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_container_root_cannot_write_mount_or_load_modules() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("sec");
    let rt = &env.runtime;
    // A host-root-owned file, bind-mounted read-write: only the user namespace protects it.
    let host_file = env.root.join("host-owned");
    std::fs::write(&host_file, "original\n").expect("write");
    std::fs::set_permissions(
        &host_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let mut s = spec(
        &env.id("write"),
        &env.image,
        &["sh", "-c", "echo pwned > /host-owned"],
    );
    s.mounts.push(BindMount {
        src: host_file.clone(),
        dst: "/host-owned".into(),
        readonly: false,
        copy_up: false,
    });
    let (code, lines) = run_to_exit(rt, s).await;
    assert_ne!(code, 0, "write must fail: {lines:?}");
    assert_eq!(
        std::fs::read_to_string(&host_file).expect("read"),
        "original\n"
    );

    let (code, lines) = run_to_exit(
        rt,
        spec(
            &env.id("mount"),
            &env.image,
            &["mount", "-t", "tmpfs", "none", "/mnt"],
        ),
    )
    .await;
    assert_ne!(code, 0, "mount must fail: {lines:?}");

    let (code, lines) = run_to_exit(
        rt,
        spec(
            &env.id("insmod"),
            &env.image,
            &["sh", "-c", "echo junk > /tmp/m.ko; insmod /tmp/m.ko"],
        ),
    )
    .await;
    assert_ne!(code, 0, "insmod must fail: {lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("not permitted")),
        "refused with EPERM: {lines:?}"
    );

    let (code, lines) = run_to_exit(
        rt,
        spec(
            &env.id("proc"),
            &env.image,
            &["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"],
        ),
    )
    .await;
    assert_ne!(code, 0, "/proc/sys is read-only: {lines:?}");
    let (code, lines) = run_to_exit(
        rt,
        spec(
            &env.id("userns"),
            &env.image,
            &["unshare", "-U", "-r", "true"],
        ),
    )
    .await;
    assert_ne!(code, 0, "creating namespaces is refused: {lines:?}");

    let masked = [
        "/proc/kcore",
        "/proc/timer_list",
        "/proc/keys",
        "/proc/sched_debug",
    ]
    .into_iter()
    .find(|p| std::fs::metadata(p).is_ok())
    .expect("one masked path exists on the host");
    let cmd = format!("wc -c < {masked}");
    let (_, lines) =
        run_to_exit(rt, spec(&env.id("masked"), &env.image, &["sh", "-c", &cmd])).await;
    assert_eq!(
        lines.first().map(|l| l.trim()),
        Some("0"),
        "{masked} is masked: {lines:?}"
    );
    let (_, lines) = run_to_exit(
        rt,
        spec(
            &env.id("caps"),
            &env.image,
            &["sh", "-c", "grep CapEff /proc/self/status"],
        ),
    )
    .await;
    assert_eq!(
        lines.first().map(String::as_str),
        Some("CapEff:\t00000000a80425fb"),
        "Docker's default capability set"
    );
    let (_, lines) = run_to_exit(
        rt,
        spec(
            &env.id("nnp"),
            &env.image,
            &[
                "sh",
                "-c",
                "grep -E 'NoNewPrivs|Seccomp:' /proc/self/status",
            ],
        ),
    )
    .await;
    assert!(
        lines.iter().any(|l| l == "NoNewPrivs:\t1") && lines.iter().any(|l| l == "Seccomp:\t2"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_opting_out_is_explicit_and_visible() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("optout");
    let rt = &env.runtime;
    let id = env.id("host");
    let mut s = spec(&id, &env.image, &["sh", "-c", "echo ready; sleep 100"]);
    s.security.userns = false;
    s.security.seccomp = false;
    rt.create(s).await.expect("create");
    rt.start(&id).await.expect("start");
    assert!(common::wait_line(rt, &id, "ready", 10).await);
    let st = rt.state(&id).await.expect("state");
    assert_eq!(
        common::host_uid(st.pid),
        Some(0),
        "without userns the container runs as host root"
    );
    let info = rt.inspect(&id).expect("inspect");
    assert!(info.userns.is_none());
    assert!(
        info.security_opt_outs.contains(&"userns=host".to_string()),
        "{:?}",
        info.security_opt_outs
    );
    assert!(info
        .security_opt_outs
        .contains(&"seccomp=unconfined".to_string()));
    rt.remove(&id, false).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23_bundle_merges_image_config_and_task() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("merge");
    let rt = &env.runtime;
    let src = env.root.join("src-rootfs");
    flotilla_runtime::testing::busybox_rootfs(&src).expect("rootfs");
    std::fs::create_dir_all(src.join("srv")).expect("mkdir");
    let input = flotilla_runtime::ImageConfigInput {
        entrypoint: Some(vec!["sh".into(), "-c".into()]),
        cmd: Some(vec!["echo from-image-cmd".into()]),
        env: vec!["PATH=/bin".into(), "FOO=image".into(), "KEEP=yes".into()],
        workdir: Some("/srv".into()),
        user: Some("nobody".into()),
        stop_signal: None,
    };
    rt.images()
        .import_rootfs(&src, "merge:v1", &input)
        .expect("import");
    let (_, lines) = run_to_exit(rt, spec(&env.id("default"), "merge:v1", &[])).await;
    assert_eq!(lines, ["from-image-cmd"], "image entrypoint + cmd");
    let mut s = spec(
        &env.id("task"),
        "merge:v1",
        &["echo $FOO $KEEP; pwd; id -u; hostname"],
    );
    s.env = vec!["FOO=task".into()];
    s.hostname = Some("web-1".into());
    let id = s.id.clone();
    rt.create(s).await.expect("create");
    rt.start(&id).await.expect("start");
    rt.wait(&id).await.expect("wait");
    let lines: Vec<String> = flotilla_runtime::read_logs(&rt.log_path(&id), None, None)
        .expect("logs")
        .into_iter()
        .map(|l| l.line)
        .collect();
    assert_eq!(lines, ["task yes", "/srv", "65534", "web-1"]);
}

/// The seccomp profile covers x86_64 and i386 system calls, and refuses the x32 ABI outright.
/// The probe is a static C program built here with the C compiler every Rust build needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t24_seccomp_keeps_i386_and_kills_x32_calls() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("arch");
    let rt = &env.runtime;
    let src = env.root.join("probe-src");
    flotilla_runtime::testing::busybox_rootfs(&src).expect("rootfs");
    let c = env.root.join("probe.c");
    std::fs::write(
        &c,
        r#"#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    (void)argv;
    if (argc > 1) {
        long r;
        __asm__ volatile("int $0x80" : "=a"(r) : "a"(20L) : "memory"); /* i386 getpid */
        printf("i386 getpid %ld\n", r);
        return 0;
    }
    printf("before x32\n");
    fflush(stdout);
    long r = syscall(0x40000000L | SYS_getpid);
    printf("x32 getpid %ld\n", r);
    return 0;
}
"#,
    )
    .expect("write probe.c");
    let cc = std::process::Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(src.join("probe"))
        .arg(&c)
        .output()
        .expect("run cc (the C compiler Rust links with)");
    assert!(
        cc.status.success(),
        "cc -static failed (needs libc6-dev): {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    rt.images()
        .import_rootfs(&src, "probe:test", &Default::default())
        .expect("import probe image");

    // A 32-bit system call from a 64-bit process (int 0x80) is filtered as i386 and allowed.
    let (code, lines) =
        run_to_exit(rt, spec(&env.id("i386"), "probe:test", &["/probe", "i"])).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(
        lines,
        vec!["i386 getpid 1".to_string()],
        "pid 1 in its namespace"
    );

    // An x32 system call: SIGSYS, the call never returns.
    let (code, lines) = run_to_exit(rt, spec(&env.id("x32"), "probe:test", &["/probe"])).await;
    assert_eq!(code, 128 + libc::SIGSYS, "{lines:?}");
    assert_eq!(lines, vec!["before x32".to_string()]);
}
