//! Agent restarts: kill -9 the agent, containers keep running and are re-adopted; a dead shim is
//! detected and reported.
mod common;
use common::Env;
use flotilla_runtime::testing::spec;
use flotilla_runtime::{ContainerStatus, RuntimeDriver};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_kill_9_agent_then_readopt() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("adopt");
    let id = env.id("long");
    let script =
        "trap 'exit 42' USR1; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done";
    let mut agent = Command::new(common::shim_exe())
        .arg("agent")
        .arg(&env.root)
        .arg(&id)
        .arg("busybox:test")
        .args(["sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let mut line = String::new();
    BufReader::new(agent.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let pid: i32 = line
        .trim()
        .strip_prefix("started ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("agent said {line:?}"));
    assert!(
        common::wait_line(&env.runtime, &id, "tick 2", 10).await,
        "container is ticking"
    );

    agent.kill().expect("kill -9 the agent");
    agent.wait().expect("reap agent");

    // A fresh "agent" (this process's runtime) re-adopts.
    let report = env.runtime.adopt().await.expect("adopt");
    let st = report
        .adopted
        .iter()
        .find(|s| s.id == id)
        .unwrap_or_else(|| panic!("not adopted: {report:?}"));
    assert_eq!(st.status, ContainerStatus::Running);
    assert_eq!(st.pid, pid, "same container process");
    assert!(report.dead_shims.is_empty());
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    // Output after the agent died keeps reaching the log.
    let n = flotilla_runtime::read_logs(&env.runtime.log_path(&id), None, None)
        .expect("logs")
        .len();
    let later = format!("tick {}", n + 5);
    assert!(
        common::wait_line(&env.runtime, &id, &later, 10).await,
        "log keeps growing after the agent died"
    );

    // Its exit code is recorded when it ends.
    env.runtime
        .signal(&id, libc::SIGUSR1)
        .await
        .expect("signal");
    let exit = env.runtime.wait(&id).await.expect("wait");
    assert_eq!(exit.code, 42);
    env.runtime.remove(&id, false).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_dead_shim_is_reported_not_forgotten() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("deadshim");
    let rt = &env.runtime;
    let id = env.id("orphan");
    rt.create(spec(&id, &env.image, &["sleep", "100"]))
        .await
        .expect("create");
    rt.start(&id).await.expect("start");
    let st = rt.state(&id).await.expect("state");
    assert!(st.shim_alive && st.shim_pid > 0);
    let shim_pid = st.shim_pid;
    Command::new("kill")
        .args(["-9", &shim_pid.to_string()])
        .status()
        .expect("kill shim");
    let gone = flotilla_runtime::testing::wait_for(std::time::Duration::from_secs(10), || async {
        (!common::alive(shim_pid)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "shim died");
    let st = rt.state(&id).await.expect("state");
    assert!(!st.shim_alive);
    assert_eq!(st.status, ContainerStatus::Unknown);
    // A create interrupted by a crash (no meta.json yet) is cleaned up by adopt.
    let half = env.root.join("containers").join(env.id("half"));
    std::fs::create_dir_all(half.join("fs/upper")).expect("mkdir");
    let state = rt.config().state.join("containers");
    let half_state = state.join(env.id("half"));
    std::fs::create_dir_all(half_state.join("bundle/rootfs")).expect("mkdir");
    // Volatile state whose container has no record at all (e.g. a crash between the two).
    let orphan = state.join(env.id("norecord"));
    std::fs::create_dir_all(orphan.join("bundle/rootfs")).expect("mkdir");
    let report = rt.adopt().await.expect("adopt");
    assert_eq!(
        report.cleaned_up,
        vec![env.id("half"), env.id("norecord")],
        "{report:?}"
    );
    assert!(!half.exists() && !half_state.exists() && !orphan.exists());
    assert!(
        report.dead_shims.iter().any(|s| s.id == id),
        "dead shim reported: {report:?}"
    );
    assert!(matches!(
        rt.wait(&id).await,
        Err(flotilla_runtime::RuntimeError::ShimDead(_))
    ));
    rt.remove(&id, false)
        .await
        .expect("remove cleans up a container whose shim died");
    assert!(
        !common::alive(st.pid),
        "the orphaned container process was killed"
    );
    assert!(common::leftover_cgroups(&id).is_empty());
}

/// A container created by a build that kept all state under the runtime root (no state dir)
/// is still reachable after an upgrade: its shim answers, `exec` finds its runc root, and
/// removal leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t32_containers_of_the_old_layout_survive_an_upgrade() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("layout");
    let mut old_cfg = common::config(&env.root);
    old_cfg.state = env.root.clone();
    let old = flotilla_runtime::Runtime::new(old_cfg).expect("runtime with the old layout");
    let id = env.id("old");
    old.create(spec(&id, &env.image, &["sleep", "100"]))
        .await
        .expect("create");
    old.start(&id).await.expect("start");
    assert!(
        env.root.join("runc").join(&id).is_dir(),
        "old runc root used"
    );
    drop(old);

    let rt = &env.runtime;
    let st = rt.state(&id).await.expect("state");
    assert!(st.shim_alive, "the shim answers on its old socket: {st:?}");
    assert_eq!(st.status, ContainerStatus::Running);
    let (runc, root) = rt.oci_runtime(&id);
    assert_eq!(root, env.root.join("runc"));
    let o = Command::new(runc)
        .arg("--root")
        .arg(&root)
        .args(["exec", &id, "/bin/true"])
        .output()
        .expect("runc exec");
    assert!(
        o.status.success(),
        "exec: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    rt.remove(&id, false).await.expect("remove");
    assert!(!common::alive(st.pid), "container process stopped");
    let shim_pid = st.shim_pid;
    let gone = flotilla_runtime::testing::wait_for(std::time::Duration::from_secs(10), || async {
        (!common::alive(shim_pid)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "shim exited");
    assert!(!env.root.join("runc").join(&id).exists());
    assert!(!env.root.join("containers").join(&id).exists());
    assert!(common::mounts_under(&env.root).is_empty());
    assert!(common::leftover_cgroups(&id).is_empty());
}
