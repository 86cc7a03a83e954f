//! Autolock on a manager, both halves of it:
//!
//! - **applying the cluster's setting** ([`autolock_loop`]): the cluster object holds the
//!   unlock key while autolock is on. Each manager watches it and makes its key directory
//!   agree: key on → its data keys re-wrapped by the unlock key and its `kek` file removed;
//!   key rotated → re-wrapped by the new key; key off → a `kek` file again. The file steps
//!   and their crash-safety are `flotilla_secrets::unlock`'s.
//! - **a locked start** ([`Unlocker`], [`LockedMembers`]): a manager whose key directory has
//!   no `kek` that opens it starts locked. It serves only `/v1/ping` and
//!   `POST /v1/cluster/unlock` (`routes::locked_router`); Raft, the control loops and the
//!   agent wait. A right key hands the keyring to the daemon ([`Unlocked`]), which opens the
//!   store and goes on starting without a restart.
//!
//! The node's certificates, its key and the CA certificate are plain files (not sealed in the
//! store), so mTLS works while locked and the admin certificate can unlock over the network.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use flotilla_api::authz::Members;
use flotilla_api::{ApiError, Caller};
use flotilla_manager::{ClusterObject, Manager, CLUSTER_KEY};
use flotilla_pki::Role;
use flotilla_store::flotilla_secrets::{self, Keyring, LockedKeys, UnlockError, UnlockKey};
use flotilla_store::Table;

/// How often a manager looks at the cluster's autolock setting (a local read).
const POLL: Duration = Duration::from_millis(500);
/// How long an unlock request waits for the store to open before it answers anyway.
const OPEN_WAIT: Duration = Duration::from_secs(120);

/// The 503 every route but ping and unlock answers on a locked manager.
pub(crate) const LOCKED_MESSAGE: &str = "this manager is locked: run `flotilla cluster unlock` against it and give the cluster's unlock key (`flotilla cluster unlock-key` on an unlocked manager shows it)";

/// What wraps this manager's data keys on disk now.
enum Wrapped {
    /// The `kek` file beside them (autolock off).
    KekFile,
    /// This unlock key (autolock on); the `kek` file is gone.
    Unlock(UnlockKey),
}

/// This manager's data keys and what wraps them, for [`autolock_loop`].
pub(crate) struct AtRest {
    dir: PathBuf,
    keyring: Arc<Keyring>,
    wrapped: Mutex<Wrapped>,
}

impl AtRest {
    /// Keys opened by the `kek` file in `dir`.
    pub(crate) fn with_kek_file(dir: PathBuf, keyring: Arc<Keyring>) -> AtRest {
        AtRest {
            dir,
            keyring,
            wrapped: Mutex::new(Wrapped::KekFile),
        }
    }

    /// Keys a locked start opened with `key`.
    pub(crate) fn unlocked(dir: PathBuf, keyring: Arc<Keyring>, key: UnlockKey) -> AtRest {
        AtRest {
            dir,
            keyring,
            wrapped: Mutex::new(Wrapped::Unlock(key)),
        }
    }

    /// Makes the key directory agree with the cluster's unlock key (`None`: autolock off).
    /// Blocking (file writes and fsyncs). Returns what it changed, for the log.
    fn apply(&self, want: Option<UnlockKey>) -> Result<Option<&'static str>, ApiError> {
        let mut wrapped = self.wrapped.lock().unwrap_or_else(|p| p.into_inner());
        let change = match (&*wrapped, &want) {
            (Wrapped::KekFile, None) => None,
            (Wrapped::Unlock(have), Some(w)) if have == w => None,
            (Wrapped::KekFile, Some(_)) => {
                Some("autolock on: data keys wrapped by the unlock key, key file removed")
            }
            (Wrapped::Unlock(_), Some(_)) => {
                Some("unlock key rotated: data keys re-wrapped by the new key")
            }
            (Wrapped::Unlock(_), None) => {
                Some("autolock off: data keys wrapped by a key file again")
            }
        };
        if change.is_none() {
            return Ok(None);
        }
        let res = match &want {
            Some(key) => flotilla_secrets::wrap_with_unlock_key(&self.dir, &self.keyring, key),
            None => flotilla_secrets::unwrap_to_kek_file(&self.dir, &self.keyring),
        };
        res.map_err(|e| ApiError::internal(e.to_string()))?;
        *wrapped = match want {
            Some(key) => Wrapped::Unlock(key),
            None => Wrapped::KekFile,
        };
        Ok(change)
    }
}

/// Watches the cluster object in this manager's local store and applies its autolock
/// setting to the key directory ([`AtRest::apply`]) whenever it changes; a failure is logged
/// and retried.
pub(crate) async fn autolock_loop(
    mgr: Arc<Manager>,
    at_rest: Arc<AtRest>,
    mut stop: watch::Receiver<bool>,
) {
    let mut applied: Option<u64> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        if let Some(version) = check(&mgr, &at_rest, applied).await {
            applied = Some(version);
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// One look at the cluster object: applies it if its version is not `applied`; returns the
/// version applied.
async fn check(mgr: &Arc<Manager>, at_rest: &Arc<AtRest>, applied: Option<u64>) -> Option<u64> {
    let v = match mgr.store.get(Table::Cluster, CLUSTER_KEY) {
        Ok(Some(v)) => v,
        // Not replicated yet (a manager that just joined), or the store is closing.
        _ => return None,
    };
    if applied == Some(v.version) {
        return applied;
    }
    let cluster: ClusterObject = match serde_json::from_slice(&v.value) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "autolock: cannot read the cluster object");
            return None;
        }
    };
    let want = match cluster.unlock_key.as_deref().map(UnlockKey::parse) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "autolock: the cluster's unlock key is malformed; leaving the key files as they are");
            return Some(v.version);
        }
    };
    let at_rest = at_rest.clone();
    match tokio::task::spawn_blocking(move || at_rest.apply(want)).await {
        Ok(Ok(Some(change))) => {
            tracing::info!("{change}");
            Some(v.version)
        }
        Ok(Ok(None)) => Some(v.version),
        Ok(Err(e)) => {
            tracing::warn!(error = %e.message, "autolock: updating the key files failed; retrying");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "autolock: updating the key files failed; retrying");
            None
        }
    }
}

/// What a successful unlock hands the daemon: the data keys, the key that opened them, and
/// where to say whether the store then opened.
pub(crate) struct Unlocked {
    pub keyring: Arc<Keyring>,
    pub key: UnlockKey,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// The unlock of a locked manager (`POST /v1/cluster/unlock`).
pub(crate) struct Unlocker {
    locked: LockedKeys,
    to_daemon: Mutex<Option<oneshot::Sender<Unlocked>>>,
    /// One attempt at a time.
    attempt: tokio::sync::Mutex<()>,
}

impl Unlocker {
    pub(crate) fn new(locked: LockedKeys, to_daemon: oneshot::Sender<Unlocked>) -> Unlocker {
        Unlocker {
            locked,
            to_daemon: Mutex::new(Some(to_daemon)),
            attempt: tokio::sync::Mutex::new(()),
        }
    }

    /// Tries `text` as the unlock key: a malformed key is a 400, a wrong one a 401 (the node
    /// stays locked, its files untouched); the right one opens the data keys, hands them to
    /// the daemon, and waits (up to [`OPEN_WAIT`]) for the store to open.
    pub(crate) async fn unlock(&self, text: &str) -> Result<serde_json::Value, ApiError> {
        let key = UnlockKey::parse(text).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let _one = self.attempt.lock().await;
        if self
            .to_daemon
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Err(ApiError::conflict(
                "this manager is already unlocked and starting",
            ));
        }
        let locked = self.locked.clone();
        let k = key.clone();
        let keyring = tokio::task::spawn_blocking(move || locked.unlock(&k))
            .await
            .map_err(|e| ApiError::internal(format!("unlock: {e}")))?
            .map_err(|e| match e {
                UnlockError::Malformed(m) => {
                    ApiError::bad_request(format!("not an unlock key: {m}"))
                }
                UnlockError::WrongKey => {
                    tracing::warn!("unlock refused: a wrong unlock key");
                    ApiError::unauthorized(UnlockError::WrongKey.to_string())
                }
                UnlockError::Secrets(e) => {
                    ApiError::internal(format!("encryption-at-rest keys: {e}"))
                }
            })?;
        let Some(tx) = self
            .to_daemon
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Err(ApiError::conflict(
                "this manager is already unlocked and starting",
            ));
        };
        let (done, opened) = oneshot::channel();
        tx.send(Unlocked { keyring, key, done })
            .map_err(|_| ApiError::unavailable("this manager is shutting down"))?;
        tracing::info!("unlocked: opening the store");
        match tokio::time::timeout(OPEN_WAIT, opened).await {
            Ok(Ok(Ok(()))) => Ok(serde_json::json!({ "unlocked": true })),
            Ok(Ok(Err(e))) => Err(ApiError::internal(format!(
                "unlocked, but the store did not open: {e}"
            ))),
            Ok(Err(_)) => Err(ApiError::unavailable("this manager is shutting down")),
            Err(_) => Ok(serde_json::json!({ "unlocked": true, "starting": true })),
        }
    }
}

/// Membership as a locked manager sees it (its store is closed): certificates of this
/// cluster's CA speak for what they say. Only ping and the admin's unlock are served past
/// authorization, so this decides nothing else.
pub(crate) struct LockedMembers {
    pub cluster_id: String,
}

impl Members for LockedMembers {
    fn cluster_id(&self) -> String {
        self.cluster_id.clone()
    }

    fn node_caller(&self, id: &str, cert_role: Role) -> Result<Caller, ApiError> {
        Ok(Caller::Node {
            id: id.to_string(),
            role: cert_role,
        })
    }

    fn raft_peer(&self, _node_id: &str) -> bool {
        // Past authorization a Raft RPC gets the 503 "locked", which the peer retries.
        true
    }
}

#[cfg(test)]
mod tests {
    use flotilla_store::flotilla_secrets::{KeyState, DEK_FILE, KEK_FILE};

    use super::*;

    #[test]
    fn apply_follows_the_cluster_setting_and_skips_what_is_done() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("keys");
        let KeyState::Open { keyring, .. } = flotilla_secrets::open_or_lock(&dir).expect("open")
        else {
            panic!("new keys are open");
        };
        let at_rest = AtRest::with_kek_file(dir.clone(), keyring.clone());
        let dek = || std::fs::read(dir.join(DEK_FILE)).expect("dek");
        assert_eq!(at_rest.apply(None).expect("off"), None);

        let k1 = UnlockKey::generate().expect("k1");
        assert!(at_rest.apply(Some(k1.clone())).expect("on").is_some());
        assert!(!dir.join(KEK_FILE).exists());
        let wrapped = dek();
        // The same key again: nothing rewritten.
        assert_eq!(at_rest.apply(Some(k1.clone())).expect("same"), None);
        assert_eq!(dek(), wrapped);

        let k2 = UnlockKey::generate().expect("k2");
        assert!(at_rest.apply(Some(k2.clone())).expect("rotate").is_some());
        let KeyState::Locked(l) = flotilla_secrets::open_or_lock(&dir).expect("open") else {
            panic!("locked");
        };
        assert!(l.unlock(&k1).is_err());
        assert_eq!(*l.unlock(&k2).expect("k2 opens"), *keyring);

        assert!(at_rest.apply(None).expect("off").is_some());
        assert!(dir.join(KEK_FILE).exists());
        assert!(matches!(
            flotilla_secrets::open_or_lock(&dir).expect("open"),
            KeyState::Open { .. }
        ));
    }
}
