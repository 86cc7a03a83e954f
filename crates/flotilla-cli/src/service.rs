//! `flotilla service …`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hyper::Method;

use flotilla_api::Client;
use flotilla_types::{
    ContainerSpec, EndpointMode, EndpointSpec, FailureAction, HealthCheck, HealthProbe, PortConfig,
    Protocol, PublishMode, RestartCondition, Service, ServiceMode, ServiceSpec, Task, TaskSpec,
    TaskState, UpdateConfig, UpdateOrder, UpdateState,
};

use crate::client::{enc, get};
use crate::output::{add_row, ago, escape, escape_lines, print_json, print_table, table};
use crate::{
    CliError, Format, ServiceCmd, ServiceCreateArgs, ServicePsArgs, ServiceUpdateArgs, SpecFlags,
};

/// Parses `64m`, `1g`, `512k`, `1024` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, CliError> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| CliError::usage(format!("{s:?} is not a size: use e.g. 64m or 1g")))?;
    if n < 0.0 {
        return Err(CliError::usage(format!("{s:?}: sizes must be positive")));
    }
    Ok((n * mult as f64) as u64)
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

fn cpus(c: f64) -> Result<u64, CliError> {
    if !(0.0..=4096.0).contains(&c) {
        return Err(CliError::usage(format!("{c} CPUs is out of range")));
    }
    Ok((c * 1e9) as u64)
}

fn kv_map(list: &[String], what: &str) -> Result<BTreeMap<String, String>, CliError> {
    let mut m = BTreeMap::new();
    for kv in list {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        if k.is_empty() {
            return Err(CliError::usage(format!(
                "{what} {kv:?}: expected KEY=VALUE"
            )));
        }
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

/// Applies the flags that were given to `spec`.
fn apply_flags(spec: &mut ServiceSpec, f: &SpecFlags) -> Result<(), CliError> {
    let t = &mut spec.task_template;
    match &mut spec.mode {
        ServiceMode::Replicated { replicas } => {
            if let Some(r) = f.replicas {
                *replicas = r;
            }
        }
        ServiceMode::ReplicatedJob {
            max_concurrent,
            total_completions,
        } => {
            if let Some(r) = f.replicas {
                *total_completions = r;
            }
            if let Some(m) = f.max_concurrent {
                *max_concurrent = m;
            }
        }
        ServiceMode::Global | ServiceMode::GlobalJob => {
            if f.replicas.is_some() {
                return Err(CliError::usage(
                    "--replicas does not apply to global services",
                ));
            }
        }
    }
    if !f.env.is_empty() {
        t.container.env = f.env.clone();
    }
    if let Some(w) = &f.workdir {
        t.container.workdir = Some(w.clone());
    }
    if let Some(u) = &f.user {
        t.container.user = Some(u.clone());
    }
    if !f.constraint.is_empty() {
        t.placement.constraints = f.constraint.clone();
    }
    if !f.placement_pref.is_empty() {
        t.placement.preferences = f
            .placement_pref
            .iter()
            .map(|p| p.strip_prefix("spread=").unwrap_or(p).to_string())
            .collect();
    }
    if let Some(m) = f.replicas_max_per_node {
        t.placement.max_replicas_per_node = m;
    }
    if let Some(c) = f.reserve_cpu {
        t.resources.reservations.nano_cpus = cpus(c)?;
    }
    if let Some(m) = &f.reserve_memory {
        t.resources.reservations.memory_bytes = parse_bytes(m)?;
    }
    if let Some(c) = f.limit_cpu {
        t.resources.limits.nano_cpus = cpus(c)?;
    }
    if let Some(m) = &f.limit_memory {
        t.resources.limits.memory_bytes = parse_bytes(m)?;
    }
    if let Some(c) = &f.restart_condition {
        t.restart_policy.condition = match c.as_str() {
            "none" => RestartCondition::None,
            "on-failure" => RestartCondition::OnFailure,
            _ => RestartCondition::Any,
        };
    }
    if let Some(d) = f.restart_delay {
        t.restart_policy.delay = nanos(d);
    }
    if let Some(n) = f.restart_max_attempts {
        t.restart_policy.max_attempts = n;
    }
    if let Some(d) = f.restart_window {
        t.restart_policy.window = nanos(d);
    }
    apply_endpoint_flags(&mut spec.endpoint_spec, f)?;
    let default_port = spec
        .endpoint_spec
        .ports
        .first()
        .map(|p| p.target)
        .unwrap_or(80);
    let t = &mut spec.task_template;
    let probes = [
        f.health_cmd.is_some(),
        f.health_http.is_some(),
        f.health_tcp.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if probes > 1 {
        return Err(CliError::usage(
            "give only one of --health-cmd, --health-http and --health-tcp",
        ));
    }
    let health_given = f.health_cmd.is_some()
        || f.health_http.is_some()
        || f.health_tcp.is_some()
        || f.health_interval.is_some()
        || f.health_timeout.is_some()
        || f.health_retries.is_some()
        || f.health_start_period.is_some()
        || f.health_start_interval.is_some();
    if health_given {
        let mut h = t.container.healthcheck.clone().unwrap_or(HealthCheck {
            probe: HealthProbe::Exec { cmd: String::new() },
            interval: 30_000_000_000,
            timeout: 30_000_000_000,
            retries: 3,
            start_period: 0,
            start_interval: 0,
        });
        if let Some(c) = &f.health_cmd {
            h.probe = HealthProbe::Exec { cmd: c.clone() };
        }
        if let Some(spec) = &f.health_http {
            h.probe = parse_health_http(spec, default_port)?;
        }
        if let Some(port) = f.health_tcp {
            if port == 0 {
                return Err(CliError::usage("--health-tcp: the port must be 1-65535"));
            }
            h.probe = HealthProbe::Tcp { port };
        }
        if matches!(&h.probe, HealthProbe::Exec { cmd } if cmd.is_empty()) {
            return Err(CliError::usage(
                "health check flags need --health-cmd, --health-http or --health-tcp",
            ));
        }
        if let Some(d) = f.health_interval {
            h.interval = nanos(d);
        }
        if let Some(d) = f.health_timeout {
            h.timeout = nanos(d);
        }
        if let Some(r) = f.health_retries {
            h.retries = r;
        }
        if let Some(d) = f.health_start_period {
            h.start_period = nanos(d);
        }
        if let Some(d) = f.health_start_interval {
            h.start_interval = nanos(d);
        }
        t.container.healthcheck = Some(h);
    }
    let u = &mut spec.update_config;
    if let Some(p) = f.update_parallelism {
        u.parallelism = p;
    }
    if let Some(d) = f.update_delay {
        u.delay = nanos(d);
    }
    if let Some(a) = &f.update_failure_action {
        u.failure_action = match a.as_str() {
            "continue" => FailureAction::Continue,
            "rollback" => FailureAction::Rollback,
            _ => FailureAction::Pause,
        };
    }
    if let Some(d) = f.update_monitor {
        u.monitor = nanos(d);
    }
    if let Some(o) = &f.update_order {
        u.order = if o == "start-first" {
            UpdateOrder::StartFirst
        } else {
            UpdateOrder::StopFirst
        };
    }
    if let Some(d) = f.stop_grace_period {
        spec.task_template.container.stop_grace_period = Some(nanos(d));
    }
    apply_process_flags(f, &mut spec.task_template.container)?;
    crate::network::apply_network_flags(f, &mut spec.task_template.networks)?;
    if !f.label.is_empty() {
        spec.labels.extend(kv_map(&f.label, "--label")?);
    }
    Ok(())
}

pub async fn run(client: &Client, cmd: ServiceCmd) -> Result<(), CliError> {
    match cmd {
        ServiceCmd::Create(a) => create(client, a).await,
        ServiceCmd::Ls(f) => ls(client, f.format).await,
        ServiceCmd::Ps(a) => ps(client, a).await,
        // Like `docker service inspect`, the object itself is the output (JSON either way).
        ServiceCmd::Inspect { service, format: _ } => {
            let s: Service = get(client, &format!("/v1/services/{}", enc(&service))).await?;
            print_json(&s)
        }
        ServiceCmd::Update(a) => update(client, a).await,
        ServiceCmd::Scale { pairs, detach } => {
            for p in &pairs {
                let Some((name, n)) = p.split_once('=') else {
                    return Err(CliError::usage(format!(
                        "{p:?}: expected SERVICE=REPLICAS, e.g. web=5"
                    )));
                };
                let n: u64 = n
                    .parse()
                    .map_err(|_| CliError::usage(format!("{p:?}: replicas must be a number")))?;
                let args = ServiceUpdateArgs {
                    service: name.to_string(),
                    image: None,
                    env_add: vec![],
                    env_rm: vec![],
                    args: None,
                    force: false,
                    flags: SpecFlags {
                        replicas: Some(n),
                        detach,
                        timeout: Duration::from_secs(300),
                        ..Default::default()
                    },
                };
                update(client, args).await?;
                println!("{name} scaled to {n}");
            }
            Ok(())
        }
        ServiceCmd::Rollback { service, detach } => {
            let _: serde_json::Value = client
                .post_json(&format!("/v1/services/{}/rollback", enc(&service)), &())
                .await?;
            println!("{service}");
            if !detach {
                converge(client, &service, Duration::from_secs(300), Goal::Rollback).await?;
            }
            Ok(())
        }
        ServiceCmd::Rm { services } => {
            for s in services {
                client
                    .request(Method::DELETE, &format!("/v1/services/{}", enc(&s)), None)
                    .await?;
                println!("{s}");
            }
            Ok(())
        }
        ServiceCmd::Logs(a) => crate::logs::service_logs(client, a).await,
    }
}

async fn create(client: &Client, a: ServiceCreateArgs) -> Result<(), CliError> {
    let mode = match a.mode.as_str() {
        "global" => ServiceMode::Global,
        "replicated-job" => ServiceMode::ReplicatedJob {
            max_concurrent: 1,
            total_completions: 1,
        },
        "global-job" => ServiceMode::GlobalJob,
        _ => ServiceMode::Replicated { replicas: 1 },
    };
    let mut spec = ServiceSpec {
        name: a.name.clone(),
        labels: BTreeMap::new(),
        task_template: TaskSpec {
            container: ContainerSpec {
                image: a.image.clone(),
                args: a.args.clone(),
                ..Default::default()
            },
            ..Default::default()
        },
        mode,
        update_config: UpdateConfig::default(),
        rollback_config: UpdateConfig::default(),
        endpoint_spec: EndpointSpec::default(),
    };
    if let ServiceMode::ReplicatedJob {
        max_concurrent,
        total_completions,
    } = &mut spec.mode
    {
        // Docker's default: max-concurrent = replicas.
        if let Some(r) = a.flags.replicas {
            *total_completions = r;
            *max_concurrent = r;
        }
    }
    apply_flags(&mut spec, &a.flags)?;
    let resp: serde_json::Value = client.post_json("/v1/services", &spec).await?;
    let id = resp["id"].as_str().unwrap_or_default().to_string();
    println!("{id}");
    if !a.flags.detach {
        converge(client, &id, a.flags.timeout, Goal::Change).await?;
    }
    Ok(())
}

async fn update(client: &Client, a: ServiceUpdateArgs) -> Result<(), CliError> {
    let current: Service = get(client, &format!("/v1/services/{}", enc(&a.service))).await?;
    let mut spec = current.spec.clone();
    if let Some(i) = &a.image {
        spec.task_template.container.image = i.clone();
    }
    let c = &mut spec.task_template.container;
    for k in &a.env_rm {
        c.env
            .retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()) && e != k);
    }
    for kv in &a.env_add {
        let key = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
        c.env
            .retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(key));
        c.env.push(kv.clone());
    }
    if let Some(args) = &a.args {
        c.args = args.clone();
    }
    apply_flags(&mut spec, &a.flags)?;
    if a.force {
        spec.task_template.force_update += 1;
    }
    let _: serde_json::Value = client
        .post_json(
            &format!(
                "/v1/services/{}/update?version={}",
                current.id, current.meta.version
            ),
            &spec,
        )
        .await?;
    if a.flags.replicas.is_none() || a.image.is_some() {
        println!("{}", current.spec.name);
    }
    if !a.flags.detach {
        converge(client, &current.id, a.flags.timeout, Goal::Change).await?;
    }
    Ok(())
}

async fn tasks_of(client: &Client, service: &str) -> Result<Vec<Task>, CliError> {
    get(client, &format!("/v1/tasks?service={}", enc(service))).await
}

/// What the command waiting in [`converge`] asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// A create, update or scale: a rollback of it means it failed.
    Change,
    /// `service rollback`: a completed rollback is what it asked for.
    Rollback,
}

/// A running task counts as up when it has no health check, or once healthy (as Swarm's
/// `starting` tasks, which it does not count until their first healthy probe). The health
/// agents report also covers an image's own health check, which the spec does not show.
fn is_up(t: &Task) -> bool {
    t.status.state == TaskState::Running
        && t.desired_state == TaskState::Running
        && match t.status.health {
            Some(h) => h == flotilla_types::Health::Healthy,
            None => t.spec.container.healthcheck.is_none(),
        }
}

/// The state shown for a task's slot: its health while running with a health check that has
/// not passed (`starting`, `unhealthy`).
fn slot_state(t: &Task) -> String {
    match t.status.health {
        Some(h) if t.status.state == TaskState::Running && h != flotilla_types::Health::Healthy => {
            h.to_string()
        }
        _ => t.status.state.to_string(),
    }
}

/// Shows progress until the service runs what its spec says, or fails with the reason.
/// Tasks with a health check count only once healthy; at the timeout, the latest failed
/// health check of the service's current tasks is part of the error.
pub async fn converge(
    client: &Client,
    service: &str,
    timeout: Duration,
    goal: Goal,
) -> Result<(), CliError> {
    let start = Instant::now();
    let mut last_line = String::new();
    let mut pending_since: Option<Instant> = None;
    loop {
        let s: Service = get(client, &format!("/v1/services/{}", enc(service))).await?;
        let tasks = tasks_of(client, &s.id).await?;
        let current: Vec<&Task> = tasks
            .iter()
            .filter(|t| t.spec_version == s.spec_version && t.desired_state <= TaskState::Complete)
            .collect();
        let status = s.service_status.unwrap_or_default();
        let is_job = matches!(
            s.spec.mode,
            ServiceMode::ReplicatedJob { .. } | ServiceMode::GlobalJob
        );
        let done_count = if is_job {
            status.completed_tasks
        } else {
            current.iter().filter(|t| is_up(t)).count() as u64
        };
        let mut slots: Vec<(u64, String, String)> = current
            .iter()
            .filter(|t| {
                t.desired_state == TaskState::Running || t.status.state == TaskState::Complete
            })
            .map(|t| {
                (
                    t.slot.unwrap_or(0),
                    t.node_id.clone().unwrap_or_default(),
                    slot_state(t),
                )
            })
            .collect();
        slots.sort();
        // Each slot while few; per-state counts for large services (like Docker past 20 tasks).
        let slots: Vec<String> = if slots.len() <= 20 {
            slots
                .iter()
                .map(|(slot, node, st)| {
                    if *slot > 0 {
                        format!("{slot}: {st}")
                    } else {
                        format!("{node}: {st}")
                    }
                })
                .collect()
        } else {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for (_, _, st) in &slots {
                *counts.entry(st.as_str()).or_default() += 1;
            }
            counts.iter().map(|(st, n)| format!("{n} {st}")).collect()
        };
        let line = format!(
            "overall progress: {done_count} out of {} tasks [{}]",
            status.desired_tasks,
            slots.join(", ")
        );
        if line != last_line {
            eprintln!("{}", escape(&line));
            last_line = line;
        }
        if let Some(u) = &s.update_status {
            match u.state {
                UpdateState::RollbackCompleted | UpdateState::RollbackPaused
                    if goal == Goal::Change =>
                {
                    return Err(CliError::new(format!(
                        "update rolled back: {}",
                        escape(&u.message)
                    )));
                }
                UpdateState::RollbackPaused => {
                    return Err(CliError::new(format!(
                        "rollback paused: {}",
                        escape(&u.message)
                    )));
                }
                UpdateState::Paused => {
                    return Err(CliError::new(format!(
                        "update paused: {}",
                        escape(&u.message)
                    )));
                }
                _ => {}
            }
        }
        let updating = matches!(
            s.update_status.as_ref().map(|u| u.state),
            Some(UpdateState::Updating) | Some(UpdateState::RollbackStarted)
        );
        let stale_running = tasks.iter().any(|t| {
            t.spec_version != s.spec_version
                && t.status.state == TaskState::Running
                && t.desired_state == TaskState::Running
        });
        if done_count >= status.desired_tasks && !updating && !stale_running {
            eprintln!("verify: service {} converged", escape(&s.spec.name));
            return Ok(());
        }
        // Tasks nobody can take: report the scheduler's reason.
        if let Some(t) = current.iter().find(|t| {
            t.status.state == TaskState::Pending && t.status.message.starts_with("no suitable node")
        }) {
            let since = *pending_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(3) {
                return Err(CliError::new(escape_lines(&t.status.message)));
            }
        } else {
            pending_since = None;
        }
        if let Some(t) = current
            .iter()
            .find(|t| t.status.state == TaskState::Rejected)
        {
            return Err(CliError::new(format!(
                "task {} rejected: {}",
                t.id,
                escape_lines(t.status.err.as_deref().unwrap_or(&t.status.message))
            )));
        }
        if start.elapsed() > timeout {
            // Why a task is not up, when a health check says so.
            let health = tasks
                .iter()
                .filter(|t| {
                    t.spec_version == s.spec_version
                        && t.status.message.contains("health check failed")
                })
                .max_by_key(|t| t.status.timestamp)
                .map(|t| {
                    format!(
                        "; task {} {}",
                        &t.id[..12.min(t.id.len())],
                        escape_lines(&t.status.message)
                    )
                })
                .unwrap_or_default();
            return Err(CliError::new(format!(
                "service {} did not converge within {}{health}: see `flotilla service ps {}`",
                escape(&s.spec.name),
                humantime::format_duration(timeout),
                escape(&s.spec.name)
            )));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn ls(client: &Client, format: Format) -> Result<(), CliError> {
    let services: Vec<Service> = get(client, "/v1/services").await?;
    if format == Format::Json {
        return print_json(&services);
    }
    let mut t = table(&["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]);
    for s in &services {
        let st = s.service_status.unwrap_or_default();
        // Docker's notation: `*:8080->80/tcp` for the routing mesh, `:8080->80/tcp` for host mode.
        let ports: Vec<String> = s
            .spec
            .endpoint_spec
            .ports
            .iter()
            .map(|p| {
                let star = match p.publish_mode {
                    PublishMode::Host => "",
                    PublishMode::Ingress => "*",
                };
                format!("{star}:{}->{}/{}", p.published, p.target, p.protocol)
            })
            .collect();
        add_row(
            &mut t,
            vec![
                s.id[..12.min(s.id.len())].to_string(),
                s.spec.name.clone(),
                s.spec.mode.name().to_string(),
                format!("{}/{}", st.running_tasks, st.desired_tasks),
                s.spec.task_template.container.image.clone(),
                ports.join(", "),
            ],
        );
    }
    print_table(&t);
    Ok(())
}

async fn ps(client: &Client, a: ServicePsArgs) -> Result<(), CliError> {
    let mut node_filter = None;
    let mut desired = None;
    for f in &a.filter {
        match f.split_once('=') {
            Some(("node", v)) => node_filter = Some(v.to_string()),
            Some(("desired-state", v)) => desired = Some(v.to_string()),
            _ => {
                return Err(CliError::usage(format!(
                    "--filter {f:?}: use node=NAME or desired-state=running|shutdown|…"
                )))
            }
        }
    }
    let nodes: Vec<flotilla_types::Node> = get(client, "/v1/nodes").await?;
    let mut all = Vec::new();
    for svc in &a.services {
        let s: Service = get(client, &format!("/v1/services/{}", enc(svc))).await?;
        let mut q = format!("/v1/tasks?service={}", enc(&s.id));
        if let Some(n) = &node_filter {
            q.push_str(&format!("&node={}", enc(n)));
        }
        if let Some(d) = &desired {
            q.push_str(&format!("&desired-state={}", enc(d)));
        }
        let tasks: Vec<Task> = get(client, &q).await?;
        all.push((s, tasks));
    }
    if a.format == Format::Json {
        let flat: Vec<&Task> = all.iter().flat_map(|(_, t)| t.iter()).collect();
        return print_json(&flat);
    }
    if a.quiet {
        for (_, tasks) in &all {
            for t in tasks {
                println!("{}", escape(&t.id));
            }
        }
        return Ok(());
    }
    print_table(&ps_table(&all, &nodes));
    Ok(())
}

/// `service ps` as printed: task messages and errors, health and node names come from nodes
/// and are escaped.
pub(crate) fn ps_table(
    all: &[(Service, Vec<Task>)],
    nodes: &[flotilla_types::Node],
) -> comfy_table::Table {
    let node_name = |id: &Option<String>| {
        id.as_ref()
            .and_then(|id| nodes.iter().find(|n| &n.id == id))
            .map(|n| n.spec.name.clone())
            .unwrap_or_default()
    };
    let mut t = table(&[
        "ID",
        "NAME",
        "IMAGE",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE",
        "ERROR",
    ]);
    for (s, tasks) in all {
        for task in tasks {
            let name = match task.slot {
                Some(slot) => format!("{}.{slot}", s.spec.name),
                None => format!(
                    "{}.{}",
                    s.spec.name,
                    task.node_id.clone().unwrap_or_default()
                ),
            };
            let mut current = format!("{} {}", task.status.state, ago(task.status.timestamp));
            if let Some(h) = &task.status.health {
                current.push_str(&format!(" ({h})"));
            }
            let err = task
                .status
                .err
                .clone()
                .or_else(|| {
                    (task.status.state == TaskState::Pending).then(|| task.status.message.clone())
                })
                .unwrap_or_default();
            add_row(
                &mut t,
                vec![
                    task.id.chars().take(12).collect::<String>(),
                    name,
                    task.spec
                        .container
                        .image
                        .split('@')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    node_name(&task.node_id),
                    task.desired_state.to_string(),
                    current,
                    err,
                ],
            );
        }
    }
    t
}

/// Applies `--publish`, `--publish-rm` and `--endpoint-mode`.
fn apply_endpoint_flags(e: &mut EndpointSpec, f: &SpecFlags) -> Result<(), CliError> {
    if let Some(m) = &f.endpoint_mode {
        e.mode = if m == "dnsrr" {
            EndpointMode::Dnsrr
        } else {
            EndpointMode::Vip
        };
    }
    for rm in &f.publish_rm {
        let (port, proto) = match rm.split_once('/') {
            Some((p, proto)) => (p, Some(proto)),
            None => (rm.as_str(), None),
        };
        let port: u16 = port.parse().map_err(|_| {
            CliError::usage(format!(
                "--publish-rm {rm:?}: give the published port, e.g. 8080 or 5353/udp"
            ))
        })?;
        let proto: Protocol = match proto {
            Some(p) => p
                .parse()
                .map_err(|e| CliError::usage(format!("--publish-rm {rm:?}: {e}")))?,
            None => Protocol::Tcp,
        };
        let before = e.ports.len();
        e.ports
            .retain(|p| !(p.published == port && p.protocol == proto));
        if e.ports.len() == before {
            return Err(CliError::usage(format!(
                "--publish-rm {rm}: the service does not publish {port}/{proto}"
            )));
        }
    }
    for p in &f.publish {
        let pc = parse_publish(p)?;
        e.ports
            .retain(|x| !(x.published == pc.published && x.protocol == pc.protocol));
        e.ports.push(pc);
    }
    let mut seen = std::collections::HashSet::new();
    for p in &e.ports {
        if !seen.insert((p.published, p.protocol)) {
            return Err(CliError::usage(format!(
                "port {}/{} is published twice",
                p.published, p.protocol
            )));
        }
    }
    Ok(())
}

/// Parses `--publish`: `PUBLISHED:TARGET[/PROTO]` or the long `key=value,…` form.
pub fn parse_publish(s: &str) -> Result<PortConfig, CliError> {
    let bad = |why: &str| {
        CliError::usage(format!(
            "--publish {s:?}: {why}; use PUBLISHED:TARGET[/tcp|/udp] or published=P,target=T[,protocol=tcp|udp][,mode=ingress|host][,proxy-protocol=v1|v2]"
        ))
    };
    let port = |v: &str, what: &str| -> Result<u16, CliError> {
        match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad(&format!("{what} {v:?} is not a port (1-65535)"))),
        }
    };
    let mut pc = PortConfig {
        published: 0,
        target: 0,
        protocol: Protocol::Tcp,
        publish_mode: PublishMode::Ingress,
        proxy_protocol: None,
    };
    if s.contains('=') {
        for kv in s.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(&format!("{kv:?} is not key=value")))?;
            match k.trim() {
                "published" => pc.published = port(v, "published")?,
                "target" => pc.target = port(v, "target")?,
                "protocol" => pc.protocol = v.trim().parse().map_err(|e: String| bad(&e))?,
                "mode" => pc.publish_mode = v.trim().parse().map_err(|e: String| bad(&e))?,
                "proxy-protocol" | "proxy_protocol" => {
                    pc.proxy_protocol = Some(v.trim().to_string())
                }
                other => return Err(bad(&format!("unknown key {other:?}"))),
            }
        }
    } else {
        let (ports, proto) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let (p, t) = ports
            .split_once(':')
            .ok_or_else(|| bad("give both the published and the target port"))?;
        pc.published = port(p, "published")?;
        pc.target = port(t, "target")?;
        if let Some(proto) = proto {
            pc.protocol = proto.parse().map_err(|e: String| bad(&e))?;
        }
    }
    if pc.published == 0 || pc.target == 0 {
        return Err(bad("both published and target are required"));
    }
    match pc.proxy_protocol.as_deref() {
        None | Some("v1") | Some("v2") => {}
        Some(o) => return Err(bad(&format!("proxy-protocol {o:?} is not v1 or v2"))),
    }
    if pc.proxy_protocol.is_some() && pc.protocol != Protocol::Tcp {
        return Err(bad("the PROXY protocol only applies to tcp"));
    }
    Ok(pc)
}

/// Parses `--health-http PATH[:PORT]`.
fn parse_health_http(s: &str, default_port: u16) -> Result<HealthProbe, CliError> {
    let bad = || {
        CliError::usage(format!(
            "--health-http {s:?}: use PATH[:PORT], e.g. /healthz or /healthz:8080"
        ))
    };
    if !s.starts_with('/') {
        return Err(bad());
    }
    let (path, port) = match s.rsplit_once(':') {
        Some((p, port)) => (
            p,
            port.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(bad)?,
        ),
        None => (s, default_port),
    };
    Ok(HealthProbe::Http {
        path: path.to_string(),
        port,
    })
}

#[cfg(test)]
mod publish_tests {
    use super::*;

    #[test]
    fn short_and_long_publish_forms() {
        let p = parse_publish("8080:80").expect("short");
        assert_eq!(
            (p.published, p.target, p.protocol, p.publish_mode),
            (8080, 80, Protocol::Tcp, PublishMode::Ingress)
        );
        let p = parse_publish("53:5353/udp").expect("udp");
        assert_eq!(p.protocol, Protocol::Udp);
        let p = parse_publish("published=53,target=5353,protocol=udp").expect("long udp");
        assert_eq!(p.protocol, Protocol::Udp);
        let p =
            parse_publish("published=9000,target=90,mode=host,proxy-protocol=v2").expect("long");
        assert_eq!(p.publish_mode, PublishMode::Host);
        assert_eq!(p.proxy_protocol.as_deref(), Some("v2"));
        for bad in [
            "80",
            "0:80",
            "8080:http",
            "8080:80/sctp",
            "published=1",
            "mode=x,published=1,target=2",
            "published=1,target=2,protocol=udp,proxy-protocol=v1",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad} must be rejected");
        }
        for (bad, why) in [
            ("8080:80/sctp", "unknown protocol \"sctp\": use tcp or udp"),
            ("published=1,target=2,protocol=SCTP", "use tcp or udp"),
            ("published=1,target=2,mode=x", "use ingress or host"),
        ] {
            let e = parse_publish(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn health_http_forms() {
        assert_eq!(
            parse_health_http("/healthz", 8080).expect("default port"),
            HealthProbe::Http {
                path: "/healthz".into(),
                port: 8080
            }
        );
        assert_eq!(
            parse_health_http("/h:81", 8080).expect("port"),
            HealthProbe::Http {
                path: "/h".into(),
                port: 81
            }
        );
        assert!(parse_health_http("h", 80).is_err());
        assert!(parse_health_http("/h:x", 80).is_err());
    }
}

#[cfg(test)]
mod escape_tests {
    use super::*;
    use crate::output::render_table;

    const PWNED: &str = "\u{1b}]0;pwned\u{7}";

    #[test]
    fn service_ps_escapes_what_nodes_reported() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "id": "s1", "version": 1,
            "spec": {
                "name": "web",
                "task_template": {"container": {"image": "busybox:1"}},
                "mode": {"replicated": {"replicas": 1}}
            }
        }))
        .expect("service");
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "t0123456789abcdef", "version": 1, "service_id": "s1", "slot": 1,
            "node_id": "n1", "spec": {"container": {"image": "busybox:1"}},
            "desired_state": "running",
            "status": {
                "state": "failed", "timestamp": 1, "message": PWNED,
                "err": format!("exit 1 {PWNED}"), "health": format!("un{PWNED}")
            }
        }))
        .expect("task");
        let node: flotilla_types::Node = serde_json::from_value(serde_json::json!({
            "id": "n1", "version": 1,
            "spec": {"name": format!("w{PWNED}"), "role": "worker", "availability": "active"},
            "description": {"hostname": "h", "os": "linux", "arch": "x86_64", "resources": {}},
            "status": {"state": "ready", "addr": "127.0.0.2:4440"}
        }))
        .expect("node");
        let out = render_table(&ps_table(&[(service, vec![task])], &[node]));
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(out.contains("exit 1 \\x1b]0;pwned\\x07"), "{out}");
        assert!(out.contains("w\\x1b]0;pwned\\x07"), "{out}");
        // A health value no agent sends is dropped when the task is decoded.
        assert!(!out.contains("pwned\\x07)"), "{out}");
    }
}

/// `--stop-signal`, `--entrypoint`, `--hostname`, `--init`, `--tty`, `--shm-size`.
fn apply_process_flags(
    f: &SpecFlags,
    c: &mut flotilla_types::ContainerSpec,
) -> Result<(), CliError> {
    if let Some(sig) = &f.stop_signal {
        flotilla_types::parse_signal(sig)
            .map_err(|e| CliError::usage(format!("--stop-signal: {e}")))?;
        c.stop_signal = Some(sig.clone());
    }
    if let Some(ep) = &f.entrypoint {
        // Split like a shell would, as Swarm's CLI does; `--entrypoint ""` clears the image's
        // entrypoint.
        c.command = Some(shlex::split(ep).ok_or_else(|| {
            CliError::usage(format!(
                "--entrypoint {ep:?}: unbalanced quotes or a trailing backslash"
            ))
        })?);
    }
    if let Some(h) = &f.hostname {
        c.hostname = Some(h.clone());
    }
    if let Some(i) = f.init {
        c.init = i;
    }
    if let Some(t) = f.tty {
        c.tty = t;
    }
    if !f.dns.is_empty() {
        c.dns_servers = if f.dns == ["none"] {
            Vec::new()
        } else {
            for d in &f.dns {
                flotilla_types::parse_dns_server(d).map_err(CliError::usage)?;
            }
            f.dns.clone()
        };
    }
    if !f.dns_search.is_empty() {
        c.dns_search = f.dns_search.clone();
    }
    if !f.dns_option.is_empty() {
        c.dns_options = f.dns_option.clone();
    }
    if let Some(s) = &f.shm_size {
        c.shm_size = Some(parse_bytes(s)?);
    }
    apply_storage_flags(f, c)
}

/// `--mount[-add]`/`--mount-rm`, `--secret[-add]`/`--secret-rm`, `--config[-add]`/`--config-rm`:
/// an added entry replaces the one at the same target (mounts) or with the same name.
fn apply_storage_flags(
    f: &SpecFlags,
    c: &mut flotilla_types::ContainerSpec,
) -> Result<(), CliError> {
    use flotilla_types::{parse_file_reference, parse_mount, FileKind};
    let norm = |t: &str| t.trim_end_matches('/').to_string();
    for t in &f.mount_rm {
        let before = c.mounts.len();
        c.mounts.retain(|m| norm(&m.target) != norm(t));
        if c.mounts.len() == before {
            return Err(CliError::usage(format!(
                "--mount-rm {t}: the service mounts nothing there"
            )));
        }
    }
    for s in &f.mount {
        let m = parse_mount(s).map_err(|e| CliError::usage(format!("--mount {s:?}: {e}")))?;
        c.mounts.retain(|x| norm(&x.target) != norm(&m.target));
        c.mounts.push(m);
    }
    for (kind, rm, add, list) in [
        (FileKind::Secret, &f.secret_rm, &f.secret, &mut c.secrets),
        (FileKind::Config, &f.config_rm, &f.config, &mut c.configs),
    ] {
        for n in rm {
            let before = list.len();
            list.retain(|r| &r.source != n);
            if list.len() == before {
                return Err(CliError::usage(format!(
                    "--{}-rm {n}: the service has no {} of that name",
                    kind.as_str(),
                    kind.as_str()
                )));
            }
        }
        for s in add {
            let r = parse_file_reference(s, kind)
                .map_err(|e| CliError::usage(format!("--{} {s:?}: {e}", kind.as_str())))?;
            list.retain(|x| x.target_path(kind) != r.target_path(kind));
            list.push(r);
        }
    }
    Ok(())
}

#[cfg(test)]
mod process_flag_tests {
    use super::*;
    use crate::args::{Cli, Command, ServiceCmd};
    use clap::Parser;

    /// The container spec `service create … FLAGS img` would send, or the CLI's error.
    fn create(flags: &[&str]) -> Result<flotilla_types::ContainerSpec, String> {
        let mut argv = vec!["flotilla", "service", "create", "--name", "x"];
        argv.extend_from_slice(flags);
        argv.push("img");
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Service(cmd) = cli.command else {
            return Err("not a service command".into());
        };
        let ServiceCmd::Create(a) = *cmd else {
            return Err("not create".into());
        };
        let mut c = flotilla_types::ContainerSpec::default();
        apply_process_flags(&a.flags, &mut c).map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn process_flags_reach_the_spec() {
        let c = create(&[
            "--entrypoint",
            "sh -c 'echo a b'",
            "--stop-signal",
            "SIGQUIT",
            "--hostname",
            "db-1",
            "--init",
            "-t",
            "--shm-size",
            "128m",
        ])
        .expect("flags");
        assert_eq!(
            c.command,
            Some(vec!["sh".into(), "-c".into(), "echo a b".into()])
        );
        assert_eq!(c.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(c.hostname.as_deref(), Some("db-1"));
        assert!(c.init && c.tty);
        assert_eq!(c.shm_size, Some(128 << 20));
        assert_eq!(
            create(&["--entrypoint", ""]).expect("clear").command,
            Some(vec![])
        );
        let off = create(&["--init=false", "--tty=false"]).expect("off");
        assert!(!off.init && !off.tty);
    }

    #[test]
    fn bad_process_flags_say_what_is_wrong() {
        for (flags, says) in [
            (&["--entrypoint", "sh -c 'unclosed"][..], "unbalanced"),
            (&["--entrypoint", "trailing\\"][..], "unbalanced"),
            (&["--stop-signal", "SIGNOPE"][..], "SIGTERM"),
            (&["--shm-size", "lots"][..], "size"),
            (&["--init=maybe"][..], "maybe"),
        ] {
            let e = create(flags).expect_err(&format!("{flags:?}"));
            assert!(e.contains(says), "{flags:?}: {e}");
        }
    }
}
