//! Managers keep their own copy of every image a service uses, so that an image pushed
//! through one manager survives that manager's loss. Which images are missing is read on the
//! blocking pool (store and image store); copying them is async.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use flotilla_types::Service;

use crate::{Manager, ManagerError};

/// How often a manager checks that it holds every image a service uses.
pub const REPLICATE_PERIOD: Duration = Duration::from_secs(3);

/// The images services use (current and previous spec) that this manager's image store lacks.
fn missing_images(mgr: &Manager) -> Result<Vec<String>, ManagerError> {
    let mut wanted: Vec<String> = Vec::new();
    for s in &mgr.list::<Service>()? {
        for spec in std::iter::once(&s.spec).chain(s.previous_spec.as_ref()) {
            let image = &spec.task_template.container.image;
            let Some(d) = flotilla_registry::digest_of(image) else {
                continue;
            };
            if mgr.images.resolve(d).is_err() && !wanted.contains(image) {
                wanted.push(image.clone());
            }
        }
    }
    Ok(wanted)
}

/// Managers keep their own copy of every image a service uses (current and previous spec):
/// a missing one is pulled, with its signatures and verified blob by blob, from a peer
/// manager. An image pushed through one manager thus survives that manager's loss once a
/// service refers to it (within a few seconds).
pub async fn replicate_loop(mgr: Arc<Manager>, mut stop: watch::Receiver<bool>) {
    let images = mgr.images.clone();
    let mut tick = tokio::time::interval(REPLICATE_PERIOD);
    loop {
        tokio::select! {
            _ = flotilla_api::server::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let Ok(wanted) = mgr.blocking(missing_images).await else {
            continue;
        };
        if wanted.is_empty() {
            continue;
        }
        let peers = crate::api::PeerManagers::new(&mgr).clients();
        for image in wanted {
            let Some(digest) = flotilla_registry::digest_of(&image).map(str::to_string) else {
                continue;
            };
            let name = flotilla_registry::ImageRef::parse(&image)
                .map(|r| r.name)
                .unwrap_or_default();
            for (addr, client) in &peers {
                // Signatures first: once the image shows here, its signatures are here too.
                if let Err(e) =
                    flotilla_registry::fetch_signatures(client, &images, &name, &digest).await
                {
                    tracing::debug!(%image, manager = %addr, error = %e, "copying signatures failed");
                }
                match flotilla_registry::pull(client, &images, &image, |_| {}).await {
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
