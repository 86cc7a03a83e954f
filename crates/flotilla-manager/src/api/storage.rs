//! Secrets, configs and volumes: `flotilla secret|config create|ls|inspect|rm`,
//! `flotilla volume create|ls|inspect|rm|prune|export`, and the one way a node gets the data of
//! a secret: `GET /v1/nodes/{id}/tasks/{task}/files`, answered only for a task the leader has
//! assigned to that node (a worker's certificate reaches nothing else).
//!
//! Secrets and configs are immutable, as Swarm's: a new version is a new object, and a service
//! moves to it with `service update --secret-rm old --secret-add src=new,target=same`. A
//! secret's data never leaves the managers except to the node running a task that uses it;
//! `inspect` shows its digest and size.
//!
//! A volume is a cluster object with a home node: the node its first task ran on, or the one
//! `volume create --node` names. The scheduler places every later task mounting it there
//! (`control.rs`). Its data lives on that node only (the agent's `flotilla-volume` store);
//! `volume rm` asks that node to delete it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use flotilla_store::{Batch, Op, Table};
use flotilla_types::{
    FileKind, FileObject, FileObjectCreate, LocalVolumeInfo, Meta, MountKind, Node, NodeState,
    Service, ServiceSpec, Task, TaskFiles, TaskState, Volume, VolumeCreate, MAX_SECRET_BYTES,
};

use super::{json_ok, Caller, Ctx};
use crate::error::ManagerError;
use crate::manager::{encode, Manager, Stored};
use flotilla_types::now_ms;

/// A secret as stored (the `secrets` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoredSecret(pub FileObject);

/// A config as stored (the `configs` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoredConfig(pub FileObject);

impl Stored for StoredSecret {
    const TABLE: Table = Table::Secrets;
    const KIND: &'static str = "secret";
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.0.meta
    }
}

impl Stored for StoredConfig {
    const TABLE: Table = Table::Configs;
    const KIND: &'static str = "config";
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.0.meta
    }
}

impl Stored for Volume {
    const TABLE: Table = Table::Volumes;
    const KIND: &'static str = "volume";
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

fn table_of(kind: FileKind) -> Table {
    match kind {
        FileKind::Secret => Table::Secrets,
        FileKind::Config => Table::Configs,
    }
}

/// Every secret or config, data included.
fn list_files(mgr: &Manager, kind: FileKind) -> Result<Vec<FileObject>, ManagerError> {
    Ok(match kind {
        FileKind::Secret => mgr
            .list::<StoredSecret>()?
            .into_iter()
            .map(|s| s.0)
            .collect(),
        FileKind::Config => mgr
            .list::<StoredConfig>()?
            .into_iter()
            .map(|s| s.0)
            .collect(),
    })
}

/// Finds a secret or config by id, name or unique id prefix.
fn find_file(mgr: &Manager, kind: FileKind, key: &str) -> Result<FileObject, ManagerError> {
    let all = list_files(mgr, kind)?;
    if let Some(o) = all.iter().find(|o| o.id == key || o.name == key) {
        return Ok(o.clone());
    }
    let by_prefix: Vec<&FileObject> = all.iter().filter(|o| o.id.starts_with(key)).collect();
    match by_prefix.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ManagerError::not_found(format!(
            "{k} {key} not found: see `flotilla {k} ls`",
            k = kind.as_str()
        ))),
        _ => Err(ManagerError::conflict(format!(
            "{} prefix {key:?} is ambiguous: give more characters",
            kind.as_str()
        ))),
    }
}

/// What an API answer shows of a secret (never its data) or a config (its data too).
fn shown(kind: FileKind, mut o: FileObject) -> FileObject {
    if kind == FileKind::Secret {
        o.data.clear();
    }
    o
}

fn admin_only(caller: &Caller, what: &str) -> Result<(), ManagerError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ManagerError::forbidden(format!("{what} are for admins")))
    }
}

async fn create_file(
    ctx: Ctx,
    caller: Caller,
    kind: FileKind,
    req: FileObjectCreate,
) -> Result<Response, ManagerError> {
    admin_only(&caller, "secrets and configs")?;
    let k = kind.as_str();
    flotilla_types::validate_name(&req.name)
        .map_err(|e| ManagerError::bad_request(format!("{k} name: {e}")))?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(req.data.as_bytes())
        .map_err(|e| {
            ManagerError::bad_request(format!("{k} data must be base64 (standard, padded): {e}"))
        })?;
    if data.is_empty() {
        return Err(ManagerError::bad_request(format!("a {k} cannot be empty")));
    }
    if data.len() > MAX_SECRET_BYTES {
        return Err(ManagerError::bad_request(format!(
            "{k} is {} bytes; the most is {MAX_SECRET_BYTES} (500 KiB, as Swarm)",
            data.len()
        )));
    }
    for (lk, lv) in &req.labels {
        if lk.is_empty() || lk.len() > 256 || lv.len() > 4096 {
            return Err(ManagerError::bad_request(
                "labels: keys of 1-256 bytes, values up to 4096 bytes",
            ));
        }
    }
    let _names = ctx.names.lock().await;
    let all = ctx.blocking(move |m| list_files(m, kind)).await?;
    if all.iter().any(|o| o.name == req.name) {
        return Err(ManagerError::conflict(format!(
            "a {k} named {:?} exists; {k}s are immutable: create one with a new name and move \
             services with `service update --{k}-rm OLD --{k}-add src=NEW,target=…`",
            req.name
        )));
    }
    let now = now_ms();
    let obj = FileObject {
        id: flotilla_types::new_id(),
        meta: Meta {
            version: 0,
            created_at: now,
            updated_at: now,
        },
        name: req.name,
        labels: req.labels,
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&data))),
        size: data.len() as u64,
        data: req.data,
    };
    let value = match kind {
        FileKind::Secret => encode(&StoredSecret(obj.clone()))?,
        FileKind::Config => encode(&StoredConfig(obj.clone()))?,
    };
    let rev = ctx
        .write(Batch::single(Op::create(table_of(kind), &obj.id, value)), k)
        .await?;
    tracing::info!(kind = k, id = %obj.id, name = %obj.name, "created");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"id": obj.id, "version": rev, "digest": obj.digest})),
    )
        .into_response())
}

/// Services (by name) whose spec or whose unfinished tasks use the object.
fn users_of_file(
    mgr: &Manager,
    kind: FileKind,
    obj: &FileObject,
) -> Result<Vec<String>, ManagerError> {
    let refs = |s: &flotilla_types::TaskSpec| -> bool {
        let list = match kind {
            FileKind::Secret => &s.container.secrets,
            FileKind::Config => &s.container.configs,
        };
        list.iter()
            .any(|r| r.id == obj.id || (r.id.is_empty() && r.source == obj.name))
    };
    let services: Vec<Service> = mgr.list()?;
    let tasks: Vec<Task> = mgr.list()?;
    let mut out = BTreeSet::new();
    for s in &services {
        if refs(&s.spec.task_template) {
            out.insert(s.spec.name.clone());
        }
    }
    for t in tasks.iter().filter(|t| !t.status.state.is_terminal()) {
        if refs(&t.spec) {
            let name = services
                .iter()
                .find(|s| s.id == t.service_id)
                .map(|s| s.spec.name.clone())
                .unwrap_or_else(|| format!("task {}", t.id));
            out.insert(name);
        }
    }
    Ok(out.into_iter().collect())
}

async fn remove_file(
    ctx: Ctx,
    caller: Caller,
    kind: FileKind,
    key: String,
) -> Result<Response, ManagerError> {
    admin_only(&caller, "secrets and configs")?;
    let (obj, users) = ctx
        .blocking(move |m| {
            let o = find_file(m, kind, &key)?;
            let u = users_of_file(m, kind, &o)?;
            Ok((o, u))
        })
        .await?;
    if !users.is_empty() {
        return Err(ManagerError::conflict(format!(
            "{} {} is in use by {}: remove it from them first (`service update --{}-rm {}`)",
            kind.as_str(),
            obj.name,
            users.join(", "),
            kind.as_str(),
            obj.name
        )));
    }
    ctx.write(
        Batch::single(Op::delete(table_of(kind), &obj.id, Some(obj.meta.version))),
        kind.as_str(),
    )
    .await?;
    Ok(json_ok(
        &serde_json::json!({"removed": obj.id, "name": obj.name}),
    ))
}

macro_rules! file_handlers {
    ($kind:expr, $create:ident, $list:ident, $inspect:ident, $remove:ident) => {
        pub async fn $create(
            State(ctx): State<Ctx>,
            Extension(caller): Extension<Caller>,
            Json(req): Json<FileObjectCreate>,
        ) -> Result<Response, ManagerError> {
            create_file(ctx, caller, $kind, req).await
        }

        pub async fn $list(
            State(ctx): State<Ctx>,
            Extension(caller): Extension<Caller>,
        ) -> Result<Response, ManagerError> {
            admin_only(&caller, "secrets and configs")?;
            let mut all = ctx.blocking(move |m| list_files(m, $kind)).await?;
            all.sort_by(|a, b| a.name.cmp(&b.name));
            let all: Vec<FileObject> = all
                .into_iter()
                .map(|o| {
                    let mut o = shown($kind, o);
                    o.data.clear();
                    o
                })
                .collect();
            Ok(json_ok(&all))
        }

        pub async fn $inspect(
            State(ctx): State<Ctx>,
            Extension(caller): Extension<Caller>,
            Path(key): Path<String>,
        ) -> Result<Response, ManagerError> {
            admin_only(&caller, "secrets and configs")?;
            let o = ctx.blocking(move |m| find_file(m, $kind, &key)).await?;
            Ok(json_ok(&shown($kind, o)))
        }

        pub async fn $remove(
            State(ctx): State<Ctx>,
            Extension(caller): Extension<Caller>,
            Path(key): Path<String>,
        ) -> Result<Response, ManagerError> {
            remove_file(ctx, caller, $kind, key).await
        }
    };
}

file_handlers!(
    FileKind::Secret,
    create_secret,
    list_secrets,
    inspect_secret,
    remove_secret
);
file_handlers!(
    FileKind::Config,
    create_config,
    list_configs,
    inspect_config,
    remove_config
);

/// `GET /v1/nodes/{id}/tasks/{task}/files`: the secrets and configs of one task, for the node
/// it is assigned to (authorization has checked that the caller is node `id` or an admin).
pub async fn task_files(
    State(ctx): State<Ctx>,
    Path((node_id, task_id)): Path<(String, String)>,
) -> Result<Response, ManagerError> {
    let files = ctx
        .blocking(move |m| files_for(m, &node_id, &task_id))
        .await?;
    Ok(json_ok(&files))
}

fn files_for(mgr: &Manager, node_id: &str, task_id: &str) -> Result<TaskFiles, ManagerError> {
    let refused = || {
        ManagerError::forbidden(format!(
            "task {task_id} is not assigned to node {node_id}: a node gets only the secrets of its own tasks"
        ))
    };
    let task = mgr.get::<Task>(task_id)?.ok_or_else(refused)?;
    if task.node_id.as_deref() != Some(node_id)
        || task.desired_state > TaskState::Running
        || task.status.state < TaskState::Assigned
        || task.status.state.is_terminal()
    {
        return Err(refused());
    }
    let pick = |kind: FileKind, refs: &[flotilla_types::FileReference]| {
        let all = list_files(mgr, kind)?;
        refs.iter()
            .map(|r| {
                all.iter()
                    .find(|o| {
                        if r.id.is_empty() {
                            o.name == r.source
                        } else {
                            o.id == r.id
                        }
                    })
                    .cloned()
                    .ok_or_else(|| {
                        ManagerError::not_found(format!(
                            "{} {} of task {task_id} no longer exists",
                            kind.as_str(),
                            r.source
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(TaskFiles {
        secrets: pick(FileKind::Secret, &task.spec.container.secrets)?,
        configs: pick(FileKind::Config, &task.spec.container.configs)?,
    })
}

/// Fills in the ids of the secrets and configs a spec names, and checks its bind mounts
/// against the cluster's allow-list. Called on create and update, after `validate_spec`.
pub fn resolve_refs(mgr: &Manager, spec: &mut ServiceSpec) -> Result<(), ManagerError> {
    let c = &mut spec.task_template.container;
    for (kind, refs) in [
        (FileKind::Secret, &mut c.secrets),
        (FileKind::Config, &mut c.configs),
    ] {
        if refs.is_empty() {
            continue;
        }
        let all = list_files(mgr, kind)?;
        for r in refs.iter_mut() {
            let found = all.iter().find(|o| o.name == r.source).ok_or_else(|| {
                ManagerError::bad_request(format!(
                    "{k} {:?} not found: create it with `flotilla {k} create {} FILE`",
                    r.source,
                    r.source,
                    k = kind.as_str()
                ))
            })?;
            r.id = found.id.clone();
        }
    }
    let binds: Vec<&flotilla_types::Mount> = c
        .mounts
        .iter()
        .filter(|m| m.kind == MountKind::Bind)
        .collect();
    if !binds.is_empty() {
        let allowed = mgr.cluster()?.bind_allow;
        for b in binds {
            if !allowed.iter().any(|a| under(&b.source, a)) {
                return Err(ManagerError::bad_request(format!(
                    "bind source {} is not under a host path the cluster allows ({}): an admin \
                     allows it with `flotilla cluster update --bind-allow {}`",
                    b.source,
                    if allowed.is_empty() {
                        "none yet".to_string()
                    } else {
                        allowed.join(", ")
                    },
                    b.source
                )));
            }
        }
    }
    Ok(())
}

/// Whether `path` is `dir` or lies beneath it (component-wise: `/srv/data2` is not under
/// `/srv/data`).
pub fn under(path: &str, dir: &str) -> bool {
    let p: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let d: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
    !d.is_empty() && p.len() >= d.len() && p[..d.len()] == d[..]
}

/// Checks an allow-list entry given to `cluster update --bind-allow`.
pub fn validate_bind_allow(dir: &str) -> Result<(), ManagerError> {
    if !dir.starts_with('/') || dir.split('/').any(|c| c == "..") || dir.contains('\0') {
        return Err(ManagerError::bad_request(format!(
            "--bind-allow {dir:?}: give an absolute host path without `..`"
        )));
    }
    if dir.split('/').all(|c| c.is_empty()) {
        return Err(ManagerError::bad_request(
            "--bind-allow /: allowing the whole host would let any service mount any host file; name directories",
        ));
    }
    Ok(())
}

// ---- volumes ----

/// Volume names the tasks that have not ended mount, with the services they belong to.
fn volume_users(mgr: &Manager) -> Result<HashMap<String, BTreeSet<String>>, ManagerError> {
    let services: Vec<Service> = mgr.list()?;
    let tasks: Vec<Task> = mgr.list()?;
    let name_of: HashMap<&str, &str> = services
        .iter()
        .map(|s| (s.id.as_str(), s.spec.name.as_str()))
        .collect();
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for t in tasks.iter().filter(|t| !t.status.state.is_terminal()) {
        for m in volume_mounts(&t.spec) {
            out.entry(m.to_string()).or_default().insert(
                name_of
                    .get(t.service_id.as_str())
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| t.service_id.clone()),
            );
        }
    }
    // A service whose spec names a volume (without placeholders) uses it even with no task.
    for s in &services {
        for m in volume_mounts(&s.spec.task_template) {
            if !m.contains("{{") {
                out.entry(m.to_string())
                    .or_default()
                    .insert(s.spec.name.clone());
            }
        }
    }
    Ok(out)
}

/// The named volumes a task spec mounts.
pub fn volume_mounts(spec: &flotilla_types::TaskSpec) -> impl Iterator<Item = &str> {
    spec.container
        .mounts
        .iter()
        .filter(|m| m.kind == MountKind::Volume && !m.source.is_empty())
        .map(|m| m.source.as_str())
}

fn find_volume(mgr: &Manager, name: &str) -> Result<Volume, ManagerError> {
    mgr.get::<Volume>(name)?.ok_or_else(|| {
        ManagerError::not_found(format!("volume {name} not found: see `flotilla volume ls`"))
    })
}

/// Asks the home nodes of `volumes` for their sizes (2 s each, in parallel); a node that does
/// not answer leaves the size unset.
async fn with_sizes(ctx: &Ctx, volumes: &mut [Volume], nodes: &[Node]) {
    let homes: BTreeSet<String> = volumes.iter().filter_map(|v| v.node_id.clone()).collect();
    let mut asks = Vec::new();
    for id in homes {
        let Some(n) = nodes
            .iter()
            .find(|n| n.id == id && n.status.state == NodeState::Ready)
        else {
            continue;
        };
        let client = ctx
            .tls
            .node(&n.status.addr)
            .with_timeout(Duration::from_secs(2));
        asks.push(async move {
            let r: Result<Vec<LocalVolumeInfo>, _> = client.get_json("/v1/agent/volumes").await;
            (id, r.ok())
        });
    }
    let answers: HashMap<String, Vec<LocalVolumeInfo>> = futures::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|(id, r)| r.map(|r| (id, r)))
        .collect();
    for v in volumes.iter_mut() {
        if let Some(local) = v.node_id.as_ref().and_then(|n| answers.get(n)) {
            let found = local.iter().find(|l| l.name == v.name);
            v.size_bytes = Some(found.map(|l| l.size_bytes).unwrap_or(0));
            v.size_limit = found.and_then(|l| l.size_limit);
        }
    }
}

/// `GET /v1/volumes`
pub async fn list_volumes(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ManagerError> {
    admin_only(&caller, "volumes")?;
    let (mut vols, nodes) = ctx
        .blocking(|m| {
            let users = volume_users(m)?;
            let mut vols: Vec<Volume> = m.list()?;
            for v in vols.iter_mut() {
                v.used_by = users
                    .get(&v.name)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
            }
            Ok((vols, m.list::<Node>()?))
        })
        .await?;
    vols.sort_by(|a, b| a.name.cmp(&b.name));
    with_sizes(&ctx, &mut vols, &nodes).await;
    Ok(json_ok(&vols))
}

/// `GET /v1/volumes/{name}`
pub async fn inspect_volume(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ManagerError> {
    admin_only(&caller, "volumes")?;
    let (v, nodes) = ctx
        .blocking(move |m| {
            let mut v = find_volume(m, &name)?;
            v.used_by = volume_users(m)?
                .remove(&v.name)
                .unwrap_or_default()
                .into_iter()
                .collect();
            Ok((v, m.list::<Node>()?))
        })
        .await?;
    let mut one = [v];
    with_sizes(&ctx, &mut one, &nodes).await;
    let [mut v] = one;
    v.moving = ctx.moves.get(&v.name).map(|m| m.shown());
    Ok(json_ok(&v))
}

/// `POST /v1/volumes`
pub async fn create_volume(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<VolumeCreate>,
) -> Result<Response, ManagerError> {
    admin_only(&caller, "volumes")?;
    flotilla_types::validate_name(&req.name)
        .map_err(|e| ManagerError::bad_request(format!("volume name: {e}")))?;
    let node = req.node.clone();
    let (exists, node_id) = {
        let name = req.name.clone();
        ctx.blocking(move |m| {
            let exists = m.get::<Volume>(&name)?.is_some();
            let node_id = match node {
                Some(key) => Some(super::nodes::find_node(m, &key)?.id),
                None => None,
            };
            Ok((exists, node_id))
        })
        .await?
    };
    if exists {
        return Err(ManagerError::conflict(format!(
            "a volume named {:?} exists: see `flotilla volume inspect {}`",
            req.name, req.name
        )));
    }
    let now = now_ms();
    let v = Volume {
        name: req.name,
        meta: Meta {
            version: 0,
            created_at: now,
            updated_at: now,
        },
        labels: req.labels,
        driver: "local".into(),
        node_id,
        size_bytes: None,
        size_limit: None,
        used_by: Vec::new(),
        moving: None,
        last_move: None,
    };
    ctx.write(
        Batch::single(Op::create(Table::Volumes, &v.name, encode(&v)?)),
        "volume",
    )
    .await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct RemoveQuery {
    #[serde(default)]
    pub force: bool,
}

/// Removes one volume: refused while used; its data is deleted on its home node first (with
/// `force`, a home node that cannot be reached is skipped and its directory stays there).
async fn remove_one(ctx: &Ctx, v: &Volume, force: bool) -> Result<(), ManagerError> {
    if let Some(home) = &v.node_id {
        let node = {
            let home = home.clone();
            ctx.blocking(move |m| m.get::<Node>(&home)).await?
        };
        let gone = match &node {
            Some(n) => {
                let client = ctx
                    .tls
                    .node(&n.status.addr)
                    .with_timeout(Duration::from_secs(30));
                let path = format!("/v1/agent/volumes/{}", v.name);
                match client
                    .request(axum::http::Method::DELETE, &path, None)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.status() == Some(404) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            }
            None => Ok(()),
        };
        if let Err(e) = gone {
            if !force {
                return Err(ManagerError::unavailable(format!(
                    "volume {}: its node {} did not delete the data ({e}); `flotilla volume rm \
                     --force {}` forgets the volume and leaves the directory on that node",
                    v.name, home, v.name
                )));
            }
            tracing::warn!(volume = %v.name, node = %home, error = %e, "volume forgotten; its data stays on the node");
        }
    }
    ctx.write(
        Batch::single(Op::delete(Table::Volumes, &v.name, Some(v.meta.version))),
        "volume",
    )
    .await?;
    Ok(())
}

/// `DELETE /v1/volumes/{name}[?force=true]`
pub async fn remove_volume(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Response, ManagerError> {
    admin_only(&caller, "volumes")?;
    let (v, users) = ctx
        .blocking(move |m| {
            let v = find_volume(m, &name)?;
            let users = volume_users(m)?.remove(&v.name).unwrap_or_default();
            Ok((v, users))
        })
        .await?;
    if !users.is_empty() {
        return Err(ManagerError::conflict(format!(
            "volume {} is in use by {}: remove or update those services first",
            v.name,
            users.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    remove_one(&ctx, &v, q.force).await?;
    Ok(json_ok(&serde_json::json!({"removed": v.name})))
}

/// `POST /v1/volumes/prune`: removes every volume no service and no running task uses.
pub async fn prune_volumes(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ManagerError> {
    admin_only(&caller, "volumes")?;
    let unused: Vec<Volume> = ctx
        .blocking(|m| {
            let users = volume_users(m)?;
            Ok(m.list::<Volume>()?
                .into_iter()
                .filter(|v| !users.contains_key(&v.name))
                .collect())
        })
        .await?;
    let mut removed = Vec::new();
    let mut failed = BTreeMap::new();
    for v in unused {
        match remove_one(&ctx, &v, false).await {
            Ok(()) => removed.push(v.name),
            Err(e) => {
                failed.insert(v.name, e.to_string());
            }
        }
    }
    Ok(json_ok(
        &serde_json::json!({"removed": removed, "failed": failed}),
    ))
}

/// A volume and its home node (`None` before a task or `--node` placed it).
async fn volume_home(ctx: &Ctx, name: String) -> Result<(Volume, Option<Node>), ManagerError> {
    ctx.blocking(move |m| {
        let v = find_volume(m, &name)?;
        let node = match &v.node_id {
            Some(id) => m.get::<Node>(id)?,
            None => None,
        };
        Ok((v, node))
    })
    .await
}

/// `GET /v1/volumes/{name}/export`: a tar stream of the volume, from its home node.
pub async fn export_volume(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ManagerError> {
    admin_only(&caller, "volumes")?;
    let (v, node) = volume_home(&ctx, name).await?;
    let Some(node) = node else {
        return Err(ManagerError::not_found(format!(
            "volume {} has no data yet: no task has used it",
            v.name
        )));
    };
    let client = ctx.tls.node(&node.status.addr);
    let path = format!("/v1/agent/volumes/{}/export", v.name);
    let resp = client
        .send(axum::http::Method::GET, &path, None)
        .await
        .map_err(|e| {
            ManagerError::unavailable(format!(
                "volume {}: its node {} cannot be reached: {e}",
                v.name, node.spec.name
            ))
        })?;
    let status = resp.status();
    let mut out = Response::builder().status(status);
    if let Some(ct) = resp.headers().get(axum::http::header::CONTENT_TYPE) {
        out = out.header(axum::http::header::CONTENT_TYPE, ct);
    }
    Ok(out
        .body(Body::new(resp.into_body()))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// How long `volume move` waits for a task to run on the new node before it deletes the copy
/// on the old one.
const MOVE_SOURCE_WAIT: Duration = Duration::from_secs(120);

/// What the agent's import answers.
#[derive(Deserialize)]
struct Imported {
    sha256: String,
    bytes: u64,
}

/// What the agent's tree route answers (`flotilla_volume::TreeDigest`).
#[derive(Debug, Deserialize, PartialEq, Eq)]
struct TreeDigest {
    sha256: String,
    entries: u64,
    files: u64,
    bytes: u64,
}

/// An agent client for node `n` with a short timeout (for questions, not streams).
fn agent(ctx: &Ctx, n: &Node) -> flotilla_api::Client {
    ctx.tls
        .node(&n.status.addr)
        .with_timeout(Duration::from_secs(30))
}

/// The volumes node `n` holds (`what` names it in the error).
async fn local_volumes(
    ctx: &Ctx,
    volume: &str,
    n: &Node,
    what: &str,
) -> Result<Vec<LocalVolumeInfo>, ManagerError> {
    agent(ctx, n)
        .get_json("/v1/agent/volumes")
        .await
        .map_err(|e| {
            ManagerError::unavailable(format!(
                "volume {volume}: {what} {} cannot be reached: {e}",
                n.spec.name
            ))
        })
}

/// Before a copy to node `n`, which is not the volume's home: a volume by that name there is
/// what an earlier move left (a move that failed half-way, a leader that changed mid-move, an
/// old copy kept after a move; the home's copy is the volume's data), deleted so that the copy
/// can start. Refused while a container there uses it.
async fn clear_leftover(
    ctx: &Ctx,
    volume: &str,
    n: &Node,
    there: &[LocalVolumeInfo],
) -> Result<(), ManagerError> {
    let Some(l) = there.iter().find(|l| l.name == volume) else {
        return Ok(());
    };
    if !l.in_use_by.is_empty() {
        return Err(ManagerError::conflict(format!(
            "node {} holds a copy of volume {volume} (left by an earlier move) that container {} \
             uses: stop it there, then retry",
            n.spec.name,
            l.in_use_by.join(", ")
        )));
    }
    let path = format!("/v1/agent/volumes/{volume}");
    match agent(ctx, n)
        .request(axum::http::Method::DELETE, &path, None)
        .await
    {
        Ok(_) => {}
        Err(e) if e.status() == Some(404) => {}
        Err(e) => {
            return Err(ManagerError::unavailable(format!(
                "volume {volume}: node {} holds a copy left by an earlier move and did not \
                 delete it ({e}): retry, or delete its DATA/volumes/{volume} by hand",
                n.spec.name
            )))
        }
    }
    tracing::warn!(%volume, node = %n.id, bytes = l.size_bytes,
        "deleted a copy an earlier move left on the target node");
    Ok(())
}

/// Deletes the copy of `volume` on node `n` (a failed or abandoned move's), logging a failure.
async fn drop_copy(ctx: &Ctx, volume: &str, n: &Node) {
    let path = format!("/v1/agent/volumes/{volume}");
    if let Err(e) = agent(ctx, n)
        .request(axum::http::Method::DELETE, &path, None)
        .await
    {
        if e.status() != Some(404) {
            tracing::warn!(%volume, node = %n.id, error = %e, "a failed move's copy stays on the target");
        }
    }
}

/// One pass of a move: the old node's export streamed through this manager into the new
/// node's import over the nodes' mTLS connections, hashed (SHA-256) and counted as it passes
/// (`progress`); the new node answers the hash and length of what it received, and they
/// must match. `pass`: `pre-copy` (a full export that leaves a snapshot on the old node,
/// into a new volume), `final` (the delta since that snapshot, onto the pre-copied volume)
/// or `copy` (a full export into a new volume).
async fn relay(
    ctx: &Ctx,
    volume: &str,
    from: &Node,
    to: &Node,
    pass: &str,
    progress: &std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<flotilla_types::VolumePass, String> {
    let started = std::time::Instant::now();
    let (export_q, import_q) = match pass {
        "pre-copy" => ("?pass=first", "?pass=first"),
        "final" => ("?pass=final", "?pass=final"),
        _ => ("", ""),
    };
    let src = ctx.tls.node(&from.status.addr);
    let resp = src
        .send(
            axum::http::Method::GET,
            &format!("/v1/agent/volumes/{volume}/export{export_q}"),
            None,
        )
        .await
        .map_err(|e| format!("export on node {} failed: {e}", from.spec.name))?;
    if !resp.status().is_success() {
        let e = src
            .finish(resp)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return Err(format!("export on node {} failed: {e}", from.spec.name));
    }
    // The stream's digest and size as they pass.
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Sha256::new()));
    let tap = sent.clone();
    let counter = progress.clone();
    counter.store(0, std::sync::atomic::Ordering::Relaxed);
    let body = http_body_util::BodyExt::map_frame(resp.into_body(), move |frame| {
        if let Some(d) = frame.data_ref() {
            tap.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .update(d);
            counter.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        frame
    });
    let body =
        http_body_util::BodyExt::map_err(body, |e| Box::new(e) as flotilla_api::upload::BoxError);
    let dst = ctx.tls.node(&to.status.addr);
    let got = async {
        let resp = dst
            .send_stream(
                axum::http::Method::POST,
                &format!("/v1/agent/volumes/{volume}/import{import_q}"),
                "application/x-tar",
                Box::pin(body),
            )
            .await
            .map_err(|e| e.to_string())?;
        let r = dst.finish(resp).await.map_err(|e| e.to_string())?;
        serde_json::from_slice::<Imported>(&r.body).map_err(|e| e.to_string())
    }
    .await
    .map_err(|e| format!("copying to node {} failed ({e})", to.spec.name))?;
    let sha256 = hex::encode(
        sent.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .finalize(),
    );
    let bytes = progress.load(std::sync::atomic::Ordering::Relaxed);
    if got.sha256 != sha256 || got.bytes != bytes {
        return Err(format!(
            "the copy on node {} does not match (sent {bytes} bytes, sha256 {sha256}; \
             received {} bytes, sha256 {})",
            to.spec.name, got.bytes, got.sha256
        ));
    }
    Ok(flotilla_types::VolumePass {
        pass: pass.to_string(),
        bytes,
        sha256,
        ms: started.elapsed().as_millis() as u64,
    })
}

/// The two nodes of a move, by id.
async fn move_nodes(ctx: &Ctx, from: &str, to: &str) -> Result<(Node, Node), ManagerError> {
    let (from, to) = (from.to_string(), to.to_string());
    ctx.blocking(move |m| {
        let get = |id: &str| {
            m.get::<Node>(id)?
                .ok_or_else(|| ManagerError::not_found(format!("node {id} left the cluster")))
        };
        Ok((get(&from)?, get(&to)?))
    })
    .await
}

/// The first pass of a drain's move (`volumes::mover_loop`): copies volume `name` from node
/// `from` to node `to` while its task still runs on `from`; the old node keeps a snapshot of
/// what it sent, for the final pass. The caller has recorded the move (`PreCopying`), so no
/// other move of the volume starts meanwhile. On failure the copy on `to` is deleted.
pub async fn precopy(
    ctx: &Ctx,
    name: &str,
    from: &str,
    to: &str,
) -> Result<flotilla_types::VolumePass, ManagerError> {
    let (from, to) = move_nodes(ctx, from, to).await?;
    for (n, what) in [(&from, "its node"), (&to, "the target node")] {
        if n.status.state != NodeState::Ready {
            return Err(ManagerError::unavailable(format!(
                "volume {name}: {what} {} is {}",
                n.spec.name,
                n.status.state.as_str()
            )));
        }
    }
    let here = local_volumes(ctx, name, &from, "its node").await?;
    let there = local_volumes(ctx, name, &to, "the target node").await?;
    clear_leftover(ctx, name, &to, &there).await?;
    let Some(st) = ctx.moves.get(name) else {
        return Err(ManagerError::conflict(format!(
            "volume {name}: the pre-copy was called off"
        )));
    };
    let mut shown = st.clone();
    shown.total = here
        .iter()
        .find(|l| l.name == name)
        .map_or(0, |l| l.size_bytes);
    ctx.moves.set(name, shown);
    match relay(ctx, name, &from, &to, "pre-copy", &st.done).await {
        Ok(pass) => Ok(pass),
        Err(e) => {
            drop_copy(ctx, name, &to).await;
            Err(ManagerError::unavailable(format!(
                "volume {name}: {e}; the volume stays on node {}",
                from.spec.name
            )))
        }
    }
}

/// Forgets a pre-copy whose final pass never came (the drain was undone, or the task went
/// elsewhere) and deletes its copy, unless the volume's home is that node by now.
pub async fn drop_precopy(ctx: &Ctx, name: &str, st: &crate::volumes::MoveState) {
    ctx.moves.remove(name);
    let (vol, to) = (name.to_string(), st.to.clone());
    let found = ctx
        .blocking(move |m| Ok((m.get::<Volume>(&vol)?, m.get::<Node>(&to)?)))
        .await;
    if let Ok((v, Some(node))) = found {
        if v.and_then(|v| v.node_id).as_deref() != Some(node.id.as_str()) {
            drop_copy(ctx, name, &node).await;
        }
    }
}

/// `POST /v1/volumes/{name}/move` (`{"to": NODE}`): moves a volume that no task holds from
/// its home node to another ([`move_to`]).
pub async fn move_volume(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(req): Json<flotilla_types::VolumeMove>,
) -> Result<Json<flotilla_types::VolumeMoved>, ManagerError> {
    admin_only(&caller, "volumes")?;
    move_to(&ctx, &name, &req.to).await.map(Json)
}

/// Moves volume `name` to the node `to` (id or hostname); also what the leader's drain mover
/// (`crate::volumes::mover_loop`) calls once the task is stopped. Refused while a container
/// on the old node holds the volume (one writer). After a pre-copy to `to`
/// (`volumes::mover_loop`) only the final pass runs: what changed since, checked by the
/// stream's SHA-256 on both ends and then by comparing a digest of both trees (paths, kinds,
/// sizes, modes, owners, link targets); otherwise one full pass, checked by the stream's
/// SHA-256. Then the new home is recorded in one conditional write (the tasks that wait for
/// the volume go there), and the old copy is deleted once a task runs on the new node (at
/// once when no task wants to run on the volume; after [`MOVE_SOURCE_WAIT`] it is kept and
/// the answer says so). A failed copy is deleted; the volume stays where it was.
pub async fn move_to(
    ctx: &Ctx,
    name: &str,
    to: &str,
) -> Result<flotilla_types::VolumeMoved, ManagerError> {
    let (v, from, to) = {
        let (name, key) = (name.to_string(), to.to_string());
        ctx.blocking(move |m| {
            let v = find_volume(m, &name)?;
            let from = match &v.node_id {
                Some(id) => m.get::<Node>(id)?,
                None => None,
            };
            let to = super::nodes::find_node(m, &key)?;
            Ok((v, from, to))
        })
        .await?
    };
    let Some(from) = from else {
        return Err(ManagerError::bad_request(match &v.node_id {
            None => format!(
                "volume {} has no data yet (no task has used it): `flotilla volume rm {}` and \
                 `flotilla volume create {} --node NODE` place it",
                v.name, v.name, v.name
            ),
            Some(id) => format!(
                "volume {} lives on node {id}, which left the cluster: nothing to copy from",
                v.name
            ),
        }));
    };
    if from.id == to.id {
        return Err(ManagerError::bad_request(format!(
            "volume {} is on node {} already",
            v.name, to.spec.name
        )));
    }
    for (n, what) in [(&from, "its node"), (&to, "the target node")] {
        if n.status.state != NodeState::Ready {
            return Err(ManagerError::unavailable(format!(
                "volume {}: {what} {} is {}: both nodes must be up to copy",
                v.name,
                n.spec.name,
                n.status.state.as_str()
            )));
        }
    }
    let prior = ctx.moves.get(&v.name);
    if let Some(p) = &prior {
        if matches!(
            p.phase,
            crate::volumes::Phase::PreCopying | crate::volumes::Phase::Copying
        ) {
            return Err(ManagerError::conflict(format!(
                "volume {}: a move to node {} is under way (`flotilla volume inspect {}` shows \
                 it); try again when it is done",
                v.name, p.to, v.name
            )));
        }
    }
    // Nobody may write while the final (or only) pass copies: a task of a replicated service
    // holding the volume on the old node is stopped after a first pass, its replacement waits
    // for the new home; any other holder refuses the move.
    let held = local_volumes(ctx, &v.name, &from, "its node").await?;
    let total = held
        .iter()
        .find(|l| l.name == v.name)
        .map_or(0, |l| l.size_bytes);
    let holders: Vec<String> = held
        .iter()
        .find(|l| l.name == v.name)
        .map(|l| l.in_use_by.clone())
        .unwrap_or_default();
    let stopped = !holders.is_empty();
    let pre = if stopped {
        if prior.is_some() {
            return Err(ManagerError::conflict(format!(
                "volume {}: a drain's move of it is under way (`flotilla volume inspect {}` \
                 shows it); try again when it is done",
                v.name, v.name
            )));
        }
        Some(stop_and_precopy(ctx, &v.name, &from, &to, &holders).await?)
    } else {
        // A pre-copy counts only from this node to that one; one elsewhere is dropped.
        match prior {
            Some(p) => match &p.phase {
                crate::volumes::Phase::PreCopied(pass) if p.from == from.id && p.to == to.id => {
                    Some(pass.clone())
                }
                _ => {
                    drop_precopy(ctx, &v.name, &p).await;
                    None
                }
            },
            None => None,
        }
    };
    let mut st = crate::volumes::MoveState::new(&from.id, &to.id, crate::volumes::Phase::Copying);
    st.total = total;
    // The stopped task's replacement keeps waiting until the new home is written.
    st.hold = stopped;
    if pre.is_none() && !ctx.moves.start(&v.name, st.clone()) {
        return Err(ManagerError::conflict(format!(
            "volume {}: another move is under way; try again when it is done",
            v.name
        )));
    }
    if pre.is_some() {
        ctx.moves.set(&v.name, st.clone());
    } else {
        // Ours to copy into now (the move is recorded): clear what an earlier move left there.
        let cleared = match local_volumes(ctx, &v.name, &to, "the target node").await {
            Ok(there) => clear_leftover(ctx, &v.name, &to, &there).await,
            Err(e) => Err(e),
        };
        if let Err(e) = cleared {
            ctx.moves.remove(&v.name);
            return Err(e);
        }
    }

    let started = std::time::Instant::now();
    let pass_name = if pre.is_some() { "final" } else { "copy" };
    let copied = relay(ctx, &v.name, &from, &to, pass_name, &st.done).await;
    // After a final pass the two trees must agree too (a delta that missed an entry would
    // not show in the stream's hash).
    let checked =
        match (copied, pre.is_some()) {
            (Ok(pass), true) => {
                let path = format!("/v1/agent/volumes/{}/tree", v.name);
                let (ca, cb) = (agent(ctx, &from), agent(ctx, &to));
                let (a, b) = tokio::join!(
                    ca.get_json::<TreeDigest>(&path),
                    cb.get_json::<TreeDigest>(&path)
                );
                match (a, b) {
                    (Ok(a), Ok(b)) if a == b => Ok(pass),
                    (Ok(a), Ok(b)) => {
                        Err(format!(
                    "the trees differ after the final pass (node {}: {} entries, {} bytes, \
                     {}; node {}: {} entries, {} bytes, {})",
                    from.spec.name, a.entries, a.bytes, a.sha256, to.spec.name, b.entries,
                    b.bytes, b.sha256
                ))
                    }
                    (Err(e), _) | (_, Err(e)) => Err(format!("comparing the trees failed: {e}")),
                }
            }
            (other, _) => other,
        };
    let pass = match checked {
        Ok(pass) => pass,
        Err(e) => {
            ctx.moves.remove(&v.name);
            ctx.wake.notify_one();
            drop_copy(ctx, &v.name, &to).await;
            return Err(ManagerError::unavailable(format!(
                "volume {}: {e}; the volume stays on node {}",
                v.name, from.spec.name
            )));
        }
    };
    let passes: Vec<flotilla_types::VolumePass> = pre.into_iter().chain([pass.clone()]).collect();
    // The new home: from here the tasks waiting for the volume go to the new node.
    let mut moved = v.clone();
    moved.node_id = Some(to.id.clone());
    moved.meta.updated_at = now_ms();
    moved.size_bytes = None;
    moved.size_limit = None;
    moved.used_by = Vec::new();
    moved.moving = None;
    moved.last_move = Some(flotilla_types::VolumeLastMove {
        from: from.id.clone(),
        to: to.id.clone(),
        at: moved.meta.updated_at,
        passes: passes.clone(),
    });
    let written = ctx
        .write(
            Batch::single(Op::update(
                Table::Volumes,
                &v.name,
                encode(&moved)?,
                Some(v.meta.version),
            )),
            "volume",
        )
        .await;
    ctx.moves.remove(&v.name);
    // The control loop places the tasks a held move kept waiting.
    ctx.wake.notify_one();
    if let Err(e) = written {
        drop_copy(ctx, &v.name, &to).await;
        return Err(e);
    }
    let copy_ms = started.elapsed().as_millis() as u64;
    let bytes: u64 = passes.iter().map(|p| p.bytes).sum();
    tracing::info!(volume = %v.name, from = %from.id, to = %to.id, bytes, copy_ms,
        passes = passes.len(), "volume moved");

    // The old copy stays until a task runs on the new node (at once without users). The users
    // are read now, with the new home written: a service scaled to 0 during the move has none.
    // After stopping a task for the move, its replacement may not exist yet: give the
    // orchestrator a moment to make it (none comes if its service was scaled to 0 meanwhile).
    let replaced_by = tokio::time::Instant::now()
        + if stopped {
            REPLACEMENT_WAIT
        } else {
            Duration::ZERO
        };
    let users = loop {
        let name = v.name.clone();
        let users = ctx.blocking(move |m| volume_task_users(m, &name)).await?;
        if !users.is_empty() || tokio::time::Instant::now() >= replaced_by {
            break users;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let kept = if users.is_empty() {
        None
    } else {
        let deadline = tokio::time::Instant::now() + MOVE_SOURCE_WAIT;
        loop {
            let (vol, node) = (v.name.clone(), to.id.clone());
            let running = ctx
                .blocking(move |m| {
                    let tasks: Vec<Task> = m.list()?;
                    Ok(tasks.iter().any(|t| {
                        t.node_id.as_deref() == Some(node.as_str())
                            && t.status.state == TaskState::Running
                            && volume_mounts(&t.spec).any(|s| s == vol)
                    }))
                })
                .await?;
            if running {
                break None;
            }
            if tokio::time::Instant::now() >= deadline {
                break Some(format!(
                    "no task of {} ran on node {} within {} s: the old copy stays on node {} \
                     (delete its DATA/volumes/{} by hand once the data is checked)",
                    users.iter().cloned().collect::<Vec<_>>().join(", "),
                    to.spec.name,
                    MOVE_SOURCE_WAIT.as_secs(),
                    from.spec.name,
                    v.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let kept = match kept {
        Some(why) => Some(why),
        None => {
            let path = format!("/v1/agent/volumes/{}", v.name);
            match agent(ctx, &from)
                .request(axum::http::Method::DELETE, &path, None)
                .await
            {
                Ok(_) => None,
                Err(e) if e.status() == Some(404) => None,
                Err(e) => Some(format!(
                    "node {} did not delete the old copy ({e}): delete its DATA/volumes/{} by hand",
                    from.spec.name, v.name
                )),
            }
        }
    };
    Ok(flotilla_types::VolumeMoved {
        name: v.name,
        from: from.id,
        to: to.id,
        bytes,
        sha256: pass.sha256,
        copy_ms,
        passes,
        source_removed: kept.is_none(),
        source_kept_because: kept,
    })
}

/// The services with a task that wants to run on volume `name` (desired running, not ended).
fn volume_task_users(m: &Manager, name: &str) -> Result<BTreeSet<String>, ManagerError> {
    let services: Vec<Service> = m.list()?;
    let tasks: Vec<Task> = m.list()?;
    Ok(tasks
        .iter()
        .filter(|t| {
            t.desired_state == TaskState::Running
                && !t.status.state.is_terminal()
                && volume_mounts(&t.spec).any(|s| s == name)
        })
        .map(|t| {
            services
                .iter()
                .find(|s| s.id == t.service_id)
                .map(|s| s.spec.name.clone())
                .unwrap_or_else(|| t.service_id.clone())
        })
        .collect())
}

/// How long `volume move` waits for the replacement of a task it stopped to appear before it
/// treats the volume as unused (its service scaled to 0 meanwhile).
const REPLACEMENT_WAIT: Duration = Duration::from_secs(10);

/// How long `volume move` waits, past the tasks' stop grace periods, for the tasks it stopped
/// to let go of the volume.
const MOVE_STOP_WAIT: Duration = Duration::from_secs(60);

/// The first half of `volume move` for a volume a running task holds, as a drain does it:
/// checks that every holder is a running task of a replicated service (any other holder
/// refuses the move), copies the volume to `to` while they run (the first pass), then holds
/// the tasks that want the volume ([`crate::volumes::constrain`]), stops the holders (the
/// orchestrator makes their replacements, which wait for the new home) and waits until no
/// container on `from` holds the volume. Returns the first pass; the caller runs the final
/// pass and writes the new home. If the first pass fails the tasks were not touched; if they
/// do not stop in time the copy is dropped, the hold lifted and the replacements start on
/// `from` with the data there.
async fn stop_and_precopy(
    ctx: &Ctx,
    name: &str,
    from: &Node,
    to: &Node,
    holders: &[String],
) -> Result<flotilla_types::VolumePass, ManagerError> {
    use crate::volumes::{MoveState, Phase};
    let (tasks, grace) = {
        let (ids, name, from) = (holders.to_vec(), name.to_string(), from.clone());
        ctx.blocking(move |m| {
            let services: Vec<Service> = m.list()?;
            let tasks = ids
                .iter()
                .map(|id| m.get::<Task>(id))
                .collect::<Result<Vec<_>, _>>()?;
            movable_holders(&name, &from, &ids, tasks, &services)
        })
        .await?
    };
    if !ctx
        .moves
        .start(name, MoveState::new(&from.id, &to.id, Phase::PreCopying))
    {
        return Err(ManagerError::conflict(format!(
            "volume {name}: another move is under way; try again when it is done"
        )));
    }
    // The first pass, the tasks still running.
    let pass = match precopy(ctx, name, &from.id, &to.id).await {
        Ok(pass) => pass,
        Err(e) => {
            ctx.moves.remove(name);
            return Err(ManagerError::unavailable(format!(
                "{e}; the task keeps running on node {}",
                from.spec.name
            )));
        }
    };
    let give_up = |why: String| async move {
        ctx.moves.remove(name);
        drop_copy(ctx, name, to).await;
        ctx.wake.notify_one();
        ManagerError::unavailable(format!(
            "volume {name}: {why}; the volume stays on node {}",
            from.spec.name
        ))
    };
    match ctx.moves.get(name) {
        Some(mut st) => {
            st.phase = Phase::PreCopied(pass.clone());
            st.hold = true;
            ctx.moves.set(name, st);
        }
        None => return Err(give_up("the move was called off".into()).await),
    }
    // Stop the holders: desired state shut down, each written against the version read.
    for t in tasks {
        if let Err(e) = stop_task(ctx, &t.id).await {
            return Err(give_up(format!("stopping its task failed: {e}")).await);
        }
    }
    tracing::info!(volume = %name, from = %from.id, to = %to.id, bytes = pass.bytes,
        "volume move: pre-copied with its task running; the task stops for the final pass");
    // Wait until no container on the old node holds the volume.
    // A grace period is capped at an hour here.
    let wait = grace.min(Duration::from_secs(3600)) + MOVE_STOP_WAIT;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match local_volumes(ctx, name, from, "its node").await {
            Ok(l) if l.iter().all(|l| l.name != name || l.in_use_by.is_empty()) => break,
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(give_up(format!(
                "its task did not let go of it within {} s",
                wait.as_secs()
            ))
            .await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(pass)
}

/// The tasks a `volume move` may stop for volume `name` on node `from`, and their longest stop
/// grace period: `ids` are the holders node `from` reports (untrusted), `tasks` what the store
/// has for each (`None`: unknown). Each must be a running task of a replicated service on that
/// node that mounts the volume unshared; anything else refuses the move, saying what to do.
fn movable_holders(
    name: &str,
    from: &Node,
    ids: &[String],
    tasks: Vec<Option<Task>>,
    services: &[Service],
) -> Result<(Vec<Task>, Duration), ManagerError> {
    let from_name = &from.spec.name;
    let mut out = Vec::new();
    let mut grace = Duration::ZERO;
    for (id, task) in ids.iter().zip(tasks) {
        let service = task
            .as_ref()
            .and_then(|t| services.iter().find(|s| s.id == t.service_id));
        let (Some(t), Some(s)) = (task, service) else {
            return Err(ManagerError::conflict(format!(
                "volume {name} is mounted on node {from_name} by container {id}, which no task \
                 of the cluster runs (one being removed?): try again once it is gone"
            )));
        };
        if t.desired_state > TaskState::Running {
            return Err(ManagerError::conflict(format!(
                "volume {name} is mounted by task {id} on node {from_name}, which is stopping: \
                 try again once it has stopped"
            )));
        }
        let mount = t
            .spec
            .container
            .mounts
            .iter()
            .find(|m| m.kind == MountKind::Volume && m.source == name);
        let why = if t.node_id.as_deref() != Some(from.id.as_str())
            || t.desired_state != TaskState::Running
        {
            Some(format!("task {id}, which is not running there"))
        } else if !matches!(s.spec.mode, flotilla_types::ServiceMode::Replicated { .. }) {
            Some(format!(
                "task {id} of {} service {}, which stays on its node",
                s.spec.mode.name(),
                s.spec.name
            ))
        } else {
            match mount {
                None => Some(format!("task {id}, which does not mount it")),
                Some(m) if m.shared => Some(format!("task {id}, which mounts it shared")),
                Some(_) => None,
            }
        };
        if let Some(why) = why {
            return Err(ManagerError::conflict(format!(
                "volume {name} is mounted on node {from_name} by {why}: drain that node \
                 (`flotilla node update --availability drain {from_name}`) or scale the service \
                 to 0, then move the volume"
            )));
        }
        grace = grace.max(t.spec.container.stop_grace());
        out.push(t);
    }
    Ok((out, grace))
}

/// Sets task `id`'s desired state to shut down (against the version read; retried a few times
/// when the task changes meanwhile). Nothing to do for a task gone or already stopping.
async fn stop_task(ctx: &Ctx, id: &str) -> Result<(), ManagerError> {
    for _ in 0..5 {
        let read = {
            let id = id.to_string();
            ctx.blocking(move |m| m.get::<Task>(&id)).await?
        };
        let Some(mut t) = read else { return Ok(()) };
        if t.desired_state > TaskState::Running {
            return Ok(());
        }
        let version = t.meta.version;
        t.desired_state = TaskState::Shutdown;
        t.meta.updated_at = now_ms();
        let op = Op::update(Table::Tasks, &t.id, encode(&t)?, Some(version));
        match ctx.write(Batch::single(op), "task").await {
            Ok(_) => return Ok(()),
            Err(ManagerError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ManagerError::conflict(format!(
        "task {id} kept changing while the move tried to stop it"
    )))
}

/// Answers `e` without reading an upload (past what `refuse_unread` drains).
async fn refuse(req: axum::extract::Request, e: ManagerError) -> Result<Response, ManagerError> {
    Err(flotilla_api::body::refuse_unread(req, e.into())
        .await
        .into())
}

/// `POST /v1/volumes/{name}/import`: streams a tar archive to the volume's home node, which
/// unpacks it into the (new or empty) volume. The volume needs a home: `volume create NAME
/// --node NODE` first.
pub async fn import_volume(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ManagerError> {
    if let Err(e) = admin_only(&caller, "volumes") {
        return refuse(req, e).await;
    }
    let (v, node) = match volume_home(&ctx, name).await {
        Ok(x) => x,
        Err(e) => return refuse(req, e).await,
    };
    let Some(node) = node else {
        return refuse(req, ManagerError::bad_request(format!(
            "volume {} has no node yet: create it with `flotilla volume create {} --node NODE` before importing",
            v.name, v.name
        )))
        .await;
    };
    let client = ctx.tls.node(&node.status.addr);
    let path = format!("/v1/agent/volumes/{}/import", v.name);
    let body = http_body_util::BodyExt::map_err(req.into_body(), |e| {
        Box::new(e) as flotilla_api::upload::BoxError
    });
    let resp = client
        .send_stream(
            axum::http::Method::POST,
            &path,
            "application/x-tar",
            Box::pin(body),
        )
        .await
        .map_err(|e| {
            ManagerError::unavailable(format!(
                "volume {}: its node {} cannot be reached: {e}",
                v.name, node.spec.name
            ))
        })?;
    let status = resp.status();
    let collected = client.finish(resp).await;
    match collected {
        Ok(r) => Ok((status, Body::from(r.body)).into_response()),
        Err(flotilla_api::ClientError::Api { status, message }) => {
            Err(ManagerError::Api(super::ApiError::new(
                axum::http::StatusCode::from_u16(status)
                    .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
                message,
            )))
        }
        Err(e) => Err(ManagerError::unavailable(format!(
            "volume {}: import on node {} failed: {e}",
            v.name, node.spec.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_is_by_component() {
        assert!(under("/srv/data", "/srv/data"));
        assert!(under("/srv/data/x", "/srv/data/"));
        assert!(!under("/srv/data2", "/srv/data"));
        assert!(!under("/srv", "/srv/data"));
        assert!(!under("/etc", "/"));
    }

    /// The holders a node reports are checked against the store: only a running task of a
    /// replicated service there that mounts the volume unshared may be stopped for a move.
    #[test]
    fn a_move_stops_only_tasks_that_really_hold_the_volume() {
        let from: Node = serde_json::from_value(serde_json::json!({
            "id": "n1",
            "spec": {"name": "n1-name", "role": "worker", "availability": "active", "labels": {}},
            "description": {"hostname": "n1", "os": "linux", "arch": "x86_64",
                "resources": {"nano_cpus": 1, "memory_bytes": 1}},
            "status": {"state": "ready", "message": "", "addr": "127.0.0.1:1", "last_heartbeat": 0}
        }))
        .expect("node json");
        let service = |id: &str, mode: serde_json::Value| -> Service {
            serde_json::from_value(serde_json::json!({
                "id": id,
                "spec": {"name": id, "task_template": {"container": {"image": "db"}}, "mode": mode},
            }))
            .expect("service json")
        };
        let services = [
            service("rep", serde_json::json!({"replicated": {"replicas": 1}})),
            service("glob", serde_json::json!("global")),
        ];
        let task = |id: &str, svc: &str, vol: &str, shared: bool| {
            let mut t = Task {
                id: id.into(),
                meta: Meta::default(),
                service_id: svc.into(),
                slot: Some(1),
                node_id: Some("n1".into()),
                spec: Default::default(),
                spec_version: 1,
                job_iteration: 0,
                status: flotilla_types::TaskStatus::new(TaskState::Running, 0, "running"),
                desired_state: TaskState::Running,
            };
            t.spec.container.stop_grace_period = Some(3_000_000_000);
            t.spec.container.mounts.push(flotilla_types::Mount {
                kind: MountKind::Volume,
                source: vol.into(),
                target: "/data".into(),
                shared,
                ..Default::default()
            });
            t
        };
        let check = |t: Option<Task>| {
            let id = t.as_ref().map_or("forged".to_string(), |t| t.id.clone());
            movable_holders("data", &from, &[id], vec![t], &services)
        };
        let (ok, grace) = check(Some(task("t1", "rep", "data", false))).expect("a real holder");
        assert_eq!((ok.len(), grace), (1, Duration::from_secs(3)));
        let refused = |t: Option<Task>, says: &str| match check(t) {
            Err(ManagerError::Conflict(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("{says}: {other:?}"),
        };
        refused(None, "no task of the cluster runs");
        let mut other_node = task("t2", "rep", "data", false);
        other_node.node_id = Some("n2".into());
        refused(Some(other_node), "not running there");
        let mut stopping = task("t3", "rep", "data", false);
        stopping.desired_state = TaskState::Shutdown;
        refused(Some(stopping), "stopping");
        refused(Some(task("t4", "glob", "data", false)), "stays on its node");
        refused(Some(task("t5", "rep", "other", false)), "does not mount it");
        refused(Some(task("t6", "rep", "data", true)), "mounts it shared");
        refused(
            Some(task("t7", "gone", "data", false)),
            "no task of the cluster runs",
        );
    }

    #[test]
    fn allow_list_entries_are_checked() {
        assert!(validate_bind_allow("/srv/data").is_ok());
        for bad in ["srv", "/", "//", "/srv/../etc", "/a\0"] {
            assert!(validate_bind_allow(bad).is_err(), "{bad:?}");
        }
    }
}
