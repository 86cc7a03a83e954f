//! Services and tasks: `flotilla service create|ls|inspect|update|scale|rollback|rm|ps`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use flotilla_store::{Batch, Op, Table};
use flotilla_types::{
    Meta, Node, Service, ServiceMode, ServiceSpec, ServiceStatus, Task, TaskState, UpdateState,
    UpdateStatus,
};

use super::{json_ok, Ctx, VersionQuery};
use crate::error::ApiError;
use crate::manager::{encode, now_ms, Manager};

/// The most replicas (or job completions, or concurrent job tasks) one service may ask for.
/// Each orchestrator pass walks every slot, and a create or scale writes all the tasks it needs
/// at once, so an unbounded count (a typo such as 100000000) would take all of the leader's
/// memory, and again after each restart, since the spec is stored: before this bound, such a
/// create grew a node past 8 GB within 15 s, and `service rm` did not stop it. Swarm has no
/// bound; no cluster Flotilla is built for runs more tasks of one service (the scheduler is
/// benchmarked with 1,000,000 tasks over 100 services).
pub const MAX_REPLICAS: u64 = 100_000;

/// Checks a spec before it is stored; the messages say what to fix.
pub fn validate_spec(spec: &ServiceSpec) -> Result<(), ApiError> {
    flotilla_types::validate_name(&spec.name)
        .map_err(|e| ApiError::bad_request(format!("service name: {e}")))?;
    let c = &spec.task_template.container;
    if c.image.trim().is_empty() {
        return Err(ApiError::bad_request("an image is required"));
    }
    for e in &c.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(ApiError::bad_request(format!(
                "--env {e:?}: expected KEY=VALUE"
            )));
        }
    }
    flotilla_control::parse_constraints(&spec.task_template.placement.constraints)
        .map_err(|e| ApiError::bad_request(format!("--constraint: {e}")))?;
    flotilla_control::parse_preferences(&spec.task_template.placement.preferences)
        .map_err(|e| ApiError::bad_request(format!("--placement-pref: {e}")))?;
    match spec.mode {
        ServiceMode::ReplicatedJob {
            max_concurrent,
            total_completions,
        } if max_concurrent == 0 || total_completions == 0 => {
            return Err(ApiError::bad_request(
                "a replicated job needs --replicas ≥ 1 and --max-concurrent ≥ 1",
            ))
        }
        _ => {}
    }
    let counts = match spec.mode {
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
            return Err(ApiError::bad_request(format!(
                "{flag} {n} is more than one service may have ({MAX_REPLICAS}): \
                 split the work over several services"
            )));
        }
    }
    if let Some(h) = &c.healthcheck {
        if h.interval == 0 || h.timeout == 0 {
            return Err(ApiError::bad_request(
                "health check interval and timeout must be positive",
            ));
        }
    }
    let u = &spec.update_config;
    if !(0.0..=1.0).contains(&u.max_failure_ratio) {
        return Err(ApiError::bad_request(
            "--update-max-failure-ratio must be between 0 and 1",
        ));
    }
    let mut published = std::collections::HashSet::new();
    for p in &spec.endpoint_spec.ports {
        if p.published == 0 || p.target == 0 {
            return Err(ApiError::bad_request(
                "published and target ports must be 1..65535",
            ));
        }
        if p.protocol != "tcp" && p.protocol != "udp" {
            return Err(ApiError::bad_request(format!(
                "port {}: protocol {:?} is not tcp or udp",
                p.published, p.protocol
            )));
        }
        if p.publish_mode != "ingress" && p.publish_mode != "host" {
            return Err(ApiError::bad_request(format!(
                "port {}: publish mode {:?} is not ingress or host",
                p.published, p.publish_mode
            )));
        }
        match p.proxy_protocol.as_deref() {
            None => {}
            Some("v1") | Some("v2") if p.protocol == "tcp" => {}
            Some(o) => {
                return Err(ApiError::bad_request(format!(
                    "port {}: proxy protocol {o:?} must be v1 or v2, on tcp only",
                    p.published
                )))
            }
        }
        if !published.insert((p.published, p.protocol.clone())) {
            return Err(ApiError::bad_request(format!(
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
) -> Result<(), ApiError> {
    for p in &spec.endpoint_spec.ports {
        for o in all {
            if Some(o.id.as_str()) == self_id {
                continue;
            }
            if o.spec.endpoint_spec.ports.iter().any(|q| {
                q.published == p.published
                    && q.protocol == p.protocol
                    && (q.publish_mode == "ingress" || p.publish_mode == "ingress")
            }) {
                return Err(ApiError::conflict(format!(
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
async fn pin_image(ctx: &Ctx, spec: &mut ServiceSpec) -> Result<(), ApiError> {
    let image = spec.task_template.container.image.clone();
    if image.contains("@sha256:") {
        return Ok(());
    }
    let rt = ctx
        .runtime
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("this manager has no image store"))?;
    let local = rt.images().resolve(&image).ok();
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
        ApiError::bad_request(format!(
            "image {image:?} is not in the cluster: load it first with `flotilla image load FILE` or `flotilla image import DIR --name {image}`"
        ))
    })?;
    spec.task_template.container.image = format!("{image}@{digest}");
    Ok(())
}

fn find_service(mgr: &Manager, key: &str) -> Result<Service, ApiError> {
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
        [] => Err(ApiError::not_found(format!(
            "service {key} not found: see `flotilla service ls`"
        ))),
        _ => Err(ApiError::conflict(format!(
            "service prefix {key:?} is ambiguous: give more characters"
        ))),
    }
}

fn nodes_by_id(mgr: &Manager) -> Result<HashMap<String, Node>, ApiError> {
    Ok(mgr
        .list::<Node>()?
        .into_iter()
        .map(|n| (n.id.clone(), n))
        .collect())
}

fn status_of(service: &Service, tasks: &[&Task], nodes: &HashMap<String, Node>) -> ServiceStatus {
    let running = tasks
        .iter()
        .filter(|t| t.status.state == TaskState::Running && t.desired_state == TaskState::Running)
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
) -> Result<Response, ApiError> {
    validate_spec(&spec)?;
    let mgr = ctx.manager()?;
    let _names = mgr.names.lock().await;
    let existing: Vec<Service> = mgr.list()?;
    if existing.iter().any(|s| s.spec.name == spec.name) {
        return Err(ApiError::conflict(format!(
            "a service named {:?} already exists: pick another name or `flotilla service update` it",
            spec.name
        )));
    }
    check_port_conflicts(&existing, &spec, None)?;
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

pub async fn list(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    let mgr = ctx.manager()?;
    let services: Vec<Service> = mgr.list()?;
    let tasks: Vec<Task> = mgr.list()?;
    let nodes = nodes_by_id(&mgr)?;
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
    Ok(json_ok(&out))
}

pub async fn inspect(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let mgr = ctx.manager()?;
    let mut s = find_service(&mgr, &key)?;
    let tasks: Vec<Task> = mgr.list()?;
    let nodes = nodes_by_id(&mgr)?;
    let mine: Vec<&Task> = tasks.iter().filter(|t| t.service_id == s.id).collect();
    s.service_status = Some(status_of(&s, &mine, &nodes));
    Ok(json_ok(&s))
}

/// Replaces the spec. A change of the task template starts a rolling update; a change of the
/// replica count alone just scales.
pub async fn update(
    State(ctx): State<Ctx>,
    Path(key): Path<String>,
    Query(q): Query<VersionQuery>,
    Json(mut spec): Json<ServiceSpec>,
) -> Result<Response, ApiError> {
    validate_spec(&spec)?;
    let mgr = ctx.manager()?;
    let _names = mgr.names.lock().await;
    let mut s = find_service(&mgr, &key)?;
    let all: Vec<Service> = mgr.list()?;
    check_port_conflicts(&all, &spec, Some(&s.id))?;
    if spec.name != s.spec.name && all.iter().any(|o| o.spec.name == spec.name && o.id != s.id) {
        return Err(ApiError::conflict(format!(
            "a service named {:?} already exists",
            spec.name
        )));
    }
    if std::mem::discriminant(&spec.mode) != std::mem::discriminant(&s.spec.mode) {
        return Err(ApiError::bad_request(format!(
            "the mode of a service cannot change (it is {}): remove and recreate it",
            s.spec.mode.name()
        )));
    }
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
) -> Result<Response, ApiError> {
    let mgr = ctx.manager()?;
    let mut s = find_service(&mgr, &key)?;
    let Some(prev) = s.previous_spec.take() else {
        return Err(ApiError::bad_request(format!(
            "service {} has no previous spec to roll back to",
            s.spec.name
        )));
    };
    let current = std::mem::replace(&mut s.spec, prev);
    s.previous_spec = Some(current);
    s.spec_version += 1;
    s.update_status = Some(UpdateStatus {
        state: UpdateState::RollbackStarted,
        started_at: now_ms(),
        completed_at: None,
        message: "manually requested rollback".into(),
    });
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

pub async fn remove(State(ctx): State<Ctx>, Path(key): Path<String>) -> Result<Response, ApiError> {
    let mgr = ctx.manager()?;
    let s = find_service(&mgr, &key)?;
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
) -> Result<Response, ApiError> {
    let mgr = ctx.manager()?;
    let service_id = match &q.service {
        Some(k) => Some(find_service(&mgr, k)?.id),
        None => None,
    };
    let node_id = match &q.node {
        Some(k) => Some(super::nodes::find_node(&mgr, k)?.id),
        None => None,
    };
    let desired: Option<TaskState> = match &q.desired_state {
        Some(d) => Some(d.parse().map_err(ApiError::bad_request)?),
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
    Ok(json_ok(&tasks))
}
