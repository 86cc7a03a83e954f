//! The dispatcher: how agents learn their tasks and report back.
//!
//! - `GET /v1/nodes/{id}/assignments`: a long-lived newline-delimited JSON stream of the complete
//!   set of tasks assigned to the node, sent at once and again whenever one of them changes
//!   (watch on the store; no polling), plus a keep-alive resend every few seconds. Any manager
//!   serves it from its own replica.
//! - `POST /v1/nodes/{id}/tasks`: status reports (batched); forwarded to the leader like every
//!   write, applied in one Raft entry, never moving a task backwards.
//!
//! An agent's certificate is not trusted beyond its own node (a compromised worker holds one):
//!
//! - A reported task address is kept only when it lies in the reporting node's subnet
//!   ([`super::network::is_task_addr`]); otherwise the task keeps the address it had.
//! - Free text is capped ([`MAX_STATUS_TEXT`] bytes of `message` and of `err`, cut with a
//!   marker), `health` must be one of the agent's values, a timestamp from the future is
//!   clamped to the leader's clock. Reports are cleaned, never refused for their content: the
//!   agent resends a refused batch until it is accepted.
//! - A report that changes nothing but the timestamp is not written.
//! - Writes of one node (status reports here, heartbeat changes in `nodes.rs`) go through a
//!   token bucket ([`AGENT_WRITES`]); beyond it the answer is 429 and the agent retries with
//!   everything it gathered meanwhile in one batch.
//! - A node has one assignment stream and one network stream per manager: a new one closes the
//!   older (newest wins, so an agent reconnecting after a network failure is never locked out
//!   by its own dead stream).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::response::Response;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use flotilla_control::{RateLimit, RateLimiter};
use flotilla_store::{Batch, Event, Op, Table};
use flotilla_types::{Assignments, Node, StatusReport, Task, TaskState, TaskStatus};

use super::{json_ok, Caller, Ctx};
use crate::error::ManagerError;
use crate::manager::{encode, lock, Manager};
use flotilla_types::now_ms;

/// Writes one node may cause: a burst, then a steady rate. An agent batches its status reports
/// (one write per batch, however many tasks) and writes its heartbeat only when its address or
/// description changes, so a healthy agent stays far below this even while it starts many
/// tasks; when it is reached the agent's reports are merged into fewer, larger batches.
pub const AGENT_WRITES: RateLimit = RateLimit {
    burst: 50,
    per_sec: 20,
};

/// Largest `message` and `err` kept from a status report, in bytes (longer ones are cut).
pub const MAX_STATUS_TEXT: usize = 4096;

/// Largest `container_id` kept from a status report.
const MAX_CONTAINER_ID: usize = 128;

/// The dispatcher's per-node state on one manager: the write buckets (used on the leader), the
/// limit on logging forged addresses, and the open agent streams (on every manager). Each
/// [`Manager`] owns one, so managers sharing a process (tests) share none of it.
pub struct Dispatcher {
    writes: Mutex<RateLimiter<String>>,
    forged_logs: Mutex<RateLimiter<String>>,
    streams: Arc<Mutex<HashMap<StreamKey, OpenStream>>>,
    next_stream: AtomicU64,
    /// The origin of the rate limits' monotonic clock.
    start: Instant,
}

/// A node's stream of one kind.
type StreamKey = (StreamKind, String);
/// The open stream's claim id, and the way to close it.
type OpenStream = (u64, tokio::sync::oneshot::Sender<()>);

/// Forged task addresses logged per node: a few, then one a second.
const FORGED_LOGS: RateLimit = RateLimit {
    burst: 3,
    per_sec: 1,
};

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Dispatcher {
    pub fn new() -> Dispatcher {
        Dispatcher {
            writes: Mutex::new(RateLimiter::new(AGENT_WRITES)),
            forged_logs: Mutex::new(RateLimiter::new(FORGED_LOGS)),
            streams: Arc::new(Mutex::new(HashMap::new())),
            next_stream: AtomicU64::new(1),
            start: Instant::now(),
        }
    }

    /// The monotonic clock of the rate limits, in milliseconds since this dispatcher was made.
    fn monotonic_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Takes one write of `node_id` from its bucket, or the 429 to answer. Only node callers
    /// are limited: an admin acting for a node is trusted.
    pub fn take_agent_write(&self, caller: &Caller, node_id: &str) -> Result<(), ManagerError> {
        if !matches!(caller, Caller::Node { .. }) {
            return Ok(());
        }
        let mut writes = lock(&self.writes);
        let limit = writes.limit();
        match writes.try_take(&node_id.to_string(), self.monotonic_ms()) {
            Ok(()) => Ok(()),
            Err(wait_ms) => {
                tracing::debug!(node = node_id, wait_ms, "agent write rate-limited");
                Err(ManagerError::TooManyRequests(format!(
                    "node {node_id} writes more than {} times a second: retry in {wait_ms} ms",
                    limit.per_sec
                )))
            }
        }
    }

    /// Claims `node_id`'s stream of `kind` for a node caller, closing the one it had (an agent
    /// keeps one of each; a second is a reconnect, or a misbehaving agent multiplying the work
    /// of rebuilding its streams). Admin callers (debugging, tests) are not counted.
    pub fn claim_stream(
        &self,
        caller: &Caller,
        kind: StreamKind,
        node_id: &str,
    ) -> Option<StreamClaim> {
        if !matches!(caller, Caller::Node { .. }) {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let key = (kind, node_id.to_string());
        let old = lock(&self.streams).insert(key.clone(), (id, tx));
        if let Some((_, old)) = old {
            tracing::debug!(node = node_id, stream = ?kind, "a newer stream replaces the node's open one");
            let _ = old.send(());
        }
        Some(StreamClaim {
            streams: Arc::clone(&self.streams),
            key,
            id,
            superseded: rx,
        })
    }

    /// Logs a forged task address, at most a few times a second per node (the reports that
    /// carry them are not limited when they write nothing).
    fn log_forged_address(
        &self,
        node_id: &str,
        task_id: &str,
        addr: &str,
        subnet: Option<ipnet::Ipv4Net>,
    ) {
        let allowed = lock(&self.forged_logs)
            .try_take(&node_id.to_string(), self.monotonic_ms())
            .is_ok();
        if allowed {
            tracing::warn!(
                node = node_id,
                task = task_id,
                address = %addr.chars().take(64).collect::<String>(),
                subnet = %subnet.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
                "a reported task address outside the node's subnet was ignored"
            );
        }
    }
}

/// The two long-lived agent streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Assignments,
    Network,
}

impl StreamKind {
    /// What the stream carries, for messages.
    fn what(self) -> &'static str {
        match self {
            StreamKind::Assignments => "assignments",
            StreamKind::Network => "network map",
        }
    }
}

/// A node's claim on one of its streams; the stream ends when a newer claim is made. Dropping
/// it (the stream ended) frees the slot unless a newer claim holds it already.
pub struct StreamClaim {
    streams: Arc<Mutex<HashMap<StreamKey, OpenStream>>>,
    key: StreamKey,
    id: u64,
    superseded: tokio::sync::oneshot::Receiver<()>,
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        let mut streams = lock(&self.streams);
        if streams.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            streams.remove(&self.key);
        }
    }
}

/// `s` cut to at most `max` bytes (on a character boundary), marked as cut.
fn capped(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    const MARK: &str = "… (truncated)";
    let mut end = max.saturating_sub(MARK.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end])
}

/// Whether `addr` is a task address of the node subnet `subnet` (none: no address is).
fn address_ok(subnet: Option<ipnet::Ipv4Net>, addr: &str) -> bool {
    matches!((subnet, addr.parse()), (Some(net), Ok(ip)) if super::network::is_task_addr(net, ip))
}

/// The status to store for a report of `current`, or `None` when there is nothing to write
/// (the report moves the task backwards, or changes nothing but the timestamp). Pure: the
/// reporting node's subnet for the task's first network (the default subnet, or its block of
/// the first user-defined network), its blocks of the task's user-defined networks, and the
/// leader's clock come in as arguments. An address on a network the task is not attached to,
/// or outside the node's block, is not kept.
pub fn accept_report(
    current: &TaskStatus,
    mut reported: TaskStatus,
    subnet: Option<ipnet::Ipv4Net>,
    blocks: &std::collections::BTreeMap<String, ipnet::Ipv4Net>,
    now_ms: u64,
) -> Option<TaskStatus> {
    // Never move backwards; the same state may refresh details (health, message).
    if reported.state < current.state {
        return None;
    }
    reported.message = capped(reported.message, MAX_STATUS_TEXT);
    reported.err = reported.err.map(|e| capped(e, MAX_STATUS_TEXT));
    if reported
        .container_id
        .as_ref()
        .is_some_and(|c| c.len() > MAX_CONTAINER_ID)
    {
        reported.container_id = None;
    }
    let valid = |a: &Option<String>| a.as_deref().is_some_and(|a| address_ok(subnet, a));
    if reported.address.is_some() && !valid(&reported.address) {
        reported.address = current.address.clone().filter(|_| valid(&current.address));
    }
    let on_block =
        |net: &str, a: &str| matches!(blocks.get(net), Some(b) if address_ok(Some(*b), a));
    let mut addresses = std::collections::BTreeMap::new();
    for (net, a) in std::mem::take(&mut reported.addresses) {
        let keep = if on_block(&net, &a) {
            Some(a)
        } else {
            current
                .addresses
                .get(&net)
                .filter(|c| on_block(&net, c))
                .cloned()
        };
        if let Some(a) = keep {
            addresses.insert(net, a);
        }
    }
    reported.addresses = addresses;
    reported.timestamp = reported.timestamp.min(now_ms);
    let unchanged = TaskStatus {
        timestamp: current.timestamp,
        ..reported.clone()
    } == *current;
    (!unchanged).then_some(reported)
}

fn assigned(mgr: &Manager, node_id: &str) -> Result<Assignments, ManagerError> {
    let revision = mgr.store.revision();
    let tasks: Vec<Task> = mgr
        .list::<Task>()?
        .into_iter()
        .filter(|t| t.node_id.as_deref() == Some(node_id) && t.status.state >= TaskState::Assigned)
        .collect();
    let trust = Some(mgr.cluster()?.trust);
    Ok(Assignments {
        revision,
        tasks,
        trust,
    })
}

/// A node's claim on its own stream of `kind` (a second line behind the route policy: only
/// the node itself, or an admin, reads a node's streams).
pub fn own_stream(
    ctx: &Ctx,
    caller: &Caller,
    kind: StreamKind,
    id: &str,
) -> Result<Option<StreamClaim>, ManagerError> {
    if !caller.is_node_or_admin(id) {
        return Err(ManagerError::forbidden(format!(
            "a node may only read its own {}",
            kind.what()
        )));
    }
    Ok(ctx.dispatcher.claim_stream(caller, kind, id))
}

pub async fn assignments(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ManagerError> {
    let claim = own_stream(&ctx, &caller, StreamKind::Assignments, &id)?;
    let me = id.clone();
    push_stream(
        ctx.clone(),
        claim,
        move |ev| match ev.table {
            Table::Cluster => true,
            // A task concerns this node's assignments only once it is placed here (a task's
            // node never changes after that); unplaced tasks, the bulk of a large create, don't.
            Table::Tasks => task_node(ev).is_none_or(|n| n.as_deref() == Some(me.as_str())),
            _ => false,
        },
        move |m| assigned(m, &id),
        |a, b| a.tasks == b.tasks && a.trust == b.trust,
    )
    .await
}

/// The node a task event is about, read without decoding the whole task: `Some(None)` for a
/// task not placed on any node, `None` when the event carries no readable task.
pub fn task_node(ev: &Event) -> Option<Option<String>> {
    #[derive(Deserialize)]
    struct NodeOf {
        #[serde(default)]
        node_id: Option<String>,
    }
    let v = ev.value.as_deref()?;
    serde_json::from_slice::<NodeOf>(v).ok().map(|n| n.node_id)
}

/// How often a push stream resends its current state when nothing changed, so that both
/// ends notice a dead connection (agents give up on a stream after 12 s of silence).
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// A long-lived NDJSON stream of `build`'s result: sent at once, then again whenever a change
/// that `relevant` accepts alters it (`same` says whether it did), plus a keep-alive resend
/// every 5 s so a dead connection is noticed by both sides. Bursts of changes are coalesced.
/// `relevant` keeps rebuilds (which read whole tables, on the blocking pool) off changes that
/// cannot matter. With a `claim`, the stream ends as soon as a newer claim on the same slot is
/// made; every stream ends at its next wake-up (within 5 s) once this node's store is shut
/// down.
pub async fn push_stream<T, R, B, S>(
    mgr: Arc<Manager>,
    claim: Option<StreamClaim>,
    relevant: R,
    build: B,
    same: S,
) -> Result<Response, ManagerError>
where
    T: Serialize + Send + 'static,
    R: Fn(&Event) -> bool + Send + 'static,
    B: Fn(&Manager) -> Result<T, ManagerError> + Send + Sync + 'static,
    S: Fn(&T, &T) -> bool + Send + 'static,
{
    let watch = mgr.store.watch(mgr.store.revision())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let build = Arc::new(build);
    let first = rebuild(&mgr, &build).await?;
    let stream = PushStream {
        mgr,
        watch,
        relevant,
        build,
        same,
        tx,
        sends: std::marker::PhantomData,
    };
    tokio::spawn(async move {
        let run = stream.run(first);
        match claim {
            // Dropping `run` drops the sender: the response ends, even while a client that
            // stopped reading has it blocked on a full channel.
            Some(mut claim) => {
                tokio::select! {
                    _ = run => {}
                    _ = &mut claim.superseded => {}
                }
            }
            None => run.await,
        }
    });
    Ok(super::stream_response(rx)?)
}

/// `build`'s result, computed on the blocking pool.
async fn rebuild<T, B>(mgr: &Arc<Manager>, build: &Arc<B>) -> Result<T, ManagerError>
where
    T: Send + 'static,
    B: Fn(&Manager) -> Result<T, ManagerError> + Send + Sync + 'static,
{
    let build = Arc::clone(build);
    mgr.blocking(move |m| build(m)).await
}

/// The running part of a [`push_stream`]: its store watch and the channel of its response.
struct PushStream<T, R, B, S> {
    mgr: Arc<Manager>,
    watch: flotilla_store::Watch,
    relevant: R,
    build: Arc<B>,
    same: S,
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// What the stream sends.
    sends: std::marker::PhantomData<fn() -> T>,
}

impl<T, R, B, S> PushStream<T, R, B, S>
where
    T: Serialize + Send + 'static,
    R: Fn(&Event) -> bool + Send + 'static,
    B: Fn(&Manager) -> Result<T, ManagerError> + Send + Sync + 'static,
    S: Fn(&T, &T) -> bool + Send + 'static,
{
    /// Sends `first`, then every changed state, until the client goes away or this node stops
    /// being a manager.
    async fn run(mut self, first: T) {
        if self.tx.send(super::ndjson(&first)).await.is_err() {
            return;
        }
        let mut last = Some(first);
        // The keep-alive is due 5 s after the last message sent, however many events arrive
        // meanwhile, so that a steady flow of changes that do not concern this stream (a large
        // create's unplaced tasks) cannot keep it silent long enough for the agent to drop it.
        let mut sent_at = tokio::time::Instant::now();
        loop {
            let Some(dirty) = self.wake(sent_at, &mut last).await else {
                return;
            };
            if self.mgr.store.is_shut_down() {
                // This node stopped being a manager: its replica no longer follows the cluster,
                // so the agent must reconnect to a current manager.
                return;
            }
            if !dirty {
                continue;
            }
            self.settle().await;
            let Ok(now) = rebuild(&self.mgr, &self.build).await else {
                continue;
            };
            if last.as_ref().is_some_and(|l| (self.same)(l, &now)) {
                continue;
            }
            if self.tx.send(super::ndjson(&now)).await.is_err() {
                return;
            }
            sent_at = tokio::time::Instant::now();
            last = Some(now);
        }
    }

    /// Waits for the next reason to look again: `Some(true)` when the state may have changed
    /// (a relevant event, a restarted watch, or the keep-alive, which forgets `last` so that
    /// the state is resent), `Some(false)` for an event that cannot matter, `None` when the
    /// stream must end.
    async fn wake(&mut self, sent_at: tokio::time::Instant, last: &mut Option<T>) -> Option<bool> {
        tokio::select! {
            ev = self.watch.next() => match ev {
                Some(Ok(ev)) => Some((self.relevant)(&ev)),
                _ => {
                    // Compacted or closed: start over from the current state.
                    self.watch = self.mgr.store.watch(self.mgr.store.revision()).ok()?;
                    Some(true)
                }
            },
            _ = tokio::time::sleep_until(sent_at + KEEPALIVE) => {
                *last = None;
                Some(true)
            }
            _ = self.tx.closed() => None,
        }
    }

    /// Lets a burst of changes land, then drains the events already queued.
    async fn settle(&mut self) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, self.watch.next()).await {}
    }
}

/// `POST /v1/nodes/{id}/tasks` (leader): applies a node's batch of status reports in one
/// write, within the node's write budget.
pub async fn report(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(reports): Json<Vec<StatusReport>>,
) -> Result<Response, ManagerError> {
    if !caller.is_node_or_admin(&id) {
        return Err(ManagerError::forbidden(
            "a node may only report its own tasks",
        ));
    }
    let node_id = id.clone();
    let (batch, applied) = ctx
        .blocking(move |m| report_batch(m, &node_id, reports))
        .await?;
    if !batch.is_empty() {
        ctx.dispatcher.take_agent_write(&caller, &id)?;
        let out = ctx.store.write(batch).await?;
        if let Err(f) = out.result {
            // A concurrent orchestrator write; the agent resends on its next report.
            return Err(ManagerError::conflict(format!(
                "status report raced: {f}; resend"
            )));
        }
        ctx.kick();
    }
    Ok(json_ok(&serde_json::json!({ "applied": applied })))
}

/// The write that applies `node_id`'s `reports` to its tasks (reports of other nodes' tasks,
/// or that change nothing, are left out), and how many reports it applies.
fn report_batch(
    mgr: &Manager,
    node_id: &str,
    reports: Vec<StatusReport>,
) -> Result<(Batch, usize), ManagerError> {
    let subnet = mgr
        .get::<Node>(node_id)?
        .and_then(|n| n.network)
        .and_then(|n| n.subnet.parse::<ipnet::Ipv4Net>().ok());
    // This node's block of every user-defined network.
    let node_blocks: std::collections::BTreeMap<String, ipnet::Ipv4Net> = mgr
        .list::<flotilla_types::Network>()?
        .into_iter()
        .filter_map(|n| Some((n.name, n.blocks.get(node_id)?.parse().ok()?)))
        .collect();
    let now = now_ms();
    let mut batch = Batch::new();
    let mut applied = 0usize;
    for r in reports {
        let Some(mut t) = mgr.get::<Task>(&r.task_id)? else {
            continue;
        };
        if t.node_id.as_deref() != Some(node_id) {
            continue;
        }
        let attached = &t.spec.networks;
        let blocks: std::collections::BTreeMap<String, ipnet::Ipv4Net> = attached
            .iter()
            .filter_map(|a| Some((a.target.clone(), *node_blocks.get(&a.target)?)))
            .collect();
        let subnet = match attached.first() {
            None => subnet,
            Some(a) => blocks.get(&a.target).copied(),
        };
        if let Some(a) = r
            .status
            .address
            .as_deref()
            .filter(|a| !address_ok(subnet, a))
        {
            mgr.dispatcher.log_forged_address(node_id, &t.id, a, subnet);
        }
        let Some(status) = accept_report(&t.status, r.status, subnet, &blocks, now) else {
            continue;
        };
        t.status = status;
        t.meta.updated_at = now;
        batch.push(Op::update(
            Table::Tasks,
            &t.id,
            encode(&t)?,
            Some(t.meta.version),
        ));
        applied += 1;
    }
    Ok((batch, applied))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(address: Option<&str>) -> TaskStatus {
        let mut s = TaskStatus::new(TaskState::Running, 1_000, "started");
        s.address = address.map(str::to_string);
        s
    }

    fn subnet() -> Option<ipnet::Ipv4Net> {
        "10.200.3.0/24".parse().ok()
    }

    #[test]
    fn addresses_outside_the_nodes_subnet_are_not_stored() {
        let current = running(Some("10.200.3.5"));
        for bad in [
            "127.0.0.1",
            "169.254.169.254",
            "10.200.4.5",
            "10.200.3.1",
            "x",
        ] {
            let mut r = running(Some(bad));
            r.health = Some(flotilla_types::Health::Healthy);
            let got = accept_report(&current, r, subnet(), &Default::default(), 5_000)
                .expect("health changed");
            assert_eq!(got.address.as_deref(), Some("10.200.3.5"), "{bad}");
            assert_eq!(got.health, Some(flotilla_types::Health::Healthy));
        }
        // The first report of an address, from a node without a subnet: nothing to keep, so
        // nothing changes.
        assert_eq!(
            accept_report(
                &running(None),
                running(Some("10.200.3.9")),
                None,
                &Default::default(),
                5_000
            ),
            None
        );
        let got = accept_report(
            &running(None),
            running(Some("10.200.3.9")),
            subnet(),
            &Default::default(),
            5_000,
        )
        .expect("a change");
        assert_eq!(got.address.as_deref(), Some("10.200.3.9"));
    }

    #[test]
    fn timestamp_only_changes_and_backward_moves_are_not_writes() {
        let current = running(Some("10.200.3.5"));
        let mut later = current.clone();
        later.timestamp += 60_000;
        assert_eq!(
            accept_report(&current, later, subnet(), &Default::default(), 1_000_000),
            None
        );
        let starting = TaskStatus::new(TaskState::Starting, 2_000, "x");
        assert_eq!(
            accept_report(&current, starting, subnet(), &Default::default(), 1_000_000),
            None
        );
        // A rewritten invalid address falls back to the stored one: also no change.
        assert_eq!(
            accept_report(
                &current,
                running(Some("127.0.0.1")),
                subnet(),
                &Default::default(),
                1_000_000
            ),
            None
        );
    }

    #[test]
    fn text_is_capped_health_checked_and_future_times_clamped() {
        let mut r = TaskStatus::new(TaskState::Failed, u64::MAX, "é".repeat(10_000));
        r.err = Some("e".repeat(100_000));
        // A health value agents never send reads as none, at the wire.
        let mut v = serde_json::to_value(&r).expect("encode");
        v["health"] = serde_json::json!("\u{1b}]0;pwned\u{7}");
        let mut r: TaskStatus = serde_json::from_value(v).expect("decode");
        r.container_id = Some("c".repeat(1000));
        let got = accept_report(&running(None), r, subnet(), &Default::default(), 7_000)
            .expect("a change");
        assert!(
            got.message.len() <= MAX_STATUS_TEXT,
            "{}",
            got.message.len()
        );
        assert!(got.message.ends_with("(truncated)"));
        assert!(got
            .err
            .as_deref()
            .is_some_and(|e| e.len() <= MAX_STATUS_TEXT));
        assert_eq!(got.health, None);
        assert_eq!(got.container_id, None);
        assert_eq!(got.timestamp, 7_000);
    }

    fn node_caller(id: &str) -> Caller {
        Caller::Node {
            id: id.into(),
            role: flotilla_pki::Role::Worker,
        }
    }

    #[tokio::test]
    async fn a_newer_stream_of_a_node_closes_the_older_one() {
        let d = Dispatcher::new();
        let me = node_caller("n1");
        let mut first = d
            .claim_stream(&me, StreamKind::Assignments, "n1")
            .expect("node streams are claimed");
        // The other kind, and admin streams, are not affected.
        let mut network = d
            .claim_stream(&me, StreamKind::Network, "n1")
            .expect("network claim");
        assert!(d
            .claim_stream(&Caller::Admin, StreamKind::Assignments, "n1")
            .is_none());
        assert!(first.superseded.try_recv().is_err());
        let mut second = d
            .claim_stream(&me, StreamKind::Assignments, "n1")
            .expect("second claim");
        assert_eq!(first.superseded.try_recv(), Ok(()));
        // The old stream ending does not free the newer one's slot.
        drop(first);
        assert!(second.superseded.try_recv().is_err());
        assert!(network.superseded.try_recv().is_err());
        drop(second);
        let key = (StreamKind::Assignments, "n1".to_string());
        assert!(!lock(&d.streams).contains_key(&key));
    }

    #[tokio::test]
    async fn dispatchers_share_neither_write_budgets_nor_streams() {
        let (a, b) = (Dispatcher::new(), Dispatcher::new());
        let me = node_caller("n1");
        // The burst, and whatever refills meanwhile, runs out.
        let e = (0..10 * AGENT_WRITES.burst)
            .find_map(|_| a.take_agent_write(&me, "n1").err())
            .expect("over the budget");
        assert!(matches!(e, ManagerError::TooManyRequests(_)), "{e}");
        b.take_agent_write(&me, "n1")
            .expect("another dispatcher's budget");
        // Admins are not limited.
        a.take_agent_write(&Caller::Admin, "n1").expect("admin");
        let mut on_a = a
            .claim_stream(&me, StreamKind::Assignments, "n1")
            .expect("claim on a");
        let _on_b = b
            .claim_stream(&me, StreamKind::Assignments, "n1")
            .expect("claim on b");
        assert!(on_a.superseded.try_recv().is_err());
    }

    #[test]
    fn addresses_on_user_networks_must_lie_in_the_nodes_block() {
        let blocks: std::collections::BTreeMap<String, ipnet::Ipv4Net> = [
            ("front".to_string(), "10.200.16.0/24".parse().expect("net")),
            ("back".to_string(), "10.200.32.16/28".parse().expect("net")),
        ]
        .into_iter()
        .collect();
        let mut r = running(Some("10.200.16.5"));
        for (net, a) in [
            ("front", "10.200.16.7"),
            ("back", "10.200.32.18"),
            // Another node's block, a network the task is not on, the block's gateway.
            ("elsewhere", "10.200.48.2"),
        ] {
            r.addresses.insert(net.into(), a.into());
        }
        let got = accept_report(
            &running(None),
            r,
            blocks.get("front").copied(),
            &blocks,
            7_000,
        )
        .expect("a change");
        assert_eq!(got.address.as_deref(), Some("10.200.16.5"));
        let kept: Vec<(&str, &str)> = got
            .addresses
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(kept, [("back", "10.200.32.18"), ("front", "10.200.16.7")]);

        // A forged address falls back to the one stored before.
        let mut forged = got.clone();
        forged
            .addresses
            .insert("back".into(), "10.200.32.17".into());
        forged
            .addresses
            .insert("front".into(), "10.200.17.9".into());
        forged.message = "again".into();
        let again = accept_report(&got, forged, blocks.get("front").copied(), &blocks, 8_000)
            .expect("the message changed");
        assert_eq!(again.addresses, got.addresses);
    }
}
