//! Image garbage collection on a node. Managers keep every tagged image (their store is the
//! registry) plus the images of services (current and previous spec) and of tasks that have
//! not ended, and purge registry uploads abandoned for a day; every node keeps the images its
//! containers and assigned tasks use, and a worker drops everything else, tagged or not. Runs
//! every [`PERIOD`] and on demand (`POST /v1/images/prune`, `flotilla image prune`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use flotilla_registry::{GcOptions, GcReport};
use flotilla_runtime::RuntimeDriver;
use flotilla_types::{Service, Task};

use crate::trust::{digest_of, task_images};
use crate::NodeCtx;

/// How often the node collects.
pub const PERIOD: Duration = Duration::from_secs(600);
/// Registry upload sessions untouched this long are deleted (managers).
const STALE_UPLOAD: Duration = Duration::from_secs(24 * 3600);

/// Manifest digests this node must keep.
async fn keep_set(ctx: &NodeCtx) -> Result<HashSet<String>, String> {
    let mut keep = ctx.agent_images.assigned();
    if let Some(rt) = &ctx.runtime {
        let containers = rt.list().await.map_err(|e| e.to_string())?;
        keep.extend(containers.into_iter().map(|c| c.image));
    }
    if let Some(mgr) = &ctx.manager {
        let services: Vec<Service> = mgr.list().map_err(|e| e.message)?;
        for s in &services {
            for spec in std::iter::once(&s.spec).chain(s.previous_spec.as_ref()) {
                if let Some(d) = digest_of(&spec.task_template.container.image) {
                    keep.insert(d.to_string());
                }
            }
        }
        let tasks: Vec<Task> = mgr.list().map_err(|e| e.message)?;
        keep.extend(task_images(&tasks));
    }
    Ok(keep)
}

/// Collects now; blobs younger than `min_age` are spared (uploads in flight).
pub async fn prune(ctx: &NodeCtx, min_age: Duration) -> Result<GcReport, String> {
    let Some(rt) = ctx.runtime.clone() else {
        return Err("this node has no image store".into());
    };
    let keep = keep_set(ctx).await?;
    let opts = GcOptions {
        min_age,
        keep_tagged: ctx.manager.is_some(),
    };
    let registry = ctx.manager.is_some();
    tokio::task::spawn_blocking(move || {
        if registry {
            // Upload sessions abandoned for a day (pushes that never finished).
            let purged = flotilla_registry::RegistryState::new(rt.images_shared())
                .and_then(|s| s.purge_stale_uploads(STALE_UPLOAD));
            if let Err(e) = purged {
                tracing::warn!(error = %e, "purging stale registry uploads failed");
            }
        }
        flotilla_registry::collect_garbage_with(rt.images(), &keep, &opts)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Collects every [`PERIOD`].
pub async fn gc_loop(ctx: Arc<NodeCtx>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = flotilla_api::server::stopped(&mut stop) => return,
        }
        match prune(&ctx, GcOptions::default().min_age).await {
            Ok(r) => tracing::debug!(
                blobs = r.removed_blobs.len(),
                freed = r.freed_bytes,
                "periodic image gc"
            ),
            Err(e) => tracing::warn!(error = %e, "image garbage collection failed"),
        }
    }
}

/// How often a manager checks that it holds every image a service uses.
pub const REPLICATE_PERIOD: Duration = Duration::from_secs(3);

/// Managers keep their own copy of every image a service uses (current and previous spec):
/// a missing one is pulled, with its signatures and verified blob by blob, from a peer
/// manager. An image pushed through one manager thus survives that manager's loss once a
/// service refers to it (within a few seconds).
pub async fn replicate_loop(ctx: Arc<NodeCtx>, mut stop: watch::Receiver<bool>) {
    let (Some(mgr), Some(rt)) = (ctx.manager.clone(), ctx.runtime.clone()) else {
        return;
    };
    let mut tick = tokio::time::interval(REPLICATE_PERIOD);
    loop {
        tokio::select! {
            _ = flotilla_api::server::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let Ok(services) = mgr.list::<Service>() else {
            continue;
        };
        let mut wanted: Vec<String> = Vec::new();
        for s in &services {
            for spec in std::iter::once(&s.spec).chain(s.previous_spec.as_ref()) {
                let image = &spec.task_template.container.image;
                let Some(d) = digest_of(image) else { continue };
                if rt.images().resolve(d).is_err() && !wanted.contains(image) {
                    wanted.push(image.clone());
                }
            }
        }
        if wanted.is_empty() {
            continue;
        }
        let peers = crate::api::PeerManagers::new(&ctx).clients();
        for image in wanted {
            let Some(digest) = digest_of(&image).map(str::to_string) else {
                continue;
            };
            let name = flotilla_registry::ImageRef::parse(&image)
                .map(|r| r.name)
                .unwrap_or_default();
            for (addr, client) in &peers {
                // Signatures first: once the image shows here, its signatures are here too.
                if let Err(e) =
                    flotilla_registry::fetch_signatures(client, rt.images(), &name, &digest).await
                {
                    tracing::debug!(%image, manager = %addr, error = %e, "copying signatures failed");
                }
                match flotilla_registry::pull(client, rt.images(), &image, |_| {}).await {
                    Ok(_) => {
                        tracing::info!(%image, from = %addr, "copied a service's image from a peer manager");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(%image, manager = %addr, error = %e, "copying an image failed; trying the next manager")
                    }
                }
            }
        }
    }
}
