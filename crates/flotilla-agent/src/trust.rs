//! Image trust on the agent: the cluster's policy arrives with every assignment set; before a
//! container is created the executor asks [`verify_image`] whether the task's image (its
//! manifest digest) carries a valid signature from a trusted key. Signatures come with the
//! pull; when the manager the image came from lacks them, every other manager is asked.
//! Fails closed: no policy received means enforcing with no key.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::task::JoinError;

use flotilla_registry::{task_images, ImageRef, ImageStore, TrustCheck, TrustError, TrustPolicy};
use flotilla_types::Assignments;

use crate::{blocking, AgentCtx, TaskError};

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

impl AgentImages {
    /// Poisoning is ignored: every writer replaces whole fields.
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

/// Checks `image` (manifest `digest`, already in `store`) against the policy. Refused, the
/// error is the task's rejection message: `image <ref> is not signed by a trusted key`.
pub async fn verify_image(
    ctx: &AgentCtx,
    store: Arc<ImageStore>,
    image: &str,
    digest: &str,
) -> Result<(), TaskError> {
    let policy = ctx.images.policy();
    if !policy.enforce {
        return Ok(());
    }
    let (image, digest) = (image.to_string(), digest.to_string());
    let check = Arc::new(blocking(move || Check::new(policy, store, image, digest)).await??);
    let first = match check.verify().await? {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    // The signatures may live on another manager than the one the image came from.
    if fetch_and_verify(ctx, &check).await {
        return Ok(());
    }
    Err(TaskError::NotTrusted(first))
}

/// One image's trust check. The store is read (and signatures checked) on the blocking pool.
struct Check {
    policy: TrustPolicy,
    store: Arc<ImageStore>,
    image: String,
    /// The manifest digest.
    digest: String,
}

impl Check {
    /// Resolves `digest` through the store's index unless it is a `sha256:` one (blocking).
    fn new(
        policy: TrustPolicy,
        store: Arc<ImageStore>,
        image: String,
        digest: String,
    ) -> Result<Check, TaskError> {
        let digest = if digest.starts_with("sha256:") {
            digest
        } else {
            store.resolve(&digest)?
        };
        Ok(Check {
            policy,
            store,
            image,
            digest,
        })
    }

    /// The policy's verdict on the signatures the store holds.
    async fn verify(self: &Arc<Self>) -> Result<Result<(), TrustError>, JoinError> {
        let c = self.clone();
        blocking(move || c.policy.verify(&c.store, &c.image, &c.digest)).await
    }
}

/// Fetches the image's signatures from each manager in turn until the policy accepts them.
async fn fetch_and_verify(ctx: &AgentCtx, check: &Arc<Check>) -> bool {
    let Ok(r) = ImageRef::parse(&check.image) else {
        return false;
    };
    for addr in crate::upstream::targets(ctx) {
        let Some(client) = ctx.registry(&addr) else {
            continue;
        };
        match flotilla_registry::fetch_signatures(&client, &check.store, &r.name, &check.digest)
            .await
        {
            Ok(()) => {
                if matches!(check.verify().await, Ok(Ok(()))) {
                    return true;
                }
            }
            Err(e) => {
                tracing::debug!(image = %check.image, manager = %addr, error = %e, "fetching signatures failed")
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_policy_yet_means_enforcing_with_no_key() {
        let a = AgentImages::default();
        let p = a.policy();
        assert!(p.enforce && p.keys.is_empty());
        assert!(a.assigned().is_empty());
    }
}
