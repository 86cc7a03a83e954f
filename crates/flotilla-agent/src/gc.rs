//! Image garbage collection on a node. Every node keeps the images its containers and assigned
//! tasks use; a manager also keeps every tagged image (its store is the registry) and the
//! images the cluster refers to ([`ClusterImages`](crate::ClusterImages)), and purges registry
//! uploads abandoned for a day; a worker drops everything else, tagged or not. Runs every
//! [`PERIOD`] and on demand (`POST /v1/images/prune`, `flotilla image prune`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use flotilla_registry::{GcOptions, GcReport};
use flotilla_runtime::RuntimeDriver;

use crate::{blocking, AgentCtx, AgentError};

/// How often the node collects.
pub const PERIOD: Duration = Duration::from_secs(600);
/// Registry upload sessions untouched this long are deleted (managers).
const STALE_UPLOAD: Duration = Duration::from_secs(24 * 3600);

/// Manifest digests this node must keep.
async fn keep_set(ctx: &AgentCtx) -> Result<HashSet<String>, AgentError> {
    let mut keep = ctx.images.assigned();
    let containers = ctx.runtime.list().await?;
    keep.extend(containers.into_iter().map(|c| c.image));
    if let Some(cluster) = ctx.cluster.clone() {
        let in_use = blocking(move || cluster.in_use())
            .await
            .map_err(|_| AgentError::ShuttingDown)?;
        keep.extend(in_use?);
    }
    Ok(keep)
}

/// Collects now; blobs younger than `min_age` are spared (uploads in flight).
pub async fn prune(ctx: &AgentCtx, min_age: Duration) -> Result<GcReport, AgentError> {
    let rt = ctx.runtime.clone();
    let keep = keep_set(ctx).await?;
    let registry = ctx.on_manager();
    let opts = GcOptions {
        min_age,
        keep_tagged: registry,
    };
    let collected = blocking(move || {
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
    .map_err(|_| AgentError::ShuttingDown)?;
    Ok(collected?)
}

/// Collects every [`PERIOD`].
pub async fn gc_loop(ctx: Arc<AgentCtx>, mut stop: watch::Receiver<bool>) {
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
