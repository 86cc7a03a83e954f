//! The agent's task executor: turns the dispatcher's assignment sets into containers through
//! the runtime driver, and reports every task state change upward.
//!
//! One runner (a tokio task) per assigned task walks Swarm's states — accepted → preparing →
//! ready → starting → running → complete | failed | shutdown | rejected — and never moves a
//! task backwards. Its decisions are [`runner::Runner`]'s, a pure state machine; this module
//! performs the effects it asks for (pull, verify, network, create, start, monitor, stop)
//! and feeds back their outcome, a failure as a [`TaskError`] (the runner turns its text into
//! the task's status message). A stop command is fed to the runner before each outcome (and
//! while monitoring), so a stop that arrives while a step runs keeps the runner from issuing
//! the next one. Blocking work (image store reads, unpacking, log sweeps) runs through
//! `crate::blocking`. Containers are named by task id, so after an agent restart the executor
//! re-adopts a running container instead of starting a new one.
//!
//! The executor performs its effects over [`ports`]: the runtime
//! ([`flotilla_runtime::RuntimeDriver`] and [`NodeRuntime`]), the task network
//! ([`TaskNetwork`]) and the cluster's images ([`TaskImages`]). The agent builds it over the
//! node's [`Runtime`], [`NodeNet`] and managers ([`Executor::new`]); its tests over fakes
//! ([`Executor::with_ports`]).
//!
//! - [`runner`]: the state machine, with a unit test per transition;
//! - [`ports`]: the traits the executor drives, and their implementations for the node;
//! - [`spec`]: a task's container spec;
//! - [`health`]: health probes.

pub mod health;
pub mod ports;
pub mod runner;
pub mod spec;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use flotilla_runtime::{ContainerStatus, Runtime};
use flotilla_types::{now_ms, Assignments, StatusReport, Task, TaskState, TaskStatus};

use crate::net::{NodeNet, TaskNet};
use crate::{blocking, AgentCtx, PullError, TaskError};
pub use ports::{ManagerImages, NodeRuntime, TaskImages, TaskNetwork};
use runner::{Effect, Event, ExitInfo, Found, Runner};

/// What a runner is told from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    Stop,
}

/// What an executor drives (see [`ports`]).
pub struct Ports {
    /// The container runtime.
    pub runtime: Arc<dyn NodeRuntime>,
    /// Task networking; `None` with `--network none` (tasks get only loopback).
    pub net: Option<Arc<dyn TaskNetwork>>,
    /// Image pulls and trust checks.
    pub images: Arc<dyn TaskImages>,
    /// Volumes, secrets and configs; `None` in tests that need none.
    pub storage: Option<Arc<crate::storage::NodeStorage>>,
}

pub struct Executor {
    rt: Arc<dyn NodeRuntime>,
    /// The command channel of each task's runner.
    runners: Mutex<HashMap<String, watch::Sender<Command>>>,
    reports: mpsc::UnboundedSender<StatusReport>,
    /// Task networking; `None` with `--network none` (tasks get only loopback).
    net: Option<Arc<dyn TaskNetwork>>,
    images: Arc<dyn TaskImages>,
    storage: Option<Arc<crate::storage::NodeStorage>>,
    /// Bounds how many tasks go through the start path (mount, `runc create`, namespace, veth,
    /// start) at once. The steps are mostly CPU-bound, so a bound costs little throughput, and
    /// it keeps a 100-replica burst off the node's one netlink connection (a lost netlink
    /// reply can leave a task waiting for its veth; that wait is also bounded by
    /// [`ATTACH_TIMEOUT`]). Measured on 2 CPUs: 16 in flight gain nothing over 8 for 20
    /// replicas and are 0.1–0.2 s slower for 100.
    start_slots: Arc<tokio::sync::Semaphore>,
    /// One lock per image digest being pulled: the tasks of a new image wait for one pull and
    /// one unpack instead of each pulling and unpacking the same layers at once.
    /// The lock holds the error of a pull that failed while others waited: they fail with it
    /// instead of each trying the same unreachable managers in turn.
    image_locks: Mutex<HashMap<String, Arc<PullLock>>>,
}

/// An image's pull lock, with the error of the pull that failed under it.
type PullLock = tokio::sync::Mutex<Option<Arc<PullError>>>;

/// How long wiring a task's veth may take before the task fails.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// The executor's maps hold no invariant a panic could break half-way (each update is one
/// insert or remove), so a poisoned lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
    /// The agent's executor: over the node's runtime, its task network (`None` with
    /// `--network none`) and the managers' images (see [`ManagerImages`]).
    pub fn new(
        ctx: &Arc<AgentCtx>,
        net: Option<Arc<NodeNet>>,
        storage: Option<Arc<crate::storage::NodeStorage>>,
    ) -> (Arc<Executor>, mpsc::UnboundedReceiver<StatusReport>) {
        let runtime: Runtime = ctx.runtime.clone();
        Executor::with_ports(Ports {
            runtime: Arc::new(runtime),
            net: net.map(|n| n as Arc<dyn TaskNetwork>),
            images: Arc::new(ManagerImages::new(ctx)),
            storage,
        })
    }

    /// An executor over `ports`; the receiver gets every task status it reports.
    pub fn with_ports(ports: Ports) -> (Arc<Executor>, mpsc::UnboundedReceiver<StatusReport>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Executor {
                rt: ports.runtime,
                runners: Mutex::new(HashMap::new()),
                reports: tx,
                net: ports.net,
                images: ports.images,
                storage: ports.storage,
                start_slots: Arc::new(tokio::sync::Semaphore::new(start_concurrency())),
                image_locks: Mutex::new(HashMap::new()),
            }),
            rx,
        )
    }

    fn report_status(&self, task_id: &str, status: TaskStatus) {
        let _ = self.reports.send(StatusReport {
            task_id: task_id.to_string(),
            status,
        });
    }

    fn has_runner(&self, id: &str) -> bool {
        lock(&self.runners).contains_key(id)
    }

    /// Applies a complete assignment set: starts a runner for each new task, tells runners of
    /// tasks no longer wanted here to stop, and removes containers, namespaces and logs that
    /// belong to no task of the set.
    pub async fn apply(self: &Arc<Self>, set: Assignments) {
        self.images.note(&set);
        let wanted: HashSet<String> = set.tasks.iter().map(|t| t.id.clone()).collect();
        // One listing of this node's containers serves the whole pass.
        let containers = self.rt.list().await.unwrap_or_default();
        let present: HashSet<String> = containers.iter().map(|c| c.id.clone()).collect();
        for task in set.tasks {
            self.apply_task(task, &present);
        }
        for c in containers.into_iter().filter(|c| !wanted.contains(&c.id)) {
            self.remove_unwanted(c.id);
        }
        self.sweep_namespaces(&present, &wanted).await;
        self.sweep_logs(wanted).await;
    }

    /// One task of the set: a command to its runner, a new runner, or (a task that should not
    /// run and has none) making sure nothing runs.
    fn apply_task(self: &Arc<Self>, task: Task, present: &HashSet<String>) {
        let stop = task.desired_state > TaskState::Running;
        if let Some(cmd) = lock(&self.runners).get(&task.id) {
            if stop {
                let _ = cmd.send(Command::Stop);
            }
            return;
        }
        if stop || task.status.state.is_terminal() {
            let has_container = present.contains(&task.id);
            if has_container || !task.status.state.is_terminal() {
                tokio::spawn(self.clone().shut_down(task, has_container));
            }
            return;
        }
        let (tx, rx) = watch::channel(Command::Run);
        lock(&self.runners).insert(task.id.clone(), tx);
        let this = self.clone();
        tokio::spawn(async move {
            let id = task.id.clone();
            this.run_task(task, rx).await;
            // Every way out of a runner removes the container: free its network and its
            // files too.
            if let Some(net) = &this.net {
                net.release_task(&id).await;
            }
            if let Some(s) = &this.storage {
                s.release(&id).await;
            }
            lock(&this.runners).remove(&id);
        });
    }

    /// A task not (or no longer) wanted here that has no runner: stops a container that kept
    /// running (e.g. while this node was cut off), and records the shutdown if the task had
    /// not ended yet.
    async fn shut_down(self: Arc<Self>, task: Task, has_container: bool) {
        if has_container {
            let _ = self.rt.stop(&task.id, runner::grace_of(&task)).await;
            let _ = self.rt.remove(&task.id, true).await;
            tracing::info!(task = %task.id, "stopped a container its task no longer wants");
        }
        if let Some(net) = &self.net {
            net.release_task(&task.id).await;
        }
        if let Some(s) = &self.storage {
            s.release(&task.id).await;
        }
        if !task.status.state.is_terminal() {
            let mut st = TaskStatus::new(TaskState::Shutdown, now_ms(), "shut down");
            st.container_id = task.status.container_id.clone();
            self.report_status(&task.id, st);
        }
    }

    /// A container whose task is gone from the set: its runner stops it, or it is stopped
    /// and removed with its logs (the task history was pruned).
    fn remove_unwanted(&self, id: String) {
        if let Some(cmd) = lock(&self.runners).get(&id) {
            let _ = cmd.send(Command::Stop);
            return;
        }
        let rt = self.rt.clone();
        let net = self.net.clone();
        let storage = self.storage.clone();
        tokio::spawn(async move {
            let _ = rt.stop(&id, Duration::from_secs(10)).await;
            if let Err(e) = rt.remove(&id, false).await {
                tracing::warn!(container = %id, error = %e, "removing container failed");
            }
            if let Some(net) = net {
                net.release_task(&id).await;
            }
            if let Some(s) = storage {
                s.release(&id).await;
            }
        });
    }

    /// Network namespaces left by tasks that have neither a runner nor a container (e.g. the
    /// agent died between preparing the network and creating the container).
    async fn sweep_namespaces(&self, present: &HashSet<String>, wanted: &HashSet<String>) {
        if let Some(s) = &self.storage {
            for id in s.tasks_with_files() {
                if !self.has_runner(&id) && !present.contains(&id) && !wanted.contains(&id) {
                    s.release(&id).await;
                }
            }
        }
        let Some(net) = &self.net else { return };
        for id in net.prepared_tasks().await {
            if !self.has_runner(&id) && !present.contains(&id) && !wanted.contains(&id) {
                net.release_task(&id).await;
            }
        }
    }

    /// Logs of tasks that no longer exist at all (read and removed off the async threads).
    async fn sweep_logs(self: &Arc<Self>, wanted: HashSet<String>) {
        let this = self.clone();
        let _ = blocking(move || {
            let Ok(entries) = std::fs::read_dir(this.rt.logs_dir()) else {
                return;
            };
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                if !wanted.contains(&id) && !this.has_runner(&id) && !this.rt.has_state_dir(&id) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        })
        .await;
    }

    /// Makes a task's image ready to run: pulled if this node lacks it (only when the trust
    /// policy accepts it, see [`Self::pull`]), then its layers unpacked for containers. The
    /// tasks of an image being pulled wait for one pull and one unpack (a lock per digest)
    /// instead of each pulling and unpacking the same layers; a present image takes no lock
    /// (the create unpacks what is missing, after the task's trust check).
    async fn ensure_image(&self, image: &str, digest: &str) -> Result<(), TaskError> {
        if self.has_image(digest).await {
            return Ok(());
        }
        let lock = lock(&self.image_locks)
            .entry(digest.to_string())
            .or_default()
            .clone();
        let res = self.pull_once(&lock, image, digest).await;
        // The last task of the burst drops the lock from the map.
        let mut locks = self::lock(&self.image_locks);
        if Arc::strong_count(&lock) == 2 {
            locks.remove(digest);
        }
        res
    }

    /// Under the image's pull lock: pulls and unpacks the image, unless another task pulled it
    /// meanwhile or the pull this task waited for failed (then fails with that pull's error).
    async fn pull_once(&self, lock: &PullLock, image: &str, digest: &str) -> Result<(), TaskError> {
        let mut failed = lock.lock().await;
        if self.has_image(digest).await {
            return Ok(()); // pulled by another task meanwhile
        }
        if let Some(e) = failed.as_ref() {
            return Err(TaskError::Pull(e.clone()));
        }
        if let Err(e) = self.images.pull(image).await {
            if let TaskError::Pull(p) = &e {
                *failed = Some(p.clone());
            }
            return Err(e);
        }
        let rt = self.rt.clone();
        let d = digest.to_string();
        if let Ok(Err(e)) = blocking(move || rt.prepare_image(&d)).await {
            // The create unpacks again and reports the error with the task.
            tracing::debug!(image, error = %e, "unpacking the image's layers failed");
        }
        Ok(())
    }

    /// Whether the image store holds `digest` (a read of its index).
    async fn has_image(&self, digest: &str) -> bool {
        let (rt, d) = (self.rt.clone(), digest.to_string());
        matches!(blocking(move || rt.has_image(&d)).await, Ok(true))
    }

    /// The health check of a task's image, when the service sets none and the image has one.
    async fn image_healthcheck(&self, task: &Task) -> Option<flotilla_types::HealthCheck> {
        if task.spec.container.healthcheck.is_some() {
            return None;
        }
        let (rt, d) = (self.rt.clone(), image_digest(task));
        blocking(move || rt.image_healthcheck(&d))
            .await
            .ok()
            .flatten()
    }

    /// The trust policy's verdict on a task's image.
    async fn verify_image(&self, image: &str, digest: &str) -> Result<(), TaskError> {
        self.images.verify(image, digest).await
    }

    /// Runs one task: feeds the [`Runner`] the outcome of each effect it asks for, until it
    /// finishes. A stop command is passed on before each outcome (and while monitoring).
    async fn run_task(self: &Arc<Self>, task: Task, mut cmd: watch::Receiver<Command>) {
        let id = task.id.clone();
        let mut runner = Runner::new(task.clone());
        let (found, address, addresses) = self.found(&id, &task).await;
        runner.set_addresses(addresses);
        if found == Found::Running {
            runner.use_image_healthcheck(self.image_healthcheck(&task).await);
        }
        let mut pending = VecDeque::new();
        feed(
            &mut runner,
            &mut cmd,
            Event::Begin { found, address },
            &mut pending,
        );
        let mut start = StartPath::default();
        while let Some(effect) = pending.pop_front() {
            let event = match effect {
                Effect::Report(st) => {
                    self.report_status(&id, st);
                    None
                }
                Effect::EnsureImage => {
                    let digest = image_digest(&task);
                    let res = self.ensure_image(&task.spec.container.image, &digest).await;
                    if res.is_ok() {
                        runner.use_image_healthcheck(self.image_healthcheck(&task).await);
                    }
                    start.t0 = Some(std::time::Instant::now());
                    Some(Event::ImageReady(res))
                }
                Effect::VerifyImage => {
                    let digest = image_digest(&task);
                    let res = self.verify_image(&task.spec.container.image, &digest).await;
                    start.t_image = start.elapsed();
                    Some(Event::ImageVerified(res))
                }
                Effect::AcquireSlot => {
                    start.slot = self.start_slots.clone().acquire_owned().await.ok();
                    start.t_wait = start.elapsed();
                    Some(Event::SlotAcquired)
                }
                Effect::PrepareNetwork => {
                    let res = self.prepare_network(&task, &mut start).await;
                    if let Some(n) = &start.net {
                        runner.set_addresses(n.network_addresses());
                    }
                    start.t_net = start.elapsed();
                    Some(Event::NetworkPrepared(res))
                }
                Effect::Create => {
                    let res = self.create(&task, start.net.as_ref()).await;
                    start.t_create = start.elapsed();
                    Some(Event::Created(res))
                }
                Effect::Start => {
                    let res = self.rt.start(&id).await.map_err(TaskError::from);
                    start.log_stages(&id);
                    Some(Event::Started(res))
                }
                Effect::Monitor => {
                    start.slot = None;
                    self.monitor(&mut runner, &mut cmd, &mut pending).await;
                    None
                }
                Effect::Stop { grace } => {
                    let code = self.rt.stop(&id, grace).await.ok().map(|e| e.code);
                    Some(Event::Stopped { exit_code: code })
                }
                Effect::Remove => {
                    let _ = self.rt.remove(&id, true).await;
                    None
                }
                Effect::Finish => break,
            };
            if let Some(event) = event {
                feed(&mut runner, &mut cmd, event, &mut pending);
            }
        }
    }

    /// What a runner finds of its container when it begins (after an agent restart), and the
    /// address of a running one: the persisted allocation (else the runner keeps the store's,
    /// so a running task never loses its address and leaves the load-balancing pools).
    async fn found(
        &self,
        id: &str,
        task: &Task,
    ) -> (
        Found,
        Option<String>,
        std::collections::BTreeMap<String, String>,
    ) {
        let found = match self.rt.state(id).await.ok() {
            None => Found::Nothing,
            Some(s) if s.status == ContainerStatus::Running => Found::Running,
            Some(s)
                if s.status == ContainerStatus::Stopped || s.status == ContainerStatus::Unknown =>
            {
                Found::Exited { code: s.exit_code }
            }
            Some(_) => Found::Other,
        };
        let networks: Vec<String> = task
            .spec
            .networks
            .iter()
            .map(|a| a.target.clone())
            .collect();
        let (mut address, mut addresses) = (None, std::collections::BTreeMap::new());
        if let (Found::Running, Some(net)) = (&found, &self.net) {
            if networks.is_empty() {
                address = net.address_of(id).await.map(|a| a.to_string());
            } else {
                let on = net.network_addresses(id).await;
                address = networks
                    .first()
                    .and_then(|n| on.get(n))
                    .map(|a| a.to_string());
                addresses = on.into_iter().map(|(n, a)| (n, a.to_string())).collect();
                net.set_task_networks(id, networks).await;
            }
            let servers = dns_servers(task);
            if !servers.is_empty() {
                net.set_task_resolvers(id, servers).await;
            }
        }
        if found == Found::Running {
            tracing::info!(task = %id, "re-adopted running container");
        }
        (found, address, addresses)
    }

    /// Prepares the task's network namespace and address (`None` without task networking).
    async fn prepare_network(
        &self,
        task: &Task,
        start: &mut StartPath,
    ) -> Result<Option<String>, TaskError> {
        let Some(net) = &self.net else {
            return Ok(None);
        };
        // The same name the container gets (`spec::container_spec`), for its /etc/hosts.
        let names = crate::net::TaskNames {
            hostname: spec::hostname_of(task),
            search: task.spec.container.dns_search.clone(),
            options: task.spec.container.dns_options.clone(),
            servers: dns_servers(task),
            networks: task
                .spec
                .networks
                .iter()
                .map(|a| a.target.clone())
                .collect(),
        };
        let n = net.prepare_task(&task.id, &names).await?;
        let addr = n.addr.to_string();
        start.net = Some(n);
        Ok(Some(addr))
    }

    /// `runc create` (which makes the container's network namespace inside its user
    /// namespace), then the namespace is named and wired before the process starts. A
    /// container whose wiring failed is removed.
    async fn create(&self, task: &Task, tnet: Option<&TaskNet>) -> Result<(), TaskError> {
        let id = &task.id;
        let mut spec = spec::container_spec(task, &image_digest(task), tnet);
        if let Some(storage) = &self.storage {
            let (rt, d) = (self.rt.clone(), image_digest(task));
            let image_volumes = blocking(move || rt.image_volumes(&d)).await?;
            let m = storage.prepare(task, image_volumes, &*self.rt).await?;
            spec.mounts.extend(m.binds);
            spec.tmpfs.extend(m.tmpfs);
            if !m.exclusive.is_empty() {
                spec.labels
                    .insert(crate::storage::VOLUMES_LABEL.into(), m.exclusive.join(","));
            }
        }
        if let Err(e) = self.rt.create(spec).await {
            if let Some(s) = &self.storage {
                s.release(id).await;
            }
            return Err(e.into());
        }
        let (Some(net), Some(t)) = (&self.net, tnet) else {
            return Ok(());
        };
        // Bounded: a netlink reply that never comes must fail the task (it is then replaced),
        // not leave it in `ready` forever.
        let wired = match tokio::time::timeout(ATTACH_TIMEOUT, self.wire(id, &**net, t)).await {
            Ok(r) => r,
            Err(_) => Err(TaskError::AttachTimeout(ATTACH_TIMEOUT)),
        };
        if wired.is_err() {
            let _ = self.rt.remove(id, true).await;
        }
        wired
    }

    /// Names the created container's network namespace and wires its veth.
    async fn wire(&self, id: &str, net: &dyn TaskNetwork, t: &TaskNet) -> Result<(), TaskError> {
        let pid = self.rt.state(id).await?.pid;
        let pid = u32::try_from(pid).map_err(|_| TaskError::InitPid(pid))?;
        net.adopt_netns(t, pid).await?;
        Ok(net.attach_task(t).await?)
    }

    /// Watches a running task: its exit, a stop command, and health probes on the runner's
    /// schedule ([`Runner::probe_delay`]: the first at once, fast until healthy, then every
    /// interval). Reports (health changes) go out at once; the effects that end monitoring
    /// (stop, or remove/report/finish after an exit) are queued in `pending`.
    async fn monitor(
        &self,
        runner: &mut Runner,
        cmd: &mut watch::Receiver<Command>,
        pending: &mut VecDeque<Effect>,
    ) {
        let id = runner.task_id().to_string();
        let hc = runner.healthcheck().cloned();
        let started = tokio::time::Instant::now();
        let mut next_probe = runner.probe_delay(Duration::ZERO).map(|d| started + d);
        let rt = self.rt.clone();
        let wait_id = id.clone();
        let mut exit = Box::pin(async move { rt.wait(&wait_id).await });
        let mut commands = true;
        loop {
            let probe_at = next_probe.unwrap_or_else(|| started + Duration::from_secs(3600));
            let event = tokio::select! {
                res = &mut exit => Event::Exited(
                    res.map(|e| ExitInfo { code: e.code, oom_killed: e.oom_killed })
                        .map_err(TaskError::from),
                ),
                changed = cmd.changed(), if commands => {
                    if changed.is_ok() && *cmd.borrow() != Command::Stop {
                        continue;
                    }
                    // One stop is enough (a dropped sender stays "changed").
                    commands = false;
                    Event::StopRequested
                }
                _ = tokio::time::sleep_until(probe_at), if next_probe.is_some() => {
                    let Some(h) = hc.as_ref() else { continue };
                    let r = health::probe(&*self.rt, &id, runner.address(), h).await;
                    Event::Probe { ok: r.ok, output: r.output, since_start: started.elapsed() }
                }
            };
            let probed = matches!(event, Event::Probe { .. });
            for effect in runner.handle(event, now_ms()) {
                match effect {
                    Effect::Report(st) => self.report_status(&id, st),
                    other => pending.push_back(other),
                }
            }
            if !pending.is_empty() {
                return;
            }
            if probed {
                let now = tokio::time::Instant::now();
                next_probe = runner
                    .probe_delay(now.duration_since(started))
                    .map(|d| now + d);
            }
        }
    }
}

/// Feeds `event` to the runner and queues the effects it asks for. A stop commanded since
/// the last look is fed first: the runner then issues no further start-path step, and no
/// effect queued before the stop (a `Start`, a `Monitor`) outlives it.
fn feed(
    runner: &mut Runner,
    cmd: &mut watch::Receiver<Command>,
    event: Event,
    pending: &mut VecDeque<Effect>,
) {
    if stop_requested(cmd) {
        pending.extend(runner.handle(Event::StopRequested, now_ms()));
    }
    pending.extend(runner.handle(event, now_ms()));
}

/// Whether a stop was commanded since the last look (or the executor is gone).
fn stop_requested(cmd: &mut watch::Receiver<Command>) -> bool {
    match cmd.has_changed() {
        Ok(true) => *cmd.borrow_and_update() == Command::Stop,
        Ok(false) => false,
        Err(_) => true,
    }
}

/// A task's own resolvers (`--dns`, checked by the manager; an entry that does not parse is
/// left out).
fn dns_servers(task: &Task) -> Vec<std::net::SocketAddr> {
    task.spec
        .container
        .dns_servers
        .iter()
        .filter_map(|d| flotilla_types::parse_dns_server(d).ok())
        .collect()
}

/// The image a task's container is created from: the digest of a pinned
/// `name:tag@sha256:…`, anything else as it is.
fn image_digest(task: &Task) -> String {
    let image = &task.spec.container.image;
    flotilla_registry::digest_of(image)
        .unwrap_or(image)
        .to_string()
}

/// What the start path holds while it runs: the start slot, the task's network, and stage
/// timings for the debug log.
#[derive(Default)]
struct StartPath {
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    net: Option<TaskNet>,
    t0: Option<std::time::Instant>,
    t_image: Duration,
    t_wait: Duration,
    t_net: Duration,
    t_create: Duration,
}

impl StartPath {
    fn elapsed(&self) -> Duration {
        self.t0.map(|t| t.elapsed()).unwrap_or_default()
    }

    fn log_stages(&self, id: &str) {
        tracing::debug!(
            task = %id,
            image_ms = self.t_image.as_millis() as u64,
            queued_ms = self.t_wait.saturating_sub(self.t_image).as_millis() as u64,
            network_ms = self.t_net.saturating_sub(self.t_wait).as_millis() as u64,
            create_ms = self.t_create.saturating_sub(self.t_net).as_millis() as u64,
            start_ms = self.elapsed().saturating_sub(self.t_create).as_millis() as u64,
            "task start stages"
        );
    }
}
