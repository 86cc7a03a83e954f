//! The agent's task executor: turns the dispatcher's assignment sets into containers through
//! the runtime driver, and reports every task state change upward.
//!
//! One runner (a tokio task) per assigned task walks Swarm's states — accepted → preparing →
//! ready → starting → running → complete | failed | shutdown | rejected — and never moves a
//! task backwards. Containers are named by task id, so after an agent restart the executor
//! re-adopts a running container instead of starting a new one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use tokio::sync::{mpsc, watch};

use flotilla_runtime::{ContainerStatus, Runtime, RuntimeDriver};
use flotilla_types::{HealthProbe, Task, TaskState, TaskStatus};

use crate::api::dispatch::{Assignments, StatusReport};
use crate::manager::now_ms;
use crate::network::{NodeNet, TaskNet};
use crate::NodeCtx;

/// What a runner is told from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    Stop,
}

struct Runner {
    cmd: watch::Sender<Command>,
}

pub struct Executor {
    ctx: std::sync::Weak<NodeCtx>,
    rt: Runtime,
    runners: Mutex<HashMap<String, Runner>>,
    reports: mpsc::UnboundedSender<StatusReport>,
    /// Task networking; `None` with `--network none` (tasks get only loopback).
    net: Option<Arc<NodeNet>>,
    /// Bounds how many tasks go through the start path (mount, `runc create`, namespace, veth,
    /// start) at once. The steps are mostly CPU-bound, so a bound costs little throughput, and
    /// it keeps a 100-replica burst off the node's one netlink connection: in one run with 100
    /// in flight a task waited for its veth forever, most likely a lost netlink reply (the wait
    /// is now also bounded by `ATTACH_TIMEOUT`). 16 in flight instead of 8 on 2 CPUs was tried
    /// (BENCHMARKS.md, fifth session): no clear gain for 20 replicas, 0.1–0.2 s slower for 100.
    start_slots: Arc<tokio::sync::Semaphore>,
    /// One lock per image digest being pulled: the tasks of a new image wait for one pull and
    /// one unpack instead of each pulling and unpacking the same layers at once.
    /// The lock holds the error of a pull that failed while others waited: they fail with it
    /// instead of each trying the same unreachable managers in turn.
    image_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<String>>>>>,
}

/// How long wiring a task's veth may take before the task fails.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// Tasks in the start path at once: `FLOTILLA_START_CONCURRENCY`, else 4 per CPU (min 4).
fn start_concurrency() -> usize {
    std::env::var("FLOTILLA_START_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| 4 * n.get())
                .unwrap_or(4)
                .max(4)
        })
}

impl Executor {
    pub fn new(
        ctx: &Arc<NodeCtx>,
        rt: Runtime,
        net: Option<Arc<NodeNet>>,
    ) -> (Arc<Executor>, mpsc::UnboundedReceiver<StatusReport>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Executor {
                ctx: Arc::downgrade(ctx),
                rt,
                runners: Mutex::new(HashMap::new()),
                reports: tx,
                net,
                start_slots: Arc::new(tokio::sync::Semaphore::new(start_concurrency())),
                image_locks: Mutex::new(HashMap::new()),
            }),
            rx,
        )
    }

    fn report(&self, task: &Task, status: TaskStatus) {
        let _ = self.reports.send(StatusReport {
            task_id: task.id.clone(),
            status,
        });
    }

    /// Applies a complete assignment set.
    pub async fn apply(self: &Arc<Self>, set: Assignments) {
        if let Some(ctx) = self.ctx.upgrade() {
            ctx.agent_images.note(&set);
        }
        let wanted: HashSet<String> = set.tasks.iter().map(|t| t.id.clone()).collect();
        // One listing of this node's containers serves the whole pass.
        let containers = self.rt.list().await.unwrap_or_default();
        let present: HashSet<String> = containers.iter().map(|c| c.id.clone()).collect();
        for task in set.tasks {
            let stop = task.desired_state > TaskState::Running;
            let exists = {
                let runners = match self.runners.lock() {
                    Ok(r) => r,
                    Err(p) => p.into_inner(),
                };
                match runners.get(&task.id) {
                    Some(r) => {
                        if stop {
                            let _ = r.cmd.send(Command::Stop);
                        }
                        true
                    }
                    None => false,
                }
            };
            if exists {
                continue;
            }
            if stop || task.status.state.is_terminal() {
                // Not (or no longer) wanted here, and no runner: make sure nothing runs (e.g. a
                // container that kept running while this node was cut off), and record the
                // shutdown if the task had not ended yet.
                let has_container = present.contains(&task.id);
                if !has_container && task.status.state.is_terminal() {
                    continue;
                }
                let this = self.clone();
                tokio::spawn(async move {
                    if has_container {
                        let _ = this.rt.stop(&task.id, grace_of(&task)).await;
                        let _ = this.rt.remove(&task.id, true).await;
                        tracing::info!(task = %task.id, "stopped a container its task no longer wants");
                    }
                    if let Some(net) = &this.net {
                        net.release_task(&task.id).await;
                    }
                    if !task.status.state.is_terminal() {
                        let mut st = TaskStatus::new(TaskState::Shutdown, now_ms(), "shut down");
                        st.container_id = task.status.container_id.clone();
                        this.report(&task, st);
                    }
                });
                continue;
            }
            let (tx, rx) = watch::channel(Command::Run);
            if let Ok(mut runners) = self.runners.lock() {
                runners.insert(task.id.clone(), Runner { cmd: tx });
            }
            let this = self.clone();
            tokio::spawn(async move {
                let id = task.id.clone();
                this.run_task(task, rx).await;
                // Every way out of a runner removes the container: free its network too.
                if let Some(net) = &this.net {
                    net.release_task(&id).await;
                }
                if let Ok(mut runners) = this.runners.lock() {
                    runners.remove(&id);
                }
            });
        }
        // Containers whose task is gone from the set: stop, remove, drop their logs (the task
        // history was pruned).
        for c in containers {
            if wanted.contains(&c.id) {
                continue;
            }
            // A runner still owns it: tell it to stop instead.
            let handled = match self.runners.lock() {
                Ok(r) => r.get(&c.id).map(|r| r.cmd.send(Command::Stop)).is_some(),
                Err(_) => false,
            };
            if handled {
                continue;
            }
            let rt = self.rt.clone();
            let net = self.net.clone();
            tokio::spawn(async move {
                let _ = rt.stop(&c.id, Duration::from_secs(10)).await;
                if let Err(e) = rt.remove(&c.id, false).await {
                    tracing::warn!(container = %c.id, error = %e, "removing container failed");
                }
                if let Some(net) = net {
                    net.release_task(&c.id).await;
                }
            });
        }
        // Network namespaces left by tasks that have neither a runner nor a container (e.g.
        // the agent died between preparing the network and creating the container).
        if let Some(net) = &self.net {
            for id in net.prepared_tasks() {
                let busy = self
                    .runners
                    .lock()
                    .map(|r| r.contains_key(&id))
                    .unwrap_or(true);
                if !busy && !present.contains(&id) && !wanted.contains(&id) {
                    net.release_task(&id).await;
                }
            }
        }
        // Logs of tasks that no longer exist at all.
        let logs = self.rt.config().root.join("logs");
        if let Ok(entries) = std::fs::read_dir(&logs) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                let busy = self
                    .runners
                    .lock()
                    .map(|r| r.contains_key(&id))
                    .unwrap_or(true);
                if !wanted.contains(&id)
                    && !busy
                    && !self.rt.config().root.join("containers").join(&id).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Makes a task's image ready to run: pulled if this node lacks it (only when the trust
    /// policy accepts it, see [`Self::pull`]), then its layers unpacked for containers. The
    /// tasks of an image being pulled wait for one pull and one unpack (a lock per digest)
    /// instead of each pulling and unpacking the same layers; a present image takes no lock
    /// (the create unpacks what is missing, after the task's trust check).
    async fn ensure_image(&self, image: &str, digest: &str) -> Result<(), String> {
        if self.rt.images().resolve(digest).is_ok() {
            return Ok(());
        }
        let lock = match self.image_locks.lock() {
            Ok(mut m) => m.entry(digest.to_string()).or_default().clone(),
            Err(_) => return Err("executor state poisoned".into()),
        };
        let res = async {
            let mut failed = lock.lock().await;
            if self.rt.images().resolve(digest).is_ok() {
                return Ok(()); // pulled by another task meanwhile
            }
            if let Some(e) = failed.as_ref() {
                return Err(e.clone()); // the pull this task waited for failed
            }
            if let Err(e) = self.pull(image).await {
                *failed = Some(e.clone());
                return Err(e);
            }
            let rt = self.rt.clone();
            let d = digest.to_string();
            let prepared = tokio::task::spawn_blocking(move || rt.prepare_image(&d)).await;
            if let Ok(Err(e)) = prepared {
                // The create unpacks again and reports the error with the task.
                tracing::debug!(image, error = %e, "unpacking the image's layers failed");
            }
            Ok(())
        }
        .await;
        // The last task of the burst drops the lock from the map.
        if let Ok(mut m) = self.image_locks.lock() {
            if Arc::strong_count(&lock) == 2 {
                m.remove(digest);
            }
        }
        res
    }

    /// Pulls an image (pinned by digest) from the managers' registries, verifying every blob.
    /// The trust policy is checked on the manifest and its signatures before any layer is
    /// fetched, so an image the cluster does not trust never reaches this node's disk, let
    /// alone the layer unpacker. Refused by every manager: the trust error alone (the task's
    /// rejection message).
    async fn pull(&self, image: &str) -> Result<(), String> {
        let Some(ctx) = self.ctx.upgrade() else {
            return Err("node shutting down".into());
        };
        let policy = ctx.agent_images.policy();
        let mut last = format!("image {image} is not on this node and no manager is known");
        let mut refused = None;
        for addr in crate::agent::targets(&ctx) {
            let Some(client) = ctx.tls.registry(&addr) else {
                continue;
            };
            let pulled = flotilla_registry::pull_trusted(
                &client,
                self.rt.images(),
                image,
                Some(&policy),
                |_| {},
            )
            .await;
            match pulled {
                Ok(d) => {
                    tracing::info!(image, digest = %d, manager = %addr, "pulled image");
                    return Ok(());
                }
                Err(flotilla_registry::RegistryError::NotTrusted(e)) => {
                    refused = Some(e.to_string())
                }
                Err(e) => last = format!("pulling {image} from {addr}: {e}"),
            }
        }
        Err(refused.unwrap_or(last))
    }

    /// The trust policy's verdict on a task's image (see `trust`).
    async fn verify_image(&self, image: &str, digest: &str) -> Result<(), String> {
        match self.ctx.upgrade() {
            Some(ctx) => crate::trust::verify_image(&ctx, self.rt.images(), image, digest).await,
            None => Err("node shutting down".into()),
        }
    }

    async fn run_task(self: &Arc<Self>, task: Task, mut cmd: watch::Receiver<Command>) {
        let id = task.id.clone();
        let now = now_ms;
        let adopted = self.rt.state(&id).await.ok();
        let address: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let status = |state: TaskState, msg: &str| {
            let mut st = TaskStatus::new(state, now(), msg);
            st.container_id = Some(id.clone());
            st.address = address.get().cloned();
            st
        };
        match adopted {
            Some(s) if s.status == ContainerStatus::Running => {
                tracing::info!(task = %id, pid = s.pid, "re-adopted running container");
                if let Some(net) = &self.net {
                    // The persisted allocation, else what the store already has (never report a
                    // running task without its address: it would leave the load-balancing pools).
                    match net.address_of(&id).await {
                        Some(a) => {
                            let _ = address.set(a.to_string());
                        }
                        None => {
                            if let Some(a) = &task.status.address {
                                let _ = address.set(a.clone());
                            }
                        }
                    }
                }
                if task.status.state < TaskState::Running
                    || task.status.address.as_ref() != address.get()
                {
                    let mut st = status(TaskState::Running, "started");
                    st.health = task.status.health.clone();
                    self.report(&task, st);
                }
            }
            Some(s)
                if s.status == ContainerStatus::Stopped || s.status == ContainerStatus::Unknown =>
            {
                // Ended (or its shim died) while the agent was away.
                let code = s.exit_code;
                let mut st = match code {
                    Some(0) => status(TaskState::Complete, "finished"),
                    Some(c) => {
                        let mut st =
                            status(TaskState::Failed, &format!("task: non-zero exit ({c})"));
                        st.err = Some(format!("task: non-zero exit ({c})"));
                        st
                    }
                    None => {
                        let mut st =
                            status(TaskState::Failed, "container's shim died; outcome unknown");
                        st.err = Some("shim died".into());
                        st
                    }
                };
                st.exit_code = code;
                let _ = self.rt.remove(&id, true).await;
                self.report(&task, st);
                return;
            }
            _ => {
                if let Some(_old) = adopted {
                    let _ = self.rt.remove(&id, true).await;
                }
                self.report(&task, status(TaskState::Accepted, "accepted"));
                self.report(&task, status(TaskState::Preparing, "preparing"));
                let t0 = std::time::Instant::now();
                let c = &task.spec.container;
                // Pinned `name:tag@sha256:…` → the digest; anything else is resolved as is.
                let digest = crate::trust::digest_of(&c.image)
                    .unwrap_or(&c.image)
                    .to_string();
                if let Err(msg) = self.ensure_image(&c.image, &digest).await {
                    let mut st = status(TaskState::Rejected, &msg);
                    st.err = Some(msg);
                    self.report(&task, st);
                    return;
                }
                if let Err(msg) = self.verify_image(&c.image, &digest).await {
                    let mut st = status(TaskState::Rejected, &msg);
                    st.err = Some(msg);
                    self.report(&task, st);
                    return;
                }
                let t_image = t0.elapsed();
                let _slot = self.start_slots.clone().acquire_owned().await;
                let t_wait = t0.elapsed();
                let mut tnet: Option<TaskNet> = None;
                if let Some(net) = &self.net {
                    let hostname = task.id[..12.min(task.id.len())].to_string();
                    match net.prepare_task(&id, &hostname).await {
                        Ok(n) => {
                            let _ = address.set(n.addr.to_string());
                            tnet = Some(n);
                        }
                        Err(msg) => {
                            let mut st = status(TaskState::Rejected, &msg);
                            st.err = Some(msg);
                            self.report(&task, st);
                            return;
                        }
                    }
                }
                let t_net = t0.elapsed();
                let spec = container_spec(&task, &digest, tnet.as_ref());
                self.report(&task, status(TaskState::Ready, "ready"));
                // `runc create` makes the container's network namespace (inside its user
                // namespace); it is named and wired before the process starts.
                let create = self.rt.create(spec).await;
                let attached = match (&create, &self.net, &tnet) {
                    (Ok(_), Some(net), Some(t)) => {
                        // Bounded: a netlink reply that never comes must fail the task (it
                        // is then replaced), not leave it in `ready` forever.
                        let wire = async {
                            let pid = self.rt.state(&id).await.map_err(|e| e.to_string())?.pid;
                            let pid = u32::try_from(pid)
                                .map_err(|_| format!("container init has pid {pid}"))?;
                            net.adopt_netns(t, pid).await?;
                            net.attach_task(t).await
                        };
                        match tokio::time::timeout(ATTACH_TIMEOUT, wire).await {
                            Ok(r) => r,
                            Err(_) => Err(format!(
                                "task network: wiring the veth took over {} s",
                                ATTACH_TIMEOUT.as_secs()
                            )),
                        }
                    }
                    _ => Ok(()),
                };
                let t_create = t0.elapsed();
                let create = match (create, attached) {
                    (Ok(info), Ok(())) => Ok(info),
                    (Err(e), _) => Err(e.to_string()),
                    (Ok(_), Err(msg)) => {
                        let _ = self.rt.remove(&id, true).await;
                        Err(msg)
                    }
                };
                if let Err(e) = create {
                    let mut st = status(TaskState::Rejected, &format!("create: {e}"));
                    st.err = Some(e);
                    self.report(&task, st);
                    return;
                }
                self.report(&task, status(TaskState::Starting, "starting"));
                if *cmd.borrow() == Command::Stop {
                    let _ = self.rt.remove(&id, true).await;
                    self.report(&task, status(TaskState::Shutdown, "shut down before start"));
                    return;
                }
                let started = self.rt.start(&id).await;
                tracing::debug!(
                    task = %id,
                    image_ms = t_image.as_millis() as u64,
                    queued_ms = (t_wait - t_image).as_millis() as u64,
                    network_ms = (t_net - t_wait).as_millis() as u64,
                    create_ms = (t_create - t_net).as_millis() as u64,
                    start_ms = (t0.elapsed() - t_create).as_millis() as u64,
                    "task start stages"
                );
                if let Err(e) = started {
                    let mut st = status(TaskState::Failed, &format!("start: {e}"));
                    st.err = Some(e.to_string());
                    let _ = self.rt.remove(&id, true).await;
                    self.report(&task, st);
                    return;
                }
                self.report(&task, status(TaskState::Running, "started"));
            }
        }
        // Monitor: exit, stop request, health checks.
        let hc = task.spec.container.healthcheck.clone();
        let started = tokio::time::Instant::now();
        let mut failures = 0u32;
        let mut health: Option<&'static str> = hc.as_ref().map(|_| "starting");
        let interval = hc
            .as_ref()
            .map(|h| Duration::from_nanos(h.interval).max(Duration::from_millis(100)))
            .unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        let rt = self.rt.clone();
        let wait_id = id.clone();
        let mut exit = Box::pin(async move { rt.wait(&wait_id).await });
        loop {
            tokio::select! {
                res = &mut exit => {
                    let mut st = match res {
                        Ok(e) if e.oom_killed => {
                            let mut st = status(TaskState::Failed, "out of memory: killed by the kernel");
                            st.err = Some("OOM killed".into());
                            st.exit_code = Some(e.code);
                            st
                        }
                        Ok(e) if e.code == 0 => {
                            let mut st = status(TaskState::Complete, "finished");
                            st.exit_code = Some(0);
                            st
                        }
                        Ok(e) => {
                            let msg = format!("task: non-zero exit ({})", e.code);
                            let mut st = status(TaskState::Failed, &msg);
                            st.err = Some(msg);
                            st.exit_code = Some(e.code);
                            st
                        }
                        Err(e) => {
                            let mut st = status(TaskState::Failed, &format!("lost the container: {e}"));
                            st.err = Some(e.to_string());
                            st
                        }
                    };
                    if *cmd.borrow() == Command::Stop {
                        st.state = TaskState::Shutdown;
                        st.message = "shut down".into();
                    }
                    let _ = self.rt.remove(&id, true).await;
                    self.report(&task, st);
                    return;
                }
                changed = cmd.changed() => {
                    if changed.is_err() || *cmd.borrow() == Command::Stop {
                        let grace = grace_of(&task);
                        let res = self.rt.stop(&id, grace).await;
                        let mut st = status(TaskState::Shutdown, "shut down");
                        if let Ok(e) = res {
                            st.exit_code = Some(e.code);
                        }
                        let _ = self.rt.remove(&id, true).await;
                        self.report(&task, st);
                        return;
                    }
                }
                _ = ticker.tick(), if hc.is_some() => {
                    let Some(h) = hc.as_ref() else { continue };
                    let ok = probe(&self.rt, &id, address.get().map(String::as_str), h).await;
                    let in_start = started.elapsed() < Duration::from_nanos(h.start_period);
                    let before = health;
                    if ok {
                        failures = 0;
                        health = Some("healthy");
                    } else if !in_start {
                        failures += 1;
                        if failures >= h.retries.max(1) {
                            health = Some("unhealthy");
                        }
                    }
                    if health != before {
                        let mut st = status(TaskState::Running, match health {
                            Some("unhealthy") => "unhealthy: health check failed",
                            _ => "started",
                        });
                        st.health = health.map(str::to_string);
                        self.report(&task, st);
                    }
                }
            }
        }
    }
}

fn grace_of(task: &Task) -> Duration {
    Duration::from_nanos(
        task.spec
            .container
            .stop_grace_period
            .unwrap_or(10_000_000_000),
    )
}

/// Maps a task to the runtime's container spec.
fn container_spec(
    task: &Task,
    digest: &str,
    net: Option<&TaskNet>,
) -> flotilla_runtime::ContainerSpec {
    let c = &task.spec.container;
    let r = &task.spec.resources.limits;
    flotilla_runtime::ContainerSpec {
        id: task.id.clone(),
        image: digest.to_string(),
        entrypoint: c.command.clone(),
        args: if c.args.is_empty() {
            None
        } else {
            Some(c.args.clone())
        },
        env: c.env.clone(),
        workdir: c.workdir.clone(),
        user: c.user.clone(),
        hostname: Some(task.id[..12.min(task.id.len())].to_string()),
        mounts: net
            .map(|n| {
                vec![
                    flotilla_runtime::BindMount {
                        src: n.hosts.clone(),
                        dst: "/etc/hosts".into(),
                        readonly: true,
                    },
                    flotilla_runtime::BindMount {
                        src: n.resolv.clone(),
                        dst: "/etc/resolv.conf".into(),
                        readonly: true,
                    },
                ]
            })
            .unwrap_or_default(),
        resources: flotilla_runtime::Resources {
            memory_bytes: (r.memory_bytes > 0).then_some(r.memory_bytes as i64),
            nano_cpus: (r.nano_cpus > 0).then_some(r.nano_cpus),
            pids_limit: Some(4096),
            ..Default::default()
        },
        security: Default::default(),
        labels: c.labels.clone(),
        // The runtime creates the namespace (see `NodeNet::prepare_task`).
        network_namespace: None,
    }
}

/// Runs one health probe. Exec probes run inside the container through the OCI runtime.
async fn probe(
    rt: &Runtime,
    id: &str,
    addr: Option<&str>,
    h: &flotilla_types::HealthCheck,
) -> bool {
    let timeout = Duration::from_nanos(h.timeout).max(Duration::from_millis(100));
    match &h.probe {
        HealthProbe::Exec { cmd } => {
            let (runtime, root) = rt.oci_runtime(id);
            let mut child = match tokio::process::Command::new(runtime)
                .arg("--root")
                .arg(root)
                .args(["exec", id, "/bin/sh", "-c", cmd])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
            {
                Ok(c) => c,
                Err(_) => return false,
            };
            matches!(
                tokio::time::timeout(timeout, child.wait()).await,
                Ok(Ok(st)) if st.success()
            )
        }
        // Network probes go from the node to the task's address.
        HealthProbe::Http { path, port } => match addr {
            Some(a) => http_probe(a, *port, path, timeout).await,
            None => false,
        },
        HealthProbe::Tcp { port } => match addr {
            Some(a) => matches!(
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect((a, *port))).await,
                Ok(Ok(_))
            ),
            None => false,
        },
    }
}

/// `GET path` over HTTP/1.0; a 2xx or 3xx status is healthy (as Kubernetes' httpGet probe).
async fn http_probe(addr: &str, port: u16, path: &str, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let run = async {
        let mut s = tokio::net::TcpStream::connect((addr, port)).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}:{port}\r\nUser-Agent: flotilla-health\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let k = s.read(&mut buf[n..]).await.ok()?;
            if k == 0 {
                break;
            }
            n += k;
        }
        // "HTTP/1.x NNN"
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code: u16 = line.get(9..12)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, run).await, Ok(Some(true)))
}

/// Follows the assignment stream from the managers, reconnecting as needed.
pub async fn assignment_loop(ctx: Arc<NodeCtx>, exec: Arc<Executor>, stop: watch::Receiver<bool>) {
    let path = format!("/v1/nodes/{}/assignments", ctx.identity().node_id);
    follow::<Assignments, _, _>(ctx, path, stop, move |set| {
        let exec = exec.clone();
        async move { exec.apply(set).await }
    })
    .await
}

/// Follows the network map stream and programs this node's networking from it.
pub async fn network_loop(ctx: Arc<NodeCtx>, net: Arc<NodeNet>, stop: watch::Receiver<bool>) {
    let path = format!("/v1/nodes/{}/network", ctx.identity().node_id);
    let seen = ctx.clone();
    follow::<flotilla_types::NetworkMap, _, _>(ctx, path, stop, move |map| {
        let managers = map.nodes.iter().filter(|n| n.manager).map(|n| n.id.clone());
        if let Ok(mut g) = seen.known_managers.write() {
            *g = Some(managers.collect());
        }
        let net = net.clone();
        async move { net.apply_map(&map).await }
    })
    .await
}

/// Follows a newline-delimited JSON stream of a manager (trying each in turn, with backoff),
/// handing every message to `on`. Managers resend at least every 5 s; 12 s of silence means a
/// dead session.
async fn follow<T, F, Fut>(ctx: Arc<NodeCtx>, path: String, mut stop: watch::Receiver<bool>, on: F)
where
    T: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        for addr in crate::agent::targets(&ctx) {
            let client = ctx.tls.peer(&addr);
            let (tx, mut rx) = mpsc::unbounded_channel::<T>();
            let stream =
                client.stream_lines(&path, move |line| match serde_json::from_slice::<T>(line) {
                    Ok(a) => tx.send(a).is_ok(),
                    Err(_) => true,
                });
            tokio::pin!(stream);
            loop {
                tokio::select! {
                    _ = flotilla_api::server::stopped(&mut stop) => return,
                    res = &mut stream => {
                        if let Err(e) = res {
                            tracing::debug!(manager = %addr, path = %path, error = %e, "stream ended");
                        }
                        break;
                    }
                    Some(item) = rx.recv() => {
                        backoff = Duration::from_millis(100);
                        on(item).await;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(12)) => {
                        tracing::warn!(manager = %addr, path = %path, "stream went silent; reconnecting");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = flotilla_api::server::stopped(&mut stop) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Sends status reports to the managers in batches, keeping the newest per task and retrying
/// until a manager accepts them.
pub async fn report_loop(
    ctx: Arc<NodeCtx>,
    mut rx: mpsc::UnboundedReceiver<StatusReport>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<StatusReport> = Vec::new();
    loop {
        if pending.is_empty() {
            tokio::select! {
                _ = flotilla_api::server::stopped(&mut stop) => return,
                r = rx.recv() => match r {
                    Some(r) => pending.push(r),
                    None => return,
                },
            }
        }
        // Gather what else is queued right now; only the newest status per task is sent
        // (the store applies a batch atomically, one write per task).
        while let Ok(r) = rx.try_recv() {
            pending.push(r);
        }
        let mut newest: Vec<StatusReport> = Vec::with_capacity(pending.len());
        for r in pending.drain(..) {
            match newest.iter_mut().find(|n| n.task_id == r.task_id) {
                Some(n) => *n = r,
                None => newest.push(r),
            }
        }
        pending = newest;
        let node_id = ctx.identity().node_id;
        let path = format!("/v1/nodes/{node_id}/tasks");
        let body = match serde_json::to_vec(&pending) {
            Ok(b) => b,
            Err(_) => {
                pending.clear();
                continue;
            }
        };
        let mut sent = false;
        for addr in crate::agent::targets(&ctx) {
            let client = ctx.tls.peer(&addr).with_timeout(Duration::from_secs(10));
            match client
                .request(Method::POST, &path, Some(body.clone()))
                .await
            {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) if e.status() == Some(409) => {
                    // Raced with the orchestrator: resend shortly.
                    tracing::debug!(error = %e, "status report raced; resending");
                    break;
                }
                Err(e) => tracing::debug!(manager = %addr, error = %e, "status report failed"),
            }
        }
        if sent {
            pending.clear();
        } else {
            tokio::select! {
                _ = flotilla_api::server::stopped(&mut stop) => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}
