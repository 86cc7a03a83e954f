//! The standby shim: one shim is started ahead of need and the next create hands its container
//! to it; a standby that died is replaced without failing the create; a standby never outlives
//! the runtime that started it; and the runtime works without one.
mod common;
use common::Env;
use flotilla_runtime::testing::{spec, wait_for};
use flotilla_runtime::{Runtime, RuntimeDriver};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(10);

async fn create_run_remove(rt: &Runtime, id: &str, image: &str) -> i32 {
    rt.create(spec(id, image, &["echo", "hello"]))
        .await
        .expect("create");
    let shim_pid = rt.state(id).await.expect("state").shim_pid;
    // Every shim has the same command line; its name says which container it serves.
    let comm = std::fs::read_to_string(format!("/proc/{shim_pid}/comm")).expect("comm");
    let want: String = format!("shim {id}").chars().take(15).collect();
    assert_eq!(comm.trim_end(), want);
    rt.start(id).await.expect("start");
    let exit = rt.wait(id).await.expect("wait");
    assert_eq!(exit.code, 0, "{id} exits 0");
    let lines: Vec<String> = flotilla_runtime::read_logs(&rt.log_path(id), None, None)
        .expect("logs")
        .into_iter()
        .map(|l| l.line)
        .collect();
    assert_eq!(lines, vec!["hello".to_string()], "{id}'s output is logged");
    rt.remove(id, false).await.expect("remove");
    shim_pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_standby_is_used_replaced_and_never_outlives_the_runtime() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("standby");
    let rt = &env.runtime;
    // The first create starts its shim from scratch and asks for a standby.
    create_run_remove(rt, &env.id("a"), &env.image).await;
    rt.settle().await;
    let standby = rt.standby_pid().expect("a standby shim is ready");
    assert!(common::alive(standby as i32));
    // The next create hands its container to exactly that process.
    let used = create_run_remove(rt, &env.id("b"), &env.image).await;
    assert_eq!(
        used, standby as i32,
        "the container ran under the standby shim"
    );
    rt.settle().await;
    let next = rt.standby_pid().expect("a new standby after use");
    assert_ne!(next, standby);

    // A standby that died while waiting: the create still succeeds, with a new shim.
    let killed = std::process::Command::new("kill")
        .args(["-9", &next.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let gone = wait_for(DEADLINE, || async move {
        (!common::alive(next as i32)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "killed standby is gone");
    let used = create_run_remove(rt, &env.id("c"), &env.image).await;
    assert_ne!(used, next as i32);
    rt.settle().await;
    let last = rt.standby_pid().expect("standby replaced");

    // Without the runtime that started it, the standby exits (end of input on its stdin).
    drop(env);
    let exited = wait_for(DEADLINE, || async move {
        (!common::alive(last as i32)).then_some(())
    })
    .await;
    assert!(exited.is_some(), "standby shim {last} outlived its runtime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_no_standby_when_turned_off() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("nostandby");
    let mut cfg = common::config(&env.root.join("off"));
    cfg.shim_standby = false;
    let rt = Runtime::new(cfg).expect("runtime");
    flotilla_runtime::testing::import_busybox(rt.images(), "busybox:test").expect("image");
    create_run_remove(&rt, &env.id("a"), "busybox:test").await;
    rt.settle().await;
    assert_eq!(rt.standby_pid(), None);
    create_run_remove(&rt, &env.id("b"), "busybox:test").await;
}
