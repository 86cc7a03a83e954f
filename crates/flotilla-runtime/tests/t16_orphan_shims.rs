//! Shims that nobody would ever ask about again must not live on.
//!
//! - t16a: the agent is killed (kill -9) while its shim is still inside `runc create`, before the
//!   shim could answer. Whoever cleans up after the agent finds no socket for it, so the shim
//!   must undo its container and exit on its own once it sees that nobody takes its handshake.
//! - t16b: a shim whose container record is gone (so `list` does not name it) is found in
//!   `/proc` by `strays`, and `remove_strays` ends it, its container and the unfinished dirs.
mod common;
use common::Env;
use flotilla_runtime::testing::{spec, wait_for};
use flotilla_runtime::{Runtime, RuntimeDriver};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

/// Containers the OCI runtime holds under `state/runc`.
fn runc_containers(rt: &Runtime) -> Vec<String> {
    let real = rt.probe().runtime_path.clone().expect("runc");
    let o = Command::new(real)
        .arg("--root")
        .arg(rt.config().state.join("runc"))
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A `runc` that runs the real one, then, for `create`, says so (`$GATE/created`) and holds until
/// `$GATE/go` exists: the window between the container being created and the shim answering.
fn gated_runc(dir: &Path, real: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let script = format!(
        "#!/bin/sh\n{} \"$@\"; rc=$?\ncase \" $* \" in *\" create \"*)\n  : > \"$FLOTILLA_TEST_GATE/created\"\n  while [ ! -e \"$FLOTILLA_TEST_GATE/go\" ]; do sleep 0.02; done;;\nesac\nexit $rc\n",
        real.display()
    );
    let path = dir.join("runc");
    std::fs::write(&path, script).expect("write wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16a_a_shim_whose_agent_died_before_its_handshake_undoes_its_container() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("abandon");
    let id = env.id("late");
    let real = env.runtime.probe().runtime_path.clone().expect("runc");
    let bin = PathBuf::from(format!("{}-bin", env.root.display()));
    gated_runc(&bin, &real);
    let gate = bin.join("gate");
    std::fs::create_dir_all(&gate).expect("mkdir gate");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // A real agent process (the test binary's `agent` mode), finding the gated runc first.
    let mut agent = Command::new(common::shim_exe())
        .arg("agent")
        .arg(&env.root)
        .arg(&id)
        .arg("busybox:test")
        .args(["sleep", "1000"])
        .env("PATH", &path)
        .env("FLOTILLA_TEST_GATE", &gate)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn agent");
    let created = wait_for(DEADLINE, || async {
        gate.join("created").exists().then_some(())
    })
    .await;
    assert!(created.is_some(), "runc create ran");
    let want: String = format!("shim {id}").chars().take(15).collect();
    let shim = env
        .runtime
        .shim_processes()
        .into_iter()
        .find(|p| p.name == want)
        .expect("the container's shim is found by its marker");
    assert_eq!(runc_containers(&env.runtime), vec![id.clone()]);

    // The agent dies before the shim could answer; then the shim's create completes.
    agent.kill().expect("kill -9 the agent");
    agent.wait().expect("reap the agent");
    std::fs::write(gate.join("go"), b"").expect("open the gate");

    let gone = wait_for(DEADLINE, || async {
        (!common::alive(shim.pid)).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "shim {} serves a container nobody asked for any more",
        shim.pid
    );
    assert!(
        runc_containers(&env.runtime).is_empty(),
        "the shim deleted its container"
    );
    assert!(common::leftover_cgroups(&id).is_empty());
    // The record is still there (the agent wrote it before handing over): a restarted agent
    // or `node cleanup` sees a dead shim and removes it.
    let st = env.runtime.state(&id).await.expect("state");
    assert!(!st.shim_alive);
    env.runtime.remove(&id, false).await.expect("remove");
    let _ = std::fs::remove_dir_all(&bin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16b_remove_strays_ends_a_shim_no_record_names() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("strays");
    let rt = &env.runtime;
    let id = env.id("lost");
    rt.create(spec(&id, &env.image, &["sleep", "1000"]))
        .await
        .expect("create");
    rt.start(&id).await.expect("start");
    let st = rt.state(&id).await.expect("state");
    assert!(st.shim_alive && common::alive(st.pid));
    // The record is lost: `list` (and so `node cleanup`'s removal) no longer names it.
    std::fs::remove_file(env.root.join("containers").join(&id).join("meta.json"))
        .expect("remove meta.json");
    let fresh = Runtime::new(common::config(&env.root)).expect("runtime");
    assert!(fresh.list().await.expect("list").is_empty());

    let strays = fresh.strays().expect("strays");
    let shim = format!("shim process {} ", st.shim_pid);
    assert!(
        strays.iter().any(|s| s.starts_with(&shim)),
        "{strays:?} names {shim}"
    );
    assert!(
        strays.contains(&format!("unfinished container {id}")),
        "{strays:?}"
    );

    let removed = fresh.remove_strays().await.expect("remove strays");
    assert!(
        removed.iter().any(|s| s.starts_with(&shim)),
        "{removed:?} names {shim}"
    );
    assert!(!common::alive(st.shim_pid), "the shim was killed");
    let init_gone = wait_for(DEADLINE, || async {
        (!common::alive(st.pid)).then_some(())
    })
    .await;
    assert!(init_gone.is_some(), "the container's process was killed");
    assert!(runc_containers(&fresh).is_empty());
    assert!(common::leftover_cgroups(&id).is_empty());
    assert!(common::mounts_under(&env.root).is_empty());
    assert_eq!(fresh.strays().expect("strays"), Vec::<String>::new());
}
