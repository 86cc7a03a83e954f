//! A task runner as a pure state machine: the decisions of the agent's per-task runner, with
//! no I/O, no async runtime and no clock (the caller passes wall-clock time in).
//!
//! In the style of openraft's `Engine`: the driver feeds [`Event`]s to [`Runner::handle`] and
//! performs the [`Effect`]s it returns, in order, over the runtime and network traits. Each
//! I/O effect is answered by exactly one event (`EnsureImage` → `ImageReady`, `VerifyImage` →
//! `ImageVerified`, `AcquireSlot` → `SlotAcquired`, `PrepareNetwork` → `NetworkPrepared`,
//! `Create` → `Created`, `Start` → `Started`, `Stop` → `Stopped`); `Monitor` is answered by
//! one `Exited` and any number of `Probe`s. `Report`, `Remove` and `Finish` are answered by
//! nothing.
//!
//! ```text
//!  Idle ──Begin{Nothing|Other}──▶ Image ──ImageReady──▶ Verify ──ImageVerified──▶ Slot
//!   │      (Other: Remove first;                                                   │
//!   │       accepted, preparing)                                           SlotAcquired
//!   │                                                                              ▼
//!   │                          Start ◀──Created(Ok)── Create ◀──NetworkPrepared── Network
//!   │                            │      (starting)            (ready)
//!   │                       Started(Ok)
//!   │                        (running)
//!   │                            ▼
//!   ├──Begin{Running}──────▶ Running ──StopRequested──▶ Stopping
//!   │   (running, if the      │  ▲ Probe (health         │
//!   │    store lags)          │  └─ changes reported)     │ Stopped | Exited
//!   │                         │ Exited                    │ (Remove, shutdown)
//!   │                         ▼ (Remove, complete|failed) ▼
//!   └──Begin{Exited}───────▶ Done ◀───────────────────────┘
//!       (Remove, complete|failed)
//! ```
//!
//! Every error on the start path ends in `Done` with `rejected` (image, trust, network,
//! create) or, after a failed start, `Remove` then `failed`. Every way into `Done` emits
//! [`Effect::Finish`] last, exactly once.
//!
//! A stop requested before the container runs is noted and takes effect at the next step:
//! the next start-path effect is not issued; the runner reports `shutdown` ("shut down
//! before start") instead, after a `Remove` once the container exists. A step already under
//! way is let finish, and its failure, if it fails, is reported as such. A stop requested
//! before the container was found running (`Begin{Running}`) or while it was starting stops
//! it as soon as it runs.
//!
//! Events a phase does not expect (a second `Begin`, a `Created` while pulling, a `Probe`
//! outside `Running`, anything after `Done`) are ignored: they produce no effects and change
//! nothing.

use std::time::Duration;

use flotilla_types::{Health, Task, TaskState, TaskStatus};

use crate::TaskError;

/// The shortest interval between two health probes.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Between TCP or HTTP probes while a task is starting, when the check sets no
/// `start_interval`. Such a probe costs the node about 0.17 ms of CPU (BENCHMARKS.md, "Health
/// checks"): at 4 Hz, under 0.1 % of a core per starting task, and a task is seen healthy
/// within a quarter second of listening (create → first request 1.11 s for an httpd that
/// listens after 1 s, against 1.09 s without a check).
pub const DEFAULT_START_INTERVAL: Duration = Duration::from_millis(250);

/// The same for exec probes: a `runc exec` costs about 25 ms of CPU, so 4 Hz would take 10 %
/// of a core per starting task; once a second is 2.5 % and still within a second.
pub const DEFAULT_EXEC_START_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest window of fast (`start_interval`) probing after the start: the window is
/// max(`start_period`, this). Past it a task still starting is probed every `interval`.
pub const MIN_START_WINDOW: Duration = Duration::from_secs(30);

/// While a task is starting, a failed probe is reported (with its output, so
/// `service create` can say why it waits) the first time, then at most this often when the
/// output changes: a status report is a Raft write.
const STARTING_REPORT_GAP: Duration = Duration::from_secs(10);

/// What the runner found of its container when it began (agent restart → re-adoption).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No container: start one.
    Nothing,
    /// The container runs: adopt it.
    Running,
    /// The container ended while the agent was away.
    Exited {
        /// Its exit code; `None` when its shim died and the outcome is unknown.
        code: Option<i32>,
    },
    /// Created but not running: remove it and start over.
    Other,
}

/// How the container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: i32,
    /// The kernel's OOM killer ended it.
    pub oom_killed: bool,
}

/// What happened: the answer to an [`Effect`], or a command from outside. A failed step
/// carries its [`TaskError`], whose text becomes the task's status message.
#[derive(Debug)]
pub enum Event {
    /// First event. `address`: the task's address if known (persisted allocation of an
    /// adopted container, else `None`).
    Begin {
        found: Found,
        address: Option<String>,
    },
    /// The image is pulled or present (answers [`Effect::EnsureImage`]).
    ImageReady(Result<(), TaskError>),
    /// The trust policy's verdict on the image (answers [`Effect::VerifyImage`]).
    ImageVerified(Result<(), TaskError>),
    /// A start slot (the concurrency bound) is held (answers [`Effect::AcquireSlot`]).
    SlotAcquired,
    /// `Ok(Some(addr))` with task networking, `Ok(None)` without (answers
    /// [`Effect::PrepareNetwork`]).
    NetworkPrepared(Result<Option<String>, TaskError>),
    /// `runc create` plus netns/veth wiring (answers [`Effect::Create`]). An error is
    /// reported as `create: {e}`; the driver has already removed a half-made container.
    Created(Result<(), TaskError>),
    /// The container's process started (answers [`Effect::Start`]).
    Started(Result<(), TaskError>),
    /// The container's process ended (answers [`Effect::Monitor`]); `Err`: the container was
    /// lost.
    Exited(Result<ExitInfo, TaskError>),
    /// The task should stop. May arrive in any phase, any number of times.
    StopRequested,
    /// The [`Effect::Stop`] finished, with the exit code if known.
    Stopped { exit_code: Option<i32> },
    /// One health probe's result and output (what an exec probe printed, why a network
    /// probe failed); `since_start` is the time since the monitor began.
    Probe {
        ok: bool,
        output: String,
        since_start: Duration,
    },
}

/// What the driver should do, in the order returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send this status upward.
    Report(TaskStatus),
    /// Make the image present (pull it if needed); answer with [`Event::ImageReady`].
    EnsureImage,
    /// Check the image against the trust policy; answer with [`Event::ImageVerified`].
    VerifyImage,
    /// Wait for a start slot; answer with [`Event::SlotAcquired`].
    AcquireSlot,
    /// Allocate the task's network; answer with [`Event::NetworkPrepared`].
    PrepareNetwork,
    /// Build the container spec, `runc create`, wire the network; answer with
    /// [`Event::Created`].
    Create,
    /// Start the container's process; answer with [`Event::Started`].
    Start,
    /// Begin watching: wait for the exit ([`Event::Exited`]) and, if the task has a health
    /// check, probe ([`Event::Probe`]) on the schedule of [`Runner::probe_delay`]: the first
    /// probe at once, the next ones each that long after the previous one ended. The start
    /// path is over: the driver releases the start slot (held until the task runs).
    Monitor,
    /// Stop the container (SIGTERM, SIGKILL after `grace`); answer with [`Event::Stopped`].
    Stop { grace: Duration },
    /// Force-remove the container and its state.
    Remove,
    /// The runner is done: release the task's network (and the start slot, if still held)
    /// and forget the task.
    Finish,
}

/// Where the runner is: mostly, which answer it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waits for [`Event::Begin`].
    Idle,
    /// Waits for [`Event::ImageReady`].
    Image,
    /// Waits for [`Event::ImageVerified`].
    Verify,
    /// Waits for [`Event::SlotAcquired`].
    Slot,
    /// Waits for [`Event::NetworkPrepared`].
    Network,
    /// Waits for [`Event::Created`].
    Create,
    /// Waits for [`Event::Started`].
    Start,
    /// The container runs: waits for [`Event::Exited`], [`Event::Probe`]s, a stop request.
    Running,
    /// Waits for [`Event::Stopped`] (or [`Event::Exited`]).
    Stopping,
    /// Finished; every event is ignored.
    Done,
}

/// One task's runner: its state between events.
#[derive(Debug, Clone, PartialEq)]
pub struct Runner {
    task: Task,
    phase: Phase,
    /// The address reported with every status (`None` until known).
    address: Option<String>,
    /// The addresses on user-defined networks reported with every status.
    addresses: std::collections::BTreeMap<String, String>,
    stop_requested: bool,
    /// `Some` only while monitoring a task with a health check.
    health: Option<Health>,
    /// Failed probes in a row (after the start period) that counted against `retries`.
    failures: u32,
    /// When (since the start) the last failure that counted happened; `None` after a pass.
    last_counted: Option<Duration>,
    /// Probes seen since monitoring began.
    probes: u64,
    /// While starting: when (since the start) and with what output the last failed probe
    /// was reported.
    starting_report: Option<(Duration, String)>,
}

impl Runner {
    /// A runner for `task`, waiting for [`Event::Begin`].
    pub fn new(task: Task) -> Runner {
        Runner {
            task,
            phase: Phase::Idle,
            address: None,
            addresses: Default::default(),
            stop_requested: false,
            health: None,
            failures: 0,
            last_counted: None,
            probes: 0,
            starting_report: None,
        }
    }

    /// Feeds one event at wall-clock `now_ms` (Unix milliseconds, used for status
    /// timestamps); returns the effects to perform, in order. An event the current phase does
    /// not expect returns no effects and changes nothing.
    pub fn handle(&mut self, event: Event, now_ms: u64) -> Vec<Effect> {
        match (self.phase, event) {
            (Phase::Done, _) => Vec::new(),
            (_, Event::StopRequested) => self.on_stop_requested(),
            (Phase::Idle, Event::Begin { found, address }) => self.on_begin(found, address, now_ms),
            (Phase::Image, Event::ImageReady(r)) => {
                self.after_step(r, Phase::Verify, Effect::VerifyImage, now_ms)
            }
            (Phase::Verify, Event::ImageVerified(r)) => {
                self.after_step(r, Phase::Slot, Effect::AcquireSlot, now_ms)
            }
            (Phase::Slot, Event::SlotAcquired) => {
                self.next_step(Vec::new(), Phase::Network, Effect::PrepareNetwork, now_ms)
            }
            (Phase::Network, Event::NetworkPrepared(r)) => self.on_network(r, now_ms),
            (Phase::Create, Event::Created(r)) => self.on_created(r, now_ms),
            (Phase::Start, Event::Started(r)) => self.on_started(r, now_ms),
            (Phase::Running, Event::Exited(r)) => self.on_exited(r, now_ms),
            (
                Phase::Running,
                Event::Probe {
                    ok,
                    output,
                    since_start,
                },
            ) => self.on_probe(ok, &output, since_start, now_ms),
            (Phase::Stopping, Event::Stopped { exit_code }) => self.on_stopped(exit_code, now_ms),
            (Phase::Stopping, Event::Exited(r)) => self.on_stopped(r.ok().map(|e| e.code), now_ms),
            _ => Vec::new(),
        }
    }

    /// Gives the task its image's health check when the service sets none (Docker's
    /// `HEALTHCHECK` applies unless the service overrides it). Call before the task runs.
    pub fn use_image_healthcheck(&mut self, hc: Option<flotilla_types::HealthCheck>) {
        let c = &mut self.task.spec.container;
        if c.healthcheck.is_none() {
            c.healthcheck = hc;
        }
    }

    /// The task's id.
    pub fn task_id(&self) -> &str {
        &self.task.id
    }

    /// The task's health check, if it has one.
    pub fn healthcheck(&self) -> Option<&flotilla_types::HealthCheck> {
        self.task.spec.container.healthcheck.as_ref()
    }

    /// Where the runner is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The runner has finished ([`Effect::Finish`] was returned).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The task's health as the probes see it: `Some` only while monitoring a task with a
    /// health check (and kept once done).
    pub fn health(&self) -> Option<Health> {
        self.health
    }

    /// Sets the task's addresses on user-defined networks (network → address), reported
    /// with every status from now on.
    pub fn set_addresses(&mut self, addresses: std::collections::BTreeMap<String, String>) {
        self.addresses = addresses;
    }

    /// The task's address, once known.
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// Health probe interval (the check's interval, at least 100 ms); `None` without a
    /// health check.
    pub fn probe_interval(&self) -> Option<Duration> {
        self.task
            .spec
            .container
            .healthcheck
            .as_ref()
            .map(|h| Duration::from_nanos(h.interval).max(MIN_PROBE_INTERVAL))
    }

    /// Probe interval while the task is starting: the check's `start_interval` (when 0,
    /// 250 ms for TCP and HTTP probes, 1 s for exec probes), at least 100 ms and at most
    /// [`Runner::probe_interval`]; `None` without a health check.
    pub fn start_interval(&self) -> Option<Duration> {
        let h = self.task.spec.container.healthcheck.as_ref()?;
        let si = match (h.start_interval, &h.probe) {
            (0, flotilla_types::HealthProbe::Exec { .. }) => DEFAULT_EXEC_START_INTERVAL,
            (0, _) => DEFAULT_START_INTERVAL,
            (n, _) => Duration::from_nanos(n),
        };
        Some(si.max(MIN_PROBE_INTERVAL).min(self.probe_interval()?))
    }

    /// How long to wait before the next probe, counted from the end of the previous one,
    /// at `since_start` after monitoring began; `None` without a health check. The first
    /// probe runs at once; then every [`Runner::start_interval`] while the task is
    /// `starting` (neither healthy nor unhealthy yet), within max(`start_period`, 30 s) of
    /// the start; after that (healthy or unhealthy once, or the window over) every
    /// [`Runner::probe_interval`].
    pub fn probe_delay(&self, since_start: Duration) -> Option<Duration> {
        let h = self.task.spec.container.healthcheck.as_ref()?;
        if self.probes == 0 {
            return Some(Duration::ZERO);
        }
        let window = Duration::from_nanos(h.start_period).max(MIN_START_WINDOW);
        if self.health == Some(Health::Starting) && since_start < window {
            self.start_interval()
        } else {
            self.probe_interval()
        }
    }

    /// A status of this task's container, with its current address.
    fn status(&self, state: TaskState, now_ms: u64, msg: &str) -> TaskStatus {
        let mut st = TaskStatus::new(state, now_ms, msg);
        st.container_id = Some(self.task.id.clone());
        st.address = self.address.clone();
        st.addresses = self.addresses.clone();
        st
    }

    /// A status with its error set.
    fn failure(&self, state: TaskState, now_ms: u64, msg: &str, err: String) -> TaskStatus {
        let mut st = self.status(state, now_ms, msg);
        st.err = Some(err);
        st
    }

    /// Ends the runner: `Remove` (if `remove`), the final report, `Finish`.
    fn end(&mut self, mut fx: Vec<Effect>, remove: bool, st: TaskStatus) -> Vec<Effect> {
        self.phase = Phase::Done;
        if remove {
            fx.push(Effect::Remove);
        }
        fx.push(Effect::Report(st));
        fx.push(Effect::Finish);
        fx
    }

    /// Ends the runner with `rejected`, message and error the text of `e`.
    fn reject(&mut self, e: TaskError, now_ms: u64) -> Vec<Effect> {
        let msg = e.to_string();
        let st = self.failure(TaskState::Rejected, now_ms, &msg, msg.clone());
        self.end(Vec::new(), false, st)
    }

    fn on_stop_requested(&mut self) -> Vec<Effect> {
        if self.stop_requested {
            return Vec::new();
        }
        self.stop_requested = true;
        if self.phase == Phase::Running {
            return self.stop();
        }
        Vec::new()
    }

    /// Stops the running container.
    fn stop(&mut self) -> Vec<Effect> {
        self.phase = Phase::Stopping;
        vec![Effect::Stop {
            grace: grace_of(&self.task),
        }]
    }

    fn on_begin(&mut self, found: Found, address: Option<String>, now_ms: u64) -> Vec<Effect> {
        match found {
            Found::Running => self.adopt_running(address, now_ms),
            Found::Exited { code } => self.adopt_exited(code, now_ms),
            Found::Nothing => self.accept(Vec::new(), now_ms),
            Found::Other => self.accept(vec![Effect::Remove], now_ms),
        }
    }

    /// Re-adopts a running container: reports it running if the store lags (state or
    /// address), then monitors it.
    fn adopt_running(&mut self, address: Option<String>, now_ms: u64) -> Vec<Effect> {
        self.address = address.or_else(|| self.task.status.address.clone());
        if self.addresses.is_empty() {
            self.addresses = self.task.status.addresses.clone();
        }
        let recorded = self.task.status.clone();
        let mut fx = Vec::new();
        if recorded.state < TaskState::Running
            || recorded.address != self.address
            || recorded.addresses != self.addresses
        {
            let mut st = self.status(TaskState::Running, now_ms, "started");
            st.health = recorded.health;
            fx.push(Effect::Report(st));
        }
        fx.extend(self.monitor(recorded.health.unwrap_or(Health::Starting)));
        fx
    }

    /// A container that ended while the agent was away: remove it, report how it ended.
    fn adopt_exited(&mut self, code: Option<i32>, now_ms: u64) -> Vec<Effect> {
        let mut st = match code {
            Some(0) => self.status(TaskState::Complete, now_ms, "finished"),
            Some(c) => {
                let msg = format!("task: non-zero exit ({c})");
                self.failure(TaskState::Failed, now_ms, &msg, msg.clone())
            }
            None => self.failure(
                TaskState::Failed,
                now_ms,
                "container's shim died; outcome unknown",
                "shim died".into(),
            ),
        };
        st.exit_code = code;
        self.end(Vec::new(), true, st)
    }

    /// Accepts the task and starts its start path with the image.
    fn accept(&mut self, mut fx: Vec<Effect>, now_ms: u64) -> Vec<Effect> {
        fx.push(Effect::Report(self.status(
            TaskState::Accepted,
            now_ms,
            "accepted",
        )));
        fx.push(Effect::Report(self.status(
            TaskState::Preparing,
            now_ms,
            "preparing",
        )));
        self.next_step(fx, Phase::Image, Effect::EnsureImage, now_ms)
    }

    /// Issues the next start-path step (`effect`, then wait in `phase`), unless a stop was
    /// requested: then the task shuts down before its container exists.
    fn next_step(
        &mut self,
        fx: Vec<Effect>,
        phase: Phase,
        effect: Effect,
        now_ms: u64,
    ) -> Vec<Effect> {
        if self.stop_requested {
            let st = self.status(TaskState::Shutdown, now_ms, "shut down before start");
            return self.end(fx, false, st);
        }
        self.phase = phase;
        let mut fx = fx;
        fx.push(effect);
        fx
    }

    /// A step that either failed (→ `rejected`) or leads to the next one.
    fn after_step(
        &mut self,
        res: Result<(), TaskError>,
        phase: Phase,
        effect: Effect,
        now_ms: u64,
    ) -> Vec<Effect> {
        match res {
            Ok(()) => self.next_step(Vec::new(), phase, effect, now_ms),
            Err(e) => self.reject(e, now_ms),
        }
    }

    fn on_network(&mut self, res: Result<Option<String>, TaskError>, now_ms: u64) -> Vec<Effect> {
        match res {
            Ok(addr) => {
                self.address = addr;
                let fx = vec![Effect::Report(self.status(
                    TaskState::Ready,
                    now_ms,
                    "ready",
                ))];
                self.next_step(fx, Phase::Create, Effect::Create, now_ms)
            }
            Err(e) => self.reject(e, now_ms),
        }
    }

    fn on_created(&mut self, res: Result<(), TaskError>, now_ms: u64) -> Vec<Effect> {
        if let Err(e) = res {
            let e = e.to_string();
            let st = self.failure(TaskState::Rejected, now_ms, &format!("create: {e}"), e);
            return self.end(Vec::new(), false, st);
        }
        let fx = vec![Effect::Report(self.status(
            TaskState::Starting,
            now_ms,
            "starting",
        ))];
        if self.stop_requested {
            let st = self.status(TaskState::Shutdown, now_ms, "shut down before start");
            return self.end(fx, true, st);
        }
        self.phase = Phase::Start;
        let mut fx = fx;
        fx.push(Effect::Start);
        fx
    }

    fn on_started(&mut self, res: Result<(), TaskError>, now_ms: u64) -> Vec<Effect> {
        if let Err(e) = res {
            let e = e.to_string();
            let st = self.failure(TaskState::Failed, now_ms, &format!("start: {e}"), e);
            return self.end(Vec::new(), true, st);
        }
        let mut st = self.status(TaskState::Running, now_ms, "started");
        // With a health check the task is `starting` until its first healthy probe.
        st.health = self.healthcheck().map(|_| Health::Starting);
        let mut fx = vec![Effect::Report(st)];
        fx.extend(self.monitor(Health::Starting));
        fx
    }

    /// The container runs: monitor it, health starting at `initial` (with a health check),
    /// or stop it at once if a stop was requested meanwhile.
    fn monitor(&mut self, initial: Health) -> Vec<Effect> {
        if self.stop_requested {
            return self.stop();
        }
        self.phase = Phase::Running;
        self.failures = 0;
        self.last_counted = None;
        self.probes = 0;
        self.starting_report = None;
        self.health = self
            .task
            .spec
            .container
            .healthcheck
            .as_ref()
            .map(|_| initial);
        vec![Effect::Monitor]
    }

    /// The container's process ended while running: remove it, report how it ended.
    fn on_exited(&mut self, res: Result<ExitInfo, TaskError>, now_ms: u64) -> Vec<Effect> {
        let mut st = match res {
            Ok(e) if e.oom_killed => {
                let msg = "out of memory: killed by the kernel";
                let mut st = self.failure(TaskState::Failed, now_ms, msg, "OOM killed".into());
                st.exit_code = Some(e.code);
                st
            }
            Ok(e) if e.code == 0 => {
                let mut st = self.status(TaskState::Complete, now_ms, "finished");
                st.exit_code = Some(0);
                st
            }
            Ok(e) => {
                let msg = format!("task: non-zero exit ({})", e.code);
                let mut st = self.failure(TaskState::Failed, now_ms, &msg, msg.clone());
                st.exit_code = Some(e.code);
                st
            }
            Err(e) => {
                let e = e.to_string();
                let msg = format!("lost the container: {e}");
                self.failure(TaskState::Failed, now_ms, &msg, e)
            }
        };
        // Not reached while a stop request moves `Running` to `Stopping` at once; keeps the
        // outcome right should stops be deferred.
        if self.stop_requested {
            st.state = TaskState::Shutdown;
            st.message = "shut down".into();
        }
        self.end(Vec::new(), true, st)
    }

    /// The stop finished (or the process ended while stopping): remove, report `shutdown`.
    fn on_stopped(&mut self, exit_code: Option<i32>, now_ms: u64) -> Vec<Effect> {
        let mut st = self.status(TaskState::Shutdown, now_ms, "shut down");
        st.exit_code = exit_code;
        self.end(Vec::new(), true, st)
    }

    /// One probe result: updates failures and health, reports a health change (and, while
    /// the task is starting, a failure's output now and then).
    fn on_probe(
        &mut self,
        ok: bool,
        output: &str,
        since_start: Duration,
        now_ms: u64,
    ) -> Vec<Effect> {
        let Some(hc) = self.task.spec.container.healthcheck.as_ref() else {
            return Vec::new();
        };
        self.probes = self.probes.saturating_add(1);
        let before = self.health;
        let interval = Duration::from_nanos(hc.interval).max(MIN_PROBE_INTERVAL);
        // Fast probes find health sooner but do not make a task unhealthy sooner: a failure
        // counts against `retries` once `interval` has passed since the start or since the
        // last failure that counted (so a failing task turns unhealthy when it would with one
        // probe per interval).
        let counts = since_start >= Duration::from_nanos(hc.start_period)
            && since_start.saturating_sub(self.last_counted.unwrap_or_default()) >= interval;
        if ok {
            self.failures = 0;
            self.last_counted = None;
            self.health = Some(Health::Healthy);
        } else if counts {
            self.failures = self.failures.saturating_add(1);
            self.last_counted = Some(since_start);
            if self.failures >= hc.retries.max(1) {
                self.health = Some(Health::Unhealthy);
            }
        }
        let output = output.trim();
        if self.health == before {
            if ok || self.health != Some(Health::Starting) {
                return Vec::new();
            }
            // Still starting: say why, the first time and when the reason changes.
            let due = match &self.starting_report {
                None => true,
                Some((at, last)) => {
                    last != output && since_start.saturating_sub(*at) >= STARTING_REPORT_GAP
                }
            };
            if !due {
                return Vec::new();
            }
            self.starting_report = Some((since_start, output.to_string()));
            let mut st = self.status(TaskState::Running, now_ms, &failed_msg("starting", output));
            st.health = self.health;
            return vec![Effect::Report(st)];
        }
        let msg = match self.health {
            Some(Health::Unhealthy) => failed_msg("unhealthy", output),
            _ => "started".to_string(),
        };
        let mut st = self.status(TaskState::Running, now_ms, &msg);
        st.health = self.health;
        vec![Effect::Report(st)]
    }
}

/// `{what}: health check failed[: {output}]`.
fn failed_msg(what: &str, output: &str) -> String {
    if output.is_empty() {
        format!("{what}: health check failed")
    } else {
        format!("{what}: health check failed: {output}")
    }
}

/// The task's stop grace period (SIGTERM to SIGKILL): its spec's, else 10 s.
pub fn grace_of(task: &Task) -> Duration {
    task.spec.container.stop_grace()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NetError, PullError};
    use flotilla_runtime::RuntimeError;
    use serde_json::json;
    use std::sync::Arc;

    const ID: &str = "t1";
    const NOW: u64 = 1_000;
    const ADDR: &str = "10.200.0.7";

    /// A task in `state`, optionally with a recorded address and health, and a health check
    /// (`interval` 1 s, `retries` 3, `start_period` 10 s).
    fn task(state: &str, address: Option<&str>, health: Option<&str>, hc: bool) -> Task {
        let mut v = json!({
            "id": ID, "service_id": "s1", "slot": 1, "node_id": "n1",
            "spec": {"container": {"image": "x"}},
            "spec_version": 1, "desired_state": "running",
            "status": {"state": state, "timestamp": 1}
        });
        if let Some(a) = address {
            v["status"]["address"] = json!(a);
        }
        if let Some(h) = health {
            v["status"]["health"] = json!(h);
        }
        if hc {
            v["spec"]["container"]["healthcheck"] = json!({
                "probe": {"tcp": {"port": 80}}, "interval": 1_000_000_000u64,
                "timeout": 1_000_000_000u64, "retries": 3, "start_period": 10_000_000_000u64
            });
        }
        serde_json::from_value(v).expect("task")
    }

    fn assigned() -> Task {
        task("assigned", None, None, false)
    }

    /// The status every report starts from.
    fn st(state: TaskState, msg: &str) -> TaskStatus {
        let mut s = TaskStatus::new(state, NOW, msg);
        s.container_id = Some(ID.into());
        s
    }

    trait With {
        fn err(self, e: &str) -> Self;
        fn exit(self, c: i32) -> Self;
        fn addr(self, a: &str) -> Self;
        fn health(self, h: Health) -> Self;
    }

    impl With for TaskStatus {
        fn err(mut self, e: &str) -> Self {
            self.err = Some(e.into());
            self
        }
        fn exit(mut self, c: i32) -> Self {
            self.exit_code = Some(c);
            self
        }
        fn addr(mut self, a: &str) -> Self {
            self.address = Some(a.into());
            self
        }
        fn health(mut self, h: Health) -> Self {
            self.health = Some(h);
            self
        }
    }

    fn report(s: TaskStatus) -> Effect {
        Effect::Report(s)
    }

    fn begin(found: Found) -> Event {
        Event::Begin {
            found,
            address: None,
        }
    }

    fn probe(ok: bool, secs: u64) -> Event {
        probe_at(ok, Duration::from_secs(secs))
    }

    /// A probe result at `t` after monitoring began; a failure says "refused".
    fn probe_at(ok: bool, t: Duration) -> Event {
        Event::Probe {
            ok,
            output: if ok { String::new() } else { "refused".into() },
            since_start: t,
        }
    }

    fn exited(code: i32, oom_killed: bool) -> Event {
        Event::Exited(Ok(ExitInfo { code, oom_killed }))
    }

    /// A runtime failure: its text is `oci runtime: {msg}`.
    fn oci(msg: &str) -> TaskError {
        TaskError::Runtime(RuntimeError::Oci(msg.into()))
    }

    /// The trust policy's refusal of image `x`.
    fn untrusted() -> TaskError {
        TaskError::NotTrusted(flotilla_registry::TrustError::NotTrusted {
            reference: "x".into(),
            reasons: Vec::new(),
        })
    }

    fn grace() -> Effect {
        Effect::Stop {
            grace: Duration::from_secs(10),
        }
    }

    /// Walks a new runner through the whole start path (with address `ADDR`) into `Running`.
    fn running(t: Task) -> Runner {
        let mut r = Runner::new(t);
        r.handle(begin(Found::Nothing), NOW);
        r.handle(Event::ImageReady(Ok(())), NOW);
        r.handle(Event::ImageVerified(Ok(())), NOW);
        r.handle(Event::SlotAcquired, NOW);
        r.handle(Event::NetworkPrepared(Ok(Some(ADDR.into()))), NOW);
        r.handle(Event::Created(Ok(())), NOW);
        r.handle(Event::Started(Ok(())), NOW);
        assert_eq!(r.phase(), Phase::Running);
        r
    }

    /// A runner waiting in `phase` on the start path.
    fn at(phase: Phase) -> Runner {
        let steps = [
            (Phase::Image, begin(Found::Nothing)),
            (Phase::Verify, Event::ImageReady(Ok(()))),
            (Phase::Slot, Event::ImageVerified(Ok(()))),
            (Phase::Network, Event::SlotAcquired),
            (Phase::Create, Event::NetworkPrepared(Ok(Some(ADDR.into())))),
            (Phase::Start, Event::Created(Ok(()))),
        ];
        let mut r = Runner::new(assigned());
        for (p, ev) in steps {
            r.handle(ev, NOW);
            assert_eq!(r.phase(), p);
            if p == phase {
                return r;
            }
        }
        panic!("{phase:?} is not on the start path");
    }

    #[test]
    fn start_path_walks_every_state() {
        let mut r = Runner::new(assigned());
        assert_eq!(r.phase(), Phase::Idle);
        assert_eq!(
            r.handle(begin(Found::Nothing), NOW),
            vec![
                report(st(TaskState::Accepted, "accepted")),
                report(st(TaskState::Preparing, "preparing")),
                Effect::EnsureImage,
            ]
        );
        assert_eq!(r.phase(), Phase::Image);
        assert_eq!(
            r.handle(Event::ImageReady(Ok(())), NOW),
            vec![Effect::VerifyImage]
        );
        assert_eq!(
            r.handle(Event::ImageVerified(Ok(())), NOW),
            vec![Effect::AcquireSlot]
        );
        assert_eq!(
            r.handle(Event::SlotAcquired, NOW),
            vec![Effect::PrepareNetwork]
        );
        assert_eq!(
            r.handle(Event::NetworkPrepared(Ok(Some(ADDR.into()))), NOW),
            vec![
                report(st(TaskState::Ready, "ready").addr(ADDR)),
                Effect::Create
            ]
        );
        assert_eq!(r.address(), Some(ADDR));
        assert_eq!(
            r.handle(Event::Created(Ok(())), NOW),
            vec![
                report(st(TaskState::Starting, "starting").addr(ADDR)),
                Effect::Start
            ]
        );
        assert_eq!(
            r.handle(Event::Started(Ok(())), NOW),
            vec![
                report(st(TaskState::Running, "started").addr(ADDR)),
                Effect::Monitor
            ]
        );
        assert_eq!(r.phase(), Phase::Running);
        assert_eq!(r.health(), None);
        assert!(!r.is_done());
    }

    #[test]
    fn without_task_networking_reports_carry_no_address() {
        let mut r = at(Phase::Network);
        assert_eq!(
            r.handle(Event::NetworkPrepared(Ok(None)), NOW),
            vec![report(st(TaskState::Ready, "ready")), Effect::Create]
        );
        assert_eq!(r.address(), None);
    }

    #[test]
    fn adopted_running_reports_when_recorded_state_lags() {
        let mut r = Runner::new(task("starting", Some(ADDR), None, false));
        let ev = Event::Begin {
            found: Found::Running,
            address: Some(ADDR.into()),
        };
        assert_eq!(
            r.handle(ev, NOW),
            vec![
                report(st(TaskState::Running, "started").addr(ADDR)),
                Effect::Monitor
            ]
        );
        assert_eq!(r.phase(), Phase::Running);
    }

    #[test]
    fn adopted_running_reports_when_address_differs() {
        let t = task("running", Some("10.200.0.9"), Some("healthy"), true);
        let mut r = Runner::new(t);
        let ev = Event::Begin {
            found: Found::Running,
            address: Some(ADDR.into()),
        };
        assert_eq!(
            r.handle(ev, NOW),
            vec![
                report(
                    st(TaskState::Running, "started")
                        .addr(ADDR)
                        .health(Health::Healthy)
                ),
                Effect::Monitor
            ]
        );
        assert_eq!(r.address(), Some(ADDR));
    }

    #[test]
    fn adopted_running_without_change_only_monitors() {
        let mut r = Runner::new(task("running", Some(ADDR), None, false));
        let ev = Event::Begin {
            found: Found::Running,
            address: Some(ADDR.into()),
        };
        assert_eq!(r.handle(ev, NOW), vec![Effect::Monitor]);
    }

    #[test]
    fn adopted_running_falls_back_to_recorded_address() {
        let mut r = Runner::new(task("running", Some(ADDR), None, false));
        assert_eq!(r.handle(begin(Found::Running), NOW), vec![Effect::Monitor]);
        assert_eq!(r.address(), Some(ADDR));
    }

    #[test]
    fn adopted_health_starts_from_recorded_health() {
        let mut r = Runner::new(task("running", None, Some("healthy"), true));
        assert_eq!(r.handle(begin(Found::Running), NOW), vec![Effect::Monitor]);
        assert_eq!(r.health(), Some(Health::Healthy));
        // Already healthy: a passing probe changes nothing.
        assert_eq!(r.handle(probe(true, 1), NOW), vec![]);
        let mut r = Runner::new(task("running", None, None, true));
        r.handle(begin(Found::Running), NOW);
        assert_eq!(r.health(), Some(Health::Starting));
    }

    #[test]
    fn adopted_exited_zero_completes() {
        let mut r = Runner::new(task("running", Some(ADDR), None, false));
        let ev = Event::Begin {
            found: Found::Exited { code: Some(0) },
            address: Some(ADDR.into()),
        };
        assert_eq!(
            r.handle(ev, NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Complete, "finished").exit(0)),
                Effect::Finish
            ]
        );
        assert!(r.is_done());
        assert_eq!(r.address(), None);
    }

    #[test]
    fn adopted_exited_non_zero_fails() {
        let mut r = Runner::new(task("running", None, None, false));
        let msg = "task: non-zero exit (3)";
        assert_eq!(
            r.handle(begin(Found::Exited { code: Some(3) }), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Failed, msg).err(msg).exit(3)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn adopted_shim_died_fails_with_unknown_outcome() {
        let mut r = Runner::new(task("running", None, None, false));
        let msg = "container's shim died; outcome unknown";
        assert_eq!(
            r.handle(begin(Found::Exited { code: None }), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Failed, msg).err("shim died")),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn created_not_running_is_removed_and_started_over() {
        let mut r = Runner::new(assigned());
        assert_eq!(
            r.handle(begin(Found::Other), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Accepted, "accepted")),
                report(st(TaskState::Preparing, "preparing")),
                Effect::EnsureImage,
            ]
        );
        assert_eq!(r.phase(), Phase::Image);
    }

    #[test]
    fn pull_failure_rejects() {
        let mut r = at(Phase::Image);
        let e = PullError::Registry {
            image: "x".into(),
            manager: "m1".into(),
            source: flotilla_registry::RegistryError::Invalid("refused".into()),
        };
        let msg = "pulling x from m1: refused";
        assert_eq!(
            r.handle(Event::ImageReady(Err(TaskError::Pull(Arc::new(e)))), NOW),
            vec![
                report(st(TaskState::Rejected, msg).err(msg)),
                Effect::Finish
            ]
        );
        assert!(r.is_done());
    }

    #[test]
    fn refused_signature_rejects() {
        let mut r = at(Phase::Verify);
        let msg = "image x is not signed by a trusted key";
        assert_eq!(
            r.handle(Event::ImageVerified(Err(untrusted())), NOW),
            vec![
                report(st(TaskState::Rejected, msg).err(msg)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn network_failure_rejects() {
        let mut r = at(Phase::Network);
        let e = NetError::NotSetUp {
            waited: Duration::from_secs(60),
        };
        let msg =
            "this node's task network is not set up after 60s (no subnet from the managers yet)";
        assert_eq!(
            r.handle(Event::NetworkPrepared(Err(e.into())), NOW),
            vec![
                report(st(TaskState::Rejected, msg).err(msg)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn create_failure_rejects_without_remove() {
        let mut r = at(Phase::Create);
        assert_eq!(
            r.handle(Event::Created(Err(oci("no rootfs"))), NOW),
            vec![
                report(
                    st(TaskState::Rejected, "create: oci runtime: no rootfs")
                        .err("oci runtime: no rootfs")
                        .addr(ADDR)
                ),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn wiring_timeout_rejects_as_a_create_failure() {
        let mut r = at(Phase::Create);
        let e = TaskError::AttachTimeout(Duration::from_secs(30));
        let err = "task network: wiring the veth took over 30 s";
        assert_eq!(
            r.handle(Event::Created(Err(e)), NOW),
            vec![
                report(
                    st(TaskState::Rejected, &format!("create: {err}"))
                        .err(err)
                        .addr(ADDR)
                ),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn start_failure_removes_then_fails() {
        let mut r = at(Phase::Start);
        assert_eq!(
            r.handle(Event::Started(Err(oci("exec: not found"))), NOW),
            vec![
                Effect::Remove,
                report(
                    st(TaskState::Failed, "start: oci runtime: exec: not found")
                        .err("oci runtime: exec: not found")
                        .addr(ADDR)
                ),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn exit_zero_completes() {
        let mut r = running(assigned());
        assert_eq!(
            r.handle(exited(0, false), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Complete, "finished").exit(0).addr(ADDR)),
                Effect::Finish
            ]
        );
        assert!(r.is_done());
    }

    #[test]
    fn non_zero_exit_fails() {
        let mut r = running(assigned());
        let msg = "task: non-zero exit (2)";
        assert_eq!(
            r.handle(exited(2, false), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Failed, msg).err(msg).exit(2).addr(ADDR)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn oom_kill_fails() {
        let mut r = running(assigned());
        let msg = "out of memory: killed by the kernel";
        assert_eq!(
            r.handle(exited(137, true), NOW),
            vec![
                Effect::Remove,
                report(
                    st(TaskState::Failed, msg)
                        .err("OOM killed")
                        .exit(137)
                        .addr(ADDR)
                ),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn lost_container_fails() {
        let mut r = running(assigned());
        assert_eq!(
            r.handle(
                Event::Exited(Err(RuntimeError::ContainerNotFound(ID.into()).into())),
                NOW
            ),
            vec![
                Effect::Remove,
                report(
                    st(
                        TaskState::Failed,
                        "lost the container: container not found: t1"
                    )
                    .err("container not found: t1")
                    .addr(ADDR)
                ),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn stop_while_pulling_shuts_down_at_the_next_step() {
        let mut r = at(Phase::Image);
        assert_eq!(r.handle(Event::StopRequested, NOW), vec![]);
        assert_eq!(r.phase(), Phase::Image);
        assert_eq!(
            r.handle(Event::ImageReady(Ok(())), NOW),
            vec![
                report(st(TaskState::Shutdown, "shut down before start")),
                Effect::Finish
            ]
        );
        assert!(r.is_done());
    }

    #[test]
    fn stop_before_begin_shuts_down_before_the_image() {
        let mut r = Runner::new(assigned());
        assert_eq!(r.handle(Event::StopRequested, NOW), vec![]);
        assert_eq!(
            r.handle(begin(Found::Other), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Accepted, "accepted")),
                report(st(TaskState::Preparing, "preparing")),
                report(st(TaskState::Shutdown, "shut down before start")),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn stop_while_preparing_the_network_shuts_down_after_ready() {
        let mut r = at(Phase::Network);
        r.handle(Event::StopRequested, NOW);
        assert_eq!(
            r.handle(Event::NetworkPrepared(Ok(Some(ADDR.into()))), NOW),
            vec![
                report(st(TaskState::Ready, "ready").addr(ADDR)),
                report(st(TaskState::Shutdown, "shut down before start").addr(ADDR)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn stop_while_waiting_for_a_slot_skips_the_network() {
        let mut r = at(Phase::Slot);
        r.handle(Event::StopRequested, NOW);
        assert_eq!(
            r.handle(Event::SlotAcquired, NOW),
            vec![
                report(st(TaskState::Shutdown, "shut down before start")),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn stop_before_begin_still_reports_how_an_exited_container_ended() {
        let mut r = Runner::new(task("running", None, None, false));
        r.handle(Event::StopRequested, NOW);
        assert_eq!(
            r.handle(begin(Found::Exited { code: Some(0) }), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Complete, "finished").exit(0)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn a_failed_step_is_reported_even_with_a_stop_pending() {
        let mut r = at(Phase::Verify);
        r.handle(Event::StopRequested, NOW);
        let msg = "image x is not signed by a trusted key";
        assert_eq!(
            r.handle(Event::ImageVerified(Err(untrusted())), NOW),
            vec![
                report(st(TaskState::Rejected, msg).err(msg)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn stop_while_creating_removes_after_create() {
        let mut r = at(Phase::Create);
        assert_eq!(r.handle(Event::StopRequested, NOW), vec![]);
        assert_eq!(
            r.handle(Event::Created(Ok(())), NOW),
            vec![
                report(st(TaskState::Starting, "starting").addr(ADDR)),
                Effect::Remove,
                report(st(TaskState::Shutdown, "shut down before start").addr(ADDR)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn stop_while_starting_stops_once_running() {
        let mut r = at(Phase::Start);
        assert_eq!(r.handle(Event::StopRequested, NOW), vec![]);
        assert_eq!(
            r.handle(Event::Started(Ok(())), NOW),
            vec![
                report(st(TaskState::Running, "started").addr(ADDR)),
                grace()
            ]
        );
        assert_eq!(r.phase(), Phase::Stopping);
    }

    #[test]
    fn stop_before_adopting_a_running_container_stops_it() {
        let mut r = Runner::new(task("running", None, None, false));
        r.handle(Event::StopRequested, NOW);
        assert_eq!(r.handle(begin(Found::Running), NOW), vec![grace()]);
        assert_eq!(r.phase(), Phase::Stopping);
    }

    #[test]
    fn stop_while_running_stops_then_shuts_down() {
        let mut t = assigned();
        t.spec.container.stop_grace_period = Some(3_000_000_000);
        let mut r = running(t);
        assert_eq!(
            r.handle(Event::StopRequested, NOW),
            vec![Effect::Stop {
                grace: Duration::from_secs(3)
            }]
        );
        assert_eq!(r.phase(), Phase::Stopping);
        assert_eq!(
            r.handle(
                Event::Stopped {
                    exit_code: Some(143)
                },
                NOW
            ),
            vec![
                Effect::Remove,
                report(st(TaskState::Shutdown, "shut down").exit(143).addr(ADDR)),
                Effect::Finish
            ]
        );
        assert!(r.is_done());
    }

    #[test]
    fn stopped_without_exit_code() {
        let mut r = running(assigned());
        r.handle(Event::StopRequested, NOW);
        assert_eq!(
            r.handle(Event::Stopped { exit_code: None }, NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Shutdown, "shut down").addr(ADDR)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn exit_while_stopping_is_a_shutdown() {
        let mut r = running(assigned());
        r.handle(Event::StopRequested, NOW);
        assert_eq!(
            r.handle(exited(137, true), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Shutdown, "shut down").exit(137).addr(ADDR)),
                Effect::Finish
            ]
        );
        assert_eq!(r.handle(Event::Stopped { exit_code: Some(0) }, NOW), vec![]);
    }

    #[test]
    fn lost_container_while_stopping_is_a_shutdown() {
        let mut r = running(assigned());
        r.handle(Event::StopRequested, NOW);
        assert_eq!(
            r.handle(Event::Exited(Err(oci("gone"))), NOW),
            vec![
                Effect::Remove,
                report(st(TaskState::Shutdown, "shut down").addr(ADDR)),
                Effect::Finish
            ]
        );
    }

    #[test]
    fn duplicate_stop_is_a_no_op() {
        let mut r = running(assigned());
        assert_eq!(r.handle(Event::StopRequested, NOW), vec![grace()]);
        assert_eq!(r.handle(Event::StopRequested, NOW), vec![]);
        assert_eq!(r.phase(), Phase::Stopping);
        let mut r = at(Phase::Slot);
        r.handle(Event::StopRequested, NOW);
        assert_eq!(r.handle(Event::StopRequested, NOW), vec![]);
        assert_eq!(r.phase(), Phase::Slot);
    }

    #[test]
    fn health_starts_as_starting_and_ignores_failures_in_the_start_period() {
        let mut r = running(task("assigned", None, None, true));
        assert_eq!(r.health(), Some(Health::Starting));
        // The first failure is reported (why the task is not up yet), the same one again not.
        assert_eq!(
            r.handle(probe(false, 0), NOW),
            vec![report(
                st(TaskState::Running, "starting: health check failed: refused")
                    .addr(ADDR)
                    .health(Health::Starting)
            )]
        );
        for s in 1..10 {
            assert_eq!(r.handle(probe(false, s), NOW), vec![]);
        }
        assert_eq!(r.health(), Some(Health::Starting));
        // Failures from the start period on count: 3 (retries) in a row.
        assert_eq!(r.handle(probe(false, 10), NOW), vec![]);
        assert_eq!(r.handle(probe(false, 11), NOW), vec![]);
        assert_eq!(
            r.handle(probe(false, 12), NOW),
            vec![report(
                st(
                    TaskState::Running,
                    "unhealthy: health check failed: refused"
                )
                .addr(ADDR)
                .health(Health::Unhealthy)
            )]
        );
    }

    #[test]
    fn health_passes_then_fails_after_retries_then_recovers() {
        let mut r = running(task("assigned", None, None, true));
        let healthy = report(
            st(TaskState::Running, "started")
                .addr(ADDR)
                .health(Health::Healthy),
        );
        assert_eq!(r.handle(probe(true, 1), NOW), vec![healthy.clone()]);
        assert_eq!(r.handle(probe(true, 2), NOW), vec![]);
        assert_eq!(r.handle(probe(false, 20), NOW), vec![]);
        assert_eq!(r.handle(probe(false, 21), NOW), vec![]);
        // A pass resets the count.
        assert_eq!(r.handle(probe(true, 22), NOW), vec![]);
        assert_eq!(r.handle(probe(false, 23), NOW), vec![]);
        assert_eq!(r.handle(probe(false, 24), NOW), vec![]);
        assert_eq!(r.health(), Some(Health::Healthy));
        assert_eq!(
            r.handle(probe(false, 25), NOW),
            vec![report(
                st(
                    TaskState::Running,
                    "unhealthy: health check failed: refused"
                )
                .addr(ADDR)
                .health(Health::Unhealthy)
            )]
        );
        assert_eq!(r.handle(probe(false, 26), NOW), vec![]);
        assert_eq!(r.handle(probe(true, 27), NOW), vec![healthy]);
        assert_eq!(r.health(), Some(Health::Healthy));
    }

    #[test]
    fn zero_retries_count_as_one() {
        let mut t = task("assigned", None, None, true);
        if let Some(h) = t.spec.container.healthcheck.as_mut() {
            h.retries = 0;
            h.start_period = 0;
        }
        let mut r = running(t);
        assert_eq!(
            r.handle(probe(false, 1), NOW),
            vec![report(
                st(
                    TaskState::Running,
                    "unhealthy: health check failed: refused"
                )
                .addr(ADDR)
                .health(Health::Unhealthy)
            )]
        );
    }

    #[test]
    fn without_health_check_probes_are_ignored() {
        let mut r = running(assigned());
        assert_eq!(r.probe_interval(), None);
        assert_eq!(r.handle(probe(true, 1), NOW), vec![]);
        assert_eq!(r.handle(probe(false, 100), NOW), vec![]);
        assert_eq!(r.health(), None);
    }

    #[test]
    fn the_image_health_check_applies_only_when_the_service_sets_none() {
        let image_hc = flotilla_types::HealthCheck {
            probe: flotilla_types::HealthProbe::Exec {
                cmd: "image-check".into(),
            },
            interval: 2_000_000_000,
            timeout: 1_000_000_000,
            retries: 1,
            start_period: 0,
            start_interval: 0,
        };
        let mut r = Runner::new(assigned());
        r.use_image_healthcheck(Some(image_hc.clone()));
        let mut r = {
            r.handle(begin(Found::Nothing), NOW);
            for ev in [
                Event::ImageReady(Ok(())),
                Event::ImageVerified(Ok(())),
                Event::SlotAcquired,
                Event::NetworkPrepared(Ok(Some(ADDR.into()))),
                Event::Created(Ok(())),
                Event::Started(Ok(())),
            ] {
                r.handle(ev, NOW);
            }
            r
        };
        assert_eq!(r.healthcheck(), Some(&image_hc));
        assert_eq!(r.health(), Some(Health::Starting));
        assert_eq!(r.probe_interval(), Some(Duration::from_secs(2)));
        r.handle(probe(true, 1), NOW);
        assert_eq!(r.health(), Some(Health::Healthy));

        let mut own = Runner::new(task("assigned", None, None, true));
        let before = own.healthcheck().cloned();
        own.use_image_healthcheck(Some(image_hc));
        assert_eq!(
            own.healthcheck().cloned(),
            before,
            "the service's check wins"
        );
    }

    #[test]
    fn probes_outside_running_are_ignored() {
        let mut r = Runner::new(task("assigned", None, None, true));
        assert_eq!(r.handle(probe(true, 1), NOW), vec![]);
        let mut r = running(task("assigned", None, None, true));
        r.handle(Event::StopRequested, NOW);
        assert_eq!(r.handle(probe(true, 1), NOW), vec![]);
        assert_eq!(r.health(), Some(Health::Starting));
    }

    #[test]
    fn events_after_finish_are_ignored() {
        let mut r = running(assigned());
        r.handle(exited(0, false), NOW);
        let before = r.clone();
        for ev in [
            Event::StopRequested,
            Event::Stopped { exit_code: Some(0) },
            exited(1, false),
            probe(false, 100),
            begin(Found::Nothing),
            Event::Started(Ok(())),
        ] {
            assert_eq!(r.handle(ev, NOW), vec![]);
        }
        assert_eq!(r, before);
    }

    #[test]
    fn unexpected_events_are_ignored() {
        let mut r = Runner::new(assigned());
        assert_eq!(r.handle(Event::Created(Ok(())), NOW), vec![]);
        assert_eq!(r.handle(exited(0, false), NOW), vec![]);
        assert_eq!(r.phase(), Phase::Idle);
        let mut r = at(Phase::Image);
        let before = r.clone();
        for ev in [
            begin(Found::Running),
            Event::ImageVerified(Ok(())),
            Event::SlotAcquired,
            Event::Started(Ok(())),
            Event::Stopped { exit_code: None },
            exited(0, false),
        ] {
            assert_eq!(r.handle(ev, NOW), vec![]);
        }
        assert_eq!(r, before);
        let mut r = running(assigned());
        assert_eq!(r.handle(Event::Stopped { exit_code: None }, NOW), vec![]);
        assert_eq!(r.handle(Event::Started(Ok(())), NOW), vec![]);
        assert_eq!(r.phase(), Phase::Running);
    }

    #[test]
    fn grace_defaults_to_ten_seconds() {
        let mut t = assigned();
        assert_eq!(grace_of(&t), Duration::from_secs(10));
        t.spec.container.stop_grace_period = Some(1_500_000_000);
        assert_eq!(grace_of(&t), Duration::from_millis(1_500));
    }

    #[test]
    fn probe_interval_is_at_least_100_ms() {
        let mut t = task("assigned", None, None, true);
        assert_eq!(
            Runner::new(t.clone()).probe_interval(),
            Some(Duration::from_secs(1))
        );
        if let Some(h) = t.spec.container.healthcheck.as_mut() {
            h.interval = 1;
        }
        assert_eq!(
            Runner::new(t).probe_interval(),
            Some(Duration::from_millis(100))
        );
    }

    /// `task(.., hc = true)` with `start_period` and `start_interval` in milliseconds.
    fn checked(start_period_ms: u64, start_interval_ms: u64) -> Task {
        let mut t = task("assigned", None, None, true);
        if let Some(h) = t.spec.container.healthcheck.as_mut() {
            h.interval = 30_000_000_000;
            h.start_period = start_period_ms * 1_000_000;
            h.start_interval = start_interval_ms * 1_000_000;
        }
        t
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_started_task_with_a_health_check_is_reported_starting() {
        let mut r = at(Phase::Start);
        r.use_image_healthcheck(checked(0, 0).spec.container.healthcheck);
        assert_eq!(
            r.handle(Event::Started(Ok(())), NOW),
            vec![
                report(
                    st(TaskState::Running, "started")
                        .addr(ADDR)
                        .health(Health::Starting)
                ),
                Effect::Monitor
            ]
        );
        // Without a check: no health at all.
        let mut r = at(Phase::Start);
        assert_eq!(
            r.handle(Event::Started(Ok(())), NOW)[0],
            report(st(TaskState::Running, "started").addr(ADDR))
        );
    }

    #[test]
    fn the_first_probe_runs_at_once_then_every_start_interval_until_healthy_then_interval() {
        let mut r = running(checked(0, 0));
        // First probe: right away.
        assert_eq!(r.probe_delay(Duration::ZERO), Some(Duration::ZERO));
        r.handle(probe_at(false, ms(0)), NOW);
        // Not healthy yet: the default start interval, 250 ms.
        assert_eq!(r.probe_delay(ms(1)), Some(DEFAULT_START_INTERVAL));
        r.handle(probe_at(false, ms(250)), NOW);
        assert_eq!(r.probe_delay(ms(251)), Some(ms(250)));
        r.handle(probe_at(true, ms(500)), NOW);
        assert_eq!(r.health(), Some(Health::Healthy));
        // Healthy once: every interval from now on, even after a later failure.
        assert_eq!(r.probe_delay(ms(501)), Some(Duration::from_secs(30)));
        r.handle(probe_at(false, ms(30_501)), NOW);
        assert_eq!(r.probe_delay(ms(30_502)), Some(Duration::from_secs(30)));
    }

    #[test]
    fn start_interval_is_the_checks_own_bounded_by_100_ms_and_the_interval() {
        let delay_after_one_failure = |t: Task| {
            let mut r = running(t);
            r.handle(probe_at(false, ms(0)), NOW);
            r.probe_delay(ms(1))
        };
        assert_eq!(delay_after_one_failure(checked(0, 2_000)), Some(ms(2_000)));
        // Exec probes cost ~150× a TCP probe: their default is 1 s.
        let mut exec = checked(0, 0);
        if let Some(h) = exec.spec.container.healthcheck.as_mut() {
            h.probe = flotilla_types::HealthProbe::Exec { cmd: "true".into() };
        }
        assert_eq!(
            delay_after_one_failure(exec),
            Some(DEFAULT_EXEC_START_INTERVAL)
        );
        assert_eq!(delay_after_one_failure(checked(0, 1)), Some(ms(100)));
        // Never slower than the interval (1 s here).
        let mut t = task("assigned", None, None, true);
        if let Some(h) = t.spec.container.healthcheck.as_mut() {
            h.start_interval = 5_000_000_000;
        }
        assert_eq!(delay_after_one_failure(t.clone()), Some(ms(1_000)));
        // Without a check: no probes.
        assert_eq!(Runner::new(assigned()).probe_delay(ms(0)), None);
        assert_eq!(Runner::new(assigned()).start_interval(), None);
    }

    #[test]
    fn fast_probing_stops_after_the_start_window_when_never_healthy() {
        // start_period 0: fast for the first 30 s.
        let mut r = running(checked(0, 0));
        r.handle(probe_at(false, ms(0)), NOW);
        assert_eq!(r.probe_delay(ms(29_999)), Some(ms(250)));
        assert_eq!(
            r.probe_delay(MIN_START_WINDOW),
            Some(Duration::from_secs(30))
        );
        // A longer start period extends the window to it.
        let mut r = running(checked(60_000, 0));
        r.handle(probe_at(false, ms(0)), NOW);
        assert_eq!(r.probe_delay(ms(45_000)), Some(ms(250)));
        assert_eq!(r.probe_delay(ms(60_000)), Some(Duration::from_secs(30)));
        // Healthy at last after the window: nothing changes but the health.
        r.handle(probe_at(true, ms(90_000)), NOW);
        assert_eq!(r.health(), Some(Health::Healthy));
        assert_eq!(r.probe_delay(ms(90_001)), Some(Duration::from_secs(30)));
    }

    #[test]
    fn start_period_failures_do_not_count_and_fast_failures_count_once_per_interval() {
        // interval 1 s, retries 3, start_period 1 s; probes every 250 ms while starting.
        let mut t = task("assigned", None, None, true);
        if let Some(h) = t.spec.container.healthcheck.as_mut() {
            h.start_period = 1_000_000_000;
        }
        let mut r = running(t);
        for at in (0..3_000).step_by(250) {
            r.handle(probe_at(false, ms(at)), NOW);
            assert_eq!(r.health(), Some(Health::Starting), "at {at} ms");
            assert_eq!(r.probe_delay(ms(at + 1)), Some(ms(250)));
        }
        // Counted at 1 s and 2 s (the start period over, an interval apart), the third at 3 s.
        assert_eq!(
            r.handle(probe_at(false, ms(3_000)), NOW),
            vec![report(
                st(
                    TaskState::Running,
                    "unhealthy: health check failed: refused"
                )
                .addr(ADDR)
                .health(Health::Unhealthy)
            )]
        );
        // Unhealthy (no longer starting), still inside the window: no more fast probing.
        assert_eq!(r.probe_delay(ms(3_001)), Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_never_healthy_task_turns_unhealthy_when_it_did_with_one_probe_per_interval() {
        // Docker's defaults: interval 30 s, retries 3, no start period.
        let mut r = running(checked(0, 0));
        let mut at = Duration::ZERO;
        let mut probes = 0;
        while r.health() == Some(Health::Starting) {
            r.handle(probe_at(false, at), NOW);
            probes += 1;
            at += r.probe_delay(at).unwrap_or_default();
            assert!(probes < 1_000);
        }
        assert_eq!(r.health(), Some(Health::Unhealthy));
        // Fast for 30 s (121 probes: 0 … 30 s), then at 60 s and 90 s, as 30, 60, 90 before.
        assert_eq!(probes, 123);
        assert_eq!(at, Duration::from_secs(120));
    }

    #[test]
    fn a_starting_tasks_failure_is_reported_again_only_when_it_changes_and_not_often() {
        let mut r = running(checked(60_000, 0));
        let fail = |out: &str, t: u64| Event::Probe {
            ok: false,
            output: out.into(),
            since_start: ms(t),
        };
        let starting = |out: &str| {
            vec![report(
                st(
                    TaskState::Running,
                    &format!("starting: health check failed: {out}"),
                )
                .addr(ADDR)
                .health(Health::Starting),
            )]
        };
        assert_eq!(r.handle(fail("refused", 0), NOW), starting("refused"));
        // Changed, but too soon; the same, later.
        assert_eq!(r.handle(fail("HTTP 503", 250), NOW), vec![]);
        assert_eq!(r.handle(fail("refused", 20_000), NOW), vec![]);
        assert_eq!(
            r.handle(fail("HTTP 503", 20_250), NOW),
            starting("HTTP 503")
        );
        // Healthy: the usual report.
        assert_eq!(
            r.handle(probe_at(true, ms(20_500)), NOW),
            vec![report(
                st(TaskState::Running, "started")
                    .addr(ADDR)
                    .health(Health::Healthy)
            )]
        );
    }

    #[test]
    fn an_adopted_healthy_task_is_probed_at_once_then_every_interval() {
        let mut r = Runner::new(checked(0, 0));
        r.task.status.state = TaskState::Running;
        r.task.status.health = Some(Health::Healthy);
        r.handle(begin(Found::Running), NOW);
        assert_eq!(r.probe_delay(ms(0)), Some(Duration::ZERO));
        r.handle(probe_at(true, ms(0)), NOW);
        assert_eq!(r.probe_delay(ms(1)), Some(Duration::from_secs(30)));
    }
}
