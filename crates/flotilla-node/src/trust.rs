//! Image trust on the agent: the cluster's policy arrives with every assignment set; before a
//! container is created the executor asks [`verify_image`] whether the task's image (its
//! manifest digest) carries a valid signature from a trusted key. Signatures come with the
//! pull; when the manager the image came from lacks them, every other manager is asked.
//! Fails closed: no policy received means enforcing with no key.

use std::collections::HashSet;
use std::sync::Mutex;

use flotilla_registry::{ImageRef, ImageStore, TrustPolicy};
use flotilla_types::Task;

use crate::api::dispatch::Assignments;
use crate::NodeCtx;

/// What the agent last learned from its assignment set: the trust policy and the images its
/// assigned tasks use (kept by image garbage collection).
#[derive(Debug, Default)]
pub struct AgentImages {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    policy: Option<TrustPolicy>,
    assigned: HashSet<String>,
}

/// The manifest digest of a pinned `name:tag@sha256:…` (or a bare digest).
pub fn digest_of(image: &str) -> Option<&str> {
    if image.starts_with("sha256:") {
        return Some(image);
    }
    image.find("@sha256:").map(|i| &image[i + 1..])
}

/// Digests of the images of tasks that have not ended.
pub fn task_images<'a>(tasks: impl IntoIterator<Item = &'a Task>) -> HashSet<String> {
    tasks
        .into_iter()
        .filter(|t| !t.status.state.is_terminal())
        .filter_map(|t| digest_of(&t.spec.container.image).map(str::to_string))
        .collect()
}

impl AgentImages {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new assignment set.
    pub fn note(&self, set: &Assignments) {
        let mut g = self.lock();
        g.policy = set.trust.clone();
        g.assigned = task_images(&set.tasks);
    }

    /// The current policy (enforcing with no key until one arrives).
    pub fn policy(&self) -> TrustPolicy {
        self.lock().policy.clone().unwrap_or_default()
    }

    /// Images the assigned tasks use.
    pub fn assigned(&self) -> HashSet<String> {
        self.lock().assigned.clone()
    }
}

/// Checks `image` (manifest `digest`, already in `store`) against the policy. The error is
/// the task's rejection message: `image <ref> is not signed by a trusted key`.
pub async fn verify_image(
    ctx: &NodeCtx,
    store: &ImageStore,
    image: &str,
    digest: &str,
) -> Result<(), String> {
    let policy = ctx.agent_images.policy();
    if !policy.enforce {
        return Ok(());
    }
    let resolved;
    let digest = if digest.starts_with("sha256:") {
        digest
    } else {
        resolved = store.resolve(digest).map_err(|e| e.to_string())?;
        resolved.as_str()
    };
    let first = match policy.verify(store, image, digest) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    // The signatures may live on another manager than the one the image came from.
    if let Ok(r) = ImageRef::parse(image) {
        for addr in crate::agent::targets(ctx) {
            let Some(client) = ctx.tls.registry(&addr) else {
                continue;
            };
            match flotilla_registry::fetch_signatures(&client, store, &r.name, digest).await {
                Ok(()) => {
                    if policy.verify(store, image, digest).is_ok() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    tracing::debug!(image, manager = %addr, error = %e, "fetching signatures failed")
                }
            }
        }
    }
    Err(first.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_of_pinned_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(digest_of(&format!("web:1@{d}")), Some(d.as_str()));
        assert_eq!(digest_of(&d), Some(d.as_str()));
        assert_eq!(digest_of("web:1"), None);
    }

    #[test]
    fn no_policy_yet_means_enforcing_with_no_key() {
        let a = AgentImages::default();
        let p = a.policy();
        assert!(p.enforce && p.keys.is_empty());
        assert!(a.assigned().is_empty());
    }
}
