//! The executor over fakes of its ports: how it performs the runner's effects and reports
//! what happened. The fakes are plain logic (the real runtime and network have their own
//! tests, and the end-to-end tests run the whole); every wait is on a channel, bounded by
//! [`DEADLINE`].

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::json;
use tokio::sync::{mpsc, watch, Semaphore};

use flotilla_runtime::{
    AdoptReport, ContainerInfo, ContainerSpec, ContainerState, ContainerStatus, ExitStatus,
    RuntimeDriver, RuntimeError,
};
use flotilla_types::{Assignments, StatusReport, Task, TaskState};

use super::{Executor, NodeRuntime, Ports, TaskImages, TaskNetwork};
use crate::net::TaskNet;
use crate::{NetError, PullError, TaskError};

/// How long any one wait of a test may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// The address the fake network gives a new task.
const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

/// The init pid of the fake's created containers.
const PID: i32 = 4242;

/// A fake container.
struct Container {
    info: ContainerInfo,
    status: ContainerStatus,
    /// `Some` once the process ended.
    exit: watch::Sender<Option<ExitStatus>>,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    images: HashSet<String>,
    /// Addresses the network has allocated, by task id.
    addresses: HashMap<String, Ipv4Addr>,
    /// The pull fails (with `NoManager`).
    pull_fails: bool,
    /// The trust policy refuses every image.
    untrusted: bool,
}

/// One fake for all the executor's ports: a runtime, a network and an image source that
/// record every call (`"create t1"`, `"pull x"`, …) and can hold an operation until released.
struct Fake {
    state: Mutex<State>,
    calls: watch::Sender<Vec<String>>,
    /// Operations (`"create"`, `"start"`, `"pull"`) that wait for a permit of their gate.
    gates: Mutex<HashMap<&'static str, Arc<Semaphore>>>,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            state: Mutex::new(State::default()),
            calls: watch::channel(Vec::new()).0,
            gates: Mutex::new(HashMap::new()),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, State> {
        super::lock(&self.state)
    }

    /// Records a call, then waits at the operation's gate if it has one.
    async fn call(&self, op: &'static str, arg: &str) {
        self.calls.send_modify(|c| c.push(format!("{op} {arg}")));
        let gate = super::lock(&self.gates).get(op).cloned();
        if let Some(g) = gate {
            // The gate has no permit: this waits until it is closed.
            let _ = g.acquire().await;
        }
    }

    /// From now on `op` waits until [`Fake::release`].
    fn hold(&self, op: &'static str) {
        super::lock(&self.gates).insert(op, Arc::new(Semaphore::new(0)));
    }

    /// Lets every waiting and future `op` through.
    fn release(&self, op: &'static str) {
        if let Some(g) = super::lock(&self.gates).remove(op) {
            g.close();
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| *c == call).count()
    }

    /// Waits until `call` was made.
    async fn saw(&self, call: &str) {
        let mut rx = self.calls.subscribe();
        let seen = tokio::time::timeout(DEADLINE, rx.wait_for(|c| c.iter().any(|x| x == call)));
        assert!(
            matches!(seen.await, Ok(Ok(_))),
            "no call {call:?}; calls: {:?}",
            self.calls()
        );
    }

    /// Adds a container of task `id` in `status`.
    fn add_container(&self, id: &str, status: ContainerStatus) {
        let spec = ContainerSpec {
            id: id.into(),
            ..Default::default()
        };
        let info = ContainerInfo {
            id: id.into(),
            image: spec.image.clone(),
            spec,
            created_at: String::new(),
            bundle: PathBuf::new(),
            log_path: PathBuf::new(),
            cgroups_path: String::new(),
            userns: None,
            security_opt_outs: Vec::new(),
            runtime: PathBuf::new(),
            stop_signal: flotilla_types::SIGTERM,
        };
        let c = Container {
            info,
            status,
            exit: watch::channel(None).0,
        };
        self.inner().containers.insert(id.into(), c);
    }

    /// The process of container `id` ends with `code`.
    fn exit(&self, id: &str, code: i32) {
        let mut s = self.inner();
        let c = s.containers.get_mut(id).expect("container");
        c.status = ContainerStatus::Stopped;
        c.exit.send_replace(Some(ExitStatus {
            code,
            oom_killed: false,
        }));
    }

    fn not_found(id: &str) -> RuntimeError {
        RuntimeError::ContainerNotFound(id.into())
    }
}

impl RuntimeDriver for Fake {
    fn create(
        &self,
        spec: ContainerSpec,
    ) -> BoxFuture<'_, flotilla_runtime::Result<ContainerInfo>> {
        async move {
            self.call("create", &spec.id).await;
            self.add_container(&spec.id, ContainerStatus::Created);
            let s = self.inner();
            Ok(s.containers[&spec.id].info.clone())
        }
        .boxed()
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, flotilla_runtime::Result<()>> {
        async move {
            self.call("start", id).await;
            let mut s = self.inner();
            let c = s
                .containers
                .get_mut(id)
                .ok_or_else(|| Fake::not_found(id))?;
            c.status = ContainerStatus::Running;
            Ok(())
        }
        .boxed()
    }

    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, flotilla_runtime::Result<ContainerState>> {
        async move {
            let s = self.inner();
            let c = s.containers.get(id).ok_or_else(|| Fake::not_found(id))?;
            let exit = *c.exit.borrow();
            Ok(ContainerState {
                id: id.into(),
                status: c.status,
                pid: PID,
                exit_code: exit.map(|e| e.code),
                oom_killed: false,
                started_at: None,
                finished_at: None,
                shim_alive: true,
                shim_pid: 1,
            })
        }
        .boxed()
    }

    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, flotilla_runtime::Result<ExitStatus>> {
        async move {
            let mut rx = {
                let s = self.inner();
                s.containers
                    .get(id)
                    .ok_or_else(|| Fake::not_found(id))?
                    .exit
                    .subscribe()
            };
            let exit = rx.wait_for(Option::is_some).await.map(|e| *e);
            exit.ok().flatten().ok_or_else(|| Fake::not_found(id))
        }
        .boxed()
    }

    fn signal<'a>(
        &'a self,
        _id: &'a str,
        _signal: i32,
    ) -> BoxFuture<'a, flotilla_runtime::Result<()>> {
        async { Ok(()) }.boxed()
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        _grace: Duration,
    ) -> BoxFuture<'a, flotilla_runtime::Result<ExitStatus>> {
        async move {
            self.call("stop", id).await;
            let mut s = self.inner();
            let c = s
                .containers
                .get_mut(id)
                .ok_or_else(|| Fake::not_found(id))?;
            c.status = ContainerStatus::Stopped;
            let exit = c.exit.borrow().unwrap_or(ExitStatus {
                code: 143,
                oom_killed: false,
            });
            c.exit.send_replace(Some(exit));
            Ok(exit)
        }
        .boxed()
    }

    fn remove<'a>(
        &'a self,
        id: &'a str,
        _keep_log: bool,
    ) -> BoxFuture<'a, flotilla_runtime::Result<()>> {
        async move {
            self.call("remove", id).await;
            let removed = self.inner().containers.remove(id);
            removed.map(|_| ()).ok_or_else(|| Fake::not_found(id))
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, flotilla_runtime::Result<Vec<ContainerInfo>>> {
        async move {
            let s = self.inner();
            Ok(s.containers.values().map(|c| c.info.clone()).collect())
        }
        .boxed()
    }

    fn adopt(&self) -> BoxFuture<'_, flotilla_runtime::Result<AdoptReport>> {
        async { Ok(AdoptReport::default()) }.boxed()
    }

    fn log_path(&self, id: &str) -> PathBuf {
        PathBuf::from("/nonexistent/logs").join(id)
    }
}

impl NodeRuntime for Fake {
    fn has_image(&self, reference: &str) -> bool {
        self.inner().images.contains(reference)
    }

    fn prepare_image(&self, _reference: &str) -> flotilla_runtime::Result<()> {
        Ok(())
    }

    fn image_healthcheck(&self, _reference: &str) -> Option<flotilla_types::HealthCheck> {
        None
    }

    fn oci_runtime(&self, _id: &str) -> (PathBuf, PathBuf) {
        ("/bin/false".into(), "/nonexistent/runc".into())
    }

    fn logs_dir(&self) -> PathBuf {
        "/nonexistent/logs".into()
    }

    fn has_state_dir(&self, id: &str) -> bool {
        self.inner().containers.contains_key(id)
    }
}

impl TaskNetwork for Fake {
    fn prepare_task<'a>(
        &'a self,
        task_id: &'a str,
        _names: &'a crate::net::TaskNames,
    ) -> BoxFuture<'a, Result<TaskNet, NetError>> {
        async move {
            self.call("prepare", task_id).await;
            self.inner().addresses.insert(task_id.into(), ADDR);
            Ok(TaskNet::detached(ADDR, &PathBuf::from("/nonexistent/net")))
        }
        .boxed()
    }

    fn adopt_netns<'a>(&'a self, t: &'a TaskNet, pid: u32) -> BoxFuture<'a, Result<(), NetError>> {
        async move {
            self.call("adopt_netns", &format!("{} {pid}", t.addr)).await;
            Ok(())
        }
        .boxed()
    }

    fn attach_task<'a>(&'a self, t: &'a TaskNet) -> BoxFuture<'a, Result<(), NetError>> {
        async move {
            self.call("attach", &t.addr.to_string()).await;
            Ok(())
        }
        .boxed()
    }

    fn address_of<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Option<Ipv4Addr>> {
        async move { self.inner().addresses.get(task_id).copied() }.boxed()
    }

    fn release_task<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, ()> {
        async move {
            self.call("release", task_id).await;
            self.inner().addresses.remove(task_id);
        }
        .boxed()
    }

    fn prepared_tasks(&self) -> BoxFuture<'_, Vec<String>> {
        async move { self.inner().addresses.keys().cloned().collect() }.boxed()
    }
}

impl TaskImages for Fake {
    fn note(&self, _set: &Assignments) {}

    fn pull<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), TaskError>> {
        async move {
            self.call("pull", image).await;
            let mut s = self.inner();
            if s.pull_fails {
                return Err(TaskError::Pull(Arc::new(PullError::NoManager {
                    image: image.into(),
                })));
            }
            s.images.insert(image.into());
            Ok(())
        }
        .boxed()
    }

    fn verify<'a>(
        &'a self,
        image: &'a str,
        _digest: &'a str,
    ) -> BoxFuture<'a, Result<(), TaskError>> {
        async move {
            self.call("verify", image).await;
            if self.inner().untrusted {
                return Err(TaskError::NotTrusted(
                    flotilla_registry::TrustError::NotTrusted {
                        reference: image.into(),
                        reasons: Vec::new(),
                    },
                ));
            }
            Ok(())
        }
        .boxed()
    }
}

/// An executor over `fake` (runtime, network and images), and its status reports.
fn executor(fake: &Arc<Fake>) -> (Arc<Executor>, mpsc::UnboundedReceiver<StatusReport>) {
    Executor::with_ports(Ports {
        runtime: fake.clone(),
        net: Some(fake.clone()),
        images: fake.clone(),
        storage: None,
    })
}

/// Task `id` of image `x`, in `state`, desired `desired`.
fn task(id: &str, state: &str, desired: &str) -> Task {
    serde_json::from_value(json!({
        "id": id, "service_id": "s1", "slot": 1, "node_id": "n1",
        "spec": {"container": {"image": "x"}},
        "spec_version": 1, "desired_state": desired,
        "status": {"state": state, "timestamp": 1}
    }))
    .expect("task")
}

fn set(tasks: Vec<Task>) -> Assignments {
    Assignments {
        revision: 1,
        tasks,
        trust: None,
    }
}

/// The next status report.
async fn next(rx: &mut mpsc::UnboundedReceiver<StatusReport>) -> StatusReport {
    match tokio::time::timeout(DEADLINE, rx.recv()).await {
        Ok(Some(r)) => r,
        Ok(None) => panic!("the executor is gone"),
        Err(_) => panic!("no status report within {DEADLINE:?}"),
    }
}

/// The first report in `state` of each of `n` tasks (other reports are skipped).
async fn first_in_state(
    rx: &mut mpsc::UnboundedReceiver<StatusReport>,
    state: TaskState,
    n: usize,
) -> Vec<StatusReport> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while out.len() < n {
        let r = next(rx).await;
        if r.status.state == state && seen.insert(r.task_id.clone()) {
            out.push(r);
        }
    }
    out
}

/// The reports of task `id` up to (and including) the first in `state`.
async fn until(
    rx: &mut mpsc::UnboundedReceiver<StatusReport>,
    id: &str,
    state: TaskState,
) -> Vec<StatusReport> {
    let mut seen = Vec::new();
    loop {
        let r = next(rx).await;
        if r.task_id != id {
            continue;
        }
        let done = r.status.state == state;
        seen.push(r);
        if done {
            return seen;
        }
    }
}

fn states(reports: &[StatusReport]) -> Vec<TaskState> {
    reports.iter().map(|r| r.status.state).collect()
}

/// Waits until task `id` has no runner.
async fn runner_gone(exec: &Executor, id: &str) {
    let gone = tokio::time::timeout(DEADLINE, async {
        while exec.has_runner(id) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(gone.await.is_ok(), "the runner of {id} is still there");
}

/// Waits until `n` tasks hold the pull lock of image `digest` (one pulling, the others
/// waiting for its outcome).
async fn pull_waiters(exec: &Executor, digest: &str, n: usize) {
    let holders = || {
        let locks = super::lock(&exec.image_locks);
        locks.get(digest).map(|l| Arc::strong_count(l) - 1)
    };
    let all = tokio::time::timeout(DEADLINE, async {
        while holders() != Some(n) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(
        all.await.is_ok(),
        "{:?} tasks hold the pull lock",
        holders()
    );
}

/// Starts task `t1` and waits until it runs.
async fn start_t1(fake: &Arc<Fake>) -> (Arc<Executor>, mpsc::UnboundedReceiver<StatusReport>) {
    let (exec, mut rx) = executor(fake);
    exec.apply(set(vec![task("t1", "assigned", "running")]))
        .await;
    until(&mut rx, "t1", TaskState::Running).await;
    (exec, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_task_walks_the_start_path_into_running() {
    let fake = Fake::new();
    let (exec, mut rx) = executor(&fake);
    exec.apply(set(vec![task("t1", "assigned", "running")]))
        .await;
    let reports = until(&mut rx, "t1", TaskState::Running).await;
    assert_eq!(
        states(&reports),
        [
            TaskState::Accepted,
            TaskState::Preparing,
            TaskState::Ready,
            TaskState::Starting,
            TaskState::Running
        ]
    );
    let running = &reports[4].status;
    assert_eq!(running.address.as_deref(), Some("10.0.0.5"));
    assert_eq!(running.container_id.as_deref(), Some("t1"));
    assert_eq!(
        fake.calls(),
        [
            "pull x",
            "verify x",
            "prepare t1",
            "create t1",
            "adopt_netns 10.0.0.5 4242",
            "attach 10.0.0.5",
            "start t1"
        ]
    );
    assert!(exec.has_runner("t1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pull_rejects_the_task_and_creates_nothing() {
    let fake = Fake::new();
    fake.inner().pull_fails = true;
    let (exec, mut rx) = executor(&fake);
    exec.apply(set(vec![task("t1", "assigned", "running")]))
        .await;
    let reports = until(&mut rx, "t1", TaskState::Rejected).await;
    assert_eq!(
        states(&reports),
        [
            TaskState::Accepted,
            TaskState::Preparing,
            TaskState::Rejected
        ]
    );
    let msg = "image x is not on this node and no manager is known";
    assert_eq!(reports[2].status.message, msg);
    assert_eq!(reports[2].status.err.as_deref(), Some(msg));
    runner_gone(&exec, "t1").await;
    assert_eq!(fake.calls(), ["pull x", "release t1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_image_rejects_the_task_and_creates_nothing() {
    let fake = Fake::new();
    fake.inner().images.insert("x".into());
    fake.inner().untrusted = true;
    let (exec, mut rx) = executor(&fake);
    exec.apply(set(vec![task("t1", "assigned", "running")]))
        .await;
    let reports = until(&mut rx, "t1", TaskState::Rejected).await;
    let msg = "image x is not signed by a trusted key";
    assert_eq!(reports.last().expect("report").status.message, msg);
    runner_gone(&exec, "t1").await;
    assert_eq!(fake.calls(), ["verify x", "release t1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_one_missing_image_wait_for_one_pull() {
    let fake = Fake::new();
    fake.hold("pull");
    let (exec, mut rx) = executor(&fake);
    exec.apply(set(vec![
        task("t1", "assigned", "running"),
        task("t2", "assigned", "running"),
    ]))
    .await;
    fake.saw("pull x").await;
    pull_waiters(&exec, "x", 2).await;
    fake.release("pull");
    first_in_state(&mut rx, TaskState::Running, 2).await;
    assert_eq!(fake.count("pull x"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pull_fails_every_task_that_waited_for_it() {
    let fake = Fake::new();
    fake.inner().pull_fails = true;
    fake.hold("pull");
    let (exec, mut rx) = executor(&fake);
    exec.apply(set(vec![
        task("t1", "assigned", "running"),
        task("t2", "assigned", "running"),
    ]))
    .await;
    fake.saw("pull x").await;
    pull_waiters(&exec, "x", 2).await;
    fake.release("pull");
    for r in first_in_state(&mut rx, TaskState::Rejected, 2).await {
        let msg = "image x is not on this node and no manager is known";
        assert_eq!(r.status.message, msg);
    }
    assert_eq!(fake.count("pull x"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_create_shuts_down_before_start() {
    let fake = Fake::new();
    fake.hold("create");
    let (exec, mut rx) = executor(&fake);
    exec.apply(set(vec![task("t1", "assigned", "running")]))
        .await;
    fake.saw("create t1").await;
    exec.apply(set(vec![task("t1", "ready", "shutdown")])).await;
    fake.release("create");
    let reports = until(&mut rx, "t1", TaskState::Shutdown).await;
    assert_eq!(
        states(&reports),
        [
            TaskState::Accepted,
            TaskState::Preparing,
            TaskState::Ready,
            TaskState::Starting,
            TaskState::Shutdown
        ]
    );
    assert_eq!(
        reports[4].status.message, "shut down before start",
        "{reports:?}"
    );
    runner_gone(&exec, "t1").await;
    let calls = fake.calls();
    assert!(calls.contains(&"remove t1".to_string()), "{calls:?}");
    assert!(!calls.contains(&"start t1".to_string()), "{calls:?}");
    assert!(fake.inner().containers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_start_stops_the_container_once_it_runs() {
    let fake = Fake::new();
    fake.hold("start");
    let (exec, mut rx) = executor(&fake);
    exec.apply(set(vec![task("t1", "assigned", "running")]))
        .await;
    fake.saw("start t1").await;
    exec.apply(set(vec![task("t1", "starting", "shutdown")]))
        .await;
    fake.release("start");
    let reports = until(&mut rx, "t1", TaskState::Shutdown).await;
    let last = &reports.last().expect("report").status;
    assert_eq!(last.message, "shut down");
    assert_eq!(last.exit_code, Some(143));
    assert!(states(&reports).contains(&TaskState::Running));
    runner_gone(&exec, "t1").await;
    let calls = fake.calls();
    assert!(calls.ends_with(&["stop t1".into(), "remove t1".into(), "release t1".into()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_running_at_start_is_adopted() {
    let fake = Fake::new();
    fake.add_container("t1", ContainerStatus::Running);
    fake.inner()
        .addresses
        .insert("t1".into(), Ipv4Addr::new(10, 0, 0, 7));
    let (exec, mut rx) = executor(&fake);
    exec.apply(set(vec![task("t1", "starting", "running")]))
        .await;
    let reports = until(&mut rx, "t1", TaskState::Running).await;
    assert_eq!(states(&reports), [TaskState::Running]);
    assert_eq!(reports[0].status.address.as_deref(), Some("10.0.0.7"));
    assert!(exec.has_runner("t1"));
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    // It is monitored: its exit is seen.
    fake.exit("t1", 0);
    let reports = until(&mut rx, "t1", TaskState::Complete).await;
    assert_eq!(reports.last().expect("report").status.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_zero_exit_fails_the_task_and_removes_its_container() {
    let fake = Fake::new();
    let (exec, mut rx) = start_t1(&fake).await;
    fake.exit("t1", 1);
    let reports = until(&mut rx, "t1", TaskState::Failed).await;
    let failed = &reports.last().expect("report").status;
    assert_eq!(failed.message, "task: non-zero exit (1)");
    assert_eq!(failed.err.as_deref(), Some("task: non-zero exit (1)"));
    assert_eq!(failed.exit_code, Some(1));
    runner_gone(&exec, "t1").await;
    assert!(fake
        .calls()
        .ends_with(&["remove t1".into(), "release t1".into()]));
    assert!(fake.inner().containers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_without_the_task_stops_its_runner() {
    let fake = Fake::new();
    let (exec, mut rx) = start_t1(&fake).await;
    exec.apply(set(Vec::new())).await;
    let reports = until(&mut rx, "t1", TaskState::Shutdown).await;
    assert_eq!(reports.last().expect("report").status.message, "shut down");
    runner_gone(&exec, "t1").await;
    assert!(fake
        .calls()
        .ends_with(&["stop t1".into(), "remove t1".into(), "release t1".into()]));
    assert!(fake.inner().containers.is_empty());
    assert!(fake.inner().addresses.is_empty());
}
