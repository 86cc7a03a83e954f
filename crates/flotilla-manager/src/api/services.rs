//! Services and tasks: `flotilla service create|ls|inspect|update|scale|rollback|rm|ps`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use flotilla_store::{Batch, Op, Table};
use flotilla_types::{
    Meta, Node, Protocol, PublishMode, Service, ServiceMode, ServiceSpec, ServiceStatus, Task,
    TaskState, UpdateState, UpdateStatus,
};

use super::{json_ok, Ctx, VersionQuery};
use crate::error::ManagerError;
use crate::manager::{encode, Manager};
use flotilla_types::now_ms;

/// The most replicas (or job completions, or concurrent job tasks) one service may ask for.
/// Each orchestrator pass walks every slot, and a create or scale writes all the tasks it needs
/// at once, so an unbounded count (a typo such as 100000000) would take all of the leader's
/// memory (gigabytes within seconds, faster than `service rm` can stop it), and again after
/// each restart, since the spec is stored. Swarm has no bound; no cluster Flotilla is built for
/// runs more tasks of one service (the scheduler is benchmarked with 1,000,000 tasks over 100
/// services).
pub const MAX_REPLICAS: u64 = 100_000;

/// Checks a spec before it is stored; the messages say what to fix.
pub fn validate_spec(spec: &ServiceSpec) -> Result<(), ManagerError> {
    flotilla_types::validate_name(&spec.name)
        .map_err(|e| ManagerError::bad_request(format!("service name: {e}")))?;
    let c = &spec.task_template.container;
    validate_image_and_env(c)?;
    validate_process(c)?;
    flotilla_control::parse_constraints(&spec.task_template.placement.constraints)
        .map_err(|e| ManagerError::bad_request(format!("--constraint: {e}")))?;
    flotilla_control::parse_preferences(&spec.task_template.placement.preferences)
        .map_err(|e| ManagerError::bad_request(format!("--placement-pref: {e}")))?;
    validate_mode(&spec.mode)?;
    validate_storage(spec)?;
    if let Some(h) = &c.healthcheck {
        if h.interval == 0 || h.timeout == 0 {
            return Err(ManagerError::bad_request(
                "health check interval and timeout must be positive",
            ));
        }
    }
    let u = &spec.update_config;
    if !(0.0..=1.0).contains(&u.max_failure_ratio) {
        return Err(ManagerError::bad_request(
            "--update-max-failure-ratio must be between 0 and 1",
        ));
    }
    validate_ports(&spec.endpoint_spec.ports)
}

/// Mounts, secrets and configs: each well formed, no two at one target, and no volume that two
/// tasks would need at once (a volume is mounted by one running task at a time unless it is
/// declared `shared`).
fn validate_storage(spec: &ServiceSpec) -> Result<(), ManagerError> {
    use flotilla_types::{FileKind, MountKind, UpdateOrder};
    let c = &spec.task_template.container;
    let bad = |e: String| ManagerError::bad_request(e);
    let mut targets = std::collections::HashSet::new();
    let mut seen = |t: String| -> Result<(), ManagerError> {
        let norm = t.trim_end_matches('/').to_string();
        if !targets.insert(norm) {
            return Err(ManagerError::bad_request(format!(
                "two mounts, secrets or configs target {t}: give each its own path"
            )));
        }
        Ok(())
    };
    let global = matches!(spec.mode, ServiceMode::Global | ServiceMode::GlobalJob);
    let many = match spec.mode {
        ServiceMode::Replicated { replicas } => replicas > 1,
        ServiceMode::ReplicatedJob { max_concurrent, .. } => max_concurrent > 1,
        ServiceMode::Global | ServiceMode::GlobalJob => false,
    };
    for m in &c.mounts {
        m.validate().map_err(|e| bad(format!("--mount: {e}")))?;
        seen(m.target.clone())?;
        if m.kind != MountKind::Volume || m.source.is_empty() {
            continue;
        }
        if global && m.source.contains("{{.Task.Slot}}") {
            return Err(bad(format!(
                "--mount src={}: tasks of a global service have no slot; use {{{{.Node.ID}}}}",
                m.source
            )));
        }
        if !global && m.source.contains("{{.Node.ID}}") {
            return Err(bad(format!(
                "--mount src={}: a replicated task's node is not known when it is made; use {{{{.Task.Slot}}}}",
                m.source
            )));
        }
        if m.shared {
            continue;
        }
        let per_task = ["{{.Task.Slot}}", "{{.Task.ID}}", "{{.Node.ID}}"]
            .iter()
            .any(|t| m.source.contains(t));
        if many && !per_task {
            return Err(bad(format!(
                "--mount src={}: every replica would mount the same volume, and a volume is                  mounted by one running task at a time; use src={}-{{{{.Task.Slot}}}} for one                  volume per replica, or add `shared`",
                m.source, m.source
            )));
        }
        if spec.update_config.order == UpdateOrder::StartFirst
            || spec.rollback_config.order == UpdateOrder::StartFirst
        {
            return Err(bad(format!(
                "--mount src={}: a start-first update would run two tasks on one volume; use                  --update-order stop-first, or add `shared` to the mount",
                m.source
            )));
        }
    }
    for (kind, refs) in [
        (FileKind::Secret, &c.secrets),
        (FileKind::Config, &c.configs),
    ] {
        for r in refs {
            r.validate(kind)
                .map_err(|e| bad(format!("--{}: {e}", kind.as_str())))?;
            seen(r.target_path(kind))?;
        }
    }
    Ok(())
}

/// An image is named, and every environment entry is `KEY=VALUE`.
fn validate_image_and_env(c: &flotilla_types::ContainerSpec) -> Result<(), ManagerError> {
    if c.image.trim().is_empty() {
        return Err(ManagerError::bad_request("an image is required"));
    }
    for e in &c.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(ManagerError::bad_request(format!(
                "--env {e:?}: expected KEY=VALUE"
            )));
        }
    }
    Ok(())
}

/// glibc reads at most 6 search domains (256 characters) and a handful of options.
const MAX_DNS_SEARCH: usize = 6;
const MAX_DNS_OPTIONS: usize = 16;

/// A DNS name: dot-separated labels of letters, digits and '-', at most 253 characters.
fn is_dns_name(h: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    h.len() <= 253 && h.split('.').all(label_ok)
}

/// `--dns-search` and `--dns-option` values are ones resolv.conf takes on one line.
fn validate_resolver(c: &flotilla_types::ContainerSpec) -> Result<(), ManagerError> {
    if c.dns_servers.len() > 3 {
        return Err(ManagerError::bad_request(
            "--dns: at most 3 resolvers (as resolv.conf)",
        ));
    }
    for d in &c.dns_servers {
        flotilla_types::parse_dns_server(d).map_err(ManagerError::bad_request)?;
    }
    if c.dns_search.len() > MAX_DNS_SEARCH
        || c.dns_search.iter().map(String::len).sum::<usize>() > 256
    {
        return Err(ManagerError::bad_request(format!(
            "--dns-search: at most {MAX_DNS_SEARCH} domains of 256 characters in all"
        )));
    }
    if let Some(d) = c.dns_search.iter().find(|d| !is_dns_name(d)) {
        return Err(ManagerError::bad_request(format!(
            "--dns-search {d:?}: give a domain such as corp.example"
        )));
    }
    if c.dns_options.len() > MAX_DNS_OPTIONS {
        return Err(ManagerError::bad_request(format!(
            "--dns-option: at most {MAX_DNS_OPTIONS} options"
        )));
    }
    let option_ok = |o: &str| {
        let (name, value) = o.split_once(':').unwrap_or((o, "0"));
        !name.is_empty()
            && o.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !value.is_empty()
            && value.bytes().all(|b| b.is_ascii_digit())
    };
    if let Some(o) = c.dns_options.iter().find(|o| !option_ok(o)) {
        return Err(ManagerError::bad_request(format!(
            "--dns-option {o:?}: give an option such as ndots:2, timeout:1 or edns0"
        )));
    }
    Ok(())
}

/// Largest `/dev/shm` a task may ask for (it is memory of the node).
const MAX_SHM: u64 = 64 << 30;

/// Stop signal, hostname and `/dev/shm` size are ones a container can have.
fn validate_process(c: &flotilla_types::ContainerSpec) -> Result<(), ManagerError> {
    if let Some(sig) = &c.stop_signal {
        flotilla_types::parse_signal(sig)
            .map_err(|e| ManagerError::bad_request(format!("--stop-signal: {e}")))?;
    }
    if let Some(h) = &c.hostname {
        if !is_dns_name(h) {
            return Err(ManagerError::bad_request(format!(
                "--hostname {h:?}: use letters, digits and '-' in dot-separated labels of at most \
                 63 characters (253 in all)"
            )));
        }
    }
    validate_resolver(c)?;
    if let Some(s) = c.shm_size {
        if s == 0 || s > MAX_SHM {
            return Err(ManagerError::bad_request(format!(
                "--shm-size {s}: must be above 0 and at most 64 GiB"
            )));
        }
    }
    Ok(())
}

/// A job runs at least one task, and no count exceeds [`MAX_REPLICAS`].
fn validate_mode(mode: &ServiceMode) -> Result<(), ManagerError> {
    let counts = match *mode {
        ServiceMode::ReplicatedJob {
            max_concurrent,
            total_completions,
        } if max_concurrent == 0 || total_completions == 0 => {
            return Err(ManagerError::bad_request(
                "a replicated job needs --replicas ≥ 1 and --max-concurrent ≥ 1",
            ))
        }
        ServiceMode::Replicated { replicas } => vec![("--replicas", replicas)],
        ServiceMode::ReplicatedJob {
            max_concurrent,
            total_completions,
        } => vec![
            ("--replicas", total_completions),
            ("--max-concurrent", max_concurrent),
        ],
        ServiceMode::Global | ServiceMode::GlobalJob => vec![],
    };
    for (flag, n) in counts {
        if n > MAX_REPLICAS {
            return Err(ManagerError::bad_request(format!(
                "{flag} {n} is more than one service may have ({MAX_REPLICAS}): \
                 split the work over several services"
            )));
        }
    }
    Ok(())
}

/// Ports are non-zero, a PROXY protocol is v1 or v2 on tcp, and no port is published twice.
fn validate_ports(ports: &[flotilla_types::PortConfig]) -> Result<(), ManagerError> {
    let mut published = std::collections::HashSet::new();
    for p in ports {
        if p.published == 0 || p.target == 0 {
            return Err(ManagerError::bad_request(
                "published and target ports must be 1..65535",
            ));
        }
        // The protocol and publish mode are enums: unknown values fail at JSON decoding.
        match p.proxy_protocol.as_deref() {
            None => {}
            Some("v1") | Some("v2") if p.protocol == Protocol::Tcp => {}
            Some(o) => {
                return Err(ManagerError::bad_request(format!(
                    "port {}: proxy protocol {o:?} must be v1 or v2, on tcp only",
                    p.published
                )))
            }
        }
        if !published.insert((p.published, p.protocol)) {
            return Err(ManagerError::bad_request(format!(
                "port {}/{} is published twice",
                p.published, p.protocol
            )));
        }
    }
    Ok(())
}

/// A published ingress port belongs to one service cluster-wide (the routing mesh listens on
/// it on every node); host-mode ports may repeat (the scheduler spreads them).
fn check_port_conflicts(
    all: &[Service],
    spec: &ServiceSpec,
    self_id: Option<&str>,
) -> Result<(), ManagerError> {
    for p in &spec.endpoint_spec.ports {
        for o in all {
            if Some(o.id.as_str()) == self_id {
                continue;
            }
            if o.spec.endpoint_spec.ports.iter().any(|q| {
                q.published == p.published
                    && q.protocol == p.protocol
                    && (q.publish_mode == PublishMode::Ingress
                        || p.publish_mode == PublishMode::Ingress)
            }) {
                return Err(ManagerError::conflict(format!(
                    "port {}/{} is already published by service {:?}: pick another published port or `flotilla service update --publish-rm {}` that service",
                    p.published, p.protocol, o.spec.name, p.published
                )));
            }
        }
    }
    Ok(())
}

/// Pins `image` to a manifest digest (`name:tag@sha256:…`) using this manager's image store.
/// The image may have been pushed or imported through another manager (this one, the
/// leader, then resolves the tag on its peers).
async fn pin_image(ctx: &Ctx, spec: &mut ServiceSpec) -> Result<(), ManagerError> {
    let image = spec.task_template.container.image.clone();
    if image.contains("@sha256:") {
        return Ok(());
    }
    let local = ctx.images.resolve(&image).ok();
    let digest = match local {
        Some(d) => Some(d),
        None => match flotilla_registry::ImageRef::parse(&image) {
            Ok(r) => {
                let tag = r.tag.unwrap_or_else(|| "latest".into());
                let peers = super::PeerManagers::new(ctx);
                flotilla_registry::BlobSource::resolve_tag(&peers, &r.name, &tag)
                    .await
                    .ok()
                    .flatten()
            }
            Err(_) => None,
        },
    };
    let digest = digest.ok_or_else(|| {
        ManagerError::bad_request(format!(
            "image {image:?} is not in the cluster: load it first with `flotilla image load FILE` or `flotilla image import DIR --name {image}`"
        ))
    })?;
    spec.task_template.container.image = format!("{image}@{digest}");
    Ok(())
}

fn find_service(mgr: &Manager, key: &str) -> Result<Service, ManagerError> {
    if let Some(s) = mgr.get::<Service>(key)? {
        return Ok(s);
    }
    let all: Vec<Service> = mgr.list()?;
    if let Some(s) = all.iter().find(|s| s.spec.name == key) {
        return Ok(s.clone());
    }
    let by_prefix: Vec<&Service> = all.iter().filter(|s| s.id.starts_with(key)).collect();
    match by_prefix.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ManagerError::not_found(format!(
            "service {key} not found: see `flotilla service ls`"
        ))),
        _ => Err(ManagerError::conflict(format!(
            "service prefix {key:?} is ambiguous: give more characters"
        ))),
    }
}

/// [`find_service`] on the blocking pool.
async fn find_blocking(mgr: &Ctx, key: String) -> Result<Service, ManagerError> {
    mgr.blocking(move |m| find_service(m, &key)).await
}

fn nodes_by_id(mgr: &Manager) -> Result<HashMap<String, Node>, ManagerError> {
    Ok(mgr
        .list::<Node>()?
        .into_iter()
        .map(|n| (n.id.clone(), n))
        .collect())
}

fn status_of(service: &Service, tasks: &[&Task], nodes: &HashMap<String, Node>) -> ServiceStatus {
    // Running replicas: as Swarm, a task with a health check counts once healthy.
    let running = tasks
        .iter()
        .filter(|t| t.desired_state == TaskState::Running && super::network::is_up(t))
        .count() as u64;
    let completed = tasks
        .iter()
        .filter(|t| t.status.state == TaskState::Complete)
        .count() as u64;
    let desired = match service.spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::ReplicatedJob {
            total_completions, ..
        } => total_completions,
        ServiceMode::Global | ServiceMode::GlobalJob => nodes
            .values()
            .filter(|n| {
                n.status.state == flotilla_types::NodeState::Ready
                    && n.spec.availability == flotilla_types::Availability::Active
            })
            .count() as u64,
    };
    let pending = tasks
        .iter()
        .filter(|t| t.status.state == TaskState::Pending)
        .count() as u64;
    ServiceStatus {
        running_tasks: running,
        desired_tasks: desired,
        completed_tasks: completed,
        pending_tasks: pending,
    }
}

pub async fn create(
    State(ctx): State<Ctx>,
    Json(mut spec): Json<ServiceSpec>,
) -> Result<Response, ManagerError> {
    validate_spec(&spec)?;
    let mgr = &ctx;
    let _names = mgr.names.lock().await;
    let existing: Vec<Service> = mgr.list_blocking().await?;
    if existing.iter().any(|s| s.spec.name == spec.name) {
        return Err(ManagerError::conflict(format!(
            "a service named {:?} already exists: pick another name or `flotilla service update` it",
            spec.name
        )));
    }
    check_port_conflicts(&existing, &spec, None)?;
    let spec = ctx
        .blocking(move |m| {
            super::storage::resolve_refs(m, &mut spec)?;
            super::networks::check_attachments(m, &spec)?;
            Ok(spec)
        })
        .await?;
    let mut spec = spec;
    pin_image(&ctx, &mut spec).await?;
    let now = now_ms();
    let service = Service {
        id: flotilla_types::new_id(),
        meta: Meta {
            version: 0,
            created_at: now,
            updated_at: now,
        },
        spec,
        previous_spec: None,
        spec_version: 1,
        update_status: None,
        job_iteration: 0,
        vip: None,
        service_status: None,
        network_vips: Default::default(),
    };
    let rev = mgr
        .write(
            Batch::single(Op::create(Table::Services, &service.id, encode(&service)?)),
            "service",
        )
        .await?;
    mgr.kick();
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "id": service.id,
            "version": rev,
            "image": service.spec.task_template.container.image,
        })),
    )
        .into_response())
}

pub async fn list(State(ctx): State<Ctx>) -> Result<Response, ManagerError> {
    Ok(json_ok(&ctx.blocking(with_status).await?))
}

/// Every service with its task counts, by name.
fn with_status(mgr: &Manager) -> Result<Vec<Service>, ManagerError> {
    let services: Vec<Service> = mgr.list()?;
    let tasks: Vec<Task> = mgr.list()?;
    let nodes = nodes_by_id(mgr)?;
    let mut by_service: HashMap<&str, Vec<&Task>> = HashMap::new();
    for t in &tasks {
        by_service.entry(t.service_id.as_str()).or_default().push(t);
    }
    let mut out: Vec<Service> = services
        .into_iter()
        .map(|mut s| {
            let ts = by_service.get(s.id.as_str()).cloned().unwrap_or_default();
            s.service_status = Some(status_of(&s, &ts, &nodes));
            s
        })
        .collect();
    out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    Ok(out)
}

pub async fn inspect(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
) -> Result<Response, ManagerError> {
    Ok(json_ok(&ctx.blocking(move |m| inspected(m, &key)).await?))
}

/// The service `key` names, with its task counts.
fn inspected(mgr: &Manager, key: &str) -> Result<Service, ManagerError> {
    let mut s = find_service(mgr, key)?;
    let tasks: Vec<Task> = mgr.list()?;
    let nodes = nodes_by_id(mgr)?;
    let mine: Vec<&Task> = tasks.iter().filter(|t| t.service_id == s.id).collect();
    s.service_status = Some(status_of(&s, &mine, &nodes));
    Ok(s)
}

/// Replaces the spec. A change of the task template starts a rolling update; a change of the
/// replica count alone just scales.
pub async fn update(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
    Query(q): Query<VersionQuery>,
    Json(mut spec): Json<ServiceSpec>,
) -> Result<Response, ManagerError> {
    validate_spec(&spec)?;
    let mgr = &ctx;
    let _names = mgr.names.lock().await;
    let (mut s, all) = ctx
        .blocking(move |m| Ok((find_service(m, &key)?, m.list::<Service>()?)))
        .await?;
    check_port_conflicts(&all, &spec, Some(&s.id))?;
    if spec.name != s.spec.name && all.iter().any(|o| o.spec.name == spec.name && o.id != s.id) {
        return Err(ManagerError::conflict(format!(
            "a service named {:?} already exists",
            spec.name
        )));
    }
    if std::mem::discriminant(&spec.mode) != std::mem::discriminant(&s.spec.mode) {
        return Err(ManagerError::bad_request(format!(
            "the mode of a service cannot change (it is {}): remove and recreate it",
            s.spec.mode.name()
        )));
    }
    let mut spec = ctx
        .blocking(move |m| {
            super::storage::resolve_refs(m, &mut spec)?;
            super::networks::check_attachments(m, &spec)?;
            Ok(spec)
        })
        .await?;
    pin_image(&ctx, &mut spec).await?;
    let expect = q.version.unwrap_or(s.meta.version);
    let template_changed = spec.task_template != s.spec.task_template;
    if template_changed {
        s.spec_version += 1;
        s.update_status = Some(UpdateStatus {
            state: UpdateState::Updating,
            started_at: now_ms(),
            completed_at: None,
            message: "update in progress".into(),
        });
    }
    // As in Swarm, every change (a scale too) keeps the spec it replaces, so `service
    // rollback` undoes the last change, whatever it was. An update that changes nothing keeps
    // the previous spec there was.
    if spec != s.spec {
        s.previous_spec = Some(s.spec.clone());
    }
    s.spec = spec;
    s.meta.updated_at = now_ms();
    s.service_status = None;
    let id = s.id.clone();
    let rev = mgr
        .write(
            Batch::single(Manager::put_op(&s, &id, Some(expect))?),
            "service",
        )
        .await?;
    mgr.kick();
    Ok(json_ok(&serde_json::json!({
        "id": id,
        "version": rev,
        "spec_version": s.spec_version,
        "rolling_update": template_changed,
    })))
}

/// Returns to the previous spec (`flotilla service rollback`).
pub async fn rollback(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let mut s = find_blocking(mgr, key).await?;
    if !s.start_rollback(now_ms(), "manually requested rollback") {
        return Err(ManagerError::bad_request(format!(
            "service {} has no previous spec to roll back to",
            s.spec.name
        )));
    }
    // The previous spec may name a network removed since.
    super::networks::check_attachments(mgr, &s.spec)?;
    s.meta.updated_at = now_ms();
    s.service_status = None;
    let id = s.id.clone();
    let rev = mgr
        .write(
            Batch::single(Manager::put_op(&s, &id, Some(s.meta.version))?),
            "service",
        )
        .await?;
    mgr.kick();
    Ok(json_ok(
        &serde_json::json!({"id": id, "version": rev, "spec_version": s.spec_version}),
    ))
}

pub async fn remove(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let s = find_blocking(mgr, key).await?;
    mgr.write(
        Batch::single(Op::delete(Table::Services, &s.id, Some(s.meta.version))),
        "service",
    )
    .await?;
    mgr.kick();
    Ok(json_ok(
        &serde_json::json!({"removed": s.id, "name": s.spec.name}),
    ))
}

#[derive(Debug, Default, Deserialize)]
pub struct TaskQuery {
    service: Option<String>,
    node: Option<String>,
    #[serde(rename = "desired-state")]
    desired_state: Option<String>,
}

/// `GET /v1/tasks?service=&node=&desired-state=` (`flotilla service ps`).
pub async fn tasks(
    State(ctx): State<Ctx>,
    Query(q): Query<TaskQuery>,
) -> Result<Response, ManagerError> {
    Ok(json_ok(&ctx.blocking(move |m| tasks_of(m, &q)).await?))
}

/// The tasks `q` asks for, by service, slot and node, newest first.
fn tasks_of(mgr: &Manager, q: &TaskQuery) -> Result<Vec<Task>, ManagerError> {
    let service_id = match &q.service {
        Some(k) => Some(find_service(mgr, k)?.id),
        None => None,
    };
    let node_id = match &q.node {
        Some(k) => Some(super::nodes::find_node(mgr, k)?.id),
        None => None,
    };
    let desired: Option<TaskState> = match &q.desired_state {
        Some(d) => Some(d.parse().map_err(ManagerError::bad_request)?),
        None => None,
    };
    let mut tasks: Vec<Task> = mgr
        .list::<Task>()?
        .into_iter()
        .filter(|t| service_id.as_ref().is_none_or(|s| &t.service_id == s))
        .filter(|t| {
            node_id
                .as_ref()
                .is_none_or(|n| t.node_id.as_ref() == Some(n))
        })
        .filter(|t| desired.is_none_or(|d| t.desired_state == d))
        .collect();
    tasks.sort_by(|a, b| {
        a.service_id
            .cmp(&b.service_id)
            .then(a.slot.cmp(&b.slot))
            .then(a.node_id.cmp(&b.node_id))
            .then(b.meta.created_at.cmp(&a.meta.created_at))
    });
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn spec_json(ports: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "name": "web",
            "task_template": {"container": {"image": "nginx"}},
            "mode": {"replicated": {"replicas": 1}},
            "endpoint_spec": {"ports": ports},
        })
    }

    fn spec(ports: serde_json::Value) -> ServiceSpec {
        serde_json::from_value(spec_json(ports)).expect("spec")
    }

    /// POSTs `body` to a route taking `Json<ServiceSpec>` behind the node's `json_errors`
    /// middleware, as `service create` does.
    async fn post_spec(body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        let app = axum::Router::new()
            .route(
                "/v1/services",
                axum::routing::post(|Json(_): Json<ServiceSpec>| async { "ok" }),
            )
            .layer(axum::middleware::from_fn(
                flotilla_api::respond::json_errors,
            ));
        let req = axum::http::Request::post("/v1/services")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        let resp = app.oneshot(req).await.expect("answer");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, v)
    }

    #[test]
    fn hostile_stop_signals_hostnames_and_shm_sizes_are_refused() {
        let with = |f: &dyn Fn(&mut flotilla_types::ContainerSpec)| {
            let mut s = spec(serde_json::json!([]));
            f(&mut s.task_template.container);
            validate_spec(&s)
        };
        assert!(with(&|c| {
            c.stop_signal = Some("SIGQUIT".into());
            c.hostname = Some("db-1.internal".into());
            c.shm_size = Some(128 << 20);
        })
        .is_ok());
        let long_label = "a".repeat(64);
        let long_name = ["a"; 130].join(".");
        for bad in ["SIGNOPE", "0", "65", "", "SIGRTMIN+99"] {
            assert!(
                with(&|c| c.stop_signal = Some(bad.into())).is_err(),
                "{bad}"
            );
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a b",
            "a/b",
            "é",
            "a_b",
            &long_label,
            &long_name,
        ] {
            assert!(with(&|c| c.hostname = Some(bad.into())).is_err(), "{bad}");
        }
        for bad in [0, (64 << 30) + 1, u64::MAX] {
            assert!(with(&|c| c.shm_size = Some(bad)).is_err(), "{bad}");
        }
        assert!(with(&|c| {
            c.dns_search = vec!["corp.example".into(), "eu.corp.example".into()];
            c.dns_options = vec!["ndots:2".into(), "edns0".into(), "timeout:1".into()];
        })
        .is_ok());
        let seven: Vec<String> = (0..7).map(|i| format!("d{i}.example")).collect();
        for bad in [
            vec!["".to_string()],
            vec!["a b".into()],
            vec!["evil\nnameserver 6.6.6.6".into()],
            vec!["-a.example".into()],
            vec![long_name.clone()],
            seven,
        ] {
            assert!(with(&|c| c.dns_search = bad.clone()).is_err(), "{bad:?}");
        }
        let seventeen: Vec<String> = (0..17).map(|_| "edns0".to_string()).collect();
        for bad in [
            vec!["".to_string()],
            vec!["ndots:".into()],
            vec!["ndots:x".into()],
            vec!["NDOTS:1".into()],
            vec!["rotate\nnameserver 6.6.6.6".into()],
            vec!["a".repeat(40)],
            seventeen,
        ] {
            assert!(with(&|c| c.dns_options = bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn unknown_protocol_or_publish_mode_is_a_400_that_says_why() {
        let (code, _) = post_spec(spec_json(serde_json::json!([
            {"published": 8080, "target": 80, "protocol": "udp", "publish_mode": "host"}
        ])))
        .await;
        assert_eq!(code, StatusCode::OK);
        let (code, body) = post_spec(spec_json(serde_json::json!([
            {"published": 8080, "target": 80, "protocol": "sctp"}
        ])))
        .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        let msg = body["message"].as_str().expect("message");
        assert!(
            msg.contains("protocol") && msg.contains("sctp") && msg.contains("`tcp`"),
            "{msg}"
        );
        let (code, body) = post_spec(spec_json(serde_json::json!([
            {"published": 8080, "target": 80, "publish_mode": "everywhere"}
        ])))
        .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        let msg = body["message"].as_str().expect("message");
        assert!(
            msg.contains("publish_mode") && msg.contains("everywhere") && msg.contains("`host`"),
            "{msg}"
        );
    }

    #[test]
    fn port_checks_that_remain() {
        let ok = spec(serde_json::json!([
            {"published": 8080, "target": 80},
            {"published": 8080, "target": 80, "protocol": "udp"},
            {"published": 8443, "target": 443, "proxy_protocol": "v2"},
        ]));
        validate_spec(&ok).expect("valid");
        for (ports, why) in [
            (
                serde_json::json!([{"published": 0, "target": 80}]),
                "1..65535",
            ),
            (
                serde_json::json!([{"published": 53, "target": 53, "protocol": "udp", "proxy_protocol": "v1"}]),
                "tcp only",
            ),
            (
                serde_json::json!([{"published": 80, "target": 80, "proxy_protocol": "v3"}]),
                "v1 or v2",
            ),
            (
                serde_json::json!([{"published": 80, "target": 80}, {"published": 80, "target": 81}]),
                "80/tcp is published twice",
            ),
        ] {
            let e = validate_spec(&spec(ports.clone())).expect_err("invalid");
            assert!(e.to_string().contains(why), "{ports}: {e}");
        }
    }

    #[test]
    fn ingress_ports_conflict_across_services_host_ports_do_not() {
        let other = |ports: serde_json::Value| Service {
            id: "s1".into(),
            meta: Meta::default(),
            spec: spec(ports),
            previous_spec: None,
            spec_version: 1,
            update_status: None,
            job_iteration: 0,
            vip: None,
            service_status: None,
            network_vips: Default::default(),
        };
        let all = vec![other(serde_json::json!([
            {"published": 8080, "target": 80},
            {"published": 9000, "target": 90, "publish_mode": "host"},
        ]))];
        let e = check_port_conflicts(
            &all,
            &spec(serde_json::json!([{"published": 8080, "target": 80}])),
            None,
        )
        .expect_err("same ingress port");
        assert!(e.to_string().contains("8080/tcp"), "{e}");
        // Another protocol, host mode on both sides, or the service itself: no conflict.
        for ports in [
            serde_json::json!([{"published": 8080, "target": 80, "protocol": "udp"}]),
            serde_json::json!([{"published": 9000, "target": 90, "publish_mode": "host"}]),
        ] {
            check_port_conflicts(&all, &spec(ports.clone()), None).expect("no conflict");
        }
        check_port_conflicts(
            &all,
            &spec(serde_json::json!([{"published": 8080, "target": 80}])),
            Some("s1"),
        )
        .expect("itself");
        // An ingress port over another service's host port conflicts.
        check_port_conflicts(
            &all,
            &spec(serde_json::json!([{"published": 9000, "target": 90}])),
            None,
        )
        .expect_err("ingress over host");
    }
}
